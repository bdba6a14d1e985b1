//! A component: the part of one volume stored on one device, as a sparse file.
//!
//! A component turns byte-range requests into engine operations: it loops over short reads
//! and writes, chooses between the `O_DIRECT` descriptor and the page-cache descriptor, and
//! maps TRIM / WRITE_ZEROES onto `fallocate`. Allocation status comes from
//! `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Cache modes:
//! - `writeback`: page cache; FLUSH is `fdatasync`, FUA is `RWF_DSYNC`.
//! - `none`: `O_DIRECT` for requests aligned to [`DIRECT_ALIGN`]; anything else goes through a
//!   second, buffered descriptor of the same file. Linux writes back and invalidates the page
//!   cache around direct I/O, and a direct request's 4 KiB pages are exactly its byte range, so
//!   the two paths never hand out stale data for non-overlapping requests (overlapping
//!   in-flight requests have no defined order in NBD anyway). Where the filesystem refuses
//!   `O_DIRECT` (tmpfs), the component falls back to the page cache and says so.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::Whence;

use crate::buf::IoBuf;
use crate::engine::nowait::{self, Attempt};
use crate::engine::{DeviceEngine, Op, OpKind};

/// Alignment (offset, length, memory) for the `O_DIRECT` path.
pub const DIRECT_ALIGN: u64 = 4096;

/// How a component uses the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `O_DIRECT`: no page cache; predictable memory use, what VM disks usually want.
    None,
    /// Page cache: fastest for small and unaligned I/O; durability still comes from FLUSH/FUA.
    #[default]
    Writeback,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        })
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            other => Err(format!(
                "unknown cache mode {other:?}: expected \"none\" or \"writeback\""
            )),
        }
    }
}

/// Allocation state of a byte range, from the file's holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// True for a hole: unallocated and reads as zeros.
    pub hole: bool,
}

const FALLOC_PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// One open component file.
#[derive(Debug)]
pub struct Component {
    engine: DeviceEngine,
    path: PathBuf,
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    cache: CacheMode,
    /// The file lives in memory (tmpfs, ramfs): a read never waits on a disk, so it is done
    /// on the caller's thread even though these filesystems refuse `RWF_NOWAIT`.
    in_memory: bool,
    /// Taken around each buffered write on a caller's thread. The filesystem serialises
    /// buffered writes to one file anyway (ext4 and XFS take the inode lock exclusively),
    /// but its waiters spin on the lock's owner: with a connection's threads writing 1 MiB
    /// each, 12% of blockd's CPU was that spinning. Waiting here sleeps instead, leaving the
    /// CPU to the thread reading the socket: 1 MiB QD8 writes took 7% less CPU per I/O.
    write_turn: std::sync::Mutex<()>,
}

/// Whether `file` is on a filesystem whose pages live only in memory.
fn in_memory(file: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; neither nix nor libc names it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    fstatfs(file).is_ok_and(|st| {
        let kind = st.filesystem_type();
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

/// Largest request served on the caller's thread (page-cache hit or buffered write): bigger
/// copies would hold a connection thread for too long; they go to the engine.
pub const NOWAIT_MAX_BYTES: usize = 1 << 20;

impl Component {
    /// Creates a new sparse component file of `size_bytes`; fails if it exists.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size_bytes)?;
        file.sync_all()
    }

    /// Opens an existing component file.
    pub fn open(engine: DeviceEngine, path: &Path, cache: CacheMode) -> io::Result<Component> {
        Self::open_with(engine, path, cache, 0)
    }

    /// Like [`Component::open`], but a symlink at `path` is refused (`ELOOP`): for files the
    /// catalog names, which must be regular files inside their directory, even if one is
    /// swapped for a link after it was checked.
    pub fn open_no_follow(
        engine: DeviceEngine,
        path: &Path,
        cache: CacheMode,
    ) -> io::Result<Component> {
        Self::open_with(engine, path, cache, libc::O_NOFOLLOW)
    }

    fn open_with(
        engine: DeviceEngine,
        path: &Path,
        cache: CacheMode,
        flags: i32,
    ) -> io::Result<Component> {
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)?;
        let direct = match cache {
            CacheMode::Writeback => None,
            CacheMode::None => match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | flags)
                .open(path)
            {
                Ok(file) => Some(Arc::new(file)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %path.display(),
                        "filesystem refuses O_DIRECT; cache=none falls back to the page cache");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        Ok(Component {
            engine,
            path: path.to_path_buf(),
            in_memory: in_memory(&buffered),
            buffered: Arc::new(buffered),
            direct,
            cache,
            write_turn: std::sync::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// True when `O_DIRECT` is in use for aligned requests.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn file_for(&self, offset: u64, len: usize) -> &Arc<File> {
        match &self.direct {
            Some(direct)
                if offset.is_multiple_of(DIRECT_ALIGN)
                    && (len as u64).is_multiple_of(DIRECT_ALIGN) =>
            {
                direct
            }
            _ => &self.buffered,
        }
    }

    /// Tries to read from the page cache without blocking. Gives the buffer back (`Err`) when
    /// the read would block or does not qualify (direct I/O, too large); then use [`read`].
    /// On an in-memory filesystem, which refuses `RWF_NOWAIT` but never waits on a disk, it
    /// is a plain read on the caller's thread.
    ///
    /// [`read`]: Component::read
    pub fn try_read(&self, offset: u64, mut buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        let len = buf.len();
        if len > NOWAIT_MAX_BYTES || !Arc::ptr_eq(self.file_for(offset, len), &self.buffered) {
            return Err(buf);
        }
        if self.in_memory {
            return self.read_now(offset, buf);
        }
        match nowait::read(&self.buffered, offset, buf.as_mut_slice()) {
            Attempt::Done(n) if n == len => Ok((buf, Ok(()))),
            Attempt::Failed(e) => Ok((buf, Err(e))),
            // Short (partly cached or at EOF) or would block: the engine does it properly.
            _ => Err(buf),
        }
    }

    /// Writes through the page cache on the calling thread (blocking `pwrite`). Only for a
    /// thread dedicated to one connection, never an async task. Gives the buffer back
    /// (`Err`) when the request does not qualify: direct I/O, or larger than
    /// [`NOWAIT_MAX_BYTES`]; then use [`write`](Component::write).
    pub fn write_now(&self, offset: u64, buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        let len = buf.len();
        if len > NOWAIT_MAX_BYTES || !Arc::ptr_eq(self.file_for(offset, len), &self.buffered) {
            return Err(buf);
        }
        let turn = self.write_turn.lock().unwrap_or_else(|p| p.into_inner());
        let res = self.buffered.write_all_at(buf.as_slice(), offset);
        drop(turn);
        Ok((buf, res))
    }

    /// Blocking read through the page cache on the calling thread (a cache miss goes to the
    /// disk): for a connection thread with nothing else in flight, never an async task.
    /// Gives the buffer back (`Err`) for direct-path or oversized requests.
    pub fn read_now(&self, offset: u64, mut buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        let len = buf.len();
        if len > NOWAIT_MAX_BYTES || !Arc::ptr_eq(self.file_for(offset, len), &self.buffered) {
            return Err(buf);
        }
        let mut done = 0;
        while done < len {
            match self
                .buffered
                .read_at(&mut buf.as_mut_slice()[done..], offset + done as u64)
            {
                Ok(0) => {
                    buf.as_mut_slice()[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok((buf, Err(e))),
            }
        }
        Ok((buf, Ok(())))
    }

    /// Blocking `O_DIRECT` read or (non-FUA) write on the calling thread: the lowest-latency
    /// path for a connection thread with nothing else in flight. Only for a thread dedicated
    /// to one connection, never an async task. Gives the buffer back (`Err`) when the request
    /// is not on the direct path.
    pub fn direct_now(
        &self,
        write: bool,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        let len = buf.len();
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| self.is_direct_path(offset, len))
        else {
            return Err(buf);
        };
        let res = if write {
            direct.write_all_at(buf.as_slice(), offset)
        } else {
            match direct.read_at(buf.as_mut_slice(), offset) {
                Ok(n) => {
                    // Aligned direct reads inside the file are whole; short only at its end.
                    buf.as_mut_slice()[n..].fill(0);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        Ok((buf, res))
    }

    /// Whether a request goes to the `O_DIRECT` descriptor (cache `none`, 4 KiB-aligned).
    pub fn is_direct_path(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some() && !Arc::ptr_eq(self.file_for(offset, len), &self.buffered)
    }

    /// Starts a read (`write == false`) or write of `buf` at `offset` on the engine and calls
    /// `done(buf, result)` when it completes, without an async task. Only for requests on the
    /// direct path ([`is_direct_path`](Component::is_direct_path)), whose transfers are
    /// whole: a short read is the end of the file (the rest reads as zeros) and a short
    /// write means the device is full (`ENOSPC`). Other requests fail with `EINVAL`.
    pub fn submit_direct(
        &self,
        write: bool,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        done: impl FnOnce(IoBuf, io::Result<()>) + Send + 'static,
    ) {
        let len = buf.len();
        if !self.is_direct_path(offset, len) {
            return done(buf, Err(einval()));
        }
        let kind = if write {
            OpKind::Write {
                offset,
                buf_start: 0,
                len,
                dsync: fua,
            }
        } else {
            OpKind::Read {
                offset,
                buf_start: 0,
                len,
            }
        };
        let file = Arc::clone(self.file_for(offset, len));
        let callback = move |c: crate::engine::Completion| {
            let Some(mut buf) = c.buf else {
                return done(IoBuf::with_len(len), Err(lost_buffer(c.result)));
            };
            let result = match c.result {
                Ok(n) if n == len => Ok(()),
                Ok(n) if !write => {
                    buf.as_mut_slice()[n..].fill(0);
                    Ok(())
                }
                Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Err(e) => Err(e),
            };
            done(buf, result)
        };
        self.engine.submit_with(
            Op {
                file,
                kind,
                buf: Some(buf),
            },
            Box::new(callback),
        );
    }

    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the file read as zeros.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        let file = self.file_for(offset, len);
        let mut buf = Some(buf);
        let mut done = 0usize;
        while done < len {
            let op = Op {
                file: Arc::clone(file),
                kind: OpKind::Read {
                    offset: offset + done as u64,
                    buf_start: done,
                    len: len - done,
                },
                buf: buf.take(),
            };
            let completion = self.engine.submit(op).await;
            let Some(b) = completion.buf else {
                return (IoBuf::with_len(len), Err(lost_buffer(completion.result)));
            };
            buf = Some(b);
            match completion.result {
                Ok(0) => {
                    if let Some(b) = buf.as_mut() {
                        b.as_mut_slice()[done..].fill(0);
                    }
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf.unwrap_or_else(|| IoBuf::with_len(len)), Err(e)),
            }
        }
        (buf.unwrap_or_else(|| IoBuf::with_len(len)), Ok(()))
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        let file = self.file_for(offset, len);
        let mut buf = Some(buf);
        let mut done = 0usize;
        while done < len {
            let op = Op {
                file: Arc::clone(file),
                kind: OpKind::Write {
                    offset: offset + done as u64,
                    buf_start: done,
                    len: len - done,
                    dsync: fua,
                },
                buf: buf.take(),
            };
            let completion = self.engine.submit(op).await;
            let Some(b) = completion.buf else {
                return (IoBuf::with_len(len), Err(lost_buffer(completion.result)));
            };
            buf = Some(b);
            match completion.result {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes");
                    return (buf.unwrap_or_else(|| IoBuf::with_len(len)), Err(e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf.unwrap_or_else(|| IoBuf::with_len(len)), Err(e)),
            }
        }
        (buf.unwrap_or_else(|| IoBuf::with_len(len)), Ok(()))
    }

    /// Makes every completed write durable (`fdatasync`).
    pub async fn flush(&self) -> io::Result<()> {
        let done = self
            .engine
            .submit(Op {
                file: Arc::clone(&self.buffered),
                kind: OpKind::Fdatasync,
                buf: None,
            })
            .await;
        done.result.map(|_| ())
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let done = self
            .engine
            .submit(Op {
                file: Arc::clone(&self.buffered),
                kind: OpKind::Fallocate { offset, len, mode },
                buf: None,
            })
            .await;
        done.result.map(|_| ())
    }

    /// Deallocates a range; it then reads as zeros.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(offset, len, FALLOC_PUNCH).await
    }

    /// Zeroes a range keeping it allocated. Returns `Unsupported` where the filesystem has no
    /// cheap way to do that, so the caller can decide whether to write zeros instead.
    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(offset, len, FALLOC_ZERO).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "filesystem cannot zero a range in place",
            )),
            other => other,
        }
    }

    /// Hints that a range will be read soon.
    pub async fn readahead(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct.is_some() {
            return Ok(());
        }
        let file = Arc::clone(&self.buffered);
        blocking(move || {
            let offset = i64::try_from(offset).map_err(|_| einval())?;
            let len = i64::try_from(len).map_err(|_| einval())?;
            nix::fcntl::posix_fadvise(
                file.as_raw_fd(),
                offset,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            )
            .map_err(io::Error::from)
        })
        .await
    }

    /// Allocation map of `[offset, offset + len)`, at most `max_extents` entries, covering a
    /// prefix of the range (all of it unless the cap was hit). Adjacent equal extents merge.
    pub async fn extents(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let file = Arc::clone(&self.buffered);
        blocking(move || extents_blocking(&file, offset, len, max_extents)).await
    }

    /// Changes the file's size (used to grow a volume).
    pub async fn set_len(&self, size_bytes: u64) -> io::Result<()> {
        let file = Arc::clone(&self.buffered);
        blocking(move || {
            file.set_len(size_bytes)?;
            file.sync_all()
        })
        .await
    }

    /// Bytes the filesystem has allocated to the file.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.blocks() * 512)
    }
}

fn extents_blocking(
    file: &File,
    offset: u64,
    len: u64,
    max_extents: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset.checked_add(len).ok_or_else(einval)?;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max_extents.max(1) {
        let data = seek(file, pos, Whence::SeekData)?;
        let (hole, next) = match data {
            // No data at or after `pos`: the rest is a hole.
            None => (true, end),
            Some(d) if d > pos => (true, d.min(end)),
            Some(_) => (
                false,
                seek(file, pos, Whence::SeekHole)?.unwrap_or(end).min(end),
            ),
        };
        if next <= pos {
            // Defensive: a filesystem answering backwards would loop forever.
            return Err(io::Error::other("SEEK_DATA/SEEK_HOLE did not advance"));
        }
        let len = next - pos;
        match out.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ => out.push(Extent { len, hole }),
        }
        pos = next;
    }
    Ok(out)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no such position (ENXIO).
fn seek(file: &File, pos: u64, whence: Whence) -> io::Result<Option<u64>> {
    let pos = i64::try_from(pos).map_err(|_| einval())?;
    match nix::unistd::lseek(file.as_raw_fd(), pos, whence) {
        Ok(at) => Ok(u64::try_from(at).ok()),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn lost_buffer(result: io::Result<usize>) -> io::Error {
    match result {
        Err(e) => e,
        Ok(_) => io::Error::other("engine returned a data operation without its buffer"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

    use super::*;

    /// A component of 1 MiB under `dir` holding a known pattern.
    fn patterned(dir: &Path) -> (PathBuf, Component) {
        let path = dir.join(format!("component-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Component::create(&path, 1 << 20).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let c = Component::open(DeviceEngine::sync(), &path, CacheMode::Writeback).unwrap();
        (path, c)
    }

    /// A catalog's file swapped for a symlink after it was checked is still refused.
    #[test]
    fn open_no_follow_refuses_a_symlink() {
        let dir = std::env::temp_dir();
        let (path, _) = patterned(&dir);
        let link = dir.join(format!("component-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let err = Component::open_no_follow(DeviceEngine::sync(), &link, cache).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        }
        assert!(
            Component::open_no_follow(DeviceEngine::sync(), &path, CacheMode::Writeback).is_ok()
        );
        assert!(Component::open(DeviceEngine::sync(), &link, CacheMode::Writeback).is_ok());
        std::fs::remove_file(link).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    /// tmpfs refuses `RWF_NOWAIT`, so without the in-memory rule every read there went to
    /// the engine (measured: 0.65x nbdkit's 4 KiB QD32 reads on /dev/shm).
    #[test]
    fn try_read_serves_tmpfs_inline() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("no /dev/shm here: skipped");
            return;
        }
        let (path, c) = patterned(shm);
        assert!(c.in_memory, "/dev/shm is not tmpfs here");
        let (buf, res) = c
            .try_read(8192 + 3, IoBuf::with_len(4096))
            .expect("an in-memory read is served on the caller's thread");
        res.unwrap();
        let want: Vec<u8> = (8192 + 3..8192 + 3 + 4096u32)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(buf.as_slice(), &want[..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn disk_files_are_not_in_memory() {
        // The build tree is on a disk filesystem (wherever /tmp may be).
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).unwrap();
        let (path, c) = patterned(&target);
        assert!(!c.in_memory);
        std::fs::remove_file(path).unwrap();
    }
}
