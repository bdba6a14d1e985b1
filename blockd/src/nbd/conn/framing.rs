//! Bytes on the socket: reading request headers and payloads, and sending batches of
//! replies (the writer thread).

use std::io::{self, BufRead, Read, Write};
use std::sync::{mpsc, Arc, Mutex};

use raid::IoBuf;
use tokio_util::sync::CancellationToken;
use zerocopy::FromBytes;

use super::{Reply, Socket};
use crate::nbd::limits::*;
use crate::nbd::session::{Encoder, Request};
use crate::nbd::wire::*;

/// Writes `out` (and a large payload after it) to the socket under its lock, with one
/// `writev` where the socket takes it all.
pub(super) fn send(
    sock: &Mutex<Socket>,
    out: &mut Vec<u8>,
    data: Option<&IoBuf>,
) -> io::Result<()> {
    let mut s = sock.lock().unwrap_or_else(|p| p.into_inner());
    let data = data.map_or(&[][..], IoBuf::as_slice);
    let (mut a, mut b) = (&out[..], data);
    while !a.is_empty() || !b.is_empty() {
        let n = s.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    out.clear();
    Ok(())
}

/// Appends one reply to `out`, sending at once if it carries a large payload or the batch
/// is full.
pub(super) fn queue(
    enc: &Encoder,
    sock: &Mutex<Socket>,
    out: &mut Vec<u8>,
    reply: Reply,
) -> io::Result<()> {
    if let Some(data) = enc.encode(out, reply.req, reply.outcome) {
        if data.len() >= COPY_MAX_BYTES {
            return send(sock, out, Some(&data));
        }
        out.extend_from_slice(data.as_slice());
    }
    if out.len() >= WRITE_BATCH_BYTES {
        send(sock, out, None)?;
    }
    Ok(())
}

pub(super) fn writer_loop(
    rx: mpsc::Receiver<Reply>,
    sock: Arc<Mutex<Socket>>,
    enc: Encoder,
    ended: CancellationToken,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(WRITE_BATCH_BYTES + COPY_MAX_BYTES);
    let sent = (|| {
        while let Ok(first) = rx.recv() {
            queue(&enc, &sock, &mut out, first)?;
            while let Ok(more) = rx.try_recv() {
                queue(&enc, &sock, &mut out, more)?;
            }
            send(&sock, &mut out, None)?;
        }
        Ok(())
    })();
    if sent.is_err() {
        // No reply can reach the client any more (it stopped reading, or left): end the
        // session rather than go on reading requests whose replies would be dropped.
        ended.cancel();
        sock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown_read();
    }
    sent
}

pub(crate) fn read_request(r: &mut impl BufRead, extended: bool) -> io::Result<Option<Request>> {
    let mut raw = [0u8; EXTENDED_REQUEST_BYTES];
    let size = if extended {
        EXTENDED_REQUEST_BYTES
    } else {
        COMPACT_REQUEST_BYTES
    };
    // EOF between requests is a clean end; EOF inside a header is a framing error.
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    r.read_exact(&mut raw[..size])?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad request magic");
    if extended {
        let h = ExtendedRequest::ref_from_bytes(&raw[..]).map_err(|_| bad())?;
        if h.magic.get() != EXTENDED_REQUEST_MAGIC {
            return Err(bad());
        }
        let (kind, flags, cookie) = (h.kind.get(), h.flags.get(), h.cookie.get());
        Ok(Some(Request {
            kind,
            flags,
            cookie,
            offset: h.offset.get(),
            len: h.length.get(),
        }))
    } else {
        let h = CompactRequest::ref_from_bytes(&raw[..size]).map_err(|_| bad())?;
        if h.magic.get() != REQUEST_MAGIC {
            return Err(bad());
        }
        let (kind, flags, cookie) = (h.kind.get(), h.flags.get(), h.cookie.get());
        Ok(Some(Request {
            kind,
            flags,
            cookie,
            offset: h.offset.get(),
            len: u64::from(h.length.get()),
        }))
    }
}

/// True when `buf` holds a whole request: its header and any payload it carries. Reading it
/// then needs no `recv`, so cannot block.
pub(crate) fn complete_request(buf: &[u8], extended: bool) -> bool {
    let (size, payload) = if extended {
        match ExtendedRequest::ref_from_prefix(buf) {
            Ok((h, _)) => {
                let has_payload =
                    h.kind.get() == CMD_WRITE || h.flags.get() & CMD_FLAG_PAYLOAD_LEN != 0;
                (
                    EXTENDED_REQUEST_BYTES,
                    if has_payload { h.length.get() } else { 0 },
                )
            }
            Err(_) => return false,
        }
    } else {
        match CompactRequest::ref_from_prefix(buf) {
            Ok((h, _)) => {
                let payload = if h.kind.get() == CMD_WRITE {
                    u64::from(h.length.get())
                } else {
                    0
                };
                (COMPACT_REQUEST_BYTES, payload)
            }
            Err(_) => return false,
        }
    };
    (size as u64).saturating_add(payload) <= buf.len() as u64
}

pub(crate) fn drain(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "payload cut short",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::big_endian::{U16, U32, U64};
    use zerocopy::IntoBytes;

    fn compact(kind: u16, len: u32) -> Vec<u8> {
        let h = CompactRequest {
            magic: U32::new(REQUEST_MAGIC),
            flags: U16::new(0),
            kind: U16::new(kind),
            cookie: U64::new(1),
            offset: U64::new(0),
            length: U32::new(len),
        };
        h.as_bytes().to_vec()
    }

    #[test]
    fn complete_request_needs_header_and_payload() {
        let read = compact(CMD_READ, 4096);
        assert!(complete_request(&read, false));
        assert!(!complete_request(&read[..27], false));
        assert!(!complete_request(&[], false));
        let mut write = compact(CMD_WRITE, 512);
        assert!(!complete_request(&write, false), "payload missing");
        write.extend_from_slice(&[0; 511]);
        assert!(!complete_request(&write, false), "payload short by one");
        write.push(0);
        assert!(complete_request(&write, false));
        // A 28-byte compact header is not a 32-byte extended one.
        assert!(!complete_request(&read, true));
    }
}
