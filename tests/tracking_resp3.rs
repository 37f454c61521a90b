//! System tests of the coherent mode over RESP3 pushes
//! (`CACHE_INVALIDATION=tracking-resp3`, README "Coherent mode"): the real
//! binary against a real `redis-server`, each test with its own of both on
//! free loopback ports. The fallback of `tracking` to pushes when a server
//! refuses REDIRECT cannot be provoked on a stock redis-server; it is
//! tested against a fake in `backend::node` (unit tests).
//!
//! Every test uses a TTL far longer than the test, so only an invalidation
//! (never expiry) can make a cached value change.

mod common;

use std::time::Duration;

use common::{metric, poll_for, poll_until, Proxy, Redis};

/// Environment of a proxy in coherent mode over RESP3 with a long TTL.
const RESP3: &[(&str, &str)] = &[
    ("CACHE_INVALIDATION", "tracking-resp3"),
    ("CACHE_TTL_MS", "600000"),
];

/// GETs `target` (which must answer 200 with `value`) until it is a HIT.
fn warm(proxy: &Proxy, target: &str, value: &[u8]) {
    poll_until("the key to be served from the cache", || {
        let r = proxy.get(target);
        assert_eq!((r.status, r.body.as_slice()), (200, value), "{r:?}");
        (r.x_cache() == Some("HIT")).then_some(())
    });
}

/// GETs `target` until it answers 200 with `value`; panics at the deadline.
fn poll_value(proxy: &Proxy, target: &str, value: &[u8], what: &str) {
    poll_until(what, || {
        let r = proxy.get(target);
        (r.status == 200 && r.body == value).then_some(())
    });
}

/// A SET by another client replaces the cached value, and the push is
/// counted in `invalidations_total` / `invalidated_keys_total`.
#[test]
fn resp3_set_elsewhere_becomes_visible_and_is_counted() {
    let redis = Redis::start();
    redis.set("k", "v1");
    let proxy = Proxy::start(&redis, RESP3);
    warm(&proxy, "/k", b"v1");
    let messages = metric(&proxy, "redis_proxy_invalidations_total");
    let keys = metric(&proxy, "redis_proxy_invalidated_keys_total");

    redis.set("k", "v2");
    poll_value(&proxy, "/k", b"v2", "a SET in Redis to be seen");
    assert!(metric(&proxy, "redis_proxy_invalidations_total") > messages);
    assert!(metric(&proxy, "redis_proxy_invalidated_keys_total") > keys);
    assert!(
        !proxy.logs().contains("invalidation connection up"),
        "no invalidation connection in push mode:\n{}",
        proxy.logs()
    );
}

/// The documented bound on an idle link: a write elsewhere is seen by the
/// cache within a few ms, well inside this test's 1 s deadline, with no
/// request in between to make the proxy read its link.
#[test]
fn resp3_idle_link_sees_a_write_quickly() {
    let redis = Redis::start();
    redis.set("i", "old");
    let proxy = Proxy::start(&redis, RESP3);
    warm(&proxy, "/i", b"old");
    for round in 0..5 {
        let value = format!("new-{round}");
        redis.set("i", &value);
        poll_for(
            Duration::from_secs(1),
            "an idle link to apply the push",
            &mut || {
                let r = proxy.get("/i");
                (r.body == value.as_bytes()).then_some(())
            },
        );
        warm(&proxy, "/i", value.as_bytes());
    }
}

/// FLUSHALL (a push with a null key list) empties the cache.
#[test]
fn resp3_flushall_empties_the_cache() {
    let redis = Redis::start();
    for k in ["a", "b"] {
        redis.set(k, k);
    }
    let proxy = Proxy::start(&redis, RESP3);
    warm(&proxy, "/a", b"a");
    warm(&proxy, "/b", b"b");
    let flushes = metric(&proxy, "redis_proxy_cache_flushes_total");
    redis.cmd(&[b"FLUSHALL"]);
    for k in ["/a", "/b"] {
        poll_until("a flushed key to read as 404", || {
            (proxy.get(k).status == 404).then_some(())
        });
    }
    assert!(metric(&proxy, "redis_proxy_cache_flushes_total") > flushes);
}

/// A data connection killed by Redis empties the cache: Redis forgot what
/// it tracked, so a change made after the kill (which sends no push) is
/// seen, and tracking works again on the reopened link.
#[test]
fn resp3_lost_data_link_empties_the_cache() {
    let redis = Redis::start();
    redis.set("d", "v1");
    let proxy = Proxy::start(&redis, RESP3);
    warm(&proxy, "/d", b"v1");
    let killed = redis.cmd(&[b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"yes"]);
    assert!(
        matches!(killed, redis::Value::Int(n) if n >= 1),
        "CLIENT KILL killed no client: {killed:?}"
    );
    redis.set("d", "v2");
    poll_value(&proxy, "/d", b"v2", "a change after the kill to be seen");
    warm(&proxy, "/d", b"v2");
    redis.set("d", "v3");
    poll_value(&proxy, "/d", b"v3", "a SET after the reconnect to be seen");
}
