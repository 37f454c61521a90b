//! Which node serves a key. Callers name a key (or a slot), never a
//! connection; a topology maps it to a node, and the node picks its
//! per-worker connection from the caller's hint.
//!
//! [`Topology::route`] is the one routing function: every keyed request
//! (GET, SET, DEL, a pass-through command) goes through it, so redirections
//! are followed in one place whatever the command.

use std::sync::Arc;

use super::cluster::{Cluster, Listeners, Redirect};
use super::node::Node;
use super::slot::slot;
use super::{BackendError, BackendOptions, BackendStats};
use crate::config::RedisTarget;

/// The shape of the backing Redis.
pub enum Topology {
    /// One Redis: every key lives on it.
    Single(Node),
    /// A Redis Cluster: each slot's master (see `cluster`).
    Cluster(Cluster),
}

impl Topology {
    /// One node at `options.target`.
    pub(crate) fn single(options: &BackendOptions, stats: Arc<BackendStats>) -> Topology {
        let node = Node::start(options, stats.clone());
        let target = &options.target;
        stats.register_node(
            &format!("{}:{}", target.host, target.port),
            node.open_connections(),
        );
        Topology::Single(node)
    }

    /// A cluster learnt from `seeds`, each master's node with `options`'
    /// connections and timeout.
    pub(crate) fn cluster(
        options: &BackendOptions,
        seeds: Vec<RedisTarget>,
        stats: Arc<BackendStats>,
        listeners: Option<Listeners>,
    ) -> Topology {
        Topology::Cluster(Cluster::start(options.clone(), seeds, stats, listeners))
    }

    /// Runs `op` at the node that serves `key`, following a cluster's
    /// redirections: `op` gets the node and whether `ASKING` must precede
    /// the command; `redirect` reads a `MOVED`/`ASK` out of its result (see
    /// [`Redirect::of_error`], [`Redirect::of_values`]). One Redis: `op` once.
    pub(crate) fn route<T>(
        &self,
        key: &[u8],
        op: impl FnMut(&Node, bool) -> Result<T, BackendError>,
        redirect: impl Fn(&Result<T, BackendError>) -> Option<Redirect>,
    ) -> Result<T, BackendError> {
        self.route_slot(slot(key), op, redirect)
    }

    /// [`Topology::route`] by slot (a keyless command pinned to a slot's
    /// master, or keys already grouped by slot).
    pub(crate) fn route_slot<T>(
        &self,
        slot: u16,
        mut op: impl FnMut(&Node, bool) -> Result<T, BackendError>,
        redirect: impl Fn(&Result<T, BackendError>) -> Option<Redirect>,
    ) -> Result<T, BackendError> {
        match self {
            Topology::Single(node) => op(node, false),
            Topology::Cluster(cluster) => cluster.route(slot, op, redirect),
        }
    }
}
