//! The first load of a PostgreSQL table source: a pipeline with no
//! checkpoint reads the whole table with binary `COPY` in ctid ranges, in
//! parallel, inside one snapshot ([`super::postgres_copy`]), instead of
//! paging through it by cursor; then it goes on by cursor.
//!
//! Promises:
//! - **Nothing skipped, nothing read twice, as the cursor would.** The load
//!   reads exactly the rows whose cursor is at or below its high-water mark
//!   (the largest cursor among rows older than the safety lag, found in the
//!   load's own snapshot). Once it is done, the checkpoint is that mark and
//!   the next run reads by cursor after it: rows changed or added during
//!   the load have a later cursor and come then.
//! - **Resumable.** Each record's position is its ctid under the mark; a
//!   run that stopped midway reads on after the last durable ctid, in a new
//!   snapshot, with the same mark (rows that moved in between carry a new
//!   cursor, above the mark, and come with the next run by cursor).
//! - **The same records as the cursor path.** Columns are decoded by the
//!   decoder queries use and encoded in column order.

use std::sync::{Arc, OnceLock};

use caudal_core::record::{CursorValue, Json, ObjectWriter, Position, Record};
use caudal_core::sink::key_text;
use caudal_core::{Error, ErrorKind, Result};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection as _, PgPool};

use super::postgres_copy::{self, Chunks, CopyTable, Ctid, RowBuilder};
use super::{ColumnKind, DecodeOptions, FetchError};

/// The reading of one first load.
#[derive(Debug)]
pub struct FirstLoad {
    chunks: Chunks<Record>,
    hwm: Vec<CursorValue>,
    ended: bool,
}

/// What a first load reads.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub source: &'a str,
    /// `"schema"."table"`.
    pub relation: String,
    /// The columns to read (`*` or a quoted list).
    pub select: String,
    /// Quoted cursor columns, most significant first.
    pub cursor: Vec<String>,
    pub cursor_names: &'a [String],
    pub cursor_kinds: &'a [ColumnKind],
    /// Rows whose first cursor column is after this wait for a later run.
    pub bound: Option<&'a CursorValue>,
    pub decode: &'a DecodeOptions,
    /// The column records are keyed by.
    pub key_field: Option<&'a str>,
}

impl FirstLoad {
    /// Starts a first load, or resumes one (`resume`: its mark and the last
    /// durable ctid). `None` when the table holds no row to load.
    pub(crate) async fn start(
        pool: &PgPool,
        plan: Plan<'_>,
        resume: Option<(Vec<CursorValue>, Ctid)>,
    ) -> Result<Option<Self>> {
        let source = plan.source;
        let err = |what: &str, e: sqlx::Error| {
            crate::sources::change::query_error(source, &format!("first load: {what}"), e)
        };
        let mut conn = pool.acquire().await.map_err(|e| err("cannot connect", e))?;
        let mut txn = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| err("cannot start", e))?;
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut *txn)
            .await
            .map_err(|e| err("cannot export a snapshot", e))?;
        let (hwm, after) = match resume {
            Some((hwm, ctid)) => (hwm, Some(ctid)),
            None => match high_water_mark(&mut txn, &plan).await? {
                Some(hwm) => (hwm, None),
                None => return Ok(None),
            },
        };
        let literals: Vec<String> = hwm.iter().map(literal).collect();
        let filter = format!("({}) <= ({})", plan.cursor.join(", "), literals.join(", "));
        let workers = std::thread::available_parallelism()
            .map_or(2, std::num::NonZero::get)
            .clamp(1, 4);
        let builder = Arc::new(LoadRows {
            hwm: hwm.clone(),
            key_field: plan.key_field.map(str::to_string),
            key_at: OnceLock::new(),
        });
        let chunks = postgres_copy::read(
            &pool.connect_options(),
            &snapshot,
            CopyTable {
                source: source.to_string(),
                quoted: plan.relation.clone(),
                select: plan.select.clone(),
                filter: Some(filter),
                after,
                decimals: plan.decode.decimals,
            },
            workers,
            builder,
        )
        .await?;
        // Every reader has imported the snapshot: it may go.
        txn.commit().await.map_err(|e| err("cannot end", e))?;
        tracing::info!(source, table = %plan.relation, workers, resumed = after.is_some(), "first load: reading the table in ctid ranges");
        Ok(Some(Self {
            chunks,
            hwm,
            ended: false,
        }))
    }

    /// The next page of records; after the last, a marker that moves the
    /// checkpoint to the mark; then `None`.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        if self.ended {
            return Ok(None);
        }
        match self.chunks.next().await? {
            Some(rows) => Ok(Some(rows)),
            None => {
                self.ended = true;
                Ok(Some(vec![Record {
                    data: ObjectWriter::default().finish(),
                    position: Position::FirstLoadDone {
                        hwm: self.hwm.clone(),
                    },
                    key: None,
                }]))
            }
        }
    }
}

/// The largest cursor among the rows the load takes, in the load's
/// snapshot; `None` for an empty table.
async fn high_water_mark(
    conn: &mut sqlx::PgConnection,
    plan: &Plan<'_>,
) -> Result<Option<Vec<CursorValue>>> {
    let order: Vec<String> = plan.cursor.iter().map(|c| format!("{c} DESC")).collect();
    let filter = match plan.bound {
        Some(b) => format!(" WHERE {} <= {}", plan.cursor[0], literal(b)),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {}{filter} ORDER BY {} LIMIT 1",
        plan.cursor.join(", "),
        plan.relation,
        order.join(", ")
    );
    // A prepared query, so the row comes in the binary format the decoder
    // reads.
    let row = sqlx::query(AssertSqlSafe(sql))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| {
            crate::sources::change::query_error(
                plan.source,
                "first load: cannot find the cursor's high-water mark",
                e,
            )
        })?;
    let Some(row) = row else {
        return Ok(None);
    };
    let values = super::postgres::decode_row(&row, plan.decode.decimals).map_err(|e| match e {
        FetchError::Sql(e) => crate::sources::change::query_error(plan.source, "first load", e),
        FetchError::Decode(m) => {
            Error::new(ErrorKind::Decode, format!("source {:?}: {m}", plan.source))
        }
    })?;
    plan.cursor_names
        .iter()
        .zip(plan.cursor_kinds)
        .map(|(name, kind)| {
            let v = values.get(name).unwrap_or(&Value::Null);
            kind.cursor_value(name, v)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A cursor value as a SQL literal of its type (`COPY` takes no
/// parameters): strings quoted with `'` doubled.
fn literal(v: &CursorValue) -> String {
    let quoted = |s: &str, ty: &str| format!("'{}'::{ty}", s.replace('\'', "''"));
    match v {
        CursorValue::Int(i) => i.to_string(),
        CursorValue::Uint(u) => format!("{u}::numeric"),
        CursorValue::Float(f) => format!("'{f}'::float8"),
        CursorValue::Decimal(s) => quoted(s, "numeric"),
        CursorValue::Text(s) => quoted(s, "text"),
        CursorValue::Timestamp(s) => quoted(s, "timestamp"),
        CursorValue::TimestampTz(s) => quoted(s, "timestamptz"),
        CursorValue::Date(s) => quoted(s, "date"),
        CursorValue::Uuid(s) => quoted(s, "uuid"),
    }
}

/// Builds each loaded row's record, encoded once.
#[derive(Debug)]
struct LoadRows {
    hwm: Vec<CursorValue>,
    key_field: Option<String>,
    /// Where the key field is among the columns (found on the first row).
    key_at: OnceLock<Option<usize>>,
}

impl RowBuilder for LoadRows {
    type Row = Record;

    fn build(&self, (page, tuple): Ctid, names: &[String], values: Vec<Value>) -> Result<Record> {
        let key_at = *self.key_at.get_or_init(|| {
            self.key_field
                .as_ref()
                .and_then(|k| names.iter().position(|n| n == k))
        });
        let key = key_at.and_then(|i| key_text(values.get(i).cloned()));
        let mut w = ObjectWriter::with_capacity(names.len() * 24);
        for (name, value) in names.iter().zip(&values) {
            w.key(name).value(value);
        }
        let data: Json = w.finish();
        Ok(Record {
            data,
            position: Position::FirstLoad {
                hwm: self.hwm.clone(),
                page,
                tuple,
            },
            key,
        })
    }
}
