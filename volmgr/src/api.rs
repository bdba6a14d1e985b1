//! Admin API types: the JSON that `blockd` serves and `volctl` sends and prints.
//!
//! Routes (HTTP/1.1 on the admin Unix socket):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/status` | | [`StatusInfo`] |
//! | GET | `/v1/volumes` | | `[VolumeInfo]` |
//! | POST | `/v1/volumes` | [`CreateVolume`] | 201 [`VolumeInfo`] |
//! | GET | `/v1/volumes/{name}` | | [`VolumeInfo`] |
//! | POST | `/v1/volumes/{name}/resize` | [`ResizeVolume`] | [`VolumeInfo`] |
//! | DELETE | `/v1/volumes/{name}?force=true` | | 204 |
//! | GET | `/metrics` | | Prometheus text |
//!
//! Errors are a status code (400 invalid, 404 not found, 409 conflict, 500 internal) with an
//! [`ApiError`] body whose message says what to fix.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub cache: String,
    pub layout: String,
    pub connections: usize,
    pub allocated_bytes: u64,
    /// Served from a file given on the command line, not in the catalog.
    pub ephemeral: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub read_only: bool,
    /// `none` or `writeback`; the daemon's default when absent.
    #[serde(default)]
    pub cache: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeVolume {
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub uptime_seconds: u64,
    pub data_dir: String,
    pub engine: String,
    pub nbd_tcp: Vec<String>,
    pub nbd_unix: String,
    pub volumes: usize,
    pub connections: usize,
    pub catalog_generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
