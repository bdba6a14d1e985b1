//! The seeded mutator behind every harness's run in the unit tests: random inputs and
//! mutations of valid encodings (bit flips, byte sets, inserts, deletes, duplicated and
//! spliced ranges, edge values in integer fields), reproducible from one `u64` seed.

use std::panic::{self, AssertUnwindSafe};

/// A small, seeded pseudo-random generator (SplitMix64): enough to drive mutations, and
/// the same sequence for the same seed on every machine.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Values that sit on the edges decoders check: zero, one, the top of each width, the
/// limits of our formats.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 20,
    (1 << 20) + 65,
    u64::MAX / 12 + 1,
    u64::MAX - 1,
    u64::MAX,
];

/// One input: random bytes (one time in eight), otherwise a seed with one to four
/// mutations. The mode byte (first byte) of a seed is kept most of the time.
pub fn mutate(rng: &mut SeededRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(8) == 0 {
        let max = if rng.below(4) == 0 { 4096 } else { 128 };
        let len = rng.below(max);
        return (0..len).map(|_| rng.byte()).collect();
    }
    let mut b = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let len = b.len();
        // Mutate the body more often than the mode byte.
        let pos = if len > 1 && rng.below(16) != 0 {
            1 + rng.below(len - 1)
        } else {
            rng.below(len)
        };
        match rng.below(9) {
            0 if len > 0 => b[pos] ^= 1 << rng.below(8),
            1 if len > 0 => b[pos] = rng.byte(),
            2 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                b.splice(pos..pos, bytes);
            }
            3 if len > 0 => {
                let end = (pos + 1 + rng.below(32)).min(len);
                b.drain(pos..end);
            }
            4 => b.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let end = (pos + 1 + rng.below(64)).min(len);
                let copy = b[pos..end].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, copy);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                b.truncate(pos);
                b.extend_from_slice(&other[from..]);
            }
            _ => {
                // An edge value in a 1, 2, 4 or 8-byte field, either byte order.
                let width = 1 << rng.below(4);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    (v << (64 - 8 * width)).to_be_bytes()
                };
                let end = (pos + width).min(len);
                b[pos..end].copy_from_slice(&bytes[..end - pos]);
            }
        }
    }
    b
}

/// The seed for a run: `BLOCKD_FUZZ_SEED` if set (decimal or `0x` hex), else from the clock.
pub fn seed_from_env() -> u64 {
    let parse = |s: &str| match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    };
    match std::env::var("BLOCKD_FUZZ_SEED") {
        Ok(s) => parse(s.trim()).unwrap_or_else(|| panic!("BLOCKD_FUZZ_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

/// Feeds `harness` every seed, then `iterations` generated inputs (scaled by
/// `BLOCKD_FUZZ_SCALE`, default 1). On a panic, prints the seed and the input, then
/// re-raises it.
pub fn run_seeded(
    name: &str,
    seeds: &[Vec<u8>],
    iterations: usize,
    mut harness: impl FnMut(&[u8]),
) {
    let seed = seed_from_env();
    let scale: usize = std::env::var("BLOCKD_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = SeededRng::new(seed);
    let total = seeds.len() + iterations * scale;
    for i in 0..total {
        let input = match seeds.get(i) {
            Some(s) => s.clone(),
            None => mutate(&mut rng, seeds),
        };
        if let Err(e) = panic::catch_unwind(AssertUnwindSafe(|| harness(&input))) {
            eprintln!(
                "{name}: input {i} of {total} failed; rerun with BLOCKD_FUZZ_SEED={seed}\n\
                 input ({} bytes): {}",
                input.len(),
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            panic::resume_unwind(e);
        }
    }
}
