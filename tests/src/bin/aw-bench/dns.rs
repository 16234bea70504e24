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
//! Then the same rounds again while the policy changes every second: 1,000 more identities
//! of 10 rules each, every rule's port changed each time (10,000 rules applied), and the
//! agent's own rules too, so its trie is rebuilt, learned addresses included, while its
//! answers keep arriving. An answer must never wait for an apply.

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
const ROUNDS: usize = 5;

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

/// Policy applies the audit log recorded.
fn applies(audit: &Path) -> usize {
    agentwall_tests::node::audit_records(audit)
        .iter()
        .filter(|r| r["kind"] == "policy" && r["event"] == "applied")
        .count()
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
    let audit = dir.join("audit.jsonl");
    let node = NodeProc::start_in(
        &env,
        dir,
        &[
            "--dns-upstream",
            &upstream,
            "--audit-log",
            audit.to_str().unwrap(),
        ],
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
    let rounds = |direct: &mut Probe, agent: &mut Probe| {
        let (mut d50, mut d99, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
        let (mut dfail, mut pfail) = (0, 0);
        for _ in 0..ROUNDS {
            let (a, b, f) = triple(&direct.cmd(&cmd));
            d50.push(a);
            d99.push(b);
            dfail += f;
            let (a, b, f) = triple(&agent.cmd(&cmd));
            p50.push(a);
            p99.push(b);
            pfail += f;
        }
        Row {
            d50: median(d50),
            d99: median(d99),
            p50: median(p50),
            p99: median(p99),
            dfail,
            pfail,
        }
    };
    let quiet = rounds(&mut direct, &mut agent);

    // The policy changes every second from here on.
    let stop = Arc::new(AtomicBool::new(false));
    write_policy(dir, &churned(0));
    let first = agentwall_tests::node::eventually(
        "the first churned policy to be applied",
        Duration::from_secs(30),
        || {
            let n = applies(&audit);
            if n >= 2 {
                Ok(n)
            } else {
                Err(format!("{n} applies"))
            }
        },
    );
    let churn = {
        let stop = stop.clone();
        let dir = dir.to_owned();
        std::thread::spawn(move || {
            let mut k = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                write_policy(&dir, &churned(k));
                k += 1;
            }
        })
    };
    let t0 = std::time::Instant::now();
    let busy = rounds(&mut direct, &mut agent);
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let during = applies(&audit) - first;

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
        "Under churn: {during} applies of 10,000 rules in {:.0} s; p99 added {:+.1} µs, {ratio:.2}x the quiet row (target <= 2x, {}).",
        took.as_secs_f64(),
        busy.added99() as f64 / 1e3,
        if ratio <= 2.0 { "met" } else { "missed" }
    );
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
