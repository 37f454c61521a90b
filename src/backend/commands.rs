//! backend::commands: what the backing Redis serves, learned from Redis's
//! own `COMMAND` (every command's `COMMAND INFO` row) and `COMMAND DOCS`.
//!
//! Owns decoding those replies into a plain [`CommandTable`] (flags, arity,
//! key specs, subcommands) with each row and doc also kept encoded in both
//! protocol versions, so the RESP front end can answer `COMMAND` from it
//! without seeing a `redis::Value`; finding a call's keys the way
//! `COMMAND GETKEYS` does ([`Spec::keys`]); and the [`Learner`], a thread
//! of its own that learns the table at start, retries until Redis answers,
//! and learns again after a data connection was reopened (Redis may have
//! been restarted as another version). It decides nothing about what the
//! proxy serves: that policy is the front end's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::thread::{self, Thread};
use std::time::Duration;

use redis::Value;

use super::connect::{connect_speaking, ConnectError};
use super::{BackendStats, Protocol};
use crate::config::RedisTarget;

/// Flags of one command, as `COMMAND INFO` reports them (the ones the proxy
/// looks at).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u32);

impl Flags {
    pub const READONLY: Flags = Flags(1);
    pub const WRITE: Flags = Flags(1 << 1);
    pub const ADMIN: Flags = Flags(1 << 2);
    pub const BLOCKING: Flags = Flags(1 << 3);
    pub const PUBSUB: Flags = Flags(1 << 4);
    pub const MAY_REPLICATE: Flags = Flags(1 << 5);
    pub const NOSCRIPT: Flags = Flags(1 << 6);

    fn from_name(name: &str) -> Flags {
        match name {
            "readonly" => Flags::READONLY,
            "write" => Flags::WRITE,
            "admin" => Flags::ADMIN,
            "blocking" => Flags::BLOCKING,
            "pubsub" => Flags::PUBSUB,
            "may_replicate" => Flags::MAY_REPLICATE,
            "noscript" => Flags::NOSCRIPT,
            _ => Flags(0),
        }
    }

    /// True when every flag of `other` is set.
    pub fn has(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Where a key spec's search for keys starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Begin {
    /// At this argument.
    Index(i64),
    /// After this keyword (lower case), searched from `from` (negative:
    /// backwards from the end).
    Keyword {
        keyword: String,
        from: i64,
    },
    Unknown,
}

/// How a key spec finds its keys from where the search began.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Find {
    Range { last: i64, step: i64, limit: i64 },
    Keynum { index: i64, first: i64, step: i64 },
    Unknown,
}

/// One key spec (Redis 7's `key_specs` entries).
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeySpec {
    begin: Begin,
    find: Find,
    /// `not_key`: an argument that names a key but is not one (for ACLs).
    not_key: bool,
}

/// One command (or subcommand, named `container|sub`) as Redis serves it.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Lower case; a subcommand's is `container|sub`.
    pub name: String,
    /// Redis's arity: the name counts; negative means at least `-arity`.
    pub arity: i64,
    pub flags: Flags,
    /// First key, last key, step (the legacy key positions).
    range: (i64, i64, i64),
    key_specs: Vec<KeySpec>,
    /// By subcommand name (lower case, without the container's).
    subcommands: HashMap<String, Spec>,
    /// The `COMMAND INFO` row, in RESP2 and RESP3.
    info: [Vec<u8>; 2],
}

impl Spec {
    /// True when a call with `argc` arguments (the name included) fits the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i64;
        if self.arity >= 0 {
            argc == self.arity
        } else {
            argc >= -self.arity
        }
    }

    /// Whether the command has subcommands (`OBJECT`, `CONFIG`, ...).
    pub fn is_container(&self) -> bool {
        !self.subcommands.is_empty()
    }

    /// Its `COMMAND INFO` row, encoded in `protocol`.
    pub fn info_row(&self, protocol: Protocol) -> &[u8] {
        &self.info[protocol.index()]
    }

    /// The keys of the call `argv` (the name first, arity checked), in the
    /// order `COMMAND GETKEYS` gives them: from the key specs, or the legacy
    /// first/last/step when Redis gives none. A key named by two specs (as
    /// `not_key` arguments are skipped) appears once per spec.
    pub fn keys<'a>(&self, argv: &[&'a [u8]]) -> Vec<&'a [u8]> {
        if self.name == "sort" {
            // Its STORE key spec is `incomplete`; Redis finds it by hand.
            return sort_keys(argv);
        }
        let argc = argv.len() as i64;
        let mut keys = Vec::new();
        if self.key_specs.is_empty() {
            let (first, last, step) = self.range;
            if first > 0 && step > 0 {
                let last = if last < 0 { argc + last } else { last };
                let mut i = first;
                while i <= last && i < argc {
                    keys.push(argv[i as usize]);
                    i += step;
                }
            }
            return keys;
        }
        for spec in &self.key_specs {
            if spec.not_key {
                continue;
            }
            let Some(first) = begin_search(&spec.begin, argv) else {
                continue;
            };
            let (first, last, step) = match spec.find {
                Find::Range { last, step, limit } => {
                    let end = if last >= 0 {
                        first + last
                    } else if limit <= 1 {
                        argc + last
                    } else {
                        first + ((argc - first) / limit + last)
                    };
                    (first, end, step)
                }
                Find::Keynum {
                    index,
                    first: from,
                    step,
                } => {
                    let Some(n) = argv
                        .get((first + index) as usize)
                        .and_then(|a| std::str::from_utf8(a).ok())
                        .and_then(|a| a.parse::<i64>().ok())
                    else {
                        continue;
                    };
                    let start = first + from;
                    (start, start + (n - 1) * step, step)
                }
                Find::Unknown => continue,
            };
            if step <= 0 {
                continue;
            }
            let mut i = first;
            while i <= last && i < argc && i >= 1 {
                keys.push(argv[i as usize]);
                i += step;
            }
        }
        keys
    }
}

/// SORT's keys as Redis's `sortGetKeys` finds them: the sorted key, and the
/// last `STORE` destination (LIMIT's two and GET's and BY's one argument
/// are skipped, so a pattern called "store" is not taken for the option).
fn sort_keys<'a>(argv: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut keys: Vec<&[u8]> = argv.get(1).copied().into_iter().collect();
    let mut store = None;
    let mut i = 2;
    while i < argv.len() {
        let arg = argv[i];
        if arg.eq_ignore_ascii_case(b"limit") {
            i += 2;
        } else if arg.eq_ignore_ascii_case(b"get") || arg.eq_ignore_ascii_case(b"by") {
            i += 1;
        } else if arg.eq_ignore_ascii_case(b"store") && i + 1 < argv.len() {
            store = Some(argv[i + 1]);
        }
        i += 1;
    }
    keys.extend(store);
    keys
}

/// Redis's `begin_search` of a key spec: where its keys start, if anywhere.
fn begin_search(begin: &Begin, argv: &[&[u8]]) -> Option<i64> {
    let argc = argv.len() as i64;
    match begin {
        Begin::Index(i) => (*i < argc).then_some(*i),
        Begin::Keyword { keyword, from } => {
            // As Redis's getKeysUsingKeySpecs: the end index itself is not
            // searched.
            let (start, end) = if *from > 0 {
                (*from, argc - 1)
            } else {
                (argc + from, 1)
            };
            let mut i = start;
            while i != end {
                if i >= argc || i < 1 {
                    return None;
                }
                if argv[i as usize].eq_ignore_ascii_case(keyword.as_bytes()) {
                    return Some(i + 1);
                }
                i = if start <= end { i + 1 } else { i - 1 };
            }
            None
        }
        Begin::Unknown => None,
    }
}

/// What a call names, looked up in the table.
pub enum Found<'t> {
    /// A command, or the subcommand the second argument names.
    Command(&'t Spec),
    /// A container whose second argument names no subcommand of it.
    UnknownSubcommand(&'t Spec),
    /// No such command.
    Unknown,
}

/// Every command Redis serves, in the order `COMMAND` listed them.
#[derive(Debug, Default)]
pub struct CommandTable {
    commands: Vec<Spec>,
    by_name: HashMap<String, usize>,
    /// `COMMAND DOCS` values (each command's doc map) by name, in RESP2 and
    /// RESP3; empty when Redis has no `COMMAND DOCS` (before 7.0).
    docs: HashMap<String, [Vec<u8>; 2]>,
}

impl CommandTable {
    /// The command called `name` (lower case).
    pub fn get(&self, name: &str) -> Option<&Spec> {
        self.by_name.get(name).map(|&i| &self.commands[i])
    }

    /// What the call `argv` (name first; `name` is its lower case) names:
    /// a subcommand for a container called with one.
    pub fn find(&self, name: &str, argv: &[&[u8]]) -> Found<'_> {
        let Some(spec) = self.get(name) else {
            return Found::Unknown;
        };
        match argv.get(1) {
            Some(sub) if spec.is_container() => {
                let sub = String::from_utf8_lossy(sub).to_ascii_lowercase();
                match spec.subcommands.get(&sub) {
                    Some(sub) => Found::Command(sub),
                    None => Found::UnknownSubcommand(spec),
                }
            }
            _ => Found::Command(spec),
        }
    }

    /// Every command, in Redis's order.
    pub fn iter(&self) -> impl Iterator<Item = &Spec> {
        self.commands.iter()
    }

    /// The `COMMAND DOCS` value of `name`, encoded in `protocol`.
    pub fn docs(&self, name: &str, protocol: Protocol) -> Option<&[u8]> {
        self.docs.get(name).map(|d| &d[protocol.index()][..])
    }

    /// Decodes the replies to `COMMAND` and `COMMAND DOCS` (read in RESP3;
    /// a docs error leaves the docs empty).
    pub(crate) fn decode(info: &Value, docs: &Value) -> Result<CommandTable, String> {
        let Value::Array(rows) = info else {
            return Err(format!("COMMAND answered {info:?}"));
        };
        let mut table = CommandTable::default();
        for row in rows {
            if let Some(spec) = decode_row(row) {
                table
                    .by_name
                    .insert(spec.name.clone(), table.commands.len());
                table.commands.push(spec);
            }
        }
        if table.commands.is_empty() {
            return Err("COMMAND listed no commands".into());
        }
        for (name, doc) in pairs(docs) {
            if let Some(name) = text(name) {
                table
                    .docs
                    .insert(name.to_ascii_lowercase(), [encode(doc, 2), encode(doc, 3)]);
            }
        }
        Ok(table)
    }
}

/// One `COMMAND INFO` row: name, arity, flags, first key, last key, step,
/// then (Redis 7) ACL categories, tips, key specs, subcommands.
fn decode_row(row: &Value) -> Option<Spec> {
    let fields = items(row)?;
    let name = text(fields.first()?)?.to_ascii_lowercase();
    let int = |i: usize| fields.get(i).and_then(as_int).unwrap_or(0);
    let flags = fields
        .get(2)
        .and_then(items)
        .unwrap_or_default()
        .iter()
        .filter_map(text)
        .fold(Flags(0), |acc, f| Flags(acc.0 | Flags::from_name(&f).0));
    let key_specs = fields
        .get(8)
        .and_then(items)
        .unwrap_or_default()
        .iter()
        .map(decode_key_spec)
        .collect();
    let mut subcommands = HashMap::new();
    for sub in fields.get(9).and_then(items).unwrap_or_default() {
        if let Some(spec) = decode_row(sub) {
            let short = spec.name.rsplit('|').next().unwrap_or_default().to_string();
            subcommands.insert(short, spec);
        }
    }
    Some(Spec {
        name,
        arity: int(1),
        flags,
        range: (int(3), int(4), int(5)),
        key_specs,
        subcommands,
        info: [encode(row, 2), encode(row, 3)],
    })
}

fn decode_key_spec(spec: &Value) -> KeySpec {
    let flags: Vec<String> = field(spec, "flags")
        .and_then(items)
        .unwrap_or_default()
        .iter()
        .filter_map(text)
        .collect();
    let begin = field(spec, "begin_search").map_or(Begin::Unknown, |b| {
        let spec = field(b, "spec");
        match field(b, "type").and_then(text).as_deref() {
            Some("index") => spec
                .and_then(|s| field(s, "index"))
                .and_then(as_int)
                .map_or(Begin::Unknown, Begin::Index),
            Some("keyword") => {
                let keyword = spec.and_then(|s| field(s, "keyword")).and_then(text);
                let from = spec.and_then(|s| field(s, "startfrom")).and_then(as_int);
                match (keyword, from) {
                    (Some(k), Some(from)) => Begin::Keyword {
                        keyword: k.to_ascii_lowercase(),
                        from,
                    },
                    _ => Begin::Unknown,
                }
            }
            _ => Begin::Unknown,
        }
    });
    let find = field(spec, "find_keys").map_or(Find::Unknown, |f| {
        let spec = field(f, "spec");
        let n = |name: &str| spec.and_then(|s| field(s, name)).and_then(as_int);
        match field(f, "type").and_then(text).as_deref() {
            Some("range") => match (n("lastkey"), n("keystep"), n("limit")) {
                (Some(last), Some(step), Some(limit)) => Find::Range { last, step, limit },
                _ => Find::Unknown,
            },
            Some("keynum") => match (n("keynumidx"), n("firstkey"), n("keystep")) {
                (Some(index), Some(first), Some(step)) => Find::Keynum { index, first, step },
                _ => Find::Unknown,
            },
            _ => Find::Unknown,
        }
    });
    KeySpec {
        begin,
        find,
        not_key: flags.iter().any(|f| f.eq_ignore_ascii_case("not_key")),
    }
}

fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// The key/value pairs of a map (or of a RESP2 flat array).
fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(flat) => flat.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
        _ => Vec::new(),
    }
}

fn field<'v>(map: &'v Value, name: &str) -> Option<&'v Value> {
    pairs(map)
        .into_iter()
        .find(|(k, _)| text(k).as_deref() == Some(name))
        .map(|(_, v)| v)
}

/// `value` as Redis would send it in RESP `protocol` (2 or 3): RESP3's
/// maps, sets, doubles and booleans become RESP2's arrays, bulk strings and
/// integers, as Redis itself downgrades them.
pub(crate) fn encode(value: &Value, protocol: u8) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, value, protocol == 3);
    out
}

fn encode_into(out: &mut Vec<u8>, value: &Value, resp3: bool) {
    let bulk = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    };
    let header = |out: &mut Vec<u8>, kind: char, n: usize| {
        out.extend_from_slice(format!("{kind}{n}\r\n").as_bytes());
    };
    match value {
        Value::Nil if resp3 => out.extend_from_slice(b"_\r\n"),
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Value::BulkString(b) => bulk(out, b),
        Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Value::Okay => out.extend_from_slice(b"+OK\r\n"),
        Value::Array(items) => {
            header(out, '*', items.len());
            items.iter().for_each(|v| encode_into(out, v, resp3));
        }
        Value::Set(items) => {
            header(out, if resp3 { '~' } else { '*' }, items.len());
            items.iter().for_each(|v| encode_into(out, v, resp3));
        }
        Value::Map(pairs) => {
            if resp3 {
                header(out, '%', pairs.len());
            } else {
                header(out, '*', pairs.len() * 2);
            }
            for (k, v) in pairs {
                encode_into(out, k, resp3);
                encode_into(out, v, resp3);
            }
        }
        Value::Double(d) if resp3 => out.extend_from_slice(format!(",{d}\r\n").as_bytes()),
        Value::Double(d) => bulk(out, d.to_string().as_bytes()),
        Value::Boolean(b) if resp3 => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
        Value::Boolean(b) => out.extend_from_slice(if *b { b":1\r\n" } else { b":0\r\n" }),
        Value::VerbatimString { text, .. } if resp3 => {
            out.extend_from_slice(format!("={}\r\ntxt:{text}\r\n", text.len() + 4).as_bytes())
        }
        Value::VerbatimString { text, .. } => bulk(out, text.as_bytes()),
        Value::Attribute { data, .. } => encode_into(out, data, resp3),
        Value::Push { data, .. } => {
            header(out, if resp3 { '>' } else { '*' }, data.len());
            data.iter().for_each(|v| encode_into(out, v, resp3));
        }
        Value::ServerError(e) => {
            out.push(b'-');
            out.extend_from_slice(super::server_error_line(e).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // Never in COMMAND's replies.
        _ => out.extend_from_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" }),
    }
}

/// Longest a command waits for the first round of learning.
const FIRST_ROUND_WAIT: Duration = Duration::from_secs(5);

/// Longest pause between attempts to learn the table while Redis is down.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Learns the table on a thread of its own (blocking sockets are fine
/// there): at start, until it succeeds, and again whenever a data
/// connection was reopened since the last time (seen through the
/// backend's `links_opened` counter when the table is asked for: a link
/// may reach another Redis than the one the table came from).
pub(crate) struct Learner {
    table: RwLock<Option<Arc<CommandTable>>>,
    /// Set to ask the thread for another round.
    wanted: AtomicBool,
    /// The `links_opened` count when the table was asked for last.
    seen_links: AtomicU64,
    /// Set once the first round ended, learned or not: until then a caller
    /// waits for it rather than calling Redis unavailable.
    tried: AtomicBool,
    thread: OnceLock<Thread>,
    /// Bound on each step of a round.
    timeout: Duration,
}

impl Learner {
    /// Starts the learning thread; each round asks the Redis servers that
    /// `targets` names at that moment (the master Sentinel found last, a
    /// cluster's seeds), in turn, until one answers.
    pub(crate) fn start(targets: Targets, timeout: Duration) -> Arc<Learner> {
        let learner = Arc::new(Learner {
            table: RwLock::new(None),
            wanted: AtomicBool::new(true),
            seen_links: AtomicU64::new(0),
            tried: AtomicBool::new(false),
            thread: OnceLock::new(),
            timeout,
        });
        let shared = learner.clone();
        let spawned = thread::Builder::new()
            .name("redis-commands".into())
            .spawn(move || shared.run(&targets, timeout));
        match spawned {
            Ok(handle) => {
                learner.thread.set(handle.thread().clone()).ok();
            }
            Err(e) => log::warn!("cannot start the command-table thread: {e}"),
        }
        learner
    }

    /// The table, if learned; asks for a new one when a data connection
    /// was opened since the last call. Right after start it waits
    /// (coroutine-aware) for the first round to end, learned or failed: a
    /// round is bounded by the timeout on each of its steps, so only a
    /// client arriving in the first moments waits, and never past
    /// [`FIRST_ROUND_WAIT`].
    pub(crate) fn table(&self, stats: &BackendStats) -> Option<Arc<CommandTable>> {
        let table = self.current(stats);
        if table.is_some() || self.tried.load(Ordering::SeqCst) {
            return table;
        }
        let deadline = std::time::Instant::now() + FIRST_ROUND_WAIT.max(self.timeout);
        while !self.tried.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            may::coroutine::sleep(Duration::from_millis(2));
        }
        self.current(stats)
    }

    fn current(&self, stats: &BackendStats) -> Option<Arc<CommandTable>> {
        let opened = stats.links_opened.load(Ordering::Relaxed);
        if self.seen_links.swap(opened, Ordering::Relaxed) != opened {
            self.wanted.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run(&self, targets: &Targets, timeout: Duration) {
        let mut retry = Duration::from_millis(50);
        let mut failing = false;
        loop {
            if !self.wanted.swap(false, Ordering::SeqCst) {
                thread::park();
                continue;
            }
            let started = std::time::Instant::now();
            match learn_any(&targets(), timeout) {
                Ok(table) => {
                    log::debug!(
                        "learned {} redis commands in {:?}",
                        table.commands.len(),
                        started.elapsed()
                    );
                    *self.table.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(table));
                    self.tried.store(true, Ordering::SeqCst);
                    retry = Duration::from_millis(50);
                    failing = false;
                }
                Err(Failed { reached, why }) => {
                    self.tried.store(true, Ordering::SeqCst);
                    // Not reaching Redis is the data links' to report (once,
                    // with the reason); only a Redis that refuses COMMAND is
                    // news here.
                    if !failing && reached {
                        log::warn!("cannot learn redis's commands yet (retrying): {why}");
                    } else if !failing {
                        log::debug!("cannot learn redis's commands yet (retrying): {why}");
                    }
                    failing = true;
                    self.wanted.store(true, Ordering::SeqCst);
                    thread::sleep(retry);
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}

/// One round: `COMMAND` and `COMMAND DOCS` on a RESP3 connection of its own.
/// Where the command table can be learned, asked again each round.
pub(crate) type Targets = Box<dyn Fn() -> Vec<RedisTarget> + Send>;

/// Why a round of learning failed, and whether a Redis was reached at all.
struct Failed {
    reached: bool,
    why: String,
}

/// [`learn`] from the first of `targets` that answers.
fn learn_any(targets: &[RedisTarget], timeout: Duration) -> Result<CommandTable, Failed> {
    let mut failed = Failed {
        reached: false,
        why: String::from("no Redis to ask"),
    };
    for target in targets {
        match learn(target, timeout) {
            Ok(table) => return Ok(table),
            Err(Failed { reached, why }) => {
                failed = Failed {
                    reached,
                    why: format!("{target}: {why}"),
                }
            }
        }
    }
    Err(failed)
}

fn learn(target: &RedisTarget, timeout: Duration) -> Result<CommandTable, Failed> {
    let mut cmds = redis::cmd("COMMAND").get_packed_command();
    redis::cmd("COMMAND")
        .arg("DOCS")
        .write_packed_command(&mut cmds);
    // The replies are large (COMMAND DOCS is ~300 KB): a generous bound.
    let timeout = timeout.max(Duration::from_secs(2));
    let (_conn, replies) = connect_speaking::<std::net::TcpStream>(target, timeout, 3, &cmds, 2)
        .map_err(|e| Failed {
            reached: matches!(e, ConnectError::Refused(_)),
            why: e.to_string(),
        })?;
    let reached = |why: String| Failed { reached: true, why };
    match replies.as_slice() {
        [info, docs] => CommandTable::decode(info, docs).map_err(reached),
        other => Err(reached(format!("unexpected replies: {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Value {
        redis::parse_redis_value(bytes).expect("valid RESP")
    }

    /// Redis 7.0's own RESP3 rows for GET, XREAD and OBJECT (ENCODING only).
    fn table() -> CommandTable {
        let get = "*10\r\n$3\r\nget\r\n:2\r\n~2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n~0\r\n~0\r\n\
            *1\r\n%3\r\n$5\r\nflags\r\n~1\r\n+RO\r\n$12\r\nbegin_search\r\n%2\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n%1\r\n$5\r\nindex\r\n:1\r\n\
            $9\r\nfind_keys\r\n%2\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n%3\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n~0\r\n";
        let xread = "*10\r\n$5\r\nxread\r\n:-4\r\n~3\r\n+readonly\r\n+blocking\r\n+movablekeys\r\n:0\r\n:0\r\n:0\r\n~0\r\n~0\r\n\
            *1\r\n%3\r\n$5\r\nflags\r\n~1\r\n+RO\r\n$12\r\nbegin_search\r\n%2\r\n$4\r\ntype\r\n$7\r\nkeyword\r\n$4\r\nspec\r\n%2\r\n$7\r\nkeyword\r\n$7\r\nSTREAMS\r\n$9\r\nstartfrom\r\n:1\r\n\
            $9\r\nfind_keys\r\n%2\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n%3\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:2\r\n~0\r\n";
        let object = "*10\r\n$6\r\nobject\r\n:-2\r\n~0\r\n:0\r\n:0\r\n:0\r\n~0\r\n~0\r\n~0\r\n\
            *1\r\n*10\r\n$15\r\nobject|encoding\r\n:3\r\n~1\r\n+readonly\r\n:2\r\n:2\r\n:1\r\n~0\r\n~0\r\n~0\r\n~0\r\n";
        let info = parse(format!("*3\r\n{get}{xread}{object}").as_bytes());
        let docs = parse(b"%1\r\n$3\r\nget\r\n%1\r\n$7\r\nsummary\r\n$3\r\nGet\r\n");
        CommandTable::decode(&info, &docs).expect("decodes")
    }

    /// Flags, arity and subcommands come out of the rows; rows re-encode
    /// byte for byte in RESP3 and as Redis downgrades them in RESP2.
    #[test]
    fn decodes_rows_and_reencodes_them() {
        let t = table();
        let get = t.get("get").unwrap();
        assert!(get.flags.has(Flags::READONLY) && !get.flags.has(Flags::WRITE));
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        assert!(get
            .info_row(Protocol::Resp3)
            .starts_with(b"*10\r\n$3\r\nget\r\n:2\r\n~2\r\n"));
        assert!(get
            .info_row(Protocol::Resp2)
            .starts_with(b"*10\r\n$3\r\nget\r\n:2\r\n*2\r\n"));
        let xread = t.get("xread").unwrap();
        assert!(xread.flags.has(Flags::BLOCKING));
        let argv: [&[u8]; 3] = [b"object", b"ENCODING", b"k"];
        match t.find("object", &argv) {
            Found::Command(s) => {
                assert_eq!(s.name, "object|encoding");
                assert_eq!(s.keys(&argv), [b"k"]);
            }
            _ => panic!("object|encoding not found"),
        }
        assert!(matches!(
            t.find("object", &[b"object", b"nosuch"]),
            Found::UnknownSubcommand(_)
        ));
        assert_eq!(
            t.docs("get", Protocol::Resp2),
            Some(&b"*2\r\n$7\r\nsummary\r\n$3\r\nGet\r\n"[..])
        );
    }

    /// Keys as `COMMAND GETKEYS` finds them: an index spec, and a keyword
    /// spec whose range is split by a limit (XREAD's streams and ids).
    #[test]
    fn keys_follow_the_key_specs() {
        let t = table();
        let get = t.get("get").unwrap();
        assert_eq!(get.keys(&[b"get", b"k"]), [b"k"]);
        let xread = t.get("xread").unwrap();
        let argv: [&[u8]; 8] = [b"XREAD", b"COUNT", b"2", b"streams", b"a", b"b", b"0", b"0"];
        assert_eq!(xread.keys(&argv), [&b"a"[..], b"b"]);
        assert!(xread.keys(&[b"XREAD", b"COUNT", b"2"]).is_empty());
    }

    /// Keynum specs (EVAL's, ZUNIONSTORE's) and the legacy range.
    #[test]
    fn keynum_and_legacy_ranges() {
        let spec = Spec {
            name: "eval".into(),
            arity: -3,
            flags: Flags::default(),
            range: (0, 0, 0),
            key_specs: vec![KeySpec {
                begin: Begin::Index(2),
                find: Find::Keynum {
                    index: 0,
                    first: 1,
                    step: 1,
                },
                not_key: false,
            }],
            subcommands: HashMap::new(),
            info: [Vec::new(), Vec::new()],
        };
        let argv: [&[u8]; 6] = [b"EVAL", b"s", b"2", b"x", b"y", b"arg"];
        assert_eq!(spec.keys(&argv), [&b"x"[..], b"y"]);
        assert!(spec.keys(&[b"EVAL", b"s", b"nan"]).is_empty());
        let legacy = Spec {
            range: (1, -1, 2),
            key_specs: Vec::new(),
            ..spec
        };
        let argv: [&[u8]; 5] = [b"MSET", b"a", b"1", b"b", b"2"];
        assert_eq!(legacy.keys(&argv), [&b"a"[..], b"b"]);
    }

    /// SORT's STORE destination is a key (it is written), its BY pattern not.
    #[test]
    fn sort_store_is_a_key() {
        let argv: [&[u8]; 7] = [b"SORT", b"l", b"BY", b"store", b"STORE", b"dst", b"ALPHA"];
        assert_eq!(sort_keys(&argv), [&b"l"[..], b"dst"]);
        assert_eq!(sort_keys(&[b"SORT", b"l"]), [b"l"]);
    }
}
