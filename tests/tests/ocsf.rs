//! Every kind of record agentwall maps to OCSF, and records a hostile node could send, as
//! events that pass their OCSF class's JSON Schema (the schemas `cargo xtask test` builds).
//! The records a real node writes are exported and checked end to end in `golden.rs`; the
//! control plane's `format=ocsf` in `control_plane.rs`.

use agentwall::ocsf::{Exported, Origin};
use agentwall_tests::ocsf::{check, event};
use serde_json::json;

const T: &str = "2026-12-05T01:02:03.456Z";
const ID: &str = "spiffe://example.org/agent/support";

fn decision(verdict: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut r = json!({
        "kind": "decision", "time": T, "seq": 3, "hash": "ab", "prev": "cd",
        "verdict": verdict, "identity": ID, "pid": 7, "comm": "agent", "uid": 1000,
        "cgroup_id": 9, "dest": "203.0.113.7", "port": 443, "protocol": "tcp",
        "revision": "r1", "count": 1,
    });
    r.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    r
}

#[test]
fn every_record_kind_maps_to_an_event_its_class_takes() {
    let records = [
        decision(
            "allow",
            json!({"rule": "p.yaml:1 egress[0]", "rule_id": 1, "fqdn": "api.example.com"}),
        ),
        decision("audit", json!({"reason": "no rule allows it"})),
        decision(
            "deny",
            json!({"reason": "no rule allows it", "first_seen": T, "last_seen": T, "count": 40}),
        ),
        decision(
            "deny",
            json!({"dest": "2001:db8::7", "owner": "team@example.org", "labels": {"env": "prod"}}),
        ),
        decision(
            "socket-deny",
            json!({"dest": null, "protocol": "vsock", "reason": "socket family"}),
        ),
        decision(
            "allow",
            json!({"direction": "inbound", "port": 8080, "dest": "198.51.100.9"}),
        ),
        decision(
            "unknown",
            json!({"identity": null, "service": "openai", "exe": "/usr/bin/python3"}),
        ),
        json!({"kind": "dns", "event": "learned", "time": T, "identity": ID, "name": "api.example.com", "addrs": ["203.0.113.7", "2001:db8::7"], "rule_id": 2}),
        json!({"kind": "dns", "event": "refused", "time": T, "identity": ID, "name": "rebind.example.com", "addr": "127.0.0.1", "why": "global deny list"}),
        json!({"kind": "dns", "event": "cap", "time": T, "identity": ID, "name": "many.example.com", "cap": "per-name", "refused": ["203.0.113.8"]}),
        json!({"kind": "dns", "event": "install_failed", "time": T, "identity": ID, "name": "x.example.com", "error": "map full"}),
        json!({"kind": "dns", "event": "query_refused", "time": T, "identity": ID, "name": "aGVsbG8.tunnel.example", "type": "TXT", "why": "no rule names it", "count": 9}),
        json!({"kind": "dns", "event": "query_would_refuse", "time": T, "identity": ID, "name": "_srv._tcp.example.com", "type": "SRV", "why": "no rule names it", "count": 1}),
        json!({"kind": "identity", "event": "launched", "time": T, "identity": ID, "serial": "0a", "cgroup": "/sys/fs/cgroup/x", "pid": 7, "not_after": T}),
        json!({"kind": "identity", "event": "enrolled", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x", "pid": 7, "not_after": T}),
        json!({"kind": "identity", "event": "renewed", "time": T, "identity": ID, "serial": "0b", "cgroup": "/x", "pid": 7, "not_after": T}),
        json!({"kind": "identity", "event": "rejected", "time": T, "op": "launch", "identity": null, "reason": "the certificate has expired"}),
        json!({"kind": "identity", "event": "session-ended", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x"}),
        json!({"kind": "identity", "event": "revoked", "time": T, "identity": ID, "connections_destroyed": 2, "by": "control-plane"}),
        json!({"kind": "identity", "event": "revoked-by-crl", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x", "connections_destroyed": 0}),
        json!({"kind": "identity", "event": "expired", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x", "not_after": T}),
        json!({"kind": "identity", "event": "ended", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x", "connections_destroyed": 0, "reason": "the Workload API issues this workload no SVID"}),
        json!({"kind": "identity", "event": "expires-soon", "time": T, "identity": ID, "serial": "0a", "cgroup": "/x", "not_after": T, "renewed": "by hand"}),
        json!({"kind": "alert", "time": T, "alert": "denial_burst", "severity": "warning", "node": "n1", "identity": ID, "summary": "20 denials within 60 s", "evidence": {"denials": 20}, "fingerprint": "00ff"}),
        json!({"kind": "alert", "time": T, "alert": "new_shadow_ai", "severity": "info", "node": "n1", "subject": "n1", "summary": "new", "evidence": {}, "fingerprint": "01ff"}),
    ];
    for r in &records {
        let node = match r["kind"].as_str() {
            Some("alert") => "control-plane",
            _ => "spiffe://example.org/node/n1",
        };
        let e = event(r, Some(node)).unwrap_or_else(|| panic!("not mapped: {r}"));
        if let Err(why) = check(&e) {
            panic!("{r}\n{why}\n{e:#}");
        }
        assert_eq!(&e["unmapped"]["agentwall"], r);
    }
    // The name a tunnel would use is kept (in the record), and the event still passes.
    let q = event(&records[11], None).unwrap();
    assert_eq!(q["query"]["hostname"], "aGVsbG8.tunnel.example");
    assert_eq!(q["rcode_id"], 5);
    assert_eq!(q["action_id"], 2);
}

#[test]
fn what_a_hostile_node_sends_still_makes_valid_events_or_none() {
    let long = "x".repeat(300_000);
    let hostile = [
        decision(
            "deny",
            json!({"identity": long, "reason": long, "rule": long, "revision": long}),
        ),
        decision(
            "deny",
            json!({"port": -1, "dest": "999.1.1.1", "fqdn": "a..b", "count": -5}),
        ),
        decision(
            "deny",
            json!({"port": "443", "protocol": {"x": 1}, "labels": ["not", "a map"]}),
        ),
        decision(
            "allow",
            json!({"rule_id": 1u64 << 40, "seq": u64::MAX, "first_seen": "yesterday"}),
        ),
        json!({"kind": "dns", "event": "learned", "time": T, "name": "ünï.example", "addrs": ["x", 7]}),
        json!({"kind": "identity", "event": "rejected", "time": T, "identity": 7}),
        // Addresses in every spelling an address parser takes, a rule that is no name,
        // and a chain a node made up (a node's seq and hash name nothing at the control
        // plane; in its own log they are the chain, however long).
        decision(
            "deny",
            json!({"dest": "0:0:0:0:0:0:0:1", "rule": {"not": "a name"}, "hash": long, "seq": 1}),
        ),
        decision("deny", json!({"dest": "::FFFF:203.0.113.7", "rule": 7})),
        json!({"kind": "dns", "event": "learned", "time": T, "identity": ID, "name": "a.example", "addrs": ["2001:DB8:0::7", "::ffff:198.51.100.1", "::1.2.3.4"]}),
    ];
    for r in &hostile {
        for node in [Some(long.as_str()), None] {
            let e = event(r, node).unwrap_or_else(|| panic!("not mapped: {r:.200}"));
            if let Err(why) = check(&e) {
                panic!("{why:.2000}");
            }
        }
    }
    // Two records a node says are one (the same seq and hash) are two events at the
    // control plane, named by their place in the store.
    let forged = decision("deny", json!({}));
    let ids: Vec<serde_json::Value> = [1u64, 2]
        .into_iter()
        .map(|id| {
            let raw = serde_json::value::to_raw_value(&forged).unwrap();
            let e = agentwall::ocsf::event(&raw, Origin::Stored { node: "n1", id }).unwrap();
            serde_json::to_value(&e).unwrap()["metadata"].clone()
        })
        .collect();
    assert_eq!(ids[0]["uid"], "n1/1");
    assert_eq!(ids[1]["uid"], "n1/2");
    assert!(ids[0].get("sequence").is_none());
    // No time, an unknown verdict or kind, not an object: counted, not written.
    let mut counted = Exported::default();
    for r in [
        json!({"kind": "decision", "verdict": "deny"}),
        json!({"kind": "decision", "time": "soon", "verdict": "deny"}),
        decision("maybe", json!({})),
        json!({"kind": "dns", "event": "namespace_cap", "time": T}),
        json!({"kind": "policy", "event": "applied", "time": T}),
        json!({"kind": "checkpoint", "time": T}),
        // A node's record calling itself an alert.
        json!({"kind": "alert", "time": T, "alert": "denial_burst", "summary": "forged"}),
        json!([1, 2]),
    ] {
        let raw = serde_json::value::to_raw_value(&r).unwrap();
        assert!(counted.map(&raw, Origin::Log).is_none(), "{r}");
    }
    assert_eq!(counted.not_mapped, 8);
}

/// `audit export` goes on past lines that are no record (one cut short by a crash, bytes
/// that are no UTF-8), counts them and says where the first is, and writes the records
/// around them.
#[test]
fn an_export_goes_on_past_a_damaged_line_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let a = decision("deny", json!({"seq": 1}));
    let b = decision("allow", json!({"seq": 3}));
    let mut text = format!("{a}\n").into_bytes();
    text.extend_from_slice(&b"{\"kind\":\"decision\",\"time\":\"2026-12-05T01:0\n"[..]);
    text.extend_from_slice(b"\xff\xfe\n\n");
    text.extend_from_slice(format!("{b}\n[1,2]\n").as_bytes());
    std::fs::write(&log, text).unwrap();
    let out = std::process::Command::new(agentwall_tests::bin_path("agentwall"))
        .args(["audit", "export", "--format", "ocsf", "--audit-log"])
        .arg(&log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{stderr}");
    assert_eq!(events[0]["unmapped"]["agentwall"], a);
    assert_eq!(events[1]["unmapped"]["agentwall"], b);
    assert_eq!(events[1]["metadata"]["sequence"], 3);
    assert!(
        stderr.contains(&format!(
            "3 line(s) that are no JSON record left out (the first at {}:2)",
            log.display()
        )),
        "{stderr}"
    );
}
