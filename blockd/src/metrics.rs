//! Metrics: per-volume request counters, bytes, errors, latency and in-flight gauges, plus
//! connection and handshake metrics. Recorded through the `metrics` facade; the daemon
//! installs the Prometheus recorder and `/metrics` renders it.
//!
//! Handles are registered once per session, so the per-request cost is a few atomic adds.

use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::nbd::wire::{command_name, CMD_BLOCK_STATUS};

const KINDS: usize = CMD_BLOCK_STATUS as usize + 1;

#[derive(Debug)]
struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    seconds: Histogram,
}

/// Metric handles for one session (labelled by volume).
#[derive(Debug)]
pub struct SessionMetrics {
    ops: Vec<OpMetrics>,
    inflight: Gauge,
}

impl SessionMetrics {
    pub fn new(volume: &str) -> SessionMetrics {
        let ops = (0..KINDS as u16)
            .map(|kind| {
                let labels = [
                    ("volume", volume.to_string()),
                    ("op", command_name(kind).to_string()),
                ];
                OpMetrics {
                    requests: counter!("blockd_nbd_requests_total", &labels),
                    bytes: counter!("blockd_nbd_bytes_total", &labels),
                    errors: counter!("blockd_nbd_errors_total", &labels),
                    seconds: histogram!("blockd_nbd_request_duration_seconds", &labels),
                }
            })
            .collect();
        SessionMetrics {
            ops,
            inflight: gauge!("blockd_nbd_inflight_requests", "volume" => volume.to_string()),
        }
    }

    pub fn started(&self) {
        self.inflight.increment(1.0);
    }

    pub fn finished(&self, kind: u16, len: u64, failed: bool, started: Instant) {
        self.inflight.decrement(1.0);
        if let Some(op) = self.ops.get(kind as usize) {
            op.requests.increment(1);
            if failed {
                op.errors.increment(1);
            } else if kind <= 1 {
                op.bytes.increment(len);
            }
            op.seconds.record(started.elapsed().as_secs_f64());
        }
    }

    /// A request refused at validation (never reached the volume).
    pub fn rejected(&self, kind: u16) {
        if let Some(op) = self.ops.get(kind as usize) {
            op.requests.increment(1);
            op.errors.increment(1);
        } else {
            counter!("blockd_nbd_unknown_commands_total").increment(1);
        }
    }
}

/// A session entered transmission; `mode` is the reply format negotiated
/// (`simple`, `structured` or `extended`).
pub fn session_started(mode: &'static str) {
    counter!("blockd_nbd_sessions_total", "mode" => mode).increment(1);
}

pub fn connection_opened(volume: &str) {
    gauge!("blockd_nbd_connections", "volume" => volume.to_string()).increment(1.0);
}

pub fn connection_closed(volume: &str) {
    gauge!("blockd_nbd_connections", "volume" => volume.to_string()).decrement(1.0);
}

pub fn handshake(elapsed: Duration, ok: bool) {
    histogram!("blockd_nbd_handshake_duration_seconds").record(elapsed.as_secs_f64());
    if !ok {
        counter!("blockd_nbd_handshake_failures_total").increment(1);
    }
}

/// An `accept` that failed (out of file descriptors, say). Refusals by the server's budgets
/// are `blockd_budget_refused_total` (see `budget`).
pub fn accept_failed() {
    counter!("blockd_nbd_accept_errors_total").increment(1);
}

/// A TLS handshake after STARTTLS finished (`ok`) or failed (bad or missing certificate,
/// protocol error).
pub fn tls_handshake(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("blockd_nbd_tls_handshakes_total", "result" => result).increment(1);
}
