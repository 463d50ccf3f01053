//! On-demand backfills while streaming: a table read again in key chunks,
//! each between two watermarks written to the log, its rows placed in the
//! stream at the high watermark minus those changed inside the window (the
//! stream has a newer state of them). A failed chunk ends its backfill,
//! never the stream.

use super::*;

/// A backfill in progress.
pub(super) struct Job {
    pub(super) id: String,
    pub(super) table: Table,
    pub(super) filter: Option<String>,
    pub(super) after: Option<Vec<CursorValue>>,
    pub(super) rows: u64,
}

/// One chunk of a backfill, read between two watermarks in the log. Rows
/// whose key changed between them are dropped (the stream has a newer
/// state); the others are sent at the high watermark.
pub(super) struct Chunk {
    pub(super) seq: u64,
    pub(super) low: u64,
    pub(super) high: u64,
    pub(super) open: bool,
    pub(super) all_changed: bool,
    pub(super) changed: std::collections::HashSet<String>,
    /// Entity key, key columns and row of each row read.
    pub(super) rows: Vec<ChunkRow>,
    pub(super) last_key: Option<Vec<CursorValue>>,
    pub(super) full: bool,
}

pub(super) type ChunkRow = (String, Map<String, Value>, Map<String, Value>);

/// The backfills of a reader: queued jobs and the chunk in flight.
#[derive(Default)]
pub struct Backfills {
    pub(super) jobs: std::collections::VecDeque<Job>,
    pub(super) chunk: Option<Chunk>,
    pub(super) seq: u64,
}

impl Task {
    pub(super) fn backfill_progress(&self, update: impl FnOnce(&mut BackfillProgress)) {
        update_lag(&self.lag, |l| {
            if let Some(p) = l.backfill.as_mut() {
                update(p);
            }
        });
    }

    /// A backfill request seen in the log: `{"slot": …, "id": …}`. Only a
    /// streaming daemon takes them, and only with a request of that id in
    /// caudal's state.
    pub(super) async fn backfill_requested(&mut self, content: &[u8]) -> Result<()> {
        let (Some(requests), true) = (self.requests.clone(), self.follow) else {
            return Ok(());
        };
        let Ok(msg) = serde_json::from_slice::<Value>(content) else {
            return Ok(());
        };
        if msg["slot"] != self.slot.as_str() {
            return Ok(());
        }
        let Some(id) = msg["id"].as_str().map(str::to_string) else {
            return Ok(());
        };
        let Some(request) = requests.get(&id).await else {
            tracing::warn!(source = %self.source, id, "a backfill was requested in the log but caudal has no such request; ignored");
            return Ok(());
        };
        update_lag(&self.lag, |l| {
            l.backfill = Some(BackfillProgress {
                id: id.clone(),
                table: request.table.clone(),
                ..BackfillProgress::default()
            });
        });
        match catalog::table(&self.pool, &self.source, &request.table).await {
            Ok(table) => {
                tracing::info!(source = %self.source, table = %table.name, filter = ?request.filter, "backfill started");
                self.backfills.jobs.push_back(Job {
                    id,
                    table,
                    filter: request.filter,
                    after: None,
                    rows: 0,
                });
                if self.backfills.chunk.is_none() {
                    self.next_chunk().await;
                }
            }
            Err(e) => self.backfill_progress(|p| {
                p.error = Some(e.report());
                p.done = true;
            }),
        }
        Ok(())
    }

    /// Reads the next chunk of the first job between two watermarks. A
    /// query error ends that job (reported), never the stream.
    pub(super) async fn next_chunk(&mut self) {
        while let Some(job) = self.backfills.jobs.front() {
            self.backfills.seq += 1;
            let seq = self.backfills.seq;
            match self.read_chunk(job, seq).await {
                Ok(chunk) => {
                    self.backfills.chunk = Some(chunk);
                    return;
                }
                Err(e) => {
                    tracing::error!(source = %self.source, error = %e.report(), "backfill failed");
                    self.backfill_progress(|p| {
                        p.error = Some(e.report());
                        p.done = true;
                    });
                    self.backfills.jobs.pop_front();
                }
            }
        }
    }

    pub(super) async fn read_chunk(&self, job: &Job, seq: u64) -> Result<Chunk> {
        let emit = |mark: &'static str| {
            let pool = self.pool.clone();
            let content = format!("{}:{seq}:{mark}", job.id);
            async move {
                sqlx::query_as::<_, (String,)>(
                    "SELECT pg_logical_emit_message(false, $1, $2)::text",
                )
                .bind(WATERMARK_PREFIX)
                .bind(content)
                .fetch_one(&pool)
                .await
            }
        };
        let source = &self.source;
        let low = emit("low")
            .await
            .map_err(|e| query_error(source, "cannot write a backfill watermark", e))?;
        let (rows, full) = chunk::read(
            &self.pool,
            source,
            &job.table,
            job.filter.as_deref(),
            job.after.as_deref(),
            self.page_size,
            self.decimals,
        )
        .await?;
        let last_key = rows.last().map(|r| r.values.clone());
        let out: Vec<ChunkRow> = rows
            .into_iter()
            .map(|r| (r.entity, r.key, r.data))
            .collect();
        let high = emit("high")
            .await
            .map_err(|e| query_error(source, "cannot write a backfill watermark", e))?;
        let lsn = |t: &(String,)| caudal_core::record::parse_lsn(&t.0).unwrap_or(0);
        Ok(Chunk {
            seq,
            low: lsn(&low),
            high: lsn(&high),
            open: false,
            all_changed: false,
            changed: std::collections::HashSet::new(),
            rows: out,
            last_key,
            full,
        })
    }

    /// A watermark in the log: the low one opens the chunk's window, the
    /// high one closes it and sends the rows not changed inside it.
    pub(super) async fn watermark(
        &mut self,
        s: &mut Session,
        tick: &mut tokio::time::Interval,
        conn: &mut PgReplicationConnection,
        content: &[u8],
        lsn: u64,
    ) -> Result<()> {
        let text = String::from_utf8_lossy(content).into_owned();
        let Some((job_id, table)) = self
            .backfills
            .jobs
            .front()
            .map(|j| (j.id.clone(), j.table.name.clone()))
        else {
            return Ok(());
        };
        let Some(chunk) = self.backfills.chunk.as_mut() else {
            return Ok(());
        };
        if text == format!("{job_id}:{}:low", chunk.seq) && lsn == chunk.low {
            chunk.open = true;
            return Ok(());
        }
        if text != format!("{job_id}:{}:high", chunk.seq) || lsn != chunk.high {
            return Ok(());
        }
        let Some(chunk) = self.backfills.chunk.take() else {
            return Ok(());
        };
        let mut sent = 0;
        // A message's LSN is the end of its record, where the next record
        // (a commit, say) may start: the rows go just before it, so they
        // never share a position with a transaction.
        let at = lsn - 1;
        for (i, (record_key, key, data)) in chunk.rows.into_iter().enumerate() {
            if chunk.all_changed || chunk.changed.contains(&record_key) {
                continue;
            }
            let position = (at, i as u64);
            if self.from.is_some_and(|from| position <= from) {
                continue;
            }
            let change = crate::sources::change::Change {
                op: "read",
                table: table.clone(),
                key,
                before: None,
                after: Some(data.into()),
                unchanged: Vec::new(),
            };
            self.page.push(Record {
                data: change.encode(&stamp(at, None, None, None)),
                position: Position::Lsn {
                    lsn: position.0,
                    index: position.1,
                },
                key: Some(record_key),
            });
            self.from = Some(position);
            sent += 1;
        }
        if self.page.len() >= self.stream_page() {
            self.flush_page(conn, s, tick).await?;
        }
        let done = !chunk.full;
        if let Some(job) = self.backfills.jobs.front_mut() {
            job.rows += sent;
            job.after = chunk.last_key;
            let rows = job.rows;
            self.backfill_progress(|p| {
                p.rows = rows;
                p.done = done;
            });
        }
        if done && let Some(job) = self.backfills.jobs.pop_front() {
            tracing::info!(source = %self.source, table = %job.table.name, rows = job.rows, "backfill done");
        }
        self.next_chunk().await;
        Ok(())
    }
}
