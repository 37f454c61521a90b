//! System tests of failure handling: graceful shutdown on SIGTERM under
//! load, Redis outages (down at start, killed, restarted, stalled, slow), and
//! hostile or malformed client input (README "Limits and what is not done"
//! names the limits they stop at). The real binary against a real
//! `redis-server`, each test with its own of both on free loopback ports,
//! through the shared helpers in `tests/common`.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{metric, parse_response, poll_until, Http, Outcome, Proxy, Redis, Response, DEADLINE};

/// A TTL long enough that nothing expires during a test.
const LONG_TTL: &str = "600000";

/// Generous bound for an answer that the contract says comes after about
/// `REDIS_TIMEOUT_MS`: only "it answers at all", never how fast.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long a SIGTERMed proxy may take to exit: the default grace (5 s) for
/// requests in flight plus as much again for connections to close, and slack.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// Upper bound on the proxy's resident memory after the bad-input barrage.
const RSS_BOUND_KIB: u64 = 200 * 1024;

/// redis-server arguments that allow `DEBUG SLEEP` from loopback.
const DEBUG_ALLOWED: &[&str] = &["--enable-debug-command", "local"];

/// `GET target` on a new connection, failing unless a complete response
/// arrives within `within` (a loose bound, not a measurement).
#[track_caller]
fn get_within(port: u16, target: &str, within: Duration) -> (u16, Vec<u8>) {
    let mut conn = Http::try_connect_with(port, within).expect("connect to the proxy");
    let req = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    match conn.exchange(req.as_bytes()) {
        Outcome::Complete(r) => (r.status, r.body),
        other => panic!("GET {target}: no complete answer within {within:?}: {other:?}"),
    }
}

/// The `error` field of a JSON body.
fn json_error(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    v["error"].as_str().unwrap_or_default().to_string()
}

/// Sends `bytes` on a new connection (write errors ignored: the proxy may
/// close mid-send), then reads until the proxy closes it. Returns what
/// arrived, or `None` if it is still open after `deadline`.
fn send_until_closed(port: u16, bytes: &[u8], deadline: Duration) -> Option<Vec<u8>> {
    let mut c = Http::connect(port);
    let _ = c.send(bytes);
    c.wait_closed(deadline)
}

/// What a proxy may answer to input it cannot parse: nothing (a close), or
/// whole HTTP responses with one of `allowed` statuses.
#[track_caller]
fn assert_closed_or_status(got: &[u8], allowed: &[u16], what: &str) {
    let mut rest = got;
    while !rest.is_empty() {
        match parse_response(rest, false) {
            Ok(Some(r)) => {
                assert!(
                    allowed.contains(&r.status),
                    "{what}: status {}, expected one of {allowed:?} or a close; got {:?}",
                    r.status,
                    String::from_utf8_lossy(got)
                );
                rest = &rest[r.wire..];
            }
            other => panic!(
                "{what}: not a close or a whole response ({other:?}): {:?}",
                String::from_utf8_lossy(got)
            ),
        }
    }
}

/// A deterministic byte source (xorshift64) for "random" input.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Graceful shutdown

/// What the shutdown load saw.
#[derive(Default)]
struct LoadLog {
    ok: AtomicUsize,
    closed: AtomicUsize,
    broken: Mutex<Vec<String>>,
}

/// Judges one answer to `GET /key`: `Err` unless it is whole and right
/// (the key's exact value, or the exact 404 for a key not in `expected`, or
/// the whole 503 `shutting down` refusal of a request that arrived after the
/// drain began).
fn judge(key: &str, outcome: Outcome, expected: &HashMap<String, Vec<u8>>) -> Result<bool, String> {
    match outcome {
        Outcome::Complete(r)
            if r.status == 503
                && serde_json::from_slice::<serde_json::Value>(&r.body).ok()
                    == Some(serde_json::json!({"error": "shutting down"})) =>
        {
            Ok(false)
        }
        Outcome::Complete(Response { status, body, .. }) => {
            let right = match expected.get(key) {
                Some(value) => status == 200 && &body == value,
                None => {
                    status == 404
                        && serde_json::from_slice::<serde_json::Value>(&body).ok()
                            == Some(serde_json::json!({"error": "key not found", "key": key}))
                }
            };
            if right {
                Ok(true)
            } else {
                Err(format!(
                    "GET /{key}: status {status}, body {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            }
        }
        // Closed (or reset) with no byte of a response: allowed.
        Outcome::Closed(_) => Ok(false),
        Outcome::Broken(why) => Err(format!("GET /{key}: broken: {why}")),
        Outcome::Silent => Err(format!("GET /{key}: no answer in {DEADLINE:?}")),
    }
}

/// One load thread: keep-alive GETs cycling through `keys` until `stop`,
/// reconnecting after a close; every answer is judged into `log`. `big`:
/// with a small fixed receive buffer, so a multi-MiB reply takes many writes.
fn shutdown_client(
    port: u16,
    t: usize,
    keys: &[String],
    expected: &HashMap<String, Vec<u8>>,
    log: &LoadLog,
    stop: &AtomicBool,
    big: bool,
) {
    let mut conn: Option<Http> = None;
    let mut n = t;
    let rcvbuf = if big { Some(64 * 1024) } else { None };
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = &keys[n % keys.len()];
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Http::try_connect(port) {
                Ok(c) => {
                    if let Some(size) = rcvbuf {
                        c.set_recv_buffer(size);
                    }
                    conn.insert(c)
                }
                Err(_) => {
                    // Refused: the listener is gone.
                    log.closed.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                    continue;
                }
            },
        };
        let req = format!("GET /{key} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        match judge(key, c.exchange(req.as_bytes()), expected) {
            Ok(true) => {
                log.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                log.closed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Err(wrong) => {
                log.broken.lock().unwrap().push(wrong);
                conn = None;
            }
        }
    }
}

/// Runs 4 keep-alive clients cycling through `keys` (values in `expected`,
/// each set in Redis) until `min_ok` right answers, sends SIGTERM, and checks
/// the exit status and that every answer received was whole and right.
fn sigterm_under_load(
    keys: Vec<String>,
    expected: HashMap<String, Vec<u8>>,
    env: &[(&str, &str)],
    min_ok: usize,
    big: bool,
) {
    let redis = Redis::start();
    for (k, v) in &expected {
        redis.set(k, v);
    }
    let mut proxy = Proxy::start(&redis, env);
    let (keys, expected) = (Arc::new(keys), Arc::new(expected));
    let log = Arc::new(LoadLog::default());
    let stop = Arc::new(AtomicBool::new(false));
    let port = proxy.port();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (keys, expected, log, stop) =
                (keys.clone(), expected.clone(), log.clone(), stop.clone());
            thread::spawn(move || shutdown_client(port, t, &keys, &expected, &log, &stop, big))
        })
        .collect();

    // Real load first: every key answered several times.
    poll_until("the load to get going", || {
        (log.ok.load(Ordering::Relaxed) >= min_ok).then_some(())
    });
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(EXIT_WITHIN);
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("load thread");
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "the proxy was still running {EXIT_WITHIN:?} after SIGTERM; stderr:\n{}",
            proxy.logs()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}; stderr:\n{}",
        proxy.logs()
    );
    let broken = log.broken.lock().unwrap();
    assert!(
        broken.is_empty(),
        "{} bad responses (of {} good), e.g. {:?}",
        broken.len(),
        log.ok.load(Ordering::Relaxed),
        &broken[..broken.len().min(5)]
    );
    // The clients did see the proxy go away.
    assert!(log.closed.load(Ordering::Relaxed) > 0);
}

/// SIGTERM under keep-alive load: exit 0 in time, and every response received is whole and right.
#[test]
fn sigterm_under_load_exits_zero_with_only_whole_responses() {
    let mut expected = HashMap::new();
    let mut keys = Vec::new();
    for i in 0..40 {
        let (hot, cold) = (format!("hot{}", i % 4), format!("cold{i}"));
        expected.insert(hot.clone(), format!("{hot}-").repeat(200).into_bytes());
        expected.insert(cold.clone(), format!("{cold}-").repeat(300).into_bytes());
        // Missing keys are never cached: each GET of one goes to Redis.
        keys.extend([hot, cold, "absent".to_string()]);
    }
    // Room for the hot keys only: cold keys keep going to Redis.
    let env = [("CACHE_CAPACITY", "4"), ("CACHE_TTL_MS", LONG_TTL)];
    sigterm_under_load(keys, expected, &env, 300, false);
}

/// SIGTERM while 4 clients slowly take in 8 MiB values: no client gets a cut-off response.
#[test]

fn sigterm_during_large_responses_cuts_none() {
    let mut expected = HashMap::new();
    for i in 0..2 {
        expected.insert(format!("big{i}"), vec![b'a' + i as u8; (8 << 20) + i]);
    }
    let keys = expected.keys().cloned().collect();
    sigterm_under_load(keys, expected, &[("CACHE_TTL_MS", LONG_TTL)], 8, true);
}

/// A request waiting on a stalled Redis at SIGTERM still gets its whole 504 before exit 0.
#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    let redis = Redis::start_with(DEBUG_ALLOWED);
    redis.set("slow", b"value");
    let mut proxy = Proxy::start(&redis, &[("REDIS_TIMEOUT_MS", "1500")]);
    // Connections to Redis are open before the stall.
    assert_eq!(proxy.get("/-/ready").status, 200);
    redis.signal(libc::SIGSTOP);

    let port = proxy.port();
    let client = thread::spawn(move || {
        let mut c = Http::connect(port);
        c.exchange(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    });
    // The GET has been written to Redis: it is in flight.
    poll_until("the GET to reach Redis", || {
        (metric(&proxy, "redis_proxy_redis_requests_total") >= 2).then_some(())
    });
    proxy.signal(libc::SIGTERM);
    let outcome = client.join().expect("client thread");
    let status = proxy.wait_exit(EXIT_WITHIN);
    redis.signal(libc::SIGCONT);
    match outcome {
        Outcome::Complete(r) => {
            assert_eq!(r.status, 504, "{r:?}");
            assert_eq!(json_error(&r.body), "redis timeout");
        }
        other => panic!("the request in flight got no whole answer: {other:?}"),
    }
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM: {}", proxy.logs()));
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr:\n{}",
        proxy.logs()
    );
}

// ---------------------------------------------------------------------------
// Redis outages

/// Started with Redis down: healthy 200, ready and GETs 503; served once Redis comes up.
#[test]
fn started_while_redis_is_down_then_redis_comes_up() {
    let mut redis = Redis::start();
    redis.stop();
    let mut proxy = Proxy::start(&redis, &[("REDIS_TIMEOUT_MS", "300")]);

    assert_eq!(proxy.get("/-/healthy").status, 200);
    let r = proxy.get("/-/ready");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(json_error(&r.body), "redis unavailable", "{r:?}");
    for key in ["k", "other"] {
        let r = proxy.get(&format!("/{key}"));
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.content_type(), Some("application/json"), "{r:?}");
        assert_eq!(json_error(&r.body), "redis unavailable", "{r:?}");
    }
    proxy.assert_alive();

    redis.restart_same_port();
    redis.set("k", "v");
    poll_until("GET /k to be served once Redis is up", || {
        let r = proxy.get("/k");
        (r.status == 200).then_some(r)
    });
    assert_eq!(proxy.get("/k").body, b"v");
    // Each worker's Redis connection comes back on its own (with backoff).
    poll_until("/-/ready to be 200 again", || {
        (proxy.get("/-/ready").status == 200).then_some(())
    });
    proxy.assert_alive();
}

/// Redis killed under load: cached keys keep answering 200, uncached ones 503.
#[test]
fn redis_killed_under_load_cached_keys_keep_answering() {
    let mut redis = Redis::start();
    for i in 0..4 {
        redis.set(format!("hot{i}"), format!("value-{i}"));
    }
    redis.set("fresh", "never read before the kill");
    let mut proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    for i in 0..4 {
        assert_eq!(
            proxy.get(&format!("/hot{i}")).body,
            format!("value-{i}").as_bytes()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let port = proxy.port();
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (stop, hits, unavailable, bad) =
                (stop.clone(), hits.clone(), unavailable.clone(), bad.clone());
            thread::spawn(move || {
                let mut c = Http::connect(port);
                let mut n = t;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let i = n % 4;
                    let r = c.get(&format!("/hot{i}"));
                    if r.status == 200 && r.body == format!("value-{i}").as_bytes() {
                        hits.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.lock().unwrap().push(format!("cached /hot{i}: {r:?}"));
                    }
                    // Missing keys are never cached: each one asks Redis.
                    let r = c.get(&format!("/absent-{t}-{n}"));
                    match r.status {
                        404 => {}
                        503 if json_error(&r.body) == "redis unavailable" => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => bad.lock().unwrap().push(format!("uncached: {r:?}")),
                    }
                }
            })
        })
        .collect();

    poll_until("load before the kill", || {
        (hits.load(Ordering::Relaxed) >= 100).then_some(())
    });
    redis.stop();
    let before = hits.load(Ordering::Relaxed);
    poll_until("uncached GETs to fail and cached ones to go on", || {
        (unavailable.load(Ordering::Relaxed) >= 50 && hits.load(Ordering::Relaxed) >= before + 200)
            .then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("load thread");
    }
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} wrong answers, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );

    let r = proxy.get("/hot0");
    assert_eq!((r.status, r.x_cache()), (200, Some("HIT")), "{r:?}");
    let r = proxy.get("/fresh");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(json_error(&r.body), "redis unavailable");
    assert_eq!(proxy.get("/-/ready").status, 503);
    proxy.assert_alive();
}

/// Redis restarted on the same port: service comes back in the same proxy process.
#[test]
fn redis_restarted_on_same_port_service_comes_back() {
    let mut redis = Redis::start();
    redis.set("cached", "c");
    let mut proxy = Proxy::start(&redis, &[("CACHE_TTL_MS", LONG_TTL)]);
    let pid = proxy.pid();
    assert_eq!(proxy.get("/cached").body, b"c");

    redis.stop();
    let r = proxy.get("/new");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(proxy.get("/cached").body, b"c");

    redis.restart_same_port();
    redis.set("new", "n");
    // The restarted Redis is empty, but the cache still holds its copy.
    redis.set("cached", "changed");
    poll_until("GET /new to be served after the restart", || {
        let r = proxy.get("/new");
        (r.status == 200).then_some(())
    });
    assert_eq!(proxy.get("/new").body, b"n");
    assert_eq!(proxy.get("/cached").body, b"c");
    poll_until("/-/ready to be 200 again", || {
        (proxy.get("/-/ready").status == 200).then_some(())
    });
    assert_eq!(proxy.pid(), pid);
    proxy.assert_alive();
}

/// Redis stalled by SIGSTOP: cached 200, uncached 504/503 within 5 s; back after SIGCONT.
#[test]
fn stalled_redis_times_out_then_recovers() {
    let redis = Redis::start_with(DEBUG_ALLOWED);
    for i in 0..3 {
        redis.set(format!("cold{i}"), format!("cold-value-{i}").as_bytes());
    }
    redis.set("hot", b"hot-value");
    let mut proxy = Proxy::start(&redis, &[("REDIS_TIMEOUT_MS", "300")]);
    assert_eq!(proxy.get("/hot").body, b"hot-value");

    redis.signal(libc::SIGSTOP);
    let port = proxy.port();
    let answers: Vec<_> = (0..3)
        .map(|i| thread::spawn(move || get_within(port, &format!("/cold{i}"), ANSWER_WITHIN)))
        .collect();
    for (i, a) in answers.into_iter().enumerate() {
        let (status, body) = a.join().expect("client thread");
        let error = json_error(&body);
        assert!(
            (status, error.as_str()) == (504, "redis timeout")
                || (status, error.as_str()) == (503, "redis unavailable"),
            "/cold{i} with Redis stalled: {status} {error}"
        );
    }
    let (status, body) = get_within(port, "/hot", ANSWER_WITHIN);
    assert_eq!((status, body.as_slice()), (200, &b"hot-value"[..]));
    let (status, _) = get_within(port, "/-/ready", ANSWER_WITHIN);
    assert_eq!(status, 503);
    proxy.assert_alive();

    redis.signal(libc::SIGCONT);
    for i in 0..3 {
        let want = format!("cold-value-{i}");
        poll_until("uncached GETs to be served after SIGCONT", || {
            let r = proxy.get(&format!("/cold{i}"));
            (r.status == 200).then_some(())
        });
        // Each key gets its own value: no late reply answered another request.
        assert_eq!(proxy.get(&format!("/cold{i}")).body, want.as_bytes());
    }
    // Each worker's Redis connection comes back on its own (with backoff).
    poll_until("/-/ready to be 200 again", || {
        (proxy.get("/-/ready").status == 200).then_some(())
    });
    proxy.assert_alive();
}

/// `DEBUG SLEEP 1` with REDIS_TIMEOUT_MS=200 gives 504; then every key reads its own value.
#[test]
fn debug_sleep_gives_504_then_recovers() {
    let redis = Redis::start_with(DEBUG_ALLOWED);
    for i in 0..5 {
        redis.set(format!("k{i}"), format!("v{i}").as_bytes());
    }
    redis.set("other", b"other-value");
    let mut proxy = Proxy::start(&redis, &[("REDIS_TIMEOUT_MS", "200")]);
    assert_eq!(proxy.get("/-/ready").status, 200);

    // Each attempt uses a key not read before; an attempt can only miss the
    // sleep if the GET got to Redis before it, and then returns the value.
    let mut timed_out = false;
    for i in 0..5 {
        let mut sleeper = TcpStream::connect(("127.0.0.1", redis.port())).expect("connect");
        sleeper
            .write_all(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n1\r\n")
            .expect("send DEBUG SLEEP");
        // Redis is asleep once a PING on another connection goes unanswered.
        poll_until("Redis to start sleeping", || {
            let mut p = TcpStream::connect(("127.0.0.1", redis.port())).ok()?;
            p.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
            p.write_all(b"*1\r\n$4\r\nPING\r\n").ok()?;
            let mut buf = [0u8; 7];
            p.read_exact(&mut buf).is_err().then_some(())
        });
        let (status, body) = get_within(proxy.port(), &format!("/k{i}"), ANSWER_WITHIN);
        match status {
            504 => {
                assert_eq!(json_error(&body), "redis timeout");
                timed_out = true;
            }
            200 => assert_eq!(body, format!("v{i}").as_bytes()),
            _ => panic!("GET /k{i} during DEBUG SLEEP: {status} {body:?}"),
        }
        // Wait for the sleep to end (its +OK reply).
        sleeper.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut ok = [0u8; 5];
        sleeper.read_exact(&mut ok).expect("DEBUG SLEEP reply");
        assert_eq!(&ok, b"+OK\r\n");
        if timed_out {
            break;
        }
    }
    assert!(timed_out, "no GET timed out during DEBUG SLEEP");
    poll_until("service back after the sleep", || {
        (proxy.get("/other").status == 200).then_some(())
    });
    assert_eq!(proxy.get("/other").body, b"other-value");
    for i in 0..5 {
        assert_eq!(
            proxy.get(&format!("/k{i}")).body,
            format!("v{i}").as_bytes()
        );
    }
    proxy.assert_alive();
}

// ---------------------------------------------------------------------------
// Bad input. Each check runs against a proxy fronting a Redis that holds
// k = v, and is followed by a normal request on a new connection.

/// A Redis holding `k = v` and a proxy in front of it.
fn bad_input_setup(env: &[(&str, &str)]) -> (Redis, Proxy) {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::start(&redis, env);
    (redis, proxy)
}

fn check_garbage_bytes(proxy: &Proxy) {
    for seed in [1u64, 7, 42, 1234, 99_999] {
        let bytes = noise(seed, 4096);
        let got = send_until_closed(proxy.port(), &bytes, DEADLINE)
            .unwrap_or_else(|| panic!("garbage (seed {seed}) left the connection open"));
        assert_closed_or_status(&got, &[400], "random bytes");
    }
    // A well-formed request line, then garbage in the headers.
    let mut bytes = b"GET /k HTTP/1.1\r\nHost: x\r\n".to_vec();
    bytes.extend(noise(5, 1024));
    let got = send_until_closed(proxy.port(), &bytes, DEADLINE)
        .expect("garbage headers left the connection open");
    assert_closed_or_status(&got, &[400], "garbage headers");
}

fn check_no_version(proxy: &Proxy) {
    let got = send_until_closed(proxy.port(), b"GET /k\r\n\r\n", DEADLINE)
        .expect("a request line without a version left the connection open");
    assert_closed_or_status(&got, &[400], "GET /k without a version");
}

fn check_too_many_headers(proxy: &Proxy) {
    let request = |n: usize| {
        let mut r = "GET /k HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_string();
        for i in 1..n {
            r.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        r + "\r\n"
    };
    // Up to 128 headers are served (may_minihttp stopped at 16).
    let mut c = proxy.http();
    for n in [16, 17, 40, 128] {
        c.send(request(n).as_bytes()).expect("send");
        let r = c.read_response(false).expect("answered");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"v"[..]),
            "{n} headers: {r:?}"
        );
    }
    let got = send_until_closed(proxy.port(), request(129).as_bytes(), DEADLINE)
        .unwrap_or_else(|| panic!("129 headers left the connection open"));
    assert_closed_or_status(&got, &[431], "129 headers");
}

fn check_100_kb_url(proxy: &Proxy) {
    let mut c = proxy.http();
    let target = format!("/{}", "u".repeat(100 * 1024));
    match c.request("GET", &target, &[]) {
        Ok(r) if r.status == 400 => {
            assert!(json_error(&r.body).starts_with("key too long"), "{r:?}")
        }
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => panic!("a 100 KB URL got no answer: {e}"),
    }
}

fn check_bad_percent_encoding(proxy: &Proxy) {
    for target in ["/a%zz", "/a%2", "/%", "/%G0", "/ok%2?format=json", "/%%41"] {
        let r = proxy.get(target);
        assert_eq!(r.status, 400, "{target}: {r:?}");
        assert_eq!(
            json_error(&r.body),
            "bad percent-encoding in key",
            "{target}"
        );
    }
}

fn check_nul_in_key(proxy: &Proxy, redis: &Redis) {
    redis.set(b"n\0ul", "nul-value");
    let r = proxy.get("/n%00ul");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"nul-value"[..]),
        "{r:?}"
    );
    let r = proxy.get("/%00absent");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json()["key"], "\u{0}absent", "{r:?}");
    // A raw NUL byte is not allowed in a request target.
    let got = send_until_closed(
        proxy.port(),
        b"GET /n\0ul HTTP/1.1\r\nHost: x\r\n\r\n",
        DEADLINE,
    )
    .expect("a raw NUL in the path left the connection open");
    assert_closed_or_status(&got, &[400], "raw NUL in the path");
}

fn check_key_sizes(proxy: &Proxy, redis: &Redis) {
    let max = "m".repeat(64 * 1024);
    redis.set(&max, "at-the-limit");
    let r = proxy.get(&format!("/{max}"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"at-the-limit"[..]),
        "{r:?}"
    );
    let over = "m".repeat(64 * 1024 + 1);
    redis.set(&over, "over-the-limit");
    let r = proxy.get(&format!("/{over}"));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(json_error(&r.body).starts_with("key too long"), "{r:?}");
}

fn check_malformed_content_length(proxy: &Proxy) {
    let mut c = proxy.http();
    c.send(b"GET /k HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello")
        .expect("send");
    let r = c.read_response(false).expect("an answer");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(json_error(&r.body), "malformed Content-Length");
    let rest = c.wait_closed(DEADLINE).expect("closed after the 400");
    assert!(
        rest.is_empty(),
        "bytes after the 400: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

fn check_malformed_content_length_hides_no_request(proxy: &Proxy) {
    // Where the first request ends is unknown, so what follows it is not a
    // request: one 400, then close, nothing served for the "body".
    let mut c = proxy.http();
    c.send(b"GET /k HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nGET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let r = c.read_response(false).expect("an answer");
    assert_eq!(r.status, 400, "{r:?}");
    // may_minihttp answers every request it parsed, so the hidden bytes may
    // get a reply, but only the refusal: never a served request.
    let rest = c.wait_closed(DEADLINE).expect("closed after the 400");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty()
            || (rest.starts_with("HTTP/1.1 400 ") && rest.contains("connection is closing")),
        "the body of a request with a malformed Content-Length was served as a request: {rest:?}"
    );
    assert!(!rest.contains(" 200 "), "{rest:?}");
}

/// Three pipelined GETs and their expected bodies.
const PIPELINE: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /bb HTTP/1.1\r\nHost: x\r\n\r\nGET /ccc?format=json HTTP/1.1\r\nHost: x\r\n\r\n";

fn read_pipeline_answers(c: &mut Http, what: &str) {
    for (key, want) in [
        ("a", &b"1"[..]),
        ("bb", b"22"),
        ("ccc", br#"{"key":"ccc","value":"333"}"#),
    ] {
        let r = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("{what}: answer for /{key}: {e}"));
        assert_eq!((r.status, r.body.as_slice()), (200, want), "{what}: {r:?}");
    }
    assert!(
        c.leftover().is_empty(),
        "{what}: extra bytes {:?}",
        c.leftover()
    );
}

fn check_pipeline_split_everywhere(proxy: &Proxy, redis: &Redis) {
    redis.set("a", "1");
    redis.set("bb", "22");
    redis.set("ccc", "333");
    for cut in 1..PIPELINE.len() {
        let mut c = proxy.http();
        c.send(&PIPELINE[..cut]).expect("send first piece");
        // Let the first piece arrive (and be parsed) on its own.
        thread::sleep(Duration::from_millis(2));
        c.send(&PIPELINE[cut..]).expect("send second piece");
        read_pipeline_answers(&mut c, &format!("cut at {cut}"));
    }
    let mut c = proxy.http();
    for b in PIPELINE {
        c.send(std::slice::from_ref(b)).expect("send one byte");
        thread::sleep(Duration::from_millis(1));
    }
    read_pipeline_answers(&mut c, "one byte at a time");
}

fn check_http_1_0(proxy: &Proxy) {
    let mut c = proxy.http();
    c.send(b"GET /k HTTP/1.0\r\n\r\n").expect("send");
    let r = c.read_response(false).expect("an answer");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"v"[..]), "{r:?}");
    let rest = c
        .wait_closed(DEADLINE)
        .expect("an HTTP/1.0 connection stayed open after the reply");
    assert!(rest.is_empty(), "{rest:?}");
}

fn check_never_reading_client(proxy: &Proxy, redis: &Redis) {
    let value = vec![b'x'; 10 * 1024];
    redis.set("big", &value);
    assert_eq!(proxy.get("/big").body, value);
    let reaped = metric(proxy, "redis_proxy_clients_reaped_total");

    let stream = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    // Never blocks for good, whatever the proxy does.
    writer.set_write_timeout(Some(DEADLINE)).expect("timeout");
    let flood = thread::spawn(move || {
        let batch = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        for _ in 0..200 {
            if writer.write_all(&batch).is_err() {
                break;
            }
        }
    });
    // Others are served meanwhile.
    assert_eq!(proxy.get("/k").body, b"v");
    poll_until("the non-reading client to be reaped", || {
        (metric(proxy, "redis_proxy_clients_reaped_total") > reaped).then_some(())
    });
    flood.join().expect("flood thread");
    // What reached our socket ends: the proxy closed it (far less than the
    // ~2 GB that 200,000 replies would be).
    let mut stream = stream;
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut total = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                assert!(
                    total < 256 << 20,
                    "still receiving replies after {total} bytes"
                );
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the non-reading client's connection is still open")
            }
            Err(_) => break,
        }
    }
}

fn check_slowloris(proxy: &Proxy) {
    // For a proxy with PROXY_IDLE_TIMEOUT_MS=500.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    s.write_all(b"GET /k HTTP/1.1\r\nX-Slow: ").expect("send");
    let end = Instant::now() + DEADLINE;
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            Instant::now() < end,
            "a 1-byte-per-50-ms head was not closed within {DEADLINE:?}"
        );
        if s.write_all(b"z").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

fn check_slowly_growing_head(proxy: &Proxy) {
    // 200 KiB of header bytes in 1 KiB pieces, never finished.
    let mut c = proxy.http();
    c.send(b"GET /k HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        .expect("send");
    let piece = vec![b'p'; 1024];
    for _ in 0..200 {
        if c.send(&piece).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let got = c
        .wait_closed(DEADLINE)
        .expect("a 200 KiB unfinished head was still open");
    assert_closed_or_status(&got, &[431], "a 200 KiB unfinished head");
}

/// Random binary bytes are closed (or answered 400); the proxy goes on serving.
#[test]
fn garbage_bytes_are_closed() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_garbage_bytes(&proxy);
    proxy.assert_serves("k", b"v");
}

/// `GET /k` without an HTTP version: a clean close or 400.
#[test]
fn request_line_without_version_is_closed_or_400() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_no_version(&proxy);
    proxy.assert_serves("k", b"v");
}

/// Up to 128 headers are served; 129 get 431.
#[test]
fn up_to_128_headers_are_served_then_431() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_too_many_headers(&proxy);
    proxy.assert_serves("k", b"v");
}

/// A 100 KB URL is 400 (key too long) or 431.
#[test]
fn url_of_100_kb_is_refused() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_100_kb_url(&proxy);
    proxy.assert_serves("k", b"v");
}

/// Bad percent-encoding is 400 `bad percent-encoding in key`.
#[test]
fn bad_percent_encoding_is_400() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_bad_percent_encoding(&proxy);
    proxy.assert_serves("k", b"v");
}

/// `%00` is a key byte like any other; a raw NUL in the path is closed or 400.
#[test]
fn nul_in_key() {
    let (redis, mut proxy) = bad_input_setup(&[]);
    check_nul_in_key(&proxy, &redis);
    proxy.assert_serves("k", b"v");
}

/// A key of exactly 64 KiB is served; one byte more is 400.
#[test]
fn key_over_64_kib_is_400() {
    let (redis, mut proxy) = bad_input_setup(&[]);
    check_key_sizes(&proxy, &redis);
    proxy.assert_serves("k", b"v");
}

/// `Content-Length: abc` with a body: 400, then the connection is closed.
#[test]
fn malformed_content_length_is_400_then_close() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_malformed_content_length(&proxy);
    proxy.assert_serves("k", b"v");
}

/// A request hidden after one with a malformed Content-Length is never served.
#[test]

fn malformed_content_length_body_is_not_served_as_a_request() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_malformed_content_length_hides_no_request(&proxy);
    proxy.assert_serves("k", b"v");
}

/// Three pipelined GETs split at every byte (and sent byte by byte) get right answers in order.
#[test]
fn pipelined_requests_split_at_every_byte() {
    let (redis, mut proxy) = bad_input_setup(&[]);
    check_pipeline_split_everywhere(&proxy, &redis);
    proxy.assert_serves("k", b"v");
}

/// HTTP/1.0 without keep-alive: 200, then the connection is closed.
#[test]
fn http_1_0_is_served_then_closed() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_http_1_0(&proxy);
    proxy.assert_serves("k", b"v");
}

/// A client pipelining 200,000 GETs of 10 KB and never reading is cut off; others are served.
#[test]
fn never_reading_client_is_cut_off() {
    let (redis, mut proxy) = bad_input_setup(&[]);
    check_never_reading_client(&proxy, &redis);
    proxy.assert_serves("k", b"v");
    let (rss, hwm) = proxy.memory_kib();
    eprintln!("never_reading_client_is_cut_off: VmRSS {rss} KiB, VmHWM {hwm} KiB");
}

/// A head sent one byte per 50 ms is closed after PROXY_IDLE_TIMEOUT_MS=500.
#[test]
fn slowloris_is_closed() {
    let (_redis, mut proxy) = bad_input_setup(&[("PROXY_IDLE_TIMEOUT_MS", "500")]);
    check_slowloris(&proxy);
    proxy.assert_serves("k", b"v");
}

/// An unfinished head growing to 200 KiB is closed (or 431) well before the 60 s idle timeout.
#[test]
fn unfinished_head_over_128_kib_is_closed() {
    let (_redis, mut proxy) = bad_input_setup(&[]);
    check_slowly_growing_head(&proxy);
    proxy.assert_serves("k", b"v");
}

/// After the whole bad-input barrage the proxy still serves and its VmRSS is under 200 MB.
#[test]
fn memory_stays_bounded_after_bad_input_barrage() {
    let (redis, mut proxy) = bad_input_setup(&[("PROXY_IDLE_TIMEOUT_MS", "1000")]);
    check_garbage_bytes(&proxy);
    check_no_version(&proxy);
    check_too_many_headers(&proxy);
    check_100_kb_url(&proxy);
    check_bad_percent_encoding(&proxy);
    check_nul_in_key(&proxy, &redis);
    check_key_sizes(&proxy, &redis);
    check_malformed_content_length(&proxy);
    check_pipeline_split_everywhere(&proxy, &redis);
    check_http_1_0(&proxy);
    check_never_reading_client(&proxy, &redis);
    check_slowloris(&proxy);
    check_slowly_growing_head(&proxy);
    proxy.assert_serves("k", b"v");
    let (rss, hwm) = proxy.memory_kib();
    assert!(
        rss < RSS_BOUND_KIB,
        "VmRSS {rss} KiB after the barrage (peak {hwm} KiB), bound {RSS_BOUND_KIB} KiB"
    );
}
