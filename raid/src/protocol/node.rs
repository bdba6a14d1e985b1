//! One node's side of the protocol: the data role for the columns it holds and the parity
//! role for the stripes whose parity it holds. Sans-IO: handlers mutate state, drive the
//! [`Disk`], and leave messages and progress reports in the [`Outbox`].

use std::collections::{BTreeSet, HashMap, VecDeque};

use zerocopy::little_endian::{U32, U64};

use super::{Disk, Layout, Loc, Msg, NodeId, Toughness, WriteId};
use crate::journal::record::{self, Body, Free, Intent, Mark, Record};
use crate::parity;

/// What a node wants done after a handler returns.
#[derive(Debug, Default)]
pub struct Outbox {
    pub sends: Vec<(NodeId, Msg)>,
    /// A write reached a toughness level (each level is reported once, in order).
    pub reached: Vec<(WriteId, Toughness)>,
    /// Old data whose checksum did not match: the write is refused, nothing is laundered
    /// into parity.
    pub corrupt: Vec<WriteId>,
    /// Answers to [`Node::read`]: the block, or `None` if this node holds no data column of
    /// the stripe or the block failed its checksum.
    pub reads: Vec<(u64, Option<Vec<u8>>)>,
}

#[derive(Debug, Clone)]
struct PendingWrite {
    write_id: WriteId,
    data: Vec<u8>,
}

#[derive(Debug)]
struct DataUpdate {
    write_id: WriteId,
    seq: u64,
    old_loc: Loc,
    new_loc: Loc,
    old: Vec<u8>,
    new: Vec<u8>,
    new_crc: u32,
    own_hardened: bool,
    peer_hardened: bool,
    parity_held: bool,
    /// The parity proxy this update went to, if the parity node did not answer.
    proxy: Option<NodeId>,
}

#[derive(Debug, Clone, Copy)]
struct UpdateReq {
    write_id: WriteId,
    seq: u64,
    column: usize,
    from: NodeId,
}

#[derive(Debug)]
struct ParityUpdate {
    req: UpdateReq,
    old_loc: Loc,
    old_crc: u32,
    new_loc: Loc,
    /// crc32c of the merged new parity (set with `merged`).
    new_crc: u32,
    merged: bool,
    own_hardened: bool,
    peer_hardened: bool,
}

/// A proxy's copy of another node's update, held until its stripe is repaired.
#[derive(Debug)]
struct ProxyCopy {
    intent: Intent,
    data: Vec<u8>,
    /// The data node to answer.
    from: NodeId,
    /// Its `Proxy` record is durable (`ProxyHardened` was sent).
    durable: bool,
}

/// Which pool a location is allocated from and returns to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Data = 0,
    Parity = 1,
}

impl DataUpdate {
    /// Its `mj` and hardened mark, journalled when it starts and again by a checkpoint.
    fn records(&self, stripe: u64, column: usize) -> [Body; 2] {
        [
            Body::Mj(Intent {
                write_id: U64::new(self.write_id),
                stripe: U64::new(stripe),
                stripe_seq: U64::new(self.seq),
                new_loc: U64::new(self.new_loc),
                old_loc: U64::new(self.old_loc),
                column: U32::new(column as u32),
                new_crc: U32::new(self.new_crc),
            }),
            Body::DataHardened(mark(self.write_id, stripe, self.seq, self.new_crc)),
        ]
    }
}

impl ParityUpdate {
    /// Its `pj`.
    fn intent(&self, stripe: u64) -> Body {
        Body::Pj(Intent {
            write_id: U64::new(self.req.write_id),
            stripe: U64::new(stripe),
            stripe_seq: U64::new(self.req.seq),
            new_loc: U64::new(self.new_loc),
            old_loc: U64::new(self.old_loc),
            column: U32::new(self.req.column as u32),
            new_crc: U32::new(0),
        })
    }

    /// Its hardened mark (once merged).
    fn mark(&self, stripe: u64) -> Body {
        Body::ParityHardened(mark(self.req.write_id, stripe, self.req.seq, self.new_crc))
    }
}

fn mark(write_id: WriteId, stripe: u64, seq: u64, crc: u32) -> Mark {
    Mark {
        write_id: U64::new(write_id),
        stripe: U64::new(stripe),
        stripe_seq: U64::new(seq),
        crc: U32::new(crc),
        reserved: U32::new(0),
    }
}

// Flush tokens: (write id << 3) | step. Each side hardens with one flush: the new block,
// its intent and its hardened mark (which carries the block's crc32c) go down together.
const STEP_DATA: u64 = 1;
const STEP_PARITY: u64 = 3;
const STEP_COMPLETE: u64 = 5;
const STEP_PROXY: u64 = 6;
/// A checkpoint's flush: (checkpoint number << 3) | 7. No write's token uses step 7.
const STEP_CHECKPOINT: u64 = 7;

/// Whether the flush started with `token` only makes completion records and frees durable.
/// Nothing waits on such a flush: a driver may delay it and let a later flush cover it.
pub fn flush_is_lazy(token: u64) -> bool {
    token & 7 == STEP_COMPLETE
}

pub struct Node<D: Disk> {
    pub id: NodeId,
    layout: Layout,
    pub disk: D,
    next_jseq: u64,
    /// Location and crc32c of this node's column (data or parity) of each stripe.
    map: Vec<(Loc, u32)>,
    /// Free locations, in two pools: one for this node's data updates and one for the
    /// parity updates it serves. A location freed by an update returns to its role's pool,
    /// so each pool keeps its size. With one pool, data updates could take every free
    /// location on two nodes, each waiting for the other's parity location: a deadlock.
    /// Parity updates wait on nothing but their data node, so their pool always drains.
    free: [BTreeSet<Loc>; 2],
    /// Stripes whose next update waits for a free location, with the role it waits in.
    blocked: VecDeque<(Role, u64)>,
    /// Locations whose `Free` record is appended but not yet durable, by flush token. They
    /// are allocated again only once it is: until then recovery may still need to check a
    /// hardened mark against the block there.
    freeing: HashMap<u64, (Role, Loc)>,
    data: HashMap<u64, DataUpdate>,
    data_queue: HashMap<u64, VecDeque<PendingWrite>>,
    data_seq: HashMap<u64, u64>,
    parity: HashMap<u64, ParityUpdate>,
    parity_queue: HashMap<u64, VecDeque<UpdateReq>>,
    /// Last data sequence applied to parity, per (stripe, column): duplicates are no-ops.
    applied: HashMap<(u64, usize), u64>,
    /// `DataHardened` that arrived before its update started here (its `Update` was delayed
    /// or queued behind another update of the stripe); consumed when the update starts.
    early_hardened: std::collections::HashSet<WriteId>,
    /// Data role: send each update's delta with its `Update` instead of waiting for the
    /// parity node's `DeltaRequest` (one round trip less before the parity can be written).
    push_delta: bool,
    /// Parity role: deltas that came with their `Update`, until the update starts here
    /// (one per accepted, not yet started update: bounded by the updates in flight).
    pushed: HashMap<WriteId, Vec<u8>>,
    /// Data role: stripes whose parity missed an update that went to a proxy; their parity
    /// must be recomputed from the data before a degraded read may trust it.
    repair: BTreeSet<u64>,
    /// Parity role: updates their data node took to a proxy (a later `Update` for one is
    /// ignored).
    abandoned: std::collections::HashSet<WriteId>,
    /// Proxy role: the copies held for other nodes' updates, journalled again by every
    /// checkpoint until repaired.
    proxied: HashMap<WriteId, ProxyCopy>,
    /// Reads waiting for the update in progress on their stripe to be resolved.
    pending_reads: HashMap<u64, Vec<u64>>,
    /// Per (stripe, column), the sequence of the last update completed here.
    done: HashMap<(u64, u32), u64>,
    /// Journal bytes after which the node writes a checkpoint (`None`: never).
    checkpoint_every: Option<u64>,
    journal_since_checkpoint: u64,
    checkpoints: u64,
    /// The last checkpoint's flush token while it is not yet durable: until it is, the
    /// other half still holds the only complete journal, so no new checkpoint may start.
    checkpoint_pending: Option<u64>,
}

impl<D: Disk> std::fmt::Debug for Node<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field(
                "data",
                &self
                    .data
                    .iter()
                    .map(|(s, u)| (*s, u.write_id, u.own_hardened, u.peer_hardened))
                    .collect::<Vec<_>>(),
            )
            .field(
                "data_queue",
                &self
                    .data_queue
                    .iter()
                    .map(|(s, q)| (*s, q.iter().map(|w| w.write_id).collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .field(
                "parity",
                &self
                    .parity
                    .iter()
                    .map(|(s, u)| {
                        (
                            *s,
                            u.req.write_id,
                            u.merged,
                            u.own_hardened,
                            u.peer_hardened,
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .field(
                "parity_queue",
                &self
                    .parity_queue
                    .iter()
                    .map(|(s, q)| (*s, q.iter().map(|r| r.write_id).collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<D: Disk> Node<D> {
    /// A node whose column of stripe `s` is at `map[s]`, with `free` locations to allocate
    /// from and the journal continuing at `next_jseq`.
    pub fn new(
        id: NodeId,
        layout: Layout,
        disk: D,
        map: Vec<(Loc, u32)>,
        free: BTreeSet<Loc>,
        next_jseq: u64,
    ) -> Node<D> {
        Node {
            id,
            layout,
            disk,
            next_jseq,
            map,
            free: Self::split_free(free),
            blocked: VecDeque::new(),
            freeing: HashMap::new(),
            data: HashMap::new(),
            data_queue: HashMap::new(),
            data_seq: HashMap::new(),
            parity: HashMap::new(),
            parity_queue: HashMap::new(),
            applied: HashMap::new(),
            early_hardened: std::collections::HashSet::new(),
            push_delta: true,
            pushed: HashMap::new(),
            repair: BTreeSet::new(),
            abandoned: std::collections::HashSet::new(),
            proxied: HashMap::new(),
            pending_reads: HashMap::new(),
            done: HashMap::new(),
            checkpoint_every: None,
            journal_since_checkpoint: 0,
            checkpoints: 0,
            checkpoint_pending: None,
        }
    }

    /// Writes a checkpoint whenever `bytes` of journal were appended since the last one
    /// (and the last one is durable). A checkpoint starts the other journal half with the
    /// node's resolved state (each column where its last completed update put it, the last
    /// completed sequence per column, the stripes marked for repair), then journals again
    /// the intents and marks of the updates in progress and the proxy copies held. Replay
    /// starts from the newest complete checkpoint, so the other half is free to overwrite:
    /// the journal's space is reclaimed. Keep `bytes` under half the half's size.
    pub fn set_checkpoint_every(&mut self, bytes: Option<u64>) {
        self.checkpoint_every = bytes;
    }

    /// The most stripes a checkpoint of a node in a layout with `data_columns` data
    /// columns can describe (a checkpoint is one journal record: 12 bytes per stripe, and
    /// 20 per column with a completed update).
    pub fn max_checkpoint_stripes(data_columns: usize) -> u64 {
        ((record::BODY_MAX_BYTES - 24) / (12 + 20 * data_columns.max(1))) as u64
    }

    /// Checkpoints written so far.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    fn maybe_checkpoint(&mut self) {
        let Some(every) = self.checkpoint_every else {
            return;
        };
        if self.journal_since_checkpoint < every || self.checkpoint_pending.is_some() {
            return;
        }
        let mut map = self.map.clone();
        for (s, u) in &self.data {
            map[*s as usize] = (u.old_loc, crc32c::crc32c(&u.old));
        }
        for (s, u) in &self.parity {
            map[*s as usize] = (u.old_loc, u.old_crc);
        }
        let mut done: Vec<(u64, u32, u64)> =
            self.done.iter().map(|(&(s, c), &q)| (s, c, q)).collect();
        done.sort_unstable();
        let checkpoint = record::Checkpoint {
            map,
            done,
            repair: self.repair.iter().copied().collect(),
        }
        .encode();
        if checkpoint.len() > record::BODY_MAX_BYTES {
            // Replay would refuse it: never start a half that cannot be replayed. The
            // journal then fills and the device reports it (see `max_checkpoint_stripes`).
            self.checkpoint_every = None;
            return;
        }
        self.disk.switch_journal();
        let checkpoint_seq = self.next_jseq;
        self.journal(Body::Checkpoint(checkpoint));
        let mut again = Vec::new();
        for (&stripe, u) in &self.data {
            let column = self.layout.column_of(stripe, self.id).unwrap_or(0);
            again.extend(u.records(stripe, column));
        }
        for (&stripe, u) in &self.parity {
            again.push(u.intent(stripe));
            if u.merged {
                again.push(u.mark(stripe));
            }
        }
        for p in self.proxied.values() {
            again.push(Body::Proxy(p.intent, p.data.clone()));
        }
        for body in again {
            self.journal(body);
        }
        self.journal(Body::CheckpointEnd(record::Seal {
            checkpoint_seq: U64::new(checkpoint_seq),
        }));
        self.journal_since_checkpoint = 0;
        self.checkpoints += 1;
        let token = self.checkpoints << 3 | STEP_CHECKPOINT;
        self.checkpoint_pending = Some(token);
        self.disk.flush(token);
    }

    /// Reads this node's data column of `stripe`, answered in `out.reads` with `read_id`.
    /// If an update of the stripe is in progress (not yet hardened on both sides), the read
    /// waits until it is resolved and returns the new data: a read never returns a version
    /// that recovery could still take either way.
    pub fn read(&mut self, read_id: u64, stripe: u64, out: &mut Outbox) {
        if self.layout.column_of(stripe, self.id).is_none() || stripe >= self.layout.stripes {
            out.reads.push((read_id, None));
        } else if self.data.contains_key(&stripe) {
            self.pending_reads.entry(stripe).or_default().push(read_id);
        } else {
            out.reads.push((read_id, self.read_current(stripe)));
        }
    }

    fn read_current(&self, stripe: u64) -> Option<Vec<u8>> {
        let (loc, crc) = self.map[stripe as usize];
        let block = self.disk.read(loc);
        (crc32c::crc32c(&block) == crc).then_some(block)
    }

    /// Updates in progress here (data role) that the parity node has not yet hardened:
    /// (stripe, write id, whether it already went to a proxy).
    pub fn awaiting_parity(&self) -> Vec<(u64, WriteId, bool)> {
        let mut v: Vec<_> = self
            .data
            .iter()
            .filter(|(_, u)| !u.peer_hardened)
            .map(|(s, u)| (*s, u.write_id, u.proxy.is_some()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Stripes whose parity is stale because an update went to a proxy.
    pub fn needs_repair(&self) -> &BTreeSet<u64> {
        &self.repair
    }

    /// The parity node of `stripe` did not answer within the caller's bound: sends the
    /// update in progress on `stripe` to `proxy` instead, tells the parity node to drop it,
    /// and marks the stripe for repair. The write reaches toughness 2 once its data and the
    /// proxy's copy are durable (two servers hold it). Returns whether it rerouted: not if
    /// no update waits for its parity, it already went to a proxy, or `proxy` is this node
    /// or the parity node.
    pub fn reroute_to_proxy(&mut self, stripe: u64, proxy: NodeId, out: &mut Outbox) -> bool {
        let p = self.layout.parity_node(stripe);
        let column = self.layout.column_of(stripe, self.id).unwrap_or(0);
        let id = self.id;
        if proxy == id || proxy == p || proxy >= self.layout.nodes() {
            return false;
        }
        let Some(u) = self.data.get_mut(&stripe) else {
            return false;
        };
        if u.peer_hardened || u.proxy.is_some() {
            return false;
        }
        u.proxy = Some(proxy);
        out.sends.push((
            proxy,
            Msg::ProxyUpdate {
                write_id: u.write_id,
                stripe,
                stripe_seq: u.seq,
                column,
                from: id,
                data: u.new.clone(),
            },
        ));
        out.sends.push((
            p,
            Msg::Abandon {
                write_id: u.write_id,
                stripe,
            },
        ));
        self.repair.insert(stripe);
        true
    }

    /// Whether this node sends each delta with its `Update` (the default) or waits for the
    /// parity node to ask for it. Both paths are part of the protocol; the simulator runs
    /// both.
    pub fn set_push_delta(&mut self, push: bool) {
        self.push_delta = push;
    }

    /// Restarts node `id` after a crash from what [`recovery::recover`] decided: its
    /// columns' locations (checksummed from `disk`), free locations, journal and stripe
    /// sequences, stripes marked for repair and the proxy copies it holds. `disk` must be
    /// positioned on the journal half recovery replayed; the node at once checkpoints into
    /// the other half, so its journal restarts from a clean, sealed state.
    ///
    /// [`recovery::recover`]: super::recovery::recover
    pub fn restore(
        id: NodeId,
        layout: Layout,
        disk: D,
        rec: &super::recovery::Recovered,
        checkpoint_every: Option<u64>,
    ) -> Node<D> {
        let map = rec.maps[id]
            .iter()
            .map(|&loc| (loc, crc32c::crc32c(&disk.read(loc))))
            .collect();
        let mut node = Node::new(
            id,
            layout,
            disk,
            map,
            rec.free[id].clone(),
            rec.next_jseq[id],
        );
        for (&(stripe, column), &seq) in &rec.seqs[id] {
            if layout.parity_node(stripe) == id {
                node.applied.insert((stripe, column as usize), seq);
            } else {
                node.data_seq.insert(stripe, seq);
            }
            node.done.insert((stripe, column), seq);
        }
        node.repair = rec
            .repair
            .iter()
            .copied()
            .filter(|&s| layout.column_of(s, id).is_some())
            .collect();
        for (intent, data) in &rec.proxies[id] {
            let from = layout.data_node(intent.stripe.get(), intent.column.get() as usize);
            node.proxied.insert(
                intent.write_id.get(),
                ProxyCopy {
                    intent: *intent,
                    data: data.clone(),
                    from,
                    durable: true,
                },
            );
        }
        node.checkpoint_every = Some(0);
        node.maybe_checkpoint();
        node.checkpoint_every = checkpoint_every;
        node
    }

    /// Location of this node's column of `stripe`.
    pub fn location(&self, stripe: u64) -> Loc {
        self.map[stripe as usize].0
    }

    /// Whether any update is in progress or queued here.
    pub fn idle(&self) -> bool {
        self.data.is_empty()
            && self.parity.is_empty()
            && self.data_queue.values().all(VecDeque::is_empty)
            && self.parity_queue.values().all(VecDeque::is_empty)
    }

    /// Locations free to allocate now.
    pub fn free_locations(&self) -> usize {
        self.free.iter().map(BTreeSet::len).sum()
    }

    /// Deals the free locations alternately into the data and the parity pool.
    fn split_free(free: BTreeSet<Loc>) -> [BTreeSet<Loc>; 2] {
        let mut pools = [BTreeSet::new(), BTreeSet::new()];
        for (i, loc) in free.into_iter().enumerate() {
            pools[i % 2].insert(loc);
        }
        pools
    }

    fn journal(&mut self, body: Body) {
        let mut bytes = Vec::with_capacity(64);
        record::encode(
            &Record {
                seq: self.next_jseq,
                body,
            },
            &mut bytes,
        );
        self.next_jseq += 1;
        self.journal_since_checkpoint += bytes.len() as u64;
        self.disk.append_journal(&bytes);
    }

    fn allocate(&mut self, role: Role) -> Option<Loc> {
        let loc = self.free[role as usize].pop_first()?;
        debug_assert!(
            self.map.iter().all(|(l, _)| *l != loc),
            "allocated a referenced location"
        );
        Some(loc)
    }

    // ---- data role ----

    /// A client write of this node's column of `stripe`.
    pub fn client_write(
        &mut self,
        write_id: WriteId,
        stripe: u64,
        data: Vec<u8>,
        out: &mut Outbox,
    ) {
        self.client_write_inner(write_id, stripe, data, out);
        self.maybe_checkpoint();
    }

    fn client_write_inner(
        &mut self,
        write_id: WriteId,
        stripe: u64,
        data: Vec<u8>,
        out: &mut Outbox,
    ) {
        let w = PendingWrite { write_id, data };
        let queued = self.data_queue.get(&stripe).is_some_and(|q| !q.is_empty());
        if self.data.contains_key(&stripe) || queued {
            self.data_queue.entry(stripe).or_default().push_back(w);
            return;
        }
        self.start_write(stripe, w, out);
    }

    fn start_write(&mut self, stripe: u64, w: PendingWrite, out: &mut Outbox) {
        let Some(column) = self.layout.column_of(stripe, self.id) else {
            out.corrupt.push(w.write_id);
            return;
        };
        let (old_loc, old_crc) = self.map[stripe as usize];
        let old = self.disk.read(old_loc);
        if crc32c::crc32c(&old) != old_crc {
            out.corrupt.push(w.write_id);
            return self.next_write(stripe, out);
        }
        let Some(new_loc) = self.allocate(Role::Data) else {
            // No free location: wait (first in line for this stripe) until one is freed.
            self.data_queue.entry(stripe).or_default().push_front(w);
            self.blocked.push_back((Role::Data, stripe));
            return;
        };
        let seq = self.data_seq.entry(stripe).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.disk.write(new_loc, &w.data);
        let delta = self.push_delta.then(|| {
            let mut delta = vec![0; w.data.len()];
            parity::delta(&old, &w.data, &mut delta);
            delta
        });
        let u = DataUpdate {
            write_id: w.write_id,
            seq,
            old_loc,
            new_loc,
            old,
            new_crc: crc32c::crc32c(&w.data),
            new: w.data,
            own_hardened: false,
            peer_hardened: false,
            parity_held: false,
            proxy: None,
        };
        for record in u.records(stripe, column) {
            self.journal(record);
        }
        self.data.insert(stripe, u);
        self.disk.flush(w.write_id << 3 | STEP_DATA);
        out.reached.push((w.write_id, Toughness::Submitted));
        out.sends.push((
            self.layout.parity_node(stripe),
            Msg::Update {
                write_id: w.write_id,
                stripe,
                stripe_seq: seq,
                column,
                from: self.id,
                delta,
            },
        ));
    }

    fn next_write(&mut self, stripe: u64, out: &mut Outbox) {
        if let Some(w) = self
            .data_queue
            .get_mut(&stripe)
            .and_then(VecDeque::pop_front)
        {
            self.start_write(stripe, w, out);
        }
    }

    fn data_update(&mut self, stripe: u64, write_id: WriteId) -> Option<&mut DataUpdate> {
        self.data
            .get_mut(&stripe)
            .filter(|u| u.write_id == write_id)
    }

    fn finish_data(&mut self, stripe: u64, out: &mut Outbox) {
        let done = self
            .data
            .get(&stripe)
            .is_some_and(|u| u.own_hardened && u.peer_hardened);
        if !done {
            return;
        }
        let Some(u) = self.data.remove(&stripe) else {
            return;
        };
        out.reached.push((u.write_id, Toughness::Durable));
        let column = self.layout.column_of(stripe, self.id).unwrap_or(0) as u32;
        self.done.insert((stripe, column), u.seq);
        // Both sides hardened: the old data is no longer needed by any recovery.
        self.journal(Body::Free(Free {
            loc: U64::new(u.old_loc),
        }));
        self.journal(Body::MjComplete(mark(u.write_id, stripe, u.seq, 0)));
        let token = u.write_id << 3 | STEP_COMPLETE;
        self.freeing.insert(token, (Role::Data, u.old_loc));
        self.disk.flush(token);
        if let Some(reads) = self.pending_reads.remove(&stripe) {
            let block = self.read_current(stripe);
            for id in reads {
                out.reads.push((id, block.clone()));
            }
        }
        self.next_write(stripe, out);
    }

    // ---- parity role ----

    fn parity_update(&mut self, stripe: u64, write_id: WriteId) -> Option<&mut ParityUpdate> {
        self.parity
            .get_mut(&stripe)
            .filter(|u| u.req.write_id == write_id)
    }

    fn start_parity(&mut self, stripe: u64, req: UpdateReq, out: &mut Outbox) {
        let applied = self
            .applied
            .get(&(stripe, req.column))
            .copied()
            .unwrap_or(0);
        if req.seq <= applied {
            // Superseded while it waited: a newer update of its column was applied (this
            // one went to a proxy; its stripe is marked for repair). Its `DataHardened`
            // may have been dropped as a duplicate, so starting it could wait forever.
            self.pushed.remove(&req.write_id);
            self.early_hardened.remove(&req.write_id);
            return self.next_parity(stripe, out);
        }
        let old_loc = self.map[stripe as usize].0;
        let Some(new_loc) = self.allocate(Role::Parity) else {
            self.parity_queue.entry(stripe).or_default().push_front(req);
            self.blocked.push_back((Role::Parity, stripe));
            return;
        };
        let u = ParityUpdate {
            req,
            old_loc,
            old_crc: self.map[stripe as usize].1,
            new_loc,
            new_crc: 0,
            merged: false,
            own_hardened: false,
            peer_hardened: self.early_hardened.remove(&req.write_id),
        };
        self.journal(u.intent(stripe));
        self.parity.insert(stripe, u);
        match self.pushed.remove(&req.write_id) {
            Some(delta) => self.merge_delta(stripe, req.write_id, delta, out),
            None => out.sends.push((
                req.from,
                Msg::DeltaRequest {
                    write_id: req.write_id,
                    stripe,
                },
            )),
        }
    }

    /// Merges the delta of the update in progress on `stripe` into the old parity and
    /// writes the full new parity with its hardened mark (once per update).
    fn merge_delta(&mut self, stripe: u64, write_id: WriteId, delta: Vec<u8>, out: &mut Outbox) {
        let Some(u) = self.parity_update(stripe, write_id) else {
            return;
        };
        if u.merged {
            return; // a delta is applied once
        }
        u.merged = true;
        let (old_loc, new_loc, req) = (u.old_loc, u.new_loc, u.req);
        let mut block = self.disk.read(old_loc);
        if block.len() != delta.len() {
            out.corrupt.push(write_id);
            return;
        }
        parity::merge(&mut block, &delta);
        let Some(u) = self.parity.get_mut(&stripe) else {
            return;
        };
        u.new_crc = crc32c::crc32c(&block);
        let hardened = u.mark(stripe);
        self.disk.write(new_loc, &block);
        self.journal(hardened);
        out.sends
            .push((req.from, Msg::DeltaHeld { write_id, stripe }));
        self.disk.flush(write_id << 3 | STEP_PARITY);
    }

    fn finish_parity(&mut self, stripe: u64, out: &mut Outbox) {
        let done = self
            .parity
            .get(&stripe)
            .is_some_and(|u| u.own_hardened && u.peer_hardened);
        if !done {
            return;
        }
        let Some(u) = self.parity.remove(&stripe) else {
            return;
        };
        self.done.insert((stripe, u.req.column as u32), u.req.seq);
        self.journal(Body::Free(Free {
            loc: U64::new(u.old_loc),
        }));
        self.journal(Body::PjComplete(mark(u.req.write_id, stripe, u.req.seq, 0)));
        let token = u.req.write_id << 3 | STEP_COMPLETE;
        self.freeing.insert(token, (Role::Parity, u.old_loc));
        self.disk.flush(token);
        self.next_parity(stripe, out);
    }

    fn next_parity(&mut self, stripe: u64, out: &mut Outbox) {
        if let Some(next) = self
            .parity_queue
            .get_mut(&stripe)
            .and_then(VecDeque::pop_front)
        {
            self.start_parity(stripe, next, out);
        }
    }

    /// Restarts the updates that waited for a free location, while there are some.
    fn unblock(&mut self, out: &mut Outbox) {
        for _ in 0..self.blocked.len() {
            let Some((role, stripe)) = self.blocked.pop_front() else {
                return;
            };
            if self.free[role as usize].is_empty() {
                self.blocked.push_back((role, stripe));
                continue;
            }
            match role {
                Role::Data if !self.data.contains_key(&stripe) => self.next_write(stripe, out),
                Role::Parity if !self.parity.contains_key(&stripe) => self.next_parity(stripe, out),
                _ => {}
            }
        }
    }

    // ---- events ----

    /// A peer message arrived.
    pub fn receive(&mut self, msg: Msg, out: &mut Outbox) {
        self.receive_inner(msg, out);
        self.maybe_checkpoint();
    }

    fn receive_inner(&mut self, msg: Msg, out: &mut Outbox) {
        match msg {
            Msg::Update {
                write_id,
                stripe,
                stripe_seq,
                column,
                from,
                delta,
            } => {
                let req = UpdateReq {
                    write_id,
                    seq: stripe_seq,
                    column,
                    from,
                };
                let applied = self.applied.get(&(stripe, column)).copied().unwrap_or(0);
                let current = self
                    .parity
                    .get(&stripe)
                    .is_some_and(|u| u.req.write_id == write_id);
                let queued = self
                    .parity_queue
                    .get(&stripe)
                    .is_some_and(|q| q.iter().any(|r| r.write_id == write_id));
                if stripe_seq <= applied || current || queued || self.abandoned.contains(&write_id)
                {
                    return; // duplicate, replay, or taken to a proxy
                }
                if let Some(delta) = delta {
                    self.pushed.insert(write_id, delta);
                }
                let waiting = self
                    .parity_queue
                    .get(&stripe)
                    .is_some_and(|q| !q.is_empty());
                if self.parity.contains_key(&stripe) || waiting {
                    self.parity_queue.entry(stripe).or_default().push_back(req);
                } else {
                    self.start_parity(stripe, req, out);
                }
            }
            Msg::DeltaRequest { write_id, stripe } => {
                let Some(u) = self.data_update(stripe, write_id) else {
                    return;
                };
                let mut delta = vec![0; u.new.len()];
                parity::delta(&u.old, &u.new, &mut delta);
                let p = self.layout.parity_node(stripe);
                out.sends.push((
                    p,
                    Msg::Delta {
                        write_id,
                        stripe,
                        delta,
                    },
                ));
            }
            Msg::Delta {
                write_id,
                stripe,
                delta,
            } => self.merge_delta(stripe, write_id, delta, out),
            Msg::DeltaHeld { write_id, stripe } => {
                let Some(u) = self.data_update(stripe, write_id) else {
                    return;
                };
                if !u.parity_held {
                    u.parity_held = true;
                    out.reached.push((write_id, Toughness::ParityHeld));
                }
            }
            Msg::DataHardened {
                write_id,
                stripe,
                stripe_seq,
                column,
            } => {
                let current = self
                    .parity
                    .get(&stripe)
                    .is_some_and(|u| u.req.write_id == write_id);
                let applied = self.applied.get(&(stripe, column)).copied().unwrap_or(0);
                if !current && (stripe_seq <= applied || self.abandoned.contains(&write_id)) {
                    return; // duplicate of a completed update, or one taken to a proxy
                }
                match self.parity_update(stripe, write_id) {
                    Some(u) => {
                        u.peer_hardened = true;
                        self.finish_parity(stripe, out);
                    }
                    None => {
                        self.early_hardened.insert(write_id);
                    }
                }
            }
            Msg::ProxyUpdate {
                write_id,
                stripe,
                stripe_seq,
                column,
                from,
                data,
            } => match self.proxied.get(&write_id) {
                Some(p) if p.durable => {
                    out.sends
                        .push((from, Msg::ProxyHardened { write_id, stripe }));
                }
                Some(_) => {} // being made durable
                None => {
                    let intent = Intent {
                        write_id: U64::new(write_id),
                        stripe: U64::new(stripe),
                        stripe_seq: U64::new(stripe_seq),
                        new_loc: U64::new(0),
                        old_loc: U64::new(0),
                        column: U32::new(column as u32),
                        new_crc: U32::new(crc32c::crc32c(&data)),
                    };
                    self.journal(Body::Proxy(intent, data.clone()));
                    self.proxied.insert(
                        write_id,
                        ProxyCopy {
                            intent,
                            data,
                            from,
                            durable: false,
                        },
                    );
                    self.disk.flush(write_id << 3 | STEP_PROXY);
                }
            },
            Msg::ProxyHardened { write_id, stripe } => {
                let Some(u) = self.data_update(stripe, write_id) else {
                    return;
                };
                if u.proxy.is_none() {
                    return;
                }
                if !u.parity_held {
                    u.parity_held = true;
                    out.reached.push((write_id, Toughness::ParityHeld));
                }
                u.peer_hardened = true;
                self.finish_data(stripe, out);
            }
            Msg::Abandon { write_id, stripe } => {
                self.abandoned.insert(write_id);
                self.pushed.remove(&write_id);
                self.early_hardened.remove(&write_id);
                if let Some(q) = self.parity_queue.get_mut(&stripe) {
                    q.retain(|r| r.write_id != write_id);
                }
                let started = self
                    .parity
                    .get(&stripe)
                    .is_some_and(|u| u.req.write_id == write_id && !u.merged);
                if started {
                    // Nothing durable points at its new location (no hardened mark was
                    // written): it goes straight back to the pool.
                    if let Some(u) = self.parity.remove(&stripe) {
                        self.free[Role::Parity as usize].insert(u.new_loc);
                    }
                    self.next_parity(stripe, out);
                    self.unblock(out);
                }
            }
            Msg::ParityHardened { write_id, stripe } => {
                let Some(u) = self.data_update(stripe, write_id) else {
                    return;
                };
                u.peer_hardened = true;
                self.finish_data(stripe, out);
            }
        }
    }

    /// The flush started with `token` completed: everything written before it is durable.
    pub fn flushed(&mut self, token: u64, out: &mut Outbox) {
        self.flushed_inner(token, out);
        self.maybe_checkpoint();
    }

    fn flushed_inner(&mut self, token: u64, out: &mut Outbox) {
        let (write_id, step) = (token >> 3, token & 7);
        match step {
            STEP_CHECKPOINT if self.checkpoint_pending == Some(token) => {
                self.checkpoint_pending = None;
            }
            STEP_DATA => {
                let Some((stripe, new_loc, crc, seq)) = self
                    .data
                    .iter()
                    .find(|(_, u)| u.write_id == write_id)
                    .map(|(s, u)| (*s, u.new_loc, u.new_crc, u.seq))
                else {
                    return;
                };
                self.map[stripe as usize] = (new_loc, crc);
                if let Some(u) = self.data.get_mut(&stripe) {
                    u.own_hardened = true;
                }
                let p = self.layout.parity_node(stripe);
                let column = self.layout.column_of(stripe, self.id).unwrap_or(0);
                out.sends.push((
                    p,
                    Msg::DataHardened {
                        write_id,
                        stripe,
                        stripe_seq: seq,
                        column,
                    },
                ));
                self.finish_data(stripe, out);
            }
            STEP_PARITY => {
                let Some((stripe, new_loc, crc, req)) = self
                    .parity
                    .iter()
                    .find(|(_, u)| u.req.write_id == write_id)
                    .map(|(s, u)| (*s, u.new_loc, u.new_crc, u.req))
                else {
                    return;
                };
                self.map[stripe as usize] = (new_loc, crc);
                // Never backwards: an update that went to a proxy may still arrive here late
                // and be applied after a newer one (deltas commute), and must not reopen the
                // newer one to a duplicate.
                let applied = self.applied.entry((stripe, req.column)).or_insert(0);
                *applied = (*applied).max(req.seq);
                if let Some(u) = self.parity.get_mut(&stripe) {
                    u.own_hardened = true;
                }
                out.sends
                    .push((req.from, Msg::ParityHardened { write_id, stripe }));
                self.finish_parity(stripe, out);
            }
            STEP_PROXY => {
                if let Some(p) = self.proxied.get_mut(&write_id) {
                    p.durable = true;
                    let stripe = p.intent.stripe.get();
                    out.sends
                        .push((p.from, Msg::ProxyHardened { write_id, stripe }));
                }
            }
            STEP_COMPLETE => {
                // The `Free` record is durable: the old location may be reused.
                if let Some((role, loc)) = self.freeing.remove(&token) {
                    self.free[role as usize].insert(loc);
                    self.unblock(out);
                }
            }
            _ => {}
        }
    }
}
