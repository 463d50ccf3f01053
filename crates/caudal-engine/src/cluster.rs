//! Nodes and pipeline ownership: several `caudal run` processes sharing
//! one PostgreSQL state store, each pipeline run by one of them at a time.
//!
//! Promises:
//! - Every `caudal run` registers as a node and beats a heartbeat, so
//!   `caudal status`, `caudal node list`, the API and `/metrics` show who
//!   runs; a node that ends cleanly marks itself stopped.
//! - With `[cluster]`, a node runs a pipeline only while it holds the
//!   pipeline's owner lease (`owner/NAME`). Each hold has a fencing token
//!   that grows with every change of hands; delivery's checkpoint writes
//!   commit only with the current token, checked by the database, so a node
//!   that lost a pipeline (paused, cut off from the store) cannot move the
//!   new owner's checkpoint back.
//! - A node stops a pipeline's intake and delivery as soon as it cannot
//!   renew its lease for two thirds of the lease (before the lease runs
//!   out), and a live node takes the pipeline within about a second of the
//!   lease running out.
//! - Pipelines are shared out evenly: a node owns at most ⌈pipelines ÷ live
//!   nodes⌉; when a node joins, the others hand over what exceeds their new
//!   share; when one dies, the others take its pipelines.
//! - Drain (`caudal node drain ID`, or SIGTERM) stops each pipeline
//!   cleanly (a run in progress ends as cancelled, not failed), releases
//!   its lease at once so another node takes it without waiting for expiry,
//!   and then the node exits.
//! - **One sites node.** Per-site crawl limits (concurrency, delay,
//!   robots.txt, the adaptive throttle) live in one process's memory, so
//!   everything that talks to sites runs on one node: the holder of the
//!   [`SITES_LEASE`]. Crawl pipelines are owned only by it (handed over when
//!   it stops being the sites node), and the workflow executor hands
//!   site-bound attempts (crawl tasks, commands with `site`) to it alone.
//!   A sink's `rate_limit` applies per pipeline, and a pipeline runs on one
//!   node at a time, so it holds across the cluster as on one machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use caudal_core::config::ClusterConfig;
use caudal_core::process::{holder_id, hostname};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{Fence, LeaseOutcome, NewNode, Node, NodeState, Store};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a node without `[cluster]` beats its heartbeat.
const SOLO_HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a node looks for a pipeline it could take.
const CLAIM_POLL: Duration = Duration::from_secs(1);

/// The lease of the node that runs everything site-bound.
pub const SITES_LEASE: &str = "cluster/sites";

/// The name of pipeline `name`'s owner lease.
pub fn owner_lease(name: &str) -> String {
    format!("owner/{name}")
}

/// This process as a node of the cluster: its identity, its share of the
/// pipelines, and how many it owns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Member {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    id: String,
    lease: Duration,
    /// Pipelines owned now (and slots reserved by claims in progress).
    owned: AtomicUsize,
    /// How many pipelines this node should own.
    share: watch::Sender<usize>,
    /// Pipelines in the configuration.
    total: usize,
    /// Cancelled once this node is asked to drain.
    draining: CancellationToken,
    /// Whether this node holds the [`SITES_LEASE`].
    sites: watch::Sender<bool>,
}

/// Whether pipeline `p` keeps to the sites node (a crawl).
pub fn is_site_bound(p: &crate::pipeline::Pipeline) -> bool {
    matches!(p.source(), crate::pipeline::Source::Crawl(_))
}

impl Member {
    /// A member sharing `pipelines` under `cluster`: the crawls go to the
    /// sites node, the others are shared out evenly.
    pub fn for_pipelines(
        store: Store,
        cluster: &ClusterConfig,
        pipelines: &[crate::pipeline::Pipeline],
    ) -> Self {
        let shared = pipelines.iter().filter(|p| !is_site_bound(p)).count();
        Self::new(store, cluster, shared)
    }

    /// A member sharing `total` pipelines under `cluster`.
    pub fn new(store: Store, cluster: &ClusterConfig, total: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                id: holder_id(),
                lease: cluster.lease.as_std(),
                owned: AtomicUsize::new(0),
                share: watch::Sender::new(0),
                total,
                draining: CancellationToken::new(),
                sites: watch::Sender::new(false),
            }),
        }
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The cluster's lease.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// Pipelines owned now.
    pub fn owned(&self) -> usize {
        self.inner.owned.load(Ordering::Relaxed)
    }

    /// Whether this node is the sites node (holds [`SITES_LEASE`]).
    pub fn is_sites_node(&self) -> bool {
        *self.inner.sites.borrow()
    }

    /// Waits until this node owns pipeline `name` (or `stop`): takes a slot
    /// of its share, then the owner lease when it is free. A `site_bound`
    /// pipeline (a crawl) is claimed only while this node is the sites
    /// node.
    pub async fn claim(
        &self,
        name: &str,
        site_bound: bool,
        stop: &CancellationToken,
    ) -> Option<Owned> {
        let lease = owner_lease(name);
        let mut share = self.inner.share.subscribe();
        let mut sites = self.inner.sites.subscribe();
        loop {
            if stop.is_cancelled() {
                return None;
            }
            // A crawl takes no slot of the share: the sites node runs
            // every crawl besides its share of the rest.
            let may = if site_bound {
                self.is_sites_node()
            } else {
                self.reserve()
            };
            if may && let Some(owned) = self.try_take(name, &lease, site_bound).await {
                return Some(owned);
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(CLAIM_POLL) => {}
                _ = share.changed() => {}
                _ = sites.changed() => {}
            }
        }
    }

    /// Takes one slot of the share, if one is free.
    fn reserve(&self) -> bool {
        let share = *self.inner.share.borrow();
        self.inner
            .owned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < share).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a slot, if owning more than the share (for handing a
    /// pipeline over); with `force`, in any case.
    fn unreserve(&self, force: bool) -> bool {
        let share = *self.inner.share.borrow();
        self.inner
            .owned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0 && (force || n > share)).then(|| n - 1)
            })
            .is_ok()
    }

    async fn try_take(&self, name: &str, lease: &str, site_bound: bool) -> Option<Owned> {
        let i = &self.inner;
        let taken = match i.store.try_acquire_lease(lease, &i.id, i.lease).await {
            Ok(LeaseOutcome::Acquired) => i.store.lease_token(lease, &i.id).await,
            Ok(LeaseOutcome::Held { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        match taken {
            Ok(Some(token)) => {
                tracing::info!(pipeline = name, token, "took the pipeline");
                metrics::counter!("caudal_cluster_takeovers_total", "pipeline" => name.to_string())
                    .increment(1);
                Some(Owned::start(
                    self.clone(),
                    name,
                    Fence {
                        lease: lease.to_string(),
                        holder: i.id.clone(),
                        token,
                    },
                    site_bound,
                ))
            }
            Ok(None) => {
                if !site_bound {
                    self.unreserve(true);
                }
                None
            }
            Err(e) => {
                if !site_bound {
                    self.unreserve(true);
                }
                tracing::warn!(pipeline = name, error = %e.report(), "cannot claim the pipeline yet");
                None
            }
        }
    }

    /// Registers this node and beats its heartbeat until `shutdown`,
    /// keeping the share up to date; when asked to drain, gives every
    /// pipeline back and then cancels `shutdown`. Marks the node stopped
    /// at the end.
    pub async fn serve(self, shutdown: CancellationToken) {
        let i = &self.inner;
        let beat = i.lease / 3;
        register(&i.store, &i.id, true).await;
        self.update_share().await;
        let mut sites_ok = tokio::time::Instant::now();
        self.update_sites(&mut sites_ok).await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(beat) => {}
            }
            let beaten =
                tokio::time::timeout(beat, i.store.node_heartbeat(&i.id, self.owned() as u64))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::new(
                            ErrorKind::Store,
                            "the state store did not answer in time",
                        ))
                    });
            match beaten {
                Ok(Some(NodeState::Draining)) if !i.draining.is_cancelled() => {
                    tracing::info!(
                        owned = self.owned(),
                        "asked to drain: handing every pipeline over, then exiting"
                    );
                    i.draining.cancel();
                }
                Ok(Some(_)) => {}
                Ok(None) => register(&i.store, &i.id, true).await,
                Err(e) => {
                    tracing::warn!(error = %e.report(), "cannot beat the heartbeat; will retry")
                }
            }
            self.update_share().await;
            self.update_sites(&mut sites_ok).await;
            metrics::gauge!("caudal_cluster_pipelines_owned").set(self.owned() as f64);
            if i.draining.is_cancelled() && self.owned() == 0 {
                tracing::info!("drained: every pipeline handed over");
                shutdown.cancel();
                break;
            }
        }
        if self.is_sites_node() {
            i.sites.send_replace(false);
            let _ = i.store.expire_lease(SITES_LEASE, &i.id).await;
        }
        let _ = i.store.set_node_state(&i.id, NodeState::Stopped).await;
    }

    /// Takes or renews the [`SITES_LEASE`] (a draining node gives it up).
    /// A node that could not renew it for two thirds of the lease stops
    /// being the sites node before another may take it.
    async fn update_sites(&self, last_ok: &mut tokio::time::Instant) {
        let i = &self.inner;
        if i.draining.is_cancelled() {
            if self.is_sites_node() {
                i.sites.send_replace(false);
                let _ = i.store.expire_lease(SITES_LEASE, &i.id).await;
                tracing::info!("draining: no longer the sites node");
            }
            return;
        }
        let attempt = tokio::time::Instant::now();
        let held = match tokio::time::timeout(
            i.lease / 3,
            i.store.try_acquire_lease(SITES_LEASE, &i.id, i.lease),
        )
        .await
        {
            Ok(Ok(LeaseOutcome::Acquired)) => {
                *last_ok = attempt;
                true
            }
            Ok(Ok(LeaseOutcome::Held { .. })) => false,
            Ok(Err(e)) => {
                tracing::warn!(error = %e.report(), "cannot renew the sites lease");
                self.is_sites_node() && last_ok.elapsed() < i.lease * 2 / 3
            }
            Err(_) => self.is_sites_node() && last_ok.elapsed() < i.lease * 2 / 3,
        };
        i.sites.send_if_modified(|s| {
            let changed = *s != held;
            if changed {
                if held {
                    tracing::info!(
                        "this node is the sites node: it runs crawls and site-bound tasks"
                    );
                } else {
                    tracing::warn!("this node is no longer the sites node");
                }
            }
            *s = held;
            changed
        });
        metrics::gauge!("caudal_cluster_sites_node").set(if held { 1.0 } else { 0.0 });
    }

    /// Recomputes the share from the live nodes.
    async fn update_share(&self) {
        let i = &self.inner;
        if i.draining.is_cancelled() {
            i.share.send_replace(0);
            return;
        }
        let live = match i.store.nodes().await {
            Ok(nodes) => nodes
                .iter()
                .filter(|n| n.id == i.id || is_live_member(n, i.lease))
                .count(),
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot list the nodes; keeping the share");
                return;
            }
        };
        metrics::gauge!("caudal_cluster_nodes").set(live as f64);
        let share = i.total.div_ceil(live.max(1));
        i.share.send_if_modified(|s| {
            let changed = *s != share;
            if changed {
                tracing::info!(live_nodes = live, share, "pipelines shared out");
            }
            *s = share;
            changed
        });
    }
}

/// Whether `n` is an active cluster node that beat its heartbeat within a
/// lease.
fn is_live_member(n: &Node, lease: Duration) -> bool {
    n.cluster && n.state == NodeState::Active && n.heartbeat_age < lease
}

async fn register(store: &Store, id: &str, cluster: bool) {
    let node = NewNode {
        id: id.to_string(),
        host: hostname(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cluster,
    };
    if let Err(e) = store.register_node(&node).await {
        tracing::warn!(error = %e.report(), "cannot register this node; will retry");
    }
}

/// Registers a node that runs every pipeline itself (no `[cluster]`) and
/// beats its heartbeat until `shutdown`, so status shows it.
pub async fn serve_solo(store: Store, shutdown: CancellationToken) {
    let id = holder_id();
    register(&store, &id, false).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(SOLO_HEARTBEAT) => {}
        }
        match store.node_heartbeat(&id, 0).await {
            Ok(Some(_)) => {}
            Ok(None) => register(&store, &id, false).await,
            Err(e) => tracing::debug!(error = %e.report(), "cannot beat the heartbeat"),
        }
    }
    let _ = store.set_node_state(&id, NodeState::Stopped).await;
}

/// A pipeline this node owns: its fence, and a token cancelled when the
/// node must stop running it (lease lost, handed over, drained).
#[derive(Debug)]
pub struct Owned {
    member: Member,
    pipeline: String,
    fence: Fence,
    stop: CancellationToken,
    /// Set when the lease was lost rather than given back.
    lost: Arc<AtomicBool>,
    /// Set when the renewer already gave back this pipeline's slot of the
    /// share (handing it over).
    slot_given: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Owned {
    fn start(member: Member, pipeline: &str, fence: Fence, site_bound: bool) -> Self {
        let stop = CancellationToken::new();
        let lost = Arc::new(AtomicBool::new(false));
        // A crawl holds no slot of the share (see `claim`).
        let slot_given = Arc::new(AtomicBool::new(site_bound));
        metrics::gauge!("caudal_pipeline_owned", "pipeline" => pipeline.to_string()).set(1.0);
        let renewer = tokio::spawn(renew(
            member.clone(),
            pipeline.to_string(),
            fence.lease.clone(),
            stop.clone(),
            lost.clone(),
            slot_given.clone(),
            site_bound,
        ));
        Self {
            member,
            pipeline: pipeline.to_string(),
            fence,
            stop,
            lost,
            slot_given,
            renewer,
        }
    }

    /// Proof of ownership for the store's fenced writes.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Cancelled when the node must stop running the pipeline.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Ends the ownership: gives the lease back at once (unless it was
    /// lost) so another node takes the pipeline without waiting for it to
    /// expire.
    pub async fn release(self) {
        self.renewer.abort();
        self.stop.cancel();
        let m = &self.member.inner;
        if !self.lost.load(Ordering::Acquire)
            && let Err(e) = m.store.expire_lease(&self.fence.lease, &m.id).await
        {
            tracing::warn!(pipeline = %self.pipeline, error = %e.report(), "cannot give the pipeline back; it moves when its lease expires");
        }
        if !self.slot_given.load(Ordering::Acquire) {
            self.member.unreserve(true);
        }
        metrics::gauge!("caudal_pipeline_owned", "pipeline" => self.pipeline.clone()).set(0.0);
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Renews the owner lease every third of it until `stop`; cancels `stop`
/// when the lease is lost (someone else holds it), could not be renewed
/// for two thirds of it, or this node should hand the pipeline over.
async fn renew(
    member: Member,
    pipeline: String,
    lease: String,
    stop: CancellationToken,
    lost: Arc<AtomicBool>,
    slot_given: Arc<AtomicBool>,
    site_bound: bool,
) {
    let i = &member.inner;
    let mut sites = i.sites.subscribe();
    let every = i.lease / 3;
    let mut last_ok = tokio::time::Instant::now();
    // A fixed deadline: a share change in between does not push the
    // renewal back.
    let mut next = last_ok + every;
    let mut share = i.share.subscribe();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
            _ = share.changed() => {
                if !site_bound && member.unreserve(false) {
                    slot_given.store(true, Ordering::Release);
                    tracing::info!(pipeline, "handing the pipeline over to even out the nodes");
                    stop.cancel();
                    return;
                }
                continue;
            }
            _ = sites.changed(), if site_bound => {
                if !*sites.borrow_and_update() {
                    slot_given.store(true, Ordering::Release);
                    tracing::info!(pipeline, "handing the crawl over to the new sites node");
                    stop.cancel();
                    return;
                }
                continue;
            }
        }
        // A crawl whose node stopped being the sites node (also when that
        // happened before this renewer subscribed) goes to the new one.
        if site_bound && !member.is_sites_node() {
            tracing::info!(pipeline, "handing the crawl over to the new sites node");
            stop.cancel();
            return;
        }
        let sent = tokio::time::Instant::now();
        next = sent + every;
        match tokio::time::timeout(every, i.store.renew_lease(&lease, &i.id, i.lease)).await {
            Ok(Ok(true)) => last_ok = sent,
            Ok(Ok(false)) => {
                tracing::error!(pipeline, "lost the pipeline to another node; stopping it");
                lost.store(true, Ordering::Release);
                stop.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(pipeline, error = %e.report(), "cannot renew the pipeline's lease")
            }
            Err(_) => tracing::warn!(pipeline, "renewing the pipeline's lease timed out"),
        }
        if last_ok.elapsed() >= i.lease * 2 / 3 {
            tracing::error!(
                pipeline,
                "could not renew the pipeline's lease in time; stopping it before another node may take it"
            );
            lost.store(true, Ordering::Release);
            stop.cancel();
            return;
        }
        if !site_bound && member.unreserve(false) {
            slot_given.store(true, Ordering::Release);
            tracing::info!(pipeline, "handing the pipeline over");
            stop.cancel();
            return;
        }
    }
}

/// A node as status and the API show it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub heartbeat_age_s: f64,
    /// `active`, `draining`, `stopped`, or `lost` (no heartbeat for 30 s).
    pub state: String,
    pub cluster: bool,
    /// Pipelines it owns (by the owner leases).
    pub pipelines: Vec<String>,
    /// Whether it is the sites node (holds `cluster/sites`): it runs the
    /// crawls and the site-bound workflow attempts.
    pub sites_node: bool,
}

/// How long without a heartbeat before a node is shown as lost.
const LOST_AFTER: Duration = Duration::from_secs(30);

/// Every registered node with the pipelines it owns.
pub async fn nodes(store: &Store) -> Result<Vec<NodeView>> {
    let nodes = store.nodes().await?;
    let owners = store.leases("owner/").await?;
    let sites = store.leases(SITES_LEASE).await?;
    let sites = sites
        .iter()
        .find(|l| l.name == SITES_LEASE && l.held)
        .map(|l| l.holder.as_str());
    Ok(nodes
        .into_iter()
        .map(|n| {
            let pipelines = owners
                .iter()
                .filter(|l| l.held && l.holder == n.id)
                .filter_map(|l| l.name.strip_prefix("owner/").map(str::to_string))
                .collect();
            let state = match n.state {
                NodeState::Stopped => "stopped",
                _ if n.heartbeat_age > LOST_AFTER => "lost",
                s => s.as_str(),
            }
            .to_string();
            NodeView {
                sites_node: sites == Some(n.id.as_str()),
                state,
                pipelines,
                heartbeat_age_s: n.heartbeat_age.as_secs_f64(),
                started_at: n.started_at.to_string(),
                id: n.id,
                host: n.host,
                pid: n.pid,
                version: n.version,
                cluster: n.cluster,
            }
        })
        .collect())
}

/// Asks node `id` (or the one node whose id starts with it) to drain.
/// Fails with [`ErrorKind::NotFound`] for no such node, and
/// [`ErrorKind::Conflict`] when the prefix names several or the node is
/// not active.
pub async fn drain(store: &Store, id: &str) -> Result<NodeView> {
    let all = nodes(store).await?;
    let matching: Vec<&NodeView> = all
        .iter()
        .filter(|n| n.id == id || n.id.starts_with(id))
        .collect();
    let node = match matching.as_slice() {
        [] => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no node `{id}`; `caudal node list` shows them"),
            ));
        }
        [one] => *one,
        many => {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "`{id}` names {} nodes ({}); give more of the id",
                    many.len(),
                    many.iter()
                        .map(|n| n.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    if node.state != "active" {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("node `{}` is {}, not active", node.id, node.state),
        ));
    }
    store.set_node_state(&node.id, NodeState::Draining).await?;
    let mut node = node.clone();
    node.state = "draining".into();
    Ok(node)
}

/// Whether `holder` (of a lease) is a node of this store that is no
/// longer running: stopped, or silent for longer than `lease`.
pub(crate) async fn holder_is_dead_node(store: &Store, holder: &str, lease: Duration) -> bool {
    match store.nodes().await {
        Ok(nodes) => nodes
            .iter()
            .any(|n| n.id == holder && (n.state == NodeState::Stopped || n.heartbeat_age >= lease)),
        Err(_) => false,
    }
}
