//! http::parse: one request head (request line and headers) out of the
//! connection's read buffer, with httparse, reduced to what the front end
//! acts on. Owns the head-size and header-count bounds and the body-length
//! rules; never reads a socket and never sees a body.

use std::mem::MaybeUninit;

use crate::config::MAX_HEAD_BYTES;

/// Most request headers read; a head with more is answered 431.
pub const MAX_HEADERS: usize = 128;

/// The methods the front end tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    Delete,
    Other,
}

/// How long the request's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// `Content-Length` (0 when absent).
    Bytes(usize),
    /// Where the request ends cannot be told (chunked, a bad or conflicting
    /// `Content-Length`): answered 400, then the connection is closed.
    Unknown(&'static str),
}

/// A complete, well-formed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'a> {
    pub method: Method,
    /// The target in origin form (`/key?query`): an absolute-form target
    /// (`http://host/key`) loses its scheme and authority.
    pub target: &'a [u8],
    /// Bytes of the head, the blank line included.
    pub len: usize,
    pub body: BodyLength,
    /// HTTP/1.0.
    pub http10: bool,
    /// The client asked for the connection to end after this reply
    /// (`Connection: close`, or HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`: the reply says it back.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Accept` names `application/json`.
    pub accept_json: bool,
}

/// Why a head cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Over [`MAX_HEAD_BYTES`] (431).
    TooLarge,
    /// Over [`MAX_HEADERS`] headers (431).
    TooManyHeaders,
    /// Not HTTP/1.x (400).
    Malformed,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed => 400,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            HeadError::TooLarge => "request head too large: at most 131072 bytes",
            HeadError::TooManyHeaders => "too many request headers: at most 128",
            HeadError::Malformed => "malformed request",
        }
    }
}

/// Parses the head at the start of `buf`. `Ok(None)`: it has not ended yet
/// (and is within the bound). The bound is exact: a head of
/// [`MAX_HEAD_BYTES`] bytes, blank line included, is served; one byte more is not.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head<'_>>, HeadError> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) if buf.len() > MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        _ => Method::Other,
    };
    let http10 = req.version == Some(0);
    let mut head = Head {
        method,
        target: origin_form(req.path.unwrap_or("/").as_bytes()),
        len,
        body: BodyLength::Bytes(0),
        http10,
        close: false,
        keep_alive: false,
        expect_continue: false,
        accept_json: false,
    };
    let mut length = None;
    let mut asked_close = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                asked_close |= token.eq_ignore_ascii_case(b"close");
                head.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match (content_length(h.value), length) {
                (None, _) => head.body = BodyLength::Unknown("malformed Content-Length"),
                (Some(n), Some(l)) if n != l => {
                    head.body = BodyLength::Unknown("conflicting Content-Length headers")
                }
                (Some(n), _) => length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.body =
                BodyLength::Unknown("chunked bodies are not supported: send Content-Length");
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.expect_continue |= h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"accept") {
            head.accept_json |= h
                .value
                .windows(b"application/json".len())
                .any(|w| w.eq_ignore_ascii_case(b"application/json"));
        }
    }
    if head.body == BodyLength::Bytes(0) {
        head.body = BodyLength::Bytes(length.unwrap_or(0));
    }
    // HTTP/1.0 closes unless asked not to; keep-alive is said back only there.
    head.close = asked_close || (http10 && !head.keep_alive);
    head.keep_alive &= http10 && !asked_close;
    Ok(Some(head))
}

/// A `Content-Length` value: digits only, surrounding blanks allowed.
fn content_length(value: &[u8]) -> Option<usize> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `http://host:port/key?q` -> `/key?q`; `http://host` -> `/`; anything
/// else is returned as it is.
fn origin_form(target: &[u8]) -> &[u8] {
    let rest = [&b"http://"[..], b"https://"].iter().find_map(|scheme| {
        (target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme))
            .then(|| &target[scheme.len()..])
    });
    match rest {
        None => target,
        Some(rest) => match rest.iter().position(|b| *b == b'/') {
            Some(i) => &rest[i..],
            None => b"/",
        },
    }
}

/// True if `buf` may hold the end of a head that began before `from`:
/// a blank line (`\n\n` or `\n\r\n`) at or after `from`, looking back 2
/// bytes for one split across reads. Lets the connection loop re-parse a
/// growing head only when it may have ended (linear in the bytes, not
/// quadratic).
pub fn may_end_head(buf: &[u8], from: usize) -> bool {
    let from = from.saturating_sub(2);
    let tail = &buf[from.min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head<'_> {
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    /// A plain GET: method, target, length of the head, keep-alive by default.
    #[test]
    fn plain_get() {
        let h = head("GET /k?format=json HTTP/1.1\r\nHost: x\r\n\r\nrest");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.target, b"/k?format=json");
        assert_eq!(h.len, 40);
        assert_eq!(h.body, BodyLength::Bytes(0));
        assert!(!h.close && !h.keep_alive && !h.http10);
    }

    /// An unfinished head is `None`; garbage is malformed.
    #[test]
    fn partial_and_garbage() {
        assert_eq!(parse_head(b"GET /k HTTP/1.1\r\nHost:"), Ok(None));
        assert_eq!(
            parse_head(b"\x00\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(parse_head(b"GET /k\r\n\r\n"), Err(HeadError::Malformed));
    }

    /// Absolute-form targets name the path only.
    #[test]
    fn absolute_form() {
        assert_eq!(head("GET http://host:1/k1 HTTP/1.1\r\n\r\n").target, b"/k1");
        assert_eq!(head("GET HTTPS://host HTTP/1.1\r\n\r\n").target, b"/");
        assert_eq!(head("GET /http://x HTTP/1.1\r\n\r\n").target, b"/http://x");
    }

    /// Connection handling for 1.0 and 1.1.
    #[test]
    fn connection_tokens() {
        let h = head("GET / HTTP/1.0\r\n\r\n");
        assert!(h.close && !h.keep_alive);
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(!h.close && h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n");
        assert!(h.close && !h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
        assert!(!h.close && !h.keep_alive);
    }

    /// Bodies whose end is unknown are flagged; lengths parse.
    #[test]
    fn body_lengths() {
        let len = |extra: &str| head(&format!("PUT /k HTTP/1.1\r\n{extra}\r\n")).body;
        assert_eq!(len("Content-Length: 12\r\n"), BodyLength::Bytes(12));
        assert!(matches!(
            len("Content-Length: abc\r\n"),
            BodyLength::Unknown(_)
        ));
        assert!(matches!(
            len("Content-Length: 1\r\nContent-Length: 2\r\n"),
            BodyLength::Unknown(_)
        ));
        assert_eq!(
            len("Content-Length: 2\r\nContent-Length: 2\r\n"),
            BodyLength::Bytes(2)
        );
        assert!(matches!(
            len("Transfer-Encoding: chunked\r\n"),
            BodyLength::Unknown(_)
        ));
        assert!(head("PUT /k HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    /// The head bound is exact, and many headers are fine up to the count bound.
    #[test]
    fn bounds() {
        let padded = |total: usize| {
            let start = "GET /k HTTP/1.1\r\nX-Pad: ";
            let pad = total - start.len() - 4;
            format!("{start}{}\r\n\r\n", "p".repeat(pad))
        };
        assert_eq!(head(&padded(MAX_HEAD_BYTES)).len, MAX_HEAD_BYTES);
        assert_eq!(
            parse_head(padded(MAX_HEAD_BYTES + 1).as_bytes()),
            Err(HeadError::TooLarge)
        );
        let unfinished = vec![b'p'; MAX_HEAD_BYTES + 1];
        let mut unfinished_head = b"GET /k HTTP/1.1\r\nX: ".to_vec();
        unfinished_head.extend_from_slice(&unfinished);
        assert_eq!(parse_head(&unfinished_head), Err(HeadError::TooLarge));
        let many = |n: usize| {
            let mut s = "GET /k HTTP/1.1\r\n".to_string();
            for i in 0..n {
                s.push_str(&format!("X-{i}: v\r\n"));
            }
            s + "\r\n"
        };
        assert!(parse_head(many(100).as_bytes()).unwrap().is_some());
        assert_eq!(
            parse_head(many(MAX_HEADERS + 1).as_bytes()),
            Err(HeadError::TooManyHeaders)
        );
    }

    /// The end-of-head check finds blank lines, also split across reads.
    #[test]
    fn end_of_head_scan() {
        assert!(may_end_head(b"GET / HTTP/1.1\r\n\r\n", 17));
        assert!(may_end_head(b"GET / HTTP/1.1\r\n\r\n", 16));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: x", 10));
        assert!(may_end_head(b"a\n\nb", 3));
    }
}
