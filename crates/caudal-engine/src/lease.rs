//! Leases: a pipeline never runs twice at once, in one process or across
//! processes and machines sharing a state store.
//!
//! A lease is a row in the store with a holder and an expiry, renewed while
//! its run goes on. A holder that died (kill -9) leaves a lease that expires
//! after its TTL; when the dead holder was a process on this same machine
//! (its pid no longer exists), the lease is taken over at once instead.

use std::sync::Arc;
use std::time::Duration;

use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{LeaseOutcome, Store};
use tokio_util::sync::CancellationToken;

/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// This process's identity as a lease holder: `host:pid:nonce`.
pub use caudal_core::process::holder_id;
use caudal_core::process::hostname;

/// Whether `holder` names a process on this machine that no longer exists.
pub(crate) fn holder_is_dead_local(holder: &str) -> bool {
    let mut parts = holder.split(':');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == hostname()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A held lease, renewed in the background until released or dropped.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    name: String,
    holder: String,
    renewer: tokio::task::JoinHandle<()>,
    lost: CancellationToken,
}

impl Lease {
    /// Takes the lease `name` or fails with [`ErrorKind::Busy`] naming the
    /// holder.
    pub async fn acquire(store: &Store, name: &str) -> Result<Self> {
        Self::acquire_in_cluster(store, name, None).await
    }

    /// As [`acquire`](Self::acquire); with `nodes_lease` (the cluster's
    /// lease, when this node owns the pipeline) a holder that is a node
    /// silent for that long, or stopped, is taken over at once too, so a
    /// dead node's run does not hold the pipeline for the whole TTL.
    pub async fn acquire_in_cluster(
        store: &Store,
        name: &str,
        nodes_lease: Option<Duration>,
    ) -> Result<Self> {
        let holder = holder_id();
        let mut outcome = store.try_acquire_lease(name, &holder, LEASE_TTL).await?;
        let gone = match (&outcome, nodes_lease) {
            (LeaseOutcome::Held { holder: other, .. }, _) if holder_is_dead_local(other) => true,
            (LeaseOutcome::Held { holder: other, .. }, Some(lease)) => {
                crate::cluster::holder_is_dead_node(store, other, lease).await
            }
            _ => false,
        };
        if let LeaseOutcome::Held { holder: other, .. } = &outcome
            && gone
            && store
                .take_over_lease(name, other, &holder, LEASE_TTL)
                .await?
        {
            tracing::info!(lease = name, previous = %other, "took over the lease of a process that is gone");
            outcome = LeaseOutcome::Acquired;
        }
        match outcome {
            LeaseOutcome::Acquired => {}
            LeaseOutcome::Held {
                holder: other,
                expires_at,
            } => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{name} is running in another process ({other}); its lease expires at {expires_at} unless renewed"
                    ),
                ));
            }
        }
        let lost = CancellationToken::new();
        let renewer = {
            let store = store.clone();
            let name = name.to_string();
            let holder = holder.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LEASE_TTL / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match store.renew_lease(&name, &holder, LEASE_TTL).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::error!(lease = %name, "lease lost to another holder; stopping the run");
                            lost.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e.report(), "cannot renew the lease; will retry")
                        }
                    }
                }
            })
        };
        Ok(Self {
            store: store.clone(),
            name: name.to_string(),
            holder,
            renewer,
            lost,
        })
    }

    /// Cancelled when the lease was lost (another holder took it).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the lease back.
    pub async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.store.release_lease(&self.name, &self.holder).await {
            tracing::warn!(lease = %self.name, error = %e.report(), "cannot release the lease; it will expire");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Shared handle type for pipelines' lease names.
pub(crate) fn pipeline_lease(pipeline: &str) -> Arc<str> {
    Arc::from(format!("pipeline/{pipeline}"))
}
