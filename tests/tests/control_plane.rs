//! The control plane: the real server process over real TLS on loopback, the real `agentwall
//! cp` CLI, and (in the kernel tests) the real node enforcing what was pushed.

use std::{
    io::{Read, Write as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::pem::PemObject as _;

use agentwall::control_plane::{
    Ingested, PollReply, PollRequest, ReportBatch, Reported, client::ClientError,
};
use agentwall_tests::{
    SmallDisk,
    cp::{
        ADMIN_ID, CpFixture, CpProc, NODE_ID, POLICY_B, WebhookReceiver, admin_creds, cp, cp_json,
        node_args, push, security, stored,
    },
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, agentwall, audit_records, eventually, launch_probe,
        loopback_addr, metric, run_json, scrape, setup, status_json, wait_status, write_cert,
    },
    pki::{Ca, CertSpec},
};

const POLICY_A: &str = SUPPORT_POLICY;

fn policy_dir(root: &Path, name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (n, t) in files {
        std::fs::write(d.join(n), t).unwrap();
    }
    d
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn record(
    verdict: &str,
    identity: Option<&str>,
    dest: &str,
    service: Option<&str>,
    seq: u64,
) -> serde_json::Value {
    let mut r = serde_json::json!({
        "kind": "decision", "seq": seq, "time": format!("2026-11-23T00:00:{:02}.000Z", seq % 60),
        "verdict": verdict, "pid": 7, "comm": "agent", "uid": 0, "cgroup_id": 1,
        "dest": dest, "port": 443, "protocol": "tcp", "revision": "r", "count": 1,
        "exe": "/usr/bin/agent",
    });
    if let Some(i) = identity {
        r["identity"] = i.into();
    }
    if let Some(s) = service {
        r["service"] = s.into();
        r["unit"] = "notebook.service".into();
    }
    r
}

fn batch(epoch: u64, first_rid: u64, records: &[serde_json::Value]) -> ReportBatch {
    ReportBatch {
        epoch,
        records: records
            .iter()
            .enumerate()
            .map(|(i, r)| Reported {
                rid: first_rid + i as u64,
                record: serde_json::value::RawValue::from_string(r.to_string()).unwrap(),
            })
            .collect(),
    }
}

#[test]
fn pushes_are_validated_whole_and_roles_are_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let security_tok = fx.security_token.display().to_string();
    let security = ["--token-file", security_tok.as_str()];

    // Nothing pushed yet.
    let out = cp(&fx, &url, &admin, &["policy", "show"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("404 Not Found: no policy has been pushed yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A valid push gets version 1 and the revision `policy check` computes.
    let good = policy_dir(tmp.path(), "good", &[("agents.yaml", POLICY_A)]);
    let revision = agentwall::policy::source::load_dir(&good).unwrap().revision;
    let pushed = cp_json(
        &fx,
        &url,
        &admin,
        &["policy", "push", good.to_str().unwrap()],
    );
    assert_eq!(pushed["version"], 1);
    assert_eq!(pushed["revision"], revision.as_str());

    // Made from version 0 while 1 is the newest (another admin pushed meanwhile): refused,
    // nothing stored; made from 1, stored as 2.
    let out = cp(
        &fx,
        &url,
        &admin,
        &[
            "policy",
            "push",
            good.to_str().unwrap(),
            "--base-version",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "409 Conflict: version 1 was pushed since version 0, which this push was made from; nothing was stored"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = cp_json(&fx, &url, &admin, &["policy", "show"]);
    assert_eq!(shown["version"], 1);
    let pushed = cp_json(
        &fx,
        &url,
        &admin,
        &[
            "policy",
            "push",
            good.to_str().unwrap(),
            "--base-version",
            "1",
        ],
    );
    assert_eq!(pushed["version"], 2);

    // An invalid bundle is refused whole, with each problem at its file, line and column
    // (as the admin's directory has them), and nothing is stored.
    let bad = policy_dir(
        tmp.path(),
        "bad",
        &[
            ("agents.yaml", POLICY_A),
            (
                "more.yaml",
                "kind: AgentPolicy\nname: other\nidentity: spiffe://example.org/agent/other\negress:\n  - to: [192.0.2.0/33]\n    ports: [443]\n    protocol: tcp\n",
            ),
        ],
    );
    let out = cp(
        &fx,
        &url,
        &admin,
        &["policy", "push", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let local = agentwall::policy::source::load_dir(&bad)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err.lines().next().unwrap(),
        local.lines().next().unwrap(),
        "{err}"
    );
    assert!(
        err.starts_with(&format!("{}:5:", bad.join("more.yaml").display())),
        "{err}"
    );
    assert!(
        err.contains("the bundle is invalid (1 problem(s)); nothing was stored"),
        "{err}"
    );
    let shown = cp_json(&fx, &url, &security, &["policy", "show"]);
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["pushed_by"], ADMIN_ID);
    assert_eq!(shown["files"][0]["text"], POLICY_A);

    // A file name that is not a plain policy file name is refused too.
    let rt = rt();
    let admin_client = fx.client(&url, Some(fx.admin.clone()), None);
    let e = rt
        .block_on(admin_client.send_json::<serde_json::Value>(
            hyper::Method::PUT,
            "/v1/policy",
            &serde_json::json!({ "files": [{ "name": "../etc/x.yaml", "text": POLICY_A }] }),
            Duration::from_secs(10),
        ))
        .unwrap_err();
    match e {
        ClientError::Refused { status, errors, .. } => {
            assert_eq!(status, 422);
            assert_eq!(
                errors[0].message,
                "bundle file name \"../etc/x.yaml\" is not a plain *.yaml or *.yml file name"
            );
        }
        e => panic!("{e}"),
    }

    // Security reads but may not push; the refusal is logged.
    let out = cp(
        &fx,
        &url,
        &security,
        &["policy", "push", good.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403 Forbidden: token:")
            && err.contains("(role security) may not use PUT /v1/policy: it needs role admin"),
        "{err}"
    );
    // Nor revoke.
    let out = cp(
        &fx,
        &url,
        &security,
        &["revoke", "spiffe://example.org/agent/support"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("may not use POST /v1/revocations: it needs role admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An admin token on a node route is refused.
    let admin_by_token = fx.client(&url, None, Some(&fx.admin_token));
    let e = rt
        .block_on(admin_by_token.send_json::<PollReply>(
            hyper::Method::POST,
            "/v1/node/poll",
            &PollRequest::default(),
            Duration::from_secs(10),
        ))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("(role admin) may not use POST /v1/node/poll: it needs role node"),
        "{e}"
    );
    // ...and a node may not read flows or push.
    let node = fx.client(&url, Some(fx.node.clone()), None);
    let e = rt
        .block_on(node.get::<serde_json::Value>("/v1/flows"))
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "{NODE_ID} (role node) may not use GET /v1/flows: it needs role admin or security"
        )),
        "{e}"
    );

    // A node certificate from another CA never gets past the handshake.
    let rogue_ca = Ca::new("rogue");
    let rogue = write_cert(&fx.dir, "rogue", &rogue_ca.issue(&CertSpec::agent(NODE_ID)));
    let e = rt
        .block_on(fx.client(&url, Some(rogue), None).send_json::<PollReply>(
            hyper::Method::POST,
            "/v1/node/poll",
            &PollRequest::default(),
            Duration::from_secs(10),
        ))
        .unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    // A certificate from the right CA whose ID holds no role is refused.
    let stranger = write_cert(
        &fx.dir,
        "stranger",
        &fx.ca
            .issue(&CertSpec::agent("spiffe://example.org/agent/support")),
    );
    let e = rt
        .block_on(
            fx.client(&url, Some(stranger), None)
                .get::<serde_json::Value>("/v1/nodes"),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("spiffe://example.org/agent/support holds no role on this control plane"),
        "{e}"
    );
    // So is a token nobody configured.
    let wrong = fx.dir.join("wrong.token");
    std::fs::write(&wrong, "guess").unwrap();
    let e = rt
        .block_on(
            fx.client(&url, None, Some(&wrong))
                .get::<serde_json::Value>("/v1/nodes"),
        )
        .unwrap_err();
    assert!(e.to_string().contains("403 Forbidden: token:"), "{e}");

    // Client settings that cannot work are refused before anything is sent.
    for (args, error) in [
        (
            vec!["nodes"],
            "control plane client: no url (https://HOST:PORT) is set",
        ),
        (
            vec!["--url", "http://127.0.0.1:1", "nodes"],
            "url \"http://127.0.0.1:1\" must start with https://",
        ),
        (
            vec!["--url", url.as_str(), "--cert", "x.pem", "nodes"],
            "cert and key go together: set both or neither",
        ),
    ] {
        let out = std::process::Command::new(agentwall_tests::bin_path("agentwall"))
            .arg("cp")
            .args(["--ca"])
            .arg(&fx.ca_pem)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(error),
            "{args:?}: {err}"
        );
    }

    let log = wait_log(&server, "the handshake refusal logged", |l| {
        l.contains("TLS handshake refused")
    });
    assert_eq!(
        log.matches("request refused").count(),
        6,
        "every refusal is logged once:\n{log}"
    );
}

/// A control plane that requires owners refuses a bundle with an AgentPolicy that names
/// none, at that policy's file and line, and stores nothing; with owners it is stored.
#[test]
fn a_control_plane_that_requires_owners_refuses_a_policy_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start_with(&fx, None, "cp", &["--require-owner"]);
    let url = server.url.clone();
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let owned = format!("{POLICY_A}owner: support-team@example.com\n");
    let unowned = "kind: AgentPolicy\nname: other\nidentity: spiffe://example.org/agent/other\n";
    let bad = policy_dir(
        tmp.path(),
        "bad",
        &[("agents.yaml", &owned), ("more.yaml", unowned)],
    );
    // `policy check` only warns.
    let out = agentwall()
        .args(["policy", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "{}:1: warning: AgentPolicy \"other\" has no owner",
            bad.join("more.yaml").display()
        )),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cp(
        &fx,
        &url,
        &admin,
        &["policy", "push", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}:1:1: AgentPolicy \"other\" has no owner, and this control plane requires one (require_owner)",
            bad.join("more.yaml").display()
        )) && err.contains("the bundle is invalid (1 problem(s)); nothing was stored"),
        "{err}"
    );
    let out = cp(&fx, &url, &admin, &["policy", "show"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no policy has been pushed yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = push(&fx, &url, "good", &owned);
    assert_eq!(
        pushed,
        agentwall::policy::source::load_dir(&fx.dir.join("good"))
            .unwrap()
            .revision
    );
}

#[test]
fn reports_are_stored_once_and_read_back_by_filter_page_and_node() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let rt = rt();
    let n1 = fx.node_client(&url, "n1");
    let n2 = fx.node_client(&url, "n2");
    let id = ID;
    let recs1: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            if i < 6 {
                record("deny", Some(id), "203.0.113.7", None, i)
            } else {
                record("unknown", None, "198.51.100.20", Some("openai"), i)
            }
        })
        .collect();
    let b = batch(42, 1, &recs1);
    let first: Ingested = rt.block_on(n1.post_reports(&b)).unwrap();
    assert_eq!(
        first,
        Ingested {
            accepted: 10,
            duplicates: 0,
            expired: 0
        }
    );
    // The same batch again (a node that never saw the answer) is stored once.
    let again: Ingested = rt.block_on(n1.post_reports(&b)).unwrap();
    assert_eq!(
        again,
        Ingested {
            accepted: 0,
            duplicates: 10,
            expired: 0
        }
    );
    let b2 = batch(
        7,
        1,
        &[record(
            "unknown",
            None,
            "198.51.100.21",
            Some("anthropic"),
            3,
        )],
    );
    rt.block_on(n2.post_reports(&b2)).unwrap();

    let sec = fx.security_token.display().to_string();
    let security = ["--token-file", sec.as_str()];
    let all = cp_json(&fx, &url, &security, &["flows", "--all"]);
    assert_eq!(all["flows"].as_array().unwrap().len(), 11);
    let denies = cp_json(
        &fx,
        &url,
        &security,
        &["flows", "--verdict", "deny", "--identity", id, "--all"],
    );
    assert_eq!(denies["flows"].as_array().unwrap().len(), 6);
    assert!(
        denies["flows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["node"] == "spiffe://example.org/node/n1")
    );
    let by_dest = cp_json(&fx, &url, &security, &["flows", "--dest", "198.51.100.21"]);
    assert_eq!(by_dest["flows"][0]["node"], "spiffe://example.org/node/n2");
    let by_service = cp_json(
        &fx,
        &url,
        &security,
        &["flows", "--service", "openai", "--all"],
    );
    assert_eq!(by_service["flows"].as_array().unwrap().len(), 4);
    let by_node = cp_json(
        &fx,
        &url,
        &security,
        &["flows", "--node", "spiffe://example.org/node/n2"],
    );
    assert_eq!(by_node["flows"].as_array().unwrap().len(), 1);
    // Time range over the records' own times.
    let timed = cp_json(
        &fx,
        &url,
        &security,
        &[
            "flows",
            "--since",
            "2026-11-23T00:00:02Z",
            "--until",
            "2026-11-23T00:00:05Z",
            "--node",
            "spiffe://example.org/node/n1",
        ],
    );
    assert_eq!(timed["flows"].as_array().unwrap().len(), 3);
    // Pages: 4 + 4 + 3, each continuing after the last.
    let p1 = cp_json(&fx, &url, &security, &["flows", "--limit", "4"]);
    assert_eq!(p1["flows"].as_array().unwrap().len(), 4);
    let next = p1["next"].as_u64().unwrap().to_string();
    let p2 = cp_json(
        &fx,
        &url,
        &security,
        &["flows", "--limit", "4", "--after", &next],
    );
    assert_eq!(
        p2["flows"][0]["id"].as_u64().unwrap(),
        p1["next"].as_u64().unwrap() + 1
    );
    // Text form: node first, then the record as `agentwall flows` prints it.
    let out = cp(
        &fx,
        &url,
        &security,
        &["flows", "--verdict", "deny", "--limit", "1"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("spiffe://example.org/node/n1 2026-11-23T00:00:00.000Z deny    spiffe://example.org/agent/support pid=7 (agent) -> 203.0.113.7:443/tcp"),
        "{text}"
    );
    assert!(text.contains("more: --after "), "{text}");
    // Bad filters are refused with the value.
    let out = cp(&fx, &url, &security, &["flows", "--since", "yesterday"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"yesterday\" is neither a duration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sec_client = fx.client(&url, None, Some(&fx.security_token));
    for (query, error) in [
        ("limit=0", "limit 0 is outside 1..=10000"),
        (
            "dest=example.com",
            "dest \"example.com\" is not an IP address",
        ),
        (
            "verdict=denied",
            "verdict \"denied\" is not one of deny, audit, unknown, socket-deny, allow",
        ),
        ("since=monday", "since \"monday\" is not an RFC 3339 time"),
        ("format=cef", "format \"cef\" is not ocsf"),
    ] {
        let e = rt
            .block_on(sec_client.get::<serde_json::Value>(&format!("/v1/flows?{query}")))
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("400 Bad Request: {error}")),
            "{query}: {e}"
        );
    }

    // For a SIEM: the same records as OCSF Network Activity events, each passing its class's
    // schema, with the node and the stored record kept.
    let out = cp(
        &fx,
        &url,
        &security,
        &["flows", "--all", "--format", "ocsf"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 11);
    for e in &events {
        if let Err(why) = agentwall_tests::ocsf::check(e) {
            panic!("an event fails its OCSF class's schema:\n{why}\n{e:#}");
        }
        assert_eq!(e["class_uid"], 4001);
    }
    let denied: Vec<&serde_json::Value> = events.iter().filter(|e| e["action_id"] == 2).collect();
    assert_eq!(denied.len(), 6);
    assert_eq!(
        denied[0]["unmapped"]["node"],
        "spiffe://example.org/node/n1"
    );
    assert_eq!(denied[0]["unmapped"]["agentwall"]["identity"], id);
    assert_eq!(denied[0]["dst_endpoint"]["ip"], "203.0.113.7");
    let page: serde_json::Value = rt
        .block_on(sec_client.get("/v1/flows?format=ocsf&limit=4"))
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 4);
    assert_eq!(page["not_mapped"], 0);
    assert!(page["next"].is_u64(), "{page}");

    // Shadow AI across nodes: each node's process groups with their services.
    let shadow = cp_json(&fx, &url, &security, &["shadow-ai"]);
    let nodes: Vec<&str> = shadow
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        [
            "spiffe://example.org/node/n1",
            "spiffe://example.org/node/n2"
        ]
    );
    assert_eq!(shadow[0]["groups"][0]["group"], "unit notebook.service");
    assert_eq!(shadow[0]["groups"][0]["services"][0]["service"], "openai");
    assert_eq!(shadow[0]["groups"][0]["services"][0]["count"], 4);
    assert_eq!(
        shadow[1]["groups"][0]["services"][0]["service"],
        "anthropic"
    );

    // Nodes are listed with what they said in their last poll.
    rt.block_on(
        n1.send_json::<PollReply>(
            hyper::Method::POST,
            "/v1/node/poll",
            &PollRequest {
                applied_version: Some(3),
                applied_revision: Some("abc".into()),
                agent_version: "9.9.9".into(),
                owner: Some("platform@example.com".parse().unwrap()),
                labels: agentwall::policy::owner::Labels::from_assignments(["site=fra1", "tier=1"])
                    .unwrap(),
                ..PollRequest::default()
            },
            Duration::from_secs(10),
        ),
    )
    .unwrap();
    let nodes = cp_json(&fx, &url, &security, &["nodes"]);
    assert_eq!(nodes[0]["node"], "spiffe://example.org/node/n1");
    assert_eq!(nodes[0]["applied_version"], 3);
    assert_eq!(nodes[0]["applied_revision"], "abc");
    assert_eq!(nodes[0]["agent_version"], "9.9.9");
    assert_eq!(nodes[0]["owner"], "platform@example.com");
    assert_eq!(
        nodes[0]["labels"],
        serde_json::json!({"site": "fra1", "tier": "1"})
    );
    let text = cp(&fx, &url, &security, &["nodes", "--output", "text"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("agentwall 9.9.9 owner platform@example.com labels site=fra1,tier=1"),
        "{text}"
    );
    // Whom to ask about the shadow AI on a node: its owner, beside its groups.
    let shadow = cp_json(&fx, &url, &security, &["shadow-ai"]);
    assert_eq!(shadow[0]["owner"], "platform@example.com");
    assert_eq!(shadow[0]["labels"]["site"], "fra1");
    assert_eq!(shadow[1].get("owner"), None);
    // An owner or labels this control plane does not take (a node of another version) are
    // left out, never a reason to refuse the poll: the node still gets its bundles and
    // revocations.
    for bad in [
        serde_json::json!({"owner": "a\nb"}),
        serde_json::json!({"owner": "ops\u{200B}@example.com"}),
        serde_json::json!({"labels": {"site": "fra 1"}}),
        serde_json::json!({"owner": 7, "labels": ["x"]}),
        serde_json::json!({"sessions": {"not a SPIFFE ID": 1}}),
        serde_json::json!({"sessions": {ID: -1}}),
        serde_json::json!({"sessions": (0..257)
            .map(|i| (format!("spiffe://example.org/agent/{i}"), serde_json::json!(1)))
            .collect::<serde_json::Map<_, _>>()}),
    ] {
        let mut poll = serde_json::to_value(PollRequest {
            agent_version: "9.9.9".into(),
            wait_ms: 0,
            ..PollRequest::default()
        })
        .unwrap();
        for (k, v) in bad.as_object().unwrap() {
            poll[k] = v.clone();
        }
        rt.block_on(n1.send_json::<PollReply>(
            hyper::Method::POST,
            "/v1/node/poll",
            &poll,
            Duration::from_secs(10),
        ))
        .unwrap_or_else(|e| panic!("{bad}: {e}"));
        let n = cp_json(&fx, &url, &security, &["nodes"]);
        assert_eq!(n[0].get("owner"), None, "{bad}: {n}");
        assert_eq!(n[0].get("labels"), None, "{bad}: {n}");
        assert_eq!(n[0].get("sessions"), None, "{bad}: {n}");
    }

    // Everything is still there after a restart of the server (same database).
    drop(server);
    let server = CpProc::start(&fx, None);
    let all = cp_json(&fx, &server.url, &security, &["flows", "--all"]);
    assert_eq!(all["flows"].as_array().unwrap().len(), 11);

    // Owners are a filter: the records of the identities one team answers for.
    let mut owned = record("deny", Some(id), "203.0.113.9", None, 40);
    owned["owner"] = "payments@example.org".into();
    let n1 = fx.node_client(&server.url, "n1");
    rt.block_on(n1.post_reports(&batch(42, 100, &[owned])))
        .unwrap();
    let by_owner = cp_json(
        &fx,
        &server.url,
        &security,
        &["flows", "--owner", "payments@example.org", "--all"],
    );
    let flows = by_owner["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "{by_owner}");
    assert_eq!(flows[0]["record"]["dest"], "203.0.113.9");
}

#[test]
fn a_revocation_wakes_every_waiting_node_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let rt = rt();
    let clients: Vec<_> = (0..20)
        .map(|i| fx.node_client(&url, &format!("w{i}")))
        .collect();
    let id = ID;
    let got = rt.block_on(async {
        // Each node first learns the current state, then waits (up to 25 s) for news.
        let mut waits = Vec::new();
        for c in clients {
            let c = std::sync::Arc::new(c);
            let now: PollReply = c
                .send_json(
                    hyper::Method::POST,
                    "/v1/node/poll",
                    &PollRequest::default(),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            waits.push(tokio::spawn(async move {
                let req = PollRequest {
                    known_version: now.version,
                    revocation_gen: now.revocation_gen,
                    wait_ms: 25_000,
                    ..PollRequest::default()
                };
                let r: PollReply = c
                    .send_json(
                        hyper::Method::POST,
                        "/v1/node/poll",
                        &req,
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
                (std::time::Instant::now(), r)
            }));
        }
        // The waits are held by the server before the revocation goes in.
        tokio::task::block_in_place(|| {
            eventually("20 polls held", Duration::from_secs(30), || {
                let n = try_cp_metric(&fx, &server, "agentwall_cp_polls_held")?;
                if n == 20 {
                    Ok(())
                } else {
                    Err(format!("held {n}"))
                }
            })
        });
        let admin = fx.client(&url, Some(fx.admin.clone()), None);
        let revoked_at = std::time::Instant::now();
        let r: serde_json::Value = admin
            .send_json(
                hyper::Method::POST,
                "/v1/revocations",
                &serde_json::json!({ "identity": id }),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r["generation"], 1);
        let mut out = Vec::new();
        for w in waits {
            let (at, reply) = w.await.unwrap();
            out.push((at.saturating_duration_since(revoked_at), reply));
        }
        out
    });
    let slowest = got.iter().map(|(d, _)| *d).max().unwrap();
    eprintln!("revocation reached 20 waiting nodes; slowest after {slowest:?}");
    for (_, reply) in &got {
        assert_eq!(reply.revocation_gen, 1);
        assert_eq!(reply.revoked, [id]);
    }
    // Woken by the revocation, not by the end of the 25 s wait.
    assert!(slowest < Duration::from_secs(20), "{slowest:?}");
    // A malformed identity is refused with the value.
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(&fx, &url, &admin, &["revoke", "not-an-id"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"not-an-id\" is not a SPIFFE ID"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const ID: &str = SUPPORT_ID;

#[test]
fn a_push_is_enforced_on_the_node_and_its_denials_reach_security() {
    let (env, tmp, ca) = setup("cp-push", POLICY_A);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let flags = fx.node_flags(&url);
    let audit = dir.join("audit.jsonl");
    let host = [
        "--owner",
        "platform@example.com",
        "--label",
        "site=lab1",
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &host));
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));

    // Pushed from the admin CLI, enforced in the node's kernel; the policy's owner and labels
    // travel with its records.
    let owned = format!("{POLICY_A}owner: support-team@example.com\nlabels:\n  team: support\n");
    let rev1 = push(&fx, &url, "v1", &owned);
    wait_status(&node.socket, "version 1 applied", |s| {
        s["revision"] == rev1.as_str()
    });
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");

    // The denial shows up for security, attributed to the node.
    let denial = eventually(
        "the denial at the control plane",
        Duration::from_secs(10),
        || {
            let s = stored(&fx, &url, "deny");
            s.into_iter()
                .next()
                .ok_or_else(|| "no denial yet".to_owned())
        },
    );
    assert_eq!(denial["node"], NODE_ID);
    assert_eq!(denial["record"]["dest"], "198.51.100.10");
    assert_eq!(denial["record"]["port"], 443);
    assert_eq!(denial["record"]["revision"], rev1.as_str());
    assert_eq!(denial["record"]["owner"], "support-team@example.com");
    assert_eq!(
        denial["record"]["labels"],
        serde_json::json!({"team": "support"})
    );
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let text = cp(&fx, &url, &sec, &["flows", "--verdict", "deny"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!("{NODE_ID} "))
            && String::from_utf8_lossy(&text.stdout)
                .contains(&format!("{ID} (owner support-team@example.com) pid="))
            && String::from_utf8_lossy(&text.stdout)
                .contains("-> 198.51.100.10:443/tcp: no rule allows it"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // The node's own record of it says the same, and so does its status.
    let local = audit_records(&audit)
        .into_iter()
        .find(|r| r["kind"] == "decision" && r["dest"] == "198.51.100.10")
        .expect("the denial in the node's audit log");
    assert_eq!(local["owner"], "support-team@example.com");
    assert_eq!(local["labels"]["team"], "support");
    let st = status_json(&node.socket);
    assert_eq!(st["identities"][0]["owner"], "support-team@example.com");
    assert_eq!(st["identities"][0]["labels"]["team"], "support");

    // A new push replaces the allowlist atomically on the node.
    let rev2 = push(&fx, &url, "v2", POLICY_B);
    wait_status(&node.socket, "version 2 applied", |s| {
        s["revision"] == rev2.as_str()
    });
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    let nodes = eventually(
        "the node reports version 2",
        Duration::from_secs(10),
        || {
            let n = cp_json(&fx, &url, &sec, &["nodes"]);
            if n[0]["applied_version"] == 2 {
                Ok(n)
            } else {
                Err(n.to_string())
            }
        },
    );
    assert_eq!(nodes[0]["node"], NODE_ID);
    assert_eq!(nodes[0]["applied_revision"], rev2.as_str());
    assert_eq!(nodes[0]["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(nodes[0]["error"], serde_json::Value::Null);
    assert_eq!(nodes[0]["owner"], "platform@example.com");
    assert_eq!(nodes[0]["labels"], serde_json::json!({"site": "lab1"}));
    // The poll that said version 2 is applied was made with the agent running.
    assert_eq!(
        nodes[0]["sessions"],
        serde_json::json!({ ID: 1 }),
        "{nodes}"
    );
    let ids: serde_json::Value = rt()
        .block_on(
            fx.client(&url, None, Some(&fx.security_token))
                .get("/v1/identities"),
        )
        .unwrap();
    assert_eq!(
        ids["identities"][0]["sessions"],
        serde_json::json!([{ "node": NODE_ID, "sessions": 1 }]),
        "{ids}"
    );
    let st = status_json(&node.socket);
    assert_eq!(st["control_plane"]["url"], url.as_str());
    assert_eq!(st["control_plane"]["applied_version"], 2);
    // The admin CLI reads its settings from a file as well (relative paths from the file).
    let client_cfg = fx.dir.join("cp-client.toml");
    std::fs::write(
        &client_cfg,
        format!("url = \"{url}\"\nca = \"cp-ca.pem\"\ntoken_file = \"security.token\"\n"),
    )
    .unwrap();
    let listed = run_json(
        agentwall()
            .args(["cp", "nodes", "--output", "json", "--config"])
            .arg(&client_cfg),
    );
    assert_eq!(listed[0]["node"], NODE_ID);

    // Without the control plane, a restarted node enforces the last bundle it applied.
    let addr = server.addr;
    drop(server);
    drop(probe);
    assert_eq!(node.stop(), 0);
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &[]));
    assert_eq!(status_json(&node.socket)["revision"], rev2.as_str());
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");

    // Back, the control plane revokes the identity fleet-wide: the node denies it everything.
    let server = CpProc::start(&fx, Some(addr));
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(&fx, &server.url, &admin, &["revoke", ID]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("revoked {ID} on every node (revocation generation 1)\n")
    );
    wait_status(&node.socket, "the revocation applied", |s| {
        s["revoked"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == ID))
    });
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
}

#[test]
fn records_made_while_the_control_plane_is_away_arrive_exactly_once() {
    let (env, tmp, ca) = setup("cp-outage", POLICY_A);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let flags = fx.node_flags(&url);
    let audit = dir.join("audit.jsonl");
    let metrics = loopback_addr();
    let m = metrics.to_string();
    let node = NodeProc::start_with(
        &env,
        dir,
        &node_args(
            &flags,
            &[
                "--aggregate-window-secs",
                "0",
                "--audit-log",
                audit.to_str().unwrap(),
                "--metrics-listen",
                &m,
            ],
        ),
    );
    let rev = push(&fx, &url, "v1", POLICY_A);
    wait_status(&node.socket, "policy applied", |s| {
        s["revision"] == rev.as_str()
    });
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);

    // A stream of distinct denials: before, during and after an outage of the control plane
    // (SIGKILL, so a batch may be stored without its answer reaching the node).
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 1000 1199"),
        "eperm=200 other=0"
    );
    let addr = server.addr;
    drop(server);
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 1200 1599"),
        "eperm=400 other=0"
    );
    eventually(
        "records waiting in the spool",
        Duration::from_secs(10),
        || {
            let waiting = metric(
                &scrape(metrics),
                "agentwall_control_plane_spool_records",
                &[],
            );
            if waiting > 0.0 {
                Ok(())
            } else {
                Err(format!("{waiting}"))
            }
        },
    );
    let server = CpProc::start(&fx, Some(addr));
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 1600 1799"),
        "eperm=200 other=0"
    );

    let got = eventually(
        "all 800 denials at the control plane",
        Duration::from_secs(180),
        || {
            let s = stored(&fx, &server.url, "deny");
            if s.len() >= 800 {
                Ok(s)
            } else {
                Err(format!("{} so far", s.len()))
            }
        },
    );
    let mut ports: Vec<u64> = got
        .iter()
        .map(|f| f["record"]["port"].as_u64().unwrap())
        .collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        (1000..1800).collect::<Vec<u64>>(),
        "each denial exactly once"
    );
    // The same records the node's own audit log holds.
    let mut logged: Vec<u64> = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "decision" && r["verdict"] == "deny" && r["identity"] == ID)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let mut sent: Vec<u64> = got
        .iter()
        .map(|f| f["record"]["seq"].as_u64().unwrap())
        .collect();
    logged.sort_unstable();
    sent.sort_unstable();
    assert_eq!(sent, logged);
    let s = eventually("the spool drained", Duration::from_secs(10), || {
        let s = scrape(metrics);
        if metric(&s, "agentwall_control_plane_spool_records", &[]) == 0.0 {
            Ok(s)
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(
        metric(&s, "agentwall_control_plane_records_lost_total", &[]),
        0.0
    );
    assert_eq!(metric(&s, "agentwall_control_plane_connected", &[]), 1.0);
}

/// A control plane, a node reporting to it with `extra` flags, the policy applied, an agent
/// launched and the spool empty; with `disk`, the spool lives on a tmpfs of that size.
struct SpoolRig {
    probe: agentwall_tests::Probe,
    server: Option<CpProc>,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    _node: NodeProc,
    _disk: Option<SmallDisk>,
    fx: CpFixture,
    _env: agentwall_tests::TestEnv,
    _tmp: tempfile::TempDir,
}

impl SpoolRig {
    fn start(name: &str, extra: &[&str], disk: Option<&str>) -> Self {
        Self::start_limited(name, extra, disk, "")
    }

    /// [`SpoolRig::start`] with `limits` added to the control plane's configuration.
    fn start_limited(name: &str, extra: &[&str], disk: Option<&str>, limits: &str) -> Self {
        let (env, tmp, ca) = setup(name, POLICY_A);
        let dir = tmp.path();
        let fx = CpFixture::new(dir);
        fx.configure("", limits);
        let disk = disk.map(|size| SmallDisk::mount(&dir.join("state/control-plane/spool"), size));
        let server = CpProc::start(&fx, None);
        let flags = fx.node_flags(&server.url);
        let metrics = loopback_addr();
        let m = metrics.to_string();
        let mut args = vec!["--aggregate-window-secs", "0", "--metrics-listen", &m];
        args.extend_from_slice(extra);
        let node = NodeProc::start_with(&env, dir, &node_args(&flags, &args));
        let rev = push(&fx, &server.url, "v1", POLICY_A);
        wait_status(&node.socket, "policy applied", |s| {
            s["revision"] == rev.as_str()
        });
        let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
        let probe = launch_probe(&node.socket, &cert, &key);
        let rig = Self {
            probe,
            addr: server.addr,
            server: Some(server),
            metrics,
            _node: node,
            _disk: disk,
            fx,
            _env: env,
            _tmp: tmp,
        };
        rig.wait_drained();
        rig
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&scrape(self.metrics), name, &[])
    }

    fn wait_drained(&self) {
        eventually("the spool drained", Duration::from_secs(30), || {
            let w = self.metric("agentwall_control_plane_spool_records");
            if w == 0.0 {
                Ok(())
            } else {
                Err(format!("{w}"))
            }
        });
    }

    /// Waits until every one of `made` records is spooled or counted lost; the count lost.
    fn wait_accounted(&self, made: f64) -> f64 {
        // Generous: under emulation (the kernel matrix) the sweep's records trickle in.
        let lost = eventually(
            "records spooled or counted",
            Duration::from_secs(180),
            || {
                let (w, l) = (
                    self.metric("agentwall_control_plane_spool_records"),
                    self.metric("agentwall_control_plane_records_lost_total"),
                );
                // The spool also holds the loss records that fit.
                if w + l >= made && l > 0.0 {
                    Ok(l)
                } else {
                    Err(format!("waiting {w}, lost {l}"))
                }
            },
        );
        assert!(lost < made, "{lost} of {made} lost: nothing was spooled");
        lost
    }

    /// Stops the control plane (SIGKILL).
    fn outage(&mut self) {
        self.server = None;
    }

    /// Starts it again where it was; once the spool drained and the loss records arrived,
    /// returns the stored denials and the count lost.
    fn back(&mut self) -> (Vec<serde_json::Value>, f64) {
        let server = CpProc::start(&self.fx, Some(self.addr));
        let url = server.url.clone();
        self.server = Some(server);
        self.wait_drained();
        // Nothing more is lost once the control plane is back.
        let lost = self.metric("agentwall_control_plane_records_lost_total");
        let sec = security(&self.fx);
        let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
        eventually("the loss reported", Duration::from_secs(10), || {
            let l = cp_json(&self.fx, &url, &sec, &["flows", "--kind", "loss", "--all"]);
            let reported: f64 = l["flows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["record"]["spool_records_lost"].as_f64().unwrap())
                .sum();
            if reported == lost {
                Ok(())
            } else {
                Err(format!("{reported} of {lost}: {l}"))
            }
        });
        (stored(&self.fx, &url, "deny"), lost)
    }
}

/// A node over its report quota waits as long as the control plane tells it (Retry-After)
/// instead of retrying at once, stays connected, and keeps the batch in its spool: nothing
/// is lost.
#[test]
fn a_node_over_its_report_quota_waits_as_told_and_loses_nothing() {
    // One record a minute: past the burst (one whole batch of 10,000) a batch waits minutes.
    let mut rig = SpoolRig::start_limited(
        "cp-quota",
        &[],
        None,
        "[limits]\nnode_records_per_minute = 1\n",
    );
    // In three parts, each recorded before the next: the node lets go of a kernel record
    // only once it is written, so a burst beyond the ring's room would be counted lost there.
    for (i, from) in [1000, 4500, 8000].into_iter().enumerate() {
        assert_eq!(
            rig.probe
                .cmd(&format!("sweep tcp 203.0.113.5 {from} {}", from + 3499)),
            "eperm=3500 other=0"
        );
        let want = 3500.0 * (i + 1) as f64;
        eventually("the part recorded", Duration::from_secs(60), || {
            let n = metric(
                &scrape(rig.metrics),
                "agentwall_decisions_total",
                &[("identity", ID), ("verdict", "deny")],
            );
            if n >= want {
                Ok(())
            } else {
                Err(format!("{n} of {want}"))
            }
        });
    }
    eventually("a batch deferred", Duration::from_secs(120), || {
        let d = rig.metric("agentwall_control_plane_reports_deferred_total");
        if d >= 1.0 {
            Ok(())
        } else {
            Err(format!("deferred {d}"))
        }
    });
    let server = rig.server.as_ref().unwrap();
    let refused = cp_metric(
        &rig.fx,
        server,
        "agentwall_cp_refusals_total{reason=\"rate_limited\"}",
    );
    // One refusal, one deferral: the node did not ask again (it was told minutes; it
    // waits at most 300 s).
    assert_eq!(refused, 1);
    assert_eq!(
        rig.metric("agentwall_control_plane_reports_deferred_total"),
        1.0
    );
    assert_eq!(rig.metric("agentwall_control_plane_connected"), 1.0);
    assert_eq!(
        rig.metric("agentwall_control_plane_records_lost_total"),
        0.0
    );
    assert!(rig.metric("agentwall_control_plane_spool_records") >= 1.0);
}

#[test]
fn a_full_spool_counts_what_it_drops_and_reports_the_count() {
    let logs = tempfile::tempdir().unwrap();
    let audit = logs.path().join("audit.jsonl");
    let mut rig = SpoolRig::start(
        "cp-spool-full",
        &[
            "--control-plane-spool-max-bytes",
            "65536",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        None,
    );
    rig.outage();
    assert_eq!(
        rig.probe.cmd("sweep tcp 203.0.113.5 1000 2999"),
        "eperm=2000 other=0"
    );
    rig.wait_accounted(2000.0);
    // The denials that fit arrive, then loss records with the count of those that did not.
    let (stored, lost) = rig.back();
    assert_eq!(stored.len() as f64 + lost, 2000.0);
    // The loss records name the seqs they stand for: the control plane finds the node's
    // chain whole, its gaps all inside what the node said it lost.
    let server = rig.server.as_ref().unwrap();
    let sec = security(&rig.fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    // One more denial after them, so the seqs lost lie between records the control plane
    // holds.
    assert_eq!(rig.probe.cmd("connect tcp 203.0.113.5 3000"), "err EPERM");
    let url = server.url.clone();
    let chain = eventually(
        "the gap behind the new record",
        Duration::from_secs(30),
        || {
            let c = cp_json(
                &rig.fx,
                &url,
                &sec,
                &["audit", "verify", "--node", agentwall_tests::cp::NODE_ID],
            );
            if c["missing"].as_u64().unwrap_or(0) > 0 {
                Ok(c)
            } else {
                Err(format!("{c}"))
            }
        },
    );
    assert_eq!(chain["intact"], true, "{chain:#}");
    assert!(
        chain["missing"].as_u64().unwrap() >= lost as u64,
        "{chain:#}"
    );
    assert_eq!(chain["unexplained"], 0, "{chain:#}");
    // The node's loss and its empty spool, as its polls say them, beside it in the fleet.
    let nodes = eventually(
        "the node's loss in its listing",
        Duration::from_secs(60),
        || {
            let n = cp_json(&rig.fx, &url, &sec, &["nodes"]);
            if n[0]["records_lost"].as_f64() == Some(lost) && n[0]["spool_records"] == 0 {
                Ok(n)
            } else {
                Err(n.to_string())
            }
        },
    );
    assert_eq!(nodes[0]["node"], agentwall_tests::cp::NODE_ID);
}

#[test]
fn a_full_disk_under_the_spool_counts_the_loss_and_reports_it() {
    // The spool gets a 64 KiB disk of its own; its size limit (64 MiB) is never the bound.
    let mut rig = SpoolRig::start("cp-spool-disk", &[], Some("64k"));
    rig.outage();
    assert_eq!(
        rig.probe.cmd("sweep tcp 203.0.113.5 1000 1999"),
        "eperm=1000 other=0"
    );
    rig.wait_accounted(1000.0);
    // Back: what was spooled arrives, the acknowledged segments free the disk, and the count
    // of what was lost follows.
    let (stored, lost) = rig.back();
    assert_eq!(stored.len() as f64 + lost, 1000.0);
}

/// The fixture's CA, as a raw TLS client's roots.
fn ca_roots(fx: &CpFixture) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&fx.ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// Raw HTTP/1.1 over TLS to the server, with no client certificate: what a hostile client
/// sends byte by byte.
fn raw(
    fx: &CpFixture,
    server: &CpProc,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    raw_as(fx, server, None)
}

/// [`raw`], presenting the client certificate `cert` (chain and key files) when given.
fn raw_as(
    fx: &CpFixture,
    server: &CpProc,
    cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let roots = ca_roots(fx);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_file_iter(chain)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    // A bound on a broken test, never what the test waits for.
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads what the server answers up to the end of the connection: the response, and
/// whether the server then closed the connection (EOF, not a read timeout).
/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all the
/// host's): a caller at another address.
fn tcp_from(from: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd as _;
    let std::net::SocketAddr::V4(to) = to else {
        panic!("an IPv4 server address")
    };
    let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor owned here; every result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let src = sa(std::net::SocketAddrV4::new(from, 0));
        assert_eq!(
            libc::bind(fd, (&raw const src).cast(), len),
            0,
            "bind {from}"
        );
        let dst = sa(to);
        assert_eq!(
            libc::connect(fd, (&raw const dst).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}

fn answer_then_close(s: &mut impl Read) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // The server may close without close_notify.
            Err(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    || e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return (String::from_utf8_lossy(&out).into_owned(), true);
            }
            Err(e) => return (format!("{}: {e}", String::from_utf8_lossy(&out)), false),
        }
    }
}

fn cp_metric(fx: &CpFixture, server: &CpProc, name: &str) -> u64 {
    try_cp_metric(fx, server, name).unwrap_or_else(|e| panic!("{e}"))
}

/// The metric, or why it could not be read (a connection the server refused, say).
fn try_cp_metric(fx: &CpFixture, server: &CpProc, name: &str) -> Result<u64, String> {
    let mut s = raw(fx, server);
    let token = std::fs::read_to_string(&fx.security_token).unwrap();
    write!(
        s,
        "GET /v1/metrics HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("asking for {name}: {e}"))?;
    let (text, _) = answer_then_close(&mut s);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .ok_or_else(|| format!("{name} not in the metrics:\n{text}"))
}

/// A hostile client meets the server's limits from the request head: no body byte is read
/// before the caller is known, bodies are capped per route, slow heads and handshakes are
/// cut off, connections are capped per address, callers are rate limited, and each
/// refusal is counted.
#[test]
fn the_control_plane_answers_hostile_clients_from_the_request_head() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    // Stretched with the deadlines on an emulated guest, where a TLS handshake alone can
    // take seconds.
    let (t, w) = (
        agentwall_tests::patience(Duration::from_secs(3)).as_secs(),
        agentwall_tests::patience(Duration::from_secs(2)).as_secs(),
    );
    fx.configure(
        "",
        &format!(
            "[limits]\nhandshake_timeout_secs = {t}\nheader_timeout_secs = {t}\nbody_timeout_secs = {t}\nwrite_timeout_secs = {w}\nrequests_per_minute = 5\nnode_records_per_minute = 10\n"
        ),
    );
    let server = CpProc::start(&fx, None);
    let admin_token = std::fs::read_to_string(&fx.admin_token).unwrap();

    // An unauthenticated upload announcing 30 MiB: answered 401 from the head alone (not
    // one body byte sent), and the connection closed.
    let mut s = raw(&fx, &server);
    write!(
        s,
        "PUT /v1/policy HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        30 << 20
    )
    .unwrap();
    s.flush().unwrap();
    let (text, closed) = answer_then_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("no credentials"), "{text}");
    assert!(closed, "{text}");

    // Authorized, but a body over the route's cap: 413 naming the limit, from the head.
    let mut s = raw(&fx, &server);
    write!(
        s,
        "PUT /v1/policy HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {admin_token}\r\nContent-Length: {}\r\n\r\n",
        20 << 20
    )
    .unwrap();
    s.flush().unwrap();
    let (text, closed) = answer_then_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        text.contains("PUT /v1/policy takes a body of at most 16777216 bytes; the request has a body of 20971520 bytes"),
        "{text}"
    );
    assert!(closed, "{text}");

    // The same over the cap without a length (chunked): cut off at the cap.
    let mut s = raw(&fx, &server);
    write!(
        s,
        "POST /v1/revocations HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {admin_token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 16 << 10];
    // The server may answer and close before the last chunk is written.
    for _ in 0..5 {
        let _ = write!(s, "{:x}\r\n", chunk.len());
        let _ = s.write_all(&chunk);
        let _ = s.write_all(b"\r\n");
    }
    let _ = s.flush();
    let (text, closed) = answer_then_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("at most 65536 bytes"), "{text}");
    assert!(closed, "{text}");

    // A body that never finishes arriving: 408 after the body timeout.
    let mut s = raw(&fx, &server);
    write!(
        s,
        "POST /v1/revocations HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {admin_token}\r\nContent-Length: 100\r\n\r\n{{\"iden"
    )
    .unwrap();
    s.flush().unwrap();
    let (text, closed) = answer_then_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(closed, "{text}");

    // Half a request head, then nothing: the connection is closed by the head timeout.
    let mut s = raw(&fx, &server);
    s.write_all(b"PUT /v1/policy HTTP/1.1\r\nHost: cp\r\n")
        .unwrap();
    s.flush().unwrap();
    let (text, closed) = answer_then_close(&mut s);
    assert!(closed, "a half head was still served: {text}");

    // A TCP connection that never starts its TLS handshake.
    let mut tcp = std::net::TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (text, closed) = answer_then_close(&mut tcp);
    assert!(closed, "a silent connection was kept: {text}");

    // A caller's rate: five requests a minute, then 429 with when to come back.
    let security_token = std::fs::read_to_string(&fx.security_token).unwrap();
    let mut statuses = Vec::new();
    let mut last = String::new();
    for _ in 0..6 {
        let mut s = raw(&fx, &server);
        write!(
            s,
            "GET /v1/nodes HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {security_token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (text, _) = answer_then_close(&mut s);
        statuses.push(text.get(9..12).unwrap_or("").to_owned());
        last = text;
    }
    assert_eq!(
        statuses,
        ["200", "200", "200", "200", "200", "429"],
        "{last}"
    );
    assert!(
        last.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{last}"
    );
    assert!(
        last.contains("made more than 5 requests a minute"),
        "{last}"
    );

    // A client that pipelines requests and never reads the answers: once its answers stop
    // moving for the write timeout, the server drops the connection.
    let mut hog = raw(&fx, &server);
    let small: i32 = 4096;
    // SAFETY: a valid socket and option value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&hog.sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            4,
        )
    };
    let request = format!(
        "GET /v1/metrics HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {}\r\n\r\n",
        std::fs::read_to_string(&fx.security_token).unwrap()
    );
    let writer = std::thread::spawn(move || {
        // Until the server stops taking requests and then drops the connection.
        for _ in 0..20_000 {
            if hog.write_all(request.as_bytes()).is_err() {
                break;
            }
        }
        hog
    });
    eventually("the hog dropped", Duration::from_secs(60), || {
        let n = try_cp_metric(
            &fx,
            &server,
            "agentwall_cp_refusals_total{reason=\"write_timeout\"}",
        )?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("write_timeout {n}"))
        }
    });
    drop(writer);

    // A node's batch over the record cap is refused whole, 413, counted.
    let node = fx.node_client(&server.url, "flood");
    let many: Vec<serde_json::Value> = (0..10_001)
        .map(|i| record("deny", None, "192.0.2.1", None, i))
        .collect();
    let err = rt()
        .block_on(node.post_reports(&batch(1, 1, &many)))
        .expect_err("over the record cap");
    let text = err.to_string();
    assert!(
        text.contains("413")
            && text.contains("a batch of more than 10000 records; at most 10000 a batch"),
        "{text}"
    );
    // A node's records a minute are capped (10 here; a whole batch may come at once): past
    // the quota a batch is refused whole, 429, nothing stored, and sent again later.
    let ingested = rt()
        .block_on(node.post_reports(&batch(1, 1, &many[..10_000])))
        .expect("a whole batch within the burst");
    assert_eq!(ingested.accepted, 10_000);
    let err = rt()
        .block_on(node.post_reports(&batch(1, 10_001, &many[..5])))
        .expect_err("over the node's quota");
    let text = err.to_string();
    assert!(
        text.contains("429")
            && text
                .contains("flood reported more than 10 records a minute; send this batch again in"),
        "{text}"
    );

    // Each refusal counted (the metrics endpoint is not rate limited).
    for (reason, at_least) in [
        ("unauthenticated", 1),
        ("body_too_large", 3),
        ("body_timeout", 1),
        ("rate_limited", 2),
        ("handshake_timeout", 1),
    ] {
        let name = format!("agentwall_cp_refusals_total{{reason=\"{reason}\"}}");
        let n = eventually(&name, Duration::from_secs(30), || {
            let n = try_cp_metric(&fx, &server, &name)?;
            if n >= at_least {
                Ok(n)
            } else {
                Err(format!("{n}"))
            }
        });
        assert!(n >= at_least, "{name} {n}");
    }

    // Connections per address, on a server with the default timeouts: six open (waiting in
    // their handshakes), the seventh closed at once, before any TLS work; one closed, and
    // there is room again.
    let fx = CpFixture::new(&tmp.path().join("capped"));
    fx.configure("", "[limits]\nmax_connections_per_address = 6\n");
    let server = CpProc::start(&fx, None);
    let mut held: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    let mut seventh = std::net::TcpStream::connect(server.addr).unwrap();
    seventh
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (_, closed) = answer_then_close(&mut seventh);
    assert!(closed);
    held.pop();
    // Until the server has seen that one go, this connection may be the one over the cap.
    eventually("room for a connection", Duration::from_secs(30), || {
        let n = try_cp_metric(
            &fx,
            &server,
            "agentwall_cp_refusals_total{reason=\"address_cap\"}",
        )?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("address_cap {n}"))
        }
    });
    wait_log(&server, "the cap logged", |l| {
        l.contains("connection refused: over the connection cap")
    });
}

/// Waits until the server's log has a line `pred` accepts: a refusal is logged as it is made,
/// which the client refused may notice first. Returns the log.
fn wait_log(server: &CpProc, what: &str, pred: impl Fn(&str) -> bool) -> String {
    eventually(what, Duration::from_secs(10), || {
        let log = server.log_text();
        if log.lines().any(&pred) {
            Ok(log)
        } else {
            Err(log)
        }
    })
}

/// Replaces the server's client CRL (`crl`) with one listing `serial`, and waits until the
/// server has read it.
fn revoke_in_crl(fx: &CpFixture, server: &CpProc, crl: &Path, serial: &[u8]) {
    revoke_in_crl_file(fx, crl, serial);
    eventually("the CRL reread", Duration::from_secs(30), || {
        let n = try_cp_metric(fx, server, "agentwall_cp_crl_reloads_total")?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("reloads {n}"))
        }
    });
}

/// Replaces the CRL file `crl` with a newer CRL listing `serial`.
fn revoke_in_crl_file(fx: &CpFixture, crl: &Path, serial: &[u8]) {
    let next = fx.dir.join("clients.crl.new");
    std::fs::write(&next, fx.ca.crl(&[serial])).unwrap();
    std::fs::rename(&next, crl).unwrap();
}

/// A revoked node or admin certificate loses its role: the CRL the control plane reads
/// (reread when its file changes) fails its handshake; bearer tokens are untouched.
#[test]
fn a_revoked_client_certificate_fails_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let crl = fx.dir.join("clients.crl");
    std::fs::write(&crl, fx.ca.crl(&[])).unwrap();
    fx.configure("client_crl = [\"clients.crl\"]\n", "");
    let server = CpProc::start(&fx, None);
    let issued = fx.ca.issue(&CertSpec::agent(ADMIN_ID));
    let (cert, key) = write_cert(&fx.dir, "alice2", &issued);
    let creds = [
        "--cert".to_owned(),
        cert.display().to_string(),
        "--key".to_owned(),
        key.display().to_string(),
    ];
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    let out = cp(&fx, &server.url, &creds, &["nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    revoke_in_crl(&fx, &server, &crl, &issued.serial);
    // Under TLS 1.3 the client learns only that the connection ended; the server says why.
    let out = cp(&fx, &server.url, &creds, &["nodes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the control plane"), "{err}");
    wait_log(&server, "the refusal logged", |l| {
        l.contains("TLS handshake refused") && l.contains("Revoked")
    });
    // A CRL file that turns unreadable leaves the last good one in force.
    std::fs::write(&crl, "not a CRL").unwrap();
    eventually("the failed reread counted", Duration::from_secs(30), || {
        let n = try_cp_metric(&fx, &server, "agentwall_cp_crl_reload_failures_total")?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("failures {n}"))
        }
    });
    let out = cp(&fx, &server.url, &creds, &["nodes"]);
    assert!(!out.status.success(), "the revocation was forgotten");
    assert!(
        server
            .log_text()
            .contains("client CRLs could not be reread")
    );

    // An older CRL put back (numbered below the one in force, without the revocation) is
    // not taken.
    std::fs::write(&crl, fx.ca.crl_numbered(&[], 1, time::Duration::hours(1))).unwrap();
    eventually("the rollback refused", Duration::from_secs(30), || {
        let log = server.log_text();
        if log.contains("an older CRL put back is not taken") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let out = cp(&fx, &server.url, &creds, &["nodes"]);
    assert!(
        !out.status.success(),
        "an older CRL brought the revocation back"
    );
    // Nor after a restart: the numbers in force are kept beside the database, and an older
    // CRL found at start refuses the start.
    drop(server);
    let err = CpProc::start_refused(&fx);
    assert!(err.contains("an older CRL put back is not taken"), "{err}");
    assert!(fx.crl_numbers().exists());
    revoke_in_crl_file(&fx, &crl, &issued.serial);
    let server = CpProc::start(&fx, None);

    // A CRL past its nextUpdate says nothing of revocations since: no certificate passes it.
    let fresh = fx.ca.issue(&CertSpec::agent(ADMIN_ID));
    let (fcert, fkey) = write_cert(&fx.dir, "alice3", &fresh);
    let fresh_creds = [
        "--cert",
        fcert.to_str().unwrap(),
        "--key",
        fkey.to_str().unwrap(),
    ];
    std::fs::write(
        &crl,
        fx.ca
            .crl_numbered(&[&issued.serial], u64::MAX >> 1, -time::Duration::hours(1)),
    )
    .unwrap();
    eventually("the stale CRL read", Duration::from_secs(30), || {
        // The first reread since the restart.
        let n = try_cp_metric(&fx, &server, "agentwall_cp_crl_reloads_total")?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("reloads {n}"))
        }
    });
    let out = cp(&fx, &server.url, &fresh_creds, &["nodes"]);
    assert!(
        !out.status.success(),
        "a stale CRL let a certificate through"
    );
    wait_log(&server, "the stale CRL's refusal logged", |l| {
        l.contains("TLS handshake refused") && l.contains("certificate revocation list expired")
    });
}

/// The last quarter of the connection cap is kept for peers that made an authorized
/// request lately: silent connections from unknown addresses fill the rest, a further
/// unknown one is closed at once, and a known admin still gets in.
#[test]
fn the_last_quarter_of_the_connection_cap_is_kept_for_known_callers() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    fx.configure(
        "",
        "[limits]\nmax_connections = 8\nmax_connections_per_address = 2\nhandshake_timeout_secs = 600\n",
    );
    let server = CpProc::start(&fx, None);
    // The admin's address (127.0.0.1) becomes known with its first request.
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(&fx, &server.url, &admin, &["nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The admin's connection closed at the server (the metrics request's own is the one
    // left): counted still, it would take a place the silent ones below are owed.
    eventually(
        "the admin's connection closed",
        Duration::from_secs(30),
        || match try_cp_metric(&fx, &server, "agentwall_cp_connections")? {
            1 => Ok(()),
            n => Err(format!("connections {n}")),
        },
    );

    let mut silent: Vec<(std::net::Ipv4Addr, std::net::TcpStream)> = [2, 3, 4]
        .into_iter()
        .flat_map(|last| {
            let from = std::net::Ipv4Addr::new(127, 0, 0, last);
            [
                (from, tcp_from(from, server.addr)),
                (from, tcp_from(from, server.addr)),
            ]
        })
        .collect();
    eventually(
        "six silent connections held",
        Duration::from_secs(30),
        || {
            // One the server refused while a metrics request's connection still held a place
            // (it closes at the server a moment after the answer) is made again: a held one
            // has nothing to read, a refused one an answer, an end or an error.
            for (from, conn) in &mut silent {
                conn.set_nonblocking(true).unwrap();
                let closed = !matches!(conn.peek(&mut [0u8; 1]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
                conn.set_nonblocking(false).unwrap();
                if closed {
                    *conn = tcp_from(*from, server.addr);
                }
            }
            // The metrics request's own connection is one more.
            let n = try_cp_metric(&fx, &server, "agentwall_cp_connections")?;
            if n == 7 {
                Ok(())
            } else {
                Err(format!("connections {n}"))
            }
        },
    );
    let mut stranger = tcp_from(std::net::Ipv4Addr::new(127, 0, 0, 5), server.addr);
    stranger
        .set_read_timeout(Some(agentwall_tests::patience(Duration::from_secs(60))))
        .unwrap();
    let (text, closed) = answer_then_close(&mut stranger);
    assert!(closed, "an unknown caller took the reserve: {text}");
    let out = cp(&fx, &server.url, &admin, &["nodes"]);
    assert!(
        out.status.success(),
        "the known admin was shut out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cp_metric(
            &fx,
            &server,
            "agentwall_cp_refusals_total{reason=\"connection_cap\"}"
        ) >= 1
    );
    drop(silent);
}

/// The per-address cap counts connections no one has vouched for: callers behind one address
/// (a NAT) keep their connections open past it once each made a request with a role, while
/// silent ones are still capped.
#[test]
fn the_per_address_cap_counts_only_connections_without_a_role() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    // Kept-alive connections are not closed as idle while the test runs.
    fx.configure(
        "",
        "[limits]\nmax_connections_per_address = 2\nheader_timeout_secs = 600\n",
    );
    let server = CpProc::start(&fx, None);
    // Three security clients, each keeping its connection open after a request (on one
    // runtime, which drives the connections).
    let rt = rt();
    let clients: Vec<_> = (0..3)
        .map(|_| fx.client(&server.url, None, Some(&fx.security_token)))
        .collect();
    for c in &clients {
        let nodes: Vec<agentwall::control_plane::NodeInfo> = rt
            .block_on(c.get("/v1/nodes"))
            .expect("a caller with a role");
        assert!(nodes.is_empty());
    }
    // The metrics request's own connection is one more.
    wait_cp_gauge(&fx, &server, "agentwall_cp_connections", 4);
    // Two silent connections fill the address's cap; a third is closed at once.
    let _silent = [
        std::net::TcpStream::connect(server.addr).unwrap(),
        std::net::TcpStream::connect(server.addr).unwrap(),
    ];
    let mut third = std::net::TcpStream::connect(server.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (_, closed) = answer_then_close(&mut third);
    assert!(closed);
    // Asked over a kept connection: a new one from this address would be over the cap.
    let (_, text, _) = rt
        .block_on(clients[0].request(
            hyper::Method::GET,
            "/v1/metrics",
            None,
            Duration::from_secs(30),
        ))
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("agentwall_cp_refusals_total{reason=\"address_cap\"} 1\n"),
        "{text}"
    );
    drop(clients);
}

/// Connections a caller made authorized requests on count against the caller's own cap: one
/// stolen credential cannot hold every connection (nor, through them, the body budget).
#[test]
fn one_caller_holds_at_most_its_share_of_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    fx.configure(
        "",
        "[limits]\nmax_connections_per_caller = 2\nheader_timeout_secs = 600\n",
    );
    let server = CpProc::start(&fx, None);
    let rt = rt();
    let clients: Vec<_> = (0..3)
        .map(|_| fx.client(&server.url, None, Some(&fx.security_token)))
        .collect();
    for c in &clients[..2] {
        let nodes: Result<Vec<agentwall::control_plane::NodeInfo>, _> =
            rt.block_on(c.get("/v1/nodes"));
        assert!(nodes.is_ok(), "{nodes:?}");
    }
    // Both kept open: a third connection of the same caller is turned away, told when to
    // come back.
    let third: Result<Vec<agentwall::control_plane::NodeInfo>, _> =
        rt.block_on(clients[2].get("/v1/nodes"));
    match third {
        Err(agentwall::control_plane::client::ClientError::Refused { status, body, .. }) => {
            assert_eq!(status, hyper::StatusCode::TOO_MANY_REQUESTS);
            assert!(body.contains("holds 2 connections already"), "{body}");
        }
        other => panic!("a third connection was served: {other:?}"),
    }
    // Another caller is not affected.
    let admin = fx.client(&server.url, None, Some(&fx.admin_token));
    let nodes: Result<Vec<agentwall::control_plane::NodeInfo>, _> =
        rt.block_on(admin.get("/v1/nodes"));
    assert!(nodes.is_ok(), "{nodes:?}");
    let (_, text, _) = rt
        .block_on(admin.request(
            hyper::Method::GET,
            "/v1/metrics",
            None,
            Duration::from_secs(30),
        ))
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("agentwall_cp_refusals_total{reason=\"caller_cap\"} 1\n"),
        "{text}"
    );
    drop(clients);
}

/// A node holds one long-poll at a time: a second poll from the same node answers the
/// first at once.
#[test]
fn a_node_holds_one_long_poll() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let rt = rt();
    let a = fx.node_client(&server.url, "twin");
    let b = fx.node_client(&server.url, "twin");
    let poll = PollRequest {
        wait_ms: 60_000,
        ..PollRequest::default()
    };
    let send = |c: agentwall::control_plane::client::Client, poll: PollRequest| async move {
        c.send_json::<PollReply>(
            hyper::Method::POST,
            "/v1/node/poll",
            &poll,
            Duration::from_secs(90),
        )
        .await
    };
    let first = rt.spawn(send(a, poll.clone()));
    eventually("the first poll held", Duration::from_secs(30), || {
        let n = try_cp_metric(&fx, &server, "agentwall_cp_polls_held")?;
        if n == 1 {
            Ok(())
        } else {
            Err(format!("held {n}"))
        }
    });
    let second = rt.spawn(send(b, poll));
    let answered = rt
        .block_on(first)
        .unwrap()
        .expect("the first poll answered");
    assert_eq!(answered.version, 0);
    assert!(answered.replaced, "the answer says it was replaced");
    assert_eq!(
        cp_metric(
            &fx,
            &server,
            "agentwall_cp_refusals_total{reason=\"poll_replaced\"}"
        ),
        1
    );
    assert_eq!(cp_metric(&fx, &server, "agentwall_cp_polls_held"), 1);
    second.abort();
}

/// Two nodes with one node certificate end each other's polls. Each ended poll's answer
/// says so, and the node counts it and pauses 5 s before it polls again (and warns once):
/// every replacement the server counts is one a node was told of. (The pause bounds the
/// rate at one poll per holder per 5 s; a rate is a benchmark's to measure, not asserted.)
#[test]
fn two_holders_of_one_node_certificate_pause_instead_of_storming() {
    let (env_a, tmp, _) = setup("cp-twin-a", POLICY_A);
    let (env_b, tmp_b, _) = setup("cp-twin-b", POLICY_A);
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let flags = fx.node_flags(&server.url);
    let start = |env: &agentwall_tests::TestEnv, dir: &Path| {
        let m = loopback_addr();
        let node = NodeProc::start_with(
            env,
            dir,
            &node_args(&flags, &["--metrics-listen", &m.to_string()]),
        );
        (node, m)
    };
    let (_a, ma) = start(&env_a, tmp.path());
    let (_b, mb) = start(&env_b, tmp_b.path());
    let replaced = |m| {
        metric(
            &scrape(m),
            "agentwall_control_plane_polls_replaced_total",
            &[],
        )
    };
    eventually("each twin paused twice", Duration::from_secs(60), || {
        let (a, b) = (replaced(ma), replaced(mb));
        if a >= 2.0 && b >= 2.0 {
            Ok(())
        } else {
            Err(format!("a {a} b {b}"))
        }
    });
    let at_server = cp_metric(
        &fx,
        &server,
        "agentwall_cp_refusals_total{reason=\"poll_replaced\"}",
    ) as f64;
    let at_nodes = replaced(ma) + replaced(mb);
    // A replacement the server made after the nodes were read, at most one per node.
    assert!(
        at_server <= at_nodes + 2.0,
        "the server ended {at_server} polls, the nodes paused after {at_nodes}"
    );
}

/// A client certificate a `client_crl` revokes loses access everywhere: on a connection it
/// opened before the revocation, and on a TLS session it would resume (there are none).
#[test]
fn a_revoked_certificate_keeps_no_access_by_resumption_or_open_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let crl = fx.dir.join("clients.crl");
    std::fs::write(&crl, fx.ca.crl(&[])).unwrap();
    fx.configure("client_crl = [\"clients.crl\"]\n", "");
    let server = CpProc::start(&fx, None);
    let issued = fx
        .ca
        .issue(&CertSpec::agent("spiffe://example.org/node/stolen"));
    let roots = ca_roots(&fx);
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    // rustls' default client keeps sessions to resume (as the node's own client does).
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap(),
    );
    let connect = || {
        let tcp = std::net::TcpStream::connect(server.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let conn =
            rustls::ClientConnection::new(config.clone(), "127.0.0.1".try_into().unwrap()).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };
    let body = r#"{"known_version":0,"revocation_gen":0,"agent_version":"x","wait_ms":0}"#;
    let poll = |s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
                close: bool| {
        let c = if close { "Connection: close\r\n" } else { "" };
        let _ = write!(
            s,
            "POST /v1/node/poll HTTP/1.1\r\nHost: cp\r\n{c}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.flush();
        let mut buf = vec![0u8; 4096];
        match s.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => format!("error: {e}"),
        }
    };
    // Before the revocation: served, and the client keeps a session ticket.
    let mut open = connect();
    assert!(poll(&mut open, false).starts_with("HTTP/1.1 200"));
    let mut first = connect();
    assert!(poll(&mut first, true).starts_with("HTTP/1.1 200"));
    drop(first);

    revoke_in_crl(&fx, &server, &crl, &issued.serial);

    let mut resumed = connect();
    let text = poll(&mut resumed, true);
    let was_resumed = resumed.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a revoked certificate was served on a resumed session (resumed: {was_resumed}): {text}"
    );
    let text = poll(&mut open, false);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a revoked certificate was served on the connection it opened before: {text}"
    );
}

/// What a node sends (its version, its error) and what agents put in records reach an
/// admin's terminal as text: control characters are shown escaped, never sent raw.
#[test]
fn node_supplied_text_reaches_the_admins_terminal_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let node = fx.node_client(&server.url, "loud");
    let poll = PollRequest {
        agent_version: "1.0\u{1b}]0;owned\u{7}\u{1b}[2J".into(),
        error: Some("bad\u{1b}[31m bundle".into()),
        ..PollRequest::default()
    };
    let _: PollReply = rt()
        .block_on(node.send_json(
            hyper::Method::POST,
            "/v1/node/poll",
            &poll,
            Duration::from_secs(30),
        ))
        .unwrap();
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = eventually("the node listed", Duration::from_secs(30), || {
        let out = cp(&fx, &server.url, &admin, &["nodes"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("node/loud") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    assert!(
        out.contains(r"agentwall 1.0\u{1b}]0;owned\u{7}\u{1b}[2J"),
        "{out}"
    );
    assert!(out.contains(r"error: bad\u{1b}[31m bundle"), "{out}");
}

/// A node certificate's files (`spiffe://example.org/node/NAME`), for raw requests.
fn node_cert(fx: &CpFixture, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    write_cert(
        &fx.dir,
        &format!("raw-node-{name}"),
        &fx.ca.issue(&CertSpec::agent(&format!(
            "spiffe://example.org/node/{name}"
        ))),
    )
}

/// Waits until the control plane's gauge `name` reads `want`.
fn wait_cp_gauge(fx: &CpFixture, server: &CpProc, name: &str, want: u64) {
    eventually(name, Duration::from_secs(30), || {
        let n = try_cp_metric(fx, server, name)?;
        if n == want {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
}

/// A node's report is judged from its request head: a second batch while one is being
/// received, and a batch from a node with no quota left, are answered 429 with Retry-After
/// before one body byte is read. Bodies in flight share one byte budget (503 with
/// Retry-After past it). A batch is bounded record by record (a record over 256 KiB is 413)
/// and each node's bytes a minute are capped beside its records.
#[test]
fn a_node_report_is_judged_from_its_head_and_bounded_as_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let t = agentwall_tests::patience(Duration::from_secs(5)).as_secs();
    fx.configure(
        "",
        &format!(
            "[limits]\nbody_timeout_secs = {t}\nnode_records_per_minute = 10\nnode_bytes_per_minute = 1\nbody_bytes_in_flight = {}\n",
            32 << 20
        ),
    );
    let server = CpProc::start(&fx, None);
    let head = |len: usize| {
        format!(
            "POST /v1/node/reports HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    // A batch being received holds its node's one place: a second batch of the same node
    // announcing 30 MiB is answered at once, its body never read.
    let slow = node_cert(&fx, "slow");
    let mut first = raw_as(&fx, &server, Some(&slow));
    write!(first, "{}{{\"epoch\":1,", head(20 << 20)).unwrap();
    first.flush().unwrap();
    wait_cp_gauge(&fx, &server, "agentwall_cp_report_batches_in_progress", 1);
    wait_cp_gauge(&fx, &server, "agentwall_cp_body_bytes_in_flight", 20 << 20);
    let mut second = raw_as(&fx, &server, Some(&slow));
    write!(second, "{}", head(30 << 20)).unwrap();
    second.flush().unwrap();
    let (text, closed) = answer_then_close(&mut second);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        text.contains("a report batch from spiffe://example.org/node/slow is already being stored"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{text}"
    );
    assert!(closed, "{text}");

    // The first holds 20 MiB of the 32 MiB budget: an admin's 16 MiB push finds no room and
    // is answered 503 with Retry-After at once.
    let admin_token = std::fs::read_to_string(&fx.admin_token).unwrap();
    let mut push = raw(&fx, &server);
    write!(
        push,
        "PUT /v1/policy HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {admin_token}\r\nContent-Length: {}\r\n\r\n",
        16 << 20
    )
    .unwrap();
    push.flush().unwrap();
    let (text, _) = answer_then_close(&mut push);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.contains("the server is reading 33554432 bytes of request bodies already"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{text}"
    );
    // The first batch never finishes: 408, and its budget and place are free again.
    let (text, _) = answer_then_close(&mut first);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    wait_cp_gauge(&fx, &server, "agentwall_cp_report_batches_in_progress", 0);
    wait_cp_gauge(&fx, &server, "agentwall_cp_body_bytes_in_flight", 0);

    // A record over 256 KiB refuses its batch, naming it.
    let big = fx.node_client(&server.url, "big");
    let mut huge = record("deny", None, "192.0.2.1", None, 1);
    huge["comm"] = "x".repeat(300 << 10).into();
    let err = rt()
        .block_on(big.post_reports(&batch(1, 1, &[huge])))
        .expect_err("a record over the cap");
    let text = err.to_string();
    assert!(text.contains("413"), "{text}");
    assert!(
        text.contains("record 0 of the batch is 307") && text.contains("at most 262144 a record"),
        "{text}"
    );

    // Bytes a minute (1 here: a whole batch of up to 32 MiB may come at once): as many
    // records of 200 KiB as fit in 32 MiB pass, one more is refused, 429, and not stored.
    let bytes = fx.node_client(&server.url, "bytes");
    let mut fat = record("deny", None, "192.0.2.1", None, 1);
    fat["comm"] = "y".repeat(200 << 10).into();
    // Each record's share of a batch's JSON (its rid at most 3 digits, and a comma).
    let each = serde_json::to_vec(&batch(1, 100, std::slice::from_ref(&fat)))
        .unwrap()
        .len()
        - serde_json::to_vec(&batch(1, 100, &[])).unwrap().len()
        + 1;
    let fit = ((32 << 20) - 64) / each;
    let fats: Vec<serde_json::Value> = (0..=fit).map(|_| fat.clone()).collect();
    let ingested = rt()
        .block_on(bytes.post_reports(&batch(1, 1, &fats[..fit])))
        .expect("a whole batch within the burst");
    assert_eq!(ingested.accepted, fit as u64);
    let err = rt()
        .block_on(bytes.post_reports(&batch(1, 1 + fit as u64, &fats[fit..])))
        .expect_err("over the node's bytes a minute");
    let text = err.to_string();
    assert!(
        text.contains("429")
            && text.contains("bytes reported more than 1 bytes a minute; send this batch again in"),
        "{text}"
    );

    // A node a quota turned away is answered from the head until the time it was given: 30
    // MiB announced, none sent, 429 at once.
    let flood = node_cert(&fx, "flood");
    let client = fx.client(&server.url, Some(flood.clone()), None);
    let many: Vec<serde_json::Value> = (0..10_001)
        .map(|i| record("deny", None, "192.0.2.1", None, i))
        .collect();
    rt().block_on(client.post_reports(&batch(1, 1, &many[..10_000])))
        .expect("a whole batch within the burst");
    let err = rt()
        .block_on(client.post_reports(&batch(1, 10_001, &many[10_000..])))
        .expect_err("over the node's records a minute");
    assert!(
        err.to_string()
            .contains("flood reported more than 10 records a minute"),
        "{err}"
    );
    let mut s = raw_as(&fx, &server, Some(&flood));
    write!(s, "{}", head(30 << 20)).unwrap();
    s.flush().unwrap();
    let (text, closed) = answer_then_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        text.contains("spiffe://example.org/node/flood is over its report quota (10 records and 1 bytes a minute); send this batch again in"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{text}"
    );
    assert!(closed, "{text}");
    for (reason, at_least) in [
        ("body_budget", 1),
        ("rate_limited", 4),
        ("body_too_large", 1),
        ("body_timeout", 1),
    ] {
        let name = format!("agentwall_cp_refusals_total{{reason=\"{reason}\"}}");
        let n = cp_metric(&fx, &server, &name);
        assert!(n >= at_least, "{name} {n}");
    }
}

/// One HTTP/1.1 request over its own TLS connection (`Connection: close` added), as a
/// browser or a hostile client sends it: the status, the head and the body.
fn https(
    fx: &CpFixture,
    server: &CpProc,
    cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = raw_as(fx, server, cert);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        server.addr,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let (text, _) = answer_then_close(&mut s);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// Signs in to the console with `body` (and `cert`): the cookie header to send back and
/// the CSRF token.
fn console_sign_in(
    fx: &CpFixture,
    server: &CpProc,
    cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
    body: &str,
) -> (String, String, serde_json::Value) {
    let (status, head, text) = https(
        fx,
        server,
        cert,
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(status, 200, "{head}\n{text}");
    let set = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie in {head}"));
    assert!(
        set.starts_with("__Host-agentwall-session=")
            && set.contains("; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=28800"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    (cookie, v["csrf"].as_str().unwrap().to_owned(), v)
}

#[test]
fn the_console_signs_people_in_and_refuses_what_another_site_sends() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let admin_tok = std::fs::read_to_string(&fx.admin_token).unwrap();
    let sec_tok = std::fs::read_to_string(&fx.security_token).unwrap();

    // The pages are anyone's, and run only their own script.
    let (status, head, body) = https(&fx, &server, None, "GET", "/ui/", &[], "");
    assert_eq!(status, 200, "{head}");
    assert!(
        body.contains("<script src=\"app.js\" defer></script>"),
        "{body}"
    );
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self';",
        "x-frame-options: DENY",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
        "content-type: text/html; charset=utf-8",
    ] {
        assert!(head.contains(h), "{h} missing from {head}");
    }
    let (status, _, body) = https(&fx, &server, None, "GET", "/ui/session", &[], "");
    assert_eq!((status, body.as_str()), (200, r#"{"signed_in":false}"#));

    // Sign-in takes JSON only (a form on another site cannot send it), and a credential
    // with a person's role.
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/ui/session",
        &[("Content-Type", "text/plain")],
        &format!(r#"{{"token":"{admin_tok}"}}"#),
    );
    assert_eq!(status, 415, "{body}");
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        r#"{"token":"guessed"}"#,
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("that credential holds no role"), "{body}");
    let node_cert = fx.node.clone();
    let (status, _, body) = https(
        &fx,
        &server,
        Some(&node_cert),
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        "{}",
    );
    assert_eq!(status, 401, "a node's certificate opens no console: {body}");

    // Security reads through its cookie, and may not revoke.
    let (sec, sec_csrf, v) = console_sign_in(
        &fx,
        &server,
        None,
        &format!(r#"{{"token":"{}"}}"#, sec_tok.trim()),
    );
    assert_eq!(v["roles"], serde_json::json!(["security"]));
    let (status, _, _) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &sec)],
        "",
    );
    assert_eq!(status, 200);
    let revoke = r#"{"identity":"spiffe://example.org/agent/a","reason":"leaked key"}"#;
    let json = ("Content-Type", "application/json");
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/v1/revocations",
        &[("Cookie", &sec), ("X-Agentwall-CSRF", &sec_csrf), json],
        revoke,
    );
    assert_eq!(status, 403, "{body}");

    // An admin's cookie acts only with its CSRF token, and only from this origin.
    let (adm, adm_csrf, v) = console_sign_in(
        &fx,
        &server,
        None,
        &format!(r#"{{"token":"{}"}}"#, admin_tok.trim()),
    );
    assert_eq!(v["roles"], serde_json::json!(["admin"]));
    let origin = format!("https://{}", server.addr);
    for (headers, says) in [
        (
            vec![("Cookie", adm.as_str()), json],
            "must carry the session's x-agentwall-csrf header",
        ),
        (
            vec![("Cookie", &adm), ("X-Agentwall-CSRF", &sec_csrf), json],
            "must carry the session's x-agentwall-csrf header",
        ),
        (
            vec![
                ("Cookie", &adm),
                ("X-Agentwall-CSRF", &adm_csrf),
                ("Origin", "https://evil.example"),
                json,
            ],
            "from origin \\\"https://evil.example\\\" is refused",
        ),
        (
            vec![
                ("Cookie", &adm),
                ("X-Agentwall-CSRF", &adm_csrf),
                ("Sec-Fetch-Site", "cross-site"),
                json,
            ],
            "(Sec-Fetch-Site: cross-site) is refused",
        ),
        (
            vec![
                ("Cookie", &adm),
                ("X-Agentwall-CSRF", &adm_csrf),
                ("Origin", "null"),
                json,
            ],
            "from origin \\\"null\\\" is refused",
        ),
    ] {
        let (status, _, body) = https(
            &fx,
            &server,
            None,
            "POST",
            "/v1/revocations",
            &headers,
            revoke,
        );
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(body.contains(says), "{headers:?}: {body}");
    }
    assert!(
        cp_metric_labelled(
            &fx,
            &server,
            "agentwall_cp_refusals_total{reason=\"cross_site\"}"
        ) >= 5
    );
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/v1/revocations",
        &[
            ("Cookie", &adm),
            ("X-Agentwall-CSRF", &adm_csrf),
            ("Origin", &origin),
            ("Sec-Fetch-Site", "same-origin"),
            json,
        ],
        revoke,
    );
    assert_eq!(status, 200, "{body}");
    let (_, _, list) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/revocations",
        &[("Cookie", &sec)],
        "",
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["reason"], "leaked key");
    assert!(
        list[0]["by"].as_str().unwrap().starts_with("token:"),
        "{list}"
    );

    // Signing out ends the session on the server: the same cookie opens nothing after.
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "DELETE",
        "/ui/session",
        &[("Cookie", &adm), ("X-Agentwall-CSRF", &adm_csrf)],
        "",
    );
    assert_eq!(status, 204, "{body}");
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &adm)],
        "",
    );
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("the console session has ended or expired"),
        "{body}"
    );
    // A value no sign-in gives is refused the same way (without a database lookup).
    for forged in [
        "__Host-agentwall-session=zz",
        "__Host-agentwall-session=../../x",
    ] {
        let (status, _, body) = https(
            &fx,
            &server,
            None,
            "GET",
            "/v1/nodes",
            &[("Cookie", forged)],
            "",
        );
        assert_eq!(status, 401, "{forged}: {body}");
        assert!(body.contains("has ended or expired"), "{body}");
    }
    let (_, _, body) = https(
        &fx,
        &server,
        None,
        "GET",
        "/ui/session",
        &[("Cookie", &adm)],
        "",
    );
    assert_eq!(body, r#"{"signed_in":false}"#);

    // A client certificate signs in too; its cookie then works without it.
    let (cert_cookie, _, v) = console_sign_in(&fx, &server, Some(&fx.admin), "{}");
    assert_eq!(v["principal"], ADMIN_ID);
    assert_eq!(v["roles"], serde_json::json!(["admin"]));
    let (status, _, _) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &cert_cookie)],
        "",
    );
    assert_eq!(status, 200);
}

/// A labelled counter of the control plane's metrics (0 when absent).
fn cp_metric_labelled(fx: &CpFixture, server: &CpProc, series: &str) -> u64 {
    let tok = std::fs::read_to_string(&fx.security_token).unwrap();
    let (status, _, body) = https(
        fx,
        server,
        None,
        "GET",
        "/v1/metrics",
        &[("Authorization", &format!("Bearer {}", tok.trim()))],
        "",
    );
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn a_control_plane_without_the_console_answers_none_of_its_routes() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let admin_tok = std::fs::read_to_string(&fx.admin_token).unwrap();
    let (cookie, _, _) = console_sign_in(
        &fx,
        &server,
        None,
        &format!(r#"{{"token":"{}"}}"#, admin_tok.trim()),
    );
    let addr = server.addr;
    drop(server);
    // Turned off, the console's cookies open nothing either.
    fx.configure("console = false\n", "");
    let server = CpProc::start(&fx, Some(addr));
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(status, 401, "{body}");
    for (method, path) in [
        ("GET", "/ui/"),
        ("GET", "/ui/app.js"),
        ("POST", "/ui/session"),
    ] {
        let (status, _, body) = https(
            &fx,
            &server,
            None,
            method,
            path,
            &[("Content-Type", "application/json")],
            "{}",
        );
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
}

#[test]
fn console_sessions_are_bounded_per_credential_and_can_be_ended_by_an_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let sec_tok = std::fs::read_to_string(&fx.security_token).unwrap();
    let admin_tok = std::fs::read_to_string(&fx.admin_token).unwrap();
    let sign_in = |tok: &str| {
        console_sign_in(
            &fx,
            &server,
            None,
            &format!(r#"{{"token":"{}"}}"#, tok.trim()),
        )
    };
    let nodes = |cookie: &str| {
        https(
            &fx,
            &server,
            None,
            "GET",
            "/v1/nodes",
            &[("Cookie", cookie)],
            "",
        )
        .0
    };

    // Signing in over and over keeps the newest 16 sessions of a credential, no more.
    let sessions: Vec<String> = (0..17).map(|_| sign_in(&sec_tok).0).collect();
    assert_eq!(nodes(&sessions[0]), 401, "the oldest of 17 ended");
    assert_eq!(nodes(&sessions[1]), 200);
    assert_eq!(nodes(&sessions[16]), 200);
    let (status, head, _) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &sessions[16])],
        "",
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("cache-control: no-store")
            && head.contains("x-content-type-options: nosniff"),
        "{head}"
    );

    // An admin ends one principal's sessions (on every replica: they are the database's),
    // then everyone's.
    let (admin, _, v) = sign_in(&admin_tok);
    let sec_principal = {
        let (_, _, v) = sign_in(&sec_tok);
        v["principal"].as_str().unwrap().to_owned()
    };
    assert!(v["principal"].as_str().unwrap().starts_with("token:"));
    let creds = admin_creds(&fx);
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    let out = cp(
        &fx,
        &server.url,
        &creds,
        &["end-sessions", "--principal", &sec_principal],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ended 16 console session(s)\n"
    );
    assert_eq!(nodes(&sessions[16]), 401);
    assert_eq!(nodes(&admin), 200, "another principal's session is kept");
    let out = cp(
        &fx,
        &server.url,
        &creds,
        &["end-sessions", "--principal", "token:12"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 12 hex digits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A link not yet used ends with its maker's sessions; a cookie makes none.
    let out = cp(&fx, &server.url, &creds, &["console-link"]);
    let code = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.split("#link=").nth(1))
        .unwrap()
        .to_owned();
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/v1/console/links",
        &[
            ("Cookie", &admin),
            ("X-Agentwall-CSRF", v["csrf"].as_str().unwrap()),
        ],
        "",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not from a console session"), "{body}");
    let out = cp(&fx, &server.url, &creds, &["end-sessions"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ended 1 console session(s)\n"
    );
    assert_eq!(nodes(&admin), 401);
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        &format!(r#"{{"link":"{code}"}}"#),
    );
    assert_eq!(status, 401, "the link ended with the sessions: {body}");
}

#[test]
fn a_sign_in_link_signs_one_browser_in_once_with_its_makers_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(&fx, &server.url, &admin, &["console-link"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let link = text.lines().next().unwrap();
    let code = link
        .strip_prefix(&format!("{}/ui/#link=", server.url))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(code.len(), 64, "{text}");
    assert!(
        text.contains("(signs one browser in, once, until 20"),
        "{text}"
    );
    let body = format!(r#"{{"link":"{code}"}}"#);
    let (cookie, _, v) = console_sign_in(&fx, &server, None, &body);
    assert_eq!(v["principal"], ADMIN_ID, "the maker's credential: {v}");
    assert_eq!(v["roles"], serde_json::json!(["admin"]));
    let (status, _, _) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/nodes",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(status, 200);
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("was used already, has expired, or never was"),
        "{body}"
    );
    // Security may not make one.
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let out = cp(&fx, &server.url, &sec, &["console-link"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs role admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn failed_credentials_spend_the_callers_address_rate_on_every_route() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    fx.configure("", "[limits]\nrequests_per_minute = 5\n");
    let server = CpProc::start(&fx, None);
    let guess = |route: &str| {
        https(
            &fx,
            &server,
            None,
            "GET",
            route,
            &[("Authorization", "Bearer guessed")],
            "",
        )
        .0
    };
    let answers: Vec<u16> = [
        "/v1/nodes",
        "/v1/flows",
        "/v1/policy",
        "/v1/nodes",
        "/v1/revocations",
        "/v1/nodes",
        "/v1/nodes",
    ]
    .iter()
    .map(|r| guess(r))
    .collect();
    assert_eq!(&answers[..5], &[403; 5], "{answers:?}");
    assert_eq!(&answers[5..], &[429; 2], "{answers:?}");
    // Sign-in guesses spend the same rate.
    let (status, _, _) = https(
        &fx,
        &server,
        None,
        "POST",
        "/ui/session",
        &[("Content-Type", "application/json")],
        r#"{"token":"guessed"}"#,
    );
    assert_eq!(status, 429);
}

#[test]
fn fleet_reviews_list_diff_simulate_and_find_unused_rules_over_every_nodes_records() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let rev1 = push(&fx, &url, "v1", POLICY_A);
    let two_rules =
        format!("{POLICY_A}  - to: [203.0.113.0/24]\n    ports: [8443]\n    protocol: tcp\n");
    let rev2 = push(&fx, &url, "v2", &two_rules);
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let text = |args: &[&str]| {
        let out = cp(&fx, &url, &sec, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, out, err) = text(&["policy", "versions"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&format!("version 2 revision {rev2} pushed ")),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("version 1 revision {rev1} pushed ")),
        "{out}"
    );
    assert!(lines[0].ends_with(&format!("by {ADMIN_ID}")), "{out}");
    let (ok, out, err) = text(&["policy", "diff", "1", "2"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "--- version 1/agents.yaml\n+++ version 2/agents.yaml\n@@ -5,3 +5,6 @@\n   - to: [192.0.2.0/24]\n     ports: [443]\n     protocol: tcp\n+  - to: [203.0.113.0/24]\n+    ports: [8443]\n+    protocol: tcp\n"
    );
    let (ok, _, err) = text(&["policy", "diff", "1", "9"]);
    assert!(!ok && err.contains("no policy version 9"), "{err}");

    // Two nodes' records under version 2: the first rule used, the second not; a denial.
    let allow = |dest: &str, port: u64, seq: u64| {
        let mut r = record("allow", Some(ID), dest, None, seq);
        r["port"] = port.into();
        r["revision"] = rev2.as_str().into();
        r["rule_id"] = 1.into();
        r
    };
    let mut deny = record("deny", Some(ID), "198.51.100.10", None, 3);
    deny["reason"] = "no rule allows it".into();
    rt().block_on(async {
        fx.node_client(&url, "r1")
            .post_reports(&batch(1, 1, &[allow("192.0.2.10", 443, 1)]))
            .await
            .unwrap();
        fx.node_client(&url, "r2")
            .post_reports(&batch(1, 1, &[allow("192.0.2.11", 443, 2), deny]))
            .await
            .unwrap();
    });

    let (ok, out, err) = text(&["report", "unused"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "no owner:\n  unused: {ID} rule 2 (agents.yaml:1 egress[1], AgentPolicy \"support\")\n1 unused rule(s), 0 unused archetype(s); 2 allowed flow(s) counted under revision {rev2}\n"
        )
    );

    // Each identity: its decisions, destinations and rules with their use.
    let ids: serde_json::Value = rt()
        .block_on(
            fx.client(&url, None, Some(&fx.security_token))
                .get("/v1/identities"),
        )
        .unwrap();
    assert_eq!(ids["version"], 2);
    let one = &ids["identities"][0];
    assert_eq!(one["identity"], ID);
    assert_eq!(
        (one["allow"].as_u64(), one["deny"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        one["nodes"],
        serde_json::json!([
            "spiffe://example.org/node/r1",
            "spiffe://example.org/node/r2"
        ])
    );
    assert_eq!(
        one["top_destinations"].as_array().unwrap().len(),
        3,
        "{one}"
    );
    let hits: Vec<u64> = one["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hits"].as_u64().unwrap())
        .collect();
    assert_eq!(hits, [2, 0]);
    let buckets = one["buckets"].as_array().unwrap();
    assert!(!buckets.is_empty() && buckets.len() <= 48, "{one}");
    let total: u64 = buckets
        .iter()
        .map(|b| b["allow"].as_u64().unwrap() + b["deny"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 3);

    // A candidate that moves the allowlist: what it would deny and allow, fleet-wide.
    let candidate = policy_dir(fx.dir.as_path(), "candidate", &[("agents.yaml", POLICY_B)]);
    let (ok, out, err) = text(&["policy", "simulate", candidate.to_str().unwrap()]);
    assert!(!ok, "new denials fail the command");
    assert!(err.contains("2 flow(s) would newly be denied"), "{err}");
    assert!(
        out.contains(&format!("newly denied: {ID} -> 192.0.2.10:443/tcp (x1)"))
            && out.contains(&format!("newly denied: {ID} -> 192.0.2.11:443/tcp (x1)"))
            && out.contains(&format!(
                "newly allowed: {ID} -> 198.51.100.10:443/tcp (x1)"
            ))
            && out.contains("3 flow(s) replayed against revision "),
        "{out}"
    );
    // A hostile node's records change no answer's shape and break none: a count at the top
    // of the range, a time before 1970 and one far ahead, an identity that is no SPIFFE ID.
    let mut huge = allow("192.0.2.12", 443, 10);
    huge["count"] = u64::MAX.into();
    let mut ancient = record("deny", Some(ID), "198.51.100.10", None, 11);
    ancient["time"] = "1969-12-31T23:00:00Z".into();
    ancient["last_seen"] = "1969-12-31T23:00:00Z".into();
    let mut ahead = record("deny", Some(ID), "198.51.100.10", None, 12);
    ahead["time"] = "9999-12-31T23:00:00Z".into();
    let bogus = record(
        "deny",
        Some("spiffe://example.org/a\u{202e}b"),
        "198.51.100.10",
        None,
        13,
    );
    rt().block_on(fx.node_client(&url, "hostile").post_reports(&batch(
        1,
        1,
        &[huge, ancient, ahead, bogus],
    )))
    .unwrap();
    let ids: serde_json::Value = rt()
        .block_on(
            fx.client(&url, None, Some(&fx.security_token))
                .get("/v1/identities"),
        )
        .unwrap();
    assert_eq!(ids["identities"].as_array().unwrap().len(), 1, "{ids}");
    assert_eq!(ids["identities"][0]["allow"], u64::MAX, "saturated: {ids}");
    assert!(ids["bucket_secs"].as_u64().unwrap() <= 86_400, "{ids}");
    for b in ids["identities"][0]["buckets"].as_array().unwrap() {
        assert!(b["start"].as_str().unwrap().starts_with("20"), "{ids}");
    }
    let (ok, out, err) = text(&["report", "unused"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{} allowed flow(s)", u64::MAX)),
        "{out}"
    );

    let (ok, _, err) = text(&[
        "policy",
        "simulate",
        "--allow-new-denials",
        candidate.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = text(&[
        "policy",
        "simulate",
        "--since",
        "2999-01-01T00:00:00Z",
        candidate.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("0 flow(s) replayed"), "{out}");
    // An invalid candidate: every problem at the admin's own file, line and column.
    let bad = policy_dir(
        fx.dir.as_path(),
        "bad",
        &[(
            "agents.yaml",
            &POLICY_B.replace("ports: [443]", "ports: [70000]"),
        )],
    );
    let (ok, _, err) = text(&["policy", "simulate", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:6:", bad.join("agents.yaml").display()))
            && err.contains("nothing was simulated"),
        "{err}"
    );
}

/// A syslog receiver over TLS (RFC 5425) on loopback: every message of every connection goes
/// to `messages`. Dropping it closes the listener and shuts every connection.
struct SyslogReceiver {
    addr: std::net::SocketAddr,
    messages: std::sync::mpsc::Receiver<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl SyslogReceiver {
    fn start(
        cert: &(std::path::PathBuf, std::path::PathBuf),
        at: Option<std::net::SocketAddr>,
    ) -> Self {
        Self::crashing_after(cert, at, usize::MAX)
    }

    /// A receiver that takes `keep` messages, then reads the next and crashes before it
    /// keeps it: the connection shut, what it read lost.
    fn crashing_after(
        cert: &(std::path::PathBuf, std::path::PathBuf),
        at: Option<std::net::SocketAddr>,
        keep: usize,
    ) -> Self {
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                rustls::pki_types::CertificateDer::pem_file_iter(&cert.0)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.1).unwrap(),
            )
            .unwrap(),
        );
        let listener =
            std::net::TcpListener::bind(at.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
                .unwrap();
        let addr = listener.local_addr().unwrap();
        // Non-blocking, so that dropping the receiver can end the accept loop.
        listener.set_nonblocking(true).unwrap();
        let (tx, messages) = std::sync::mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let kept = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let tcp = match listener.accept() {
                        Ok((tcp, _)) => tcp,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => panic!("accept: {e}"),
                    };
                    tcp.set_nonblocking(false).unwrap();
                    conns.lock().unwrap().push(tcp.try_clone().unwrap());
                    let (config, tx) = (config.clone(), tx.clone());
                    let (kept, stop) = (kept.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let conn = rustls::ServerConnection::new(config).unwrap();
                        let mut s = std::io::BufReader::new(rustls::StreamOwned::new(conn, tcp));
                        // RFC 5425: MSG-LEN SP SYSLOG-MSG, again and again.
                        loop {
                            let mut len = Vec::new();
                            if std::io::BufRead::read_until(&mut s, b' ', &mut len).unwrap_or(0)
                                == 0
                            {
                                return;
                            }
                            let Ok(n) = std::str::from_utf8(&len[..len.len() - 1])
                                .unwrap_or("")
                                .parse::<usize>()
                            else {
                                return;
                            };
                            let mut msg = vec![0; n];
                            if s.read_exact(&mut msg).is_err() {
                                return;
                            }
                            if kept.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= keep {
                                // A crash a moment after the read (not at once): the sender
                                // has sent its next turn by then and must not count what
                                // this connection took as delivered.
                                std::thread::sleep(Duration::from_millis(300));
                                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                                let _ = s.get_ref().sock.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            if tx.send(String::from_utf8(msg).unwrap()).is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        SyslogReceiver {
            addr,
            messages,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// The next `n` messages (a bound on a broken test, never what the test waits for).
    fn take(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.messages
                    .recv_timeout(agentwall_tests::patience(Duration::from_secs(60)))
                    .unwrap_or_else(|e| panic!("message {} of {n}: {e}", i + 1))
            })
            .collect()
    }
}

impl Drop for SyslogReceiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// An RFC 5424 message from the control plane: its PRI, hostname and OCSF event.
fn syslog_event(msg: &str) -> (u32, String, serde_json::Value) {
    let (pri, rest) = msg
        .strip_prefix('<')
        .and_then(|m| m.split_once(">1 "))
        .unwrap_or_else(|| panic!("not RFC 5424: {msg}"));
    let mut fields = rest.splitn(7, ' ');
    let (_time, host, app, procid, msgid, sd) = (
        fields.next().unwrap(),
        fields.next().unwrap().to_owned(),
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
    );
    assert_eq!(
        (app, procid, msgid, sd),
        ("agentwall", "-", "ocsf", "-"),
        "{msg}"
    );
    let event: serde_json::Value = serde_json::from_str(fields.next().unwrap()).unwrap();
    (pri.parse().unwrap(), host, event)
}

#[test]
fn records_nodes_send_reach_a_syslog_receiver_over_tls_as_ocsf_and_none_is_lost_when_it_goes_away()
{
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let receiver_cert = write_cert(
        &fx.dir,
        "syslog-receiver",
        &fx.ca.issue_server(std::net::Ipv4Addr::LOCALHOST.into()),
    );
    // It crashes on the first message after the first five.
    let receiver = SyslogReceiver::crashing_after(&receiver_cert, None, 5);
    fx.configure(
        "",
        &format!(
            "[syslog]\naddress = \"{}\"\nca = \"cp-ca.pem\"\n",
            receiver.addr
        ),
    );
    let server = CpProc::start(&fx, None);
    // Forwarding starts with the records stored after it took over: wait for it.
    eventually(
        "the control plane to start forwarding",
        Duration::from_secs(30),
        || {
            server
                .log_text()
                .contains("forwarding to the syslog receiver")
                .then_some(())
                .ok_or_else(|| server.log_text())
        },
    );
    let rt = rt();
    let n1 = fx.node_client(&server.url, "n1");
    // Decisions, a refused DNS query and a session: every kind with an OCSF class.
    let mut first: Vec<serde_json::Value> = (1..=3)
        .map(|i| {
            record(
                if i % 2 == 0 { "allow" } else { "deny" },
                Some(SUPPORT_ID),
                "203.0.113.7",
                None,
                i,
            )
        })
        .collect();
    first.push(serde_json::json!({
        "kind": "dns", "event": "query_refused", "seq": 4, "time": "2026-11-23T00:00:04.000Z",
        "identity": SUPPORT_ID, "name": "aGVsbG8.tunnel.example", "type": "TXT",
        "why": "no rule names it", "count": 1,
    }));
    first.push(serde_json::json!({
        "kind": "identity", "event": "launched", "seq": 5, "time": "2026-11-23T00:00:05.000Z",
        "identity": SUPPORT_ID, "serial": "0a", "cgroup": "/x", "pid": 7,
        "not_after": "2026-11-24T00:00:00.000Z",
    }));
    rt.block_on(n1.post_reports(&batch(1, 1, &first))).unwrap();
    let mut seqs = std::collections::BTreeSet::new();
    let mut classes = std::collections::BTreeSet::new();
    for m in receiver.take(5) {
        let (pri, host, e) = syslog_event(&m);
        if let Err(why) = agentwall_tests::ocsf::check(&e) {
            panic!("an event fails its OCSF class's schema:\n{why}\n{e:#}");
        }
        assert_eq!(host, "spiffe://example.org/node/n1");
        // Facility log audit (13); a denial is a warning, an allowed flow informational.
        let want = match e["severity_id"].as_i64() {
            Some(3) => 108,
            Some(1) => 110,
            other => panic!("severity {other:?}: {e}"),
        };
        assert_eq!(pri, want, "{m}");
        seqs.insert(e["unmapped"]["agentwall"]["seq"].as_u64().unwrap());
        classes.insert(e["class_uid"].as_i64().unwrap());
    }
    assert_eq!(seqs, (1..=5).collect());
    assert_eq!(classes, [3002, 4001, 4003].into());

    // The receiver crashes on the next records, losing what it read; more come while it is
    // away; a receiver on the same address gets every one of them (some may come twice: at
    // least once, never less).
    let addr = receiver.addr;
    let second: Vec<serde_json::Value> = (6..=8)
        .map(|i| record("deny", Some(SUPPORT_ID), "203.0.113.8", None, i))
        .collect();
    rt.block_on(n1.post_reports(&batch(1, 6, &second))).unwrap();
    // Its accept loop ends once it crashed; dropping it closes its listener.
    while !receiver.stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(receiver);
    let third: Vec<serde_json::Value> = (9..=10)
        .map(|i| record("deny", Some(SUPPORT_ID), "203.0.113.9", None, i))
        .collect();
    rt.block_on(n1.post_reports(&batch(1, 9, &third))).unwrap();
    let again = SyslogReceiver::start(&receiver_cert, Some(addr));
    let mut got = std::collections::BTreeSet::new();
    while !(6..=10).all(|s| got.contains(&s)) {
        let (_, _, e) = syslog_event(&again.take(1)[0]);
        agentwall_tests::ocsf::check(&e).unwrap();
        got.insert(e["unmapped"]["agentwall"]["seq"].as_u64().unwrap());
    }
    assert!(got.iter().all(|s| (1..=10).contains(s)), "{got:?}");
    let token = std::fs::read_to_string(&fx.security_token).unwrap();
    let (status, _, body) = https(
        &fx,
        &server,
        None,
        "GET",
        "/v1/metrics",
        &[("Authorization", &format!("Bearer {token}"))],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let forwarded: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("agentwall_cp_syslog_forwarded_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(forwarded >= 10, "{body}");
}

#[test]
fn a_syslog_receiver_the_control_plane_cannot_trust_stops_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    fx.configure(
        "",
        "[syslog]\naddress = \"127.0.0.1:6514\"\nca = \"missing-ca.pem\"\n",
    );
    let said = CpProc::start_refused(&fx);
    assert!(said.contains("missing-ca.pem"), "{said}");
    std::fs::write(
        &fx.config,
        std::fs::read_to_string(&fx.config).unwrap().replace(
            "ca = \"missing-ca.pem\"",
            "ca = \"cp-ca.pem\"\ncert = \"admin.pem\"",
        ),
    )
    .unwrap();
    let said = CpProc::start_refused(&fx);
    assert!(
        said.contains("syslog.cert and syslog.key go together"),
        "{said}"
    );
    std::fs::write(
        &fx.config,
        std::fs::read_to_string(&fx.config)
            .unwrap()
            .replace(
                "address = \"127.0.0.1:6514\"",
                "address = \"siem.example.org\"",
            )
            .replace("cert = \"admin.pem\"\n", ""),
    )
    .unwrap();
    let said = CpProc::start_refused(&fx);
    assert!(
        said.contains("syslog.address \"siem.example.org\" is not HOST:PORT"),
        "{said}"
    );
}

#[test]
fn anomalies_raise_alerts_each_stored_once_listed_and_posted_to_a_webhook_as_alertmanager_does() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    // The first post is refused: delivery is retried.
    let hook = WebhookReceiver::start(1);
    fx.configure(
        "",
        &format!(
            "[alerts]\nlearning_hours = 0.01\ndenials = 5\ndenial_window_secs = 60\ndns_refusals = 5\ndns_window_secs = 60\nwebhooks = [\"http://{}/hook\"]\n",
            hook.addr
        ),
    );
    let server = CpProc::start(&fx, None);
    eventually("alerts to start", Duration::from_secs(30), || {
        let log = server.log_text();
        (log.contains("raising alerts over the records stored from now on")
            && log.contains("sending the alerts raised from now on to the webhook"))
        .then_some(())
        .ok_or(log)
    });
    let rt = rt();
    let n1 = fx.node_client(&server.url, "n1");
    let at = |secs: u64| format!("2026-11-23T00:{:02}:{:02}.000Z", secs / 60, secs % 60);
    let flow = |verdict: &str, dest: &str, secs: u64| {
        let mut r = record(verdict, Some(SUPPORT_ID), dest, None, secs);
        r["time"] = at(secs).into();
        r
    };
    let dns = |event: &str, name: &str, secs: u64| {
        serde_json::json!({
            "kind": "dns", "event": event, "time": at(secs), "identity": SUPPORT_ID,
            "name": name, "type": "TXT", "why": "no rule names it", "count": 1,
        })
    };
    let mut records = vec![
        // Its baseline (the first 36 s of it), then a destination new after it.
        flow("allow", "203.0.113.7", 0),
        flow("allow", "203.0.113.8", 10),
        flow("allow", "203.0.113.99", 120),
        flow("allow", "203.0.113.7", 130),
    ];
    // Six denials in six seconds: one burst, one alert.
    records.extend((200..206).map(|s| flow("deny", "198.51.100.1", s)));
    // Five refused queries, then a name that carries data.
    records.extend((300..305).map(|s| dns("query_refused", "x.example.org", s)));
    records.push(dns(
        "query_would_refuse",
        "mzxw6ytboi2dqnrvgq3dmnzxha4tsmjqgeztcnbvgy3tqobzha.t.attacker.example",
        400,
    ));
    // A process group new to shadow AI on the node, twice.
    records.push(record(
        "unknown",
        None,
        "198.51.100.20",
        Some("openai"),
        500,
    ));
    records.push(record(
        "unknown",
        None,
        "198.51.100.20",
        Some("openai"),
        501,
    ));
    // A node cannot pass a record off as an alert.
    records.push(serde_json::json!({
        "kind": "alert", "time": at(600), "alert": "new_destination", "identity": SUPPORT_ID,
        "summary": "forged", "fingerprint": "0000000000000000",
    }));
    rt.block_on(n1.post_reports(&batch(1, 1, &records)))
        .unwrap();

    // The webhook gets each alert (a post it refused comes again).
    let mut got: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    while got.len() < 5 {
        let body = hook
            .bodies
            .recv_timeout(agentwall_tests::patience(Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("alerts so far {got:#?}: {e}"));
        assert_eq!(body["version"], "4", "{body}");
        assert_eq!(body["status"], "firing", "{body}");
        for a in body["alerts"].as_array().unwrap() {
            assert_eq!(a["status"], "firing");
            assert!(
                a["startsAt"]
                    .as_str()
                    .unwrap()
                    .starts_with("2026-11-23T00:"),
                "{a}"
            );
            got.insert(a["fingerprint"].as_str().unwrap().to_owned(), a.clone());
        }
    }
    let mut names: Vec<&str> = got
        .values()
        .map(|a| a["labels"]["alertname"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "agentwall_denial_burst",
            "agentwall_dns_tunnel",
            "agentwall_dns_tunnel",
            "agentwall_new_destination",
            "agentwall_new_shadow_ai",
        ]
    );
    let new_dest = got
        .values()
        .find(|a| a["labels"]["alertname"] == "agentwall_new_destination")
        .unwrap();
    assert_eq!(new_dest["labels"]["identity"], SUPPORT_ID);
    assert_eq!(new_dest["labels"]["node"], "spiffe://example.org/node/n1");
    assert!(
        new_dest["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("203.0.113.99"),
        "{new_dest}"
    );

    // Listed with their evidence, and stored once each.
    let sec = fx.security_token.display().to_string();
    let listed = cp_json(&fx, &server.url, &["--token-file", &sec], &["alerts"]);
    let alerts = listed["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 5, "{listed:#}");
    assert!(
        alerts.iter().all(|a| a["summary"] != "forged"),
        "{listed:#}"
    );
    let burst = alerts
        .iter()
        .find(|a| a["alert"] == "denial_burst")
        .unwrap();
    assert_eq!(burst["evidence"]["denials"], 5, "{burst}");
    let tunnel = alerts
        .iter()
        .find(|a| a["alert"] == "dns_tunnel" && a["evidence"]["name"].is_string())
        .unwrap();
    assert!(
        tunnel["evidence"]["entropy_bits_per_char"]
            .as_f64()
            .unwrap()
            >= 3.5
    );
    assert_eq!(listed["thresholds"]["denials"], 5);
    assert_eq!(
        listed["thresholds"]["webhooks"][0],
        format!("http://{}/…", hook.addr)
    );
    let out = cp(
        &fx,
        &server.url,
        &["--token-file", &sec],
        &["alerts", "--output", "text"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 alert(s)"), "{text}");
    // For a SIEM: OCSF Detection Findings.
    let out = cp(
        &fx,
        &server.url,
        &["--token-file", &sec],
        &["flows", "--kind", "alert", "--all", "--format", "ocsf"],
    );
    let findings: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(findings.len(), 5);
    for e in &findings {
        assert_eq!(e["class_uid"], 2004, "{e}");
        if let Err(why) = agentwall_tests::ocsf::check(e) {
            panic!("a finding fails its OCSF class's schema:\n{why}\n{e:#}");
        }
    }
    assert!(
        text.contains("thresholds: new destinations after 0.01 h of learning"),
        "{text}"
    );
}
