//! Differential test: the same seeded random operations go through the io_uring engine (with
//! `O_DIRECT` and with the page cache) and through the pread/pwrite engine; every read must
//! agree with an in-memory model, and the three files must end byte-identical.
//!
//! Set `BLOCKD_TEST_SEED` to replay a failure; the seed is printed at the start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;

use raid::{CacheMode, Component, DeviceEngine, EnginePreference, IoBuf};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
const OPS: usize = 600;

fn seed() -> u64 {
    std::env::var("BLOCKD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

fn open(engine: DeviceEngine, dir: &Path, name: &str, cache: CacheMode) -> Component {
    let path = dir.join(name);
    Component::create(&path, SIZE).unwrap();
    Component::open(engine, &path, cache).unwrap()
}

/// An offset/length pair, aligned to 4 KiB half the time and to 512 bytes otherwise, so both
/// the direct and the buffered paths of `cache=none` are exercised.
fn range(rng: &mut SmallRng, max_len: u64) -> (u64, u64) {
    let unit = if rng.gen_bool(0.5) { 4096 } else { 512 };
    let len = rng.gen_range(1..=max_len / unit) * unit;
    let offset = rng.gen_range(0..=(SIZE - len) / unit) * unit;
    (offset, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_and_sync_engines_agree() {
    let seed = seed();
    println!("seed {seed} (BLOCKD_TEST_SEED={seed} to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    let uring = DeviceEngine::start("diff", EnginePreference::Uring).unwrap();
    let parts = [
        open(uring.clone(), &dir, "uring-direct", CacheMode::None),
        open(uring, &dir, "uring-writeback", CacheMode::Writeback),
        open(DeviceEngine::sync(), &dir, "sync", CacheMode::Writeback),
    ];
    assert!(
        parts[0].is_direct(),
        "O_DIRECT refused under {}",
        dir.display()
    );
    let mut model = vec![0u8; SIZE as usize];

    for step in 0..OPS {
        let (offset, len) = range(&mut rng, 256 << 10);
        let (o, l) = (offset as usize, len as usize);
        match rng.gen_range(0..10) {
            0..=3 => {
                let fua = rng.gen_bool(0.1);
                let fill: u8 = rng.gen();
                for (i, b) in model[o..o + l].iter_mut().enumerate() {
                    *b = fill ^ (i as u8);
                }
                for part in &parts {
                    let mut buf = IoBuf::with_len(l);
                    buf.as_mut_slice().copy_from_slice(&model[o..o + l]);
                    let (_, res) = part.write(offset, buf, fua).await;
                    res.unwrap_or_else(|e| panic!("seed {seed} step {step}: write: {e}"));
                }
            }
            4 => {
                model[o..o + l].fill(0);
                for part in &parts {
                    part.punch_hole(offset, len).await.unwrap();
                }
            }
            5 => {
                model[o..o + l].fill(0);
                for part in &parts {
                    part.zero_range(offset, len).await.unwrap();
                }
            }
            6 => {
                for part in &parts {
                    part.flush().await.unwrap();
                }
            }
            _ => {
                for part in &parts {
                    let (buf, res) = part.read(offset, IoBuf::with_len(l)).await;
                    res.unwrap();
                    assert!(
                        buf.as_slice() == &model[o..o + l],
                        "seed {seed} step {step}: {} read differs at {offset}+{len}",
                        part.path().display()
                    );
                }
            }
        }
    }
    for part in &parts {
        part.flush().await.unwrap();
        let on_disk = std::fs::read(part.path()).unwrap();
        assert!(
            on_disk == model,
            "seed {seed}: {} final contents differ",
            part.path().display()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extents_follow_holes() {
    let dir = tempdir();
    let engine = DeviceEngine::start("ext", EnginePreference::Auto).unwrap();
    let part = open(engine, &dir, "ext", CacheMode::Writeback);
    let mut buf = IoBuf::with_len(64 << 10);
    buf.as_mut_slice().fill(7);
    let (_, res) = part.write(1 << 20, buf, false).await;
    res.unwrap();
    part.flush().await.unwrap();
    let ext = part.extents(0, SIZE, 64).await.unwrap();
    let holes: Vec<(u64, bool)> = ext.iter().map(|e| (e.len, e.hole)).collect();
    assert_eq!(
        holes,
        vec![
            (1 << 20, true),
            (64 << 10, false),
            (SIZE - (1 << 20) - (64 << 10), true)
        ]
    );
    // The cap on extents is honoured and the result is a prefix of the range.
    let capped = part.extents(0, SIZE, 1).await.unwrap();
    assert_eq!(capped.len(), 1);
    assert_eq!(capped[0].len, 1 << 20);
    part.punch_hole(1 << 20, 64 << 10).await.unwrap();
    let ext = part.extents(0, SIZE, 64).await.unwrap();
    assert_eq!(
        ext,
        vec![raid::Extent {
            len: SIZE,
            hole: true
        }]
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir() -> std::path::PathBuf {
    // On the real disk (not /dev/shm): O_DIRECT must be exercised for real.
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "raid-diff-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
