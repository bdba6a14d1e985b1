//! `volctl`: create, list, inspect, grow and delete volumes on a running blockd, and clean up
//! orphan files (volume files no catalog record names, left by a crash mid-operation).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hyper::Method;
use volmgr::api::{
    BudgetInfo, CreateVolume, OrphanInfo, ResizeVolume, StatusInfo, VolumeInfo, VolumeState,
};
use volmgr::size::{format_size, parse_size};

use crate::client::{Client, ClientError};

#[derive(Debug, Parser)]
#[command(name = "volctl", version, about = "Manage blockd volumes")]
pub struct Cli {
    /// blockd's admin socket.
    #[arg(
        long,
        global = true,
        env = "BLOCKD_SOCKET",
        default_value = "/var/lib/blockd/admin.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Volume operations.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Daemon status, with unavailable volumes and orphan files.
    Status,
    /// Orphan files: files in the data directory's volumes/ that no catalog record names.
    ///
    /// A crash (or kill -9) between creating a volume's file and recording it, or between
    /// recording a delete and removing the file, leaves one. They are never reused and never
    /// block anything, but they hold space. `volctl status` reports them.
    #[command(subcommand)]
    Orphans(OrphansCmd),
}

#[derive(Debug, Subcommand)]
pub enum OrphansCmd {
    /// List orphan files with their size and age.
    List,
    /// Remove orphan files: the FILEs named (as `orphans list` prints them), or every orphan
    /// with --all. A file that belongs to a volume is refused.
    Remove {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        files: Vec<String>,
        /// Remove every orphan file.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: SIZE takes K/M/G/T suffixes (powers of 1024).
    Create {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        read_only: bool,
        /// none (O_DIRECT) or writeback (page cache); the daemon's default if omitted.
        #[arg(long, value_parser = ["none", "writeback"])]
        cache: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Grow a volume to SIZE (connected clients see it after they reconnect).
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and its data.
    Delete {
        name: String,
        /// Delete even with clients connected (they are disconnected).
        #[arg(long)]
        force: bool,
    },
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn volume_rows(volumes: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "NAME", "SIZE", "USED", "LAYOUT", "CACHE", "MODE", "CLIENTS", "STATE",
    ]
    .map(String::from)
    .to_vec()];
    for v in volumes {
        rows.push(vec![
            v.name.clone(),
            format_size(v.size_bytes),
            format_size(v.allocated_bytes),
            v.layout.clone(),
            v.cache.clone(),
            if v.read_only {
                "ro".into()
            } else {
                "rw".into()
            },
            v.connections.to_string(),
            state_of(v),
        ]);
    }
    table(&rows)
}

/// `available`, or `unavailable: REASON`.
fn state_of(v: &VolumeInfo) -> String {
    match (&v.state, &v.reason) {
        (VolumeState::Unavailable, Some(reason)) => format!("unavailable: {reason}"),
        (state, _) => state.to_string(),
    }
}

fn orphan_rows(orphans: &[OrphanInfo]) -> String {
    let mut rows = vec![["FILE", "SIZE", "USED", "MODIFIED (UNIX)"]
        .map(String::from)
        .to_vec()];
    for o in orphans {
        rows.push(vec![
            o.file.clone(),
            format_size(o.size_bytes),
            format_size(o.allocated_bytes),
            o.modified_unix.to_string(),
        ]);
    }
    table(&rows)
}

fn volume_detail(v: &VolumeInfo) -> String {
    let rows = vec![
        vec!["name".into(), v.name.clone()],
        vec!["id".into(), v.id.to_string()],
        vec![
            "size".into(),
            format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
        ],
        vec![
            "allocated".into(),
            format!(
                "{} ({} bytes)",
                format_size(v.allocated_bytes),
                v.allocated_bytes
            ),
        ],
        vec!["layout".into(), v.layout.clone()],
        vec!["cache".into(), v.cache.clone()],
        vec!["read-only".into(), v.read_only.to_string()],
        vec!["clients".into(), v.connections.to_string()],
        vec!["in catalog".into(), (!v.ephemeral).to_string()],
        vec!["state".into(), state_of(v)],
    ];
    table(&rows)
}

fn path_of(name: &str) -> String {
    format!("/v1/volumes/{}", escape(name))
}

/// Volume and file names are restricted to [A-Za-z0-9._-]; escape anything else the user
/// typed so the daemon's validation (not URL parsing) produces the error.
fn escape(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One line per server-wide budget: used/limit, and how often it refused or made a request
/// wait since start.
fn budget_summary(budgets: &[BudgetInfo]) -> String {
    budgets
        .iter()
        .map(|b| {
            let (used, limit) = if b.name.ends_with("_bytes") {
                (format_size(b.used), format_size(b.limit))
            } else {
                (b.used.to_string(), b.limit.to_string())
            };
            format!("{} {used}/{limit} (refused {})", b.name, b.refused)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs one command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, ClientError> {
    let client = Client::new(&cli.socket);
    let json = cli.json;
    Ok(match cli.command {
        Command::Status => {
            let s: StatusInfo = client.get("/v1/status").await?;
            if json {
                pretty(&s)
            } else {
                table(&[
                    vec!["version".into(), s.version],
                    vec!["uptime".into(), format!("{} s", s.uptime_seconds)],
                    vec!["data dir".into(), s.data_dir],
                    vec!["engine".into(), s.engine],
                    vec!["nbd tcp".into(), s.nbd_tcp.join(", ")],
                    vec!["nbd unix".into(), s.nbd_unix],
                    vec!["volumes".into(), s.volumes.to_string()],
                    vec!["clients".into(), s.connections.to_string()],
                    vec![
                        "catalog generation".into(),
                        s.catalog_generation.to_string(),
                    ],
                    vec!["unavailable volumes".into(), s.unavailable.to_string()],
                    vec!["budgets".into(), budget_summary(&s.budgets)],
                    vec![
                        "orphan files".into(),
                        if s.orphans.is_empty() {
                            "0".into()
                        } else {
                            format!(
                                "{}: {} (volctl orphans remove FILE...)",
                                s.orphans.len(),
                                s.orphans
                                    .iter()
                                    .map(|o| o.file.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        },
                    ],
                ])
            }
        }
        Command::Orphans(OrphansCmd::List) => {
            let list: Vec<OrphanInfo> = client.get("/v1/orphans").await?;
            if json {
                pretty(&list)
            } else if list.is_empty() {
                "no orphan files\n".into()
            } else {
                orphan_rows(&list)
            }
        }
        Command::Orphans(OrphansCmd::Remove { files, all }) => {
            let files = if all {
                let list: Vec<OrphanInfo> = client.get("/v1/orphans").await?;
                list.into_iter().map(|o| o.file).collect()
            } else {
                files
            };
            let mut out = String::new();
            for file in &files {
                client
                    .call(
                        Method::DELETE,
                        &format!("/v1/orphans/{}", escape(file)),
                        None,
                    )
                    .await?;
                out.push_str(&format!("removed orphan file {file}\n"));
            }
            if json {
                pretty(&files)
            } else if files.is_empty() {
                "no orphan files\n".into()
            } else {
                out
            }
        }
        Command::Volume(VolumeCmd::List) => {
            let list: Vec<VolumeInfo> = client.get("/v1/volumes").await?;
            if json {
                pretty(&list)
            } else if list.is_empty() {
                "no volumes (create one with: volctl volume create NAME SIZE)\n".into()
            } else {
                volume_rows(&list)
            }
        }
        Command::Volume(VolumeCmd::Show { name }) => {
            let v: VolumeInfo = client.get(&path_of(&name)).await?;
            if json {
                pretty(&v)
            } else {
                volume_detail(&v)
            }
        }
        Command::Volume(VolumeCmd::Create {
            name,
            size,
            read_only,
            cache,
        }) => {
            let v: VolumeInfo = client
                .post(
                    "/v1/volumes",
                    &CreateVolume {
                        name,
                        size_bytes: size,
                        read_only,
                        cache,
                    },
                )
                .await?;
            if json {
                pretty(&v)
            } else {
                format!(
                    "created volume {} ({})\n",
                    v.name,
                    format_size(v.size_bytes)
                )
            }
        }
        Command::Volume(VolumeCmd::Resize { name, size }) => {
            let v: VolumeInfo = client
                .post(
                    &format!("{}/resize", path_of(&name)),
                    &ResizeVolume { size_bytes: size },
                )
                .await?;
            if json {
                pretty(&v)
            } else {
                format!("volume {} is now {}\n", v.name, format_size(v.size_bytes))
            }
        }
        Command::Volume(VolumeCmd::Delete { name, force }) => {
            let path = format!(
                "{}{}",
                path_of(&name),
                if force { "?force=true" } else { "" }
            );
            client.call(Method::DELETE, &path, None).await?;
            if json {
                "{\"deleted\":true}\n".into()
            } else {
                format!("deleted volume {name}\n")
            }
        }
    })
}

/// Pretty JSON for `--json` output.
fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}\n"))
}
