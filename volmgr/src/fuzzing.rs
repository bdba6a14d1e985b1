//! Fuzzing harness for the catalog decoder (see `raid::fuzzing` for the scheme). Not part
//! of the API: shared by the cargo-fuzz target in `fuzz/` and the seeded unit test.
//!
//! The harness writes its input as the catalog file of a scratch data directory and loads it
//! with [`LocalFileStore::load`], so it covers every check that start-up makes on the file,
//! through the same code. Mode byte bit 0: *sign* the input, read as an 8-byte
//! generation and a body, by putting a valid header in front of it, so mutations reach the
//! JSON decoder.
//!
//! Properties: a catalog file, whatever its bytes, is either loaded or reported corrupt
//! (never an I/O error, never "absent"); a loaded catalog stored again loads back equal,
//! one generation on.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use raid::CacheMode;

use crate::catalog::{
    Catalog, CatalogError, CatalogStore, ComponentRecord, DeviceRecord, Layout, LocalFileStore,
    VolumeRecord,
};

/// Size of the catalog file header (see `catalog`).
const HEADER_BYTES: usize = 64;

/// Two scratch data directories (one to load inputs from, one to store catalogs back into),
/// removed on drop.
#[derive(Debug)]
pub struct CatalogFixture {
    dir: PathBuf,
    input: LocalFileStore,
    output: LocalFileStore,
}

impl CatalogFixture {
    pub fn new() -> io::Result<CatalogFixture> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "blockd-fuzz-catalog-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        for sub in ["in", "out"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(CatalogFixture {
            input: LocalFileStore::new(&dir.join("in")),
            output: LocalFileStore::new(&dir.join("out")),
            dir,
        })
    }
}

impl Drop for CatalogFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A catalog file for `body` with the given generation, valid but for what the body says.
pub fn sign(generation: u64, body: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(b"BLKDCAT1");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..32].copy_from_slice(&(body.len() as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    [&h[..], body].concat()
}

/// The catalog harness.
pub fn catalog(fx: &CatalogFixture, data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = match (mode & 1, rest.split_first_chunk::<8>()) {
        (1, Some((generation, body))) => sign(u64::from_le_bytes(*generation), body),
        _ => rest.to_vec(),
    };
    if let Err(e) = std::fs::write(fx.input.path(), &file) {
        panic!("cannot write the scratch catalog: {e}");
    }
    let loaded = match fx.input.load() {
        Ok(Some(loaded)) => loaded,
        Ok(None) => panic!("a catalog file that exists loaded as absent"),
        Err(CatalogError::Corrupt { .. }) => return,
        Err(e) => panic!("a catalog file's contents gave an error other than corrupt: {e}"),
    };
    let mut again = loaded.clone();
    if let Err(e) = fx.output.store(&mut again) {
        panic!("a loaded catalog cannot be stored again: {e}");
    }
    assert_eq!(again.generation, loaded.generation.wrapping_add(1));
    match fx.output.load() {
        Ok(Some(back)) => assert_eq!(back, again, "a stored catalog loads back different"),
        other => panic!("a stored catalog does not load back: {other:?}"),
    }
}

fn sample(volumes: u64) -> Catalog {
    Catalog {
        generation: 3,
        next_volume_id: volumes + 1,
        devices: vec![DeviceRecord {
            id: 0,
            server: "local".into(),
            path: "/var/lib/blockd/volumes".into(),
        }],
        volumes: (1..=volumes)
            .map(|id| VolumeRecord {
                id,
                name: format!("disk{id}"),
                size_bytes: id << 30,
                read_only: id % 2 == 0,
                cache: if id % 3 == 0 {
                    CacheMode::None
                } else {
                    CacheMode::default()
                },
                layout: Layout::Plain,
                components: vec![ComponentRecord {
                    device: 0,
                    file: format!("vol-{id}.data"),
                }],
                created_unix: 1_700_000_000 + id,
            })
            .collect(),
    }
}

/// Catalog files as the store writes them (empty, one volume, three), raw and signed.
pub fn seeds(fx: &CatalogFixture) -> io::Result<Vec<Vec<u8>>> {
    let mut seeds = Vec::new();
    for volumes in [0, 1, 3] {
        let mut cat = sample(volumes);
        fx.output.store(&mut cat).map_err(io::Error::other)?;
        let file = std::fs::read(fx.output.path())?;
        seeds.push([&[0u8][..], &file].concat());
        if let Some((header, body)) = file.split_at_checked(HEADER_BYTES) {
            seeds.push([&[1u8][..], &header[16..24], body].concat());
        }
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_seeds_load() {
        let fx = CatalogFixture::new().unwrap();
        for s in seeds(&fx).unwrap() {
            let file = if s[0] == 1 {
                sign(u64::from_le_bytes(s[1..9].try_into().unwrap()), &s[9..])
            } else {
                s[1..].to_vec()
            };
            std::fs::write(fx.input.path(), file).unwrap();
            assert!(fx.input.load().unwrap().is_some());
        }
    }

    #[test]
    fn catalog_survives_seeded_inputs() {
        let fx = CatalogFixture::new().unwrap();
        let seeds = seeds(&fx).unwrap();
        raid::fuzzing::run_seeded("catalog", &seeds, 5_000, |data| catalog(&fx, data));
    }
}
