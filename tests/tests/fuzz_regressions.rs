//! Replays every input the fuzzers kept (crashes found before, and each target's seed corpus)
//! through what the fuzz target drives: the policy parser, the DNS proxy's reading of queries
//! and answers, and the control plane's report and policy-push bodies. Each must be read or
//! refused, never panic.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seeds = 0;
    for dir in ["regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            run(&std::fs::read(e.path()).unwrap());
            seeds += usize::from(dir == "corpus");
        }
    }
    assert!(
        seeds >= 2,
        "{target}: the seed corpus is missing ({seeds} inputs)"
    );
}

#[test]
fn policy_parser_survives_every_kept_input() {
    replay("policy", agentwall::fuzzing::policy);
}

#[test]
fn dns_proxy_survives_every_kept_input() {
    replay("dns", agentwall::fuzzing::dns);
}

#[test]
fn control_plane_report_bodies_survive_every_kept_input() {
    replay("cp_report", agentwall::fuzzing::cp_report);
}

#[test]
fn control_plane_push_bodies_survive_every_kept_input() {
    replay("cp_push", agentwall::fuzzing::cp_push);
}

/// The seeds are what they claim: the fuzzer starts from inputs that reach deep.
#[test]
fn the_seeds_read_as_real_exchanges() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let seed = std::fs::read(root.join("dns/a-through-cname.bin")).unwrap();
    let len = usize::from(u16::from_be_bytes([seed[0], seed[1]]));
    let (query, answer) = seed[2..].split_at(len);
    let a = agentwall::dns::proxy::examine_untrusted(query, answer).expect("an answer");
    assert_eq!(a.qname, "api.example.com");
    assert_eq!(a.addrs, [("192.0.2.80".parse().unwrap(), 60)]);
    for f in ["plain.bin", "gzip.bin"] {
        let seed = std::fs::read(root.join("cp_report").join(f)).unwrap();
        let (batch, _) = agentwall::control_plane::ReportBatch::decode(&seed[1..], seed[0] == 1)
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(batch.records.len(), 2, "{f}");
    }
    // Records as a node's log writes them: the chain check finds them whole.
    let seed = std::fs::read(root.join("cp_report/chained.bin")).unwrap();
    let (batch, _) = agentwall::control_plane::ReportBatch::decode(&seed[1..], false).unwrap();
    let mut check = agentwall::control_plane::chain::ChainCheck::new("seed");
    for r in &batch.records {
        check.record(r.rid, r.record.get());
    }
    let report = check.finish();
    assert!(report.intact && report.records == 3, "{report:?}");
    for f in ["one-file.json", "two-files.json"] {
        let seed = std::fs::read(root.join("cp_push").join(f)).unwrap();
        let req: agentwall::control_plane::PushRequest = serde_json::from_slice(&seed).unwrap();
        agentwall::control_plane::validate(&req.files).unwrap_or_else(|e| panic!("{f}: {e:?}"));
    }
}
