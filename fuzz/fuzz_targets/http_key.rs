//! Fuzzes HTTP key decoding: `redis_proxy::http::parse_target` and
//! `redis_proxy::http::percent_decode`.
//!
//! Invariants checked (a failed one aborts, which libFuzzer records as a
//! crash):
//! * neither function panics on any input (the input used as a raw target);
//! * a decoded key is never empty and never longer than 64 KiB
//!   (`MAX_KEY_BYTES`), and equals `percent_decode` of the path before `?`
//!   less one leading `/` (borrowed or not); `percent_decode` never grows its
//!   input;
//! * round trip: the input taken as an arbitrary key, every byte written as
//!   `%XX` (upper case, and again lower case) behind a `/`, decodes back to
//!   the same key with `json == false` when `1 <= len <= 65536`, to `Empty`
//!   when the key is empty and to `TooLong` above 65536; written with only
//!   `%` and `?` escaped and `?format=json` appended it decodes to the same
//!   key with `json == true`;
//! * on the first run and every 4096th one, the round trip also runs on a
//!   key of 65535..=65538 bytes (the input repeated; the length is picked by
//!   `input.len() % 4`), to cross the length limit, which libFuzzer's
//!   default input size never reaches.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use redis_proxy::config::MAX_KEY_BYTES;
use redis_proxy::http::{parse_target, percent_decode, KeyError};

/// Runs so far in this process, to space out the long-key round trips.
static LONG_RUNS: AtomicUsize = AtomicUsize::new(0);

const UPPER: &[u8; 16] = b"0123456789ABCDEF";
const LOWER: &[u8; 16] = b"0123456789abcdef";

/// `/` followed by every byte of `key` as `%XX`.
fn encode_all(key: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 3 * key.len());
    out.push(b'/');
    for &b in key {
        out.extend_from_slice(&[b'%', digits[(b >> 4) as usize], digits[(b & 15) as usize]]);
    }
    out
}

/// `/` followed by `key` with only `%` and `?` escaped, then `query`.
fn encode_min(key: &[u8], query: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 3 * key.len() + query.len());
    out.push(b'/');
    for &b in key {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b'?' => out.extend_from_slice(b"%3F"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(query);
    out
}

/// `parse_target` with the key copied out, so results compare the same
/// whether the key is owned or borrowed from `raw`.
fn decode(raw: &[u8]) -> Result<(Vec<u8>, bool), KeyError> {
    parse_target(raw).map(|t| (t.key.to_vec(), t.json))
}

fn round_trip(key: &[u8]) {
    let expect = |json: bool| -> Result<(Vec<u8>, bool), KeyError> {
        if key.is_empty() {
            Err(KeyError::Empty)
        } else if key.len() > MAX_KEY_BYTES {
            Err(KeyError::TooLong)
        } else {
            Ok((key.to_vec(), json))
        }
    };
    for digits in [UPPER, LOWER] {
        let raw = encode_all(key, digits);
        assert_eq!(
            decode(&raw),
            expect(false),
            "round trip of a {}-byte key, all escaped",
            key.len()
        );
    }
    let raw = encode_min(key, b"?a=1&format=json");
    assert_eq!(
        decode(&raw),
        expect(true),
        "round trip of a {}-byte key, minimal escaping",
        key.len()
    );
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes as a request target.
    if let Ok(t) = parse_target(data) {
        assert!(!t.key.is_empty(), "Ok with an empty key");
        assert!(
            t.key.len() <= MAX_KEY_BYTES,
            "decoded key of {} bytes > {MAX_KEY_BYTES}",
            t.key.len()
        );
        assert!(t.key.len() <= data.len());
        // The key is the path up to `?`, less one leading `/`, decoded;
        // whether it was borrowed or decoded must not matter.
        let path = data.split(|b| *b == b'?').next().unwrap_or_default();
        let encoded = path.strip_prefix(b"/").unwrap_or(path);
        assert_eq!(
            percent_decode(encoded).as_deref(),
            Ok(&t.key[..]),
            "key differs from the decoded path"
        );
    }
    if let Ok(v) = percent_decode(data) {
        assert!(v.len() <= data.len(), "percent_decode grew its input");
    }

    // Arbitrary bytes as a key.
    round_trip(data);

    // Keys around the length limit, built from this input. One such round
    // trip costs about a thousand ordinary runs, so it is done on the first
    // run of the process (a reproducer run alone always takes it) and then
    // every 4096th.
    if LONG_RUNS
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(4096)
    {
        let len = MAX_KEY_BYTES - 1 + data.len() % 4;
        let seed: &[u8] = if data.is_empty() { b"x" } else { data };
        let key: Vec<u8> = seed.iter().copied().cycle().take(len).collect();
        round_trip(&key);
    }
});
