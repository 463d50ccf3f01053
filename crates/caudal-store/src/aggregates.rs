//! Live aggregates: each aggregate's head and its windows.
//!
//! Promises:
//! - **Counted once.** [`Store::commit_aggregate`] writes the windows a
//!   batch changed and the head (the buffer offset up to which records are
//!   counted, the watermark) in one transaction: after any crash the
//!   windows hold exactly the records below the saved offset.
//! - A window row is keyed by aggregate, start and group; its figures are
//!   what readers see, its state is what counting goes on from.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// Where an aggregate stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateHead {
    pub pipeline: String,
    /// What the windows were computed with (a digest of the definition).
    pub definition: String,
    /// Buffer entries below this offset are counted.
    pub buffer_offset: u64,
    /// The latest event time counted, in microseconds.
    pub watermark: Option<i64>,
    /// Changes not counted because their window had closed.
    pub late: i64,
    /// Rows not counted: no event time, or a group field missing.
    pub skipped: i64,
    /// The CDC snapshot the windows count (its consistent position).
    pub snapshot: Option<String>,
    pub updated_at: Timestamp,
}

/// One window of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRow {
    /// Start and end, microseconds since the epoch.
    pub start: i64,
    pub end: i64,
    /// The group's values, a JSON array.
    pub group: String,
    pub rows: i64,
    pub late: i64,
    pub closed: bool,
    /// The figures, a JSON object.
    pub figures: String,
    /// The accumulators while the window is open (not read by
    /// [`Store::live_windows`]).
    pub state: Option<String>,
    /// The commit that last wrote it (set by the store).
    pub seq: i64,
    pub updated_at: Timestamp,
}

/// What one batch changed.
#[derive(Debug)]
pub struct AggregateCommit<'a> {
    pub name: &'a str,
    pub buffer_offset: u64,
    pub watermark: Option<i64>,
    /// Added to the head's counters.
    pub late: i64,
    pub skipped: i64,
    /// The CDC snapshot counted, when it changed.
    pub snapshot: Option<&'a str>,
    /// Windows written whole (inserted or replaced).
    pub windows: &'a [WindowRow],
    /// Closed windows that received late changes: `(start, group, n)`.
    pub late_windows: &'a [(i64, String, i64)],
}

type HeadRow = (
    String,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    Option<String>,
    i64,
);
type WindowTuple = (
    i64,
    i64,
    String,
    i64,
    i64,
    i64,
    String,
    Option<String>,
    i64,
    i64,
);

fn offset_to_db(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

fn window(row: WindowTuple) -> Result<WindowRow> {
    let (start, end, group, rows, late, closed, figures, state, seq, updated) = row;
    Ok(WindowRow {
        start,
        end,
        group,
        rows,
        late,
        closed: closed != 0,
        figures,
        state,
        seq,
        updated_at: clock::from_db(updated, "aggregate_windows.updated_at")?,
    })
}

impl Store {
    /// The head of aggregate `name`, if it has counted anything.
    pub async fn aggregate_head(&self, name: &str) -> Result<Option<AggregateHead>> {
        let row: Option<HeadRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT pipeline, definition, buffer_offset, watermark, late, skipped, snapshot, updated_at \
                 FROM aggregates WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(pool)
            .await
        })
        .map_err(|e| store_error(format!("reading aggregate {name}"), e))?;
        row.map(
            |(pipeline, definition, offset, watermark, late, skipped, snapshot, updated)| {
                Ok(AggregateHead {
                    pipeline,
                    definition,
                    buffer_offset: u64::try_from(offset).unwrap_or(0),
                    watermark,
                    late,
                    skipped,
                    snapshot,
                    updated_at: clock::from_db(updated, "aggregates.updated_at")?,
                })
            },
        )
        .transpose()
    }

    /// Starts aggregate `name` afresh (no windows) at `buffer_offset` of
    /// `pipeline`, computed with `definition`.
    pub async fn reset_aggregate(
        &self,
        name: &str,
        pipeline: &str,
        definition: &str,
        buffer_offset: u64,
    ) -> Result<()> {
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM aggregate_windows WHERE aggregate = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO aggregates \
                     (name, pipeline, definition, buffer_offset, watermark, late, seq, skipped, updated_at) \
                     VALUES ($1, $2, $3, $4, NULL, 0, 0, 0, (SELECT now_us FROM clock)) \
                     ON CONFLICT (name) DO UPDATE SET pipeline = excluded.pipeline, \
                     definition = excluded.definition, buffer_offset = excluded.buffer_offset, \
                     watermark = NULL, late = 0, skipped = 0, snapshot = NULL, \
                     updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(pipeline)
                .bind(definition)
                .bind(offset_to_db(buffer_offset))
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("resetting aggregate {name}"), e))
    }

    /// Commits one batch's changes to an aggregate, head and windows
    /// together.
    pub async fn commit_aggregate(&self, commit: &AggregateCommit<'_>) -> Result<()> {
        let name = commit.name;
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let seq: i64 = sqlx::query_scalar(
                    "UPDATE aggregates SET seq = seq + 1 WHERE name = $1 RETURNING seq",
                )
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                for w in commit.windows {
                    sqlx::query(
                        "INSERT INTO aggregate_windows (aggregate, window_start, grp, window_end, \
                         rows, late, closed, figures, state, seq, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, (SELECT now_us FROM clock)) \
                         ON CONFLICT (aggregate, window_start, grp) DO UPDATE SET \
                         window_end = excluded.window_end, rows = excluded.rows, \
                         late = excluded.late, closed = excluded.closed, \
                         figures = excluded.figures, state = excluded.state, \
                         seq = excluded.seq, updated_at = excluded.updated_at",
                    )
                    .bind(name)
                    .bind(w.start)
                    .bind(&w.group)
                    .bind(w.end)
                    .bind(w.rows)
                    .bind(w.late)
                    .bind(i64::from(w.closed))
                    .bind(&w.figures)
                    .bind(w.state.as_deref())
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                }
                for (start, group, n) in commit.late_windows {
                    sqlx::query(
                        "UPDATE aggregate_windows SET late = late + $4, seq = $5, \
                         updated_at = (SELECT now_us FROM clock) \
                         WHERE aggregate = $1 AND window_start = $2 AND grp = $3",
                    )
                    .bind(name)
                    .bind(*start)
                    .bind(group)
                    .bind(*n)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "UPDATE aggregates SET buffer_offset = $2, \
                     watermark = COALESCE($3, watermark), late = late + $4, \
                     skipped = skipped + $5, snapshot = COALESCE($6, snapshot), \
                     updated_at = (SELECT now_us FROM clock) \
                     WHERE name = $1",
                )
                .bind(name)
                .bind(offset_to_db(commit.buffer_offset))
                .bind(commit.watermark)
                .bind(commit.late)
                .bind(commit.skipped)
                .bind(commit.snapshot)
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("committing aggregate {name}"), e))
    }

    /// The open windows of aggregate `name`, with their state (to go on
    /// counting after a restart).
    pub async fn open_windows(&self, name: &str) -> Result<Vec<WindowRow>> {
        let rows: Vec<WindowTuple> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT window_start, window_end, grp, rows, late, closed, figures, state, seq, updated_at \
                 FROM aggregate_windows WHERE aggregate = $1 AND closed = 0 \
                 ORDER BY window_start, grp",
            )
            .bind(name)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error(format!("reading the open windows of {name}"), e))?;
        rows.into_iter().map(window).collect()
    }

    /// The windows of aggregate `name` that end after `from` and start
    /// before `to` (microseconds), oldest first, without their state.
    pub async fn live_windows(&self, name: &str, from: i64, to: i64) -> Result<Vec<WindowRow>> {
        let rows: Vec<WindowTuple> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT window_start, window_end, grp, rows, late, closed, figures, NULL, seq, updated_at \
                 FROM aggregate_windows WHERE aggregate = $1 AND window_end > $2 AND window_start < $3 \
                 ORDER BY window_start, grp",
            )
            .bind(name)
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error(format!("reading the windows of {name}"), e))?;
        rows.into_iter().map(window).collect()
    }

    /// Closed windows of `name` written after `after` (a window's `(seq,
    /// start, group)`), in that order, at most `limit`: each window once
    /// when it closes, and again when a late change is counted on it.
    pub async fn closed_windows_after(
        &self,
        name: &str,
        after: Option<(i64, i64, &str)>,
        limit: i64,
    ) -> Result<Vec<WindowRow>> {
        let (seq, start, group) = after.unwrap_or((i64::MIN, i64::MIN, ""));
        let rows: Vec<WindowTuple> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT window_start, window_end, grp, rows, late, closed, figures, NULL, seq, updated_at \
                 FROM aggregate_windows WHERE aggregate = $1 AND closed = 1 \
                 AND (seq > $2 OR (seq = $2 AND (window_start > $3 OR (window_start = $3 AND grp > $4)))) \
                 ORDER BY seq, window_start, grp LIMIT $5",
            )
            .bind(name)
            .bind(seq)
            .bind(start)
            .bind(group)
            .bind(limit)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error(format!("reading the closed windows of {name}"), e))?;
        rows.into_iter().map(window).collect()
    }

    /// Deletes the closed windows of `name` that ended before `before`
    /// (microseconds); returns how many.
    pub async fn expire_windows(&self, name: &str, before: i64) -> Result<u64> {
        with_pool!(self, |pool| {
            sqlx::query(
                "DELETE FROM aggregate_windows WHERE aggregate = $1 AND closed = 1 AND window_end < $2",
            )
            .bind(name)
            .bind(before)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })
        .map_err(|e| store_error(format!("expiring the windows of {name}"), e))
    }
}
