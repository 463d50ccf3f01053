//! What the change data capture sources share: the reader handle a
//! pipeline drives, the durable-position report, lag figures and on-demand
//! backfill requests.

use std::sync::{Arc, Mutex};

use caudal_core::record::{CursorValue, Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::sources::sql::ColumnKind;

/// Live replication figures of a reader, shared with status reporting.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Lag {
    /// PostgreSQL: the slot's name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub slot: String,
    /// MySQL: the replica server id caudal reads the binary log as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
    /// `snapshot` or `streaming` (or `reconnecting`).
    pub phase: String,
    /// PostgreSQL: last LSN confirmed to the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_lsn: Option<String>,
    /// PostgreSQL: latest WAL position the server reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_lsn: Option<String>,
    /// MySQL: the binary log position read up to (`file:offset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_position: Option<String>,
    /// MySQL: the end of the server's binary log (`file:offset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_position: Option<String>,
    /// Bytes of log between the server's position and caudal's (the
    /// confirmed LSN; the binlog position read up to).
    pub lag_bytes: Option<u64>,
    /// Seconds between the commit of the last transaction read and when it
    /// was read; 0 once caught up.
    pub lag_seconds: Option<f64>,
    /// Commit time of the last transaction read.
    pub last_commit_time: Option<String>,
    /// Rows read by the snapshot so far.
    pub snapshot_rows: u64,
    /// The latest on-demand backfill.
    pub backfill: Option<BackfillProgress>,
}

/// How far an on-demand backfill got.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BackfillProgress {
    pub id: String,
    pub table: String,
    /// Rows sent as `read` records so far.
    pub rows: u64,
    pub done: bool,
    pub error: Option<String>,
}

/// What an operator asked to backfill: a table and an optional filter.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackfillRequest {
    pub table: String,
    #[serde(default)]
    pub filter: Option<String>,
}

/// Looks a backfill request up by id in caudal's own state: the log only
/// carries the id, so nobody who can merely write to the log can make
/// caudal run SQL.
pub type BackfillLookup = Arc<
    dyn Fn(
            String,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<BackfillRequest>> + Send>>
        + Send
        + Sync,
>;

/// Lag figures shared between a reader task and status reporting.
pub type SharedLag = Arc<Mutex<Lag>>;

/// Reads the current figures of a shared [`Lag`].
pub fn read_lag(lag: &SharedLag) -> Lag {
    lag.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Changes the figures of a shared [`Lag`].
pub fn update_lag(lag: &SharedLag, f: impl FnOnce(&mut Lag)) {
    f(&mut lag
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner));
}

/// Lists the backfill requests saved for a pipeline, by id (sources whose
/// log cannot carry a request poll for them).
pub type BackfillPending = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Vec<(String, BackfillRequest)>> + Send>,
        > + Send
        + Sync,
>;

/// A failed catalog or snapshot query as a caudal error: a lost
/// connection is [`ErrorKind::Connect`] (retried), anything else a query
/// error.
pub fn query_error(source: &str, what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            ErrorKind::Connect
        }
        _ => ErrorKind::Query,
    };
    Error::with_source(kind, format!("source {source:?}: {what}"), e)
}

/// One row of a primary-key chunk (a snapshot or a backfill).
#[derive(Debug)]
pub struct ChunkRow {
    /// The primary key as typed values (where the next chunk starts).
    pub values: Vec<CursorValue>,
    /// The primary key columns.
    pub key: Map<String, Value>,
    /// The whole row.
    pub data: Map<String, Value>,
    /// `schema.table[key values]`.
    pub entity: String,
}

impl ChunkRow {
    /// Picks the key of a decoded row of `table`, whose key columns are
    /// `key`.
    pub fn new(
        table: &str,
        key: &[(String, ColumnKind)],
        data: Map<String, Value>,
    ) -> Result<Self> {
        let mut values = Vec::with_capacity(key.len());
        let mut map = Map::new();
        for (col, kind) in key {
            let v = data.get(col).cloned().unwrap_or(Value::Null);
            values.push(kind.cursor_value(col, &v)?);
            map.insert(col.clone(), v);
        }
        Ok(Self {
            entity: entity_key(table, &map),
            values,
            key: map,
            data,
        })
    }
}

/// What a change is: the part of the record every CDC source shares.
#[derive(Debug)]
pub struct Change {
    pub op: String,
    pub table: String,
    pub key: Map<String, Value>,
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    /// Columns left out of `after` because the log did not carry them.
    pub unchanged: Vec<String>,
}

impl Change {
    /// The record: `{op, table, key, before, after, unchanged}` followed
    /// by the source's position fields (`lsn`, `xid` or `binlog`, `gtid`)
    /// and `commit_time` and `index`.
    pub fn into_record(
        self,
        position: [(&str, Value); 2],
        time: Option<String>,
        index: Option<u64>,
    ) -> Map<String, Value> {
        let mut m = Map::with_capacity(10);
        m.insert("op".into(), Value::String(self.op));
        m.insert("table".into(), Value::String(self.table));
        m.insert("key".into(), Value::Object(self.key));
        m.insert(
            "before".into(),
            self.before.map_or(Value::Null, Value::Object),
        );
        m.insert(
            "after".into(),
            self.after.map_or(Value::Null, Value::Object),
        );
        m.insert(
            "unchanged".into(),
            Value::Array(self.unchanged.into_iter().map(Value::String).collect()),
        );
        for (k, v) in position {
            m.insert(k.into(), v);
        }
        m.insert(
            "commit_time".into(),
            time.map_or(Value::Null, Value::String),
        );
        m.insert("index".into(), index.map_or(Value::Null, Value::from));
        m
    }
}

/// `table[key values]`: the entity a change is about, for per-key order.
pub fn entity_key(table: &str, key: &Map<String, Value>) -> String {
    let values: Vec<&Value> = key.values().collect();
    format!("{table}{}", json!(values))
}

/// The pages of one CDC run. Dropping it stops the reader.
#[derive(Debug)]
pub struct CdcReader {
    pages: mpsc::Receiver<Result<Vec<Record>>>,
    durable: Arc<watch::Sender<Option<Position>>>,
    stop: CancellationToken,
    created_publication: bool,
}

impl CdcReader {
    /// The handle of a reader task that sends pages to `pages`, watches
    /// `durable` and ends when `stop` is cancelled.
    pub fn new(
        pages: mpsc::Receiver<Result<Vec<Record>>>,
        durable: watch::Sender<Option<Position>>,
        stop: CancellationToken,
        created_publication: bool,
    ) -> Self {
        Self {
            pages,
            durable: Arc::new(durable),
            stop,
            created_publication,
        }
    }

    /// The next page of records; `None` when a bounded read is done.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        match self.pages.recv().await {
            None => Ok(None),
            Some(Ok(page)) => Ok(Some(page)),
            Some(Err(e)) => Err(e),
        }
    }

    /// Whether this run created the publication (so dropping the pipeline
    /// may drop it; a publication made by an operator is left alone).
    pub fn created_publication(&self) -> bool {
        self.created_publication
    }

    /// The handle through which the pipeline reports durable positions.
    pub fn durable(&self) -> Durable {
        Durable(self.durable.clone())
    }
}

impl Drop for CdcReader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reports the last position made durable, so the source may be
/// confirmed up to it.
#[derive(Clone, Debug)]
pub struct Durable(Arc<watch::Sender<Option<Position>>>);

impl Durable {
    pub fn mark(&self, position: &Position) {
        self.0.send_replace(Some(position.clone()));
    }
}

/// A change data capture source of either kind, for what the pipeline and
/// the CLI do the same way for both.
#[derive(Clone, Debug)]
pub enum CdcSource {
    Postgres(crate::sources::postgres_cdc::PgCdcSource),
    Mysql(crate::sources::mysql_cdc::MyCdcSource),
}

impl CdcSource {
    /// Prepares the CDC source `name` of `pipeline` (nothing is queried
    /// until a run opens).
    pub async fn connect(
        pipeline: &str,
        name: &str,
        config: &caudal_core::config::SourceConfig,
    ) -> Result<Self> {
        use caudal_core::config::SqlDialect;
        match config.dialect() {
            SqlDialect::Postgres => Ok(Self::Postgres(
                crate::sources::postgres_cdc::PgCdcSource::connect(pipeline, name, config.sql())
                    .await?,
            )),
            SqlDialect::Mysql => Ok(Self::Mysql(
                crate::sources::mysql_cdc::MyCdcSource::connect(pipeline, name, config.sql())
                    .await?,
            )),
            other => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {name:?}: mode = \"cdc\" is not supported for {} sources",
                    other.as_str()
                ),
            )),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Postgres(s) => s.name(),
            Self::Mysql(s) => s.name(),
        }
    }

    /// Live replication figures of the current run.
    pub fn lag(&self) -> Lag {
        match self {
            Self::Postgres(s) => s.lag(),
            Self::Mysql(s) => s.lag(),
        }
    }

    /// Starts one run from the last durable position (see each source's
    /// `open_run`). Backfill requests are looked up by the id the log
    /// carries (PostgreSQL) or polled for (MySQL).
    pub async fn open_run(
        &self,
        from: Option<&Position>,
        follow: bool,
        lookup: Option<BackfillLookup>,
        pending: Option<BackfillPending>,
    ) -> Result<CdcReader> {
        match self {
            Self::Postgres(s) => s.open_run(from, follow, lookup).await,
            Self::Mysql(s) => s.open_run(from, follow, pending).await,
        }
    }

    /// Tells the running pipeline about the backfill request saved under
    /// `id`: PostgreSQL through a message in its log; a MySQL pipeline
    /// finds saved requests itself.
    pub async fn request_backfill(&self, id: &str) -> Result<()> {
        match self {
            Self::Postgres(s) => s.request_backfill(id).await,
            Self::Mysql(_) => Ok(()),
        }
    }

    /// Rows of `table` matching `filter` (a backfill's total); also checks
    /// the table and the filter.
    pub async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64> {
        match self {
            Self::Postgres(s) => s.count_rows(table, filter).await,
            Self::Mysql(s) => s.count_rows(table, filter).await,
        }
    }
}

/// Runs a reader task; should it panic, the pipeline gets an error instead
/// of an end of pages (which a bounded read would take for "done").
pub fn spawn_reader<F>(task: F, out: mpsc::Sender<Result<Vec<Record>>>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            let what = e.into_panic();
            let text = what
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| what.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let _ = out
                .send(Err(Error::new(
                    ErrorKind::Internal,
                    format!("the CDC reader failed: {text}"),
                )))
                .await;
        }
    });
}
