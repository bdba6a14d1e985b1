//! fio against blockd: fresh sessions at high queue depth, mixed reads and writes, several
//! connections, every block verified. This catches lost replies and deadlocks (a session
//! that stops answering fails the run by timeout) as well as corruption.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use tests::{require, run, scratch, Daemon};

fn fio(uri: &str, args: &[&str]) {
    let started = Instant::now();
    // fio leaves verify state files in its working directory (even with
    // --verify_state_save=0): keep them out of the source tree.
    let out = run(Command::new("timeout")
        .current_dir(scratch("fio"))
        .args(["60", "fio", "--name=stress", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args(["--size=64M", "--output-format=terse"])
        .args(args));
    assert!(
        out.status.success(),
        "fio {args:?} failed after {:?} (exit {}; 124 means a hung session):\n{}\n{}",
        started.elapsed(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fio_mixed_queue_depths_verified() {
    require("fio");
    for cache in ["writeback", "none"] {
        let d = Daemon::start(&["--volume", "s=64M", "--cache", cache]);
        let uri = d.uri("s");
        for _ in 0..4 {
            fio(
                &uri,
                &[
                    "--rw=randrw",
                    "--bs=4k",
                    "--iodepth=32",
                    "--time_based",
                    "--runtime=1",
                ],
            );
        }
        // Write with checksums at QD32 over two connections, then read back and verify.
        fio(
            &uri,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--numjobs=2",
                "--offset_increment=32M",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
            ],
        );
        fio(
            &uri,
            &[
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                "--verify=crc32c",
                "--do_verify=1",
            ],
        );
        fio(
            &uri,
            &[
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--fsync=8",
            ],
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
