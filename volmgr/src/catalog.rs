//! The catalog: devices, volumes and their components, and where it is stored.
//!
//! [`CatalogStore`] is the seam between the catalog and its storage. [`LocalFileStore`] keeps
//! it in one file in the data directory (a cluster store on etcd comes later):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "BLKDCAT1"
//! 8       4     format version (LE u32) = 1
//! 12      4     crc32c of the header with this field zeroed
//! 16      8     generation (LE u64), +1 on every store
//! 24      8     body length in bytes (LE u64)
//! 32      4     crc32c of the body
//! 36      28    reserved, zero
//! 64      ...   body: the catalog as JSON
//! ```
//!
//! A store writes `catalog.tmp`, fsyncs it, renames it over `catalog`, and fsyncs the
//! directory, so a crash leaves either the old or the new catalog. A catalog that fails any
//! check (size, magic, version, either checksum, reserved bytes, JSON) is reported as corrupt
//! and never silently replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use raid::CacheMode;
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

const MAGIC: [u8; 8] = *b"BLKDCAT1";
const FORMAT_VERSION: u32 = 1;
/// A catalog larger than this is refused: far beyond any sane number of volumes (about 50,000
/// at ~300 bytes each), and it bounds what start-up reads into memory.
pub const CATALOG_MAX_BYTES: u64 = 16 << 20;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct Header {
    magic: [u8; 8],
    format: U32,
    header_crc: U32,
    generation: U64,
    body_len: U64,
    body_crc: U32,
    reserved: [u8; 28],
}
const HEADER_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);

/// The whole catalog of one node (or, later, of a cluster).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Bumped by the store on every successful write.
    pub generation: u64,
    pub next_volume_id: u64,
    pub devices: Vec<DeviceRecord>,
    pub volumes: Vec<VolumeRecord>,
}

/// A device: storage attached to a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: u32,
    pub server: String,
    pub path: PathBuf,
}

/// A volume and its layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    #[serde(with = "cache_mode")]
    pub cache: CacheMode,
    pub layout: Layout,
    pub components: Vec<ComponentRecord>,
    pub created_unix: u64,
}

/// How a volume's bytes map onto components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    /// One component holds every byte at the same offset.
    Plain,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Plain => f.write_str("plain"),
        }
    }
}

/// One component: a file on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentRecord {
    pub device: u32,
    pub file: String,
}

mod cache_mode {
    use raid::CacheMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &CacheMode, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(mode)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CacheMode, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path} is corrupt: {why}. Refusing to start; restore it from a backup or move it aside to start with an empty catalog")]
    Corrupt { path: PathBuf, why: String },
    #[error("catalog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("catalog is too large to store ({0} bytes, limit {CATALOG_MAX_BYTES})")]
    TooLarge(usize),
}

/// Where the catalog lives.
pub trait CatalogStore: Send + Sync + std::fmt::Debug {
    /// The stored catalog, or `None` if none was ever stored.
    fn load(&self) -> Result<Option<Catalog>, CatalogError>;
    /// Replaces the stored catalog atomically; on success `catalog.generation` is the new one.
    fn store(&self, catalog: &mut Catalog) -> Result<(), CatalogError>;
}

/// The catalog in a file in the data directory.
#[derive(Debug)]
pub struct LocalFileStore {
    path: PathBuf,
}

impl LocalFileStore {
    pub fn new(data_dir: &Path) -> LocalFileStore {
        LocalFileStore {
            path: data_dir.join("catalog"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, source: io::Error) -> CatalogError {
        CatalogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, why: impl Into<String>) -> CatalogError {
        CatalogError::Corrupt {
            path: self.path.clone(),
            why: why.into(),
        }
    }
}

fn header_crc(header: &Header) -> u32 {
    let mut copy = [0u8; HEADER_BYTES];
    copy.copy_from_slice(header.as_bytes());
    copy[12..16].fill(0);
    crc32c::crc32c(&copy)
}

/// Encodes a catalog into the on-disk format.
fn encode(catalog: &Catalog) -> Result<Vec<u8>, CatalogError> {
    let body = serde_json::to_vec_pretty(catalog).map_err(|e| CatalogError::Io {
        path: PathBuf::new(),
        source: io::Error::other(e),
    })?;
    if body.len() as u64 > CATALOG_MAX_BYTES {
        return Err(CatalogError::TooLarge(body.len()));
    }
    let mut header = Header {
        magic: MAGIC,
        format: U32::new(FORMAT_VERSION),
        header_crc: U32::new(0),
        generation: U64::new(catalog.generation),
        body_len: U64::new(body.len() as u64),
        body_crc: U32::new(crc32c::crc32c(&body)),
        reserved: [0; 28],
    };
    header.header_crc = U32::new(header_crc(&header));
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

impl CatalogStore for LocalFileStore {
    fn load(&self) -> Result<Option<Catalog>, CatalogError> {
        let file_len = match fs::metadata(&self.path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(e)),
        };
        if file_len > CATALOG_MAX_BYTES + HEADER_BYTES as u64 {
            return Err(self.corrupt(format!("{file_len} bytes is larger than any catalog")));
        }
        let bytes = fs::read(&self.path).map_err(|e| self.io_err(e))?;
        let Some((header, body)) = bytes.split_at_checked(HEADER_BYTES) else {
            return Err(self.corrupt(format!(
                "torn: only {} bytes, header needs {HEADER_BYTES}",
                bytes.len()
            )));
        };
        let header = Header::ref_from_bytes(header)
            .map_err(|_| self.corrupt("header has the wrong size"))?;
        if header.magic != MAGIC {
            return Err(self.corrupt("bad magic (not a blockd catalog)"));
        }
        if header.format.get() != FORMAT_VERSION {
            return Err(self.corrupt(format!(
                "format version {} (this blockd reads version {FORMAT_VERSION})",
                header.format.get()
            )));
        }
        let expected = header_crc(header);
        if header.header_crc.get() != expected {
            return Err(self.corrupt(format!(
                "header checksum {:#010x}, expected {expected:#010x}",
                header.header_crc.get()
            )));
        }
        if header.reserved.iter().any(|&b| b != 0) {
            return Err(self.corrupt("reserved header bytes are not zero"));
        }
        if header.body_len.get() != body.len() as u64 {
            return Err(self.corrupt(format!(
                "torn: header says {} body bytes, file has {}",
                header.body_len.get(),
                body.len()
            )));
        }
        let crc = crc32c::crc32c(body);
        if crc != header.body_crc.get() {
            return Err(self.corrupt(format!(
                "body checksum {crc:#010x}, expected {:#010x}",
                header.body_crc.get()
            )));
        }
        let catalog: Catalog = serde_json::from_slice(body)
            .map_err(|e| self.corrupt(format!("body does not parse: {e}")))?;
        if catalog.generation != header.generation.get() {
            return Err(self.corrupt("header and body generations differ"));
        }
        Ok(Some(catalog))
    }

    fn store(&self, catalog: &mut Catalog) -> Result<(), CatalogError> {
        let mut next = catalog.clone();
        next.generation += 1;
        let bytes = encode(&next)?;
        let tmp = self.path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| self.io_err(e))?;
        catalog.generation = next.generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        Catalog {
            generation: 0,
            next_volume_id: 2,
            devices: vec![DeviceRecord {
                id: 0,
                server: "local".into(),
                path: "/d".into(),
            }],
            volumes: vec![VolumeRecord {
                id: 1,
                name: "disk0".into(),
                size_bytes: 1 << 30,
                read_only: false,
                cache: CacheMode::None,
                layout: Layout::Plain,
                components: vec![ComponentRecord {
                    device: 0,
                    file: "vol-1.data".into(),
                }],
                created_unix: 1,
            }],
        }
    }

    fn temp_store() -> (PathBuf, LocalFileStore) {
        let dir = std::env::temp_dir().join(format!(
            "volmgr-cat-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = LocalFileStore::new(&dir);
        (dir, store)
    }

    #[test]
    fn round_trip_bumps_generation() {
        let (dir, store) = temp_store();
        assert!(store.load().unwrap().is_none());
        let mut cat = sample();
        store.store(&mut cat).unwrap();
        store.store(&mut cat).unwrap();
        assert_eq!(cat.generation, 2);
        assert_eq!(store.load().unwrap().unwrap(), cat);
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_detected() {
        let (dir, store) = temp_store();
        let mut cat = sample();
        store.store(&mut cat).unwrap();
        let good = fs::read(store.path()).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(store.path(), &bad).unwrap();
            assert!(
                matches!(store.load(), Err(CatalogError::Corrupt { .. })),
                "flip at {i} not caught"
            );
        }
        for len in [0, 10, HEADER_BYTES, good.len() - 1] {
            fs::write(store.path(), &good[..len]).unwrap();
            assert!(
                matches!(store.load(), Err(CatalogError::Corrupt { .. })),
                "truncation to {len} not caught"
            );
        }
        fs::remove_dir_all(dir).ok();
    }
}
