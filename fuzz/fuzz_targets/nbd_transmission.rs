//! NBD transmission requests: `read_request`, `complete_request` and `validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| blockd::fuzzing::transmission(data));
