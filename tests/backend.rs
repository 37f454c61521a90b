//! System tests of the backend's connect path against a real redis-server
//! that needs a handshake (a password and db 1, so AUTH and SELECT are sent
//! on every connection).

mod common;

use std::process::{Child, Command, Stdio};
use std::thread;

use common::{free_port, poll_for, poll_until, Proxy, DEADLINE};

const PASSWORD: &str = "s3cret";

/// A redis-server with `requirepass`, which the test can pause with
/// SIGSTOP; resumed and killed on drop.
struct AuthRedis {
    child: Child,
    port: u16,
}

impl AuthRedis {
    fn start() -> AuthRedis {
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--requirepass", PASSWORD])
                .args(["--appendonly", "no"])
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .args(["--dir", &std::env::temp_dir().to_string_lossy()])
                .args(["--save", ""])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let url = url(port);
            let up = poll_for(DEADLINE, "redis-server to answer", &mut || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false);
                }
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .is_ok()
                    .then_some(true)
            });
            if up {
                return AuthRedis { child, port };
            }
        }
        panic!("cannot start redis-server");
    }

    fn url(&self) -> String {
        url(self.port)
    }

    fn set(&self, key: &str, value: &str) {
        let mut conn = redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to redis");
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .exec(&mut conn)
            .expect("redis SET");
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own, unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill(redis-server, {sig})");
    }
}

impl Drop for AuthRedis {
    fn drop(&mut self) {
        // SAFETY: as in `signal`; a stopped process is resumed before the kill.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url(port: u16) -> String {
    format!("redis://:{PASSWORD}@127.0.0.1:{port}/1")
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// Redis paused (SIGSTOP) under a proxy whose connections need AUTH and
/// SELECT: the first request times out on the open connection, and every
/// later one, whose connection is being reopened (TCP connects, the
/// handshake gets no reply), is a timeout too: 504, never 503. All back
/// after SIGCONT, each key with its own value.
#[test]
fn stalled_handshake_is_a_timeout() {
    let redis = AuthRedis::start();
    for i in 0..8 {
        redis.set(&format!("cold{i}"), &format!("value-{i}"));
    }
    redis.set("warm", "w");
    // One worker: one data connection, so every request below meets the
    // connection being reopened.
    let proxy = Proxy::builder()
        .redis_url(redis.url())
        .envs(&[("REDIS_TIMEOUT_MS", "300"), ("PROXY_WORKERS", "1")])
        .start();
    assert_eq!(proxy.get("/warm").status, 200, "{}", proxy.logs());

    redis.signal(libc::SIGSTOP);
    for i in 0..5 {
        let r = proxy.get(&format!("/cold{i}"));
        assert_eq!(
            (r.status, error_of(&r.body)),
            (504, "redis timeout".to_string()),
            "/cold{i} (request {i} with Redis paused)"
        );
    }
    // Requests that arrive together while the link re-handshakes.
    let port = proxy.port();
    let together: Vec<_> = (5..8)
        .map(|i| {
            thread::spawn(move || {
                let r = common::Http::connect(port).get(&format!("/cold{i}"));
                (i, r.status, error_of(&r.body))
            })
        })
        .collect();
    for t in together {
        let (i, status, error) = t.join().expect("client thread");
        assert_eq!(
            (status, error.as_str()),
            (504, "redis timeout"),
            "/cold{i} (concurrent, Redis paused)"
        );
    }
    assert_eq!(proxy.get("/-/ready").status, 503);

    redis.signal(libc::SIGCONT);
    for i in 0..8 {
        let want = format!("value-{i}");
        poll_until("GETs to be served after SIGCONT", || {
            let r = proxy.get(&format!("/cold{i}"));
            (r.status == 200).then_some(())
        });
        assert_eq!(proxy.get(&format!("/cold{i}")).body, want.as_bytes());
    }
}
