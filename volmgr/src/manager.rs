//! The volume manager of one node: the catalog, the open volumes, and the admin operations.
//!
//! Admin operations (create, resize, delete, orphan removal; in [`crate::ops`]) are
//! serialised by one async lock and each persists the catalog before it takes effect in
//! memory, so what a client can see is always what a restart would find. Lookups from NBD
//! handshakes take only a short synchronous lock.
//!
//! Start-up ([`VolumeManager::open`]) makes the data directory private, loads the catalog,
//! checks its records ([`crate::check`]), and opens each volume on its own: a volume whose
//! record is invalid or whose file is missing, a symlink, unreadable or shorter than the
//! volume is *unavailable* (listed with the reason; its export refuses clients with it), and
//! every other volume is served. A file longer than its volume (a resize interrupted between
//! growing the file and recording the size) is cut back to the recorded size: no client was
//! ever told about the extra bytes. A missing catalog next to volume files refuses start-up
//! rather than hide them behind an empty catalog.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use raid::{CacheMode, Component, DeviceEngine};

use crate::api::{VolumeInfo, VolumeState};
use crate::backend::Backend;
use crate::catalog::{Catalog, CatalogError, CatalogStore, DeviceRecord, VolumeRecord};
use crate::check::{self, LOCAL_DEVICE};
use crate::error::Error;
use crate::files;
use crate::volume::Volume;

pub use crate::check::{
    validate_name, validate_size, SECTOR_BYTES, VOLUME_MAX_BYTES, VOLUME_NAME_MAX,
};

/// A catalog volume that is not served, and why.
#[derive(Debug, Clone)]
pub(crate) struct Unavailable {
    pub(crate) record: VolumeRecord,
    pub(crate) reason: String,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) catalog: Catalog,
    pub(crate) volumes: BTreeMap<String, Arc<Volume>>,
    pub(crate) unavailable: BTreeMap<String, Unavailable>,
}

/// Settings the daemon passes in.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub default_cache: CacheMode,
    /// Export served to clients that ask for the empty name; `None` means "the only volume,
    /// if there is exactly one".
    pub default_volume: Option<String>,
}

#[derive(Debug)]
pub struct VolumeManager {
    pub(crate) config: ManagerConfig,
    pub(crate) store: Arc<dyn CatalogStore>,
    pub(crate) engine: DeviceEngine,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) admin: tokio::sync::Mutex<()>,
}

/// Refuses to start from an empty catalog when the volumes directory holds files.
fn refuse_hidden_volumes(dir: &Path, catalog: PathBuf) -> Result<(), Error> {
    let entries = files::scan_orphans(dir, &|_| false)
        .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    match entries.first() {
        None => Ok(()),
        Some(first) => Err(Error::Catalog(CatalogError::MissingWithVolumes {
            path: catalog,
            dir: dir.to_path_buf(),
            count: entries.len(),
            example: first.file.clone(),
        })),
    }
}

impl VolumeManager {
    /// Opens the data directory: loads (or creates) the catalog and opens every volume that
    /// can be opened; the others are listed as unavailable with their reason.
    pub fn open(
        config: ManagerConfig,
        store: Arc<dyn CatalogStore>,
        engine: DeviceEngine,
    ) -> Result<VolumeManager, Error> {
        let dir = config.data_dir.join("volumes");
        for d in [&config.data_dir, &dir] {
            files::ensure_private_dir(d)
                .map_err(|e| Error::io(format!("cannot create {}", d.display()), e))?;
        }
        let mut catalog = match store.load()? {
            Some(catalog) => catalog,
            None => {
                refuse_hidden_volumes(&dir, store.location())?;
                let mut fresh = Catalog {
                    generation: 0,
                    next_volume_id: 1,
                    devices: vec![DeviceRecord {
                        id: LOCAL_DEVICE,
                        server: "local".into(),
                        path: dir.clone(),
                    }],
                    volumes: Vec::new(),
                };
                store.store(&mut fresh)?;
                fresh
            }
        };
        catalog.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let bad = check::check_catalog(&mut catalog).map_err(|why| CatalogError::Invalid {
            path: store.location(),
            why,
        })?;
        let mut volumes = BTreeMap::new();
        let mut unavailable: BTreeMap<String, Unavailable> = BTreeMap::new();
        for (i, rec) in catalog.volumes.iter().enumerate() {
            let opened = match bad.get(&i) {
                Some(why) => Err(why.clone()),
                None => Self::open_volume(&engine, &dir, rec),
            };
            match opened {
                Ok(volume) => {
                    volumes.insert(rec.name.clone(), Arc::new(volume));
                }
                Err(reason) => {
                    tracing::error!(volume = %rec.name, id = rec.id, %reason,
                        "volume unavailable; every other volume is served");
                    // Two records with one name: the first keeps the entry (both have the
                    // same "named twice" reason).
                    unavailable.entry(rec.name.clone()).or_insert(Unavailable {
                        record: rec.clone(),
                        reason,
                    });
                }
            }
        }
        store.replenish();
        Ok(VolumeManager {
            config,
            store,
            engine,
            inner: Mutex::new(Inner {
                catalog,
                volumes,
                unavailable,
            }),
            admin: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens a checked record's volume, or says why it cannot be served.
    pub(crate) fn open_volume(
        engine: &DeviceEngine,
        dir: &Path,
        rec: &VolumeRecord,
    ) -> Result<Volume, String> {
        let [component] = rec.components.as_slice() else {
            return Err(format!(
                "{} components; a plain volume has exactly one",
                rec.components.len()
            ));
        };
        let path = dir.join(&component.file);
        let file = &component.file;
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!("its file {file} is missing from {}", dir.display()))
            }
            Err(e) => return Err(format!("cannot inspect its file {file}: {e}")),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(format!(
                "its file {file} is a symlink; blockd does not follow links out of the data directory"
            ));
        }
        if !kind.is_file() {
            return Err(format!("its file {file} is not a regular file"));
        }
        if meta.len() < rec.size_bytes {
            return Err(format!(
                "its file {file} is {} bytes but the volume is {} bytes: the file was cut short or replaced",
                meta.len(),
                rec.size_bytes
            ));
        }
        if meta.len() > rec.size_bytes {
            // A resize that grew the file and then failed (or was killed) before the catalog
            // recorded it: nothing beyond the recorded size was ever served.
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(rec.size_bytes).and_then(|()| f.sync_all()))
                .map_err(|e| {
                    format!("its file {file} is longer than the volume and cannot be cut back: {e}")
                })?;
            tracing::warn!(volume = %rec.name, file = %file, from = meta.len(), to = rec.size_bytes,
                "file was longer than its volume (an interrupted resize); cut back to the recorded size");
        }
        files::tighten(&path, files::PRIVATE_FILE_MODE)
            .map_err(|e| format!("cannot make its file {file} private: {e}"))?;
        let part = Component::open_no_follow(engine.clone(), &path, rec.cache)
            .map_err(|e| format!("cannot open its file {file}: {e}"))?;
        Ok(Volume::new(
            rec.id,
            rec.name.clone(),
            rec.size_bytes,
            rec.read_only,
            rec.layout,
            Backend::Local(part),
            false,
        ))
    }

    pub(crate) fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave `Inner` half-updated (every update is
        // a single insert/remove after persistence), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn volumes_dir(&self) -> PathBuf {
        self.config.data_dir.join("volumes")
    }

    pub fn engine(&self) -> &DeviceEngine {
        &self.engine
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn catalog_generation(&self) -> u64 {
        self.inner().catalog.generation
    }

    /// The name the empty export name stands for, if any.
    fn default_name(&self, inner: &Inner) -> Option<String> {
        if let Some(default) = &self.config.default_volume {
            return Some(default.clone());
        }
        // "The only volume" counts unavailable ones: with two volumes, one of them broken,
        // the empty name must not silently attach a client to the other.
        let mut names = inner.volumes.keys().chain(inner.unavailable.keys());
        match (names.next(), names.next()) {
            (Some(only), None) => Some(only.clone()),
            _ => None,
        }
    }

    /// The served volume called `name`; the empty name is the default export. `None` for an
    /// unknown or unavailable volume (see [`VolumeManager::unavailable`] for which).
    pub fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        let inner = self.inner();
        if name.is_empty() {
            let default = self.default_name(&inner)?;
            return inner.volumes.get(&default).cloned();
        }
        inner.volumes.get(name).cloned()
    }

    /// Why the volume called `name` (the empty name: the default export) is in the catalog
    /// but not served; `None` if it is served or unknown. For an NBD server's refusal.
    pub fn unavailable(&self, name: &str) -> Option<String> {
        let inner = self.inner();
        let name = match name {
            "" => self.default_name(&inner)?,
            name => name.to_string(),
        };
        inner.unavailable.get(&name).map(|u| u.reason.clone())
    }

    /// Every served volume, by name.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.inner().volumes.values().cloned().collect()
    }

    /// Every volume, served or not, by name.
    pub fn infos(&self) -> Vec<VolumeInfo> {
        let inner = self.inner();
        let mut all: Vec<VolumeInfo> = inner
            .volumes
            .values()
            .map(|v| Self::info(v))
            .chain(inner.unavailable.values().map(Self::unavailable_info))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// One volume, served or not (the empty name is not a volume here).
    pub fn info_of(&self, name: &str) -> Result<VolumeInfo, Error> {
        let inner = self.inner();
        if let Some(v) = inner.volumes.get(name) {
            return Ok(Self::info(v));
        }
        match inner.unavailable.get(name) {
            Some(u) => Ok(Self::unavailable_info(u)),
            None => Err(Error::NotFound(name.into())),
        }
    }

    /// How many catalog volumes are not served.
    pub fn unavailable_count(&self) -> usize {
        self.inner().unavailable.len()
    }

    pub fn info(volume: &Volume) -> VolumeInfo {
        VolumeInfo {
            id: volume.id(),
            name: volume.name().to_string(),
            size_bytes: volume.size_bytes(),
            read_only: volume.read_only(),
            cache: volume.cache().to_string(),
            layout: volume.layout().to_string(),
            connections: volume.connections(),
            allocated_bytes: volume.allocated_bytes(),
            ephemeral: volume.ephemeral(),
            state: VolumeState::Available,
            reason: None,
        }
    }

    fn unavailable_info(u: &Unavailable) -> VolumeInfo {
        VolumeInfo {
            id: u.record.id,
            name: u.record.name.clone(),
            size_bytes: u.record.size_bytes,
            read_only: u.record.read_only,
            cache: u.record.cache.to_string(),
            layout: u.record.layout.to_string(),
            connections: 0,
            allocated_bytes: 0,
            ephemeral: false,
            state: VolumeState::Unavailable,
            reason: Some(u.reason.clone()),
        }
    }

    pub(crate) async fn persist(&self, catalog: Catalog) -> Result<Catalog, Error> {
        self.persist_with(catalog, false).await
    }

    /// [`VolumeManager::persist`] for an operation that frees space (may use the store's
    /// reserve on a full filesystem).
    pub(crate) async fn persist_freeing(&self, catalog: Catalog) -> Result<Catalog, Error> {
        self.persist_with(catalog, true).await
    }

    async fn persist_with(&self, mut catalog: Catalog, frees: bool) -> Result<Catalog, Error> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            if frees {
                store.store_to_free_space(&mut catalog)
            } else {
                store.store(&mut catalog)
            }
            .map(|()| catalog)
        })
        .await
        .map_err(|e| Error::io("catalog writer", io::Error::other(e.to_string())))?
        .map_err(Error::from)
    }
}
