//! System tests in front of a Redis Cluster (README "Redis Cluster"): the
//! real binary against a local cluster of real `redis-server` processes
//! (`tests/common/cluster.rs`), each test with its own cluster on free
//! loopback ports.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{metric, pct, poll_until, Http, Proxy, DEADLINE};
use redis_proxy::backend::slot::slot;

/// A TTL long enough that nothing expires during a test.
const LONG_TTL: &str = "600000";

/// Every read goes to Redis, with a timeout a busy 2-core machine cannot
/// reach: the migration tests count redirection errors, and a node stalled
/// for a second by the machine (seen once in a full-suite run: 94 reads
/// answered 504 after exactly 1 s) is not one.
const UNCACHED_PATIENT: &[(&str, &str)] = &[("CACHE_CAPACITY", "0"), ("REDIS_TIMEOUT_MS", "5000")];

/// A proxy in front of `cluster` with the RESP port open.
fn start_proxy(cluster: &Cluster, env: &[(&str, &str)]) -> (Proxy, u16) {
    proxy_at(&cluster.urls(), env)
}

fn proxy_at(urls: &str, env: &[(&str, &str)]) -> (Proxy, u16) {
    let proxy = Proxy::builder()
        .redis_url(urls)
        .resp()
        .env("CACHE_TTL_MS", LONG_TTL)
        .envs(env)
        .start();
    let port = proxy.resp_port().expect("RESP port");
    (proxy, port)
}

fn resp(port: u16) -> redis::Connection {
    let con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection())
        .expect("connect to the proxy's RESP port");
    con.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    con
}

/// xorshift64, for reproducible random keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        (0..len)
            .map(|_| {
                // Braces often, so hash tags are exercised.
                match self.next() % 8 {
                    0 => b'{',
                    1 => b'}',
                    _ => self.next() as u8,
                }
            })
            .collect()
    }
}

/// Keys `prefix:i` until there are `per_master` on each master.
fn keys_on_every_master(cluster: &Cluster, prefix: &str, per_master: usize) -> Vec<(u16, String)> {
    let masters = cluster.masters();
    let mut out = Vec::new();
    let mut counts = vec![0; masters.len()];
    let mut i = 0;
    while counts.iter().any(|&c| c < per_master) {
        let key = format!("{prefix}:{i}");
        i += 1;
        let port = cluster.master_of(slot(key.as_bytes()));
        let at = masters.iter().position(|&p| p == port).unwrap();
        if counts[at] < per_master {
            counts[at] += 1;
            out.push((port, key));
        }
    }
    out
}

/// The slot function agrees with Redis's own `CLUSTER KEYSLOT` on 10,000
/// random binary keys (many with braces); keys on every master read through
/// HTTP and RESP; MGET across every master answers in the client's order;
/// a proxy given a dead seed first starts from the live one.
#[test]
fn routes_keys_to_every_master() {
    let cluster = Cluster::start(3, 0);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let keys: Vec<Vec<u8>> = (0..10_000).map(|_| rng.bytes(24)).collect();
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
    }
    let slots: Vec<u16> = pipe.query(&mut cluster.any().conn()).expect("KEYSLOT");
    for (key, want) in keys.iter().zip(slots) {
        assert_eq!(slot(key), want, "slot of {key:?}");
    }

    let keys = keys_on_every_master(&cluster, "route", 5);
    for (_, key) in &keys {
        cluster.set(key, format!("v-{key}"));
    }
    // A dead seed first: the proxy starts from the live one.
    let dead = format!("redis://127.0.0.1:{}/0", common::free_port());
    let (proxy, port) = proxy_at(&format!("{dead},{}", cluster.any().url()), &[]);
    let mut http = Http::connect(proxy.port());
    let mut con = resp(port);
    for (_, key) in &keys {
        let r = http.get(&format!("/{}", pct(key)));
        assert_eq!(r.status, 200, "{key}: {r:?}");
        assert_eq!(r.text(), format!("v-{key}"));
        let v: Option<String> = redis::cmd("GET").arg(key).query(&mut con).unwrap();
        assert_eq!(v.as_deref(), Some(format!("v-{key}").as_str()));
    }
    assert_eq!(http.get("/route:missing-key").status, 404);

    // MGET over every master, with a missing key, partly cached.
    let (proxy2, port2) = start_proxy(&cluster, &[]);
    let mut con2 = resp(port2);
    let _: Option<String> = redis::cmd("GET").arg(&keys[0].1).query(&mut con2).unwrap();
    let mut names: Vec<&str> = keys.iter().rev().map(|(_, k)| k.as_str()).collect();
    names.insert(3, "route:absent");
    let got: Vec<Option<String>> = redis::cmd("MGET").arg(&names).query(&mut con2).unwrap();
    let want: Vec<Option<String>> = names
        .iter()
        .map(|k| (*k != "route:absent").then(|| format!("v-{k}")))
        .collect();
    assert_eq!(got, want);
    let ready = Http::connect(proxy2.port()).get("/-/ready");
    assert_eq!(ready.status, 200, "{ready:?}");
    // Connections to every master show in the metrics.
    for port in cluster.masters() {
        let series = format!("redis_proxy_redis_connections{{node=\"127.0.0.1:{port}\"}}");
        assert!(metric(&proxy2, &series) >= 1, "{series}");
    }
    assert_eq!(
        metric(&proxy2, "redis_proxy_redis_redirects_total{kind=\"moved\"}"),
        0
    );
    assert!(metric(&proxy2, "redis_proxy_cluster_refreshes_total") >= 1);
}

/// One failed read: when, which key, what came back.
#[derive(Debug, Clone)]
#[allow(dead_code)] // Read through Debug in failure messages.
struct Failure {
    at: Instant,
    /// How long the failed request took.
    took: Duration,
    key: String,
    what: String,
}

/// Client threads reading keys in a loop through the proxy (half HTTP,
/// half RESP), checking every answer against the expected value.
struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(u64, Vec<Failure>)>>,
}

impl Readers {
    fn start(
        http_port: u16,
        resp_port: u16,
        clients: usize,
        keys: Vec<(String, Vec<u8>)>,
    ) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let keys = Arc::new(keys);
        let threads = (0..clients)
            .map(|n| {
                let (stop, keys) = (stop.clone(), keys.clone());
                thread::spawn(move || {
                    let mut reads = 0u64;
                    let mut failures = Vec::new();
                    let mut http = (n % 2 == 0).then(|| Http::connect(http_port));
                    let mut con = (n % 2 == 1).then(|| resp(resp_port));
                    let mut i = n * 7;
                    while !stop.load(Ordering::Relaxed) {
                        let (key, want) = &keys[i % keys.len()];
                        i += 1;
                        let started = Instant::now();
                        let got: Result<Vec<u8>, String> = match (&mut http, &mut con) {
                            (Some(http), _) => {
                                let r = http.get(&format!("/{}", pct(key)));
                                if r.status == 200 {
                                    Ok(r.body)
                                } else {
                                    Err(format!("{} {}", r.status, r.text()))
                                }
                            }
                            (_, Some(con)) => redis::cmd("GET")
                                .arg(key)
                                .query::<Option<Vec<u8>>>(con)
                                .map_err(|e| e.to_string())
                                .and_then(|v| v.ok_or_else(|| "nil".to_string())),
                            _ => unreachable!(),
                        };
                        reads += 1;
                        let what = match got {
                            Ok(v) if v == *want => continue,
                            Ok(v) => format!("wrong value {:?}", String::from_utf8_lossy(&v)),
                            Err(e) => e,
                        };
                        failures.push(Failure {
                            at: Instant::now(),
                            took: started.elapsed(),
                            key: key.clone(),
                            what,
                        });
                        if failures.len() > 100_000 {
                            break;
                        }
                    }
                    (reads, failures)
                })
            })
            .collect();
        Readers { stop, threads }
    }

    /// Stops the readers: reads made, and every failure.
    fn stop(self) -> (u64, Vec<Failure>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut reads = 0;
        let mut failures = Vec::new();
        for t in self.threads {
            let (n, f) = t.join().expect("reader thread");
            reads += n;
            failures.extend(f);
        }
        (reads, failures)
    }
}

/// Values of `keys` set in the cluster: `value-<key>`.
fn fill(cluster: &Cluster, keys: impl IntoIterator<Item = String>) -> Vec<(String, Vec<u8>)> {
    keys.into_iter()
        .map(|key| {
            let value = format!("value-{key}").into_bytes();
            cluster.set(&key, &value);
            (key, value)
        })
        .collect()
}

/// A slot migrated key by key (`SETSLOT MIGRATING/IMPORTING` + `MIGRATE`)
/// while 8 clients read that slot's keys, uncached: every answer is the
/// cluster's value, none is an error; ASK and MOVED were both followed.
#[test]
fn live_slot_migration_loses_no_read() {
    let cluster = Cluster::start(3, 0);
    let keys = fill(&cluster, (0..60).map(|i| format!("{{mig}}:{i}")));
    let s = slot(b"mig");
    let from = cluster.master_of(s);
    let to = *cluster.masters().iter().find(|&&p| p != from).unwrap();
    let (from_id, to_id) = (cluster.id(from), cluster.id(to));
    let (proxy, port) = start_proxy(&cluster, UNCACHED_PATIENT);
    let readers = Readers::start(proxy.port(), port, 8, keys.clone());
    thread::sleep(Duration::from_millis(200));

    let node = |p: u16| &cluster.member(p).redis;
    let s_arg = s.to_string();
    node(to).cmd(&[
        b"CLUSTER",
        b"SETSLOT",
        s_arg.as_bytes(),
        b"IMPORTING",
        from_id.as_bytes(),
    ]);
    node(from).cmd(&[
        b"CLUSTER",
        b"SETSLOT",
        s_arg.as_bytes(),
        b"MIGRATING",
        to_id.as_bytes(),
    ]);
    let to_port = to.to_string();
    for (key, _) in &keys {
        node(from).cmd(&[
            b"MIGRATE",
            b"127.0.0.1",
            to_port.as_bytes(),
            key.as_bytes(),
            b"0",
            b"5000",
        ]);
        thread::sleep(Duration::from_millis(10));
    }
    for p in cluster.masters() {
        node(p).cmd(&[
            b"CLUSTER",
            b"SETSLOT",
            s_arg.as_bytes(),
            b"NODE",
            to_id.as_bytes(),
        ]);
    }
    // Reads after the move: MOVED, then the refreshed map.
    poll_until("the proxy to follow a MOVED", || {
        (metric(&proxy, "redis_proxy_redis_redirects_total{kind=\"moved\"}") > 0).then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    let (reads, failures) = readers.stop();
    assert!(
        failures.is_empty(),
        "{} of {reads} reads failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(reads > 100, "only {reads} reads");
    assert!(metric(&proxy, "redis_proxy_redis_redirects_total{kind=\"ask\"}") > 0);
    assert_eq!(cluster.master_of(s), to);
}

/// `redis-cli --cluster reshard` of 1000 slots under read load (8 clients,
/// uncached, keys on every master): zero errors.
#[test]
fn reshard_under_load_loses_no_read() {
    let cluster = Cluster::start(3, 0);
    let masters = cluster.masters();
    let (from, to) = (masters[0], masters[1]);
    // Keys in the slots that move (the source's first 1000) and elsewhere.
    let moving: Vec<String> = (0..)
        .map(|i| format!("rs:{i}"))
        .filter(|k| cluster.master_of(slot(k.as_bytes())) == from && slot(k.as_bytes()) < 1000)
        .take(100)
        .collect();
    let others = keys_on_every_master(&cluster, "rs-other", 10)
        .into_iter()
        .map(|(_, k)| k);
    let keys = fill(&cluster, moving.into_iter().chain(others));
    let (proxy, port) = start_proxy(&cluster, UNCACHED_PATIENT);
    let readers = Readers::start(proxy.port(), port, 8, keys);
    thread::sleep(Duration::from_millis(200));
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
        .args([
            "--cluster-from",
            &cluster.id(from),
            "--cluster-to",
            &cluster.id(to),
        ])
        .args(["--cluster-slots", "1000", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster reshard");
    assert!(
        out.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    thread::sleep(Duration::from_millis(300));
    let (reads, failures) = readers.stop();
    eprintln!(
        "reshard of 1000 slots: {reads} reads, {} errors",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {reads} reads failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(cluster.master_of(0), to);
    assert!(metric(&proxy, "redis_proxy_redis_redirects_total{kind=\"moved\"}") > 0);
}

/// A master killed under load (3 masters, 3 replicas, 8 readers), then its
/// replica promoted with `CLUSTER FAILOVER TAKEOVER`: only that master's
/// uncached keys fail, each with 503 / `redis unavailable` within
/// `REDIS_TIMEOUT_MS`, and none later than 2 s after the promotion (plus
/// slack for a busy machine); cached keys and the other masters' keys never
/// fail; no restart.
#[test]
fn failover_under_load() {
    let mut cluster = Cluster::start(3, 1);
    // Values over CACHE_MAX_VALUE_BYTES are never cached.
    let big = "x".repeat(200);
    let mut keys = Vec::new();
    for (port, key) in keys_on_every_master(&cluster, "fo-small", 8) {
        let value = format!("small-{key}").into_bytes();
        cluster.set(&key, &value);
        keys.push((port, key, value));
    }
    for (port, key) in keys_on_every_master(&cluster, "fo-big", 8) {
        let value = format!("{big}-{key}").into_bytes();
        cluster.set(&key, &value);
        keys.push((port, key, value));
    }
    let (proxy, port) = start_proxy(&cluster, &[("CACHE_MAX_VALUE_BYTES", "64")]);
    let mut http = Http::connect(proxy.port());
    for (_, key, _) in &keys {
        assert_eq!(http.get(&format!("/{}", pct(key))).status, 200);
    }
    let victim = keys[0].0;
    let replica = cluster.replica_of(victim);
    poll_until("the replica to hold its master's 16 keys", || {
        let r = &cluster.member(replica).redis;
        (r.cmd(&[b"DBSIZE"]) == redis::Value::Int(16)).then_some(())
    });
    let doomed: Vec<String> = keys
        .iter()
        .filter(|(p, k, _)| *p == victim && k.starts_with("fo-big"))
        .map(|(_, k, _)| k.clone())
        .collect();
    let readers = Readers::start(
        proxy.port(),
        port,
        8,
        keys.iter()
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    thread::sleep(Duration::from_millis(300));
    cluster.member_mut(victim).redis.stop();
    let ready = |http: &mut Http| http.get("/-/ready").status;
    poll_until("/-/ready to say 503 with a master down", || {
        (ready(&mut http) == 503).then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    let promoted = {
        let r = &cluster.member(replica).redis;
        r.cmd(&[b"CLUSTER", b"FAILOVER", b"TAKEOVER"]);
        poll_until("the replica to become master", || {
            common::cluster::info_section(r, "replication")
                .contains("role:master")
                .then(Instant::now)
        })
    };
    // Run on past the 2 s bound, so late errors would show.
    thread::sleep(Duration::from_millis(3500));
    let (reads, failures) = readers.stop();
    let recovered = failures
        .iter()
        .map(|f| f.at)
        .max()
        .map(|last| last.saturating_duration_since(promoted));
    eprintln!(
        "failover: {reads} reads, {} failed, last failure {recovered:?} after promotion",
        failures.len()
    );
    for f in &failures {
        assert!(doomed.contains(&f.key), "a key that should not fail: {f:?}");
        assert!(
            f.what.starts_with("503") || f.what.contains("redis unavailable"),
            "{f:?}"
        );
        assert!(f.took < Duration::from_millis(1000 + 500), "{f:?}");
        assert!(
            f.at < promoted + Duration::from_millis(2000 + 1500),
            "failed {:?} after promotion: {f:?}",
            f.at.saturating_duration_since(promoted)
        );
    }
    assert!(!failures.is_empty(), "killing a master failed no read");
    assert_eq!(ready(&mut http), 200);
    // The promoted replica serves the doomed keys now.
    for key in &doomed {
        assert_eq!(http.get(&format!("/{}", pct(key))).status, 200, "{key}");
    }
}

/// Two proxies with `CACHE_INVALIDATION=tracking` on one cluster: one
/// invalidation connection per master; writes made directly in the cluster
/// on every master reach both proxies' caches, also for a key whose slot
/// moved to another master while it was cached.
#[test]
fn two_tracking_proxies_stay_coherent() {
    let cluster = Cluster::start(3, 0);
    let keys: Vec<String> = keys_on_every_master(&cluster, "co", 2)
        .into_iter()
        .map(|(_, k)| k)
        .collect();
    for key in &keys {
        cluster.set(key, "v1");
    }
    let env = [("CACHE_INVALIDATION", "tracking")];
    let proxies = [start_proxy(&cluster, &env).0, start_proxy(&cluster, &env).0];
    let mut clients: Vec<Http> = proxies.iter().map(|p| Http::connect(p.port())).collect();
    // Cached (a HIT) once every master's listener is up.
    for http in &mut clients {
        for key in &keys {
            poll_until("a tracked hit", || {
                let r = http.get(&format!("/{key}"));
                assert_eq!(r.text(), "v1");
                (r.x_cache() == Some("HIT")).then_some(())
            });
        }
    }
    let expect_everywhere = |clients: &mut Vec<Http>, key: &str, want: &str| {
        for http in clients.iter_mut() {
            poll_until("the write to reach the proxy", || {
                (http.get(&format!("/{key}")).text() == want).then_some(())
            });
        }
    };
    for key in &keys {
        cluster.set(key, "v2");
    }
    for key in &keys {
        expect_everywhere(&mut clients, key, "v2");
    }
    // Move the first key's slot while it is cached, then write it at its
    // new master.
    let key = &keys[0];
    let s = slot(key.as_bytes());
    let from = cluster.master_of(s);
    let to = *cluster.masters().iter().find(|&&p| p != from).unwrap();
    let (from_id, to_id) = (cluster.id(from), cluster.id(to));
    let node = |p: u16| &cluster.member(p).redis;
    let s_arg = s.to_string();
    node(to).cmd(&[
        b"CLUSTER",
        b"SETSLOT",
        s_arg.as_bytes(),
        b"IMPORTING",
        from_id.as_bytes(),
    ]);
    node(from).cmd(&[
        b"CLUSTER",
        b"SETSLOT",
        s_arg.as_bytes(),
        b"MIGRATING",
        to_id.as_bytes(),
    ]);
    let to_port = to.to_string();
    node(from).cmd(&[
        b"MIGRATE",
        b"127.0.0.1",
        to_port.as_bytes(),
        key.as_bytes(),
        b"0",
        b"5000",
    ]);
    for p in cluster.masters() {
        node(p).cmd(&[
            b"CLUSTER",
            b"SETSLOT",
            s_arg.as_bytes(),
            b"NODE",
            to_id.as_bytes(),
        ]);
    }
    expect_everywhere(&mut clients, key, "v2");
    cluster.set(key, "v3");
    expect_everywhere(&mut clients, key, "v3");
}
