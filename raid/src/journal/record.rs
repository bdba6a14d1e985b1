//! Journal records: framing, encoding, and replay.
//!
//! Every record is a 32-byte little-endian header followed by its body:
//!
//! ```text
//! offset size field
//! 0      4    magic 0x4e524a42 ("BJRN")
//! 4      2    format version = 2
//! 6      2    kind (see `Kind`)
//! 8      8    journal sequence number (strictly increasing within a journal)
//! 16     4    body length in bytes
//! 20     4    crc32c of the body
//! 24     4    crc32c of the header with this field zeroed
//! 28     4    reserved, zero
//! ```
//!
//! The header is checked (magic, version, header crc, reserved, known kind, body length
//! within [`BODY_MAX_BYTES`], a sequence number below `u64::MAX`) before the body is read;
//! then the body crc. Replay stops at the first record that fails any check, or whose
//! sequence number does not follow the previous one: that is the torn tail of an interrupted
//! append, or a stale record left from before the journal was rewritten, and everything from
//! there on is discarded.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const MAGIC: u32 = 0x4e52_4a42;
/// Version 2: marks carry the crc32c of the block they harden.
pub const VERSION: u16 = 2;
pub const HEADER_BYTES: usize = 32;
/// Largest body: a proxy copy of a block of up to 1 MiB and its intent; every other body is
/// a small fixed struct.
pub const BODY_MAX_BYTES: usize = (1 << 20) + 64;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
struct Header {
    magic: U32,
    version: U16,
    kind: U16,
    seq: U64,
    body_len: U32,
    body_crc: U32,
    header_crc: U32,
    reserved: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);

/// An update's intent, journalled before anything points at the new location. As `mj` (data
/// node): block `column` of `stripe` gets new data at `new_loc`, `new_crc` its crc32c. As `pj`
/// (parity node): the full new parity (never a delta, so replay cannot apply anything twice)
/// goes to `new_loc`, for the update of data `column`. Either way the old version stays at
/// `old_loc` until both sides have hardened.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq,
)]
pub struct Intent {
    pub write_id: U64,
    pub stripe: U64,
    pub stripe_seq: U64,
    pub new_loc: U64,
    pub old_loc: U64,
    pub column: U32,
    pub new_crc: U32,
}

/// Names one update of one stripe (hardened marks, completions).
///
/// A hardened mark is appended in the same flush as the block it hardens and carries that
/// block's crc32c: it counts at recovery only if the block at the update's new location
/// matches, so the mark needs no flush of its own. Completions carry zero.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq,
)]
pub struct Mark {
    pub write_id: U64,
    pub stripe: U64,
    pub stripe_seq: U64,
    pub crc: U32,
    pub reserved: U32,
}

/// A location returned to the free pool.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq,
)]
pub struct Free {
    pub loc: U64,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Mj(Intent),
    Pj(Intent),
    /// This (data) side's new data and `mj` are durable once this record is, provided the
    /// new location's crc32c is the mark's.
    DataHardened(Mark),
    /// The same for the parity side's new parity and `pj`.
    ParityHardened(Mark),
    /// The other side's hardened message arrived (both sides are now hardened).
    PeerHardened(Mark),
    Free(Free),
    MjComplete(Mark),
    PjComplete(Mark),
    /// A parity proxy's copy of an update whose parity node did not answer: block `column`
    /// of `stripe` is the bytes that follow (`new_crc` is their crc32c; no locations). The
    /// stripe's parity is stale until it is repaired; this record is its mark.
    Proxy(Intent, Vec<u8>),
    /// An encoded [`Checkpoint`]: the first record of a journal half.
    Checkpoint(Vec<u8>),
    /// Ends a checkpoint: the records between it and the checkpoint (the updates in
    /// progress, journalled again) are all there. A half whose checkpoint has no end is not
    /// replayed.
    CheckpointEnd(Seal),
}

/// Names the checkpoint (by its record's sequence number) that a `CheckpointEnd` ends.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq,
)]
pub struct Seal {
    pub checkpoint_seq: U64,
}

/// A node's resolved state, written as the first record of a journal half: replay of that
/// half starts from it instead of from the initial layout, so the other half (and every
/// record of a completed update in it) can be overwritten.
///
/// Encoding (little-endian): three u64 counts (map, done, repair), then the map entries
/// (u64 location, u32 crc32c), the done entries (u64 stripe, u32 column, u64 sequence), and
/// the repair stripes (u64).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Per stripe, the location and crc32c of this node's column (as of completed updates).
    pub map: Vec<(u64, u32)>,
    /// Per (stripe, column), the stripe sequence of the last update completed here: every
    /// update of that column at or below it went forward (both sides hardened).
    pub done: Vec<(u64, u32, u64)>,
    /// Stripes marked for repair (their parity missed an update that went to a proxy).
    pub repair: Vec<u64>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.map.len() * 12 + self.done.len() * 20);
        for n in [self.map.len(), self.done.len(), self.repair.len()] {
            b.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for (loc, crc) in &self.map {
            b.extend_from_slice(&loc.to_le_bytes());
            b.extend_from_slice(&crc.to_le_bytes());
        }
        for (stripe, column, seq) in &self.done {
            b.extend_from_slice(&stripe.to_le_bytes());
            b.extend_from_slice(&column.to_le_bytes());
            b.extend_from_slice(&seq.to_le_bytes());
        }
        for stripe in &self.repair {
            b.extend_from_slice(&stripe.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        let u64_of = |s: &[u8]| s.try_into().ok().map(u64::from_le_bytes);
        let u32_of = |s: &[u8]| s.try_into().ok().map(u32::from_le_bytes);
        let (maps, dones, repairs) = (
            u64_of(take(8)?)? as usize,
            u64_of(take(8)?)? as usize,
            u64_of(take(8)?)? as usize,
        );
        let need = maps
            .checked_mul(12)?
            .checked_add(dones.checked_mul(20)?)?
            .checked_add(repairs.checked_mul(8)?)?
            .checked_add(24)?;
        if need != b.len() {
            return None;
        }
        let mut c = Checkpoint::default();
        for _ in 0..maps {
            c.map.push((u64_of(take(8)?)?, u32_of(take(4)?)?));
        }
        for _ in 0..dones {
            c.done
                .push((u64_of(take(8)?)?, u32_of(take(4)?)?, u64_of(take(8)?)?));
        }
        for _ in 0..repairs {
            c.repair.push(u64_of(take(8)?)?);
        }
        Some(c)
    }
}

impl Body {
    fn kind(&self) -> u16 {
        match self {
            Body::Mj(_) => 1,
            Body::Pj(_) => 2,
            Body::DataHardened(_) => 3,
            Body::ParityHardened(_) => 4,
            Body::PeerHardened(_) => 5,
            Body::Free(_) => 6,
            Body::MjComplete(_) => 7,
            Body::PjComplete(_) => 8,
            Body::Proxy(..) => 9,
            Body::Checkpoint(_) => 10,
            Body::CheckpointEnd(_) => 11,
        }
    }

    /// The body's bytes: a fixed part and a variable tail (empty but for proxy copies).
    fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            Body::Mj(b) | Body::Pj(b) => (b.as_bytes(), &[]),
            Body::DataHardened(b) | Body::ParityHardened(b) | Body::PeerHardened(b) => {
                (b.as_bytes(), &[])
            }
            Body::MjComplete(b) | Body::PjComplete(b) => (b.as_bytes(), &[]),
            Body::Free(b) => (b.as_bytes(), &[]),
            Body::Proxy(i, data) => (i.as_bytes(), data),
            Body::Checkpoint(b) => (b, &[]),
            Body::CheckpointEnd(b) => (b.as_bytes(), &[]),
        }
    }

    fn decode(kind: u16, body: &[u8]) -> Option<Body> {
        Some(match kind {
            1 => Body::Mj(Intent::read_from_bytes(body).ok()?),
            2 => Body::Pj(Intent::read_from_bytes(body).ok()?),
            3 => Body::DataHardened(Mark::read_from_bytes(body).ok()?),
            4 => Body::ParityHardened(Mark::read_from_bytes(body).ok()?),
            5 => Body::PeerHardened(Mark::read_from_bytes(body).ok()?),
            6 => Body::Free(Free::read_from_bytes(body).ok()?),
            7 => Body::MjComplete(Mark::read_from_bytes(body).ok()?),
            8 => Body::PjComplete(Mark::read_from_bytes(body).ok()?),
            9 => {
                let (head, data) = body.split_at_checked(std::mem::size_of::<Intent>())?;
                let intent = Intent::read_from_bytes(head).ok()?;
                if crc32c::crc32c(data) != intent.new_crc.get() {
                    return None;
                }
                Body::Proxy(intent, data.to_vec())
            }
            10 => {
                Checkpoint::decode(body)?;
                Body::Checkpoint(body.to_vec())
            }
            11 => Body::CheckpointEnd(Seal::read_from_bytes(body).ok()?),
            _ => return None,
        })
    }
}

/// A record with its journal sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub body: Body,
}

fn header_crc(h: &Header) -> u32 {
    let mut copy = *h;
    copy.header_crc = U32::new(0);
    crc32c::crc32c(copy.as_bytes())
}

/// Appends the encoded record to `out`.
pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let (fixed, tail) = rec.body.parts();
    let mut h = Header {
        magic: U32::new(MAGIC),
        version: U16::new(VERSION),
        kind: U16::new(rec.body.kind()),
        seq: U64::new(rec.seq),
        body_len: U32::new((fixed.len() + tail.len()) as u32),
        body_crc: U32::new(crc32c::crc32c_append(crc32c::crc32c(fixed), tail)),
        header_crc: U32::new(0),
        reserved: [0; 4],
    };
    h.header_crc = U32::new(header_crc(&h));
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(fixed);
    out.extend_from_slice(tail);
}

/// Why replay stopped before the end of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    ShortHeader,
    BadMagic,
    BadHeaderCrc,
    BadHeader,
    ShortBody,
    BadBodyCrc,
    /// Sequence number not following the previous record's: a stale record.
    Stale {
        expected: u64,
        found: u64,
    },
}

/// The records recovered from a journal's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub records: Vec<Record>,
    /// Bytes covered by valid records; the journal continues from here.
    pub valid_len: usize,
    /// Set when bytes after `valid_len` were discarded, and why.
    pub discarded: Option<Tail>,
}

/// Decodes every valid record from the start of `bytes`, stopping at a torn or stale tail.
/// `first_seq` is the sequence number the first record must carry (`None`: any).
pub fn replay(bytes: &[u8], first_seq: Option<u64>) -> Replay {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut expected = first_seq;
    let stop = |records, at, tail| Replay {
        records,
        valid_len: at,
        discarded: Some(tail),
    };
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + HEADER_BYTES) else {
            return stop(records, at, Tail::ShortHeader);
        };
        let Ok(h) = Header::read_from_bytes(head) else {
            return stop(records, at, Tail::ShortHeader);
        };
        if h.magic.get() != MAGIC {
            return stop(records, at, Tail::BadMagic);
        }
        if h.header_crc.get() != header_crc(&h) {
            return stop(records, at, Tail::BadHeaderCrc);
        }
        let len = h.body_len.get() as usize;
        // A record at u64::MAX would leave the next one no sequence number: no journal gets
        // there (appends count up from 0), so only a forged record can carry it.
        if h.version.get() != VERSION
            || h.reserved != [0; 4]
            || len > BODY_MAX_BYTES
            || h.seq.get() == u64::MAX
        {
            return stop(records, at, Tail::BadHeader);
        }
        let Some(body) = bytes.get(at + HEADER_BYTES..at + HEADER_BYTES + len) else {
            return stop(records, at, Tail::ShortBody);
        };
        if crc32c::crc32c(body) != h.body_crc.get() {
            return stop(records, at, Tail::BadBodyCrc);
        }
        let Some(decoded) = Body::decode(h.kind.get(), body) else {
            return stop(records, at, Tail::BadHeader);
        };
        let seq = h.seq.get();
        if let Some(want) = expected {
            if seq != want {
                return stop(
                    records,
                    at,
                    Tail::Stale {
                        expected: want,
                        found: seq,
                    },
                );
            }
        }
        expected = Some(seq + 1);
        records.push(Record { seq, body: decoded });
        at += HEADER_BYTES + len;
    }
    Replay {
        records,
        valid_len: at,
        discarded: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(n: u64) -> Mark {
        Mark {
            write_id: U64::new(n),
            stripe: U64::new(n % 7),
            stripe_seq: U64::new(n),
            crc: U32::new(n as u32),
            reserved: U32::new(0),
        }
    }

    fn sample(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                seq: 100 + i,
                body: match i % 5 {
                    0 => Body::Mj(Intent {
                        write_id: U64::new(i),
                        stripe: U64::new(3),
                        stripe_seq: U64::new(i),
                        new_loc: U64::new(9),
                        old_loc: U64::new(8),
                        column: U32::new(1),
                        new_crc: U32::new(0xdead),
                    }),
                    1 => Body::DataHardened(mark(i)),
                    2 => Body::Free(Free { loc: U64::new(i) }),
                    3 => {
                        let data = vec![i as u8; 64];
                        Body::Proxy(
                            Intent {
                                write_id: U64::new(i),
                                stripe: U64::new(2),
                                stripe_seq: U64::new(i),
                                new_loc: U64::new(0),
                                old_loc: U64::new(0),
                                column: U32::new(0),
                                new_crc: U32::new(crc32c::crc32c(&data)),
                            },
                            data,
                        )
                    }
                    _ => Body::MjComplete(mark(i)),
                },
            })
            .collect()
    }

    fn encode_all(recs: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in recs {
            encode(r, &mut out);
        }
        out
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_bad_lengths() {
        let c = Checkpoint {
            map: vec![(1, 2), (3, 4)],
            done: vec![(5, 1, 9)],
            repair: vec![7],
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Some(c));
        assert_eq!(Checkpoint::decode(&b[..b.len() - 1]), None);
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Checkpoint::decode(&long), None);
    }

    #[test]
    fn checkpoint_counts_whose_sizes_overflow_when_added_are_refused() {
        // Each count times its entry size fits in a usize; their sum does not.
        let mut b = Vec::new();
        for n in [usize::MAX / 12, usize::MAX / 20, 0] {
            b.extend_from_slice(&(n as u64).to_le_bytes());
        }
        assert_eq!(Checkpoint::decode(&b), None);
    }

    #[test]
    fn round_trip() {
        let recs = sample(9);
        let bytes = encode_all(&recs);
        let r = replay(&bytes, Some(100));
        assert_eq!(r.records, recs);
        assert_eq!(r.valid_len, bytes.len());
        assert_eq!(r.discarded, None);
    }

    #[test]
    fn every_truncation_keeps_exactly_the_whole_records() {
        let recs = sample(6);
        let bytes = encode_all(&recs);
        let mut ends = vec![0];
        for r in &recs {
            let mut one = Vec::new();
            encode(r, &mut one);
            ends.push(ends.last().copied().unwrap_or(0) + one.len());
        }
        for cut in 0..bytes.len() {
            let r = replay(&bytes[..cut], Some(100));
            let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
            assert_eq!(r.records.len(), whole, "cut at {cut}");
            assert_eq!(r.valid_len, ends[whole]);
        }
    }

    #[test]
    fn every_bit_flip_ends_replay_at_or_before_the_flipped_record() {
        let recs = sample(5);
        let bytes = encode_all(&recs);
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                let r = replay(&bad, Some(100));
                assert!(
                    r.valid_len <= i,
                    "flip at byte {i} accepted a corrupt record"
                );
                assert!(r.discarded.is_some());
                assert_eq!(r.records[..], recs[..r.records.len()]);
            }
        }
    }

    #[test]
    fn a_record_with_the_last_sequence_number_is_refused() {
        let mut bytes = encode_all(&sample(1));
        let good = bytes.len();
        encode(
            &Record {
                seq: u64::MAX,
                body: Body::Free(Free { loc: U64::new(1) }),
            },
            &mut bytes,
        );
        for first_seq in [None, Some(u64::MAX)] {
            let r = replay(&bytes[good..], first_seq);
            assert_eq!((r.records.len(), r.valid_len), (0, 0));
            assert_eq!(r.discarded, Some(Tail::BadHeader));
        }
        let r = replay(&bytes, Some(100));
        assert_eq!((r.records.len(), r.valid_len), (1, good));
    }

    #[test]
    fn a_stale_record_after_the_live_ones_is_discarded() {
        let mut recs = sample(3);
        recs.push(Record {
            seq: 50,
            body: Body::Free(Free { loc: U64::new(1) }),
        });
        let r = replay(&encode_all(&recs), Some(100));
        assert_eq!(r.records.len(), 3);
        assert_eq!(
            r.discarded,
            Some(Tail::Stale {
                expected: 103,
                found: 50
            })
        );
    }
}
