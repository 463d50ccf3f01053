//! How a CDC change becomes its record: column values in PostgreSQL's
//! binary format (as snapshots and the replication stream carry them)
//! decoded by their type, text values, NULLs and unchanged TOAST columns,
//! a key picked from the row, then the change encoded once, with its
//! position fields, into the record's JSON. Every decode either fails or
//! gives a value; the encoded record is one JSON object whose fields are
//! the change's.
//!
//! Input: a settings byte (bits 0-2: the operation, read, insert, update,
//! delete or truncate; bit 3: decimals as numbers; bit 4: the row written
//! straight into JSON, as the stream does, rather than through a map, as
//! snapshots and old rows are), a byte whose bit i makes column i a key
//! column, the table name (a length byte, then its bytes), then columns:
//! the name (length byte, bytes), the type (an index into the list below),
//! the cell (0 NULL, 1 unchanged TOAST, 2 binary, 3 text) and the value
//! (length u16 LE, bytes).
#![no_main]

use std::sync::OnceLock;

use caudal_connectors::fuzzing::pg_binary_value;
use caudal_connectors::sources::change::{Change, Row, Stamp};
use caudal_core::config::DecimalFormat;
use caudal_core::record::ObjectWriter;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use sqlx::postgres::{PgTypeInfo, Postgres};

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Insert,
    Update,
    Delete,
    Truncate,
}

#[derive(Debug)]
struct Column<'a> {
    name: std::borrow::Cow<'a, str>,
    ty: u8,
    value: Cell<'a>,
}

#[derive(Debug)]
enum Cell<'a> {
    Null,
    Unchanged,
    Binary(&'a [u8]),
    Text(&'a [u8]),
}

/// Takes `n` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn column<'a>(input: &mut &'a [u8]) -> Option<Column<'a>> {
    let n = usize::from(take(input, 1)?[0]);
    let name = String::from_utf8_lossy(take(input, n)?);
    let &[ty, cell] = take(input, 2)? else {
        return None;
    };
    let len = take(input, 2)?;
    let bytes = take(input, usize::from(u16::from_le_bytes([len[0], len[1]])))?;
    let value = match cell % 4 {
        0 => Cell::Null,
        1 => Cell::Unchanged,
        2 => Cell::Binary(bytes),
        _ => Cell::Text(bytes),
    };
    Some(Column { name, ty, value })
}

const MAX_COLUMNS: usize = 16;
const LSN: u64 = 0x16_B374_D848;

fn ty<T: sqlx::Type<Postgres>>() -> PgTypeInfo {
    T::type_info()
}

/// The built-in types a table can have (their arrays too); extension,
/// enum and domain types need a server to resolve.
fn types() -> &'static [PgTypeInfo] {
    use sqlx::postgres::types::{Oid, PgInterval, PgMoney, PgTimeTz};
    static TYPES: OnceLock<Vec<PgTypeInfo>> = OnceLock::new();
    TYPES.get_or_init(|| {
        vec![
            ty::<bool>(),
            ty::<i8>(),
            ty::<i16>(),
            ty::<i32>(),
            ty::<i64>(),
            ty::<f32>(),
            ty::<f64>(),
            ty::<Oid>(),
            ty::<String>(),
            ty::<Vec<u8>>(),
            ty::<bigdecimal::BigDecimal>(),
            ty::<chrono::NaiveDate>(),
            ty::<chrono::NaiveTime>(),
            ty::<chrono::NaiveDateTime>(),
            ty::<chrono::DateTime<chrono::Utc>>(),
            ty::<PgTimeTz>(),
            ty::<PgInterval>(),
            ty::<PgMoney>(),
            ty::<uuid::Uuid>(),
            ty::<serde_json::Value>(),
            ty::<Vec<bool>>(),
            ty::<Vec<i16>>(),
            ty::<Vec<i32>>(),
            ty::<Vec<i64>>(),
            ty::<Vec<f64>>(),
            ty::<Vec<String>>(),
            ty::<Vec<Vec<u8>>>(),
            ty::<Vec<bigdecimal::BigDecimal>>(),
            ty::<Vec<chrono::NaiveDate>>(),
            ty::<Vec<chrono::DateTime<chrono::Utc>>>(),
            ty::<Vec<PgInterval>>(),
            ty::<Vec<uuid::Uuid>>(),
            ty::<Vec<serde_json::Value>>(),
        ]
    })
}

/// Equal values, floats within a few units in the last place: serde_json
/// (without its `float_roundtrip` feature) may read a float back 1 ULP off
/// the value whose shortest text it wrote (more for subnormal values), and
/// a row parsed and written again drifts each time.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    let d = (x - y).abs();
                    d <= 1e-12 * x.abs().max(y.abs()) || d < f64::MIN_POSITIVE
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => same_map(x, y),
        _ => a == b,
    }
}

fn same_map(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
}

/// A text-format column, as the stream hands those on.
fn text_value(bytes: &[u8]) -> Result<Value, String> {
    std::str::from_utf8(bytes)
        .map(|s| Value::String(s.to_string()))
        .map_err(|e| format!("invalid UTF-8: {e}"))
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Some(&[settings, key_mask]) = take(&mut input, 2) else {
        return;
    };
    let Some(table) = take(&mut input, 1).and_then(|n| take(&mut input, usize::from(n[0]))) else {
        return;
    };
    let table = String::from_utf8_lossy(table);
    let mut columns = Vec::new();
    while columns.len() < MAX_COLUMNS
        && let Some(c) = column(&mut input)
    {
        columns.push(c);
    }
    let op =
        [Op::Read, Op::Insert, Op::Update, Op::Delete, Op::Truncate][usize::from(settings & 7) % 5];
    let decimals = if settings & 8 != 0 {
        DecimalFormat::Number
    } else {
        DecimalFormat::String
    };
    let encoded_row = settings & 16 != 0;
    let types = types();
    let mut row = Map::new();
    let mut writer = ObjectWriter::with_capacity(64);
    let mut names = Vec::new();
    let mut unchanged = Vec::new();
    for column in &columns {
        let ty = &types[usize::from(column.ty) % types.len()];
        let value = match column.value {
            Cell::Null => Value::Null,
            Cell::Unchanged => {
                unchanged.push(column.name.to_string());
                continue;
            }
            Cell::Binary(bytes) => match pg_binary_value(ty, bytes, decimals) {
                Ok(v) => v,
                Err(e) => {
                    assert!(!e.is_empty(), "an empty decode error");
                    return;
                }
            },
            Cell::Text(bytes) => match text_value(bytes) {
                Ok(v) => v,
                Err(_) => return,
            },
        };
        // A table's column names are distinct.
        if row.contains_key(column.name.as_ref()) {
            continue;
        }
        writer.key(&column.name).value(&value);
        names.push(column.name.to_string());
        row.insert(column.name.to_string(), value);
    }
    let mut key = Map::new();
    for (i, name) in names.iter().enumerate().take(8) {
        if key_mask & (1 << i) != 0 {
            key.insert(name.clone(), row[name].clone());
        }
    }
    let encoded = writer.finish();
    assert!(
        same_map(&encoded.to_map(), &row),
        "a row written straight differs: {encoded}"
    );
    let after_row = if encoded_row {
        Row::Encoded(encoded)
    } else {
        Row::Values(row.clone())
    };
    let (name, before, after) = match op {
        Op::Read => ("read", None, Some(after_row)),
        Op::Insert => ("insert", None, Some(after_row)),
        Op::Update => ("update", Some(Row::Values(key.clone())), Some(after_row)),
        Op::Delete => ("delete", Some(after_row), None),
        Op::Truncate => ("truncate", None, None),
    };
    let change = Change {
        op: name,
        table: table.to_string(),
        key: key.clone(),
        before,
        after,
        unchanged: unchanged.clone(),
    };
    let stamp = Stamp {
        fields: [("lsn", Value::from(LSN)), ("xid", Value::from(771))],
        commit_time: Some("2025-05-14T10:00:00Z"),
        index: Some(u64::from(key_mask)),
    };
    let json = change.encode(&stamp);
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(json.as_str()) else {
        panic!("a record that is not a JSON object: {json}");
    };
    assert_eq!(fields["op"], name);
    assert_eq!(fields["table"], table.as_ref());
    assert!(
        same(&fields["key"], &Value::Object(key)),
        "the record's key differs: {json}"
    );
    assert_eq!(fields["lsn"], LSN);
    assert_eq!(fields["unchanged"], serde_json::json!(unchanged));
    let whole = |name: &str| match &fields[name] {
        Value::Object(m) => Some(m.clone()),
        _ => None,
    };
    let whole_row = match op {
        Op::Read | Op::Insert | Op::Update => whole("after"),
        Op::Delete => whole("before"),
        Op::Truncate => Some(row.clone()),
    };
    assert!(
        whole_row.is_some_and(|r| same_map(&r, &row)),
        "the record's row differs: {json}"
    );
    let entity = change.entity();
    assert!(
        entity.starts_with(table.as_ref()),
        "the entity names another table"
    );
});
