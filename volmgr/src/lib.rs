//! `volmgr`: the volume manager.
//!
//! - [`catalog`]: catalog types and the crc32c-checked, atomically replaced local store;
//! - [`check`]: what catalog records may say, checked as the catalog is read;
//! - [`files`]: the data directory's files: private modes, component files, orphans;
//! - [`manager`]: the node's volumes, opened one by one (a bad one is unavailable, not fatal);
//! - [`ops`]: the admin operations (create, resize, delete, orphans), crash-ordered;
//! - [`volume`]: an open volume, its layout resolved onto components;
//! - [`api`]: admin API types shared by `blockd` and `volctl`;
//! - [`size`]: operator-friendly byte sizes.
#![forbid(unsafe_code)]

pub mod api;
mod backend;
pub mod catalog;
pub mod check;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod manager;
#[cfg(test)]
mod manager_tests;
pub mod ops;
pub mod size;
pub mod volume;

pub use error::{Error, ErrorKind};
pub use manager::{ManagerConfig, VolumeManager};
pub use volume::{Attachment, Volume};
