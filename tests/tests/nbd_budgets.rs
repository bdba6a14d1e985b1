//! Server-wide budgets (blockd/src/budget.rs): connections still in the handshake, threads
//! and request payload, each bounded for the whole server and shown by `volctl status` and
//! `/metrics`. (Sessions beyond `--max-connections`: nbd_libnbd.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{python, workspace_root, Daemon, Launch};

/// The value of a metric line that starts with `prefix` (`name{labels} `).
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

/// A budget's (used, limit, refused) from `volctl status --json`.
fn budget(d: &Daemon, name: &str) -> (u64, u64, u64) {
    let status: serde_json::Value =
        serde_json::from_str(&d.volctl_ok(&["--json", "status"])).unwrap();
    let b = status["budgets"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["name"] == name))
        .unwrap_or_else(|| panic!("no budget {name} in {status}"));
    let n = |k: &str| b[k].as_u64().unwrap();
    (n("used"), n("limit"), n("refused"))
}

fn number_after(out: &str, word: &str) -> f64 {
    out.split_whitespace()
        .skip_while(|w| *w != word)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {word} in: {out}"))
}

/// 2,000 connections that never speak do not lock a real client out: the oldest silent
/// ones are closed, the client finishes its handshake and I/O within a second, and the
/// evictions are counted and logged at most once a second. (Before the handshake budget,
/// the silent connections held every connection slot and the client was refused.)
#[test]
fn a_flood_of_silent_connections_does_not_lock_out_a_real_client() {
    let how = Launch {
        host: "127.0.0.41",
        ..Launch::default()
    };
    let mut d = Daemon::launch(tests::scratch("flood"), how, &["--volume", "v=16M"]);
    let t0 = Instant::now();
    let out = python(
        "handshake_flood.py",
        &[&d.host, &d.port.to_string(), &d.uri("v")],
    );
    let seconds = t0.elapsed().as_secs_f64();
    println!("{out}");
    assert!(number_after(&out, "client-seconds") < 1.0, "{out}");
    assert!(number_after(&out, "flood-closed") >= 900.0, "{out}");
    let (used, limit, refused) = budget(&d, "handshakes");
    assert_eq!(limit, 1024);
    assert!(refused >= 976, "evictions not counted: {refused}");
    assert!(used <= limit);
    let metrics = d.metrics();
    assert!(
        metric(
            &metrics,
            r#"blockd_budget_refused_total{budget="handshakes"} "#
        ) >= 976.0
    );
    assert_eq!(
        metric(&metrics, r#"blockd_budget_limit{budget="handshakes"} "#),
        1024.0
    );
    let human = d.volctl_ok(&["status"]);
    assert!(
        human.contains("handshakes") && human.contains("payload_bytes"),
        "{human}"
    );
    assert!(d.stop().success(), "{}", d.log());
    let lines = d.log().matches("closing the oldest").count();
    assert!(
        (1..=seconds.ceil() as usize + 1).contains(&lines),
        "{lines} eviction log lines in {seconds:.1} s"
    );
}

/// Sessions that grow their threads stop growing at the server's thread budget, and keep
/// answering right on the threads they have.
#[test]
fn sessions_grow_only_within_the_thread_budget() {
    let how = Launch {
        host: "127.0.0.42",
        ..Launch::default()
    };
    let d = Daemon::launch(
        tests::scratch("threads"),
        how,
        &["--volume", "v=16M", "--max-connections", "24"],
    );
    let (_, limit, _) = budget(&d, "threads");
    // 24 sessions of 3 base threads, and 16 sessions' growth of 30.
    assert_eq!(limit, 24 * 3 + 16 * 30);
    // Unbounded, 24 grown sessions would run 24 * 33 = 792 threads.
    let out = python(
        "thread_budget.py",
        &[&d.uri("v"), &d.pid().to_string(), "24"],
    );
    let threads = number_after(&out, "threads");
    assert!(
        threads <= limit as f64,
        "{threads} session threads, budget {limit}"
    );
    let (_, _, denied) = budget(&d, "threads");
    assert!(denied >= 1, "growth beyond the budget was not refused");
}

/// Clients that send large READs and never read the replies hold no more than the
/// server's payload budget between them (each would pin its session's 128 MiB), and their
/// sessions end at the send timeout, giving everything back; a real client then works.
#[test]
fn clients_that_never_read_hold_the_payload_budget_and_are_cut_off() {
    let how = Launch {
        host: "127.0.0.43",
        ..Launch::default()
    };
    let d = Daemon::launch(
        tests::scratch("unread"),
        how,
        &["--volume", "v=64M", "--send-timeout", "3"],
    );
    let (_, limit, _) = budget(&d, "payload_bytes");
    // 10 clients x 5 READs of 32 MiB: 1.6 GiB asked, 1.25 GiB within the sessions' own caps.
    let mut child = Command::new("/usr/bin/python3")
        .arg(workspace_root().join("tests/py/unread_replies.py"))
        .args([&d.uri("v"), "10", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("sent"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut peak, mut waited, mut ended) = (0, 0, false);
    while Instant::now() < deadline {
        let (used, _, refused) = budget(&d, "payload_bytes");
        peak = peak.max(used);
        waited = waited.max(refused);
        assert!(used <= limit, "payload held {used} > budget {limit}");
        let (sessions, _, _) = budget(&d, "sessions");
        if sessions == 0 && waited > 0 {
            ended = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        waited > 0,
        "no request waited for the payload budget (peak {peak})"
    );
    assert!(
        peak > limit / 2,
        "the clients never filled the budget (peak {peak})"
    );
    assert!(
        ended,
        "sessions that never read were not ended by the send timeout"
    );
    // Reads still running when their session ended give their buffers back as they finish.
    let settle = Instant::now() + Duration::from_secs(10);
    while budget(&d, "payload_bytes").0 != 0 {
        assert!(
            Instant::now() < settle,
            "payload still held: {:?}",
            budget(&d, "payload_bytes")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tests::ok(Command::new("nbdinfo").arg("--size").arg(d.uri("v")));
    assert_eq!(out.trim(), (64u64 << 20).to_string());
}
