//! The one connect path: resolve, TCP connect, TLS (`rediss://`), AUTH,
//! SELECT (HELLO joins here). Every connection to Redis opens through
//! [`connect`]: the data links over may sockets, the invalidation listener
//! and the Sentinel watcher over std sockets on threads of their own. Each
//! step is bounded by the timeout, and a failure says whether Redis was
//! reached: a handshake that gets no reply in time is a
//! [`ConnectError::Stalled`] (a timeout, 504), not "unavailable".
//!
//! A connection is a [`Stream`]: the socket itself, or rustls over it. Both
//! are plain `Read + Write`, and read timeouts stay the socket's (may parks
//! the coroutine on the socket under rustls just the same).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use redis::{Parser, Value};
use rustls::{ClientConnection, StreamOwned};

use super::{server_error_line, tls, BackendError};
use crate::config::RedisTarget;

/// A socket the connect path can open: may's (for coroutines) or std's (for
/// a thread of its own).
pub(crate) trait Socket: Read + Write + Sized {
    fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<Self>;
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    fn set_read(&self, read: Option<Duration>) -> io::Result<()>;
}

impl Socket for may::net::TcpStream {
    fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = may::net::TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true).ok();
        Ok(stream)
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn set_read(&self, read: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)
    }
}

impl Socket for std::net::TcpStream {
    fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = std::net::TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true).ok();
        Ok(stream)
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn set_read(&self, read: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)
    }
}

/// A connection's bytes: plain TCP, or TLS over it.
pub(crate) enum Stream<S: Socket> {
    Plain(S),
    Tls(Box<StreamOwned<ClientConnection, S>>),
}

/// The stream of a data link (a may socket, for the I/O coroutines).
pub(crate) type DataStream = Stream<may::net::TcpStream>;

impl DataStream {
    /// Whether bytes (or the peer's close) wait on the socket, asked
    /// without blocking and without a socket timeout. TLS plaintext that
    /// rustls already decrypted is not seen; only socket bytes are.
    pub(crate) fn has_input(&self) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a live local, on the socket's own fd.
        let n = unsafe {
            libc::recv(
                self.socket().as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        }
    }
}

impl<S: Socket> Stream<S> {
    fn socket(&self) -> &S {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(tls) => &tls.sock,
        }
    }

    /// Sets the socket's read timeout (under TLS too).
    pub(crate) fn set_read_timeout(&self, read: Option<Duration>) -> io::Result<()> {
        self.socket().set_read(read)
    }

    /// Sets the socket's read and write timeouts.
    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> io::Result<()> {
        self.socket().set_timeouts(read, write)
    }
}

impl<S: Socket> Read for Stream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl<S: Socket> Write for Stream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            // rustls buffers what it encrypts; push it to the socket now,
            // so a write that returns has left as a plain one would have.
            Stream::Tls(tls) => {
                let n = tls.write(buf)?;
                tls.flush()?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Why a connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnectError {
    /// Not reached: no address, refused, no TCP connection in time, or lost.
    Unreachable(String),
    /// TCP is up, but the handshake got no reply in time (Redis paused or
    /// busy, e.g. `SIGSTOP` or `DEBUG SLEEP`).
    Stalled,
    /// Redis answered the handshake with an error (wrong password, bad db).
    Refused(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Unreachable(why) => f.write_str(why),
            ConnectError::Stalled => f.write_str("no reply to the handshake in time"),
            ConnectError::Refused(why) => write!(f, "setup refused: {why}"),
        }
    }
}

impl From<ConnectError> for BackendError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Stalled => BackendError::Timeout,
            other => BackendError::Unavailable(other.to_string()),
        }
    }
}

/// An open, authenticated connection and its parser state.
pub(crate) struct Conn<S: Socket> {
    pub stream: Stream<S>,
    pub parser: Parser,
}

/// Opens a connection to `target` and runs the handshake (AUTH when a
/// password is set, SELECT when the db is not 0), then `extra` (packed
/// commands the caller wants in the same write, e.g. `CLIENT ID`), whose
/// `extra_replies` replies come back as sent, errors included.
pub(crate) fn connect<S: Socket>(
    target: &RedisTarget,
    timeout: Duration,
    extra: &[u8],
    extra_replies: usize,
) -> Result<(Conn<S>, Vec<Value>), ConnectError> {
    connect_speaking::<S>(target, timeout, 2, extra, extra_replies)
}

/// [`connect`] speaking RESP `protocol` (2 or 3): for 3 the handshake
/// starts with `HELLO 3` (carrying AUTH), and every reply after it,
/// `extra`'s included, comes in RESP3.
pub(crate) fn connect_speaking<S: Socket>(
    target: &RedisTarget,
    timeout: Duration,
    protocol: u8,
    extra: &[u8],
    extra_replies: usize,
) -> Result<(Conn<S>, Vec<Value>), ConnectError> {
    let addr = resolve(&target.host, target.port).map_err(ConnectError::Unreachable)?;
    let socket = S::open(&addr, timeout).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let stream = match &target.tls {
        None => Stream::Plain(socket),
        Some(tls) => Stream::Tls(Box::new(tls_handshake(tls, &target.host, socket, timeout)?)),
    };
    let mut conn = Conn {
        stream,
        parser: Parser::new(),
    };
    let (mut cmds, mut handshake) = handshake(target, protocol);
    if target.tls.is_some() && handshake == 0 {
        // A TLS 1.3 server refuses a client certificate only after the
        // handshake: one round trip here makes that a failed connect, with
        // its reason, rather than a link that dies on its first request.
        redis::cmd("PING").write_packed_command(&mut cmds);
        handshake += 1;
    }
    cmds.extend_from_slice(extra);
    if cmds.is_empty() {
        return Ok((conn, Vec::new()));
    }
    conn.stream
        .set_timeouts(Some(timeout), Some(timeout))
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    conn.stream.write_all(&cmds).map_err(|e| {
        if is_timeout(&e) {
            ConnectError::Stalled
        } else {
            ConnectError::Unreachable(format!("setup write failed: {e}"))
        }
    })?;
    let mut replies = Vec::with_capacity(extra_replies);
    for i in 0..handshake + extra_replies {
        match conn.parser.parse_value(&mut conn.stream) {
            Ok(Value::ServerError(err)) if i < handshake => {
                return Err(ConnectError::Refused(server_error_line(&err)))
            }
            Ok(_) if i < handshake => {}
            Ok(value) => replies.push(value),
            Err(e) if e.is_timeout() => return Err(ConnectError::Stalled),
            Err(e) => {
                // The redis crate keeps the I/O error (and in it, rustls's)
                // behind an `Arc<dyn Error>`.
                type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
                let tls = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<Shared>())
                    .and_then(|inner| (**inner).downcast_ref::<io::Error>())
                    .and_then(tls::describe);
                return Err(ConnectError::Unreachable(
                    tls.unwrap_or_else(|| format!("setup failed: {e}")),
                ));
            }
        }
    }
    Ok((conn, replies))
}

/// The TLS handshake over `socket`, each read and write of it bounded by
/// `timeout`.
fn tls_handshake<S: Socket>(
    tls: &tls::Tls,
    host: &str,
    socket: S,
    timeout: Duration,
) -> Result<StreamOwned<ClientConnection, S>, ConnectError> {
    socket
        .set_timeouts(Some(timeout), Some(timeout))
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let session = tls.session(host).map_err(ConnectError::Unreachable)?;
    let mut stream = StreamOwned::new(session, socket);
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            if is_timeout(&e) {
                return Err(ConnectError::Stalled);
            }
            return Err(ConnectError::Unreachable(
                tls::describe(&e).unwrap_or_else(|| format!("TLS handshake failed: {e}")),
            ));
        }
    }
    Ok(stream)
}

/// The handshake commands for `target` in RESP `protocol` and how many
/// replies they produce.
fn handshake(target: &RedisTarget, protocol: u8) -> (Vec<u8>, usize) {
    let mut cmds = Vec::new();
    let mut replies = 0;
    if protocol == 3 {
        // HELLO takes the credentials itself: one round trip, and AUTH's
        // reply would already be RESP3 anyway.
        let mut hello = redis::cmd("HELLO");
        hello.arg(3);
        if let Some(password) = &target.password {
            let user = target.username.as_deref().unwrap_or("default");
            hello.arg("AUTH").arg(user).arg(password);
        }
        hello.write_packed_command(&mut cmds);
        replies += 1;
    } else if let Some(password) = &target.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &target.username {
            auth.arg(user);
        }
        auth.arg(password).write_packed_command(&mut cmds);
        replies += 1;
    }
    if target.db != 0 {
        redis::cmd("SELECT")
            .arg(target.db)
            .write_packed_command(&mut cmds);
        replies += 1;
    }
    (cmds, replies)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// The first address of `host:port`.
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(password: Option<&str>, db: i64) -> RedisTarget {
        RedisTarget {
            host: "127.0.0.1".into(),
            port: 6379,
            db,
            username: None,
            password: password.map(Into::into),
            tls: None,
        }
    }

    /// AUTH and SELECT are sent only when needed, each with one reply.
    #[test]
    fn handshake_sends_only_what_is_needed() {
        assert_eq!(handshake(&target(None, 0), 2), (Vec::new(), 0));
        let (cmds, n) = handshake(&target(Some("pw"), 1), 2);
        assert_eq!(n, 2);
        let text = String::from_utf8_lossy(&cmds);
        assert!(text.contains("AUTH") && text.contains("SELECT"), "{text}");
    }

    /// RESP3 links open with `HELLO 3`, the credentials folded into it.
    #[test]
    fn resp3_handshake_is_hello_with_auth() {
        let (cmds, n) = handshake(&target(None, 0), 3);
        assert_eq!(
            (cmds, n),
            (redis::cmd("HELLO").arg(3).get_packed_command(), 1)
        );
        let (cmds, n) = handshake(&target(Some("pw"), 2), 3);
        assert_eq!(n, 2);
        let want = redis::cmd("HELLO")
            .arg(3)
            .arg("AUTH")
            .arg("default")
            .arg("pw")
            .get_packed_command();
        assert!(
            cmds.starts_with(&want),
            "{:?}",
            String::from_utf8_lossy(&cmds)
        );
    }

    /// A stalled handshake is a timeout; anything else that fails is unavailable.
    #[test]
    fn stalled_is_a_timeout() {
        assert_eq!(
            BackendError::from(ConnectError::Stalled),
            BackendError::Timeout
        );
        assert!(matches!(
            BackendError::from(ConnectError::Refused("ERR x".into())),
            BackendError::Unavailable(_)
        ));
    }

    /// A listener that accepts but never answers stalls the handshake:
    /// [`ConnectError::Stalled`], after about the timeout.
    #[test]
    fn silent_server_stalls_the_handshake() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = target(Some("pw"), 0);
        t.port = listener.local_addr().unwrap().port();
        let got = connect::<std::net::TcpStream>(&t, Duration::from_millis(100), &[], 0);
        assert_eq!(got.err(), Some(ConnectError::Stalled));
        drop(listener);
    }

    /// A TLS handshake that gets no answer is bounded by the timeout too:
    /// [`ConnectError::Stalled`], as for a plain handshake.
    #[test]
    fn silent_server_stalls_the_tls_handshake() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = target(None, 0);
        t.port = listener.local_addr().unwrap().port();
        t.tls = Some(tls::Tls::load(&tls::TlsOptions::default()).unwrap());
        let got = connect::<std::net::TcpStream>(&t, Duration::from_millis(100), &[], 0);
        assert_eq!(got.err(), Some(ConnectError::Stalled));
        drop(listener);
    }

    /// A server that is not TLS at all fails the handshake with a reason.
    #[test]
    fn plain_server_fails_the_tls_handshake() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = target(None, 0);
        t.port = listener.local_addr().unwrap().port();
        t.tls = Some(tls::Tls::load(&tls::TlsOptions::default()).unwrap());
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(b"-ERR unknown command\r\n").unwrap();
        });
        match connect::<std::net::TcpStream>(&t, Duration::from_secs(2), &[], 0).err() {
            Some(ConnectError::Unreachable(why)) => assert!(why.contains("TLS"), "{why}"),
            other => panic!("expected a failed TLS handshake, got {other:?}"),
        }
        server.join().unwrap();
    }
}
