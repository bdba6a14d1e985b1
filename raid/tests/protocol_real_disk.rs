//! The write protocol on real files: a K+1 cluster of nodes in one process, each on its own
//! block file and journal file (FileDisk, fdatasync on flush), messages delivered in order.
//! Every write reaches toughness 2; then recovery from the journals on disk must rebuild the
//! same columns, parity must equal the XOR of the data, and every block must hold its last
//! write. Also prints the toughness-2 latency of a QD1 write next to a local write+fdatasync.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use raid::protocol::file_disk::FileDisk;
use raid::protocol::node::{Node, Outbox};
use raid::protocol::{recovery, Disk, Layout, Msg, NodeId, Toughness};

const BLOCK: usize = 4096;

struct Cluster {
    nodes: Vec<Node<FileDisk>>,
    net: VecDeque<(NodeId, Msg)>,
    durable: Vec<bool>,
}

impl Cluster {
    fn absorb(&mut self, out: Outbox) {
        assert!(out.corrupt.is_empty(), "refused writes: {:?}", out.corrupt);
        self.net.extend(out.sends);
        for (w, level) in out.reached {
            if level == Toughness::Durable {
                self.durable[w as usize] = true;
            }
        }
    }

    /// Delivers messages and completes flushes until nothing is left.
    fn run(&mut self) {
        loop {
            let mut out = Outbox::default();
            if let Some((to, msg)) = self.net.pop_front() {
                self.nodes[to].receive(msg, &mut out);
            } else if let Some(n) = self.nodes.iter().position(|n| n.disk.has_pending_flushes()) {
                for token in self.nodes[n].disk.complete_flushes().unwrap() {
                    self.nodes[n].flushed(token, &mut out);
                }
            } else {
                return;
            }
            self.absorb(out);
        }
    }
}

#[test]
fn writes_survive_on_real_files_and_recover_from_the_journals() {
    let dir = std::env::temp_dir().join(format!("raid-real-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let layout = Layout {
        data_columns: 3,
        stripes: 8,
        block_bytes: BLOCK,
    };
    let locations = layout.stripes * 4;
    let zero_crc = crc32c::crc32c(&[0u8; BLOCK]);
    let nodes = (0..layout.nodes())
        .map(|id| {
            let d = dir.join(format!("node{id}"));
            std::fs::create_dir_all(&d).unwrap();
            let map = (0..layout.stripes).map(|s| (s, zero_crc)).collect();
            let free: BTreeSet<u64> = (layout.stripes..locations).collect();
            Node::new(
                id,
                layout,
                FileDisk::create(&d.join("device"), BLOCK, 1 << 20, locations).unwrap(),
                map,
                free,
                0,
            )
        })
        .collect();
    let mut cl = Cluster {
        nodes,
        net: VecDeque::new(),
        durable: Vec::new(),
    };
    let mut last = vec![vec![vec![0u8; BLOCK]; layout.data_columns]; layout.stripes as usize];
    let mut latencies = Vec::new();
    for w in 0..200u64 {
        let (stripe, column) = (w % layout.stripes, (w as usize * 7) % layout.data_columns);
        let data = vec![(w % 251) as u8 + 1; BLOCK];
        last[stripe as usize][column] = data.clone();
        cl.durable.push(false);
        let started = Instant::now();
        let mut out = Outbox::default();
        cl.nodes[layout.data_node(stripe, column)].client_write(w, stripe, data, &mut out);
        cl.absorb(out);
        cl.run();
        assert!(
            cl.durable[w as usize],
            "write {w} did not reach toughness 2"
        );
        latencies.push(started.elapsed());
    }
    assert!(cl.nodes.iter().all(|n| n.idle()));

    // Recovery from what is on disk must land on the same columns.
    let journals: Vec<Vec<Vec<u8>>> = cl
        .nodes
        .iter()
        .map(|n| n.disk.journal_halves().unwrap())
        .collect();
    let rec = recovery::recover(&layout, &journals, locations, |n, loc| {
        crc32c::crc32c(&cl.nodes[n].disk.read(loc))
    });
    assert!(rec.violations.is_empty(), "{:?}", rec.violations);
    for stripe in 0..layout.stripes {
        let read = |n: NodeId| cl.nodes[n].disk.read(rec.maps[n][stripe as usize]);
        let mut xor = vec![0u8; BLOCK];
        for (column, want) in last[stripe as usize].iter().enumerate() {
            let node = layout.data_node(stripe, column);
            assert_eq!(
                rec.maps[node][stripe as usize],
                cl.nodes[node].location(stripe)
            );
            let block = read(node);
            assert!(&block == want, "stripe {stripe} column {column}");
            raid::parity::xor_into(&mut xor, &block);
        }
        assert!(
            xor == read(layout.parity_node(stripe)),
            "stripe {stripe}: parity"
        );
    }

    // Toughness-2 latency beside a local 4 KiB write + fdatasync, for the record.
    let local = std::fs::File::create(dir.join("local")).unwrap();
    let mut local_lat = Vec::new();
    for i in 0..50u64 {
        let t = Instant::now();
        local.write_all_at(&[1u8; BLOCK], i * BLOCK as u64).unwrap();
        local.sync_data().unwrap();
        local_lat.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "in-process toughness-2 write p50 {:?}; local write+fdatasync p50 {:?}",
        median(&mut latencies),
        median(&mut local_lat)
    );
    std::fs::remove_dir_all(&dir).ok();
}
