//! The type mapping of datasets: a source column's type to the Parquet
//! (Arrow) type it is written as, the builders that collect a row group's
//! values, and the typed values that statistics and filters compare.
//!
//! Promises:
//! - **Exact.** Decimals are written as Decimal128 with every digit: a
//!   column's scale is the one `types` declares, else the largest scale in
//!   the first row group; a later value with more significant digits after
//!   the point fails the run naming the column (declare `types`), it is
//!   never rounded. Timestamps keep their microseconds; zoned ones are
//!   instants in UTC.
//! - NULL stays NULL in every type.

use std::cmp::Ordering;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::{ArrayRef, Decimal128Array};
use arrow_schema::{DataType, Field, TimeUnit};
use caudal_core::config::ColumnType;
use caudal_core::dataset::ColumnStats;
use serde_json::Value;

use crate::sources::sql::ColumnKind;

/// Largest precision of a Decimal128.
pub const MAX_PRECISION: u8 = 38;

/// Days from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The dataset type of a source column.
pub fn type_of_kind(kind: &ColumnKind) -> ColumnType {
    match kind {
        ColumnKind::Int => ColumnType::Int64,
        ColumnKind::Uint => ColumnType::UInt64,
        ColumnKind::Float => ColumnType::Float64,
        ColumnKind::Decimal => ColumnType::Decimal {
            precision: MAX_PRECISION,
            scale: -1,
        },
        ColumnKind::Text | ColumnKind::Uuid => ColumnType::Text,
        ColumnKind::Timestamp => ColumnType::Timestamp,
        ColumnKind::TimestampTz => ColumnType::TimestampTz,
        ColumnKind::Date => ColumnType::Date,
        ColumnKind::Other(name) => match name.to_ascii_uppercase().as_str() {
            "BOOL" | "BOOLEAN" => ColumnType::Boolean,
            "INT2" | "SMALLINT" => ColumnType::Int16,
            "INT4" | "INT" | "INTEGER" | "MEDIUMINT" => ColumnType::Int32,
            "FLOAT4" | "REAL" | "FLOAT" => ColumnType::Float32,
            "JSON" | "JSONB" => ColumnType::Json,
            "BYTEA" | "BLOB" | "BINARY" | "VARBINARY" | "LONGBLOB" | "MEDIUMBLOB" | "TINYBLOB" => {
                ColumnType::Binary
            }
            _ => ColumnType::Text,
        },
    }
}

/// The dataset type of a PostgreSQL column, by its type's name.
pub fn type_of_pg(name: &str) -> ColumnType {
    match name.to_ascii_uppercase().as_str() {
        "BOOL" => ColumnType::Boolean,
        "INT2" => ColumnType::Int16,
        "INT4" => ColumnType::Int32,
        "INT8" | "OID" => ColumnType::Int64,
        "FLOAT4" => ColumnType::Float32,
        "FLOAT8" => ColumnType::Float64,
        "NUMERIC" => ColumnType::Decimal {
            precision: MAX_PRECISION,
            scale: -1,
        },
        "DATE" => ColumnType::Date,
        "TIMESTAMP" => ColumnType::Timestamp,
        "TIMESTAMPTZ" => ColumnType::TimestampTz,
        "JSON" | "JSONB" => ColumnType::Json,
        "BYTEA" => ColumnType::Binary,
        _ => ColumnType::Text,
    }
}

/// A type's name as `types` and manifests write it.
pub fn type_name(ty: ColumnType) -> String {
    match ty {
        ColumnType::Boolean => "boolean".into(),
        ColumnType::Int16 => "int16".into(),
        ColumnType::Int32 => "int32".into(),
        ColumnType::Int64 => "int64".into(),
        ColumnType::UInt64 => "uint64".into(),
        ColumnType::Float32 => "float32".into(),
        ColumnType::Float64 => "float64".into(),
        ColumnType::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
        ColumnType::Text => "text".into(),
        ColumnType::Binary => "binary".into(),
        ColumnType::Date => "date".into(),
        ColumnType::Timestamp => "timestamp".into(),
        ColumnType::TimestampTz => "timestamptz".into(),
        ColumnType::Json => "json".into(),
    }
}

/// The Arrow field of a column.
pub fn field(name: &str, ty: ColumnType) -> Field {
    let dt = match ty {
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Int16 => DataType::Int16,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::UInt64 => DataType::UInt64,
        ColumnType::Float32 => DataType::Float32,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Decimal { precision, scale } => DataType::Decimal128(precision, scale.max(0)),
        ColumnType::Text | ColumnType::Json => DataType::Utf8,
        ColumnType::Binary => DataType::Binary,
        ColumnType::Date => DataType::Date32,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ColumnType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    };
    Field::new(name, dt, true)
}

/// A typed value, for statistics, filters and partition values.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i128),
    Float(f64),
    /// Unscaled digits and scale.
    Decimal(i128, u32),
    Text(String),
}

impl Scalar {
    /// Compares two values of the same column type.
    pub fn compare(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (Self::Bool(a), Self::Bool(b)) => Some(a.cmp(b)),
            (Self::Int(a), Self::Int(b)) => Some(a.cmp(b)),
            (Self::Float(a), Self::Float(b)) => a.partial_cmp(b),
            (Self::Int(a), Self::Float(b)) => (*a as f64).partial_cmp(b),
            (Self::Float(a), Self::Int(b)) => a.partial_cmp(&(*b as f64)),
            (Self::Decimal(a, sa), Self::Decimal(b, sb)) => {
                let s = (*sa).max(*sb);
                Some(rescale(*a, *sa, s)?.cmp(&rescale(*b, *sb, s)?))
            }
            (Self::Decimal(a, s), Self::Int(b)) => Some(a.cmp(&rescale(*b, 0, *s)?)),
            (Self::Int(a), Self::Decimal(b, s)) => Some(rescale(*a, 0, *s)?.cmp(b)),
            (Self::Text(a), Self::Text(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// Reads a value of column type `ty` from its text (a query
    /// parameter, a partition value), or says why it is not one.
    pub fn parse(ty: ColumnType, text: &str) -> Result<Self, String> {
        let bad = |what: &str| format!("{text:?} is not {what}");
        Ok(match ty {
            ColumnType::Boolean => Self::Bool(match text {
                "true" | "t" | "1" => true,
                "false" | "f" | "0" => false,
                _ => return Err(bad("a boolean (true or false)")),
            }),
            ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 | ColumnType::UInt64 => {
                Self::Int(text.trim().parse().map_err(|_| bad("an integer"))?)
            }
            ColumnType::Float32 | ColumnType::Float64 => {
                Self::Float(text.trim().parse().map_err(|_| bad("a number"))?)
            }
            ColumnType::Decimal { .. } => {
                let (v, s) = parse_decimal(text.trim()).ok_or_else(|| bad("a decimal number"))?;
                Self::Decimal(v, s)
            }
            ColumnType::Date => {
                let d: jiff::civil::Date = text
                    .trim()
                    .parse()
                    .map_err(|_| bad("a date (YYYY-MM-DD)"))?;
                Self::Int(i128::from(days_since_epoch(d)))
            }
            ColumnType::Timestamp => Self::Int(i128::from(
                parse_naive_micros(text.trim()).ok_or_else(|| bad("a timestamp"))?,
            )),
            ColumnType::TimestampTz => Self::Int(i128::from(
                parse_instant_micros(text.trim())
                    .ok_or_else(|| bad("a timestamp with a zone (RFC 3339)"))?,
            )),
            ColumnType::Text | ColumnType::Json | ColumnType::Binary => Self::Text(text.into()),
        })
    }

    /// Reads a statistics value of a manifest (see [`Self::to_json`]).
    pub fn from_json(ty: ColumnType, value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => match ty {
                ColumnType::Float32 | ColumnType::Float64 => n.as_f64().map(Self::Float),
                _ => n
                    .as_i64()
                    .map(|i| Self::Int(i128::from(i)))
                    .or_else(|| n.as_u64().map(|u| Self::Int(i128::from(u)))),
            },
            Value::String(s) => Self::parse(ty, s).ok(),
            Value::Bool(b) => Some(Self::Bool(*b)),
            _ => None,
        }
    }

    /// The value as a manifest keeps it: numbers for integers and floats,
    /// text for decimals (at the column's scale), dates and timestamps.
    pub fn to_json(&self, ty: ColumnType) -> Value {
        match (self, ty) {
            (Self::Int(days), ColumnType::Date) => {
                Value::String(date_text(i32::try_from(*days).unwrap_or(0)))
            }
            (Self::Int(us), ColumnType::Timestamp) => {
                Value::String(naive_text(i64::try_from(*us).unwrap_or(0)))
            }
            (Self::Int(us), ColumnType::TimestampTz) => {
                Value::String(instant_text(i64::try_from(*us).unwrap_or(0)))
            }
            (Self::Int(i), _) => i64::try_from(*i)
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(i.to_string())),
            (Self::Float(f), _) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
            (Self::Decimal(v, s), ColumnType::Decimal { scale, .. }) => {
                let target = u32::try_from(scale).unwrap_or(*s);
                let v = rescale(*v, *s, target).unwrap_or(*v);
                Value::String(decimal_text(v, target))
            }
            (Self::Decimal(v, s), _) => Value::String(decimal_text(*v, *s)),
            (Self::Text(t), _) => Value::String(t.clone()),
            (Self::Bool(b), _) => Value::Bool(*b),
        }
    }
}

/// `v` (at scale `from`) at scale `to >= from`.
fn rescale(v: i128, from: u32, to: u32) -> Option<i128> {
    v.checked_mul(10i128.checked_pow(to.checked_sub(from)?)?)
}

/// Unscaled digits and scale of a decimal's text (`-12.50` → (-1250, 2)).
pub fn parse_decimal(text: &str) -> Option<(i128, u32)> {
    let (neg, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut v: i128 = 0;
    for c in int.bytes().chain(frac.bytes()) {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
    }
    let scale = u32::try_from(frac.len()).ok()?;
    Some((if neg { -v } else { v }, scale))
}

/// The text of unscaled `v` at `scale`.
pub fn decimal_text(v: i128, scale: u32) -> String {
    let digits = v.unsigned_abs().to_string();
    let scale = scale as usize;
    let sign = if v < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn days_since_epoch(d: jiff::civil::Date) -> i32 {
    let epoch = jiff::civil::date(1970, 1, 1);
    (d - epoch).get_days()
}

fn date_text(days: i32) -> String {
    jiff::civil::date(1970, 1, 1)
        .checked_add(jiff::Span::new().days(i64::from(days)))
        .map(|d| d.to_string())
        .unwrap_or_else(|_| days.to_string())
}

fn parse_naive_micros(text: &str) -> Option<i64> {
    let dt: jiff::civil::DateTime = text.replace(' ', "T").parse().ok()?;
    let ts = dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(ts.as_microsecond())
}

fn parse_instant_micros(text: &str) -> Option<i64> {
    let ts: jiff::Timestamp = text.replace(' ', "T").parse().ok()?;
    Some(ts.as_microsecond())
}

fn naive_text(us: i64) -> String {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::UTC)
                .datetime()
                .strftime("%Y-%m-%dT%H:%M:%S%.f")
                .to_string()
        })
        .unwrap_or_else(|_| us.to_string())
}

fn instant_text(us: i64) -> String {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.fZ").to_string())
        .unwrap_or_else(|_| us.to_string())
}

/// Why a value could not be written to a column.
pub type ValueError = String;

/// One column's values of a row group being built, and its statistics for
/// the current file.
#[derive(Debug)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    values: Values,
    stats: Stats,
    /// Keep statistics for this column.
    keep_stats: bool,
}

#[derive(Debug)]
enum Values {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    U64(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    /// Unscaled digits with each value's own scale, set to the column's at
    /// the end of the row group.
    Dec(Vec<Option<(i128, u32)>>),
    Text(StringBuilder),
    Bin(BinaryBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

#[derive(Debug, Default)]
struct Stats {
    min: Option<Scalar>,
    max: Option<Scalar>,
    nulls: u64,
}

/// Text longer than this keeps no statistics (a cut value could not bound
/// the column).
const MAX_TEXT_STAT: usize = 256;

impl Stats {
    /// Sees a text value, copying it only when it is a new least or
    /// greatest.
    fn see_text(&mut self, v: &str) {
        let below = match &self.min {
            Some(Scalar::Text(m)) => v < m.as_str(),
            _ => true,
        };
        if below {
            self.min = Some(Scalar::Text(v.to_string()));
        }
        let above = match &self.max {
            Some(Scalar::Text(m)) => v > m.as_str(),
            _ => true,
        };
        if above {
            self.max = Some(Scalar::Text(v.to_string()));
        }
    }

    fn see(&mut self, v: Scalar) {
        if self
            .min
            .as_ref()
            .is_none_or(|m| v.compare(m) == Some(Ordering::Less))
        {
            self.min = Some(v.clone());
        }
        if self
            .max
            .as_ref()
            .is_none_or(|m| v.compare(m) == Some(Ordering::Greater))
        {
            self.max = Some(v);
        }
    }
}

/// Whether a type keeps statistics by default.
pub fn orderable(ty: ColumnType) -> bool {
    !matches!(
        ty,
        ColumnType::Boolean | ColumnType::Binary | ColumnType::Json
    )
}

impl Column {
    pub fn new(name: &str, ty: ColumnType, keep_stats: bool) -> Self {
        Self {
            name: name.to_string(),
            ty,
            values: Values::new(ty),
            stats: Stats::default(),
            keep_stats: keep_stats && orderable(ty),
        }
    }

    /// Rows in the row group being built.
    pub fn len(&self) -> usize {
        use arrow_array::builder::ArrayBuilder as _;
        match &self.values {
            Values::Bool(b) => b.len(),
            Values::I16(b) => b.len(),
            Values::I32(b) => b.len(),
            Values::I64(b) => b.len(),
            Values::U64(b) => b.len(),
            Values::F32(b) => b.len(),
            Values::F64(b) => b.len(),
            Values::Dec(v) => v.len(),
            Values::Text(b) => b.len(),
            Values::Bin(b) => b.len(),
            Values::Date(b) => b.len(),
            Values::Ts(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn null(&mut self) {
        self.stats.nulls += 1;
        match &mut self.values {
            Values::Bool(b) => b.append_null(),
            Values::I16(b) => b.append_null(),
            Values::I32(b) => b.append_null(),
            Values::I64(b) => b.append_null(),
            Values::U64(b) => b.append_null(),
            Values::F32(b) => b.append_null(),
            Values::F64(b) => b.append_null(),
            Values::Dec(v) => v.push(None),
            Values::Text(b) => b.append_null(),
            Values::Bin(b) => b.append_null(),
            Values::Date(b) => b.append_null(),
            Values::Ts(b) => b.append_null(),
        }
    }

    fn see(&mut self, v: impl FnOnce() -> Scalar) {
        if self.keep_stats {
            self.stats.see(v());
        }
    }

    /// Appends a value as the sources decode it to JSON.
    pub fn push_json(&mut self, value: &Value) -> Result<(), ValueError> {
        if value.is_null() {
            self.null();
            return Ok(());
        }
        let bad = || format!("{value} is not a {} value", type_name(self.ty));
        match &mut self.values {
            Values::Bool(b) => b.append_value(value.as_bool().ok_or_else(bad)?),
            Values::I16(b) => {
                let v = value
                    .as_i64()
                    .and_then(|v| i16::try_from(v).ok())
                    .ok_or_else(bad)?;
                b.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::I32(b) => {
                let v = value
                    .as_i64()
                    .and_then(|v| i32::try_from(v).ok())
                    .ok_or_else(bad)?;
                b.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::I64(b) => {
                let v = value.as_i64().ok_or_else(bad)?;
                b.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::U64(b) => {
                let v = value.as_u64().ok_or_else(bad)?;
                b.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::F32(b) => {
                let v = value.as_f64().ok_or_else(bad)?;
                #[allow(clippy::cast_possible_truncation)]
                b.append_value(v as f32);
                self.see(|| Scalar::Float(v));
            }
            Values::F64(b) => {
                let v = value.as_f64().ok_or_else(bad)?;
                b.append_value(v);
                self.see(|| Scalar::Float(v));
            }
            Values::Dec(vals) => {
                let (v, s) = match value {
                    Value::String(s) => parse_decimal(s),
                    Value::Number(n) => parse_decimal(&n.to_string()),
                    _ => None,
                }
                .ok_or_else(bad)?;
                vals.push(Some((v, s)));
                self.see(|| Scalar::Decimal(v, s));
            }
            Values::Text(b) => {
                let text = match value {
                    Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
                    other => std::borrow::Cow::Owned(other.to_string()),
                };
                b.append_value(&text);
                if text.len() <= MAX_TEXT_STAT {
                    let t = text.into_owned();
                    self.see(|| Scalar::Text(t));
                } else {
                    self.keep_stats = false;
                }
            }
            Values::Bin(b) => {
                let s = value.as_str().ok_or_else(bad)?;
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| bad())?;
                b.append_value(bytes);
            }
            Values::Date(b) => {
                let d: jiff::civil::Date = value
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?;
                let days = days_since_epoch(d);
                b.append_value(days);
                self.see(|| Scalar::Int(i128::from(days)));
            }
            Values::Ts(b) => {
                let s = value.as_str().ok_or_else(bad)?;
                let us = if self.ty == ColumnType::TimestampTz {
                    parse_instant_micros(s)
                } else {
                    parse_naive_micros(s)
                }
                .ok_or_else(bad)?;
                b.append_value(us);
                self.see(|| Scalar::Int(i128::from(us)));
            }
        }
        Ok(())
    }

    /// Appends a value in PostgreSQL's binary format (`None` for NULL), of
    /// a column whose type came from [`type_of_pg`] for `pg_type`.
    pub fn push_pg(&mut self, pg_type: &str, raw: Option<&[u8]>) -> Result<(), ValueError> {
        let Some(b) = raw else {
            self.null();
            return Ok(());
        };
        let short = || format!("a {pg_type} value of {} bytes", b.len());
        macro_rules! be {
            ($t:ty) => {
                <$t>::from_be_bytes(b.try_into().map_err(|_| short())?)
            };
        }
        match &mut self.values {
            Values::Bool(x) => x.append_value(b.first().is_some_and(|v| *v != 0)),
            Values::I16(x) => {
                let v = be!(i16);
                x.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::I32(x) => {
                let v = be!(i32);
                x.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::I64(x) => {
                let v = if pg_type.eq_ignore_ascii_case("OID") {
                    i64::from(be!(u32))
                } else {
                    be!(i64)
                };
                x.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::F32(x) => {
                let v = be!(f32);
                x.append_value(v);
                self.see(|| Scalar::Float(f64::from(v)));
            }
            Values::F64(x) => {
                let v = be!(f64);
                x.append_value(v);
                self.see(|| Scalar::Float(v));
            }
            Values::Dec(vals) => {
                let (v, s) = pg_numeric(b)?;
                vals.push(Some((v, s)));
                self.see(|| Scalar::Decimal(v, s));
            }
            Values::Date(x) => {
                let days = be!(i32);
                if days == i32::MAX || days == i32::MIN {
                    return Err(format!("{pg_type} infinity has no Parquet value"));
                }
                let v = days.checked_add(PG_EPOCH_DAYS).ok_or_else(short)?;
                x.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::Ts(x) => {
                let us = be!(i64);
                if us == i64::MAX || us == i64::MIN {
                    return Err(format!("{pg_type} infinity has no Parquet value"));
                }
                let v = us.checked_add(PG_EPOCH_MICROS).ok_or_else(short)?;
                x.append_value(v);
                self.see(|| Scalar::Int(i128::from(v)));
            }
            Values::Bin(x) => x.append_value(b),
            Values::Text(x) => {
                let text: std::borrow::Cow<'_, str> = if pg_type.eq_ignore_ascii_case("UUID") {
                    uuid::Uuid::from_slice(b)
                        .map_err(|_| short())?
                        .to_string()
                        .into()
                } else if pg_type.eq_ignore_ascii_case("JSONB") {
                    std::str::from_utf8(b.get(1..).unwrap_or_default())
                        .map_err(|e| e.to_string())?
                        .into()
                } else {
                    std::str::from_utf8(b).map_err(|e| e.to_string())?.into()
                };
                x.append_value(&text);
                if self.keep_stats {
                    if text.len() <= MAX_TEXT_STAT {
                        self.stats.see_text(&text);
                    } else {
                        self.keep_stats = false;
                    }
                }
            }
            Values::U64(_) => return Err(format!("{pg_type} values do not go to uint64")),
        }
        Ok(())
    }

    /// The largest scale among the decimals of the row group being built.
    pub fn max_scale(&self) -> Option<u32> {
        match &self.values {
            Values::Dec(v) => v.iter().flatten().map(|(_, s)| *s).max(),
            _ => None,
        }
    }

    /// Finishes the row group's array. A decimal column must have its
    /// scale set (non-negative) by then.
    pub fn finish(&mut self) -> Result<ArrayRef, ValueError> {
        Ok(match &mut self.values {
            Values::Bool(b) => Arc::new(b.finish()),
            Values::I16(b) => Arc::new(b.finish()),
            Values::I32(b) => Arc::new(b.finish()),
            Values::I64(b) => Arc::new(b.finish()),
            Values::U64(b) => Arc::new(b.finish()),
            Values::F32(b) => Arc::new(b.finish()),
            Values::F64(b) => Arc::new(b.finish()),
            Values::Text(b) => Arc::new(b.finish()),
            Values::Bin(b) => Arc::new(b.finish()),
            Values::Date(b) => Arc::new(b.finish()),
            Values::Ts(b) => {
                let a = b.finish();
                if self.ty == ColumnType::TimestampTz {
                    Arc::new(a.with_timezone("UTC"))
                } else {
                    Arc::new(a)
                }
            }
            Values::Dec(vals) => {
                let ColumnType::Decimal { precision, scale } = self.ty else {
                    return Err("a decimal column without a decimal type".into());
                };
                let target = u32::try_from(scale).map_err(|_| "decimal scale not set")?;
                let name = &self.name;
                let limit = 10i128.pow(u32::from(precision));
                let mut out = Vec::with_capacity(vals.len());
                for v in vals.drain(..) {
                    out.push(match v {
                        None => None,
                        Some((v, s)) => {
                            let v = to_scale(v, s, target).ok_or_else(|| {
                                format!(
                                    "column {name:?}: {} has more digits after the point than \
                                     its scale {target}; declare the column's type in the sink's \
                                     `types`, e.g. {{ {name} = \"decimal(38,{s})\" }}",
                                    decimal_text(v, s)
                                )
                            })?;
                            if v.abs() >= limit {
                                return Err(format!(
                                    "column {name:?}: {} does not fit decimal({precision},{target})",
                                    decimal_text(v, target)
                                ));
                            }
                            Some(v)
                        }
                    });
                }
                Arc::new(
                    Decimal128Array::from(out)
                        .with_precision_and_scale(precision, i8::try_from(target).unwrap_or(0))
                        .map_err(|e| e.to_string())?,
                )
            }
        })
    }

    /// Sets the scale of a decimal column whose scale is not yet known.
    pub fn set_scale(&mut self, scale: u32) {
        if let ColumnType::Decimal {
            precision,
            scale: s,
        } = &mut self.ty
            && *s < 0
        {
            *s = i8::try_from(scale.min(u32::from(*precision))).unwrap_or(0);
        }
    }

    /// The current file's statistics, and a fresh start for the next file.
    pub fn take_stats(&mut self) -> Option<ColumnStats> {
        let stats = std::mem::take(&mut self.stats);
        let keep = self.keep_stats;
        self.keep_stats = orderable(self.ty);
        keep.then(|| ColumnStats {
            min: stats.min.map(|v| v.to_json(self.ty)),
            max: stats.max.map(|v| v.to_json(self.ty)),
            nulls: stats.nulls,
        })
    }
}

/// `v` at scale `from` as the same value at scale `to`, if exact.
fn to_scale(v: i128, from: u32, to: u32) -> Option<i128> {
    match from.cmp(&to) {
        Ordering::Equal => Some(v),
        Ordering::Less => rescale(v, from, to),
        Ordering::Greater => {
            let div = 10i128.checked_pow(from - to)?;
            (v % div == 0).then(|| v / div)
        }
    }
}

impl Values {
    fn new(ty: ColumnType) -> Self {
        match ty {
            ColumnType::Boolean => Self::Bool(BooleanBuilder::new()),
            ColumnType::Int16 => Self::I16(Int16Builder::new()),
            ColumnType::Int32 => Self::I32(Int32Builder::new()),
            ColumnType::Int64 => Self::I64(Int64Builder::new()),
            ColumnType::UInt64 => Self::U64(UInt64Builder::new()),
            ColumnType::Float32 => Self::F32(Float32Builder::new()),
            ColumnType::Float64 => Self::F64(Float64Builder::new()),
            ColumnType::Decimal { .. } => Self::Dec(Vec::new()),
            ColumnType::Text | ColumnType::Json => Self::Text(StringBuilder::new()),
            ColumnType::Binary => Self::Bin(BinaryBuilder::new()),
            ColumnType::Date => Self::Date(Date32Builder::new()),
            ColumnType::Timestamp | ColumnType::TimestampTz => {
                Self::Ts(TimestampMicrosecondBuilder::new())
            }
        }
    }
}

/// A PostgreSQL binary `numeric` as unscaled digits and its display scale.
fn pg_numeric(b: &[u8]) -> Result<(i128, u32), ValueError> {
    let word = |i: usize| -> Result<u16, ValueError> {
        b.get(i * 2..i * 2 + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
            .ok_or_else(|| "a truncated numeric".to_string())
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = u32::from(word(3)?);
    if sign == 0xC000 {
        return Err("numeric NaN has no Parquet value".into());
    }
    if sign == 0xD000 || sign == 0xF000 {
        return Err("numeric infinity has no Parquet value".into());
    }
    // The value is sum(digit[i] * 10000^(weight - i)); times 10^dscale it
    // is an integer (dscale covers every digit PostgreSQL sends).
    let overflow = || "a numeric with more than 38 digits".to_string();
    let mut v: i128 = 0;
    for i in 0..ndigits {
        let d = i128::from(word(4 + i)?);
        let exp = 4 * (weight - i32::try_from(i).map_err(|_| overflow())?)
            + i32::try_from(dscale).map_err(|_| overflow())?;
        let term = if exp >= 0 {
            10i128
                .checked_pow(exp.unsigned_abs())
                .and_then(|p| p.checked_mul(d))
                .ok_or_else(overflow)?
        } else {
            d / 10i128
                .checked_pow(exp.unsigned_abs())
                .ok_or_else(overflow)?
        };
        v = v.checked_add(term).ok_or_else(overflow)?;
    }
    Ok((if sign == 0x4000 { -v } else { v }, dscale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(digits: &[u16], weight: i16, neg: bool, dscale: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((digits.len() as u16).to_be_bytes());
        b.extend(weight.to_be_bytes());
        b.extend((if neg { 0x4000u16 } else { 0 }).to_be_bytes());
        b.extend(dscale.to_be_bytes());
        for d in digits {
            b.extend(d.to_be_bytes());
        }
        b
    }

    #[test]
    fn pg_numerics_decode_exactly() {
        // 12.50: digits [12, 5000], weight 0, dscale 2.
        assert_eq!(
            pg_numeric(&pg(&[12, 5000], 0, false, 2)).unwrap(),
            (1250, 2)
        );
        // -0.0001: digits [1], weight -1, dscale 4.
        assert_eq!(pg_numeric(&pg(&[1], -1, true, 4)).unwrap(), (-1, 4));
        // 123456789.123: digits [1, 2345, 6789, 1230], weight 2, dscale 3.
        assert_eq!(
            pg_numeric(&pg(&[1, 2345, 6789, 1230], 2, false, 3)).unwrap(),
            (123_456_789_123, 3)
        );
        // 20000 (trailing zero digit words dropped): digits [2], weight 1.
        assert_eq!(pg_numeric(&pg(&[2], 1, false, 0)).unwrap(), (20000, 0));
        // 0 with scale 2: no digits.
        assert_eq!(pg_numeric(&pg(&[], 0, false, 2)).unwrap(), (0, 2));
    }

    #[test]
    fn decimals_keep_every_digit_or_fail() {
        let mut c = Column::new(
            "total",
            ColumnType::Decimal {
                precision: 38,
                scale: -1,
            },
            true,
        );
        for v in ["12.5", "-0.25", "7"] {
            c.push_json(&Value::String(v.into())).unwrap();
        }
        c.push_json(&Value::Null).unwrap();
        assert_eq!(c.max_scale(), Some(2));
        c.set_scale(2);
        let a = c.finish().unwrap();
        let a = a.as_any().downcast_ref::<Decimal128Array>().unwrap();
        assert_eq!(a.value_as_string(0), "12.50");
        assert_eq!(a.value_as_string(1), "-0.25");
        assert!(arrow_array::Array::is_null(a, 3));
        let stats = c.take_stats().unwrap();
        assert_eq!(stats.min, Some(Value::String("-0.25".into())));
        assert_eq!(stats.max, Some(Value::String("12.50".into())));
        assert_eq!(stats.nulls, 1);
        c.push_json(&Value::String("1.125".into())).unwrap();
        assert!(
            c.finish()
                .unwrap_err()
                .contains("declare the column's type")
        );
    }

    #[test]
    fn scalars_parse_and_compare_by_type() {
        let d = ColumnType::Date;
        assert!(
            Scalar::parse(d, "2025-05-14")
                .unwrap()
                .compare(&Scalar::parse(d, "2025-05-15").unwrap())
                == Some(Ordering::Less)
        );
        let dec = ColumnType::Decimal {
            precision: 14,
            scale: 2,
        };
        assert_eq!(
            Scalar::parse(dec, "10.5")
                .unwrap()
                .compare(&Scalar::parse(dec, "10.50").unwrap()),
            Some(Ordering::Equal)
        );
        assert!(
            Scalar::parse(ColumnType::Int32, "x")
                .unwrap_err()
                .contains("integer")
        );
        let tz = ColumnType::TimestampTz;
        let v = Scalar::parse(tz, "2025-05-14T10:00:00.5+02:00").unwrap();
        assert_eq!(
            v.to_json(tz),
            Value::String("2025-05-14T08:00:00.5Z".into())
        );
        assert_eq!(decimal_text(-5, 3), "-0.005");
    }
}
