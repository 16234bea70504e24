//! The Debian package as an operator meets it: installed into a clean Debian root, its
//! commands run there, its units accepted by systemd, removed and purged; and the alerting
//! rules and dashboard it ships checked against what a live node and control plane export.
//!
//! `cargo xtask test` builds the package (`cargo xtask package`), the clean root (mmdebstrap)
//! and promtool before the suite runs; a test that finds one missing fails saying so.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use agentwall_tests::{
    cp::{CpFixture, CpProc},
    node::{NodeProc, loopback_addr, setup, wait_status},
    require_root,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// A file `cargo xtask test` makes before the suite runs.
fn made_by_xtask(rel: &str) -> PathBuf {
    let p = workspace().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: `cargo xtask test` makes it before running the suite",
        p.display()
    );
    p
}

fn package() -> PathBuf {
    made_by_xtask(&format!(
        "target/debian/agentwall_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A clean Debian root unpacked into a temporary directory (removed on drop).
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn unpack() -> Self {
        let tar = made_by_xtask("target/tools/debian-bookworm-systemd.tar");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "unpacking the root: {}", text(&out));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `script` with `sh` inside the root, in a mount and network namespace of its own
    /// with proc, sysfs, cgroup2 and bpffs mounted fresh: what the package's scripts do
    /// (`agentwall down` on remove, say) reaches neither the host's pins nor its routes.
    fn sh(&self, script: &str) -> Output {
        Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", "--fork"])
            .args(["sh", "-ec"])
            .arg(
                r#"R="$1"; shift
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t bpf bpf "$R/sys/fs/bpf"
exec chroot "$R" /bin/sh -ec "$1""#,
            )
            .arg("sh")
            .arg(self.path())
            .arg(script)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .env_remove("AGENTWALL_LOG")
            .output()
            .unwrap()
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.status.success(), "{script}:\n{}", text(&out));
        text(&out)
    }

    /// Every path in the root but the pseudo file systems' mount points' contents and the
    /// package managers' own books (dpkg's database and logs, apt's and debconf's caches).
    fn files(&self) -> BTreeSet<String> {
        let skip = [
            "proc/",
            "sys/",
            "dev/",
            "run/",
            "tmp/",
            "var/lib/dpkg/",
            "var/log/",
            "var/cache/",
        ];
        let mut out = BTreeSet::new();
        let mut stack = vec![self.path().to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let rel = e
                    .path()
                    .strip_prefix(self.path())
                    .unwrap()
                    .display()
                    .to_string();
                let is_dir = e.file_type().unwrap().is_dir();
                if skip.iter().any(|s| format!("{rel}/").starts_with(s)) && rel.contains('/') {
                    continue;
                }
                out.insert(rel);
                if is_dir {
                    stack.push(e.path());
                }
            }
        }
        out
    }

    fn mode(&self, rel: &str) -> u32 {
        std::fs::metadata(self.path().join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    }
}

fn diff(before: &BTreeSet<String>, after: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        after.difference(before).cloned().collect(),
        before.difference(after).cloned().collect(),
    )
}

/// The package installs into a clean Debian root with its configuration, directories,
/// units, completions and man pages; its commands work there; `node --check-config` says
/// what stops the shipped config from starting and what the kernel offers; remove leaves
/// the conffiles only and purge leaves nothing.
#[test]
fn the_package_installs_into_a_clean_debian_root_and_purges_to_nothing() {
    require_root();
    let deb = package();
    let root = Root::unpack();
    let before = root.files();
    std::fs::copy(&deb, root.path().join("tmp/agentwall.deb")).unwrap();
    let ca = agentwall_tests::pki::Ca::new("agentwall package test CA");
    std::fs::write(root.path().join("tmp/ca.pem"), ca.pem()).unwrap();

    let out = root.sh_ok("dpkg -i /tmp/agentwall.deb");
    assert!(out.contains("Setting up agentwall"), "{out}");

    // What the package put where, with the modes the node and control plane rely on.
    let (added, removed) = diff(&before, &root.files());
    assert!(removed.is_empty(), "install removed {removed:?}");
    for p in [
        "usr/bin/agentwall",
        "etc/agentwall/agentwall.toml",
        "etc/agentwall/control-plane.toml",
        "etc/agentwall/policy",
        "usr/lib/systemd/system/agentwall-node.service",
        "usr/lib/systemd/system/agentwall-control-plane.service",
        "usr/share/bash-completion/completions/agentwall",
        "usr/share/zsh/vendor-completions/_agentwall",
        "usr/share/fish/vendor_completions.d/agentwall.fish",
        "usr/share/man/man1/agentwall.1.gz",
        "usr/share/man/man1/agentwall-node.1.gz",
        "usr/share/man/man1/agentwall-policy-check.1.gz",
        "usr/share/man/man1/agentwall-cp-revoke.1.gz",
        "usr/share/agentwall/prometheus/agentwall-alerts.yml",
        "usr/share/agentwall/grafana/agentwall-dashboard.json",
        "usr/share/doc/agentwall/examples/policy/example.yaml",
        "var/lib/agentwall",
        "var/lib/agentwall-control-plane",
    ] {
        assert!(
            added.contains(&p.to_owned()),
            "{p} not installed: {added:#?}"
        );
    }
    assert!(root.path().join("var/log/agentwall").is_dir());
    assert_eq!(root.mode("usr/bin/agentwall"), 0o755);
    assert_eq!(root.mode("etc/agentwall/agentwall.toml"), 0o644);
    assert_eq!(root.mode("etc/agentwall/control-plane.toml"), 0o640);
    assert_eq!(root.mode("var/lib/agentwall"), 0o700);
    assert_eq!(root.mode("var/lib/agentwall-control-plane"), 0o700);
    assert_eq!(root.mode("var/log/agentwall"), 0o755);
    let conffiles = root.sh_ok("cat /var/lib/dpkg/info/agentwall.conffiles");
    assert_eq!(
        conffiles.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "/etc/agentwall/agentwall.toml",
            "/etc/agentwall/control-plane.toml"
        ])
    );
    // A man page for every subcommand the binary has.
    let man = root.sh_ok("ls /usr/share/man/man1 | grep -c '^agentwall'");
    assert!(man.trim().parse::<u32>().unwrap() >= 30, "{man}");
    // The package's units are the repository's, not enabled (a node without a trust bundle
    // cannot start), and systemd accepts them.
    for unit in ["agentwall-node.service", "agentwall-control-plane.service"] {
        assert_eq!(
            std::fs::read(root.path().join("usr/lib/systemd/system").join(unit)).unwrap(),
            std::fs::read(workspace().join("packaging/systemd").join(unit)).unwrap()
        );
        let enabled = root.sh(&format!("systemctl is-enabled {unit}"));
        assert_eq!(
            String::from_utf8_lossy(&enabled.stdout).trim(),
            "disabled",
            "{}",
            text(&enabled)
        );
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(["agentwall-node.service", "agentwall-control-plane.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );

    let out = root.sh_ok("agentwall --version");
    assert_eq!(
        out.trim(),
        format!("agentwall {}", env!("CARGO_PKG_VERSION"))
    );
    let out = root.sh_ok("agentwall policy check /usr/share/doc/agentwall/examples/policy");
    assert!(
        out.contains("valid: 1 AgentPolicy, 1 Archetype") && out.contains("0 warning(s)"),
        "{out}"
    );
    // Completions load in bash.
    root.sh_ok(
        "bash -ec '. /usr/share/bash-completion/completions/agentwall; complete -p agentwall'",
    );

    // The shipped config as it is: it names no trust bundle, and the check says so (exit 1)
    // along with what the kernel offers.
    let out = root.sh("agentwall node --check-config");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("ERROR   trust bundle and CRLs: missing setting `trust_bundle`")
            && said.contains("ok      settings: no settings conflict")
            && said.contains("ok      policy: /etc/agentwall/policy: 0 AgentPolicy")
            && said.contains("ok      cgroup v2: mounted at /sys/fs/cgroup")
            && said.contains("BTF: ")
            && said.contains("BPF LSM: ")
            && said.contains("SO_PEERPIDFD: ")
            && said.contains("1 error(s): the node would not start as configured"),
        "{said}"
    );
    // With a trust bundle (the flag over the shipped file), it can start.
    let out = root.sh_ok(
        "agentwall node --config /etc/agentwall/agentwall.toml --check-config \
         --trust-bundle /tmp/ca.pem --trust-domain example.org",
    );
    assert!(
        out.contains("ok      trust bundle and CRLs: /tmp/ca.pem: 1 CA certificate(s)")
            && out.contains("the node can start as configured"),
        "{out}"
    );
    // A broken policy is an error with its place.
    std::fs::write(
        root.path().join("etc/agentwall/policy/bad.yaml"),
        "kind: AgentPolicy\nname: x\nidentity: spiffe://example.org/a\negress:\n  - to: [192.0.2.1]\n    ports: [70000]\n",
    )
    .unwrap();
    let out = root.sh("agentwall node --check-config --trust-bundle /tmp/ca.pem");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("ERROR   policy: /etc/agentwall/policy: 1 error(s)")
            && text(&out).contains("/etc/agentwall/policy/bad.yaml:6:"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(root.path().join("etc/agentwall/policy/bad.yaml")).unwrap();

    let out = root.sh_ok("agentwall down");
    assert!(
        out.contains("agentwall: nothing pinned under /sys/fs/bpf/agentwall"),
        "{out}"
    );
    // A config with a typo: commands that only need the node's socket say so and go on with
    // the built-in path (an emergency `revoke` must not fail on it); `down` does not guess
    // the pins, and the package's removal says it could not detach them.
    std::fs::write(
        root.path().join("etc/agentwall/agentwall.toml"),
        "socket = [\n",
    )
    .unwrap();
    let out = root.sh("agentwall status");
    assert!(
        !out.status.success()
            && text(&out).contains("agentwall.toml:1:11: unclosed array")
            && text(&out).contains("using the built-in paths")
            && text(&out).contains("/run/agentwall/agentwall.sock"),
        "{}",
        text(&out)
    );

    // Remove: the conffiles stay, and nothing else of the package.
    let out = root.sh("agentwall down");
    assert!(
        !out.status.success() && text(&out).contains("agentwall.toml:1:11: unclosed array"),
        "{}",
        text(&out)
    );
    let out = root.sh_ok("dpkg -r agentwall");
    assert!(out.contains("Removing agentwall"), "{out}");
    assert!(
        out.contains("agentwall: could not detach the datapath"),
        "{out}"
    );
    let (added, removed) = diff(&before, &root.files());
    assert!(removed.is_empty(), "remove took {removed:?}");
    // deb-systemd-helper masks a removed package's units (links to /dev/null, lifted on
    // purge) so that its leftover configuration cannot start them; it keeps its books under
    // var/lib/systemd.
    let masks = [
        "etc/systemd/system/agentwall-control-plane.service",
        "etc/systemd/system/agentwall-node.service",
    ];
    for m in masks {
        assert_eq!(
            std::fs::read_link(root.path().join(m)).ok(),
            Some(PathBuf::from("/dev/null")),
            "{m}"
        );
    }
    let added: Vec<&str> = added
        .iter()
        .map(String::as_str)
        .filter(|p| !p.starts_with("var/lib/systemd/deb-systemd-helper-") && !masks.contains(p))
        .collect();
    assert_eq!(
        added,
        [
            "etc/agentwall",
            "etc/agentwall/agentwall.toml",
            "etc/agentwall/control-plane.toml"
        ],
        "after remove"
    );
    // Purge: nothing.
    root.sh_ok("dpkg -P agentwall");
    let (added, removed) = diff(&before, &root.files());
    assert!(
        added.is_empty() && removed.is_empty(),
        "after purge: added {added:#?}, removed {removed:#?}"
    );
}

/// `agentwall_…` names in a rules file or dashboard.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("agentwall_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer identifier (a job name such as `agentwall-node` has no `_`).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// Every metric a Prometheus text page declares or samples (a histogram's series too).
fn exported(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in page.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut w = decl.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            out.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

fn node_page(addr: std::net::SocketAddr) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agentwall\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// promtool accepts the alerting rules, and every metric the rules and the Grafana dashboard
/// name is one a live node (linked to a control plane, metrics on) and that control plane
/// export: a renamed metric cannot leave an alert that never fires.
#[test]
fn the_alerting_rules_and_dashboard_name_only_metrics_a_live_node_and_control_plane_export() {
    require_root();
    let rules = workspace().join("packaging/prometheus/agentwall-alerts.yml");
    let dashboard = workspace().join("packaging/grafana/agentwall-dashboard.json");
    let promtool = made_by_xtask("target/tools/prometheus/usr/bin/promtool");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool: {}",
        text(&out)
    );
    let board: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dashboard).unwrap()).expect("dashboard JSON");
    assert!(board["panels"].as_array().is_some_and(|p| !p.is_empty()));

    let (env, tmp, _ca) = setup("package-metrics", "");
    let dir = tmp.path();
    let fx = CpFixture::new(dir);
    let server = CpProc::start(&fx, None);
    let addr = loopback_addr();
    let mut args = fx.node_flags(&server.url);
    args.extend(["--metrics-listen".to_owned(), addr.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = NodeProc::start_with(&env, dir, &args);
    wait_status(&node.socket, "the control plane link up", |s| {
        s["control_plane"]["connected"] == true
    });
    let mut live = exported(&node_page(addr));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = fx.client(&server.url, None, Some(&fx.security_token));
    let (status, body, _) = rt
        .block_on(client.request(
            hyper::Method::GET,
            "/v1/metrics",
            None,
            Duration::from_secs(30),
        ))
        .unwrap();
    assert!(status.is_success(), "{status}");
    live.extend(exported(&String::from_utf8_lossy(&body)));

    for (file, used) in [
        (
            &rules,
            metric_names(&std::fs::read_to_string(&rules).unwrap()),
        ),
        (
            &dashboard,
            metric_names(&std::fs::read_to_string(&dashboard).unwrap()),
        ),
    ] {
        assert!(used.len() > 10, "{}: {used:?}", file.display());
        let missing: Vec<&String> = used.difference(&live).collect();
        assert!(
            missing.is_empty(),
            "{} names metrics no live node or control plane exports: {missing:?}\nexported: {live:#?}",
            file.display()
        );
    }
}
