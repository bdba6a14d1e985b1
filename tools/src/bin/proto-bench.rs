//! proto-bench: the parity write protocol between two processes over loopback TCP, at
//! toughness 0, 1 and 2 and QD1 and QD32, beside a local 4 KiB write + fdatasync and the
//! disk's durable write IOPS. See `tools::proto_bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tools::proto_bench::{self, BenchArgs};

#[derive(Debug, Parser)]
#[command(
    name = "proto-bench",
    about = "Benchmark the parity write protocol between two processes"
)]
struct Args {
    /// Directory for the device files: put it on the disk you want to measure, not tmpfs.
    #[arg(long, default_value = "/var/tmp/proto-bench")]
    dir: PathBuf,
    /// Seconds per workload.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds: every workload runs once per round, interleaved; the report gives medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Stripes in the layout (half have their data on the measuring node).
    #[arg(long, default_value_t = 16384)]
    stripes: u64,
    /// Toughness levels to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    toughness: Vec<u8>,
    /// Queue depths to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    depths: Vec<usize>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal: run the parity node (node 1) for a benchmark in another process.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        stripes: u64,
        #[arg(long)]
        journal_bytes: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Cmd::Serve {
            dir,
            stripes,
            journal_bytes,
        }) => proto_bench::serve(&dir, stripes, journal_bytes),
        None => proto_bench::run(&BenchArgs {
            dir: args.dir,
            seconds: args.seconds,
            rounds: args.rounds,
            stripes: args.stripes,
            toughness: args.toughness,
            depths: args.depths,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proto-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
