//! coherence: the cache's freshness protocol, in one place.
//!
//! Owns the marks on fetches in flight (which double as the single-flight
//! table), the invalidation epoch, the cache generation and whether tracking
//! is ready; applies invalidations and flushes to the cache. The read-through
//! core (`proxy`) asks it whether the cache may be used and whether a value it
//! fetched may stay; the layers below the core (the backend's data links, the
//! invalidation listener in `tracking`) only report events into it through
//! [`Freshness`]. It never talks to Redis and never calls up into the core.
//!
//! # State machine
//! One process-wide state, `Tracking` only with `CACHE_INVALIDATION=tracking`:
//!
//! | state | cache served and filled | entered by |
//! |---|---|---|
//! | `Off` | yes | start, tracking off (writes still [`invalidate`](Coherence::invalidate)) |
//! | `Down` | no: reads bypass it | start with tracking; [`listener_down`](Freshness::listener_down) (then flush) |
//! | `Up(id)` | yes | [`listener_up(id)`](Freshness::listener_up) |
//!
//! Events and what they do in every state:
//! - `invalidate(key)`: `epoch += 1`, mark the key's flight stale, remove the key.
//! - `flush` (a `FLUSHALL` message, the listener lost, a data link reopened:
//!   Redis forgot what it tracked for the old link, redis#11767):
//!   `generation += 1`, empty the cache.
//! - `tracking_failed` (`CLIENT TRACKING` on a data link refused or unanswered):
//!   `generation += 1` (what is in flight may be untracked).
//!
//! Push mode (`tracking-resp3`, or `tracking` after
//! [`redirect_refused`](Freshness::redirect_refused), which flushes once):
//! invalidations come as RESP3 pushes on the data links
//! ([`pushed`](Freshness::pushed), the same `invalidate` / `flush`), the
//! listener's state no longer gates the cache (it is served as in `Up`), and
//! a tracked data link lost ([`data_link_lost`](Freshness::data_link_lost))
//! flushes at once, before it is reopened.
//!
//! One fetch (a [`Lead`] for one key, a [`Ticket`] for a multi-key read) is a
//! small machine of its own: `Started(generation g, epoch e)` -> `Fetched`
//! -> `Kept` or `Dropped`. It records `g` before the core decides the cache is
//! usable, and its flight mark is in the table before the GET is sent, so an
//! invalidation that overtakes the GET reply (lettuce#3481) still finds it.
//! After the value is inserted (insert first, then check: an event before the
//! check is seen by it, one after it removes the entry itself) the entry is
//! kept only if, for a single key, the mark is not stale, the generation is
//! still `g` and the state serves the cache; for a multi-key read, the epoch
//! is still `e` (it cannot tell which keys changed), the generation is still
//! `g` and the state serves the cache.
//!
//! Stale answers (the core's stale-while-revalidate and stale-if-error) add
//! no state here: an entry kept past its TTL is an ordinary cache entry, so
//! `invalidate` and `flush` remove it like any other, a background refresh
//! is an ordinary `Lead` (moved into its own coroutine, which is why a lead
//! owns an `Arc` of this state), and the core serves nothing stale unless
//! [`usable`](Coherence::usable) says the cache may be used.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use may::sync::SyncFlag;

use crate::cache::{Cache, Value};
use crate::metrics::Metrics;

/// Keys of fetches in flight.
pub type Key = Arc<[u8]>;

/// What the layers below the core report. Implemented by [`Coherence`];
/// the backend's data links and the invalidation listener hold it as
/// `Arc<dyn Freshness>`, so they never name the core's result type.
pub trait Freshness: Send + Sync {
    /// The invalidation connection's client id while it is up (`Up(id)`).
    fn redirect(&self) -> Option<i64>;
    /// The invalidation connection is up with client `id`: `Down -> Up(id)`.
    fn listener_up(&self, id: i64);
    /// The invalidation connection is lost: `Up -> Down`, then flush.
    fn listener_down(&self);
    /// Redis says `key` changed.
    fn invalidate(&self, key: &[u8]) -> bool;
    /// Redis says everything changed (`FLUSHALL`, `FLUSHDB`).
    fn flush(&self);
    /// Data connection `index` was reopened after a loss.
    fn data_link_reopened(&self, index: usize);
    /// `CLIENT TRACKING` on a data connection failed with `why`.
    fn tracking_failed(&self, why: &str);
    /// Whether invalidations come as RESP3 `>invalidate` pushes on the data
    /// connections (`tracking-resp3`, or `tracking` after the server
    /// refused `REDIRECT`) instead of through the listener.
    fn push_mode(&self) -> bool {
        false
    }
    /// The server refused `CLIENT TRACKING ... REDIRECT` with `why`: switch
    /// to push mode for good.
    fn redirect_refused(&self, why: &str) {
        self.tracking_failed(why);
    }
    /// A `>invalidate` push on a data connection: these keys changed, or
    /// (`None`, a flush) everything did.
    fn pushed(&self, keys: Option<&[&[u8]]>) {
        match keys {
            None => self.flush(),
            Some(keys) => keys.iter().for_each(|key| {
                self.invalidate(key);
            }),
        }
    }
    /// A data connection that tracked in push mode was lost: Redis forgot
    /// what it tracked for it, and pushes on it may be lost.
    fn data_link_lost(&self, index: usize) {
        self.data_link_reopened(index);
    }
}

/// One fetch in flight; concurrent misses on the same key wait on it.
pub struct Flight<R> {
    done: SyncFlag,
    result: OnceLock<R>,
    /// Set when the key was invalidated while the fetch was in flight: the
    /// fetched value may predate that change, so it is not kept.
    stale: AtomicBool,
}

impl<R: Clone> Flight<R> {
    /// Waits (coroutine-aware) for the leader; `None` if it left without a
    /// result (it panicked).
    pub fn wait(&self) -> Option<R> {
        self.done.wait();
        self.result.get().cloned()
    }
}

/// The freshness state shared by the core, the backend and the listener.
///
/// Every field is an atomic or a sharded map: events come from the I/O
/// coroutines and the listener thread while workers read, and none of them
/// may block a worker. The orderings are `SeqCst` because correctness rests
/// on the order of a fetch's loads against an event's stores (see the
/// module doc), across different atomics.
pub struct Coherence<R> {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// Fetches in flight by key. A guard on this map is never held across a
    /// yield: entries are cloned out and the guard dropped before waiting.
    flights: DashMap<Key, Arc<Flight<R>>>,
    /// Bumped by every invalidation (multi-key reads compare it).
    epoch: AtomicU64,
    /// Bumped by every flush and every lapse of tracking.
    generation: AtomicU64,
    /// Whether tracking is on (state `Off` otherwise, forever).
    tracking: bool,
    /// The invalidation connection's client id in `Up(id)`, -1 in `Down`.
    redirect: AtomicI64,
    /// Push mode: invalidations come on the data connections, so the
    /// listener's state no longer decides whether the cache is usable.
    push: AtomicBool,
}

/// Whether a key's miss leads the fetch or waits for another's.
pub enum Join<R> {
    Leader(Lead<R>),
    Follower(Arc<Flight<R>>),
}

impl<R> Join<R> {
    /// True for the leader (no fetch of the key was in flight).
    #[cfg(test)]
    pub(crate) fn is_leader(&self) -> bool {
        matches!(self, Join::Leader(_))
    }
}

/// The leader's hold on a flight. Dropping it (return or panic) removes the
/// flight from the table, then wakes the waiters. It owns a handle to the
/// state, so a background refresh can carry it into its own coroutine.
pub struct Lead<R> {
    coherence: Arc<Coherence<R>>,
    key: Key,
    flight: Arc<Flight<R>>,
    generation: u64,
}

/// A multi-key read's view of the state when it started.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    epoch: u64,
    generation: u64,
}

impl<R> Coherence<R> {
    /// The state for `cache`: `Off` without tracking, `Down` with it.
    pub fn new(cache: Arc<Cache>, metrics: Arc<Metrics>, tracking: bool) -> Self {
        Coherence {
            cache,
            metrics,
            flights: DashMap::new(),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            tracking,
            redirect: AtomicI64::new(-1),
            push: AtomicBool::new(false),
        }
    }

    /// Takes invalidations as RESP3 pushes from the start
    /// (`CACHE_INVALIDATION=tracking-resp3`).
    pub fn with_pushes(self) -> Self {
        self.push.store(true, Ordering::SeqCst);
        self
    }

    /// The cache this state guards.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Whether tracking is on.
    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// The generation now; read it before [`Coherence::usable`], so a flush
    /// between the two is seen by the fetch that follows.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// True unless tracking is on and its connection is down (`Down`). In
    /// push mode there is no such connection: a lost data link empties the
    /// cache instead, and fills through an untracked one are dropped.
    pub fn usable(&self) -> bool {
        !self.tracking
            || self.push.load(Ordering::SeqCst)
            || self.redirect.load(Ordering::SeqCst) >= 0
    }

    /// A multi-key read starts; call after its lookups, before its fetch.
    pub fn ticket(&self, generation: u64) -> Ticket {
        Ticket {
            epoch: self.epoch.load(Ordering::SeqCst),
            generation,
        }
    }

    /// Whether values fetched under `ticket` and already inserted may stay.
    pub fn still_fresh(&self, ticket: Ticket) -> bool {
        self.epoch.load(Ordering::SeqCst) == ticket.epoch
            && self.generation.load(Ordering::SeqCst) == ticket.generation
            && self.usable()
    }

    /// Registers a miss on `key` seen at `generation`: the first caller
    /// leads, later ones follow until the leader lands.
    pub fn join(self: &Arc<Self>, key: &[u8], generation: u64) -> Join<R> {
        let key: Key = Arc::from(key);
        match self.flights.entry(key.clone()) {
            Entry::Occupied(e) => Join::Follower(e.get().clone()),
            Entry::Vacant(e) => {
                let flight = Arc::new(Flight {
                    done: SyncFlag::new(),
                    result: OnceLock::new(),
                    stale: AtomicBool::new(false),
                });
                e.insert(flight.clone());
                Join::Leader(Lead {
                    coherence: self.clone(),
                    key,
                    flight,
                    generation,
                })
            }
        }
    }

    /// Whether a fetch of `key` is in flight now (a hint: it may land at
    /// once). Takes a shard read lock and allocates nothing, so the many
    /// stale hits of a key being refreshed need not all [`join`](Self::join).
    pub fn in_flight(&self, key: &[u8]) -> bool {
        self.flights.contains_key(key)
    }

    /// Drops `key` from the cache, and keeps a fetch in flight for it from
    /// keeping what it fetched (it may predate the change).
    pub fn invalidate(&self, key: &[u8]) -> bool {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(flight) = self.flights.get(key) {
            flight.stale.store(true, Ordering::SeqCst);
        }
        self.cache.remove(key)
    }

    /// Empties the cache; no fetch in flight keeps its value.
    pub fn invalidate_all(&self) {
        // Bump first: a fetch that inserts after the clear sees the change.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
        self.metrics.cache_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// No fetch in flight keeps its value (tracking may have lapsed).
    pub fn distrust(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl<R> Lead<R> {
    /// The key being fetched.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Caches `bytes` for the key, unless an event since the fetch started
    /// says it may be stale; returns the value to answer with either way.
    pub fn fill(&self, bytes: &[u8]) -> Value {
        let coherence = &self.coherence;
        let value = coherence.cache.insert(&self.key, bytes);
        if self.flight.stale.load(Ordering::SeqCst)
            || coherence.generation.load(Ordering::SeqCst) != self.generation
            || !coherence.usable()
        {
            coherence.cache.remove(&self.key);
        }
        value
    }

    /// Hands `result` to the followers and ends the flight.
    pub fn land(self, result: R) {
        self.flight.result.set(result).ok();
    }
}

impl<R> Drop for Lead<R> {
    fn drop(&mut self) {
        self.coherence.flights.remove(&self.key);
        self.flight.done.fire();
    }
}

impl<R: Send + Sync> Freshness for Coherence<R> {
    fn redirect(&self) -> Option<i64> {
        let id = self.redirect.load(Ordering::SeqCst);
        (id >= 0).then_some(id)
    }

    fn listener_up(&self, id: i64) {
        self.redirect.store(id, Ordering::SeqCst);
    }

    fn listener_down(&self) {
        // Order matters: stop using the cache, then empty it.
        self.redirect.store(-1, Ordering::SeqCst);
        self.invalidate_all();
    }

    fn invalidate(&self, key: &[u8]) -> bool {
        Coherence::invalidate(self, key)
    }

    fn flush(&self) {
        self.invalidate_all();
    }

    fn data_link_reopened(&self, index: usize) {
        if self.tracking {
            log::info!("redis connection {index} reopened; cache emptied");
            self.invalidate_all();
        }
    }

    fn tracking_failed(&self, why: &str) {
        log::warn!("CLIENT TRACKING failed ({why}); values fetched now are not cached");
        self.distrust();
    }

    fn push_mode(&self) -> bool {
        self.tracking && self.push.load(Ordering::SeqCst)
    }

    fn redirect_refused(&self, why: &str) {
        if self.tracking && !self.push.swap(true, Ordering::SeqCst) {
            log::warn!(
                "redis refuses CLIENT TRACKING REDIRECT ({why}); invalidations now come as \
                 RESP3 pushes on the data connections"
            );
            self.invalidate_all();
        } else {
            self.distrust();
        }
    }

    fn pushed(&self, keys: Option<&[&[u8]]>) {
        self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
        match keys {
            None => self.invalidate_all(),
            Some(keys) => {
                for key in keys {
                    Coherence::invalidate(self, key);
                }
                self.metrics
                    .invalidated_keys
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn data_link_lost(&self, index: usize) {
        if self.tracking {
            log::info!("redis connection {index} lost; cache emptied");
            self.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::SystemClock;
    use std::time::Duration;

    fn state(tracking: bool) -> Arc<Coherence<u32>> {
        let cache = Arc::new(Cache::new(
            16,
            Duration::from_secs(60),
            Arc::new(SystemClock::default()),
        ));
        Arc::new(Coherence::new(
            cache,
            Arc::new(Metrics::default()),
            tracking,
        ))
    }

    fn lead(c: &Arc<Coherence<u32>>, key: &[u8]) -> Lead<u32> {
        match c.join(key, c.generation()) {
            Join::Leader(lead) => lead,
            Join::Follower(_) => panic!("expected to lead"),
        }
    }

    /// `Off` serves the cache; with tracking the state starts `Down` and
    /// moves to `Up` and back with the listener.
    #[test]
    fn listener_moves_down_and_up() {
        assert!(state(false).usable());
        let c = state(true);
        assert!(!c.usable());
        assert_eq!(c.redirect(), None);
        c.listener_up(7);
        assert!(c.usable());
        assert_eq!(c.redirect(), Some(7));
        c.cache.insert(b"k", b"v");
        c.listener_down();
        assert!(!c.usable());
        assert!(
            c.cache.get(b"k").is_none(),
            "a lost listener empties the cache"
        );
    }

    /// A second miss on a key follows the first; a later one leads again.
    #[test]
    fn misses_on_one_key_share_a_flight() {
        let c = state(false);
        let first = lead(&c, b"k");
        assert!(matches!(c.join(b"k", 0), Join::Follower(_)));
        first.land(1);
        assert!(matches!(c.join(b"k", 0), Join::Leader(_)));
    }

    /// Each event that makes a fill stale drops it; nothing else does.
    #[test]
    fn fill_is_kept_only_when_nothing_happened() {
        let c = state(false);
        lead(&c, b"a").fill(b"1");
        assert!(c.cache.get(b"a").is_some(), "an undisturbed fill stays");

        let l = lead(&c, b"b");
        c.invalidate(b"b");
        l.fill(b"old");
        assert!(c.cache.get(b"b").is_none(), "invalidated in flight");

        let l = lead(&c, b"c");
        c.distrust();
        l.fill(b"old");
        assert!(c.cache.get(b"c").is_none(), "tracking lapsed in flight");

        let l = lead(&c, b"d");
        c.invalidate(b"other");
        l.fill(b"1");
        assert!(c.cache.get(b"d").is_some(), "another key's invalidation");
    }

    /// A data link reopened flushes only with tracking on.
    #[test]
    fn data_reopen_flushes_with_tracking_only() {
        let c = state(false);
        c.cache.insert(b"k", b"v");
        c.data_link_reopened(0);
        assert!(c.cache.get(b"k").is_some());
        let c = state(true);
        c.listener_up(1);
        c.cache.insert(b"k", b"v");
        c.data_link_reopened(0);
        assert!(c.cache.get(b"k").is_none());
    }
}
