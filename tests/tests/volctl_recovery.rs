//! Admin operations that cannot wedge the node, private data, and one bad volume being one
//! bad volume: real blockd processes, failed half-way (EFBIG under a file-size limit, kill -9
//! mid-operation, a damaged data directory), then restarted and driven with volctl and NBD
//! clients. Each server listens on its own 127.0.0.x address.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tests::{ok, require, scratch, Daemon, Launch};
use volmgr::catalog::{CatalogStore, ComponentRecord, LocalFileStore};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&d.volctl_ok(&all)).unwrap()
}

fn at(host: &str) -> Launch<'_> {
    Launch { host, shell: None }
}

#[test]
fn data_is_private_whatever_the_umask() {
    let base = scratch("private");
    // Created by blockd under umask 000.
    let fresh = base.join("fresh");
    let d = Daemon::launch(
        fresh.clone(),
        Launch {
            host: "127.0.0.21",
            shell: Some("umask 000"),
        },
        &["--volume", "v=1M"],
    );
    d.create("w", "1M");
    for dir in [fresh.clone(), fresh.join("volumes")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [
        fresh.join("catalog"),
        fresh.join("catalog.reserve"),
        fresh.join("lock"),
        d.volume_file(1),
        d.volume_file(2),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    drop(d);
    // An existing data directory others can read is made private at start-up, with a log line.
    let old = base.join("old");
    fs::create_dir_all(&old).unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::launch(
        old.clone(),
        Launch {
            host: "127.0.0.21",
            shell: Some("umask 000"),
        },
        &[],
    );
    assert_eq!(mode(&old), 0o700);
    assert!(d.log().contains("made private"), "{}", d.log());
    drop(d);
    fs::remove_dir_all(base).ok();
}

#[test]
fn efbig_create_and_resize_leave_nothing_behind() {
    // A 1 GiB file-size limit (sh counts 512-byte blocks); SIGXFSZ ignored so the
    // kernel answers EFBIG instead of killing blockd.
    let d = Daemon::launch(
        scratch("efbig"),
        Launch {
            host: "127.0.0.22",
            shell: Some("trap '' XFSZ; ulimit -f 2097152"),
        },
        &[],
    );
    let out = d.volctl(&["volume", "create", "big", "2G"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("too large"), "{}", stderr(&out));
    assert_eq!(
        fs::read_dir(d.data_dir.join("volumes")).unwrap().count(),
        0,
        "a failed create left a file"
    );
    // The next create is not blocked by anything the failed one did.
    d.create("small", "1M");
    d.create("big", "512M");
    let out = d.volctl(&["volume", "resize", "small", "2G"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("too large"), "{}", stderr(&out));
    let show = json(&d, &["volume", "show", "small"]);
    assert_eq!(show["size_bytes"], 1 << 20);
    assert_eq!(fs::metadata(d.volume_file(1)).unwrap().len(), 1 << 20);
    assert!(json(&d, &["status"])["orphans"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(!d.data_dir.join("catalog.tmp").exists());
    d.volctl_ok(&["volume", "resize", "small", "4M"]);
}

/// kill -9 at a random moment of a stream of creates, resizes and deletes, many times over;
/// after each restart every catalog volume is served at its recorded size, no temporary
/// catalog is left, orphans (if the kill fell between a file and its record) are reported
/// and removable, and the next operations succeed.
#[test]
fn kill9_during_admin_operations_never_wedges_the_node() {
    let seed: u64 = std::env::var("BLOCKD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill9 test seed {seed} (BLOCKD_TEST_SEED={seed} to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut dir = scratch("kill9");
    for round in 0..6 {
        let d = Daemon::launch(dir.clone(), at("127.0.0.23"), &[]);
        check_consistent(&d, round);
        let stop = Arc::new(AtomicBool::new(false));
        let socket = d.socket();
        let worker = {
            let stop = Arc::clone(&stop);
            let mut rng = rand::rngs::StdRng::seed_from_u64(rng.gen());
            std::thread::spawn(move || {
                let volctl = |args: &[&str]| {
                    tests::run(
                        Command::new(tests::bin("volctl"))
                            .arg("--socket")
                            .arg(&socket)
                            .args(args),
                    )
                };
                while !stop.load(Ordering::Acquire) {
                    let name = format!("v{}", rng.gen_range(0..4));
                    let size = format!("{}M", rng.gen_range(1..64));
                    let op = rng.gen_range(0..3);
                    let args: Vec<&str> = match op {
                        0 => vec!["volume", "create", &name, &size],
                        1 => vec!["volume", "resize", &name, &size],
                        _ => vec!["volume", "delete", &name, "--force"],
                    };
                    let out = volctl(&args);
                    if stderr(&out).contains("cannot reach blockd") {
                        return;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        dir = d.kill9();
        stop.store(true, Ordering::Release);
        worker.join().unwrap();
    }
    let d = Daemon::launch(dir, at("127.0.0.23"), &[]);
    check_consistent(&d, 6);
}

fn check_consistent(d: &Daemon, round: usize) {
    assert!(
        !d.data_dir.join("catalog.tmp").exists(),
        "round {round}: temporary catalog left"
    );
    let list = json(d, &["volume", "list"]);
    for v in list.as_array().unwrap() {
        assert_eq!(v["state"], "available", "round {round}: {v}");
    }
    let status = json(d, &["status"]);
    let orphans = status["orphans"].as_array().unwrap();
    if !orphans.is_empty() {
        assert!(d.volctl_ok(&["status"]).contains("orphan files"));
        d.volctl_ok(&["orphans", "remove", "--all"]);
        assert!(json(d, &["status"])["orphans"]
            .as_array()
            .unwrap()
            .is_empty());
    }
    // Every catalog volume's file is exactly its recorded size.
    let cat = LocalFileStore::new(&d.data_dir).load().unwrap().unwrap();
    for rec in &cat.volumes {
        let file = d.data_dir.join("volumes").join(&rec.components[0].file);
        assert_eq!(
            fs::metadata(&file).unwrap().len(),
            rec.size_bytes,
            "round {round}: {} at the wrong size",
            rec.name
        );
    }
    // Nothing blocks the next operations.
    d.volctl_ok(&["volume", "create", "probe", "1M"]);
    d.volctl_ok(&["volume", "resize", "probe", "2M"]);
    d.volctl_ok(&["volume", "delete", "probe"]);
}

#[test]
fn orphans_and_a_crash_left_temporary_catalog_do_not_block_anything() {
    let dir = scratch("orphans");
    let mut d = Daemon::launch(dir.clone(), at("127.0.0.24"), &[]);
    d.create("a", "1M");
    assert!(d.stop().success());
    std::mem::forget(d);
    // What kill -9 between creating a file and recording it leaves, and a torn temp catalog.
    let stray = "vol-2-0123456789abcdef.data";
    fs::write(dir.join("volumes").join(stray), vec![7u8; 4096]).unwrap();
    fs::write(dir.join("catalog.tmp"), b"torn").unwrap();
    let d = Daemon::launch(dir, at("127.0.0.24"), &[]);
    assert!(!d.data_dir.join("catalog.tmp").exists());
    let status = d.volctl_ok(&["status"]);
    assert!(
        status.contains("orphan files") && status.contains(stray),
        "{status}"
    );
    assert_eq!(json(&d, &["status"])["orphans"][0]["file"], stray);
    d.create("b", "1M");
    assert!(d.volctl_ok(&["orphans", "list"]).contains(stray));
    let a_file = d.volume_file(1);
    let a_name = a_file.file_name().unwrap().to_str().unwrap();
    let out = d.volctl(&["orphans", "remove", a_name]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not an orphan"), "{}", stderr(&out));
    let out = d.volctl(&["orphans", "remove", "../catalog"]);
    assert!(!out.status.success());
    assert!(d.data_dir.join("catalog").exists());
    d.volctl_ok(&["orphans", "remove", stray]);
    assert!(d
        .volctl_ok(&["orphans", "list"])
        .contains("no orphan files"));
    assert!(a_file.exists());
}

#[test]
fn a_missing_volume_file_makes_only_that_volume_unavailable() {
    require("qemu-io");
    require("nbdinfo");
    let dir = scratch("unavail");
    let mut d = Daemon::launch(dir.clone(), at("127.0.0.25"), &[]);
    d.create("a", "8M");
    d.create("b", "8M");
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &d.uri("a")]));
    let b_file = d.volume_file(2);
    assert!(d.stop().success());
    std::mem::forget(d);
    fs::remove_file(&b_file).unwrap();

    let d = Daemon::launch(dir, at("127.0.0.25"), &[]);
    let list = d.volctl_ok(&["volume", "list"]);
    assert!(
        list.contains("STATE") && list.contains("unavailable"),
        "{list}"
    );
    let b = json(&d, &["volume", "show", "b"]);
    assert_eq!(b["state"], "unavailable");
    assert!(b["reason"].as_str().unwrap().contains("missing"), "{b}");
    assert!(d.volctl_ok(&["volume", "show", "b"]).contains("missing"));
    assert_eq!(json(&d, &["status"])["unavailable"], 1);
    // Every other volume is served.
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &d.uri("a")]));
    // The bad one's export refuses clients, with the reason (libnbd shows the server's
    // message in its debug output).
    let out = tests::run(
        Command::new("nbdinfo")
            .env("LIBNBD_DEBUG", "1")
            .arg(d.uri("b")),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server error message: export \"b\" is unavailable: its file")
            && stderr(&out).contains("is missing"),
        "{}",
        stderr(&out)
    );
    // It can be deleted, and its name reused.
    d.volctl_ok(&["volume", "delete", "b"]);
    d.create("b", "1M");
    assert_eq!(json(&d, &["status"])["unavailable"], 0);
}

#[test]
fn a_missing_catalog_next_to_volume_files_refuses_start_up() {
    let dir = scratch("nocat");
    let mut d = Daemon::launch(dir.clone(), at("127.0.0.26"), &[]);
    d.create("a", "1M");
    assert!(d.stop().success());
    std::mem::forget(d);
    fs::remove_file(dir.join("catalog")).unwrap();
    let (status, log) = Daemon::start_failing(&dir, &[]);
    assert!(!status.success());
    assert!(
        log.contains("is missing") && log.contains("vol-1-"),
        "{log}"
    );
    fs::remove_dir_all(dir).ok();
}

#[test]
fn catalog_records_are_checked_as_read() {
    require("nbdinfo");
    let dir = scratch("checked");
    let mut d = Daemon::launch(dir.clone(), at("127.0.0.27"), &[]);
    d.create("good", "1M");
    d.create("escape", "1M");
    d.create("link", "1M");
    d.create("share1", "1M");
    d.create("share2", "1M");
    d.create("badsize", "1M");
    let link_file = d.volume_file(3);
    assert!(d.stop().success());
    std::mem::forget(d);

    // A catalog with the right checksums and records no `volume create` would write.
    let outside = dir.with_extension("outside");
    fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let store = LocalFileStore::new(&dir);
    let mut cat = store.load().unwrap().unwrap();
    let shared = cat
        .volumes
        .iter()
        .find(|r| r.name == "share1")
        .unwrap()
        .components[0]
        .file
        .clone();
    for rec in &mut cat.volumes {
        match rec.name.as_str() {
            "escape" => {
                rec.components = vec![ComponentRecord {
                    device: 0,
                    file: format!("../../{}", outside.file_name().unwrap().to_str().unwrap()),
                }]
            }
            "share2" => rec.components[0].file = shared.clone(),
            "badsize" => rec.size_bytes = 1000,
            _ => {}
        }
    }
    store.store(&mut cat).unwrap();
    fs::remove_file(&link_file).unwrap();
    std::os::unix::fs::symlink(&outside, &link_file).unwrap();

    let d = Daemon::launch(dir.clone(), at("127.0.0.27"), &[]);
    let reason = |name: &str| -> String {
        let v = json(&d, &["volume", "show", name]);
        assert_eq!(v["state"], "unavailable", "{v}");
        v["reason"].as_str().unwrap().to_string()
    };
    assert!(reason("escape").contains("outside the data directory"));
    assert!(reason("link").contains("symlink"));
    assert!(reason("share1").contains("also the file of"));
    assert!(reason("share2").contains("also the file of"));
    assert!(reason("badsize").contains("multiple of 512"));
    assert_eq!(json(&d, &["volume", "show", "good"])["state"], "available");
    ok(Command::new("nbdinfo").arg(d.uri("good")));
    // Deleting them never touches a file outside the volumes directory.
    for name in ["escape", "link", "share1", "badsize"] {
        d.volctl_ok(&["volume", "delete", name]);
    }
    assert!(outside.exists());
    // share2's file was also share1's: it stays while a record names it.
    assert!(dir.join("volumes").join(&shared).exists());
    drop(d);
    fs::remove_file(outside).ok();
}
