//! System tests of Sentinel (README "Sentinel"): the real binary finding
//! its master through a real Sentinel (tests/common/sentinel.rs) in front of
//! a real master and replica, all on free loopback ports.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::sentinel::{is_master, OwnDir, Sentinel, MASTER};
use common::{free_port, metric, poll_for, poll_until, Proxy, Redis};

/// A proxy that finds its master through `sentinels` (host and port in
/// REDIS_URL are unused; credentials and db come from it).
fn proxy(sentinels: &[u16], env: &[(&str, &str)]) -> Proxy {
    let list: Vec<String> = sentinels.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    Proxy::builder()
        .redis_url("redis://127.0.0.1:1/0")
        .env("REDIS_SENTINELS", &list.join(","))
        .env("REDIS_SENTINEL_MASTER", MASTER)
        .envs(env)
        .start()
}

/// One request's outcome, timed.
struct Sample {
    start: Instant,
    end: Instant,
    status: u16,
}

/// Reads `/<key>` in a loop on its own keep-alive connections until `stop`.
fn load(proxy: &Proxy, key: &str, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<Sample>> {
    let port = proxy.port();
    let target = format!("/{key}");
    thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let start = Instant::now();
            let status = common::Http::try_connect(port)
                .and_then(|mut c| c.request("GET", &target, &[]))
                .map_or(0, |r| r.status);
            samples.push(Sample {
                start,
                end: Instant::now(),
                status,
            });
            thread::sleep(Duration::from_millis(10));
        }
        samples
    })
}

/// The master is killed under read load: cached keys answer 200 throughout;
/// uncached keys fail until the replica is promoted and are served again
/// within 2 s of the promotion, without a restart; the failover counts.
/// The first Sentinel listed is down the whole time.
#[test]
fn failover_under_read_load() {
    let mut master = OwnDir::start(&[]);
    let replica = OwnDir::replica_of(&master);
    master.set("cached", "c");
    master.set("big", "v".repeat(100));
    poll_until("the replica to sync", || {
        matches!(replica.cmd(&[b"GET", b"big"]), redis::Value::BulkString(_)).then_some(())
    });
    let sentinel = Sentinel::start(master.port());
    sentinel.wait_for_replica(&replica);
    // Values over 16 bytes are never cached: /big always reads the master.
    let proxy = proxy(
        &[free_port(), sentinel.port()],
        &[
            ("CACHE_TTL_MS", "600000"),
            ("CACHE_MAX_VALUE_BYTES", "16"),
            ("REDIS_TIMEOUT_MS", "500"),
        ],
    );
    poll_until("/big to be served through Sentinel", || {
        (proxy.get("/big").status == 200).then_some(())
    });
    assert_eq!(proxy.get("/cached").status, 200);
    assert_eq!(proxy.get("/cached").x_cache(), Some("HIT"));

    let stop = Arc::new(AtomicBool::new(false));
    let cached = load(&proxy, "cached", stop.clone());
    let uncached = load(&proxy, "big", stop.clone());
    thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    master.stop();
    let promoted = poll_for(
        Duration::from_secs(30),
        "the replica's promotion",
        &mut || is_master(replica.port()).then(Instant::now),
    );
    let served = Arc::new(Mutex::new(None));
    poll_for(
        Duration::from_secs(10),
        "/big to be served by the new master",
        &mut || {
            let r = proxy.get("/big");
            if r.status == 200 {
                *served.lock().unwrap() = Some(Instant::now());
                return Some(());
            }
            None
        },
    );
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let cached = cached.join().unwrap();
    let uncached = uncached.join().unwrap();

    let failed: Vec<u16> = cached
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| s.status)
        .collect();
    assert!(failed.is_empty(), "cached key failed: {failed:?}");
    assert!(cached.iter().any(|s| s.start > killed && s.end < promoted));
    // Uncached reads: the first failure after the kill, then the first
    // success after it (from the load loop, the finer measure).
    let down = uncached
        .iter()
        .find(|s| s.start >= killed && s.status != 200)
        .expect("an uncached read failed while the master was down");
    let back = uncached
        .iter()
        .find(|s| s.start >= down.end && s.status == 200)
        .map_or_else(|| served.lock().unwrap().unwrap(), |s| s.end);
    let recovery = back.saturating_duration_since(promoted);
    println!(
        "sentinel failover: master killed -> replica promoted {:?}; promoted -> uncached \
         keys served {:?} (kill -> served {:?})",
        promoted - killed,
        recovery,
        back - killed
    );
    assert!(
        recovery < Duration::from_secs(2),
        "served again {recovery:?} after the promotion\nproxy:\n{}\nsentinel:\n{}",
        proxy.logs(),
        sentinel.logs()
    );
    poll_until("redis_failovers_total to count the move", || {
        (metric(&proxy, "redis_proxy_redis_failovers_total") == 1).then_some(())
    });
}

/// Two of three Sentinels are down at start: the proxy asks each in turn
/// and finds the master through the third.
#[test]
fn sentinels_partly_down_at_start() {
    let master = OwnDir::start(&[]);
    master.set("k", "v");
    let sentinel = Sentinel::start(master.port());
    let proxy = proxy(&[free_port(), free_port(), sentinel.port()], &[]);
    poll_until("/k to be served through the third Sentinel", || {
        let r = proxy.get("/k");
        (r.status == 200 && r.body == b"v").then_some(())
    });
    assert_eq!(proxy.get("/-/ready").status, 200);
    assert_eq!(metric(&proxy, "redis_proxy_redis_failovers_total"), 0);
}

/// No Sentinel answers: 503 `redis unavailable` and not ready, until one
/// starts; then the master is found without a restart.
#[test]
fn no_sentinel_up_then_one_starts() {
    let master = OwnDir::start(&[]);
    master.set("k", "v");
    // Start a Sentinel to learn a port, stop it, and give that port.
    let sentinel = Sentinel::start(master.port());
    let port = sentinel.port();
    drop(sentinel);
    let proxy = proxy(&[port], &[]);
    let r = proxy.get("/k");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"], "redis unavailable");
    assert_eq!(proxy.get("/-/ready").status, 503);
    let _sentinel = Sentinel::start_on(port, master.port());
    poll_until("/k once a Sentinel is up", || {
        (proxy.get("/k").status == 200).then_some(())
    });
}

/// With tracking, a failover empties the cache (the new master tracks
/// nothing for the proxy yet) and the invalidation connection follows the
/// master: a write on the new master reaches the cache.
#[test]
fn failover_with_tracking_empties_the_cache_and_tracks_the_new_master() {
    let mut master = OwnDir::start(&[]);
    let replica = OwnDir::replica_of(&master);
    master.set("k", "v1");
    poll_until("the replica to sync", || {
        matches!(replica.cmd(&[b"GET", b"k"]), redis::Value::BulkString(_)).then_some(())
    });
    let sentinel = Sentinel::start(master.port());
    sentinel.wait_for_replica(&replica);
    let proxy = proxy(
        &[sentinel.port()],
        &[
            ("CACHE_INVALIDATION", "tracking"),
            ("CACHE_TTL_MS", "600000"),
        ],
    );
    poll_until("k to be cached", || {
        let r = proxy.get("/k");
        (r.status == 200 && r.x_cache() == Some("HIT")).then_some(())
    });
    master.stop();
    poll_for(
        Duration::from_secs(30),
        "the replica's promotion",
        &mut || is_master(replica.port()).then_some(()),
    );
    poll_until("k served again after the failover", || {
        (proxy.get("/k").status == 200).then_some(())
    });
    assert!(metric(&proxy, "redis_proxy_cache_flushes_total") >= 1);
    poll_until("k to be cached again", || {
        let r = proxy.get("/k");
        (r.status == 200 && r.x_cache() == Some("HIT")).then_some(())
    });
    replica.set("k", "v2");
    poll_until("the write on the new master to reach the cache", || {
        (proxy.get("/k").body == b"v2").then_some(())
    });
}

/// How many GETs the server has run (`INFO commandstats`).
fn gets_run(redis: &Redis) -> u64 {
    let text = match redis.cmd(&[b"INFO", b"commandstats"]) {
        redis::Value::BulkString(text) => String::from_utf8_lossy(&text).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO commandstats: {other:?}"),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A manual failover (`SENTINEL FAILOVER`) demotes a master that stays up
/// and keeps serving reads as a replica: the proxy still moves every read
/// to the new master (a connection opened to the old one is dropped before
/// its next request).
#[test]
fn manual_failover_moves_off_the_demoted_master() {
    let master = OwnDir::start(&[]);
    let replica = OwnDir::replica_of(&master);
    master.set("k", "v");
    poll_until("the replica to sync", || {
        matches!(replica.cmd(&[b"GET", b"k"]), redis::Value::BulkString(_)).then_some(())
    });
    let sentinel = Sentinel::start(master.port());
    sentinel.wait_for_replica(&replica);
    let proxy = proxy(&[sentinel.port()], &[("CACHE_CAPACITY", "0")]);
    poll_until("k served", || (proxy.get("/k").status == 200).then_some(()));
    // Reads of the proxy land on `on` and not on `off`.
    let reads_land_on = |on: &Redis, off: &Redis| {
        let (on0, off0) = (gets_run(on), gets_run(off));
        let served = (0..8).filter(|_| proxy.get("/k").status == 200).count() as u64;
        served == 8 && gets_run(on) - on0 >= 8 && gets_run(off) == off0
    };
    assert!(
        reads_land_on(&master, &replica),
        "the proxy reads the master"
    );

    let reply = sentinel.cmd("*3\r\n$8\r\nSENTINEL\r\n$8\r\nFAILOVER\r\n$8\r\nmymaster\r\n");
    assert!(reply.starts_with("+OK"), "SENTINEL FAILOVER: {reply}");
    poll_for(
        Duration::from_secs(30),
        "the replica's promotion",
        &mut || is_master(replica.port()).then_some(()),
    );
    poll_until("every read to land on the new master", || {
        reads_land_on(&replica, &master).then_some(())
    });
    poll_until("redis_failovers_total to count the move", || {
        (metric(&proxy, "redis_proxy_redis_failovers_total") == 1).then_some(())
    });
}

/// `rediss://` with Sentinel: the Sentinel and the master both speak TLS
/// only to the proxy (their TLS ports), verified against the CA file.
#[test]
fn sentinel_and_master_over_tls() {
    let certs = common::tls::Certs::new("sentinel");
    let server = common::tls::TlsRedis::start_signed_by(&certs, false);
    server.redis.set("k", "over tls");
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.ca_file(),
    );
    let tls_port = free_port();
    let conf = format!(
        "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
         tls-auth-clients no\ntls-replication yes",
        cert.display(),
        key.display(),
        ca.display()
    );
    let _sentinel = Sentinel::start_with(free_port(), server.tls_port, &conf);
    let proxy = Proxy::builder()
        .redis_url("rediss://127.0.0.1:1/0")
        .env("REDIS_SENTINELS", &format!("127.0.0.1:{tls_port}"))
        .env("REDIS_SENTINEL_MASTER", MASTER)
        .env("REDIS_TLS_CA_FILE", ca.to_str().unwrap())
        .start();
    poll_until("k served through Sentinel over TLS", || {
        let r = proxy.get("/k");
        (r.status == 200 && r.body == b"over tls").then_some(())
    });
    assert_eq!(proxy.get("/-/ready").status, 200);
}

/// REDIS_SENTINEL_PASSWORD authenticates to Sentinels with `requirepass`;
/// without it they refuse, and the log says why.
#[test]
fn sentinel_password() {
    let master = OwnDir::start(&[]);
    master.set("k", "v");
    let sentinel = Sentinel::start_with(free_port(), master.port(), "requirepass s3cret");
    let with = proxy(&[sentinel.port()], &[("REDIS_SENTINEL_PASSWORD", "s3cret")]);
    poll_until("k served through a Sentinel with a password", || {
        (with.get("/k").status == 200).then_some(())
    });
    let without = proxy(&[sentinel.port()], &[]);
    assert_eq!(without.get("/k").status, 503);
    poll_until("a log line with Sentinel's refusal", || {
        without.logs().contains("NOAUTH").then_some(())
    });
    assert!(!with.logs().contains("s3cret") && !without.logs().contains("s3cret"));
}
