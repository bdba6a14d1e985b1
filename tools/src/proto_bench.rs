//! `proto-bench`: the parity write protocol between two processes over loopback TCP, on
//! device files on a real disk, beside what the disk itself does.
//!
//! It measures, in this order:
//! 1. a local 4 KiB `pwrite` + `fdatasync` at QD1 (the latency bar: toughness 2 should be
//!    within 2x of it);
//! 2. the disk's durable 4 KiB write IOPS at QD32 (32 threads, each `pwrite` + `fdatasync`);
//! 3. the protocol on a K=1 layout (one data column and its parity, two nodes): this
//!    process runs node 0 and drives writes to the stripes whose data it holds; a child
//!    process (this binary, `serve`) runs node 1, the parity node of those stripes. Each
//!    toughness at each queue depth runs for `--seconds`, and reports IOPS, p50 and p99.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raid::protocol::net::{self, NetConfig, NodeHandle};
use raid::protocol::sim::Rng;
use raid::protocol::{Layout, Toughness};

pub const BLOCK: usize = 4096;
const CLUSTER: u64 = 0x0b10_cd00_be4c;
/// A write slower than this is a stall: the run stops and prints the node's state.
const STALL: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub dir: PathBuf,
    pub seconds: f64,
    pub rounds: usize,
    pub stripes: u64,
    pub toughness: Vec<u8>,
    pub depths: Vec<usize>,
}

pub fn layout(stripes: u64) -> Layout {
    Layout {
        data_columns: 1,
        stripes,
        block_bytes: BLOCK,
    }
}

/// Device sizes for a run of `runs` workloads of `seconds` each.
pub fn sizes(stripes: u64) -> (u64, u64) {
    // Checkpoints reclaim the journal: it needs room for a checkpoint (12 bytes a stripe)
    // and the records between two of them, not for the whole run.
    let journal = (64 << 20).max(stripes * 12 * 16);
    let locations = stripes + 2 * net::INFLIGHT_MAX as u64 + 64;
    (journal, locations)
}

fn config(
    id: usize,
    dir: &Path,
    stripes: u64,
    journal: u64,
    peers: Vec<(usize, SocketAddr)>,
) -> NetConfig {
    let (_, locations) = sizes(stripes);
    NetConfig {
        id,
        layout: layout(stripes),
        cluster: CLUSTER,
        device: dir.join(format!("node{id}.dev")),
        journal_bytes: journal,
        locations,
        peers,
        parity_timeout: net::PARITY_TIMEOUT,
        checkpoint_bytes: None,
    }
}

/// The child process: node 1. Prints `listening ADDR`, serves until its stdin closes or
/// the node stops.
pub fn serve(dir: &Path, stripes: u64, journal: u64) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening {addr}");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        // Node 0 connects to us; its address is not needed.
        let placeholder: SocketAddr = ([127, 0, 0, 1], 0).into();
        let cfg = config(1, dir, stripes, journal, vec![(0, placeholder)]);
        let (_handle, task) = net::start(cfg, listener).await.map_err(|e| e.to_string())?;
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        tokio::select! {
            r = task => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.to_string().contains("failed") => Ok(()), // node 0 hung up
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            _ = stdin_closed => Ok(()),
        }
    })
}

struct Peer {
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn spawn_peer(dir: &Path, stripes: u64, journal: u64) -> Result<(Peer, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--dir")
        .arg(dir)
        .arg("--stripes")
        .arg(stripes.to_string())
        .arg("--journal-bytes")
        .arg(journal.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the peer process: {e}"))?;
    let stdout = child.stdout.take().ok_or("peer has no stdout")?;
    let peer = Peer { child };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("peer process said {line:?}, not its address"))?;
    Ok((peer, addr))
}

#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn figures(mut lat: Vec<Duration>, elapsed: Duration) -> Figures {
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Figures {
        iops: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pick(0.5),
        p99_us: pick(0.99),
    }
}

fn prefilled(path: &Path, bytes: u64) -> Result<File, String> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    for i in 0..bytes >> 20 {
        f.write_all_at(&chunk, i << 20).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    // As the protocol's device files: no large folios left by the fill, no readahead.
    raid::protocol::file_disk::forget_cached(&f).map_err(|e| e.to_string())?;
    Ok(f)
}

/// 4 KiB `pwrite` + `fdatasync` at random offsets: `threads` at once for `seconds`.
pub fn local_durable_writes(dir: &Path, threads: usize, seconds: f64) -> Result<Figures, String> {
    const FILE_BYTES: u64 = 256 << 20;
    let file = Arc::new(prefilled(&dir.join("local.dev"), FILE_BYTES)?);
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (file, stop, failed) = (file.clone(), stop.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let block = vec![t as u8 + 1; BLOCK];
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.below(FILE_BYTES / BLOCK as u64) * BLOCK as u64;
                    let t0 = Instant::now();
                    if file
                        .write_all_at(&block, off)
                        .and_then(|()| file.sync_data())
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| "a writer thread panicked")?);
    }
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(dir.join("local.dev"));
    if failed.load(Ordering::Relaxed) > 0 {
        return Err("local writes failed".into());
    }
    Ok(figures(all, elapsed))
}

async fn drive(
    node: &NodeHandle,
    layout: Layout,
    toughness: Toughness,
    depth: usize,
    seconds: f64,
) -> Result<Figures, String> {
    let ours: Arc<Vec<u64>> = Arc::new(
        (0..layout.stripes)
            .filter(|&s| layout.column_of(s, 0).is_some())
            .collect(),
    );
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for q in 0..depth {
        let (node, ours) = (node.clone(), ours.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(q as u64 * 7919 + toughness as u64 + 1);
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let stripe = ours[rng.below(ours.len() as u64) as usize];
                let mut data = vec![0u8; BLOCK];
                let stamp = rng.next_u64().to_le_bytes();
                for chunk in data.chunks_exact_mut(8) {
                    chunk.copy_from_slice(&stamp);
                }
                let t0 = Instant::now();
                match tokio::time::timeout(STALL, node.write(stripe, data, toughness)).await {
                    Ok(r) => r.map_err(|e| e.to_string())?,
                    Err(_) => {
                        let state = node.describe().await.unwrap_or_default();
                        return Err(format!(
                            "a write to stripe {stripe} took over {STALL:?}: node 0 is {state}"
                        ));
                    }
                }
                lat.push(t0.elapsed());
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed();
    // Let the tail of toughness 0/1 writes harden before the next workload.
    match tokio::time::timeout(STALL, node.flush()).await {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => {
            let state = node.describe().await.unwrap_or_default();
            return Err(format!("a FLUSH took over {STALL:?}: node 0 is {state}"));
        }
    }
    Ok(figures(all, elapsed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One row of the report: its figures in every round, and each round's ratio to the local
/// bar measured in that same round.
#[derive(Default)]
struct Row {
    name: String,
    figures: Vec<Figures>,
    ratios: Vec<f64>,
    versus: &'static str,
}

impl Row {
    fn print(&self) {
        let m = |f: fn(&Figures) -> f64| median(self.figures.iter().map(f).collect());
        let ratios: Vec<String> = self.ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.2}x {} ({}) |",
            self.name,
            m(|f| f.iops),
            m(|f| f.p50_us),
            m(|f| f.p99_us),
            median(self.ratios.clone()),
            self.versus,
            ratios.join(", ")
        );
    }
}

/// Runs the whole benchmark, `rounds` times interleaved, and prints medians.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    println!(
        "proto-bench: {} KiB writes, files in {}, {} rounds of {:.1} s per workload",
        BLOCK >> 10,
        args.dir.display(),
        args.rounds,
        args.seconds
    );
    let mut levels = Vec::new();
    for &level in &args.toughness {
        levels.push(
            Toughness::from_level(level)
                .ok_or_else(|| format!("toughness {level} is not 0, 1 or 2"))?,
        );
    }
    let (journal, _) = sizes(args.stripes);
    let (peer, peer_addr) = spawn_peer(&args.dir, args.stripes, journal)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut local1 = Row {
        name: "local pwrite+fdatasync QD1".into(),
        versus: "p50",
        ..Row::default()
    };
    let mut local32 = Row {
        name: "local pwrite+fdatasync, 32 threads".into(),
        versus: "IOPS",
        ..Row::default()
    };
    let mut rows: Vec<Row> = Vec::new();
    for &depth in &args.depths {
        for level in &args.toughness {
            rows.push(Row {
                name: format!("toughness {level}, QD{depth}, two processes"),
                versus: if depth == 1 { "p50" } else { "IOPS" },
                ..Row::default()
            });
        }
    }
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let cfg = config(0, &args.dir, args.stripes, journal, vec![(1, peer_addr)]);
        let (node, _task) = net::start(cfg, listener).await.map_err(|e| e.to_string())?;
        let layout = layout(args.stripes);
        // Warm up: connections, allocator, page cache.
        drive(&node, layout, Toughness::Durable, 4, 0.5).await?;
        for round in 0..args.rounds {
            eprintln!("round {}/{}", round + 1, args.rounds);
            let l1 = local_durable_writes(&args.dir, 1, args.seconds)?;
            let l32 = local_durable_writes(&args.dir, 32, args.seconds)?;
            local1.figures.push(l1);
            local1.ratios.push(1.0);
            local32.figures.push(l32);
            local32.ratios.push(1.0);
            let mut row = 0;
            for &depth in &args.depths {
                for &toughness in &levels {
                    let f = drive(&node, layout, toughness, depth, args.seconds).await?;
                    let ratio = if depth == 1 {
                        f.p50_us / l1.p50_us
                    } else {
                        f.iops / l32.iops
                    };
                    rows[row].figures.push(f);
                    rows[row].ratios.push(ratio);
                    row += 1;
                }
            }
        }
        Ok::<(), String>(())
    });
    drop(rt);
    drop(peer);
    for id in 0..2 {
        let _ = std::fs::remove_file(args.dir.join(format!("node{id}.dev")));
    }
    result?;
    println!();
    println!("| workload | IOPS | p50 us | p99 us | vs local, median (per round) |");
    println!("|---|---:|---:|---:|---|");
    local1.print();
    local32.print();
    for row in &rows {
        row.print();
    }
    Ok(())
}
