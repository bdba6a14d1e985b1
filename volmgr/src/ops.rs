//! Admin operations on the volume manager: create, resize, delete, and orphan files.
//!
//! Each is ordered so that a failure (EFBIG, ENOSPC, an I/O error) or a kill -9 at any point
//! leaves nothing that blocks the next operation:
//!
//! - **create**: make the file (a never-used name, `0600`, fsynced with its directory), then
//!   record it. A failed record removes the file; a crash in between leaves an *orphan*
//!   (reported, removable, never in the way: names are not reused).
//! - **resize** (grow only): grow the file, then record the size, then publish it. A failed
//!   record cuts the file back; a crash in between leaves a file longer than its volume,
//!   which start-up cuts back (no client was ever told the new size).
//! - **delete**: record the volume's removal, then remove its file. A crash in between leaves
//!   an orphan. On a full filesystem the catalog store writes with its space reserve (see
//!   [`crate::catalog`]), so a delete is how an operator gets space back; if there is no
//!   reserve (the filesystem was already full when blockd started) the delete fails and
//!   nothing changes.
//!
//! The catalog is the truth; memory follows it only after a successful store.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use raid::{CacheMode, Component};

use crate::api::OrphanInfo;
use crate::backend::Backend;
use crate::catalog::{Catalog, ComponentRecord, Layout, VolumeRecord};
use crate::check::{validate_name, validate_size, LOCAL_DEVICE, SECTOR_BYTES};
use crate::error::Error;
use crate::files;
use crate::manager::{Unavailable, VolumeManager};
use crate::volume::Volume;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every file some catalog record names (served or not): never an orphan.
fn known_files(catalog: &Catalog) -> HashSet<String> {
    catalog
        .volumes
        .iter()
        .flat_map(|r| r.components.iter().map(|c| c.file.clone()))
        .collect()
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(what, io::Error::other(e.to_string())))
}

impl VolumeManager {
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
            if inner.volumes.contains_key(name) || inner.unavailable.contains_key(name) {
                return Err(Error::Exists(name.to_string()));
            }
            inner.catalog.clone()
        };
        let id = catalog.next_volume_id;
        let dir = self.volumes_dir();
        let create_dir = dir.clone();
        let file = blocking("component creator", move || {
            files::create_component(&create_dir, id, size_bytes)
        })
        .await?
        .map_err(|e| Error::CreateFile {
            name: name.to_string(),
            source: e,
        })?;
        let record = VolumeRecord {
            id,
            name: name.to_string(),
            size_bytes,
            read_only,
            cache: cache.unwrap_or(self.config.default_cache),
            layout: Layout::Plain,
            components: vec![ComponentRecord {
                device: LOCAL_DEVICE,
                file: file.clone(),
            }],
            created_unix: unix_now(),
        };
        catalog.next_volume_id += 1;
        catalog.volumes.push(record.clone());
        catalog.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let catalog = match self.persist(catalog).await {
            Ok(catalog) => catalog,
            Err(e) => {
                files::remove_file(&dir, &file);
                return Err(e);
            }
        };
        let opened = Self::open_volume(&self.engine, &dir, &record);
        let mut inner = self.inner();
        inner.catalog = catalog;
        match opened {
            Ok(volume) => {
                let volume = Arc::new(volume);
                inner.volumes.insert(name.to_string(), Arc::clone(&volume));
                Ok(volume)
            }
            Err(reason) => {
                inner.unavailable.insert(
                    name.to_string(),
                    Unavailable {
                        record,
                        reason: reason.clone(),
                    },
                );
                Err(Error::Unavailable {
                    name: name.to_string(),
                    reason,
                })
            }
        }
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
        let component = volume.backend();
        if let Err(e) = component.set_len(size_bytes).await {
            // ftruncate fails whole, but make sure the file is at the recorded size.
            if let Err(undo) = component.set_len(current).await {
                tracing::error!(volume = %name, error = %undo,
                    "cannot cut the file back after a failed grow; start-up will");
            }
            return Err(Error::io(format!("cannot grow volume {name:?}"), e));
        }
        for rec in catalog.volumes.iter_mut().filter(|r| r.name == name) {
            rec.size_bytes = size_bytes;
        }
        let catalog = match self.persist(catalog).await {
            Ok(catalog) => catalog,
            Err(e) => {
                if let Err(undo) = component.set_len(current).await {
                    tracing::error!(volume = %name, error = %undo,
                        "cannot cut the file back after a failed resize; start-up will");
                }
                return Err(e);
            }
        };
        volume.set_size_bytes(size_bytes);
        self.inner().catalog = catalog;
        Ok(volume)
    }

    /// The served volume `name` and a copy of the catalog to modify (under the admin lock).
    fn find(&self, name: &str) -> Result<(Arc<Volume>, Catalog), Error> {
        let inner = self.inner();
        if let Some(u) = inner.unavailable.get(name) {
            return Err(Error::Unavailable {
                name: name.into(),
                reason: u.reason.clone(),
            });
        }
        let volume = inner
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.into()))?;
        Ok((volume, inner.catalog.clone()))
    }

    /// Deletes a volume and its data (an unavailable one too). Refused while clients are
    /// connected unless `force`, which disconnects them.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), Error> {
        let _admin = self.admin.lock().await;
        let (volume, mut catalog) = {
            let inner = self.inner();
            let volume = match inner.volumes.get(name) {
                Some(v) => Some(Arc::clone(v)),
                None if inner.unavailable.contains_key(name) => None,
                None => return Err(Error::NotFound(name.into())),
            };
            (volume, inner.catalog.clone())
        };
        if let Some(volume) = &volume {
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
        }
        let dropped: Vec<String> = catalog
            .volumes
            .iter()
            .filter(|r| r.name == name)
            .flat_map(|r| r.components.iter().map(|c| c.file.clone()))
            .collect();
        catalog.volumes.retain(|r| r.name != name);
        // Only plain names inside the volumes directory, and only files no remaining record
        // uses (two records on one file is a damaged catalog; keep the other's data).
        let still_used = known_files(&catalog);
        let remove: Vec<String> = dropped
            .into_iter()
            .filter(|f| files::is_plain_file_name(f) && !still_used.contains(f))
            .collect();
        let catalog = self.persist_freeing(catalog).await?;
        {
            let mut inner = self.inner();
            inner.catalog = catalog;
            inner.volumes.remove(name);
            inner.unavailable.remove(name);
        }
        if let Some(volume) = &volume {
            volume.close();
        }
        let dir = self.volumes_dir();
        let store = Arc::clone(&self.store);
        blocking("file remover", move || {
            for file in &remove {
                files::remove_file(&dir, file);
            }
            store.replenish();
        })
        .await
    }

    /// Files in the volumes directory that no catalog record names.
    pub async fn orphans(&self) -> Result<Vec<OrphanInfo>, Error> {
        let _admin = self.admin.lock().await;
        let known = known_files(&self.inner().catalog);
        let dir = self.volumes_dir();
        blocking("orphan scan", move || {
            files::scan_orphans(&dir, &|f| known.contains(f))
                .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))
        })
        .await?
    }

    /// Removes an orphan file (see [`VolumeManager::orphans`]) from the volumes directory.
    pub async fn remove_orphan(&self, file: &str) -> Result<(), Error> {
        let _admin = self.admin.lock().await;
        if !files::is_plain_file_name(file) {
            return Err(Error::Invalid(format!(
                "{file:?} is not a file name in the volumes directory"
            )));
        }
        let catalog = self.inner().catalog.clone();
        if let Some(owner) = catalog
            .volumes
            .iter()
            .find(|r| r.components.iter().any(|c| c.file == file))
        {
            return Err(Error::Invalid(format!(
                "{file} is the file of volume {:?}, not an orphan; delete the volume instead",
                owner.name
            )));
        }
        let dir = self.volumes_dir();
        let path = dir.join(file);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::Invalid(format!(
                    "{} is a directory; remove it by hand",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoOrphan(file.to_string()))
            }
            Err(e) => return Err(Error::io(format!("cannot inspect {}", path.display()), e)),
        }
        let store = Arc::clone(&self.store);
        blocking("orphan remover", move || {
            std::fs::remove_file(&path)
                .and_then(|()| files::sync_dir(&dir))
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
            store.replenish();
            Ok(())
        })
        .await?
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
        if inner.volumes.contains_key(name) || inner.unavailable.contains_key(name) {
            return Err(Error::Exists(name.to_string()));
        }
        let volume = Arc::new(Volume::new(
            0,
            name.to_string(),
            size_bytes,
            read_only,
            Layout::Plain,
            Backend::Local(part),
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
