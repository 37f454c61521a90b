//! Fuzzes the RESP request parser, `redis_proxy::resp::parse`.
//!
//! Input layout: bytes 0..2 pick the split point, bytes 2..4 pick `max`,
//! the rest is the request buffer. Inputs shorter than 4 bytes are parsed
//! whole with `max = 1 MiB`.
//!
//! Invariants checked (a failed one aborts, which libFuzzer records as a
//! crash):
//! * `parse` never panics;
//! * `Complete { consumed }`: `0 < consumed <= buf.len()` (0 would spin the
//!   connection loop forever) and every argument range lies within
//!   `buf[..consumed]`;
//! * `Incomplete { need }`: `need > buf.len()`;
//! * feeding the buffer in two pieces (split at a point chosen from the
//!   data) through the same loop as `resp::serve` (parse only once the
//!   buffer holds `need` bytes) yields the same first command, and the same
//!   command sequence and protocol error, as feeding it whole.
#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use redis_proxy::resp::{parse, Parsed};

/// What one `parse` call returned, with the arguments copied out.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Complete { consumed: usize, args: Vec<Vec<u8>> },
    Incomplete { need: usize },
    Error(String),
}

/// Calls `parse` once and checks the single-call invariants.
fn parse_checked(buf: &[u8], max: usize, args: &mut Vec<Range<usize>>) -> Outcome {
    // Leftovers from an earlier call must not leak into this one.
    args.push(usize::MAX..usize::MAX);
    match parse(buf, max, args) {
        Ok(Parsed::Complete { consumed }) => {
            assert!(consumed > 0, "Complete with consumed == 0");
            assert!(
                consumed <= buf.len(),
                "consumed {consumed} > buf.len() {}",
                buf.len()
            );
            for r in args.iter() {
                assert!(
                    r.start <= r.end && r.end <= consumed,
                    "arg range {r:?} outside buf[..{consumed}]"
                );
            }
            Outcome::Complete {
                consumed,
                args: args.iter().map(|r| buf[r.clone()].to_vec()).collect(),
            }
        }
        Ok(Parsed::Incomplete { need }) => {
            assert!(
                need > buf.len(),
                "Incomplete need {need} <= buf.len() {}",
                buf.len()
            );
            Outcome::Incomplete { need }
        }
        Err(e) => Outcome::Error(e.0),
    }
}

/// Everything a connection would do with this byte stream.
#[derive(Debug, PartialEq, Eq)]
struct Session {
    /// Every command parsed, blank ones (no arguments) included.
    commands: Vec<Vec<Vec<u8>>>,
    /// The protocol error that closed the connection, if any.
    error: Option<String>,
}

/// Feeds `chunks` one after another through the loop of `resp::serve`:
/// after each chunk, parse while the unparsed tail holds at least `need`.
fn drive(chunks: &[&[u8]], max: usize) -> Session {
    let mut rbuf: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut need = 1;
    let mut args = Vec::new();
    let mut commands = Vec::new();
    for chunk in chunks {
        rbuf.extend_from_slice(chunk);
        while rbuf.len() - start >= need {
            match parse_checked(&rbuf[start..], max, &mut args) {
                Outcome::Complete { consumed, args } => {
                    commands.push(args);
                    start += consumed;
                    need = 1;
                }
                Outcome::Incomplete { need: n } => {
                    need = n;
                    break;
                }
                Outcome::Error(msg) => {
                    return Session {
                        commands,
                        error: Some(msg),
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

fuzz_target!(|data: &[u8]| {
    let (split_sel, max, buf) = if data.len() < 4 {
        (0usize, 1usize << 20, data)
    } else {
        let split_sel = u16::from_le_bytes([data[0], data[1]]) as usize;
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
        (split_sel, max, &data[4..])
    };

    let mut args = Vec::new();
    let single = parse_checked(buf, max, &mut args);

    let split = split_sel % (buf.len() + 1);
    let whole = drive(&[buf], max);
    let pieces = drive(&[&buf[..split], &buf[split..]], max);

    // The first command (or the error before it) must not depend on how the
    // bytes arrived.
    assert_eq!(
        whole.commands.first(),
        pieces.commands.first(),
        "first command differs when split at {split}"
    );
    if whole.commands.is_empty() {
        assert_eq!(
            whole.error, pieces.error,
            "error differs when split at {split}"
        );
    }
    // Nor may anything after it.
    assert_eq!(whole, pieces, "session differs when split at {split}");

    // And the whole-buffer session agrees with the lone call above.
    match single {
        Outcome::Complete { args, .. } => assert_eq!(whole.commands.first(), Some(&args)),
        Outcome::Incomplete { .. } => assert!(whole.commands.is_empty() && whole.error.is_none()),
        Outcome::Error(msg) => {
            assert!(whole.commands.is_empty());
            assert_eq!(whole.error, Some(msg));
        }
    }
});
