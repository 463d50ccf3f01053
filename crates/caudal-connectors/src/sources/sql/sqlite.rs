//! SQLite: connection, column kinds, row decoding and parameter binding.
//!
//! SQLite is dynamically typed, so values are decoded by their storage class
//! (integer, real, text, blob, null) and refined by the declared column type:
//! `BOOLEAN` integers as booleans, `JSON` text as JSON, `DECIMAL`/`NUMERIC`
//! per `decimals`, blobs as base64. Timestamps are text as stored; the
//! safety lag compares them with `julianday()`, which reads the ISO 8601
//! layouts SQLite's own date functions produce, in UTC.

use std::str::FromStr;

use caudal_core::record::CursorValue;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, SqlSafeStr, Column, Executor, Row, Sqlite, SqlitePool, Statement, TypeInfo, ValueRef};

use super::{ColumnKind, ColumnSpec, DecodeOptions, FetchError, decimal_value};

pub(super) async fn connect(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
}

fn kind(declared: &str) -> ColumnKind {
    let upper = declared.to_ascii_uppercase();
    if upper.contains("TIMESTAMP") || upper.contains("DATETIME") {
        ColumnKind::Timestamp
    } else if upper == "DATE" {
        ColumnKind::Date
    } else if upper.contains("INT") {
        ColumnKind::Int
    } else if upper.contains("CHAR") || upper.contains("TEXT") || upper.contains("CLOB") {
        ColumnKind::Text
    } else {
        ColumnKind::Other(upper)
    }
}

pub(super) async fn describe(pool: &SqlitePool, sql: String) -> Result<Vec<ColumnSpec>, sqlx::Error> {
    let stmt = pool.prepare(AssertSqlSafe(sql).into_sql_str()).await?;
    Ok(stmt
        .columns()
        .iter()
        .map(|c| ColumnSpec {
            name: c.name().to_string(),
            kind: kind(c.type_info().name()),
        })
        .collect())
}

pub(super) async fn now_utc(pool: &SqlitePool) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    let now: String = sqlx::query_scalar("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")
        .fetch_one(pool)
        .await?;
    super::parse_utc(&now).ok_or_else(|| sqlx::Error::Decode(format!("bad clock value {now:?}").into()))
}

type LiteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind<'q>(q: LiteQuery<'q>, v: &CursorValue) -> LiteQuery<'q> {
    match v {
        CursorValue::Int(i) => q.bind(*i),
        CursorValue::Uint(u) => q.bind(i64::try_from(*u).unwrap_or(i64::MAX)),
        CursorValue::Float(f) => q.bind(*f),
        CursorValue::Decimal(s)
        | CursorValue::Text(s)
        | CursorValue::Timestamp(s)
        | CursorValue::TimestampTz(s)
        | CursorValue::Date(s)
        | CursorValue::Uuid(s) => q.bind(s.clone()),
    }
}

pub(super) async fn fetch(
    pool: &SqlitePool,
    sql: &str,
    binds: &[&CursorValue],
    opts: &DecodeOptions,
) -> Result<Vec<super::Row>, FetchError> {
    let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
    for v in binds {
        q = bind(q, v);
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(|r| decode_row(r, opts)).collect()
}

fn decode_row(row: &SqliteRow, opts: &DecodeOptions) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let declared = col.type_info().name().to_ascii_uppercase();
        let value = decode(row, i, &declared, opts).map_err(|e| {
            FetchError::Decode(format!("column {:?} ({declared}): {e}", col.name()))
        })?;
        out.insert(col.name().to_string(), value);
    }
    Ok(out)
}

fn decode(
    row: &SqliteRow,
    i: usize,
    declared: &str,
    opts: &DecodeOptions,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let storage = raw.type_info().name().to_string();
    Ok(match storage.as_str() {
        "INTEGER" if declared.contains("BOOL") => Value::Bool(row.try_get::<i64, _>(i)? != 0),
        "INTEGER" => Value::from(row.try_get::<i64, _>(i)?),
        "REAL" if declared.contains("DECIMAL") || declared.contains("NUMERIC") => {
            decimal_value(row.try_get::<f64, _>(i)?.to_string(), opts.decimals)
        }
        "REAL" => {
            let f = row.try_get::<f64, _>(i)?;
            serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
        }
        "BLOB" => super::base64(&row.try_get::<Vec<u8>, _>(i)?),
        _ => {
            let text = row.try_get_unchecked::<String, _>(i)?;
            if declared.contains("JSON") || opts.json_columns.contains(row.columns()[i].name()) {
                serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?
            } else if declared.contains("DECIMAL") || declared.contains("NUMERIC") {
                decimal_value(text, opts.decimals)
            } else {
                Value::String(text)
            }
        }
    })
}
