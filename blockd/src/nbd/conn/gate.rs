//! The per-connection gate: requests and payload bytes in flight on one connection, with
//! back-pressure at [`INFLIGHT_MAX`] and [`INFLIGHT_BYTES_MAX`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::budget::PayloadLease;
use crate::nbd::limits::{INFLIGHT_BYTES_MAX, INFLIGHT_MAX};

/// Counts requests and payload bytes in flight; [`Gate::enter`] blocks at the caps.
#[derive(Debug, Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    requests: usize,
    bytes: usize,
    /// Threads blocked in `enter`: only then does a release need to wake anyone.
    waiting: usize,
}

/// One request's share of the gate (and of the server's payload budget), released on drop
/// (after its reply is encoded).
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    bytes: usize,
    _payload: Option<PayloadLease>,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight now.
    pub(super) fn in_flight(&self) -> usize {
        self.lock().requests
    }

    pub(super) fn full(&self) -> bool {
        self.lock().requests >= INFLIGHT_MAX
    }

    pub(super) fn enter(self: &Arc<Self>, bytes: usize) -> Ticket {
        let mut st = self.lock();
        // A request alone may always enter (it is within PAYLOAD_MAX <= INFLIGHT_BYTES_MAX).
        while st.requests > 0
            && (st.requests >= INFLIGHT_MAX || st.bytes + bytes > INFLIGHT_BYTES_MAX)
        {
            st.waiting += 1;
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
        st.requests += 1;
        st.bytes += bytes;
        Ticket {
            gate: Arc::clone(self),
            bytes,
            _payload: None,
        }
    }
}

impl Ticket {
    /// Attaches the request's share of the server's payload budget; `false` if there is none
    /// (the session ended while it waited).
    pub(super) fn hold(&mut self, payload: Option<PayloadLease>) -> bool {
        self._payload = payload;
        self._payload.is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.requests -= 1;
        st.bytes -= self.bytes;
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.gate.cv.notify_all();
        }
    }
}
