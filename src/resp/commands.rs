//! resp::commands: what the RESP front end does with each command.
//!
//! The commands the proxy serves itself are one table (name, arity, flags,
//! keys, handler) with one function each. Every other command is judged by
//! [`policy`] from what Redis's own `COMMAND` says of it (the table the core
//! learned, [`CommandTable`]): `readonly` ones pass through uncached, `write`
//! ones pass through only with `PROXY_ALLOW_WRITES` (their keys dropped from
//! the cache), the contract's list is refused, and a name Redis does not
//! know is an unknown command. Inside `MULTI` commands are queued in the
//! session and sent as one block at `EXEC`. `COMMAND` answers from the same
//! policy, so what it lists is what is served.
//!
//! Handlers write their reply through [`Out`] and return how the command
//! went; an error reply is a returned [`Refused`], which the dispatcher
//! writes and counts. They never parse bytes or touch the socket.

use std::borrow::Cow;
use std::ops::Range;

use super::ahead::Ahead;
use super::{backend_error_line, hello_reply, info_text, Next, Out, RespShared, Session};
use crate::backend::commands::{Flags, Found, Spec};
use crate::backend::{BackendError, CommandTable, Pass, Protocol};
use crate::cache::Value;
use crate::metrics::{Status, Tally};
use crate::proxy::{Lookup, Written};

/// How a served command ended (its reply already written).
pub(super) enum Done {
    /// Answered; counted as `ok`.
    Ok,
    /// Answered with a nil; counted as `nil`.
    Nil,
    /// Answered with an error Redis sent; counted as `error`.
    Error,
    /// Answered; the connection closes after this reply.
    Close,
}

/// An error reply line (without the leading `-`); counted as `error`.
pub(super) struct Refused(Cow<'static, str>);

impl From<&'static str> for Refused {
    fn from(line: &'static str) -> Self {
        Refused(Cow::Borrowed(line))
    }
}

impl From<String> for Refused {
    fn from(line: String) -> Self {
        Refused(Cow::Owned(line))
    }
}

type Outcome = Result<Done, Refused>;

/// What a handler may use besides its arguments.
pub(super) struct Call<'a> {
    pub out: Out<'a>,
    pub shared: &'a RespShared,
    /// The client's fd: its id, and the hint that picks its Redis connection.
    pub fd: usize,
    pub session: &'a mut Session,
}

/// One command the proxy serves itself.
pub(super) struct Command {
    /// Lower case, as `COMMAND` reports it.
    pub name: &'static str,
    /// Redis's arity: the name counts; negative means at least `-arity`.
    pub arity: i64,
    pub flags: &'static [&'static str],
    /// First key, last key (negative counts from the end), step; all 0 when
    /// the command takes no keys. As `COMMAND INFO` and `GETKEYS` report them.
    pub keys: (i64, i64, i64),
    /// Runs the command on its arguments (the name excluded), arity checked.
    pub run: fn(&mut Call<'_>, &[&[u8]]) -> Outcome,
}

const NO_KEYS: (i64, i64, i64) = (0, 0, 0);

const fn cmd(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
    run: fn(&mut Call<'_>, &[&[u8]]) -> Outcome,
) -> Command {
    Command {
        name,
        arity,
        flags,
        keys,
        run,
    }
}

/// Every command the proxy serves itself; GET first, as the hot path looks
/// it up first.
pub(super) const COMMANDS: &[Command] = &[
    cmd("get", 2, &["readonly", "fast"], (1, 1, 1), get),
    cmd("mget", -2, &["readonly", "fast"], (1, -1, 1), mget),
    cmd("ping", -1, &["fast"], NO_KEYS, ping),
    cmd("echo", 2, &["fast"], NO_KEYS, echo),
    cmd("quit", -1, &["fast"], NO_KEYS, quit),
    cmd("reset", 1, &["fast"], NO_KEYS, reset),
    cmd("hello", -1, &["fast"], NO_KEYS, hello),
    cmd("command", -1, &["loading"], NO_KEYS, command),
    cmd("client", -2, &["loading"], NO_KEYS, client),
    cmd("select", 2, &["loading", "fast"], NO_KEYS, select),
    cmd("info", -1, &["loading"], NO_KEYS, info),
    cmd("multi", 1, &["fast"], NO_KEYS, multi),
    cmd("exec", 1, &["loading"], NO_KEYS, exec),
    cmd("discard", 1, &["fast"], NO_KEYS, discard),
];

/// Refused by name, whatever Redis says of them (so also before the
/// command table is learned): the proxy cannot keep their per-connection
/// state on shared, pipelined Redis connections.
const REFUSED: &[&str] = &[
    "watch",
    "unwatch",
    "auth",
    "monitor",
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
];

/// Writes Redis does not flag `write` (Redis 7.0 does not show its
/// `may_replicate` flag): PUBLISH counts as a write (DESIGN.md), a script
/// may write anything, and SCRIPT LOAD is what EVALSHA users (redis-py's
/// `register_script`) send first.
const WRITE_LIKE: &[&str] = &[
    "publish",
    "spublish",
    "eval",
    "evalsha",
    "fcall",
    "script|load",
];

/// The written answer when writes are off.
const WRITES_OFF: &str = "ERR write commands are disabled on this proxy (set PROXY_ALLOW_WRITES)";

/// The served command named `name` (lower case), if any.
fn lookup(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

fn arity_ok(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

fn wrong_arity(name: &str) -> Refused {
    format!("ERR wrong number of arguments for '{name}' command").into()
}

fn refused(name: &str) -> Refused {
    format!("ERR '{name}' is not supported by redis-proxy").into()
}

/// Redis 7's own words for a command it does not know.
fn unknown_command(argv: &[&[u8]]) -> Refused {
    let name = String::from_utf8_lossy(&argv[0][..argv[0].len().min(128)]).into_owned();
    let mut args = String::new();
    for arg in &argv[1..] {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        let shown = String::from_utf8_lossy(&arg[..arg.len().min(room)]);
        args.push_str(&format!("'{shown}' "));
    }
    format!("ERR unknown command '{name}', with args beginning with: {args}").into()
}

/// What the proxy does with a command Redis knows (not one of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Passed through uncached.
    Read,
    /// Passed through with writes on; its keys are dropped from the cache.
    Write,
    /// A write, with writes off.
    WritesOff,
    /// The contract's refusals: admin, blocking, pub/sub, and whatever is
    /// neither `readonly` nor a write (`TIME`, `WAIT`, `SCRIPT EXISTS`, ...).
    Refused,
}

/// The policy for `spec`, from its flags.
fn policy(spec: &Spec, allow_writes: bool) -> Policy {
    let f = spec.flags;
    // XREAD and XREADGROUP block only with BLOCK (checked per call).
    let stream_read = matches!(spec.name.as_str(), "xread" | "xreadgroup");
    let write_like = WRITE_LIKE.contains(&spec.name.as_str());
    if REFUSED.contains(&spec.name.as_str())
        || f.has(Flags::ADMIN)
        || (f.has(Flags::BLOCKING) && !stream_read)
        || (f.has(Flags::PUBSUB) && !write_like)
    {
        return Policy::Refused;
    }
    if f.has(Flags::WRITE) || write_like {
        return if allow_writes {
            Policy::Write
        } else {
            Policy::WritesOff
        };
    }
    if f.has(Flags::READONLY) {
        Policy::Read
    } else {
        Policy::Refused
    }
}

/// A command bound for Redis: its route and, for a write, what it writes.
pub(super) struct Relay<'a> {
    pub route: Option<&'a [u8]>,
    pub write: Option<Vec<&'a [u8]>>,
    /// `FLUSHDB`, `FLUSHALL`, `SWAPDB`: the whole cache goes.
    pub flush: bool,
}

/// Arguments enough to judge a command (and to quote it as Redis does in
/// an unknown-command error) without a pass over all of them.
const HEAD_ARGS: usize = 130;

/// Judges a command from its first arguments `head` (name first, `name`
/// its lower case) and its argument count, against Redis's command table,
/// in Redis's order: unknown command, unknown subcommand, arity, then the
/// proxy's refusals and the write gate. A refused command of a million
/// arguments costs no pass over them.
fn judge(shared: &RespShared, name: &str, head: &[&[u8]], argc: usize) -> Result<(), Refused> {
    if REFUSED.contains(&name) {
        return Err(refused(name));
    }
    let table = shared
        .proxy
        .commands()
        .ok_or(Refused::from("ERR redis unavailable"))?;
    let spec = match table.find(name, head) {
        Found::Command(spec) => spec,
        Found::UnknownSubcommand(_) => {
            let sub = String::from_utf8_lossy(&head[1][..head[1].len().min(128)]).into_owned();
            return Err(format!(
                "ERR unknown subcommand '{sub}'. Try {} HELP.",
                name.to_ascii_uppercase()
            )
            .into());
        }
        Found::Unknown => return Err(unknown_command(head)),
    };
    if !spec.arity_ok(argc) {
        return Err(wrong_arity(&spec.name));
    }
    match policy(spec, shared.allow_writes) {
        Policy::Refused => Err(refused(&spec.name)),
        Policy::WritesOff => Err(WRITES_OFF.into()),
        Policy::Read | Policy::Write => Ok(()),
    }
}

/// A command [`judge`] let through, with all its arguments: refused when
/// it would block (XREAD BLOCK), else its route and what it writes.
fn classify<'a>(shared: &RespShared, name: &str, argv: &[&'a [u8]]) -> Result<Relay<'a>, Refused> {
    judge(shared, name, argv, argv.len())?;
    let table = shared
        .proxy
        .commands()
        .ok_or(Refused::from("ERR redis unavailable"))?;
    let Found::Command(spec) = table.find(name, argv) else {
        return Err(unknown_command(argv));
    };
    let blocks = matches!(spec.name.as_str(), "xread" | "xreadgroup")
        && argv
            .iter()
            .take_while(|a| !a.eq_ignore_ascii_case(b"streams"))
            .any(|a| a.eq_ignore_ascii_case(b"block"));
    if blocks {
        return Err(refused(&spec.name));
    }
    let keys = spec.keys(argv);
    Ok(Relay {
        route: keys.first().copied(),
        flush: matches!(spec.name.as_str(), "flushdb" | "flushall" | "swapdb"),
        write: (policy(spec, shared.allow_writes) == Policy::Write).then_some(keys),
    })
}

/// How the command `argv` (name first) would be relayed, if it is one the
/// proxy passes through (not one it serves itself, nor one refused or
/// unknown): what the relay-ahead stage batches.
pub(super) fn passable<'a>(shared: &RespShared, argv: &[&'a [u8]]) -> Option<Relay<'a>> {
    if served_here(argv[0]) {
        return None;
    }
    let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
    classify(shared, &name, argv).ok()
}

/// True for a command the proxy serves itself (by any case of its name).
pub(super) fn served_here(name: &[u8]) -> bool {
    COMMANDS
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.name.as_bytes()))
}

/// Packs `argv` as a RESP multibulk into `buf` (cleared first).
fn pack(buf: &mut Vec<u8>, argv: &[&[u8]]) {
    buf.clear();
    append_packed(buf, argv);
}

pub(super) fn append_packed(buf: &mut Vec<u8>, argv: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", argv.len()).as_bytes());
    for arg in argv {
        buf.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        buf.extend_from_slice(arg);
        buf.extend_from_slice(b"\r\n");
    }
}

/// How a reply Redis sent counts in `requests_total`.
pub(super) fn relayed(reply: &[u8]) -> Done {
    match reply {
        [b'-', ..] => Done::Error,
        [b'_', ..] | [b'$', b'-', ..] | [b'*', b'-', ..] => Done::Nil,
        _ => Done::Ok,
    }
}

/// Commands queued since `MULTI`, and what they will write.
#[derive(Default)]
pub(super) struct Multi {
    /// The commands, packed, in order.
    queued: Vec<u8>,
    count: usize,
    /// The first key any of them names (routes the block).
    route: Option<Vec<u8>>,
    written: Vec<Vec<u8>>,
    flush: bool,
    /// A command failed to queue: EXEC answers EXECABORT, as Redis does.
    aborted: bool,
}

/// Runs one command and appends its reply. The command is a buffer and
/// the ranges of its arguments in it (the name first, so never empty);
/// `argv` is scratch space for the argument slices, filled only once the
/// command is known to run (a refused command of a million arguments costs
/// no pass over them).
pub(super) fn execute<'b>(
    (buf, args): (&'b [u8], &[Range<usize>]),
    argv: &mut Vec<&'b [u8]>,
    shared: &RespShared,
    fd: usize,
    session: &mut Session,
    wbuf: &mut Vec<u8>,
    tally: &mut Tally,
) -> Next {
    // Lower-case the name on the stack: no allocation per command.
    let mut lower = [0u8; 32];
    let raw_name = &buf[args[0].clone()];
    let name = match lower.get_mut(..raw_name.len()) {
        Some(dst) => {
            for (d, s) in dst.iter_mut().zip(raw_name) {
                *d = s.to_ascii_lowercase();
            }
            std::str::from_utf8(dst).unwrap_or("")
        }
        None => "",
    };
    let protocol = session.protocol;
    let mut call = Call {
        out: Out(wbuf, protocol),
        shared,
        fd,
        session,
    };
    let in_multi = call.session.multi.is_some();
    let outcome = match answered_ahead(&mut call, raw_name) {
        Some(outcome) => outcome,
        None => dispatch(&mut call, (buf, args), argv, name, in_multi),
    };
    let (status, next) = match outcome {
        Ok(Done::Ok) => (Status::Ok, Next::Continue),
        Ok(Done::Nil) => (Status::Nil, Next::Continue),
        Ok(Done::Error) => (Status::Error, Next::Continue),
        Ok(Done::Close) => (Status::Ok, Next::Close),
        Err(Refused(line)) => {
            call.out.error(&line);
            (Status::Error, Next::Continue)
        }
    };
    tally.add(status);
    next
}

/// The answer the relay-ahead stage got for the command named by `name`
/// (its bytes in the read buffer), if it got one: the reply goes out as
/// Redis sent it, a failed run fails the command, and a redirected reply
/// (cluster) leaves the command to the one-at-a-time path.
fn answered_ahead(call: &mut Call<'_>, name: &[u8]) -> Option<Outcome> {
    match call.session.relayed.take(name)? {
        Ahead::Reply(reply) => {
            call.out.raw(reply);
            Some(Ok(relayed(reply)))
        }
        Ahead::Failed(e) => Some(Err(Refused::from(backend_error_line(&e)))),
        Ahead::Resend => None,
    }
}

/// Runs one command the relay-ahead stage did not answer.
fn dispatch<'b>(
    call: &mut Call<'_>,
    (buf, args): (&'b [u8], &[Range<usize>]),
    argv: &mut Vec<&'b [u8]>,
    name: &str,
    in_multi: bool,
) -> Outcome {
    let shared = call.shared;
    match lookup(name) {
        _ if in_multi => {
            argv.clear();
            argv.extend(args.iter().map(|r| &buf[r.clone()]));
            let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
            in_transaction(call, &name, argv)
        }
        Some(cmd) if arity_ok(cmd.arity, args.len()) => {
            argv.clear();
            argv.extend(args[1..].iter().map(|r| &buf[r.clone()]));
            (cmd.run)(call, argv)
        }
        Some(cmd) => Err(wrong_arity(cmd.name)),
        None => {
            argv.clear();
            argv.extend(args.iter().take(HEAD_ARGS).map(|r| &buf[r.clone()]));
            let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
            match judge(shared, &name, argv, args.len()) {
                Ok(()) => {
                    argv.extend(args.iter().skip(HEAD_ARGS).map(|r| &buf[r.clone()]));
                    relay(call, &name, argv)
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// A command the proxy does not serve itself: judged, then relayed to
/// Redis and its reply copied out as it came.
fn relay(cx: &mut Call<'_>, name: &str, argv: &[&[u8]]) -> Outcome {
    let relay = classify(cx.shared, name, argv)?;
    let session = &mut *cx.session;
    pack(&mut session.packed, argv);
    let cmd = Pass {
        commands: &session.packed,
        replies: 1,
        skip: 0,
        route: relay.route,
        protocol: session.protocol,
    };
    let proxy = &cx.shared.proxy;
    let reply = match &relay.write {
        None => proxy.pass(&cmd, cx.fd),
        Some(_) if relay.flush => proxy.write(&cmd, Written::All, cx.fd),
        Some(keys) => proxy.write(&cmd, Written::Keys(keys), cx.fd),
    }
    .map_err(|e| Refused::from(backend_error_line(&e)))?;
    cx.out.raw(&reply);
    Ok(relayed(&reply))
}

/// A command while `MULTI` is open: the controls run, anything else is
/// judged as outside and queued (`+QUEUED`), or fails the transaction.
fn in_transaction(cx: &mut Call<'_>, name: &str, argv: &[&[u8]]) -> Outcome {
    match name {
        "exec" | "discard" | "multi" | "quit" | "reset" => {
            let cmd = lookup(name).expect("a served command");
            if !arity_ok(cmd.arity, argv.len()) {
                return Err(wrong_arity(cmd.name));
            }
            if name == "multi" {
                // As Redis: refused, but the transaction goes on.
                return Err("ERR MULTI calls can not be nested".into());
            }
            (cmd.run)(cx, &argv[1..])
        }
        "watch" => Err("ERR WATCH inside MULTI is not allowed".into()),
        _ => {
            let max = cx.shared.max_request;
            let multi = cx.session.multi.as_mut().expect("in MULTI");
            let size: usize = argv.iter().map(|a| a.len() + 16).sum();
            let queued = if multi.queued.len() + size > max {
                // The block goes to Redis as one request: bounded like one.
                Err(format!("ERR transaction over {max} bytes (RESP_MAX_REQUEST_BYTES)").into())
            } else {
                queueable(cx.shared, name, argv)
            };
            match queued {
                Ok(relay) => {
                    append_packed(&mut multi.queued, argv);
                    multi.count += 1;
                    if multi.route.is_none() {
                        multi.route = relay.route.map(<[u8]>::to_vec);
                    }
                    multi.flush |= relay.flush;
                    if let Some(keys) = relay.write {
                        multi.written.extend(keys.iter().map(|k| k.to_vec()));
                    }
                    cx.out.simple("QUEUED");
                    Ok(Done::Ok)
                }
                Err(e) => {
                    multi.aborted = true;
                    Err(e)
                }
            }
        }
    }
}

/// Whether a command may be queued: Redis runs everything in the block,
/// so the proxy's own commands that keep connection state (HELLO, SELECT,
/// CLIENT) cannot be, and GET and MGET read Redis, not the cache.
fn queueable<'a>(shared: &RespShared, name: &str, argv: &[&'a [u8]]) -> Result<Relay<'a>, Refused> {
    match lookup(name) {
        Some(cmd) if !arity_ok(cmd.arity, argv.len()) => Err(wrong_arity(cmd.name)),
        Some(cmd) if matches!(cmd.name, "ping" | "echo") => Ok(Relay {
            route: None,
            write: None,
            flush: false,
        }),
        Some(cmd) if !matches!(cmd.name, "get" | "mget") => Err(format!(
            "ERR '{}' is not supported inside MULTI by redis-proxy",
            cmd.name
        )
        .into()),
        _ => classify(shared, name, argv),
    }
}

fn multi(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    cx.session.multi = Some(Multi::default());
    cx.out.simple("OK");
    Ok(Done::Ok)
}

fn exec(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    let Some(multi) = cx.session.multi.take() else {
        return Err("ERR EXEC without MULTI".into());
    };
    if multi.aborted {
        return Err("EXECABORT Transaction discarded because of previous errors.".into());
    }
    let keys: Vec<&[u8]> = multi.written.iter().map(Vec::as_slice).collect();
    let written = if multi.flush {
        Written::All
    } else {
        Written::Keys(&keys)
    };
    let reply = cx
        .shared
        .proxy
        .transaction(
            &multi.queued,
            multi.count,
            multi.route.as_deref(),
            cx.session.protocol,
            written,
            cx.fd,
        )
        .map_err(|e| Refused::from(backend_error_line(&e)))?;
    cx.out.raw(&reply);
    Ok(relayed(&reply))
}

fn discard(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    if cx.session.multi.take().is_none() {
        return Err("ERR DISCARD without MULTI".into());
    }
    cx.out.simple("OK");
    Ok(Done::Ok)
}

/// `RESET`: the connection as new (RESP2, no name, no transaction).
fn reset(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    let session = &mut *cx.session;
    session.multi = None;
    session.name = None;
    session.protocol = Protocol::Resp2;
    cx.out.1 = Protocol::Resp2;
    cx.out.simple("RESET");
    Ok(Done::Ok)
}

fn get(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    // Fetched ahead with the rest of a pipelined run, or asked now.
    let lookup = match cx.session.prefetched.take_one(args[0]) {
        Some(answer) => answer,
        None => cx.shared.proxy.get(args[0], cx.fd),
    };
    let lookup = lookup.map_err(|e| Refused::from(backend_error_line(&e)))?;
    match lookup.value {
        Some(v) => {
            cx.out.bulk(&v);
            Ok(Done::Ok)
        }
        None => {
            cx.out.nil();
            Ok(Done::Nil)
        }
    }
}

fn mget(cx: &mut Call<'_>, keys: &[&[u8]]) -> Outcome {
    let values = match cx.session.prefetched.take(keys) {
        Some(answers) => mget_values(answers),
        None => cx.shared.proxy.get_many(keys, cx.fd),
    };
    let values = values.map_err(|e| Refused::from(backend_error_line(&e)))?;
    cx.out.array(values.len());
    for v in values {
        match v {
            Some(v) => cx.out.bulk(&v),
            None => cx.out.nil(),
        }
    }
    Ok(Done::Ok)
}

/// MGET's answer from GET answers fetched ahead: a key of another type
/// reads as nil, as in Redis; a failed round trip fails the command.
fn mget_values(
    answers: Vec<Result<Lookup, BackendError>>,
) -> Result<Vec<Option<Value>>, BackendError> {
    answers
        .into_iter()
        .map(|answer| match answer {
            Ok(lookup) => Ok(lookup.value),
            Err(BackendError::Reply(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .collect()
}

fn ping(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    match args {
        [] => cx.out.simple("PONG"),
        [msg] => cx.out.bulk(msg),
        _ => return Err(wrong_arity("ping")),
    }
    Ok(Done::Ok)
}

fn echo(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    cx.out.bulk(args[0]);
    Ok(Done::Ok)
}

fn quit(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    cx.out.simple("OK");
    Ok(Done::Close)
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`, checked as Redis
/// checks it; switches the connection's protocol. AUTH is refused, as the
/// AUTH command is: the proxy authenticates to Redis itself.
fn hello(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let mut protocol = cx.session.protocol;
    let mut next = 0;
    if let Some(version) = args.first() {
        let version = std::str::from_utf8(version)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or(Refused::from(
                "ERR Protocol version is not an integer or out of range",
            ))?;
        protocol = match version {
            2 => Protocol::Resp2,
            3 => Protocol::Resp3,
            _ => return Err("NOPROTO unsupported protocol version".into()),
        };
        next = 1;
    }
    let mut name = None;
    while next < args.len() {
        let more = args.len() - 1 - next;
        let option = args[next];
        if option.eq_ignore_ascii_case(b"auth") && more >= 2 {
            return Err(refused("auth"));
        } else if option.eq_ignore_ascii_case(b"setname") && more >= 1 {
            name = Some(args[next + 1].to_vec());
            next += 2;
        } else {
            return Err(format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(option)
            )
            .into());
        }
    }
    cx.session.protocol = protocol;
    if name.is_some() {
        cx.session.name = name;
    }
    cx.out.1 = protocol;
    hello_reply(&mut cx.out, cx.fd);
    Ok(Done::Ok)
}

/// `CLIENT SETNAME|GETNAME|SETINFO|ID|INFO`; other subcommands are refused
/// (they act on Redis connections the proxy shares between clients).
fn client(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let sub = String::from_utf8_lossy(args[0]).to_ascii_lowercase();
    let arity = match sub.as_str() {
        "setname" => 2,
        "getname" | "id" | "info" => 1,
        "setinfo" => 3,
        _ => return Err(refused(&format!("client|{sub}"))),
    };
    if args.len() != arity {
        return Err(wrong_arity(&format!("client|{sub}")));
    }
    match sub.as_str() {
        "setname" => {
            cx.session.name = Some(args[1].to_vec());
            cx.out.simple("OK")
        }
        "getname" => match &cx.session.name {
            Some(n) => cx.out.bulk(n),
            None => cx.out.nil(),
        },
        "setinfo" => cx.out.simple("OK"),
        "id" => cx.out.int(cx.fd as i64),
        _ => {
            let session = &*cx.session;
            let line = format!(
                "id={} name={} db={} multi={} resp={} lib-name=redis-proxy\n",
                cx.fd,
                String::from_utf8_lossy(session.name.as_deref().unwrap_or_default()),
                cx.shared.db,
                session.multi.as_ref().map_or(-1, |m| m.count as i64),
                session.protocol.number(),
            );
            cx.out.verbatim(&line)
        }
    }
    Ok(Done::Ok)
}

fn select(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let db = std::str::from_utf8(args[0])
        .ok()
        .and_then(|a| a.parse::<i64>().ok());
    if db != Some(cx.shared.db) {
        // One db per proxy: its cache holds that db's keys.
        return Err(refused("select"));
    }
    cx.out.simple("OK");
    Ok(Done::Ok)
}

fn info(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    let text = info_text(cx.shared);
    cx.out.verbatim(&text);
    Ok(Done::Ok)
}

/// One command `COMMAND` lists: Redis's own row, or, before the table is
/// learned, the proxy's.
enum Entry<'t> {
    Learned(&'t Spec),
    Own(&'static Command),
}

impl Entry<'_> {
    fn name(&self) -> &str {
        match self {
            Entry::Learned(spec) => &spec.name,
            Entry::Own(c) => c.name,
        }
    }
}

/// True when the proxy answers `spec` (itself or by passing it through).
fn serves(spec: &Spec, allow_writes: bool) -> bool {
    lookup(&spec.name).is_some()
        || matches!(policy(spec, allow_writes), Policy::Read | Policy::Write)
}

/// Every command served with these settings, in Redis's order.
fn served<'t>(table: Option<&'t CommandTable>, shared: &RespShared) -> Vec<Entry<'t>> {
    match table {
        Some(table) => {
            let mut entries: Vec<Entry<'t>> = table
                .iter()
                .filter(|spec| serves(spec, shared.allow_writes))
                .map(Entry::Learned)
                .collect();
            entries.extend(
                COMMANDS
                    .iter()
                    .filter(|c| table.get(c.name).is_none())
                    .map(Entry::Own),
            );
            entries
        }
        None => COMMANDS.iter().map(Entry::Own).collect(),
    }
}

/// The served command called `name` (lower case).
fn served_one<'t>(
    table: Option<&'t CommandTable>,
    shared: &RespShared,
    name: &str,
) -> Option<Entry<'t>> {
    match table.and_then(|t| t.get(name)) {
        Some(spec) => serves(spec, shared.allow_writes).then_some(Entry::Learned(spec)),
        None => lookup(name).map(Entry::Own),
    }
}

/// `COMMAND [COUNT | INFO [name ...] | DOCS [name ...] | LIST | GETKEYS cmd
/// args...]`, all answered from what is served with these settings.
fn command(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let table = cx.shared.proxy.commands();
    let table = table.as_deref();
    let shared = cx.shared;
    let sub = args
        .first()
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
    let out = &mut cx.out;
    match (sub.as_deref(), args.len()) {
        (Some("count"), 1) => out.int(served(table, shared).len() as i64),
        (Some("list"), 1) => {
            let entries = served(table, shared);
            out.array(entries.len());
            for e in entries {
                out.bulk(e.name().as_bytes());
            }
        }
        (None, _) | (Some("info"), 1) => {
            let entries = served(table, shared);
            out.array(entries.len());
            for e in &entries {
                command_row(out, e);
            }
        }
        (Some("info"), _) => {
            out.array(args.len() - 1);
            for name in &args[1..] {
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                match served_one(table, shared, &name) {
                    Some(e) => command_row(out, &e),
                    None => out.nil(),
                }
            }
        }
        (Some("docs"), _) => {
            let names: Vec<String> = if args.len() == 1 {
                served(table, shared)
                    .iter()
                    .map(|e| e.name().to_string())
                    .collect()
            } else {
                args[1..]
                    .iter()
                    .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
                    .filter(|n| served_one(table, shared, n).is_some())
                    .collect()
            };
            let protocol = out.1;
            let docs: Vec<(&str, &[u8])> = names
                .iter()
                .filter_map(|n| Some((n.as_str(), table?.docs(n, protocol)?)))
                .collect();
            out.map(docs.len());
            for (name, doc) in docs {
                out.bulk(name.as_bytes());
                out.raw(doc);
            }
        }
        (Some("getkeys"), n) if n >= 2 => return getkeys(out, table, shared, &args[1..]),
        (Some(other), _) => {
            return Err(format!("ERR unknown subcommand '{other}'. Try COMMAND HELP.").into())
        }
    }
    Ok(Done::Ok)
}

/// One `COMMAND INFO` row: Redis's own, or the proxy's six fields (name,
/// arity, flags, first key, last key, step).
fn command_row(out: &mut Out<'_>, entry: &Entry<'_>) {
    let c = match entry {
        Entry::Learned(spec) => return out.raw(spec.info_row(out.1)),
        Entry::Own(c) => c,
    };
    out.array(6);
    out.bulk(c.name.as_bytes());
    out.int(c.arity);
    out.set(c.flags.len());
    for f in c.flags {
        out.simple(f);
    }
    out.int(c.keys.0);
    out.int(c.keys.1);
    out.int(c.keys.2);
}

/// `COMMAND GETKEYS name args...`: the keys of that call, from Redis's key
/// specs (or the proxy's first/last/step before they are learned).
fn getkeys(
    out: &mut Out<'_>,
    table: Option<&CommandTable>,
    shared: &RespShared,
    argv: &[&[u8]],
) -> Outcome {
    let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
    let invalid = || Refused::from("ERR Invalid command specified");
    let keys: Vec<&[u8]> = match table {
        Some(table) => {
            let Found::Command(spec) = table.find(&name, argv) else {
                return Err(invalid());
            };
            if !serves(spec, shared.allow_writes) {
                return Err(invalid());
            }
            if !spec.arity_ok(argv.len()) {
                return Err("ERR Invalid number of arguments specified for command".into());
            }
            spec.keys(argv)
        }
        None => {
            let c = lookup(&name).ok_or_else(invalid)?;
            if !arity_ok(c.arity, argv.len()) {
                return Err("ERR Invalid number of arguments specified for command".into());
            }
            let (first, last, step) = c.keys;
            let argc = argv.len() as i64;
            let last = if last < 0 { argc + last } else { last };
            if first == 0 {
                Vec::new()
            } else {
                (first..=last.min(argc - 1))
                    .step_by(step as usize)
                    .map(|i| argv[i as usize])
                    .collect()
            }
        }
    };
    if keys.is_empty() {
        return Err("ERR The command has no key arguments".into());
    }
    out.array(keys.len());
    for k in keys {
        out.bulk(k);
    }
    Ok(Done::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of one-line rows: (name, arity, flags), no keys.
    fn table(rows: &[(&str, i64, &[&str])]) -> CommandTable {
        let mut text = format!("*{}\r\n", rows.len());
        for (name, arity, flags) in rows {
            text.push_str(&format!(
                "*6\r\n${}\r\n{name}\r\n:{arity}\r\n~{}\r\n",
                name.len(),
                flags.len()
            ));
            for f in *flags {
                text.push_str(&format!("+{f}\r\n"));
            }
            text.push_str(":0\r\n:0\r\n:0\r\n");
        }
        let info = redis::parse_redis_value(text.as_bytes()).expect("valid rows");
        CommandTable::decode(&info, &redis::Value::Nil).expect("decodes")
    }

    /// Each flag combination Redis 7.0 uses lands in its class; writes
    /// only pass with PROXY_ALLOW_WRITES.
    #[test]
    fn policy_follows_the_flags() {
        let t = table(&[
            ("hgetall", 2, &["readonly"]),
            ("set", -3, &["write", "denyoom"]),
            ("blpop", -3, &["write", "blocking"]),
            ("xread", -4, &["readonly", "blocking", "movablekeys"]),
            ("config", -2, &["admin", "noscript"]),
            ("subscribe", -2, &["pubsub", "noscript"]),
            ("publish", 3, &["pubsub", "loading", "stale", "fast"]),
            ("eval", -3, &["noscript", "stale", "movablekeys"]),
            ("time", 1, &["loading", "stale", "fast"]),
            ("watch", -2, &["noscript", "loading", "stale", "fast"]),
            ("script|load", 3, &["noscript", "stale"]),
        ]);
        let p = |name: &str, writes: bool| policy(t.get(name).unwrap(), writes);
        assert_eq!(p("hgetall", false), Policy::Read);
        assert_eq!(p("set", false), Policy::WritesOff);
        assert_eq!(p("set", true), Policy::Write);
        assert_eq!(p("blpop", true), Policy::Refused);
        assert_eq!(
            p("xread", false),
            Policy::Read,
            "refused per call with BLOCK"
        );
        assert_eq!(p("config", true), Policy::Refused);
        assert_eq!(p("subscribe", true), Policy::Refused);
        assert_eq!(p("publish", false), Policy::WritesOff);
        assert_eq!(p("publish", true), Policy::Write);
        assert_eq!(p("eval", true), Policy::Write);
        assert_eq!(p("time", true), Policy::Refused);
        assert_eq!(p("watch", true), Policy::Refused);
        assert_eq!(p("script|load", true), Policy::Write);
    }

    /// Redis 7's unknown-command line quotes the arguments up to 128 bytes.
    #[test]
    fn unknown_command_quotes_its_arguments() {
        let Refused(line) = unknown_command(&[b"nosuch", b"a", b"b"]);
        assert_eq!(
            line,
            "ERR unknown command 'nosuch', with args beginning with: 'a' 'b' "
        );
        let Refused(line) = unknown_command(&[b"x"]);
        assert_eq!(line, "ERR unknown command 'x', with args beginning with: ");
        let long = [b'y'; 300];
        let Refused(line) = unknown_command(&[b"x", &long, b"z"]);
        assert!(line.ends_with(&format!("'{}' ", "y".repeat(128))), "{line}");
    }

    /// Relayed replies count as ok, nil or error by their first bytes.
    #[test]
    fn relayed_replies_are_classified() {
        assert!(matches!(relayed(b"-WRONGTYPE x\r\n"), Done::Error));
        assert!(matches!(relayed(b"$-1\r\n"), Done::Nil));
        assert!(matches!(relayed(b"_\r\n"), Done::Nil));
        assert!(matches!(relayed(b"*-1\r\n"), Done::Nil));
        assert!(matches!(relayed(b":1\r\n"), Done::Ok));
        assert!(matches!(relayed(b"%0\r\n"), Done::Ok));
    }
}
