//! A session that stops (SIGTERM, or a force-delete of its volume) answers every request it
//! has received but not started with `ESHUTDOWN`, instead of dropping it, as the NBD spec asks
//! of a server that shuts down; requests in flight finish and are answered as usual.
//!
//! How it stops: the server cancels the session's `stopping` token, then shuts the socket's
//! read side down. That wakes a thread blocked reading, and from then on a read returns what
//! the kernel already queued and then EOF, never blocks. So the thread that holds the read
//! side can answer every request already received, in its read buffer or in the kernel's,
//! reading each WRITE's payload as far as it came, and end at EOF. The checks sit where a
//! request could be caught between the two steps: after its header is read, after it waited
//! for room in flight (the gate), and when its payload is cut short by the shut read side.
//!
//! Bound: at most [`SHUTDOWN_REFUSALS_MAX`] requests are answered this way, since a TCP
//! socket keeps receiving after its read side is shut and a client could keep sending.

use std::io::{self, BufReader, Read};

use super::{drain, read_request, send, End, Shared, Socket};
use crate::nbd::limits::{SHUTDOWN_REFUSALS_MAX, WRITE_BATCH_BYTES};
use crate::nbd::session::{validate, Outcome, Request, Verdict};
use crate::nbd::wire::{CMD_DISC, CMD_WRITE, ESHUTDOWN};

/// The reply to a request received but not started when the session stops.
const SHUTTING_DOWN: Outcome = Outcome::Error(ESHUTDOWN, "server is shutting down");

impl Shared {
    /// Answers a request received after the session began to stop with `ESHUTDOWN` (into
    /// `out`), then reads and drops as much of its payload as arrived. `Err` ends the session:
    /// DISC, a payload too large to drain, or one cut short.
    pub(super) fn refuse(
        &self,
        r: &mut impl Read,
        req: Request,
        out: &mut Vec<u8>,
    ) -> Result<(), End> {
        let payload = match validate(&req, &self.export) {
            Verdict::Close if req.kind == CMD_DISC => return Err(End::Disconnect),
            Verdict::Close => return Err(End::Shutdown),
            Verdict::Reject { drain, .. } => drain,
            Verdict::Run if req.kind == CMD_WRITE => req.len,
            Verdict::Run => 0,
        };
        self.metrics.rejected(req.kind);
        self.enc.encode(out, req, SHUTTING_DOWN);
        drain(r, payload).map_err(|_| End::Shutdown)
    }

    /// Answers every request already received with `ESHUTDOWN`, up to
    /// [`SHUTDOWN_REFUSALS_MAX`], until EOF; returns why the session ends.
    pub(super) fn refuse_received(&self, r: &mut BufReader<Socket>, out: &mut Vec<u8>) -> End {
        for _ in 0..SHUTDOWN_REFUSALS_MAX {
            let req = match read_request(r, self.export.extended) {
                Ok(Some(req)) => req,
                // EOF, or a header cut short by it: no cookie to answer.
                Ok(None) => return End::Shutdown,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::Shutdown,
                Err(e) => return End::Framing(e),
            };
            if let Err(end) = self.refuse(r, req, out) {
                return end;
            }
            if out.len() >= WRITE_BATCH_BYTES {
                if let Err(e) = send(&self.write_half, out, None) {
                    return End::WriterGone(e);
                }
            }
        }
        End::Shutdown
    }

    /// A payload that ended early: a framing error, unless the session is stopping (its read
    /// side was shut mid-payload), in which case the request is answered `ESHUTDOWN`.
    pub(super) fn cut_short(&self, req: Request, e: io::Error, out: &mut Vec<u8>) -> End {
        if !self.stopping.is_cancelled() {
            return End::Framing(e);
        }
        self.enc.encode(out, req, SHUTTING_DOWN);
        End::Shutdown
    }
}
