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
    control_plane::{FlowQuery, Reported, store::Store},
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

/// Identities (and nodes) whose bursts are followed at once; past it a new one is counted
/// and not followed until others go quiet.
const MAX_FOLLOWED: usize = 100_000;
/// Records read at a time.
const PAGE: u32 = 500;
const LEASE: Duration = Duration::from_secs(30);
const IDLE: Duration = Duration::from_millis(500);
const RETRY: Duration = Duration::from_secs(2);

/// A raised alert, as stored and sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub kind: usize,
    /// The raising record's time (RFC 3339).
    pub time: String,
    /// The identity (or, for shadow AI, the node) it is about.
    pub subject: String,
    pub node: String,
    pub summary: String,
    pub evidence: Value,
    /// What makes it the same alert again (the webhook's fingerprint).
    pub key: String,
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
#[derive(Default)]
struct Window {
    seconds: VecDeque<(i64, u64)>,
    sum: u64,
    /// The time of the last alert: one per window.
    fired: Option<i64>,
}

impl Window {
    /// Adds `n` at `t`; whether the window's sum reached `threshold` now, an alert not yet
    /// raised for it.
    fn add(&mut self, t: i64, n: u64, window: i64, threshold: u64) -> bool {
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

/// The alert rules, over records one at a time in the order they were stored.
pub struct Detector {
    cfg: Alerts,
    denials: HashMap<String, Window>,
    refusals: HashMap<String, Window>,
    /// The last name-based DNS alert of each identity: one per window.
    names: HashMap<String, i64>,
    /// Identities past [`MAX_FOLLOWED`], not followed.
    pub left_out: u64,
}

impl Detector {
    pub fn new(cfg: Alerts) -> Self {
        Detector {
            cfg,
            denials: HashMap::new(),
            refusals: HashMap::new(),
            names: HashMap::new(),
            left_out: 0,
        }
    }

    /// The alerts `r` (a node's record) raises; `baseline` is the store's.
    pub fn observe(
        &mut self,
        node: &str,
        r: &crate::audit::RecordView<'_>,
        store: &dyn Store,
    ) -> Result<Vec<Alert>, crate::control_plane::store::StoreError> {
        let text = |k: &str| r.text(k);
        let (Some(time), kind) = (
            text("time"),
            text("kind").unwrap_or_else(|| "decision".into()),
        ) else {
            return Ok(Vec::new());
        };
        let Some(t) = crate::clock::parse_rfc3339(&time)
            .ok()
            .map(|t| t.unix_timestamp())
        else {
            return Ok(Vec::new());
        };
        let count = r.u64("count").unwrap_or(1).max(1);
        // Only what a review can stand behind: a SPIFFE ID, bounded.
        let identity = text("identity").filter(|i| i.parse::<crate::identity::AgentId>().is_ok());
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
            };
        match (kind.as_str(), identity.as_deref()) {
            ("decision", Some(id)) => match text("verdict").as_deref() {
                Some("deny") => {
                    let window = self.cfg.denial_window_secs as i64;
                    if let Some(w) = follow(&mut self.denials, id, &mut self.left_out)
                        && w.add(t, count, window, self.cfg.denials)
                    {
                        out.push(alert(
                            1,
                            id,
                            format!("{id}: {} denials within {window} s", w.sum),
                            json!({
                                "denials": w.sum, "window_secs": window,
                                "last_dest": text("dest"), "last_port": r.u64("port"),
                                "last_reason": text("reason"),
                            }),
                            format!("denial_burst|{id}|{t}"),
                        ));
                    }
                }
                Some("allow" | "audit") => {
                    let dest = crate::review::host_name(text("fqdn")).or_else(|| {
                        text("dest")
                            .and_then(|d| d.parse::<std::net::IpAddr>().ok())
                            .map(|a| a.to_string())
                    });
                    if let Some(dest) = dest {
                        let seen = store.baseline(id, &format!("dest {dest}"), &time)?;
                        let learned = crate::clock::parse_rfc3339(&seen.subject_first)
                            .map(|f| (t - f.unix_timestamp()) as f64 / 3600.0)
                            .unwrap_or(0.0);
                        if seen.new && learned >= self.cfg.learning_hours {
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
                                    "baseline_since": seen.subject_first,
                                }),
                                format!("new_destination|{id}|{dest}"),
                            ));
                        }
                    }
                }
                _ => {}
            },
            ("dns", Some(id)) => {
                let event = text("event").unwrap_or_default();
                let window = self.cfg.dns_window_secs as i64;
                if matches!(event.as_str(), "query_refused" | "query_would_refuse")
                    && let Some(w) = follow(&mut self.refusals, id, &mut self.left_out)
                    && w.add(t, count, window, self.cfg.dns_refusals)
                {
                    out.push(alert(
                        2,
                        id,
                        format!("{id}: {} refused DNS queries within {window} s", w.sum),
                        json!({
                            "refused_queries": w.sum, "window_secs": window,
                            "last_name": text("name"), "last_type": text("type"),
                        }),
                        format!("dns_tunnel|refused|{id}|{t}"),
                    ));
                }
                if let Some(name) = text("name")
                    && let Some((label, bits)) =
                        tunnel_like(&name, self.cfg.dns_label_length, self.cfg.dns_entropy_bits)
                    && self.names.get(id).is_none_or(|last| t - last >= window)
                    && (self.names.len() < MAX_FOLLOWED || self.names.contains_key(id))
                {
                    self.names.insert(id.to_owned(), t);
                    out.push(alert(
                        2,
                        id,
                        format!("{id} queried a long, high-entropy name: {name}"),
                        json!({
                            "name": name, "longest_label": label,
                            "entropy_bits_per_char": (bits * 100.0).round() / 100.0,
                            "event": event,
                        }),
                        format!("dns_tunnel|name|{id}|{t}"),
                    ));
                }
            }
            ("decision", None) if text("verdict").as_deref() == Some("unknown") => {
                if let Some(service) = text("service") {
                    let group = crate::discovery::group_of(r);
                    let seen = store.baseline(node, &format!("shadow {group}"), &time)?;
                    if seen.new {
                        out.push(alert(
                            3,
                            node,
                            format!("{node}: {group} talks to {service}, new shadow AI"),
                            json!({
                                "group": group, "service": service, "dest": text("dest"),
                                "port": r.u64("port"), "exe": text("exe"),
                            }),
                            format!("new_shadow_ai|{node}|{group}"),
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(out)
    }
}

/// The window of `key`, made when there is room.
fn follow<'a>(
    map: &'a mut HashMap<String, Window>,
    key: &str,
    left_out: &mut u64,
) -> Option<&'a mut Window> {
    if !map.contains_key(key) {
        if map.len() >= MAX_FOLLOWED {
            *left_out += 1;
            return None;
        }
        map.insert(key.to_owned(), Window::default());
    }
    map.get_mut(key)
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

/// One page of records: the alerts they raise stored, the cursor moved past them. How many
/// were read; None while another replica raises alerts.
async fn detect_page(
    server: &Arc<Server>,
    holder: &str,
    detector: &Arc<std::sync::Mutex<Detector>>,
) -> Result<Option<usize>, String> {
    let until = crate::clock::rfc3339(std::time::SystemTime::now() + LEASE);
    let (store, h) = (server.store.clone(), holder.to_owned());
    let Some(after) = super::store_call(move || store.forward_claim("alerts", &h, &until)).await?
    else {
        return Ok(None);
    };
    let (store, h, d) = (server.store.clone(), holder.to_owned(), detector.clone());
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
        let mut d = d.lock().expect("detector");
        let mut raised = Vec::new();
        let mut batch = Vec::new();
        for f in page.flows.iter().filter(|f| f.node != ALERTS_NODE) {
            // Read from the stored text: only the fields the detector looks at.
            let Some(r) = crate::audit::RecordView::parse(f.record.get()) else {
                continue;
            };
            for a in d.observe(&f.node, &r, &*store)? {
                let rid = f.id * KINDS.len() as u64 + a.kind as u64;
                batch.push(Reported {
                    rid,
                    record: serde_json::value::RawValue::from_string(a.record().to_string())
                        .expect("JSON"),
                });
                raised.push(a.kind);
            }
        }
        if !batch.is_empty() {
            store.ingest(ALERTS_NODE, 0, &batch)?;
        }
        if !store.forward_advance("alerts", &h, last)? {
            // Taken over: the other replica reads these again and stores each alert once.
            return Ok((None, Vec::new()));
        }
        Ok((Some(page.flows.len()), raised))
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
    let until = crate::clock::rfc3339(std::time::SystemTime::now() + LEASE);
    let (store, h, n) = (server.store.clone(), holder.to_owned(), name.to_owned());
    let Some(after) = super::store_call(move || store.forward_claim(&n, &h, &until)).await? else {
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
}
