//! Operator tools for blockd. `volctl` talks to a running daemon only through its admin API.
#![forbid(unsafe_code)]

pub mod client;
pub mod proto_bench;
pub mod volctl;
