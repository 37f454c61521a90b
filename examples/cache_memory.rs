//! Memory cost of a cached entry beyond its key and value bytes.
//!
//! Run: `cargo run --release --example cache_memory` (about 12 s). It runs
//! itself once per implementation, each in a fresh process so one's freed
//! memory cannot hide in another's figure; `cargo run --release --example
//! cache_memory -- ours|lru|moka|floor|all [ENTRIES]` measures one (or all)
//! at another size than the default 1,000,000.
//!
//! Each run reads its resident set size (`/proc/self/statm`), inserts
//! 1,000,000 entries (11-byte keys `key:NNNNNNN`, 100-byte values, handed
//! over as byte vectors the way a Redis reply arrives) into a cache of
//! capacity 1,000,000, reads RSS again and prints
//! `(rss_after - rss_before - 1M * (11 + 100)) / 1M`. The overhead includes
//! every header and malloc's rounding of every allocation. `floor` stores the
//! pairs as two `Arc<[u8]>` in a `Vec` (what `lru` and `moka` store, with no
//! index at all), so `impl - floor + 32` is roughly what their index costs.
//! RSS also keeps freed memory the allocator has not returned (e.g. old
//! tables left behind by a resize), which is a real cost of the design.
//!
//! # Last figures
//! 2026-11-25 23:40 UTC, 2-vCPU KVM guest (AMD EPYC), glibc malloc, Rust
//! 1.95; overhead in B/entry (`all N`; 1M repeated within 0.2 B in 3 runs):
//!
//! | impl  |  300k |  600k |    1M |  1.5M |
//! |-------|------:|------:|------:|------:|
//! | floor |  97.0 |  97.1 |  97.0 |  97.0 |
//! | ours  |  74.7 |  73.7 |  76.5 |  70.0 |
//! | lru   | 158.7 | 158.8 | 164.7 | 152.8 |
//! | moka  | 415.4 | 415.7 | 418.2 | 423.5 |
//!
//! Where `ours` goes at 1M: the entry allocation is a 24-byte header + 111
//! bytes, which malloc serves from a 144-byte chunk (33 B). 8 DashMap shards
//! of 125k keys each outgrow 7/8 of 131,072 buckets, so each holds 262,144
//! buckets of 9 bytes (one pointer + one control byte): 19 B. The slab holds
//! 24-byte nodes in 4096-node chunks: 24 B. At other key and value sizes the
//! entry moves with malloc's 16-byte rounding (32-47 B) and at other counts
//! the map with its fill (10-21 B), so the overhead stays between about 66
//! and 93 B.

use std::num::NonZeroUsize;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_proxy::cache::{Cache, SystemClock};

type Bytes = Arc<[u8]>;

const DEFAULT_ENTRIES: usize = 1_000_000;
const VALUE_LEN: usize = 100;
const IMPLS: [&str; 4] = ["floor", "ours", "lru", "moka"];

/// Resident set size of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm has a resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:07}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    vec![(i % 251) as u8; VALUE_LEN]
}

/// Fills one implementation; returns (RSS growth, payload bytes, entries
/// held), reading RSS while the cache is still alive. Key and value arrive
/// as byte vectors (as a Redis reply does); each implementation stores them
/// its own way, and the vectors are freed before the next entry.
fn fill(which: &str, entries: usize) -> (usize, usize, usize) {
    let before = rss();
    let mut payload = 0;
    let mut insert = |put: &mut dyn FnMut(Vec<u8>, Vec<u8>), i: usize| {
        let (k, v) = (key(i), value(i));
        payload += k.len() + v.len();
        put(k, v);
    };
    let (held, after) = match which {
        "floor" => {
            let mut pairs: Vec<(Bytes, Bytes)> = Vec::with_capacity(entries);
            for i in 0..entries {
                insert(&mut |k, v| pairs.push((k.into(), v.into())), i);
            }
            (pairs.len(), rss())
        }
        "ours" => {
            let ttl = Duration::from_secs(3600);
            let cache = Cache::new(entries, ttl, Arc::new(SystemClock::default()));
            for i in 0..entries {
                insert(&mut |k, v| drop(cache.insert(&k, &v)), i);
            }
            (cache.len(), rss())
        }
        "lru" => {
            let cap = NonZeroUsize::new(entries).unwrap();
            let cache = Mutex::new(lru::LruCache::<Bytes, Bytes>::new(cap));
            for i in 0..entries {
                insert(
                    &mut |k, v| drop(cache.lock().unwrap().put(k.into(), v.into())),
                    i,
                );
            }
            let held = cache.lock().unwrap().len();
            (held, rss())
        }
        "moka" => {
            let cache: moka::sync::Cache<Bytes, Bytes> = moka::sync::Cache::builder()
                .max_capacity(entries as u64)
                .time_to_live(Duration::from_secs(3600))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build();
            for i in 0..entries {
                insert(&mut |k, v| cache.insert(k.into(), v.into()), i);
            }
            // Let pending maintenance land so the figure is its steady state.
            cache.run_pending_tasks();
            (cache.entry_count() as usize, rss())
        }
        other => panic!("unknown implementation {other:?}; expected one of {IMPLS:?}"),
    };
    (after - before, payload, held)
}

fn measure(which: &str, entries: usize) {
    let (grown, payload, held) = fill(which, entries);
    let overhead = grown as f64 - payload as f64;
    println!(
        "{which:<5} entries {held:>7}  rss +{:>6.1} MiB  payload {:>6.1} MiB  overhead {:>6.1} B/entry",
        grown as f64 / (1 << 20) as f64,
        payload as f64 / (1 << 20) as f64,
        overhead / entries as f64,
    );
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let entries = match std::env::args().nth(2) {
        Some(n) => n.parse().expect("entries: a positive integer"),
        None => DEFAULT_ENTRIES,
    };
    assert!(entries > 0, "entries: a positive integer");
    if which != "all" {
        return measure(&which, entries);
    }
    let exe = std::env::current_exe().expect("path of this example");
    for which in IMPLS {
        let status = Command::new(&exe)
            .args([which, &entries.to_string()])
            .status()
            .expect("run one measurement");
        assert!(status.success(), "{which} measurement failed");
    }
}
