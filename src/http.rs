//! http: the HTTP front end on may_minihttp.
//!
//! Owns request parsing beyond may_minihttp (method, key decoding, format
//! negotiation, the head-size bound), the operations endpoints under `/-/`,
//! and the one place where results and errors become status codes and
//! bodies. Reads go through the shared core (`proxy`); this module never
//! touches the cache or Redis directly.

use std::borrow::Cow;
use std::cell::Cell;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use may_minihttp::{HttpService, HttpServiceFactory, Request, Response};
use serde_json::{Map, Value as Json};

use crate::backend::BackendError;
use crate::clients::{Clients, Permit, HTTP_MAX_PENDING};
use crate::config::{MAX_HEAD_BYTES, MAX_KEY_BYTES};
use crate::metrics::{Frontend, Metrics};
use crate::proxy::{Proxy, Source};

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

/// Creates one [`HttpConn`] per accepted connection.
pub struct HttpFactory {
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    /// `PROXY_ALLOW_WRITES`: serve PUT and DELETE.
    pub allow_writes: bool,
    /// Largest PUT body accepted, in bytes.
    pub max_body: usize,
}

impl HttpServiceFactory for HttpFactory {
    type Service = HttpConn;

    // Runs inside the accept loop: no waiting here.
    fn new_service(&self, fd: usize) -> HttpConn {
        let permit = match self.clients.admit(fd, HTTP_MAX_PENDING) {
            Some(permit) => permit,
            None => self.clients.reject(fd, BUSY_RESPONSE),
        };
        HttpConn {
            proxy: self.proxy.clone(),
            metrics: self.metrics.clone(),
            permit,
            fd,
            allow_writes: self.allow_writes,
            max_body: self.max_body,
            abandoned: Cell::new(false),
        }
    }
}

/// One client connection. Dropping it (when the connection ends) returns
/// the client permit.
pub struct HttpConn {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    permit: Permit,
    fd: usize,
    allow_writes: bool,
    max_body: usize,
    /// Set once the connection is to end after this reply; later requests
    /// already buffered by may_minihttp are refused, not served.
    abandoned: Cell<bool>,
}

/// Largest body of a request that takes none (e.g. a GET with a body) that
/// is read and discarded to keep the connection usable; above it, close.
const MAX_DISCARD: usize = 1 << 20;

/// Status line pieces for the codes this front end uses.
fn reason(code: usize) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    }
}

fn status_label(code: usize) -> &'static str {
    match code {
        200 => "200",
        204 => "204",
        400 => "400",
        404 => "404",
        405 => "405",
        413 => "413",
        431 => "431",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "500",
    }
}

/// What a request is answered with, before encoding.
struct Reply {
    code: usize,
    headers: &'static [&'static str],
    body: Vec<u8>,
    /// For a hit/miss with the raw value: the value, written without a copy
    /// into a temporary Vec.
    raw: Option<crate::cache::Value>,
    /// The `Cache-Status` line of an answer about a key ([`cache_status`]).
    cache_status: Option<&'static str>,
}

const JSON: &[&str] = &["Content-Type: application/json"];

impl Reply {
    fn json(code: usize, body: Vec<u8>) -> Self {
        Reply {
            code,
            headers: JSON,
            body,
            raw: None,
            cache_status: None,
        }
    }

    fn error(code: usize, msg: &str, key: Option<&[u8]>) -> Self {
        Reply::json(code, error_body(msg, key))
    }
}

impl HttpConn {
    fn route(&self, req: &Request) -> Reply {
        let method = req.method();
        let raw_path = req.path().as_bytes();
        if head_bytes(req) > MAX_HEAD_BYTES {
            return Reply::error(431, "request head too large: at most 131072 bytes", None);
        }
        if !(method == "GET" || method == "HEAD") {
            return if self.allow_writes {
                Reply {
                    code: 405,
                    headers: &[
                        "Content-Type: application/json",
                        "Allow: GET, HEAD, PUT, DELETE",
                    ],
                    body: error_body("method not allowed: use GET, HEAD, PUT or DELETE", None),
                    raw: None,
                    cache_status: None,
                }
            } else {
                Reply {
                    code: 405,
                    headers: &["Content-Type: application/json", "Allow: GET, HEAD"],
                    body: error_body("method not allowed: use GET or HEAD", None),
                    raw: None,
                    cache_status: None,
                }
            };
        }
        if raw_path.starts_with(b"/-/") {
            return self.operations(raw_path);
        }
        let target = match parse_target(raw_path) {
            Ok(target) => target,
            Err(e) => return Reply::error(400, e.message(), None),
        };
        let json = target.json || wants_json(req);
        match self.proxy.get(&target.key, self.fd) {
            Ok(lookup) => match lookup.value {
                None => Reply {
                    cache_status: Some(cache_status(lookup.source)),
                    ..Reply::error(404, "key not found", Some(&target.key))
                },
                Some(value) => {
                    let hit = lookup.source.is_hit();
                    if json {
                        Reply {
                            code: 200,
                            headers: if hit {
                                &["Content-Type: application/json", "X-Cache: HIT"]
                            } else {
                                &["Content-Type: application/json", "X-Cache: MISS"]
                            },
                            body: value_body(&target.key, &value),
                            raw: None,
                            cache_status: Some(cache_status(lookup.source)),
                        }
                    } else {
                        Reply {
                            code: 200,
                            headers: if hit {
                                &["Content-Type: application/octet-stream", "X-Cache: HIT"]
                            } else {
                                &["Content-Type: application/octet-stream", "X-Cache: MISS"]
                            },
                            body: Vec::new(),
                            raw: Some(value),
                            cache_status: Some(cache_status(lookup.source)),
                        }
                    }
                }
            },
            Err(e) => backend_error(&e, &target.key),
        }
    }

    fn operations(&self, raw_path: &[u8]) -> Reply {
        let path = raw_path.split(|b| *b == b'?').next().unwrap_or(raw_path);
        match path {
            b"/-/healthy" => Reply::json(200, br#"{"status":"ok"}"#.to_vec()),
            b"/-/ready" => {
                if self.proxy.ready(self.fd) {
                    Reply::json(200, br#"{"status":"ready"}"#.to_vec())
                } else {
                    Reply::error(503, "redis unavailable", None)
                }
            }
            b"/-/metrics" => Reply {
                code: 200,
                headers: &["Content-Type: text/plain; version=0.0.4; charset=utf-8"],
                body: self.metrics.render(&self.proxy.snapshot()).into_bytes(),
                raw: None,
                cache_status: None,
            },
            _ => Reply::error(404, "unknown endpoint", None),
        }
    }
}

impl HttpConn {
    /// Records a reply of `wire` bytes: the connection's unread bound and
    /// the byte counter.
    fn sent(&self, wire: usize) {
        self.permit.sent(wire);
        self.metrics.response_bytes(Frontend::Http, wire);
    }

    /// Ends the connection after the reply being built, and refuses any
    /// request may_minihttp has already buffered behind this one (where this
    /// request ends may be unknown: serving them would allow smuggling).
    fn abandon(&self) {
        self.abandoned.set(true);
        self.permit.close_after_reply();
    }

    /// PUT (SET) and DELETE (DEL), when writes are allowed.
    fn write(&self, req: Request, body_len: usize) -> Reply {
        let target = match parse_target(req.path().as_bytes()) {
            Ok(target) => target,
            Err(e) => {
                if body_len > MAX_DISCARD {
                    self.abandon();
                } else {
                    let _ = io::copy(&mut req.body(), &mut io::sink());
                }
                return Reply::error(400, e.message(), None);
            }
        };
        let key = target.key.into_owned();
        if req.method() == "DELETE" {
            if body_len > 0 {
                let _ = io::copy(&mut req.body(), &mut io::sink());
            }
            return match self.proxy.del(&[&key], self.fd) {
                Ok(0) => Reply::error(404, "key not found", Some(&key)),
                Ok(_) => Reply::json(204, Vec::new()),
                Err(e) => backend_error(&e, &key),
            };
        }
        if body_len > self.max_body {
            self.abandon();
            return Reply::error(413, "body too large", Some(&key));
        }
        let mut value = Vec::with_capacity(body_len);
        if req.body().read_to_end(&mut value).is_err() || value.len() != body_len {
            self.abandon();
            return Reply::error(400, "body shorter than Content-Length", Some(&key));
        }
        match self.proxy.set(&key, &value, &[], self.fd) {
            Ok(_) => Reply::json(204, Vec::new()),
            Err(e) => backend_error(&e, &key),
        }
    }
}

/// The request's declared body length; 0 when it has none. Errors are
/// requests whose end cannot be found (may_minihttp would panic on them).
fn body_length(req: &Request) -> Result<usize, &'static str> {
    let mut length = None;
    for h in req.headers() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked bodies are not supported: send Content-Length");
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or("malformed Content-Length")?;
            if length.is_some_and(|l| l != parsed) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(parsed);
        }
    }
    Ok(length.unwrap_or(0))
}

/// The one mapping from backend errors to HTTP answers.
/// The `Cache-Status` header (RFC 9211) of an answer about a key.
fn cache_status(source: Source) -> &'static str {
    match source {
        Source::Hit => "Cache-Status: redis-proxy; hit",
        Source::StaleHit => "Cache-Status: redis-proxy; hit; detail=stale",
        Source::Miss => "Cache-Status: redis-proxy; fwd=uri-miss",
        Source::Collapsed => "Cache-Status: redis-proxy; fwd=uri-miss; collapsed",
    }
}

fn backend_error(e: &BackendError, key: &[u8]) -> Reply {
    match e {
        BackendError::Unavailable(_) => Reply::error(503, "redis unavailable", Some(key)),
        BackendError::Timeout => Reply::error(504, "redis timeout", Some(key)),
        BackendError::Reply(msg) => Reply::error(502, msg, Some(key)),
    }
}

fn wants_json(req: &Request) -> bool {
    req.headers().iter().any(|h| {
        h.name.eq_ignore_ascii_case("accept")
            && h.value
                .windows(b"application/json".len())
                .any(|w| w.eq_ignore_ascii_case(b"application/json"))
    })
}

const JSON_TYPE: &str = "Content-Type: application/json";
const CLOSE: &str = "Connection: close";
/// Length of the `Date` value may_minihttp writes (IMF-fixdate).
const DATE_BYTES: usize = "Wed, 25 Nov 2026 23:55:43 GMT".len();

/// Sets the status and headers of `rsp`; returns the bytes may_minihttp
/// (0.1.11, `response::encode`) puts on the wire for that head and a body of
/// `body_len` bytes. Exact, not estimated: the count of reply bytes a client
/// has not yet read is a running sum over the connection's life, so any
/// per-reply error would accumulate (`tests/http_limits.rs`,
/// `response_bytes_are_counted_exactly`, pins it to real bytes).
fn respond(
    rsp: &mut Response,
    code: usize,
    headers: &[&'static str],
    extra: Option<&'static str>,
    body_len: usize,
) -> usize {
    fn digits(n: usize) -> usize {
        n.checked_ilog10().map_or(1, |d| d as usize + 1)
    }
    rsp.status_code(code, reason(code));
    // may_minihttp writes a fixed "200 Ok" line for 200, else code + reason.
    let status = if code == 200 {
        "HTTP/1.1 200 Ok".len()
    } else {
        "HTTP/1.1 ".len() + digits(code) + 1 + reason(code).len()
    };
    let mut wire = status
        + "\r\nServer: M\r\nDate: ".len()
        + DATE_BYTES
        + "\r\nContent-Length: ".len()
        + digits(body_len);
    for h in headers.iter().chain(extra.as_ref()) {
        rsp.header(h);
        wire += "\r\n".len() + h.len();
    }
    wire + "\r\n\r\n".len() + body_len
}
/// Largest reply after which `Connection: close` (or HTTP/1.0) is honoured.
const CLOSE_AFTER_MAX_BODY: usize = 8 * 1024;

/// HTTP/1.0 without keep-alive, or `Connection: close`.
fn wants_close(req: &Request) -> bool {
    let connection = |token: &[u8]| {
        req.headers().iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|b| *b == b',')
                    .any(|v| v.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    if req.version() == 0 {
        !connection(b"keep-alive")
    } else {
        connection(b"close")
    }
}

/// Size of the request line and headers as sent (close enough: separators
/// are counted at their usual width).
fn head_bytes(req: &Request) -> usize {
    let line = req.method().len() + req.path().len() + 12;
    req.headers()
        .iter()
        .map(|h| h.name.len() + h.value.len() + 4)
        .sum::<usize>()
        + line
}

impl HttpService for HttpConn {
    fn call(&mut self, req: Request, rsp: &mut Response) -> io::Result<()> {
        let started = Instant::now();
        if self.permit.is_rejected() {
            // Already answered in full by `Clients::reject`; say it again for
            // a client that pipelined before reading.
            let body = Reply::error(503, "max clients reached", None).body;
            let wire = respond(rsp, 503, &[JSON_TYPE, "Retry-After: 1"], None, body.len());
            rsp.body_vec(body);
            self.sent(wire);
            return Ok(());
        }
        if self.abandoned.get() || self.permit.is_cut() {
            // Bytes after a request whose end was unknown, or after a close
            // was promised: never treat them as requests.
            let body = error_body("connection is closing", None);
            let wire = respond(rsp, 400, JSON, Some(CLOSE), body.len());
            rsp.body_vec(body);
            self.sent(wire);
            return Ok(());
        }
        let _in_flight = self.permit.begin(started);
        if self.permit.draining() {
            // Shutting down: a request that arrived after the drain began
            // gets a short refusal, so no long reply is cut when reading ends.
            self.abandon();
            let body = error_body("shutting down", None);
            let wire = respond(
                rsp,
                503,
                &[JSON_TYPE, "Retry-After: 1"],
                Some(CLOSE),
                body.len(),
            );
            rsp.body_vec(body);
            self.sent(wire);
            return Ok(());
        }
        let head = req.method() == "HEAD";
        let closing = wants_close(&req);
        let reply = match body_length(&req) {
            Err(why) => {
                // Where this request ends is unknown: answer, then close.
                self.abandon();
                Reply::error(400, why, None)
            }
            Ok(len) if self.allow_writes && matches!(req.method(), "PUT" | "DELETE") => {
                self.write(req, len)
            }
            Ok(len) => {
                let reply = self.route(&req);
                if len > MAX_DISCARD {
                    self.abandon();
                } else if len > 0 {
                    let _ = io::copy(&mut req.body(), &mut io::sink());
                }
                reply
            }
        };
        // may_minihttp derives Content-Length from the body it sends, so a
        // HEAD answer carries `Content-Length: 0` (see README, limits).
        let body_len = match (&reply.raw, head) {
            (_, true) => 0,
            (Some(value), false) => value.len(),
            (None, false) => reply.body.len(),
        };
        let close = if closing && body_len <= CLOSE_AFTER_MAX_BODY {
            // Only a reply that surely fits the socket's send buffer at once
            // can be followed by a close: may_minihttp drops what it could
            // not write.
            self.abandon();
            Some(CLOSE)
        } else if self.permit.draining() {
            // Shutting down: ask the client to go; the server closes the
            // connection itself once the reply has been delivered.
            Some(CLOSE)
        } else {
            None
        };
        let mut wire = respond(rsp, reply.code, reply.headers, close, body_len);
        if let Some(status) = reply.cache_status {
            rsp.header(status);
            wire += "\r\n".len() + status.len();
        }
        if !head {
            match reply.raw {
                Some(value) => rsp.body_mut().extend_from_slice(&value),
                None => rsp.body_vec(reply.body),
            }
        }
        self.sent(wire);
        self.metrics
            .request(Frontend::Http, status_label(reply.code), started.elapsed());
        Ok(())
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
