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

#[test]
fn connections_beyond_the_limit_are_refused_and_the_rest_keep_working() {
    let d = Daemon::start(&["--volume", "v=16M", "--max-connections", "2"]);
    let out = tests::python("connection_limit.py", &[&d.uri("v")]);
    assert!(out.contains("ok"), "{out}");
    let metrics = d.metrics();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"blockd_budget_refused_total{budget="sessions"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "no refusal counted:\n{metrics}");
}

/// A one-request-at-a-time client, and one sending large writes, grow their connection to
/// the full thread count (see `limits::CONNECTION_THREADS_MAX`), and answers stay right.
#[test]
fn lone_requests_grow_the_connection_threads() {
    let d = Daemon::start(&["--volume", "v=16M"]);
    let out = python("lone_growth.py", &[&d.uri("v"), &d.pid().to_string()]);
    assert!(number_after(&out, "before") <= 2.0, "{out}");
    assert!(number_after(&out, "after") >= 32.0, "{out}");
    assert!(number_after(&out, "large-writes") >= 32.0, "{out}");
}

/// The number that follows `word` in a script's `word N` output.
fn number_after(out: &str, word: &str) -> f64 {
    out.split_whitespace()
        .skip_while(|w| *w != word)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {word} in: {out}"))
}

/// A client with more than one request in flight keeps one connection thread on the read
/// side, also across writes that carry a single request (see `limits::DEEP_BURSTS`): the
/// previous behaviour handed it over after each of those, spreading the work over the
/// threads (busiest share 0.04, and the connection grew to 32 threads).
#[test]
fn a_deep_client_is_served_by_one_thread() {
    let d = Daemon::start(&["--volume", "v=16M"]);
    let out = python("deep_hold.py", &[&d.uri("v"), &d.pid().to_string()]);
    assert!(number_after(&out, "threads") <= 2.0, "{out}");
    assert!(number_after(&out, "busiest-share") >= 0.9, "{out}");
}

/// SIGTERM answers every request a session has received (tests/py/sigterm_queued.py): those
/// in flight normally, those not started (and a WRITE cut short) with ESHUTDOWN, none
/// dropped; a client mid-handshake gets ERR_SHUTDOWN. Before, the requests not started ran
/// and the torn WRITE got no reply, and the client mid-handshake was disconnected.
#[test]
fn sigterm_answers_every_request_received() {
    let mut d = Daemon::start(&["--volume", "v=64M"]);
    let file = d.volume_file(1);
    let out = python("sigterm_queued.py", &[&d.uri("v"), &d.pid().to_string()]);
    println!("{out}");
    assert!(d.stop().success(), "blockd did not exit 0:\n{}", d.log());
    assert!(number_after(&out, "eshutdown") >= 1.0, "{out}");
    let data = std::fs::read(&file).unwrap();
    let written = out
        .lines()
        .find_map(|l| l.strip_prefix("written-ok"))
        .unwrap_or_else(|| panic!("no written-ok in: {out}"));
    for block in written
        .split_whitespace()
        .map(|b| b.parse::<usize>().unwrap())
    {
        let bytes = &data[block * 4096..(block + 1) * 4096];
        assert!(
            bytes.iter().all(|&b| usize::from(b) == block % 251 + 1),
            "block {block} answered as written is not on disk"
        );
    }
}
