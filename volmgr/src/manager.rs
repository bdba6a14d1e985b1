//! The volume manager of one node: the catalog, the open volumes, and the admin operations.
//!
//! Admin operations (create, resize, delete) are serialised by one async lock and each
//! persists the catalog before it takes effect in memory, so what a client can see is always
//! what a restart would find. Lookups from NBD handshakes take only a short synchronous lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use raid::{CacheMode, Component, DeviceEngine};

use crate::api::VolumeInfo;
use crate::catalog::{Catalog, CatalogStore, ComponentRecord, DeviceRecord, Layout, VolumeRecord};
use crate::error::Error;
use crate::volume::Volume;

/// Volume sizes are whole 512-byte sectors: the NBD minimum block size we advertise, and what
/// every client (the Linux kernel above all) assumes.
pub const SECTOR_BYTES: u64 = 512;
/// Largest volume: 1 PiB. Keeps every offset far inside `i64` (what `lseek`/`fallocate` take)
/// and is above what one local filesystem file can hold anyway.
pub const VOLUME_MAX_BYTES: u64 = 1 << 50;
/// Longest volume name, in bytes; names are also NBD export names (which allow 4096).
pub const VOLUME_NAME_MAX: usize = 64;
const LOCAL_DEVICE: u32 = 0;

#[derive(Debug)]
struct Inner {
    catalog: Catalog,
    volumes: BTreeMap<String, Arc<Volume>>,
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
    config: ManagerConfig,
    store: Arc<dyn CatalogStore>,
    engine: DeviceEngine,
    inner: Mutex<Inner>,
    admin: tokio::sync::Mutex<()>,
}

/// Checks a volume name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > VOLUME_NAME_MAX || !ok_start || !ok_chars {
        return Err(Error::Invalid(format!(
            "invalid volume name {name:?}: use 1 to {VOLUME_NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a volume size.
pub fn validate_size(size_bytes: u64) -> Result<(), Error> {
    if size_bytes == 0 {
        return Err(Error::Invalid(
            "volume size must be greater than zero".into(),
        ));
    }
    if !size_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(Error::Invalid(format!(
            "volume size {size_bytes} is not a multiple of {SECTOR_BYTES} bytes; round it to {}",
            size_bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES
        )));
    }
    if size_bytes > VOLUME_MAX_BYTES {
        return Err(Error::Invalid(format!(
            "volume size {size_bytes} exceeds the limit of {VOLUME_MAX_BYTES} bytes (1 PiB)"
        )));
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VolumeManager {
    /// Opens the data directory: loads (or creates) the catalog and opens every volume.
    pub fn open(
        config: ManagerConfig,
        store: Arc<dyn CatalogStore>,
        engine: DeviceEngine,
    ) -> Result<VolumeManager, Error> {
        let dir = config.data_dir.join("volumes");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let mut catalog = match store.load()? {
            Some(catalog) => catalog,
            None => {
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
        let mut volumes = BTreeMap::new();
        for rec in &catalog.volumes {
            let volume = Self::open_volume(&engine, &dir, rec)?;
            volumes.insert(rec.name.clone(), Arc::new(volume));
        }
        Ok(VolumeManager {
            config,
            store,
            engine,
            inner: Mutex::new(Inner { catalog, volumes }),
            admin: tokio::sync::Mutex::new(()),
        })
    }

    fn open_volume(engine: &DeviceEngine, dir: &Path, rec: &VolumeRecord) -> Result<Volume, Error> {
        let [component] = rec.components.as_slice() else {
            return Err(Error::Invalid(format!(
                "volume {:?} has {} components; a plain volume has exactly one",
                rec.name,
                rec.components.len()
            )));
        };
        let path = dir.join(&component.file);
        let part = Component::open(engine.clone(), &path, rec.cache).map_err(|e| {
            Error::io(
                format!(
                    "volume {:?}: cannot open component {}",
                    rec.name,
                    path.display()
                ),
                e,
            )
        })?;
        Ok(Volume::new(
            rec.id,
            rec.name.clone(),
            rec.size_bytes,
            rec.read_only,
            rec.layout,
            part,
            false,
        ))
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave `Inner` half-updated (every update is
        // a single insert/remove after persistence), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn volumes_dir(&self) -> PathBuf {
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

    /// The volume called `name`; the empty name is the default export.
    pub fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        let inner = self.inner();
        if name.is_empty() {
            return match &self.config.default_volume {
                Some(default) => inner.volumes.get(default).cloned(),
                None if inner.volumes.len() == 1 => inner.volumes.values().next().cloned(),
                None => None,
            };
        }
        inner.volumes.get(name).cloned()
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.inner().volumes.values().cloned().collect()
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
        }
    }

    /// The named volume and a copy of the catalog to modify (under the admin lock).
    fn find(&self, name: &str) -> Result<(Arc<Volume>, Catalog), Error> {
        let inner = self.inner();
        let volume = inner
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.into()))?;
        Ok((volume, inner.catalog.clone()))
    }

    async fn persist(&self, mut catalog: Catalog) -> Result<Catalog, Error> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.store(&mut catalog).map(|()| catalog))
            .await
            .map_err(|e| Error::io("catalog writer", std::io::Error::other(e.to_string())))?
            .map_err(Error::from)
    }

    /// Creates a plain volume.
    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        read_only: bool,
        cache: Option<CacheMode>,
    ) -> Result<Arc<Volume>, Error> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        let _admin = self.admin.lock().await;
        let mut catalog = {
            let inner = self.inner();
            if inner.volumes.contains_key(name) {
                return Err(Error::Exists(name.to_string()));
            }
            inner.catalog.clone()
        };
        let id = catalog.next_volume_id;
        let record = VolumeRecord {
            id,
            name: name.to_string(),
            size_bytes,
            read_only,
            cache: cache.unwrap_or(self.config.default_cache),
            layout: Layout::Plain,
            components: vec![ComponentRecord {
                device: LOCAL_DEVICE,
                file: format!("vol-{id}.data"),
            }],
            created_unix: unix_now(),
        };
        let path = self.volumes_dir().join(&record.components[0].file);
        let create_path = path.clone();
        tokio::task::spawn_blocking(move || Component::create(&create_path, size_bytes))
            .await
            .map_err(|e| Error::io("component creator", std::io::Error::other(e.to_string())))?
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        catalog.next_volume_id += 1;
        catalog.volumes.push(record.clone());
        catalog.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let catalog = match self.persist(catalog).await {
            Ok(catalog) => catalog,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let volume = Arc::new(Self::open_volume(
            &self.engine,
            &self.volumes_dir(),
            &record,
        )?);
        let mut inner = self.inner();
        inner.catalog = catalog;
        inner.volumes.insert(name.to_string(), Arc::clone(&volume));
        Ok(volume)
    }

    /// Grows a volume. Connected clients keep the size they negotiated until they reconnect
    /// (NBD fixes the size per connection).
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, Error> {
        validate_size(size_bytes)?;
        let _admin = self.admin.lock().await;
        let (volume, mut catalog) = self.find(name)?;
        if volume.ephemeral() {
            return Err(Error::Invalid(format!("volume {name:?} is served from a file given on the command line; resize the file instead")));
        }
        let current = volume.size_bytes();
        if size_bytes < current {
            return Err(Error::Invalid(format!(
                "volume {name:?} is {current} bytes; shrinking to {size_bytes} would destroy data and is not supported (create a smaller volume and copy)"
            )));
        }
        if size_bytes == current {
            return Ok(volume);
        }
        volume
            .component()
            .set_len(size_bytes)
            .await
            .map_err(|e| Error::io(format!("cannot grow volume {name:?}"), e))?;
        for rec in catalog.volumes.iter_mut().filter(|r| r.name == name) {
            rec.size_bytes = size_bytes;
        }
        let catalog = self.persist(catalog).await?;
        volume.set_size_bytes(size_bytes);
        self.inner().catalog = catalog;
        Ok(volume)
    }

    /// Deletes a volume and its data. Refused while clients are connected unless `force`,
    /// which disconnects them.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), Error> {
        let _admin = self.admin.lock().await;
        let (volume, mut catalog) = self.find(name)?;
        if volume.ephemeral() {
            return Err(Error::Invalid(format!("volume {name:?} is served from a file given on the command line; restart blockd without it")));
        }
        let connections = volume.connections();
        if connections > 0 && !force {
            return Err(Error::Busy {
                name: name.to_string(),
                connections,
            });
        }
        let files: Vec<String> = catalog
            .volumes
            .iter()
            .filter(|r| r.name == name)
            .flat_map(|r| r.components.iter().map(|c| c.file.clone()))
            .collect();
        catalog.volumes.retain(|r| r.name != name);
        let catalog = self.persist(catalog).await?;
        {
            let mut inner = self.inner();
            inner.catalog = catalog;
            inner.volumes.remove(name);
        }
        volume.close();
        for file in files {
            let path = self.volumes_dir().join(file);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "deleted volume's component file could not be removed");
            }
        }
        Ok(())
    }

    /// Serves an existing file as a volume without recording it in the catalog (benchmarks,
    /// one-off exports). Its size is the file's, rounded down to whole sectors.
    pub fn add_file_volume(
        &self,
        name: &str,
        path: &Path,
        cache: CacheMode,
        read_only: bool,
    ) -> Result<Arc<Volume>, Error> {
        validate_name(name)?;
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("cannot use {}", path.display()), e))?
            .len();
        let size_bytes = len / SECTOR_BYTES * SECTOR_BYTES;
        validate_size(size_bytes)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        let part = Component::open(self.engine.clone(), path, cache)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let mut inner = self.inner();
        if inner.volumes.contains_key(name) {
            return Err(Error::Exists(name.to_string()));
        }
        let volume = Arc::new(Volume::new(
            0,
            name.to_string(),
            size_bytes,
            read_only,
            Layout::Plain,
            part,
            true,
        ));
        inner.volumes.insert(name.to_string(), Arc::clone(&volume));
        Ok(volume)
    }

    /// Flushes every volume (used at shutdown).
    pub async fn flush_all(&self) -> Vec<(String, std::io::Error)> {
        let mut failures = Vec::new();
        for volume in self.list() {
            if volume.read_only() {
                continue;
            }
            if let Err(e) = volume.flush().await {
                failures.push((volume.name().to_string(), e));
            }
        }
        failures
    }
}
