//! One node: per-worker pipelined connections to one Redis.
//!
//! One connection per worker (may_minihttp's techempower pattern). Each is
//! owned by one I/O coroutine, started with the worker's id so its socket sits
//! on that worker's poller; a caller's hint picks `connections[fd % workers]`,
//! so a client socket and its Redis socket share a worker. The I/O coroutine
//! takes every queued job, writes them in one batch and hands the replies back
//! in order through each job's reply channel. A reply that does not arrive by
//! the job's deadline fails that job and every later one in the batch with
//! [`BackendError::Timeout`], and the connection is dropped: a late reply on
//! it would otherwise answer the wrong caller.
//!
//! With tracking, each connection keeps `CLIENT TRACKING ON REDIRECT <id>`
//! on (sent ahead of the next batch whenever the listener's id changed) and
//! reports a reopened link and a failed `CLIENT TRACKING` into the
//! [`Freshness`] state; that is all it knows of coherence.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use may::net::TcpStream;
use may::sync::mpsc;
use redis::{Parser, Value};

use super::connect::{connect, ConnectError};
use super::{server_error_line, BackendError, BackendOptions, BackendStats};
use crate::coherence::Freshness;

/// Most jobs written in one batch.
const MAX_BATCH: usize = 256;
/// First pause after a failed connect; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(25);
/// Longest pause between connect attempts (plus up to 25 % jitter), short
/// enough that service resumes within a second of Redis returning.
const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// Stack for an I/O coroutine; the redis parser nests a few frames per value.
const IO_STACK_BYTES: usize = 256 * 1024;

type Reply = Result<Vec<Value>, BackendError>;

/// One batch member: packed commands and where their replies go.
struct Job {
    cmds: Vec<u8>,
    count: usize,
    deadline: Instant,
    reply: mpsc::Sender<Reply>,
}

/// One node's per-worker connections.
pub struct Node {
    queues: Vec<mpsc::Sender<Job>>,
    timeout: Duration,
}

impl Node {
    /// Starts one I/O coroutine per connection; each connects on its first job.
    pub(crate) fn start(options: &BackendOptions, stats: Arc<BackendStats>) -> Node {
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
        Node {
            queues,
            timeout: options.timeout,
        }
    }

    /// Sends `count` packed commands on connection `hint % connections` and
    /// waits (coroutine-aware) for their replies, in order. Error replies come
    /// back as `Value::ServerError` for the caller to judge.
    pub(crate) fn query(&self, hint: usize, cmds: Vec<u8>, count: usize) -> Reply {
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
}

/// The live socket of one connection and its parser state.
struct Link {
    stream: TcpStream,
    parser: Parser,
    /// Whether a batch has completed on it: a failure on a link that worked
    /// before may just mean Redis closed it while idle, worth one retry.
    used: bool,
    /// The invalidation client id this link redirects its tracking to.
    tracking: Option<i64>,
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
    /// What jobs get while waiting for `retry_at`: the last connect's
    /// failure (a stalled handshake stays a timeout).
    retry_error: BackendError,
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
            retry_error: BackendError::Unavailable("reconnecting".into()),
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
                self.fail_all(&batch, err.clone());
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
                    self.fail_all(&batch, BackendError::Unavailable(why.clone()));
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
        let preamble = self.tracking_preamble();
        if let Some(id) = preamble {
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("REDIRECT")
                .arg(id)
                .write_packed_command(&mut self.write_buf);
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
        if let Some(id) = preamble {
            self.read_preamble(id, batch)?;
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
                        self.fail_all(&batch[i..], BackendError::Timeout);
                        return Err(RoundTrip::Done);
                    }
                    Err(e) => {
                        let why = format!("connection lost: {e}");
                        if i == 0 && values.is_empty() {
                            return Err(RoundTrip::Retry(why));
                        }
                        self.drop_link(&why);
                        self.fail_all(&batch[i..], BackendError::Unavailable(why.clone()));
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

    /// The invalidation client id to redirect tracking to, when this link
    /// does not track into it yet.
    fn tracking_preamble(&self) -> Option<i64> {
        let freshness = self.options.freshness.as_ref()?;
        let id = freshness.redirect()?;
        let link = self.link.as_ref()?;
        (link.tracking != Some(id)).then_some(id)
    }

    /// Reads the `CLIENT TRACKING` reply; on success the link tracks into `id`.
    fn read_preamble(&mut self, id: i64, batch: &[Job]) -> Result<(), RoundTrip> {
        let freshness: Arc<dyn Freshness> = self
            .options
            .freshness
            .clone()
            .expect("preamble implies tracking");
        let deadline = batch
            .iter()
            .map(|j| j.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        let link = self.link.as_mut().expect("link ensured");
        let left = deadline.saturating_duration_since(Instant::now());
        link.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok();
        match link.parser.parse_value(&mut link.stream) {
            Ok(Value::ServerError(err)) => freshness.tracking_failed(&server_error_line(&err)),
            Ok(_) => link.tracking = Some(id),
            Err(e) if e.is_timeout() => {
                freshness.tracking_failed("reply timed out");
                self.drop_link("reply timed out");
                self.fail_all(batch, BackendError::Timeout);
                return Err(RoundTrip::Done);
            }
            Err(e) => {
                freshness.tracking_failed(&e.to_string());
                return Err(RoundTrip::Retry(format!("connection lost: {e}")));
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
                return Err(self.retry_error.clone());
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
                if self.connected_before {
                    // Redis dropped what it tracked for the old connection.
                    if let Some(freshness) = &self.options.freshness {
                        freshness.data_link_reopened(self.index);
                    }
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
                let err = BackendError::from(why);
                self.retry_error = match err {
                    BackendError::Timeout => BackendError::Timeout,
                    _ => BackendError::Unavailable("reconnecting".into()),
                };
                let jitter = self.next_jitter(self.backoff / 4);
                self.retry_at = Some(Instant::now() + self.backoff + jitter);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Err(err)
            }
        }
    }

    fn connect(&self) -> Result<Link, ConnectError> {
        let (conn, _) = connect::<TcpStream>(&self.options.target, self.options.timeout, &[], 0)?;
        Ok(Link {
            stream: conn.stream,
            parser: conn.parser,
            used: false,
            tracking: None,
        })
    }

    fn drop_link(&mut self, why: &str) {
        if self.link.take().is_some() {
            log::debug!("redis connection {} dropped: {why}", self.index);
        }
    }

    /// Fails every job of `jobs` with `err`.
    fn fail_all(&self, jobs: &[Job], err: BackendError) {
        for job in jobs {
            self.fail(job, err.clone());
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
