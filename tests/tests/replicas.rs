//! Control-plane replicas on one PostgreSQL: real server processes over real TLS on
//! loopback, a real PostgreSQL (the one `cargo xtask test` starts), and the real node
//! enforcing what any replica was given.

use std::time::Duration;

use agentwall_tests::{
    cp::{
        CpFixture, CpProc, NODE_ID, POLICY_B, admin_creds, cp, cp_json, node_args, push, security,
        stored,
    },
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, audit_records, eventually, launch_probe,
        loopback_addr, metric, scrape, setup, status_json, wait_status, write_cert,
    },
    pki::CertSpec,
};

const ID: &str = SUPPORT_ID;

/// A push and a revocation given to replica A reach a node that polls only replica B; what
/// the node reports to B, security reads through A.
#[test]
fn a_push_and_a_revocation_through_one_replica_are_enforced_by_a_node_on_another() {
    let (env, tmp, ca) = setup("cp-replicas", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::on(dir, true);
    let a = CpProc::start_named(&fx, None, "cp-a");
    let b = CpProc::start_named(&fx, None, "cp-b");
    let flags = fx.node_flags(&b.url);
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &[]));
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));

    let rev1 = push(&fx, &a.url, "v1", SUPPORT_POLICY);
    wait_status(&node.socket, "version 1 applied from replica B", |s| {
        s["revision"] == rev1.as_str()
    });
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");

    // Reported to B, read through A.
    let denial = eventually(
        "the denial, read through A",
        Duration::from_secs(10),
        || {
            stored(&fx, &a.url, "deny")
                .into_iter()
                .next()
                .ok_or_else(|| "no denial yet".to_owned())
        },
    );
    assert_eq!(denial["node"], NODE_ID);
    assert_eq!(denial["record"]["dest"], "198.51.100.10");
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let nodes = eventually(
        "B's note of the node, read through A",
        Duration::from_secs(10),
        || {
            let n = cp_json(&fx, &a.url, &sec, &["nodes"]);
            if n[0]["applied_version"] == 1 {
                Ok(n)
            } else {
                Err(n.to_string())
            }
        },
    );
    assert_eq!(nodes[0]["node"], NODE_ID);

    // The next push, through B this time, then through A again: the node follows each.
    let rev2 = push(&fx, &b.url, "v2", POLICY_B);
    wait_status(&node.socket, "version 2 applied", |s| {
        s["revision"] == rev2.as_str()
    });
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    let rev3 = push(&fx, &a.url, "v3", SUPPORT_POLICY);
    wait_status(&node.socket, "version 3 applied", |s| {
        s["revision"] == rev3.as_str()
    });
    let shown = cp_json(&fx, &b.url, &sec, &["policy", "show"]);
    assert_eq!(
        (shown["version"].as_u64(), shown["revision"].as_str()),
        (Some(3), Some(rev3.as_str())),
        "{shown}"
    );

    // Revoked through A: the node on B denies the identity everything.
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(&fx, &a.url, &admin, &["revoke", ID]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_status(&node.socket, "the revocation applied", |s| {
        s["revoked"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == ID))
    });
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(
        status_json(&node.socket)["control_plane"]["url"],
        b.url.as_str()
    );
}

/// The replica a node reports to is killed under a stream of denials: the node moves to the
/// next URL, and every denial is stored once, none lost, none twice; the chain the
/// control plane holds of the node's audit log is whole.
#[test]
fn a_replica_killed_under_a_stream_of_denials_loses_and_doubles_nothing() {
    let (env, tmp, ca) = setup("cp-failover", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::on(dir, true);
    let a = CpProc::start_named(&fx, None, "cp-a");
    let b = CpProc::start_named(&fx, None, "cp-b");
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let flags = fx.node_flags_for(&[&b_url, &a_url]);
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
    let rev = push(&fx, &a_url, "v1", SUPPORT_POLICY);
    wait_status(&node.socket, "policy applied", |s| {
        s["revision"] == rev.as_str()
    });
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(
        status_json(&node.socket)["control_plane"]["url"],
        b_url.as_str()
    );

    // Distinct denials before B dies, while batches of them may be on their way to B
    // (SIGKILL: one may be stored without its answer reaching the node), and after.
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 1000 1399"),
        "eperm=400 other=0"
    );
    drop(b);
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 1400 1799"),
        "eperm=400 other=0"
    );

    let got = eventually(
        "all 800 denials, through A",
        Duration::from_secs(180),
        || {
            let s = stored(&fx, &a_url, "deny");
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
    let s = eventually("the spool drained", Duration::from_secs(30), || {
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
    assert_eq!(
        status_json(&node.socket)["control_plane"]["url"],
        a_url.as_str()
    );

    // The chain held of the node's log: whole, each record once.
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let chain = eventually("the chain whole", Duration::from_secs(30), || {
        let c = cp_json(&fx, &a_url, &sec, &["audit", "verify", "--node", NODE_ID]);
        if c["intact"] == true {
            Ok(c)
        } else {
            Err(c.to_string())
        }
    });
    assert!(chain["records"].as_u64().unwrap() >= 800, "{chain}");
    assert_eq!(
        (chain["missing"].as_u64(), chain["unchained"].as_u64()),
        (Some(0), Some(0)),
        "{chain}"
    );
}

/// Replicas started at once on an empty database: one migrates it, all serve.
#[test]
fn replicas_started_at_once_on_an_empty_database_all_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::on(tmp.path(), true);
    let replicas: Vec<CpProc> = std::thread::scope(|t| {
        let all: Vec<_> = (0..3)
            .map(|i| {
                let fx = &fx;
                t.spawn(move || CpProc::start_named(fx, None, &format!("cp-{i}")))
            })
            .collect();
        all.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rev = push(&fx, &replicas[2].url, "v1", SUPPORT_POLICY);
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    for r in &replicas {
        let p = cp_json(&fx, &r.url, &sec, &["policy", "show"]);
        assert_eq!(p["revision"], rev.as_str(), "{p}");
    }
    // A node that has seen more than a replica serves is answered, but not with the older
    // bundle (it would refuse it anyway).
    let node = fx.node_client(&replicas[0].url, "ahead");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r: Result<agentwall::control_plane::PollReply, _> = rt.block_on(node.send_json(
        hyper::Method::POST,
        "/v1/node/poll",
        &agentwall::control_plane::PollRequest {
            known_version: 7,
            agent_version: "x".into(),
            ..Default::default()
        },
        Duration::from_secs(10),
    ));
    let r = r.unwrap();
    assert_eq!((r.version, r.bundle.is_none()), (1, true), "{r:?}");
    let migrated: usize = replicas
        .iter()
        .map(|r| r.log_text().matches("database schema migrated").count())
        .sum();
    assert_eq!(migrated, 1, "the schema is migrated once");
}

/// A replica that cannot reach the database refuses to start and says why, without the
/// password.
#[test]
fn a_replica_without_its_database_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::on(tmp.path(), false);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&fx.config).unwrap().replace(
        "database = \"db/cp.db\"",
        &format!("database = \"postgres://cp:hunter2@127.0.0.1:{port}/agentwall\""),
    );
    std::fs::write(&fx.config, text).unwrap();
    let said = CpProc::start_refused(&fx);
    assert!(
        said.contains(&format!(
            "database postgres://cp:***@127.0.0.1:{port}/agentwall"
        )) && !said.contains("hunter2"),
        "{said}"
    );
}

/// A TCP relay on loopback that can be frozen: it keeps its connections open and stops
/// passing bytes (no reset), as a network partition does.
struct Relay {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let Ok(outbound) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // Held, not dropped: the bytes go on once it thaws.
                            while f.load(SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr, frozen }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A counter of the control plane at `url`, read with the security token.
fn cp_counter(fx: &CpFixture, url: &str, line: &str) -> u64 {
    let c = fx.client(url, None, Some(&fx.security_token));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, body, _) = rt
        .block_on(c.request(
            hyper::Method::GET,
            "/v1/metrics",
            None,
            Duration::from_secs(10),
        ))
        .unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A replica cut off from the database (a partition: no reset, nothing answers) stops
/// answering polls once it cannot tell what the database holds, so its nodes move to a
/// replica that can and get what was pushed meanwhile; and a node never goes back to an
/// older bundle, even when the only replica left is the one behind.
#[test]
fn a_replica_cut_off_from_the_database_sends_its_nodes_elsewhere_and_none_goes_back() {
    let (env, tmp, ca) = setup("cp-partition", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::on(dir, true);
    // Held polls end within 5 s, so nodes ask again soon.
    fx.configure("poll_timeout_secs = 5\n", "");
    let db = fx.postgres.as_ref().unwrap().url.clone();
    let host_port = db
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let relay = Relay::start(host_port.parse().unwrap());
    let through_relay = db.replace(&host_port, &relay.addr.to_string());
    let a = CpProc::start_named(&fx, None, "cp-a");
    let b = CpProc::start_with(&fx, None, "cp-b", &["--database", &through_relay]);
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let flags = fx.node_flags_for(&[&b_url, &a_url]);
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &[]));
    let rev1 = push(&fx, &a_url, "v1", SUPPORT_POLICY);
    wait_status(&node.socket, "version 1 applied, from B", |s| {
        s["revision"] == rev1.as_str()
    });
    assert_eq!(
        status_json(&node.socket)["control_plane"]["url"],
        b_url.as_str()
    );
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");

    // B loses the database; version 2 is pushed through A. The node gets it from A.
    relay.freeze(true);
    let rev2 = push(&fx, &a_url, "v2", POLICY_B);
    wait_status(&node.socket, "version 2 applied, from A", |s| {
        s["revision"] == rev2.as_str()
    });
    assert_eq!(
        status_json(&node.socket)["control_plane"]["url"],
        a_url.as_str()
    );
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    let stale = "agentwall_cp_refusals_total{reason=\"stale\"}";
    let refused = cp_counter(&fx, &b_url, stale);
    assert!(refused >= 1, "B refused no poll as stale");

    // A dies: only B, still cut off, is left. The node keeps version 2 while B refuses it.
    drop(a);
    eventually("B refusing the node again", Duration::from_secs(60), || {
        let n = cp_counter(&fx, &b_url, stale);
        if n >= refused + 2 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    assert_eq!(status_json(&node.socket)["revision"], rev2.as_str());
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );

    // B reaches the database again: it serves version 2 and the node is back with it.
    relay.freeze(false);
    wait_status(&node.socket, "connected to B, version 2", |s| {
        s["control_plane"]["connected"] == true
            && s["control_plane"]["url"] == b_url.as_str()
            && s["revision"] == rev2.as_str()
    });
}

/// The support identity allowed 203.0.113.0/24 only.
const POLICY_C: &str = "\
kind: AgentPolicy
name: support
identity: spiffe://example.org/agent/support
egress:
  - to: [203.0.113.0/24]
    ports: [443]
    protocol: tcp
";

/// Revokes `identity` fleet-wide through the control plane at `url`.
fn revoke(fx: &CpFixture, url: &str, identity: &str) {
    let admin = admin_creds(fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(fx, url, &admin, &["revoke", identity]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The version of the newest bundle the control plane at `url` holds.
fn version_at(fx: &CpFixture, url: &str) -> u64 {
    let sec = security(fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    cp_json(fx, url, &sec, &["policy", "show"])["version"]
        .as_u64()
        .unwrap()
}

fn has_revoked(s: &serde_json::Value, identity: &str) -> bool {
    s["revoked"]
        .as_array()
        .is_some_and(|r| r.iter().any(|x| x == identity))
}

/// A node whose control plane comes back on another database (a fresh one put in place
/// of the old) takes that database's bundle and revocations, even where its numbers equal
/// the ones the node knows: numbers of two databases say nothing of each other.
#[test]
fn a_node_moved_to_another_database_takes_its_bundle_and_revocations_at_equal_numbers() {
    let (env, tmp, ca) = setup("cp-lineage", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::on(dir, true);
    let a = CpProc::start_named(&fx, None, "cp-a");
    let addr = a.addr;
    let flags = fx.node_flags(&a.url);
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &[]));
    push(&fx, &a.url, "a1", SUPPORT_POLICY);
    let rev_a2 = push(&fx, &a.url, "a2", POLICY_B);
    let other_id = "spiffe://example.org/agent/other";
    revoke(&fx, &a.url, other_id);
    wait_status(
        &node.socket,
        "version 2 and generation 1 of the first database",
        |s| s["revision"] == rev_a2.as_str() && has_revoked(s, other_id),
    );
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );

    // The second database gets version 2 and generation 1 of its own before the node can
    // see it; then its control plane takes the first one's place.
    let second = agentwall::control_plane::store::scratch::database();
    drop(a);
    let b = CpProc::start_with(&fx, None, "cp-b-setup", &["--database", &second.url]);
    push(&fx, &b.url, "b1", POLICY_B);
    let rev_b2 = push(&fx, &b.url, "b2", POLICY_C);
    revoke(&fx, &b.url, ID);
    assert_eq!(version_at(&fx, &b.url), 2);
    drop(b);
    let _b = CpProc::start_with(&fx, Some(addr), "cp-b", &["--database", &second.url]);
    wait_status(
        &node.socket,
        "the second database's version 2 and revocation",
        |s| s["revision"] == rev_b2.as_str() && has_revoked(s, ID),
    );
    // Revocations only add up: the first database's stays.
    assert!(has_revoked(&status_json(&node.socket), other_id));
    assert_eq!(probe.cmd("connect tcp 203.0.113.10 443"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
}

/// The database goes back to an older state under a running replica (restored from a
/// backup, a standby promoted without the last commits): pushes and revocations are
/// numbered above what the replica served, so nodes take them. A replica started on it
/// afterwards learns from the nodes what they hold (409 meanwhile: they keep what they
/// have) and numbers above that.
#[test]
fn a_database_put_back_to_an_older_state_still_takes_pushes_and_revocations() {
    let (env, tmp, ca) = setup("cp-restore", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::on(dir, true);
    // Held polls end within 5 s: an answer carries the revocation list soon.
    fx.configure("poll_timeout_secs = 5\n", "");
    let db = fx.postgres.as_ref().unwrap().url.clone();
    let a = CpProc::start_named(&fx, None, "cp-a");
    let addr = a.addr;
    let flags = fx.node_flags(&a.url);
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &[]));
    let (first, second, third) = (
        "spiffe://example.org/agent/first",
        "spiffe://example.org/agent/second",
        "spiffe://example.org/agent/third",
    );
    push(&fx, &a.url, "v1", SUPPORT_POLICY);
    let rev2 = push(&fx, &a.url, "v2", POLICY_B);
    revoke(&fx, &a.url, first);
    revoke(&fx, &a.url, second);
    wait_status(&node.socket, "version 2 and generation 2", |s| {
        s["revision"] == rev2.as_str() && has_revoked(s, second)
    });
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );

    // Put back to a backup taken after version 1 and the first revocation.
    let put_back =
        "DELETE FROM policy WHERE version > 1; DELETE FROM revocations WHERE generation > 1";
    agentwall::control_plane::store::scratch::admin(&db, put_back).unwrap();
    let rev3 = push(&fx, &a.url, "v3", POLICY_C);
    assert_eq!(version_at(&fx, &a.url), 3);
    wait_status(
        &node.socket,
        "version 3, numbered above what A served",
        |s| s["revision"] == rev3.as_str(),
    );
    assert_eq!(probe.cmd("connect tcp 203.0.113.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
    revoke(&fx, &a.url, third);
    wait_status(&node.socket, "the third revocation", |s| {
        has_revoked(s, third)
    });
    // The second revocation is gone from the database: said, and kept by the node.
    assert!(has_revoked(&status_json(&node.socket), second));
    let log = a.log_text();
    assert!(
        log.contains("identities revoked before are missing from the database's revocation list")
            && log.contains(second),
        "{log}"
    );

    // Put back again, and a revocation made through a replica started on it before any
    // node told it what they hold: numbered 2, below the node's 3. The node applies it all
    // the same (revocations only add up).
    agentwall::control_plane::store::scratch::admin(&db, put_back).unwrap();
    drop(a);
    // A replica that kept nothing of what was served (its state lost too; a replica that
    // kept `served.json` numbers above it: `server::restored` tests that).
    std::fs::remove_file(fx.dir.join("state/served.json")).unwrap();
    let early = CpProc::start_named(&fx, None, "cp-early");
    let out = cp(
        &fx,
        &early.url,
        &admin_creds(&fx)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["revoke", ID, "--output", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["generation"], 2, "{said}");
    drop(early);
    let c = CpProc::start_named(&fx, Some(addr), "cp-c");
    wait_status(
        &node.socket,
        "the revocation numbered below the node's",
        |s| has_revoked(s, ID),
    );
    assert_eq!(probe.cmd("connect tcp 203.0.113.10 443"), "err EPERM");
    // C learns from the node what it holds; the node keeps version 3.
    eventually(
        "C noting that the node knows more than the database",
        Duration::from_secs(60),
        || match cp_counter(&fx, &c.url, "agentwall_cp_database_behind") {
            1 => Ok(()),
            n => Err(format!("{n}")),
        },
    );
    assert_eq!(status_json(&node.socket)["revision"], rev3.as_str());
    // A push through C is numbered above what the node holds.
    let rev4 = push(&fx, &c.url, "v4", SUPPORT_POLICY);
    assert_eq!(version_at(&fx, &c.url), 4);
    wait_status(&node.socket, "version 4 through C", |s| {
        s["revision"] == rev4.as_str()
    });
    // The database's revocations are still numbered below the node's until the next one.
    revoke(&fx, &c.url, "spiffe://example.org/agent/fourth");
    eventually(
        "C no longer behind",
        Duration::from_secs(30),
        || match cp_counter(&fx, &c.url, "agentwall_cp_database_behind") {
            0 => Ok(()),
            n => Err(format!("{n}")),
        },
    );
}
