//! `cargo xtask bench node`: what a node on a large policy costs to start and to keep:
//! `agentwall node` on 10,000 AgentPolicy documents of 10 one-address rules each (100,000
//! rules), from exec to ready (its readiness line), its resident memory once ready, and the
//! kernel memory of its BPF maps. Each run starts on a fresh state directory and pin
//! directory, so every trie is built.
//!
//! `AGENTWALL_BENCH_BASELINE=/path/to/agentwall` starts that build too, interleaved run by
//! run, and prints the ratios.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::median;

const IDENTITIES: u32 = 10_000;
const PER: u32 = 10;

/// A process's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory charged to the BPF maps a process holds fds of (fdinfo `memlock`).
fn bpf_memlock_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
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

/// `agentwall node` (the build at `bin`) started on a policy of `identities` AgentPolicy
/// documents with `per` one-address rules each. Returns (start to ready, RSS KiB, map bytes).
pub(crate) fn node_memory(bin: &Path, identities: u32, per: u32) -> (Duration, u64, u64) {
    let mut text = String::new();
    for id in 1..=identities {
        let _ = write!(
            text,
            "---\nkind: AgentPolicy\nname: a{id}\nidentity: spiffe://example.org/agent/a{id}\negress:\n"
        );
        for i in 0..per {
            let a = std::net::Ipv4Addr::from(0x0b00_0000 | (id << 4) | i);
            let _ = write!(
                text,
                "  - to: [{a}/32]\n    ports: [443]\n    protocol: tcp\n"
            );
        }
    }
    let (env, tmp, _ca) = agentwall_tests::node::setup("bench-memory", &text);
    let t0 = Instant::now();
    let node = agentwall_tests::node::NodeProc::start_bin(bin, &env, tmp.path(), &[], &[], None);
    let took = t0.elapsed();
    let pid = node.child.id();
    (took, rss_kib(pid), bpf_memlock_bytes(pid))
}

pub fn run(runs: usize) {
    let mut builds: Vec<(String, PathBuf)> =
        vec![("this build".into(), agentwall_tests::bin_path("agentwall"))];
    if let Some(b) = std::env::var_os("AGENTWALL_BENCH_BASELINE") {
        builds.insert(0, ("baseline".into(), PathBuf::from(b)));
    }
    let mut results: Vec<(Vec<u64>, Vec<u64>, Vec<u64>)> = vec![Default::default(); builds.len()];
    for _ in 0..runs {
        for (i, (_, bin)) in builds.iter().enumerate() {
            let (took, rss, maps) = node_memory(bin, IDENTITIES, PER);
            results[i].0.push(took.as_millis() as u64);
            results[i].1.push(rss);
            results[i].2.push(maps);
        }
    }
    println!(
        "agentwall node on {IDENTITIES} AgentPolicy documents of {PER} rules ({} rules), fresh state each start; medians of {runs} starts (min-max)",
        IDENTITIES * PER
    );
    println!();
    println!("| build | exec to ready | RSS once ready | kernel memory of its BPF maps |");
    println!("|---|---:|---:|---:|");
    let span = |v: &[u64]| (*v.iter().min().unwrap(), *v.iter().max().unwrap());
    let mut medians = Vec::new();
    for ((name, _), (t, r, m)) in builds.iter().zip(&results) {
        let (tl, th) = span(t);
        let (rl, rh) = span(r);
        let (tm, rm, mm) = (median(t.clone()), median(r.clone()), median(m.clone()));
        println!(
            "| {name} | {:.2} s ({:.2}-{:.2}) | {} MiB ({}-{}) | {} MiB |",
            tm as f64 / 1e3,
            tl as f64 / 1e3,
            th as f64 / 1e3,
            rm >> 10,
            rl >> 10,
            rh >> 10,
            mm >> 20
        );
        medians.push((tm, rm));
    }
    println!();
    let (tm, rm) = *medians.last().unwrap();
    println!(
        "Targets: RSS under 60 MiB ({}), ready in under 2 s ({}).",
        if rm < 60 << 10 { "met" } else { "missed" },
        if tm < 2000 { "met" } else { "missed" }
    );
    if medians.len() == 2 {
        let (bt, br) = medians[0];
        println!(
            "This build against the baseline: {:.2}x the time to ready, {:.2}x the RSS.",
            tm as f64 / bt.max(1) as f64,
            rm as f64 / br.max(1) as f64
        );
    }
}
