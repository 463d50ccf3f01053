//! MariaDB change data capture: the binary log, read as a replica.
//!
//! A run checks what reading the log needs (ROW format, full row metadata,
//! the replication privileges, a server id of its own, InnoDB tables), reads
//! the tables in key chunks (a table without a primary key: by a unique
//! index, else in one pass) inside one consistent snapshot whose binary log
//! position the server reports, then streams the log from exactly there.
//! See [`reader`] for the position rules.
//!
//! Records have the shape of PostgreSQL CDC's:
//! `{op, table, key, before, after, unchanged, binlog, gtid, commit_time,
//! index}` where `op` is `read` (snapshot, backfill), `insert`, `update`,
//! `delete` or `truncate`, `binlog` is `file:offset` of the transaction's
//! start and `gtid` MariaDB's `domain-server-sequence`.

pub(crate) mod catalog;
mod chunk;
pub(crate) mod decode;
mod reader;

use std::sync::Arc;
use std::time::Duration;

use caudal_core::config::{CdcSnapshot, SqlSourceConfig};
use caudal_core::probe::Finding;
use caudal_core::record::Position;
use caudal_core::status::{BinlogReplication, Replication, ReplicationSource};
use caudal_core::{Error, ErrorKind, Result};
use sqlx::MySqlPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use catalog::query_error;
pub use catalog::{LogFile, distance};
use reader::{Start, Task};

use crate::sources::change::{
    BackfillRequests, CdcReader, ChangeCapture, Held, Released, SharedLag, read_lag, update_lag,
};

/// The binary log part of a MySQL source's figures.
pub(crate) fn binlog_figures(r: &mut Replication) -> Option<&mut BinlogReplication> {
    match &mut r.source {
        ReplicationSource::Mysql(b) => Some(b),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Empty figures of a replica with `server_id`.
fn figures(server_id: u32) -> Replication {
    Replication::new(ReplicationSource::Mysql(BinlogReplication {
        server_id: Some(server_id),
        ..BinlogReplication::default()
    }))
}

/// How often the reader's distance to the end of the log is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// A MariaDB binlog CDC source of one pipeline. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MyCdcSource {
    name: String,
    pipeline: String,
    config: SqlSourceConfig,
    pool: MySqlPool,
    opts: mysql_async::Opts,
    server_id: u32,
    lag: SharedLag,
}

impl MyCdcSource {
    /// Prepares the source; nothing is queried until a run opens.
    pub async fn connect(pipeline: &str, name: &str, config: &SqlSourceConfig) -> Result<Self> {
        let url = config.url.expose();
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Connect,
                format!(
                    "source {name:?}: cannot connect to mysql at {}: {e}",
                    caudal_core::units::redact_url(url)
                ),
            )
        };
        let tls = crate::sources::sql::mysql_tls::MysqlTlsFiles::load(config.tls.as_ref())
            .map_err(|e| Error::new(ErrorKind::Config, format!("source {name:?}: {e}")))?;
        let pool = crate::sources::sql::mysql::connect(url, &tls)
            .await
            .map_err(|e| unreachable(&e))?;
        // The replica connection takes the URL without its query options
        // (those are the SQL driver's).
        let base =
            url.split_once('?')
                .map_or(url, |(b, _)| b)
                .replacen("mariadb://", "mysql://", 1);
        let opts = mysql_async::Opts::from_url(&base).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("source {name:?}: the url is not a valid MySQL URL: {e}"),
            )
        })?;
        // The same TLS as the pool's: a replica connection is checked
        // exactly like the cursor reads.
        let opts = mysql_async::OptsBuilder::from_opts(opts)
            .prefer_socket(false)
            .ssl_opts(tls.ssl_opts())
            .into();
        let server_id = config
            .server_id
            .unwrap_or_else(|| caudal_core::config::default_server_id(pipeline));
        Ok(Self {
            name: name.to_string(),
            pipeline: pipeline.to_string(),
            config: config.clone(),
            pool,
            opts,
            server_id,
            lag: Arc::new(std::sync::Mutex::new(figures(server_id))),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The replica server id the binary log is read with.
    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    fn tables(&self) -> Vec<String> {
        match (&self.config.tables, &self.config.table) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => vec![t.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// What a run needs, checked without changing anything (`caudal
    /// doctor`): the server's binary log settings and the user's
    /// privileges, then each table (exists, InnoDB, keyed).
    pub async fn probe(&self) -> Vec<Finding> {
        let mut out = match catalog::prerequisites(&self.pool, &self.name, self.server_id).await {
            Ok((_, found)) => found,
            Err(e) => {
                return vec![Finding::fail(
                    "prerequisites",
                    e.report(),
                    e.kind()
                        .hint()
                        .unwrap_or("check the source's settings and its server"),
                )];
            }
        };
        for t in self.tables() {
            out.push(match catalog::table(&self.pool, &self.name, &t).await {
                Ok(table) if table.keyless() => Finding::warn(
                    format!("table {}", table.name),
                    format!(
                        "{} has no primary key (nor a unique index of NOT NULL columns)",
                        table.name
                    ),
                    "add a primary key: without one, changes are ordered against the whole \
                     table and backfills are refused",
                ),
                Ok(table) => Finding::ok(
                    format!("table {}", table.name),
                    format!("{} is readable and keyed", table.name),
                ),
                Err(e) => Finding::fail(
                    format!("table {t}"),
                    e.report(),
                    if e.message().contains("does not exist") {
                        "create the table, or correct `tables` (schema.table), and GRANT SELECT \
                         on it to the source's user"
                    } else {
                        "see the message: the table must be InnoDB with a primary key of \
                         orderable columns"
                    },
                ),
            });
        }
        out
    }

    /// The server's binary log files, oldest first.
    pub async fn binary_logs(&self) -> Result<Vec<LogFile>> {
        catalog::binary_logs(&self.pool, &self.name).await
    }

    /// Bytes of log after `position` on the server now, or `None` when the
    /// position's file is gone (purged).
    pub async fn distance(&self, position: &Position) -> Result<Option<u64>> {
        let logs = self.binary_logs().await?;
        Ok(log_position(position).and_then(|(f, p)| distance(&logs, f, p)))
    }

    /// Starts one run from `from` (the last durable position; `None` for a
    /// pipeline that has captured nothing yet). `follow`: stream until
    /// stopped; otherwise stop at the end of the log as of now.
    /// `pending` lists saved backfill requests (polled while streaming).
    async fn open(
        &self,
        from: Option<&Position>,
        follow: bool,
        requests: Option<Arc<dyn BackfillRequests>>,
    ) -> Result<CdcReader> {
        let server = catalog::preflight(&self.pool, &self.name, self.server_id).await?;
        tracing::debug!(source = %self.name, version = %server.version, server_id = server.server_id, row_image = %server.row_image, "binary log checks passed");
        let mut tables = Vec::new();
        for t in self.tables() {
            let table = catalog::table(&self.pool, &self.name, &t).await?;
            keyless_notice(&self.name, &table);
            tables.push(table);
        }
        let logs = self.binary_logs().await?;
        let purged = |file: &str, p: &Position| -> Result<()> {
            if logs.iter().any(|l| l.name == file) {
                return Ok(());
            }
            Err(Error::new(
                ErrorKind::Resync,
                format!(
                    "source {:?}: the pipeline has captured up to {}, but the server no longer has \
                     binary log {file} (purged or expired; the oldest is {}); the changes since \
                     are lost to caudal, so it stops rather than skip them. `caudal resync \
                     PIPELINE` reads the tables again",
                    self.name,
                    p.display(),
                    logs.first().map_or("none", |l| l.name.as_str())
                ),
            ))
        };
        let start = match from {
            None if self.config.snapshot == CdcSnapshot::Initial => {
                Start::Snapshot { resume: None }
            }
            None => Start::EndOfLog,
            Some(
                p @ Position::BinlogSnapshot {
                    file,
                    pos,
                    table,
                    key,
                },
            ) => {
                purged(file, p)?;
                let index = tables.iter().position(|t| t.name == *table).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "source {:?}: the snapshot stopped in table {table}, which is no longer \
                             configured; `caudal resync` starts over",
                            self.name
                        ),
                    )
                })?;
                Start::Snapshot {
                    resume: Some((index, key.clone(), file.clone(), *pos)),
                }
            }
            Some(
                p @ (Position::BinlogResume { file, pos }
                | Position::BinlogBackfill { file, pos, .. }),
            ) => {
                purged(file, p)?;
                Start::At {
                    file: file.clone(),
                    pos: *pos,
                    skip: None,
                }
            }
            Some(
                p @ Position::Binlog {
                    file, pos, index, ..
                },
            ) => {
                purged(file, p)?;
                Start::At {
                    file: file.clone(),
                    pos: *pos,
                    skip: Some(*index),
                }
            }
            Some(other) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {:?}: the checkpoint {} is not a binary log position; the source \
                         changed since it was saved (see `caudal resync`)",
                        self.name,
                        other.display()
                    ),
                ));
            }
        };
        update_lag(&self.lag, |l| {
            *l = figures(self.server_id);
            if let Some(b) = binlog_figures(l) {
                b.read_position = from.and_then(log_position).map(|(f, p)| format!("{f}:{p}"));
            }
        });
        let (out, pages) = mpsc::channel(2);
        let out_guard = out.clone();
        let (durable_tx, _durable) = watch::channel(from.cloned());
        let stop = CancellationToken::new();
        let task = Task {
            source: self.name.clone(),
            pipeline: self.pipeline.clone(),
            pool: self.pool.clone(),
            opts: self.opts.clone(),
            server_id: self.server_id,
            tables,
            decimals: self.config.decimals,
            page_size: self.config.page_size.max(1) as usize,
            heartbeat: Some(
                self.config
                    .heartbeat
                    .unwrap_or(caudal_core::config::DEFAULT_HEARTBEAT)
                    .as_std(),
            ),
            follow,
            start: Some(start),
            out,
            lag: self.lag.clone(),
            stop: stop.clone(),
            requests,
        };
        crate::sources::change::spawn_reader(task.run(), out_guard);
        tokio::spawn(watch_lag(self.clone(), stop.clone()));
        Ok(CdcReader::new(pages, durable_tx, stop, false))
    }

    /// Rows of `table` matching `filter`, to show a backfill's progress;
    /// also checks that the table and the filter are valid.
    pub async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64> {
        let t = catalog::table(&self.pool, &self.name, table).await?;
        if t.keyless() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {:?}: table {} has no primary key (nor a unique index of NOT NULL \
                     columns): a backfill reads a table in key order and leaves out rows changed \
                     meanwhile by their key, which it cannot do without one; `caudal resync` \
                     reads every table again",
                    self.name, t.name
                ),
            ));
        }
        let sql = match filter {
            Some(f) => format!(
                "SELECT CAST(COUNT(*) AS SIGNED) FROM {} WHERE ({f})",
                t.quoted
            ),
            None => format!("SELECT CAST(COUNT(*) AS SIGNED) FROM {}", t.quoted),
        };
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                query_error(
                    &self.name,
                    &format!("cannot count the rows to backfill in {table}"),
                    e,
                )
            })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// The binary log file and offset a position streams on from.
pub fn log_position(p: &Position) -> Option<(&str, u64)> {
    match p {
        Position::Binlog { file, pos, .. }
        | Position::BinlogSnapshot { file, pos, .. }
        | Position::BinlogResume { file, pos }
        | Position::BinlogBackfill { file, pos, .. } => Some((file.as_str(), *pos)),
        _ => None,
    }
}

/// Measures how far the reader is from the end of the server's log until
/// the run stops.
async fn watch_lag(source: MyCdcSource, stop: CancellationToken) {
    let mut tick = tokio::time::interval(LAG_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(logs) = source.binary_logs().await else {
            continue;
        };
        let mut now = read_lag(&source.lag);
        let read = binlog_figures(&mut now).and_then(|b| b.read_position.clone());
        let end = logs.last().map(|l| format!("{}:{}", l.name, l.size));
        let behind = read.as_deref().and_then(|r| {
            let (f, p) = r.rsplit_once(':')?;
            distance(&logs, f, p.parse().ok()?)
        });
        update_lag(&source.lag, |l| {
            l.lag_bytes = behind;
            if let Some(b) = binlog_figures(l) {
                b.server_position = end;
            }
        });
    }
}

#[async_trait::async_trait]
impl ChangeCapture for MyCdcSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn live(&self) -> Replication {
        read_lag(&self.lag)
    }

    async fn open_run(
        &self,
        from: Option<&Position>,
        follow: bool,
        backfills: Option<Arc<dyn BackfillRequests>>,
    ) -> Result<CdcReader> {
        self.open(from, follow, backfills).await
    }

    async fn server_status(
        &self,
        mut known: Replication,
        checkpoint: Option<&Position>,
    ) -> Replication {
        if !matches!(known.source, ReplicationSource::Mysql(_)) {
            known.source = figures(self.server_id).source;
        }
        let logs = match self.binary_logs().await {
            Ok(logs) => logs,
            Err(e) => {
                known.server_error = Some(format!("unreachable: {e}"));
                return known;
            }
        };
        let at = checkpoint.and_then(log_position);
        let behind = at.and_then(|(file, pos)| distance(&logs, file, pos));
        if let Some(b) = binlog_figures(&mut known) {
            b.server_id = Some(self.server_id);
            if let Some(end) = logs.last() {
                b.server_position = Some(format!("{}:{}", end.name, end.size));
            }
            if let Some((file, pos)) = at {
                b.checkpoint_position = Some(format!("{file}:{pos}"));
                b.log_purged = Some(behind.is_none());
            }
        }
        if let Some(bytes) = behind {
            known.lag_bytes = Some(bytes);
        }
        known
    }

    fn held(&self, _created_publication: bool) -> Option<Held> {
        None
    }

    async fn release(&self, _held: Option<&Held>) -> Result<Released> {
        Ok(Released {
            note: Some(format!(
                "a binary log replica (server_id {}) keeps nothing on the server; nothing to drop",
                self.server_id
            )),
            ..Released::default()
        })
    }

    async fn restart(&self) -> Result<Released> {
        Ok(Released {
            note: Some(
                "the next run reads the tables again and streams the binary log from there".into(),
            ),
            ..Released::default()
        })
    }

    async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64> {
        MyCdcSource::count_rows(self, table, filter).await
    }

    async fn request_backfill(&self, _id: &str) -> Result<()> {
        // The running reader polls the store for requests.
        Ok(())
    }
}

/// Says how a table without a primary key is captured, and what to change
/// for per-row order.
fn keyless_notice(source: &str, t: &catalog::Table) {
    if let Some(index) = &t.unique_index {
        tracing::info!(
            source,
            table = %t.name,
            index = %index,
            "table has no primary key: its unique index of NOT NULL columns keys its changes and orders its snapshot"
        );
    } else if t.keyless() {
        tracing::info!(
            source,
            table = %t.name,
            "table has no primary key: every change is captured (the binary log carries the whole old row of updates and deletes, which identifies them); its changes keep their order across the whole table, its snapshot is read in one pass and read again from its start if interrupted, and it cannot be backfilled; add a primary key for per-row order"
        );
    }
}
