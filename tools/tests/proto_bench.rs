//! proto-bench end to end: two processes (this build's `proto-bench` and the peer it
//! spawns) run the write protocol over loopback TCP at every toughness and both queue
//! depths; the report must have a row with a non-zero rate for each. Seconds, not minutes:
//! the figures themselves are for the benchmark, not for a test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

#[test]
fn two_processes_write_at_every_toughness() {
    let dir = std::env::temp_dir().join(format!("proto-bench-test-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_proto-bench"))
        .args(["--rounds", "1", "--seconds", "0.3", "--stripes", "512"])
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run proto-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "proto-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for level in 0..3 {
        for depth in [1, 32] {
            let name = format!("| toughness {level}, QD{depth}, two processes | ");
            let row = stdout
                .lines()
                .find(|l| l.starts_with(&name))
                .unwrap_or_else(|| panic!("no row {name:?} in:\n{stdout}"));
            let iops: f64 = row[name.len()..]
                .split('|')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(iops > 0.0, "{row}");
        }
    }
    // The device files are removed when the run ends.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}
