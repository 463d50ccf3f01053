//! The snapshot phase: every table read in one consistent snapshot.

use super::*;

/// Marks the position of a row of a table without a key: its number in
/// the snapshot's read of the table, not a key value.
const ROW_NUMBER: &str = "#row";

impl Task {
    /// Reads every table in one consistent snapshot; returns the binary log
    /// position it is consistent with (where streaming starts).
    pub(super) async fn snapshot(
        &mut self,
        resume: Option<(usize, Vec<CursorValue>, String, u64)>,
    ) -> Result<(String, u64)> {
        let source = self.source.clone();
        update_lag(&self.lag, |l| l.phase = Some("snapshot".into()));
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| query_error(&source, "cannot open the snapshot connection", e))?;
        let (file, pos) = consistent_snapshot(&mut conn, &source).await?;
        let (first, mut after, file, pos) = match resume {
            Some((t, key, f, p)) => {
                tracing::info!(source = %source, "resuming the snapshot at the current state: changes since its start follow from the stream");
                (t, Some(key), f, p)
            }
            None => {
                tracing::info!(source = %source, position = %format!("{file}:{pos}"), "reading the snapshot");
                (0, None, file, pos)
            }
        };
        let tables = self.tables.clone();
        for (ti, table) in tables.iter().enumerate().skip(first) {
            if ti != first {
                after = None;
            }
            if table.keyless() {
                let from = after.as_ref().and_then(|k| match k.as_slice() {
                    [CursorValue::Text(t), CursorValue::Int(n)] if t == ROW_NUMBER => Some(*n),
                    _ => None,
                });
                if !self
                    .read_keyless(&mut conn, table, from, &file, pos)
                    .await?
                {
                    return Ok((file, pos));
                }
                continue;
            }
            if after.as_ref().is_some_and(|k| k.len() != table.key.len()) {
                // The table's key changed since the position was saved (a
                // primary key added, say): read the table from its start.
                tracing::warn!(source = %source, table = %table.name, "the snapshot stopped inside this table when it had another key: it is read again from its start");
                after = None;
            }
            loop {
                let (rows, full) = chunk::read(
                    &mut conn,
                    &source,
                    table,
                    None,
                    after.as_deref(),
                    self.page_size,
                    self.decimals,
                )
                .await?;
                let mut page = Vec::with_capacity(rows.len());
                for row in rows {
                    after = Some(row.values.clone());
                    page.push(read_record(
                        table,
                        row,
                        Position::BinlogSnapshot {
                            file: file.clone(),
                            pos,
                            table: table.name.clone(),
                            key: after.clone().unwrap_or_default(),
                        },
                        &file,
                        pos,
                    ));
                }
                let n = page.len() as u64;
                if !page.is_empty() && self.out.send(Ok(page)).await.is_err() {
                    return Ok((file, pos));
                }
                update_lag(&self.lag, |l| l.snapshot_rows += n);
                if !full {
                    break;
                }
            }
        }
        let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
        let _ = self.out.send(Ok(vec![resume_marker(&file, pos)])).await;
        tracing::info!(source = %source, "snapshot read; streaming the binary log");
        Ok((file, pos))
    }

    /// Reads a table without a key in one pass. Its rows are numbered in the
    /// order read (the position's key is [`ROW_NUMBER`] and the number); a
    /// snapshot that stopped after row `from` reads the table again from
    /// its start, numbering on from there: the rows read before arrive
    /// again rather than some being skipped in a table that changed
    /// meanwhile. Returns `false` when the pipeline stopped taking pages.
    pub(super) async fn read_keyless(
        &mut self,
        conn: &mut sqlx::MySqlConnection,
        table: &Table,
        from: Option<i64>,
        file: &str,
        pos: u64,
    ) -> Result<bool> {
        if let Some(n) = from {
            tracing::warn!(source = %self.source, table = %table.name, rows = n, "the snapshot stopped inside a table without a key: it is read again from its start, so the rows read before arrive again");
        }
        // The rows stream while pages wait for the pipeline: the server must
        // not give up on a slow reader.
        sqlx::query("SET SESSION net_write_timeout = 86400")
            .execute(&mut *conn)
            .await
            .map_err(|e| query_error(&self.source, "cannot prepare the snapshot session", e))?;
        let (list, opts) = chunk::columns(&mut *conn, &self.source, table, self.decimals).await?;
        let sql = format!("SELECT {list} FROM {}", table.quoted);
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *conn);
        let mut ordinal = from.unwrap_or(0);
        let mut page = Vec::with_capacity(self.page_size);
        loop {
            let row = rows.next().await.transpose().map_err(|e| {
                query_error(&self.source, &format!("reading {} failed", table.name), e)
            })?;
            if let Some(row) = &row {
                let data = crate::sources::sql::mysql::decode_row(row, &opts)
                    .map_err(|e| chunk::fetch_error(&self.source, e))?;
                ordinal += 1;
                let position = Position::BinlogSnapshot {
                    file: file.to_string(),
                    pos,
                    table: table.name.clone(),
                    key: vec![
                        CursorValue::Text(ROW_NUMBER.into()),
                        CursorValue::Int(ordinal),
                    ],
                };
                let row = chunk::Row::new(&table.name, &table.key, data)?;
                page.push(read_record(table, row, position, file, pos));
            }
            if page.len() >= self.page_size || (row.is_none() && !page.is_empty()) {
                let n = page.len() as u64;
                let full = std::mem::replace(&mut page, Vec::with_capacity(self.page_size));
                if self.out.send(Ok(full)).await.is_err() {
                    return Ok(false);
                }
                update_lag(&self.lag, |l| l.snapshot_rows += n);
            }
            if row.is_none() {
                return Ok(true);
            }
        }
    }
}

/// Opens a consistent snapshot on `conn` and returns the binary log
/// position it matches.
pub(super) async fn consistent_snapshot(
    conn: &mut sqlx::MySqlConnection,
    source: &str,
) -> Result<(String, u64)> {
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot start the snapshot transaction", e))?;
    sqlx::query("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .execute(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot start the snapshot transaction", e))?;
    let rows: Vec<(String, String)> = sqlx::query_as("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| query_error(source, "cannot read the snapshot's binary log position", e))?;
    let get = |k: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    match (
        get("binlog_snapshot_file"),
        get("binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok()),
    ) {
        (Some(reported), Some(pos)) if !reported.is_empty() => {
            // MariaDB may give the name with stray bytes after its end (a
            // buffer it does not clear): take the log file it starts with.
            let logs: Vec<String> = sqlx::query("SHOW BINARY LOGS")
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| query_error(source, "cannot list the binary logs", e))?
                .iter()
                .filter_map(|r| sqlx::Row::try_get::<String, _>(r, 0).ok())
                .collect();
            let file = logs
                .into_iter()
                .filter(|l| reported.starts_with(l.as_str()))
                .max_by_key(String::len)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Query,
                        format!(
                            "source {source:?}: the snapshot's binary log file {reported:?} is not \
                             among the server's binary logs"
                        ),
                    )
                })?;
            Ok((file, pos))
        }
        _ => Err(Error::new(
            ErrorKind::Query,
            format!(
                "source {source:?}: the server did not report the snapshot's binary log position \
                 (binlog_snapshot_file/position); is the binary log on?"
            ),
        )),
    }
}
