//! An admin's policy push body at the control plane: any bytes must become a valid bundle
//! or a list of problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentwall::fuzzing::cp_push(data);
});
