//! System tests of pipelined pass-through: a run of pass-through commands
//! in one RESP pipeline reaches Redis in one round trip, replies byte for
//! byte as Redis's own to the same pipeline, in order with the cached GETs
//! around it; a write in the run drops its keys before anything after it
//! is answered; an error or a refused command answers only its own place.
//!
//! Round trips are counted as in tests/batch.rs: Redis's
//! `total_reads_processed` goes up by one per read event, so one per round
//! trip the proxy makes (one worker, one Redis connection, opened first).

mod common;

use common::wire::{pack, show, Wire};
use common::{Proxy, Redis};

/// Commands per pipeline.
const N: usize = 40;
/// Room for Redis reading one batch in two pieces; one at a time is `N`.
const ONE_ROUND_TRIP: u64 = 3;

fn start(redis: &Redis, env: &[(&str, &str)]) -> Proxy {
    Proxy::builder()
        .redis(redis)
        .resp()
        .env("PROXY_WORKERS", "1")
        .envs(env)
        .start()
}

/// One numeric field of Redis's `INFO`.
fn info_u64(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in INFO"))
}

/// Read events Redis processed on other connections while `f` ran.
fn reads_during(redis: &Redis, f: impl FnOnce()) -> u64 {
    let mut con = redis.conn();
    let mut now = || {
        let info: String = redis::cmd("INFO").arg("stats").query(&mut con).unwrap();
        info_u64(&info, "total_reads_processed")
    };
    let before = now();
    f();
    // The second INFO's own read.
    now() - before - 1
}

/// The pipeline sent in one write; one reply frame each.
fn pipeline(wire: &mut Wire, commands: &[Vec<String>]) -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    for c in commands {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
        bytes.extend_from_slice(&pack(&args));
    }
    wire.send(&bytes);
    commands.iter().map(|_| wire.frame()).collect()
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Keys of every type, for reads that answer something.
fn fill(redis: &Redis) {
    for i in 0..N {
        redis.cmd(&[b"SET", format!("s{i}").as_bytes(), b"v"]);
        redis.cmd(&[b"HSET", format!("h{i}").as_bytes(), b"f", b"x", b"g", b"y"]);
        redis.cmd(&[b"RPUSH", format!("l{i}").as_bytes(), b"a", b"b", b"c"]);
    }
}

/// N pipelined reads of mixed kinds, absent keys and a WRONGTYPE among them.
fn reads() -> Vec<Vec<String>> {
    (0..N)
        .map(|i| match i % 5 {
            0 => cmd(&["EXISTS", &format!("s{i}"), "absent"]),
            1 => cmd(&["HGETALL", &format!("h{i}")]),
            2 => cmd(&["LRANGE", &format!("l{i}"), "0", "-1"]),
            3 => cmd(&["HGET", &format!("s{i}"), "f"]),
            _ => cmd(&["TTL", &format!("s{i}")]),
        })
        .collect()
}

/// N pipelined pass-through reads cost one round trip and reply exactly
/// what Redis replies to the same pipeline, RESP2 and RESP3.
#[test]
fn pipelined_reads_take_one_round_trip_and_match_redis() {
    let redis = Redis::start();
    fill(&redis);
    let proxy = start(&redis, &[]);
    let port = proxy.resp_port().unwrap();
    for resp3 in [false, true] {
        let mut direct = Wire::connect(redis.port());
        let mut proxied = Wire::connect(port);
        if resp3 {
            direct.hello3();
            proxied.hello3();
        }
        // Opens the backend connection (RESP3's on first use) first.
        assert_eq!(proxied.call(&["EXISTS", "warm-up"]), b":0\r\n");
        let want = pipeline(&mut direct, &reads());
        let mut got = Vec::new();
        let rounds = reads_during(&redis, || got = pipeline(&mut proxied, &reads()));
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(show(got), show(want), "reply {i}, RESP3 {resp3}");
        }
        assert!(
            rounds <= ONE_ROUND_TRIP,
            "RESP3 {resp3}: {rounds} round trips for {N} pipelined reads"
        );
    }
}

/// Cached GETs, reads, a write and a read of the written key in one
/// pipeline: answered in order, the read after the write sees it, and the
/// cached copy of the written key is dropped (the GET after it reads the
/// new value, where the cache held the old one).
#[test]
fn mixed_pipeline_keeps_order_and_drops_written_keys() {
    let redis = Redis::start();
    redis.set("a", "old");
    redis.set("b", "b");
    let proxy = start(
        &redis,
        &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_CAPACITY", "100")],
    );
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    // Cache `a` and `b`.
    wire.call(&["GET", "a"]);
    wire.call(&["GET", "b"]);
    let got = pipeline(
        &mut wire,
        &[
            cmd(&["GET", "a"]),
            cmd(&["GET", "b"]),
            cmd(&["STRLEN", "a"]),
            cmd(&["EXISTS", "a", "b"]),
            cmd(&["APPEND", "a", "-new"]),
            cmd(&["STRLEN", "a"]),
            cmd(&["GETRANGE", "a", "0", "-1"]),
            cmd(&["GET", "a"]),
            cmd(&["GET", "b"]),
            cmd(&["TYPE", "a"]),
        ],
    );
    let want: Vec<&[u8]> = vec![
        b"$3\r\nold\r\n",
        b"$1\r\nb\r\n",
        b":3\r\n",
        b":2\r\n",
        b":7\r\n",
        b":7\r\n",
        b"$7\r\nold-new\r\n",
        b"$7\r\nold-new\r\n",
        b"$1\r\nb\r\n",
        b"+string\r\n",
    ];
    let got: Vec<String> = got.iter().map(|r| show(r)).collect();
    let want: Vec<String> = want.iter().map(|r| show(r)).collect();
    // The GET of `a` after the APPEND answers "old-new": its cached "old"
    // was dropped before the GET ran.
    assert_eq!(got, want);
}

/// A write run of several keys drops each of them before the GETs after
/// it, in one round trip.
#[test]
fn pipelined_writes_drop_every_key_they_write() {
    let redis = Redis::start();
    let proxy = start(
        &redis,
        &[("PROXY_ALLOW_WRITES", "1"), ("CACHE_CAPACITY", "1000")],
    );
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    for i in 0..N {
        redis.set(format!("k{i}"), "old");
        wire.call(&["GET", &format!("k{i}")]);
    }
    let writes: Vec<Vec<String>> = (0..N)
        .map(|i| cmd(&["SET", &format!("k{i}"), "new"]))
        .collect();
    let mut got = Vec::new();
    let rounds = reads_during(&redis, || got = pipeline(&mut wire, &writes));
    assert!(got.iter().all(|r| r == b"+OK\r\n"), "{got:?}");
    assert!(
        rounds <= ONE_ROUND_TRIP,
        "{rounds} round trips for {N} SETs"
    );
    let gets: Vec<Vec<String>> = (0..N).map(|i| cmd(&["GET", &format!("k{i}")])).collect();
    for (i, reply) in pipeline(&mut wire, &gets).iter().enumerate() {
        assert_eq!(show(reply), show(b"$3\r\nnew\r\n"), "k{i}");
    }
}

/// WRONGTYPE, an unknown command, a refused command and a write with
/// writes off in the middle of a run answer only their own place; the
/// connection stays usable.
#[test]
fn errors_and_refusals_answer_only_their_command() {
    let redis = Redis::start();
    redis.set("s", "v");
    redis.rpush("l", "x");
    let proxy = start(&redis, &[]);
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    let got = pipeline(
        &mut wire,
        &[
            cmd(&["STRLEN", "s"]),
            cmd(&["LLEN", "s"]),
            cmd(&["LLEN", "l"]),
            cmd(&["SUBSCRIBE", "c"]),
            cmd(&["EXISTS", "s"]),
            cmd(&["SET", "s", "w"]),
            cmd(&["STRLEN", "s"]),
            cmd(&["NOSUCH", "x"]),
            cmd(&["TYPE", "l"]),
            cmd(&["TYPE", "s"]),
        ],
    );
    let want: Vec<&[u8]> = vec![
        b":1\r\n",
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        b":1\r\n",
        b"-ERR 'subscribe' is not supported by redis-proxy\r\n",
        b":1\r\n",
        b"-ERR write commands are disabled on this proxy (set PROXY_ALLOW_WRITES)\r\n",
        b":1\r\n",
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'x' \r\n",
        b"+list\r\n",
        b"+string\r\n",
    ];
    let got: Vec<String> = got.iter().map(|r| show(r)).collect();
    let want: Vec<String> = want.iter().map(|r| show(r)).collect();
    assert_eq!(got, want);
    assert_eq!(wire.call(&["GET", "s"]), b"$1\r\nv\r\n");
}

/// In a Redis Cluster: a pipeline of reads over keys of every master, a
/// run of one hash tag, a write and reads of it, and a keyless command in
/// the middle: each answered right, in its place.
#[test]
fn cluster_pipeline_answers_every_slot_in_order() {
    let cluster = common::cluster::Cluster::start(3, 0);
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    for k in &keys {
        cluster.set(k, format!("v-{k}"));
    }
    for i in 0..5 {
        cluster.set(format!("{{t}}:{i}"), "t");
    }
    let proxy = Proxy::builder()
        .redis_url(cluster.urls())
        .resp()
        .env("PROXY_ALLOW_WRITES", "1")
        .start();
    let mut wire = Wire::connect(proxy.resp_port().unwrap());
    let mut commands: Vec<Vec<String>> = Vec::new();
    let mut want: Vec<Vec<u8>> = Vec::new();
    for k in &keys {
        commands.push(cmd(&["STRLEN", k]));
        want.push(format!(":{}\r\n", k.len() + 2).into_bytes());
    }
    commands.push(cmd(&["DBSIZE"]));
    want.push(
        b"-ERR this command takes no key, so redis-proxy cannot route it in a Redis \
          Cluster; send it to a node directly\r\n"
            .to_vec(),
    );
    for i in 0..5 {
        commands.push(cmd(&["EXISTS", &format!("{{t}}:{i}")]));
        want.push(b":1\r\n".to_vec());
    }
    commands.push(cmd(&["SET", "{t}:0", "new"]));
    want.push(b"+OK\r\n".to_vec());
    commands.push(cmd(&["STRLEN", "{t}:0"]));
    want.push(b":3\r\n".to_vec());
    commands.push(cmd(&["GETRANGE", "{t}:0", "0", "-1"]));
    want.push(b"$3\r\nnew\r\n".to_vec());
    let got = pipeline(&mut wire, &commands);
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(show(got), show(want), "reply {i}: {:?}", commands[i]);
    }
}
