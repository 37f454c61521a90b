//! resp: the Redis-protocol (RESP2) front end.
//!
//! Owns its accept loop, the request parser (multibulk and inline), the
//! command subset, and the one place where results and errors become RESP
//! replies. Reads go through the shared core (`proxy`); client admission and
//! idle reaping go through `clients`, shared with HTTP.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use may::coroutine::JoinHandle;
use may::net::{TcpListener, TcpStream};

use crate::backend::BackendError;
use crate::backend::SetReply;
use crate::clients::{Clients, Permit};
use crate::metrics::{Frontend, Metrics, Tally};
use crate::proxy::Proxy;

/// Sent to a connection over the client limit, then it is closed.
pub const BUSY_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Longest inline command line, as in Redis.
const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one multibulk command, as in Redis.
const MAX_ARGS: i64 = 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Version reported by HELLO and INFO.
const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A request that cannot be parsed; the connection is answered
/// `-ERR Protocol error: <msg>` and closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// The outcome of parsing the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// One command of `consumed` bytes; its arguments are in `args` (byte
    /// ranges of the buffer). An empty `args` is a blank line or `*0`.
    Complete { consumed: usize },
    /// Not enough bytes yet: retry once the buffer holds at least `need`.
    Incomplete { need: usize },
}

/// Parses one command from the start of `buf` into `args`. Never panics and
/// never asks for more than `max` bytes for one command.
pub fn parse(
    buf: &[u8],
    max: usize,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    args.clear();
    if buf.is_empty() {
        return Ok(Parsed::Incomplete { need: 1 });
    }
    if buf[0] != b'*' {
        return parse_inline(buf, MAX_INLINE.min(max), args);
    }
    let (count, mut pos) = match read_int_line(buf, 1, "invalid multibulk length")? {
        Some(v) => v,
        None => {
            return Ok(Parsed::Incomplete {
                need: buf.len() + 1,
            })
        }
    };
    if count > MAX_ARGS {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    for _ in 0..count.max(0) {
        if pos >= buf.len() {
            return Ok(Parsed::Incomplete { need: pos + 1 });
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                char::from(buf[pos]).escape_default()
            )));
        }
        let (len, start) = match read_int_line(buf, pos + 1, "invalid bulk length")? {
            Some(v) => v,
            None => {
                return Ok(Parsed::Incomplete {
                    need: buf.len() + 1,
                })
            }
        };
        if len < 0 || len as u64 > max as u64 {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        let end = start + len as usize;
        if end + 2 > max {
            return Err(ProtocolError("request too large".into()));
        }
        if buf.len() < end + 2 {
            return Ok(Parsed::Incomplete { need: end + 2 });
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("expected CRLF after bulk data".into()));
        }
        args.push(start..end);
        pos = end + 2;
    }
    Ok(Parsed::Complete { consumed: pos })
}

/// Reads `<digits>\r\n` starting at `from`; `None` when the line is not
/// complete yet. Lines longer than any valid length are errors.
fn read_int_line(
    buf: &[u8],
    from: usize,
    what: &str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    const MAX_LINE: usize = 24;
    let window = &buf[from.min(buf.len())..buf.len().min(from + MAX_LINE)];
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        if window.len() >= MAX_LINE {
            return Err(ProtocolError(what.into()));
        }
        return Ok(None);
    };
    if from + cr + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[from + cr + 1] != b'\n' {
        return Err(ProtocolError(what.into()));
    }
    // As strict as Redis: an optional '-', then digits without leading zeros.
    let line = &window[..cr];
    let digits = line.strip_prefix(b"-").unwrap_or(line);
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || digits.len() == 1);
    if !canonical {
        return Err(ProtocolError(what.into()));
    }
    let n: i64 = std::str::from_utf8(line)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| ProtocolError(what.into()))?;
    Ok(Some((n, from + cr + 2)))
}

fn parse_inline(
    buf: &[u8],
    limit: usize,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    let Some(nl) = buf.iter().take(limit + 1).position(|b| *b == b'\n') else {
        if buf.len() > limit {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(Parsed::Incomplete {
            need: buf.len() + 1,
        });
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut i = 0;
    while i < line_end {
        while i < line_end && (buf[i] == b' ' || buf[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < line_end && buf[i] != b' ' && buf[i] != b'\t' {
            i += 1;
        }
        if i > start {
            args.push(start..i);
        }
    }
    Ok(Parsed::Complete { consumed: nl + 1 })
}

/// Appends RESP replies to an output buffer.
struct Out<'a>(&'a mut Vec<u8>);

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
    /// What SET answered.
    fn set_reply(&mut self, r: &SetReply) {
        match r {
            SetReply::Ok => self.simple("OK"),
            SetReply::Nil => self.nil(),
            SetReply::Old(b) => self.bulk(b),
        }
    }
    fn nil(&mut self) {
        self.0.extend_from_slice(b"$-1\r\n");
    }
    fn array(&mut self, n: usize) {
        self.0.push(b'*');
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
    /// `PROXY_ALLOW_WRITES`: serve SET and DEL.
    pub allow_writes: bool,
}

/// Binds `addr` and serves RESP on it; returns the accept coroutine.
pub fn start(shared: Arc<RespShared>, addr: SocketAddr) -> io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    let handle = may::go!(
        may::coroutine::Builder::new().name("resp-accept".into()),
        move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        log::debug!("resp accept failed: {e}");
                        continue;
                    }
                };
                let fd = stream.as_raw_fd() as usize;
                let shared = shared.clone();
                let builder = may::coroutine::Builder::new().id(fd);
                let spawned = may::go!(builder, move || {
                    match shared.clients.admit(fd, shared.max_request) {
                        Some(permit) => serve(stream, permit, &shared, fd),
                        None => {
                            let guard = shared.clients.reject(fd, BUSY_REPLY);
                            drain_until_closed(stream);
                            drop(guard);
                        }
                    }
                });
                if let Err(e) = spawned {
                    log::warn!("cannot spawn resp connection: {e}");
                }
            }
        }
    )?;
    Ok(handle)
}

/// Reads and discards until the peer closes (or the reaper cuts us), so a
/// refused client reads its error instead of a reset.
fn drain_until_closed(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Per-connection state kept across commands.
struct Session {
    name: Option<Vec<u8>>,
}

fn serve(mut stream: TcpStream, permit: Permit, shared: &RespShared, fd: usize) {
    stream.set_nodelay(true).ok();
    // A client that stops reading its replies is cut after the idle timeout.
    stream.set_write_timeout(Some(shared.idle_timeout)).ok();
    let mut rbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut start = 0;
    let mut need = 1;
    let mut wbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut args: Vec<Range<usize>> = Vec::with_capacity(8);
    let mut session = Session { name: None };
    let mut next = Next::Continue;
    let mut tally = Tally::default();
    let metrics = shared.metrics.clone();
    let mut batch_start = Instant::now();
    loop {
        // Answer every complete command in the buffer, then write once.
        let mut argv: Vec<&[u8]> = Vec::new();
        while next == Next::Continue && rbuf.len() - start >= need {
            match parse(&rbuf[start..], shared.max_request, &mut args) {
                Ok(Parsed::Complete { consumed }) => {
                    let base = start;
                    start += consumed;
                    need = 1;
                    if args.is_empty() {
                        continue;
                    }
                    let _in_flight = permit.begin(batch_start);
                    argv.clear();
                    argv.extend(args.iter().map(|r| &rbuf[base + r.start..base + r.end]));
                    next = execute(&argv, shared, fd, &mut session, &mut wbuf, &mut tally);
                }
                Ok(Parsed::Incomplete { need: n }) => {
                    need = n;
                    break;
                }
                Err(ProtocolError(msg)) => {
                    Out(&mut wbuf).error(&format!("ERR Protocol error: {msg}"));
                    next = Next::Close;
                }
            }
        }
        if !wbuf.is_empty() {
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
                metrics.requests_batch(Frontend::Resp, &mut tally, batch_start.elapsed());
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
            rbuf.drain(..start);
            start = 0;
        }
        let len = rbuf.len();
        let want = need.saturating_sub(len).clamp(READ_CHUNK, 1 << 20);
        rbuf.resize(len + want, 0);
        match stream.read(&mut rbuf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => rbuf.truncate(len + n),
        }
        batch_start = Instant::now();
        if rbuf.capacity() > 4 * READ_CHUNK && rbuf.len() < READ_CHUNK {
            rbuf.shrink_to(READ_CHUNK);
        }
    }
}

/// Runs one command and appends its reply.
fn execute(
    argv: &[&[u8]],
    shared: &RespShared,
    fd: usize,
    session: &mut Session,
    wbuf: &mut Vec<u8>,
    tally: &mut Tally,
) -> Next {
    let mut out = Out(wbuf);
    // Lower-case the name on the stack: no allocation per command.
    let mut lower = [0u8; 16];
    let raw_name = argv[0];
    if raw_name.len() <= lower.len() {
        for (d, s) in lower.iter_mut().zip(raw_name) {
            *d = s.to_ascii_lowercase();
        }
    }
    let name = match raw_name.len() <= lower.len() {
        true => std::str::from_utf8(&lower[..raw_name.len()]).unwrap_or(""),
        false => "",
    };
    let args = &argv[1..];
    let arity = |ok: bool, out: &mut Out| {
        if !ok {
            out.error(&format!(
                "ERR wrong number of arguments for '{name}' command"
            ));
        }
        ok
    };
    let mut status = "ok";
    let mut next = Next::Continue;
    match name {
        "get" => {
            if arity(args.len() == 1, &mut out) {
                match shared.proxy.get(args[0], fd) {
                    Ok(lookup) => match lookup.value {
                        Some(v) => out.bulk(&v),
                        None => {
                            status = "nil";
                            out.nil()
                        }
                    },
                    Err(e) => {
                        status = "error";
                        out.error(&backend_error_line(&e))
                    }
                }
            } else {
                status = "error";
            }
        }
        "mget" => {
            if arity(!args.is_empty(), &mut out) {
                match shared.proxy.get_many(args, fd) {
                    Ok(values) => {
                        out.array(values.len());
                        for v in values {
                            match v {
                                Some(v) => out.bulk(&v),
                                None => out.nil(),
                            }
                        }
                    }
                    Err(e) => {
                        status = "error";
                        out.error(&backend_error_line(&e))
                    }
                }
            } else {
                status = "error";
            }
        }
        "ping" => match args {
            [] => out.simple("PONG"),
            [msg] => out.bulk(msg),
            _ => {
                arity(false, &mut out);
                status = "error";
            }
        },
        "echo" => {
            if arity(args.len() == 1, &mut out) {
                out.bulk(args[0]);
            } else {
                status = "error";
            }
        }
        "quit" => {
            out.simple("OK");
            next = Next::Close;
        }
        "hello" => {
            let proto = args.first().map(|p| String::from_utf8_lossy(p).to_string());
            match proto.as_deref() {
                None | Some("2") => hello_reply(&mut out, fd),
                Some(_) => {
                    status = "error";
                    out.error("NOPROTO unsupported protocol version")
                }
            }
        }
        "command" => command_reply(&mut out, args),
        "client" => {
            let sub = args
                .first()
                .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
            match (sub.as_deref(), args.len()) {
                (Some("setname"), 2) => {
                    session.name = Some(args[1].to_vec());
                    out.simple("OK")
                }
                (Some("getname"), 1) => match &session.name {
                    Some(n) => out.bulk(n),
                    None => out.nil(),
                },
                (Some("setinfo"), 3) => out.simple("OK"),
                (Some("id"), 1) => out.int(fd as i64),
                _ => {
                    status = "error";
                    out.error(&format!(
                        "ERR unknown subcommand or wrong number of arguments for 'client|{}'",
                        sub.unwrap_or_default()
                    ))
                }
            }
        }
        "select" => {
            let db = args
                .first()
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<i64>().ok());
            if args.len() != 1 {
                arity(false, &mut out);
                status = "error";
            } else if db == Some(shared.db) {
                out.simple("OK")
            } else {
                status = "error";
                out.error(&format!("ERR this proxy serves db {} only", shared.db))
            }
        }
        "info" => {
            let text = info_text(shared);
            out.bulk(text.as_bytes())
        }
        "set" | "del" if shared.allow_writes => {
            let ok = if name == "set" {
                args.len() >= 2
            } else {
                !args.is_empty()
            };
            if arity(ok, &mut out) {
                let written = if name == "set" {
                    shared
                        .proxy
                        .set(args[0], args[1], &args[2..], fd)
                        .map(|r| out.set_reply(&r))
                } else {
                    shared.proxy.del(args, fd).map(|n| out.int(n as i64))
                };
                match written {
                    Ok(()) => {}
                    Err(e) => {
                        status = "error";
                        out.error(&backend_error_line(&e))
                    }
                }
            } else {
                status = "error";
            }
        }
        _ => {
            status = "error";
            let shown: String = String::from_utf8_lossy(argv[0]).chars().take(128).collect();
            out.error(&format!("ERR unknown command '{shown}'"))
        }
    }
    tally.add(status);
    next
}

/// The one mapping from backend errors to RESP error lines.
fn backend_error_line(e: &BackendError) -> String {
    match e {
        BackendError::Unavailable(_) => "ERR redis unavailable".into(),
        BackendError::Timeout => "ERR redis timeout".into(),
        BackendError::Reply(msg) => msg.clone(),
    }
}

fn hello_reply(out: &mut Out, fd: usize) {
    out.array(14);
    out.bulk(b"server");
    out.bulk(b"redis-proxy");
    out.bulk(b"version");
    out.bulk(SERVER_VERSION.as_bytes());
    out.bulk(b"proto");
    out.int(2);
    out.bulk(b"id");
    out.int(fd as i64);
    out.bulk(b"mode");
    out.bulk(b"standalone");
    out.bulk(b"role");
    out.bulk(b"master");
    out.bulk(b"modules");
    out.array(0);
}

/// A row of COMMAND: name, Redis's arity (negative = at least), flags, and
/// first key, last key, key step.
type CommandInfo = (&'static str, i64, &'static [&'static str], i64, i64, i64);

/// Commands served.
const COMMANDS: &[CommandInfo] = &[
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("quit", -1, &["fast"], 0, 0, 0),
    ("hello", -1, &["fast"], 0, 0, 0),
    ("command", -1, &["loading"], 0, 0, 0),
    ("client", -2, &["loading"], 0, 0, 0),
    ("select", 2, &["loading", "fast"], 0, 0, 0),
    ("info", -1, &["loading"], 0, 0, 0),
];

fn command_reply(out: &mut Out, args: &[&[u8]]) {
    let sub = args
        .first()
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
    match sub.as_deref() {
        Some("count") => out.int(COMMANDS.len() as i64),
        // redis-cli asks for DOCS at start-up; an empty map keeps it quiet.
        Some("docs") => out.array(0),
        None | Some("info") => {
            out.array(COMMANDS.len());
            for (name, arity, flags, first, last, step) in COMMANDS {
                out.array(6);
                out.bulk(name.as_bytes());
                out.int(*arity);
                out.array(flags.len());
                for f in *flags {
                    out.simple(f);
                }
                out.int(*first);
                out.int(*last);
                out.int(*step);
            }
        }
        Some(other) => out.error(&format!(
            "ERR unknown subcommand '{other}'. Try COMMAND HELP."
        )),
    }
}

fn info_text(shared: &RespShared) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let proxy = &shared.proxy;
    let m = &shared.metrics;
    let snapshot = proxy.snapshot();
    let cs = snapshot.cache;
    let bs = snapshot.backend;
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
    s.push_str("\r\n# Stats\r\n");
    let rows: [(&str, u64); 18] = [
        ("cache_hits_total", m.hits.get()),
        ("cache_misses_total", m.misses.get()),
        ("cache_coalesced_total", m.coalesced.get()),
        ("cache_evictions_lru_total", cs.evictions_lru.load(Relaxed)),
        ("cache_evictions_ttl_total", cs.evictions_ttl.load(Relaxed)),
        ("cache_entries", snapshot.cache_entries as u64),
        ("cache_bytes", snapshot.cache_bytes as u64),
        (
            "cache_stale_served_revalidate_total",
            m.stale_revalidate.get(),
        ),
        ("cache_stale_served_error_total", m.stale_error.get()),
        ("cache_refreshes_total", m.refreshes.get()),
        ("redis_requests_total", bs.requests.load(Relaxed)),
        (
            "redis_errors_unavailable_total",
            bs.errors_unavailable.load(Relaxed),
        ),
        (
            "redis_errors_timeout_total",
            bs.errors_timeout.load(Relaxed),
        ),
        ("redis_errors_reply_total", bs.errors_reply.load(Relaxed)),
        ("redis_reconnects_total", bs.reconnects.load(Relaxed)),
        ("clients_rejected_total", m.clients_rejected.load(Relaxed)),
        ("clients_reaped_total", m.clients_reaped.load(Relaxed)),
        // Redis's own name for the same figure.
        ("total_net_output_bytes", m.response_bytes_total()),
    ];
    for (k, v) in rows {
        s.push_str(&format!("{k}:{v}\r\n"));
    }
    s.push_str(&format!(
        "keyspace_hits:{}\r\nkeyspace_misses:{}\r\n",
        m.hits.get(),
        m.misses.get()
    ));
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

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut args = Vec::new();
        let mut pos = 0;
        let mut cmds = Vec::new();
        loop {
            match parse(&input[pos..], 1 << 20, &mut args)? {
                Parsed::Complete { consumed } => {
                    if !args.is_empty() {
                        cmds.push(
                            args.iter()
                                .map(|r| input[pos + r.start..pos + r.end].to_vec())
                                .collect(),
                        );
                    }
                    pos += consumed;
                }
                Parsed::Incomplete { .. } => return Ok(cmds),
            }
        }
    }

    /// A multibulk command parses into its arguments, binary-safe.
    #[test]
    fn multibulk() {
        let cmds = parse_all(b"*2\r\n$3\r\nGET\r\n$3\r\na\r\n\r\n").unwrap();
        assert_eq!(cmds, vec![vec![b"GET".to_vec(), b"a\r\n".to_vec()]]);
    }

    /// Inline commands split on spaces; CRLF or LF ends them.
    #[test]
    fn inline() {
        let cmds = parse_all(b"PING\r\nGET  key\n\r\n").unwrap();
        assert_eq!(
            cmds,
            vec![
                vec![b"PING".to_vec()],
                vec![b"GET".to_vec(), b"key".to_vec()]
            ]
        );
    }

    /// A pipeline split at every byte boundary parses to the same commands.
    #[test]
    fn split_at_every_byte() {
        let input: &[u8] =
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$0\r\n\r\n";
        let whole = parse_all(input).unwrap();
        assert_eq!(whole.len(), 3);
        for cut in 0..input.len() {
            // Feed the first `cut` bytes, then everything: the result must match.
            let mut args = Vec::new();
            let mut pos = 0;
            let mut got = Vec::new();
            let mut avail = cut;
            loop {
                match parse(&input[pos..avail], 1 << 20, &mut args).unwrap() {
                    Parsed::Complete { consumed } => {
                        if !args.is_empty() {
                            got.push(
                                args.iter()
                                    .map(|r| input[pos + r.start..pos + r.end].to_vec())
                                    .collect::<Vec<_>>(),
                            );
                        }
                        pos += consumed;
                    }
                    Parsed::Incomplete { need } => {
                        assert!(need > avail - pos, "need must ask for more bytes");
                        if avail == input.len() {
                            break;
                        }
                        avail = input.len();
                    }
                }
            }
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    /// Malformed input is a protocol error, never a panic.
    #[test]
    fn malformed() {
        let mut args = Vec::new();
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n+GET\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*99999999999999999999999\r\n",
            b"*1\r\n$1\rX",
            b"*+1\r\n$3\r\nGET\r\n",
            b"*1\r\n$03\r\nGET\r\n",
        ] {
            assert!(parse(bad, 1 << 20, &mut args).is_err(), "{bad:?}");
        }
        assert!(parse(&[b'a'; MAX_INLINE + 2], 1 << 20, &mut args).is_err());
    }

    /// An inline command longer than the request bound is refused.
    #[test]
    fn inline_over_limit() {
        let mut args = Vec::new();
        let mut line = b"GET ".to_vec();
        line.extend(std::iter::repeat_n(b'x', 2000));
        assert!(parse(&line, 1024, &mut args).is_err());
        line.extend_from_slice(b"\r\n");
        assert!(parse(&line, 1024, &mut args).is_err());
        assert!(parse(&line, 4096, &mut args).is_ok());
    }

    /// A bulk longer than the request bound is refused before it is buffered.
    #[test]
    fn bulk_over_limit() {
        let mut args = Vec::new();
        assert!(parse(b"*1\r\n$2000\r\n", 1024, &mut args).is_err());
        assert_eq!(
            parse(b"*1\r\n$1000\r\n", 1024, &mut args),
            Ok(Parsed::Incomplete { need: 1013 })
        );
    }

    /// Error replies never contain line breaks.
    #[test]
    fn error_lines_are_single_line() {
        let mut buf = Vec::new();
        Out(&mut buf).error("ERR a\r\nb");
        assert_eq!(buf, b"-ERR a  b\r\n");
    }
}
