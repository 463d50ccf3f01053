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

use caudal_core::record::{CursorValue, Json, ObjectWriter};
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

/// One change as every CDC source describes it, from its decoder to its
/// record.
#[derive(Debug)]
pub struct Change {
    /// `read` (snapshot, backfill), `insert`, `update`, `delete` or
    /// `truncate`.
    pub op: &'static str,
    /// The table, schema-qualified.
    pub table: String,
    /// The row's identity: its primary key columns (or, for a table
    /// without one, what identifies it: see each source).
    pub key: Map<String, Value>,
    /// The row before the change (updates, deletes), as the log has it.
    pub before: Option<Row>,
    /// The row after the change (reads, inserts, updates).
    pub after: Option<Row>,
    /// Columns left out of `after` because the log did not carry them.
    pub unchanged: Vec<String>,
}

/// A row of a change: its values, or already encoded (a decoder that
/// writes a row straight into JSON text saves building a map of it).
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Values(Map<String, Value>),
    Encoded(Json),
}

impl From<Map<String, Value>> for Row {
    fn from(values: Map<String, Value>) -> Self {
        Self::Values(values)
    }
}

impl Row {
    /// The row's values (parsed, when it is encoded).
    pub fn values(&self) -> std::borrow::Cow<'_, Map<String, Value>> {
        match self {
            Self::Values(m) => std::borrow::Cow::Borrowed(m),
            Self::Encoded(j) => std::borrow::Cow::Owned(j.to_map()),
        }
    }
}

/// Where a change sits in its source's log, as its record shows it.
#[derive(Debug)]
pub struct Stamp<'a> {
    /// The source's own position fields, e.g. `lsn` and `xid`, or
    /// `binlog` and `gtid`.
    pub fields: [(&'a str, Value); 2],
    /// The commit time of the change's transaction (RFC 3339), if known.
    pub commit_time: Option<&'a str>,
    /// The change's index within its transaction, if it has one.
    pub index: Option<u64>,
}

impl Change {
    /// The record, encoded once: `{op, table, key, before, after,
    /// unchanged}` followed by the stamp's fields, `commit_time` and
    /// `index`.
    pub fn encode(&self, stamp: &Stamp<'_>) -> Json {
        let mut w = ObjectWriter::with_capacity(128);
        w.key("op").str(self.op);
        w.key("table").str(&self.table);
        w.key("key").map(&self.key);
        for (name, row) in [("before", &self.before), ("after", &self.after)] {
            match row {
                Some(Row::Values(values)) => w.key(name).map(values),
                Some(Row::Encoded(json)) => w.key(name).json(json),
                None => w.key(name).null(),
            }
        }
        w.key("unchanged").strs(&self.unchanged);
        for (name, value) in &stamp.fields {
            w.key(name).value(value);
        }
        match stamp.commit_time {
            Some(t) => w.key("commit_time").str(t),
            None => w.key("commit_time").null(),
        }
        match stamp.index {
            Some(i) => w.key("index").u64(i),
            None => w.key("index").null(),
        }
        w.finish()
    }

    /// The entity the change is about (table and key), for per-key order;
    /// a change without a key is ordered against its whole table.
    pub fn entity(&self) -> String {
        if self.key.is_empty() {
            self.table.clone()
        } else {
            entity_key(&self.table, &self.key)
        }
    }
}

/// `table[key values]`: the entity a change is about, for per-key order.
pub fn entity_key(table: &str, key: &Map<String, Value>) -> String {
    let values: Vec<&Value> = key.values().collect();
    format!("{table}{}", json!(values))
}
