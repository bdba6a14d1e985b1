//! The NBD server: wire format, limits, negotiation and the transmission phase.

pub mod conn;
pub mod handshake;
pub mod limits;
pub mod session;
pub mod socket;
pub mod tls;
pub mod wire;
