//! resp::parse: the request parser (multibulk and inline), incremental.
//!
//! A [`Parser`] keeps its place inside a command that has not fully arrived,
//! so a request costs time linear in its bytes however the reads split it
//! (restarting from the first argument on every read made a request of a
//! million arguments quadratic: seconds of CPU). Limits and strictness are
//! Redis's: at most [`MAX_ARGS`] arguments, inline lines of at most
//! [`MAX_INLINE`] bytes, lengths as canonical decimals. Knows nothing of
//! sockets or commands: it hands back byte ranges of the buffer.

use std::ops::Range;

/// Longest inline command line, as in Redis.
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one multibulk command, as in Redis.
pub const MAX_ARGS: i64 = 1024 * 1024;
/// Argument ranges kept allocated between commands; a larger command's are
/// released once it is done.
const KEEP_ARGS: usize = 4096;

/// A request that cannot be parsed; the connection is answered
/// `-ERR Protocol error: <msg>` and closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// The outcome of parsing the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// One command of `consumed` bytes; its arguments are byte ranges of
    /// the buffer. No arguments means a blank line or `*0`.
    Complete { consumed: usize },
    /// Not enough bytes yet: retry once the buffer holds at least `need`.
    Incomplete { need: usize },
}

/// Parses the commands of one connection, one at a time, from a buffer that
/// grows between calls.
#[derive(Debug, Default)]
pub struct Parser {
    /// The current (or last complete) command's arguments, as ranges of the
    /// buffer that starts at the command.
    args: Vec<Range<usize>>,
    state: State,
}

/// Where the parser stands inside the command at the start of the buffer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before its first byte (or the header line is not complete yet).
    #[default]
    Start,
    /// A multibulk with `left` arguments still to come, the next at `pos`.
    Multi { left: i64, pos: usize },
    /// An inline line with no `\n` in its first `scanned` bytes.
    Inline { scanned: usize },
}

impl Parser {
    /// A parser at the start of a command.
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Parses the command at the start of `buf`; never panics and never asks
    /// for more than `max` bytes for one command. After `Incomplete`, the
    /// next call must get the same bytes again (the same command start)
    /// with more behind them: the parser resumes where it stopped. After
    /// `Complete` or an error, the next call starts a new command.
    pub fn parse(&mut self, buf: &[u8], max: usize) -> Result<Parsed, ProtocolError> {
        let result = self.resume(buf, max);
        if !matches!(result, Ok(Parsed::Incomplete { .. })) {
            self.state = State::Start;
        }
        result
    }

    /// The arguments of the command last returned `Complete`, as byte
    /// ranges of the buffer it was parsed from.
    pub fn args(&self) -> &[Range<usize>] {
        &self.args
    }

    fn resume(&mut self, buf: &[u8], max: usize) -> Result<Parsed, ProtocolError> {
        let (mut left, mut pos) = match self.state {
            State::Multi { left, pos } => (left, pos),
            State::Inline { scanned } => return self.inline(buf, MAX_INLINE.min(max), scanned),
            State::Start => {
                self.args.clear();
                if self.args.capacity() > KEEP_ARGS {
                    self.args = Vec::new();
                }
                if buf.is_empty() {
                    return Ok(Parsed::Incomplete { need: 1 });
                }
                if buf[0] != b'*' {
                    return self.inline(buf, MAX_INLINE.min(max), 0);
                }
                let Some((count, pos)) = read_int_line(buf, 1, "invalid multibulk length")? else {
                    return Ok(Parsed::Incomplete {
                        need: buf.len() + 1,
                    });
                };
                if count > MAX_ARGS {
                    return Err(ProtocolError("invalid multibulk length".into()));
                }
                (count.max(0), pos)
            }
        };
        while left > 0 {
            match self.bulk(buf, max, pos)? {
                Ok(next) => pos = next,
                Err(need) => {
                    self.state = State::Multi { left, pos };
                    return Ok(Parsed::Incomplete { need });
                }
            }
            left -= 1;
        }
        Ok(Parsed::Complete { consumed: pos })
    }

    /// Reads the bulk string at `pos`: `Ok(end)` past its CRLF once it is
    /// all there (its range pushed), `Err(need)` while it is not.
    fn bulk(
        &mut self,
        buf: &[u8],
        max: usize,
        pos: usize,
    ) -> Result<Result<usize, usize>, ProtocolError> {
        if pos >= buf.len() {
            return Ok(Err(pos + 1));
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                char::from(buf[pos]).escape_default()
            )));
        }
        let Some((len, start)) = read_int_line(buf, pos + 1, "invalid bulk length")? else {
            return Ok(Err(buf.len() + 1));
        };
        if len < 0 || len as u64 > max as u64 {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        let end = start + len as usize;
        if end + 2 > max {
            return Err(ProtocolError("request too large".into()));
        }
        if buf.len() < end + 2 {
            return Ok(Err(end + 2));
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("expected CRLF after bulk data".into()));
        }
        self.args.push(start..end);
        Ok(Ok(end + 2))
    }

    /// An inline command: one line of words split on spaces and tabs, ended
    /// by LF or CRLF; the first `scanned` bytes are known to hold no LF.
    fn inline(
        &mut self,
        buf: &[u8],
        limit: usize,
        scanned: usize,
    ) -> Result<Parsed, ProtocolError> {
        let window = &buf[scanned.min(buf.len())..buf.len().min(limit + 1)];
        let Some(nl) = window.iter().position(|b| *b == b'\n').map(|i| scanned + i) else {
            if buf.len() > limit {
                return Err(ProtocolError("too big inline request".into()));
            }
            self.state = State::Inline { scanned: buf.len() };
            return Ok(Parsed::Incomplete {
                need: buf.len() + 1,
            });
        };
        let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        let mut i = 0;
        while i < line_end {
            while i < line_end && (buf[i] == b' ' || buf[i] == b'\t') {
                i += 1;
            }
            let start = i;
            while i < line_end && buf[i] != b' ' && buf[i] != b'\t' {
                i += 1;
            }
            if i > start {
                self.args.push(start..i);
            }
        }
        Ok(Parsed::Complete { consumed: nl + 1 })
    }
}

/// Parses one command from the start of `buf` into `args`, in one go: the
/// reference the incremental [`Parser`] must agree with.
pub fn parse(
    buf: &[u8],
    max: usize,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    let mut parser = Parser {
        args: std::mem::take(args),
        state: State::Start,
    };
    let result = parser.parse(buf, max);
    *args = parser.args;
    result
}

/// Reads `<digits>\r\n` starting at `from`; `None` when the line is not
/// complete yet. Lines longer than any valid length are errors.
fn read_int_line(
    buf: &[u8],
    from: usize,
    what: &str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    const MAX_LINE: usize = 24;
    let window = &buf[from.min(buf.len())..buf.len().min(from + MAX_LINE)];
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        if window.len() >= MAX_LINE {
            return Err(ProtocolError(what.into()));
        }
        return Ok(None);
    };
    if from + cr + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[from + cr + 1] != b'\n' {
        return Err(ProtocolError(what.into()));
    }
    // As strict as Redis: an optional '-', then digits without leading zeros.
    let line = &window[..cr];
    let digits = line.strip_prefix(b"-").unwrap_or(line);
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || digits.len() == 1);
    if !canonical {
        return Err(ProtocolError(what.into()));
    }
    let n: i64 = std::str::from_utf8(line)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| ProtocolError(what.into()))?;
    Ok(Some((n, from + cr + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Commands = Vec<Vec<Vec<u8>>>;

    fn parse_all(input: &[u8]) -> Result<Commands, ProtocolError> {
        let mut args = Vec::new();
        let mut pos = 0;
        let mut cmds = Vec::new();
        loop {
            match parse(&input[pos..], 1 << 20, &mut args)? {
                Parsed::Complete { consumed } => {
                    if !args.is_empty() {
                        cmds.push(
                            args.iter()
                                .map(|r| input[pos + r.start..pos + r.end].to_vec())
                                .collect(),
                        );
                    }
                    pos += consumed;
                }
                Parsed::Incomplete { .. } => return Ok(cmds),
            }
        }
    }

    /// Feeds `input` to one [`Parser`] the way the connection loop does: the
    /// bytes arrive in pieces ending at `cuts`, and parsing runs only once
    /// `need` bytes are buffered. Returns the commands and the error, if any.
    fn feed(input: &[u8], cuts: &[usize], max: usize) -> (Commands, Option<ProtocolError>) {
        let mut parser = Parser::new();
        let (mut start, mut need, mut cmds) = (0, 1, Vec::new());
        for &avail in cuts.iter().chain([&input.len()]) {
            while avail - start >= need {
                match parser.parse(&input[start..avail], max) {
                    Ok(Parsed::Complete { consumed }) => {
                        if !parser.args().is_empty() {
                            cmds.push(
                                parser
                                    .args()
                                    .iter()
                                    .map(|r| input[start + r.start..start + r.end].to_vec())
                                    .collect(),
                            );
                        }
                        start += consumed;
                        need = 1;
                    }
                    Ok(Parsed::Incomplete { need: n }) => {
                        assert!(n > avail - start, "need must ask for more bytes");
                        need = n;
                    }
                    Err(e) => return (cmds, Some(e)),
                }
            }
        }
        (cmds, None)
    }

    /// A multibulk command parses into its arguments, binary-safe.
    #[test]
    fn multibulk() {
        let cmds = parse_all(b"*2\r\n$3\r\nGET\r\n$3\r\na\r\n\r\n").unwrap();
        assert_eq!(cmds, vec![vec![b"GET".to_vec(), b"a\r\n".to_vec()]]);
    }

    /// Inline commands split on spaces; CRLF or LF ends them.
    #[test]
    fn inline() {
        let cmds = parse_all(b"PING\r\nGET  key\n\r\n").unwrap();
        assert_eq!(
            cmds,
            vec![
                vec![b"PING".to_vec()],
                vec![b"GET".to_vec(), b"key".to_vec()]
            ]
        );
    }

    /// A pipeline split once at every byte boundary, or into single bytes,
    /// parses to the same commands through one resuming parser.
    #[test]
    fn split_at_every_byte() {
        let input: &[u8] =
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$0\r\n\r\n";
        let whole = parse_all(input).unwrap();
        assert_eq!(whole.len(), 3);
        for cut in 0..input.len() {
            assert_eq!(feed(input, &[cut], 1 << 20), (whole.clone(), None), "{cut}");
        }
        let bytes: Vec<usize> = (0..input.len()).collect();
        assert_eq!(feed(input, &bytes, 1 << 20), (whole, None));
    }

    /// Errors do not depend on how the bytes arrived either.
    #[test]
    fn errors_split_at_every_byte() {
        for input in [
            &b"PING\r\n*2\r\n$3\r\nGET\r\n$3\r\nkeyXX"[..],
            b"*3\r\n$3\r\nDEL\r\n$1\r\na\r\n+a\r\n",
            b"*2\r\n$3\r\nGET\r\n$2000\r\n",
        ] {
            let whole = feed(input, &[], 1024);
            assert!(whole.1.is_some(), "{input:?}");
            let bytes: Vec<usize> = (0..input.len()).collect();
            assert_eq!(feed(input, &bytes, 1024), whole, "{input:?}");
        }
    }

    /// A command of many arguments arriving a few bytes at a time costs
    /// work linear in its bytes: every byte is looked at a bounded number of
    /// times (counted here as the bytes each call is handed past what it had
    /// already seen, which stays small only if it resumes).
    #[test]
    fn resumes_inside_a_long_command() {
        let n = 20_000;
        let mut input = format!("*{}\r\n$3\r\nDEL\r\n", n + 1).into_bytes();
        for _ in 0..n {
            input.extend_from_slice(b"$1\r\na\r\n");
        }
        let mut parser = Parser::new();
        let mut avail = 0;
        let mut calls = 0;
        let consumed = loop {
            avail = (avail + 5).min(input.len());
            calls += 1;
            match parser.parse(&input[..avail], usize::MAX).unwrap() {
                Parsed::Complete { consumed } => break consumed,
                Parsed::Incomplete { need } => assert!(need > avail),
            }
            // Resuming: the parser's saved position moves with the input.
            if let State::Multi { pos, .. } = parser.state {
                assert!(avail - pos <= 12, "stuck at {pos} of {avail}");
            }
        };
        assert_eq!(consumed, input.len());
        assert_eq!(parser.args().len(), n + 1);
        assert!(calls <= input.len() / 5 + 1);
    }

    /// An inline line arriving byte by byte is scanned once, not again from
    /// its start on every byte.
    #[test]
    fn resumes_inside_an_inline_line() {
        let line = b"GET some-key\r\n";
        let mut parser = Parser::new();
        for avail in 1..line.len() {
            assert_eq!(
                parser.parse(&line[..avail], 1 << 20),
                Ok(Parsed::Incomplete { need: avail + 1 })
            );
            assert_eq!(parser.state, State::Inline { scanned: avail });
        }
        assert_eq!(
            parser.parse(line, 1 << 20),
            Ok(Parsed::Complete {
                consumed: line.len()
            })
        );
        assert_eq!(parser.args(), &[0..3, 4..12]);
    }

    /// Malformed input is a protocol error, never a panic.
    #[test]
    fn malformed() {
        let mut args = Vec::new();
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n+GET\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*99999999999999999999999\r\n",
            b"*1\r\n$1\rX",
            b"*+1\r\n$3\r\nGET\r\n",
            b"*1\r\n$03\r\nGET\r\n",
        ] {
            assert!(parse(bad, 1 << 20, &mut args).is_err(), "{bad:?}");
        }
        assert!(parse(&[b'a'; MAX_INLINE + 2], 1 << 20, &mut args).is_err());
    }

    /// An inline command longer than the request bound is refused.
    #[test]
    fn inline_over_limit() {
        let mut args = Vec::new();
        let mut line = b"GET ".to_vec();
        line.extend(std::iter::repeat_n(b'x', 2000));
        assert!(parse(&line, 1024, &mut args).is_err());
        line.extend_from_slice(b"\r\n");
        assert!(parse(&line, 1024, &mut args).is_err());
        assert!(parse(&line, 4096, &mut args).is_ok());
    }

    /// A bulk longer than the request bound is refused before it is buffered.
    #[test]
    fn bulk_over_limit() {
        let mut args = Vec::new();
        assert!(parse(b"*1\r\n$2000\r\n", 1024, &mut args).is_err());
        assert_eq!(
            parse(b"*1\r\n$1000\r\n", 1024, &mut args),
            Ok(Parsed::Incomplete { need: 1013 })
        );
    }
}
