//! A node's worker: in a cluster every node runs the workflow attempts it
//! claims from the store, whichever node is the executor.
//!
//! Promises:
//! - A node runs at most `[cluster] task_slots` attempts at once, and
//!   claims (with `FOR UPDATE SKIP LOCKED`, see `caudal_store::dispatch`)
//!   only while it has a free slot; the executor, one in the cluster,
//!   keeps every pool's limit, so a pool of 3 is 3 in the cluster.
//! - It beats each claimed attempt's heartbeat every third of the cluster
//!   lease. An attempt the executor rescued (the node was silent for a
//!   lease) or whose run was cancelled is stopped at the next beat; a node
//!   that cannot reach the store for two thirds of the lease stops all its
//!   attempts itself, since they are about to be rescued and run again.
//! - An outcome is written with its claim's token: once rescued, an
//!   attempt's late outcome changes nothing (the rescue counted it as a
//!   failed attempt, and the retry policy decides what follows). A write
//!   the store does not take is tried again until it is taken or refused:
//!   meanwhile the row is still beaten, so it is not rescued while its
//!   outcome waits here.
//! - An attempt this node stops on its own (rescued, or the store out of
//!   reach) ends as interrupted, never as cancelled: only the executor
//!   cancels, for a run cancelled.
//! - At shutdown its attempts are interrupted and reported as such: the
//!   executor queues them again without counting a failure.
//! - A row the store says this node holds but the node does not run (a
//!   claim committed after the node stopped waiting for its answer) is
//!   handed back as interrupted at the next beat, never beaten for good.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_core::config::Config;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{ClaimedDispatch, DispatchKey, Store, Wake, Wakeups};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::attempt::{self, AttemptId, Done, Ending, Shared, Spec};

/// How often a worker looks for ready attempts while work comes in...
const BUSY_POLL: Duration = Duration::from_millis(100);
/// ...and once nothing came for [`QUIET_AFTER`]; on PostgreSQL a
/// notification wakes it at once when attempts are handed out, so these
/// polls only catch what a notification missed.
const IDLE_POLL: Duration = Duration::from_millis(250);
const QUIET_AFTER: Duration = Duration::from_secs(2);
/// Attempts claimed at most per claim.
const CLAIM_BATCH: u32 = 16;
/// How long a stopping worker waits for its interrupted attempts.
const STOP_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn key_of(id: &AttemptId) -> DispatchKey {
    DispatchKey {
        run_id: id.run_id,
        task: id.task.clone(),
        map_index: id.map_index,
        attempt: id.attempt,
    }
}

struct Running {
    token: i64,
    /// The executor's cancel (the run was cancelled).
    stop: CancellationToken,
    /// This node's own stop: the attempt ends interrupted.
    interrupt: CancellationToken,
}

/// Runs the attempts this node claims until `shutdown`.
pub async fn work(
    config: Arc<Config>,
    store: Store,
    node: String,
    shutdown: CancellationToken,
) -> Result<()> {
    let Some(cluster) = config.cluster else {
        return Ok(());
    };
    let lease = cluster.lease.as_std();
    let slots = cluster.task_slots.max(1) as usize;
    let killed = attempt::kill_orphans(&node);
    if killed > 0 {
        tracing::warn!(
            processes = killed,
            "killed processes left by a node that died"
        );
    }
    let http = reqwest::Client::builder()
        .build()
        .map_err(|e| Error::with_source(ErrorKind::Internal, "building the HTTP client", e))?;
    let shared = Shared {
        config,
        store: store.clone(),
        http,
        holder: node.clone(),
        partners: Arc::default(),
    };
    let wakeups = match store.dispatch_wakeups(Wake::HandedOut).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e.report(), "cannot listen for handed-out attempts; polling only");
            None
        }
    };
    let interrupt = CancellationToken::new();
    let (events_tx, mut events) = mpsc::unbounded_channel::<Done>();
    let mut running: HashMap<DispatchKey, Running> = HashMap::new();
    let mut outcomes = Outcomes::new(store.clone());
    let mut beat = tokio::time::interval(lease / 3);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = Instant::now();
    let mut claim_now = true;
    let mut last_work = Instant::now();
    loop {
        if claim_now && running.len() < slots && !shutdown.is_cancelled() {
            let room = u32::try_from(slots - running.len()).unwrap_or(u32::MAX);
            // Bounded: a store that hangs must not hold the heartbeats up.
            let claimed = tokio::time::timeout(
                lease / 3,
                store.claim_dispatch(&node, room.min(CLAIM_BATCH)),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Store,
                    "the state store did not answer in time",
                ))
            });
            match claimed {
                Ok(claimed) => {
                    claim_now = !claimed.is_empty();
                    if claim_now {
                        last_work = Instant::now();
                    }
                    for c in claimed {
                        start(
                            c,
                            &shared,
                            &interrupt,
                            &events_tx,
                            &mut running,
                            &mut outcomes,
                        );
                    }
                }
                Err(e) => {
                    claim_now = false;
                    tracing::warn!(error = %e.report(), "cannot claim workflow attempts");
                }
            }
        }
        let idle = if claim_now && running.len() < slots {
            Duration::ZERO
        } else if running.is_empty() && last_work.elapsed() >= QUIET_AFTER {
            IDLE_POLL
        } else {
            BUSY_POLL
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            done = events.recv() => {
                if let Some(done) = done {
                    report(&mut running, &mut outcomes, done);
                    while let Ok(done) = events.try_recv() {
                        report(&mut running, &mut outcomes, done);
                    }
                }
                claim_now = true;
            }
            _ = beat.tick() => {
                let beaten = tokio::time::timeout(lease / 3, store.beat_dispatch(&node))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::new(ErrorKind::Store, "the state store did not answer in time"))
                    });
                match beaten {
                    Ok(beats) => {
                        last_beat = Instant::now();
                        let held: HashMap<&DispatchKey, (i64, bool)> =
                            beats.iter().map(|b| (&b.key, (b.token, b.cancel))).collect();
                        for (key, r) in &running {
                            match held.get(key) {
                                Some((token, false)) if *token == r.token => {}
                                Some((token, true)) if *token == r.token => r.stop.cancel(),
                                _ => {
                                    if !r.interrupt.is_cancelled() {
                                        tracing::warn!(run = key.run_id, task = %key.task, index = key.map_index, attempt = key.attempt, "the attempt was rescued from this node; stopping it");
                                    }
                                    r.interrupt.cancel();
                                }
                            }
                        }
                        for b in &beats {
                            if !running.contains_key(&b.key) && !outcomes.pending(&b.key) {
                                tracing::warn!(run = b.key.run_id, task = %b.key.task, index = b.key.map_index, attempt = b.key.attempt, "the store says this node claimed an attempt it never started; handing it back");
                                outcomes.send(b.key.clone(), b.token, interrupted(&b.key));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.report(), "cannot beat the heartbeat of this node's workflow attempts");
                        if last_beat.elapsed() >= lease * 2 / 3 {
                            for r in running.values() {
                                r.interrupt.cancel();
                            }
                        }
                    }
                }
            }
            Some(written) = outcomes.writes.join_next(), if !outcomes.writes.is_empty() => {
                if let Ok(key) = written {
                    outcomes.reporting.remove(&key);
                }
            }
            () = wake(wakeups.as_ref()) => {
                claim_now = true;
                last_work = Instant::now();
            }
            () = tokio::time::sleep(idle) => { claim_now = true; }
        }
    }
    interrupt.cancel();
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    while !running.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(done)) => report(&mut running, &mut outcomes, done),
            _ => break,
        }
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while outcomes.writes.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn start(
    claimed: ClaimedDispatch,
    shared: &Shared,
    interrupt: &CancellationToken,
    events: &mpsc::UnboundedSender<Done>,
    running: &mut HashMap<DispatchKey, Running>,
    outcomes: &mut Outcomes,
) {
    let stop = CancellationToken::new();
    let own_interrupt = interrupt.child_token();
    running.insert(
        claimed.key.clone(),
        Running {
            token: claimed.token,
            stop: stop.clone(),
            interrupt: own_interrupt.clone(),
        },
    );
    let spec: Spec = match serde_json::from_str(&claimed.spec) {
        Ok(spec) => spec,
        Err(e) => {
            let done = Done {
                id: AttemptId {
                    run_id: claimed.key.run_id,
                    task: claimed.key.task.clone(),
                    map_index: claimed.key.map_index,
                    attempt: claimed.key.attempt,
                },
                ending: Ending::Failed,
                exit_code: None,
                pid: None,
                error: Some(format!(
                    "this node cannot read the attempt it claimed ({e}); is every node on the same caudal version?"
                )),
                stderr_tail: None,
                outputs: serde_json::Map::new(),
                items: Vec::new(),
                elapsed: Duration::ZERO,
            };
            report(running, outcomes, done);
            return;
        }
    };
    if let Some(logs) = spec.files.stdout.parent()
        && let Err(e) = std::fs::create_dir_all(logs)
    {
        tracing::warn!(dir = %logs.display(), error = %e, "cannot create the run's log directory");
    }
    tokio::spawn(attempt::run(
        spec,
        shared.clone(),
        stop,
        own_interrupt,
        events.clone(),
    ));
}

/// Reports an attempt this node ran (see [`Outcomes::send`]).
fn report(running: &mut HashMap<DispatchKey, Running>, outcomes: &mut Outcomes, done: Done) {
    let key = key_of(&done.id);
    if let Some(r) = running.remove(&key) {
        outcomes.send(key, r.token, done);
    }
}

/// The ending of an attempt this node hands back without running it.
fn interrupted(key: &DispatchKey) -> Done {
    Done {
        id: AttemptId {
            run_id: key.run_id,
            task: key.task.clone(),
            map_index: key.map_index,
            attempt: key.attempt,
        },
        ending: Ending::Interrupted,
        exit_code: None,
        pid: None,
        error: Some("interrupted: its node handed it back; it will run again".into()),
        stderr_tail: None,
        outputs: serde_json::Map::new(),
        items: Vec::new(),
        elapsed: Duration::ZERO,
    }
}

/// Outcomes being written, in the background: the loop goes on beating
/// and claiming meanwhile.
struct Outcomes {
    store: Store,
    writes: JoinSet<DispatchKey>,
    /// The rows whose outcome is being written.
    reporting: HashSet<DispatchKey>,
}

impl Outcomes {
    fn new(store: Store) -> Self {
        Self {
            store,
            writes: JoinSet::new(),
            reporting: HashSet::new(),
        }
    }

    fn pending(&self, key: &DispatchKey) -> bool {
        self.reporting.contains(key)
    }

    /// Writes `done` under the claim's `token`. A store that does not
    /// answer is tried again until it takes the outcome or refuses it
    /// (rescued meanwhile).
    fn send(&mut self, key: DispatchKey, token: i64, done: Done) {
        let outcome = serde_json::to_string(&done).unwrap_or_else(|e| {
            // Not readable by the executor: it counts the attempt as lost
            // and retries it, rather than waiting for it for good.
            tracing::error!(error = %e, "cannot encode an attempt's outcome");
            String::new()
        });
        self.reporting.insert(key.clone());
        let store = self.store.clone();
        self.writes.spawn(async move {
            let mut wait = Duration::ZERO;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
                match store.finish_dispatch(&key, token, &outcome).await {
                    Ok(true) => return key,
                    Ok(false) => {
                        tracing::info!(run = key.run_id, task = %key.task, index = key.map_index, attempt = key.attempt, "the attempt ended after it was rescued from this node; its outcome is dropped");
                        return key;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.report(), "cannot write an attempt's outcome; trying again");
                    }
                }
            }
        });
    }
}

/// The next wake-up, or never without notifications.
pub(crate) async fn wake(wakeups: Option<&Wakeups>) {
    match wakeups {
        Some(w) => w.wait().await,
        None => std::future::pending().await,
    }
}
