//! Deterministic simulation of a K+1 stripe set, with fault injection, for seeded tests and
//! the crash campaign.
//!
//! [`SimDisk`] is the fault-injection layer under a node: it records writes, journal appends
//! and flushes; a flush makes durable what was written before it was started; a power cut
//! drops what was not yet durable, except that any subset of unflushed block writes and any
//! prefix of unflushed journal appends may have reached the media, and one block or the
//! journal's last append may be torn.
//!
//! The scheduler picks the next event at random from a seeded generator: deliver any
//! in-flight message (so messages are reordered and delayed), complete any pending flush,
//! or issue the next client operation; a message is sometimes delivered twice. At the cut,
//! a random non-empty set of nodes loses power; the others stay up long enough to flush.
//! Then [`recovery::recover`] runs over the durable journals and the checker verifies:
//! - every write that reached toughness 2 (which includes every write covered by an answered
//!   FLUSH or sent with FUA) reads back, or a later write of the same block does;
//! - every stripe satisfies parity = XOR of its data columns;
//! - no referenced location was freed, and every update started from the current version;
//! - a degraded read of each data column equals the column.
//!
//! Then every node restarts from what recovery decided ([`Node::restore`]), more writes run
//! to completion without a cut, and recovery and the checks run again.

use std::collections::{BTreeSet, HashMap};

use super::node::{Node, Outbox};
use super::recovery::{self, Recovered};
use super::{Disk, Layout, Loc, Msg, NodeId, Toughness, WriteId};

/// xorshift64*: small, fast, and the same everywhere for a given seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
enum VolatileOp {
    Block(Loc, Vec<u8>),
    /// Bytes written to journal half `.0` at offset `.1`.
    Journal(usize, usize, Vec<u8>),
}

/// A simulated device with a volatile write cache.
#[derive(Debug, Clone)]
pub struct SimDisk {
    block_bytes: usize,
    durable: HashMap<Loc, Vec<u8>>,
    /// The two halves of the journal as they are on the media.
    journal: [Vec<u8>; 2],
    /// Active half and where the next append goes in it.
    active: usize,
    journal_len: usize,
    volatile: Vec<(u64, VolatileOp)>,
    next_op: u64,
    /// (token, ops before this id are covered)
    flushes: Vec<(u64, u64)>,
}

impl SimDisk {
    pub fn new(block_bytes: usize) -> SimDisk {
        SimDisk {
            block_bytes,
            durable: HashMap::new(),
            journal: [Vec::new(), Vec::new()],
            active: 0,
            journal_len: 0,
            volatile: Vec::new(),
            next_op: 0,
            flushes: Vec::new(),
        }
    }

    pub fn pending_flushes(&self) -> usize {
        self.flushes.len()
    }

    /// Completes pending flush `index`; returns its token.
    pub fn complete_flush(&mut self, index: usize) -> u64 {
        let (token, upto) = self.flushes.remove(index);
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.volatile)
            .into_iter()
            .partition(|(id, _)| *id < upto);
        self.volatile = keep;
        for (_, op) in done {
            self.persist(op);
        }
        token
    }

    fn persist(&mut self, op: VolatileOp) {
        match op {
            VolatileOp::Block(loc, data) => {
                self.durable.insert(loc, data);
            }
            VolatileOp::Journal(half, at, bytes) => self.put_journal(half, at, &bytes),
        }
    }

    /// Power stays on: everything reaches the media.
    pub fn flush_all(&mut self) {
        for (_, op) in std::mem::take(&mut self.volatile) {
            self.persist(op);
        }
        self.flushes.clear();
    }

    /// Power cut: unflushed writes are lost, partly persisted, or torn.
    pub fn power_cut(&mut self, rng: &mut Rng) {
        let ops = std::mem::take(&mut self.volatile);
        self.flushes.clear();
        let journal_ops: Vec<(usize, usize, &Vec<u8>)> = ops
            .iter()
            .filter_map(|(_, op)| match op {
                VolatileOp::Journal(h, at, b) => Some((*h, *at, b)),
                VolatileOp::Block(..) => None,
            })
            .collect();
        let kept = rng.below(journal_ops.len() as u64 + 1) as usize;
        for &(half, at, bytes) in &journal_ops[..kept] {
            self.put_journal(half, at, bytes);
        }
        if let Some(&(half, at, torn)) = journal_ops.get(kept) {
            if rng.chance(50) {
                let n = rng.below(torn.len() as u64) as usize;
                self.put_journal(half, at, &torn[..n]);
            }
        }
        let mut tore_block = false;
        for (_, op) in &ops {
            if let VolatileOp::Block(loc, data) = op {
                if rng.chance(50) {
                    if !tore_block && rng.chance(20) {
                        // Torn block: the first half is new, the rest old.
                        let mut block = self.read(*loc);
                        let half = block.len() / 2;
                        block[..half].copy_from_slice(&data[..half]);
                        self.durable.insert(*loc, block);
                        tore_block = true;
                    } else {
                        self.durable.insert(*loc, data.clone());
                    }
                }
            }
        }
    }

    /// After a power cut: appends continue in journal half `half` (the one recovery
    /// replayed), after what it holds.
    pub fn resume(&mut self, half: usize) {
        self.active = half;
        self.journal_len = self.journal[half].len();
    }

    /// The journal's two halves as they are on the media.
    pub fn journal_halves(&self) -> Vec<Vec<u8>> {
        self.journal.to_vec()
    }

    fn put_journal(&mut self, half: usize, at: usize, bytes: &[u8]) {
        let j = &mut self.journal[half];
        if j.len() < at + bytes.len() {
            j.resize(at + bytes.len(), 0);
        }
        j[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn durable_block(&self, loc: Loc) -> Vec<u8> {
        self.durable
            .get(&loc)
            .cloned()
            .unwrap_or_else(|| vec![0; self.block_bytes])
    }
}

impl Disk for SimDisk {
    fn read(&self, loc: Loc) -> Vec<u8> {
        for (_, op) in self.volatile.iter().rev() {
            if let VolatileOp::Block(l, data) = op {
                if *l == loc {
                    return data.clone();
                }
            }
        }
        self.durable_block(loc)
    }
    fn write(&mut self, loc: Loc, data: &[u8]) {
        self.volatile
            .push((self.next_op, VolatileOp::Block(loc, data.to_vec())));
        self.next_op += 1;
    }
    fn append_journal(&mut self, bytes: &[u8]) {
        let at = self.journal_len;
        self.journal_len += bytes.len();
        self.volatile.push((
            self.next_op,
            VolatileOp::Journal(self.active, at, bytes.to_vec()),
        ));
        self.next_op += 1;
    }
    fn switch_journal(&mut self) {
        self.active ^= 1;
        self.journal_len = 0;
    }
    fn flush(&mut self, token: u64) {
        self.flushes.push((token, self.next_op));
    }
}

/// One client write as the checker sees it.
#[derive(Debug, Clone)]
struct WriteRecord {
    stripe: u64,
    column: usize,
    data: Vec<u8>,
    toughness: Toughness,
    fua: bool,
    answered: bool,
    reached: Option<Toughness>,
    /// Refused by the data node (bad old-data checksum, no free location).
    refused: bool,
}

#[derive(Debug, Clone)]
enum ClientOp {
    Write {
        stripe: u64,
        column: usize,
        fua: bool,
    },
    Flush,
    Read {
        stripe: u64,
        column: usize,
    },
}

/// A read as the checker sees it: the answer must be a write of the block issued before
/// the answer, and no older than the block's last answered write when it was issued.
#[derive(Debug, Clone)]
struct ReadRecord {
    stripe: u64,
    column: usize,
    /// Index (in `writes`) of the block's last answered write when the read was issued.
    floor: Option<usize>,
}

/// Outcome of one simulated run with a cut.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub writes: usize,
    pub answered: usize,
    pub durable: usize,
    pub flushes_answered: usize,
    pub forward: usize,
    pub backward: usize,
    /// Updates taken to a parity proxy, and stripes recovery marked for repair.
    pub rerouted: usize,
    pub repair: usize,
    pub checkpoints: u64,
}

/// Parameters of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    pub seed: u64,
    pub toughness: Toughness,
}

struct Cluster {
    layout: Layout,
    locations: u64,
    nodes: Vec<Node<SimDisk>>,
    net: Vec<(NodeId, Msg)>,
    writes: Vec<WriteRecord>,
    /// Writes answered but not yet durable, per pending FLUSH.
    flushes: Vec<Vec<WriteId>>,
    flushes_answered: usize,
    toughness: Toughness,
    rng: Rng,
    rerouted: usize,
    reads: Vec<ReadRecord>,
    /// The first wrong read answer.
    read_error: Option<String>,
}

impl Cluster {
    fn deliver_outbox(&mut self, out: Outbox) {
        for (id, value) in out.reads {
            let r = self.reads[id as usize].clone();
            let history: Vec<usize> = (0..self.writes.len())
                .filter(|&i| self.writes[i].stripe == r.stripe && self.writes[i].column == r.column)
                .collect();
            let from = r
                .floor
                .and_then(|f| history.iter().position(|&i| i == f))
                .unwrap_or(0);
            let mut acceptable: Vec<&[u8]> = history[from..]
                .iter()
                .map(|&i| self.writes[i].data.as_slice())
                .collect();
            let zeros = vec![0u8; self.layout.block_bytes];
            if r.floor.is_none() {
                acceptable.push(&zeros);
            }
            let ok = value.as_deref().is_some_and(|v| acceptable.contains(&v));
            if !ok && self.read_error.is_none() {
                self.read_error = Some(format!(
                    "read {id} of stripe {} column {} returned {}",
                    r.stripe,
                    r.column,
                    if value.is_some() {
                        "a version older than its last answered write, or never written"
                    } else {
                        "nothing"
                    }
                ));
            }
        }
        for (to, msg) in out.sends {
            if self.rng.chance(5) {
                self.net.push((to, msg.clone()));
            }
            self.net.push((to, msg));
        }
        for (w, level) in out.reached {
            let rec = &mut self.writes[w as usize];
            rec.reached = Some(level);
            let needed = if rec.fua {
                Toughness::Durable
            } else {
                rec.toughness
            };
            if level >= needed {
                rec.answered = true;
            }
        }
        for w in out.corrupt {
            // Refused writes never answer; the checker ignores them.
            self.writes[w as usize].answered = false;
            self.writes[w as usize].refused = true;
        }
    }

    fn issue(&mut self, op: ClientOp) {
        match op {
            ClientOp::Write {
                stripe,
                column,
                fua,
            } => {
                let id = self.writes.len() as WriteId;
                let mut data = vec![0u8; self.layout.block_bytes];
                for b in data.iter_mut() {
                    *b = self.rng.next_u64() as u8;
                }
                let node = self.layout.data_node(stripe, column);
                self.writes.push(WriteRecord {
                    stripe,
                    column,
                    data: data.clone(),
                    toughness: self.toughness,
                    fua,
                    answered: false,
                    reached: None,
                    refused: false,
                });
                let mut out = Outbox::default();
                self.nodes[node].client_write(id, stripe, data, &mut out);
                self.deliver_outbox(out);
            }
            ClientOp::Read { stripe, column } => {
                // Read-your-writes: no older than the block's last answered write.
                let floor = self
                    .writes
                    .iter()
                    .rposition(|w| w.stripe == stripe && w.column == column && w.answered);
                let id = self.reads.len() as u64;
                self.reads.push(ReadRecord {
                    stripe,
                    column,
                    floor,
                });
                let mut out = Outbox::default();
                let node = self.layout.data_node(stripe, column);
                self.nodes[node].read(id, stripe, &mut out);
                self.deliver_outbox(out);
            }
            ClientOp::Flush => {
                let covered: Vec<WriteId> = self
                    .writes
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.answered && w.reached != Some(Toughness::Durable))
                    .map(|(i, _)| i as WriteId)
                    .collect();
                self.flushes.push(covered);
            }
        }
    }

    /// Answers every FLUSH whose covered writes are all durable.
    fn answer_flushes(&mut self) {
        let writes = &self.writes;
        let before = self.flushes.len();
        self.flushes.retain(|covered| {
            !covered
                .iter()
                .all(|&w| writes[w as usize].reached == Some(Toughness::Durable))
        });
        self.flushes_answered += before - self.flushes.len();
    }

    /// Sometimes a parity node is "too slow": a data node takes an update still waiting
    /// for its parity to a proxy (any node but the two involved).
    fn maybe_reroute(&mut self) -> bool {
        if !self.rng.chance(2) {
            return false;
        }
        let candidates: Vec<(NodeId, u64)> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                node.awaiting_parity()
                    .into_iter()
                    .filter(|(_, _, proxied)| !proxied)
                    .map(move |(stripe, _, _)| (n, stripe))
            })
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let (n, stripe) = candidates[self.rng.below(candidates.len() as u64) as usize];
        let p = self.layout.parity_node(stripe);
        let others: Vec<NodeId> = (0..self.layout.nodes())
            .filter(|&x| x != n && x != p)
            .collect();
        let proxy = others[self.rng.below(others.len() as u64) as usize];
        let mut out = Outbox::default();
        if self.nodes[n].reroute_to_proxy(stripe, proxy, &mut out) {
            self.rerouted += 1;
        }
        self.deliver_outbox(out);
        true
    }

    /// Runs one event; false when nothing is left to do.
    fn step(&mut self, ops: &mut Vec<ClientOp>) -> bool {
        if self.maybe_reroute() {
            return true;
        }
        let flushes: Vec<(usize, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| (0..node.disk.pending_flushes()).map(move |i| (n, i)))
            .collect();
        let choices = self.net.len() + flushes.len() + usize::from(!ops.is_empty());
        if choices == 0 {
            return false;
        }
        let pick = self.rng.below(choices as u64) as usize;
        let mut out = Outbox::default();
        if pick < self.net.len() {
            let (to, msg) = self.net.swap_remove(pick);
            self.nodes[to].receive(msg, &mut out);
        } else if pick < self.net.len() + flushes.len() {
            let (n, i) = flushes[pick - self.net.len()];
            let token = self.nodes[n].disk.complete_flush(i);
            self.nodes[n].flushed(token, &mut out);
        } else {
            let op = ops.remove(0);
            self.issue(op);
        }
        self.deliver_outbox(out);
        self.answer_flushes();
        true
    }
}

/// Builds the initial cluster state for `seed`.
fn setup(rng: &mut Rng) -> (Layout, u64, Vec<ClientOp>) {
    let layout = Layout {
        data_columns: 2 + rng.below(3) as usize,
        stripes: 2 + rng.below(7),
        block_bytes: 64,
    };
    // Sometimes barely more locations than columns, so that updates wait for space.
    let locations = if rng.chance(30) {
        layout.stripes + 2 + rng.below(4)
    } else {
        layout.stripes * 6 + 16
    };
    let n_ops = 4 + rng.below(150) as usize;
    let ops = (0..n_ops)
        .map(|_| {
            if rng.chance(10) {
                ClientOp::Flush
            } else if rng.chance(10) {
                ClientOp::Read {
                    stripe: rng.below(layout.stripes),
                    column: rng.below(layout.data_columns as u64) as usize,
                }
            } else {
                ClientOp::Write {
                    stripe: rng.below(layout.stripes),
                    column: rng.below(layout.data_columns as u64) as usize,
                    fua: rng.chance(10),
                }
            }
        })
        .collect();
    (layout, locations, ops)
}

/// Runs random writes, cuts power at a random point, recovers, and checks every promise.
/// `Err` describes the first broken promise.
pub fn run_with_cut(cfg: RunConfig) -> Result<RunStats, String> {
    let mut rng = Rng::new(cfg.seed);
    let (layout, locations, mut ops) = setup(&mut rng);
    let zero_crc = crc32c::crc32c(&vec![0u8; layout.block_bytes]);
    let nodes = (0..layout.nodes())
        .map(|id| {
            let map = (0..layout.stripes).map(|s| (s, zero_crc)).collect();
            let free: BTreeSet<Loc> = (layout.stripes..locations).collect();
            let mut node = Node::new(id, layout, SimDisk::new(layout.block_bytes), map, free, 0);
            // Both ways of getting the delta to the parity node, mixed within a cluster.
            node.set_push_delta(rng.chance(50));
            // Often checkpoints every few records, so the journal halves turn over.
            if rng.chance(60) {
                node.set_checkpoint_every(Some(150 + rng.below(1500)));
            }
            node
        })
        .collect();
    let mut cl = Cluster {
        layout,
        locations,
        nodes,
        net: Vec::new(),
        writes: Vec::new(),
        flushes: Vec::new(),
        flushes_answered: 0,
        toughness: cfg.toughness,
        rng: Rng::new(rng.next_u64()),
        rerouted: 0,
        reads: Vec::new(),
        read_error: None,
    };
    let cut_after = 1 + rng.below(60 * ops.len() as u64 + 1);
    let mut steps = 0u64;
    let mut quiescent = false;
    while steps < cut_after {
        if !cl.step(&mut ops) {
            quiescent = true;
            break;
        }
        steps += 1;
    }
    if quiescent {
        // Liveness: with nothing left in flight, every write is durable and every node idle.
        if let Some(i) = cl
            .writes
            .iter()
            .position(|w| !w.refused && w.reached != Some(Toughness::Durable))
        {
            let w = &cl.writes[i];
            return Err(format!(
                "write {i} (stripe {} column {}) never reached toughness 2 although the cluster went idle; it reached {:?}; nodes {:?}",
                w.stripe, w.column, w.reached, cl.nodes
            ));
        }
        if let Some(n) = cl.nodes.iter().position(|n| !n.idle()) {
            return Err(format!(
                "node {n} still has updates in progress although nothing is in flight: {:?}",
                cl.nodes[n]
            ));
        }
        if !cl.flushes.is_empty() {
            return Err("a FLUSH was never answered although every write is durable".into());
        }
    }

    // The cut.
    let nodes = cl.layout.nodes();
    let crashed = 1 + rng.below((1u64 << nodes) - 1);
    for (n, node) in cl.nodes.iter_mut().enumerate() {
        if crashed & (1 << n) != 0 {
            node.disk.power_cut(&mut rng);
        } else {
            node.disk.flush_all();
        }
    }
    let journals: Vec<Vec<Vec<u8>>> = cl.nodes.iter().map(|n| n.disk.journal_halves()).collect();
    let rec = recovery::recover(&cl.layout, &journals, cl.locations, |n, loc| {
        crc32c::crc32c(&cl.nodes[n].disk.durable_block(loc))
    });
    if let Some(e) = cl.read_error.take() {
        return Err(e);
    }
    check(&cl, &rec)?;
    let checkpoints: u64 = cl.nodes.iter().map(|n| n.checkpoints()).sum();
    let (rerouted, repair) = (cl.rerouted, rec.repair.len());
    let (forward, backward) = (rec.forward, rec.backward);
    let durable = cl
        .writes
        .iter()
        .filter(|w| w.reached == Some(Toughness::Durable))
        .count();
    let (writes, answered) = (
        cl.writes.len(),
        cl.writes.iter().filter(|w| w.answered).count(),
    );

    // Restart every node from what recovery decided, write some more (no cut this time),
    // and check again: a recovered cluster must carry on, keep every promise, and recover.
    for n in 0..cl.layout.nodes() {
        let mut disk =
            std::mem::replace(&mut cl.nodes[n].disk, SimDisk::new(cl.layout.block_bytes));
        disk.resume(rec.half[n]);
        let every = rng.chance(60).then(|| 150 + rng.below(1500));
        let mut node = Node::restore(n, cl.layout, disk, &rec, every);
        node.set_push_delta(rng.chance(50));
        cl.nodes[n] = node;
    }
    cl.net.clear();
    cl.flushes.clear();
    let mut more: Vec<ClientOp> = (0..rng.below(40))
        .map(|_| ClientOp::Write {
            stripe: rng.below(cl.layout.stripes),
            column: rng.below(cl.layout.data_columns as u64) as usize,
            fua: false,
        })
        .collect();
    let first_new = cl.writes.len();
    let mut guard = 0u64;
    while cl.step(&mut more) {
        guard += 1;
        if guard > 1_000_000 {
            return Err("after restart: the cluster never went idle".into());
        }
    }
    if let Some(i) = (first_new..cl.writes.len())
        .find(|&i| !cl.writes[i].refused && cl.writes[i].reached != Some(Toughness::Durable))
    {
        return Err(format!(
            "after restart: write {i} never reached toughness 2 although the cluster went idle; nodes {:?}",
            cl.nodes
        ));
    }
    for node in &mut cl.nodes {
        node.disk.flush_all();
    }
    let journals: Vec<Vec<Vec<u8>>> = cl.nodes.iter().map(|n| n.disk.journal_halves()).collect();
    let rec = recovery::recover(&cl.layout, &journals, cl.locations, |n, loc| {
        crc32c::crc32c(&cl.nodes[n].disk.durable_block(loc))
    });
    if let Some(e) = cl.read_error.take() {
        return Err(format!("after restart: {e}"));
    }
    check(&cl, &rec).map_err(|e| format!("after restart: {e}"))?;
    Ok(RunStats {
        writes,
        answered,
        durable,
        flushes_answered: cl.flushes_answered,
        forward,
        backward,
        rerouted,
        repair,
        checkpoints,
    })
}

fn check(cl: &Cluster, rec: &Recovered) -> Result<(), String> {
    if let Some(v) = rec.violations.first() {
        return Err(format!("recovery: {v}"));
    }
    let layout = &cl.layout;
    let block = |node: NodeId, stripe: u64| {
        cl.nodes[node]
            .disk
            .durable_block(rec.maps[node][stripe as usize])
    };
    for stripe in 0..layout.stripes {
        let p = layout.parity_node(stripe);
        // A stripe marked for repair has stale parity until it is recomputed; every other
        // stripe's parity must be exact.
        let stale = rec.repair.contains(&stripe);
        let mut xor = vec![0u8; layout.block_bytes];
        for column in 0..layout.data_columns {
            crate::parity::xor_into(&mut xor, &block(layout.data_node(stripe, column), stripe));
        }
        if !stale && xor != block(p, stripe) {
            return Err(format!(
                "stripe {stripe}: parity is not the XOR of the data columns"
            ));
        }
        for column in 0..layout.data_columns {
            let node = layout.data_node(stripe, column);
            let value = block(node, stripe);
            let history: Vec<&WriteRecord> = cl
                .writes
                .iter()
                .filter(|w| w.stripe == stripe && w.column == column)
                .collect();
            let promised = history
                .iter()
                .rposition(|w| w.reached == Some(Toughness::Durable));
            let mut acceptable: Vec<Vec<u8>> = Vec::new();
            if promised.is_none() {
                acceptable.push(vec![0; layout.block_bytes]);
            }
            acceptable.extend(
                history[promised.unwrap_or(0)..]
                    .iter()
                    .map(|w| w.data.clone()),
            );
            if !acceptable.contains(&value) {
                return Err(format!(
                    "stripe {stripe} column {column}: recovered data is neither the last durable write nor a later one ({} writes, last durable #{promised:?})",
                    history.len()
                ));
            }
            let rebuilt = recovery::degraded_read(layout, stripe, column, |n| block(n, stripe));
            if !stale && rebuilt != value {
                return Err(format!(
                    "stripe {stripe} column {column}: degraded read differs from the column"
                ));
            }
        }
    }
    Ok(())
}
