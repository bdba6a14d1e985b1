//! Non-blocking fast path: `preadv2`/`pwritev2` with `RWF_NOWAIT`.
//!
//! A read whose pages are all in the page cache completes in one syscall on the caller's
//! thread, with no hand-off to the ring thread and back; anything that would block (a cache
//! miss, a lock held by writeback) returns `EAGAIN` at once, and the caller sends the request
//! to the engine instead. This is the same "try non-blocking first, punt if it would block"
//! that io_uring applies internally. The buffer is borrowed only for the syscall's duration.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The result of a non-blocking attempt.
#[derive(Debug)]
pub enum Attempt {
    /// Transferred this many bytes (possibly fewer than asked).
    Done(usize),
    /// Would block: use the engine.
    WouldBlock,
    /// The file or kernel cannot do non-blocking I/O of this kind at all.
    Unsupported,
    Failed(io::Error),
}

fn classify(ret: isize) -> Attempt {
    if ret >= 0 {
        return Attempt::Done(ret as usize);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Attempt::WouldBlock,
        Some(libc::EOPNOTSUPP) => Attempt::Unsupported,
        Some(libc::EINTR) => Attempt::WouldBlock,
        _ => Attempt::Failed(e),
    }
}

fn offset_of(offset: u64) -> Option<libc::off_t> {
    libc::off_t::try_from(offset).ok()
}

/// `preadv2(RWF_NOWAIT)` into `buf` at `offset`.
pub fn read(file: &File, offset: u64, buf: &mut [u8]) -> Attempt {
    let Some(off) = offset_of(offset) else {
        return Attempt::Failed(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid and exclusively borrowed for the call;
    // the kernel writes at most `buf.len()` bytes into it and keeps no reference afterwards.
    let ret = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    classify(ret)
}
