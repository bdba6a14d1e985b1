//! Requests: validation against the export, execution on the volume, and reply encoding.
//!
//! [`validate`] is pure and checks every rule of the protocol for a well-framed request
//! (command, flags, negotiated features, zero length, alignment, range, read-only) before
//! anything touches the volume; it also says how many payload bytes a rejected request
//! leaves to drain. [`execute`] runs a valid request on the engine. [`Encoder`] writes the
//! reply in the negotiated format (simple, structured, or extended headers).

use std::io;

use raid::{Extent, IoBuf};
use volmgr::Volume;
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::limits::*;
use super::wire::*;

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

pub(crate) fn io_error(e: &io::Error) -> Outcome {
    Outcome::Error(errno_of(e), "I/O error")
}

/// Runs a request on the engine. `payload` is a WRITE's data, or a READ's buffer when the
/// fast path already allocated one.
pub(crate) async fn execute(volume: &Volume, req: Request, payload: Option<IoBuf>) -> Outcome {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_READ => {
            let buf = payload.unwrap_or_else(|| IoBuf::with_len(req.len as usize));
            let (buf, res) = volume.read(req.offset, buf).await;
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

/// Encodes replies for the negotiated mode.
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    structured: bool,
    extended: bool,
    meta_id: u32,
}

impl Encoder {
    pub fn new(structured: bool, extended: bool, meta_id: u32) -> Encoder {
        Encoder {
            structured,
            extended,
            meta_id,
        }
    }

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

    /// Appends the reply's header (and any small payload) to `out`; returns data that must be
    /// sent right after it.
    pub fn encode(&self, out: &mut Vec<u8>, req: Request, outcome: Outcome) -> Option<IoBuf> {
        match outcome {
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
