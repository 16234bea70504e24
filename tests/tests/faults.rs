//! Faults: the node killed during a connect storm, a full disk under the audit log, and a
//! policy the datapath has no room or no memory for.
//! Enforcement lives in the kernel, so neither may change a single verdict; what the node
//! records must be recovered or counted as lost.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agentwall_tests::{
    MemoryGroup, SmallDisk,
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, agentwall, audit_records, flows, launch_probe,
        metric, run_ok, scrape, setup, write_cert,
    },
    pki::CertSpec,
};

const ID: &str = SUPPORT_ID;
const POLICY: &str = SUPPORT_POLICY;

#[test]
fn sigkill_of_the_node_mid_storm_changes_no_verdict_and_loses_no_record() {
    let (env, tmp, ca) = setup("sigkill", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);

    // A storm of denied connects while the node is SIGKILLed and started again...
    let storm = "connect-loop tcp 203.0.113.5 443 200000";
    probe.send(storm);
    drop(node);
    let node = NodeProc::start(&env, dir);
    assert_eq!(probe.answer(storm), "eperm=200000 other=0");
    // ...and of allowed ones (ENETUNREACH in the probe's namespace: the hook let them by).
    let storm = "connect-loop tcp 192.0.2.10 443 200000";
    probe.send(storm);
    drop(node);
    let node = NodeProc::start(&env, dir);
    assert_eq!(probe.answer(storm), "eperm=0 other=200000");

    // Denials made while no node runs wait in the pinned ring buffer for the next one.
    drop(node);
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.6 2000 2099"),
        "eperm=100 other=0"
    );
    let node = NodeProc::start(&env, dir);
    let deadline = agentwall_tests::deadline(Duration::from_secs(10));
    loop {
        let ports: std::collections::BTreeSet<u64> = flows(&node.socket, "deny")
            .iter()
            .filter(|r| r["dest"] == "203.0.113.6")
            .map(|r| r["port"].as_u64().unwrap())
            .collect();
        if ports == (2000..2100).collect() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 100 records read after the restart",
            ports.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_disk_under_the_audit_log_changes_no_verdict_and_counts_the_loss() {
    let (env, tmp, ca) = setup("diskfull", POLICY);
    let dir = tmp.path();
    let disk = SmallDisk::mount(&dir.join("small"), "32k");
    let audit = disk.0.join("audit.jsonl");
    let (node, addr) = NodeProc::start_observed(&env, dir, &audit);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    // 500 distinct denials: far more records than 32 KiB holds.
    assert_eq!(
        probe.cmd("sweep tcp 203.0.113.5 3000 3499"),
        "eperm=500 other=0"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    // Generous for the kernel matrix's emulated guests; the loop ends as soon as all are in.
    let deadline = agentwall_tests::deadline(Duration::from_secs(120));
    loop {
        let s = scrape(addr);
        let denied = metric(
            &s,
            "agentwall_decisions_total",
            &[("identity", ID), ("verdict", "deny")],
        );
        let failures = metric(&s, "agentwall_audit_write_failures_total", &[]);
        if denied == 500.0 && failures > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "denied {denied}, audit failures {failures}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still enforcing.
    assert_eq!(probe.cmd("connect tcp 203.0.113.5 4000"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // Room again: the log says how many records it lost, and its chain is intact.
    disk.grow("4m");
    assert_eq!(probe.cmd("connect tcp 203.0.113.5 4001"), "err EPERM");
    let failures = metric(&scrape(addr), "agentwall_audit_write_failures_total", &[]);
    let deadline = agentwall_tests::deadline(Duration::from_secs(10));
    let lost = loop {
        let lost: u64 = audit_records(&audit)
            .into_iter()
            .filter(|r| r["kind"] == "loss")
            .filter_map(|r| r["audit_records_lost"].as_u64())
            .sum();
        if lost > 0 {
            break lost;
        }
        assert!(Instant::now() < deadline, "no loss record");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lost as f64, failures);
    run_ok(agentwall().args(["audit", "verify"]).arg(&audit));
}

#[test]
fn a_policy_beyond_the_identity_table_is_refused_whole() {
    let (env, tmp, ca) = setup("capacity", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let (node, addr) = NodeProc::start_observed(&env, dir, &audit);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let before = agentwall_tests::node::status_json(&node.socket)["revision"].clone();

    // One identity more than the datapath's table holds (less the number the self-check
    // keeps), and the support agent's rule gone.
    let max = agent_common::MAX_IDENTITIES as usize - 2;
    let mut text = String::new();
    for i in 0..=max {
        text.push_str(&format!(
            "---\nkind: AgentPolicy\nname: a{i}\nidentity: spiffe://example.org/agent/a{i}\negress:\n  - to: [198.51.100.1]\n    ports: [443]\n"
        ));
    }
    // In one step (see the ENOMEM test): a half-read file could pass for a smaller policy.
    agentwall::files::write_atomic(&dir.join("policy/agents.yaml"), text.as_bytes()).unwrap();
    let s = agentwall_tests::node::wait_status(&node.socket, "the refusal", |s| {
        s["policy_error"].is_string()
    });
    assert_eq!(
        s["policy_error"],
        format!(
            "the policy needs {} identities (1 known to this node, {} new); the datapath holds at most {max}: nothing was applied",
            max + 2,
            max + 1
        )
    );
    assert_eq!(s["revision"], before);
    // The support agent keeps its rule.
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(
        metric(&scrape(addr), "agentwall_policy_rejections_total", &[]),
        1.0
    );
    let rejected = audit_records(&audit)
        .into_iter()
        .find(|r| r["kind"] == "policy" && r["event"] == "rejected")
        .expect("a rejected record");
    assert_eq!(rejected["revision_in_force"], before);
}

#[test]
fn enomem_while_filling_a_trie_is_refused_whole() {
    let (env, tmp, ca) = setup("enomem", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    // The node's kernel work gets 4 MiB; the new rules need a trie of about 20 MiB. Where the
    // kernel has no cgroup v1 memory controller to limit the node's threads with (Debian's
    // 6.12), the kernel refuses the fill part-way another way: the node's test build makes
    // the trie too small for its entries (failpoint `trie-capacity`), so the kernel answers
    // ENOSPC after 1,000 entries where it would answer ENOMEM.
    let group = MemoryGroup::create("enomem", 4 << 20);
    let addr = agentwall_tests::node::loopback_addr();
    let extra = [
        "--audit-log",
        audit.to_str().unwrap(),
        "--metrics-listen",
        &addr.to_string(),
    ];
    let node = match &group {
        Ok(_) => NodeProc::start_with(&env, dir, &extra),
        Err(why) => {
            eprintln!("{why}: the trie is made too small instead");
            NodeProc::start_env(
                &env,
                dir,
                &extra,
                &[(
                    "AGENTWALL_FAILPOINTS",
                    Path::new("trie-capacity=1*return(1000)"),
                )],
            )
        }
    };
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.1 443"), "err EPERM");
    let before = agentwall_tests::node::status_json(&node.socket)["revision"].clone();

    // The support agent leaves 192.0.2.0/24 for 198.51.100.0/24 and 40,000 IPv6 hosts.
    if let Ok(group) = &group {
        assert!(group.adopt_threads(node.child.id()) > 0);
    }
    let hosts: Vec<String> = (1..=40_000u32)
        .map(|i| format!("2001:db8::{:x}:{:x}", i >> 16, i & 0xffff))
        .collect();
    let policy = format!(
        "kind: AgentPolicy\nname: support\nidentity: {ID}\negress:\n  - to: [198.51.100.0/24, {}]\n    ports: [443]\n    protocol: tcp\n",
        hosts.join(", ")
    );
    // Replaced in one step: the node watches the directory, and a reader half-way through a
    // plain write of this megabyte could take the start of the file for a whole policy.
    agentwall::files::write_atomic(&dir.join("policy/agents.yaml"), policy.as_bytes()).unwrap();
    let s = agentwall_tests::node::wait_status(&node.socket, "the refusal", |s| {
        s["policy_error"].is_string()
    });
    let err = s["policy_error"].as_str().unwrap();
    assert!(
        err.starts_with(&format!("the rules of {ID}: filling the trie of identity ")),
        "{err}"
    );
    let refusal = match &group {
        Ok(_) => ": Cannot allocate memory (os error 12) after ",
        Err(_) => ": No space left on device (os error 28) after 1000 of ",
    };
    assert!(err.contains(refusal), "{err}");
    assert!(
        err.ends_with(" entries (nothing was changed; the previous rules stay in force)"),
        "{err}"
    );
    if let Ok(group) = &group {
        assert!(group.failures() > 0, "the limit was never reached");
    }
    assert_eq!(s["revision"], before);
    // Not one of the new rules is in force, and every old one still is.
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 198.51.100.1 443"), "err EPERM");
    assert_eq!(
        metric(&scrape(addr), "agentwall_policy_rejections_total", &[]),
        1.0
    );
    let rejected = audit_records(&audit)
        .into_iter()
        .find(|r| r["kind"] == "policy" && r["event"] == "rejected")
        .expect("a rejected record");
    assert_eq!(rejected["errors"], err);
    assert_eq!(rejected["revision_in_force"], before);

    // With memory again, the same rules go in whole (a comment changes the file, so the node
    // reads it again).
    if let Ok(group) = &group {
        group.lift_limit();
    }
    agentwall::files::write_atomic(
        &dir.join("policy/agents.yaml"),
        format!("# memory again\n{policy}").as_bytes(),
    )
    .unwrap();
    agentwall_tests::node::wait_status(&node.socket, "the new revision", |s| {
        s["revision"] != before && s["policy_error"].is_null()
    });
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err EPERM");
    assert_eq!(probe.cmd("connect tcp 198.51.100.1 443"), "err ENETUNREACH");
    assert_eq!(
        probe.cmd("connect tcp 2001:db8::9c40 443"),
        "err ENETUNREACH"
    );
}

#[test]
fn a_full_binding_table_refuses_new_agents_and_keeps_the_bound_ones() {
    use agent_common::{Binding, MAP_BINDINGS, MAX_BINDINGS};
    let (env, tmp, ca) = setup("bindings", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let (node, addr) = NodeProc::start_observed(&env, dir, &audit);
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // Every other slot of the kernel's binding table taken, by cgroup ids no cgroup has.
    let pinned = agentwall::datapath::pin_dir(&env.bpffs_dir)
        .join("maps")
        .join(MAP_BINDINGS);
    let mut table: aya::maps::HashMap<_, u64, Binding> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pinned).unwrap()),
    )
    .unwrap();
    let fake = |i: u64| u64::MAX - i;
    let others = u64::from(MAX_BINDINGS) - 1;
    for i in 0..others {
        let b = Binding {
            not_after_ns: 0,
            identity: 1,
            slot: 0,
            level: 1,
            revoked: 0,
            _pad: [0; 6],
        };
        table.insert(fake(i), b, 0).unwrap();
    }

    // A second agent is turned down in so many words, and its command never runs.
    let ran = dir.join("ran");
    let out = agentwall_tests::node::launch_args(&node.socket, &cert, &key)
        .args(["/bin/sh", "-c", &format!("touch {}", ran.display())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let full = format!(
        "the datapath's binding table is full ({MAX_BINDINGS} cgroups bound): nothing was bound; a launched agent's binding is freed once all its processes have exited"
    );
    assert!(stderr.contains(&full), "{stderr}");
    assert!(!ran.exists(), "the refused command ran");
    // The bound agent keeps its verdicts.
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
    let text = scrape(addr);
    assert_eq!(
        metric(&text, "agentwall_map_fill_ratio", &[("map", "bindings")]),
        1.0
    );
    assert_eq!(
        metric(&text, "agentwall_session_rejections_total", &[]),
        1.0
    );
    let rejected = audit_records(&audit)
        .into_iter()
        .find(|r| r["kind"] == "identity" && r["event"] == "rejected")
        .expect("a rejected record");
    assert_eq!(rejected["op"], "launch");
    assert_eq!(rejected["identity"], ID);
    assert!(
        rejected["reason"].as_str().unwrap().ends_with(&full),
        "{rejected}"
    );

    // With room again, the same agent starts.
    for i in 0..others {
        table.remove(&fake(i)).unwrap();
    }
    let mut second = launch_probe(&node.socket, &cert, &key);
    assert_eq!(second.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(second.cmd("connect tcp 203.0.113.5 443"), "err EPERM");
}

/// The files of a policy directory, by path.
fn policy_files(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

#[test]
fn a_bundle_the_kernel_refuses_leaves_the_policy_files_in_force_for_a_restart() {
    use agentwall_tests::cp::{CpFixture, CpProc, node_args, push};
    let (env, tmp, ca) = setup("cp-refused", POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    // Held polls end within 2 s: a bundle served again reaches the node soon.
    fx.configure("poll_timeout_secs = 2\n", "");
    let server = CpProc::start(&fx, None);
    let flags = fx.node_flags(&server.url);
    // Every trie the node fills holds at most 1,000 entries: the kernel refuses more part
    // way through, as it would on ENOMEM.
    let small_tries = [(
        "AGENTWALL_FAILPOINTS",
        Path::new("trie-capacity=return(1000)"),
    )];
    let node = NodeProc::start_env(&env, dir, &node_args(&flags, &[]), &small_tries);
    let revision = push(&fx, &server.url, "v1", POLICY);
    let s = agentwall_tests::node::wait_status(&node.socket, "version 1 applied", |s| {
        s["control_plane"]["applied_version"] == 1
    });
    assert_eq!(s["revision"], revision.as_str());
    // Where the node keeps the bundles it takes, which a restart enforces.
    let bundles = dir.join("state/control-plane/policy");
    let in_force = policy_files(&bundles);
    assert_eq!(in_force.len(), 1, "{in_force:?}");

    let hosts: Vec<String> = (1..=2_000u32)
        .map(|i| format!("2001:db8::{:x}", i))
        .collect();
    let big = format!(
        "kind: AgentPolicy\nname: support\nidentity: {ID}\negress:\n  - to: [{}]\n    ports: [443]\n    protocol: tcp\n",
        hosts.join(", ")
    );
    push(&fx, &server.url, "v2", &big);
    let s = agentwall_tests::node::wait_status(&node.socket, "version 2 refused", |s| {
        s["control_plane"]["bundle_refused"]
            .as_str()
            .is_some_and(|r| r.starts_with("version 2: "))
    });
    let why = s["control_plane"]["bundle_refused"].as_str().unwrap();
    assert!(why.contains("filling the trie of identity "), "{why}");
    assert_eq!(s["revision"], revision.as_str());
    // The directory a restart enforces is the one in force, not the one refused.
    assert_eq!(policy_files(&bundles), in_force);
    node.stop();
    let addr = server.addr;
    drop(server);
    // Restarted with its control plane away: it enforces what it kept.
    let node = NodeProc::start_env(&env, dir, &node_args(&flags, &[]), &[]);
    let s = agentwall_tests::node::status_json(&node.socket);
    assert_eq!(s["revision"], revision.as_str());
    let (cert, key) = write_cert(dir, "good", &ca.issue(&CertSpec::agent(ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    drop(probe);
    node.stop();

    // Had the files in force not been put back (the disk failing at that moment), the
    // directory would hold the refused bundle: a restart the kernel refuses it on starts on
    // the last revision it took, says why, and does not try the refused one again.
    std::fs::write(in_force.keys().next().unwrap(), &big).unwrap();
    let at_start = [(
        "AGENTWALL_FAILPOINTS_AT_START",
        Path::new("trie-capacity=return(1000)"),
    )];
    let node = NodeProc::start_env(&env, dir, &node_args(&flags, &[]), &at_start);
    let s = agentwall_tests::node::status_json(&node.socket);
    assert_eq!(s["revision"], revision.as_str(), "{s}");
    let why = s["policy_error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("revision ")
            && why.contains(" refused: ")
            && why.contains("filling the trie of identity "),
        "{s}"
    );
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    assert_eq!(probe.cmd("connect tcp 2001:db8::1 443"), "err EPERM");
    // The control plane back: the node does not claim the refused bundle as applied, so it
    // is served again, refused again and said so; the revision in force stays.
    let _server = CpProc::start(&fx, Some(addr));
    let s = agentwall_tests::node::wait_status(&node.socket, "version 2 refused again", |s| {
        s["control_plane"]["bundle_refused"]
            .as_str()
            .is_some_and(|r| r.starts_with("version 2: ") && r.contains("filling the trie"))
    });
    assert_eq!(s["revision"], revision.as_str(), "{s}");
    assert_eq!(probe.cmd("connect tcp 2001:db8::1 443"), "err EPERM");
}
