//! A raw RESP client for byte-exact comparisons: it sends packed commands
//! (or any bytes) and reads back whole reply frames, RESP2 or RESP3, exactly
//! as they arrived, so a reply from the proxy and one from Redis can be
//! compared byte for byte.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::DEADLINE;

/// A client socket to a RESP server.
pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Connects to 127.0.0.1:`port`; reads give up after [`DEADLINE`].
    pub fn connect(port: u16) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("send {}: {e}", show(bytes)));
    }

    /// The next whole reply frame, as it came.
    pub fn frame(&mut self) -> Vec<u8> {
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return self.buf.drain(..len).collect();
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("closed; had {}", show(&self.buf)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("read: {e}; had {}", show(&self.buf)),
            }
        }
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&str]) -> Vec<u8> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call_bytes(&args)
    }

    /// [`Wire::call`] with binary arguments.
    pub fn call_bytes(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(&pack(args));
        self.frame()
    }

    /// Sends every command in one write, then reads one reply each.
    pub fn pipeline(&mut self, commands: &[Vec<&str>]) -> Vec<Vec<u8>> {
        let mut bytes = Vec::new();
        for c in commands {
            let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
            bytes.extend_from_slice(&pack(&args));
        }
        self.send(&bytes);
        commands.iter().map(|_| self.frame()).collect()
    }

    /// Switches the connection to RESP3 (`HELLO 3`), checking the reply is a map.
    pub fn hello3(&mut self) {
        let reply = self.call(&["HELLO", "3"]);
        assert!(reply.starts_with(b"%"), "HELLO 3: {}", show(&reply));
    }
}

/// `args` packed as a RESP multibulk.
pub fn pack(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The length of the first whole RESP2/RESP3 frame in `buf`, if complete.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    let mut pending: u64 = 1;
    while pending > 0 {
        let kind = *buf.get(pos)?;
        let nl = buf[pos..].iter().position(|&b| b == b'\n')?;
        let line = &buf[pos + 1..pos + nl - 1];
        let n: i64 = std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        pos += nl + 1;
        pending -= 1;
        match kind {
            b'$' | b'=' | b'!' if n >= 0 => {
                pos += n as usize + 2;
                if pos > buf.len() {
                    return None;
                }
            }
            b'*' | b'~' | b'>' if n > 0 => pending += n as u64,
            b'%' => pending += 2 * n.max(0) as u64,
            b'|' => pending += 2 * n.max(0) as u64 + 1,
            _ => {}
        }
    }
    Some(pos)
}

/// Bytes shown readably in failure messages.
pub fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(400)]);
    if bytes.len() > 400 {
        format!("{text:?}... ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}
