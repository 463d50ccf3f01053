//! caudal-store: the state store. It keeps what must survive a restart:
//! pipeline checkpoints, the history of runs, the next scheduled run of each
//! pipeline, and the leases that keep a pipeline from running twice at once.
//!
//! Two backends sit behind one [`Store`]: SQLite (the default: one file, WAL
//! mode, created when missing) and PostgreSQL (for several machines sharing
//! one store). Both run the same SQL, embedded once in this crate, and pass
//! the same test suite.
//!
//! What the store promises:
//!
//! - **Durability.** A call that returned `Ok` is committed (SQLite runs with
//!   `synchronous = FULL`).
//! - **Checkpoints move with their run.** [`Store::commit_progress`] saves a
//!   pipeline's checkpoint and its run's counters in one transaction, and
//!   only while that run is still `running`: a run marked abandoned by another
//!   process can no longer move the checkpoint.
//! - **One lease holder.** Acquiring, taking over and renewing a lease are
//!   each one atomic statement, so of any number of racing processes at most
//!   one holds a lease at a time.
//! - **One clock.** Every timestamp (run start and end, checkpoint updates,
//!   lease expiry) comes from the database's clock, not the caller's, so
//!   machines whose clocks disagree still agree on when a lease expires.
//!   Timestamps are stored as microseconds since the Unix epoch (UTC); SQLite
//!   provides millisecond precision.
//! - **Upgradeable schema.** [`Store::open`] applies the versioned migrations
//!   in `migrations/<backend>/` that the database has not seen yet; opening
//!   an up-to-date database changes nothing. Concurrent opens are serialised
//!   (an advisory lock on PostgreSQL, a write transaction on SQLite).
//! - **Bounded history.** Runs, resolved dead letters and audit entries can
//!   be pruned by age (runs also by count per pipeline) in short, indexed
//!   batches; a running run, the newest run of a pipeline and a pending dead
//!   letter are never pruned (see [`Store::prune_runs`]).
//! - **Errors, not panics.** Every failure is a [`caudal_core::Error`]: of
//!   kind [`ErrorKind::Store`] with the driver's error as its source,
//!   [`Config`](ErrorKind::Config) for a url the store cannot use, and
//!   [`Internal`](ErrorKind::Internal) for a call that breaks the API's
//!   contract (finishing a run as `running`, a counter above `i64::MAX`).

/// Runs `$body` with `$pool` bound to the store's concrete pool. The body is
/// written once and compiled for each backend, so the SQL and the way its
/// values are bound and read cannot drift apart between the two.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}

mod aggregates;
mod alerts;
mod api;
mod backup;
mod checkpoints;
mod clock;
mod crawl;
mod datasets;
mod dead_letters;
mod dispatch;
mod leases;
mod nodes;
mod open;
mod retention;
mod runs;
mod schedules;
mod sink_states;
mod source_states;
mod workflows;

pub use aggregates::{AggregateCommit, AggregateHead, WindowRow};
pub use alerts::{
    AlertChange, AlertEvent, AlertInstanceRow, InstanceState, NewNotification, Notification,
    Silence,
};
pub use api::{AuditRecord, TokenRecord};
pub use checkpoints::Checkpoint;
pub use crawl::{
    ClaimedPage, FinishedPage, FrontierSummary, NewPage, OpenedFrontier, PAGE_STATES, PageRow,
};
pub use datasets::{DatasetDate, DatasetPart, DatasetSummary, PartitionSummary};
pub use dead_letters::{DeadLetter, DeadLetterState, NewDeadLetter};
pub use dispatch::{
    ClaimedDispatch, DispatchBeat, DispatchChanges, DispatchKey, FinishedDispatch, NewDispatch,
    OpenDispatch, Wake, Wakeups,
};
pub use leases::{Fence, LeaseOutcome, LeaseRow};
pub use nodes::{NewNode, Node, NodeState};
pub use retention::PRUNE_BATCH;
pub use runs::{RunOutcome, RunRecord};
pub use sink_states::SinkState;
pub use source_states::SourceState;
pub use workflows::{AttemptRow, NewWorkflowRun, RunChange, RunFilter, TaskRow, WorkflowRunRow};

use caudal_core::{Error, ErrorKind};

/// A handle on the state store. Cloning it is cheap and shares the
/// connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Store {
    /// The backend behind this store: `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Whether the store answers a query (for readiness checks).
    pub async fn ping(&self) -> caudal_core::Result<()> {
        with_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))
        .map_err(|e| store_error("checking the state store".into(), e))
    }

    /// Closes every connection, waiting for queries in flight. Later calls on
    /// this store (or its clones) fail with a store error.
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }
}

/// A database failure while doing `action` (phrased as "reading the
/// checkpoint of pipeline `x`").
fn store_error(action: String, source: sqlx::Error) -> Error {
    Error::with_source(
        ErrorKind::Store,
        format!("state store: {action} failed"),
        source,
    )
}
