//! The snapshot phase: the rows the captured tables hold at the slot's
//! start, read with binary `COPY` in ctid ranges on several connections,
//! all inside one snapshot.
//!
//! Promises:
//! - **Consistent with the stream.** A first snapshot reads exactly the
//!   snapshot the slot exported at its consistent point, so streaming from
//!   that point neither misses nor repeats a change.
//! - **Resumable.** Each row's position is its table and ctid; a run that
//!   stopped midway reads on after the last durable ctid in a fresh
//!   snapshot. Rows that changed in between are also in the stream (the
//!   slot keeps everything since its start), so the copy converges.
//!   A position written by an earlier version (by primary key) restarts
//!   its table.
//! - **Tables without a primary key** are read the same way (ctid ranges
//!   need no key).

use std::sync::Arc;

use caudal_core::record::{Json, ObjectWriter, Position, Record};
use serde_json::{Map, Value};

use super::*;
use crate::sources::change::{Change, Row};
use crate::sources::sql::postgres_copy::{self, CopyTable, Ctid, RowBuilder};

/// What the snapshot phase of a run starts from.
pub struct SnapshotStart {
    /// The slot-creating connection and the snapshot it exported, kept open
    /// until the snapshot has been read.
    pub exported: Option<(std::sync::Mutex<PgReplicationConnection>, String)>,
    /// Where to resume: table index and the last ctid read in it (none:
    /// the table from its start).
    pub resume: Option<(usize, Option<Ctid>)>,
    /// The LSN the snapshot is consistent with (stamped on its rows).
    pub lsn: u64,
}

impl std::fmt::Debug for SnapshotStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStart")
            .field("resume", &self.resume)
            .field("lsn", &self.lsn)
            .finish_non_exhaustive()
    }
}

/// Connections reading a table at once.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .clamp(1, 4)
}

impl Task {
    pub(super) async fn snapshot(&mut self, start: SnapshotStart) -> Result<()> {
        let source = self.source.clone();
        // The snapshot every reading connection imports: the slot's, or,
        // resuming, a fresh one held by a transaction of our own.
        let mut own = None;
        let (_exporter, name) = match start.exported {
            Some((conn, name)) => (Some(conn), name),
            None => {
                tracing::info!(source = %source, "reading the snapshot at the current state: changes since the slot's start follow from the stream");
                let mut conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| query_error(&source, "cannot start the snapshot", e))?;
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| query_error(&source, "cannot start the snapshot", e))?;
                let name: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| query_error(&source, "cannot export a snapshot", e))?;
                own = Some(conn);
                (None, name)
            }
        };
        let options = self.pool.connect_options();
        let (first_table, mut after) = match start.resume {
            Some((t, ctid)) => (t, ctid),
            None => (0, None),
        };
        let tables = self.tables.clone();
        for (ti, table) in tables.iter().enumerate().skip(first_table) {
            if ti != first_table {
                after = None;
            }
            let builder = Arc::new(SnapshotRows {
                table: table.name.clone(),
                key: table.key.iter().map(|(k, _)| k.clone()).collect(),
                lsn: start.lsn,
                lsn_text: format_lsn(start.lsn),
            });
            let mut chunks = postgres_copy::read(
                &options,
                &name,
                CopyTable {
                    source: source.clone(),
                    quoted: table.quoted.clone(),
                    select: "*".into(),
                    filter: None,
                    after,
                    decimals: self.decimals,
                },
                workers(),
                builder,
            )
            .await?;
            while let Some(mut rows) = chunks.next().await? {
                let n = rows.len() as u64;
                update_lag(&self.lag, |l| l.snapshot_rows += n);
                // Handed on in pages of `page_size`, as streamed changes are.
                while !rows.is_empty() {
                    let rest = rows.split_off(rows.len().min(self.page_size.max(1)));
                    self.send(rows).await?;
                    rows = rest;
                }
            }
        }
        if let Some(mut conn) = own {
            let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
        }
        // Once this marker is durable, a restart streams on instead of
        // reading the snapshot's last table again.
        self.send(vec![Record {
            data: Json::from_map(&Map::new()),
            position: Position::SnapshotDone { lsn: start.lsn },
            key: None,
        }])
        .await?;
        tracing::info!(source = %source, "snapshot read; streaming changes");
        Ok(())
    }
}

/// Builds each snapshot row's `read` record.
#[derive(Debug)]
struct SnapshotRows {
    table: String,
    /// The table's key columns (none without a key).
    key: Vec<String>,
    lsn: u64,
    lsn_text: String,
}

impl RowBuilder for SnapshotRows {
    type Row = Record;

    fn build(&self, (page, tuple): Ctid, names: &[String], values: Vec<Value>) -> Result<Record> {
        // The row is written straight into its JSON text; only the key
        // columns' values are kept as values.
        let mut row = ObjectWriter::with_capacity(names.len() * 24);
        let mut key = Map::with_capacity(self.key.len());
        for (name, value) in names.iter().zip(values) {
            row.key(name).value(&value);
            if self.key.contains(name) {
                key.insert(name.clone(), value);
            }
        }
        let key: Map<String, Value> = self
            .key
            .iter()
            .map(|k| (k.clone(), key.remove(k).unwrap_or(Value::Null)))
            .collect();
        let change = Change {
            op: "read",
            table: self.table.clone(),
            key,
            before: None,
            after: Some(Row::Encoded(row.finish())),
            unchanged: Vec::new(),
        };
        Ok(Record {
            data: change.encode(&Stamp {
                fields: [
                    ("lsn", Value::String(self.lsn_text.clone())),
                    ("xid", Value::Null),
                ],
                commit_time: None,
                index: None,
            }),
            key: Some(change.entity()),
            position: Position::SnapshotRow {
                lsn: self.lsn,
                table: self.table.clone(),
                page,
                tuple,
            },
        })
    }
}
