//! The local catalog store: one file in the data directory.
//!
//! Format:
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
//! A store writes `catalog.tmp` (mode `0600`), fsyncs it, renames it over `catalog`, and
//! fsyncs the directory, so a crash leaves either the old or the new catalog. A failed store
//! removes its temporary file, and load removes one a crash left behind. A catalog that fails
//! any check (size, magic, version, either checksum, reserved bytes, JSON) is reported as
//! corrupt and never silently replaced; what the records say is checked next, by
//! [`crate::check`].
//!
//! Full filesystem: writing a new catalog needs free space, and deleting a volume (how an
//! operator gets space back) must write one. So the store keeps `catalog.reserve`, a file of
//! real zeros at least twice the catalog's size (and at least [`RESERVE_MIN_BYTES`]). A
//! store for an operation that frees space ([`CatalogStore::store_to_free_space`]) that fails
//! for lack of space (`ENOSPC`, `EDQUOT`) removes the reserve and tries once more; other
//! stores never touch it, so a create cannot use up what a delete needs. The reserve is
//! rebuilt, best effort, after every store and by [`CatalogStore::replenish`] once the caller
//! has freed space. (On a filesystem that compresses or deduplicates zeros the reserve holds
//! less than it says; the delete then fails with ENOSPC and changes nothing.)

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Catalog, CatalogError, CatalogStore, CATALOG_MAX_BYTES};

const MAGIC: [u8; 8] = *b"BLKDCAT1";
const FORMAT_VERSION: u32 = 1;
/// Smallest space reserve: room for a catalog of a few thousand volumes, and small enough to
/// be lost in the noise of any data directory.
pub const RESERVE_MIN_BYTES: u64 = 1 << 20;

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

/// The catalog in a file in the data directory.
#[derive(Debug)]
pub struct LocalFileStore {
    path: PathBuf,
    #[cfg(test)]
    pub(crate) space: Option<std::sync::Arc<crate::catalog::space::SimSpace>>,
}

impl LocalFileStore {
    pub fn new(data_dir: &Path) -> LocalFileStore {
        LocalFileStore {
            path: data_dir.join("catalog"),
            #[cfg(test)]
            space: None,
        }
    }

    pub(crate) fn tmp_path(&self) -> PathBuf {
        self.path.with_extension("tmp")
    }

    pub(crate) fn reserve_path(&self) -> PathBuf {
        self.path.with_extension("reserve")
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
        self.remove_stale_tmp().map_err(|e| self.io_err(e))?;
        let file_len = match fs::metadata(&self.path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(e)),
        };
        crate::files::tighten(&self.path, crate::files::PRIVATE_FILE_MODE)
            .map_err(|e| self.io_err(e))?;
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
        self.store_with(catalog, false)
    }

    fn store_to_free_space(&self, catalog: &mut Catalog) -> Result<(), CatalogError> {
        self.store_with(catalog, true)
    }

    fn replenish(&self) {
        let catalog_bytes = fs::metadata(&self.path).map_or(0, |m| m.len());
        let want = RESERVE_MIN_BYTES.max(catalog_bytes.saturating_mul(2));
        if let Err(e) = self.fill_reserve(want) {
            tracing::warn!(path = %self.reserve_path().display(), error = %e,
                "cannot build the catalog's space reserve; a volume delete on a full filesystem may fail");
        }
    }

    fn location(&self) -> PathBuf {
        self.path.clone()
    }
}

/// Whether `e` means the filesystem (or the user's quota) has no room left.
pub(crate) fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

impl LocalFileStore {
    /// Stores `catalog`; `may_use_reserve` only for operations that free space, so that the
    /// reserve is still there when a delete needs it.
    fn store_with(&self, catalog: &mut Catalog, may_use_reserve: bool) -> Result<(), CatalogError> {
        let mut next = catalog.clone();
        next.generation = next
            .generation
            .checked_add(1)
            .ok_or_else(|| CatalogError::Invalid {
                path: self.path.clone(),
                why: "its generation is at the largest number and cannot advance".into(),
            })?;
        let bytes = encode(&next)?;
        match self.write_replace(&bytes) {
            Ok(()) => {}
            Err(e) if may_use_reserve && is_out_of_space(&e) && self.release_reserve() => {
                tracing::warn!(path = %self.path.display(),
                    "filesystem full: released the catalog's space reserve to write the catalog");
                self.write_replace(&bytes).map_err(|e| self.io_err(e))?;
            }
            Err(e) => return Err(self.io_err(e)),
        }
        catalog.generation = next.generation;
        self.replenish();
        Ok(())
    }

    fn remove_stale_tmp(&self) -> io::Result<()> {
        let tmp = self.tmp_path();
        match fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "removed a temporary catalog left by a crash");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes `bytes` to the temporary file and renames it over the catalog; on failure the
    /// temporary file is gone and the catalog is the old one.
    fn write_replace(&self, bytes: &[u8]) -> io::Result<()> {
        // A stale temporary file would keep its (maybe looser) mode: start from none.
        self.remove_stale_tmp()?;
        let tmp = self.tmp_path();
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(crate::files::PRIVATE_FILE_MODE)
                .open(&tmp)?;
            self.take_space(bytes.len() as u64)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            let old_len = fs::metadata(&self.path).map_or(0, |m| m.len());
            fs::rename(&tmp, &self.path)?;
            self.give_space(old_len);
            match self.path.parent() {
                Some(dir) => crate::files::sync_dir(dir),
                None => Ok(()),
            }
        })();
        if result.is_err() {
            if let Ok(meta) = fs::metadata(&tmp) {
                self.give_space(meta.len());
            }
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the space reserve; whether there was one to remove.
    fn release_reserve(&self) -> bool {
        let path = self.reserve_path();
        let len = fs::metadata(&path).map_or(0, |m| m.len());
        match fs::remove_file(&path) {
            Ok(()) => {
                self.give_space(len);
                true
            }
            Err(_) => false,
        }
    }

    /// Grows the reserve to `want_bytes` of written zeros (written, not a hole, so that the
    /// filesystem really holds the space for us).
    fn fill_reserve(&self, want_bytes: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::files::PRIVATE_FILE_MODE)
            .open(self.reserve_path())?;
        let mut len = file.metadata()?.len();
        if len >= want_bytes {
            return Ok(());
        }
        std::io::Seek::seek(&mut file, io::SeekFrom::Start(len))?;
        while len < want_bytes {
            let n = (want_bytes - len).min(ZEROS.len() as u64);
            self.take_space(n)?;
            file.write_all(&ZEROS[..n as usize])?;
            len += n;
        }
        file.sync_all()
    }

    #[cfg(test)]
    fn take_space(&self, bytes: u64) -> io::Result<()> {
        self.space.as_ref().map_or(Ok(()), |s| s.take(bytes))
    }
    #[cfg(not(test))]
    fn take_space(&self, _bytes: u64) -> io::Result<()> {
        Ok(())
    }
    #[cfg(test)]
    fn give_space(&self, bytes: u64) {
        if let Some(s) = &self.space {
            s.give(bytes);
        }
    }
    #[cfg(not(test))]
    fn give_space(&self, _bytes: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ComponentRecord, DeviceRecord, Layout, VolumeRecord};
    use raid::CacheMode;

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

    #[test]
    fn files_are_private_whatever_the_umask_and_no_temp_file_stays() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = temp_store();
        // A temporary file a crash left, world-readable: load removes it.
        fs::write(store.tmp_path(), b"torn").unwrap();
        fs::set_permissions(store.tmp_path(), fs::Permissions::from_mode(0o666)).unwrap();
        assert!(store.load().unwrap().is_none());
        assert!(!store.tmp_path().exists());
        let mut cat = sample();
        store.store(&mut cat).unwrap();
        for path in [store.path().to_path_buf(), store.reserve_path()] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert!(fs::metadata(store.reserve_path()).unwrap().len() >= RESERVE_MIN_BYTES);
        // A catalog left readable by others is made private on load.
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
        store.load().unwrap();
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_full_filesystem_uses_the_reserve_and_a_failed_store_leaves_nothing() {
        let (dir, mut store) = temp_store();
        let mut cat = sample();
        store.store(&mut cat).unwrap();
        let reserve = fs::metadata(store.reserve_path()).unwrap().len();
        // Now the filesystem is 100% full.
        let space = std::sync::Arc::new(crate::catalog::space::SimSpace::new(0));
        store.space = Some(space.clone());
        cat.volumes.clear();
        // An ordinary store (a create) fails and leaves the reserve alone...
        let err = store.store(&mut cat.clone()).unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(fs::metadata(store.reserve_path()).unwrap().len(), reserve);
        // ...a delete's store uses it.
        store.store_to_free_space(&mut cat).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), cat);
        assert!(!store.tmp_path().exists());
        // The reserve paid for the catalog; rebuilding it fails quietly while full.
        assert!(space.free_bytes() < reserve);
        // With no reserve left a store fails cleanly: old catalog kept, no temp file.
        space.set_free(0);
        let _ = fs::remove_file(store.reserve_path());
        let before = cat.clone();
        let err = store.store_to_free_space(&mut cat).unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(cat, before);
        assert_eq!(store.load().unwrap().unwrap(), before);
        assert!(!store.tmp_path().exists());
        // Space freed (a volume's file removed): replenish rebuilds the reserve.
        space.set_free(64 << 20);
        store.replenish();
        assert!(fs::metadata(store.reserve_path()).unwrap().len() >= RESERVE_MIN_BYTES);
        fs::remove_dir_all(dir).ok();
    }
}
