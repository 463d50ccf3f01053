//! How the MariaDB binary log's row events become changes: a stream of
//! arbitrary events goes through the client library's event reader (as
//! the replication connection's packets do); each table map event becomes
//! a table shape (`Shape::of`), each rows event its row images
//! (`images`), and each image the JSON of a change record. Decoding fails
//! or succeeds; a panic is a bug, and so is a record that is not JSON.
//!
//! Input: one byte of settings, then events back to back (19-byte header,
//! body, no checksums). The settings byte: bit 0 writes decimals as
//! numbers, bit 1 makes the first column a key column. A column's name
//! says what the catalog would know of it: `k…` is a key column, `j…` holds
//! JSON, `b…` is a `TINYINT(1)` boolean, `l…` is latin1 text, `c…` is in a
//! character set the log is not read in, `u…` is a type the log holds raw.
#![no_main]

use std::collections::HashMap;

use caudal_connectors::fuzzing::mysql::{Facts, Image, Shape, images};
use caudal_connectors::sources::change::{Change, Row, Stamp};
use caudal_connectors::sources::sql::ColumnKind;
use caudal_core::config::DecimalFormat;
use libfuzzer_sys::fuzz_target;
use mysql_common::binlog::EventStreamReader;
use mysql_common::binlog::consts::{BinlogVersion, EventType};
use mysql_common::binlog::events::{EventData, RowsEventData};
use serde_json::{Map, Value};

/// Bytes of an event's common header.
const HEADER_BYTES: usize = 19;
const MAX_EVENTS: usize = 64;
const ROWS_EVENTS: [EventType; 7] = [
    EventType::WRITE_ROWS_EVENT_V1,
    EventType::UPDATE_ROWS_EVENT_V1,
    EventType::DELETE_ROWS_EVENT_V1,
    EventType::WRITE_ROWS_EVENT,
    EventType::UPDATE_ROWS_EVENT,
    EventType::DELETE_ROWS_EVENT,
    EventType::PARTIAL_UPDATE_ROWS_EVENT,
];

/// A length-encoded integer off the front of `b`.
fn lenenc(b: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = b.split_first()?;
    let n = match first {
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        0xfb | 0xff => return None,
        small => {
            *b = rest;
            return Some(u64::from(small));
        }
    };
    let bytes = rest.get(..n)?;
    *b = &rest[n..];
    Some(
        bytes
            .iter()
            .rev()
            .fold(0, |acc, x| (acc << 8) | u64::from(*x)),
    )
}

/// Whether the ENUM and SET value lists of a table map's optional
/// metadata claim no more values than they have bytes. The client library
/// reserves room for the count it reads before reading the values (a
/// capacity overflow panic, or an allocation failure, on a huge count):
/// that is its bug, reported in docs/fuzzing.md, and such inputs are
/// skipped here.
fn value_lists_fit(body: &[u8]) -> bool {
    fn skip(b: &mut &[u8], n: usize) -> Option<()> {
        *b = b.get(n..)?;
        Some(())
    }
    let scan = |mut b: &[u8]| -> Option<bool> {
        skip(&mut b, 8)?;
        for _ in 0..2 {
            let n = usize::from(*b.first()?);
            skip(&mut b, 1 + n + 1)?;
        }
        let columns = usize::try_from(lenenc(&mut b)?).ok()?;
        skip(&mut b, columns)?;
        let meta = usize::try_from(lenenc(&mut b)?).ok()?;
        skip(&mut b, meta)?;
        skip(&mut b, columns.div_ceil(8))?;
        while let Some((&kind, mut rest)) = b.split_first() {
            let len = usize::try_from(lenenc(&mut rest)?).ok()?;
            let mut value = rest.get(..len)?;
            b = &rest[len..];
            if kind == 5 || kind == 6 {
                while !value.is_empty() {
                    let count = lenenc(&mut value)?;
                    if count > value.len() as u64 {
                        return Some(false);
                    }
                    for _ in 0..count {
                        let n = usize::try_from(lenenc(&mut value)?).ok()?;
                        skip(&mut value, n)?;
                    }
                }
            }
        }
        Some(true)
    };
    // One this scan cannot follow is skipped as well.
    scan(body).unwrap_or(false)
}

/// What the catalog would say about a table's columns, from their names.
fn facts(columns: &[String]) -> Facts {
    let mut facts = Facts::default();
    for name in columns {
        match name.as_bytes().first() {
            Some(b'j') => {
                facts.json.insert(name.clone());
            }
            Some(b'b') => {
                facts.boolean.insert(name.clone());
            }
            Some(b'l') => {
                facts.charsets.insert(name.clone(), "latin1".into());
            }
            Some(b'c') => {
                facts.charsets.insert(name.clone(), "cp1251".into());
            }
            Some(b'u') => {
                facts.unsupported.insert(name.clone(), "uuid".into());
            }
            _ => {}
        }
    }
    facts
}

fn key_columns(shape: &Shape, first_is_key: bool) -> Vec<(String, ColumnKind)> {
    shape
        .columns
        .iter()
        .enumerate()
        .filter(|(i, name)| name.starts_with('k') || (first_is_key && *i == 0))
        .map(|(_, name)| (name.clone(), ColumnKind::Other("fuzz".into())))
        .collect()
}

/// The record of one change, checked to be one JSON object.
fn record(
    op: &'static str,
    table: &str,
    key: Map<String, Value>,
    before: Option<Image>,
    after: Option<Image>,
) {
    let (after, unchanged) = match after {
        Some(image) => (Some(Row::Encoded(image.row.finish())), image.missing),
        None => (None, Vec::new()),
    };
    let change = Change {
        op,
        table: table.to_string(),
        key,
        unchanged,
        before: before.map(|image| Row::Encoded(image.row.finish())),
        after,
    };
    let stamp = Stamp {
        fields: [
            ("binlog", Value::from("mariadb-bin.000001:4")),
            ("gtid", Value::from("0-1-1")),
        ],
        commit_time: None,
        index: Some(0),
    };
    let json = change.encode(&stamp);
    match serde_json::from_str::<Value>(json.as_str()) {
        Ok(Value::Object(fields)) => assert_eq!(fields["op"], op),
        other => panic!("a change record that is not a JSON object: {other:?}\n{json}"),
    }
    let _ = change.entity();
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, mut input)) = data.split_first() else {
        return;
    };
    let decimals = if settings & 1 != 0 {
        DecimalFormat::Number
    } else {
        DecimalFormat::String
    };
    let first_is_key = settings & 2 != 0;
    let mut reader = EventStreamReader::new(BinlogVersion::Version4);
    let mut shapes: HashMap<u64, Shape> = HashMap::new();
    for _ in 0..MAX_EVENTS {
        // A replication packet holds one whole event: one whose header
        // claims more (or less) than there is never reaches the reader.
        if input.len() < HEADER_BYTES {
            break;
        }
        let size = u32::from_le_bytes([input[9], input[10], input[11], input[12]]) as usize;
        if size < HEADER_BYTES || size > input.len() {
            break;
        }
        // A format description would switch checksums on: events here
        // carry none.
        if input[4] == EventType::FORMAT_DESCRIPTION_EVENT as u8 {
            input = &input[size..];
            continue;
        }
        let mut event_bytes = &input[..size];
        input = &input[size..];
        if event_bytes[4] == EventType::TABLE_MAP_EVENT as u8
            && !value_lists_fit(&event_bytes[HEADER_BYTES..])
        {
            continue;
        }
        let Ok(Some(event)) = reader.read(&mut event_bytes) else {
            break;
        };
        // The source reads the data of table maps and rows events only
        // (and rotations and queries, by their own types).
        let ty = event.header().event_type_raw();
        if ty != EventType::TABLE_MAP_EVENT as u8 && !ROWS_EVENTS.iter().any(|t| *t as u8 == ty) {
            continue;
        }
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                let columns: Vec<String> = match Shape::of(&tme, Facts::default()) {
                    Ok(Some(shape)) => shape.columns,
                    _ => continue,
                };
                if let Ok(Some(shape)) = Shape::of(&tme, facts(&columns)) {
                    shapes.insert(tme.table_id(), shape);
                }
            }
            Ok(Some(EventData::RowsEvent(rows))) => {
                let Some(shape) = shapes.get(&rows.table_id()) else {
                    continue;
                };
                let op = match rows {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        "insert"
                    }
                    RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                        "delete"
                    }
                    _ => "update",
                };
                let key = key_columns(shape, first_is_key);
                let Ok(decoded) = images(shape, &rows, decimals, &key) else {
                    continue;
                };
                for (before, after) in decoded {
                    let key_of = |image: &Image| -> Map<String, Value> {
                        key.iter()
                            .map(|(k, _)| {
                                (k.clone(), image.key.get(k).cloned().unwrap_or(Value::Null))
                            })
                            .collect()
                    };
                    let k = after
                        .as_ref()
                        .map(key_of)
                        .or_else(|| before.as_ref().map(key_of))
                        .unwrap_or_default();
                    record(op, &shape.table, k, before, after);
                }
            }
            _ => {}
        }
    }
});
