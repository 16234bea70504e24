//! Privileged tests of the kernel datapath: real programs on a real cgroup subtree, probes in
//! their own network namespaces. A connect that passes the hooks fails there with ENETUNREACH
//! (nothing is routable but `lo`), a denied one with EPERM, so no packet leaves the machine.

use std::{net::IpAddr, time::Duration};

use agentwall::{
    clock::BootInstant,
    datapath::{Datapath, EventKind, EventRecord},
    policy::{
        IdentityStatus, IdentityView, Mode, Protocol, Reason, Rule, Subject, UnknownFlows,
        Verdict, evaluate_flow,
    },
};
use agentwall_tests::{Probe, TestEnv};
use ipnet::IpNet;

const ALLOWED: &str = "err ENETUNREACH";
const DENIED: &str = "err EPERM";

fn active(mode: Mode) -> IdentityView {
    IdentityView {
        status: IdentityStatus::Active,
        mode,
        not_after: None,
    }
}

fn rule(id: u32, to: &[&str], ports: &[&str], protocol: Protocol) -> Rule {
    Rule {
        id,
        to: to.iter().map(|s| s.parse().unwrap()).collect(),
        ports: ports.iter().map(|s| s.parse().unwrap()).collect(),
        protocol,
        expires: None,
    }
}

fn default_deny() -> Vec<IpNet> {
    agentwall::datapath::DEFAULT_GLOBAL_DENY
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// Parses a probe command's destination: (proto, addr, port).
fn flow_of(cmd: &str) -> (Protocol, IpAddr, u16) {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    match w.as_slice() {
        ["connect" | "sendto" | "sendmmsg", p, a, port] => (
            p.parse().unwrap(),
            a.parse().unwrap(),
            port.parse().unwrap(),
        ),
        ["fastopen", a, port] => (Protocol::Tcp, a.parse().unwrap(), port.parse().unwrap()),
        _ => panic!("not a flow command: {cmd}"),
    }
}

fn drain_until(events: &mut agentwall::datapath::EventReader, n: usize) -> Vec<EventRecord> {
    let mut out = Vec::new();
    // Records are submitted before the syscall returns, so they are all there already; the loop
    // only guards against a reader racing the kernel's commit of the last one.
    for _ in 0..100 {
        out.extend(events.drain());
        if out.len() >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

#[test]
fn verdict_table_matches_kernel_and_reference_evaluator() {
    let env = TestEnv::new("verdicts");
    let mut dp = Datapath::start(&env.config()).expect("start datapath");
    let gd = default_deny();
    dp.set_global_deny(&gd).unwrap();
    let rules = vec![
        rule(1, &["192.0.2.0/24"], &["443"], Protocol::Tcp),
        rule(2, &["198.51.100.0/24"], &["8000-8100"], Protocol::Tcp),
        rule(3, &["203.0.113.0/24"], &["53"], Protocol::Udp),
        rule(4, &["2001:db8:1::/48"], &[], Protocol::Any),
        rule(5, &["192.0.2.128/25"], &["80"], Protocol::Tcp),
        rule(6, &["169.254.169.254/32"], &["80"], Protocol::Tcp),
        rule(7, &["169.254.0.0/16"], &["443"], Protocol::Tcp),
        rule(8, &["127.0.0.1/32"], &["18080"], Protocol::Tcp),
    ];
    dp.set_identity(1, active(Mode::Enforce)).unwrap();
    dp.set_rules(1, &rules).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1).unwrap();
    let mut events = dp.take_events().unwrap();
    let mut probe = Probe::spawn(&agent);

    let table: &[(&str, &str)] = &[
        ("connect tcp 192.0.2.10 443", ALLOWED),
        ("connect tcp 192.0.2.10 80", DENIED),
        ("connect tcp 192.0.2.10 444", DENIED),
        ("connect udp 192.0.2.10 443", DENIED),
        // The /25 rule must not hide the /24 rule's port.
        ("connect tcp 192.0.2.200 443", ALLOWED),
        ("connect tcp 192.0.2.200 80", ALLOWED),
        ("connect tcp 192.0.2.100 80", DENIED),
        // Range edges.
        ("connect tcp 198.51.100.1 8000", ALLOWED),
        ("connect tcp 198.51.100.1 8100", ALLOWED),
        ("connect tcp 198.51.100.1 7999", DENIED),
        ("connect tcp 198.51.100.1 8101", DENIED),
        ("connect tcp 198.51.101.1 8000", DENIED),
        // UDP: connected, sendto, sendmmsg.
        ("connect udp 203.0.113.5 53", ALLOWED),
        ("connect udp 203.0.113.5 54", DENIED),
        ("sendto udp 203.0.113.5 53", ALLOWED),
        ("sendto udp 203.0.113.5 54", DENIED),
        ("sendto udp 192.0.2.10 443", DENIED),
        ("sendmmsg udp 203.0.113.5 53", ALLOWED),
        ("sendmmsg udp 203.0.113.6 5353", DENIED),
        // IPv6.
        ("connect tcp 2001:db8:1::5 22", ALLOWED),
        ("connect udp 2001:db8:1:ffff::1 9", ALLOWED),
        ("connect tcp 2001:db8:2::5 22", DENIED),
        ("sendto udp 2001:db8:2::5 53", DENIED),
        // IPv4-mapped IPv6 is judged as IPv4, on every hook.
        ("connect tcp ::ffff:192.0.2.10 443", ALLOWED),
        ("connect tcp ::ffff:192.0.2.10 80", DENIED),
        ("connect udp ::ffff:203.0.113.5 53", ALLOWED),
        ("connect udp ::ffff:203.0.113.5 54", DENIED),
        ("sendto udp ::ffff:203.0.113.5 53", ALLOWED),
        ("sendto udp ::ffff:203.0.113.5 54", DENIED),
        // TCP Fast Open passes the connect hook.
        ("fastopen 192.0.2.10 443", ALLOWED),
        ("fastopen 192.0.2.10 80", DENIED),
        // Global deny wins over a wider rule; a rule naming the address exactly wins over it.
        ("connect tcp 169.254.169.254 443", DENIED),
        ("connect tcp 169.254.169.254 80", ALLOWED),
        ("connect tcp 169.254.1.1 443", ALLOWED),
    ];
    let mut expected_records = Vec::new();
    for (cmd, want) in table {
        let got = probe.cmd(cmd);
        assert_eq!(&got, want, "kernel verdict for `{cmd}`");
        let (proto, dest, port) = flow_of(cmd);
        let d = evaluate_flow(
            Subject::Bound {
                view: Some(active(Mode::Enforce)),
                rules: &rules,
            },
            &gd,
            UnknownFlows::Report,
            dest,
            port,
            proto,
            BootInstant::now(),
        );
        let want_verdict = if *want == DENIED { Verdict::Deny } else { Verdict::Allow };
        assert_eq!(d.verdict, want_verdict, "reference evaluator for `{cmd}`");
        if d.verdict == Verdict::Deny {
            let dest = match dest {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dest, IpAddr::V4),
                v4 => v4,
            };
            expected_records.push((dest, port, proto, d.reason.unwrap(), d.rule_id));
        }
    }

    // A live allowed connection and a refused one on loopback inside the namespace.
    assert_eq!(probe.cmd("listen tcp 127.0.0.1 18080"), "ok");
    assert_eq!(probe.cmd("connect tcp 127.0.0.1 18080"), "ok");
    assert_eq!(probe.cmd("connect tcp 127.0.0.1 18081"), DENIED);
    expected_records.push((
        "127.0.0.1".parse().unwrap(),
        18081,
        Protocol::Tcp,
        Reason::NoRule,
        0,
    ));

    // Raw sockets are refused to a governed identity; TCP and UDP are not.
    assert_eq!(probe.cmd("socket inet raw 255"), DENIED);
    assert_eq!(probe.cmd("socket inet6 raw 58"), DENIED);
    assert_eq!(probe.cmd("socket inet stream 6"), "ok");
    assert_eq!(probe.cmd("socket inet6 dgram 17"), "ok");

    // Every distinct denial produced exactly one record, with the right fields; the same tuple
    // denied again within the rate window (through another hook, say) is folded into it.
    let key = |x: &(IpAddr, u16, Protocol, Reason, u32)| format!("{x:?}");
    expected_records.sort_by_key(key);
    expected_records.dedup();
    let records = drain_until(&mut events, expected_records.len() + 2);
    let (sock, flows): (Vec<_>, Vec<_>) = records
        .iter()
        .partition(|r| r.kind == EventKind::SocketDeny);
    assert_eq!(sock.len(), 2, "socket records: {sock:?}");
    for r in &sock {
        assert_eq!(r.reason, Some(Reason::SocketType));
        assert_eq!(r.sock_type, libc::SOCK_RAW as u16);
        assert_eq!((r.pid, r.identity), (probe.pid, 1));
    }
    let mut got: Vec<_> = flows
        .iter()
        .map(|r| {
            assert_eq!(r.kind, EventKind::Deny, "{r}");
            assert_eq!((r.pid, r.identity, r.comm.as_str()), (probe.pid, 1, "aw-probe"));
            assert_eq!(r.cgroup_id, agent.id());
            assert_eq!(r.suppressed, 0);
            (r.dest, r.port, r.proto.unwrap(), r.reason.unwrap(), r.rule_id)
        })
        .collect();
    got.sort_by_key(key);
    assert_eq!(got, expected_records);
    assert_eq!(dp.dropped_events().unwrap(), 0);
}
