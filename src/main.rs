//! The `redis-proxy` binary: parse settings, start logging, start the
//! server, wait for SIGINT/SIGTERM, shut down gracefully.

use std::process::ExitCode;

use redis_proxy::config::{Config, ENV_NAMES};

fn main() -> ExitCode {
    for name in ENV_NAMES {
        // The contract: an environment variable set to "" counts as unset.
        if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(name);
        }
    }
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return bad_setting(&e.to_string()),
    };
    if let Err(e) = config.validate() {
        return bad_setting(&e.to_string());
    }
    // may_minihttp logs every client disconnect as an error; keep it quiet
    // unless the filter names it explicitly. Same for may's own chatter.
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if !filter.contains("may_minihttp") {
        filter.push_str(",may_minihttp=off");
    }
    // may logs every epoll deregistration at info.
    if !filter.split(',').any(|d| d.starts_with("may=")) {
        filter.push_str(",may=warn");
    }
    env_logger::Builder::new().parse_filters(&filter).init();

    let server = match redis_proxy::start(&config) {
        Ok(server) => server,
        Err(e) => {
            log::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "redis-proxy {} listening http://{} resp={} redis={} workers={} pinned={} ttl_ms={} capacity={} \
         max_clients={} max_buffer_bytes={} redis_timeout_ms={} idle_timeout_ms={} invalidation={:?} \
         writes={} stale_while_revalidate_ms={} stale_if_error_ms={} max_bytes={} max_value_bytes={}",
        env!("CARGO_PKG_VERSION"),
        server.http_addr(),
        server
            .resp_addr()
            .map_or("off".to_string(), |a| a.to_string()),
        config
            .redis_target()
            .map(|t| t.to_string())
            .unwrap_or_default(),
        config.workers(),
        config.pin_workers,
        config.cache_ttl_ms,
        config.cache_capacity,
        config.max_clients,
        config.max_buffer_bytes,
        config.redis_timeout_ms,
        config.idle_timeout_ms,
        config.cache_invalidation,
        config.allow_writes,
        config.cache_stale_while_revalidate_ms,
        config.cache_stale_if_error_ms,
        config.cache_max_bytes,
        config.cache_max_value_bytes,
    );

    let (tx, rx) = std::sync::mpsc::channel();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.send(());
    }) {
        log::warn!("cannot install the SIGINT/SIGTERM handler: {e}");
    }
    let _ = rx.recv();
    log::info!("shutting down (grace {} ms)", config.shutdown_grace_ms);
    server.shutdown(config.shutdown_grace());
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// The contract: a bad setting is one line on stderr and exit status 2.
fn bad_setting(message: &str) -> ExitCode {
    let line = message.lines().next().unwrap_or(message);
    let line = line.strip_prefix("error: ").unwrap_or(line);
    eprintln!("redis-proxy: {line}");
    ExitCode::from(2)
}
