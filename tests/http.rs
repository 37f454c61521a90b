//! System tests of the HTTP front end (README "HTTP API", "Cache semantics"
//! and "Configuration"): the real binary against a real `redis-server`, each
//! test with its own of both on free loopback ports.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use base64::Engine;
use common::{pct, poll_until, Http, Proxy, Redis, DEADLINE};
use serde_json::json;

/// A TTL long enough that nothing expires during a test.
const LONG_TTL: &str = "600000";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Asserts a JSON error answer: status, `Content-Type: application/json`
/// and the `error` text.
#[track_caller]
fn assert_json_error(r: &common::Response, status: u16, error: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(r.json()["error"], error, "{r:?}");
}

/// A first GET is a MISS from Redis, the next one a HIT, both with the raw value.
#[test]
fn miss_then_hit() {
    let redis = Redis::start();
    redis.set("greeting", "hello");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();

    let r = c.get("/greeting");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"hello");
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
    assert_eq!(r.content_type(), Some("application/octet-stream"), "{r:?}");

    let r = c.get("/greeting");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"hello");
    assert_eq!(r.x_cache(), Some("HIT"), "{r:?}");
    assert_eq!(r.content_type(), Some("application/octet-stream"), "{r:?}");
}

/// Within the TTL a cached value is served even after Redis changed it.
#[test]
fn cached_value_outlives_a_change_in_redis() {
    let redis = Redis::start();
    redis.set("k", "old");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    let mut c = proxy.http();
    assert_eq!(c.get("/k").body, b"old");

    redis.set("k", "new");
    let r = c.get("/k");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"old"[..]), "{r:?}");
    assert_eq!(r.x_cache(), Some("HIT"), "{r:?}");
}

/// After the TTL (200 ms) the entry is gone and the new Redis value is read.
#[test]
fn cached_value_changes_after_ttl() {
    let redis = Redis::start();
    redis.set("k", "old");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", "200")]);
    let mut c = proxy.http();
    let r = c.get("/k");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"old"[..]), "{r:?}");

    redis.set("k", "new");
    let r = poll_until("the new value after the TTL", || {
        let r = c.get("/k");
        assert_eq!(r.status, 200, "{r:?}");
        (r.body == b"new").then_some(r)
    });
    // The first answer with the new value came from Redis, not the cache.
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
}

/// At CACHE_CAPACITY=3 the least recently *read* key is the one evicted.
#[test]
fn lru_evicts_least_recently_read() {
    let redis = Redis::start();
    for k in ["a", "b", "c", "d"] {
        redis.set(k, format!("{k}-old"));
    }
    let proxy = Proxy::start(
        &redis,
        &[("CACHE_CAPACITY", "3"), ("CACHE_TTL_MS", LONG_TTL)],
    );
    let mut c = proxy.http();
    for (k, cache) in [
        ("a", "MISS"),
        ("b", "MISS"),
        ("c", "MISS"),
        ("a", "HIT"),
        ("d", "MISS"), // full: evicts b, read least recently
    ] {
        let r = c.get(&format!("/{k}"));
        assert_eq!(r.body, format!("{k}-old").as_bytes(), "{k}: {r:?}");
        assert_eq!(r.x_cache(), Some(cache), "{k}: {r:?}");
    }
    for k in ["a", "b", "c", "d"] {
        redis.set(k, format!("{k}-new"));
    }
    // a, c and d are still cached (reading b first would evict c instead).
    for k in ["a", "c", "d"] {
        let r = c.get(&format!("/{k}"));
        assert_eq!(r.body, format!("{k}-old").as_bytes(), "{k}: {r:?}");
        assert_eq!(r.x_cache(), Some("HIT"), "{k}: {r:?}");
    }
    let r = c.get("/b");
    assert_eq!(r.body, b"b-new", "b was evicted, so Redis is read: {r:?}");
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
}

/// A missing key is 404 with exactly `{"error":"key not found","key":...}` as JSON.
#[test]
fn missing_key_is_404_json() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let r = proxy.get("/no-such-key");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "key not found", "key": "no-such-key"})
    );

    // Missing keys are not cached: once created, the key is seen at once.
    redis.set("no-such-key", "here now");
    let r = proxy.get("/no-such-key");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"here now"[..]),
        "{r:?}"
    );
}

/// Values with all 256 byte values and non-UTF-8 keys round-trip exactly.
#[test]
fn binary_keys_and_values_round_trip() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let value: Vec<u8> = (0..=255u8).collect();
    let key: Vec<u8> = vec![0xff, 0x00, 0x80, b'/', b' ', b'%', b'?', b'#', 0xc3, b'k'];
    redis.set(&key, &value);
    redis.set("bin", &value);
    let mut c = proxy.http();

    for (name, path) in [
        ("bin", "/bin".to_string()),
        ("binary key", format!("/{}", pct(&key))),
    ] {
        for cache in ["MISS", "HIT"] {
            let r = c.get(&path);
            assert_eq!(r.status, 200, "{name}: {r:?}");
            assert_eq!(r.body, value, "{name} ({cache})");
            assert_eq!(r.x_cache(), Some(cache), "{name}: {r:?}");
        }
    }

    // A missing non-UTF-8 key comes back base64-encoded in the error.
    let r = c.get("/%FE%FF");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "key not found", "key_base64": b64(&[0xfe, 0xff])})
    );
}

/// `/a%20b%2Fc` and `/a%20b/c` (and lowercase `%2f`) all name the key `a b/c`.
#[test]
fn percent_encoded_space_and_slash() {
    let redis = Redis::start();
    redis.set("a b/c", "spaced");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    for path in ["/a%20b%2Fc", "/a%20b/c", "/a%20b%2fc"] {
        let r = c.get(path);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"spaced"[..]),
            "{path}: {r:?}"
        );
    }
    // The query string is not part of the key.
    let r = c.get("/a%20b/c?x=1");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"spaced"[..]),
        "{r:?}"
    );
}

/// `Accept: application/json` (anywhere in the header) and `?format=json` give
/// `{"key","value"}`; a non-UTF-8 value or key comes as `*_base64`.
#[test]
fn json_form() {
    let redis = Redis::start();
    redis.set("k", "v ü \"quoted\"");
    redis.set("bin", [0xffu8, 0x00, 0x41]);
    redis.set([0xfeu8, b'x'], "text");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    let expected = json!({"key": "k", "value": "v ü \"quoted\""});

    let r = c.get_with("/k", &[("Accept", "application/json")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(r.json(), expected);
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");

    let r = c.get_with(
        "/k",
        &[("Accept", "text/html, Application/JSON;q=0.9, */*;q=0.1")],
    );
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(r.json(), expected);
    assert_eq!(r.x_cache(), Some("HIT"), "{r:?}");

    let r = c.get("/k?format=json");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(r.json(), expected);

    let r = c.get("/bin?format=json");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"key": "bin", "value_base64": b64(&[0xff, 0x00, 0x41])})
    );

    let r = c.get("/%FEx?format=json");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"key_base64": b64(&[0xfe, b'x']), "value": "text"})
    );

    // Without either, the raw value.
    let r = c.get_with("/k", &[("Accept", "text/plain")]);
    assert_eq!(r.content_type(), Some("application/octet-stream"), "{r:?}");
    assert_eq!(r.body, "v ü \"quoted\"".as_bytes());
}

/// HEAD answers 200 with X-Cache and no body (may_minihttp forces
/// `Content-Length: 0`, a documented limitation), and fills the cache.
#[test]
fn head_has_no_body() {
    let redis = Redis::start();
    redis.set("k", "some value");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();

    let r = c.head("/k");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
    assert_eq!(r.content_type(), Some("application/octet-stream"), "{r:?}");
    // No body was sent: the next response on this connection starts cleanly.
    let r = c.get("/k");
    assert_eq!(
        r.status, 200,
        "a HEAD body would have corrupted this: {r:?}"
    );
    assert_eq!(r.body, b"some value");
    assert_eq!(r.x_cache(), Some("HIT"), "HEAD filled the cache: {r:?}");

    let r = c.head("/k");
    assert_eq!((r.status, r.x_cache()), (200, Some("HIT")), "{r:?}");
    let r = c.head("/missing");
    assert_eq!(r.status, 404, "{r:?}");
    let r = c.get("/k");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"some value"[..]),
        "{r:?}"
    );
    assert!(c.leftover().is_empty(), "stray bytes: {:?}", c.leftover());
}

/// Methods other than GET and HEAD are 405 with `Allow: GET, HEAD`.
#[test]
fn other_methods_are_405() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = c
            .request(method, "/k", &[("Content-Length", "0")])
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}: {r:?}");
    }
    // Nothing was written.
    assert_eq!(c.get("/k").body, b"v");
}

/// An empty key, bad percent-encoding and a decoded key over 64 KiB are 400 JSON errors.
#[test]
fn bad_keys_are_400() {
    let redis = Redis::start();
    let at_limit = "k".repeat(64 * 1024);
    redis.set(&at_limit, "longest");
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();

    let over_limit = format!("/{}", "k".repeat(64 * 1024 + 1));
    for path in [
        "/",
        "/?format=json",
        "/a%zz",
        "/a%2",
        "/%",
        "/%%41",
        &over_limit,
    ] {
        let r = c.get(path);
        assert_eq!(r.status, 400, "{}: {r:?}", &path[..path.len().min(20)]);
        assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
        assert!(r.json()["error"].is_string(), "{r:?}");
    }
    // Exactly 64 KiB is still a key.
    let r = c.get(&format!("/{at_limit}"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"longest"[..]),
        "{r:?}"
    );
}

/// Over PROXY_MAX_CLIENTS a connection gets 503, `Retry-After: 1` and
/// `{"error":"max clients reached"}`, then is closed; a freed slot is reused.
#[test]
fn over_client_limit_is_503_then_closed() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(&redis, &[("PROXY_MAX_CLIENTS", "2")]);

    // Startup probes may still be closing: wait until two clients are in.
    let mut first = poll_until("a first client admitted", || admitted(&proxy));
    let mut second = poll_until("a second client admitted", || admitted(&proxy));

    let mut third = proxy.http();
    third.write_request("GET", "/k", &[]).ok();
    let r = third.read_response(false).expect("a 503 response");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    assert_eq!(r.json(), json!({"error": "max clients reached"}));
    assert!(
        third.wait_closed(DEADLINE).is_some(),
        "the refused connection was not closed"
    );

    // The admitted clients are still served.
    assert_eq!(first.get("/k").status, 200);
    assert_eq!(second.get("/k").status, 200);

    drop(first);
    let mut c = poll_until("a new client admitted after one left", || admitted(&proxy));
    assert_eq!(c.get("/k").body, b"v");
    assert_eq!(second.get("/k").status, 200);
}

/// A new connection that completed one 200 request, or `None` if refused.
fn admitted(proxy: &Proxy) -> Option<Http> {
    let mut c = Http::try_connect(proxy.port()).ok()?;
    let r = c.request("GET", "/-/healthy", &[]).ok()?;
    match r.status {
        200 => Some(c),
        503 => None,
        _ => panic!("unexpected answer while probing the client limit: {r:?}"),
    }
}

/// 200 clients in parallel, each on its own connection, all get their own values.
#[test]
fn parallel_clients_get_their_own_values() {
    const CLIENTS: usize = 200;
    let redis = Redis::start();
    let mut mset = redis::cmd("MSET");
    for i in 0..CLIENTS {
        mset.arg(format!("par-{i}")).arg(value_of(i));
    }
    mset.exec(&mut redis.conn()).expect("MSET");
    let proxy = Proxy::start(&redis, &[]);
    let port = proxy.port();

    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut c = Http::connect(port);
                    barrier.wait();
                    let path = format!("/par-{i}");
                    let first = c.get(&path);
                    let second = c.get(&path);
                    (first, second)
                })
                .expect("spawn client thread")
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (first, second) = t.join().expect("client thread");
        for (r, cache) in [(first, "MISS"), (second, "HIT")] {
            assert_eq!(r.status, 200, "client {i}: {r:?}");
            assert_eq!(r.body, value_of(i).as_bytes(), "client {i}");
            assert_eq!(r.x_cache(), Some(cache), "client {i}: {r:?}");
        }
    }
}

fn value_of(i: usize) -> String {
    format!("value-{i}-{}", "x".repeat(i % 50))
}

/// With Redis stopped, cached keys are still 200 and uncached keys are 503
/// `redis unavailable`; after a restart on the same port, uncached keys are
/// served again by the same proxy.
#[test]
fn redis_down_then_back() {
    let mut redis = Redis::start();
    redis.set("cached", "kept");
    redis.set("uncached", "lost");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    let mut c = proxy.http();
    assert_eq!(c.get("/cached").x_cache(), Some("MISS"));

    redis.stop();
    let r = c.get("/cached");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"kept"[..]), "{r:?}");
    assert_eq!(r.x_cache(), Some("HIT"), "{r:?}");
    let r = c.get("/uncached");
    assert_json_error(&r, 503, "redis unavailable");
    // Errors are not cached. Keep Redis down across several failed
    // attempts, so the proxy's reconnect backoff grows before Redis returns.
    for _ in 0..10 {
        let r = c.get("/uncached");
        assert_json_error(&r, 503, "redis unavailable");
        assert_eq!(c.get("/cached").body, b"kept");
        thread::sleep(Duration::from_millis(50));
    }

    redis.restart_same_port();
    redis.set("uncached", "back");
    let r = poll_until("the proxy to reach the restarted redis", || {
        let r = c.get("/uncached");
        match r.status {
            200 => Some(r),
            503 => None,
            _ => panic!("unexpected answer while Redis restarts: {r:?}"),
        }
    });
    assert_eq!(r.body, b"back");
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
    let r = c.get("/cached");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"kept"[..]), "{r:?}");
}

/// `/-/healthy` is 200 while serving; `/-/ready` is 200 with Redis, 503 without.
#[test]
fn healthy_and_ready() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(&redis, &[]);
    let mut c = proxy.http();
    let r = c.get("/-/healthy");
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.get("/-/ready");
    assert_eq!(r.status, 200, "{r:?}");

    redis.stop();
    let r = poll_until("/-/ready to turn 503", || {
        let r = c.get("/-/ready");
        (r.status != 200).then_some(r)
    });
    assert_json_error(&r, 503, "redis unavailable");
    // Down across several failed attempts, so reconnect backoff grows.
    for _ in 0..10 {
        let r = c.get("/-/ready");
        assert_json_error(&r, 503, "redis unavailable");
        let r = c.get("/-/healthy");
        assert_eq!(r.status, 200, "healthy while redis is down: {r:?}");
        thread::sleep(Duration::from_millis(50));
    }

    redis.restart_same_port();
    poll_until("/-/ready to turn 200 again", || {
        (c.get("/-/ready").status == 200).then_some(())
    });
}

/// A proxy whose Redis was never reachable is healthy but not ready.
#[test]
fn not_ready_without_redis() {
    let proxy = Proxy::builder().start();
    let r = proxy.get("/-/ready");
    assert_json_error(&r, 503, "redis unavailable");
    let r = proxy.get("/some-key");
    assert_json_error(&r, 503, "redis unavailable");
    assert_eq!(proxy.get("/-/healthy").status, 200);
}

/// Any other `/-/` path is 404 `{"error":"unknown endpoint"}`, even if such a key exists.
#[test]
fn unknown_operations_endpoint_is_404() {
    let redis = Redis::start();
    redis.set("-/x", "a key that HTTP cannot reach");
    let proxy = Proxy::start(&redis, &[]);
    for path in ["/-/x", "/-/", "/-/healthy/extra", "/-/Ready"] {
        let r = proxy.get(path);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
        assert_eq!(r.json(), json!({"error": "unknown endpoint"}), "{path}");
    }
}

/// A key of another type (a list) is 502 with Redis's WRONGTYPE message, not cached.
#[test]
fn wrongtype_is_502_with_redis_message() {
    let redis = Redis::start();
    redis.rpush("list", "item");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    let mut c = proxy.http();
    let r = c.get("/list");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.starts_with("WRONGTYPE Operation against a key holding the wrong kind of value"),
        "{r:?}"
    );

    redis.del("list");
    redis.set("list", "now a string");
    let r = c.get("/list");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"now a string"[..]),
        "{r:?}"
    );
    assert_eq!(r.x_cache(), Some("MISS"), "{r:?}");
}

/// A bad setting exits with status 2 and one stderr line naming it.
#[test]
fn bad_settings_exit_2_with_one_line() {
    // (environment variable or flag, value, the setting the line must name)
    let cases = [
        ("CACHE_TTL_MS", "0", "CACHE_TTL_MS"),
        ("CACHE_TTL_MS", "soon", "CACHE_TTL_MS"),
        ("--cache-ttl-ms", "0", "CACHE_TTL_MS"),
        ("PROXY_MAX_CLIENTS", "0", "PROXY_MAX_CLIENTS"),
        ("CACHE_CAPACITY", "-1", "CACHE_CAPACITY"),
        ("PROXY_IDLE_TIMEOUT_MS", "0", "PROXY_IDLE_TIMEOUT_MS"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL"),
    ];
    for (name, value, setting) in cases {
        let builder = Proxy::builder();
        let builder = if name.starts_with("--") {
            builder.args(&[name, value])
        } else {
            builder.env(name, value)
        };
        let exit = builder.run_to_exit();
        assert_eq!(exit.status.code(), Some(2), "{name}={value}: {exit:?}");
        let lines = exit.stderr_lines();
        assert_eq!(lines.len(), 1, "{name}={value}: {exit:?}");
        assert!(lines[0].contains(setting), "{name}={value}: {exit:?}");
    }
}

/// Flags win over environment variables, even over a bad one.
#[test]
fn flags_win_over_env() {
    let redis = Redis::start();
    redis.set("k", "old");
    let proxy = Proxy::start_with_args(
        &redis,
        &[("CACHE_TTL_MS", "0"), ("CACHE_CAPACITY", "0")],
        &["--cache-ttl-ms", LONG_TTL, "--cache-capacity", "10"],
    );
    let mut c = proxy.http();
    assert_eq!(c.get("/k").x_cache(), Some("MISS"));
    redis.set("k", "new");
    let r = c.get("/k");
    assert_eq!(
        (r.body.as_slice(), r.x_cache()),
        (&b"old"[..], Some("HIT")),
        "{r:?}"
    );
}

/// An environment variable set to "" counts as unset: the default applies.
#[test]
fn empty_env_counts_as_unset() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(
        &redis,
        &[
            ("CACHE_TTL_MS", ""),
            ("CACHE_CAPACITY", ""),
            ("PROXY_MAX_CLIENTS", ""),
            ("PROXY_IDLE_TIMEOUT_MS", ""),
            ("RESP_PORT", ""),
        ],
    );
    let mut c = proxy.http();
    assert_eq!(c.get("/k").x_cache(), Some("MISS"));
    // Default TTL (60 s) and capacity: the value is cached.
    assert_eq!(c.get("/k").x_cache(), Some("HIT"));
}

/// With REDIS_URL unset (or empty), REDIS_HOST and REDIS_PORT name the backend.
#[test]
fn legacy_redis_host_and_port() {
    let redis = Redis::start();
    redis.set("k", "legacy");
    let port = redis.port().to_string();
    let proxy = Proxy::builder()
        .env("REDIS_URL", "")
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", &port)
        .start();
    let r = proxy.get("/k");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"legacy"[..]),
        "{r:?}"
    );
}

/// An idle keep-alive connection is closed after PROXY_IDLE_TIMEOUT_MS.
#[test]
fn idle_keep_alive_connection_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[("PROXY_IDLE_TIMEOUT_MS", "300")]);
    let mut c = proxy.http();
    assert_eq!(c.get("/-/healthy").status, 200);
    let rest = c.wait_closed(DEADLINE);
    assert_eq!(
        rest.as_deref(),
        Some(&b""[..]),
        "idle connection not closed cleanly"
    );
}

/// A client that sends half a request line and stalls is closed after the idle timeout.
#[test]
fn stalled_partial_request_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(&redis, &[("PROXY_IDLE_TIMEOUT_MS", "300")]);
    let mut c = proxy.http();
    c.send(b"GET /some-k").expect("send half a request line");
    assert!(
        c.wait_closed(DEADLINE).is_some(),
        "stalled connection still open after {DEADLINE:?}"
    );
    // The proxy itself is fine.
    assert_eq!(proxy.get("/-/healthy").status, 200);
}

/// How many threads of process `pid` may run on exactly one CPU (Linux /proc).
fn threads_on_one_cpu(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter(|status| {
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim();
            !list.is_empty() && !list.contains([',', '-'])
        })
        .count()
}

/// Worker threads float across cores by default; PROXY_PIN_WORKERS=1 pins
/// each of them to one core.
#[test]
fn worker_pinning_follows_proxy_pin_workers() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs at least 2 CPUs to tell pinned from not, has {cpus}"
    );
    let redis = Redis::start();
    // Workers pin themselves as they start: poll until both have.
    let pinned = Proxy::start(
        &redis,
        &[("PROXY_WORKERS", "2"), ("PROXY_PIN_WORKERS", "1")],
    );
    poll_until("both workers pinned", || {
        (threads_on_one_cpu(pinned.pid()) == 2).then_some(())
    });
    assert_eq!(pinned.get("/-/healthy").status, 200);
    assert_eq!(
        threads_on_one_cpu(pinned.pid()),
        2,
        "two workers, each on one core"
    );
    // Unpinned: serving, and still no thread on a single core.
    let floating = Proxy::start(&redis, &[("PROXY_WORKERS", "2")]);
    assert_eq!(floating.get("/-/healthy").status, 200);
    assert_eq!(
        threads_on_one_cpu(floating.pid()),
        0,
        "a thread is pinned by default"
    );
}
