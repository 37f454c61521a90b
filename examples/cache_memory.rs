//! Memory cost of a cached entry beyond its key and value bytes.
//!
//! Run: `cargo run --release --example cache_memory` (about 12 s). It runs
//! itself once per implementation, each in a fresh process so one's freed
//! memory cannot hide in another's figure; `cargo run --release --example
//! cache_memory -- ours|lru|moka|floor` measures one.
//!
//! Each run reads its resident set size (`/proc/self/statm`), inserts
//! 1,000,000 entries (11-byte keys `key:NNNNNNN`, 100-byte values, each its
//! own `Arc<[u8]>`) into a cache of capacity 1,000,000, reads RSS again and
//! prints `(rss_after - rss_before - 1M * (11 + 100)) / 1M`. That overhead
//! includes the two `Arc` headers (16 bytes each) and malloc's rounding of
//! the key and value allocations, which every implementation pays alike;
//! `floor` measures exactly that plus a `Vec<(Key, Value)>` (32 bytes a pair),
//! so `impl - floor + 32` is roughly what the index itself costs.
//! RSS also keeps freed memory the allocator has not returned (e.g. old
//! tables left behind by a resize), which is a real cost of the design.
//!
//! # Last figures
//! 2026-11-25 22:10 UTC, 2-vCPU KVM guest (AMD EPYC), glibc malloc, Rust 1.95;
//! the same to 0.2 B in three runs.
//!
//! | impl  | RSS growth | overhead B/entry | index alone (- floor + 32) |
//! |-------|-----------:|-----------------:|---------------------------:|
//! | floor |  198.4 MiB |             97.1 |                          - |
//! | ours  |  311.8 MiB |            216.0 |                        151 |
//! | lru   |  262.9 MiB |            164.7 |                        100 |
//! | moka  |  504.8 MiB |            418.3 |                        353 |
//!
//! Where `ours` goes, by size: 8 DashMap shards of 125k keys each outgrow
//! 7/8 of 131,072 buckets, so each holds 262,144 buckets of 49 bytes
//! (key 16 + slot 32 + control 1): about 103 B/entry. The slab of 48-byte
//! nodes grows to 2^20: about 50 B/entry.

use std::num::NonZeroUsize;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_proxy::cache::{Cache, SystemClock};

type Bytes = Arc<[u8]>;

const ENTRIES: usize = 1_000_000;
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
fn fill(which: &str) -> (usize, usize, usize) {
    let before = rss();
    let mut payload = 0;
    let mut insert = |put: &mut dyn FnMut(Vec<u8>, Vec<u8>), i: usize| {
        let (k, v) = (key(i), value(i));
        payload += k.len() + v.len();
        put(k, v);
    };
    let (held, after) = match which {
        "floor" => {
            let mut pairs: Vec<(Bytes, Bytes)> = Vec::with_capacity(ENTRIES);
            for i in 0..ENTRIES {
                insert(&mut |k, v| pairs.push((k.into(), v.into())), i);
            }
            (pairs.len(), rss())
        }
        "ours" => {
            let ttl = Duration::from_secs(3600);
            let cache = Cache::new(ENTRIES, ttl, Arc::new(SystemClock::default()));
            for i in 0..ENTRIES {
                insert(&mut |k, v| drop(cache.insert(&k, &v)), i);
            }
            (cache.len(), rss())
        }
        "lru" => {
            let cap = NonZeroUsize::new(ENTRIES).unwrap();
            let cache = Mutex::new(lru::LruCache::<Bytes, Bytes>::new(cap));
            for i in 0..ENTRIES {
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
                .max_capacity(ENTRIES as u64)
                .time_to_live(Duration::from_secs(3600))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build();
            for i in 0..ENTRIES {
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

fn measure(which: &str) {
    let (grown, payload, held) = fill(which);
    let overhead = grown as f64 - payload as f64;
    println!(
        "{which:<5} entries {held:>7}  rss +{:>6.1} MiB  payload {:>6.1} MiB  overhead {:>6.1} B/entry",
        grown as f64 / (1 << 20) as f64,
        payload as f64 / (1 << 20) as f64,
        overhead / ENTRIES as f64,
    );
}

fn main() {
    match std::env::args().nth(1) {
        Some(which) => measure(&which),
        None => {
            let exe = std::env::current_exe().expect("path of this example");
            for which in IMPLS {
                let status = Command::new(&exe)
                    .arg(which)
                    .status()
                    .expect("run one measurement");
                assert!(status.success(), "{which} measurement failed");
            }
        }
    }
}
