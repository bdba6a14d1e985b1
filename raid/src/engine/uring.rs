//! The io_uring engine: one ring, owned by one thread, per device.
//!
//! Callers push a [`Submission`] onto a channel and poke an eventfd if the ring thread is
//! asleep. The thread moves each submission into its in-flight table (a slab indexed by the
//! SQE's `user_data`), which owns the operation's buffer and file handle until the CQE
//! arrives; only then is the buffer handed back through the submission's oneshot. An eventfd
//! read is always armed on the ring, so the thread sleeps in a single `io_uring_enter` and
//! wakes for either a completion or new work.
//!
//! Wake protocol (no lost wake-ups): the thread sets `sleeping`, drains the channel once more,
//! and only then waits; a sender enqueues first and then swaps `sleeping` to false, writing
//! the eventfd only if it was set. Both sides use SeqCst, so either the thread sees the new
//! item in its last drain or the sender sees `sleeping` and writes the eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use slab::Slab;
use tokio::sync::oneshot;

use super::{Callback, Completion, EngineError, Op, OpKind};

/// Ring size: bounds the operations in the kernel at once for one device. 256 covers many
/// connections at QD32 while keeping the ring's memory small; beyond it, work waits in the
/// thread's backlog (back-pressure, not failure).
const RING_ENTRIES: u32 = 256;
/// One in-flight slot is reserved for the armed eventfd read.
const INFLIGHT_MAX: usize = RING_ENTRIES as usize - 1;
const WAKE_TOKEN: u64 = u64::MAX;

/// Where a completion goes.
enum Done {
    /// An awaiting task (dropped receiver: the result is discarded).
    Task(oneshot::Sender<Completion>),
    /// A callback, run on this thread.
    Call(Callback),
}

impl Done {
    fn complete(self, c: Completion) {
        match self {
            Done::Task(tx) => {
                let _ = tx.send(c);
            }
            Done::Call(f) => f(c),
        }
    }
}

struct Submission {
    op: Op,
    done: Done,
}

struct Waker {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // An eventfd write only fails if the counter would overflow, which means a wake-up
            // is already pending: nothing to do either way.
            let _ = nix::unistd::write(&self.eventfd, &one);
        }
    }
}

pub(super) struct Ring {
    /// `None` only during `drop`.
    tx: Option<mpsc::Sender<Submission>>,
    waker: Arc<Waker>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Disconnect first, then wake the thread so it sees the disconnection; it finishes the
        // in-flight table and exits on its own.
        drop(self.tx.take());
        self.waker.sleeping.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

impl Ring {
    pub(super) fn start(name: &str) -> Result<Ring, EngineError> {
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| EngineError::UringUnavailable(format!("io_uring_setup: {e}")))?;
        probe(&ring)?;
        // SAFETY: eventfd(2) returns a fresh descriptor or -1; we check before taking ownership.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(EngineError::Thread(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a valid descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let waker = Arc::new(Waker {
            eventfd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let thread_waker = Arc::clone(&waker);
        std::thread::Builder::new()
            .name(format!("uring-{name}"))
            .spawn(move || {
                if let Err(e) = run(ring, rx, &thread_waker) {
                    tracing::error!(error = %e, "io_uring engine thread failed");
                }
            })
            .map_err(EngineError::Thread)?;
        Ok(Ring {
            tx: Some(tx),
            waker,
        })
    }

    /// Queues a submission; gives it back if the engine has stopped.
    fn send(&self, sub: Submission) -> Result<(), Submission> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(sub);
        };
        tx.send(sub).map_err(|mpsc::SendError(sub)| sub)?;
        self.waker.wake();
        Ok(())
    }

    pub(super) fn submit_with(&self, op: Op, done: Callback) {
        if let Err(sub) = self.send(Submission {
            op,
            done: Done::Call(done),
        }) {
            sub.done.complete(Completion {
                buf: sub.op.buf,
                result: Err(io::Error::other("io_uring engine has stopped")),
            });
        }
    }

    pub(super) async fn submit(&self, op: Op) -> Completion {
        let (done, wait) = oneshot::channel();
        if let Err(sub) = self.send(Submission {
            op,
            done: Done::Task(done),
        }) {
            return Completion {
                buf: sub.op.buf,
                result: Err(io::Error::other("io_uring engine has stopped")),
            };
        }
        match wait.await {
            Ok(done) => done,
            Err(_) => Completion {
                buf: None,
                result: Err(io::Error::other("io_uring engine stopped mid-operation")),
            },
        }
    }
}

fn probe(ring: &IoUring) -> Result<(), EngineError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| EngineError::UringUnavailable(format!("probe: {e}")))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(EngineError::UringUnavailable(format!(
                "kernel lacks IORING_OP_{name}"
            )));
        }
    }
    Ok(())
}

struct InFlight {
    sub: Submission,
}

fn run(mut ring: IoUring, rx: mpsc::Receiver<Submission>, waker: &Waker) -> io::Result<()> {
    let mut inflight: Slab<InFlight> = Slab::with_capacity(INFLIGHT_MAX);
    let mut backlog: VecDeque<Submission> = VecDeque::new();
    // The eventfd read target. Leaked on purpose: a read may still be armed when the ring is
    // torn down, and 8 bytes per engine lifetime is cheaper than proving it is not.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let mut wake_armed = false;
    let mut closing = false;

    loop {
        if !wake_armed && !closing {
            let sqe = opcode::Read::new(
                types::Fd(waker.eventfd.as_raw_fd()),
                wake_buf.as_mut_ptr(),
                8,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: `wake_buf` is leaked ('static) and the eventfd outlives this thread
            // (the waker Arc is held by the thread).
            if unsafe { push(&mut ring, &sqe) } {
                wake_armed = true;
            }
        }

        drain(&rx, &mut backlog, &mut closing);
        fill(&mut ring, &mut inflight, &mut backlog);

        if closing && inflight.is_empty() && backlog.is_empty() {
            break;
        }

        // Sleep only if nothing new arrived since the last drain.
        waker.sleeping.store(true, Ordering::SeqCst);
        let before = backlog.len();
        drain(&rx, &mut backlog, &mut closing);
        let want = if backlog.len() != before || (closing && inflight.is_empty()) {
            waker.sleeping.store(false, Ordering::SeqCst);
            0
        } else {
            1
        };
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                fail_all(&mut inflight, &mut backlog, &e);
                return Err(e);
            }
        }
        waker.sleeping.store(false, Ordering::SeqCst);

        for cqe in ring.completion() {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            let Ok(key) = usize::try_from(token) else {
                continue;
            };
            if let Some(entry) = inflight.try_remove(key) {
                let res = cqe.result();
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                };
                // A receiver that went away (cancelled caller) simply drops the buffer here.
                entry.sub.done.complete(Completion {
                    buf: entry.sub.op.buf,
                    result,
                });
            }
        }
    }
    Ok(())
}

fn drain(rx: &mpsc::Receiver<Submission>, backlog: &mut VecDeque<Submission>, closing: &mut bool) {
    loop {
        match rx.try_recv() {
            Ok(sub) => backlog.push_back(sub),
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => {
                *closing = true;
                return;
            }
        }
    }
}

/// Moves backlog entries onto the ring while there is room.
fn fill(ring: &mut IoUring, inflight: &mut Slab<InFlight>, backlog: &mut VecDeque<Submission>) {
    while inflight.len() < INFLIGHT_MAX {
        let Some(mut sub) = backlog.pop_front() else {
            return;
        };
        let entry = inflight.vacant_entry();
        let sqe = match build(&mut sub.op) {
            Ok(sqe) => sqe.user_data(entry.key() as u64),
            Err(e) => {
                sub.done.complete(Completion {
                    buf: sub.op.buf,
                    result: Err(e),
                });
                continue;
            }
        };
        // SAFETY: the SQE points into `sub.op.buf` (a heap allocation that does not move when
        // `sub` moves) and at `sub.op.file`'s descriptor; both are kept alive by the in-flight
        // table until the matching CQE is reaped.
        if unsafe { push(ring, &sqe) } {
            entry.insert(InFlight { sub });
        } else {
            // Submission queue full (completions not yet reaped): hand it back to the backlog.
            backlog.push_front(sub);
            return;
        }
    }
}

/// Pushes one SQE, submitting once to make room if the queue is full.
///
/// # Safety
/// Every buffer and descriptor the SQE references must stay valid until its CQE is reaped.
unsafe fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> bool {
    // SAFETY: forwarded from the caller.
    if unsafe { ring.submission().push(sqe) }.is_ok() {
        return true;
    }
    if ring.submit().is_err() {
        return false;
    }
    // SAFETY: forwarded from the caller.
    unsafe { ring.submission().push(sqe) }.is_ok()
}

fn build(op: &mut Op) -> io::Result<squeue::Entry> {
    let fd = types::Fd(op.file.as_raw_fd());
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    Ok(match op.kind {
        OpKind::Read {
            offset,
            buf_start,
            len,
        } => {
            let buf = op.buf.as_mut().ok_or_else(invalid)?;
            check_range(buf.len(), buf_start, len)?;
            let len32 = u32::try_from(len).map_err(|_| invalid())?;
            // SAFETY: `buf_start + len <= buf.len()` was checked above.
            let ptr = unsafe { buf.as_mut_ptr().add(buf_start) };
            opcode::Read::new(fd, ptr, len32).offset(offset).build()
        }
        OpKind::Write {
            offset,
            buf_start,
            len,
            dsync,
        } => {
            let buf = op.buf.as_mut().ok_or_else(invalid)?;
            check_range(buf.len(), buf_start, len)?;
            let len32 = u32::try_from(len).map_err(|_| invalid())?;
            // SAFETY: `buf_start + len <= buf.len()` was checked above.
            let ptr = unsafe { buf.as_mut_ptr().add(buf_start) };
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, len32)
                .offset(offset)
                .rw_flags(flags)
                .build()
        }
        OpKind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(mode)
            .build(),
    })
}

fn check_range(buf_len: usize, start: usize, len: usize) -> io::Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= buf_len => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

fn fail_all(inflight: &mut Slab<InFlight>, backlog: &mut VecDeque<Submission>, e: &io::Error) {
    // The ring itself failed: we cannot know whether in-flight operations ran, so their buffers
    // must stay put (the kernel may still touch them). Leak them deliberately rather than free
    // memory the kernel might write; report the failure to every waiter.
    for entry in inflight.drain() {
        let InFlight { sub } = entry;
        let Submission { op, done } = sub;
        std::mem::forget(op.buf);
        done.complete(Completion {
            buf: None,
            result: Err(io::Error::new(e.kind(), format!("io_uring failed: {e}"))),
        });
    }
    for sub in backlog.drain(..) {
        sub.done.complete(Completion {
            buf: sub.op.buf,
            result: Err(io::Error::new(e.kind(), format!("io_uring failed: {e}"))),
        });
    }
}
