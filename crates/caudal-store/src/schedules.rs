//! Schedule state: when each pipeline is due next, as computed by the
//! scheduler and shown by `caudal status`. The store only keeps the value;
//! it never decides when anything runs.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

impl Store {
    /// Records when `pipeline` runs next; `None` means it is not scheduled
    /// (paused, or continuous).
    pub async fn set_next_run(&self, pipeline: &str, next: Option<Timestamp>) -> Result<()> {
        const SQL: &str = "INSERT INTO schedules (pipeline, next_run_at, updated_at) \
             VALUES ($1, $2, (SELECT now_us FROM clock)) \
             ON CONFLICT (pipeline) DO UPDATE \
             SET next_run_at = excluded.next_run_at, updated_at = excluded.updated_at";
        let next = next.map(clock::to_db);
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .bind(next)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| store_error(format!("saving the next run of pipeline `{pipeline}`"), e))
    }

    /// When `pipeline` runs next, if known.
    pub async fn next_run(&self, pipeline: &str) -> Result<Option<Timestamp>> {
        const SQL: &str = "SELECT next_run_at FROM schedules WHERE pipeline = $1";
        let next: Option<Option<i64>> = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(pipeline)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading the next run of pipeline `{pipeline}`"), e))?;
        next.flatten()
            .map(|at| clock::from_db(at, "schedules.next_run_at"))
            .transpose()
    }
}
