//! listener: the accept loop both front ends share, and the process's
//! open-file limit.
//!
//! Owns binding, accepting and what happens when an accept fails; hands
//! each accepted socket to the front end's callback and knows nothing of
//! what is spoken on it.
//!
//! An accept that fails for lack of file descriptors (EMFILE, ENFILE) or
//! memory leaves the pending connection in the kernel's queue, so retrying
//! at once fails again at once: a loop that only `continue`s spins a worker
//! at 100 % and starves the connections whose closing would free a
//! descriptor. So every failed accept sleeps, 10 ms doubling to 1 s, and
//! the first success resets the pause.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use may::coroutine::JoinHandle;
use may::net::{TcpListener, TcpStream};

/// First pause after a failed accept.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between two accept attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Binds `addr` and accepts on a coroutine named `name`, calling
/// `on_accept` with each new connection (it must not wait: spawn). Cancel
/// the returned coroutine to stop accepting.
pub fn start<F>(name: &str, addr: SocketAddr, on_accept: F) -> io::Result<JoinHandle<()>>
where
    F: Fn(TcpStream) + Send + 'static,
{
    let listener = TcpListener::bind(addr)?;
    let label = name.to_string();
    let builder = may::coroutine::Builder::new().name(name.into());
    may::go!(builder, move || {
        let mut backoff = MIN_BACKOFF;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    backoff = MIN_BACKOFF;
                    on_accept(stream);
                }
                Err(e) => {
                    // Once per pause length, so a long shortage logs a
                    // handful of lines, not thousands.
                    if backoff == MIN_BACKOFF || backoff == MAX_BACKOFF {
                        log::warn!("{label}: accept failed ({e}); retrying in {backoff:?}");
                    }
                    may::coroutine::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    })
}

/// Raises the soft open-file limit to the hard limit, as Redis does at
/// start; returns the limit in force afterwards (`None` if unknown).
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    Some(lim.rlim_cur as u64)
}
