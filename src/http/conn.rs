//! http::conn: one client connection, from accept to close.
//!
//! The loop: read what the socket has, answer every complete request in
//! the buffer into one output buffer, write it with one `writev`, read
//! again. So pipelined requests cost one read and one write per batch, and
//! everything due is written before the connection closes, whatever ends
//! it (a half-close, a malformed request behind valid ones, a refused
//! body). The key reads at the front of the buffer (two or more GET/HEAD
//! requests in a row) are looked up together first ([`prefetch`]), so
//! their misses share one Redis round trip. Cached values of more than
//! [`COPY_MAX`] bytes are written from
//! the cache entry itself, never copied; smaller ones are copied once, into
//! the output buffer.
//!
//! Bounds: a head over 128 KiB is 431 (exact: the buffer never holds more
//! unparsed head than that plus one read); a PUT body over the configured
//! maximum is 413; a body on a request that takes none is skipped up to
//! [`MAX_DISCARD`] bytes, beyond that the connection closes after the reply.
//! Output is flushed every [`FLUSH_BYTES`] while a pipeline is answered, and
//! what the connection holds is reported to [`Permit::hold`] (the bound on
//! all clients' buffers together).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use may::net::TcpStream;

use super::parse::{self, BodyLength, HeadError, Method};
use super::{parse_target, status_line, Body, HttpShared, Reply, BUSY_RESPONSE};
use crate::backend::BackendError;
use crate::cache::Value;
use crate::clients::Permit;
use crate::config::MAX_HEAD_BYTES;
use crate::metrics::{Frontend, Status, Tally};
use crate::proxy::Lookup;

/// First (and usual) size of a connection's read buffer.
const READ_CHUNK: usize = 8 * 1024;
/// Values up to this size are copied into the output buffer (cheaper than
/// an extra iovec); larger ones are written from the cache entry.
const COPY_MAX: usize = 16 * 1024;
/// Output built up to this many bytes is written before more requests of a
/// pipeline are answered.
const FLUSH_BYTES: usize = 256 * 1024;
/// At most this many values by reference in one write (IOV_MAX is 1024).
const MAX_VALUES: usize = 256;
/// Largest body of a request that takes none that is skipped to keep the
/// connection usable; above it, the connection closes after the reply.
const MAX_DISCARD: usize = 1 << 20;
/// How long a write may make no progress while the client has more
/// requests waiting (it pipelines and never reads) before it is cut.
const UNREAD_STALL: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading (and dropping) what the
/// client still sends, so the close does not reset a reply in flight.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one accepted connection until it ends.
pub(super) fn serve(stream: TcpStream, shared: &HttpShared) {
    let fd = stream.as_raw_fd() as usize;
    let Some(permit) = shared.clients.admit(fd) else {
        refuse(stream, shared, fd);
        return;
    };
    let mut conn = Conn {
        permit,
        stream,
        shared,
        fd,
        out: Out::default(),
        tally: Tally::default(),
        rbuf: vec![0; READ_CHUNK],
        start: 0,
        filled: 0,
        scan: 0,
        fresh: true,
        awaiting: None,
        skip: 0,
        continued: false,
        stall_guard: false,
        prefetched: VecDeque::new(),
    };
    conn.run();
}

/// Over the client limit: the 503 goes out at once (it is the answer to
/// whatever request the client sends), counted as one answered request.
fn refuse(mut stream: TcpStream, shared: &HttpShared, fd: usize) {
    let guard = shared.clients.reject(fd, BUSY_RESPONSE);
    shared.metrics.request(Status::Http503, Duration::ZERO);
    drain(&mut stream);
    // Unregister before the fd is closed (and can be reused).
    drop(guard);
}

/// Reads and drops until the peer closes, for at most [`LINGER`].
fn drain(stream: &mut TcpStream) {
    let until = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What answering the next buffered request came to.
enum Step {
    /// It is not all here yet.
    Need,
    /// Answered; look for the next one.
    Next,
    /// Answered; close once the output is written.
    Close,
}

/// Which `Connection` header a reply carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConnHeader {
    None,
    Close,
    KeepAlive,
}

struct Conn<'a> {
    // Fields drop in this order: the permit unregisters before the socket
    // closes, so no one else can take the fd number meanwhile.
    permit: Permit,
    stream: TcpStream,
    shared: &'a HttpShared,
    fd: usize,
    out: Out,
    tally: Tally,
    /// Read buffer; `rbuf[start..filled]` is unanswered input.
    rbuf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Input before this index holds no end of the head at `start`.
    scan: usize,
    /// The head at `start` has not been parsed yet.
    fresh: bool,
    /// Bytes from `start` the request there needs (head and body).
    awaiting: Option<usize>,
    /// Body bytes still to drop, of a request already answered.
    skip: usize,
    /// `100 Continue` was sent for the request at `start`.
    continued: bool,
    /// The socket's write timeout is [`UNREAD_STALL`] (else none).
    stall_guard: bool,
    /// Lookups fetched ahead for the key requests of a pipeline, in order,
    /// each with where its request starts in `rbuf` (see [`prefetch`]).
    prefetched: VecDeque<(usize, Result<Lookup, BackendError>)>,
}

impl Conn<'_> {
    fn run(&mut self) {
        let mut batch_start = Instant::now();
        loop {
            let step = self.answer_buffered(batch_start);
            if !self.flush(batch_start) || self.permit.is_evicted() {
                return;
            }
            if matches!(step, Step::Close) {
                let _ = self.stream.shutdown(Shutdown::Write);
                drain(&mut self.stream);
                return;
            }
            // Everything complete was answered: end of input ends the
            // connection with nothing lost.
            if !self.read() {
                return;
            }
            batch_start = Instant::now();
        }
    }

    /// Answers every complete request in the buffer.
    fn answer_buffered(&mut self, batch_start: Instant) -> Step {
        let step = self.answer_each(batch_start);
        // Offsets into a buffer about to move: whatever was not used goes.
        self.prefetched.clear();
        step
    }

    fn answer_each(&mut self, batch_start: Instant) -> Step {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.filled - self.start);
                self.start += n;
                self.skip -= n;
                self.scan = self.start;
                if self.skip > 0 {
                    return Step::Need;
                }
            }
            if self.start == self.filled {
                return Step::Need;
            }
            match self.answer_one(batch_start) {
                Step::Next => {}
                other => return other,
            }
            let full = self.out.pending() >= FLUSH_BYTES || self.out.values.len() >= MAX_VALUES;
            if full && !self.flush(batch_start) {
                return Step::Close;
            }
        }
    }

    /// Answers the request at `start`, if it is all here.
    fn answer_one(&mut self, batch_start: Instant) -> Step {
        let buf = &self.rbuf[self.start..self.filled];
        match self.awaiting {
            Some(need) if buf.len() < need => return Step::Need,
            Some(_) => {}
            // Re-parse a growing head only when it may have ended.
            None if !self.fresh && !parse::may_end_head(buf, self.scan - self.start) => {
                self.scan = self.filled;
                if buf.len() > MAX_HEAD_BYTES {
                    emit_error(&mut self.out, &mut self.tally, HeadError::TooLarge);
                    return Step::Close;
                }
                return Step::Need;
            }
            None => {}
        }
        let head = match parse::parse_head(buf) {
            Ok(Some(head)) => head,
            Ok(None) => {
                self.fresh = false;
                self.scan = self.filled;
                return Step::Need;
            }
            Err(e) => {
                emit_error(&mut self.out, &mut self.tally, e);
                return Step::Close;
            }
        };
        let shared = self.shared;
        let _in_flight = self.permit.begin(batch_start);
        let head_only = head.method == Method::Head;
        if self.permit.draining() && head.target != b"/-/metrics" {
            // Arrived after the drain began: a short refusal, so no long
            // reply is cut when reading ends (a scrape is still answered:
            // it is short, and shows the drain).
            let reply = Reply::busy("shutting down");
            emit(
                &mut self.out,
                &mut self.tally,
                reply,
                head_only,
                ConnHeader::Close,
            );
            return Step::Close;
        }
        let len = match head.body {
            BodyLength::Bytes(len) => len,
            BodyLength::Unknown(why) => {
                // Where this request ends is unknown: answer, then close.
                let reply = Reply::error(400, why, None);
                emit(
                    &mut self.out,
                    &mut self.tally,
                    reply,
                    head_only,
                    ConnHeader::Close,
                );
                return Step::Close;
            }
        };
        let available = buf.len() - head.len;
        let writes = shared.allow_writes && matches!(head.method, Method::Put | Method::Delete);
        let (reply, consumed, mut close) = if writes && head.method == Method::Put {
            if len > shared.max_body {
                (Reply::error(413, "body too large", None), head.len, true)
            } else if available < len {
                self.awaiting = Some(head.len + len);
                if head.expect_continue && !self.continued {
                    self.continued = true;
                    self.out
                        .buf
                        .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                return Step::Need;
            } else {
                let body = &buf[head.len..head.len + len];
                (shared.write(&head, body, self.fd), head.len + len, false)
            }
        } else {
            let reply = if writes {
                shared.write(&head, &[], self.fd)
            } else {
                // More input behind this request: it may be a pipeline of
                // reads whose misses can share one round trip.
                if self.prefetched.is_empty() && available > len {
                    self.prefetched =
                        prefetch(&self.rbuf[..self.filled], self.start, shared, self.fd);
                }
                let looked_up = match self.prefetched.front() {
                    Some((at, _)) if *at == self.start => {
                        self.prefetched.pop_front().map(|(_, r)| r)
                    }
                    Some(_) => {
                        self.prefetched.clear();
                        None
                    }
                    None => None,
                };
                shared.route(&head, self.fd, looked_up)
            };
            let here = len.min(available);
            self.skip = len - here;
            // A body not yet sent after `Expect: 100-continue` may never
            // come: where the next request starts is unknown.
            let unknown_end = len > MAX_DISCARD || (self.skip > 0 && head.expect_continue);
            (reply, head.len + here, unknown_end)
        };
        if close {
            self.skip = 0;
        }
        close |= head.close || self.permit.draining();
        let conn = match (close, head.keep_alive) {
            (true, _) => ConnHeader::Close,
            (false, true) => ConnHeader::KeepAlive,
            (false, false) => ConnHeader::None,
        };
        emit(&mut self.out, &mut self.tally, reply, head_only, conn);
        self.start += consumed;
        self.scan = self.start;
        self.fresh = true;
        self.awaiting = None;
        self.continued = false;
        if close {
            Step::Close
        } else {
            Step::Next
        }
    }

    /// Writes the output built so far; false if the connection is gone.
    fn flush(&mut self, batch_start: Instant) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let unparsed = self.filled - self.start;
        let n = self.out.pending();
        if !self.permit.hold(unparsed + n) {
            return false;
        }
        // Counted before the write: while it takes, the reaper sees a
        // client taking in a reply, not an idle one; and a client that has
        // read a reply finds it counted.
        self.permit.sent(n);
        let metrics = &self.shared.metrics;
        metrics.response_bytes(Frontend::Http, n);
        if !self.tally.is_empty() {
            // Every request of the batch is answered by this write, so they
            // share one latency (up to the write, as may_minihttp's loop
            // measured it): one clock read per batch.
            metrics.requests_batch(&mut self.tally, batch_start.elapsed());
        }
        // A client asking for more while it reads nothing gets one stall
        // of grace; one that asks for nothing more is bound only by the
        // idle timeout, however slowly it reads. One syscall, only when
        // the case changes.
        let asking = unparsed > 0;
        if asking != self.stall_guard {
            self.stall_guard = asking;
            let _ = self
                .stream
                .set_write_timeout(asking.then_some(UNREAD_STALL));
        }
        let written = self.out.write_to(&mut self.stream);
        if let Err(e) = &written {
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                metrics.clients_reaped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.permit.hold(unparsed) && written.is_ok()
    }

    /// Reads more input; false at end of input, on an error, or once evicted.
    fn read(&mut self) -> bool {
        if self.start > 0 {
            self.rbuf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.scan = self.scan.saturating_sub(self.start);
            self.start = 0;
        }
        let need = self.awaiting.unwrap_or(0);
        if self.filled == self.rbuf.len() || need > self.rbuf.len() {
            // Bounded: unparsed head bytes never exceed MAX_HEAD_BYTES plus
            // one read (then 431), and `need` is one PUT (at most max_body).
            let grown = (self.rbuf.len() * 2).max(need);
            self.rbuf.resize(grown, 0);
        } else if self.rbuf.len() > 4 * READ_CHUNK && self.filled < READ_CHUNK && need == 0 {
            self.rbuf.truncate(READ_CHUNK);
            self.rbuf.shrink_to_fit();
        }
        match self.stream.read(&mut self.rbuf[self.filled..]) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.filled += n;
                self.permit.hold(self.filled)
            }
        }
    }
}

/// Most requests of a pipeline read ahead in one batch.
const MAX_PREFETCH: usize = 1024;

/// The prefetch stage: the run of complete plain key reads (GET or HEAD of
/// a key, no body, not an operations path) that starts at `from` in `buf`,
/// read with one [`Proxy::get_batch`] when it holds two or more, so their
/// misses go to Redis in one round trip. The run stops at any other
/// request (a write, a body, `/-/`, a bad target, an unfinished head), so
/// no read is moved before a request ahead of it; and after a request
/// that closes the connection. Returns each lookup with where its request
/// starts in `buf`.
fn prefetch(
    buf: &[u8],
    from: usize,
    shared: &HttpShared,
    fd: usize,
) -> VecDeque<(usize, Result<Lookup, BackendError>)> {
    let mut at = from;
    let mut starts = Vec::new();
    let mut keys = Vec::new();
    while at < buf.len() && keys.len() < MAX_PREFETCH {
        let Ok(Some(head)) = parse::parse_head(&buf[at..]) else {
            break;
        };
        let plain_read = matches!(head.method, Method::Get | Method::Head)
            && matches!(head.body, BodyLength::Bytes(0))
            && !head.target.starts_with(b"/-/");
        let Some(target) = plain_read.then(|| parse_target(head.target).ok()).flatten() else {
            break;
        };
        starts.push(at);
        keys.push(target.key);
        at += head.len;
        if head.close {
            break;
        }
    }
    if keys.len() < 2 {
        return VecDeque::new();
    }
    let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
    starts
        .into_iter()
        .zip(shared.proxy.get_batch(&keys, fd))
        .collect()
}

/// Encodes `reply` into `out` and counts it.
fn emit(out: &mut Out, tally: &mut Tally, reply: Reply, head_only: bool, conn: ConnHeader) {
    let status = status_line(reply.code);
    tally.add(Status::http(usize::from(reply.code)));
    let buf = &mut out.buf;
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_bytes());
    buf.extend_from_slice(b"\r\nDate: ");
    date::append(buf);
    if let Some(content_type) = reply.content_type {
        buf.extend_from_slice(b"\r\nContent-Type: ");
        buf.extend_from_slice(content_type.as_bytes());
    }
    if let Some(x_cache) = reply.x_cache {
        buf.extend_from_slice(b"\r\nX-Cache: ");
        buf.extend_from_slice(x_cache.as_bytes());
    }
    if let Some(cache_status) = reply.cache_status {
        buf.extend_from_slice(b"\r\nCache-Status: ");
        buf.extend_from_slice(cache_status.as_bytes());
    }
    if let Some(allow) = reply.allow {
        buf.extend_from_slice(b"\r\nAllow: ");
        buf.extend_from_slice(allow.as_bytes());
    }
    if reply.retry_after {
        buf.extend_from_slice(b"\r\nRetry-After: 1");
    }
    match conn {
        ConnHeader::None => {}
        ConnHeader::Close => buf.extend_from_slice(b"\r\nConnection: close"),
        ConnHeader::KeepAlive => buf.extend_from_slice(b"\r\nConnection: keep-alive"),
    }
    if reply.code != 204 {
        // HEAD says the length a GET would have.
        buf.extend_from_slice(b"\r\nContent-Length: ");
        let mut digits = itoa_buf();
        buf.extend_from_slice(format_usize(reply.body.len(), &mut digits));
    }
    buf.extend_from_slice(b"\r\n\r\n");
    if head_only {
        return;
    }
    match reply.body {
        Body::Empty => {}
        Body::Static(b) => buf.extend_from_slice(b),
        Body::Owned(b) => buf.extend_from_slice(&b),
        Body::Value(v) => out.value(v),
    }
}

/// A 400 or 431 for a head that cannot be served; the connection then closes.
fn emit_error(out: &mut Out, tally: &mut Tally, e: HeadError) {
    let reply = Reply::error(e.status(), e.message(), None);
    emit(out, tally, reply, false, ConnHeader::Close);
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// The decimal digits of `n`, in `buf`.
fn format_usize(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Replies waiting to be written: bytes, and large values by reference.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    /// Each value goes on the wire where `buf` stood at that length.
    values: Vec<(usize, Value)>,
    value_bytes: usize,
}

impl Out {
    fn value(&mut self, value: Value) {
        if value.len() <= COPY_MAX {
            self.buf.extend_from_slice(&value);
        } else {
            self.value_bytes += value.len();
            self.values.push((self.buf.len(), value));
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.values.is_empty()
    }

    /// Bytes held for the client.
    fn pending(&self) -> usize {
        self.buf.len() + self.value_bytes
    }

    /// Writes everything, then empties itself (also on error).
    fn write_to(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        let result = if self.values.is_empty() {
            stream.write_all(&self.buf)
        } else {
            let mut slices = Vec::with_capacity(2 * self.values.len() + 1);
            let mut at = 0;
            for (pos, value) in &self.values {
                if *pos > at {
                    slices.push(IoSlice::new(&self.buf[at..*pos]));
                }
                slices.push(IoSlice::new(value));
                at = *pos;
            }
            if at < self.buf.len() {
                slices.push(IoSlice::new(&self.buf[at..]));
            }
            write_all_vectored(stream, &mut slices)
        };
        self.buf.clear();
        if self.buf.capacity() > 4 * FLUSH_BYTES {
            self.buf.shrink_to(FLUSH_BYTES);
        }
        self.values.clear();
        self.value_bytes = 0;
        result
    }
}

fn write_all_vectored(stream: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `Date` header value, formatted once per second per worker thread.
mod date {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        // Never held across a yield (the coroutine may move threads).
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }

    pub(super) fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != secs {
                *cached = (secs, httpdate::fmt_http_date(now).into_bytes());
            }
            out.extend_from_slice(&cached.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decimal formatting of lengths.
    #[test]
    fn formats_lengths() {
        let mut b = itoa_buf();
        assert_eq!(format_usize(0, &mut b), b"0");
        assert_eq!(format_usize(1234567, &mut b), b"1234567");
        assert_eq!(
            format_usize(usize::MAX, &mut b),
            usize::MAX.to_string().as_bytes()
        );
    }

    /// A reply encodes with its real length, also for HEAD, and the
    /// connection header asked for.
    #[test]
    fn encodes_replies() {
        let mut out = Out::default();
        let mut tally = Tally::default();
        let reply = Reply {
            x_cache: Some("HIT"),
            ..Reply::new(200, "application/octet-stream", Body::Static(b"hello"))
        };
        emit(&mut out, &mut tally, reply, true, ConnHeader::KeepAlive);
        let text = String::from_utf8(out.buf.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nDate: "), "{text}");
        assert!(text.contains("\r\nX-Cache: HIT\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: keep-alive\r\n"), "{text}");
        assert!(text.ends_with("\r\nContent-Length: 5\r\n\r\n"), "{text}");
        assert!(!tally.is_empty());
    }
}
