//! Bounded history: deleting runs, resolved dead letters and audit entries
//! once they are older (or, for runs, more numerous) than the operator asked
//! to keep, so a store stays small however long caudal runs.
//!
//! What pruning promises:
//!
//! - **Nothing unresolved is lost.** A `running` run is never deleted, nor
//!   the newest run of a pipeline (status shows it), nor a `pending` dead
//!   letter: only letters replayed or discarded longer ago than the age go.
//! - **Cheap and short.** Every delete walks an index, and a big backlog
//!   (a lower limit, or a store upgraded after years) goes in batches of
//!   [`PRUNE_BATCH`] rows, each its own statement, so other writers get the
//!   store between batches instead of waiting for one long delete.
//! - **Safe to repeat and to race.** Pruning twice, or from two processes
//!   sharing a PostgreSQL store, deletes each row once and nothing more.
//!
//! Ages are measured on the database's clock, like every other time in the
//! store.

use std::time::Duration;

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// Most rows one delete statement removes; a larger backlog takes several.
pub const PRUNE_BATCH: u32 = 1000;

/// Runs `$query` (a query builder expression, re-evaluated per batch, whose
/// last placeholder is the batch size) against `$pool` until a batch
/// deletes fewer than [`PRUNE_BATCH`] rows; evaluates to the rows deleted.
macro_rules! delete_in_batches {
    ($pool:expr, $query:expr) => {
        async {
            let mut total: u64 = 0;
            loop {
                let deleted = $query
                    .bind(i64::from(PRUNE_BATCH))
                    .execute($pool)
                    .await?
                    .rows_affected();
                total += deleted;
                if deleted < u64::from(PRUNE_BATCH) {
                    break Ok::<u64, sqlx::Error>(total);
                }
                // Let other tasks at the store between two batches.
                tokio::task::yield_now().await;
            }
        }
        .await
    };
}

impl Store {
    /// Deletes the finished runs of `pipeline` beyond its newest `max_count`
    /// runs, and those that ended longer than `max_age` ago; returns how
    /// many went. `running` runs are never deleted and the newest run is
    /// always kept (a `max_count` of 0 counts as 1).
    pub async fn prune_runs(
        &self,
        pipeline: &str,
        max_age: Duration,
        max_count: u32,
    ) -> Result<u64> {
        // The id of the newest run past the ones to keep: it and every
        // older run go. OFFSET walks at most `max_count` index entries.
        const COUNT_LIMIT: &str =
            "SELECT id FROM runs WHERE pipeline = $1 ORDER BY id DESC LIMIT 1 OFFSET $2";
        const DELETE_BEYOND_COUNT: &str = "DELETE FROM runs WHERE id IN (\
             SELECT id FROM runs WHERE pipeline = $1 AND id <= $2 AND outcome <> 'running' \
             ORDER BY id LIMIT $3)";
        const DELETE_OLD: &str = "DELETE FROM runs WHERE id IN (\
             SELECT id FROM runs WHERE pipeline = $1 AND outcome <> 'running' \
             AND ended_at < (SELECT now_us FROM clock) - $2 \
             AND id < (SELECT MAX(id) FROM runs WHERE pipeline = $1) \
             ORDER BY id LIMIT $3)";
        let keep = i64::from(max_count.max(1));
        let age = clock::duration_to_db(max_age);
        with_pool!(self, |pool| {
            async {
                let limit: Option<i64> = sqlx::query_scalar(COUNT_LIMIT)
                    .bind(pipeline)
                    .bind(keep)
                    .fetch_optional(pool)
                    .await?;
                let mut deleted = 0;
                if let Some(limit) = limit {
                    deleted += delete_in_batches!(
                        pool,
                        sqlx::query(DELETE_BEYOND_COUNT).bind(pipeline).bind(limit)
                    )?;
                }
                // After the count, at most `max_count` runs are left to scan.
                deleted +=
                    delete_in_batches!(pool, sqlx::query(DELETE_OLD).bind(pipeline).bind(age))?;
                Ok::<u64, sqlx::Error>(deleted)
            }
            .await
        })
        .map_err(|e| store_error(format!("pruning the runs of pipeline `{pipeline}`"), e))
    }

    /// The pipelines that have runs in the store, by name: also pipelines
    /// no longer configured, whose history still ages out.
    pub async fn run_pipelines(&self) -> Result<Vec<String>> {
        const SQL: &str = "SELECT DISTINCT pipeline FROM runs ORDER BY pipeline";
        with_pool!(self, |pool| sqlx::query_scalar(SQL).fetch_all(pool).await)
            .map_err(|e| store_error("listing the pipelines with runs".into(), e))
    }

    /// Deletes run `run_id` if it is an idle poll: finished as `succeeded`
    /// having read and delivered nothing. Its end time becomes the
    /// pipeline's last idle poll ([`last_idle_poll`](Self::last_idle_poll)),
    /// in the same transaction. Returns whether the run was deleted; any
    /// other run (running, failed, with rows) is left as it is.
    pub async fn forget_idle_run(&self, run_id: i64) -> Result<bool> {
        const DELETE: &str = "DELETE FROM runs WHERE id = $1 AND outcome = 'succeeded' \
             AND rows_read = 0 AND rows_delivered = 0 RETURNING pipeline, ended_at";
        const REMEMBER: &str = "INSERT INTO schedules (pipeline, next_run_at, updated_at, last_idle_poll_at) \
             VALUES ($1, NULL, (SELECT now_us FROM clock), $2) \
             ON CONFLICT (pipeline) DO UPDATE SET last_idle_poll_at = excluded.last_idle_poll_at";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let deleted: Option<(String, Option<i64>)> = sqlx::query_as(DELETE)
                    .bind(run_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((pipeline, ended_at)) = deleted else {
                    // Dropping the transaction rolls it back.
                    return Ok(false);
                };
                sqlx::query(REMEMBER)
                    .bind(pipeline)
                    .bind(ended_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<bool, sqlx::Error>(true)
            }
            .await
        })
        .map_err(|e| store_error(format!("forgetting idle run {run_id}"), e))
    }

    /// When the last idle poll of `pipeline` ended (see
    /// [`forget_idle_run`](Self::forget_idle_run)), if there was one.
    pub async fn last_idle_poll(&self, pipeline: &str) -> Result<Option<Timestamp>> {
        const SQL: &str = "SELECT last_idle_poll_at FROM schedules WHERE pipeline = $1";
        let at: Option<Option<i64>> = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(pipeline)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| {
            store_error(
                format!("reading the last idle poll of pipeline `{pipeline}`"),
                e,
            )
        })?;
        at.flatten()
            .map(|at| clock::from_db(at, "schedules.last_idle_poll_at"))
            .transpose()
    }

    /// Deletes dead letters replayed or discarded longer than `max_age` ago;
    /// returns how many went. Pending letters are never deleted.
    pub async fn prune_dead_letters(&self, max_age: Duration) -> Result<u64> {
        const SQL: &str = "DELETE FROM dead_letters WHERE id IN (\
             SELECT id FROM dead_letters WHERE resolved_at IS NOT NULL \
             AND resolved_at < (SELECT now_us FROM clock) - $1 AND state <> 'pending' \
             ORDER BY resolved_at LIMIT $2)";
        let age = clock::duration_to_db(max_age);
        with_pool!(self, |pool| delete_in_batches!(
            pool,
            sqlx::query(SQL).bind(age)
        ))
        .map_err(|e| store_error("pruning resolved dead letters".into(), e))
    }

    /// Deletes audit entries written longer than `max_age` ago; returns how
    /// many went.
    pub async fn prune_audit(&self, max_age: Duration) -> Result<u64> {
        const SQL: &str = "DELETE FROM audit_log WHERE id IN (\
             SELECT id FROM audit_log WHERE at < (SELECT now_us FROM clock) - $1 \
             ORDER BY at LIMIT $2)";
        let age = clock::duration_to_db(max_age);
        with_pool!(self, |pool| delete_in_batches!(
            pool,
            sqlx::query(SQL).bind(age)
        ))
        .map_err(|e| store_error("pruning the audit log".into(), e))
    }
}
