//! resp::ahead: the relay-ahead stage, pipelined pass-through in one trip.
//!
//! When the commands of a pipeline not yet answered start with two or more
//! pass-through commands in a row (readonly ones Redis serves, writes too
//! with `PROXY_ALLOW_WRITES`), [`relay_ahead`] packs them back to back and
//! sends them to Redis as one relay job ([`Proxy::pass_run`]): one round
//! trip for the run instead of one per command. Their replies are split at
//! the frame boundaries and kept in [`Relayed`], in order; each command,
//! when the connection loop reaches it, answers from there (in
//! `commands::execute`), so replies still go out in pipeline order,
//! between the answers of the commands around the run.
//!
//! The run stops at the first command that is not passed through: one the
//! proxy serves itself (GET, MGET, MULTI, HELLO, ...), a refused or unknown
//! one, one of the wrong arity. Those answer in their place as before, and
//! the stage looks again at the command after them. The keys the run's
//! writes name are dropped from the cache when its replies are in, before
//! any of them (or anything after them) is answered, as for one write; the
//! commands of a run reach Redis in order on one connection, so a read
//! after a write in the run sees it.
//!
//! In a Redis Cluster a run holds only reads whose first keys share one
//! hash slot (a keyless command, a write, or another slot ends it; a write
//! goes one at a time). A reply that comes back `-MOVED` or `-ASK` leaves
//! its command to the one-at-a-time path, which follows the redirection:
//! such a read is sent again, after the reads of its run that followed it,
//! which reads cannot tell apart.
//!
//! Knows nothing of the socket; never answers a command itself.

use std::collections::VecDeque;
use std::ops::Range;

use super::commands::{append_packed, passable, served_here};
use super::{RespShared, Session};
use crate::backend::{reply_frames, slot, BackendError, Pass, Redirect};
use crate::proxy::Written;

/// Most commands in one run: bounds the replies held at once.
const MAX_RUN: usize = 256;

/// What a command of a run got.
enum Answer {
    /// Its reply, a range of [`Relayed::replies`].
    Reply(Range<usize>),
    /// The run's round trip failed.
    Failed(BackendError),
    /// Redirected (cluster): to be sent again on its own.
    Resend,
}

/// What [`Relayed::take`] hands the command it answers.
pub(super) enum Ahead<'a> {
    /// Redis's reply, as sent.
    Reply(&'a [u8]),
    Failed(BackendError),
    Resend,
}

/// The answers of the last run, in order, each with the address of its
/// command's name in the read buffer: a command takes only an answer made
/// for it, so a run cut short cannot answer another command.
#[derive(Default)]
pub(super) struct Relayed {
    /// The run's replies, back to back, as Redis sent them.
    replies: Vec<u8>,
    answers: VecDeque<(usize, Answer)>,
}

impl Relayed {
    pub(super) fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Drops the answers and frees the replies: each run brings its own
    /// buffer, and a large reply kept here would outlive its command
    /// unseen by the buffer bound.
    pub(super) fn clear(&mut self) {
        self.answers.clear();
        self.replies = Vec::new();
    }

    /// The answer for the command named by `name` (the bytes of its name
    /// in the read buffer), if it is the next one.
    pub(super) fn take(&mut self, name: &[u8]) -> Option<Ahead<'_>> {
        match self.answers.front() {
            Some((at, _)) if *at == name.as_ptr() as usize => {}
            _ => return None,
        }
        let (_, answer) = self.answers.pop_front()?;
        Some(match answer {
            Answer::Reply(range) => Ahead::Reply(&self.replies[range]),
            Answer::Failed(e) => Ahead::Failed(e),
            Answer::Resend => Ahead::Resend,
        })
    }
}

/// The stage: relays the run of pass-through commands `run` starts with
/// (commands as ranges of `spans`, which are argument ranges of `buf`) as
/// one job, when it has two or more, and keeps their answers in
/// `session.relayed`. Call it only outside MULTI, with no answers left.
pub(super) fn relay_ahead(
    buf: &[u8],
    spans: &[Range<usize>],
    run: &[Range<usize>],
    shared: &RespShared,
    fd: usize,
    session: &mut Session,
) {
    let name = |c: &Range<usize>| &buf[spans[c.start].clone()];
    // Cheap refusals first: most pipelines are GETs, or one command.
    match run {
        [a, b, ..] if !served_here(name(a)) && !served_here(name(b)) => {}
        _ => return,
    }
    let cluster = shared.proxy.is_cluster();
    let mut packed = std::mem::take(&mut session.packed);
    packed.clear();
    let mut names: Vec<usize> = Vec::new();
    let mut route: Option<&[u8]> = None;
    let mut run_slot = None;
    let mut written: Vec<&[u8]> = Vec::new();
    let mut flush = false;
    let mut argv: Vec<&[u8]> = Vec::new();
    for command in run.iter().take(MAX_RUN) {
        argv.clear();
        argv.extend(spans[command.clone()].iter().map(|r| &buf[r.clone()]));
        let Some(relay) = passable(shared, &argv) else {
            break;
        };
        if cluster {
            let Some(key) = relay.route else { break };
            let key_slot = slot::slot(key);
            if relay.write.is_some() || run_slot.is_some_and(|s| s != key_slot) {
                break;
            }
            run_slot = Some(key_slot);
        }
        if names.is_empty() {
            route = relay.route;
        }
        if let Some(keys) = relay.write {
            flush |= relay.flush;
            written.extend(keys);
        }
        append_packed(&mut packed, &argv);
        names.push(argv[0].as_ptr() as usize);
    }
    if names.len() >= 2 {
        let cmd = Pass {
            commands: &packed,
            replies: names.len(),
            skip: 0,
            route,
            protocol: session.protocol,
        };
        let written = match flush {
            true => Written::All,
            false => Written::Keys(&written),
        };
        let result = shared.proxy.pass_run(&cmd, written, fd);
        keep(&mut session.relayed, &names, result, cluster);
    }
    session.packed = packed;
}

/// Files the run's replies (or its failure) under the names they answer.
fn keep(
    relayed: &mut Relayed,
    names: &[usize],
    result: Result<Vec<u8>, BackendError>,
    cluster: bool,
) {
    let frames = result.and_then(|replies| match reply_frames(&replies) {
        Some(frames) if frames.len() == names.len() => Ok((replies, frames)),
        _ => Err(BackendError::Unavailable(
            "malformed reply from redis".into(),
        )),
    });
    match frames {
        Ok((replies, frames)) => {
            for (&name, frame) in names.iter().zip(frames) {
                let redirected = cluster && Redirect::of_raw(&replies[frame.clone()]).is_some();
                let answer = match redirected {
                    true => Answer::Resend,
                    false => Answer::Reply(frame),
                };
                relayed.answers.push_back((name, answer));
            }
            relayed.replies = replies;
        }
        Err(e) => {
            relayed
                .answers
                .extend(names.iter().map(|&name| (name, Answer::Failed(e.clone()))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each command takes only its own answer, in order; a failed run
    /// fails each of its commands; a redirection in a cluster is resent.
    #[test]
    fn answers_go_to_their_own_commands_in_order() {
        let buf = b"abc".to_vec();
        let (a, b, c) = (&buf[0..1], &buf[1..2], &buf[2..3]);
        let names: Vec<usize> = [a, b, c].iter().map(|n| n.as_ptr() as usize).collect();
        let mut relayed = Relayed::default();
        let replies = b":1\r\n-MOVED 1 127.0.0.1:1\r\n$1\r\nx\r\n".to_vec();
        keep(&mut relayed, &names, Ok(replies), true);
        assert!(relayed.take(b).is_none(), "not the next one");
        assert!(matches!(relayed.take(a), Some(Ahead::Reply(b":1\r\n"))));
        assert!(matches!(relayed.take(b), Some(Ahead::Resend)));
        assert!(matches!(
            relayed.take(c),
            Some(Ahead::Reply(b"$1\r\nx\r\n"))
        ));
        assert!(relayed.is_empty());

        keep(&mut relayed, &names[..2], Ok(b":1\r\n".to_vec()), false);
        assert!(matches!(
            relayed.take(a),
            Some(Ahead::Failed(BackendError::Unavailable(_)))
        ));
        relayed.clear();
        let moved = b"-MOVED 1 127.0.0.1:1\r\n:2\r\n".to_vec();
        keep(&mut relayed, &names[..2], Ok(moved), false);
        assert!(
            matches!(relayed.take(a), Some(Ahead::Reply(r)) if r.starts_with(b"-MOVED")),
            "relayed as it came outside a cluster"
        );
        relayed.clear();
        keep(&mut relayed, &names[..2], Err(BackendError::Timeout), false);
        assert!(matches!(
            relayed.take(a),
            Some(Ahead::Failed(BackendError::Timeout))
        ));
        assert!(matches!(
            relayed.take(b),
            Some(Ahead::Failed(BackendError::Timeout))
        ));
    }
}
