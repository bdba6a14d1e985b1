//! The device engine: asynchronous file I/O for one device.
//!
//! One [`DeviceEngine`] serves every component file on one device. Two implementations sit
//! behind the same interface:
//! - [`EngineKind::Uring`]: one io_uring ring owned by a dedicated thread. Submissions arrive
//!   over a channel; the thread moves each operation (and its buffer) into an in-flight table,
//!   pushes it onto the ring, and on completion hands the buffer back through a oneshot.
//! - [`EngineKind::Sync`]: `pread`/`pwrite`/`fdatasync`/`fallocate` on tokio's blocking pool,
//!   chosen at start-up where io_uring is unavailable (old kernel, seccomp, or by request).
//!
//! Both return the buffer to the caller whatever the outcome, so a failed operation never
//! loses the caller's data. An operation whose awaiting future is dropped still runs to
//! completion; the engine keeps its buffer and file open until then.

pub mod nowait;
mod sync;
mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::buf::IoBuf;

/// Which implementation an engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// What the operator asked for at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePreference {
    /// io_uring if the kernel offers every opcode we need, else the sync engine.
    Auto,
    Uring,
    Sync,
}

/// One operation on one file.
#[derive(Debug)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into `buf[buf_start..buf_start + len]`.
    Read {
        offset: u64,
        buf_start: usize,
        len: usize,
    },
    /// Write `buf[buf_start..buf_start + len]` at `offset`; `dsync` makes it durable (FUA).
    Write {
        offset: u64,
        buf_start: usize,
        len: usize,
        dsync: bool,
    },
    /// `fdatasync(2)`.
    Fdatasync,
    /// `fallocate(2)` with the raw `mode` bits (punch hole, zero range).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// An operation submitted to the engine; it owns its file handle and buffer until completion.
#[derive(Debug)]
pub struct Op {
    pub file: Arc<File>,
    pub kind: OpKind,
    pub buf: Option<IoBuf>,
}

/// The outcome of an [`Op`]: the buffer comes back in every case.
#[derive(Debug)]
pub struct Completion {
    pub buf: Option<IoBuf>,
    /// Bytes transferred (reads and writes) or 0.
    pub result: io::Result<usize>,
}

/// Called with an operation's completion. On the io_uring engine it runs on the ring's
/// thread, so it must be quick and must not block (hand the result to another thread).
pub type Callback = Box<dyn FnOnce(Completion) + Send>;

/// Errors starting an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_uring is unavailable: {0}")]
    UringUnavailable(String),
    #[error("cannot start the engine thread: {0}")]
    Thread(io::Error),
}

#[derive(Clone)]
enum Backend {
    Uring(Arc<uring::Ring>),
    Sync,
}

/// Handle to the engine of one device; cheap to clone.
#[derive(Clone)]
pub struct DeviceEngine {
    backend: Backend,
}

impl std::fmt::Debug for DeviceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEngine")
            .field("kind", &self.kind())
            .finish()
    }
}

impl DeviceEngine {
    /// Starts the engine for the device called `name` (used for the thread name and logs).
    pub fn start(name: &str, preference: EnginePreference) -> Result<DeviceEngine, EngineError> {
        match preference {
            EnginePreference::Sync => Ok(Self::sync()),
            EnginePreference::Uring => Ok(DeviceEngine {
                backend: Backend::Uring(Arc::new(uring::Ring::start(name)?)),
            }),
            EnginePreference::Auto => match uring::Ring::start(name) {
                Ok(ring) => Ok(DeviceEngine {
                    backend: Backend::Uring(Arc::new(ring)),
                }),
                Err(EngineError::UringUnavailable(why)) => {
                    tracing::warn!(device = name, %why, "io_uring unavailable; using the sync engine");
                    Ok(Self::sync())
                }
                Err(e) => Err(e),
            },
        }
    }

    /// The pread/pwrite engine (never fails to start).
    pub fn sync() -> DeviceEngine {
        DeviceEngine {
            backend: Backend::Sync,
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self.backend {
            Backend::Uring(_) => EngineKind::Uring,
            Backend::Sync => EngineKind::Sync,
        }
    }

    /// Runs `op` and returns its completion.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the operation: it completes in the background and
    /// its buffer is then released.
    pub async fn submit(&self, op: Op) -> Completion {
        match &self.backend {
            Backend::Uring(ring) => ring.submit(op).await,
            Backend::Sync => sync::run(op).await,
        }
    }

    /// Runs `op` and calls `done` with its completion, for callers that are not async tasks
    /// (an NBD connection thread): no task, no runtime hand-off. With io_uring, `done` runs
    /// on the ring's thread; the sync engine runs the operation on the calling thread.
    pub fn submit_with(&self, op: Op, done: Callback) {
        match &self.backend {
            Backend::Uring(ring) => ring.submit_with(op, done),
            Backend::Sync => done(sync::run_blocking(op)),
        }
    }
}
