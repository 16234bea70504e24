//! The policy parser must turn any bytes into a policy or into errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentwall::fuzzing::policy(data);
});
