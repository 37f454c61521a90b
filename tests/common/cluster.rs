//! A local Redis Cluster for the system tests: `redis-server` processes
//! with `--cluster-enabled yes`, each in its own temp dir on a free loopback
//! port, joined by `redis-cli --cluster create ... --cluster-yes` (with
//! replicas when asked), and killed on drop. Commands sent through
//! [`Cluster::cmd`] follow `MOVED`/`ASK` themselves, so tests can write and
//! read keys wherever they live.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::Value;

use super::{poll_for, Redis};

/// A cluster node's role and identity.
pub struct Member {
    pub redis: Redis,
    pub dir: std::path::PathBuf,
}

/// A running cluster.
pub struct Cluster {
    pub members: Vec<Member>,
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// Where node dirs go: tmpfs when there is one. Cluster nodes fsync
/// `nodes.conf` on every slot change; on a disk shared with busy builds an
/// fsync can stall a node past the proxy's timeout, which is not what these
/// tests measure.
fn base_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl Cluster {
    /// `masters` masters with `replicas` replicas each, every slot assigned,
    /// every node agreeing (`cluster_state:ok`) and every replica in sync.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        let n = masters * (1 + replicas);
        let members: Vec<Member> = (0..n)
            .map(|_| {
                let dir = base_dir().join(format!(
                    "redis-proxy-cluster-{}-{}",
                    std::process::id(),
                    DIRS.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("create cluster node dir");
                // The bus port is our own pick too: the default (port +
                // 10000) can land in the ephemeral range, taken by any
                // outgoing connection of the busy test machine.
                let bus = super::free_port().to_string();
                let redis = Redis::start_with(&[
                    "--cluster-port",
                    &bus,
                    "--dir",
                    &dir.to_string_lossy(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    // Replicas sync at once (7.0 waits 5 s for more).
                    "--repl-diskless-sync-delay",
                    "0",
                ]);
                Member { redis, dir }
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for m in &members {
            create.arg(format!("127.0.0.1:{}", m.redis.port()));
        }
        create
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes");
        let out = create.output().expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { members };
        cluster.wait_settled(n, masters * replicas);
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok` and knows
    /// `n` nodes, and `replicas` nodes are replicas whose initial sync is
    /// done (a node turns replica a moment after `--cluster create`
    /// returns, and only then starts syncing: a master killed before that
    /// leaves an empty replica to promote).
    pub fn wait_settled(&self, n: usize, replicas: usize) {
        poll_for(
            Duration::from_secs(30),
            "the cluster to settle",
            &mut || {
                let mut synced = 0;
                let settled = self.running().all(|m| {
                    let info = info(&m.redis, "CLUSTER", Some("INFO"));
                    let repl = info_section(&m.redis, "replication");
                    if repl.contains("role:slave")
                        && repl.contains("master_link_status:up")
                        && repl.contains("master_sync_in_progress:0")
                    {
                        synced += 1;
                    }
                    info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{n}"))
                });
                (settled && synced == replicas).then_some(())
            },
        );
    }

    fn running(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.redis.is_running())
    }

    /// `REDIS_URL` with every node as a seed.
    pub fn urls(&self) -> String {
        self.members
            .iter()
            .map(|m| m.redis.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first running node.
    pub fn any(&self) -> &Redis {
        &self.running().next().expect("a running node").redis
    }

    /// The member listening on `port`.
    pub fn member(&self, port: u16) -> &Member {
        self.members
            .iter()
            .find(|m| m.redis.port() == port)
            .expect("a member on that port")
    }

    /// The member on `port`, mutable (to stop it).
    pub fn member_mut(&mut self, port: u16) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.redis.port() == port)
            .expect("a member on that port")
    }

    /// A node's cluster id.
    pub fn id(&self, port: u16) -> String {
        text(&self.member(port).redis.cmd(&[b"CLUSTER", b"MYID"]))
    }

    /// Port of the master that serves `slot`, per `CLUSTER SLOTS` of a
    /// running node.
    pub fn master_of(&self, slot: u16) -> u16 {
        let Value::Array(ranges) = self.any().cmd(&[b"CLUSTER", b"SLOTS"]) else {
            panic!("CLUSTER SLOTS is not an array");
        };
        for range in ranges {
            let Value::Array(items) = range else { continue };
            let (Value::Int(start), Value::Int(end)) = (&items[0], &items[1]) else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot)) {
                let Value::Array(node) = &items[2] else {
                    continue;
                };
                let Value::Int(port) = node[1] else { continue };
                return port as u16;
            }
        }
        panic!("no master for slot {slot}");
    }

    /// Ports of the masters, in the order of their first slot.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for slot in (0..16384).step_by(256) {
            let port = self.master_of(slot);
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        ports
    }

    /// Port of a replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let id = self.id(port);
        self.running()
            .find(|m| {
                let repl = info_section(&m.redis, "replication");
                repl.contains("role:slave")
                    && info(&m.redis, "CLUSTER", Some("NODES"))
                        .lines()
                        .any(|l| l.contains("myself") && l.contains(&id))
            })
            .map(|m| m.redis.port())
            .expect("a replica of that master")
    }

    /// Runs a command at the node that serves `key`, following redirections.
    pub fn cmd(&self, key: &[u8], args: &[&[u8]]) -> Value {
        let mut port = self.any().port();
        let mut asking = false;
        for _ in 0..5 {
            let mut conn = self.member(port).redis.conn();
            if asking {
                redis::cmd("ASKING").exec(&mut conn).expect("ASKING");
            }
            let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("name"));
            for a in &args[1..] {
                cmd.arg(*a);
            }
            match cmd.query::<Value>(&mut conn) {
                Ok(v) => return v,
                Err(e) => {
                    let (kind, to) = match (e.code(), e.redirect_node()) {
                        (Some(kind), Some((addr, _))) => (kind.to_string(), addr.to_string()),
                        _ => panic!("{:?} of {:?}: {e}", args[0], key),
                    };
                    asking = kind == "ASK";
                    port = to.rsplit_once(':').expect("host:port").1.parse().unwrap();
                }
            }
        }
        panic!("too many redirections for {key:?}");
    }

    /// `SET key value` wherever `key` lives.
    pub fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.cmd(key, &[b"SET", key, value.as_ref()]);
    }

    /// `GET key` wherever `key` lives.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        let key = key.as_ref();
        match self.cmd(key, &[b"GET", key]) {
            Value::BulkString(b) => Some(b),
            _ => None,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.redis.stop();
            let _ = std::fs::remove_dir_all(&m.dir);
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => panic!("not text: {other:?}"),
    }
}

fn info(redis: &Redis, cmd: &str, sub: Option<&str>) -> String {
    let mut c = redis::cmd(cmd);
    if let Some(sub) = sub {
        c.arg(sub);
    }
    let mut conn = match redis::Client::open(redis.url()).and_then(|c| c.get_connection()) {
        Ok(conn) => conn,
        Err(_) => return String::new(),
    };
    c.query::<Value>(&mut conn)
        .map(|v| text(&v))
        .unwrap_or_default()
}

/// One `INFO` section of a node.
pub fn info_section(redis: &Redis, section: &str) -> String {
    info(redis, "INFO", Some(section))
}
