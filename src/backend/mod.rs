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
//! - `connect`: resolve, TCP connect, TLS, AUTH or HELLO 3, SELECT, for
//!   data links (may sockets) and the invalidation listener, Sentinel
//!   watcher and command learner (std sockets) alike.
//! - `tls`: the rustls client configuration of `rediss://`.
//! - `sentinel`: where the master is (Sentinel-found), and the watcher
//!   thread that follows it. With Sentinel the topology stays one node whose
//!   address moves: every connection reads it from
//!   [`BackendOptions::master`] when it connects.
//! - `node`: one node's per-worker pipelined connections (I/O coroutines);
//!   a second, RESP3 set opened on first use; raw relay jobs ([`Pass`]).
//! - `commands`: what Redis serves ([`CommandTable`]), learned from its own
//!   `COMMAND` and `COMMAND DOCS` on a thread of its own.
//! - `topology`: which node serves a key: [`Topology::Single`] (one Redis,
//!   or the master Sentinel found) or [`Topology::Cluster`], and the one
//!   routing function, [`Topology::route`]; callers always name a key (or
//!   a slot).
//! - `cluster`: a Redis Cluster's slot map, redirections and refreshes.
//! - `slot`: hash slots (CRC16 of the key or its `{hash tag}`).

mod cluster;
pub mod commands;
pub(crate) mod connect;
mod node;
pub mod sentinel;
pub mod slot;
pub mod tls;
mod topology;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::coherence::Freshness;
use crate::config::RedisTarget;

pub use cluster::{Listeners, NodeFreshness, NodeGauges, Redirect};
pub use commands::CommandTable;
use commands::Learner;
pub use topology::Topology;

use crate::config::ClusterMode;
use node::Node;

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
    /// Connections opened, first ones included (the command table is
    /// learned again after each: it may be another Redis than before).
    pub links_opened: AtomicU64,
    /// Times the master moved (Sentinel).
    pub failovers: AtomicU64,
    /// `MOVED` redirections followed (cluster).
    pub redirects_moved: AtomicU64,
    /// `ASK` redirections followed (cluster).
    pub redirects_ask: AtomicU64,
    /// Slot-map refreshes attempted (cluster).
    pub cluster_refreshes: AtomicU64,
    /// Open connections of each node in use.
    pub nodes: NodeGauges,
}

impl BackendStats {
    fn register_node(&self, addr: &str, gauge: Arc<std::sync::atomic::AtomicI64>) {
        self.nodes.register(addr, gauge);
    }

    fn retain_nodes(&self, addrs: &[String]) {
        self.nodes.retain(addrs);
    }
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

/// The RESP version a reply is wanted in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Resp2,
    Resp3,
}

impl Protocol {
    /// 0 for RESP2, 1 for RESP3 (for tables kept in both).
    pub fn index(self) -> usize {
        match self {
            Protocol::Resp2 => 0,
            Protocol::Resp3 => 1,
        }
    }

    /// The version number (`HELLO`'s `proto`).
    pub fn number(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// Commands relayed to Redis as they are: their replies come back as the
/// bytes Redis sent, never decoded.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// The commands, packed (RESP multibulk), written as one block.
    pub commands: &'a [u8],
    /// How many replies they produce.
    pub replies: usize,
    /// How many of the first replies to read and drop (MULTI's `+OK` and
    /// the `+QUEUED`s before EXEC's reply).
    pub skip: usize,
    /// The key that picks the node (the first key), `None` for keyless commands.
    pub route: Option<&'a [u8]>,
    /// The replies' protocol: RESP3 goes on a node's RESP3 connections.
    pub protocol: Protocol,
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
    /// Relays `cmd` and answers the reply bytes after its first `skip`
    /// replies, as Redis sent them (an error reply is an answer, not an `Err`).
    fn pass(&self, cmd: &Pass<'_>, hint: usize) -> Result<Vec<u8>, BackendError> {
        let _ = (cmd, hint);
        Err(BackendError::Unavailable(
            "pass-through not supported".into(),
        ))
    }
    /// What Redis serves, once learned from its `COMMAND` replies.
    fn commands(&self) -> Option<Arc<CommandTable>> {
        None
    }
    /// True for a Redis Cluster: commands of one [`Redis::pass`] must then
    /// share a slot (their first key's), and may come back redirected.
    fn is_cluster(&self) -> bool {
        false
    }
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
    fn pass(&self, cmd: &Pass<'_>, hint: usize) -> Result<Vec<u8>, BackendError> {
        (**self).pass(cmd, hint)
    }
    fn commands(&self) -> Option<Arc<CommandTable>> {
        (**self).commands()
    }
    fn is_cluster(&self) -> bool {
        (**self).is_cluster()
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
    commands: Arc<Learner>,
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
            commands: Learner::start(learn_from(&options), options.timeout),
        }
    }

    /// A single Redis at `options.target`, or a cluster learnt from
    /// `seeds` (`options.target` is the first): `mode` decides, `Auto` by
    /// `INFO cluster` of the first seed that answers. This blocks (on std
    /// sockets) for up to the timeout per seed: call it before serving.
    /// With `Auto` and no seed answering, a single Redis at the first seed.
    /// With tracking (`options.freshness`), a cluster starts one invalidation
    /// listener per master through `listeners`; a single Redis leaves its
    /// listener to the caller.
    pub fn start_with(
        options: BackendOptions,
        seeds: Vec<RedisTarget>,
        mode: ClusterMode,
        listeners: Option<Listeners>,
    ) -> Backend {
        // A Sentinel-found master is one Redis, never a cluster.
        let cluster = match mode {
            _ if options.master.is_some() => false,
            ClusterMode::On => true,
            ClusterMode::Off => false,
            ClusterMode::Auto => cluster::detect(&seeds, options.timeout).unwrap_or_else(|| {
                log::warn!(
                    "no seed answered INFO cluster: serving {} as a single Redis \
                     (set REDIS_CLUSTER=on for a cluster)",
                    options.target
                );
                false
            }),
        };
        if !cluster {
            return Backend::start(options);
        }
        let stats = Arc::new(BackendStats::default());
        let learn_seeds = seeds.clone();
        Backend {
            commands: Learner::start(Box::new(move || learn_seeds.clone()), options.timeout),
            topology: Topology::cluster(&options, seeds, stats.clone(), listeners),
            stats,
        }
    }

    /// True when the backend is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    /// Sends `count` packed commands `cmds` to the node serving `key` and
    /// returns their replies (errors as `Value::ServerError`), following a
    /// cluster's `MOVED`/`ASK` once each. The path for keyed commands other
    /// than GET (SET, DEL, pass-through).
    pub fn query_key(
        &self,
        key: &[u8],
        hint: usize,
        cmds: Vec<u8>,
        count: usize,
    ) -> Result<Vec<Value>, BackendError> {
        if let Topology::Single(node) = &self.topology {
            return node.query(hint, cmds, count);
        }
        self.topology.route(
            key,
            |node, asking| {
                if asking {
                    let mut values = node.query(hint, asking_prefixed(&cmds), count + 1)?;
                    values.remove(0);
                    Ok(values)
                } else {
                    node.query(hint, cmds.clone(), count)
                }
            },
            |result| result.as_ref().ok().and_then(|v| Redirect::of_values(v)),
        )
    }

    /// GET of `key` at its node, following redirections.
    fn get_routed(&self, key: &[u8], hint: usize) -> Result<GetResult, BackendError> {
        self.topology.route(
            key,
            |node, asking| {
                if asking {
                    let cmd = redis::cmd("GET").arg(key).get_packed_command();
                    let mut values = node.query(hint, asking_prefixed(&cmd), 2)?;
                    Ok(bulk_or_nil(values.pop().unwrap_or(Value::Nil)))
                } else {
                    node.get(hint, key)
                }
            },
            |result| match result {
                Ok(Err(e)) => Redirect::of_error(e),
                _ => None,
            },
        )
    }

    /// MGET over a cluster: the keys grouped by their master in one map
    /// version, one batch per master, in sequence; keys redirected on the
    /// way are read again one by one through the routing function.
    fn get_many_cluster(
        &self,
        cluster: &cluster::Cluster,
        keys: &[&[u8]],
        hint: usize,
    ) -> Result<Vec<GetResult>, BackendError> {
        let mut results: Vec<Option<GetResult>> = vec![None; keys.len()];
        for (node, indexes) in cluster.group(keys) {
            let Some(node) = node else { continue };
            let batch: Vec<&[u8]> = indexes.iter().map(|&i| keys[i]).collect();
            let answers = node.get_many(hint, &batch).inspect_err(|e| {
                if matches!(e, BackendError::Unavailable(_) | BackendError::Timeout) {
                    cluster.want_refresh();
                }
            })?;
            for (i, answer) in indexes.into_iter().zip(answers) {
                results[i] = Some(answer);
            }
        }
        keys.iter()
            .zip(results)
            .map(|(key, result)| match result {
                Some(Err(e)) if Redirect::of_error(&e).is_some() => self.get_routed(key, hint),
                Some(result) => Ok(result),
                None => self.get_routed(key, hint),
            })
            .map(|r| match r {
                // A dead master fails the whole MGET, as it fails a GET:
                // answering its keys as nil would pass for absent keys.
                Ok(Err(e @ (BackendError::Unavailable(_) | BackendError::Timeout))) => Err(e),
                other => other,
            })
            .collect()
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
        let result = match &self.topology {
            Topology::Single(node) => node.get(hint, key)?,
            Topology::Cluster(_) => self.get_routed(key, hint)?,
        };
        self.count_reply_error(result)
    }

    fn get_many(&self, keys: &[&[u8]], hint: usize) -> Result<Vec<GetResult>, BackendError> {
        match &self.topology {
            Topology::Single(node) => node.get_many(hint, keys),
            Topology::Cluster(cluster) => self.get_many_cluster(cluster, keys, hint),
        }
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
        let mut values = self.query_key(key, hint, cmd.get_packed_command(), 1)?;
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
        // Keys of several slots in a cluster get Redis's own CROSSSLOT error
        // from the first key's master, as a cluster client would.
        let first = keys.first().copied().unwrap_or_default();
        let mut values = self.query_key(first, hint, cmd.get_packed_command(), 1)?;
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
        let pong = |node: &Node| {
            matches!(node.query(hint, cmd.clone(), 1).as_deref(),
                Ok([Value::SimpleString(s)]) if s == "PONG")
        };
        match &self.topology {
            Topology::Single(node) => pong(node),
            // Ready only when every slot has a master that answers.
            Topology::Cluster(cluster) => {
                let map = cluster.map();
                map.complete() && map.masters().all(pong)
            }
        }
    }

    fn stats(&self) -> &BackendStats {
        &self.stats
    }

    fn pass(&self, cmd: &Pass<'_>, hint: usize) -> Result<Vec<u8>, BackendError> {
        let reply = match (&self.topology, cmd.route) {
            (Topology::Single(node), _) => node.relay(hint, cmd)?,
            // A keyless command has no one node in a cluster: answering one
            // master's DBSIZE or SCAN would pass for the whole keyspace.
            (Topology::Cluster(_), None) => {
                return Err(BackendError::Reply(
                    "ERR this command takes no key, so redis-proxy cannot route it in a \
                     Redis Cluster; send it to a node directly"
                        .into(),
                ))
            }
            (Topology::Cluster(_), Some(key)) => self.topology.route(
                key,
                |node, asking| {
                    if !asking {
                        return node.relay(hint, cmd);
                    }
                    let commands = asking_prefixed(cmd.commands);
                    let asked = Pass {
                        commands: &commands,
                        replies: cmd.replies + 1,
                        skip: cmd.skip + 1,
                        ..*cmd
                    };
                    node.relay(hint, &asked)
                },
                |result| result.as_ref().ok().and_then(|r| Redirect::of_raw(r)),
            )?,
        };
        let errors = match cmd.replies - cmd.skip {
            1 => usize::from(reply.first() == Some(&b'-')),
            // A pipelined run: each of its replies counts.
            _ => reply_frames(&reply).map_or(0, |frames| {
                frames.iter().filter(|f| reply[f.start] == b'-').count()
            }),
        };
        if errors > 0 {
            self.stats
                .errors_reply
                .fetch_add(errors as u64, Ordering::Relaxed);
        }
        Ok(reply)
    }

    fn commands(&self) -> Option<Arc<CommandTable>> {
        self.commands.table(&self.stats)
    }

    fn is_cluster(&self) -> bool {
        Backend::is_cluster(self)
    }
}

/// Where the command table is learned: the one Redis, or wherever
/// Sentinel last found the master.
fn learn_from(options: &BackendOptions) -> commands::Targets {
    let base = options.target.clone();
    match options.master.clone() {
        None => Box::new(move || vec![base.clone()]),
        Some(master) => {
            Box::new(move || master.target(&base).map(|(t, _)| t).into_iter().collect())
        }
    }
}

/// Where each whole reply frame of `replies` (the bytes of several
/// replies back to back, as [`Redis::pass`] answers them) lies, in order;
/// `None` when the bytes are not whole frames.
pub(crate) fn reply_frames(replies: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < replies.len() {
        let len = node::frame_len(&replies[at..]).ok()??;
        frames.push(at..at + len);
        at += len;
    }
    Some(frames)
}

/// `ASKING` followed by `cmds`.
fn asking_prefixed(cmds: &[u8]) -> Vec<u8> {
    let mut out = b"*1\r\n$6\r\nASKING\r\n".to_vec();
    out.extend_from_slice(cmds);
    out
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

    /// Replies back to back split at their frame boundaries, nested and
    /// RESP3 ones included; a cut frame is no split.
    #[test]
    fn reply_frames_split_whole_replies() {
        let replies = b":1\r\n*2\r\n$1\r\na\r\n$-1\r\n-ERR x\r\n%1\r\n+k\r\n_\r\n";
        assert_eq!(
            reply_frames(replies),
            Some(vec![0..4, 4..20, 20..28, 28..39])
        );
        assert_eq!(reply_frames(b""), Some(vec![]));
        assert_eq!(reply_frames(b":1\r\n$5\r\nab"), None);
    }

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
