//! Budgets for the whole server: what all connections together may hold, so that many
//! clients, or a few hostile ones, cannot exhaust the process (per-connection caps alone
//! multiply with the number of connections). The sizes and their reasons are in
//! `nbd::limits`; each budget is shown by `volctl status` and `/metrics`.
//!
//! - **Handshakes**: connections still negotiating, apart from established sessions. When
//!   full, a new connection evicts the oldest one still negotiating, so a flood of
//!   connections that never speak cannot lock real clients out (each handshake is also
//!   bounded in time).
//! - **Sessions**: established sessions (`--max-connections`). A GO beyond it gets
//!   `NBD_REP_ERR_POLICY` with the reason.
//! - **Threads**: threads serving sessions. A session's first threads are covered by its
//!   session slot; the threads a busy session grows by come from what is left.
//! - **Payload**: bytes of request payload held in memory (read buffers and write payloads
//!   in flight) across all sessions. A reader waits for room, as it does at its own
//!   session's cap.
//!
//! Refusals are counted (`blockd_budget_refused_total`, with waits for payload room) and
//! logged at most once per second.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::nbd::limits::{
    CONNECTION_THREADS_BASE, GROWTH_THREADS_BUDGET, HANDSHAKES_MAX, PAYLOAD_BUDGET_BYTES,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One budget as `volctl status` shows it.
pub use volmgr::api::BudgetInfo;

/// Every server-wide budget.
#[derive(Debug)]
pub struct Budgets {
    pub handshakes: Arc<Handshakes>,
    pub sessions: Arc<Semaphore>,
    sessions_max: usize,
    sessions_refused: AtomicU64,
    sessions_log: RateLimited,
    pub threads: Arc<Threads>,
    pub payload: Arc<Payload>,
    /// How long a reply may wait for a client that does not read (`--send-timeout`).
    pub send_timeout: Duration,
}

impl Budgets {
    /// The budgets for a server taking at most `max_sessions` sessions.
    pub fn new(max_sessions: usize, send_timeout: Duration) -> Arc<Budgets> {
        Arc::new(Budgets {
            handshakes: Arc::new(Handshakes::new(HANDSHAKES_MAX)),
            sessions: Arc::new(Semaphore::new(max_sessions)),
            sessions_max: max_sessions,
            sessions_refused: AtomicU64::new(0),
            sessions_log: RateLimited::default(),
            threads: Arc::new(Threads::new(
                max_sessions.saturating_mul(CONNECTION_THREADS_BASE) + GROWTH_THREADS_BUDGET,
            )),
            payload: Arc::new(Payload::new(PAYLOAD_BUDGET_BYTES)),
            send_timeout,
        })
    }

    pub fn sessions_max(&self) -> usize {
        self.sessions_max
    }

    /// Records a GO refused because every session slot is taken.
    pub fn session_refused(&self) {
        self.sessions_refused.fetch_add(1, Relaxed);
        self.sessions_log.log(|n| {
            tracing::warn!(
                refused = n,
                max = self.sessions_max,
                "session limit reached (--max-connections); refusing new sessions"
            )
        });
    }

    /// Each budget's use, limit and refusals.
    pub fn infos(&self) -> Vec<BudgetInfo> {
        let sessions_used = self
            .sessions_max
            .saturating_sub(self.sessions.available_permits());
        vec![
            BudgetInfo {
                name: "handshakes".into(),
                used: self.handshakes.open() as u64,
                limit: self.handshakes.limit as u64,
                refused: self.handshakes.evicted.load(Relaxed),
            },
            BudgetInfo {
                name: "sessions".into(),
                used: sessions_used as u64,
                limit: self.sessions_max as u64,
                refused: self.sessions_refused.load(Relaxed),
            },
            BudgetInfo {
                name: "threads".into(),
                used: self.threads.used.load(Relaxed) as u64,
                limit: self.threads.limit as u64,
                refused: self.threads.denied.load(Relaxed),
            },
            BudgetInfo {
                name: "payload_bytes".into(),
                used: self.payload.used.load(Relaxed) as u64,
                limit: self.payload.limit as u64,
                refused: self.payload.waits.load(Relaxed),
            },
        ]
    }

    /// Sets the `blockd_budget_used`/`_limit` gauges and `blockd_budget_refused_total`
    /// (called before `/metrics` renders, so the request path never touches the registry).
    pub fn publish(&self) {
        for b in self.infos() {
            counter!("blockd_budget_refused_total", "budget" => b.name.clone()).absolute(b.refused);
            gauge!("blockd_budget_used", "budget" => b.name.clone()).set(b.used as f64);
            gauge!("blockd_budget_limit", "budget" => b.name).set(b.limit as f64);
        }
    }
}

/// Logs at most once per second, with how many events the line stands for.
#[derive(Debug, Default)]
pub struct RateLimited {
    /// Milliseconds since `epoch` before which nothing is logged.
    next_ms: AtomicU64,
    /// Events since the last line.
    pending: AtomicU64,
}

impl RateLimited {
    pub fn log(&self, emit: impl FnOnce(u64)) {
        let pending = self.pending.fetch_add(1, Relaxed) + 1;
        let now = now_ms();
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Relaxed, Relaxed)
                .is_ok()
        {
            self.pending.fetch_sub(pending, Relaxed);
            emit(pending);
        }
    }
}

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Connections still negotiating; the oldest is evicted when a new one finds it full.
#[derive(Debug)]
pub struct Handshakes {
    open: Mutex<HandshakeSet>,
    limit: usize,
    evicted: AtomicU64,
    log: RateLimited,
}

#[derive(Debug, Default)]
struct HandshakeSet {
    next_id: u64,
    /// By admission order: the first is the oldest.
    open: BTreeMap<u64, CancellationToken>,
}

impl Handshakes {
    fn new(limit: usize) -> Handshakes {
        Handshakes {
            open: Mutex::default(),
            limit: limit.max(1),
            evicted: AtomicU64::new(0),
            log: RateLimited::default(),
        }
    }

    pub fn open(&self) -> usize {
        lock(&self.open).open.len()
    }

    /// Admits a new connection to the handshake, evicting the oldest one if full. The
    /// slot's token is cancelled if it is evicted in turn.
    pub fn admit(self: &Arc<Self>) -> HandshakeSlot {
        let token = CancellationToken::new();
        let mut set = lock(&self.open);
        let mut evicted = 0;
        while set.open.len() >= self.limit {
            if let Some((_, oldest)) = set.open.pop_first() {
                oldest.cancel();
                evicted += 1;
            }
        }
        let id = set.next_id;
        set.next_id += 1;
        set.open.insert(id, token.clone());
        drop(set);
        if evicted > 0 {
            self.evicted.fetch_add(evicted, Relaxed);
            self.log.log(|n| {
                tracing::warn!(
                    evicted = n,
                    limit = self.limit,
                    "too many connections in the handshake; closing the oldest"
                )
            });
        }
        HandshakeSlot {
            set: Arc::clone(self),
            id,
            token,
        }
    }
}

/// A connection's place among those negotiating; given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    set: Arc<Handshakes>,
    id: u64,
    token: CancellationToken,
}

impl HandshakeSlot {
    /// Cancelled when a newer connection evicted this one.
    pub fn evicted(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.set.open).open.remove(&self.id);
    }
}

/// Threads serving sessions.
#[derive(Debug)]
pub struct Threads {
    used: AtomicUsize,
    limit: usize,
    denied: AtomicU64,
}

impl Threads {
    fn new(limit: usize) -> Threads {
        Threads {
            used: AtomicUsize::new(0),
            limit,
            denied: AtomicU64::new(0),
        }
    }

    /// Counts threads a session always has (covered by its session slot): never refused.
    pub fn base(self: &Arc<Self>, n: usize) -> ThreadLease {
        self.used.fetch_add(n, Relaxed);
        ThreadLease {
            pool: Arc::clone(self),
            n,
        }
    }

    /// Takes one more thread if the budget has room.
    pub fn grow_one(self: &Arc<Self>) -> Option<ThreadLease> {
        let taken = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| (u < self.limit).then_some(u + 1));
        if taken.is_err() {
            self.denied.fetch_add(1, Relaxed);
            return None;
        }
        Some(ThreadLease {
            pool: Arc::clone(self),
            n: 1,
        })
    }
}

/// Threads counted against the budget until dropped.
#[derive(Debug)]
pub struct ThreadLease {
    pool: Arc<Threads>,
    n: usize,
}

impl Drop for ThreadLease {
    fn drop(&mut self) {
        self.pool.used.fetch_sub(self.n, Relaxed);
    }
}

/// Request payload bytes held in memory across all sessions.
#[derive(Debug)]
pub struct Payload {
    used: AtomicUsize,
    limit: usize,
    /// Threads waiting for room; a release takes the lock to wake them only when non-zero.
    waiting: Mutex<usize>,
    cv: Condvar,
    waits: AtomicU64,
}

/// How often a reader waiting for payload room checks whether its session is stopping.
const PAYLOAD_WAIT_POLL: Duration = Duration::from_millis(100);

impl Payload {
    fn new(limit: usize) -> Payload {
        Payload {
            used: AtomicUsize::new(0),
            limit,
            waiting: Mutex::new(0),
            cv: Condvar::new(),
            waits: AtomicU64::new(0),
        }
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    /// Whether `n` bytes would be granted now without waiting.
    pub fn has_room(&self, n: usize) -> bool {
        self.used.load(Relaxed).saturating_add(n) <= self.limit
    }

    /// Takes `n` bytes, waiting for room; `None` if `stopping` is cancelled meanwhile.
    /// A request larger than the whole budget is granted alone (it is within the payload
    /// cap, which the budget is far above).
    pub fn take(self: &Arc<Self>, n: usize, stopping: &CancellationToken) -> Option<PayloadLease> {
        let n = n.min(self.limit);
        if n == 0 || self.try_take(n) {
            return Some(self.lease(n));
        }
        self.waits.fetch_add(1, Relaxed);
        let mut waiting = lock(&self.waiting);
        *waiting += 1;
        let granted = loop {
            if self.try_take(n) {
                break true;
            }
            if stopping.is_cancelled() {
                break false;
            }
            waiting = match self.cv.wait_timeout(waiting, PAYLOAD_WAIT_POLL) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        };
        *waiting -= 1;
        granted.then(|| self.lease(n))
    }

    fn lease(self: &Arc<Self>, n: usize) -> PayloadLease {
        PayloadLease {
            pool: Arc::clone(self),
            n,
        }
    }
}

/// Payload bytes counted against the budget until dropped.
#[derive(Debug)]
pub struct PayloadLease {
    pool: Arc<Payload>,
    n: usize,
}

impl Drop for PayloadLease {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        self.pool.used.fetch_sub(self.n, Relaxed);
        // Taking the lock orders this release after a waiter's failed check.
        if *lock(&self.pool.waiting) > 0 {
            self.pool.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handshake_set_evicts_the_oldest() {
        let hs = Arc::new(Handshakes::new(2));
        let a = hs.admit();
        let b = hs.admit();
        assert!(!a.evicted().is_cancelled());
        let c = hs.admit();
        assert!(a.evicted().is_cancelled(), "the oldest goes first");
        assert!(!b.evicted().is_cancelled() && !c.evicted().is_cancelled());
        drop(a);
        assert_eq!(hs.open(), 2);
        drop(b);
        assert_eq!(hs.open(), 1);
        assert_eq!(hs.evicted.load(Relaxed), 1);
    }

    #[test]
    fn threads_grow_only_within_the_budget() {
        let t = Arc::new(Threads::new(5));
        let base = t.base(3);
        let g1 = t.grow_one();
        let g2 = t.grow_one();
        assert!(g1.is_some() && g2.is_some());
        assert!(t.grow_one().is_none());
        drop(g1);
        assert!(t.grow_one().is_some());
        drop(base);
        drop(g2);
        assert_eq!(t.denied.load(Relaxed), 1);
    }

    #[test]
    fn payload_waits_for_room_and_gives_up_when_stopping() {
        let p = Arc::new(Payload::new(100));
        let stop = CancellationToken::new();
        let a = p.take(60, &stop);
        assert!(a.is_some());
        let waiter = {
            let (p, stop) = (Arc::clone(&p), stop.clone());
            std::thread::spawn(move || p.take(60, &stop).map(|l| l.n))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "60 + 60 is over the budget");
        drop(a);
        assert_eq!(waiter.join().ok().flatten(), Some(60));
        let held = p.take(100, &stop);
        stop.cancel();
        assert!(
            p.take(1, &stop).is_none(),
            "a stopping session stops waiting"
        );
        drop(held);
        assert_eq!(p.used.load(Relaxed), 0);
    }

    #[test]
    fn rate_limited_logs_once_per_second() {
        let r = RateLimited::default();
        let mut lines = 0;
        for _ in 0..1000 {
            r.log(|_| lines += 1);
        }
        assert_eq!(lines, 1);
    }
}
