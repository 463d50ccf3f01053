//! `[cluster]`: several `caudal run` processes (nodes) share the pipelines
//! of one configuration over one PostgreSQL state store. Each pipeline is
//! owned by one node at a time through a lease with a fencing token; a
//! node that dies or is cut off loses its pipelines when the lease runs
//! out, and live nodes take them over. See docs/cluster.md.
//!
//! What the checks refuse, because a failover would lose records:
//! - a SQLite state store (one machine's file cannot be shared);
//! - a pipeline with `ack = "buffered"`: its buffer is on the node's disk,
//!   and a batch acknowledged upstream but still in a dead node's buffer
//!   would be gone. With `ack = "delivered"` the checkpoint only moves once
//!   a batch is delivered, so the next owner reads again whatever a dead
//!   node had buffered; to keep a buffer that survives nodes, deliver into
//!   a broker (RabbitMQ, NATS, Kafka) and consume it in another pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::{AckMode, Config};
use crate::units::Duration;

/// Default time a node keeps a pipeline without renewing its lease. A dead
/// node's pipelines move after at most this (plus a second to notice).
pub const DEFAULT_CLUSTER_LEASE: Duration = Duration::from_secs(6);
/// The shortest lease accepted.
pub const MIN_CLUSTER_LEASE: Duration = Duration::from_secs(2);

/// Sharing pipelines between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How long a node owns a pipeline without renewing its lease (default
    /// `"6s"`, at least `"2s"`). Renewed every third of it; a node that
    /// cannot renew stops the pipeline's intake at once, and another node
    /// takes it over once the lease has run out. Shorter fails over sooner
    /// and writes to the store more often.
    #[serde(default = "default_lease")]
    #[schemars(extend("default" = DEFAULT_CLUSTER_LEASE))]
    pub lease: Duration,
    /// Workflow attempts this node runs at once at most (default 32). Any
    /// node with a free slot claims the next ready attempt; pools
    /// (`[pools.NAME] slots`) count across the cluster, not per node.
    #[serde(default = "default_task_slots")]
    #[schemars(extend("default" = DEFAULT_TASK_SLOTS))]
    pub task_slots: u32,
}

/// Default workflow attempts one node runs at once.
pub const DEFAULT_TASK_SLOTS: u32 = 32;

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease: DEFAULT_CLUSTER_LEASE,
            task_slots: DEFAULT_TASK_SLOTS,
        }
    }
}

fn default_task_slots() -> u32 {
    DEFAULT_TASK_SLOTS
}

fn default_lease() -> Duration {
    DEFAULT_CLUSTER_LEASE
}

/// Checks `[cluster]` against the rest of `config`.
pub(crate) fn check(config: &Config, out: &mut Vec<Problem>) {
    let Some(cluster) = &config.cluster else {
        return;
    };
    let path = FieldPath::root().key("cluster");
    if cluster.lease.as_std() < MIN_CLUSTER_LEASE.as_std() {
        out.push(Problem::at(
            path.key("lease"),
            "must be at least \"2s\": renewals every third of it must reach the store in time",
        ));
    }
    if cluster.task_slots == 0 {
        out.push(Problem::at(
            path.key("task_slots"),
            "must be at least 1 (a node with no slot runs no workflow attempt)",
        ));
    }
    let url = config.state.url.expose();
    if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
        out.push(Problem::at_key(
            path,
            "a cluster shares a PostgreSQL state store: set [state] url = \"postgres://...\" on every node",
        ));
    }
    for (name, p) in &config.pipelines {
        if p.ack == AckMode::Buffered {
            out.push(Problem::at(
                FieldPath::root().key("pipelines").key(name.clone()).key("ack"),
                "in a cluster a pipeline needs ack = \"delivered\": with \"buffered\" a batch \
                 acknowledged upstream but still in a failed node's buffer would be lost; to keep a \
                 buffer that survives nodes, deliver into a broker sink and consume it in another \
                 pipeline",
            ));
        }
    }
}
