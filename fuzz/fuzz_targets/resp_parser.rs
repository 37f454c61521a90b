//! Fuzzes the RESP request parser: the incremental `redis_proxy::resp::Parser`
//! against the one-shot `redis_proxy::resp::parse`.
//!
//! Input layout: bytes 0..2 seed the chunk splits, bytes 2..4 pick `max`,
//! the rest is the request buffer. Inputs shorter than 4 bytes are parsed
//! whole with `max = 1 MiB`.
//!
//! Invariants checked (a failed one aborts, which libFuzzer records as a
//! crash):
//! * neither parser panics;
//! * every `Complete { consumed }`: `0 < consumed <= available` (0 would
//!   spin the connection loop forever) and every argument range lies within
//!   `buf[..consumed]`;
//! * every `Incomplete { need }`: `need > available`;
//! * the reference session (one-shot `parse` from each command start on
//!   the whole buffer) equals the session of one `Parser` fed the buffer
//!   in chunks through the same loop as `resp::serve` (parse only once
//!   `need` bytes are buffered, resume inside a command): split once at
//!   the seed, in random chunk lengths drawn from the seed, and (for short
//!   inputs) one byte at a time. Same commands, same protocol error.
#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use redis_proxy::resp::{parse, Parsed, Parser, ProtocolError};

/// Everything a connection would do with this byte stream.
#[derive(Debug, PartialEq, Eq)]
struct Session {
    /// Every command parsed, blank ones (no arguments) included.
    commands: Vec<Vec<Vec<u8>>>,
    /// The protocol error that closed the connection, if any.
    error: Option<String>,
}

/// Checks one call's outcome against the bytes it had.
fn check(result: &Result<Parsed, ProtocolError>, avail: usize, args: &[Range<usize>]) {
    match result {
        Ok(Parsed::Complete { consumed }) => {
            let consumed = *consumed;
            assert!(consumed > 0, "Complete with consumed == 0");
            assert!(consumed <= avail, "consumed {consumed} > available {avail}");
            for r in args {
                assert!(
                    r.start <= r.end && r.end <= consumed,
                    "arg range {r:?} outside buf[..{consumed}]"
                );
            }
        }
        Ok(Parsed::Incomplete { need }) => {
            assert!(*need > avail, "Incomplete need {need} <= available {avail}");
        }
        Err(_) => {}
    }
}

/// The reference: one-shot `parse` from each command start, on all of `buf`.
fn reference(buf: &[u8], max: usize) -> Session {
    let mut args = Vec::new();
    let mut start = 0;
    let mut commands = Vec::new();
    loop {
        // Leftovers from an earlier call must not leak into this one.
        args.push(usize::MAX..usize::MAX);
        let result = parse(&buf[start..], max, &mut args);
        check(&result, buf.len() - start, &args);
        match result {
            Ok(Parsed::Complete { consumed }) => {
                let base = start;
                commands.push(
                    args.iter()
                        .map(|r| buf[base + r.start..base + r.end].to_vec())
                        .collect(),
                );
                start += consumed;
            }
            Ok(Parsed::Incomplete { .. }) => {
                return Session {
                    commands,
                    error: None,
                }
            }
            Err(e) => {
                return Session {
                    commands,
                    error: Some(e.0),
                }
            }
        }
    }
}

/// One `Parser` fed `buf` in pieces ending at `cuts` (ascending), through
/// the loop of `resp::serve`.
fn incremental(buf: &[u8], cuts: impl Iterator<Item = usize>, max: usize) -> Session {
    let mut parser = Parser::new();
    let mut start = 0;
    let mut need = 1;
    let mut commands = Vec::new();
    for avail in cuts.chain([buf.len()]) {
        while avail - start >= need {
            let result = parser.parse(&buf[start..avail], max);
            check(&result, avail - start, parser.args());
            match result {
                Ok(Parsed::Complete { consumed }) => {
                    let base = start;
                    commands.push(
                        parser
                            .args()
                            .iter()
                            .map(|r| buf[base + r.start..base + r.end].to_vec())
                            .collect(),
                    );
                    start += consumed;
                    need = 1;
                }
                Ok(Parsed::Incomplete { need: n }) => need = n,
                Err(e) => {
                    return Session {
                        commands,
                        error: Some(e.0),
                    }
                }
            }
        }
    }
    Session {
        commands,
        error: None,
    }
}

/// Ascending cut points of random chunk lengths (1..=64, sometimes up to
/// 4 KiB), drawn from `seed` with xorshift.
fn random_cuts(len: usize, seed: u16) -> Vec<usize> {
    let mut x = u32::from(seed) | 0x1_0000;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut cuts = Vec::new();
    let mut at = 0;
    loop {
        let r = next();
        let bound = if r % 8 == 0 { 4096 } else { 64 };
        let step = (r % bound) as usize + 1;
        at += step;
        if at >= len {
            return cuts;
        }
        cuts.push(at);
    }
}

fuzz_target!(|data: &[u8]| {
    let (seed, max, buf) = if data.len() < 4 {
        (0u16, 1usize << 20, data)
    } else {
        let seed = u16::from_le_bytes([data[0], data[1]]);
        let m = u16::from_le_bytes([data[2], data[3]]);
        let max = match m >> 14 {
            // The bound the unit tests use.
            0 => 1 << 20,
            // Tiny bounds, to reach "request too large" and friends.
            1 => (m & 0x3fff) as usize,
            // No bound at all: lengths near i64::MAX must not overflow.
            2 => usize::MAX,
            // The server's default (DEFAULT_RESP_MAX_REQUEST_BYTES).
            _ => 64 << 20,
        };
        (seed, max, &data[4..])
    };

    let whole = reference(buf, max);
    assert_eq!(
        incremental(buf, std::iter::empty(), max),
        whole,
        "fed whole"
    );
    let split = usize::from(seed) % (buf.len() + 1);
    assert_eq!(
        incremental(buf, std::iter::once(split), max),
        whole,
        "split at {split}"
    );
    let cuts = random_cuts(buf.len(), seed);
    assert_eq!(
        incremental(buf, cuts.iter().copied(), max),
        whole,
        "cut at {cuts:?}"
    );
    if buf.len() <= 256 {
        assert_eq!(incremental(buf, 1..buf.len(), max), whole, "byte by byte");
    }
});
