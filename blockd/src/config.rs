//! Command-line configuration of the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EngineArg {
    /// io_uring when the kernel has it, else the sync engine.
    Auto,
    Uring,
    Sync,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CacheArg {
    None,
    Writeback,
}

impl From<CacheArg> for raid::CacheMode {
    fn from(c: CacheArg) -> Self {
        match c {
            CacheArg::None => raid::CacheMode::None,
            CacheArg::Writeback => raid::CacheMode::Writeback,
        }
    }
}

/// blockd: serves volumes as block devices over NBD.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Data directory: catalog, volume files, sockets (created if missing).
    #[arg(long, env = "BLOCKD_DATA_DIR", default_value = "/var/lib/blockd")]
    pub data_dir: PathBuf,

    /// TCP address for NBD (repeatable). Loopback by default: expose it deliberately.
    #[arg(long = "listen", default_value = "127.0.0.1:10809")]
    pub listen: Vec<SocketAddr>,

    /// Do not listen on TCP at all (Unix socket only).
    #[arg(long, conflicts_with = "listen")]
    pub no_tcp: bool,

    /// Create the volume NAME of SIZE at start-up unless it exists (repeatable), e.g. disk0=10G.
    #[arg(long = "volume", value_name = "NAME=SIZE")]
    pub volumes: Vec<String>,

    /// Serve an existing file as an extra volume, not recorded in the catalog.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Export name of the --file volume.
    #[arg(long, default_value = "file", requires = "file")]
    pub file_name: String,

    /// Volume served to clients asking for the empty export name. Default: the --file volume,
    /// else the only volume if there is exactly one.
    #[arg(long)]
    pub default_volume: Option<String>,

    /// Cache mode for new volumes and --file. writeback: page cache, durable on FLUSH/FUA.
    /// none: O_DIRECT.
    #[arg(long, value_enum, default_value = "writeback")]
    pub cache: CacheArg,

    /// Device I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineArg,

    /// Most concurrent NBD sessions; a client beyond it is refused with the reason
    /// (connections still negotiating have their own budget, see `volctl status`).
    #[arg(long, default_value_t = crate::nbd::limits::CONNECTIONS_DEFAULT_MAX)]
    pub max_connections: usize,

    /// Seconds a reply may wait for a client that does not read before its session ends.
    #[arg(long, default_value_t = crate::nbd::limits::SEND_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub send_timeout: u64,

    /// Async worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// Server certificate chain (PEM) for NBD over TLS (STARTTLS). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM): clients must present a certificate signed by one of them.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// require: clients must upgrade to TLS before anything else (the default once TLS is
    /// configured); allow: plain clients are served too.
    #[arg(long, value_enum, requires = "tls_cert")]
    pub tls: Option<crate::nbd::tls::TlsMode>,

    /// Group allowed to use the NBD Unix socket (mode 0660); without it the socket is 0600.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log: String,
}
