//! The CDC reader task: reads the snapshot (if any), then streams the
//! publication's changes from the slot, and hands pages of records to the
//! pipeline.
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
use caudal_core::record::{CursorValue, Json, Position, Record, format_lsn};
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

use super::catalog::{self, Table, Types, query_error};
use super::chunk;
use crate::sources::sql::postgres::binary_value;
use crate::sources::sql::{FetchError, format_utc};

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

pub(super) use crate::sources::change::entity_key;
use crate::sources::change::{BackfillProgress, BackfillRequests, SharedLag, Stamp, update_lag};

/// The prefix of the message that asks a running pipeline for a backfill.
pub const BACKFILL_PREFIX: &str = "caudal_backfill";
/// The prefix of a backfill chunk's low and high watermarks.
const WATERMARK_PREFIX: &str = "caudal_watermark";

/// A backfill in progress.
struct Job {
    id: String,
    table: Table,
    filter: Option<String>,
    after: Option<Vec<CursorValue>>,
    rows: u64,
}

/// One chunk of a backfill, read between two watermarks in the log. Rows
/// whose key changed between them are dropped (the stream has a newer
/// state); the others are sent at the high watermark.
struct Chunk {
    seq: u64,
    low: u64,
    high: u64,
    open: bool,
    all_changed: bool,
    changed: std::collections::HashSet<String>,
    /// Entity key, key columns and row of each row read.
    rows: Vec<ChunkRow>,
    last_key: Option<Vec<CursorValue>>,
    full: bool,
}

type ChunkRow = (String, Map<String, Value>, Map<String, Value>);

/// The backfills of a reader: queued jobs and the chunk in flight.
#[derive(Default)]
pub struct Backfills {
    jobs: std::collections::VecDeque<Job>,
    chunk: Option<Chunk>,
    seq: u64,
}

/// What the snapshot phase of a run starts from.
pub struct SnapshotStart {
    /// The slot-creating connection and the snapshot it exported, kept open
    /// until the snapshot is imported.
    pub exported: Option<(std::sync::Mutex<PgReplicationConnection>, String)>,
    /// Where to resume: table index and the last key read in it.
    pub resume: Option<(usize, Vec<CursorValue>)>,
    /// The LSN the snapshot is consistent with (stamped on its rows).
    pub lsn: u64,
}

impl std::fmt::Debug for SnapshotStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStart")
            .field("resume", &self.resume)
            .field("lsn", &self.lsn)
            .finish_non_exhaustive()
    }
}

/// Everything the task needs.
pub struct Task {
    pub source: String,
    pub pool: PgPool,
    pub conninfo: String,
    pub slot: String,
    pub publication: String,
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

/// A relation (table) as the stream described it last.
struct Relation {
    table: String,
    columns: Vec<(String, u32)>,
    types: Vec<Arc<PgTypeInfo>>,
    key: Vec<String>,
    /// The replica identity columns (what an old key tuple carries).
    identity: Vec<String>,
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

    async fn snapshot(&mut self, start: SnapshotStart) -> Result<()> {
        let source = self.source.clone();
        let mut txn = self
            .pool
            .begin()
            .await
            .map_err(|e| query_error(&source, "cannot start the snapshot transaction", e))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *txn)
            .await
            .map_err(|e| query_error(&source, "cannot start the snapshot transaction", e))?;
        if let Some((conn, name)) = start.exported {
            if !name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("unexpected snapshot name {name:?}"),
                ));
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET TRANSACTION SNAPSHOT '{name}'"
            )))
            .execute(&mut *txn)
            .await
            .map_err(|e| query_error(&source, "cannot import the slot's snapshot", e))?;
            // Imported: the slot's connection may go.
            drop(conn);
        } else {
            tracing::info!(source = %source, "reading the snapshot at the current state: changes since the slot's start follow from the stream");
        }
        let (first_table, mut after) = match start.resume {
            Some((t, key)) => (t, Some(key)),
            None => (0, None),
        };
        let tables = self.tables.clone();
        for (ti, table) in tables.iter().enumerate().skip(first_table) {
            if ti != first_table {
                after = None;
            }
            loop {
                let (rows, full) = chunk::read(
                    &mut *txn,
                    &source,
                    table,
                    None,
                    after.as_deref(),
                    self.page_size,
                    self.decimals,
                )
                .await?;
                let meta = Meta {
                    lsn: start.lsn,
                    xid: None,
                    time: None,
                    index: None,
                };
                let mut page = Vec::with_capacity(rows.len());
                for row in rows {
                    page.push(Record {
                        data: change(
                            "read",
                            &table.name,
                            row.key,
                            None,
                            Some(row.data),
                            Vec::new(),
                            &meta,
                        ),
                        position: Position::Snapshot {
                            lsn: start.lsn,
                            table: table.name.clone(),
                            key: row.values.clone(),
                        },
                        key: Some(row.entity),
                    });
                    after = Some(row.values);
                }
                let n = page.len() as u64;
                update_lag(&self.lag, |l| l.snapshot_rows += n);
                self.send(page).await?;
                if !full {
                    break;
                }
            }
        }
        txn.commit()
            .await
            .map_err(|e| query_error(&source, "cannot end the snapshot transaction", e))?;
        // Once this marker is durable, a restart streams on instead of
        // reading the snapshot's last table again.
        self.send(vec![Record {
            data: Json::from_map(&Map::new()),
            position: Position::SnapshotDone { lsn: start.lsn },
            key: None,
        }])
        .await?;
        tracing::info!(source = %source, "snapshot read; streaming changes");
        Ok(())
    }

    // ---- streaming ----

    async fn stream(&mut self) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        let mut stop_at: Option<u64> = None;
        loop {
            let start = self
                .from
                .map_or(self.stream_from, |(lsn, _)| lsn.max(self.stream_from));
            self.streamed = false;
            match self.stream_once(start, &mut stop_at).await {
                Ok(Ended::Done) => return Ok(()),
                // A temporary failure (a broken connection, a busy slot).
                Err(e) if e.kind().decision() == Decision::Retry => {
                    if self.streamed {
                        backoff = Duration::from_secs(1);
                    }
                    self.set_phase("reconnecting");
                    tracing::warn!(source = %self.source, error = %e.report(), retry_in_s = backoff.as_secs(), "replication connection lost; reconnecting from the last change read");
                    tokio::select! {
                        () = self.stop.cancelled() => return Err(cancelled()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                // The server's words suggested the slot is gone: only the
                // catalog may say so, else it is an ordinary failure.
                Err(e) if e.kind() == ErrorKind::Resync => match self.check_slot().await {
                    Ok(()) => {
                        return Err(Error::new(ErrorKind::Query, e.to_string()));
                    }
                    Err(gone) => return Err(gone),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks the slot before streaming from it.
    async fn check_slot(&self) -> Result<()> {
        match catalog::slot(&self.pool, &self.source, &self.slot).await? {
            None => Err(Error::new(
                ErrorKind::Resync,
                format!(
                    "source {:?}: replication slot {:?} does not exist any more (dropped outside \
                     caudal?); changes made since it went are lost to it, so caudal stops rather \
                     than skip them. `caudal resync PIPELINE` reads the tables again and streams \
                     from a new slot",
                    self.source, self.slot
                ),
            )),
            Some(s) if s.wal_status.as_deref() == Some("lost") => Err(Error::new(
                ErrorKind::Resync,
                format!(
                    "source {:?}: replication slot {:?} was invalidated by the server (its WAL \
                     was removed, see max_slot_wal_keep_size); changes since its position are \
                     lost. `caudal resync PIPELINE` reads the tables again and streams from a new slot",
                    self.source, self.slot
                ),
            )),
            Some(s) if s.plugin.as_deref() != Some("pgoutput") => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {:?}: replication slot {:?} uses plugin {:?}; caudal needs a pgoutput slot \
                     (choose another `slot` name)",
                    self.source,
                    self.slot,
                    s.plugin.unwrap_or_default()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    async fn stream_once(&mut self, start: u64, stop_at: &mut Option<u64>) -> Result<Ended> {
        self.check_slot().await?;
        let conninfo = self.conninfo.clone();
        let slot = self.slot.clone();
        let publication = format!("\"{}\"", self.publication);
        let mut conn = tokio::task::spawn_blocking(move || {
            let mut conn = PgReplicationConnection::connect(&conninfo)?;
            conn.start_replication(
                &slot,
                start,
                &[
                    ("proto_version", "1"),
                    ("publication_names", publication.as_str()),
                    ("binary", "true"),
                    ("messages", "true"),
                ],
            )?;
            Ok::<_, pg_walstream::ReplicationError>(conn)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "the connect task failed", e))?
        .map_err(|e| replication_error(&self.source, "cannot start streaming", &e))?;
        self.set_phase("streaming");
        tracing::info!(source = %self.source, slot = %self.slot, from = %format_lsn(start), "streaming changes");

        if !self.follow && stop_at.is_none() {
            let (lsn,): (String,) =
                sqlx::query_as("SELECT pg_logical_emit_message(false, $1, $2)::text")
                    .bind(STOP_PREFIX)
                    .bind(&self.slot)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| {
                        query_error(&self.source, "cannot mark the end of a bounded read", e)
                    })?;
            *stop_at = caudal_core::record::parse_lsn(&lsn);
        }
        let heartbeat = match (self.follow, self.heartbeat) {
            (true, Some(every)) if !every.is_zero() => Some(spawn_heartbeat(
                self.pool.clone(),
                self.source.clone(),
                every,
                self.stop.child_token(),
            )),
            _ => None,
        };
        let _heartbeat = heartbeat.map(DropGuard);

        let mut s = Session {
            parser: LogicalReplicationParser::with_protocol_version(1),
            relations: HashMap::new(),
            types: Types::default(),
            txn: None,
            received: start,
            idle: None,
            confirmed: 0,
        };
        let mut tick = tokio::time::interval(FEEDBACK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let never = CancellationToken::new();
        let mut last_data = std::time::Instant::now();
        loop {
            enum Step {
                Stop,
                Tick,
                Data(pg_walstream::Result<bytes::Bytes>),
            }
            let step = tokio::select! {
                biased;
                () = self.stop.cancelled() => Step::Stop,
                _ = tick.tick() => Step::Tick,
                data = conn.get_copy_data_async(&never) => Step::Data(data),
            };
            match step {
                Step::Stop => {
                    self.feedback(&mut conn, &mut s).await?;
                    return Err(cancelled());
                }
                Step::Tick => {
                    // The server sends keepalives well within this: a silent
                    // connection is a cut one TCP has not noticed yet.
                    if last_data.elapsed() > SILENCE_LIMIT {
                        return Err(Error::new(
                            ErrorKind::Connect,
                            format!(
                                "source {:?}: nothing from the server for {}s",
                                self.source,
                                SILENCE_LIMIT.as_secs()
                            ),
                        ));
                    }
                    self.flush_page(&mut conn, &mut s, &mut tick).await?;
                    self.feedback(&mut conn, &mut s).await?;
                }
                Step::Data(Err(e)) => {
                    return Err(replication_error(&self.source, "streaming failed", &e));
                }
                Step::Data(Ok(data)) => {
                    last_data = std::time::Instant::now();
                    self.streamed = true;
                    match data.first() {
                        Some(b'w') if data.len() >= 25 => {
                            let wal_end = u64::from_be_bytes(slice8(&data[9..17]));
                            s.received = s.received.max(wal_end);
                            let msg = s.parser.parse_wal_message(&data[25..]).map_err(|e| {
                                replication_error(&self.source, "cannot decode a change", &e)
                            })?;
                            if self
                                .handle(&mut conn, &mut s, &mut tick, msg.message, *stop_at)
                                .await?
                            {
                                return self.finish(&mut conn, &mut s).await;
                            }
                        }
                        Some(b'k') => {
                            let k = parse_keepalive_message(&data).map_err(|e| {
                                replication_error(&self.source, "bad keepalive", &e)
                            })?;
                            s.received = s.received.max(k.wal_end);
                            if s.txn.is_none() {
                                s.idle = Some(k.wal_end);
                                if self.page.is_empty() {
                                    self.caught_up(k.wal_end);
                                }
                            }
                            if k.reply_requested {
                                self.feedback(&mut conn, &mut s).await?;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Changes handed on at once while streaming: at most a typical batch,
    /// so a large transaction holds a few pages in memory, not a few
    /// snapshot chunks.
    fn stream_page(&self) -> usize {
        self.page_size.min(STREAM_PAGE)
    }

    fn caught_up(&self, server: u64) {
        update_lag(&self.lag, |l| {
            l.lag_seconds = Some(0.0);
            if let Some(slot) = super::slot_figures(l) {
                slot.server_lsn = Some(format_lsn(server));
            }
        });
    }

    /// Handles one message; true when a bounded read reached its end.
    async fn handle(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        msg: LogicalReplicationMessage,
        stop_at: Option<u64>,
    ) -> Result<bool> {
        match msg {
            LogicalReplicationMessage::Begin {
                final_lsn,
                timestamp,
                xid,
            } => {
                s.txn = Some(Txn {
                    lsn: final_lsn,
                    xid,
                    time: pg_time(timestamp),
                    index: 0,
                });
            }
            LogicalReplicationMessage::Commit { .. } => {
                if let Some(t) = s.txn.take() {
                    update_lag(&self.lag, |l| {
                        l.lag_seconds = commit_age(&t.time);
                        l.last_commit_time = Some(t.time);
                    });
                }
                if self.page.len() >= self.stream_page() {
                    self.flush_page(conn, s, tick).await?;
                } else if !self.page.is_empty()
                    && let Ok(permit) = self.out.try_reserve()
                {
                    // A committed transaction goes on at once when the
                    // pipeline has room (its batching decides how long to
                    // wait); under backpressure pages fill up instead.
                    permit.send(Ok(std::mem::take(&mut self.page)));
                }
            }
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                tracing::debug!(source = %self.source, relation = %format!("{namespace}.{relation_name}"), "relation described");
                let oids: Vec<u32> = columns.iter().map(|c| c.type_id).collect();
                let types = s.types.resolve(&self.pool, &self.source, &oids).await?;
                let key = catalog::primary_key(&self.pool, &self.source, relation_id)
                    .await?
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>();
                let key = if key.is_empty() {
                    // No primary key (yet): the replica identity columns.
                    columns
                        .iter()
                        .filter(|c| c.is_key())
                        .map(|c| c.name.to_string())
                        .collect()
                } else {
                    key
                };
                let identity = columns
                    .iter()
                    .filter(|c| c.is_key())
                    .map(|c| c.name.to_string())
                    .collect();
                s.relations.insert(
                    relation_id,
                    Relation {
                        identity,
                        table: format!("{namespace}.{relation_name}"),
                        columns: columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_id))
                            .collect(),
                        types,
                        key,
                    },
                );
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                let rel = self.relation(s, relation_id)?;
                let (after, unchanged) = self.tuple(rel, &tuple)?;
                let key = key_of(rel, &after);
                let table = rel.table.clone();
                self.push(
                    s,
                    tick,
                    conn,
                    "insert",
                    table,
                    key,
                    None,
                    Some(after),
                    unchanged,
                )
                .await?;
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => {
                let rel = self.relation(s, relation_id)?;
                let before = match &old_tuple {
                    Some(t) => Some(self.old(rel, t, key_type == Some('K'))?),
                    None => None,
                };
                let (mut after, mut unchanged) = self.tuple(rel, &new_tuple)?;
                // With REPLICA IDENTITY FULL the old row holds the values
                // PostgreSQL left out of the new one: the new row is whole.
                if key_type == Some('O')
                    && let Some(old) = &before
                {
                    unchanged.retain(|col| match old.get(col) {
                        Some(v) => {
                            after.insert(col.clone(), v.clone());
                            false
                        }
                        None => true,
                    });
                }
                let key = key_of(rel, &after);
                let table = rel.table.clone();
                // A new primary key is a new entity: the change is sent as
                // a delete of the old key and an insert of the new one, so
                // per-key order (and backfills) hold for both keys. (When
                // TOAST values were left unsent the new row is not whole:
                // it stays an update whose `before` has the old key.)
                let old_key = before
                    .as_ref()
                    .filter(|_| key_type.is_some() && unchanged.is_empty())
                    .map(|b| key_of(rel, b))
                    .filter(|old| *old != key);
                if let Some(old_key) = old_key {
                    self.push(
                        s,
                        tick,
                        conn,
                        "delete",
                        table.clone(),
                        old_key,
                        before,
                        None,
                        Vec::new(),
                    )
                    .await?;
                    self.push(
                        s,
                        tick,
                        conn,
                        "insert",
                        table,
                        key,
                        None,
                        Some(after),
                        unchanged,
                    )
                    .await?;
                    return Ok(false);
                }
                self.push(
                    s,
                    tick,
                    conn,
                    "update",
                    table,
                    key,
                    before,
                    Some(after),
                    unchanged,
                )
                .await?;
            }
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => {
                let rel = self.relation(s, relation_id)?;
                let before = self.old(rel, &old_tuple, key_type == 'K')?;
                let key = key_of(rel, &before);
                let table = rel.table.clone();
                self.push(
                    s,
                    tick,
                    conn,
                    "delete",
                    table,
                    key,
                    Some(before),
                    None,
                    Vec::new(),
                )
                .await?;
            }
            LogicalReplicationMessage::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    let table = self.relation(s, id)?.table.clone();
                    self.push(
                        s,
                        tick,
                        conn,
                        "truncate",
                        table,
                        Map::new(),
                        None,
                        None,
                        Vec::new(),
                    )
                    .await?;
                }
            }
            LogicalReplicationMessage::Message {
                lsn,
                prefix,
                content,
                ..
            } => {
                if s.txn.is_none() {
                    s.idle = Some(lsn);
                }
                if prefix == BACKFILL_PREFIX {
                    self.backfill_requested(&content).await?;
                } else if prefix == WATERMARK_PREFIX {
                    self.watermark(s, tick, conn, &content, lsn).await?;
                }
                if prefix == STOP_PREFIX && stop_at.is_some_and(|stop| lsn >= stop) {
                    return Ok(true);
                }
            }
            _ => {}
        }
        Ok(false)
    }

    fn backfill_progress(&self, update: impl FnOnce(&mut BackfillProgress)) {
        update_lag(&self.lag, |l| {
            if let Some(p) = l.backfill.as_mut() {
                update(p);
            }
        });
    }

    /// A backfill request seen in the log: `{"slot": …, "id": …}`. Only a
    /// streaming daemon takes them, and only with a request of that id in
    /// caudal's state.
    async fn backfill_requested(&mut self, content: &[u8]) -> Result<()> {
        let (Some(requests), true) = (self.requests.clone(), self.follow) else {
            return Ok(());
        };
        let Ok(msg) = serde_json::from_slice::<Value>(content) else {
            return Ok(());
        };
        if msg["slot"] != self.slot.as_str() {
            return Ok(());
        }
        let Some(id) = msg["id"].as_str().map(str::to_string) else {
            return Ok(());
        };
        let Some(request) = requests.get(&id).await else {
            tracing::warn!(source = %self.source, id, "a backfill was requested in the log but caudal has no such request; ignored");
            return Ok(());
        };
        update_lag(&self.lag, |l| {
            l.backfill = Some(BackfillProgress {
                id: id.clone(),
                table: request.table.clone(),
                ..BackfillProgress::default()
            });
        });
        match catalog::table(&self.pool, &self.source, &request.table).await {
            Ok(table) => {
                tracing::info!(source = %self.source, table = %table.name, filter = ?request.filter, "backfill started");
                self.backfills.jobs.push_back(Job {
                    id,
                    table,
                    filter: request.filter,
                    after: None,
                    rows: 0,
                });
                if self.backfills.chunk.is_none() {
                    self.next_chunk().await;
                }
            }
            Err(e) => self.backfill_progress(|p| {
                p.error = Some(e.report());
                p.done = true;
            }),
        }
        Ok(())
    }

    /// Reads the next chunk of the first job between two watermarks. A
    /// query error ends that job (reported), never the stream.
    async fn next_chunk(&mut self) {
        while let Some(job) = self.backfills.jobs.front() {
            self.backfills.seq += 1;
            let seq = self.backfills.seq;
            match self.read_chunk(job, seq).await {
                Ok(chunk) => {
                    self.backfills.chunk = Some(chunk);
                    return;
                }
                Err(e) => {
                    tracing::error!(source = %self.source, error = %e.report(), "backfill failed");
                    self.backfill_progress(|p| {
                        p.error = Some(e.report());
                        p.done = true;
                    });
                    self.backfills.jobs.pop_front();
                }
            }
        }
    }

    async fn read_chunk(&self, job: &Job, seq: u64) -> Result<Chunk> {
        let emit = |mark: &'static str| {
            let pool = self.pool.clone();
            let content = format!("{}:{seq}:{mark}", job.id);
            async move {
                sqlx::query_as::<_, (String,)>(
                    "SELECT pg_logical_emit_message(false, $1, $2)::text",
                )
                .bind(WATERMARK_PREFIX)
                .bind(content)
                .fetch_one(&pool)
                .await
            }
        };
        let source = &self.source;
        let low = emit("low")
            .await
            .map_err(|e| query_error(source, "cannot write a backfill watermark", e))?;
        let (rows, full) = chunk::read(
            &self.pool,
            source,
            &job.table,
            job.filter.as_deref(),
            job.after.as_deref(),
            self.page_size,
            self.decimals,
        )
        .await?;
        let last_key = rows.last().map(|r| r.values.clone());
        let out: Vec<ChunkRow> = rows
            .into_iter()
            .map(|r| (r.entity, r.key, r.data))
            .collect();
        let high = emit("high")
            .await
            .map_err(|e| query_error(source, "cannot write a backfill watermark", e))?;
        let lsn = |t: &(String,)| caudal_core::record::parse_lsn(&t.0).unwrap_or(0);
        Ok(Chunk {
            seq,
            low: lsn(&low),
            high: lsn(&high),
            open: false,
            all_changed: false,
            changed: std::collections::HashSet::new(),
            rows: out,
            last_key,
            full,
        })
    }

    /// A watermark in the log: the low one opens the chunk's window, the
    /// high one closes it and sends the rows not changed inside it.
    async fn watermark(
        &mut self,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        conn: &mut PgReplicationConnection,
        content: &[u8],
        lsn: u64,
    ) -> Result<()> {
        let text = String::from_utf8_lossy(content).into_owned();
        let Some((job_id, table)) = self
            .backfills
            .jobs
            .front()
            .map(|j| (j.id.clone(), j.table.name.clone()))
        else {
            return Ok(());
        };
        let Some(chunk) = self.backfills.chunk.as_mut() else {
            return Ok(());
        };
        if text == format!("{job_id}:{}:low", chunk.seq) && lsn == chunk.low {
            chunk.open = true;
            return Ok(());
        }
        if text != format!("{job_id}:{}:high", chunk.seq) || lsn != chunk.high {
            return Ok(());
        }
        let Some(chunk) = self.backfills.chunk.take() else {
            return Ok(());
        };
        let mut sent = 0;
        // A message's LSN is the end of its record, where the next record
        // (a commit, say) may start: the rows go just before it, so they
        // never share a position with a transaction.
        let at = lsn - 1;
        for (i, (record_key, key, data)) in chunk.rows.into_iter().enumerate() {
            if chunk.all_changed || chunk.changed.contains(&record_key) {
                continue;
            }
            let position = (at, i as u64);
            if self.from.is_some_and(|from| position <= from) {
                continue;
            }
            let meta = Meta {
                lsn: at,
                xid: None,
                time: None,
                index: None,
            };
            self.page.push(Record {
                data: change("read", &table, key, None, Some(data), Vec::new(), &meta),
                position: Position::Lsn {
                    lsn: position.0,
                    index: position.1,
                },
                key: Some(record_key),
            });
            self.from = Some(position);
            sent += 1;
        }
        if self.page.len() >= self.stream_page() {
            self.flush_page(conn, s, tick).await?;
        }
        let done = !chunk.full;
        if let Some(job) = self.backfills.jobs.front_mut() {
            job.rows += sent;
            job.after = chunk.last_key;
            let rows = job.rows;
            self.backfill_progress(|p| {
                p.rows = rows;
                p.done = done;
            });
        }
        if done && let Some(job) = self.backfills.jobs.pop_front() {
            tracing::info!(source = %self.source, table = %job.table.name, rows = job.rows, "backfill done");
        }
        self.next_chunk().await;
        Ok(())
    }

    fn relation<'a>(&self, s: &'a Session, id: u32) -> Result<&'a Relation> {
        s.relations.get(&id).ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a change refers to relation {id}, which the stream never described",
                    self.source
                ),
            )
        })
    }

    /// The old row of an update or delete. With the default replica
    /// identity PostgreSQL sends only the key columns (the others as NULL,
    /// which they are not): `before` then holds the key columns only.
    fn old(&self, rel: &Relation, tuple: &TupleData, key_only: bool) -> Result<Map<String, Value>> {
        let (mut row, _) = self.tuple(rel, tuple)?;
        if key_only {
            row.retain(|k, _| rel.identity.contains(k));
        }
        Ok(row)
    }

    /// A tuple as a row object, and the columns left out as unchanged
    /// TOAST values.
    fn tuple(
        &self,
        rel: &Relation,
        tuple: &TupleData,
    ) -> Result<(Map<String, Value>, Vec<String>)> {
        let mut row = Map::with_capacity(rel.columns.len());
        let mut unchanged = Vec::new();
        for (i, ((name, _), ty)) in rel.columns.iter().zip(&rel.types).enumerate() {
            let Some(col) = tuple.get_column(i) else {
                break;
            };
            let value = column_value(col, ty, self.decimals).map_err(|e| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "source {:?}: table {}, column {name:?} of type {}: {e}",
                        self.source,
                        rel.table,
                        sqlx::TypeInfo::name(ty.as_ref())
                    ),
                )
            })?;
            match value {
                Some(v) => {
                    row.insert(name.clone(), v);
                }
                None => unchanged.push(name.clone()),
            }
        }
        Ok((row, unchanged))
    }

    #[allow(clippy::too_many_arguments)]
    async fn push(
        &mut self,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        conn: &mut PgReplicationConnection,
        op: &'static str,
        table: String,
        key: Map<String, Value>,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
        unchanged: Vec<String>,
    ) -> Result<()> {
        let Some(txn) = s.txn.as_mut() else {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a change arrived outside a transaction",
                    self.source
                ),
            ));
        };
        let index = txn.index;
        txn.index += 1;
        let position = (txn.lsn, index);
        if self.from.is_some_and(|from| position <= from) {
            return Ok(());
        }
        let meta = Meta {
            lsn: txn.lsn,
            xid: Some(txn.xid),
            time: Some(txn.time.clone()),
            index: Some(index),
        };
        let record_key = if key.is_empty() {
            table.clone()
        } else {
            entity_key(&table, &key)
        };
        if let Some(chunk) = self.backfills.chunk.as_mut()
            && chunk.open
            && self
                .backfills
                .jobs
                .front()
                .is_some_and(|j| j.table.name == table)
        {
            if key.is_empty() {
                chunk.all_changed = true;
            } else {
                chunk.changed.insert(record_key.clone());
            }
        }
        self.page.push(Record {
            data: change(op, &table, key, before, after, unchanged, &meta),
            position: Position::Lsn {
                lsn: position.0,
                index: position.1,
            },
            key: Some(record_key),
        });
        self.from = Some(position);
        if self.page.len() >= self.stream_page() {
            self.flush_page(conn, s, tick).await?;
        }
        Ok(())
    }

    /// Hands the page to the pipeline; while it waits (backpressure), keeps
    /// sending status updates so the server does not time out.
    async fn flush_page(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
    ) -> Result<()> {
        if self.page.is_empty() {
            return Ok(());
        }
        let permit = loop {
            tokio::select! {
                () = self.stop.cancelled() => return Err(cancelled()),
                permit = self.out.reserve() => break permit.map_err(|_| cancelled())?,
                _ = tick.tick() => self.feedback(conn, s).await?,
            }
        };
        tracing::debug!(source = %self.source, records = self.page.len(), upto = ?self.from, "page handed over");
        permit.send(Ok(std::mem::take(&mut self.page)));
        Ok(())
    }

    /// The LSN the slot may be confirmed to now.
    fn confirmable(&self, s: &Session) -> u64 {
        let durable = self.durable.borrow().clone();
        let durable_at = match &durable {
            Some(Position::Lsn { lsn, index }) => Some((*lsn, *index)),
            _ => None,
        };
        let mut flush = match &durable {
            Some(
                Position::Lsn { lsn, .. }
                | Position::Snapshot { lsn, .. }
                | Position::SnapshotDone { lsn },
            ) => *lsn,
            _ => 0,
        };
        // An idle point may be confirmed once every change read before it
        // is durable: changes read after it commit later.
        if let Some(at) = s.idle
            && self.page.is_empty()
            && durable_at >= self.from
        {
            flush = flush.max(at);
        }
        flush
    }

    async fn feedback(&self, conn: &mut PgReplicationConnection, s: &mut Session) -> Result<()> {
        let flush = self.confirmable(s).min(s.received.max(1));
        conn.send_standby_status_update(s.received, flush, flush, false)
            .await
            .map_err(|e| {
                // A status update that cannot be written is a broken
                // connection, whatever the client library calls it.
                Error::new(
                    ErrorKind::Connect,
                    format!("source {:?}: cannot send a status update: {e}", self.source),
                )
            })?;
        s.confirmed = s.confirmed.max(flush);
        let (confirmed, received) = (s.confirmed, s.received);
        update_lag(&self.lag, |l| {
            l.lag_bytes = Some(received.saturating_sub(confirmed));
            if let Some(slot) = super::slot_figures(l) {
                slot.slot.clone_from(&self.slot);
                if confirmed > 0 {
                    slot.confirmed_lsn = Some(format_lsn(confirmed));
                }
                slot.server_lsn = Some(format_lsn(received));
            }
        });
        Ok(())
    }

    /// Ends a bounded read: hands the last page over, waits (briefly) for
    /// it to be durable and confirms it.
    async fn finish(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
    ) -> Result<Ended> {
        if !self.page.is_empty() {
            let page = std::mem::take(&mut self.page);
            self.send(page).await?;
        }
        // Closing the channel ends the run's reading.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.out, closed));
        let want = self.from;
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            let durable = match &*self.durable.borrow() {
                Some(Position::Lsn { lsn, index }) => Some((*lsn, *index)),
                _ => None,
            };
            if durable >= want {
                break;
            }
            // The reader handle is dropped as soon as reading ends, before
            // the last batch is durable: wait for the pipeline instead,
            // until it reports or lets go of the durable handle.
            tokio::select! {
                () = &mut deadline => break,
                changed = self.durable.changed() => if changed.is_err() { break },
            }
        }
        self.feedback(conn, s).await?;
        Ok(Ended::Done)
    }
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

/// Transaction metadata of a record.
struct Meta {
    lsn: u64,
    xid: Option<u32>,
    time: Option<String>,
    index: Option<u64>,
}

/// The record of one change (or snapshot row).
fn change(
    op: &'static str,
    table: &str,
    key: Map<String, Value>,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    unchanged: Vec<String>,
    meta: &Meta,
) -> Json {
    let change = crate::sources::change::Change {
        op,
        table: table.to_string(),
        key,
        before,
        after,
        unchanged,
    };
    change.encode(&Stamp {
        fields: [
            ("lsn", Value::String(format_lsn(meta.lsn))),
            ("xid", meta.xid.map_or(Value::Null, Value::from)),
        ],
        commit_time: meta.time.as_deref(),
        index: meta.index,
    })
}

fn key_of(rel: &Relation, row: &Map<String, Value>) -> Map<String, Value> {
    rel.key
        .iter()
        .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// One column of a tuple: `None` for an unchanged TOAST value.
fn column_value(
    col: &ColumnData,
    ty: &PgTypeInfo,
    decimals: DecimalFormat,
) -> std::result::Result<Option<Value>, String> {
    if col.is_unchanged() {
        return Ok(None);
    }
    if col.is_null() {
        return Ok(Some(Value::Null));
    }
    if col.is_binary() {
        return binary_value(ty, col.as_bytes(), decimals).map(Some);
    }
    std::str::from_utf8(col.as_bytes())
        .map(|s| Some(Value::String(s.to_string())))
        .map_err(|e| format!("invalid UTF-8: {e}"))
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
