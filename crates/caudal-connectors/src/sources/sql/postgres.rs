//! PostgreSQL: connection, column kinds, row decoding and parameter binding.
//!
//! Type mapping: booleans, integers and floats as JSON numbers/booleans;
//! `numeric` exact (string or number, see `decimals`); `timestamptz` as
//! RFC 3339 in UTC (`2025-05-14T12:34:56.5Z`); `timestamp` as stored, without
//! a zone (`2025-05-14T12:34:56.5`); `date`, `time`, `uuid`, `text`, enums as
//! strings; `interval` as ISO 8601 (`P1Y2M3DT4H5M6S`); `json`/`jsonb` as
//! JSON; `bytea` as base64; arrays of these as JSON arrays; NULL as null.

use std::str::FromStr;

use bigdecimal::BigDecimal;
use caudal_core::config::DecimalFormat;
use caudal_core::record::CursorValue;
use serde_json::Value;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, SqlSafeStr, Column, Executor, PgPool, Postgres, Row, Statement, TypeInfo, ValueRef};

use super::{ColumnKind, ColumnSpec, DecodeOptions, FetchError, decimal_value, format_naive, format_utc};

pub(super) async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name("caudal");
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
}

fn kind(type_name: &str) -> ColumnKind {
    match type_name {
        "INT2" | "INT4" | "INT8" => ColumnKind::Int,
        "FLOAT4" | "FLOAT8" => ColumnKind::Float,
        "NUMERIC" => ColumnKind::Decimal,
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => ColumnKind::Text,
        "TIMESTAMP" => ColumnKind::Timestamp,
        "TIMESTAMPTZ" => ColumnKind::TimestampTz,
        "DATE" => ColumnKind::Date,
        "UUID" => ColumnKind::Uuid,
        other => ColumnKind::Other(other.to_string()),
    }
}

pub(super) async fn describe(pool: &PgPool, sql: String) -> Result<Vec<ColumnSpec>, sqlx::Error> {
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

pub(super) async fn now_utc(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind<'q>(q: PgQuery<'q>, v: &CursorValue) -> Result<PgQuery<'q>, FetchError> {
    let bad = |what: &str, s: &str| FetchError::Decode(format!("checkpoint value {s:?} is not a valid {what}"));
    Ok(match v {
        CursorValue::Int(i) => q.bind(*i),
        CursorValue::Uint(u) => q.bind(BigDecimal::from(*u)),
        CursorValue::Float(f) => q.bind(*f),
        CursorValue::Decimal(s) => q.bind(BigDecimal::from_str(s).map_err(|_| bad("decimal", s))?),
        CursorValue::Text(s) => q.bind(s.clone()),
        CursorValue::Timestamp(s) => q.bind(super::parse_naive(s).ok_or_else(|| bad("timestamp", s))?),
        CursorValue::TimestampTz(s) => q.bind(super::parse_utc(s).ok_or_else(|| bad("timestamptz", s))?),
        CursorValue::Date(s) => q.bind(
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad("date", s))?,
        ),
        CursorValue::Uuid(s) => q.bind(uuid::Uuid::parse_str(s).map_err(|_| bad("uuid", s))?),
    })
}

pub(super) async fn fetch(
    pool: &PgPool,
    sql: &str,
    binds: &[&CursorValue],
    opts: &DecodeOptions,
) -> Result<Vec<super::Row>, FetchError> {
    let decimals = opts.decimals;
    let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
    for v in binds {
        q = bind(q, v)?;
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(|r| decode_row(r, decimals)).collect()
}

fn decode_row(row: &PgRow, decimals: DecimalFormat) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let value = decode(row, i, col.type_info().name(), decimals).map_err(|e| {
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

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

fn arr<T>(v: Option<Vec<Option<T>>>, f: impl Fn(T) -> Value) -> Value {
    v.map_or(Value::Null, |items| {
        Value::Array(items.into_iter().map(|x| x.map_or(Value::Null, &f)).collect())
    })
}

fn decode(row: &PgRow, i: usize, type_name: &str, decimals: DecimalFormat) -> Result<Value, sqlx::Error> {
    if row.try_get_raw(i)?.is_null() {
        return Ok(Value::Null);
    }
    let dec = |d: BigDecimal| decimal_value(d.to_plain_string(), decimals);
    Ok(match type_name {
        "BOOL" => opt(row.try_get::<Option<bool>, _>(i)?, Value::Bool),
        "INT2" => opt(row.try_get::<Option<i16>, _>(i)?, Value::from),
        "INT4" => opt(row.try_get::<Option<i32>, _>(i)?, Value::from),
        "INT8" => opt(row.try_get::<Option<i64>, _>(i)?, Value::from),
        "OID" => opt(row.try_get::<Option<sqlx::postgres::types::Oid>, _>(i)?, |o| Value::from(o.0)),
        "FLOAT4" => opt(row.try_get::<Option<f32>, _>(i)?, |f| float(f64::from(f))),
        "FLOAT8" => opt(row.try_get::<Option<f64>, _>(i)?, float),
        "NUMERIC" => opt(row.try_get::<Option<BigDecimal>, _>(i)?, dec),
        "TIMESTAMPTZ" => opt(
            row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(i)?,
            |t| Value::String(format_utc(&t)),
        ),
        "TIMESTAMP" => opt(row.try_get::<Option<chrono::NaiveDateTime>, _>(i)?, |t| {
            Value::String(format_naive(&t))
        }),
        "DATE" => opt(row.try_get::<Option<chrono::NaiveDate>, _>(i)?, |d| {
            Value::String(d.format("%Y-%m-%d").to_string())
        }),
        "TIME" => opt(row.try_get::<Option<chrono::NaiveTime>, _>(i)?, |t| {
            Value::String(t.format("%H:%M:%S%.f").to_string())
        }),
        "UUID" => opt(row.try_get::<Option<uuid::Uuid>, _>(i)?, |u| Value::String(u.to_string())),
        "JSON" | "JSONB" => row.try_get::<Option<Value>, _>(i)?.unwrap_or(Value::Null),
        "BYTEA" => opt(row.try_get::<Option<Vec<u8>>, _>(i)?, |b| super::base64(&b)),
        "INTERVAL" => opt(row.try_get::<Option<PgInterval>, _>(i)?, |iv| {
            Value::String(iso_interval(&iv))
        }),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" => {
            opt(row.try_get::<Option<String>, _>(i)?, Value::String)
        }
        "BOOL[]" => arr(row.try_get::<Option<Vec<Option<bool>>>, _>(i)?, Value::Bool),
        "INT2[]" => arr(row.try_get::<Option<Vec<Option<i16>>>, _>(i)?, Value::from),
        "INT4[]" => arr(row.try_get::<Option<Vec<Option<i32>>>, _>(i)?, Value::from),
        "INT8[]" => arr(row.try_get::<Option<Vec<Option<i64>>>, _>(i)?, Value::from),
        "FLOAT4[]" => arr(row.try_get::<Option<Vec<Option<f32>>>, _>(i)?, |f| float(f64::from(f))),
        "FLOAT8[]" => arr(row.try_get::<Option<Vec<Option<f64>>>, _>(i)?, float),
        "NUMERIC[]" => arr(row.try_get::<Option<Vec<Option<BigDecimal>>>, _>(i)?, dec),
        "TEXT[]" | "VARCHAR[]" | "BPCHAR[]" | "NAME[]" => {
            arr(row.try_get::<Option<Vec<Option<String>>>, _>(i)?, Value::String)
        }
        "UUID[]" => arr(row.try_get::<Option<Vec<Option<uuid::Uuid>>>, _>(i)?, |u| {
            Value::String(u.to_string())
        }),
        "TIMESTAMPTZ[]" => arr(
            row.try_get::<Option<Vec<Option<chrono::DateTime<chrono::Utc>>>>, _>(i)?,
            |t| Value::String(format_utc(&t)),
        ),
        "TIMESTAMP[]" => arr(row.try_get::<Option<Vec<Option<chrono::NaiveDateTime>>>, _>(i)?, |t| {
            Value::String(format_naive(&t))
        }),
        "DATE[]" => arr(row.try_get::<Option<Vec<Option<chrono::NaiveDate>>>, _>(i)?, |d| {
            Value::String(d.format("%Y-%m-%d").to_string())
        }),
        "JSON[]" | "JSONB[]" => arr(row.try_get::<Option<Vec<Option<Value>>>, _>(i)?, |v| v),
        // Enums and other text-like types travel as their text form.
        _ => opt(row.try_get_unchecked::<Option<String>, _>(i)?, Value::String),
    })
}

/// A float as JSON; NaN and infinities (which JSON cannot hold) as strings.
fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// ISO 8601 duration text of a PostgreSQL interval.
fn iso_interval(iv: &PgInterval) -> String {
    let mut out = String::from("P");
    let (years, months) = (iv.months / 12, iv.months % 12);
    if years != 0 {
        out.push_str(&format!("{years}Y"));
    }
    if months != 0 {
        out.push_str(&format!("{months}M"));
    }
    if iv.days != 0 {
        out.push_str(&format!("{}D", iv.days));
    }
    let micros = iv.microseconds;
    if micros != 0 {
        out.push('T');
        let sign = if micros < 0 { "-" } else { "" };
        let abs = micros.unsigned_abs();
        let (h, rem) = (abs / 3_600_000_000, abs % 3_600_000_000);
        let (m, rem) = (rem / 60_000_000, rem % 60_000_000);
        let (s, us) = (rem / 1_000_000, rem % 1_000_000);
        if h != 0 {
            out.push_str(&format!("{sign}{h}H"));
        }
        if m != 0 {
            out.push_str(&format!("{sign}{m}M"));
        }
        if s != 0 || us != 0 {
            if us == 0 {
                out.push_str(&format!("{sign}{s}S"));
            } else {
                let frac = format!("{us:06}");
                out.push_str(&format!("{sign}{s}.{}S", frac.trim_end_matches('0')));
            }
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_print_as_iso_8601() {
        let iv = PgInterval {
            months: 14,
            days: 3,
            microseconds: 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000,
        };
        assert_eq!(iso_interval(&iv), "P1Y2M3DT4H5M6.5S");
        let zero = PgInterval {
            months: 0,
            days: 0,
            microseconds: 0,
        };
        assert_eq!(iso_interval(&zero), "PT0S");
    }
}
