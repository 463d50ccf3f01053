//! The binlog CDC reader task: reads the snapshot (if any), then streams
//! the binary log as a replica and hands pages of records to the pipeline.
//!
//! Promises:
//! - A change's position is the file and offset where its transaction
//!   starts, and its index in the transaction. A run resumes from the
//!   durable position: it asks the server for the log from that
//!   transaction's start and drops the changes at or before the durable
//!   index, so nothing is skipped and nothing replayed.
//! - The snapshot is read in one `START TRANSACTION WITH CONSISTENT
//!   SNAPSHOT`, whose binary log position the server reports
//!   (`binlog_snapshot_file`, `binlog_snapshot_position`); streaming starts
//!   exactly there.
//! - While the captured tables are idle, a marker position (never sent)
//!   moves the checkpoint on every heartbeat, so a restart does not read
//!   the other tables' changes again.
//! - A broken connection (server restart, `KILL` of the dump thread)
//!   reconnects with backoff, keeping what was read but not handed over; a
//!   position whose file the server purged stops with
//!   [`ErrorKind::Resync`].
//! - A backfill chunk is read in its own consistent snapshot and placed in
//!   the stream at that snapshot's position: it is exact there, and every
//!   change after it follows it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_core::config::DecimalFormat;
use caudal_core::error::Decision;
use caudal_core::record::{CursorValue, Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use futures::StreamExt;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event, EventData, QueryEvent, RotateEvent, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest};
use serde_json::{Map, Value};
use sqlx::MySqlPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::catalog::{self, Facts, Table, query_error};
use super::chunk;
use super::decode::{self, Shape};
use crate::sources::change::{
    BackfillProgress, BackfillRequest, BackfillRequests, SharedLag, Stamp, entity_key, update_lag,
};
use caudal_core::record::Json;

/// Most changes handed on at once while streaming.
const STREAM_PAGE: usize = 1000;
/// A connection silent this long is taken for cut (heartbeats come every
/// `heartbeat`, 10s by default).
const SILENCE_LIMIT: Duration = Duration::from_secs(120);
/// Failures in a row at one position (each after a successful connect)
/// that make a broken connection a fault of the log instead.
const FAILURES_AT_ONE_POSITION: u32 = 8;
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often saved backfill requests are looked for.
const BACKFILL_POLL: Duration = Duration::from_secs(1);
/// MariaDB's GTID event.
const MARIADB_GTID_EVENT: u8 = 0xa2;
/// `FL_STANDALONE`: a GTID event of a transaction without BEGIN/COMMIT.
const GTID_STANDALONE: u8 = 1;
/// `FL_PREPARED_XA`: a GTID event opening an XA transaction's PREPARE.
const GTID_PREPARED_XA: u8 = 0x40;
/// Why an XA transaction on a captured table stops the pipeline.
const XA_UNSUPPORTED: &str = "an XA transaction changed a captured table; caudal reads XA \
                              transactions at their PREPARE and cannot tell a later rollback, \
                              so it stops";
/// MariaDB's compressed query and row events (`log_bin_compress`).
const MARIADB_COMPRESSED: std::ops::RangeInclusive<u8> = 0xa5..=0xab;

/// Where a run starts.
pub enum Start {
    /// Read the tables first; `resume` continues a snapshot that stopped
    /// in table `.0` after key `.1`, consistent with `.2`:`.3`.
    Snapshot {
        resume: Option<(usize, Vec<CursorValue>, String, u64)>,
    },
    /// Stream from `file`:`pos` (a transaction's start), dropping the
    /// changes of that transaction with index at or below `skip`.
    At {
        file: String,
        pos: u64,
        skip: Option<u64>,
    },
    /// Stream from the end of the log as it is now.
    EndOfLog,
}

pub struct Task {
    pub source: String,
    pub pipeline: String,
    pub pool: MySqlPool,
    pub opts: mysql_async::Opts,
    pub server_id: u32,
    pub tables: Vec<Table>,
    pub decimals: DecimalFormat,
    pub page_size: usize,
    pub heartbeat: Option<Duration>,
    pub follow: bool,
    pub start: Option<Start>,
    pub out: mpsc::Sender<Result<Vec<Record>>>,
    pub lag: SharedLag,
    pub stop: CancellationToken,
    pub requests: Option<std::sync::Arc<dyn BackfillRequests>>,
}

/// An open transaction of the stream.
#[derive(Clone, Debug)]
struct Txn {
    file: String,
    pos: u64,
    gtid: Option<String>,
    time: Option<String>,
    index: u64,
    /// A DDL statement: it ends with its one event.
    standalone: bool,
    /// A captured table's change was read in it.
    captured: bool,
    /// The PREPARE of an XA transaction.
    xa: bool,
}

/// Where the stream is and what it knows.
struct Stream {
    /// The file being read.
    file: String,
    /// The offset after the last event read: a transaction boundary when
    /// `txn` is `None`.
    next: u64,
    txn: Option<Txn>,
    /// The first this many changes of the transaction at (file, pos) were
    /// read before (durable before the run began, or read before a
    /// reconnect).
    skip: Option<(String, u64, u64)>,
    /// Table shapes by table id (`None`: a table caudal does not capture).
    shapes: HashMap<u64, Option<Arc<Shape>>>,
    /// Catalog facts per table, read once per shape change.
    facts: HashMap<String, Facts>,
    /// The position of the last record put in the page (or marker).
    emitted: Option<(String, u64)>,
    last_mark: Instant,
    page: Vec<Record>,
    /// A bounded read ends here: the end of the log when it started
    /// streaming.
    stop_at: Option<(String, u64)>,
}

/// A backfill chunk read but not yet placed in the stream.
struct Chunk {
    file: String,
    pos: u64,
    rows: Vec<chunk::Row>,
    full: bool,
}

/// A backfill in progress.
struct Job {
    id: String,
    request: BackfillRequest,
    table: Table,
    after: Option<Vec<CursorValue>>,
    rows: u64,
}

#[derive(Default)]
struct Backfills {
    seen: HashSet<String>,
    jobs: VecDeque<Job>,
    chunk: Option<Chunk>,
    polled: Option<Instant>,
}

enum Ended {
    /// A bounded read reached the end of the log.
    Done,
    Stopped,
}

impl Task {
    pub async fn run(mut self) {
        if let Err(e) = self.go().await {
            let _ = self.out.send(Err(e)).await;
        }
    }

    async fn go(&mut self) -> Result<()> {
        let mut stream = Stream {
            file: String::new(),
            next: 4,
            txn: None,
            skip: None,
            shapes: HashMap::new(),
            facts: HashMap::new(),
            emitted: None,
            last_mark: Instant::now(),
            page: Vec::new(),
            stop_at: None,
        };
        match self.start.take() {
            Some(Start::Snapshot { resume }) => {
                let (file, pos) = self.snapshot(resume).await?;
                stream.file = file;
                stream.next = pos;
            }
            Some(Start::At { file, pos, skip }) => {
                stream.skip = skip.map(|i| (file.clone(), pos, i + 1));
                // Not a place for an idle marker: part of that transaction
                // is durable.
                stream.emitted = Some((file.clone(), pos));
                stream.file = file;
                stream.next = pos;
            }
            Some(Start::EndOfLog) | None => {
                let (file, pos) = catalog::end_of_log(&self.pool, &self.source).await?;
                tracing::info!(source = %self.source, position = %format!("{file}:{pos}"), "streaming from the end of the binary log (snapshot = \"never\")");
                // Saved as the checkpoint, so a restart before any change
                // still starts here.
                let marker = resume_marker(&file, pos);
                stream.emitted = Some((file.clone(), pos));
                if self.out.send(Ok(vec![marker])).await.is_err() {
                    return Ok(());
                }
                stream.file = file;
                stream.next = pos;
            }
        }
        if !self.follow {
            stream.stop_at = Some(catalog::end_of_log(&self.pool, &self.source).await?);
        }
        self.stream(stream).await
    }

    /// Reads every table in one consistent snapshot; returns the binary log
    /// position it is consistent with (where streaming starts).
    async fn snapshot(
        &mut self,
        resume: Option<(usize, Vec<CursorValue>, String, u64)>,
    ) -> Result<(String, u64)> {
        let source = self.source.clone();
        update_lag(&self.lag, |l| l.phase = Some("snapshot".into()));
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| query_error(&source, "cannot open the snapshot connection", e))?;
        let (file, pos) = consistent_snapshot(&mut conn, &source).await?;
        let (first, mut after, file, pos) = match resume {
            Some((t, key, f, p)) => {
                tracing::info!(source = %source, "resuming the snapshot at the current state: changes since its start follow from the stream");
                (t, Some(key), f, p)
            }
            None => {
                tracing::info!(source = %source, position = %format!("{file}:{pos}"), "reading the snapshot");
                (0, None, file, pos)
            }
        };
        let tables = self.tables.clone();
        for (ti, table) in tables.iter().enumerate().skip(first) {
            if ti != first {
                after = None;
            }
            loop {
                let (rows, full) = chunk::read(
                    &mut conn,
                    &source,
                    table,
                    None,
                    after.as_deref(),
                    self.page_size,
                    self.decimals,
                )
                .await?;
                let mut page = Vec::with_capacity(rows.len());
                for row in rows {
                    after = Some(row.values.clone());
                    page.push(read_record(
                        table,
                        row,
                        Position::BinlogSnapshot {
                            file: file.clone(),
                            pos,
                            table: table.name.clone(),
                            key: after.clone().unwrap_or_default(),
                        },
                        &file,
                        pos,
                    ));
                }
                let n = page.len() as u64;
                if !page.is_empty() && self.out.send(Ok(page)).await.is_err() {
                    return Ok((file, pos));
                }
                update_lag(&self.lag, |l| l.snapshot_rows += n);
                if !full {
                    break;
                }
            }
        }
        let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
        let _ = self.out.send(Ok(vec![resume_marker(&file, pos)])).await;
        tracing::info!(source = %source, "snapshot read; streaming the binary log");
        Ok((file, pos))
    }

    /// Streams, reconnecting after a broken connection.
    async fn stream(&mut self, mut st: Stream) -> Result<()> {
        let mut backfills = Backfills::default();
        let mut backoff = Duration::from_secs(1);
        // Failures in a row at one position, after a connection was made.
        let mut failures: (String, u64, u32) = (String::new(), 0, 0);
        loop {
            update_lag(&self.lag, |l| l.phase = Some("streaming".into()));
            let at = (st.file.clone(), st.next);
            let mut connected = false;
            match self
                .stream_once(&mut st, &mut backfills, &mut connected)
                .await
            {
                Ok(Ended::Stopped) => return Ok(()),
                Ok(Ended::Done) => {
                    self.end_marker(&mut st);
                    if !st.page.is_empty() {
                        let page = std::mem::take(&mut st.page);
                        let _ = self.out.send(Ok(page)).await;
                    }
                    return Ok(());
                }
                // A temporary failure (a broken connection, a busy slot).
                Err(e) if e.kind().decision() == Decision::Retry => {
                    if (st.file.clone(), st.next) != at || st.txn.is_some() {
                        // It read on: a fresh start for the backoff.
                        backoff = Duration::from_secs(1);
                    }
                    if connected {
                        if (failures.0.as_str(), failures.1) == (at.0.as_str(), at.1) {
                            failures.2 += 1;
                        } else {
                            failures = (at.0.clone(), at.1, 1);
                        }
                        if failures.2 >= FAILURES_AT_ONE_POSITION {
                            return Err(Error::new(
                                ErrorKind::Decode,
                                format!(
                                    "source {:?}: reading the binary log failed {} times in a row \
                                     at {}:{}: {}",
                                    self.source,
                                    failures.2,
                                    at.0,
                                    at.1,
                                    e.report()
                                ),
                            ));
                        }
                    } else if !self.follow {
                        return Err(e);
                    }
                    if st.txn.is_some() {
                        // Read that transaction again from its start; what
                        // was read of it stays in the page.
                        let t = st.txn.take().unwrap_or_else(|| unreachable_txn(&st));
                        let before = st
                            .skip
                            .as_ref()
                            .filter(|(f, p, _)| *f == t.file && *p == t.pos)
                            .map_or(0, |(_, _, n)| *n);
                        st.skip = Some((t.file.clone(), t.pos, t.index.max(before)));
                        st.emitted = Some((t.file.clone(), t.pos));
                        st.file = t.file;
                        st.next = t.pos;
                    }
                    st.shapes.clear();
                    tracing::warn!(source = %self.source, error = %e.report(), retry_in = ?backoff, "the binary log connection broke; reconnecting");
                    update_lag(&self.lag, |l| l.phase = Some("reconnecting".into()));
                    tokio::select! {
                        () = self.stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(&self, st: &Stream) -> Result<BinlogStream> {
        let mut conn = mysql_async::Conn::new(self.opts.clone())
            .await
            .map_err(|e| binlog_error(&self.source, "cannot connect to read the binary log", e))?;
        // GTID events (MariaDB sends BEGIN queries in their place otherwise).
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| binlog_error(&self.source, "cannot prepare the replica session", e))?;
        if let Some(hb) = self.heartbeat.filter(|h| !h.is_zero()) {
            conn.query_drop(format!("SET @master_heartbeat_period = {}", hb.as_nanos()))
                .await
                .map_err(|e| binlog_error(&self.source, "cannot set the heartbeat period", e))?;
        }
        let host = format!("caudal:{}", self.pipeline);
        let mut request = BinlogStreamRequest::new(self.server_id)
            .with_filename(st.file.as_bytes())
            .with_pos(st.next)
            .with_hostname(host.as_bytes());
        if !self.follow {
            request = request.with_non_blocking();
        }
        conn.get_binlog_stream(request).await.map_err(|e| {
            binlog_error(
                &self.source,
                &format!(
                    "cannot start reading the binary log at {}:{}",
                    st.file, st.next
                ),
                e,
            )
        })
    }

    async fn stream_once(
        &mut self,
        st: &mut Stream,
        backfills: &mut Backfills,
        connected: &mut bool,
    ) -> Result<Ended> {
        let mut binlog = self.connect(st).await?;
        *connected = true;
        let mut last_event = Instant::now();
        let silence = SILENCE_LIMIT.max(self.heartbeat.unwrap_or_default() * 3);
        let mut poll = tokio::time::interval(BACKFILL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut started = false;
        loop {
            if !st.page.is_empty()
                && (st.page.len() >= STREAM_PAGE || (st.txn.is_none() && self.out.capacity() > 0))
            {
                let page = std::mem::take(&mut st.page);
                if self.out.send(Ok(page)).await.is_err() {
                    return Ok(Ended::Stopped);
                }
            }
            let next = tokio::select! {
                () = self.stop.cancelled() => return Ok(Ended::Stopped),
                _ = poll.tick(), if self.follow => {
                    if last_event.elapsed() >= silence {
                        return Err(Error::new(
                            ErrorKind::Connect,
                            format!(
                                "source {:?}: nothing came from the server for {}s",
                                self.source,
                                silence.as_secs()
                            ),
                        ));
                    }
                    self.idle(st, backfills).await?;
                    continue;
                }
                next = tokio::time::timeout(silence, binlog.next()) => next,
            };
            last_event = Instant::now();
            let event = match next {
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Connect,
                        format!(
                            "source {:?}: nothing came from the server for {}s",
                            self.source,
                            silence.as_secs()
                        ),
                    ));
                }
                Ok(None) => return Ok(Ended::Done),
                Ok(Some(Err(e))) => {
                    return Err(binlog_error(
                        &self.source,
                        &format!("reading the binary log at {}:{} failed", st.file, st.next),
                        e,
                    ));
                }
                Ok(Some(Ok(event))) => event,
            };
            if !started {
                started = true;
                tracing::debug!(source = %self.source, position = %format!("{}:{}", st.file, st.next), "reading the binary log");
            }
            self.event(st, &binlog, &event).await?;
            if st.txn.is_none() {
                self.place_chunk(st, backfills);
                if let Some((file, pos)) = &st.stop_at
                    && catalog::compare((&st.file, st.next), (file, *pos))
                        != std::cmp::Ordering::Less
                {
                    return Ok(Ended::Done);
                }
            }
        }
    }

    /// Handles one event.
    async fn event(&mut self, st: &mut Stream, binlog: &BinlogStream, event: &Event) -> Result<()> {
        let header = event.header();
        let ty = header.event_type_raw();
        let end = u64::from(header.log_pos());
        let start = end.saturating_sub(u64::from(header.event_size()));
        if ty == EventType::ROTATE_EVENT as u8 {
            let rotate: RotateEvent<'_> = event.read_event().map_err(|e| self.decode(st, &e))?;
            // The rotate sent first names the file asked for; it comes
            // before the format description, so its name is read with the
            // event's checksum after it.
            // (An artificial event: its header's log position is 0.)
            let name = rotate.name_raw();
            let first = end == 0 && !st.file.is_empty() && name.starts_with(st.file.as_bytes());
            if !first {
                st.file = String::from_utf8_lossy(name).into_owned();
                st.shapes.clear();
            }
            st.next = rotate.position();
            return Ok(());
        }
        if end == 0 {
            // Artificial events (the format description sent first).
            return Ok(());
        }
        if ty == MARIADB_GTID_EVENT {
            let data = event.data();
            if data.len() >= 13 {
                let seq = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
                st.txn = Some(Txn {
                    file: st.file.clone(),
                    pos: start,
                    gtid: Some(format!("{domain}-{}-{seq}", header.server_id())),
                    time: commit_time(header.timestamp()),
                    index: 0,
                    standalone: data[12] & GTID_STANDALONE != 0,
                    captured: false,
                    xa: data[12] & GTID_PREPARED_XA != 0,
                });
                self.lag_at(header.timestamp());
            }
        } else if ty == EventType::QUERY_EVENT as u8 {
            let q: QueryEvent<'_> = event.read_event().map_err(|e| self.decode(st, &e))?;
            let text = q.query();
            let word = text
                .split(|c: char| c.is_whitespace() || c == ';')
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_ascii_uppercase();
            if word == "BEGIN" {
                if st.txn.is_none() {
                    st.txn = Some(Txn {
                        file: st.file.clone(),
                        pos: start,
                        gtid: None,
                        time: commit_time(header.timestamp()),
                        index: 0,
                        standalone: false,
                        captured: false,
                        xa: false,
                    });
                    self.lag_at(header.timestamp());
                }
            } else if word == "COMMIT" {
                st.txn = None;
            } else if word == "ROLLBACK" && !text.to_ascii_uppercase().contains(" TO ") {
                // Non-transactional changes rolled back around: the
                // transaction ends.
                st.txn = None;
            } else if matches!(word.as_str(), "SAVEPOINT" | "ROLLBACK" | "XA") {
                if word == "XA" && st.txn.as_ref().is_some_and(|t| t.captured) {
                    return Err(self.unsupported(st, XA_UNSUPPORTED));
                }
            } else if matches!(
                word.as_str(),
                "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "LOAD"
            ) {
                // A statement-based change (a session with binlog_format =
                // STATEMENT or MIXED): its rows are not in the log.
                if let Some(t) = self.mentioned(&text) {
                    return Err(self.unsupported(
                        st,
                        &format!(
                            "a change to {} was logged as a statement, not as rows (that session \
                             ran with binlog_format = STATEMENT or MIXED), and its rows cannot be \
                             read; `caudal resync` reads the tables again",
                            t.name
                        ),
                    ));
                }
            } else {
                // DDL: shapes come again with the next table maps; facts
                // (JSON, booleans) are read again from the catalog.
                st.shapes.clear();
                st.facts.clear();
                if text.to_ascii_uppercase().contains("TRUNCATE PARTITION")
                    && let Some(t) = self.mentioned(&text)
                {
                    return Err(self.unsupported(
                        st,
                        &format!(
                            "partitions of {} were truncated; the log holds the statement, not \
                             the rows it removed; `caudal resync` reads the tables again",
                            t.name
                        ),
                    ));
                }
                if let Some(table) = truncated(&text, &q.schema())
                    && self.tables.iter().any(|t| t.name == table)
                {
                    let txn = st.txn.clone().unwrap_or_else(|| Txn {
                        file: st.file.clone(),
                        pos: start,
                        gtid: None,
                        time: commit_time(header.timestamp()),
                        index: 0,
                        standalone: true,
                        captured: false,
                        xa: false,
                    });
                    self.truncate(st, txn, &table);
                }
                if st.txn.as_ref().is_some_and(|t| t.standalone) {
                    st.txn = None;
                }
            }
        } else if ty == EventType::TABLE_MAP_EVENT as u8 {
            if let Some(EventData::TableMapEvent(tme)) =
                event.read_data().map_err(|e| self.decode(st, &e))?
            {
                let id = tme.table_id();
                if !st.shapes.contains_key(&id) {
                    let name = format!("{}.{}", tme.database_name(), tme.table_name());
                    let shape = if self.tables.iter().any(|t| t.name == name) {
                        let facts = match st.facts.get(&name) {
                            Some(f) => f.clone(),
                            None => {
                                let f = catalog::facts(&self.pool, &name).await.map_err(|e| {
                                    query_error(&self.source, "cannot read the table's columns", e)
                                })?;
                                st.facts.insert(name.clone(), f.clone());
                                f
                            }
                        };
                        let shape = Shape::of(&tme, facts).map_err(|e| self.decode(st, &e))?;
                        let Some(shape) = shape else {
                            return Err(Error::new(
                                ErrorKind::Decode,
                                format!(
                                    "source {:?}: the table map of {name} at {}:{start} has no column \
                                     names (binlog_row_metadata was not FULL when it was written); \
                                     `caudal resync` reads the tables again from a point after it",
                                    self.source, st.file
                                ),
                            ));
                        };
                        Some(Arc::new(shape))
                    } else {
                        None
                    };
                    st.shapes.insert(id, shape);
                }
            }
        } else if is_rows_event(ty) {
            if let Some(EventData::RowsEvent(rows)) =
                event.read_data().map_err(|e| self.decode(st, &e))?
            {
                self.rows(st, binlog, &rows)?;
            }
        } else if ty == EventType::XID_EVENT as u8 || ty == EventType::XA_PREPARE_LOG_EVENT as u8 {
            st.txn = None;
        } else if MARIADB_COMPRESSED.contains(&ty) {
            return Err(self.unsupported(
                st,
                "the binary log holds compressed events (log_bin_compress was ON when they were \
                 written), which caudal cannot read; SET GLOBAL log_bin_compress = OFF and \
                 `caudal resync`",
            ));
        } else if ty == EventType::HEARTBEAT_EVENT as u8 {
            update_lag(&self.lag, |l| l.lag_seconds = Some(0.0));
            return Ok(());
        }
        if st
            .txn
            .as_ref()
            .is_some_and(|t| t.standalone && ty != MARIADB_GTID_EVENT)
        {
            st.txn = None;
        }
        st.next = end;
        if st.txn.is_none() {
            let at = format!("{}:{}", st.file, st.next);
            update_lag(&self.lag, |l| {
                if let Some(b) = super::binlog_figures(l) {
                    b.read_position = Some(at);
                }
            });
        }
        Ok(())
    }

    fn rows(
        &mut self,
        st: &mut Stream,
        binlog: &BinlogStream,
        rows: &RowsEventData<'_>,
    ) -> Result<()> {
        let id = rows.table_id();
        let Some(Some(shape)) = st.shapes.get(&id).cloned() else {
            return Ok(());
        };
        let Some(tme) = binlog.get_tme(id) else {
            return Err(self.unsupported(st, "a row event without its table map"));
        };
        let Some(table) = self.tables.iter().find(|t| t.name == shape.table).cloned() else {
            return Ok(());
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => "insert",
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => "update",
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => "delete",
        };
        if st.txn.as_ref().is_some_and(|t| t.xa) {
            return Err(self.unsupported(st, XA_UNSUPPORTED));
        }
        let Some(mut txn) = st.txn.clone() else {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a row event at {}:{} outside a transaction",
                    self.source, st.file, st.next
                ),
            ));
        };
        for row in rows.rows(tme) {
            let (before, after) = row.map_err(|e| self.decode(st, &e))?;
            let decode = |r: Option<&mysql_async::binlog::row::BinlogRow>| {
                r.map(|r| decode::row(&shape, r, self.decimals)).transpose()
            };
            let fail = |e: String| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "source {:?}: cannot decode a change at {}:{}: {e}",
                        self.source, txn.file, txn.pos
                    ),
                )
            };
            let before = decode(before.as_ref()).map_err(fail)?;
            let mut after = decode(after.as_ref()).map_err(fail)?;
            // A minimal after image leaves out the key when it did not
            // change: it is the before image's.
            if let (Some((old, _)), Some((new, missing))) = (&before, &mut after) {
                for (k, _) in &table.key {
                    if !new.contains_key(k)
                        && let Some(v) = old.get(k)
                    {
                        new.insert(k.clone(), v.clone());
                        missing.retain(|m| m != k);
                    }
                }
            }
            let key_of = |row: &Map<String, Value>| -> Map<String, Value> {
                table
                    .key
                    .iter()
                    .map(|(k, _)| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
                    .collect()
            };
            let old_key = before.as_ref().map(|(r, _)| key_of(r));
            let new_key = after.as_ref().map(|(r, _)| key_of(r));
            let changes: Vec<(&str, Map<String, Value>, Option<_>, Option<_>)> =
                match (op, old_key, new_key) {
                    ("update", Some(old), Some(new)) if old != new => {
                        vec![("delete", old, before, None), ("insert", new, None, after)]
                    }
                    (_, old, new) => {
                        let key = new.or(old).unwrap_or_default();
                        vec![(op, key, before, after)]
                    }
                };
            for (op, key, before, after) in changes {
                let index = txn.index;
                txn.index += 1;
                if let Some((f, p, n)) = &st.skip
                    && *f == txn.file
                    && *p == txn.pos
                    && index < *n
                {
                    continue;
                }
                let unchanged = after
                    .as_ref()
                    .map(|(_, missing): &(Map<String, Value>, Vec<String>)| missing.clone())
                    .unwrap_or_default();
                let entity = entity_key(&table.name, &key);
                let data = change(
                    op,
                    &table.name,
                    key,
                    before.map(|(r, _)| r),
                    after.map(|(r, _)| r),
                    unchanged,
                    &txn,
                    Some(index),
                );
                st.page.push(Record {
                    data,
                    position: Position::Binlog {
                        file: txn.file.clone(),
                        pos: txn.pos,
                        index,
                        gtid: txn.gtid.clone(),
                    },
                    key: Some(entity),
                });
                st.emitted = Some((txn.file.clone(), txn.pos));
            }
        }
        txn.captured = true;
        st.txn = Some(txn);
        Ok(())
    }

    /// A captured table whose name the statement mentions.
    fn mentioned(&self, statement: &str) -> Option<&Table> {
        let lower = statement.to_ascii_lowercase();
        self.tables.iter().find(|t| {
            let name = t.name.rsplit('.').next().unwrap_or(&t.name);
            lower.contains(&name.to_ascii_lowercase())
        })
    }

    fn unsupported(&self, st: &Stream, what: &str) -> Error {
        Error::new(
            ErrorKind::Decode,
            format!(
                "source {:?}: at {}:{}: {what}",
                self.source, st.file, st.next
            ),
        )
    }

    /// A captured table was truncated (a statement in the log, not rows).
    fn truncate(&mut self, st: &mut Stream, mut txn: Txn, table: &str) {
        let index = txn.index;
        txn.index += 1;
        let skipped = st
            .skip
            .as_ref()
            .is_some_and(|(f, p, n)| *f == txn.file && *p == txn.pos && index < *n);
        if !skipped {
            let data = change(
                "truncate",
                table,
                Map::new(),
                None,
                None,
                Vec::new(),
                &txn,
                Some(index),
            );
            st.page.push(Record {
                data,
                position: Position::Binlog {
                    file: txn.file.clone(),
                    pos: txn.pos,
                    index,
                    gtid: txn.gtid.clone(),
                },
                key: Some(table.to_string()),
            });
            st.emitted = Some((txn.file.clone(), txn.pos));
        }
        if st.txn.is_some() {
            st.txn = Some(txn);
        }
    }

    /// At the end of a bounded read: a marker at the end, when the read
    /// moved past everything emitted.
    fn end_marker(&mut self, st: &mut Stream) {
        if st.txn.is_some() {
            return;
        }
        let here = (st.file.clone(), st.next);
        if st.emitted.as_ref() != Some(&here) {
            st.page.push(resume_marker(&here.0, here.1));
            st.emitted = Some(here);
        }
    }

    /// Every poll tick: backfill requests, chunks, the idle marker.
    async fn idle(&mut self, st: &mut Stream, backfills: &mut Backfills) -> Result<()> {
        if st.txn.is_some() {
            return Ok(());
        }
        self.place_chunk(st, backfills);
        if let Some(requests) = &self.requests
            && backfills
                .polled
                .is_none_or(|p| p.elapsed() >= BACKFILL_POLL)
        {
            backfills.polled = Some(Instant::now());
            for (id, request) in requests.pending().await {
                if backfills.seen.insert(id.clone()) {
                    self.start_backfill(id, request, backfills).await;
                }
            }
        }
        if backfills.chunk.is_none()
            && let Some(job) = backfills.jobs.front_mut()
        {
            let read = chunk_snapshot(
                &self.pool,
                &self.source,
                &job.table,
                job.request.filter.as_deref(),
                job.after.as_deref(),
                self.page_size,
                self.decimals,
            )
            .await;
            match read {
                // The server lets a replica read a transaction just before
                // it is visible to a snapshot: a chunk older than what the
                // stream read may lack it. Read it again at the next tick.
                Ok(c)
                    if catalog::compare((&c.file, c.pos), (&st.file, st.next))
                        == std::cmp::Ordering::Less =>
                {
                    tracing::debug!(source = %self.source, "a backfill chunk's snapshot is behind the stream; reading it again");
                }
                Ok(c) => backfills.chunk = Some(c),
                Err(e) => {
                    let job = backfills.jobs.pop_front();
                    if let Some(job) = job {
                        tracing::warn!(source = %self.source, table = %job.table.name, error = %e.report(), "backfill failed");
                        self.progress(&job, true, Some(e.report()));
                    }
                }
            }
            self.place_chunk(st, backfills);
        }
        // Idle: move the checkpoint past what was read of other tables.
        let beat = self.heartbeat.unwrap_or(Duration::from_secs(10));
        if st.page.is_empty()
            && backfills.chunk.is_none()
            && !beat.is_zero()
            && st.last_mark.elapsed() >= beat
        {
            let here = (st.file.clone(), st.next);
            if st.emitted.as_ref() != Some(&here) && !st.file.is_empty() {
                st.page.push(resume_marker(&here.0, here.1));
                st.emitted = Some(here);
            }
            st.last_mark = Instant::now();
        }
        Ok(())
    }

    async fn start_backfill(
        &mut self,
        id: String,
        request: BackfillRequest,
        backfills: &mut Backfills,
    ) {
        let Some(table) = self
            .tables
            .iter()
            .find(|t| t.name == request.table || t.name.ends_with(&format!(".{}", request.table)))
            .cloned()
        else {
            let job = Job {
                id,
                table: Table {
                    name: request.table.clone(),
                    quoted: String::new(),
                    key: Vec::new(),
                },
                request,
                after: None,
                rows: 0,
            };
            self.progress(
                &job,
                true,
                Some(format!(
                    "table {} is not captured by this pipeline",
                    job.table.name
                )),
            );
            return;
        };
        tracing::info!(source = %self.source, table = %table.name, id = %id, "backfill requested");
        let job = Job {
            id,
            request,
            table,
            after: None,
            rows: 0,
        };
        self.progress(&job, false, None);
        backfills.jobs.push_back(job);
    }

    /// Puts a read chunk in the stream once the stream reached the chunk's
    /// snapshot position.
    fn place_chunk(&mut self, st: &mut Stream, backfills: &mut Backfills) {
        if st.txn.is_some() || st.file.is_empty() {
            return;
        }
        let Some(c) = &backfills.chunk else {
            return;
        };
        if catalog::compare((&st.file, st.next), (&c.file, c.pos)) == std::cmp::Ordering::Less {
            return;
        }
        let Some(c) = backfills.chunk.take() else {
            return;
        };
        let Some(job) = backfills.jobs.front_mut() else {
            return;
        };
        let n = c.rows.len() as u64;
        for row in c.rows {
            job.after = Some(row.values.clone());
            let position = Position::BinlogBackfill {
                file: c.file.clone(),
                pos: c.pos,
                table: job.table.name.clone(),
                key: row.values.clone(),
            };
            st.page
                .push(read_record(&job.table, row, position, &c.file, c.pos));
        }
        if n > 0 {
            st.emitted = Some((c.file.clone(), c.pos));
        }
        job.rows += n;
        let done = !c.full;
        let snapshot = Job {
            id: job.id.clone(),
            request: job.request.clone(),
            table: job.table.clone(),
            after: None,
            rows: job.rows,
        };
        if done {
            backfills.jobs.pop_front();
            tracing::info!(source = %self.source, table = %snapshot.table.name, rows = snapshot.rows, "backfill done");
        }
        self.progress(&snapshot, done, None);
    }

    fn progress(&self, job: &Job, done: bool, error: Option<String>) {
        let p = BackfillProgress {
            id: job.id.clone(),
            table: job.table.name.clone(),
            rows: job.rows,
            done,
            error,
        };
        update_lag(&self.lag, |l| l.backfill = Some(p));
    }

    fn lag_at(&self, timestamp: u32) {
        let now = chrono::Utc::now().timestamp();
        let secs = (now - i64::from(timestamp)).max(0);
        update_lag(&self.lag, |l| {
            #[allow(clippy::cast_precision_loss)]
            let s = secs as f64;
            l.lag_seconds = Some(s);
            l.last_commit_time = commit_time(timestamp);
        });
    }

    fn decode(&self, st: &Stream, e: &std::io::Error) -> Error {
        Error::new(
            ErrorKind::Decode,
            format!(
                "source {:?}: cannot read the binary log event at {}:{}: {e}",
                self.source, st.file, st.next
            ),
        )
    }
}

fn unreachable_txn(st: &Stream) -> Txn {
    Txn {
        file: st.file.clone(),
        pos: st.next,
        gtid: None,
        time: None,
        index: 0,
        standalone: false,
        captured: false,
        xa: false,
    }
}

fn is_rows_event(ty: u8) -> bool {
    use EventType::*;
    [
        WRITE_ROWS_EVENT_V1,
        UPDATE_ROWS_EVENT_V1,
        DELETE_ROWS_EVENT_V1,
        WRITE_ROWS_EVENT,
        UPDATE_ROWS_EVENT,
        DELETE_ROWS_EVENT,
        PARTIAL_UPDATE_ROWS_EVENT,
    ]
    .iter()
    .any(|t| *t as u8 == ty)
}

/// Opens a consistent snapshot on `conn` and returns the binary log
/// position it matches.
async fn consistent_snapshot(
    conn: &mut sqlx::MySqlConnection,
    source: &str,
) -> Result<(String, u64)> {
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot start the snapshot transaction", e))?;
    sqlx::query("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .execute(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot start the snapshot transaction", e))?;
    let rows: Vec<(String, String)> = sqlx::query_as("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot read the snapshot's binary log position", e))?;
    let get = |k: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    match (
        get("binlog_snapshot_file"),
        get("binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok()),
    ) {
        (Some(reported), Some(pos)) if !reported.is_empty() => {
            // MariaDB may give the name with stray bytes after its end (a
            // buffer it does not clear): take the log file it starts with.
            let logs: Vec<String> = sqlx::query("SHOW BINARY LOGS")
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| query_error(source, "cannot list the binary logs", e))?
                .iter()
                .filter_map(|r| sqlx::Row::try_get::<String, _>(r, 0).ok())
                .collect();
            let file = logs
                .into_iter()
                .filter(|l| reported.starts_with(l.as_str()))
                .max_by_key(String::len)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Query,
                        format!(
                            "source {source:?}: the snapshot's binary log file {reported:?} is not \
                             among the server's binary logs"
                        ),
                    )
                })?;
            Ok((file, pos))
        }
        _ => Err(Error::new(
            ErrorKind::Query,
            format!(
                "source {source:?}: the server did not report the snapshot's binary log position \
                 (binlog_snapshot_file/position); is the binary log on?"
            ),
        )),
    }
}

/// Reads one backfill chunk in its own consistent snapshot.
async fn chunk_snapshot(
    pool: &MySqlPool,
    source: &str,
    table: &Table,
    filter: Option<&str>,
    after: Option<&[CursorValue]>,
    limit: usize,
    decimals: DecimalFormat,
) -> Result<Chunk> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| query_error(source, "cannot open a backfill connection", e))?;
    let (file, pos) = consistent_snapshot(&mut conn, source).await?;
    let read = chunk::read(&mut conn, source, table, filter, after, limit, decimals).await;
    let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
    let (rows, full) = read?;
    Ok(Chunk {
        file,
        pos,
        rows,
        full,
    })
}

/// The table a `TRUNCATE [TABLE] name` statement empties, as
/// `schema.table`; identifiers may be quoted with backticks.
fn truncated(query: &str, schema: &str) -> Option<String> {
    let rest = query.trim_start();
    let (word, rest) = rest.split_at(rest.find(char::is_whitespace)?);
    if !word.eq_ignore_ascii_case("truncate") {
        return None;
    }
    let mut rest = rest.trim_start();
    if rest.len() >= 5
        && rest[..5].eq_ignore_ascii_case("table")
        && rest[5..].starts_with(|c: char| c.is_whitespace() || c == '`')
    {
        rest = rest[5..].trim_start();
    }
    let mut parts = Vec::new();
    loop {
        let (part, after) = identifier(rest)?;
        parts.push(part);
        match after.strip_prefix('.') {
            Some(more) => rest = more,
            None => {
                let tail = after.trim();
                if !(tail.is_empty() || tail == ";") {
                    return None;
                }
                break;
            }
        }
    }
    match parts.as_slice() {
        [t] => Some(format!("{schema}.{t}")),
        [s, t] => Some(format!("{s}.{t}")),
        _ => None,
    }
}

/// One identifier at the start of `text` (backtick-quoted, a doubled
/// backtick inside, or bare) and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('`') {
        let mut out = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '`' {
                if chars.peek().is_some_and(|(_, n)| *n == '`') {
                    chars.next();
                    out.push('`');
                } else {
                    return Some((out, &quoted[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = text
            .find(|c: char| c.is_whitespace() || c == '.' || c == ';')
            .unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_string(), &text[end..]))
    }
}

/// A marker position (never sent): streaming goes on from `file`:`pos`.
fn resume_marker(file: &str, pos: u64) -> Record {
    Record {
        data: Json::from_map(&Map::new()),
        position: Position::BinlogResume {
            file: file.to_string(),
            pos,
        },
        key: None,
    }
}

fn commit_time(timestamp: u32) -> Option<String> {
    chrono::DateTime::from_timestamp(i64::from(timestamp), 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// A snapshot or backfill row as a `read` record.
fn read_record(table: &Table, row: chunk::Row, position: Position, file: &str, pos: u64) -> Record {
    let txn = Txn {
        file: file.to_string(),
        pos,
        gtid: None,
        time: None,
        index: 0,
        standalone: false,
        captured: false,
        xa: false,
    };
    let data = change(
        "read",
        &table.name,
        row.key,
        None,
        Some(row.data),
        Vec::new(),
        &txn,
        None,
    );
    Record {
        data,
        position,
        key: Some(row.entity),
    }
}

/// The record of one change: the same shape as PostgreSQL CDC's, with the
/// binary log position and GTID in place of LSN and xid.
#[allow(clippy::too_many_arguments)]
fn change(
    op: &'static str,
    table: &str,
    key: Map<String, Value>,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    unchanged: Vec<String>,
    txn: &Txn,
    index: Option<u64>,
) -> Json {
    let change = crate::sources::change::Change {
        op,
        table: table.to_string(),
        key,
        before: before.map(Into::into),
        after: after.map(Into::into),
        unchanged,
    };
    change.encode(&Stamp {
        fields: [
            ("binlog", Value::String(format!("{}:{}", txn.file, txn.pos))),
            ("gtid", txn.gtid.clone().map_or(Value::Null, Value::String)),
        ],
        commit_time: txn.time.as_deref(),
        index,
    })
}

/// A client error as a caudal error: a broken or killed connection is
/// [`ErrorKind::Connect`] (the reader reconnects); a purged position is
/// [`ErrorKind::Resync`]; anything else stops the run.
pub fn binlog_error(source: &str, what: &str, e: mysql_async::Error) -> Error {
    let kind = match &e {
        mysql_async::Error::Server(s) => match s.code {
            // ER_MASTER_FATAL_ERROR_READING_BINLOG: the file is gone (purged)
            // or the position is not in it.
            // ER_MASTER_FATAL_ERROR_READING_BINLOG: the file is gone (purged,
            // expired) or the position is not in it (the log was reset).
            1236 => ErrorKind::Resync,
            // Killed (KILL CONNECTION), shutting down, another replica took
            // the server id over, lost or gone.
            1053 | 1077 | 1152 | 1158 | 1159 | 1160 | 1161 | 1927 | 2006 | 2013 => {
                ErrorKind::Connect
            }
            1045 | 1227 | 1142 => ErrorKind::Config,
            _ => ErrorKind::Query,
        },
        mysql_async::Error::Io(_) => ErrorKind::Connect,
        mysql_async::Error::Driver(_) => ErrorKind::Connect,
        _ => ErrorKind::Query,
    };
    let hint = if kind == ErrorKind::Resync {
        "; the server cannot send the binary log from caudal's position (purged, expired or \
         reset), so the changes since are lost to caudal and it stops rather than skip them. \
         `caudal resync PIPELINE` reads the tables again and streams from there"
    } else {
        ""
    };
    Error::with_source(kind, format!("source {source:?}: {what}{hint}"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_statements_name_their_table() {
        assert_eq!(truncated("TRUNCATE TABLE t", "db").as_deref(), Some("db.t"));
        assert_eq!(truncated("truncate `a`.`b`", "db").as_deref(), Some("a.b"));
        assert_eq!(truncated("ALTER TABLE t ADD c INT", "db"), None);
        assert_eq!(
            truncated("TRUNCATE TABLE `order items`", "db").as_deref(),
            Some("db.order items")
        );
        assert_eq!(truncated("truncate `a.b`", "db").as_deref(), Some("db.a.b"));
        assert_eq!(
            truncated("TRUNCATE tablex", "db").as_deref(),
            Some("db.tablex")
        );
        assert_eq!(truncated("TRUNCATE TABLE t PARTITION p0", "db"), None);
    }
}
