//! The write protocol between nodes that talk over loopback TCP, each on its own thread and
//! runtime with its own device file: writes from every node at every toughness, then a
//! FLUSH; recovery from the device files alone must find every write, and parity must be the
//! XOR of the data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use raid::journal::record::{replay, Body};
use raid::protocol::file_disk::{read_block, read_journal};
use raid::protocol::net::{self, NetConfig, NetError, NodeHandle};
use raid::protocol::recovery::{self, Recovered};
use raid::protocol::{Layout, NodeId, Toughness};

const BLOCK: usize = 4096;
const JOURNAL: u64 = 4 << 20;
const LOCATIONS: u64 = 1024 + 64;

fn layout() -> Layout {
    Layout {
        data_columns: 2,
        stripes: 64,
        block_bytes: BLOCK,
    }
}

fn block_for(stripe: u64, column: usize, round: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (stripe as usize * 31 + column * 7 + round as usize * 13 + i / 512) as u8;
    }
    b
}

/// A cluster's device files, listening sockets and node configurations, before any runs.
struct Cluster {
    dir: PathBuf,
    layout: Layout,
    nodes: Vec<(NetConfig, std::net::TcpListener)>,
}

fn cluster(name: &str, layout: Layout, parity_timeout: Duration) -> Cluster {
    let dir = std::env::temp_dir().join(format!("raid-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listeners: Vec<std::net::TcpListener> = (0..layout.nodes())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(id, listener)| {
            let cfg = NetConfig {
                id,
                layout,
                cluster: 7,
                device: dir.join(format!("node{id}.dev")),
                journal_bytes: JOURNAL,
                locations: LOCATIONS,
                peers: (0..layout.nodes())
                    .filter(|&p| p != id)
                    .map(|p| (p, addrs[p]))
                    .collect(),
                parity_timeout,
                // Small, so that the journal halves turn over during the test.
                checkpoint_bytes: Some(8 << 10),
            };
            (cfg, listener)
        })
        .collect();
    Cluster { dir, layout, nodes }
}

/// Runs a node on its own thread and current-thread runtime; `body` drives it once every
/// peer is connected, and the node stops when `body` returns.
fn spawn_node<F, Fut>(cfg: NetConfig, listener: std::net::TcpListener, body: F) -> JoinHandle<()>
where
    F: FnOnce(NodeHandle) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (node, _task) = net::start(cfg, listener).await.unwrap();
            body(node).await;
        });
    })
}

/// Blocks (without holding up the runtime) until `rx` receives or its sender is gone.
async fn wait_for(rx: std::sync::mpsc::Receiver<()>) {
    tokio::task::spawn_blocking(move || rx.recv())
        .await
        .unwrap()
        .ok();
}

/// What recovery makes of a cluster's device files alone.
struct OnDisk {
    files: Vec<File>,
    journals: Vec<Vec<Vec<u8>>>,
    rec: Recovered,
}

impl OnDisk {
    fn recover(c: &Cluster) -> OnDisk {
        let files: Vec<File> = c
            .nodes
            .iter()
            .map(|(cfg, _)| File::open(&cfg.device).unwrap())
            .collect();
        let journals: Vec<Vec<Vec<u8>>> = files
            .iter()
            .map(|f| read_journal(f, JOURNAL).unwrap())
            .collect();
        let rec = recovery::recover(&c.layout, &journals, LOCATIONS, |n, loc| {
            crc32c::crc32c(&read_block(&files[n], JOURNAL, BLOCK, loc).unwrap())
        });
        assert!(rec.violations.is_empty(), "{:?}", rec.violations);
        OnDisk {
            files,
            journals,
            rec,
        }
    }

    /// Node `n`'s recovered block of `stripe`.
    fn block(&self, n: NodeId, stripe: u64) -> Vec<u8> {
        let loc = self.rec.maps[n][stripe as usize];
        read_block(&self.files[n], JOURNAL, BLOCK, loc).unwrap()
    }

    /// Whether the stripe's parity is the XOR of its data columns.
    fn parity_holds(&self, layout: &Layout, stripe: u64) -> bool {
        let mut xor = vec![0u8; BLOCK];
        for column in 0..layout.data_columns {
            raid::parity::xor_into(
                &mut xor,
                &self.block(layout.data_node(stripe, column), stripe),
            );
        }
        xor == self.block(layout.parity_node(stripe), stripe)
    }
}

#[test]
fn writes_over_tcp_recover_from_the_device_files() {
    let c = cluster("tcp", layout(), net::PARITY_TIMEOUT);
    let layout = c.layout;
    let rounds = 3u64;
    let mut threads = Vec::new();
    let mut ready = Vec::new();
    let mut done = Vec::new();
    for (cfg, listener) in c
        .nodes
        .iter()
        .map(|(cfg, l)| (cfg.clone(), l.try_clone().unwrap()))
    {
        let id = cfg.id;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        threads.push(spawn_node(cfg, listener, move |node| async move {
            // Every write of this node's columns, at every toughness, all at once per round.
            let mut tasks = tokio::task::JoinSet::new();
            for round in 0..rounds {
                for stripe in 0..layout.stripes {
                    let Some(column) = layout.column_of(stripe, id) else {
                        continue;
                    };
                    let node = node.clone();
                    let level = ((stripe + round) % 3) as u8;
                    let toughness = Toughness::from_level(level).unwrap();
                    tasks.spawn(async move {
                        node.write(stripe, block_for(stripe, column, round), toughness)
                            .await
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.unwrap().unwrap();
                }
            }
            node.flush().await.unwrap();
            // A write to a stripe whose data this node does not hold is refused.
            let foreign = (0..layout.stripes)
                .find(|&s| layout.column_of(s, id).is_none())
                .unwrap();
            assert!(matches!(
                node.write(foreign, vec![0; BLOCK], Toughness::Durable)
                    .await,
                Err(NetError::NotDataNode { .. })
            ));
            ready_tx.send(()).unwrap();
            // Stay up (answering peers) until every node is done.
            wait_for(done_rx).await;
        }));
        ready.push(ready_rx);
        done.push(done_tx);
    }
    for r in &ready {
        r.recv().unwrap();
    }

    // Everything answered and flushed: recover from the files alone.
    let disk = OnDisk::recover(&c);
    // Checkpoints turned the journal halves over: recovery starts from one.
    let checkpointed = disk.journals.iter().flatten().any(|half| {
        matches!(
            replay(half, None).records.first().map(|r| &r.body),
            Some(Body::Checkpoint(_))
        )
    });
    assert!(checkpointed, "no node wrote a checkpoint");
    for stripe in 0..layout.stripes {
        for column in 0..layout.data_columns {
            assert!(
                disk.block(layout.data_node(stripe, column), stripe)
                    == block_for(stripe, column, rounds - 1),
                "stripe {stripe} column {column} lost its last write"
            );
        }
        assert!(
            disk.parity_holds(&layout, stripe),
            "stripe {stripe}: parity is not the XOR of its data"
        );
    }
    for (thread, done) in threads.into_iter().zip(done) {
        done.send(()).unwrap();
        thread.join().unwrap();
    }
    std::fs::remove_dir_all(&c.dir).ok();
}

#[test]
fn a_dead_parity_node_is_replaced_by_a_proxy_and_its_stripes_marked_for_repair() {
    let layout = Layout {
        data_columns: 2,
        stripes: 48,
        block_bytes: BLOCK,
    };
    let c = cluster("proxy", layout, Duration::from_millis(300));
    let (dead_tx, dead_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (wrote_tx, wrote_rx) = std::sync::mpsc::channel::<()>();
    let node = |id: usize| {
        let (cfg, l) = &c.nodes[id];
        (cfg.clone(), l.try_clone().unwrap())
    };
    let threads = vec![
        // Node 2 dies as soon as everyone is connected.
        {
            let (cfg, l) = node(2);
            spawn_node(cfg, l, move |_| async move { dead_tx.send(()).unwrap() })
        },
        // Node 1 stays up (it is the proxy) until the test is done.
        {
            let (cfg, l) = node(1);
            spawn_node(cfg, l, move |_| wait_for(done_rx))
        },
        // Node 0 writes every column it holds at toughness 2.
        {
            let (cfg, l) = node(0);
            spawn_node(cfg, l, move |node| async move {
                dead_rx.recv().unwrap();
                let mut tasks = tokio::task::JoinSet::new();
                for stripe in 0..layout.stripes {
                    let Some(column) = layout.column_of(stripe, 0) else {
                        continue;
                    };
                    let node = node.clone();
                    tasks.spawn(async move {
                        node.write(stripe, block_for(stripe, column, 1), Toughness::Durable)
                            .await
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.unwrap().unwrap();
                }
                node.flush().await.unwrap();
                wrote_tx.send(()).unwrap();
            })
        },
    ];
    wrote_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("node 0's writes did not all reach toughness 2");

    let disk = OnDisk::recover(&c);
    let expect_repair: std::collections::BTreeSet<u64> = (0..layout.stripes)
        .filter(|&s| layout.column_of(s, 0).is_some() && layout.parity_node(s) == 2)
        .collect();
    assert!(!expect_repair.is_empty());
    assert_eq!(disk.rec.repair, expect_repair, "stripes marked for repair");
    for stripe in 0..layout.stripes {
        let Some(column) = layout.column_of(stripe, 0) else {
            continue;
        };
        assert!(
            disk.block(0, stripe) == block_for(stripe, column, 1),
            "stripe {stripe}: node 0's write is lost"
        );
        if !disk.rec.repair.contains(&stripe) {
            assert!(disk.parity_holds(&layout, stripe), "stripe {stripe} parity");
        }
    }
    done_tx.send(()).unwrap();
    for t in threads {
        t.join().unwrap();
    }
    std::fs::remove_dir_all(&c.dir).ok();
}
