//! System tests of the coherent mode and of writes (README "Coherent mode"
//! and "Writes"): the real binary against a real `redis-server`, each test
//! with its own of both on free loopback ports.
//!
//! Every test that relies on an invalidation uses a TTL far longer than the
//! test, so only an invalidation (never expiry) can make a cached value
//! change. The contract's freshness figure (a write elsewhere is visible well
//! under 200 ms later on loopback) is not asserted: waits poll until the
//! change shows, and fail only at the shared deadline.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Instant;

use common::{metric, poll_until, Http, Proxy, Redis, Response, DEADLINE};

/// A TTL long enough that nothing expires during a test.
const LONG_TTL: &str = "600000";

/// Environment of a proxy in coherent mode with a long TTL.
const TRACKING: &[(&str, &str)] = &[
    ("CACHE_INVALIDATION", "tracking"),
    ("CACHE_TTL_MS", LONG_TTL),
];

/// Environment of a proxy that accepts writes (tracking off) with a long TTL.
const WRITES: &[(&str, &str)] = &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_TTL_MS", LONG_TTL)];

// ---------------------------------------------------------------------------
// Helpers local to this file

/// Sends `method target` with `body` (and its Content-Length) on `c`.
fn request_with_body(c: &mut Http, method: &str, target: &str, body: &[u8]) -> Response {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    c.send(&req)
        .and_then(|()| c.read_response(false))
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// `PUT target` with `body` on a new connection.
fn put(proxy: &Proxy, target: &str, body: &[u8]) -> Response {
    request_with_body(&mut proxy.http(), "PUT", target, body)
}

/// `DELETE target` (no body) on a new connection.
fn delete(proxy: &Proxy, target: &str) -> Response {
    proxy
        .http()
        .request("DELETE", target, &[])
        .unwrap_or_else(|e| panic!("DELETE {target}: {e}"))
}

/// Asserts a 200 carrying `value` with the given `X-Cache`.
#[track_caller]
fn assert_value(r: &Response, value: &[u8], x_cache: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, value, "{r:?}");
    assert_eq!(r.x_cache(), Some(x_cache), "{r:?}");
}

/// GETs `target` (which must answer 200 with `value`) until it is a HIT:
/// in coherent mode the cache is only used once the invalidation connection
/// is up, which may come a little after the proxy reports healthy.
fn warm(proxy: &Proxy, target: &str, value: &[u8]) {
    poll_until("the key to be served from the cache", || {
        let r = proxy.get(target);
        assert_eq!((r.status, r.body.as_slice()), (200, value), "{r:?}");
        (r.x_cache() == Some("HIT")).then_some(())
    });
}

/// Asserts the 404 `{"error":"key not found",...}` answer.
#[track_caller]
fn assert_not_found(r: &Response) {
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json()["error"], "key not found", "{r:?}");
}

/// GETs `target` until it answers 200 with `value`; panics at the deadline.
fn poll_value(proxy: &Proxy, target: &str, value: &[u8], what: &str) -> Response {
    poll_until(what, || {
        let r = proxy.get(target);
        (r.status == 200 && r.body == value).then_some(r)
    })
}

/// GETs `target` until it answers 404; panics at the deadline.
fn poll_not_found(proxy: &Proxy, target: &str, what: &str) -> Response {
    poll_until(what, || {
        let r = proxy.get(target);
        (r.status == 404).then_some(r)
    })
}

/// One RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A raw RESP2 client connection (to the proxy's RESP port).
struct Resp {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Resp {
    fn connect(port: u16) -> Resp {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to RESP port {port}: {e}"));
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        Resp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one command as a RESP array and reads its reply.
    fn cmd(&mut self, args: &[&[u8]]) -> Reply {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out).expect("write RESP command");
        self.read()
            .unwrap_or_else(|e| panic!("read reply to {:?}: {e}", String::from_utf8_lossy(args[0])))
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("truncated line {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    fn read(&mut self) -> io::Result<Reply> {
        let line = self.line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        let num = || rest.parse::<i64>().map_err(|_| bad());
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(num()?),
            "$" => match num()? {
                -1 => Reply::Bulk(None),
                n => {
                    let mut buf = vec![0u8; n as usize + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            },
            "*" => {
                let n = num()?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read()?);
                }
                Reply::Array(items)
            }
            _ => return Err(bad()),
        })
    }
}

/// A `Reply::Bulk` holding `v`.
fn bulk(v: &[u8]) -> Reply {
    Reply::Bulk(Some(v.to_vec()))
}

/// `tracking_total_keys` from Redis's `INFO stats` (keys Redis tracks for
/// some client).
fn tracked_keys(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(conn)
        .expect("redis INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("tracking_total_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tracking_total_keys in INFO stats:\n{info}"))
}

// ---------------------------------------------------------------------------
// Coherent mode

/// With tracking, a SET by another Redis client replaces a cached (HIT) value.
#[test]
fn tracking_set_elsewhere_becomes_visible() {
    let redis = Redis::start();
    redis.set("k", "old");
    let proxy = Proxy::start(&redis, TRACKING);
    assert_value(&proxy.get("/k"), b"old", "MISS");
    warm(&proxy, "/k", b"old");

    redis.set("k", "new");
    poll_value(
        &proxy,
        "/k",
        b"new",
        "the value SET in Redis to replace the cached one",
    );
    // Once seen, the new value stays (and is cached again).
    warm(&proxy, "/k", b"new");
}

/// With tracking, a DEL by another Redis client turns a cached key into a 404.
#[test]
fn tracking_del_elsewhere_gives_404() {
    let redis = Redis::start();
    redis.set("gone", "v");
    let proxy = Proxy::start(&redis, TRACKING);
    assert_value(&proxy.get("/gone"), b"v", "MISS");
    warm(&proxy, "/gone", b"v");

    redis.del("gone");
    let r = poll_not_found(&proxy, "/gone", "a key deleted in Redis to read as 404");
    assert_not_found(&r);
    assert_eq!(r.json()["key"], "gone", "{r:?}");
}

/// With tracking, FLUSHALL empties the cache: every cached key reads as 404.
#[test]
fn tracking_flushall_empties_the_cache() {
    let redis = Redis::start();
    let keys = ["a", "b", "c"];
    for k in keys {
        redis.set(k, format!("value-{k}"));
    }
    let proxy = Proxy::start(&redis, TRACKING);
    for k in keys {
        let value = format!("value-{k}");
        assert_value(&proxy.get(&format!("/{k}")), value.as_bytes(), "MISS");
        warm(&proxy, &format!("/{k}"), value.as_bytes());
    }

    redis.cmd(&[b"FLUSHALL"]);
    for k in keys {
        poll_not_found(
            &proxy,
            &format!("/{k}"),
            "a key flushed in Redis to read as 404",
        );
    }
    // A key written after the flush is read fresh.
    redis.set("a", "after");
    assert_value(&proxy.get("/a"), b"after", "MISS");
}

/// With tracking, invalidations show in `/-/metrics` (messages and keys).
#[test]
fn tracking_metrics_count_invalidations() {
    let redis = Redis::start();
    redis.set("m", "1");
    let proxy = Proxy::start(&redis, TRACKING);
    assert_value(&proxy.get("/m"), b"1", "MISS");
    warm(&proxy, "/m", b"1");
    let messages = metric(&proxy, "redis_proxy_invalidations_total");
    let keys = metric(&proxy, "redis_proxy_invalidated_keys_total");

    redis.set("m", "2");
    poll_until("redis_proxy_invalidations_total to increase", || {
        (metric(&proxy, "redis_proxy_invalidations_total") > messages).then_some(())
    });
    poll_until("redis_proxy_invalidated_keys_total to increase", || {
        (metric(&proxy, "redis_proxy_invalidated_keys_total") > keys).then_some(())
    });
    poll_value(
        &proxy,
        "/m",
        b"2",
        "the invalidated key to read its new value",
    );
}

/// Killing the invalidation connection (CLIENT KILL TYPE pubsub) empties the
/// cache, reconnects, and invalidations work again afterwards.
#[test]
fn tracking_survives_a_killed_invalidation_connection() {
    let redis = Redis::start();
    redis.set("k", "v1");
    let proxy = Proxy::start(&redis, TRACKING);
    assert_value(&proxy.get("/k"), b"v1", "MISS");
    warm(&proxy, "/k", b"v1");
    let flushes = metric(&proxy, "redis_proxy_cache_flushes_total");
    let reconnects = metric(&proxy, "redis_proxy_tracking_reconnects_total");

    let killed = redis.cmd(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]);
    assert!(
        matches!(killed, redis::Value::Int(n) if n >= 1),
        "CLIENT KILL TYPE pubsub killed no client (is the proxy subscribed?): {killed:?}"
    );

    poll_until("redis_proxy_cache_flushes_total to increase", || {
        (metric(&proxy, "redis_proxy_cache_flushes_total") > flushes).then_some(())
    });
    poll_until("redis_proxy_tracking_reconnects_total to increase", || {
        (metric(&proxy, "redis_proxy_tracking_reconnects_total") > reconnects).then_some(())
    });
    // The flush emptied the cache: the next read cannot be a hit.
    assert_value(&proxy.get("/k"), b"v1", "MISS");

    // Tracking restored: the key gets cached again...
    warm(&proxy, "/k", b"v1");
    // ...and a change elsewhere invalidates it again.
    redis.set("k", "v2");
    poll_value(
        &proxy,
        "/k",
        b"v2",
        "a SET in Redis to be seen after tracking was restored",
    );
}

/// Two tracking proxies on one Redis: a PUT through the first replaces the
/// value the second had cached.
#[test]
fn tracking_put_through_one_proxy_is_seen_by_another() {
    let redis = Redis::start();
    redis.set("shared", "old");
    let env = [
        ("CACHE_INVALIDATION", "tracking"),
        ("CACHE_TTL_MS", LONG_TTL),
        ("PROXY_ALLOW_WRITES", "1"),
    ];
    let first = Proxy::start(&redis, &env);
    let second = Proxy::start(&redis, &env);
    assert_value(&first.get("/shared"), b"old", "MISS");
    warm(&first, "/shared", b"old");
    assert_value(&second.get("/shared"), b"old", "MISS");
    warm(&second, "/shared", b"old");

    let r = put(&first, "/shared", b"new");
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");

    // The writer dropped its own entry: it reads the new value from Redis.
    assert_value(&first.get("/shared"), b"new", "MISS");
    poll_value(
        &second,
        "/shared",
        b"new",
        "a PUT through another proxy to be seen by the second",
    );
}

/// A SET that lands while a GET of the same key is in flight never leaves
/// the old (large) value cached; repeated to make the race likely.
#[test]
fn tracking_write_during_an_in_flight_get_is_not_lost() {
    const ROUNDS: usize = 5;
    const LATER_READS: usize = 20;
    let redis = Redis::start();
    let big = vec![b'A'; 8 << 20];
    let small = b"B".to_vec();
    let proxy = Proxy::start(
        &redis,
        &[
            ("CACHE_INVALIDATION", "tracking"),
            ("CACHE_TTL_MS", LONG_TTL),
            // An 8 MiB reply must not hit the round-trip bound on a busy machine.
            ("REDIS_TIMEOUT_MS", "10000"),
        ],
    );
    // Caching (hence the race) starts once the invalidation connection is up.
    redis.set("warmup", "w");
    warm(&proxy, "/warmup", b"w");
    let port = proxy.port();
    let mut info = redis.conn();
    let mut writer = redis.conn();
    let mut overlapped = 0;
    for round in 0..ROUNDS {
        let key = format!("race{round}");
        let target = format!("/{key}");
        redis.set(&key, &big);
        let before = tracked_keys(&mut info);

        let reader = {
            let target = target.clone();
            thread::spawn(move || Http::connect(port).get(&target))
        };
        // Redis tracks the key once it has run the proxy's GET; SET right
        // then, while the 8 MiB reply is still on its way to the proxy.
        // (If the GET finishes first, this round just tests the late case.)
        let end = Instant::now() + DEADLINE;
        while tracked_keys(&mut info) <= before && !reader.is_finished() && Instant::now() < end {}
        redis::cmd("SET")
            .arg(&key)
            .arg(&small)
            .exec(&mut writer)
            .expect("redis SET");
        let in_flight = !reader.is_finished();

        let first = reader.join().expect("reader thread");
        assert_eq!(first.status, 200, "round {round}: {first:?}");
        assert!(
            first.body == big || first.body == small,
            "round {round}: the in-flight GET returned neither value: {first:?}"
        );
        if in_flight && first.body == big {
            overlapped += 1;
        }

        poll_until(
            "the value SET during the in-flight GET to be served",
            || {
                let r = proxy.get(&target);
                assert_eq!(r.status, 200, "round {round}: {r:?}");
                assert!(
                    r.body == big || r.body == small,
                    "round {round}: neither value: {r:?}"
                );
                (r.body == small).then_some(())
            },
        );
        for i in 0..LATER_READS {
            let r = proxy.get(&target);
            assert_eq!(r.status, 200, "round {round}, read {i}: {r:?}");
            assert!(
                r.body == small,
                "round {round}, read {i}: the old value came back after the new one \
                 (stale cache entry): {r:?}"
            );
        }
    }
    // Not asserted (it depends on scheduling): how often the SET really
    // landed while the GET was in flight.
    eprintln!("in-flight race hit in {overlapped} of {ROUNDS} rounds");
}

/// Without tracking (the default), a change in Redis is not seen within the
/// TTL: the cached value keeps being served.
#[test]
fn without_tracking_a_change_in_redis_stays_stale() {
    let redis = Redis::start();
    redis.set("k", "old");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    assert_value(&proxy.get("/k"), b"old", "MISS");

    redis.set("k", "new");
    for _ in 0..20 {
        assert_value(&proxy.get("/k"), b"old", "HIT");
    }
    let text = proxy.get("/-/metrics").text();
    assert!(
        !text.contains("redis_proxy_invalidations_total"),
        "tracking counters shown with tracking off:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// Writes

/// With writes on, PUT stores the body in Redis and the next GET reads it
/// as a MISS (the entry was dropped, not replaced), then HIT.
#[test]
fn put_writes_through_and_drops_the_entry() {
    let redis = Redis::start();
    redis.set("w", "old");
    let proxy = Proxy::start(&redis, WRITES);
    assert_value(&proxy.get("/w"), b"old", "MISS");
    assert_value(&proxy.get("/w"), b"old", "HIT");

    let value: &[u8] = b"new\x00\xff\r\n\r\nend";
    let r = put(&proxy, "/w", value);
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");
    assert_eq!(
        redis.cmd(&[b"GET", b"w"]),
        redis::Value::BulkString(value.to_vec()),
        "PUT did not reach Redis"
    );

    assert_value(&proxy.get("/w"), value, "MISS");
    assert_value(&proxy.get("/w"), value, "HIT");

    // A PUT creates a key that did not exist, too.
    let r = put(&proxy, "/fresh", b"1");
    assert_eq!(r.status, 204, "{r:?}");
    assert_value(&proxy.get("/fresh"), b"1", "MISS");
}

/// With writes on, DELETE of a cached key is 204 and then GET is 404; DELETE
/// of an absent key is 404.
#[test]
fn delete_removes_the_key_and_404s_when_absent() {
    let redis = Redis::start();
    redis.set("d", "v");
    let proxy = Proxy::start(&redis, WRITES);
    assert_value(&proxy.get("/d"), b"v", "MISS");
    assert_value(&proxy.get("/d"), b"v", "HIT");

    let r = delete(&proxy, "/d");
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");
    assert_eq!(redis.cmd(&[b"EXISTS", b"d"]), redis::Value::Int(0));
    assert_not_found(&proxy.get("/d"));

    let r = delete(&proxy, "/d");
    assert_not_found(&r);
    assert_not_found(&delete(&proxy, "/never-existed"));
}

/// With writes off (the default), PUT and DELETE are 405 with
/// `Allow: GET, HEAD` and change nothing.
#[test]
fn writes_off_put_and_delete_are_405() {
    let redis = Redis::start();
    redis.set("ro", "v");
    let proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    assert_value(&proxy.get("/ro"), b"v", "MISS");

    let r = put(&proxy, "/ro", b"changed");
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{r:?}");
    let r = delete(&proxy, "/ro");
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{r:?}");

    assert_eq!(
        redis.cmd(&[b"GET", b"ro"]),
        redis::Value::BulkString(b"v".to_vec())
    );
    assert_value(&proxy.get("/ro"), b"v", "HIT");
}

/// Over RESP with writes on, SET then GET reads the new value and DEL
/// returns the number of keys removed.
#[test]
fn resp_set_and_del_write_through() {
    let redis = Redis::start();
    redis.set("k", "old");
    redis.set("other", "x");
    let proxy = Proxy::builder().redis(&redis).resp().envs(WRITES).start();
    let mut c = Resp::connect(proxy.resp_port().expect("RESP port"));
    assert_eq!(c.cmd(&[b"GET", b"k"]), bulk(b"old"));
    assert_eq!(c.cmd(&[b"GET", b"k"]), bulk(b"old"));

    assert_eq!(c.cmd(&[b"SET", b"k", b"v"]), Reply::Simple("OK".into()));
    assert_eq!(c.cmd(&[b"GET", b"k"]), bulk(b"v"));
    assert_eq!(
        redis.cmd(&[b"GET", b"k"]),
        redis::Value::BulkString(b"v".to_vec())
    );

    assert_eq!(c.cmd(&[b"DEL", b"k", b"other", b"absent"]), Reply::Int(2));
    assert_eq!(c.cmd(&[b"GET", b"k"]), Reply::Bulk(None));
    assert_eq!(c.cmd(&[b"DEL", b"k"]), Reply::Int(0));
    // The HTTP side sees the deletion as well.
    assert_not_found(&proxy.get("/other"));
}

/// Over RESP with writes off, SET and DEL get the writes-disabled error
/// (DESIGN.md "Writes"), whatever their spelling, and reach no Redis.
#[test]
fn resp_writes_off_set_is_unknown() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::builder().redis(&redis).resp().start();
    let mut c = Resp::connect(proxy.resp_port().expect("RESP port"));
    let disabled = || {
        Reply::Error(
            "ERR write commands are disabled on this proxy (set PROXY_ALLOW_WRITES)".into(),
        )
    };
    assert_eq!(c.cmd(&[b"SET", b"k", b"x"]), disabled());
    assert_eq!(c.cmd(&[b"set", b"k", b"x"]), disabled());
    assert_eq!(c.cmd(&[b"DEL", b"k"]), disabled());
    // Nothing was written; the connection still works.
    assert_eq!(c.cmd(&[b"GET", b"k"]), bulk(b"v"));
    assert_eq!(
        redis.cmd(&[b"GET", b"k"]),
        redis::Value::BulkString(b"v".to_vec())
    );
}
