//! server: wiring. Builds the cache, backend, core and client limits from a
//! [`Config`], starts the listeners, and hands back a [`Server`] handle with
//! the bound addresses and a graceful shutdown. Owns no protocol logic.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use may::coroutine::JoinHandle;

use crate::backend::sentinel::Master;
use crate::backend::{Backend, BackendOptions, Listeners};
use crate::cache::{Cache, Limits, SystemClock};
use crate::clients::Clients;
use crate::coherence::{Coherence, Freshness};
use crate::config::{Config, Invalidation};
use crate::http::{self, HttpShared};
use crate::listener;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Stale};
use crate::resp::{self, RespShared};
use crate::tracking::Tracking;

/// Coroutine stack size in bytes. may's default (32 KiB) is tight for JSON
/// encoding plus the redis parser; 64 KiB stays cheap for 10,000 connections
/// because untouched stack pages are never resident.
const STACK_BYTES: usize = 64 * 1024;

/// A running proxy.
pub struct Server {
    http_addr: SocketAddr,
    resp_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    clients: Arc<Clients>,
    tracking: Option<Arc<Tracking>>,
    listeners: Vec<JoinHandle<()>>,
}

/// Starts a proxy with `config`. Must be called once per process: may's
/// worker count is fixed by the first call.
pub fn start(config: &Config) -> io::Result<Server> {
    let workers = config.workers();
    may::config()
        .set_workers(workers)
        .set_stack_size(STACK_BYTES / std::mem::size_of::<usize>());
    // may pins workers to cores unless told otherwise.
    may::config().set_worker_pin(config.pin_workers);
    let target = config
        .redis_target()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;

    let target_db = target.db;
    let metrics = Arc::new(Metrics::default());
    let stale = Stale {
        revalidate: Duration::from_millis(config.cache_stale_while_revalidate_ms),
        if_error: Duration::from_millis(config.cache_stale_if_error_ms),
    };
    let cache = Arc::new(
        Cache::new(
            config.cache_capacity,
            config.cache_ttl(),
            Arc::new(SystemClock::default()),
        )
        .with_limits(Limits {
            max_bytes: config.cache_max_bytes,
            max_value_bytes: config.cache_max_value_bytes,
            grace: stale.grace(),
        }),
    );
    // Sweep often enough that expired entries do not linger for long, but
    // never busy-loop for tiny TTLs.
    let sweep_every =
        (config.cache_ttl() / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    cache.spawn_sweeper(sweep_every);
    // Freshness sits beside the core, not below it: the data links and the
    // invalidation listener report into it, the core reads it.
    let tracked = config.cache_invalidation != Invalidation::Off;
    let pushes = config.cache_invalidation == Invalidation::TrackingResp3;
    let coherence = Coherence::new(cache, metrics.clone(), tracked);
    let coherence = Arc::new(if pushes {
        coherence.with_pushes()
    } else {
        coherence
    });
    let freshness = tracked.then(|| coherence.clone() as Arc<dyn Freshness>);
    // With RESP3 pushes there is no invalidation connection.
    let mut tracking = freshness.clone().filter(|_| !pushes).map(|freshness| {
        Tracking::new(
            target.clone(),
            config.redis_timeout(),
            freshness,
            metrics.clone(),
        )
    });
    if target.tls.is_none() && config.tls_settings_given() {
        log::warn!("REDIS_TLS_* settings are not used: REDIS_URL is not rediss://");
    }
    if target.tls.as_ref().is_some_and(|tls| tls.insecure()) {
        log::warn!(
            "REDIS_TLS_INSECURE: the Redis server's certificate is not verified; \
             anyone on the path can pose as Redis"
        );
    }
    let master = config
        .sentinel()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .map(Master::new);
    if let (Some(tracking), Some(master)) = (&tracking, &master) {
        tracking.follow(master.clone());
    }
    // In a cluster, one listener per master, started by the backend.
    let listeners: Listeners = {
        let (timeout, metrics) = (config.redis_timeout(), metrics.clone());
        Arc::new(move |target, freshness| {
            let listener = Tracking::new(target, timeout, freshness, metrics.clone());
            listener.spawn();
            Box::new(move || listener.stop())
        })
    };
    let seeds = config
        .redis_seeds()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let backend = Backend::start_with(
        BackendOptions {
            target,
            connections: workers,
            timeout: config.redis_timeout(),
            freshness,
            master,
        },
        seeds,
        config.redis_cluster,
        (!pushes).then_some(listeners),
    );
    if backend.is_cluster() {
        if pushes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "CACHE_INVALIDATION=tracking-resp3 does not work with a Redis Cluster yet; \
                 use CACHE_INVALIDATION=tracking",
            ));
        }
        tracking = None;
    }
    let proxy = Arc::new(Proxy::new(backend, metrics.clone(), coherence).with_stale(stale));
    if let Some(tracking) = &tracking {
        tracking.spawn();
    }
    let (max_clients, warning) = config.clients_fitting(listener::raise_fd_limit());
    if let Some(warning) = warning {
        log::warn!("{warning}");
    }
    // Front ends get the counters at construction (request counts, reply
    // bytes, client figures); the core keeps cache and backend to itself.
    let clients = Clients::new(
        max_clients,
        config.idle_timeout(),
        config.max_buffer_bytes,
        metrics.clone(),
    );
    clients.spawn_reaper();

    let http_addr = resolve(&config.host, config.port)?;
    let http = http::start(
        Arc::new(HttpShared {
            proxy: proxy.clone(),
            metrics: metrics.clone(),
            clients: clients.clone(),
            allow_writes: config.allow_writes,
            max_body: config.resp_max_request_bytes,
        }),
        http_addr,
    )?;
    let mut listeners = vec![http];
    let mut resp_addr = None;
    if let Some(port) = config.resp_port {
        let addr = resolve(&config.host, port)?;
        let shared = Arc::new(RespShared {
            proxy: proxy.clone(),
            metrics: metrics.clone(),
            clients: clients.clone(),
            max_request: config.resp_max_request_bytes,
            db: target_db,
            idle_timeout: config.idle_timeout(),
            allow_writes: config.allow_writes,
        });
        listeners.push(resp::start(shared, addr)?);
        resp_addr = Some(addr);
    }
    Ok(Server {
        http_addr,
        resp_addr,
        proxy,
        clients,
        tracking,
        listeners,
    })
}

fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("PROXY_HOST {host} resolves to no address"),
        )
    })
}

impl Server {
    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The RESP listener's address, when enabled.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// The read-through core (for embedding and tests).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Stops accepting, waits up to `grace` for requests in flight, then
    /// closes every connection.
    pub fn shutdown(self, grace: Duration) {
        for listener in &self.listeners {
            // SAFETY: cancelling the accept coroutine only unwinds its loop;
            // connections already accepted run on their own coroutines.
            unsafe { listener.coroutine().cancel() };
        }
        self.clients.start_draining();
        // Wait for requests in progress and for replies still on their way
        // ; three quiet checks in a row, since a woken connection writes
        // its next chunk a moment after the queue drains. Requests arriving
        // now are refused with a short 503 (see `http`).
        let deadline = Instant::now() + grace;
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < deadline {
            let unfinished = self.clients.unfinished();
            log::debug!("shutdown: {unfinished} connections unfinished");
            if unfinished == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Requests that arrived since the last check finish too: closing
        // only the read side lets each connection write its reply first.
        self.clients.close_all();
        let deadline = Instant::now() + grace.max(Duration::from_millis(200));
        while self.clients.connected() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(tracking) = &self.tracking {
            tracking.stop();
        }
    }
}
