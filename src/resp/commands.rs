//! resp::commands: the commands the RESP front end serves, as one table
//! (name, arity, flags, keys, handler) with one function per command, and
//! the `COMMAND` replies drawn from that same table, so what `COMMAND` says
//! is what is served.
//!
//! Handlers write their reply through [`Out`] and return how the command
//! went; an error reply is a returned [`Refused`], which the dispatcher
//! writes and counts. They never parse bytes or touch the socket.

use std::borrow::Cow;
use std::ops::Range;

use super::{backend_error_line, hello_reply, info_text, Next, Out, RespShared, Session};
use crate::backend::BackendError;
use crate::cache::Value;
use crate::metrics::{Status, Tally};
use crate::proxy::Lookup;

/// How a served command ended (its reply already written).
pub(super) enum Done {
    /// Answered; counted as `ok`.
    Ok,
    /// Answered with a nil; counted as `nil`.
    Nil,
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

/// One served command.
pub(super) struct Command {
    /// Lower case, as `COMMAND` reports it.
    pub name: &'static str,
    /// Redis's arity: the name counts; negative means at least `-arity`.
    pub arity: i64,
    pub flags: &'static [&'static str],
    /// First key, last key (negative counts from the end), step; all 0 when
    /// the command takes no keys. As `COMMAND INFO` and `GETKEYS` report them.
    pub keys: (i64, i64, i64),
    /// Served only with `PROXY_ALLOW_WRITES`.
    pub write: bool,
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
        write: false,
        run,
    }
}

/// Every served command; GET first, as the hot path looks it up first.
pub(super) const COMMANDS: &[Command] = &[
    cmd("get", 2, &["readonly", "fast"], (1, 1, 1), get),
    cmd("mget", -2, &["readonly", "fast"], (1, -1, 1), mget),
    cmd("ping", -1, &["fast"], NO_KEYS, ping),
    cmd("echo", 2, &["fast"], NO_KEYS, echo),
    cmd("quit", -1, &["fast"], NO_KEYS, quit),
    cmd("hello", -1, &["fast"], NO_KEYS, hello),
    cmd("command", -1, &["loading"], NO_KEYS, command),
    cmd("client", -2, &["loading"], NO_KEYS, client),
    cmd("select", 2, &["loading", "fast"], NO_KEYS, select),
    cmd("info", -1, &["loading"], NO_KEYS, info),
    Command {
        write: true,
        ..cmd("set", -3, &["write", "denyoom"], (1, 1, 1), set)
    },
    Command {
        write: true,
        ..cmd("del", -2, &["write"], (1, -1, 1), del)
    },
];

/// The served command named `name` (lower case), if any.
fn lookup(name: &str, shared: &RespShared) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.name == name && (!c.write || shared.allow_writes))
}

/// The commands served with these settings, in table order.
fn served(shared: &RespShared) -> impl Iterator<Item = &'static Command> + '_ {
    COMMANDS.iter().filter(|c| !c.write || shared.allow_writes)
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
    let mut lower = [0u8; 16];
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
    let mut call = Call {
        out: Out(wbuf),
        shared,
        fd,
        session,
    };
    let outcome = match lookup(name, shared) {
        Some(cmd) if arity_ok(cmd.arity, args.len()) => {
            argv.clear();
            argv.extend(args[1..].iter().map(|r| &buf[r.clone()]));
            (cmd.run)(&mut call, argv)
        }
        Some(cmd) => Err(wrong_arity(cmd.name)),
        None => {
            let shown: String = String::from_utf8_lossy(raw_name)
                .chars()
                .take(128)
                .collect();
            Err(format!("ERR unknown command '{shown}'").into())
        }
    };
    let (status, next) = match outcome {
        Ok(Done::Ok) => (Status::Ok, Next::Continue),
        Ok(Done::Nil) => (Status::Nil, Next::Continue),
        Ok(Done::Close) => (Status::Ok, Next::Close),
        Err(Refused(line)) => {
            call.out.error(&line);
            (Status::Error, Next::Continue)
        }
    };
    tally.add(status);
    next
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

fn hello(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    match args.first().map(|p| &p[..]) {
        None | Some(b"2") => {
            hello_reply(&mut cx.out, cx.fd);
            Ok(Done::Ok)
        }
        Some(_) => Err("NOPROTO unsupported protocol version".into()),
    }
}

fn client(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let sub = String::from_utf8_lossy(args[0]).to_ascii_lowercase();
    match (sub.as_str(), args.len()) {
        ("setname", 2) => {
            cx.session.name = Some(args[1].to_vec());
            cx.out.simple("OK")
        }
        ("getname", 1) => match &cx.session.name {
            Some(n) => cx.out.bulk(n),
            None => cx.out.nil(),
        },
        ("setinfo", 3) => cx.out.simple("OK"),
        ("id", 1) => cx.out.int(cx.fd as i64),
        _ => {
            return Err(format!(
                "ERR unknown subcommand or wrong number of arguments for 'client|{sub}'"
            )
            .into())
        }
    }
    Ok(Done::Ok)
}

fn select(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let db = std::str::from_utf8(args[0])
        .ok()
        .and_then(|a| a.parse::<i64>().ok());
    if db != Some(cx.shared.db) {
        return Err(format!("ERR this proxy serves db {} only", cx.shared.db).into());
    }
    cx.out.simple("OK");
    Ok(Done::Ok)
}

fn info(cx: &mut Call<'_>, _: &[&[u8]]) -> Outcome {
    let text = info_text(cx.shared);
    cx.out.bulk(text.as_bytes());
    Ok(Done::Ok)
}

fn set(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let reply = cx
        .shared
        .proxy
        .set(args[0], args[1], &args[2..], cx.fd)
        .map_err(|e| Refused::from(backend_error_line(&e)))?;
    cx.out.set_reply(&reply);
    Ok(Done::Ok)
}

fn del(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let removed = cx
        .shared
        .proxy
        .del(args, cx.fd)
        .map_err(|e| Refused::from(backend_error_line(&e)))?;
    cx.out.int(removed as i64);
    Ok(Done::Ok)
}

/// `COMMAND [COUNT | INFO [name ...] | DOCS | LIST | GETKEYS cmd args...]`,
/// all answered from [`COMMANDS`] as served with these settings.
fn command(cx: &mut Call<'_>, args: &[&[u8]]) -> Outcome {
    let sub = args
        .first()
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
    let out = &mut cx.out;
    match (sub.as_deref(), args.len()) {
        (Some("count"), 1) => out.int(served(cx.shared).count() as i64),
        // redis-cli asks for DOCS at start-up; an empty map keeps it quiet.
        (Some("docs"), _) => out.array(0),
        (Some("list"), 1) => {
            out.array(served(cx.shared).count());
            for c in served(cx.shared) {
                out.bulk(c.name.as_bytes());
            }
        }
        (None, _) | (Some("info"), 1) => {
            out.array(served(cx.shared).count());
            for c in served(cx.shared) {
                command_row(out, c);
            }
        }
        (Some("info"), _) => {
            out.array(args.len() - 1);
            for name in &args[1..] {
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                match lookup(&name, cx.shared) {
                    Some(c) => command_row(out, c),
                    None => out.nil(),
                }
            }
        }
        (Some("getkeys"), n) if n >= 2 => return getkeys(out, cx.shared, &args[1..]),
        (Some(other), _) => {
            return Err(format!("ERR unknown subcommand '{other}'. Try COMMAND HELP.").into())
        }
    }
    Ok(Done::Ok)
}

/// One `COMMAND INFO` row: name, arity, flags, first key, last key, step.
fn command_row(out: &mut Out<'_>, c: &Command) {
    out.array(6);
    out.bulk(c.name.as_bytes());
    out.int(c.arity);
    out.array(c.flags.len());
    for f in c.flags {
        out.simple(f);
    }
    out.int(c.keys.0);
    out.int(c.keys.1);
    out.int(c.keys.2);
}

/// `COMMAND GETKEYS name args...`: the keys of that call, as Redis finds
/// them from first key, last key and step.
fn getkeys(out: &mut Out<'_>, shared: &RespShared, argv: &[&[u8]]) -> Outcome {
    let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
    let Some(c) = lookup(&name, shared) else {
        return Err("ERR Invalid command specified".into());
    };
    if !arity_ok(c.arity, argv.len()) {
        return Err("ERR Invalid number of arguments specified for command".into());
    }
    let (first, last, step) = c.keys;
    if first == 0 {
        return Err("ERR The command has no key arguments".into());
    }
    let argc = argv.len() as i64;
    let last = if last < 0 { argc + last } else { last };
    let keys: Vec<&[u8]> = (first..=last.min(argc - 1))
        .step_by(step as usize)
        .map(|i| argv[i as usize])
        .collect();
    out.array(keys.len());
    for k in keys {
        out.bulk(k);
    }
    Ok(Done::Ok)
}
