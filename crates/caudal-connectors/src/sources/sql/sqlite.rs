//! SQLite: connection, column kinds, row decoding and parameter binding.
//!
//! SQLite is dynamically typed, so values are decoded by their storage class
//! (integer, real, text, blob, null) and refined by the declared column type
//! (read from the table's schema, also for columns of a `query`):
//! `BOOLEAN` integers as booleans, `JSON` text as JSON, `DECIMAL`/`NUMERIC`
//! values per `decimals` (SQLite keeps them as integers or doubles when it
//! can, so `12.50` reads as `"12.5"`), blobs as base64, infinite reals as
//! `"Infinity"`/`"-Infinity"`. Timestamps are values as stored (usually
//! text); the safety lag compares them with `julianday()`, which reads the
//! ISO 8601 layouts SQLite's own date functions produce, in UTC.

use std::collections::HashMap;
use std::str::FromStr;

use caudal_core::record::CursorValue;
use serde_json::Value;
use sqlx::ColumnOrigin;
use sqlx::sqlite::{SqliteColumn, SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{
    AssertSqlSafe, Column, Executor, Row, SqlSafeStr, Sqlite, SqlitePool, Statement, TypeInfo,
    ValueRef,
};

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

pub(super) async fn describe(
    pool: &SqlitePool,
    sql: String,
) -> Result<Vec<ColumnSpec>, sqlx::Error> {
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

pub(super) async fn now_utc(
    pool: &SqlitePool,
) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    let now: String = sqlx::query_scalar("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")
        .fetch_one(pool)
        .await?;
    super::parse_utc(&now)
        .ok_or_else(|| sqlx::Error::Decode(format!("bad clock value {now:?}").into()))
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
    let declared = match rows.first() {
        Some(row) => declared_types(pool, row.columns()).await?,
        None => Vec::new(),
    };
    rows.iter()
        .map(|r| decode_row(r, &declared, opts))
        .collect()
}

/// The declared type of each result column, upper-cased.
///
/// sqlx reports a declared type only when it knows it (`BOOLEAN`, `INTEGER`,
/// `TEXT`, `DATETIME`, ...) and otherwise the storage class of the value at
/// hand, so `JSON`, `DECIMAL` and `NUMERIC` columns would lose their meaning.
/// Columns that come from a table, also through a `query`, are looked up in
/// the table's schema instead; expressions keep what sqlx reports.
async fn declared_types(
    pool: &SqlitePool,
    columns: &[SqliteColumn],
) -> Result<Vec<String>, sqlx::Error> {
    let mut schemas: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut out = Vec::with_capacity(columns.len());
    for col in columns {
        let fallback = col.type_info().name().to_ascii_uppercase();
        let ColumnOrigin::Table(origin) = col.origin() else {
            out.push(fallback);
            continue;
        };
        if !schemas.contains_key(&*origin.table) {
            let types = table_types(pool, &origin.table).await?;
            schemas.insert(origin.table.to_string(), types);
        }
        let declared = schemas
            .get(&*origin.table)
            .and_then(|types| types.get(&*origin.name))
            .filter(|t| !t.is_empty())
            .map_or(fallback, |t| t.to_ascii_uppercase());
        out.push(declared);
    }
    Ok(out)
}

/// Column name → declared type of a table (`table` or `schema.table`, as
/// sqlx names a column's origin).
async fn table_types(
    pool: &SqlitePool,
    table: &str,
) -> Result<HashMap<String, String>, sqlx::Error> {
    let query = "SELECT name, type FROM pragma_table_xinfo(?1, ?2)";
    let rows: Vec<(String, String)> = sqlx::query_as(query)
        .bind(table)
        .bind("main")
        .fetch_all(pool)
        .await?;
    if !rows.is_empty() {
        return Ok(rows.into_iter().collect());
    }
    let Some((schema, name)) = table.split_once('.') else {
        return Ok(HashMap::new());
    };
    let rows: Vec<(String, String)> = sqlx::query_as(query)
        .bind(name)
        .bind(schema)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

fn decode_row(
    row: &SqliteRow,
    declared: &[String],
    opts: &DecodeOptions,
) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let declared = declared.get(i).map_or("", String::as_str);
        let value = decode(row, i, declared, opts).map_err(|e| {
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
    let decimal = declared.contains("DECIMAL") || declared.contains("NUMERIC");
    let storage = raw.type_info().name().to_string();
    Ok(match storage.as_str() {
        "INTEGER" if declared.contains("BOOL") => Value::Bool(row.try_get::<i64, _>(i)? != 0),
        // NUMERIC affinity stores `12.00` as the integer 12: still a decimal.
        "INTEGER" if decimal => decimal_value(row.try_get::<i64, _>(i)?.to_string(), opts.decimals),
        "INTEGER" => Value::from(row.try_get::<i64, _>(i)?),
        "REAL" => {
            let f = row.try_get::<f64, _>(i)?;
            if decimal && f.is_finite() {
                decimal_value(f.to_string(), opts.decimals)
            } else {
                super::postgres::float(f)
            }
        }
        "BLOB" => super::base64(&row.try_get::<Vec<u8>, _>(i)?),
        _ => {
            let text = row.try_get_unchecked::<String, _>(i)?;
            if declared.contains("JSON") || opts.json_columns.contains(row.columns()[i].name()) {
                serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?
            } else if decimal {
                decimal_value(text, opts.decimals)
            } else {
                Value::String(text)
            }
        }
    })
}
