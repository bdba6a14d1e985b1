//! nbdinfo and nbdcopy against a real blockd.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use tests::{ok, require, scratch, Daemon};

#[test]
fn nbdinfo_list_map_json() {
    require("nbdinfo");
    let d = Daemon::start(&["--volume", "alpha=16M"]);
    d.create("beta", "32M");
    let list = ok(Command::new("nbdinfo").args(["--list", "--json", &d.uri("")]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);

    let info = ok(Command::new("nbdinfo").args(["--json", &d.uri("beta")]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 32 << 20);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["block_size_minimum"], 512);

    ok(tests::nbdsh().args([
        "-u",
        &d.uri("beta"),
        "-c",
        "h.pwrite(b'x' * 65536, 1048576)",
    ]));
    let map = ok(Command::new("nbdinfo").args(["--map", &d.uri("beta")]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "65536", "0"], "{map}");
    assert_eq!(
        rows[2][..3],
        ["1114112", &(32 * 1048576 - 1114112).to_string(), "3"],
        "{map}"
    );

    // An empty name is ambiguous with two volumes: a clear error, not a random export.
    let out = tests::run(Command::new("nbdinfo").arg(d.uri("")));
    assert!(!out.status.success());
}

#[test]
fn nbdcopy_256mib_in_and_out() {
    require("nbdcopy");
    let d = Daemon::start(&["--volume", "img=256M"]);
    let dir = scratch("nbdcopy");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 256M /dev/urandom > {}", src.display())));
    ok(Command::new("nbdcopy").arg(&src).arg(d.uri("img")));
    ok(Command::new("nbdcopy").arg(d.uri("img")).arg(&back));
    let a = std::fs::read(&src).unwrap();
    let b = std::fs::read(&back).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a == b, "nbdcopy round trip differs");
    std::fs::remove_dir_all(dir).ok();
}
