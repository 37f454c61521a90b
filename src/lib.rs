//! redis-proxy: a caching HTTP (and RESP) proxy in front of one Redis.
//!
//! Clients read keys over HTTP (`GET /<key>`); the proxy answers from a
//! shared in-memory cache or reads Redis with one `GET`, caches the value and
//! answers. Entries expire after a global TTL; at a fixed key capacity the
//! least recently read key is evicted. Requests run on may's worker threads
//! as stackful coroutines; every blocking call is coroutine-aware.
//!
//! # Layout
//! - [`config`]: settings, flags, environment variables, validation.
//! - [`cache`]: exact LRU (by reads) + global TTL over a sharded map; entries are one allocation each (`cache/entry.rs`); knows nothing of Redis or HTTP.
//! - [`backend`]: the backing Redis behind the [`backend::Redis`] trait: a [`backend::Topology`] over nodes (`backend/topology.rs`: one node, a Sentinel-found master (`backend/sentinel.rs`), or a Redis Cluster's masters by hash slot with MOVED/ASK and map refreshes in `backend/cluster.rs` and `backend/slot.rs`), each node's per-worker pipelined connections over may sockets, a RESP3 set opened on first use and raw relay jobs (`backend/node.rs`), Redis's command table learned from `COMMAND`/`COMMAND DOCS` (`backend/commands.rs`), and the one connect path for every connection: resolve, TCP, TLS (`backend/tls.rs`, rustls), AUTH or HELLO 3, SELECT (`backend/connect.rs`).
//! - [`proxy`]: the read-through core both front ends call (`get`, `get_many`, `set`, `del`, `pass`, `write`, `transaction`, `commands`, `ready`, `snapshot`): lookup, single-flight miss, insert, pass-through, writes (which drop what they wrote).
//! - [`coherence`]: the freshness state machine (flights, epoch, generation, tracking up/down) the core reads and the layers below report into.
//! - [`http`]: the HTTP front end: its own connection loop on may coroutines (`http/conn.rs`), head parsing with httparse (`http/parse.rs`); maps results and errors to statuses.
//! - [`resp`]: the Redis-protocol front end (RESP2, RESP3 after `HELLO 3`): incremental parser (`resp/parse.rs`), the served commands, the pass-through policy and MULTI queueing (`resp/commands.rs`), pipelined pass-through runs relayed as one job (`resp/ahead.rs`), the connection loop and reply encoding.
//! - [`listener`]: the accept loop both front ends share (backs off when accepts fail), the open-file limit.
//! - [`clients`]: the connected-client limit, idle reaping, the bound on all clients' buffers (eviction).
//! - [`tracking`]: the opt-in invalidation listener: Redis CLIENT TRACKING messages become [`coherence`] events.
//! - [`metrics`]: one table of counters, rendered into the Prometheus text and RESP `INFO`; the request `Status` enum.
//! - [`server`]: wiring; starts everything from a [`Config`] and returns a [`Server`] handle.
//!
//! Layers point one way: front ends -> `proxy` -> {`cache`, `coherence`,
//! `backend`}; `backend` and `tracking` report into `coherence` through its
//! `Freshness` trait and never see the core.

pub mod backend;
pub mod cache;
pub mod clients;
pub mod coherence;
pub mod config;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod resp;
pub mod server;
pub mod tracking;

pub use config::Config;
pub use server::{start, Server};
