//! Peer message framing: protocol [`Msg`]s between servers over any byte stream (TCP).
//!
//! Every frame is a 40-byte little-endian header and a body:
//!
//! ```text
//! offset size field
//! 0      4    magic 0x45455042 ("BPEE")
//! 4      2    version = 1
//! 6      2    kind (message type)
//! 8      8    cluster id: a frame from another cluster is refused
//! 16     8    sequence number of the sending connection (strictly increasing)
//! 24     4    body length in bytes (at most BODY_MAX_BYTES)
//! 28     4    crc32c of the body
//! 32     4    crc32c of the header with this field zeroed
//! 36     4    reserved, zero
//! ```
//!
//! The reader checks the whole header (magic, version, crc, reserved bytes, cluster, known
//! kind, length within the limit, sequence) before it allocates or reads the body, then
//! checks the body's crc. Any failure is an error that ends the connection: peers are
//! servers of our own cluster, and a broken frame means a broken stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::Msg;

pub const MAGIC: u32 = 0x4545_5042;
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 40;
/// Largest body: a `Delta` for one 1 MiB block range plus its fixed fields. Bounds what a
/// peer can make us allocate.
pub const BODY_MAX_BYTES: usize = (1 << 20) + 64;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
struct Header {
    magic: U32,
    version: U16,
    kind: U16,
    cluster: U64,
    seq: U64,
    body_len: U32,
    body_crc: U32,
    header_crc: U32,
    reserved: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame header: {0}")]
    Header(&'static str),
    #[error("frame from cluster {found:#x}, this is cluster {expected:#x}")]
    WrongCluster { expected: u64, found: u64 },
    #[error("frame sequence {found} out of order (expected above {last})")]
    Sequence { last: u64, found: u64 },
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("frame body checksum mismatch")]
    BodyCrc,
    #[error("malformed {0} body")]
    Body(&'static str),
}

fn header_crc(h: &Header) -> u32 {
    let mut copy = *h;
    copy.header_crc = U32::new(0);
    crc32c::crc32c(copy.as_bytes())
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn kind_and_body(msg: &Msg) -> (u16, Vec<u8>) {
    let mut b = Vec::with_capacity(48);
    let kind = match msg {
        Msg::Update {
            write_id,
            stripe,
            stripe_seq,
            column,
            from,
            delta,
        } => {
            for v in [
                *write_id,
                *stripe,
                *stripe_seq,
                *column as u64,
                *from as u64,
            ] {
                put_u64(&mut b, v);
            }
            if let Some(delta) = delta {
                b.extend_from_slice(delta);
            }
            1
        }
        Msg::DeltaRequest { write_id, stripe } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            2
        }
        Msg::Delta {
            write_id,
            stripe,
            delta,
        } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            b.extend_from_slice(delta);
            3
        }
        Msg::DeltaHeld { write_id, stripe } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            4
        }
        Msg::DataHardened {
            write_id,
            stripe,
            stripe_seq,
            column,
        } => {
            for v in [*write_id, *stripe, *stripe_seq, *column as u64] {
                put_u64(&mut b, v);
            }
            5
        }
        Msg::ParityHardened { write_id, stripe } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            6
        }
        Msg::ProxyUpdate {
            write_id,
            stripe,
            stripe_seq,
            column,
            from,
            data,
        } => {
            for v in [
                *write_id,
                *stripe,
                *stripe_seq,
                *column as u64,
                *from as u64,
            ] {
                put_u64(&mut b, v);
            }
            b.extend_from_slice(data);
            7
        }
        Msg::ProxyHardened { write_id, stripe } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            8
        }
        Msg::Abandon { write_id, stripe } => {
            put_u64(&mut b, *write_id);
            put_u64(&mut b, *stripe);
            9
        }
    };
    (kind, b)
}

fn words<const N: usize>(body: &[u8], name: &'static str) -> Result<[u64; N], WireError> {
    if body.len() != N * 8 {
        return Err(WireError::Body(name));
    }
    let mut out = [0u64; N];
    for (i, chunk) in body.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(w);
    }
    Ok(out)
}

fn usize_of(v: u64, name: &'static str) -> Result<usize, WireError> {
    usize::try_from(v).map_err(|_| WireError::Body(name))
}

fn decode_body(kind: u16, body: &[u8]) -> Result<Msg, WireError> {
    Ok(match kind {
        1 => {
            // Five words, then the delta if the data node sent it with the update.
            let (head, delta) = body.split_at_checked(40).ok_or(WireError::Body("Update"))?;
            let [write_id, stripe, stripe_seq, column, from] = words::<5>(head, "Update")?;
            Msg::Update {
                write_id,
                stripe,
                stripe_seq,
                column: usize_of(column, "Update")?,
                from: usize_of(from, "Update")?,
                delta: (!delta.is_empty()).then(|| delta.to_vec()),
            }
        }
        2 => {
            let [write_id, stripe] = words::<2>(body, "DeltaRequest")?;
            Msg::DeltaRequest { write_id, stripe }
        }
        3 => {
            let (head, delta) = body.split_at_checked(16).ok_or(WireError::Body("Delta"))?;
            let [write_id, stripe] = words::<2>(head, "Delta")?;
            Msg::Delta {
                write_id,
                stripe,
                delta: delta.to_vec(),
            }
        }
        4 => {
            let [write_id, stripe] = words::<2>(body, "DeltaHeld")?;
            Msg::DeltaHeld { write_id, stripe }
        }
        5 => {
            let [write_id, stripe, stripe_seq, column] = words::<4>(body, "DataHardened")?;
            Msg::DataHardened {
                write_id,
                stripe,
                stripe_seq,
                column: usize_of(column, "DataHardened")?,
            }
        }
        6 => {
            let [write_id, stripe] = words::<2>(body, "ParityHardened")?;
            Msg::ParityHardened { write_id, stripe }
        }
        7 => {
            let (head, data) = body
                .split_at_checked(40)
                .ok_or(WireError::Body("ProxyUpdate"))?;
            let [write_id, stripe, stripe_seq, column, from] = words::<5>(head, "ProxyUpdate")?;
            Msg::ProxyUpdate {
                write_id,
                stripe,
                stripe_seq,
                column: usize_of(column, "ProxyUpdate")?,
                from: usize_of(from, "ProxyUpdate")?,
                data: data.to_vec(),
            }
        }
        8 => {
            let [write_id, stripe] = words::<2>(body, "ProxyHardened")?;
            Msg::ProxyHardened { write_id, stripe }
        }
        9 => {
            let [write_id, stripe] = words::<2>(body, "Abandon")?;
            Msg::Abandon { write_id, stripe }
        }
        _ => return Err(WireError::Header("unknown kind")),
    })
}

/// Encodes one frame.
pub fn encode(msg: &Msg, cluster: u64, seq: u64) -> Result<Vec<u8>, WireError> {
    let (kind, body) = kind_and_body(msg);
    if body.len() > BODY_MAX_BYTES {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut h = Header {
        magic: U32::new(MAGIC),
        version: U16::new(VERSION),
        kind: U16::new(kind),
        cluster: U64::new(cluster),
        seq: U64::new(seq),
        body_len: U32::new(body.len() as u32),
        body_crc: U32::new(crc32c::crc32c(&body)),
        header_crc: U32::new(0),
        reserved: [0; 4],
    };
    h.header_crc = U32::new(header_crc(&h));
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a header; returns (kind, sequence, body length).
fn check_header(
    raw: &[u8; HEADER_BYTES],
    cluster: u64,
    last_seq: Option<u64>,
) -> Result<(u16, u64, usize), WireError> {
    let h = Header::read_from_bytes(raw).map_err(|_| WireError::Header("size"))?;
    if h.magic.get() != MAGIC {
        return Err(WireError::Header("magic"));
    }
    if h.header_crc.get() != header_crc(&h) {
        return Err(WireError::Header("checksum"));
    }
    if h.version.get() != VERSION {
        return Err(WireError::Header("version"));
    }
    if h.reserved != [0; 4] {
        return Err(WireError::Header("reserved bytes not zero"));
    }
    if h.cluster.get() != cluster {
        return Err(WireError::WrongCluster {
            expected: cluster,
            found: h.cluster.get(),
        });
    }
    if !(1..=9).contains(&h.kind.get()) {
        return Err(WireError::Header("unknown kind"));
    }
    let len = h.body_len.get() as usize;
    if len > BODY_MAX_BYTES {
        return Err(WireError::TooLarge(len));
    }
    let seq = h.seq.get();
    if let Some(last) = last_seq {
        if seq <= last {
            return Err(WireError::Sequence { last, found: seq });
        }
    }
    Ok((h.kind.get(), seq, len))
}

/// Reads one frame: the header is checked in full before the body is read.
pub async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    cluster: u64,
    last_seq: Option<u64>,
) -> Result<(u64, Msg), WireError> {
    let mut raw = [0u8; HEADER_BYTES];
    r.read_exact(&mut raw).await?;
    let (kind, seq, len) = check_header(&raw, cluster, last_seq)?;
    let body_crc = Header::read_from_bytes(&raw[..])
        .map(|h| h.body_crc.get())
        .map_err(|_| WireError::Header("size"))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    if crc32c::crc32c(&body) != body_crc {
        return Err(WireError::BodyCrc);
    }
    Ok((seq, decode_body(kind, &body)?))
}

/// Writes one frame.
pub async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Msg,
    cluster: u64,
    seq: u64,
) -> Result<(), WireError> {
    let frame = encode(msg, cluster, seq)?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 0xb10c_d000;

    fn samples() -> Vec<Msg> {
        vec![
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
                delta: Some(vec![9; 4096]),
            },
            Msg::DeltaRequest {
                write_id: 1,
                stripe: 2,
            },
            Msg::ProxyUpdate {
                write_id: 7,
                stripe: 8,
                stripe_seq: 9,
                column: 2,
                from: 0,
                data: vec![3; 4096],
            },
            Msg::ProxyHardened {
                write_id: 7,
                stripe: 8,
            },
            Msg::Abandon {
                write_id: 7,
                stripe: 8,
            },
            Msg::Delta {
                write_id: 1,
                stripe: 2,
                delta: vec![7; 4096],
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
        ]
    }

    #[tokio::test]
    async fn round_trip_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs = samples();
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for (i, m) in sent.iter().enumerate() {
                write(&mut a, m, CLUSTER, i as u64 + 1).await.unwrap();
            }
        });
        let mut last = None;
        for m in &msgs {
            let (seq, got) = read(&mut b, CLUSTER, last).await.unwrap();
            assert_eq!(&got, m);
            last = Some(seq);
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn every_bit_flip_is_refused() {
        let frame = encode(
            &Msg::Delta {
                write_id: 9,
                stripe: 1,
                delta: vec![3; 64],
            },
            CLUSTER,
            5,
        )
        .unwrap();
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let res = read(&mut &bad[..], CLUSTER, None).await;
            assert!(res.is_err(), "flip at byte {i} accepted");
        }
    }

    #[tokio::test]
    async fn refuses_other_clusters_replays_and_oversize_before_reading_the_body() {
        let frame = encode(
            &Msg::DeltaHeld {
                write_id: 1,
                stripe: 1,
            },
            CLUSTER,
            5,
        )
        .unwrap();
        assert!(matches!(
            read(&mut &frame[..], CLUSTER + 1, None).await,
            Err(WireError::WrongCluster { .. })
        ));
        assert!(matches!(
            read(&mut &frame[..], CLUSTER, Some(5)).await,
            Err(WireError::Sequence { .. })
        ));
        // A header claiming a huge body is refused from the header alone (no body follows).
        let mut h = Header::read_from_bytes(&frame[..HEADER_BYTES]).unwrap();
        h.body_len = U32::new(u32::MAX);
        h.header_crc = U32::new(header_crc(&h));
        assert!(matches!(
            read(&mut h.as_bytes(), CLUSTER, None).await,
            Err(WireError::TooLarge(_))
        ));
    }
}
