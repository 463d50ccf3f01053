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
}

impl Position {
    /// A compact, stable text form, used in logs, status and keys.
    pub fn display(&self) -> String {
        match self {
            Self::Cursor { values } => {
                let parts: Vec<String> = values.iter().map(CursorValue::display).collect();
                format!("({})", parts.join(", "))
            }
        }
    }
}

/// One row or event on its way from a source to a sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The row as a JSON object, columns in source order.
    pub data: Map<String, Value>,
    /// Where the record sits in its source.
    pub position: Position,
}

impl Record {
    /// The record's data as a JSON value.
    pub fn value(&self) -> Value {
        Value::Object(self.data.clone())
    }
}
