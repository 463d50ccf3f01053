//! MySQL and MariaDB: connection, column kinds, row decoding and parameter
//! binding.
//!
//! caudal's sessions use `time_zone = '+00:00'`, so `TIMESTAMP` columns
//! (stored as instants) come out in UTC with a `Z`; `DATETIME` columns are
//! zone-less and come out as stored (fractions in 0, 3 or 6 digits, like
//! every timestamp caudal writes). Zero dates (`0000-00-00`) and dates with
//! a zero month or day are not dates and come out as null. `TIME` is a
//! signed duration `[-]HH:MM:SS[.ffffff]` (hours may exceed 24).
//! `TINYINT(1)`/`BOOLEAN` as booleans (any non-zero value is true),
//! `DECIMAL` exact, `FLOAT` by its shortest decimal form, `BIT` and `YEAR` as
//! numbers, `ENUM`/`SET` as strings (a `SET` as its comma-separated text).
//! Binary strings and blobs (character set `binary`) as base64; text columns
//! as text whatever their collation (MySQL flags `_bin` collations as
//! BINARY too). `JSON` as JSON — on MariaDB, where `JSON` is `LONGTEXT` with
//! a `json_valid` check, the check is read from the catalog for table
//! sources; through a `query` MariaDB gives no sign of it and the JSON text
//! comes out as a string.

use std::collections::HashSet;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use caudal_core::record::CursorValue;
use serde_json::Value;
use sqlx::mysql::types::MySqlTime;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow, MySqlTypeInfo};
use sqlx::{
    AssertSqlSafe, Column, Executor, MySql, MySqlPool, Row, SqlSafeStr, Statement, TypeInfo,
    ValueRef,
};

use super::{
    ColumnKind, ColumnSpec, DecodeOptions, FetchError, decimal_value, format_naive, format_utc,
};

/// A pool of connections to `url` with the source's TLS.
pub(crate) async fn connect(
    url: &str,
    tls: &super::mysql_tls::MysqlTlsFiles,
) -> Result<MySqlPool, sqlx::Error> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let options = MySqlConnectOptions::from_str(&url)?.timezone(Some("+00:00".to_string()));
    let options = tls.apply(options);
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

pub(crate) async fn describe(
    pool: &MySqlPool,
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

/// Columns of `table` that MariaDB declares as `JSON` (a `json_valid`
/// check on a text column).
pub(crate) async fn json_columns(
    pool: &MySqlPool,
    table: &str,
) -> Result<HashSet<String>, sqlx::Error> {
    json_columns_with(pool, table).await
}

/// [`json_columns`] on any connection (a snapshot's transaction).
pub(crate) async fn json_columns_with<'c, E>(
    executor: E,
    table: &str,
) -> Result<HashSet<String>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = MySql>,
{
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
    .fetch_all(executor)
    .await
    .unwrap_or_default();
    Ok(clauses
        .iter()
        .filter_map(|c| {
            let inner = c.trim().strip_prefix("json_valid(")?.strip_suffix(')')?;
            // One quote on each side; a quote inside the name is doubled.
            let quoted = inner.strip_prefix('`')?.strip_suffix('`')?;
            Some(quoted.replace("``", "`"))
        })
        .collect())
}

pub(super) async fn now_utc(
    pool: &MySqlPool,
) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    let now: chrono::NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
        .fetch_one(pool)
        .await?;
    Ok(now.and_utc())
}

pub(crate) type MyQuery<'q> = sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>;

pub(crate) fn bind<'q>(q: MyQuery<'q>, v: &CursorValue) -> Result<MyQuery<'q>, FetchError> {
    let bad = |what: &str, s: &str| {
        FetchError::Decode(format!("checkpoint value {s:?} is not a valid {what}"))
    };
    Ok(match v {
        CursorValue::Int(i) => q.bind(*i),
        CursorValue::Uint(u) => q.bind(*u),
        CursorValue::Float(f) => q.bind(*f),
        CursorValue::Decimal(s) => q.bind(BigDecimal::from_str(s).map_err(|_| bad("decimal", s))?),
        CursorValue::Text(s) | CursorValue::Uuid(s) => q.bind(s.clone()),
        CursorValue::Timestamp(s) => {
            q.bind(super::parse_naive(s).ok_or_else(|| bad("datetime", s))?)
        }
        CursorValue::TimestampTz(s) => {
            q.bind(super::parse_utc(s).ok_or_else(|| bad("timestamp", s))?)
        }
        CursorValue::Date(s) => {
            q.bind(chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad("date", s))?)
        }
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

pub(crate) fn decode_row(row: &MySqlRow, opts: &DecodeOptions) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let json = opts.json_columns.contains(col.name());
        let value = decode(row, i, col.type_info(), json, opts).map_err(|e| {
            FetchError::Decode(format!(
                "column {:?} of type {}: {e}; cast it to a supported type in a `query`",
                col.name(),
                col.type_info().name()
            ))
        })?;
        out.insert(col.name().to_string(), value);
    }
    Ok(out)
}

type DecodeResult = Result<Value, Box<dyn std::error::Error + Send + Sync>>;

fn decode(
    row: &MySqlRow,
    i: usize,
    ty: &MySqlTypeInfo,
    json: bool,
    opts: &DecodeOptions,
) -> DecodeResult {
    if row.try_get_raw(i)?.is_null() {
        return Ok(Value::Null);
    }
    Ok(match ty.name() {
        // TINYINT(1), signed or not: any non-zero value is true.
        "BOOLEAN" => Value::Bool(row.try_get_unchecked::<i64, _>(i)? != 0),
        "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
            Value::from(row.try_get::<i64, _>(i)?)
        }
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED" | "MEDIUMINT UNSIGNED"
        | "BIGINT UNSIGNED" | "YEAR" | "BIT" => Value::from(row.try_get_unchecked::<u64, _>(i)?),
        "FLOAT" => super::postgres::float32(row.try_get::<f32, _>(i)?),
        "DOUBLE" => super::postgres::float(row.try_get::<f64, _>(i)?),
        "DECIMAL" => decimal_value(
            row.try_get::<BigDecimal, _>(i)?.to_plain_string(),
            opts.decimals,
        ),
        "DATETIME" => temporal(row, i, |t: chrono::NaiveDateTime| format_naive(&t))?,
        "TIMESTAMP" => temporal(row, i, |t: chrono::DateTime<chrono::Utc>| format_utc(&t))?,
        "DATE" => temporal(row, i, |d: chrono::NaiveDate| {
            d.format("%Y-%m-%d").to_string()
        })?,
        "TIME" => {
            let t = row.try_get::<MySqlTime, _>(i)?;
            // Not `t.is_negative()`: sqlx 0.9.0 has it backwards.
            let sign = if t.sign().is_negative() { "-" } else { "" };
            Value::String(format!(
                "{sign}{:02}:{:02}:{:02}{}",
                t.hours(),
                t.minutes(),
                t.seconds(),
                super::postgres::fraction(t.microseconds())
            ))
        }
        "JSON" => row.try_get::<Value, _>(i)?,
        "GEOMETRY" => super::base64(&row.try_get_unchecked::<Vec<u8>, _>(i)?),
        "ENUM" | "SET" => Value::String(row.try_get_unchecked::<String, _>(i)?),
        // Strings: text unless the column's character set is `binary`. The
        // BINARY flag alone is no guide: MySQL also sets it on text columns
        // with a `_bin` collation (MariaDB's JSON is `utf8mb4_bin` LONGTEXT).
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" | "CHAR"
        | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" => {
            if !<str as sqlx::Type<MySql>>::compatible(ty) {
                super::base64(&row.try_get_unchecked::<Vec<u8>, _>(i)?)
            } else if json {
                let text = row.try_get::<String, _>(i)?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("invalid JSON in a JSON column: {e}"))?
            } else {
                Value::String(row.try_get::<String, _>(i)?)
            }
        }
        other => return Err(format!("MySQL type {other} has no JSON mapping").into()),
    })
}

/// A date or time value, or null for MySQL's zero dates (`0000-00-00`) and
/// dates with a zero month or day (allowed without `NO_ZERO_DATE` /
/// `NO_ZERO_IN_DATE`), which are not dates and have no faithful form.
fn temporal<'r, T>(row: &'r MySqlRow, i: usize, format: impl FnOnce(T) -> String) -> DecodeResult
where
    T: sqlx::Decode<'r, MySql> + sqlx::Type<MySql>,
{
    match row.try_get::<T, _>(i) {
        Ok(v) => Ok(Value::String(format(v))),
        Err(e) => match row.try_get_unchecked::<&[u8], _>(i) {
            Ok(raw) if zero_date(raw) => Ok(Value::Null),
            _ => Err(e.into()),
        },
    }
}

/// Whether a raw DATE/DATETIME/TIMESTAMP value is a zero date or has a zero
/// month or day. Binary values start with their length (0 for a zero
/// date), then year (2 bytes), month, day; text values are `YYYY-MM-DD...`.
fn zero_date(raw: &[u8]) -> bool {
    match raw {
        [] | [0, ..] => true,
        [len, _, _, month, day, ..] if *len <= 11 => *month == 0 || *day == 0,
        text if text.len() >= 10 && text[0].is_ascii_digit() => {
            &text[5..7] == b"00" || &text[8..10] == b"00"
        }
        _ => false,
    }
}
