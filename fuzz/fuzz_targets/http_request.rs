//! Fuzzes the HTTP request-head parser: `redis_proxy::http::parse::parse_head`
//! and the end-of-head scan `may_end_head` the connection loop relies on.
//!
//! Invariants checked (a failed one aborts, which libFuzzer records as a
//! crash):
//! * neither function panics on any input;
//! * a complete head is at most `MAX_HEAD_BYTES` long and no longer than the
//!   input, and `close` and `keep_alive` are never both set;
//! * the parse is stable under extension: a head complete in `data` is the
//!   same head (length, method, target) with more bytes appended, so a
//!   pipelined request behind it never changes how it is read;
//! * an input cut short of a complete head's length is never complete;
//! * the end-of-head scan never misses: if `data` holds a complete head,
//!   `may_end_head(data, k)` is true for every `k` below that head's length
//!   (the loop scans from where the last read began, and a head that
//!   completes in a read ends at or after that point).
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis_proxy::config::MAX_HEAD_BYTES;
use redis_proxy::http::parse::{may_end_head, parse_head};

fuzz_target!(|data: &[u8]| {
    let Ok(Some(head)) = parse_head(data) else {
        return;
    };
    assert!(head.len <= data.len() && head.len <= MAX_HEAD_BYTES);
    assert!(!(head.close && head.keep_alive));
    let (len, method, target) = (head.len, head.method, head.target.to_vec());

    let mut longer = data.to_vec();
    longer.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
    match parse_head(&longer) {
        Ok(Some(again)) => {
            assert_eq!((again.len, again.method, again.target), (len, method, &target[..]));
        }
        other => panic!("complete head changed when extended: {other:?}"),
    }
    if len > 0 {
        assert!(!matches!(parse_head(&data[..len - 1]), Ok(Some(_))));
    }
    for k in 0..len {
        assert!(may_end_head(data, k), "end-of-head scan from {k} missed a head of {len}");
    }
});
