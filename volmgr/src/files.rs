//! The files of a data directory: private modes, component files, and orphans.
//!
//! Why this module exists: a volume file holds a VM's disk and the catalog names every volume,
//! so nothing here may be readable by another local user, whatever the process umask. Every
//! file is created owner-only (`0600`) and every directory `0700` *at creation* (the mode is
//! passed to `open`/`mkdir`, so there is no window with a looser mode), and start-up tightens
//! what an older blockd or an operator left group/other-accessible, with a log line.
//!
//! Invariants kept for the admin operations:
//! - A component file name is `vol-<id>-<16 hex digits>.data`; the hex part is random and the
//!   file is created with `O_EXCL`, retried under a new name if it exists. A name is never
//!   reused, even after a lost catalog, so a stray file can never block a later create.
//! - A create that fails after the file exists removes the file again; creating or removing a
//!   file fsyncs the directory, so a power cut cannot lose (or resurrect) a directory entry.
//! - A file in `volumes/` that no catalog record names is an *orphan* (a crash between
//!   creating a file and recording it, or between dropping a record and removing its file):
//!   reported by status and removable by the operator, never reused and never fatal.

use std::collections::hash_map::RandomState;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component as PathPart, Path};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::OrphanInfo;

/// Mode of every file blockd creates in the data directory: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of the data directory and `volumes/`: owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Attempts at a fresh component file name before giving up (each collision is a 2^-64 event
/// unless someone plants files, so more than one attempt means something is very wrong).
const CREATE_ATTEMPTS: usize = 8;

/// Creates `dir` (and missing parents) with mode `0700`, or tightens an existing directory
/// that group or others can reach, saying so in the log.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    tighten(dir, PRIVATE_DIR_MODE)
}

/// Sets `path`'s mode to `mode` if group or others have any access to it, with a warning.
pub fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let old = fs::metadata(path)?.mode() & 0o7777;
    if old & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        tracing::warn!(path = %path.display(), old = format!("{old:o}"), new = format!("{mode:o}"),
            "was readable by other users; made private");
    }
    Ok(())
}

/// fsyncs a directory, so entries created, renamed or removed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether `name` is a plain file name: one normal path component, so that joining it to a
/// directory can only name an entry of that directory (no `..`, `/`, absolute path or NUL).
pub fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(PathPart::Normal(part)), None) if part == name
    ) && !name.contains('\0')
}

fn unique_suffix() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // RandomState is seeded from the OS's random source per process and per instance.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(nanos);
    hasher.finish()
}

/// Why a component file could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create {file} in {}: {source}", dir.display())]
pub struct CreateFileError {
    pub dir: std::path::PathBuf,
    pub file: String,
    #[source]
    pub source: io::Error,
}

/// Creates a new sparse component file of `size_bytes` for volume `id` in `dir` (mode
/// `0600`, a never-used name, file and directory fsynced) and returns its name. On failure
/// nothing is left behind (unless removing the half-made file fails too, which is logged and
/// leaves an orphan).
pub fn create_component(dir: &Path, id: u64, size_bytes: u64) -> Result<String, CreateFileError> {
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..CREATE_ATTEMPTS {
        let file = format!("vol-{id}-{:016x}.data", unique_suffix());
        let path = dir.join(&file);
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&path);
        let handle = match created {
            Ok(handle) => handle,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = e;
                continue;
            }
            Err(source) => {
                return Err(CreateFileError {
                    dir: dir.to_path_buf(),
                    file,
                    source,
                })
            }
        };
        let sized = handle
            .set_len(size_bytes)
            .and_then(|()| handle.sync_all())
            .and_then(|()| sync_dir(dir));
        drop(handle);
        return match sized {
            Ok(()) => Ok(file),
            Err(source) => {
                remove_file(dir, &file);
                Err(CreateFileError {
                    dir: dir.to_path_buf(),
                    file,
                    source,
                })
            }
        };
    }
    Err(CreateFileError {
        dir: dir.to_path_buf(),
        file: format!("vol-{id}-*.data"),
        source: last,
    })
}

/// Removes `dir/file` and fsyncs `dir`; a failure is logged (the file stays as an orphan,
/// which status reports) rather than returned, because the caller's operation has already
/// taken effect in the catalog or is being rolled back.
pub fn remove_file(dir: &Path, file: &str) {
    let path = dir.join(file);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot remove file; it stays as an orphan (volctl orphans remove)");
            return;
        }
    }
    if let Err(e) = sync_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync directory after a removal");
    }
}

/// Every entry of `dir` that `known` does not name, with its size (0 for non-files).
pub fn scan_orphans(dir: &Path, known: &dyn Fn(&str) -> bool) -> io::Result<Vec<OrphanInfo>> {
    let mut orphans = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if known(&name) {
            continue;
        }
        let meta = entry.metadata()?;
        orphans.push(OrphanInfo {
            file: name,
            size_bytes: if meta.is_file() { meta.len() } else { 0 },
            allocated_bytes: meta.blocks() * 512,
            modified_unix: meta.mtime().max(0) as u64,
        });
    }
    orphans.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(orphans)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "volmgr-files-{tag}-{}-{:x}",
            std::process::id(),
            unique_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn plain_file_names_only() {
        for good in ["vol-1-00ff.data", "a", "x..y"] {
            assert!(is_plain_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a/",
            "./a",
            "a\0b",
        ] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn created_files_and_dirs_are_private_and_names_never_repeat() {
        let base = temp_dir("mode");
        let dir = base.join("d").join("volumes");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(base.join("d")).unwrap().mode() & 0o777, 0o700);
        let a = create_component(&dir, 1, 1 << 20).unwrap();
        let b = create_component(&dir, 1, 1 << 20).unwrap();
        assert_ne!(a, b);
        let meta = fs::metadata(dir.join(&a)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 1 << 20);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        fs::remove_dir_all(base).ok();
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let dir = temp_dir("efbig");
        // Larger than any Linux file (i64::MAX rounded up): set_len fails with EINVAL/EFBIG.
        let err = create_component(&dir, 3, u64::MAX - 511).unwrap_err();
        assert!(err.to_string().contains("cannot create"), "{err}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn orphans_are_the_unknown_entries() {
        let dir = temp_dir("orphans");
        let keep = create_component(&dir, 1, 4096).unwrap();
        let stray = create_component(&dir, 2, 8192).unwrap();
        let found = scan_orphans(&dir, &|f| f == keep).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].file, stray);
        assert_eq!(found[0].size_bytes, 8192);
        remove_file(&dir, &stray);
        assert!(scan_orphans(&dir, &|f| f == keep).unwrap().is_empty());
        fs::remove_dir_all(dir).ok();
    }
}
