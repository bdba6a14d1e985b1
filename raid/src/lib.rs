//! `raid`: the storage engine of one blockd node.
//!
//! - [`buf`]: aligned, pooled I/O buffers (valid for `O_DIRECT`).
//! - [`engine`]: the device engine, io_uring on its own thread with a pread/pwrite fallback
//!   behind the same interface.
//! - [`component`]: one volume's sparse file on one device, on top of the engine.
//! - [`journal`]: crc32c-checked journal records, replay, and a group-committing file journal.
//! - [`parity`]: XOR delta, merge and rebuild.
//! - [`protocol`]: the data/parity write protocol, recovery, and its fault-injecting simulator.
//!
//! This crate knows nothing of NBD or of the catalog. Unsafe code lives only in `buf` and
//! `engine`, each block with a `// SAFETY:` comment.

pub mod buf;
pub mod component;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod journal;
pub mod parity;
pub mod protocol;

pub use buf::IoBuf;
pub use component::{CacheMode, Component, Extent};
pub use engine::{DeviceEngine, EngineKind, EnginePreference};
