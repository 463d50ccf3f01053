//! Reading a whole PostgreSQL table with binary `COPY`, in ctid ranges, on
//! several connections at once, all inside one snapshot: how first loads
//! and CDC snapshots read a table near the server's own speed.
//!
//! Promises:
//! - **One consistent view.** Every connection imports the same exported
//!   snapshot, so the rows are the table as of that snapshot, each once.
//! - **Physical order.** Rows come in ctid order: chunks of pages in page
//!   order, rows in order within a chunk. A reader can therefore resume
//!   after the last ctid it made durable (with a new snapshot: rows that
//!   moved meanwhile are the business of whoever reads the changes since).
//! - **Bounded memory.** At most `workers + 1` chunks are read ahead of
//!   the consumer.
//! - **The same values as the incremental source.** Each column is decoded
//!   from PostgreSQL's binary format by the decoder queries use, so a row
//!   reads the same whichever way it was read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Buf, BytesMut};
use caudal_core::config::DecimalFormat;
use caudal_core::{Error, ErrorKind, Result};
use futures::StreamExt as _;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgTypeInfo};
use sqlx::{AssertSqlSafe, Column, Connection, Executor, SqlSafeStr, Statement};
use tokio::sync::{Semaphore, mpsc};

use super::postgres::binary_value;

/// Pages read by one `COPY` (a chunk): about 1 MB of table.
pub const CHUNK_PAGES: u32 = 128;

/// The binary `COPY` signature, flags and header extension length.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// A row's physical place: its page and its tuple's index in the page.
pub type Ctid = (u32, u16);

/// Builds what a consumer wants of each row (its encoded record, a map of
/// its values) from the row's ctid and its decoded column values.
pub trait RowBuilder: Send + Sync + 'static {
    type Row: Send + 'static;
    /// `names` and `values` are the table's columns, in order.
    fn build(&self, ctid: Ctid, names: &[String], values: Vec<Value>) -> Result<Self::Row>;
}

/// What to read.
#[derive(Clone, Debug)]
pub struct CopyTable {
    /// The source's name, for errors.
    pub source: String,
    /// `"schema"."table"`.
    pub quoted: String,
    /// The columns to read: `*` or a list of quoted names.
    pub select: String,
    /// A condition rows must meet, as SQL with literals (`COPY` takes no
    /// parameters).
    pub filter: Option<String>,
    /// Resume after this ctid.
    pub after: Option<Ctid>,
    pub decimals: DecimalFormat,
}

/// The rows of one table being read: chunks of rows in ctid order. Dropping
/// it stops the reading.
#[derive(Debug)]
pub struct Chunks<R> {
    rows: mpsc::Receiver<Result<Vec<R>>>,
    _tasks: TaskGuard,
}

impl<R> Chunks<R> {
    /// The next chunk's rows (never empty); `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<R>>> {
        self.rows.recv().await.transpose()
    }
}

#[derive(Debug)]
struct TaskGuard(Vec<tokio::task::JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts reading `table` as of the exported snapshot `snapshot` on
/// `workers` connections of `options`. The exporting transaction must stay
/// open until this returns (every connection has imported the snapshot by
/// then).
pub async fn read<B: RowBuilder>(
    options: &PgConnectOptions,
    snapshot: &str,
    table: CopyTable,
    workers: usize,
    builder: Arc<B>,
) -> Result<Chunks<B::Row>> {
    let workers = workers.max(1);
    if !snapshot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("unexpected snapshot name {snapshot:?}"),
        ));
    }
    let err = |what: &str, e: sqlx::Error| {
        crate::sources::change::query_error(&table.source, &format!("{what} {}", table.quoted), e)
    };
    let mut conns = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut conn = PgConnection::connect_with(options)
            .await
            .map_err(|e| err("cannot connect to read", e))?;
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| err("cannot start reading", e))?;
        conn.execute(AssertSqlSafe(format!(
            "SET TRANSACTION SNAPSHOT '{snapshot}'"
        )))
        .await
        .map_err(|e| err("cannot take the snapshot to read", e))?;
        conns.push(conn);
    }
    let (names, types) = describe(&mut conns[0], &table.select, &table.quoted)
        .await
        .map_err(|e| err("cannot describe", e))?;
    let pages: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT (pg_relation_size('{}'::regclass) / current_setting('block_size')::int8)::int8",
        table.quoted.replace('\'', "''")
    )))
    .fetch_one(&mut conns[0])
    .await
    .map_err(|e| err("cannot measure", e))?;
    let pages = u32::try_from(pages.max(0)).unwrap_or(u32::MAX);
    let first = table.after.map_or(0, |(page, _)| page);
    let chunks = pages.saturating_sub(first).div_ceil(CHUNK_PAGES).max(1);
    let shared = Arc::new(Shared {
        table,
        names,
        types,
        next: AtomicU32::new(0),
        chunks,
        first,
        ahead: Semaphore::new(workers + 1),
    });
    let (done_tx, done_rx) = mpsc::channel(workers + 1);
    let (out_tx, out_rx) = mpsc::channel(1);
    let mut tasks = Vec::with_capacity(workers + 1);
    for conn in conns {
        let (shared, done, builder) = (shared.clone(), done_tx.clone(), builder.clone());
        tasks.push(tokio::spawn(work(conn, shared, done, builder)));
    }
    drop(done_tx);
    tasks.push(tokio::spawn(sequence(shared, done_rx, out_tx)));
    Ok(Chunks {
        rows: out_rx,
        _tasks: TaskGuard(tasks),
    })
}

/// What the workers share.
struct Shared {
    table: CopyTable,
    names: Vec<String>,
    types: Vec<PgTypeInfo>,
    /// The next chunk to read.
    next: AtomicU32,
    chunks: u32,
    /// The page the first chunk starts at.
    first: u32,
    /// Chunks read and not yet handed on.
    ahead: Semaphore,
}

impl Shared {
    /// The `COPY` of chunk `i`.
    fn statement(&self, i: u32) -> String {
        let t = &self.table;
        let start = self.first.saturating_add(i.saturating_mul(CHUNK_PAGES));
        let mut conditions = vec![format!("ctid >= '({start},0)'::tid")];
        if i + 1 < self.chunks {
            let end = start.saturating_add(CHUNK_PAGES);
            conditions.push(format!("ctid < '({end},0)'::tid"));
        }
        if let (0, Some((page, tuple))) = (i, t.after) {
            conditions.push(format!("ctid > '({page},{tuple})'::tid"));
        }
        if let Some(f) = &t.filter {
            conditions.push(format!("({f})"));
        }
        format!(
            "COPY (SELECT ctid, {} FROM {} WHERE {}) TO STDOUT (FORMAT binary)",
            t.select,
            t.quoted,
            conditions.join(" AND ")
        )
    }
}

/// The table's columns and their types (after `ctid`).
async fn describe(
    conn: &mut PgConnection,
    select: &str,
    quoted: &str,
) -> std::result::Result<(Vec<String>, Vec<PgTypeInfo>), sqlx::Error> {
    let sql = format!("SELECT {select} FROM {quoted} LIMIT 0");
    let stmt = conn.prepare(AssertSqlSafe(sql).into_sql_str()).await?;
    Ok(stmt
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_info().clone()))
        .unzip())
}

/// One connection's work: chunks, taken in order, until none is left.
async fn work<B: RowBuilder>(
    mut conn: PgConnection,
    shared: Arc<Shared>,
    done: mpsc::Sender<(u32, Result<Vec<B::Row>>)>,
    builder: Arc<B>,
) {
    loop {
        let Ok(permit) = shared.ahead.acquire().await else {
            return;
        };
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.chunks {
            return;
        }
        // The permit goes back when the chunk is handed on.
        permit.forget();
        let rows = read_chunk(&mut conn, &shared, i, builder.as_ref()).await;
        let failed = rows.is_err();
        if done.send((i, rows)).await.is_err() || failed {
            return;
        }
    }
}

/// Hands chunks on in order as they finish.
async fn sequence<R>(
    shared: Arc<Shared>,
    mut done: mpsc::Receiver<(u32, Result<Vec<R>>)>,
    out: mpsc::Sender<Result<Vec<R>>>,
) {
    let mut waiting: BTreeMap<u32, Result<Vec<R>>> = BTreeMap::new();
    let mut next = 0;
    while next < shared.chunks {
        while let Some(rows) = waiting.remove(&next) {
            next += 1;
            shared.ahead.add_permits(1);
            match rows {
                Ok(rows) if rows.is_empty() => {}
                Ok(rows) => {
                    if out.send(Ok(rows)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        }
        if next >= shared.chunks {
            return;
        }
        match done.recv().await {
            Some((i, rows)) => {
                waiting.insert(i, rows);
            }
            None => {
                let _ = out
                    .send(Err(Error::new(
                        ErrorKind::Internal,
                        "the table's readers stopped before its end",
                    )))
                    .await;
                return;
            }
        }
    }
}

/// Reads and decodes chunk `i`.
async fn read_chunk<B: RowBuilder>(
    conn: &mut PgConnection,
    shared: &Shared,
    i: u32,
    builder: &B,
) -> Result<Vec<B::Row>> {
    let t = &shared.table;
    let statement = shared.statement(i);
    let mut stream = conn.copy_out_raw(&statement).await.map_err(|e| {
        crate::sources::change::query_error(&t.source, &format!("cannot read {}", t.quoted), e)
    })?;
    let mut buf = BytesMut::new();
    let mut parser = Parser::default();
    let mut rows = Vec::new();
    while let Some(data) = stream.next().await {
        let data = data.map_err(|e| {
            crate::sources::change::query_error(
                &t.source,
                &format!("reading {} failed", t.quoted),
                e,
            )
        })?;
        buf.extend_from_slice(&data);
        while let Some(fields) = parser.next(&mut buf).map_err(|m| decode_error(t, &m))? {
            rows.push(row(shared, fields, builder)?);
        }
    }
    if !parser.ended {
        return Err(decode_error(t, "the COPY data ended early"));
    }
    Ok(rows)
}

fn decode_error(t: &CopyTable, message: &str) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!("source {:?}: reading {}: {message}", t.source, t.quoted),
    )
}

/// One row: its ctid, then its columns decoded.
fn row<B: RowBuilder>(
    shared: &Shared,
    fields: Vec<Option<bytes::Bytes>>,
    builder: &B,
) -> Result<B::Row> {
    let t = &shared.table;
    let mut fields = fields.into_iter();
    let ctid = match fields.next().flatten() {
        Some(b) if b.len() == 6 => (
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
        ),
        _ => return Err(decode_error(t, "a row without its ctid")),
    };
    let mut values = Vec::with_capacity(shared.names.len());
    for ((field, name), ty) in fields.zip(&shared.names).zip(&shared.types) {
        values.push(match field {
            None => Value::Null,
            Some(bytes) => binary_value(ty, &bytes, t.decimals).map_err(|e| {
                decode_error(
                    t,
                    &format!(
                        "column {name:?} of type {}: {e}; read the table through a `query` \
                         that casts it to a supported type (e.g. `{}::text`)",
                        sqlx::TypeInfo::name(ty),
                        super::quote_ident(caudal_core::config::SqlDialect::Postgres, name)
                    ),
                )
            })?,
        });
    }
    if values.len() != shared.names.len() {
        return Err(decode_error(t, "a row with fewer columns than the table"));
    }
    builder.build(ctid, &shared.names, values)
}

/// Parses PostgreSQL's binary `COPY` format from a growing buffer.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    header: bool,
    ended: bool,
}

impl Parser {
    /// Whether the trailer was read (the data is complete).
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// The next whole tuple's fields from the front of `buf` (consumed), or
    /// `None` when more data is needed or the trailer was read.
    pub(crate) fn next(
        &mut self,
        buf: &mut BytesMut,
    ) -> std::result::Result<Option<Vec<Option<bytes::Bytes>>>, String> {
        if !self.header {
            if buf.len() < SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err("not binary COPY data".into());
            }
            let ext = u32::from_be_bytes([buf[15], buf[16], buf[17], buf[18]]) as usize;
            if buf.len() < SIGNATURE.len() + 8 + ext {
                return Ok(None);
            }
            buf.advance(SIGNATURE.len() + 8 + ext);
            self.header = true;
        }
        if self.ended || buf.len() < 2 {
            return Ok(None);
        }
        let count = i16::from_be_bytes([buf[0], buf[1]]);
        if count == -1 {
            self.ended = true;
            buf.advance(2);
            return Ok(None);
        }
        let count = usize::try_from(count).map_err(|_| "a negative field count")?;
        // Whole tuple present?
        let mut at = 2;
        for _ in 0..count {
            let Some(len) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            at += 4;
            if len > 0 {
                at += len as usize;
            } else if len < -1 {
                return Err("a negative field length".into());
            }
        }
        if buf.len() < at {
            return Ok(None);
        }
        let mut tuple = buf.split_to(at).freeze();
        tuple.advance(2);
        let mut fields = Vec::with_capacity(count);
        for _ in 0..count {
            let len = tuple.get_i32();
            if len < 0 {
                fields.push(None);
            } else {
                fields.push(Some(tuple.split_to(len as usize)));
            }
        }
        Ok(Some(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }

    #[test]
    fn binary_copy_parses_across_any_split() {
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"ext!");
        data.extend(tuple(&[Some(b"ab"), None, Some(b"")]));
        data.extend(tuple(&[Some(b"xyz")]));
        data.extend_from_slice(&(-1i16).to_be_bytes());
        for split in 0..data.len() {
            let mut parser = Parser::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for part in [&data[..split], &data[split..]] {
                buf.extend_from_slice(part);
                while let Some(fields) = parser.next(&mut buf).expect("valid") {
                    got.push(fields);
                }
            }
            assert!(parser.ended, "split at {split}");
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0][0].as_deref(), Some(&b"ab"[..]));
            assert_eq!(got[0][1], None);
            assert_eq!(got[0][2].as_deref(), Some(&b""[..]));
            assert_eq!(got[1][0].as_deref(), Some(&b"xyz"[..]));
        }
        let mut bad = BytesMut::from(&b"PGCOPY\nxxxxxxxxxxxx"[..]);
        assert!(Parser::default().next(&mut bad).is_err());
    }
}
