//! Crash consistency, shown: the node is killed (SIGKILL) at each named failpoint of the audit
//! log (append, rotation, anchor), the report spool (write, a write torn half-way, the
//! acknowledgement cursor) and its state files (the session table, the addresses learned
//! from DNS, a state file's replacement), and started again. Every denial an agent met is
//! then stored at the control plane exactly once (none counted lost: nothing here runs out of
//! room), the control plane finds the node's audit chain whole, and the node's own log
//! verifies against its anchor and the key its checkpoints are signed with.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agentwall_tests::{
    Probe, bin_path,
    cp::{CpFixture, CpProc, NODE_ID, admin_creds, cp, cp_json},
    node::{
        NodeProc, eventually, launch_probe, loopback_addr, metric, scrape, setup, try_scrape,
        write_cert,
    },
    pki::CertSpec,
    require_root,
};

const AGENT: &str = "spiffe://example.org/agent/crash";

const POLICY: &str = "kind: AgentPolicy
name: crash
identity: spiffe://example.org/agent/crash
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
  - to: [api.crash.example]
    ports: [443]
    protocol: tcp
";

/// What `api.crash.example` resolves to (a name rule allows it once the agent asked).
const LEARNED: &str = "203.0.113.10";

/// Each failpoint, and how many passes it lets by before it crashes the node (counted from
/// the node's readiness).
const POINTS: &[(&str, u32)] = &[
    ("audit-before-append", 3),
    ("audit-after-append", 3),
    ("audit-before-rotate", 0),
    ("audit-after-rotate", 0),
    ("audit-before-anchor", 1),
    ("spool-before-write", 1),
    ("spool-torn-write", 1),
    ("spool-after-write", 1),
    ("spool-before-ack", 1),
    ("spool-after-ack", 1),
    ("sessions-save", 0),
    ("state-file-before-rename", 0),
    ("learned-save", 0),
];

struct Rig {
    env: agentwall_tests::TestEnv,
    dir: PathBuf,
    fx: CpFixture,
    url: String,
    args: Vec<String>,
    metrics: std::net::SocketAddr,
    audit: PathBuf,
}

impl Rig {
    fn start(&self, failpoint: Option<&str>) -> NodeProc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let spec = failpoint.map(PathBuf::from);
        let vars: Vec<(&str, &Path)> = spec
            .iter()
            .map(|s| ("AGENTWALL_FAILPOINTS", s.as_path()))
            .collect();
        NodeProc::start_env(&self.env, &self.dir, &args, &vars)
    }

    fn admin(&self) -> Vec<String> {
        admin_creds(&self.fx)
    }
}

/// Connects to a denied destination `n` times: the denials made (each an EPERM and a record).
fn deny(probe: &mut Probe, port: &mut u16, n: usize) -> u64 {
    let lines: Vec<String> = (0..n)
        .map(|_| {
            *port = if *port >= 60_000 { 1000 } else { *port + 1 };
            format!("connect tcp 203.0.113.7 {port}")
        })
        .collect();
    let out = probe.batch(&lines);
    for o in &out {
        assert_eq!(o, "err EPERM", "a denied destination");
    }
    out.len() as u64
}

/// Waits until the node recorded `n` denials of the agent since it started (so the probe
/// never outruns it and fills the kernel's ring), or died.
fn caught_up(rig: &Rig, node: &mut NodeProc, n: u64) {
    eventually(
        "the node recorded the denials",
        Duration::from_secs(30),
        || {
            if node.child.try_wait().unwrap().is_some() {
                return Ok(());
            }
            let seen = try_scrape(rig.metrics).map_or(0.0, |s| {
                s.samples
                    .iter()
                    .find(|x| {
                        x.metric == "agentwall_decisions_total"
                            && x.labels.get("identity") == Some(AGENT)
                            && x.labels.get("verdict") == Some("deny")
                    })
                    .map_or(0.0, |x| match x.value {
                        prometheus_parse::Value::Counter(v)
                        | prometheus_parse::Value::Untyped(v) => v,
                        _ => 0.0,
                    })
            });
            if seen >= n as f64 {
                Ok(())
            } else {
                Err(format!("{seen} of {n}"))
            }
        },
    );
}

/// The agent's lookup of the allowed name, through the node's proxy (which reaches the
/// agent's namespace at the node's next tick: refused until then).
fn lookup(probe: &mut Probe) {
    eventually("the name resolved", Duration::from_secs(30), || match probe
        .cmd("resolve api.crash.example 203.0.113.53 udp A")
        .as_str()
    {
        a if a == format!("ok {LEARNED}") => Ok(()),
        other => Err(other.to_owned()),
    });
}

/// The agent's verdicts are what its policy says: its allowed destination passes the hooks
/// (and meets an empty namespace), anything else is refused.
fn verdicts_hold(probe: &mut Probe, port: &mut u16) -> u64 {
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    deny(probe, port, 1)
}

/// Every stored denial of the agent, one page.
fn denial_page(rig: &Rig) -> serde_json::Value {
    let admin = rig.admin();
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let args = [
        "flows",
        "--verdict",
        "deny",
        "--identity",
        AGENT,
        "--all",
        "--limit",
        "10000",
    ];
    cp_json(&rig.fx, &rig.url, &admin, &args)
}

/// The denials of the agent the control plane holds, their counts summed, and the records the
/// node reported lost.
fn stored(rig: &Rig) -> (u64, u64) {
    let admin = rig.admin();
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let page = denial_page(rig);
    let denials = page["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["record"]["count"].as_u64().unwrap_or(1))
        .sum();
    let losses = cp_json(
        &rig.fx,
        &rig.url,
        &admin,
        &["flows", "--kind", "loss", "--all", "--limit", "10000"],
    );
    let lost = losses["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            ["spool_records_lost", "outbox_records_lost", "records_lost"]
                .iter()
                .filter_map(|k| f["record"][*k].as_u64())
                .sum::<u64>()
        })
        .sum();
    (denials, lost)
}

#[test]
fn a_crash_at_any_failpoint_loses_no_record_and_stores_none_twice() {
    require_root();
    let (env, tmp, ca) = setup("crash", POLICY);
    let dir = tmp.path().to_owned();
    let fx = CpFixture::new(&dir);
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let metrics = loopback_addr();
    let audit = dir.join("audit/audit.jsonl");
    let _unroute = agentwall_tests::ProxyRouteGuard::new();
    // The upstream the node's DNS proxy forwards allowed names to.
    std::fs::write(
        dir.join("zone.json"),
        serde_json::json!({ "records": [{ "name": "api.crash.example", "type": "A", "ttl": 300, "value": LEARNED }] })
            .to_string(),
    )
    .unwrap();
    let upstream = loopback_addr();
    let _dns =
        agentwall_tests::DnsServer::start_in(None, &upstream.to_string(), &dir.join("zone.json"));
    let proxy_port = loopback_addr().port().to_string();
    // The node signs a checkpoint every second with its own key.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (signing_key, signer) = (dir.join("audit-signing.key"), dir.join("audit-signing.pub"));
    std::fs::write(&signing_key, key.serialize_pem()).unwrap();
    std::fs::write(&signer, key.public_key_pem()).unwrap();
    let mut args = fx.node_flags(&url);
    args.extend(
        [
            "--aggregate-window-secs",
            "0",
            "--metrics-listen",
            &metrics.to_string(),
            "--audit-log",
            audit.to_str().unwrap(),
            // Rotation every few records: the rotation's failpoints are reached.
            "--audit-log-max-bytes",
            "4096",
            "--audit-signing-key",
            signing_key.to_str().unwrap(),
            "--audit-checkpoint-secs",
            "1",
            "--dns-upstream",
            &upstream.to_string(),
            "--dns-listen-port",
            &proxy_port,
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    let rig = Rig {
        env,
        dir: dir.clone(),
        fx,
        url,
        args,
        metrics,
        audit,
    };
    let policy_dir = dir.join("push");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("agents.yaml"), POLICY).unwrap();
    let admin = rig.admin();
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(
        &rig.fx,
        &rig.url,
        &admin,
        &["policy", "push", policy_dir.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut node = rig.start(None);
    eventually("the bundle applied", Duration::from_secs(60), || {
        let v = metric(
            &scrape(rig.metrics),
            "agentwall_control_plane_applied_version",
            &[],
        );
        if v >= 1.0 {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    });
    let (cert, key) = write_cert(&dir, "agent", &ca.issue(&CertSpec::agent(AGENT)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    let mut port = 1000;
    let mut made = verdicts_hold(&mut probe, &mut port);

    let mut renewals = 0;
    for (point, skip) in POINTS {
        drop(node);
        let spec = if *skip == 0 {
            format!("{point}=return")
        } else {
            format!("{point}={skip}*off->return")
        };
        node = rig.start(Some(&spec));
        // What reaches each point: a renewal (the session table), denials (the log, the
        // spool, its acknowledgements, the anchor at the next tick).
        if point.starts_with("sessions") || point.starts_with("state-file") {
            renewals += 1;
            let (c, k) = write_cert(
                &dir,
                &format!("renew-{renewals}"),
                &ca.issue(&CertSpec::agent(AGENT)),
            );
            // The node dies during the renewal: the agent is told so, or it is done.
            let _ = probe.cmd(&format!(
                "spawn {} renew --cert {} --key {} --socket {}",
                bin_path("agentwall").display(),
                c.display(),
                k.display(),
                node.socket.display()
            ));
        }
        let (began, made_before) = (Instant::now(), made);
        let until = began + agentwall_tests::patience(Duration::from_secs(60));
        let status = loop {
            if let Some(s) = node.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < until,
                "failpoint {point} was never reached"
            );
            // The learned-address file: lookups of the allowed name (saved at the next tick;
            // the node may be gone before one is answered).
            if *point == "learned-save" {
                let _ = probe.cmd("resolve api.crash.example 203.0.113.53 udp A");
            }
            made += deny(&mut probe, &mut port, 5);
            caught_up(&rig, &mut node, made - made_before);
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the node was to die at failpoint {point}: {status:?}"
        );
        eprintln!(
            "failpoint {point}: reached after {} denials, {:?}, ports up to {port}",
            made - made_before,
            began.elapsed()
        );
        // Started again, it enforces as before and takes the agent's session back.
        node = rig.start(None);
        let n = verdicts_hold(&mut probe, &mut port);
        if *point == "learned-save" {
            // The learned file is whole (old or new): the name resolves and is reachable.
            lookup(&mut probe);
            assert_eq!(
                probe.cmd(&format!("connect tcp {LEARNED} 443")),
                "err ENETUNREACH",
                "the learned address is allowed"
            );
        }
        made += n;
        caught_up(&rig, &mut node, n);
    }
    made += deny(&mut probe, &mut port, 20);

    // Every denial is at the control plane once, none lost.
    let mut last = (0, 0);
    let within = Duration::from_secs(60);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually("every denial stored", within, || {
            last = stored(&rig);
            if last.0 >= made {
                Ok(())
            } else {
                Err(format!("{last:?} of {made}"))
            }
        })
    }));
    let (denials, lost) = stored(&rig);
    if denials != made {
        let page = denial_page(&rig);
        let mut ports: Vec<u64> = page["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["record"]["port"].as_u64().unwrap())
            .collect();
        ports.sort_unstable();
        let missing: Vec<u64> = (1001..=u64::from(port))
            .filter(|p| ports.binary_search(p).is_err())
            .collect();
        let twice: Vec<&u64> = ports
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| &w[0])
            .collect();
        eprintln!("ports missing at the control plane: {missing:?}; stored twice: {twice:?}");
    }
    assert!(
        waited.is_ok() && denials == made && lost == 0,
        "{made} denials made; {denials} stored at the control plane, {lost} counted lost"
    );

    // The chain the control plane holds is whole, and so is the node's own.
    let chain = cp_json(
        &rig.fx,
        &rig.url,
        &admin,
        &["audit", "verify", "--node", NODE_ID],
    );
    assert_eq!(chain["intact"], true, "{chain:#}");
    assert_eq!(chain["missing"], 0, "{chain:#}");
    assert!(chain["records"].as_u64().unwrap() >= made, "{chain:#}");
    node.stop();
    let out = std::process::Command::new(bin_path("agentwall"))
        .args(["audit", "verify", "--anchor"])
        .arg(dir.join("state/audit.anchor"))
        .arg("--signer")
        .arg(&signer)
        // Stopped cleanly: the log ends with a signed checkpoint.
        .args(["--max-unsigned", "0"])
        .arg(&rig.audit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // Checkpoints were signed (the run takes several seconds), crashes or not.
    assert!(
        said.contains("signed checkpoint(s), the last signing seq"),
        "{said}"
    );
    // A copy of the log with its checkpoints taken out and the chain hashed again (what
    // someone without the key can do) does not pass.
    let copy = dir.join("stripped.jsonl");
    let mut prev = agentwall::audit::GENESIS.to_owned();
    let mut lines = String::new();
    let mut seq = 0u64;
    for f in agentwall::audit::chain_files(&rig.audit).unwrap() {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            let mut r: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            if r["kind"] == "checkpoint" {
                continue;
            }
            seq += 1;
            r.insert("seq".into(), seq.into());
            r.insert("prev".into(), prev.clone().into());
            let h = agentwall::audit::record_hash(&r);
            r.insert("hash".into(), h.clone().into());
            prev = h;
            lines.push_str(&serde_json::Value::Object(r).to_string());
            lines.push('\n');
        }
    }
    std::fs::write(&copy, lines).unwrap();
    let out = std::process::Command::new(bin_path("agentwall"))
        .args(["audit", "verify", "--signer"])
        .arg(&signer)
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("and no signed checkpoint"), "{said}");
    drop(server);
}
