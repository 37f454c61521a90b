//! metrics: the process's counters, declared once in [`COUNTERS`] and
//! rendered from that table into both the Prometheus text (`/-/metrics`) and
//! the `# Stats` section of RESP `INFO`, so the two cannot drift.
//!
//! Owns request, client, hit/miss and tracking counters and the request
//! latency histogram; reads (never changes) the cache's and the backend's own
//! counters when rendering. Knows nothing of HTTP or RESP beyond the request
//! [`Status`] labels. All counters are relaxed atomics: a scrape may see one
//! counter a request ahead of another, never a torn value.
//!
//! # One table, two renderings
//! Each row of [`COUNTERS`] (a [`Def`]) gives a name (without the
//! `redis_proxy_` prefix), help text, type, label names, when it is shown
//! and how to read it. From a row:
//! - Prometheus: `# HELP`, `# TYPE`, then one sample per series,
//!   `redis_proxy_<name>{label="value",...} <n>`; a histogram adds its
//!   `_bucket{le}`, `_sum` and `_count` samples.
//! - INFO: one `<name>:<value>` line per row. An unlabelled row's value is
//!   the number; a labelled row's value lists every series as
//!   `<label values joined by _>=<n>`, comma-separated (Redis's own
//!   `db0:keys=1,expires=0` shape), e.g.
//!   `requests_total:http_200=5,...,resp_ok=7`; a histogram's value is
//!   `count=<n>,sum=<seconds>` (buckets only in Prometheus). A row may name
//!   Redis's own INFO fields for the same figure (`keyspace_hits`,
//!   `total_net_output_bytes`), shown after the rows with the sum of its
//!   series, so Redis tools read them too.
//!
//! Every label combination is shown, zeros included (Prometheus's advice:
//! a series that appears only once non-zero breaks rates).

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

impl Frontend {
    /// The `frontend` label.
    pub fn label(self) -> &'static str {
        match self {
            Frontend::Http => "http",
            Frontend::Resp => "resp",
        }
    }
}

/// How a request was answered: the `status` label of `requests_total`.
/// HTTP requests count by status code, RESP commands by reply kind; each
/// status belongs to one front end ([`Status::frontend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Http200,
    Http204,
    Http400,
    Http404,
    Http405,
    Http413,
    Http431,
    Http500,
    Http502,
    Http503,
    Http504,
    /// RESP: any reply that is neither nil nor an error.
    Ok,
    /// RESP: a nil reply (GET of a missing key).
    Nil,
    /// RESP: an error reply.
    Error,
}

impl Status {
    /// Every status, in the order they are rendered.
    pub const ALL: [Status; 14] = [
        Status::Http200,
        Status::Http204,
        Status::Http400,
        Status::Http404,
        Status::Http405,
        Status::Http413,
        Status::Http431,
        Status::Http500,
        Status::Http502,
        Status::Http503,
        Status::Http504,
        Status::Ok,
        Status::Nil,
        Status::Error,
    ];

    /// The status for an HTTP code the HTTP front end sends.
    ///
    /// A code missing here is a bug in this table (add it): debug builds,
    /// which the tests run, panic; release builds count it as 500, the code
    /// whose reason phrase `http` sends for a code it does not know either.
    pub fn http(code: usize) -> Status {
        let status = Status::from_http(code);
        debug_assert!(status.is_some(), "HTTP {code} has no metrics::Status");
        status.unwrap_or(Status::Http500)
    }

    /// The status for an HTTP code, if it is one the proxy sends.
    pub fn from_http(code: usize) -> Option<Status> {
        Status::ALL
            .into_iter()
            .find(|s| s.http_code() == Some(code))
    }

    /// The HTTP code, for an HTTP status.
    pub fn http_code(self) -> Option<usize> {
        Some(match self {
            Status::Http200 => 200,
            Status::Http204 => 204,
            Status::Http400 => 400,
            Status::Http404 => 404,
            Status::Http405 => 405,
            Status::Http413 => 413,
            Status::Http431 => 431,
            Status::Http500 => 500,
            Status::Http502 => 502,
            Status::Http503 => 503,
            Status::Http504 => 504,
            Status::Ok | Status::Nil | Status::Error => return None,
        })
    }

    /// The front end whose requests end with this status.
    pub fn frontend(self) -> Frontend {
        match self.http_code() {
            Some(_) => Frontend::Http,
            None => Frontend::Resp,
        }
    }

    /// The `status` label.
    pub fn label(self) -> &'static str {
        match self {
            Status::Http200 => "200",
            Status::Http204 => "204",
            Status::Http400 => "400",
            Status::Http404 => "404",
            Status::Http405 => "405",
            Status::Http413 => "413",
            Status::Http431 => "431",
            Status::Http500 => "500",
            Status::Http502 => "502",
            Status::Http503 => "503",
            Status::Http504 => "504",
            Status::Ok => "ok",
            Status::Nil => "nil",
            Status::Error => "error",
        }
    }

    /// Position in [`Status::ALL`], for the counter arrays.
    fn index(self) -> usize {
        self as usize
    }
}

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
pub struct Histogram {
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

    /// Observations so far.
    fn count(&self) -> u64 {
        self.count.get()
    }

    /// Sum of the observations, in seconds.
    fn sum_secs(&self) -> f64 {
        self.sum_nanos.get() as f64 / 1e9
    }
}

/// Request outcomes of one batch (a RESP read's worth of pipelined
/// commands), added to the shared counters with one atomic per status seen
/// instead of several per command.
#[derive(Debug, Default)]
pub struct Tally {
    counts: [u32; Status::ALL.len()],
    total: u32,
}

impl Tally {
    /// Counts one request with `status`.
    pub fn add(&mut self, status: Status) {
        self.counts[status.index()] += 1;
        self.total += 1;
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
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
    /// Client commands relayed to Redis as they came (RESP pass-through).
    pub passthrough: Counter,
    /// Client connections open now.
    pub clients_connected: AtomicI64,
    /// Client connections refused because of the limit.
    pub clients_rejected: AtomicU64,
    /// Connections closed for idling or for an oversize request.
    pub clients_reaped: AtomicU64,
    /// Connections closed because all clients together held more than
    /// `PROXY_MAX_BUFFER_BYTES` and they held the most.
    pub clients_evicted: AtomicU64,
    /// Invalidation messages received (tracking mode).
    pub invalidations: AtomicU64,
    /// Keys removed by invalidation messages.
    pub invalidated_keys: AtomicU64,
    /// Times the whole cache was emptied (tracking mode).
    pub cache_flushes: AtomicU64,
    /// Times the invalidation connection was re-established.
    pub tracking_reconnects: AtomicU64,
    /// Requests answered, by status (which names the front end).
    requests: [Counter; Status::ALL.len()],
    /// Reply bytes handed to client sockets, by front end.
    response_bytes: [Counter; 2],
    latency: Histogram,
}

impl Metrics {
    /// Counts one answered request and its latency.
    pub fn request(&self, status: Status, took: Duration) {
        self.requests[status.index()].inc();
        self.latency.observe(took, 1);
    }

    /// Counts a batch of requests that were all answered after `took`, and
    /// empties the tally.
    pub fn requests_batch(&self, tally: &mut Tally, took: Duration) {
        for (i, n) in tally.counts.iter().enumerate() {
            if *n > 0 {
                self.requests[i].add(u64::from(*n));
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

    /// Requests counted so far with `status`.
    pub fn requests(&self, status: Status) -> u64 {
        self.requests[status.index()].get()
    }

    /// The Prometheus text exposition of every counter shown now.
    pub fn render(&self, snapshot: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(8192);
        for def in shown(snapshot) {
            prometheus_family(&mut out, def, &def.read(self, snapshot));
        }
        out
    }

    /// The `# Stats` section of RESP `INFO` (header included, lines ended
    /// by CRLF): every counter shown now, then Redis's own names for some.
    pub fn render_info(&self, snapshot: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# Stats\r\n");
        let readings: Vec<(&Def, Reading<'_>)> = shown(snapshot)
            .map(|def| (def, def.read(self, snapshot)))
            .collect();
        for (def, reading) in &readings {
            info_line(&mut out, def.name, reading);
        }
        for (def, reading) in &readings {
            for alias in def.redis_names {
                let _ = write!(out, "{alias}:{}\r\n", reading.total());
            }
        }
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

// ---------------------------------------------------------------------------
// The table

/// Prefix of every Prometheus name (INFO shows the names without it).
pub const PREFIX: &str = "redis_proxy_";

/// A row's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// When a row is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Always,
    /// Only with `CACHE_INVALIDATION=tracking`.
    WithTracking,
}

/// Most labels a row has.
const MAX_LABELS: usize = 2;

/// One series of a labelled row: its label values (in the row's label
/// order; unused slots empty) and its value.
type Series = ([&'static str; MAX_LABELS], u64);

/// How to read a row's figures.
#[derive(Clone, Copy)]
enum Read {
    One(fn(&Metrics, &Snapshot<'_>) -> u64),
    Labelled(fn(&Metrics, &Snapshot<'_>) -> Vec<Series>),
    Histogram(for<'m> fn(&'m Metrics) -> &'m Histogram),
}

/// A row's figures, read once per rendering.
enum Reading<'m> {
    One(u64),
    Labelled(Vec<Series>),
    Histogram(&'m Histogram),
}

impl Reading<'_> {
    /// The sum over every series (a histogram: its observation count).
    fn total(&self) -> u64 {
        match self {
            Reading::One(v) => *v,
            Reading::Labelled(series) => series.iter().map(|(_, v)| v).sum(),
            Reading::Histogram(h) => h.count(),
        }
    }
}

/// One row of the counter table.
pub struct Def {
    /// Name without [`PREFIX`]: the INFO field, and the Prometheus family after the prefix.
    pub name: &'static str,
    /// Prometheus `# HELP` text.
    pub help: &'static str,
    pub kind: Kind,
    /// Label names, in the order series give their values.
    pub labels: &'static [&'static str],
    pub shown: Shown,
    /// Redis's own INFO fields for the same figure (the sum of the series).
    pub redis_names: &'static [&'static str],
    read: Read,
}

impl Def {
    fn read<'m>(&self, m: &'m Metrics, s: &Snapshot<'_>) -> Reading<'m> {
        match self.read {
            Read::One(f) => Reading::One(f(m, s)),
            Read::Labelled(f) => Reading::Labelled(f(m, s)),
            Read::Histogram(f) => Reading::Histogram(f(m)),
        }
    }
}

fn load(v: &AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// Every counter the proxy exports, in rendering order. README's "Metrics"
/// section lists the same.
pub const COUNTERS: &[Def] = &[
    Def {
        name: "cache_hits_total",
        help: "GETs answered from the cache.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &["keyspace_hits"],
        read: Read::One(|m, _| m.hits.get()),
    },
    Def {
        name: "cache_misses_total",
        help: "GETs not answered from the cache.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &["keyspace_misses"],
        read: Read::One(|m, _| m.misses.get()),
    },
    Def {
        name: "cache_coalesced_total",
        help: "Misses that waited for a concurrent GET of the same key.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| m.coalesced.get()),
    },
    Def {
        name: "cache_evictions_total",
        help: "Entries evicted, by reason.",
        kind: Kind::Counter,
        labels: &["reason"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|_, s| {
            vec![
                (["lru", ""], load(&s.cache.evictions_lru)),
                (["ttl", ""], load(&s.cache.evictions_ttl)),
            ]
        }),
    },
    Def {
        name: "cache_read_buffer_drops_total",
        help: "Hits left out of the LRU order because their thread's read buffer was full.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| load(&s.cache.dropped_reads)),
    },
    Def {
        name: "cache_entries",
        help: "Keys in the cache now.",
        kind: Kind::Gauge,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| s.cache_entries as u64),
    },
    Def {
        name: "cache_bytes",
        help: "Key and value bytes in the cache now.",
        kind: Kind::Gauge,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| s.cache_bytes as u64),
    },
    Def {
        name: "cache_stale_served_total",
        help: "Answers given from entries past their TTL, by reason.",
        kind: Kind::Counter,
        labels: &["reason"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|m, _| {
            vec![
                (["revalidate", ""], m.stale_revalidate.get()),
                (["error", ""], m.stale_error.get()),
            ]
        }),
    },
    Def {
        name: "cache_refreshes_total",
        help: "Background GETs started by stale-while-revalidate.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| m.refreshes.get()),
    },
    Def {
        name: "passthrough_commands_total",
        help: "RESP commands relayed to Redis uncached (reads, writes, transactions' commands).",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| m.passthrough.get()),
    },
    Def {
        name: "redis_requests_total",
        help: "Commands sent to Redis.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| load(&s.backend.requests)),
    },
    Def {
        name: "redis_errors_total",
        help: "Failed Redis requests, by kind.",
        kind: Kind::Counter,
        labels: &["kind"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|_, s| {
            vec![
                (["unavailable", ""], load(&s.backend.errors_unavailable)),
                (["timeout", ""], load(&s.backend.errors_timeout)),
                (["reply", ""], load(&s.backend.errors_reply)),
            ]
        }),
    },
    Def {
        name: "redis_reconnects_total",
        help: "Redis connections re-established.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| load(&s.backend.reconnects)),
    },
    Def {
        name: "redis_redirects_total",
        help: "Cluster redirections followed, by kind.",
        kind: Kind::Counter,
        labels: &["kind"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|_, s| {
            vec![
                (["moved", ""], load(&s.backend.redirects_moved)),
                (["ask", ""], load(&s.backend.redirects_ask)),
            ]
        }),
    },
    Def {
        name: "cluster_refreshes_total",
        help: "Cluster slot-map refreshes.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| load(&s.backend.cluster_refreshes)),
    },
    Def {
        name: "redis_failovers_total",
        help: "Times the master moved (Sentinel failover followed).",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|_, s| load(&s.backend.failovers)),
    },
    Def {
        name: "redis_connections",
        help: "Redis connections open now, by node (host:port).",
        kind: Kind::Gauge,
        labels: &["node"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|_, s| {
            s.backend
                .nodes
                .read()
                .into_iter()
                .map(|(node, n)| ([node, ""], n))
                .collect()
        }),
    },
    Def {
        name: "clients_connected",
        help: "Client connections open now, HTTP and RESP.",
        kind: Kind::Gauge,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| m.clients_connected.load(Ordering::Relaxed).max(0) as u64),
    },
    Def {
        name: "clients_rejected_total",
        help: "Client connections refused at the limit.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.clients_rejected)),
    },
    Def {
        name: "clients_reaped_total",
        help: "Client connections closed for idling.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.clients_reaped)),
    },
    Def {
        name: "clients_evicted_total",
        help: "Client connections closed for holding the most buffer bytes over PROXY_MAX_BUFFER_BYTES.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.clients_evicted)),
    },
    Def {
        name: "requests_total",
        help: "Requests answered, by front end and status.",
        kind: Kind::Counter,
        labels: &["frontend", "status"],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Labelled(|m, _| {
            Status::ALL
                .iter()
                .map(|s| ([s.frontend().label(), s.label()], m.requests(*s)))
                .collect()
        }),
    },
    Def {
        name: "response_bytes_total",
        help: "Reply bytes sent to clients (heads included), by front end.",
        kind: Kind::Counter,
        labels: &["frontend"],
        shown: Shown::Always,
        redis_names: &["total_net_output_bytes"],
        read: Read::Labelled(|m, _| {
            [Frontend::Http, Frontend::Resp]
                .iter()
                .map(|f| ([f.label(), ""], m.response_bytes[*f as usize].get()))
                .collect()
        }),
    },
    Def {
        name: "request_duration_seconds",
        help: "Time to answer a request.",
        kind: Kind::Histogram,
        labels: &[],
        shown: Shown::Always,
        redis_names: &[],
        read: Read::Histogram(|m| &m.latency),
    },
    Def {
        name: "invalidations_total",
        help: "Invalidation messages received from Redis.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::WithTracking,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.invalidations)),
    },
    Def {
        name: "invalidated_keys_total",
        help: "Keys removed by invalidation messages.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::WithTracking,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.invalidated_keys)),
    },
    Def {
        name: "cache_flushes_total",
        help: "Times the whole cache was emptied.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::WithTracking,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.cache_flushes)),
    },
    Def {
        name: "tracking_reconnects_total",
        help: "Times the invalidation connection was re-established.",
        kind: Kind::Counter,
        labels: &[],
        shown: Shown::WithTracking,
        redis_names: &[],
        read: Read::One(|m, _| load(&m.tracking_reconnects)),
    },
];

/// The rows shown with this snapshot's settings.
fn shown<'s>(snapshot: &'s Snapshot<'_>) -> impl Iterator<Item = &'static Def> + 's {
    COUNTERS
        .iter()
        .filter(move |d| d.shown == Shown::Always || snapshot.tracking)
}

// ---------------------------------------------------------------------------
// Prometheus text

/// One family: its `# HELP` and `# TYPE` lines, then its samples.
fn prometheus_family(out: &mut String, def: &Def, reading: &Reading<'_>) {
    let name = def.name;
    let _ = writeln!(out, "# HELP {PREFIX}{name} {}", def.help);
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {}", def.kind.name());
    match reading {
        Reading::One(v) => prometheus_sample(out, name, "", v),
        Reading::Labelled(series) => {
            for (values, v) in series {
                prometheus_sample(out, name, &label_set(def.labels, values), v);
            }
        }
        Reading::Histogram(h) => prometheus_histogram(out, name, h),
    }
}

/// One sample line: `redis_proxy_<name><labels> <value>`.
fn prometheus_sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{PREFIX}{name}{labels} {value}");
}

/// `{a="x",b="y"}` for label names and their values.
fn label_set(names: &[&str], values: &[&str; MAX_LABELS]) -> String {
    let pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{v}\""))
        .collect();
    format!("{{{}}}", pairs.join(","))
}

/// Cumulative buckets, then `_sum` and `_count`.
fn prometheus_histogram(out: &mut String, name: &str, h: &Histogram) {
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0;
    for (bound, count) in BUCKETS.iter().zip(&h.counts) {
        cumulative += count.get();
        prometheus_sample(out, &bucket, &format!("{{le=\"{bound}\"}}"), cumulative);
    }
    prometheus_sample(out, &bucket, "{le=\"+Inf\"}", h.count());
    prometheus_sample(out, &format!("{name}_sum"), "", h.sum_secs());
    prometheus_sample(out, &format!("{name}_count"), "", h.count());
}

// ---------------------------------------------------------------------------
// INFO

/// One `name:value` line (see the module doc for the value's shape).
fn info_line(out: &mut String, name: &str, reading: &Reading<'_>) {
    let _ = write!(out, "{name}:");
    match reading {
        Reading::One(v) => {
            let _ = write!(out, "{v}");
        }
        Reading::Labelled(series) => {
            for (i, (values, v)) in series.iter().enumerate() {
                let key: Vec<&str> = values.iter().copied().filter(|v| !v.is_empty()).collect();
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(out, "{sep}{}={v}", key.join("_"));
            }
        }
        Reading::Histogram(h) => {
            let _ = write!(out, "count={},sum={}", h.count(), h.sum_secs());
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn render_both(m: &Metrics, tracking: bool) -> (String, String) {
        let cache = CacheStats::default();
        let backend = BackendStats::default();
        let snapshot = Snapshot {
            cache: &cache,
            cache_entries: 7,
            cache_bytes: 70,
            cache_capacity: 10,
            backend: &backend,
            tracking,
        };
        (m.render(&snapshot), m.render_info(&snapshot))
    }

    /// The families of a Prometheus text (`# TYPE` lines), without the prefix.
    fn prometheus_families(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let name = l.split(' ').next().unwrap();
                name.strip_prefix(PREFIX)
                    .unwrap_or_else(|| panic!("{name} lacks the prefix"))
                    .to_string()
            })
            .collect()
    }

    /// The field names of an INFO section, without the header and Redis's own names.
    fn info_fields(text: &str) -> BTreeSet<String> {
        let aliases: BTreeSet<&str> = COUNTERS
            .iter()
            .flat_map(|d| d.redis_names.iter().copied())
            .collect();
        text.split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once(':').expect("name:value").0)
            .filter(|n| !aliases.contains(n))
            .map(str::to_string)
            .collect()
    }

    /// Counters and the histogram appear in the exposition with their labels.
    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.hits.add(3);
        m.request(Status::Http200, Duration::from_micros(50));
        m.request(Status::Error, Duration::from_millis(2));
        m.response_bytes(Frontend::Http, 242);
        let (text, _) = render_both(&m, false);
        assert!(text.contains("redis_proxy_cache_hits_total 3\n"));
        assert!(text.contains("redis_proxy_cache_entries 7\n"));
        assert!(text.contains("redis_proxy_cache_bytes 70\n"));
        assert!(text.contains("redis_proxy_cache_stale_served_total{reason=\"error\"} 0\n"));
        assert!(text.contains("redis_proxy_cache_refreshes_total 0\n"));
        assert!(text.contains("redis_proxy_requests_total{frontend=\"http\",status=\"200\"} 1\n"));
        assert!(text.contains("redis_proxy_requests_total{frontend=\"resp\",status=\"error\"} 1\n"));
        assert!(text.contains("redis_proxy_requests_total{frontend=\"resp\",status=\"nil\"} 0\n"));
        assert!(text.contains("redis_proxy_request_duration_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("redis_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("redis_proxy_request_duration_seconds_count 2\n"));
        assert!(text.contains("redis_proxy_response_bytes_total{frontend=\"http\"} 242\n"));
        assert!(text.contains("redis_proxy_response_bytes_total{frontend=\"resp\"} 0\n"));
        assert!(text.contains("redis_proxy_cache_read_buffer_drops_total 0\n"));
        assert!(!text.contains("invalidations_total"));
    }

    /// INFO shows the same figures: plain values, labelled series as
    /// `values=n` lists, the histogram as count and sum, then Redis's names.
    #[test]
    fn info_shows_the_same_figures() {
        let m = Metrics::default();
        m.hits.add(3);
        m.misses.add(2);
        m.invalidations.fetch_add(4, Ordering::Relaxed);
        m.request(Status::Http404, Duration::from_millis(1));
        m.request(Status::Ok, Duration::from_millis(1));
        m.response_bytes(Frontend::Http, 10);
        m.response_bytes(Frontend::Resp, 5);
        let (_, info) = render_both(&m, true);
        assert!(info.starts_with("# Stats\r\n"), "{info}");
        for line in [
            "cache_hits_total:3",
            "cache_entries:7",
            "cache_evictions_total:lru=0,ttl=0",
            "redis_errors_total:unavailable=0,timeout=0,reply=0",
            "response_bytes_total:http=10,resp=5",
            "request_duration_seconds:count=2,sum=0.002",
            "invalidations_total:4",
            "keyspace_hits:3",
            "keyspace_misses:2",
            "total_net_output_bytes:15",
        ] {
            assert!(info.contains(&format!("{line}\r\n")), "{line} in:\n{info}");
        }
        let requests = info
            .split("\r\n")
            .find_map(|l| l.strip_prefix("requests_total:"))
            .expect("requests_total");
        assert!(requests.starts_with("http_200=0,http_204=0,http_400=0,http_404=1,"));
        assert!(requests.ends_with(",resp_ok=1,resp_nil=0,resp_error=0"));
    }

    /// Every row of the table appears in both renderings, and nothing else
    /// does: a counter written into one rendering only (not through the
    /// table) fails here.
    #[test]
    fn both_renderings_show_exactly_the_table() {
        let all: BTreeSet<String> = COUNTERS.iter().map(|d| d.name.to_string()).collect();
        assert_eq!(all.len(), COUNTERS.len(), "a name is declared twice");
        let (text, info) = render_both(&Metrics::default(), true);
        assert_eq!(prometheus_families(&text), all);
        assert_eq!(info_fields(&info), all);
        let always: BTreeSet<String> = COUNTERS
            .iter()
            .filter(|d| d.shown == Shown::Always)
            .map(|d| d.name.to_string())
            .collect();
        let (text, info) = render_both(&Metrics::default(), false);
        assert_eq!(prometheus_families(&text), always);
        assert_eq!(info_fields(&info), always);
    }

    /// Each row's series give one value per label name, and only a
    /// histogram row reads a histogram.
    #[test]
    fn rows_are_consistent() {
        let m = Metrics::default();
        let (cache, backend) = (CacheStats::default(), BackendStats::default());
        let s = Snapshot {
            cache: &cache,
            cache_entries: 0,
            cache_bytes: 0,
            cache_capacity: 0,
            backend: &backend,
            tracking: true,
        };
        for def in COUNTERS {
            assert!(def.labels.len() <= MAX_LABELS, "{}", def.name);
            match def.read(&m, &s) {
                Reading::One(_) => assert!(def.labels.is_empty(), "{}", def.name),
                Reading::Labelled(series) => {
                    assert!(!def.labels.is_empty(), "{}", def.name);
                    for (values, _) in series {
                        let given = values.iter().filter(|v| !v.is_empty()).count();
                        assert_eq!(given, def.labels.len(), "{}", def.name);
                    }
                }
                Reading::Histogram(_) => assert_eq!(def.kind, Kind::Histogram, "{}", def.name),
            }
            assert_eq!(
                def.kind == Kind::Histogram,
                matches!(def.read, Read::Histogram(_)),
                "{}",
                def.name
            );
        }
    }

    /// Every HTTP status maps back from its code; RESP statuses have none;
    /// labels are unique; `ALL` is in declaration order (the array index).
    #[test]
    fn statuses_round_trip() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(s.index(), i, "{s:?}");
            if let Some(code) = s.http_code() {
                assert_eq!(Status::from_http(code), Some(*s));
                assert_eq!(s.label(), code.to_string());
                assert_eq!(s.frontend(), Frontend::Http);
            } else {
                assert_eq!(s.frontend(), Frontend::Resp);
            }
        }
        let labels: BTreeSet<&str> = Status::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels.len(), Status::ALL.len());
        assert_eq!(Status::from_http(418), None);
    }

    /// An HTTP code without a status is a bug caught in debug builds, not
    /// a request silently counted under another label.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "HTTP 418 has no metrics::Status")]
    fn unknown_http_code_panics_in_debug_builds() {
        Status::http(418);
    }

    /// A batch tally adds each status once and empties itself.
    #[test]
    fn tally_adds_by_status() {
        let m = Metrics::default();
        let mut tally = Tally::default();
        tally.add(Status::Ok);
        tally.add(Status::Ok);
        tally.add(Status::Nil);
        m.requests_batch(&mut tally, Duration::from_micros(10));
        assert!(tally.is_empty());
        assert_eq!(m.requests(Status::Ok), 2);
        assert_eq!(m.requests(Status::Nil), 1);
        assert_eq!(m.requests(Status::Error), 0);
        assert_eq!(m.latency.count(), 3);
    }
}
