//! Audit records as OCSF events, for the SIEMs that read the Open Cybersecurity Schema
//! Framework: decisions as Network Activity, DNS records as DNS Activity, identity records
//! as Authentication or Account Change. One function maps a native record, as a node writes
//! it or as the control plane stores it; the native record rides along whole under
//! `unmapped`, so nothing the native log says is lost in the export. The native log, with
//! its hash chain, stays the record of truth: an export is a view of it.

use serde_json::{Map, Value, json, value::RawValue};

use crate::audit::RecordView;

/// The OCSF version the events follow.
pub const VERSION: &str = "1.3.0";

/// The profile network and DNS events use (`action_id`, `disposition_id`, `firewall_rule`).
const SECURITY_CONTROL: &str = "security_control";

/// Longest string OCSF takes in a field (its schema's `maxLength`).
const MAX_TEXT: usize = 65_535;
/// Most labels, and DNS answers, an event lists: an event stays within a small multiple of
/// its record's size (the record, under `unmapped.agentwall`, holds them all).
const MAX_LIST: usize = 64;

/// Where a record comes from, which says what names it.
#[derive(Clone, Copy, Debug)]
pub enum Origin<'a> {
    /// A node's own audit log: its chain (`seq`, `hash`) is the node's, and names the record.
    Log,
    /// The control plane's store: `node` sent it (or is the control plane's own, for
    /// alerts) and `id` numbers it there. A node's `seq` and `hash` are only what the node
    /// says, so the store's number names the event instead.
    Stored { node: &'a str, id: u64 },
}

/// An OCSF event: the mapped fields, and the native record as it was written (its text,
/// never parsed into a tree) under `unmapped.agentwall`.
#[derive(Debug, serde::Serialize)]
pub struct Event<'a> {
    #[serde(flatten)]
    pub mapped: Map<String, Value>,
    pub unmapped: Unmapped<'a>,
}

#[derive(Debug, serde::Serialize)]
pub struct Unmapped<'a> {
    pub agentwall: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<&'a str>,
}

/// What an export did with records: mapped, or of a kind OCSF has no class for here
/// (policy changes, losses, checkpoints), counted so none goes missing unseen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Exported {
    pub events: u64,
    pub not_mapped: u64,
}

impl Exported {
    /// Maps `record`, counting it either way.
    pub fn map<'a>(&mut self, record: &'a RawValue, origin: Origin<'a>) -> Option<Event<'a>> {
        let e = event(record, origin);
        match e {
            Some(_) => self.events += 1,
            None => self.not_mapped += 1,
        }
        e
    }
}

/// The OCSF event for a native record; None for records OCSF has no class for here, that
/// lack a time or a kind, or that are no JSON object. Only the fields the mapping reads are
/// parsed: the rest of the record is carried as its text.
pub fn event<'a>(record: &'a RawValue, origin: Origin<'a>) -> Option<Event<'a>> {
    let r = RecordView::parse(record.get())?;
    let native_time = r.text("time")?;
    let time = millis(&native_time)?;
    let kind = r.text("kind").unwrap_or_else(|| "decision".into());
    let node = match origin {
        Origin::Log => None,
        Origin::Stored { node, .. } => Some(node),
    };
    let mut e = match kind.as_str() {
        "decision" => network(&r)?,
        "dns" => dns(&r)?,
        "identity" => identity(&r)?,
        // Only the control plane's own: a node's record that calls itself an alert is none.
        "alert" if node == Some(crate::control_plane::ALERTS_NODE) => finding(&r, time)?,
        _ => return None,
    };
    let profiled = matches!(kind.as_str(), "decision" | "dns" | "alert");
    let mut metadata = json!({
        "version": VERSION,
        "product": {
            "name": "agentwall",
            "vendor_name": "agentwall",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "log_name": "audit",
        "original_time": bounded(native_time),
    });
    if profiled {
        metadata["profiles"] = json!([SECURITY_CONTROL]);
    }
    match origin {
        Origin::Log => {
            if let Some(seq) = r.u64("seq").and_then(|s| i64::try_from(s).ok()) {
                metadata["sequence"] = json!(seq);
            }
            if let Some(hash) = r.text("hash") {
                metadata["uid"] = json!(bounded(hash));
            }
        }
        Origin::Stored { node, id } => metadata["uid"] = json!(bounded(format!("{node}/{id}"))),
    }
    let mut labels: Vec<String> = Vec::new();
    if let Some(o) = r.text("owner") {
        labels.push(bounded(format!("owner={o}")));
    }
    // Prefixed, so a label a node names `owner` is never read as the owner.
    labels.extend(
        r.text_map("labels")
            .into_iter()
            .take(MAX_LIST)
            .map(|(k, v)| bounded(format!("label:{k}={v}"))),
    );
    if !labels.is_empty() {
        metadata["labels"] = json!(labels);
    }
    let o = e.as_object_mut().expect("events are objects");
    o.insert("metadata".into(), metadata);
    o.insert("time".into(), json!(time));
    let class_uid = o["class_uid"].as_i64().unwrap_or(0);
    let activity_id = o["activity_id"].as_i64().unwrap_or(0);
    o.insert("category_uid".into(), json!(class_uid / 1000));
    o.insert("type_uid".into(), json!(class_uid * 100 + activity_id));
    let Value::Object(mapped) = e else {
        unreachable!("events are objects")
    };
    Some(Event {
        mapped,
        unmapped: Unmapped {
            agentwall: record,
            node,
        },
    })
}

/// A decision record as Network Activity (4001).
fn network(r: &RecordView) -> Option<Value> {
    let verdict = r.text("verdict")?;
    // (activity, action, disposition, status, severity), by the OCSF 1.3 enumerations.
    let (activity, action, disposition, status, severity) = match verdict.as_str() {
        "allow" => ((1, "Open"), (1, "Allowed"), (1, "Allowed"), 1, 1),
        // Allowed in audit mode; the rules would have denied it.
        "audit" => ((1, "Open"), (1, "Allowed"), (17, "Logged"), 1, 2),
        // A process no identity governs (shadow AI): allowed, reported.
        "unknown" => ((1, "Open"), (1, "Allowed"), (17, "Logged"), 1, 2),
        "deny" | "socket-deny" => ((5, "Refuse"), (2, "Denied"), (2, "Blocked"), 2, 3),
        _ => return None,
    };
    let inbound = r.text("direction").as_deref() == Some("inbound");
    // Written as the address's canonical text, whatever spelling the record used.
    let dest = r
        .text("dest")
        .and_then(|d| Some(canonical_ip(&d)?.to_string()));
    let port = r.u64("port").and_then(|p| u16::try_from(p).ok());
    let host = r.text("fqdn").filter(|n| hostname(n));
    let process = process(r);
    // The far end; OCSF wants an endpoint named somehow, so one with no address (a socket
    // family refused before any address) is named by what it was.
    let mut remote = Map::new();
    match &dest {
        Some(d) => {
            remote.insert("ip".into(), json!(d));
        }
        None => {
            let what = r.text("protocol").unwrap_or_else(|| "unknown".into());
            remote.insert("name".into(), json!(bounded(format!("{what} socket"))));
        }
    }
    // Inbound: `dest` is the peer and `port` the agent's own.
    let (src, dst) = if inbound {
        let mut dst = process;
        if let Some(p) = port {
            dst.insert("port".into(), json!(p));
        }
        (remote, dst)
    } else {
        let mut dst = remote;
        if let Some(p) = port {
            dst.insert("port".into(), json!(p));
        }
        if let Some(h) = &host {
            dst.insert("hostname".into(), json!(h));
        }
        (process, dst)
    };
    let mut connection = json!({
        "direction_id": if inbound { 1 } else { 2 },
        "direction": if inbound { "Inbound" } else { "Outbound" },
    });
    match r.text("protocol").as_deref() {
        Some("tcp") => {
            connection["protocol_name"] = json!("tcp");
            connection["protocol_num"] = json!(6);
        }
        Some("udp") => {
            connection["protocol_name"] = json!("udp");
            connection["protocol_num"] = json!(17);
        }
        Some(p) => connection["protocol_name"] = json!(bounded(p.to_owned())),
        None => {}
    }
    let who = r
        .text("identity")
        .unwrap_or_else(|| "a process no identity governs".into());
    let to = match (&host, &dest) {
        (Some(h), Some(d)) => format!("{h} ({d})"),
        (None, Some(d)) => d.clone(),
        _ => "a socket".into(),
    };
    let mut message = format!(
        "{who} {} {to}:{}/{}: {verdict}",
        if inbound { "from" } else { "to" },
        port.unwrap_or(0),
        r.text("protocol").unwrap_or_default()
    );
    if let Some(why) = r.text("reason") {
        message.push_str(&format!(" ({why})"));
    }
    let mut e = json!({
        "class_uid": 4001,
        "class_name": "Network Activity",
        "category_name": "Network Activity",
        "activity_id": activity.0,
        "activity_name": activity.1,
        "type_name": format!("Network Activity: {}", activity.1),
        "action_id": action.0,
        "action": action.1,
        "disposition_id": disposition.0,
        "disposition": disposition.1,
        "status_id": status,
        "status": if status == 1 { "Success" } else { "Failure" },
        "severity_id": severity,
        "severity": severity_name(severity),
        "src_endpoint": Value::Object(src),
        "dst_endpoint": Value::Object(dst),
        "connection_info": connection,
        "message": bounded(message),
    });
    if let Some(why) = r.text("reason") {
        e["status_detail"] = json!(bounded(why));
    }
    if let Some(c) = r.u64("count").and_then(|c| i64::try_from(c).ok()) {
        e["count"] = json!(c);
    }
    for (field, native) in [("start_time", "first_seen"), ("end_time", "last_seen")] {
        if let Some(t) = r.text(native).and_then(|t| millis(&t)) {
            e[field] = json!(t);
        }
    }
    // A rule OCSF takes is named or numbered: a record with neither names no rule.
    let rule_id = r.u64("rule_id");
    let place = r.text("rule");
    if rule_id.is_some() || place.is_some() {
        let mut rule = json!({});
        if let Some(id) = rule_id {
            rule["uid"] = json!(id.to_string());
        }
        if let Some(place) = place {
            rule["name"] = json!(bounded(place));
        }
        if let Some(rev) = r.text("revision") {
            rule["version"] = json!(bounded(rev));
        }
        e["firewall_rule"] = rule;
    }
    Some(e)
}

/// The agent's side of a flow: its identity (or, ungoverned, its process name), and the
/// user the kernel saw.
fn process(r: &RecordView) -> Map<String, Value> {
    let mut p = Map::new();
    // An ungoverned process is named by what it calls itself, said so, so that no process
    // name reads as an identity.
    let name = r
        .text("identity")
        .or_else(|| Some(format!("{} (no identity)", r.text("comm")?)))
        .unwrap_or_else(|| "unknown process".into());
    p.insert("name".into(), json!(bounded(name)));
    if let Some(uid) = r.u64("uid") {
        p.insert("owner".into(), json!({ "uid": uid.to_string() }));
    }
    p
}

/// A DNS record as DNS Activity (4003).
fn dns(r: &RecordView) -> Option<Value> {
    let event = r.text("event")?;
    let name = r.text("name");
    // (activity, allowed, detail)
    let (activity, allowed) = match event.as_str() {
        "learned" => ((2, "Response"), true),
        "query_would_refuse" => ((1, "Query"), true),
        "refused" | "cap" | "query_refused" | "install_failed" => {
            let activity = if event == "query_refused" {
                (1, "Query")
            } else {
                (2, "Response")
            };
            (activity, false)
        }
        _ => return None,
    };
    let identity = r.text("identity").unwrap_or_default();
    let mut e = json!({
        "class_uid": 4003,
        "class_name": "DNS Activity",
        "category_name": "Network Activity",
        "activity_id": activity.0,
        "activity_name": activity.1,
        "type_name": format!("DNS Activity: {}", activity.1),
        "action_id": if allowed { 1 } else { 2 },
        "action": if allowed { "Allowed" } else { "Denied" },
        "disposition_id": match event.as_str() {
            "learned" => 1,
            "query_would_refuse" => 17,
            _ => 2,
        },
        "disposition": match event.as_str() {
            "learned" => "Allowed",
            "query_would_refuse" => "Logged",
            _ => "Blocked",
        },
        "status_id": if allowed { 1 } else { 2 },
        "status": if allowed { "Success" } else { "Failure" },
        "severity_id": if allowed && event == "learned" { 1 } else { 3 },
        "severity": severity_name(if allowed && event == "learned" { 1 } else { 3 }),
        "src_endpoint": { "name": bounded(identity.clone()) },
        "message": bounded(format!(
            "{identity}: {} {}",
            event.replace('_', " "),
            name.clone().unwrap_or_default()
        )),
    });
    if let Some(n) = name.filter(|n| hostname(n)) {
        let mut q = json!({ "hostname": n });
        if let Some(t) = r.text("type") {
            q["type"] = json!(bounded(t));
        }
        e["query"] = q;
    }
    if event == "query_refused" {
        e["rcode_id"] = json!(5);
        e["rcode"] = json!("Refused");
    }
    if let Some(why) = r
        .text("why")
        .or_else(|| r.text("cap"))
        .or_else(|| r.text("error"))
    {
        e["status_detail"] = json!(bounded(why));
    }
    let addrs: Vec<Value> = match event.as_str() {
        "learned" => r.texts("addrs"),
        "cap" => r.texts("refused"),
        _ => Vec::new(),
    }
    .into_iter()
    .chain(r.text("addr"))
    .filter_map(|a| canonical_ip(&a))
    .take(MAX_LIST)
    .map(|a| {
        let t = if a.is_ipv6() { "AAAA" } else { "A" };
        json!({ "rdata": a.to_string(), "type": t })
    })
    .collect();
    if !addrs.is_empty() {
        e["answers"] = json!(addrs);
    }
    if let Some(c) = r.u64("count").and_then(|c| i64::try_from(c).ok()) {
        e["count"] = json!(c);
    }
    Some(e)
}

/// An identity record as Authentication (3002: a session bound, renewed, refused, ended)
/// or Account Change (3001: an identity revoked or expired).
fn identity(r: &RecordView) -> Option<Value> {
    let event = r.text("event")?;
    let (class, activity, ok, severity) = match event.as_str() {
        "launched" | "enrolled" | "renewed" => ((3002, "Authentication"), (1, "Logon"), true, 1),
        "rejected" => ((3002, "Authentication"), (1, "Logon"), false, 3),
        "session-ended" => ((3002, "Authentication"), (2, "Logoff"), true, 1),
        "revoked" | "revoked-by-crl" | "ended" => {
            ((3001, "Account Change"), (5, "Disable"), true, 3)
        }
        "expired" => ((3001, "Account Change"), (5, "Disable"), true, 2),
        "expires-soon" => ((3001, "Account Change"), (99, "Other"), true, 2),
        _ => return None,
    };
    let identity = r.text("identity");
    // OCSF wants the user named: a refusal before any identity was read names none.
    let mut user = json!({
        "type_id": 99,
        "type": "Agent",
        "name": bounded(identity.clone().unwrap_or_else(|| "unknown identity".into())),
    });
    if let Some(id) = &identity {
        user["uid"] = json!(bounded(id.clone()));
    }
    if let Some(serial) = r.text("serial") {
        user["credential_uid"] = json!(bounded(serial));
    }
    let mut e = json!({
        "class_uid": class.0,
        "class_name": class.1,
        "category_name": "Identity & Access Management",
        "activity_id": activity.0,
        "activity_name": activity.1,
        "type_name": format!("{}: {}", class.1, activity.1),
        "status_id": if ok { 1 } else { 2 },
        "status": if ok { "Success" } else { "Failure" },
        "severity_id": severity,
        "severity": severity_name(severity),
        "user": user,
        "message": bounded(format!(
            "{}: {event}",
            identity.as_deref().unwrap_or("an identity")
        )),
    });
    if let Some(why) = r.text("reason") {
        e["status_detail"] = json!(bounded(why));
    }
    if class.0 == 3002 {
        // Agents authenticate to the node with their certificates.
        e["auth_protocol_id"] = json!(99);
        e["auth_protocol"] = json!("X.509 certificate (SPIFFE)");
        e["service"] = json!({ "name": "agentwall node" });
    }
    Some(e)
}

/// An alert the control plane raised as a Detection Finding (2004).
fn finding(r: &RecordView, time: i64) -> Option<Value> {
    let kind = r.text("alert")?;
    let severity = if r.text("severity").as_deref() == Some("warning") {
        3
    } else {
        1
    };
    let summary = r.text("summary").unwrap_or_else(|| kind.clone());
    Some(json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_name": "Detection Finding: Create",
        // An alert blocks nothing; it is raised for people to look.
        "action_id": 99,
        "action": "Alert",
        "disposition_id": 19,
        "disposition": "Alert",
        "severity_id": severity,
        "severity": severity_name(severity),
        "status_id": 1,
        "status": "New",
        "message": bounded(summary.clone()),
        "finding_info": {
            "uid": bounded(r.text("fingerprint").unwrap_or_else(|| "-".into())),
            "title": bounded(summary),
            "types": [bounded(kind)],
            "created_time": time,
        },
    }))
}

fn severity_name(id: i64) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Other",
    }
}

/// A string cut to what an OCSF field holds, at a character boundary.
fn bounded(mut s: String) -> String {
    s.truncate(crate::text::prefix(&s, MAX_TEXT).len());
    s
}

/// An address, to be written in its canonical text (RFC 5952 for IPv6), which every
/// reader of OCSF's `ip` takes.
fn canonical_ip(a: &str) -> Option<std::net::IpAddr> {
    a.parse().ok()
}

/// Milliseconds since the epoch, as OCSF times are.
fn millis(t: &str) -> Option<i64> {
    let t = crate::clock::parse_rfc3339(t).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Whether `n` is a host name as OCSF's `hostname` takes it (letters, digits and hyphens
/// in dot-separated labels, no trailing dot); other names stay in `unmapped` only.
fn hostname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(v).unwrap()
    }

    fn mapped(x: &mut Exported, r: &Value, origin: Origin) -> Option<Value> {
        x.map(&raw(r), origin)
            .map(|e| serde_json::to_value(&e).unwrap())
    }

    #[test]
    fn an_event_lists_at_most_max_list_labels_and_answers() {
        let labels: serde_json::Map<String, Value> =
            (0..500).map(|i| (format!("k{i}"), json!("v"))).collect();
        let addrs: Vec<String> = (0..500)
            .map(|i| format!("198.51.100.{}", i % 250))
            .collect();
        let learned = json!({"kind": "dns", "event": "learned", "time": "2026-12-05T01:02:03Z",
            "identity": "spiffe://example.org/a", "name": "api.example.com", "addrs": addrs,
            "labels": labels});
        let e = mapped(&mut Exported::default(), &learned, Origin::Log).unwrap();
        assert_eq!(e["answers"].as_array().unwrap().len(), MAX_LIST);
        assert_eq!(e["metadata"]["labels"].as_array().unwrap().len(), MAX_LIST);
        // The record itself, with all of them, rides along.
        assert_eq!(e["unmapped"]["agentwall"], learned);
    }

    #[test]
    fn records_map_to_their_class_and_the_rest_are_counted() {
        let mut x = Exported::default();
        let deny = json!({
            "kind": "decision", "time": "2026-12-05T01:02:03.456Z", "verdict": "deny",
            "reason": "no rule allows it", "identity": "spiffe://example.org/a",
            "dest": "2001:DB8:0:0::7", "port": 443, "protocol": "tcp", "seq": 7, "hash": "ab",
            "owner": "team@example.org", "labels": {"env": "prod", "owner": "mallory"},
            "count": 2,
        });
        let at = Origin::Stored {
            node: "node-1",
            id: 42,
        };
        let e = mapped(&mut x, &deny, at).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400105);
        assert_eq!(e["category_uid"], 4);
        assert_eq!(e["time"], 1_796_432_523_456i64);
        assert_eq!(e["action_id"], 2);
        assert_eq!(e["dst_endpoint"]["ip"], "2001:db8::7");
        assert_eq!(e["src_endpoint"]["name"], "spiffe://example.org/a");
        assert_eq!(
            e["metadata"]["labels"],
            json!([
                "owner=team@example.org",
                "label:env=prod",
                "label:owner=mallory"
            ])
        );
        // At the control plane the store names the event, not what the node says.
        assert_eq!(e["metadata"]["uid"], "node-1/42");
        assert!(e["metadata"].get("sequence").is_none());
        assert_eq!(e["unmapped"]["agentwall"], deny);
        assert_eq!(e["unmapped"]["node"], "node-1");
        let e = mapped(&mut x, &deny, Origin::Log).unwrap();
        assert_eq!(e["metadata"]["uid"], "ab");
        assert_eq!(e["metadata"]["sequence"], 7);
        assert!(e["unmapped"].get("node").is_none());
        // A number out of range is left out, never wrapped; a rule with no name or number
        // is no rule.
        let odd = json!({"kind": "decision", "time": "2026-12-05T01:02:03Z", "verdict": "allow",
            "port": 70_000, "dest": "not an address", "fqdn": "bad_name.example",
            "rule": {"a": 1}, "comm": "spiffe://example.org/a"});
        let e = mapped(&mut x, &odd, Origin::Log).unwrap();
        assert_eq!(e["dst_endpoint"], json!({"name": "unknown socket"}));
        assert!(e.get("firewall_rule").is_none());
        assert_eq!(
            e["src_endpoint"]["name"],
            "spiffe://example.org/a (no identity)"
        );
        for other in [
            json!({"kind": "policy", "event": "applied", "time": "2026-12-05T01:02:03Z"}),
            json!({"kind": "loss", "time": "2026-12-05T01:02:03Z"}),
            json!({"kind": "decision", "verdict": "deny"}),
            json!({"kind": "alert", "time": "2026-12-05T01:02:03Z", "alert": "denial_burst"}),
            json!("not an object"),
        ] {
            assert!(mapped(&mut x, &other, at).is_none(), "{other}");
        }
        assert_eq!(
            x,
            Exported {
                events: 3,
                not_mapped: 5
            }
        );
    }
}
