//! The data/parity write protocol for K+1 stripes (DESIGN.md section 7), sans-IO.
//!
//! A [`node::Node`] holds one column of every stripe (a data column, or the parity, which
//! rotates per stripe) on one device behind the [`Disk`] trait, and journals every step.
//! Nodes exchange [`Msg`]s; whatever carries them (the deterministic simulator in [`sim`],
//! or TCP with the framing in [`wire`]) calls the node's handlers and delivers what they send. For one write to block
//! `column` of `stripe`, between data node D and parity node P:
//!
//! 1. D reads the old data (checking its crc32c), writes the new data to a fresh location,
//!    journals `mj` and sends `Update`. Toughness 0 answers here.
//! 2. P journals `pj` (fresh parity location, old location) and sends `DeltaRequest`.
//! 3. D sends `Delta` = old ⊕ new. P merges it into the old parity, writes the full new parity
//!    to the fresh location and sends `DeltaHeld`. Toughness 1 answers when D gets it.
//! 4. Each side appends its hardened mark (with the new block's crc32c) after the block and
//!    its intent, and makes the three durable with one flush; then it points its column at
//!    the new location and tells the other. Toughness 2 answers when D has both.
//! 5. Each side journals completion and frees its old location (reused once that `Free`
//!    record is durable).
//!
//! Invariants kept here and checked by the crash campaign:
//! - old data and old parity stay untouched until both sides hardened, so recovery can
//!   always roll a stripe back to (old data, old parity) or forward to (new, new);
//! - at most one unhardened update per stripe: P serialises updates per stripe, and D
//!   serialises writes per block;
//! - a delta is applied at most once: P keeps the last stripe sequence it applied and ignores
//!   duplicates; what P journals for replay is the full new parity, never the delta;
//! - recovery goes forward only if both sides hardened (durable marks whose crc matches the
//!   block at the new location, or a durable completion), else backward.

pub mod file_disk;
pub mod net;
pub mod node;
pub mod recovery;
pub mod sim;
pub mod wire;

/// A location (block slot) on a node's device.
pub type Loc = u64;
/// Identifies one client write across the cluster.
pub type WriteId = u64;
pub type NodeId = usize;

/// When a write is answered (DESIGN.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Toughness {
    /// Data submitted to the local device.
    Submitted = 0,
    /// The parity node holds the update in memory.
    ParityHeld = 1,
    /// Data and parity are on stable storage.
    Durable = 2,
}

impl Toughness {
    pub fn from_level(level: u8) -> Option<Toughness> {
        match level {
            0 => Some(Toughness::Submitted),
            1 => Some(Toughness::ParityHeld),
            2 => Some(Toughness::Durable),
            _ => None,
        }
    }
}

/// How stripes map onto nodes: K data columns and one parity column, rotating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub data_columns: usize,
    pub stripes: u64,
    pub block_bytes: usize,
}

impl Layout {
    pub fn nodes(&self) -> usize {
        self.data_columns + 1
    }

    pub fn parity_node(&self, stripe: u64) -> NodeId {
        (stripe % self.nodes() as u64) as NodeId
    }

    pub fn data_node(&self, stripe: u64, column: usize) -> NodeId {
        (self.parity_node(stripe) + 1 + column) % self.nodes()
    }

    /// Which column of `stripe` node `node` holds: `None` for the parity.
    pub fn column_of(&self, stripe: u64, node: NodeId) -> Option<usize> {
        let p = self.parity_node(stripe);
        (node != p).then(|| (node + self.nodes() - p - 1) % self.nodes())
    }
}

/// A peer message. Sequence numbers are per stripe; a message about an update that is not
/// the one in progress (a duplicate, or replayed after completion) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Update {
        write_id: WriteId,
        stripe: u64,
        stripe_seq: u64,
        column: usize,
        from: NodeId,
        /// The delta (old ⊕ new), when the data node sends it with the update; otherwise
        /// the parity node asks for it with `DeltaRequest`.
        delta: Option<Vec<u8>>,
    },
    DeltaRequest {
        write_id: WriteId,
        stripe: u64,
    },
    Delta {
        write_id: WriteId,
        stripe: u64,
        delta: Vec<u8>,
    },
    DeltaHeld {
        write_id: WriteId,
        stripe: u64,
    },
    DataHardened {
        write_id: WriteId,
        stripe: u64,
        stripe_seq: u64,
        column: usize,
    },
    ParityHardened {
        write_id: WriteId,
        stripe: u64,
    },
    /// The parity node did not answer in time: the data node asks a parity proxy (another
    /// server) to hold a durable copy of the new data in its place.
    ProxyUpdate {
        write_id: WriteId,
        stripe: u64,
        stripe_seq: u64,
        column: usize,
        from: NodeId,
        data: Vec<u8>,
    },
    /// The proxy's copy is durable.
    ProxyHardened {
        write_id: WriteId,
        stripe: u64,
    },
    /// The data node went to a proxy: the parity node drops the update if it has not
    /// merged it yet (the stripe is marked for repair either way).
    Abandon {
        write_id: WriteId,
        stripe: u64,
    },
}

/// The device under a node: block slots and a journal, with explicit flushes. The
/// simulator's implementation injects faults (power cuts that drop or tear what was not
/// flushed); the real one sits on the io_uring engine.
pub trait Disk {
    fn read(&self, loc: Loc) -> Vec<u8>;
    /// A write that is volatile until a later flush completes.
    fn write(&mut self, loc: Loc, data: &[u8]);
    /// Appends encoded journal bytes to the active half of the journal (volatile until
    /// flushed).
    fn append_journal(&mut self, bytes: &[u8]);
    /// Makes the other half of the journal active: later appends write it from its start,
    /// over whatever it held. The node does this to begin a checkpoint, and only once the
    /// previous checkpoint is durable (so the half it overwrites is no longer needed).
    fn switch_journal(&mut self);
    /// Starts a flush of everything written so far; the node is told via
    /// [`node::Node::flushed`] with the same token when it completes.
    fn flush(&mut self, token: u64);
}
