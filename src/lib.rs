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
//! - [`backend`]: per-worker pipelined Redis connections over may sockets; timeouts, reconnects.
//! - [`proxy`]: the read-through core both front ends call: lookup, single-flight miss, insert.
//! - [`http`]: the HTTP front end: its own connection loop on may coroutines (`http/conn.rs`), head parsing with httparse (`http/parse.rs`); maps results and errors to statuses.
//! - [`listener`]: the accept loop both front ends share (backs off when accepts fail), the open-file limit.
//! - [`resp`]: the Redis-protocol (RESP2) front end: parser, command subset, accept loop.
//! - [`clients`]: the connected-client limit, idle reaping, the bound on all clients' buffers (eviction).
//! - [`tracking`]: opt-in coherence: Redis CLIENT TRACKING invalidations empty changed keys.
//! - [`metrics`]: counters and the Prometheus exposition.
//! - [`server`]: wiring; starts everything from a [`Config`] and returns a [`Server`] handle.
//!
//! Layers point one way: front ends -> `proxy` -> `cache` and `backend`.

pub mod backend;
pub mod cache;
pub mod clients;
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
