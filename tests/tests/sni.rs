//! The TLS server-name check: a connection only a name rule allows must name, in its
//! ClientHello, a server the identity resolved to that address. A real TLS server (openssl
//! s_server) in a peer namespace serves every name on one address; real TLS clients (curl,
//! openssl s_client) run under the identity in the agent's namespace, with the real node and
//! its DNS proxy; what reached the server is read on the veth between them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use agentwall_tests::{
    DnsServer, NetNs, Probe, TestEnv, bin_path,
    node::{NodeProc, launch_args, write_cert},
    pki::{Ca, CertSpec},
    wire::{AGENT_V4, Capture, Link, PEER_V4},
};

const ID: &str = "spiffe://example.org/agent/sni";
const RESOLVER: &str = "192.0.2.53";

/// `c` (a server in the peer namespace) started, once it accepts on PEER_V4:`port`: a
/// connection from inside its own namespace.
fn spawn_listening(link: &Link, c: Command, port: u16, what: &str) -> Child {
    spawn_listening_in(&link.peer, c, PEER_V4, port, what)
}

/// `c` (a server in `ns`) started, once it accepts on `addr`:`port`.
fn spawn_listening_in(ns: &NetNs, mut c: Command, addr: &str, port: u16, what: &str) -> Child {
    let child = c.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = agentwall_tests::deadline(Duration::from_secs(20));
    while ns.run_in(|| std::net::TcpStream::connect((addr, port)).is_err()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// openssl s_server in the peer namespace on PEER_V4:443, answering every name; killed on
/// drop.
struct TlsServer(Child);

impl TlsServer {
    fn start(link: &Link, dir: &Path, ca: &Ca) -> Self {
        let (cert, key) = write_cert(dir, "server", &ca.issue_server(PEER_V4.parse().unwrap()));
        Self::serve(link, &cert, &key, 443, &[])
    }

    /// On PEER_V4:`port` with the certificate and key at those paths and more arguments.
    fn serve(link: &Link, cert: &Path, key: &Path, port: u16, more: &[&str]) -> Self {
        Self::serve_in(&link.peer, PEER_V4, cert, key, port, more)
    }

    /// The same in `ns`, on `addr`:`port`.
    fn serve_in(ns: &NetNs, addr: &str, cert: &Path, key: &Path, port: u16, more: &[&str]) -> Self {
        let mut c = Command::new("openssl");
        ns.enter(&mut c);
        c.args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("{addr}:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        TlsServer(spawn_listening_in(
            ns,
            c,
            addr,
            port,
            "openssl s_server (Debian's openssl)",
        ))
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python's HTTP server in the peer namespace on PEER_V4:80, answering every Host; killed
/// on drop.
struct HttpServer(Child);

impl HttpServer {
    fn start(link: &Link, dir: &Path) -> Self {
        let mut c = Command::new("python3");
        link.peer.enter(&mut c);
        c.args(["-m", "http.server", "80", "--bind", PEER_V4, "--directory"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        HttpServer(spawn_listening(
            link,
            c,
            80,
            "python3 -m http.server (Debian's python3)",
        ))
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lab's policy: a name rule for api.example.com (ports 443 and 80), and `also`;
/// io_uring allowed, for the zero-copy sends through it.
fn write_policy(dir: &Path, sni: &str, also: &str) {
    std::fs::write(
        dir.join("policy/agents.yaml"),
        format!(
            "kind: AgentPolicy\nname: sni\nidentity: {ID}\nsni: {sni}\nio_uring: allow\n\
             egress:\n  - to: [api.example.com]\n    ports: [443, 80]\n    protocol: tcp\n{also}"
        ),
    )
    .unwrap();
}

/// The lab's node, in the agent's namespace (its DNS proxy serves that namespace).
fn start_node(env: &TestEnv, dir: &Path, link: &Link, vars: &[(&str, &Path)]) -> NodeProc {
    let audit = dir.join("audit.jsonl").display().to_string();
    NodeProc::start_in(
        env,
        dir,
        &[
            "--dns-upstream",
            &format!("{RESOLVER}:53"),
            "--audit-log",
            &audit,
        ],
        vars,
        Some(&link.agent),
    )
}

struct Lab {
    env: TestEnv,
    tmp: tempfile::TempDir,
    link: Link,
    _dns: DnsServer,
    _server: TlsServer,
    node: NodeProc,
    cert: PathBuf,
    key: PathBuf,
}

impl Lab {
    /// `also`: more egress rules (YAML list items).
    fn new(name: &str, sni: &str, also: &str) -> Self {
        Self::new_with(name, sni, also, &[])
    }

    /// [`Lab::new`] with the node's environment given `vars`.
    fn new_with(name: &str, sni: &str, also: &str, vars: &[(&str, &Path)]) -> Self {
        let env = TestEnv::new(name);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ca = Ca::new("agentwall test CA");
        let link = Link::new(name);
        link.agent
            .ip(&["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"]);
        std::fs::create_dir(dir.join("policy")).unwrap();
        write_policy(dir, sni, also);
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let zone = serde_json::json!({
            "records": [
                { "name": "api.example.com", "type": "A", "value": PEER_V4 },
                // An address of the agent's own namespace: reached over loopback.
                { "name": "local.example.com", "type": "A", "value": RESOLVER },
            ],
        });
        std::fs::write(dir.join("zone.json"), zone.to_string()).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"),
        )
        .unwrap();
        let dns = DnsServer::start(
            &link.agent,
            &format!("{RESOLVER}:53"),
            &dir.join("zone.json"),
        );
        let server = TlsServer::start(&link, dir, &ca);
        let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
        let node = start_node(&env, dir, &link, vars);
        if vars.is_empty() {
            // Loudly: a kernel whose verifier refused the check would otherwise fail these
            // tests only by their refused connections.
            let s = agentwall_tests::node::status_json(&node.socket);
            assert_eq!(s["server_name_check"]["state"], "loaded", "{s}");
        }
        Self {
            env,
            tmp,
            link,
            _dns: dns,
            _server: server,
            node,
            cert,
            key,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The node stopped, and started again on its pins with the environment given `vars`.
    fn restart(&mut self, vars: &[(&str, &Path)]) {
        self.node.terminate();
        self.node = start_node(&self.env, self.tmp.path(), &self.link, vars);
    }

    /// The policy rewritten (as [`Lab::new`] writes it) and applied.
    fn apply(&self, sni: &str, also: &str) {
        write_policy(self.dir(), sni, also);
        let out = Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(&self.node.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// The identity resolves api.example.com through the node's proxy: PEER_V4 is learned.
    fn resolve(&self) {
        self.resolve_name("api.example.com", PEER_V4);
    }

    /// The identity resolves `name` through the node's proxy, to `addr`.
    fn resolve_name(&self, name: &str, addr: &str) {
        let mut c = launch_args(&self.node.socket, &self.cert, &self.key);
        self.link.agent.enter(&mut c);
        c.arg(bin_path("aw-probe"))
            .arg("--resolv-conf")
            .arg(self.dir().join("resolv.conf"));
        let mut p = Probe::from_command(c);
        let answer = p.cmd(&format!("resolve {name} {RESOLVER} udp A"));
        assert!(answer.contains(addr), "{answer}");
    }

    /// The probe under the identity in the agent's namespace.
    fn probe(&self) -> Probe {
        let mut c = launch_args(&self.node.socket, &self.cert, &self.key);
        self.link.agent.enter(&mut c);
        c.arg(bin_path("aw-probe"));
        Probe::from_command(c)
    }

    /// A command under the identity in the agent's namespace: its exit code and output.
    fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut c = launch_args(&self.node.socket, &self.cert, &self.key);
        self.link.agent.enter(&mut c);
        c.args(args).stdin(Stdio::null());
        let out = c.output().expect("launch");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// curl to https://NAME/ at PEER_V4, the name in its ClientHello.
    fn curl(&self, name: &str) -> (Option<i32>, String) {
        let resolve = format!("{name}:443:{PEER_V4}");
        let url = format!("https://{name}/");
        self.run(&[
            "curl",
            "-sk",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &resolve,
            &url,
        ])
    }

    /// Every record of the audit log.
    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    /// The decision records of flows to the peer.
    fn decisions(&self) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == "decision" && r["dest"] == PEER_V4)
            .collect()
    }

    fn wait_decision(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.wait_count(&pred, 1);
        self.decisions().into_iter().find(pred).expect("counted")
    }

    /// Waits until at least `n` decision records of flows to the peer match.
    fn wait_count(&self, pred: &dyn Fn(&serde_json::Value) -> bool, n: usize) {
        self.wait_records(&|| self.decisions(), pred, n);
    }

    /// Waits until at least `n` records of `of` match.
    fn wait_records(
        &self,
        of: &dyn Fn() -> Vec<serde_json::Value>,
        pred: &dyn Fn(&serde_json::Value) -> bool,
        n: usize,
    ) {
        let deadline = agentwall_tests::deadline(Duration::from_secs(20));
        while of().iter().filter(|r| pred(r)).count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {n} such records; have {:#?}",
                of()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every packet the agent's side sent until a marker datagram from the test itself.
    fn sent(&self, cap: &mut Capture) -> Vec<agentwall_tests::wire::Packet> {
        self.link.agent.run_in(|| {
            let s = std::net::UdpSocket::bind((AGENT_V4, 0)).unwrap();
            s.send_to(b"marker", (PEER_V4, 9)).unwrap();
        });
        cap.until(Duration::from_secs(20), |p| p.is_to(PEER_V4, 9))
    }
}

#[test]
fn a_name_rule_reaches_only_the_names_resolved_to_its_address() {
    agentwall_tests::require_root();
    let lab = Lab::new("sni-enf", "enforce", "");
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");

    // The name the identity resolved: the connection passes.
    let (code, out) = lab.curl("api.example.com");
    assert_eq!((code, out.as_str()), (Some(0), "200"));

    // Another name on the same address: cut before its ClientHello leaves, and ended, so
    // curl fails at once (not curl's 28, a timeout).
    let (code, out) = lab.curl("exfil.other.example");
    assert_ne!(code, Some(0), "{out}");
    assert_ne!(
        code,
        Some(28),
        "the connection hung instead of ending: {out}"
    );
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "deny", "{r}");
    assert_eq!(
        r["reason"],
        "server name (TLS SNI or HTTP Host) not one the identity resolved to this address"
    );
    assert_eq!(r["identity"], ID);
    assert_eq!(r["fqdn"], "api.example.com", "{r}");
    assert_eq!(r["port"], 443);

    // No server name at all: refused as well.
    let (code, out) = lab.run(&[
        "timeout",
        "30",
        "openssl",
        "s_client",
        "-connect",
        &format!("{PEER_V4}:443"),
        "-noservername",
    ]);
    assert_ne!(code, Some(0), "{out}");
    lab.wait_decision(|r| {
        r["reason"]
            == "first data of a connection only a name rule allows is neither a TLS ClientHello naming one server nor an HTTP/1 request with one Host and Connection: close"
    });

    // UDP (QUIC) to the address: a name rule for any protocol opens only TCP by name.
    let (code, out) = lab.run(&[
        "bash",
        "-c",
        &format!("printf quic > /dev/udp/{PEER_V4}/443"),
    ]);
    assert_ne!(code, Some(0), "{out}");
    lab.wait_decision(|r| r["protocol"] == "udp" && r["reason"] == "no rule allows it");

    // On the wire: the allowed name's ClientHello, never the other's.
    let sent = lab.sent(&mut cap);
    assert!(
        sent.iter().any(|p| p.carries(b"api.example.com")),
        "the allowed ClientHello never reached the server"
    );
    assert!(
        !sent.iter().any(|p| p.carries(b"exfil.other.example")),
        "a refused ClientHello reached the wire"
    );
    // And the allowed name still passes afterwards.
    let (code, out) = lab.run(&[
        "timeout",
        "30",
        "openssl",
        "s_client",
        "-connect",
        &format!("{PEER_V4}:443"),
        "-servername",
        "API.Example.COM",
    ]);
    assert_eq!(code, Some(0), "{out}: {:#?}", lab.decisions());
    let (code, out) = lab.curl("api.example.com.");
    assert_eq!(code, Some(0), "{out}: {:#?}", lab.decisions());
}

#[test]
fn in_audit_mode_a_foreign_server_name_is_recorded_and_let_through() {
    agentwall_tests::require_root();
    let lab = Lab::new("sni-aud", "audit", "");
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let (code, out) = lab.curl("exfil.other.example");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "audit", "{r}");
    let sent = lab.sent(&mut cap);
    assert!(sent.iter().any(|p| p.carries(b"exfil.other.example")));
}

#[test]
fn a_connection_an_address_rule_allows_is_not_looked_at() {
    agentwall_tests::require_root();
    let lab = Lab::new(
        "sni-addr",
        "enforce",
        "  - to: [192.0.2.0/24]\n    ports: [443]\n    protocol: tcp\n",
    );
    lab.resolve();
    let (code, out) = lab.curl("exfil.other.example");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
    // Plain bytes, no ClientHello at all, pass too.
    let (code, out) = lab.run(&[
        "timeout",
        "30",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{PEER_V4}/443 || exit 7; printf 'hello' >&3"),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        lab.decisions().iter().all(|r| r["verdict"] == "allow"),
        "{:#?}",
        lab.decisions()
    );
}

/// Where the kernel refuses the check's program (`lockdown=confidentiality` withholds the
/// kernel reads it needs; here a fail point refuses it), the node starts and says so, and a
/// name rule alone opens no TCP connection under `sni: enforce`: refused at connect with its
/// record, while address rules work as ever and `sni: audit` lets the name through unchecked.
/// The next start loads the check into the slot the refused one left empty.
#[test]
fn where_the_kernel_refuses_the_check_a_name_rule_alone_opens_no_connection_and_status_says_why() {
    agentwall_tests::require_root();
    let by_address = "  - to: [192.0.2.0/24]\n    ports: [8444]\n    protocol: tcp\n";
    let refused = [(
        "AGENTWALL_FAILPOINTS_AT_START",
        Path::new("sni-program-refused=return"),
    )];
    let mut lab = Lab::new_with("sni-none", "enforce", by_address, &refused);
    let _silent = SilentServer::start(&lab.link, 8444);
    let s = agentwall_tests::node::status_json(&lab.node.socket);
    assert_eq!(s["server_name_check"]["state"], "unavailable", "{s}");
    let why = s["server_name_check"]["why"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("the kernel refused the server-name check: ")
            && why.contains("sni-program-refused"),
        "{s}"
    );
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");

    // The name the identity resolved: refused at connect (curl's 7), with the reason.
    let (code, out) = lab.curl("api.example.com");
    assert_eq!(code, Some(7), "{out}");
    let r = lab.wait_decision(|r| r["port"] == 443);
    assert_eq!(r["verdict"], "deny", "{r}");
    let unchecked = "a connection only a name rule allows, while the kernel's server-name check is not loaded (see status)";
    assert_eq!(r["reason"], unchecked);
    assert_eq!(r["fqdn"], "api.example.com", "{r}");
    // An address rule's connection is not touched.
    let (code, out) = lab.run(&[
        "timeout",
        "30",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{PEER_V4}/8444 || exit 7; printf 'hello' >&3"),
    ]);
    assert_eq!(code, Some(0), "{out}");
    // On the wire: not even a SYN to the name rule's port.
    let sent = lab.sent(&mut cap);
    assert!(sent.iter().any(|p| p.is_to(PEER_V4, 8444)), "{sent:#?}");
    assert!(!sent.iter().any(|p| p.is_to(PEER_V4, 443)), "{sent:#?}");

    // `sni: audit`: the connection is recorded at connect, with the same reason, and let
    // through unchecked.
    lab.apply("audit", by_address);
    let (code, out) = lab.curl("exfil.other.example");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
    let r = lab.wait_decision(|r| r["port"] == 443 && r["verdict"] == "audit");
    assert_eq!(r["reason"], unchecked, "{r}");

    // Started again where the kernel takes the check: loaded into the empty slot, and enforced.
    lab.apply("enforce", by_address);
    lab.restart(&[]);
    lab.resolve();
    let s = agentwall_tests::node::status_json(&lab.node.socket);
    assert_eq!(s["server_name_check"]["state"], "loaded", "{s}");
    let (code, out) = lab.curl("api.example.com");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
    let (code, out) = lab.curl("exfil.other.example");
    assert_ne!(code, Some(0), "{out}");
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "deny", "{r}");

    // An upgrade (pins of another build) the kernel refuses the check to: the earlier
    // build's check is not kept in the slot, so the next start of this build, refused
    // again, does not take it for its own.
    agentwall_tests::set_pinned_revision(&lab.env.bpffs_dir, 0);
    for _ in 0..2 {
        lab.restart(&refused);
        let s = agentwall_tests::node::status_json(&lab.node.socket);
        assert_eq!(s["server_name_check"]["state"], "unavailable", "{s}");
        lab.resolve();
        let (code, out) = lab.curl("api.example.com");
        assert_eq!(code, Some(7), "{out}");
    }
}

/// Where the kernel's BTF does not say where a packet's shared pages are marked (here a fail
/// point hides the BTF), the check cannot tell a copied send from one in pages its sender
/// can still change: the first data of every watched connection is refused, and `status`
/// and `node --check-config` say which field is unknown and what that refuses. Started with
/// its BTF, the node finds every field again and the resolved name passes.
#[test]
fn where_the_kernel_does_not_say_where_shared_pages_are_marked_first_data_is_refused_and_status_says_so()
 {
    agentwall_tests::require_root();
    let hidden = [(
        "AGENTWALL_FAILPOINTS_AT_START",
        Path::new("kernel-btf-unreadable=return"),
    )];
    let mut lab = Lab::new_with("sni-nobtf", "enforce", "", &hidden);
    let s = agentwall_tests::node::status_json(&lab.node.socket);
    let gaps = s["kernel_layout"].as_array().expect("kernel_layout");
    assert!(
        gaps.iter().any(|g| g["unknown"].as_str().is_some_and(
            |u| u.starts_with("reading the kernel's BTF from /nonexistent/kernel-btf-unreadable: ")
        ) && g["effect"].as_str().is_some_and(|e| e.starts_with(
            "the first data of every connection the server-name check watches is refused"
        ))),
        "{s}"
    );
    let text = agentwall_tests::node::status_text(&lab.node.socket);
    assert!(
        text.contains("kernel layout: UNKNOWN: reading the kernel's BTF from /nonexistent/kernel-btf-unreadable"),
        "{text}"
    );
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let mut p = lab.probe();
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    assert_eq!(p.cmd("send-held-hello api.example.com whole"), "ok");
    let r = lab.wait_decision(|r| r["port"] == 443 && r["verdict"] == "deny");
    assert_eq!(
        r["reason"],
        "zero-copy or spliced send before a connection only a name rule allows had its server name checked",
        "{r}"
    );
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");
    let sent = lab.sent(&mut cap);
    assert!(
        !sent.iter().any(|p| p.carries(b"api.example.com")),
        "first data left while the layout was unknown: {sent:#?}"
    );
    drop(p);

    lab.restart(&[]);
    let s = agentwall_tests::node::status_json(&lab.node.socket);
    assert_eq!(s["kernel_layout"], serde_json::json!([]), "{s}");
    let text = agentwall_tests::node::status_text(&lab.node.socket);
    assert!(
        text.contains("kernel layout: every field found in the BTF"),
        "{text}"
    );
    let checked = NodeProc::check_config(&lab.env, lab.dir(), &[]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        said.contains("ok      kernel layout: every kernel field the node reads at offsets that move between kernels is in the BTF"),
        "{said}"
    );
    lab.resolve();
    let (code, out) = lab.curl("api.example.com");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
}

/// A TCP connection made before its cgroup was governed (a unit's, before `enroll`) to an
/// address the identity then learns by name: the packet line takes it over at its next
/// packet, and since no hook saw its first data, a name rule alone does not let it send
/// (under `sni: audit`, it is recorded and sends).
#[test]
fn a_connection_older_than_its_binding_sends_nothing_on_a_name_rule_alone() {
    agentwall_tests::require_root();
    for (sni, verdict) in [("enforce", "deny"), ("audit", "audit")] {
        let lab = Lab::new(&format!("sni-old-{sni}"), sni, "");
        let mut cap = Capture::start(&lab.link.peer, "veth-p");
        let unit = lab.env.cgroup("unit");
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", unit.path().to_str().unwrap()]);
        lab.link.agent.enter(&mut c);
        let mut svc = Probe::from_command(c);
        assert_eq!(svc.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
        agentwall_tests::node::enroll(&lab.node.socket, unit.path(), &lab.cert, &lab.key);
        let a = svc.cmd(&format!("resolve api.example.com {RESOLVER} udp A"));
        assert!(a.contains(PEER_V4), "{a}");
        svc.cmd("send-held-hello exfil.other.example whole");
        // (Its record before `enroll` is an unbound cgroup's flow: verdict `unknown`.)
        let r = lab.wait_decision(|r| r["port"] == 443 && r["verdict"] == verdict);
        if sni == "enforce" {
            assert_eq!(
                r["reason"], "packet sent somewhere its socket was not allowed",
                "{r}"
            );
        } else {
            // Audit: the check reads the next data as the connection's first and records
            // the name; the connection goes on both ways.
            assert_eq!(r["server_name"], "exfil.other.example", "{r}");
            let got = svc.cmd("read-held 5");
            assert!(got.starts_with("got "), "{got}");
        }
        let sent = lab.sent(&mut cap);
        assert_eq!(
            sent.iter().any(|p| p.carries(b"exfil.other.example")),
            sni == "audit",
            "sni: {sni}: the hello on the older connection, on the wire or not"
        );
    }
}

/// A start whose check the kernel refuses, after an upgrade, while connections an earlier
/// start let begin still wait for the check: in the check's audit such a connection goes
/// on, unchecked; otherwise it sends no data.
#[test]
fn connections_waiting_for_a_check_a_start_could_not_load_go_on_only_in_audit() {
    agentwall_tests::require_root();
    let mut lab = Lab::new("sni-lost", "audit", "");
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    // (s_server serves one connection at a time: the one that will answer comes first.)
    let mut audited = lab.probe();
    assert_eq!(audited.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    lab.apply("enforce", "");
    let mut enforced = lab.probe();
    assert_eq!(enforced.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    // Pins of another build, and a kernel that refuses this build's check.
    agentwall_tests::set_pinned_revision(&lab.env.bpffs_dir, 0);
    lab.restart(&[(
        "AGENTWALL_FAILPOINTS_AT_START",
        Path::new("sni-program-refused=return"),
    )]);
    let s = agentwall_tests::node::status_json(&lab.node.socket);
    assert_eq!(s["server_name_check"]["state"], "unavailable", "{s}");
    audited.cmd("send-held-hello audit.other.example whole");
    let got = audited.cmd("read-held 5");
    assert!(got.starts_with("got "), "{got}");
    lab.wait_decision(|r| {
        r["verdict"] == "audit"
            && r["reason"]
                == "a connection only a name rule allows, while the kernel's server-name check is not loaded (see status)"
    });
    enforced.cmd("send-held-hello enforce.other.example whole");
    let sent = lab.sent(&mut cap);
    assert!(sent.iter().any(|p| p.carries(b"audit.other.example")));
    assert!(
        !sent.iter().any(|p| p.carries(b"enforce.other.example")),
        "a hello the check never read reached the wire"
    );
}

#[test]
fn a_connect_on_the_connected_socket_urgent_data_two_names_and_a_split_hello_get_nothing_past_the_check()
 {
    agentwall_tests::require_root();
    // 198.51.100.7 is allowed by address (routed through the peer; never reached here).
    let lab = Lab::new(
        "sni-tricks",
        "enforce",
        "  - to: [198.51.100.7/32]\n    ports: [443]\n    protocol: tcp\n",
    );
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let mut p = lab.probe();
    // One CPU: each check below finds the scratch the one before it filled.
    assert_eq!(p.cmd("pin-last-cpu"), "ok");

    // Connected to the name-learned address; a second connect() to an address the rules
    // allow by address is refused by the kernel (EISCONN) and must not replace what the
    // packet line checks: the other name's ClientHello is still cut.
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    assert_eq!(p.cmd("connect-held 198.51.100.7 443"), "err EISCONN");
    p.cmd("send-held-hello exfil.other.example whole");
    lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    // The node ends the refused connection: the agent sees an error, not a hang.
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");

    // Urgent data in the first data: the server would take a byte out of what was checked.
    // Refused before any name is read: its record names none (not the name the check read
    // before), and the node still ends the connection.
    const MISSING: &str = "first data of a connection only a name rule allows is neither a TLS ClientHello naming one server nor an HTTP/1 request with one Host and Connection: close";
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    p.cmd("send-held-hello api.example.com urgent");
    let r = lab.wait_decision(|r| r["reason"] == MISSING);
    assert!(r.get("server_name").is_none_or(|n| n.is_null()), "{r:#}");
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");

    // Two server_name extensions, the resolved name first: a server could read the second.
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    p.cmd("send-held-hello api.example.com,exfil.other.example whole");
    lab.wait_count(&|r| r["reason"] == MISSING, 2);
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");

    // A ClientHello written in two pieces, its name in the second: refused at the first.
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    let sent_split = p.cmd("send-held-hello api.example.com split");
    lab.wait_count(&|r| r["reason"] == MISSING, 3);
    // Ended: the second piece's write saw it (and took the error), or the socket holds it.
    let ended = p.cmd("await-end-held");
    assert!(
        sent_split == "err ECONNABORTED" || ended == "ECONNABORTED",
        "{sent_split} / {ended}"
    );

    let sent = lab.sent(&mut cap);
    assert!(
        !sent.iter().any(|p| p.carries(b"exfil.other.example")),
        "a refused ClientHello reached the wire"
    );
    assert!(
        !sent.iter().any(|p| p.carries(b"api.example.com")),
        "a refused ClientHello (split, with urgent data or two names) reached the wire"
    );
}

/// A listener in the peer namespace on PEER_V4:`port` that never accepts: the kernel takes
/// connections and data, and nothing answers. Killed on drop.
struct SilentServer(Child);

impl SilentServer {
    fn start(link: &Link, port: u16) -> Self {
        let mut c = Command::new("python3");
        link.peer.enter(&mut c);
        c.args([
            "-c",
            &format!(
                "import socket, time\n\
                 s = socket.socket()\n\
                 s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('{PEER_V4}', {port}))\n\
                 s.listen(16)\n\
                 time.sleep(3600)\n"
            ),
        ])
        .stdin(Stdio::null());
        SilentServer(spawn_listening(link, c, port, "a python3 listener"))
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS 1.3 HelloRetryRequest: the server asks for a second ClientHello, and a server that
/// does not compare the two could act on the second's name. The check follows the client's
/// records until the server answers, and reads the hello a HelloRetryRequest asks for like
/// the first: a real one (openssl s_client and s_server) passes; a second hello naming
/// another server, after the request or sent before any answer, is refused and never
/// reaches the wire; early data behind a checked hello passes.
#[test]
fn a_second_hello_is_checked_after_a_hello_retry_request_and_refused_before_an_answer() {
    agentwall_tests::require_root();
    let lab = Lab::new(
        "sni-retry",
        "enforce",
        "  - to: [api.example.com]\n    ports: [8443, 8444]\n    protocol: tcp\n\
         \x20 - to: [local.example.com]\n    ports: [8445]\n    protocol: tcp\n",
    );
    // P-256 alone: a client that sends an x25519 key share first is asked again.
    let _retry = TlsServer::serve(
        &lab.link,
        &lab.dir().join("server.pem"),
        &lab.dir().join("server.key"),
        8443,
        &["-groups", "P-256"],
    );
    let _silent = SilentServer::start(&lab.link, 8444);
    // In the agent's own namespace, reached over loopback.
    let _local = TlsServer::serve_in(
        &lab.link.agent,
        RESOLVER,
        &lab.dir().join("server.pem"),
        &lab.dir().join("server.key"),
        8445,
        &[],
    );
    lab.resolve();
    lab.resolve_name("local.example.com", RESOLVER);
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    // What the server sends, as it reaches the agent's side.
    let mut back = Capture::from_peer(&lab.link.agent, "veth-a");

    // A real HelloRetryRequest: openssl's client offers x25519 first and is asked for P-256.
    let (code, out) = lab.run(&[
        "openssl",
        "s_client",
        "-brief",
        "-connect",
        &format!("{PEER_V4}:8443"),
        "-servername",
        "api.example.com",
        "-groups",
        "X25519:P-256",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("CONNECTION ESTABLISHED"), "{out}");
    // The server did ask again (a HelloRetryRequest's random, RFC 8446, 4.1.3).
    const HRR_RANDOM: [u8; 32] = [
        0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8,
        0x91, 0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8,
        0x33, 0x9c,
    ];
    back.until(Duration::from_secs(20), |p| p.carries(&HRR_RANDOM));

    // TLS 1.2, whose client sends handshake records again once the server's hello came: the
    // packet line inbound saw that hello, over the veth and over loopback.
    for (server, name) in [
        (format!("{PEER_V4}:8443"), "api.example.com"),
        (format!("{RESOLVER}:8445"), "local.example.com"),
    ] {
        let (code, out) = lab.run(&[
            "openssl",
            "s_client",
            "-brief",
            "-tls1_2",
            "-connect",
            &server,
            "-servername",
            name,
        ]);
        assert_eq!(code, Some(0), "{server}: {out}");
        assert!(out.contains("CONNECTION ESTABLISHED"), "{server}: {out}");
    }
    assert!(
        lab.decisions().iter().all(|r| r["verdict"] == "allow"),
        "{:#?}",
        lab.decisions()
    );

    // After a HelloRetryRequest, a second hello naming another server: refused.
    let mut p = lab.probe();
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 8443")), "ok");
    assert_eq!(
        p.cmd("retry-held-hello api.example.com exfil.other.example hello"),
        "hrr ok"
    );
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "deny", "{r:#}");
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");

    // After a HelloRetryRequest, an HTTP request for the resolved name: not a hello, so
    // refused (it would end the watch with what follows unread).
    const AFTER: &str = "data that could hold a second ClientHello, sent after the checked one before the server answered it (or not a hello after a HelloRetryRequest)";
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 8443")), "ok");
    assert_eq!(
        p.cmd("retry-held-hello api.example.com exfil.other.example http"),
        "hrr ok"
    );
    lab.wait_count(&|r| r["reason"] == AFTER && r["verdict"] == "deny", 1);
    assert_eq!(p.cmd("await-end-held"), "ECONNABORTED");
    assert_eq!(p.cmd("drop-held"), "ok");

    // After a HelloRetryRequest, the change cipher spec record sent from a page the agent
    // then rewrites into the head of a record that would hide the next hello from the
    // check: refused as a send from shared pages (at the send where the BPF LSM line
    // enforces and sendfile is seen there, from Linux 6.5; else in the packet line, the
    // connection ended).
    const ZERO_COPY: &str = "zero-copy or spliced send before a connection only a name rule allows had its server name checked";
    let at_send = agentwall_tests::node::lsm_line(&lab.node.socket).is_none()
        && agentwall_tests::kernel_release() >= (6, 5);
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 8443")), "ok");
    let sent = p.cmd("retry-held-hello api.example.com exfil.other.example ccs-sendfile");
    lab.wait_records(&|| lab.records(), &|r| r["reason"] == ZERO_COPY, 1);
    if at_send {
        assert_eq!(sent, "hrr err sendfile EPERM");
    } else {
        let ended = p.cmd("await-end-held");
        assert!(
            sent == "hrr err ECONNABORTED" || ended == "ECONNABORTED",
            "{sent} / {ended}"
        );
    }
    assert_eq!(p.cmd("drop-held"), "ok");

    // A second hello before the server answered (nothing answers on 8444), in the first's
    // packet or in one of its own: refused, and the connection ended.
    for (n, how) in [(2, "together"), (3, "apart")] {
        assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 8444")), "ok");
        let sent = p.cmd(&format!(
            "send-held-hellos api.example.com exfil.other.example {how}"
        ));
        lab.wait_count(&|r| r["reason"] == AFTER && r["verdict"] == "deny", n);
        let ended = p.cmd("await-end-held");
        assert!(
            sent == "err ECONNABORTED" || ended == "ECONNABORTED",
            "{how}: {sent} / {ended}"
        );
        assert_eq!(p.cmd("drop-held"), "ok");
    }

    // Early data (application-data records) behind a checked hello passes, in its packet
    // and after it.
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 8444")), "ok");
    assert_eq!(
        p.cmd("send-held-hellos api.example.com EARLY-DATA-2 early"),
        "ok"
    );
    let got = cap.until(Duration::from_secs(20), |p| p.carries(b"EARLY-DATA-2"));
    assert!(
        got.iter()
            .any(|p| p.carries(b"api.example.com") && p.carries(b"EARLY-DATA-1")),
        "the hello and its early data never reached the server"
    );
    // The mismatch, the HTTP request, two early hellos, and the spliced record where the
    // packet line refused it.
    let denied = 4 + usize::from(!at_send);
    assert_eq!(
        lab.decisions()
            .iter()
            .filter(|r| r["verdict"] == "deny")
            .count(),
        denied,
        "{:#?}",
        lab.decisions()
    );

    let mut sent = got;
    sent.extend(lab.sent(&mut cap));
    assert!(
        !sent.iter().any(|p| p.carries(b"exfil.other.example")),
        "a second hello naming another server reached the wire"
    );
}

/// First data sent from pages the sender keeps could change after the check read it. The
/// packet line refuses first data in such pages (the kernel marks them shared), and the node
/// ends the connection; where the node enforces the BPF LSM line, such sends are refused
/// before anything is queued (EPERM), the connection kept. A socket set for zero-copy that
/// sends plainly is copied, and passes.
#[test]
fn zero_copy_and_spliced_sends_get_nothing_past_the_check() {
    agentwall_tests::require_root();
    const ZERO_COPY: &str = "zero-copy or spliced send before a connection only a name rule allows had its server name checked";
    let lab = Lab::new("sni-zc", "enforce", "");
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let mut p = lab.probe();

    // SO_ZEROCOPY then a plain send: copied into the kernel, checked as usual, passed.
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
    assert_eq!(p.cmd("send-held-hello api.example.com zerocopy-set"), "ok");
    let sent = lab.sent(&mut cap);
    assert!(
        sent.iter().any(|p| p.carries(b"api.example.com")),
        "a plain send on a socket set for zero-copy was refused: {:#?}",
        lab.decisions()
    );
    assert_eq!(p.cmd("drop-held"), "ok");

    // Sent from the sender's pages: SO_ZEROCOPY with MSG_ZEROCOPY, io_uring's zero-copy
    // send, sendfile; and MSG_ZEROCOPY alone, which the kernel copies (the name is read,
    // and refused). With the LSM line every MSG_ZEROCOPY send is refused at the send, and
    // sendfile too from Linux 6.5 (before, it reaches TCP past every send hook).
    let lsm = agentwall_tests::node::lsm_line(&lab.node.socket).is_none();
    let spliced_seen = agentwall_tests::kernel_release() >= (6, 5);
    let (mut zero_copy, mut named) = (0, 0);
    // The send hook's refusals are records of the socket (no flow), the packet line's of the
    // flow: counted together.
    let all = || lab.records();
    for how in ["zerocopy", "uring-zc", "sendfile", "msg-zerocopy"] {
        assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");
        let sent = p.cmd(&format!("send-held-hello exfil.other.example {how}"));
        if lsm && (how != "sendfile" || spliced_seen) {
            assert_eq!(sent, "err EPERM", "{how}");
            zero_copy += 1;
            lab.wait_records(&all, &|r| r["reason"] == ZERO_COPY, zero_copy);
            // The connection stays: a plain send of the resolved name is checked and goes.
            assert_eq!(
                p.cmd("send-held-hello api.example.com whole"),
                "ok",
                "{how}"
            );
        } else {
            assert_eq!(sent, "ok", "{how}");
            if how == "msg-zerocopy" {
                named += 1;
                lab.wait_count(&|r| r["server_name"] == "exfil.other.example", named);
            } else {
                zero_copy += 1;
                lab.wait_records(&all, &|r| r["reason"] == ZERO_COPY, zero_copy);
            }
            assert_eq!(p.cmd("await-end-held"), "ECONNABORTED", "{how}");
        }
        assert_eq!(p.cmd("drop-held"), "ok");
    }
    let refusals: Vec<_> = all()
        .into_iter()
        .filter(|r| r["reason"] == ZERO_COPY)
        .collect();
    for r in refusals.iter().filter(|r| r["verdict"] != "deny") {
        // The send hook's refusal: a record of the socket, with the connection's port.
        assert_eq!(
            (&r["verdict"], r["port"].as_u64()),
            (&"socket-deny".into(), Some(443)),
            "{r}"
        );
    }
    for r in refusals.iter().filter(|r| r["verdict"] == "deny") {
        // The packet line's: of the flow.
        assert_eq!(
            (r["dest"].as_str(), r["port"].as_u64()),
            (Some(PEER_V4), Some(443)),
            "{r}"
        );
    }
    assert!(
        refusals.iter().any(|r| r["identity"] == ID),
        "{refusals:#?}"
    );
    if !lsm {
        // The packet line's records name the flow.
        let r = lab.wait_decision(|r| r["reason"] == ZERO_COPY);
        assert_eq!(r["port"], 443, "{r}");
    }

    let sent = lab.sent(&mut cap);
    assert!(
        !sent.iter().any(|p| p.carries(b"exfil.other.example")),
        "a ClientHello sent from the sender's pages reached the wire"
    );
}

/// A ClientHello larger than one segment whose first sending is lost goes out again in
/// pieces cut to the segment size: the bytes the check passed, held by the kernel alone,
/// pass unread (a piece alone could not be checked).
#[test]
fn a_large_client_hello_sent_again_in_pieces_after_a_loss_passes() {
    agentwall_tests::require_root();
    let lab = Lab::new("sni-rtx", "enforce", "");
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let mut p = lab.probe();
    assert_eq!(p.cmd(&format!("hold tcp {PEER_V4} 443")), "ok");

    // A token bucket on the agent's side, after the packet line: it cuts the ClientHello
    // into segments, sends the first and loses the rest (its queue holds nothing).
    let tc = |args: &[&str]| {
        let mut c = Command::new("tc");
        lab.link.agent.enter(&mut c);
        let out = c.args(args).output().expect("tc");
        assert!(out.status.success(), "tc {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tc(&[
        "qdisc", "add", "dev", "veth-a", "root", "tbf", "rate", "100kbit", "burst", "1600",
        "limit", "1",
    ]);
    assert_eq!(p.cmd("send-held-hello api.example.com big"), "ok");
    let deadline = agentwall_tests::deadline(Duration::from_secs(20));
    let dropped = |shown: &str| -> u64 {
        shown
            .split("dropped ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    while dropped(&tc(&["-s", "qdisc", "show", "dev", "veth-a"])) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ClientHello was not lost"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tc(&["qdisc", "del", "dev", "veth-a", "root"]);

    // The lost piece is sent again (TCP's timers) on its own: it reaches the server.
    let got = cap.until(Duration::from_secs(30), |p| p.carries(b"BIG-HELLO-END"));
    assert!(
        got.iter().any(|p| p.carries(b"api.example.com")),
        "the piece with the name never reached the server: {:#?}",
        lab.decisions()
    );
    assert!(
        !got.iter()
            .any(|p| p.carries(b"api.example.com") && p.carries(b"BIG-HELLO-END")),
        "sent whole, not in pieces"
    );
    assert!(
        !lab.decisions()
            .iter()
            .any(|r| r["verdict"] == "deny" && r["port"] == 443),
        "{:#?}",
        lab.decisions()
    );
}

#[test]
fn a_plain_http_request_must_name_in_its_host_a_name_resolved_to_its_address() {
    agentwall_tests::require_root();
    let lab = Lab::new("sni-http", "enforce", "");
    let _http = HttpServer::start(&lab.link, lab.dir());
    lab.resolve();
    let mut cap = Capture::start(&lab.link.peer, "veth-p");
    let curl = |extra: &[&str]| {
        let resolve = format!("api.example.com:80:{PEER_V4}");
        let mut args = vec![
            "curl",
            "-s",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &resolve,
            "-H",
            "Connection: close",
        ];
        args.extend_from_slice(extra);
        args.push("http://api.example.com/");
        lab.run(&args)
    };

    // The Host the identity resolved: the request passes.
    let (code, out) = curl(&[]);
    assert_eq!((code, out.as_str()), (Some(0), "200"));

    // Another Host on the same address: cut before the request leaves, and ended.
    let (code, out) = curl(&["-H", "Host: exfil.other.example"]);
    assert_ne!(code, Some(0), "{out}");
    assert_ne!(
        code,
        Some(28),
        "the connection hung instead of ending: {out}"
    );
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "deny", "{r}");
    assert_eq!(
        r["reason"],
        "server name (TLS SNI or HTTP Host) not one the identity resolved to this address"
    );
    assert_eq!(r["fqdn"], "api.example.com", "{r}");
    assert_eq!(r["port"], 80);

    // A request a server would route by something else than its Host: a URL as the target
    // (absolute form, which a server prefers to Host), two Hosts.
    const MISSING: &str = "first data of a connection only a name rule allows is neither a TLS ClientHello naming one server nor an HTTP/1 request with one Host and Connection: close";
    let (code, out) = curl(&["--request-target", "http://exfil.other.example/"]);
    assert_ne!(code, Some(0), "{out}");
    lab.wait_decision(|r| r["reason"] == MISSING && r["port"] == 80);
    // (curl sends one Host whatever it is told: bash writes this one.)
    let (_, out) = lab.run(&[
        "timeout",
        "30",
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{PEER_V4}/80 || exit 7; \
             printf 'GET / HTTP/1.1\\r\\nHost: api.example.com\\r\\nHost: exfil.other.example\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             cat <&3"
        ),
    ]);
    assert!(!out.contains("200 OK"), "{out}");
    lab.wait_count(&|r| r["reason"] == MISSING && r["port"] == 80, 2);

    // A request that keeps the connection open for more requests (each routed by its own
    // Host, which the check would not read): refused, however right its Host.
    let before = lab
        .decisions()
        .iter()
        .filter(|r| r["reason"] == MISSING && r["port"] == 80)
        .count();
    let (_, out) = lab.run(&[
        "timeout",
        "30",
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{PEER_V4}/80 || exit 7; \
             printf 'GET / HTTP/1.1\\r\\nHost: api.example.com\\r\\n\\r\\nGET / HTTP/1.1\\r\\nHost: exfil.other.example\\r\\n\\r\\n' >&3; \
             cat <&3"
        ),
    ]);
    assert!(!out.contains("200 OK"), "{out}");
    lab.wait_count(&|r| r["reason"] == MISSING && r["port"] == 80, before + 1);

    // On the wire: the allowed request, never the others.
    let sent = lab.sent(&mut cap);
    assert!(
        sent.iter().any(|p| p.carries(b"Host: api.example.com")),
        "the allowed request never reached the server"
    );
    assert!(
        !sent.iter().any(|p| p.carries(b"exfil.other.example")),
        "a refused request reached the wire"
    );
}

#[test]
fn a_resumed_tls_session_is_checked_like_a_new_one() {
    agentwall_tests::require_root();
    let lab = Lab::new("sni-resume", "enforce", "");
    lab.resolve();
    let session = lab.dir().join("session.pem");
    let s_client = |name: &str, sess: &str| {
        let connect = format!("{PEER_V4}:443");
        let session = session.display().to_string();
        lab.run(&[
            "bash",
            "-c",
            r#"printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 openssl s_client -connect "$1" -servername "$2" "$3" "$4" -ign_eof"#,
            "s_client",
            &connect,
            name,
            sess,
            &session,
        ])
    };
    // A full handshake keeps its session; the next connection resumes it.
    let (code, out) = s_client("api.example.com", "-sess_out");
    assert_eq!(code, Some(0), "{out}");
    assert!(session.exists(), "no session kept: {out}");
    let (code, out) = s_client("api.example.com", "-sess_in");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Reused"), "the session was not resumed: {out}");
    // The session resumed under another name: its ClientHello is refused like any other.
    let (code, out) = s_client("exfil.other.example", "-sess_in");
    assert_ne!(code, Some(0), "{out}");
    let r = lab.wait_decision(|r| r["server_name"] == "exfil.other.example");
    assert_eq!(r["verdict"], "deny", "{r}");
}

#[test]
fn an_ech_public_name_the_rule_lists_passes_where_its_names_were_resolved() {
    agentwall_tests::require_root();
    // The first rule (api.example.com) accepts a provider's ECH public name beside its own.
    let lab = Lab::new("sni-ech", "enforce", "    ech: [ech.provider.example]\n");
    lab.resolve();
    // The outer ClientHello of an ECH connection names the provider's public name.
    let (code, out) = lab.curl("ech.provider.example");
    assert_eq!((code, out.as_str()), (Some(0), "200"));
    // Another provider's is refused.
    let (code, out) = lab.curl("other-ech.example");
    assert_ne!(code, Some(0), "{out}");
    let r = lab.wait_decision(|r| r["server_name"] == "other-ech.example");
    assert_eq!(r["verdict"], "deny", "{r}");
}
