//! Redis Cluster: the slot map, a [`Node`] per master, redirections and
//! refreshes. Owns which master serves a slot; knows nothing of commands
//! beyond `CLUSTER SHARDS`/`CLUSTER SLOTS`, `ASKING` and the `MOVED`/`ASK`
//! error lines.
//!
//! # States and transitions
//! - The map (`SlotMap`: slot -> master, behind an `RwLock` held only to
//!   clone one `Arc`) starts from the first seed that answers, or empty when
//!   none does (every request then fails `Unavailable` until a refresh
//!   succeeds).
//! - A request runs at the slot's master. `MOVED slot addr`: a refresh is
//!   asked for, and the request is retried once at `addr` (a node not in the
//!   map gets its connections on the fly). `ASK slot addr`: `ASKING` + the
//!   command go once to `addr`; the map stays. At most two redirects are
//!   followed per request; a third comes back as Redis's error line.
//! - A request that finds its master unreachable asks for a refresh too
//!   (a failover shows in the next map).
//! - Refreshes run on one thread (so they are single-flight by
//!   construction), at most one per [`MIN_REFRESH_GAP`], when asked for and
//!   every [`REFRESH_EVERY`] (every [`REFRESH_RETRY`] while the map is
//!   incomplete). Each asks the nodes it knows, last good one first, then the
//!   masters, the replicas and the seeds, over a short-lived std socket (the
//!   thread may block; no may worker does), and swaps in the new map.
//!
//! # Tracking (`CACHE_INVALIDATION=tracking`)
//! Each master gets its own invalidation listener (started through the
//! [`Listeners`] the wiring hands in) and its own [`NodeFreshness`]: the
//! node's data connections redirect their tracking to that listener's id.
//! The shared freshness state is `Up` only while every master's listener is
//! up (`TrackGroup::settle`); one listener lost, or a master added whose
//! listener is not up yet, turns it `Down` (and empties the cache), as the
//! one listener of a single Redis does. A map in which some slot changed
//! master empties the whole cache: the new master never tracked what was
//! read from the old one, and a move is rare enough that keeping the other
//! slots' entries is not worth a per-slot index.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use redis::Value;

use super::connect::{connect, ConnectError};
use super::node::Node;
use super::slot::SLOTS;
use super::{server_error_line, BackendError, BackendOptions, BackendStats};
use crate::coherence::Freshness;
use crate::config::RedisTarget;

/// Starts an invalidation listener for one node (its target, the
/// freshness it reports into) and returns what stops it.
pub type Listeners =
    Arc<dyn Fn(RedisTarget, Arc<dyn Freshness>) -> Box<dyn FnOnce() + Send> + Send + Sync>;

/// Refresh of a healthy map.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Refresh while some slot has no master in the map.
pub const REFRESH_RETRY: Duration = Duration::from_millis(250);
/// Least time between two refreshes, however often they are asked for.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// Marks a slot no master serves in [`SlotMap::owner`].
const NO_OWNER: u16 = u16::MAX;

/// `host:port` of a node, as the cluster names it.
pub type Addr = (String, u16);

/// A redirection Redis answered instead of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives on `addr` now.
    Moved { slot: u16, addr: Addr },
    /// The slot is migrating: this key is on `addr`, ask there once.
    Ask { slot: u16, addr: Addr },
}

impl Redirect {
    /// Parses `MOVED 3999 127.0.0.1:6381` or `ASK 3999 127.0.0.1:6381`.
    pub fn parse(line: &str) -> Option<Redirect> {
        let mut parts = line.split(' ');
        let kind = parts.next()?;
        if kind != "MOVED" && kind != "ASK" {
            return None;
        }
        let slot = parts.next()?.parse().ok()?;
        let (host, port) = parts.next()?.rsplit_once(':')?;
        let addr = (host.to_string(), port.parse().ok()?);
        Some(match kind {
            "MOVED" => Redirect::Moved { slot, addr },
            _ => Redirect::Ask { slot, addr },
        })
    }

    /// The redirection carried by an error reply, if it is one.
    pub fn of_error(err: &BackendError) -> Option<Redirect> {
        match err {
            BackendError::Reply(line) => Redirect::parse(line),
            _ => None,
        }
    }

    /// The redirection a relayed reply is, if it is one (`-MOVED ...` or
    /// `-ASK ...`, as Redis sent it).
    pub fn of_raw(reply: &[u8]) -> Option<Redirect> {
        let line = reply.strip_prefix(b"-")?;
        let end = line.iter().position(|&b| b == b'\r')?;
        Redirect::parse(std::str::from_utf8(&line[..end]).ok()?)
    }

    /// The first redirection among packed replies.
    pub fn of_values(values: &[Value]) -> Option<Redirect> {
        values.iter().find_map(|v| match v {
            Value::ServerError(err) => Redirect::parse(&server_error_line(err)),
            _ => None,
        })
    }
}

/// One version of the slot map.
pub(crate) struct SlotMap {
    /// Index into `masters` of each slot's master, [`NO_OWNER`] if none.
    owner: Vec<u16>,
    masters: Vec<(Addr, Arc<Node>)>,
    /// Replicas, as refresh candidates.
    replicas: Vec<Addr>,
}

impl SlotMap {
    fn empty() -> SlotMap {
        SlotMap {
            owner: vec![NO_OWNER; SLOTS],
            masters: Vec::new(),
            replicas: Vec::new(),
        }
    }

    /// True when every slot has a master.
    pub(crate) fn complete(&self) -> bool {
        self.owner.iter().all(|&o| o != NO_OWNER)
    }

    /// Every master.
    pub(crate) fn masters(&self) -> impl Iterator<Item = &Node> {
        self.masters.iter().map(|(_, node)| &**node)
    }
}

/// What a `CLUSTER SHARDS` or `CLUSTER SLOTS` reply says, before nodes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Slot ranges (inclusive) and their master.
    pub ranges: Vec<(u16, u16, Addr)>,
    pub replicas: Vec<Addr>,
}

/// A cluster's masters by slot.
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// Per-node options: the seeds' credentials, the timeout, connections.
    template: BackendOptions,
    seeds: Vec<RedisTarget>,
    stats: Arc<BackendStats>,
    map: RwLock<Arc<SlotMap>>,
    /// Every node with connections, by address: the map's masters, and
    /// nodes a `MOVED`/`ASK` named before a refresh listed them.
    nodes: Mutex<HashMap<Addr, Arc<Node>>>,
    /// The node whose answer built the current map.
    last_good: Mutex<Option<Addr>>,
    refresh_wanted: AtomicBool,
    refresher: Mutex<Option<thread::Thread>>,
    /// With tracking: how to start a node's listener, and the group of
    /// per-node freshness states.
    listeners: Option<Listeners>,
    group: Arc<TrackGroup>,
}

impl Cluster {
    /// Learns the map from the seeds (when one answers) and starts the
    /// refresher thread.
    pub(crate) fn start(
        template: BackendOptions,
        seeds: Vec<RedisTarget>,
        stats: Arc<BackendStats>,
        listeners: Option<Listeners>,
    ) -> Cluster {
        let listeners = listeners.filter(|_| template.freshness.is_some());
        let group = Arc::new(TrackGroup {
            shared: template.freshness.clone(),
            members: Mutex::new(HashMap::new()),
        });
        let inner = Arc::new(Inner {
            listeners,
            group,
            template,
            seeds,
            stats,
            map: RwLock::new(Arc::new(SlotMap::empty())),
            nodes: Mutex::new(HashMap::new()),
            last_good: Mutex::new(None),
            refresh_wanted: AtomicBool::new(false),
            refresher: Mutex::new(None),
        });
        if !inner.refresh() {
            log::warn!("no cluster seed answered CLUSTER SHARDS/SLOTS; retrying in the background");
        }
        let weak = Arc::downgrade(&inner);
        let handle = thread::Builder::new()
            .name("cluster-refresh".into())
            .spawn(move || refresh_loop(weak))
            .expect("spawn cluster refresh thread");
        *lock(&inner.refresher) = Some(handle.thread().clone());
        Cluster { inner }
    }

    /// The current map.
    pub(crate) fn map(&self) -> Arc<SlotMap> {
        self.inner.map()
    }

    /// The master of `slot` in the current map.
    fn owner(&self, slot: u16) -> Option<Arc<Node>> {
        let map = self.inner.map.read().unwrap_or_else(|e| e.into_inner());
        let owner = *map.owner.get(usize::from(slot))?;
        map.masters
            .get(usize::from(owner))
            .map(|(_, node)| node.clone())
    }

    /// Asks the refresher for a new map (after a lost node connection).
    pub(crate) fn want_refresh(&self) {
        self.inner.want_refresh();
    }

    /// `keys` grouped by their master in the current map (by index into
    /// `keys`, in order); `None` gathers keys whose slot has no master.
    #[allow(clippy::type_complexity)]
    pub(crate) fn group(&self, keys: &[&[u8]]) -> Vec<(Option<Arc<Node>>, Vec<usize>)> {
        let map = self.map();
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let owner = map.owner[usize::from(super::slot::slot(key))];
            match groups.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, indexes)) => indexes.push(i),
                None => groups.push((owner, vec![i])),
            }
        }
        groups
            .into_iter()
            .map(|(owner, indexes)| {
                let node = map.masters.get(usize::from(owner)).map(|(_, n)| n.clone());
                (node, indexes)
            })
            .collect()
    }

    /// Runs `op` at the master of `slot`, following redirections: `op` gets
    /// the node and whether to prefix `ASKING`; `redirect` reads a
    /// redirection out of its result.
    pub(crate) fn route<T>(
        &self,
        slot: u16,
        mut op: impl FnMut(&Node, bool) -> Result<T, BackendError>,
        redirect: impl Fn(&Result<T, BackendError>) -> Option<Redirect>,
    ) -> Result<T, BackendError> {
        let Some(mut node) = self.owner(slot) else {
            self.inner.want_refresh();
            return Err(BackendError::Unavailable(format!(
                "no master serves slot {slot} (cluster map incomplete)"
            )));
        };
        let mut asking = false;
        for _ in 0..2 {
            let result = op(&node, asking);
            // A master lost or silent may have failed over: the next map
            // shows where its slots went.
            if matches!(
                result,
                Err(BackendError::Unavailable(_) | BackendError::Timeout)
            ) {
                self.inner.want_refresh();
                return result;
            }
            let Some(to) = redirect(&result) else {
                return result;
            };
            let stats = &self.inner.stats;
            let addr = match to {
                Redirect::Moved { addr, .. } => {
                    stats.redirects_moved.fetch_add(1, Ordering::Relaxed);
                    self.inner.want_refresh();
                    asking = false;
                    addr
                }
                Redirect::Ask { addr, .. } => {
                    stats.redirects_ask.fetch_add(1, Ordering::Relaxed);
                    asking = true;
                    addr
                }
            };
            node = self.inner.node_at(&addr);
        }
        op(&node, asking)
    }
}

impl Inner {
    /// The current map (the read lock is held only to clone the `Arc`).
    fn map(&self) -> Arc<SlotMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wakes the refresher (it refreshes at most once per gap).
    fn want_refresh(&self) {
        if !self.refresh_wanted.swap(true, Ordering::AcqRel) {
            if let Some(thread) = lock(&self.refresher).as_ref() {
                thread.unpark();
            }
        }
    }

    /// The node at `addr`, with connections opened on the fly if the map
    /// does not have it yet.
    fn node_at(&self, addr: &Addr) -> Arc<Node> {
        lock(&self.nodes)
            .entry(addr.clone())
            .or_insert_with(|| self.start_node(addr))
            .clone()
    }

    fn start_node(&self, addr: &Addr) -> Arc<Node> {
        let mut options = self.template.clone();
        options.target = self.target(addr);
        if let Some(listeners) = &self.listeners {
            let target = options.target.clone();
            let freshness = self
                .group
                .join(addr.clone(), |freshness| listeners(target, freshness));
            options.freshness = Some(freshness);
        }
        let node = Arc::new(Node::start(&options, self.stats.clone()));
        self.stats
            .register_node(&format!("{}:{}", addr.0, addr.1), node.open_connections());
        node
    }

    /// The seeds' credentials and db at `addr`.
    fn target(&self, addr: &Addr) -> RedisTarget {
        let mut target = self.seeds[0].clone();
        target.host = addr.0.clone();
        target.port = addr.1;
        target
    }

    /// Asks the known nodes for the layout and swaps in the new map; false
    /// when none answered.
    fn refresh(&self) -> bool {
        self.stats.cluster_refreshes.fetch_add(1, Ordering::Relaxed);
        let map = self.map();
        let mut candidates: Vec<RedisTarget> = Vec::new();
        let mut add = |t: RedisTarget| {
            if !candidates
                .iter()
                .any(|c| c.host == t.host && c.port == t.port)
            {
                candidates.push(t);
            }
        };
        if let Some(addr) = lock(&self.last_good).clone() {
            add(self.target(&addr));
        }
        for (addr, _) in &map.masters {
            add(self.target(addr));
        }
        for addr in &map.replicas {
            add(self.target(addr));
        }
        for seed in &self.seeds {
            add(seed.clone());
        }
        for target in candidates {
            match fetch_layout(&target, self.template.timeout) {
                Ok(layout) if !layout.ranges.is_empty() => {
                    *lock(&self.last_good) = Some((target.host.clone(), target.port));
                    self.install(layout);
                    return true;
                }
                Ok(_) => log::debug!("{target} reports no slots"),
                Err(why) => log::debug!("cluster refresh from {target} failed: {why}"),
            }
        }
        false
    }

    /// Builds and swaps in the map of `layout`, reusing nodes by address.
    fn install(&self, layout: Layout) {
        let mut owner = vec![NO_OWNER; SLOTS];
        let mut masters: Vec<(Addr, Arc<Node>)> = Vec::new();
        let mut nodes = lock(&self.nodes);
        for (start, end, addr) in layout.ranges {
            let index = match masters.iter().position(|(a, _)| *a == addr) {
                Some(i) => i,
                None => {
                    let node = nodes
                        .entry(addr.clone())
                        .or_insert_with(|| self.start_node(&addr))
                        .clone();
                    masters.push((addr, node));
                    masters.len() - 1
                }
            };
            for slot in start..=end.min(SLOTS as u16 - 1) {
                owner[usize::from(slot)] = index as u16;
            }
        }
        // Nodes no map needs lose their connections once no request holds
        // them, and their listeners.
        nodes.retain(|addr, _| masters.iter().any(|(a, _)| a == addr));
        drop(nodes);
        let needed: Vec<Addr> = masters.iter().map(|(a, _)| a.clone()).collect();
        self.group.retain(&needed);
        if self.listeners.is_some() {
            let old = self.map();
            let moved = (0..SLOTS).any(|slot| {
                let (was, now) = (old.owner[slot], owner[slot]);
                was != NO_OWNER
                    && now != NO_OWNER
                    && old.masters[usize::from(was)].0 != masters[usize::from(now)].0
            });
            if moved {
                log::info!("a slot changed master; cache emptied");
                self.group.flush();
            }
        }
        self.stats.retain_nodes(
            &masters
                .iter()
                .map(|((h, p), _)| format!("{h}:{p}"))
                .collect::<Vec<_>>(),
        );
        let next = SlotMap {
            owner,
            masters,
            replicas: layout.replicas,
        };
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }
}

/// The per-node freshness states of a tracked cluster, and the shared one
/// they add up to.
struct TrackGroup {
    shared: Option<Arc<dyn Freshness>>,
    /// Each node's state and what stops its listener.
    #[allow(clippy::type_complexity)]
    members: Mutex<HashMap<Addr, (Arc<NodeFreshness>, Option<Box<dyn FnOnce() + Send>>)>>,
}

impl TrackGroup {
    /// Adds the node at `addr` (its listener not up yet) and returns the
    /// freshness its data connections and listener report into; `start`
    /// starts the listener.
    fn join(
        self: &Arc<Self>,
        addr: Addr,
        start: impl FnOnce(Arc<dyn Freshness>) -> Box<dyn FnOnce() + Send>,
    ) -> Arc<dyn Freshness> {
        let shared = self.shared.clone().expect("tracking has a shared state");
        let node = Arc::new(NodeFreshness {
            shared,
            group: Arc::downgrade(self),
            id: AtomicI64::new(-1),
        });
        {
            let mut members = lock(&self.members);
            if let Some((_, Some(stop))) = members.remove(&addr) {
                stop();
            }
            members.insert(addr, (node.clone(), None));
            self.settle_locked(&members);
        }
        let stop = start(node.clone());
        if let Some(member) = lock(&self.members)
            .values_mut()
            .find(|(n, _)| Arc::ptr_eq(n, &node))
        {
            member.1 = Some(stop);
            return node;
        }
        // Replaced meanwhile: this listener is not wanted.
        stop();
        node
    }

    /// Drops (and stops the listeners of) nodes not in `addrs`.
    fn retain(&self, addrs: &[Addr]) {
        let mut members = lock(&self.members);
        let gone: Vec<Addr> = members
            .keys()
            .filter(|a| !addrs.contains(a))
            .cloned()
            .collect();
        for addr in gone {
            if let Some((_, Some(stop))) = members.remove(&addr) {
                stop();
            }
        }
        self.settle_locked(&members);
    }

    fn flush(&self) {
        if let Some(shared) = &self.shared {
            shared.flush();
        }
    }

    /// The shared state is up, with some member's id, only while every
    /// member's listener is up.
    #[allow(clippy::type_complexity)]
    fn settle_locked(
        &self,
        members: &HashMap<Addr, (Arc<NodeFreshness>, Option<Box<dyn FnOnce() + Send>>)>,
    ) {
        let Some(shared) = &self.shared else { return };
        let ids: Vec<i64> = members
            .values()
            .map(|(n, _)| n.id.load(Ordering::SeqCst))
            .collect();
        if !ids.is_empty() && ids.iter().all(|&id| id >= 0) {
            if shared.redirect().is_none() {
                shared.listener_up(ids[0]);
            }
        } else if shared.redirect().is_some() {
            shared.listener_down();
        }
    }

    fn settle(&self) {
        let members = lock(&self.members);
        self.settle_locked(&members);
    }
}

/// One master's tracking state: its own listener's id (what its data
/// connections redirect to); every other event goes to the shared state.
pub struct NodeFreshness {
    shared: Arc<dyn Freshness>,
    group: Weak<TrackGroup>,
    /// The listener's client id while it is up, -1 while down.
    id: AtomicI64,
}

impl Freshness for NodeFreshness {
    fn redirect(&self) -> Option<i64> {
        let id = self.id.load(Ordering::SeqCst);
        (id >= 0).then_some(id)
    }

    fn listener_up(&self, id: i64) {
        self.id.store(id, Ordering::SeqCst);
        if let Some(group) = self.group.upgrade() {
            group.settle();
        }
    }

    fn listener_down(&self) {
        self.id.store(-1, Ordering::SeqCst);
        // Emptied even if another listener already took the state down:
        // this node's keys were cached while it was up.
        self.shared.listener_down();
        if let Some(group) = self.group.upgrade() {
            group.settle();
        }
    }

    fn invalidate(&self, key: &[u8]) -> bool {
        self.shared.invalidate(key)
    }

    fn flush(&self) {
        self.shared.flush();
    }

    fn data_link_reopened(&self, index: usize) {
        self.shared.data_link_reopened(index);
    }

    fn tracking_failed(&self, why: &str) {
        self.shared.tracking_failed(why);
    }

    fn push_mode(&self) -> bool {
        self.shared.push_mode()
    }

    fn redirect_refused(&self, why: &str) {
        self.shared.redirect_refused(why);
    }

    fn pushed(&self, keys: Option<&[&[u8]]>) {
        self.shared.pushed(keys);
    }

    fn data_link_lost(&self, index: usize) {
        self.shared.data_link_lost(index);
    }
}

/// The refresher thread: until the cluster is dropped, refreshes when asked
/// for (at most once per gap) and on its period.
fn refresh_loop(inner: Weak<Inner>) {
    let mut last = Instant::now();
    loop {
        let period = match inner.upgrade() {
            Some(inner) if inner.map().complete() => REFRESH_EVERY,
            Some(_) => REFRESH_RETRY,
            None => return,
        };
        thread::park_timeout(period.saturating_sub(last.elapsed()));
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let wanted = inner.refresh_wanted.load(Ordering::Acquire);
        if !wanted && last.elapsed() < period {
            continue;
        }
        let gap = MIN_REFRESH_GAP.saturating_sub(last.elapsed());
        if !gap.is_zero() {
            thread::sleep(gap);
        }
        // Cleared before asking, so a request failing during the refresh
        // asks for the next one.
        inner.refresh_wanted.store(false, Ordering::Release);
        last = Instant::now();
        inner.refresh();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when the first of `seeds` that answers `INFO cluster` reports
/// `cluster_enabled:1`; `None` when none answers.
pub(crate) fn detect(seeds: &[RedisTarget], timeout: Duration) -> Option<bool> {
    let info = redis::cmd("INFO").arg("cluster").get_packed_command();
    for seed in seeds {
        match connect::<std::net::TcpStream>(seed, timeout, &info, 1) {
            Ok((_, replies)) => {
                let text = match replies.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::VerbatimString { text, .. }) => text.clone(),
                    _ => String::new(),
                };
                return Some(text.contains("cluster_enabled:1"));
            }
            // The data links log why a Redis cannot be reached (once).
            Err(why) => log::debug!("seed {seed} did not answer INFO cluster: {why}"),
        }
    }
    None
}

/// Asks `target` for the layout: `CLUSTER SHARDS`, or `CLUSTER SLOTS` when
/// the server does not know SHARDS (before 7.0).
fn fetch_layout(target: &RedisTarget, timeout: Duration) -> Result<Layout, String> {
    let shards = redis::cmd("CLUSTER").arg("SHARDS").get_packed_command();
    let (_, replies) = connect::<std::net::TcpStream>(target, timeout, &shards, 1)
        .map_err(|e: ConnectError| e.to_string())?;
    match replies.into_iter().next() {
        Some(Value::ServerError(_)) => {
            let slots = redis::cmd("CLUSTER").arg("SLOTS").get_packed_command();
            let (_, replies) = connect::<std::net::TcpStream>(target, timeout, &slots, 1)
                .map_err(|e| e.to_string())?;
            match replies.into_iter().next() {
                Some(Value::Array(items)) => Ok(parse_slots(&items, &target.host)),
                other => Err(format!("unexpected CLUSTER SLOTS reply: {other:?}")),
            }
        }
        Some(Value::Array(items)) => Ok(parse_shards(&items, &target.host)),
        other => Err(format!("unexpected CLUSTER SHARDS reply: {other:?}")),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A RESP2 flat `[name, value, ...]` array or a RESP3 map, as pairs.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| Some((text(&kv[0])?, kv.get(1)?)))
            .collect(),
        Value::Map(kv) => kv.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        _ => Vec::new(),
    }
}

/// The host to dial for a node: its endpoint, unless that is unknown
/// (`?` or empty, then the host we asked).
fn endpoint(host: Option<String>, asked: &str) -> String {
    match host {
        Some(h) if !h.is_empty() && h != "?" => h,
        _ => asked.to_string(),
    }
}

/// `CLUSTER SHARDS`: each shard's slot ranges and its master (role master,
/// health not `failed`, else the first master).
pub(crate) fn parse_shards(shards: &[Value], asked: &str) -> Layout {
    let mut layout = Layout::default();
    for shard in shards {
        let fields = pairs(shard);
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let slots: Vec<i64> = match field("slots") {
            Some(Value::Array(s)) => s.iter().filter_map(int).collect(),
            _ => Vec::new(),
        };
        let nodes = match field("nodes") {
            Some(Value::Array(n)) => n.as_slice(),
            _ => &[],
        };
        let mut master = None;
        for node in nodes {
            let f = pairs(node);
            let get = |name: &str| f.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let host = endpoint(get("endpoint").and_then(text), asked);
            let Some(port) = get("port").and_then(int) else {
                continue;
            };
            let addr = (host, port as u16);
            let role = get("role").and_then(text).unwrap_or_default();
            let failed = get("health").and_then(text).as_deref() == Some("failed");
            if role == "master" {
                if master.is_none() || !failed {
                    master = Some(addr);
                }
            } else {
                layout.replicas.push(addr);
            }
        }
        let Some(master) = master else { continue };
        for range in slots.chunks(2) {
            if let [start, end] = range {
                layout
                    .ranges
                    .push((*start as u16, *end as u16, master.clone()));
            }
        }
    }
    layout
}

/// `CLUSTER SLOTS`: `[start, end, [host, port, id], [replica...]...]`.
pub(crate) fn parse_slots(ranges: &[Value], asked: &str) -> Layout {
    let mut layout = Layout::default();
    for range in ranges {
        let Value::Array(items) = range else { continue };
        let (Some(start), Some(end)) = (items.first().and_then(int), items.get(1).and_then(int))
        else {
            continue;
        };
        let addr_of = |v: &Value| match v {
            Value::Array(n) => Some((
                endpoint(n.first().and_then(text), asked),
                n.get(1).and_then(int)? as u16,
            )),
            _ => None,
        };
        let Some(master) = items.get(2).and_then(addr_of) else {
            continue;
        };
        layout
            .replicas
            .extend(items.iter().skip(3).filter_map(addr_of));
        layout.ranges.push((start as u16, end as u16, master));
    }
    layout
}

/// Open connections per node, for the metrics: each node's address label
/// (leaked once per address ever seen, so labels can be `'static`) and gauge.
#[derive(Debug, Default)]
pub struct NodeGauges {
    nodes: Mutex<Vec<(&'static str, Arc<AtomicI64>)>>,
}

impl NodeGauges {
    pub(crate) fn register(&self, addr: &str, gauge: Arc<AtomicI64>) {
        let label = intern(addr);
        let mut nodes = lock(&self.nodes);
        nodes.retain(|(l, _)| *l != label);
        nodes.push((label, gauge));
    }

    pub(crate) fn retain(&self, addrs: &[String]) {
        lock(&self.nodes).retain(|(l, _)| addrs.iter().any(|a| a == l));
    }

    /// `(address, open connections)` of every node in the map.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        lock(&self.nodes)
            .iter()
            .map(|(l, g)| (*l, g.load(Ordering::Relaxed).max(0) as u64))
            .collect()
    }
}

fn intern(addr: &str) -> &'static str {
    static LABELS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut labels = lock(&LABELS);
    if let Some(l) = labels.iter().find(|l| **l == addr) {
        return l;
    }
    let l: &'static str = Box::leak(addr.to_string().into_boxed_str());
    labels.push(l);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            bulk("id"),
            bulk("abc"),
            bulk("port"),
            Value::Int(port),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk(health),
        ])
    }

    /// A shared freshness state that records its transitions.
    #[derive(Default)]
    struct Shared {
        redirect: AtomicI64,
        events: Mutex<Vec<String>>,
    }

    impl Freshness for Shared {
        fn redirect(&self) -> Option<i64> {
            let id = self.redirect.load(Ordering::SeqCst);
            (id >= 0).then_some(id)
        }
        fn listener_up(&self, id: i64) {
            self.redirect.store(id, Ordering::SeqCst);
            lock(&self.events).push("up".into());
        }
        fn listener_down(&self) {
            self.redirect.store(-1, Ordering::SeqCst);
            lock(&self.events).push("down".into());
        }
        fn invalidate(&self, _key: &[u8]) -> bool {
            true
        }
        fn flush(&self) {
            lock(&self.events).push("flush".into());
        }
        fn data_link_reopened(&self, _index: usize) {}
        fn tracking_failed(&self, _why: &str) {}
    }

    /// The shared state is up only while every master's listener is up: it
    /// waits for the last one, goes down (emptying the cache) when one is
    /// lost, and follows the members when a master leaves the map.
    #[test]
    fn tracking_is_up_only_with_every_listener() {
        let shared = Arc::new(Shared::default());
        shared.redirect.store(-1, Ordering::SeqCst);
        let group = Arc::new(TrackGroup {
            shared: Some(shared.clone() as Arc<dyn Freshness>),
            members: Mutex::new(HashMap::new()),
        });
        let stopped = Arc::new(AtomicI64::new(0));
        let stopper = |stopped: &Arc<AtomicI64>| {
            let stopped = stopped.clone();
            move |_: Arc<dyn Freshness>| -> Box<dyn FnOnce() + Send> {
                Box::new(move || {
                    stopped.fetch_add(1, Ordering::SeqCst);
                })
            }
        };
        let a = group.join(("h".into(), 1), stopper(&stopped));
        let b = group.join(("h".into(), 2), stopper(&stopped));
        a.listener_up(10);
        assert_eq!(shared.redirect(), None, "b is not up yet");
        assert_eq!(a.redirect(), Some(10));
        b.listener_up(20);
        assert!(shared.redirect().is_some());
        a.listener_down();
        assert_eq!(shared.redirect(), None);
        assert_eq!(a.redirect(), None);
        a.listener_up(11);
        assert!(shared.redirect().is_some());
        // A master joining takes the state down until its listener is up.
        let c = group.join(("h".into(), 3), stopper(&stopped));
        assert_eq!(shared.redirect(), None);
        c.listener_up(30);
        assert!(shared.redirect().is_some());
        // A master leaving the map: its listener is stopped.
        c.listener_down();
        group.retain(&[("h".into(), 1), ("h".into(), 2)]);
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
        assert!(shared.redirect().is_some());
        let events = lock(&shared.events).join(",");
        assert_eq!(events, "up,down,up,down,up,down,up");
    }

    /// Redirection lines parse into kind, slot and address; others do not.
    #[test]
    fn redirect_lines() {
        assert_eq!(
            Redirect::of_raw(b"-ASK 3999 127.0.0.1:6381\r\n"),
            Some(Redirect::Ask {
                slot: 3999,
                addr: ("127.0.0.1".into(), 6381)
            })
        );
        assert_eq!(Redirect::of_raw(b"-ERR MOVED\r\n"), None);
        assert_eq!(Redirect::of_raw(b"$5\r\nMOVED\r\n"), None);
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: ("127.0.0.1".into(), 6381)
            })
        );
        assert_eq!(
            Redirect::parse("ASK 1 ::1:7000"),
            Some(Redirect::Ask {
                slot: 1,
                addr: ("::1".into(), 7000)
            })
        );
        assert_eq!(Redirect::parse("ERR MOVED 1 a:1"), None);
        assert_eq!(Redirect::parse("MOVED x a:1"), None);
        assert_eq!(
            Redirect::of_error(&BackendError::Reply("ASK 5 h:2".into())),
            Some(Redirect::Ask {
                slot: 5,
                addr: ("h".into(), 2)
            })
        );
    }

    /// CLUSTER SHARDS: slot ranges go to the shard's healthy master; the
    /// replicas are kept as refresh candidates.
    #[test]
    fn shards_reply() {
        let shards = vec![
            Value::Array(vec![
                bulk("slots"),
                Value::Array(vec![
                    Value::Int(0),
                    Value::Int(100),
                    Value::Int(200),
                    Value::Int(300),
                ]),
                bulk("nodes"),
                Value::Array(vec![
                    node(7000, "master", "online"),
                    node(7003, "replica", "online"),
                ]),
            ]),
            Value::Array(vec![
                bulk("slots"),
                Value::Array(vec![Value::Int(101), Value::Int(199)]),
                bulk("nodes"),
                Value::Array(vec![
                    node(7001, "master", "failed"),
                    node(7004, "master", "online"),
                ]),
            ]),
        ];
        let layout = parse_shards(&shards, "seed");
        let a = |p| ("127.0.0.1".to_string(), p);
        assert_eq!(
            layout.ranges,
            vec![(0, 100, a(7000)), (200, 300, a(7000)), (101, 199, a(7004))]
        );
        assert_eq!(layout.replicas, vec![a(7003)]);
    }

    /// CLUSTER SLOTS: the first node of a range is its master; an unknown
    /// endpoint (`?`) means the host that was asked.
    #[test]
    fn slots_reply() {
        let ranges = vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![bulk("?"), Value::Int(7000), bulk("id1")]),
            Value::Array(vec![bulk("10.0.0.2"), Value::Int(7001), bulk("id2")]),
        ])];
        let layout = parse_slots(&ranges, "seed");
        assert_eq!(layout.ranges, vec![(0, 16383, ("seed".to_string(), 7000))]);
        assert_eq!(layout.replicas, vec![("10.0.0.2".to_string(), 7001)]);
    }
}
