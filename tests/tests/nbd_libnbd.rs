//! python3-libnbd and raw-socket protocol checks (tests/py/libnbd_checks.py).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use tests::{python, Daemon};

#[test]
fn libnbd_protocol_checks() {
    let d = Daemon::start(&["--volume", "v=128M"]);
    d.volctl_ok(&["volume", "create", "ro", "16M", "--read-only"]);
    let out = python(
        "libnbd_checks.py",
        &["127.0.0.1", &d.port.to_string(), "v", "ro"],
    );
    println!("{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn libnbd_protocol_checks_with_cache_none() {
    let d = Daemon::start(&["--volume", "v=128M", "--cache", "none"]);
    d.volctl_ok(&["volume", "create", "ro", "16M", "--read-only"]);
    let out = python(
        "libnbd_checks.py",
        &["127.0.0.1", &d.port.to_string(), "v", "ro"],
    );
    assert!(out.contains(" passed, 0 failed"), "{out}");
}
