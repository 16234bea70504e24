//! The node daemon: a composition root over owners, each with its own state and its own lock.
//! [`Node::start`] builds them; [`Node::serve`] spawns the tasks that drive them (the local
//! API, the 500 ms tick, the kernel's records, the AI catalog, metrics, the control-plane
//! link). Flows that involve several owners (a launch, a revocation, a tick) are written here.
//!
//! | owner | owns |
//! |---|---|
//! | [`registry::Registry`] | identity numbers and revocations (`identities.json`) |
//! | [`enforcer::Enforcer`] | the policy in force: apply, refuse, last good, schedule re-arm; publishes [`enforcer::Applied`] |
//! | [`sessions::Sessions`] | launched and enrolled cgroups: admit, bind, renew, collect, expiry, CRL cut-off |
//! | [`dns::DnsLearning`] | answers → kernel host entries, the learned file, names seen, proxy namespaces |
//! | [`records::Records`] | decision records: enrich, fold (pure, [`records::Folder`]), emit; recent ones for `flows` |
//! | [`journal::Journal`] | the audit log, the control-plane outbox, loss counts, typed audit events |
//! | [`trust::Trust`] | trust bundle, CRLs and the TLS configuration built on them |
//! | [`canary::Canary`] | the enforcement self-check: its cgroup, its last result |
//! | [`views`] | `status` and the metrics page |
//! | [`preflight`] | `node --check-config`: owns nothing; reads what a start would, keeps nothing |
//! | [`api`] | the local API: one request, checked once, handed to its owner |
//!
//! Lock order: a lock may be taken while holding those before it in this list, never after:
//! enforcer (held through an apply) → the datapath's `applying` (one rule change at a time) →
//! sessions → DNS learned table → the datapath's map locks (tries, then a trie's map;
//! identities, bindings, config) → registry → record folder → recent records → journal →
//! counters. The DNS proxy's namespace state is taken on its own. Snapshots
//! ([`enforcer::Applied`], TLS) are read by cloning an `Arc`; nothing that serves an agent (a
//! DNS answer, a decision record, `status`, a revocation) waits on a policy apply, and the
//! parts of an apply that hold a lock an answer waits on run at normal priority.

pub mod api;
pub mod canary;
pub mod dns;
pub mod enforcer;
pub mod follow;
pub mod issuing;
pub mod journal;
pub mod preflight;
pub mod records;
pub mod registry;
pub mod sessions;
pub mod trust;
pub mod views;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    os::{fd::OwnedFd, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, RwLock, atomic::AtomicU64},
    time::Duration,
};

use tokio::net::UnixListener;
use tracing::{error, info, warn};

use crate::{
    cgroup::{Cgroup, Cgroup2Mount, CgroupError},
    config::{ConfigError, NodeConfig},
    control_plane::link::{ApplyError, LinkError, LinkStats},
    datapath::{Datapath, DatapathConfig, DatapathError, EventReader},
    discovery::{Catalog, CatalogError},
    dns::{
        Answer,
        proxy::{AnswerSink, Netns, Proxy, ProxyConfig},
    },
    identity::VerifiedPeer,
    policy::{IdentityStatus, Mode, source::PolicySet},
};

use self::{
    enforcer::{Deps, Enforcer, EnforcerError},
    journal::{AuditEvent, IdentityEvent, Journal, JournalError, KernelLoss},
    records::{Lookups, Records},
    registry::{Registry, RegistryError},
    sessions::{SessionError, Sessions},
    trust::{Trust, TrustError},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("audit signing key: {0}")]
    SigningKey(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Sessions(#[from] SessionError),
    #[error("control plane: {0}")]
    Link(#[from] LinkError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("group {0:?} (socket_group or audit_log_group) does not exist")]
    NoGroup(String),
    #[error("metrics_listen {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("installing the SIGTERM handler: {0}")]
    Signal(io::Error),
    #[error(
        "{kept}: {found}: which identity each number stands for is lost; restore it, or {fix}, and start again"
    )]
    StateLost {
        kept: PathBuf,
        found: String,
        fix: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Why a revocation was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("unknown identity {0}")]
    Unknown(String),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// An audit log file is rotated past this size unless `audit_log_max_bytes` says otherwise.
const AUDIT_MAX_BYTES: u64 = 64 << 20;

/// A value replaced whole and read without waiting: readers clone the `Arc` under a lock held
/// for no longer than that.
pub struct Snapshot<T>(RwLock<Arc<T>>);

impl<T> Snapshot<T> {
    pub fn new(v: T) -> Self {
        Self(RwLock::new(Arc::new(v)))
    }

    pub fn get(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, v: T) {
        let v = Arc::new(v);
        // The old value is dropped after the lock is released.
        let _old = std::mem::replace(
            &mut *self
                .0
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            v,
        );
    }
}

/// The metrics counters, behind one short lock.
#[derive(Default)]
pub struct Counters(Mutex<crate::metrics::Counters>);

impl Counters {
    pub fn add(&self, f: impl FnOnce(&mut crate::metrics::Counters)) {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    pub fn snapshot(&self) -> crate::metrics::Counters {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

pub struct Node {
    cfg: NodeConfig,
    datapath: Arc<Datapath>,
    trust: Trust,
    registry: Registry,
    enforcer: Enforcer,
    sessions: Sessions,
    dns: dns::DnsLearning,
    canary: canary::Canary,
    /// AI services and the addresses they are known to have.
    catalog: Mutex<Catalog>,
    /// Where the node resolves the AI catalog's names.
    upstreams: Vec<SocketAddr>,
    records: Records,
    journal: Arc<Journal>,
    counters: Counters,
    events: Mutex<Option<EventReader>>,
    /// Kernel records already reported as lost.
    dropped_seen: AtomicU64,
    /// Connections the TLS check refused, waiting for the one worker that ends them.
    sni_ending: Mutex<SniEnding>,
    /// Set once the control plane link runs.
    link: OnceLock<Arc<LinkStats>>,
    /// Certificates from the control plane's issuer: the client, and the sessions being
    /// renewed or waiting to try again.
    issuing: issuing::Issuing,
}

/// Hands the proxy's answers to the node without a reference cycle.
struct DnsSink(std::sync::Weak<Node>);

impl AnswerSink for DnsSink {
    fn admit(&self, identity: u32, name: &str, qtype: u16) -> crate::dns::proxy::Admit {
        match self.0.upgrade() {
            Some(node) => node.dns.admit(
                identity,
                name,
                qtype,
                &node.enforcer.applied(),
                &node.journal,
            ),
            None => crate::dns::proxy::Admit::Refuse,
        }
    }

    fn answered(&self, identity: u32, answer: &Answer) {
        if let Some(node) = self.0.upgrade() {
            node.dns_answered(identity, answer);
        }
    }
}

/// What an earlier process already reported of the kernel's lost-record count: none when
/// the count is below it (the maps are new).
fn reported_kernel_loss(state_dir: &std::path::Path, datapath: &Datapath) -> u64 {
    let reported = std::fs::read_to_string(crate::config::kernel_lost(state_dir))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let now = datapath.dropped_events().unwrap_or(0);
    if reported <= now { reported } else { 0 }
}

/// How long a refusal of the TLS check waits for its record before the tick ends its
/// connection without one.
const SNI_RECORD_WAIT: Duration = Duration::from_secs(2);
/// Refused connections waiting to be ended, at most: past it a flood's are left to the
/// kernel, which drops their data all the same (counted in `dropped`).
const SNI_ENDING_MAX: usize = 4096;
/// Of those, one identity's at most: a flood of one identity's refusals leaves the others'
/// room to be ended.
const SNI_ENDING_PER_IDENTITY: usize = SNI_ENDING_MAX / 4;

/// The refused connections the node ends, and whether its worker runs.
#[derive(Default)]
struct SniEnding {
    queue: Vec<crate::datapath::sni::Refused>,
    /// Of `queue`, how many each identity has.
    queued: HashMap<u32, usize>,
    running: bool,
    dropped: u64,
}

impl SniEnding {
    /// Queues `r` unless the queue, or its identity's share of it, is full (then counted in
    /// `dropped`).
    fn admit(&mut self, r: crate::datapath::sni::Refused) {
        let mine = self.queued.entry(r.identity).or_default();
        if self.queue.len() >= SNI_ENDING_MAX || *mine >= SNI_ENDING_PER_IDENTITY {
            self.dropped += 1;
            return;
        }
        *mine += 1;
        self.queue.push(r);
    }

    fn take(&mut self) -> Vec<crate::datapath::sni::Refused> {
        self.queued.clear();
        std::mem::take(&mut self.queue)
    }
}

impl Node {
    /// Starts the datapath (adopting pins), loads and applies policy. The policy must be valid
    /// to start, unless a last good copy is kept.
    pub fn start(cfg: NodeConfig) -> Result<Arc<Self>, NodeError> {
        cfg.check()?;
        crate::arm_failpoints("AGENTWALL_FAILPOINTS_AT_START");
        let _ = raise_fd_limit();
        let uring = preflight::io_uring_here();
        if uring.verdict == preflight::Verdict::Warning {
            warn!(detail = %uring.detail, "io_uring is open to enrolled units");
        }
        let binder = preflight::binder_here();
        if binder.verdict == preflight::Verdict::Warning {
            warn!(detail = %binder.detail, "binder hands files to agents unjudged");
        }
        if let Err(e) = crate::sockets::can_read_every_task() {
            warn!(error = %e, "every enroll is refused");
        }
        let dir = cfg.policy_dir();
        let state_dir = cfg.state_dir();
        std::fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        let trust = Trust::load(&cfg)?;
        if cfg.control_plane.is_some() {
            // Before the first bundle arrives the node enforces an empty policy: every bound
            // identity is denied everything.
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let mount = Cgroup2Mount::discover()?;
        let attach = cfg
            .attach_cgroup
            .clone()
            .unwrap_or_else(|| mount.mount_point.clone());
        let mut dp_cfg = DatapathConfig::new(&attach, cfg.bpffs_dir());
        dp_cfg.unknown_flows = cfg.unknown_flows();
        dp_cfg.record_allowed = cfg.record_allowed.unwrap_or(true);
        let caps = cfg.dns_caps();
        dp_cfg.host_headroom = u32::try_from(
            caps.names_per_identity
                .saturating_mul(caps.addresses_per_name)
                .min(1 << 16),
        )
        .unwrap_or(1 << 16);
        // The policy is read while the kernel verifies the programs; nothing is attached
        // before it is known good. A bad policy directory never replaces a good policy: the
        // node starts on the last good one (kept in state_dir) and says why.
        let (initial, loaded) = std::thread::scope(|s| {
            let read = s.spawn(|| Enforcer::initial_policy(&dir, &state_dir));
            let loaded = Datapath::load(&dp_cfg);
            (
                read.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                loaded,
            )
        });
        let loaded = loaded?;
        let initial = match initial {
            Ok(i) => i,
            Err(e) => {
                // Nothing was attached; maps this start pinned (none were there) go again.
                if loaded.fresh() {
                    drop(loaded);
                    if let Err(t) = crate::datapath::teardown(&cfg.bpffs_dir()) {
                        warn!(error = %t, "removing the maps of a start refused for its policy");
                    }
                }
                return Err(e.into());
            }
        };
        // Attached once the maps hold the policy and the sessions (below).
        let (datapath, programs) = loaded.open()?;
        let datapath = Arc::new(datapath);
        datapath.set_dns_port(cfg.dns_port())?;
        let mut dns_error = None;
        let upstreams = if cfg.dns_upstream.is_empty() {
            crate::dns::resolv_conf_upstreams(Path::new("/etc/resolv.conf")).unwrap_or_else(|e| {
                error!(error = %e, "the DNS proxy has no upstream; every query gets SERVFAIL");
                dns_error = Some(e.to_string());
                Vec::new()
            })
        } else {
            cfg.dns_upstream.clone()
        };
        let events = datapath.take_events();
        let agents = Cgroup::create(attach.join("agentwall"))?;
        // Before the sessions are read back: a canary cgroup an earlier run left goes, and
        // with it its binding.
        let canary = canary::Canary::new(datapath.attach_cgroup());
        let catalog = Catalog::new(&cfg.ai_catalog)?;
        // Pinned bindings name identities by number, and only identities.json says which is
        // which: without it, a new numbering would give running agents other identities'
        // rules (and forget revocations).
        if !registry::kept(&state_dir).exists() {
            let bound = datapath.bindings()?.len() + datapath.older_bindings()?.len();
            if bound > 0 {
                return Err(NodeError::StateLost {
                    kept: registry::kept(&state_dir),
                    found: format!(
                        "missing, while the maps pinned under {} bind {bound} cgroup(s) to identity numbers",
                        cfg.bpffs_dir().display()
                    ),
                    fix: format!(
                        "end that enforcement with `agentwall down --bpffs-dir {}`",
                        cfg.bpffs_dir().display()
                    ),
                });
            }
            let listed = sessions::kept_numbers(&state_dir).len();
            if listed > 0 {
                let table = sessions::kept(&state_dir);
                return Err(NodeError::StateLost {
                    kept: registry::kept(&state_dir),
                    found: format!(
                        "missing, while {} lists {listed} session(s) by identity number",
                        table.display()
                    ),
                    fix: format!(
                        "remove {} (its sessions are then not governed until launched or enrolled again)",
                        table.display()
                    ),
                });
            }
        }
        let registry = Registry::load(&state_dir)?;
        // And a table that does not match them (an old backup put back, one copied from
        // another host, `{}` written over a corrupt one): numbers it did not give would be
        // given again, to other identities.
        let unknown: std::collections::BTreeSet<u32> = datapath
            .bindings()?
            .into_iter()
            .map(|(_, n)| n)
            .chain(sessions::kept_numbers(&state_dir))
            .filter(|&n| !registry.gave(n))
            .collect();
        if !unknown.is_empty() {
            return Err(NodeError::StateLost {
                kept: registry::kept(&state_dir),
                found: format!(
                    "the pinned bindings or the session table use identity numbers it does not list ({unknown:?})"
                ),
                fix: format!(
                    "end that enforcement with `agentwall down --bpffs-dir {}` and remove {}",
                    cfg.bpffs_dir().display(),
                    sessions::kept(&state_dir).display()
                ),
            });
        }
        let journal = Arc::new(Journal::open(
            cfg.audit_log.as_deref(),
            cfg.audit_log_max_bytes.unwrap_or(AUDIT_MAX_BYTES),
            Some(&crate::config::audit_anchor(&state_dir)),
            cfg.audit_log_group.as_deref().map(group_id).transpose()?,
        )?);
        if let Some(ocsf) = cfg.audit_ocsf_log()? {
            journal.copy_as_ocsf(&ocsf)?;
            tracing::info!(path = %ocsf.display(), version = crate::ocsf::VERSION,
                "audit records are also written as OCSF events");
        }
        if let Some(key) = &cfg.audit_signing_key {
            // A key that cannot be read refuses the start: a node asked to sign must not
            // run unsigned without anyone noticing.
            let signer = crate::audit::Signer::load(key)?;
            let every = Duration::from_secs(cfg.audit_checkpoint_secs.unwrap_or(60).max(1));
            tracing::info!(
                key = signer.id(),
                every_secs = every.as_secs(),
                "audit checkpoints are signed"
            );
            journal.sign_with(signer, every);
        }
        let sessions =
            Sessions::load(datapath.clone(), journal.clone(), agents, mount, &state_dir)?;
        // CRLs that changed while the node was down reach the sessions it had.
        sessions.cut_off(&trust.revoked());
        let settings = dns::Settings {
            grace: cfg.dns_grace(),
            min_ttl: cfg.dns_min_ttl(),
            caps,
            catalog_keep: cfg.catalog_refresh() * 2 + cfg.dns_grace(),
            state_dir: state_dir.clone(),
            namespaces_per_identity: cfg.dns_namespace_caps().0,
            namespaces: cfg.dns_namespace_caps().1,
        };
        let dns_port = cfg.dns_port();
        let proxy_cfg = ProxyConfig {
            port: dns_port,
            upstreams: upstreams.clone(),
            timeout: cfg.dns_timeout(),
        };
        let enforcer = Enforcer::new(
            datapath.clone(),
            dir,
            &state_dir,
            cfg.control_plane.is_some(),
            dns_port != 0,
        );

        let node = Arc::new_cyclic(|weak| Self {
            dns: dns::DnsLearning::new(
                settings,
                (dns_port != 0).then(|| Proxy::new(proxy_cfg, Arc::new(DnsSink(weak.clone())))),
                dns_error,
            ),
            upstreams,
            trust,
            registry,
            enforcer,
            sessions,
            canary,
            catalog: Mutex::new(catalog),
            records: Records::new(cfg.aggregate_window()),
            journal,
            counters: Counters::default(),
            events: Mutex::new(events),
            dropped_seen: AtomicU64::new(reported_kernel_loss(&cfg.state_dir(), &datapath)),
            sni_ending: Mutex::new(SniEnding::default()),
            link: OnceLock::new(),
            issuing: issuing::Issuing::default(),
            datapath,
            cfg,
        });
        node.enforcer.start(initial, &node.deps())?;
        // Only now do this build's programs judge: after an upgrade to a new map layout,
        // programs attached over empty maps would deny bound agents everything (sessions bound
        // before the policy) or let them through as unbound, while the old layout's programs
        // still judged correctly beside them.
        node.datapath.attach(programs)?;
        node.finish_upgrade()?;
        // The first self-check before the API serves: no session starts on lines that do not
        // refuse.
        node.self_check();
        Ok(node)
    }

    /// After an upgrade to a new map layout, the old layout's programs judge beside the new
    /// ones until the new maps hold what the old ones did: the policy (applied by now), the
    /// sessions (bound again when read back), and socket state, which cannot be carried
    /// across: every TCP and UDP socket the sessions made before is destroyed, so agents make
    /// them again under the new programs. Then the old pins go.
    fn finish_upgrade(&self) -> Result<(), NodeError> {
        let older = self.datapath.older_layouts()?;
        if older.is_empty() {
            return Ok(());
        }
        // A cgroup the old layout binds and the new one does not (bound, then the node
        // stopped before its session table was written): retiring the old programs would
        // leave it ungoverned, and no certificate is at hand to bind it again. The old layout
        // stays attached and governs it until the cgroup is enrolled again or removed.
        let bound: std::collections::HashSet<u64> = self
            .datapath
            .bindings()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // Anywhere on the host, not only below this attach point: an earlier version may have
        // been attached elsewhere.
        let mut live = std::collections::HashSet::new();
        let root = crate::cgroup::Cgroup2Mount::discover().map_or_else(
            |_| self.datapath.attach_cgroup().path().to_owned(),
            |m| m.mount_point,
        );
        crate::cgroup::subtree_ids(&root, &mut live);
        let orphans: Vec<u64> = self
            .datapath
            .older_bindings()?
            .into_iter()
            .filter(|id| !bound.contains(id) && live.contains(id))
            .collect();
        if !orphans.is_empty() {
            error!(layouts = ?older, cgroup_ids = ?orphans,
                "upgrade not finished: an earlier map layout binds cgroups the session table does not know; it stays attached and governs them until each is enrolled again or removed");
            return Ok(());
        }
        let destroyed = match self.sessions.end_all_sockets() {
            Ok(n) => n,
            Err(e) => {
                // Sockets the new programs cannot judge may be left: the old layout stays
                // attached beside the new one (every program must allow), and the next start
                // tries again.
                error!(error = %e, layouts = ?older,
                    "upgrade not finished: sockets made before it could not all be destroyed; the earlier map layout stays attached");
                return Ok(());
            }
        };
        let retired = self.datapath.retire_older_layouts()?;
        warn!(
            layouts = ?retired,
            sessions = self.sessions.len(),
            sockets_destroyed = destroyed,
            "upgraded from an earlier map layout: sockets made before it were destroyed"
        );
        Ok(())
    }

    fn deps(&self) -> Deps<'_> {
        Deps {
            registry: &self.registry,
            sessions: &self.sessions,
            dns: &self.dns,
            journal: &self.journal,
            counters: &self.counters,
        }
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The revision in force.
    pub fn revision(&self) -> String {
        self.enforcer.applied().revision().to_owned()
    }

    /// Re-reads the policy directory (see [`Enforcer::reload`]).
    pub fn reload_policy(&self, force: bool) {
        self.enforcer.reload(force, &self.deps());
    }

    /// The half-second housekeeping: CRLs, ended sessions, lost kernel records, expired
    /// learned addresses and certificates, the DNS proxy's namespaces, counts the kernel
    /// held, folded runs, schedule windows and the policy directory.
    fn tick(self: &Arc<Self>) {
        self.journal.checkpoint(false);
        if let Some(serials) = self.trust.reload_crls() {
            self.sessions.cut_off(&serials);
        }
        self.sessions.collect();
        let dropped = self.datapath.dropped_events().unwrap_or(0);
        let seen = self
            .dropped_seen
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
        if dropped > seen {
            let lost = dropped - seen;
            warn!(lost, "kernel records lost (ring buffer full)");
            self.journal.record(&AuditEvent::Loss(KernelLoss {
                records_lost: lost,
                total_lost: dropped,
            }));
            // After the record: a crash in between counts these twice, never not at all.
            let path = crate::config::kernel_lost(&self.cfg.state_dir());
            if let Err(e) =
                crate::files::write_in_place(&path, format!("{dropped:020}\n").as_bytes())
            {
                error!(error = %e, path = %path.display(), "the kernel's reported loss count could not be kept; a restart reports it again");
            }
        }
        self.dns.expire(&self.datapath);
        // Refusals whose records the kernel folded: their connections end all the same.
        let before = crate::clock::BootInstant::now()
            .0
            .saturating_sub(SNI_RECORD_WAIT.as_nanos() as u64);
        let stale = self.datapath.take_stale_sni_refused(before);
        self.end_sni_connections(stale);
        self.sessions.note_expiries();
        self.renew_from_issuer();
        {
            let applied = self.enforcer.applied();
            self.dns.sync(
                &self.sessions.namespaces(),
                &applied.identities,
                &self.journal,
            );
            self.dns.flush_refusals(&applied, &self.journal);
            let with = self.lookups(&applied);
            self.records
                .sweep_kernel_counts(&self.datapath, &with, &self.journal, &self.counters);
        }
        self.records.flush(false, &self.journal);
        let deps = self.deps();
        self.enforcer.rearm_if_due(&deps);
        self.enforcer.reload(false, &deps);
    }

    /// The identity table's number for the self-check's canary.
    fn canary_number(&self) -> Result<u32, canary::CanaryError> {
        Ok(self
            .registry
            .self_check_number(agent_common::MAX_IDENTITIES - 1)?)
    }

    /// Runs the enforcement self-check now (after one that is running).
    fn self_check(&self) {
        self.canary.run(&self.datapath, || self.canary_number());
    }

    fn lookups<'a>(&'a self, applied: &'a enforcer::Applied) -> Lookups<'a> {
        Lookups {
            applied,
            sessions: &self.sessions,
            dns: &self.dns,
            catalog: &self.catalog,
        }
    }

    fn dns_answered(&self, identity: u32, answer: &Answer) {
        let seen: Vec<std::net::IpAddr> = answer.addrs.iter().map(|(ip, _)| *ip).collect();
        let keep = self.cfg.catalog_refresh() * 2 + self.cfg.dns_grace();
        self.catalog().observe(&answer.qname, &seen, keep);
        let applied = self.enforcer.applied();
        self.dns.answered(
            identity,
            answer,
            &applied,
            &self.datapath,
            &self.journal,
            &self.counters,
        );
    }

    /// The identity's number, if it may be bound now (it has a policy and is not revoked).
    fn admissible(&self, id: &str) -> Result<u32, SessionError> {
        let applied = self.enforcer.applied();
        let number = applied
            .policy
            .agent(id)
            .and_then(|_| applied.identities.number(id))
            .ok_or_else(|| SessionError::NoPolicy(id.to_owned()))?;
        if self.registry.is_revoked(id) {
            return Err(SessionError::Revoked(id.to_owned()));
        }
        Ok(number)
    }

    fn refused(op: &str, id: String, why: &SessionError) -> crate::api::Response {
        warn!(identity = %id, reason = %why, "{op} rejected");
        crate::api::Response::error(Some(id), why.to_string())
    }

    /// The SPIFFE ID of an identity number, for messages.
    fn name_of(&self, number: u32) -> String {
        self.registry
            .table()
            .name(number)
            .map_or_else(|| format!("identity {number}"), str::to_owned)
    }

    /// Refused while the last self-check failed: a session started then would run on lines
    /// that do not refuse.
    fn enforcing(&self) -> Result<(), SessionError> {
        match self.canary.refusal() {
            Some(why) => Err(SessionError::SelfCheck(why)),
            None => Ok(()),
        }
    }

    /// The applied policy's `io_uring` for identity `id` (refused where it has no policy).
    fn io_uring_of(&self, id: &str) -> crate::policy::model::IoUring {
        self.enforcer
            .applied()
            .policy
            .agent(id)
            .map(|a| a.io_uring)
            .unwrap_or_default()
    }

    fn launch(
        &self,
        peer: VerifiedPeer,
        pidfd: OwnedFd,
        follow: Option<crate::api::Followed>,
        workload_api: Option<String>,
        issued: Option<String>,
        refuses_io_uring: bool,
    ) -> crate::api::Response {
        let id = peer.id.to_string();
        // Read once: what the launcher is held to is what it is told.
        let io_uring = self.io_uring_of(&id);
        let placed = self
            .enforcing()
            .and_then(|()| {
                if io_uring == crate::policy::model::IoUring::Refuse && !refuses_io_uring {
                    return Err(SessionError::LauncherKeepsIoUring);
                }
                self.sessions
                    .refuse_governed_caller(&pidfd, |n| self.name_of(n))
            })
            .and_then(|()| self.admissible(&id))
            .and_then(|n| {
                self.sessions
                    .launch(&peer, &pidfd, n, follow, workload_api, issued)
            });
        let r = self.bound("launch", id, placed);
        crate::api::Response {
            io_uring: r.ok.then_some(io_uring),
            ..r
        }
    }

    /// The answer to a launch or enrollment: once bound, the agent's first lookup finds a
    /// proxy in its network namespace.
    fn bound(
        &self,
        op: &str,
        id: String,
        result: Result<PathBuf, SessionError>,
    ) -> crate::api::Response {
        match result {
            Ok(cgroup) => {
                self.dns.sync(
                    &self.sessions.namespaces(),
                    &self.enforcer.applied().identities,
                    &self.journal,
                );
                crate::api::Response {
                    ok: true,
                    identity: Some(id),
                    cgroup: Some(cgroup),
                    ..Default::default()
                }
            }
            Err(e) => Self::refused(op, id, &e),
        }
    }

    fn enroll(
        &self,
        peer: VerifiedPeer,
        pidfd: OwnedFd,
        path: &Path,
        follow: Option<crate::api::Followed>,
    ) -> crate::api::Response {
        let id = peer.id.to_string();
        let enrolled = self
            .enforcing()
            .and_then(|()| {
                self.sessions
                    .refuse_governed_caller(&pidfd, |n| self.name_of(n))
            })
            .and_then(|()| {
                self.sessions.enroll(
                    &peer,
                    path,
                    follow,
                    || self.io_uring_of(&id),
                    || self.admissible(&id),
                    |n| self.name_of(n),
                )
            });
        self.bound("enroll", id, enrolled)
    }

    fn renew(&self, peer: VerifiedPeer, pidfd: OwnedFd) -> crate::api::Response {
        let id = peer.id.to_string();
        let renewed = self
            .sessions
            .session_of_caller(&peer, &pidfd)
            .and_then(|s| {
                self.admissible(&id)?;
                self.sessions
                    .renew(&peer, &s, false)
                    .map(|c| c.unwrap_or(s.cgroup))
            });
        match renewed {
            Ok(cgroup) => crate::api::Response {
                ok: true,
                identity: Some(id),
                cgroup: Some(cgroup),
                ..Default::default()
            },
            Err(e) => Self::refused("renew", id, &e),
        }
    }

    /// Ends the caller's own session (its Workload API says the SVID is gone): the binding is
    /// revoked, as a CRL would, and its connections destroyed. Ending a session only takes
    /// away, so any process of the session holding a certificate of its identity may ask.
    fn end(&self, peer: VerifiedPeer, pidfd: OwnedFd, reason: &str) -> crate::api::Response {
        let id = peer.id.to_string();
        let ended = self
            .sessions
            .session_of_caller(&peer, &pidfd)
            .and_then(|s| self.sessions.end(&s, reason).map(|()| s.cgroup));
        match ended {
            Ok(cgroup) => crate::api::Response {
                ok: true,
                identity: Some(id),
                cgroup: Some(cgroup),
                ..Default::default()
            },
            Err(e) => Self::refused("end", id, &e),
        }
    }

    /// Denies the identity everything at once and keeps it revoked (across reloads and
    /// restarts), then ends its established connections. The one path for `revoke` and for
    /// fleet-wide revocations (`by`).
    fn revoke(&self, id: &str, by: Option<&'static str>) -> Result<(), RevokeError> {
        if by.is_none() && self.registry.table().number(id).is_none() {
            return Err(RevokeError::Unknown(id.to_owned()));
        }
        // Marked first: an apply writing identity states from now on writes this one revoked.
        if let Err(e) = self.registry.revoke(id) {
            error!(error = %e, identity = id, "revocation is in force but could not be saved");
        }
        // Read after the mark: an apply that numbers the identity meanwhile writes it revoked.
        let number = self.registry.table().number(id);
        let Some(number) = number else {
            // Not seen here yet: it stays revoked should it ever be.
            warn!(identity = %id, "identity revoked fleet-wide (no session here)");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::Revoked {
                    identity: id.to_owned(),
                    connections_destroyed: 0,
                    by,
                }));
            return Ok(());
        };
        let mode = self
            .enforcer
            .applied()
            .policy
            .agent(id)
            .map_or(Mode::Enforce, |a| a.mode);
        // Written twice at most: the mark makes the next apply write it in any case.
        let written = self
            .datapath
            .set_identity(number, IdentityStatus::Revoked, mode)
            .or_else(|_| {
                self.datapath
                    .set_identity(number, IdentityStatus::Revoked, mode)
            });
        // New connections fail (or will, at the next apply); end the established ones too.
        let destroyed = self.sessions.end_connections(id);
        warn!(
            identity = id,
            connections_destroyed = destroyed,
            "identity revoked"
        );
        self.journal
            .record(&AuditEvent::Identity(IdentityEvent::Revoked {
                identity: id.to_owned(),
                connections_destroyed: destroyed,
                by: None,
            }));
        written.map_err(RevokeError::from)
    }

    /// Reads the kernel's decision records as they arrive.
    async fn read_events(self: Arc<Self>) {
        let Some(mut reader) = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        reader.skip_first(self.journal.recent_events());
        // SAFETY: the reader owns the ring buffer's map fd, which stays open and the same for
        // as long as the reader lives inside the AsyncFd.
        let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(reader) } {
            Ok(fd) => fd,
            Err(e) => {
                error!(error = %e, "cannot watch the event ring buffer; no flows will be recorded");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let applied = self.enforcer.applied();
            let with = self.lookups(&applied);
            let mut cut = Vec::new();
            guard.get_inner_mut().drain_with(|e| {
                // The self-check's own: what it must be refused is no agent's doing.
                if !self.canary.owns(e.identity) {
                    let server_name = self.sni_refused(&e, &mut cut);
                    self.records
                        .record(&e, server_name, &with, &self.journal, &self.counters);
                }
            });
            self.end_sni_connections(cut);
            guard.clear_ready();
        }
    }

    /// For a record of the TLS server-name check: the name refused, and (enforce) the
    /// connection ended, off this task: the kernel drops its packets, and its owner would
    /// otherwise wait for TCP to give up.
    fn sni_refused(
        &self,
        e: &crate::datapath::EventRecord,
        cut: &mut Vec<crate::datapath::sni::Refused>,
    ) -> Option<String> {
        use crate::policy::Reason;
        if !matches!(
            e.reason,
            Some(Reason::SniMismatch | Reason::SniMissing | Reason::ZeroCopy | Reason::AfterHello)
        ) {
            return None;
        }
        let refused = self.datapath.take_sni_refused(e.time.0)?;
        let name = (!refused.name.is_empty()).then(|| refused.name.clone());
        cut.push(refused);
        name
    }

    /// Ends the connections the TLS check refused (enforce), off the caller's task: one worker
    /// at a time, one socket dump per identity and namespace for what waits.
    fn end_sni_connections(self: &Arc<Self>, refused: Vec<crate::datapath::sni::Refused>) {
        {
            let mut e = self
                .sni_ending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for r in refused.into_iter().filter(|r| r.cut) {
                e.admit(r);
            }
            if e.running || e.queue.is_empty() {
                return;
            }
            e.running = true;
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                let batch = {
                    let mut e = node
                        .sni_ending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if e.dropped > 0 {
                        warn!(
                            left = e.dropped,
                            "more connections refused by the TLS server-name check than the node ends at once; the kernel drops their data, and their agents wait for TCP to give up"
                        );
                        e.dropped = 0;
                    }
                    if e.queue.is_empty() {
                        e.running = false;
                        return;
                    }
                    e.take()
                };
                let mut by_identity: BTreeMap<u32, Vec<(u16, std::net::SocketAddr)>> =
                    BTreeMap::new();
                for r in batch {
                    by_identity
                        .entry(r.identity)
                        .or_default()
                        .push((r.local_port, r.peer));
                }
                let applied = node.enforcer.applied();
                for (number, which) in by_identity {
                    let Some(identity) = applied.identities.name(number) else {
                        continue;
                    };
                    let n = node.sessions.end_these_connections(identity, &which);
                    tracing::debug!(
                        identity,
                        asked = which.len(),
                        ended = n,
                        "connections refused by the TLS server-name check ended"
                    );
                }
            }
        });
    }

    /// The self-check on its schedule, off the tick: a canary that does not answer holds up
    /// only the check.
    async fn self_checks(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let node = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                node.canary
                    .run_if_due(&node.datapath, || node.canary_number());
            })
            .await;
        }
    }

    /// Resolves the AI catalog's names now and every `catalog_refresh_secs`, so unknown flows
    /// to them are tagged with their service.
    async fn refresh_catalog(self: Arc<Self>) {
        let every = self.cfg.catalog_refresh();
        loop {
            let names = self.catalog().exact_names();
            let node = self.clone();
            let found = tokio::task::spawn_blocking(move || {
                names
                    .into_iter()
                    .map(|n| {
                        let addrs =
                            crate::discovery::resolve(&node.upstreams, &n, Duration::from_secs(2));
                        (n, addrs)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            {
                let mut catalog = self.catalog();
                for (name, addrs) in &found {
                    catalog.observe(name, addrs, every * 2 + Duration::from_secs(60));
                }
                tracing::debug!(addresses = catalog.known_addresses(), "AI catalog resolved");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Serves the API until SIGTERM or SIGINT. Enforcement stays pinned after it returns.
    pub async fn serve(self: Arc<Self>, ready: impl FnOnce(&Path, &str)) -> Result<(), NodeError> {
        let socket = self.cfg.socket();
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&socket)(e)),
        }
        let listener = UnixListener::bind(&socket).map_err(io_err(&socket))?;
        // Root only unless a group is configured.
        let mode = if self.cfg.socket_group.is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&socket))?;
        if let Some(group) = &self.cfg.socket_group {
            chown_group(&socket, group)?;
        }
        if let Some(cp) = &self.cfg.control_plane {
            let link = crate::control_plane::link::Link::new(cp, &self.cfg.state_dir())?
                .describing(self.cfg.owner.clone(), self.cfg.labels.clone());
            let _ = self.link.set(link.stats.clone());
            self.issuing.connect(cp).map_err(LinkError::from)?;
            // What the spool had not taken when the node stopped is sent from the log.
            self.journal
                .enable_outbox_from(link.handled(self.journal.head())?);
            link.spawn(self.clone());
        }
        let revision = self.revision();
        tokio::spawn(self.clone().read_events());
        tokio::spawn(self.clone().self_checks());
        self.spawn_follower();
        if !self.cfg.catalog_refresh().is_zero() {
            tokio::spawn(self.clone().refresh_catalog());
        }
        if let Some(addr) = self.cfg.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Metrics { addr, source })?;
            tokio::spawn(views::serve_metrics(self.clone(), listener));
        }
        // Handlers first: a SIGTERM right after readiness must stop the node cleanly, not
        // kill it with the default action.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(NodeError::Signal)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(NodeError::Signal)?;
        ready(&socket, &revision);
        crate::arm_failpoints("AGENTWALL_FAILPOINTS");
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One tick at a time, never awaited here: a long apply inside a tick does not keep
        // the API (a revocation, a launch) from being served.
        let ticking = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            tokio::select! {
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => { tokio::spawn(api::handle(self.clone(), stream)); }
                    Err(e) => warn!(error = %e, "accept failed"),
                },
                _ = tick.tick() => {
                    if !ticking.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let (node, ticking) = (self.clone(), ticking.clone());
                        tokio::task::spawn_blocking(move || {
                            node.tick();
                            ticking.store(false, std::sync::atomic::Ordering::Release);
                        });
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&socket);
        let node = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let applied = node.enforcer.applied();
            node.records.sweep_kernel_counts(
                &node.datapath,
                &node.lookups(&applied),
                &node.journal,
                &node.counters,
            );
            node.records.flush(true, &node.journal);
            // A clean stop leaves the log signed to its end.
            node.journal.checkpoint(true);
            node.dns.save_now();
        })
        .await;
        info!("node stopped; enforcement stays pinned (agentwall down removes it)");
        Ok(())
    }
}

impl Sessions {
    /// Network namespaces each identity's sessions use (other than the node's own).
    pub fn namespaces(&self) -> BTreeMap<u32, Vec<Netns>> {
        self.cgroups_by_identity()
            .into_iter()
            .map(|(n, cgroups)| {
                let paths: Vec<&Path> = cgroups.iter().map(PathBuf::as_path).collect();
                (n, dns::namespaces_of(&paths))
            })
            .collect()
    }
}

impl crate::control_plane::link::NodeSide for Node {
    fn apply_bundle(&self, set: PolicySet) -> Result<(), ApplyError> {
        // Already parsed and checked by the link: applied as it is, not read back from disk.
        if set.revision == self.revision() {
            return Ok(());
        }
        self.enforcer
            .apply_or_refuse(set, &self.deps())
            .map_err(Into::into)
    }

    fn revoke_all(&self, identities: &[String]) -> Vec<String> {
        let mut failed = Vec::new();
        for id in identities {
            // Done already: revoked here, and so in the kernel (or not known to it).
            let number = self.registry.table().number(id);
            if self.registry.is_revoked(id)
                && number.is_none_or(|n| {
                    self.datapath.identity_status(n).ok().flatten() == Some(IdentityStatus::Revoked)
                })
            {
                continue;
            }
            let known = self.registry.table().number(id).is_some();
            let by = (!known).then_some("control-plane");
            if let Err(e) = self.revoke(id, by) {
                error!(identity = %id, error = %e, "fleet-wide revocation failed on this node");
                failed.push(id.clone());
            }
        }
        failed
    }

    fn take_outbox(&self) -> Vec<serde_json::Value> {
        self.journal.take_outbox()
    }

    fn sessions_by_identity(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.sessions.list().into_iter().filter(|s| !s.revoked) {
            *out.entry(s.identity).or_insert(0) += 1;
        }
        out
    }

    fn policy_in_force(&self) -> (String, Option<String>) {
        (self.revision(), self.enforcer.last_error())
    }
}

/// Raises the soft open-files limit to the hard one, so the daemon's own tables (the node's
/// tries and proxy listeners, the control plane's connection caps), not a default of 1,024,
/// are what bounds it. Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!(error = %io::Error::last_os_error(), "could not raise the open files limit");
                lim.rlim_cur = old;
            }
        }
    }
    lim.rlim_cur
}

/// Tells a service manager (systemd's `NOTIFY_SOCKET`) that the node is ready, or stopping.
/// `notify_socket` is the variable's value; a leading '@' names an abstract socket.
pub fn sd_notify(notify_socket: Option<&str>, message: &str) {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};
    let Some(target) = notify_socket.filter(|s| !s.is_empty()) else {
        return;
    };
    let addr = match target.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(target),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(message.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        warn!(error = %e, socket = target, "could not notify the service manager");
    }
}

fn chown_group(path: &Path, group: &str) -> Result<(), NodeError> {
    let gid = group_id(group)?;
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err(path))
}

/// The id of the group named `group`.
pub(crate) fn group_id(group: &str) -> Result<u32, NodeError> {
    let c = std::ffi::CString::new(group).map_err(|_| NodeError::NoGroup(group.to_owned()))?;
    // SAFETY: valid C string; getgrnam returns a pointer into static storage or null.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(NodeError::NoGroup(group.to_owned()));
    }
    // SAFETY: gr is non-null.
    Ok(unsafe { (*gr).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(identity: u32, port: u16) -> crate::datapath::sni::Refused {
        crate::datapath::sni::Refused {
            identity,
            name: String::new(),
            peer: SocketAddr::from(([203, 0, 113, 9], 443)),
            local_port: port,
            cut: true,
        }
    }

    #[test]
    fn one_identity_s_flood_leaves_room_for_the_others_connections_to_end() {
        let mut e = SniEnding::default();
        for port in 0..SNI_ENDING_MAX as u16 {
            e.admit(refused(1, port));
        }
        assert_eq!(e.queue.len(), SNI_ENDING_PER_IDENTITY);
        assert_eq!(e.dropped, (SNI_ENDING_MAX - SNI_ENDING_PER_IDENTITY) as u64);
        e.admit(refused(2, 1));
        assert_eq!(e.queue.last().map(|r| r.identity), Some(2));
        // Taken, the shares start again.
        assert_eq!(e.take().len(), SNI_ENDING_PER_IDENTITY + 1);
        e.admit(refused(1, 7));
        assert_eq!(e.queue.len(), 1);
    }
}
