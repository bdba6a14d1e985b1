//! Journal records: `raid::journal::record::replay` and `Checkpoint::decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| raid::fuzzing::journal(data));
