//! The shape of what the node writes for people and tools: the keys and value types of every
//! audit event, and of `agentwall status --output json`. The golden files under
//! `tests/golden/` were captured from the node before it was split into owners; a change to
//! the node may not change what a SIEM rule or a script reads.
//!
//! `AGENTWALL_UPDATE_GOLDEN=1` rewrites them from this run (a deliberate change of shape).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use agentwall_tests::{
    DnsServer, NetNs, Probe, TestEnv, bin_path,
    node::{
        NodeProc, agentwall, audit_records, eventually, launch_args, run_ok, status_json,
        wait_status, write_cert,
    },
    pki::{Ca, CertSpec},
};

const SUPPORT: &str = "spiffe://example.org/agent/support";
const AUDITOR: &str = "spiffe://example.org/agent/auditor";
const NAMES: &str = "spiffe://example.org/agent/names";
const RESOLVER: &str = "192.0.2.53";

const POLICY: &str = "\
kind: AgentPolicy
name: support
identity: spiffe://example.org/agent/support
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
---
kind: AgentPolicy
name: auditor
identity: spiffe://example.org/agent/auditor
mode: audit
egress:
  - to: [198.51.100.0/24]
    ports: [443]
    protocol: tcp
---
kind: AgentPolicy
name: names
identity: spiffe://example.org/agent/names
egress:
  - to: [\"**.example.com\"]
    ports: [443]
    protocol: tcp
";

/// Keys present on some runs only: a process gone before its record was enriched, and the
/// reason the socket-family line is off (absent on kernels that run BPF LSM programs).
const MAY_VANISH: [&str; 3] = ["exe", "cmdline", ".socket_families.why"];

/// JSON type names of a value.
fn type_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Shape: a path (or group/key) → the JSON types seen there.
type Shape = BTreeMap<String, BTreeSet<String>>;

/// Every audit record grouped by what it is (`kind/event`, `decision/verdict`), each group's
/// keys with the types seen.
fn audit_shape(records: &[serde_json::Value]) -> BTreeMap<String, Shape> {
    let mut out: BTreeMap<String, Shape> = BTreeMap::new();
    for r in records {
        let kind = r["kind"].as_str().unwrap_or("?");
        let sub = r["event"]
            .as_str()
            .or_else(|| r["verdict"].as_str())
            .unwrap_or("");
        let group = out.entry(format!("{kind}/{sub}")).or_default();
        for (k, v) in r.as_object().unwrap() {
            group
                .entry(k.clone())
                .or_default()
                .insert(type_of(v).to_owned());
        }
    }
    out
}

/// Every path of a JSON value (`a.b[].c`) with the types seen there.
fn json_shape(v: &serde_json::Value, path: &str, out: &mut Shape) {
    out.entry(path.to_owned())
        .or_default()
        .insert(type_of(v).to_owned());
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                json_shape(x, &format!("{path}.{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                json_shape(x, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}

/// Compares `got` with the golden file `name` (or rewrites it when asked to).
fn check_golden<T: serde::Serialize + serde::de::DeserializeOwned>(
    name: &str,
    got: &T,
    compare: impl Fn(&T, &T) -> Vec<String>,
) {
    let path = golden_path(name);
    if std::env::var_os("AGENTWALL_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(got).unwrap() + "\n").unwrap();
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (AGENTWALL_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    let want: T = serde_json::from_str(&text).unwrap();
    let diff = compare(&want, got);
    assert!(
        diff.is_empty(),
        "{} differs from this run:\n{}",
        path.display(),
        diff.join("\n")
    );
}

fn shape_diff(group: &str, want: &Shape, got: &Shape) -> Vec<String> {
    let mut out = Vec::new();
    for (k, types) in want {
        match got.get(k) {
            None if MAY_VANISH.contains(&k.as_str()) => {}
            None => out.push(format!("{group}: `{k}` is missing (golden: {types:?})")),
            Some(t) if t != types => {
                out.push(format!("{group}: `{k}` has types {t:?}, golden {types:?}"));
            }
            Some(_) => {}
        }
    }
    for (k, types) in got {
        if !want.contains_key(k) {
            out.push(format!("{group}: `{k}` ({types:?}) is new"));
        }
    }
    out
}

fn audit_diff(want: &BTreeMap<String, Shape>, got: &BTreeMap<String, Shape>) -> Vec<String> {
    let mut out = Vec::new();
    for (g, shape) in want {
        match got.get(g) {
            None => out.push(format!("no {g} record was written")),
            Some(s) => out.extend(shape_diff(g, shape, s)),
        }
    }
    for g in got.keys() {
        if !want.contains_key(g) {
            out.push(format!("{g} records are new"));
        }
    }
    out
}

fn wait_audit(audit: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    eventually(what, Duration::from_secs(15), || {
        let all = audit_records(audit);
        if all.iter().any(&pred) {
            Ok(())
        } else {
            Err(format!("{} records so far", all.len()))
        }
    });
}

fn event(kind: &'static str, ev: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |r| r["kind"] == kind && r["event"] == ev
}

#[test]
fn audit_events_and_status_keep_their_shape() {
    let env = TestEnv::new("golden");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall test CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let crl = dir.join("ca.crl.pem");
    std::fs::write(&crl, ca.crl(&[])).unwrap();
    let zone = serde_json::json!({ "records": [
        { "name": "ok.example.com", "type": "A", "value": "203.0.113.7" },
        { "name": "meta.example.com", "type": "A", "value": "169.254.169.254" },
        { "name": "many.example.com", "type": "A", "value": "203.0.113.8" },
        { "name": "many.example.com", "type": "A", "value": "203.0.113.9" },
    ]});
    std::fs::write(dir.join("zone.json"), zone.to_string()).unwrap();
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"),
    )
    .unwrap();
    let ns = NetNs::new("golden");
    ns.ip(&["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"]);
    ns.ip(&["route", "add", "local", "203.0.113.0/24", "dev", "lo"]);
    let _dns = DnsServer::start(&ns, &format!("{RESOLVER}:53"), &dir.join("zone.json"));
    let audit = dir.join("audit.jsonl");
    let upstream = format!("{RESOLVER}:53");
    let node = NodeProc::start_in(
        &env,
        dir,
        &[
            "--dns-upstream",
            &upstream,
            "--dns-max-addresses",
            "1",
            "--audit-log",
            audit.to_str().unwrap(),
            "--audit-format",
            "ocsf",
            "--aggregate-window-secs",
            "1",
            "--crl",
            crl.to_str().unwrap(),
        ],
        &[],
        Some(&ns),
    );
    let sock = node.socket.to_str().unwrap().to_owned();
    let launch = |id: &str, name: &str| -> Probe {
        let (cert, key) = write_cert(dir, name, &ca.issue(&CertSpec::agent(id)));
        let mut c = launch_args(&node.socket, &cert, &key);
        ns.enter(&mut c);
        c.arg(bin_path("aw-probe"))
            .arg("--resolv-conf")
            .arg(dir.join("resolv.conf"));
        Probe::from_command(c)
    };

    // Decisions of every verdict, and a run of identical denials folded into one record.
    let mut support = launch(SUPPORT, "support");
    for _ in 0..3 {
        assert_eq!(support.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
    }
    assert_eq!(support.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(support.cmd("socket inet raw 1"), "err EPERM");
    let mut auditor = launch(AUDITOR, "auditor");
    assert_eq!(
        auditor.cmd("connect tcp 198.51.100.9 80"),
        "err ENETUNREACH"
    );
    let mut unbound = Probe::spawn(&env.cgroup("unenrolled"));
    assert_eq!(
        unbound.cmd("connect tcp 198.51.100.9 81"),
        "err ENETUNREACH"
    );
    wait_audit(&audit, "a folded denial", |r| {
        r["kind"] == "decision" && r["verdict"] == "deny" && r["count"].as_u64() > Some(1)
    });
    for v in ["allow", "audit", "unknown", "socket-deny"] {
        wait_audit(&audit, &format!("a {v} record"), |r| {
            r["kind"] == "decision" && r["verdict"] == v
        });
    }

    // DNS: learned, refused (the metadata address) and over the cap.
    let mut names = launch(NAMES, "names");
    for name in ["ok.example.com", "meta.example.com", "many.example.com"] {
        let answer = names.cmd(&format!("resolve {name} {RESOLVER} udp A"));
        assert!(answer.starts_with("ok"), "{name}: {answer}");
    }
    for ev in ["learned", "refused", "cap"] {
        wait_audit(&audit, &format!("dns {ev}"), event("dns", ev));
    }

    // Identity lifecycle: rejected, enrolled, renewed, expired, revoked by CRL, ended.
    let (nc, nk) = write_cert(
        dir,
        "nobody",
        &ca.issue(&CertSpec::agent("spiffe://example.org/agent/nobody")),
    );
    let out = launch_args(&node.socket, &nc, &nk)
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let unit = env.cgroup("services/support.service");
    let _svc = Probe::spawn(&unit);
    let (sc, sk) = write_cert(dir, "svc", &ca.issue(&CertSpec::agent(SUPPORT)));
    run_ok(
        agentwall()
            .args(["enroll", "--cgroup"])
            .arg(unit.path())
            .arg("--cert")
            .arg(&sc)
            .arg("--key")
            .arg(&sk)
            .args(["--socket", &sock]),
    );
    let mut renew = launch_args(&node.socket, &sc, &sk);
    ns.enter(&mut renew);
    renew.args([
        "sh",
        "-c",
        &format!(
            "{aw} renew --cert {c} --key {k} --socket {sock} >&2 && exec {probe}",
            aw = bin_path("agentwall").display(),
            c = sc.display(),
            k = sk.display(),
            probe = bin_path("aw-probe").display()
        ),
    ]);
    let mut renewed = Probe::from_command(renew);
    assert_eq!(renewed.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let (ec, ek) = write_cert(
        dir,
        "short",
        &ca.issue(&CertSpec::agent_expiring(SUPPORT, 2)),
    );
    let mut short = launch_args(&node.socket, &ec, &ek);
    ns.enter(&mut short);
    short.arg(bin_path("aw-probe"));
    let _short = Probe::from_command(short);
    // Past 90% of its life (an hour behind it, a minute ahead) and renewed by no one.
    let (ac, ak) = write_cert(
        dir,
        "aging",
        &ca.issue(&CertSpec::agent_expiring(SUPPORT, 60)),
    );
    let mut aging = launch_args(&node.socket, &ac, &ak);
    ns.enter(&mut aging);
    aging.arg(bin_path("aw-probe"));
    let _aging = Probe::from_command(aging);
    wait_audit(
        &audit,
        "the expiry warning",
        event("identity", "expires-soon"),
    );
    let listed = ca.issue(&CertSpec::agent(SUPPORT));
    let (lc, lk) = write_cert(dir, "listed", &listed);
    let mut cut = launch_args(&node.socket, &lc, &lk);
    ns.enter(&mut cut);
    cut.arg(bin_path("aw-probe"));
    let _cut = Probe::from_command(cut);
    let next = dir.join("ca.crl.pem.new");
    std::fs::write(&next, ca.crl(&[&listed.serial])).unwrap();
    std::fs::rename(&next, &crl).unwrap();
    let (tc, tk) = write_cert(dir, "brief", &ca.issue(&CertSpec::agent(SUPPORT)));
    let out = launch_args(&node.socket, &tc, &tk)
        .arg("true")
        .output()
        .unwrap();
    assert!(out.status.success());
    for ev in [
        "rejected",
        "enrolled",
        "renewed",
        "launched",
        "revoked-by-crl",
        "expired",
        "session-ended",
    ] {
        wait_audit(&audit, &format!("identity {ev}"), event("identity", ev));
    }

    // Policy: a broken edit is rejected and a valid one applied. Status is read both ways.
    std::fs::write(
        dir.join("policy/broken.yaml"),
        "kind: AgentPolicy\nname: [\n",
    )
    .unwrap();
    let broken = wait_status(&node.socket, "the edit to be rejected", |s| {
        s["policy_error"].is_string()
    });
    std::fs::remove_file(dir.join("policy/broken.yaml")).unwrap();
    std::fs::write(
        dir.join("policy/agents.yaml"),
        format!("{POLICY}# edited\n"),
    )
    .unwrap();
    let before = broken["revision"].clone();
    wait_status(&node.socket, "the edit to be applied", |s| {
        s["revision"] != before && s["policy_error"].is_null()
    });
    wait_audit(&audit, "policy rejected", event("policy", "rejected"));

    // Revocation of a whole identity.
    run_ok(agentwall().args(["revoke", AUDITOR, "--socket", &sock]));
    let status = status_json(&node.socket);
    assert_eq!(node.stop(), 0);

    let mut status_shape = Shape::new();
    json_shape(&broken, "", &mut status_shape);
    json_shape(&status, "", &mut status_shape);
    check_golden("status-shape.json", &status_shape, |w, g| {
        shape_diff("status", w, g)
    });
    let records = audit_records(&audit);
    check_golden("audit-shape.json", &audit_shape(&records), audit_diff);
    ocsf_export(&audit, &records);
    drop((support, auditor, unbound, names, renewed));
}

/// `audit export --format ocsf` of the log every kind of record was written to: each event
/// passes its OCSF class's JSON Schema, carries its record whole, and every record is
/// written or counted as left out.
/// The node wrote the same events as it went (`--audit-format ocsf`), beside the log.
fn ocsf_export(audit: &Path, records: &[serde_json::Value]) {
    let out = agentwall()
        .args(["audit", "export", "--format", "ocsf", "--audit-log"])
        .arg(audit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let exported = String::from_utf8(out.stdout).unwrap();
    let written = std::fs::read_to_string(audit.with_file_name("audit.ocsf.jsonl")).unwrap();
    let differ = exported
        .lines()
        .zip(written.lines())
        .position(|(a, b)| a != b);
    assert!(
        differ.is_none() && exported.lines().count() == written.lines().count(),
        "the node's OCSF file and the export differ (at event {differ:?}; {} and {} events)",
        written.lines().count(),
        exported.lines().count()
    );
    let events: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut seen: BTreeSet<(i64, i64, i64)> = BTreeSet::new();
    for e in &events {
        if let Err(why) = agentwall_tests::ocsf::check(e) {
            panic!("an event fails its OCSF class's schema:\n{why}\n{e:#}");
        }
        let native = &e["unmapped"]["agentwall"];
        assert!(records.contains(native), "{e:#}");
        seen.insert((
            e["class_uid"].as_i64().unwrap(),
            e["activity_id"].as_i64().unwrap(),
            e["status_id"].as_i64().unwrap(),
        ));
    }
    let left_out = records
        .iter()
        .filter(|r| !matches!(r["kind"].as_str(), Some("decision" | "dns" | "identity")))
        .count();
    assert_eq!(events.len() + left_out, records.len(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} event(s) written (OCSF 1.3.0); {left_out} record(s)",
            events.len()
        )),
        "{stderr}"
    );
    // Allowed and refused connections, a DNS answer, sessions bound, refused and ended,
    // and identities revoked.
    for want in [
        (4001, 1, 1),
        (4001, 5, 2),
        (4003, 2, 1),
        (3002, 1, 1),
        (3002, 1, 2),
        (3002, 2, 1),
        (3001, 5, 1),
    ] {
        assert!(seen.contains(&want), "no event {want:?} in {seen:?}");
    }
}
