//! Shared helpers for the system tests: a real `redis-server` and the real
//! `redis-proxy` binary, each on a free loopback port and killed on drop, and
//! a small raw HTTP/1.1 client that shows exact statuses, headers and bytes
//! (and tells a whole response from a cut or garbled one), and the one
//! reader of `/-/metrics` samples.
//!
//! Nothing here mocks anything. Anything that waits polls with a deadline
//! ([`DEADLINE`]) and then fails; no helper asserts on how long something took.
//!
//! Every test file includes this module with `mod common;` and uses only part
//! of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod sentinel;
pub mod tls;
pub mod wire;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any helper (or test) waits for something before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Pause between two polls.
pub const POLL: Duration = Duration::from_millis(20);

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_redis-proxy");

/// Ports handed out by [`free_port`] in this test process. Never handing one
/// out twice matters: the proxy binds with SO_REUSEPORT, so two proxies given
/// the same port would both start and silently share the traffic.
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Lowest port [`free_port`] picks from when it can stay below the kernel's
/// ephemeral range.
const LOW_PORT: u16 = 20_000;

/// A loopback port nothing listens on now and that no other test in this
/// process was given: bind it, note it, drop the listener.
///
/// Ports come from below the kernel's ephemeral range when there is room
/// (else from `bind(0)`): an outgoing connection can then never take a
/// listener's port while it is free, as when the proxy keeps reconnecting to
/// a stopped Redis and, with source port = destination port, connects to
/// itself and keeps the port the restarted Redis needs.
pub fn free_port() -> u16 {
    let mut used = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    let bind = |port: u16| {
        TcpListener::bind(("127.0.0.1", port))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    };
    if let Some(high) = ephemeral_low().filter(|&p| p > LOW_PORT + 1000) {
        let span = u64::from(high - LOW_PORT);
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        for _ in 0..1000 {
            // xorshift64: enough to spread concurrent test processes apart.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let port = LOW_PORT + (seed % span) as u16;
            if !used.contains(&port) && bind(port).is_ok() {
                used.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = bind(0).expect("bind 127.0.0.1:0");
        if used.insert(port) {
            return port;
        }
    }
}

/// The first port of the kernel's ephemeral range, if known.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Polls `f` every [`POLL`] until it returns `Some`, or panics after
/// [`DEADLINE`] naming `what`.
pub fn poll_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    poll_for(DEADLINE, what, &mut f)
}

/// [`poll_until`] with an explicit deadline.
pub fn poll_for<T>(deadline: Duration, what: &str, f: &mut impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            panic!("gave up after {deadline:?} waiting for: {what}");
        }
        thread::sleep(POLL);
    }
}

/// Collects a child's output on a thread, so a pipe never fills and the
/// text is there for failure messages.
#[derive(Clone, Default)]
struct Drain {
    text: Arc<Mutex<Vec<u8>>>,
    /// Set once the pipe reached EOF (the child and its copies of it are gone).
    done: Arc<AtomicBool>,
}

impl Drain {
    fn spawn(mut from: impl Read + Send + 'static) -> Drain {
        let drain = Drain::default();
        let (sink, done) = (drain.text.clone(), drain.done.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
            done.store(true, Ordering::SeqCst);
        });
        drain
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The whole output, once the pipe is closed (the child has exited).
    fn finish(&self) -> String {
        poll_until("a child's output pipe to close", || {
            self.done.load(Ordering::SeqCst).then_some(())
        });
        self.text()
    }
}

// ---------------------------------------------------------------------------
// Redis

/// A `redis-server` of our own on a free loopback port, with persistence
/// off; killed on drop.
pub struct Redis {
    port: u16,
    child: Option<Child>,
    /// Extra command-line arguments, kept for [`Redis::restart_same_port`].
    args: Vec<String>,
}

impl Redis {
    /// Starts a redis-server and waits until it answers PING.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// [`Redis::start`] with extra redis-server arguments, e.g.
    /// `["--enable-debug-command", "local"]` for `DEBUG SLEEP`.
    pub fn start_with(args: &[&str]) -> Redis {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut last = String::new();
        // A port picked by `free_port` can still be taken by someone else
        // before redis binds it: try a few.
        for _ in 0..3 {
            let port = free_port();
            match Self::spawn(port, &args) {
                Ok(child) => {
                    return Redis {
                        port,
                        child: Some(child),
                        args,
                    }
                }
                Err(e) => last = e,
            }
        }
        panic!("cannot start redis-server: {last}");
    }

    fn spawn(port: u16, args: &[String]) -> Result<Child, String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            // Never load a dump.rdb another process left in the temp dir.
            .args(["--dbfilename", &format!("redis-proxy-test-{port}.rdb")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let out = Drain::spawn(child.stdout.take().expect("piped stdout"));
        Drain::spawn(child.stderr.take().expect("piped stderr"));
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {port} exited ({status}): {}",
                    out.text()
                ));
            }
            if ping(port) {
                return Ok(child);
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server on port {port} never answered PING"));
            }
            thread::sleep(POLL);
        }
    }

    /// The port it listens on (kept across [`Redis::restart_same_port`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A fresh direct connection (the redis crate's sync client).
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connect to redis at {}: {e}", self.url()))
    }

    /// Runs one command directly against Redis and returns its reply.
    pub fn cmd(&self, args: &[&[u8]]) -> redis::Value {
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.conn())
            .unwrap_or_else(|e| panic!("redis {:?}: {e}", String::from_utf8_lossy(args[0])))
    }

    /// `SET key value` directly in Redis.
    pub fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        redis::cmd("SET")
            .arg(key.as_ref())
            .arg(value.as_ref())
            .exec(&mut self.conn())
            .expect("redis SET");
    }

    /// `DEL key` directly in Redis.
    pub fn del(&self, key: impl AsRef<[u8]>) {
        redis::cmd("DEL")
            .arg(key.as_ref())
            .exec(&mut self.conn())
            .expect("redis DEL");
    }

    /// `RPUSH key value`: makes `key` a list (for WRONGTYPE).
    pub fn rpush(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        redis::cmd("RPUSH")
            .arg(key.as_ref())
            .arg(value.as_ref())
            .exec(&mut self.conn())
            .expect("redis RPUSH");
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends signal `sig` to the server, e.g. `SIGSTOP` to stall it and
    /// `SIGCONT` to resume it (a stalled server is still killed on drop).
    pub fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("redis-server is running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory effects. The pid is still our
        // child's: only `stop` and `drop` reap it, and they take `child`
        // out first, so a pid we hold cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill(redis-server {pid}, {sig})");
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port;
        poll_until("stopped redis to refuse connections", || {
            TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        });
    }

    /// Starts a new, empty server on the same port (after [`Redis::stop`]).
    pub fn restart_same_port(&mut self) {
        self.stop();
        let child = Self::spawn(self.port, &self.args)
            .unwrap_or_else(|e| panic!("restart redis-server on the same port: {e}"));
        self.child = Some(child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether something on `port` answers a RESP PING with `+PONG`.
pub fn ping(port: u16) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf)?;
        Ok(&buf == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

// ---------------------------------------------------------------------------
// The proxy binary

/// A running `redis-proxy` process; killed on drop.
pub struct Proxy {
    child: Child,
    port: u16,
    resp_port: Option<u16>,
    stderr: Drain,
}

/// How to start (or merely run) the binary. Always sets `PROXY_PORT` to a
/// free port and `REDIS_URL` (default: a port nothing listens on), after
/// removing every variable the binary reads from the inherited environment.
pub struct ProxyBuilder {
    redis_url: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    resp: bool,
}

/// How a run of the binary ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    /// The non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl Proxy {
    /// Starts the proxy in front of `redis` with extra environment variables,
    /// and waits until `GET /-/healthy` answers 200.
    pub fn start(redis: &Redis, env: &[(&str, &str)]) -> Proxy {
        Proxy::builder().redis(redis).envs(env).start()
    }

    /// [`Proxy::start`] with command-line flags too.
    pub fn start_with_args(redis: &Redis, env: &[(&str, &str)], args: &[&str]) -> Proxy {
        Proxy::builder().redis(redis).envs(env).args(args).start()
    }

    /// A builder for anything else (no Redis, RESP port, running to exit).
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder {
            // Port 1 on loopback: nothing listens there, connects are refused.
            redis_url: "redis://127.0.0.1:1/0".into(),
            env: Vec::new(),
            args: Vec::new(),
            resp: false,
        }
    }

    /// The HTTP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The RESP port, when started with [`ProxyBuilder::resp`].
    pub fn resp_port(&self) -> Option<u16> {
        self.resp_port
    }

    /// A new keep-alive HTTP connection to the proxy.
    pub fn http(&self) -> Http {
        Http::connect(self.port)
    }

    /// `GET target` on a new connection.
    pub fn get(&self, target: &str) -> Response {
        self.http().get(target)
    }

    /// What the proxy wrote to stderr so far (its log), for failure messages.
    pub fn logs(&self) -> String {
        self.stderr.text()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends signal `sig` (e.g. `SIGTERM`) to the running process.
    pub fn signal(&mut self, sig: libc::c_int) {
        assert!(
            self.is_running(),
            "redis-proxy exited before signal {sig}; stderr:\n{}",
            self.logs()
        );
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) has no memory effects. `try_wait` just found the
        // child running, so it is unreaped and the pid is still its own.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill(redis-proxy {pid}, {sig})");
    }

    /// Waits up to `deadline` for the process to exit; its status, or
    /// `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// `VmRSS` and `VmHWM` from /proc, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The process is still running and serves `/-/healthy` on a new connection.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        assert!(
            self.is_running(),
            "the proxy exited; stderr:\n{}",
            self.logs()
        );
        let r = self.get("/-/healthy");
        assert_eq!(r.status, 200, "{r:?}");
    }

    /// [`Proxy::assert_alive`], and `GET /key` on a new connection answers
    /// 200 with `value`.
    #[track_caller]
    pub fn assert_serves(&mut self, key: &str, value: &[u8]) {
        self.assert_alive();
        let r = self.get(&format!("/{key}"));
        assert_eq!((r.status, r.body.as_slice()), (200, value), "{r:?}");
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// The value of one sample in a Prometheus text: `series` is the whole name
/// with its labels as rendered, e.g. `redis_proxy_clients_reaped_total` or
/// `redis_proxy_response_bytes_total{frontend="http"}`.
pub fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The value of one sample of `GET /-/metrics` (see [`sample`]); panics,
/// showing the exposition, if it is missing.
#[track_caller]
pub fn metric(proxy: &Proxy, series: &str) -> u64 {
    let r = proxy.get("/-/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.text();
    sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in /-/metrics:\n{text}"))
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyBuilder {
    /// Points the proxy at `redis`.
    pub fn redis(self, redis: &Redis) -> Self {
        self.redis_url(redis.url())
    }

    /// Sets `REDIS_URL`.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = url.into();
        self
    }

    /// Adds one environment variable (set after the defaults, so it wins).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Adds environment variables.
    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        for (k, v) in env {
            self = self.env(k, v);
        }
        self
    }

    /// Adds command-line flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Also opens the Redis-protocol front end on a free `RESP_PORT`;
    /// [`ProxyBuilder::start`] then waits for it to accept connections too.
    pub fn resp(mut self) -> Self {
        self.resp = true;
        self
    }

    fn command(&self, port: u16, resp_port: Option<u16>) -> Command {
        let mut cmd = Command::new(BIN);
        // The runner's own environment must not leak into the binary.
        for name in redis_proxy::config::ENV_NAMES {
            cmd.env_remove(name);
        }
        cmd.env("PROXY_PORT", port.to_string())
            .env("REDIS_URL", &self.redis_url)
            .env("RUST_LOG", "warn");
        if let Some(resp_port) = resp_port {
            cmd.env("RESP_PORT", resp_port.to_string());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Spawns the binary and waits until `GET /-/healthy` is 200 (and the
    /// RESP port accepts, when asked); panics with its stderr if it exits.
    pub fn start(self) -> Proxy {
        let port = free_port();
        let resp_port = self.resp.then(free_port);
        let mut child = self
            .command(port, resp_port)
            .spawn()
            .expect("spawn redis-proxy");
        let stderr = Drain::spawn(child.stderr.take().expect("piped stderr"));
        Drain::spawn(child.stdout.take().expect("piped stdout"));
        let mut proxy = Proxy {
            child,
            port,
            resp_port,
            stderr,
        };
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!(
                    "redis-proxy exited during startup ({status}); stderr:\n{}",
                    proxy.logs()
                );
            }
            let http_up = Http::try_connect(port)
                .and_then(|mut c| c.request("GET", "/-/healthy", &[]))
                .is_ok_and(|r| r.status == 200);
            let resp_up = resp_port.is_none_or(|p| TcpStream::connect(("127.0.0.1", p)).is_ok());
            if http_up && resp_up {
                return proxy;
            }
            if Instant::now() >= end {
                panic!(
                    "redis-proxy not healthy on port {port} within {DEADLINE:?}; stderr:\n{}",
                    proxy.logs()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Runs the binary to completion (for settings it must refuse); kills it
    /// and panics if it is still running after [`DEADLINE`].
    pub fn run_to_exit(self) -> Exit {
        let mut child = self
            .command(free_port(), None)
            .spawn()
            .expect("spawn redis-proxy");
        let stderr = Drain::spawn(child.stderr.take().expect("piped stderr"));
        let stdout = Drain::spawn(child.stdout.take().expect("piped stdout"));
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-proxy") {
                break status;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-proxy still running after {DEADLINE:?}; stderr:\n{}",
                    stderr.text()
                );
            }
            thread::sleep(POLL);
        };
        Exit {
            status,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
        }
    }
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client

/// One parsed HTTP response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bytes it took on the wire, head included.
    pub wire: usize,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header called `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `X-Cache`, if present.
    pub fn x_cache(&self) -> Option<&str> {
        self.header("x-cache")
    }

    /// `Content-Type`, if present.
    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }

    /// The body parsed as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.len() > 300 {
            format!(
                "{}... ({} bytes)",
                String::from_utf8_lossy(&self.body[..300]),
                self.body.len()
            )
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

/// Parses one whole response at the start of `buf`, strictly: an
/// `HTTP/1.1 NNN` status line, `name: value` headers and, unless `head`
/// (the request was HEAD) or the status has no body, a Content-Length that
/// the body fills. `Ok(None)` while it is still incomplete; otherwise the
/// response and the bytes it used ([`Response::wire`]).
pub fn parse_response(buf: &[u8], head: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 256 * 1024 {
            return Err("no end of response head in 256 KiB".into());
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..head_end]).map_err(|_| "head is not text")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .filter(|rest| rest.len() == 3 || rest.as_bytes().get(3) == Some(&b' '))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.parse::<usize>()
                .map_err(|_| format!("bad Content-Length {v:?}"))
        })
        .transpose()?;
    let no_body = head || status == 204 || status == 304 || (100..200).contains(&status);
    let body_len = match (no_body, length) {
        (true, _) => 0,
        (false, Some(n)) => n,
        (false, None) => return Err(format!("response without Content-Length: {text:?}")),
    };
    let wire = head_end + 4 + body_len;
    if buf.len() < wire {
        return Ok(None);
    }
    Ok(Some(Response {
        status,
        headers,
        body: buf[head_end + 4..wire].to_vec(),
        wire,
    }))
}

/// What one request on a raw connection came to ([`Http::exchange`]).
#[derive(Debug)]
pub enum Outcome {
    /// One whole, well-formed response, and nothing after it.
    Complete(Response),
    /// Refused, reset or closed before any byte of a response.
    Closed(String),
    /// Part of a response, bytes that are not HTTP, or bytes beyond one response.
    Broken(String),
    /// No answer within the connection's read timeout.
    Silent,
}

/// One client connection speaking raw HTTP/1.1 (keep-alive by default).
/// Reads give up after [`DEADLINE`] (or the timeout given to
/// [`Http::try_connect_with`]), so a hung proxy fails the test.
pub struct Http {
    stream: TcpStream,
    /// Bytes read but not yet consumed by a response.
    buf: Vec<u8>,
    /// Slow reading ([`Http::pace`]): at most this many bytes per read,
    /// then this pause.
    pace: Option<(usize, Duration)>,
}

impl Http {
    /// Connects to the proxy on `port`; panics on failure.
    pub fn connect(port: u16) -> Http {
        Http::try_connect(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    /// Connects to `port`.
    pub fn try_connect(port: u16) -> io::Result<Http> {
        Http::try_connect_with(port, DEADLINE)
    }

    /// Connects to `port`; reads give up after `read_timeout`.
    pub fn try_connect_with(port: u16, read_timeout: Duration) -> io::Result<Http> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(DEADLINE))?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            buf: Vec::new(),
            pace: None,
        })
    }

    /// From now on reads take at most `chunk` bytes, each followed by
    /// `pause`: a client that takes large replies in slowly.
    pub fn pace(&mut self, chunk: usize, pause: Duration) {
        self.pace = Some((chunk, pause));
    }

    /// Fixes the socket's receive buffer (no autotuning): large replies
    /// then arrive in many pieces, as to a slow client.
    pub fn set_recv_buffer(&self, bytes: usize) {
        use std::os::fd::AsRawFd;
        let size = bytes as libc::c_int;
        // SAFETY: the fd is our open socket (`self.stream` owns it), and
        // the option value is a live c_int whose size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes one request (no body) with `Host` and the given headers.
    pub fn write_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes())
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        self.write_request(method, target, headers)?;
        self.read_response(method == "HEAD")
    }

    /// `GET target`; panics on I/O errors.
    pub fn get(&mut self, target: &str) -> Response {
        self.request("GET", target, &[])
            .unwrap_or_else(|e| panic!("GET {}: {e}", shorten(target)))
    }

    /// `GET target` with headers; panics on I/O errors.
    pub fn get_with(&mut self, target: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", target, headers)
            .unwrap_or_else(|e| panic!("GET {}: {e}", shorten(target)))
    }

    /// `HEAD target`; panics on I/O errors. The response is read without a
    /// body whatever Content-Length says; a body sent anyway would show up as
    /// garbage in front of the next response on this connection.
    pub fn head(&mut self, target: &str) -> Response {
        self.request("HEAD", target, &[])
            .unwrap_or_else(|e| panic!("HEAD {}: {e}", shorten(target)))
    }

    fn fill(&mut self) -> io::Result<usize> {
        let want = self.pace.map_or(16 * 1024, |(n, _)| n);
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let got = self.stream.read(&mut self.buf[old..]);
        self.buf.truncate(old + *got.as_ref().unwrap_or(&0));
        if let Some((_, pause)) = self.pace {
            thread::sleep(pause);
        }
        got
    }

    /// Reads one response. `head`: the request was HEAD, so there is no body.
    pub fn read_response(&mut self, head: bool) -> io::Result<Response> {
        loop {
            match parse_response(&self.buf, head) {
                Ok(Some(r)) => {
                    self.buf.drain(..r.wire);
                    return Ok(r);
                }
                Ok(None) => {}
                Err(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a whole response; got {}",
                        preview(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Sends `request` and judges what comes back, strictly: exactly one
    /// whole response, or a close before any byte of one, or silence.
    pub fn exchange(&mut self, request: &[u8]) -> Outcome {
        if let Err(e) = self.send(request) {
            return Outcome::Closed(format!("write: {e}"));
        }
        loop {
            match parse_response(&self.buf, false) {
                Ok(Some(r)) if r.wire == self.buf.len() => {
                    self.buf.clear();
                    return Outcome::Complete(r);
                }
                Ok(Some(r)) => {
                    return Outcome::Broken(format!(
                        "{} bytes after the response: {}",
                        self.buf.len() - r.wire,
                        preview(&self.buf[r.wire..])
                    ))
                }
                Ok(None) => {}
                Err(why) => return Outcome::Broken(format!("{why}: {}", preview(&self.buf))),
            }
            let ended = match self.fill() {
                Ok(0) => "EOF".to_string(),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Outcome::Silent
                }
                Err(e) => e.to_string(),
            };
            return if self.buf.is_empty() {
                Outcome::Closed(ended)
            } else {
                Outcome::Broken(format!(
                    "{ended} after {} bytes: {}",
                    self.buf.len(),
                    preview(&self.buf)
                ))
            };
        }
    }

    /// Waits up to `deadline` for the server to close the connection (EOF or
    /// reset). Returns the bytes that arrived first, or `None` if it is
    /// still open at the deadline.
    pub fn wait_closed(&mut self, deadline: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).ok();
            match self.fill() {
                Ok(0) => return Some(std::mem::take(&mut self.buf)),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                // Reset or similar: closed as well.
                Err(_) => return Some(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Bytes received but not consumed by any response.
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }

    /// Closes our sending side (the server sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// The start of `bytes` as text, for failure messages.
pub fn preview(bytes: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn shorten(s: &str) -> String {
    if s.len() > 80 {
        format!("{}... ({} bytes)", &s[..80], s.len())
    } else {
        s.to_string()
    }
}

/// Percent-encodes every byte except unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), so any byte string becomes a request path segment.
pub fn pct(bytes: impl AsRef<[u8]>) -> String {
    let mut out = String::new();
    for &b in bytes.as_ref() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
