//! Signed bundles and the two-person rule, with the real control plane and a real node: the
//! node applies only bundles enough of its trusted signers signed, never one older than what
//! it applied nor one past its expiry, whatever the control plane serves; the control plane
//! holds a push short of its approvals as a proposal until others approve it.

use agentwall::control_plane::{
    BundleFile,
    signing::{Signing, sign},
    store::{SqliteStore, Store as _},
};
use agentwall_tests::{
    cp::{CpFixture, CpProc, POLICY_B, admin_creds, cp, node_args},
    node::{
        NodeProc, SUPPORT_ID, SUPPORT_POLICY, launch_probe, setup, status_json, wait_status,
        write_cert,
    },
    pki::{CertSpec, signing_keypair as keypair},
};

/// `agentwall cp policy ARGS` as the admin: (success, stdout, stderr).
fn policy(fx: &CpFixture, url: &str, args: &[&str]) -> (bool, String, String) {
    let admin = admin_creds(fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let mut all = vec!["policy"];
    all.extend_from_slice(args);
    let out = cp(fx, url, &admin, &all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A policy directory holding `text`.
fn dir_of(fx: &CpFixture, name: &str, text: &str) -> String {
    let d = fx.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("agents.yaml"), text).unwrap();
    d.display().to_string()
}

/// The node's reason for refusing the newest bundle, once it says one containing `what`.
fn refused(node: &NodeProc, what: &str) -> String {
    let st = wait_status(&node.socket, &format!("a bundle refused: {what}"), |s| {
        s["control_plane"]["bundle_refused"]
            .as_str()
            .is_some_and(|r| r.contains(what))
    });
    st["control_plane"]["bundle_refused"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn applied(node: &NodeProc, version: u64) -> serde_json::Value {
    wait_status(&node.socket, &format!("version {version} applied"), |s| {
        s["control_plane"]["applied_version"] == version
            && s["control_plane"].get("bundle_refused").is_none()
    })
}

/// The control plane's database, changed while it is down (what a hostile control plane,
/// or whoever holds its database, can do): `sql` run as is.
fn tamper(fx: &CpFixture, sql: &str) {
    let db = rusqlite::Connection::open(fx.dir.join("db/cp.db")).unwrap();
    db.execute_batch(sql).unwrap();
}

#[test]
fn a_node_applies_only_what_its_signers_signed_and_never_an_older_or_expired_bundle() {
    let (env, tmp, _ca) = setup("cp-signed", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let (alice, alice_pub) = keypair(dir, "alice");
    let (bob, bob_pub) = keypair(dir, "bob");
    let (eve, _) = keypair(dir, "eve");
    fx.configure(
        "approvals_required = 1\n",
        &format!(
            "[signers]\n\"alice@example.org\" = \"{}\"\n\"bob@example.org\" = \"{}\"\n",
            alice_pub.display(),
            bob_pub.display()
        ),
    );
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let flags = fx.node_flags(&url);
    let signers = [
        "--trusted-signer",
        alice_pub.to_str().unwrap(),
        "--trusted-signer",
        bob_pub.to_str().unwrap(),
        "--signatures-required",
        "2",
    ];
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &signers));
    let (alice, bob, eve) = (
        alice.to_str().unwrap(),
        bob.to_str().unwrap(),
        eve.to_str().unwrap(),
    );

    // One signature is enough for this control plane, not for the node: refused, said why,
    // and the control plane hears it in the node's poll.
    let v1 = dir_of(&fx, "v1", SUPPORT_POLICY);
    let (ok, out, err) = policy(&fx, &url, &["push", &v1, "--sign-key", alice]);
    assert!(ok && out.starts_with("pushed version 1 "), "{out}{err}");
    let why = refused(&node, "needs 2");
    assert!(
        why.starts_with("version 1: 1 valid signature(s) from keys this node trusts ("),
        "{why}"
    );
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        0
    );

    // Two signers: applied.
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v1, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(ok && out.starts_with("pushed version 2 "), "{out}{err}");
    applied(&node, 2);

    // A control plane that asks for no approvals (or another in its place) publishes an
    // unsigned push as it is: the node refuses it. One that asks for one holds it as a
    // proposal.
    let v3 = dir_of(&fx, "v3", POLICY_B);
    let (ok, out, err) = policy(&fx, &url, &["push", &v3]);
    assert!(ok && out.starts_with("proposal 1 revision "), "{out}{err}");
    let addr = server.addr;
    drop(server);
    let server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "0"]);
    let (ok, out, err) = policy(&fx, &url, &["push", &v3]);
    assert!(ok && out.starts_with("pushed version 3 "), "{out}{err}");
    assert!(refused(&node, "version 3:").contains("is not signed"));

    // Two approvals required: a push signed once is a proposal, published only when a
    // second signer approves it; a stranger's key and a second signature by the same key
    // are refused.
    drop(server);
    let server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "2"]);
    let v4 = dir_of(&fx, "v4", POLICY_B);
    let (ok, out, err) = policy(&fx, &url, &["push", &v4, "--sign-key", alice]);
    assert!(
        ok && out.starts_with("proposal 2 revision ") && out.contains(": 1 of 2 signature(s)"),
        "{out}{err}"
    );
    let (ok, out, _) = policy(&fx, &url, &["proposals"]);
    assert!(
        ok && out.contains("awaiting approvals; signed by alice@example.org\nproposal 1 "),
        "{out}"
    );
    // The approver names the whole hash of what they reviewed; nothing else is signed.
    let (ok, out, _) = policy(&fx, &url, &["proposals", "--id", "2"]);
    let sha = out
        .lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert!(ok && sha.len() == 64, "{out}");
    let other = "0".repeat(64);
    let approve = |key: &str, sha: &str| {
        let (a, b) = (alice_pub.to_str().unwrap(), bob_pub.to_str().unwrap());
        policy(
            &fx,
            &url,
            &[
                "approve",
                "2",
                "--sign-key",
                key,
                "--sha256",
                sha,
                "--trusted-signer",
                a,
                "--trusted-signer",
                b,
            ],
        )
    };
    let (ok, _, err) = approve(bob, &other);
    assert!(!ok && err.contains("not the 0000"), "{err}");
    let (ok, _, err) = approve(eve, &sha);
    assert!(!ok && err.contains("not one of the signers' keys"), "{err}");
    let (ok, _, err) = approve(alice, &sha);
    assert!(!ok && err.contains("proposal 2 is signed by key"), "{err}");
    // A control plane that dates the proposal ahead (nodes would take it only then, over
    // whatever was pushed meanwhile: a rollback in waiting) gets no signature.
    drop(server);
    let db = rusqlite::Connection::open(fx.dir.join("db/cp.db")).unwrap();
    let dated: String = db
        .query_row("SELECT signing FROM proposals WHERE id = 2", [], |r| {
            r.get(0)
        })
        .unwrap();
    db.execute(
        "UPDATE proposals SET signing = json_set(signing, '$.not_before', '2099-01-01T00:00:00.000Z') WHERE id = 2",
        [],
    )
    .unwrap();
    let server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "2"]);
    let (ok, _, err) = approve(bob, &sha);
    assert!(
        !ok && err.contains("proposal 2 is not signed")
            && err.contains(
                "valid from 2099-01-01T00:00:00.000Z, more than 300 s ahead of this clock"
            ),
        "{err}"
    );
    // Nor one whose times no trusted signer signed: here said to add grants to a bundle
    // (what would let a node take it over rules as old as that), breaking the pusher's
    // signature.
    drop(server);
    db.execute(
        "UPDATE proposals SET signing = json_set(?1, '$.adds_to', json_extract(?1, '$.not_before')) WHERE id = 2",
        [&dated],
    )
    .unwrap();
    let server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "2"]);
    let (ok, _, err) = approve(bob, &sha);
    assert!(
        !ok && err.contains("proposal 2 (pushed by ")
            && err.contains("carries no signature by a --trusted-signer key that verifies for its files and times"),
        "{err}"
    );
    drop(server);
    db.execute("UPDATE proposals SET signing = ?1 WHERE id = 2", [dated])
        .unwrap();
    drop(db);
    let server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "2"]);
    let (ok, out, err) = approve(bob, &sha);
    assert!(ok && out.starts_with("published version 4 "), "{out}{err}");
    let st = applied(&node, 4);
    let rev4 = st["revision"].as_str().unwrap().to_owned();
    let (ok, _, err) = approve(bob, &sha);
    assert!(!ok && err.contains("was approved already"), "{err}");

    // A bundle that expires in a few seconds, signed by both: in force for now.
    let v5 = dir_of(&fx, "v5", SUPPORT_POLICY);
    let (ok, out, err) = policy(
        &fx,
        &url,
        &[
            "push",
            &v5,
            "--sign-key",
            alice,
            "--sign-key",
            bob,
            "--expires-in",
            "3s",
        ],
    );
    assert!(ok && out.starts_with("pushed version 5 "), "{out}{err}");
    let st = applied(&node, 5);
    assert_ne!(st["revision"], rev4.as_str());

    // The control plane serves version 2 again, renumbered above the rest: genuinely
    // signed, but older than what the node applied.
    drop(server);
    tamper(&fx, "UPDATE policy SET version = 20 WHERE version = 2");
    let server = CpProc::start(&fx, Some(addr));
    let why = refused(&node, "version 20:");
    assert!(why.contains("a bundle is never rolled back"), "{why}");
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        5
    );
    // An admin asked for a grant is given that old bundle as the newest: its signatures
    // check out, so both sign the grant on top of it. Signed as added to that bundle, it is
    // refused by the node, which applied a newer one: the old rules do not come back.
    let mut args = vec!["--for", "30m", "--sign-key", alice, "--sign-key", bob];
    args.extend_from_slice(&signers[..4]);
    let (ok, out, err) = grant(&fx, &url, "198.51.100.10", &args);
    assert!(ok && out.contains("published version 21 "), "{out}{err}");
    assert!(err.contains("adding the grant to version 20 "), "{err}");
    let why = refused(&node, "version 21:");
    assert!(
        why.contains("adds grants to a bundle valid from ")
            && why.contains("its other rules would roll back"),
        "{why}"
    );
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        5
    );
    // The refused version 21 is now the newest, signed and dated now: a grant on top of it
    // is signed as added to the old bundle under it, and refused the same way.
    let (ok, out, err) = grant(&fx, &url, "198.51.100.11", &args);
    assert!(ok && out.contains("published version 22 "), "{out}{err}");
    assert!(
        err.contains("adding the grant to version 21 ")
            && err.contains(", itself grants on the bundle valid from "),
        "{err}"
    );
    let why = refused(&node, "version 22:");
    assert!(why.contains("its other rules would roll back"), "{why}");
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        5
    );

    // And version 5 once it has expired, as if new.
    drop(server);
    let expiry = std::time::SystemTime::now() + std::time::Duration::from_secs(4);
    // Waiting for a time to pass, not for an event: nothing signals an expiry.
    while std::time::SystemTime::now() < expiry {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tamper(&fx, "UPDATE policy SET version = 30 WHERE version = 5");
    let _server = CpProc::start(&fx, Some(addr));
    let why = refused(&node, "version 30:");
    assert!(why.contains("the bundle expired at"), "{why}");
    let st = status_json(&node.socket);
    assert_eq!(st["control_plane"]["applied_version"], 5);

    // A node that cannot keep the rollback floor a bundle sets (its state unwritable: a
    // full disk, say) does not apply the bundle: after a restart it would take an older one.
    let link = dir.join("state/control-plane/link.json");
    std::fs::remove_file(&link).unwrap();
    std::fs::create_dir_all(link.join("in-the-way")).unwrap();
    let v6 = dir_of(&fx, "v6", POLICY_B);
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v6, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(ok && out.starts_with("pushed version 31 "), "{out}{err}");
    let why = refused(&node, "version 31:");
    assert!(
        why.contains("keeping its signed not_before (the rollback floor) in "),
        "{why}"
    );
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        5
    );

    // A state that cannot be read after a restart: the floor it held is unknown, so the
    // node takes only bundles signed from then on, never any older one.
    node.stop();
    std::fs::remove_dir_all(&link).unwrap();
    std::fs::write(&link, "{ damaged").unwrap();
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &signers));
    let why = refused(&node, "version 31:");
    assert!(why.contains("a bundle is never rolled back"), "{why}");
    let v7 = dir_of(&fx, "v7", SUPPORT_POLICY);
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v7, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(ok && out.starts_with("pushed version 32 "), "{out}{err}");
    applied(&node, 32);

    // Whoever holds the database numbers the bundle in force near the end of the numbers:
    // the node takes it (it is the bundle it applied). Once the database is put right, the
    // next bundle is numbered far below that, but signed later: applied, not frozen out.
    drop(_server);
    let top = i64::MAX as u64;
    tamper(
        &fx,
        &format!("UPDATE policy SET version = {top} WHERE version = 32"),
    );
    let server = CpProc::start(&fx, Some(addr));
    applied(&node, top);
    drop(server);
    tamper(
        &fx,
        &format!("UPDATE policy SET version = 32 WHERE version = {top}"),
    );
    let _server = CpProc::start(&fx, Some(addr));
    let v8 = dir_of(&fx, "v8", POLICY_B);
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v8, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(ok && out.starts_with("pushed version "), "{out}{err}");
    let v: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(v < top, "{out}");
    applied(&node, v);

    // A grant written by hand to last a month, signed by both: the control plane refuses it
    // (temporary access is not a standing rule)...
    let month = agentwall::clock::rfc3339(
        std::time::SystemTime::now() + std::time::Duration::from_secs(30 * 24 * 3600),
    );
    let long = format!(
        "kind: Grant\nname: grant-1\nidentity: {SUPPORT_ID}\nreason: r\nuntil: {month}\negress:\n  - to: [198.51.100.10]\n"
    );
    let v9 = dir_of(&fx, "v9", SUPPORT_POLICY);
    std::fs::write(fx.dir.join("v9/grant-1.yaml"), &long).unwrap();
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v9, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(
        !ok && err.contains(&format!(
            "grant-1.yaml:1:1: grant \"grant-1\" lasts until {month}, more than 7 days"
        )),
        "{out}{err}"
    );
    // ...and when whoever holds its database publishes it anyway, the node measures the
    // grant from the time its signers signed, and refuses it too.
    drop(_server);
    let pushed = signed_into_database(
        &fx,
        &[("agents.yaml", SUPPORT_POLICY), ("grant-1.yaml", &long)],
        None,
        &[alice, bob],
    );
    let _server = CpProc::start(&fx, Some(addr));
    let why = refused(&node, &format!("version {pushed}:"));
    assert!(
        why.contains("grant \"grant-1\" lasts until ") && why.contains("more than 7 days"),
        "{why}"
    );
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        v
    );

    // Both sign, as grants on the bundle in force, files whose rules are not that bundle's
    // (what a made-up base would give): the node compares them with the files in force.
    drop(_server);
    let store = SqliteStore::open(&fx.dir.join("db/cp.db"), Default::default()).unwrap();
    let base = store.policy(Some(v)).unwrap().unwrap();
    drop(store);
    let grant = format!(
        "kind: Grant\nname: grant-2\nidentity: {SUPPORT_ID}\nreason: r\nuntil: {}\negress:\n  - to: [198.51.100.10]\n",
        agentwall::clock::rfc3339(
            std::time::SystemTime::now() + std::time::Duration::from_secs(600)
        )
    );
    assert_ne!(base.files[0].text, SUPPORT_POLICY);
    let made_up = signed_into_database(
        &fx,
        &[("agents.yaml", SUPPORT_POLICY), ("grant-2.yaml", &grant)],
        base.signing.not_before.clone(),
        &[alice, bob],
    );
    let _server = CpProc::start(&fx, Some(addr));
    let why = refused(&node, &format!("version {made_up}:"));
    assert!(
        why.contains("it adds grants to the bundle under the one in force, but is more than that bundle with grants: agents.yaml of the bundle in force is changed or gone"),
        "{why}"
    );

    // A state deleted beside the bundles the node kept: as unreadable, the floor it held is
    // unknown, so nothing signed before the restart is taken.
    node.stop();
    std::fs::remove_file(&link).unwrap();
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &signers));
    let why = refused(&node, &format!("version {made_up}:"));
    assert!(why.contains("a bundle is never rolled back"), "{why}");
}

/// A bundle of `files` (name, text), dated now, adding grants to `adds_to`, signed with
/// `keys`, stored in the control plane's database by hand (while it is down), as whoever
/// holds the database would store what admins signed: its version.
fn signed_into_database(
    fx: &CpFixture,
    files: &[(&str, &str)],
    adds_to: Option<String>,
    keys: &[&str],
) -> u64 {
    let files: Vec<BundleFile> = files
        .iter()
        .map(|(name, text)| BundleFile {
            name: (*name).into(),
            text: (*text).to_owned(),
        })
        .collect();
    let set = agentwall::control_plane::validate(&files).unwrap();
    let mut signing = Signing {
        not_before: Some(agentwall::clock::now_rfc3339()),
        adds_to,
        ..Default::default()
    };
    for key in keys {
        let s = sign(std::path::Path::new(key), &set.digest, &signing).unwrap();
        signing.signatures.push(s);
    }
    let store = SqliteStore::open(&fx.dir.join("db/cp.db"), Default::default()).unwrap();
    store
        .push_policy(&set.revision, &files, "db holder", 0, None, &signing)
        .unwrap()
        .version
}

/// `agentwall cp grant` as the admin, for the support agent: (success, stdout, stderr).
fn grant(fx: &CpFixture, url: &str, dest: &str, extra: &[&str]) -> (bool, String, String) {
    let admin = admin_creds(fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let mut args = vec![
        "grant",
        "--identity",
        SUPPORT_ID,
        "--to",
        dest,
        "--ports",
        "443",
        "--protocol",
        "tcp",
        "--reason",
        "sev1: the payments API is down",
    ];
    args.extend_from_slice(extra);
    let out = cp(fx, url, &admin, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_break_glass_grant_applies_at_once_on_one_signature_and_nothing_else_does() {
    let (env, tmp, ca) = setup("cp-glass", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let (alice, alice_pub) = keypair(dir, "alice");
    let (bob, bob_pub) = keypair(dir, "bob");
    fx.configure(
        "approvals_required = 2\nbreak_glass_approvals = 1\n",
        &format!(
            "[signers]\n\"alice@example.org\" = \"{}\"\n\"bob@example.org\" = \"{}\"\n",
            alice_pub.display(),
            bob_pub.display()
        ),
    );
    let server = CpProc::start(&fx, None);
    let (url, addr) = (server.url.clone(), server.addr);
    let flags = fx.node_flags(&url);
    let signers = [
        "--trusted-signer",
        alice_pub.to_str().unwrap(),
        "--trusted-signer",
        bob_pub.to_str().unwrap(),
        "--signatures-required",
        "2",
        "--break-glass-signatures",
        "1",
    ];
    let node = NodeProc::start_with(&env, dir, &node_args(&flags, &signers));
    let (alice, bob) = (alice.to_str().unwrap(), bob.to_str().unwrap());
    let v1 = dir_of(&fx, "v1", SUPPORT_POLICY);
    let (ok, out, err) = policy(
        &fx,
        &url,
        &["push", &v1, "--sign-key", alice, "--sign-key", bob],
    );
    assert!(ok && out.starts_with("pushed version 1 "), "{out}{err}");
    applied(&node, 1);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(SUPPORT_ID)));
    let mut probe = launch_probe(&node.socket, &cert, &key);
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");

    // One admin, in an emergency: published and applied at once, flagged as break-glass.
    let both = [
        "--trusted-signer",
        alice_pub.to_str().unwrap(),
        "--trusted-signer",
        bob_pub.to_str().unwrap(),
    ];
    // Signing the control plane's files needs them checked first, as a node checks them.
    let (ok, _, err) = grant(
        &fx,
        &url,
        "198.51.100.10",
        &["--for", "30m", "--break-glass", "--sign-key", alice],
    );
    assert!(!ok && err.contains("needs --trusted-signer KEY"), "{err}");
    let mut args = vec!["--for", "30m", "--break-glass", "--sign-key", alice];
    args.extend_from_slice(&both);
    let (ok, out, err) = grant(&fx, &url, "198.51.100.10", &args);
    assert!(ok && out.contains("published version 2 "), "{out}{err}");
    applied(&node, 2);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let listed = String::from_utf8_lossy(&cp(&fx, &url, &admin, &["grants"]).stdout).into_owned();
    assert!(
        listed.contains("(in force, break-glass): 198.51.100.10/32 ports 443 protocol tcp"),
        "{listed}"
    );
    let review =
        String::from_utf8_lossy(&cp(&fx, &url, &admin, &["report", "grants"]).stdout).into_owned();
    assert!(
        review.contains("pushed in version 2 at ")
            && review.contains("; signed by alice@example.org\n"),
        "{review}"
    );

    // Not break-glass: it waits for a second approval. Longer than break-glass lasts:
    // refused.
    // The newest bundle has one signature: checked as a node checks it, as break-glass
    // grants added to version 1, which both signed.
    let mut args = vec!["--for", "30m", "--sign-key", alice];
    args.extend_from_slice(&both);
    let (ok, _, err) = grant(&fx, &url, "198.51.100.11", &args);
    assert!(
        !ok && err.contains("1 valid signature(s) from keys this node trusts"),
        "{err}"
    );
    args.extend(["--break-glass-signatures", "1"]);
    let (ok, out, err) = grant(&fx, &url, "198.51.100.11", &args);
    assert!(ok && out.contains("proposal 1 revision "), "{out}{err}");
    let (ok, _, err) = grant(
        &fx,
        &url,
        "198.51.100.11",
        &["--for", "5h", "--break-glass"],
    );
    assert!(!ok && err.contains("at most 4 hours"), "{err}");

    // A control plane that publishes on one signature (or whoever holds its database): the
    // node judges the files itself. A changed policy, or a grant that is not break-glass,
    // on one signature is refused, and the break-glass grant stays in force.
    drop(server);
    let _server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "0"]);
    let (ok, out, err) = grant(&fx, &url, "198.51.100.12", &args);
    assert!(ok && out.contains("published version 3 "), "{out}{err}");
    let why = refused(&node, "version 3:");
    assert!(
        why.contains("too few signatures for a bundle, and not one for break-glass: ")
            && why.contains(" holds something other than break-glass grants"),
        "{why}"
    );
    let wide = dir_of(
        &fx,
        "wide",
        &SUPPORT_POLICY.replace("192.0.2.0/24", "0.0.0.0/0"),
    );
    let (ok, out, err) = policy(&fx, &url, &["push", &wide, "--sign-key", alice]);
    assert!(ok && out.starts_with("pushed version 4 "), "{out}{err}");
    let why = refused(&node, "version 4:");
    assert!(
        why.contains("it is not signed as grants added to the bundle in force (adds_to)"),
        "{why}"
    );
    assert_eq!(probe.cmd("connect tcp 198.51.100.12 443"), "err EPERM");
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    assert_eq!(
        status_json(&node.socket)["control_plane"]["applied_version"],
        2
    );
    // Nor does the admin's CLI take version 4 for a base: one signature, and more than
    // break-glass grants added to version 1.
    let (ok, _, err) = grant(&fx, &url, "198.51.100.13", &args);
    assert!(
        !ok && err.contains(
            "version 4 has 1+ signatures but fewer than 2, and it is not version 1 (the newest with all of them) with break-glass grants added"
        ),
        "{err}"
    );

    // The refused versions gone: both push version 1's files again, and the break-glass
    // grant in force is carried over, signed as carried from the bundle the node stands
    // on: applied, the grant still in force.
    drop(_server);
    tamper(&fx, "DELETE FROM policy WHERE version > 2");
    let _server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "0"]);
    let mut push = vec!["push", &v1, "--sign-key", alice, "--sign-key", bob];
    push.extend_from_slice(&both);
    push.extend(["--break-glass-signatures", "1"]);
    let pushed = |args: &[&str]| {
        let (ok, out, err) = policy(&fx, &url, args);
        assert!(ok && out.starts_with("pushed version "), "{out}{err}");
        let v: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
        (v, err)
    };
    let (v, err) = pushed(&push);
    assert!(err.contains("carrying over grant-"), "{err}");
    applied(&node, v);
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.10 443"),
        "err ENETUNREACH"
    );
    // The admins end the grant early.
    let mut drop_grants = push.clone();
    drop_grants.push("--drop-grants");
    let (ended, _) = pushed(&drop_grants);
    applied(&node, ended);
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
    // Whoever holds the database shows version 2 (the grant not yet past its deadline) as
    // the newest: it checks out as break-glass grants on the newest fully signed bundle, so
    // the next push carries the grant over. Signed as carried from a bundle older than the
    // one the node stands on, it is refused: the ended grant does not come back.
    drop(_server);
    tamper(
        &fx,
        &format!(
            "UPDATE policy SET version = {} WHERE version = 2",
            ended + 1
        ),
    );
    let _server = CpProc::start_with(&fx, Some(addr), "cp", &["--approvals-required", "0"]);
    let (v, err) = pushed(&push);
    assert!(err.contains("carrying over grant-"), "{err}");
    let why = refused(&node, &format!("version {v}:"));
    assert!(why.contains("grants ended since could come back"), "{why}");
    assert_eq!(probe.cmd("connect tcp 198.51.100.10 443"), "err EPERM");
}

/// `agentwall cp revoke ID` as the admin: the generation it was given.
fn revoke(fx: &CpFixture, url: &str, identity: &str) -> u64 {
    let admin = admin_creds(fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp(fx, url, &admin, &["revoke", identity, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    said["generation"].as_u64().unwrap()
}

/// Whether a node's status lists `id` as revoked.
fn revoked(id: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |s| {
        s["revoked"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == id))
    }
}

/// The revocation generation a node keeps.
fn kept_generation(dir: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("state/control-plane/link.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["revocation_gen"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_revocation_list_numbered_near_the_end_once_leaves_no_answer_looking_old() {
    let (env, tmp, _ca) = setup("cp-generation", SUPPORT_POLICY);
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    // Held polls end within 2 s: an answer carries the revocation list soon.
    fx.configure("poll_timeout_secs = 2\n", "");
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let addr = server.addr;
    let node = NodeProc::start_with(&env, dir, &node_args(&fx.node_flags(&url), &[]));
    let (first, second) = (
        "spiffe://example.org/agent/first",
        "spiffe://example.org/agent/second",
    );
    assert_eq!(revoke(&fx, &url, first), 1);
    wait_status(&node.socket, "the first revocation", revoked(first));

    // Whoever holds the database numbers the list near the end of the numbers, once.
    drop(server);
    let top = 9_000_000_000_000_000_000u64;
    tamper(
        &fx,
        &format!("UPDATE revocations SET generation = {top} WHERE generation = 1"),
    );
    let server = CpProc::start(&fx, Some(addr));
    agentwall_tests::node::eventually(
        "the node taking the list numbered near the end",
        std::time::Duration::from_secs(30),
        || match kept_generation(dir) {
            n if n == top => Ok(()),
            n => Err(format!("{n}")),
        },
    );
    drop(server);
    tamper(
        &fx,
        &format!("UPDATE revocations SET generation = 1 WHERE generation = {top}"),
    );
    // Put right, the next revocation is numbered far below it: applied, and its number
    // taken, so the control plane's answers are not older news for good.
    let _server = CpProc::start(&fx, Some(addr));
    let g = revoke(&fx, &url, second);
    assert!(g < top, "{g}");
    wait_status(&node.socket, "the second revocation", revoked(second));
    agentwall_tests::node::eventually(
        "the node keeping the list's number",
        std::time::Duration::from_secs(30),
        || match kept_generation(dir) {
            n if n == g => Ok(()),
            n => Err(format!("{n}")),
        },
    );
    assert!(revoked(first)(&status_json(&node.socket)));

    // A control plane's answer can put junk in what a node keeps and sends back (a lineage
    // that is none, an error as long as a poll may be): the node cleans it when it starts,
    // and a control plane answers a junk lineage as another database's, never refusing the
    // poll, so no node is kept away for good.
    node.stop();
    let link = dir.join("state/control-plane/link.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&link).unwrap()).unwrap();
    state["lineage"] = "zzz".into();
    state["error"] = "x".repeat(70_000).into();
    state["known_version"] = top.into();
    std::fs::write(&link, state.to_string()).unwrap();
    let node = NodeProc::start_with(&env, dir, &node_args(&fx.node_flags(&url), &[]));
    let third = "spiffe://example.org/agent/third";
    revoke(&fx, &url, third);
    wait_status(&node.socket, "the third revocation", revoked(third));
    // The numbers that came with the junk lineage are dropped with it: the next bundle,
    // numbered far below them, is taken.
    agentwall_tests::cp::push(&fx, &url, "v1", SUPPORT_POLICY);
    wait_status(&node.socket, "version 1 applied", |s| {
        s["control_plane"]["applied_version"] == 1
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = fx.node_client(&url, "other");
    let reply: agentwall::control_plane::PollReply = rt
        .block_on(other.send_json(
            hyper::Method::POST,
            "/v1/node/poll",
            &agentwall::control_plane::PollRequest {
                known_version: 5,
                revocation_gen: 5,
                lineage: Some("zzz".into()),
                ..Default::default()
            },
            std::time::Duration::from_secs(10),
        ))
        .unwrap();
    assert!(
        reply
            .lineage
            .as_deref()
            .is_some_and(agentwall::control_plane::is_lineage)
            && reply.revoked.len() == 3,
        "{reply:?}"
    );
}
