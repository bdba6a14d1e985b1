//! The write protocol between nodes that talk over loopback TCP, each on its own thread and
//! runtime with its own device file: writes from every node at every toughness, then a
//! FLUSH; recovery from the device files alone must find every write, and parity must be the
//! XOR of the data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;

use raid::journal::record::{replay, Body};
use raid::protocol::file_disk::{read_block, read_journal};
use raid::protocol::net::{self, NetConfig, NetError};
use raid::protocol::{recovery, Layout, Toughness};

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

#[test]
fn writes_over_tcp_recover_from_the_device_files() {
    let dir = std::env::temp_dir().join(format!("raid-tcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let layout = layout();
    let listeners: Vec<std::net::TcpListener> = (0..layout.nodes())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let device = |id: usize| -> PathBuf { dir.join(format!("node{id}.dev")) };
    let rounds = 3u64;

    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(id, listener)| {
            let cfg = NetConfig {
                id,
                layout,
                cluster: 7,
                device: device(id),
                journal_bytes: JOURNAL,
                locations: LOCATIONS,
                peers: (0..layout.nodes())
                    .filter(|&p| p != id)
                    .map(|p| (p, addrs[p]))
                    .collect(),
                parity_timeout: net::PARITY_TIMEOUT,
                // Small, so that the journal halves turn over during the test.
                checkpoint_bytes: Some(8 << 10),
            };
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    listener.set_nonblocking(true).unwrap();
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let (node, _task) = net::start(cfg, listener).await.unwrap();
                    // Every write of this node's columns, at every toughness, QD8.
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
                    ready_tx.send(Ok(())).unwrap();
                    // Stay up (answering peers) until every node is done.
                    tokio::task::spawn_blocking(move || done_rx.recv())
                        .await
                        .unwrap()
                        .ok();
                });
            });
            (thread, ready_rx, done_tx)
        })
        .collect();
    for (_, ready, _) in &threads {
        ready.recv().unwrap().unwrap();
    }

    // Everything answered and flushed: recover from the files alone.
    let files: Vec<File> = (0..layout.nodes())
        .map(|id| File::open(device(id)).unwrap())
        .collect();
    let journals: Vec<Vec<Vec<u8>>> = files
        .iter()
        .map(|f| read_journal(f, JOURNAL).unwrap())
        .collect();
    // Checkpoints turned the journal halves over: recovery starts from one.
    let checkpointed = journals.iter().flatten().any(|half| {
        matches!(
            replay(half, None).records.first().map(|r| &r.body),
            Some(Body::Checkpoint(_))
        )
    });
    assert!(checkpointed, "no node wrote a checkpoint");
    let read = |n: usize, loc: u64| read_block(&files[n], JOURNAL, BLOCK, loc).unwrap();
    let rec = recovery::recover(&layout, &journals, LOCATIONS, |n, loc| {
        crc32c::crc32c(&read(n, loc))
    });
    assert!(rec.violations.is_empty(), "{:?}", rec.violations);
    for stripe in 0..layout.stripes {
        let mut xor = vec![0u8; BLOCK];
        for column in 0..layout.data_columns {
            let node = layout.data_node(stripe, column);
            let got = read(node, rec.maps[node][stripe as usize]);
            assert!(
                got == block_for(stripe, column, rounds - 1),
                "stripe {stripe} column {column} lost its last write"
            );
            raid::parity::xor_into(&mut xor, &got);
        }
        let p = layout.parity_node(stripe);
        assert!(
            xor == read(p, rec.maps[p][stripe as usize]),
            "stripe {stripe}: parity is not the XOR of its data"
        );
    }
    for (thread, _, done) in threads {
        done.send(()).unwrap();
        thread.join().unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_dead_parity_node_is_replaced_by_a_proxy_and_its_stripes_marked_for_repair() {
    let dir = std::env::temp_dir().join(format!("raid-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let layout = Layout {
        data_columns: 2,
        stripes: 48,
        block_bytes: BLOCK,
    };
    let listeners: Vec<std::net::TcpListener> = (0..layout.nodes())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let device = |id: usize| -> PathBuf { dir.join(format!("node{id}.dev")) };
    let (dead_tx, dead_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (wrote_tx, wrote_rx) = std::sync::mpsc::channel::<()>();
    let mut dead_tx = Some(dead_tx);
    let mut dead_rx = Some(dead_rx);
    let mut done_rx = Some(done_rx);
    let mut wrote_tx = Some(wrote_tx);
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(id, listener)| {
            let cfg = NetConfig {
                id,
                layout,
                cluster: 9,
                device: device(id),
                journal_bytes: JOURNAL,
                locations: LOCATIONS,
                peers: (0..layout.nodes())
                    .filter(|&p| p != id)
                    .map(|p| (p, addrs[p]))
                    .collect(),
                parity_timeout: std::time::Duration::from_millis(300),
                checkpoint_bytes: Some(8 << 10),
            };
            let dead_tx = if id == 2 { dead_tx.take() } else { None };
            let done_rx = if id == 1 { done_rx.take() } else { None };
            let (dead_rx, wrote_tx) = if id == 0 {
                (dead_rx.take(), wrote_tx.take())
            } else {
                (None, None)
            };
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    listener.set_nonblocking(true).unwrap();
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let (node, _task) = net::start(cfg, listener).await.unwrap();
                    match id {
                        // Node 2 dies as soon as everyone is connected.
                        2 => {
                            dead_tx.unwrap().send(()).unwrap();
                        }
                        // Node 1 stays up (it is the proxy) until the test is done.
                        1 => {
                            let done = done_rx.unwrap();
                            tokio::task::spawn_blocking(move || done.recv())
                                .await
                                .unwrap()
                                .ok();
                        }
                        // Node 0 writes every column it holds at toughness 2.
                        _ => {
                            dead_rx.unwrap().recv().unwrap();
                            let mut tasks = tokio::task::JoinSet::new();
                            for stripe in 0..layout.stripes {
                                let Some(column) = layout.column_of(stripe, 0) else {
                                    continue;
                                };
                                let node = node.clone();
                                tasks.spawn(async move {
                                    node.write(
                                        stripe,
                                        block_for(stripe, column, 1),
                                        Toughness::Durable,
                                    )
                                    .await
                                });
                            }
                            while let Some(r) = tasks.join_next().await {
                                r.unwrap().unwrap();
                            }
                            node.flush().await.unwrap();
                            wrote_tx.unwrap().send(()).unwrap();
                        }
                    }
                });
            })
        })
        .collect();
    wrote_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("node 0's writes did not all reach toughness 2");

    let files: Vec<File> = (0..layout.nodes())
        .map(|id| File::open(device(id)).unwrap())
        .collect();
    let journals: Vec<Vec<Vec<u8>>> = files
        .iter()
        .map(|f| read_journal(f, JOURNAL).unwrap())
        .collect();
    let read = |n: usize, loc: u64| read_block(&files[n], JOURNAL, BLOCK, loc).unwrap();
    let rec = recovery::recover(&layout, &journals, LOCATIONS, |n, loc| {
        crc32c::crc32c(&read(n, loc))
    });
    assert!(rec.violations.is_empty(), "{:?}", rec.violations);
    let expect_repair: std::collections::BTreeSet<u64> = (0..layout.stripes)
        .filter(|&s| layout.column_of(s, 0).is_some() && layout.parity_node(s) == 2)
        .collect();
    assert!(!expect_repair.is_empty());
    assert_eq!(rec.repair, expect_repair, "stripes marked for repair");
    for stripe in 0..layout.stripes {
        let Some(column) = layout.column_of(stripe, 0) else {
            continue;
        };
        let got = read(0, rec.maps[0][stripe as usize]);
        assert!(
            got == block_for(stripe, column, 1),
            "stripe {stripe}: node 0's write is lost"
        );
        if !rec.repair.contains(&stripe) {
            let mut xor = vec![0u8; BLOCK];
            for c in 0..layout.data_columns {
                let n = layout.data_node(stripe, c);
                raid::parity::xor_into(&mut xor, &read(n, rec.maps[n][stripe as usize]));
            }
            let p = layout.parity_node(stripe);
            assert!(
                xor == read(p, rec.maps[p][stripe as usize]),
                "stripe {stripe} parity"
            );
        }
    }
    done_tx.send(()).unwrap();
    for t in threads {
        t.join().unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}
