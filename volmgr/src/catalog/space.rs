//! Test seam: a simulated filesystem with a fixed amount of free space, so the full-disk
//! paths (a catalog write that needs the reserve, a delete on a 100%-full filesystem) are
//! tested deterministically without mounting anything. The local store asks it before each
//! write that allocates and tells it about each removal.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct SimSpace {
    free_bytes: AtomicU64,
}

impl SimSpace {
    pub(crate) fn new(free_bytes: u64) -> SimSpace {
        SimSpace {
            free_bytes: AtomicU64::new(free_bytes),
        }
    }

    pub(crate) fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn set_free(&self, bytes: u64) {
        self.free_bytes.store(bytes, Ordering::Release);
    }

    /// Allocates `bytes`, or fails with `ENOSPC` (taking nothing) when there is not room.
    pub(crate) fn take(&self, bytes: u64) -> io::Result<()> {
        self.free_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(bytes)
            })
            .map(|_| ())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))
    }

    pub(crate) fn give(&self, bytes: u64) {
        self.free_bytes.fetch_add(bytes, Ordering::AcqRel);
    }
}
