//! Workflow runs, task instances and attempts.
//!
//! The engine decides every state (caudal-core's workflow model checks each
//! transition); the store keeps what it decided, durably, and refuses a
//! writer that is not the executor of record.
//!
//! Promises:
//! - **Fenced writes.** [`Store::save_workflow_changes`] writes a batch of
//!   task, attempt and run changes in one transaction, and only while the
//!   named lease is held by the writer: an executor that lost its lease
//!   (paused, partitioned, replaced after its lease expired) changes
//!   nothing, so an attempt is never recorded as running by two executors.
//! - **One transaction per batch.** A crash leaves either all of a batch or
//!   none of it: a task is never `running` without its attempt row.
//! - **Unfinished runs are never pruned.** [`Store::prune_workflow_runs`]
//!   deletes only runs that ended before the cutoff.
//! - Task and attempt times are the executor's clock (one process writes
//!   them); run creation times are the database's, as everywhere else.

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

use crate::{DispatchChanges, Store, clock, store_error};

/// A run to create.
#[derive(Clone, Debug)]
pub struct NewWorkflowRun {
    pub workflow: String,
    /// `schedule`, `manual`, `backfill`, `api`.
    pub triggered_by: String,
    pub logical_date: Option<Timestamp>,
    /// JSON object text.
    pub params: String,
    /// The state it starts in (normally `queued`).
    pub state: String,
}

/// A workflow run as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkflowRunRow {
    pub id: i64,
    pub workflow: String,
    pub batch_id: String,
    pub triggered_by: String,
    pub logical_date: Option<Timestamp>,
    pub params: String,
    pub state: String,
    pub cancel_requested: bool,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub dir: String,
    pub error: Option<String>,
}

/// A change to a run's state.
#[derive(Clone, Debug)]
pub struct RunChange {
    pub id: i64,
    pub state: String,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
}

/// A task instance as stored (written whole).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRow {
    pub run_id: i64,
    pub task: String,
    pub map_index: i64,
    pub state: String,
    /// Attempts started (the last attempt's number).
    pub attempts: u32,
    /// Attempts counted against the task's `max_attempts` since its last
    /// reset.
    pub failures: u32,
    /// JSON text.
    pub item: Option<String>,
    /// JSON object text.
    pub outputs: Option<String>,
    /// JSON array text.
    pub items: Option<String>,
    pub not_before: Option<Timestamp>,
    pub queued_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
}

/// One attempt as stored (written whole).
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRow {
    pub run_id: i64,
    pub task: String,
    pub map_index: i64,
    pub attempt: u32,
    pub holder: String,
    /// The process (group leader) of a command, written when it ends.
    pub pid: Option<i64>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub stderr_tail: Option<String>,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

/// Which runs [`Store::workflow_runs`] lists.
#[derive(Clone, Debug, Default)]
pub struct RunFilter<'a> {
    pub workflow: Option<&'a str>,
    /// Only queued and running runs.
    pub unfinished: bool,
    /// Newest first, at most this many (0: no limit).
    pub limit: u32,
}

type RunTuple = (
    i64,
    String,
    String,
    String,
    Option<i64>,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    String,
    Option<String>,
);
const RUN_COLUMNS: &str = "id, workflow, batch_id, triggered_by, logical_date, params, state, \
     cancel_requested, created_at, started_at, ended_at, dir, error";

type TaskTuple = (
    i64,
    String,
    i64,
    String,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);
const TASK_COLUMNS: &str = "run_id, task, map_index, state, attempts, failures, item, outputs, items, \
     not_before, queued_at, started_at, ended_at, error";

type AttemptTuple = (
    i64,
    String,
    i64,
    i64,
    String,
    Option<i64>,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    i64,
    Option<i64>,
);
const ATTEMPT_COLUMNS: &str = "run_id, task, map_index, attempt, holder, pid, state, \
     exit_code, error, stderr_tail, started_at, ended_at";

fn opt_ts(v: Option<i64>, column: &str) -> Result<Option<Timestamp>> {
    v.map(|us| clock::from_db(us, column)).transpose()
}

fn opt_db(t: Option<Timestamp>) -> Option<i64> {
    t.map(clock::to_db)
}

fn run_row(t: RunTuple) -> Result<WorkflowRunRow> {
    Ok(WorkflowRunRow {
        id: t.0,
        workflow: t.1,
        batch_id: t.2,
        triggered_by: t.3,
        logical_date: opt_ts(t.4, "workflow_runs.logical_date")?,
        params: t.5,
        state: t.6,
        cancel_requested: t.7 != 0,
        created_at: clock::from_db(t.8, "workflow_runs.created_at")?,
        started_at: opt_ts(t.9, "workflow_runs.started_at")?,
        ended_at: opt_ts(t.10, "workflow_runs.ended_at")?,
        dir: t.11,
        error: t.12,
    })
}

fn task_row(t: TaskTuple) -> Result<TaskRow> {
    Ok(TaskRow {
        run_id: t.0,
        task: t.1,
        map_index: t.2,
        state: t.3,
        attempts: u32::try_from(t.4).unwrap_or(u32::MAX),
        failures: u32::try_from(t.5).unwrap_or(u32::MAX),
        item: t.6,
        outputs: t.7,
        items: t.8,
        not_before: opt_ts(t.9, "workflow_tasks.not_before")?,
        queued_at: opt_ts(t.10, "workflow_tasks.queued_at")?,
        started_at: opt_ts(t.11, "workflow_tasks.started_at")?,
        ended_at: opt_ts(t.12, "workflow_tasks.ended_at")?,
        error: t.13,
    })
}

fn attempt_row(t: AttemptTuple) -> Result<AttemptRow> {
    Ok(AttemptRow {
        run_id: t.0,
        task: t.1,
        map_index: t.2,
        attempt: u32::try_from(t.3).unwrap_or(u32::MAX),
        holder: t.4,
        pid: t.5,
        state: t.6,
        exit_code: t.7.and_then(|c| i32::try_from(c).ok()),
        error: t.8,
        stderr_tail: t.9,
        started_at: clock::from_db(t.10, "workflow_attempts.started_at")?,
        ended_at: opt_ts(t.11, "workflow_attempts.ended_at")?,
    })
}

/// Rows per multi-row statement (each task row binds 14 values; SQLite
/// allows 32,766).
const ROWS_PER_STATEMENT: usize = 500;

const INSERT_TASKS: &str = "INSERT INTO workflow_tasks (run_id, task, map_index, state, attempts, \
     failures, item, outputs, items, not_before, queued_at, started_at, ended_at, error) ";
const ON_TASK_CONFLICT: &str = " ON CONFLICT (run_id, task, map_index) DO UPDATE SET \
     state = excluded.state, attempts = excluded.attempts, failures = excluded.failures, \
     item = excluded.item, outputs = excluded.outputs, items = excluded.items, \
     not_before = excluded.not_before, queued_at = excluded.queued_at, \
     started_at = excluded.started_at, ended_at = excluded.ended_at, error = excluded.error";

const INSERT_ATTEMPTS: &str = "INSERT INTO workflow_attempts (run_id, task, map_index, attempt, \
     holder, pid, state, exit_code, error, stderr_tail, started_at, ended_at) ";
const ON_ATTEMPT_CONFLICT: &str = " ON CONFLICT (run_id, task, map_index, attempt) DO UPDATE SET \
     holder = excluded.holder, pid = excluded.pid, state = excluded.state, \
     exit_code = excluded.exit_code, error = excluded.error, \
     stderr_tail = excluded.stderr_tail, ended_at = excluded.ended_at";

/// The last row of each key, in the order of their last appearance: one
/// statement may not touch a row twice (PostgreSQL refuses it), and the
/// last write of a batch is the one that counts.
fn last_per_key<T, K: Eq + std::hash::Hash>(rows: &[T], key: impl Fn(&T) -> K) -> Vec<&T> {
    let mut last = std::collections::HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        last.insert(key(row), i);
    }
    rows.iter()
        .enumerate()
        .filter(|(i, row)| last.get(&key(row)) == Some(i))
        .map(|(_, row)| row)
        .collect()
}

/// Upserts task rows in as few statements as the bind limit allows.
macro_rules! upsert_tasks {
    ($tx:expr, $rows:expr) => {
        let rows = last_per_key($rows, |t: &TaskRow| (t.run_id, t.task.clone(), t.map_index));
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::new(INSERT_TASKS);
            q.push_values(chunk, |mut b, t| {
                b.push_bind(t.run_id)
                    .push_bind(&t.task)
                    .push_bind(t.map_index)
                    .push_bind(&t.state)
                    .push_bind(i64::from(t.attempts))
                    .push_bind(i64::from(t.failures))
                    .push_bind(&t.item)
                    .push_bind(&t.outputs)
                    .push_bind(&t.items)
                    .push_bind(opt_db(t.not_before))
                    .push_bind(opt_db(t.queued_at))
                    .push_bind(opt_db(t.started_at))
                    .push_bind(opt_db(t.ended_at))
                    .push_bind(&t.error);
            });
            q.push(ON_TASK_CONFLICT);
            q.build().execute(&mut *$tx).await?;
        }
    };
}

/// Upserts attempt rows likewise.
macro_rules! upsert_attempts {
    ($tx:expr, $rows:expr) => {
        let rows = last_per_key($rows, |a: &AttemptRow| {
            (a.run_id, a.task.clone(), a.map_index, a.attempt)
        });
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::new(INSERT_ATTEMPTS);
            q.push_values(chunk, |mut b, a| {
                b.push_bind(a.run_id)
                    .push_bind(&a.task)
                    .push_bind(a.map_index)
                    .push_bind(i64::from(a.attempt))
                    .push_bind(&a.holder)
                    .push_bind(a.pid)
                    .push_bind(&a.state)
                    .push_bind(a.exit_code.map(i64::from))
                    .push_bind(&a.error)
                    .push_bind(&a.stderr_tail)
                    .push_bind(clock::to_db(a.started_at))
                    .push_bind(opt_db(a.ended_at));
            });
            q.push(ON_ATTEMPT_CONFLICT);
            q.build().execute(&mut *$tx).await?;
        }
    };
}

const UPDATE_RUN: &str = "UPDATE workflow_runs SET state = $2, started_at = $3, ended_at = $4, \
     error = $5 WHERE id = $1";

impl Store {
    /// Creates a run; its batch id is `WORKFLOW-YYYYMMDDTHHMMSS-ID` (the
    /// logical date, or the creation time) and its directory
    /// `runs_root/WORKFLOW/ID`.
    pub async fn create_workflow_run(
        &self,
        new: &NewWorkflowRun,
        runs_root: &str,
    ) -> Result<WorkflowRunRow> {
        let insert = "INSERT INTO workflow_runs (workflow, triggered_by, logical_date, params, \
             state, created_at) SELECT $1, $2, $3, $4, $5, now_us FROM clock RETURNING id, created_at";
        let failed = |e| store_error(format!("creating a run of workflow `{}`", new.workflow), e);
        let id: i64 = with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let (id, created_at): (i64, i64) = sqlx::query_as(insert)
                    .bind(&new.workflow)
                    .bind(&new.triggered_by)
                    .bind(opt_db(new.logical_date))
                    .bind(&new.params)
                    .bind(&new.state)
                    .fetch_one(&mut *tx)
                    .await?;
                let created = clock::from_db(created_at, "workflow_runs.created_at")
                    .unwrap_or(Timestamp::UNIX_EPOCH);
                let stamp = new.logical_date.unwrap_or(created);
                let batch = format!("{}-{}-{id}", new.workflow, stamp.strftime("%Y%m%dT%H%M%S"));
                let dir = format!("{}/{}/{id}", runs_root.trim_end_matches('/'), new.workflow);
                sqlx::query("UPDATE workflow_runs SET batch_id = $2, dir = $3 WHERE id = $1")
                    .bind(id)
                    .bind(batch)
                    .bind(dir)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(id)
            }
            .await
        })
        .map_err(failed)?;
        self.workflow_run(id).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Store,
                format!("state store: workflow run {id} vanished after it was created"),
            )
        })
    }

    /// One run.
    pub async fn workflow_run(&self, id: i64) -> Result<Option<WorkflowRunRow>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1");
        let row: Option<RunTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading workflow run {id}"), e))?;
        row.map(run_row).transpose()
    }

    /// Runs, newest first.
    pub async fn workflow_runs(&self, filter: &RunFilter<'_>) -> Result<Vec<WorkflowRunRow>> {
        let mut sql =
            format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE ($1 IS NULL OR workflow = $1)");
        if filter.unfinished {
            sql.push_str(" AND state IN ('queued', 'running')");
        }
        sql.push_str(" ORDER BY id DESC");
        if filter.limit > 0 {
            sql.push_str(&format!(" LIMIT {}", filter.limit));
        }
        let rows: Vec<RunTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(filter.workflow)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("listing workflow runs".into(), e))?;
        rows.into_iter().map(run_row).collect()
    }

    /// The latest logical date of a scheduled (or backfilled) run of
    /// `workflow`.
    pub async fn last_scheduled_workflow_run(&self, workflow: &str) -> Result<Option<Timestamp>> {
        let sql = "SELECT MAX(logical_date) FROM workflow_runs \
             WHERE workflow = $1 AND triggered_by = 'schedule'";
        let max: Option<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(sql).bind(workflow).fetch_one(pool).await
        })
        .map_err(|e| store_error(format!("reading the last scheduled run of `{workflow}`"), e))?;
        opt_ts(max, "workflow_runs.logical_date")
    }

    /// How many task instances of each run are in each state (one grouped
    /// query, however many instances: what listings of runs show).
    pub async fn workflow_task_counts(
        &self,
        run_ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, std::collections::BTreeMap<String, u64>>> {
        let mut out: std::collections::HashMap<i64, std::collections::BTreeMap<String, u64>> =
            run_ids.iter().map(|id| (*id, Default::default())).collect();
        if run_ids.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(i64, String, i64)> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT run_id, state, COUNT(*) FROM workflow_tasks WHERE run_id IN (",
            );
            let mut ids = q.separated(", ");
            for id in run_ids {
                ids.push_bind(*id);
            }
            q.push(") GROUP BY run_id, state");
            q.build_query_as().fetch_all(pool).await
        })
        .map_err(|e| store_error("counting the tasks of workflow runs".into(), e))?;
        for (id, state, n) in rows {
            out.entry(id)
                .or_default()
                .insert(state, u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    /// Every task instance of a run.
    pub async fn workflow_tasks(&self, run_id: i64) -> Result<Vec<TaskRow>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM workflow_tasks WHERE run_id = $1 ORDER BY task, map_index"
        );
        let rows: Vec<TaskTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(run_id)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading the tasks of workflow run {run_id}"), e))?;
        rows.into_iter().map(task_row).collect()
    }

    /// Every attempt of a run.
    pub async fn workflow_attempts(&self, run_id: i64) -> Result<Vec<AttemptRow>> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM workflow_attempts WHERE run_id = $1 \
             ORDER BY task, map_index, attempt"
        );
        let rows: Vec<AttemptTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(run_id)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading the attempts of workflow run {run_id}"), e))?;
        rows.into_iter().map(attempt_row).collect()
    }

    /// Writes task, attempt and run changes in one transaction, only while
    /// `holder` holds the lease `lease`. Returns `false` (writing nothing)
    /// when it does not.
    pub async fn save_workflow_changes(
        &self,
        lease: &str,
        holder: &str,
        tasks: &[TaskRow],
        attempts: &[AttemptRow],
        runs: &[RunChange],
    ) -> Result<bool> {
        self.save_workflow_changes_dispatching(
            lease,
            holder,
            tasks,
            attempts,
            runs,
            &DispatchChanges::default(),
        )
        .await
    }

    /// [`Store::save_workflow_changes`], with changes to the attempts
    /// handed out to nodes (see `dispatch`) in the same transaction.
    pub async fn save_workflow_changes_dispatching(
        &self,
        lease: &str,
        holder: &str,
        tasks: &[TaskRow],
        attempts: &[AttemptRow],
        runs: &[RunChange],
        dispatch: &DispatchChanges,
    ) -> Result<bool> {
        // One statement checks the fence and locks it until the commit: the
        // lease row is written (to itself) only if `holder` holds it, which
        // takes SQLite's write lock, or PostgreSQL's row lock that a
        // takeover would have to wait for.
        const FENCE: &str = "UPDATE leases SET holder = holder WHERE name = $1 AND holder = $2";
        // Nodes waiting to claim hear of new attempts at commit.
        let notify_nodes = !dispatch.new.is_empty() && self.backend() == "postgres";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let fenced = sqlx::query(FENCE)
                    .bind(lease)
                    .bind(holder)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if fenced == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                if !tasks.is_empty() {
                    upsert_tasks!(tx, tasks);
                }
                if !attempts.is_empty() {
                    upsert_attempts!(tx, attempts);
                }
                crate::dispatch::apply_dispatch!(tx, dispatch);
                if notify_nodes {
                    sqlx::query(crate::dispatch::NOTIFY_HANDED_OUT)
                        .execute(&mut *tx)
                        .await?;
                }
                for r in runs {
                    sqlx::query(UPDATE_RUN)
                        .bind(r.id)
                        .bind(&r.state)
                        .bind(opt_db(r.started_at))
                        .bind(opt_db(r.ended_at))
                        .bind(&r.error)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            }
            .await
        })
        .map_err(|e| store_error("saving workflow task states".into(), e))
    }

    /// Asks the executor to cancel run `id`. Returns `false` if the run
    /// does not exist or has ended.
    pub async fn request_workflow_cancel(&self, id: i64) -> Result<bool> {
        let sql = "UPDATE workflow_runs SET cancel_requested = 1 \
             WHERE id = $1 AND state IN ('queued', 'running')";
        with_pool!(self, |pool| {
            sqlx::query(sql)
                .bind(id)
                .execute(pool)
                .await
                .map(|d| d.rows_affected() > 0)
        })
        .map_err(|e| store_error(format!("cancelling workflow run {id}"), e))
    }

    /// Queues a finished run again with `tasks` rewritten (the engine chose
    /// which start over) and `deleted` instances removed (fan-out instances
    /// to expand again). Returns `false`, changing nothing, if the run is
    /// not finished.
    pub async fn requeue_workflow_run(
        &self,
        id: i64,
        tasks: &[TaskRow],
        deleted: &[(String, i64)],
    ) -> Result<bool> {
        let requeue = "UPDATE workflow_runs SET state = 'queued', ended_at = NULL, error = NULL, \
             cancel_requested = 0 WHERE id = $1 AND state IN ('succeeded', 'failed', 'cancelled')";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(requeue).bind(id).execute(&mut *tx).await?;
                if done.rows_affected() == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                for (task, map_index) in deleted {
                    // Its attempts go with it: the instance made again
                    // numbers its attempts from 1.
                    for table in ["workflow_attempts", "workflow_tasks"] {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DELETE FROM {table} WHERE run_id = $1 AND task = $2 AND map_index = $3"
                        )))
                        .bind(id)
                        .bind(task)
                        .bind(map_index)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                if !tasks.is_empty() {
                    upsert_tasks!(tx, tasks);
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            }
            .await
        })
        .map_err(|e| store_error(format!("retrying workflow run {id}"), e))
    }

    /// Deletes runs (with their tasks and attempts) that ended before
    /// `cutoff`; returns the directories of the deleted runs.
    pub async fn prune_workflow_runs(&self, cutoff: Timestamp) -> Result<Vec<String>> {
        let select = "SELECT id, dir FROM workflow_runs WHERE ended_at IS NOT NULL \
             AND ended_at < $1 AND state IN ('succeeded', 'failed', 'cancelled') LIMIT 500";
        let cutoff_us = clock::to_db(cutoff);
        let mut dirs = Vec::new();
        loop {
            let rows: Vec<(i64, String)> = with_pool!(self, |pool| {
                sqlx::query_as(select).bind(cutoff_us).fetch_all(pool).await
            })
            .map_err(|e| store_error("listing old workflow runs".into(), e))?;
            if rows.is_empty() {
                return Ok(dirs);
            }
            for (id, dir) in rows {
                with_pool!(self, |pool| {
                    async {
                        let mut tx = pool.begin().await?;
                        for table in ["workflow_attempts", "workflow_tasks"] {
                            sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DELETE FROM {table} WHERE run_id = $1"
                            )))
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        }
                        // The run's crawl frontiers (`workflow:<run>:<task>…`).
                        let frontiers = format!("workflow:{id}:%");
                        sqlx::query("DELETE FROM crawl_pages WHERE frontier LIKE $1")
                            .bind(&frontiers)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM crawl_frontiers WHERE name LIKE $1")
                            .bind(&frontiers)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM workflow_runs WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await
                    }
                    .await
                })
                .map_err(|e| store_error(format!("deleting workflow run {id}"), e))?;
                dirs.push(dir);
            }
        }
    }
}
