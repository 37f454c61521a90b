//! tracking: the invalidation listener of the opt-in coherent mode
//! (`CACHE_INVALIDATION=tracking`), built on Redis's server-assisted
//! client-side caching.
//!
//! Owns the invalidation connection (`CLIENT ID`, then
//! `SUBSCRIBE __redis__:invalidate`) and turns its messages into events on
//! the [`Freshness`] state (`crate::coherence`): up, down, a key changed,
//! everything changed. The data connections keep `CLIENT TRACKING ON
//! REDIRECT <id>` on by themselves (the backend reads the id from the same
//! state). It never reads values and never sees the core.
//!
//! The connection opens through the backend's one connect path over a std
//! socket on a thread of its own: it spends its life blocked in a read, which
//! on a may worker would need a coroutine and would gain nothing, and its
//! reconnect backoff can sleep without freezing a worker. It speaks TLS when
//! the target does, and with Sentinel it connects wherever the master is now
//! and reconnects when it moves.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use redis::{Parser, Value};

use crate::backend::connect::{connect, ConnectError, Stream};
use crate::backend::sentinel::Master;
use crate::backend::server_error_line;
use crate::coherence::Freshness;
use crate::config::RedisTarget;
use crate::metrics::Metrics;

/// The channel Redis publishes invalidations on for REDIRECT clients.
const CHANNEL: &str = "__redis__:invalidate";
/// Longest pause between attempts to reopen the invalidation connection.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// The invalidation listener.
pub struct Tracking {
    target: RedisTarget,
    timeout: Duration,
    freshness: Arc<dyn Freshness>,
    metrics: Arc<Metrics>,
    stopped: AtomicBool,
    /// With Sentinel: where the master is now (the listener moves with it).
    master: OnceLock<Arc<Master>>,
}

impl Tracking {
    /// A listener for `target` reporting into `freshness`; call
    /// [`Tracking::spawn`] to start it.
    pub fn new(
        target: RedisTarget,
        timeout: Duration,
        freshness: Arc<dyn Freshness>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Tracking {
            target,
            timeout,
            freshness,
            metrics,
            stopped: AtomicBool::new(false),
            master: OnceLock::new(),
        })
    }

    /// Connects wherever `master` says the master is, and reconnects when
    /// it moves (call before [`Tracking::spawn`]).
    pub(crate) fn follow(&self, master: Arc<Master>) {
        self.master.set(master).ok();
    }

    /// Stops the invalidation thread at its next wake-up.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Starts the invalidation connection's thread. It reconnects with
    /// backoff until [`Tracking::stop`].
    pub fn spawn(self: &Arc<Self>) -> thread::JoinHandle<()> {
        let this = self.clone();
        thread::Builder::new()
            .name("redis-invalidations".into())
            .spawn(move || this.run())
            .expect("spawn invalidation thread")
    }

    fn run(&self) {
        let mut backoff = Duration::from_millis(25);
        let mut connected_before = false;
        let mut warned = false;
        while !self.stopped.load(Ordering::SeqCst) {
            match self.subscribe() {
                Ok((stream, parser, id, generation)) => {
                    if connected_before {
                        self.metrics
                            .tracking_reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    warned = false;
                    backoff = Duration::from_millis(25);
                    log::info!("invalidation connection up (client id {id})");
                    self.freshness.listener_up(id);
                    let why = self.listen(stream, parser, generation);
                    self.freshness.listener_down();
                    log::warn!("invalidation connection lost ({why}); cache emptied");
                }
                Err(why) => {
                    if !warned {
                        log::warn!("invalidation connection to {} failed: {why}", self.target);
                        warned = true;
                    }
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Opens the invalidation connection: the shared handshake, then
    /// CLIENT ID and SUBSCRIBE.
    fn subscribe(&self) -> Result<(Stream<TcpStream>, Parser, i64, u64), String> {
        let mut cmds = Vec::new();
        redis::cmd("CLIENT")
            .arg("ID")
            .write_packed_command(&mut cmds);
        redis::cmd("SUBSCRIBE")
            .arg(CHANNEL)
            .write_packed_command(&mut cmds);
        let (target, generation) = match self.master.get() {
            None => (self.target.clone(), 0),
            Some(master) => master
                .target(&self.target)
                .ok_or("no master found through Sentinel yet")?,
        };
        let (conn, replies) = connect::<TcpStream>(&target, self.timeout, &cmds, 2)
            .map_err(|e: ConnectError| e.to_string())?;
        let mut id = -1;
        for reply in replies {
            match reply {
                Value::ServerError(err) => return Err(server_error_line(&err)),
                Value::Int(n) => id = n,
                _ => {}
            }
        }
        if id < 0 {
            return Err("CLIENT ID gave no id".into());
        }
        Ok((conn.stream, conn.parser, id, generation))
    }

    /// Applies invalidation messages until the connection fails; returns why.
    fn listen(&self, mut stream: Stream<TcpStream>, mut parser: Parser, generation: u64) -> String {
        // A silent connection is probed with PING; two silent periods in a
        // row mean it is dead even if TCP has not noticed.
        let period = self.timeout.max(Duration::from_secs(1));
        stream.set_read_timeout(Some(period)).ok();
        let mut silent = 0;
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return "stopped".into();
            }
            match parser.parse_value(&mut stream) {
                Ok(value) => {
                    silent = 0;
                    self.apply(value);
                }
                Err(e) if e.is_timeout() => {
                    if self
                        .master
                        .get()
                        .is_some_and(|m| m.generation() != generation)
                    {
                        return "the master moved".into();
                    }
                    silent += 1;
                    if silent >= 2 {
                        return "no answer to PING".into();
                    }
                    let ping = redis::cmd("PING").get_packed_command();
                    if let Err(e) = stream.write_all(&ping) {
                        return e.to_string();
                    }
                }
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Handles one pushed message: `["message", channel, keys | nil]`.
    pub(crate) fn apply(&self, value: Value) {
        let Value::Array(parts) = value else {
            return;
        };
        let [kind, channel, payload] = parts.as_slice() else {
            return;
        };
        let is = |v: &Value, s: &str| matches!(v, Value::BulkString(b) if b == s.as_bytes());
        if !is(kind, "message") || !is(channel, CHANNEL) {
            return;
        }
        self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
        match payload {
            // FLUSHALL / FLUSHDB: everything goes.
            Value::Nil => self.freshness.flush(),
            Value::Array(keys) => {
                for key in keys {
                    if let Value::BulkString(key) = key {
                        self.freshness.invalidate(key);
                        self.metrics
                            .invalidated_keys
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }
}
