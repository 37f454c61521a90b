//! backend: the backing Redis, as a topology over nodes, over may's
//! coroutine-aware sockets with the redis crate's codec.
//!
//! Owns connecting (one path for every connection: `connect`), pipelining,
//! the per-request deadline, dropping a connection after a timeout,
//! reconnecting with bounded, jittered backoff, and which node serves a key.
//! Knows nothing of the cache or of HTTP and RESP: it answers bytes or a
//! [`BackendError`]. The one thing it tells the layer above unasked, it
//! reports into the [`Freshness`] state it is given (a data link reopened,
//! `CLIENT TRACKING` failed); it never calls up into the core.
//!
//! # Parts
//! - `connect`: resolve, TCP connect, TLS, AUTH, SELECT, for data links (may
//!   sockets) and the invalidation listener and Sentinel watcher (std
//!   sockets) alike.
//! - `tls`: the rustls client configuration of `rediss://`.
//! - `sentinel`: where the master is (Sentinel-found), and the watcher
//!   thread that follows it. With Sentinel the topology stays one node whose
//!   address moves: every connection reads it from
//!   [`BackendOptions::master`] when it connects.
//! - `node`: one node's per-worker pipelined connections (I/O coroutines).
//! - `topology`: which node serves a key. Today only [`Topology::Single`];
//!   a Sentinel-found master or a cluster's masters by slot add a variant,
//!   not a change to callers, who always name a key (or a slot).

pub(crate) mod connect;
mod node;
pub mod sentinel;
pub mod tls;
mod topology;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::coherence::Freshness;
use crate::config::RedisTarget;

pub use topology::Topology;

/// Why a Redis request failed, classified by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No connection: refused, not established within the timeout, or lost.
    Unavailable(String),
    /// Connected (TCP established), but no reply within the timeout, the
    /// connection handshake's included.
    Timeout,
    /// Redis answered with an error reply; the text is Redis's own line.
    Reply(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unavailable(why) => write!(f, "redis unavailable: {why}"),
            BackendError::Timeout => f.write_str("redis timeout"),
            BackendError::Reply(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for BackendError {}

/// Counters the metrics module reads.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Commands sent to Redis.
    pub requests: AtomicU64,
    /// Requests failed because Redis could not be reached.
    pub errors_unavailable: AtomicU64,
    /// Requests failed because Redis did not answer in time.
    pub errors_timeout: AtomicU64,
    /// Error replies from Redis.
    pub errors_reply: AtomicU64,
    /// Connections established after the first one of each I/O coroutine.
    pub reconnects: AtomicU64,
    /// Times the master moved (Sentinel).
    pub failovers: AtomicU64,
}

/// One key's outcome inside a multi-key read.
pub type GetResult = Result<Option<Vec<u8>>, BackendError>;

/// What a `SET` answered (its options decide which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetReply {
    /// `+OK`: written.
    Ok,
    /// Nil: not written (`NX`/`XX`), or no old value (`GET`).
    Nil,
    /// The old value (`GET`).
    Old(Vec<u8>),
}

/// What the read-through core needs from Redis. The real [`Backend`]
/// implements it; unit tests of the core drive a fake through the races the
/// core must survive. Callers name keys, never connections: `hint` (the
/// client's fd) only picks which of a node's per-worker connections carries
/// the request, so the client's and the Redis socket share a worker.
pub trait Redis: Send + Sync {
    /// `GET key`: the value, or `None` when absent.
    fn get(&self, key: &[u8], hint: usize) -> Result<Option<Vec<u8>>, BackendError>;
    /// `GET` of each key in one round trip per node; absent keys and keys of
    /// another type read as `None`, as in Redis's MGET.
    fn get_many(&self, keys: &[&[u8]], hint: usize) -> Result<Vec<GetResult>, BackendError>;
    /// `SET key value [options...]`.
    fn set(
        &self,
        key: &[u8],
        value: &[u8],
        options: &[&[u8]],
        hint: usize,
    ) -> Result<SetReply, BackendError>;
    /// `DEL keys...`: how many existed.
    fn del(&self, keys: &[&[u8]], hint: usize) -> Result<u64, BackendError>;
    /// True when Redis answers PING within the timeout.
    fn ping(&self, hint: usize) -> bool;
    /// Counters for metrics.
    fn stats(&self) -> &BackendStats;
}

impl<T: Redis + ?Sized> Redis for Arc<T> {
    fn get(&self, key: &[u8], hint: usize) -> Result<Option<Vec<u8>>, BackendError> {
        (**self).get(key, hint)
    }
    fn get_many(&self, keys: &[&[u8]], hint: usize) -> Result<Vec<GetResult>, BackendError> {
        (**self).get_many(keys, hint)
    }
    fn set(
        &self,
        key: &[u8],
        value: &[u8],
        options: &[&[u8]],
        hint: usize,
    ) -> Result<SetReply, BackendError> {
        (**self).set(key, value, options, hint)
    }
    fn del(&self, keys: &[&[u8]], hint: usize) -> Result<u64, BackendError> {
        (**self).del(keys, hint)
    }
    fn ping(&self, hint: usize) -> bool {
        (**self).ping(hint)
    }
    fn stats(&self) -> &BackendStats {
        (**self).stats()
    }
}

/// Settings of the backend.
#[derive(Clone)]
pub struct BackendOptions {
    pub target: RedisTarget,
    /// Connections per node: one per worker.
    pub connections: usize,
    /// Bound on one round trip, and on each step of connecting.
    pub timeout: Duration,
    /// Where data links report what freshness depends on (tracking only).
    pub freshness: Option<Arc<dyn Freshness>>,
    /// With Sentinel: where the master is now, shared by every connection
    /// (`target` then gives only credentials, db and TLS); its watcher
    /// starts with the backend.
    pub master: Option<Arc<sentinel::Master>>,
}

/// The backing Redis.
pub struct Backend {
    topology: Topology,
    stats: Arc<BackendStats>,
}

impl Backend {
    /// Starts the connections of every node. They open lazily, on the first
    /// request, so a dead Redis does not stop the proxy starting.
    pub fn start(options: BackendOptions) -> Backend {
        let stats = Arc::new(BackendStats::default());
        if let Some(master) = &options.master {
            sentinel::watch(master, &options, stats.clone());
        }
        Backend {
            topology: Topology::single(&options, stats.clone()),
            stats,
        }
    }

    fn count_reply_error<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if matches!(r, Err(BackendError::Reply(_))) {
            self.stats.errors_reply.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl Redis for Backend {
    fn get(&self, key: &[u8], hint: usize) -> Result<Option<Vec<u8>>, BackendError> {
        let result = self.topology.node_for(key).get(hint, key)?;
        self.count_reply_error(result)
    }

    fn get_many(&self, keys: &[&[u8]], hint: usize) -> Result<Vec<GetResult>, BackendError> {
        // One node today: one round trip. With several, the keys split by
        // node here and each part goes out in one batch.
        let node = self
            .topology
            .node_for(keys.first().copied().unwrap_or_default());
        node.get_many(hint, keys)
    }

    fn set(
        &self,
        key: &[u8],
        value: &[u8],
        options: &[&[u8]],
        hint: usize,
    ) -> Result<SetReply, BackendError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        for option in options {
            cmd.arg(*option);
        }
        let mut values = self
            .topology
            .node_for(key)
            .query(hint, cmd.get_packed_command(), 1)?;
        let reply = match values.pop().unwrap_or(Value::Nil) {
            Value::Okay => Ok(SetReply::Ok),
            Value::SimpleString(s) if s == "OK" => Ok(SetReply::Ok),
            other => bulk_or_nil(other).map(|old| old.map_or(SetReply::Nil, SetReply::Old)),
        };
        self.count_reply_error(reply)
    }

    fn del(&self, keys: &[&[u8]], hint: usize) -> Result<u64, BackendError> {
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(*key);
        }
        let node = self
            .topology
            .node_for(keys.first().copied().unwrap_or_default());
        let mut values = node.query(hint, cmd.get_packed_command(), 1)?;
        let reply = match values.pop().unwrap_or(Value::Nil) {
            Value::Int(n) => Ok(n.max(0) as u64),
            Value::ServerError(err) => Err(BackendError::Reply(server_error_line(&err))),
            other => Err(BackendError::Reply(format!(
                "ERR unexpected reply from redis: {other:?}"
            ))),
        };
        self.count_reply_error(reply)
    }

    fn ping(&self, hint: usize) -> bool {
        let cmd = redis::cmd("PING").get_packed_command();
        self.topology.nodes().all(|node| {
            matches!(node.query(hint, cmd.clone(), 1).as_deref(),
                Ok([Value::SimpleString(s)]) if s == "PONG")
        })
    }

    fn stats(&self) -> &BackendStats {
        &self.stats
    }
}

/// Interprets a GET reply.
pub(crate) fn bulk_or_nil(value: Value) -> Result<Option<Vec<u8>>, BackendError> {
    match value {
        Value::BulkString(bytes) => Ok(Some(bytes)),
        Value::Nil => Ok(None),
        Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        Value::Okay => Ok(Some(b"OK".to_vec())),
        Value::ServerError(err) => Err(BackendError::Reply(server_error_line(&err))),
        other => Err(BackendError::Reply(format!(
            "ERR unexpected reply from redis: {other:?}"
        ))),
    }
}

/// Redis's error line as it was sent, e.g. `WRONGTYPE Operation against ...`.
pub(crate) fn server_error_line(err: &redis::ServerError) -> String {
    match err.details() {
        Some(details) => format!("{} {}", err.code(), details),
        None => err.code().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET replies map to value, absence, or Redis's own error line.
    #[test]
    fn get_reply_mapping() {
        assert_eq!(
            bulk_or_nil(Value::BulkString(b"v".to_vec())),
            Ok(Some(b"v".to_vec()))
        );
        assert_eq!(bulk_or_nil(Value::Nil), Ok(None));
        let err = redis::parse_redis_value(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .unwrap();
        assert_eq!(
            bulk_or_nil(err),
            Err(BackendError::Reply(
                "WRONGTYPE Operation against a key holding the wrong kind of value".into()
            ))
        );
    }
}
