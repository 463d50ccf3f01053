//! Binary log rows as JSON, in exactly the form the snapshot (and every
//! incremental MySQL source) gives the same values; see
//! [`crate::sources::sql::mysql`] for the mapping.
//!
//! A row is decoded with the shape its table had at that point of the log:
//! the table map event before it carries column types, and with
//! `binlog_row_metadata = FULL` names, signedness, character sets and
//! ENUM/SET values. Only what the log does not carry (which text columns
//! hold JSON, which `TINYINT` are `TINYINT(1)` booleans) comes from the
//! catalog.

use caudal_core::config::DecimalFormat;
use mysql_async::Value as MyValue;
use mysql_async::binlog::events::{
    OptionalMetaExtractor, OptionalMetadataField, RowsEventData, TableMapEvent,
};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_common::io::ParseBuf;
use serde_json::{Map, Value};

use super::catalog::Facts;
use crate::sources::sql::ColumnKind;
use crate::sources::sql::{base64, decimal_value, format_naive, format_utc, postgres};
use caudal_core::record::{ObjectWriter, ValueWriter};

/// The character set number of binary strings and blobs.
const BINARY: u16 = 63;

/// A table as one table map event describes it.
#[derive(Debug)]
pub struct Shape {
    /// `schema.table`.
    pub table: String,
    /// Every column's name, in table order.
    pub columns: Vec<String>,
    /// ENUM values per column index (empty for other columns).
    enums: Vec<Vec<String>>,
    /// SET values per column index.
    sets: Vec<Vec<String>>,
    /// What decoding each column's values needs, in table order.
    cols: Vec<Col>,
    pub facts: Facts,
}

/// What the table map says a column's values need to be read.
#[derive(Debug)]
struct Col {
    ty: ColumnType,
    meta: Vec<u8>,
    unsigned: bool,
    charset: u16,
}

impl Shape {
    /// Reads the shape from a table map event; `None` when the event has no
    /// column names (`binlog_row_metadata` was not FULL when it was written).
    pub fn of(tme: &TableMapEvent<'_>, facts: Facts) -> std::io::Result<Option<Self>> {
        let n = usize::try_from(tme.columns_count()).unwrap_or(0);
        for i in 0..n {
            if let Ok(Some(ColumnType::MYSQL_TYPE_TIME2)) = tme.get_column_type(i)
                && matches!(tme.get_column_metadata(i), Some([1 | 2, ..]))
            {
                return Err(std::io::Error::other(format!(
                    "column {} of {}.{} is TIME(1) or TIME(2), whose negative values the binary \
                     log decoder reads wrong; ALTER it to TIME(3) (or TIME(0), TIME(6))",
                    i + 1,
                    tme.database_name(),
                    tme.table_name()
                )));
            }
        }
        let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta())?;
        let mut columns = Vec::with_capacity(n);
        for name in extractor.iter_column_name() {
            columns.push(name?.name().into_owned());
        }
        if columns.len() != n {
            return Ok(None);
        }
        let mut enum_lists = Vec::new();
        let mut set_lists = Vec::new();
        for field in tme.iter_optional_meta() {
            match field? {
                OptionalMetadataField::EnumStrValue(v) => {
                    for values in v.iter_values() {
                        let values = values?;
                        enum_lists.push(
                            values
                                .values()
                                .iter()
                                .map(|s| s.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                OptionalMetadataField::SetStrValue(v) => {
                    for values in v.iter_values() {
                        let values = values?;
                        set_lists.push(
                            values
                                .values()
                                .iter()
                                .map(|s| s.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                _ => {}
            }
        }
        // Signedness is listed for numeric columns, character sets for
        // text and for ENUM/SET columns, each in column order.
        let mut signedness = extractor.iter_signedness();
        let mut charsets = extractor.iter_charset();
        let mut enum_set_charsets = extractor.iter_enum_and_set_charset();
        let mut cols = Vec::with_capacity(n);
        for i in 0..n {
            let ty = tme
                .get_column_type(i)
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other(format!("column {} has no type", i + 1)))?;
            let unsigned = ty.is_numeric_type() && signedness.next().unwrap_or_default();
            let charset = if ty.is_character_type() {
                charsets.next().transpose()?.unwrap_or_default()
            } else if ty.is_enum_or_set_type() {
                enum_set_charsets.next().transpose()?.unwrap_or_default()
            } else {
                0
            };
            cols.push(Col {
                ty,
                meta: tme.get_column_metadata(i).unwrap_or(&[]).to_vec(),
                unsigned,
                charset,
            });
        }
        let (mut enums, mut sets) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        let (mut e, mut s) = (enum_lists.into_iter(), set_lists.into_iter());
        for i in 0..n {
            match tme.get_column_type(i) {
                Ok(Some(ColumnType::MYSQL_TYPE_ENUM)) => enums[i] = e.next().unwrap_or_default(),
                Ok(Some(ColumnType::MYSQL_TYPE_SET)) => sets[i] = s.next().unwrap_or_default(),
                _ => {}
            }
        }
        Ok(Some(Self {
            table: format!("{}.{}", tme.database_name(), tme.table_name()),
            columns,
            enums,
            sets,
            cols,
            facts,
        }))
    }
}

/// One row image, written straight into its JSON text (columns in the
/// log's order), with the values of the key columns it holds and the
/// columns it left out (`binlog_row_image` MINIMAL or NOBLOB).
#[derive(Debug)]
pub struct Image {
    pub row: ObjectWriter,
    /// The values of the image's key columns, as values.
    pub key: Map<String, Value>,
    pub missing: Vec<String>,
}

/// A row's before and after images, as a rows event holds them.
pub type Images = (Option<Image>, Option<Image>);

/// Decodes every row of a rows event of `shape` straight from the event's
/// bytes, as (before, after) images; the columns named in `key` are also
/// kept as values. (The client library's own row reader builds a column
/// description, names included, for every column of every row: the reader
/// spent more time there than anywhere else.)
pub fn images(
    shape: &Shape,
    event: &RowsEventData<'_>,
    decimals: DecimalFormat,
    key: &[(String, ColumnKind)],
) -> Result<Vec<Images>, String> {
    if matches!(event, RowsEventData::PartialUpdateRowsEvent(_)) {
        return Err("partial JSON updates (MySQL's PARTIAL_UPDATE_ROWS_EVENT) are not read".into());
    }
    let n = shape.columns.len();
    if usize::try_from(event.num_columns()).ok() != Some(n) {
        return Err(format!(
            "a row event of {} has {} columns, its table map {n}",
            shape.table,
            event.num_columns()
        ));
    }
    let before: Option<Vec<usize>> = event
        .columns_before_image()
        .map(|bits| bits.iter_ones().filter(|&i| i < n).collect());
    let after: Option<Vec<usize>> = event
        .columns_after_image()
        .map(|bits| bits.iter_ones().filter(|&i| i < n).collect());
    let mut buf = ParseBuf(event.rows_data());
    let mut rows = Vec::new();
    while !buf.is_empty() {
        let left = buf.0.len();
        let mut image = |cols: &Option<Vec<usize>>| {
            cols.as_deref()
                .map(|cols| image_of(shape, &mut buf, cols, decimals, key))
                .transpose()
        };
        let b = image(&before)?;
        let a = image(&after)?;
        // A row of no column takes no byte: the event would never end.
        if buf.0.len() == left {
            return Err(format!(
                "a row event of {} has rows of no column",
                shape.table
            ));
        }
        rows.push((b, a));
    }
    Ok(rows)
}

/// Reads one row image of the columns `cols` (indexes in table order): a
/// bitmap of its NULL columns, then the others' values.
fn image_of<'a>(
    shape: &'a Shape,
    buf: &mut ParseBuf<'a>,
    cols: &[usize],
    decimals: DecimalFormat,
    key: &[(String, ColumnKind)],
) -> Result<Image, String> {
    let truncated = |e: std::io::Error| format!("a row of {} is cut short: {e}", shape.table);
    let nulls: &[u8] = buf.parse(cols.len().div_ceil(8)).map_err(truncated)?;
    let mut out = ObjectWriter::with_capacity(32 + cols.len() * 16);
    let mut key_values = Map::with_capacity(key.len());
    for (j, &i) in cols.iter().enumerate() {
        let (name, col) = (&shape.columns[i], &shape.cols[i]);
        let fail = |e: String| format!("column {name:?} of {}: {e}", shape.table);
        let value = if nulls[j / 8] & (1 << (j % 8)) != 0 {
            BinlogValue::Value(MyValue::NULL)
        } else {
            check_raw(col, buf.0).map_err(fail)?;
            buf.parse::<BinlogValue<'a>>((col.ty, &col.meta, col.unsigned, false))
                .map_err(|e| fail(e.to_string()))?
        };
        if key.iter().any(|(k, _)| k == name) {
            let v = value_of(shape, Some(i), name, col, &value, decimals).map_err(fail)?;
            out.key(name).value(&v);
            key_values.insert(name.clone(), v);
        } else {
            write_value(out.key(name), shape, Some(i), name, col, &value, decimals)
                .map_err(fail)?;
        }
    }
    let missing = if cols.len() == shape.columns.len() {
        Vec::new()
    } else {
        (0..shape.columns.len())
            .filter(|i| !cols.contains(i))
            .map(|i| shape.columns[i].clone())
            .collect()
    };
    Ok(Image {
        row: out,
        key: key_values,
        missing,
    })
}

/// Refuses the raw values the client library cannot read safely (it
/// overflows on them: a panic with overflow checks, a wrong value without).
/// Only a damaged log holds them.
///
/// - A `DATETIME2` is stored offset by 2^39, so every datetime MariaDB
///   writes starts with a byte of 0x80 or more; below that the library
///   negates a packed value that can be `i64::MIN`.
/// - A `DECIMAL` has precision and scale, and digits in groups of nine
///   (4 bytes each) plus partial groups; the library scales the partial
///   group of fraction digits up without checking that it holds no more
///   digits than its width.
///
/// The table map's metadata must also hold what the library reads for the
/// column's type (it indexes it unchecked).
fn check_raw(col: &Col, raw: &[u8]) -> Result<(), String> {
    use ColumnType::*;
    let meta_bytes = match col.ty {
        MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB
        | MYSQL_TYPE_BLOB
        | MYSQL_TYPE_GEOMETRY
        | MYSQL_TYPE_VECTOR
        | MYSQL_TYPE_TIMESTAMP2
        | MYSQL_TYPE_DATETIME2
        | MYSQL_TYPE_TIME2 => 1,
        MYSQL_TYPE_STRING
        | MYSQL_TYPE_VARCHAR
        | MYSQL_TYPE_VAR_STRING
        | MYSQL_TYPE_BIT
        | MYSQL_TYPE_NEWDECIMAL
        | MYSQL_TYPE_ENUM
        | MYSQL_TYPE_SET => 2,
        // Arrays of a multi-valued index (MySQL's, internal): never a
        // table's column.
        MYSQL_TYPE_TYPED_ARRAY => usize::MAX,
        _ => 0,
    };
    if col.meta.len() < meta_bytes {
        return Err(format!(
            "the table map gives a column of type {:?} no usable metadata (a damaged log)",
            col.ty
        ));
    }
    match col.ty {
        MYSQL_TYPE_DATETIME2 if raw.first().is_some_and(|b| *b < 0x80) => {
            Err("a DATETIME2 value below the lowest datetime (a damaged log)".into())
        }
        MYSQL_TYPE_NEWDECIMAL => check_decimal(&col.meta, raw),
        _ => Ok(()),
    }
}

/// Bytes of a partial group of 0 to 9 decimal digits.
const DECIMAL_DIGIT_BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

fn check_decimal(meta: &[u8], raw: &[u8]) -> Result<(), String> {
    let damaged = |what: &str| Err(format!("a DECIMAL {what} (a damaged log)"));
    let &[precision, scale, ..] = meta else {
        return damaged("column without its precision and scale");
    };
    let (precision, scale) = (usize::from(precision), usize::from(scale));
    if scale > precision {
        return damaged("column whose scale exceeds its precision");
    }
    let digits = scale % 9;
    if digits == 0 {
        return Ok(());
    }
    let intg = precision - scale;
    let start = DECIMAL_DIGIT_BYTES[intg % 9] + intg / 9 * 4 + scale / 9 * 4;
    let width = DECIMAL_DIGIT_BYTES[digits];
    // Too short a value: the library reports it.
    let (Some(&first), Some(group)) = (raw.first(), raw.get(start..start + width)) else {
        return Ok(());
    };
    // The sign is the first bit, stored inverted; a negative value's
    // bytes are all inverted.
    let negative = first & 0x80 == 0;
    let mut value: u32 = 0;
    for (i, byte) in group.iter().enumerate() {
        let byte = if start + i == 0 { byte ^ 0x80 } else { *byte };
        value = (value << 8) | u32::from(if negative { !byte } else { byte });
    }
    if value >= 10u32.pow(digits as u32) {
        return damaged("value with more fraction digits than its scale");
    }
    Ok(())
}

/// Writes one value: text and integers straight from the log's bytes,
/// anything else through its JSON value.
fn write_value(
    w: ValueWriter<'_>,
    shape: &Shape,
    at: Option<usize>,
    name: &str,
    column: &Col,
    value: &BinlogValue<'_>,
    decimals: DecimalFormat,
) -> Result<(), String> {
    use ColumnType::*;
    if let BinlogValue::Value(v) = value
        && !shape.facts.unsupported.contains_key(name)
    {
        match (column.ty, v) {
            (_, MyValue::NULL) => {
                w.null();
                return Ok(());
            }
            (MYSQL_TYPE_LONG | MYSQL_TYPE_LONGLONG, MyValue::Int(i)) if !column.unsigned => {
                w.i64(*i);
                return Ok(());
            }
            (ty, MyValue::Bytes(b))
                if is_text(ty)
                    && column.charset != BINARY
                    && !shape.facts.json.contains(name)
                    && matches!(
                        shape.facts.charsets.get(name).map(String::as_str),
                        None | Some("utf8mb4" | "utf8mb3" | "utf8" | "ascii")
                    ) =>
            {
                let text = std::str::from_utf8(b)
                    .map_err(|_| "text that is not valid UTF-8".to_string())?;
                w.str(text);
                return Ok(());
            }
            _ => {}
        }
    }
    let v = value_of(shape, at, name, column, value, decimals)?;
    w.value(&v);
    Ok(())
}

fn value_of(
    shape: &Shape,
    at: Option<usize>,
    name: &str,
    column: &Col,
    value: &BinlogValue<'_>,
    decimals: DecimalFormat,
) -> Result<Value, String> {
    let v = match value {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(_) | BinlogValue::JsonDiff(_) => {
            return Err("MySQL's binary JSON is not read (MariaDB logs JSON as text)".into());
        }
    };
    if let Some(ty) = shape.facts.unsupported.get(name) {
        return Err(format!(
            "type {ty} is held in the binary log as raw bytes caudal does not decode yet"
        ));
    }
    if *v == MyValue::NULL {
        return Ok(Value::Null);
    }
    let unsigned = column.unsigned;
    use ColumnType::*;
    Ok(match (column.ty, v) {
        (MYSQL_TYPE_TINY, _) if shape.facts.boolean.contains(name) => Value::Bool(integer(v)? != 0),
        (
            MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG
            | MYSQL_TYPE_LONGLONG,
            _,
        ) => match v {
            MyValue::UInt(u) => Value::from(*u),
            MyValue::Int(i) if unsigned => Value::from(unsigned_of(*i, column.ty)),
            // A signed MEDIUMINT comes out of the decoder without its sign
            // extended: 0x800000 and up are the negative values.
            MyValue::Int(i) if column.ty == MYSQL_TYPE_INT24 && *i >= 1 << 23 => {
                Value::from(*i - (1 << 24))
            }
            MyValue::Int(i) => Value::from(*i),
            other => return Err(format!("unexpected integer value {other:?}")),
        },
        (MYSQL_TYPE_FLOAT, MyValue::Float(f)) => postgres::float32(*f),
        (MYSQL_TYPE_DOUBLE, MyValue::Double(f)) => postgres::float(*f),
        (MYSQL_TYPE_NEWDECIMAL, MyValue::Bytes(b)) => {
            decimal_value(String::from_utf8_lossy(b).into_owned(), decimals)
        }
        (MYSQL_TYPE_YEAR, MyValue::Bytes(b)) => {
            // The log holds the year minus 1900; YEAR 0000 is stored as 0.
            let year: u64 = String::from_utf8_lossy(b).parse().unwrap_or(0);
            Value::from(if year == 1900 { 0 } else { year })
        }
        (MYSQL_TYPE_BIT, MyValue::Bytes(b)) => {
            Value::from(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
        }
        (MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2, v) => timestamp(v)?,
        (MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2, MyValue::Date(y, mo, d, h, mi, s, us)) => {
            chrono::NaiveDate::from_ymd_opt(i32::from(*y), u32::from(*mo), u32::from(*d))
                .and_then(|date| {
                    date.and_hms_micro_opt(u32::from(*h), u32::from(*mi), u32::from(*s), *us)
                })
                .map_or(Value::Null, |t| Value::String(format_naive(&t)))
        }
        (MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE, MyValue::Date(y, mo, d, ..)) => {
            chrono::NaiveDate::from_ymd_opt(i32::from(*y), u32::from(*mo), u32::from(*d))
                .map_or(Value::Null, |d| {
                    Value::String(d.format("%Y-%m-%d").to_string())
                })
        }
        (MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2, MyValue::Time(neg, days, h, m, s, us)) => {
            let sign = if *neg { "-" } else { "" };
            let hours = u64::from(*days) * 24 + u64::from(*h);
            Value::String(format!(
                "{sign}{hours:02}:{m:02}:{s:02}{}",
                postgres::fraction(*us)
            ))
        }
        (MYSQL_TYPE_ENUM, MyValue::Int(i)) => {
            let values = at.map(|a| shape.enums[a].as_slice()).unwrap_or_default();
            // 0 is the empty string MySQL stores for an invalid value.
            match usize::try_from(*i).ok().filter(|i| *i > 0) {
                None => Value::String(String::new()),
                Some(i) => Value::String(
                    values
                        .get(i - 1)
                        .cloned()
                        .ok_or_else(|| format!("ENUM index {i} beyond the column's values"))?,
                ),
            }
        }
        (MYSQL_TYPE_SET, MyValue::Bytes(b)) => {
            let values = at.map(|a| shape.sets[a].as_slice()).unwrap_or_default();
            // A SET has at most 64 members: 8 bytes.
            if b.len() > 8 {
                return Err(format!("a SET value of {} bytes (at most 8)", b.len()));
            }
            let mut bits = 0u64;
            for (k, byte) in b.iter().enumerate() {
                bits |= u64::from(*byte) << (8 * k);
            }
            let chosen: Vec<&str> = values
                .iter()
                .enumerate()
                .filter(|(k, _)| *k < 64 && bits & (1 << k) != 0)
                .map(|(_, v)| v.as_str())
                .collect();
            Value::String(chosen.join(","))
        }
        (MYSQL_TYPE_GEOMETRY, MyValue::Bytes(b)) => base64(b),
        (ty, MyValue::Bytes(b)) if is_text(ty) => {
            if column.charset == BINARY {
                base64(b)
            } else {
                let text = text(b, shape.facts.charsets.get(name).map(String::as_str))?;
                if shape.facts.json.contains(name) {
                    serde_json::from_str(&text)
                        .map_err(|e| format!("invalid JSON in a JSON column: {e}"))?
                } else {
                    Value::String(text)
                }
            }
        }
        (ty, other) => {
            return Err(format!(
                "type {ty:?} with value {other:?} has no JSON mapping"
            ));
        }
    })
}

/// The column types that hold text or bytes (by their character set).
fn is_text(ty: ColumnType) -> bool {
    use ColumnType::*;
    matches!(
        ty,
        MYSQL_TYPE_STRING
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB
    )
}

fn integer(v: &MyValue) -> Result<i128, String> {
    match v {
        MyValue::Int(i) => Ok(i128::from(*i)),
        MyValue::UInt(u) => Ok(i128::from(*u)),
        other => Err(format!("unexpected integer value {other:?}")),
    }
}

/// An unsigned column's value that came out as a signed integer of the
/// column's width (MEDIUMINT is read as a signed 64-bit value already
/// masked to 24 bits).
fn unsigned_of(i: i64, ty: ColumnType) -> u64 {
    let bits = match ty {
        ColumnType::MYSQL_TYPE_TINY => 8,
        ColumnType::MYSQL_TYPE_SHORT => 16,
        ColumnType::MYSQL_TYPE_INT24 => 24,
        ColumnType::MYSQL_TYPE_LONG => 32,
        _ => 64,
    };
    let raw = i.cast_unsigned();
    if bits == 64 {
        raw
    } else {
        raw & ((1u64 << bits) - 1)
    }
}

/// A TIMESTAMP: seconds since the epoch (with microseconds after a dot),
/// in UTC; the zero timestamp is null, as in the snapshot.
fn timestamp(v: &MyValue) -> Result<Value, String> {
    let text = match v {
        MyValue::Int(i) => i.to_string(),
        MyValue::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        other => return Err(format!("unexpected TIMESTAMP value {other:?}")),
    };
    let (secs, micros) = match text.split_once('.') {
        Some((s, f)) => (s.parse::<i64>(), f.parse::<u32>()),
        None => (text.parse::<i64>(), Ok(0)),
    };
    let (Ok(secs), Ok(micros)) = (secs, micros) else {
        return Err(format!("unreadable TIMESTAMP {text:?}"));
    };
    if secs == 0 && micros == 0 {
        return Ok(Value::Null);
    }
    // More than a second of microseconds is a damaged value.
    let Some(nanos) = micros.checked_mul(1000).filter(|n| *n < 1_000_000_000) else {
        return Err(format!("unreadable TIMESTAMP {text:?}"));
    };
    let t = chrono::DateTime::from_timestamp(secs, nanos)
        .ok_or_else(|| format!("TIMESTAMP {text:?} out of range"))?;
    Ok(Value::String(format_utc(&t)))
}

/// Text in the column's character set (from the catalog): UTF-8 and
/// ASCII as they are, latin1 as MariaDB means it (Windows-1252).
fn text(bytes: &[u8], charset: Option<&str>) -> Result<String, String> {
    match charset {
        None | Some("utf8mb4" | "utf8mb3" | "utf8" | "ascii") => String::from_utf8(bytes.to_vec())
            .map_err(|_| "text that is not valid UTF-8".to_string()),
        Some("latin1") => Ok(encoding_rs::WINDOWS_1252
            .decode_without_bom_handling(bytes)
            .0
            .into_owned()),
        Some(other) => Err(format!(
            "character set {other} is not read from the binary log (utf8mb4, utf8mb3, ascii and \
             latin1 are)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datetime_shape() -> Shape {
        Shape {
            table: "shop.orders".into(),
            columns: vec!["at".into()],
            enums: vec![Vec::new()],
            sets: vec![Vec::new()],
            cols: vec![Col {
                ty: ColumnType::MYSQL_TYPE_DATETIME2,
                meta: vec![0],
                unsigned: false,
                charset: 0,
            }],
            facts: Facts::default(),
        }
    }

    /// Found by the `binlog_rows` fuzz target: a `DATETIME2` of five zero
    /// bytes made the client library negate `i64::MIN` (a panic with
    /// overflow checks, a wrapped value without).
    #[test]
    fn fuzz_datetime2_below_the_lowest_datetime_is_refused() {
        let shape = datetime_shape();
        // The NULL bitmap (nothing NULL), then the value.
        let row = [0u8, 0, 0, 0, 0, 0];
        let err = image_of(
            &shape,
            &mut ParseBuf(&row),
            &[0],
            DecimalFormat::String,
            &[],
        )
        .map(|_| ())
        .unwrap_err();
        assert!(err.contains("DATETIME2"), "{err}");
        // 2025-05-14 10:30:00 as MariaDB writes it.
        let row = [0u8, 153, 182, 156, 167, 128];
        let image = image_of(
            &shape,
            &mut ParseBuf(&row),
            &[0],
            DecimalFormat::String,
            &[],
        )
        .expect("a valid datetime");
        assert_eq!(
            image.row.finish().to_value(),
            serde_json::json!({"at": "2025-05-14T10:30:00"})
        );
    }

    /// Found by the `binlog_rows` fuzz target: a `DECIMAL(10,8)` whose
    /// fraction group holds more than 8 digits overflowed in the client
    /// library as it scaled the group up.
    #[test]
    fn fuzz_decimal_with_too_many_fraction_digits_is_refused() {
        let mut shape = datetime_shape();
        shape.columns = vec!["amount".into()];
        shape.cols[0] = Col {
            ty: ColumnType::MYSQL_TYPE_NEWDECIMAL,
            meta: vec![10, 8],
            unsigned: false,
            charset: 0,
        };
        let decode = |value: &[u8]| {
            let mut row = vec![0u8];
            row.extend_from_slice(value);
            image_of(
                &shape,
                &mut ParseBuf(&row),
                &[0],
                DecimalFormat::String,
                &[],
            )
            .map(|image| image.row.finish().to_value())
        };
        let err = decode(&[0x80, 0x7f, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.contains("DECIMAL"), "{err}");
        // 12.50000000 and -12.50000000, as MariaDB writes them.
        let positive = [0x8c, 0x02, 0xfa, 0xf0, 0x80];
        assert_eq!(
            decode(&positive).unwrap(),
            serde_json::json!({"amount": "12.50000000"})
        );
        let negative: Vec<u8> = positive.iter().map(|b| !b).collect();
        assert_eq!(
            decode(&negative).unwrap(),
            serde_json::json!({"amount": "-12.50000000"})
        );
    }

    /// Found by the `binlog_rows` fuzz target: a `TINY_BLOB` column (a
    /// type table maps never hold, so its metadata is empty) made the
    /// client library index the metadata out of bounds.
    #[test]
    fn fuzz_column_without_its_metadata_is_refused() {
        let mut shape = datetime_shape();
        shape.cols[0] = Col {
            ty: ColumnType::MYSQL_TYPE_TINY_BLOB,
            meta: Vec::new(),
            unsigned: false,
            charset: 0,
        };
        let row = [0u8, 1, b'x'];
        let err = image_of(
            &shape,
            &mut ParseBuf(&row),
            &[0],
            DecimalFormat::String,
            &[],
        )
        .map(|_| ())
        .unwrap_err();
        assert!(err.contains("metadata"), "{err}");
    }

    /// Found by the `binlog_rows` fuzz target: a rows event whose column
    /// bitmap names no column has rows that take no byte, and reading them
    /// never ended (memory grew until the process was killed).
    #[test]
    fn fuzz_rows_of_no_column_are_refused() {
        use mysql_common::binlog::EventStreamReader;
        use mysql_common::binlog::consts::BinlogVersion;
        use mysql_common::binlog::events::EventData;
        // WRITE_ROWS_EVENT_V1 of table 1: one column, none present, a byte.
        let body = [1u8, 0, 0, 0, 0, 0, 0, 0, 1, 0x00, 0xaa];
        let mut event = Vec::new();
        event.extend_from_slice(&0u32.to_le_bytes());
        event.push(23);
        event.extend_from_slice(&1u32.to_le_bytes());
        event.extend_from_slice(&(19 + body.len() as u32).to_le_bytes());
        event.extend_from_slice(&[0; 6]);
        event.extend_from_slice(&body);
        let mut reader = EventStreamReader::new(BinlogVersion::Version4);
        let event = reader.read(&event[..]).unwrap().unwrap();
        let Some(EventData::RowsEvent(rows)) = event.read_data().unwrap() else {
            panic!("not a rows event");
        };
        let err = images(&datetime_shape(), &rows, DecimalFormat::String, &[])
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("no column"), "{err}");
    }

    #[test]
    fn unsigned_values_keep_their_width() {
        assert_eq!(unsigned_of(-1, ColumnType::MYSQL_TYPE_TINY), 255);
        assert_eq!(unsigned_of(-1, ColumnType::MYSQL_TYPE_LONG), 4_294_967_295);
        assert_eq!(unsigned_of(-1, ColumnType::MYSQL_TYPE_LONGLONG), u64::MAX);
    }

    #[test]
    fn timestamps_are_utc_and_zero_is_null() {
        assert_eq!(
            timestamp(&MyValue::Bytes(b"1700000000.250000".to_vec())).unwrap(),
            Value::String("2023-11-14T22:13:20.250Z".into())
        );
        assert_eq!(timestamp(&MyValue::Int(0)).unwrap(), Value::Null);
    }

    /// Found by the `binlog_rows` fuzz target: a SET value of more than 8
    /// bytes overflowed the shift that gathers its member bits.
    #[test]
    fn fuzz_set_value_longer_than_64_members_is_refused() {
        let mut shape = datetime_shape();
        shape.sets[0] = vec!["a".into(), "b".into()];
        let col = Col {
            ty: ColumnType::MYSQL_TYPE_SET,
            meta: vec![0xf8, 9],
            unsigned: false,
            charset: 0,
        };
        let set = |bytes: Vec<u8>| {
            let value = BinlogValue::Value(MyValue::Bytes(bytes));
            value_of(&shape, Some(0), "at", &col, &value, DecimalFormat::String)
        };
        let err = set(vec![1; 9]).unwrap_err();
        assert!(err.contains("SET"), "{err}");
        assert_eq!(set(vec![3]).unwrap(), Value::String("a,b".into()));
    }

    /// Found by the `binlog_rows` fuzz target: a fraction of more than a
    /// second of microseconds overflowed as it became nanoseconds.
    #[test]
    fn fuzz_timestamp_fraction_beyond_a_second_is_refused() {
        for text in ["1700000000.4294967", "1700000000.1000000"] {
            let err = timestamp(&MyValue::Bytes(text.as_bytes().to_vec())).unwrap_err();
            assert!(err.contains("unreadable TIMESTAMP"), "{err}");
        }
        assert_eq!(
            timestamp(&MyValue::Bytes(b"1700000000.999999".to_vec())).unwrap(),
            Value::String("2023-11-14T22:13:20.999999Z".into())
        );
    }

    #[test]
    fn latin1_text_is_windows_1252_and_utf8_is_checked() {
        assert_eq!(
            text(&[0x63, 0x61, 0x66, 0xe9], Some("latin1")).unwrap(),
            "café"
        );
        assert_eq!(text(&[0x80], Some("latin1")).unwrap(), "€");
        assert_eq!(text("café".as_bytes(), Some("utf8mb4")).unwrap(), "café");
        assert!(text(&[0xff], Some("utf8mb4")).is_err());
        assert!(text(b"x", Some("cp1251")).is_err());
    }
}
