//! cache: exact LRU (by reads) plus a global TTL over a sharded map.
//!
//! Owns the key/value store, its recency order, its insertion order and the
//! sweeper that reclaims expired entries. Knows nothing of Redis, HTTP,
//! coroutines or metrics: the read-through core (`proxy`) decides what to
//! load and counts hits and misses; this module only counts what it evicts.
//!
//! # Design
//! Each entry is one allocation holding its key, its value, its slab node and
//! its insertion time ([`Value`], 24 bytes of header behind a thin pointer);
//! the entries live in a [`DashMap`] keyed by themselves, so a hit takes one
//! shard read lock and never the global lock. The recency order (a doubly
//! linked list of 24-byte slab nodes) and the insertion order (a second list
//! through the same nodes) sit behind one `Mutex<Order>`. A hit records
//! `(node, entry address, time)` into a bounded
//! lossy channel of its thread's stripe (`try_send`, dropped when full) and
//! drains the stripes itself under `try_lock` once its own is a quarter full,
//! as Caffeine and moka do. Every insert drains all stripes under the lock,
//! merged by time, before it decides what to evict, so requests that do not
//! overlap in time see exact LRU. Under overload (more than [`READ_BUFFER`]
//! hits on one stripe between two drains) some reads are dropped and the
//! order becomes approximate; `dropped_reads` counts them.
//!
//! The TTL is global and counted from insertion, so entries expire in
//! insertion order: the sweeper pops the head of the insertion list until it
//! finds a live entry, O(expired) per sweep. Reads also check age lazily, so
//! an entry is never served once `age >= ttl`, swept or not.
//!
//! # Byte bound and stale entries
//! [`Limits`] adds a bound on the key + value bytes held (`Order::bytes`, the
//! sum of [`Value::size`] over the entries, kept under the order lock from
//! the lengths already in each entry's header, so entries do not grow) and a
//! grace period: an expired entry is kept, not swept, until
//! `age >= ttl + grace`, so the core can still answer it stale
//! ([`Cache::get_stale`]) while [`Cache::get`] treats it as gone. Removals
//! (`remove`, `clear`) are real removals: a removed key is never served stale.

mod entry;

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use dashmap::DashMap;

pub use entry::{Value, MAX_VALUE_BYTES};

/// Bounds beyond the key count, all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bound on key + value bytes held; 0 = none.
    pub max_bytes: usize,
    /// Values longer than this are never cached; 0 = any.
    pub max_value_bytes: usize,
    /// How long past the TTL an expired entry is kept for stale answers.
    pub grace: Duration,
}

/// Capacity of the lossy read buffer (hits waiting to be applied to the order).
pub const READ_BUFFER: usize = 1024;
/// A hit drains the read buffer itself once it holds this many reads.
const DRAIN_THRESHOLD: usize = READ_BUFFER / 4;
/// Marks "no node" in the intrusive lists.
const NIL: u32 = u32::MAX;

/// Monotonic time source, injectable so TTL tests move time instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since an arbitrary fixed origin; never decreases.
    fn now(&self) -> u64;
}

/// The real clock: the CPU's time-stamp counter through `quanta`, relative
/// to the moment it was created. Every hit reads the clock; on this VM
/// `clock_gettime` costs ~43 ns, the TSC a fraction of that.
#[derive(Debug)]
pub struct SystemClock {
    origin: quanta::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: quanta::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        quanta::Instant::now()
            .duration_since(self.origin)
            .as_nanos() as u64
    }
}

/// Read buffers, one per group of threads, so hits on different cores do
/// not contend on one channel.
const READ_STRIPES: usize = 8;

/// The calling thread's stripe, fixed for the thread's life. Used within a
/// single call (never across a yield), so coroutines moving between worker
/// threads is harmless.
pub(crate) fn thread_stripe() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    STRIPE.with(|s| *s)
}

/// A clock that moves only when told to; for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MockClock {
    nanos: AtomicU64,
}

impl MockClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for MockClock {
    fn now(&self) -> u64 {
        self.nanos.load(Ordering::SeqCst)
    }
}

/// What the cache has evicted so far; read by `metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Entries evicted to make room (least recently read first).
    pub evictions_lru: AtomicU64,
    /// Entries removed because their age reached the TTL.
    pub evictions_ttl: AtomicU64,
    /// Reads not recorded in the recency order because the buffer was full.
    pub dropped_reads: AtomicU64,
}

/// The map's key: the entry itself, hashed and compared by its key bytes,
/// so a bucket is one thin pointer and the key is stored once.
struct ByKey(Value);

impl Hash for ByKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly as `[u8]` does, for lookups by `&[u8]` (Borrow).
        self.0.key().hash(state)
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}

impl Eq for ByKey {}

impl Borrow<[u8]> for ByKey {
    fn borrow(&self) -> &[u8] {
        self.0.key()
    }
}

/// A read waiting to be applied to the recency order: the entry's node and
/// the entry's address, which must still match when the read is applied.
/// `at` orders reads recorded in different stripes.
///
/// The address cannot name a newer entry (ABA): a hit pushes its read while
/// it still holds a handle to the entry, so the entry's memory is freed,
/// and can be reused by another entry, only after the push; and a node gets
/// a new entry only in `insert`, which allocates that entry *before* it
/// takes the lock and drains, so the drain takes every read pushed before
/// the allocation (a stripe never holds more than the drain takes). Moving
/// the allocation under the lock, after the drain, would break this.
#[derive(Clone, Copy)]
struct Read {
    addr: usize,
    node: u32,
    at: u64,
}

/// A slab node, linked into both the recency list and the insertion list.
/// `entry` is `None` while the node is on the free list, which is chained
/// through `lru_next`. 24 bytes.
struct Node {
    entry: Option<Value>,
    lru_prev: u32,
    lru_next: u32,
    ttl_prev: u32,
    ttl_next: u32,
}

impl Node {
    fn free() -> Node {
        Node {
            entry: None,
            lru_prev: NIL,
            lru_next: NIL,
            ttl_prev: NIL,
            ttl_next: NIL,
        }
    }
}

/// Nodes per slab chunk (96 KiB).
const CHUNK: usize = 4096;

/// The nodes, in fixed-size chunks: growing never copies nodes and never
/// reserves more than one chunk ahead, so the slab costs 24 bytes per node
/// ever in use at once (a doubling `Vec` costs up to 48), and a node's
/// index stays valid for the cache's life.
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Node]>>,
    /// Nodes handed out so far.
    len: u32,
}

impl Slab {
    /// Nodes handed out so far (in use or on the free list).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len as usize
    }

    /// A new free node, past every node handed out so far.
    fn grow(&mut self) -> u32 {
        let idx = self.len;
        assert!(idx != NIL, "more than u32::MAX - 1 cached keys");
        if (idx as usize).is_multiple_of(CHUNK) {
            self.chunks.push((0..CHUNK).map(|_| Node::free()).collect());
        }
        self.len += 1;
        idx
    }

    fn get(&self, idx: u32) -> Option<&Node> {
        let idx = idx as usize;
        self.chunks.get(idx / CHUNK).map(|c| &c[idx % CHUNK])
    }

    fn get_mut(&mut self, idx: u32) -> Option<&mut Node> {
        let idx = idx as usize;
        self.chunks
            .get_mut(idx / CHUNK)
            .map(|c| &mut c[idx % CHUNK])
    }
}

impl std::ops::Index<u32> for Slab {
    type Output = Node;

    fn index(&self, idx: u32) -> &Node {
        self.get(idx).expect("slab index in range")
    }
}

impl std::ops::IndexMut<u32> for Slab {
    fn index_mut(&mut self, idx: u32) -> &mut Node {
        self.get_mut(idx).expect("slab index in range")
    }
}

/// Both orders over the cached keys. Guarded by one mutex because every
/// change to the set of keys touches both lists and the map together.
struct Order {
    nodes: Slab,
    /// Head of the free-node list.
    free: u32,
    /// Keys held (the map's length, without taking all its shard locks).
    len: usize,
    /// Key + value bytes held: the sum of [`Value::size`] over the entries.
    bytes: usize,
    /// Scratch space for merging the read stripes.
    pending: Vec<Read>,
    /// Most recently read.
    lru_head: u32,
    /// Least recently read: the next LRU victim.
    lru_tail: u32,
    /// Oldest insertion: the next to expire.
    ttl_head: u32,
    /// Newest insertion.
    ttl_tail: u32,
}

impl Order {
    fn new() -> Self {
        Order {
            nodes: Slab::default(),
            free: NIL,
            len: 0,
            bytes: 0,
            pending: Vec::new(),
            lru_head: NIL,
            lru_tail: NIL,
            ttl_head: NIL,
            ttl_tail: NIL,
        }
    }

    /// Takes a node for `entry`, links it as most recently read and newest.
    fn alloc(&mut self, entry: Value) -> u32 {
        let idx = match self.free {
            NIL => self.nodes.grow(),
            idx => {
                self.free = self.nodes[idx].lru_next;
                idx
            }
        };
        self.len += 1;
        self.bytes += entry.size();
        self.nodes[idx].entry = Some(entry);
        self.lru_push_front(idx);
        self.ttl_push_back(idx);
        idx
    }

    /// Unlinks a node from both lists and frees it; returns its entry.
    fn release(&mut self, idx: u32) -> Option<Value> {
        let entry = self.nodes.get_mut(idx)?.entry.take()?;
        self.lru_unlink(idx);
        self.ttl_unlink(idx);
        self.nodes[idx].lru_next = self.free;
        self.free = idx;
        self.len -= 1;
        self.bytes -= entry.size();
        Some(entry)
    }

    fn touch(&mut self, read: Read) {
        let Some(node) = self.nodes.get(read.node) else {
            return;
        };
        let current = node.entry.as_ref().is_some_and(|e| e.addr() == read.addr);
        if !current || self.lru_head == read.node {
            return;
        }
        self.lru_unlink(read.node);
        self.lru_push_front(read.node);
    }

    fn lru_push_front(&mut self, idx: u32) {
        let old = self.lru_head;
        {
            let node = &mut self.nodes[idx];
            node.lru_prev = NIL;
            node.lru_next = old;
        }
        if old == NIL {
            self.lru_tail = idx;
        } else {
            self.nodes[old].lru_prev = idx;
        }
        self.lru_head = idx;
    }

    fn lru_unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let node = &self.nodes[idx];
            (node.lru_prev, node.lru_next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.nodes[prev].lru_next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.nodes[next].lru_prev = prev;
        }
    }

    fn ttl_push_back(&mut self, idx: u32) {
        let old = self.ttl_tail;
        {
            let node = &mut self.nodes[idx];
            node.ttl_prev = old;
            node.ttl_next = NIL;
        }
        if old == NIL {
            self.ttl_head = idx;
        } else {
            self.nodes[old].ttl_next = idx;
        }
        self.ttl_tail = idx;
    }

    fn ttl_unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let node = &self.nodes[idx];
            (node.ttl_prev, node.ttl_next)
        };
        if prev == NIL {
            self.ttl_head = next;
        } else {
            self.nodes[prev].ttl_next = next;
        }
        if next == NIL {
            self.ttl_tail = prev;
        } else {
            self.nodes[next].ttl_prev = prev;
        }
    }
}

/// The shared cache: one per process, used by every worker.
pub struct Cache {
    /// Every entry, by key. Values carry their own node and birth time, so
    /// the map holds nothing else.
    map: DashMap<ByKey, ()>,
    /// Every change to the set of keys happens under this lock, so the map and
    /// both lists always hold the same keys and `len() <= capacity` holds.
    order: Mutex<Order>,
    reads: Vec<(Sender<Read>, Receiver<Read>)>,
    capacity: usize,
    ttl: u64,
    /// Byte bound; `usize::MAX` when off.
    max_bytes: usize,
    /// Longest value cached; `usize::MAX` when off.
    max_value_bytes: usize,
    /// Expired entries are removed once `age >= keep` (TTL + grace).
    keep: u64,
    clock: Arc<dyn Clock>,
    stats: CacheStats,
}

impl Cache {
    /// A cache of at most `capacity` keys whose entries live for `ttl`.
    /// `capacity == 0` caches nothing.
    pub fn new(capacity: usize, ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        let ttl = ttl.as_nanos().min(u64::MAX as u128) as u64;
        Cache {
            map: DashMap::new(),
            order: Mutex::new(Order::new()),
            reads: (0..READ_STRIPES)
                .map(|_| crossbeam_channel::bounded(READ_BUFFER))
                .collect(),
            capacity,
            ttl,
            max_bytes: usize::MAX,
            max_value_bytes: usize::MAX,
            keep: ttl,
            clock,
            stats: CacheStats::default(),
        }
    }

    /// The same cache with byte bounds and a grace period for stale entries.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        let off = |n: usize| if n == 0 { usize::MAX } else { n };
        self.max_bytes = off(limits.max_bytes);
        self.max_value_bytes = off(limits.max_value_bytes);
        let grace = limits.grace.as_nanos().min(u64::MAX as u128) as u64;
        self.keep = self.ttl.saturating_add(grace);
        self
    }

    /// Whether expired entries are kept for a grace period.
    pub fn keeps_expired(&self) -> bool {
        self.keep > self.ttl
    }

    /// Key + value bytes held now, expired-but-kept entries included.
    /// Takes the order lock: for scrapes and tests, not the hit path.
    pub fn bytes(&self) -> usize {
        self.lock_order().bytes
    }

    /// Whether a value of `len` bytes under `key_len` key bytes would be
    /// cached at all (capacity, value bound, byte bound).
    pub fn admits(&self, key_len: usize, len: usize) -> bool {
        self.capacity > 0 && len <= self.max_value_bytes && key_len + len <= self.max_bytes
    }

    /// Maximum number of keys held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of keys held now, expired-but-unswept ones included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Eviction counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The value for `key` if it is cached and younger than the TTL.
    /// Records the read for the recency order; takes no global lock unless
    /// the read buffer needs draining and the lock is free.
    pub fn get(&self, key: &[u8]) -> Option<Value> {
        self.read(key, self.ttl).map(|(value, _)| value)
    }

    /// The value for `key` if it is cached and younger than the TTL plus
    /// `window` (at most the grace given in [`Limits`]: older entries are
    /// gone), and whether it is past the TTL. Records the read as `get` does.
    pub fn get_stale(&self, key: &[u8], window: Duration) -> Option<(Value, bool)> {
        let window = window.as_nanos().min(u64::MAX as u128) as u64;
        self.read(key, self.ttl.saturating_add(window))
    }

    #[inline]
    fn read(&self, key: &[u8], limit: u64) -> Option<(Value, bool)> {
        let now = self.clock.now();
        let (value, stale) = {
            let found = self.map.get(key)?;
            let entry = &found.key().0;
            let age = now.saturating_sub(entry.born());
            if age >= limit {
                return None;
            }
            (entry.clone(), age >= self.ttl)
        };
        // Pushed while `value` is held: see `Read` for why that matters.
        let read = Read {
            addr: value.addr(),
            node: value.node(),
            at: now,
        };
        let (tx, _) = &self.reads[thread_stripe() % READ_STRIPES];
        match tx.try_send(read) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped_reads.fetch_add(1, Ordering::Relaxed);
            }
        }
        if tx.len() >= DRAIN_THRESHOLD {
            if let Ok(mut order) = self.order.try_lock() {
                self.drain_reads(&mut order);
            }
        }
        Some((value, stale))
    }

    /// Caches `value` under `key`, replacing any older entry, and returns the
    /// shared copy. Expired entries go first; then, while the key count or
    /// the byte bound leaves no room, the least recently read key is
    /// evicted. A value the limits do not admit ([`Cache::admits`]) is
    /// returned uncached, and any older entry for the key is dropped. The
    /// bytes are copied before the order lock is taken.
    ///
    /// # Panics
    /// If `value` is longer than [`MAX_VALUE_BYTES`].
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Value {
        // Before the lock and the drain: the ABA argument on `Read` needs it.
        let entry = Value::new(key, value);
        if self.capacity == 0 {
            return entry;
        }
        let admitted = self.admits(key.len(), value.len());
        let mut order = self.lock_order();
        self.drain_reads(&mut order);
        let now = self.clock.now();
        if let Some((old, ())) = self.map.remove(key) {
            order.release(old.0.node());
        }
        if !admitted {
            // The old value is older than what Redis just said: not kept.
            return entry;
        }
        self.expire(&mut order, now);
        let size = entry.size();
        while (order.len >= self.capacity || order.bytes + size > self.max_bytes)
            && order.lru_tail != NIL
        {
            // Linked nodes always hold an entry; stop rather than spin if not.
            let tail = order.lru_tail;
            let Some(victim) = order.release(tail) else {
                break;
            };
            self.map.remove(victim.key());
            self.stats.evictions_lru.fetch_add(1, Ordering::Relaxed);
        }
        let node = order.alloc(entry.clone());
        entry.place(node, now);
        // The key was removed above under this lock, so this adds a key: a
        // replace would keep the old entry as the key (hashbrown keeps keys).
        let replaced = self.map.insert(ByKey(entry.clone()), ());
        debug_assert!(replaced.is_none(), "map and order disagree");
        entry
    }

    /// Drops `key`; true if it was cached.
    pub fn remove(&self, key: &[u8]) -> bool {
        let mut order = self.lock_order();
        match self.map.remove(key) {
            Some((old, ())) => {
                order.release(old.0.node());
                true
            }
            None => false,
        }
    }

    /// Drops every key.
    pub fn clear(&self) {
        let mut order = self.lock_order();
        self.map.clear();
        let pending = std::mem::take(&mut order.pending);
        *order = Order::new();
        order.pending = pending;
        for (_, rx) in &self.reads {
            while rx.try_recv().is_ok() {}
        }
    }

    /// Removes every entry whose age has reached the TTL plus the grace
    /// period; returns how many.
    /// Costs O(expired): entries expire in insertion order.
    pub fn sweep(&self) -> usize {
        let mut order = self.lock_order();
        self.expire(&mut order, self.clock.now())
    }

    /// Starts a thread that calls [`Cache::sweep`] every `interval` until the
    /// cache is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, interval: Duration) -> thread::JoinHandle<()> {
        let weak: Weak<Cache> = Arc::downgrade(self);
        thread::Builder::new()
            .name("cache-sweeper".into())
            .spawn(move || loop {
                thread::sleep(interval);
                match weak.upgrade() {
                    Some(cache) => {
                        cache.sweep();
                    }
                    None => return,
                }
            })
            .expect("spawn cache sweeper thread")
    }

    /// Entries from least to most recently read, after applying buffered
    /// reads. For tests and diagnostics: O(n) under the lock.
    pub fn entries_lru_first(&self) -> Vec<Value> {
        let mut order = self.lock_order();
        self.drain_reads(&mut order);
        let mut entries = Vec::with_capacity(order.len);
        let mut idx = order.lru_tail;
        while idx != NIL {
            let node = &order.nodes[idx];
            entries.extend(node.entry.clone());
            idx = node.lru_prev;
        }
        entries
    }

    fn lock_order(&self) -> MutexGuard<'_, Order> {
        // A panic under the lock cannot leave the lists half-linked in a way
        // later calls would trust less than the map, so keep serving.
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drain_reads(&self, order: &mut Order) {
        let mut pending = std::mem::take(&mut order.pending);
        for (_, rx) in &self.reads {
            // Bounded so a flood of concurrent hits cannot keep the lock
            // holder here; a stripe never holds more than this, so every
            // read pushed before the drain began is taken.
            pending.extend(rx.try_iter().take(READ_BUFFER));
        }
        // Stripes interleave in time: apply reads in the order they happened
        // (stable, so equal times keep their order within a stripe).
        pending.sort_by_key(|r| r.at);
        for read in pending.drain(..) {
            order.touch(read);
        }
        order.pending = pending;
    }

    fn expire(&self, order: &mut Order, now: u64) -> usize {
        let mut removed = 0;
        while order.ttl_head != NIL {
            let idx = order.ttl_head;
            // Linked nodes always hold an entry; stop rather than spin if not.
            let Some(born) = order.nodes[idx].entry.as_ref().map(Value::born) else {
                break;
            };
            if now.saturating_sub(born) < self.keep {
                break;
            }
            if let Some(entry) = order.release(idx) {
                self.map.remove(entry.key());
            }
            removed += 1;
        }
        self.stats
            .evictions_ttl
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> &[u8] {
        s.as_bytes()
    }

    fn cache(capacity: usize, ttl_ms: u64) -> (Cache, Arc<MockClock>) {
        let clock = Arc::new(MockClock::default());
        let cache = Cache::new(capacity, Duration::from_millis(ttl_ms), clock.clone());
        (cache, clock)
    }

    fn names(entries: Vec<Value>) -> Vec<String> {
        entries
            .iter()
            .map(|e| String::from_utf8(e.key().to_vec()).unwrap())
            .collect()
    }

    /// A cached value is returned as inserted.
    #[test]
    fn get_returns_inserted_value() {
        let (c, _) = cache(10, 1000);
        c.insert(key("a"), key("1"));
        assert_eq!(c.get(b"a").as_deref(), Some(&b"1"[..]));
        assert!(c.get(b"b").is_none());
    }

    /// `insert` hands back the cached copy: later hits share its allocation.
    #[test]
    fn insert_returns_the_shared_entry() {
        let (c, _) = cache(10, 1000);
        let stored = c.insert(b"k", b"v");
        let hit = c.get(b"k").unwrap();
        assert_eq!(stored.addr(), hit.addr());
        assert_eq!((hit.key(), &*hit), (&b"k"[..], &b"v"[..]));
    }

    /// Nodes freed by removal, eviction and expiry are reused, so churn at a
    /// fixed size does not grow the slab.
    #[test]
    fn freed_nodes_are_reused() {
        let (c, clock) = cache(4, 100);
        // Miri (unsafe-code checks of `entry`) runs a shorter version.
        let rounds = if cfg!(miri) { 100 } else { 1000 };
        for i in 0..rounds {
            c.insert(i.to_string().as_bytes(), b"v");
            if i % 3 == 0 {
                c.remove(i.to_string().as_bytes());
            }
            if i % 7 == 0 {
                clock.advance(Duration::from_millis(60));
            }
        }
        let order = c.lock_order();
        assert!(order.nodes.len() <= 4, "slab grew to {}", order.nodes.len());
        assert_eq!(order.len, c.map.len());
    }

    /// Orders span slab chunks: LRU stays exact past the first chunk.
    #[test]
    fn order_spans_slab_chunks() {
        let cap = CHUNK + 10;
        let (c, _) = cache(cap, 1000);
        for i in 0..cap {
            c.insert(i.to_string().as_bytes(), b"v");
        }
        c.get(b"0");
        c.insert(b"new", b"v");
        assert!(c.get(b"1").is_none(), "1 was least recently read");
        let names = names(c.entries_lru_first());
        assert_eq!(names.len(), cap);
        assert_eq!(names[0], "2");
        assert_eq!(names[cap - 2..], ["0", "new"]);
        // The evicted key's node was reused for the new one.
        assert_eq!(c.lock_order().nodes.len(), cap);
    }

    /// Inserting into a full cache evicts the least recently read key.
    #[test]
    fn evicts_least_recently_read() {
        let (c, _) = cache(3, 1000);
        for k in ["a", "b", "c"] {
            c.insert(key(k), key(k));
        }
        assert!(c.get(b"a").is_some());
        c.insert(key("d"), key("d"));
        assert!(c.get(b"b").is_none(), "b was least recently read");
        for k in ["a", "c", "d"] {
            assert!(c.get(k.as_bytes()).is_some(), "{k} should stay");
        }
        assert_eq!(c.stats().evictions_lru.load(Ordering::Relaxed), 1);
    }

    /// The recency order follows reads exactly when calls do not overlap.
    #[test]
    fn order_is_exact_for_sequential_reads() {
        let (c, _) = cache(100, 1000);
        for k in ["a", "b", "c", "d"] {
            c.insert(key(k), key(k));
        }
        // More reads than the drain threshold, to cross a self-drain.
        for _ in 0..DRAIN_THRESHOLD {
            c.get(b"b");
        }
        c.get(b"a");
        c.get(b"d");
        assert_eq!(names(c.entries_lru_first()), ["c", "b", "a", "d"]);
    }

    /// The cache never holds more keys than its capacity.
    #[test]
    fn never_exceeds_capacity() {
        let (c, _) = cache(5, 1000);
        for i in 0..100 {
            c.insert(key(&i.to_string()), key("v"));
            assert!(c.len() <= 5);
        }
        assert_eq!(c.len(), 5);
        assert_eq!(c.entries_lru_first().len(), 5);
    }

    /// An entry is gone once its age equals the TTL, not a moment later.
    #[test]
    fn expires_when_age_reaches_ttl() {
        let (c, clock) = cache(10, 100);
        c.insert(key("a"), key("1"));
        clock.advance(Duration::from_millis(99));
        assert!(c.get(b"a").is_some());
        clock.advance(Duration::from_millis(1));
        assert!(c.get(b"a").is_none());
    }

    /// Reads do not extend the TTL: it counts from insertion.
    #[test]
    fn reads_do_not_refresh_ttl() {
        let (c, clock) = cache(10, 100);
        c.insert(key("a"), key("1"));
        for _ in 0..9 {
            clock.advance(Duration::from_millis(10));
            assert!(c.get(b"a").is_some());
        }
        clock.advance(Duration::from_millis(10));
        assert!(c.get(b"a").is_none());
    }

    /// Re-inserting an expired key makes it live again with a fresh TTL.
    #[test]
    fn reinsert_after_expiry() {
        let (c, clock) = cache(10, 100);
        c.insert(key("a"), key("old"));
        clock.advance(Duration::from_millis(150));
        assert!(c.get(b"a").is_none());
        c.insert(key("a"), key("new"));
        assert_eq!(c.get(b"a").as_deref(), Some(&b"new"[..]));
        clock.advance(Duration::from_millis(99));
        assert_eq!(c.get(b"a").as_deref(), Some(&b"new"[..]));
        assert_eq!(c.len(), 1);
    }

    /// The sweeper removes exactly the expired entries, oldest first.
    #[test]
    fn sweep_removes_only_expired() {
        let (c, clock) = cache(10, 100);
        c.insert(key("a"), key("1"));
        clock.advance(Duration::from_millis(50));
        c.insert(key("b"), key("2"));
        clock.advance(Duration::from_millis(50));
        assert_eq!(c.sweep(), 1);
        assert_eq!(c.len(), 1);
        assert!(c.get(b"b").is_some());
        clock.advance(Duration::from_millis(50));
        assert_eq!(c.sweep(), 1);
        assert!(c.is_empty());
        assert_eq!(c.stats().evictions_ttl.load(Ordering::Relaxed), 2);
    }

    /// A full cache drops expired entries before evicting a live one.
    #[test]
    fn expired_entries_go_before_lru_victims() {
        let (c, clock) = cache(2, 100);
        c.insert(key("old"), key("1"));
        clock.advance(Duration::from_millis(60));
        c.insert(key("live"), key("2"));
        clock.advance(Duration::from_millis(60));
        c.get(b"live");
        c.insert(key("new"), key("3"));
        assert!(c.get(b"live").is_some());
        assert!(c.get(b"new").is_some());
        assert_eq!(c.stats().evictions_lru.load(Ordering::Relaxed), 0);
    }

    /// Capacity 0 caches nothing.
    #[test]
    fn zero_capacity_is_pass_through() {
        let (c, _) = cache(0, 1000);
        c.insert(key("a"), key("1"));
        assert!(c.get(b"a").is_none());
        assert!(c.is_empty());
    }

    /// Replacing a key keeps one entry and serves the new value.
    #[test]
    fn replace_keeps_one_entry() {
        let (c, _) = cache(2, 1000);
        c.insert(key("a"), key("1"));
        c.insert(key("a"), key("2"));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(b"a").as_deref(), Some(&b"2"[..]));
        assert_eq!(c.entries_lru_first().len(), 1);
    }

    /// remove and clear drop entries from the map and both orders.
    #[test]
    fn remove_and_clear() {
        let (c, _) = cache(10, 1000);
        c.insert(key("a"), key("1"));
        c.insert(key("b"), key("2"));
        assert!(c.remove(b"a"));
        assert!(!c.remove(b"a"));
        assert_eq!(names(c.entries_lru_first()), ["b"]);
        c.clear();
        assert!(c.is_empty());
        assert!(c.entries_lru_first().is_empty());
        c.insert(key("c"), key("3"));
        assert_eq!(names(c.entries_lru_first()), ["c"]);
    }

    /// A read recorded before its key was evicted does not move the node's next owner.
    #[test]
    fn stale_reads_are_ignored() {
        let (c, _) = cache(2, 1000);
        c.insert(key("a"), key("1"));
        c.insert(key("b"), key("2"));
        c.get(b"a"); // buffered read of a's node
        c.remove(b"a");
        c.insert(key("c"), key("3")); // reuses a's node
        c.insert(key("d"), key("4")); // must evict b (older than c)
        assert!(c.get(b"b").is_none());
        assert!(c.get(b"c").is_some());
    }

    /// Many threads doing random gets and inserts never push the cache past
    /// its capacity, and nothing outlives its TTL.
    #[test]
    fn stress_capacity_and_ttl() {
        let clock = Arc::new(MockClock::default());
        let c = Arc::new(Cache::new(64, Duration::from_millis(50), clock.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                let clock = clock.clone();
                thread::spawn(move || {
                    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ t;
                    let rounds = if cfg!(miri) { 300 } else { 20_000u64 };
                    for i in 0..rounds {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = (x % 200).to_string();
                        if x.is_multiple_of(10) {
                            c.insert(key(&k), key(&k));
                        } else if let Some(v) = c.get(k.as_bytes()) {
                            assert_eq!(&*v, k.as_bytes());
                        }
                        if t == 0 && i % 100 == 0 {
                            clock.advance(Duration::from_millis(1));
                        }
                        assert!(c.len() <= 64);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(c.len() <= 64);
        assert_eq!(c.entries_lru_first().len(), c.len());
        clock.advance(Duration::from_millis(50));
        for i in 0..200 {
            assert!(c.get(i.to_string().as_bytes()).is_none());
        }
        c.sweep();
        assert!(c.is_empty());
    }

    fn bounded(capacity: usize, limits: Limits) -> (Cache, Arc<MockClock>) {
        let clock = Arc::new(MockClock::default());
        let cache =
            Cache::new(capacity, Duration::from_millis(100), clock.clone()).with_limits(limits);
        (cache, clock)
    }

    /// Sum of `size` over the entries, walked through the recency list.
    fn bytes_by_walk(c: &Cache) -> usize {
        c.entries_lru_first().iter().map(Value::size).sum()
    }

    /// Random inserts, reads, removals and clock moves with random sizes:
    /// after every operation the byte bound and the key count hold, and the
    /// byte count is exactly the sum over the entries held.
    #[test]
    fn byte_bound_property() {
        const BOUND: usize = 4096;
        let (c, clock) = bounded(
            32,
            Limits {
                max_bytes: BOUND,
                max_value_bytes: 2048,
                grace: Duration::from_millis(50),
            },
        );
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rounds = if cfg!(miri) { 300 } else { 20_000 };
        for _ in 0..rounds {
            let r = next();
            let k = format!("k{}", r % 64);
            match r % 16 {
                0..=7 => {
                    // Sizes from 0 to past the value bound and the byte bound.
                    let len = match (r >> 8) % 4 {
                        0 => (r >> 16) as usize % 16,
                        1 => (r >> 16) as usize % 512,
                        2 => (r >> 16) as usize % 2100,
                        _ => (r >> 16) as usize % (BOUND + 64),
                    };
                    let v = c.insert(k.as_bytes(), &vec![b'v'; len]);
                    assert_eq!(v.len(), len, "the value is answered either way");
                    if len > 2048 {
                        assert!(c.get(k.as_bytes()).is_none(), "over the value bound");
                    }
                }
                8..=11 => {
                    c.get(k.as_bytes());
                }
                12 => {
                    c.remove(k.as_bytes());
                }
                13 | 14 => clock.advance(Duration::from_millis((r >> 8) % 30)),
                _ => {
                    c.sweep();
                }
            }
            let bytes = c.bytes();
            assert!(bytes <= BOUND, "{bytes} bytes held");
            assert!(c.len() <= 32);
            assert_eq!(bytes, bytes_by_walk(&c));
            assert_eq!(c.len(), c.entries_lru_first().len());
        }
        c.clear();
        assert_eq!(c.bytes(), 0);
    }

    /// An insert evicts least recently read keys until the new one fits.
    #[test]
    fn byte_bound_evicts_least_recently_read() {
        let (c, _) = bounded(
            100,
            Limits {
                max_bytes: 30,
                ..Limits::default()
            },
        );
        c.insert(b"a", &[0; 9]);
        c.insert(b"b", &[0; 9]);
        c.insert(b"c", &[0; 9]);
        c.get(b"a");
        // 11 more bytes: b (least recently read) goes, then c; a stays.
        c.insert(b"d", &[0; 10]);
        assert_eq!(names(c.entries_lru_first()), ["a", "d"]);
        assert_eq!(c.bytes(), 21);
        assert_eq!(c.stats().evictions_lru.load(Ordering::Relaxed), 2);
    }

    /// A value larger than the byte bound or the value bound is answered
    /// but not cached, and the key's older entry is dropped.
    #[test]
    fn oversize_values_are_not_cached() {
        let (c, _) = bounded(
            100,
            Limits {
                max_bytes: 100,
                max_value_bytes: 50,
                ..Limits::default()
            },
        );
        c.insert(b"k", b"small");
        c.insert(b"other", b"x");
        assert_eq!(c.insert(b"k", &[1; 51]).len(), 51);
        assert!(c.get(b"k").is_none(), "old value dropped, new not kept");
        assert!(c.get(b"other").is_some(), "nothing evicted for it");
        let (c, _) = bounded(
            100,
            Limits {
                max_bytes: 100,
                ..Limits::default()
            },
        );
        c.insert(b"k", &[1; 100]);
        assert!(c.get(b"k").is_none(), "key + value over the bound");
        c.insert(b"k", &[1; 99]);
        assert_eq!(c.bytes(), 100, "exactly the bound fits");
    }

    /// Past the TTL `get` misses, `get_stale` answers within its window,
    /// and the sweeper keeps the entry until TTL + grace.
    #[test]
    fn expired_entries_are_kept_for_the_grace_period() {
        let (c, clock) = bounded(
            10,
            Limits {
                grace: Duration::from_millis(50),
                ..Limits::default()
            },
        );
        c.insert(b"k", b"v");
        assert_eq!(
            c.get_stale(b"k", Duration::from_millis(50)).map(|v| v.1),
            Some(false)
        );
        clock.advance(Duration::from_millis(120));
        c.sweep();
        assert!(c.get(b"k").is_none());
        assert!(
            c.get_stale(b"k", Duration::from_millis(10)).is_none(),
            "past its window"
        );
        let (v, stale) = c.get_stale(b"k", Duration::from_millis(50)).unwrap();
        assert_eq!((&*v, stale), (&b"v"[..], true));
        clock.advance(Duration::from_millis(30));
        assert_eq!(c.sweep(), 1);
        assert!(c.get_stale(b"k", Duration::from_millis(50)).is_none());
        assert!(c.is_empty());
    }

    /// A removed entry is gone for stale reads too.
    #[test]
    fn removed_entries_are_never_stale() {
        let (c, clock) = bounded(
            10,
            Limits {
                grace: Duration::from_millis(50),
                ..Limits::default()
            },
        );
        c.insert(b"a", b"1");
        c.insert(b"b", b"2");
        clock.advance(Duration::from_millis(110));
        c.remove(b"a");
        assert!(c.get_stale(b"a", Duration::from_millis(50)).is_none());
        c.clear();
        assert!(c.get_stale(b"b", Duration::from_millis(50)).is_none());
    }
}
