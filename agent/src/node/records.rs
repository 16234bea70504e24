//! The record pipeline: the kernel's decision records enriched for people (identity,
//! certificate, process, cgroup, unit or container, name asked, service, rule, revision),
//! folded (identical flows within `aggregate_window` become one record with their count), and
//! emitted to the journal and the recent list `agentwall flows` reads. Enrichment reads
//! snapshots and short lookups; it never waits on a policy apply.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

use super::{
    Counters,
    dns::DnsLearning,
    enforcer::Applied,
    journal::{AuditEvent, Journal},
    sessions::Sessions,
};
use crate::{
    datapath::{Datapath, EventRecord},
    discovery::Catalog,
    flows::{self, FlowRecord, Recent},
};

/// Open runs of identical flows kept at most; past that, every window closes early.
const MAX_RUNS: usize = 65536;
/// A flow quiet for this long has its kernel-held count collected (twice the kernel's rate
/// window, so the kernel is done with it).
const KERNEL_IDLE: Duration = Duration::from_secs(2);

/// What enrichment reads.
pub struct Lookups<'a> {
    pub applied: &'a Applied,
    pub sessions: &'a Sessions,
    pub dns: &'a DnsLearning,
    pub catalog: &'a Mutex<Catalog>,
}

/// Enriches a kernel record.
pub fn enrich(e: &EventRecord, with: &Lookups<'_>) -> FlowRecord {
    let mut r = flows::base(e, with.applied.revision());
    if e.identity != 0 {
        r.identity = with.applied.identities.name(e.identity).map(str::to_owned);
        if let Some(id) = r.identity.as_deref() {
            (r.owner, r.labels) = with.applied.owner_of(id);
        }
    }
    if let Some(dest) = r.dest {
        r.fqdn = with.dns.observed_name(e.identity, dest);
        r.service = with
            .catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .service_of_addr(dest)
            .map(|(s, _)| s.to_owned());
    }
    let g = with.sessions.describe(e.cgroup_id, e.pid);
    r.cgroup = g.cgroup;
    if let Some(cg) = &r.cgroup {
        (r.unit, r.container) = flows::unit_and_container(cg);
        r.serial = g.serial;
    }
    if e.rule_id > 0 {
        if let Some(id) = r.identity.as_deref() {
            r.rule = with.applied.rule_place(id, e.rule_id);
        }
    }
    r
}

/// What makes two flows identical: identity, cgroup, destination, port, protocol, verdict,
/// reason.
type RunKey = (
    u32,
    u64,
    Option<IpAddr>,
    u16,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
);

/// Flows folded since a run's first record was written.
struct Run {
    opened: Instant,
    pending: u64,
    pending_first: Option<String>,
    last: String,
    /// The latest of them, written with the totals.
    template: FlowRecord,
}

/// Folding, with no I/O: what to write, given records and the time.
pub struct Folder {
    window: Duration,
    runs: HashMap<RunKey, Run>,
    /// The latest record of each kernel rate-limit key, to report counts the kernel still
    /// held for it (identity number, record).
    templates: HashMap<agent_common::RateKey, (u32, FlowRecord)>,
}

impl Folder {
    /// `window` zero: every record is written as it comes.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            runs: HashMap::new(),
            templates: HashMap::new(),
        }
    }

    pub fn remember(&mut self, key: agent_common::RateKey, identity: u32, r: &FlowRecord) {
        if self.templates.len() >= MAX_RUNS {
            self.templates.clear();
        }
        self.templates.insert(key, (identity, r.clone()));
    }

    pub fn template(&self, key: &agent_common::RateKey) -> Option<(u32, FlowRecord)> {
        self.templates.get(key).cloned()
    }

    /// The first of a run of identical flows is written at once; the rest are counted into
    /// the run. Returns what to write now.
    pub fn fold(&mut self, identity: u32, r: FlowRecord, now: Instant) -> Vec<FlowRecord> {
        if self.window.is_zero() {
            return vec![r];
        }
        let key: RunKey = (
            identity,
            r.cgroup_id,
            r.dest,
            r.port,
            r.protocol.clone(),
            r.verdict.clone(),
            r.reason.clone(),
            r.direction.clone(),
        );
        if let Some(a) = self.runs.get_mut(&key) {
            a.pending = a.pending.saturating_add(r.count);
            a.pending_first
                .get_or_insert_with(|| r.first_seen.clone().unwrap_or_else(|| r.time.clone()));
            a.last = r.last_seen.clone().unwrap_or_else(|| r.time.clone());
            a.template = r;
            return Vec::new();
        }
        // Bounded memory: close every window early rather than lose counts.
        let mut out = if self.runs.len() >= MAX_RUNS {
            self.close(now, true)
        } else {
            Vec::new()
        };
        self.runs.insert(
            key,
            Run {
                opened: now,
                pending: 0,
                pending_first: None,
                last: r.time.clone(),
                template: r.clone(),
            },
        );
        out.push(r);
        out
    }

    /// Closes the runs whose window has passed (all of them with `all`): each that folded
    /// flows is written as one record with their count, first and last seen.
    pub fn close(&mut self, now: Instant, all: bool) -> Vec<FlowRecord> {
        let window = self.window;
        let due: Vec<RunKey> = self
            .runs
            .iter()
            .filter(|(_, a)| all || now.saturating_duration_since(a.opened) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in due {
            let Some(a) = self.runs.remove(&k) else {
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
            out.push(r);
        }
        out
    }
}

pub struct Records {
    folder: Mutex<Folder>,
    recent: Mutex<Recent>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Records {
    pub fn new(window: Duration) -> Self {
        Self {
            folder: Mutex::new(Folder::new(window)),
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Records a kernel event (`server_name`: what the TLS check refused, for its records).
    pub fn record(
        &self,
        e: &EventRecord,
        server_name: Option<String>,
        with: &Lookups<'_>,
        journal: &Journal,
        counters: &Counters,
    ) {
        let mut r = enrich(e, with);
        r.server_name = server_name.map(|n| crate::text::printable(&n).into_owned());
        let mut folder = lock(&self.folder);
        folder.remember(e.rate_key, e.identity, &r);
        self.fold(&mut folder, e.identity, r, journal, counters);
    }

    /// Counts a record and writes it, or folds it into its open run. Runs under the folder's
    /// lock, so a run's first record is always written before its folded one.
    fn fold(
        &self,
        folder: &mut Folder,
        identity: u32,
        r: FlowRecord,
        journal: &Journal,
        counters: &Counters,
    ) {
        counters.add(|c| {
            let n = c
                .decisions
                .entry((r.identity.clone().unwrap_or_default(), r.verdict.clone()))
                .or_default();
            *n = n.saturating_add(r.count);
        });
        for out in folder.fold(identity, r, Instant::now()) {
            self.emit(out, journal);
        }
    }

    fn emit(&self, mut r: FlowRecord, journal: &Journal) {
        let mut recent = lock(&self.recent);
        r.seq = recent.next_seq();
        tracing::debug!(record = %r, "decision");
        journal.record(&AuditEvent::Decision(&r));
        recent.push(r);
    }

    /// Writes the folded flows of windows that have closed (all of them with `all`).
    pub fn flush(&self, all: bool, journal: &Journal) {
        let mut folder = lock(&self.folder);
        for r in folder.close(Instant::now(), all) {
            self.emit(r, journal);
        }
    }

    /// Counts held in the kernel for flows that went quiet are taken and recorded like any
    /// other (the kernel would only report them with the next identical flow).
    pub fn sweep_kernel_counts(
        &self,
        datapath: &Datapath,
        with: &Lookups<'_>,
        journal: &Journal,
        counters: &Counters,
    ) {
        let drained = match datapath.drain_idle_counts(KERNEL_IDLE) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "could not collect the kernel's folded counts");
                return;
            }
        };
        for (k, n, first, seen) in drained {
            let known = lock(&self.folder).template(&k);
            let (identity, mut r) = match known {
                Some(t) => t,
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
                        Ok(e) => (0, enrich(&e, with)),
                        Err(_) => continue,
                    }
                }
            };
            r.count = n;
            r.first_seen = Some(crate::clock::rfc3339(crate::clock::wall_time(
                if first.0 == 0 { seen } else { first },
            )));
            r.last_seen = Some(crate::clock::rfc3339(crate::clock::wall_time(seen)));
            r.time = r.last_seen.clone().unwrap_or(r.time);
            let mut folder = lock(&self.folder);
            self.fold(&mut folder, identity, r, journal, counters);
        }
    }

    /// Decision records after sequence number `after`, optionally of one verdict.
    pub fn since(&self, after: u64, verdict: Option<&str>) -> Vec<FlowRecord> {
        lock(&self.recent).since(after, verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16, time: &str) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: time.into(),
            verdict: "deny".into(),
            reason: Some("no rule allows it".into()),
            identity: Some("spiffe://example.org/a".into()),
            owner: None,
            labels: Default::default(),
            pid: 7,
            exe: None,
            comm: "probe".into(),
            uid: 0,
            cgroup_id: 9,
            cgroup: None,
            dest: Some("192.0.2.1".parse().unwrap()),
            fqdn: None,
            port,
            direction: None,
            protocol: Some("tcp".into()),
            rule: None,
            rule_id: None,
            revision: "r".into(),
            count: 1,
            first_seen: None,
            last_seen: None,
            cmdline: None,
            unit: None,
            container: None,
            service: None,
            serial: None,
            kernel_event: None,
            server_name: None,
        }
    }

    #[test]
    fn a_run_is_written_first_once_then_as_one_total() {
        let mut f = Folder::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let first = f.fold(1, record(80, "t1"), t0);
        assert_eq!(first.len(), 1, "the first of a run is written at once");
        assert!(f.fold(1, record(80, "t2"), t0).is_empty());
        let mut third = record(80, "t3");
        third.count = 5;
        assert!(f.fold(1, third, t0).is_empty());
        // Another port is another run.
        assert_eq!(f.fold(1, record(81, "t4"), t0).len(), 1);
        assert!(f.close(t0 + Duration::from_secs(9), false).is_empty());
        let out = f.close(t0 + Duration::from_secs(10), false);
        assert_eq!(out.len(), 1, "only the run with folded flows is written");
        assert_eq!(out[0].count, 6);
        assert_eq!(out[0].first_seen.as_deref(), Some("t2"));
        assert_eq!(out[0].last_seen.as_deref(), Some("t3"));
        assert_eq!(out[0].time, "t3");
        // Closed: the next one starts a new run.
        assert_eq!(f.fold(1, record(80, "t5"), t0).len(), 1);
    }

    #[test]
    fn with_no_window_every_record_is_written() {
        let mut f = Folder::new(Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(f.fold(1, record(80, "a"), t0).len(), 1);
        assert_eq!(f.fold(1, record(80, "b"), t0).len(), 1);
        assert!(f.close(t0, true).is_empty());
    }

    #[test]
    fn too_many_runs_close_early_without_losing_a_count() {
        let mut f = Folder::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut written = 0u64;
        let mut total = 0u64;
        for i in 0..MAX_RUNS as u64 + 1 {
            for _ in 0..2 {
                let mut r = record(80, "t");
                r.cgroup_id = i;
                total += r.count;
                written += f.fold(1, r, t0).iter().map(|r| r.count).sum::<u64>();
            }
        }
        written += f.close(t0, true).iter().map(|r| r.count).sum::<u64>();
        assert_eq!(written, total);
    }

    #[test]
    fn kernel_counts_add_to_a_run_with_their_own_times() {
        let mut f = Folder::new(Duration::from_secs(10));
        let t0 = Instant::now();
        f.fold(1, record(80, "t1"), t0);
        let mut held = record(80, "t9");
        held.count = 1999;
        held.first_seen = Some("t2".into());
        held.last_seen = Some("t9".into());
        assert!(f.fold(1, held, t0).is_empty());
        let out = f.close(t0, true);
        assert_eq!(out[0].count, 1999);
        assert_eq!(out[0].first_seen.as_deref(), Some("t2"));
        assert_eq!(out[0].last_seen.as_deref(), Some("t9"));
    }
}
