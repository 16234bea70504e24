//! `cargo xtask bench compare`: agentwall next to what users would pick instead, on the same
//! machine in the same run: nftables with a set and a `socket cgroupv2` match, and iptables
//! with one `-m cgroup` rule per entry (as people write them; the allowed entry last). Each
//! enforces the same allowlist for one cgroup: N entries, one of them the loopback listener
//! the probe connects to.
//!
//! Every variant runs in a network namespace of its own, so nothing here touches the host's
//! firewall. Connect latency is measured in interleaved blocks: cycle after cycle, each
//! variant's probe runs one short block of connects, in a rotating order, so whatever drifts
//! on the machine during the run hits every variant alike. A variant's added cost is the
//! median over cycles of its block median minus the baseline's in the same cycle, with a 95%
//! confidence interval for that median.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{median, parse};
use agentwall::{
    cgroup::Cgroup2Mount,
    datapath::Datapath,
    policy::{IdentityStatus, Mode, Protocol, Rule, source::parse_sources},
};
use agentwall_tests::{NetNs, Probe, TestEnv, bin_path};
use ipnet::{IpNet, Ipv4Net};

const PORT: u16 = 18444;
const ROUNDS: usize = 9;
/// Applies timed per size and enforcer.
const APPLY_REPS: usize = 5;
/// Connects per variant per cycle.
const BLOCK: usize = 200;
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
    rules_with(n, 443)
}

/// The N entries as rules, the fillers on `filler_port`, the listener on its own port.
fn rules_with(n: usize, filler_port: u16) -> Vec<Rule> {
    entries(n)
        .into_iter()
        .enumerate()
        .map(|(i, a)| Rule {
            id: i as u32 + 1,
            to: vec![IpNet::V4(Ipv4Net::new(a, 32).unwrap())],
            fqdns: Vec::new(),
            ports: vec![
                if a.is_loopback() { PORT } else { filler_port }
                    .to_string()
                    .parse()
                    .unwrap(),
            ],
            protocol: Protocol::Tcp,
            direction: agentwall::policy::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        })
        .collect()
}

/// The same entries as a policy file, one egress rule each.
fn policy_yaml(n: usize, filler_port: u16) -> String {
    let mut s = String::from(
        "kind: AgentPolicy\nname: bench\nidentity: spiffe://example.org/agent/bench\negress:\n",
    );
    for a in entries(n) {
        let port = if a.is_loopback() { PORT } else { filler_port };
        let _ = write!(
            s,
            "  - to: [{a}/32]\n    ports: [{port}]\n    protocol: tcp\n"
        );
    }
    s
}

/// Median and range of a few timings, ms.
fn ms_cell(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.1} ({:.1}-{:.1})",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
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
fn proxy_rows(iterations: usize, in_ns: &dyn Fn(&NetNs) -> Probe, aw_added: &[(usize, i64)]) {
    let proxy_port = PORT + 10;
    let (direct_port, dest_port) = (PORT + 2, PORT + 3);
    // Each request costs the proxy a filter scan: fewer of them, or 10,000 entries take minutes.
    let n_iter = (iterations / 400).clamp(100, 1000);
    println!();
    println!(
        "HTTP CONNECT allowlist proxy (tinyproxy, FilterDefaultDeny, N host entries), {n_iter} requests x {ROUNDS} rounds ({} at 100,000 entries), medians:",
        n_iter / 5
    );
    println!();
    println!(
        "| entries | direct connect p50 ns | through the proxy p50 / p99 ns | added p50 ns | proxy : agentwall |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in SIZES {
        // At 100,000 entries a request takes the proxy over 0.1 s: a few of them say enough.
        let n_iter = if n >= 100_000 { n_iter / 5 } else { n_iter };
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
        let added = t50 as i64 - d50 as i64;
        let aw = aw_added
            .iter()
            .find(|(m, _)| *m == n)
            .map_or(0, |(_, a)| *a);
        let ratio = if aw > 0 {
            format!("{:.0}", added as f64 / aw as f64)
        } else {
            "n/a".into()
        };
        println!("| {n} | {d50} | {t50} / {t99} | {added:+} | {ratio} |");
    }
}

/// Runs `cycles` cycles; in each, every probe runs one block of `block` connects to the
/// loopback listener, starting with a different probe each cycle. Returns each probe's
/// samples, per cycle.
fn interleaved(probes: &mut [(Probe, usize)], cycles: usize) -> Vec<Vec<Vec<u64>>> {
    let block = |p: &mut Probe, n: usize| -> Vec<u64> {
        let a = p.cmd(&format!("bench-connect-block 127.0.0.1 {PORT} {n}"));
        a.strip_prefix("samples=")
            .unwrap_or_else(|| panic!("bad answer {a:?}"))
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect()
    };
    // A first block each, not kept: listeners up, caches and conntrack warm.
    for (p, n) in probes.iter_mut() {
        block(p, *n);
    }
    let k = probes.len();
    let mut out = vec![Vec::with_capacity(cycles); k];
    for c in 0..cycles {
        for j in 0..k {
            let v = (c + j) % k;
            let (p, n) = &mut probes[v];
            out[v].push(block(p, *n));
        }
    }
    out
}

fn p50_of(v: &[u64]) -> u64 {
    median(v.to_vec())
}

/// What a variant adds to the baseline's connect.
struct Added {
    /// Median over cycles of (variant block median - baseline block median), ns.
    p50: i64,
    /// 95% confidence interval of that median (order statistics of the paired differences).
    lo: i64,
    hi: i64,
    /// Median over cycles of (variant block p99 - baseline block p99), ns.
    p99: i64,
}

impl Added {
    fn of(base: &[Vec<u64>], variant: &[Vec<u64>]) -> Self {
        let mut d: Vec<i64> = base
            .iter()
            .zip(variant)
            .map(|(b, v)| p50_of(v) as i64 - p50_of(b) as i64)
            .collect();
        d.sort_unstable();
        let m = d.len();
        let half = (0.98 * (m as f64).sqrt()).ceil() as usize;
        let p99 = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v[v.len() * 99 / 100] as i64
        };
        let mut d99: Vec<i64> = base
            .iter()
            .zip(variant)
            .map(|(b, v)| p99(v) - p99(b))
            .collect();
        d99.sort_unstable();
        Self {
            p50: d[m / 2],
            lo: d[(m / 2).saturating_sub(half)],
            hi: d[(m / 2 + half).min(m - 1)],
            p99: d99[m / 2],
        }
    }

    fn cell(&self) -> String {
        format!(
            "{:+} [{:+}, {:+}] / {:+}",
            self.p50, self.lo, self.hi, self.p99
        )
    }

    /// How many times `self` costs `other`, with the range the two intervals allow; none when
    /// an interval reaches zero (the cost is inside the run's noise).
    fn ratio(&self, other: &Added) -> String {
        if self.lo <= 0 || other.lo <= 0 {
            return "within noise".into();
        }
        format!(
            "{:.2} ({:.2}-{:.2})",
            self.p50 as f64 / other.p50 as f64,
            self.lo as f64 / other.hi as f64,
            self.hi as f64 / other.lo as f64
        )
    }
}

pub fn run(iterations: usize) {
    let env = TestEnv::new("bench-compare");
    let attach = env.cgroup("attached");
    let governed = env.cgroup("attached/agent");
    let plain = env.cgroup("plain");
    let fw = env.cgroup("firewalled");
    let mut cfg = env.config();
    cfg.attach_cgroup = attach.path().to_owned();
    let dp = Datapath::start(&cfg).expect("start datapath");
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

    let in_ns = |ns: &NetNs| {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(["--cgroup", fw.path().to_str().unwrap()]);
        ns.enter(&mut c);
        Probe::from_command(c)
    };

    let cycles = (iterations / BLOCK).max(10);
    println!(
        "connect() to a loopback listener, one cgroup allowed N entries (destination + port); {cycles} cycles of {BLOCK} connects per variant, interleaved; added ns: median [95% CI] / p99"
    );
    println!();
    println!(
        "| entries | none p50 ns | agentwall added | nftables set added | iptables added | agentwall : nftables | iptables : agentwall |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut apply_rows = Vec::new();
    let mut aw_added = Vec::new();
    for n in SIZES {
        // Each apply changes every filler entry's port, so every entry is a changed one.
        let (ns_nft, ns_ipt) = (NetNs::new("cmp-nft"), NetNs::new("cmp-ipt"));
        let (nft_text, ipt_text) = (nft_ruleset(&nft_path, level, n), iptables_ruleset(&rel, n));
        let mut times: [Vec<Duration>; 4] = Default::default();
        for rep in 0..APPLY_REPS {
            let (port, other) = if rep % 2 == 0 { (444, 443) } else { (443, 444) };
            let r = rules_with(n, port);
            let t0 = Instant::now();
            dp.set_rules(1, &r).unwrap();
            times[0].push(t0.elapsed());
            // The node's path: the policy text parsed and checked, then applied.
            let text = policy_yaml(n, other);
            let t0 = Instant::now();
            let set = parse_sources(vec![(PathBuf::from("bench.yaml"), text)]).unwrap();
            let r: Vec<Rule> = set
                .effective_rules(&set.agents[0])
                .into_iter()
                .map(|e| e.rule)
                .collect();
            dp.set_rules(1, &r).unwrap();
            times[1].push(t0.elapsed());
            times[2].push(timed_in(&ns_nft, "nft", &["-f", "-"], &nft_text));
            times[3].push(timed_in(&ns_ipt, "iptables-restore", &[], &ipt_text));
        }
        apply_rows.push((n, times));

        let mut probes = vec![
            (Probe::spawn(&plain), BLOCK),
            (Probe::spawn(&governed), BLOCK),
            (in_ns(&ns_nft), BLOCK),
        ];
        // A connect costs iptables about 55 ns per rule: smaller blocks keep the run short.
        let ipt_block = match n {
            ..10_000 => BLOCK,
            10_000..100_000 => BLOCK / 10,
            _ => BLOCK / 40,
        };
        probes.push((in_ns(&ns_ipt), ipt_block));
        let samples = interleaved(&mut probes, cycles);
        let base = median(samples[0].iter().map(|b| p50_of(b)).collect());
        let aw = Added::of(&samples[0], &samples[1]);
        let nft = Added::of(&samples[0], &samples[2]);
        let ipt = Added::of(&samples[0], &samples[3]);
        println!(
            "| {n} | {base} | {} | {} | {} | {} | {} |",
            aw.cell(),
            nft.cell(),
            ipt.cell(),
            aw.ratio(&nft),
            ipt.ratio(&aw),
        );
        aw_added.push((n, aw.p50));
    }
    println!();
    println!("Policy apply, call to enforced, ms: median (min-max) of {APPLY_REPS}:");
    println!();
    println!(
        "| entries | agentwall, rules in memory | agentwall, from the policy's YAML | nft -f | iptables-restore |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (n, times) in apply_rows {
        let [a, y, f, t] = times.map(ms_cell);
        println!("| {n} | {a} | {y} | {f} | {t} |");
    }
    proxy_rows(iterations, &in_ns, &aw_added);

    // Unconnected UDP: every sendto() passes sendmsg4; governed (a rule for the sink) or not.
    let mut u_rules = rules(10);
    u_rules.push(Rule {
        id: 11,
        to: vec!["127.0.0.1/32".parse().unwrap()],
        fqdns: Vec::new(),
        ports: vec![(PORT + 1).to_string().parse().unwrap()],
        protocol: Protocol::Udp,
        direction: agentwall::policy::Direction::Egress,
        expires: None,
        ech: Box::default(),
        learned: false,
    });
    dp.set_rules(1, &u_rules).unwrap();
    let send = format!("bench-sendto 127.0.0.1 {} {}", PORT + 1, iterations * 5);
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

    // Apply of 100,000 rules over 10,000 identities, in one batch.
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
                        direction: agentwall::policy::Direction::Egress,
                        expires: None,
                        ech: Box::default(),
                        learned: false,
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
        "100,000 rules over 10,000 identities, rules in memory: applied in {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    drop(dp);
    let (started, rss, maps) =
        crate::node::node_memory(&agentwall_tests::bin_path("agentwall"), 10_000, 10);
    println!(
        "agentwall node on the same policy as YAML (10,000 AgentPolicy documents): ready in {:.1} s; RSS {} MiB; kernel memory of its BPF maps {} MiB (fdinfo memlock)",
        started.as_secs_f64(),
        rss >> 10,
        maps >> 20
    );
    println!();
    println!(
        "Baseline (none): the same probe in a cgroup no variant governs. agentwall: a cgroup bound to an identity \
         with N rules. nftables/iptables: the rules in the probe's own network namespace, matching its cgroup. \
         The proxy's ratio divides its added p50 by agentwall's at the same size (connect table)."
    );
}
