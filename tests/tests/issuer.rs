//! Identities from the control plane's issuer (`[issuer]`, `cp identity token`, `launch
//! --join-token`), against the real control plane, node and kernel: a join token traded
//! through an enrolled node for a short-lived certificate, the session renewed at half its
//! life, every issuance recorded at the control plane; tokens used up, expired, cancelled,
//! and callers that are not nodes, refused.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use agentwall_tests::{
    Probe, bin_path,
    cp::{CpFixture, CpProc, admin_creds, cp, cp_json, push},
    node::{
        NodeProc, SUPPORT_ID as ID, SUPPORT_POLICY, audit_records, eventually, setup, status_json,
        wait_status,
    },
    pki::Ca,
};

/// `launch` with a join token (from the environment, as the README advises) of aw-probe.
fn launch(node: &Path, token: &str) -> Command {
    let mut cmd = Command::new(bin_path("agentwall"));
    cmd.args(["launch", "--socket"])
        .arg(node)
        .env("AGENTWALL_JOIN_TOKEN", token)
        .arg("--")
        .arg(bin_path("aw-probe"))
        .arg("--netns");
    cmd
}

/// The first session's serial.
fn serial(node: &Path) -> String {
    status_json(node)["identities"][0]["sessions"][0]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase()
}

#[test]
fn a_join_token_gets_a_session_its_certificates_renewed_at_half_life() {
    let (env, tmp, _ca) = setup("issuer", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    // The issuer's CA: its key readable by the control plane's user only.
    let issuing = Ca::new("agentwall issuer CA");
    std::fs::write(fx.dir.join("issuer.pem"), issuing.pem()).unwrap();
    let key = fx.dir.join("issuer.key");
    std::fs::write(&key, issuing.key_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    fx.configure(
        "",
        "[issuer]\nca_cert = \"issuer.pem\"\nca_key = \"issuer.key\"\ntrust_domain = \"example.org\"\nsvid_ttl_secs = 12\n",
    );
    // Nodes trust what the issuer signs (beside the agents' own CA).
    let bundle = dir.join("ca.pem");
    let both = std::fs::read_to_string(&bundle).unwrap() + &issuing.pem();
    std::fs::write(&bundle, both).unwrap();
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let audit = dir.join("audit.jsonl");
    let mut flags = fx.node_flags(&url);
    flags.extend(["--audit-log".to_owned(), audit.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = NodeProc::start_with(&env, dir, &flags);
    let rev = push(&fx, &url, "v1", SUPPORT_POLICY);
    wait_status(&node.socket, "the policy applied", |s| {
        s["revision"] == rev.as_str()
    });
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();

    let minted = cp_json(
        &fx,
        &url,
        &admin,
        &["identity", "token", ID, "--ttl", "10m"],
    );
    let token = minted["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("awjt_"), "{minted}");
    assert_eq!(minted["uses"], 1);
    let mut probe = Probe::from_command(launch(&node.socket, &token));
    let environ = std::fs::read(format!("/proc/{}/environ", probe.pid)).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("AGENTWALL_JOIN_TOKEN"),
        "the token stays with the launcher"
    );
    let st = status_json(&node.socket);
    let s = &st["identities"][0]["sessions"][0];
    assert!(
        s["issued"]
            .as_str()
            .is_some_and(|c| c.contains("BEGIN CERTIFICATE")),
        "{s}"
    );
    let first_end: std::time::SystemTime =
        agentwall::clock::parse_rfc3339(s["not_after"].as_str().unwrap())
            .unwrap()
            .into();
    assert_eq!(probe.cmd("loop-start tcp 192.0.2.10 443"), "ok");

    // Renewed at half its life, twice, each a new certificate; the connect loop never
    // meets a refusal, past the first certificate's end.
    let first = serial(&node.socket);
    let mut seen = vec![first.clone()];
    for round in 0..2 {
        let next = eventually(&format!("renewal {round}"), Duration::from_secs(30), || {
            let now = serial(&node.socket);
            (!seen.contains(&now)).then_some(now.clone()).ok_or(now)
        });
        seen.push(next);
    }
    while std::time::SystemTime::now() < first_end + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = probe.cmd("loop-stop");
    assert!(
        counts.starts_with("ENETUNREACH=") && !counts.contains(' '),
        "every connect passed the kernel while the issuer renewed: {counts}"
    );
    let renewed = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "identity" && r["event"] == "renewed")
        .count();
    assert!(renewed >= 2, "{renewed}");
    // Each issuance is on record at the control plane, through this node.
    let issued = cp_json(&fx, &url, &admin, &["identity", "issued"]);
    let issued = issued.as_array().unwrap();
    let kinds: Vec<&str> = issued.iter().filter_map(|i| i["kind"].as_str()).collect();
    assert_eq!(kinds.last(), Some(&"join"), "{issued:?}");
    assert!(
        kinds.iter().filter(|k| **k == "renewal").count() >= 2,
        "{issued:?}"
    );
    for i in issued {
        assert_eq!(i["identity"], ID);
        assert_eq!(i["node"], agentwall_tests::cp::NODE_ID);
        assert!(seen.contains(&i["serial"].as_str().unwrap().to_owned()) || i["kind"] == "renewal");
    }

    // A certificate is renewed once: asked twice (a hostile node, or a reply lost), the
    // same certificate is answered, never a second one.
    let current = status_json(&node.socket)["identities"][0]["sessions"][0]["issued"]
        .as_str()
        .unwrap()
        .to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let as_node = fx.node_client(&url, "test");
    let csr = || {
        let k = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&k)
            .unwrap()
            .pem()
            .unwrap()
    };
    let renew = |chain: &str| -> serde_json::Value {
        rt.block_on(as_node.send_json(
            hyper::Method::POST,
            "/v1/node/svid",
            &serde_json::json!({"csr": csr(), "renew": chain}),
            Duration::from_secs(10),
        ))
        .unwrap()
    };
    let (a, b) = (renew(&current), renew(&current));
    assert_eq!(a["serial"], b["serial"], "one successor: {a} {b}");
    assert_eq!(a["chain"], b["chain"]);

    // A used-up token, an expired one and a cancelled one are refused, saying so.
    let refused = |token: &str| {
        let out = launch(&node.socket, token).arg("true").output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&token);
    assert!(
        err.contains("the join token is unknown, used up, expired or cancelled"),
        "{err}"
    );
    let brief = cp_json(&fx, &url, &admin, &["identity", "token", ID, "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1_500));
    let err = refused(brief["token"].as_str().unwrap());
    assert!(
        err.contains("unknown, used up, expired or cancelled"),
        "{err}"
    );
    let cancelled = cp_json(&fx, &url, &admin, &["identity", "token", ID]);
    let out = cp(
        &fx,
        &url,
        &admin,
        &["identity", "cancel", cancelled["id"].as_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = refused(cancelled["token"].as_str().unwrap());
    assert!(
        err.contains("unknown, used up, expired or cancelled"),
        "{err}"
    );
    let listed = cp_json(&fx, &url, &admin, &["identity", "tokens"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == cancelled["id"] && t["cancelled"] == true)
    );
    assert!(
        !listed.to_string().contains("awjt_"),
        "tokens are never listed: {listed}"
    );

    // Only a node may trade one: an admin cannot, and an identity of another trust domain
    // gets no token.
    let fresh = cp_json(&fx, &url, &admin, &["identity", "token", ID]);
    let admin_client = fx.client(&url, Some(fx.admin.clone()), None);
    let answer: Result<serde_json::Value, _> = rt.block_on(admin_client.send_json(
        hyper::Method::POST,
        "/v1/node/svid",
        &serde_json::json!({"csr": "x", "token": fresh["token"]}),
        Duration::from_secs(10),
    ));
    let e = answer.unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");
    // Nor a host the control plane does not know as a node (a certificate of its CA whose
    // SPIFFE ID no [[access]] names).
    let stranger = agentwall_tests::node::write_cert(
        &fx.dir,
        "stranger",
        &fx.ca.issue(&agentwall_tests::pki::CertSpec::agent(
            "spiffe://example.org/host/unenrolled",
        )),
    );
    let answer: Result<serde_json::Value, _> =
        rt.block_on(fx.client(&url, Some(stranger), None).send_json(
            hyper::Method::POST,
            "/v1/node/svid",
            &serde_json::json!({"csr": "x", "token": fresh["token"]}),
            Duration::from_secs(10),
        ));
    let e = answer.unwrap_err().to_string();
    assert!(e.contains("401") || e.contains("403"), "{e}");
    let out = cp(
        &fx,
        &url,
        &admin,
        &["identity", "token", "spiffe://other.example/agent/x"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("outside the issuer's trust domain example.org")
    );
    // Nor does a principal of the control plane itself (a node's identity here).
    let out = cp(
        &fx,
        &url,
        &admin,
        &["identity", "token", "spiffe://example.org/node/x"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is a principal of this control plane"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The first token cancelled: the certificates that descend from it are not renewed
    // (the node says so, and the session runs to its deadline).
    let out = cp(
        &fx,
        &url,
        &admin,
        &["identity", "cancel", minted["id"].as_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refusal = eventually("a renewal refused", Duration::from_secs(30), || {
        audit_records(&audit)
            .into_iter()
            .find(|r| {
                r["event"] == "rejected"
                    && r["op"] == "renew"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|w| w.contains("was cancelled"))
            })
            .ok_or_else(|| "not yet".to_owned())
    });
    assert_eq!(refusal["identity"], ID);

    // The token they tried is still good for a node.
    let p2 = Probe::from_command(launch(&node.socket, fresh["token"].as_str().unwrap()));
    drop(p2);
}
