//! `cargo xtask bench compare`: agentwall next to what users would pick instead, on the same
//! machine in the same run: nftables with a set and a `socket cgroupv2` match, and iptables
//! with one `-m cgroup` rule per entry (as people write them; the allowed entry last). Each
//! enforces the same allowlist for one cgroup: N entries, one of them the loopback listener
//! the probe connects to.
//!
//! Every variant runs in a network namespace of its own, so nothing here touches the host's
//! firewall; rows alternate with the baseline so drift hits both alike.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use crate::{median, parse};
use agentwall::{
    cgroup::Cgroup2Mount,
    datapath::Datapath,
    policy::{IdentityStatus, Mode, Protocol, Rule},
};
use agentwall_tests::{NetNs, Probe, TestEnv, bin_path};
use ipnet::{IpNet, Ipv4Net};

const PORT: u16 = 18444;
const ROUNDS: usize = 9;
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];

/// Filler destinations (distinct /32s in 10/8) and the listener, last.
fn entries(n: usize) -> Vec<std::net::Ipv4Addr> {
    let mut v: Vec<std::net::Ipv4Addr> = (1..n as u32)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 | i))
        .collect();
    v.push(std::net::Ipv4Addr::LOCALHOST);
    v
}

fn rules(n: usize) -> Vec<Rule> {
    entries(n)
        .into_iter()
        .enumerate()
        .map(|(i, a)| Rule {
            id: i as u32 + 1,
            to: vec![IpNet::V4(Ipv4Net::new(a, 32).unwrap())],
            fqdns: Vec::new(),
            ports: vec![
                if a.is_loopback() { PORT } else { 443 }
                    .to_string()
                    .parse()
                    .unwrap(),
            ],
            protocol: Protocol::Tcp,
            expires: None,
        })
        .collect()
}

/// Runs `cmd` with `input` on stdin inside `ns`; returns how long it took.
fn timed_in(ns: &NetNs, program: &str, args: &[&str], input: &str) -> Duration {
    use std::io::Write as _;
    let mut c = Command::new(program);
    c.args(args).stdin(std::process::Stdio::piped());
    ns.enter(&mut c);
    let t0 = Instant::now();
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let st = child.wait().unwrap();
    let took = t0.elapsed();
    assert!(st.success(), "{program} {args:?} failed");
    took
}

fn nft_ruleset(path: &str, level: usize, n: usize) -> String {
    let mut elems = String::new();
    for (i, a) in entries(n).into_iter().enumerate() {
        if i > 0 {
            elems.push_str(",\n");
        }
        let port = if a.is_loopback() { PORT } else { 443 };
        let _ = write!(elems, "{a} . {port}");
    }
    format!(
        "flush ruleset\ntable inet aw {{\n  set allowed {{ type ipv4_addr . inet_service; elements = {{ {elems} }} }}\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    socket cgroupv2 level {level} \"{path}\" ip daddr . tcp dport @allowed accept\n    socket cgroupv2 level {level} \"{path}\" drop\n  }}\n}}\n"
    )
}

fn iptables_ruleset(path: &str, n: usize) -> String {
    let mut s =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for a in entries(n) {
        let port = if a.is_loopback() { PORT } else { 443 };
        let _ = writeln!(
            s,
            "-A OUTPUT -m cgroup --path {path} -d {a}/32 -p tcp --dport {port} -j ACCEPT"
        );
    }
    let _ = writeln!(s, "-A OUTPUT -m cgroup --path {path} -j DROP\nCOMMIT");
    s
}

/// tinyproxy in a namespace; killed on drop.
struct Tinyproxy(std::process::Child);

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent-sandbox approach: an HTTP CONNECT allowlist proxy (tinyproxy, denying by default,
/// with the same N entries as a host filter) in front of the same loopback listener.
fn proxy_rows(iterations: usize, in_ns: &dyn Fn(&NetNs) -> Probe) {
    let proxy_port = PORT + 10;
    let (direct_port, dest_port) = (PORT + 2, PORT + 3);
    // Each request costs the proxy a filter scan: fewer of them, or 10,000 entries take minutes.
    let n_iter = (iterations / 50).clamp(100, 1000);
    println!();
    println!(
        "HTTP CONNECT allowlist proxy (tinyproxy, FilterDefaultDeny, N host entries), {n_iter} requests x {ROUNDS} rounds, medians:"
    );
    println!();
    println!("| entries | direct connect p50 ns | through the proxy p50 / p99 ns | added p50 ns |");
    println!("|---:|---:|---:|---:|");
    for n in [10usize, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let mut filter = String::new();
        for a in entries(n) {
            let _ = writeln!(filter, "^{}$", a.to_string().replace('.', "\\."));
        }
        std::fs::write(dir.path().join("filter"), filter).unwrap();
        std::fs::write(
            dir.path().join("tinyproxy.conf"),
            format!(
                "Port {proxy_port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 256\nAllow 127.0.0.1\n\
                 ConnectPort {dest_port}\nFilter \"{}\"\nFilterDefaultDeny Yes\nLogLevel Critical\n",
                dir.path().join("filter").display()
            ),
        )
        .unwrap();
        let ns = NetNs::new("cmp-proxy");
        let mut c = Command::new("tinyproxy");
        c.arg("-d")
            .arg("-c")
            .arg(dir.path().join("tinyproxy.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        ns.enter(&mut c);
        let _proxy = Tinyproxy(
            c.spawn()
                .expect("tinyproxy (cargo xtask bench compare installs it)"),
        );
        let mut p = in_ns(&ns);
        // Ready when it accepts (it compiles every filter entry first).
        let deadline = Instant::now() + Duration::from_secs(120);
        while p.cmd(&format!("connect tcp 127.0.0.1 {proxy_port}")) != "ok" {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (mut d, mut t) = (vec![], vec![]);
        for _ in 0..ROUNDS {
            d.push(parse(&p.cmd(&format!(
                "bench-connect 127.0.0.1 {direct_port} {n_iter}"
            ))));
            let ans = p.cmd(&format!(
                "bench-proxy 127.0.0.1 {proxy_port} 127.0.0.1 {dest_port} {n_iter}"
            ));
            t.push(parse(&ans));
            // Fresh listeners per round: each bench command binds its own.
            p = in_ns(&ns);
        }
        let d50 = median(d.iter().map(|x| x.0).collect());
        let (t50, t99) = (
            median(t.iter().map(|x| x.0).collect()),
            median(t.iter().map(|x| x.1).collect()),
        );
        println!(
            "| {n} | {d50} | {t50} / {t99} | {:+} |",
            t50 as i64 - d50 as i64
        );
    }
}

/// This process's resident memory, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory charged to the BPF maps this process holds fds of (fdinfo `memlock`).
fn bpf_memlock_bytes() -> u64 {
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

pub fn run(iterations: usize) {
    let env = TestEnv::new("bench-compare");
    let attach = env.cgroup("attached");
    let governed = env.cgroup("attached/agent");
    let plain = env.cgroup("plain");
    let fw = env.cgroup("firewalled");
    let mut cfg = env.config();
    cfg.attach_cgroup = attach.path().to_owned();
    let mut dp = Datapath::start(&cfg).expect("start datapath");
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .unwrap();
    dp.set_rules(1, &rules(10)).unwrap();
    dp.bind(&governed, 1, None).unwrap();
    let root = Cgroup2Mount::discover().unwrap().mount_point;
    let rel = fw.path().strip_prefix(&root).unwrap().display().to_string();
    let level = fw.path().strip_prefix(&root).unwrap().components().count();
    // nft finds the cgroup by stat()ing /sys/fs/cgroup/PATH, wherever cgroup2 is mounted.
    let nft_path = fw
        .path()
        .strip_prefix("/sys/fs/cgroup")
        .unwrap_or(fw.path())
        .display()
        .to_string();

    let cmd = format!("bench-connect 127.0.0.1 {PORT} {iterations}");
    let in_ns = |ns: &NetNs| {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", fw.path().to_str().unwrap()]);
        ns.enter(&mut c);
        Probe::from_command(c)
    };

    println!(
        "connect() to a loopback listener, one cgroup allowed N entries (destination + port), {iterations} connects x {ROUNDS} rounds, medians"
    );
    println!();
    println!(
        "| entries | none p50 ns | agentwall added p50 / p99 | nftables set added p50 / p99 | iptables added p50 / p99 | agentwall : nftables | iptables : agentwall |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut apply_rows = Vec::new();
    for n in SIZES {
        let t0 = Instant::now();
        dp.set_rules(1, &rules(n)).unwrap();
        let aw_apply = t0.elapsed();
        let ns_nft = NetNs::new("cmp-nft");
        let nft_apply = timed_in(
            &ns_nft,
            "nft",
            &["-f", "-"],
            &nft_ruleset(&nft_path, level, n),
        );
        // iptables-nft translates each rule on its own; past 10,000 rules it takes minutes.
        let ns_ipt = (n <= 10_000).then(|| NetNs::new("cmp-ipt"));
        let ipt_apply = ns_ipt
            .as_ref()
            .map(|ns| timed_in(ns, "iptables-restore", &[], &iptables_ruleset(&rel, n)));
        apply_rows.push((n, aw_apply, nft_apply, ipt_apply));

        let (mut b, mut a, mut f, mut t) = (vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            b.push(parse(&Probe::spawn(&plain).cmd(&cmd)));
            a.push(parse(&Probe::spawn(&governed).cmd(&cmd)));
            f.push(parse(&in_ns(&ns_nft).cmd(&cmd)));
            if let Some(ns) = &ns_ipt {
                t.push(parse(&in_ns(ns).cmd(&cmd)));
            }
        }
        let p50 = |v: &[(u64, u64)]| median(v.iter().map(|x| x.0).collect());
        let p99 = |v: &[(u64, u64)]| median(v.iter().map(|x| x.1).collect());
        let (b50, b99) = (p50(&b), p99(&b));
        let added = |v: &[(u64, u64)]| (p50(v) as i64 - b50 as i64, p99(v) as i64 - b99 as i64);
        let (a50, a99) = added(&a);
        let (f50, f99) = added(&f);
        let ipt = (!t.is_empty()).then(|| added(&t));
        // Differences at or below zero are inside the run's noise: no ratio to speak of.
        let ratio = |x: i64, y: i64| {
            if x <= 0 || y <= 0 {
                "within noise".to_owned()
            } else {
                format!("{:.2}", x as f64 / y as f64)
            }
        };
        println!(
            "| {n} | {b50} | {a50:+} / {a99:+} | {f50:+} / {f99:+} | {} | {} | {} |",
            ipt.map_or("(not run)".into(), |(x, y)| format!("{x:+} / {y:+}")),
            ratio(a50, f50),
            ipt.map_or("n/a".into(), |(x, _)| ratio(x, a50)),
        );
    }
    println!();
    println!("Policy apply, call to enforced:");
    println!();
    println!("| entries | agentwall ms | nft -f ms | iptables-restore ms |");
    println!("|---:|---:|---:|---:|");
    for (n, a, f, t) in apply_rows {
        println!(
            "| {n} | {:.1} | {:.1} | {} |",
            a.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            t.map_or("(not run)".into(), |t| format!(
                "{:.1}",
                t.as_secs_f64() * 1e3
            ))
        );
    }
    proxy_rows(iterations, &in_ns);

    // Unconnected UDP: every sendto() passes sendmsg4; governed (a rule for the sink) or not.
    let mut u_rules = rules(10);
    u_rules.push(Rule {
        id: 11,
        to: vec!["127.0.0.1/32".parse().unwrap()],
        fqdns: Vec::new(),
        ports: vec![(PORT + 1).to_string().parse().unwrap()],
        protocol: Protocol::Udp,
        expires: None,
    });
    dp.set_rules(1, &u_rules).unwrap();
    let send = format!("bench-sendto 127.0.0.1 {} {}", PORT + 1, iterations * 40);
    let pps = |a: &str| {
        a.strip_prefix("pps=")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("bad answer {a:?}"))
    };
    let (mut pb, mut pg) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        pb.push(pps(&Probe::spawn(&plain).cmd(&send)));
        pg.push(pps(&Probe::spawn(&governed).cmd(&send)));
    }
    let (pb, pg) = (median(pb), median(pg));
    println!();
    println!(
        "Unconnected UDP sendto(): {pb} datagrams/s not governed, {pg} governed ({:.1}% of it)",
        pg as f64 * 100.0 / pb as f64
    );

    // Memory at 100,000 rules over 10,000 identities.
    let before = rss_kib();
    let sets: Vec<(u32, Vec<Rule>)> = (1..=10_000u32)
        .map(|id| {
            (
                id,
                (0..10u32)
                    .map(|i| Rule {
                        id: i + 1,
                        to: vec![IpNet::V4(
                            Ipv4Net::new(std::net::Ipv4Addr::from(0x0b00_0000 | (id << 4) | i), 32)
                                .unwrap(),
                        )],
                        fqdns: Vec::new(),
                        ports: vec!["443".parse().unwrap()],
                        protocol: Protocol::Tcp,
                        expires: None,
                    })
                    .collect(),
            )
        })
        .collect();
    for id in 1..=10_000u32 {
        dp.set_identity(id, IdentityStatus::Active, Mode::Enforce)
            .unwrap();
    }
    let refs: Vec<(u32, &[Rule])> = sets.iter().map(|(id, r)| (*id, r.as_slice())).collect();
    let t0 = Instant::now();
    dp.set_rules_many(&refs).unwrap();
    let took = t0.elapsed();
    println!(
        "100,000 rules over 10,000 identities: applied in {:.0} ms; kernel map memory {} MiB (memlock of every BPF map this process holds); process RSS {} MiB (+{} MiB for the policy)",
        took.as_secs_f64() * 1e3,
        bpf_memlock_bytes() >> 20,
        rss_kib() >> 10,
        rss_kib().saturating_sub(before) >> 10
    );
    println!();
    println!(
        "Baseline (none): the same probe in a cgroup no variant governs. agentwall: a cgroup bound to an identity \
         with N rules. nftables/iptables: the rules in the probe's own network namespace, matching its cgroup. \
         iptables-restore (iptables-nft) is not run past 10,000 rules."
    );
}
