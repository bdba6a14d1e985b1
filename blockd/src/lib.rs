//! The blockd daemon: NBD gateway, admin API, metrics, wiring. `main.rs` only parses the
//! command line and calls [`server::run`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod budget;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod nbd;
pub mod server;
