//! proxy: the read-through core both front ends call.
//!
//! Owns the lookup order (cache, then one Redis `GET`), single-flight misses,
//! inserting what Redis returned, writes (which drop the written keys), the
//! hit/miss counters, and the answers to "ready?" and "what are the
//! figures?". Front ends speak to it in its own terms ([`Proxy::get`],
//! [`Proxy::get_many`], [`Proxy::get_batch`] for the GETs of a pipeline,
//! [`Proxy::set`], [`Proxy::del`], [`Proxy::pass`], [`Proxy::write`],
//! [`Proxy::transaction`], [`Proxy::ready`], [`Proxy::snapshot`]) and never
//! see `redis::Value`s: a pass-through's reply is the bytes Redis sent,
//! relayed as they are. Whether a
//! fetched value may stay cached is [`crate::coherence`]'s call; Redis is
//! reached through the [`Redis`] trait, so the races are unit-tested here
//! against a fake.
//!
//! # Stale answers (both off by default, see [`Stale`])
//! Past the TTL the cache keeps an entry for the longer of the two windows
//! (its grace); `Cache::get` no longer answers it, `Cache::get_stale` does.
//! - stale-while-revalidate: a hit within the window answers the old value
//!   and the first one joins the flight table as the key's leader and moves
//!   that [`Lead`] into a background coroutine that GETs and fills the key
//!   ([`Proxy::get`] never waits for it). Being an ordinary flight, it is
//!   single-flight with misses and guarded against invalidation races like
//!   any fill; the fill is a new entry, so its age starts again.
//! - stale-if-error: a miss whose GET failed with `Unavailable` or `Timeout`
//!   answers an entry expired no longer ago than the window.
//!
//! Neither ever serves an entry that was invalidated, written or flushed:
//! those are removed from the cache, not marked; and neither serves anything
//! while coherence says the cache is unusable (tracking on, listener down).
//! A GET that finds the key absent (or of another type) removes the stale
//! entry, so a deleted key is not answered stale later.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{
    Backend, BackendError, CommandTable, GetResult, Pass, Protocol, Redis, SetReply,
};
use crate::cache::{Cache, Value, MAX_VALUE_BYTES};
use crate::coherence::{Coherence, Flight, Join, Lead};
use crate::metrics::{Metrics, Snapshot};

/// What a write changes, for the cache's sake.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    /// These keys (from the command's key specs).
    Keys(&'a [&'a [u8]]),
    /// Possibly every key (`FLUSHDB`, `FLUSHALL`, `SWAPDB`).
    All,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the cache, within the TTL.
    Hit,
    /// From the cache, past the TTL (stale-while-revalidate or stale-if-error).
    StaleHit,
    /// Read from Redis by this request.
    Miss,
    /// Read from Redis by another request's GET that this one waited for.
    Collapsed,
}

impl Source {
    /// True when the answer came from the cache (`X-Cache: HIT`).
    pub fn is_hit(self) -> bool {
        matches!(self, Source::Hit | Source::StaleHit)
    }
}

/// How long past the TTL an entry may still answer; zero = off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stale {
    /// Stale-while-revalidate window.
    pub revalidate: Duration,
    /// Stale-if-error window.
    pub if_error: Duration,
}

impl Stale {
    /// How long past the TTL the cache must keep expired entries.
    pub fn grace(&self) -> Duration {
        self.revalidate.max(self.if_error)
    }
}

/// The answer to one GET: the value (or `None` when Redis has no such key).
#[derive(Debug, Clone)]
pub struct Lookup {
    pub value: Option<Value>,
    pub source: Source,
}

/// What a fetch hands to the misses that waited for it.
pub type FlightResult = Result<Option<Value>, BackendError>;

/// The freshness state the core is built over.
pub type CoreCoherence = Coherence<FlightResult>;

/// The shared read-through core, over the real [`Backend`] unless a test
/// gives it another [`Redis`].
pub struct Proxy<B: Redis = Backend> {
    cache: Arc<Cache>,
    /// Shared with background refreshes, which outlive the request.
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    coherence: Arc<CoreCoherence>,
    stale: Stale,
}

impl<B: Redis + 'static> Proxy<B> {
    /// Wires the core over a backend and the freshness state of its cache.
    pub fn new(backend: B, metrics: Arc<Metrics>, coherence: Arc<CoreCoherence>) -> Self {
        Proxy {
            cache: coherence.cache().clone(),
            backend: Arc::new(backend),
            metrics,
            coherence,
            stale: Stale::default(),
        }
    }

    /// The same core answering stale within `stale`'s windows. The cache
    /// must keep expired entries at least [`Stale::grace`] (its `Limits`).
    pub fn with_stale(mut self, stale: Stale) -> Self {
        self.stale = stale;
        self
    }

    /// Reads `key`: from the cache, else with exactly one Redis GET shared by
    /// every concurrent miss on the key. `hint` picks the Redis connection
    /// (the client's fd, so both sockets share a worker).
    pub fn get(&self, key: &[u8], hint: usize) -> Result<Lookup, BackendError> {
        // Read before deciding the cache is usable: a flush between the two
        // would otherwise go unseen by the fetch below.
        let generation = self.coherence.generation();
        if !self.coherence.usable() {
            // Tracking lapsed: invalidations could be missed, so bypass the cache.
            self.metrics.misses.inc();
            return self.uncached_get(key, hint);
        }
        if self.stale.revalidate.is_zero() {
            if let Some(value) = self.cache.get(key) {
                self.metrics.hits.inc();
                return Ok(hit(value, Source::Hit));
            }
        } else if let Some((value, stale)) = self.cache.get_stale(key, self.stale.revalidate) {
            self.metrics.hits.inc();
            if !stale {
                return Ok(hit(value, Source::Hit));
            }
            self.metrics.stale_revalidate.inc();
            self.refresh(key, generation, hint);
            return Ok(hit(value, Source::StaleHit));
        }
        self.metrics.misses.inc();
        if self.cache.capacity() == 0 {
            // Pass-through: every GET goes to Redis, nothing is shared.
            return self.uncached_get(key, hint);
        }
        let result = match self.coherence.join(key, generation) {
            Join::Leader(lead) => {
                // An earlier leader may have filled the cache between our
                // miss and our flight: take its value rather than asking
                // Redis again.
                let result = match self.cache.get(key) {
                    Some(value) => Ok(Some(value)),
                    None => fetch(&*self.backend, &self.cache, &lead, hint),
                };
                lead.land(result.clone());
                result.map(|value| answer(value, Source::Miss))
            }
            Join::Follower(flight) => {
                self.metrics.coalesced.inc();
                flight
                    .wait()
                    .unwrap_or_else(|| Err(BackendError::Unavailable("request abandoned".into())))
                    .map(|value| answer(value, Source::Collapsed))
            }
        };
        match result {
            Err(e @ (BackendError::Unavailable(_) | BackendError::Timeout)) => {
                self.stale_if_error(key, e)
            }
            other => other,
        }
    }

    /// Answers a failed GET with the key's entry if it expired no longer
    /// ago than the stale-if-error window; else the error.
    fn stale_if_error(&self, key: &[u8], error: BackendError) -> Result<Lookup, BackendError> {
        // Re-checked: the listener may have gone down while we waited.
        if self.stale.if_error.is_zero() || !self.coherence.usable() {
            return Err(error);
        }
        match self.cache.get_stale(key, self.stale.if_error) {
            Some((value, true)) => {
                self.metrics.stale_error.inc();
                Ok(hit(value, Source::StaleHit))
            }
            // Filled by another request since our miss.
            Some((value, false)) => Ok(hit(value, Source::Hit)),
            None => Err(error),
        }
    }

    /// Starts one background GET of `key` unless a fetch of it is already
    /// in flight; never waits for it.
    fn refresh(&self, key: &[u8], generation: u64, hint: usize) {
        if self.coherence.in_flight(key) {
            return;
        }
        let Join::Leader(lead) = self.coherence.join(key, generation) else {
            return;
        };
        let backend = self.backend.clone();
        let cache = self.cache.clone();
        let metrics = self.metrics.clone();
        let spawned = may::go!(move || {
            // A hit may have read the old entry just before the last refresh
            // filled it, and led again after that flight ended: the entry is
            // fresh now, so there is nothing to ask Redis.
            let result = match cache.get(lead.key()) {
                Some(value) => Ok(Some(value)),
                None => {
                    metrics.refreshes.inc();
                    fetch(&*backend, &cache, &lead, hint)
                }
            };
            if let Err(e) = &result {
                log::debug!("background refresh failed: {e}");
            }
            lead.land(result);
        });
        drop(spawned);
    }

    /// Reads several keys: hits from the cache, all misses from Redis in one
    /// pipelined round trip (not coalesced with other requests). A key that
    /// is absent or holds another type reads as `None`, as in Redis's MGET.
    pub fn get_many(
        &self,
        keys: &[&[u8]],
        hint: usize,
    ) -> Result<Vec<Option<Value>>, BackendError> {
        let generation = self.coherence.generation();
        let usable = self.coherence.usable();
        let mut out = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let value = if usable { self.cache.get(key) } else { None };
            let counter = match value {
                Some(_) => &self.metrics.hits,
                None => {
                    missing.push(i);
                    &self.metrics.misses
                }
            };
            counter.inc();
            out.push(value);
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let ticket = self.coherence.ticket(generation);
        let miss_keys: Vec<&[u8]> = missing.iter().map(|&i| keys[i]).collect();
        let results = self.backend.get_many(&miss_keys, hint)?;
        // All or nothing, before anything is cached: an early return below
        // would skip the freshness check at the end.
        for result in &results {
            if let Ok(Some(bytes)) = result {
                fits(bytes.len())?;
            }
        }
        for (&i, result) in missing.iter().zip(results) {
            if let Ok(Some(bytes)) = result {
                out[i] = Some(if usable {
                    self.cache.insert(keys[i], &bytes)
                } else {
                    Value::new(keys[i], &bytes)
                });
            }
        }
        // Checked after the inserts, as for one key (see `coherence`).
        if usable && !self.coherence.still_fresh(ticket) {
            for &i in &missing {
                self.cache.remove(keys[i]);
            }
        }
        Ok(out)
    }

    /// Reads each key as [`Proxy::get`] would, as one batch: hits from the
    /// cache, and the misses that lead their flight (or bypass the cache)
    /// fetched together in one [`Redis::get_many`] round trip, in order.
    /// A miss on a key another request is fetching waits for that fetch,
    /// but only after this batch's own fetch has landed, so two batches
    /// that each lead a key the other waits for cannot deadlock (and a key
    /// named twice in one batch waits for itself, already landed).
    ///
    /// Freshness is `get`'s: each leader's flight mark is in the table before
    /// the batch is sent and `Lead::fill` checks it after the insert. A key
    /// holding another type is an error reply of its own; a failed round
    /// trip fails every key it carried (then stale-if-error applies per key).
    pub fn get_batch(&self, keys: &[&[u8]], hint: usize) -> Vec<Result<Lookup, BackendError>> {
        // As in `get`: read before deciding the cache is usable.
        let generation = self.coherence.generation();
        let usable = self.coherence.usable();
        let cached = usable && self.cache.capacity() > 0;
        // A miss's place holds `NOT_YET` until its fetch (or flight) lands.
        const NOT_YET: Result<Lookup, BackendError> = Err(BackendError::Timeout);
        let mut out: Vec<Result<Lookup, BackendError>> = Vec::with_capacity(keys.len());
        // Keys this batch fetches: with their lead, or `None` for an
        // uncached read (no flight).
        let mut fetched: Vec<usize> = Vec::new();
        let mut leads: Vec<Option<Lead<FlightResult>>> = Vec::new();
        let mut followed: Vec<(usize, Arc<Flight<FlightResult>>)> = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            if usable {
                if let Some(lookup) = self.cached(key, generation, hint) {
                    out.push(Ok(lookup));
                    continue;
                }
            }
            self.metrics.misses.inc();
            out.push(NOT_YET);
            if !cached {
                fetched.push(i);
                leads.push(None);
                continue;
            }
            match self.coherence.join(key, generation) {
                Join::Leader(lead) => match self.cache.get(key) {
                    // Filled by an earlier leader since our miss.
                    Some(value) => {
                        lead.land(Ok(Some(value.clone())));
                        out[i] = Ok(answer(Some(value), Source::Miss));
                    }
                    None => {
                        fetched.push(i);
                        leads.push(Some(lead));
                    }
                },
                Join::Follower(flight) => {
                    self.metrics.coalesced.inc();
                    followed.push((i, flight));
                }
            }
        }
        if !fetched.is_empty() {
            let fetch_keys: Vec<&[u8]> = fetched.iter().map(|&i| keys[i]).collect();
            let replies = match self.backend.get_many(&fetch_keys, hint) {
                Ok(replies) if replies.len() == fetched.len() => replies,
                Ok(_) => vec![Err(BackendError::Unavailable("short reply".into())); fetched.len()],
                Err(e) => vec![Err(e); fetched.len()],
            };
            for ((&i, lead), reply) in fetched.iter().zip(leads).zip(replies) {
                let result = match lead {
                    Some(lead) => {
                        let result = fill(&self.cache, &lead, reply);
                        lead.land(result.clone());
                        result
                    }
                    None => reply.and_then(|v| v.map(|v| uncached(keys[i], &v)).transpose()),
                };
                out[i] = result.map(|value| answer(value, Source::Miss));
            }
        }
        for (i, flight) in followed {
            let result = flight
                .wait()
                .unwrap_or_else(|| Err(BackendError::Unavailable("request abandoned".into())));
            out[i] = result.map(|value| answer(value, Source::Collapsed));
        }
        for (key, result) in keys.iter().zip(out.iter_mut()) {
            if matches!(
                result,
                Err(BackendError::Unavailable(_) | BackendError::Timeout)
            ) {
                let failed = std::mem::replace(result, NOT_YET);
                *result = failed.or_else(|e| self.stale_if_error(key, e));
            }
        }
        out
    }

    /// `get`'s cache step: a hit (counted), a stale hit that starts its
    /// refresh, or `None` for a miss (not counted).
    fn cached(&self, key: &[u8], generation: u64, hint: usize) -> Option<Lookup> {
        if self.stale.revalidate.is_zero() {
            let value = self.cache.get(key)?;
            self.metrics.hits.inc();
            return Some(hit(value, Source::Hit));
        }
        let (value, stale) = self.cache.get_stale(key, self.stale.revalidate)?;
        self.metrics.hits.inc();
        if !stale {
            return Some(hit(value, Source::Hit));
        }
        self.metrics.stale_revalidate.inc();
        self.refresh(key, generation, hint);
        Some(hit(value, Source::StaleHit))
    }

    /// `SET key value [options...]` in Redis, then drops `key` from the
    /// cache. The written value is not cached: Redis does not track keys a
    /// client writes, so a cached copy would never be invalidated.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        options: &[&[u8]],
        hint: usize,
    ) -> Result<SetReply, BackendError> {
        let result = self.backend.set(key, value, options, hint);
        // Dropped whatever Redis said: a timeout may still have written.
        self.coherence.invalidate(key);
        result
    }

    /// `DEL keys...` in Redis, then drops them from the cache; answers how
    /// many Redis removed.
    pub fn del(&self, keys: &[&[u8]], hint: usize) -> Result<u64, BackendError> {
        let result = self.backend.del(keys, hint);
        for key in keys {
            self.coherence.invalidate(key);
        }
        result
    }

    /// What Redis serves (flags, key specs, `COMMAND` rows), once learned.
    pub fn commands(&self) -> Option<Arc<CommandTable>> {
        self.backend.commands()
    }

    /// Relays a read-only command to Redis, uncached; answers Redis's reply
    /// bytes as they came.
    pub fn pass(&self, cmd: &Pass<'_>, hint: usize) -> Result<Vec<u8>, BackendError> {
        self.metrics.passthrough.inc();
        self.backend.pass(cmd, hint)
    }

    /// Relays a write, then drops what it wrote from the cache before the
    /// reply goes back (through coherence, so a GET of those keys in flight
    /// keeps nothing either), whatever Redis said: a timeout may still
    /// have written.
    pub fn write(
        &self,
        cmd: &Pass<'_>,
        written: Written<'_>,
        hint: usize,
    ) -> Result<Vec<u8>, BackendError> {
        self.metrics.passthrough.inc();
        let result = self.backend.pass(cmd, hint);
        self.forget(written);
        result
    }

    /// Relays a pipelined run of pass-through commands (`cmd.replies` of
    /// them, packed back to back) as one job, then drops what its writes
    /// wrote, as [`Proxy::write`] does, before any reply goes back; answers
    /// their replies back to back, as Redis sent them (split them with the
    /// backend's `reply_frames`). In a cluster the run must share a slot.
    pub fn pass_run(
        &self,
        cmd: &Pass<'_>,
        written: Written<'_>,
        hint: usize,
    ) -> Result<Vec<u8>, BackendError> {
        self.metrics.passthrough.add(cmd.replies as u64);
        let result = self.backend.pass(cmd, hint);
        self.forget(written);
        result
    }

    /// True when Redis is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.backend.is_cluster()
    }

    /// Runs `count` packed commands as one `MULTI` ... `EXEC` block on one
    /// connection (Redis runs it atomically) and answers EXEC's reply as
    /// it came; what the commands write is dropped as for [`Proxy::write`].
    pub fn transaction(
        &self,
        queued: &[u8],
        count: usize,
        route: Option<&[u8]>,
        protocol: Protocol,
        written: Written<'_>,
        hint: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let mut block = Vec::with_capacity(queued.len() + 32);
        block.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
        block.extend_from_slice(queued);
        block.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
        let cmd = Pass {
            commands: &block,
            replies: count + 2,
            skip: count + 1,
            route,
            protocol,
        };
        self.metrics.passthrough.add(count as u64);
        let result = self.backend.pass(&cmd, hint);
        self.forget(written);
        result
    }

    fn forget(&self, written: Written<'_>) {
        match written {
            Written::Keys(keys) => {
                for key in keys {
                    self.coherence.invalidate(key);
                }
            }
            Written::All => self.coherence.invalidate_all(),
        }
    }

    /// True when Redis answers PING within the timeout (`/-/ready`).
    pub fn ready(&self, hint: usize) -> bool {
        self.backend.ping(hint)
    }

    /// What the metrics exposition and `INFO` read.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            cache: self.cache.stats(),
            cache_entries: self.cache.len(),
            cache_bytes: self.cache.bytes(),
            cache_capacity: self.cache.capacity(),
            backend: self.backend.stats(),
            tracking: self.coherence.tracking(),
        }
    }

    fn uncached_get(&self, key: &[u8], hint: usize) -> Result<Lookup, BackendError> {
        let value = self.backend.get(key, hint)?;
        Ok(Lookup {
            value: value.map(|v| uncached(key, &v)).transpose()?,
            source: Source::Miss,
        })
    }
}

/// One Redis GET for the flight `lead` holds, and its fill.
fn fetch<B: Redis + ?Sized>(
    backend: &B,
    cache: &Cache,
    lead: &Lead<FlightResult>,
    hint: usize,
) -> FlightResult {
    fill(cache, lead, backend.get(lead.key(), hint))
}

/// What one GET of the flight `lead` holds answered, filled into the cache.
fn fill(cache: &Cache, lead: &Lead<FlightResult>, reply: GetResult) -> FlightResult {
    match reply {
        Ok(Some(bytes)) => {
            fits(bytes.len())?;
            Ok(Some(lead.fill(&bytes)))
        }
        // The key is gone (or holds another type): an expired entry kept
        // for stale answers must not answer it later.
        Ok(None) => {
            if cache.keeps_expired() {
                cache.remove(lead.key());
            }
            Ok(None)
        }
        Err(e @ BackendError::Reply(_)) => {
            if cache.keeps_expired() {
                cache.remove(lead.key());
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn answer(value: Option<Value>, source: Source) -> Lookup {
    Lookup { value, source }
}

fn hit(value: Value, source: Source) -> Lookup {
    Lookup {
        value: Some(value),
        source,
    }
}

/// Refuses a value longer than an entry can hold (over 4 GiB: only a Redis
/// with a raised `proto-max-bulk-len` can send one) with an error reply.
fn fits(len: usize) -> Result<(), BackendError> {
    if len > MAX_VALUE_BYTES {
        return Err(BackendError::Reply(format!(
            "ERR value of {len} bytes is over the proxy's limit of {MAX_VALUE_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A value served without caching it.
fn uncached(key: &[u8], bytes: &[u8]) -> Result<Value, BackendError> {
    fits(bytes.len())?;
    Ok(Value::new(key, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendStats, GetResult};
    use crate::cache::SystemClock;
    use crate::cache::{Limits, MockClock};
    use crate::coherence::Freshness;
    use crate::config::RedisTarget;
    use crate::tracking::Tracking;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    type Hook = Box<dyn FnMut(&Mutex<HashMap<Vec<u8>, Vec<u8>>>) + Send>;

    /// A Redis in memory. A GET reads its value, then runs the hook (what
    /// happens elsewhere while the reply travels back), then replies with
    /// what it read: exactly the window the races live in.
    #[derive(Default)]
    struct FakeRedis {
        store: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
        during: Mutex<Option<Hook>>,
        /// While set, every GET fails with this error.
        failing: Mutex<Option<BackendError>>,
        /// GETs received.
        gets: AtomicUsize,
        /// `get_many` round trips received.
        batches: AtomicUsize,
        /// Keys that hold another type: their GET is a WRONGTYPE reply.
        wrong_type: Mutex<Vec<Vec<u8>>>,
        stats: BackendStats,
    }

    impl FakeRedis {
        fn put(&self, key: &[u8], value: &[u8]) {
            self.store
                .lock()
                .unwrap()
                .insert(key.to_vec(), value.to_vec());
        }

        /// Runs `hook` once, during the next GET or MGET.
        fn during_next_get(
            &self,
            hook: impl FnMut(&Mutex<HashMap<Vec<u8>, Vec<u8>>>) + Send + 'static,
        ) {
            *self.during.lock().unwrap() = Some(Box::new(hook));
        }

        fn reply_travels(&self) {
            if let Some(mut hook) = self.during.lock().unwrap().take() {
                hook(&self.store);
            }
        }
    }

    impl Redis for FakeRedis {
        fn get(&self, key: &[u8], _hint: usize) -> Result<Option<Vec<u8>>, BackendError> {
            self.gets.fetch_add(1, AtomicOrdering::SeqCst);
            if let Some(e) = self.failing.lock().unwrap().clone() {
                return Err(e);
            }
            let read = self.store.lock().unwrap().get(key).cloned();
            self.reply_travels();
            Ok(read)
        }
        fn get_many(&self, keys: &[&[u8]], _hint: usize) -> Result<Vec<GetResult>, BackendError> {
            self.batches.fetch_add(1, AtomicOrdering::SeqCst);
            if let Some(e) = self.failing.lock().unwrap().clone() {
                return Err(e);
            }
            let read: Vec<GetResult> = {
                let store = self.store.lock().unwrap();
                let wrong = self.wrong_type.lock().unwrap();
                keys.iter()
                    .map(|k| match wrong.iter().any(|w| w == k) {
                        true => Err(BackendError::Reply("WRONGTYPE".into())),
                        false => Ok(store.get(*k).cloned()),
                    })
                    .collect()
            };
            self.reply_travels();
            Ok(read)
        }
        fn set(
            &self,
            key: &[u8],
            value: &[u8],
            _: &[&[u8]],
            _: usize,
        ) -> Result<SetReply, BackendError> {
            self.put(key, value);
            Ok(SetReply::Ok)
        }
        fn del(&self, keys: &[&[u8]], _hint: usize) -> Result<u64, BackendError> {
            let mut store = self.store.lock().unwrap();
            Ok(keys.iter().filter(|k| store.remove(**k).is_some()).count() as u64)
        }
        fn ping(&self, _hint: usize) -> bool {
            true
        }
        fn stats(&self) -> &BackendStats {
            &self.stats
        }
    }

    /// A core with tracking on and its listener up, over a fake Redis.
    fn tracked() -> (
        Arc<Proxy<Arc<FakeRedis>>>,
        Arc<FakeRedis>,
        Arc<CoreCoherence>,
    ) {
        let cache = Arc::new(Cache::new(
            16,
            Duration::from_secs(60),
            Arc::new(SystemClock::default()),
        ));
        let metrics = Arc::new(Metrics::default());
        let coherence = Arc::new(Coherence::new(cache, metrics.clone(), true));
        coherence.listener_up(1);
        let redis = Arc::new(FakeRedis::default());
        let proxy = Arc::new(Proxy::new(redis.clone(), metrics, coherence.clone()));
        (proxy, redis, coherence)
    }

    fn read(proxy: &Proxy<Arc<FakeRedis>>, key: &[u8]) -> (Option<Vec<u8>>, Source) {
        let lookup = proxy.get(key, 0).expect("fake GET");
        (lookup.value.map(|v| v.as_ref().to_vec()), lookup.source)
    }

    /// Another client's SET whose invalidation arrives while our GET is in
    /// flight: the old value answers this GET but is not kept (guard: the
    /// flight's stale mark, checked in `Lead::fill`).
    #[test]
    fn invalidation_during_a_fetch_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"k", b"old");
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"k".to_vec(), b"new".to_vec());
            coherence.invalidate(b"k");
        });
        assert_eq!(read(&proxy, b"k"), (Some(b"old".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Hit));
    }

    /// An invalidation of one of an MGET's keys while the MGET is in flight:
    /// none of its misses is kept (guard: the epoch in `still_fresh`).
    #[test]
    fn invalidation_during_an_mget_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"a", b"old");
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"a".to_vec(), b"new".to_vec());
            coherence.invalidate(b"a");
        });
        let got = proxy.get_many(&[b"a"], 0).expect("fake MGET");
        assert_eq!(got[0].as_deref(), Some(&b"old"[..]));
        assert_eq!(read(&proxy, b"a"), (Some(b"new".to_vec()), Source::Miss));
    }

    /// `FLUSHALL` (a nil invalidation) while an MGET is in flight: nothing it
    /// fetched is kept (guard: the generation in `still_fresh`).
    #[test]
    fn flush_during_an_mget_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"a", b"old-a");
        redis.put(b"b", b"old-b");
        redis.during_next_get(move |store| {
            store.lock().unwrap().clear();
            coherence.flush();
        });
        let got = proxy.get_many(&[b"a", b"b"], 0).expect("fake MGET");
        assert_eq!(got[0].as_deref(), Some(&b"old-a"[..]));
        assert_eq!(read(&proxy, b"a"), (None, Source::Miss));
        assert_eq!(read(&proxy, b"b"), (None, Source::Miss));
    }

    /// A data connection reopened while a GET is in flight: Redis forgot
    /// what it tracked for the old one, so a change since may never be
    /// announced; the value is not kept (guard: the generation in
    /// `Lead::fill`).
    #[test]
    fn data_reconnect_during_a_fetch_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"k", b"old");
        redis.during_next_get(move |store| {
            // The write lands while the link is down: no invalidation comes.
            store.lock().unwrap().insert(b"k".to_vec(), b"new".to_vec());
            coherence.data_link_reopened(0);
        });
        assert_eq!(read(&proxy, b"k"), (Some(b"old".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Miss));
    }

    /// lettuce#3481: the invalidation, on the listener's connection, arrives
    /// before the GET reply it concerns, on the data connection. The
    /// listener's own message handling (on its own thread) must find the
    /// fetch (guard: the flight mark is registered before the GET is sent,
    /// and checked after the insert).
    #[test]
    fn invalidation_before_its_get_reply_is_honoured() {
        let (proxy, redis, coherence) = tracked();
        let target = RedisTarget {
            host: "127.0.0.1".into(),
            port: 1,
            db: 0,
            username: None,
            password: None,
            tls: None,
        };
        let listener = Tracking::new(
            target,
            Duration::from_secs(1),
            coherence.clone() as Arc<dyn Freshness>,
            Arc::new(Metrics::default()),
        );
        redis.put(b"k", b"old");
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"k".to_vec(), b"new".to_vec());
            let listener = listener.clone();
            std::thread::spawn(move || {
                listener.apply(redis::Value::Array(vec![
                    redis::Value::BulkString(b"message".to_vec()),
                    redis::Value::BulkString(b"__redis__:invalidate".to_vec()),
                    redis::Value::Array(vec![redis::Value::BulkString(b"k".to_vec())]),
                ]))
            })
            .join()
            .expect("listener thread");
        });
        assert_eq!(read(&proxy, b"k"), (Some(b"old".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Miss));
    }

    /// Writes drop the written keys; DEL answers how many Redis removed.
    #[test]
    fn writes_drop_cached_keys() {
        let (proxy, redis, _) = tracked();
        redis.put(b"k", b"v1");
        assert_eq!(read(&proxy, b"k").1, Source::Miss);
        assert_eq!(read(&proxy, b"k").1, Source::Hit);
        assert_eq!(proxy.set(b"k", b"v2", &[], 0), Ok(SetReply::Ok));
        assert_eq!(read(&proxy, b"k"), (Some(b"v2".to_vec()), Source::Miss));
        assert_eq!(proxy.del(&[b"k", b"absent"], 0), Ok(1));
        assert_eq!(read(&proxy, b"k"), (None, Source::Miss));
    }

    /// A write through the proxy while a GET of its key is in flight: the
    /// GET's value (read before the write) answers it but is not kept, and
    /// the next GET reads the new value (guard: `write` invalidates through
    /// coherence, which marks the flight stale).
    #[test]
    fn write_during_a_fetch_is_not_cached() {
        let (proxy, redis, _) = tracked();
        redis.put(b"k", b"old");
        let writer = proxy.clone();
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"k".to_vec(), b"new".to_vec());
            let cmd = Pass {
                commands: b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nnew\r\n",
                replies: 1,
                skip: 0,
                route: Some(b"k"),
                protocol: Protocol::Resp2,
            };
            // The fake relays nothing; the drop happens all the same.
            let _ = writer.write(&cmd, Written::Keys(&[b"k"]), 0);
        });
        assert_eq!(read(&proxy, b"k"), (Some(b"old".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Miss));
        assert_eq!(proxy.metrics.passthrough.get(), 1);
    }

    /// A flushing write (FLUSHDB) empties the cache.
    #[test]
    fn flushing_write_empties_the_cache() {
        let (proxy, redis, _) = tracked();
        redis.put(b"a", b"1");
        read(&proxy, b"a");
        assert_eq!(read(&proxy, b"a").1, Source::Hit);
        let cmd = Pass {
            commands: b"*1\r\n$7\r\nFLUSHDB\r\n",
            replies: 1,
            skip: 0,
            route: None,
            protocol: Protocol::Resp2,
        };
        let _ = proxy.write(&cmd, Written::All, 0);
        assert_eq!(read(&proxy, b"a").1, Source::Miss);
    }

    /// With the listener down nothing is served from or kept in the cache.
    #[test]
    fn listener_down_bypasses_the_cache() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"k", b"v");
        read(&proxy, b"k");
        coherence.listener_down();
        assert_eq!(read(&proxy, b"k").1, Source::Miss);
        assert_eq!(read(&proxy, b"k").1, Source::Miss);
        coherence.listener_up(2);
        read(&proxy, b"k");
        assert_eq!(read(&proxy, b"k").1, Source::Hit);
    }

    /// Values up to the entry limit pass; one byte more is an error reply
    /// naming both sizes (checked by length: no 4 GiB allocation).
    #[test]
    fn oversize_values_are_refused() {
        assert!(fits(0).is_ok());
        assert!(fits(MAX_VALUE_BYTES).is_ok());
        match fits(MAX_VALUE_BYTES + 1) {
            Err(BackendError::Reply(msg)) => {
                assert!(msg.starts_with("ERR value of "), "{msg}");
                assert!(msg.contains(&(MAX_VALUE_BYTES + 1).to_string()), "{msg}");
            }
            other => panic!("expected a reply error, got {other:?}"),
        }
    }

    const TTL: Duration = Duration::from_millis(100);

    type StaleCore = (
        Arc<Proxy<Arc<FakeRedis>>>,
        Arc<FakeRedis>,
        Arc<CoreCoherence>,
        Arc<MockClock>,
    );

    /// A core over a fake Redis and a mock clock, answering stale within
    /// `stale`; tracking on with its listener up when `tracking`.
    fn stale_core(stale: Stale, tracking: bool) -> StaleCore {
        let clock = Arc::new(MockClock::default());
        let cache = Arc::new(Cache::new(16, TTL, clock.clone()).with_limits(Limits {
            grace: stale.grace(),
            ..Limits::default()
        }));
        let metrics = Arc::new(Metrics::default());
        let coherence = Arc::new(Coherence::new(cache, metrics.clone(), tracking));
        if tracking {
            coherence.listener_up(1);
        }
        let redis = Arc::new(FakeRedis::default());
        let proxy =
            Arc::new(Proxy::new(redis.clone(), metrics, coherence.clone()).with_stale(stale));
        (proxy, redis, coherence, clock)
    }

    fn if_error(ms: u64) -> Stale {
        Stale {
            if_error: Duration::from_millis(ms),
            ..Stale::default()
        }
    }

    fn fail(redis: &FakeRedis, error: Option<BackendError>) {
        *redis.failing.lock().unwrap() = error;
    }

    /// Redis down or timing out: an entry expired no longer ago than the
    /// window answers (as a stale hit), an older one and a never-cached key
    /// get the error.
    #[test]
    fn stale_if_error_answers_recently_expired_entries() {
        let (proxy, redis, _, clock) = stale_core(if_error(50), false);
        redis.put(b"k", b"old");
        assert_eq!(read(&proxy, b"k").1, Source::Miss);
        clock.advance(Duration::from_millis(120));
        proxy.cache.sweep();
        fail(&redis, Some(BackendError::Unavailable("refused".into())));
        assert_eq!(
            read(&proxy, b"k"),
            (Some(b"old".to_vec()), Source::StaleHit)
        );
        fail(&redis, Some(BackendError::Timeout));
        assert_eq!(
            read(&proxy, b"k"),
            (Some(b"old".to_vec()), Source::StaleHit)
        );
        assert_eq!(proxy.metrics.stale_error.get(), 2);
        assert_eq!(proxy.get(b"never", 0).unwrap_err(), BackendError::Timeout);
        clock.advance(Duration::from_millis(30));
        assert_eq!(proxy.get(b"k", 0).unwrap_err(), BackendError::Timeout);
        // A Redis error reply is an answer, not a failure: never masked.
        fail(&redis, Some(BackendError::Reply("WRONGTYPE".into())));
        assert!(matches!(proxy.get(b"k", 0), Err(BackendError::Reply(_))));
    }

    /// Without the setting an expired entry is never answered.
    #[test]
    fn stale_if_error_is_off_by_default() {
        let (proxy, redis, _, clock) = stale_core(Stale::default(), false);
        redis.put(b"k", b"old");
        read(&proxy, b"k");
        clock.advance(Duration::from_millis(101));
        fail(&redis, Some(BackendError::Timeout));
        assert_eq!(proxy.get(b"k", 0).unwrap_err(), BackendError::Timeout);
    }

    /// Invalidated, written, deleted, flushed and found-absent entries are
    /// never answered stale.
    #[test]
    fn removed_entries_are_never_served_stale() {
        let (proxy, redis, coherence, clock) = stale_core(if_error(1000), true);
        for k in [&b"inv"[..], b"set", b"del", b"gone"] {
            redis.put(k, b"old");
            read(&proxy, k);
        }
        clock.advance(Duration::from_millis(150));
        coherence.invalidate(b"inv");
        proxy.set(b"set", b"new", &[], 0).unwrap();
        proxy.del(&[b"del"], 0).unwrap();
        // Redis says the key is gone: the kept entry goes too.
        redis.store.lock().unwrap().remove(&b"gone"[..]);
        assert_eq!(read(&proxy, b"gone"), (None, Source::Miss));
        fail(&redis, Some(BackendError::Timeout));
        for k in [&b"inv"[..], b"set", b"del", b"gone"] {
            assert_eq!(proxy.get(k, 0).unwrap_err(), BackendError::Timeout, "{k:?}");
        }
        fail(&redis, None);
        redis.put(b"f", b"old");
        read(&proxy, b"f");
        clock.advance(Duration::from_millis(150));
        coherence.flush();
        fail(&redis, Some(BackendError::Timeout));
        assert_eq!(proxy.get(b"f", 0).unwrap_err(), BackendError::Timeout);
    }

    /// With tracking on and its listener down nothing is served stale, even
    /// an entry still held when the listener went down.
    #[test]
    fn listener_down_serves_nothing_stale() {
        let (proxy, redis, coherence, clock) = stale_core(if_error(1000), true);
        redis.put(b"k", b"old");
        read(&proxy, b"k");
        clock.advance(Duration::from_millis(150));
        fail(&redis, Some(BackendError::Timeout));
        // Stop using the cache without the flush listener_down would do, to
        // see that the core itself refuses stale answers in `Down`.
        coherence.listener_up(-1);
        assert_eq!(proxy.get(b"k", 0).unwrap_err(), BackendError::Timeout);
        coherence.listener_up(2);
        assert_eq!(read(&proxy, b"k").1, Source::StaleHit);
        coherence.listener_down();
        assert_eq!(proxy.get(b"k", 0).unwrap_err(), BackendError::Timeout);
    }

    /// Polls `done` for up to 5 s.
    fn eventually(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "not within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// 50 reads of a key just past its TTL: one background GET, all 50
    /// answered at once with the old value, then the new value, whose age
    /// starts at the refresh.
    #[test]
    fn stale_while_revalidate_refreshes_once() {
        let stale = Stale {
            revalidate: Duration::from_millis(1000),
            ..Stale::default()
        };
        let (proxy, redis, _, clock) = stale_core(stale, false);
        redis.put(b"k", b"old");
        read(&proxy, b"k");
        redis.put(b"k", b"new");
        clock.advance(Duration::from_millis(101));
        // The refresh's GET is held until all 50 reads are answered.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        redis.during_next_get(move |_| {
            held.lock().unwrap().recv().ok();
        });
        for _ in 0..50 {
            assert_eq!(
                read(&proxy, b"k"),
                (Some(b"old".to_vec()), Source::StaleHit)
            );
        }
        release.send(()).unwrap();
        eventually(|| read(&proxy, b"k").1 == Source::Hit);
        assert_eq!(read(&proxy, b"k"), (Some(b"new".to_vec()), Source::Hit));
        assert_eq!(
            redis.gets.load(AtomicOrdering::SeqCst),
            2,
            "one miss, one refresh"
        );
        assert_eq!(proxy.metrics.refreshes.get(), 1);
        assert!(proxy.metrics.stale_revalidate.get() >= 50);
        clock.advance(Duration::from_millis(99));
        assert_eq!(
            read(&proxy, b"k").1,
            Source::Hit,
            "the refresh reset the age"
        );
    }

    /// An invalidation while the background refresh is in flight: the
    /// refreshed value is not kept (the flight's stale mark, as for a miss).
    #[test]
    fn invalidation_during_a_refresh_is_not_cached() {
        let stale = Stale {
            revalidate: Duration::from_millis(1000),
            ..Stale::default()
        };
        let (proxy, redis, coherence, clock) = stale_core(stale, true);
        redis.put(b"k", b"v1");
        read(&proxy, b"k");
        redis.put(b"k", b"v2");
        clock.advance(Duration::from_millis(101));
        let (done, landed) = std::sync::mpsc::channel::<()>();
        let done = Mutex::new(done);
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"k".to_vec(), b"v3".to_vec());
            coherence.invalidate(b"k");
            done.lock().unwrap().send(()).ok();
        });
        assert_eq!(read(&proxy, b"k").1, Source::StaleHit);
        landed.recv_timeout(Duration::from_secs(5)).unwrap();
        eventually(|| proxy.coherence.join(b"k", 0).is_leader());
        assert_eq!(read(&proxy, b"k"), (Some(b"v3".to_vec()), Source::Miss));
    }

    /// One key's answer in a batch: its value and source, or the error.
    type Answered = Result<(Option<Vec<u8>>, Source), BackendError>;

    /// What each key of a batch answered.
    fn batch(proxy: &Proxy<Arc<FakeRedis>>, keys: &[&[u8]]) -> Vec<Answered> {
        proxy
            .get_batch(keys, 0)
            .into_iter()
            .map(|r| r.map(|l| (l.value.map(|v| v.as_ref().to_vec()), l.source)))
            .collect()
    }

    fn found(v: &[u8], source: Source) -> Answered {
        Ok((Some(v.to_vec()), source))
    }

    /// Hits come from the cache, every miss of the batch from one round
    /// trip, answered in order and cached like a GET's.
    #[test]
    fn batch_fetches_its_misses_in_one_round_trip() {
        let (proxy, redis, _) = tracked();
        for k in [&b"a"[..], b"b", b"c"] {
            redis.put(k, k);
        }
        read(&proxy, b"b");
        let got = batch(&proxy, &[b"a", b"b", b"absent", b"c"]);
        assert_eq!(
            got,
            vec![
                found(b"a", Source::Miss),
                found(b"b", Source::Hit),
                Ok((None, Source::Miss)),
                found(b"c", Source::Miss),
            ]
        );
        assert_eq!(redis.batches.load(AtomicOrdering::SeqCst), 1);
        assert_eq!(
            redis.gets.load(AtomicOrdering::SeqCst),
            1,
            "only the first read"
        );
        assert_eq!(read(&proxy, b"a").1, Source::Hit);
        assert_eq!(read(&proxy, b"c").1, Source::Hit);
        assert_eq!(proxy.metrics.misses.get(), 4);
        assert_eq!(proxy.metrics.hits.get(), 3);
    }

    /// A key that holds another type is an error of its own in the middle
    /// of a batch; the keys around it are answered.
    #[test]
    fn batch_wrong_type_fails_only_its_key() {
        let (proxy, redis, _) = tracked();
        redis.put(b"a", b"1");
        redis.put(b"c", b"3");
        redis.wrong_type.lock().unwrap().push(b"w".to_vec());
        let got = batch(&proxy, &[b"a", b"w", b"c"]);
        assert_eq!(got[0], found(b"1", Source::Miss));
        assert_eq!(got[1], Err(BackendError::Reply("WRONGTYPE".into())));
        assert_eq!(got[2], found(b"3", Source::Miss));
    }

    /// An invalidation of one key while the batch is in flight: that key's
    /// value answers but is not kept; the others are (guard: each key's
    /// flight mark, as for a GET).
    #[test]
    fn invalidation_during_a_batch_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"a", b"old");
        redis.put(b"b", b"b");
        redis.during_next_get(move |store| {
            store.lock().unwrap().insert(b"a".to_vec(), b"new".to_vec());
            coherence.invalidate(b"a");
        });
        let got = batch(&proxy, &[b"a", b"b"]);
        assert_eq!(got[0], found(b"old", Source::Miss));
        assert_eq!(read(&proxy, b"a"), (Some(b"new".to_vec()), Source::Miss));
        assert_eq!(read(&proxy, b"b").1, Source::Hit);
    }

    /// A flush while the batch is in flight: nothing it fetched is kept.
    #[test]
    fn flush_during_a_batch_is_not_cached() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"a", b"old-a");
        redis.put(b"b", b"old-b");
        redis.during_next_get(move |store| {
            store.lock().unwrap().clear();
            coherence.flush();
        });
        let got = batch(&proxy, &[b"a", b"b"]);
        assert_eq!(got[1], found(b"old-b", Source::Miss));
        assert_eq!(read(&proxy, b"a"), (None, Source::Miss));
        assert_eq!(read(&proxy, b"b"), (None, Source::Miss));
    }

    /// A key named twice in one batch is fetched once: the second waits
    /// for the first, which has landed by then (no deadlock).
    #[test]
    fn batch_key_named_twice_is_fetched_once() {
        let (proxy, redis, _) = tracked();
        redis.put(b"k", b"v");
        let got = batch(&proxy, &[b"k", b"k"]);
        assert_eq!(
            got,
            vec![found(b"v", Source::Miss), found(b"v", Source::Collapsed)]
        );
        assert_eq!(redis.batches.load(AtomicOrdering::SeqCst), 1);
    }

    /// A key another request is fetching is not fetched again: the batch
    /// waits for that GET (single-flight, as `get`).
    #[test]
    fn batch_waits_for_a_fetch_in_flight() {
        let (proxy, redis, _) = tracked();
        redis.put(b"k", b"v");
        redis.put(b"x", b"x");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        redis.during_next_get(move |_| {
            held.lock().unwrap().recv().ok();
        });
        let first = {
            let proxy = proxy.clone();
            std::thread::spawn(move || read(&proxy, b"k"))
        };
        eventually(|| proxy.coherence.in_flight(b"k"));
        let second = {
            let proxy = proxy.clone();
            std::thread::spawn(move || batch(&proxy, &[b"x", b"k"]))
        };
        eventually(|| proxy.metrics.coalesced.get() == 1);
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap(), (Some(b"v".to_vec()), Source::Miss));
        let got = second.join().unwrap();
        assert_eq!(
            got,
            vec![found(b"x", Source::Miss), found(b"v", Source::Collapsed)]
        );
        assert_eq!(redis.gets.load(AtomicOrdering::SeqCst), 1);
    }

    /// A failed round trip fails every key it carried, except those
    /// stale-if-error may answer.
    #[test]
    fn batch_failure_fails_its_keys_and_answers_stale_if_error() {
        let (proxy, redis, _, clock) = stale_core(if_error(50), false);
        redis.put(b"k", b"old");
        read(&proxy, b"k");
        clock.advance(Duration::from_millis(120));
        fail(&redis, Some(BackendError::Timeout));
        let got = batch(&proxy, &[b"k", b"never"]);
        assert_eq!(
            got,
            vec![found(b"old", Source::StaleHit), Err(BackendError::Timeout)]
        );
        assert_eq!(proxy.metrics.stale_error.get(), 1);
        // Nothing stays in flight after a failed batch.
        assert!(!proxy.coherence.in_flight(b"never"));
    }

    /// With the listener down a batch neither reads nor fills the cache;
    /// a stale hit within the revalidate window starts one refresh.
    #[test]
    fn batch_follows_gets_cache_rules() {
        let (proxy, redis, coherence) = tracked();
        redis.put(b"k", b"v");
        read(&proxy, b"k");
        coherence.listener_down();
        assert_eq!(batch(&proxy, &[b"k"]), vec![found(b"v", Source::Miss)]);
        coherence.listener_up(2);
        assert_eq!(batch(&proxy, &[b"k"]), vec![found(b"v", Source::Miss)]);
        assert_eq!(batch(&proxy, &[b"k"]), vec![found(b"v", Source::Hit)]);

        let stale = Stale {
            revalidate: Duration::from_millis(1000),
            ..Stale::default()
        };
        let (proxy, redis, _, clock) = stale_core(stale, false);
        redis.put(b"k", b"old");
        read(&proxy, b"k");
        redis.put(b"k", b"new");
        clock.advance(Duration::from_millis(101));
        assert_eq!(
            batch(&proxy, &[b"k"]),
            vec![found(b"old", Source::StaleHit)]
        );
        eventually(|| read(&proxy, b"k") == (Some(b"new".to_vec()), Source::Hit));
        assert_eq!(proxy.metrics.refreshes.get(), 1);
    }
}
