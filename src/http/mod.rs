//! http: the HTTP/1.1 front end, on its own connection loop over may
//! coroutines.
//!
//! Owns the connection loop (`conn`: read, answer every complete request,
//! write once per read batch), request heads (`parse`, with httparse), key
//! decoding, format negotiation, the operations endpoints under `/-/`, and
//! the one place where results and errors become status codes and bodies
//! ([`Reply`]). Reads go through the shared core (`proxy`); this module
//! never touches the cache or Redis directly.
//!
//! Why our own loop and not may_minihttp's: its loop returns before
//! writing what is due (a request followed by a half-close, pipelined
//! requests followed by garbage), cannot answer a request it cannot parse,
//! and caps headers at 16; see README, "Why the HTTP loop is our own".

mod conn;
pub mod parse;

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use base64::Engine;
use may::coroutine::JoinHandle;
use serde_json::{Map, Value as Json};

use crate::backend::BackendError;
use crate::cache::Value;
use crate::clients::Clients;
use crate::config::MAX_KEY_BYTES;
use crate::listener;
use crate::metrics::Metrics;
use crate::proxy::{Lookup, Proxy, Source};
use parse::{Head, Method};

/// Sent, whole, to a connection over the client limit; then it is closed.
pub const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n\
Content-Length: 31\r\n\r\n{\"error\":\"max clients reached\"}";

/// Why a request path does not name a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    BadEncoding,
    TooLong,
}

impl KeyError {
    fn message(&self) -> &'static str {
        match self {
            KeyError::Empty => "empty key: use GET /<key>",
            KeyError::BadEncoding => "bad percent-encoding in key",
            KeyError::TooLong => "key too long: at most 65536 bytes after decoding",
        }
    }
}

/// A decoded request target: the key and whether `?format=json` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// Borrowed from the path when it has no `%` escapes.
    pub key: Cow<'a, [u8]>,
    pub json: bool,
}

/// Splits a raw path (`/a%20b?format=json`) into the decoded key and the
/// JSON flag. The key is everything after the leading `/` up to `?`.
pub fn parse_target(raw: &[u8]) -> Result<Target<'_>, KeyError> {
    let (path, query) = match raw.iter().position(|b| *b == b'?') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    let encoded = path.strip_prefix(b"/").unwrap_or(path);
    if encoded.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if encoded.contains(&b'%') {
        Cow::Owned(percent_decode(encoded)?)
    } else {
        Cow::Borrowed(encoded)
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong);
    }
    let json = query.is_some_and(|q| q.split(|b| *b == b'&').any(|p| p == b"format=json"));
    Ok(Target { key, json })
}

/// Decodes `%XX` escapes; any other byte stands for itself.
pub fn percent_decode(input: &[u8]) -> Result<Vec<u8>, KeyError> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    // Decoding only shrinks: bail out early on absurd input.
    if input.len() > 3 * MAX_KEY_BYTES {
        return Err(KeyError::TooLong);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex);
            let lo = input.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(KeyError::BadEncoding),
            }
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Adds `"key"` (UTF-8) or `"key_base64"` to a JSON object.
fn put_bytes(obj: &mut Map<String, Json>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            obj.insert(name.to_string(), Json::String(s.to_string()));
        }
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            obj.insert(format!("{name}_base64"), Json::String(b64));
        }
    }
}

/// The JSON body `{"error": msg, "key": ...}`.
pub fn error_body(msg: &str, key: Option<&[u8]>) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("error".into(), Json::String(msg.to_string()));
    if let Some(key) = key {
        put_bytes(&mut obj, "key", key);
    }
    serde_json::to_vec(&Json::Object(obj)).unwrap_or_default()
}

/// The JSON body `{"key": ..., "value": ...}`.
pub fn value_body(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut obj = Map::new();
    put_bytes(&mut obj, "key", key);
    put_bytes(&mut obj, "value", value);
    serde_json::to_vec(&Json::Object(obj)).unwrap_or_default()
}

/// What every HTTP connection shares.
pub struct HttpShared {
    pub proxy: Arc<Proxy>,
    /// Counters, handed over at construction: the core does not give out its own.
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    /// `PROXY_ALLOW_WRITES`: serve PUT and DELETE.
    pub allow_writes: bool,
    /// Largest PUT body accepted, in bytes.
    pub max_body: usize,
}

/// Binds `addr` and serves HTTP on it, one coroutine per connection; cancel
/// the returned coroutine to stop accepting.
pub fn start(shared: Arc<HttpShared>, addr: SocketAddr) -> io::Result<JoinHandle<()>> {
    listener::start("http-accept", addr, move |stream| {
        let fd = stream.as_raw_fd() as usize;
        let shared = shared.clone();
        // Same id as the fd: the coroutine starts on the worker whose poller
        // the socket (and its Redis connection, `fd % workers`) belongs to.
        let builder = may::coroutine::Builder::new().id(fd);
        if let Err(e) = may::go!(builder, move || conn::serve(stream, &shared)) {
            log::warn!("cannot spawn http connection: {e}");
        }
    })
}

/// What a request is answered with, before encoding.
pub(crate) struct Reply {
    code: u16,
    /// `None` for a reply without a body (204).
    content_type: Option<&'static str>,
    x_cache: Option<&'static str>,
    /// The `Cache-Status` value of an answer about a key ([`cache_status`]).
    cache_status: Option<&'static str>,
    allow: Option<&'static str>,
    retry_after: bool,
    body: Body,
}

/// A reply body: a cached value is written as it is, never copied into a
/// temporary.
pub(crate) enum Body {
    Empty,
    Static(&'static [u8]),
    Owned(Vec<u8>),
    Value(Value),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::Static(b) => b.len(),
            Body::Owned(b) => b.len(),
            Body::Value(v) => v.len(),
        }
    }
}

const JSON_TYPE: &str = "application/json";
const OCTETS_TYPE: &str = "application/octet-stream";
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Reply {
    fn new(code: u16, content_type: &'static str, body: Body) -> Self {
        Reply {
            code,
            content_type: Some(content_type),
            x_cache: None,
            cache_status: None,
            allow: None,
            retry_after: false,
            body,
        }
    }

    fn json(code: u16, body: Vec<u8>) -> Self {
        Reply::new(code, JSON_TYPE, Body::Owned(body))
    }

    fn error(code: u16, msg: &str, key: Option<&[u8]>) -> Self {
        Reply::json(code, error_body(msg, key))
    }

    fn no_content() -> Self {
        Reply {
            content_type: None,
            ..Reply::new(204, JSON_TYPE, Body::Empty)
        }
    }

    /// 503 with `Retry-After: 1`: over the client limit, or shutting down.
    fn busy(msg: &str) -> Self {
        Reply {
            retry_after: true,
            ..Reply::error(503, msg, None)
        }
    }

    /// A key's value, raw or as JSON, marked hit or miss.
    fn value(key: &[u8], value: Value, source: Source, json: bool) -> Self {
        let reply = if json {
            Reply::json(200, value_body(key, &value))
        } else {
            Reply::new(200, OCTETS_TYPE, Body::Value(value))
        };
        Reply {
            x_cache: Some(if source.is_hit() { "HIT" } else { "MISS" }),
            ..reply.about(source)
        }
    }

    /// Marks an answer about a key with where it came from.
    fn about(self, source: Source) -> Self {
        Reply {
            cache_status: Some(cache_status(source)),
            ..self
        }
    }
}

impl HttpShared {
    /// Answers a GET, HEAD or any method this front end does not serve;
    /// a key's lookup is done here unless `looked_up` holds it (fetched
    /// ahead with the rest of a pipeline).
    fn route(
        &self,
        head: &Head<'_>,
        fd: usize,
        looked_up: Option<Result<Lookup, BackendError>>,
    ) -> Reply {
        if !matches!(head.method, Method::Get | Method::Head) {
            let (allow, msg) = if self.allow_writes {
                (
                    "GET, HEAD, PUT, DELETE",
                    "method not allowed: use GET, HEAD, PUT or DELETE",
                )
            } else {
                ("GET, HEAD", "method not allowed: use GET or HEAD")
            };
            return Reply {
                allow: Some(allow),
                ..Reply::error(405, msg, None)
            };
        }
        if head.target.starts_with(b"/-/") {
            return self.operations(head.target, fd);
        }
        let target = match parse_target(head.target) {
            Ok(target) => target,
            Err(e) => return Reply::error(400, e.message(), None),
        };
        let looked_up = looked_up.unwrap_or_else(|| self.proxy.get(&target.key, fd));
        match looked_up {
            Ok(lookup) => match lookup.value {
                None => Reply::error(404, "key not found", Some(&target.key)).about(lookup.source),
                Some(value) => Reply::value(
                    &target.key,
                    value,
                    lookup.source,
                    target.json || head.accept_json,
                ),
            },
            // Redis was asked and failed: still a forwarded miss.
            Err(e) => backend_error(&e, &target.key).about(Source::Miss),
        }
    }

    fn operations(&self, raw_path: &[u8], fd: usize) -> Reply {
        let path = raw_path.split(|b| *b == b'?').next().unwrap_or(raw_path);
        match path {
            b"/-/healthy" => Reply::new(200, JSON_TYPE, Body::Static(br#"{"status":"ok"}"#)),
            b"/-/ready" if self.proxy.ready(fd) => {
                Reply::new(200, JSON_TYPE, Body::Static(br#"{"status":"ready"}"#))
            }
            b"/-/ready" => Reply::error(503, "redis unavailable", None),
            b"/-/metrics" => Reply::new(
                200,
                METRICS_TYPE,
                Body::Owned(self.metrics.render(&self.proxy.snapshot()).into_bytes()),
            ),
            _ => Reply::error(404, "unknown endpoint", None),
        }
    }

    /// PUT (SET, with its whole `body`) and DELETE (DEL), when writes are allowed.
    fn write(&self, head: &Head<'_>, body: &[u8], fd: usize) -> Reply {
        let target = match parse_target(head.target) {
            Ok(target) => target,
            Err(e) => return Reply::error(400, e.message(), None),
        };
        let key = &target.key[..];
        if head.method == Method::Delete {
            return match self.proxy.del(&[key], fd) {
                Ok(0) => Reply::error(404, "key not found", Some(key)),
                Ok(_) => Reply::no_content(),
                Err(e) => backend_error(&e, key),
            };
        }
        match self.proxy.set(key, body, &[], fd) {
            Ok(_) => Reply::no_content(),
            Err(e) => backend_error(&e, key),
        }
    }
}

/// The `Cache-Status` value (RFC 9211) of an answer about a key.
fn cache_status(source: Source) -> &'static str {
    match source {
        Source::Hit => "redis-proxy; hit",
        Source::StaleHit => "redis-proxy; hit; detail=stale",
        Source::Miss => "redis-proxy; fwd=uri-miss",
        Source::Collapsed => "redis-proxy; fwd=uri-miss; collapsed",
    }
}

/// The one mapping from backend errors to HTTP answers.
fn backend_error(e: &BackendError, key: &[u8]) -> Reply {
    match e {
        BackendError::Unavailable(_) => Reply::error(503, "redis unavailable", Some(key)),
        BackendError::Timeout => Reply::error(504, "redis timeout", Some(key)),
        BackendError::Reply(msg) => Reply::error(502, msg, Some(key)),
    }
}

/// Status line (reason phrase) and metrics label of each status this front end uses.
fn status_line(code: u16) -> &'static str {
    match code {
        200 => "200 OK",
        204 => "204 No Content",
        400 => "400 Bad Request",
        404 => "404 Not Found",
        405 => "405 Method Not Allowed",
        413 => "413 Content Too Large",
        431 => "431 Request Header Fields Too Large",
        502 => "502 Bad Gateway",
        503 => "503 Service Unavailable",
        504 => "504 Gateway Timeout",
        _ => "500 Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percent-encoded slashes and spaces decode; raw slashes stay.
    #[test]
    fn decodes_keys() {
        let t = parse_target(b"/a%20b%2Fc").unwrap();
        assert_eq!(&*t.key, b"a b/c");
        assert_eq!(&*parse_target(b"/a%20b/c").unwrap().key, b"a b/c");
        assert_eq!(&*parse_target(b"/%00%ff").unwrap().key, &[0u8, 0xff]);
        assert!(!t.json);
    }

    /// The query string is not part of the key; format=json is recognised.
    #[test]
    fn query_is_split_off() {
        let t = parse_target(b"/k?x=1&format=json").unwrap();
        assert_eq!(&*t.key, b"k");
        assert!(t.json);
        assert!(!parse_target(b"/k?format=jsonx").unwrap().json);
    }

    /// Empty keys, bad escapes and oversize keys are rejected.
    #[test]
    fn rejects_bad_keys() {
        assert_eq!(parse_target(b"/"), Err(KeyError::Empty));
        assert_eq!(parse_target(b"/?format=json"), Err(KeyError::Empty));
        assert_eq!(parse_target(b"/a%2"), Err(KeyError::BadEncoding));
        assert_eq!(parse_target(b"/a%zz"), Err(KeyError::BadEncoding));
        let long = format!("/{}", "k".repeat(MAX_KEY_BYTES + 1));
        assert_eq!(parse_target(long.as_bytes()), Err(KeyError::TooLong));
        let max = format!("/{}", "k".repeat(MAX_KEY_BYTES));
        assert!(parse_target(max.as_bytes()).is_ok());
    }

    /// Non-UTF-8 keys and values are base64 in JSON bodies.
    #[test]
    fn json_bodies_are_binary_safe() {
        let body: Json = serde_json::from_slice(&value_body(b"k", &[0xff, 0x00])).unwrap();
        assert_eq!(body["key"], "k");
        assert_eq!(body["value_base64"], "/wA=");
        let body: Json =
            serde_json::from_slice(&error_body("key not found", Some(&[0xfe]))).unwrap();
        assert_eq!(body["error"], "key not found");
        assert_eq!(body["key_base64"], "/g==");
    }

    /// The busy response's Content-Length matches its body.
    #[test]
    fn busy_response_is_well_formed() {
        let text = std::str::from_utf8(BUSY_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, r#"{"error":"max clients reached"}"#);
    }
}
