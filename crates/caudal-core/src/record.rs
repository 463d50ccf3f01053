//! The record model: what sources produce and sinks deliver.
//!
//! A record is a JSON object (the row or event) plus where it came from: its
//! [`Position`] in the source. Positions are totally ordered within one
//! pipeline, which is what checkpoints and idempotency keys build on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One typed value of a cursor column, kept with its type so it can be bound
/// back into a query with the same SQL type it was read with (comparing a
/// timestamp column with a text parameter would be wrong or slow).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum CursorValue {
    /// A signed integer column.
    Int(i64),
    /// An unsigned integer column (MySQL `BIGINT UNSIGNED`).
    Uint(u64),
    /// A floating point column.
    Float(f64),
    /// An exact decimal, as its decimal string.
    Decimal(String),
    /// A text column.
    Text(String),
    /// A zone-less timestamp (`timestamp`, `DATETIME`), as stored.
    Timestamp(String),
    /// A timestamp with a zone (`timestamptz`, MySQL `TIMESTAMP`), in UTC.
    TimestampTz(String),
    /// A date.
    Date(String),
    /// A UUID.
    Uuid(String),
}

impl CursorValue {
    /// The value as it appears in a record, for display.
    pub fn display(&self) -> String {
        match self {
            Self::Int(v) => v.to_string(),
            Self::Uint(v) => v.to_string(),
            Self::Float(v) => v.to_string(),
            Self::Decimal(s)
            | Self::Text(s)
            | Self::Timestamp(s)
            | Self::TimestampTz(s)
            | Self::Date(s)
            | Self::Uuid(s) => s.clone(),
        }
    }
}

/// Where a record sits in its source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// An incremental SQL source: the values of the cursor columns.
    Cursor { values: Vec<CursorValue> },
    /// A change streamed from PostgreSQL's log: the LSN of its
    /// transaction's commit and its index within the transaction (many
    /// changes share one commit LSN).
    Lsn { lsn: u64, index: u64 },
    /// A row read by a CDC snapshot: the log position the snapshot is
    /// consistent with, the table, and the row's primary key.
    Snapshot {
        lsn: u64,
        table: String,
        key: Vec<CursorValue>,
    },
    /// A CDC snapshot was read to its end: streaming goes on from `lsn`.
    /// Carried by a marker record that is never sent.
    SnapshotDone { lsn: u64 },
    /// A change streamed from a MySQL/MariaDB binary log: the file and
    /// offset where its transaction starts, its index within the
    /// transaction, and the transaction's GTID when the server logs one
    /// (MariaDB `domain-server-sequence`).
    Binlog {
        file: String,
        pos: u64,
        index: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtid: Option<String>,
    },
    /// A row read by a binlog CDC snapshot consistent with `file`:`pos`.
    BinlogSnapshot {
        file: String,
        pos: u64,
        table: String,
        key: Vec<CursorValue>,
    },
    /// Binlog streaming goes on from `file`:`pos` (a transaction boundary):
    /// the end of a snapshot, or the log read past changes of tables not
    /// captured. Carried by a marker record that is never sent.
    BinlogResume { file: String, pos: u64 },
    /// A row read by an on-demand backfill, consistent with `file`:`pos`
    /// and placed in the stream there (before the transaction starting
    /// at it).
    BinlogBackfill {
        file: String,
        pos: u64,
        table: String,
        key: Vec<CursorValue>,
    },
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

impl Position {
    /// A compact, stable text form, used in logs, status and keys.
    pub fn display(&self) -> String {
        match self {
            Self::Cursor { values } => {
                let parts: Vec<String> = values.iter().map(CursorValue::display).collect();
                format!("({})", parts.join(", "))
            }
            Self::Lsn { lsn, index } => format!("{}#{index}", format_lsn(*lsn)),
            Self::SnapshotDone { lsn } => format!("snapshot done@{}", format_lsn(*lsn)),
            Self::Snapshot { lsn, table, key } => {
                let parts: Vec<String> = key.iter().map(CursorValue::display).collect();
                format!(
                    "snapshot@{} {table} ({})",
                    format_lsn(*lsn),
                    parts.join(", ")
                )
            }
            Self::Binlog {
                file, pos, index, ..
            } => format!("{file}:{pos}#{index}"),
            Self::BinlogResume { file, pos } => format!("resume@{file}:{pos}"),
            Self::BinlogSnapshot {
                file,
                pos,
                table,
                key,
            }
            | Self::BinlogBackfill {
                file,
                pos,
                table,
                key,
            } => {
                let parts: Vec<String> = key.iter().map(CursorValue::display).collect();
                let what = if matches!(self, Self::BinlogSnapshot { .. }) {
                    "snapshot"
                } else {
                    "backfill"
                };
                format!("{what}@{file}:{pos} {table} ({})", parts.join(", "))
            }
        }
    }

    /// Whether the position only marks progress (the end of a CDC
    /// snapshot): its record is never sent.
    pub fn is_marker(&self) -> bool {
        matches!(self, Self::SnapshotDone { .. } | Self::BinlogResume { .. })
    }
}

/// One row or event on its way from a source to a sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The row as a JSON object, columns in source order.
    pub data: Map<String, Value>,
    /// Where the record sits in its source.
    pub position: Position,
    /// The entity the record is about, when the source knows it (a CDC
    /// source: table and primary key). Used for per-key ordering when the
    /// pipeline names no `key` field.
    pub key: Option<String>,
}

impl Record {
    /// The record's data as a JSON value.
    pub fn value(&self) -> Value {
        Value::Object(self.data.clone())
    }
}

/// Hex of the first 16 bytes of SHA-256 over the parts, each followed by a
/// zero byte so that ("ab", "c") and ("a", "bc") differ.
fn digest(parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for p in parts {
        hasher.update(p);
        hasher.update([0u8]);
    }
    let out = hasher.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(32);
    for b in &out[..16] {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

fn position_bytes(position: &Position) -> Vec<u8> {
    // The serialisation of a position is fixed by its type: same position,
    // same bytes, in every version that can read it.
    serde_json::to_vec(position).unwrap_or_default()
}

/// The stable id of the record at `position` in `pipeline`: the same record
/// read again (after a crash, a retry or a replay) has the same id.
pub fn event_id(pipeline: &str, position: &Position) -> String {
    digest(&[b"event", pipeline.as_bytes(), &position_bytes(position)])
}

/// The idempotency key of a batch: derived from the pipeline and the source
/// positions it covers (first, last and count), so a batch sent again after
/// a crash carries the same key for the same records.
pub fn batch_key(pipeline: &str, first: &Position, last: &Position, count: usize) -> String {
    digest(&[
        b"batch",
        pipeline.as_bytes(),
        &position_bytes(first),
        &position_bytes(last),
        count.to_string().as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(values: Vec<CursorValue>) -> Position {
        Position::Cursor { values }
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = pos(vec![
            CursorValue::TimestampTz("2025-05-14T12:00:00Z".into()),
            CursorValue::Int(7),
        ]);
        let b = pos(vec![
            CursorValue::TimestampTz("2025-05-14T12:00:00Z".into()),
            CursorValue::Int(8),
        ]);
        assert_eq!(event_id("p", &a), event_id("p", &a.clone()));
        assert_eq!(event_id("p", &a).len(), 32);
        assert_ne!(event_id("p", &a), event_id("p", &b));
        assert_ne!(event_id("p", &a), event_id("q", &a));
        assert_eq!(batch_key("p", &a, &b, 2), batch_key("p", &a, &b, 2));
        assert_ne!(batch_key("p", &a, &b, 2), batch_key("p", &a, &b, 3));
        assert_ne!(batch_key("p", &a, &b, 2), event_id("p", &a));
        // Pinned: a change here would break receivers' deduplication
        // across an upgrade (computed independently with Python's hashlib).
        assert_eq!(event_id("p", &a), "cbbb61e7fe1aa52c35405e77d648af73");
    }

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0u64, 0x0016_B374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/1"), Some(1));
        for bad in ["", "1", "x/1", "1/", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
