//! The catalog: devices, volumes and their components, and where it is stored.
//!
//! [`CatalogStore`] is the seam between the catalog and its storage. [`LocalFileStore`]
//! (in [`local`]) keeps it in one crc32c-checked, atomically replaced file in the data
//! directory, with a space reserve so a volume delete works on a full filesystem; a cluster
//! store on etcd comes later. A store checks the bytes; what the records say is checked by
//! [`crate::check`] as the catalog is read.

use std::io;
use std::path::PathBuf;

use raid::CacheMode;
use serde::{Deserialize, Serialize};

pub mod local;
#[cfg(test)]
pub(crate) mod space;

pub use local::{LocalFileStore, RESERVE_MIN_BYTES};

/// A catalog larger than this is refused: far beyond any sane number of volumes (about 50,000
/// at ~300 bytes each), and it bounds what start-up reads into memory.
pub const CATALOG_MAX_BYTES: u64 = 16 << 20;

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
    #[error("catalog {path} is invalid: {why}. Refusing to start; restore it from a backup")]
    Invalid { path: PathBuf, why: String },
    #[error("catalog {path} is missing but {} holds {count} volume file(s) (such as {example}). Refusing to start with an empty catalog, which would hide them: restore the catalog from a backup, or move the files out of that directory to start empty", dir.display())]
    MissingWithVolumes {
        path: PathBuf,
        dir: PathBuf,
        count: usize,
        example: String,
    },
}

/// Where the catalog lives.
pub trait CatalogStore: Send + Sync + std::fmt::Debug {
    /// The stored catalog, or `None` if none was ever stored.
    fn load(&self) -> Result<Option<Catalog>, CatalogError>;
    /// Replaces the stored catalog atomically; on success `catalog.generation` is the new one.
    /// On failure the stored catalog is the old one and nothing temporary is left behind.
    fn store(&self, catalog: &mut Catalog) -> Result<(), CatalogError>;
    /// [`CatalogStore::store`] for an operation that frees space (a volume delete): may use
    /// space held back for it, so that it works on a full filesystem.
    fn store_to_free_space(&self, catalog: &mut Catalog) -> Result<(), CatalogError> {
        self.store(catalog)
    }
    /// Called after the caller freed space (a volume's file removed): rebuilds whatever the
    /// store keeps to be able to write on a full filesystem. Best effort.
    fn replenish(&self) {}
    /// Where the catalog lives, for messages.
    fn location(&self) -> PathBuf;
}
