//! Backends: where a volume's bytes live, one per layout. A [`crate::Volume`] checks ranges
//! and permissions, then hands each operation to its backend; the gateway (the NBD session)
//! only ever talks to the volume.
//!
//! Today there is one backend, a component on this server's own device. A component on
//! another server (through the peer transport), mirrors and parity columns come as more
//! variants. The fast paths only a local component has (page-cache reads that never block,
//! writes into the page cache and `O_DIRECT` transfers on the caller's thread) are a
//! capability: [`Backend::local`] offers the component when there is one, and the volume
//! declines those paths otherwise, so the gateway falls back to the async operations.

use std::io;

use raid::{CacheMode, Component, Extent, IoBuf};

/// Largest buffer used to write zeros where the filesystem cannot zero a range in place.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) enum Backend {
    /// One component on this server's device: every byte of the volume at the same offset.
    Local(Component),
}

impl Backend {
    /// The local component, for the fast paths only it has.
    pub(crate) fn local(&self) -> Option<&Component> {
        match self {
            Backend::Local(c) => Some(c),
        }
    }

    pub(crate) fn cache(&self) -> CacheMode {
        match self {
            Backend::Local(c) => c.cache(),
        }
    }

    /// Bytes allocated on the devices (0 when it cannot be told).
    pub(crate) fn allocated_bytes(&self) -> u64 {
        match self {
            Backend::Local(c) => c.allocated_bytes().unwrap_or(0),
        }
    }

    pub(crate) async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        match self {
            Backend::Local(c) => c.read(offset, buf).await,
        }
    }

    pub(crate) async fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> (IoBuf, io::Result<()>) {
        match self {
            Backend::Local(c) => c.write(offset, buf, fua).await,
        }
    }

    pub(crate) async fn flush(&self) -> io::Result<()> {
        match self {
            Backend::Local(c) => c.flush().await,
        }
    }

    /// Discards a range; it reads back as zeros.
    pub(crate) async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::Local(c) => c.punch_hole(offset, len).await,
        }
    }

    /// Zeroes a range: as a hole with `may_punch`; with `fast_only`, `EOPNOTSUPP` (touching
    /// nothing) where the range cannot be zeroed in place.
    pub(crate) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        match self {
            Backend::Local(c) if may_punch => c.punch_hole(offset, len).await,
            Backend::Local(c) => match c.zero_range(offset, len).await {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    if fast_only {
                        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                    }
                    write_zero_buffers(c, offset, len).await
                }
                other => other,
            },
        }
    }

    pub(crate) async fn readahead(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::Local(c) => c.readahead(offset, len).await,
        }
    }

    pub(crate) async fn extents(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        match self {
            Backend::Local(c) => c.extents(offset, len, max_extents).await,
        }
    }

    /// Grows (or, to undo a failed grow, cuts back) the storage behind the volume.
    pub(crate) async fn set_len(&self, size_bytes: u64) -> io::Result<()> {
        match self {
            Backend::Local(c) => c.set_len(size_bytes).await,
        }
    }
}

async fn write_zero_buffers(c: &Component, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK_BYTES);
        let (_, res) = c
            .write(offset + done, IoBuf::zeroed(n as usize), false)
            .await;
        res?;
        done += n;
    }
    Ok(())
}
