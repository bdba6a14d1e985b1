//! parity-bench: throughput of the parity arithmetic (delta and merge) on 64 KiB buffers,
//! on one core. The target is at least 5 GB/s per core.

use std::hint::black_box;
use std::time::{Duration, Instant};

use raid::parity;

const BUF: usize = 64 << 10;

fn measure(name: &str, mut f: impl FnMut()) -> f64 {
    // Warm up, then run for about a second.
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..256 {
            f();
        }
        n += 256;
    }
    let gbps = (n as f64 * BUF as f64) / start.elapsed().as_secs_f64() / 1e9;
    println!("{name:<8} {gbps:>7.2} GB/s  (64 KiB buffers, bytes of output per second)");
    gbps
}

fn main() {
    let old: Vec<u8> = (0..BUF).map(|i| (i * 7 + 3) as u8).collect();
    let new: Vec<u8> = (0..BUF).map(|i| (i * 13 + 1) as u8).collect();
    let mut out = vec![0u8; BUF];
    let mut par = vec![0u8; BUF];
    let d = measure("delta", || {
        parity::delta(black_box(&old), black_box(&new), black_box(&mut out))
    });
    let m = measure("merge", || {
        parity::merge(black_box(&mut par), black_box(&out))
    });
    println!("slowest: {:.2} GB/s (target >= 5 GB/s per core)", d.min(m));
}
