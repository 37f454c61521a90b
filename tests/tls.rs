//! System tests of TLS to Redis (README "TLS"): the real binary against a
//! real `redis-server` serving TLS on a free loopback port, with
//! certificates each test makes (tests/common/tls.rs).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::tls::{Certs, TlsRedis};
use common::{poll_until, Proxy, DEADLINE};

/// Waits until `GET /<key>` answers 200 with `value`.
fn wait_served(proxy: &Proxy, key: &str, value: &[u8]) {
    poll_until(&format!("GET /{key} to answer 200 {value:?}"), || {
        let r = proxy.get(&format!("/{key}"));
        (r.status == 200 && r.body == value).then_some(())
    });
}

/// Asserts the proxy answers `GET /<key>` and `/-/ready` with 503 `redis
/// unavailable` (waiting for the first failed connect), and that its log
/// comes to contain `reason`; returns the log.
#[track_caller]
fn assert_refused(proxy: &Proxy, key: &str, reason: &str) -> String {
    let r = proxy.get(&format!("/{key}"));
    assert_eq!(r.status, 503, "{r:?}\nlog:\n{}", proxy.logs());
    assert_eq!(r.json()["error"], "redis unavailable", "{r:?}");
    let ready = proxy.get("/-/ready");
    assert_eq!(ready.status, 503, "{ready:?}");
    let end = std::time::Instant::now() + DEADLINE;
    while !proxy.logs().contains(reason) {
        assert!(
            std::time::Instant::now() < end,
            "no log line naming {reason:?}:\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.logs()
}

/// One `GET key` over the proxy's RESP port, the reply as sent.
fn resp_get(port: u16, key: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect RESP");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut buf = vec![0; 256];
    let n = s.read(&mut buf).expect("read RESP reply");
    buf.truncate(n);
    buf
}

/// `rediss://` with REDIS_TLS_CA_FILE: the server is verified (by its IP
/// address, the URL's host), GET is served over HTTP and RESP, and cached.
#[test]
fn ca_file_verifies_and_serves_http_and_resp() {
    let certs = Certs::new("ok");
    let server = TlsRedis::start_signed_by(&certs, false);
    server.redis.set("k", "v");
    server.redis.set("r", "over resp");
    let ca = certs.ca_file();
    let proxy = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", ca.to_str().unwrap())
        .resp()
        .start();
    let r = proxy.get("/k");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"v"[..]),
        "{r:?}\n{}",
        proxy.logs()
    );
    assert_eq!(r.x_cache(), Some("MISS"));
    assert_eq!(proxy.get("/k").x_cache(), Some("HIT"));
    assert_eq!(proxy.get("/-/ready").status, 200);
    assert_eq!(
        resp_get(proxy.resp_port().unwrap(), "r"),
        b"$9\r\nover resp\r\n"
    );
}

/// Mutual TLS (`--tls-auth-clients yes`): with the client certificate the
/// proxy is served; without it, 503 and `/-/ready` 503, and the log says
/// the server refused.
#[test]
fn mutual_tls_with_and_without_the_client_certificate() {
    let certs = Certs::new("mtls");
    let server = TlsRedis::start_signed_by(&certs, true);
    server.redis.set("k", "v");
    let (cert, key) = certs.issue("client", &["redis-proxy"]);
    let ca = certs.ca_file();
    let with = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", ca.to_str().unwrap())
        .env("REDIS_TLS_CERT_FILE", cert.to_str().unwrap())
        .env("REDIS_TLS_KEY_FILE", key.to_str().unwrap())
        .start();
    let r = with.get("/k");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"v"[..]),
        "{r:?}\n{}",
        with.logs()
    );
    assert_eq!(with.get("/-/ready").status, 200);

    let without = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", ca.to_str().unwrap())
        .start();
    assert_refused(&without, "k", "TLS refused by the server");
}

/// A server whose certificate another CA signed: 503 and one log line
/// naming verification (not one per attempt); once the server is fixed
/// (restarted with a certificate of the right CA) the proxy serves again by
/// itself.
#[test]
fn wrong_ca_is_refused_then_recovers_when_the_server_is_fixed() {
    let trusted = Certs::new("trusted");
    let other = Certs::new("other");
    let (cert, key) = (trusted.path("server.pem"), trusted.path("server.key"));
    other.issue_to(&cert, &key, &["localhost", "127.0.0.1"]);
    let mut server = TlsRedis::start(&cert, &key, &trusted.ca_file(), false);
    let proxy = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", trusted.ca_file().to_str().unwrap())
        .env("PROXY_WORKERS", "2")
        .start();
    assert_refused(&proxy, "k", "certificate verification failed");
    for _ in 0..10 {
        assert_eq!(proxy.get("/k").status, 503);
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = proxy
        .logs()
        .lines()
        .filter(|l| l.contains("certificate verification failed"))
        .count();
    assert_eq!(lines, 1, "logged once, not per attempt:\n{}", proxy.logs());

    trusted.issue_to(&cert, &key, &["localhost", "127.0.0.1"]);
    server.redis.restart_same_port();
    server.redis.set("k", "fixed");
    wait_served(&proxy, "k", b"fixed");
    assert_eq!(proxy.get("/-/ready").status, 200);
}

/// REDIS_TLS_SERVER_NAME is what the certificate is checked against: a
/// name it does not carry is refused, one it carries is served although
/// the URL's host is an IP address.
#[test]
fn server_name_is_checked() {
    let certs = Certs::new("names");
    let (cert, key) = certs.issue("server", &["redis.internal"]);
    let server = TlsRedis::start(&cert, &key, &certs.ca_file(), false);
    server.redis.set("k", "v");
    let ca = certs.ca_file();
    let proxy = |name: Option<&str>| {
        let mut b = Proxy::builder()
            .redis_url(server.url())
            .env("REDIS_TLS_CA_FILE", ca.to_str().unwrap());
        if let Some(name) = name {
            b = b.env("REDIS_TLS_SERVER_NAME", name);
        }
        b.start()
    };
    let by_ip = proxy(None);
    assert_refused(&by_ip, "k", "not valid for name");
    let wrong = proxy(Some("other.internal"));
    assert_refused(&wrong, "k", "not valid for name");
    let right = proxy(Some("redis.internal"));
    wait_served(&right, "k", b"v");
}

/// The server restarted with a new key and certificate from the same CA:
/// served again without restarting the proxy.
#[test]
fn server_restarted_with_a_new_certificate_is_served_again() {
    let certs = Certs::new("rotate");
    let mut server = TlsRedis::start_signed_by(&certs, false);
    server.redis.set("k", "before");
    let proxy = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", certs.ca_file().to_str().unwrap())
        .env("CACHE_CAPACITY", "0")
        .start();
    wait_served(&proxy, "k", b"before");
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let old = std::fs::read(&cert).unwrap();
    certs.issue_to(&cert, &key, &["localhost", "127.0.0.1"]);
    assert_ne!(old, std::fs::read(&cert).unwrap());
    server.redis.restart_same_port();
    server.redis.set("k", "after");
    wait_served(&proxy, "k", b"after");
}

/// Tracking over TLS: both the data links and the invalidation connection
/// speak TLS, and a write in Redis reaches the cache.
#[test]
fn tracking_over_tls() {
    let certs = Certs::new("tracking");
    let server = TlsRedis::start_signed_by(&certs, false);
    server.redis.set("k", "v1");
    let proxy = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_CA_FILE", certs.ca_file().to_str().unwrap())
        .env("CACHE_INVALIDATION", "tracking")
        .env("CACHE_TTL_MS", "600000")
        .start();
    poll_until("k to be served from the cache", || {
        let r = proxy.get("/k");
        (r.status == 200 && r.x_cache() == Some("HIT")).then_some(())
    });
    server.redis.set("k", "v2");
    wait_served(&proxy, "k", b"v2");
}

/// REDIS_TLS_INSECURE serves a server no CA vouches for, and says so at start.
#[test]
fn insecure_skips_verification_with_a_warning() {
    let certs = Certs::new("insecure");
    let server = TlsRedis::start_signed_by(&certs, false);
    server.redis.set("k", "v");
    let proxy = Proxy::builder()
        .redis_url(server.url())
        .env("REDIS_TLS_INSECURE", "1")
        .start();
    wait_served(&proxy, "k", b"v");
    assert!(
        proxy.logs().contains("REDIS_TLS_INSECURE"),
        "{}",
        proxy.logs()
    );
}

/// A TLS file that cannot be used exits 2 with one line naming its setting.
#[test]
fn bad_tls_files_exit_2_naming_the_setting() {
    let certs = Certs::new("bad");
    let (cert, _) = certs.issue("a", &["x"]);
    let (_, other_key) = certs.issue("b", &["x"]);
    let garbage = certs.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: [(&[(&str, &std::path::Path)], &str); 4] = [
        (
            &[(
                "REDIS_TLS_CA_FILE",
                std::path::Path::new("/nonexistent/ca.pem"),
            )],
            "REDIS_TLS_CA_FILE",
        ),
        (&[("REDIS_TLS_CA_FILE", &garbage)], "REDIS_TLS_CA_FILE"),
        (
            &[
                ("REDIS_TLS_CERT_FILE", &garbage),
                ("REDIS_TLS_KEY_FILE", &other_key),
            ],
            "REDIS_TLS_CERT_FILE",
        ),
        (
            &[
                ("REDIS_TLS_CERT_FILE", &cert),
                ("REDIS_TLS_KEY_FILE", &other_key),
            ],
            "REDIS_TLS_KEY_FILE",
        ),
    ];
    for (env, setting) in cases {
        let mut b = Proxy::builder().redis_url("rediss://127.0.0.1:1/0");
        for (name, path) in env {
            b = b.env(name, path.to_str().unwrap());
        }
        let exit = b.run_to_exit();
        assert_eq!(exit.status.code(), Some(2), "{env:?}: {exit:?}");
        let lines = exit.stderr_lines();
        assert_eq!(lines.len(), 1, "{exit:?}");
        assert!(
            lines[0].contains(setting),
            "{env:?} should name {setting}: {exit:?}"
        );
    }
}
