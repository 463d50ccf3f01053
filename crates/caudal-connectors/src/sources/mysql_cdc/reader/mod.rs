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

mod backfill;
mod rows;
mod snapshot;
mod stream;

use backfill::Backfills;
use snapshot::consistent_snapshot;

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
    BackfillProgress, BackfillRequest, BackfillRequests, Change, Row, SharedLag, Stamp, update_lag,
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
    let change = Change {
        op: "read",
        table: table.name.clone(),
        key: row.key,
        before: None,
        after: Some(row.data.into()),
        unchanged: Vec::new(),
    };
    Record {
        data: change.encode(&stamp(file, pos, None, None, None)),
        position,
        key: Some(row.entity),
    }
}

/// The record fields of a change: the same shape as PostgreSQL CDC's, with
/// the binary log position and GTID in place of LSN and xid.
fn stamp<'a>(
    file: &str,
    pos: u64,
    gtid: Option<&str>,
    time: Option<&'a str>,
    index: Option<u64>,
) -> Stamp<'a> {
    Stamp {
        fields: [
            ("binlog", Value::String(format!("{file}:{pos}"))),
            (
                "gtid",
                gtid.map_or(Value::Null, |g| Value::String(g.to_string())),
            ),
        ],
        commit_time: time,
        index,
    }
}

impl Stream {
    /// Adds the `index`-th change of `txn` to the page, unless it was read
    /// before (durable before the run, or read before a reconnect).
    fn push(&mut self, change: &Change, txn: &Txn, index: u64) {
        if let Some((f, p, n)) = &self.skip
            && *f == txn.file
            && *p == txn.pos
            && index < *n
        {
            return;
        }
        let data = change.encode(&stamp(
            &txn.file,
            txn.pos,
            txn.gtid.as_deref(),
            txn.time.as_deref(),
            Some(index),
        ));
        self.page.push(Record {
            data,
            position: Position::Binlog {
                file: txn.file.clone(),
                pos: txn.pos,
                index,
                gtid: txn.gtid.clone(),
            },
            key: Some(change.entity()),
        });
        self.emitted = Some((txn.file.clone(), txn.pos));
    }
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
