//! The daemon: every pipeline on its schedule until shutdown.
//!
//! Each pipeline has two tasks: its schedule, whose runs read the source
//! into the pipeline's buffer, and its delivery loop, which sends what the
//! buffer holds as soon as it is there. So a receiver outage never stops
//! reading (until the buffer is full), one pipeline's slow run never delays
//! another's, and a pipeline's runs never overlap (a run ends before the
//! next is scheduled; the lease also guards against other processes).
//! Shutdown (the token) stops intake at once; requests in flight finish,
//! undelivered records stay in the buffer, and `run` returns when all
//! tasks have ended. One more task prunes the store's history at start and
//! every hour ([`crate::retention`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use caudal_core::error::Decision;
use jiff::Timestamp;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use caudal_core::ErrorKind;

use crate::cluster::Member;
use crate::pipeline::{Pipeline, Trigger};
use crate::report::Report;

/// The longest single sleep; the wall clock is checked again after it, so
/// clock changes (NTP, suspend) are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Pause before the first retry of a run that failed temporarily
/// (doubled after each further failure, up to [`MAX_RETRY`]).
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest pause between retries of a failing run.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// The pause before retry `n` (from 1) of a run that failed temporarily.
fn retry_after(n: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1)))
        .min(MAX_RETRY)
}

/// `t` plus `d`, saturating.
fn add(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(t)
}

/// Steers the pipelines of a running daemon: pause (no new runs; a run in
/// progress, such as a CDC stream, is stopped; delivery of what is
/// buffered goes on), resume, and trigger a run now. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Control {
    pipelines: Arc<Mutex<BTreeMap<String, Arc<Steering>>>>,
}

#[derive(Debug)]
struct Steering {
    paused: watch::Sender<bool>,
    trigger: Notify,
    running: Mutex<Option<CancellationToken>>,
}

/// Why a control request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No such pipeline in this daemon.
    Unknown,
    /// The pipeline is paused: resume it first.
    Paused,
}

impl Control {
    fn steering(&self, name: &str) -> Option<Arc<Steering>> {
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn register(&self, name: &str) -> Arc<Steering> {
        let steering = Arc::new(Steering {
            paused: watch::Sender::new(false),
            trigger: Notify::new(),
            running: Mutex::new(None),
        });
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), steering.clone());
        steering
    }

    /// Whether pipeline `name` is paused; `None` if the daemon has no such
    /// pipeline.
    pub fn is_paused(&self, name: &str) -> Option<bool> {
        self.steering(name).map(|s| *s.paused.borrow())
    }

    /// Pauses pipeline `name`, stopping a run in progress.
    pub fn pause(&self, name: &str) -> Result<(), Refused> {
        let s = self.steering(name).ok_or(Refused::Unknown)?;
        s.paused.send_replace(true);
        if let Some(run) = s
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            run.cancel();
        }
        tracing::info!(pipeline = name, "paused");
        Ok(())
    }

    /// Resumes pipeline `name`; its next run is due by its schedule.
    pub fn resume(&self, name: &str) -> Result<(), Refused> {
        let s = self.steering(name).ok_or(Refused::Unknown)?;
        s.paused.send_replace(false);
        tracing::info!(pipeline = name, "resumed");
        Ok(())
    }

    /// Starts a run of pipeline `name` now (or right after the one in
    /// progress).
    pub fn trigger(&self, name: &str) -> Result<(), Refused> {
        let s = self.steering(name).ok_or(Refused::Unknown)?;
        if *s.paused.borrow() {
            return Err(Refused::Paused);
        }
        s.trigger.notify_one();
        Ok(())
    }
}

/// Runs every pipeline on its schedule until `shutdown` is cancelled.
pub async fn run(pipelines: Vec<Pipeline>, shutdown: CancellationToken) {
    run_with(pipelines, shutdown, Control::default()).await;
}

/// As [`run`], steered by `control`.
pub async fn run_with(pipelines: Vec<Pipeline>, shutdown: CancellationToken, control: Control) {
    run_node(pipelines, shutdown, control, None).await;
}

/// As [`run_with`], as a node of a cluster when `member` is given: each
/// pipeline runs here only while this node owns it ([`crate::cluster`]).
/// Without it the node still registers, and runs every pipeline.
pub async fn run_node(
    pipelines: Vec<Pipeline>,
    shutdown: CancellationToken,
    control: Control,
    member: Option<Member>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    // Every pipeline was built from the one configuration and store.
    if let Some(first) = pipelines.first() {
        let (store, retention) = (first.store().clone(), *first.retention());
        tasks.spawn(crate::retention::prune_periodically(
            store.clone(),
            retention,
            shutdown.clone(),
        ));
        if member.is_none() {
            tasks.spawn(crate::cluster::serve_solo(store, shutdown.clone()));
        }
    }
    if let Some(m) = &member {
        tasks.spawn(m.clone().serve(shutdown.clone()));
    }
    for pipeline in pipelines {
        let steering = control.register(pipeline.name());
        if let Some(m) = &member {
            tasks.spawn(owned_loop(pipeline, shutdown.clone(), steering, m.clone()));
            continue;
        }
        let delivery = pipeline.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move { delivery.deliver_until_stopped(&stop).await });
        let shutdown = shutdown.clone();
        tasks.spawn(async move { schedule_loop(pipeline, shutdown, steering).await });
    }
    while tasks.join_next().await.is_some() {}
}

/// A pipeline in a cluster: waits until this node owns it, runs its
/// delivery and its schedule until the ownership ends (lease lost, handed
/// over, drained, shutdown), gives it back, and waits to own it again.
async fn owned_loop(
    pipeline: Pipeline,
    shutdown: CancellationToken,
    steering: Arc<Steering>,
    member: Member,
) {
    let name = pipeline.name().to_string();
    // Crawls keep to the sites node, where every site's limits live.
    let site_bound = crate::cluster::is_site_bound(&pipeline);
    while let Some(owned) = member.claim(&name, site_bound, &shutdown).await {
        let stop = owned.stopped();
        let ending = {
            let (stop, shutdown) = (stop.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            })
        };
        match pipeline
            .own(Some((owned.fence().clone(), member.lease())))
            .await
        {
            Ok(()) => {
                tokio::join!(
                    pipeline.deliver_until_stopped(&stop),
                    schedule_loop(pipeline.clone(), stop.clone(), steering.clone())
                );
            }
            Err(e) => {
                tracing::error!(pipeline = %name, error = %e.report(), "cannot start the pipeline on this node; giving it back");
            }
        }
        ending.abort();
        if let Err(e) = pipeline.own(None).await {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot end the ownership cleanly");
        }
        owned.release().await;
        if shutdown.is_cancelled() {
            break;
        }
        // Give the other nodes a moment to take what was handed over.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(member.lease() / 3) => {}
        }
    }
}

async fn schedule_loop(pipeline: Pipeline, shutdown: CancellationToken, steering: Arc<Steering>) {
    let name = pipeline.name().to_string();
    let store = pipeline.store().clone();
    let mut last_start = None;
    let mut last_end = None;
    match store.last_run(&name).await {
        Ok(Some(run)) => {
            last_start = Some(run.started_at);
            last_end = run.ended_at;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot read the last run; scheduling as new")
        }
    }
    tracing::info!(pipeline = %name, schedule = %pipeline.schedule().describe(), "scheduled");
    // A run that failed for a reason that may pass (a server down, the
    // lease held elsewhere) is tried again sooner than the schedule says,
    // with a growing pause.
    let mut failures: u32 = 0;
    let mut retry_at: Option<Timestamp> = None;
    loop {
        let now = Timestamp::now();
        let next = match pipeline.schedule().next_run(last_start, last_end, now) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(pipeline = %name, error = %e.report(), "no next run; pipeline stopped");
                return;
            }
        };
        let next = retry_at.take().map_or(next, |r| r.min(next).max(now));
        if let Err(e) = store.set_next_run(&name, Some(next)).await {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot record the next run time");
        }
        let mut paused = steering.paused.subscribe();
        let trigger = tokio::select! {
            woke = sleep_until(next, &shutdown) => {
                if !woke {
                    break;
                }
                Some(Trigger::Schedule)
            }
            () = steering.trigger.notified() => Some(Trigger::Manual),
            _ = paused.wait_for(|p| *p) => None,
        };
        let Some(trigger) = trigger else {
            // Paused: wait for resume (or shutdown), then schedule again.
            let mut resumed = steering.paused.subscribe();
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = resumed.wait_for(|p| !*p) => {}
            }
            continue;
        };
        if *steering.paused.borrow() {
            continue;
        }
        let started = Timestamp::now();
        let run_stop = shutdown.child_token();
        *steering
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(run_stop.clone());
        let result = pipeline.run_capture(trigger, &run_stop).await;
        *steering
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let failure = match &result {
            Ok(summary) => summary.error.as_ref(),
            Err(e) => Some(e),
        };
        match failure.map(|e| (e, e.kind().decision())) {
            Some((e, Decision::Stop)) => {
                tracing::error!(pipeline = %name, error = %e.report(), "pipeline stopped: it cannot continue without losing changes; `caudal resync` starts it over");
                break;
            }
            Some((e, Decision::Retry)) => {
                failures += 1;
                let wait = retry_after(failures);
                tracing::warn!(pipeline = %name, error = %e.report(), retry_in_s = wait.as_secs(), "run failed for a reason that may pass; trying again soon");
                retry_at = Some(add(Timestamp::now(), wait));
                if result.is_ok() {
                    last_start = Some(started);
                    last_end = Some(Timestamp::now());
                }
            }
            Some((e, _)) => {
                failures = 0;
                if result.is_err() {
                    tracing::error!(pipeline = %name, error = %e.report(), "run could not start; trying again at the next scheduled time");
                }
                last_start = Some(started);
                last_end = Some(Timestamp::now());
            }
            None => {
                failures = 0;
                last_start = Some(started);
                last_end = Some(Timestamp::now());
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    if let Err(e) = store.set_next_run(&name, None).await {
        tracing::debug!(pipeline = %name, error = %e.report(), "cannot clear the next run time");
    }
    tracing::info!(pipeline = %name, "stopped");
}

/// Keeps every report pipeline on its schedule until shutdown: each run
/// writes the dates due ([`Report::run_due`]); a failed run is tried again
/// soon, with a growing pause. One more task applies the datasets'
/// retention at start and every hour.
pub async fn run_reports(
    reports: Vec<Report>,
    config: std::sync::Arc<caudal_core::config::Config>,
    store: caudal_store::Store,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let datasets: Vec<String> = config
        .sinks
        .iter()
        .filter(|(_, s)| s.files().is_some_and(|f| f.retention.is_some()))
        .map(|(n, _)| n.clone())
        .collect();
    if !datasets.is_empty() {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                for d in &datasets {
                    match crate::report::apply_retention(&config, &store, d, Timestamp::now()).await {
                        Ok(dates) if !dates.is_empty() => {
                            tracing::info!(dataset = %d, dates = dates.len(), "retention: old dates deleted");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(dataset = %d, error = %e.report(), "retention failed; trying again in an hour"),
                    }
                }
                if !sleep_for(RETENTION_EVERY, &stop).await {
                    return;
                }
            }
        });
    }
    for report in reports {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { report_loop(report, shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

/// How often the datasets' retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

async fn report_loop(report: Report, shutdown: CancellationToken) {
    let name = report.name().to_string();
    let store = report_store(&report);
    let (mut last_start, mut last_end) = match store.last_run(&name).await {
        Ok(Some(run)) => (Some(run.started_at), run.ended_at),
        _ => (None, None),
    };
    tracing::info!(pipeline = %name, schedule = %report.schedule().describe(), dataset = %report.dataset(), "report scheduled");
    let mut failures: u32 = 0;
    // Days missed while caudal was not running are written at once, not at
    // the next scheduled time.
    let mut missed = match report.due_dates(Timestamp::now()).await {
        Ok(due) => !due.is_empty(),
        Err(e) => {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot tell which dates are due; waiting for the schedule");
            false
        }
    };
    loop {
        let now = Timestamp::now();
        let next = match report.schedule().next_run(last_start, last_end, now) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(pipeline = %name, error = %e.report(), "no next run; report stopped");
                return;
            }
        };
        let next = if std::mem::take(&mut missed) {
            now
        } else if failures > 0 {
            add(now, retry_after(failures)).min(next)
        } else {
            next
        };
        let _ = store.set_next_run(&name, Some(next)).await;
        if !sleep_until(next, &shutdown).await {
            break;
        }
        let started = Timestamp::now();
        match report.run_due("schedule", &shutdown).await {
            Ok(_) => failures = 0,
            Err(e) if e.kind() == ErrorKind::Cancelled => break,
            Err(e) => {
                failures += 1;
                tracing::warn!(pipeline = %name, error = %e.report(), retry_in_s = retry_after(failures).as_secs(), "report run failed; the dates not written stay due");
            }
        }
        last_start = Some(started);
        last_end = Some(Timestamp::now());
    }
    let _ = store.set_next_run(&name, None).await;
    tracing::info!(pipeline = %name, "stopped");
}

fn report_store(report: &Report) -> caudal_store::Store {
    report.store().clone()
}

/// Sleeps until the wall-clock time `at`; false if shut down first.
async fn sleep_until(at: Timestamp, shutdown: &CancellationToken) -> bool {
    loop {
        let left = at.duration_since(Timestamp::now());
        if left <= jiff::SignedDuration::ZERO {
            return !shutdown.is_cancelled();
        }
        let step = Duration::try_from(left).unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        if !sleep_for(step, shutdown).await {
            return false;
        }
    }
}

async fn sleep_for(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_of_a_failing_run_back_off_to_a_cap() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }
}
