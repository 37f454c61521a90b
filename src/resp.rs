//! resp: the Redis-protocol front end (RESP2, and RESP3 after `HELLO 3`).
//!
//! Owns its accept loop, the connection loop, and the one place where
//! results and errors become RESP replies. Its parts: `parse`, the
//! incremental request parser (multibulk and inline); `commands`, the table
//! of served commands, one handler each, the policy for every other command
//! (passed through, gated write, refused, unknown; from the command table
//! the core learned from Redis), `MULTI` queueing, and `COMMAND`.
//! Reads, pass-through and writes go through the shared core (`proxy`);
//! client admission and idle reaping go through `clients`, shared with HTTP.
//! The connection loop parses every complete command it has read before
//! answering any, so a pipelined run of GETs and MGETs reads its keys in one
//! batch ([`prefetch`]): its misses cost one Redis round trip, not one each;
//! and a run of pass-through commands goes to Redis as one relay job
//! (`ahead`), one round trip for the run.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use may::coroutine::JoinHandle;
use may::net::TcpStream;

use crate::backend::{BackendError, Protocol};
use crate::clients::{Clients, Permit};
use crate::listener;
use crate::metrics::{Frontend, Metrics, Status, Tally};
use crate::proxy::{Lookup, Proxy};

mod ahead;
mod commands;
mod parse;

use commands::execute;
pub use parse::{parse, Parsed, Parser, ProtocolError};

/// Sent to a connection over the client limit, then it is closed.
pub const BUSY_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// A connection lets the other coroutines of its worker run after this
/// many bytes read or commands answered without a pause: a socket that
/// always has data never makes a read wait, so a huge request or pipeline
/// would otherwise hold the worker to itself.
const YIELD_BYTES: usize = 64 * 1024;
const YIELD_COMMANDS: u32 = 1024;
/// At most this many complete commands are parsed ahead of their answers.
const PARSE_AHEAD: usize = 1024;
/// How long such a pause lasts; see [`let_others_run`].
const YIELD_PAUSE: Duration = Duration::from_micros(100);
/// Version reported by HELLO and INFO.
const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Appends RESP replies to an output buffer, in the connection's protocol.
struct Out<'a>(&'a mut Vec<u8>, Protocol);

impl Out<'_> {
    fn simple(&mut self, s: &str) {
        self.0.push(b'+');
        self.0.extend_from_slice(s.as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }
    fn error(&mut self, s: &str) {
        self.0.push(b'-');
        // An error line cannot carry CR or LF.
        self.0.extend(
            s.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.0.extend_from_slice(b"\r\n");
    }
    fn int(&mut self, n: i64) {
        self.0.extend_from_slice(format!(":{n}\r\n").as_bytes());
    }
    fn bulk(&mut self, b: &[u8]) {
        self.0.push(b'$');
        self.0.extend_from_slice(itoa_usize(b.len()).as_bytes());
        self.0.extend_from_slice(b"\r\n");
        self.0.extend_from_slice(b);
        self.0.extend_from_slice(b"\r\n");
    }
    fn nil(&mut self) {
        match self.1 {
            Protocol::Resp2 => self.0.extend_from_slice(b"$-1\r\n"),
            Protocol::Resp3 => self.0.extend_from_slice(b"_\r\n"),
        }
    }
    fn array(&mut self, n: usize) {
        self.header(b'*', n);
    }
    /// A map of `n` pairs: RESP3's `%`, a flat array of `2n` in RESP2.
    fn map(&mut self, n: usize) {
        match self.1 {
            Protocol::Resp2 => self.header(b'*', 2 * n),
            Protocol::Resp3 => self.header(b'%', n),
        }
    }
    /// A set of `n`: RESP3's `~`, an array in RESP2.
    fn set(&mut self, n: usize) {
        match self.1 {
            Protocol::Resp2 => self.header(b'*', n),
            Protocol::Resp3 => self.header(b'~', n),
        }
    }
    /// Text as Redis sends INFO: a verbatim string in RESP3, bulk in RESP2.
    fn verbatim(&mut self, text: &str) {
        match self.1 {
            Protocol::Resp2 => self.bulk(text.as_bytes()),
            Protocol::Resp3 => {
                self.header(b'=', text.len() + 4);
                self.0.extend_from_slice(b"txt:");
                self.0.extend_from_slice(text.as_bytes());
                self.0.extend_from_slice(b"\r\n");
            }
        }
    }
    /// Reply bytes that are already RESP (relayed from Redis).
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn header(&mut self, kind: u8, n: usize) {
        self.0.push(kind);
        self.0.extend_from_slice(itoa_usize(n).as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }
}

fn itoa_usize(n: usize) -> String {
    n.to_string()
}

/// What the connection loop does after a command.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

/// Everything a RESP connection needs besides its socket.
pub struct RespShared {
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    pub max_request: usize,
    pub db: i64,
    pub idle_timeout: Duration,
    /// `PROXY_ALLOW_WRITES`: pass Redis's write commands through.
    pub allow_writes: bool,
}

/// Binds `addr` and serves RESP on it; returns the accept coroutine.
pub fn start(shared: Arc<RespShared>, addr: SocketAddr) -> io::Result<JoinHandle<()>> {
    listener::start("resp-accept", addr, move |stream| {
        let fd = stream.as_raw_fd() as usize;
        let shared = shared.clone();
        let builder = may::coroutine::Builder::new().id(fd);
        let spawned = may::go!(builder, move || connection(stream, &shared, fd));
        if let Err(e) = spawned {
            log::warn!("cannot spawn resp connection: {e}");
        }
    })
}

/// Serves one accepted connection, or refuses it over the client limit.
/// The permit always goes before the socket: a connection leaves the
/// client registry before its fd can be closed and reused.
fn connection(mut stream: TcpStream, shared: &RespShared, fd: usize) {
    match shared.clients.admit(fd) {
        Some(permit) => serve(&mut stream, permit, shared, fd),
        None => {
            // An answered request, as every one is (DESIGN.md counters);
            // counted before the answer goes out, so a client that has read
            // it finds it counted.
            let metrics = &shared.metrics;
            metrics.request(Status::Error, Duration::ZERO);
            metrics.response_bytes(Frontend::Resp, BUSY_REPLY.len());
            let permit = shared.clients.reject(fd, BUSY_REPLY);
            drain_until_closed(&mut stream);
            drop(permit);
        }
    }
    drop(stream);
}

/// Reads and discards until the peer closes (or the reaper cuts us), so a
/// refused client reads its error instead of a reset.
fn drain_until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Per-connection state kept across commands.
#[derive(Default)]
struct Session {
    name: Option<Vec<u8>>,
    /// The protocol `HELLO` chose (RESP2 until then).
    protocol: Protocol,
    /// Commands queued since `MULTI`.
    multi: Option<commands::Multi>,
    /// Scratch space for a command re-packed for Redis.
    packed: Vec<u8>,
    /// Answers fetched ahead for the GETs and MGETs of a pipelined run.
    prefetched: Prefetched,
    /// Replies relayed ahead for a pipelined run of pass-through commands.
    relayed: ahead::Relayed,
}

impl Session {
    /// Whether the reads of a pipelined run may be fetched ahead of the
    /// commands before them. MULTI hook: false while a MULTI is queuing
    /// (its commands must reach Redis in the EXEC block, not before).
    fn may_prefetch(&self) -> bool {
        self.multi.is_none()
    }
}

/// Answers that [`prefetch`] fetched for the keys of the GET and MGET
/// commands of a run, in order, each with the address of its key in the
/// read buffer: a handler takes the answer only if it is for the very
/// argument it serves, so a run that went another way (a command refused
/// before its handler ran) cannot answer a command with another's value.
#[derive(Default)]
struct Prefetched {
    answers: VecDeque<(usize, Result<Lookup, BackendError>)>,
}

impl Prefetched {
    fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    fn clear(&mut self) {
        self.answers.clear();
    }

    /// The answer for `key` (a GET's argument), if it is the next one;
    /// otherwise none, and every answer is dropped.
    fn take_one(&mut self, key: &[u8]) -> Option<Result<Lookup, BackendError>> {
        match self.answers.front() {
            Some((at, _)) if *at == key.as_ptr() as usize => {
                self.answers.pop_front().map(|(_, r)| r)
            }
            Some(_) => {
                self.answers.clear();
                None
            }
            None => None,
        }
    }

    /// The answers for `keys` (the arguments of the command being run), if
    /// they are the next ones; otherwise none, and every answer is dropped.
    fn take(&mut self, keys: &[&[u8]]) -> Option<Vec<Result<Lookup, BackendError>>> {
        let next_are_ours = keys.len() <= self.answers.len()
            && keys
                .iter()
                .zip(&self.answers)
                .all(|(key, (at, _))| key.as_ptr() as usize == *at);
        if !next_are_ours {
            self.answers.clear();
            return None;
        }
        Some(self.answers.drain(..keys.len()).map(|(_, r)| r).collect())
    }
}

/// The prefetch stage. When `run` (the commands not yet answered, the
/// next first) starts with two or more GET or MGET commands in a row,
/// reads all their keys with one [`Proxy::get_batch`]: its misses go to
/// Redis in one round trip instead of one per command. The run stops at
/// any other command, so no read is moved before a command ahead of it
/// in the pipeline (a write, a pass-through, a MULTI).
fn prefetch(
    buf: &[u8],
    spans: &[Range<usize>],
    run: &[Range<usize>],
    shared: &RespShared,
    fd: usize,
    session: &mut Session,
) {
    let reads = run.iter().map(|c| &spans[c.clone()]).take_while(|args| {
        let name = &buf[args[0].clone()];
        (name.eq_ignore_ascii_case(b"get") && args.len() == 2)
            || (name.eq_ignore_ascii_case(b"mget") && args.len() >= 2)
    });
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut count = 0;
    for args in reads {
        keys.extend(args[1..].iter().map(|r| &buf[r.clone()]));
        count += 1;
    }
    if count < 2 {
        // One read is one round trip anyway: its handler asks the core.
        return;
    }
    let answers = shared.proxy.get_batch(&keys, fd);
    // Extended, not replaced: the queue's allocation serves every batch.
    session
        .prefetched
        .answers
        .extend(keys.iter().map(|k| k.as_ptr() as usize).zip(answers));
}

/// Lets the other coroutines of this worker run, those waiting for their
/// sockets included. `yield_now` alone does not: may puts the coroutine back
/// on its worker's local queue, which the worker drains (its global queue
/// too) before it polls for I/O again, so a connection whose socket always
/// has data would still starve every client of that worker. A short sleep
/// takes it off the worker's queues long enough for the worker to reach
/// its poll (a zero sleep often came back first); the timer thread then
/// hands it back through the global queue, whose wake-up ends that poll.
fn let_others_run() {
    may::coroutine::sleep(YIELD_PAUSE);
    may::coroutine::yield_now();
}

/// Runs the connection until it ends; `permit` is dropped on return.
fn serve(stream: &mut TcpStream, permit: Permit, shared: &RespShared, fd: usize) {
    stream.set_nodelay(true).ok();
    // A client that stops reading its replies is cut after the idle timeout.
    stream.set_write_timeout(Some(shared.idle_timeout)).ok();
    // `rbuf[start..filled]` is unanswered input. The bytes past `filled`
    // are zeroed once and reused: re-zeroing a read chunk before every read
    // cost ~4 % of a pipelined hit's CPU.
    let mut rbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut filled = 0;
    let mut start = 0;
    let mut need = 1;
    let mut wbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut parser = Parser::new();
    let mut unyielded_bytes = 0;
    let mut unyielded_commands = 0;
    let mut session = Session::default();
    let mut next = Next::Continue;
    let mut tally = Tally::default();
    let metrics = shared.metrics.clone();
    let mut batch_start = Instant::now();
    // The complete commands read and not yet answered: each a range of
    // `spans`, which holds argument ranges of `rbuf`. Kept allocated.
    let mut commands: Vec<Range<usize>> = Vec::new();
    let mut spans: Vec<Range<usize>> = Vec::new();
    loop {
        // Parse every complete command in the buffer (up to PARSE_AHEAD at a
        // time), answer them in order, then write once. Parsing ahead lets
        // the GETs of a pipeline go to Redis in one round trip (`prefetch`).
        loop {
            commands.clear();
            spans.clear();
            let mut failed = None;
            while next == Next::Continue && filled - start >= need && commands.len() < PARSE_AHEAD {
                match parser.parse(&rbuf[start..filled], shared.max_request) {
                    Ok(Parsed::Complete { consumed }) => {
                        let base = start;
                        start += consumed;
                        need = 1;
                        let args = parser.args();
                        if args.is_empty() {
                            continue;
                        }
                        let from = spans.len();
                        spans.extend(args.iter().map(|r| base + r.start..base + r.end));
                        commands.push(from..spans.len());
                    }
                    Ok(Parsed::Incomplete { need: n }) => {
                        need = n;
                        break;
                    }
                    Err(ProtocolError(msg)) => {
                        failed = Some(msg);
                        break;
                    }
                }
            }
            let mut argv: Vec<&[u8]> = Vec::new();
            for (i, command) in commands.iter().enumerate() {
                if next != Next::Continue {
                    break;
                }
                let in_flight = permit.begin(batch_start);
                if session.may_prefetch() {
                    let run = &commands[i..];
                    if session.prefetched.is_empty() {
                        prefetch(&rbuf, &spans, run, shared, fd, &mut session);
                    }
                    if session.relayed.is_empty() {
                        ahead::relay_ahead(&rbuf, &spans, run, shared, fd, &mut session);
                    }
                }
                let command = (&rbuf[..filled], &spans[command.clone()]);
                next = execute(
                    command,
                    &mut argv,
                    shared,
                    fd,
                    &mut session,
                    &mut wbuf,
                    &mut tally,
                );
                drop(in_flight);
                unyielded_commands += 1;
                if unyielded_commands >= YIELD_COMMANDS {
                    unyielded_commands = 0;
                    let_others_run();
                }
            }
            // Answers of commands that did not run (after a QUIT) go.
            session.prefetched.clear();
            session.relayed.clear();
            if let Some(msg) = failed {
                if next == Next::Continue {
                    Out(&mut wbuf, session.protocol).error(&format!("ERR Protocol error: {msg}"));
                    next = Next::Close;
                }
            }
            if commands.len() < PARSE_AHEAD || next != Next::Continue {
                break;
            }
        }
        if !wbuf.is_empty() {
            // The replies about to be written count toward the bound on all
            // clients' buffers (PROXY_MAX_BUFFER_BYTES) until they are out.
            if !permit.hold(filled - start + wbuf.len()) {
                return;
            }
            // Counted so the reaper can tell a client reading a long reply
            // from an idle one; the write below blocks, so replies never
            // pile up unread here.
            permit.sent(wbuf.len());
            metrics.response_bytes(Frontend::Resp, wbuf.len());
            let written = stream.write_all(&wbuf);
            wbuf.clear();
            // Every command of the batch is answered by this one write, so
            // they share its latency: one clock read per batch, not per command.
            if !tally.is_empty() {
                metrics.requests_batch(&mut tally, batch_start.elapsed());
            }
            if written.is_err() {
                return;
            }
        }
        if next == Next::Close {
            return;
        }
        // Keep the unparsed tail at the front of the buffer.
        if start > 0 {
            rbuf.copy_within(start..filled, 0);
            filled -= start;
            start = 0;
        }
        if filled == 0 {
            // Every command read so far is answered: the client is waiting
            // for its replies rather than streaming a request or a pipeline
            // past us, so the next read will most likely wait (and let the
            // worker's other clients run). Only a connection that always
            // has input left over keeps counting toward a pause.
            unyielded_bytes = 0;
            unyielded_commands = 0;
        }
        let want = need.saturating_sub(filled).clamp(READ_CHUNK, 1 << 20);
        if rbuf.len() < filled + want {
            rbuf.resize(filled + want, 0);
        }
        let n = match stream.read(&mut rbuf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        filled += n;
        // An unfinished request held here counts toward the same bound.
        if !permit.hold(rbuf.len()) {
            return;
        }
        unyielded_bytes += n;
        if unyielded_bytes >= YIELD_BYTES {
            unyielded_bytes = 0;
            let_others_run();
        }
        batch_start = Instant::now();
        if rbuf.capacity() > 4 * READ_CHUNK && filled < READ_CHUNK {
            rbuf.truncate(READ_CHUNK);
            rbuf.shrink_to(READ_CHUNK);
        }
    }
}

/// The one mapping from backend errors to RESP error lines.
fn backend_error_line(e: &BackendError) -> String {
    match e {
        BackendError::Unavailable(_) => "ERR redis unavailable".into(),
        BackendError::Timeout => "ERR redis timeout".into(),
        BackendError::Reply(msg) => msg.clone(),
    }
}

/// HELLO's reply, shaped like Redis's own: a map in RESP3, a flat array
/// in RESP2.
fn hello_reply(out: &mut Out, fd: usize) {
    let proto = out.1.number();
    out.map(7);
    out.bulk(b"server");
    out.bulk(b"redis-proxy");
    out.bulk(b"version");
    out.bulk(SERVER_VERSION.as_bytes());
    out.bulk(b"proto");
    out.int(proto);
    out.bulk(b"id");
    out.int(fd as i64);
    out.bulk(b"mode");
    out.bulk(b"standalone");
    out.bulk(b"role");
    out.bulk(b"master");
    out.bulk(b"modules");
    out.array(0);
}

fn info_text(shared: &RespShared) -> String {
    let proxy = &shared.proxy;
    let snapshot = proxy.snapshot();
    let mut s = String::with_capacity(1024);
    s.push_str("# Server\r\n");
    s.push_str(&format!("redis_version:{SERVER_VERSION}\r\n"));
    s.push_str("redis_mode:standalone\r\nserver_name:redis-proxy\r\n");
    s.push_str(&format!("process_id:{}\r\n", std::process::id()));
    s.push_str("\r\n# Clients\r\n");
    s.push_str(&format!(
        "connected_clients:{}\r\nmaxclients:{}\r\n",
        shared.clients.connected(),
        shared.clients.max()
    ));
    s.push_str("\r\n");
    s.push_str(&shared.metrics.render_info(&snapshot));
    s.push_str("\r\n# Cache\r\n");
    s.push_str(&format!(
        "cache_capacity:{}\r\ncache_keys:{}\r\n",
        snapshot.cache_capacity, snapshot.cache_entries
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Error replies never contain line breaks.
    #[test]
    fn error_lines_are_single_line() {
        let mut buf = Vec::new();
        Out(&mut buf, Protocol::Resp2).error("ERR a\r\nb");
        assert_eq!(buf, b"-ERR a  b\r\n");
    }

    /// Nils, maps and verbatim text in each protocol, as Redis sends them.
    #[test]
    fn encodings_follow_the_protocol() {
        let mut two = Vec::new();
        let mut out = Out(&mut two, Protocol::Resp2);
        out.nil();
        out.map(1);
        out.verbatim("a");
        assert_eq!(two, b"$-1\r\n*2\r\n$1\r\na\r\n");
        let mut three = Vec::new();
        let mut out = Out(&mut three, Protocol::Resp3);
        out.nil();
        out.map(1);
        out.verbatim("a");
        assert_eq!(three, b"_\r\n%1\r\n=5\r\ntxt:a\r\n");
    }
}
