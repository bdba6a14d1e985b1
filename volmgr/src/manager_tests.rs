//! Unit tests of start-up and the admin operations against a real data directory, with the
//! catalog store's failures injected (a full filesystem, a failed write) where a real disk
//! cannot be made to fail on cue.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use raid::{CacheMode, DeviceEngine, EnginePreference};

use crate::api::VolumeState;
use crate::catalog::space::SimSpace;
use crate::catalog::{Catalog, CatalogError, CatalogStore, LocalFileStore};
use crate::files::tests::temp_dir;
use crate::{ManagerConfig, VolumeManager};

/// A local store whose writes fail with ENOSPC while `fail` is set.
#[derive(Debug)]
struct FailingStore {
    inner: LocalFileStore,
    fail: AtomicBool,
}

impl CatalogStore for FailingStore {
    fn load(&self) -> Result<Option<Catalog>, CatalogError> {
        self.inner.load()
    }
    fn store(&self, catalog: &mut Catalog) -> Result<(), CatalogError> {
        if self.fail.load(Ordering::Acquire) {
            return Err(CatalogError::Io {
                path: self.inner.location(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        self.inner.store(catalog)
    }
    fn location(&self) -> PathBuf {
        self.inner.location()
    }
}

fn config(dir: &Path) -> ManagerConfig {
    ManagerConfig {
        data_dir: dir.to_path_buf(),
        default_cache: CacheMode::Writeback,
        default_volume: None,
    }
}

fn open_with(dir: &Path, store: Arc<dyn CatalogStore>) -> Result<VolumeManager, crate::Error> {
    let engine = DeviceEngine::start("test", EnginePreference::Sync).unwrap();
    VolumeManager::open(config(dir), store, engine)
}

fn open(dir: &Path) -> VolumeManager {
    open_with(dir, Arc::new(LocalFileStore::new(dir))).unwrap()
}

fn file_of(mgr: &VolumeManager, name: &str) -> PathBuf {
    let inner = mgr.inner();
    let rec = inner
        .catalog
        .volumes
        .iter()
        .find(|r| r.name == name)
        .unwrap();
    mgr.volumes_dir().join(&rec.components[0].file)
}

fn volume_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_bad_volume_is_unavailable_with_its_reason_and_the_rest_are_served() {
    let dir = temp_dir("mgr-bad");
    let mgr = open(&dir);
    for name in ["good", "gone", "link", "short", "grown"] {
        mgr.create(name, 1 << 20, false, None).await.unwrap();
    }
    let files: Vec<PathBuf> = ["gone", "link", "short", "grown"]
        .iter()
        .map(|n| file_of(&mgr, n))
        .collect();
    drop(mgr);
    fs::remove_file(&files[0]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &files[1]).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&files[2])
        .unwrap()
        .set_len(4096)
        .unwrap();
    // A resize killed between growing the file and recording the size.
    fs::OpenOptions::new()
        .write(true)
        .open(&files[3])
        .unwrap()
        .set_len(2 << 20)
        .unwrap();

    let mgr = open(&dir);
    assert!(mgr.lookup("good").is_some());
    assert_eq!(mgr.lookup("grown").unwrap().size_bytes(), 1 << 20);
    assert_eq!(fs::metadata(&files[3]).unwrap().len(), 1 << 20);
    for (name, why) in [
        ("gone", "missing"),
        ("link", "symlink"),
        ("short", "cut short"),
    ] {
        assert!(mgr.lookup(name).is_none(), "{name}");
        let reason = mgr.unavailable(name).unwrap();
        assert!(reason.contains(why), "{name}: {reason}");
        let info = mgr.info_of(name).unwrap();
        assert_eq!(info.state, VolumeState::Unavailable);
        assert_eq!(info.reason.as_deref(), Some(reason.as_str()));
    }
    assert_eq!(mgr.infos().len(), 5);
    assert_eq!(mgr.unavailable_count(), 3);
    // An unavailable volume cannot be resized or re-created, but it can be deleted (the
    // symlink itself goes, never its target).
    assert!(mgr
        .resize("gone", 2 << 20)
        .await
        .unwrap_err()
        .to_string()
        .contains("unavailable"));
    assert!(mgr.create("gone", 1 << 20, false, None).await.is_err());
    for name in ["gone", "link", "short"] {
        mgr.delete(name, false).await.unwrap();
    }
    assert!(Path::new("/etc/hostname").exists());
    mgr.create("gone", 1 << 20, false, None).await.unwrap();
    assert_eq!(mgr.unavailable_count(), 0);
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_missing_catalog_next_to_volume_files_refuses_start_up() {
    let dir = temp_dir("mgr-lost");
    let mgr = open(&dir);
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    drop(mgr);
    fs::remove_file(dir.join("catalog")).unwrap();
    let err = open_with(&dir, Arc::new(LocalFileStore::new(&dir))).unwrap_err();
    assert!(
        err.to_string().contains("catalog") && err.to_string().contains("missing"),
        "{err}"
    );
    assert!(err.to_string().contains("vol-1-"), "{err}");
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_failed_create_or_resize_leaves_nothing_behind() {
    let dir = temp_dir("mgr-fail");
    let store = Arc::new(FailingStore {
        inner: LocalFileStore::new(&dir),
        fail: AtomicBool::new(false),
    });
    let mgr = open_with(&dir, store.clone()).unwrap();
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    let before = volume_files(&dir);
    store.fail.store(true, Ordering::Release);
    assert!(mgr.create("b", 1 << 20, false, None).await.is_err());
    assert_eq!(volume_files(&dir), before, "a failed create left a file");
    let err = mgr.resize("a", 4 << 20).await.unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(fs::metadata(file_of(&mgr, "a")).unwrap().len(), 1 << 20);
    assert_eq!(mgr.lookup("a").unwrap().size_bytes(), 1 << 20);
    store.fail.store(false, Ordering::Release);
    mgr.create("b", 1 << 20, false, None).await.unwrap();
    // A size no file can have: the filesystem refuses it, and no file stays.
    let err = mgr.create("huge", 1 << 50, false, None).await;
    if let Err(e) = err {
        assert_eq!(e.kind(), crate::ErrorKind::Invalid, "{e}");
        assert_eq!(volume_files(&dir).len(), 2);
    }
    drop(mgr);
    assert!(!dir.join("catalog.tmp").exists());
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn delete_works_on_a_full_filesystem() {
    let dir = temp_dir("mgr-full");
    let space = Arc::new(SimSpace::new(u64::MAX / 2));
    let mut store = LocalFileStore::new(&dir);
    store.space = Some(space.clone());
    let mgr = open_with(&dir, Arc::new(store)).unwrap();
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    mgr.create("b", 1 << 20, false, None).await.unwrap();
    let file = file_of(&mgr, "a");
    space.set_free(0);
    // Creates and resizes fail while full (and leave the space reserve alone)...
    assert!(mgr.create("c", 1 << 20, false, None).await.is_err());
    assert!(mgr.resize("b", 2 << 20).await.is_err());
    assert_eq!(volume_files(&dir).len(), 2);
    // ...and a delete, how an operator gets space back, works.
    mgr.delete("a", false).await.unwrap();
    assert!(!file.exists());
    assert!(mgr.lookup("a").is_none());
    drop(mgr);
    let mgr = open(&dir);
    assert!(mgr.lookup("a").is_none() && mgr.lookup("b").is_some());
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn orphans_are_listed_and_removable_and_names_never_collide() {
    let dir = temp_dir("mgr-orphan");
    let mgr = open(&dir);
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    let a_file = file_of(&mgr, "a");
    let a_name = a_file.file_name().unwrap().to_string_lossy().into_owned();
    // What a crash between creating a file and recording it leaves behind.
    let stray = "vol-2-00000000deadbeef.data";
    fs::write(dir.join("volumes").join(stray), b"x").unwrap();
    let orphans = mgr.orphans().await.unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].file, stray);
    // The next create does not trip over it.
    mgr.create("b", 1 << 20, false, None).await.unwrap();
    assert!(mgr
        .remove_orphan(&a_name)
        .await
        .unwrap_err()
        .to_string()
        .contains("not an orphan"));
    assert!(mgr.remove_orphan("../catalog").await.is_err());
    assert!(mgr.remove_orphan("nothing").await.is_err());
    mgr.remove_orphan(stray).await.unwrap();
    assert!(mgr.orphans().await.unwrap().is_empty());
    assert!(dir.join("catalog").exists());
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn catalog_records_are_checked_as_read() {
    let dir = temp_dir("mgr-check");
    let mgr = open(&dir);
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    mgr.create("b", 1 << 20, false, None).await.unwrap();
    let store = LocalFileStore::new(&dir);
    let mut cat = mgr.inner().catalog.clone();
    drop(mgr);
    // A correctly checksummed catalog whose record points outside the data directory.
    let outside = dir.join("secret");
    fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    cat.volumes[1].components[0].file = "../secret".into();
    store.store(&mut cat).unwrap();
    let mgr = open(&dir);
    assert!(mgr.lookup("a").is_some());
    assert!(mgr.lookup("b").is_none());
    assert!(mgr
        .unavailable("b")
        .unwrap()
        .contains("outside the data directory"));
    mgr.delete("b", false).await.unwrap();
    assert!(
        outside.exists(),
        "delete followed a record out of the volumes directory"
    );
    drop(mgr);
    // A catalog-wide problem refuses start-up.
    let mut cat = store.load().unwrap().unwrap();
    cat.devices.clear();
    store.store(&mut cat).unwrap();
    let err = open_with(&dir, Arc::new(LocalFileStore::new(&dir))).unwrap_err();
    assert!(err.to_string().contains("no local device"), "{err}");
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn the_data_directory_is_made_private() {
    let dir = temp_dir("mgr-mode");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let mgr = open(&dir);
    mgr.create("a", 1 << 20, false, None).await.unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("volumes")), 0o700);
    assert_eq!(mode(&dir.join("catalog")), 0o600);
    assert_eq!(mode(&file_of(&mgr, "a")), 0o600);
    fs::remove_dir_all(dir).ok();
}
