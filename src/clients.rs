//! clients: the connected-client limit, the registry of live connections,
//! and the reaper that closes idle or oversize ones.
//!
//! Owns admission (a may semaphore whose permit lives as long as the
//! connection), the over-limit answer, and closing connections from outside
//! their coroutine. Knows nothing of the cache or Redis, and parses nothing:
//! front ends tell it when a request completes.
//!
//! may_minihttp has no idle timeout, no request size bound and no way for a
//! service to close its connection. What a service does know is its socket's
//! fd, and that it is dropped before that fd is closed. So each connection
//! registers under its fd, and a reaper thread `shutdown(2)`s the ones that
//! idle too long or buffer too much; the connection's loop then sees EOF and
//! ends. The reaper shuts a socket down only while holding the registry shard
//! lock over its entry, and a connection unregisters (under the same lock)
//! before its fd is closed, so the reaper never touches a reused fd; and a
//! permit removes only its own entry (same `ConnState`), never one that a
//! later connection on the same fd number registered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use may::sync::Semphore;

use crate::config::MAX_HEAD_BYTES;
use crate::metrics::Metrics;

/// How long a refused connection may linger after its error was written.
const REJECTED_LINGER: Duration = Duration::from_secs(1);
/// Longest pause between two reaper passes.
const MAX_REAP_TICK: Duration = Duration::from_millis(100);

/// One live connection as the reaper sees it.
#[derive(Debug)]
struct ConnState {
    /// Milliseconds since `Clients::origin` at the last completed request.
    last_active_ms: AtomicU64,
    /// How long it may go without a complete request.
    limit_ms: u64,
    /// Requests completed so far.
    requests: AtomicU64,
    /// Bytes an incomplete request may buffer before the connection is cut.
    max_pending_bytes: u64,
    /// Reaper-owned: requests seen at the last pass, and the socket's
    /// received-byte count then.
    seen_requests: AtomicU64,
    bytes_mark: AtomicU64,
    /// Reply bytes produced so far (exactly what goes on the wire).
    produced: AtomicU64,
    /// Connection-owned: how many reply bytes the peer had acknowledged at
    /// the last over-bound check, and since when (ms) it has acknowledged
    /// nothing more while over the bound (`NOT_STALLED` if it has).
    acked_mark: AtomicU64,
    stall_since_ms: AtomicU64,
    /// Reaper-owned: the acknowledged-byte count at its last look, and when
    /// it last grew. A client taking in a reply is not idle.
    acked_seen: AtomicU64,
    last_progress_ms: AtomicU64,
    closed: AtomicBool,
    /// Set when `Permit::sent` cut the connection for unread replies.
    cut: AtomicBool,
    /// A request is being processed (per connection, so the hot path never
    /// touches a counter shared between workers).
    busy: AtomicBool,
}

/// Reply bytes a client may leave unread while asking for more. Past this,
/// a client that acknowledges nothing for [`UNREAD_STALL`] is cut (it
/// pipelines and never reads); one that keeps reading is served on.
pub const MAX_UNREAD_BYTES: u64 = 16 << 20;
/// Reply bytes a client may leave unread while asking for more, reading or
/// not: the bound on what piles up in may_minihttp's reply buffer. One
/// reply of any size is never cut for its size.
pub const MAX_UNREAD_HARD_BYTES: u64 = 64 << 20;
/// How long a client over [`MAX_UNREAD_BYTES`] may go without reading.
const UNREAD_STALL: Duration = Duration::from_secs(1);
const NOT_STALLED: u64 = u64::MAX;

/// Admission and reaping for every client connection, HTTP and RESP.
pub struct Clients {
    permits: Semphore,
    max: usize,
    idle: Duration,
    origin: Instant,
    registry: DashMap<usize, Arc<ConnState>>,
    /// Set at shutdown: replies ask clients to close.
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Held by a connection for its whole life; returns the permit on drop.
pub struct Permit {
    clients: Arc<Clients>,
    fd: usize,
    state: Arc<ConnState>,
    counted: bool,
}

impl Clients {
    /// A limit of `max` connections, each closed after `idle` without a request.
    pub fn new(max: usize, idle: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Clients {
            permits: Semphore::new(max),
            max,
            idle,
            origin: Instant::now(),
            registry: DashMap::new(),
            draining: AtomicBool::new(false),
            metrics,
        })
    }

    /// The configured limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections holding a permit now.
    pub fn connected(&self) -> usize {
        self.max - self.permits.get_value().min(self.max)
    }

    /// Takes a permit for the connection on `fd`, or `None` at the limit.
    /// Never waits: it runs in the accept loop. Also turns Nagle off: a
    /// reply is written whole, so nothing is gained by delaying it (and
    /// may_minihttp's accept loop does not do it).
    pub fn admit(self: &Arc<Self>, fd: usize, max_pending_bytes: usize) -> Option<Permit> {
        sys::set_nodelay(fd);
        if !self.permits.try_wait() {
            self.metrics
                .clients_rejected
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.metrics
            .clients_connected
            .fetch_add(1, Ordering::Relaxed);
        let state = self.register(fd, self.idle, max_pending_bytes);
        Some(Permit {
            clients: self.clone(),
            fd,
            state,
            counted: true,
        })
    }

    /// Answers a connection refused at the limit: writes `reply` to it at
    /// once, ends our sending side, and lets it linger briefly so the client
    /// reads the reply instead of a reset. The returned guard keeps it
    /// registered (for the reaper) until its connection ends.
    pub fn reject(self: &Arc<Self>, fd: usize, reply: &[u8]) -> Permit {
        sys::send_now(fd, reply);
        sys::shutdown_write(fd);
        let state = self.register(fd, REJECTED_LINGER, 64 * 1024);
        Permit {
            clients: self.clone(),
            fd,
            state,
            counted: false,
        }
    }

    fn register(&self, fd: usize, limit: Duration, max_pending_bytes: usize) -> Arc<ConnState> {
        let state = Arc::new(ConnState {
            last_active_ms: AtomicU64::new(self.now_ms()),
            limit_ms: limit.as_millis() as u64,
            requests: AtomicU64::new(0),
            max_pending_bytes: max_pending_bytes as u64,
            seen_requests: AtomicU64::new(0),
            // Everything a new connection has received is an unfinished head
            // until a request completes, even bytes that beat the accept.
            bytes_mark: AtomicU64::new(0),
            produced: AtomicU64::new(0),
            acked_mark: AtomicU64::new(0),
            stall_since_ms: AtomicU64::new(NOT_STALLED),
            acked_seen: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        });
        self.registry.insert(fd, state.clone());
        state
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Starts the reaper thread; it stops when the `Clients` is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) -> thread::JoinHandle<()> {
        let tick = (self.idle / 4).clamp(Duration::from_millis(10), MAX_REAP_TICK);
        let weak: Weak<Clients> = Arc::downgrade(self);
        thread::Builder::new()
            .name("client-reaper".into())
            .spawn(move || loop {
                thread::sleep(tick);
                match weak.upgrade() {
                    Some(clients) => clients.reap(tick),
                    None => return,
                }
            })
            .expect("spawn client reaper thread")
    }

    /// One reaper pass: closes connections idle past their limit, and those
    /// whose unfinished request has buffered more than allowed.
    fn reap(&self, tick: Duration) {
        let now = self.now_ms();
        let tick_ms = tick.as_millis() as u64;
        for entry in self.registry.iter() {
            let (fd, state) = (*entry.key(), entry.value());
            if state.closed.load(Ordering::Relaxed) {
                continue;
            }
            // A client taking in a reply is not idle: while replies are
            // outstanding, each tick in which it acknowledged more bytes
            // (the last ones included) restarts its idle clock. One
            // TCP_INFO read per connection with unacknowledged replies.
            if state.produced.load(Ordering::Relaxed) > state.acked_seen.load(Ordering::Relaxed) {
                let acked = sys::tcp_counters(fd).map_or(0, |c| c.1);
                if acked > state.acked_seen.swap(acked, Ordering::Relaxed) {
                    state.last_progress_ms.store(now, Ordering::Relaxed);
                }
            }
            let last_request = state.last_active_ms.load(Ordering::Relaxed);
            let last = last_request.max(state.last_progress_ms.load(Ordering::Relaxed));
            let idle_ms = now.saturating_sub(last);
            let mut close = idle_ms >= state.limit_ms;
            // The head bound counts from the last complete request, reading
            // or not: a slow download must not shelter a growing head.
            let idle_ms = now.saturating_sub(last_request);
            if !close && idle_ms >= tick_ms {
                // No request completed during the last tick: is one growing?
                let requests = state.requests.load(Ordering::Relaxed);
                let received = sys::tcp_counters(fd).map_or(0, |c| c.0);
                if requests != state.seen_requests.swap(requests, Ordering::Relaxed) {
                    state.bytes_mark.store(received, Ordering::Relaxed);
                } else {
                    let pending = received.saturating_sub(state.bytes_mark.load(Ordering::Relaxed));
                    close = pending > state.max_pending_bytes;
                }
            }
            if close {
                // Still under the shard lock: the fd cannot have been reused.
                state.closed.store(true, Ordering::Relaxed);
                sys::shutdown_both(fd);
                self.metrics.clients_reaped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Marks the start of a graceful shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Connections with a request in progress, or with reply bytes the
    /// client has not yet acknowledged (counted from the kernel's send queue:
    /// while may_minihttp still holds part of a reply, that queue is not empty).
    pub fn unfinished(&self) -> usize {
        self.registry
            .iter()
            .filter(|e| e.value().busy.load(Ordering::SeqCst) || sys::unsent_bytes(*e.key()) > 0)
            .count()
    }

    /// Stops reading on every registered connection (graceful shutdown): a
    /// reply being produced is still written, then each connection ends.
    pub fn close_all(&self) {
        for entry in self.registry.iter() {
            entry.value().closed.store(true, Ordering::Relaxed);
            sys::shutdown_read(*entry.key());
        }
    }
}

impl Permit {
    /// Records that a complete request arrived at `at`; the guard marks it
    /// in flight until dropped.
    pub fn begin(&self, at: Instant) -> InFlight<'_> {
        self.state
            .last_active_ms
            .store(self.clients.ms_at(at), Ordering::Relaxed);
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        self.state.busy.store(true, Ordering::SeqCst);
        InFlight(&self.state)
    }

    /// Ends this connection once the reply being built is written: reading
    /// stops now, so the connection loop ends after its next write.
    pub fn close_after_reply(&self) {
        self.state.closed.store(true, Ordering::Relaxed);
        sys::shutdown_read(self.fd);
    }

    /// True once a graceful shutdown has begun.
    pub fn draining(&self) -> bool {
        // SeqCst pairs with `begin`'s busy flag: either this request sees the
        // drain, or the drain sees this request busy and waits for it.
        self.clients.draining.load(Ordering::SeqCst)
    }

    /// Records a reply of `n` bytes (exactly what goes on the wire), and cuts
    /// the connection if the client asks for more while it leaves earlier
    /// replies unread: over [`MAX_UNREAD_HARD_BYTES`], or over
    /// [`MAX_UNREAD_BYTES`] with nothing acknowledged for [`UNREAD_STALL`].
    /// Checked here, per reply, because may_minihttp's reply buffer takes
    /// whatever it is given and a reaper tick is long enough for a
    /// pipelining client to pile up gigabytes. A batch of pipelined replies
    /// is built before any of it is written, so a bound crossed within one
    /// batch by a client that reads is not a stall.
    pub fn sent(&self, n: usize) {
        let state = &self.state;
        let before = state.produced.fetch_add(n as u64, Ordering::Relaxed);
        if before.saturating_sub(state.acked_mark.load(Ordering::Relaxed)) <= MAX_UNREAD_BYTES {
            return;
        }
        if state.closed.load(Ordering::Relaxed) {
            return;
        }
        let now = self.clients.now_ms();
        let acked = sys::tcp_counters(self.fd).map_or(0, |c| c.1);
        let progressed = acked != state.acked_mark.swap(acked, Ordering::Relaxed);
        if progressed || state.stall_since_ms.load(Ordering::Relaxed) == NOT_STALLED {
            state.stall_since_ms.store(now, Ordering::Relaxed);
        }
        let unread = before.saturating_sub(acked);
        let stalled_ms = now.saturating_sub(state.stall_since_ms.load(Ordering::Relaxed));
        let stalled = stalled_ms >= UNREAD_STALL.as_millis() as u64;
        if unread > MAX_UNREAD_HARD_BYTES || (unread > MAX_UNREAD_BYTES && stalled) {
            // Our own live fd (we are inside its request): safe to shut.
            state.closed.store(true, Ordering::Relaxed);
            state.cut.store(true, Ordering::Relaxed);
            sys::shutdown_both(self.fd);
            self.clients
                .metrics
                .clients_reaped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True once [`Permit::sent`] cut the connection: requests still
    /// buffered behind the cut need no work, their replies cannot arrive.
    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::Relaxed)
    }

    /// Whether this connection was refused at the limit.
    pub fn is_rejected(&self) -> bool {
        !self.counted
    }
}

/// A request being processed; see [`Permit::begin`].
pub struct InFlight<'a>(&'a ConnState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Only our own entry: should the fd already be closed and reused,
        // the entry under it is the new connection's.
        self.clients
            .registry
            .remove_if(&self.fd, |_, state| Arc::ptr_eq(state, &self.state));
        if self.counted {
            self.clients
                .metrics
                .clients_connected
                .fetch_sub(1, Ordering::Relaxed);
            self.clients.permits.post();
        }
    }
}

/// The head bound HTTP connections are registered with.
pub const HTTP_MAX_PENDING: usize = MAX_HEAD_BYTES;

/// Thin wrappers over the socket calls the reaper needs.
mod sys {
    /// Writes `bytes` without blocking or raising SIGPIPE; best effort.
    pub fn send_now(fd: usize, bytes: &[u8]) {
        // SAFETY: fd is a live socket owned by the caller's connection, and
        // the pointer and length come from a valid slice.
        unsafe {
            libc::send(
                fd as libc::c_int,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            );
        }
    }

    pub fn shutdown_write(fd: usize) {
        // SAFETY: shutdown on a live socket fd; errors are ignored on purpose.
        unsafe {
            libc::shutdown(fd as libc::c_int, libc::SHUT_WR);
        }
    }

    pub fn set_nodelay(fd: usize) {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int option on a live socket fd.
        unsafe {
            libc::setsockopt(
                fd as libc::c_int,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    pub fn shutdown_read(fd: usize) {
        // SAFETY: as above.
        unsafe {
            libc::shutdown(fd as libc::c_int, libc::SHUT_RD);
        }
    }

    pub fn shutdown_both(fd: usize) {
        // SAFETY: as above; the caller guarantees the fd is still this connection's.
        unsafe {
            libc::shutdown(fd as libc::c_int, libc::SHUT_RDWR);
        }
    }

    /// Bytes in the socket's send queue not yet acknowledged by the peer.
    pub fn unsent_bytes(fd: usize) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int for a socket fd.
        let rc = unsafe { libc::ioctl(fd as libc::c_int, libc::TIOCOUTQ, &mut n) };
        if rc == 0 {
            n.max(0) as usize
        } else {
            0
        }
    }

    /// Bytes the kernel has received on this TCP socket, and bytes the peer
    /// has acknowledged.
    pub fn tcp_counters(fd: usize) -> Option<(u64, u64)> {
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd as libc::c_int,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            );
            (rc == 0).then_some((info.tcpi_bytes_received, info.tcpi_bytes_acked))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fd no test process has open: the socket calls fail harmlessly.
    const FD: usize = 1 << 20;

    /// A permit dropped after its fd number was reused removes its own
    /// registry entry only, not the new connection's.
    #[test]
    fn permit_drop_leaves_a_reused_fds_entry() {
        let clients = Clients::new(4, Duration::from_secs(60), Arc::default());
        let old = clients.admit(FD, 1024).expect("admitted");
        let new = clients.admit(FD, 1024).expect("admitted");
        drop(old);
        let entry = clients.registry.get(&FD).map(|e| e.value().clone());
        assert!(entry.is_some_and(|s| Arc::ptr_eq(&s, &new.state)));
        assert_eq!(clients.connected(), 1);
        drop(new);
        assert!(clients.registry.is_empty());
        assert_eq!(clients.connected(), 0);
    }
}
