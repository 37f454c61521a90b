//! System tests of pipelined reads (#13 item 5): the misses of one read
//! batch, RESP GETs and MGETs or HTTP GETs and HEADs, reach Redis together
//! in one round trip, and the replies still come in order, reads never
//! moved before a write ahead of them in the pipeline.
//!
//! The round trips are counted where they land: Redis's own
//! `total_reads_processed` (one per read event on any connection) goes up
//! by one per round trip the proxy makes, where a pipeline served one GET
//! at a time makes one per GET. The GETs themselves stay one per key
//! (`cmdstat_get`). The proxy runs one worker, so it has one Redis
//! connection, opened (handshake and all) before anything is counted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Proxy, Redis, DEADLINE};
use redis::Value;

/// Keys per pipeline.
const N: usize = 50;

/// Starts a proxy with one worker and its RESP port open.
fn start(redis: &Redis, env: &[(&str, &str)]) -> Proxy {
    Proxy::builder()
        .redis(redis)
        .resp()
        .env("PROXY_WORKERS", "1")
        .envs(env)
        .start()
}

fn connect(proxy: &Proxy) -> redis::Connection {
    let port = proxy.resp_port().expect("RESP port");
    let con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection())
        .expect("connect to the proxy");
    con.set_read_timeout(Some(DEADLINE)).unwrap();
    con
}

/// One numeric field of Redis's `INFO` (any section).
fn info_u64(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in INFO"))
}

/// Redis's view: read events processed (its own connection's INFO read
/// included) and GETs served so far.
struct Counts {
    con: redis::Connection,
}

impl Counts {
    fn new(redis: &Redis) -> Counts {
        Counts { con: redis.conn() }
    }

    /// `(total_reads_processed, cmdstat_get calls)`.
    fn now(&mut self) -> (u64, u64) {
        let info: String = redis::cmd("INFO")
            .arg("everything")
            .query(&mut self.con)
            .unwrap();
        let gets = info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:"))
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .map_or(0, |n| n.parse().unwrap());
        (info_u64(&info, "total_reads_processed"), gets)
    }

    /// What Redis saw while `f` ran: `(reads of other connections, GETs)`.
    fn during(&mut self, f: impl FnOnce()) -> (u64, u64) {
        let (reads, gets) = self.now();
        f();
        let (reads_after, gets_after) = self.now();
        // The second INFO's own read.
        (reads_after - reads - 1, gets_after - gets)
    }
}

/// Round trips allowed for one pipeline of `N` misses: one, with room for
/// Redis reading a batch in two pieces; one GET at a time would be `N`.
const ONE_ROUND_TRIP: u64 = 3;

/// N missing keys GET in one RESP pipeline: N GETs in Redis, one round
/// trip, answers in order; with the cache off and on.
#[test]
fn resp_pipelined_misses_take_one_round_trip() {
    let redis = Redis::start();
    for i in 0..N {
        redis.set(format!("k{i}"), format!("v{i}"));
    }
    for capacity in ["0", "10000"] {
        let proxy = start(&redis, &[("CACHE_CAPACITY", capacity)]);
        let mut con = connect(&proxy);
        let _: Option<String> = redis::cmd("GET").arg("warm-up").query(&mut con).unwrap();
        let mut counts = Counts::new(&redis);
        let mut got: Vec<Option<String>> = Vec::new();
        let (reads, gets) = counts.during(|| {
            let mut pipe = redis::pipe();
            for i in 0..N {
                pipe.cmd("GET").arg(format!("k{i}"));
            }
            got = pipe.query(&mut con).expect("pipelined GETs");
        });
        let want: Vec<Option<String>> = (0..N).map(|i| Some(format!("v{i}"))).collect();
        assert_eq!(got, want, "capacity {capacity}");
        assert_eq!(gets, N as u64, "capacity {capacity}: one GET per key");
        assert!(
            reads <= ONE_ROUND_TRIP,
            "capacity {capacity}: {reads} round trips for {N} pipelined misses"
        );
    }
}

/// GETs and MGETs of one pipeline share the round trip; an MGET alone in
/// the pipeline's middle counts as one read of the run.
#[test]
fn resp_pipelined_gets_and_mgets_share_a_round_trip() {
    let redis = Redis::start();
    for i in 0..N {
        redis.set(format!("k{i}"), format!("v{i}"));
    }
    let proxy = start(&redis, &[("CACHE_CAPACITY", "0")]);
    let mut con = connect(&proxy);
    let _: Option<String> = redis::cmd("GET").arg("warm-up").query(&mut con).unwrap();
    let mut counts = Counts::new(&redis);
    let mut got: Vec<Value> = Vec::new();
    let (reads, gets) = counts.during(|| {
        let mut pipe = redis::pipe();
        for i in (0..N).step_by(2) {
            pipe.cmd("GET").arg(format!("k{i}"));
            pipe.cmd("MGET").arg(format!("k{}", i + 1)).arg("absent");
        }
        got = pipe.query(&mut con).expect("pipeline");
    });
    for (j, reply) in got.iter().enumerate() {
        let i = (j / 2) * 2;
        let want = if j % 2 == 0 {
            Value::BulkString(format!("v{i}").into_bytes())
        } else {
            Value::Array(vec![
                Value::BulkString(format!("v{}", i + 1).into_bytes()),
                Value::Nil,
            ])
        };
        assert_eq!(reply, &want, "reply {j}");
    }
    assert_eq!(gets, (N + N / 2) as u64);
    assert!(reads <= ONE_ROUND_TRIP, "{reads} round trips");
}

/// A write in a pipeline of reads is never overtaken: reads after a SET
/// see its value, reads before it the old one; other commands answer in
/// their place.
#[test]
fn resp_reads_are_not_moved_across_other_commands() {
    let redis = Redis::start();
    redis.set("a", "old");
    redis.set("b", "b");
    let proxy = start(
        &redis,
        &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_CAPACITY", "100")],
    );
    let mut con = connect(&proxy);
    let got: Vec<Value> = redis::pipe()
        .cmd("GET")
        .arg("a")
        .cmd("GET")
        .arg("b")
        .cmd("SET")
        .arg("a")
        .arg("new")
        .cmd("GET")
        .arg("a")
        .cmd("MGET")
        .arg("a")
        .arg("b")
        .cmd("PING")
        .cmd("GET")
        .arg("missing")
        .cmd("ECHO")
        .arg("e")
        .cmd("DEL")
        .arg("b")
        .cmd("GET")
        .arg("b")
        .cmd("GET")
        .arg("a")
        .query(&mut con)
        .expect("mixed pipeline");
    let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
    assert_eq!(
        got,
        vec![
            bulk("old"),
            bulk("b"),
            Value::Okay,
            bulk("new"),
            Value::Array(vec![bulk("new"), bulk("b")]),
            Value::SimpleString("PONG".into()),
            Value::Nil,
            bulk("e"),
            Value::Int(1),
            Value::Nil,
            bulk("new"),
        ]
    );
}

/// A MULTI pipelined with GETs before and inside it: the GETs before it
/// are one batch, the ones inside are queued (answered neither from the
/// cache nor from reads fetched ahead) and run in the EXEC block, after the
/// SET queued before them.
#[test]
fn resp_reads_inside_a_pipelined_multi_are_queued_not_prefetched() {
    let redis = Redis::start();
    redis.set("a", "old");
    redis.set("b", "b");
    let proxy = start(
        &redis,
        &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_CAPACITY", "100")],
    );
    let mut con = connect(&proxy);
    // Cache `a` first, so an answer from the cache inside the MULTI shows.
    let _: Value = redis::cmd("GET").arg("a").query(&mut con).unwrap();
    let got: Vec<Value> = redis::pipe()
        .cmd("GET")
        .arg("a")
        .cmd("GET")
        .arg("b")
        .cmd("MULTI")
        .cmd("SET")
        .arg("a")
        .arg("new")
        .cmd("GET")
        .arg("a")
        .cmd("GET")
        .arg("b")
        .cmd("EXEC")
        .cmd("GET")
        .arg("a")
        .query(&mut con)
        .expect("pipeline with a MULTI");
    let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
    let queued = || Value::SimpleString("QUEUED".into());
    assert_eq!(
        got,
        vec![
            bulk("old"),
            bulk("b"),
            Value::Okay,
            queued(),
            queued(),
            queued(),
            Value::Array(vec![Value::Okay, bulk("new"), bulk("b")]),
            bulk("new"),
        ]
    );
}

/// WRONGTYPE in the middle of a pipelined batch answers that GET with
/// Redis's error and reads as nil in an MGET; the keys around it answer.
#[test]
fn resp_wrong_type_in_a_batch_fails_only_its_command() {
    let redis = Redis::start();
    redis.set("a", "1");
    redis.set("b", "2");
    redis.rpush("list", "x");
    let proxy = start(&redis, &[]);
    let port = proxy.resp_port().unwrap();
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(DEADLINE)).unwrap();
    raw.write_all(b"GET a\r\nGET list\r\nGET b\r\nMGET a list b\r\nGET list\r\nPING\r\n")
        .unwrap();
    let want: &[u8] = b"$1\r\n1\r\n\
        -WRONGTYPE Operation against a key holding the wrong kind of value\r\n\
        $1\r\n2\r\n\
        *3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n\
        -WRONGTYPE Operation against a key holding the wrong kind of value\r\n\
        +PONG\r\n";
    let mut got = vec![0u8; want.len()];
    raw.read_exact(&mut got).expect("all replies");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

/// Reads one HTTP response: status code, `X-Cache` and body (none for
/// the answer to a HEAD).
fn read_response(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head_only: bool,
) -> (u16, String, Vec<u8>) {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let len: usize = match head_only {
                true => 0,
                false => header("content-length").parse().unwrap_or(0),
            };
            if pending.len() >= end + 4 + len {
                let code = head[9..12].parse().unwrap();
                let body = pending[end + 4..end + 4 + len].to_vec();
                let x_cache = header("x-cache");
                pending.drain(..end + 4 + len);
                return (code, x_cache, body);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).expect("read a response");
        assert!(n > 0, "connection closed mid-response");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// N missing keys GET in one HTTP pipeline (one write): one round trip,
/// answers in order, a HEAD and a 404 among them.
#[test]
fn http_pipelined_misses_take_one_round_trip() {
    let redis = Redis::start();
    for i in 0..N {
        redis.set(format!("k{i}"), format!("v{i}"));
    }
    let proxy = start(&redis, &[("CACHE_CAPACITY", "0")]);
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /warm-up HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut pending, false).0, 404);
    let mut counts = Counts::new(&redis);
    let (reads, gets) = counts.during(|| {
        let mut requests = Vec::new();
        for i in 0..N {
            let method = if i == 7 { "HEAD" } else { "GET" };
            requests.extend_from_slice(
                format!("{method} /k{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            );
        }
        requests.extend_from_slice(b"GET /absent HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(&requests).unwrap();
        for i in 0..N {
            let (code, x_cache, body) = read_response(&mut stream, &mut pending, i == 7);
            assert_eq!((code, x_cache.as_str()), (200, "MISS"), "request {i}");
            if i != 7 {
                assert_eq!(body, format!("v{i}").into_bytes(), "request {i}");
            }
        }
        assert_eq!(read_response(&mut stream, &mut pending, false).0, 404);
    });
    assert_eq!(gets, N as u64 + 1);
    assert!(reads <= ONE_ROUND_TRIP, "{reads} round trips");
}

/// An HTTP write in a pipeline of reads is never overtaken, and an
/// operations path answers in its place.
#[test]
fn http_reads_are_not_moved_across_writes() {
    let redis = Redis::start();
    redis.set("a", "old");
    let proxy = start(
        &redis,
        &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_CAPACITY", "100")],
    );
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nnew\
              GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    let mut pending = Vec::new();
    let mut next = || read_response(&mut stream, &mut pending, false);
    assert_eq!(next(), (200, "MISS".into(), b"old".to_vec()));
    assert_eq!(next(), (200, "MISS".into(), b"old".to_vec()), "collapsed");
    assert_eq!(next().0, 204);
    assert_eq!(next(), (200, "MISS".into(), b"new".to_vec()));
    assert_eq!(next().0, 200);
    assert_eq!(next(), (200, "HIT".into(), b"new".to_vec()));
}
