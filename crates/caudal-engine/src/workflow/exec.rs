//! The executor: one process at a time (the holder of the
//! `workflows/executor` lease) runs every workflow run.
//!
//! Each turn of its loop takes what happened (attempts that ended, runs
//! queued or cancelled in the store, timers), moves task states by the
//! rules of caudal-core's workflow model, starts what is ready, writes
//! every change of the turn in one fenced transaction, and only then starts
//! the processes: a task is recorded `running` before its process exists,
//! so after a crash it is found and its attempt counted as lost, never as a
//! success.
//!
//! Ready tasks wait in one queue per pool, ordered by priority (1 before
//! 2, none last), then by run, then by when they became ready; a fan-out's
//! instances beyond its `max_parallel` stay `scheduled` until one ends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_core::config::{
    Catchup, Config, NotifyOn, Overlap, TaskConfig, TaskType, WorkflowConfig,
};
use caudal_core::delivery::RetryPolicy;
use caudal_core::workflow::{AttemptState, Readiness, RunState, TaskState, decide};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{
    AttemptRow, DispatchChanges, DispatchKey, NewDispatch, RunChange, RunFilter, Store, TaskRow,
    WorkflowRunRow,
};
use jiff::Timestamp;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::attempt::{self, AttemptId, Done, Ending, Files, Shared, Spec, Work};
use super::render::{self, Context, Prepared};
use super::worker::key_of;
use super::{EXECUTOR_LEASE, parse_json_object};
use crate::lease::{Lease, holder_id};
use crate::schedule::Schedule;

/// How often the store is asked for new runs and cancel requests.
const POLL: Duration = Duration::from_millis(200);
/// How often, in a cluster, the store is asked for attempts that ended on
/// their nodes (while any runs); on PostgreSQL an outcome's notification
/// wakes the executor at once, the poll catches what one missed.
const DISPATCH_POLL: Duration = Duration::from_millis(50);
/// How often, in a cluster, attempts of silent nodes are looked for.
const RESCUE_CHECK: Duration = Duration::from_secs(1);
/// Outcomes read at most per poll.
const DISPATCH_READ: u32 = 512;
/// How often schedules are checked.
const SCHEDULE_CHECK: Duration = Duration::from_secs(1);
/// Slots of the implicit pool of tasks that name none.
pub const DEFAULT_POOL_SLOTS: u32 = 128;
/// How long a stopping executor waits for notifications being sent.
const NOTIFY_WAIT: Duration = Duration::from_secs(60);
/// Most missed runs one schedule creates at once (`catchup = "all"`).
const MAX_CATCHUP: usize = 1000;

/// What the executor runs.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// Create runs on the workflows' schedules (the daemon does).
    pub schedules: bool,
    /// Run only this run, and return when it has ended.
    pub only_run: Option<i64>,
}

type Key = (String, i64);

#[derive(Debug)]
struct Instance {
    state: TaskState,
    attempts: u32,
    failures: u32,
    item: Option<Value>,
    outputs: Map<String, Value>,
    items: Vec<Value>,
    not_before: Option<Timestamp>,
    queued_at: Option<Timestamp>,
    started_at: Option<Timestamp>,
    ended_at: Option<Timestamp>,
    error: Option<String>,
    /// The running attempt's stop switch.
    stop: Option<CancellationToken>,
}

impl Instance {
    fn new(state: TaskState) -> Self {
        Self {
            state,
            attempts: 0,
            failures: 0,
            item: None,
            outputs: Map::new(),
            items: Vec::new(),
            not_before: None,
            queued_at: None,
            started_at: None,
            ended_at: None,
            error: None,
            stop: None,
        }
    }

    fn from_row(row: &TaskRow) -> Result<Self> {
        let parse = |text: &Option<String>| -> Option<Value> {
            text.as_deref().and_then(|t| serde_json::from_str(t).ok())
        };
        Ok(Self {
            state: TaskState::parse(&row.state)?,
            attempts: row.attempts,
            failures: row.failures,
            item: parse(&row.item),
            outputs: match parse(&row.outputs) {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            },
            items: match parse(&row.items) {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            },
            not_before: row.not_before,
            queued_at: row.queued_at,
            started_at: row.started_at,
            ended_at: row.ended_at,
            error: row.error.clone(),
            stop: None,
        })
    }

    fn row(&self, run_id: i64, key: &Key) -> TaskRow {
        let json = |v: &Value| Some(v.to_string());
        TaskRow {
            run_id,
            task: key.0.clone(),
            map_index: key.1,
            state: self.state.as_str().to_string(),
            attempts: self.attempts,
            failures: self.failures,
            item: self.item.as_ref().and_then(json),
            outputs: (!self.outputs.is_empty())
                .then(|| Value::Object(self.outputs.clone()).to_string()),
            items: (!self.items.is_empty()).then(|| Value::Array(self.items.clone()).to_string()),
            not_before: self.not_before,
            queued_at: self.queued_at,
            started_at: self.started_at,
            ended_at: self.ended_at,
            error: self.error.clone(),
        }
    }
}

#[derive(Debug)]
struct RunModel {
    row: WorkflowRunRow,
    state: RunState,
    workflow: Arc<WorkflowConfig>,
    params: Map<String, Value>,
    instances: BTreeMap<Key, Instance>,
    /// Fan-out instances of each task.
    children: HashMap<String, Vec<i64>>,
    unfinished: usize,
    cancel: bool,
    /// Per fan-out task: instances not ended, instances queued, running or
    /// retrying (for `max_parallel`), and instances waiting `scheduled`.
    children_unfinished: HashMap<String, usize>,
    children_active: HashMap<String, usize>,
    children_scheduled: HashMap<String, VecDeque<i64>>,
}

impl RunModel {
    /// A run with no task instances yet.
    fn new(
        row: WorkflowRunRow,
        state: RunState,
        workflow: WorkflowConfig,
        params: Map<String, Value>,
    ) -> Self {
        Self {
            row,
            state,
            workflow: Arc::new(workflow),
            params,
            instances: BTreeMap::new(),
            children: HashMap::new(),
            unfinished: 0,
            cancel: false,
            children_unfinished: HashMap::new(),
            children_active: HashMap::new(),
            children_scheduled: HashMap::new(),
        }
    }

    /// Keeps the fan-out counts as an instance moves `from` → `to` (`from`
    /// `None`: it is new).
    fn count_child(&mut self, key: &Key, from: Option<TaskState>, to: TaskState) {
        if key.1 < 0 {
            return;
        }
        let active = |s: TaskState| {
            matches!(
                s,
                TaskState::Queued | TaskState::Running | TaskState::Retrying
            )
        };
        let name = &key.0;
        match from {
            None if !to.is_finished() => {
                *self.children_unfinished.entry(name.clone()).or_default() += 1;
            }
            Some(f) if !f.is_finished() && to.is_finished() => {
                if let Some(n) = self.children_unfinished.get_mut(name) {
                    *n = n.saturating_sub(1);
                }
            }
            _ => {}
        }
        match (from.is_some_and(active), active(to)) {
            (false, true) => *self.children_active.entry(name.clone()).or_default() += 1,
            (true, false) => {
                if let Some(n) = self.children_active.get_mut(name) {
                    *n = n.saturating_sub(1);
                }
            }
            _ => {}
        }
        if to == TaskState::Scheduled && from != Some(TaskState::Scheduled) {
            self.children_scheduled
                .entry(name.clone())
                .or_default()
                .push_back(key.1);
        }
    }
}

impl RunModel {
    fn dir(&self) -> PathBuf {
        PathBuf::from(&self.row.dir)
    }

    fn task(&self, name: &str) -> Option<&TaskConfig> {
        self.workflow.tasks.get(name)
    }
}

/// An entry of a pool's ready queue.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ready {
    priority: i64,
    run_id: i64,
    seq: u64,
    task: String,
    map_index: i64,
}

#[derive(Debug)]
struct Pool {
    slots: u32,
    used: u32,
    rate: Option<caudal_core::config::PoolRate>,
    starts: VecDeque<Instant>,
    ready: BTreeSet<Ready>,
}

impl Pool {
    /// When the pool's rate allows the next start (`None`: now).
    fn rate_wait(&mut self, now: Instant) -> Option<Instant> {
        let rate = self.rate?;
        while self
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= rate.per)
        {
            self.starts.pop_front();
        }
        if self.starts.len() < rate.starts as usize {
            None
        } else {
            self.starts.front().map(|t| *t + rate.per)
        }
    }
}

/// What the loop hands the writer: one turn's rows, the attempts to start
/// once they are written, and (for `sync`) an acknowledgement.
#[derive(Debug, Default)]
struct Batch {
    tasks: Vec<TaskRow>,
    attempts: Vec<AttemptRow>,
    runs: Vec<RunChange>,
    dispatch: DispatchChanges,
    spawn: Vec<(Spec, CancellationToken)>,
    ack: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The writer: commits batches in order (all batches waiting are merged
/// into one transaction), and starts each batch's processes only after its
/// rows are committed. The loop goes on deciding while a commit is in
/// flight. On a failed or fenced commit it stops everything that follows
/// and cancels `failed`, with the error in `error`.
#[allow(clippy::too_many_arguments)]
fn start_writer(
    store: Store,
    holder: String,
    shared: Shared,
    interrupt: CancellationToken,
    events: mpsc::UnboundedSender<Done>,
    failed: CancellationToken,
    error: Arc<std::sync::Mutex<Option<Error>>>,
) -> mpsc::UnboundedSender<Batch> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batches = vec![first];
            while let Ok(more) = rx.try_recv() {
                batches.push(more);
            }
            if failed.is_cancelled() {
                continue;
            }
            let (mut tasks, mut attempts, mut runs) = (Vec::new(), Vec::new(), Vec::new());
            let mut dispatch = DispatchChanges::default();
            for b in &mut batches {
                tasks.append(&mut b.tasks);
                attempts.append(&mut b.attempts);
                runs.append(&mut b.runs);
                dispatch.new.append(&mut b.dispatch.new);
                dispatch.forget.append(&mut b.dispatch.forget);
                dispatch.cancel.append(&mut b.dispatch.cancel);
            }
            if !(tasks.is_empty() && attempts.is_empty() && runs.is_empty() && dispatch.is_empty())
            {
                let saved = store
                    .save_workflow_changes_dispatching(
                        EXECUTOR_LEASE,
                        &holder,
                        &tasks,
                        &attempts,
                        &runs,
                        &dispatch,
                    )
                    .await;
                let problem = match saved {
                    Ok(true) => None,
                    Ok(false) => Some(Error::new(
                        ErrorKind::Busy,
                        "another process holds the workflow executor lease; this executor stops without writing",
                    )),
                    Err(e) => Some(e),
                };
                if let Some(e) = problem {
                    *error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                    failed.cancel();
                    continue;
                }
            }
            for b in batches {
                for (spec, stop) in b.spawn {
                    if interrupt.is_cancelled() {
                        let _ = events.send(attempt::interrupted(&spec));
                        continue;
                    }
                    tokio::spawn(attempt::run(
                        spec,
                        shared.clone(),
                        stop,
                        interrupt.clone(),
                        events.clone(),
                    ));
                }
                if let Some(ack) = b.ack {
                    let _ = ack.send(());
                }
            }
        }
    });
    tx
}

/// Changes of one turn, written together.
#[derive(Debug, Default)]
struct Pending {
    tasks: HashSet<(i64, Key)>,
    attempts: HashMap<AttemptId, AttemptRow>,
    runs: HashSet<i64>,
    dispatch: DispatchChanges,
    spawn: Vec<(Spec, CancellationToken)>,
}

struct Executor {
    config: Arc<Config>,
    store: Store,
    holder: String,
    options: ExecOptions,
    env: minijinja::Environment<'static>,
    shared: Shared,
    runs: BTreeMap<i64, RunModel>,
    pools: HashMap<String, Pool>,
    timers: BTreeSet<(Timestamp, i64, String, i64)>,
    pending: Pending,
    seq: u64,
    /// The row of every running attempt, with the pool whose slot it holds.
    running: HashMap<AttemptId, (AttemptRow, String)>,
    interrupt: CancellationToken,
    /// Per scheduled workflow: the last slot considered.
    cursors: HashMap<String, Timestamp>,
    last_schedule_check: Option<Instant>,
    only_run_done: bool,
    queued_in_store: HashMap<String, usize>,
    /// The writer's queue, and what it reports when a commit failed.
    writer: mpsc::UnboundedSender<Batch>,
    writer_failed: CancellationToken,
    writer_error: Arc<std::sync::Mutex<Option<Error>>>,
    /// Runs that could not be loaded (see `unloadable`).
    unloadable: HashSet<i64>,
    /// Each task's template context, per run (see `base_context`).
    contexts: HashMap<(i64, String), minijinja::Value>,
    /// Notifications being sent (awaited before the executor returns).
    notifications: Vec<tokio::task::JoinHandle<()>>,
    /// In a cluster: attempts are handed to the nodes through the store,
    /// and an attempt whose node is silent this long is rescued.
    dispatch: Option<Duration>,
    last_rescue: Option<Instant>,
    /// In a cluster: the node site-bound attempts go to (the sites node,
    /// or this one while there is none).
    lane: Option<String>,
    /// In a cluster on PostgreSQL: woken when a node writes an outcome.
    outcomes: Option<caudal_store::Wakeups>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("holder", &self.holder)
            .field("runs", &self.runs.len())
            .finish_non_exhaustive()
    }
}

fn pool_name(task: &TaskConfig) -> String {
    task.pool.clone().unwrap_or_default()
}

fn priority_key(task: &TaskConfig) -> i64 {
    task.priority.map_or(i64::MAX, i64::from)
}

/// Runs workflow runs until `shutdown` (or, with `only_run`, until that
/// run has ended). Fails with [`ErrorKind::Busy`] when another process is
/// the executor.
pub async fn execute(
    config: Arc<Config>,
    store: Store,
    options: ExecOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    // In a cluster, a dead node's executor lease is taken over once the
    // node has been silent for the cluster's lease, not its whole TTL.
    let nodes_lease = config.cluster.as_ref().map(|c| c.lease.as_std());
    let lease = Lease::acquire_in_cluster(&store, EXECUTOR_LEASE, nodes_lease).await?;
    let holder = holder_id();
    let dispatch_silence = nodes_lease;
    // `caudal workflow run --wait` in a cluster: this process runs
    // attempts too (a daemon's node runs its own worker).
    let local_worker = match (&dispatch_silence, options.only_run) {
        (Some(_), Some(_)) => {
            let stop = shutdown.child_token();
            let handle = tokio::spawn(super::worker::work(
                config.clone(),
                store.clone(),
                holder.clone(),
                stop.clone(),
            ));
            Some((stop, handle))
        }
        _ => None,
    };
    let killed = attempt::kill_orphans(&holder);
    if killed > 0 {
        tracing::warn!(
            processes = killed,
            "killed processes left by an executor that died"
        );
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let http = reqwest::Client::builder()
        .build()
        .map_err(|e| Error::with_source(ErrorKind::Internal, "building the HTTP client", e))?;
    let mut pools = HashMap::new();
    for (name, pool) in &config.pools {
        pools.insert(
            name.clone(),
            Pool {
                slots: pool.slots.max(1),
                used: 0,
                rate: pool.parsed_rate().ok().flatten(),
                starts: VecDeque::new(),
                ready: BTreeSet::new(),
            },
        );
    }
    pools.insert(
        String::new(),
        Pool {
            slots: DEFAULT_POOL_SLOTS,
            used: 0,
            rate: None,
            starts: VecDeque::new(),
            ready: BTreeSet::new(),
        },
    );
    let shared = Shared {
        config: config.clone(),
        store: store.clone(),
        http,
        holder: holder.clone(),
        partners: Arc::default(),
    };
    let interrupt = CancellationToken::new();
    let writer_failed = CancellationToken::new();
    let writer_error = Arc::new(std::sync::Mutex::new(None));
    let writer = start_writer(
        store.clone(),
        holder.clone(),
        shared.clone(),
        interrupt.clone(),
        events_tx.clone(),
        writer_failed.clone(),
        writer_error.clone(),
    );
    let mut ex = Executor {
        shared,
        writer,
        writer_failed,
        writer_error,
        config,
        store,
        holder,
        options,
        env: render::environment(),
        runs: BTreeMap::new(),
        pools,
        timers: BTreeSet::new(),
        pending: Pending::default(),
        seq: 0,
        running: HashMap::new(),
        interrupt,
        cursors: HashMap::new(),
        last_schedule_check: None,
        only_run_done: false,
        queued_in_store: HashMap::new(),
        notifications: Vec::new(),
        contexts: HashMap::new(),
        unloadable: HashSet::new(),
        dispatch: dispatch_silence,
        last_rescue: None,
        lane: None,
        outcomes: None,
    };
    if ex.dispatch.is_some() {
        ex.refresh_lane().await;
        ex.outcomes = match ex.store.dispatch_wakeups(caudal_store::Wake::Ended).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot listen for attempts' outcomes; polling only");
                None
            }
        };
    }
    let lost = lease.lost();
    let result = ex.main_loop(&mut events, &shutdown, &lost).await;
    // Stop what runs: each attempt ends as interrupted and is queued again
    // (attempts the writer has not started yet are not started).
    ex.interrupt.cancel();
    let result = match ex.sync().await {
        Err(e) if result.is_ok() => Err(e),
        _ => result,
    };
    // Attempts handed to nodes go on there; the next executor adopts them.
    if ex.dispatch.is_some() {
        ex.running.clear();
    }
    while !ex.running.is_empty() {
        match tokio::time::timeout(attempt::KILL_GRACE * 3, events.recv()).await {
            Ok(Some(done)) => ex.on_done(done, None),
            _ => break,
        }
    }
    ex.flush();
    if result.is_ok()
        && !lost.is_cancelled()
        && let Err(e) = ex.sync().await
    {
        tracing::warn!(error = %e.report(), "cannot save the tasks interrupted by shutdown; they are recovered at the next start");
    }
    lease.release().await;
    if let Some((stop, handle)) = local_worker {
        stop.cancel();
        let _ = handle.await;
    }
    for sending in ex.notifications.drain(..) {
        let _ = tokio::time::timeout(NOTIFY_WAIT, sending).await;
    }
    result
}

impl Executor {
    async fn main_loop(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Done>,
        shutdown: &CancellationToken,
        lost: &CancellationToken,
    ) -> Result<()> {
        self.poll_store(true).await?;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.step();
            self.flush();
            if self.options.only_run.is_some() && self.only_run_done {
                return Ok(());
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = self.writer_failed.cancelled() => return Err(self.writer_error()),
                () = lost.cancelled() => {
                    return Err(Error::new(ErrorKind::Busy, "the workflow executor lease was lost to another process; stopping"));
                }
                event = events.recv() => {
                    if let Some(event) = event {
                        self.on_done(event, None);
                        while let Ok(event) = events.try_recv() {
                            self.on_done(event, None);
                        }
                    }
                }
                _ = tick.tick() => {
                    self.poll_store(false).await?;
                }
                () = tokio::time::sleep(DISPATCH_POLL), if self.dispatch.is_some() && !self.running.is_empty() => {
                    self.poll_dispatch().await;
                }
                () = super::worker::wake(self.outcomes.as_ref()), if self.dispatch.is_some() => {
                    self.poll_dispatch().await;
                }
                () = sleep_until(wake) => {}
            }
        }
    }

    /// The earliest timer (retry wait, pool rate), if any.
    fn next_wake(&mut self) -> Option<Instant> {
        let now_ts = Timestamp::now();
        let now = Instant::now();
        let timer = self.timers.first().map(|(at, ..)| {
            let left = at.duration_since(now_ts);
            now + Duration::try_from(left).unwrap_or(Duration::ZERO)
        });
        let rate = self
            .pools
            .values_mut()
            .filter(|p| !p.ready.is_empty() && p.used < p.slots)
            .filter_map(|p| p.rate_wait(now))
            .min();
        match (timer, rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// New runs, cancel requests, and (for the daemon) schedules.
    async fn poll_store(&mut self, first: bool) -> Result<()> {
        // What the store says must include what this executor decided.
        self.sync().await?;
        let unfinished = self
            .store
            .workflow_runs(&RunFilter {
                workflow: None,
                unfinished: true,
                limit: 0,
            })
            .await?;
        let mut queued: Vec<WorkflowRunRow> = Vec::new();
        self.queued_in_store.clear();
        for row in unfinished.into_iter().rev() {
            if let Some(only) = self.options.only_run
                && row.id != only
            {
                continue;
            }
            if self.unloadable.contains(&row.id) {
                continue;
            }
            if let Some(run) = self.runs.get(&row.id) {
                if row.cancel_requested && !run.cancel {
                    self.cancel_run(row.id);
                }
                continue;
            }
            match RunState::parse(&row.state) {
                Ok(RunState::Running) => {
                    let id = row.id;
                    let loaded = self.load_run(row).await;
                    self.unloadable(id, loaded);
                }
                Ok(RunState::Queued) => {
                    *self
                        .queued_in_store
                        .entry(row.workflow.clone())
                        .or_default() += 1;
                    queued.push(row);
                }
                _ => {}
            }
        }
        for row in queued {
            let id = row.id;
            let adopted = self.adopt(row).await;
            self.unloadable(id, adopted);
        }
        if let Some(only) = self.options.only_run
            && !first
            && !self.runs.contains_key(&only)
        {
            self.only_run_done = true;
        }
        if self.options.schedules
            && self
                .last_schedule_check
                .is_none_or(|t| t.elapsed() >= SCHEDULE_CHECK)
        {
            self.last_schedule_check = Some(Instant::now());
            self.schedule_runs().await;
        }
        Ok(())
    }

    /// A run that could not be loaded (a row the store cannot give back, a
    /// read that failed) is set aside and logged once: the other runs go on,
    /// and the next start tries it again.
    fn unloadable(&mut self, id: i64, loaded: Result<()>) {
        if let Err(e) = loaded {
            self.runs.remove(&id);
            self.contexts.retain(|k, _| k.0 != id);
            if self.unloadable.insert(id) {
                tracing::error!(run = id, error = %e.report(), "cannot load the workflow run; it is left as it is until the next start");
            }
        }
    }

    /// Takes a queued run: it starts unless its workflow allows no overlap
    /// and another of its runs is running.
    async fn adopt(&mut self, row: WorkflowRunRow) -> Result<()> {
        let overlap = match self.config.workflows.get(&row.workflow) {
            Some(w) => w.overlap,
            None => {
                self.fail_unknown(row);
                return Ok(());
            }
        };
        let busy = self
            .runs
            .values()
            .any(|r| r.row.workflow == row.workflow && r.state == RunState::Running);
        // A run cancelled while it waited ends at once, whatever runs.
        if busy && overlap != Overlap::Allow && !row.cancel_requested {
            return Ok(());
        }
        self.load_run(row).await
    }

    /// Writes a removed workflow's running run's unfinished tasks as
    /// cancelled and its running attempts as lost (kill_orphans stopped
    /// their processes).
    async fn end_rows_of_unknown(&mut self, row: &WorkflowRunRow) -> Result<()> {
        let now = Timestamp::now();
        let mut tasks = self.store.workflow_tasks(row.id).await?;
        tasks.retain(|t| TaskState::parse(&t.state).is_ok_and(|s| !s.is_finished()));
        for t in &mut tasks {
            t.state = TaskState::Cancelled.as_str().to_string();
            t.ended_at = Some(now);
            t.error = Some("its workflow is not in the configuration any more".into());
        }
        let mut attempts = self.store.workflow_attempts(row.id).await?;
        attempts.retain(|a| a.state == AttemptState::Running.as_str());
        for a in &mut attempts {
            a.state = AttemptState::Lost.as_str().to_string();
            a.ended_at = Some(now);
        }
        let _ = self.writer.send(Batch {
            tasks,
            attempts,
            ..Batch::default()
        });
        Ok(())
    }

    fn fail_unknown(&mut self, row: WorkflowRunRow) {
        let id = row.id;
        let row = WorkflowRunRow {
            error: Some(format!(
                "workflow `{}` is not in the configuration any more",
                row.workflow
            )),
            ended_at: Some(Timestamp::now()),
            ..row
        };
        let model = RunModel::new(row, RunState::Failed, WorkflowConfig::default(), Map::new());
        self.runs.insert(id, model);
        self.pending.runs.insert(id);
    }

    /// Runs a run from what the store holds of it: a new run (no tasks
    /// yet), a retried one, or one that was running when its executor
    /// stopped (its running attempts are lost: counted as failed).
    async fn load_run(&mut self, row: WorkflowRunRow) -> Result<()> {
        let Some(workflow) = self.config.workflows.get(&row.workflow).cloned() else {
            if row.state == RunState::Running.as_str() {
                // What it left running ends with it: tasks cancelled,
                // attempts lost.
                self.end_rows_of_unknown(&row).await?;
            }
            self.fail_unknown(row);
            return Ok(());
        };
        let id = row.id;
        self.contexts.retain(|k, _| k.0 != id);
        let was_running = row.state == RunState::Running.as_str();
        let tasks = self.store.workflow_tasks(id).await?;
        let attempts = if was_running {
            self.store.workflow_attempts(id).await?
        } else {
            Vec::new()
        };
        let params = parse_json_object(&row.params);
        let now = Timestamp::now();
        let mut model = RunModel::new(row, RunState::Running, workflow, params);
        model.row.started_at.get_or_insert(now);
        // The run's directory, and its `logs` where every attempt's files
        // go (`$CAUDAL_OUTPUT` among them).
        if let Err(e) = std::fs::create_dir_all(model.dir().join("logs")) {
            tracing::warn!(run = id, dir = %model.row.dir, error = %e, "cannot create the run directory");
        }
        self.runs.insert(id, model);
        let mut rows: BTreeMap<Key, TaskRow> = BTreeMap::new();
        for t in tasks {
            rows.insert((t.task.clone(), t.map_index), t);
        }
        // Tasks without a row (a new run, or a task added to the
        // configuration since) start pending.
        let names: Vec<String> = self.runs[&id].workflow.tasks.keys().cloned().collect();
        for name in &names {
            rows.entry((name.clone(), -1))
                .or_insert_with(|| Instance::new(TaskState::Pending).row(id, &(name.clone(), -1)));
        }
        for (key, row) in rows {
            let mut instance = Instance::from_row(&row)?;
            // A task removed from the configuration (or no longer a
            // fan-out) since the row was written cannot run: it ends
            // cancelled instead of holding the run open.
            let configured = self.runs[&id]
                .task(&key.0)
                .is_some_and(|t| key.1 < 0 || t.for_each.is_some());
            if !configured && !instance.state.is_finished() {
                instance.state = TaskState::Cancelled;
                instance.error = Some("the task is not in the configuration any more".into());
                instance.ended_at = Some(now);
            }
            self.put(id, key, instance);
        }
        // In a cluster, attempts still handed out go on on their nodes:
        // this executor adopts them (their pool slots are taken).
        let handed_out: HashMap<DispatchKey, String> = if was_running && self.dispatch.is_some() {
            self.store
                .open_dispatch(id)
                .await?
                .into_iter()
                .map(|d| (d.key, d.pool))
                .collect()
        } else {
            HashMap::new()
        };
        for mut a in attempts {
            if a.state != AttemptState::Running.as_str() {
                continue;
            }
            let key = (a.task.clone(), a.map_index);
            let attempt_id = AttemptId {
                run_id: id,
                task: a.task.clone(),
                map_index: a.map_index,
                attempt: a.attempt,
            };
            if let Some(pool) = handed_out.get(&key_of(&attempt_id)) {
                if let Some(p) = self.pools.get_mut(pool) {
                    p.used += 1;
                }
                if let Some(i) = self
                    .runs
                    .get_mut(&id)
                    .and_then(|r| r.instances.get_mut(&key))
                {
                    i.stop = Some(CancellationToken::new());
                }
                self.running.insert(attempt_id, (a, pool.clone()));
                continue;
            }
            a.state = AttemptState::Lost.as_str().to_string();
            a.ended_at = Some(now);
            a.error = Some(format!(
                "its executor ({}) stopped while it ran; counted as a failed attempt",
                a.holder
            ));
            self.pending.attempts.insert(
                AttemptId {
                    run_id: id,
                    task: a.task.clone(),
                    map_index: a.map_index,
                    attempt: a.attempt,
                },
                a,
            );
            if self.state_of(id, &key) == Some(TaskState::Running) {
                self.attempt_failed(
                    id,
                    &key,
                    "its process was lost when caudal stopped".into(),
                    now,
                );
            }
        }
        // Queue again what was ready or waiting.
        let keys: Vec<(Key, TaskState)> = self.runs[&id]
            .instances
            .iter()
            .map(|(k, i)| (k.clone(), i.state))
            .collect();
        for (key, state) in keys {
            match state {
                TaskState::Queued => self.enqueue(id, &key),
                TaskState::Retrying => self.arm_timer(id, &key),
                _ => {}
            }
        }
        let fan_out: Vec<String> = self.runs[&id].children.keys().cloned().collect();
        for task in fan_out {
            self.promote_scheduled(id, &task);
        }
        if was_running {
            tracing::info!(run = id, "workflow run recovered after a restart");
        } else {
            tracing::info!(run = id, workflow = %self.runs[&id].row.workflow, "workflow run started");
        }
        self.pending.runs.insert(id);
        if self.runs[&id].row.cancel_requested {
            // Cancelled before it started, or while its executor was down.
            self.cancel_run(id);
        } else {
            self.check_tasks(id, names);
        }
        Ok(())
    }

    /// Puts an instance into its run's model, keeping the counts.
    fn put(&mut self, run_id: i64, key: Key, instance: Instance) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        if !instance.state.is_finished() {
            run.unfinished += 1;
        }
        if key.1 >= 0 {
            run.children.entry(key.0.clone()).or_default().push(key.1);
        }
        run.count_child(&key, None, instance.state);
        tasks_gauge(&run.row.workflow, instance.state, 1.0);
        if let Some(old) = run.instances.insert(key.clone(), instance) {
            tasks_gauge(&run.row.workflow, old.state, -1.0);
            if !old.state.is_finished() {
                run.unfinished -= 1;
            }
        }
        self.pending.tasks.insert((run_id, key));
    }

    fn state_of(&self, run_id: i64, key: &Key) -> Option<TaskState> {
        self.runs.get(&run_id)?.instances.get(key).map(|i| i.state)
    }

    /// Moves an instance to `next`, by the model's rules.
    fn set_state(&mut self, run_id: i64, key: &Key, next: TaskState) -> bool {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return false;
        };
        let Some(instance) = run.instances.get_mut(key) else {
            return false;
        };
        let from = instance.state;
        match from.to(next, &key.0) {
            Ok(next) => {
                instance.state = next;
                if !from.is_finished() && next.is_finished() {
                    run.unfinished -= 1;
                    instance.ended_at = Some(Timestamp::now());
                }
                run.count_child(key, Some(from), next);
                tasks_gauge(&run.row.workflow, from, -1.0);
                tasks_gauge(&run.row.workflow, next, 1.0);
                metrics::counter!("caudal_workflow_task_transitions_total", "workflow" => run.row.workflow.clone(), "state" => next.as_str()).increment(1);
                self.pending.tasks.insert((run_id, key.clone()));
                true
            }
            Err(e) => {
                tracing::error!(run = run_id, error = %e.report(), "refused a task state change");
                false
            }
        }
    }

    /// Re-evaluates tasks (not instances) whose upstream may have changed.
    fn check_tasks(&mut self, run_id: i64, mut names: Vec<String>) {
        while let Some(name) = names.pop() {
            let Some(run) = self.runs.get(&run_id) else {
                return;
            };
            let key = (name.clone(), -1);
            let Some(state) = run.instances.get(&key).map(|i| i.state) else {
                continue;
            };
            let Some(task) = run.task(&name).cloned() else {
                continue;
            };
            if run.cancel {
                continue;
            }
            match state {
                TaskState::Pending => {}
                TaskState::Running if task.for_each.is_some() => {
                    self.finish_parent_if_done(run_id, &name, &mut names);
                    continue;
                }
                _ => continue,
            }
            let upstream: Vec<TaskState> = task
                .depends_on
                .iter()
                .filter_map(|d| run.instances.get(&(d.clone(), -1)).map(|i| i.state))
                .collect();
            match decide(task.trigger_rule, &upstream) {
                Readiness::Wait => {}
                Readiness::Skip => {
                    self.set_state(run_id, &key, TaskState::Skipped);
                    self.end_children(run_id, &name, TaskState::Skipped);
                    names.extend(self.downstream(run_id, &name));
                }
                Readiness::UpstreamFailed => {
                    self.set_state(run_id, &key, TaskState::UpstreamFailed);
                    self.end_children(run_id, &name, TaskState::UpstreamFailed);
                    names.extend(self.downstream(run_id, &name));
                }
                Readiness::Run => {
                    if task.for_each.is_some() {
                        self.expand(run_id, &name, &task, &mut names);
                    } else {
                        self.make_ready(run_id, &key);
                    }
                }
            }
        }
    }

    fn downstream(&self, run_id: i64, name: &str) -> Vec<String> {
        let Some(run) = self.runs.get(&run_id) else {
            return Vec::new();
        };
        run.workflow
            .tasks
            .iter()
            .filter(|(_, t)| t.depends_on.iter().any(|d| d == name))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Instances kept from before a retry of a fan-out that now does not
    /// run (skipped, upstream failed) end with it.
    fn end_children(&mut self, run_id: i64, name: &str, state: TaskState) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let waiting: Vec<Key> = run
            .children
            .get(name)
            .into_iter()
            .flatten()
            .map(|i| (name.to_string(), *i))
            .filter(|k| {
                run.instances
                    .get(k)
                    .is_some_and(|i| i.state == TaskState::Pending)
            })
            .collect();
        for key in waiting {
            self.set_state(run_id, &key, state);
        }
    }

    /// Pending or retrying → queued, into its pool's queue.
    fn make_ready(&mut self, run_id: i64, key: &Key) {
        if self.set_state(run_id, key, TaskState::Queued) {
            if let Some(i) = self
                .runs
                .get_mut(&run_id)
                .and_then(|r| r.instances.get_mut(key))
            {
                i.queued_at = Some(Timestamp::now());
            }
            self.enqueue(run_id, key);
        }
    }

    fn enqueue(&mut self, run_id: i64, key: &Key) {
        let Some(task) = self.runs.get(&run_id).and_then(|r| r.task(&key.0)) else {
            return;
        };
        let pool = pool_name(task);
        let priority = priority_key(task);
        self.seq += 1;
        if let Some(pool) = self.pools.get_mut(&pool) {
            pool.ready.insert(Ready {
                priority,
                run_id,
                seq: self.seq,
                task: key.0.clone(),
                map_index: key.1,
            });
        }
    }

    fn arm_timer(&mut self, run_id: i64, key: &Key) {
        let at = self
            .runs
            .get(&run_id)
            .and_then(|r| r.instances.get(key))
            .and_then(|i| i.not_before)
            .unwrap_or_else(Timestamp::now);
        self.timers.insert((at, run_id, key.0.clone(), key.1));
    }

    /// A fan-out task whose upstream is done: one instance per item (or
    /// chunk), or instances kept from before a retry.
    fn expand(&mut self, run_id: i64, name: &str, task: &TaskConfig, names: &mut Vec<String>) {
        let key = (name.to_string(), -1);
        let existing = self
            .runs
            .get(&run_id)
            .and_then(|r| r.children.get(name))
            .is_some_and(|c| !c.is_empty());
        if existing {
            self.set_state(run_id, &key, TaskState::Running);
            let pending: Vec<Key> = self.runs[&run_id]
                .instances
                .iter()
                .filter(|(k, i)| k.0 == name && k.1 >= 0 && i.state == TaskState::Pending)
                .map(|(k, _)| k.clone())
                .collect();
            for k in pending {
                self.set_state(run_id, &k, TaskState::Scheduled);
            }
            self.promote_scheduled(run_id, name);
            self.finish_parent_if_done(run_id, name, names);
            return;
        }
        let template = task.for_each.clone().unwrap_or_default();
        let base = self.base_context(run_id, name);
        let prepared = Prepared::new(&base, None);
        let items = match render::evaluate(&self.env, "for_each", &template, &prepared) {
            Ok(Value::Array(items)) => items,
            Ok(other) => {
                self.fail_without_attempt(
                    run_id,
                    &key,
                    format!("for_each: must give a list; it gave {other}"),
                );
                names.extend(self.downstream(run_id, name));
                return;
            }
            Err(why) => {
                self.fail_without_attempt(run_id, &key, why);
                names.extend(self.downstream(run_id, name));
                return;
            }
        };
        if items.is_empty() {
            self.set_state(run_id, &key, TaskState::Succeeded);
            names.extend(self.downstream(run_id, name));
            return;
        }
        self.set_state(run_id, &key, TaskState::Running);
        if let Some(i) = self
            .runs
            .get_mut(&run_id)
            .and_then(|r| r.instances.get_mut(&key))
        {
            i.started_at = Some(Timestamp::now());
        }
        let chunk = task.chunk.map(|c| c.max(1) as usize);
        let groups: Vec<Value> = match chunk {
            None => items,
            Some(n) => items.chunks(n).map(|c| Value::Array(c.to_vec())).collect(),
        };
        for (index, item) in groups.into_iter().enumerate() {
            let mut instance = Instance::new(TaskState::Scheduled);
            instance.item = Some(item);
            let index = i64::try_from(index).unwrap_or(i64::MAX);
            self.put(run_id, (name.to_string(), index), instance);
        }
        self.promote_scheduled(run_id, name);
    }

    /// Scheduled instances of a fan-out → queued, up to `max_parallel`
    /// queued, running or retrying.
    fn promote_scheduled(&mut self, run_id: i64, name: &str) {
        loop {
            let Some(run) = self.runs.get_mut(&run_id) else {
                return;
            };
            let limit = run
                .task(name)
                .and_then(|t| t.max_parallel)
                .map_or(usize::MAX, |m| m as usize);
            let active = run.children_active.get(name).copied().unwrap_or(0);
            if active >= limit {
                return;
            }
            let Some(index) = run
                .children_scheduled
                .get_mut(name)
                .and_then(VecDeque::pop_front)
            else {
                return;
            };
            let key = (name.to_string(), index);
            if self.state_of(run_id, &key) == Some(TaskState::Scheduled) {
                self.make_ready(run_id, &key);
            }
        }
    }

    /// A fan-out task whose instances have all ended ends with them.
    fn finish_parent_if_done(&mut self, run_id: i64, name: &str, names: &mut Vec<String>) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let key = (name.to_string(), -1);
        if run.instances.get(&key).map(|i| i.state) != Some(TaskState::Running)
            || run.children_unfinished.get(name).copied().unwrap_or(0) > 0
        {
            return;
        }
        let children = run.children.get(name).cloned().unwrap_or_default();
        let mut results = Vec::new();
        let mut items = Vec::new();
        let mut failed = 0;
        let mut cancelled = 0;
        for index in &children {
            let Some(i) = run.instances.get(&(name.to_string(), *index)) else {
                continue;
            };
            if !i.state.is_finished() {
                return;
            }
            match i.state {
                TaskState::Succeeded | TaskState::Skipped => {}
                TaskState::Cancelled => cancelled += 1,
                _ => failed += 1,
            }
            results.push(Value::Object(i.outputs.clone()));
            items.extend(i.items.iter().cloned());
        }
        let total = children.len();
        let next = if failed > 0 {
            TaskState::Failed
        } else if cancelled > 0 {
            TaskState::Cancelled
        } else {
            TaskState::Succeeded
        };
        if let Some(i) = self
            .runs
            .get_mut(&run_id)
            .and_then(|r| r.instances.get_mut(&key))
        {
            i.outputs = Map::from_iter([("results".to_string(), Value::Array(results))]);
            i.items = items;
            if failed > 0 {
                i.error = Some(format!("{failed} of {total} instances failed"));
            }
        }
        self.set_state(run_id, &key, next);
        names.extend(self.downstream(run_id, name));
    }

    /// Ends a task that cannot start (a template names what does not
    /// exist, its deadline passed).
    fn fail_without_attempt(&mut self, run_id: i64, key: &Key, why: String) {
        tracing::warn!(run = run_id, task = %key.0, index = key.1, error = %why, "task failed");
        if let Some(i) = self
            .runs
            .get_mut(&run_id)
            .and_then(|r| r.instances.get_mut(key))
        {
            i.error = Some(why);
        }
        self.set_state(run_id, key, TaskState::Failed);
    }

    /// What every instance of a task sees, built once per run and task
    /// (its upstream tasks have ended, so it does not change).
    fn base_context(&mut self, run_id: i64, name: &str) -> minijinja::Value {
        let key = (run_id, name.to_string());
        if let Some(v) = self.contexts.get(&key) {
            return v.clone();
        }
        let value = Prepared::base(&self.context(run_id, name));
        self.contexts.insert(key, value.clone());
        value
    }

    fn context(&self, run_id: i64, name: &str) -> Context {
        let Some(run) = self.runs.get(&run_id) else {
            return Context::default();
        };
        let mut tasks = Map::new();
        let mut stack: Vec<&str> = run
            .task(name)
            .map(|t| t.depends_on.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let mut seen = HashSet::new();
        while let Some(up) = stack.pop() {
            if !seen.insert(up) {
                continue;
            }
            if let Some(i) = run.instances.get(&(up.to_string(), -1)) {
                let mut result = Map::new();
                result.insert("state".into(), Value::from(i.state.as_str()));
                result.insert("outputs".into(), Value::Object(i.outputs.clone()));
                result.insert("items".into(), Value::Array(i.items.clone()));
                if let Some(r) = i.outputs.get("results") {
                    result.insert("results".into(), r.clone());
                }
                tasks.insert(up.to_string(), Value::Object(result));
            }
            if let Some(t) = run.task(up) {
                stack.extend(t.depends_on.iter().map(String::as_str));
            }
        }
        let mut params = Map::new();
        for (k, v) in &run.workflow.params {
            params.insert(k.clone(), v.clone());
        }
        for (k, v) in &run.params {
            params.insert(k.clone(), v.clone());
        }
        let mut r = Map::new();
        r.insert("id".into(), Value::from(run.row.id));
        r.insert("batch_id".into(), Value::from(run.row.batch_id.clone()));
        r.insert("dir".into(), Value::from(run.row.dir.clone()));
        r.insert(
            "triggered_by".into(),
            Value::from(run.row.triggered_by.clone()),
        );
        let logical = run.row.logical_date.unwrap_or(run.row.created_at);
        r.insert("logical_date".into(), Value::from(logical.to_string()));
        r.insert(
            "date".into(),
            Value::from(logical.strftime("%Y-%m-%d").to_string()),
        );
        Context {
            params,
            run: r,
            workflow: run.row.workflow.clone(),
            tasks,
        }
    }

    /// What a fan-out instance adds to its task's context.
    fn instance_context(&self, run_id: i64, key: &Key) -> Option<render::Instance> {
        if key.1 < 0 {
            return None;
        }
        let run = self.runs.get(&run_id)?;
        let i = run.instances.get(key)?;
        let item = i.item.clone().unwrap_or(Value::Null);
        let chunked = run.task(&key.0).and_then(|t| t.chunk).is_some();
        Some(match (&item, chunked) {
            (Value::Array(list), true) => render::Instance {
                item: list.first().cloned().unwrap_or(Value::Null),
                items: item.clone(),
                index: key.1,
            },
            _ => render::Instance {
                items: Value::Array(vec![item.clone()]),
                item,
                index: key.1,
            },
        })
    }

    /// Moves time-driven states and starts what the pools allow.
    fn step(&mut self) {
        let now = Timestamp::now();
        while let Some(first) = self.timers.first().cloned() {
            if first.0 > now {
                break;
            }
            self.timers.pop_first();
            let (_, run_id, task, index) = first;
            let key = (task, index);
            if self.state_of(run_id, &key) == Some(TaskState::Retrying) {
                self.make_ready(run_id, &key);
            }
        }
        let instant = Instant::now();
        let pool_names: Vec<String> = self.pools.keys().cloned().collect();
        for name in pool_names {
            while let Some(pool) = self.pools.get_mut(&name) {
                if pool.used >= pool.slots || pool.ready.is_empty() {
                    break;
                }
                if pool.rate_wait(instant).is_some() {
                    break;
                }
                let Some(entry) = pool.ready.pop_first() else {
                    break;
                };
                let key = (entry.task.clone(), entry.map_index);
                if self.state_of(entry.run_id, &key) != Some(TaskState::Queued) {
                    continue;
                }
                self.start(entry.run_id, &key, &name);
            }
        }
        // Runs that have ended.
        let ended: Vec<i64> = self
            .runs
            .iter()
            .filter(|(_, r)| r.state == RunState::Running && r.unfinished == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            self.end_run(id);
        }
    }

    /// Starts one attempt of a queued instance.
    fn start(&mut self, run_id: i64, key: &Key, pool: &str) {
        let now = Timestamp::now();
        let base = self.base_context(run_id, &key.0);
        match self.prepare(run_id, key, now, &base) {
            Ok(Some(prepared)) => {
                let priority = self
                    .runs
                    .get(&run_id)
                    .and_then(|r| r.task(&key.0))
                    .map_or(i64::MAX, priority_key);
                self.launch(run_id, key, pool, priority, now, prepared);
            }
            Ok(None) => {}
            Err(why) => {
                self.fail_without_attempt(run_id, key, why);
                let names = self.after_end(run_id, key);
                self.check_tasks(run_id, names);
            }
        }
    }

    /// Renders what an attempt runs, and its time limit.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        run_id: i64,
        key: &Key,
        now: Timestamp,
        base: &minijinja::Value,
    ) -> std::result::Result<
        Option<(
            Work,
            Option<Duration>,
            &'static str,
            Option<(PathBuf, Option<String>)>,
        )>,
        String,
    > {
        let Some(run) = self.runs.get(&run_id) else {
            return Ok(None);
        };
        let Some(task) = run.task(&key.0) else {
            return Err("the task is not in the configuration any more".into());
        };
        let first_start = run
            .instances
            .get(key)
            .and_then(|i| i.started_at)
            .unwrap_or(now);
        // The deadline counts from the first attempt's start.
        let mut timeout = task.timeout.map(|t| t.as_std());
        let mut cause = "timeout";
        if let Some(deadline) = task.deadline {
            let used = Duration::try_from(now.duration_since(first_start)).unwrap_or_default();
            let Some(left) = deadline.as_std().checked_sub(used).filter(|l| !l.is_zero()) else {
                return Err(format!(
                    "its deadline ({deadline}) passed before another attempt could start"
                ));
            };
            if timeout.is_none_or(|t| left < t) {
                timeout = Some(left);
                cause = "deadline";
            }
        }
        let instance = self.instance_context(run_id, key);
        let prepared = Prepared::new(base, instance.as_ref());
        let work = self.render_work(run, task, &prepared)?;
        let items_from = match &task.items_from {
            None => None,
            Some(t) => {
                let path = render::render(&self.env, "items_from", t, &prepared)?;
                let base = match &work {
                    Work::Command { cwd, .. } => cwd.clone(),
                    _ => self.config.config_dir(),
                };
                Some((base.join(path), task.items_column.clone()))
            }
        };
        Ok(Some((work, timeout, cause, items_from)))
    }

    #[allow(clippy::type_complexity)]
    fn launch(
        &mut self,
        run_id: i64,
        key: &Key,
        pool: &str,
        priority: i64,
        now: Timestamp,
        (work, timeout, cause, items_from): (
            Work,
            Option<Duration>,
            &'static str,
            Option<(PathBuf, Option<String>)>,
        ),
    ) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let dir = run.dir();
        let workflow = run.row.workflow.clone();
        let queued_at = run.instances.get(key).and_then(|i| i.queued_at);
        if !self.set_state(run_id, key, TaskState::Running) {
            return;
        }
        let stop = CancellationToken::new();
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let Some(instance) = run.instances.get_mut(key) else {
            return;
        };
        instance.attempts += 1;
        instance.started_at.get_or_insert(now);
        instance.stop = Some(stop.clone());
        let attempt = instance.attempts;
        if let Some(q) = queued_at {
            let waited = now.duration_since(q).as_secs_f64().max(0.0);
            metrics::histogram!("caudal_workflow_task_queued_seconds", "workflow" => workflow.clone(), "pool" => display_pool(pool)).record(waited);
        }
        if let Some(p) = self.pools.get_mut(pool) {
            p.used += 1;
            if p.rate.is_some() {
                p.starts.push_back(Instant::now());
            }
            metrics::gauge!("caudal_workflow_pool_slots_used", "pool" => display_pool(pool))
                .set(f64::from(p.used));
        }
        let id = AttemptId {
            run_id,
            task: key.0.clone(),
            map_index: key.1,
            attempt,
        };
        let row = AttemptRow {
            run_id,
            task: key.0.clone(),
            map_index: key.1,
            attempt,
            holder: self.holder.clone(),
            pid: None,
            state: AttemptState::Running.as_str().to_string(),
            exit_code: None,
            error: None,
            stderr_tail: None,
            started_at: now,
            ended_at: None,
        };
        self.pending.attempts.insert(id.clone(), row.clone());
        self.running.insert(id.clone(), (row, pool.to_string()));
        let spec = Spec {
            files: Files::new(&dir, &key.0, key.1, attempt),
            id,
            work,
            timeout,
            timeout_cause: cause.to_string(),
            items_from,
        };
        if self.dispatch.is_some() {
            self.hand_out(spec, pool, priority);
        } else {
            self.pending.spawn.push((spec, stop));
        }
    }

    /// In a cluster: writes the attempt for any node to claim (with this
    /// turn's rows). Site-bound attempts (crawls, commands with `site`)
    /// stay on this node, so each site's limits hold in one process.
    fn hand_out(&mut self, spec: Spec, pool: &str, priority: i64) {
        let site_bound = match &spec.work {
            Work::Crawl { .. } => true,
            Work::Command { site, .. } => site.is_some(),
            // A run of a crawl pipeline crawls too.
            Work::Pipeline { name } => self
                .config
                .pipelines
                .get(name)
                .and_then(|p| self.config.sources.get(&p.source))
                .is_some_and(|s| s.crawl().is_some()),
            Work::Http { .. } | Work::PartnerHttp { .. } => false,
        };
        let text = match serde_json::to_string(&spec) {
            Ok(t) => t,
            Err(e) => {
                let done = Done {
                    id: spec.id.clone(),
                    ending: Ending::Failed,
                    exit_code: None,
                    pid: None,
                    error: Some(format!("cannot hand the attempt to a node: {e}")),
                    stderr_tail: None,
                    outputs: Map::new(),
                    items: Vec::new(),
                    elapsed: Duration::ZERO,
                };
                self.on_done(done, None);
                return;
            }
        };
        self.seq += 1;
        self.pending.dispatch.new.push(NewDispatch {
            key: key_of(&spec.id),
            pool: pool.to_string(),
            priority,
            seq: i64::try_from(self.seq).unwrap_or(i64::MAX),
            lane: if site_bound {
                self.lane.clone().unwrap_or_else(|| self.holder.clone())
            } else {
                String::new()
            },
            spec: text,
        });
    }

    /// In a cluster: follows the sites node; site-bound attempts not yet
    /// claimed move to it when it changes.
    async fn refresh_lane(&mut self) {
        let sites = match self.store.leases(crate::cluster::SITES_LEASE).await {
            Ok(rows) => rows
                .into_iter()
                .find(|l| l.name == crate::cluster::SITES_LEASE && l.held)
                .map(|l| l.holder),
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot read which node is the sites node");
                return;
            }
        };
        let lane = sites.unwrap_or_else(|| self.holder.clone());
        // Every time, not only when the sites node changed: rows written
        // with the old lane may have been committed since.
        match self
            .store
            .relane_dispatch(EXECUTOR_LEASE, &self.holder, &lane)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(attempts = n, node = %lane, "site-bound workflow attempts move to the sites node");
            }
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot move site-bound workflow attempts");
                return;
            }
        }
        if self.lane.as_deref() != Some(lane.as_str())
            && let Ok(busy) = self.store.lane_claims_elsewhere(&lane).await
            && !busy.is_empty()
        {
            let busy: Vec<String> = busy.iter().map(|(n, c)| format!("{n} ({c})")).collect();
            tracing::warn!(node = %lane, running_on = %busy.join(", "), "the sites node changed: its site-bound workflow attempts wait until the previous sites node's running ones end (or are rescued)");
        }
        self.lane = Some(lane);
    }

    /// In a cluster: takes the outcomes nodes wrote, and every so often
    /// rescues the attempts of nodes gone silent.
    async fn poll_dispatch(&mut self) {
        let Some(silence) = self.dispatch else {
            return;
        };
        if self.last_rescue.is_none_or(|t| t.elapsed() >= RESCUE_CHECK) {
            self.last_rescue = Some(Instant::now());
            self.refresh_lane().await;
            match self
                .store
                .rescue_dispatch(EXECUTOR_LEASE, &self.holder, silence)
                .await
            {
                Ok(rescued) => {
                    for (key, node) in rescued {
                        metrics::counter!("caudal_workflow_attempts_rescued_total").increment(1);
                        tracing::warn!(run = key.run_id, task = %key.task, index = key.map_index, attempt = key.attempt, node = node.as_deref().unwrap_or("?"), "a workflow attempt's node went silent; the attempt counts as failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.report(), "cannot rescue the attempts of silent nodes")
                }
            }
        }
        let finished = match self
            .store
            .finished_dispatch(DISPATCH_READ, self.options.only_run)
            .await
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot read the outcomes of workflow attempts");
                return;
            }
        };
        for f in finished {
            let id = AttemptId {
                run_id: f.key.run_id,
                task: f.key.task.clone(),
                map_index: f.key.map_index,
                attempt: f.key.attempt,
            };
            if !self.running.contains_key(&id) {
                // A row of a run this executor has loaded but no longer
                // waits for (its attempt was settled already) is stale;
                // another run's row is left for the executor that runs it.
                if self.runs.contains_key(&f.key.run_id) {
                    self.pending.dispatch.forget.push(f.key.clone());
                }
                continue;
            }
            self.pending.dispatch.forget.push(f.key.clone());
            let node = f.node.clone();
            let done = match f.outcome.as_deref().map(serde_json::from_str::<Done>) {
                Some(Ok(done)) => done,
                Some(Err(e)) => lost(id, format!("its outcome cannot be read ({e})")),
                None => lost(
                    id,
                    format!(
                        "its node ({}) went silent for {} while it ran; counted as a failed attempt",
                        node.as_deref().unwrap_or("?"),
                        caudal_core::units::Duration(silence)
                    ),
                ),
            };
            self.on_done(done, node);
        }
    }

    fn render_work(
        &self,
        run: &RunModel,
        task: &TaskConfig,
        ctx: &Prepared,
    ) -> std::result::Result<Work, String> {
        let r = |field: &str, t: &str| render::render(&self.env, field, t, ctx);
        Ok(match task.kind {
            TaskType::Command => {
                let mut args = Vec::with_capacity(task.run.len());
                for (i, arg) in task.run.iter().enumerate() {
                    args.extend(render::arguments(
                        &self.env,
                        &format!("run[{i}]"),
                        arg,
                        ctx,
                    )?);
                }
                if args.is_empty() {
                    return Err("run: no program".into());
                }
                let program = args.remove(0);
                let base = self.config.config_dir();
                let cwd = match &task.cwd {
                    Some(c) => base.join(r("cwd", c)?),
                    None => base,
                };
                let mut env = Vec::new();
                for (k, v) in &task.env {
                    env.push((k.clone(), r(&format!("env.{k}"), v)?));
                }
                env.push(("CAUDAL_RUN_DIR".into(), run.row.dir.clone()));
                env.push(("CAUDAL_BATCH_ID".into(), run.row.batch_id.clone()));
                env.push(("CAUDAL_WORKFLOW".into(), run.row.workflow.clone()));
                Work::Command {
                    program,
                    args,
                    cwd,
                    env,
                    skip_exit_code: task.skip_exit_code,
                    site: task.site.clone(),
                }
            }
            TaskType::Crawl => {
                let mut start = Vec::new();
                for (i, u) in task.start_urls.iter().enumerate() {
                    start.push(r(&format!("start_urls[{i}]"), u)?);
                }
                if let Some(from) = &task.urls_from {
                    match render::evaluate(&self.env, "urls_from", from, ctx)? {
                        Value::Array(list) => {
                            for v in list {
                                match v {
                                    Value::String(s) => start.push(s),
                                    Value::Object(o) => match o.get("url") {
                                        Some(Value::String(s)) => start.push(s.clone()),
                                        _ => {
                                            return Err(
                                                "urls_from: an item is an object without a \"url\" string"
                                                    .into(),
                                            );
                                        }
                                    },
                                    other => {
                                        return Err(format!(
                                            "urls_from: an item is {other}, not a URL"
                                        ));
                                    }
                                }
                            }
                        }
                        other => {
                            return Err(format!("urls_from: expected a list of URLs, got {other}"));
                        }
                    }
                }
                let own = !task.start_urls.is_empty() || task.urls_from.is_some();
                Work::Crawl {
                    source: task.source.clone().unwrap_or_default(),
                    start: own.then_some(start),
                    file: PathBuf::from(&run.row.dir),
                }
            }
            TaskType::Http => {
                let url = r("url", task.url.as_deref().unwrap_or_default())?;
                let mut headers = Vec::new();
                for (k, v) in &task.headers {
                    headers.push((k.clone(), r(&format!("headers.{k}"), v)?));
                }
                let body = match &task.body {
                    Some(b) => Some(r("body", b)?),
                    None => None,
                };
                let method = task
                    .method
                    .clone()
                    .unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_string());
                if task.auth.is_some() || task.tls.is_some() {
                    Work::PartnerHttp {
                        method,
                        url,
                        headers,
                        body,
                        workflow: run.row.workflow.clone(),
                    }
                } else {
                    Work::Http {
                        method,
                        url,
                        headers,
                        body,
                    }
                }
            }
            TaskType::Pipeline => Work::Pipeline {
                name: task.pipeline.clone().unwrap_or_default(),
            },
        })
    }

    /// What to check after an instance ended: its parent (fan-out) or its
    /// downstream tasks.
    fn after_end(&mut self, run_id: i64, key: &Key) -> Vec<String> {
        if key.1 >= 0 {
            self.promote_scheduled(run_id, &key.0);
            vec![key.0.clone()]
        } else {
            self.downstream(run_id, &key.0)
        }
    }

    /// An attempt ended (on `node`, when another node ran it).
    fn on_done(&mut self, done: Done, node: Option<String>) {
        let now = Timestamp::now();
        let id = done.id.clone();
        let key = (id.task.clone(), id.map_index);
        let run_id = id.run_id;
        let Some((mut row, pool)) = self.running.remove(&id) else {
            return;
        };
        // The slot is given back first, whatever else is found.
        if let Some(p) = self.pools.get_mut(&pool) {
            p.used = p.used.saturating_sub(1);
            metrics::gauge!("caudal_workflow_pool_slots_used", "pool" => display_pool(&pool))
                .set(f64::from(p.used));
        }
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let workflow = run.row.workflow.clone();
        let state = match done.ending {
            Ending::Succeeded => AttemptState::Succeeded,
            Ending::Skipped => AttemptState::Skipped,
            Ending::Failed => AttemptState::Failed,
            Ending::TimedOut => AttemptState::TimedOut,
            Ending::Cancelled | Ending::Interrupted => AttemptState::Cancelled,
            Ending::Lost => AttemptState::Lost,
        };
        if let Some(node) = node {
            row.holder = node;
        }
        metrics::counter!("caudal_workflow_attempts_total", "workflow" => workflow.clone(), "task" => key.0.clone(), "outcome" => state.as_str()).increment(1);
        metrics::histogram!("caudal_workflow_attempt_duration_seconds", "workflow" => workflow, "task" => key.0.clone()).record(done.elapsed.as_secs_f64());
        row.state = state.as_str().to_string();
        row.pid = done.pid.map(i64::from);
        row.exit_code = done.exit_code;
        row.error = done.error.clone();
        row.stderr_tail = done.stderr_tail.clone();
        row.ended_at = Some(now);
        self.pending.attempts.insert(id.clone(), row);
        if let Some(i) = self
            .runs
            .get_mut(&run_id)
            .and_then(|r| r.instances.get_mut(&key))
        {
            i.stop = None;
        }
        if self.state_of(run_id, &key) != Some(TaskState::Running) {
            return;
        }
        // Stopped by its node (cut off from the store) rather than by a
        // cancel of its run: it runs again, as an interrupted attempt.
        let cancelling = self.runs.get(&run_id).is_some_and(|r| r.cancel);
        let ending = match done.ending {
            Ending::Cancelled if !cancelling => Ending::Interrupted,
            e => e,
        };
        match ending {
            Ending::Succeeded => {
                if let Some(i) = self
                    .runs
                    .get_mut(&run_id)
                    .and_then(|r| r.instances.get_mut(&key))
                {
                    i.outputs = done.outputs;
                    i.items = done.items;
                    i.error = None;
                }
                self.set_state(run_id, &key, TaskState::Succeeded);
            }
            Ending::Skipped | Ending::Cancelled => {
                if let Some(i) = self
                    .runs
                    .get_mut(&run_id)
                    .and_then(|r| r.instances.get_mut(&key))
                {
                    i.error = done.error;
                }
                let next = if done.ending == Ending::Skipped {
                    TaskState::Skipped
                } else {
                    TaskState::Cancelled
                };
                self.set_state(run_id, &key, next);
            }
            Ending::Interrupted => {
                if self.set_state(run_id, &key, TaskState::Queued) {
                    self.enqueue(run_id, &key);
                }
                return;
            }
            Ending::Failed | Ending::TimedOut | Ending::Lost => {
                let why = done.error.unwrap_or_else(|| "failed".into());
                if self.attempt_failed(run_id, &key, why, now) {
                    return;
                }
            }
        }
        let names = self.after_end(run_id, &key);
        self.check_tasks(run_id, names);
    }

    /// Counts a failed attempt: retrying (true) or failed for good.
    fn attempt_failed(&mut self, run_id: i64, key: &Key, why: String, now: Timestamp) -> bool {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return false;
        };
        let Some(policy) = run.task(&key.0).map(TaskConfig::retry_policy) else {
            return false;
        };
        let cancel = run.cancel;
        let Some(i) = run.instances.get_mut(key) else {
            return false;
        };
        i.failures += 1;
        i.error = Some(why);
        let since =
            Duration::try_from(now.duration_since(i.started_at.unwrap_or(now))).unwrap_or_default();
        if cancel || policy.should_give_up(i.failures, since) {
            self.set_state(run_id, key, TaskState::Failed);
            if key.1 < 0 {
                // Downstream is checked by the caller.
            }
            return false;
        }
        let wait = retry_wait(&policy, i.failures);
        i.not_before = Some(
            now.checked_add(jiff::SignedDuration::try_from(wait).unwrap_or_default())
                .unwrap_or(now),
        );
        self.set_state(run_id, key, TaskState::Retrying);
        self.arm_timer(run_id, key);
        true
    }

    /// Cancels a run: running attempts are stopped, the rest cancelled.
    fn cancel_run(&mut self, run_id: i64) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        run.cancel = true;
        let keys: Vec<(Key, TaskState)> = run
            .instances
            .iter()
            .map(|(k, i)| (k.clone(), i.state))
            .collect();
        for (key, state) in keys {
            match state {
                TaskState::Running => {
                    if let Some(stop) = self
                        .runs
                        .get(&run_id)
                        .and_then(|r| r.instances.get(&key))
                        .and_then(|i| i.stop.clone())
                    {
                        stop.cancel();
                        if self.dispatch.is_some()
                            && let Some(i) =
                                self.runs.get(&run_id).and_then(|r| r.instances.get(&key))
                        {
                            let id = AttemptId {
                                run_id,
                                task: key.0.clone(),
                                map_index: key.1,
                                attempt: i.attempts,
                            };
                            // What it ends with if no node has claimed it.
                            let mut unclaimed = lost(id.clone(), "cancelled".into());
                            unclaimed.ending = Ending::Cancelled;
                            let outcome = serde_json::to_string(&unclaimed).unwrap_or_default();
                            self.pending.dispatch.cancel.push((key_of(&id), outcome));
                        }
                    } else if key.1 < 0 {
                        // A fan-out parent: it ends when its instances do.
                        self.set_state(run_id, &key, TaskState::Cancelled);
                    }
                }
                s if !s.is_finished() => {
                    self.set_state(run_id, &key, TaskState::Cancelled);
                }
                _ => {}
            }
        }
        tracing::info!(run = run_id, "workflow run cancelled");
    }

    fn end_run(&mut self, run_id: i64) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut failed = Vec::new();
        let mut any_cancelled = false;
        for (key, i) in &run.instances {
            *counts.entry(i.state.as_str()).or_default() += 1;
            match i.state {
                TaskState::Failed => failed.push((key.clone(), i.error.clone())),
                TaskState::UpstreamFailed if key.1 < 0 => {
                    failed.push((key.clone(), i.error.clone()));
                }
                TaskState::Cancelled => any_cancelled = true,
                _ => {}
            }
        }
        let state = if run.cancel || (any_cancelled && failed.is_empty()) {
            RunState::Cancelled
        } else if failed.is_empty() {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        run.state = state;
        run.row.ended_at = Some(Timestamp::now());
        if state == RunState::Failed {
            let names: Vec<String> = failed
                .iter()
                .filter(|(k, _)| k.1 < 0)
                .map(|(k, _)| k.0.clone())
                .collect();
            run.row.error = Some(format!("failed tasks: {}", names.join(", ")));
        }
        self.pending.runs.insert(run_id);
        metrics::counter!("caudal_workflow_runs_total", "workflow" => run.row.workflow.clone(), "state" => state.as_str()).increment(1);
        tracing::info!(run = run_id, workflow = %run.row.workflow, state = %state, "workflow run ended");
        if let Some(notify) = run.workflow.notify.clone() {
            let wanted = match notify.on {
                NotifyOn::Always => true,
                NotifyOn::Failure => state != RunState::Succeeded,
                NotifyOn::Success => state == RunState::Succeeded,
            };
            if wanted {
                let summary = serde_json::json!({
                    "workflow": run.row.workflow,
                    "run_id": run.row.id,
                    "batch_id": run.row.batch_id,
                    "state": state.as_str(),
                    "triggered_by": run.row.triggered_by,
                    "started_at": run.row.started_at.map(|t| t.to_string()),
                    "ended_at": run.row.ended_at.map(|t| t.to_string()),
                    "tasks": counts,
                    "failed": failed.iter().map(|(k, e)| serde_json::json!({
                        "task": k.0, "map_index": k.1, "error": e,
                    })).collect::<Vec<_>>(),
                    "dir": run.row.dir,
                });
                let http = self.shared.http.clone();
                self.notifications.retain(|n| !n.is_finished());
                self.notifications
                    .push(tokio::spawn(super::notify(http, notify, summary)));
            }
        }
    }

    /// Hands the turn's changes (and the attempts to start after them) to
    /// the writer, then forgets ended runs.
    fn flush(&mut self) {
        if self.pending.tasks.is_empty()
            && self.pending.attempts.is_empty()
            && self.pending.runs.is_empty()
            && self.pending.dispatch.is_empty()
        {
            return;
        }
        let tasks: Vec<TaskRow> = self
            .pending
            .tasks
            .drain()
            .filter_map(|(run_id, key)| {
                self.runs
                    .get(&run_id)
                    .and_then(|r| r.instances.get(&key))
                    .map(|i| i.row(run_id, &key))
            })
            .collect();
        let attempts: Vec<AttemptRow> = self.pending.attempts.drain().map(|(_, a)| a).collect();
        let runs: Vec<RunChange> = self
            .pending
            .runs
            .drain()
            .filter_map(|id| self.runs.get(&id))
            .map(|r| RunChange {
                id: r.row.id,
                state: r.state.as_str().to_string(),
                started_at: r.row.started_at,
                ended_at: r.row.ended_at,
                error: r.row.error.clone(),
            })
            .collect();
        let batch = Batch {
            tasks,
            attempts,
            runs,
            dispatch: std::mem::take(&mut self.pending.dispatch),
            spawn: std::mem::take(&mut self.pending.spawn),
            ack: None,
        };
        // A closed writer has failed: the loop stops on `writer_failed`.
        let _ = self.writer.send(batch);
        let ended: Vec<i64> = self
            .runs
            .iter()
            .filter(|(_, r)| r.state.is_finished())
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(run) = self.runs.get(&id) {
                for i in run.instances.values() {
                    tasks_gauge(&run.row.workflow, i.state, -1.0);
                }
            }
            self.runs.remove(&id);
            self.timers.retain(|t| t.1 != id);
            self.contexts.retain(|k, _| k.0 != id);
            if self.options.only_run == Some(id) {
                self.only_run_done = true;
            }
        }
    }

    /// Waits until everything handed to the writer is committed.
    async fn sync(&mut self) -> Result<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let batch = Batch {
            ack: Some(ack),
            ..Batch::default()
        };
        if self.writer.send(batch).is_err() {
            return Err(self.writer_error());
        }
        tokio::select! {
            r = done => r.map_err(|_| self.writer_error()),
            () = self.writer_failed.cancelled() => Err(self.writer_error()),
        }
    }

    fn writer_error(&self) -> Error {
        self.writer_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| Error::new(ErrorKind::Store, "the workflow state writer stopped"))
    }

    /// Creates the runs the schedules call for.
    async fn schedule_runs(&mut self) {
        let now = Timestamp::now();
        let scheduled: Vec<(String, WorkflowConfig)> = self
            .config
            .workflows
            .iter()
            .filter(|(_, w)| w.schedule.is_some())
            .map(|(n, w)| (n.clone(), w.clone()))
            .collect();
        for (name, workflow) in scheduled {
            if let Err(e) = self.schedule_one(&name, &workflow, now).await {
                tracing::warn!(workflow = %name, error = %e.report(), "cannot schedule the workflow");
            }
        }
    }

    async fn schedule_one(
        &mut self,
        name: &str,
        workflow: &WorkflowConfig,
        now: Timestamp,
    ) -> Result<()> {
        let Some(config) = &workflow.schedule else {
            return Ok(());
        };
        let schedule = Schedule::from_config(&config.as_pipeline_schedule())?;
        let cursor = match self.cursors.get(name) {
            Some(c) => Some(*c),
            None => self.store.last_scheduled_workflow_run(name).await?,
        };
        let due = due_slots(&schedule, cursor, now)?;
        let Some(latest) = due.last().copied() else {
            return Ok(());
        };
        let slots = slots_to_run(&due, now, workflow.catchup);
        if slots.len() < due.len() {
            tracing::info!(
                workflow = name,
                missed = due.len() - slots.len(),
                catchup = ?workflow.catchup,
                "missed scheduled runs not run"
            );
        }
        // What was there before this tick's runs.
        let running = self
            .runs
            .values()
            .any(|r| r.row.workflow == name && !r.state.is_finished());
        let queued = self.queued_in_store.get(name).copied().unwrap_or(0);
        for slot in slots {
            // Missed runs caught up with `catchup = "all"` are all queued
            // (they run one after the other); overlap decides about the
            // latest one, against a run that is still going.
            let create = match workflow.overlap {
                _ if slot != latest => true,
                Overlap::Allow => true,
                Overlap::Skip => !running && queued == 0,
                Overlap::QueueOne => queued == 0,
            };
            if !create {
                tracing::info!(workflow = name, slot = %slot, overlap = ?workflow.overlap, "scheduled run skipped: the previous run has not ended");
                metrics::counter!("caudal_workflow_runs_skipped_total", "workflow" => name.to_string()).increment(1);
                self.cursors.insert(name.to_string(), slot);
                continue;
            }
            let row = super::create_run(
                &self.store,
                &self.config,
                name,
                "schedule",
                Some(slot),
                Map::new(),
            )
            .await?;
            *self.queued_in_store.entry(name.to_string()).or_default() += 1;
            // The cursor moves with each run created, so a store error
            // halfway neither loses nor repeats a time.
            self.cursors.insert(name.to_string(), slot);
            tracing::info!(workflow = name, run = row.id, slot = %slot, "scheduled run queued");
        }
        self.cursors.insert(name.to_string(), latest);
        Ok(())
    }
}

/// How late a schedule time may be and still count as on time (not
/// missed): the executor checks schedules every second, and may be busy.
const ON_TIME: Duration = Duration::from_secs(10);

/// The schedule times due after `cursor` (the last one considered) up to
/// `now`, oldest first. Without a cursor (a new workflow), an interval
/// schedule is due at once and a cron schedule at its next time.
fn due_slots(
    schedule: &Schedule,
    cursor: Option<Timestamp>,
    now: Timestamp,
) -> Result<Vec<Timestamp>> {
    let mut due = Vec::new();
    let mut next = match cursor {
        Some(c) => schedule.next_fire_after(c)?,
        None => match schedule {
            Schedule::Every(_) => now,
            _ => schedule.next_fire_after(now)?,
        },
    };
    while next <= now && due.len() < MAX_CATCHUP {
        due.push(next);
        next = schedule.next_fire_after(next)?;
    }
    Ok(due)
}

/// Which of the due times get a run: `all` of them, the `last`, or
/// (`none`) the last only if it is on time — after downtime, none.
fn slots_to_run(due: &[Timestamp], now: Timestamp, catchup: Catchup) -> Vec<Timestamp> {
    let on_time = |t: &&Timestamp| {
        Duration::try_from(now.duration_since(**t)).map_or(true, |late| late <= ON_TIME)
    };
    match catchup {
        Catchup::All => due.to_vec(),
        Catchup::Last => due.last().copied().into_iter().collect(),
        Catchup::None => due.last().filter(on_time).copied().into_iter().collect(),
    }
}

/// Moves the `caudal_workflow_tasks` gauge of `state` by `delta`.
/// The ending of an attempt its node did not report.
fn lost(id: AttemptId, why: String) -> Done {
    Done {
        id,
        ending: Ending::Lost,
        exit_code: None,
        pid: None,
        error: Some(why),
        stderr_tail: None,
        outputs: Map::new(),
        items: Vec::new(),
        elapsed: Duration::ZERO,
    }
}

fn tasks_gauge(workflow: &str, state: TaskState, delta: f64) {
    metrics::gauge!("caudal_workflow_tasks", "workflow" => workflow.to_string(), "state" => state.as_str())
        .increment(delta);
}

fn display_pool(pool: &str) -> String {
    if pool.is_empty() {
        "default".into()
    } else {
        pool.to_string()
    }
}

/// The wait before the retry after `failures` failed attempts.
fn retry_wait(policy: &RetryPolicy, failures: u32) -> Duration {
    policy.delay(failures.saturating_sub(1), None, &mut rand::rng())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("a time")
    }

    #[test]
    fn due_times_after_downtime_and_for_new_workflows() {
        let every = Schedule::Every(Duration::from_secs(60));
        let due = due_slots(&every, Some(at(0)), at(250)).expect("due");
        assert_eq!(due, [at(60), at(120), at(180), at(240)]);
        assert!(
            due_slots(&every, Some(at(0)), at(59))
                .expect("due")
                .is_empty()
        );
        assert_eq!(due_slots(&every, None, at(5)).expect("due"), [at(5)]);
    }

    #[test]
    fn catchup_policies() {
        let due = [at(60), at(120), at(180), at(240)];
        assert_eq!(slots_to_run(&due, at(250), Catchup::All), due);
        assert_eq!(slots_to_run(&due, at(250), Catchup::Last), [at(240)]);
        // 10 s late is on time; later is missed.
        assert_eq!(slots_to_run(&due, at(250), Catchup::None), [at(240)]);
        assert!(slots_to_run(&due, at(251), Catchup::None).is_empty());
        assert!(slots_to_run(&[], at(251), Catchup::All).is_empty());
    }
}
