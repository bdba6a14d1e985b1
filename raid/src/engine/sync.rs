//! The pread/pwrite engine: every operation runs on tokio's blocking pool.
//!
//! Slower than io_uring (a thread hand-off per operation) but available everywhere; it is the
//! reference the differential test compares the io_uring engine against.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::FallocateFlags;

use super::{Completion, Op, OpKind};

pub(super) async fn run(op: Op) -> Completion {
    match tokio::task::spawn_blocking(move || run_blocking(op)).await {
        Ok(done) => done,
        // The closure does not panic on any input; a JoinError means the runtime is shutting
        // down. The buffer went with the task, so report an error without it.
        Err(e) => Completion {
            buf: None,
            result: Err(io::Error::other(format!("blocking I/O task failed: {e}"))),
        },
    }
}

pub(super) fn run_blocking(mut op: Op) -> Completion {
    let result = match op.kind {
        OpKind::Read {
            offset,
            buf_start,
            len,
        } => match op.buf.as_mut() {
            Some(buf) => slice_mut(buf.as_mut_slice(), buf_start, len)
                .and_then(|dst| op.file.read_at(dst, offset)),
            None => Err(missing_buffer()),
        },
        OpKind::Write {
            offset,
            buf_start,
            len,
            dsync,
        } => match op.buf.as_ref() {
            Some(buf) => slice(buf.as_slice(), buf_start, len)
                .and_then(|src| op.file.write_at(src, offset))
                .and_then(|n| {
                    if dsync {
                        op.file.sync_data()?;
                    }
                    Ok(n)
                }),
            None => Err(missing_buffer()),
        },
        OpKind::Fdatasync => op.file.sync_data().map(|()| 0),
        OpKind::Fallocate { offset, len, mode } => fallocate(&op, offset, len, mode),
    };
    Completion {
        buf: op.buf,
        result,
    }
}

fn fallocate(op: &Op, offset: u64, len: u64, mode: i32) -> io::Result<usize> {
    let flags = FallocateFlags::from_bits_truncate(mode);
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    nix::fcntl::fallocate(op.file.as_raw_fd(), flags, offset, len)
        .map(|()| 0)
        .map_err(io::Error::from)
}

fn slice(buf: &[u8], start: usize, len: usize) -> io::Result<&[u8]> {
    start
        .checked_add(len)
        .and_then(|end| buf.get(start..end))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

fn slice_mut(buf: &mut [u8], start: usize, len: usize) -> io::Result<&mut [u8]> {
    start
        .checked_add(len)
        .and_then(|end| buf.get_mut(start..end))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

fn missing_buffer() -> io::Error {
    io::Error::other("data operation submitted without a buffer")
}
