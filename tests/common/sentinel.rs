//! Sentinel harness: a `redis-sentinel` (redis-server `--sentinel`) of our
//! own on a free loopback port, monitoring one master with quorum 1 and
//! `down-after-milliseconds 1000`; its config file (which Sentinel rewrites)
//! in a temp dir of its own; killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{free_port, Drain, Redis, DEADLINE, POLL};

/// The master's name every test Sentinel monitors.
pub const MASTER: &str = "mymaster";

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A running Sentinel.
pub struct Sentinel {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    out: Drain,
}

impl Sentinel {
    /// Starts a Sentinel monitoring the master on `master_port` as
    /// [`MASTER`], and waits until it answers PING.
    pub fn start(master_port: u16) -> Sentinel {
        Sentinel::start_on(free_port(), master_port)
    }

    /// [`Sentinel::start`] on a given port.
    pub fn start_on(port: u16, master_port: u16) -> Sentinel {
        Sentinel::start_with(port, master_port, "")
    }

    /// [`Sentinel::start_on`] with more lines for sentinel.conf (before the
    /// `sentinel monitor` line), e.g. TLS settings.
    pub fn start_with(port: u16, master_port: u16, conf_lines: &str) -> Sentinel {
        let dir = std::env::temp_dir().join(format!(
            "redis-proxy-sentinel-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the Sentinel dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n{conf_lines}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 10000\n",
                dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let out = Drain::spawn(child.stdout.take().expect("piped stdout"));
        Drain::spawn(child.stderr.take().expect("piped stderr"));
        let end = Instant::now() + DEADLINE;
        while !answers(port) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sentinel exited ({status}): {}", out.text());
            }
            assert!(
                Instant::now() < end,
                "sentinel on {port} never answered PING"
            );
            thread::sleep(POLL);
        }
        Sentinel {
            port,
            child: Some(child),
            dir,
            out,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What it logged so far (its failover steps), for failure messages.
    pub fn logs(&self) -> String {
        self.out.text()
    }

    /// Waits until it lists `replica` as a replica of [`MASTER`] (it learns
    /// them from the master's INFO), so a failover has somewhere to go.
    pub fn wait_for_replica(&self, replica: &Redis) {
        let port = replica.port().to_string();
        super::poll_until("Sentinel to know the replica", || {
            let reply = self.query(&format!(
                "*3\r\n$8\r\nSENTINEL\r\n$8\r\nREPLICAS\r\n${}\r\n{MASTER}\r\n",
                MASTER.len()
            ));
            (reply.contains(&port) && !reply.contains("disconnected")).then_some(())
        });
    }

    /// One raw RESP command (as bytes on the wire), its reply as text.
    pub fn cmd(&self, command: &str) -> String {
        self.query(command)
    }

    /// One raw command, its reply as text.
    fn query(&self, command: &str) -> String {
        let attempt = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(command.as_bytes())?;
            let mut buf = vec![0; 64 * 1024];
            let n = s.read(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        attempt().unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server in a directory of its own, removed on drop. A replica
/// (and a master a failover demotes) writes the RDB it syncs to `dump.rdb`
/// in its dir; in the shared temp dir every later test server would load it.
pub struct OwnDir {
    pub redis: Redis,
    dir: PathBuf,
}

impl OwnDir {
    /// Starts a redis-server with `args` in a new directory.
    pub fn start(args: &[&str]) -> OwnDir {
        let dir = std::env::temp_dir().join(format!(
            "redis-proxy-node-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the server dir");
        let path = dir.to_string_lossy().into_owned();
        let mut all = vec!["--dir", path.as_str()];
        all.extend_from_slice(args);
        OwnDir {
            redis: Redis::start_with(&all),
            dir,
        }
    }

    /// A replica of `master`, in its own directory.
    pub fn replica_of(master: &Redis) -> OwnDir {
        let port = master.port().to_string();
        OwnDir::start(&["--replicaof", "127.0.0.1", &port])
    }
}

impl std::ops::Deref for OwnDir {
    type Target = Redis;
    fn deref(&self) -> &Redis {
        &self.redis
    }
}

impl std::ops::DerefMut for OwnDir {
    fn deref_mut(&mut self) -> &mut Redis {
        &mut self.redis
    }
}

impl Drop for OwnDir {
    fn drop(&mut self) {
        self.redis.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether something on `port` answers a PING at all (`+PONG`, or
/// `-NOAUTH` from a Sentinel with `requirepass`).
fn answers(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut buf = [0u8; 16];
        Ok(s.read(&mut buf)? > 0)
    };
    attempt().unwrap_or(false)
}

/// Whether the server on `port` says `ROLE` master.
pub fn is_master(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"*1\r\n$4\r\nROLE\r\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].windows(6).any(|w| w == b"master"))
    };
    attempt().unwrap_or(false)
}
