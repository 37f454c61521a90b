//! sentinel: finding the master through Redis Sentinel, and following it
//! when it moves (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`).
//!
//! Owns the [`Master`] state (where the master is now) and the watcher, a
//! std thread like the invalidation listener: it spends its life blocked in
//! reads and in short connects that would freeze a may worker. The data
//! links only read `Master::target` when they connect and report trouble
//! with `Master::suspect`; credentials, db and TLS come from `REDIS_URL`
//! (TLS also for the Sentinels, with `REDIS_SENTINEL_PASSWORD`).
//!
//! # States
//! | state | data links | entered by |
//! |---|---|---|
//! | `Unknown` | fail "no master found through Sentinel yet" (503) | start |
//! | `At(addr, generation g)` | connect to `addr`; a link of an older `g` is dropped and reopened | a Sentinel named `addr` and `ROLE` there said `master` |
//!
//! Events: `+switch-master` on the subscribed Sentinel (its new address,
//! confirmed with `ROLE`), or a suspicion (a lost data link, a failed
//! connect, a `-READONLY` reply, every `RECHECK`) that makes the watcher
//! ask the Sentinels again, each in turn, within `POLL`. A move to another
//! address bumps `g`, counts in `redis_failovers_total` and, with tracking,
//! empties the cache (reported into the freshness state): the new master
//! tracks nothing for this proxy yet. Cached keys keep being served
//! throughout otherwise.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use redis::{Parser, Value};

use super::connect::{connect, Stream};
use super::{server_error_line, BackendOptions, BackendStats};
use crate::coherence::Freshness;
use crate::config::{RedisTarget, SentinelTarget};

/// The Sentinel channel announcing a new master.
const SWITCH_MASTER: &str = "+switch-master";
/// How often the watcher looks at its suspicions (and how long it waits in
/// one read of the subscription).
const POLL: Duration = Duration::from_millis(100);
/// Ask the Sentinels again this often even when nothing seems wrong: a
/// `+switch-master` can be missed while the subscription is being reopened.
const RECHECK: Duration = Duration::from_secs(5);
/// A silent subscription is probed with PING this often.
const PING_EVERY: Duration = Duration::from_secs(1);

type StdSocket = std::net::TcpStream;

/// A host and port.
type Addr = (String, u16);

/// Where the master is, shared by the watcher and the data links (which
/// find it in [`BackendOptions::master`](super::BackendOptions)).
pub struct Master {
    /// The Sentinels and the master's name.
    sentinel: SentinelTarget,
    /// Set once the watcher runs (one per `Master`).
    watching: AtomicBool,
    name: String,
    /// The address and its generation, changed together.
    at: Mutex<Option<(String, u16)>>,
    generation: AtomicU64,
    /// Something suggests the address is stale: ask again.
    suspect: AtomicBool,
}

impl fmt::Debug for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Master")
            .field("sentinel", &self.sentinel)
            .field("at", &self.at)
            .finish()
    }
}

impl Master {
    /// The state for finding `sentinel.master`: unknown until the watcher,
    /// started by `Backend::start`, finds it.
    pub fn new(sentinel: SentinelTarget) -> Arc<Master> {
        Arc::new(Master {
            name: sentinel.master.clone(),
            sentinel,
            watching: AtomicBool::new(false),
            at: Mutex::new(None),
            generation: AtomicU64::new(0),
            suspect: AtomicBool::new(true),
        })
    }

    /// `base` (credentials, db, TLS) at the master's address now, and the
    /// generation of that address; `None` while no master is known.
    pub(crate) fn target(&self, base: &RedisTarget) -> Option<(RedisTarget, u64)> {
        let at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        let (host, port) = at.clone()?;
        let generation = self.generation.load(Ordering::SeqCst);
        Some((
            RedisTarget {
                host,
                port,
                ..base.clone()
            },
            generation,
        ))
    }

    /// Bumped at every change of address.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Asks the watcher to check the address again (cheap; callable from
    /// a coroutine).
    pub(crate) fn suspect(&self, why: &str) {
        if !self.suspect.swap(true, Ordering::SeqCst) {
            log::debug!("asking Sentinel for master {} again after {why}", self.name);
        }
    }

    /// Moves to `host:port`; the address it left, if it was another.
    fn set(&self, host: &str, port: u16) -> Option<Option<(String, u16)>> {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if at.as_ref().is_some_and(|(h, p)| h == host && *p == port) {
            return None;
        }
        let old = at.replace((host.to_string(), port));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Some(old)
    }
}

/// Starts the watcher thread of `master` (once; later calls do nothing),
/// connecting as `options` says (credentials, db, TLS, timeout).
pub(crate) fn watch(master: &Arc<Master>, options: &BackendOptions, stats: Arc<BackendStats>) {
    if master.watching.swap(true, Ordering::SeqCst) {
        return;
    }
    let sentinel = &master.sentinel;
    let list: Vec<String> = sentinel
        .sentinels
        .iter()
        .map(|(host, port)| format!("{host}:{port}"))
        .collect();
    log::info!(
        "finding master {} through Sentinel {} (REDIS_URL gives credentials, db and TLS; \
         its host and port are not used)",
        sentinel.master,
        list.join(",")
    );
    let mut watcher = Watcher {
        sentinel: sentinel.clone(),
        base: options.target.clone(),
        timeout: options.timeout,
        master: master.clone(),
        stats,
        freshness: options.freshness.clone(),
        next: 0,
        warned: None,
        replicas: Vec::new(),
    };
    thread::Builder::new()
        .name("redis-sentinel".into())
        .spawn(move || watcher.run())
        .expect("spawn Sentinel watcher thread");
}

/// An open `SUBSCRIBE +switch-master` on one Sentinel.
struct Subscription {
    stream: Stream<StdSocket>,
    parser: Parser,
    sentinel: usize,
    heard: Instant,
    pinged: Instant,
}

struct Watcher {
    sentinel: SentinelTarget,
    base: RedisTarget,
    timeout: Duration,
    master: Arc<Master>,
    stats: Arc<BackendStats>,
    freshness: Option<Arc<dyn Freshness>>,
    /// The Sentinel to ask first: the last one that answered.
    next: usize,
    /// The last problem logged, so each is logged once, not every [`POLL`].
    warned: Option<String>,
    /// The master's replicas, as a Sentinel last listed them.
    replicas: Vec<(String, u16)>,
}

impl Watcher {
    fn run(&mut self) {
        let mut subscription: Option<Subscription> = None;
        let mut checked = Instant::now();
        loop {
            let due =
                self.master.suspect.swap(false, Ordering::SeqCst) || checked.elapsed() >= RECHECK;
            if due {
                checked = Instant::now();
                match self.resolve() {
                    Ok(((host, port), how)) => {
                        self.warned = None;
                        self.moved(&host, port, how);
                    }
                    Err(why) => {
                        self.warn(format!(
                            "cannot find master {} through Sentinel: {why}",
                            self.sentinel.master
                        ));
                        // Keep asking while it is not found.
                        self.master.suspect.store(true, Ordering::SeqCst);
                    }
                }
            }
            if subscription.is_none() {
                subscription = self.subscribe();
            }
            match subscription.as_mut() {
                Some(sub) => {
                    if let Err(why) = self.listen(sub) {
                        let at = self.describe(sub.sentinel);
                        log::warn!("Sentinel subscription on {at} lost ({why}); trying the next");
                        self.next = (sub.sentinel + 1) % self.sentinel.sentinels.len();
                        subscription = None;
                        // A switch may come while no subscription is open.
                        self.master.suspect("a lost Sentinel subscription");
                    }
                }
                None => thread::sleep(POLL),
            }
        }
    }

    /// Reads the subscription for up to [`POLL`]; an error when it is lost.
    fn listen(&mut self, sub: &mut Subscription) -> Result<(), String> {
        match sub.parser.parse_value(&mut sub.stream) {
            Ok(value) => {
                sub.heard = Instant::now();
                if let Some((host, port)) = switch_master(&value, &self.sentinel.master) {
                    match self.confirm(&host, port) {
                        Ok(()) => self.moved(&host, port, "+switch-master"),
                        Err(why) => {
                            log::warn!("+switch-master names {host}:{port}, but {why}");
                            self.master.suspect("an unconfirmed +switch-master");
                        }
                    }
                }
                Ok(())
            }
            Err(e) if e.is_timeout() => {
                if sub.heard.elapsed() > PING_EVERY * 3 {
                    return Err("no answer to PING".into());
                }
                if sub.pinged.elapsed() >= PING_EVERY {
                    sub.pinged = Instant::now();
                    let ping = redis::cmd("PING").get_packed_command();
                    std::io::Write::write_all(&mut sub.stream, &ping).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The master moved to (or was first found at) `host:port`.
    fn moved(&self, host: &str, port: u16, how: &str) {
        let Some(old) = self.master.set(host, port) else {
            return;
        };
        let name = &self.sentinel.master;
        match old {
            None => log::info!("master {name} is at {host}:{port} ({how})"),
            Some((old_host, old_port)) => {
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "master {name} moved from {old_host}:{old_port} to {host}:{port} ({how}); following it"
                );
                if let Some(freshness) = &self.freshness {
                    // The new master tracks nothing for us yet.
                    freshness.flush();
                }
            }
        }
    }

    /// Asks each Sentinel in turn, from the last that answered, and
    /// confirms the address it gives with `ROLE`.
    fn resolve(&mut self) -> Result<(Addr, &'static str), String> {
        let count = self.sentinel.sentinels.len();
        let mut errors = Vec::new();
        for i in 0..count {
            let index = (self.next + i) % count;
            let at = self.describe(index);
            match self.ask(index) {
                Ok((Some((host, port)), replicas)) => {
                    if !replicas.is_empty() {
                        self.replicas = replicas;
                    }
                    match self.confirm(&host, port) {
                        Ok(()) => {
                            self.next = index;
                            return Ok(((host, port), "Sentinel"));
                        }
                        Err(why) => errors.push(format!("{at} names {host}:{port}, but {why}")),
                    }
                }
                Ok((None, _)) => errors.push(format!(
                    "{at} knows no master named {:?}",
                    self.sentinel.master
                )),
                Err(why) => errors.push(format!("{at}: {why}")),
            }
        }
        // Sentinel names a promoted replica only once it has seen the
        // promotion in that replica's INFO, up to a second later: a replica
        // it listed that already answers ROLE master is where it is about to
        // point (the check HAProxy setups make). Only while what Sentinel
        // names is not a reachable master.
        for (host, port) in self.replicas.clone() {
            if self.confirm(&host, port).is_ok() {
                return Ok((
                    (host, port),
                    "a replica Sentinel listed says ROLE master, ahead of Sentinel's announcement",
                ));
            }
        }
        Err(errors.join("; "))
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on Sentinel `index`, and the
    /// replicas it knows (`SENTINEL REPLICAS`, in the same round trip).
    fn ask(&self, index: usize) -> Result<(Option<Addr>, Vec<Addr>), String> {
        let mut cmd = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.sentinel.master)
            .get_packed_command();
        redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(&self.sentinel.master)
            .write_packed_command(&mut cmd);
        let (_, mut replies) =
            connect::<StdSocket>(&self.sentinel_target(index), self.timeout, &cmd, 2)
                .map_err(|e| e.to_string())?;
        let replicas = replies.pop().map(replica_addresses).unwrap_or_default();
        let master = match replies.pop() {
            Some(Value::Nil) => Ok(None),
            Some(Value::Array(parts)) => match parts.as_slice() {
                [Value::BulkString(host), Value::BulkString(port)] => {
                    let host = String::from_utf8_lossy(host).into_owned();
                    let port = std::str::from_utf8(port)
                        .ok()
                        .and_then(|p| p.parse().ok())
                        .ok_or("a bad port in its answer")?;
                    Ok(Some((host, port)))
                }
                _ => Err(format!("an unexpected answer: {parts:?}")),
            },
            Some(Value::ServerError(err)) => Err(server_error_line(&err)),
            other => Err(format!("an unexpected answer: {other:?}")),
        }?;
        Ok((master, replicas))
    }

    /// `ROLE` at `host:port` (with `REDIS_URL`'s credentials) says `master`.
    fn confirm(&self, host: &str, port: u16) -> Result<(), String> {
        let target = RedisTarget {
            host: host.to_string(),
            port,
            ..self.base.clone()
        };
        let cmd = redis::cmd("ROLE").get_packed_command();
        let (_, mut replies) = connect::<StdSocket>(&target, self.timeout, &cmd, 1)
            .map_err(|e| format!("it cannot be reached: {e}"))?;
        match replies.pop() {
            Some(Value::Array(parts)) => match parts.first() {
                Some(Value::BulkString(role)) if role == b"master" => Ok(()),
                Some(Value::BulkString(role)) => Err(format!(
                    "it is a {}, not a master",
                    String::from_utf8_lossy(role)
                )),
                _ => Err("ROLE gave no role".into()),
            },
            Some(Value::ServerError(err)) => {
                Err(format!("ROLE failed: {}", server_error_line(&err)))
            }
            other => Err(format!("ROLE gave {other:?}")),
        }
    }

    /// Subscribes to `+switch-master` on the first Sentinel that lets it,
    /// from the last that answered.
    fn subscribe(&mut self) -> Option<Subscription> {
        let count = self.sentinel.sentinels.len();
        let cmd = redis::cmd("SUBSCRIBE")
            .arg(SWITCH_MASTER)
            .get_packed_command();
        let mut errors = Vec::new();
        for i in 0..count {
            let index = (self.next + i) % count;
            match connect::<StdSocket>(&self.sentinel_target(index), self.timeout, &cmd, 1) {
                Ok((conn, replies)) => {
                    if let Some(Value::ServerError(err)) = replies.first() {
                        errors.push(format!(
                            "{}: {}",
                            self.describe(index),
                            server_error_line(err)
                        ));
                        continue;
                    }
                    if conn.stream.set_read_timeout(Some(POLL)).is_err() {
                        continue;
                    }
                    log::info!(
                        "following master {} through Sentinel {}",
                        self.sentinel.master,
                        self.describe(index)
                    );
                    self.next = index;
                    return Some(Subscription {
                        stream: conn.stream,
                        parser: conn.parser,
                        sentinel: index,
                        heard: Instant::now(),
                        pinged: Instant::now(),
                    });
                }
                Err(e) => errors.push(format!("{}: {e}", self.describe(index))),
            }
        }
        self.warn(format!(
            "no Sentinel to subscribe to: {}",
            errors.join("; ")
        ));
        None
    }

    /// Sentinel `index` as a connect target: its own password, no db, and
    /// TLS when `REDIS_URL` is `rediss://`.
    fn sentinel_target(&self, index: usize) -> RedisTarget {
        let (host, port) = self.sentinel.sentinels[index].clone();
        RedisTarget {
            host,
            port,
            db: 0,
            username: None,
            password: self.sentinel.password.clone(),
            tls: self.base.tls.clone(),
        }
    }

    fn describe(&self, index: usize) -> String {
        let (host, port) = &self.sentinel.sentinels[index];
        format!("{host}:{port}")
    }

    fn warn(&mut self, line: String) {
        if self.warned.as_ref() != Some(&line) {
            log::warn!("{line}");
            self.warned = Some(line);
        }
    }
}

/// The `ip` and `port` of each replica in a `SENTINEL REPLICAS` reply (a
/// list of flat field-value lists; maps in RESP3).
fn replica_addresses(value: Value) -> Vec<(String, u16)> {
    let Value::Array(replicas) = value else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    replicas
        .iter()
        .filter_map(|replica| {
            let fields: Vec<(String, String)> = match replica {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
                    .collect(),
                Value::Map(pairs) => pairs
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                    .collect(),
                _ => return None,
            };
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            Some((field("ip")?.clone(), field("port")?.parse().ok()?))
        })
        .collect()
}

/// The new address in a `+switch-master` message for `name`:
/// `["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"]`.
fn switch_master(value: &Value, name: &str) -> Option<(String, u16)> {
    let Value::Array(parts) = value else {
        return None;
    };
    let [Value::BulkString(kind), Value::BulkString(channel), Value::BulkString(payload)] =
        parts.as_slice()
    else {
        return None;
    };
    if kind != b"message" || channel != SWITCH_MASTER.as_bytes() {
        return None;
    }
    let payload = std::str::from_utf8(payload).ok()?;
    let fields: Vec<&str> = payload.split_whitespace().collect();
    match fields.as_slice() {
        [n, _, _, host, port] if *n == name => Some((host.to_string(), port.parse().ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RedisTarget {
        RedisTarget {
            host: "ignored".into(),
            port: 1,
            db: 3,
            username: Some("u".into()),
            password: Some("p".into()),
            tls: None,
        }
    }

    /// `Unknown` gives no target; each move bumps the generation once and
    /// keeps the URL's credentials and db; the same address is no move.
    #[test]
    fn master_moves_bump_the_generation() {
        let m = Master::new(SentinelTarget {
            sentinels: vec![("127.0.0.1".into(), 26379)],
            master: "mymaster".into(),
            password: None,
        });
        assert!(m.target(&base()).is_none());
        assert_eq!(m.set("10.0.0.1", 6379), Some(None));
        let (t, g1) = m.target(&base()).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.db, g1),
            ("10.0.0.1", 6379, 3, 1)
        );
        assert_eq!(t.password.as_deref(), Some("p"));
        assert_eq!(m.set("10.0.0.1", 6379), None, "same address: no move");
        assert_eq!(
            m.set("10.0.0.2", 6380),
            Some(Some(("10.0.0.1".into(), 6379)))
        );
        assert_eq!(m.generation(), 2);
    }

    /// Replica addresses come out of `SENTINEL REPLICAS`' field lists.
    #[test]
    fn replica_addresses_from_sentinel_replicas() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("127.0.0.1:6380"),
                bulk("ip"),
                bulk("127.0.0.1"),
                bulk("port"),
                bulk("6380"),
            ]),
            Value::Array(vec![bulk("ip"), bulk("10.0.0.2")]),
        ]);
        assert_eq!(
            replica_addresses(reply),
            vec![("127.0.0.1".to_string(), 6380)]
        );
        assert!(replica_addresses(Value::Nil).is_empty());
    }

    /// Only a `+switch-master` for our master's name moves it.
    #[test]
    fn switch_master_messages() {
        let msg = |payload: &str| {
            Value::Array(vec![
                Value::BulkString(b"message".to_vec()),
                Value::BulkString(b"+switch-master".to_vec()),
                Value::BulkString(payload.as_bytes().to_vec()),
            ])
        };
        assert_eq!(
            switch_master(&msg("mymaster 127.0.0.1 6379 127.0.0.1 6380"), "mymaster"),
            Some(("127.0.0.1".into(), 6380))
        );
        assert_eq!(
            switch_master(&msg("other 127.0.0.1 6379 127.0.0.1 6380"), "mymaster"),
            None
        );
        assert_eq!(switch_master(&msg("mymaster short"), "mymaster"), None);
        assert_eq!(switch_master(&Value::Nil, "mymaster"), None);
    }
}
