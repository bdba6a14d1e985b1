//! The transmission phase of one connection.
//!
//! One reader (this task) decodes request headers, validates each against the export and
//! the negotiated features ([`validate`]), reads a write's payload into a pooled buffer, and
//! spawns the operation without waiting for it. Operations send their [`Reply`] to one writer
//! task, which encodes replies in completion order and batches them into few `write(2)` calls.
//!
//! Bounds: at most [`INFLIGHT_MAX`] requests and [`INFLIGHT_BYTES_MAX`] payload bytes in
//! flight; at the cap the reader simply stops reading. A well-framed invalid request gets an
//! error reply (a rejected write's payload is read and dropped); only broken framing (bad
//! magic, a short read, an absurd payload) ends the session.
//!
//! The session ends on DISC, EOF, a framing error, server shutdown, or force-deletion of the
//! volume; in every case requests already read are completed and answered first.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use raid::{Extent, IoBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use volmgr::Volume;
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::handshake::Negotiated;
use super::limits::*;
use super::wire::*;
use crate::metrics::SessionMetrics;

/// A decoded request header.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub kind: u16,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (or payload length for WRITE).
    pub len: u64,
}

/// What the reader does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Run it (WRITE: after reading `len` payload bytes).
    Run,
    /// Answer with this error, after draining `drain` payload bytes.
    Reject {
        errno: u32,
        drain: u64,
        why: &'static str,
    },
    /// End the session (DISC, or a payload too large to drain).
    Close,
}

/// The export as a session sees it.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub extended: bool,
    pub meta_allocation: bool,
}

fn reject(errno: u32, drain: u64, why: &'static str) -> Verdict {
    Verdict::Reject { errno, drain, why }
}

/// Checks one request against the export. Pure: unit-tested on every rule.
pub fn validate(req: &Request, ex: &Export) -> Verdict {
    let payload = if req.kind == CMD_WRITE || (ex.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0)
    {
        req.len
    } else {
        0
    };
    let fail = |errno, why| {
        if payload > DRAIN_MAX_BYTES {
            Verdict::Close
        } else {
            reject(errno, payload, why)
        }
    };
    let mut allowed = CMD_FLAG_FUA;
    match req.kind {
        CMD_READ if ex.structured => allowed |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if ex.extended && req.kind == CMD_WRITE {
        allowed |= CMD_FLAG_PAYLOAD_LEN;
    }
    if req.kind > CMD_BLOCK_STATUS {
        return fail(EINVAL, "unknown command");
    }
    if req.flags & !allowed != 0 {
        return fail(EINVAL, "flag not valid for this command");
    }
    if req.kind != CMD_WRITE && payload != 0 {
        return fail(EINVAL, "command takes no payload");
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match req.kind {
        CMD_DISC => return Verdict::Close,
        CMD_FLUSH => {
            return if req.offset != 0 || req.len != 0 {
                reject(EINVAL, 0, "FLUSH with a non-zero offset or length")
            } else {
                Verdict::Run
            };
        }
        _ => {}
    }
    if writes && ex.read_only {
        return fail(EPERM, "export is read-only");
    }
    if req.kind == CMD_BLOCK_STATUS && !ex.meta_allocation {
        return fail(EINVAL, "no metadata context selected");
    }
    if req.len == 0 {
        return fail(EINVAL, "zero-length request");
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > u64::from(PAYLOAD_MAX_BYTES) {
        return fail(EINVAL, "request larger than the maximum payload");
    }
    let min = u64::from(BLOCK_MIN_BYTES);
    if !req.offset.is_multiple_of(min) || !req.len.is_multiple_of(min) {
        return fail(EINVAL, "not aligned to the minimum block size");
    }
    let in_range = req
        .offset
        .checked_add(req.len)
        .is_some_and(|end| end <= ex.size);
    if !in_range {
        let errno = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return fail(errno, "range beyond the end of the export");
    }
    Verdict::Run
}

/// The outcome of one request, ready to encode.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Data(IoBuf),
    Extents(Vec<Extent>),
    Error(u32, &'static str),
}

#[derive(Debug)]
pub struct Reply {
    pub req: Request,
    pub outcome: Outcome,
    /// Held until the reply is queued: bounds requests and bytes in flight.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Maps an I/O error to an NBD error number (everything unknown is EIO).
pub fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        _ if e.kind() == io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

fn io_error(e: &io::Error) -> Outcome {
    Outcome::Error(errno_of(e), "I/O error")
}

async fn execute(volume: &Volume, req: Request, payload: Option<IoBuf>) -> Outcome {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_READ => {
            let (buf, res) = volume
                .read(req.offset, IoBuf::with_len(req.len as usize))
                .await;
            match res {
                Ok(()) => Outcome::Data(buf),
                Err(e) => io_error(&e),
            }
        }
        CMD_WRITE => {
            let Some(buf) = payload else {
                return Outcome::Error(EIO, "internal: write without payload");
            };
            match volume.write(req.offset, buf, fua).await.1 {
                Ok(()) => Outcome::Done,
                Err(e) => io_error(&e),
            }
        }
        CMD_FLUSH => match volume.flush().await {
            Ok(()) => Outcome::Done,
            Err(e) => io_error(&e),
        },
        CMD_TRIM => match volume.trim(req.offset, req.len, fua).await {
            Ok(()) => Outcome::Done,
            Err(e) => io_error(&e),
        },
        CMD_WRITE_ZEROES => {
            let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            match volume
                .write_zeroes(req.offset, req.len, may_punch, fast, fua)
                .await
            {
                Ok(()) => Outcome::Done,
                Err(e) if errno_of(&e) == ENOTSUP => {
                    Outcome::Error(ENOTSUP, "zeroing would not be fast")
                }
                Err(e) => io_error(&e),
            }
        }
        CMD_CACHE => match volume.cache_hint(req.offset, req.len).await {
            Ok(()) => Outcome::Done,
            Err(e) => io_error(&e),
        },
        CMD_BLOCK_STATUS => {
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                EXTENTS_MAX
            };
            match volume.extents(req.offset, req.len, max).await {
                Ok(extents) if !extents.is_empty() => Outcome::Extents(extents),
                Ok(_) => Outcome::Error(EIO, "no extents"),
                Err(e) => io_error(&e),
            }
        }
        _ => Outcome::Error(EINVAL, "unknown command"),
    }
}

/// Reads and drops `n` payload bytes.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "payload cut short",
        ));
    }
    Ok(())
}

/// Reads one request header; `Ok(None)` on a clean EOF between requests.
async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    extended: bool,
) -> io::Result<Option<Request>> {
    let mut raw = [0u8; EXTENDED_REQUEST_BYTES];
    let size = if extended {
        EXTENDED_REQUEST_BYTES
    } else {
        COMPACT_REQUEST_BYTES
    };
    let head = &mut raw[..size];
    // First byte separately, so EOF between requests is told apart from a torn header.
    if r.read(&mut head[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut head[1..]).await?;
    let bad_magic = || io::Error::new(io::ErrorKind::InvalidData, "bad request magic");
    if extended {
        let h = ExtendedRequest::ref_from_bytes(&raw[..]).map_err(|_| bad_magic())?;
        if h.magic.get() != EXTENDED_REQUEST_MAGIC {
            return Err(bad_magic());
        }
        Ok(Some(Request {
            kind: h.kind.get(),
            flags: h.flags.get(),
            cookie: h.cookie.get(),
            offset: h.offset.get(),
            len: h.length.get(),
        }))
    } else {
        let h = CompactRequest::ref_from_bytes(&raw[..size]).map_err(|_| bad_magic())?;
        if h.magic.get() != REQUEST_MAGIC {
            return Err(bad_magic());
        }
        Ok(Some(Request {
            kind: h.kind.get(),
            flags: h.flags.get(),
            cookie: h.cookie.get(),
            offset: h.offset.get(),
            len: u64::from(h.length.get()),
        }))
    }
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    Disconnect,
    Eof,
    Stopped,
    Framing(io::Error),
    WriterGone,
}

/// Runs the transmission phase until the session ends.
pub async fn run<R, W>(
    reader: R,
    writer: W,
    neg: Negotiated,
    stop: CancellationToken,
    metrics: Arc<SessionMetrics>,
) -> End
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let volume = Arc::clone(&neg.volume);
    let _attached = volume.attach();
    let closed = volume.closed();
    let export = Export {
        size: volume.size_bytes(),
        read_only: volume.read_only(),
        structured: neg.structured,
        extended: neg.extended,
        meta_allocation: neg.meta_allocation.is_some(),
    };
    let encoder = Encoder {
        structured: neg.structured,
        extended: neg.extended,
        meta_id: neg.meta_allocation.unwrap_or(0),
    };
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx, encoder));
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let requests = Arc::new(Semaphore::new(INFLIGHT_MAX));
    let bytes = Arc::new(Semaphore::new(INFLIGHT_BYTES_MAX));

    let end = loop {
        let req = tokio::select! {
            biased;
            _ = stop.cancelled() => break End::Stopped,
            _ = closed.cancelled() => break End::Stopped,
            r = read_request(&mut reader, export.extended) => match r {
                Ok(Some(req)) => req,
                Ok(None) => break End::Eof,
                Err(e) => break End::Framing(e),
            },
        };
        let verdict = validate(&req, &export);
        let (errno, drain_len, why) = match verdict {
            Verdict::Close if req.kind == CMD_DISC => break End::Disconnect,
            Verdict::Close => {
                break End::Framing(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "payload too large to drain",
                ))
            }
            Verdict::Reject { errno, drain, why } => (errno, drain, why),
            Verdict::Run => (0, 0, ""),
        };
        if errno != 0 {
            metrics.rejected(req.kind);
            if let Err(e) = drain(&mut reader, drain_len).await {
                break End::Framing(e);
            }
            if tx
                .send(Reply {
                    req,
                    outcome: Outcome::Error(errno, why),
                    _permits: None,
                })
                .is_err()
            {
                break End::WriterGone;
            }
            continue;
        }
        let data_bytes = if matches!(req.kind, CMD_READ | CMD_WRITE) {
            req.len as u32
        } else {
            0
        };
        // Both semaphores live as long as this function and are never closed.
        let (Ok(req_permit), Ok(byte_permit)) = (
            Arc::clone(&requests).acquire_owned().await,
            Arc::clone(&bytes).acquire_many_owned(data_bytes).await,
        ) else {
            break End::Stopped;
        };
        let payload = if req.kind == CMD_WRITE {
            let mut buf = IoBuf::with_len(req.len as usize);
            if let Err(e) = reader.read_exact(buf.as_mut_slice()).await {
                break End::Framing(e);
            }
            Some(buf)
        } else {
            None
        };
        let tx = tx.clone();
        let volume = Arc::clone(&volume);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let started = Instant::now();
            metrics.started();
            let outcome = execute(&volume, req, payload).await;
            metrics.finished(
                req.kind,
                req.len,
                matches!(outcome, Outcome::Error(..)),
                started,
            );
            let _ = tx.send(Reply {
                req,
                outcome,
                _permits: Some((req_permit, byte_permit)),
            });
        });
    };
    // Requests already read still complete and are answered; the writer ends once every
    // sender (ours and the in-flight tasks') is gone.
    drop(tx);
    match writer_task.await {
        Ok(Ok(())) => end,
        Ok(Err(_)) | Err(_) => match end {
            End::Eof | End::Disconnect => end,
            _ => End::WriterGone,
        },
    }
}

/// Encodes replies for the negotiated mode.
#[derive(Debug, Clone, Copy)]
struct Encoder {
    structured: bool,
    extended: bool,
    meta_id: u32,
}

impl Encoder {
    fn header(&self, out: &mut Vec<u8>, req: &Request, kind: u16, payload_len: usize) {
        if self.extended {
            let h = ExtendedReply {
                magic: U32::new(EXTENDED_REPLY_MAGIC),
                flags: U16::new(REPLY_FLAG_DONE),
                kind: U16::new(kind),
                cookie: U64::new(req.cookie),
                offset: U64::new(req.offset),
                length: U64::new(payload_len as u64),
            };
            out.extend_from_slice(h.as_bytes());
        } else {
            let h = StructuredReply {
                magic: U32::new(STRUCTURED_REPLY_MAGIC),
                flags: U16::new(REPLY_FLAG_DONE),
                kind: U16::new(kind),
                cookie: U64::new(req.cookie),
                length: U32::new(payload_len as u32),
            };
            out.extend_from_slice(h.as_bytes());
        }
    }

    fn simple(&self, out: &mut Vec<u8>, req: &Request, errno: u32) {
        let h = SimpleReply {
            magic: U32::new(SIMPLE_REPLY_MAGIC),
            error: U32::new(errno),
            cookie: U64::new(req.cookie),
        };
        out.extend_from_slice(h.as_bytes());
    }

    /// Appends the reply's header (and small payload) to `out`; returns data to send after it.
    fn encode(&self, out: &mut Vec<u8>, reply: Reply) -> Option<IoBuf> {
        let req = reply.req;
        match reply.outcome {
            Outcome::Done if self.extended => self.header(out, &req, REPLY_TYPE_NONE, 0),
            Outcome::Done => self.simple(out, &req, 0),
            Outcome::Error(errno, msg) if self.structured => {
                let msg = msg.as_bytes();
                self.header(out, &req, REPLY_TYPE_ERROR, 6 + msg.len());
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg);
            }
            Outcome::Error(errno, _) => self.simple(out, &req, errno),
            Outcome::Data(buf) if self.structured => {
                self.header(out, &req, REPLY_TYPE_OFFSET_DATA, 8 + buf.len());
                out.extend_from_slice(&req.offset.to_be_bytes());
                return Some(buf);
            }
            Outcome::Data(buf) => {
                self.simple(out, &req, 0);
                return Some(buf);
            }
            Outcome::Extents(extents) => self.extents(out, &req, &extents),
        }
        None
    }

    fn extents(&self, out: &mut Vec<u8>, req: &Request, extents: &[Extent]) {
        let flags = |e: &Extent| if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        if self.extended {
            self.header(
                out,
                req,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + 16 * extents.len(),
            );
            out.extend_from_slice(&self.meta_id.to_be_bytes());
            out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for e in extents {
                out.extend_from_slice(&e.len.to_be_bytes());
                out.extend_from_slice(&u64::from(flags(e)).to_be_bytes());
            }
        } else {
            // Compact requests are < 4 GiB, and extents never extend past the request, so
            // each length fits in a u32.
            self.header(out, req, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * extents.len());
            out.extend_from_slice(&self.meta_id.to_be_bytes());
            for e in extents {
                out.extend_from_slice(
                    &(e.len.min(u64::from(u32::MAX) & !511) as u32).to_be_bytes(),
                );
                out.extend_from_slice(&flags(e).to_be_bytes());
            }
        }
    }
}

/// Payloads at least this big are written straight from their buffer instead of copied.
const COPY_MAX_BYTES: usize = 64 << 10;

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    enc: Encoder,
) -> io::Result<()> {
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES + COPY_MAX_BYTES);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            if let Some(data) = enc.encode(&mut out, reply) {
                if data.len() >= COPY_MAX_BYTES {
                    w.write_all(&out).await?;
                    out.clear();
                    w.write_all(data.as_slice()).await?;
                } else {
                    out.extend_from_slice(data.as_slice());
                }
            }
            if out.len() < WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
    }
    w.flush().await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const EX: Export = Export {
        size: 1 << 20,
        read_only: false,
        structured: true,
        extended: false,
        meta_allocation: true,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
        Request {
            kind,
            flags,
            cookie: 1,
            offset,
            len,
        }
    }

    fn errno(v: Verdict) -> u32 {
        match v {
            Verdict::Reject { errno, .. } => errno,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn accepts_valid_requests() {
        for kind in [
            CMD_READ,
            CMD_WRITE,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_CACHE,
            CMD_BLOCK_STATUS,
        ] {
            assert_eq!(
                validate(&req(kind, CMD_FLAG_FUA, 4096, 4096), &EX),
                Verdict::Run,
                "kind {kind}"
            );
        }
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &EX), Verdict::Run);
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &EX),
            Verdict::Run
        );
        assert_eq!(
            validate(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    512
                ),
                &EX
            ),
            Verdict::Run
        );
        assert_eq!(
            validate(&req(CMD_READ, 0, (1 << 20) - 512, 512), &EX),
            Verdict::Run
        );
    }

    #[test]
    fn rejects_with_the_right_errno_and_drains_writes() {
        assert_eq!(
            errno(validate(&req(CMD_READ, 0, 1 << 20, 512), &EX)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(CMD_TRIM, 0, 1 << 20, 512), &EX)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 512), &EX)),
            ENOSPC
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 1 << 20, 512), &EX),
            Verdict::Reject {
                errno: ENOSPC,
                drain: 512,
                why: "range beyond the end of the export"
            }
        );
        assert_eq!(
            errno(validate(&req(CMD_READ, 0, u64::MAX - 511, 512), &EX)),
            EINVAL
        );
        assert_eq!(errno(validate(&req(CMD_READ, 0, 100, 512), &EX)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_READ, 0, 0, 100), &EX)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_READ, 0, 0, 0), &EX)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_WRITE, 0, 0, 0), &EX)), EINVAL);
        assert_eq!(errno(validate(&req(42, 0, 0, 0), &EX)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_READ, 1 << 9, 0, 512), &EX)), EINVAL);
        assert_eq!(
            errno(validate(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &EX)),
            EINVAL
        );
        assert_eq!(errno(validate(&req(CMD_FLUSH, 0, 0, 512), &EX)), EINVAL);
        let big = u64::from(PAYLOAD_MAX_BYTES) + 512;
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, big), &EX),
            Verdict::Reject {
                errno: EINVAL,
                drain: big,
                why: "request larger than the maximum payload"
            }
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, DRAIN_MAX_BYTES + 512), &EX),
            Verdict::Close
        );
        assert_eq!(errno(validate(&req(CMD_READ, 0, 0, big), &EX)), EINVAL);
        let ro = Export {
            read_only: true,
            ..EX
        };
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, 512), &ro),
            Verdict::Reject {
                errno: EPERM,
                drain: 512,
                why: "export is read-only"
            }
        );
        assert_eq!(errno(validate(&req(CMD_TRIM, 0, 0, 512), &ro)), EPERM);
        let simple = Export {
            structured: false,
            meta_allocation: false,
            ..EX
        };
        assert_eq!(
            errno(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &simple)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &simple)),
            EINVAL
        );
        assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &EX), Verdict::Close);
    }

    #[test]
    fn extended_payload_len_is_drained_on_any_command() {
        let ext = Export {
            extended: true,
            ..EX
        };
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 4096), &ext),
            Verdict::Run
        );
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 4096), &ext),
            Verdict::Reject {
                errno: EINVAL,
                drain: 4096,
                why: "flag not valid for this command"
            }
        );
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, 1 << 20), &ext), Verdict::Run);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::ENOSPC)),
            ENOSPC
        );
        assert_eq!(errno_of(&io::Error::from_raw_os_error(libc::EROFS)), EPERM);
        assert_eq!(errno_of(&io::Error::from_raw_os_error(libc::EBADF)), EIO);
        assert_eq!(
            errno_of(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            EINVAL
        );
    }
}
