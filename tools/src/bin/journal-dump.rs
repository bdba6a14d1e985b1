//! journal-dump: prints a device journal's records for an operator, and says whether (and
//! why) a torn or stale tail would be discarded on replay.

use std::process::ExitCode;

use clap::Parser;
use raid::journal::record::{self, Body};

#[derive(Debug, Parser)]
#[command(
    name = "journal-dump",
    about = "Print the records of a blockd device journal"
)]
struct Args {
    /// The journal file.
    path: std::path::PathBuf,
}

fn describe(body: &Body) -> String {
    match body {
        Body::Mj(m) => format!(
            "mj              write {} stripe {} seq {} column {} new@{} old@{} crc {:#010x}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get(),
            m.column.get(),
            m.new_loc.get(),
            m.old_loc.get(),
            m.new_crc.get()
        ),
        Body::Pj(p) => format!(
            "pj              write {} stripe {} seq {} column {} new@{} old@{}",
            p.write_id.get(),
            p.stripe.get(),
            p.stripe_seq.get(),
            p.column.get(),
            p.new_loc.get(),
            p.old_loc.get()
        ),
        Body::DataHardened(m) => format!(
            "data-hardened   write {} stripe {} seq {}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get()
        ),
        Body::ParityHardened(m) => format!(
            "parity-hardened write {} stripe {} seq {}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get()
        ),
        Body::PeerHardened(m) => format!(
            "peer-hardened   write {} stripe {} seq {}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get()
        ),
        Body::Free(f) => format!("free            loc {}", f.loc.get()),
        Body::MjComplete(m) => format!(
            "mj-complete     write {} stripe {} seq {}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get()
        ),
        Body::PjComplete(m) => format!(
            "pj-complete     write {} stripe {} seq {}",
            m.write_id.get(),
            m.stripe.get(),
            m.stripe_seq.get()
        ),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bytes = match std::fs::read(&args.path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("journal-dump: cannot read {}: {e}", args.path.display());
            return ExitCode::FAILURE;
        }
    };
    let replay = record::replay(&bytes, None);
    for r in &replay.records {
        println!("{:>10}  {}", r.seq, describe(&r.body));
    }
    println!(
        "{} records, {} of {} bytes valid",
        replay.records.len(),
        replay.valid_len,
        bytes.len()
    );
    if let Some(tail) = replay.discarded {
        println!(
            "tail from byte {} would be discarded on replay: {tail:?}",
            replay.valid_len
        );
    }
    ExitCode::SUCCESS
}
