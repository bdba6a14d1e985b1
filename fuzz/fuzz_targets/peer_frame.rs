//! Peer frames: `raid::protocol::wire::read` over a stream of frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| raid::fuzzing::peer_frames(data));
