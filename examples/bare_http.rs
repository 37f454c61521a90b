//! bare_http: the floor any proxy on this stack can reach.
//!
//! A bare may_minihttp responder that answers every request with exactly the
//! bytes of a proxy cache hit (status 200, `Content-Type:
//! application/octet-stream`, `X-Cache: HIT`, the value as the body), with no
//! parsing, no cache and no Redis. `scripts/bench.sh` measures the proxy's
//! hit path against it.
//!
//! Environment:
//! - `BARE_PORT`: port on 127.0.0.1 (default 8090).
//! - `BARE_VALUE`: the body; else `BARE_VALUE_FILE`: a file read once at
//!   start; else 100 bytes of `x`.
//! - `PROXY_WORKERS`: may worker threads (default: number of CPUs), as the
//!   proxy reads it.

use std::io;

use may_minihttp::{HttpService, HttpServiceFactory, Request, Response};

/// Default body: the size the benchmark seeds its keys with.
const DEFAULT_VALUE_LEN: usize = 100;

/// Reads a non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Parses a non-empty environment variable or exits 2 naming it.
fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    match env(name) {
        None => default,
        Some(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("bare_http: {name} must be a positive integer, got {v:?}");
            std::process::exit(2)
        }),
    }
}

/// The body every request gets, fixed for the life of the process.
fn load_value() -> &'static [u8] {
    let value = if let Some(v) = std::env::var_os("BARE_VALUE").filter(|v| !v.is_empty()) {
        use std::os::unix::ffi::OsStringExt;
        v.into_vec()
    } else if let Some(path) = env("BARE_VALUE_FILE") {
        std::fs::read(&path).unwrap_or_else(|e| {
            eprintln!("bare_http: cannot read BARE_VALUE_FILE {path}: {e}");
            std::process::exit(2)
        })
    } else {
        vec![b'x'; DEFAULT_VALUE_LEN]
    };
    Box::leak(value.into_boxed_slice())
}

/// One connection's service: copies the fixed value into the response, as
/// the proxy's hit path copies the cached value.
struct Bare {
    value: &'static [u8],
}

impl HttpService for Bare {
    fn call(&mut self, _req: Request, rsp: &mut Response) -> io::Result<()> {
        rsp.status_code(200, "OK")
            .header("Content-Type: application/octet-stream")
            .header("X-Cache: HIT");
        rsp.body_mut().extend_from_slice(self.value);
        Ok(())
    }
}

struct BareFactory {
    value: &'static [u8],
}

impl HttpServiceFactory for BareFactory {
    type Service = Bare;

    fn new_service(&self, _fd: usize) -> Bare {
        Bare { value: self.value }
    }
}

fn main() {
    let port: u16 = env_parse("BARE_PORT", 8090);
    let workers: usize = env_parse("PROXY_WORKERS", num_cpus::get()).max(1);
    let value = load_value();
    may::config().set_workers(workers);
    let addr = format!("127.0.0.1:{port}");
    let server = BareFactory { value }.start(&addr).unwrap_or_else(|e| {
        eprintln!("bare_http: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    eprintln!(
        "bare_http listening http://{addr} workers={workers} value_bytes={}",
        value.len()
    );
    let _ = server.join();
}
