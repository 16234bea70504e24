//! `cargo xtask bench datapath`: what the datapath adds to connect(). `dns` (in dns.rs): what
//! the DNS proxy adds to a lookup.
//!
//! A probe in its own network namespace times TCP connects to a loopback listener, from a
//! cgroup outside the attach point (baseline: no program runs) and from a cgroup bound to an
//! identity, with 10, 10,000 and 100,000 rules loaded across 1,000 identities. Baseline and
//! governed runs alternate so drift hits both alike; the table shows medians over the rounds.

use std::time::Instant;

use agentwall::{
    datapath::{Datapath, sys},
    policy::{IdentityStatus, IdentityView, Mode, Protocol, Rule},
};
use agentwall_tests::{Probe, TestEnv};
use ipnet::{IpNet, Ipv4Net};

const PORT: u16 = 18443;
const ROUNDS: usize = 9;

/// The numbers of a probe's `key=value ...` answer, in order.
pub(crate) fn values(answer: &str) -> Vec<u64> {
    answer
        .split_whitespace()
        .map(|kv| {
            kv.split_once('=')
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("bad bench answer {answer:?}"))
        })
        .collect()
}

/// `p50=NS p99=NS`.
pub(crate) fn parse(answer: &str) -> (u64, u64) {
    let v = values(answer);
    (v[0], v[1])
}

/// Cumulative (run time ns, run count) of the connect4 program attached at `cgroup`, from the
/// kernel's own BPF run-time statistics.
fn connect4_stats(cgroup: &std::path::Path) -> (u64, u64) {
    prog_stats(cgroup, sys::ATTACH_INET4_CONNECT)
}

/// The same for the program at `attach_type`.
fn prog_stats(cgroup: &std::path::Path, attach_type: u32) -> (u64, u64) {
    let ids = sys::prog_query(cgroup, attach_type).expect("prog query");
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| ids.contains(&p.id()))
        .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
        .expect("the program is loaded")
}

pub(crate) fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// `n` rules for one identity: the listener's address plus filler /32s and /24s in 10/8.
fn rules_for(identity: u32, n: usize) -> Vec<Rule> {
    let mut rules = vec![Rule {
        id: 1,
        fqdns: Vec::new(),
        to: vec![
            "127.0.0.1/32".parse().unwrap(),
            OFF_HOST_NET.parse().unwrap(),
        ],
        ports: vec![PORT.to_string().parse().unwrap()],
        protocol: Protocol::Any,
        direction: agentwall::policy::Direction::Egress,
        expires: None,
        ech: Box::default(),
        learned: false,
    }];
    for i in 1..n as u32 {
        let x = identity.wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503);
        let len = if i % 4 == 0 { 24 } else { 32 };
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (x & 0x00ff_ffff));
        rules.push(Rule {
            id: i + 1,
            fqdns: Vec::new(),
            to: vec![IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())],
            ports: vec!["443".parse().unwrap()],
            protocol: Protocol::Tcp,
            direction: agentwall::policy::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        });
    }
    rules
}

/// The packet line (cgroup_skb egress), governed against ungoverned in the same rounds: UDP
/// datagrams per second unconnected (sendmsg hook and packet line) and connected (the packet
/// line alone), TCP bulk throughput, and the egress program's own cost per packet.
/// Where the packet line's probes run.
struct Subjects<'a> {
    /// Outside the attach point: no program on the path.
    plain: &'a agentwall::cgroup::Cgroup,
    governed: &'a agentwall::cgroup::Cgroup,
    /// Under the attach point, bound to nothing.
    unbound: &'a agentwall::cgroup::Cgroup,
    /// Two programs that only pass.
    empty: &'a agentwall::cgroup::Cgroup,
}

fn packet_line(
    subjects: &Subjects<'_>,
    attach: &std::path::Path,
    iterations: usize,
    set_stats: &dyn Fn(bool),
    set_strays: &dyn Fn(bool),
) {
    let Subjects {
        plain,
        governed,
        unbound,
        empty,
    } = *subjects;
    let n = iterations * 10;
    let mib = 256;
    // Loopback: the sender's syscall also delivers the datagram to the local sink, so each
    // one passes the egress line and the ingress line. Leaving the host (a dummy device in the
    // probe's namespace, which drops what it is given): the egress line alone, as for an
    // agent talking to other hosts.
    let cmds = [
        (
            "UDP sendto, unconnected, loopback (datagrams/s)",
            format!("bench-sendto 127.0.0.1 {PORT} {n}"),
        ),
        (
            "UDP send, connected, loopback (datagrams/s)",
            format!("bench-send 127.0.0.1 {PORT} {n}"),
        ),
        (
            "UDP sendto, unconnected, leaving the host (datagrams/s)",
            format!("bench-sendto-out {OFF_HOST_PEER} {PORT} {n}"),
        ),
        (
            "UDP send, connected, leaving the host (datagrams/s)",
            format!("bench-send-out {OFF_HOST_PEER} {PORT} {n}"),
        ),
        (
            "UDP sendto, unconnected, leaving the host, 1,200 bytes (datagrams/s)",
            format!("bench-sendto-out {OFF_HOST_PEER} {PORT} {n} 1200"),
        ),
        (
            "UDP send, connected, leaving the host, 1,200 bytes (datagrams/s)",
            format!("bench-send-out {OFF_HOST_PEER} {PORT} {n} 1200"),
        ),
        (
            "TCP bulk, one connection, loopback (MiB/s)",
            format!("bench-bulk 127.0.0.1 {PORT} {mib}"),
        ),
    ];
    let measure = |cg: &agentwall::cgroup::Cgroup, cmd: &str| {
        let mut p = Probe::spawn(cg);
        if cmd.contains("-out ") {
            off_host_device(&mut p);
        }
        values(&p.cmd(cmd))[0]
    };
    println!();
    println!(
        "The packet line: {n} datagrams / {mib} MiB per measurement, {ROUNDS} rounds, medians"
    );
    println!();
    // A third cgroup runs two programs that only pass (egress and ingress, as the governed
    // one has): what any cgroup_skb line costs before it judges anything.
    let floor = [
        EmptyProgram::attach(empty.path(), sys::ATTACH_INET_EGRESS),
        EmptyProgram::attach(empty.path(), sys::ATTACH_INET_INGRESS),
    ];
    println!(
        "| measure | ungoverned | empty programs | governed | governed / ungoverned | governed / empty programs |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, cmd) in &cmds {
        let (mut base, mut bare, mut gov) = (vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            base.push(measure(plain, cmd));
            bare.push(measure(empty, cmd));
            gov.push(measure(governed, cmd));
        }
        let (b, e, g) = (median(base), median(bare), median(gov));
        println!(
            "| {label} | {b} | {e} | {g} | {:.3} | {:.3} |",
            g as f64 / b.max(1) as f64,
            g as f64 / e.max(1) as f64
        );
    }
    // Each connected datagram passes the egress program at the sender and the ingress
    // program at the receiving socket (a governed task made both). An empty program attached
    // the same way gives the floor: the kernel's dispatch and the statistics' own clock reads.
    set_stats(true);
    let per_run_of =
        |cg: &agentwall::cgroup::Cgroup, at: &std::path::Path, kinds: &[u32], cmd: &str| {
            let before: Vec<_> = kinds.iter().map(|&k| prog_stats(at, k)).collect();
            Probe::spawn(cg).cmd(cmd);
            let after: Vec<_> = kinds.iter().map(|&k| prog_stats(at, k)).collect();
            before
                .iter()
                .zip(&after)
                .map(|(b, a)| (a.0 - b.0) / (a.1 - b.1).max(1))
                .collect::<Vec<_>>()
        };
    let per_run = |cg: &agentwall::cgroup::Cgroup, at: &std::path::Path, kinds: &[u32]| {
        per_run_of(cg, at, kinds, &cmds[1].1)
    };
    let mut rounds = vec![];
    for _ in 0..ROUNDS {
        let gov = per_run(
            governed,
            attach,
            &[sys::ATTACH_INET_EGRESS, sys::ATTACH_INET_INGRESS],
        );
        let floor = per_run(empty, empty.path(), &[sys::ATTACH_INET_EGRESS]);
        let unconnected = per_run_of(
            governed,
            attach,
            &[sys::ATTACH_UDP4_SENDMSG, sys::ATTACH_INET_EGRESS],
            &cmds[0].1,
        );
        // A socket of an unbound cgroup under the attach point carries no state. While a
        // bound cgroup may hold sockets older than its binding (an enrolled unit), each of
        // its packets asks whether its cgroup is bound; otherwise not.
        let stray_off = per_run(unbound, attach, &[sys::ATTACH_INET_EGRESS]);
        set_strays(true);
        let stray = per_run(unbound, attach, &[sys::ATTACH_INET_EGRESS]);
        set_strays(false);
        rounds.push((
            gov[0],
            gov[1],
            floor[0],
            unconnected[0],
            unconnected[1],
            stray[0],
            stray_off[0],
        ));
    }
    set_stats(false);
    drop(floor);
    let egress = median(rounds.iter().map(|r| r.0).collect());
    let ingress = median(rounds.iter().map(|r| r.1).collect());
    let floor = median(rounds.iter().map(|r| r.2).collect());
    println!();
    println!(
        "The packet line's own cost per packet (connected UDP, the fast path; kernel run-time \
         statistics, median of {ROUNDS} rounds):"
    );
    println!();
    println!("| program | ns/packet | above an empty program |");
    println!("|---|---:|---:|");
    println!("| empty cgroup_skb program (floor) | {floor} | 0 |");
    println!("| egress | {egress} | {:+} |", egress as i64 - floor as i64);
    println!(
        "| ingress | {ingress} | {:+} |",
        ingress as i64 - floor as i64
    );
    let stray = median(rounds.iter().map(|r| r.5).collect());
    let stray_off = median(rounds.iter().map(|r| r.6).collect());
    println!(
        "| egress, a socket of an unbound cgroup | {stray_off} | {:+} |",
        stray_off as i64 - floor as i64
    );
    println!(
        "| the same, while an enrolled unit may hold sockets older than its binding | {stray} | {:+} |",
        stray as i64 - floor as i64
    );
    let sendmsg = median(rounds.iter().map(|r| r.3).collect());
    let egress_unconnected = median(rounds.iter().map(|r| r.4).collect());
    println!();
    println!(
        "Unconnected UDP (every datagram judged by the sendmsg4 hook, then the packet line): \
         sendmsg4 {sendmsg} ns/datagram, egress {egress_unconnected} ns/packet."
    );
}

/// The named-server check's cost: TLS-shaped connections (connect, then a ClientHello as
/// the first data) and a long TLS-shaped flow, to the same loopback listener allowed by an
/// address rule (not looked at) and by a name rule (its first data checked), in the same
/// rounds; and the check's own run time from the kernel's statistics.
fn server_name_check(
    dp: &Datapath,
    governed: &agentwall::cgroup::Cgroup,
    attach: &std::path::Path,
    iterations: usize,
    set_stats: &dyn Fn(bool),
) {
    use agentwall::{datapath::sni::Names, policy::model::SniCheck};
    const NAME: &str = "api.example.com";
    let rule = |by_name: bool| Rule {
        id: 1,
        fqdns: if by_name {
            vec![NAME.parse().unwrap()]
        } else {
            Vec::new()
        },
        to: vec!["127.0.0.1/32".parse().unwrap()],
        ports: vec![PORT.to_string().parse().unwrap()],
        protocol: Protocol::Tcp,
        direction: agentwall::policy::Direction::Egress,
        expires: None,
        ech: Box::default(),
        learned: by_name,
    };
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let names: Names = [(NAME.to_owned(), [1, 0, 0, 0])].into_iter().collect();
    dp.set_sni_check(1, SniCheck::Enforce).unwrap();
    let none = Names::new();
    let set = |by_name: bool| {
        dp.set_rules(1, &[rule(by_name)]).unwrap();
        dp.set_sni_names(1, local, if by_name { &names } else { &none })
            .unwrap();
    };
    let hello = format!("bench-hello 127.0.0.1 {PORT} {NAME} {iterations}");
    let mib = 256;
    let bulk = format!("bench-bulk-hello 127.0.0.1 {PORT} {NAME} {mib}");
    // (p50, p99, MiB/s) per round, address rule then name rule.
    let (mut addr, mut named) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        for (by_name, out) in [(false, &mut addr), (true, &mut named)] {
            set(by_name);
            let mut p = Probe::spawn(governed);
            let (p50, p99) = parse(&p.cmd(&hello));
            let mibps = values(&Probe::spawn(governed).cmd(&bulk))[0];
            out.push((p50, p99, mibps));
        }
    }
    let med =
        |v: &[(u64, u64, u64)], f: fn(&(u64, u64, u64)) -> u64| median(v.iter().map(f).collect());
    let (a50, a99, ab) = (
        med(&addr, |r| r.0),
        med(&addr, |r| r.1),
        med(&addr, |r| r.2),
    );
    let (n50, n99, nb) = (
        med(&named, |r| r.0),
        med(&named, |r| r.1),
        med(&named, |r| r.2),
    );
    // The packet line's own cost per packet over one pass of TLS-shaped connections (the
    // kernel's statistics; the check's program, reached by a tail call, counts in the egress
    // program's run).
    let per_packet = |by_name: bool| {
        set(by_name);
        set_stats(true);
        let before = prog_stats(attach, sys::ATTACH_INET_EGRESS);
        Probe::spawn(governed).cmd(&hello);
        let after = prog_stats(attach, sys::ATTACH_INET_EGRESS);
        set_stats(false);
        (after.0 - before.0) / (after.1 - before.1).max(1)
    };
    let (mut egress_addr, mut egress_named) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        egress_addr.push(per_packet(false));
        egress_named.push(per_packet(true));
    }
    let (ea, en) = (median(egress_addr), median(egress_named));
    println!();
    println!(
        "The server-name check: {iterations} TLS-shaped connections (connect, a ClientHello of {} bytes, RST) and {mib} MiB after a ClientHello over one connection, to a loopback listener, {ROUNDS} rounds, medians",
        NAME.len() + 58
    );
    println!();
    println!(
        "| allowed by | connect + ClientHello p50 ns | p99 ns | egress program ns/packet (kernel statistics) | bulk after the ClientHello MiB/s |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!("| an address rule (not looked at) | {a50} | {a99} | {ea} | {ab} |");
    println!("| a name rule (first data checked) | {n50} | {n99} | {en} | {nb} |");
    println!(
        "| name rule / address rule | {:.3} | {:.3} | {:.3} | {:.3} |",
        n50 as f64 / a50.max(1) as f64,
        n99 as f64 / a99.max(1) as f64,
        en as f64 / ea.max(1) as f64,
        nb as f64 / ab.max(1) as f64
    );
    dp.set_rules(1, &rules_for(1, 1)).unwrap();
    dp.set_sni_names(1, local, &Names::new()).unwrap();
}

/// Where the packet line's off-host rows send: a documentation prefix behind a veth pair in
/// the probe's own network namespace. The far end's hardware address is one nobody holds, so
/// the peer device drops each frame as soon as it arrives (no ICMP comes back).
const OFF_HOST_NET: &str = "192.0.2.0/24";
const OFF_HOST_ADDR: &str = "192.0.2.1/24";
const OFF_HOST_PEER: &str = "192.0.2.2";

/// Gives the probe's namespace the device [`OFF_HOST_NET`] lies behind.
fn off_host_device(p: &mut Probe) {
    for args in [
        "link add aw-out type veth peer name aw-out-peer".to_owned(),
        format!("addr add {OFF_HOST_ADDR} dev aw-out"),
        "link set aw-out up".to_owned(),
        "link set aw-out-peer up".to_owned(),
        format!("neigh replace {OFF_HOST_PEER} lladdr 02:00:00:00:00:02 dev aw-out nud permanent"),
    ] {
        let answer = p.cmd(&format!("spawn ip {args}"));
        assert!(answer.starts_with("exit 0"), "ip {args}: {answer}");
    }
}

/// A cgroup_skb program that only returns "pass" (`r0 = 1; exit`), attached to a cgroup for
/// as long as this lives: the floor under the packet line's run time.
struct EmptyProgram {
    prog: std::os::fd::OwnedFd,
    cgroup: std::fs::File,
    attach_type: u32,
}

impl EmptyProgram {
    fn attach(cgroup: &std::path::Path, attach_type: u32) -> Self {
        use std::os::fd::FromRawFd as _;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_ATTACH: libc::c_long = 8;
        const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
        // mov64 r0, 1; exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SKB.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
        // SAFETY: the instructions and the license outlive the call.
        let fd = unsafe { sys::bpf(BPF_PROG_LOAD, &mut attr) }.expect("load the empty program");
        // SAFETY: a new descriptor the kernel just returned.
        let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        let cg = std::fs::File::open(cgroup).expect("open the cgroup");
        let mut attr = attach_attr(&cg, &prog, attach_type);
        // SAFETY: no pointers in a BPF_PROG_ATTACH attribute block.
        unsafe { sys::bpf(BPF_PROG_ATTACH, &mut attr) }.expect("attach the empty program");
        Self {
            prog,
            cgroup: cg,
            attach_type,
        }
    }
}

/// The BPF_PROG_ATTACH / BPF_PROG_DETACH attribute block: cgroup, program, attach type.
fn attach_attr(cgroup: &std::fs::File, prog: &std::os::fd::OwnedFd, attach_type: u32) -> [u8; 16] {
    use std::os::fd::AsRawFd as _;
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&cgroup.as_raw_fd().to_ne_bytes());
    attr[4..8].copy_from_slice(&prog.as_raw_fd().to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr
}

impl Drop for EmptyProgram {
    fn drop(&mut self) {
        const BPF_PROG_DETACH: libc::c_long = 9;
        let mut attr = attach_attr(&self.cgroup, &self.prog, self.attach_type);
        // SAFETY: no pointers in a BPF_PROG_DETACH attribute block. A failure leaves the
        // program to the cgroup's removal.
        let _ = unsafe { sys::bpf(BPF_PROG_DETACH, &mut attr) };
    }
}

mod compare;
mod control_plane;
mod dns;
mod node;
mod records;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [which, flag, n] if which == "datapath" && flag == "--iterations" => {
            datapath(n.parse().expect("iterations"))
        }
        [which, flag, n] if which == "dns" && flag == "--iterations" => {
            dns::run(n.parse().expect("iterations"))
        }
        [which, flag, n] if which == "compare" && flag == "--iterations" => {
            compare::run(n.parse().expect("iterations"))
        }
        [which, flag, n] if which == "node" && flag == "--iterations" => {
            node::run(n.parse().expect("iterations"))
        }
        [which, flag, n] if which == "records" && flag == "--iterations" => {
            records::run(n.parse().expect("iterations"))
        }
        [which, flag, n] if which == "control-plane" && flag == "--iterations" => {
            control_plane::run(n.parse().expect("iterations"))
        }
        _ => {
            panic!("usage: aw-bench datapath|dns|node|records|compare|control-plane --iterations N")
        }
    }
}

fn datapath(iterations: usize) {
    let env = TestEnv::new("bench");
    let attach = env.cgroup("attached");
    let plain = env.cgroup("plain");
    let governed = env.cgroup("attached/agent");
    let unbound = env.cgroup("attached/unbound");
    let empty = env.cgroup("empty");
    let mut cfg = env.config();
    cfg.attach_cgroup = attach.path().to_owned();
    let dp = Datapath::start(&cfg).expect("start datapath");
    let view = IdentityView {
        status: IdentityStatus::Active,
        mode: Mode::Enforce,
        not_after: None,
    };

    // The kernel times each program run only while stats are enabled, and timing costs time:
    // the latency rounds run with stats off, a separate pass with them on. The old setting is
    // restored at the end.
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let old_stats = std::fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
    let set_stats = |on: bool| {
        std::fs::write(stats_path, if on { "1" } else { "0" }).expect("BPF run-time stats switch")
    };
    set_stats(false);

    let cmd = format!("bench-connect 127.0.0.1 {PORT} {iterations}");
    let udp_cmd = format!("bench-udp 127.0.0.1 {PORT} {}", iterations * 5);
    // (TCP p50, TCP p99, UDP p50): a fresh probe (and network namespace) per measurement.
    let measure = |cg| {
        let mut p = Probe::spawn(cg);
        let (p50, p99) = parse(&p.cmd(&cmd));
        let (u50, _) = parse(&p.cmd(&udp_cmd));
        (p50, p99, u50)
    };

    println!("connect() to a loopback listener, {iterations} connects x {ROUNDS} rounds per row");
    println!();
    println!(
        "| rules loaded | identities | rules of this identity | apply ms | p50 ns | p99 ns | added p50 ns | added p99 ns | UDP connect added p50 ns | connect4 program ns/run |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut bound = false;
    for (total, identities) in [(0usize, 0u32), (10, 1), (10_000, 1_000), (100_000, 1_000)] {
        let t0 = Instant::now();
        let per = if identities == 0 {
            0
        } else {
            total / identities as usize
        };
        let sets: Vec<(u32, Vec<Rule>)> = (1..=identities)
            .map(|id| (id, rules_for(id, per)))
            .collect();
        for id in 1..=identities {
            dp.set_identity(id, view.status, view.mode).unwrap();
        }
        let refs: Vec<(u32, &[Rule])> = sets.iter().map(|(id, r)| (*id, r.as_slice())).collect();
        dp.set_rules_many(&refs).unwrap();
        let apply_ms = t0.elapsed().as_secs_f64() * 1e3;
        if identities > 0 && !bound {
            dp.bind(&governed, 1, None).unwrap();
            bound = true;
        }
        let (mut b50, mut b99, mut g50, mut g99) = (vec![], vec![], vec![], vec![]);
        let (mut bu, mut gu) = (vec![], vec![]);
        let subject = if identities == 0 { &attach } else { &governed };
        for _ in 0..ROUNDS {
            let (p50, p99, u50) = measure(&plain);
            b50.push(p50);
            b99.push(p99);
            bu.push(u50);
            let (p50, p99, u50) = measure(subject);
            gu.push(u50);
            g50.push(p50);
            g99.push(p99);
        }
        set_stats(true);
        let before = connect4_stats(attach.path());
        Probe::spawn(subject).cmd(&udp_cmd);
        let after = connect4_stats(attach.path());
        set_stats(false);
        let (prog_ns, prog_runs) = (after.0 - before.0, after.1 - before.1);
        let (b50, b99, g50, g99) = (median(b50), median(b99), median(g50), median(g99));
        let (bu, gu) = (median(bu), median(gu));
        let label = if identities == 0 {
            "attached, cgroup unbound (unknown_flows=report)".to_owned()
        } else {
            total.to_string()
        };
        println!(
            "| {label} | {identities} | {per} | {apply_ms:.1} | {g50} | {g99} | {:+} | {:+} | {:+} | {} |",
            g50 as i64 - b50 as i64,
            g99 as i64 - b99 as i64,
            gu as i64 - bu as i64,
            prog_ns / prog_runs.max(1)
        );
        eprintln!(
            "  baseline (no program on the path): TCP p50 {b50} ns, p99 {b99} ns; UDP connect p50 {bu} ns"
        );
    }
    // The node records allowed flows (rule hits, rate-limited records) by default; the rows
    // above measure the bare verdict. Same rounds, with and without, on the last row's rules.
    // One probe for all rounds, the switch flipped between runs: less noise than probes.
    let (mut off, mut on) = (vec![], vec![]);
    let mut p = Probe::spawn(&governed);
    for _ in 0..ROUNDS * 2 {
        dp.set_record_allowed(false).unwrap();
        off.push(parse(&p.cmd(&udp_cmd)).0);
        dp.set_record_allowed(true).unwrap();
        on.push(parse(&p.cmd(&udp_cmd)).0);
    }
    dp.set_record_allowed(false).unwrap();
    let (off, on) = (median(off), median(on));
    packet_line(
        &Subjects {
            plain: &plain,
            governed: &governed,
            unbound: &unbound,
            empty: &empty,
        },
        attach.path(),
        iterations,
        &set_stats,
        &|on| dp.set_strays(on).expect("strays switch"),
    );
    println!();
    println!(
        "record_allowed (the node's default: count the rule's hit, rate-limited allow record): UDP connect p50 {off} ns without, {on} ns with ({:+} ns)",
        on as i64 - off as i64
    );
    server_name_check(&dp, &governed, attach.path(), iterations, &set_stats);
    let _ = std::fs::write(stats_path, old_stats.trim());
    println!();
    println!(
        "Baseline: the same probe in a sibling cgroup outside the attach point, measured in the same rounds."
    );
    println!(
        "connect4 program ns/run: the kernel's own run-time statistics for the program (bpf_stats_enabled, \
         in a separate UDP pass, so the latency rounds run without the statistics' own cost)."
    );
}
