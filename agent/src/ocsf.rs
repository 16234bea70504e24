//! Audit records as OCSF events, for the SIEMs that read the Open Cybersecurity Schema
//! Framework: decisions as Network Activity, DNS records as DNS Activity, identity records
//! as Authentication or Account Change. One function maps a native record, as a node writes
//! it or as the control plane stores it; the native record rides along whole under
//! `unmapped`, so nothing the native log says is lost in the export. The native log, with
//! its hash chain, stays the record of truth: an export is a view of it.

use serde_json::{Map, Value, json};

/// The OCSF version the events follow.
pub const VERSION: &str = "1.3.0";

/// The profile network and DNS events use (`action_id`, `disposition_id`, `firewall_rule`).
const SECURITY_CONTROL: &str = "security_control";

/// Longest string OCSF takes in a field (its schema's `maxLength`).
const MAX_TEXT: usize = 65_535;

/// What an export did with records: mapped, or of a kind OCSF has no class for here
/// (policy changes, losses, checkpoints), counted so none goes missing unseen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Exported {
    pub events: u64,
    pub not_mapped: u64,
}

impl Exported {
    /// Maps `record`, counting it either way.
    pub fn map(&mut self, record: &Value, node: Option<&str>) -> Option<Value> {
        let e = event(record, node);
        match e {
            Some(_) => self.events += 1,
            None => self.not_mapped += 1,
        }
        e
    }
}

/// The OCSF event for a native record (`node`: the node that sent it, at the control
/// plane); None for records OCSF has no class for here, or that lack a time or a kind.
pub fn event(record: &Value, node: Option<&str>) -> Option<Value> {
    let r = record.as_object()?;
    let time = text_of(r, "time").and_then(|t| millis(&t))?;
    let kind = text_of(r, "kind").unwrap_or_else(|| "decision".into());
    let mut e = match kind.as_str() {
        "decision" => network(r)?,
        "dns" => dns(r)?,
        "identity" => identity(r)?,
        // Only the control plane's own: a node's record that calls itself an alert is none.
        "alert" if node == Some(crate::control_plane::ALERTS_NODE) => finding(r, time)?,
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
        "original_time": text_of(r, "time"),
    });
    if profiled {
        metadata["profiles"] = json!([SECURITY_CONTROL]);
    }
    if let Some(seq) = r
        .get("seq")
        .and_then(Value::as_u64)
        .and_then(|s| i64::try_from(s).ok())
    {
        metadata["sequence"] = json!(seq);
    }
    if let Some(hash) = text_of(r, "hash") {
        metadata["uid"] = json!(hash);
    }
    let mut labels: Vec<String> = Vec::new();
    if let Some(o) = text_of(r, "owner") {
        labels.push(bounded(format!("owner={o}")));
    }
    if let Some(l) = r.get("labels").and_then(Value::as_object) {
        labels.extend(
            l.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| bounded(format!("{k}={v}")))),
        );
    }
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
    let mut unmapped = Map::new();
    unmapped.insert("agentwall".into(), record.clone());
    if let Some(n) = node {
        unmapped.insert("node".into(), json!(n));
    }
    o.insert("unmapped".into(), Value::Object(unmapped));
    Some(e)
}

/// A decision record as Network Activity (4001).
fn network(r: &Map<String, Value>) -> Option<Value> {
    let verdict = text_of(r, "verdict")?;
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
    let inbound = text_of(r, "direction").as_deref() == Some("inbound");
    let dest = text_of(r, "dest").filter(|d| d.parse::<std::net::IpAddr>().is_ok());
    let port = r
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok());
    let host = text_of(r, "fqdn").filter(|n| hostname(n));
    let process = process(r);
    // The far end; OCSF wants an endpoint named somehow, so one with no address (a socket
    // family refused before any address) is named by what it was.
    let mut remote = Map::new();
    match &dest {
        Some(d) => {
            remote.insert("ip".into(), json!(d));
        }
        None => {
            let what = text_of(r, "protocol").unwrap_or_else(|| "unknown".into());
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
    match text_of(r, "protocol").as_deref() {
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
    let who = text_of(r, "identity").unwrap_or_else(|| "a process no identity governs".into());
    let to = match (&host, &dest) {
        (Some(h), Some(d)) => format!("{h} ({d})"),
        (None, Some(d)) => d.clone(),
        _ => "a socket".into(),
    };
    let mut message = format!(
        "{who} {} {to}:{}/{}: {verdict}",
        if inbound { "from" } else { "to" },
        port.unwrap_or(0),
        text_of(r, "protocol").unwrap_or_default()
    );
    if let Some(why) = text_of(r, "reason") {
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
    if let Some(why) = text_of(r, "reason") {
        e["status_detail"] = json!(bounded(why));
    }
    if let Some(c) = r
        .get("count")
        .and_then(Value::as_u64)
        .and_then(|c| i64::try_from(c).ok())
    {
        e["count"] = json!(c);
    }
    for (field, native) in [("start_time", "first_seen"), ("end_time", "last_seen")] {
        if let Some(t) = text_of(r, native).and_then(|t| millis(&t)) {
            e[field] = json!(t);
        }
    }
    let rule_id = r.get("rule_id").and_then(Value::as_u64);
    if rule_id.is_some() || r.contains_key("rule") {
        let mut rule = json!({});
        if let Some(id) = rule_id {
            rule["uid"] = json!(id.to_string());
        }
        if let Some(place) = text_of(r, "rule") {
            rule["name"] = json!(bounded(place));
        }
        if let Some(rev) = text_of(r, "revision") {
            rule["version"] = json!(bounded(rev));
        }
        e["firewall_rule"] = rule;
    }
    Some(e)
}

/// The agent's side of a flow: its identity (or, ungoverned, its process name), and the
/// user the kernel saw.
fn process(r: &Map<String, Value>) -> Map<String, Value> {
    let mut p = Map::new();
    let name = text_of(r, "identity")
        .or_else(|| text_of(r, "comm"))
        .unwrap_or_else(|| "unknown process".into());
    p.insert("name".into(), json!(bounded(name)));
    if let Some(uid) = r.get("uid").and_then(Value::as_u64) {
        p.insert("owner".into(), json!({ "uid": uid.to_string() }));
    }
    p
}

/// A DNS record as DNS Activity (4003).
fn dns(r: &Map<String, Value>) -> Option<Value> {
    let event = text_of(r, "event")?;
    let name = text_of(r, "name");
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
    let identity = text_of(r, "identity").unwrap_or_default();
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
        if let Some(t) = text_of(r, "type") {
            q["type"] = json!(bounded(t));
        }
        e["query"] = q;
    }
    if event == "query_refused" {
        e["rcode_id"] = json!(5);
        e["rcode"] = json!("Refused");
    }
    if let Some(why) = text_of(r, "why")
        .or_else(|| text_of(r, "cap"))
        .or_else(|| text_of(r, "error"))
    {
        e["status_detail"] = json!(bounded(why));
    }
    let addrs: Vec<Value> = match event.as_str() {
        "learned" => r.get("addrs"),
        "cap" => r.get("refused"),
        _ => None,
    }
    .and_then(Value::as_array)
    .into_iter()
    .flatten()
    .chain(r.get("addr"))
    .filter_map(Value::as_str)
    .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
    .map(|a| {
        let t = if a.contains(':') { "AAAA" } else { "A" };
        json!({ "rdata": a, "type": t })
    })
    .collect();
    if !addrs.is_empty() {
        e["answers"] = json!(addrs);
    }
    if let Some(c) = r
        .get("count")
        .and_then(Value::as_u64)
        .and_then(|c| i64::try_from(c).ok())
    {
        e["count"] = json!(c);
    }
    Some(e)
}

/// An identity record as Authentication (3002: a session bound, renewed, refused, ended)
/// or Account Change (3001: an identity revoked or expired).
fn identity(r: &Map<String, Value>) -> Option<Value> {
    let event = text_of(r, "event")?;
    let (class, activity, ok, severity) = match event.as_str() {
        "launched" | "enrolled" | "renewed" => ((3002, "Authentication"), (1, "Logon"), true, 1),
        "rejected" => ((3002, "Authentication"), (1, "Logon"), false, 3),
        "session-ended" => ((3002, "Authentication"), (2, "Logoff"), true, 1),
        "revoked" | "revoked-by-crl" => ((3001, "Account Change"), (5, "Disable"), true, 3),
        "expired" => ((3001, "Account Change"), (5, "Disable"), true, 2),
        "expires-soon" => ((3001, "Account Change"), (99, "Other"), true, 2),
        _ => return None,
    };
    let identity = text_of(r, "identity");
    // OCSF wants the user named: a refusal before any identity was read names none.
    let mut user = json!({
        "type_id": 99,
        "type": "Agent",
        "name": bounded(identity.clone().unwrap_or_else(|| "unknown identity".into())),
    });
    if let Some(id) = &identity {
        user["uid"] = json!(bounded(id.clone()));
    }
    if let Some(serial) = text_of(r, "serial") {
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
    if let Some(why) = text_of(r, "reason") {
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
fn finding(r: &Map<String, Value>, time: i64) -> Option<Value> {
    let kind = text_of(r, "alert")?;
    let severity = if text_of(r, "severity").as_deref() == Some("warning") {
        3
    } else {
        1
    };
    let summary = text_of(r, "summary").unwrap_or_else(|| kind.clone());
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
            "uid": bounded(text_of(r, "fingerprint").unwrap_or_else(|| "-".into())),
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

fn text_of(r: &Map<String, Value>, k: &str) -> Option<String> {
    r.get(k).and_then(Value::as_str).map(str::to_owned)
}

/// A string cut to what an OCSF field holds, at a character boundary.
fn bounded(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
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

    #[test]
    fn records_map_to_their_class_and_the_rest_are_counted() {
        let mut x = Exported::default();
        let deny = json!({
            "kind": "decision", "time": "2026-12-05T01:02:03.456Z", "verdict": "deny",
            "reason": "no rule allows it", "identity": "spiffe://example.org/a",
            "dest": "203.0.113.7", "port": 443, "protocol": "tcp", "seq": 7, "hash": "ab",
            "owner": "team@example.org", "labels": {"env": "prod"}, "count": 2,
        });
        let e = x.map(&deny, Some("node-1")).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400105);
        assert_eq!(e["category_uid"], 4);
        assert_eq!(e["time"], 1_796_432_523_456i64);
        assert_eq!(e["action_id"], 2);
        assert_eq!(e["dst_endpoint"]["ip"], "203.0.113.7");
        assert_eq!(e["src_endpoint"]["name"], "spiffe://example.org/a");
        assert_eq!(
            e["metadata"]["labels"],
            json!(["owner=team@example.org", "env=prod"])
        );
        assert_eq!(e["unmapped"]["agentwall"], deny);
        assert_eq!(e["unmapped"]["node"], "node-1");
        // A number out of range is left out, never wrapped.
        let odd = json!({"kind": "decision", "time": "2026-12-05T01:02:03Z", "verdict": "allow",
            "port": 70_000, "dest": "not an address", "fqdn": "bad_name.example"});
        let e = x.map(&odd, None).unwrap();
        assert_eq!(e["dst_endpoint"], json!({"name": "unknown socket"}));
        for other in [
            json!({"kind": "policy", "event": "applied", "time": "2026-12-05T01:02:03Z"}),
            json!({"kind": "loss", "time": "2026-12-05T01:02:03Z"}),
            json!({"kind": "decision", "verdict": "deny"}),
            json!("not an object"),
        ] {
            assert!(x.map(&other, None).is_none(), "{other}");
        }
        assert_eq!(
            x,
            Exported {
                events: 2,
                not_mapped: 4
            }
        );
    }
}
