//! On-demand backfills: chunks read in their own consistent snapshots
//! and placed in the stream at their positions.

use super::*;

pub(super) struct Chunk {
    file: String,
    pos: u64,
    rows: Vec<chunk::Row>,
    full: bool,
}

/// A backfill in progress.
pub(super) struct Job {
    id: String,
    request: BackfillRequest,
    table: Table,
    after: Option<Vec<CursorValue>>,
    rows: u64,
}

#[derive(Default)]
pub(super) struct Backfills {
    seen: HashSet<String>,
    jobs: VecDeque<Job>,
    chunk: Option<Chunk>,
    polled: Option<Instant>,
}

impl Task {
    /// Every poll tick: backfill requests, chunks, the idle marker.
    pub(super) async fn idle(&mut self, st: &mut Stream, backfills: &mut Backfills) -> Result<()> {
        if st.txn.is_some() {
            return Ok(());
        }
        self.place_chunk(st, backfills);
        if let Some(requests) = &self.requests
            && backfills
                .polled
                .is_none_or(|p| p.elapsed() >= BACKFILL_POLL)
        {
            backfills.polled = Some(Instant::now());
            for (id, request) in requests.pending().await {
                if backfills.seen.insert(id.clone()) {
                    self.start_backfill(id, request, backfills).await;
                }
            }
        }
        if backfills.chunk.is_none()
            && let Some(job) = backfills.jobs.front_mut()
        {
            let read = chunk_snapshot(
                &self.pool,
                &self.source,
                &job.table,
                job.request.filter.as_deref(),
                job.after.as_deref(),
                self.page_size,
                self.decimals,
            )
            .await;
            match read {
                // The server lets a replica read a transaction just before
                // it is visible to a snapshot: a chunk older than what the
                // stream read may lack it. Read it again at the next tick.
                Ok(c)
                    if catalog::compare((&c.file, c.pos), (&st.file, st.next))
                        == std::cmp::Ordering::Less =>
                {
                    tracing::debug!(source = %self.source, "a backfill chunk's snapshot is behind the stream; reading it again");
                }
                Ok(c) => backfills.chunk = Some(c),
                Err(e) => {
                    let job = backfills.jobs.pop_front();
                    if let Some(job) = job {
                        tracing::warn!(source = %self.source, table = %job.table.name, error = %e.report(), "backfill failed");
                        self.progress(&job, true, Some(e.report()));
                    }
                }
            }
            self.place_chunk(st, backfills);
        }
        // Idle: move the checkpoint past what was read of other tables.
        let beat = self.heartbeat.unwrap_or(Duration::from_secs(10));
        if st.page.is_empty()
            && backfills.chunk.is_none()
            && !beat.is_zero()
            && st.last_mark.elapsed() >= beat
        {
            let here = (st.file.clone(), st.next);
            if st.emitted.as_ref() != Some(&here) && !st.file.is_empty() {
                st.page.push(resume_marker(&here.0, here.1));
                st.emitted = Some(here);
            }
            st.last_mark = Instant::now();
        }
        Ok(())
    }

    pub(super) async fn start_backfill(
        &mut self,
        id: String,
        request: BackfillRequest,
        backfills: &mut Backfills,
    ) {
        let Some(table) = self
            .tables
            .iter()
            .find(|t| t.name == request.table || t.name.ends_with(&format!(".{}", request.table)))
            .cloned()
        else {
            let job = Job {
                id,
                table: Table {
                    name: request.table.clone(),
                    quoted: String::new(),
                    key: Vec::new(),
                    unique_index: None,
                },
                request,
                after: None,
                rows: 0,
            };
            self.progress(
                &job,
                true,
                Some(format!(
                    "table {} is not captured by this pipeline",
                    job.table.name
                )),
            );
            return;
        };
        tracing::info!(source = %self.source, table = %table.name, id = %id, "backfill requested");
        let job = Job {
            id,
            request,
            table,
            after: None,
            rows: 0,
        };
        self.progress(&job, false, None);
        backfills.jobs.push_back(job);
    }

    /// Puts a read chunk in the stream once the stream reached the chunk's
    /// snapshot position.
    pub(super) fn progress(&self, job: &Job, done: bool, error: Option<String>) {
        let p = BackfillProgress {
            id: job.id.clone(),
            table: job.table.name.clone(),
            rows: job.rows,
            done,
            error,
        };
        update_lag(&self.lag, |l| l.backfill = Some(p));
    }

    pub(super) fn place_chunk(&mut self, st: &mut Stream, backfills: &mut Backfills) {
        if st.txn.is_some() || st.file.is_empty() {
            return;
        }
        let Some(c) = &backfills.chunk else {
            return;
        };
        if catalog::compare((&st.file, st.next), (&c.file, c.pos)) == std::cmp::Ordering::Less {
            return;
        }
        let Some(c) = backfills.chunk.take() else {
            return;
        };
        let Some(job) = backfills.jobs.front_mut() else {
            return;
        };
        let n = c.rows.len() as u64;
        for row in c.rows {
            job.after = Some(row.values.clone());
            let position = Position::BinlogBackfill {
                file: c.file.clone(),
                pos: c.pos,
                table: job.table.name.clone(),
                key: row.values.clone(),
            };
            st.page
                .push(read_record(&job.table, row, position, &c.file, c.pos));
        }
        if n > 0 {
            st.emitted = Some((c.file.clone(), c.pos));
        }
        job.rows += n;
        let done = !c.full;
        let snapshot = Job {
            id: job.id.clone(),
            request: job.request.clone(),
            table: job.table.clone(),
            after: None,
            rows: job.rows,
        };
        if done {
            backfills.jobs.pop_front();
            tracing::info!(source = %self.source, table = %snapshot.table.name, rows = snapshot.rows, "backfill done");
        }
        self.progress(&snapshot, done, None);
    }
}

/// Reads one backfill chunk in its own consistent snapshot.
async fn chunk_snapshot(
    pool: &MySqlPool,
    source: &str,
    table: &Table,
    filter: Option<&str>,
    after: Option<&[CursorValue]>,
    limit: usize,
    decimals: DecimalFormat,
) -> Result<Chunk> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| query_error(source, "cannot open a backfill connection", e))?;
    let (file, pos) = consistent_snapshot(&mut conn, source).await?;
    let read = chunk::read(&mut conn, source, table, filter, after, limit, decimals).await;
    let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
    let (rows, full) = read?;
    Ok(Chunk {
        file,
        pos,
        rows,
        full,
    })
}
