//! A [`Disk`] on a real file: one device file holding a journal region and block slots.
//!
//! ```text
//! [0, journal_bytes / 2)                      journal half 0
//! [journal_bytes / 2, journal_bytes)          journal half 1
//! [journal_bytes + loc * block_bytes, +block) block slot `loc`
//! ```
//!
//! Writes go to the page cache (volatile, like a drive's write cache). A flush is only
//! queued: whoever drives the disk either calls [`FileDisk::complete_flushes`] (one
//! `fdatasync` makes every queued flush durable: group commit) or takes the queued tokens
//! with [`FileDisk::take_flushes`] and syncs a [`FileDisk::sync_handle`] on another thread.
//! One file means one `fdatasync` covers the blocks and the journal together.
//!
//! [`FileDisk::create`] writes the whole file once, so that later writes overwrite
//! allocated blocks and an `fdatasync` has no file-system metadata to commit.
//!
//! Records are appended to the active half; a checkpoint (see [`super::node`]) switches to
//! the other half, so the journal's space is reclaimed. An append past the end of a half
//! fails the disk (reported by the next flush), never overwrites anything else.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

use super::{Disk, Loc};

/// Size of the writes that fill a new device file: page-sized, so that the page cache holds
/// it in small folios (a 4 KiB write into a large folio walks all of its buffers).
const FILL_CHUNK: usize = 4096;

#[derive(Debug)]
pub struct FileDisk {
    file: File,
    block_bytes: usize,
    journal_bytes: u64,
    locations: u64,
    /// Active journal half, and bytes appended to it.
    active: u64,
    journal_len: u64,
    pending: Vec<u64>,
    /// First I/O error, reported by the next flush (a `Disk` call cannot fail).
    error: Option<io::Error>,
}

impl FileDisk {
    /// Creates (or truncates) the device file at `path` with a journal region of
    /// `journal_bytes` and `locations` block slots, all zero.
    pub fn create(
        path: &Path,
        block_bytes: usize,
        journal_bytes: u64,
        locations: u64,
    ) -> io::Result<FileDisk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let len = journal_bytes + locations * block_bytes as u64;
        let zeros = vec![0u8; FILL_CHUNK];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(FILL_CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        // The fill stays cached (reads of old data and old parity hit it); random 4 KiB
        // I/O wants no readahead.
        posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_RANDOM,
        )
        .map_err(io::Error::from)?;
        Ok(FileDisk {
            file,
            block_bytes,
            journal_bytes,
            locations,
            active: 0,
            journal_len: 0,
            pending: Vec::new(),
            error: None,
        })
    }

    /// Makes every queued flush durable with one `fdatasync`; returns their tokens.
    pub fn complete_flushes(&mut self) -> io::Result<Vec<u64>> {
        let tokens = self.take_flushes()?;
        if !tokens.is_empty() {
            self.file.sync_data()?;
        }
        Ok(tokens)
    }

    /// Takes the queued flush tokens: they complete when an `fdatasync` of
    /// [`FileDisk::sync_handle`] started after this call returns. Fails with the first
    /// write error since the last call.
    pub fn take_flushes(&mut self) -> io::Result<Vec<u64>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        Ok(std::mem::take(&mut self.pending))
    }

    /// Another handle on the device file, for syncing on another thread.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Tokens of the flushes queued since the last take.
    pub fn pending_flushes(&self) -> &[u64] {
        &self.pending
    }

    /// Bytes appended to the active journal half, and the size of a half.
    pub fn journal_fill(&self) -> (u64, u64) {
        (self.journal_len, self.journal_bytes / 2)
    }

    pub fn has_pending_flushes(&self) -> bool {
        !self.pending.is_empty() || self.error.is_some()
    }

    /// The journal's two halves as they are on the file (for recovery).
    pub fn journal_halves(&self) -> io::Result<Vec<Vec<u8>>> {
        read_journal(&self.file, self.journal_bytes)
    }

    fn offset(&self, loc: Loc) -> Option<u64> {
        (loc < self.locations).then(|| self.journal_bytes + loc * self.block_bytes as u64)
    }
}

/// Drops a file's pages from the page cache (large folios left by big writes go with them)
/// and turns its readahead off.
pub fn forget_cached(file: &File) -> io::Result<()> {
    for advice in [
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        PosixFadviseAdvice::POSIX_FADV_RANDOM,
    ] {
        posix_fadvise(file.as_raw_fd(), 0, 0, advice).map_err(io::Error::from)?;
    }
    Ok(())
}

/// Reads the two journal halves of a device file laid out as [`FileDisk`] lays it out.
pub fn read_journal(file: &File, journal_bytes: u64) -> io::Result<Vec<Vec<u8>>> {
    let half = journal_bytes / 2;
    (0..2)
        .map(|h| {
            let mut out = vec![0u8; half as usize];
            file.read_exact_at(&mut out, h * half)?;
            Ok(out)
        })
        .collect()
}

/// Reads block slot `loc` of a device file laid out as [`FileDisk`] lays it out.
pub fn read_block(
    file: &File,
    journal_bytes: u64,
    block_bytes: usize,
    loc: Loc,
) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; block_bytes];
    file.read_exact_at(&mut out, journal_bytes + loc * block_bytes as u64)?;
    Ok(out)
}

impl Disk for FileDisk {
    fn read(&self, loc: Loc) -> Vec<u8> {
        let mut out = vec![0u8; self.block_bytes];
        // A read error returns zeros: the caller's crc32c check refuses the block.
        if let Some(off) = self.offset(loc) {
            let _ = self.file.read_exact_at(&mut out, off);
        }
        out
    }

    fn write(&mut self, loc: Loc, data: &[u8]) {
        let result = match self.offset(loc) {
            Some(off) => self.file.write_all_at(data, off),
            None => Err(io::Error::other(format!(
                "block slot {loc} is past the device's {} slots",
                self.locations
            ))),
        };
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
    }

    fn append_journal(&mut self, bytes: &[u8]) {
        let half = self.journal_bytes / 2;
        let end = self.journal_len + bytes.len() as u64;
        let result = if end > half {
            Err(io::Error::other(format!(
                "journal half of {half} bytes is full (checkpoints are not keeping up)"
            )))
        } else {
            self.file
                .write_all_at(bytes, self.active * half + self.journal_len)
        };
        match result {
            Ok(()) => self.journal_len = end,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn switch_journal(&mut self) {
        self.active ^= 1;
        self.journal_len = 0;
    }

    fn flush(&mut self, token: u64) {
        self.pending.push(token);
    }
}
