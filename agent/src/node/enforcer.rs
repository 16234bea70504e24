//! The policy enforcer: owns the policy in force. Applies a new one to the datapath as one
//! change (refused whole when anything about it fails), keeps the last good copy in
//! `state_dir`, remembers a refusal so it is not retried every tick, re-applies when a
//! schedule window opens or closes, and publishes the applied policy as an immutable
//! [`Applied`] snapshot that everyone else reads without waiting on an apply.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use ipnet::IpNet;
use tracing::{error, info, warn};

use super::{
    Counters, Snapshot,
    dns::DnsLearning,
    journal::{AuditEvent, Journal, PolicyEvent},
    registry::{IdentityTable, Registry, RegistryError},
    sessions::Sessions,
};
use crate::{
    datapath::{Datapath, DatapathError, IdentityConfig, IdentityRules},
    files::{Stamp, Writes},
    policy::{
        Rule,
        source::{PolicyErrors, PolicySet, load_dir},
    },
};

impl EnforcerError {
    /// The kernel took part of the change before it failed.
    pub fn changed_kernel(&self) -> bool {
        match self {
            Self::Rules { source, .. } | Self::Datapath(source) => source.changed_kernel(),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("policy {dir}:\n{errors}")]
    Policy { dir: PathBuf, errors: PolicyErrors },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the rules of {identity}: {source}")]
    Rules {
        identity: String,
        source: DatapathError,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The note of identities whose sessions' io_uring use is to be read could not be kept:
    /// nothing was changed, or a crash after the kernel write would leave them unread.
    #[error("{0}")]
    RingsNote(super::sessions::SessionError),
}

/// The policy in force, as applied: read by enrichment, DNS learning, admission and the
/// views, replaced whole by each apply.
#[derive(Debug, Default)]
pub struct Applied {
    /// Without its source texts (kept on disk as the last good copy instead).
    pub policy: Arc<PolicySet>,
    /// Every identity this node has numbered, in the policy or not.
    pub identities: Arc<IdentityTable>,
    /// Identities with name rules.
    pub named: BTreeSet<u32>,
    /// What each policy identity may resolve through the proxy, by number.
    pub names: HashMap<u32, Arc<NameAccess>>,
    pub global_deny: Vec<IpNet>,
}

/// An identity's DNS policy and mode, as the proxy's queries are judged.
#[derive(Debug)]
pub struct NameAccess {
    pub policy: crate::policy::names::NamePolicy,
    /// Audit mode: a query that would be refused is forwarded and recorded.
    pub audit: bool,
}

impl Applied {
    pub fn revision(&self) -> &str {
        &self.policy.revision
    }

    /// Who answers for an identity and its labels, as its AgentPolicy says.
    pub fn owner_of(
        &self,
        identity: &str,
    ) -> (
        Option<crate::policy::owner::Owner>,
        crate::policy::owner::Labels,
    ) {
        self.policy
            .agent(identity)
            .map(|a| (a.owner.clone(), a.labels.clone()))
            .unwrap_or_default()
    }

    /// "file:line egress[i]" of an identity's rule `rule_id`.
    pub fn rule_place(&self, identity: &str, rule_id: u32) -> Option<String> {
        let agent = self.policy.agent(identity)?;
        self.policy.rule_source(agent, rule_id).map(|s| s.place())
    }
}

/// What an apply needs of the other owners.
pub struct Deps<'a> {
    pub registry: &'a Registry,
    pub dns: &'a DnsLearning,
    pub journal: &'a Journal,
    pub counters: &'a Counters,
    /// Where each identity's sessions run (the DNS proxy listens there).
    pub sessions: &'a Sessions,
}

/// What the node starts on.
pub struct Initial {
    policy: PolicySet,
    /// Why the policy directory was not used (the last good copy was).
    error: Option<String>,
    stamp: Stamp,
}

struct State {
    /// A valid revision that could not be applied (capacity, say); not retried until the
    /// directory changes.
    refused: Option<String>,
    /// What the policy directory looked like when last read.
    stamp: Option<Stamp>,
    /// A changed directory as first seen: read once it is still so a tick later.
    settling: Option<Stamp>,
    /// Files of the directory a process is still writing.
    writes: Writes,
    /// What was said about them last (said again only when it changes).
    waited_for: Vec<std::ffi::OsString>,
    /// When a schedule window next opens or closes; the policy is applied again then.
    rearm_at: Option<SystemTime>,
}

pub struct Enforcer {
    datapath: Arc<Datapath>,
    applied: Snapshot<Applied>,
    /// Held through an apply: one change at a time.
    state: Mutex<State>,
    /// Why the last change was refused (shown by `status`); its own lock so reading it never
    /// waits on an apply.
    last_error: Mutex<Option<String>>,
    /// Policy files a process is still writing, which hold back the next read (`status`).
    being_written: Mutex<Vec<String>>,
    policy_dir: PathBuf,
    last_good: PathBuf,
    /// Policy arrives as bundles the link applies; the tick never reads the directory.
    from_control_plane: bool,
    /// The DNS proxy runs, so identities with name rules are steered to it.
    dns_on: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hands the allocator's free pages back to the kernel. Parsing and compiling a large policy
/// leaves tens of MiB free inside glibc's arenas, resident for the daemon's whole life unless
/// trimmed.
fn release_free_memory() {
    let t0 = std::time::Instant::now();
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::debug!(
        trim_ms = t0.elapsed().as_secs_f64() * 1e3,
        "free memory handed back"
    );
}

impl Enforcer {
    /// The policy to start on: the directory's, or when it is invalid, the last good copy
    /// (with the reason it was not the directory's). The directory is read once: the first
    /// tick does not parse it again unless it changed.
    pub fn initial_policy(policy_dir: &Path, state_dir: &Path) -> Result<Initial, EnforcerError> {
        let stamp = Stamp::of_dir(policy_dir);
        let t0 = std::time::Instant::now();
        let (policy, error) = Self::load_initial(policy_dir, state_dir)?;
        info!(
            revision = %policy.revision,
            identities = policy.agents.len(),
            read_ms = t0.elapsed().as_secs_f64() * 1e3,
            "policy read"
        );
        Ok(Initial {
            policy,
            error,
            stamp,
        })
    }

    fn load_initial(
        policy_dir: &Path,
        state_dir: &Path,
    ) -> Result<(PolicySet, Option<String>), EnforcerError> {
        match load_dir(policy_dir) {
            Ok(p) => Ok((p, None)),
            Err(errors) => match load_dir(&last_good_dir(state_dir)) {
                Ok(p) => {
                    warn!(revision = %p.revision, errors = %errors,
                        "policy directory is invalid; starting on the last good revision");
                    Ok((p, Some(errors.to_string())))
                }
                Err(_) => Err(EnforcerError::Policy {
                    dir: policy_dir.to_owned(),
                    errors,
                }),
            },
        }
    }

    pub fn new(
        datapath: Arc<Datapath>,
        policy_dir: PathBuf,
        state_dir: &Path,
        from_control_plane: bool,
        dns_on: bool,
    ) -> Self {
        Self {
            datapath,
            applied: Snapshot::new(Applied::default()),
            state: Mutex::new(State {
                refused: None,
                stamp: None,
                settling: None,
                writes: Writes::watch(&policy_dir),
                waited_for: Vec::new(),
                rearm_at: None,
            }),
            last_error: Mutex::new(None),
            being_written: Mutex::new(Vec::new()),
            policy_dir,
            last_good: last_good_dir(state_dir),
            from_control_plane,
            dns_on,
        }
    }

    /// The policy in force.
    pub fn applied(&self) -> Arc<Applied> {
        self.applied.get()
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Policy files a process is still writing: the directory is read once they are closed.
    pub fn being_written(&self) -> Vec<String> {
        lock(&self.being_written).clone()
    }

    pub fn set_last_error(&self, e: Option<String>) {
        *lock(&self.last_error) = e;
    }

    /// Starts on `initial`: applied, its refusal (if it is the last good copy) shown, its
    /// directory not read again until it changes.
    /// With every core: nothing is served yet.
    pub fn start(&self, initial: Initial, deps: &Deps<'_>) -> Result<(), EnforcerError> {
        let mut st = lock(&self.state);
        st.stamp = Some(initial.stamp);
        let revision = initial.policy.revision.clone();
        let mut error = initial.error;
        // Refused as any apply is (recorded, counted, remembered); files the kernel refuses
        // (a bundle refused while its predecessor's files could not be put back, a capacity
        // lowered) start the node on the last revision it took, not on nothing.
        if let Err(e) = self.apply_or_refuse_locked(&mut st, initial.policy, deps) {
            match load_dir(&self.last_good) {
                Ok(good) if good.revision != revision => {
                    error!(refused = %revision, revision = %good.revision,
                        "starting on the last good revision");
                    self.apply_locked(&mut st, good, deps)?;
                    error = Some(format!("revision {revision} refused: {e}"));
                }
                _ => return Err(e),
            }
        }
        drop(st);
        release_free_memory();
        self.set_last_error(error);
        Ok(())
    }

    /// Applies a valid policy; when the datapath refuses it (capacity, say), the previous
    /// revision stays, and the refusal is logged, recorded and remembered.
    pub fn apply_or_refuse(&self, set: PolicySet, deps: &Deps<'_>) -> Result<(), EnforcerError> {
        let _low = crate::workers::Background::enter();
        let mut st = lock(&self.state);
        let r = self.apply_or_refuse_locked(&mut st, set, deps);
        drop(st);
        release_free_memory();
        r
    }

    fn apply_or_refuse_locked(
        &self,
        st: &mut State,
        set: PolicySet,
        deps: &Deps<'_>,
    ) -> Result<(), EnforcerError> {
        let revision = set.revision.clone();
        let Err(e) = self.apply_locked(st, set, deps) else {
            return Ok(());
        };
        error!(error = %e, "applying policy failed; the previous revision stays");
        deps.journal
            .record(&AuditEvent::Policy(PolicyEvent::Rejected {
                revision: Some(revision.clone()),
                errors: e.to_string(),
                revision_in_force: self.applied().revision().to_owned(),
            }));
        self.set_last_error(Some(e.to_string()));
        // A change the kernel took part of is tried again at the next tick, not remembered as
        // refused: the next attempt finishes it (or fails again, and says so).
        if !e.changed_kernel() {
            st.refused = Some(revision);
        }
        deps.counters.add(|c| c.policy_rejections += 1);
        Err(e)
    }

    fn apply_locked(
        &self,
        st: &mut State,
        mut set: PolicySet,
        deps: &Deps<'_>,
    ) -> Result<(), EnforcerError> {
        let sources = std::mem::take(&mut set.sources);
        self.apply_set(st, Arc::new(set), Some(sources), deps)
    }

    /// `sources`: the files to keep as the last good copy (none when re-applying the policy
    /// in force).
    fn apply_set(
        &self,
        st: &mut State,
        set: Arc<PolicySet>,
        sources: Option<Vec<(PathBuf, String)>>,
        deps: &Deps<'_>,
    ) -> Result<(), EnforcerError> {
        let t0 = std::time::Instant::now();
        // Refused whole before anything changes: identity numbers are kept for good, so the
        // table must hold everyone known plus everyone new.
        let table = deps.registry.assign(
            set.agents.iter().map(|a| a.identity.as_str()),
            // One number of the table is the self-check's (`Registry::self_check_number`).
            agent_common::MAX_IDENTITIES as usize - 2,
        )?;
        let now = SystemTime::now();
        let deny = set.global_deny();
        let mut rules: HashMap<u32, Arc<[Rule]>> = HashMap::with_capacity(set.agents.len());
        let mut named = BTreeSet::new();
        let mut modes = Vec::with_capacity(set.agents.len());
        let mut names = HashMap::with_capacity(set.agents.len());
        for a in &set.agents {
            let n = table
                .number(&a.identity)
                .expect("every policy identity was just numbered");
            let r: Arc<[Rule]> = set.rules_at(a, now).into();
            if r.iter().any(|r| !r.fqdns.is_empty()) {
                named.insert(n);
            }
            rules.insert(n, r);
            modes.push((n, a.mode, a.sni, a.io_uring));
            names.insert(
                n,
                Arc::new(NameAccess {
                    policy: crate::policy::names::NamePolicy::of(&set, a, now),
                    audit: a.mode == crate::policy::Mode::Audit,
                }),
            );
        }
        // Every identity's DNS goes through the proxy: what it may resolve is policy too.
        let mut configs: Vec<IdentityConfig> = modes
            .into_iter()
            .map(|(identity, mode, sni, io_uring)| IdentityConfig {
                identity,
                mode,
                dns: self.dns_on,
                sni,
                io_uring,
            })
            .collect();
        // An identity the policy no longer names is denied everything: enforce mode (an
        // audit mode left behind would allow it all), no rules, no DNS steering.
        configs.extend(table.iter().filter(|(_, n)| !rules.contains_key(n)).map(
            |(_, identity)| IdentityConfig {
                identity,
                mode: crate::policy::Mode::Enforce,
                dns: false,
                sni: crate::policy::model::SniCheck::Off,
                io_uring: crate::policy::model::IoUring::Refuse,
            },
        ));
        // Identities whose tasks the kernel let make rings until now (`allow`, or audit mode)
        // and will not from now on, with those a change noted before did not finish (a crash,
        // a change the kernel took part of): their sessions' rings are read once the change is
        // in force. Noted first, so a crash after the kernel write still reads them. Each with
        // whether the policy names it.
        let noted = deps.sessions.rings_noted();
        let last_good = std::cell::OnceCell::new();
        let rings_closing: BTreeMap<String, bool> = configs
            .iter()
            .filter(|c| {
                c.mode == crate::policy::Mode::Enforce
                    && c.io_uring == crate::policy::model::IoUring::Refuse
            })
            .filter_map(|c| {
                let name = table.name(c.identity)?;
                let open = noted.as_ref().is_none_or(|n| n.contains(name))
                    || match self.datapath.rings_were_open(c.identity) {
                        Ok(Some(open)) => open,
                        // The kernel holds nothing of it (the first apply on a new map
                        // layout's maps): as the last policy applied had it, kept in
                        // `state_dir`; every identity when that cannot be read.
                        Ok(None) => last_good
                            .get_or_init(|| load_dir(&self.last_good).ok())
                            .as_ref()
                            .is_none_or(|p: &PolicySet| rings_allowed(p, name)),
                        Err(_) => true,
                    };
                open.then(|| (name.to_owned(), rules.contains_key(&c.identity)))
            })
            .collect();
        deps.sessions
            .note_rings_closing(rings_closing.keys())
            .map_err(EnforcerError::RingsNote)?;
        // The proxy listens before any DNS is steered to it: for the identities of the policy
        // before and after, until the change is in (a refused one changes nothing).
        let served: BTreeSet<u32> = rules.keys().copied().collect();
        let before: BTreeSet<u32> = self.applied.get().names.keys().copied().collect();
        let listen = |served: BTreeSet<u32>| {
            deps.dns.set_served(served);
            deps.dns
                .sync(&deps.sessions.namespaces(), &table, deps.journal);
        };
        listen(before.union(&served).copied().collect());
        let mut snap = deps.dns.snapshot_for_apply(&rules, &named, &deny);
        let empty: Arc<[Rule]> = Arc::from(Vec::new());
        // Identities known from before (this run or an earlier one) that the policy no longer
        // names keep their bindings but get no rules: deny-all, never stale rules.
        let sets: Vec<IdentityRules> = table
            .iter()
            .map(|(_, n)| IdentityRules {
                identity: n,
                base: rules.get(&n).cloned().unwrap_or_else(|| empty.clone()),
                hosts: snap.hosts.remove(&n).unwrap_or_default(),
                learns: named.contains(&n),
            })
            .collect();
        let generation = snap.generation;
        tracing::debug!(
            prepare_ms = t0.elapsed().as_secs_f64() * 1e3,
            "policy compiled for the datapath"
        );
        let datapath = &*self.datapath;
        let done = match datapath.apply(
            &deny,
            sets,
            &configs,
            || deps.dns.replay(generation, datapath),
            |n| deps.registry.status(n),
        ) {
            Ok(done) => done,
            Err(e) => {
                if !e.changed_kernel() {
                    listen(before);
                }
                // The datapath knows identities by number; the admin knows them by SPIFFE ID.
                return Err(match e.identity().and_then(|n| table.name(n)) {
                    Some(identity) => EnforcerError::Rules {
                        identity: identity.to_owned(),
                        source: e,
                    },
                    None => e.into(),
                });
            }
        };
        // In force in the kernel: everyone reads the new policy from now on.
        let old = self.applied.get();
        let revision = set.revision.clone();
        let identities = set.agents.len();
        let rearm = set.next_schedule_change(now);
        self.applied.set(Applied {
            policy: set,
            identities: table.clone(),
            named: named.clone(),
            names,
            global_deny: deny,
        });
        deps.dns.forget_unnamed(&named);
        deps.dns.sync_sni(datapath);
        listen(served);
        // Where a node can die with the change in the kernel and the sessions not read: a
        // test kills it here.
        #[cfg(feature = "failpoints")]
        if !rings_closing.is_empty() {
            fail::eval("apply-before-ring-reading", crate::hold_at);
        }
        let cut = deps.sessions.end_ring_users(&rings_closing);
        if cut > 0 {
            warn!(
                sessions = cut,
                "sessions using io_uring their identity is refused from now on were cut off, their processes killed"
            );
        }
        if old.revision() != revision {
            // Rule numbers belong to a revision: counts of the old numbering would lie.
            if let Err(e) = datapath.clear_rule_hits() {
                warn!(error = %e, "could not reset the rule hit counters");
            }
        }
        drop(old);
        let took = t0.elapsed();
        info!(
            %revision,
            identities,
            tries_rebuilt = done.rebuilt,
            trie_entries = done.entries,
            build_ms = done.build.as_secs_f64() * 1e3,
            swap_ms = done.swap.as_secs_f64() * 1e3,
            apply_ms = took.as_secs_f64() * 1e3,
            "policy applied"
        );
        if let Some(sources) = sources {
            let files = sources
                .iter()
                .map(|(p, t)| (p.file_name().unwrap_or(p.as_os_str()), t.as_bytes()));
            if let Err(e) = crate::files::replace_dir(&self.last_good, files) {
                warn!(error = %e, dir = %self.last_good.display(), "could not keep a copy of the applied policy");
            }
        }
        st.rearm_at = rearm;
        deps.counters.add(|c| {
            c.policy_applies += 1;
            c.last_apply_seconds = took.as_secs_f64();
        });
        deps.journal
            .record(&AuditEvent::Policy(PolicyEvent::Applied {
                revision,
                identities,
            }));
        self.set_last_error(None);
        Ok(())
    }

    /// A schedule window opened or closed: the same revision, applied as of now.
    pub fn rearm_if_due(&self, deps: &Deps<'_>) {
        let _low = crate::workers::Background::enter();
        // An apply in progress (a bundle, `policy apply`) is not waited for: the next tick
        // looks again.
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if st.rearm_at.is_none_or(|t| SystemTime::now() < t) {
            return;
        }
        let policy = self.applied().policy.clone();
        if let Err(e) = self.apply_set(&mut st, policy, None, deps) {
            error!(error = %e, "re-applying scheduled rules failed");
        }
        drop(st);
        release_free_memory();
    }

    /// Re-reads the policy directory; a new valid revision is applied, an invalid one is
    /// refused and the last good one stays in force. `force`: read the directory even when
    /// nothing in it changed (`policy apply`), and even with a control plane.
    pub fn reload(&self, force: bool, deps: &Deps<'_>) {
        // With a control plane, policy changes arrive as bundles, which apply themselves
        // (`force`); the tick never reads the directory while a bundle is being written to it.
        if self.from_control_plane && !force {
            return;
        }
        let _low = crate::workers::Background::enter();
        let mut st = lock(&self.state);
        // Parsed again only when a file in it changed: a large directory costs nothing while
        // it stays as it is.
        let stamp = Stamp::of_dir(&self.policy_dir);
        let writing = st.writes.open();
        if !force {
            if st.stamp.as_ref() == Some(&stamp) {
                return;
            }
            // A file read while it is written can be cut anywhere, and its start is often a
            // valid policy by itself (a rule read without its exception): a change is read
            // once no file of it is open for writing and it stayed as it is for a tick.
            if st.waited_for != writing {
                if !writing.is_empty() {
                    info!(dir = %self.policy_dir.display(), files = ?writing,
                        "policy files are being written; read once they are closed");
                }
                *lock(&self.being_written) = writing
                    .iter()
                    .map(|f| f.to_string_lossy().into_owned())
                    .collect();
                st.waited_for.clone_from(&writing);
            }
            if !writing.is_empty() {
                deps.counters.add(|c| c.policy_reads_held += 1);
                return;
            }
            if st.settling.as_ref() != Some(&stamp) {
                st.settling = Some(stamp);
                return;
            }
        }
        st.settling = None;
        st.stamp = Some(stamp);
        let current = self.applied().revision().to_owned();
        match load_dir(&self.policy_dir) {
            // The directory is back to what is in force: any earlier rejection is over.
            Ok(set) if set.revision == current => {
                self.set_last_error(None);
                st.refused = None;
                drop((set, st));
                release_free_memory();
            }
            // Refused once already: not tried (and logged) again every tick.
            Ok(set) if st.refused.as_deref() == Some(set.revision.as_str()) => {}
            Ok(set) => {
                let _ = self.apply_or_refuse_locked(&mut st, set, deps);
                drop(st);
                release_free_memory();
            }
            Err(errors) => {
                let text = errors.to_string();
                if self.last_error().as_deref() != Some(&text) {
                    deps.journal
                        .record(&AuditEvent::Policy(PolicyEvent::Rejected {
                            revision: None,
                            errors: text.clone(),
                            revision_in_force: current.clone(),
                        }));
                    warn!(revision = %current, errors = %text,
                        "policy change rejected; keeping the last good revision");
                    deps.counters.add(|c| c.policy_rejections += 1);
                    self.set_last_error(Some(text));
                }
            }
        }
    }
}

/// Where the node keeps the files of the last policy it applied.
/// Whether `set` lets `identity`'s tasks make io_uring instances: it allows io_uring, or the
/// identity is in audit mode. An identity it does not name: no.
fn rings_allowed(set: &PolicySet, identity: &str) -> bool {
    set.by_identity.get(identity).is_some_and(|&i| {
        let a = &set.agents[i];
        a.io_uring == crate::policy::model::IoUring::Allow || a.mode == crate::policy::Mode::Audit
    })
}

pub(crate) fn last_good_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("policy-last-good")
}
