//! The change data capture model every CDC source shares, below the
//! sources themselves: what a change is and how it becomes a record, the
//! reader handle a pipeline drives, live replication figures, on-demand
//! backfill requests, and [`ChangeCapture`], the interface through which
//! everything above the connectors uses a CDC source without knowing its
//! database.
//!
//! Layering: this module imports no CDC source; the sources
//! (`postgres_cdc`, `mysql_cdc`) import it; [`crate::sources::cdc`] picks
//! one by the configuration. Nothing above the connectors matches on the
//! database.

mod backfill;
mod capture;
mod live;
mod reader;

pub use backfill::{BackfillRequest, BackfillRequests};
pub use capture::{ChangeCapture, Held, Released};
pub use caudal_core::status::BackfillProgress;
pub use live::{SharedLag, read_lag, update_lag};
pub use reader::{CdcReader, Durable, spawn_reader};

use caudal_core::record::CursorValue;
use caudal_core::{Error, ErrorKind, Result};
use serde_json::{Map, Value, json};

use crate::sources::sql::ColumnKind;

/// A failed catalog or snapshot query as a caudal error: a lost
/// connection is [`ErrorKind::Connect`] (retried), anything else a query
/// error.
pub fn query_error(source: &str, what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            ErrorKind::Connect
        }
        _ => ErrorKind::Query,
    };
    Error::with_source(kind, format!("source {source:?}: {what}"), e)
}

/// One row of a primary-key chunk (a snapshot or a backfill).
#[derive(Debug)]
pub struct ChunkRow {
    /// The primary key as typed values (where the next chunk starts).
    pub values: Vec<CursorValue>,
    /// The primary key columns.
    pub key: Map<String, Value>,
    /// The whole row.
    pub data: Map<String, Value>,
    /// `schema.table[key values]`.
    pub entity: String,
}

impl ChunkRow {
    /// Picks the key of a decoded row of `table`, whose key columns are
    /// `key`.
    pub fn new(
        table: &str,
        key: &[(String, ColumnKind)],
        data: Map<String, Value>,
    ) -> Result<Self> {
        let mut values = Vec::with_capacity(key.len());
        let mut map = Map::new();
        for (col, kind) in key {
            let v = data.get(col).cloned().unwrap_or(Value::Null);
            values.push(kind.cursor_value(col, &v)?);
            map.insert(col.clone(), v);
        }
        Ok(Self {
            entity: entity_key(table, &map),
            values,
            key: map,
            data,
        })
    }
}

/// What a change is: the part of the record every CDC source shares.
#[derive(Debug)]
pub struct Change {
    pub op: String,
    pub table: String,
    pub key: Map<String, Value>,
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    /// Columns left out of `after` because the log did not carry them.
    pub unchanged: Vec<String>,
}

impl Change {
    /// The record: `{op, table, key, before, after, unchanged}` followed
    /// by the source's position fields (`lsn`, `xid` or `binlog`, `gtid`)
    /// and `commit_time` and `index`.
    pub fn into_record(
        self,
        position: [(&str, Value); 2],
        time: Option<String>,
        index: Option<u64>,
    ) -> Map<String, Value> {
        let mut m = Map::with_capacity(10);
        m.insert("op".into(), Value::String(self.op));
        m.insert("table".into(), Value::String(self.table));
        m.insert("key".into(), Value::Object(self.key));
        m.insert(
            "before".into(),
            self.before.map_or(Value::Null, Value::Object),
        );
        m.insert(
            "after".into(),
            self.after.map_or(Value::Null, Value::Object),
        );
        m.insert(
            "unchanged".into(),
            Value::Array(self.unchanged.into_iter().map(Value::String).collect()),
        );
        for (k, v) in position {
            m.insert(k.into(), v);
        }
        m.insert(
            "commit_time".into(),
            time.map_or(Value::Null, Value::String),
        );
        m.insert("index".into(), index.map_or(Value::Null, Value::from));
        m
    }
}

/// `table[key values]`: the entity a change is about, for per-key order.
pub fn entity_key(table: &str, key: &Map<String, Value>) -> String {
    let values: Vec<&Value> = key.values().collect();
    format!("{table}{}", json!(values))
}
