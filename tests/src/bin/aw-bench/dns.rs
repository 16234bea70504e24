//! `cargo xtask bench dns`: what the DNS proxy adds to a lookup.
//!
//! Inside a network namespace made for the run: aw-dns serves 1,000 names, the real node runs
//! with its proxy, and two probes send the same paced stream of A queries (a fresh connected
//! UDP socket per query, as stub resolvers do) to the same resolver address. One probe is not
//! governed: its queries go straight to the upstream. The other is an agent launched under an
//! identity with a `**.example.com` rule: its queries are steered to the proxy, forwarded,
//! and each answer's address is written into the kernel before the agent gets it. Rounds
//! alternate between the two so drift hits both alike.

use std::process::Command;

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
    let node = NodeProc::start_in(&env, dir, &["--dns-upstream", &upstream], &[], Some(&ns));
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
    let (d50, d99, p50, p99) = (median(d50), median(d99), median(p50), median(p99));
    println!(
        "DNS A lookups at {QPS} queries/s over {NAMES} names, {queries} queries x {ROUNDS} rounds per row (medians of the rounds)"
    );
    println!();
    println!("| path | p50 µs | p99 µs | failed |");
    println!("|---|---:|---:|---:|");
    println!(
        "| direct to the upstream (not governed) | {:.1} | {:.1} | {dfail} |",
        d50 as f64 / 1e3,
        d99 as f64 / 1e3
    );
    println!(
        "| agent through the agentwall proxy (steered, forwarded, address written to the kernel) | {:.1} | {:.1} | {pfail} |",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    let added50 = p50 as i64 - d50 as i64;
    let added99 = p99 as i64 - d99 as i64;
    println!(
        "| **added by agentwall** | **{:+.1}** | **{:+.1}** | |",
        added50 as f64 / 1e3,
        added99 as f64 / 1e3
    );
    println!();
    println!(
        "Targets: p50 added < 200 µs ({}), p99 added < 2 ms ({}).",
        if added50 < 200_000 { "met" } else { "missed" },
        if added99 < 2_000_000 { "met" } else { "missed" }
    );
}
