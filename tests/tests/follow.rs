//! Sessions that renew themselves from their certificate and key files (`launch --follow`),
//! against the real node and kernel: a rotator rewrites the files, the node moves the
//! kernel's deadline, and a pair that fails its checks changes nothing.

use std::{path::Path, time::Duration};

use agentwall_tests::{
    node::{
        NodeProc, SUPPORT_ID as ID, SUPPORT_POLICY, audit_records, eventually, fresh, launch_probe,
        serial_of, setup, status_json, wait_serial, wait_status, write_cert,
    },
    pki::{Ca, CertSpec, Issued},
};

/// The session's certificate serial and deadline, as `status` shows them.
fn session(socket: &Path) -> (String, String) {
    let s = &status_json(socket)["identities"][0]["sessions"][0];
    (
        s["serial"].as_str().unwrap_or_default().to_owned(),
        s["not_after"].as_str().unwrap_or_default().to_owned(),
    )
}

/// What a rotator that is not careful does: the certificate first, then the key, each
/// rewritten in place.
fn rotate(cert: &Path, key: &Path, c: &Issued) {
    std::fs::write(cert, &c.cert_pem).unwrap();
    std::fs::write(key, &c.key_pem).unwrap();
}

/// `launch --follow` of aw-probe in a network namespace of its own.
fn launch_following(socket: &Path, cert: &Path, key: &Path) -> agentwall_tests::Probe {
    let mut cmd = std::process::Command::new(agentwall_tests::bin_path("agentwall"));
    cmd.args(["launch", "--follow", "--cert"])
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--socket")
        .arg(socket)
        .arg("--")
        .arg(agentwall_tests::bin_path("aw-probe"))
        .arg("--netns");
    agentwall_tests::Probe::from_command(cmd)
}

/// The reasons of the refusals on record, oldest first.
fn refusals(audit: &Path) -> Vec<String> {
    audit_records(audit)
        .into_iter()
        .filter(|r| r["kind"] == "identity" && r["event"] == "rejected")
        .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A session launched with short-lived certificates, rewritten three times by a rotator
/// (once across a node restart), connects the whole time without one refusal; once the
/// rotator stops, the kernel cuts it at the last certificate's deadline, with the node
/// stopped.
#[test]
fn a_followed_session_lives_on_rotated_certificates_and_ends_when_they_stop() {
    let (env, tmp, ca) = setup("follow", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let metrics = agentwall_tests::node::loopback_addr();
    let metrics_s = metrics.to_string();
    let args = [
        "--audit-log",
        audit.to_str().unwrap(),
        "--metrics-listen",
        &metrics_s,
    ];
    let node = NodeProc::start_with(&env, dir, &args);
    let life = 12;
    let first = ca.issue(&fresh(ID, life));
    let (cert, key) = write_cert(dir, "agent", &first);
    // Short-lived: followed without being asked.
    let mut probe = launch_probe(&node.socket, &cert, &key);
    let st = status_json(&node.socket);
    let s = &st["identities"][0]["sessions"][0];
    assert_eq!(s["follow"]["cert"], cert.to_str().unwrap());
    assert_eq!(s["follow"]["key"], key.to_str().unwrap());
    assert_eq!(s["follow"]["uid"], 0);
    assert_eq!(probe.cmd("loop-start tcp 192.0.2.10 443"), "ok");

    let mut node = node;
    let mut last = first;
    for round in 0..3 {
        if round == 1 {
            // Following outlives the node: the session table keeps the files.
            assert_eq!(node.stop(), 0);
            node = NodeProc::start_with(&env, dir, &args);
        }
        // Each later than the last (X.509 times have whole seconds).
        let next = ca.issue(&fresh(ID, life + 2 * (round + 1)));
        rotate(&cert, &key, &next);
        wait_serial(
            &node.socket,
            &format!("rotation {round} taken"),
            &serial_of(&next),
        );
        last = next;
    }
    let counts = probe.cmd("loop-stop");
    assert!(
        counts.starts_with("ENETUNREACH=") && !counts.contains(' '),
        "every connect passed the kernel while the files were rotated: {counts}"
    );
    let (_, not_after) = session(&node.socket);
    let renewed = audit_records(&audit)
        .iter()
        .filter(|r| r["kind"] == "identity" && r["event"] == "renewed")
        .count();
    assert_eq!(renewed, 3, "one renewal record a rotation");
    // Time left is a gauge, per identity.
    let left = agentwall_tests::node::metric(
        &agentwall_tests::node::scrape(metrics),
        "agentwall_session_expiry_seconds",
        &[("identity", ID)],
    );
    assert!(left > 0.0 && left <= 60.0, "{left}");

    // The rotator stops: past 90% of the last certificate's life, the node warns.
    let warned = eventually("the expiry warning", Duration::from_secs(60), || {
        audit_records(&audit)
            .into_iter()
            .find(|r| r["kind"] == "identity" && r["event"] == "expires-soon")
            .ok_or_else(|| "not yet".to_owned())
    });
    assert_eq!(warned["identity"], ID);
    assert_eq!(
        warned["serial"].as_str().unwrap().to_lowercase(),
        serial_of(&last)
    );
    assert_eq!(warned["not_after"], not_after.as_str());
    assert_eq!(
        warned["renewed"],
        format!("from {} (followed)", cert.display())
    );

    // And the node stops: the kernel ends the session on its own, within a second of the
    // deadline (the kernel keeps it on the boot clock, taken from the wall clock at binding:
    // a clock the host corrects meanwhile moves them apart by a little).
    assert_eq!(node.stop(), 0);
    let deadline: std::time::SystemTime =
        agentwall::clock::parse_rfc3339(&not_after).unwrap().into();
    while std::time::SystemTime::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = loop {
        let now = probe.cmd("connect tcp 192.0.2.10 443");
        if now == "err EPERM" || std::time::SystemTime::now() > deadline + Duration::from_secs(1) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(cut, "err EPERM", "not cut within a second of {not_after}");
}

/// A rotated pair for another identity, from another CA, or with a key that is not the
/// certificate's, is refused with a record naming the files and why, and the session keeps
/// its certificate and deadline; a good pair afterwards is taken.
#[test]
fn a_rotated_pair_that_fails_its_checks_changes_nothing() {
    let (env, tmp, ca) = setup("follow-refused", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let first = ca.issue(&CertSpec::agent(ID));
    let (cert, key) = write_cert(dir, "agent", &first);
    // An hour's certificate is followed when asked.
    let mut probe = launch_following(&node.socket, &cert, &key);
    let before = session(&node.socket);
    assert_eq!(before.0.to_lowercase(), serial_of(&first));

    let other_ca = Ca::new("another CA");
    let mismatched = {
        let a = ca.issue(&CertSpec::agent(ID));
        let b = ca.issue(&CertSpec::agent(ID));
        Issued {
            cert_pem: a.cert_pem,
            key_pem: b.key_pem,
            serial: a.serial,
        }
    };
    let cases = [
        (
            ca.issue(&CertSpec::agent("spiffe://example.org/agent/other")),
            "the certificate is for spiffe://example.org/agent/other, not the session's spiffe://example.org/agent/support",
        ),
        (
            other_ca.issue(&CertSpec::agent(ID)),
            "not signed by a trusted CA",
        ),
        (mismatched, "the key is not the certificate's"),
    ];
    for (i, (pair, why)) in cases.iter().enumerate() {
        rotate(&cert, &key, pair);
        let said = eventually(
            &format!("refusal {i} recorded"),
            Duration::from_secs(30),
            || {
                let r = refusals(&audit);
                if r.len() > i {
                    Ok(r[i].clone())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        assert!(
            said.starts_with(&format!(
                "rotated files {} and {} refused: ",
                cert.display(),
                key.display()
            )) && said.contains(why)
                && said.contains(&format!("the session runs on until {}", before.1)),
            "{said}"
        );
        assert_eq!(session(&node.socket), before, "the session is as it was");
        assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    }
    // A good certificate that ends before the session's does not take its deadline back
    // (the session may have been renewed by hand since it was launched): nothing happens.
    let older = ca.issue(&CertSpec::agent_expiring(ID, 600));
    rotate(&cert, &key, &older);
    // Nothing to wait for but the looks the node takes (one a second).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(session(&node.socket), before);

    let good = ca.issue(&CertSpec::agent_expiring(ID, 7200));
    rotate(&cert, &key, &good);
    wait_serial(&node.socket, "the good pair taken", &serial_of(&good));
    assert_ne!(session(&node.socket).1, before.1);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    // Refused once for each state of the files, not once a look; renewed once.
    assert_eq!(refusals(&audit).len(), cases.len());
    let renewals = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "identity" && r["event"] == "renewed")
        .count();
    assert_eq!(renewals, 1);
}

/// The files are read with the launcher's own permissions, never the node's: an agent that
/// points its followed certificate at a file only root may read (here a good, newer pair)
/// gets a refusal, and so does one that puts a FIFO there to hold the node's reader. The
/// follower goes on serving, and takes a good pair the launcher can read.
#[test]
fn followed_files_are_read_with_the_launchers_permissions() {
    use std::os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _};
    let (env, tmp, ca) = setup("follow-perms", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(
        &env,
        dir,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--socket-group",
            "nogroup",
        ],
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The launcher's own files, in a directory only it can write.
    let own = dir.join("nobody");
    std::fs::create_dir(&own).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    chown(&own);
    let first = ca.issue(&CertSpec::agent(ID));
    let (cert, key) = write_cert(&own, "agent", &first);
    chown(&cert);
    chown(&key);
    // A good, newer pair only root may read.
    let secret = dir.join("root-only");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let newer = ca.issue(&CertSpec::agent(ID));
    let (root_cert, root_key) = write_cert(&secret, "agent", &newer);

    let mut cmd = std::process::Command::new(agentwall_tests::bin_for_anyone("agentwall"));
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    cmd.args(["launch", "--follow", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--socket")
        .arg(&node.socket)
        .arg("--")
        .arg(agentwall_tests::bin_for_anyone("aw-probe"));
    let _agent = agentwall_tests::Probe::from_command(cmd);
    let s = &status_json(&node.socket)["identities"][0]["sessions"][0];
    assert_eq!(s["follow"]["uid"], 65534);
    assert_eq!(s["follow"]["gid"], 65534);
    let before = session(&node.socket);

    let refused = |n: usize, what: &str| {
        eventually(what, Duration::from_secs(30), || {
            let r = refusals(&audit);
            r.get(n).cloned().ok_or_else(|| format!("{r:?}"))
        })
    };
    // What the agent can do in its own directory: point the files elsewhere.
    for (f, to) in [(&cert, &root_cert), (&key, &root_key)] {
        std::fs::remove_file(f).unwrap();
        std::os::unix::fs::symlink(to, f).unwrap();
    }
    let said = refused(0, "the root-only pair refused");
    assert!(said.contains("Permission denied"), "{said}");
    assert_eq!(session(&node.socket), before, "nothing read as root");

    // Nor a file of the kernel's, which the node might see more of than the launcher.
    std::fs::remove_file(&cert).unwrap();
    std::os::unix::fs::symlink("/proc/self/maps", &cert).unwrap();
    let said = refused(1, "the /proc file refused");
    assert!(said.contains("not a file on a disk filesystem"), "{said}");
    assert_eq!(session(&node.socket), before);

    // A FIFO holds no reader.
    std::fs::remove_file(&cert).unwrap();
    let path = std::ffi::CString::new(cert.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    chown(&cert);
    let said = refused(2, "the FIFO refused");
    assert!(said.contains("not a regular file"), "{said}");
    assert_eq!(session(&node.socket), before);

    // A good pair the launcher can read is taken.
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    let good = ca.issue(&CertSpec::agent_expiring(ID, 7200));
    let (c, k) = write_cert(&own, "agent", &good);
    chown(&c);
    chown(&k);
    wait_serial(&node.socket, "the readable pair taken", &serial_of(&good));
}

/// A session a CRL cut off stays cut off: neither its rotator's next certificate nor a
/// renewal by hand brings it back.
#[test]
fn a_session_a_crl_cut_off_is_not_brought_back_by_its_files() {
    let (env, tmp, ca) = setup("follow-crl", SUPPORT_POLICY);
    let dir = tmp.path();
    let crl = dir.join("ca.crl.pem");
    std::fs::write(&crl, ca.crl(&[])).unwrap();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(
        &env,
        dir,
        &[
            "--crl",
            crl.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    );
    let first = ca.issue(&CertSpec::agent(ID));
    let (cert, key) = write_cert(dir, "agent", &first);
    let mut probe = launch_following(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let next = dir.join("ca.crl.pem.new");
    std::fs::write(&next, ca.crl(&[&first.serial])).unwrap();
    std::fs::rename(&next, &crl).unwrap();
    wait_status(&node.socket, "the session cut off", |s| {
        s["identities"][0]["sessions"][0]["revoked"] == true
    });
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");

    // The rotator writes the next certificate: the session stays cut off.
    let newer = ca.issue(&CertSpec::agent_expiring(ID, 7200));
    rotate(&cert, &key, &newer);
    // Nothing to wait for but the looks the node takes (one a second).
    std::thread::sleep(Duration::from_millis(2500));
    let s = &status_json(&node.socket)["identities"][0]["sessions"][0];
    assert_eq!(s["revoked"], true, "{s}");
    assert_eq!(
        s["serial"].as_str().unwrap().to_lowercase(),
        serial_of(&first)
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    // Nor by hand, from inside.
    let answer = probe.cmd(&format!(
        "spawn {aw} renew --cert {c} --key {k} --socket {sock}",
        aw = agentwall_tests::bin_path("agentwall").display(),
        c = cert.display(),
        k = key.display(),
        sock = node.socket.display(),
    ));
    assert!(
        answer.starts_with("exit 2")
            && answer.contains("this session was cut off by a CRL listing its certificate"),
        "{answer}"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert!(
        !audit_records(&audit)
            .iter()
            .any(|r| r["kind"] == "identity" && r["event"] == "renewed")
    );
}

/// A root launcher running its agent as another user (`--user`) has the files read as that
/// user, who may write where they are; /proc's magic links do not lead past directories
/// that user cannot enter; and a path with control characters is refused at launch.
#[test]
fn files_are_read_as_the_agents_user_and_never_through_proc() {
    use std::os::unix::fs::PermissionsExt as _;
    let (env, tmp, ca) = setup("follow-user", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let own = dir.join("nobody");
    std::fs::create_dir(&own).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    chown(&own);
    let first = ca.issue(&CertSpec::agent(ID));
    let (cert, key) = write_cert(&own, "agent", &first);
    chown(&cert);
    chown(&key);
    // A newer pair in a directory only root may enter, and a root process working there.
    let secret = dir.join("root-only");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let newer = ca.issue(&CertSpec::agent_expiring(ID, 7200));
    write_cert(&secret, "agent", &newer);
    let mut inside = std::process::Command::new("sleep")
        .arg("600")
        .current_dir(&secret)
        .spawn()
        .unwrap();

    // The agent sends nothing: no namespace of its own (nobody may not make one).
    let cmd = agentwall_tests::node::launch_as_nobody(&node.socket, &cert, &key);
    // `launch_as_nobody` puts `--user nobody` before `--`: follow is asked for there.
    let args: Vec<std::ffi::OsString> = cmd.get_args().map(Into::into).collect();
    let mut cmd = std::process::Command::new(cmd.get_program());
    cmd.arg("launch").arg("--follow").args(&args[1..]);
    let _agent = agentwall_tests::Probe::from_command(cmd);
    let s = &status_json(&node.socket)["identities"][0]["sessions"][0];
    assert_eq!(s["follow"]["uid"], 65534, "{s}");
    let before = session(&node.socket);

    for f in [&cert, &key] {
        std::fs::remove_file(f).unwrap();
    }
    std::os::unix::fs::symlink(format!("/proc/{}/cwd/agent.pem", inside.id()), &cert).unwrap();
    std::os::unix::fs::symlink(format!("/proc/{}/cwd/agent.key", inside.id()), &key).unwrap();
    let said = eventually("the /proc path refused", Duration::from_secs(30), || {
        refusals(&audit)
            .into_iter()
            .next()
            .ok_or_else(|| "not yet".to_owned())
    });
    assert!(said.contains("Too many levels of symbolic links"), "{said}");
    assert_eq!(session(&node.socket), before, "nothing read through /proc");
    let _ = inside.kill();
    let _ = inside.wait();

    // A path with a control character is refused at launch.
    let odd = dir.join("odd\nname.pem");
    std::fs::copy(dir.join("root-only/agent.pem"), &odd).unwrap();
    let out = std::process::Command::new(agentwall_tests::bin_path("agentwall"))
        .args(["launch", "--follow", "--cert"])
        .arg(&odd)
        .arg("--key")
        .arg(dir.join("root-only/agent.key"))
        .arg("--socket")
        .arg(&node.socket)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not an absolute path of at most 4096 bytes without control characters"),
        "{err}"
    );
}

/// `enroll` follows its files as `launch` does: a unit enrolled with a short-lived
/// certificate (followed by default) is renewed when a rotator rewrites them, and its
/// processes connect on past the first certificate's end.
#[test]
fn an_enrolled_unit_is_renewed_from_its_rotated_files() {
    let (env, tmp, ca) = setup("follow-enroll", SUPPORT_POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let unit = env.cgroup("services/support.service");
    let mut svc = agentwall_tests::Probe::spawn(&unit);
    let life = 12;
    let first = ca.issue(&fresh(ID, life));
    let (cert, key) = write_cert(dir, "unit", &first);
    let out = std::process::Command::new(agentwall_tests::bin_path("agentwall"))
        .args(["enroll", "--cgroup"])
        .arg(unit.path())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--socket")
        .arg(&node.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = &status_json(&node.socket)["identities"][0]["sessions"][0];
    assert_eq!(s["follow"]["cert"], cert.to_str().unwrap(), "{s}");
    let first_end: std::time::SystemTime =
        agentwall::clock::parse_rfc3339(s["not_after"].as_str().unwrap())
            .unwrap()
            .into();
    assert_eq!(svc.cmd("loop-start tcp 192.0.2.10 443"), "ok");
    let next = ca.issue(&fresh(ID, life + 30));
    rotate(&cert, &key, &next);
    wait_serial(&node.socket, "the rotation taken", &serial_of(&next));
    while std::time::SystemTime::now() < first_end + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = svc.cmd("loop-stop");
    assert!(
        counts.starts_with("ENETUNREACH=") && !counts.contains(' '),
        "every connect passed the kernel: {counts}"
    );
}
