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
//! | GET | `/v1/orphans` | | `[OrphanInfo]` |
//! | DELETE | `/v1/orphans/{file}` | | 204 |
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
    /// Whether clients can attach; an unavailable volume says why in `reason`.
    #[serde(default)]
    pub state: VolumeState,
    /// Why the volume is unavailable (file missing, unreadable, bad catalog record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Whether a volume can be served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Served to clients.
    #[default]
    Available,
    /// In the catalog but not served: its file is missing or unreadable, or its record is
    /// invalid. Every other volume is served; `volume delete` removes it.
    Unavailable,
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeState::Available => "available",
            VolumeState::Unavailable => "unavailable",
        })
    }
}

/// A file in the volumes directory that no catalog record names: left by a crash between
/// creating a file and recording it (or dropping a record and removing its file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanInfo {
    /// File name inside the data directory's `volumes/`.
    pub file: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub modified_unix: u64,
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
    /// Volumes in the catalog that are not served (see [`VolumeInfo::reason`]).
    #[serde(default)]
    pub unavailable: usize,
    /// Files in the volumes directory that no catalog record names.
    #[serde(default)]
    pub orphans: Vec<OrphanInfo>,
    /// Server-wide budgets (handshakes, sessions, threads, payload bytes).
    #[serde(default)]
    pub budgets: Vec<BudgetInfo>,
}

/// One server-wide budget: what is in use, the limit, and how often it refused or made a
/// request wait since start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetInfo {
    pub name: String,
    pub used: u64,
    pub limit: u64,
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
