//! System tests of the HTTP request-size bounds and connection handling
//! beyond single requests (DESIGN.md section 1, "HTTP"): the request-head
//! limit and pipelined keep-alive requests.

mod common;

use std::time::{Duration, Instant};

use common::{Http, Proxy, Redis, DEADLINE};

/// Sends a GET whose head carries one `X-Pad` header of `pad` bytes.
fn get_with_pad(c: &mut Http, path: &str, pad: usize) -> std::io::Result<common::Response> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ");
    req.push_str(&"p".repeat(pad));
    req.push_str("\r\n\r\n");
    c.send(req.as_bytes())?;
    c.read_response(false)
}

/// A request head over 128 KiB is answered 431 or the connection is closed; it is never served.
#[test]
fn oversize_head_is_431_or_closed() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    // Closed (possibly reset while we were still sending) is fine too.
    if let Ok(r) = get_with_pad(&mut c, "/k", 140 * 1024) {
        assert_eq!(r.status, 431, "{r:?}");
    }
    // The proxy is unharmed.
    assert_eq!(proxy.get("/k").body, b"v");
}

/// A request head well under 128 KiB is served normally.
#[test]
fn large_head_under_limit_is_served() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    let r = get_with_pad(&mut c, "/k", 100 * 1024).expect("a response");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"v"[..]), "{r:?}");
}

/// A head that keeps growing past 128 KiB without ending is cut off, long
/// before the (default, 60 s) idle timeout could close it.
#[test]
fn growing_head_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    c.send(&unfinished_head(0))
        .expect("send the start of a head");
    let chunk = vec![b'p'; 32 * 1024];
    // Keep the head growing (at most 4 MiB) until the proxy stops taking it.
    let mut sent = 0;
    while sent < 4 << 20 && c.send(&chunk).is_ok() {
        sent += chunk.len();
        if c.wait_closed(Duration::from_millis(50)).is_some() {
            break;
        }
    }
    assert!(
        c.wait_closed(DEADLINE).is_some(),
        "an unfinished head of {sent} bytes was still being buffered"
    );
    assert_eq!(proxy.get("/-/healthy").status, 200);
}

/// A 200 KiB unfinished head sent at once after a completed request is cut off.
///
/// A known limit, kept as a reproducer: the reaper (src/clients.rs, `reap`)
/// re-bases a connection's byte mark on the bytes received *when it notices*
/// a completed request, up to one tick later, so a burst that arrived in
/// between is not counted and only the idle timeout ends the connection.
/// Counting exactly needs may_minihttp's unparsed-buffer length, which it
/// does not expose; a TCP_INFO read per request would cost the hit path.
#[test]
#[ignore = "known limit (README): a head sent in the same burst as the end of the previous request is bounded only by the idle timeout"]
fn burst_head_after_a_request_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    assert_eq!(c.get("/-/healthy").status, 200);
    // The proxy may close while we are still sending: that is the point.
    let _ = c.send(&unfinished_head(200 * 1024));
    assert!(
        c.wait_closed(DEADLINE).is_some(),
        "a 200 KiB unfinished head was still buffered after {DEADLINE:?}"
    );
}

/// 200 KiB unfinished heads sent at once on new connections are all cut off.
///
/// Guards against counting from the accept: a head that arrived before a
/// late accept (a loaded machine) must count too.
#[test]
fn burst_head_on_new_connections_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let head = unfinished_head(200 * 1024);
    let mut conns: Vec<Http> = (0..20).map(|_| proxy.http()).collect();
    for c in &mut conns {
        let _ = c.send(&head);
    }
    let end = Instant::now() + DEADLINE;
    let mut open = 0;
    for c in &mut conns {
        if c.wait_closed(end.saturating_duration_since(Instant::now()))
            .is_none()
        {
            open += 1;
        }
    }
    assert_eq!(
        open,
        0,
        "of {} connections, {open} still buffer a 200 KiB head after {DEADLINE:?}",
        conns.len()
    );
}

/// A request line and the start of a header, padded to at least `len` bytes,
/// with no end.
fn unfinished_head(len: usize) -> Vec<u8> {
    let mut head = b"GET /k HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".to_vec();
    head.resize(len.max(head.len()), b'p');
    head
}

/// Pipelined GETs on one connection are all answered, in order.
#[test]
fn pipelined_requests_answer_in_order() {
    let redis = Redis::start();
    for i in 0..20 {
        redis.set(format!("p{i}"), format!("value {i}"));
    }
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    let mut batch = String::new();
    for i in 0..20 {
        batch.push_str(&format!("GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n"));
    }
    c.send(batch.as_bytes()).expect("send pipelined batch");
    for i in 0..20 {
        let r = c.read_response(false).expect("a pipelined response");
        assert_eq!(r.status, 200, "{i}: {r:?}");
        assert_eq!(r.body, format!("value {i}").as_bytes(), "{i}");
    }
}
