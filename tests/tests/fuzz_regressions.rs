//! Replays every input the fuzzer kept (crashes found before, and the seed corpus) through the
//! policy parser: each must yield a policy or errors, never a panic.

use std::path::PathBuf;

#[test]
fn policy_parser_survives_every_kept_input() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["regressions/policy", "corpus/policy"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = agentwall::policy::source::parse_sources(vec![("fuzz.yaml".into(), text)]);
            n += 1;
        }
    }
    assert!(n >= 2, "the seed corpus is missing ({n} inputs)");
}
