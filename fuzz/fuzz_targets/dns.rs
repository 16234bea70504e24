//! The DNS proxy reads an agent's query and an upstream's answer, bytes it did not make:
//! any of them must be refused or read, never panic. The input is a query's length (two
//! bytes, big-endian), the query, and the answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentwall::fuzzing::dns(data);
});
