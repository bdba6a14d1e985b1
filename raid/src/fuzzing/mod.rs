//! Fuzzing harnesses for raid's decoders of outside bytes, and the seeded mutator that runs
//! every harness of the workspace in the unit tests. Not part of the API (hidden from the
//! docs): the cargo-fuzz targets in `fuzz/` and the seeded unit tests call the same code, so
//! a crash found by one reproduces in the other.
//!
//! A harness takes any bytes and panics only when a property fails; a decoder that refuses
//! the input is a pass. The first input byte is a mode: bit 0 chooses between decoding the
//! rest as it is and *signing* it first (filling in the crc32c fields, so that mutations
//! reach the body decoders instead of stopping at a checksum).
//!
//! - [`journal`]: [`record::replay`] and [`Checkpoint::decode`](record::Checkpoint::decode).
//!   Properties: the records re-encode to exactly the bytes replay accepted, their sequence
//!   numbers follow each other, and replaying the accepted prefix gives the same records with
//!   nothing discarded.
//! - [`peer_frames`]: [`wire::read`] over a stream of frames. Properties: each frame
//!   re-encodes to exactly the bytes it was read from, and sequence numbers increase.
//!
//! [`run_seeded`] feeds a harness random inputs and mutations of valid encodings from a
//! seeded generator; the seed comes from `BLOCKD_FUZZ_SEED` when set and is printed, with
//! the failing input, when a harness panics.

mod seeded;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use zerocopy::little_endian::{U32, U64};

use crate::journal::record::{self, Body, Checkpoint, Free, Intent, Mark, Record};
use crate::protocol::{wire, Msg};

pub use seeded::{mutate, run_seeded, seed_from_env, SeededRng};

/// The cluster id the peer-frame harness reads with.
pub const CLUSTER: u64 = 0xb10c_d000_f022;
/// The sequence number the seed journals start at (and replay expects in mode bit 1).
pub const JOURNAL_FIRST_SEQ: u64 = 100;

/// Runs a future that never waits (its I/O is on in-memory buffers) to completion.
///
/// Panics if it returns `Pending`: a harness must not depend on a runtime.
pub fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a harness future waited on in-memory I/O"),
    }
}

/// Fills in the crc32c fields of each frame in `bytes`, in place: frames are a `header_bytes`
/// header holding the body length (LE u32) at `len_at`, the body crc at `len_at + 4` and
/// the header crc at `len_at + 8`, then the body. A body cut short by the end is signed as
/// it is.
fn sign_frames(bytes: &mut [u8], header_bytes: usize, len_at: usize) {
    let mut at = 0usize;
    while let Some(end) = at.checked_add(header_bytes).filter(|&e| e <= bytes.len()) {
        let field = |off: usize| at + len_at + off..at + len_at + off + 4;
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[field(0)]);
        let body_end = end.saturating_add(u32::from_le_bytes(len) as usize);
        let body_end = body_end.min(bytes.len());
        let body_crc = crc32c::crc32c(&bytes[end..body_end]);
        bytes[field(4)].copy_from_slice(&body_crc.to_le_bytes());
        bytes[field(8)].fill(0);
        let header_crc = crc32c::crc32c(&bytes[at..end]);
        bytes[field(8)].copy_from_slice(&header_crc.to_le_bytes());
        at = body_end;
    }
}

/// The bytes a harness decodes: the input after the mode byte, signed if the mode says so.
fn payload(mode: u8, rest: &[u8], header_bytes: usize, len_at: usize) -> Vec<u8> {
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 {
        sign_frames(&mut bytes, header_bytes, len_at);
    }
    bytes
}

/// Journal harness. Mode bit 0: sign; bit 1: replay expects [`JOURNAL_FIRST_SEQ`] first;
/// bit 2: also decode the bytes as a bare checkpoint.
pub fn journal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 4 != 0 {
        if let Some(c) = Checkpoint::decode(rest) {
            assert_eq!(
                c.encode(),
                rest,
                "checkpoint does not re-encode to its bytes"
            );
        }
    }
    let bytes = payload(mode, rest, record::HEADER_BYTES, 16);
    let first_seq = (mode & 2 != 0).then_some(JOURNAL_FIRST_SEQ);
    let r = record::replay(&bytes, first_seq);
    assert!(r.valid_len <= bytes.len());
    assert_eq!(r.discarded.is_none(), r.valid_len == bytes.len());
    let mut again = Vec::with_capacity(r.valid_len);
    for (i, rec) in r.records.iter().enumerate() {
        let want = match i {
            0 => first_seq,
            _ => r.records[i - 1].seq.checked_add(1),
        };
        if let Some(want) = want {
            assert_eq!(rec.seq, want, "record {i} out of sequence");
        }
        if let Body::Checkpoint(b) = &rec.body {
            let c = Checkpoint::decode(b);
            assert_eq!(c.map(|c| c.encode()).as_deref(), Some(&b[..]));
        }
        record::encode(rec, &mut again);
    }
    assert!(
        again == bytes[..r.valid_len],
        "records do not re-encode to the bytes replay accepted"
    );
    let prefix = record::replay(&bytes[..r.valid_len], first_seq);
    assert_eq!(prefix.records, r.records);
    assert_eq!(prefix.discarded, None);
}

/// Peer frame harness. Mode bit 0: sign; bit 1: the connection has seen sequence 0 already.
pub fn peer_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = payload(mode, rest, wire::HEADER_BYTES, 24);
    let mut last = (mode & 2 != 0).then_some(0u64);
    let mut stream = &bytes[..];
    while !stream.is_empty() {
        let before = stream;
        let Ok((seq, msg)) = ready(wire::read(&mut stream, CLUSTER, last)) else {
            return;
        };
        assert!(
            last.is_none_or(|l| seq > l),
            "sequence {seq} after {last:?}"
        );
        let used = &before[..before.len() - stream.len()];
        let again = wire::encode(&msg, CLUSTER, seq);
        assert!(
            again.as_deref().ok() == Some(used),
            "frame does not re-encode to its bytes"
        );
        last = Some(seq);
    }
}

fn intent(n: u64, new_crc: u32) -> Intent {
    Intent {
        write_id: U64::new(n),
        stripe: U64::new(n % 5),
        stripe_seq: U64::new(n),
        new_loc: U64::new(n + 10),
        old_loc: U64::new(n + 20),
        column: U32::new((n % 3) as u32),
        new_crc: U32::new(new_crc),
    }
}

fn mark(n: u64) -> Mark {
    Mark {
        write_id: U64::new(n),
        stripe: U64::new(n % 5),
        stripe_seq: U64::new(n),
        crc: U32::new(n as u32),
        reserved: U32::new(0),
    }
}

/// Valid journals (one record of every kind, and runs of several), each in the raw and the
/// signed mode.
pub fn journal_seeds() -> Vec<Vec<u8>> {
    let data = vec![0x5a; 64];
    let checkpoint = Checkpoint {
        map: vec![(1, 2), (3, 4)],
        done: vec![(5, 1, 9)],
        repair: vec![7],
    };
    let bodies = vec![
        Body::Mj(intent(1, 7)),
        Body::Pj(intent(2, 8)),
        Body::DataHardened(mark(3)),
        Body::ParityHardened(mark(4)),
        Body::PeerHardened(mark(5)),
        Body::Free(Free { loc: U64::new(6) }),
        Body::MjComplete(mark(7)),
        Body::PjComplete(mark(8)),
        Body::Proxy(intent(9, crc32c::crc32c(&data)), data),
        Body::Checkpoint(checkpoint.encode()),
        Body::CheckpointEnd(record::Seal {
            checkpoint_seq: U64::new(JOURNAL_FIRST_SEQ),
        }),
    ];
    let encode = |bodies: &[Body]| {
        let mut out = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let rec = Record {
                seq: JOURNAL_FIRST_SEQ + i as u64,
                body: body.clone(),
            };
            record::encode(&rec, &mut out);
        }
        out
    };
    let mut journals: Vec<Vec<u8>> = bodies.chunks(1).map(encode).collect();
    journals.push(encode(&bodies));
    journals.push(encode(&bodies[..4]));
    let mut seeds = Vec::new();
    for j in journals {
        for mode in [0u8, 1, 2, 3] {
            seeds.push([&[mode][..], &j].concat());
        }
    }
    seeds.push([&[4u8][..], &checkpoint.encode()].concat());
    seeds
}

/// Valid frame streams (one frame of every kind, and a run of them), raw and signed.
pub fn peer_seeds() -> Vec<Vec<u8>> {
    let msgs = vec![
        Msg::Update {
            write_id: 1,
            stripe: 2,
            stripe_seq: 3,
            column: 1,
            from: 2,
            delta: None,
        },
        Msg::Update {
            write_id: 4,
            stripe: 5,
            stripe_seq: 6,
            column: 0,
            from: 1,
            delta: Some(vec![9; 32]),
        },
        Msg::DeltaRequest {
            write_id: 1,
            stripe: 2,
        },
        Msg::Delta {
            write_id: 1,
            stripe: 2,
            delta: vec![7; 32],
        },
        Msg::DeltaHeld {
            write_id: 1,
            stripe: 2,
        },
        Msg::DataHardened {
            write_id: 1,
            stripe: 2,
            stripe_seq: 3,
            column: 1,
        },
        Msg::ParityHardened {
            write_id: 1,
            stripe: 2,
        },
        Msg::ProxyUpdate {
            write_id: 7,
            stripe: 8,
            stripe_seq: 9,
            column: 2,
            from: 0,
            data: vec![3; 32],
        },
        Msg::ProxyHardened {
            write_id: 7,
            stripe: 8,
        },
        Msg::Abandon {
            write_id: 7,
            stripe: 8,
        },
    ];
    let frame = |msg: &Msg, seq: u64| wire::encode(msg, CLUSTER, seq).unwrap_or_default();
    let mut streams: Vec<Vec<u8>> = msgs.iter().map(|m| frame(m, 1)).collect();
    streams.push(
        msgs.iter()
            .enumerate()
            .flat_map(|(i, m)| frame(m, i as u64 + 1))
            .collect(),
    );
    let mut seeds = Vec::new();
    for s in streams {
        for mode in [0u8, 1, 2, 3] {
            seeds.push([&[mode][..], &s].concat());
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_in_full() {
        for s in journal_seeds().iter().filter(|s| s[0] & 4 == 0) {
            let r = record::replay(&s[1..], None);
            assert_eq!((r.valid_len, r.discarded), (s.len() - 1, None));
        }
        for s in peer_seeds() {
            let mut stream = &s[1..];
            while !stream.is_empty() {
                ready(wire::read(&mut stream, CLUSTER, None)).unwrap();
            }
        }
    }

    #[test]
    fn signing_makes_a_corrupted_crc_whole_again() {
        let mut j = journal_seeds()[0][1..].to_vec();
        j[20] ^= 1;
        assert!(record::replay(&j, None).discarded.is_some());
        sign_frames(&mut j, record::HEADER_BYTES, 16);
        assert_eq!(record::replay(&j, None).discarded, None);
    }

    #[test]
    fn journal_survives_seeded_inputs() {
        run_seeded("journal", &journal_seeds(), 20_000, journal);
    }

    #[test]
    fn peer_frames_survive_seeded_inputs() {
        run_seeded("peer_frames", &peer_seeds(), 20_000, peer_frames);
    }
}
