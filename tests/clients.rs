//! System tests with the clients people point at a Redis (DESIGN.md "Redis
//! protocol (RESP2 and RESP3)": a client pointed at `RESP_PORT` must just
//! work with its defaults): the `redis` crate in RESP2 and RESP3, redis-cli
//! `-2` and `-3`, and redis-benchmark, against the real binary and a real
//! redis-server. redis-py runs from `scripts/test-redis-py.sh` (make test).

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common::{metric, Proxy, Redis, DEADLINE};

fn start(redis: &Redis) -> (Proxy, u16) {
    let proxy = Proxy::builder()
        .redis(redis)
        .resp()
        .env("PROXY_ALLOW_WRITES", "1")
        .env("CACHE_TTL_MS", "600000")
        .start();
    let port = proxy.resp_port().unwrap();
    (proxy, port)
}

fn client(port: u16, query: &str) -> redis::Connection {
    let url = format!("redis://127.0.0.1:{port}/{query}");
    let con = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    con.set_read_timeout(Some(DEADLINE)).unwrap();
    con
}

/// The `redis` crate, RESP2 and RESP3: GET (cached), HGETALL as a map,
/// SCAN, a MULTI/EXEC pipeline and a plain pipeline, INFO.
#[test]
fn redis_crate_in_both_protocols() {
    let redis = Redis::start();
    redis.set("k", "v");
    let (proxy, port) = start(&redis);
    for query in ["", "?protocol=resp3"] {
        let mut con = client(port, query);
        let v: Option<String> = redis::cmd("GET").arg("k").query(&mut con).unwrap();
        assert_eq!(v.as_deref(), Some("v"), "{query}");
        let again: Option<String> = redis::cmd("GET").arg("k").query(&mut con).unwrap();
        assert_eq!(again, v, "a hit");
        let none: Option<String> = redis::cmd("GET").arg("absent").query(&mut con).unwrap();
        assert_eq!(none, None);
        redis::cmd("HSET")
            .arg("h")
            .arg("a")
            .arg("1")
            .arg("b")
            .arg("2")
            .exec(&mut con)
            .unwrap();
        let h: HashMap<String, String> = redis::cmd("HGETALL").arg("h").query(&mut con).unwrap();
        assert_eq!(h.len(), 2, "{query}");
        assert_eq!(h["b"], "2");
        let (cursor, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("COUNT")
            .arg(100)
            .query(&mut con)
            .unwrap();
        assert_eq!(cursor, 0);
        assert_eq!(keys.len(), 2, "{keys:?}");
        let (n, old): (i64, String) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("counter")
            .cmd("GETSET")
            .arg("k")
            .arg("w")
            .query(&mut con)
            .unwrap();
        assert!(n >= 1);
        assert_eq!(old, "v");
        let (v, len): (String, i64) = redis::pipe()
            .cmd("GET")
            .arg("k")
            .cmd("STRLEN")
            .arg("k")
            .query(&mut con)
            .unwrap();
        assert_eq!(
            (v.as_str(), len),
            ("w", 1),
            "the write dropped the cached k"
        );
        redis::cmd("SET").arg("k").arg("v").exec(&mut con).unwrap();
        let info: String = redis::cmd("INFO").query(&mut con).unwrap();
        assert!(info.contains("passthrough_commands_total:"), "{info}");
        redis::cmd("DEL")
            .arg("h")
            .arg("counter")
            .exec(&mut con)
            .unwrap();
    }
    assert!(metric(&proxy, "redis_proxy_cache_hits_total") >= 2);
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// redis-cli in RESP2 (`-2`) and RESP3 (`-3`): GET, HGETALL, a
/// passed-through TTL print what they print against Redis; INFO shows the
/// proxy's counters.
#[test]
fn redis_cli_in_both_protocols() {
    let redis = Redis::start();
    redis.set("k", "hello");
    let mut con = redis.conn();
    redis::cmd("HSET")
        .arg("h")
        .arg("field")
        .arg("value")
        .exec(&mut con)
        .unwrap();
    let (_proxy, port) = start(&redis);
    let ports = [port.to_string(), redis.port().to_string()];
    for proto in ["-2", "-3"] {
        let cli = |port: &str, args: &[&str]| {
            let mut all = vec![proto, "-h", "127.0.0.1", "-p", port];
            all.extend_from_slice(args);
            run("redis-cli", &all)
        };
        for args in [
            &["GET", "k"][..],
            &["GET", "k"],
            &["HGETALL", "h"],
            &["TTL", "k"],
            &["GET", "absent"],
            &["HGET", "k", "f"],
        ] {
            let (ok, out) = cli(&ports[0], args);
            assert!(ok, "{proto} {args:?}: {out:?}");
            assert_eq!(out, cli(&ports[1], args).1, "{proto} {args:?}");
        }
        let (ok, out) = cli(&ports[0], &["INFO"]);
        assert!(ok && out.contains("cache_hits_total:"), "{proto}: {out:?}");
    }
}

/// redis-benchmark's SET and GET run to completion against the proxy with
/// writes on, and the SETs reached Redis.
#[test]
fn redis_benchmark_get_and_set() {
    let redis = Redis::start();
    let (proxy, port) = start(&redis);
    let port = port.to_string();
    let args = "-h 127.0.0.1 -t get,set -n 1000 -c 10 -q";
    let mut args: Vec<&str> = args.split(' ').collect();
    args.extend(["-p", &port]);
    let (ok, out) = run("redis-benchmark", &args);
    assert!(
        ok,
        "{out}\nreaped: {}\nproxy log:\n{}",
        metric(&proxy, "redis_proxy_clients_reaped_total"),
        proxy.logs()
    );
    assert!(
        out.contains("SET:") && out.contains("GET:"),
        "both tests ran: {out}"
    );
    assert!(!out.contains("ERR"), "{out}");
    assert_eq!(
        redis.cmd(&[b"EXISTS", b"key:__rand_int__"]),
        redis::Value::Int(1)
    );
}
