//! Runs: one record per execution of a pipeline, from `running` to one final
//! outcome. A run leaves `running` exactly once: through
//! [`Store::finish_run`], or through [`Store::abandon_running`] when the
//! process that ran it is gone. While it is `running` its counters (and, with
//! [`Store::commit_progress`], its pipeline's checkpoint) may move; afterwards
//! it is history and every write to it is refused.

use std::fmt;
use std::str::FromStr;

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;
use sqlx::types::Json;

use crate::{Store, clock, store_error};

/// The state of a run. `Running` is the only state that is not final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunOutcome {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The process running it stopped without finishing it (crash, kill,
    /// lost lease); marked so by [`Store::abandon_running`].
    Abandoned,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 5] = [
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Abandoned,
    ];

    /// The lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Abandoned => "abandoned",
        }
    }

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        self != Self::Running
    }
}

impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunOutcome {
    type Err = Error;

    /// Parses the lowercase name; anything else is a [`ErrorKind::Decode`]
    /// error listing the accepted names.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|o| o.as_str()).collect();
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "unknown run outcome `{s}`; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// One execution of a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub id: i64,
    pub pipeline: String,
    /// What started it: `"schedule"`, `"manual"`, ...
    pub trigger: String,
    pub started_at: Timestamp,
    /// Set once the run is final.
    pub ended_at: Option<Timestamp>,
    pub rows_read: u64,
    pub rows_delivered: u64,
    pub outcome: RunOutcome,
    pub error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: i64,
    pipeline: String,
    triggered_by: String,
    started_at: i64,
    ended_at: Option<i64>,
    rows_read: i64,
    rows_delivered: i64,
    outcome: String,
    error: Option<String>,
}

impl TryFrom<RunRow> for RunRecord {
    type Error = Error;

    fn try_from(row: RunRow) -> Result<Self> {
        let outcome = row.outcome.parse().map_err(|e| {
            Error::with_source(
                ErrorKind::Store,
                format!("state store: run {} is unreadable", row.id),
                e,
            )
        })?;
        Ok(RunRecord {
            id: row.id,
            pipeline: row.pipeline,
            trigger: row.triggered_by,
            started_at: clock::from_db(row.started_at, "runs.started_at")?,
            ended_at: row
                .ended_at
                .map(|at| clock::from_db(at, "runs.ended_at"))
                .transpose()?,
            rows_read: counter_from_db(row.rows_read, "runs.rows_read")?,
            rows_delivered: counter_from_db(row.rows_delivered, "runs.rows_delivered")?,
            outcome,
            error: row.error,
        })
    }
}

/// `SELECT <every run column> FROM runs <rest>`, as one static string.
macro_rules! select_runs {
    ($rest:literal) => {
        concat!(
            "SELECT id, pipeline, triggered_by, started_at, ended_at, ",
            "rows_read, rows_delivered, outcome, error FROM runs ",
            $rest
        )
    };
}

/// The error text recorded on runs marked abandoned.
const ABANDONED_ERROR: &str = "the process running it stopped before finishing it";

impl Store {
    /// Records the start of a run of `pipeline` and returns its id. `trigger`
    /// says what started it (`"schedule"`, `"manual"`, ...).
    pub async fn start_run(&self, pipeline: &str, trigger: &str) -> Result<i64> {
        const SQL: &str = "INSERT INTO runs (pipeline, triggered_by, started_at, outcome) \
             VALUES ($1, $2, (SELECT now_us FROM clock), 'running') RETURNING id";
        with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(pipeline)
                .bind(trigger)
                .fetch_one(pool)
                .await
        })
        .map_err(|e| store_error(format!("starting a run of pipeline `{pipeline}`"), e))
    }

    /// Commits a delivered (or durably buffered) batch: in one transaction,
    /// saves `position` as the checkpoint of `pipeline` and sets the counters
    /// of run `run_id`. Either both are visible or neither is.
    ///
    /// Fails, saving nothing, unless `run_id` is a `running` run of
    /// `pipeline`: a run that was finished or abandoned (possibly while
    /// another process took over the pipeline) must not move its checkpoint.
    ///
    /// Here and in [`update_run_counts`](Self::update_run_counts) and
    /// [`finish_run`](Self::finish_run), `rows_delivered` of `None` leaves
    /// that counter as it is: with a buffer, delivery adds to it
    /// ([`add_run_delivered`](Self::add_run_delivered)) while intake only
    /// sets `rows_read`.
    pub async fn commit_progress(
        &self,
        run_id: i64,
        pipeline: &str,
        position: &serde_json::Value,
        rows_read: u64,
        rows_delivered: impl Into<Option<u64>>,
    ) -> Result<()> {
        const UPDATE_RUN: &str = "UPDATE runs SET rows_read = $3, \
             rows_delivered = COALESCE($4, rows_delivered) \
             WHERE id = $1 AND pipeline = $2 AND outcome = 'running'";
        const SAVE_CHECKPOINT: &str = "INSERT INTO checkpoints (pipeline, position, updated_at) \
             VALUES ($1, $2, (SELECT now_us FROM clock)) \
             ON CONFLICT (pipeline) DO UPDATE \
             SET position = excluded.position, updated_at = excluded.updated_at";
        let read = counter_to_db(rows_read, "rows_read")?;
        let delivered = rows_delivered
            .into()
            .map(|n| counter_to_db(n, "rows_delivered"))
            .transpose()?;
        let committed = with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let updated = sqlx::query(UPDATE_RUN)
                    .bind(run_id)
                    .bind(pipeline)
                    .bind(read)
                    .bind(delivered)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated == 0 {
                    // Dropping the transaction rolls it back.
                    return Ok(false);
                }
                sqlx::query(SAVE_CHECKPOINT)
                    .bind(pipeline)
                    .bind(Json(position))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            }
            .await
        })
        .map_err(|e| {
            store_error(
                format!("committing progress of run {run_id} (pipeline `{pipeline}`)"),
                e,
            )
        })?;
        if committed {
            Ok(())
        } else {
            Err(not_running(run_id, Some(pipeline)))
        }
    }

    /// Adds `delivered` to the delivered-rows counter of run `run_id`, in
    /// whatever state the run is: with a buffer, a run ends once its rows
    /// are durable and delivery reports them as they reach the sink.
    pub async fn add_run_delivered(&self, run_id: i64, delivered: u64) -> Result<()> {
        const SQL: &str = "UPDATE runs SET rows_delivered = rows_delivered + $2 WHERE id = $1";
        let n = counter_to_db(delivered, "rows_delivered")?;
        with_pool!(self, |pool| sqlx::query(SQL)
            .bind(run_id)
            .bind(n)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(|e| store_error(format!("counting rows delivered by run {run_id}"), e))?;
        Ok(())
    }

    /// Sets the counters of a `running` run (progress without a checkpoint).
    /// Fails if the run is not `running`.
    pub async fn update_run_counts(
        &self,
        run_id: i64,
        rows_read: u64,
        rows_delivered: impl Into<Option<u64>>,
    ) -> Result<()> {
        const SQL: &str = "UPDATE runs SET rows_read = $2, \
             rows_delivered = COALESCE($3, rows_delivered) \
             WHERE id = $1 AND outcome = 'running'";
        let read = counter_to_db(rows_read, "rows_read")?;
        let delivered = rows_delivered
            .into()
            .map(|n| counter_to_db(n, "rows_delivered"))
            .transpose()?;
        let updated = with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(run_id)
                .bind(read)
                .bind(delivered)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| store_error(format!("updating the counters of run {run_id}"), e))?;
        if updated == 0 {
            return Err(not_running(run_id, None));
        }
        Ok(())
    }

    /// Ends a `running` run with a final `outcome`, its last counters and,
    /// for a failure, the error to show. Fails if the run is not `running`
    /// (already finished, abandoned, or unknown) or if `outcome` is
    /// [`RunOutcome::Running`].
    pub async fn finish_run(
        &self,
        run_id: i64,
        outcome: RunOutcome,
        rows_read: u64,
        rows_delivered: impl Into<Option<u64>>,
        error: Option<&str>,
    ) -> Result<()> {
        const SQL: &str = "UPDATE runs \
             SET outcome = $2, rows_read = $3, \
                 rows_delivered = COALESCE($4, rows_delivered), error = $5, \
                 ended_at = (SELECT now_us FROM clock) \
             WHERE id = $1 AND outcome = 'running'";
        if !outcome.is_final() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("run {run_id} cannot finish as `{outcome}`: that is not a final outcome"),
            ));
        }
        let read = counter_to_db(rows_read, "rows_read")?;
        let delivered = rows_delivered
            .into()
            .map(|n| counter_to_db(n, "rows_delivered"))
            .transpose()?;
        let updated = with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(run_id)
                .bind(outcome.as_str())
                .bind(read)
                .bind(delivered)
                .bind(error)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| store_error(format!("finishing run {run_id}"), e))?;
        if updated == 0 {
            return Err(not_running(run_id, None));
        }
        Ok(())
    }

    /// The run with this id, if any.
    pub async fn run(&self, id: i64) -> Result<Option<RunRecord>> {
        const SQL: &str = select_runs!("WHERE id = $1");
        let row: Option<RunRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(id).fetch_optional(pool).await
        })
        .map_err(|e| store_error(format!("reading run {id}"), e))?;
        row.map(RunRecord::try_from).transpose()
    }

    /// The latest `limit` runs, newest (most recently started) first, of one
    /// pipeline or of all of them.
    pub async fn runs(&self, pipeline: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
        const SQL: &str =
            select_runs!("WHERE ($1 IS NULL OR pipeline = $1) ORDER BY id DESC LIMIT $2");
        let rows: Vec<RunRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(pipeline)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("listing runs".to_owned(), e))?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    /// The most recently started run of `pipeline`, if any.
    /// Runs newest first, filtered by pipeline and outcome, with ids below
    /// `before` (for paging).
    pub async fn runs_page(
        &self,
        pipeline: Option<&str>,
        outcome: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<RunRecord>> {
        const SQL: &str = select_runs!(
            "WHERE ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR outcome = $2) \
             AND id < $3 ORDER BY id DESC LIMIT $4"
        );
        let rows: Vec<RunRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(pipeline)
                .bind(outcome)
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("listing runs".into(), e))?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    pub async fn last_run(&self, pipeline: &str) -> Result<Option<RunRecord>> {
        Ok(self.runs(Some(pipeline), 1).await?.into_iter().next())
    }

    /// Marks every `running` run of `pipeline` as `abandoned` and returns how
    /// many there were. Call it only while holding the pipeline's lease (its
    /// previous holder is gone, so none of those runs is still in progress).
    pub async fn abandon_running(&self, pipeline: &str) -> Result<u64> {
        const SQL: &str = "UPDATE runs \
             SET outcome = 'abandoned', ended_at = (SELECT now_us FROM clock), \
                 error = COALESCE(error, $2) \
             WHERE pipeline = $1 AND outcome = 'running'";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .bind(ABANDONED_ERROR)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| store_error(format!("abandoning the runs of pipeline `{pipeline}`"), e))
    }
}

fn not_running(run_id: i64, pipeline: Option<&str>) -> Error {
    let of = pipeline
        .map(|p| format!(" of pipeline `{p}`"))
        .unwrap_or_default();
    Error::new(
        ErrorKind::Store,
        format!("state store: run {run_id}{of} is not running (unknown, finished or abandoned)"),
    )
}

fn counter_to_db(value: u64, name: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        Error::new(
            ErrorKind::Internal,
            format!(
                "{name} = {value} is beyond what the state store can hold ({})",
                i64::MAX
            ),
        )
    })
}

fn counter_from_db(value: i64, column: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| {
        Error::new(
            ErrorKind::Store,
            format!("state store: column `{column}` holds a negative count ({value})"),
        )
    })
}

impl RunRecord {
    /// The run as JSON, as `caudal status` and the API show it.
    pub fn to_json(&self) -> serde_json::Value {
        let run = self;
        serde_json::json!({
            "id": run.id,
            "pipeline": run.pipeline,
            "trigger": run.trigger,
            "started_at": run.started_at.to_string(),
            "ended_at": run.ended_at.map(|t| t.to_string()),
            "rows_read": run.rows_read,
            "rows_delivered": run.rows_delivered,
            "outcome": run.outcome.as_str(),
            "error": run.error,
        })
    }
}
