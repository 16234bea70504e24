//! Just-in-time grants with the real control plane and a real node: a grant adds a
//! destination to an identity's policy until its deadline, a later push carries it over,
//! and at the deadline the kernel denies the destination again with the node stopped.

use std::time::Duration;

use agentwall_tests::{
    cp::{CpFixture, CpProc, NODE_ID, admin_creds, cp, node_args, push},
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, eventually, launch_probe, setup, wait_status,
        write_cert,
    },
    pki::CertSpec,
};

/// `agentwall cp ARGS` as the admin: (success, stdout, stderr).
fn admin(fx: &CpFixture, url: &str, args: &[&str]) -> (bool, String, String) {
    let creds = admin_creds(fx);
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    let out = cp(fx, url, &creds, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn applied(node: &NodeProc, version: u64) {
    wait_status(&node.socket, &format!("version {version} applied"), |s| {
        s["control_plane"]["applied_version"] == version
    });
}

#[test]
fn a_grant_opens_a_destination_until_its_deadline_and_the_kernel_ends_it() {
    let (env, tmp, ca) = setup("cp-grant", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let flags = fx.node_flags(&url);
    let node = NodeProc::start_with(
        &env,
        dir,
        &node_args(&flags, &["--aggregate-window-secs", "0"]),
    );
    push(&fx, &url, "v1", SUPPORT_POLICY);
    applied(&node, 1);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(SUPPORT_ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");

    // Refused whole: for an identity without a policy, too long, or without a reason.
    let (ok, _, err) = admin(
        &fx,
        &url,
        &[
            "grant",
            "--identity",
            "spiffe://example.org/agent/other",
            "--to",
            "198.51.100.10",
            "--for",
            "5m",
            "--reason",
            "r",
        ],
    );
    assert!(!ok && err.contains("which has no AgentPolicy"), "{err}");
    let (ok, _, err) = admin(
        &fx,
        &url,
        &[
            "grant",
            "--identity",
            SUPPORT_ID,
            "--to",
            "198.51.100.10",
            "--for",
            "8d",
            "--reason",
            "r",
        ],
    );
    assert!(!ok && err.contains("at most 7 days"), "{err}");
    let (ok, _, err) = admin(
        &fx,
        &url,
        &[
            "grant",
            "--identity",
            SUPPORT_ID,
            "--to",
            "198.51.100.10",
            "--for",
            "5m",
        ],
    );
    assert!(!ok && err.contains("--reason"), "{err}");

    // Granted: the destination is reachable (no route in the agent's namespace, so allowed
    // shows as ENETUNREACH), the rest of the policy is as it was.
    let grant_to = |dest: &str, lasting: &str, reason: &str| {
        admin(
            &fx,
            &url,
            &[
                "grant",
                "--identity",
                SUPPORT_ID,
                "--to",
                dest,
                "--ports",
                "443",
                "--protocol",
                "tcp",
                "--for",
                lasting,
                "--reason",
                reason,
            ],
        )
    };
    let (ok, out, err) = grant_to("198.51.100.10", "10m", "incident 42: fetch the logs");
    assert!(ok && out.contains("published version 2 "), "{out}{err}");
    let grant = out.split(':').next().unwrap().to_owned();
    assert!(grant.starts_with("grant-"), "{out}");
    applied(&node, 2);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 80"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 198.51.100.11 443"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // Listed for review, with its reason and deadline.
    let (ok, out, err) = admin(&fx, &url, &["grants"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("{grant} {SUPPORT_ID} until "))
            && out.contains("(in force): 198.51.100.10/32 ports 443 protocol tcp; reason: incident 42: fetch the logs"),
        "{out}"
    );

    // A push of the policy directory, which does not hold the grant, carries it over.
    let d = fx.dir.join("v1").display().to_string();
    let (ok, out, err) = admin(&fx, &url, &["policy", "push", &d]);
    assert!(ok && out.starts_with("pushed version 3 "), "{out}{err}");
    assert!(
        err.contains(&format!("carrying over {grant}.yaml")),
        "{err}"
    );
    applied(&node, 3);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );

    // The review afterwards: who pushed it, who signed it, why, and what it allowed (the
    // policy's own flows not among them).
    let review = eventually(
        "the grant's flows at the control plane",
        Duration::from_secs(15),
        || {
            let (ok, out, err) = admin(&fx, &url, &["report", "grants"]);
            if ok && out.contains(&format!("{NODE_ID} -> 198.51.100.10:443/tcp x")) {
                Ok(out)
            } else {
                Err(format!("{out}{err}"))
            }
        },
    );
    assert!(
        review.starts_with(&format!("{grant} {SUPPORT_ID} until "))
            && review.contains("\n  pushed in version 2 at ")
            && review.contains("; signed by nobody\n  reason: incident 42: fetch the logs\n")
            && !review.contains("192.0.2.10"),
        "{review}"
    );

    // A short grant beside it. The node goes away; at that grant's deadline the kernel
    // denies its destination on its own, and the other grant stays in force.
    let (ok, out, err) = grant_to("198.51.100.20", "15s", "a quick look");
    assert!(ok && out.contains("published version 4 "), "{out}{err}");
    applied(&node, 4);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.20 443"),
        "err ENETUNREACH"
    );
    assert_eq!(node.stop(), 0);
    let (_, out, _) = admin(&fx, &url, &["grants", "--output", "json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let short = listed
        .iter()
        .find(|g| {
            g["rules"][0]
                .as_str()
                .unwrap()
                .starts_with("198.51.100.20/32")
        })
        .unwrap();
    let deadline: std::time::SystemTime =
        agentwall::clock::parse_rfc3339(short["until"].as_str().unwrap())
            .unwrap()
            .into();
    // Waiting for the clock is the behaviour under test, not synchronisation.
    while std::time::SystemTime::now() < deadline + Duration::from_millis(50) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(probe.cmd("connect tcp 198.51.100.20 443"), "err EPERM");
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let (ok, out, _) = admin(&fx, &url, &["grants"]);
    assert!(ok && out.contains("(ended): 198.51.100.20/32"), "{out}");

    // An ended grant is not carried over by the next push; the one in force is.
    let (ok, out, err) = admin(&fx, &url, &["policy", "push", &d]);
    assert!(ok && out.starts_with("pushed version 5 "), "{out}{err}");
    assert_eq!(err.matches("carrying over").count(), 1, "{err}");
    assert!(
        err.contains(&format!("carrying over {grant}.yaml")),
        "{err}"
    );
    let (_, out, _) = admin(&fx, &url, &["grants"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&format!("{grant} ")), "{out}");
}
