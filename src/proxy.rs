//! proxy: the read-through core both front ends call.
//!
//! Owns the lookup order (cache, then one Redis `GET`), single-flight misses,
//! inserting what Redis returned, and the hit/miss counters. Knows nothing of
//! HTTP or RESP encoding; front ends turn its results into bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use may::sync::SyncFlag;

use crate::backend::{Backend, BackendError};
use crate::cache::{Cache, Value, MAX_VALUE_BYTES};
use crate::metrics::{Metrics, Snapshot};
use crate::tracking::Tracking;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    Miss,
}

/// The answer to one GET: the value (or `None` when Redis has no such key).
#[derive(Debug, Clone)]
pub struct Lookup {
    pub value: Option<Value>,
    pub source: Source,
}

type FlightResult = Result<Option<Value>, BackendError>;

/// Keys of in-flight fetches.
type Key = Arc<[u8]>;

/// One Redis GET in progress; concurrent misses on the same key wait on it.
struct Flight {
    done: SyncFlag,
    result: OnceLock<FlightResult>,
    /// Set when the key was invalidated or written while the GET was in
    /// flight: the fetched value may predate that change, so it is not cached.
    stale: AtomicBool,
}

/// The shared read-through core.
pub struct Proxy {
    cache: Arc<Cache>,
    backend: Backend,
    metrics: Arc<Metrics>,
    /// In-flight misses by key. A guard on this map is never held across a
    /// yield: entries are cloned out and the guard dropped before waiting.
    flights: DashMap<Key, Arc<Flight>>,
    /// Bumped by every invalidation; a multi-key fetch that saw it move
    /// drops what it cached (it cannot tell which keys changed mid-flight).
    epoch: AtomicU64,
    /// Bumped when the cache is emptied or tracking may have lapsed: a value
    /// fetched across such an event is not kept.
    generation: AtomicU64,
    tracking: Option<Arc<Tracking>>,
}

impl Proxy {
    /// Wires the core over a cache and a backend.
    pub fn new(
        cache: Arc<Cache>,
        backend: Backend,
        metrics: Arc<Metrics>,
        tracking: Option<Arc<Tracking>>,
    ) -> Self {
        Proxy {
            cache,
            backend,
            metrics,
            flights: DashMap::new(),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            tracking,
        }
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The Redis connections.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Reads `key`: from the cache, else with exactly one Redis GET shared by
    /// every concurrent miss on the key. `hint` picks the Redis connection
    /// (the client's fd, so both sockets share a worker).
    pub fn get(&self, key: &[u8], hint: usize) -> Result<Lookup, BackendError> {
        // Read before deciding the cache is usable: a flush between the two
        // would otherwise go unseen by the fetch below.
        let generation = self.generation.load(Ordering::SeqCst);
        if !self.cache_usable() {
            // Tracking lapsed: invalidations could be missed, so bypass the cache.
            self.metrics.misses.inc();
            let value = self.backend.get(hint, key)?;
            return Ok(Lookup {
                value: value.map(|v| uncached(key, &v)).transpose()?,
                source: Source::Miss,
            });
        }
        if let Some(value) = self.cache.get(key) {
            self.metrics.hits.inc();
            return Ok(Lookup {
                value: Some(value),
                source: Source::Hit,
            });
        }
        self.metrics.misses.inc();
        if self.cache.capacity() == 0 {
            // Pass-through: every GET goes to Redis, nothing is shared.
            let value = self.backend.get(hint, key)?;
            return Ok(Lookup {
                value: value.map(|v| uncached(key, &v)).transpose()?,
                source: Source::Miss,
            });
        }
        let key: Key = Arc::from(key);
        let (flight, leader) = match self.flights.entry(key.clone()) {
            Entry::Occupied(e) => (e.get().clone(), false),
            Entry::Vacant(e) => {
                let flight = Arc::new(Flight {
                    done: SyncFlag::new(),
                    result: OnceLock::new(),
                    stale: AtomicBool::new(false),
                });
                e.insert(flight.clone());
                (flight, true)
            }
        };
        if !leader {
            self.metrics.coalesced.inc();
            flight.done.wait();
            let result = flight
                .result
                .get()
                .cloned()
                .unwrap_or_else(|| Err(BackendError::Unavailable("request abandoned".into())));
            return result.map(|value| Lookup {
                value,
                source: Source::Miss,
            });
        }
        let landing = Landing {
            proxy: self,
            key: &key,
            flight: &flight,
        };
        // An earlier leader may have filled the cache between our miss and
        // our flight: take its value rather than asking Redis again.
        let result = match self.cache.get(&key) {
            Some(value) => Ok(Some(value)),
            None => self.fetch(&key, hint, &flight, generation),
        };
        flight.result.set(result.clone()).ok();
        drop(landing);
        result.map(|value| Lookup {
            value,
            source: Source::Miss,
        })
    }

    /// Reads several keys: hits from the cache, all misses from Redis in one
    /// pipelined round trip (not coalesced with other requests). A key that
    /// is absent or holds another type reads as `None`, as in Redis's MGET.
    pub fn get_many(
        &self,
        keys: &[&[u8]],
        hint: usize,
    ) -> Result<Vec<Option<Value>>, BackendError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let usable = self.cache_usable();
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
        let epoch = self.epoch.load(Ordering::SeqCst);
        let miss_keys: Vec<&[u8]> = missing.iter().map(|&i| keys[i]).collect();
        let results = self.backend.get_many(hint, &miss_keys)?;
        // All or nothing, before anything is cached: an early return below
        // would skip the staleness check at the end.
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
        if usable
            && (self.epoch.load(Ordering::SeqCst) != epoch
                || self.generation.load(Ordering::SeqCst) != generation
                || !self.cache_usable())
        {
            for &i in &missing {
                self.cache.remove(keys[i]);
            }
        }
        Ok(out)
    }

    fn fetch(&self, key: &Key, hint: usize, flight: &Flight, generation: u64) -> FlightResult {
        let Some(bytes) = self.backend.get(hint, key)? else {
            return Ok(None);
        };
        fits(bytes.len())?;
        let value = self.cache.insert(key, &bytes);
        // Checked after the insert: an invalidation or flush that came
        // before this point is honoured here; one after it removes the
        // entry itself.
        if flight.stale.load(Ordering::SeqCst)
            || self.generation.load(Ordering::SeqCst) != generation
            || !self.cache_usable()
        {
            self.cache.remove(key);
        }
        Ok(Some(value))
    }

    /// False while tracking is on but its invalidation connection is down.
    fn cache_usable(&self) -> bool {
        self.tracking.as_ref().is_none_or(|t| t.ready())
    }

    /// Marks every fetch in flight as not cacheable (tracking may have lapsed).
    pub fn distrust(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Sends a write command (`SET`, `DEL`, ...) and then drops `keys` from
    /// the cache. The written value is not cached: Redis does not track keys
    /// a client writes, so a cached copy would never be invalidated.
    pub fn write(
        &self,
        hint: usize,
        cmd: Vec<u8>,
        keys: &[&[u8]],
    ) -> Result<redis::Value, BackendError> {
        let result = self.backend.query(hint, cmd, 1);
        for key in keys {
            self.invalidate(key);
        }
        let value = result?.pop().unwrap_or(redis::Value::Nil);
        if let redis::Value::ServerError(err) = &value {
            return Err(BackendError::Reply(crate::backend::server_error_line(err)));
        }
        Ok(value)
    }

    /// Drops `key` from the cache, and keeps a GET in flight for it from
    /// caching what it fetched (it may predate the change).
    pub fn invalidate(&self, key: &[u8]) -> bool {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(flight) = self.flights.get(key) {
            flight.stale.store(true, Ordering::SeqCst);
        }
        self.cache.remove(key)
    }

    /// Empties the cache, and marks every GET in flight stale.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        for flight in self.flights.iter() {
            flight.stale.store(true, Ordering::SeqCst);
        }
        self.cache.clear();
    }

    /// The Prometheus exposition of every counter.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.snapshot())
    }

    /// The `# Stats` section of RESP `INFO`: the same counters.
    pub fn render_info(&self) -> String {
        self.metrics.render_info(&self.snapshot())
    }

    /// What the metrics renderings read from the cache and the backend.
    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            cache: self.cache.stats(),
            cache_entries: self.cache.len(),
            backend: self.backend.stats(),
            tracking: self.tracking.is_some(),
        }
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

/// Ends a flight however the leader leaves (return or panic): removes it
/// from the map, then wakes the waiters. A flight ended without a result
/// (a panic) reads as an error to its waiters.
struct Landing<'a> {
    proxy: &'a Proxy,
    key: &'a Key,
    flight: &'a Arc<Flight>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.proxy.flights.remove(self.key);
        self.flight.done.fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
