//! `agentwall policy check` and `agentwall policy test`, driven through the real binary.

use std::{path::Path, process::Command};

use agentwall_tests::bin_path;

const POLICY: &str = "\
kind: Archetype
name: llm-apis
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
---
kind: AgentPolicy
name: support-bot
identity: spiffe://example.org/agent/support
extends: [llm-apis]
egress:
  - to: [198.51.100.0/24]
    ports: [\"8000-8100\"]
  - to: [\"::/0\"]
    ports: [53]
    protocol: udp
owner: support-team@example.com
";

const SCENARIOS: &str = "\
- name: reaches the API
  identity: spiffe://example.org/agent/support
  to: 192.0.2.10
  port: 443
  protocol: tcp
  expect: allow
- name: range edge
  identity: spiffe://example.org/agent/support
  to: 198.51.100.1
  port: 8101
  protocol: tcp
  expect: deny
- name: metadata endpoint
  identity: spiffe://example.org/agent/support
  to: 169.254.169.254
  port: 80
  protocol: tcp
  expect: deny
";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn agentwall(args: &[&str]) -> Out {
    let o = Command::new(bin_path("agentwall"))
        .args(args)
        .output()
        .expect("run agentwall");
    Out {
        code: o.status.code().expect("exit code"),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_accepts_a_good_policy_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "agents.yaml", POLICY);
    let d = dir.path().display().to_string();
    let out = agentwall(&["policy", "check", &d]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert_eq!(
        lines[0],
        format!("{f}:8: warning: egress[1]: rule allows every IPv6 address (::/0)")
    );
    assert!(
        lines[1].starts_with(&format!(
            "{d}: valid: 1 AgentPolicy, 1 Archetype, revision "
        )),
        "{}",
        lines[1]
    );
}

#[test]
fn check_reports_every_error_with_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.yaml",
        &POLICY.replace("[\"8000-8100\"]", "[\"8100-8000\"]"),
    );
    let b = write(
        dir.path(),
        "b.yaml",
        "kind: GlobalDeny\nto: [169.254.169.254]\nmode: audit\n",
    );
    let d = dir.path().display().to_string();
    let out = agentwall(&["policy", "check", &d]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout, "");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{a}:14:13: egress[0].ports: invalid port range \"8100-8000\": the first port is greater than the last"
            ),
            format!("{b}:3:1: unknown field `mode`, expected one of `kind`, `name`, `to`"),
            format!("{d}: invalid: 2 error(s); nothing applied"),
        ]
    );
    let missing = agentwall(&["policy", "check", "/nonexistent/agentwall-policy"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .starts_with("/nonexistent/agentwall-policy: No such file or directory"),
        "{}",
        missing.stderr
    );
}

#[test]
fn policy_test_passes_and_fails_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policy");
    std::fs::create_dir(&pol).unwrap();
    let f = write(&pol, "agents.yaml", POLICY);
    let scen = write(dir.path(), "scenarios.yaml", SCENARIOS);
    let p = pol.display().to_string();
    let out = agentwall(&["policy", "test", "--policy", &p, &scen]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!(
        "ok   reaches the API: spiffe://example.org/agent/support -> 192.0.2.10:443/tcp: expected allow, got allow [rule {f}:1 egress[0] (Archetype \"llm-apis\")]"
    )), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("3 passed, 0 failed")
    );

    let failing = write(
        dir.path(),
        "failing.yaml",
        &SCENARIOS.replace("port: 8101", "port: 8100"),
    );
    let out = agentwall(&["policy", "test", "--policy", &p, &failing]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains(&format!(
        "FAIL range edge: spiffe://example.org/agent/support -> 198.51.100.1:8100/tcp: expected deny, got allow [rule {f}:8 egress[0] (AgentPolicy \"support-bot\")]"
    )), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("2 passed, 1 failed")
    );
}

/// `policy check` compiles every identity's rules as the node's datapath does: what it
/// accepts, a node applies. A rule may list any number of ports; a prefix holds at most 16
/// rules' entries.
#[test]
fn check_refuses_what_the_datapath_could_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<String> = (0..300).map(|i| (8000 + 2 * i).to_string()).collect();
    let ok = write(
        dir.path(),
        "a.yaml",
        &format!(
            "kind: AgentPolicy\nname: many\nidentity: spiffe://example.org/agent/many\negress:\n  - to: [192.0.2.0/24]\n    ports: [{}]\n",
            ports.join(", ")
        ),
    );
    let d = dir.path().display().to_string();
    let out = agentwall(&["policy", "check", &d]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    std::fs::remove_file(&ok).unwrap();
    let rules: String = (0..17)
        .map(|i| format!("  - to: [192.0.2.0/24]\n    ports: [{}]\n", 8000 + i))
        .collect();
    let a = write(
        dir.path(),
        "a.yaml",
        &format!(
            "kind: AgentPolicy\nname: many\nidentity: spiffe://example.org/agent/many\negress:\n{rules}"
        ),
    );
    let out = agentwall(&["policy", "check", &d]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    assert!(
        lines[0].starts_with(&format!(
            "{a}:1:1: AgentPolicy \"many\": 192.0.2.0/24 needs 17 port entries"
        )),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1],
        format!("{d}: invalid: 1 error(s); nothing applied")
    );
}
