//! clients: the connected-client limit, the registry of live connections,
//! the reaper that closes idle ones, and the bound on bytes held for all
//! clients together.
//!
//! Owns admission (a may semaphore whose permit lives as long as the
//! connection), the over-limit answer, client-buffer accounting and
//! eviction, and closing connections from outside their coroutine. Knows
//! nothing of the cache or Redis, and parses nothing: front ends tell it
//! when a request completes, how many reply bytes they wrote and how many
//! bytes they hold.
//!
//! Each connection registers under its fd. The reaper thread `shutdown(2)`s
//! the ones that idle too long; eviction does the same to the one holding
//! the most buffer bytes when all of them together exceed the bound. Either
//! way the connection's own loop then sees EOF or a write error and ends.
//! Both shut a socket down only while holding the registry shard lock over
//! its entry, and a connection unregisters (under the same lock) before its
//! fd is closed, so neither touches a reused fd; and a permit removes only
//! its own entry (same `ConnState`), never one that a later connection on
//! the same fd number registered.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use may::sync::Semphore;

use crate::metrics::Metrics;

/// How long a refused connection may linger after its error was written.
const REJECTED_LINGER: Duration = Duration::from_secs(1);
/// Longest pause between two reaper passes.
const MAX_REAP_TICK: Duration = Duration::from_millis(100);
/// Bytes a connection may hold without reporting them to the shared
/// counter: the common case (a read buffer, a batch of small replies) never
/// touches a counter shared between workers. The bound is therefore exact
/// to within this much per connection.
pub const UNCOUNTED_HOLD_BYTES: usize = 64 * 1024;

/// One live connection as the reaper sees it.
#[derive(Debug)]
struct ConnState {
    /// Milliseconds since `Clients::origin` at the last completed request.
    last_active_ms: AtomicU64,
    /// How long it may go without a complete request.
    limit_ms: u64,
    /// Reply bytes produced so far.
    produced: AtomicU64,
    /// Reaper-owned: the acknowledged-byte count at its last look, and when
    /// it last grew. A client taking in a reply is not idle.
    acked_seen: AtomicU64,
    last_progress_ms: AtomicU64,
    closed: AtomicBool,
    /// A request is being processed (per connection, so the hot path never
    /// touches a counter shared between workers).
    busy: AtomicBool,
    /// Buffer bytes this connection holds, as counted in `Clients::held`.
    held: AtomicU64,
    /// Set (before `held` is taken over) when this connection was evicted.
    evicted: AtomicBool,
}

/// Admission, reaping and buffer accounting for every client connection,
/// HTTP and RESP.
pub struct Clients {
    permits: Semphore,
    max: usize,
    idle: Duration,
    origin: Instant,
    registry: DashMap<usize, Arc<ConnState>>,
    /// Set at shutdown: replies ask clients to close.
    draining: AtomicBool,
    /// Buffer bytes held by all connections together (signed: an eviction
    /// may take a connection's bytes over just before their owner adds them).
    held: AtomicI64,
    /// `PROXY_MAX_BUFFER_BYTES`.
    max_held: i64,
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
    /// A limit of `max` connections, each closed after `idle` without a
    /// request, and of `max_buffer_bytes` held for all of them together.
    pub fn new(
        max: usize,
        idle: Duration,
        max_buffer_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Clients {
            permits: Semphore::new(max),
            max,
            idle,
            origin: Instant::now(),
            registry: DashMap::new(),
            draining: AtomicBool::new(false),
            held: AtomicI64::new(0),
            max_held: max_buffer_bytes.min(i64::MAX as u64) as i64,
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

    /// Buffer bytes held by all connections now (as reported to [`Permit::hold`]).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed).max(0) as u64
    }

    /// Takes a permit for the connection on `fd`, or `None` at the limit.
    /// Never waits: it runs in the accept loop. Also turns Nagle off: a
    /// reply is written whole, so nothing is gained by delaying it.
    pub fn admit(self: &Arc<Self>, fd: usize) -> Option<Permit> {
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
        let state = self.register(fd, self.idle);
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
        let state = self.register(fd, REJECTED_LINGER);
        Permit {
            clients: self.clone(),
            fd,
            state,
            counted: false,
        }
    }

    fn register(&self, fd: usize, limit: Duration) -> Arc<ConnState> {
        let state = Arc::new(ConnState {
            last_active_ms: AtomicU64::new(self.now_ms()),
            limit_ms: limit.as_millis() as u64,
            produced: AtomicU64::new(0),
            acked_seen: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            held: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
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
                    Some(clients) => clients.reap(),
                    None => return,
                }
            })
            .expect("spawn client reaper thread")
    }

    /// One reaper pass: closes connections idle past their limit.
    fn reap(&self) {
        let now = self.now_ms();
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
                let acked = sys::bytes_acked(fd).unwrap_or(0);
                if acked > state.acked_seen.swap(acked, Ordering::Relaxed) {
                    state.last_progress_ms.store(now, Ordering::Relaxed);
                }
            }
            let last = state
                .last_active_ms
                .load(Ordering::Relaxed)
                .max(state.last_progress_ms.load(Ordering::Relaxed));
            if now.saturating_sub(last) >= state.limit_ms {
                // Still under the shard lock: the fd cannot have been reused.
                state.closed.store(true, Ordering::Relaxed);
                sys::shutdown_both(fd);
                self.metrics.clients_reaped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Disconnects the connections holding the most buffer bytes until all
    /// of them together are back under the bound (Redis's
    /// `maxmemory-clients`). Their bytes leave the count at once; their
    /// coroutines free the memory when they see the shutdown.
    fn evict_over_bound(&self) {
        while self.held.load(Ordering::SeqCst) > self.max_held {
            let mut largest: Option<(usize, Arc<ConnState>, u64)> = None;
            for entry in self.registry.iter() {
                let state = entry.value();
                let held = state.held.load(Ordering::Relaxed);
                if held > 0
                    && !state.evicted.load(Ordering::Relaxed)
                    && largest.as_ref().is_none_or(|l| held > l.2)
                {
                    largest = Some((*entry.key(), state.clone(), held));
                }
            }
            let Some((fd, victim, _)) = largest else {
                return;
            };
            if let Some(entry) = self.registry.get(&fd) {
                // Only if the fd still names that connection (under the
                // shard lock, so it cannot be reused meanwhile).
                if Arc::ptr_eq(entry.value(), &victim) {
                    victim.evicted.store(true, Ordering::SeqCst);
                    victim.closed.store(true, Ordering::Relaxed);
                    let bytes = victim.held.swap(0, Ordering::SeqCst);
                    self.held.fetch_sub(bytes as i64, Ordering::SeqCst);
                    sys::shutdown_both(fd);
                    self.metrics.clients_evicted.fetch_add(1, Ordering::Relaxed);
                    log::debug!("evicted client fd {fd} holding {bytes} buffer bytes");
                }
            }
        }
    }

    /// Marks the start of a graceful shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Connections with a request in progress, or with reply bytes the
    /// client has not yet acknowledged (counted from the kernel's send queue).
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
        self.state.busy.store(true, Ordering::SeqCst);
        InFlight(&self.state)
    }

    /// True once a graceful shutdown has begun.
    pub fn draining(&self) -> bool {
        // SeqCst pairs with `begin`'s busy flag: either this request sees the
        // drain, or the drain sees this request busy and waits for it.
        self.clients.draining.load(Ordering::SeqCst)
    }

    /// Records `n` reply bytes written to the socket, so the reaper can
    /// tell a client taking in a long reply from an idle one.
    pub fn sent(&self, n: usize) {
        self.state.produced.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reports the buffer bytes this connection holds now (unfinished
    /// request bytes and unsent replies together), replacing its previous
    /// report. Over `PROXY_MAX_BUFFER_BYTES` for all clients together, the
    /// connections holding the most are disconnected, possibly this one.
    /// Returns false once this connection has been evicted: it should stop.
    /// Holdings up to [`UNCOUNTED_HOLD_BYTES`] cost one uncontended load.
    pub fn hold(&self, bytes: usize) -> bool {
        let state = &self.state;
        let bytes = if bytes <= UNCOUNTED_HOLD_BYTES {
            0
        } else {
            bytes as u64
        };
        if bytes == 0 && state.held.load(Ordering::Relaxed) == 0 {
            return !state.evicted.load(Ordering::Relaxed);
        }
        let before = state.held.swap(bytes, Ordering::SeqCst);
        let total = self
            .clients
            .held
            .fetch_add(bytes as i64 - before as i64, Ordering::SeqCst)
            + (bytes as i64 - before as i64);
        if state.evicted.load(Ordering::SeqCst) {
            // Evicted meanwhile: what we just added is ours to take back.
            let mine = state.held.swap(0, Ordering::SeqCst);
            self.clients.held.fetch_sub(mine as i64, Ordering::SeqCst);
            return false;
        }
        if bytes > before && total > self.clients.max_held {
            self.clients.evict_over_bound();
        }
        !state.evicted.load(Ordering::SeqCst)
    }

    /// True once this connection was disconnected to bring the client
    /// buffers back under their bound.
    pub fn is_evicted(&self) -> bool {
        self.state.evicted.load(Ordering::Relaxed)
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
        self.hold(0);
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

    /// Bytes of this TCP socket's output the peer has acknowledged.
    pub fn bytes_acked(fd: usize) -> Option<u64> {
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
            (rc == 0).then_some(info.tcpi_bytes_acked)
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
        let clients = Clients::new(4, Duration::from_secs(60), u64::MAX, Arc::default());
        let old = clients.admit(FD).expect("admitted");
        let new = clients.admit(FD).expect("admitted");
        drop(old);
        let entry = clients.registry.get(&FD).map(|e| e.value().clone());
        assert!(entry.is_some_and(|s| Arc::ptr_eq(&s, &new.state)));
        assert_eq!(clients.connected(), 1);
        drop(new);
        assert!(clients.registry.is_empty());
        assert_eq!(clients.connected(), 0);
    }
}
