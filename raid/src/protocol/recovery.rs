//! Recovery after a crash of any set of nodes: replay every node's journal and decide each
//! update from both sides' records.
//!
//! An update goes forward (its new location becomes the column's location) only if both
//! sides hardened: the data node's `DataHardened` and the parity node's `ParityHardened`
//! marks are durable and each matches the crc32c of the block at its side's new location
//! (a mark goes down in the same flush as its block, so a mark whose block did not make it
//! is void), or either side journalled the update's completion (which it does only after
//! both hardened). Otherwise it is rolled back to the old location, which the protocol never
//! frees before both sides hardened. "When in doubt, recover backwards."
//!
//! The crc check is sound because a node reuses a location only after its `Free` record is
//! durable, and that record follows the completion of every update that wrote there: a
//! mark whose block was since overwritten belongs to an update whose completion is durable.
//! (A new block whose crc32c happens to equal the crc of the different stale bytes at its
//! location would pass for written: a 2^-32 chance, per update in flight at a crash.)
//!
//! Recovery also checks the journals against the result: an update must start from the
//! column's current location, and no location the recovered maps reference may have been
//! freed after it was last allocated.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{Layout, Loc, NodeId, WriteId};
use crate::journal::record::{self, Body, Record};
use crate::parity;

/// The state every node restarts from.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Per node, the location of its column of each stripe.
    pub maps: Vec<Vec<Loc>>,
    /// Per node, the locations not referenced (free to allocate).
    pub free: Vec<BTreeSet<Loc>>,
    /// Per node, the sequence number its journal continues at.
    pub next_jseq: Vec<u64>,
    /// Per node, the journal half it replayed (a restarted node checkpoints into the other).
    pub half: Vec<usize>,
    /// Per node, the last stripe sequence that went forward per (stripe, column) it holds
    /// (a restarted node continues its sequences from there).
    pub seqs: Vec<HashMap<(u64, u32), u64>>,
    /// Per node, the proxy copies it holds (intent, block): kept until their stripes are
    /// repaired.
    pub proxies: Vec<Vec<(record::Intent, Vec<u8>)>>,
    pub forward: usize,
    pub backward: usize,
    /// Stripes whose parity missed a forward update (it went to a proxy): recompute their
    /// parity from the data columns before trusting it.
    pub repair: BTreeSet<u64>,
    /// Broken invariants found while replaying (empty when all is well).
    pub violations: Vec<String>,
}

/// Where one node's replay starts: a checkpoint (or the initial layout) and the records
/// after it.
struct Start {
    map: Vec<Loc>,
    records: Vec<Record>,
    checkpoint: Option<record::Checkpoint>,
    next_jseq: u64,
    half: usize,
}

/// Picks the journal half to replay: the one that starts with the newest complete
/// checkpoint, or half 0 from the initial layout if no checkpoint was ever completed.
fn start_of(layout: &Layout, halves: &[Vec<u8>]) -> Start {
    let mut best: Option<(u64, Start)> = None;
    for (h, bytes) in halves.iter().enumerate() {
        let mut records = record::replay(bytes, None).records;
        let Some(first) = records.first() else {
            continue;
        };
        let seq = first.seq;
        // A checkpoint counts only with its end: the updates in progress that it journalled
        // again after itself must all be there.
        let sealed = records
            .iter()
            .any(|r| matches!(&r.body, Body::CheckpointEnd(e) if e.checkpoint_seq.get() == seq));
        let (map, checkpoint) = match &first.body {
            Body::Checkpoint(b) => match record::Checkpoint::decode(b) {
                Some(c) if c.map.len() as u64 == layout.stripes && sealed => {
                    (c.map.iter().map(|(loc, _)| *loc).collect(), Some(c))
                }
                _ => continue,
            },
            _ if h == 0 && seq == 0 => ((0..layout.stripes).collect(), None),
            _ => continue,
        };
        if checkpoint.is_some() {
            records.remove(0);
        }
        if best.as_ref().is_none_or(|(s, _)| seq > *s) {
            let next_jseq = records.last().map_or(seq + 1, |r| r.seq + 1);
            best = Some((
                seq,
                Start {
                    map,
                    records,
                    checkpoint,
                    next_jseq,
                    half: h,
                },
            ));
        }
    }
    best.map(|(_, s)| s).unwrap_or_else(|| Start {
        map: (0..layout.stripes).collect(),
        records: Vec::new(),
        checkpoint: None,
        next_jseq: 0,
        half: 0,
    })
}

/// Recovers from each node's durable journal (its halves, as on the media) and blocks:
/// `block_crc(node, loc)` is the crc32c of the block at `loc` on `node`'s device as it is
/// after the crash. Without a checkpoint, every node's column of stripe `s` starts at
/// location `s`; each device has `locations` slots.
pub fn recover(
    layout: &Layout,
    journals: &[Vec<Vec<u8>>],
    locations: u64,
    block_crc: impl Fn(NodeId, Loc) -> u32,
) -> Recovered {
    let starts: Vec<Start> = journals.iter().map(|h| start_of(layout, h)).collect();
    // What the checkpoints say was completed, per (stripe, column), on each side.
    let mut done_data: HashMap<(u64, u32), u64> = HashMap::new();
    let mut done_parity: HashMap<(u64, u32), u64> = HashMap::new();
    let mut repair_marked: BTreeSet<u64> = BTreeSet::new();
    for (node, st) in starts.iter().enumerate() {
        let Some(c) = &st.checkpoint else {
            continue;
        };
        for &(stripe, column, seq) in &c.done {
            let side = if layout.parity_node(stripe) == node {
                &mut done_parity
            } else {
                &mut done_data
            };
            let e = side.entry((stripe, column)).or_insert(0);
            *e = (*e).max(seq);
        }
        repair_marked.extend(c.repair.iter().copied());
    }
    let mut data_hardened: HashSet<WriteId> = HashSet::new();
    let mut parity_hardened: HashSet<WriteId> = HashSet::new();
    let mut completed: HashSet<WriteId> = HashSet::new();
    let mut parity_completed: HashSet<WriteId> = HashSet::new();
    let mut proxy_held: HashSet<WriteId> = HashSet::new();
    for (node, st) in starts.iter().enumerate() {
        // The new location of each update this node journalled an intent for.
        let mut new_loc: HashMap<WriteId, Loc> = HashMap::new();
        for r in &st.records {
            match &r.body {
                Body::Mj(i) | Body::Pj(i) => {
                    new_loc.insert(i.write_id.get(), i.new_loc.get());
                }
                Body::DataHardened(m) | Body::ParityHardened(m) => {
                    let w = m.write_id.get();
                    let Some(&loc) = new_loc.get(&w) else {
                        continue; // a mark without its intent is void
                    };
                    if block_crc(node, loc) != m.crc.get() {
                        continue; // the block did not reach the media: not hardened
                    }
                    if matches!(r.body, Body::DataHardened(_)) {
                        data_hardened.insert(w);
                    } else {
                        parity_hardened.insert(w);
                    }
                }
                Body::MjComplete(m) => {
                    completed.insert(m.write_id.get());
                }
                Body::PjComplete(m) => {
                    completed.insert(m.write_id.get());
                    parity_completed.insert(m.write_id.get());
                }
                // The record's crc covers the copy: if it replays, the copy is whole.
                Body::Proxy(i, _) => {
                    proxy_held.insert(i.write_id.get());
                }
                _ => {}
            }
        }
    }
    let at_least = |m: &HashMap<(u64, u32), u64>, stripe: u64, column: u32, seq: u64| {
        m.get(&(stripe, column)).is_some_and(|&d| d >= seq)
    };
    // An update goes forward when its data and its parity (or a proxy's copy in place of
    // the parity) are durable, or a side completed it.
    let both = |w: WriteId, stripe: u64, column: u32, seq: u64| {
        completed.contains(&w)
            || at_least(&done_data, stripe, column, seq)
            || at_least(&done_parity, stripe, column, seq)
            || (data_hardened.contains(&w)
                && (parity_hardened.contains(&w) || proxy_held.contains(&w)))
    };
    // The parity side itself moves forward only if it hardened too. Its own records decide:
    // a parity update replayed here started after the parity node's checkpoint, so its mark
    // or completion, if any, is replayed too. (A checkpoint's completed sequence is no proof
    // that the parity node applied every update below it: it skips those it abandoned.)
    let parity_ok = |w: WriteId| parity_hardened.contains(&w) || parity_completed.contains(&w);
    let mut out = Recovered {
        maps: Vec::new(),
        free: Vec::new(),
        next_jseq: Vec::new(),
        forward: 0,
        backward: 0,
        repair: repair_marked,
        half: Vec::new(),
        seqs: Vec::new(),
        proxies: Vec::new(),
        violations: Vec::new(),
    };
    for (node, st) in starts.iter().enumerate() {
        let mut map = st.map.clone();
        let mut seqs: HashMap<(u64, u32), u64> = st
            .checkpoint
            .iter()
            .flat_map(|c| c.done.iter().map(|&(s, c, q)| ((s, c), q)))
            .collect();
        // Journal position of each location's last allocation and last free.
        let mut allocated: HashMap<Loc, usize> = HashMap::new();
        let mut freed: HashMap<Loc, usize> = HashMap::new();
        for (at, r) in st.records.iter().enumerate() {
            let (i, is_data) = match &r.body {
                Body::Mj(i) => (i, true),
                Body::Pj(i) => (i, false),
                Body::Free(f) => {
                    freed.insert(f.loc.get(), at);
                    continue;
                }
                _ => continue,
            };
            let (write_id, stripe, new_loc, old_loc) = (
                i.write_id.get(),
                i.stripe.get(),
                i.new_loc.get(),
                i.old_loc.get(),
            );
            let (column, seq) = (i.column.get(), i.stripe_seq.get());
            allocated.insert(new_loc, at);
            let Some(current) = map.get_mut(stripe as usize) else {
                out.violations.push(format!(
                    "node {node}: record for stripe {stripe} outside the layout"
                ));
                continue;
            };
            if *current != old_loc {
                out.violations.push(format!(
                    "node {node}: update {write_id} of stripe {stripe} starts from location {old_loc}, but the stripe is at {current}"
                ));
            }
            let forward = both(write_id, stripe, column, seq) && (is_data || parity_ok(write_id));
            if forward {
                *current = new_loc;
                let q = seqs.entry((stripe, column)).or_insert(0);
                *q = (*q).max(seq);
                out.forward += 1;
            } else {
                out.backward += 1;
            }
            // Went to a proxy and its parity node did not apply it: the stripe's parity is
            // stale. (Conservative when the parity node's records of it were checkpointed
            // away: repairing a correct parity is harmless.)
            if is_data && forward && proxy_held.contains(&write_id) && !parity_ok(write_id) {
                out.repair.insert(stripe);
            }
        }
        for (stripe, loc) in map.iter().enumerate() {
            let alloc_at = allocated.get(loc);
            if let Some(free_at) = freed.get(loc) {
                if alloc_at.is_none_or(|a| free_at > a) {
                    out.violations.push(format!(
                        "node {node}: location {loc} of stripe {stripe} is referenced but was freed"
                    ));
                }
            }
        }
        let referenced: HashSet<Loc> = map.iter().copied().collect();
        out.free
            .push((0..locations).filter(|l| !referenced.contains(l)).collect());
        out.next_jseq.push(st.next_jseq);
        out.half.push(st.half);
        out.proxies.push(
            st.records
                .iter()
                .filter_map(|r| match &r.body {
                    Body::Proxy(i, data) => Some((*i, data.clone())),
                    _ => None,
                })
                .collect(),
        );
        out.seqs.push(seqs);
        out.maps.push(map);
    }
    out
}

/// Rebuilds a lost data column of `stripe` from the other columns and the parity.
/// `read(node)` returns that node's current block of the stripe.
pub fn degraded_read(
    layout: &Layout,
    stripe: u64,
    lost_column: usize,
    read: impl Fn(NodeId) -> Vec<u8>,
) -> Vec<u8> {
    let lost = layout.data_node(stripe, lost_column);
    let survivors: Vec<Vec<u8>> = (0..layout.nodes())
        .filter(|&n| n != lost)
        .map(read)
        .collect();
    let refs: Vec<&[u8]> = survivors.iter().map(Vec::as_slice).collect();
    let mut out = vec![0; layout.block_bytes];
    parity::xor_of(&refs, &mut out);
    out
}
