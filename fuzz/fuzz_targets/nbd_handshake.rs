//! The NBD handshake: `blockd::nbd::handshake::negotiate` on the client's bytes.
#![no_main]

use std::sync::LazyLock;

use blockd::fuzzing::{handshake, HandshakeFixture};
use libfuzzer_sys::fuzz_target;

static FIXTURE: LazyLock<HandshakeFixture> =
    LazyLock::new(|| HandshakeFixture::new().expect("scratch volume manager"));

fuzz_target!(|data: &[u8]| handshake(&FIXTURE, data));
