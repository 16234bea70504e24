//! DNS learning: turns the answers the proxy forwards into kernel host entries for the
//! identity that asked (when one of its name rules allows the name), keeps them in
//! `state_dir/dns-learned.json`, expires them, remembers which name each identity resolved to
//! each address (for decision records), and has the proxy listen where identities with name
//! rules live. An answer is installed before the agent sees it, and never waits on a policy
//! apply: the apply stages its new tries, and what is learned meanwhile reaches both.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use tracing::{error, warn};

use super::{
    Counters,
    enforcer::Applied,
    journal::{AuditEvent, DnsEvent, Journal},
};
use crate::{
    datapath::Datapath,
    dns::{
        Answer, Caps, Learned, Observed,
        proxy::{Admit, Netns, Proxy},
    },
    policy::Rule,
};

/// Changes remembered for an apply in progress to replay; past this, it replays everything.
const CHANGE_LOG: usize = 65536;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The DNS settings learning needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub grace: Duration,
    pub min_ttl: Duration,
    pub caps: Caps,
    /// How long the catalog keeps an address an answer named.
    pub catalog_keep: Duration,
    pub state_dir: PathBuf,
    /// Namespaces besides the node's own the proxy listens in: per identity, and in all.
    pub namespaces_per_identity: usize,
    pub namespaces: usize,
}

/// Deadlines that only moved later are written this often at most (addresses that came or
/// went are written at the next tick): a restarted node loses at most this much of an
/// address's extension, well inside the grace every learned address gets.
const SAVE_EXTENSIONS_EVERY: Duration = Duration::from_secs(10);

struct LearnedState {
    learned: Learned,
    /// Changed since last written to state_dir: addresses came or went.
    dirty: bool,
    /// Since when only deadlines moved, unwritten.
    extended: Option<std::time::Instant>,
    /// Bumped by every change of host entries; `log` holds the latest ones.
    generation: u64,
    log: VecDeque<(u64, u32, Vec<IpAddr>)>,
    /// The oldest generation `log` still covers.
    log_from: u64,
}

impl LearnedState {
    /// Host entries of `addrs` were rewritten; `new`: an address came or went (not only a
    /// deadline that moved).
    fn changed(&mut self, identity: u32, addrs: Vec<IpAddr>, new: bool) {
        self.generation += 1;
        if new {
            self.dirty = true;
        } else {
            self.extended.get_or_insert_with(std::time::Instant::now);
        }
        self.log.push_back((self.generation, identity, addrs));
        while self.log.len() > CHANGE_LOG {
            if let Some((g, _, _)) = self.log.pop_front() {
                self.log_from = g + 1;
            }
        }
    }
}

struct SyncState {
    /// Identities whose DNS is steered to the proxy (every identity of the policy).
    served: BTreeSet<u32>,
    /// The proxy is off: said once.
    said_off: bool,
    /// Namespaces refused by a cap (identity, inode), each recorded once.
    over_cap: BTreeSet<(u32, u64)>,
    /// The IPv6 proxy prefix is routed to `lo` in the node's namespace.
    routed6: bool,
    /// Why the proxy cannot serve (some of) the identities with name rules.
    error: Option<String>,
}

pub struct DnsLearning {
    settings: Settings,
    proxy: Option<Proxy>,
    learned: Mutex<LearnedState>,
    observed: Mutex<Observed>,
    sync: Mutex<SyncState>,
    /// One write of the learned file at a time.
    saving: Mutex<()>,
    /// Refused queries recorded per identity and second.
    refusals: RefusalRecords,
}

/// Refused queries are recorded up to this many per identity and second; the rest are counted
/// in the next record (a tunnel attempt is thousands of distinct names a second).
const REFUSALS_PER_SECOND: u64 = 20;

/// What one refused query is recorded as.
#[derive(Clone)]
struct Refused {
    name: String,
    qtype: String,
    why: String,
    audit: bool,
}

impl Refused {
    fn event(self, identity: String, applied: &Applied, count: u64) -> DnsEvent {
        let Self {
            name,
            qtype,
            why,
            audit,
        } = self;
        let (owner, labels) = applied.owner_of(&identity);
        if audit {
            DnsEvent::QueryWouldRefuse {
                identity,
                owner,
                labels,
                name,
                qtype,
                why,
                count,
            }
        } else {
            DnsEvent::QueryRefused {
                identity,
                owner,
                labels,
                name,
                qtype,
                why,
                count,
            }
        }
    }
}

/// Per identity: when its current second began, records written in it, refusals counted but
/// not written yet, and the latest of those.
struct Held {
    since: std::time::Instant,
    written: u64,
    held: u64,
    last: Option<Refused>,
}

#[derive(Default)]
struct RefusalRecords(Mutex<std::collections::HashMap<u32, Held>>);

impl RefusalRecords {
    /// Notes one refusal; the count a record must carry now (this one and those held), or
    /// none when it is only counted.
    fn note(&self, identity: u32, r: &Refused) -> Option<u64> {
        let mut m = lock(&self.0);
        let now = std::time::Instant::now();
        let e = m.entry(identity).or_insert(Held {
            since: now,
            written: 0,
            held: 0,
            last: None,
        });
        if now.duration_since(e.since) >= Duration::from_secs(1) {
            e.since = now;
            e.written = 0;
        }
        if e.written < REFUSALS_PER_SECOND {
            e.written += 1;
            let count = 1 + e.held;
            e.held = 0;
            e.last = None;
            return Some(count);
        }
        e.held += 1;
        e.last = Some(r.clone());
        None
    }

    /// Refusals held for a second or more, to be written now: (identity, latest, count).
    fn due(&self) -> Vec<(u32, Refused, u64)> {
        let mut m = lock(&self.0);
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        m.retain(|&id, e| {
            if now.duration_since(e.since) < Duration::from_secs(1) {
                return true;
            }
            if let Some(last) = e.last.take() {
                out.push((id, last, e.held));
            }
            false
        });
        out
    }
}

/// What learning contributes to an apply: the host rules of every identity with name rules,
/// and where in the learned table that snapshot stands.
pub struct HostSnapshot {
    pub generation: u64,
    pub hosts: BTreeMap<u32, Vec<Rule>>,
}

impl DnsLearning {
    pub fn new(settings: Settings, proxy: Option<Proxy>, startup_error: Option<String>) -> Self {
        let path = Learned::path(&settings.state_dir);
        let learned = Learned::load(&path).unwrap_or_else(|e| {
            // Addresses not known are denied: starting empty fails closed.
            error!(error = %e, "learned DNS addresses unreadable; starting without them");
            Learned::default()
        });
        Self {
            settings,
            proxy,
            learned: Mutex::new(LearnedState {
                learned,
                dirty: false,
                extended: None,
                generation: 0,
                log: VecDeque::new(),
                log_from: 1,
            }),
            observed: Mutex::new(Observed::new(65536)),
            sync: Mutex::new(SyncState {
                served: BTreeSet::new(),
                said_off: false,
                over_cap: BTreeSet::new(),
                routed6: false,
                error: startup_error,
            }),
            saving: Mutex::new(()),
            refusals: RefusalRecords::default(),
        }
    }

    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// The name `identity` last resolved to `ip`, for decision records.
    pub fn observed_name(&self, identity: u32, ip: IpAddr) -> Option<String> {
        lock(&self.observed).get(identity, ip).map(str::to_owned)
    }

    pub fn learned_addresses(&self) -> usize {
        lock(&self.learned).learned.len()
    }

    pub fn error(&self) -> Option<String> {
        lock(&self.sync).error.clone()
    }

    /// Whether the proxy forwards a query: the identity's DNS policy decides; a refusal (or,
    /// in audit mode, a would-be refusal) is recorded. An identity the policy does not know
    /// resolves nothing.
    pub fn admit(
        &self,
        identity: u32,
        name: &str,
        qtype: u16,
        applied: &Applied,
        journal: &Journal,
    ) -> Admit {
        let access = applied.names.get(&identity);
        let why = match access {
            None => "the identity has no policy".to_owned(),
            Some(a) => match a.policy.check(name, qtype) {
                Ok(()) => return Admit::Forward,
                Err(r) => r.to_string(),
            },
        };
        let audit = access.is_some_and(|a| a.audit);
        let refused = Refused {
            name: name.to_owned(),
            qtype: crate::policy::names::QueryType(qtype).to_string(),
            why,
            audit,
        };
        if let Some(count) = self.refusals.note(identity, &refused) {
            let id = applied
                .identities
                .name(identity)
                .unwrap_or_default()
                .to_owned();
            if !audit {
                warn!(identity = %id, name = %refused.name, qtype = %refused.qtype, why = %refused.why, "DNS query refused");
            }
            journal.record(&AuditEvent::Dns(refused.event(id, applied, count)));
        }
        if audit { Admit::Forward } else { Admit::Refuse }
    }

    /// Writes the refusals counted but not written once their second is over (the burst may
    /// not be followed by another refusal that would carry them).
    pub fn flush_refusals(&self, applied: &Applied, journal: &Journal) {
        for (identity, last, count) in self.refusals.due() {
            let id = applied
                .identities
                .name(identity)
                .unwrap_or_default()
                .to_owned();
            journal.record(&AuditEvent::Dns(last.event(id, applied, count)));
        }
    }

    /// Makes an answer's addresses enforceable for the identity that asked, when one of its
    /// rules allows the name; remembers every answer's names for decision records. Runs before
    /// the agent sees the answer.
    pub fn answered(
        &self,
        identity: u32,
        a: &Answer,
        applied: &Applied,
        datapath: &Datapath,
        journal: &Journal,
        counters: &Counters,
    ) {
        {
            let mut observed = lock(&self.observed);
            for (ip, _) in &a.addrs {
                observed.insert(identity, *ip, &a.qname);
            }
        }
        // The rules of the trie in force, and of one a change in progress has staged: a name
        // the new policy allows is learned while it is being applied.
        let Some(rule_id) = datapath.learning_rules(identity).iter().find_map(|base| {
            base.iter()
                .find(|r| r.fqdns.iter().any(|p| p.matches(&a.qname)))
                .map(|r| r.id)
        }) else {
            return;
        };
        if a.addrs.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let (grace, min_ttl) = (self.settings.grace, self.settings.min_ttl);
        let id = applied.identities.name(identity).unwrap_or_default();
        let mut addrs: Vec<(IpAddr, SystemTime)> = Vec::new();
        for &(ip, ttl) in &a.addrs {
            match crate::dns::unlearnable(ip, &applied.global_deny) {
                None => addrs.push((
                    ip,
                    now + Duration::from_secs(u64::from(ttl)).max(min_ttl) + grace,
                )),
                Some(why) => {
                    counters.add(|c| c.dns_refused += 1);
                    warn!(identity = %id, name = %a.qname, addr = %ip, why,
                        "DNS answer names an address DNS may not open; it stays denied");
                    journal.record(&AuditEvent::Dns(DnsEvent::Refused {
                        identity: id.to_owned(),
                        name: a.qname.clone(),
                        addr: ip,
                        why,
                    }));
                }
            }
        }
        // Held from learning to the kernel write: host entries are rewritten in the order
        // their changes were learned, and an apply replays what it did not see under it.
        let mut st = lock(&self.learned);
        let out = st
            .learned
            .learn(identity, &a.qname, &addrs, self.settings.caps, now);
        if !out.refused.is_empty() {
            counters.add(|c| c.dns_refused += out.refused.len() as u64);
            let refused: Vec<IpAddr> = out.refused.iter().map(|(ip, _)| *ip).collect();
            let cap = out.refused[0].1;
            warn!(identity = %id, name = %a.qname, cap, refused = ?refused,
                "DNS answer over a cap: these addresses stay denied");
            journal.record(&AuditEvent::Dns(DnsEvent::Cap {
                identity: id.to_owned(),
                name: a.qname.clone(),
                cap,
                refused,
            }));
        }
        if out.changed.is_empty() {
            return;
        }
        let learned = &st.learned;
        let written = datapath.update_hosts_with(identity, &out.changed, |base, deny| {
            learned.host_rules_for(identity, base, &out.changed, deny)
        });
        if written.is_ok() {
            sync_sni(learned, identity, &out.changed, datapath);
        }
        st.changed(identity, out.changed.clone(), !out.added.is_empty());
        drop(st);
        match written {
            Ok(()) => {
                if !out.added.is_empty() {
                    counters.add(|c| c.dns_learned += out.added.len() as u64);
                    tracing::debug!(identity = %id, name = %a.qname, addrs = ?out.added, "learned");
                    journal.record(&AuditEvent::Dns(DnsEvent::Learned {
                        identity: id.to_owned(),
                        name: a.qname.clone(),
                        addrs: out.added,
                        rule_id,
                    }));
                }
            }
            // The identity left the policy (or its name rules) meanwhile: nothing to allow.
            Err(
                crate::datapath::DatapathError::NoTrie(_)
                | crate::datapath::DatapathError::HostsNotKept(_),
            ) => {}
            Err(e) => {
                error!(identity = %id, name = %a.qname, error = %e,
                    "could not allow a DNS answer's addresses; they stay denied");
                journal.record(&AuditEvent::Dns(DnsEvent::InstallFailed {
                    identity: id.to_owned(),
                    name: a.qname.clone(),
                    error: e.to_string(),
                }));
            }
        }
    }

    /// For an apply: the host rules of every identity with name rules against its new rules.
    pub fn snapshot_for_apply(
        &self,
        rules: &std::collections::HashMap<u32, Arc<[Rule]>>,
        named: &BTreeSet<u32>,
        global_deny: &[IpNet],
    ) -> HostSnapshot {
        let (copy, generation) = crate::workers::at_normal_priority(|| {
            let st = lock(&self.learned);
            (st.learned.subset(named), st.generation)
        });
        // Computed from the copy: answers do not wait on it.
        let hosts = named
            .iter()
            .filter_map(|n| {
                let base = rules.get(n)?;
                Some((*n, copy.hosts(*n, base, global_deny)))
            })
            .collect();
        HostSnapshot { generation, hosts }
    }

    /// Once a change is in force: forgets what identities without name rules (or gone from
    /// the policy) learned.
    pub fn forget_unnamed(&self, named: &BTreeSet<u32>) {
        let mut st = lock(&self.learned);
        if st.learned.retain(|n| named.contains(&n)) {
            st.dirty = true;
        }
    }

    /// Writes what was learned since `since` into the tries an apply has staged (and the ones
    /// in force, which already hold it: the write is the same). Runs at normal priority: DNS
    /// answers wait for this lock.
    pub fn replay(&self, since: u64, datapath: &Datapath) {
        crate::workers::at_normal_priority(|| self.replay_locked(since, datapath));
    }

    fn replay_locked(&self, since: u64, datapath: &Datapath) {
        let st = lock(&self.learned);
        if st.generation == since {
            return;
        }
        let mut due: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
        if since + 1 >= st.log_from {
            for (g, id, addrs) in &st.log {
                if *g > since {
                    due.entry(*id).or_default().extend(addrs.iter().copied());
                }
            }
        } else {
            // The log no longer reaches back: every learned address is written again.
            for (id, ip) in st.learned.addresses() {
                due.entry(id).or_default().insert(ip);
            }
        }
        for (id, addrs) in due {
            let addrs: Vec<IpAddr> = addrs.into_iter().collect();
            let learned = &st.learned;
            if let Err(e) = datapath.update_hosts_with(id, &addrs, |base, deny| {
                learned.host_rules_for(id, base, &addrs, deny)
            }) {
                warn!(identity = id, error = %e, "could not carry learned addresses into the new rules");
            }
        }
        // The rules in force and staged both: either trie's rule numbers pass the check
        // while the change is swapped in.
        sync_all_sni(&st.learned, datapath);
    }

    /// Makes the TLS check's names those of everything learned, under the rules in force
    /// (after a change: the old numbering's go).
    pub fn sync_sni(&self, datapath: &Datapath) {
        crate::workers::at_normal_priority(|| {
            let st = lock(&self.learned);
            sync_all_sni(&st.learned, datapath);
        });
    }

    /// Drops learned addresses past their deadline (the kernel stopped allowing them on its
    /// own) and keeps the learned file current.
    pub fn expire(&self, datapath: &Datapath) {
        let mut st = lock(&self.learned);
        let gone = st.learned.expire(SystemTime::now());
        for (identity, addrs) in gone {
            let learned = &st.learned;
            match datapath.update_hosts_with(identity, &addrs, |base, deny| {
                learned.host_rules_for(identity, base, &addrs, deny)
            }) {
                Ok(()) | Err(crate::datapath::DatapathError::NoTrie(_)) => {}
                Err(e) => {
                    warn!(identity, error = %e, "could not remove expired learned addresses (they no longer allow)");
                }
            }
            sync_sni(learned, identity, &addrs, datapath);
            st.changed(identity, addrs, true);
        }
        // Never later than half the grace: a restart keeps every address the agent may
        // still use.
        let every = SAVE_EXTENSIONS_EVERY.min(self.settings.grace / 2);
        let due = st.dirty || st.extended.is_some_and(|t| t.elapsed() >= every);
        if !due {
            return;
        }
        // Encoded under the lock, written (and synced) outside it: answers never wait on
        // the disk.
        let bytes = st.learned.encode();
        st.dirty = false;
        st.extended = None;
        drop(st);
        let _one = lock(&self.saving);
        let path = Learned::path(&self.settings.state_dir);
        crate::failpoint!("learned-save");
        if let Err(e) = Learned::store(&path, &bytes) {
            warn!(error = %e, "could not save learned DNS addresses");
            lock(&self.learned).dirty = true;
        }
    }

    /// Writes the learned table now if anything is unwritten (the node is stopping).
    pub fn save_now(&self) {
        let bytes = {
            let mut st = lock(&self.learned);
            if !st.dirty && st.extended.is_none() {
                return;
            }
            st.dirty = false;
            st.extended = None;
            st.learned.encode()
        };
        let _one = lock(&self.saving);
        if let Err(e) = Learned::store(&Learned::path(&self.settings.state_dir), &bytes) {
            warn!(error = %e, "could not save learned DNS addresses");
        }
    }

    /// The identities whose DNS goes to the proxy.
    pub fn set_served(&self, served: BTreeSet<u32>) {
        lock(&self.sync).served = served;
    }

    /// Has the proxy listen for every served identity that has sessions, in the node's
    /// network namespace and in each namespace `sessions` names for it, and nowhere else.
    /// Namespaces past the caps get no proxy: DNS there is refused (closed), recorded once.
    pub fn sync(
        &self,
        sessions: &BTreeMap<u32, Vec<Netns>>,
        names: &super::registry::IdentityTable,
        journal: &Journal,
    ) {
        let mut st = lock(&self.sync);
        let Some(proxy) = &self.proxy else {
            if !st.served.is_empty() && !st.said_off {
                st.said_off = true;
                warn!(
                    identities = st.served.len(),
                    "the DNS proxy is off (dns_listen_port = 0): name rules allow nothing, and DNS policy is not enforced"
                );
            }
            return;
        };
        let (per_identity, total) = (
            self.settings.namespaces_per_identity,
            self.settings.namespaces,
        );
        let mut left = total;
        let mut refused: Vec<(u32, u64)> = Vec::new();
        let want: BTreeMap<u32, Vec<Netns>> = st
            .served
            .iter()
            .filter_map(|n| Some((n, sessions.get(n)?)))
            .map(|(n, spaces)| {
                let mut spaces = spaces.clone();
                let keep = spaces.len().min(per_identity).min(left);
                left -= keep;
                refused.extend(spaces.drain(keep..).map(|ns| (*n, ns.inode)));
                (*n, spaces)
            })
            .collect();
        for (identity, inode) in &refused {
            if st.over_cap.insert((*identity, *inode)) {
                warn!(
                    identity,
                    netns = inode,
                    per_identity,
                    total,
                    "DNS proxy namespace cap reached: DNS from this namespace is refused"
                );
                journal.record(&AuditEvent::Dns(DnsEvent::NamespaceCap {
                    identity: names.name(*identity).unwrap_or_default().to_owned(),
                    netns: *inode,
                    per_identity,
                    total,
                }));
            }
        }
        // Forget namespaces that went away, so the set stays as small as the sessions are.
        let live: BTreeSet<(u32, u64)> = refused.iter().copied().collect();
        st.over_cap.retain(|k| live.contains(k));
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
        if error.is_some() && error != st.error {
            error!(error = %error.as_deref().unwrap_or_default(),
                "names of these identities stay unresolvable there (closed, not open)");
        }
        let capped = (!refused.is_empty()).then(|| {
            format!(
                "{} network namespace(s) of agents get no DNS proxy (caps: {per_identity} per identity, {total} in all); their DNS is refused",
                refused.len()
            )
        });
        st.error = match (error, capped) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
    }
}

/// Network namespaces the processes of `cgroups` use, other than the node's own.
pub fn namespaces_of(cgroups: &[&Path]) -> Vec<Netns> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino());
    let own = inode(Path::new("/proc/self/ns/net"));
    let mut list: Vec<Netns> = Vec::new();
    for cg in cgroups {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Some(ino) = inode(&path) {
                if Some(ino) != own && !list.iter().any(|n| n.inode == ino) {
                    list.push(Netns { inode: ino, path });
                }
            }
        }
    }
    list
}

/// The TLS check's names for (identity, ip): each name the identity resolved there, with the
/// name rules (of the tries in force and staged) that allow it, lower case without a dot.
fn sni_names(
    learned: &Learned,
    identity: u32,
    ip: IpAddr,
    rules: &[Arc<[Rule]>],
) -> crate::datapath::sni::Names {
    // Name → the rules allowing it there: the names the identity resolved to the address,
    // and the ECH public names those names' rules accept beside them.
    let mut ids: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for name in learned.names_at(identity, ip) {
        for r in rules
            .iter()
            .flat_map(|base| base.iter())
            .filter(|r| r.fqdns.iter().any(|p| p.matches(name)))
        {
            ids.entry(crate::policy::fqdn::normalize(name))
                .or_default()
                .push(r.id);
            for e in &r.ech {
                ids.entry(e.to_string()).or_default().push(r.id);
            }
        }
    }
    let mut out = crate::datapath::sni::Names::new();
    for (name, mut ids) in ids {
        ids.sort_unstable();
        ids.dedup();
        // A name more rules allow keeps the first few: a port only a later one opens is
        // refused (closed, not open).
        let mut slots = [0u32; agent_common::SNI_RULES];
        for (slot, id) in slots.iter_mut().zip(ids) {
            *slot = id;
        }
        out.insert(name, slots);
    }
    out
}

fn sync_sni(learned: &Learned, identity: u32, addrs: &[IpAddr], datapath: &Datapath) {
    let rules = datapath.learning_rules(identity);
    for ip in addrs {
        let want = sni_names(learned, identity, *ip, &rules);
        if let Err(e) = datapath.set_sni_names(identity, *ip, &want) {
            warn!(identity, addr = %ip, error = %e,
                "could not write TLS server names; connections naming them are refused");
        }
    }
}

fn sync_all_sni(learned: &Learned, datapath: &Datapath) {
    let mut rules: HashMap<u32, Vec<Arc<[Rule]>>> = HashMap::new();
    let mut want = BTreeMap::new();
    for (identity, ip) in learned.addresses() {
        let r = rules
            .entry(identity)
            .or_insert_with(|| datapath.learning_rules(identity));
        let names = sni_names(learned, identity, ip, r);
        if !names.is_empty() {
            want.insert((identity, ip), names);
        }
    }
    if let Err(e) = datapath.set_all_sni_names(&want) {
        warn!(error = %e, "could not write TLS server names; connections naming them are refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Direction, Protocol};

    fn rule(id: u32, names: &[&str], ech: &[&str]) -> Rule {
        Rule {
            id,
            to: vec![],
            fqdns: names.iter().map(|n| n.parse().unwrap()).collect(),
            ech: ech.iter().map(|e| Box::from(*e)).collect(),
            ports: vec!["443".parse().unwrap()],
            protocol: Protocol::Tcp,
            direction: Direction::Egress,
            expires: None,
            learned: false,
        }
    }

    #[test]
    fn the_server_names_at_an_address_are_the_names_resolved_there_and_their_rules_ech_names() {
        let caps = crate::dns::Caps {
            names_per_identity: 8,
            addresses_per_name: 8,
        };
        let now = SystemTime::now();
        let until = now + Duration::from_secs(60);
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let other: IpAddr = "192.0.2.11".parse().unwrap();
        let mut learned = Learned::default();
        learned.learn(1, "api.example.com", &[(ip, until)], caps, now);
        learned.learn(1, "www.example.org", &[(other, until)], caps, now);
        let rules: Vec<Arc<[Rule]>> = vec![Arc::from(vec![
            rule(1, &["api.example.com"], &["ech.provider.example"]),
            rule(2, &["*.example.com"], &[]),
            rule(3, &["www.example.org"], &["other-ech.example"]),
        ])];
        let names = sni_names(&learned, 1, ip, &rules);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                ("api.example.com".to_owned(), [1, 2, 0, 0]),
                // Accepted under the rule that lists it, at the addresses its names learned.
                ("ech.provider.example".to_owned(), [1, 0, 0, 0]),
            ]
        );
        // Another rule's ECH name only where that rule's names were learned.
        assert_eq!(
            sni_names(&learned, 1, other, &rules)
                .into_keys()
                .collect::<Vec<_>>(),
            ["other-ech.example", "www.example.org"]
        );
    }
}
