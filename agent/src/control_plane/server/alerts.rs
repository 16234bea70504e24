//! Anomaly alerts over what nodes report, each identity against its own baseline: a
//! destination it never reached before (past its learning time), a burst of denials, DNS
//! that looks like a tunnel (a burst of refused queries, or long high-entropy names), and a
//! process group new to shadow AI on a node. One replica reads the records in order (a cursor
//! and lease in the store, as syslog forwarding does) and stores each alert as a record of
//! its own (`kind: alert`, node [`ALERTS_NODE`], the evidence in it) under the id of the
//! record that raised it: read again after a crash, an alert is stored once. Webhooks get
//! the stored alerts in the Alertmanager webhook format, each from its own cursor, retried
//! until they take them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde_json::{Value, json};
use tracing::{info, warn};

use super::Server;
use crate::{
    config::control_plane::Alerts,
    control_plane::{FlowQuery, Reported},
};

pub use crate::control_plane::ALERTS_NODE;

/// The kinds, in the order their ids are taken (an alert's record id is the raising
/// record's id times [`KINDS`]`.len()` plus its kind's place).
pub const KINDS: [&str; 4] = [
    "new_destination",
    "denial_burst",
    "dns_tunnel",
    "new_shadow_ai",
];

/// Identities (each with its node) followed at once, and on one node: past either a new
/// one is counted and not followed until others go quiet. Per node, so that one node
/// reporting made-up identities takes room from itself only.
const MAX_FOLLOWED: usize = 100_000;
const MAX_FOLLOWED_PER_NODE: usize = 10_000;
/// How far ahead of this replica's clock a record's time is believed: a time further ahead
/// (a clock far off, or a record made up to hold a window open) counts as that.
const AHEAD_SECS: i64 = 300;
/// Records read at a time.
const PAGE: u32 = 500;
const LEASE: Duration = Duration::from_secs(30);
const IDLE: Duration = Duration::from_millis(500);
const RETRY: Duration = Duration::from_secs(2);
/// How often followed identities gone quiet are forgotten.
const SWEEP_SECS: i64 = 10;

/// A raised alert, as stored and sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub kind: usize,
    /// The raising record's time (RFC 3339), no further ahead than this replica believes.
    pub time: String,
    /// The identity (or, for shadow AI, the node) it is about.
    pub subject: String,
    pub node: String,
    pub summary: String,
    pub evidence: Value,
    /// What makes it the same alert again (the webhook's fingerprint).
    pub key: String,
    /// The baseline entry it noted as seen, taken back when it is held back.
    noted: Option<(String, String)>,
}

impl Alert {
    /// The record stored for it.
    pub fn record(&self) -> Value {
        let kind = KINDS[self.kind];
        let mut r = json!({
            "kind": "alert",
            "time": self.time,
            "alert": kind,
            "severity": if kind == "denial_burst" || kind == "dns_tunnel" { "warning" } else { "info" },
            "node": self.node,
            "summary": self.summary,
            "evidence": self.evidence,
            "fingerprint": fingerprint(&self.key),
        });
        if kind == "new_shadow_ai" {
            r["subject"] = json!(self.subject);
        } else {
            r["identity"] = json!(self.subject);
        }
        r
    }
}

fn fingerprint(key: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(key.as_bytes())[..8])
}

/// Counts per second over a sliding window.
#[derive(Clone, Default)]
struct Window {
    seconds: VecDeque<(i64, u64)>,
    sum: u64,
    /// The time of the last alert: one per window.
    fired: Option<i64>,
}

impl Window {
    /// Adds `n` at `t`; whether the window's sum reached `threshold` now, an alert not yet
    /// raised for it. A record older than the newest counted counts as of the newest: the
    /// window only moves forward.
    fn add(&mut self, t: i64, n: u64, window: i64, threshold: u64) -> bool {
        let t = self.seconds.back().map_or(t, |(s, _)| t.max(*s));
        match self.seconds.back_mut() {
            Some((s, c)) if *s == t => *c = c.saturating_add(n),
            _ => self.seconds.push_back((t, n)),
        }
        self.sum = self.sum.saturating_add(n);
        while let Some(&(s, c)) = self.seconds.front() {
            if s > t - window {
                break;
            }
            self.seconds.pop_front();
            self.sum -= c.min(self.sum);
        }
        let quiet = self.fired.is_none_or(|f| t - f >= window);
        if self.sum >= threshold && quiet {
            self.fired = Some(t);
            return true;
        }
        false
    }
}

/// What is followed of one identity on one node.
#[derive(Clone, Default)]
struct Followed {
    denials: Window,
    refusals: Window,
    /// The last name-based DNS alert: one per window.
    named: Option<i64>,
    /// When a record last touched it (this replica's clock): forgotten once quiet for
    /// longer than its windows.
    touched: i64,
}

/// Alerts of one kind in one minute: about one subject (by the records' minutes, never
/// back) or from one node (by this replica's clock).
#[derive(Clone, Copy, Default)]
struct Limit {
    minute: i64,
    raised: u64,
    /// Held back since the last one raised: told with the next.
    held_back: u64,
}

/// Per-key state whose changes since the last [`Undoable::commit`] can be taken back: the
/// detector's state moves with the records of a page, and a page whose alerts could not be
/// stored is read again, from the state before it.
struct Undoable<K, V> {
    map: HashMap<K, V>,
    undo: Vec<(K, Option<V>)>,
}

impl<K: Clone + Eq + std::hash::Hash, V: Clone> Undoable<K, V> {
    fn new() -> Self {
        Undoable {
            map: HashMap::new(),
            undo: Vec::new(),
        }
    }

    /// `k`'s value, made by `make` when it has none, to change.
    fn modify(&mut self, k: &K, make: impl FnOnce() -> V) -> &mut V {
        let old = self.map.get(k).cloned();
        self.undo.push((k.clone(), old));
        self.map.entry(k.clone()).or_insert_with(make)
    }

    fn remove(&mut self, k: &K) {
        if let Some(v) = self.map.remove(k) {
            self.undo.push((k.clone(), Some(v)));
        }
    }

    fn rollback(&mut self) {
        while let Some((k, v)) = self.undo.pop() {
            match v {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }

    fn commit(&mut self) {
        self.undo.clear();
    }
}

/// The baseline as a page of records sees it: what the store held before the page, and
/// what the page saw since (noted in the store once the page's alerts are stored).
#[derive(Default)]
pub struct PageBaseline {
    held: crate::control_plane::store::Baseline,
    pub noted: Vec<(String, String, String)>,
}

impl PageBaseline {
    pub fn new(held: crate::control_plane::store::Baseline) -> Self {
        PageBaseline {
            held,
            noted: Vec::new(),
        }
    }

    /// Sees `subject` with `what` at `time`: whether that is new, and since when the
    /// subject has a baseline.
    fn see(&mut self, subject: &str, what: &str, time: &str) -> (bool, String) {
        let start = self
            .held
            .entry((subject.to_owned(), String::new()))
            .or_insert_with(|| time.to_owned());
        if time < start.as_str() {
            *start = time.to_owned();
        }
        let since = start.clone();
        let new = !self
            .held
            .contains_key(&(subject.to_owned(), what.to_owned()));
        if new {
            self.held
                .insert((subject.to_owned(), what.to_owned()), time.to_owned());
        }
        self.noted
            .push((subject.to_owned(), String::new(), time.to_owned()));
        self.noted
            .push((subject.to_owned(), what.to_owned(), time.to_owned()));
        (new, since)
    }

    /// Takes back [`PageBaseline::see`] of `what` just now: it is new again.
    fn unsee(&mut self, subject: &str, what: &str) {
        self.held.remove(&(subject.to_owned(), what.to_owned()));
        if let Some(i) = self
            .noted
            .iter()
            .rposition(|(s, w, _)| s == subject && w == what)
        {
            self.noted.remove(i);
        }
    }
}

/// The baseline entry `r` (a record of `node`) looks up, if any: (subject, what). An
/// identity's baseline is its own on each node: a node's records speak for what runs on it
/// only.
pub fn baseline_key(node: &str, r: &crate::audit::RecordView<'_>) -> Option<(String, String)> {
    let kind = r.text("kind").unwrap_or_else(|| "decision".into());
    if kind != "decision" {
        return None;
    }
    match (identity_of(r), r.text("verdict").as_deref()) {
        (Some(id), Some("allow" | "audit")) => crate::review::destination_of(r)
            .0
            .map(|d| (format!("{id} {node}"), format!("dest {d}"))),
        (None, Some("unknown")) if r.text("service").is_some() => Some((
            node.to_owned(),
            format!("shadow {}", crate::discovery::group_of(r)),
        )),
        _ => None,
    }
}

/// Only what a review can stand behind: a SPIFFE ID, bounded.
fn identity_of(r: &crate::audit::RecordView<'_>) -> Option<String> {
    r.text("identity")
        .filter(|i| i.parse::<crate::identity::AgentId>().is_ok())
}

/// The alert rules, over records one at a time in the order they were stored.
pub struct Detector {
    cfg: Alerts,
    followed: Undoable<(String, String), Followed>,
    /// Followed identities per node.
    per_node: HashMap<String, usize>,
    /// Per (node, subject, kind): `per_minute` by the records' minutes, so a backlog sent
    /// at once is judged as it happened and one noisy identity holds back only its own.
    limits: Undoable<(String, String, usize), Limit>,
    /// Per (node, kind): `node_per_minute` by this replica's clock, whatever the records
    /// say of their times or identities.
    ceilings: Undoable<(String, usize), Limit>,
    last_sweep: i64,
    /// Identities past [`MAX_FOLLOWED`] or [`MAX_FOLLOWED_PER_NODE`], not followed.
    pub left_out: u64,
    left_out_before: u64,
    /// Alerts held back by the per-node limit.
    pub held_back: u64,
    held_back_before: u64,
}

impl Detector {
    pub fn new(cfg: Alerts) -> Self {
        Detector {
            cfg,
            followed: Undoable::new(),
            per_node: HashMap::new(),
            limits: Undoable::new(),
            ceilings: Undoable::new(),
            last_sweep: 0,
            left_out: 0,
            left_out_before: 0,
            held_back: 0,
            held_back_before: 0,
        }
    }

    /// Identities followed now.
    pub fn followed(&self) -> usize {
        self.followed.map.len()
    }

    /// Keeps what the records since the last commit changed.
    pub fn commit(&mut self) {
        self.followed.commit();
        self.limits.commit();
        self.ceilings.commit();
        self.left_out_before = self.left_out;
        self.held_back_before = self.held_back;
    }

    /// Takes back what the records since the last commit changed: they will be read again.
    pub fn rollback(&mut self) {
        self.followed.rollback();
        self.limits.rollback();
        self.ceilings.rollback();
        self.left_out = self.left_out_before;
        self.held_back = self.held_back_before;
        self.per_node.clear();
        for (node, _) in self.followed.map.keys() {
            *self.per_node.entry(node.clone()).or_default() += 1;
        }
    }

    /// Forgets identities quiet for longer than their windows, and past minutes' limits.
    fn sweep(&mut self, now: i64) {
        if now - self.last_sweep < SWEEP_SECS {
            return;
        }
        self.last_sweep = now;
        let quiet = self.cfg.denial_window_secs.max(self.cfg.dns_window_secs) as i64 + AHEAD_SECS;
        let gone: Vec<(String, String)> = self
            .followed
            .map
            .iter()
            .filter(|(_, f)| now - f.touched > quiet)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.followed.remove(k);
            if let Some(n) = self.per_node.get_mut(&k.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_node.remove(&k.0);
                }
            }
        }
        // A subject's minute is its records': one held back an hour ago is told no more
        // (the metric counted it).
        let old: Vec<(String, String, usize)> = self
            .limits
            .map
            .iter()
            .filter(|(_, l)| {
                l.minute < now / 60 - 1 && (l.held_back == 0 || l.minute < now / 60 - 60)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.limits.remove(k);
        }
        let old: Vec<(String, usize)> = self
            .ceilings
            .map
            .iter()
            .filter(|(_, l)| l.minute < now / 60 - 1 && l.held_back == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.ceilings.remove(k);
        }
    }

    /// What is followed of `id` on `node`, made when there is room.
    fn follow(&mut self, node: &str, id: &str, now: i64) -> Option<&mut Followed> {
        let key = (node.to_owned(), id.to_owned());
        if !self.followed.map.contains_key(&key) {
            let on_node = self.per_node.get(node).copied().unwrap_or(0);
            if self.followed.map.len() >= MAX_FOLLOWED || on_node >= MAX_FOLLOWED_PER_NODE {
                self.left_out += 1;
                return None;
            }
            *self.per_node.entry(node.to_owned()).or_default() += 1;
        }
        let f = self.followed.modify(&key, Followed::default);
        f.touched = now;
        Some(f)
    }

    /// Whether `a` (from `node`, dated `t`) is raised: at most `per_minute` a minute of
    /// its kind about its subject, and `node_per_minute` a minute of this replica's clock
    /// of its kind from its node. How many were held back before it (of its subject, of its
    /// node) when it is.
    fn allowed(&mut self, node: &str, a: &Alert, t: i64, now: i64) -> Option<(u64, u64)> {
        let (per_minute, per_node) = (self.cfg.per_minute, self.cfg.node_per_minute);
        let c = self
            .ceilings
            .modify(&(node.to_owned(), a.kind), Limit::default);
        if c.minute != now / 60 {
            c.minute = now / 60;
            c.raised = 0;
        }
        if c.raised >= per_node {
            c.held_back += 1;
            self.held_back += 1;
            return None;
        }
        let l = self.limits.modify(
            &(node.to_owned(), a.subject.clone(), a.kind),
            Limit::default,
        );
        // Records older than the minute counted count in it: going back would start the
        // count again.
        if t / 60 > l.minute {
            l.minute = t / 60;
            l.raised = 0;
        }
        if l.raised >= per_minute {
            l.held_back += 1;
            self.held_back += 1;
            return None;
        }
        l.raised += 1;
        let subject = std::mem::take(&mut l.held_back);
        let c = self
            .ceilings
            .modify(&(node.to_owned(), a.kind), Limit::default);
        c.raised += 1;
        Some((subject, std::mem::take(&mut c.held_back)))
    }

    /// The alerts `r` (a record of `node`) raises, at `now` (this replica's clock, Unix
    /// seconds); `baseline` is the page's view of the store's.
    pub fn observe(
        &mut self,
        node: &str,
        r: &crate::audit::RecordView<'_>,
        now: i64,
        baseline: &mut PageBaseline,
    ) -> Vec<Alert> {
        self.sweep(now);
        let mut out = self.rules(node, r, now, baseline);
        out.retain_mut(|a| {
            let t = crate::clock::parse_rfc3339(&a.time).map_or(now, |t| t.unix_timestamp());
            match self.allowed(node, a, t, now) {
                None => {
                    // Not noted as seen: the destination or group alerts when next seen.
                    if let Some((subject, what)) = &a.noted {
                        baseline.unsee(subject, what);
                    }
                    false
                }
                Some((subject, of_node)) => {
                    if subject > 0 {
                        a.evidence["held_back_before"] = json!(subject);
                    }
                    if of_node > 0 {
                        a.evidence["node_held_back_before"] = json!(of_node);
                    }
                    true
                }
            }
        });
        out
    }

    fn rules(
        &mut self,
        node: &str,
        r: &crate::audit::RecordView<'_>,
        now: i64,
        baseline: &mut PageBaseline,
    ) -> Vec<Alert> {
        let text = |k: &str| r.text(k);
        let Some(t) = text("time")
            .and_then(|time| crate::clock::parse_rfc3339(&time).ok())
            .map(|t| t.unix_timestamp().min(now + AHEAD_SECS))
        else {
            return Vec::new();
        };
        let time = crate::clock::rfc3339(
            std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)),
        );
        let kind = text("kind").unwrap_or_else(|| "decision".into());
        let count = r.u64("count").unwrap_or(1).max(1);
        let identity = identity_of(r);
        let mut out = Vec::new();
        let alert =
            |kind: usize, subject: &str, summary: String, evidence: Value, key: String| Alert {
                kind,
                time: time.clone(),
                subject: subject.to_owned(),
                node: node.to_owned(),
                summary,
                evidence,
                key,
                noted: None,
            };
        let cfg = self.cfg.clone();
        match (kind.as_str(), identity.as_deref()) {
            ("decision", Some(id)) => match text("verdict").as_deref() {
                Some("deny") => {
                    let window = cfg.denial_window_secs as i64;
                    if let Some(f) = self.follow(node, id, now)
                        && f.denials.add(t, count, window, cfg.denials)
                    {
                        out.push(alert(
                            1,
                            id,
                            format!("{id}: {} denials within {window} s", f.denials.sum),
                            json!({
                                "denials": f.denials.sum, "window_secs": window,
                                "last_dest": text("dest"), "last_port": r.u64("port"),
                                "last_reason": text("reason"),
                            }),
                            format!("denial_burst|{node}|{id}|{t}"),
                        ));
                    }
                }
                Some("allow" | "audit") => {
                    if let Some((subject, what)) = baseline_key(node, r) {
                        let dest = what.trim_start_matches("dest ");
                        let (new, since) = baseline.see(&subject, &what, &time);
                        let learned = crate::clock::parse_rfc3339(&since)
                            .map(|f| (t - f.unix_timestamp()) as f64 / 3600.0)
                            .unwrap_or(0.0);
                        if new && learned >= cfg.learning_hours {
                            out.push(alert(
                                0,
                                id,
                                format!(
                                    "{id} reached {dest}, a destination it never reached before"
                                ),
                                json!({
                                    "destination": dest, "dest": text("dest"),
                                    "port": r.u64("port"), "protocol": text("protocol"),
                                    "verdict": text("verdict"),
                                    "baseline_since": since,
                                }),
                                format!("new_destination|{node}|{id}|{dest}"),
                            ));
                            if let Some(a) = out.last_mut() {
                                a.noted = Some((subject.clone(), what.clone()));
                            }
                        }
                    }
                }
                _ => {}
            },
            ("dns", Some(id)) => {
                let event = text("event").unwrap_or_default();
                let window = cfg.dns_window_secs as i64;
                let refused = matches!(event.as_str(), "query_refused" | "query_would_refuse");
                let tunnel = text("name").and_then(|name| {
                    tunnel_like(&name, cfg.dns_label_length, cfg.dns_entropy_bits)
                        .map(|(label, bits)| (name, label, bits))
                });
                if (refused || tunnel.is_some())
                    && let Some(f) = self.follow(node, id, now)
                {
                    if refused && f.refusals.add(t, count, window, cfg.dns_refusals) {
                        out.push(alert(
                            2,
                            id,
                            format!(
                                "{id}: {} refused DNS queries within {window} s",
                                f.refusals.sum
                            ),
                            json!({
                                "refused_queries": f.refusals.sum, "window_secs": window,
                                "last_name": text("name"), "last_type": text("type"),
                            }),
                            format!("dns_tunnel|refused|{node}|{id}|{t}"),
                        ));
                    }
                    if let Some((name, label, bits)) = tunnel
                        && f.named.is_none_or(|last| t - last >= window)
                    {
                        f.named = Some(f.named.map_or(t, |last| t.max(last)));
                        out.push(alert(
                            2,
                            id,
                            format!("{id} queried a long, high-entropy name: {name}"),
                            json!({
                                "name": name, "longest_label": label,
                                "entropy_bits_per_char": (bits * 100.0).round() / 100.0,
                                "event": event,
                            }),
                            format!("dns_tunnel|name|{node}|{id}|{t}"),
                        ));
                    }
                }
            }
            ("decision", None) => {
                if let Some((subject, what)) = baseline_key(node, r) {
                    let group = what.trim_start_matches("shadow ");
                    let (new, _) = baseline.see(&subject, &what, &time);
                    if new {
                        out.push(alert(
                            3,
                            node,
                            format!(
                                "{node}: {group} talks to {}, new shadow AI",
                                text("service").unwrap_or_default()
                            ),
                            json!({
                                "group": group, "service": text("service"), "dest": text("dest"),
                                "port": r.u64("port"), "exe": text("exe"),
                            }),
                            format!("new_shadow_ai|{node}|{group}"),
                        ));
                        if let Some(a) = out.last_mut() {
                            a.noted = Some((subject.clone(), what.clone()));
                        }
                    }
                }
            }
            _ => {}
        }
        out
    }
}

/// Whether `name` looks like data carried in DNS: a label at least `min_label` long, and
/// the labels below the last two carrying at least `min_bits` of entropy per character.
/// (the longest label's length, the bits) when it does.
pub fn tunnel_like(name: &str, min_label: usize, min_bits: f64) -> Option<(usize, f64)> {
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    let longest = labels.iter().map(|l| l.len()).max()?;
    if longest < min_label || labels.len() < 3 {
        return None;
    }
    let data: Vec<u8> = labels[..labels.len() - 2]
        .iter()
        .flat_map(|l| l.bytes())
        .map(|b| b.to_ascii_lowercase())
        .collect();
    let mut counts = [0u32; 256];
    for b in &data {
        counts[*b as usize] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum();
    (bits >= min_bits).then_some((longest, bits))
}

/// Reads what nodes report and stores the alerts it raises, for as long as the process
/// runs.
pub async fn detect(server: Arc<Server>, cfg: Alerts) {
    let holder = super::replica_id();
    let detector = Arc::new(std::sync::Mutex::new(Detector::new(cfg)));
    let mut failing: Option<String> = None;
    let mut holding = false;
    loop {
        let turn = detect_page(&server, holder, &detector).await;
        match turn {
            Ok(read) => {
                failing = None;
                if read.is_some() != holding {
                    holding = read.is_some();
                    if holding {
                        info!("raising alerts over the records stored from now on");
                    }
                }
                if read.unwrap_or(0) == 0 {
                    tokio::time::sleep(IDLE).await;
                }
            }
            Err(e) => {
                server.stats.alert_failures.fetch_add(1, Ordering::Relaxed);
                if failing.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "raising alerts failed; retrying from where it got");
                    failing = Some(e);
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// One page of records: the alerts they raise stored, then what they added to the
/// baseline, then the cursor moved past them, so that a crash or a failure anywhere reads
/// the page again from the same state (an alert's record id is fixed by the record that
/// raised it: stored twice, it is one). How many were read; None while another replica
/// raises alerts.
async fn detect_page(
    server: &Arc<Server>,
    holder: &str,
    detector: &Arc<std::sync::Mutex<Detector>>,
) -> Result<Option<usize>, String> {
    let (store, h) = (server.store.clone(), holder.to_owned());
    let (claim, behind) = super::store_call(move || {
        let claim = store.forward_claim("alerts", &h, LEASE)?;
        Ok((claim, store.forward_behind("alerts")?))
    })
    .await?;
    server
        .stats
        .alerts_behind
        .store(behind.unwrap_or(0), Ordering::Relaxed);
    let Some(after) = claim else {
        return Ok(None);
    };
    let (store, h, d) = (server.store.clone(), holder.to_owned(), detector.clone());
    let s = server.clone();
    let raised = super::store_call(move || {
        let page = store.flows(&FlowQuery {
            after: Some(after),
            limit: Some(PAGE),
            every_kind: true,
            ..FlowQuery::default()
        })?;
        let Some(last) = page.flows.last().map(|f| f.id) else {
            return Ok((Some(0), Vec::new()));
        };
        // Read from the stored text: only the fields the detector looks at.
        let records: Vec<(&str, u64, crate::audit::RecordView<'_>)> = page
            .flows
            .iter()
            .filter(|f| f.node != ALERTS_NODE)
            .filter_map(|f| {
                crate::audit::RecordView::parse(f.record.get()).map(|r| (f.node.as_str(), f.id, r))
            })
            .collect();
        let keys: Vec<(String, String)> = records
            .iter()
            .filter_map(|(node, _, r)| baseline_key(node, r))
            .flat_map(|(s, w)| [(s.clone(), String::new()), (s, w)])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut baseline = PageBaseline::new(store.baseline(&keys)?);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut raised = Vec::new();
        let mut batch = Vec::new();
        for (node, id, r) in &records {
            for a in d.observe(node, r, now, &mut baseline) {
                let rid = id * KINDS.len() as u64 + a.kind as u64;
                batch.push(Reported {
                    rid,
                    record: serde_json::value::RawValue::from_string(a.record().to_string())
                        .expect("JSON"),
                });
                raised.push(a.kind);
            }
        }
        let stored = (|| {
            if !batch.is_empty() {
                store.ingest(ALERTS_NODE, 0, &batch)?;
            }
            if !baseline.noted.is_empty() {
                store.baseline_note(&baseline.noted, &crate::clock::now_rfc3339()[..10])?;
            }
            store.forward_advance("alerts", &h, last)
        })();
        match stored {
            Ok(true) => {
                d.commit();
                let st = &s.stats;
                st.alerts_following
                    .store(d.followed() as u64, Ordering::Relaxed);
                st.alerts_left_out.store(d.left_out, Ordering::Relaxed);
                st.alerts_held_back.store(d.held_back, Ordering::Relaxed);
                Ok((Some(page.flows.len()), raised))
            }
            // Taken over: the other replica reads these again and stores each alert once.
            Ok(false) => {
                d.rollback();
                Ok((None, Vec::new()))
            }
            Err(e) => {
                d.rollback();
                Err(e)
            }
        }
    })
    .await?;
    for k in &raised.1 {
        server.stats.alerts[*k].fetch_add(1, Ordering::Relaxed);
    }
    if !raised.1.is_empty() {
        info!(alerts = raised.1.len(), "alerts raised");
    }
    Ok(raised.0)
}

/// Sends the stored alerts to one webhook, in the Alertmanager webhook format, for as long
/// as the process runs: a page at a time, again until it answers 2xx.
pub async fn deliver(server: Arc<Server>, hook: Webhook) {
    let holder = super::replica_id();
    let name = format!("webhook {}", hook.url);
    let mut failing: Option<String> = None;
    let mut wait = RETRY;
    let mut holding = false;
    loop {
        match deliver_page(&server, holder, &name, &hook).await {
            Ok(sent) => {
                wait = RETRY;
                if failing.take().is_some() {
                    info!(webhook = %hook.shown, "alerts reach the webhook again");
                }
                if sent.is_some() != holding {
                    holding = sent.is_some();
                    if holding {
                        info!(webhook = %hook.shown, "sending the alerts raised from now on to the webhook");
                    }
                }
                if sent.unwrap_or(0) == 0 {
                    tokio::time::sleep(IDLE).await;
                }
            }
            Err(e) => {
                server
                    .stats
                    .alert_deliveries_failed
                    .fetch_add(1, Ordering::Relaxed);
                if failing.as_deref() != Some(e.as_str()) {
                    warn!(webhook = %hook.shown, error = %e, "sending alerts failed; retrying");
                    failing = Some(e);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

async fn deliver_page(
    server: &Arc<Server>,
    holder: &str,
    name: &str,
    hook: &Webhook,
) -> Result<Option<usize>, String> {
    let (store, h, n) = (server.store.clone(), holder.to_owned(), name.to_owned());
    let Some(after) = super::store_call(move || store.forward_claim(&n, &h, LEASE)).await? else {
        return Ok(None);
    };
    let store = server.store.clone();
    let page = super::store_call(move || {
        store.flows(&FlowQuery {
            node: Some(ALERTS_NODE.into()),
            kind: Some("alert".into()),
            after: Some(after),
            limit: Some(100),
            ..FlowQuery::default()
        })
    })
    .await?;
    let Some(last) = page.flows.last().map(|f| f.id) else {
        return Ok(Some(0));
    };
    let alerts: Vec<Value> = page
        .flows
        .iter()
        .filter_map(|f| f.value())
        .map(|r| alertmanager_alert(&r))
        .collect();
    let body = json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"agentwall\"}",
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "agentwall",
        "groupLabels": {},
        "commonLabels": { "source": "agentwall" },
        "commonAnnotations": {},
        "externalURL": "",
        "alerts": alerts,
    });
    hook.post(body.to_string()).await?;
    let (store, h, n) = (server.store.clone(), holder.to_owned(), name.to_owned());
    let kept = super::store_call(move || store.forward_advance(&n, &h, last)).await?;
    server
        .stats
        .alerts_delivered
        .fetch_add(alerts.len() as u64, Ordering::Relaxed);
    Ok(kept.then_some(page.flows.len()))
}

/// One stored alert as an Alertmanager alert.
fn alertmanager_alert(r: &Value) -> Value {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
    let mut labels = json!({
        "alertname": format!("agentwall_{}", s("alert")),
        "severity": s("severity"),
        "node": s("node"),
        "source": "agentwall",
    });
    if let Some(i) = r.get("identity").and_then(Value::as_str) {
        labels["identity"] = json!(i);
    }
    json!({
        "status": "firing",
        "labels": labels,
        "annotations": {
            "summary": s("summary"),
            "evidence": r.get("evidence").map(Value::to_string).unwrap_or_default(),
        },
        "startsAt": s("time"),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "",
        "fingerprint": s("fingerprint"),
    })
}

/// Where alerts are POSTed.
pub struct Webhook {
    url: String,
    host: String,
    port: u16,
    path: String,
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The URL without its query (which may hold a secret), for logs.
    shown: String,
}

impl Webhook {
    /// Settled at start: a CA that cannot be read stops it.
    pub fn new(url: &str, ca: Option<&std::path::Path>) -> Result<Self, String> {
        let u: hyper::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let host = u
            .host()
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = u.scheme_str() == Some("https");
        let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let ca = ca.ok_or("an https webhook needs alerts.webhook_ca")?;
            let roots = crate::pem::roots([ca]).map_err(|e| e.to_string())?;
            let cfg = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?}: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        Ok(Webhook {
            url: url.to_owned(),
            authority: u.authority().map(|a| a.to_string()).unwrap_or_default(),
            path: u
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
            shown: format!(
                "{}://{}{}",
                u.scheme_str().unwrap_or("http"),
                u.authority().map(|a| a.as_str()).unwrap_or_default(),
                u.path()
            ),
            host,
            port,
            tls,
        })
    }

    async fn post(&self, body: String) -> Result<(), String> {
        let send = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let req = hyper::Request::post(self.path.as_str())
                .header(hyper::header::HOST, self.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let status = match &self.tls {
                Some((tls, name)) => {
                    let s = tls
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS: {e}"))?;
                    send_on(hyper_util::rt::TokioIo::new(s), req).await?
                }
                None => send_on(hyper_util::rt::TokioIo::new(tcp), req).await?,
            };
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the webhook answered {status}"))
            }
        };
        tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .map_err(|_| "no answer within 30 s".to_owned())?
    }
}

async fn send_on<I>(
    io: I,
    req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<hyper::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_names_are_long_and_random_and_ordinary_ones_are_not() {
        let tunnel = "mzxw6ytboi2dqnrvgq3dmnzxha4tsmjqgeztcnbvgy3tqobzha.t.attacker.example";
        let (label, bits) = tunnel_like(tunnel, 40, 3.5).unwrap();
        assert!(label >= 40 && bits >= 3.5, "{label} {bits}");
        for ordinary in [
            "api.anthropic.com",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            "example.com",
        ] {
            assert_eq!(tunnel_like(ordinary, 40, 3.5), None, "{ordinary}");
        }
    }

    #[test]
    fn a_burst_alerts_once_a_window() {
        let mut w = Window::default();
        let fired: Vec<bool> = (0..30).map(|t| w.add(t, 1, 60, 20)).collect();
        assert_eq!(fired.iter().filter(|f| **f).count(), 1);
        assert!(fired[19]);
        // Quiet for a window, then another burst: another alert.
        assert!(!w.add(200, 1, 60, 20));
        assert!((201..220).any(|t| w.add(t, 1, 60, 20)));
    }

    const NOW: i64 = 1_800_000_000;

    fn at(t: i64) -> String {
        crate::clock::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(t as u64))
    }

    fn denial(id: &str, t: i64) -> String {
        json!({"time": at(t), "verdict": "deny", "identity": id, "dest": "203.0.113.9"}).to_string()
    }

    /// Feeds `records` of `node` (record text) to `d` at `now`: the kinds raised.
    fn feed(d: &mut Detector, node: &str, records: &[String], now: i64) -> Vec<usize> {
        let mut b = PageBaseline::default();
        records
            .iter()
            .flat_map(|r| {
                let v = crate::audit::RecordView::parse(r).unwrap();
                d.observe(node, &v, now, &mut b)
            })
            .map(|a| a.kind)
            .collect()
    }

    fn cfg() -> Alerts {
        Alerts {
            denials: 5,
            ..Alerts::default()
        }
    }

    #[test]
    fn a_page_taken_back_leaves_the_detector_as_it_was() {
        let a = "spiffe://example.org/a";
        let mut d = Detector::new(cfg());
        let four: Vec<String> = (0..4).map(|i| denial(a, NOW + i)).collect();
        assert!(feed(&mut d, "n1", &four, NOW).is_empty());
        d.commit();
        // A page of two more reaches the threshold, but could not be stored: read again,
        // it raises the alert once, not never (window marked fired) nor twice.
        let two: Vec<String> = (4..6).map(|i| denial(a, NOW + i)).collect();
        assert_eq!(feed(&mut d, "n1", &two, NOW), [1]);
        d.rollback();
        assert_eq!(feed(&mut d, "n1", &two, NOW), [1]);
        d.commit();
        assert_eq!(d.followed(), 1);
    }

    #[test]
    fn made_up_identities_take_room_from_their_own_node_only_and_are_forgotten_when_quiet() {
        let mut d = Detector::new(cfg());
        let flood: Vec<String> = (0..MAX_FOLLOWED_PER_NODE + 5)
            .map(|i| denial(&format!("spiffe://example.org/fake{i}"), NOW))
            .collect();
        feed(&mut d, "evil", &flood, NOW);
        d.commit();
        assert_eq!(d.followed(), MAX_FOLLOWED_PER_NODE);
        assert_eq!(d.left_out, 5);
        // Another node's identity is followed and alerts as before.
        let real: Vec<String> = (0..5)
            .map(|i| denial("spiffe://example.org/real", NOW + i))
            .collect();
        assert_eq!(feed(&mut d, "n1", &real, NOW), [1]);
        // Quiet past the windows: forgotten, room again.
        let later = NOW + 3600;
        feed(
            &mut d,
            "n1",
            &[denial("spiffe://example.org/real", later)],
            later,
        );
        assert_eq!(d.followed(), 1);
    }

    #[test]
    fn a_time_far_ahead_counts_as_now_and_cannot_hold_a_window_open() {
        let a = "spiffe://example.org/a";
        let mut d = Detector::new(cfg());
        // A burst dated in 2100 fires once, as of (at most) a few minutes ahead ...
        let ahead: Vec<String> = (0..5).map(|_| denial(a, 4_102_444_800)).collect();
        assert_eq!(feed(&mut d, "n1", &ahead, NOW), [1]);
        // ... so a real burst an hour later alerts again.
        let later = NOW + 3600;
        let burst: Vec<String> = (0..5).map(|i| denial(a, later + i)).collect();
        assert_eq!(feed(&mut d, "n1", &burst, later), [1]);
    }

    /// A record of `id` reaching `dest` at `t`.
    fn reached(id: &str, t: i64, dest: &str) -> String {
        json!({"time": at(t), "verdict": "allow", "identity": id, "dest": dest}).to_string()
    }

    #[test]
    fn each_identity_raises_at_most_per_minute_of_a_kind_by_its_records_minutes() {
        let cfg = Alerts {
            learning_hours: 0.0,
            per_minute: 3,
            ..Alerts::default()
        };
        let mut d = Detector::new(cfg.clone());
        let (noisy, quiet) = ("spiffe://example.org/noisy", "spiffe://example.org/quiet");
        // Ten new destinations of one identity in one minute: 3 raised, 7 held back ...
        let many: Vec<String> = (0..10)
            .map(|i| reached(noisy, NOW + i, &format!("203.0.113.{i}")))
            .collect();
        assert_eq!(feed(&mut d, "n1", &many, NOW + 10).len(), 3);
        assert_eq!(d.held_back, 7);
        // ... which holds back neither a neighbour nor another node.
        let other = reached(quiet, NOW + 10, "203.0.113.1");
        assert_eq!(feed(&mut d, "n1", &[other], NOW + 10).len(), 1);
        assert_eq!(feed(&mut d, "n2", &many[..1], NOW + 10).len(), 1);
        // The next one of it, a minute later by its records, tells how many were held.
        let next = reached(noisy, NOW + 70, "203.0.113.100");
        let r = crate::audit::RecordView::parse(&next).unwrap();
        let a = d.observe("n1", &r, NOW + 70, &mut PageBaseline::default());
        assert_eq!(a[0].evidence["held_back_before"], 7);
        // A backlog of an hour sent at once is judged by the minutes it happened in: three
        // a minute of it, not three in all.
        let mut d = Detector::new(cfg);
        let hour: Vec<String> = (0..60)
            .flat_map(|m| {
                (0..5).map(move |i| reached(noisy, NOW + m * 60 + i, &format!("10.{m}.0.{i}")))
            })
            .collect();
        assert_eq!(feed(&mut d, "n1", &hour, NOW + 3600).len(), 180);
        // Records dated back in an earlier minute count in the latest: no new allowance.
        let back: Vec<String> = (0..5)
            .map(|i| reached(noisy, NOW + i, &format!("198.51.100.{i}")))
            .collect();
        assert_eq!(feed(&mut d, "n1", &back, NOW + 3600).len(), 0);
    }

    #[test]
    fn one_node_raises_at_most_node_per_minute_of_a_kind_whatever_its_records_say() {
        let mut d = Detector::new(Alerts {
            denials: 1,
            per_minute: 3,
            node_per_minute: 5,
            ..Alerts::default()
        });
        // Made-up identities and times: at most 5 a minute of the control plane's clock.
        let made_up: Vec<String> = (0..50)
            .map(|i| denial(&format!("spiffe://example.org/a{i}"), NOW - i * 600))
            .collect();
        assert_eq!(feed(&mut d, "n1", &made_up, NOW).len(), 5);
        assert_eq!(d.held_back, 45);
        assert_eq!(feed(&mut d, "n2", &made_up[..1], NOW).len(), 1);
        let next = denial("spiffe://example.org/b", NOW + 60);
        let r = crate::audit::RecordView::parse(&next).unwrap();
        let a = d.observe("n1", &r, NOW + 60, &mut PageBaseline::default());
        assert_eq!(a[0].evidence["node_held_back_before"], 45);
    }

    #[test]
    fn a_new_destination_held_back_alerts_when_next_reached() {
        let id = "spiffe://example.org/a";
        let allow = |t: i64, dest: &str| reached(id, t, dest);
        let mut d = Detector::new(Alerts {
            learning_hours: 0.0,
            per_minute: 1,
            ..Alerts::default()
        });
        let mut b = PageBaseline::default();
        let mut see = |t: i64, dest: &str, b: &mut PageBaseline| {
            let text = allow(t, dest);
            let r = crate::audit::RecordView::parse(&text).unwrap();
            d.observe("n1", &r, t, b).len()
        };
        assert_eq!(see(NOW, "203.0.113.1", &mut b), 1);
        assert_eq!(see(NOW + 1, "203.0.113.2", &mut b), 0);
        assert!(
            !b.noted.iter().any(|(_, w, _)| w.ends_with("203.0.113.2")),
            "{:?}",
            b.noted
        );
        assert_eq!(see(NOW + 61, "203.0.113.2", &mut b), 1);
        assert_eq!(see(NOW + 62, "203.0.113.2", &mut b), 0);
    }

    #[test]
    fn an_identity_baseline_is_its_own_on_each_node() {
        let id = "spiffe://example.org/a";
        let allow = |t: i64, dest: &str| {
            json!({"time": at(t), "verdict": "allow", "identity": id, "dest": dest}).to_string()
        };
        let mut d = Detector::new(Alerts {
            learning_hours: 1.0,
            ..Alerts::default()
        });
        let mut b = PageBaseline::default();
        let mut see = |node: &str, t: i64, dest: &str| {
            let text = allow(t, dest);
            let r = crate::audit::RecordView::parse(&text).unwrap();
            d.observe(node, &r, t, &mut b).len()
        };
        assert_eq!(see("n1", NOW, "203.0.113.1"), 0);
        // Another node seeing the destination first does not make it known on n1.
        assert_eq!(see("evil", NOW + 7200, "203.0.113.2"), 0);
        assert_eq!(see("n1", NOW + 7200, "203.0.113.2"), 1);
        assert_eq!(see("n1", NOW + 7300, "203.0.113.2"), 0);
    }
}
