//! The stream phase: the binary log read as a replica, event by event,
//! with reconnects.

use super::*;

impl Task {
    /// Streams, reconnecting after a broken connection.
    pub(super) async fn stream(&mut self, mut st: Stream) -> Result<()> {
        let mut backfills = Backfills::default();
        let mut backoff = Duration::from_secs(1);
        // Failures in a row at one position, after a connection was made.
        let mut failures: (String, u64, u32) = (String::new(), 0, 0);
        loop {
            update_lag(&self.lag, |l| l.phase = Some("streaming".into()));
            let at = (st.file.clone(), st.next);
            let mut connected = false;
            match self
                .stream_once(&mut st, &mut backfills, &mut connected)
                .await
            {
                Ok(Ended::Stopped) => return Ok(()),
                Ok(Ended::Done) => {
                    self.end_marker(&mut st);
                    if !st.page.is_empty() {
                        let page = std::mem::take(&mut st.page);
                        let _ = self.out.send(Ok(page)).await;
                    }
                    return Ok(());
                }
                // A temporary failure (a broken connection, a busy slot).
                Err(e) if e.kind().decision() == Decision::Retry => {
                    if (st.file.clone(), st.next) != at || st.txn.is_some() {
                        // It read on: a fresh start for the backoff.
                        backoff = Duration::from_secs(1);
                    }
                    if connected {
                        if (failures.0.as_str(), failures.1) == (at.0.as_str(), at.1) {
                            failures.2 += 1;
                        } else {
                            failures = (at.0.clone(), at.1, 1);
                        }
                        if failures.2 >= FAILURES_AT_ONE_POSITION {
                            return Err(Error::new(
                                ErrorKind::Decode,
                                format!(
                                    "source {:?}: reading the binary log failed {} times in a row \
                                     at {}:{}: {}",
                                    self.source,
                                    failures.2,
                                    at.0,
                                    at.1,
                                    e.report()
                                ),
                            ));
                        }
                    } else if !self.follow {
                        return Err(e);
                    }
                    if st.txn.is_some() {
                        // Read that transaction again from its start; what
                        // was read of it stays in the page.
                        let t = st.txn.take().unwrap_or_else(|| unreachable_txn(&st));
                        let before = st
                            .skip
                            .as_ref()
                            .filter(|(f, p, _)| *f == t.file && *p == t.pos)
                            .map_or(0, |(_, _, n)| *n);
                        st.skip = Some((t.file.clone(), t.pos, t.index.max(before)));
                        st.emitted = Some((t.file.clone(), t.pos));
                        st.file = t.file;
                        st.next = t.pos;
                    }
                    st.shapes.clear();
                    tracing::warn!(source = %self.source, error = %e.report(), retry_in = ?backoff, "the binary log connection broke; reconnecting");
                    update_lag(&self.lag, |l| l.phase = Some("reconnecting".into()));
                    tokio::select! {
                        () = self.stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) async fn connect(&self, st: &Stream) -> Result<BinlogStream> {
        let mut conn = mysql_async::Conn::new(self.opts.clone())
            .await
            .map_err(|e| binlog_error(&self.source, "cannot connect to read the binary log", e))?;
        // GTID events (MariaDB sends BEGIN queries in their place otherwise).
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| binlog_error(&self.source, "cannot prepare the replica session", e))?;
        if let Some(hb) = self.heartbeat.filter(|h| !h.is_zero()) {
            conn.query_drop(format!("SET @master_heartbeat_period = {}", hb.as_nanos()))
                .await
                .map_err(|e| binlog_error(&self.source, "cannot set the heartbeat period", e))?;
        }
        let host = format!("caudal:{}", self.pipeline);
        let mut request = BinlogStreamRequest::new(self.server_id)
            .with_filename(st.file.as_bytes())
            .with_pos(st.next)
            .with_hostname(host.as_bytes());
        if !self.follow {
            request = request.with_non_blocking();
        }
        conn.get_binlog_stream(request).await.map_err(|e| {
            binlog_error(
                &self.source,
                &format!(
                    "cannot start reading the binary log at {}:{}",
                    st.file, st.next
                ),
                e,
            )
        })
    }

    pub(super) async fn stream_once(
        &mut self,
        st: &mut Stream,
        backfills: &mut Backfills,
        connected: &mut bool,
    ) -> Result<Ended> {
        let mut binlog = self.connect(st).await?;
        *connected = true;
        let mut last_event = Instant::now();
        let silence = SILENCE_LIMIT.max(self.heartbeat.unwrap_or_default() * 3);
        let source = self.source.clone();
        let silent = move || {
            Error::new(
                ErrorKind::Connect,
                format!(
                    "source {source:?}: nothing came from the server for {}s",
                    silence.as_secs()
                ),
            )
        };
        let mut poll = tokio::time::interval(BACKFILL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut started = false;
        loop {
            if !st.page.is_empty()
                && (st.page.len() >= STREAM_PAGE || (st.txn.is_none() && self.out.capacity() > 0))
            {
                let page = std::mem::take(&mut st.page);
                if self.out.send(Ok(page)).await.is_err() {
                    return Ok(Ended::Stopped);
                }
            }
            let next = tokio::select! {
                () = self.stop.cancelled() => return Ok(Ended::Stopped),
                _ = poll.tick(), if self.follow => {
                    if last_event.elapsed() >= silence {
                        return Err(silent());
                    }
                    self.idle(st, backfills).await?;
                    continue;
                }
                next = tokio::time::timeout(silence, binlog.next()) => next,
            };
            last_event = Instant::now();
            let event = match next {
                Err(_) => return Err(silent()),
                Ok(None) => return Ok(Ended::Done),
                Ok(Some(Err(e))) => {
                    return Err(binlog_error(
                        &self.source,
                        &format!("reading the binary log at {}:{} failed", st.file, st.next),
                        e,
                    ));
                }
                Ok(Some(Ok(event))) => event,
            };
            if !started {
                started = true;
                tracing::debug!(source = %self.source, position = %format!("{}:{}", st.file, st.next), "reading the binary log");
            }
            self.event(st, &event).await?;
            if st.txn.is_none() {
                self.place_chunk(st, backfills);
                if let Some((file, pos)) = &st.stop_at
                    && catalog::compare((&st.file, st.next), (file, *pos))
                        != std::cmp::Ordering::Less
                {
                    return Ok(Ended::Done);
                }
            }
        }
    }

    /// Handles one event.
    pub(super) async fn event(&mut self, st: &mut Stream, event: &Event) -> Result<()> {
        let header = event.header();
        let ty = header.event_type_raw();
        let end = u64::from(header.log_pos());
        let start = end.saturating_sub(u64::from(header.event_size()));
        if ty == EventType::ROTATE_EVENT as u8 {
            let rotate: RotateEvent<'_> = event.read_event().map_err(|e| self.decode(st, &e))?;
            // The rotate sent first names the file asked for; it comes
            // before the format description, so its name is read with the
            // event's checksum after it.
            // (An artificial event: its header's log position is 0.)
            let name = rotate.name_raw();
            let first = end == 0 && !st.file.is_empty() && name.starts_with(st.file.as_bytes());
            if !first {
                st.file = String::from_utf8_lossy(name).into_owned();
                st.shapes.clear();
            }
            st.next = rotate.position();
            return Ok(());
        }
        if end == 0 {
            // Artificial events (the format description sent first).
            return Ok(());
        }
        if ty == MARIADB_GTID_EVENT {
            let data = event.data();
            if data.len() >= 13 {
                let seq = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
                st.txn = Some(Txn {
                    file: st.file.clone(),
                    pos: start,
                    gtid: Some(format!("{domain}-{}-{seq}", header.server_id())),
                    time: commit_time(header.timestamp()),
                    index: 0,
                    standalone: data[12] & GTID_STANDALONE != 0,
                    captured: false,
                    xa: data[12] & GTID_PREPARED_XA != 0,
                });
                self.lag_at(header.timestamp());
            }
        } else if ty == EventType::QUERY_EVENT as u8 {
            let q: QueryEvent<'_> = event.read_event().map_err(|e| self.decode(st, &e))?;
            let text = q.query();
            let word = text
                .split(|c: char| c.is_whitespace() || c == ';')
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_ascii_uppercase();
            if word == "BEGIN" {
                if st.txn.is_none() {
                    st.txn = Some(Txn {
                        file: st.file.clone(),
                        pos: start,
                        gtid: None,
                        time: commit_time(header.timestamp()),
                        index: 0,
                        standalone: false,
                        captured: false,
                        xa: false,
                    });
                    self.lag_at(header.timestamp());
                }
            } else if word == "COMMIT" {
                st.txn = None;
            } else if word == "ROLLBACK" && !text.to_ascii_uppercase().contains(" TO ") {
                // Non-transactional changes rolled back around: the
                // transaction ends.
                st.txn = None;
            } else if matches!(word.as_str(), "SAVEPOINT" | "ROLLBACK" | "XA") {
                if word == "XA" && st.txn.as_ref().is_some_and(|t| t.captured) {
                    return Err(self.unsupported(st, XA_UNSUPPORTED));
                }
            } else if matches!(
                word.as_str(),
                "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "LOAD"
            ) {
                // A statement-based change (a session with binlog_format =
                // STATEMENT or MIXED): its rows are not in the log.
                if let Some(t) = self.mentioned(&text) {
                    return Err(self.unsupported(
                        st,
                        &format!(
                            "a change to {} was logged as a statement, not as rows (that session \
                             ran with binlog_format = STATEMENT or MIXED), and its rows cannot be \
                             read; `caudal resync` reads the tables again",
                            t.name
                        ),
                    ));
                }
            } else {
                // DDL: shapes come again with the next table maps; facts
                // (JSON, booleans) are read again from the catalog.
                st.shapes.clear();
                st.facts.clear();
                if text.to_ascii_uppercase().contains("TRUNCATE PARTITION")
                    && let Some(t) = self.mentioned(&text)
                {
                    return Err(self.unsupported(
                        st,
                        &format!(
                            "partitions of {} were truncated; the log holds the statement, not \
                             the rows it removed; `caudal resync` reads the tables again",
                            t.name
                        ),
                    ));
                }
                if let Some(table) = truncated(&text, &q.schema())
                    && self.tables.iter().any(|t| t.name == table)
                {
                    let txn = st.txn.clone().unwrap_or_else(|| Txn {
                        file: st.file.clone(),
                        pos: start,
                        gtid: None,
                        time: commit_time(header.timestamp()),
                        index: 0,
                        standalone: true,
                        captured: false,
                        xa: false,
                    });
                    self.truncate(st, txn, &table);
                }
                if st.txn.as_ref().is_some_and(|t| t.standalone) {
                    st.txn = None;
                }
            }
        } else if ty == EventType::TABLE_MAP_EVENT as u8 {
            if let Some(EventData::TableMapEvent(tme)) =
                event.read_data().map_err(|e| self.decode(st, &e))?
            {
                let id = tme.table_id();
                if !st.shapes.contains_key(&id) {
                    let name = format!("{}.{}", tme.database_name(), tme.table_name());
                    let shape = if self.tables.iter().any(|t| t.name == name) {
                        let facts = match st.facts.get(&name) {
                            Some(f) => f.clone(),
                            None => {
                                let f = catalog::facts(&self.pool, &name).await.map_err(|e| {
                                    query_error(&self.source, "cannot read the table's columns", e)
                                })?;
                                st.facts.insert(name.clone(), f.clone());
                                f
                            }
                        };
                        let shape = Shape::of(&tme, facts).map_err(|e| self.decode(st, &e))?;
                        let Some(shape) = shape else {
                            return Err(Error::new(
                                ErrorKind::Decode,
                                format!(
                                    "source {:?}: the table map of {name} at {}:{start} has no column \
                                     names (binlog_row_metadata was not FULL when it was written); \
                                     `caudal resync` reads the tables again from a point after it",
                                    self.source, st.file
                                ),
                            ));
                        };
                        Some(Arc::new(shape))
                    } else {
                        None
                    };
                    st.shapes.insert(id, shape);
                }
            }
        } else if is_rows_event(ty) {
            if let Some(EventData::RowsEvent(rows)) =
                event.read_data().map_err(|e| self.decode(st, &e))?
            {
                self.rows(st, &rows)?;
            }
        } else if ty == EventType::XID_EVENT as u8 || ty == EventType::XA_PREPARE_LOG_EVENT as u8 {
            st.txn = None;
        } else if MARIADB_COMPRESSED.contains(&ty) {
            return Err(self.unsupported(
                st,
                "the binary log holds compressed events (log_bin_compress was ON when they were \
                 written), which caudal cannot read; SET GLOBAL log_bin_compress = OFF and \
                 `caudal resync`",
            ));
        } else if ty == EventType::HEARTBEAT_EVENT as u8 {
            update_lag(&self.lag, |l| l.lag_seconds = Some(0.0));
            return Ok(());
        }
        if st
            .txn
            .as_ref()
            .is_some_and(|t| t.standalone && ty != MARIADB_GTID_EVENT)
        {
            st.txn = None;
        }
        st.next = end;
        if st.txn.is_none() {
            let at = format!("{}:{}", st.file, st.next);
            update_lag(&self.lag, |l| {
                if let Some(b) = super::super::binlog_figures(l) {
                    b.read_position = Some(at);
                }
            });
        }
        Ok(())
    }

    /// A captured table whose name the statement mentions.
    pub(super) fn mentioned(&self, statement: &str) -> Option<&Table> {
        let lower = statement.to_ascii_lowercase();
        self.tables.iter().find(|t| {
            let name = t.name.rsplit('.').next().unwrap_or(&t.name);
            lower.contains(&name.to_ascii_lowercase())
        })
    }

    pub(super) fn unsupported(&self, st: &Stream, what: &str) -> Error {
        Error::new(
            ErrorKind::Decode,
            format!(
                "source {:?}: at {}:{}: {what}",
                self.source, st.file, st.next
            ),
        )
    }

    /// A captured table was truncated (a statement in the log, not rows).
    pub(super) fn truncate(&mut self, st: &mut Stream, mut txn: Txn, table: &str) {
        let index = txn.index;
        txn.index += 1;
        let change = Change {
            op: "truncate",
            table: table.to_string(),
            key: Map::new(),
            before: None,
            after: None,
            unchanged: Vec::new(),
        };
        st.push(&change, &txn, index);
        if st.txn.is_some() {
            st.txn = Some(txn);
        }
    }

    /// At the end of a bounded read: a marker at the end, when the read
    /// moved past everything emitted.
    pub(super) fn end_marker(&mut self, st: &mut Stream) {
        if st.txn.is_some() {
            return;
        }
        let here = (st.file.clone(), st.next);
        if st.emitted.as_ref() != Some(&here) {
            st.page.push(resume_marker(&here.0, here.1));
            st.emitted = Some(here);
        }
    }
}

fn is_rows_event(ty: u8) -> bool {
    use EventType::*;
    [
        WRITE_ROWS_EVENT_V1,
        UPDATE_ROWS_EVENT_V1,
        DELETE_ROWS_EVENT_V1,
        WRITE_ROWS_EVENT,
        UPDATE_ROWS_EVENT,
        DELETE_ROWS_EVENT,
        PARTIAL_UPDATE_ROWS_EVENT,
    ]
    .iter()
    .any(|t| *t as u8 == ty)
}

/// The table a `TRUNCATE [TABLE] name` statement empties, as
/// `schema.table`; identifiers may be quoted with backticks.
fn truncated(query: &str, schema: &str) -> Option<String> {
    let rest = query.trim_start();
    let (word, rest) = rest.split_at(rest.find(char::is_whitespace)?);
    if !word.eq_ignore_ascii_case("truncate") {
        return None;
    }
    let mut rest = rest.trim_start();
    if rest.len() >= 5
        && rest[..5].eq_ignore_ascii_case("table")
        && rest[5..].starts_with(|c: char| c.is_whitespace() || c == '`')
    {
        rest = rest[5..].trim_start();
    }
    let mut parts = Vec::new();
    loop {
        let (part, after) = identifier(rest)?;
        parts.push(part);
        match after.strip_prefix('.') {
            Some(more) => rest = more,
            None => {
                let tail = after.trim();
                if !(tail.is_empty() || tail == ";") {
                    return None;
                }
                break;
            }
        }
    }
    match parts.as_slice() {
        [t] => Some(format!("{schema}.{t}")),
        [s, t] => Some(format!("{s}.{t}")),
        _ => None,
    }
}

/// One identifier at the start of `text` (backtick-quoted, a doubled
/// backtick inside, or bare) and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('`') {
        let mut out = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '`' {
                if chars.peek().is_some_and(|(_, n)| *n == '`') {
                    chars.next();
                    out.push('`');
                } else {
                    return Some((out, &quoted[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = text
            .find(|c: char| c.is_whitespace() || c == '.' || c == ';')
            .unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_string(), &text[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn truncate_statements_name_their_table() {
        assert_eq!(truncated("TRUNCATE TABLE t", "db").as_deref(), Some("db.t"));
        assert_eq!(truncated("truncate `a`.`b`", "db").as_deref(), Some("a.b"));
        assert_eq!(truncated("ALTER TABLE t ADD c INT", "db"), None);
        assert_eq!(
            truncated("TRUNCATE TABLE `order items`", "db").as_deref(),
            Some("db.order items")
        );
        assert_eq!(truncated("truncate `a.b`", "db").as_deref(), Some("db.a.b"));
        assert_eq!(
            truncated("TRUNCATE tablex", "db").as_deref(),
            Some("db.tablex")
        );
        assert_eq!(truncated("TRUNCATE TABLE t PARTITION p0", "db"), None);
    }
}
