//! The transmission phase of one connection, on a dedicated thread.
//!
//! Why a thread and not an async task: a thread blocked in `recv(2)` on the socket gets a
//! "sync" wake-up from the client's `send`, and the scheduler runs it on the client's CPU.
//! A task parked in `epoll_wait` does not, and on a VM each request then pays a cross-CPU
//! wake-up (an IPI through the hypervisor): measured here, 55 µs per QD1 round trip for an
//! epoll server (qemu-nbd: 66 µs) against 13 µs for nbdkit's blocking threads. So, as in
//! nbdkit, each connection has one thread that blocks on the socket.
//!
//! What runs where:
//! - The connection thread reads and validates requests, drains rejected payloads, and runs
//!   cheap requests inline: a READ the page cache holds (`RWF_NOWAIT`, never blocks on the
//!   disk) and a buffered non-FUA WRITE (a copy into the page cache). Their replies are
//!   batched and sent with one `send` just before the thread would block reading again.
//! - A request that is the connection's only one in flight and must wait on the disk (an
//!   aligned `O_DIRECT` transfer, or a page-cache miss) is done with a blocking `pread` or
//!   `pwrite` on the connection thread: at QD1 that is the shortest path. A small `O_DIRECT`
//!   one even keeps the read side meanwhile (handing it over would add a wake-up to every
//!   round trip), but only while the client really runs one request at a time: a zero-timeout
//!   poll before the reply goes out detects a waiting next request and stops it for a while.
//! - Other aligned `O_DIRECT` reads and writes (cache `none`) are submitted straight to the
//!   io_uring engine; the completion callback, on the ring's thread, hands the reply to the
//!   connection's writer thread.
//! - Everything else (cache misses, FUA through the page cache, FLUSH, TRIM, WRITE_ZEROES,
//!   CACHE, BLOCK_STATUS) runs as an async task on the engine, so a connection keeps many of
//!   them in flight. Their replies also go to the writer thread.
//! - Both write the socket under one mutex, a whole batch of replies at a time.
//! - A client that keeps several small requests in flight (a `recv` brought more than one)
//!   has one thread keep the read side from request to request, for [`DEEP_BURSTS`]
//!   `recv`s after the last such burst: handing over would cost two context switches per
//!   request, while that client's next request is usually already on its way.
//! - A connection starts with two threads that take turns on the read side. Once its client
//!   has sent [`REQUESTS_BEFORE_GROWTH`] small requests one at a time, or large writes, it
//!   grows to [`CONNECTION_THREADS_MAX`] threads: a hand-off then wakes a thread that has
//!   slept long enough for the scheduler to run it on the idle CPU, not beside the answering
//!   thread, and large writes keep a thread on the socket while others write (the
//!   measurements are at the constants).
//!
//! Bounds: at most [`INFLIGHT_MAX`] requests and [`INFLIGHT_BYTES_MAX`] payload bytes in
//! flight; at the cap the thread stops reading (back-pressure).
//!
//! Shutdown (SIGTERM, or a force-delete of the volume): requests in flight finish and are
//! answered as usual; those received but not started are answered `ESHUTDOWN` (the
//! `stopping` module says how); then the session closes.

use std::io::{self, BufReader, Read};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use raid::IoBuf;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use volmgr::Volume;

use super::handshake::Negotiated;
use super::limits::*;
use super::session::{execute, io_error, validate, Encoder, Export, Outcome, Request, Verdict};
pub use super::socket::Socket;
use super::wire::*;
use crate::budget::{Budgets, ThreadLease};
use crate::metrics::SessionMetrics;

mod framing;
mod gate;
mod stopping;

pub(crate) use framing::{complete_request, drain, read_request};
use framing::{queue, send, writer_loop};
use gate::{Gate, Ticket};

/// A finished request on its way to the socket.
#[derive(Debug)]
pub struct Reply {
    pub req: Request,
    pub outcome: Outcome,
    _ticket: Option<Ticket>,
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    Disconnect,
    Eof,
    /// The server stopped the session (shutdown or force-delete).
    Shutdown,
    Framing(io::Error),
    WriterGone(io::Error),
}

/// Runs a request inline if it is cheap, or if it is the connection's only request in flight
/// (`alone`: then blocking here on a disk read or an `O_DIRECT` transfer gives the lowest
/// latency, and the other connection thread is already reading the next request); otherwise
/// hands back the buffer it has. Only a volume with a local component offers these paths.
fn inline(
    volume: &Volume,
    req: &Request,
    payload: Option<IoBuf>,
    alone: bool,
) -> Result<Outcome, Option<IoBuf>> {
    if !volume.has_local_fast_paths() {
        return Err(payload);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let attempt = match (req.kind, payload) {
        (CMD_READ, _) => match volume.try_read(req.offset, IoBuf::with_len(req.len as usize)) {
            Err(buf) if alone => volume
                .direct_now(false, req.offset, buf)
                .or_else(|buf| volume.read_now(req.offset, buf)),
            other => other,
        },
        (CMD_WRITE, Some(buf)) if !fua => match volume.write_now(req.offset, buf) {
            Err(buf) if alone => volume.direct_now(true, req.offset, buf),
            other => other,
        },
        (_, payload) => return Err(payload),
    };
    match attempt {
        Ok((buf, Ok(()))) if req.kind == CMD_READ => Ok(Outcome::Data(buf)),
        Ok((_, Ok(()))) => Ok(Outcome::Done),
        Ok((_, Err(e))) => Ok(io_error(&e)),
        Err(buf) => Err(Some(buf)),
    }
}

/// Reports a request finished off the connection thread: metrics, then the reply to the
/// writer thread (which is gone only if the session already ended).
fn complete(
    tx: &mpsc::Sender<Reply>,
    metrics: &SessionMetrics,
    req: Request,
    outcome: Outcome,
    ticket: Ticket,
    started: Instant,
) {
    metrics.finished(
        req.kind,
        req.len,
        matches!(outcome, Outcome::Error(..)),
        started,
    );
    let _ = tx.send(Reply {
        req,
        outcome,
        _ticket: Some(ticket),
    });
}

/// Everything the connection's threads share.
struct Shared {
    volume: Arc<Volume>,
    export: Export,
    enc: Encoder,
    gate: Arc<Gate>,
    write_half: Arc<Mutex<Socket>>,
    /// A handle used only to shut the read side down (wakes a thread blocked reading).
    control: Socket,
    reader: Mutex<ReadSide>,
    /// Requests left during which a lone disk transfer must not keep the read side: set when
    /// keeping it made the next request wait (the client had more in flight than one).
    no_hold: std::sync::atomic::AtomicU32,
    /// Lone small requests and large writes seen so far, up to [`REQUESTS_BEFORE_GROWTH`].
    toward_growth: std::sync::atomic::AtomicU32,
    runtime: Handle,
    metrics: Arc<SessionMetrics>,
    /// Cancelled by the server just before it shuts the read side down (see the `stopping` module).
    stopping: CancellationToken,
    /// Cancelled once the session is ending for any reason (a child of `stopping`): stops
    /// a reader waiting for the server's payload budget.
    ended: CancellationToken,
    budgets: Arc<Budgets>,
}

/// A validated request, ready to run.
struct Job {
    req: Request,
    payload: Option<IoBuf>,
    ticket: Ticket,
}

struct ReadSide {
    buf: BufReader<Socket>,
    /// Requests read since the buffer last ran dry.
    burst: usize,
    /// Bursts left during which one thread keeps the read side and batches: set to
    /// [`DEEP_BURSTS`] by a burst of more than one request (the client keeps several in
    /// flight, and handing over would only add wake-ups), counted down by single ones.
    deep: u32,
    /// Set by the thread that ended the session; the others leave when they see it.
    end: Option<End>,
}

impl Shared {
    fn reader(&self) -> MutexGuard<'_, ReadSide> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one request. Rejected requests are answered into `out` (`Ok(None)`); valid ones
    /// come back with their payload and in-flight ticket. `Err` ends the session.
    fn read_one(&self, r: &mut BufReader<Socket>, out: &mut Vec<u8>) -> Result<Option<Job>, End> {
        let req = match read_request(r, self.export.extended) {
            Ok(Some(req)) => req,
            Ok(None) => return Err(End::Eof),
            Err(e) => return Err(End::Framing(e)),
        };
        if self.stopping.is_cancelled() {
            return self.refuse(r, req, out).map(|()| None);
        }
        let (errno, drain_len, why) = match validate(&req, &self.export) {
            Verdict::Close if req.kind == CMD_DISC => return Err(End::Disconnect),
            Verdict::Close => {
                return Err(End::Framing(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "payload too large to drain",
                )))
            }
            Verdict::Reject { errno, drain, why } => (errno, drain, why),
            Verdict::Run => (0, 0, ""),
        };
        if errno != 0 {
            self.metrics.rejected(req.kind);
            drain(r, drain_len).map_err(|e| self.cut_short(req, e, out))?;
            self.enc.encode(out, req, Outcome::Error(errno, why));
            return Ok(None);
        }
        let data_bytes = if matches!(req.kind, CMD_READ | CMD_WRITE) {
            req.len as usize
        } else {
            0
        };
        if !out.is_empty() && self.gate.full() {
            // We may block in the gate: do not sit on replies meanwhile.
            send(&self.write_half, out, None).map_err(End::WriterGone)?;
        }
        let mut ticket = self.gate.enter(data_bytes);
        if data_bytes > 0 {
            if !out.is_empty() && !self.budgets.payload.has_room(data_bytes) {
                send(&self.write_half, out, None).map_err(End::WriterGone)?;
            }
            let lease = self.budgets.payload.take(data_bytes, &self.ended);
            if !ticket.hold(lease) && !self.stopping.is_cancelled() {
                return Err(End::WriterGone(io::Error::other(
                    "the session ended while a request waited for the payload budget",
                )));
            }
        }
        if self.stopping.is_cancelled() {
            // The session stopped while this request waited for room: it has not started.
            drop(ticket);
            return self.refuse(r, req, out).map(|()| None);
        }
        let payload = if req.kind == CMD_WRITE {
            let mut buf = IoBuf::with_len(req.len as usize);
            r.read_exact(buf.as_mut_slice())
                .map_err(|e| self.cut_short(req, e, out))?;
            Some(buf)
        } else {
            None
        };
        Ok(Some(Job {
            req,
            payload,
            ticket,
        }))
    }

    /// Answers a job inline (into `out`) or starts it on the engine.
    fn process(
        &self,
        job: Job,
        out: &mut Vec<u8>,
        tx: &mpsc::Sender<Reply>,
        alone: bool,
    ) -> io::Result<()> {
        let Job {
            req,
            payload,
            ticket,
        } = job;
        let started = Instant::now();
        self.metrics.started();
        match inline(&self.volume, &req, payload, alone) {
            Ok(outcome) => {
                self.metrics.finished(
                    req.kind,
                    req.len,
                    matches!(outcome, Outcome::Error(..)),
                    started,
                );
                queue(
                    &self.enc,
                    &self.write_half,
                    out,
                    Reply {
                        req,
                        outcome,
                        _ticket: Some(ticket),
                    },
                )
            }
            Err(payload)
                if matches!(req.kind, CMD_READ | CMD_WRITE)
                    && self.volume.is_direct_path(
                        req.kind == CMD_WRITE,
                        req.offset,
                        req.len as usize,
                    ) =>
            {
                // O_DIRECT: straight to the ring; the reply goes from the ring's thread to the
                // writer thread, with no async task in between.
                let buf = payload.unwrap_or_else(|| IoBuf::with_len(req.len as usize));
                let (tx, metrics) = (tx.clone(), Arc::clone(&self.metrics));
                let fua = req.flags & CMD_FLAG_FUA != 0;
                let write = req.kind == CMD_WRITE;
                self.volume
                    .submit_direct(write, req.offset, buf, fua, move |buf, res| {
                        let outcome = match res {
                            Ok(()) if !write => Outcome::Data(buf),
                            Ok(()) => Outcome::Done,
                            Err(e) => io_error(&e),
                        };
                        complete(&tx, &metrics, req, outcome, ticket, started);
                    });
                Ok(())
            }
            Err(payload) => {
                let (tx, volume, metrics) = (
                    tx.clone(),
                    Arc::clone(&self.volume),
                    Arc::clone(&self.metrics),
                );
                self.runtime.spawn(async move {
                    let outcome = execute(&volume, req, payload).await;
                    complete(&tx, &metrics, req, outcome, ticket, started);
                });
                Ok(())
            }
        }
    }

    /// One connection thread. It takes the read side and serves requests while complete
    /// ones are buffered, batching replies. When no complete request is buffered it hands
    /// the read side over before working on the last one, so another thread is already
    /// waiting in `recv` when the client's next request arrives (nbdkit's order), then sends
    /// its batch. A client that keeps several requests in flight is the exception: one
    /// thread keeps the read side from request to request (see [`DEEP_BURSTS`]), sending its
    /// batch before each `recv` that could block.
    ///
    /// Invariant: a thread never blocks (on the read side's lock, or reading the socket)
    /// while it holds unsent replies. The client may be waiting for them before it sends
    /// more, so blocking there would deadlock the session.
    fn worker<'scope>(
        &'scope self,
        tx: &mpsc::Sender<Reply>,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) {
        let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES + COPY_MAX_BYTES);
        // The read side kept from the last request. It stays locked from one request to the
        // next: unlocking it while another thread waits for it would wake that thread (a
        // futex wake and a context switch per request) only for it to sleep again.
        let mut kept: Option<MutexGuard<'_, ReadSide>> = None;
        let result = loop {
            let mut rd = match kept.take() {
                Some(guard) => guard,
                None => match self.reader.try_lock() {
                    Ok(guard) => guard,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if let Err(e) = send(&self.write_half, &mut out, None) {
                            break Err(e);
                        }
                        self.reader()
                    }
                },
            };
            if rd.end.is_some() {
                break Ok(());
            }
            if self.stopping.is_cancelled() {
                let end = self.refuse_received(&mut rd.buf, &mut out);
                self.finish(&mut rd, end);
                break Ok(());
            }
            if !out.is_empty() && !complete_request(rd.buf.buffer(), self.export.extended) {
                if let Err(e) = send(&self.write_half, &mut out, None) {
                    break Err(e);
                }
            }
            let job = match self.read_one(&mut rd.buf, &mut out) {
                Ok(job) => job,
                Err(end) => {
                    self.finish(&mut rd, end);
                    break Ok(());
                }
            };
            // Keep the read side (and keep batching) only for small requests with another one
            // already buffered; a large request is worth running beside the next one.
            let small = job
                .as_ref()
                .is_none_or(|j| j.req.len < COPY_MAX_BYTES as u64);
            let more = small && complete_request(rd.buf.buffer(), self.export.extended);
            rd.burst += 1;
            if rd.buf.buffer().is_empty() {
                rd.deep = if rd.burst > 1 {
                    DEEP_BURSTS
                } else {
                    rd.deep.saturating_sub(1)
                };
                rd.burst = 0;
            }
            // Nothing buffered and nothing else in flight: latency matters more than overlap.
            let alone = !more && self.gate.in_flight() == 1;
            // A lone O_DIRECT transfer sleeps on the disk: handing the read side over would
            // only add a wake-up of the other thread to every round trip (measured: QD1 p50
            // 111 us with the hand-off, 76 us without). Keep it, after sending any replies.
            // Only while the client really runs one request at a time: if the next request
            // arrived during a held transfer, holding would serialise it, so stop for a while.
            let may_hold = self
                .no_hold
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_err();
            let on_disk = may_hold
                && alone
                && small
                && job.as_ref().is_some_and(|j| self.sleeps_on_disk(&j.req));
            let held = if more || on_disk || (rd.deep > 0 && small) {
                Some(rd)
            } else {
                drop(rd);
                None
            };
            if on_disk && !out.is_empty() {
                if let Err(e) = send(&self.write_half, &mut out, None) {
                    break Err(e);
                }
            }
            let large_write = job
                .as_ref()
                .is_some_and(|j| j.req.kind == CMD_WRITE && !small);
            if (alone && small && held.is_none()) || large_write {
                self.count_toward_growth(tx, scope);
            }
            if let Some(job) = job {
                if let Err(e) = self.process(job, &mut out, tx, alone) {
                    break Err(e);
                }
            }
            // Before the reply goes out: a QD1 client cannot have sent anything yet, so bytes
            // waiting now mean it has more requests in flight.
            if on_disk && self.control.readable() {
                self.no_hold.store(HOLD_BACKOFF_REQUESTS, Relaxed);
            }
            if !more && !out.is_empty() {
                if let Err(e) = send(&self.write_half, &mut out, None) {
                    break Err(e);
                }
            }
            kept = held;
        };
        drop(kept);
        let result = result.and_then(|()| send(&self.write_half, &mut out, None));
        if let Err(e) = result {
            self.finish(&mut self.reader(), End::WriterGone(e));
        }
    }

    /// Counts a lone small request handed over or a large write; at
    /// [`REQUESTS_BEFORE_GROWTH`] the connection grows to [`CONNECTION_THREADS_MAX`] threads
    /// (once).
    fn count_toward_growth<'scope>(
        &'scope self,
        tx: &mpsc::Sender<Reply>,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) {
        let grow = self
            .toward_growth
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < REQUESTS_BEFORE_GROWTH).then_some(n + 1)
            })
            .is_ok_and(|n| n + 1 == REQUESTS_BEFORE_GROWTH);
        if grow {
            for _ in CONNECTION_THREADS..CONNECTION_THREADS_MAX {
                // The server's thread budget decides how far a session grows.
                let Some(lease) = self.budgets.threads.grow_one() else {
                    break;
                };
                if !self.spawn_worker(Some(lease), tx, scope) {
                    break;
                }
            }
        }
    }

    /// Starts one more connection thread (counted by `lease` if it is beyond the session's
    /// base); a thread that cannot start is only a warning.
    fn spawn_worker<'scope>(
        &'scope self,
        lease: Option<ThreadLease>,
        tx: &mpsc::Sender<Reply>,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> bool {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn_scoped(scope, move || {
                self.worker(&tx, scope);
                drop(lease);
            });
        match spawned {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start another connection thread");
                false
            }
        }
    }

    /// Whether `inline` would serve this request with a blocking `O_DIRECT` transfer.
    fn sleeps_on_disk(&self, req: &Request) -> bool {
        matches!(req.kind, CMD_READ | CMD_WRITE)
            && req.flags & CMD_FLAG_FUA == 0
            && self
                .volume
                .is_direct_path(req.kind == CMD_WRITE, req.offset, req.len as usize)
    }

    /// Records why the session ended (first reason wins) and wakes a thread blocked reading.
    fn finish(&self, rd: &mut ReadSide, end: End) {
        if rd.end.is_none() {
            rd.end = Some(end);
        }
        self.ended.cancel();
        self.control.shutdown_read();
    }
}

/// Runs the transmission phase on dedicated threads until the session ends.
pub fn run(
    sock: Socket,
    neg: Negotiated,
    runtime: Handle,
    metrics: Arc<SessionMetrics>,
    stopping: CancellationToken,
    budgets: Arc<Budgets>,
) -> End {
    // This thread, the second worker and the writer: covered by the session's slot.
    let _base = budgets.threads.base(CONNECTION_THREADS_BASE);
    if let Err(e) = sock.set_send_timeout(budgets.send_timeout) {
        return End::WriterGone(e);
    }
    let enc = Encoder::new(
        neg.structured,
        neg.extended,
        neg.meta_allocation.unwrap_or(0),
    );
    let (write_half, control) = match sock
        .try_clone()
        .and_then(|w| sock.try_clone().map(|c| (w, c)))
    {
        Ok((w, c)) => (Arc::new(Mutex::new(w)), c),
        Err(e) => return End::WriterGone(e),
    };
    let (tx, rx) = mpsc::channel::<Reply>();
    let ended = stopping.child_token();
    let writer = {
        let (sock, ended) = (Arc::clone(&write_half), ended.clone());
        std::thread::Builder::new()
            .name("nbd-writer".into())
            .spawn(move || writer_loop(rx, sock, enc, ended))
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => return End::WriterGone(e),
    };
    let volume = Arc::clone(&neg.volume);
    let shared = Shared {
        export: Export {
            size: volume.size_bytes(),
            read_only: volume.read_only(),
            structured: neg.structured,
            extended: neg.extended,
            meta_allocation: neg.meta_allocation.is_some(),
        },
        volume,
        enc,
        gate: Arc::new(Gate::default()),
        write_half: Arc::clone(&write_half),
        control,
        no_hold: std::sync::atomic::AtomicU32::new(0),
        toward_growth: std::sync::atomic::AtomicU32::new(0),
        reader: Mutex::new(ReadSide {
            burst: 0,
            deep: 0,
            buf: BufReader::with_capacity(READ_BUFFER_BYTES, sock),
            end: None,
        }),
        runtime,
        metrics,
        stopping,
        ended,
        budgets,
    };
    std::thread::scope(|scope| {
        for _ in 1..CONNECTION_THREADS {
            shared.spawn_worker(None, &tx, scope);
        }
        shared.worker(&tx, scope);
    });
    // Requests already read still complete: the writer ends once the last in-flight task
    // has sent its reply and dropped its sender.
    drop(tx);
    let written = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
    write_half
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown_write();
    let end = shared
        .reader
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .end
        .unwrap_or(End::Eof);
    match (end, written) {
        (end @ (End::Eof | End::Disconnect), _) | (end, Ok(())) => end,
        (_, Err(e)) => End::WriterGone(e),
    }
}
