//! PostgreSQL: connection, column kinds, row decoding and parameter binding.
//!
//! Type mapping: booleans, integers and floats as JSON booleans/numbers
//! (`real` by its shortest decimal form; NaN and infinities as the strings
//! `"NaN"`, `"Infinity"`, `"-Infinity"`); `numeric` exact (string or number,
//! see `decimals`; `NaN`/`Infinity` always strings); `timestamptz` as RFC 3339
//! in UTC (`2025-05-14T12:34:56.500Z`, fractions in 0, 3 or 6 digits);
//! `timestamp` as stored, without a zone (`2025-05-14T12:34:56.500`); dates
//! and timestamps `infinity`/`-infinity` as those strings, years BC as
//! ISO 8601 astronomical years (`-0043-03-15` is 44 BC); `date`, `time`
//! (`24:00:00` kept), `timetz` (`12:00:00+05:30`), `uuid`, text types, enums,
//! `inet`/`cidr`, `macaddr`, `bit`/`varbit` (`"1010"`) as strings; `interval`
//! as ISO 8601 (`P1Y2M3DT4H5M6S`); `json`/`jsonb` as JSON; `bytea` as base64;
//! domains as their base type; arrays of any of these as JSON arrays (nested
//! for several dimensions, NULL elements as null); NULL as null. Other types
//! (`money`, ranges, composites, geometry, ...) are a decode error naming
//! the column and suggesting a cast in a `query`.

use std::str::FromStr;

use bigdecimal::BigDecimal;
use caudal_core::config::DecimalFormat;
use caudal_core::record::{CursorValue, ObjectWriter};
use serde_json::Value;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{
    PgConnectOptions, PgPoolOptions, PgRow, PgTypeInfo, PgTypeKind, PgValueFormat,
};
use sqlx::{
    AssertSqlSafe, Column, Executor, PgPool, Postgres, Row, SqlSafeStr, Statement, TypeInfo,
    ValueRef,
};

use super::{
    ColumnKind, ColumnSpec, DecodeOptions, FetchError, decimal_value, format_naive, format_utc,
};

pub(super) async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    connect_pool(url, 2).await
}

/// A pool of at most `max` connections to `url`.
pub(crate) async fn connect_pool(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name("caudal");
    PgPoolOptions::new()
        .max_connections(max)
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
            kind: kind_of(c.type_info()),
        })
        .collect())
}

/// The kind of a column's type; a domain has the kind of its base type.
pub(crate) fn kind_of(ty: &PgTypeInfo) -> ColumnKind {
    match ty.kind() {
        PgTypeKind::Domain(base) => kind_of(base),
        _ => kind(ty.name()),
    }
}

pub(super) async fn now_utc(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

pub(crate) fn bind<'q>(q: PgQuery<'q>, v: &CursorValue) -> Result<PgQuery<'q>, FetchError> {
    let bad = |what: &str, s: &str| {
        FetchError::Decode(format!("checkpoint value {s:?} is not a valid {what}"))
    };
    Ok(match v {
        CursorValue::Int(i) => q.bind(*i),
        CursorValue::Uint(u) => q.bind(BigDecimal::from(*u)),
        CursorValue::Float(f) => q.bind(*f),
        CursorValue::Decimal(s) => q.bind(BigDecimal::from_str(s).map_err(|_| bad("decimal", s))?),
        CursorValue::Text(s) => q.bind(s.clone()),
        CursorValue::Timestamp(s) => match Infinity::<chrono::NaiveDateTime>::parse(s) {
            Some(inf) => q.bind(inf),
            None => q.bind(super::parse_naive(s).ok_or_else(|| bad("timestamp", s))?),
        },
        CursorValue::TimestampTz(s) => match Infinity::<chrono::DateTime<chrono::Utc>>::parse(s) {
            Some(inf) => q.bind(inf),
            None => q.bind(parse_utc(s).ok_or_else(|| bad("timestamptz", s))?),
        },
        CursorValue::Date(s) => match Infinity::<chrono::NaiveDate>::parse(s) {
            Some(inf) => q.bind(inf),
            None => q.bind(
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad("date", s))?,
            ),
        },
        CursorValue::Uuid(s) => q.bind(uuid::Uuid::parse_str(s).map_err(|_| bad("uuid", s))?),
    })
}

/// A `timestamptz` cursor value as written by `format_utc`. RFC 3339 has
/// only years 0000 to 9999; PostgreSQL also has years BC (written `-0043`,
/// ISO 8601's astronomical numbering) and after 9999 (`+12025`).
fn parse_utc(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    super::parse_utc(s).or_else(|| {
        let naive = s.strip_suffix('Z')?;
        super::parse_naive(naive).map(|t| t.and_utc())
    })
}

/// PostgreSQL's `infinity` or `-infinity` as a `timestamp`, `timestamptz`
/// or `date` parameter (`T` names which), so a checkpoint at an infinite
/// cursor value can be resumed from: chrono cannot hold these values.
struct Infinity<T> {
    positive: bool,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Infinity<T> {
    fn parse(s: &str) -> Option<Self> {
        let positive = match s {
            "infinity" => true,
            "-infinity" => false,
            _ => return None,
        };
        Some(Self {
            positive,
            _type: std::marker::PhantomData,
        })
    }
}

impl<T: sqlx::Type<Postgres>> sqlx::Type<Postgres> for Infinity<T> {
    fn type_info() -> PgTypeInfo {
        T::type_info()
    }
}

impl<T: sqlx::Type<Postgres>> sqlx::Encode<'_, Postgres> for Infinity<T> {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, Box<dyn std::error::Error + Send + Sync>> {
        // Dates are 4-byte day counts, timestamps 8-byte microsecond counts;
        // the extreme values stand for the infinities.
        if T::type_info() == <chrono::NaiveDate as sqlx::Type<Postgres>>::type_info() {
            let v = if self.positive { i32::MAX } else { i32::MIN };
            buf.extend_from_slice(&v.to_be_bytes());
        } else {
            let v = if self.positive { i64::MAX } else { i64::MIN };
            buf.extend_from_slice(&v.to_be_bytes());
        }
        Ok(sqlx::encode::IsNull::No)
    }
}

/// The rows of `sql`, each encoded as its record as it is decoded, with
/// the values of the `pick` columns (see [`super::EncodedRow`]).
pub(super) async fn fetch(
    pool: &PgPool,
    sql: &str,
    binds: &[&CursorValue],
    opts: &DecodeOptions,
    pick: &[&str],
) -> Result<Vec<super::EncodedRow>, FetchError> {
    let decimals = opts.decimals;
    let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
    for v in binds {
        q = bind(q, v)?;
    }
    let rows = q.fetch_all(pool).await?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    // Where each picked column is in the result.
    let at: Vec<Option<usize>> = pick
        .iter()
        .map(|name| first.columns().iter().position(|c| c.name() == *name))
        .collect();
    rows.iter()
        .map(|row| {
            let mut out = ObjectWriter::with_capacity(row.len() * 24);
            let mut picked = vec![Value::Null; pick.len()];
            for (i, col) in row.columns().iter().enumerate() {
                let value = column(row, i, col, decimals)?;
                out.key(col.name()).value(&value);
                // A column may be picked twice (the key field is often the
                // cursor's last column).
                for (slot, _) in picked.iter_mut().zip(&at).filter(|(_, a)| **a == Some(i)) {
                    *slot = value.clone();
                }
            }
            Ok(super::EncodedRow {
                data: out.finish(),
                picked,
            })
        })
        .collect()
}

/// Column `i` of `row`, decoded, or an error naming the column.
fn column(
    row: &PgRow,
    i: usize,
    col: &sqlx::postgres::PgColumn,
    decimals: DecimalFormat,
) -> Result<Value, FetchError> {
    let ty = col.type_info();
    decode(row, i, ty, decimals).map_err(|e| {
        FetchError::Decode(format!(
            "column {:?} of type {}: {e}; cast it to a supported type in a `query` \
             (e.g. `{}::text`)",
            col.name(),
            ty.name(),
            super::quote_ident(caudal_core::config::SqlDialect::Postgres, col.name())
        ))
    })
}

pub(crate) fn decode_row(row: &PgRow, decimals: DecimalFormat) -> Result<super::Row, FetchError> {
    let mut out = super::Row::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        out.insert(col.name().to_string(), column(row, i, col, decimals)?);
    }
    Ok(out)
}

/// One value of a row. Values are decoded from PostgreSQL's binary wire
/// format here rather than through chrono/bigdecimal conversions, so values
/// those types cannot hold (`infinity`, numeric `NaN`, `24:00:00`, arrays of
/// several dimensions) map faithfully instead of failing or panicking.
fn decode(
    row: &PgRow,
    i: usize,
    ty: &PgTypeInfo,
    decimals: DecimalFormat,
) -> Result<Value, String> {
    let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    match raw.format() {
        PgValueFormat::Binary => {
            let bytes = raw.as_bytes().map_err(|e| e.to_string())?;
            binary_value(ty, bytes, decimals)
        }
        // Extended-protocol queries always ask for binary results.
        PgValueFormat::Text => Err("unexpected text-format value".into()),
    }
}

/// Decodes one value in binary format, by its type (arrays element-wise).
pub(crate) fn binary_value(
    ty: &PgTypeInfo,
    b: &[u8],
    decimals: DecimalFormat,
) -> Result<Value, String> {
    match ty.kind() {
        PgTypeKind::Enum(_) => text(b),
        PgTypeKind::Domain(base) => binary_value(base, b, decimals),
        PgTypeKind::Array(elem) => array(elem, b, decimals),
        PgTypeKind::Simple | PgTypeKind::Pseudo => scalar(ty.name(), b, decimals),
        PgTypeKind::Composite(_) | PgTypeKind::Range(_) => Err(unmapped(ty.name())),
    }
}

fn unmapped(type_name: &str) -> String {
    format!("PostgreSQL type {type_name} has no JSON mapping")
}

fn scalar(type_name: &str, b: &[u8], decimals: DecimalFormat) -> Result<Value, String> {
    // Built-in types are named in capitals, types sqlx looks up in the
    // catalog (`xml`, extension types such as `citext`) as PostgreSQL does.
    Ok(match type_name.to_ascii_uppercase().as_str() {
        "BOOL" => Value::Bool(fixed::<1>(b)?[0] != 0),
        "INT2" => Value::from(i16::from_be_bytes(fixed(b)?)),
        "INT4" => Value::from(i32::from_be_bytes(fixed(b)?)),
        "INT8" => Value::from(i64::from_be_bytes(fixed(b)?)),
        "OID" => Value::from(u32::from_be_bytes(fixed(b)?)),
        "FLOAT4" => float32(f32::from_be_bytes(fixed(b)?)),
        "FLOAT8" => float(f64::from_be_bytes(fixed(b)?)),
        "NUMERIC" => match numeric_text(b)? {
            Numeric::Finite(text) => decimal_value(text, decimals),
            Numeric::Special(text) => Value::String(text.into()),
        },
        "TIMESTAMPTZ" => Value::String(match i64::from_be_bytes(fixed(b)?) {
            i64::MAX => "infinity".into(),
            i64::MIN => "-infinity".into(),
            us => format_utc(&timestamp(us)?.and_utc()),
        }),
        "TIMESTAMP" => Value::String(match i64::from_be_bytes(fixed(b)?) {
            i64::MAX => "infinity".into(),
            i64::MIN => "-infinity".into(),
            us => format_naive(&timestamp(us)?),
        }),
        "DATE" => Value::String(match i32::from_be_bytes(fixed(b)?) {
            i32::MAX => "infinity".into(),
            i32::MIN => "-infinity".into(),
            days => date(days)?.format("%Y-%m-%d").to_string(),
        }),
        "TIME" => Value::String(time_of_day(i64::from_be_bytes(fixed(b)?))?),
        "TIMETZ" => {
            let b = fixed::<12>(b)?;
            let us = i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            // PostgreSQL sends the zone as seconds west of UTC.
            let west = i32::from_be_bytes([b[8], b[9], b[10], b[11]]);
            Value::String(format!(
                "{}{}",
                time_of_day(us)?,
                utc_offset(west.saturating_neg())
            ))
        }
        "INTERVAL" => {
            let b = fixed::<16>(b)?;
            let iv = PgInterval {
                microseconds: i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                days: i32::from_be_bytes([b[8], b[9], b[10], b[11]]),
                months: i32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            };
            Value::String(iso_interval(&iv))
        }
        "UUID" => Value::String(uuid::Uuid::from_bytes(fixed(b)?).to_string()),
        "JSON" => json(b)?,
        "JSONB" => match b.split_first() {
            Some((1, rest)) => json(rest)?,
            _ => return Err("unknown jsonb format version".into()),
        },
        "BYTEA" => super::base64(b),
        // Types whose binary form is their text.
        "TEXT" | "VARCHAR" | "CHAR" | "NAME" | "XML" | "UNKNOWN" | "\"CHAR\"" | "CITEXT" => {
            text(b)?
        }
        "INET" => Value::String(inet(b, false)?),
        "CIDR" => Value::String(inet(b, true)?),
        "MACADDR" | "MACADDR8" => Value::String(
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        "BIT" | "VARBIT" => Value::String(bit_string(b)?),
        _ => return Err(unmapped(type_name)),
    })
}

/// The value as a fixed-size array, or an error if its length differs.
fn fixed<const N: usize>(b: &[u8]) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", b.len()))
}

fn text(b: &[u8]) -> Result<Value, String> {
    std::str::from_utf8(b)
        .map(|s| Value::String(s.to_string()))
        .map_err(|e| format!("invalid UTF-8: {e}"))
}

fn json(b: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(b).map_err(|e| format!("invalid JSON: {e}"))
}

/// A PostgreSQL `timestamp` (microseconds since 2000-01-01) as chrono holds
/// it; beyond chrono's range (±262143 years) an error, never a panic.
fn timestamp(us: i64) -> Result<chrono::NaiveDateTime, String> {
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::microseconds(us)))
        .ok_or_else(|| "timestamp out of the supported range (years -262143 to 262142)".into())
}

fn date(days: i32) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::try_days(days.into())?))
        .ok_or_else(|| "date out of the supported range (years -262143 to 262142)".into())
}

/// `HH:MM:SS[.fff[fff]]` of microseconds since midnight; PostgreSQL allows
/// `24:00:00`, which is kept as such.
fn time_of_day(us: i64) -> Result<String, String> {
    if !(0..=86_400_000_000).contains(&us) {
        return Err(format!("time of day out of range: {us} microseconds"));
    }
    let secs = us / 1_000_000;
    let frac = u32::try_from(us % 1_000_000).unwrap_or(0);
    Ok(format!(
        "{:02}:{:02}:{:02}{}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        fraction(frac)
    ))
}

/// Fractional seconds like chrono's `%.f` (and so like every timestamp
/// caudal writes): nothing, 3 or 6 digits.
pub(crate) fn fraction(micros: u32) -> String {
    if micros == 0 {
        String::new()
    } else if micros.is_multiple_of(1000) {
        format!(".{:03}", micros / 1000)
    } else {
        format!(".{micros:06}")
    }
}

/// `+HH:MM` (or `+HH:MM:SS`) of an offset east of UTC in seconds.
fn utc_offset(east: i32) -> String {
    let sign = if east < 0 { '-' } else { '+' };
    let abs = east.unsigned_abs();
    let (h, m, s) = (abs / 3600, abs / 60 % 60, abs % 60);
    if s == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{s:02}")
    }
}

/// `inet`/`cidr` in PostgreSQL's text form: the address, and `/bits` for a
/// `cidr` or a network (an `inet` whose prefix is not the full address).
/// Binary: family, prefix bits, is-cidr flag, address length, address.
fn inet(b: &[u8], cidr: bool) -> Result<String, String> {
    let bad = || "malformed inet value".to_string();
    let (&[family, bits, _, len], addr) = b.split_first_chunk::<4>().ok_or_else(bad)?;
    let (ip, max): (std::net::IpAddr, u8) = match (family, len, addr.len()) {
        (2, 4, 4) => (std::net::Ipv4Addr::from(fixed::<4>(addr)?).into(), 32),
        (3, 16, 16) => (std::net::Ipv6Addr::from(fixed::<16>(addr)?).into(), 128),
        _ => return Err(bad()),
    };
    Ok(if cidr || bits != max {
        format!("{ip}/{bits}")
    } else {
        ip.to_string()
    })
}

/// `bit`/`varbit` as a string of `0` and `1`.
fn bit_string(b: &[u8]) -> Result<String, String> {
    let (len, bytes) = b.split_first_chunk::<4>().ok_or("malformed bit string")?;
    let len = usize::try_from(i32::from_be_bytes(*len)).map_err(|_| "malformed bit string")?;
    if bytes.len() * 8 < len {
        return Err("malformed bit string".into());
    }
    Ok((0..len)
        .map(|i| {
            if bytes[i / 8] & (0x80 >> (i % 8)) != 0 {
                '1'
            } else {
                '0'
            }
        })
        .collect())
}

/// A `numeric` value: its exact decimal text, or `NaN`/`Infinity`/`-Infinity`.
enum Numeric {
    Finite(String),
    Special(&'static str),
}

/// The exact text of a binary `numeric`, digit for digit what PostgreSQL
/// prints: base-10000 digit groups, a weight (the exponent of the first
/// group), a sign and a display scale.
fn numeric_text(b: &[u8]) -> Result<Numeric, String> {
    use std::fmt::Write as _;
    let bad = || "malformed numeric value".to_string();
    let word = |i: usize| -> Result<u16, String> {
        b.get(2 * i..2 * i + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
            .ok_or_else(bad)
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)? & 0x3FFF);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok(Numeric::Special("NaN")),
        0xD000 => return Ok(Numeric::Special("Infinity")),
        0xF000 => return Ok(Numeric::Special("-Infinity")),
        _ => return Err(bad()),
    }
    if b.len() != 8 + 2 * ndigits {
        return Err(bad());
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<_, _>>()?;
    if digits.iter().any(|&d| d > 9999) {
        return Err(bad());
    }
    let group = |i: i64| -> u16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i))
            .copied()
            .unwrap_or(0)
    };
    let mut out = String::new();
    if sign == 0x4000 && digits.iter().any(|&d| d != 0) {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = group(i);
            let _ = if i == 0 {
                write!(out, "{d}")
            } else {
                write!(out, "{d:04}")
            };
        }
    }
    if dscale > 0 {
        out.push('.');
        let start = out.len();
        let mut i = weight + 1;
        while out.len() - start < dscale {
            let _ = write!(out, "{:04}", group(i));
            i += 1;
        }
        out.truncate(start + dscale);
    }
    Ok(Numeric::Finite(out))
}

/// PostgreSQL's binary array: dimensions, then elements (length-prefixed,
/// -1 for NULL) in row-major order. Several dimensions nest as JSON
/// arrays; lower bounds other than 1 are not kept.
fn array(elem: &PgTypeInfo, b: &[u8], decimals: DecimalFormat) -> Result<Value, String> {
    let bad = || "malformed array value".to_string();
    let mut r = Reader(b);
    let ndim = r.int().ok_or_else(bad)?;
    let _has_nulls = r.int().ok_or_else(bad)?;
    let _elem_oid = r.int().ok_or_else(bad)?;
    if ndim == 0 {
        return Ok(Value::Array(Vec::new()));
    }
    if !(1..=6).contains(&ndim) {
        return Err(bad());
    }
    let mut dims = Vec::new();
    for _ in 0..ndim {
        let len = usize::try_from(r.int().ok_or_else(bad)?).map_err(|_| bad())?;
        // PostgreSQL writes an empty array with no dimensions. A dimension
        // of length 0 would make the element count 0 whatever the others
        // say, and nesting would then build as many empty arrays as they
        // claim (billions, from a few bytes).
        if len == 0 {
            return Err(bad());
        }
        dims.push(len);
        let _lower_bound = r.int().ok_or_else(bad)?;
    }
    let total = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(bad)?;
    // Every element takes at least its 4-byte length.
    if total > r.0.len() / 4 {
        return Err(bad());
    }
    let mut items = Vec::with_capacity(total);
    for index in 0..total {
        let len = r.int().ok_or_else(bad)?;
        let value = match usize::try_from(len) {
            // -1: NULL
            Err(_) => Value::Null,
            Ok(len) => {
                let bytes = r.take(len).ok_or_else(bad)?;
                binary_value(elem, bytes, decimals)
                    .map_err(|e| format!("element {}: {e}", index + 1))?
            }
        };
        items.push(value);
    }
    Ok(nest(&mut items.into_iter(), &dims))
}

/// Reads a binary value front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn int(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn nest(items: &mut impl Iterator<Item = Value>, dims: &[usize]) -> Value {
    match dims {
        [] | [_] => Value::Array(items.take(dims.first().copied().unwrap_or(0)).collect()),
        [n, inner @ ..] => Value::Array((0..*n).map(|_| nest(items, inner)).collect()),
    }
}

/// A float as JSON; NaN and infinities (which JSON cannot hold) as the
/// strings PostgreSQL prints: `NaN`, `Infinity`, `-Infinity`.
pub(crate) fn float(f: f64) -> Value {
    if f.is_nan() {
        Value::String("NaN".into())
    } else if f.is_infinite() {
        Value::String(if f > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

/// A single-precision float as the double with the same shortest decimal
/// form (`real` 0.1 is 0.1, not 0.10000000149011612).
pub(crate) fn float32(f: f32) -> Value {
    if f.is_finite() {
        float(f.to_string().parse().unwrap_or(f64::from(f)))
    } else {
        float(f64::from(f))
    }
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

/// The columns of each of `tables` (as written in a source: `t`, `s.t`)
/// in the PostgreSQL database at `url`; a table that does not exist is
/// left out (the source reports it when it runs).
pub async fn table_columns(
    url: &str,
    tables: &[String],
) -> Result<std::collections::BTreeMap<String, Vec<String>>, sqlx::Error> {
    let pool = connect_pool(url, 1).await?;
    let mut out = std::collections::BTreeMap::new();
    for table in tables {
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
        .bind(table)
        .fetch_all(&pool)
        .await?;
        if !columns.is_empty() {
            out.insert(table.clone(), columns);
        }
    }
    pool.close().await;
    Ok(out)
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

    /// An array header: dimensions (length, lower bound 1) and no elements.
    fn array_header(dims: &[i32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&i32::try_from(dims.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&23u32.to_be_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
            b.extend_from_slice(&1i32.to_be_bytes());
        }
        b
    }

    /// Found by the `change_records` fuzz target: `int4[]` dimensions
    /// [2147483647, 0] hold no element, and nesting them allocated 2^31
    /// empty arrays (an abort on allocation failure) instead of refusing.
    #[test]
    fn fuzz_array_with_an_empty_dimension_is_refused_not_allocated() {
        let int4s = <Vec<i32> as sqlx::Type<sqlx::Postgres>>::type_info();
        let value = array_header(&[i32::MAX, 0]);
        assert_eq!(
            binary_value(&int4s, &value, DecimalFormat::String),
            Err("malformed array value".to_string())
        );
        // No dimensions at all is how PostgreSQL writes an empty array.
        assert_eq!(
            binary_value(&int4s, &array_header(&[]), DecimalFormat::String),
            Ok(Value::Array(Vec::new()))
        );
        let mut one = array_header(&[1, 2]);
        for n in [7i32, 8] {
            one.extend_from_slice(&4i32.to_be_bytes());
            one.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(
            binary_value(&int4s, &one, DecimalFormat::String),
            Ok(serde_json::json!([[7, 8]]))
        );
    }
}
