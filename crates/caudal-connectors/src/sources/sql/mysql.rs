//! MySQL and MariaDB: connection, column kinds, row decoding and parameter
//! binding.
//!
//! caudal's sessions use `time_zone = '+00:00'`, so `TIMESTAMP` columns
//! (stored as instants) come out in UTC with a `Z`; `DATETIME` columns are
//! zone-less and come out as stored. `TINYINT(1)`/`BOOLEAN` as booleans,
//! `DECIMAL` exact, `BIT` and `YEAR` as numbers, `ENUM`/`SET` as strings
//! (a `SET` as its comma-separated text), binary strings and blobs as
//! base64, `JSON` as JSON — on MariaDB, where `JSON` is `LONGTEXT` with a
//! `json_valid` check, the check is read from the catalog for table sources.

use std::collections::HashSet;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use caudal_core::record::CursorValue;
use serde_json::Value;
use sqlx::mysql::types::MySqlTime;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, SqlSafeStr, Column, Executor, MySql, MySqlPool, Row, Statement, TypeInfo, ValueRef};

use super::{ColumnKind, ColumnSpec, DecodeOptions, FetchError, decimal_value, format_naive, format_utc};

pub(super) async fn connect(url: &str) -> Result<MySqlPool, sqlx::Error> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let options = MySqlConnectOptions::from_str(&url)?.timezone(Some("+00:00".to_string()));
    MySqlPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
}

fn kind(type_name: &str) -> ColumnKind {
    match type_name {
        "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" | "YEAR" => ColumnKind::Int,
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED" | "MEDIUMINT UNSIGNED"
        | "BIGINT UNSIGNED" => ColumnKind::Uint,
        "FLOAT" | "DOUBLE" => ColumnKind::Float,
        "DECIMAL" => ColumnKind::Decimal,
        "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" => ColumnKind::Text,
        "DATETIME" => ColumnKind::Timestamp,
        "TIMESTAMP" => ColumnKind::TimestampTz,
        "DATE" => ColumnKind::Date,
        other => ColumnKind::Other(other.to_string()),
    }
}

pub(super) async fn describe(pool: &MySqlPool, sql: String) -> Result<Vec<ColumnSpec>, sqlx::Error> {
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

/// Columns of `table` that MariaDB declares as `JSON` (a `json_valid`
/// check on a text column).
pub(super) async fn json_columns(pool: &MySqlPool, table: &str) -> Result<HashSet<String>, sqlx::Error> {
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s.to_string()), n.to_string()),
        None => (None, table.to_string()),
    };
    let clauses: Vec<String> = sqlx::query_scalar(
        "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
         WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    Ok(clauses
        .iter()
        .filter_map(|c| {
            let inner = c.trim().strip_prefix("json_valid(")?.strip_suffix(')')?;
            Some(inner.trim_matches('`').replace("``", "`"))
        })
        .collect())
}

pub(super) async fn now_utc(pool: &MySqlPool) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    let now: chrono::NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)").fetch_one(pool).await?;
    Ok(now.and_utc())
}

type MyQuery<'q> = sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>;

fn bind<'q>(q: MyQuery<'q>, v: &CursorValue) -> Result<MyQuery<'q>, FetchError> {
    let bad = |what: &str, s: &str| FetchError::Decode(format!("checkpoint value {s:?} is not a valid {what}"));
    Ok(match v {
        CursorValue::Int(i) => q.bind(*i),
        CursorValue::Uint(u) => q.bind(*u),
        CursorValue::Float(f) => q.bind(*f),
        CursorValue::Decimal(s) => q.bind(BigDecimal::from_str(s).map_err(|_| bad("decimal", s))?),
        CursorValue::Text(s) | CursorValue::Uuid(s) => q.bind(s.clone()),
        CursorValue::Timestamp(s) => q.bind(super::parse_naive(s).ok_or_else(|| bad("datetime", s))?),
        CursorValue::TimestampTz(s) => q.bind(super::parse_utc(s).ok_or_else(|| bad("timestamp", s))?),
        CursorValue::Date(s) => q.bind(
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad("date", s))?,
        ),
    })
}

pub(super) async fn fetch(
    pool: &MySqlPool,
    sql: &str,
    binds: &[&CursorValue],
    opts: &DecodeOptions,
) -> Result<Vec<super::Row>, FetchError> {
    let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
    for v in binds {
        q = bind(q, v)?;
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(|r| decode_row(r, opts)).collect()
}

fn decode_row(row: &MySqlRow, opts: &DecodeOptions) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let type_name = col.type_info().name();
        let json = opts.json_columns.contains(col.name());
        let value = decode(row, i, type_name, json, opts).map_err(|e| {
            FetchError::Decode(format!(
                "column {:?} of type {type_name}: {e}; cast it to a supported type in a `query`",
                col.name()
            ))
        })?;
        out.insert(col.name().to_string(), value);
    }
    Ok(out)
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

fn decode(
    row: &MySqlRow,
    i: usize,
    type_name: &str,
    json: bool,
    opts: &DecodeOptions,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    if row.try_get_raw(i)?.is_null() {
        return Ok(Value::Null);
    }
    Ok(match type_name {
        "BOOLEAN" => opt(row.try_get::<Option<i8>, _>(i)?, |b| Value::Bool(b != 0)),
        "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
            opt(row.try_get::<Option<i64>, _>(i)?, Value::from)
        }
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED" | "MEDIUMINT UNSIGNED"
        | "BIGINT UNSIGNED" | "YEAR" | "BIT" => opt(row.try_get::<Option<u64>, _>(i)?, Value::from),
        "FLOAT" => opt(row.try_get::<Option<f32>, _>(i)?, |f| float(f64::from(f))),
        "DOUBLE" => opt(row.try_get::<Option<f64>, _>(i)?, float),
        "DECIMAL" => opt(row.try_get::<Option<BigDecimal>, _>(i)?, |d| {
            decimal_value(d.to_plain_string(), opts.decimals)
        }),
        "DATETIME" => opt(row.try_get::<Option<chrono::NaiveDateTime>, _>(i)?, |t| {
            Value::String(format_naive(&t))
        }),
        "TIMESTAMP" => opt(
            row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(i)?,
            |t| Value::String(format_utc(&t)),
        ),
        "DATE" => opt(row.try_get::<Option<chrono::NaiveDate>, _>(i)?, |d| {
            Value::String(d.format("%Y-%m-%d").to_string())
        }),
        "TIME" => opt(row.try_get::<Option<MySqlTime>, _>(i)?, |t| Value::String(t.to_string())),
        "JSON" => row.try_get::<Option<Value>, _>(i)?.unwrap_or(Value::Null),
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" | "GEOMETRY" => {
            opt(row.try_get::<Option<Vec<u8>>, _>(i)?, |b| super::base64(&b))
        }
        _ if json => match row.try_get::<Option<String>, _>(i)? {
            None => Value::Null,
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| format!("invalid JSON in a json_valid column: {e}"))?,
        },
        // CHAR, VARCHAR, TEXT kinds, ENUM, SET.
        _ => opt(row.try_get_unchecked::<Option<String>, _>(i)?, Value::String),
    })
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}
