//! Which node serves a key. Callers name a key (or a slot), never a
//! connection; a topology maps it to a node, and the node picks its
//! per-worker connection from the caller's hint.

use std::sync::Arc;

use super::node::Node;
use super::{BackendOptions, BackendStats};

/// The shape of the backing Redis.
pub enum Topology {
    /// One Redis: every key lives on it.
    Single(Node),
}

impl Topology {
    /// One node at `options.target`.
    pub(crate) fn single(options: &BackendOptions, stats: Arc<BackendStats>) -> Topology {
        Topology::Single(Node::start(options, stats))
    }

    /// The node that holds `key`.
    pub(crate) fn node_for(&self, _key: &[u8]) -> &Node {
        match self {
            Topology::Single(node) => node,
        }
    }

    /// Every node (readiness asks each).
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Node> {
        match self {
            Topology::Single(node) => std::iter::once(node),
        }
    }
}
