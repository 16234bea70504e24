//! `agentwall report unused`, `agentwall policy simulate` and `agentwall policy suggest` on a
//! scripted history of decision records, through the real binary.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use agentwall_tests::bin_path;

const BOT: &str = "spiffe://example.org/agent/bot";

const CURRENT: &str = "\
kind: Archetype
name: llm
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
---
kind: Archetype
name: legacy
egress:
  - to: [198.51.100.7]
    ports: [22]
    protocol: tcp
---
kind: AgentPolicy
name: bot
identity: spiffe://example.org/agent/bot
extends: [llm, legacy]
egress:
  - to: [api.example.com]
    ports: [443]
    protocol: tcp
  - to: [203.0.113.0/24]
    ports: [8080]
    protocol: tcp
---
kind: AgentPolicy
name: helper
identity: spiffe://example.org/agent/helper
owner: ml-team@example.com
egress:
  - to: [192.0.2.77]
    ports: [9000]
    protocol: tcp
";

const CANDIDATE: &str = "\
kind: AgentPolicy
name: bot
identity: spiffe://example.org/agent/bot
egress:
  - to: [\"*.example.com\"]
    ports: [443]
    protocol: tcp
  - to: [198.51.100.0/24]
    ports: [443]
    protocol: tcp
";

fn agentwall(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("agentwall"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn policy_dir(root: &Path, name: &str, text: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), text).unwrap();
    dir
}

fn revision(dir: &Path) -> String {
    let (code, out, err) = agentwall(&["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.rsplit("revision ")
        .next()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned()
}

/// Decision records as the node writes them to its audit log.
fn history(revision: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let recent = fmt(now - time::Duration::hours(1));
    let old = fmt(now - time::Duration::days(30));
    let rec =
        |time: &str, verdict: &str, dest: &str, port: u16, extra: serde_json::Value, count: u64| {
            let mut v = serde_json::json!({
                "seq": 1, "kind": "decision", "time": time, "verdict": verdict,
                "identity": BOT, "pid": 7, "comm": "bot", "uid": 1000, "cgroup_id": 9,
                "dest": dest, "port": port, "protocol": "tcp", "revision": revision,
                "count": count,
            });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v.to_string()
        };
    [
        // Not a decision: skipped.
        serde_json::json!({ "seq": 0, "kind": "policy", "event": "applied" }).to_string(),
        rec(
            &recent,
            "allow",
            "192.0.2.10",
            443,
            serde_json::json!({ "rule_id": 1 }),
            5,
        ),
        rec(
            &recent,
            "allow",
            "203.0.113.9",
            443,
            serde_json::json!({ "rule_id": 3, "fqdn": "api.example.com" }),
            2,
        ),
        rec(
            &recent,
            "deny",
            "198.51.100.99",
            443,
            serde_json::json!({ "reason": "no rule allows it" }),
            3,
        ),
        // Not a verdict of the rules: never "newly allowed".
        rec(
            &recent,
            "deny",
            "203.0.113.50",
            443,
            serde_json::json!({ "reason": "identity revoked" }),
            1,
        ),
        rec(
            &old,
            "allow",
            "203.0.113.9",
            8080,
            serde_json::json!({ "rule_id": 4 }),
            1,
        ),
        // From outside to the agent's port 8088: in audit mode, would-refusals (proposed as
        // ingress rules); in enforce mode, a denial anyone can cause (not proposed).
        rec(
            &recent,
            "audit",
            "198.51.100.20",
            8088,
            serde_json::json!({ "direction": "inbound", "reason": "no ingress rule allows it" }),
            4,
        ),
        rec(
            &recent,
            "audit",
            "2001:db8::5",
            8088,
            serde_json::json!({ "direction": "inbound", "reason": "no ingress rule allows it" }),
            1,
        ),
        rec(
            &recent,
            "deny",
            "203.0.113.66",
            22,
            serde_json::json!({ "direction": "inbound", "reason": "no ingress rule allows it" }),
            9,
        ),
    ]
    .join("\n")
        + "\n"
}

#[test]
fn unused_simulate_and_suggest_on_a_scripted_history() {
    let tmp = tempfile::tempdir().unwrap();
    let current = policy_dir(tmp.path(), "current", CURRENT);
    let candidate = policy_dir(tmp.path(), "candidate", CANDIDATE);
    let rev = revision(&current);
    let audit = tmp.path().join("audit.jsonl");
    std::fs::write(&audit, history(&rev)).unwrap();
    let audit_s = audit.to_str().unwrap();
    let cur = current.display().to_string();

    // Over the last week: the legacy archetype's rule and rule 4 saw no flow.
    let (code, out, err) = agentwall(&[
        "report",
        "unused",
        "--since",
        "7d",
        "--audit-log",
        audit_s,
        "--policy",
        &cur,
    ]);
    assert_eq!(code, 0, "{err}");
    let f = format!("{cur}/policy.yaml");
    assert_eq!(
        out,
        format!(
            "owner ml-team@example.com:\n\
             \x20 unused: spiffe://example.org/agent/helper rule 1 ({f}:27 egress[0], AgentPolicy \"helper\")\n\
             no owner:\n\
             \x20 unused: {BOT} rule 2 ({f}:8 egress[0], Archetype \"legacy\")\n\
             \x20 unused: {BOT} rule 4 ({f}:15 egress[1], AgentPolicy \"bot\")\n\
             unused archetype: legacy\n\
             3 unused rule(s), 1 unused archetype(s); 7 allowed flow(s) counted under revision {rev}\n"
        )
    );
    // Over all of it, rule 4 was used once.
    let (_, out, _) = agentwall(&[
        "report",
        "unused",
        "--audit-log",
        audit_s,
        "--policy",
        &cur,
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(v["rules"][0]["owner"], "ml-team@example.com");
    assert_eq!(v["rules"][1].get("owner"), None);
    assert_eq!(v["hits"], 8);

    // The candidate drops the /24 and port 8080 and adds 198.51.100.0/24:443; the name flow
    // stays allowed through "*.example.com".
    let cand = candidate.display().to_string();
    let (code, out, _) = agentwall(&["policy", "simulate", "--policy", &cand, "--flows", audit_s]);
    assert_eq!(code, 1, "new denials fail the command");
    let crev = revision(&candidate);
    assert_eq!(
        out,
        format!(
            "newly denied: {BOT} -> 192.0.2.10:443/tcp (x5): no rule allows it\n\
             newly denied: {BOT} -> 203.0.113.9:8080/tcp (x1): no rule allows it\n\
             newly allowed: {BOT} -> 198.51.100.99:443/tcp (x3): rule {cand}/policy.yaml:1 egress[1]\n\
             11 flow(s) replayed against revision {crev}: 2 newly denied, 1 newly allowed\n"
        )
    );
    let (code, _, _) = agentwall(&[
        "policy",
        "simulate",
        "--policy",
        &cand,
        "--since",
        "7d",
        "--audit-log",
        audit_s,
        "--allow-new-denials",
    ]);
    assert_eq!(code, 0);

    // Suggest: a valid policy that newly denies nothing of what was seen.
    let (code, yaml, err) = agentwall(&[
        "policy",
        "suggest",
        "--identity",
        BOT,
        "--audit-log",
        audit_s,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        yaml,
        format!(
            "kind: AgentPolicy\nname: bot\nidentity: {BOT}\nmode: enforce\negress:\n\
             \x20 - to: [192.0.2.10, 198.51.100.99, 203.0.113.50, api.example.com]\n\
             \x20   ports: [\"443\"]\n    protocol: tcp\n\
             \x20 - to: [203.0.113.9]\n    ports: [\"8080\"]\n    protocol: tcp\n\
             ingress:\n\
             \x20 - from: [198.51.100.20, \"2001:db8::5\"]\n    ports: [\"8088\"]\n    protocol: tcp\n"
        )
    );
    let suggested = policy_dir(tmp.path(), "suggested", &yaml);
    let (code, out, _) = agentwall(&[
        "policy",
        "simulate",
        "--policy",
        suggested.to_str().unwrap(),
        "--flows",
        audit_s,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": 0 newly denied, "), "{out}");

    // Bad input says what is wrong.
    let (code, _, err) = agentwall(&[
        "report",
        "unused",
        "--since",
        "7w",
        "--audit-log",
        audit_s,
        "--policy",
        &cur,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid duration \"7w\""), "{err}");
    let (code, _, err) = agentwall(&[
        "report",
        "unused",
        "--audit-log",
        tmp.path().join("missing.jsonl").to_str().unwrap(),
        "--policy",
        &cur,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.jsonl: No such file"), "{err}");
}

/// `audit verify` through the binary: a rotated file deleted, or the chain's start cut away,
/// fails and names what is missing; the trusted point the rest continues makes it pass.
#[test]
fn audit_verify_finds_missing_files_and_a_missing_start() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("audit.jsonl");
    let mut log = agentwall::audit::AuditLog::open(&path, 600).unwrap();
    for i in 0..20 {
        log.append("decision", serde_json::json!({ "port": i }))
            .unwrap();
    }
    drop(log);
    let p = path.to_str().unwrap();
    let (code, out, err) = agentwall(&["audit", "verify", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("20 records in "), "{out}");

    let first = tmp.path().join("audit.jsonl.1");
    let text = std::fs::read_to_string(&first).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    std::fs::remove_file(&first).unwrap();
    let (code, _, err) = agentwall(&["audit", "verify", p]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "agentwall audit verify: {} is missing: the chain has rotated files up to {}, so records are gone",
            first.display(),
            agentwall::audit::rotated(&path).last().unwrap().1.display()
        )
    );
    // The files that are left, named one by one: no genesis.
    let mut rest: Vec<String> = agentwall::audit::rotated(&path)
        .into_iter()
        .map(|(_, f)| f.display().to_string())
        .collect();
    rest.push(p.to_owned());
    let mut args = vec!["audit", "verify"];
    args.extend(rest.iter().map(String::as_str));
    let (code, _, err) = agentwall(&args);
    assert_eq!(code, 1);
    assert!(err.contains("does not start at its genesis"), "{err}");
    // With the trusted point they continue from.
    let point = format!("{}:{}", last["seq"], last["hash"].as_str().unwrap());
    args.extend(["--from", point.as_str()]);
    let (code, out, err) = agentwall(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chain intact"), "{out}");
}
