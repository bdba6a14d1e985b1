//! Writes each target's seeds (valid encodings, from the harness modules) into
//! `<dir>/<target>/seed-<n>`: `cargo run --example seed_corpus -- fuzz/corpus`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let catalog = volmgr::fuzzing::CatalogFixture::new()?;
    let targets = [
        ("nbd_handshake", blockd::fuzzing::handshake_seeds()),
        ("nbd_transmission", blockd::fuzzing::transmission_seeds()),
        ("catalog", volmgr::fuzzing::seeds(&catalog)?),
        ("journal_record", raid::fuzzing::journal_seeds()),
        ("peer_frame", raid::fuzzing::peer_seeds()),
    ];
    for (target, seeds) in targets {
        let to = dir.join(target);
        std::fs::create_dir_all(&to)?;
        for (n, seed) in seeds.iter().enumerate() {
            std::fs::write(to.join(format!("seed-{n}")), seed)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), to.display());
    }
    Ok(())
}
