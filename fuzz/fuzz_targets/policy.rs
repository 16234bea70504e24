//! The policy parser must turn any bytes into a policy or into errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = agentwall::policy::source::parse_sources(vec![("fuzz.yaml".into(), text)]);
});
