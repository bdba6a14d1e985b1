//! The per-device journal: append-only records with group commit, replay, and reclaim.
//!
//! - [`record`]: the on-disk framing (magic, kind, sequence, length, crc32c of header and
//!   body) and replay, which discards a torn or stale tail.
//! - [`FileJournal`]: a journal in one file. [`FileJournal::append`] buffers a record and
//!   returns its sequence number; [`FileJournal::commit`] makes every record up to a sequence
//!   durable. Committers share flushes: the first one to find no flush running writes
//!   everything buffered so far and calls `fdatasync` once; the others wait for it (group
//!   commit). The journal's live size is bounded: an append that would pass the bound waits
//!   (back-pressure, never failure) until [`FileJournal::compact`] has rewritten the journal
//!   without the records the caller no longer needs (those of completed updates).

pub mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

pub use record::{Body, Free, Intent, Mark, Record, Replay, Tail};

#[derive(Debug)]
struct State {
    /// Encoded records not yet written to the file.
    pending: Vec<u8>,
    /// Sequence number the next append gets.
    next_seq: u64,
    /// Highest sequence number written and synced.
    durable_seq: Option<u64>,
    /// Bytes in the file (durable or being written).
    file_len: u64,
    /// A committer is writing and syncing (others wait for it).
    syncing: bool,
    /// First sequence number in the file (records before it were compacted away).
    first_seq: u64,
}

/// A journal in one file.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    file: Mutex<File>,
    state: Mutex<State>,
    cv: Condvar,
    max_bytes: u64,
}

impl FileJournal {
    /// Opens (creating if missing) the journal at `path`, replays it, truncates any torn
    /// tail, and returns the journal with the records found. `max_bytes` bounds its size.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<(FileJournal, Replay)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let bytes = fs::read(path)?;
        let replayed = record::replay(&bytes, None);
        if replayed.discarded.is_some() {
            file.set_len(replayed.valid_len as u64)?;
            file.sync_data()?;
        }
        let first_seq = replayed.records.first().map_or(0, |r| r.seq);
        let next_seq = replayed.records.last().map_or(first_seq, |r| r.seq + 1);
        let journal = FileJournal {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            state: Mutex::new(State {
                pending: Vec::new(),
                next_seq,
                durable_seq: next_seq.checked_sub(1),
                file_len: replayed.valid_len as u64,
                syncing: false,
                first_seq,
            }),
            cv: Condvar::new(),
            max_bytes,
        };
        Ok((journal, replayed))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Buffers a record; returns its sequence number. Blocks while the journal is full.
    pub fn append(&self, body: Body) -> u64 {
        let mut st = self.state();
        while st.file_len + st.pending.len() as u64 >= self.max_bytes {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        record::encode(&Record { seq, body }, &mut st.pending);
        seq
    }

    /// Returns once every record up to `seq` is durable.
    pub fn commit(&self, seq: u64) -> io::Result<()> {
        let mut st = self.state();
        loop {
            if st.durable_seq.is_some_and(|d| d >= seq) {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Leader: write and sync everything buffered so far.
        st.syncing = true;
        let batch = std::mem::take(&mut st.pending);
        let at = st.file_len;
        let last = st.next_seq.checked_sub(1);
        st.file_len += batch.len() as u64;
        drop(st);
        let result = {
            let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            file.write_all_at(&batch, at)
                .and_then(|()| file.sync_data())
        };
        let mut st = self.state();
        st.syncing = false;
        match &result {
            Ok(()) => st.durable_seq = last,
            Err(_) => st.file_len = at,
        }
        drop(st);
        self.cv.notify_all();
        result
    }

    /// Bytes in use (file plus buffered).
    pub fn len_bytes(&self) -> u64 {
        let st = self.state();
        st.file_len + st.pending.len() as u64
    }

    /// Rewrites the journal keeping only the records `keep` selects (renumbered in order),
    /// atomically (write temp, fsync, rename, fsync dir). Call with no appends in flight.
    pub fn compact(&self, keep: impl Fn(&Record) -> bool) -> io::Result<()> {
        let mut st = self.state();
        while st.syncing {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = fs::read(&self.path)?;
        bytes.extend_from_slice(&st.pending);
        let replayed = record::replay(&bytes, Some(st.first_seq));
        let first = st.next_seq;
        let mut out = Vec::new();
        let mut seq = first;
        for r in replayed.records.iter().filter(|r| keep(r)) {
            record::encode(
                &Record {
                    seq,
                    body: r.body.clone(),
                },
                &mut out,
            );
            seq += 1;
        }
        let tmp = self.path.with_extension("compact");
        {
            let mut t = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            t.write_all(&out)?;
            t.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        *file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        st.pending.clear();
        st.first_seq = first;
        st.next_seq = seq;
        st.durable_seq = seq.checked_sub(1);
        st.file_len = out.len() as u64;
        drop(st);
        self.cv.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use zerocopy::little_endian::U64;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("raid-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn free(n: u64) -> Body {
        Body::Free(Free { loc: U64::new(n) })
    }

    #[test]
    fn commit_makes_records_survive_reopen_and_torn_tail_is_cut() {
        let d = dir("reopen");
        let path = d.join("j");
        let (j, r) = FileJournal::open(&path, 1 << 20).unwrap();
        assert!(r.records.is_empty());
        let mut last = 0;
        for i in 0..10 {
            last = j.append(free(i));
        }
        j.commit(last).unwrap();
        let uncommitted = j.append(free(99));
        drop(j);
        // A torn append: half a record at the end of the file.
        let mut bytes = fs::read(&path).unwrap();
        let mut one = Vec::new();
        record::encode(
            &Record {
                seq: uncommitted,
                body: free(99),
            },
            &mut one,
        );
        bytes.extend_from_slice(&one[..one.len() - 3]); // header whole, body torn
        fs::write(&path, &bytes).unwrap();
        let (j, r) = FileJournal::open(&path, 1 << 20).unwrap();
        assert_eq!(r.records.len(), 10);
        assert_eq!(r.discarded, Some(Tail::ShortBody));
        assert_eq!(fs::metadata(&path).unwrap().len(), r.valid_len as u64);
        let next = j.append(free(7));
        assert_eq!(next, 10, "sequence continues after the last valid record");
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn group_commit_shares_flushes_between_threads() {
        let d = dir("group");
        let (j, _) = FileJournal::open(&d.join("j"), 1 << 24).unwrap();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let seq = j.append(free(t * 1000 + i));
                        j.commit(seq).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (_, r) = FileJournal::open(&d.join("j"), 1 << 24).unwrap();
        assert_eq!(r.records.len(), 400);
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn full_journal_applies_back_pressure_until_compacted() {
        let d = dir("full");
        let (j, _) = FileJournal::open(&d.join("j"), 40 * 20).unwrap();
        let j = Arc::new(j);
        let mut last = 0;
        while j.len_bytes() < 40 * 20 {
            last = j.append(free(1));
        }
        j.commit(last).unwrap();
        let j2 = Arc::clone(&j);
        let blocked = std::thread::spawn(move || j2.append(free(2)));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !blocked.is_finished(),
            "append into a full journal must wait, not fail"
        );
        j.compact(|_| false).unwrap();
        let seq = blocked.join().unwrap();
        j.commit(seq).unwrap();
        let (_, r) = FileJournal::open(&d.join("j"), 1 << 20).unwrap();
        assert_eq!(r.records.len(), 1);
        fs::remove_dir_all(d).ok();
    }
}
