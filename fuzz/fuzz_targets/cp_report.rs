//! A node's report body at the control plane (after authentication, before the store): any
//! bytes, gzip-compressed or not (the first byte says which), must be decoded or refused
//! with a reason, never panic or outgrow the batch limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentwall::fuzzing::cp_report(data);
});
