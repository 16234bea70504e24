//! The packet line, on the wire: a governed agent (the real node, `launch --user nobody`) in one
//! test namespace, joined by a veth pair to a peer namespace where every frame it sends is
//! captured. Each case asserts what left, not only the errno the agent saw. The agent and an
//! unenrolled helper are pinned to one CPU, so their packets reach the peer in the order they
//! were sent: a packet the helper sends after an attack is the sign that the attack's packets,
//! had they left, would already have been seen.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use agentwall_tests::{
    Probe, TestEnv, bin_path,
    node::{NodeProc, eventually, run_ok, setup, wait_flow_where, write_cert},
    pki::{Ca, CertSpec},
    wire::{BEYOND_V4, BEYOND_V6, Capture, Link, PEER_V4, PEER_V6, Packet},
};

const ID: &str = "spiffe://example.org/agent/wire";

const POLICY: &str = "\
kind: AgentPolicy
name: wire
identity: spiffe://example.org/agent/wire
egress:
  - to: [192.0.2.2/32, 2001:db8::2/128]
    ports: [9000]
    protocol: udp
  - to: [192.0.2.2/32, 2001:db8::2/128]
    ports: [9001]
    protocol: tcp
";

const WITHIN: Duration = Duration::from_secs(10);

struct Fixture {
    /// Held for its guard: the cgroups and pins go with it.
    _env: TestEnv,
    dir: tempfile::TempDir,
    ca: Ca,
    node: Option<NodeProc>,
    link: Link,
    capture: Capture,
    helper: Probe,
}

fn fixture(name: &str) -> Fixture {
    let (env, dir, ca) = setup(name, POLICY);
    let node = NodeProc::start_with(&env, dir.path(), &["--aggregate-window-secs", "1"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = Link::new(name);
    let capture = Capture::start(&link.peer, "veth-p");
    let helper_cg = env.cgroup("helper");
    let mut h = Command::new(bin_path("aw-probe"));
    h.args(["--cgroup", helper_cg.path().to_str().unwrap(), "--cpu", "0"]);
    link.agent.enter(&mut h);
    let helper = Probe::from_command(h);
    Fixture {
        _env: env,
        dir,
        ca,
        node: Some(node),
        link,
        capture,
        helper,
    }
}

impl Fixture {
    fn socket(&self) -> &Path {
        &self.node.as_ref().expect("node running").socket
    }

    /// The agent, as nobody, under a certificate made by `spec`.
    fn agent(&self, name: &str, spec: &CertSpec) -> Probe {
        let (cert, key) = write_cert(self.dir.path(), name, &self.ca.issue(spec));
        let mut c = Command::new(bin_path("agentwall"));
        c.arg("launch")
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--socket")
            .arg(self.socket())
            .args(["--user", "nobody", "--"])
            .arg(agentwall_tests::bin_for_anyone("aw-probe"))
            .args(["--cpu", "0"]);
        self.link.agent.enter(&mut c);
        Probe::from_command(c)
    }

    /// Has the unenrolled helper send one datagram to the peer, and returns every packet seen
    /// up to it.
    fn until_helper_marker(&mut self, port: u16) -> Vec<Packet> {
        assert_eq!(
            self.helper.cmd(&format!("sendto udp {PEER_V4} {port}")),
            "ok"
        );
        self.capture.until(WITHIN, |p| p.is_to(PEER_V4, port))
    }
}

fn deny_record(socket: &Path, dest: &str, reason: &str) -> serde_json::Value {
    wait_flow_where(socket, "deny", |r| {
        r["dest"] == dest && r["reason"] == reason
    })
}

#[test]
fn routing_headers_and_ip_options_never_reach_the_wire() {
    let mut fx = fixture("wire-rthdr");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));

    // Allowed traffic leaves as judged, in both families.
    assert_eq!(agent.cmd(&format!("sendto udp {PEER_V6} 9000")), "ok");
    assert_eq!(agent.cmd(&format!("sendto udp {PEER_V4} 9000")), "ok");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V4, 9000));

    // A type-4 routing header [allowed peer, then beyond]: the kernel takes it from an
    // unprivileged user and would address the packet to the address beyond.
    let attempts = [
        format!("rthdr udp {PEER_V6} 9000 {BEYOND_V6}"),
        format!("rthdr tcp {PEER_V6} 9001 {BEYOND_V6}"),
        format!("rthdr-cmsg srh {PEER_V6} 9000 {BEYOND_V6}"),
        format!("rthdr-cmsg type2 {PEER_V6} 9000 {BEYOND_V6}"),
        format!("ipopt lsrr {PEER_V4} 9000 {BEYOND_V4}"),
        format!("ipopt rr {PEER_V4} 9000 {BEYOND_V4}"),
        format!("ip6opt hop {PEER_V6} 9000"),
        format!("ip6opt dst {PEER_V6} 9000"),
    ];
    let answers: Vec<String> = attempts.iter().map(|a| agent.cmd(a)).collect();
    let seen = fx.until_helper_marker(9100);
    let table: Vec<(&String, &String)> = attempts.iter().zip(&answers).collect();
    // The kernel's own multicast housekeeping (MLD reports carry a hop-by-hop header) is not
    // the agent's.
    for p in seen.iter().filter(|p| !p.dst.is_multicast()) {
        assert!(
            !p.ip_options && (p.next == 6 || p.next == 17),
            "a packet with options or extension headers left: {p:?}\n{table:#?}"
        );
        assert!(
            p.dst == PEER_V4.parse::<std::net::IpAddr>().unwrap()
                || p.dst == PEER_V6.parse::<std::net::IpAddr>().unwrap(),
            "a packet left for {}: {p:?}\n{table:#?}",
            p.dst
        );
    }
    // The setsockopt route: the kernel accepts the header, the packet line refuses the packet.
    assert_eq!(answers[0], "err EPERM", "{table:#?}");
    // As ancillary data the kernel refuses routing headers itself (a kernel with Mobile IPv6
    // may take type 2: then the packet line refuses the packet).
    for i in [2, 3] {
        assert!(
            answers[i] == "err EINVAL" || answers[i] == "err EPERM",
            "{table:#?}"
        );
    }
    // Record route is an option an unprivileged user may set: the packet is refused.
    assert_eq!(answers[5], "err EPERM", "{table:#?}");
    // Source routing and hop-by-hop/destination options are the kernel's to refuse an
    // unprivileged user.
    assert_eq!(answers[4], "setsockopt EPERM", "{table:#?}");
    assert_eq!(answers[6], "setsockopt EPERM", "{table:#?}");
    assert_eq!(answers[7], "setsockopt EPERM", "{table:#?}");

    // Each refusal is a record with its own reason.
    let r = deny_record(
        fx.socket(),
        BEYOND_V6,
        "IP options or IPv6 extension headers",
    );
    assert_eq!(r["identity"], ID, "{r}");
    assert_eq!(r["port"], 9000, "{r}");
    assert_eq!(r["protocol"], "udp", "{r}");

    // And the agent still reaches what it may.
    assert_eq!(agent.cmd(&format!("sendto udp {PEER_V6} 9000")), "ok");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V6, 9000));
}

/// An established connected-UDP flow (a QUIC connection, say) stops at the packet line the
/// moment its identity is revoked.
#[test]
fn revocation_stops_an_established_udp_flow_on_the_wire() {
    let mut fx = fixture("wire-revoke");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd(&format!("hold udp {PEER_V6} 9000")), "ok");
    assert_eq!(agent.cmd("send-held"), "ok");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V6, 9000));

    run_ok(
        Command::new(bin_path("agentwall"))
            .args(["revoke", ID, "--socket"])
            .arg(fx.socket()),
    );
    let answer = agent.cmd("send-held");
    assert!(answer.starts_with("err "), "{answer}");
    let seen = fx.until_helper_marker(9101);
    assert!(
        !seen.iter().any(|p| p.is_to(PEER_V6, 9000)),
        "the revoked flow kept sending: {seen:?}"
    );
}

/// The certificate deadline ends an established UDP flow in the kernel, with the node stopped.
#[test]
fn expiry_stops_an_established_udp_flow_with_the_node_down() {
    let mut fx = fixture("wire-expiry");
    let mut agent = fx.agent("agent", &CertSpec::agent_expiring(ID, 6));
    assert_eq!(agent.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(agent.cmd("send-held"), "ok");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V4, 9000));

    // Enforcement outlives the node: the kernel holds the deadline.
    assert_eq!(fx.node.take().expect("node").stop(), 0);
    eventually(
        "the deadline to end the flow",
        Duration::from_secs(30),
        || {
            let a = agent.cmd("send-held");
            if a == "err EPERM" { Ok(()) } else { Err(a) }
        },
    );
    // Everything sent before the deadline is behind this marker; nothing after it.
    fx.until_helper_marker(9102);
    for _ in 0..3 {
        assert_eq!(agent.cmd("send-held"), "err EPERM");
    }
    let seen = fx.until_helper_marker(9103);
    assert!(
        !seen.iter().any(|p| p.is_to(PEER_V4, 9000)),
        "the expired flow kept sending: {seen:?}"
    );
}
