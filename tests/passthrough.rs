//! System tests of the RESP pass-through (DESIGN.md "Redis protocol (RESP2
//! and RESP3)"): the real binary in front of a real redis-server. The core
//! test sends one list of commands to Redis directly and through the proxy,
//! in RESP2 and RESP3, and compares every reply byte for byte; the others
//! cover refusals, the write gate, MULTI/EXEC, ordering against cached GETs,
//! the cache after writes, and COMMAND.

mod common;

use common::wire::{show, Wire};
use common::{metric, poll_until, Proxy, Redis};

/// Every data type, TTLs, SCAN, OBJECT, DUMP and errors (WRONGTYPE, wrong
/// arity, unknown command and subcommand); writes included.
const SCRIPT: &[&[&str]] = &[
    &["SET", "s", "hello"],
    &["GET", "s"],
    &["APPEND", "s", " world"],
    &["GET", "s"],
    &["STRLEN", "s"],
    &["GETRANGE", "s", "0", "4"],
    &["SETRANGE", "s", "0", "J"],
    &["GET", "s"],
    &["INCR", "n"],
    &["INCRBY", "n", "10"],
    &["DECR", "n"],
    &["GET", "n"],
    &["MSET", "a", "1", "b", "2"],
    &["MGET", "a", "b", "nokey"],
    &["EXISTS", "a", "b", "nokey"],
    &["TYPE", "s"],
    &["HSET", "h", "f1", "v1", "f2", "v2"],
    &["HGET", "h", "f1"],
    &["HGETALL", "h"],
    &["HMGET", "h", "f1", "nofield"],
    &["HLEN", "h"],
    &["HEXISTS", "h", "f2"],
    &["HKEYS", "h"],
    &["HVALS", "h"],
    &["HINCRBY", "h", "count", "5"],
    &["RPUSH", "l", "a", "b", "c", "d"],
    &["LPUSH", "l", "z"],
    &["LRANGE", "l", "0", "-1"],
    &["LLEN", "l"],
    &["LINDEX", "l", "2"],
    &["LPOS", "l", "c"],
    &["LPOP", "l"],
    &["SORT_RO", "l", "ALPHA"],
    &["SADD", "st", "x", "y", "z"],
    &["SMEMBERS", "st"],
    &["SISMEMBER", "st", "x"],
    &["SCARD", "st"],
    &["ZADD", "z", "1", "one", "2", "two", "3.5", "three"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["ZSCORE", "z", "three"],
    &["ZRANK", "z", "three"],
    &["ZCARD", "z"],
    &["ZRANGEBYSCORE", "z", "1", "2"],
    &["XADD", "x", "1-1", "f", "v"],
    &["XADD", "x", "2-1", "f", "w"],
    &["XRANGE", "x", "-", "+"],
    &["XLEN", "x"],
    &["XREAD", "COUNT", "10", "STREAMS", "x", "0"],
    &["XINFO", "STREAM", "x"],
    &["SETBIT", "bits", "7", "1"],
    &["GETBIT", "bits", "7"],
    &["BITCOUNT", "bits"],
    &["BITPOS", "bits", "1"],
    &["PFADD", "hll", "a", "b", "c"],
    &["PFCOUNT", "hll"],
    &[
        "GEOADD",
        "g",
        "13.361389",
        "38.115556",
        "Palermo",
        "15.087269",
        "37.502669",
        "Catania",
    ],
    &["GEODIST", "g", "Palermo", "Catania", "km"],
    &["GEOPOS", "g", "Palermo", "nowhere"],
    &["EXPIRE", "s", "1000"],
    &["TTL", "s"],
    &["PERSIST", "s"],
    &["TTL", "s"],
    &["TTL", "nokey"],
    &["EXPIRETIME", "nokey"],
    &["SCAN", "0", "COUNT", "1000"],
    &["HSCAN", "h", "0"],
    &["SSCAN", "st", "0"],
    &["ZSCAN", "z", "0"],
    &["OBJECT", "ENCODING", "h"],
    &["OBJECT", "NOSUCH"],
    &["DUMP", "s"],
    &["DBSIZE"],
    &["EVAL_RO", "return ARGV[1]", "0", "hi"],
    &["LPUSH", "s", "x"],
    &["HGET", "s", "f"],
    &["HGET", "h"],
    &["GET"],
    &["NOSUCHCOMMAND", "a", "b"],
    &["PING"],
    &["ECHO", "hi"],
    &["DEL", "a", "b", "nokey"],
    &["GET", "a"],
    &["FLUSHDB"],
    &["GET", "s"],
    &["DBSIZE"],
];

/// Runs [`SCRIPT`] on a fresh db behind `port` and returns every reply.
fn run_script(port: u16, resp3: bool) -> Vec<Vec<u8>> {
    let mut wire = Wire::connect(port);
    if resp3 {
        wire.hello3();
    }
    assert_eq!(wire.call(&["FLUSHDB"]), b"+OK\r\n");
    SCRIPT.iter().map(|args| wire.call(args)).collect()
}

fn writes_on(redis: &Redis) -> (Proxy, u16) {
    let proxy = Proxy::builder()
        .redis(redis)
        .resp()
        .env("PROXY_ALLOW_WRITES", "1")
        .start();
    let port = proxy.resp_port().unwrap();
    (proxy, port)
}

/// The same 80-odd commands, sent to Redis and through the proxy, get the
/// same reply bytes, in RESP2 and in RESP3.
#[test]
fn replies_match_redis_byte_for_byte_in_both_protocols() {
    assert!(SCRIPT.len() >= 40);
    let redis = Redis::start();
    let (proxy, port) = writes_on(&redis);
    for resp3 in [false, true] {
        let direct = run_script(redis.port(), resp3);
        let proxied = run_script(port, resp3);
        for ((args, want), got) in SCRIPT.iter().zip(&direct).zip(&proxied) {
            assert_eq!(
                show(got),
                show(want),
                "{args:?} in RESP{}",
                if resp3 { 3 } else { 2 }
            );
        }
    }
    assert!(metric(&proxy, "redis_proxy_passthrough_commands_total") > 100);
}

/// The contract's refusals answer `-ERR '<name>' is not supported by
/// redis-proxy`, reach no Redis, and leave the connection usable.
#[test]
fn refused_commands_keep_the_connection_usable() {
    let redis = Redis::start();
    let (_proxy, port) = writes_on(&redis);
    let mut wire = Wire::connect(port);
    let refusals: &[(&[&str], &str)] = &[
        (&["WATCH", "k"], "watch"),
        (&["UNWATCH"], "unwatch"),
        (&["SUBSCRIBE", "c"], "subscribe"),
        (&["PSUBSCRIBE", "c*"], "psubscribe"),
        (&["SSUBSCRIBE", "c"], "ssubscribe"),
        (&["MONITOR"], "monitor"),
        (&["BLPOP", "l", "0"], "blpop"),
        (&["BRPOPLPUSH", "a", "b", "0"], "brpoplpush"),
        (&["XREAD", "BLOCK", "0", "STREAMS", "x", "$"], "xread"),
        (&["CLIENT", "KILL", "ID", "1"], "client|kill"),
        (&["CLIENT", "LIST"], "client|list"),
        (&["SELECT", "1"], "select"),
        (&["AUTH", "pw"], "auth"),
        (&["HELLO", "3", "AUTH", "default", "pw"], "auth"),
        (&["CONFIG", "SET", "maxmemory", "1"], "config|set"),
        (&["DEBUG", "SLEEP", "0"], "debug"),
        (&["SHUTDOWN"], "shutdown"),
        (&["REPLICAOF", "NO", "ONE"], "replicaof"),
        (&["TIME"], "time"),
    ];
    for (args, name) in refusals {
        let want = format!("-ERR '{name}' is not supported by redis-proxy\r\n");
        assert_eq!(show(&wire.call(args)), show(want.as_bytes()), "{args:?}");
        assert_eq!(wire.call(&["PING"]), b"+PONG\r\n", "after {args:?}");
    }
    // PUBLISH counts as a write: passed through with writes on.
    assert_eq!(wire.call(&["PUBLISH", "c", "m"]), b":0\r\n");
    assert_eq!(
        redis.cmd(&[b"CONFIG", b"GET", b"maxmemory"]),
        redis::Value::Array(vec![
            redis::Value::BulkString(b"maxmemory".to_vec()),
            redis::Value::BulkString(b"0".to_vec())
        ]),
        "CONFIG SET never reached Redis"
    );
}

/// Writes off (the default): every write, FLUSHALL and scripts included,
/// gets the writes-disabled error and Redis is unchanged; reads still pass.
#[test]
fn writes_off_refuse_every_write_and_send_nothing() {
    let redis = Redis::start();
    redis.set("k", "v");
    let proxy = Proxy::builder().redis(&redis).resp().start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    let want = "-ERR write commands are disabled on this proxy (set PROXY_ALLOW_WRITES)\r\n";
    for args in [
        &["SET", "k", "x"][..],
        &["DEL", "k"],
        &["HSET", "h", "f", "v"],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["EXPIRE", "k", "1"],
        &["EVAL", "redis.call('SET', KEYS[1], 'x')", "1", "k"],
        &["PUBLISH", "c", "m"],
        &["XREADGROUP", "GROUP", "g", "c", "STREAMS", "x", ">"],
    ] {
        assert_eq!(show(&wire.call(args)), show(want.as_bytes()), "{args:?}");
    }
    assert_eq!(wire.call(&["EXISTS", "k"]), b":1\r\n");
    assert_eq!(wire.call(&["TTL", "k"]), b":-1\r\n");
    assert_eq!(wire.call(&["DBSIZE"]), b":1\r\n");
    // Inside MULTI a disabled write fails the transaction.
    assert_eq!(wire.call(&["MULTI"]), b"+OK\r\n");
    assert_eq!(show(&wire.call(&["SET", "k", "x"])), show(want.as_bytes()));
    assert_eq!(
        wire.call(&["EXEC"]),
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(
        redis.cmd(&[b"GET", b"k"]),
        redis::Value::BulkString(b"v".to_vec())
    );
}

/// MULTI ... EXEC, DISCARD, EXECABORT, nested MULTI, EXEC and DISCARD
/// without MULTI: the same bytes as Redis, in both protocols.
#[test]
fn transactions_match_redis() {
    let redis = Redis::start();
    let (_proxy, port) = writes_on(&redis);
    let script: &[&[&str]] = &[
        &["MULTI"],
        &["SET", "t", "1"],
        &["INCR", "t"],
        &["GET", "t"],
        &["HSET", "th", "a", "1"],
        &["HGETALL", "th"],
        &["LPUSH", "t", "x"],
        &["PING"],
        &["EXEC"],
        &["GET", "t"],
        &["MULTI"],
        &["MULTI"],
        &["INCR", "t"],
        &["DISCARD"],
        &["GET", "t"],
        &["EXEC"],
        &["DISCARD"],
        &["MULTI"],
        &["NOSUCH", "x"],
        &["INCR", "t"],
        &["EXEC"],
        &["MULTI"],
        &["GET"],
        &["EXEC"],
        &["MULTI"],
        &["EXEC"],
        &["GET", "t"],
    ];
    for resp3 in [false, true] {
        let mut replies = Vec::new();
        for target in [redis.port(), port] {
            let mut wire = Wire::connect(target);
            if resp3 {
                wire.hello3();
            }
            assert_eq!(wire.call(&["DEL", "t", "th"]).first(), Some(&b':'));
            replies.push(script.iter().map(|a| wire.call(a)).collect::<Vec<_>>());
        }
        for ((args, want), got) in script.iter().zip(&replies[0]).zip(&replies[1]) {
            assert_eq!(show(got), show(want), "{args:?} resp3={resp3}");
        }
    }
}

/// GETs inside MULTI read Redis, not the cache; the written keys are
/// dropped from the cache after EXEC.
#[test]
fn transactions_bypass_and_drop_the_cache() {
    let redis = Redis::start();
    redis.set("k", "old");
    let (_proxy, port) = writes_on(&redis);
    let mut wire = Wire::connect(port);
    assert_eq!(wire.call(&["GET", "k"]), b"$3\r\nold\r\n");
    redis.set("k", "new");
    assert_eq!(wire.call(&["GET", "k"]), b"$3\r\nold\r\n", "cached");
    let replies = wire.pipeline(&[vec!["MULTI"], vec!["GET", "k"], vec!["EXEC"]]);
    assert_eq!(replies[2], b"*1\r\n$3\r\nnew\r\n");
    assert_eq!(
        wire.call(&["GET", "k"]),
        b"$3\r\nold\r\n",
        "a read drops nothing"
    );
    let replies = wire.pipeline(&[vec!["MULTI"], vec!["APPEND", "k", "!"], vec!["EXEC"]]);
    assert_eq!(replies[2], b"*1\r\n:4\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$4\r\nnew!\r\n");
}

/// Cached GETs and pass-through commands pipelined in one write are
/// answered in order, with the same bytes Redis gives, and the GETs hit.
#[test]
fn cached_gets_and_passthrough_keep_their_order() {
    let redis = Redis::start();
    redis.set("a", "1");
    redis.set("b", "22");
    redis.rpush("l", "x");
    let proxy = Proxy::builder()
        .redis(&redis)
        .resp()
        .env("CACHE_TTL_MS", "600000")
        .start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    wire.call(&["MGET", "a", "b"]);
    let hits = metric(&proxy, "redis_proxy_cache_hits_total");
    let pipeline: Vec<Vec<&str>> = vec![
        vec!["GET", "a"],
        vec!["EXISTS", "a", "b", "c"],
        vec!["GET", "b"],
        vec!["STRLEN", "b"],
        vec!["LRANGE", "l", "0", "-1"],
        vec!["GET", "a"],
        vec!["TYPE", "l"],
        vec!["MGET", "a", "b"],
        vec!["GET", "l"],
        vec!["DBSIZE"],
        vec!["GET", "b"],
    ];
    let got = wire.pipeline(&pipeline);
    let want = Wire::connect(redis.port()).pipeline(&pipeline);
    for ((args, want), got) in pipeline.iter().zip(&want).zip(&got) {
        assert_eq!(show(got), show(want), "{args:?}");
    }
    assert_eq!(metric(&proxy, "redis_proxy_cache_hits_total") - hits, 6);
}

/// A write through the proxy drops the key: the next GET reads the new
/// value; DEL and FLUSHDB too.
#[test]
fn writes_drop_cached_keys() {
    let redis = Redis::start();
    redis.set("k", "v1");
    let (_proxy, port) = writes_on(&redis);
    let mut wire = Wire::connect(port);
    assert_eq!(wire.call(&["GET", "k"]), b"$2\r\nv1\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$2\r\nv1\r\n");
    assert_eq!(wire.call(&["SET", "k", "v2"]), b"+OK\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$2\r\nv2\r\n");
    assert_eq!(wire.call(&["APPEND", "k", "x"]), b":3\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$3\r\nv2x\r\n");
    assert_eq!(wire.call(&["RENAME", "k", "k2"]), b"+OK\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$-1\r\n");
    assert_eq!(wire.call(&["GET", "k2"]), b"$3\r\nv2x\r\n");
    assert_eq!(wire.call(&["MSET", "k2", "m", "k3", "n"]), b"+OK\r\n");
    assert_eq!(wire.call(&["GET", "k2"]), b"$1\r\nm\r\n");
    assert_eq!(wire.call(&["GET", "k3"]), b"$1\r\nn\r\n");
    assert_eq!(wire.call(&["FLUSHDB"]), b"+OK\r\n");
    assert_eq!(wire.call(&["GET", "k3"]), b"$-1\r\n");
    // The old RESP SET options still work, now passed through.
    assert_eq!(wire.call(&["SET", "k", "a", "NX"]), b"+OK\r\n");
    assert_eq!(wire.call(&["SET", "k", "b", "NX"]), b"$-1\r\n");
    assert_eq!(wire.call(&["SET", "k", "c", "GET"]), b"$1\r\na\r\n");
    assert_eq!(wire.call(&["GET", "k"]), b"$1\r\nc\r\n");
}

/// Redis down at start: commands the proxy does not serve itself answer
/// `-ERR redis unavailable`; once Redis is up they pass through.
#[test]
fn redis_down_at_start_then_up() {
    let mut redis = Redis::start();
    redis.stop();
    let proxy = Proxy::builder().redis(&redis).resp().start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    assert_eq!(wire.call(&["EXISTS", "k"]), b"-ERR redis unavailable\r\n");
    assert_eq!(wire.call(&["PING"]), b"+PONG\r\n");
    redis.restart_same_port();
    redis.set("k", "v");
    poll_until("EXISTS passed through", || {
        (wire.call(&["EXISTS", "k"]) == b":1\r\n").then_some(())
    });
}

/// COMMAND lists what is served: reads and (with writes on) writes, never
/// refused commands; COUNT, LIST, INFO, DOCS and GETKEYS agree, and GETKEYS
/// finds the keys Redis's own GETKEYS finds.
#[test]
fn command_answers_what_is_served() {
    let redis = Redis::start();
    let (_writes, port) = writes_on(&redis);
    let reads = Proxy::builder().redis(&redis).resp().start();
    let names = |port: u16| -> Vec<String> {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let list: Vec<String> = redis::cmd("COMMAND").arg("LIST").query(&mut con).unwrap();
        let count: usize = redis::cmd("COMMAND").arg("COUNT").query(&mut con).unwrap();
        assert_eq!(count, list.len());
        list
    };
    let with_writes = names(port);
    let read_only = names(reads.resp_port().unwrap());
    for name in ["get", "mget", "hgetall", "exists", "scan", "ping", "multi"] {
        assert!(read_only.iter().any(|n| n == name), "{name}");
    }
    for name in ["set", "del", "flushdb", "hset"] {
        assert!(with_writes.iter().any(|n| n == name), "{name} with writes");
        assert!(
            !read_only.iter().any(|n| n == name),
            "{name} without writes"
        );
    }
    for name in ["config", "blpop", "subscribe", "watch", "monitor", "debug"] {
        assert!(!with_writes.iter().any(|n| n == name), "{name} listed");
    }
    let mut proxy = Wire::connect(port);
    let mut direct = Wire::connect(redis.port());
    for args in [
        &["COMMAND", "INFO", "hgetall", "get"][..],
        &["COMMAND", "DOCS", "hgetall"],
        &[
            "COMMAND", "GETKEYS", "XREAD", "COUNT", "1", "STREAMS", "a", "b", "0", "0",
        ],
        &["COMMAND", "GETKEYS", "ZUNIONSTORE", "d", "2", "x", "y"],
        &["COMMAND", "GETKEYS", "SORT", "l", "STORE", "dst"],
    ] {
        assert_eq!(
            show(&proxy.call(args)),
            show(&direct.call(args)),
            "{args:?}"
        );
    }
    assert_eq!(proxy.call(&["COMMAND", "INFO", "config"]), b"*1\r\n$-1\r\n");
    assert_eq!(
        proxy.call(&["COMMAND", "GETKEYS", "BLPOP", "l", "0"]),
        b"-ERR Invalid command specified\r\n"
    );
}

/// INFO shows passthrough_commands_total, and it counts relayed commands;
/// their answers count in requests_total by kind (ok, nil, error).
#[test]
fn passthrough_counter_moves() {
    let redis = Redis::start();
    redis.set("s", "v");
    let proxy = Proxy::builder().redis(&redis).resp().start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    let before = metric(&proxy, "redis_proxy_passthrough_commands_total");
    let series = |status: &str| {
        format!("redis_proxy_requests_total{{frontend=\"resp\",status=\"{status}\"}}")
    };
    let counts = || -> Vec<u64> {
        ["ok", "nil", "error"]
            .iter()
            .map(|s| metric(&proxy, &series(s)))
            .collect()
    };
    let start = counts();
    wire.call(&["EXISTS", "a"]);
    wire.call(&["HGET", "absent", "f"]);
    wire.call(&["HGET", "s", "f"]);
    // Counted once the batch's reply is written: poll.
    poll_until("ok, nil and error counted", || {
        let end = counts();
        (end[0] - start[0], end[1] - start[1], end[2] - start[2])
            .eq(&(1, 1, 1))
            .then_some(())
    });
    wire.call(&["TTL", "a"]);
    wire.call(&["GET", "a"]);
    assert_eq!(
        metric(&proxy, "redis_proxy_passthrough_commands_total") - before,
        4
    );
    let info = wire.call(&["INFO"]);
    assert!(
        String::from_utf8_lossy(&info).contains("passthrough_commands_total:4"),
        "{}",
        show(&info)
    );
}

/// A redis-server this test runs itself (the harness's keeps its
/// arguments across restarts); killed on drop.
struct OwnRedis(std::process::Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// After a data reconnect the proxy learns Redis's command table again:
/// Redis restarted without DBSIZE (renamed away) is no longer listed.
#[test]
fn command_table_is_learned_again_after_a_reconnect() {
    let mut redis = Redis::start();
    let proxy = Proxy::builder().redis(&redis).resp().start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    assert!(wire
        .call(&["COMMAND", "INFO", "dbsize"])
        .starts_with(b"*1\r\n*"));
    // Opens the data connection the restart will break.
    assert_eq!(wire.call(&["DBSIZE"]), b":0\r\n");
    let port = redis.port().to_string();
    redis.stop();
    let dir = std::env::temp_dir().to_string_lossy().into_owned();
    let dbfilename = format!("redis-proxy-test-{port}-renamed.rdb");
    let _renamed = OwnRedis(
        std::process::Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir])
            .args(["--dbfilename", &dbfilename, "--appendonly", "no"])
            .args(["--rename-command", "DBSIZE", "", "--save", ""])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server"),
    );
    poll_until("DBSIZE gone from COMMAND INFO", || {
        // A pass-through notices the lost link and reconnects.
        wire.call(&["EXISTS", "k"]);
        (wire.call(&["COMMAND", "INFO", "dbsize"]) == b"*1\r\n$-1\r\n").then_some(())
    });
}
