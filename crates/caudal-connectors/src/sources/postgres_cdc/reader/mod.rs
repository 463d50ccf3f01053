//! The CDC reader task: reads the snapshot (if any), then streams the
//! publication's changes from the slot, and hands pages of records to the
//! pipeline. One phase per module: [`snapshot`], [`stream`] (and
//! [`decode`] for its tuples), [`backfill`]; every change goes through one
//! [`Change`](crate::sources::change::Change) to its record.
//!
//! Promises:
//! - A change's position is its transaction's commit LSN and its index in
//!   the transaction. The slot is confirmed only up to the commit LSN of the
//!   last change the pipeline reported durable, so after any restart the
//!   server sends that transaction again and the reader drops what is at or
//!   before the durable position: nothing skipped, nothing replayed.
//! - While the captured tables are idle, keepalives and heartbeats move the
//!   slot on, but only once every change read before them is durable.
//! - Status updates go out every second, also while the pipeline applies
//!   backpressure, so the server never times the connection out.
//! - A transaction is never held whole: with streaming off the server sends
//!   it after its commit (spilling large ones to its own disk), and its
//!   commit LSN is known from its first message, so rows flow on in pages.
//! - A broken connection (server restart, terminated walsender) reconnects
//!   with backoff from the durable position; a missing or invalidated slot
//!   stops with [`ErrorKind::Resync`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use caudal_core::config::DecimalFormat;
use caudal_core::error::Decision;
use caudal_core::record::{CursorValue, Position, Record, format_lsn};
use caudal_core::{Error, ErrorKind, Result};
use pg_walstream::{
    ColumnData, LogicalReplicationMessage, LogicalReplicationParser, PgReplicationConnection,
    TupleData, parse_keepalive_message,
};
use serde_json::{Map, Value};
use sqlx::PgPool;
use sqlx::postgres::PgTypeInfo;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod backfill;
mod decode;
mod snapshot;
mod stream;

use super::catalog::{self, Table, Types, query_error};
use super::chunk;
use crate::sources::sql::postgres::binary_value;
use crate::sources::sql::{FetchError, format_utc};
pub use backfill::Backfills;
use decode::{Relation, key_of};
pub use snapshot::SnapshotStart;

/// The prefix of heartbeat messages caudal writes to the log.
pub const HEARTBEAT_PREFIX: &str = "caudal_heartbeat";

/// The prefix of the message that ends a bounded (`caudal once`) read.
const STOP_PREFIX: &str = "caudal_stop";

/// How often a status update goes to the server.
const FEEDBACK_EVERY: Duration = Duration::from_secs(1);

/// Most changes handed on at once while streaming.
const STREAM_PAGE: usize = 1000;

/// A connection silent this long is taken for cut (the server sends a
/// keepalive at least every half `wal_sender_timeout`, 30s by default).
const SILENCE_LIMIT: Duration = Duration::from_secs(120);

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

use crate::sources::change::{BackfillProgress, BackfillRequests, SharedLag, Stamp, update_lag};

/// The prefix of the message that asks a running pipeline for a backfill.
pub const BACKFILL_PREFIX: &str = "caudal_backfill";

/// The prefix of a backfill chunk's low and high watermarks.
const WATERMARK_PREFIX: &str = "caudal_watermark";

/// Everything the task needs.
pub struct Task {
    pub source: String,
    pub pool: PgPool,
    pub conninfo: String,
    pub slot: String,
    /// The publications streamed (the second, if any, publishes inserts
    /// only).
    pub publications: Vec<String>,
    pub tables: Vec<Table>,
    pub decimals: DecimalFormat,
    pub page_size: usize,
    pub heartbeat: Option<Duration>,
    /// Keep streaming (daemon) or stop at the log's end as of the start
    /// (`caudal once`).
    pub follow: bool,
    pub snapshot: Option<SnapshotStart>,
    /// LSN streaming starts from.
    pub stream_from: u64,
    /// The durable position the run starts from: changes at or before it
    /// are dropped.
    pub from: Option<(u64, u64)>,
    pub out: mpsc::Sender<Result<Vec<Record>>>,
    pub durable: watch::Receiver<Option<Position>>,
    pub lag: SharedLag,
    pub stop: CancellationToken,
    /// Changes read but not handed over yet. Kept across reconnects: they
    /// are past `from`, so the server will not send them again.
    pub page: Vec<Record>,
    /// Where backfill requests are looked up (the daemon only).
    pub requests: Option<Arc<dyn BackfillRequests>>,
    pub backfills: Backfills,
    /// Whether the current connection received anything (then a reconnect
    /// starts its backoff over).
    pub streamed: bool,
}

/// The transaction being read.
struct Txn {
    lsn: u64,
    xid: u32,
    time: String,
    index: u64,
}

/// How a streaming connection ended.
enum Ended {
    /// The bounded read reached its end, or the reader was stopped.
    Done,
}

impl Task {
    pub async fn run(mut self) {
        let result = self.work().await;
        if let Err(e) = result
            && e.kind() != ErrorKind::Cancelled
        {
            let _ = self.out.send(Err(e)).await;
        }
    }

    async fn work(&mut self) -> Result<()> {
        if let Some(start) = self.snapshot.take() {
            self.set_phase("snapshot");
            self.snapshot(start).await?;
        }
        self.stream().await
    }

    fn set_phase(&self, phase: &str) {
        update_lag(&self.lag, |l| l.phase = Some(phase.to_string()));
    }

    async fn send(&self, page: Vec<Record>) -> Result<()> {
        if page.is_empty() {
            return Ok(());
        }
        tokio::select! {
            () = self.stop.cancelled() => Err(cancelled()),
            sent = self.out.send(Ok(page)) => sent.map_err(|_| cancelled()),
        }
    }

    // ---- snapshot ----
}

/// Per-connection decoding state.
struct Session {
    parser: LogicalReplicationParser,
    relations: HashMap<u32, Relation>,
    types: Types,
    txn: Option<Txn>,
    /// Latest WAL position seen from the server.
    received: u64,
    /// The latest point where the stream was between transactions (a
    /// keepalive's or a heartbeat's LSN).
    idle: Option<u64>,
    confirmed: u64,
}

/// Where a change sits, as its record shows it: the commit LSN and
/// transaction id, commit time and index in the transaction.
fn stamp(lsn: u64, xid: Option<u32>, time: Option<&str>, index: Option<u64>) -> Stamp<'_> {
    Stamp {
        fields: [
            ("lsn", Value::String(format_lsn(lsn))),
            ("xid", xid.map_or(Value::Null, Value::from)),
        ],
        commit_time: time,
        index,
    }
}

/// PostgreSQL's timestamp (microseconds since 2000-01-01 UTC) as RFC 3339.
fn pg_time(us: i64) -> String {
    let epoch = chrono::DateTime::<chrono::Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
    let t = epoch
        .checked_add_signed(chrono::TimeDelta::microseconds(us))
        .unwrap_or(epoch);
    format_utc(&t)
}

fn commit_age(time: &str) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    let age = chrono::Utc::now().signed_duration_since(t);
    Some((age.num_milliseconds().max(0) as f64) / 1000.0)
}

fn slice8(b: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[..8]);
    out
}

fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "the CDC reader was stopped")
}

pub(super) fn fetch_error(source: &str, e: FetchError) -> Error {
    match e {
        FetchError::Sql(e) => query_error(source, "snapshot query failed", e),
        FetchError::Decode(m) => Error::new(ErrorKind::Decode, format!("source {source:?}: {m}")),
    }
}

/// A replication protocol error as a caudal error: a broken connection is
/// [`ErrorKind::Connect`] (the reader reconnects), anything else stops.
pub fn replication_error(source: &str, what: &str, e: &pg_walstream::ReplicationError) -> Error {
    let text = e.to_string();
    let busy = text.contains("is active for PID");
    let kind = if e.is_transient() || busy || text.contains("terminating connection") {
        ErrorKind::Connect
    } else if (text.contains("does not exist") && text.contains("slot"))
        || text.contains("can no longer get changes")
        || text.contains("invalidated")
    {
        ErrorKind::Resync
    } else {
        ErrorKind::Query
    };
    Error::new(kind, format!("source {source:?}: {what}: {text}"))
}

/// Writes a heartbeat to the log every `every` until `stop`.
fn spawn_heartbeat(
    pool: PgPool,
    source: String,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = sqlx::query("SELECT pg_logical_emit_message(false, $1, '')")
                .bind(HEARTBEAT_PREFIX)
                .execute(&pool)
                .await
            {
                tracing::warn!(source = %source, error = %e, "cannot write a heartbeat");
            }
        }
    })
}

struct DropGuard(tokio::task::JoinHandle<()>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
