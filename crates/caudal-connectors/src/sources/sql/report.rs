//! Report queries (`mode = "query"`): the rows of one rendered query, read
//! whole and handed to a dataset writer.
//!
//! Promises:
//! - **PostgreSQL at COPY speed.** The query runs as
//!   `COPY (query) TO STDOUT (FORMAT binary)`; values go from the wire
//!   format straight into typed column builders, never through JSON.
//!   Reading and encoding overlap: the encoder runs on a thread of its own,
//!   at most a few chunks behind the reader.
//! - MySQL/MariaDB and SQLite results are decoded as every query of theirs
//!   is (the whole result of one date at once) and written the same way.
//! - The query is the user's own SQL, run as written (with its dates
//!   filled in as literals by the template).

use bytes::BytesMut;
use caudal_core::config::{ColumnType, DecimalFormat, SqlDialect};
use caudal_core::{Error, ErrorKind, Result};
use futures::StreamExt as _;
use sqlx::postgres::PgTypeInfo;
use sqlx::{
    AssertSqlSafe, Column as _, Executor as _, SqlSafeStr as _, Statement as _, TypeInfo as _,
};

use super::postgres_copy::Parser;
use super::{DecodeOptions, Pool, SqlSource};
use crate::sinks::files::columns::{type_of_kind, type_of_pg};
use crate::sinks::files::{RunWriter, StagedPartition};

/// Chunks of COPY data the encoder may lag behind the reader.
const AHEAD: usize = 8;
/// Decoded rows handed to the encoder at once.
const ROWS_AT_ONCE: usize = 1000;
/// Bytes of COPY data handed to the encoder at once.
const CHUNK: usize = 1 << 20;

/// What a report run wrote.
#[derive(Debug)]
pub struct ReportOutput {
    pub partitions: Vec<StagedPartition>,
    pub rows: u64,
    /// The staging directory (S3), removed when dropped.
    pub staging: Option<tempfile::TempDir>,
}

/// The columns of a report query's result, as described by the database.
#[derive(Clone, Debug)]
pub struct ReportColumns {
    /// Names and dataset types, in order.
    pub columns: Vec<(String, ColumnType)>,
    /// PostgreSQL: the columns' types, for decoding binary COPY data.
    pg_types: Option<Vec<PgTypeInfo>>,
}

enum Chunk {
    Copy(bytes::Bytes),
    Rows(Vec<super::Row>),
}

impl SqlSource {
    /// The columns of `sql`'s result, with their dataset types: the query
    /// is prepared once here, and [`Self::run_report`] reuses what it said.
    pub async fn report_columns(&self, sql: &str) -> Result<ReportColumns> {
        let err = |e: sqlx::Error| self.query_error("cannot prepare the report query", e);
        Ok(match &self.pool {
            Pool::Postgres(pool) => {
                let described = pg_describe(pool, sql).await.map_err(err)?;
                ReportColumns {
                    columns: described
                        .iter()
                        .map(|(name, ty)| (name.clone(), type_of_pg(ty.name())))
                        .collect(),
                    pg_types: Some(described.into_iter().map(|(_, t)| t).collect()),
                }
            }
            #[cfg(feature = "mysql")]
            Pool::Mysql(pool) => ReportColumns {
                columns: super::mysql::describe(pool, sql.to_string())
                    .await
                    .map_err(err)?
                    .into_iter()
                    .map(|c| (c.name, type_of_kind(&c.kind)))
                    .collect(),
                pg_types: None,
            },
            Pool::Sqlite(pool) => ReportColumns {
                columns: super::sqlite::describe(pool, sql.to_string())
                    .await
                    .map_err(err)?
                    .into_iter()
                    .map(|c| (c.name, type_of_kind(&c.kind)))
                    .collect(),
                pg_types: None,
            },
        })
    }

    fn query_error(&self, what: &str, e: sqlx::Error) -> Error {
        crate::sources::change::query_error(&self.name, what, e)
    }

    /// Runs report query `sql` and writes its rows with `writer` (made for
    /// `described`, what [`Self::report_columns`] said); returns the staged
    /// partitions.
    pub async fn run_report(
        &self,
        sql: &str,
        described: &ReportColumns,
        mut writer: RunWriter,
    ) -> Result<ReportOutput> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(AHEAD);
        let json = writer.wants_json();
        // JSON Lines are written from decoded rows, not from COPY.
        let pg_types = described.pg_types.clone().filter(|_| !json);
        let name = self.name.clone();
        let encoder = tokio::task::spawn_blocking(move || -> Result<RunWriter> {
            let names: Vec<String> = pg_types
                .as_ref()
                .map(|t| t.iter().map(|t| t.name().to_string()).collect())
                .unwrap_or_default();
            let mut buf = BytesMut::new();
            let mut parser = Parser::default();
            let text = |i: usize, raw: &[u8]| -> std::result::Result<String, String> {
                let ty = pg_types
                    .as_ref()
                    .and_then(|t| t.get(i))
                    .ok_or("no column type")?;
                Ok(
                    match super::postgres::binary_value(ty, raw, DecimalFormat::String)? {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    },
                )
            };
            while let Some(chunk) = rx.blocking_recv() {
                match chunk {
                    Chunk::Copy(data) => {
                        buf.extend_from_slice(&data);
                        while let Some(fields) = parser.next(&mut buf).map_err(|m| {
                            Error::new(ErrorKind::Decode, format!("source {name:?}: {m}"))
                        })? {
                            let values: Vec<Option<&[u8]>> =
                                fields.iter().map(|f| f.as_deref()).collect();
                            writer.push_pg(&values, &names, &text)?;
                        }
                    }
                    Chunk::Rows(rows) => {
                        for row in &rows {
                            writer.push_json(row)?;
                        }
                    }
                }
            }
            if pg_types.is_some() && !parser.ended() {
                return Err(Error::new(
                    ErrorKind::Query,
                    format!("source {name:?}: the report's COPY data ended early"),
                ));
            }
            Ok(writer)
        });
        let read = self.read_report(sql, json, &tx).await;
        drop(tx);
        let writer = encoder
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("the encoder stopped: {e}")))?;
        // A reading error explains an encoder that saw the data stop.
        read?;
        let writer = writer?;
        let rows = writer.rows();
        let (partitions, staging) = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("the encoder stopped: {e}")))??;
        Ok(ReportOutput {
            partitions,
            rows,
            staging,
        })
    }

    async fn read_report(
        &self,
        sql: &str,
        json: bool,
        tx: &tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<()> {
        let send = |chunk: Chunk| async move { tx.send(chunk).await.is_ok() };
        let opts = DecodeOptions {
            decimals: DecimalFormat::String,
            json_columns: Default::default(),
        };
        match &self.pool {
            // JSON Lines: rows decoded as every query of the source is.
            Pool::Postgres(pool) if json => {
                let mut rows = sqlx::query(AssertSqlSafe(sql.to_string())).fetch(pool);
                let mut batch = Vec::with_capacity(ROWS_AT_ONCE);
                while let Some(row) = rows.next().await {
                    let row = row.map_err(|e| self.query_error("reading the report failed", e))?;
                    batch.push(
                        super::postgres::decode_row(&row, DecimalFormat::String)
                            .map_err(|e| self.fetch_error(e))?,
                    );
                    if batch.len() >= ROWS_AT_ONCE
                        && !send(Chunk::Rows(std::mem::take(&mut batch))).await
                    {
                        return Ok(());
                    }
                }
                if !batch.is_empty() {
                    send(Chunk::Rows(batch)).await;
                }
            }
            Pool::Postgres(pool) => {
                let statement = format!(
                    "COPY ({}) TO STDOUT (FORMAT binary)",
                    sql.trim().trim_end_matches(';')
                );
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(|e| self.query_error("cannot connect", e))?;
                let mut stream = conn
                    .copy_out_raw(&statement)
                    .await
                    .map_err(|e| self.query_error("the report query failed", e))?;
                // PostgreSQL sends a message per row: hand them over in
                // chunks of about a megabyte.
                let mut pending = BytesMut::with_capacity(CHUNK);
                while let Some(data) = stream.next().await {
                    let data =
                        data.map_err(|e| self.query_error("reading the report failed", e))?;
                    pending.extend_from_slice(&data);
                    if pending.len() >= CHUNK && !send(Chunk::Copy(pending.split().freeze())).await
                    {
                        // The encoder failed; its error is the one to report.
                        return Ok(());
                    }
                }
                if !pending.is_empty() {
                    send(Chunk::Copy(pending.freeze())).await;
                }
            }
            #[cfg(feature = "mysql")]
            Pool::Mysql(pool) => {
                let rows = super::mysql::fetch(pool, sql, &[], &opts)
                    .await
                    .map_err(|e| self.fetch_error(e))?;
                send(Chunk::Rows(rows)).await;
            }
            Pool::Sqlite(pool) => {
                let rows = super::sqlite::fetch(pool, sql, &[], &opts)
                    .await
                    .map_err(|e| self.fetch_error(e))?;
                send(Chunk::Rows(rows)).await;
            }
        }
        Ok(())
    }

    fn fetch_error(&self, e: super::FetchError) -> Error {
        match e {
            super::FetchError::Sql(e) => self.query_error("the report query failed", e),
            super::FetchError::Decode(m) => {
                Error::new(ErrorKind::Decode, format!("source {:?}: {m}", self.name))
            }
        }
    }

    /// The database this source reads.
    pub fn dialect(&self) -> SqlDialect {
        self.dialect
    }
}

async fn pg_describe(
    pool: &sqlx::PgPool,
    sql: &str,
) -> std::result::Result<Vec<(String, PgTypeInfo)>, sqlx::Error> {
    let stmt = pool
        .prepare(AssertSqlSafe(sql.to_string()).into_sql_str())
        .await?;
    Ok(stmt
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_info().clone()))
        .collect())
}
