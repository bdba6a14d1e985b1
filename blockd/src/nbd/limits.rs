//! Every limit of the NBD server, in one place, with its reason.

use std::time::Duration;

/// Largest READ/WRITE payload (32 MiB): what the spec says every client may assume and what
/// qemu caps itself at; advertised as the maximum in `NBD_INFO_BLOCK_SIZE`.
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;
/// Smallest I/O unit (advertised minimum block size): a sector, which every client honours
/// (the Linux kernel uses 512 by default). Unaligned requests get `EINVAL`.
pub const BLOCK_MIN_BYTES: u32 = 512;
/// Preferred I/O unit: the page size, which avoids read-modify-write in the page cache and
/// is the `O_DIRECT` alignment.
pub const BLOCK_PREFERRED_BYTES: u32 = 4096;
/// An oversized WRITE up to this size is read and dropped so the session stays in sync; a
/// bigger one is a broken or hostile client and ends the session (nbdkit draws the same line).
pub const DRAIN_MAX_BYTES: u64 = 2 * PAYLOAD_MAX_BYTES as u64;
/// Largest option payload accepted in the handshake. The biggest legitimate option is
/// SET_META_CONTEXT with a few 4 KiB names; 64 KiB leaves room and bounds the allocation.
pub const OPTION_MAX_BYTES: u32 = 64 << 10;
/// Options per handshake. Real clients send fewer than ten; a longer loop is a DoS.
pub const OPTIONS_MAX: usize = 64;
/// Strings (export names, meta context queries): the spec's MUST limit.
pub const STRING_MAX_BYTES: usize = 4096;
/// Meta context queries in one option.
pub const META_QUERIES_MAX: usize = 128;
/// A client must finish the handshake within this time (CVE-2024-7409 class of DoS).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight on one connection; the reader stops reading (back-pressure) at the
/// cap. The kernel client queues 128 per socket, nbdcopy 64.
pub const INFLIGHT_MAX: usize = 128;
/// Payload bytes in flight on one connection (read buffers and write payloads).
pub const INFLIGHT_BYTES_MAX: usize = 128 << 20;
/// Default cap on established sessions (configurable with `--max-connections`): each holds
/// [`CONNECTION_THREADS_BASE`] threads and up to [`INFLIGHT_BYTES_MAX`] of payload (the
/// server-wide [`PAYLOAD_BUDGET_BYTES`] bounds the sum), and a few file descriptors.
pub const CONNECTIONS_DEFAULT_MAX: usize = 256;
/// Connections still in the handshake, apart from sessions. Each costs a file descriptor and
/// a few KiB; beyond this, a new connection evicts the oldest one still negotiating, so a
/// flood that never speaks cannot lock real clients out (a real client finishes its
/// handshake in milliseconds, long before 1024 newer connections arrive).
pub const HANDSHAKES_MAX: usize = 1024;
/// Threads every session has: the reader/worker pair and the reply writer.
pub const CONNECTION_THREADS_BASE: usize = CONNECTION_THREADS + 1;
/// Threads that busy sessions may grow by, server-wide, beyond their base threads: enough for
/// 16 sessions at [`CONNECTION_THREADS_MAX`]. More threads than that only add scheduling and
/// memory on a node with a handful of cores; a session denied growth still runs, on its
/// base threads.
pub const GROWTH_THREADS_BUDGET: usize = 16 * (CONNECTION_THREADS_MAX - CONNECTION_THREADS);
/// Request payload held in memory across all sessions (read buffers and write payloads in
/// flight): 8 sessions at their own cap ([`INFLIGHT_BYTES_MAX`]). Without it, every client
/// that never reads its replies would pin 128 MiB. Readers wait for room, as at their own cap.
pub const PAYLOAD_BUDGET_BYTES: usize = 8 * INFLIGHT_BYTES_MAX;
/// A reply that cannot be sent for this long ends its session: the client stopped reading,
/// and its session would hold its payload and threads for ever. Generous, so that a client
/// paused for a moment (a VM snapshot, a debugger) is not cut off.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Extents in one BLOCK_STATUS reply: clients re-query for the rest; keeps replies small.
pub const EXTENTS_MAX: usize = 1024;
/// How long a shutdown waits for sessions to finish their in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// At shutdown, how long a client still in the handshake has to send its next option and be
/// answered `NBD_REP_ERR_SHUTDOWN`: a client mid-handshake sends its next option within a
/// round trip, and a connection that never speaks must not hold up the exit for longer.
pub const HANDSHAKE_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// At shutdown, requests already received but not started that are answered `ESHUTDOWN`
/// before the session closes. Twice [`INFLIGHT_MAX`], more than any client queues (the kernel
/// 128 per socket, nbdcopy 64), so every request of a well-behaved client is answered; a
/// client that keeps sending cannot hold the session open.
pub const SHUTDOWN_REFUSALS_MAX: usize = 2 * INFLIGHT_MAX;
/// Threads a connection starts with: two, so that one waits in `recv` while the other
/// answers (see `conn`).
pub const CONNECTION_THREADS: usize = 2;
/// Threads a connection grows to once [`REQUESTS_BEFORE_GROWTH`] requests of two kinds came:
/// - Small requests sent one at a time. With two threads taking turns, each hand-off wakes
///   the thread that ran a moment ago; the scheduler treats it as cache-hot and runs it on
///   the CPU of the thread answering, which then waits for it. A thread that has slept for
///   longer than the scheduler's migration cost (0.5 ms) goes to the idle CPU instead.
///   Measured at 4 KiB QD1 reads (p50): 2 threads 30-52 us, 12 threads 26-36 us, 16 threads
///   12-15 us, 32 threads 13-14 us (nbdkit, 16 threads: 13 us).
/// - Large writes: writing 1 MiB into the page cache takes longer than receiving it, so two
///   threads leave the socket unread while both write. 1 MiB QD8 writes: 0.92x nbdkit with
///   two threads, 1.01x grown.
///
/// Large reads do not count: there the socket is the limit, and 16 threads made 1 MiB QD8
/// reads 15% slower (4x the CPU migrations).
pub const CONNECTION_THREADS_MAX: usize = 32;
/// Lone small requests (nothing else in flight) and large writes after which a connection
/// grows to [`CONNECTION_THREADS_MAX`] threads.
pub const REQUESTS_BEFORE_GROWTH: u32 = 64;
/// Reply payloads at least this big are sent straight from their buffer (not copied into the
/// batch), and requests this big are not batched: they run beside the next request.
pub const COPY_MAX_BYTES: usize = 64 << 10;
/// After a lone disk transfer held the read side while the next request was already
/// waiting (the client has more than one request in flight), this many requests hand the
/// read side over instead, so they overlap on the disk.
pub const HOLD_BACKOFF_REQUESTS: u32 = 64;
/// Once a `recv` brought more than one request, the client keeps several in flight: for
/// this many following `recv`s one thread keeps the read side (and batches replies), even
/// when a `recv` brings a single request. Handing the read side over on each of those cost
/// two context switches per request: 4 KiB QD32 reads went from 185K IOPS and 5.2 us of
/// server CPU per I/O (hand-over whenever a `recv` brought one request) to 222K and 3.4 us.
/// A client that turns to one request at a time gets the QD1 hand-over back after this
/// many round trips.
pub const DEEP_BURSTS: u32 = 64;
/// Socket read buffer: many small request headers per `read(2)` at high queue depth.
pub const READ_BUFFER_BYTES: usize = 256 << 10;
/// Replies are batched into one `write(2)` up to this size; larger payloads go on their own.
pub const WRITE_BATCH_BYTES: usize = 256 << 10;

/// A TLS connection keeps its send buffer (ciphertext of one batch of replies) up to this
/// size between batches; a larger one, left by a big READ reply, is freed.
pub const TLS_SEND_BUFFER_KEEP_BYTES: usize = 4 << 20;

const _: () = assert!(PAYLOAD_MAX_BYTES as usize <= INFLIGHT_BYTES_MAX);
const _: () = assert!(INFLIGHT_BYTES_MAX <= PAYLOAD_BUDGET_BYTES);
const _: () = assert!(PAYLOAD_MAX_BYTES as usize <= raid::buf::MAX_POOLED_BYTES);
const _: () = assert!(BLOCK_PREFERRED_BYTES.is_multiple_of(BLOCK_MIN_BYTES));
const _: () = assert!(HANDSHAKE_SHUTDOWN_GRACE.as_millis() < SHUTDOWN_GRACE.as_millis());
const _: () = assert!(OPTION_MAX_BYTES as usize >= 2 * STRING_MAX_BYTES + 16);
