//! volctl end to end, catalog persistence and start-up checks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use tests::{ok, require, scratch, Daemon};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn create_list_show_resize_delete() {
    let d = Daemon::start(&[]);
    assert!(d.volctl_ok(&["volume", "list"]).contains("no volumes"));
    d.create("db", "1G");
    d.volctl_ok(&["volume", "create", "logs", "512M", "--cache", "none"]);
    let list = d.volctl_ok(&["volume", "list"]);
    assert!(list.lines().next().unwrap().starts_with("NAME"), "{list}");
    assert!(
        list.contains("db") && list.contains("1.0 GiB") && list.contains("none"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&d.volctl_ok(&["--json", "volume", "list"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    d.volctl_ok(&["volume", "resize", "db", "2G"]);
    let show: serde_json::Value =
        serde_json::from_str(&d.volctl_ok(&["--json", "volume", "show", "db"])).unwrap();
    assert_eq!(show["size_bytes"], 2u64 << 30);
    d.volctl_ok(&["volume", "delete", "logs"]);
    let json: serde_json::Value =
        serde_json::from_str(&d.volctl_ok(&["--json", "volume", "list"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    let status = d.volctl_ok(&["status"]);
    assert!(
        status.contains("io_uring") || status.contains("sync"),
        "{status}"
    );
}

#[test]
fn bad_requests_get_clear_errors_and_nonzero_exit() {
    let d = Daemon::start(&[]);
    d.create("a", "1M");
    let cases: [(&[&str], &str); 7] = [
        (&["volume", "create", "a", "1M"], "already exists"),
        (&["volume", "create", "b c", "1M"], "invalid volume name"),
        (&["volume", "create", "b", "1000"], "not a multiple of 512"),
        (&["volume", "create", "b", "12Q"], "invalid size"),
        (&["volume", "resize", "a", "512K"], "shrinking"),
        (&["volume", "show", "zz"], "does not exist"),
        (&["volume", "delete", "zz"], "does not exist"),
    ];
    for (args, want) in cases {
        let out = d.volctl(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let out = tests::run(Command::new(tests::bin("volctl")).args([
        "--socket",
        "/nonexistent/admin.sock",
        "status",
    ]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is blockd running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn delete_is_refused_while_connected_unless_forced() {
    require("nbdsh");
    let d = Daemon::start(&["--volume", "busy=16M"]);
    // A client that stays connected until its stdin closes.
    let mut client = tests::nbdsh()
        .args([
            "-u",
            &d.uri("busy"),
            "-c",
            "import sys; h.pread(512, 0); sys.stdin.read()",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let show: serde_json::Value =
            serde_json::from_str(&d.volctl_ok(&["--json", "volume", "show", "busy"])).unwrap();
        if show["connections"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "client never connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = d.volctl(&["volume", "delete", "busy"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("connected client"),
        "{}",
        stderr(&out)
    );
    d.volctl_ok(&["volume", "delete", "busy", "--force"]);
    drop(client.stdin.take());
    let _ = client.wait();
    assert!(!d.volctl(&["volume", "show", "busy"]).status.success());
}

#[test]
fn catalog_survives_restart_and_corruption_stops_start_up() {
    require("qemu-io");
    let dir = scratch("restart");
    let mut d = Daemon::start_in(dir.clone(), &[]);
    d.create("keep", "8M");
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 0 64k", &d.uri("keep")]));
    assert!(d.stop().success());
    let d2 = Daemon::start_in(dir.clone(), &[]);
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x42 0 64k", &d2.uri("keep")]));
    let data_dir = d2.data_dir.clone();
    let mut d2 = d2;
    assert!(d2.stop().success());
    std::mem::forget(d2);

    let catalog = data_dir.join("catalog");
    let mut bytes = std::fs::read(&catalog).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(&catalog, &bytes).unwrap();
    let (status, log) = Daemon::start_failing(&data_dir, &[]);
    assert!(!status.success());
    assert!(
        log.contains("is corrupt") && log.contains("checksum"),
        "{log}"
    );
    std::fs::write(&catalog, &bytes[..40]).unwrap();
    let (status, log) = Daemon::start_failing(&data_dir, &[]);
    assert!(!status.success());
    assert!(log.contains("torn"), "{log}");
    std::fs::remove_dir_all(&data_dir).ok();
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let d = Daemon::start(&[]);
    let (status, log) = Daemon::start_failing(&d.data_dir, &[]);
    assert!(!status.success());
    assert!(log.contains("in use by another blockd"), "{log}");
}

#[test]
fn sigterm_finishes_in_flight_writes_and_flushes() {
    let mut d = Daemon::start(&["--volume", "v=64M"]);
    let file = d.volume_file(1);
    // Queue writes, SIGTERM the daemon while they are in flight, and collect which ones were
    // answered with success: each of those must be on disk after the daemon exits.
    let out = tests::python("sigterm_writes.py", &[&d.uri("v"), &d.pid().to_string()]);
    assert!(d.stop().success(), "blockd did not exit 0:\n{}", d.log());
    let answered: Vec<usize> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert!(
        !answered.is_empty(),
        "no write was answered before shutdown"
    );
    let data = std::fs::read(&file).unwrap();
    for i in answered {
        let block = &data[i * 262144..(i + 1) * 262144];
        assert!(
            block.iter().all(|&b| b == i as u8 + 1),
            "answered write {i} lost"
        );
    }
    assert!(d.log().contains("stopped"), "{}", d.log());
    std::fs::remove_dir_all(&d.data_dir).ok();
}
