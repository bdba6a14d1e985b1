//! An open volume: its layout resolved onto components, and the operations a gateway calls.
//!
//! Offsets and lengths reaching these methods have already been checked against the volume
//! size by the caller (the NBD session validates at the edge); they are checked again here
//! with `checked_add` so a caller bug becomes `EINVAL`, never an out-of-range write.
//!
//! Where the bytes live is the volume's [`Backend`]: the gateway never sees it, and asks the
//! volume for the fast paths that only a local component offers (they decline otherwise).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use raid::{CacheMode, Extent, IoBuf};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::catalog::Layout;

#[derive(Debug)]
pub struct Volume {
    id: u64,
    name: String,
    size_bytes: AtomicU64,
    read_only: bool,
    layout: Layout,
    backend: Backend,
    connections: AtomicUsize,
    /// Cancelled when the volume is deleted with `--force`: sessions end.
    closed: CancellationToken,
    /// Served from a file named on the command line, not recorded in the catalog.
    ephemeral: bool,
}

/// Held by each connected session; counts connections for `volume delete` and `show`.
#[derive(Debug)]
pub struct Attachment {
    volume: Arc<Volume>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.volume.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Attachment {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

fn einval(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.to_string())
}

impl Volume {
    pub(crate) fn new(
        id: u64,
        name: String,
        size_bytes: u64,
        read_only: bool,
        layout: Layout,
        backend: Backend,
        ephemeral: bool,
    ) -> Volume {
        Volume {
            id,
            name,
            size_bytes: AtomicU64::new(size_bytes),
            read_only,
            layout,
            backend,
            connections: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            ephemeral,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }
    pub(crate) fn set_size_bytes(&self, size: u64) {
        self.size_bytes.store(size, Ordering::Release);
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn cache(&self) -> CacheMode {
        self.backend.cache()
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    pub fn ephemeral(&self) -> bool {
        self.ephemeral
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }
    pub fn allocated_bytes(&self) -> u64 {
        self.backend.allocated_bytes()
    }
    /// Whether the fast paths of a local component (`try_read`, `write_now`, `read_now`,
    /// `direct_now`, `submit_direct`) can serve this volume at all; when not, every request
    /// takes the async operations.
    pub fn has_local_fast_paths(&self) -> bool {
        self.backend.local().is_some()
    }
    /// Resolves when the volume is force-deleted.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// Registers a connected client.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        self.connections.fetch_add(1, Ordering::AcqRel);
        Attachment {
            volume: Arc::clone(self),
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(einval("range beyond the end of the volume")),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return (buf, Err(e));
        }
        self.backend.read(offset, buf).await
    }

    /// Non-blocking read attempt (page cache hit); `Err` gives the buffer back for [`read`].
    ///
    /// [`read`]: Volume::read
    pub fn try_read(&self, offset: u64, buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        match self.backend.local() {
            Some(c) if self.check(offset, buf.len() as u64).is_ok() => c.try_read(offset, buf),
            _ => Err(buf),
        }
    }

    /// Blocking write through the page cache on the calling thread (a connection thread,
    /// never an async task); not durable, so not for FUA. `Err` gives the buffer back when
    /// the request does not qualify; then use [`write`](Volume::write).
    pub fn write_now(&self, offset: u64, buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        match self.backend.local() {
            Some(c)
                if self.check_writable().is_ok()
                    && self.check(offset, buf.len() as u64).is_ok() =>
            {
                c.write_now(offset, buf)
            }
            _ => Err(buf),
        }
    }

    /// Blocking `O_DIRECT` read or write on a connection thread (never an async task), for a
    /// request with nothing else in flight. `Err` gives the buffer back when the request is
    /// not on the direct path.
    pub fn direct_now(
        &self,
        write: bool,
        offset: u64,
        buf: IoBuf,
    ) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        match self.backend.local() {
            Some(c) if self.is_direct_path(write, offset, buf.len()) => {
                c.direct_now(write, offset, buf)
            }
            _ => Err(buf),
        }
    }

    /// Blocking page-cache read on a connection thread (never an async task), for a request
    /// with nothing else in flight. `Err` gives the buffer back when it does not qualify.
    pub fn read_now(&self, offset: u64, buf: IoBuf) -> Result<(IoBuf, io::Result<()>), IoBuf> {
        match self.backend.local() {
            Some(c) if self.check(offset, buf.len() as u64).is_ok() => c.read_now(offset, buf),
            _ => Err(buf),
        }
    }

    /// Whether `submit_direct` can take this request (a local component with cache `none`,
    /// aligned, in range).
    pub fn is_direct_path(&self, write: bool, offset: u64, len: usize) -> bool {
        let writable = !write || self.check_writable().is_ok();
        writable
            && self.check(offset, len as u64).is_ok()
            && self
                .backend
                .local()
                .is_some_and(|c| c.is_direct_path(offset, len))
    }

    /// Starts an `O_DIRECT` read or write without an async task; `done` runs on the engine's
    /// thread with the buffer and the result. See `raid::Component::submit_direct`.
    pub fn submit_direct(
        &self,
        write: bool,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        done: impl FnOnce(IoBuf, io::Result<()>) + Send + 'static,
    ) {
        match self.backend.local() {
            Some(c) if self.is_direct_path(write, offset, buf.len()) => {
                c.submit_direct(write, offset, buf, fua, done)
            }
            _ => done(buf, Err(einval("not a direct-path request"))),
        }
    }

    /// Writes `buf` at `offset`; durable on return when `fua`.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> (IoBuf, io::Result<()>) {
        if let Err(e) = self
            .check_writable()
            .and_then(|()| self.check(offset, buf.len() as u64))
        {
            return (buf, Err(e));
        }
        self.backend.write(offset, buf, fua).await
    }

    /// Makes every write completed before this call durable, on every component.
    pub async fn flush(&self) -> io::Result<()> {
        self.backend.flush().await
    }

    /// Discards a range (it reads back as zeros afterwards).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        self.backend.trim(offset, len).await?;
        if fua {
            self.backend.flush().await?;
        }
        Ok(())
    }

    /// Zeroes a range. With `may_punch` the range may become a hole; with `fast_only` the call
    /// fails with `ENOTSUP` (touching nothing) rather than fall back to writing zeros.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        self.backend
            .write_zeroes(offset, len, may_punch, fast_only)
            .await?;
        if fua {
            self.backend.flush().await?;
        }
        Ok(())
    }

    /// Prefetch hint.
    pub async fn cache_hint(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        self.backend.readahead(offset, len).await
    }

    /// Allocation map of a prefix of `[offset, offset + len)`, at most `max_extents` entries.
    pub async fn extents(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        self.backend.extents(offset, len, max_extents).await
    }
}
