//! backend: the connections to the one backing Redis, over may's
//! coroutine-aware sockets, with the redis crate's codec.
//!
//! Owns connecting (with a timeout), AUTH and SELECT, pipelining, the
//! per-request deadline, dropping a connection after a timeout, and
//! reconnecting with bounded, jittered backoff. Knows nothing of the cache or
//! of HTTP and RESP: it answers Redis values or a [`BackendError`].
//!
//! # Shape
//! One connection per worker (may_minihttp's techempower pattern). Each is
//! owned by one I/O coroutine, started with the worker's id so its socket sits
//! on that worker's poller; a caller picks `connections[fd % workers]`, so a
//! client socket and its Redis socket share a worker. The I/O coroutine takes
//! every queued job, writes them in one batch and hands the replies back in
//! order through each job's reply channel. A reply that does not arrive by
//! the job's deadline fails that job and every later one in the batch with
//! [`BackendError::Timeout`], and the connection is dropped: a late reply on
//! it would otherwise answer the wrong caller.

use std::fmt;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use may::net::TcpStream;
use may::sync::mpsc;
use redis::{Parser, Value};

use crate::config::RedisTarget;

/// Most jobs written in one batch.
const MAX_BATCH: usize = 256;
/// First pause after a failed connect; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(25);
/// Longest pause between connect attempts (plus up to 25 % jitter), short
/// enough that service resumes within a second of Redis returning.
const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// Stack for an I/O coroutine; the redis parser nests a few frames per value.
const IO_STACK_BYTES: usize = 256 * 1024;

/// Why a Redis request failed, classified by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No connection: refused, not established within the timeout, or lost.
    Unavailable(String),
    /// Connected, but no reply within the timeout.
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
}

/// Lets another module prepare each connection without the backend knowing
/// why (the tracking module uses it to keep CLIENT TRACKING on).
pub trait LinkHook: Send + Sync {
    /// Connection `index` was just established; `reconnect` is false for its
    /// first connection.
    fn connected(&self, index: usize, reconnect: bool);
    /// Called before each batch with the link's hook-owned token (0 on a new
    /// link): returns commands to send ahead of the batch and how many
    /// replies they produce. The token is updated only if they succeed.
    fn preamble(&self, token: i64) -> Option<(Vec<u8>, usize, i64)>;
    /// A preamble reply was an error or did not arrive.
    fn preamble_failed(&self, why: &str);
}

/// Settings of the connection set.
#[derive(Clone)]
pub struct BackendOptions {
    pub target: RedisTarget,
    pub connections: usize,
    pub timeout: Duration,
    pub hook: Option<Arc<dyn LinkHook>>,
}

type Reply = Result<Vec<Value>, BackendError>;

/// One key's outcome inside a pipelined multi-GET.
pub type GetResult = Result<Option<Vec<u8>>, BackendError>;

/// One batch member: packed commands and where their replies go.
struct Job {
    cmds: Vec<u8>,
    count: usize,
    deadline: Instant,
    reply: mpsc::Sender<Reply>,
}

/// The per-worker connections to Redis.
pub struct Backend {
    queues: Vec<mpsc::Sender<Job>>,
    timeout: Duration,
    stats: Arc<BackendStats>,
    /// True while at least the last connect attempt of any connection worked.
    up: Arc<AtomicBool>,
}

impl Backend {
    /// Starts one I/O coroutine per connection. Connections open lazily, on
    /// the first request, so a dead Redis does not stop the proxy starting.
    pub fn start(options: BackendOptions) -> Backend {
        let stats = Arc::new(BackendStats::default());
        let up = Arc::new(AtomicBool::new(false));
        let queues = (0..options.connections.max(1))
            .map(|index| {
                let (tx, rx) = mpsc::channel();
                let mut io = IoLoop::new(index, options.clone(), stats.clone(), up.clone());
                let builder = may::coroutine::Builder::new()
                    .name(format!("redis-io-{index}"))
                    .stack_size(IO_STACK_BYTES)
                    .id(index);
                may::go!(builder, move || io.run(rx)).expect("spawn redis I/O coroutine");
                tx
            })
            .collect();
        Backend {
            queues,
            timeout: options.timeout,
            stats,
            up,
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Number of connections (one per worker).
    pub fn connections(&self) -> usize {
        self.queues.len()
    }

    /// Sends `count` packed commands on connection `hint % connections` and
    /// waits (coroutine-aware) for their replies, in order. Error replies come
    /// back as `Value::ServerError` for the caller to judge.
    pub fn query(&self, hint: usize, cmds: Vec<u8>, count: usize) -> Reply {
        let (tx, rx) = mpsc::channel();
        let job = Job {
            cmds,
            count,
            deadline: Instant::now() + self.timeout,
            reply: tx,
        };
        let queue = &self.queues[hint % self.queues.len()];
        if queue.send(job).is_err() {
            return Err(BackendError::Unavailable("connection task stopped".into()));
        }
        rx.recv()
            .unwrap_or_else(|_| Err(BackendError::Unavailable("connection task stopped".into())))
    }

    /// Redis `GET key`: `Some(bytes)`, `None` when absent.
    pub fn get(&self, hint: usize, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        let cmd = redis::cmd("GET").arg(key).get_packed_command();
        let mut values = self.query(hint, cmd, 1)?;
        let value = values.pop().unwrap_or(Value::Nil);
        bulk_or_nil(value).inspect_err(|_| {
            self.stats.errors_reply.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// `GET` for each key in one pipelined round trip; absent keys and keys
    /// of another type read as `None`, as in Redis's MGET.
    pub fn get_many(&self, hint: usize, keys: &[&[u8]]) -> Result<Vec<GetResult>, BackendError> {
        let mut cmds = Vec::new();
        for key in keys {
            redis::cmd("GET").arg(*key).write_packed_command(&mut cmds);
        }
        let values = self.query(hint, cmds, keys.len())?;
        Ok(values.into_iter().map(bulk_or_nil).collect())
    }

    /// True when Redis answers PING within the timeout.
    pub fn ping(&self, hint: usize) -> bool {
        let cmd = redis::cmd("PING").get_packed_command();
        matches!(self.query(hint, cmd, 1).as_deref(), Ok([Value::SimpleString(s)]) if s == "PONG")
    }

    /// Whether the last connect attempt succeeded (for readiness hints only).
    pub fn seems_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// Interprets a GET reply.
pub fn bulk_or_nil(value: Value) -> Result<Option<Vec<u8>>, BackendError> {
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
pub fn server_error_line(err: &redis::ServerError) -> String {
    match err.details() {
        Some(details) => format!("{} {}", err.code(), details),
        None => err.code().to_string(),
    }
}

/// The live socket of one connection and its parser state.
struct Link {
    stream: TcpStream,
    parser: Parser,
    /// Whether a batch has completed on it: a failure on a link that worked
    /// before may just mean Redis closed it while idle, worth one retry.
    used: bool,
    /// Owned by the [`LinkHook`]; 0 on a new link.
    token: i64,
}

/// State of one I/O coroutine.
struct IoLoop {
    index: usize,
    options: BackendOptions,
    stats: Arc<BackendStats>,
    up: Arc<AtomicBool>,
    link: Option<Link>,
    connected_before: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
    rng: u64,
    write_buf: Vec<u8>,
}

impl IoLoop {
    fn new(
        index: usize,
        options: BackendOptions,
        stats: Arc<BackendStats>,
        up: Arc<AtomicBool>,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = now.as_nanos() as u64 ^ ((index as u64 + 1) * 0x9E37_79B9);
        IoLoop {
            index,
            options,
            stats,
            up,
            link: None,
            connected_before: false,
            backoff: MIN_BACKOFF,
            retry_at: None,
            rng: seed | 1,
            write_buf: Vec::with_capacity(16 * 1024),
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.serve(batch);
        }
    }

    fn serve(&mut self, mut batch: Vec<Job>) {
        let now = Instant::now();
        // A job already past its deadline (it waited behind a slow batch) is
        // not sent: its caller has been waiting the whole timeout.
        batch.retain(|job| {
            if job.deadline <= now {
                self.fail(job, BackendError::Timeout);
                false
            } else {
                true
            }
        });
        if batch.is_empty() {
            return;
        }
        for attempt in 0..2 {
            if let Err(err) = self.ensure_link() {
                for job in &batch {
                    self.fail(job, err.clone());
                }
                return;
            }
            let reused = self.link.as_ref().is_some_and(|l| l.used);
            match self.round_trip(&batch) {
                Ok(()) => return,
                Err(RoundTrip::Retry(why)) if attempt == 0 && reused => {
                    log::debug!(
                        "redis connection {} went stale ({why}); retrying",
                        self.index
                    );
                    self.link = None;
                }
                Err(RoundTrip::Retry(why)) => {
                    self.drop_link(&why);
                    for job in &batch {
                        self.fail(job, BackendError::Unavailable(why.clone()));
                    }
                    return;
                }
                Err(RoundTrip::Done) => return,
            }
        }
    }

    /// Writes the batch and delivers replies. `Retry` means nothing was
    /// delivered yet and the connection failed (safe to resend); `Done` means
    /// every job got an answer (some may be errors).
    fn round_trip(&mut self, batch: &[Job]) -> Result<(), RoundTrip> {
        self.write_buf.clear();
        let mut commands = 0;
        let preamble = match &self.options.hook {
            Some(hook) => hook.preamble(self.link.as_ref().map_or(0, |l| l.token)),
            None => None,
        };
        if let Some((cmds, _, _)) = &preamble {
            self.write_buf.extend_from_slice(cmds);
        }
        for job in batch {
            self.write_buf.extend_from_slice(&job.cmds);
            commands += job.count;
        }
        let timeout = self.options.timeout;
        let link = self.link.as_mut().expect("link ensured");
        link.stream.set_write_timeout(Some(timeout)).ok();
        if let Err(e) = link.stream.write_all(&self.write_buf) {
            return Err(RoundTrip::Retry(format!("write failed: {e}")));
        }
        self.stats
            .requests
            .fetch_add(commands as u64, Ordering::Relaxed);
        if let Some((_, count, token)) = preamble {
            self.read_preamble(count, token, batch)?;
        }
        for (i, job) in batch.iter().enumerate() {
            let mut values = Vec::with_capacity(job.count);
            for _ in 0..job.count {
                let link = self.link.as_mut().expect("link ensured");
                let left = job.deadline.saturating_duration_since(Instant::now());
                let left = left.max(Duration::from_millis(1));
                link.stream.set_read_timeout(Some(left)).ok();
                match link.parser.parse_value(&mut link.stream) {
                    Ok(value) => values.push(value),
                    Err(e) if e.is_timeout() => {
                        self.drop_link("reply timed out");
                        for job in &batch[i..] {
                            self.fail(job, BackendError::Timeout);
                        }
                        return Err(RoundTrip::Done);
                    }
                    Err(e) => {
                        let why = format!("connection lost: {e}");
                        if i == 0 && values.is_empty() {
                            return Err(RoundTrip::Retry(why));
                        }
                        self.drop_link(&why);
                        for job in &batch[i..] {
                            self.fail(job, BackendError::Unavailable(why.clone()));
                        }
                        return Err(RoundTrip::Done);
                    }
                }
            }
            job.reply.send(Ok(values)).ok();
        }
        if let Some(link) = self.link.as_mut() {
            link.used = true;
        }
        Ok(())
    }

    /// Reads the hook's preamble replies; on success the link takes `token`.
    fn read_preamble(&mut self, count: usize, token: i64, batch: &[Job]) -> Result<(), RoundTrip> {
        let hook = self.options.hook.clone().expect("preamble implies a hook");
        let deadline = batch
            .iter()
            .map(|j| j.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        let mut ok = true;
        for _ in 0..count {
            let link = self.link.as_mut().expect("link ensured");
            let left = deadline.saturating_duration_since(Instant::now());
            link.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok();
            match link.parser.parse_value(&mut link.stream) {
                Ok(Value::ServerError(err)) => {
                    hook.preamble_failed(&server_error_line(&err));
                    ok = false;
                }
                Ok(_) => {}
                Err(e) if e.is_timeout() => {
                    hook.preamble_failed("reply timed out");
                    self.drop_link("reply timed out");
                    for job in batch {
                        self.fail(job, BackendError::Timeout);
                    }
                    return Err(RoundTrip::Done);
                }
                Err(e) => {
                    hook.preamble_failed(&e.to_string());
                    return Err(RoundTrip::Retry(format!("connection lost: {e}")));
                }
            }
        }
        if ok {
            if let Some(link) = self.link.as_mut() {
                link.token = token;
            }
        }
        Ok(())
    }

    fn ensure_link(&mut self) -> Result<(), BackendError> {
        if self.link.is_some() {
            return Ok(());
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Err(BackendError::Unavailable("reconnecting".into()));
            }
        }
        match self.connect() {
            Ok(link) => {
                if self.connected_before {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if !self.up.swap(true, Ordering::Relaxed) || self.retry_at.is_some() {
                    log::info!(
                        "redis connection {} up ({})",
                        self.index,
                        self.options.target
                    );
                }
                if let Some(hook) = &self.options.hook {
                    hook.connected(self.index, self.connected_before);
                }
                self.connected_before = true;
                self.backoff = MIN_BACKOFF;
                self.retry_at = None;
                self.link = Some(link);
                Ok(())
            }
            Err(why) => {
                if self.retry_at.is_none() {
                    log::warn!(
                        "redis connection {} to {} failed: {why}",
                        self.index,
                        self.options.target
                    );
                }
                self.up.store(false, Ordering::Relaxed);
                let jitter = self.next_jitter(self.backoff / 4);
                self.retry_at = Some(Instant::now() + self.backoff + jitter);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Err(BackendError::Unavailable(why))
            }
        }
    }

    fn connect(&mut self) -> Result<Link, String> {
        let target = &self.options.target;
        let timeout = self.options.timeout;
        let addr = resolve(&target.host, target.port)?;
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        let mut link = Link {
            stream,
            parser: Parser::new(),
            used: false,
            token: 0,
        };
        let mut setup = Vec::new();
        let mut replies = 0;
        if let Some(password) = &target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &target.username {
                auth.arg(user);
            }
            auth.arg(password).write_packed_command(&mut setup);
            replies += 1;
        }
        if target.db != 0 {
            redis::cmd("SELECT")
                .arg(target.db)
                .write_packed_command(&mut setup);
            replies += 1;
        }
        if replies == 0 {
            return Ok(link);
        }
        link.stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        link.stream
            .write_all(&setup)
            .map_err(|e| format!("setup write failed: {e}"))?;
        link.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        for _ in 0..replies {
            match link.parser.parse_value(&mut link.stream) {
                Ok(Value::ServerError(err)) => {
                    return Err(format!("setup refused: {}", server_error_line(&err)))
                }
                Ok(_) => {}
                Err(e) => return Err(format!("setup failed: {e}")),
            }
        }
        Ok(link)
    }

    fn drop_link(&mut self, why: &str) {
        if self.link.take().is_some() {
            log::debug!("redis connection {} dropped: {why}", self.index);
        }
    }

    fn fail(&self, job: &Job, err: BackendError) {
        let counter = match err {
            BackendError::Unavailable(_) => &self.stats.errors_unavailable,
            BackendError::Timeout => &self.stats.errors_timeout,
            BackendError::Reply(_) => &self.stats.errors_reply,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        job.reply.send(Err(err)).ok();
    }

    fn next_jitter(&mut self, max: Duration) -> Duration {
        // xorshift64: jitter only needs to de-synchronise connections.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let nanos = max.as_nanos() as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { self.rng % nanos })
    }
}

enum RoundTrip {
    Retry(String),
    Done,
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))
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
