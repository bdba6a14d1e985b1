//! journal-dump: prints a device journal's records for an operator, and says whether (and
//! why) a torn or stale tail would be discarded on replay. With `--journal-bytes N` the file
//! is a protocol device (`raid::protocol::file_disk`): both halves of its N-byte journal
//! region are printed, each with the checkpoint it starts from.

use std::process::ExitCode;

use clap::Parser;
use raid::journal::record::{self, Body, Intent, Mark};

#[derive(Debug, Parser)]
#[command(
    name = "journal-dump",
    about = "Print the records of a blockd device journal"
)]
struct Args {
    /// The journal file, or a protocol device file with `--journal-bytes`.
    path: std::path::PathBuf,
    /// The file is a protocol device whose journal region is this many bytes (two halves).
    #[arg(long)]
    journal_bytes: Option<u64>,
}

fn intent(i: &Intent) -> String {
    format!(
        "write {} stripe {} seq {} column {} new@{} old@{} crc {:#010x}",
        i.write_id.get(),
        i.stripe.get(),
        i.stripe_seq.get(),
        i.column.get(),
        i.new_loc.get(),
        i.old_loc.get(),
        i.new_crc.get()
    )
}

fn mark(m: &Mark) -> String {
    format!(
        "write {} stripe {} seq {} crc {:#010x}",
        m.write_id.get(),
        m.stripe.get(),
        m.stripe_seq.get(),
        m.crc.get()
    )
}

fn describe(body: &Body) -> String {
    let (kind, detail) = match body {
        Body::Mj(i) => ("mj", intent(i)),
        Body::Pj(i) => ("pj", intent(i)),
        Body::DataHardened(m) => ("data-hardened", mark(m)),
        Body::ParityHardened(m) => ("parity-hardened", mark(m)),
        Body::PeerHardened(m) => ("peer-hardened", mark(m)),
        Body::MjComplete(m) => ("mj-complete", mark(m)),
        Body::PjComplete(m) => ("pj-complete", mark(m)),
        Body::Free(f) => ("free", format!("loc {}", f.loc.get())),
        Body::Proxy(i, data) => (
            "proxy-copy",
            format!("{} ({} bytes)", intent(i), data.len()),
        ),
        Body::Checkpoint(b) => (
            "checkpoint",
            match raid::journal::record::Checkpoint::decode(b) {
                Some(c) => format!(
                    "{} stripes, {} completed columns, {} marked for repair",
                    c.map.len(),
                    c.done.len(),
                    c.repair.len()
                ),
                None => "malformed".into(),
            },
        ),
        Body::CheckpointEnd(e) => (
            "checkpoint-end",
            format!("of the checkpoint at {}", e.checkpoint_seq.get()),
        ),
    };
    format!("{kind:<15} {detail}")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let regions = match args.journal_bytes {
        None => std::fs::read(&args.path).map(|b| vec![b]),
        Some(n) => std::fs::File::open(&args.path)
            .and_then(|f| raid::protocol::file_disk::read_journal(&f, n)),
    };
    let regions = match regions {
        Ok(r) => r,
        Err(e) => {
            eprintln!("journal-dump: cannot read {}: {e}", args.path.display());
            return ExitCode::FAILURE;
        }
    };
    let many = regions.len() > 1;
    for (half, bytes) in regions.iter().enumerate() {
        if many {
            println!("== journal half {half}");
        }
        dump(bytes);
    }
    ExitCode::SUCCESS
}

fn dump(bytes: &[u8]) {
    let replay = record::replay(bytes, None);
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
}
