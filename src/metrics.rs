//! metrics: the process's counters and their Prometheus text rendering.
//!
//! Owns request, client, hit/miss and tracking counters and the request
//! latency histogram; reads (never changes) the cache's and the backend's own
//! counters when rendering. All counters are relaxed atomics: a scrape may see
//! one counter a request ahead of another, never a torn value.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::backend::BackendStats;
use crate::cache::CacheStats;

/// Which front end served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Http = 0,
    Resp = 1,
}

const FRONTENDS: [&str; 2] = ["http", "resp"];

/// Status labels: HTTP codes, and `ok`/`error` for RESP replies.
pub const STATUSES: [&str; 14] = [
    "200", "204", "400", "404", "405", "413", "431", "500", "502", "503", "504", "ok", "nil",
    "error",
];

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Cells a hot counter is split into; a thread always adds to the same one.
const STRIPES: usize = 8;

/// A counter written on every request by every worker. Each worker thread
/// adds to its own cache line, so counting costs no cross-core traffic;
/// reading sums the cells (only scrapes and INFO do that).
#[derive(Debug, Default)]
pub struct Counter {
    cells: [Cell; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Cell(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.cells[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current total.
    pub fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// This thread's cell (see [`crate::cache`]'s read stripes: same rule).
fn stripe() -> usize {
    crate::cache::thread_stripe() % STRIPES
}

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
struct Histogram {
    counts: [Counter; BUCKETS.len()],
    count: Counter,
    sum_nanos: Counter,
}

impl Histogram {
    /// Records `n` observations of `d`.
    fn observe(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].add(n);
        }
        self.count.add(n);
        self.sum_nanos.add(d.as_nanos() as u64 * n);
    }
}

/// Request outcomes of one batch (a RESP read's worth of pipelined
/// commands), added to the shared counters with one atomic per status seen
/// instead of several per command.
#[derive(Debug, Default)]
pub struct Tally {
    counts: [u32; STATUSES.len()],
    total: u32,
}

impl Tally {
    /// Counts one request with `status`.
    pub fn add(&mut self, status: &str) {
        self.counts[status_index(status)] += 1;
        self.total += 1;
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

fn status_index(status: &str) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// The proxy's own counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// GETs answered from the cache.
    pub hits: Counter,
    /// GETs not answered from the cache.
    pub misses: Counter,
    /// Misses that waited for another request's Redis GET instead of sending their own.
    pub coalesced: Counter,
    /// Answers past the TTL while a background GET refreshes the key.
    pub stale_revalidate: Counter,
    /// Answers past the TTL because Redis failed.
    pub stale_error: Counter,
    /// Background GETs started by stale-while-revalidate.
    pub refreshes: Counter,
    /// Client connections open now.
    pub clients_connected: AtomicI64,
    /// Client connections refused because of the limit.
    pub clients_rejected: AtomicU64,
    /// Connections closed for idling or for an oversize request.
    pub clients_reaped: AtomicU64,
    /// Invalidation messages received (tracking mode).
    pub invalidations: AtomicU64,
    /// Keys removed by invalidation messages.
    pub invalidated_keys: AtomicU64,
    /// Times the whole cache was emptied (tracking mode).
    pub cache_flushes: AtomicU64,
    /// Times the invalidation connection was re-established.
    pub tracking_reconnects: AtomicU64,
    requests: [[Counter; STATUSES.len()]; 2],
    /// Reply bytes handed to client sockets, by front end.
    response_bytes: [Counter; 2],
    latency: Histogram,
}

impl Metrics {
    /// Counts one answered request and its latency.
    pub fn request(&self, frontend: Frontend, status: &str, took: Duration) {
        self.requests[frontend as usize][status_index(status)].inc();
        self.latency.observe(took, 1);
    }

    /// Counts a batch of requests that were all answered after `took`, and
    /// empties the tally.
    pub fn requests_batch(&self, frontend: Frontend, tally: &mut Tally, took: Duration) {
        for (i, n) in tally.counts.iter().enumerate() {
            if *n > 0 {
                self.requests[frontend as usize][i].add(u64::from(*n));
            }
        }
        self.latency.observe(took, u64::from(tally.total));
        *tally = Tally::default();
    }

    /// Counts `n` reply bytes written (or queued to be written) to a client.
    pub fn response_bytes(&self, frontend: Frontend, n: usize) {
        self.response_bytes[frontend as usize].add(n as u64);
    }

    /// Reply bytes counted so far, both front ends.
    pub fn response_bytes_total(&self) -> u64 {
        self.response_bytes.iter().map(Counter::get).sum()
    }

    /// Requests counted so far for one front end and status.
    pub fn requests(&self, frontend: Frontend, status: &str) -> u64 {
        STATUSES
            .iter()
            .position(|s| *s == status)
            .map(|i| self.requests[frontend as usize][i].get())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self, snapshot: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(4096);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, kind: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP redis_proxy_{name} {help}");
            let _ = writeln!(out, "# TYPE redis_proxy_{name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "redis_proxy_{name}{labels} {v}");
            }
        };
        counter(
            "cache_hits_total",
            "GETs answered from the cache.",
            "counter",
            &[("", self.hits.get())],
        );
        counter(
            "cache_misses_total",
            "GETs not answered from the cache.",
            "counter",
            &[("", self.misses.get())],
        );
        counter(
            "cache_coalesced_total",
            "Misses that waited for a concurrent GET of the same key.",
            "counter",
            &[("", self.coalesced.get())],
        );
        counter(
            "cache_evictions_total",
            "Entries evicted, by reason.",
            "counter",
            &[
                ("{reason=\"lru\"}", c(&snapshot.cache.evictions_lru)),
                ("{reason=\"ttl\"}", c(&snapshot.cache.evictions_ttl)),
            ],
        );
        counter(
            "cache_entries",
            "Keys in the cache now.",
            "gauge",
            &[("", snapshot.cache_entries as u64)],
        );
        counter(
            "cache_bytes",
            "Key and value bytes in the cache now.",
            "gauge",
            &[("", snapshot.cache_bytes as u64)],
        );
        counter(
            "cache_stale_served_total",
            "Answers served past the TTL, by reason.",
            "counter",
            &[
                ("{reason=\"revalidate\"}", self.stale_revalidate.get()),
                ("{reason=\"error\"}", self.stale_error.get()),
            ],
        );
        counter(
            "cache_refreshes_total",
            "Background GETs started to refresh a stale entry.",
            "counter",
            &[("", self.refreshes.get())],
        );
        counter(
            "redis_requests_total",
            "Commands sent to Redis.",
            "counter",
            &[("", c(&snapshot.backend.requests))],
        );
        counter(
            "redis_errors_total",
            "Failed Redis requests, by kind.",
            "counter",
            &[
                (
                    "{kind=\"unavailable\"}",
                    c(&snapshot.backend.errors_unavailable),
                ),
                ("{kind=\"timeout\"}", c(&snapshot.backend.errors_timeout)),
                ("{kind=\"reply\"}", c(&snapshot.backend.errors_reply)),
            ],
        );
        counter(
            "redis_reconnects_total",
            "Redis connections re-established.",
            "counter",
            &[("", c(&snapshot.backend.reconnects))],
        );
        counter(
            "clients_connected",
            "Client connections open now, HTTP and RESP.",
            "gauge",
            &[(
                "",
                self.clients_connected.load(Ordering::Relaxed).max(0) as u64,
            )],
        );
        counter(
            "clients_rejected_total",
            "Client connections refused at the limit.",
            "counter",
            &[("", c(&self.clients_rejected))],
        );
        counter(
            "clients_reaped_total",
            "Client connections closed for idling or an oversize request.",
            "counter",
            &[("", c(&self.clients_reaped))],
        );
        let mut rows = Vec::new();
        let labels: Vec<String> = FRONTENDS
            .iter()
            .flat_map(|f| {
                STATUSES
                    .iter()
                    .map(move |s| format!("{{frontend=\"{f}\",status=\"{s}\"}}"))
            })
            .collect();
        for (fi, _) in FRONTENDS.iter().enumerate() {
            for (si, _) in STATUSES.iter().enumerate() {
                let v = self.requests[fi][si].get();
                if v > 0 {
                    rows.push((labels[fi * STATUSES.len() + si].as_str(), v));
                }
            }
        }
        counter(
            "requests_total",
            "Requests answered, by front end and status.",
            "counter",
            &rows,
        );
        counter(
            "response_bytes_total",
            "Reply bytes sent to clients (heads included), by front end.",
            "counter",
            &[
                (
                    "{frontend=\"http\"}",
                    self.response_bytes[Frontend::Http as usize].get(),
                ),
                (
                    "{frontend=\"resp\"}",
                    self.response_bytes[Frontend::Resp as usize].get(),
                ),
            ],
        );
        if snapshot.tracking {
            counter(
                "invalidations_total",
                "Invalidation messages received from Redis.",
                "counter",
                &[("", c(&self.invalidations))],
            );
            counter(
                "invalidated_keys_total",
                "Keys removed by invalidation messages.",
                "counter",
                &[("", c(&self.invalidated_keys))],
            );
            counter(
                "cache_flushes_total",
                "Times the whole cache was emptied.",
                "counter",
                &[("", c(&self.cache_flushes))],
            );
            counter(
                "tracking_reconnects_total",
                "Times the invalidation connection was re-established.",
                "counter",
                &[("", c(&self.tracking_reconnects))],
            );
        }
        let _ = writeln!(
            out,
            "# HELP redis_proxy_request_duration_seconds Time to answer a request."
        );
        let _ = writeln!(out, "# TYPE redis_proxy_request_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency.counts[i].get();
            let _ = writeln!(
                out,
                "redis_proxy_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency.count.get();
        let _ = writeln!(
            out,
            "redis_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "redis_proxy_request_duration_seconds_sum {}",
            self.latency.sum_nanos.get() as f64 / 1e9
        );
        let _ = writeln!(out, "redis_proxy_request_duration_seconds_count {count}");
        out
    }
}

/// What `render` reads from the other modules.
pub struct Snapshot<'a> {
    pub cache: &'a CacheStats,
    pub cache_entries: usize,
    pub cache_bytes: usize,
    pub cache_capacity: usize,
    pub backend: &'a BackendStats,
    pub tracking: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters and the histogram appear in the exposition with their labels.
    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.hits.add(3);
        m.request(Frontend::Http, "200", Duration::from_micros(50));
        m.request(Frontend::Resp, "error", Duration::from_millis(2));
        m.response_bytes(Frontend::Http, 242);
        let cache = CacheStats::default();
        let backend = BackendStats::default();
        let text = m.render(&Snapshot {
            cache: &cache,
            cache_entries: 7,
            cache_bytes: 70,
            cache_capacity: 10,
            backend: &backend,
            tracking: false,
        });
        assert!(text.contains("redis_proxy_cache_hits_total 3\n"));
        assert!(text.contains("redis_proxy_cache_entries 7\n"));
        assert!(text.contains("redis_proxy_cache_bytes 70\n"));
        assert!(text.contains("redis_proxy_cache_stale_served_total{reason=\"error\"} 0\n"));
        assert!(text.contains("redis_proxy_cache_refreshes_total 0\n"));
        assert!(text.contains("redis_proxy_requests_total{frontend=\"http\",status=\"200\"} 1\n"));
        assert!(text.contains("redis_proxy_requests_total{frontend=\"resp\",status=\"error\"} 1\n"));
        assert!(text.contains("redis_proxy_request_duration_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("redis_proxy_request_duration_seconds_count 2\n"));
        assert!(text.contains("redis_proxy_response_bytes_total{frontend=\"http\"} 242\n"));
        assert!(text.contains("redis_proxy_response_bytes_total{frontend=\"resp\"} 0\n"));
        assert!(!text.contains("invalidations_total"));
    }
}
