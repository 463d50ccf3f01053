//! On-demand backfills: what an operator asked to read again, and where a
//! running reader finds such requests.
//!
//! Requests are kept in caudal's own state, never in the source: a log
//! carries at most a request's id, so nobody who can merely write to the
//! source can make caudal run SQL.

/// What an operator asked to backfill: a table and an optional filter.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackfillRequest {
    pub table: String,
    #[serde(default)]
    pub filter: Option<String>,
}

/// Where a running reader looks backfill requests up (the engine keeps
/// them in the state store). Sources whose log can carry a request's id
/// look it up by id ([`get`](Self::get)); the others poll
/// ([`pending`](Self::pending)).
#[async_trait::async_trait]
pub trait BackfillRequests: Send + Sync {
    /// The request saved under `id`, if it is still there.
    async fn get(&self, id: &str) -> Option<BackfillRequest>;
    /// Every request saved for the pipeline, by id.
    async fn pending(&self) -> Vec<(String, BackfillRequest)>;
}
