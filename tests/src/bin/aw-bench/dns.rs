//! `cargo xtask bench dns`: what the DNS proxy adds to a lookup.
//!
//! Inside a network namespace made for the run: aw-dns serves 1,000 names, the real node runs
//! with its proxy, and two probes send the same paced stream of A queries (a fresh connected
//! UDP socket per query, as stub resolvers do) to the same resolver address. One probe is not
//! governed: its queries go straight to the upstream. The other is an agent launched under an
//! identity with a `**.example.com` rule: its queries are steered to the proxy, forwarded,
//! and each answer's address is written into the kernel before the agent gets it. Rounds
//! alternate between the two so drift hits both alike.
//!
//! The policy holds 1,000 more identities of 10 rules each. Quiet rounds alternate with
//! churning ones, in which the policy changes every second: every one of those rules' port
//! (10,000 rules applied), and the agent's own rules too, so its trie is rebuilt, learned
//! addresses included, while its answers keep arriving. An answer must never wait for an
//! apply.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{median, values};
use agentwall_tests::{
    DnsServer, NetNs, Probe, TestEnv, bin_path,
    node::{NodeProc, launch_args, write_cert},
    pki::{Ca, CertSpec},
};

const RESOLVER: &str = "192.0.2.53";
const NAMES: u64 = 1000;
const QPS: u64 = 1000;
const ROUNDS: usize = 7;

/// `p50=NS p99=NS fail=N`.
fn triple(answer: &str) -> (u64, u64, u64) {
    let v = values(answer);
    (v[0], v[1], v[2])
}

const POLICY: &str = "\
kind: AgentPolicy
name: bench
identity: spiffe://example.org/agent/bench
egress:
  - to: [\"**.example.com\"]
    ports: [443]
    protocol: tcp
";

/// The policy of churn step `k`: the agent's rules (with an extra address that changes) and
/// 1,000 identities of 10 rules whose port changes every step.
fn churned(k: u32) -> String {
    let mut text = String::from(POLICY);
    let _ = write!(
        text,
        "  - to: [198.51.100.{}/32]\n    ports: [443]\n    protocol: tcp\n",
        1 + k % 250
    );
    for id in 1..=1000u32 {
        let _ = write!(
            text,
            "---\nkind: AgentPolicy\nname: c{id}\nidentity: spiffe://example.org/churn/c{id}\negress:\n"
        );
        for i in 0..10u32 {
            let a = std::net::Ipv4Addr::from(0x0b00_0000 | (id << 4) | i);
            let _ = write!(
                text,
                "  - to: [{a}/32]\n    ports: [{}]\n    protocol: tcp\n",
                1000 + k % 2
            );
        }
    }
    text
}

/// Replaces the policy file whole (a reader never sees half of it).
fn write_policy(dir: &Path, text: &str) {
    let tmp = dir.join("policy/.agents.yaml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("policy/agents.yaml")).unwrap();
}

/// Where the node serves metrics, on the namespace's loopback.
const METRICS: &str = "127.0.0.1:9464";

/// Policy applies so far, from the node's metrics.
fn applies(ns: &NetNs) -> usize {
    let m = agentwall_tests::node::scrape_in(ns, METRICS.parse().unwrap());
    agentwall_tests::node::metric(&m, "agentwall_policy_applies_total", &[]) as usize
}

pub fn run(queries: u64) {
    let env = TestEnv::new("bench-dns");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall bench CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), POLICY).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let records: Vec<serde_json::Value> = (0..NAMES)
        .map(|i| {
            serde_json::json!({
                "name": format!("n{i}.example.com"),
                "type": "A",
                "value": format!("203.0.113.{}", 1 + i % 250),
                "ttl": 300,
            })
        })
        .collect();
    std::fs::write(
        dir.join("zone.json"),
        serde_json::json!({ "records": records }).to_string(),
    )
    .unwrap();
    let ns = NetNs::new("bench-dns");
    ns.ip(&["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"]);
    let _dns = DnsServer::start(&ns, &format!("{RESOLVER}:53"), &dir.join("zone.json"));
    let upstream = format!("{RESOLVER}:53");
    let node = NodeProc::start_in(
        &env,
        dir,
        &["--dns-upstream", &upstream, "--metrics-listen", METRICS],
        &[],
        Some(&ns),
    );
    let (cert, key) = write_cert(
        dir,
        "agent",
        &ca.issue(&CertSpec::agent("spiffe://example.org/agent/bench")),
    );
    let mut launch = launch_args(&node.socket, &cert, &key);
    ns.enter(&mut launch);
    launch.arg(bin_path("aw-probe"));
    let mut agent = Probe::from_command(launch);
    let mut plain = Command::new(bin_path("aw-probe"));
    ns.enter(&mut plain);
    let mut direct = Probe::from_command(plain);

    let cmd = format!("bench-dns {RESOLVER} {queries} {QPS} {NAMES}");
    // The same policy size throughout (the agent and 1,000 identities of 10 rules); a writer
    // changes it every second while `churning` is set.
    write_policy(dir, &churned(0));
    agentwall_tests::node::eventually(
        "the 10,000-rule policy to be applied",
        Duration::from_secs(30),
        || match applies(&ns) {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} applies")),
        },
    );
    let churning = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (churning, stop) = (churning.clone(), stop.clone());
        let dir = dir.to_owned();
        std::thread::spawn(move || {
            let mut k = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                if churning.load(Ordering::Relaxed) {
                    write_policy(&dir, &churned(k));
                    k += 1;
                }
            }
        })
    };
    // Quiet and churning rounds alternate, so the machine's drift hits both alike.
    let (mut quiet, mut busy) = (Rows::default(), Rows::default());
    let mut during = 0;
    let mut churn_time = Duration::ZERO;
    for _ in 0..ROUNDS {
        churning.store(false, Ordering::Relaxed);
        // An apply in flight finishes before the quiet round.
        std::thread::sleep(Duration::from_millis(1500));
        quiet.add(&mut direct, &mut agent, &cmd);
        let before = applies(&ns);
        churning.store(true, Ordering::Relaxed);
        agentwall_tests::node::eventually(
            "a churned policy to be applied",
            Duration::from_secs(30),
            || match applies(&ns) {
                n if n > before => Ok(()),
                n => Err(format!("{n} applies")),
            },
        );
        let (t0, n0) = (std::time::Instant::now(), applies(&ns));
        busy.add(&mut direct, &mut agent, &cmd);
        churn_time += t0.elapsed();
        during += applies(&ns) - n0;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let (quiet, busy) = (quiet.row(), busy.row());
    let took = churn_time;

    println!(
        "DNS A lookups at {QPS} queries/s over {NAMES} names, {queries} queries x {ROUNDS} rounds per row (medians of the rounds)"
    );
    println!();
    println!("| path | p50 µs | p99 µs | failed |");
    println!("|---|---:|---:|---:|");
    let us = |ns: u64| ns as f64 / 1e3;
    for (label, r) in [
        ("", &quiet),
        (", policy of 10,000 rules applied every second", &busy),
    ] {
        println!(
            "| direct to the upstream (not governed){label} | {:.1} | {:.1} | {} |",
            us(r.d50),
            us(r.d99),
            r.dfail
        );
        println!(
            "| agent through the agentwall proxy (steered, forwarded, address written to the kernel){label} | {:.1} | {:.1} | {} |",
            us(r.p50),
            us(r.p99),
            r.pfail
        );
        println!(
            "| **added by agentwall{label}** | **{:+.1}** | **{:+.1}** | |",
            r.added50() as f64 / 1e3,
            r.added99() as f64 / 1e3
        );
    }
    println!();
    println!(
        "Targets: p50 added < 200 µs ({}), p99 added < 2 ms ({}).",
        if quiet.added50() < 200_000 {
            "met"
        } else {
            "missed"
        },
        if quiet.added99() < 2_000_000 {
            "met"
        } else {
            "missed"
        }
    );
    // Within 2x of quiet; an added p99 below 100 µs (noise) counts as that.
    let floor = 100_000;
    let ratio = busy.added99().max(floor) as f64 / quiet.added99().max(floor) as f64;
    println!(
        "Churning rounds: {during} applies of 10,000 rules in {:.0} s; p99 added {:+.1} µs, {ratio:.2}x the quiet rounds' (target <= 2x, {}).",
        took.as_secs_f64(),
        busy.added99() as f64 / 1e3,
        if ratio <= 2.0 { "met" } else { "missed" }
    );
}

/// Each round's results, per path.
#[derive(Default)]
struct Rows {
    d50: Vec<u64>,
    d99: Vec<u64>,
    p50: Vec<u64>,
    p99: Vec<u64>,
    dfail: u64,
    pfail: u64,
}

impl Rows {
    /// One round: the same queries straight to the upstream, then from the agent.
    fn add(&mut self, direct: &mut Probe, agent: &mut Probe, cmd: &str) {
        let (a, b, f) = triple(&direct.cmd(cmd));
        self.d50.push(a);
        self.d99.push(b);
        self.dfail += f;
        let (a, b, f) = triple(&agent.cmd(cmd));
        self.p50.push(a);
        self.p99.push(b);
        self.pfail += f;
    }

    fn row(self) -> Row {
        Row {
            d50: median(self.d50),
            d99: median(self.d99),
            p50: median(self.p50),
            p99: median(self.p99),
            dfail: self.dfail,
            pfail: self.pfail,
        }
    }
}

struct Row {
    d50: u64,
    d99: u64,
    p50: u64,
    p99: u64,
    dfail: u64,
    pfail: u64,
}

impl Row {
    fn added50(&self) -> i64 {
        self.p50 as i64 - self.d50 as i64
    }

    fn added99(&self) -> i64 {
        self.p99 as i64 - self.d99 as i64
    }
}
