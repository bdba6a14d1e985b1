//! qemu-img and qemu-io against a real blockd.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use tests::{ok, require, run, scratch, Daemon};

#[test]
fn qemu_img_info_convert_in_and_out_and_compare() {
    require("qemu-img");
    require("qemu-io");
    let d = Daemon::start(&["--volume", "disk=64M"]);
    let dir = scratch("qemu-img");
    let src = dir.join("src.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src)
        .arg("64M"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0xc3 40M 512k",
        ])
        .arg(&src));

    let info = ok(Command::new("qemu-img").args(["info", "--output=json", &d.uri("disk")]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");

    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&src)
        .arg(d.uri("disk")));
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(d.uri("disk")));
    let out = dir.join("out.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &d.uri("disk")])
        .arg(&out));
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(&out));

    // compare must be able to fail: change one sector on the export.
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x01 2M 512", &d.uri("disk")]));
    let differs = run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(d.uri("disk")));
    assert_eq!(
        differs.status.code(),
        Some(1),
        "qemu-img compare did not notice a changed sector"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn qemu_io_patterns_fua_and_extended_headers() {
    require("qemu-io");
    let d = Daemon::start(&["--volume", "disk=32M"]);
    let uri = d.uri("disk");
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xaa 0 1M",
        "-c",
        "write -f -P 0xbb 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "discard 3M 1M",
        "-c",
        "flush",
        "-c",
        "read -P 0xaa 0 1M",
        "-c",
        "read -P 0xbb 1M 64k",
        "-c",
        "read -P 0 2M 2M",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A wrong pattern must be reported (the check above can fail).
    let bad = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xcc 0 4k", &uri]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
    // qemu >= 8.2 negotiates extended headers; the daemon counts sessions by mode.
    let metrics = d.metrics();
    let extended = metrics
        .lines()
        .find(|l| l.starts_with("blockd_nbd_sessions_total{mode=\"extended\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        extended >= 2.0,
        "qemu sessions did not use extended headers:\n{metrics}"
    );
    // FUA writes were seen by the server.
    assert!(
        metrics.contains("blockd_nbd_requests_total{volume=\"disk\",op=\"write\"}"),
        "{metrics}"
    );
}

#[test]
fn qemu_io_over_the_unix_socket() {
    require("qemu-io");
    let d = Daemon::start(&["--volume", "disk=8M"]);
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "read -P 0x11 0 64k",
        &d.unix_uri("disk"),
    ]));
    assert!(!out.contains("verification failed"), "{out}");
}
