//! A protocol [`Node`] on a real device ([`FileDisk`]), talking to its peers over TCP.
//!
//! One task owns the node and handles, in batches, everything that happens to it: peer
//! messages (read by one task per peer connection), client writes and flushes, and flush
//! completions. After each batch it writes what the node sends, one buffer per peer, and
//! makes every flush queued so far durable with one `fdatasync` (group commit): on its own
//! thread when it has nothing else to do (no event waiting, no sync running), else on an
//! idle flusher thread. Up to [`FLUSHERS`] syncs run at once, so a write queued while a
//! sync runs need not wait for it to end before its own starts. Run it on
//! a current-thread runtime: the node, its sockets and its clients then share one thread
//! and a message costs no thread hand-off.
//!
//! Peers: node `i` connects to every peer with a higher id and accepts the others. A new
//! connection starts with a 16-byte hello (magic, version, the connecting node's id, crc32c)
//! and then carries [`wire`] frames both ways.
//!
//! An update whose parity node has not hardened it within `parity_timeout` goes to a
//! parity proxy (the next node that is up and is not the parity node), and its stripe is
//! marked for repair. A peer whose connection fails is marked down: what we send it is
//! dropped and its updates time out to a proxy.
//!
//! Limits: at most [`INFLIGHT_MAX`] of this node's writes are in progress at once (later
//! ones wait, unanswered: back-pressure for clients answered at toughness 0 or 1, and it
//! bounds what recovery has to re-examine). Not built yet: reconnecting to a peer that comes
//! back, and repairing marked stripes while running.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::file_disk::FileDisk;
use super::node::{self, Node, Outbox};
use super::{wire, Layout, Loc, Msg, NodeId, Toughness, WriteId};

/// Writes of this node in progress at once; more wait unanswered. Each holds a new location
/// on this node and on the parity node until it completes.
pub const INFLIGHT_MAX: usize = 512;
/// How long a node keeps trying to reach a peer that is not listening yet.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `fdatasync`s in flight at once per node. One would make every write that arrives during a
/// sync wait for it (half a sync on average) before its own sync starts; the device takes
/// concurrent syncs well (32 concurrent writers get several times the IOPS of one).
pub const FLUSHERS: usize = 4;
/// Events handled before the node writes to its peers and starts a flush.
const BATCH_MAX: usize = 256;
/// How long a flush that only makes completions durable may wait for a flush that is needed
/// anyway to cover it. Under load every such flush rides along; when the node goes idle it
/// runs alone after this delay (until it does, the locations it frees are not reused).
const LAZY_FLUSH_DELAY: Duration = Duration::from_millis(5);
const HELLO_MAGIC: u32 = 0x4c48_5042; // "BPHL"
const HELLO_VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer {peer}: {source}")]
    Peer {
        peer: NodeId,
        source: wire::WireError,
    },
    #[error("bad hello from a peer: {0}")]
    Hello(&'static str),
    #[error("could not reach peer {peer} at {addr} within {CONNECT_TIMEOUT:?}: {source}")]
    Connect {
        peer: NodeId,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("stripe {stripe} has no data column on node {node}")]
    NotDataNode { stripe: u64, node: NodeId },
    #[error("stripe {stripe} is outside the layout of {stripes} stripes")]
    NoSuchStripe { stripe: u64, stripes: u64 },
    #[error("write refused: old data failed its checksum, or no free location")]
    Refused,
    #[error("the node stopped: {0}")]
    Stopped(String),
}

/// Where this node lives and whom it talks to.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub id: NodeId,
    pub layout: Layout,
    pub cluster: u64,
    /// The device file (created, zero-filled).
    pub device: PathBuf,
    /// Journal region of the device file (two halves; see [`FileDisk`]).
    pub journal_bytes: u64,
    /// Journal bytes between checkpoints (`None`: an eighth of the region, a quarter of a
    /// half). A checkpoint holds 12 bytes per stripe plus the updates in progress, and must
    /// fit in what is left of a half.
    pub checkpoint_bytes: Option<u64>,
    /// Block slots on the device: the stripes' columns plus room for new locations.
    pub locations: u64,
    /// Every other node's address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// How long an update may wait for its parity node before it goes to a parity proxy
    /// (another node; needs at least three). See [`PARITY_TIMEOUT`].
    pub parity_timeout: Duration,
}

/// Default bound on the parity node's answer: far above a sync under load (milliseconds),
/// short enough that a dead parity node stalls writes only briefly.
pub const PARITY_TIMEOUT: Duration = Duration::from_secs(2);

type Reply = oneshot::Sender<Result<(), NetError>>;

enum Event {
    Peer(Msg),
    PeerFailed(NodeId, String),
    Write {
        stripe: u64,
        data: Vec<u8>,
        toughness: Toughness,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Flush(oneshot::Sender<Result<(), NetError>>),
    Describe(oneshot::Sender<String>),
    Flushed(usize, std::io::Result<Vec<u64>>),
}

/// A client of a running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    id: NodeId,
    layout: Layout,
    tx: mpsc::UnboundedSender<Event>,
}

impl NodeHandle {
    /// Writes this node's column of `stripe`; returns once the write reached `toughness`.
    pub async fn write(
        &self,
        stripe: u64,
        data: Vec<u8>,
        toughness: Toughness,
    ) -> Result<(), NetError> {
        if stripe >= self.layout.stripes {
            return Err(NetError::NoSuchStripe {
                stripe,
                stripes: self.layout.stripes,
            });
        }
        if self.layout.column_of(stripe, self.id).is_none() {
            return Err(NetError::NotDataNode {
                stripe,
                node: self.id,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.send(Event::Write {
            stripe,
            data,
            toughness,
            reply,
        })?;
        rx.await
            .map_err(|_| NetError::Stopped("dropped a write".into()))?
    }

    /// Returns once every write answered before this call is at toughness 2.
    pub async fn flush(&self) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Flush(reply))?;
        rx.await
            .map_err(|_| NetError::Stopped("dropped a flush".into()))?
    }

    /// The node's state, for diagnosing a stall: updates in progress and queued, writes
    /// waiting, flushes queued and running.
    pub async fn describe(&self) -> Result<String, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Describe(reply))?;
        rx.await
            .map_err(|_| NetError::Stopped("dropped a describe".into()))
    }

    fn send(&self, ev: Event) -> Result<(), NetError> {
        self.tx
            .send(ev)
            .map_err(|_| NetError::Stopped("not running".into()))
    }
}

/// Starts the node: creates its device, connects to its peers (accepting on `listener`),
/// and spawns its tasks on the current runtime. Returns once every peer is connected; the
/// returned task ends (with the reason) when the node stops.
pub async fn start(
    cfg: NetConfig,
    listener: TcpListener,
) -> Result<(NodeHandle, tokio::task::JoinHandle<Result<(), NetError>>), NetError> {
    let block = cfg.layout.block_bytes;
    let max = Node::<FileDisk>::max_checkpoint_stripes(cfg.layout.data_columns);
    if cfg.layout.stripes > max {
        return Err(NetError::Stopped(format!(
            "{} stripes: a node's checkpoint describes at most {max} stripes with {} data \
             columns; use fewer, larger stripes",
            cfg.layout.stripes, cfg.layout.data_columns
        )));
    }
    let disk = FileDisk::create(&cfg.device, block, cfg.journal_bytes, cfg.locations)?;
    let sync_file = disk.sync_handle()?;
    let zero_crc = crc32c::crc32c(&vec![0u8; block]);
    let map = (0..cfg.layout.stripes).map(|s| (s, zero_crc)).collect();
    let free: BTreeSet<Loc> = (cfg.layout.stripes..cfg.locations).collect();
    let mut node = Node::new(cfg.id, cfg.layout, disk, map, free, 0);
    node.set_checkpoint_every(Some(cfg.checkpoint_bytes.unwrap_or(cfg.journal_bytes / 8)));

    let (tx, rx) = mpsc::unbounded_channel();
    let writers = connect_peers(&cfg, listener, &tx).await?;
    let mut flushers = Vec::with_capacity(FLUSHERS);
    for index in 0..FLUSHERS {
        flushers.push(Flusher::spawn(index, sync_file.try_clone()?, tx.clone())?);
    }
    let handle = NodeHandle {
        id: cfg.id,
        layout: cfg.layout,
        tx,
    };
    let state = Loop {
        node,
        id: cfg.id,
        cluster: cfg.cluster,
        next_write: 1,
        waiting: HashMap::new(),
        not_durable: BTreeSet::new(),
        flushes: VecDeque::new(),
        queued: VecDeque::new(),
        writers,
        idle_flushers: (0..FLUSHERS).collect(),
        flushers,
        lazy_since: None,
        answered: false,
        layout: cfg.layout,
        parity_timeout: cfg.parity_timeout,
        down: BTreeSet::new(),
        seen: HashMap::new(),
        next_check: tokio::time::Instant::now() + cfg.parity_timeout / 4,
    };
    let task = tokio::spawn(state.run(rx));
    Ok((handle, task))
}

struct PeerWriter {
    stream: OwnedWriteHalf,
    seq: u64,
    buf: Vec<u8>,
}

fn hello(id: NodeId) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&HELLO_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(id as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_hello(h: &[u8; 16]) -> Result<NodeId, NetError> {
    let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if word(0) != HELLO_MAGIC {
        return Err(NetError::Hello("magic"));
    }
    if word(12) != crc32c::crc32c(&h[..12]) {
        return Err(NetError::Hello("checksum"));
    }
    if u16::from_le_bytes([h[4], h[5]]) != HELLO_VERSION || h[6..8] != [0, 0] {
        return Err(NetError::Hello("version"));
    }
    Ok(word(8) as NodeId)
}

async fn connect_peers(
    cfg: &NetConfig,
    listener: TcpListener,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<HashMap<NodeId, PeerWriter>, NetError> {
    let mut writers = HashMap::new();
    let mut streams = Vec::new();
    for &(peer, addr) in cfg.peers.iter().filter(|(p, _)| *p > cfg.id) {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut stream = loop {
            match TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(NetError::Connect {
                        peer,
                        addr,
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        stream.write_all(&hello(cfg.id)).await?;
        streams.push((peer, stream));
    }
    let lower = cfg.peers.iter().filter(|(p, _)| *p < cfg.id).count();
    while streams.len() < cfg.peers.len() {
        let accepted = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
        let (mut stream, _) = accepted.map_err(|_| {
            NetError::Stopped(format!(
                "waited {CONNECT_TIMEOUT:?} for {lower} lower-numbered peers to connect"
            ))
        })??;
        let mut h = [0u8; 16];
        stream.read_exact(&mut h).await?;
        let peer = parse_hello(&h)?;
        let known = cfg.peers.iter().any(|(p, _)| *p == peer && peer < cfg.id);
        if !known || streams.iter().any(|(p, _)| *p == peer) {
            return Err(NetError::Hello("unexpected node id"));
        }
        streams.push((peer, stream));
    }
    for (peer, stream) in streams {
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        tokio::spawn(read_peer(peer, read, cfg.cluster, tx.clone()));
        writers.insert(
            peer,
            PeerWriter {
                stream: write,
                seq: 0,
                buf: Vec::with_capacity(64 << 10),
            },
        );
    }
    Ok(writers)
}

async fn read_peer(
    peer: NodeId,
    read: OwnedReadHalf,
    cluster: u64,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut reader = BufReader::with_capacity(256 << 10, read);
    let mut last = None;
    loop {
        match wire::read(&mut reader, cluster, last).await {
            Ok((seq, msg)) => {
                last = Some(seq);
                if tx.send(Event::Peer(msg)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Event::PeerFailed(peer, e.to_string()));
                return;
            }
        }
    }
}

/// A thread that runs `fdatasync` for the node's group commits.
struct Flusher {
    tx: std::sync::mpsc::Sender<Vec<u64>>,
}

impl Flusher {
    fn spawn(
        index: usize,
        file: File,
        done: mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u64>>();
        std::thread::Builder::new()
            .name("raid-flusher".into())
            .spawn(move || {
                while let Ok(tokens) = rx.recv() {
                    let result = file.sync_data().map(|()| tokens);
                    if done.send(Event::Flushed(index, result)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Flusher { tx })
    }
}

struct Loop {
    node: Node<FileDisk>,
    id: NodeId,
    cluster: u64,
    next_write: u64,
    /// Client writes waiting for their toughness.
    waiting: HashMap<WriteId, (Toughness, oneshot::Sender<Result<(), NetError>>)>,
    /// This node's writes not yet at toughness 2.
    not_durable: BTreeSet<WriteId>,
    /// FLUSHes, each with the highest write id it covers.
    flushes: VecDeque<(WriteId, oneshot::Sender<Result<(), NetError>>)>,
    /// Writes waiting for room in the in-flight bound.
    queued: VecDeque<(u64, Vec<u8>, Toughness, Reply)>,
    writers: HashMap<NodeId, PeerWriter>,
    flushers: Vec<Flusher>,
    idle_flushers: Vec<usize>,
    /// A client was answered in the current batch.
    answered: bool,
    layout: Layout,
    parity_timeout: Duration,
    /// Peers whose connection failed.
    down: BTreeSet<NodeId>,
    /// When each update waiting for its parity node was first seen waiting.
    seen: HashMap<WriteId, tokio::time::Instant>,
    next_check: tokio::time::Instant,
    /// When the oldest queued flush that nothing waits on was queued.
    lazy_since: Option<tokio::time::Instant>,
}

impl Loop {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<(), NetError> {
        let result = self.serve(&mut rx).await;
        let why = match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => e.to_string(),
        };
        for (_, (_, reply)) in self.waiting.drain() {
            let _ = reply.send(Err(NetError::Stopped(why.clone())));
        }
        for (_, reply) in self.flushes.drain(..) {
            let _ = reply.send(Err(NetError::Stopped(why.clone())));
        }
        for (.., reply) in self.queued.drain(..) {
            let _ = reply.send(Err(NetError::Stopped(why.clone())));
        }
        result
    }

    async fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<(), NetError> {
        loop {
            let lazy_at = self
                .lazy_since
                .filter(|_| !self.idle_flushers.is_empty())
                .map(|t| t + LAZY_FLUSH_DELAY);
            let check_at = (!self.node.idle()).then_some(self.next_check);
            let first = match lazy_at.into_iter().chain(check_at).min() {
                Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        let now = tokio::time::Instant::now();
                        if lazy_at.is_some_and(|t| t <= now) {
                            self.start_flush(true)?;
                        }
                        if now >= self.next_check {
                            self.check_parity_timeouts()?;
                            self.send_to_peers().await?;
                            self.start_flush(false)?;
                        }
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(first) = first else {
                return Ok(());
            };
            let mut out = Outbox::default();
            self.handle(first, &mut out)?;
            for _ in 1..BATCH_MAX {
                match rx.try_recv() {
                    Ok(ev) => self.handle(ev, &mut out)?,
                    Err(_) => break,
                }
            }
            self.settle(out)?;
            if tokio::time::Instant::now() >= self.next_check {
                self.check_parity_timeouts()?;
            }
            self.send_to_peers().await?;
            // Nothing else to do: sync on this thread rather than wake a flusher and wait to
            // be woken (two thread hand-offs on this 2-vCPU VM cost more than a third of
            // a sync). New events wait for the sync; the next batch takes them all. Not
            // when a client was just answered (it may run on this thread and would wait),
            // nor while a write waits for a toughness below 2 (its answer is not behind
            // this sync).
            let answered = std::mem::take(&mut self.answered);
            let soon = self
                .waiting
                .values()
                .any(|(want, _)| *want < Toughness::Durable);
            while !answered && !soon && rx.is_empty() && self.idle_flushers.len() == FLUSHERS {
                let Some(tokens) = self.sync_inline()? else {
                    break;
                };
                let mut out = Outbox::default();
                for token in tokens {
                    self.node.flushed(token, &mut out);
                }
                self.settle(out)?;
                self.send_to_peers().await?;
            }
            self.start_flush(false)?;
        }
    }

    /// Makes the queued flushes durable on this thread, if one of them is waited on.
    fn sync_inline(&mut self) -> Result<Option<Vec<u64>>, NetError> {
        let pending = self.node.disk.pending_flushes();
        if !pending.iter().any(|&t| !node::flush_is_lazy(t)) {
            return Ok(None);
        }
        self.lazy_since = None;
        Ok(Some(self.node.disk.complete_flushes()?))
    }

    /// Hands the queued flushes to an idle flusher if one of them is waited on (or
    /// `lazy_too`).
    fn start_flush(&mut self, lazy_too: bool) -> Result<(), NetError> {
        let pending = self.node.disk.pending_flushes();
        if self.idle_flushers.is_empty() || !self.node.disk.has_pending_flushes() {
            return Ok(());
        }
        let urgent = pending.iter().any(|&t| !node::flush_is_lazy(t));
        if !urgent && !lazy_too {
            self.lazy_since
                .get_or_insert_with(tokio::time::Instant::now);
            return Ok(());
        }
        let tokens = self.node.disk.take_flushes()?;
        self.lazy_since = None;
        let Some(index) = self.idle_flushers.pop() else {
            return Ok(());
        };
        self.flushers[index]
            .tx
            .send(tokens)
            .map_err(|_| NetError::Stopped("the flusher thread ended".into()))
    }

    fn handle(&mut self, ev: Event, out: &mut Outbox) -> Result<(), NetError> {
        match ev {
            Event::Peer(msg) => self.node.receive(msg, out),
            Event::PeerFailed(peer, why) => {
                // Its updates time out and go to a parity proxy; what it should have sent
                // us waits for it to come back (reconnecting is not built yet).
                tracing::warn!(node = self.id, peer, %why, "peer connection failed");
                self.writers.remove(&peer);
                self.down.insert(peer);
            }
            Event::Write {
                stripe,
                data,
                toughness,
                reply,
            } => {
                if self.not_durable.len() >= INFLIGHT_MAX {
                    self.queued.push_back((stripe, data, toughness, reply));
                } else {
                    self.start_write(stripe, data, toughness, reply, out);
                }
            }
            Event::Flush(reply) => {
                // Covers every write started so far (answered ones included).
                let covers = self.next_write_id().saturating_sub(1);
                self.flushes.push_back((covers, reply));
            }
            Event::Describe(reply) => {
                let _ = reply.send(format!(
                    "{:?}; writes waiting {}, not durable {}, queued {}, flushes waiting {}, \
                     flush tokens queued {:?}, idle flushers {}, lazy since {:?}, free \
                     locations {}",
                    self.node,
                    self.waiting.len(),
                    self.not_durable.len(),
                    self.queued.len(),
                    self.flushes.len(),
                    self.node.disk.pending_flushes(),
                    self.idle_flushers.len(),
                    self.lazy_since.map(|t| t.elapsed()),
                    self.node.free_locations(),
                ));
            }
            Event::Flushed(index, result) => {
                self.idle_flushers.push(index);
                for token in result? {
                    self.node.flushed(token, out);
                }
            }
        }
        Ok(())
    }

    /// Write ids are unique in the cluster: the node id in the top bits. They stay below
    /// 2^61 because the node's flush tokens shift them left by 3.
    fn next_write_id(&self) -> WriteId {
        (self.id as u64) << 48 | self.next_write
    }

    fn start_write(
        &mut self,
        stripe: u64,
        data: Vec<u8>,
        toughness: Toughness,
        reply: oneshot::Sender<Result<(), NetError>>,
        out: &mut Outbox,
    ) {
        let id = self.next_write_id();
        self.next_write += 1;
        self.not_durable.insert(id);
        self.waiting.insert(id, (toughness, reply));
        self.node.client_write(id, stripe, data, out);
    }

    /// Answers what the node's progress allows.
    fn settle(&mut self, mut out: Outbox) -> Result<(), NetError> {
        loop {
            for w in out.corrupt.drain(..) {
                self.not_durable.remove(&w);
                if let Some((_, reply)) = self.waiting.remove(&w) {
                    let _ = reply.send(Err(NetError::Refused));
                }
            }
            for (w, level) in out.reached.drain(..) {
                if level == Toughness::Durable {
                    self.not_durable.remove(&w);
                }
                if self.waiting.get(&w).is_some_and(|(want, _)| level >= *want) {
                    if let Some((_, reply)) = self.waiting.remove(&w) {
                        let _ = reply.send(Ok(()));
                        self.answered = true;
                    }
                }
            }
            let oldest = self.not_durable.first().copied().unwrap_or(WriteId::MAX);
            while self
                .flushes
                .front()
                .is_some_and(|(covers, _)| *covers < oldest)
            {
                if let Some((_, reply)) = self.flushes.pop_front() {
                    let _ = reply.send(Ok(()));
                    self.answered = true;
                }
            }
            // Room freed: start queued writes (which may answer at once, at toughness 0).
            let mut more = Outbox::default();
            while self.not_durable.len() < INFLIGHT_MAX {
                let Some((stripe, data, toughness, reply)) = self.queued.pop_front() else {
                    break;
                };
                self.start_write(stripe, data, toughness, reply, &mut more);
            }
            for (to, msg) in out.sends.drain(..) {
                self.queue_send(to, &msg)?;
            }
            if more.sends.is_empty() && more.reached.is_empty() && more.corrupt.is_empty() {
                return Ok(());
            }
            out = more;
        }
    }

    fn queue_send(&mut self, to: NodeId, msg: &Msg) -> Result<(), NetError> {
        if to == self.id {
            return Err(NetError::Stopped(
                "the node sent a message to itself".into(),
            ));
        }
        let Some(w) = self.writers.get_mut(&to) else {
            if self.down.contains(&to) {
                return Ok(()); // lost with the peer; the protocol's timeouts recover
            }
            return Err(NetError::Stopped(format!("no connection to node {to}")));
        };
        w.seq += 1;
        let frame = wire::encode(msg, self.cluster, w.seq).map_err(|e| NetError::Peer {
            peer: to,
            source: e,
        })?;
        w.buf.extend_from_slice(&frame);
        Ok(())
    }

    async fn send_to_peers(&mut self) -> Result<(), NetError> {
        let mut failed = Vec::new();
        for (&peer, w) in self.writers.iter_mut() {
            if w.buf.is_empty() {
                continue;
            }
            if let Err(e) = w.stream.write_all(&w.buf).await {
                tracing::warn!(node = self.id, peer, error = %e, "peer connection failed");
                failed.push(peer);
            }
            w.buf.clear();
        }
        for peer in failed {
            self.writers.remove(&peer);
            self.down.insert(peer);
        }
        Ok(())
    }

    /// Takes every update that has waited for its parity node longer than the bound to a
    /// parity proxy: the next node after this one that is neither its parity node nor down.
    fn check_parity_timeouts(&mut self) -> Result<(), NetError> {
        let now = tokio::time::Instant::now();
        self.next_check = now + self.parity_timeout / 4;
        let waiting = self.node.awaiting_parity();
        self.seen
            .retain(|w, _| waiting.iter().any(|(_, x, proxied)| x == w && !proxied));
        let nodes = self.layout.nodes();
        let mut out = Outbox::default();
        for (stripe, w, proxied) in waiting {
            if proxied {
                continue;
            }
            let since = *self.seen.entry(w).or_insert(now);
            if now.duration_since(since) < self.parity_timeout {
                continue;
            }
            let p = self.layout.parity_node(stripe);
            let proxy = (1..nodes)
                .map(|i| (self.id + i) % nodes)
                .find(|&n| n != p && !self.down.contains(&n));
            if let Some(proxy) = proxy {
                tracing::warn!(
                    node = self.id,
                    stripe,
                    parity = p,
                    proxy,
                    "parity node too slow; using a proxy"
                );
                self.node.reroute_to_proxy(stripe, proxy, &mut out);
                self.seen.remove(&w);
            }
        }
        self.settle(out)
    }
}
