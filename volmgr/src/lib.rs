//! `volmgr`: the volume manager.
//!
//! - [`catalog`]: catalog types and the crc32c-checked, atomically replaced local store;
//! - [`manager`]: the node's volumes and the admin operations on them;
//! - [`volume`]: an open volume, its layout resolved onto components;
//! - [`api`]: admin API types shared by `blockd` and `volctl`;
//! - [`size`]: operator-friendly byte sizes.
#![forbid(unsafe_code)]

pub mod api;
pub mod catalog;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod manager;
pub mod size;
pub mod volume;

pub use error::{Error, ErrorKind};
pub use manager::{ManagerConfig, VolumeManager};
pub use volume::{Attachment, Volume};
