//! The node daemon: datapath + policy + identities, serving the local API.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Request, Response},
    cgroup::{Cgroup, Cgroup2Mount, CgroupError},
    clock::BootInstant,
    config::{ConfigError, NodeConfig},
    datapath::{Datapath, DatapathConfig, DatapathError, EventReader, EventRecord},
    dns::{
        Answer, Learned, Observed,
        proxy::{AnswerSink, Proxy, ProxyConfig},
    },
    flows::{self, Recent},
    identity::{IdentityError, Rejection, TrustStore, VerifiedPeer},
    policy::{
        IdentityStatus, Rule,
        source::{PolicyErrors, PolicySet, load_dir},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("policy {dir}:\n{errors}")]
    Policy { dir: PathBuf, errors: PolicyErrors },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the rules of {identity}: {source}")]
    Rules {
        identity: String,
        source: DatapathError,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Catalog(#[from] crate::discovery::CatalogError),
    #[error(
        "the policy needs {total} identities ({known} known to this node, {new} new); the datapath holds at most {max}: nothing was applied",
        total = known + new
    )]
    Capacity {
        known: usize,
        new: usize,
        max: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An audit log file is rotated past this size unless `audit_log_max_bytes` says otherwise.
const AUDIT_MAX_BYTES: u64 = 64 << 20;

/// Where the node keeps the files of the last policy it applied.
fn last_good_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("policy-last-good")
}

/// Hands the allocator's free pages back to the kernel. Parsing and compiling a large policy
/// leaves tens of MiB free inside glibc's arenas, resident for the daemon's whole life unless
/// trimmed.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Identity numbers the datapath uses, stable across restarts (kept in `state_dir`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct IdentityNumbers {
    numbers: BTreeMap<String, u32>,
    /// Revoked identities stay revoked across policy reloads and restarts.
    #[serde(default)]
    revoked: std::collections::BTreeSet<String>,
}

impl IdentityNumbers {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("identities.json")
    }

    fn load(state_dir: &Path) -> Result<Self, NodeError> {
        let p = Self::path(state_dir);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| NodeError::Io {
                path: p,
                source: io::Error::other(e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), NodeError> {
        let p = Self::path(state_dir);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("serializable");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    fn get_or_assign(&mut self, id: &str) -> u32 {
        if let Some(&n) = self.numbers.get(id) {
            return n;
        }
        let n = self.numbers.values().max().map_or(1, |m| m + 1);
        self.numbers.insert(id.to_owned(), n);
        n
    }
}

/// A launched or enrolled agent.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Session {
    pub identity: String,
    pub number: u32,
    pub cgroup_id: u64,
    pub cgroup: PathBuf,
    pub pid: u32,
    pub serial: String,
    pub not_after: String,
    /// Its certificate is on a CRL: the cgroup stays bound and is denied everything.
    pub revoked: bool,
    /// The certificate's expiry was recorded (the kernel cut the session off on its own).
    #[serde(skip)]
    pub expiry_noted: bool,
}

struct State {
    datapath: Datapath,
    policy: PolicySet,
    last_policy_error: Option<String>,
    /// A valid revision that could not be applied (capacity, say); not retried until the
    /// directory changes.
    refused_revision: Option<String>,
    /// What the policy directory looked like when last read.
    policy_stamp: Option<CrlStamp>,
    numbers: IdentityNumbers,
    sessions: Vec<Session>,
    seq: u64,
    recent: Recent,
    /// When a schedule window next opens or closes; the policy is applied again then.
    rearm_at: Option<std::time::SystemTime>,
    audit: Option<crate::audit::AuditLog>,
    /// Kernel records already reported as lost.
    dropped_seen: u64,
    /// Audit records that could not be written.
    audit_failures: u64,
    /// Of those, the ones no `loss` record in the log accounts for yet.
    audit_unlogged: u64,
    counters: crate::metrics::Counters,
    /// Each identity's rules from the policy in force, before learned host rules.
    base_rules: BTreeMap<u32, Vec<Rule>>,
    learned: Learned,
    /// `learned` changed since it was last written to state_dir.
    learned_dirty: bool,
    observed: Observed,
    /// Why the DNS proxy cannot serve (some of) the identities with name rules.
    dns_error: Option<String>,
    /// Identities with name rules (their DNS is steered to the proxy).
    named: std::collections::BTreeSet<u32>,
    /// The IPv6 proxy prefix is routed to `lo` in the node's namespace.
    routed6: bool,
    /// AI services and the addresses they are known to have.
    catalog: crate::discovery::Catalog,
    /// Runs of identical flows being folded (see `Node::record`).
    aggregates: std::collections::HashMap<AggKey, Aggregate>,
    /// The latest record of each kernel rate-limit key, to report counts the kernel still
    /// held for it (identity number, record).
    templates: std::collections::HashMap<agent_common::RateKey, (u32, flows::FlowRecord)>,
    /// Records bound for the control plane, when there is one (taken by its link).
    outbox: Option<Vec<serde_json::Value>>,
    /// Records the outbox could not hold (the link stalled); reported with the next one.
    outbox_lost: u64,
}

/// Records the outbox holds at most before new ones count as lost.
const OUTBOX_MAX: usize = 1 << 20;

/// What makes two flows identical: identity, cgroup, destination, port, protocol, verdict,
/// reason.
type AggKey = (
    u32,
    u64,
    Option<std::net::IpAddr>,
    u16,
    Option<String>,
    String,
    Option<String>,
);

/// Flows folded since a run's first record was written.
struct Aggregate {
    opened: std::time::Instant,
    pending: u64,
    pending_first: Option<String>,
    last: String,
    /// The latest of them, written with the totals.
    template: flows::FlowRecord,
}

/// Open runs of identical flows kept at most; past that, every window closes early.
const MAX_AGGREGATES: usize = 65536;
/// A flow quiet for this long has its kernel-held count collected (twice the kernel's rate
/// window, so the kernel is done with it).
const KERNEL_IDLE: Duration = Duration::from_secs(2);

impl State {
    /// Appends to the audit log, if there is one. A failure is logged and counted; it never
    /// stops enforcement.
    fn audit(&mut self, kind: &str, fields: serde_json::Value) {
        let for_link = self.outbox.is_some().then(|| fields.clone());
        let audit_seq = self.log(kind, fields);
        let (Some(out), Some(fields)) = (&mut self.outbox, for_link) else {
            return;
        };
        if out.len() >= OUTBOX_MAX {
            self.outbox_lost += 1;
            return;
        }
        let now = crate::flows::rfc3339(std::time::SystemTime::now());
        if self.outbox_lost > 0 {
            out.push(serde_json::json!({ "kind": "loss", "time": now, "outbox_records_lost": self.outbox_lost }));
            self.outbox_lost = 0;
        }
        let mut r = match fields {
            serde_json::Value::Object(m) => m,
            other => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        r.insert("kind".into(), kind.into());
        r.entry("time").or_insert(now.into());
        // Ties the control plane's copy to the record in the node's tamper-evident log.
        if let Some(seq) = audit_seq {
            r.insert("audit_seq".into(), seq.into());
        }
        out.push(serde_json::Value::Object(r));
    }

    /// Appends to the audit log; the record's sequence number there, when written.
    fn log(&mut self, kind: &str, fields: serde_json::Value) -> Option<u64> {
        let log = self.audit.as_mut()?;
        // Records that could not be written earlier are a counted loss in the log itself,
        // once it takes records again.
        if self.audit_unlogged > 0
            && log
                .append(
                    "loss",
                    serde_json::json!({ "audit_records_lost": self.audit_unlogged }),
                )
                .is_ok()
        {
            self.audit_unlogged = 0;
        }
        match log.append(kind, fields) {
            Ok(seq) => Some(seq),
            Err(e) => {
                self.audit_failures += 1;
                self.audit_unlogged += 1;
                // A full disk fails every record: say so at 1, 2, 4, 8... failures, not each.
                if self.audit_failures.is_power_of_two() {
                    error!(error = %e, failures = self.audit_failures,
                        "audit records not written (counted in agentwall_audit_write_failures_total)");
                }
                None
            }
        }
    }
}

/// The trust store and the TLS configuration built on it: replaced together when CRLs change,
/// and a connection uses one pair from handshake to verdict.
struct Tls {
    trust: TrustStore,
    config: Arc<rustls::ServerConfig>,
}

impl Tls {
    fn load(cfg: &NodeConfig) -> Result<Self, NodeError> {
        let trust = TrustStore::load(cfg.trust_bundle()?, &cfg.crl, cfg.trust_domain.as_deref())?;
        let config = api::server_config(&trust)?;
        Ok(Self { trust, config })
    }
}

/// What files looked like when last read (path, modification time, length).
type CrlStamp = Vec<(PathBuf, Option<std::time::SystemTime>, u64)>;

/// The policy directory's files, with their modification times and lengths.
fn policy_stamp(dir: &Path) -> CrlStamp {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    crl_stamp(&files)
}

fn crl_stamp(crls: &[PathBuf]) -> CrlStamp {
    crls.iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            (
                p.clone(),
                m.as_ref().and_then(|m| m.modified().ok()),
                m.map_or(0, |m| m.len()),
            )
        })
        .collect()
}

pub struct Node {
    cfg: NodeConfig,
    tls: std::sync::RwLock<Arc<Tls>>,
    crls: Mutex<CrlStamp>,
    /// Cgroups the node creates live here, below the attach point.
    agents_cgroup: Cgroup,
    cgroup_mount: PathBuf,
    events: Mutex<Option<EventReader>>,
    /// None when `dns_listen_port` is 0.
    dns: Option<Proxy>,
    /// Where the node resolves the AI catalog's names.
    upstreams: Vec<std::net::SocketAddr>,
    state: Mutex<State>,
    /// Set once the control plane link runs.
    link: std::sync::OnceLock<Arc<crate::control_plane::link::LinkStats>>,
}

/// Hands the proxy's answers to the node without a reference cycle.
struct DnsSink(std::sync::Weak<Node>);

impl AnswerSink for DnsSink {
    fn answered(&self, identity: u32, answer: &Answer) {
        if let Some(node) = self.0.upgrade() {
            node.dns_answered(identity, answer);
        }
    }
}

impl Node {
    /// Starts the datapath (adopting pins), loads and applies policy. The policy must be valid
    /// to start: there is no last good revision yet.
    pub fn start(cfg: NodeConfig) -> Result<Arc<Self>, NodeError> {
        cfg.check()?;
        let tls = Tls::load(&cfg)?;
        let dir = cfg.policy_dir();
        let state_dir = cfg.state_dir();
        std::fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        if cfg.control_plane.is_some() {
            // Before the first bundle arrives the node enforces an empty policy: every bound
            // identity is denied everything.
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        // A bad policy directory never replaces a good policy: start on the last good one
        // (kept in state_dir) and say why.
        let (policy, policy_error) = match load_dir(&dir) {
            Ok(p) => (p, None),
            Err(errors) => match load_dir(&last_good_dir(&state_dir)) {
                Ok(p) => {
                    warn!(revision = %p.revision, errors = %errors,
                        "policy directory is invalid; starting on the last good revision");
                    (p, Some(errors.to_string()))
                }
                Err(_) => return Err(NodeError::Policy { dir, errors }),
            },
        };
        let attach = match &cfg.attach_cgroup {
            Some(p) => p.clone(),
            None => Cgroup2Mount::discover()?.mount_point,
        };
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
        let mut datapath = Datapath::start(&dp_cfg)?;
        datapath.set_dns_port(cfg.dns_port())?;
        let learned_path = Learned::path(&state_dir);
        let learned = Learned::load(&learned_path).unwrap_or_else(|e| {
            // Addresses not known are denied: starting empty fails closed.
            error!(error = %e, "learned DNS addresses unreadable; starting without them");
            Learned::default()
        });
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
        let agents_cgroup = Cgroup::create(attach.join("agentwall"))?;
        let cfg_audit = cfg.audit_log.clone();
        let audit_max = cfg.audit_log_max_bytes.unwrap_or(AUDIT_MAX_BYTES);
        let dns_port = cfg.dns_port();
        let dns_timeout = cfg.dns_timeout();
        let catalog = crate::discovery::Catalog::new(&cfg.ai_catalog)?;
        let catalog_upstreams = upstreams.clone();
        let cgroup_mount = Cgroup2Mount::discover()?.mount_point;
        let numbers = IdentityNumbers::load(&state_dir)?;
        let audit = match &cfg_audit {
            Some(p) => {
                Some(
                    crate::audit::AuditLog::open(p, audit_max).map_err(|e| NodeError::Io {
                        path: p.clone(),
                        source: io::Error::other(e.to_string()),
                    })?,
                )
            }
            None => None,
        };
        let node = Arc::new_cyclic(|weak| Self {
            dns: (dns_port != 0).then(|| {
                Proxy::new(
                    ProxyConfig {
                        port: dns_port,
                        upstreams,
                        timeout: dns_timeout,
                    },
                    Arc::new(DnsSink(weak.clone())),
                )
            }),
            upstreams: catalog_upstreams,
            crls: Mutex::new(crl_stamp(&cfg.crl)),
            cfg,
            tls: std::sync::RwLock::new(Arc::new(tls)),
            agents_cgroup,
            cgroup_mount,
            events: Mutex::new(events),
            state: Mutex::new(State {
                datapath,
                policy: policy.clone(),
                last_policy_error: None,
                refused_revision: None,
                policy_stamp: None,
                numbers,
                sessions: Vec::new(),
                seq: 0,
                recent: Recent::default(),
                rearm_at: None,
                audit,
                dropped_seen: 0,
                audit_failures: 0,
                audit_unlogged: 0,
                counters: Default::default(),
                base_rules: BTreeMap::new(),
                learned,
                learned_dirty: false,
                observed: Observed::new(65536),
                dns_error,
                catalog,
                named: Default::default(),
                routed6: false,
                aggregates: Default::default(),
                templates: Default::default(),
                outbox: None,
                outbox_lost: 0,
            }),
            link: std::sync::OnceLock::new(),
        });
        node.apply(policy)?;
        node.state.lock().expect("node state").last_policy_error = policy_error;
        Ok(node)
    }

    fn apply(&self, policy: PolicySet) -> Result<(), NodeError> {
        let applied = self.apply_policy(policy);
        release_free_memory();
        applied
    }

    fn apply_policy(&self, policy: PolicySet) -> Result<(), NodeError> {
        let t0 = std::time::Instant::now();
        let mut st = self.state.lock().expect("node state");
        // Refused whole before anything changes: identity numbers are kept for good, so the
        // table must hold everyone known plus everyone new.
        let new = policy
            .agents
            .iter()
            .filter(|a| !st.numbers.numbers.contains_key(&a.identity))
            .count();
        let max = agent_common::MAX_IDENTITIES as usize - 1;
        if st.numbers.numbers.len() + new > max {
            return Err(NodeError::Capacity {
                known: st.numbers.numbers.len(),
                new,
                max,
            });
        }
        let mut sets: Vec<(u32, Vec<Rule>)> = Vec::new();
        for agent in &policy.agents {
            let n = st.numbers.get_or_assign(&agent.identity);
            let status = if st.numbers.revoked.contains(&agent.identity) {
                IdentityStatus::Revoked
            } else {
                IdentityStatus::Active
            };
            st.datapath.set_identity(n, status, agent.mode)?;
            let rules: Vec<Rule> = policy
                .effective_rules(agent)
                .into_iter()
                .map(|r| r.rule)
                .collect();
            sets.push((n, rules));
        }
        // Identities known from before (this run or an earlier one) that the policy no longer
        // names keep their bindings but get no rules: deny-all, never stale rules.
        for (id, &n) in &st.numbers.numbers {
            if policy.agent(id).is_none() {
                sets.push((n, Vec::new()));
            }
        }
        st.numbers.save(&self.cfg.state_dir())?;
        let named: std::collections::BTreeSet<u32> = sets
            .iter()
            .filter(|(_, rules)| rules.iter().any(|r| !r.fqdns.is_empty()))
            .map(|(n, _)| *n)
            .collect();
        // The proxy listens before any DNS is steered to it.
        st.named = named.clone();
        self.sync_dns(&mut st);
        let keep: std::collections::BTreeSet<u32> = sets.iter().map(|(n, _)| *n).collect();
        if st
            .learned
            .retain(|n| keep.contains(&n) && named.contains(&n))
        {
            st.learned_dirty = true;
        }
        let full: Vec<(u32, Vec<Rule>)> = sets
            .iter()
            .map(|(n, r)| (*n, st.learned.host_rules(*n, r, &policy.global_deny())))
            .collect();
        let refs: Vec<(u32, &[Rule])> = full.iter().map(|(n, r)| (*n, r.as_slice())).collect();
        let entries = match st.datapath.apply(&policy.global_deny(), &refs) {
            Ok(n) => n,
            // The datapath knows identities by number; the admin knows them by SPIFFE ID.
            Err(e) => {
                let named = e.identity().and_then(|n| {
                    st.numbers
                        .numbers
                        .iter()
                        .find_map(|(id, &m)| (m == n).then(|| id.clone()))
                });
                return Err(match named {
                    Some(identity) => NodeError::Rules {
                        identity,
                        source: e,
                    },
                    None => e.into(),
                });
            }
        };
        if st.policy.revision != policy.revision {
            // Rule numbers belong to a revision: counts of the old numbering would lie.
            if let Err(e) = st.datapath.clear_rule_hits() {
                warn!(error = %e, "could not reset the rule hit counters");
            }
        }
        for &n in &keep {
            let steer = self.dns.is_some() && named.contains(&n);
            if let Err(e) = st.datapath.set_dns(n, steer) {
                error!(identity = n, error = %e, "could not set DNS steering");
            }
        }
        st.base_rules = sets.into_iter().collect();
        info!(
            revision = %policy.revision,
            identities = policy.agents.len(),
            trie_entries = entries,
            apply_ms = t0.elapsed().as_secs_f64() * 1e3,
            "policy applied"
        );
        let keep = last_good_dir(&self.cfg.state_dir());
        if let Err(e) = crate::policy::source::save_dir(&policy, &keep) {
            warn!(error = %e, dir = %keep.display(), "could not keep a copy of the applied policy");
        }
        st.rearm_at = policy.next_schedule_change(std::time::SystemTime::now());
        st.counters.policy_applies += 1;
        st.counters.last_apply_seconds = t0.elapsed().as_secs_f64();
        st.audit(
            "policy",
            serde_json::json!({ "event": "applied", "revision": policy.revision, "identities": policy.agents.len() }),
        );
        st.policy = policy;
        st.last_policy_error = None;
        Ok(())
    }

    /// Applies a valid policy; when the datapath refuses it (capacity, say), the previous
    /// revision stays, and the refusal is logged, recorded and remembered.
    fn apply_or_refuse(&self, set: PolicySet) -> Result<(), String> {
        let revision = set.revision.clone();
        let Err(e) = self.apply(set) else {
            return Ok(());
        };
        error!(error = %e, "applying policy failed; the previous revision stays");
        let mut st = self.state.lock().expect("node state");
        let in_force = st.policy.revision.clone();
        st.audit(
            "policy",
            serde_json::json!({ "event": "rejected", "revision": revision, "errors": e.to_string(), "revision_in_force": in_force }),
        );
        st.last_policy_error = Some(e.to_string());
        st.refused_revision = Some(revision);
        st.counters.policy_rejections += 1;
        Err(e.to_string())
    }

    fn revision(&self) -> String {
        self.state
            .lock()
            .expect("node state")
            .policy
            .revision
            .clone()
    }

    /// Ends launched sessions whose processes have all exited: the binding goes (nothing is
    /// left to govern) and so does the cgroup the node made. Enrolled cgroups are kept: they
    /// belong to someone else and may be repopulated.
    fn collect_sessions(&self) {
        let mut st = self.state.lock().expect("node state");
        let done: Vec<Session> = st
            .sessions
            .iter()
            .filter(|s| s.cgroup.starts_with(self.agents_cgroup.path()))
            .filter(|s| Cgroup::open(&s.cgroup).is_ok_and(|c| c.is_populated().is_ok_and(|p| !p)))
            .cloned()
            .collect();
        for s in done {
            if let Ok(cg) = Cgroup::open(&s.cgroup) {
                if let Err(e) = st.datapath.unbind(&cg) {
                    warn!(error = %e, cgroup = %s.cgroup.display(), "ending a session");
                    continue;
                }
                let _ = cg.remove_tree();
            }
            info!(identity = %s.identity, cgroup = %s.cgroup.display(), "session ended");
            st.audit(
                "identity",
                serde_json::json!({ "event": "session-ended", "identity": s.identity, "cgroup": s.cgroup, "serial": s.serial }),
            );
            st.sessions.retain(|x| x.cgroup_id != s.cgroup_id);
        }
    }

    /// Re-reads changed CRL files: new handshakes use them, and running sessions whose
    /// certificate is now listed are cut off (binding revoked, connections destroyed).
    fn reload_crls(&self) {
        let stamp = crl_stamp(&self.cfg.crl);
        {
            let mut old = self.crls.lock().expect("crl stamp");
            if *old == stamp {
                return;
            }
            *old = stamp;
        }
        match Tls::load(&self.cfg) {
            Ok(t) => *self.tls.write().expect("tls") = Arc::new(t),
            Err(e) => {
                error!(error = %e, "CRL change rejected; the previous CRLs stay in force");
                return;
            }
        }
        let serials = match crate::identity::revoked_serials(&self.cfg.crl) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "reading CRLs");
                return;
            }
        };
        let mut st = self.state.lock().expect("node state");
        let hit: Vec<Session> = st
            .sessions
            .iter()
            .filter(|s| !s.revoked && serials.contains(&s.serial))
            .cloned()
            .collect();
        for s in hit {
            if let Err(e) = st.datapath.revoke_binding(s.cgroup_id) {
                error!(error = %e, cgroup = %s.cgroup.display(), "revoking a binding failed");
                continue;
            }
            let destroyed =
                crate::sockets::destroy_tcp_in(&[s.cgroup.as_path()]).unwrap_or_else(|e| {
                    error!(error = %e, "could not destroy the session's connections");
                    0
                });
            warn!(identity = %s.identity, serial = %s.serial, cgroup = %s.cgroup.display(),
                connections_destroyed = destroyed, "certificate revoked by CRL; session cut off");
            st.audit(
                "identity",
                serde_json::json!({ "event": "revoked-by-crl", "identity": s.identity, "serial": s.serial, "cgroup": s.cgroup, "connections_destroyed": destroyed }),
            );
            if let Some(x) = st.sessions.iter_mut().find(|x| x.cgroup_id == s.cgroup_id) {
                x.revoked = true;
            }
        }
    }

    /// Re-reads the policy directory; a new valid revision is applied, an invalid one is
    /// refused and the last good one stays in force.
    /// `force`: read the policy directory even when nothing in it changed (`policy apply`).
    pub fn reload(&self, force: bool) {
        self.reload_crls();
        self.collect_sessions();
        {
            let mut st = self.state.lock().expect("node state");
            let dropped = st.datapath.dropped_events().unwrap_or(0);
            if dropped > st.dropped_seen {
                let lost = dropped - st.dropped_seen;
                st.dropped_seen = dropped;
                warn!(lost, "kernel records lost (ring buffer full)");
                st.audit(
                    "loss",
                    serde_json::json!({ "records_lost": lost, "total_lost": dropped }),
                );
            }
        }
        self.expire_learned();
        self.note_expiries();
        {
            let mut st = self.state.lock().expect("node state");
            self.sync_dns(&mut st);
        }
        self.sweep_kernel_counts();
        {
            let mut st = self.state.lock().expect("node state");
            Self::flush_aggregates(&mut st, Some(self.cfg.aggregate_window()));
        }
        // A schedule window opened or closed: the same revision, applied as of now.
        let due = {
            let st = self.state.lock().expect("node state");
            st.rearm_at
                .is_some_and(|t| std::time::SystemTime::now() >= t)
                .then(|| st.policy.clone())
        };
        if let Some(policy) = due {
            if let Err(e) = self.apply(policy) {
                error!(error = %e, "re-applying scheduled rules failed");
            }
        }
        // With a control plane, policy changes arrive as bundles, which apply themselves
        // (`force`); the tick never reads the directory while a bundle is being written to it.
        if self.cfg.control_plane.is_some() && !force {
            return;
        }
        let dir = self.cfg.policy_dir();
        // Parsed again only when a file in it changed: a large directory costs nothing while
        // it stays as it is.
        let stamp = policy_stamp(&dir);
        {
            let mut st = self.state.lock().expect("node state");
            if !force && st.policy_stamp.as_ref() == Some(&stamp) {
                return;
            }
            st.policy_stamp = Some(stamp);
        }
        let current = self.revision();
        match load_dir(&dir) {
            // The directory is back to what is in force: any earlier rejection is over.
            Ok(set) if set.revision == current => {
                let mut st = self.state.lock().expect("node state");
                st.last_policy_error = None;
                st.refused_revision = None;
            }
            // Refused once already: not tried (and logged) again every tick.
            Ok(set)
                if self
                    .state
                    .lock()
                    .expect("node state")
                    .refused_revision
                    .as_deref()
                    == Some(set.revision.as_str()) => {}
            Ok(set) => {
                let _ = self.apply_or_refuse(set);
            }
            Err(errors) => {
                let mut st = self.state.lock().expect("node state");
                let text = errors.to_string();
                if st.last_policy_error.as_deref() != Some(&text) {
                    let revision = st.policy.revision.clone();
                    st.audit(
                        "policy",
                        serde_json::json!({ "event": "rejected", "errors": text, "revision_in_force": revision }),
                    );
                    warn!(revision = %st.policy.revision, errors = %text,
                        "policy change rejected; keeping the last good revision");
                    st.counters.policy_rejections += 1;
                    st.last_policy_error = Some(text);
                }
            }
        }
    }

    /// Makes an answer's addresses enforceable for the identity that asked, when one of its
    /// rules allows the name; remembers every answer's names for decision records. Runs before
    /// the agent sees the answer.
    fn dns_answered(&self, identity: u32, a: &Answer) {
        let mut st = self.state.lock().expect("node state");
        for (ip, _) in &a.addrs {
            st.observed.insert(identity, *ip, &a.qname);
        }
        let seen: Vec<std::net::IpAddr> = a.addrs.iter().map(|(ip, _)| *ip).collect();
        let keep = self.cfg.catalog_refresh() * 2 + self.cfg.dns_grace();
        st.catalog.observe(&a.qname, &seen, keep);
        let Some(base) = st.base_rules.get(&identity).cloned() else {
            return;
        };
        let Some(rule) = base
            .iter()
            .find(|r| r.fqdns.iter().any(|p| p.matches(&a.qname)))
        else {
            return;
        };
        let rule_id = rule.id;
        if a.addrs.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now();
        let (grace, min_ttl) = (self.cfg.dns_grace(), self.cfg.dns_min_ttl());
        let deny = st.policy.global_deny();
        let id = self.name_of(&st, identity);
        let mut addrs: Vec<(std::net::IpAddr, std::time::SystemTime)> = Vec::new();
        for &(ip, ttl) in &a.addrs {
            match crate::dns::unlearnable(ip, &deny) {
                None => addrs.push((
                    ip,
                    now + Duration::from_secs(u64::from(ttl)).max(min_ttl) + grace,
                )),
                Some(why) => {
                    st.counters.dns_refused += 1;
                    warn!(identity = %id, name = %a.qname, addr = %ip, why,
                        "DNS answer names an address DNS may not open; it stays denied");
                    st.audit(
                        "dns",
                        serde_json::json!({ "event": "refused", "identity": id, "name": a.qname, "addr": ip.to_string(), "why": why }),
                    );
                }
            }
        }
        let caps = self.cfg.dns_caps();
        let out = st.learned.learn(identity, &a.qname, &addrs, caps, now);
        if !out.refused.is_empty() {
            st.counters.dns_refused += out.refused.len() as u64;
            let refused: Vec<String> = out.refused.iter().map(|(ip, _)| ip.to_string()).collect();
            let cap = out.refused[0].1;
            warn!(identity = %id, name = %a.qname, cap, refused = ?refused,
                "DNS answer over a cap: these addresses stay denied");
            st.audit(
                "dns",
                serde_json::json!({ "event": "cap", "identity": id, "name": a.qname, "cap": cap, "refused": refused }),
            );
        }
        if out.changed.is_empty() {
            return;
        }
        let rules = st
            .learned
            .host_rules_for(identity, &base, &out.changed, &deny);
        match st.datapath.update_hosts(identity, &rules, &out.changed) {
            Ok(()) => {
                st.learned_dirty = true;
                if !out.added.is_empty() {
                    st.counters.dns_learned += out.added.len() as u64;
                    let added: Vec<String> = out.added.iter().map(|ip| ip.to_string()).collect();
                    tracing::debug!(identity = %id, name = %a.qname, addrs = ?added, "learned");
                    st.audit(
                        "dns",
                        serde_json::json!({ "event": "learned", "identity": id, "name": a.qname, "addrs": added, "rule_id": rule_id }),
                    );
                }
            }
            Err(e) => {
                error!(identity = %id, name = %a.qname, error = %e,
                    "could not allow a DNS answer's addresses; they stay denied");
                st.audit(
                    "dns",
                    serde_json::json!({ "event": "install_failed", "identity": id, "name": a.qname, "error": e.to_string() }),
                );
            }
        }
    }

    /// The SPIFFE ID behind an identity number ("" when unknown).
    fn name_of(&self, st: &State, identity: u32) -> String {
        st.numbers
            .numbers
            .iter()
            .find(|&(_, &n)| n == identity)
            .map(|(id, _)| id.clone())
            .unwrap_or_default()
    }

    /// Drops learned addresses past their deadline (the kernel stopped allowing them on its
    /// own) and keeps the learned file current.
    fn expire_learned(&self) {
        let mut st = self.state.lock().expect("node state");
        let gone = st.learned.expire(std::time::SystemTime::now());
        for (identity, addrs) in gone {
            st.learned_dirty = true;
            let Some(base) = st.base_rules.get(&identity) else {
                continue;
            };
            let deny = st.policy.global_deny();
            let rules = st.learned.host_rules_for(identity, base, &addrs, &deny);
            let st = &mut *st;
            if let Err(e) = st.datapath.update_hosts(identity, &rules, &addrs) {
                warn!(identity, error = %e, "could not remove expired learned addresses (they no longer allow)");
            }
        }
        if st.learned_dirty {
            let path = Learned::path(&self.cfg.state_dir());
            match st.learned.save(&path) {
                Ok(()) => st.learned_dirty = false,
                Err(e) => warn!(error = %e, "could not save learned DNS addresses"),
            }
        }
    }

    /// The identity's number, if it may be bound now (it has a policy and is not revoked).
    fn admissible(st: &mut State, id: &str) -> Result<u32, String> {
        if st.policy.agent(id).is_none() {
            return Err(format!("no AgentPolicy for identity {id}"));
        }
        if st.numbers.revoked.contains(id) {
            return Err(format!("identity {id} is revoked"));
        }
        Ok(st.numbers.get_or_assign(id))
    }

    /// Binds `cg` to the peer's identity until its certificate expires and records the session.
    fn bind_session(
        st: &mut State,
        event: &str,
        peer: &VerifiedPeer,
        number: u32,
        cg: &Cgroup,
        pid: u32,
    ) -> Result<(), String> {
        let deadline = BootInstant::from_system_time(peer.not_after);
        st.datapath
            .bind(cg, number, Some(deadline))
            .map_err(|e| format!("binding {}: {e}", cg.path().display()))?;
        let not_after = flows::rfc3339(peer.not_after);
        info!(identity = %peer.id, cgroup_id = cg.id(), pid, serial = %peer.serial, %not_after, event, "cgroup bound");
        st.audit(
            "identity",
            serde_json::json!({
                "event": event, "identity": peer.id.to_string(), "serial": peer.serial,
                "cgroup": cg.path(), "pid": pid, "not_after": not_after,
            }),
        );
        st.sessions.retain(|s| s.cgroup_id != cg.id());
        st.sessions.push(Session {
            identity: peer.id.to_string(),
            number,
            cgroup_id: cg.id(),
            cgroup: cg.path().to_owned(),
            pid,
            serial: peer.serial.clone(),
            not_after,
            revoked: false,
            expiry_noted: false,
        });
        Ok(())
    }

    /// Has the proxy listen for every identity with name rules, in the node's network
    /// namespace and in each namespace its sessions' processes use (containers), and nowhere
    /// else.
    fn sync_dns(&self, st: &mut State) {
        let Some(proxy) = &self.dns else {
            if !st.named.is_empty() {
                warn!(
                    identities = st.named.len(),
                    "name rules allow nothing while the DNS proxy is off (dns_listen_port = 0)"
                );
            }
            return;
        };
        use std::os::unix::fs::MetadataExt as _;
        let inode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino());
        let own = inode(Path::new("/proc/self/ns/net"));
        let mut want: BTreeMap<u32, Vec<crate::dns::proxy::Netns>> =
            st.named.iter().map(|n| (*n, Vec::new())).collect();
        for s in &st.sessions {
            let Some(list) = want.get_mut(&s.number) else {
                continue;
            };
            let procs = std::fs::read_to_string(s.cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Some(ino) = inode(&path) {
                    if Some(ino) != own && !list.iter().any(|n| n.inode == ino) {
                        list.push(crate::dns::proxy::Netns { inode: ino, path });
                    }
                }
            }
        }
        if !want.is_empty() && !st.routed6 {
            // Routed once, when some identity first needs it.
            match crate::dns::route::ensure_local_route() {
                Ok(()) => st.routed6 = true,
                Err(e) => warn!(error = %e, prefix = %crate::dns::route::proxy_net6(),
                    "cannot route the IPv6 DNS proxy prefix; lookups through IPv6 resolvers fail (closed)"),
            }
        }
        let failed = proxy.sync(&want);
        let error = (!failed.is_empty()).then(|| {
            failed
                .iter()
                .map(|(n, place, e)| {
                    format!(
                        "identity {n}: DNS proxy cannot listen on {} in {place}: {e}",
                        crate::dns::proxy::proxy_addr(*n, proxy.port())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        if error.is_some() && error != st.dns_error {
            error!(error = %error.as_deref().unwrap_or_default(),
                "names of these identities stay unresolvable there (closed, not open)");
        }
        st.dns_error = error;
    }

    /// Records each session whose certificate has expired, once: the kernel already denies
    /// it everything at the deadline, with or without the node.
    fn note_expiries(&self) {
        let mut st = self.state.lock().expect("node state");
        let now = time::OffsetDateTime::now_utc();
        let mut expired = Vec::new();
        for s in st.sessions.iter_mut().filter(|s| !s.expiry_noted) {
            let at = time::OffsetDateTime::parse(
                &s.not_after,
                &time::format_description::well_known::Rfc3339,
            );
            if at.is_ok_and(|t| t <= now) {
                s.expiry_noted = true;
                expired.push(s.clone());
            }
        }
        for s in expired {
            warn!(identity = %s.identity, cgroup = %s.cgroup.display(), "certificate expired; the session is denied everything");
            st.audit(
                "identity",
                serde_json::json!({ "event": "expired", "identity": s.identity, "cgroup": s.cgroup, "serial": s.serial, "not_after": s.not_after }),
            );
        }
    }

    fn launch(&self, peer: VerifiedPeer, pidfd: std::os::fd::OwnedFd) -> Response {
        let id = peer.id.to_string();
        let reject = |why: String| {
            warn!(identity = %id, reason = %why, "launch rejected");
            Response::error(Some(id.clone()), why)
        };
        let mut st = self.state.lock().expect("node state");
        let number = match Self::admissible(&mut st, &id) {
            Ok(n) => n,
            Err(why) => return reject(why),
        };
        let pid = match api::pidfd_pid(&pidfd) {
            Ok(p) => p,
            Err(e) => return reject(format!("the launching process is gone: {e}")),
        };
        st.seq += 1;
        let name = format!(
            "{}-{}-{}",
            id.trim_start_matches("spiffe://").replace('/', "_"),
            pid,
            st.seq
        );
        let cg = match self.agents_cgroup.child(&name) {
            Ok(c) => c,
            Err(e) => return reject(format!("creating the agent's cgroup: {e}")),
        };
        if let Err(why) = Self::bind_session(&mut st, "launched", &peer, number, &cg, pid) {
            let _ = cg.remove_tree();
            return reject(why);
        }
        // The pid came from the pidfd; if the process is still alive after the move, the pid
        // we wrote was the launcher's and not a reused one.
        if let Err(e) = cg.add_process(pid) {
            return reject(format!(
                "moving pid {pid} into {}: {e}",
                cg.path().display()
            ));
        }
        if !api::pidfd_alive(&pidfd) {
            return reject("the launching process exited during placement".into());
        }
        // Before the agent's first lookup: a proxy in its network namespace.
        self.sync_dns(&mut st);
        Response {
            ok: true,
            identity: Some(id),
            cgroup: Some(cg.path().to_owned()),
            ..Response::default()
        }
    }

    fn enroll(&self, peer: VerifiedPeer, path: &Path) -> Response {
        let id = peer.id.to_string();
        let reject = |why: String| {
            warn!(identity = %id, reason = %why, "enroll rejected");
            Response::error(Some(id.clone()), why)
        };
        let cg = match Cgroup::open(path) {
            Ok(c) => c,
            Err(e) => return reject(e.to_string()),
        };
        let attach = self.agents_cgroup.path().parent().unwrap_or(Path::new("/"));
        if !cg.path().starts_with(attach) || cg.path() == attach {
            return reject(format!(
                "{} is not below the attach cgroup {}; the datapath would not see it",
                cg.path().display(),
                attach.display()
            ));
        }
        let mut st = self.state.lock().expect("node state");
        let number = match Self::admissible(&mut st, &id) {
            Ok(n) => n,
            Err(why) => return reject(why),
        };
        if let Err(why) = Self::bind_session(&mut st, "enrolled", &peer, number, &cg, 0) {
            return reject(why);
        }
        self.sync_dns(&mut st);
        Response {
            ok: true,
            identity: Some(id),
            cgroup: Some(cg.path().to_owned()),
            ..Response::default()
        }
    }

    fn renew(&self, peer: VerifiedPeer, pidfd: std::os::fd::OwnedFd) -> Response {
        let id = peer.id.to_string();
        let reject = |why: String| {
            warn!(identity = %id, reason = %why, "renew rejected");
            Response::error(Some(id.clone()), why)
        };
        let cgroup = api::pidfd_pid(&pidfd).ok().and_then(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
            Some(self.cgroup_mount.join(rel.trim_start_matches('/')))
        });
        let Some(cgroup) = cgroup else {
            return reject("cannot find the calling process's cgroup".into());
        };
        let mut st = self.state.lock().expect("node state");
        // The caller's own cgroup or the nearest bound one above it.
        let Some(session) = st
            .sessions
            .iter()
            .filter(|s| cgroup.starts_with(&s.cgroup))
            .max_by_key(|s| s.cgroup.components().count())
            .cloned()
        else {
            return reject(format!(
                "{} is not bound by this node; run renew from inside the agent",
                cgroup.display()
            ));
        };
        if session.identity != id {
            return reject(format!(
                "this cgroup belongs to {}, not to {id}",
                session.identity
            ));
        }
        if let Err(why) = Self::admissible(&mut st, &id) {
            return reject(why);
        }
        let cg = match Cgroup::open(&session.cgroup) {
            Ok(c) => c,
            Err(e) => return reject(e.to_string()),
        };
        if let Err(why) =
            Self::bind_session(&mut st, "renewed", &peer, session.number, &cg, session.pid)
        {
            return reject(why);
        }
        Response {
            ok: true,
            identity: Some(id),
            cgroup: Some(session.cgroup),
            ..Response::default()
        }
    }

    /// Denies the identity everything at once and keeps it revoked (across reloads too).
    fn revoke(&self, id: &str) -> Response {
        let mut st = self.state.lock().expect("node state");
        let Some(&number) = st.numbers.numbers.get(id) else {
            return Response::error(Some(id.to_owned()), format!("unknown identity {id}"));
        };
        let mode = st
            .policy
            .agent(id)
            .map_or(crate::policy::Mode::Enforce, |a| a.mode);
        if let Err(e) = st
            .datapath
            .set_identity(number, IdentityStatus::Revoked, mode)
        {
            return Response::error(Some(id.to_owned()), e.to_string());
        }
        st.numbers.revoked.insert(id.to_owned());
        if let Err(e) = st.numbers.save(&self.cfg.state_dir()) {
            error!(error = %e, identity = id, "revocation is in force but could not be saved");
        }
        // New connections already fail; end the established ones too.
        let cgroups: Vec<&Path> = st
            .sessions
            .iter()
            .filter(|s| s.identity == id)
            .map(|s| s.cgroup.as_path())
            .collect();
        let destroyed = match crate::sockets::destroy_tcp_in(&cgroups) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, identity = id, "could not destroy the identity's connections");
                0
            }
        };
        warn!(
            identity = id,
            connections_destroyed = destroyed,
            "identity revoked"
        );
        st.audit(
            "identity",
            serde_json::json!({ "event": "revoked", "identity": id, "connections_destroyed": destroyed }),
        );
        Response {
            ok: true,
            identity: Some(id.to_owned()),
            ..Response::default()
        }
    }

    fn status(&self) -> serde_json::Value {
        let st = self.state.lock().expect("node state");
        let identities: Vec<serde_json::Value> = st
            .policy
            .agents
            .iter()
            .map(|a| {
                let sessions: Vec<&Session> =
                    st.sessions.iter().filter(|s| s.identity == a.identity).collect();
                serde_json::json!({
                    "identity": a.identity,
                    "policy": a.name,
                    "number": st.numbers.numbers.get(&a.identity),
                    "mode": match a.mode { crate::policy::Mode::Enforce => "enforce", crate::policy::Mode::Audit => "audit" },
                    "rules": st.policy.effective_rules(a).len(),
                    "sessions": sessions,
                })
            })
            .collect();
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        serde_json::json!({
            "node": node,
            "version": env!("CARGO_PKG_VERSION"),
            "revoked": st.numbers.revoked,
            "revision": st.policy.revision,
            "policy_error": st.last_policy_error,
            "identities": identities,
            "dropped_events": st.datapath.dropped_events().ok(),
            "map_fill": st.datapath.fill().ok(),
            "pins": st.datapath.pin_dir(),
            "catalog": { "addresses": st.catalog.known_addresses() },
            "dns": {
                "port": self.dns.as_ref().map(Proxy::port),
                "learned_addresses": st.learned.len(),
                "error": st.dns_error,
            },
            "control_plane": self.link.get().map(|l| {
                use std::sync::atomic::Ordering::Relaxed;
                serde_json::json!({
                    "url": self.cfg.control_plane.as_ref().and_then(|c| c.url.clone()),
                    "connected": l.connected.load(Relaxed),
                    "applied_version": l.applied_version.load(Relaxed),
                    "spool_records": l.spool_records.load(Relaxed),
                    "spool_bytes": l.spool_bytes.load(Relaxed),
                    "records_lost": l.lost.load(Relaxed),
                })
            }),
        })
    }

    async fn handle(self: Arc<Self>, stream: UnixStream) {
        let pidfd = api::peer_pidfd(&stream);
        let uid = api::peer_uid(&stream).ok();
        let tls_state = self.tls.read().expect("tls").clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_state.config.clone());
        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                warn!(error = %e, "API handshake failed");
                return;
            }
            Err(_) => {
                warn!("API handshake timed out");
                return;
            }
        };
        let peer = tls_state.trust.verify(tls.get_ref().1.peer_certificates());
        let (read, mut write) = tokio::io::split(tls);
        let mut line = String::new();
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 64 * 1024));
        let reply = match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
        {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(Request::Launch) => match (peer, pidfd) {
                    (Ok(peer), Ok(pidfd)) => self.launch(peer, pidfd),
                    (Err(r), _) => rejection(&r),
                    (_, Err(e)) => {
                        Response::error(None, format!("cannot identify the calling process: {e}"))
                    }
                },
                Ok(Request::Enroll { cgroup }) => match peer {
                    Ok(_) if uid != Some(0) => Response::error(None, "enroll is for root only"),
                    Ok(peer) => self.enroll(peer, &cgroup),
                    Err(r) => rejection(&r),
                },
                Ok(Request::Renew) => match (peer, pidfd) {
                    (Ok(peer), Ok(pidfd)) => self.renew(peer, pidfd),
                    (Err(r), _) => rejection(&r),
                    (_, Err(e)) => {
                        Response::error(None, format!("cannot identify the calling process: {e}"))
                    }
                },
                Ok(Request::Revoke { identity }) if uid == Some(0) => self.revoke(&identity),
                Ok(Request::Revoke { .. }) => Response::error(None, "revoke is for root only"),
                Ok(Request::Reload) if uid == Some(0) => {
                    let node = self.clone();
                    let _ = tokio::task::spawn_blocking(move || node.reload(true)).await;
                    let st = self.state.lock().expect("node state");
                    Response {
                        ok: st.last_policy_error.is_none(),
                        error: st.last_policy_error.clone(),
                        status: Some(serde_json::json!({ "revision": st.policy.revision })),
                        ..Response::default()
                    }
                }
                Ok(Request::Reload) => Response::error(None, "policy apply is for root only"),
                Ok(Request::Status) if uid == Some(0) => Response {
                    ok: true,
                    status: Some(self.status()),
                    ..Response::default()
                },
                Ok(Request::Status) => Response::error(None, "status is for root only"),
                Ok(Request::Flows { after, verdict }) if uid == Some(0) => Response {
                    ok: true,
                    flows: Some(
                        self.state
                            .lock()
                            .expect("node state")
                            .recent
                            .since(after, verdict.as_deref()),
                    ),
                    ..Response::default()
                },
                Ok(Request::Flows { .. }) => Response::error(None, "flows are for root only"),
                Err(e) => Response::error(None, format!("bad request {:?}: {e}", line.trim())),
            },
            _ => Response::error(None, "no request received"),
        };
        if !reply.ok {
            if let Ok(req @ (Request::Launch | Request::Enroll { .. } | Request::Renew)) =
                serde_json::from_str::<Request>(&line)
            {
                let op = match req {
                    Request::Launch => "launch",
                    Request::Enroll { .. } => "enroll",
                    _ => "renew",
                };
                let mut st = self.state.lock().expect("node state");
                st.counters.session_rejections += 1;
                st.audit(
                    "identity",
                    serde_json::json!({ "event": "rejected", "op": op, "identity": reply.identity, "reason": reply.error }),
                );
            }
        }
        let mut out = serde_json::to_string(&reply).expect("responses serialize");
        out.push('\n');
        let _ = write.write_all(out.as_bytes()).await;
        let _ = write.shutdown().await;
    }

    /// Enriches a kernel record: identity name and certificate serial, process, cgroup path,
    /// systemd unit or container, name asked for, rule, revision.
    fn enrich(&self, st: &State, e: &EventRecord) -> flows::FlowRecord {
        let mut r = flows::base(e, &st.policy.revision);
        if e.identity != 0 {
            r.identity = Some(self.name_of(st, e.identity)).filter(|n| !n.is_empty());
        }
        if let Some(dest) = r.dest {
            r.fqdn = st.observed.get(e.identity, dest).map(str::to_owned);
            r.service = st.catalog.service_of_addr(dest).map(|(s, _)| s.to_owned());
        }
        r.cgroup = st
            .sessions
            .iter()
            .find(|s| s.cgroup_id == e.cgroup_id)
            .map(|s| s.cgroup.display().to_string())
            .or_else(|| {
                let text = std::fs::read_to_string(format!("/proc/{}/cgroup", e.pid)).ok()?;
                let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
                Some(
                    self.cgroup_mount
                        .join(rel.trim_start_matches('/'))
                        .display()
                        .to_string(),
                )
            });
        if let Some(cg) = &r.cgroup {
            (r.unit, r.container) = flows::unit_and_container(cg);
            // The session whose cgroup governs this one: the deepest that contains it.
            r.serial = st
                .sessions
                .iter()
                .filter(|s| Path::new(cg).starts_with(&s.cgroup))
                .max_by_key(|s| s.cgroup.components().count())
                .map(|s| s.serial.clone());
        }
        if e.rule_id > 0 {
            if let Some(agent) = r.identity.as_deref().and_then(|id| st.policy.agent(id)) {
                r.rule = st
                    .policy
                    .effective_rules(agent)
                    .get(e.rule_id as usize - 1)
                    .map(|x| x.source.place());
            }
        }
        r
    }

    /// Records a kernel event. The first of a run of identical flows is written at once; the
    /// rest are counted and written as one record (count, first and last seen) when the
    /// `aggregate_window` that the first opened closes, so a connect storm yields a bounded
    /// number of records and loses no count.
    fn record(&self, e: &EventRecord) {
        let mut st = self.state.lock().expect("node state");
        let r = self.enrich(&st, e);
        if st.templates.len() >= MAX_AGGREGATES {
            st.templates.clear();
        }
        st.templates.insert(e.rate_key, (e.identity, r.clone()));
        self.fold(&mut st, e.identity, r);
    }

    /// Counts held in the kernel for flows that went quiet are taken and recorded like any
    /// other (the kernel would only report them with the next identical flow).
    fn sweep_kernel_counts(&self) {
        let mut st = self.state.lock().expect("node state");
        let drained = match st.datapath.drain_idle_counts(KERNEL_IDLE) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "could not collect the kernel's folded counts");
                return;
            }
        };
        for (k, n, first, seen) in drained {
            let (identity, mut r) = match st.templates.get(&k) {
                Some(t) => t.clone(),
                None => {
                    // From before this node started: what the key alone says.
                    let raw = agent_common::Event {
                        ts_ns: seen.0,
                        cgroup_id: k.cgroup_id,
                        addr: k.addr,
                        port: k.port,
                        kind: k.kind,
                        reason: k.reason,
                        proto: k.proto,
                        hook: agent_common::HOOK_CONNECT4,
                        ..Default::default()
                    };
                    match EventRecord::from_raw(&raw) {
                        Ok(e) => (0, self.enrich(&st, &e)),
                        Err(_) => continue,
                    }
                }
            };
            r.count = n;
            r.first_seen = Some(flows::rfc3339(flows::wall_time(if first.0 == 0 {
                seen
            } else {
                first
            })));
            r.last_seen = Some(flows::rfc3339(flows::wall_time(seen)));
            r.time = r.last_seen.clone().unwrap_or(r.time);
            self.fold(&mut st, identity, r);
        }
    }

    /// Counts a record and writes it, or folds it into its open run.
    fn fold(&self, st: &mut State, identity: u32, r: flows::FlowRecord) {
        *st.counters
            .decisions
            .entry((r.identity.clone().unwrap_or_default(), r.verdict.clone()))
            .or_default() += r.count;
        if self.cfg.aggregate_window().is_zero() {
            Self::emit(st, r);
            return;
        }
        let key: AggKey = (
            identity,
            r.cgroup_id,
            r.dest,
            r.port,
            r.protocol.clone(),
            r.verdict.clone(),
            r.reason.clone(),
        );
        if let Some(a) = st.aggregates.get_mut(&key) {
            a.pending += r.count;
            a.pending_first
                .get_or_insert_with(|| r.first_seen.clone().unwrap_or_else(|| r.time.clone()));
            a.last = r.last_seen.clone().unwrap_or_else(|| r.time.clone());
            a.template = r;
            return;
        }
        if st.aggregates.len() >= MAX_AGGREGATES {
            // Bounded memory: close every window early rather than lose counts.
            Self::flush_aggregates(st, None);
        }
        st.aggregates.insert(
            key,
            Aggregate {
                opened: std::time::Instant::now(),
                pending: 0,
                pending_first: None,
                last: r.time.clone(),
                template: r.clone(),
            },
        );
        Self::emit(st, r);
    }

    fn emit(st: &mut State, mut r: flows::FlowRecord) {
        r.seq = st.recent.next_seq();
        tracing::debug!(record = %r, "decision");
        st.audit("decision", serde_json::to_value(&r).unwrap_or_default());
        st.recent.push(r);
    }

    /// Writes the folded flows of windows open longer than `window` (all, with `None`).
    fn flush_aggregates(st: &mut State, window: Option<Duration>) {
        let due: Vec<AggKey> = st
            .aggregates
            .iter()
            .filter(|(_, a)| window.is_none_or(|w| a.opened.elapsed() >= w))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let Some(a) = st.aggregates.remove(&k) else {
                continue;
            };
            if a.pending == 0 {
                continue;
            }
            let mut r = a.template;
            r.count = a.pending;
            r.first_seen = a.pending_first.or(r.first_seen);
            r.last_seen = Some(a.last);
            r.time = r.last_seen.clone().unwrap_or(r.time);
            Self::emit(st, r);
        }
    }

    /// Reads the kernel's decision records as they arrive.
    async fn read_events(self: Arc<Self>) {
        let Some(reader) = self.events.lock().expect("events").take() else {
            return;
        };
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
            for e in guard.get_inner_mut().drain() {
                self.record(&e);
            }
            guard.clear_ready();
        }
    }

    /// Resolves the AI catalog's names now and every `catalog_refresh_secs`, so unknown flows
    /// to them are tagged with their service.
    async fn refresh_catalog(self: Arc<Self>) {
        let every = self.cfg.catalog_refresh();
        loop {
            let names = self.state.lock().expect("node state").catalog.exact_names();
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
                let mut st = self.state.lock().expect("node state");
                for (name, addrs) in &found {
                    st.catalog
                        .observe(name, addrs, every * 2 + Duration::from_secs(60));
                }
                tracing::debug!(
                    addresses = st.catalog.known_addresses(),
                    "AI catalog resolved"
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Each rule's kernel hit count: (identity, rule id, file:line egress[i], count).
    fn rule_hits(&self, st: &State) -> Vec<(String, u32, String, u64)> {
        let Ok(hits) = st.datapath.rule_hits() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for agent in &st.policy.agents {
            let Some(&n) = st.numbers.numbers.get(&agent.identity) else {
                continue;
            };
            for r in st.policy.effective_rules(agent) {
                let count = hits.get(&(n, r.rule.id)).copied().unwrap_or(0);
                out.push((agent.identity.clone(), r.rule.id, r.source.place(), count));
            }
        }
        out
    }

    /// The metrics page, read now.
    pub fn metrics(&self) -> String {
        let st = self.state.lock().expect("node state");
        let fill = st.datapath.fill().ok();
        let revoked = st.numbers.revoked.len();
        let g = crate::metrics::Gauges {
            dropped_events: st.datapath.dropped_events().unwrap_or(0),
            bindings: fill.map_or(0, |f| f.bindings),
            bindings_max: fill.map_or(0, |f| f.bindings_max),
            identities_active: st.numbers.numbers.len().saturating_sub(revoked),
            identities_revoked: revoked,
            identities_max: fill.map_or(0, |f| f.identities_max),
            sessions: st.sessions.len(),
            audit_write_failures: st.audit_failures,
            dns: self.dns.as_ref().map(Proxy::stats),
            dns_learned_addresses: st.learned.len(),
            rule_hits: self.rule_hits(&st),
            control_plane: self.link.get().cloned(),
        };
        crate::metrics::render(&st.counters, &g)
    }

    /// Answers `GET /metrics` on `metrics_listen`; anything else gets 404.
    async fn serve_metrics(self: Arc<Self>, listener: tokio::net::TcpListener) {
        use tokio::io::AsyncReadExt as _;
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let node = self.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while got < buf.len() {
                    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[got..]))
                        .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => got += n,
                    }
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..got]);
                let (status, body) = if head.starts_with("GET /metrics ") {
                    ("200 OK", node.metrics())
                } else {
                    ("404 Not Found", "not found: try GET /metrics\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
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
            let link = crate::control_plane::link::Link::new(cp, &self.cfg.state_dir())
                .map_err(|e| io_err(Path::new("control_plane"))(io::Error::other(e.to_string())))?;
            let _ = self.link.set(link.stats.clone());
            self.state.lock().expect("node state").outbox = Some(Vec::new());
            link.spawn(self.clone());
        }
        let revision = self.revision();
        tokio::spawn(self.clone().read_events());
        if !self.cfg.catalog_refresh().is_zero() {
            tokio::spawn(self.clone().refresh_catalog());
        }
        if let Some(addr) = self.cfg.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err(Path::new(&addr.to_string())))?;
            tokio::spawn(self.clone().serve_metrics(listener));
        }
        ready(&socket, &revision);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err(Path::new("SIGTERM")))?;
        let mut reload = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => { tokio::spawn(self.clone().handle(stream)); }
                    Err(e) => warn!(error = %e, "accept failed"),
                },
                _ = reload.tick() => {
                    let node = self.clone();
                    let _ = tokio::task::spawn_blocking(move || node.reload(false)).await;
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        let _ = std::fs::remove_file(&socket);
        self.sweep_kernel_counts();
        Self::flush_aggregates(&mut self.state.lock().expect("node state"), None);
        info!("node stopped; enforcement stays pinned (agentwall down removes it)");
        Ok(())
    }
}

impl crate::control_plane::link::Enforcer for Node {
    fn apply_bundle(&self, set: PolicySet) -> Result<(), String> {
        // Already parsed and checked by the link: applied as it is, not read back from disk.
        if set.revision == self.revision() {
            return Ok(());
        }
        self.apply_or_refuse(set)
    }

    fn revoke_all(&self, identities: &[String]) {
        for id in identities {
            let (known, done) = {
                let st = self.state.lock().expect("node state");
                (
                    st.numbers.numbers.contains_key(id),
                    st.numbers.revoked.contains(id),
                )
            };
            if done {
                continue;
            }
            if known {
                let r = self.revoke(id);
                if !r.ok {
                    error!(identity = %id, error = ?r.error, "fleet-wide revocation failed on this node");
                }
                continue;
            }
            // Not seen here yet: it stays revoked should it ever be.
            let mut st = self.state.lock().expect("node state");
            st.numbers.revoked.insert(id.clone());
            if let Err(e) = st.numbers.save(&self.cfg.state_dir()) {
                error!(error = %e, identity = %id, "revocation could not be saved");
            }
            warn!(identity = %id, "identity revoked fleet-wide (no session here)");
            st.audit(
                "identity",
                serde_json::json!({ "event": "revoked", "identity": id, "connections_destroyed": 0, "by": "control-plane" }),
            );
        }
    }

    fn take_outbox(&self) -> Vec<serde_json::Value> {
        let mut st = self.state.lock().expect("node state");
        st.outbox.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

fn rejection(r: &Rejection) -> Response {
    warn!(reason = %r, "launch rejected");
    Response::error(None, r.to_string())
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
    let c = std::ffi::CString::new(group).map_err(|e| NodeError::Io {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    // SAFETY: valid C string; getgrnam returns a pointer into static storage or null.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(NodeError::Io {
            path: path.to_owned(),
            source: io::Error::other(format!("socket_group {group:?} does not exist")),
        });
    }
    // SAFETY: gr is non-null.
    let gid = unsafe { (*gr).gr_gid };
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err(path))
}
