//! [`ChangeCapture`]: what the engine, the CLI and the API do with a CDC
//! source, whatever its database.

use std::sync::Arc;

use caudal_core::Result;
use caudal_core::record::Position;
use caudal_core::status::Replication;
use serde::{Deserialize, Serialize};

use super::{BackfillRequests, CdcReader};

/// A change data capture source of one pipeline.
///
/// Contract:
/// - **At-least-once, never past durable.** A run reads from the last
///   durable position it is given and acknowledges the source (confirms a
///   slot) only up to what the pipeline reports durable through the run's
///   [`CdcReader::durable`] handle. Records may repeat after a restart;
///   none is skipped.
/// - **Stops rather than skips.** When the source can no longer continue
///   from the position (a slot dropped, a log purged), a run fails with
///   `ErrorKind::Resync` and stays failed until [`restart`](Self::restart).
/// - **Nothing kept behind the operator's back.** What the source creates
///   on the server for the pipeline is described by [`held`](Self::held),
///   so the engine can release it when the pipeline goes away.
#[async_trait::async_trait]
pub trait ChangeCapture: Send + Sync + std::fmt::Debug {
    /// The source's name in the configuration.
    fn name(&self) -> &str;

    /// The live figures of the run in this process (or of the last one).
    fn live(&self) -> Replication;

    /// Starts one run from `from` (the last durable position; `None` for a
    /// pipeline that has captured nothing yet). `follow`: stream until
    /// stopped; otherwise stop once the log as of now is read. `backfills`:
    /// where requests made while it streams are found.
    async fn open_run(
        &self,
        from: Option<&Position>,
        follow: bool,
        backfills: Option<Arc<dyn BackfillRequests>>,
    ) -> Result<CdcReader>;

    /// `known` (the figures the reader last reported), completed with what
    /// the server says now: the state of the slot, the end of the log, how
    /// far the checkpoint is behind. Never fails: an unreachable server is
    /// reported in `server_error`.
    async fn server_status(&self, known: Replication, checkpoint: Option<&Position>)
    -> Replication;

    /// What the pipeline keeps on the server while it exists (a
    /// replication slot, a publication), given whether caudal created the
    /// publication; `None` when it keeps nothing.
    fn held(&self, created_publication: bool) -> Option<Held>;

    /// Drops what `held` describes (`caudal cdc drop`, a pipeline removed
    /// from the configuration). A publication is dropped only if caudal
    /// created it.
    async fn release(&self, held: Option<&Held>) -> Result<Released>;

    /// Prepares a start from scratch (`caudal resync`): drops the position
    /// the server keeps for the pipeline (the slot; a publication stays).
    async fn restart(&self) -> Result<Released>;

    /// Rows of `table` matching `filter` (a backfill's total); also checks
    /// the table and the filter.
    async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64>;

    /// Tells the pipeline streaming from this source that a backfill
    /// request was saved under `id` (sources that poll for requests need
    /// nothing).
    async fn request_backfill(&self, id: &str) -> Result<()>;
}

/// What a CDC pipeline keeps on its server, remembered in the state store
/// so it can be released once the pipeline is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The source (in the configuration) the pipeline read.
    pub source: String,
    /// The replication slot.
    #[serde(default)]
    pub slot: Option<String>,
    /// The publication.
    #[serde(default)]
    pub publication: Option<String>,
    /// Whether caudal created the publication (then it may drop it).
    #[serde(default)]
    pub publication_created: bool,
    /// Publications caudal made for the pipeline besides its own (e.g. one
    /// of inserts only), dropped with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_publications: Vec<String>,
}

impl Held {
    /// This description, remembering that caudal created the publication
    /// if an earlier run said so.
    pub fn merged_with(mut self, earlier: Option<&Held>) -> Self {
        self.publication_created |= earlier.is_some_and(|e| e.publication_created);
        self
    }
}

/// What a release or restart did, in words for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// What was dropped, e.g. `replication slot "caudal_orders"`.
    pub dropped: Vec<String>,
    /// What was left in place, and why.
    pub kept: Vec<String>,
    /// What happens next, or why there was nothing to do.
    pub note: Option<String>,
}
