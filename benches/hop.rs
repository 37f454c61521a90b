//! The hop: GETs through the backend's pipelined connection to a real
//! loopback `redis-server`, in requests per CPU-second of this process (the
//! proxy's side of a miss, without HTTP or the cache), against a baseline in
//! the same run: the redis crate's own blocking connection sending the same
//! GETs as one `redis::pipe()` per round of N.
//!
//! Run: `cargo bench --bench hop` (about 1 minute; needs `redis-server` on
//! PATH). One may worker and one connection; `N` coroutines each loop on
//! `Backend::get` of one of 100 keys (100-byte values), so the I/O coroutine
//! batches up to N GETs per write. Criterion's time is process CPU time
//! (`getrusage`, user + system, every thread), so its "elem/s" reads as
//! requests per CPU-second: higher is cheaper.
//!
//! # Last figures
//! 2026-12-02 01:55 UTC, `nproc` = 2 (KVM guest, AMD EPYC, shared with other
//! builds: noisy). Requests per CPU-second, two alternating rounds of the
//! bench built on main's backend (a43dea9) and on this one:
//!
//! | N | main's backend | this backend | redis_rs_pipe (baseline) |
//! |--:|--:|--:|--:|
//! | 1 | 51-67k | 62-64k | 87k |
//! | 16 | 365-418k | 604-732k | 768k |
//! | 64 | 383-402k | 1.33-1.68M | 1.88M |
//!
//! At N = 1 a request is a round trip on its own and the cost is the
//! syscalls and the two coroutine wake-ups; with many requests waiting, the
//! batch amortises those and what is left per request is the hop itself.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use redis_proxy::backend::{Backend, BackendOptions, Redis};
use redis_proxy::config::RedisTarget;

const KEYS: usize = 100;

struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn redis_server() -> RedisServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-server on PATH");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    for line in out.lines() {
        if line.expect("redis-server log").contains("Ready to accept") {
            break;
        }
    }
    RedisServer { child, port }
}

fn key(i: usize) -> Vec<u8> {
    format!("key:{i}").into_bytes()
}

/// CPU time of this process, every thread, user + system.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn hop(c: &mut Criterion) {
    may::config().set_workers(1);
    let server = redis_server();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut direct = client.get_connection().expect("connect");
    for i in 0..KEYS {
        redis::cmd("SET")
            .arg(key(i))
            .arg(vec![b'v'; 100])
            .exec(&mut direct)
            .expect("SET");
    }
    let backend = Arc::new(Backend::start(BackendOptions {
        target: RedisTarget {
            host: "127.0.0.1".into(),
            port: server.port,
            db: 0,
            username: None,
            password: None,
            tls: None,
        },
        connections: 1,
        timeout: Duration::from_secs(1),
        freshness: None,
        master: None,
    }));
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..KEYS).map(key).collect());

    let mut group = c.benchmark_group("hop");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(4));
    for n in [1usize, 16, 64] {
        group.bench_with_input(BenchmarkId::new("backend_get", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let per = (iters as usize).div_ceil(n);
                let start = cpu_time();
                let handles: Vec<_> = (0..n)
                    .map(|c| {
                        let (backend, keys) = (backend.clone(), keys.clone());
                        // SAFETY: the closure blocks only in may-aware calls.
                        unsafe {
                            may::coroutine::spawn(move || {
                                for i in 0..per {
                                    let k = &keys[(c * 7 + i) % KEYS];
                                    let got = backend.get(k, 0).expect("GET");
                                    assert!(got.is_some());
                                }
                            })
                        }
                    })
                    .collect();
                for h in handles {
                    h.join().expect("join");
                }
                (cpu_time() - start).mul_f64(iters as f64 / (per * n) as f64)
            })
        });
        group.bench_with_input(BenchmarkId::new("redis_rs_pipe", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let rounds = (iters as usize).div_ceil(n);
                let start = cpu_time();
                for r in 0..rounds {
                    let mut pipe = redis::pipe();
                    for c in 0..n {
                        pipe.cmd("GET").arg(&keys[(c * 7 + r) % KEYS]);
                    }
                    let got: Vec<Vec<u8>> = pipe.query(&mut direct).expect("pipe");
                    assert_eq!(got.len(), n);
                }
                (cpu_time() - start).mul_f64(iters as f64 / (rounds * n) as f64)
            })
        });
    }
    group.finish();
    drop(server);
}

criterion_group!(benches, hop);
criterion_main!(benches);
