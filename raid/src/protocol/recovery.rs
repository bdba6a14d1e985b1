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
    pub forward: usize,
    pub backward: usize,
    /// Stripes whose parity missed a forward update (it went to a proxy): recompute their
    /// parity from the data columns before trusting it.
    pub repair: BTreeSet<u64>,
    /// Broken invariants found while replaying (empty when all is well).
    pub violations: Vec<String>,
}

/// Recovers from each node's durable journal bytes and blocks: `block_crc(node, loc)` is the
/// crc32c of the block at `loc` on `node`'s device as it is after the crash. Every node's
/// column of stripe `s` starts at location `s`; each device has `locations` slots.
pub fn recover(
    layout: &Layout,
    journals: &[Vec<u8>],
    locations: u64,
    block_crc: impl Fn(NodeId, Loc) -> u32,
) -> Recovered {
    let replays: Vec<Vec<Record>> = journals
        .iter()
        .map(|j| record::replay(j, None).records)
        .collect();
    let mut data_hardened: HashSet<WriteId> = HashSet::new();
    let mut parity_hardened: HashSet<WriteId> = HashSet::new();
    let mut completed: HashSet<WriteId> = HashSet::new();
    let mut parity_completed: HashSet<WriteId> = HashSet::new();
    let mut proxy_held: HashSet<WriteId> = HashSet::new();
    for (node, records) in replays.iter().enumerate() {
        // The new location of each update this node journalled an intent for.
        let mut new_loc: HashMap<WriteId, Loc> = HashMap::new();
        for r in records {
            match r.body {
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
    // An update goes forward when its data and its parity (or a proxy's copy in place of
    // the parity) are durable.
    let both = |w: WriteId| {
        completed.contains(&w)
            || (data_hardened.contains(&w)
                && (parity_hardened.contains(&w) || proxy_held.contains(&w)))
    };
    // The parity side itself moves forward only if it hardened too; a forward update whose
    // parity node did not leaves that stripe's parity stale: it needs repair.
    let parity_forward =
        |w: WriteId| both(w) && (parity_hardened.contains(&w) || parity_completed.contains(&w));
    let mut out = Recovered {
        maps: Vec::new(),
        free: Vec::new(),
        next_jseq: Vec::new(),
        forward: 0,
        backward: 0,
        repair: BTreeSet::new(),
        violations: Vec::new(),
    };
    for (node, records) in replays.iter().enumerate() {
        let mut map: Vec<Loc> = (0..layout.stripes).collect();
        // Journal position of each location's last allocation and last free.
        let mut allocated: HashMap<Loc, usize> = HashMap::new();
        let mut freed: HashMap<Loc, usize> = HashMap::new();
        for (at, r) in records.iter().enumerate() {
            let (write_id, stripe, new_loc, old_loc, is_data) = match r.body {
                Body::Mj(m) => (
                    m.write_id.get(),
                    m.stripe.get(),
                    m.new_loc.get(),
                    m.old_loc.get(),
                    true,
                ),
                Body::Pj(p) => (
                    p.write_id.get(),
                    p.stripe.get(),
                    p.new_loc.get(),
                    p.old_loc.get(),
                    false,
                ),
                Body::Free(f) => {
                    freed.insert(f.loc.get(), at);
                    continue;
                }
                _ => continue,
            };
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
            let forward = if is_data {
                both(write_id)
            } else {
                parity_forward(write_id)
            };
            if forward {
                *current = new_loc;
                out.forward += 1;
            } else {
                out.backward += 1;
            }
            if is_data && forward && !parity_forward(write_id) {
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
        out.next_jseq.push(records.last().map_or(0, |r| r.seq + 1));
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
