//! Workflows: runs of dependent tasks, durable in the state store.
//!
//! [`Workflows`] is the one implementation of every operation on them
//! (start a run, list, cancel, retry, backfill, read task states and
//! logs); the CLI and the API call it and present what it returns. The
//! executor ([`exec::execute`]) runs the runs.
//!
//! Promises:
//! - One executor at a time: the holder of the `workflows/executor` lease
//!   runs every run, and the store refuses the writes of an executor that
//!   lost it. A run's tasks are never started by two processes.
//! - After a crash (kill -9, power loss), the next executor kills what the
//!   dead one left running, counts each attempt that was running as failed
//!   (`lost`), and goes on: succeeded tasks never run again.
//! - Parameters are checked before a run exists: an undeclared `--param`
//!   is an error naming the declared ones.

pub mod attempt;
pub mod exec;
mod render;
pub mod worker;

use std::sync::Arc;

use caudal_core::config::{Config, NotifyConfig};
use caudal_core::delivery::{Growth, RetryPolicy};
use caudal_core::workflow::{
    AttemptInfo, AttemptState, RunState, TaskInstanceInfo, TaskState, WorkflowRunInfo,
};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{NewWorkflowRun, RunFilter, Store, TaskRow, WorkflowRunRow};
use jiff::Timestamp;
use serde_json::{Map, Value};

pub use exec::{ExecOptions, execute};

/// The lease held by the process that executes workflow runs.
pub const EXECUTOR_LEASE: &str = "workflows/executor";

/// A workflow as `caudal workflow list` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct WorkflowSummary {
    pub workflow: String,
    /// The schedule in words, or `manual`.
    pub schedule: String,
    pub tasks: u64,
    pub last_run: Option<WorkflowRunInfo>,
    /// The tasks and what each waits for, in name order: the DAG.
    #[serde(default)]
    pub graph: Vec<TaskNode>,
}

/// One task of a workflow's DAG.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskNode {
    pub task: String,
    /// `command`, `pipeline`, `http` or `crawl`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The tasks it waits for.
    pub depends_on: Vec<String>,
    /// Its pool, when it names one.
    pub pool: Option<String>,
    /// A mapped task: where its items come from.
    pub mapped: bool,
}

/// Where an attempt's output is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFile {
    /// The file; missing while the attempt has written nothing.
    pub path: std::path::PathBuf,
    /// The attempt still runs (more may come).
    pub running: bool,
    /// The run's directory is gone (pruned): the output is lost.
    pub pruned: bool,
}

/// Operations on workflows, for the CLI and the API alike.
#[derive(Clone, Debug)]
pub struct Workflows {
    config: Arc<Config>,
    store: Store,
}

impl Workflows {
    pub fn new(config: Arc<Config>, store: Store) -> Self {
        Self { config, store }
    }

    fn known(&self, name: &str) -> Result<()> {
        if self.config.workflows.contains_key(name) {
            return Ok(());
        }
        let names: Vec<&str> = self.config.workflows.keys().map(String::as_str).collect();
        Err(Error::new(
            ErrorKind::NotFound,
            if names.is_empty() {
                format!("no workflow named {name:?}; the configuration defines none")
            } else {
                format!(
                    "no workflow named {name:?}; workflows: {}",
                    names.join(", ")
                )
            },
        ))
    }

    /// Every workflow with its last run.
    pub async fn list(&self) -> Result<Vec<WorkflowSummary>> {
        let mut out = Vec::new();
        for (name, w) in &self.config.workflows {
            let last = self
                .store
                .workflow_runs(&RunFilter {
                    workflow: Some(name),
                    unfinished: false,
                    limit: 1,
                })
                .await?;
            let last_run = match last.into_iter().next() {
                Some(row) => Some(self.info(row).await?),
                None => None,
            };
            let schedule = match &w.schedule {
                None => "manual".to_string(),
                Some(s) => crate::Schedule::from_config(&s.as_pipeline_schedule())
                    .map(|s| s.describe())
                    .unwrap_or_else(|e| e.to_string()),
            };
            out.push(WorkflowSummary {
                workflow: name.clone(),
                schedule,
                tasks: w.tasks.len() as u64,
                last_run,
                graph: w
                    .tasks
                    .iter()
                    .map(|(task, t)| TaskNode {
                        task: task.clone(),
                        kind: t.kind.as_str().to_string(),
                        depends_on: t.depends_on.clone(),
                        pool: t.pool.clone(),
                        mapped: t.items_from.is_some() || t.for_each.is_some(),
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Queues a run of `name` with `params` (each must be declared).
    pub async fn trigger(
        &self,
        name: &str,
        params: Map<String, Value>,
        triggered_by: &str,
    ) -> Result<WorkflowRunInfo> {
        self.known(name)?;
        let declared = &self.config.workflows[name].params;
        if let Some(k) = params.keys().find(|k| !declared.contains_key(*k)) {
            let names: Vec<&str> = declared.keys().map(String::as_str).collect();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "workflow `{name}` has no parameter `{k}`; its parameters: {}",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        let row = create_run(&self.store, &self.config, name, triggered_by, None, params).await?;
        self.info(row).await
    }

    /// Queues one run per schedule slot from `from` to `to` (inclusive).
    pub async fn backfill(&self, name: &str, from: Timestamp, to: Timestamp) -> Result<Vec<i64>> {
        self.known(name)?;
        let workflow = &self.config.workflows[name];
        let Some(schedule) = &workflow.schedule else {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "workflow `{name}` has no schedule: a backfill runs it once per schedule time, so it needs one"
                ),
            ));
        };
        if to < from {
            return Err(Error::new(ErrorKind::Config, "--to is before --from"));
        }
        let schedule = crate::Schedule::from_config(&schedule.as_pipeline_schedule())?;
        let mut slots = Vec::new();
        let mut at = from;
        // `from` itself counts when it is a schedule time.
        let first = schedule.next_fire_after(
            from.checked_sub(jiff::SignedDuration::from_micros(1))
                .unwrap_or(from),
        )?;
        if first == from {
            slots.push(from);
        }
        loop {
            at = schedule.next_fire_after(at)?;
            if at > to || slots.len() >= 10_000 {
                break;
            }
            slots.push(at);
        }
        let mut ids = Vec::new();
        for slot in slots {
            let row = create_run(
                &self.store,
                &self.config,
                name,
                "backfill",
                Some(slot),
                Map::new(),
            )
            .await?;
            ids.push(row.id);
        }
        Ok(ids)
    }

    /// Runs, newest first.
    pub async fn runs(&self, workflow: Option<&str>, limit: u32) -> Result<Vec<WorkflowRunInfo>> {
        if let Some(w) = workflow {
            self.known(w)?;
        }
        let rows = self
            .store
            .workflow_runs(&RunFilter {
                workflow,
                unfinished: false,
                limit,
            })
            .await?;
        // One grouped count for all the runs, not every task row of each.
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let mut counts = self.store.workflow_task_counts(&ids).await?;
        rows.into_iter()
            .map(|row| {
                let tasks = counts.remove(&row.id).unwrap_or_default();
                run_info(row, tasks)
            })
            .collect()
    }

    async fn row(&self, id: i64) -> Result<WorkflowRunRow> {
        self.store
            .workflow_run(id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no workflow run {id}")))
    }

    /// One run.
    pub async fn run(&self, id: i64) -> Result<WorkflowRunInfo> {
        let row = self.row(id).await?;
        self.info(row).await
    }

    async fn info(&self, row: WorkflowRunRow) -> Result<WorkflowRunInfo> {
        let mut counts = self.store.workflow_task_counts(&[row.id]).await?;
        let tasks = counts.remove(&row.id).unwrap_or_default();
        run_info(row, tasks)
    }

    /// The task instances of a run.
    pub async fn tasks(&self, id: i64) -> Result<Vec<TaskInstanceInfo>> {
        self.row(id).await?;
        let rows = self.store.workflow_tasks(id).await?;
        rows.into_iter()
            .map(|t| {
                let items = t
                    .items
                    .as_deref()
                    .and_then(|i| serde_json::from_str::<Vec<Value>>(i).ok())
                    .map_or(0, |v| v.len() as u64);
                Ok(TaskInstanceInfo {
                    state: TaskState::parse(&t.state)?,
                    attempts: t.attempts,
                    item: t.item.as_deref().and_then(|i| serde_json::from_str(i).ok()),
                    outputs: t
                        .outputs
                        .as_deref()
                        .map(parse_json_object)
                        .unwrap_or_default(),
                    items,
                    queued_at: t.queued_at.map(|x| x.to_string()),
                    started_at: t.started_at.map(|x| x.to_string()),
                    ended_at: t.ended_at.map(|x| x.to_string()),
                    error: t.error,
                    task: t.task,
                    map_index: t.map_index,
                })
            })
            .collect()
    }

    /// Every attempt of a run.
    pub async fn attempts(&self, id: i64) -> Result<Vec<AttemptInfo>> {
        self.row(id).await?;
        let rows = self.store.workflow_attempts(id).await?;
        rows.into_iter()
            .map(|a| {
                Ok(AttemptInfo {
                    state: AttemptState::parse(&a.state)?,
                    exit_code: a.exit_code,
                    error: a.error,
                    stderr_tail: a.stderr_tail,
                    started_at: a.started_at.to_string(),
                    ended_at: a.ended_at.map(|x| x.to_string()),
                    node: a.holder,
                    task: a.task,
                    map_index: a.map_index,
                    attempt: a.attempt,
                })
            })
            .collect()
    }

    /// The log file of an attempt's standard output or error (`stderr`).
    /// `attempt` `None`: the latest. A file is created with the first byte
    /// written: an attempt that wrote nothing has none.
    pub async fn log(
        &self,
        id: i64,
        task: &str,
        map_index: i64,
        attempt: Option<u32>,
        stderr: bool,
    ) -> Result<LogFile> {
        let run = self.row(id).await?;
        let attempts = self.store.workflow_attempts(id).await?;
        let found = attempts
            .iter()
            .filter(|a| a.task == task && a.map_index == map_index)
            .filter(|a| attempt.is_none_or(|n| a.attempt == n))
            .max_by_key(|a| a.attempt)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "run {id} has no attempt of task `{task}`{}{}",
                        if map_index >= 0 {
                            format!(" [{map_index}]")
                        } else {
                            String::new()
                        },
                        attempt
                            .map(|n| format!(" numbered {n}"))
                            .unwrap_or_default()
                    ),
                )
            })?;
        let files = attempt::Files::new(
            std::path::Path::new(&run.dir),
            task,
            map_index,
            found.attempt,
        );
        let running = found.state == AttemptState::Running.as_str();
        let pruned = !std::path::Path::new(&run.dir).is_dir();
        Ok(LogFile {
            path: if stderr { files.stderr } else { files.stdout },
            running,
            pruned,
        })
    }

    /// Asks the executor to cancel a run.
    pub async fn cancel(&self, id: i64) -> Result<()> {
        let run = self.row(id).await?;
        if !self.store.request_workflow_cancel(id).await? {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("workflow run {id} has already ended ({})", run.state),
            ));
        }
        Ok(())
    }

    /// Queues an ended run again: with `only_failed`, only its failed,
    /// upstream_failed and cancelled tasks start over (succeeded ones keep
    /// their results); otherwise every task does.
    pub async fn retry(&self, id: i64, only_failed: bool) -> Result<()> {
        let run = self.row(id).await?;
        if !RunState::parse(&run.state)?.is_finished() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "workflow run {id} is {}; retry it once it has ended (or cancel it)",
                    run.state
                ),
            ));
        }
        let tasks = self.store.workflow_tasks(id).await?;
        let mut rewrite: Vec<TaskRow> = Vec::new();
        let mut deleted = Vec::new();
        // Fan-out tasks that start over completely lose their instances
        // (the list is computed again); with `only_failed`, instances that
        // succeeded keep their results and only the others run again.
        let mut regrown = std::collections::HashSet::new();
        if !only_failed {
            regrown.extend(
                tasks
                    .iter()
                    .filter(|t| t.map_index < 0)
                    .map(|t| t.task.clone()),
            );
        }
        for t in tasks {
            let state = TaskState::parse(&t.state)?;
            if t.map_index >= 0 && regrown.contains(&t.task) {
                deleted.push((t.task.clone(), t.map_index));
                continue;
            }
            let next = state.reset(only_failed);
            if next == state && state != TaskState::Pending {
                continue;
            }
            rewrite.push(TaskRow {
                state: next.as_str().to_string(),
                failures: 0,
                not_before: None,
                queued_at: None,
                started_at: None,
                ended_at: None,
                error: None,
                outputs: if t.map_index < 0 {
                    None
                } else {
                    t.outputs.clone()
                },
                items: if t.map_index < 0 {
                    None
                } else {
                    t.items.clone()
                },
                ..t
            });
        }
        if !self
            .store
            .requeue_workflow_run(id, &rewrite, &deleted)
            .await?
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("workflow run {id} changed while it was being retried; try again"),
            ));
        }
        Ok(())
    }

    /// Deletes runs that ended more than the retention's age ago, with
    /// their directories (only directories under the runs directory).
    pub async fn prune(&self) -> Result<usize> {
        let age =
            jiff::SignedDuration::try_from(self.config.retention.workflow_runs_max_age.as_std())
                .unwrap_or(jiff::SignedDuration::MAX);
        let cutoff = Timestamp::now().checked_sub(age).unwrap_or(Timestamp::MIN);
        let dirs = self.store.prune_workflow_runs(cutoff).await?;
        let root = self.config.runs_dir();
        for dir in &dirs {
            let path = std::path::Path::new(dir);
            if path.starts_with(&root)
                && path.is_dir()
                && let Err(e) = tokio::fs::remove_dir_all(path).await
            {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove an old run directory");
            }
        }
        Ok(dirs.len())
    }
}

/// A run as shown, with its tasks counted by state.
fn run_info(
    row: WorkflowRunRow,
    counts: std::collections::BTreeMap<String, u64>,
) -> Result<WorkflowRunInfo> {
    Ok(WorkflowRunInfo {
        id: row.id,
        workflow: row.workflow,
        batch_id: row.batch_id,
        triggered_by: row.triggered_by,
        logical_date: row.logical_date.map(|t| t.to_string()),
        state: RunState::parse(&row.state)?,
        params: parse_json_object(&row.params),
        created_at: row.created_at.to_string(),
        started_at: row.started_at.map(|t| t.to_string()),
        ended_at: row.ended_at.map(|t| t.to_string()),
        dir: row.dir,
        error: row.error,
        tasks: counts,
        cancel_requested: row.cancel_requested,
    })
}

/// Creates a queued run with its parameters (defaults merged at render
/// time).
pub(crate) async fn create_run(
    store: &Store,
    config: &Config,
    name: &str,
    triggered_by: &str,
    logical_date: Option<Timestamp>,
    params: Map<String, Value>,
) -> Result<WorkflowRunRow> {
    let root = config.runs_dir();
    let root = std::path::absolute(&root).unwrap_or(root);
    store
        .create_workflow_run(
            &NewWorkflowRun {
                workflow: name.to_string(),
                triggered_by: triggered_by.to_string(),
                logical_date,
                params: Value::Object(params).to_string(),
                state: RunState::Queued.as_str().to_string(),
            },
            &root.to_string_lossy(),
        )
        .await
}

/// `--param key=value` pairs as parameters: a value that parses as JSON is
/// that value (`pages=5` is the number 5), anything else is text.
pub fn params_from_pairs(pairs: &[(String, String)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| {
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            (k.clone(), value)
        })
        .collect()
}

pub(crate) fn parse_json_object(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// POSTs a run's summary to its webhook, with a few retries.
pub(crate) async fn notify(http: reqwest::Client, notify: NotifyConfig, summary: Value) {
    let policy = RetryPolicy::new(
        std::time::Duration::from_secs(1),
        Growth::Exponential { multiplier: 2.0 },
        0.5,
        std::time::Duration::from_secs(30),
        4,
        std::time::Duration::ZERO,
    );
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut request = http
            .post(&notify.url)
            .timeout(std::time::Duration::from_secs(10))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(summary.to_string());
        for (k, v) in &notify.headers {
            request = request.header(k, v);
        }
        let why = match request.send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        if policy.should_give_up(attempts, std::time::Duration::ZERO) {
            tracing::warn!(url = %notify.url, error = %why, "workflow notification not delivered");
            return;
        }
        let wait = policy.delay(attempts - 1, None, &mut rand::rng());
        tokio::time::sleep(wait).await;
    }
}

/// How long the daemon waits before asking again for the executor lease
/// another process holds.
const EXECUTOR_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
/// How often old runs are pruned.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The daemon's part: executes workflow runs (creating the scheduled
/// ones) until `shutdown`, and prunes old runs every hour. While another
/// process is the executor (a `caudal workflow run --wait`), it waits and
/// takes over when that one ends.
pub async fn serve(
    config: Arc<Config>,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let pruner = {
        let workflows = Workflows::new(config.clone(), store.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                match workflows.prune().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(runs = n, "old workflow runs deleted"),
                    Err(e) => tracing::warn!(error = %e.report(), "cannot prune old workflow runs"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(PRUNE_EVERY) => {}
                }
            }
        })
    };
    // In a cluster every node runs the attempts it claims, whichever node
    // is the executor.
    let worker = config.cluster.is_some().then(|| {
        tokio::spawn(worker::work(
            config.clone(),
            store.clone(),
            caudal_core::process::holder_id(),
            shutdown.clone(),
        ))
    });
    let mut waiting_logged = false;
    while !shutdown.is_cancelled() {
        let options = ExecOptions {
            schedules: true,
            only_run: None,
        };
        match execute(config.clone(), store.clone(), options, shutdown.clone()).await {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::Busy => {
                if !waiting_logged {
                    tracing::info!(reason = %e, "another process executes workflows; waiting to take over");
                    waiting_logged = true;
                }
            }
            Err(e) => {
                tracing::error!(error = %e.report(), "the workflow executor stopped; starting it again");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(EXECUTOR_RETRY) => {}
        }
    }
    pruner.abort();
    if let Some(worker) = worker {
        match worker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e.report(), "this node's workflow worker stopped")
            }
            Err(e) => tracing::error!(error = %e, "this node's workflow worker stopped"),
        }
    }
}
