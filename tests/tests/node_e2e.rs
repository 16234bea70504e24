//! End to end: the real `agentwall node` and `agentwall launch` binaries, real TLS over the
//! unix socket, real certificates (rcgen, plus one from openssl), real kernel enforcement.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agentwall_tests::{
    Probe, TestEnv, bin_path,
    node::{
        NodeProc, agentwall, audit_records, eventually, launch_args, launch_probe, loopback_addr,
        metric, scrape, setup, status_json, wait_flow, wait_status, write_cert,
    },
    pki::{Ca, CertSpec, Issued},
};

const ID: &str = "spiffe://example.org/agent/support";

const POLICY: &str = "\
kind: AgentPolicy
name: support
identity: spiffe://example.org/agent/support
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
  - to: [127.0.0.1]
    ports: [9000]
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
";

fn openssl_agent_cert(dir: &Path) -> (PathBuf, PathBuf) {
    // An issuing CA made by openssl as well, so the chain is openssl's end to end.
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed for the interop test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName=URI:{ID}\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
        ),
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ossl-ca.key",
        "-out",
        "ossl-ca.pem",
        "-subj",
        "/CN=openssl CA",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ossl-agent.key",
        "-out",
        "ossl-agent.csr",
        "-subj",
        "/CN=agent",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "ossl-agent.csr",
        "-CA",
        "ossl-ca.pem",
        "-CAkey",
        "ossl-ca.key",
        "-CAcreateserial",
        "-out",
        "ossl-agent.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ossl-agent.pem"), dir.join("ossl-agent.key"))
}

#[test]
fn node_launch_verifies_identity_enforces_and_reloads_policy() {
    let env = TestEnv::new("node");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall test CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();
    let (ocert, okey) = openssl_agent_cert(dir);
    // The bundle trusts both CAs: ours and the one openssl made.
    let bundle = format!(
        "{}{}",
        ca.pem(),
        std::fs::read_to_string(dir.join("ossl-ca.pem")).unwrap()
    );
    std::fs::write(dir.join("ca.pem"), bundle).unwrap();
    let node = NodeProc::start(&env, dir);

    // A good certificate: the command runs inside a cgroup below the attach point, and the
    // policy decides its connections.
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", probe.pid)).unwrap();
    let rel = env.root.path().file_name().unwrap().to_str().unwrap();
    assert!(
        cgroup.contains(&format!("/{rel}/agentwall/example.org_agent_support-")),
        "{cgroup}"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err EPERM");

    // The denial is recorded with identity, process, cgroup, reason and revision.
    let rec = wait_flow(&node.socket, "deny", 80);
    assert_eq!(rec["identity"], ID);
    assert_eq!(rec["pid"], probe.pid);
    assert_eq!(rec["dest"], "192.0.2.10");
    assert_eq!(rec["protocol"], "tcp");
    assert_eq!(rec["reason"], "no rule allows it");
    assert!(rec["exe"].as_str().unwrap().ends_with("/aw-probe"), "{rec}");
    assert!(
        rec["cgroup"]
            .as_str()
            .unwrap()
            .contains("/agentwall/example.org_agent_support-"),
        "{rec}"
    );
    assert_eq!(rec["revision"], status_json(&node.socket)["revision"]);

    // Audit mode: the would-be denial is allowed and recorded as audit.
    let (acert, akey) = write_cert(
        dir,
        "auditor",
        &ca.issue(&CertSpec::agent("spiffe://example.org/agent/auditor")),
    );
    let mut auditor = launch_probe(&node.socket, &acert, &akey);
    assert_eq!(
        auditor.cmd("connect tcp 198.51.100.9 8443"),
        "err ENETUNREACH"
    );
    let rec = wait_flow(&node.socket, "audit", 8443);
    assert_eq!(rec["identity"], "spiffe://example.org/agent/auditor");
    assert_eq!(rec["reason"], "no rule allows it");

    // A process in no identity's cgroup: allowed, recorded as an unknown flow.
    let mut stranger = Probe::spawn(&env.cgroup("unenrolled"));
    assert_eq!(
        stranger.cmd("connect tcp 203.0.113.5 8080"),
        "err ENETUNREACH"
    );
    let rec = wait_flow(&node.socket, "unknown", 8080);
    assert!(rec.get("identity").is_none(), "{rec}");
    assert!(
        rec["cgroup"].as_str().unwrap().ends_with("/unenrolled"),
        "{rec}"
    );

    // The same with a certificate chain made by openssl.
    let mut oprobe = launch_probe(&node.socket, &ocert, &okey);
    assert_eq!(oprobe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(oprobe.cmd("connect tcp 192.0.2.10 80"), "err EPERM");

    // launch's exit status is the command's.
    let st = launch_args(&node.socket, &cert, &key)
        .args(["sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7));

    // Every kind of bad certificate: exit 2, one line naming reason and identity, and the
    // command never runs.
    let other = Ca::new("someone else's CA");
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let expired = CertSpec {
        not_before: now - hour * 3,
        not_after: now - hour,
        ..CertSpec::agent(ID)
    };
    let early = CertSpec {
        not_before: now + hour,
        not_after: now + hour * 2,
        ..CertSpec::agent(ID)
    };
    let server_only = CertSpec {
        client_auth: false,
        ..CertSpec::agent(ID)
    };
    let no_uri = CertSpec {
        uris: vec![],
        ..CertSpec::agent(ID)
    };
    let two_uris = CertSpec {
        uris: vec![ID.into(), "spiffe://example.org/agent/b".into()],
        ..CertSpec::agent(ID)
    };
    let cases: Vec<(&str, Issued, &str)> = vec![
        (
            "expired",
            ca.issue(&expired),
            "certificate has expired (identity spiffe://example.org/agent/support)",
        ),
        (
            "early",
            ca.issue(&early),
            "certificate is not valid yet (identity spiffe://example.org/agent/support)",
        ),
        (
            "stranger",
            other.issue(&CertSpec::agent(ID)),
            "certificate is not signed by a trusted CA (unknown issuer) (identity spiffe://example.org/agent/support)",
        ),
        (
            "server-only",
            ca.issue(&server_only),
            "certificate is not valid for client authentication (EKU clientAuth missing) (identity spiffe://example.org/agent/support)",
        ),
        (
            "no-uri",
            ca.issue(&no_uri),
            "certificate has no SPIFFE ID (expected one URI SAN spiffe://...) (identity unknown)",
        ),
        (
            "two-uris",
            ca.issue(&two_uris),
            "certificate has 2 URI SANs; exactly one SPIFFE ID is allowed (identity unknown)",
        ),
        (
            "other-domain",
            ca.issue(&CertSpec::agent("spiffe://other.org/agent/support")),
            "identity spiffe://other.org/agent/support is outside the trust domain example.org (identity spiffe://other.org/agent/support)",
        ),
        (
            "no-policy",
            ca.issue(&CertSpec::agent("spiffe://example.org/agent/nobody")),
            "no AgentPolicy for identity spiffe://example.org/agent/nobody (identity spiffe://example.org/agent/nobody)",
        ),
    ];
    let marker = dir.join("ran");
    let touch = [
        "sh".to_owned(),
        "-c".to_owned(),
        format!("touch {}", marker.display()),
    ];
    for (name, issued, want) in &cases {
        let (c, k) = write_cert(dir, name, issued);
        let out = launch_args(&node.socket, &c, &k)
            .args(&touch)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!("agentwall launch: rejected: {want}"),
            "{name}"
        );
        assert!(!marker.exists(), "{name}: the command ran");
    }
    // A key that is not the certificate's, and no node at all.
    let (_, stranger_key) = write_cert(dir, "stranger2", &ca.issue(&CertSpec::agent(ID)));
    let out = launch_args(&node.socket, &cert, &stranger_key)
        .args(&touch)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "agentwall launch: rejected: private key {} does not match certificate {} (identity {ID})",
            stranger_key.display(),
            cert.display()
        )
    );
    let out = launch_args(&dir.join("missing.sock"), &cert, &key)
        .args(&touch)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with(&format!(
        "agentwall launch: rejected: node is not running: cannot connect to {}",
        dir.join("missing.sock").display()
    )));
    assert!(!marker.exists());

    // status names the identity and its sessions.
    let s = status_json(&node.socket);
    let by_id = |id: &str| {
        s["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["identity"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing from status: {s}"))
    };
    let ident = by_id(ID);
    assert_eq!(ident["mode"], "enforce");
    // The `sh -c "exit 7"` session ended with its process: the node drops it and its cgroup;
    // the two running probes remain.
    let live = |s: &serde_json::Value| -> Vec<u64> {
        let mut pids: Vec<u64> = s["identities"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["identity"] == ID)
            .flat_map(|i| {
                i["sessions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["pid"].as_u64().unwrap())
            })
            .collect();
        pids.sort();
        pids
    };
    let mut want = vec![u64::from(probe.pid), u64::from(oprobe.pid)];
    want.sort();
    wait_status(&node.socket, "the ended session to go", |s| live(s) == want);
    assert_eq!(by_id("spiffe://example.org/agent/auditor")["mode"], "audit");
    let revision = s["revision"].as_str().unwrap().to_owned();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(s["node"], host.trim());
    // Two identities applied; a binding per session still alive.
    assert_eq!(s["map_fill"]["identities"], 2, "{s}");
    assert_eq!(s["map_fill"]["bindings_max"], 65536);
    assert!(s["map_fill"]["bindings"].as_u64().unwrap() >= 3, "{s}");

    // `policy apply` makes the node apply an edit now: a valid one is enforced at once for
    // running agents...
    let apply = || {
        let out = Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(&node.socket)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    std::fs::write(
        dir.join("policy/agents.yaml"),
        POLICY.replacen("[443]", "[443, 80]", 1),
    )
    .unwrap();
    let (code, out, err) = apply();
    assert_eq!(code, 0, "{err}");
    let good = status_json(&node.socket)["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(good, revision);
    assert_eq!(out, format!("applied: revision {good} in force"));
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    // ...an invalid one is refused and the last good revision stays in force.
    std::fs::write(
        dir.join("policy/agents.yaml"),
        POLICY.replacen("[443]", "[99999]", 1),
    )
    .unwrap();
    let (code, _, err) = apply();
    assert_eq!(code, 1);
    assert!(
        err.contains("egress[0].ports: invalid port \"99999\""),
        "{err}"
    );
    assert!(
        err.ends_with(&format!("refused: revision {good} stays in force")),
        "{err}"
    );
    let s = status_json(&node.socket);
    assert_eq!(s["revision"], good.as_str());
    assert!(
        s["policy_error"]
            .as_str()
            .unwrap()
            .contains("invalid port \"99999\""),
        "{s}"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 22"), "err EPERM");

    // --user: the command runs as that user, still inside the agent's cgroup.
    let out = Command::new(bin_path("agentwall"))
        .arg("launch")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--socket")
        .arg(&node.socket)
        .args([
            "--user",
            "nobody",
            "--",
            "sh",
            "-c",
            "id -u; id -G; cat /proc/self/cgroup",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("65534"), "{text}");
    assert_eq!(
        lines.next(),
        Some("65534"),
        "no supplementary groups are kept: {text}"
    );
    assert!(
        text.contains("/agentwall/example.org_agent_support-"),
        "{text}"
    );

    // SIGTERM: the node exits cleanly and enforcement stays.
    assert_eq!(node.stop(), 0);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 22"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
}

#[test]
fn certificate_expiry_cuts_the_agent_off_even_with_the_node_stopped() {
    let (env, tmp, ca) = setup("expiry", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);

    // A certificate valid for three more seconds.
    let spec = CertSpec::agent_expiring(ID, 3);
    let not_after = spec.not_after;
    let (cert, key) = write_cert(dir, "short", &ca.issue(&spec));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // The node goes away; the kernel still holds the deadline.
    assert_eq!(node.stop(), 0);
    // Waiting for the clock is the behaviour under test, not synchronisation.
    let until = std::time::SystemTime::from(not_after) + Duration::from_millis(50);
    while std::time::SystemTime::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
}

#[test]
fn a_certificate_expiring_under_a_running_node_is_an_audit_event() {
    let (env, tmp, ca) = setup("expiry-audit", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let spec = CertSpec::agent_expiring(ID, 2);
    let (cert, key) = write_cert(dir, "short", &ca.issue(&spec));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    let deadline = agentwall_tests::deadline(Duration::from_secs(15));
    let event = loop {
        let found = audit_records(&audit)
            .into_iter()
            .find(|r| r["kind"] == "identity" && r["event"] == "expired");
        if let Some(e) = found {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "no expired event");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(event["identity"], ID);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
}

fn agentwall_out(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("agentwall"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// In a subtree delegated to a user (a user's systemd manager, a rootless container), that
/// user moves tasks across the unit's boundary at will: out of it after the binding, or into
/// it unscanned. enroll refuses while an ancestor's cgroup.procs is writable by anyone but
/// root.
#[test]
fn enroll_refuses_a_cgroup_in_a_subtree_delegated_to_a_user() {
    let (env, tmp, ca) = setup("delegated", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let sock = node.socket.to_str().unwrap().to_owned();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let user = env.cgroup("user-65534.slice");
    let unit = env.cgroup("user-65534.slice/agent.service");
    let _svc = Probe::spawn(&unit);
    let enroll = || {
        agentwall_out(&[
            "enroll",
            "--cgroup",
            unit.path().to_str().unwrap(),
            "--cert",
            c,
            "--key",
            k,
            "--socket",
            &sock,
        ])
    };
    let procs = user.path().join("cgroup.procs");
    std::os::unix::fs::chown(&procs, Some(65534), None).expect("delegate the slice");
    let (code, _, err) = enroll();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "user-65534.slice/cgroup.procs may be written by uid 65534 (mode 644): a process of that user could move the unit's tasks out after the binding, new ones in unscanned, or one past the scan"
        ),
        "{err}"
    );
    std::os::unix::fs::chown(&procs, Some(0), None).expect("take the slice back");
    // Group write, whatever the group.
    let mode = |file: &Path, mode: u32| {
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    };
    mode(&procs, 0o664);
    let (code, _, err) = enroll();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("user-65534.slice/cgroup.procs may be written by uid 0 (mode 664)"),
        "{err}"
    );
    mode(&procs, 0o644);
    // Within the unit too: a move between its own cgroups mid-scan could hide a task from
    // the listing.
    let worker = env.cgroup("user-65534.slice/agent.service/worker");
    let threads = worker.path().join("cgroup.threads");
    std::os::unix::fs::chown(&threads, Some(65534), None).expect("delegate the worker");
    let (code, _, err) = enroll();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("agent.service/worker/cgroup.threads may be written by uid 65534 (mode 644)"),
        "{err}"
    );
    std::os::unix::fs::chown(&threads, Some(0), None).expect("take the worker back");
    // The unit's own freeze: its writer could thaw it under the scan.
    let freeze = unit.path().join("cgroup.freeze");
    std::os::unix::fs::chown(&freeze, Some(65534), None).expect("hand out the freeze");
    let (code, _, err) = enroll();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("agent.service/cgroup.freeze may be written by uid 65534 (mode 644)"),
        "{err}"
    );
    std::os::unix::fs::chown(&freeze, Some(0), None).expect("take the freeze back");
    let (code, _, err) = enroll();
    assert_eq!(code, 0, "{err}");
}

/// A node that cannot read every task of a unit, or every task's descriptor table, refuses
/// every enroll, saying what it lacks, and binds nothing: without `CAP_SYS_PTRACE` (the kernel
/// keeps another user's descriptors from it), and without its task census (a kernel that
/// refuses the program: a task outside sharing the unit's table could not be told), which
/// `status` lists.
#[test]
fn enroll_refuses_on_a_node_that_cannot_read_every_task_or_table() {
    let (env, tmp, ca) = setup("noptrace", POLICY);
    let dir = tmp.path();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let unit = env.cgroup("agent.service");
    let mut svc = Probe::spawn(&unit);
    let enroll = |node: &NodeProc| {
        agentwall_out(&[
            "enroll",
            "--cgroup",
            unit.path().to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--socket",
            node.socket.to_str().unwrap(),
        ])
    };
    let node = NodeProc::start_edited(&env, dir, &[], |mut cmd| {
        // SAFETY: one system call between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // Gone from the bounding set, root's exec does not get it back.
                if libc::prctl(libc::PR_CAPBSET_DROP, 19, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(eff & (1 << 19), 0, "the node kept CAP_SYS_PTRACE: {eff:x}");
    let (code, _, err) = enroll(&node);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the node lacks CAP_SYS_PTRACE, without which the kernel keeps another user's descriptors from it (a unit's sockets cannot be read)"),
        "{err}"
    );
    // Nothing bound: the unit reaches what no policy allows, as before.
    assert_eq!(svc.cmd("connect tcp 203.0.113.5 443"), "err ENETUNREACH");
    let s = agentwall_tests::node::status_json(&node.socket);
    assert_eq!(s["identities"][0]["sessions"], serde_json::json!([]), "{s}");
    drop(node);

    let refused = [(
        "AGENTWALL_FAILPOINTS_AT_START",
        Path::new("task-census-refused=return"),
    )];
    let node = NodeProc::start_env(&env, dir, &[], &refused);
    let (code, _, err) = enroll(&node);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "{}: the task census is not loaded (the kernel refused the task census program: refused at the fail point task-census-refused): enroll cannot tell whether a task outside the unit shares its descriptor tables",
            unit.path().display()
        )),
        "{err}"
    );
    assert_eq!(svc.cmd("connect tcp 203.0.113.5 443"), "err ENETUNREACH");
    let s = agentwall_tests::node::status_json(&node.socket);
    assert_eq!(s["identities"][0]["sessions"], serde_json::json!([]), "{s}");
    let gaps = s["kernel_layout"].as_array().expect("kernel_layout");
    assert!(
        gaps.iter().any(|g| g["unknown"]
            == "the kernel refused the task census program: refused at the fail point task-census-refused"
            && g["effect"].as_str().is_some_and(|e| e.starts_with("every enroll is refused"))),
        "{s}"
    );
    drop(node);

    // With both, the unit enrolls.
    let node = NodeProc::start(&env, dir);
    let (code, _, err) = enroll(&node);
    assert_eq!(code, 0, "{err}");
}

/// `enroll` freezes a unit while it reads its sockets and binds it, so it leaves alone what
/// it cannot own: a unit its owner froze (a freeze someone else holds can be lifted under
/// the scan), and a cgroup holding another session below it (it would freeze that
/// session). A node that died while a unit was frozen for it thaws the unit at its next
/// start.
#[test]
fn enroll_freezes_only_what_it_owns_and_a_crash_leaves_nothing_frozen() {
    let (env, tmp, ca) = setup("freeze", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let sock = node.socket.to_str().unwrap().to_owned();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let enroll = |cg: &Path| {
        agentwall_out(&[
            "enroll",
            "--cgroup",
            cg.to_str().unwrap(),
            "--cert",
            c,
            "--key",
            k,
            "--socket",
            &sock,
        ])
    };
    let freeze_of = |cg: &Path| {
        std::fs::read_to_string(cg.join("cgroup.freeze"))
            .unwrap()
            .trim()
            .to_owned()
    };

    let owned = env.cgroup("services/frozen.service");
    let _svc = Probe::spawn(&owned);
    std::fs::write(owned.path().join("cgroup.freeze"), "1").unwrap();
    let (code, _, err) = enroll(owned.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is frozen already (cgroup.freeze is 1"),
        "{err}"
    );
    assert_eq!(freeze_of(owned.path()), "1", "the owner's freeze stays");
    std::fs::write(owned.path().join("cgroup.freeze"), "0").unwrap();

    let parent = env.cgroup("services/parent");
    let child = env.cgroup("services/parent/child.service");
    let _in_child = Probe::spawn(&child);
    let (code, _, err) = enroll(child.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(freeze_of(child.path()), "0", "thawed after the enroll");
    let (code, _, err) = enroll(parent.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("holds the session at {}", child.path().display())),
        "{err}"
    );
    assert_eq!(freeze_of(child.path()), "0");
    assert_eq!(node.stop(), 0);

    // As a node killed between freezing a unit and thawing it leaves things.
    let stuck = env.cgroup("services/stuck.service");
    let mut p = Probe::spawn(&stuck);
    std::fs::write(stuck.path().join("cgroup.freeze"), "1").unwrap();
    std::fs::write(
        dir.join("state/enroll-frozen"),
        stuck.path().as_os_str().as_encoded_bytes(),
    )
    .unwrap();
    let node = NodeProc::start(&env, dir);
    assert_eq!(freeze_of(stuck.path()), "0");
    assert!(!dir.join("state/enroll-frozen").exists());
    assert_eq!(p.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    drop(node);
}

/// A node whose policy allows the test identity io_uring, with a unit holding a process of
/// the test's (not yet enrolled), and a fail point `point` (if any) armed to hold at a gate:
/// what the io_uring switch tests start from. The gate file is the caller's to make and
/// remove.
struct AllowingRing {
    env: TestEnv,
    tmp: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    unit: agentwall::cgroup::Cgroup,
    svc: Probe,
    gate: PathBuf,
    node: NodeProc,
}

fn allowing_ring(name: &str, point: Option<&str>) -> AllowingRing {
    let allowing = POLICY.replacen(
        "identity: spiffe://example.org/agent/support\n",
        "identity: spiffe://example.org/agent/support\nio_uring: allow\n",
        1,
    );
    let (env, tmp, ca) = setup(name, &allowing);
    let dir = tmp.path();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let unit = env.cgroup("services/ring.service");
    let svc = Probe::spawn(&unit);
    let gate = dir.join("gate");
    let spec = point.map(|point| format!("{point}=1*return({})", gate.display()));
    let vars: Vec<(&str, &Path)> = spec
        .iter()
        .map(|spec| ("AGENTWALL_FAILPOINTS", Path::new(spec)))
        .collect();
    let node = NodeProc::start_env(&env, dir, &[], &vars);
    AllowingRing {
        env,
        tmp,
        cert,
        key,
        unit,
        svc,
        gate,
        node,
    }
}

/// A node that dies between writing a change that refuses io_uring to the kernel and reading
/// the sessions that used it reads them at its next start: the change noted them first (the
/// kernel already refuses, so it alone would say nothing was open). The session holding a ring
/// is cut off and its process killed; the note is done with.
#[test]
fn a_node_killed_before_reading_the_sessions_a_refusal_of_io_uring_closes_reads_them_at_start() {
    let AllowingRing {
        env,
        tmp,
        cert,
        key,
        unit,
        mut svc,
        gate,
        node,
    } = allowing_ring("uring-switch-crash", Some("apply-before-ring-reading"));
    let dir = tmp.path();
    agentwall_tests::node::run_ok(&mut agentwall_tests::node::enroll_command(
        &node.socket,
        unit.path(),
        &cert,
        &key,
    ));
    svc.ok_value("keep-ring");
    std::fs::write(&gate, "").unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();
    let applying = {
        let socket = node.socket.clone();
        std::thread::spawn(move || {
            Command::new(bin_path("agentwall"))
                .args(["policy", "apply", "--socket"])
                .arg(&socket)
                .output()
                .unwrap()
        })
    };
    let reached = PathBuf::from(format!("{}.reached", gate.display()));
    eventually("the node at the gate", Duration::from_secs(60), || {
        if reached.exists() {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    });
    let note = dir.join("state/rings-closing.json");
    let noted: Vec<String> = serde_json::from_slice(&std::fs::read(&note).unwrap()).unwrap();
    assert_eq!(noted, [ID], "{}", note.display());
    // Killed with the change in the kernel, the session not read.
    drop(node);
    let _ = applying.join().unwrap();
    std::fs::remove_file(&gate).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", svc.pid)).unwrap();
    assert!(
        !stat.contains(") Z "),
        "the session's process still runs: {stat}"
    );

    let node = NodeProc::start(&env, dir);
    eventually(
        "the session's process to be killed",
        Duration::from_secs(30),
        || match std::fs::read_to_string(format!("/proc/{}/stat", svc.pid)) {
            Ok(stat) if !stat.contains(") Z ") => Err(stat),
            _ => Ok(()),
        },
    );
    let s = status_json(&node.socket);
    let sessions = &s["identities"][0]["sessions"];
    assert_eq!(sessions[0]["revoked"], true, "{s:#}");
    assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{s:#}");
    assert!(!note.exists(), "the note is done with");
}

/// A node upgraded to a new map layout starts on maps that hold nothing of what the kernel let
/// each identity do: a policy that came to refuse io_uring while the node was down is judged
/// against the last policy the node applied (kept in `state_dir`), so the session holding a
/// ring made under the old policy is read, cut off and killed as at any switch.
#[test]
fn an_upgrade_that_comes_with_a_refusal_of_io_uring_reads_the_sessions_it_closes() {
    let AllowingRing {
        env,
        tmp,
        cert,
        key,
        unit,
        mut svc,
        gate: _,
        node,
    } = allowing_ring("uring-switch-upgrade", None);
    let dir = tmp.path();
    agentwall_tests::node::run_ok(&mut agentwall_tests::node::enroll_command(
        &node.socket,
        unit.path(),
        &cert,
        &key,
    ));
    svc.ok_value("keep-ring");
    assert_eq!(node.stop(), 0);
    // The running layout's pins, renamed as an older layout would have left them; the policy
    // changed meanwhile.
    std::fs::rename(
        agentwall::datapath::pin_dir(&env.bpffs_dir),
        env.bpffs_dir.join("v1"),
    )
    .unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();

    let node = NodeProc::start(&env, dir);
    eventually(
        "the session's process to be killed",
        Duration::from_secs(30),
        || match std::fs::read_to_string(format!("/proc/{}/stat", svc.pid)) {
            Ok(stat) if !stat.contains(") Z ") => Err(stat),
            _ => Ok(()),
        },
    );
    let s = status_json(&node.socket);
    let sessions = &s["identities"][0]["sessions"];
    assert_eq!(sessions[0]["revoked"], true, "{s:#}");
    assert!(!dir.join("state/rings-closing.json").exists());
}

/// A policy applied while an enroll scans its unit is the one the unit is bound under: one that
/// comes to refuse io_uring then refuses a unit whose tasks used it, as if it had been in force
/// from the start, and the binding made meanwhile is taken away.
#[test]
fn an_enroll_whose_policy_comes_to_refuse_io_uring_while_it_scans_is_refused() {
    let AllowingRing {
        env: _env,
        tmp,
        cert,
        key,
        unit,
        mut svc,
        gate,
        node,
    } = allowing_ring("enroll-uring-switch", Some("enroll-before-bind"));
    let dir = tmp.path();
    svc.ok_value("keep-ring");
    let before = status_json(&node.socket)["map_fill"]["bindings"].clone();
    std::fs::write(&gate, "").unwrap();
    let running = {
        let (socket, cert, key) = (node.socket.clone(), cert.clone(), key.clone());
        let cg = unit.path().to_owned();
        std::thread::spawn(move || {
            agentwall_tests::node::enroll_command(&socket, &cg, &cert, &key)
                .output()
                .unwrap()
        })
    };
    let reached = PathBuf::from(format!("{}.reached", gate.display()));
    eventually("the node at the gate", Duration::from_secs(60), || {
        if reached.exists() {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    });
    // Judged under `allow`, held before its binding: the policy now refuses io_uring.
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();
    agentwall_tests::node::run_ok(
        Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(&node.socket),
    );
    std::fs::remove_file(&gate).unwrap();
    let out = running.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: the identity's policy came to refuse io_uring while the unit was frozen for the scan, and its tasks used io_uring: enroll again (refused, or restart them without it)",
            unit.path().display()
        )),
        "{err}"
    );
    let s = status_json(&node.socket);
    assert_eq!(s["map_fill"]["bindings"], before, "{s}");
    assert_eq!(s["identities"][0]["sessions"], serde_json::json!([]), "{s}");
    // Enrolled again, it is refused for what it holds.
    let out = agentwall_tests::node::enroll_command(&node.socket, unit.path(), &cert, &key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "task {} (\"aw-probe\") used io_uring, which the identity's policy refuses",
            svc.pid
        )),
        "{err}"
    );
}

/// Root can thaw a unit frozen for `enroll` (a container runtime's unpause, `systemctl
/// thaw`), or move a task into it, after the last reading and before the binding: the unit's
/// tasks would run, or the new one arrive, unread and ungoverned. `enroll` reads the unit
/// again once the binding is in force, and on any difference removes the binding and refuses:
/// nothing is bound, recorded or kept. A fail point holds the node there while the test does
/// what root would, and kills a tracer in the unit (its tracee, let be while its tracer was
/// frozen, runs).
#[test]
fn enroll_refuses_and_unbinds_a_unit_that_stirred_before_its_binding() {
    let (env, tmp, ca) = setup("thawed", POLICY);
    let dir = tmp.path();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let unit = env.cgroup("services/paused.service");
    let mut svc = Probe::spawn(&unit);
    let gate = dir.join("bind-gate");
    let audit = dir.join("audit/audit.jsonl");
    let after = dir.join("after-bind-gate");
    let spec = format!(
        "enroll-before-bind=3*return({});enroll-after-bind=3*off->1*return({})",
        gate.display(),
        after.display()
    );
    let node = NodeProc::start_env(
        &env,
        dir,
        &["--audit-log", audit.to_str().unwrap()],
        &[("AGENTWALL_FAILPOINTS", Path::new(&spec))],
    );
    let enroll = || {
        let (socket, cert, key) = (node.socket.clone(), cert.clone(), key.clone());
        let cg = unit.path().to_owned();
        std::thread::spawn(move || {
            let mut c = agentwall_tests::node::enroll_command(&socket, &cg, &cert, &key);
            let out = c.output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let reached = PathBuf::from(format!("{}.reached", gate.display()));
    // Starts an enroll and waits until the node holds at the gate, the unit frozen and read.
    let held = || {
        std::fs::write(&gate, "").unwrap();
        let _ = std::fs::remove_file(&reached);
        let running = enroll();
        eventually("the node at the gate", Duration::from_secs(60), || {
            if reached.exists() {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        });
        let events = std::fs::read_to_string(unit.path().join("cgroup.events")).unwrap();
        assert!(events.contains("frozen 1"), "{events}");
        running
    };
    let bindings = || {
        status_json(&node.socket)["map_fill"]["bindings"]
            .as_u64()
            .unwrap()
    };
    let before = bindings();
    let unbound = |svc: &mut Probe| {
        assert_eq!(bindings(), before);
        let s = status_json(&node.socket);
        assert_eq!(s["identities"][0]["sessions"], serde_json::json!([]), "{s}");
        assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
        let enrolled = audit_records(&audit)
            .into_iter()
            .filter(|r| r["kind"] == "identity" && r["event"] == "enrolled")
            .count();
        assert_eq!(enrolled, 0);
    };

    // Thawed, as root would: the unit's task runs (here, it makes a socket and connects).
    let running = held();
    std::fs::write(unit.path().join("cgroup.freeze"), "0").unwrap();
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    std::fs::remove_file(&gate).unwrap();
    let thawed = format!(
        "{}: the unit was thawed while it was frozen for the scan (its cgroup.freeze written by root: a container runtime's unpause, systemctl thaw): what its tasks did was not read; enroll again",
        unit.path().display()
    );
    let (code, err) = running.join().unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&thawed), "{err}");
    unbound(&mut svc);

    // A task moved in, as root would: frozen with the unit, and never read.
    let elsewhere = env.cgroup("services/elsewhere");
    let mut mover = Probe::spawn(&elsewhere);
    let running = held();
    unit.add_process(mover.pid).expect("move a task in");
    // Frozen again once the newcomer is (a cgroup with a task not yet frozen reads thawed).
    eventually("the unit frozen again", Duration::from_secs(10), || {
        let events = std::fs::read_to_string(unit.path().join("cgroup.events")).unwrap();
        if events.contains("frozen 1") {
            Ok(())
        } else {
            Err(events)
        }
    });
    std::fs::remove_file(&gate).unwrap();
    let (code, err) = running.join().unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}: task {} is in the unit's cgroups and was not when the unit's descriptors were read (moved in while it was frozen, or made by a task that ran): what it holds was not read; enroll again",
            unit.path().display(),
            mover.pid
        )),
        "{err}"
    );
    unbound(&mut svc);
    assert_eq!(mover.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");

    // A process of the unit under strace in the unit: its tracee stops for the frozen tracer,
    // and the readings let it be. Killed from outside, the tracer lets it go, and it runs
    // before the binding: refused (which of its tasks is named first varies).
    let mut straced = agentwall_tests::Straced::start(&unit);
    let running = held();
    straced.kill_tracer();
    std::fs::remove_file(&gate).unwrap();
    let (code, err) = running.join().unwrap();
    assert_eq!(code, Some(2), "{err}");
    let named = |tid: u32, what: &str| err.contains(&format!("task {tid} {what}"));
    assert!(
        err.contains(&format!("{}: ", unit.path().display()))
            && (named(straced.tracee, "ran while the unit was frozen")
                || named(
                    straced.tracer,
                    "of the unit exited (or was killed) while the unit was frozen"
                )
                || named(straced.tracer, "of the unit left it while it was frozen")
                || err.contains("the unit was thawed while it was frozen")),
        "{err}"
    );
    unbound(&mut svc);
    drop(straced);

    // Thawed while bound: the unit's socket from before the enroll sends a datagram, which
    // the binding refuses, and becomes the binding's (the packet line adopts it). Refused, the
    // binding withdrawn, the socket is the unit's again, not one of an ended session (which
    // the packet line would drop).
    assert_eq!(svc.cmd("hold udp-loop 9700"), "ok");
    assert_eq!(svc.cmd("send-held"), "ok");
    std::fs::write(&after, "").unwrap();
    let after_reached = PathBuf::from(format!("{}.reached", after.display()));
    let running = enroll();
    eventually(
        "the node bound, at the gate",
        Duration::from_secs(60),
        || {
            if after_reached.exists() {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    );
    // (The node holds its session table here: status waits.)
    std::fs::write(unit.path().join("cgroup.freeze"), "0").unwrap();
    // Bound meanwhile: the policy allows it no UDP.
    assert_eq!(svc.cmd("send-held"), "err EPERM");
    std::fs::remove_file(&after).unwrap();
    let (code, err) = running.join().unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&thawed), "{err}");
    unbound(&mut svc);
    assert_eq!(svc.cmd("send-held"), "ok");

    // Neither (the fail point spent): bound, both tasks governed.
    let (code, err) = enroll().join().unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(bindings(), before + 1);
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
    assert_eq!(mover.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
}

#[test]
fn enroll_renew_and_revoke() {
    let (env, tmp, ca) = setup("lifecycle", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit/audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let sock = node.socket.to_str().unwrap().to_owned();
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());

    // enroll: a process already running in an existing cgroup is governed from then on.
    let unit = env.cgroup("services/support.service");
    let mut svc = Probe::spawn(&unit);
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    let unit_path = unit.path().to_str().unwrap();
    let (code, out, err) = agentwall_out(&[
        "enroll", "--cgroup", unit_path, "--cert", c, "--key", k, "--socket", &sock,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("agentwall enroll: {unit_path} bound to {ID}"));
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    // A cgroup the datapath does not see is refused.
    let root = agentwall::cgroup::Cgroup2Mount::discover()
        .unwrap()
        .mount_point;
    let (code, _, err) = agentwall_out(&[
        "enroll",
        "--cgroup",
        root.to_str().unwrap(),
        "--cert",
        c,
        "--key",
        k,
        "--socket",
        &sock,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("is not below the attach cgroup"), "{err}");

    // renew: an agent launched with a certificate about to expire renews it from inside.
    let spec = CertSpec::agent_expiring(ID, 3);
    let not_after = spec.not_after;
    let (sc, sk) = write_cert(dir, "short", &ca.issue(&spec));
    let mut cmd = launch_args(&node.socket, &sc, &sk);
    cmd.args([
        "sh",
        "-c",
        &format!(
            "{aw} renew --cert {c} --key {k} --socket {sock} >&2 && exec {probe} --netns",
            aw = bin_path("agentwall").display(),
            probe = bin_path("aw-probe").display()
        ),
    ]);
    let mut renewed = Probe::from_command(cmd);
    let until = std::time::SystemTime::from(not_after) + Duration::from_millis(50);
    while std::time::SystemTime::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        renewed.cmd("connect tcp 192.0.2.10 443"),
        "err ENETUNREACH",
        "renewal extended the deadline"
    );

    // Renewing with another identity's certificate, or from outside any bound cgroup, fails.
    let (oc, ok) = write_cert(
        dir,
        "auditor",
        &ca.issue(&CertSpec::agent("spiffe://example.org/agent/auditor")),
    );
    let out = launch_args(&node.socket, &cert, &key)
        .args([
            bin_path("agentwall").to_str().unwrap(),
            "renew",
            "--cert",
            oc.to_str().unwrap(),
            "--key",
            ok.to_str().unwrap(),
            "--socket",
            &sock,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "this cgroup belongs to {ID}, not to spiffe://example.org/agent/auditor"
        )),
        "{err}"
    );
    let (code, _, err) = agentwall_out(&["renew", "--cert", c, "--key", k, "--socket", &sock]);
    assert_eq!(code, 2);
    assert!(err.contains("is not bound by this node"), "{err}");

    // An established connection of the identity, to a listener inside its own namespace.
    assert_eq!(svc.cmd("listen tcp 127.0.0.1 9000"), "ok");
    assert_eq!(svc.cmd("hold tcp 127.0.0.1 9000"), "ok");
    assert_eq!(svc.cmd("held"), "alive=1 closed=0");

    // revoke: every cgroup of the identity is denied at once, its established connections are
    // destroyed, and it cannot launch again.
    let (code, out, err) = agentwall_out(&["revoke", ID, "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("agentwall revoke: {ID} is denied everything from now on")
    );
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(renewed.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(svc.cmd("held"), "alive=0 closed=1");
    let out = launch_args(&node.socket, &cert, &key)
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("agentwall launch: rejected: identity {ID} is revoked (identity {ID})")
    );
    // A policy reload does not bring it back. (The revision is read before the edit: the node
    // may pick the edit up on its own before `policy apply` runs.)
    let before = status_json(&node.socket)["revision"].clone();
    std::fs::write(
        dir.join("policy/agents.yaml"),
        format!("{POLICY}\n# touched\n"),
    )
    .unwrap();
    let (code, _, err) = agentwall_out(&["policy", "apply", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(status_json(&node.socket)["revision"], before);
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(node.stop(), 0);

    // Everything above is in the audit log, and the chain verifies, up to the anchor the
    // node keeps apart from it. The log is its owner's alone.
    let anchor = dir.join("state/audit.anchor");
    let anchor = anchor.to_str().unwrap();
    let (code, out, err) = agentwall_out(&["audit", "verify", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("records in 1 file(s), chain intact"), "{out}");
    let (code, out, err) = agentwall_out(&[
        "audit",
        "verify",
        audit.to_str().unwrap(),
        "--anchor",
        anchor,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("chain intact, up to the anchor's seq"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    // Records cut off the end leave an intact chain, and miss the anchor.
    let kept: Vec<&str> = text.lines().collect();
    let cut = kept.len() - 2;
    std::fs::write(&audit, kept[..cut].join("\n") + "\n").unwrap();
    let (code, _, err) = agentwall_out(&["audit", "verify", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = agentwall_out(&[
        "audit",
        "verify",
        audit.to_str().unwrap(),
        "--anchor",
        anchor,
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "agentwall audit verify: records were cut off the end: the anchor {anchor} says seq {} was written, and the chain ends at seq {cut}",
            kept.len()
        )
    );
    std::fs::write(&audit, &text).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<String> = records
        .iter()
        .filter(|r| r["kind"] == "identity" || r["kind"] == "policy")
        .map(|r| {
            format!(
                "{}:{}",
                r["kind"].as_str().unwrap(),
                r["event"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "policy:applied",
        "identity:enrolled",
        "identity:rejected",
        "identity:launched",
        "identity:renewed",
        "identity:revoked",
    ] {
        assert!(
            events.iter().any(|e| e == want),
            "{want} missing from {events:?}"
        );
    }
    let deny = records
        .iter()
        .find(|r| r["kind"] == "decision" && r["verdict"] == "deny" && r["port"] == 80)
        .expect("the port-80 denial is in the audit log");
    assert_eq!(deny["identity"], ID);
    assert_eq!(deny["dest"], "192.0.2.10");

    // Changing one record is caught at that record.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let k = lines.len() / 2;
    lines[k] = lines[k].replacen("\"seq\":", "\"x\":0,\"seq\":", 1);
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let (code, _, err) = agentwall_out(&["audit", "verify", audit.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "agentwall audit verify: {}:{}: record seq",
            audit.display(),
            k + 1
        )),
        "{err}"
    );
    assert!(
        err.ends_with("does not match its hash (it was changed)"),
        "{err}"
    );
}

#[test]
fn a_crl_listing_a_running_certificate_cuts_its_session_off() {
    let (env, tmp, ca) = setup("crl", POLICY);
    let dir = tmp.path();
    let crl = dir.join("ca.crl.pem");
    std::fs::write(&crl, ca.crl(&[])).unwrap();
    let node = NodeProc::start_with(&env, dir, &["--crl", crl.to_str().unwrap()]);

    let a = ca.issue(&CertSpec::agent(ID));
    let (acert, akey) = write_cert(dir, "a", &a);
    let (bcert, bkey) = write_cert(dir, "b", &ca.issue(&CertSpec::agent(ID)));
    let mut pa = launch_probe(&node.socket, &acert, &akey);
    assert_eq!(pa.cmd("listen tcp 127.0.0.1 9000"), "ok");
    assert_eq!(pa.cmd("hold tcp 127.0.0.1 9000"), "ok");
    assert_eq!(pa.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // The CA revokes certificate A; the file is replaced atomically, as CA tooling does.
    let tmp_crl = dir.join("ca.crl.pem.new");
    std::fs::write(&tmp_crl, ca.crl(&[&a.serial])).unwrap();
    std::fs::rename(&tmp_crl, &crl).unwrap();
    wait_status(&node.socket, "the session to be revoked", |s| {
        s["identities"].as_array().unwrap().iter().any(|i| {
            i["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["revoked"] == true)
        })
    });
    assert_eq!(pa.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(pa.cmd("held"), "alive=0 closed=1");
    let out = launch_args(&node.socket, &acert, &akey)
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("agentwall launch: rejected: certificate is revoked (identity {ID})")
    );
    // Another certificate of the same identity is unaffected.
    let mut pb = launch_probe(&node.socket, &bcert, &bkey);
    assert_eq!(pb.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // A CRL past its nextUpdate says nothing of revocations since: no certificate passes
    // it (the same certificate B is refused once the stale CRL is read).
    std::fs::write(
        &tmp_crl,
        ca.crl_numbered(&[&a.serial], u64::MAX >> 1, -time::Duration::hours(1)),
    )
    .unwrap();
    std::fs::rename(&tmp_crl, &crl).unwrap();
    eventually("the stale CRL refusing B", Duration::from_secs(30), || {
        let out = launch_args(&node.socket, &bcert, &bkey)
            .arg("true")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(2) && err.contains("ExpiredRevocationList") {
            Ok(())
        } else {
            Err(format!("{:?} {err}", out.status.code()))
        }
    });

    // The CRL numbers in force outlive the node: an older CRL (one that does not list A)
    // put back while it is down refuses its start, until the one in force is back.
    assert_eq!(node.stop(), 0);
    let kept = std::fs::read_to_string(dir.join("state/crl-numbers.json")).unwrap();
    assert!(kept.contains(&(u64::MAX >> 1).to_string()), "{kept}");
    std::fs::write(&crl, ca.crl_numbered(&[], 1, time::Duration::hours(1))).unwrap();
    let crl_flag = ["--crl", crl.to_str().unwrap()];
    let err = NodeProc::start_refused(&env, dir, &crl_flag);
    assert!(
        err.contains(&format!(
            "is number 1, below {} already in force: an older CRL put back is not taken",
            u64::MAX >> 1
        )),
        "{err}"
    );
    std::fs::write(
        &crl,
        ca.crl_numbered(&[&a.serial], u64::MAX >> 1, time::Duration::hours(1)),
    )
    .unwrap();
    let node = NodeProc::start_with(&env, dir, &crl_flag);
    let out = launch_args(&node.socket, &acert, &akey)
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A unit its manager restarts gets a new cgroup at the same path, which the session's binding
/// (the old cgroup's, by id) does not govern: the node ends the session rather than show the
/// new cgroup governed, a renew from the new cgroup binds nothing (only `enroll` binds a
/// cgroup, once it has read what its processes hold), and the unit enrolled again is its own
/// session whenever the old one is collected.
#[test]
fn a_unit_restarted_in_a_new_cgroup_at_its_path_ends_its_session() {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let (env, tmp, ca) = setup("unit-restart", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit/audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let sock = node.socket.to_str().unwrap().to_owned();
    let (cert, key) = write_cert(dir, "unit", &ca.issue(&CertSpec::agent(ID)));
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let unit = env.cgroup("services/restarted.service");
    let unit_path = unit.path().to_str().unwrap().to_owned();
    let enroll = || {
        let (code, out, err) = agentwall_out(&[
            "enroll", "--cgroup", &unit_path, "--cert", c, "--key", k, "--socket", &sock,
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("agentwall enroll: {unit_path} bound to {ID}"));
    };
    // `agentwall renew` run by a process of the unit's cgroup as it is now.
    let renew_inside = || {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(Path::new(&unit_path).join("cgroup.procs"))
            .unwrap();
        let fd = procs.as_raw_fd();
        let mut cmd = agentwall();
        cmd.args(["renew", "--cert", c, "--key", k, "--socket", &sock]);
        // SAFETY: one write between fork and exec: "0" moves the writer into the cgroup.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    let sessions_at = |s: &serde_json::Value| -> Vec<u64> {
        s["identities"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["sessions"].as_array().unwrap())
            .filter(|x| x["cgroup"] == unit_path.as_str())
            .map(|x| x["cgroup_id"].as_u64().unwrap())
            .collect()
    };
    let svc = Probe::spawn(&unit);
    enroll();
    assert_eq!(sessions_at(&status_json(&node.socket)), [unit.id()]);

    // The manager stops the unit, removes its cgroup and starts it in a new one.
    drop(svc);
    std::fs::remove_dir(unit.path()).unwrap();
    let unit = env.cgroup("services/restarted.service");
    let mut svc = Probe::spawn(&unit);
    // Nothing governs the new cgroup: the connect goes on to the routing (no route out of
    // the test's namespace), where a governed one is refused; a renew from it binds nothing,
    // whether or not the old session was collected yet.
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    let (code, _, err) = renew_inside();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not bound by this node"), "{err}");
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    wait_status(&node.socket, "the old cgroup's session to end", |s| {
        sessions_at(s).is_empty()
    });

    // Enrolled again at once (as `ExecStartPost=agentwall enroll` does), maybe before the
    // old session is collected: its session is the new cgroup's, and renews from it.
    drop(svc);
    std::fs::remove_dir(unit.path()).unwrap();
    let unit = env.cgroup("services/restarted.service");
    let mut svc = Probe::spawn(&unit);
    enroll();
    assert_eq!(svc.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
    wait_status(&node.socket, "one session, the new cgroup's", |s| {
        sessions_at(s) == [unit.id()]
    });
    let (code, out, err) = renew_inside();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        format!("agentwall renew: {unit_path} extended for {ID}")
    );

    // Restarted once more, the new cgroup holding a connection of its own: the identity
    // revoked before the old session is collected cuts that session off, not the
    // connections of the cgroup now at its path.
    drop(svc);
    std::fs::remove_dir(unit.path()).unwrap();
    let unit = env.cgroup("services/restarted.service");
    let mut svc = Probe::spawn(&unit);
    assert_eq!(svc.cmd("listen tcp 127.0.0.1 9000"), "ok");
    assert_eq!(svc.cmd("hold tcp 127.0.0.1 9000"), "ok");
    let (code, _, err) = agentwall_out(&["revoke", ID, "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(svc.cmd("held"), "alive=1 closed=0");
    assert_eq!(node.stop(), 0);
    let mut events: Vec<String> = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "identity" && r["cgroup"] == unit_path.as_str())
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect();
    events.truncate(events.iter().position(|e| e == "renewed").unwrap() + 1);
    let (first, rest) = events.split_first().unwrap();
    assert_eq!(first, "enrolled", "{events:?}");
    let mut middle = rest[..rest.len() - 1].to_vec();
    middle.sort();
    assert_eq!(middle, ["enrolled", "session-ended"], "{events:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("renewed"),
        "{events:?}"
    );
}

#[test]
fn a_node_restarted_on_a_broken_policy_keeps_the_last_good_one() {
    let (env, tmp, ca) = setup("lastgood", POLICY);
    let dir = tmp.path();
    // Started as a systemd service would: readiness also goes to NOTIFY_SOCKET.
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let node = NodeProc::start_env(&env, dir, &[], &[("NOTIFY_SOCKET", &notify_path)]);
    let good = status_json(&node.socket)["revision"].clone();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("READY=1\nSTATUS=policy revision {}", good.as_str().unwrap())
    );
    assert_eq!(node.stop(), 0);
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");

    // Broken while the node was down.
    std::fs::write(
        dir.join("policy/agents.yaml"),
        POLICY.replacen("protocol: tcp", "protocol: icmp", 1),
    )
    .unwrap();
    let node = NodeProc::start(&env, dir);
    let s = status_json(&node.socket);
    assert_eq!(s["revision"], good);
    assert!(
        s["policy_error"]
            .as_str()
            .unwrap()
            .contains("invalid protocol \"icmp\""),
        "{s}"
    );
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
}

/// A policy file is read only whole: while a process that wrote to it holds it open (a slow
/// `cat >`, an editor that writes in place), the node waits and `status` names the file. The
/// start of this file is a valid policy by itself, without the GlobalDeny that follows: read
/// half-way, it would have opened 192.0.2.10 to the agent. It never takes effect.
#[test]
fn a_policy_file_is_read_only_once_its_writer_closes_it() {
    use std::io::Write as _;
    const DENY: &str = "---\nkind: GlobalDeny\nto: [192.0.2.10/32]\n";
    let (env, tmp, ca) = setup("halfwritten", &format!("{POLICY}{DENY}"));
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let (node, metrics) = NodeProc::start_observed(&env, dir, &audit);
    let before = status_json(&node.socket)["revision"].clone();
    let (cert, key) = write_cert(dir, "support", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");

    let head = POLICY.replace("ports: [9000]", "ports: [9001]");
    let mut file = std::fs::File::create(dir.join("policy/agents.yaml")).unwrap();
    file.write_all(head.as_bytes()).unwrap();
    wait_status(
        &node.socket,
        "the node to see the file being written",
        |s| s["policy_files_being_written"] == serde_json::json!(["agents.yaml"]),
    );
    // Held at three ticks: a directory that stays as it is for one tick is read at the next.
    eventually("three reads held back", Duration::from_secs(30), || {
        let held = metric(&scrape(metrics), "agentwall_policy_reads_held_total", &[]);
        if held >= 3.0 {
            Ok(())
        } else {
            Err(held.to_string())
        }
    });
    assert_eq!(status_json(&node.socket)["revision"], before);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");

    file.write_all(DENY.as_bytes()).unwrap();
    drop(file);
    let s = wait_status(&node.socket, "the whole file to be applied", |s| {
        s["revision"] != before && s["policy_files_being_written"] == serde_json::json!([])
    });
    assert!(s["policy_error"].is_null(), "{s}");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    let applied = eventually("the audit record", Duration::from_secs(15), || {
        let applied: Vec<serde_json::Value> = audit_records(&audit)
            .into_iter()
            .filter(|r| r["kind"] == "policy" && r["event"] == "applied")
            .map(|r| r["revision"].clone())
            .collect();
        if applied.last() == Some(&s["revision"]) {
            Ok(applied)
        } else {
            Err(format!("{applied:?}"))
        }
    });
    assert_eq!(
        applied,
        [before, s["revision"].clone()],
        "applied: {applied:?}"
    );
}

#[test]
fn scheduled_rules_allow_only_inside_their_windows() {
    // One window that is open all day, one that opens two hours from now (UTC).
    let now = time::OffsetDateTime::now_utc();
    let (opens, closes) = (
        now + time::Duration::hours(2),
        now + time::Duration::hours(3),
    );
    let closed = format!(
        "daily {:02}:{:02}-{:02}:{:02} UTC",
        opens.hour(),
        opens.minute(),
        closes.hour(),
        closes.minute()
    );
    let policy = format!(
        "kind: AgentPolicy\nname: support\nidentity: {ID}\negress:\n  \
         - to: [192.0.2.0/24]\n    ports: [443]\n    protocol: tcp\n    schedule: \"daily 00:00-24:00 UTC\"\n  \
         - to: [192.0.2.0/24]\n    ports: [8443]\n    protocol: tcp\n    schedule: \"{closed}\"\n"
    );
    let (env, tmp, ca) = setup("schedule", &policy);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(
        probe.cmd("connect tcp 192.0.2.10 8443"),
        "err EPERM",
        "window {closed} is closed"
    );

    // A malformed schedule is an error where it is written.
    std::fs::write(
        dir.join("policy/agents.yaml"),
        format!(
            "kind: AgentPolicy\nname: support\nidentity: {ID}\negress:\n  \
             - to: [192.0.2.0/24]\n    schedule: \"Mon-Fry 09:00-18:00\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin_path("agentwall"))
        .args(["policy", "check"])
        .arg(dir.join("policy"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agents.yaml:6:15: egress[0]: schedule \"Mon-Fry 09:00-18:00\": \"Mon-Fry\" is not a day or day range"),
        "{err}"
    );
}

/// `GET /metrics` over a plain TCP connection to loopback.
#[test]
fn metrics_count_what_happened() {
    let (env, tmp, ca) = setup("metrics", POLICY);
    let dir = tmp.path();
    let addr = loopback_addr();
    let node = NodeProc::start_with(&env, dir, &["--metrics-listen", &addr.to_string()]);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    for port in [80, 81, 82] {
        assert_eq!(
            probe.cmd(&format!("connect tcp 192.0.2.10 {port}")),
            "err EPERM"
        );
    }
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 192.0.2.11 443"), "err ENETUNREACH");
    let mut stranger = Probe::spawn(&env.cgroup("unenrolled"));
    assert_eq!(
        stranger.cmd("connect tcp 203.0.113.5 8080"),
        "err ENETUNREACH"
    );
    wait_flow(&node.socket, "deny", 82);
    wait_flow(&node.socket, "unknown", 8080);

    let s = scrape(addr);
    let deny = [("identity", ID), ("verdict", "deny")];
    assert_eq!(metric(&s, "agentwall_decisions_total", &deny), 3.0);
    let unknown = [("identity", ""), ("verdict", "unknown")];
    assert_eq!(metric(&s, "agentwall_decisions_total", &unknown), 1.0);
    // The kernel counted both allowed connects against rule 1, none against rule 2.
    let hits = |rule: &str| {
        metric(
            &s,
            "agentwall_rule_hits_total",
            &[("identity", ID), ("rule_id", rule)],
        )
    };
    assert_eq!((hits("1"), hits("2")), (2.0, 0.0));
    assert_eq!(metric(&s, "agentwall_sessions", &[]), 1.0);
    assert_eq!(
        metric(&s, "agentwall_identities", &[("state", "active")]),
        2.0
    );
    assert_eq!(metric(&s, "agentwall_policy_applies_total", &[]), 1.0);
    assert_eq!(
        metric(&s, "agentwall_map_capacity", &[("map", "bindings")]),
        65536.0
    );
    assert_eq!(
        metric(&s, "agentwall_map_fill_ratio", &[("map", "bindings")]),
        1.0 / 65536.0
    );
    assert_eq!(metric(&s, "agentwall_events_dropped_total", &[]), 0.0);
    assert!(metric(&s, "agentwall_policy_apply_seconds", &[]) > 0.0);
}

#[test]
fn a_storm_of_identical_denials_yields_bounded_records_with_every_count() {
    let (env, tmp, ca) = setup("storm", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(
        &env,
        dir,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--aggregate-window-secs",
            "1",
        ],
    );
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    let storm = std::time::Instant::now();
    assert_eq!(
        probe.cmd("connect-loop tcp 192.0.2.10 80 2000"),
        "eperm=2000 other=0"
    );
    // How many one-second windows (the kernel's rate window, the node's aggregation window
    // here) the storm spanned: on a loaded machine more than one.
    let windows = storm.elapsed().as_secs() + 1;
    let records = || -> Vec<serde_json::Value> {
        audit_records(&audit)
            .into_iter()
            .filter(|r| r["kind"] == "decision" && r["dest"] == "192.0.2.10" && r["port"] == 80)
            .collect()
    };
    // The first denial is written at once; the rest are folded (by the kernel's rate limit,
    // whose count the node collects once the flow goes quiet) into one more record.
    let deadline = agentwall_tests::deadline(Duration::from_secs(20));
    let got = loop {
        let got = records();
        let total: u64 = got.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        if total >= 2000 {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counts add up to {total} of 2000: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The first record carries one denial; the rest are folded, at most one record per
    // window the storm spanned (and one for the count collected once it went quiet), and
    // the counts add up exactly.
    let counts: Vec<u64> = got.iter().map(|r| r["count"].as_u64().unwrap()).collect();
    assert_eq!(counts[0], 1, "{got:?}");
    assert_eq!(counts.iter().sum::<u64>(), 2000, "{got:?}");
    assert!(
        counts.len() as u64 <= 2 + windows,
        "{} records over {windows} window(s): {got:?}",
        counts.len()
    );
    for folded in got.iter().skip(1).filter(|r| r["first_seen"].is_string()) {
        assert!(folded["first_seen"].as_str().unwrap() <= folded["last_seen"].as_str().unwrap());
    }
    // Enriched: identity, certificate serial, process and its command line.
    let serial = status_json(&node.socket)["identities"][0]["sessions"][0]["serial"].clone();
    assert!(serial.as_str().is_some_and(|s| !s.is_empty()), "{serial}");
    for r in &got {
        assert_eq!(r["identity"], ID);
        assert_eq!(r["serial"], serial);
        assert_eq!(r["pid"], probe.pid);
        assert!(r["cmdline"].as_str().unwrap().contains("aw-probe"), "{r}");
    }

    // Allowed flows are recorded with their rule, which is what `report unused` counts.
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let allow = wait_flow(&node.socket, "allow", 443);
    assert_eq!(allow["rule_id"], 1);
    let deadline = agentwall_tests::deadline(Duration::from_secs(10));
    let report = loop {
        let (code, out, err) = agentwall_out(&[
            "report",
            "unused",
            "--audit-log",
            audit.to_str().unwrap(),
            "--policy",
            dir.join("policy").to_str().unwrap(),
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["hits"].as_u64() > Some(0) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no allowed flow in the audit log"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let unused: Vec<(String, u64)> = report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["identity"].as_str().unwrap().to_owned(),
                r["rule_id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        unused,
        [
            (ID.to_owned(), 2),
            ("spiffe://example.org/agent/auditor".to_owned(), 1)
        ]
    );
}

/// Sessions are state: a CRL published while the node was down, `revoke`, `renew` and
/// session collection all reach sessions launched before a restart, and the binding of a
/// cgroup that went away while the node was down is freed.
#[test]
fn sessions_launched_before_a_restart_are_still_reached() {
    let (env, tmp, ca) = setup("restart-sessions", POLICY);
    let dir = tmp.path();
    let crl = dir.join("ca.crl.pem");
    std::fs::write(&crl, ca.crl(&[])).unwrap();
    let audit = dir.join("audit.jsonl");
    let flags = [
        "--crl",
        crl.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let node = NodeProc::start_with(&env, dir, &flags);
    let sock = node.socket.to_str().unwrap().to_owned();

    // A: kept; B: its certificate is listed while the node is down; C: renews after the
    // restart; D: exits after the restart; a unit enrolled and removed while the node is down.
    let (ac, ak) = write_cert(dir, "a", &ca.issue(&CertSpec::agent(ID)));
    let mut a = launch_probe(&node.socket, &ac, &ak);
    let listed = ca.issue(&CertSpec::agent(ID));
    let (bc, bk) = write_cert(dir, "b", &listed);
    let mut b = launch_probe(&node.socket, &bc, &bk);
    let short = CertSpec::agent_expiring(ID, 6);
    let until = std::time::SystemTime::from(short.not_after) + Duration::from_millis(50);
    let (cc, ck) = write_cert(dir, "c", &ca.issue(&short));
    let mut c = launch_probe(&node.socket, &cc, &ck);
    let (dc, dk) = write_cert(dir, "d", &ca.issue(&CertSpec::agent(ID)));
    let d = launch_probe(&node.socket, &dc, &dk);
    let gone = env.cgroup("services/gone.service");
    let (gc, gk) = write_cert(dir, "g", &ca.issue(&CertSpec::agent(ID)));
    let out = agentwall()
        .args(["enroll", "--cgroup"])
        .arg(gone.path())
        .arg("--cert")
        .arg(&gc)
        .arg("--key")
        .arg(&gk)
        .args(["--socket", &sock])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&mut a, &mut b] {
        assert_eq!(p.cmd("listen tcp 127.0.0.1 9000"), "ok");
        assert_eq!(p.cmd("hold tcp 127.0.0.1 9000"), "ok");
    }
    let bindings = |s: &serde_json::Value| s["map_fill"]["bindings"].as_u64().unwrap();
    let before = bindings(&status_json(&node.socket));
    assert_eq!(node.stop(), 0);

    let next = dir.join("ca.crl.pem.new");
    std::fs::write(&next, ca.crl(&[&listed.serial])).unwrap();
    std::fs::rename(&next, &crl).unwrap();
    std::fs::remove_dir(gone.path()).unwrap();
    let node = NodeProc::start_with(&env, dir, &flags);

    // The CRL reached B at start; A runs on.
    assert_eq!(b.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(b.cmd("held"), "alive=0 closed=1");
    assert_eq!(a.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let s = status_json(&node.socket);
    let sessions: Vec<&serde_json::Value> = s["identities"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["sessions"].as_array().unwrap())
        .collect();
    assert_eq!(sessions.len(), 4, "{s}");
    assert_eq!(
        sessions.iter().filter(|x| x["revoked"] == true).count(),
        1,
        "{s}"
    );
    // The removed unit's binding was freed.
    assert_eq!(bindings(&s), before - 1, "{s}");

    // renew from inside C, a session of the last run.
    let renewed = c.cmd(&format!(
        "spawn {aw} renew --cert {c} --key {k} --socket {sock}",
        aw = bin_path("agentwall").display(),
        c = ac.display(),
        k = ak.display(),
    ));
    assert!(renewed.starts_with("exit 0"), "{renewed}");
    while std::time::SystemTime::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.cmd("connect tcp 192.0.2.10 443"),
        "err ENETUNREACH",
        "the renewal after the restart moved the deadline"
    );

    // D's processes exit: its session ends and its binding goes.
    let d_pid = d.pid;
    drop(d);
    eventually("D's session to end", Duration::from_secs(10), || {
        let s = status_json(&node.socket);
        let left = s["identities"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["sessions"].as_array().unwrap())
            .any(|x| x["pid"] == d_pid);
        if left { Err(s.to_string()) } else { Ok(()) }
    });

    // revoke ends A's established connection: a session of the last run.
    let (code, _, err) = agentwall_out(&["revoke", ID, "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(a.cmd("held"), "alive=0 closed=1");
    assert_eq!(a.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    let events: Vec<String> = audit_records(&audit)
        .iter()
        .filter(|r| r["kind"] == "identity")
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect();
    for want in ["revoked-by-crl", "session-ended", "renewed", "revoked"] {
        assert!(
            events.iter().any(|e| e == want),
            "{want} missing from {events:?}"
        );
    }
}

/// An upgrade to a new map layout: the new maps start empty, so the node binds every session
/// again, ends the sockets made under the old layout (their state lived in its maps), and only
/// then retires the old pins. No session runs ungoverned at any point: not before the new
/// maps are filled (the old programs still judge), not after (its bindings are there).
#[test]
fn an_upgrade_to_a_new_map_layout_leaves_no_session_ungoverned() {
    let (env, tmp, ca) = setup("upgrade", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut p = launch_probe(&node.socket, &cert, &key);
    assert_eq!(p.cmd("listen tcp 127.0.0.1 9000"), "ok");
    assert_eq!(p.cmd("hold tcp 127.0.0.1 9000"), "ok");
    assert_eq!(p.cmd("held"), "alive=1 closed=0");
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(node.stop(), 0);

    // The running layout's pins, renamed as an older layout would have left them: still
    // attached, still enforcing, with the only copy of the binding.
    let old = env.bpffs_dir.join("v1");
    std::fs::rename(agentwall::datapath::pin_dir(&env.bpffs_dir), &old).unwrap();
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");

    // A cgroup the old layout binds and the session table does not (bound, then the node
    // stopped before the table was written).
    let orphan = env.cgroup("orphan");
    let mut q = Probe::spawn(&orphan);
    assert_eq!(q.cmd("connect tcp 203.0.113.5 443"), "err ENETUNREACH");
    {
        let data = aya::maps::MapData::from_pin(old.join("maps/AW_BINDINGS")).unwrap();
        let mut map: aya::maps::HashMap<_, u64, agent_common::Binding> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        let (_, b) = map.iter().next().expect("the session's binding").unwrap();
        map.insert(orphan.id(), b, 0).unwrap();
    }
    assert_eq!(q.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    // The new layout cannot bind it (no certificate): the old one stays attached and governs
    // it.
    let node = NodeProc::start(&env, dir);
    assert!(
        old.exists(),
        "an earlier layout governing a cgroup was retired"
    );
    assert_eq!(q.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(node.stop(), 0);
    // Once that cgroup is gone, the next start finishes the upgrade.
    drop(q);
    orphan.remove_tree().unwrap();

    let node = NodeProc::start(&env, dir);
    assert!(!old.exists(), "the old layout's pins are gone");
    // Bound again (unbound, the default unknown_flows would report and allow this), with
    // its rules.
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    // The connection made before the upgrade was ended; a new one is judged and made.
    assert_eq!(p.cmd("held"), "alive=0 closed=1");
    assert_eq!(p.cmd("listen tcp 127.0.0.1 9001"), "ok");
    let s = status_json(&node.socket);
    let sessions: usize = s["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sessions"].as_array().unwrap().len())
        .sum();
    assert_eq!(sessions, 1, "{s}");
    assert_eq!(s["map_fill"]["bindings"], 1, "{s}");
}

/// Ids of the programs attached to `cgroup` once none of `old` is any more: a link whose last
/// pin went away is released from a kernel workqueue a moment later, which nothing signals.
fn attached_without(cgroup: &Path, old: &[u32]) -> Vec<u32> {
    let mut now = agentwall::datapath::attached_programs(cgroup).unwrap();
    for _ in 0..6000 {
        if !now.iter().any(|id| old.contains(id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        now = agentwall::datapath::attached_programs(cgroup).unwrap();
    }
    now
}

/// An upgrade in place while agents connect without pause: the node is stopped and started
/// again over pins that another build attached (the same map layout, other programs: each
/// link takes the new program in one step), then over pins an older map layout left (new
/// maps filled, then the old pins retired). Not one of the agents' connects is judged
/// wrongly across either switch or while the node is down, and afterwards only the new
/// programs are attached.
#[test]
fn an_upgrade_in_place_under_a_connect_loop_judges_every_connect_rightly() {
    let (env, tmp, ca) = setup("upgrade-loop", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut denied = launch_probe(&node.socket, &cert, &key);
    let mut allowed = launch_probe(&node.socket, &cert, &key);
    assert_eq!(denied.cmd("loop-start tcp 203.0.113.5 443"), "ok");
    assert_eq!(allowed.cmd("loop-start tcp 192.0.2.10 443"), "ok");
    let first = agentwall::datapath::attached_programs(env.root.path()).unwrap();
    assert!(!first.is_empty());
    assert_eq!(node.stop(), 0);

    // Another build's programs over the same maps.
    agentwall_tests::set_pinned_revision(&env.bpffs_dir, 0x0bad_c0de);
    let node = NodeProc::start(&env, dir);
    let swapped = attached_without(env.root.path(), &first);
    assert!(
        !swapped.is_empty() && !swapped.iter().any(|id| first.contains(id)),
        "the other build's programs still attached: {first:?} -> {swapped:?}"
    );
    assert_eq!(node.stop(), 0);

    // An older map layout's pins: the running ones, moved where an older layout keeps them.
    let old = env.bpffs_dir.join("v1");
    std::fs::rename(agentwall::datapath::pin_dir(&env.bpffs_dir), &old).unwrap();
    let node = NodeProc::start(&env, dir);
    assert!(!old.exists(), "the old layout's pins are gone");
    let last = attached_without(env.root.path(), &swapped);
    assert!(
        !last.is_empty() && !last.iter().any(|id| swapped.contains(id)),
        "the old layout's programs still attached: {swapped:?} -> {last:?}"
    );
    // Connects made under the new layout count too.
    assert_eq!(denied.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(allowed.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    let d = denied.cmd("loop-stop");
    let a = allowed.cmd("loop-stop");
    let only = |said: &str, errno: &str| {
        let (name, n) = said.split_once('=').unwrap_or(("", ""));
        !said.contains(' ') && name == errno && n.parse::<u64>().is_ok_and(|n| n > 0)
    };
    assert!(only(&d, "EPERM"), "denied destination: {d}");
    assert!(only(&a, "ENETUNREACH"), "allowed destination: {a}");
    let s = status_json(&node.socket);
    assert_eq!(s["map_fill"]["bindings"], 2, "{s}");
}

/// What would make the node judge by numbers it no longer understands, or lose its pins when
/// it stops, refuses the start, and `node --check-config` says so; a broken policy directory
/// is not one of them (the node starts on its last good revision, and the check says that).
#[test]
fn the_node_refuses_lost_identity_numbers_and_a_bpffs_that_would_go_with_it() {
    let (env, tmp, ca) = setup("state-lost", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut p = launch_probe(&node.socket, &cert, &key);
    assert_eq!(node.stop(), 0);

    // A typo in the policy directory: the check warns, and the start it would make runs.
    std::fs::write(dir.join("policy/typo.yaml"), "kind: AgentPolicy\nname: [\n").unwrap();
    let out = NodeProc::check_config(&env, dir, &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("warning policy:")
            && said.contains("typo.yaml:2:")
            && said.contains("the node starts on the last good revision")
            && said.contains("ok      bpffs: ")
            && said.contains("the node can start as configured"),
        "{said}"
    );
    std::fs::remove_file(dir.join("policy/typo.yaml")).unwrap();

    // The identity numbers lost while the bindings stayed pinned: refused, the old programs
    // judging on as they were.
    let kept = dir.join("state/identities.json");
    let saved = std::fs::read(&kept).unwrap();
    std::fs::remove_file(&kept).unwrap();
    let err = NodeProc::start_refused(&env, dir, &[]);
    assert!(
        err.contains("identities.json: missing, while the maps pinned under")
            && err.contains("bind 1 cgroup(s) to identity numbers")
            && err.contains("agentwall down --bpffs-dir"),
        "{err}"
    );
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    // A table that does not match them (`{}`-like, an old backup): refused too.
    std::fs::write(&kept, r#"{"numbers": {}}"#).unwrap();
    let err = NodeProc::start_refused(&env, dir, &[]);
    assert!(
        err.contains(
            "the pinned bindings or the session table use identity numbers it does not list"
        ),
        "{err}"
    );
    std::fs::remove_file(&kept).unwrap();
    // The pins gone too, the session table still names numbers: refused as well.
    let down = agentwall()
        .args(["down", "--bpffs-dir"])
        .arg(&env.bpffs_dir)
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    let err = NodeProc::start_refused(&env, dir, &[]);
    assert!(
        err.contains("sessions.json lists 1 session(s) by identity number"),
        "{err}"
    );
    // Put back, the node starts and governs the session again.
    std::fs::write(&kept, saved).unwrap();
    let node = NodeProc::start(&env, dir);
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(node.stop(), 0);

    // No bpffs at /sys/fs/bpf, in a mount namespace of the node's own (a sandboxed unit): a
    // bpffs it mounted would go, with every pin, when it stops. Refused, and said by the check.
    let own_ns = |args: &str| {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-ec"])
            .arg(format!("umount -l /sys/fs/bpf; exec \"$@\" {args}"))
            .arg("sh")
            .arg(bin_path("agentwall"))
            .args(["node", "--trust-bundle"])
            .arg(dir.join("ca.pem"))
            .arg("--policy-dir")
            .arg(dir.join("policy"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("aw.sock"))
            .arg("--bpffs-dir")
            .arg(&env.bpffs_dir)
            .arg("--attach-cgroup")
            .arg(env.root.path())
            .args(["--catalog-refresh-secs", "0"])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = own_ns("--check-config");
    assert!(
        !ok && said.contains("ERROR   bpffs: no bpf filesystem is mounted at /sys/fs/bpf"),
        "{said}"
    );
    let (ok, said) = own_ns("");
    assert!(
        !ok && said.contains("no bpf filesystem is mounted at /sys/fs/bpf, and "),
        "{said}"
    );
    // Inside a cgroup namespace, whose cgroup2 mount shows a cgroup below the root as its
    // top: every level the node would read is short (nested units' bindings and the attach
    // point would be looked up where the kernel never looks). Refused, and said by the check.
    let ns_cgroup = env.cgroup("cgroup-ns");
    let mount = agentwall::cgroup::Cgroup2Mount::discover()
        .unwrap()
        .mount_point;
    let out = Command::new("sh")
        .arg("-ec")
        .arg(
            r#"echo $$ > "$1/cgroup.procs"; mount=$2; shift 2
exec unshare --cgroup --mount --propagation private sh -ec 'umount -l "$0"; mount -t cgroup2 none "$0"; exec "$@"' "$mount" "$@""#,
        )
        .arg("sh")
        .arg(ns_cgroup.path())
        .arg(&mount)
        .arg(bin_path("agentwall"))
        .args(["node", "--trust-bundle"])
        .arg(dir.join("ca.pem"))
        .arg("--policy-dir")
        .arg(dir.join("policy"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("aw.sock"))
        .arg("--bpffs-dir")
        .arg(&env.bpffs_dir)
        .args(["--catalog-refresh-secs", "0", "--check-config"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            && said.contains(&format!(
                "ERROR   attach cgroup: the attach cgroup {m} is in a cgroup tree whose top, {m}, is not the host's root cgroup",
                m = mount.display()
            )),
        "{said}"
    );
    // The host's pins were never touched: the session is judged as before.
    assert_eq!(p.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
}

#[test]
fn the_self_check_finds_a_line_that_lets_through_what_it_must_refuse() {
    let (env, tmp, ca) = setup("selfcheck", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let (node, addr) = NodeProc::start_observed(&env, dir, &audit);
    let lsm = agentwall_tests::node::lsm_line(&node.socket).is_none();
    let refused = [
        "connect4", "connect6", "sendmsg4", "sendmsg6", "sockopt", "raw",
    ];
    let lsm_verdict = if lsm { "refused" } else { "not_checked" };
    // The check ran before the node said it was ready, and runs again on request: every line
    // in force refused, every link runs.
    for check in [
        status_json(&node.socket)["self_check"].clone(),
        check_now(&node.socket),
    ] {
        assert_eq!(check["ok"], true, "{check}");
        assert_eq!(check["detached"], serde_json::json!([]), "{check}");
        for line in refused {
            assert_eq!(check[line]["verdict"], "refused", "{line}: {check}");
        }
        assert_eq!(check["families"]["verdict"], lsm_verdict, "{check}");
        assert_eq!(check["receipt"]["verdict"], lsm_verdict, "{check}");
        assert_eq!(check["ring"]["verdict"], lsm_verdict, "{check}");
    }
    let s = scrape(addr);
    assert_eq!(metric(&s, "agentwall_selfcheck_ok", &[]), 1.0);
    assert_eq!(metric(&s, "agentwall_selfcheck_failures_total", &[]), 0.0);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    // The canary's refusals are the node's own: neither its records nor the counts the
    // kernel folded for it (collected once a flow goes quiet) are an agent's. An agent's own
    // folded count, collected after the checks, is the sign the node has swept since.
    assert_eq!(
        probe.cmd("connect-loop tcp 192.0.2.10 81 50"),
        "eperm=50 other=0"
    );
    eventually(
        "the agent's folded denials",
        Duration::from_secs(20),
        || {
            let total: u64 = audit_records(&audit)
                .iter()
                .filter(|r| r["kind"] == "decision" && r["port"] == 81)
                .map(|r| r["count"].as_u64().unwrap_or(0))
                .sum();
            if total == 50 {
                Ok(())
            } else {
                Err(format!("{total} of 50"))
            }
        },
    );
    let canary: Vec<serde_json::Value> = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "decision" && (r["port"] == 9 || r["dest"] == "192.0.2.1"))
        .collect();
    assert!(
        canary.is_empty(),
        "the self-check's refusals were reported: {canary:?}"
    );
    assert!(
        agentwall_tests::node::flows(&node.socket, "deny")
            .iter()
            .all(|r| r["port"] != 9),
        "the self-check's refusals were reported as an agent's"
    );

    // The connect4 line stops running, its pin left in place.
    let pin = agentwall::datapath::pin_dir(&env.bpffs_dir)
        .join("links")
        .join(agent_common::PROG_CONNECT4);
    agentwall_tests::detach_pinned_link(&pin);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err ENETUNREACH");
    let check = check_now(&node.socket);
    assert_eq!(check["ok"], false, "{check}");
    assert_eq!(
        check["detached"],
        serde_json::json!(["aw_connect4"]),
        "{check}"
    );
    assert_eq!(check["connect4"]["verdict"], "not_refused", "{check}");
    assert!(
        check["connect4"]["detail"]
            .as_str()
            .unwrap()
            .contains("os error 101"),
        "the canary's connect went on to the routing (ENETUNREACH): {check}"
    );
    for line in &refused[1..] {
        assert_eq!(check[line]["verdict"], "refused", "{line}: {check}");
    }
    // New sessions are refused while it fails, saying why.
    let out = launch_args(&node.socket, &cert, &key)
        .arg("/bin/true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "launched on a failing line: {err}");
    assert!(
        err.contains("enforcement self-check") && err.contains("link aw_connect4 detached"),
        "{err}"
    );
    let text = String::from_utf8(agentwall_tests::node::run_ok(
        agentwall().args(["status", "--socket"]).arg(&node.socket),
    ))
    .unwrap();
    assert!(text.contains("self-check: FAILED at "), "{text}");
    let s = scrape(addr);
    assert_eq!(metric(&s, "agentwall_selfcheck_ok", &[]), 0.0);
    assert_eq!(metric(&s, "agentwall_selfcheck_failures_total", &[]), 1.0);
    drop(probe);
    node.stop();

    // A restart attaches the link again; the check passes and sessions start.
    let node = NodeProc::start(&env, dir);
    let check = status_json(&node.socket)["self_check"].clone();
    assert_eq!(check["ok"], true, "{check}");
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 80"), "err EPERM");
    node.stop();
}

/// Runs the self-check now; its result.
fn check_now(socket: &Path) -> serde_json::Value {
    agentwall_tests::node::run_json(
        agentwall()
            .args(["status", "--check", "--output", "json", "--socket"])
            .arg(socket),
    )["self_check"]
        .clone()
}
