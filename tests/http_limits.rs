//! System tests of the HTTP request-size bounds and connection handling
//! beyond single requests (README "HTTP API" and "Limits and what is not
//! done"): the request-head limit and pipelined keep-alive requests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{metric, poll_until, sample, Http, Proxy, Redis, Response, DEADLINE};

/// Sends a GET whose head carries one `X-Pad` header of `pad` bytes.
fn get_with_pad(c: &mut Http, path: &str, pad: usize) -> std::io::Result<Response> {
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

/// A 200 KiB unfinished head sent at once after a completed request is cut
/// off (431 or closed): the connection loop counts the unparsed bytes it holds.
#[test]
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

/// `redis_proxy_response_bytes_total{frontend="http"}` as a metrics reply says.
fn http_response_bytes(metrics: &Response) -> u64 {
    sample(
        &metrics.text(),
        "redis_proxy_response_bytes_total{frontend=\"http\"}",
    )
    .expect("the http response-bytes sample")
}

/// The proxy's count of reply bytes equals, to the byte, what a client reads
/// for every kind of reply (the unread-reply bound is a running sum over a
/// connection's life, so any per-reply error would build up until a
/// well-behaved keep-alive client was cut).
#[test]
fn response_bytes_are_counted_exactly() {
    let redis = Redis::start();
    redis.set("k", "v".repeat(100));
    redis.set("mid", vec![b'm'; 70_000]);
    let proxy = Proxy::start(&redis, &[]);
    let exchange = |c: &mut Http, method: &str, target: &str, headers: &[(&str, &str)]| {
        c.request(method, target, headers)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    };
    let mut c = proxy.http();
    let first = exchange(&mut c, "GET", "/-/metrics", &[]);
    assert_eq!(first.status, 200);
    let before = http_response_bytes(&first);
    let mut wire = first.wire;
    type Headers = &'static [(&'static str, &'static str)];
    let json: Headers = &[("Accept", "application/json")];
    let cases: [(&str, &str, Headers, u16); 10] = [
        ("GET", "/k", &[], 200),             // miss
        ("GET", "/k", &[], 200),             // hit
        ("GET", "/k?format=json", &[], 200), // JSON body
        ("GET", "/mid", &[], 200),           // 5-digit length
        ("HEAD", "/k", &[], 200),            // no body
        ("GET", "/nokey", &[], 404),         // error reply
        ("POST", "/k", &[], 405),            // method not allowed
        ("GET", "/a%zzb", &[], 400),         // bad escape
        ("GET", "/-/healthy", &[], 200),     // operations endpoint
        ("GET", "/k", json, 200),
    ];
    for (method, target, headers, want) in cases {
        let r = exchange(&mut c, method, target, headers);
        assert_eq!(r.status, want, "{method} {target}");
        wire += r.wire;
    }
    // Last on this connection: a reply that carries `Connection: close`.
    let r = exchange(&mut c, "GET", "/k", &[("Connection", "close")]);
    assert_eq!(r.status, 200);
    wire += r.wire;
    let rest = c
        .wait_closed(DEADLINE)
        .expect("the proxy closes after that reply");
    assert!(rest.is_empty(), "{rest:?}");
    let last = exchange(&mut proxy.http(), "GET", "/-/metrics", &[]);
    // The first scrape's own reply is counted after it was rendered, the
    // last one's is not yet: between them lie exactly the bytes read above.
    assert_eq!(http_response_bytes(&last) - before, wire as u64);
}

/// A 40 MiB value reaches a fast reader whole, and a reader that takes it
/// in slowly (about 3 s, three idle timeouts, with far more than 16 MiB
/// unread at times) whole too; the connection then still serves.
#[test]
fn large_value_reaches_fast_and_slow_readers_whole() {
    let value: Vec<u8> = (0..40 << 20).map(|i: u32| (i % 251) as u8).collect();
    let redis = Redis::start();
    redis.set("big", &value);
    redis.set("k", "v");
    // The idle clock restarts when the last byte is acknowledged; the
    // client may still be reading its kernel buffer (up to ~6 MB here,
    // ~0.5 s at this pace) when it sends the next request.
    let proxy = Proxy::start(&redis, &[("PROXY_IDLE_TIMEOUT_MS", "1000")]);
    let mut fast = proxy.http();
    let r = fast.get("/big");
    assert_eq!(r.status, 200);
    assert!(
        r.body == value,
        "fast reader: {} of {} bytes",
        r.body.len(),
        value.len()
    );

    // About 12 MB/s: 256 KiB, then a 20 ms pause.
    let mut slow = proxy.http();
    slow.pace(256 * 1024, Duration::from_millis(20));
    let body = slow.get("/big").body;
    assert!(
        body == value,
        "slow reader: {} of {} body bytes",
        body.len(),
        value.len()
    );
    let r = slow.get("/k");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"v"[..]));
}

/// 800 pipelined GETs of a 32 KiB value sent in one write (25 MiB of
/// replies, built before any is written) all arrive at a client that reads
/// them; nothing is cut.
#[test]
fn pipelined_batch_over_16_mib_reaches_a_reading_client() {
    let value = vec![b'p'; 32 * 1024];
    let redis = Redis::start();
    redis.set("v", &value);
    let proxy = Proxy::start(&redis, &[]);
    assert_eq!(proxy.get("/v").body, value, "warm the cache");
    let mut c = proxy.http();
    c.send(&b"GET /v HTTP/1.1\r\nHost: x\r\n\r\n".repeat(800))
        .expect("send the batch");
    for i in 0..800 {
        let r = c.read_response(false).expect("a pipelined reply");
        assert!(
            r.status == 200 && r.body == value,
            "reply {i}: {}, {} bytes",
            r.status,
            r.body.len()
        );
    }
}

/// A client that asks for a 40 MiB value and then reads nothing is closed
/// by the idle timeout (counted from its last acknowledged byte).
#[test]
fn stalled_reader_of_a_large_value_is_closed() {
    let redis = Redis::start();
    redis.set("big", vec![b'b'; 40 << 20]);
    let proxy = Proxy::start(&redis, &[("PROXY_IDLE_TIMEOUT_MS", "300")]);
    let reaped = || metric(&proxy, "redis_proxy_clients_reaped_total");
    let before = reaped();
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    poll_until("the stalled reader to be closed", || {
        (reaped() > before).then_some(())
    });
    // What it can still read ends early: the proxy shut the connection.
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() < 40 << 20, "received all {} bytes", got.len());
}
