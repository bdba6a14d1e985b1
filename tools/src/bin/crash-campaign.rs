//! crash-campaign: runs the data/parity write protocol over a simulated K+1 stripe set with
//! random writes, cuts power at a random point on a random set of nodes, recovers, and
//! checks every promise (see `raid::protocol::sim`). Prints the seed of every failure and
//! ends with `N passed, M failed`; exits non-zero on any failure.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use raid::protocol::sim::{run_with_cut, RunConfig};
use raid::protocol::Toughness;

#[derive(Debug, Parser)]
#[command(
    name = "crash-campaign",
    about = "Power-cut campaign for the parity write protocol"
)]
struct Args {
    /// First seed; cut i uses seed + i.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of cuts (one simulated run each).
    #[arg(long, default_value_t = 1000)]
    cuts: u64,
    /// Toughness to run at (0, 1 or 2); all three in turn when omitted.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    toughness: Option<u8>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    let (mut forward, mut backward, mut durable) = (0usize, 0usize, 0usize);
    let (mut rerouted, mut repair, mut checkpoints) = (0usize, 0usize, 0u64);
    for i in 0..args.cuts {
        let seed = args.seed.wrapping_add(i);
        let level = args.toughness.unwrap_or((i % 3) as u8);
        let Some(toughness) = Toughness::from_level(level) else {
            eprintln!("crash-campaign: bad toughness {level}");
            return ExitCode::FAILURE;
        };
        match run_with_cut(RunConfig { seed, toughness }) {
            Ok(stats) => {
                passed += 1;
                forward += stats.forward;
                backward += stats.backward;
                rerouted += stats.rerouted;
                repair += stats.repair;
                checkpoints += stats.checkpoints;
                durable += stats.durable;
            }
            Err(why) => {
                failed += 1;
                println!("FAIL seed {seed} toughness {level}: {why}");
            }
        }
    }
    println!(
        "{} cuts in {:.1} s: {durable} writes reached toughness 2 before their cut; recovery rolled {forward} updates forward and {backward} back; {rerouted} updates went to a parity proxy, {repair} stripes came back marked for repair; {checkpoints} checkpoints",
        args.cuts,
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
