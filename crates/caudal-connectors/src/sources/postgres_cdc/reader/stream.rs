//! The streaming phase: changes from the slot, decoded and handed on in
//! pages, the slot confirmed only up to what the pipeline made durable.
//!
//! Promises (see the module above for the position rules):
//! - A change's position is its transaction's commit LSN and its index in
//!   the transaction; changes at or before the durable position are
//!   dropped after a reconnect, so nothing repeats or is skipped.
//! - Status updates go out every second, also while the pipeline applies
//!   backpressure; keepalives and heartbeats move an idle slot on only once
//!   every change read before them is durable.
//! - A broken connection reconnects with backoff; a slot that is gone or
//!   invalidated stops the run with `ErrorKind::Resync`.

use super::*;
use crate::sources::change::{Change, Row};

impl Task {
    pub(super) async fn stream(&mut self) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        let mut stop_at: Option<u64> = None;
        loop {
            let start = self
                .from
                .map_or(self.stream_from, |(lsn, _)| lsn.max(self.stream_from));
            self.streamed = false;
            match self.stream_once(start, &mut stop_at).await {
                Ok(Ended::Done) => return Ok(()),
                // A temporary failure (a broken connection, a busy slot).
                Err(e) if e.kind().decision() == Decision::Retry => {
                    if self.streamed {
                        backoff = Duration::from_secs(1);
                    }
                    self.set_phase("reconnecting");
                    tracing::warn!(source = %self.source, error = %e.report(), retry_in_s = backoff.as_secs(), "replication connection lost; reconnecting from the last change read");
                    tokio::select! {
                        () = self.stop.cancelled() => return Err(cancelled()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                // The server's words suggested the slot is gone: only the
                // catalog may say so, else it is an ordinary failure.
                Err(e) if e.kind() == ErrorKind::Resync => match self.check_slot().await {
                    Ok(()) => {
                        return Err(Error::new(ErrorKind::Query, e.to_string()));
                    }
                    Err(gone) => return Err(gone),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks the slot before streaming from it.
    pub(super) async fn check_slot(&self) -> Result<()> {
        match catalog::slot(&self.pool, &self.source, &self.slot).await? {
            None => Err(Error::new(
                ErrorKind::Resync,
                format!(
                    "source {:?}: replication slot {:?} does not exist any more (dropped outside \
                     caudal?); changes made since it went are lost to it, so caudal stops rather \
                     than skip them. `caudal resync PIPELINE` reads the tables again and streams \
                     from a new slot",
                    self.source, self.slot
                ),
            )),
            Some(s) if s.wal_status.as_deref() == Some("lost") => Err(Error::new(
                ErrorKind::Resync,
                format!(
                    "source {:?}: replication slot {:?} was invalidated by the server (its WAL \
                     was removed, see max_slot_wal_keep_size); changes since its position are \
                     lost. `caudal resync PIPELINE` reads the tables again and streams from a new slot",
                    self.source, self.slot
                ),
            )),
            Some(s) if s.plugin.as_deref() != Some("pgoutput") => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {:?}: replication slot {:?} uses plugin {:?}; caudal needs a pgoutput slot \
                     (choose another `slot` name)",
                    self.source,
                    self.slot,
                    s.plugin.unwrap_or_default()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    pub(super) async fn stream_once(
        &mut self,
        start: u64,
        stop_at: &mut Option<u64>,
    ) -> Result<Ended> {
        self.check_slot().await?;
        let conninfo = self.conninfo.clone();
        let slot = self.slot.clone();
        let publication = self
            .publications
            .iter()
            .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(",");
        let mut conn = tokio::task::spawn_blocking(move || {
            let mut conn = PgReplicationConnection::connect(&conninfo)?;
            conn.start_replication(
                &slot,
                start,
                &[
                    ("proto_version", "1"),
                    ("publication_names", publication.as_str()),
                    ("binary", "true"),
                    ("messages", "true"),
                ],
            )?;
            Ok::<_, pg_walstream::ReplicationError>(conn)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "the connect task failed", e))?
        .map_err(|e| replication_error(&self.source, "cannot start streaming", &e))?;
        self.set_phase("streaming");
        tracing::info!(source = %self.source, slot = %self.slot, from = %format_lsn(start), "streaming changes");

        if !self.follow && stop_at.is_none() {
            let (lsn,): (String,) =
                sqlx::query_as("SELECT pg_logical_emit_message(false, $1, $2)::text")
                    .bind(STOP_PREFIX)
                    .bind(&self.slot)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| {
                        query_error(&self.source, "cannot mark the end of a bounded read", e)
                    })?;
            *stop_at = caudal_core::record::parse_lsn(&lsn);
        }
        let heartbeat = match (self.follow, self.heartbeat) {
            (true, Some(every)) if !every.is_zero() => Some(spawn_heartbeat(
                self.pool.clone(),
                self.source.clone(),
                every,
                self.stop.child_token(),
            )),
            _ => None,
        };
        let _heartbeat = heartbeat.map(DropGuard);

        let mut s = Session {
            parser: LogicalReplicationParser::with_protocol_version(1),
            relations: HashMap::new(),
            types: Types::default(),
            txn: None,
            received: start,
            idle: None,
            confirmed: 0,
        };
        let mut tick = tokio::time::interval(FEEDBACK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let never = CancellationToken::new();
        let mut last_data = std::time::Instant::now();
        loop {
            enum Step {
                Stop,
                Tick,
                Data(pg_walstream::Result<bytes::Bytes>),
            }
            let step = tokio::select! {
                biased;
                () = self.stop.cancelled() => Step::Stop,
                _ = tick.tick() => Step::Tick,
                data = conn.get_copy_data_async(&never) => Step::Data(data),
            };
            match step {
                Step::Stop => {
                    self.feedback(&mut conn, &mut s).await?;
                    return Err(cancelled());
                }
                Step::Tick => {
                    // The server sends keepalives well within this: a silent
                    // connection is a cut one TCP has not noticed yet.
                    if last_data.elapsed() > SILENCE_LIMIT {
                        return Err(Error::new(
                            ErrorKind::Connect,
                            format!(
                                "source {:?}: nothing from the server for {}s",
                                self.source,
                                SILENCE_LIMIT.as_secs()
                            ),
                        ));
                    }
                    self.flush_page(&mut conn, &mut s, &mut tick).await?;
                    self.feedback(&mut conn, &mut s).await?;
                }
                Step::Data(Err(e)) => {
                    return Err(replication_error(&self.source, "streaming failed", &e));
                }
                Step::Data(Ok(data)) => {
                    last_data = std::time::Instant::now();
                    self.streamed = true;
                    match data.first() {
                        Some(b'w') if data.len() >= 25 => {
                            let wal_end = u64::from_be_bytes(slice8(&data[9..17]));
                            s.received = s.received.max(wal_end);
                            let msg = s.parser.parse_wal_message(&data[25..]).map_err(|e| {
                                replication_error(&self.source, "cannot decode a change", &e)
                            })?;
                            if self
                                .handle(&mut conn, &mut s, &mut tick, msg.message, *stop_at)
                                .await?
                            {
                                return self.finish(&mut conn, &mut s).await;
                            }
                        }
                        Some(b'k') => {
                            let k = parse_keepalive_message(&data).map_err(|e| {
                                replication_error(&self.source, "bad keepalive", &e)
                            })?;
                            s.received = s.received.max(k.wal_end);
                            if s.txn.is_none() {
                                s.idle = Some(k.wal_end);
                                if self.page.is_empty() {
                                    self.caught_up(k.wal_end);
                                }
                            }
                            if k.reply_requested {
                                self.feedback(&mut conn, &mut s).await?;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Changes handed on at once while streaming: at most a typical batch,
    /// so a large transaction holds a few pages in memory, not a few
    /// snapshot chunks.
    pub(super) fn stream_page(&self) -> usize {
        self.page_size.min(STREAM_PAGE)
    }

    pub(super) fn caught_up(&self, server: u64) {
        update_lag(&self.lag, |l| {
            l.lag_seconds = Some(0.0);
            if let Some(slot) = crate::sources::postgres_cdc::slot_figures(l) {
                slot.server_lsn = Some(format_lsn(server));
            }
        });
    }

    /// Handles one message; true when a bounded read reached its end.
    pub(super) async fn handle(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        msg: LogicalReplicationMessage,
        stop_at: Option<u64>,
    ) -> Result<bool> {
        match msg {
            LogicalReplicationMessage::Begin {
                final_lsn,
                timestamp,
                xid,
            } => {
                s.txn = Some(Txn {
                    lsn: final_lsn,
                    xid,
                    time: pg_time(timestamp),
                    index: 0,
                });
            }
            LogicalReplicationMessage::Commit { .. } => {
                if let Some(t) = s.txn.take() {
                    update_lag(&self.lag, |l| {
                        l.lag_seconds = commit_age(&t.time);
                        l.last_commit_time = Some(t.time);
                    });
                }
                if self.page.len() >= self.stream_page() {
                    self.flush_page(conn, s, tick).await?;
                } else if !self.page.is_empty()
                    && let Ok(permit) = self.out.try_reserve()
                {
                    // A committed transaction goes on at once when the
                    // pipeline has room (its batching decides how long to
                    // wait); under backpressure pages fill up instead.
                    permit.send(Ok(std::mem::take(&mut self.page)));
                }
            }
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                replica_identity,
            } => {
                tracing::debug!(source = %self.source, relation = %format!("{namespace}.{relation_name}"), "relation described");
                let oids: Vec<u32> = columns.iter().map(|c| c.type_id).collect();
                let types = s.types.resolve(&self.pool, &self.source, &oids).await?;
                let key = catalog::primary_key(&self.pool, &self.source, relation_id)
                    .await?
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>();
                let key = if key.is_empty() && replica_identity == b'i' {
                    // No primary key: the replica identity index's columns
                    // identify rows as well.
                    columns
                        .iter()
                        .filter(|c| c.is_key())
                        .map(|c| c.name.to_string())
                        .collect()
                } else {
                    // A table without a key (also with REPLICA IDENTITY
                    // FULL, whose identity is the whole row) has no key:
                    // its changes are ordered against the whole table.
                    key
                };
                let identity = columns
                    .iter()
                    .filter(|c| c.is_key())
                    .map(|c| c.name.to_string())
                    .collect();
                s.relations.insert(
                    relation_id,
                    Relation {
                        identity,
                        table: format!("{namespace}.{relation_name}"),
                        columns: columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_id))
                            .collect(),
                        types,
                        key,
                    },
                );
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                let rel = self.relation(s, relation_id)?;
                let row = self.encode_tuple(rel, &tuple)?;
                let table = rel.table.clone();
                self.push(
                    s,
                    tick,
                    conn,
                    Change {
                        op: "insert",
                        table,
                        key: row.key,
                        before: None,
                        after: Some(Row::Encoded(row.row)),
                        unchanged: row.unchanged,
                    },
                )
                .await?;
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => {
                let rel = self.relation(s, relation_id)?;
                let before = match &old_tuple {
                    Some(t) => Some(self.old(rel, t, key_type == Some('K'))?),
                    None => None,
                };
                let mut row = self.encode_tuple(rel, &new_tuple)?;
                let mut after = Row::Encoded(row.row);
                // With REPLICA IDENTITY FULL the old row holds the values
                // PostgreSQL left out of the new one: the new row is whole.
                if key_type == Some('O')
                    && !row.unchanged.is_empty()
                    && let Some(old) = &before
                {
                    let (mut values, _) = self.tuple(rel, &new_tuple)?;
                    row.unchanged.retain(|col| match old.get(col) {
                        Some(v) => {
                            values.insert(col.clone(), v.clone());
                            false
                        }
                        None => true,
                    });
                    row.key = key_of(rel, &values);
                    after = Row::Values(values);
                }
                let (key, unchanged) = (row.key, row.unchanged);
                let table = rel.table.clone();
                // A new primary key is a new entity: the change is sent as
                // a delete of the old key and an insert of the new one, so
                // per-key order (and backfills) hold for both keys. (When
                // TOAST values were left unsent the new row is not whole:
                // it stays an update whose `before` has the old key.)
                let old_key = before
                    .as_ref()
                    .filter(|_| key_type.is_some() && unchanged.is_empty())
                    .map(|b| key_of(rel, b))
                    .filter(|old| *old != key);
                if let Some(old_key) = old_key {
                    self.push(
                        s,
                        tick,
                        conn,
                        Change {
                            op: "delete",
                            table: table.clone(),
                            key: old_key,
                            before: before.map(Row::from),
                            after: None,
                            unchanged: Vec::new(),
                        },
                    )
                    .await?;
                    self.push(
                        s,
                        tick,
                        conn,
                        Change {
                            op: "insert",
                            table,
                            key,
                            before: None,
                            after: Some(after),
                            unchanged,
                        },
                    )
                    .await?;
                    return Ok(false);
                }
                self.push(
                    s,
                    tick,
                    conn,
                    Change {
                        op: "update",
                        table,
                        key,
                        before: before.map(Row::from),
                        after: Some(after),
                        unchanged,
                    },
                )
                .await?;
            }
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => {
                let rel = self.relation(s, relation_id)?;
                let before = self.old(rel, &old_tuple, key_type == 'K')?;
                let key = key_of(rel, &before);
                let table = rel.table.clone();
                self.push(
                    s,
                    tick,
                    conn,
                    Change {
                        op: "delete",
                        table,
                        key,
                        before: Some(before.into()),
                        after: None,
                        unchanged: Vec::new(),
                    },
                )
                .await?;
            }
            LogicalReplicationMessage::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    let table = self.relation(s, id)?.table.clone();
                    self.push(
                        s,
                        tick,
                        conn,
                        Change {
                            op: "truncate",
                            table,
                            key: Map::new(),
                            before: None,
                            after: None,
                            unchanged: Vec::new(),
                        },
                    )
                    .await?;
                }
            }
            LogicalReplicationMessage::Message {
                lsn,
                prefix,
                content,
                ..
            } => {
                if s.txn.is_none() {
                    s.idle = Some(lsn);
                }
                if prefix == BACKFILL_PREFIX {
                    self.backfill_requested(&content).await?;
                } else if prefix == WATERMARK_PREFIX {
                    self.watermark(s, tick, conn, &content, lsn).await?;
                }
                if prefix == STOP_PREFIX && stop_at.is_some_and(|stop| lsn >= stop) {
                    return Ok(true);
                }
            }
            _ => {}
        }
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    /// Adds one streamed change to the page, at its place in its
    /// transaction (changes at or before the durable position are dropped).
    pub(super) async fn push(
        &mut self,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        conn: &mut PgReplicationConnection,
        change: Change,
    ) -> Result<()> {
        let Some(txn) = s.txn.as_mut() else {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a change arrived outside a transaction",
                    self.source
                ),
            ));
        };
        let index = txn.index;
        txn.index += 1;
        let position = (txn.lsn, index);
        if self.from.is_some_and(|from| position <= from) {
            return Ok(());
        }
        let data = change.encode(&stamp(txn.lsn, Some(txn.xid), Some(&txn.time), Some(index)));
        let record_key = change.entity();
        if let Some(chunk) = self.backfills.chunk.as_mut()
            && chunk.open
            && self
                .backfills
                .jobs
                .front()
                .is_some_and(|j| j.table.name == change.table)
        {
            if change.key.is_empty() {
                chunk.all_changed = true;
            } else {
                chunk.changed.insert(record_key.clone());
            }
        }
        self.page.push(Record {
            data,
            position: Position::Lsn {
                lsn: position.0,
                index: position.1,
            },
            key: Some(record_key),
        });
        self.from = Some(position);
        if self.page.len() >= self.stream_page() {
            self.flush_page(conn, s, tick).await?;
        }
        Ok(())
    }

    /// Hands the page to the pipeline; while it waits (backpressure), keeps
    /// sending status updates so the server does not time out.
    pub(super) async fn flush_page(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
    ) -> Result<()> {
        if self.page.is_empty() {
            return Ok(());
        }
        let permit = loop {
            tokio::select! {
                () = self.stop.cancelled() => return Err(cancelled()),
                permit = self.out.reserve() => break permit.map_err(|_| cancelled())?,
                _ = tick.tick() => self.feedback(conn, s).await?,
            }
        };
        tracing::debug!(source = %self.source, records = self.page.len(), upto = ?self.from, "page handed over");
        permit.send(Ok(std::mem::take(&mut self.page)));
        Ok(())
    }

    /// The LSN the slot may be confirmed to now.
    pub(super) fn confirmable(&self, s: &Session) -> u64 {
        let durable = self.durable.borrow().clone();
        let durable_at = match &durable {
            Some(Position::Lsn { lsn, index }) => Some((*lsn, *index)),
            _ => None,
        };
        let mut flush = match &durable {
            Some(
                Position::Lsn { lsn, .. }
                | Position::Snapshot { lsn, .. }
                | Position::SnapshotRow { lsn, .. }
                | Position::SnapshotDone { lsn },
            ) => *lsn,
            _ => 0,
        };
        // An idle point may be confirmed once every change read before it
        // is durable: changes read after it commit later.
        if let Some(at) = s.idle
            && self.page.is_empty()
            && durable_at >= self.from
        {
            flush = flush.max(at);
        }
        flush
    }

    pub(super) async fn feedback(
        &self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
    ) -> Result<()> {
        let flush = self.confirmable(s).min(s.received.max(1));
        conn.send_standby_status_update(s.received, flush, flush, false)
            .await
            .map_err(|e| {
                // A status update that cannot be written is a broken
                // connection, whatever the client library calls it.
                Error::new(
                    ErrorKind::Connect,
                    format!("source {:?}: cannot send a status update: {e}", self.source),
                )
            })?;
        s.confirmed = s.confirmed.max(flush);
        let (confirmed, received) = (s.confirmed, s.received);
        update_lag(&self.lag, |l| {
            l.lag_bytes = Some(received.saturating_sub(confirmed));
            if let Some(slot) = crate::sources::postgres_cdc::slot_figures(l) {
                slot.slot.clone_from(&self.slot);
                if confirmed > 0 {
                    slot.confirmed_lsn = Some(format_lsn(confirmed));
                }
                slot.server_lsn = Some(format_lsn(received));
            }
        });
        Ok(())
    }

    /// Ends a bounded read: hands the last page over, waits (briefly) for
    /// it to be durable and confirms it.
    pub(super) async fn finish(
        &mut self,
        conn: &mut PgReplicationConnection,
        s: &mut Session,
    ) -> Result<Ended> {
        if !self.page.is_empty() {
            let page = std::mem::take(&mut self.page);
            self.send(page).await?;
        }
        // Closing the channel ends the run's reading.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.out, closed));
        let want = self.from;
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            let durable = match &*self.durable.borrow() {
                Some(Position::Lsn { lsn, index }) => Some((*lsn, *index)),
                _ => None,
            };
            if durable >= want {
                break;
            }
            // The reader handle is dropped as soon as reading ends, before
            // the last batch is durable: wait for the pipeline instead,
            // until it reports or lets go of the durable handle.
            tokio::select! {
                () = &mut deadline => break,
                changed = self.durable.changed() => if changed.is_err() { break },
            }
        }
        self.feedback(conn, s).await?;
        Ok(Ended::Done)
    }
}
