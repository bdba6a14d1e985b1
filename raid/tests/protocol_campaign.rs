//! Seeded crash tests of the write protocol: random writes over a K+1 stripe set, a power cut
//! at a random point on a random set of nodes, recovery, and every promise checked.
//! `BLOCKD_TEST_SEED` replays one seed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use raid::protocol::sim::{run_with_cut, RunConfig};
use raid::protocol::Toughness;

fn base_seed() -> u64 {
    std::env::var("BLOCKD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000)
}

#[test]
fn cuts_at_every_toughness_keep_every_promise() {
    let base = base_seed();
    let mut forward = 0;
    let mut backward = 0;
    for level in 0..3u8 {
        let toughness = Toughness::from_level(level).unwrap();
        for i in 0..300u64 {
            let seed = base.wrapping_add(i * 3 + u64::from(level));
            match run_with_cut(RunConfig { seed, toughness }) {
                Ok(stats) => {
                    forward += stats.forward;
                    backward += stats.backward;
                }
                Err(why) => {
                    panic!("seed {seed} toughness {level}: {why} (BLOCKD_TEST_SEED={seed})")
                }
            }
        }
    }
    // The campaign must exercise both recovery directions, or it proves little.
    assert!(
        forward > 100 && backward > 100,
        "forward {forward}, backward {backward}"
    );
}
