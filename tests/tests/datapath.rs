//! Privileged tests of the kernel datapath: real programs on a real cgroup subtree, probes in
//! their own network namespaces. A connect that passes the hooks fails there with ENETUNREACH
//! (nothing is routable but `lo`), a denied one with EPERM, so no packet leaves the machine.

use std::{net::IpAddr, sync::Arc, time::Duration};

use agentwall::{
    clock::BootInstant,
    datapath::{
        Datapath, EventKind, EventRecord, IdentityConfig, IdentityRules, attached_programs,
        pin_dir, teardown,
    },
    policy::{
        IdentityStatus, IdentityView, Mode, Protocol, Reason, Rule, Subject, UnknownFlows, Verdict,
        evaluate_flow,
    },
};
use agentwall_tests::{Probe, TestEnv, set_pinned_revision};
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
        fqdns: Vec::new(),
        to: to.iter().map(|s| s.parse().unwrap()).collect(),
        ports: ports.iter().map(|s| s.parse().unwrap()).collect(),
        protocol,
        direction: agentwall::policy::Direction::Egress,
        expires: None,
        ech: Box::default(),
        learned: false,
    }
}

fn default_deny() -> Vec<IpNet> {
    agentwall::policy::DEFAULT_GLOBAL_DENY
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
    let dp = Datapath::start(&env.config()).expect("start datapath");
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
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &rules).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
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
        let want_verdict = if *want == DENIED {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
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
            assert_eq!(
                (r.pid, r.identity, r.comm.as_str()),
                (probe.pid, 1, "aw-probe")
            );
            assert_eq!(r.cgroup_id, agent.id());
            assert_eq!(r.suppressed, 0);
            (
                r.dest,
                r.port,
                r.proto.unwrap(),
                r.reason.unwrap(),
                r.rule_id,
            )
        })
        .collect();
    got.sort_by_key(key);
    assert_eq!(got, expected_records);
    assert_eq!(dp.dropped_events().unwrap(), 0);
}

/// A rule may list hundreds of ports: its entry names a port set the kernel looks up, and the
/// verdicts are the reference evaluator's. Sets live as long as a trie names them.
#[test]
fn rules_with_hundreds_of_ports_hold_in_the_kernel() {
    let env = TestEnv::new("portsets");
    let dp = Datapath::start(&env.config()).expect("start datapath");
    let every_third: Vec<String> = (0..500).map(|i| (1000 + 3 * i).to_string()).collect();
    let every_third: Vec<&str> = every_third.iter().map(String::as_str).collect();
    let seventeen: Vec<String> = (0..17).map(|i| (8000 + 2 * i).to_string()).collect();
    let seventeen: Vec<&str> = seventeen.iter().map(String::as_str).collect();
    let rules = vec![
        rule(1, &["192.0.2.0/24"], &every_third, Protocol::Tcp),
        rule(2, &["192.0.2.7/32"], &["443"], Protocol::Tcp),
        rule(3, &["198.51.100.0/24"], &seventeen, Protocol::Udp),
    ];
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &rules).unwrap();
    assert_eq!(dp.port_sets_in_kernel().unwrap(), 2);
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut probe = Probe::spawn(&agent);
    let table: &[(&str, &str)] = &[
        ("connect tcp 192.0.2.10 1000", ALLOWED),
        ("connect tcp 192.0.2.10 1001", DENIED),
        ("connect tcp 192.0.2.10 1003", ALLOWED),
        ("connect tcp 192.0.2.10 2497", ALLOWED),
        ("connect tcp 192.0.2.10 2498", DENIED),
        ("connect tcp 192.0.2.10 2500", DENIED),
        ("connect udp 192.0.2.10 1000", DENIED),
        // Under the host's own rule, the /24 rule's set still applies.
        ("connect tcp 192.0.2.7 443", ALLOWED),
        ("connect tcp 192.0.2.7 1999", ALLOWED),
        ("connect tcp 192.0.2.7 2000", DENIED),
        ("connect tcp 192.0.2.8 443", DENIED),
        ("sendto udp 198.51.100.9 8000", ALLOWED),
        ("sendto udp 198.51.100.9 8032", ALLOWED),
        ("sendto udp 198.51.100.9 8033", DENIED),
        ("sendto udp 198.51.100.9 8034", DENIED),
    ];
    for (cmd, want) in table {
        assert_eq!(&probe.cmd(cmd), want, "kernel verdict for `{cmd}`");
        let (proto, dest, port) = flow_of(cmd);
        let d = evaluate_flow(
            Subject::Bound {
                view: Some(active(Mode::Enforce)),
                rules: &rules,
            },
            &[],
            UnknownFlows::Report,
            dest,
            port,
            proto,
            BootInstant::now(),
        );
        let reference = if d.verdict == Verdict::Allow {
            ALLOWED
        } else {
            DENIED
        };
        assert_eq!(&reference, want, "reference verdict for `{cmd}`");
    }
    // A clean stop leaves enforcement in place, the sets its tries name included, and a new
    // start finds them.
    drop(dp);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 1000"), ALLOWED);
    let dp = Datapath::start(&env.config()).expect("restart datapath");
    assert_eq!(dp.port_sets_in_kernel().unwrap(), 2);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 1003"), ALLOWED);
    // The first full apply replaces every trie; rules that need no set leave none behind.
    dp.apply(
        &[],
        vec![IdentityRules {
            identity: 1,
            base: Arc::from(&rules[1..2]),
            hosts: Vec::new(),
            learns: false,
        }],
        &[IdentityConfig {
            identity: 1,
            mode: Mode::Enforce,
            dns: false,
            sni: agentwall::policy::SniCheck::Off,
            io_uring: agentwall::policy::model::IoUring::Refuse,
        }],
        || {},
        |_| IdentityStatus::Active,
    )
    .unwrap();
    assert_eq!(dp.port_sets_in_kernel().unwrap(), 0);
    assert_eq!(probe.cmd("connect tcp 192.0.2.10 1000"), DENIED);
    assert_eq!(probe.cmd("connect tcp 192.0.2.7 443"), ALLOWED);
}

fn record_for(records: &[EventRecord], port: u16) -> &EventRecord {
    records
        .iter()
        .find(|r| r.port == port)
        .unwrap_or_else(|| panic!("no record for port {port} in {records:?}"))
}

#[test]
fn audit_unbound_descendants_expiry_and_revocation() {
    let env = TestEnv::new("modes");
    let dp = Datapath::start(&env.config()).expect("start datapath");
    let mut events = dp.take_events().unwrap();
    let web = vec![rule(1, &["192.0.2.0/24"], &["443"], Protocol::Tcp)];
    let bound = |dp: &Datapath, id: u32, view: Option<IdentityView>, rules: &[Rule]| {
        if let Some(v) = view {
            dp.set_identity(id, v.status, v.mode).unwrap();
        }
        dp.set_rules(id, rules).unwrap();
        let cg = env.cgroup(&format!("id{id}"));
        dp.bind(&cg, id, view.and_then(|v| v.not_after)).unwrap();
        cg
    };

    // Audit mode: the would-be denial is allowed and reported, raw sockets too.
    let audit = bound(&dp, 1, Some(active(Mode::Audit)), &web);
    let mut p = Probe::spawn(&audit);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 80"), ALLOWED);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    assert_eq!(p.cmd("socket inet raw 255"), "ok");
    let recs = drain_until(&mut events, 2);
    assert_eq!(recs.len(), 2, "{recs:?}");
    let r = record_for(&recs, 80);
    assert_eq!(
        (r.kind, r.reason, r.identity),
        (EventKind::Audit, Some(Reason::NoRule), 1)
    );
    let s = recs.iter().find(|r| r.port == 0).unwrap();
    assert_eq!(
        (s.kind, s.reason),
        (EventKind::Audit, Some(Reason::SocketType))
    );

    // A cgroup below a bound one is governed by it.
    let top = bound(&dp, 2, Some(active(Mode::Enforce)), &web);
    let deep = env.cgroup(&format!(
        "{}/worker/deeper",
        top.path().file_name().unwrap().to_str().unwrap()
    ));
    let mut p = Probe::spawn(&deep);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 80"), DENIED);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    let recs = drain_until(&mut events, 1);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].identity, recs[0].cgroup_id), (2, deep.id()));

    // Unbound cgroups: report (default), deny, ignore.
    let other = env.cgroup("unbound");
    let mut p = Probe::spawn(&other);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 81"), ALLOWED);
    let recs = drain_until(&mut events, 1);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].kind, recs[0].identity, recs[0].reason),
        (EventKind::UnknownFlow, 0, None)
    );
    dp.set_unknown_flows(UnknownFlows::Deny).unwrap();
    assert_eq!(p.cmd("connect tcp 192.0.2.10 82"), DENIED);
    assert_eq!(
        p.cmd("socket inet raw 255"),
        "ok",
        "unbound processes keep raw sockets"
    );
    let recs = drain_until(&mut events, 1);
    assert_eq!(
        (recs[0].kind, recs[0].reason),
        (EventKind::Deny, Some(Reason::Unbound))
    );
    dp.set_unknown_flows(UnknownFlows::Ignore).unwrap();
    assert_eq!(p.cmd("connect tcp 192.0.2.10 83"), ALLOWED);
    assert!(events.drain().is_empty());

    // An expired rule no longer allows; a live one does.
    let now = BootInstant::now();
    let mut rules = vec![
        rule(1, &["192.0.2.0/24"], &["443"], Protocol::Tcp),
        rule(2, &["198.51.100.0/24"], &["443"], Protocol::Tcp),
    ];
    rules[0].expires = Some(BootInstant(now.0 - 1));
    rules[1].expires = Some(BootInstant::after(Duration::from_secs(3600)));
    let cg = bound(&dp, 3, Some(active(Mode::Enforce)), &rules);
    let mut p = Probe::spawn(&cg);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), DENIED);
    assert_eq!(p.cmd("connect tcp 198.51.100.1 443"), ALLOWED);

    // Identity past its deadline, revoked, or never written: deny-all, still bound.
    let past = IdentityView {
        not_after: Some(BootInstant(now.0 - 1)),
        ..active(Mode::Audit)
    };
    let revoked = IdentityView {
        status: IdentityStatus::Revoked,
        ..active(Mode::Enforce)
    };
    for (id, view, reason) in [
        (4, Some(past), Reason::Expired),
        (5, Some(revoked), Reason::Revoked),
        (6, None, Reason::Revoked),
    ] {
        let cg = bound(&dp, id, view, &web);
        let mut p = Probe::spawn(&cg);
        events.drain();
        assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), DENIED, "identity {id}");
        let recs = drain_until(&mut events, 1);
        assert_eq!((recs[0].identity, recs[0].reason), (id, Some(reason)));
        // Audit mode (identity 4's) lets it make no socket its policy refuses either.
        assert_eq!(p.cmd("socket inet raw 255"), "err EPERM", "identity {id}");
    }

    // A deadline that passes during the test closes without any userspace action.
    // Long enough for the probe to start and connect once before it, also on an emulated
    // kernel (the kernel matrix).
    let deadline = BootInstant::after(Duration::from_secs(2));
    let cg = bound(
        &dp,
        7,
        Some(IdentityView {
            not_after: Some(deadline),
            ..active(Mode::Enforce)
        }),
        &web,
    );
    let mut p = Probe::spawn(&cg);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    // Waiting for the clock is the behaviour under test, not synchronisation.
    while !deadline.is_past() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), DENIED);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pinned_enforcement_survives_sigkill_and_is_adopted_once() {
    let env = TestEnv::new("restart");
    let agent = env.cgroup("agent");
    let mut loader = std::process::Command::new(agentwall_tests::bin_path("aw-loader"))
        .args([
            env.root.path().to_str().unwrap(),
            env.bpffs_dir.to_str().unwrap(),
            agent.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = loader.stdout.take().unwrap();
    // Killed even when an assertion below fails first.
    let mut loader = KillOnDrop(loader);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    // Every program, the BPF LSM ones only where this kernel runs BPF LSM programs.
    let (all, lsm) = match line.trim().rsplit_once(' ') {
        Some((_, "lsm")) => (agent_common::ALL_PROGRAMS.len(), "lsm"),
        _ => (
            agent_common::ALL_PROGRAMS.len() - agent_common::LSM_PROGRAMS.len(),
            "no-lsm",
        ),
    };
    assert_eq!(
        line.trim(),
        format!("ready {all} {lsm}"),
        "loader attached every program"
    );

    // What a cgroup query lists: Linux 6.1 attaches lsm_cgroup programs but does not list
    // them there.
    let visible = attached_programs(env.root.path()).unwrap().len();
    assert!(
        visible == all || (lsm == "lsm" && visible == all - agent_common::LSM_PROGRAMS.len()),
        "{visible} of {all} programs listed"
    );

    let mut p = Probe::spawn(&agent);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 80"), DENIED);
    loader.0.kill().unwrap();
    loader.0.wait().unwrap();
    // Loader gone: the pinned links and maps keep enforcing.
    assert_eq!(p.cmd("connect tcp 192.0.2.10 81"), DENIED);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    assert_eq!(attached_programs(env.root.path()).unwrap().len(), visible);

    // A new start adopts the pins instead of attaching twice.
    let dp = Datapath::start(&env.config()).unwrap();
    assert_eq!(dp.start_report().attached, 0);
    assert_eq!(dp.start_report().adopted, all);
    assert_eq!(attached_programs(env.root.path()).unwrap().len(), visible);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 82"), DENIED);
    // Records written while nobody was reading are there for the new reader.
    let recs = drain_until(&mut dp.take_events().unwrap(), 3);
    let ports: Vec<u16> = recs.iter().map(|r| r.port).collect();
    assert_eq!(ports, [80, 81, 82]);

    drop(dp);
    teardown(&env.bpffs_dir).unwrap();
    // The kernel releases a link whose last reference went away from a workqueue, so detach
    // lands a moment after the pins are gone.
    let mut left = attached_programs(env.root.path()).unwrap();
    for _ in 0..400 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        left = attached_programs(env.root.path()).unwrap();
    }
    assert_eq!(left, Vec::<u32>::new());
    assert!(!pin_dir(&env.bpffs_dir).exists());
    assert_eq!(
        p.cmd("connect tcp 192.0.2.10 80"),
        ALLOWED,
        "detached: no enforcement left"
    );
}

#[test]
fn policy_swaps_are_atomic_for_connecting_processes() {
    let env = TestEnv::new("atomic");
    let dp = Datapath::start(&env.config()).unwrap();
    let a = vec![
        rule(1, &["192.0.2.0/24"], &["443"], Protocol::Tcp),
        rule(2, &["198.51.100.0/24"], &[], Protocol::Any),
    ];
    let b = vec![
        rule(1, &["192.0.2.10/32"], &["443"], Protocol::Tcp),
        rule(2, &["192.0.2.0/25"], &["443-444"], Protocol::Tcp),
        rule(3, &["203.0.113.0/24"], &["53"], Protocol::Udp),
        rule(4, &["2001:db8::/32"], &["80"], Protocol::Tcp),
    ];
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &a).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut allowed = Probe::spawn(&agent);
    let mut denied = Probe::spawn(&agent);
    let n = 100_000;
    let t1 =
        std::thread::spawn(move || allowed.cmd(&format!("connect-loop tcp 192.0.2.10 443 {n}")));
    let t2 = std::thread::spawn(move || denied.cmd(&format!("connect-loop tcp 192.0.2.10 80 {n}")));
    let mut swaps = 0u32;
    while !(t1.is_finished() && t2.is_finished()) {
        dp.set_rules(1, if swaps.is_multiple_of(2) { &b } else { &a })
            .unwrap();
        swaps += 1;
    }
    assert_eq!(t1.join().unwrap(), format!("eperm=0 other={n}"));
    assert_eq!(t2.join().unwrap(), format!("eperm={n} other=0"));
    assert!(swaps >= 10, "only {swaps} swaps overlapped the loops");
}

/// The packet line reads a socket's binding through the slot the socket noted at creation.
/// A renewal moves the binding to a fresh slot, an unbinding frees it, and a freed slot goes
/// to the next binding: whatever the slot holds, each socket's packets follow its own
/// binding (revoked: dropped; gone: dropped), across a restart of the datapath too.
#[test]
fn every_packet_follows_its_sockets_own_binding_through_renewal_revocation_and_reuse() {
    let env = TestEnv::new("slots");
    let mut dp = Datapath::start(&env.config()).unwrap();
    let local = vec![rule(1, &["127.0.0.1/32"], &["9000"], Protocol::Udp)];
    for id in [1, 2] {
        dp.set_identity(id, IdentityStatus::Active, Mode::Enforce)
            .unwrap();
        dp.set_rules(id, &local).unwrap();
    }
    let cg = env.cgroup("agent");
    dp.bind(&cg, 1, None).unwrap();
    let mut p = Probe::spawn(&cg);
    assert_eq!(p.cmd("udp-bind 127.0.0.1 9000"), "ok");
    assert_eq!(p.cmd("hold udp 127.0.0.1 9000"), "ok");
    assert_eq!(p.cmd("send-held"), "ok");

    // Renewal: a fresh slot; the socket made before it keeps sending, one made after too.
    let later = BootInstant(BootInstant::now().0 + 3_600_000_000_000);
    dp.bind(&cg, 1, Some(later)).unwrap();
    assert_eq!(p.cmd("hold udp 127.0.0.1 9000"), "ok");
    assert_eq!(p.cmd("send-held"), "ok");

    // A restarted datapath rebuilds the slots from the bindings.
    drop(dp);
    dp = Datapath::start(&env.config()).unwrap();
    assert_eq!(p.cmd("send-held"), "ok");

    // Revocation reaches both sockets (one through its slot, one through the binding).
    dp.revoke_binding(cg.id()).unwrap();
    assert_eq!(p.cmd("send-held"), DENIED);

    // Bound afresh, then unbound: the binding is gone, its slot goes to another cgroup's
    // binding, and the sockets stay closed.
    dp.bind(&cg, 1, None).unwrap();
    assert_eq!(p.cmd("send-held"), "ok");
    // A socket that notes the new slot, which then goes to another cgroup's binding.
    let mut fresh = Probe::spawn(&cg);
    assert_eq!(fresh.cmd("udp-bind 127.0.0.1 9000"), "ok");
    assert_eq!(fresh.cmd("hold udp 127.0.0.1 9000"), "ok");
    assert_eq!(fresh.cmd("send-held"), "ok");
    let maps = pin_dir(&env.bpffs_dir).join("maps");
    let bindings: aya::maps::HashMap<_, u64, agent_common::Binding> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(maps.join(agent_common::MAP_BINDINGS)).unwrap(),
        ))
        .unwrap();
    let noted = bindings.get(&cg.id(), 0).unwrap().slot;
    dp.unbind_id(cg.id()).unwrap();
    assert_eq!(p.cmd("send-held"), DENIED);
    assert_eq!(fresh.cmd("send-held"), DENIED);
    let other = env.cgroup("other");
    dp.bind(&other, 2, None).unwrap();
    assert_eq!(p.cmd("send-held"), DENIED);
    assert_eq!(fresh.cmd("send-held"), DENIED);
    // Freed slots are reused last, but they are reused: the slot the socket noted, holding
    // the other cgroup's binding, is not the socket's.
    let mut slots: aya::maps::Array<_, agent_common::BindingSlot> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(maps.join(agent_common::MAP_BINDING_SLOTS)).unwrap(),
        ))
        .unwrap();
    let theirs = bindings.get(&other.id(), 0).unwrap();
    slots
        .set(
            noted,
            agent_common::BindingSlot {
                cgroup_id: other.id(),
                binding: theirs,
            },
            0,
        )
        .unwrap();
    assert_eq!(fresh.cmd("send-held"), DENIED);
    let mut q = Probe::spawn(&other);
    assert_eq!(q.cmd("udp-bind 127.0.0.1 9000"), "ok");
    assert_eq!(q.cmd("hold udp 127.0.0.1 9000"), "ok");
    assert_eq!(q.cmd("send-held"), "ok");
}

#[test]
fn drop_counter_accounts_for_every_record_not_read() {
    let env = TestEnv::new("drops");
    let dp = Datapath::start(&env.config()).unwrap();
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &[]).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut p = Probe::spawn(&agent);
    // 20,000 distinct denials (one per port) with nobody reading: more than the ring holds.
    let sent = 20_000u64;
    assert_eq!(
        p.cmd(&format!("sweep tcp 192.0.2.1 1 {sent}")),
        format!("eperm={sent} other=0")
    );
    let read = dp.take_events().unwrap().drain().len() as u64;
    let dropped = dp.dropped_events().unwrap();
    assert!(dropped > 0, "the ring buffer never filled ({read} read)");
    assert_eq!(read + dropped, sent, "read {read} + dropped {dropped}");
}

/// A datapath with two identities and nothing allowed: identity 1's probe (loud) and
/// identity 2's (quiet).
fn loud_and_quiet(env: &TestEnv) -> (Datapath, Probe, Probe) {
    let dp = Datapath::start(&env.config()).unwrap();
    let [loud, quiet] = [1, 2].map(|id| {
        dp.set_identity(id, IdentityStatus::Active, Mode::Enforce)
            .unwrap();
        dp.set_rules(id, &[]).unwrap();
        let cg = env.cgroup(if id == 1 { "loud" } else { "quiet" });
        dp.bind(&cg, id, None).unwrap();
        Probe::spawn(&cg)
    });
    (dp, loud, quiet)
}

/// One governed identity flooding distinct flows fills only its share of the governed ring:
/// the last quarter is kept for identities that have written little this window, so every
/// denial of a quiet identity is read. Nothing goes uncounted.
#[test]
fn a_loud_identity_leaves_room_for_every_other_identitys_denials() {
    let env = TestEnv::new("loud");
    let (dp, mut loud, mut quiet) = loud_and_quiet(&env);
    // Far more distinct denials than the ring holds, nobody reading.
    let flood = 20000u64;
    assert_eq!(
        loud.cmd(&format!("sweep tcp 192.0.2.1 1 {flood}")),
        format!("eperm={flood} other=0")
    );
    let sent = 300u64;
    assert_eq!(
        quiet.cmd(&format!("sweep tcp 192.0.2.1 1 {sent}")),
        format!("eperm={sent} other=0")
    );
    let records = dp.take_events().unwrap().drain();
    let drops = dp.dropped_by_ring().unwrap();
    let of = |id: u32| records.iter().filter(|r| r.identity == id).count() as u64;
    assert_eq!(of(2), sent, "{drops:?}");
    assert!(drops.governed > 0, "the flood never filled its share");
    assert_eq!(of(1) + drops.governed, flood, "{drops:?}");
}

/// The same with a node that reads, but slower than the flood: a few records read do not
/// hand the flooder the reserve again (its share is per quarter of the ring the node reads).
#[test]
fn a_slow_reader_still_leaves_room_for_quiet_identities() {
    let env = TestEnv::new("loud-slow");
    let (dp, mut loud, mut quiet) = loud_and_quiet(&env);
    let mut events = dp.take_events().unwrap();
    let mut flood = 20000u64;
    assert_eq!(
        loud.cmd(&format!("sweep tcp 192.0.2.1 1 {flood}")),
        format!("eperm={flood} other=0")
    );
    // The node reads a little at a time while the flood goes on: every read moves the ring's
    // consumer, which must not give the flooder its share again each time.
    let mut read = vec![];
    for round in 0..10 {
        let before = read.len();
        read.extend((0..10).map_while(|_| events.try_next()));
        assert_eq!(read.len(), before + 10);
        assert_eq!(
            loud.cmd(&format!("sweep tcp 192.0.2.{} 1 1000", 10 + round)),
            "eperm=1000 other=0"
        );
        flood += 1000;
    }
    let sent = 300u64;
    assert_eq!(
        quiet.cmd(&format!("sweep tcp 192.0.2.1 1 {sent}")),
        format!("eperm={sent} other=0")
    );
    read.extend(events.drain());
    let drops = dp.dropped_by_ring().unwrap();
    let of = |id: u32| read.iter().filter(|r| r.identity == id).count() as u64;
    assert_eq!(of(2), sent, "{drops:?}");
    assert_eq!(of(1) + drops.governed, flood, "{drops:?}");
}

/// Unbound processes (any local user) have their own ring buffer and rate table: flooding
/// them loses only their own records, counted, and every governed denial is read.
#[test]
fn a_flood_of_unknown_flows_leaves_every_governed_denial_recorded() {
    let env = TestEnv::new("flood");
    let mut cfg = env.config();
    cfg.unknown_flows = UnknownFlows::Report;
    let dp = Datapath::start(&cfg).unwrap();
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &[]).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut governed = Probe::spawn(&agent);
    let mut stranger = Probe::spawn(&env.cgroup("stranger"));
    // The stranger's distinct flows, nobody reading: far more than a ring holds.
    let flood = 8000u64;
    assert_eq!(
        stranger.cmd(&format!("sweep udp 192.0.2.1 1 {flood}")),
        format!("eperm=0 other={flood}")
    );
    let sent = 300u64;
    assert_eq!(
        governed.cmd(&format!("sweep tcp 192.0.2.1 1 {sent}")),
        format!("eperm={sent} other=0")
    );
    let records = dp.take_events().unwrap().drain();
    let drops = dp.dropped_by_ring().unwrap();
    let denials = records
        .iter()
        .filter(|r| r.identity == 1 && r.kind == EventKind::Deny)
        .count() as u64;
    let unknown = records.iter().filter(|r| r.identity == 0).count() as u64;
    assert_eq!(drops.governed, 0, "{drops:?}");
    assert_eq!(denials, sent, "{drops:?}");
    assert!(
        drops.unknown > 0,
        "the flood never filled its ring ({unknown} read)"
    );
    assert_eq!(unknown + drops.unknown, flood, "{drops:?}");
    // Governed records come first.
    let first_unknown = records.iter().position(|r| r.identity == 0).unwrap();
    assert!(records[..first_unknown].len() as u64 == sent);
}

#[test]
fn identical_denials_are_rate_limited_and_counted() {
    let env = TestEnv::new("ratelimit");
    let mut cfg = env.config();
    cfg.rate_window = Duration::from_millis(100);
    let dp = Datapath::start(&cfg).unwrap();
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &[]).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut events = dp.take_events().unwrap();
    let mut p = Probe::spawn(&agent);
    assert_eq!(
        p.cmd("connect-loop tcp 192.0.2.1 80 500"),
        "eperm=500 other=0"
    );
    let first = BootInstant::now();
    // One more after the window has surely closed carries the count of what was folded.
    while BootInstant::now().0 < first.0 + 150_000_000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(p.cmd("connect tcp 192.0.2.1 80"), DENIED);
    let recs = events.drain();
    assert!(
        recs.len() < 50,
        "{} records for 501 identical denials",
        recs.len()
    );
    let total: u64 = recs.iter().map(|r| 1 + u64::from(r.suppressed)).sum();
    assert_eq!(total, 501);
}

#[test]
fn learned_hosts_are_written_in_place_and_merge_with_wider_rules() {
    let env = TestEnv::new("hosts");
    let dp = Datapath::start(&env.config()).expect("start datapath");
    let gd = default_deny();
    dp.set_global_deny(&gd).unwrap();
    let base = vec![
        rule(1, &["192.0.2.0/24"], &["80"], Protocol::Tcp),
        Rule {
            fqdns: vec!["api.example.com".parse().unwrap()],
            ..rule(2, &[], &["443"], Protocol::Tcp)
        },
    ];
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &base).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut probe = Probe::spawn(&agent);
    let host = |ip: &str, expires: Option<BootInstant>| Rule {
        expires,
        ..rule(2, &[ip], &["443"], Protocol::Tcp)
    };
    let check = |probe: &mut Probe, rules: &[Rule], table: &[(&str, &str)]| {
        for (cmd, want) in table {
            assert_eq!(&probe.cmd(cmd), want, "kernel verdict for `{cmd}`");
            let (proto, dest, port) = flow_of(cmd);
            let d = evaluate_flow(
                Subject::Bound {
                    view: Some(active(Mode::Enforce)),
                    rules,
                },
                &gd,
                UnknownFlows::Report,
                dest,
                port,
                proto,
                BootInstant::now(),
            );
            assert_eq!(
                d.verdict == Verdict::Allow,
                *want == ALLOWED,
                "reference evaluator for `{cmd}`"
            );
        }
    };
    check(
        &mut probe,
        &base,
        &[
            ("connect tcp 192.0.2.5 443", DENIED),
            ("connect tcp 192.0.2.5 80", ALLOWED),
        ],
    );

    // The name resolved to 192.0.2.5 (inside the /24) and 198.51.100.9 (outside any rule).
    let far = BootInstant(BootInstant::now().0 + 3_600_000_000_000);
    let mut rules = base.clone();
    rules.push(host("192.0.2.5/32", Some(far)));
    rules.push(host("198.51.100.9/32", Some(far)));
    let addrs: Vec<IpAddr> = vec![
        "192.0.2.5".parse().unwrap(),
        "198.51.100.9".parse().unwrap(),
    ];
    dp.update_hosts(1, &rules, &addrs).unwrap();
    let learned = [
        ("connect tcp 192.0.2.5 443", ALLOWED),
        // The /24 rule's port is still there on the host entry.
        ("connect tcp 192.0.2.5 80", ALLOWED),
        ("connect tcp 192.0.2.6 443", DENIED),
        ("connect tcp 198.51.100.9 443", ALLOWED),
        ("connect tcp 198.51.100.9 80", DENIED),
        ("connect udp 198.51.100.9 443", DENIED),
    ];
    check(&mut probe, &rules, &learned);

    // A deadline in the past denies at once; dropping the host rules removes the entries.
    let past = BootInstant(BootInstant::now().0 - 1);
    let mut expired = base.clone();
    expired.push(host("198.51.100.9/32", Some(past)));
    dp.update_hosts(1, &expired, &addrs[1..]).unwrap();
    assert_eq!(probe.cmd("connect tcp 198.51.100.9 443"), DENIED);
    dp.update_hosts(1, &base, &addrs).unwrap();
    check(
        &mut probe,
        &base,
        &[
            ("connect tcp 192.0.2.5 443", DENIED),
            ("connect tcp 192.0.2.5 80", ALLOWED),
            ("connect tcp 198.51.100.9 443", DENIED),
        ],
    );
}

/// A policy change is staged, then swapped in; a DNS answer can arrive in between. Its host
/// entry must be in the new trie, not only the old one, or the agent that just got the answer
/// is denied the address. And a revocation racing the change is never undone by it.
#[test]
fn hosts_learned_during_a_change_reach_the_new_rules_and_revocations_stay() {
    let env = TestEnv::new("staged");
    let dp = Datapath::start(&env.config()).expect("start datapath");
    let gd = default_deny();
    let named = Rule {
        fqdns: vec!["api.example.com".parse().unwrap()],
        ..rule(1, &[], &["443"], Protocol::Tcp)
    };
    let config = [IdentityConfig {
        identity: 1,
        mode: Mode::Enforce,
        dns: false,
        sni: agentwall::policy::SniCheck::Off,
        io_uring: agentwall::policy::model::IoUring::Refuse,
    }];
    let set = |base: Vec<Rule>| {
        vec![IdentityRules {
            identity: 1,
            base: Arc::from(base),
            hosts: Vec::new(),
            learns: true,
        }]
    };
    dp.apply(
        &gd,
        set(vec![named.clone()]),
        &config,
        || {},
        |_| IdentityStatus::Active,
    )
    .unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut probe = Probe::spawn(&agent);
    assert_eq!(probe.cmd("connect tcp 198.51.100.9 443"), DENIED);
    assert_eq!(probe.cmd("connect tcp 192.0.2.1 80"), DENIED);

    // The answer for the name arrives after the new tries are staged, before the swap.
    let ip: IpAddr = "198.51.100.9".parse().unwrap();
    let with_host = |base: &[Rule], _: &[IpNet]| {
        let mut rules = base.to_vec();
        rules.push(rule(1, &["198.51.100.9/32"], &["443"], Protocol::Tcp));
        rules
    };
    let changed = vec![named, rule(2, &["192.0.2.0/24"], &["80"], Protocol::Tcp)];
    dp.apply(
        &gd,
        set(changed.clone()),
        &config,
        || dp.update_hosts_with(1, &[ip], with_host).unwrap(),
        |_| IdentityStatus::Active,
    )
    .unwrap();
    assert_eq!(
        probe.cmd("connect tcp 198.51.100.9 443"),
        ALLOWED,
        "the host learned mid-change is in the new rules"
    );
    assert_eq!(probe.cmd("connect tcp 192.0.2.1 80"), ALLOWED);

    // A change whose states are written after a revocation writes the identity revoked.
    let mut more = changed;
    more.push(rule(3, &["203.0.113.0/24"], &["80"], Protocol::Tcp));
    dp.apply(&gd, set(more), &config, || {}, |_| IdentityStatus::Revoked)
        .unwrap();
    assert_eq!(probe.cmd("connect tcp 192.0.2.1 80"), DENIED);
}

/// `connect(0.0.0.0:P)` and `connect([::]:P)` reach loopback (the kernel rewrites them after
/// the hooks ran): they are judged as 127.0.0.1 and ::1, so a rule for every address does not
/// open a loopback the global deny list closes.
#[test]
fn the_unspecified_address_is_judged_as_loopback() {
    let env = TestEnv::new("unspecified");
    let dp = Datapath::start(&env.config()).expect("start datapath");
    let gd: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    dp.set_global_deny(&gd).unwrap();
    let rules = vec![
        rule(1, &["0.0.0.0/0"], &["8080"], Protocol::Any),
        rule(2, &["::/0"], &["8080"], Protocol::Any),
    ];
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &rules).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut probe = Probe::spawn(&agent);
    // Listeners on loopback in the probe's namespace: an allowed connect would succeed.
    assert_eq!(probe.cmd("listen tcp 127.0.0.1 8080"), "ok");
    assert_eq!(probe.cmd("listen tcp ::1 8080"), "ok");
    for (cmd, want) in [
        ("connect tcp 127.0.0.1 8080", DENIED),
        ("connect tcp 0.0.0.0 8080", DENIED),
        ("connect tcp :: 8080", DENIED),
        ("connect tcp ::ffff:0.0.0.0 8080", DENIED),
        ("connect udp 0.0.0.0 8080", DENIED),
        ("sendto udp 0.0.0.0 8080", DENIED),
        ("sendto udp :: 8080", DENIED),
        ("connect tcp 198.51.100.1 8080", ALLOWED),
    ] {
        assert_eq!(probe.cmd(cmd), want, "kernel verdict for `{cmd}`");
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
        assert_eq!(
            d.verdict == Verdict::Allow,
            want == ALLOWED,
            "reference evaluator for `{cmd}`"
        );
    }
}

/// An upgrade to a new map layout: the new version attaches first, then the pins of the old
/// one are removed, so enforcement never lapses and the old programs stop judging.
#[test]
fn a_new_map_layout_retires_the_old_pins_after_attaching() {
    let env = TestEnv::new("retire");
    let dp = Datapath::start(&env.config()).unwrap();
    let all = dp.start_report().attached;
    drop(dp);
    let old_ids = attached_programs(env.root.path()).unwrap();
    // The running version's pins, renamed as an older layout would have left them.
    let old = env.bpffs_dir.join("v1");
    std::fs::rename(pin_dir(&env.bpffs_dir), &old).unwrap();
    assert_eq!(attached_programs(env.root.path()).unwrap(), old_ids);

    let dp = Datapath::start(&env.config()).unwrap();
    assert_eq!(dp.start_report().attached, all);
    assert!(!old.exists(), "the old layout's pins are gone");
    // Detaching a link whose last pin went away lands from a workqueue a moment later (a
    // while, on the matrix's emulated guests). What a cgroup query lists of lsm_cgroup
    // programs differs between kernels, so the test asks only that none of the old programs
    // is left and new ones are there.
    let mut now = attached_programs(env.root.path()).unwrap();
    for _ in 0..6000 {
        if !now.iter().any(|id| old_ids.contains(id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        now = attached_programs(env.root.path()).unwrap();
    }
    assert!(
        !now.iter().any(|id| old_ids.contains(id)),
        "old programs still attached: {old_ids:?} / {now:?}"
    );
    assert!(!now.is_empty());
}

/// An upgrade whose programs changed and whose maps did not (no new map layout): each pinned
/// link takes the new build's program in place of the old one, in one step, so enforcement
/// never lapses and the old programs stop judging. A pinned link someone detached is attached
/// again at the next start.
#[test]
fn a_start_replaces_another_builds_programs_and_attaches_detached_links_again() {
    let env = TestEnv::new("swap");
    let agent = env.cgroup("agent");
    let dp = Datapath::start(&env.config()).unwrap();
    let all = dp.start_report().attached;
    // One node per pin directory: a second start would swap and remove the first's links.
    let busy = Datapath::start(&env.config())
        .err()
        .expect("refused")
        .to_string();
    assert!(busy.starts_with("another agentwall node holds "), "{busy}");
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &[rule(1, &["192.0.2.0/24"], &["443"], Protocol::Tcp)])
        .unwrap();
    dp.bind(&agent, 1, None).unwrap();
    let mut p = Probe::spawn(&agent);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 80"), DENIED);
    drop(dp);
    let old_ids = attached_programs(env.root.path()).unwrap();

    // Pins another build attached: every link gets this build's program.
    set_pinned_revision(&env.bpffs_dir, 0x0bad_c0de);
    let dp = Datapath::start(&env.config()).unwrap();
    let r = dp.start_report();
    assert_eq!((r.attached, r.adopted, r.replaced), (0, all, all));
    let new_ids = attached_programs(env.root.path()).unwrap();
    assert_eq!(new_ids.len(), old_ids.len(), "one program per hook");
    assert!(
        !new_ids.iter().any(|id| old_ids.contains(id)),
        "old programs still attached: {old_ids:?} -> {new_ids:?}"
    );
    assert_eq!(p.cmd("connect tcp 192.0.2.10 81"), DENIED);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    drop(dp);

    // The same build again: everything adopted as it is.
    let dp = Datapath::start(&env.config()).unwrap();
    let r = dp.start_report();
    assert_eq!((r.attached, r.adopted, r.replaced), (0, all, 0));
    assert_eq!(attached_programs(env.root.path()).unwrap(), new_ids);
    drop(dp);

    // A link pinned under a name this build has no program for (as a newer build's would
    // be after a downgrade): detached at the next start, this build's own left as they are.
    let links = pin_dir(&env.bpffs_dir).join("links");
    agentwall_tests::pin_again(
        &links.join(agent_common::PROG_CONNECT6),
        &links.join("aw_from_a_newer_build"),
    );
    let dp = Datapath::start(&env.config()).unwrap();
    let r = dp.start_report();
    assert_eq!((r.adopted, r.replaced, r.removed), (all, 0, 1));
    assert!(!links.join("aw_from_a_newer_build").exists());
    assert_eq!(attached_programs(env.root.path()).unwrap(), new_ids);
    drop(dp);

    // The connect4 link detached behind the node's back: its pin stays, it runs nothing.
    agentwall_tests::detach_pinned_link(
        &pin_dir(&env.bpffs_dir)
            .join("links")
            .join(agent_common::PROG_CONNECT4),
    );
    assert_eq!(p.cmd("connect tcp 192.0.2.10 82"), ALLOWED);
    let dp = Datapath::start(&env.config()).unwrap();
    let r = dp.start_report();
    assert_eq!((r.attached, r.adopted, r.replaced), (1, all - 1, 1));
    assert_eq!(p.cmd("connect tcp 192.0.2.10 83"), DENIED);
    assert_eq!(p.cmd("connect tcp 192.0.2.10 443"), ALLOWED);
    drop(dp);

    // The same pins with another attach point: refused, the links left enforcing where
    // they are (taking them away would leave the agent here unjudged).
    let before = attached_programs(env.root.path()).unwrap();
    let mut elsewhere = env.config();
    elsewhere.attach_cgroup = env.cgroup("elsewhere").path().to_owned();
    let err = Datapath::start(&elsewhere)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("enforces cgroup") && err.contains("not the attach point"),
        "{err}"
    );
    assert_eq!(p.cmd("connect tcp 192.0.2.10 84"), DENIED);
    assert_eq!(attached_programs(env.root.path()).unwrap(), before);
    teardown(&env.bpffs_dir).unwrap();
}

/// A pin directory another user made first (bpffs is often world-writable), one anyone may
/// write, or one that leads elsewhere through a symbolic link is refused, at start and at
/// teardown: its maker would hold every pin (and could detach every program by removing
/// them), or point a teardown at files outside bpffs.
#[test]
fn pin_directories_another_user_made_or_that_lead_elsewhere_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = TestEnv::new("pindir");
    std::fs::create_dir_all(&env.bpffs_dir).unwrap();
    let chown = |uid: u32| std::os::unix::fs::chown(&env.bpffs_dir, Some(uid), Some(uid)).unwrap();
    chown(65534);
    let err = Datapath::start(&env.config()).err().expect("refused");
    assert!(
        err.to_string()
            .contains("is not a safe pin directory: owned by uid 65534, not 0"),
        "{err}"
    );
    assert!(attached_programs(env.root.path()).unwrap().is_empty());
    chown(0);
    std::fs::set_permissions(&env.bpffs_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = Datapath::start(&env.config()).err().expect("refused");
    assert!(
        err.to_string()
            .contains("mode 777: writable by its group or by anyone"),
        "{err}"
    );
    std::fs::set_permissions(&env.bpffs_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Datapath::start(&env.config()).expect("a safe directory starts"));

    // The maps directory swapped for a link to somewhere else: teardown removes nothing there.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("precious"), "x").unwrap();
    let dir = pin_dir(&env.bpffs_dir);
    let real = env.bpffs_dir.join("real");
    std::fs::rename(&dir, &real).unwrap();
    std::fs::create_dir_all(dir.join("links")).unwrap();
    let maps = dir.join("maps");
    std::os::unix::fs::symlink(elsewhere.path(), &maps).unwrap();
    let err = agentwall::datapath::teardown_all(&env.bpffs_dir).expect_err("refused");
    assert!(
        err.to_string()
            .contains("not a directory (a symbolic link?)"),
        "{err}"
    );
    assert!(elsewhere.path().join("precious").exists());
    // All or nothing: the refusal removed no level it had checked either.
    assert!(dir.join("links").is_dir());
    let err = Datapath::start(&env.config()).err().expect("refused");
    assert!(
        err.to_string().contains("not a safe pin directory"),
        "{err}"
    );
    std::fs::remove_file(&maps).unwrap();
    std::fs::remove_dir(dir.join("links")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    std::fs::rename(&real, &dir).unwrap();
    assert_eq!(
        agentwall::datapath::teardown_all(&env.bpffs_dir).unwrap(),
        [format!("v{}", agent_common::ABI_VERSION)]
    );
    assert!(attached_programs(env.root.path()).unwrap().is_empty());
}

/// The server-name check is in its `AW_TAILS` slot from the moment a start opens the maps,
/// before its first apply writes identity states that hand connections to it: a connection
/// made before attach is checked, not held until the slot is filled.
#[test]
fn the_server_name_check_is_in_its_slot_before_the_first_apply() {
    use std::os::fd::AsFd as _;
    let env = TestEnv::new("tail-first");
    let (dp, programs) = Datapath::load(&env.config()).unwrap().open().unwrap();
    let slots = || {
        let path = pin_dir(&env.bpffs_dir)
            .join("maps")
            .join(agent_common::MAP_TAILS);
        let map = aya::maps::MapData::from_pin(&path).unwrap();
        agentwall::datapath::sys::filled_slots(map.fd().as_fd(), agent_common::TAILS).unwrap()
    };
    assert_eq!(
        *dp.server_name_check(),
        agentwall::datapath::ServerNameCheck::Loaded
    );
    assert_eq!(slots(), [agent_common::TAIL_SNI]);
    dp.attach(programs).unwrap();
    assert_eq!(slots(), [agent_common::TAIL_SNI]);
}
