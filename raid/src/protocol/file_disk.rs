//! A [`Disk`] on real files: block slots in one file and the journal in another.
//!
//! Writes go to the page cache (volatile, like a drive's write cache); a flush is queued and
//! [`FileDisk::complete_flushes`] makes every queued flush durable with one `fdatasync` of
//! each file (group commit), returning their tokens. This is the step between the
//! simulator and the io_uring engine: the same node state machines run on it unchanged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Disk, Loc};

#[derive(Debug)]
pub struct FileDisk {
    blocks: File,
    journal: File,
    block_bytes: usize,
    journal_len: u64,
    pending: Vec<u64>,
    /// First I/O error, reported by `complete_flushes` (a `Disk` call cannot fail).
    error: Option<io::Error>,
}

impl FileDisk {
    /// Creates (or truncates) `dir/blocks` and `dir/journal`.
    pub fn create(dir: &Path, block_bytes: usize) -> io::Result<FileDisk> {
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))
        };
        Ok(FileDisk {
            blocks: open("blocks")?,
            journal: open("journal")?,
            block_bytes,
            journal_len: 0,
            pending: Vec::new(),
            error: None,
        })
    }

    /// Makes every queued flush durable; returns their tokens.
    pub fn complete_flushes(&mut self) -> io::Result<Vec<u64>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.blocks.sync_data()?;
        self.journal.sync_data()?;
        Ok(std::mem::take(&mut self.pending))
    }

    pub fn has_pending_flushes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The journal's bytes as they are on disk (for recovery).
    pub fn journal_bytes(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.journal_len as usize];
        self.journal.read_exact_at(&mut out, 0)?;
        Ok(out)
    }

    fn offset(&self, loc: Loc) -> u64 {
        loc * self.block_bytes as u64
    }
}

impl Disk for FileDisk {
    fn read(&self, loc: Loc) -> Vec<u8> {
        let mut out = vec![0u8; self.block_bytes];
        // Past the end of the file a block reads as zeros (a never-written slot).
        let mut done = 0;
        while done < out.len() {
            match self
                .blocks
                .read_at(&mut out[done..], self.offset(loc) + done as u64)
            {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        out
    }

    fn write(&mut self, loc: Loc, data: &[u8]) {
        if let Err(e) = self.blocks.write_all_at(data, self.offset(loc)) {
            self.error.get_or_insert(e);
        }
    }

    fn append_journal(&mut self, bytes: &[u8]) {
        match self.journal.write_all_at(bytes, self.journal_len) {
            Ok(()) => self.journal_len += bytes.len() as u64,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn flush(&mut self, token: u64) {
        self.pending.push(token);
    }
}
