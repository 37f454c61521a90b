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
//! A pass-through job (`Cmd::Raw`) writes the client's packed commands and
//! answers the reply frames' bytes, cut out of the read buffer by
//! `frame_len` and copied, never parsed into a `Value`. RESP3 clients' jobs
//! go to a second set of I/O coroutines whose connections open with
//! `HELLO 3`, started on the first such job; same batching, deadlines and
//! drop-after-timeout, no tracking (they fill no cache).
//!
//! With tracking, each connection keeps `CLIENT TRACKING ON REDIRECT <id>`
//! on (sent ahead of the next batch whenever the listener's id changed) and
//! reports a reopened link and a failed `CLIENT TRACKING` into the
//! [`Freshness`] state; that is all it knows of coherence.
//!
//! A link is a `connect::DataStream`, plain TCP or TLS, read the same way.
//! With Sentinel the node's address can change: a connection takes it from
//! the shared `sentinel::Master` when it connects, drops a link opened at an
//! older address before its next batch, and reports what suggests the
//! address is stale (a lost link, a failed connect, `-READONLY`).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use may::net::TcpStream;
use may::sync::{mpsc, Blocker};
use redis::Value;

use super::connect::{connect_speaking, ConnectError, DataStream};
use super::{
    bulk_or_nil, server_error_line, BackendError, BackendOptions, BackendStats, GetResult, Pass,
    Protocol,
};
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
/// In push mode, how long an idle link waits for a job before it looks
/// for the pushes Redis sent meanwhile: about the longest a `>invalidate`
/// waits unread on an idle link (the cache serves the old value that long).
const IDLE_POLL: Duration = Duration::from_millis(2);
/// Read buffer of a link; grows for a reply larger than this, and shrinks
/// back once that reply is consumed.
const READ_BUF_BYTES: usize = 16 * 1024;

/// What a job asks for. `Get` and `GetMany` borrow the caller's keys
/// instead of copying them: the caller stays parked until its job is
/// answered (see [`Job`]), so the keys outlive every read of them, and the
/// packed `GET` is written straight into the batch buffer.
enum Cmd {
    Get(*const u8, usize),
    GetMany(*const &'static [u8], usize),
    Packed(Vec<u8>, usize),
    /// A pass-through: the caller's packed commands (borrowed as keys
    /// are), how many replies they produce, how many of those to drop.
    Raw {
        ptr: *const u8,
        len: usize,
        replies: usize,
        skip: usize,
    },
}

impl Cmd {
    /// How many replies the job's commands produce.
    fn count(&self) -> usize {
        match self {
            Cmd::Get(..) => 1,
            Cmd::GetMany(_, n) | Cmd::Packed(_, n) => *n,
            Cmd::Raw { replies, .. } => *replies,
        }
    }

    /// Writes the job's commands into the batch buffer.
    ///
    /// Only called while the job is unanswered, when its caller is still
    /// parked in [`Node::submit`] with the keys borrowed.
    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            // SAFETY: the caller's key, alive while it is parked (above).
            Cmd::Get(ptr, len) => write_get(buf, unsafe { std::slice::from_raw_parts(*ptr, *len) }),
            Cmd::GetMany(ptr, n) => {
                // SAFETY: the caller's key list, alive while it is parked.
                for key in unsafe { std::slice::from_raw_parts(*ptr, *n) } {
                    write_get(buf, key);
                }
            }
            Cmd::Packed(cmds, _) => buf.extend_from_slice(cmds),
            Cmd::Raw { ptr, len, .. } => {
                // SAFETY: the caller's commands, alive while it is parked.
                let cmds = unsafe { std::slice::from_raw_parts(*ptr, *len) };
                buf.extend_from_slice(cmds)
            }
        }
    }
}

/// What a job's commands answered.
pub(crate) enum Answer {
    One(GetResult),
    Many(Vec<GetResult>),
    Values(Vec<Value>),
    /// Reply frames as Redis sent them.
    Raw(Vec<u8>),
}

type Reply = Result<Answer, BackendError>;

/// Where the I/O coroutine leaves a job's answer and wakes its caller: one
/// small allocation per request (a may channel per request allocated and
/// zeroed a queue block, ~1.6 % of an all-miss profile).
struct Slot {
    reply: Mutex<Option<Reply>>,
    done: AtomicBool,
    blocker: Blocker,
}

/// One batch member: what to send and where the answer goes. Dropping a job
/// that was never answered answers it `Unavailable`, so no caller is left
/// parked (and borrowed keys are never read after their caller returned).
struct Job {
    cmd: Cmd,
    deadline: Instant,
    slot: Arc<Slot>,
}

// SAFETY: the raw key pointers are only read while the caller that lent
// them is parked waiting for this job (see `Cmd`), from whichever thread
// runs the I/O coroutine; `&[u8]` is `Sync`.
unsafe impl Send for Job {}

impl Job {
    fn answer(&self, reply: Reply) {
        if self.slot.done.load(Ordering::Acquire) {
            return;
        }
        *self.slot.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply);
        self.slot.done.store(true, Ordering::Release);
        self.slot.blocker.unpark();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.answer(Err(stopped()));
    }
}

fn stopped() -> BackendError {
    BackendError::Unavailable("connection task stopped".into())
}

/// One node's per-worker connections.
pub struct Node {
    queues: Vec<mpsc::Sender<Job>>,
    /// A second set speaking RESP3 (`HELLO 3`), started on first use, that
    /// serves RESP3 clients' pass-through so replies need no conversion.
    resp3: OnceLock<Vec<mpsc::Sender<Job>>>,
    /// In push mode the main set speaks RESP3: RESP2 clients'
    /// pass-through goes to this untracked RESP2 set, started on first use.
    resp2: OnceLock<Vec<mpsc::Sender<Job>>>,
    freshness: Option<Arc<dyn Freshness>>,
    /// What the RESP3 set is started with (boxed: a topology holds nodes
    /// by value, and this is most of one).
    set: Box<SetOptions>,
    timeout: Duration,
}

impl Node {
    /// Starts one I/O coroutine per connection; each connects on its first job.
    pub(crate) fn start(options: &BackendOptions, stats: Arc<BackendStats>) -> Node {
        let set = SetOptions {
            options: options.clone(),
            stats,
            open: Arc::new(AtomicI64::new(0)),
            warned: Arc::new(Mutex::new(None)),
        };
        Node {
            queues: set.start(2),
            resp3: OnceLock::new(),
            resp2: OnceLock::new(),
            freshness: options.freshness.clone(),
            timeout: options.timeout,
            set: Box::new(SetOptions {
                // The RESP3 set fills no cache, so it needs no tracking.
                options: BackendOptions {
                    freshness: None,
                    ..options.clone()
                },
                ..set
            }),
        }
    }

    /// The gauge of this node's open connections.
    pub(crate) fn open_connections(&self) -> Arc<AtomicI64> {
        self.set.open.clone()
    }

    /// Relays `cmd` on connection `hint % connections` of the set for its
    /// protocol; answers the reply frames after the first `skip`, as sent.
    pub(crate) fn relay(&self, hint: usize, cmd: &Pass<'_>) -> Result<Vec<u8>, BackendError> {
        let queues = match cmd.protocol {
            Protocol::Resp2 if self.freshness.as_ref().is_some_and(|f| f.push_mode()) => {
                self.resp2.get_or_init(|| self.set.start(2))
            }
            Protocol::Resp2 => &self.queues,
            Protocol::Resp3 => self.resp3.get_or_init(|| self.set.start(3)),
        };
        let raw = Cmd::Raw {
            ptr: cmd.commands.as_ptr(),
            len: cmd.commands.len(),
            replies: cmd.replies,
            skip: cmd.skip,
        };
        match self.submit_on(queues, hint, raw)? {
            Answer::Raw(bytes) => Ok(bytes),
            _ => Err(stopped()),
        }
    }

    /// `GET key` on connection `hint % connections`.
    pub(crate) fn get(&self, hint: usize, key: &[u8]) -> Result<GetResult, BackendError> {
        match self.submit(hint, Cmd::Get(key.as_ptr(), key.len()))? {
            Answer::One(result) => Ok(result),
            _ => Err(stopped()),
        }
    }

    /// `GET` of each key, written in one batch, answered in order.
    pub(crate) fn get_many(
        &self,
        hint: usize,
        keys: &[&[u8]],
    ) -> Result<Vec<GetResult>, BackendError> {
        // The lifetime is erased only for the time the caller is parked.
        let ptr = keys.as_ptr().cast::<&'static [u8]>();
        match self.submit(hint, Cmd::GetMany(ptr, keys.len()))? {
            Answer::Many(results) => Ok(results),
            _ => Err(stopped()),
        }
    }

    /// Sends `count` packed commands and waits (coroutine-aware) for their
    /// replies, in order. Error replies come back as `Value::ServerError`
    /// for the caller to judge.
    pub(crate) fn query(
        &self,
        hint: usize,
        cmds: Vec<u8>,
        count: usize,
    ) -> Result<Vec<Value>, BackendError> {
        match self.submit(hint, Cmd::Packed(cmds, count))? {
            Answer::Values(values) => Ok(values),
            _ => Err(stopped()),
        }
    }

    /// Queues one job and parks until the I/O coroutine answers it. The park
    /// ignores cancellation: returning early would free keys the job still
    /// points at.
    fn submit(&self, hint: usize, cmd: Cmd) -> Reply {
        self.submit_on(&self.queues, hint, cmd)
    }

    fn submit_on(&self, queues: &[mpsc::Sender<Job>], hint: usize, cmd: Cmd) -> Reply {
        let slot = Arc::new(Slot {
            reply: Mutex::new(None),
            done: AtomicBool::new(false),
            blocker: Blocker::new(true),
        });
        let job = Job {
            cmd,
            deadline: Instant::now() + self.timeout,
            slot: slot.clone(),
        };
        let queue = &queues[hint % queues.len()];
        // A refused job is dropped with the error, which answers it.
        let _ = queue.send(job);
        while !slot.done.load(Ordering::Acquire) {
            slot.blocker.park(None).ok();
        }
        let reply = slot.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
        reply.unwrap_or_else(|| Err(stopped()))
    }
}

/// Starts one I/O coroutine per connection, speaking RESP `protocol`;
/// each connects on its first job.
struct SetOptions {
    options: BackendOptions,
    stats: Arc<BackendStats>,
    /// Connections open now, both sets together (a gauge per node).
    open: Arc<AtomicI64>,
    warned: Arc<Mutex<Option<String>>>,
}

impl SetOptions {
    /// Starts one I/O coroutine per connection speaking RESP `protocol`;
    /// each connects on its first job.
    fn start(&self, protocol: u8) -> Vec<mpsc::Sender<Job>> {
        let up = Arc::new(AtomicBool::new(false));
        (0..self.options.connections.max(1))
            .map(|index| {
                let (tx, rx) = mpsc::channel();
                let mut io =
                    IoLoop::new(index, self.options.clone(), self.stats.clone(), up.clone());
                io.protocol = protocol;
                io.open = self.open.clone();
                io.warned = self.warned.clone();
                let builder = may::coroutine::Builder::new()
                    .name(format!("redis-io-{index}"))
                    .stack_size(IO_STACK_BYTES)
                    .id(index);
                may::go!(builder, move || io.run(rx)).expect("spawn redis I/O coroutine");
                tx
            })
            .collect()
    }
}

/// Packs `GET key` into `buf`, as the redis crate would.
fn write_get(buf: &mut Vec<u8>, key: &[u8]) {
    buf.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$");
    buf.extend_from_slice(itoa_buf(key.len()).as_slice());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(key);
    buf.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n`, without allocating.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: usize) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// The live socket of one connection and its read state.
struct Link {
    stream: DataStream,
    reader: Reader,
    /// Whether a batch has completed on it: a failure on a link that worked
    /// before may just mean Redis closed it while idle, worth one retry.
    used: bool,
    /// How this link tracks, once Redis said yes.
    tracking: Option<Tracked>,
    /// The RESP version it speaks (3 after `HELLO 3`).
    protocol: u8,
    _open: OpenGuard,
}

/// How a link has `CLIENT TRACKING` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// `REDIRECT <id>` to the invalidation connection.
    Redirect(i64),
    /// Without REDIRECT, on RESP3: invalidations come as pushes on it.
    Pushes,
}

/// Counts a link in its node's open-connections gauge while it lives.
struct OpenGuard(Arc<AtomicI64>);

impl OpenGuard {
    fn new(gauge: &Arc<AtomicI64>) -> OpenGuard {
        gauge.fetch_add(1, Ordering::Relaxed);
        OpenGuard(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A link's read buffer and the socket read timeout last set on it.
///
/// Deadlines without a syscall per reply: may applies the socket's read
/// timeout to each read that has to wait, and setting it is a
/// `setsockopt`. The timeout last set is kept and only lowered when a read
/// could otherwise end more than `slack` after the oldest waiting job's
/// deadline; a read that times out before that deadline (the timeout was
/// set for an older job) sets the true remainder and reads again. Under a
/// steady load the timeout stays put and no reply costs a syscall for it.
struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read_timeout: Duration,
    slack: Duration,
    /// In push mode: where `>` push frames go. They are applied where they
    /// are read, so before any reply behind them is delivered, and never
    /// taken for a reply.
    pushes: Option<Arc<dyn Freshness>>,
}

impl Reader {
    fn new(timeout: Duration) -> Reader {
        Reader {
            buf: vec![0; READ_BUF_BYTES],
            start: 0,
            end: 0,
            read_timeout: timeout,
            slack: (timeout / 16).clamp(Duration::from_millis(1), Duration::from_millis(50)),
            pushes: None,
        }
    }

    /// Reads at least one more byte, or fails by `deadline`.
    fn fill(&mut self, stream: &mut DataStream, deadline: Instant) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // A large bulk reply announces its size: grow once to fit
                // it rather than doubling (and copying) a dozen times.
                let len = (self.buf.len() * 2).max(bulk_frame_len(&self.buf[..self.end]));
                self.buf.resize(len, 0);
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if self.read_timeout > left + self.slack {
                self.set_timeout(stream, left)?;
            }
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed by redis",
                    ))
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if is_timeout(&e) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left < Duration::from_millis(1) {
                        return Err(e);
                    }
                    self.set_timeout(stream, left)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn set_timeout(&mut self, stream: &DataStream, left: Duration) -> io::Result<()> {
        let left = left.max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left))?;
        self.read_timeout = left;
        Ok(())
    }

    /// The next whole reply frame, reading as needed; in push mode, push
    /// frames before it are applied and skipped.
    fn frame(&mut self, stream: &mut DataStream, deadline: Instant) -> io::Result<(usize, usize)> {
        loop {
            if let Some(len) = frame_len(&self.buf[self.start..self.end])? {
                let at = self.start;
                self.start += len;
                if self.buf[at] == b'>' {
                    if let Some(freshness) = &self.pushes {
                        apply_push(freshness.as_ref(), &self.buf[at..at + len])?;
                        continue;
                    }
                }
                return Ok((at, len));
            }
            self.fill(stream, deadline)?;
        }
    }

    /// Applies the whole push frames at the front of the buffer; true when
    /// nothing else is left (a push cut short waits for its rest).
    fn drain_pushes(&mut self) -> io::Result<bool> {
        let Some(freshness) = self.pushes.clone() else {
            return Ok(self.start == self.end);
        };
        while self.start < self.end && self.buf[self.start] == b'>' {
            let Some(len) = frame_len(&self.buf[self.start..self.end])? else {
                return Ok(true);
            };
            let at = self.start;
            self.start += len;
            apply_push(freshness.as_ref(), &self.buf[at..at + len])?;
        }
        Ok(self.start == self.end)
    }

    /// On an idle link in push mode: when bytes wait on the socket, reads
    /// them (by `deadline`, for the rest of a record cut short) and applies
    /// their pushes. Anything but a push (or a lost link) is an error.
    ///
    /// The socket is asked first, without a read timeout: may's I/O timer
    /// races a read that times out just as bytes arrive (a panic in its
    /// epoll loop), which a 1 ms timed read on every idle tick provoked.
    fn poll_pushes(&mut self, stream: &mut DataStream, deadline: Instant) -> io::Result<()> {
        if !stream.has_input()? {
            return Ok(());
        }
        self.fill(stream, deadline)?;
        if self.drain_pushes()? {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected bytes on an idle connection",
            ))
        }
    }

    /// The next reply as a GET answer: bulk bytes, nil, or what Redis said
    /// instead (an error line, another type), without building a `Value`
    /// for the common cases.
    fn get_reply(&mut self, stream: &mut DataStream, deadline: Instant) -> io::Result<GetResult> {
        let (at, len) = self.frame(stream, deadline)?;
        let frame = &self.buf[at..at + len];
        match frame[0] {
            b'$' if frame[1] != b'-' => {
                let header = frame.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
                Ok(Ok(Some(frame[header..len - 2].to_vec())))
            }
            b'$' | b'_' => Ok(Ok(None)),
            _ => Ok(bulk_or_nil(self.value_of(at, len)?)),
        }
    }

    /// The next reply as a `Value` (the redis crate's parser, for the
    /// commands other than GET).
    fn value(&mut self, stream: &mut DataStream, deadline: Instant) -> io::Result<Value> {
        let (at, len) = self.frame(stream, deadline)?;
        self.value_of(at, len)
    }

    fn value_of(&self, at: usize, len: usize) -> io::Result<Value> {
        redis::parse_redis_value(&self.buf[at..at + len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// After a batch: true when nothing unasked-for was left in the buffer
    /// (in push mode, pushes after the last reply are applied here).
    fn settle(&mut self) -> bool {
        let clean = self.drain_pushes().unwrap_or(false);
        if self.buf.len() > READ_BUF_BYTES && self.start == self.end {
            self.buf = vec![0; READ_BUF_BYTES];
            self.start = 0;
            self.end = 0;
        }
        clean
    }
}

/// The whole length of a bulk reply whose header is at the start of `buf`
/// (0 when there is none): how much buffer the frame needs.
fn bulk_frame_len(buf: &[u8]) -> usize {
    if buf.first() != Some(&b'$') {
        return 0;
    }
    let Some(nl) = buf.iter().take(24).position(|&b| b == b'\n') else {
        return 0;
    };
    std::str::from_utf8(&buf[1..nl.saturating_sub(1).max(1)])
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(0, |n| nl + 1 + n + 2)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// Applies one `>` push frame: `>invalidate` with its keys, or with a null
/// (a flush). Other pushes are not the cache's business.
fn apply_push(freshness: &dyn Freshness, frame: &[u8]) -> io::Result<()> {
    let value = redis::parse_redis_value(frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let Value::Push {
        kind: redis::PushKind::Invalidate,
        data,
    } = value
    else {
        return Ok(());
    };
    match data.first() {
        Some(Value::Array(keys)) => {
            let keys: Vec<&[u8]> = keys
                .iter()
                .filter_map(|k| match k {
                    Value::BulkString(k) => Some(k.as_slice()),
                    _ => None,
                })
                .collect();
            freshness.pushed(Some(&keys));
        }
        _ => freshness.pushed(None),
    }
    Ok(())
}

/// Whether an error reply to `CLIENT TRACKING ON REDIRECT <id>` means the
/// server refuses REDIRECT itself (Redis Cloud, Redis Software), not that
/// the listener's id went stale (`-ERR The client ID you want redirect to
/// does not exist`, a race with a listener reconnect).
pub(crate) fn refuses_redirect(error_line: &str) -> bool {
    !error_line.contains("does not exist")
}

/// The length of the first whole RESP2/RESP3 frame in `buf`, `None` when
/// more bytes are needed. Iterative, so nesting cannot exhaust the stack.
pub(super) fn frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed reply from redis");
    let mut pos = 0;
    let mut pending: u64 = 1;
    while pending > 0 {
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line_end = pos + nl + 1;
        // A type byte, then the line, then "\r\n".
        if nl < 2 || buf[line_end - 2] != b'\r' {
            return Err(bad());
        }
        let digits = &buf[pos + 1..line_end - 2];
        let number = || -> io::Result<i64> {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        pending -= 1;
        pos = line_end;
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            b'$' | b'!' | b'=' => {
                let n = number()?;
                if n >= 0 {
                    pos += n as usize + 2;
                    if pos > buf.len() {
                        return Ok(None);
                    }
                }
            }
            b'*' | b'~' | b'>' => {
                let n = number()?;
                if n > 0 {
                    pending += n as u64;
                }
            }
            b'%' => pending += 2 * number()?.max(0) as u64,
            // Attributes come before the value they describe.
            b'|' => pending += 2 * number()?.max(0) as u64 + 1,
            _ => return Err(bad()),
        }
    }
    Ok(Some(pos))
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
    open: Arc<AtomicI64>,
    /// With Sentinel (`options.master`), the link was opened at this
    /// generation of the master's address.
    link_generation: u64,
    /// The last connect failure logged for this node: each reason is logged
    /// once for all its connections, not once per connection and attempt.
    warned: Arc<Mutex<Option<String>>>,
    /// The RESP version the link speaks (2, or 3 after `HELLO 3`).
    protocol: u8,
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
            open: Arc::default(),
            link_generation: 0,
            warned: Arc::new(Mutex::new(None)),
            protocol: 2,
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            // An idle link that takes pushes is read every IDLE_POLL.
            let first = if self.takes_pushes() {
                match rx.recv_timeout(IDLE_POLL) {
                    Ok(job) => job,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.poll_pushes();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.serve(&mut batch);
            // Every job is answered by now; dropping them is a no-op.
            batch.clear();
        }
    }

    /// Whether the link is up and tracks in push mode.
    fn takes_pushes(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.tracking == Some(Tracked::Pushes))
    }

    /// Reads and applies the pushes that arrived on the idle link.
    fn poll_pushes(&mut self) {
        let link = self.link.as_mut().expect("takes_pushes implies a link");
        let deadline = Instant::now() + self.options.timeout;
        if let Err(e) = link.reader.poll_pushes(&mut link.stream, deadline) {
            self.drop_link(&format!("connection lost while idle: {e}"));
        }
    }

    /// The freshness state when invalidations come as pushes (push mode).
    fn push_freshness(&self) -> Option<&Arc<dyn Freshness>> {
        self.options.freshness.as_ref().filter(|f| f.push_mode())
    }

    /// Takes the link away; a link that tracked in push mode reports its
    /// loss (pushes meant for it may be lost with it).
    fn take_link(&mut self) -> Option<Link> {
        let link = self.link.take()?;
        if link.tracking == Some(Tracked::Pushes) {
            if let Some(freshness) = &self.options.freshness {
                freshness.data_link_lost(self.index);
            }
        }
        Some(link)
    }

    fn serve(&mut self, batch: &mut Vec<Job>) {
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
        self.follow_master();
        if self.push_freshness().is_some() && self.link.as_ref().is_some_and(|l| l.protocol != 3) {
            // Push mode began (REDIRECT refused): reopen speaking RESP3.
            self.take_link();
        }
        for attempt in 0..2 {
            if let Err(err) = self.ensure_link() {
                self.fail_all(batch, err.clone());
                return;
            }
            let reused = self.link.as_ref().is_some_and(|l| l.used);
            match self.round_trip(batch) {
                Ok(()) => return,
                Err(RoundTrip::Retry(why)) if attempt == 0 && reused => {
                    log::debug!(
                        "redis connection {} went stale ({why}); retrying",
                        self.index
                    );
                    self.take_link();
                }
                Err(RoundTrip::Retry(why)) => {
                    self.drop_link(&why);
                    self.fail_all(batch, BackendError::Unavailable(why.clone()));
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
        match preamble {
            Some(Tracked::Redirect(id)) => redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("REDIRECT")
                .arg(id)
                .write_packed_command(&mut self.write_buf),
            Some(Tracked::Pushes) => redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .write_packed_command(&mut self.write_buf),
            None => {}
        }
        for job in batch {
            job.cmd.write(&mut self.write_buf);
            commands += job.cmd.count();
        }
        let link = self.link.as_mut().expect("link ensured");
        if let Err(e) = link.stream.write_all(&self.write_buf) {
            return Err(RoundTrip::Retry(format!("write failed: {e}")));
        }
        self.stats
            .requests
            .fetch_add(commands as u64, Ordering::Relaxed);
        if let Some(want) = preamble {
            self.read_preamble(want, batch)?;
        }
        for (i, job) in batch.iter().enumerate() {
            let link = self.link.as_mut().expect("link ensured");
            let (stream, reader) = (&mut link.stream, &mut link.reader);
            let mut read = 0;
            let answer = match &job.cmd {
                Cmd::Get(..) => reader.get_reply(stream, job.deadline).map(Answer::One),
                Cmd::GetMany(_, n) => {
                    let mut results = Vec::with_capacity(*n);
                    let mut outcome = Ok(());
                    while results.len() < *n {
                        match reader.get_reply(stream, job.deadline) {
                            Ok(result) => results.push(result),
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    read = results.len();
                    outcome.map(|()| Answer::Many(results))
                }
                Cmd::Packed(_, n) => {
                    let mut values = Vec::with_capacity(*n);
                    let mut outcome = Ok(());
                    while values.len() < *n {
                        match reader.value(stream, job.deadline) {
                            Ok(value) => values.push(value),
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    read = values.len();
                    outcome.map(|()| Answer::Values(values))
                }
                Cmd::Raw { replies, skip, .. } => {
                    // Frames are copied straight out of the read buffer.
                    let mut out = Vec::new();
                    let mut outcome = Ok(());
                    while read < *replies {
                        match reader.frame(stream, job.deadline) {
                            Ok((at, len)) => {
                                if read >= *skip {
                                    out.extend_from_slice(&reader.buf[at..at + len]);
                                }
                                read += 1;
                            }
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    outcome.map(|()| Answer::Raw(out))
                }
            };
            match answer {
                Ok(Answer::Values(values)) if values.iter().any(is_readonly) => {
                    // A master that became a replica: ask Sentinel again.
                    if let Some(master) = &self.options.master {
                        master.suspect("a READONLY reply");
                    }
                    job.answer(Ok(Answer::Values(values)))
                }
                Ok(answer) => job.answer(Ok(answer)),
                Err(e) if is_timeout(&e) => {
                    self.drop_link("reply timed out");
                    self.fail_all(&batch[i..], BackendError::Timeout);
                    return Err(RoundTrip::Done);
                }
                Err(e) => {
                    let why = format!("connection lost: {e}");
                    if i == 0 && read == 0 {
                        return Err(RoundTrip::Retry(why));
                    }
                    self.drop_link(&why);
                    self.fail_all(&batch[i..], BackendError::Unavailable(why.clone()));
                    return Err(RoundTrip::Done);
                }
            }
        }
        if let Some(link) = self.link.as_mut() {
            if !link.reader.settle() {
                // Bytes nobody asked for: the stream is out of step.
                self.drop_link("unexpected bytes after the replies");
                return Ok(());
            }
            link.used = true;
        }
        Ok(())
    }

    /// How this link should track, when it does not track so yet: pushes
    /// in push mode (on a RESP3 link), else a redirect to the listener's id.
    fn tracking_preamble(&self) -> Option<Tracked> {
        let freshness = self.options.freshness.as_ref()?;
        let link = self.link.as_ref()?;
        let want = if freshness.push_mode() {
            if link.protocol != 3 {
                return None;
            }
            Tracked::Pushes
        } else {
            Tracked::Redirect(freshness.redirect()?)
        };
        (link.tracking != Some(want)).then_some(want)
    }

    /// Reads the `CLIENT TRACKING` reply; on success the link tracks as
    /// `want`. A refused REDIRECT switches the process to push mode.
    fn read_preamble(&mut self, want: Tracked, batch: &[Job]) -> Result<(), RoundTrip> {
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
        match link.reader.value(&mut link.stream, deadline) {
            Ok(Value::ServerError(err)) => {
                let line = server_error_line(&err);
                match want {
                    Tracked::Redirect(_) if refuses_redirect(&line) => {
                        freshness.redirect_refused(&line)
                    }
                    _ => freshness.tracking_failed(&line),
                }
            }
            Ok(_) => link.tracking = Some(want),
            Err(e) if is_timeout(&e) => {
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
                self.stats.links_opened.fetch_add(1, Ordering::Relaxed);
                if !self.up.swap(true, Ordering::Relaxed) || self.retry_at.is_some() {
                    log::info!("redis connection {} up ({})", self.index, self.target_now());
                }
                if self.connected_before {
                    // Redis dropped what it tracked for the old connection.
                    if let Some(freshness) = &self.options.freshness {
                        freshness.data_link_reopened(self.index);
                    }
                }
                self.connected_before = true;
                *self.warned.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.backoff = MIN_BACKOFF;
                self.retry_at = None;
                self.link = Some(link);
                Ok(())
            }
            Err(why) => {
                if let Some(master) = &self.options.master {
                    master.suspect("a failed connect");
                }
                let reason = why.to_string();
                let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
                if self.retry_at.is_none() && warned.as_deref() != Some(reason.as_str()) {
                    let target = self.target_now();
                    log::warn!(
                        "redis connection {} to {target} failed: {reason}",
                        self.index
                    );
                    *warned = Some(reason);
                }
                drop(warned);
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

    /// Where this connection goes, for log lines (with Sentinel, the
    /// master's address now, not `REDIS_URL`'s).
    fn target_now(&self) -> String {
        match &self.options.master {
            None => self.options.target.to_string(),
            Some(master) => master
                .target(&self.options.target)
                .map_or("the master (not found yet)".into(), |(t, _)| t.to_string()),
        }
    }

    fn connect(&mut self) -> Result<Link, ConnectError> {
        let timeout = self.options.timeout;
        let target = match &self.options.master {
            None => self.options.target.clone(),
            Some(master) => {
                let (target, generation) =
                    master.target(&self.options.target).ok_or_else(|| {
                        ConnectError::Unreachable("no master found through Sentinel yet".into())
                    })?;
                self.link_generation = generation;
                target
            }
        };
        let pushes = self.push_freshness().cloned();
        let protocol = if pushes.is_some() { 3 } else { self.protocol };
        let (conn, _) = connect_speaking::<TcpStream>(&target, timeout, protocol, &[], 0)?;
        // Set once per connection; `Reader` lowers the read timeout only
        // when a deadline needs it.
        conn.stream
            .set_timeouts(Some(timeout), Some(timeout))
            .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        let mut reader = Reader::new(timeout);
        reader.pushes = pushes;
        Ok(Link {
            stream: conn.stream,
            reader,
            used: false,
            tracking: None,
            protocol,
            _open: OpenGuard::new(&self.open),
        })
    }

    fn drop_link(&mut self, why: &str) {
        if self.take_link().is_some() {
            log::debug!("redis connection {} dropped: {why}", self.index);
            if let Some(master) = &self.options.master {
                master.suspect("a lost connection");
            }
        }
    }

    /// With Sentinel: a link to where the master was is dropped once it
    /// moved, and a pending reconnect goes at once to where it is now.
    fn follow_master(&mut self) {
        let Some(generation) = self.options.master.as_ref().map(|m| m.generation()) else {
            return;
        };
        if generation == self.link_generation {
            return;
        }
        if self.take_link().is_some() {
            log::info!(
                "redis connection {} follows the master to its new address",
                self.index
            );
        }
        self.retry_at = None;
        self.backoff = MIN_BACKOFF;
        // Once per move: a connect that fails now backs off as usual.
        self.link_generation = generation;
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
        job.answer(Err(err));
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

/// `-READONLY ...`: the node is a replica now.
fn is_readonly(value: &Value) -> bool {
    matches!(value, Value::ServerError(err) if err.code() == "READONLY")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-packed GET is byte for byte what the redis crate packs.
    #[test]
    fn packed_get_matches_the_redis_crate() {
        for key in [
            &b""[..],
            b"k",
            b"key:12345",
            &[0u8, 13, 10, 255][..],
            &[b'x'; 1000][..],
        ] {
            let mut buf = Vec::new();
            write_get(&mut buf, key);
            assert_eq!(buf, redis::cmd("GET").arg(key).get_packed_command());
        }
    }

    /// Frame lengths of whole replies, and `None` for every cut-short prefix.
    #[test]
    fn frame_len_finds_whole_replies_only() {
        let frames: [&[u8]; 9] = [
            b"+OK\r\n",
            b"-WRONGTYPE Operation against a key\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"$0\r\n\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"*-1\r\n",
            b"%1\r\n+k\r\n_\r\n",
        ];
        for frame in frames {
            let mut buf = frame.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(frame_len(&buf).unwrap(), Some(frame.len()), "{frame:?}");
            for cut in 0..frame.len() {
                assert_eq!(
                    frame_len(&frame[..cut]).unwrap(),
                    None,
                    "{frame:?} cut at {cut}"
                );
            }
        }
        assert!(frame_len(b"?what\r\n").is_err());
        assert_eq!(bulk_frame_len(b"$100\r\nabc"), 6 + 100 + 2);
        assert_eq!(bulk_frame_len(b"$-1\r\n"), 0);
        assert_eq!(bulk_frame_len(b"+OK\r\n"), 0);
        assert!(frame_len(b"$x\r\n").is_err());
    }

    /// The keys a fake Redis is told to invalidate when asked for them.
    struct Fake {
        port: u16,
        /// Every command the fake was sent, space-joined, per connection.
        seen: Arc<Mutex<Vec<String>>>,
    }

    /// A fake Redis: `HELLO 3` answers a map, `CLIENT TRACKING ON` answers
    /// `+OK` (with `REDIRECT`: `-ERR` when `refuse_redirect`), and `GET k`
    /// answers, on RESP3, a `>invalidate [k]` push before the value `v1`.
    fn fake(refuse_redirect: bool) -> Fake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let log = log.clone();
                std::thread::spawn(move || {
                    let (mut buf, mut resp3) = (Vec::new(), false);
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Ok(Some(len)) = frame_len(&buf) {
                            let frame: Vec<u8> = buf.drain(..len).collect();
                            let Ok(Value::Array(args)) = redis::parse_redis_value(&frame) else {
                                return;
                            };
                            let words: Vec<String> = args
                                .iter()
                                .map(|a| match a {
                                    Value::BulkString(b) => String::from_utf8_lossy(b).into(),
                                    _ => String::new(),
                                })
                                .collect();
                            let line = words.join(" ").to_uppercase();
                            log.lock().unwrap().push(line.clone());
                            let reply: &[u8] = if line.starts_with("HELLO 3") {
                                resp3 = true;
                                b"%1\r\n+proto\r\n:3\r\n"
                            } else if line.contains("REDIRECT") && refuse_redirect {
                                b"-ERR CLIENT TRACKING REDIRECT is not supported\r\n"
                            } else if line.starts_with("CLIENT TRACKING") {
                                b"+OK\r\n"
                            } else if line.starts_with("GET") && resp3 {
                                b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$2\r\nv1\r\n"
                            } else if line.starts_with("GET") {
                                b"$2\r\nv1\r\n"
                            } else {
                                b"+PONG\r\n"
                            };
                            if conn.write_all(reply).is_err() {
                                return;
                            }
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Fake { port, seen }
    }

    type State = crate::coherence::Coherence<u32>;

    fn coherence(pushes: bool) -> Arc<State> {
        let cache = Arc::new(crate::cache::Cache::new(
            16,
            Duration::from_secs(60),
            Arc::new(crate::cache::SystemClock::default()),
        ));
        let c = State::new(cache, Arc::default(), true);
        Arc::new(if pushes { c.with_pushes() } else { c })
    }

    fn node(port: u16, freshness: Arc<State>) -> Node {
        let options = BackendOptions {
            target: crate::config::RedisTarget {
                host: "127.0.0.1".into(),
                port,
                db: 0,
                username: None,
                password: None,
                tls: None,
            },
            connections: 1,
            timeout: Duration::from_secs(2),
            freshness: Some(freshness),
            master: None,
        };
        Node::start(&options, Arc::default())
    }

    fn lead(c: &Arc<State>) -> crate::coherence::Lead<u32> {
        match c.join(b"k", c.generation()) {
            crate::coherence::Join::Leader(lead) => lead,
            crate::coherence::Join::Follower(_) => panic!("expected to lead"),
        }
    }

    /// A `>invalidate` push read ahead of a GET's reply on the same link is
    /// applied before the reply is delivered: the fill it concerns is
    /// dropped, and the push is not taken for the reply.
    #[test]
    fn push_before_the_reply_drops_the_fill() {
        let fake = fake(false);
        let c = coherence(true);
        let node = node(fake.port, c.clone());
        // The first batch turns tracking on; the second one is tracked.
        for _ in 0..2 {
            let lead = lead(&c);
            let got = node.get(0, b"k").unwrap().unwrap().unwrap();
            assert_eq!(got, b"v1");
            lead.fill(&got);
            assert!(c.cache().get(b"k").is_none(), "invalidated in flight");
        }
        let seen = fake.seen.lock().unwrap().clone();
        assert!(seen.iter().any(|l| l == "CLIENT TRACKING ON"), "{seen:?}");
        assert!(seen[0].starts_with("HELLO 3"), "{seen:?}");
    }

    /// A server that refuses `CLIENT TRACKING ... REDIRECT` switches the
    /// process to push mode: the link reopens on RESP3 and tracks without
    /// REDIRECT, and pushes on it invalidate.
    #[test]
    fn refused_redirect_falls_back_to_pushes() {
        use crate::coherence::Freshness;
        let fake = fake(true);
        let c = coherence(false);
        c.listener_up(7);
        let node = node(fake.port, c.clone());
        assert_eq!(node.get(0, b"k").unwrap().unwrap().unwrap(), b"v1");
        assert!(c.push_mode(), "the refusal switched to push mode");
        let lead = lead(&c);
        assert_eq!(node.get(0, b"k").unwrap().unwrap().unwrap(), b"v1");
        lead.fill(b"v1");
        assert!(c.cache().get(b"k").is_none(), "the push invalidated");
        let seen = fake.seen.lock().unwrap().clone();
        assert!(
            seen.contains(&"CLIENT TRACKING ON REDIRECT 7".to_string()),
            "{seen:?}"
        );
        assert!(seen.iter().any(|l| l.starts_with("HELLO 3")), "{seen:?}");
        assert!(seen.iter().any(|l| l == "CLIENT TRACKING ON"), "{seen:?}");
    }

    /// Only the stale-id error keeps REDIRECT; any other refusal falls back.
    #[test]
    fn refusal_is_any_error_but_a_stale_id() {
        assert!(!refuses_redirect(
            "ERR The client ID you want redirect to does not exist"
        ));
        assert!(refuses_redirect("ERR unknown subcommand 'TRACKING'"));
        assert!(refuses_redirect("ERR REDIRECT is not supported"));
    }

    /// A flush push (null key list) empties the cache, and an idle link
    /// reads pushes without any request.
    #[test]
    fn flush_push_on_an_idle_link_empties_the_cache() {
        let c = coherence(true);
        c.cache().insert(b"x", b"1");
        let mut reader = Reader::new(Duration::from_secs(1));
        reader.pushes = Some(c.clone());
        let frame = b">2\r\n$10\r\ninvalidate\r\n_\r\n";
        reader.buf[..frame.len()].copy_from_slice(frame);
        reader.end = frame.len();
        assert!(reader.drain_pushes().unwrap());
        assert!(c.cache().get(b"x").is_none());
    }
}
