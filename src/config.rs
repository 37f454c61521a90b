//! config: every setting, its flag, its environment variable, its default and
//! its accepted range. Owns parsing and validation; never opens a socket.
//!
//! Flags win over environment variables; an environment variable set to the
//! empty string counts as unset. A bad value is reported in one line that
//! names the setting and the accepted range (the binary exits 2).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};

use crate::backend::tls::{Tls, TlsOptions};

/// Default backing Redis.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Default address both listeners bind.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default HTTP port.
pub const DEFAULT_PORT: u16 = 8080;
/// Default global expiry, in milliseconds.
pub const DEFAULT_CACHE_TTL_MS: u64 = 60_000;
/// Default maximum number of cached keys.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default maximum of connected clients, HTTP and RESP together.
pub const DEFAULT_MAX_CLIENTS: usize = 1024;
/// Default bound on one Redis round trip, in milliseconds.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 1000;
/// Default idle time after which a client connection is closed, in milliseconds.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default grace period for in-flight requests at shutdown, in milliseconds.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 5000;
/// Default bound on one RESP request, in bytes.
pub const DEFAULT_RESP_MAX_REQUEST_BYTES: usize = 64 << 20;
/// Default bound on bytes held for all clients together, 1 GiB.
pub const DEFAULT_MAX_BUFFER_BYTES: u64 = 1 << 30;
/// Smallest client-buffer bound accepted: 1 MiB.
pub const MIN_BUFFER_BYTES: u64 = 1 << 20;
/// Largest client-buffer bound accepted: 1 PiB (effectively unbounded).
pub const MAX_BUFFER_BYTES: u64 = 1 << 50;
/// File descriptors kept out of the client limit: Redis connections (one
/// per worker, plus invalidation and health), listeners, stdio, the odd
/// file; on top of [`FDS_RESERVED_PER_WORKER`] per worker.
pub const FDS_RESERVED: u64 = 32;
/// File descriptors kept per worker thread (its Redis connection and its poller).
pub const FDS_RESERVED_PER_WORKER: u64 = 4;

/// Largest TTL accepted: 30 days.
pub const MAX_CACHE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Largest capacity accepted (slab nodes are addressed by `u32`).
pub const MAX_CACHE_CAPACITY: usize = 1 << 30;
/// Largest client limit accepted.
pub const MAX_CLIENTS: usize = 1_000_000;
/// Largest worker count accepted.
pub const MAX_WORKERS: usize = 1024;
/// Largest timeout accepted for any `*_MS` duration: one hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Largest HTTP key, after percent-decoding.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Largest HTTP request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 128 * 1024;

/// Largest stale window accepted (`CACHE_STALE_*_MS`): 30 days, as the TTL.
pub const MAX_CACHE_STALE_MS: u64 = MAX_CACHE_TTL_MS;

/// Environment variables the binary reads; used to treat empty values as unset.
pub const ENV_NAMES: &[&str] = &[
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "PROXY_HOST",
    "PROXY_PORT",
    "RESP_PORT",
    "CACHE_TTL_MS",
    "CACHE_CAPACITY",
    "PROXY_MAX_CLIENTS",
    "PROXY_WORKERS",
    "PROXY_PIN_WORKERS",
    "REDIS_TIMEOUT_MS",
    "PROXY_IDLE_TIMEOUT_MS",
    "CACHE_INVALIDATION",
    "PROXY_ALLOW_WRITES",
    "PROXY_SHUTDOWN_GRACE_MS",
    "RESP_MAX_REQUEST_BYTES",
    "PROXY_MAX_BUFFER_BYTES",
    "CACHE_STALE_WHILE_REVALIDATE_MS",
    "CACHE_STALE_IF_ERROR_MS",
    "CACHE_MAX_BYTES",
    "CACHE_MAX_VALUE_BYTES",
    "REDIS_CLUSTER",
    "REDIS_TLS_CA_FILE",
    "REDIS_TLS_CERT_FILE",
    "REDIS_TLS_KEY_FILE",
    "REDIS_TLS_SERVER_NAME",
    "REDIS_TLS_INSECURE",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_SENTINEL_PASSWORD",
];

/// How the cache learns that Redis changed a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Invalidation {
    /// Entries live until their TTL; Redis writes are not seen before that.
    Off,
    /// Redis CLIENT TRACKING removes changed keys from the cache.
    Tracking,
    /// CLIENT TRACKING over RESP3: invalidations come as pushes on the
    /// data connections (no REDIRECT, no invalidation connection).
    #[value(name = "tracking-resp3")]
    TrackingResp3,
}

/// Whether the backing Redis is a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterMode {
    /// Cluster mode when the first seed that answers reports `cluster_enabled:1`.
    Auto,
    /// Always a cluster: learn the slot map from the seeds.
    On,
    /// One Redis (the first seed).
    Off,
}

/// All settings of one proxy process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "redis-proxy",
    version,
    about = "Caching HTTP (and RESP) proxy in front of one Redis",
    after_help = "Every flag also reads the environment variable shown; flags win. \
                  An empty environment variable counts as unset. When REDIS_URL is unset, \
                  REDIS_HOST, REDIS_PORT and REDIS_DB are used if set."
)]
pub struct Config {
    /// Backing Redis, redis://[user:pass@]host:port/db, rediss:// for TLS; for a cluster, several seed URLs separated by commas [default: redis://127.0.0.1:6379/0]
    #[arg(long, env = "REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Address both listeners bind.
    #[arg(long = "host", env = "PROXY_HOST", default_value = DEFAULT_HOST)]
    pub host: String,

    /// HTTP port.
    #[arg(long = "port", env = "PROXY_PORT", default_value_t = DEFAULT_PORT,
          value_parser = ranged::<u16>("PROXY_PORT", 1, 65535))]
    pub port: u16,

    /// Redis-protocol port; unset = RESP front end off.
    #[arg(long, env = "RESP_PORT", value_parser = ranged::<u16>("RESP_PORT", 1, 65535))]
    pub resp_port: Option<u16>,

    /// Global expiry in milliseconds, counted from insertion.
    #[arg(long, env = "CACHE_TTL_MS", default_value_t = DEFAULT_CACHE_TTL_MS,
          value_parser = ranged::<u64>("CACHE_TTL_MS", 1, MAX_CACHE_TTL_MS))]
    pub cache_ttl_ms: u64,

    /// Maximum number of cached keys; 0 = no caching.
    #[arg(long, env = "CACHE_CAPACITY", default_value_t = DEFAULT_CACHE_CAPACITY,
          value_parser = ranged::<usize>("CACHE_CAPACITY", 0, MAX_CACHE_CAPACITY))]
    pub cache_capacity: usize,

    /// Maximum connected clients, HTTP and RESP together.
    #[arg(long, env = "PROXY_MAX_CLIENTS", default_value_t = DEFAULT_MAX_CLIENTS,
          value_parser = ranged::<usize>("PROXY_MAX_CLIENTS", 1, MAX_CLIENTS))]
    pub max_clients: usize,

    /// Worker threads (requests processed in parallel) [default: number of CPUs]
    #[arg(long, env = "PROXY_WORKERS",
          value_parser = ranged::<usize>("PROXY_WORKERS", 1, MAX_WORKERS))]
    pub workers: Option<usize>,

    /// Pin each worker thread to one core. Off by default: on a host shared
    /// with other busy processes (a load generator, Redis itself) a pinned
    /// worker waits for its core while another sits idle.
    #[arg(long, env = "PROXY_PIN_WORKERS", action = clap::ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub pin_workers: bool,

    /// Bound on one Redis round trip (and on connecting), in milliseconds.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = DEFAULT_REDIS_TIMEOUT_MS,
          value_parser = ranged::<u64>("REDIS_TIMEOUT_MS", 1, MAX_TIMEOUT_MS))]
    pub redis_timeout_ms: u64,

    /// A client connection without a complete request (and not taking in a reply) for this long is closed, in milliseconds.
    #[arg(long, env = "PROXY_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_TIMEOUT_MS,
          value_parser = ranged::<u64>("PROXY_IDLE_TIMEOUT_MS", 1, MAX_TIMEOUT_MS))]
    pub idle_timeout_ms: u64,

    /// Cache invalidation: off, tracking (Redis CLIENT TRACKING), or
    /// tracking-resp3 (the same over RESP3 pushes).
    #[arg(
        long,
        env = "CACHE_INVALIDATION",
        value_enum,
        default_value = "off",
        ignore_case = true
    )]
    pub cache_invalidation: Invalidation,

    /// Allow PUT/DELETE over HTTP and SET/DEL over RESP.
    #[arg(long, env = "PROXY_ALLOW_WRITES", action = clap::ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub allow_writes: bool,

    /// Grace period for in-flight requests on SIGINT/SIGTERM, in milliseconds.
    #[arg(long, env = "PROXY_SHUTDOWN_GRACE_MS", default_value_t = DEFAULT_SHUTDOWN_GRACE_MS,
          value_parser = ranged::<u64>("PROXY_SHUTDOWN_GRACE_MS", 0, MAX_TIMEOUT_MS))]
    pub shutdown_grace_ms: u64,

    /// Largest RESP request accepted, in bytes.
    #[arg(long, env = "RESP_MAX_REQUEST_BYTES", default_value_t = DEFAULT_RESP_MAX_REQUEST_BYTES,
          value_parser = ranged::<usize>("RESP_MAX_REQUEST_BYTES", 1024, 1 << 30))]
    pub resp_max_request_bytes: usize,

    /// Bytes held for all clients together (unfinished requests and unsent
    /// replies); over it, the client holding the most is disconnected.
    #[arg(long, env = "PROXY_MAX_BUFFER_BYTES", default_value_t = DEFAULT_MAX_BUFFER_BYTES,
          value_parser = ranged::<u64>("PROXY_MAX_BUFFER_BYTES", MIN_BUFFER_BYTES, MAX_BUFFER_BYTES))]
    pub max_buffer_bytes: u64,

    /// Past the TTL, a hit answers the old value for this long (ms) while
    /// one background GET refreshes it; 0 = off.
    #[arg(long, env = "CACHE_STALE_WHILE_REVALIDATE_MS", default_value_t = 0,
          value_parser = ranged::<u64>("CACHE_STALE_WHILE_REVALIDATE_MS", 0, MAX_CACHE_STALE_MS))]
    pub cache_stale_while_revalidate_ms: u64,

    /// Past the TTL, the old value answers for this long (ms) when Redis
    /// fails (unavailable or timeout); 0 = off.
    #[arg(long, env = "CACHE_STALE_IF_ERROR_MS", default_value_t = 0,
          value_parser = ranged::<u64>("CACHE_STALE_IF_ERROR_MS", 0, MAX_CACHE_STALE_MS))]
    pub cache_stale_if_error_ms: u64,

    /// Bound on cached key + value bytes; 0 = no byte bound.
    #[arg(long, env = "CACHE_MAX_BYTES", default_value_t = 0,
          value_parser = ranged::<usize>("CACHE_MAX_BYTES", 0, usize::MAX))]
    pub cache_max_bytes: usize,

    /// Values longer than this (bytes) are served but never cached; 0 = any.
    #[arg(long, env = "CACHE_MAX_VALUE_BYTES", default_value_t = 0,
          value_parser = ranged::<usize>("CACHE_MAX_VALUE_BYTES", 0, usize::MAX))]
    pub cache_max_value_bytes: usize,

    /// Redis Cluster: auto (detect with INFO cluster), on, or off.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        value_enum,
        default_value = "auto",
        ignore_case = true
    )]
    pub redis_cluster: ClusterMode,
    /// PEM bundle that verifies the server (rediss://) [default: the system roots]
    #[arg(long, env = "REDIS_TLS_CA_FILE", value_name = "FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,

    /// Client certificate chain (PEM) for mutual TLS; needs --redis-tls-key-file.
    #[arg(long, env = "REDIS_TLS_CERT_FILE", value_name = "FILE")]
    pub redis_tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "REDIS_TLS_KEY_FILE", value_name = "FILE")]
    pub redis_tls_key_file: Option<PathBuf>,

    /// Name checked against the server certificate and sent as SNI [default: the host connected to]
    #[arg(long, env = "REDIS_TLS_SERVER_NAME", value_name = "NAME")]
    pub redis_tls_server_name: Option<String>,

    /// Skip verification of the server certificate (logged as a warning at start).
    #[arg(long, env = "REDIS_TLS_INSECURE", action = clap::ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub redis_tls_insecure: bool,

    /// Sentinels to find the master through, host:port,host:port; unset = no Sentinel.
    #[arg(long, env = "REDIS_SENTINELS", value_name = "HOST:PORT,...")]
    pub redis_sentinels: Option<String>,

    /// The master's name in Sentinel (needed with --redis-sentinels).
    #[arg(long, env = "REDIS_SENTINEL_MASTER", value_name = "NAME")]
    pub redis_sentinel_master: Option<String>,

    /// Password for the Sentinels themselves (the master's comes from REDIS_URL).
    #[arg(
        long,
        env = "REDIS_SENTINEL_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_sentinel_password: Option<String>,
}

/// Where the Sentinels are and which master to ask them for.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The Sentinels, in the order given; asked in turn.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name in Sentinel.
    pub master: String,
    /// `AUTH` for the Sentinels.
    pub password: Option<String>,
}

impl fmt::Debug for SentinelTarget {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis_url: None,
            host: DEFAULT_HOST.to_string(),
            port: DEFAULT_PORT,
            resp_port: None,
            cache_ttl_ms: DEFAULT_CACHE_TTL_MS,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_clients: DEFAULT_MAX_CLIENTS,
            workers: None,
            pin_workers: false,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            cache_invalidation: Invalidation::Off,
            allow_writes: false,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            resp_max_request_bytes: DEFAULT_RESP_MAX_REQUEST_BYTES,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            cache_stale_while_revalidate_ms: 0,
            cache_stale_if_error_ms: 0,
            cache_max_bytes: 0,
            cache_max_value_bytes: 0,
            redis_cluster: ClusterMode::Auto,
            redis_tls_ca_file: None,
            redis_tls_cert_file: None,
            redis_tls_key_file: None,
            redis_tls_server_name: None,
            redis_tls_insecure: false,
            redis_sentinels: None,
            redis_sentinel_master: None,
            redis_sentinel_password: None,
        }
    }
}

/// A setting that cannot be used; `Display` is the one line the binary prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where the backing Redis is and how to log in, parsed from the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS (`rediss://`): the loaded client configuration.
    pub tls: Option<Tls>,
}

impl fmt::Debug for RedisTarget {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            if self.tls.is_some() {
                "rediss://"
            } else {
                "redis://"
            }
        )?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, None) => {}
        }
        write!(f, "{}:{}/{}", self.host, self.port, self.db)
    }
}

impl Config {
    /// Parses flags and environment; on a bad value returns the one-line
    /// error, or the help/version text as `Err` with `exit code 0` semantics
    /// left to the caller (see `main`).
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Config::try_parse_from(args)
    }

    /// The effective number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(num_cpus::get).max(1)
    }

    /// TTL as a duration.
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms)
    }

    /// Redis round-trip bound as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// Idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The client limit that fits `fd_limit` open files (after the reserve
    /// for Redis connections, listeners and the like), and the warning to
    /// log when that is below `PROXY_MAX_CLIENTS`.
    pub fn clients_fitting(&self, fd_limit: Option<u64>) -> (usize, Option<String>) {
        let Some(limit) = fd_limit else {
            return (self.max_clients, None);
        };
        let reserve = FDS_RESERVED + FDS_RESERVED_PER_WORKER * self.workers() as u64;
        let fits = limit.saturating_sub(reserve).max(1);
        if (self.max_clients as u64) <= fits {
            return (self.max_clients, None);
        }
        let warning = format!(
            "PROXY_MAX_CLIENTS lowered from {} to {fits}: the open-file limit is {limit} \
             and {reserve} descriptors are kept for Redis connections and listeners \
             (raise it with ulimit -n)",
            self.max_clients
        );
        (fits as usize, Some(warning))
    }

    /// Checks what flag parsing cannot: the Redis URL and port clashes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_settings_given() {
            // A file named is a file meant, also with redis://.
            self.tls()?;
        }
        self.redis_target()?;
        self.sentinel()?;
        if self.resp_port == Some(self.port) {
            return Err(ConfigError(format!(
                "RESP_PORT (--resp-port) must differ from PROXY_PORT (--port), both are {}",
                self.port
            )));
        }
        if self.host.trim().is_empty() {
            return Err(ConfigError(
                "PROXY_HOST (--host) must be an address to bind, e.g. 127.0.0.1".into(),
            ));
        }
        if self.cache_invalidation == Invalidation::TrackingResp3
            && self.redis_cluster == ClusterMode::On
        {
            return Err(ConfigError(
                "CACHE_INVALIDATION=tracking-resp3 does not work with a Redis Cluster yet; \
                 use CACHE_INVALIDATION=tracking"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The backing Redis: `REDIS_URL`, else `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB`,
    /// else the default.
    /// With several seed URLs (a cluster), the first.
    pub fn redis_target(&self) -> Result<RedisTarget, ConfigError> {
        Ok(self.redis_seeds()?.swap_remove(0))
    }

    /// Every seed of `REDIS_URL` (comma-separated URLs; one for a single
    /// Redis), in order; never empty.
    pub fn redis_seeds(&self) -> Result<Vec<RedisTarget>, ConfigError> {
        match &self.redis_url {
            Some(urls) => urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(|url| self.parse_url(url))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|seeds| {
                    if seeds.is_empty() {
                        parse_redis_url("").map(|t| vec![t])
                    } else {
                        Ok(seeds)
                    }
                }),
            None => legacy_target(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
                .map(|t| vec![t]),
        }
    }

    /// One `redis://` or `rediss://` URL; `rediss://` loads the TLS settings.
    fn parse_url(&self, url: &str) -> Result<RedisTarget, ConfigError> {
        match url.strip_prefix("rediss://") {
            Some(rest) => {
                let mut target = parse_redis_url(&format!("redis://{rest}"))?;
                target.tls = Some(self.tls()?);
                Ok(target)
            }
            None => parse_redis_url(url),
        }
    }

    /// Whether any `REDIS_TLS_*` setting is given.
    pub fn tls_settings_given(&self) -> bool {
        self.redis_tls_ca_file.is_some()
            || self.redis_tls_cert_file.is_some()
            || self.redis_tls_key_file.is_some()
            || self.redis_tls_server_name.is_some()
            || self.redis_tls_insecure
    }

    /// The TLS client configuration from the `REDIS_TLS_*` settings, every
    /// file read and checked.
    pub fn tls(&self) -> Result<Tls, ConfigError> {
        Tls::load(&TlsOptions {
            ca_file: self.redis_tls_ca_file.as_deref(),
            cert_file: self.redis_tls_cert_file.as_deref(),
            key_file: self.redis_tls_key_file.as_deref(),
            server_name: self.redis_tls_server_name.as_deref(),
            insecure: self.redis_tls_insecure,
        })
    }

    /// The Sentinels to find the master through, when `REDIS_SENTINELS` is set.
    pub fn sentinel(&self) -> Result<Option<SentinelTarget>, ConfigError> {
        let Some(list) = &self.redis_sentinels else {
            if self.redis_sentinel_master.is_some() {
                return Err(ConfigError(
                    "REDIS_SENTINEL_MASTER (--redis-sentinel-master) needs REDIS_SENTINELS \
                     (--redis-sentinels), host:port,host:port"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let bad = |why: String| {
            ConfigError(format!(
                "REDIS_SENTINELS (--redis-sentinels) must be host:port,host:port: {why}"
            ))
        };
        let mut sentinels = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (host, port) = part
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("{part:?} has no port")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = match port.parse::<u16>() {
                Ok(p) if p > 0 && !host.is_empty() => p,
                _ => return Err(bad(format!("{part:?} is not host:port"))),
            };
            sentinels.push((host.to_string(), port));
        }
        if sentinels.is_empty() {
            return Err(bad("no Sentinel given".into()));
        }
        let master = self
            .redis_sentinel_master
            .clone()
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(
                    "REDIS_SENTINEL_MASTER (--redis-sentinel-master) must name the master \
                     (as in `sentinel monitor NAME ...`) when REDIS_SENTINELS is set"
                        .into(),
                )
            })?;
        Ok(Some(SentinelTarget {
            sentinels,
            master,
            password: self.redis_sentinel_password.clone(),
        }))
    }
}

/// Builds the target from the older `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB` names.
fn legacy_target(var: impl Fn(&str) -> Option<String>) -> Result<RedisTarget, ConfigError> {
    let mut target = parse_redis_url(DEFAULT_REDIS_URL)?;
    if let Some(host) = var("REDIS_HOST") {
        target.host = host;
    }
    if let Some(port) = var("REDIS_PORT") {
        target.port = ranged::<u16>("REDIS_PORT", 1, 65535)(&port).map_err(ConfigError)?;
    }
    if let Some(db) = var("REDIS_DB") {
        target.db = ranged::<i64>("REDIS_DB", 0, 1 << 20)(&db).map_err(ConfigError)?;
    }
    Ok(target)
}

fn parse_redis_url(url: &str) -> Result<RedisTarget, ConfigError> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let bad = |why: &str| {
        ConfigError(format!(
            "REDIS_URL (--redis-url) must look like redis[s]://[user:pass@]host:port/db: {why}"
        ))
    };
    if !url.starts_with("redis://") {
        return Err(bad("the scheme must be redis:// or rediss://"));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| bad(&e.to_string()))?;
    let (host, port) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        _ => return Err(bad("only plain TCP is supported")),
    };
    let settings = info.redis_settings();
    if settings.db() < 0 {
        return Err(bad("the database number must be >= 0"));
    }
    Ok(RedisTarget {
        host,
        port,
        db: settings.db(),
        username: settings.username().map(str::to_string),
        password: settings.password().map(str::to_string),
        tls: None,
    })
}

/// A clap value parser for an integer in `min..=max` whose error names the
/// environment variable and the range.
fn ranged<T>(
    name: &'static str,
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + Copy + fmt::Display + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!("{name} must be an integer in {min}..={max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::from_args(std::iter::once("redis-proxy").chain(args.iter().copied()))
    }

    /// Defaults match the contract table.
    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.port, 8080);
        assert_eq!(c.cache_ttl_ms, 60_000);
        assert_eq!(c.cache_capacity, 10_000);
        assert_eq!(c.max_clients, 1024);
        assert_eq!(c.redis_timeout_ms, 1000);
        assert!(!c.allow_writes);
        assert!(!c.pin_workers);
        assert_eq!(c.cache_invalidation, Invalidation::Off);
        let t = parse_redis_url(DEFAULT_REDIS_URL).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6379, 0));
    }

    /// `tracking-resp3` parses (any case), and is refused with a cluster.
    #[test]
    fn tracking_resp3_parses_and_refuses_a_cluster() {
        let c = parse(&["--cache-invalidation", "Tracking-RESP3"]).unwrap();
        assert_eq!(c.cache_invalidation, Invalidation::TrackingResp3);
        assert!(c.validate().is_ok());
        let c = parse(&[
            "--cache-invalidation",
            "tracking-resp3",
            "--redis-cluster",
            "on",
        ])
        .unwrap();
        let err = c.validate().unwrap_err().0;
        assert!(
            err.contains("tracking-resp3") && err.contains("Cluster"),
            "{err}"
        );
    }

    /// Flags parse into typed fields.
    #[test]
    fn flags_parse() {
        let c = parse(&[
            "--port",
            "9000",
            "--cache-ttl-ms",
            "5",
            "--cache-capacity",
            "0",
            "--allow-writes",
            "--pin-workers",
            "--cache-invalidation",
            "tracking",
        ])
        .unwrap();
        assert!(c.pin_workers);
        assert_eq!(c.port, 9000);
        assert_eq!(c.cache_ttl_ms, 5);
        assert_eq!(c.cache_capacity, 0);
        assert!(c.allow_writes);
        assert_eq!(c.cache_invalidation, Invalidation::Tracking);
    }

    /// A value out of range fails with a message naming the setting and range.
    #[test]
    fn out_of_range_names_setting() {
        let err = parse(&["--cache-ttl-ms", "0"]).unwrap_err().to_string();
        assert!(
            err.contains("CACHE_TTL_MS must be an integer in 1..="),
            "{err}"
        );
        let err = parse(&["--max-clients", "x"]).unwrap_err().to_string();
        assert!(err.contains("PROXY_MAX_CLIENTS"), "{err}");
    }

    /// URLs carry host, port, db and credentials; the password is redacted in Display.
    #[test]
    fn redis_url_parts() {
        let t = parse_redis_url("redis://user:secret@example:6390/3").unwrap();
        assert_eq!(t.host, "example");
        assert_eq!(t.port, 6390);
        assert_eq!(t.db, 3);
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("secret"));
        assert!(!t.to_string().contains("secret"));
        assert!(!format!("{t:?}").contains("secret"));
        assert!(parse_redis_url("http://x").is_err());
        assert!(parse_redis_url("redis://h:1/x").is_err());
    }

    /// The older REDIS_HOST/PORT/DB names build the target when REDIS_URL is unset.
    #[test]
    fn legacy_names() {
        let t = legacy_target(|n| match n {
            "REDIS_HOST" => Some("db.local".into()),
            "REDIS_PORT" => Some("7000".into()),
            "REDIS_DB" => Some("2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("db.local", 7000, 2));
        let err = legacy_target(|n| (n == "REDIS_PORT").then(|| "99999".into())).unwrap_err();
        assert!(err.0.contains("REDIS_PORT"));
    }

    /// The client limit is lowered to what the open-file limit leaves, with a warning.
    #[test]
    fn clients_fit_the_fd_limit() {
        let c = parse(&["--max-clients", "1000", "--workers", "2"]).unwrap();
        assert_eq!(c.clients_fitting(Some(65536)), (1000, None));
        assert_eq!(c.clients_fitting(None), (1000, None));
        let (n, warning) = c.clients_fitting(Some(256));
        assert_eq!(n, 256 - 32 - 8);
        assert!(warning
            .unwrap()
            .contains("PROXY_MAX_CLIENTS lowered from 1000 to 216"));
        assert_eq!(c.clients_fitting(Some(10)).0, 1);
    }

    /// The client-buffer bound defaults to 1 GiB and is range-checked.
    #[test]
    fn max_buffer_bytes() {
        assert_eq!(parse(&[]).unwrap().max_buffer_bytes, 1 << 30);
        let c = parse(&["--max-buffer-bytes", "629145600"]).unwrap();
        assert_eq!(c.max_buffer_bytes, 600 << 20);
        let err = parse(&["--max-buffer-bytes", "10"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PROXY_MAX_BUFFER_BYTES must be an integer in"),
            "{err}"
        );
    }

    /// REDIS_URL takes several comma-separated seeds; REDIS_CLUSTER parses.
    #[test]
    fn cluster_seeds() {
        let c = parse(&[
            "--redis-url",
            "redis://a:7000, redis://:pw@b:7001/0",
            "--redis-cluster",
            "ON",
        ])
        .unwrap();
        assert_eq!(c.redis_cluster, ClusterMode::On);
        let seeds = c.redis_seeds().unwrap();
        assert_eq!(seeds.len(), 2);
        assert_eq!((seeds[1].host.as_str(), seeds[1].port), ("b", 7001));
        assert_eq!(seeds[1].password.as_deref(), Some("pw"));
        assert_eq!(c.redis_target().unwrap().host, "a");
        assert_eq!(parse(&[]).unwrap().redis_cluster, ClusterMode::Auto);
        let bad = parse(&["--redis-url", "redis://a:1,http://b"]).unwrap();
        assert!(bad.validate().is_err());
        assert!(parse(&["--redis-url", ","]).unwrap().validate().is_err());
    }

    /// `rediss://` loads TLS (shown in the target); Sentinel settings parse
    /// into a list and need the master's name.
    #[test]
    fn tls_and_sentinel_settings() {
        let c = parse(&["--redis-url", "rediss://:pw@db.example:6380/2"]).unwrap();
        let t = c.redis_target().unwrap();
        assert!(t.tls.is_some());
        assert_eq!(t.to_string(), "rediss://:***@db.example:6380/2");
        assert!(parse(&[]).unwrap().redis_target().unwrap().tls.is_none());

        let c = parse(&["--redis-sentinels", "10.0.0.1:26379, s2:26380"]).unwrap();
        assert!(c
            .sentinel()
            .unwrap_err()
            .0
            .starts_with("REDIS_SENTINEL_MASTER"));
        let c = parse(&[
            "--redis-sentinels",
            "10.0.0.1:26379, s2:26380",
            "--redis-sentinel-master",
            "mymaster",
        ])
        .unwrap();
        let s = c.sentinel().unwrap().unwrap();
        assert_eq!(
            s.sentinels,
            vec![("10.0.0.1".to_string(), 26379), ("s2".to_string(), 26380)]
        );
        assert_eq!(s.master, "mymaster");
        let c = parse(&[
            "--redis-sentinels",
            "nohost",
            "--redis-sentinel-master",
            "m",
        ])
        .unwrap();
        assert!(c.validate().unwrap_err().0.starts_with("REDIS_SENTINELS"));
        assert_eq!(parse(&[]).unwrap().sentinel(), Ok(None));
    }

    /// The RESP and HTTP ports must differ.
    #[test]
    fn port_clash_rejected() {
        let c = parse(&["--port", "7000", "--resp-port", "7000"]).unwrap();
        assert!(c.validate().unwrap_err().0.contains("RESP_PORT"));
    }
}
