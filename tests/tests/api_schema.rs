//! The control plane's API document against the real server: `GET /v1/openapi.json` serves
//! the document the code derives, and schemathesis (from PyPI; `cargo xtask test` installs
//! it) sends generated requests, valid and invalid, to every route with each role's
//! credentials. No answer may be a server error or differ from the document (status, content
//! type, headers, body schema).

use std::{path::PathBuf, process::Command};

use agentwall_tests::{
    bin_path,
    cp::{CpFixture, CpProc, admin_creds, cp},
    node::write_cert,
    pki::CertSpec,
};

/// Where `cargo xtask test` installs schemathesis (a virtualenv under `target/`).
fn schemathesis() -> PathBuf {
    let target = bin_path("agentwall")
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_owned();
    let p = target.join("tools/schemathesis/bin/schemathesis");
    assert!(
        p.exists(),
        "{} is missing: run the tests through `cargo xtask test`, which installs it",
        p.display()
    );
    p
}

#[test]
fn every_route_answers_as_its_api_document_says() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    // Generated requests come fast: no caller is rate limited here, and a node's poll is
    // held one second at most.
    fx.configure(
        "poll_timeout_secs = 1\n",
        "[limits]\nrequests_per_minute = 1000000\n",
    );
    let server = CpProc::start(&fx, None);
    // Something to read: a bundle pushed.
    let dir = tmp.path().join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/agent/a\negress:\n  - to: [192.0.2.0/24]\n    ports: [443]\n",
    )
    .unwrap();
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(
        &fx,
        &server.url,
        &admin,
        &["policy", "push", dir.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The document served is the one the code derives.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let security = fx.client(&server.url, None, Some(&fx.security_token));
    let served: serde_json::Value = rt.block_on(security.get("/v1/openapi.json")).unwrap();
    let derived = serde_json::to_value(agentwall::control_plane::server::openapi()).unwrap();
    assert_eq!(served, derived);
    assert_eq!(served["openapi"], "3.1.0");
    let doc = tmp.path().join("openapi.json");
    std::fs::write(&doc, serde_json::to_vec_pretty(&served).unwrap()).unwrap();

    let token = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let (node_cert, node_key) = write_cert(
        &fx.dir,
        "schema-node",
        &fx.ca
            .issue(&CertSpec::agent("spiffe://example.org/node/schema")),
    );
    let roles: [(&str, Vec<String>); 3] = [
        (
            "admin",
            vec![
                "-H".into(),
                format!("Authorization: Bearer {}", token(&fx.admin_token)),
            ],
        ),
        (
            "security",
            vec![
                "-H".into(),
                format!("Authorization: Bearer {}", token(&fx.security_token)),
            ],
        ),
        (
            "node",
            vec![
                "--request-cert".into(),
                node_cert.display().to_string(),
                "--request-cert-key".into(),
                node_key.display().to_string(),
            ],
        ),
    ];
    for (role, creds) in roles {
        let report = tmp.path().join(format!("schemathesis-{role}"));
        let out = Command::new(schemathesis())
            .arg("run")
            .arg(&doc)
            .args(["--url", &server.url])
            .arg("--tls-verify")
            .arg(&fx.ca_pem)
            .args(creds)
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
                "--generation-database",
                "none",
                "--report-dir",
            ])
            .arg(&report)
            .current_dir(tmp.path())
            .output()
            .expect("run schemathesis");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {role}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Every operation was exercised, not skipped for want of a schema ("0 passed" as
        // words: "640 passed" is fine).
        let words: Vec<&str> = text.split_whitespace().collect();
        assert!(
            !words
                .windows(2)
                .any(|w| w[0] == "0" && w[1].starts_with("passed")),
            "as {role}:\n{text}"
        );
    }
    // No request made the server fail.
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
