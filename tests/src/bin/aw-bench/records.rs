//! `cargo xtask bench records`: how many decision records per second the node turns into
//! enriched, folded records (identity, process, cgroup, rule, revision), with 1,000 identities
//! loaded.
//!
//! The real node runs on 1,000 AgentPolicy documents of 10 rules each. An agent launched as
//! the last of them sweeps distinct flows as fast as the kernel judges them: half denied, half
//! allowed by a rule (so every record also names its rule). Every flow is distinct, so neither
//! the kernel nor the node folds any of them: each is one record to enrich and emit. The
//! producer is faster than any node, so the time from the sweep's start until the node has
//! counted every record it got measures the node. Records the ring buffer had no room for are
//! counted by the kernel and shown beside.
//!
//! `AGENTWALL_BENCH_BASELINE=/path/to/agentwall` runs the same rounds against that build too,
//! interleaved, and prints the ratio.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::median;
use agentwall_tests::{
    Probe, TestEnv, bin_path,
    node::{NodeProc, launch_args, loopback_addr, scrape, write_cert},
    pki::{Ca, CertSpec},
};

const IDENTITIES: u32 = 1000;
const ROUNDS: usize = 5;

fn policy() -> String {
    let mut text = String::new();
    for id in 1..=IDENTITIES {
        let _ = write!(
            text,
            "---\nkind: AgentPolicy\nname: a{id}\nidentity: spiffe://example.org/agent/a{id}\negress:\n"
        );
        // The last identity (the agent's) allows 203.0.113.0/24 on every port.
        if id == IDENTITIES {
            text.push_str("  - to: [203.0.113.0/24]\n    protocol: any\n");
        }
        for i in 0..9 {
            let a = std::net::Ipv4Addr::from(0x0b00_0000 | (id << 4) | i);
            let _ = write!(
                text,
                "  - to: [{a}/32]\n    ports: [443]\n    protocol: tcp\n"
            );
        }
        if id != IDENTITIES {
            text.push_str("  - to: [198.18.0.0/15]\n    ports: [443]\n    protocol: tcp\n");
        }
    }
    text
}

/// Decisions counted and kernel records dropped, from the node's metrics.
fn counts(addr: std::net::SocketAddr) -> (u64, u64) {
    let s = scrape(addr);
    let sum = |name: &str| -> u64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v as u64,
                _ => 0,
            })
            .sum()
    };
    (
        sum("agentwall_decisions_total"),
        sum("agentwall_events_dropped_total"),
    )
}

struct Rig {
    _node: NodeProc,
    agent: Probe,
    metrics: std::net::SocketAddr,
    /// The next port each sweep starts at, so every flow of the run is new.
    next: u32,
}

impl Rig {
    fn start(bin: &Path, env: &TestEnv, dir: &Path, ca: &Ca, audit: Option<&Path>) -> Self {
        let metrics = loopback_addr();
        let m = metrics.to_string();
        let mut flags = vec!["--metrics-listen", &m, "--dns-listen-port", "0"];
        let a;
        if let Some(p) = audit {
            a = p.display().to_string();
            flags.extend(["--audit-log", &a]);
        }
        let node = NodeProc::start_bin(bin, env, dir, &flags, &[], None);
        let id = format!("spiffe://example.org/agent/a{IDENTITIES}");
        let (cert, key) = write_cert(dir, "agent", &ca.issue(&CertSpec::agent(&id)));
        let mut c = launch_args(&node.socket, &cert, &key);
        c.arg(bin_path("aw-probe")).arg("--netns");
        let agent = Probe::from_command(c);
        Self {
            _node: node,
            agent,
            metrics,
            next: 1,
        }
    }

    /// One round of `n` distinct flows; (records per second, records dropped).
    fn round(&mut self, n: u32) -> (f64, u64) {
        let (d0, x0) = counts(self.metrics);
        let half = n / 2;
        let t0 = Instant::now();
        // The same ports on a denied and an allowed address; past 60,000 ports the sweep
        // moves on to the next address, so every flow of the run is new.
        let mut left = half;
        while left > 0 {
            let (host, port) = (1 + self.next / 60_000, self.next % 60_000 + 1);
            let take = left.min(60_001 - port);
            for net in ["198.51.100", "203.0.113"] {
                let out = self.agent.cmd(&format!(
                    "sweep udp {net}.{host} {port} {}",
                    port + take - 1
                ));
                assert!(!out.starts_with("err"), "sweep: {out}");
            }
            self.next += take;
            left -= take;
        }
        let n = 2 * half;
        // Done when the node has counted every record it was given (kernel drops aside) and
        // the count no longer moves.
        let mut last = (d0, x0);
        let mut still = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let now = counts(self.metrics);
            let done = (now.0 - d0) + (now.1 - x0) >= u64::from(n);
            if now != last {
                last = now;
                still = Instant::now();
            }
            if done || still.elapsed() > Duration::from_secs(3) {
                let took = if done { t0.elapsed() } else { still - t0 };
                return ((now.0 - d0) as f64 / took.as_secs_f64(), now.1 - x0);
            }
        }
    }
}

pub fn run(flows: u32) {
    let env = TestEnv::new("bench-records");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("agentwall bench CA");
    std::fs::create_dir(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/agents.yaml"), policy()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let mut builds: Vec<(String, PathBuf)> = vec![("this build".into(), bin_path("agentwall"))];
    if let Some(b) = std::env::var_os("AGENTWALL_BENCH_BASELINE") {
        builds.insert(0, ("baseline".into(), PathBuf::from(b)));
    }
    println!(
        "Records per second the node enriches and folds: {IDENTITIES} identities of 10 rules, {flows} distinct flows per round (half denied, half allowed by a rule), median of {ROUNDS} rounds"
    );
    println!();
    println!("| build | audit log | records/s | dropped by the ring buffer (all rounds) |");
    println!("|---|---|---:|---:|");
    let mut results = Vec::new();
    for audit in [false, true] {
        for (name, bin) in &builds {
            let log = dir.join(format!("audit-{}.jsonl", results.len()));
            let mut rig = Rig::start(bin, &env, dir, &ca, audit.then_some(log.as_path()));
            rig.round(2_000);
            let mut rates = Vec::new();
            let mut dropped = 0;
            for _ in 0..ROUNDS {
                let (rate, d) = rig.round(flows);
                rates.push(rate as u64);
                dropped += d;
            }
            drop(rig);
            let _ = std::fs::remove_file(&log);
            let r = median(rates);
            println!(
                "| {name} | {} | {r} | {dropped} |",
                if audit { "on" } else { "off" }
            );
            results.push((audit, name.clone(), r));
        }
    }
    if builds.len() == 2 {
        println!();
        for audit in [false, true] {
            let of = |n: &str| {
                results
                    .iter()
                    .find(|(a, b, _)| *a == audit && b == n)
                    .map_or(0, |r| r.2)
            };
            println!(
                "audit log {}: this build {:.2}x the baseline",
                if audit { "on" } else { "off" },
                of("this build") as f64 / of("baseline").max(1) as f64
            );
        }
    }
}
