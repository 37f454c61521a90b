//! tracking: the opt-in coherent mode (`CACHE_INVALIDATION=tracking`),
//! built on Redis's server-assisted client-side caching.
//!
//! Owns the invalidation connection (`CLIENT ID`, then
//! `SUBSCRIBE __redis__:invalidate` on a dedicated thread), keeps every data
//! connection tracking with `CLIENT TRACKING ON REDIRECT <id>` (through the
//! backend's [`LinkHook`]), and turns invalidation messages into removals in
//! the core. It never reads values.
//!
//! # Guarantees
//! - While the invalidation connection is down, [`Tracking::ready`] is false:
//!   the core neither serves from nor fills the cache.
//! - When it drops, or a data connection is reopened (Redis forgets what it
//!   tracked for the old one), the cache is emptied before anything is served
//!   from it again; tracking is then restored on each data connection, ahead
//!   of its next batch.
//! - A value fetched across any of those events is not cached (the core
//!   compares [`Proxy::generation`] before and after its fetch).

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread;
use std::time::Duration;

use redis::{Parser, Value};

use crate::backend::{server_error_line, LinkHook};
use crate::config::RedisTarget;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// The channel Redis publishes invalidations on for REDIRECT clients.
const CHANNEL: &str = "__redis__:invalidate";
/// Longest pause between attempts to reopen the invalidation connection.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Shared state of the coherent mode.
pub struct Tracking {
    target: RedisTarget,
    timeout: Duration,
    /// Client id of the live invalidation connection, or -1 while it is down.
    redirect: AtomicI64,
    proxy: OnceLock<Weak<Proxy>>,
    metrics: Arc<Metrics>,
    stopped: AtomicBool,
}

impl Tracking {
    /// A tracking state for `target`; call [`Tracking::attach`] then
    /// [`Tracking::spawn`].
    pub fn new(target: RedisTarget, timeout: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Tracking {
            target,
            timeout,
            redirect: AtomicI64::new(-1),
            proxy: OnceLock::new(),
            metrics,
            stopped: AtomicBool::new(false),
        })
    }

    /// Names the core whose cache invalidations apply to.
    pub fn attach(&self, proxy: &Arc<Proxy>) {
        self.proxy.set(Arc::downgrade(proxy)).ok();
    }

    /// True while invalidations can reach us: the cache may be used.
    pub fn ready(&self) -> bool {
        self.redirect.load(Ordering::SeqCst) >= 0
    }

    /// Stops the invalidation thread at its next wake-up.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn proxy(&self) -> Option<Arc<Proxy>> {
        self.proxy.get().and_then(Weak::upgrade)
    }

    /// Empties the cache and makes every fetch in flight uncacheable.
    fn flush(&self) {
        if let Some(proxy) = self.proxy() {
            proxy.invalidate_all();
            self.metrics.cache_flushes.fetch_add(1, Ordering::Relaxed);
        }
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
                Ok((stream, parser, id)) => {
                    if connected_before {
                        self.metrics
                            .tracking_reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    warned = false;
                    backoff = Duration::from_millis(25);
                    log::info!("invalidation connection up (client id {id})");
                    self.redirect.store(id, Ordering::SeqCst);
                    let why = self.listen(stream, parser);
                    // Order matters: stop using the cache, then empty it.
                    self.redirect.store(-1, Ordering::SeqCst);
                    self.flush();
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

    /// Opens the invalidation connection: AUTH, CLIENT ID, SUBSCRIBE.
    fn subscribe(&self) -> Result<(TcpStream, Parser, i64), String> {
        let addr: SocketAddr = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let mut stream =
            TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(self.timeout)).ok();
        stream.set_write_timeout(Some(self.timeout)).ok();
        let mut parser = Parser::new();
        let mut cmds = Vec::new();
        let mut replies = 2;
        if let Some(password) = &self.target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.target.username {
                auth.arg(user);
            }
            auth.arg(password).write_packed_command(&mut cmds);
            replies += 1;
        }
        redis::cmd("CLIENT")
            .arg("ID")
            .write_packed_command(&mut cmds);
        redis::cmd("SUBSCRIBE")
            .arg(CHANNEL)
            .write_packed_command(&mut cmds);
        stream.write_all(&cmds).map_err(|e| e.to_string())?;
        let mut id = -1;
        for _ in 0..replies {
            match parser.parse_value(&mut stream).map_err(|e| e.to_string())? {
                Value::ServerError(err) => return Err(server_error_line(&err)),
                Value::Int(n) => id = n,
                _ => {}
            }
        }
        if id < 0 {
            return Err("CLIENT ID gave no id".into());
        }
        Ok((stream, parser, id))
    }

    /// Applies invalidation messages until the connection fails; returns why.
    fn listen(&self, mut stream: TcpStream, mut parser: Parser) -> String {
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
    fn apply(&self, value: Value) {
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
        let Some(proxy) = self.proxy() else {
            return;
        };
        self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
        match payload {
            // FLUSHALL / FLUSHDB: everything goes.
            Value::Nil => self.flush(),
            Value::Array(keys) => {
                for key in keys {
                    if let Value::BulkString(key) = key {
                        proxy.invalidate(key);
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

impl LinkHook for Tracking {
    fn connected(&self, index: usize, reconnect: bool) {
        if reconnect {
            // Redis dropped what it tracked for the old connection.
            log::info!("redis connection {index} reopened; cache emptied");
            self.flush();
        }
    }

    fn preamble(&self, token: i64) -> Option<(Vec<u8>, usize, i64)> {
        let redirect = self.redirect.load(Ordering::SeqCst);
        // The token is redirect + 1, so 0 (a new link) never matches.
        if redirect < 0 || token == redirect + 1 {
            return None;
        }
        let cmd = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("REDIRECT")
            .arg(redirect)
            .get_packed_command();
        Some((cmd, 1, redirect + 1))
    }

    fn preamble_failed(&self, why: &str) {
        log::warn!("CLIENT TRACKING failed ({why}); values fetched now are not cached");
        if let Some(proxy) = self.proxy() {
            proxy.distrust();
        }
    }
}
