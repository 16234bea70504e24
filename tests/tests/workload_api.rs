//! Sessions whose certificates come from a SPIFFE Workload API (`launch --workload-api`),
//! against the real node and kernel and a Workload API server built from the standard's
//! definitions (`agentwall_tests::workload`): rotations renew the session, the stream
//! survives the API's restart, an SVID taken away ends the session, and SVIDs that fail the
//! node's checks change nothing.

use std::{path::Path, process::Command, time::Duration};

use agentwall_tests::{
    Probe, bin_path,
    node::{
        NodeProc, SUPPORT_ID as ID, SUPPORT_POLICY, audit_records, eventually, fresh, serial_of,
        setup, status_json, wait_serial, wait_status,
    },
    pki::{Ca, CertSpec},
    workload::{WorkloadApi, X509Svid, fetch_without_header},
};

const OTHER: &str = "spiffe://example.org/agent/other";

/// `launch --workload-api` of aw-probe in a network namespace of its own.
fn launch(node: &Path, api: &Path, hint: Option<&str>) -> Command {
    let mut cmd = Command::new(bin_path("agentwall"));
    cmd.arg("launch")
        .arg(format!("--workload-api=unix://{}", api.display()))
        .arg("--socket")
        .arg(node);
    if let Some(h) = hint {
        cmd.args(["--svid-hint", h]);
    }
    cmd.arg("--").arg(bin_path("aw-probe")).arg("--netns");
    cmd
}

/// The identity records of `event`.
fn records(audit: &Path, event: &str) -> Vec<serde_json::Value> {
    audit_records(audit)
        .into_iter()
        .filter(|r| r["kind"] == "identity" && r["event"] == event)
        .collect()
}

/// The cgroup (v2 path) a process runs in.
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

/// A session launched from the Workload API (the SVID chosen by its hint among two) runs a
/// connect loop while the API rotates its SVID three times, once across the API's restart,
/// without one refused connect; the keeper that holds the stream is a process of the session;
/// once the API takes the SVID away the session is ended, new connects refused.
#[test]
fn a_workload_api_session_renews_at_each_rotation_and_ends_when_its_svid_is_taken_away() {
    let (env, tmp, ca) = setup("wlapi", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let ca_pem = ca.pem();
    let life = 12;
    let other = X509Svid::from_pem(OTHER, &ca.issue(&CertSpec::agent(OTHER)), &ca_pem, "other");
    let svids = |c: &agentwall_tests::pki::Issued| {
        vec![other.clone(), X509Svid::from_pem(ID, c, &ca_pem, "support")]
    };
    let first = ca.issue(&fresh(ID, life));
    let sock = dir.join("workload.sock");
    let mut api = WorkloadApi::start(&sock, svids(&first));
    let launched = std::time::Instant::now();

    let mut probe = Probe::from_command(launch(&node.socket, &sock, Some("support")));
    let st = status_json(&node.socket);
    let s = &st["identities"][0]["sessions"][0];
    assert_eq!(st["identities"][0]["identity"], ID);
    assert_eq!(s["workload_api"], format!("unix://{}", sock.display()));
    assert!(s["follow"].is_null(), "{s}");
    assert!(
        s["serial"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&serial_of(&first))
    );
    let session_cgroup = s["cgroup"].as_str().unwrap().to_owned();
    assert_eq!(probe.cmd("loop-start tcp 192.0.2.10 443"), "ok");

    let mut last = first;
    for round in 0..3 {
        let next = ca.issue(&fresh(ID, life + 2 * (round + 1)));
        if round == 1 {
            // The API restarts (a SPIRE agent upgrade): the keeper reconnects with backoff.
            api.restart(svids(&next));
        } else {
            api.issue(svids(&next));
        }
        wait_serial(
            &node.socket,
            &format!("rotation {round} taken"),
            &serial_of(&next),
        );
        last = next;
    }
    // Past the first certificate's deadline: only the renewals keep the session alive.
    let past = launched + Duration::from_secs(life as u64 + 1);
    while std::time::Instant::now() < past {
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = probe.cmd("loop-stop");
    assert!(
        counts.starts_with("ENETUNREACH=") && !counts.contains(' '),
        "every connect passed the kernel while the SVID rotated: {counts}"
    );
    assert_eq!(
        records(&audit, "renewed").len(),
        3,
        "one renewal a rotation"
    );
    assert!(
        api.opened() >= 2,
        "the stream was opened again after the restart"
    );
    assert_eq!(
        api.headerless(),
        0,
        "agentwall always sends the security header"
    );

    // Callers are attested by pid: the launcher (now the agent) first, then the keeper, a
    // process of the session's cgroup, not the node.
    let callers = api.callers();
    assert_eq!(callers[0], probe.pid as i32, "{callers:?}");
    let keeper = *callers.last().unwrap();
    assert_ne!(keeper, probe.pid as i32);
    assert!(
        session_cgroup.ends_with(&cgroup_of(keeper)),
        "keeper {keeper} runs in {:?}, not in the session's {session_cgroup}",
        cgroup_of(keeper)
    );

    // The standard's security header is required; a client without it is refused.
    assert_eq!(fetch_without_header(&sock), tonic::Code::InvalidArgument);
    assert_eq!(api.headerless(), 1);

    // The registration is removed: the session ends at once, long before its deadline.
    api.take_away();
    let ended = eventually("the session ended", Duration::from_secs(30), || {
        records(&audit, "ended")
            .pop()
            .ok_or_else(|| "no record yet".to_owned())
    });
    assert_eq!(ended["identity"], ID);
    assert!(
        ended["serial"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&serial_of(&last))
    );
    assert!(
        ended["reason"]
            .as_str()
            .unwrap()
            .contains("issues this workload no SVID"),
        "{ended}"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    wait_status(&node.socket, "the session shown cut off", |s| {
        s["identities"][0]["sessions"][0]["revoked"] == true
    });
}

/// What a launch from the Workload API refuses, what a rotation the node refuses leaves in
/// place, and that the keeper leaves with the agent: a launch with no API, or no SVID with
/// the hint asked, is refused; an SVID from another CA is refused at renewal and the session
/// keeps its certificate; an SVID of another identity ends the session; a session whose agent
/// exits is collected (the keeper does not hold it open).
#[test]
fn workload_api_launches_refuse_what_they_cannot_prove_and_end_with_the_agent() {
    let (env, tmp, ca) = setup("wlapi-refused", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let ca_pem = ca.pem();
    let sock = dir.join("workload.sock");

    // Nothing listens there.
    let out = launch(&node.socket, &sock, None).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agentwall launch: rejected: Workload API at unix://"),
        "{err}"
    );
    // No endpoint at all.
    let out = Command::new(bin_path("agentwall"))
        .args(["launch", "--workload-api", "--socket"])
        .arg(&node.socket)
        .args(["--", "true"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "no Workload API endpoint: give --workload-api SOCKET or set SPIFFE_ENDPOINT_SOCKET"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Files and the API at once.
    let out = Command::new(bin_path("agentwall"))
        .args([
            "launch",
            "--workload-api",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = ca.issue(&CertSpec::agent(ID));
    let svid = |c: &agentwall_tests::pki::Issued, ca_pem: &str| {
        X509Svid::from_pem(ID, c, ca_pem, "support")
    };
    let api = WorkloadApi::start(&sock, vec![svid(&first, &ca_pem)]);
    // SPIFFE_ENDPOINT_SOCKET is where the API is found by default; no SVID with this hint.
    let out = Command::new(bin_path("agentwall"))
        .args(["launch", "--workload-api", "--svid-hint", "db", "--socket"])
        .arg(&node.socket)
        .args(["--", "true"])
        .env("SPIFFE_ENDPOINT_SOCKET", format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"no SVID with hint "db" (the hints it gave: "support")"#),
        "{err}"
    );
    assert!(
        status_json(&node.socket)["identities"][0]["sessions"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );

    let mut probe = Probe::from_command(launch(&node.socket, &sock, None));
    wait_serial(&node.socket, "launched", &serial_of(&first));
    let opened = api.opened();

    // From a CA the node does not trust: refused at renewal, the session keeps its own.
    let stranger = Ca::new("not the node's CA");
    api.issue(vec![svid(
        &stranger.issue(&CertSpec::agent(ID)),
        &stranger.pem(),
    )]);
    let refused = eventually("the renewal refused", Duration::from_secs(30), || {
        records(&audit, "rejected")
            .into_iter()
            .find(|r| r["op"] == "renew")
            .ok_or_else(|| "no record yet".to_owned())
    });
    assert_eq!(
        refused["reason"],
        "certificate is not signed by a trusted CA (unknown issuer)"
    );
    let s = &status_json(&node.socket)["identities"][0]["sessions"][0];
    assert!(
        s["serial"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&serial_of(&first))
    );
    assert_eq!(s["revoked"], false);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // The API now issues this workload only another identity: the session ends.
    api.issue(vec![X509Svid::from_pem(
        OTHER,
        &ca.issue(&CertSpec::agent(OTHER)),
        &ca_pem,
        "support",
    )]);
    let ended = eventually("the session ended", Duration::from_secs(30), || {
        records(&audit, "ended")
            .pop()
            .ok_or_else(|| "no record yet".to_owned())
    });
    assert!(
        ended["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("no longer issues {ID} (it issues {OTHER})")),
        "{ended}"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(api.opened(), opened, "one stream all along");

    // A second agent, then it exits: its keeper goes with it and the session is collected.
    let second = ca.issue(&CertSpec::agent(ID));
    api.issue(vec![svid(&second, &ca_pem)]);
    let probe2 = Probe::from_command(launch(&node.socket, &sock, None));
    eventually(
        "the second keeper's stream",
        Duration::from_secs(30),
        || {
            let c = api.callers();
            (c.len() >= 5 && c[c.len() - 2] == probe2.pid as i32)
                .then_some(())
                .ok_or_else(|| format!("{c:?}"))
        },
    );
    drop(probe2);
    // The keeper watches the agent's pidfd: it leaves, the cgroup empties, the node collects.
    wait_status(&node.socket, "the second session collected", |s| {
        s["identities"][0]["sessions"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    drop(probe);
}

/// A node given a bundle per trust domain (one in the SPIFFE bundle format, as SPIRE writes
/// it) verifies each identity against its own domain's bundle only: a partner domain's agent
/// launches; the partner's CA cannot vouch for an example.org identity nor example.org's CA
/// for a partner one; a domain with no bundle is refused, saying so.
#[test]
fn each_trust_domain_is_verified_against_its_own_bundle() {
    use base64::Engine as _;
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    const PARTNER: &str = "spiffe://partner.example/agent/p";
    let (env, tmp, ca) = setup("wlapi-domains", SUPPORT_POLICY);
    let dir = tmp.path();
    std::fs::write(
        dir.join("policy/partner.yaml"),
        format!(
            "kind: AgentPolicy\nname: partner\nidentity: {PARTNER}\negress:\n  - to: [192.0.2.0/24]\n    ports: [443]\n    protocol: tcp\n"
        ),
    )
    .unwrap();
    let partner = Ca::new("partner.example CA");
    let der = CertificateDer::from_pem_slice(partner.pem().as_bytes()).unwrap();
    let bundle = dir.join("partner.spiffe.json");
    std::fs::write(
        &bundle,
        serde_json::json!({
            "spiffe_sequence": 3,
            "spiffe_refresh_hint": 300,
            "keys": [{"use": "x509-svid", "kty": "EC", "x5c": [
                base64::engine::general_purpose::STANDARD.encode(der.as_ref())
            ]}]
        })
        .to_string(),
    )
    .unwrap();
    let for_partner = format!("partner.example={}", bundle.display());
    let node = NodeProc::start_with(&env, dir, &["--trust-bundle-for", &for_partner]);
    let launch = |id: &str, by: &Ca| {
        let (cert, key) =
            agentwall_tests::node::write_cert(dir, "try", &by.issue(&CertSpec::agent(id)));
        let out = agentwall_tests::node::launch_args(&node.socket, &cert, &key)
            .arg("true")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(launch(PARTNER, &partner), (Some(0), String::new()));
    assert_eq!(launch(ID, &ca).0, Some(0));
    let (code, err) = launch(ID, &partner);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown issuer"), "{err}");
    let (code, err) = launch(PARTNER, &ca);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown issuer"), "{err}");
    let (code, err) = launch("spiffe://other.example/agent/o", &partner);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no trust bundle for trust domain other.example"),
        "{err}"
    );
}

/// A keeper ends its session whatever befalls its standard error and whatever the API sends
/// before: the agent's stderr is a pipe no one reads any more (writes fail), a rotated SVID's
/// key is not its certificate's (refused, not retried for ever), and the API takes the SVID
/// away with a message holding a newline and a terminal escape: the session is ended, the
/// reason kept printable, and once the agent exits the keeper is gone and the session
/// collected.
#[test]
fn a_keeper_ends_its_session_whatever_its_stderr_and_the_api_send() {
    let (env, tmp, ca) = setup("wlapi-hostile", SUPPORT_POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(&env, dir, &["--audit-log", audit.to_str().unwrap()]);
    let ca_pem = ca.pem();
    let sock = dir.join("workload.sock");
    let first = ca.issue(&CertSpec::agent(ID));
    let api = WorkloadApi::start(&sock, vec![X509Svid::from_pem(ID, &first, &ca_pem, "")]);
    let mut agent = Command::new(bin_path("agentwall"))
        .arg("launch")
        .arg(format!("--workload-api=unix://{}", sock.display()))
        .arg("--socket")
        .arg(&node.socket)
        .args(["--", "sleep", "600"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_serial(&node.socket, "launched", &serial_of(&first));
    let keeper = eventually("the keeper's stream", Duration::from_secs(30), || {
        api.callers()
            .into_iter()
            .rfind(|p| *p != agent.id() as i32)
            .ok_or_else(|| "not yet".to_owned())
    });
    drop(agent.stderr.take());

    let (a, b) = (
        ca.issue(&CertSpec::agent(ID)),
        ca.issue(&CertSpec::agent(ID)),
    );
    let mut mismatched = X509Svid::from_pem(ID, &a, &ca_pem, "");
    mismatched.x509_svid_key = X509Svid::from_pem(ID, &b, &ca_pem, "").x509_svid_key;
    api.issue(vec![mismatched]);
    api.take_away_with("gone\nINFO agentwall::node: forged \u{1b}[8m");
    let ended = eventually("the session ended", Duration::from_secs(30), || {
        records(&audit, "ended")
            .pop()
            .ok_or_else(|| "no record yet".to_owned())
    });
    assert_eq!(
        ended["reason"],
        "Workload API at unix://".to_owned()
            + sock.to_str().unwrap()
            + " issues this workload no SVID: permission denied: gone\\u{000a}INFO agentwall::node: forged \\u{001b}[8m"
    );
    assert!(
        ended["serial"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&serial_of(&first))
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    eventually(
        "the keeper gone with its agent",
        Duration::from_secs(30),
        || {
            let st = std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default();
            if st.is_empty() || st.contains(") Z ") {
                Ok(())
            } else {
                Err(st)
            }
        },
    );
    wait_status(&node.socket, "the session collected", |s| {
        s["identities"][0]["sessions"]
            .as_array()
            .is_none_or(Vec::is_empty)
    });
}
