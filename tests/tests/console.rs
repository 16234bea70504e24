//! The console in a real browser: Debian's Chromium, driven headless by Playwright
//! (`tests/browser/console.mjs`), against the real control plane holding a real node's
//! records. `cargo xtask test` installs both; a missing one fails here, loudly.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use agentwall::control_plane::{PollReply, PollRequest, ReportBatch, Reported};
use agentwall_tests::{
    cp::{
        CpFixture, CpProc, NODE_ID, POLICY_B, cp_json, node_args, push, push_signed, security,
        stored,
    },
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, eventually, launch_probe, setup, wait_status,
        write_cert,
    },
    pki::{CertSpec, signing_keypair},
    require_root,
};

/// The browser tests' directory (package.json, the script, node_modules once installed).
fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Where the screenshots go: kept after the run, as the test's artifact.
fn shots_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Shadow AI, as a node reports it: an unenrolled process's flows tagged with a service.
fn shadow_record(seq: u64, dest: &str, service: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "decision", "seq": seq, "time": format!("2026-11-23T00:00:{:02}.000Z", seq % 60),
        "verdict": "unknown", "pid": 7, "comm": "notebook", "uid": 1000, "cgroup_id": 1,
        "dest": dest, "port": 443, "protocol": "tcp", "revision": "r", "count": 1,
        "exe": "/usr/bin/python3", "unit": "notebook.service", "service": service,
    })
}

#[test]
fn the_console_shows_what_the_api_returns_and_its_revoke_reaches_the_node() {
    require_root();
    let chromium = std::env::var("AGENTWALL_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: `cargo xtask test` installs Debian's chromium"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is missing from tests/browser: `cargo xtask test` installs it (npm ci)"
    );
    let (env, tmp, ca) = setup("console", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    // One signer's approval publishes a push: the versions below are signed, and an unsigned
    // push stays a proposal.
    let (alice, alice_pub) = signing_keypair(dir, "alice");
    fx.configure(
        "approvals_required = 1\n",
        &format!(
            "[signers]\n\"alice@example.org\" = \"{}\"\n",
            alice_pub.display()
        ),
    );
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let flags = fx.node_flags(&url);
    let node = NodeProc::start_with(
        &env,
        dir,
        &node_args(&flags, &["--owner", "platform@example.com"]),
    );
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(SUPPORT_ID)));
    let owned = format!("{SUPPORT_POLICY}owner: support-team@example.com\n");
    push_signed(&fx, &url, "v1", &owned, &[&alice]);
    // A second version with a rule no flow uses.
    let added = "  - to: [203.0.113.0/24]\n    ports: [8443]\n    protocol: tcp\n";
    let rev = push_signed(
        &fx,
        &url,
        "v2",
        &format!("{SUPPORT_POLICY}{added}owner: support-team@example.com\n"),
        &[&alice],
    )["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    let proposed = push(&fx, &url, "v3", POLICY_B);
    assert_ne!(proposed, rev);
    wait_status(&node.socket, "version 2 applied", |s| {
        s["revision"] == rev.as_str()
    });
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
    eventually(
        "the denial at the control plane",
        Duration::from_secs(10),
        || {
            stored(&fx, &url, "deny")
                .into_iter()
                .next()
                .ok_or_else(|| "no denial yet".to_owned())
        },
    );

    // Shadow AI seen by a second node.
    let other = fx.node_client(&url, "lab-2");
    let records = [
        shadow_record(1, "203.0.113.80", "OpenAI"),
        shadow_record(2, "203.0.113.80", "OpenAI"),
        shadow_record(3, "203.0.113.81", "Anthropic"),
    ];
    let batch = ReportBatch {
        epoch: 1,
        records: records
            .iter()
            .enumerate()
            .map(|(i, r)| Reported {
                rid: i as u64 + 1,
                record: serde_json::value::RawValue::from_string(r.to_string()).unwrap(),
            })
            .collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(other.post_reports(&batch)).unwrap();
    // A poll lists it among the nodes (with no owner: the page shows that too).
    let _: PollReply = rt
        .block_on(other.send_json(
            hyper::Method::POST,
            "/v1/node/poll",
            &PollRequest::default(),
            Duration::from_secs(30),
        ))
        .unwrap();

    // What the API answers for the same data, which each page must show.
    let sec = security(&fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let nodes = eventually("both nodes listed", Duration::from_secs(10), || {
        let n = cp_json(&fx, &url, &sec, &["nodes"]);
        match n.as_array().map(Vec::len) {
            Some(2) => Ok(n),
            _ => Err(n.to_string()),
        }
    });
    let flows = cp_json(&fx, &url, &sec, &["flows", "--limit", "50"]);
    let denials = cp_json(
        &fx,
        &url,
        &sec,
        &["flows", "--verdict", "deny", "--limit", "50"],
    );
    let shadow = cp_json(&fx, &url, &sec, &["shadow-ai"]);
    let count = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
    let shadow_groups: usize = shadow
        .as_array()
        .unwrap()
        .iter()
        .map(|n| count(&n["groups"]))
        .sum();
    assert_eq!(shadow_groups, 1, "{shadow}");
    // The group is new shadow AI on that node: an alert.
    let alerts = eventually("the shadow-AI alert", Duration::from_secs(30), || {
        let a = cp_json(&fx, &url, &sec, &["alerts"]);
        match count(&a["alerts"]) {
            0 => Err(a.to_string()),
            _ => Ok(a),
        }
    });
    assert_eq!(count(&alerts["alerts"]), 1, "{alerts}");
    assert_eq!(alerts["alerts"][0]["alert"], "new_shadow_ai", "{alerts}");
    let sec_client = fx.client(&url, None, Some(&fx.security_token));
    let identities: serde_json::Value = rt.block_on(sec_client.get("/v1/identities")).unwrap();
    let candidate_dir = dir.join("candidate");
    std::fs::create_dir_all(&candidate_dir).unwrap();
    std::fs::write(candidate_dir.join("agents.yaml"), POLICY_B).unwrap();
    let sim = cp_json(
        &fx,
        &url,
        &sec,
        &[
            "policy",
            "simulate",
            "--allow-new-denials",
            candidate_dir.to_str().unwrap(),
        ],
    );
    let expect = serde_json::json!({
        "nodes": count(&nodes),
        "node": NODE_ID,
        "node_owner": "platform@example.com",
        "version": 2,
        "flows": count(&flows["flows"]),
        "denials": count(&denials["flows"]),
        "identity": SUPPORT_ID,
        "denied_dest": "198.51.100.10",
        "shadow_groups": shadow_groups,
        "alerts": count(&alerts["alerts"]),
        "revocations": 0,
        "live_dest": "198.51.100.11",
        "identities": identities["identities"],
        "versions": 2,
        "proposals": 1,
        "diff_line": "+  - to: [203.0.113.0/24]",
        "candidate": POLICY_B,
        "newly_denied": count(&sim["newly_denied"]),
        "newly_allowed": count(&sim["newly_allowed"]),
    });
    assert!(
        count(&sim["newly_allowed"]) > 0 && count(&sim["newly_denied"]) > 0,
        "{sim}"
    );

    let security_token = std::fs::read_to_string(&fx.security_token).unwrap();
    // Firefox first, reading as security (the Chromium script below acts on the data).
    let firefox = std::env::var("AGENTWALL_TEST_FIREFOX").unwrap_or("/usr/bin/firefox-esr".into());
    assert!(
        std::path::Path::new(&firefox).exists(),
        "{firefox} is missing: `cargo xtask test` installs Debian's firefox-esr"
    );
    let out = Command::new("node")
        .arg(browser_dir().join("firefox.mjs"))
        .current_dir(browser_dir())
        .env("CONSOLE_URL", format!("{url}/ui/"))
        .env("SECURITY_TOKEN", security_token.trim())
        .env("EXPECT", expect.to_string())
        .env("SHOTS", shots_dir())
        .env("FIREFOX", &firefox)
        .output()
        .expect("node (Node.js) runs the Firefox script");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in said.lines() {
        eprintln!("firefox: {line}");
    }
    assert!(out.status.success(), "the Firefox script failed:\n{said}");
    assert!(
        said.contains("ok: Firefox: no errors in the browser's console"),
        "{said}"
    );
    // The admin signs in by a one-time link, made with the admin's certificate.
    let admin = agentwall_tests::cp::admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let link = cp_json(&fx, &url, &admin, &["console-link"]);
    let mut script = Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .current_dir(browser_dir())
        .env("CONSOLE_URL", format!("{url}/ui/"))
        .env("ADMIN_LINK", link["url"].as_str().unwrap())
        .env("SECURITY_TOKEN", security_token.trim())
        .env("REVOKE_ID", SUPPORT_ID)
        .env("EXPECT", expect.to_string())
        .env("SHOTS", shots_dir())
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js) runs the browser script");
    let mut to_script = script.stdin.take().unwrap();
    let mut stderr = script.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut e = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut e).unwrap();
        e
    });
    let mut said = String::new();
    for line in BufReader::new(script.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        // The page follows the flows live: a denial made now must show up in it.
        if line == "waiting: live" {
            assert_eq!(probe.cmd("connect tcp 198.51.100.11 443"), "err EPERM");
            writeln!(to_script, "go").unwrap();
        }
        said.push_str(&line);
        said.push('\n');
    }
    let status = script.wait().unwrap();
    said.push_str(&errors.join().unwrap());
    assert!(status.success(), "the browser script failed:\n{said}");
    assert!(
        said.contains("ok: no errors in the browser's console"),
        "{said}"
    );

    // The console's revocation reaches the node: the identity's agent is cut off.
    wait_status(&node.socket, "the revocation applied", |s| {
        s["revoked"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == SUPPORT_ID))
    });
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    for page in [
        "sign-in",
        "fleet",
        "flows",
        "identities",
        "policy",
        "policy-errors",
        "shadow-ai",
        "revoke-confirm",
        "revocations",
    ] {
        let shot = shots_dir().join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "{} was not saved",
            shot.display()
        );
    }
}
