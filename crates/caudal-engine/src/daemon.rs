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
//! tasks have ended.

use std::time::Duration;

use caudal_core::ErrorKind;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Pipeline, Trigger};

/// The longest single sleep; the wall clock is checked again after it, so
/// clock changes (NTP, suspend) are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Pause before trying again when another process holds the lease.
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Runs every pipeline on its schedule until `shutdown` is cancelled.
pub async fn run(pipelines: Vec<Pipeline>, shutdown: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for pipeline in pipelines {
        let delivery = pipeline.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move { delivery.deliver_until_stopped(&stop).await });
        let shutdown = shutdown.clone();
        tasks.spawn(async move { schedule_loop(pipeline, shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

async fn schedule_loop(pipeline: Pipeline, shutdown: CancellationToken) {
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
    loop {
        let now = Timestamp::now();
        let next = match pipeline.schedule().next_run(last_start, last_end, now) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(pipeline = %name, error = %e.report(), "no next run; pipeline stopped");
                return;
            }
        };
        if let Err(e) = store.set_next_run(&name, Some(next)).await {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot record the next run time");
        }
        if !sleep_until(next, &shutdown).await {
            break;
        }
        let started = Timestamp::now();
        match pipeline.run_capture(Trigger::Schedule, &shutdown).await {
            Ok(summary) => {
                if let Some(e) = summary
                    .error
                    .as_ref()
                    .filter(|e| e.kind() == ErrorKind::Resync)
                {
                    tracing::error!(pipeline = %name, error = %e.report(), "pipeline stopped: it cannot continue without losing changes; `caudal resync` starts it over");
                    break;
                }
                last_start = Some(started);
                last_end = Some(Timestamp::now());
            }
            Err(e) if e.kind() == ErrorKind::Busy => {
                tracing::info!(pipeline = %name, reason = %e, "skipping this tick");
                if !sleep_for(BUSY_RETRY, &shutdown).await {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(pipeline = %name, error = %e.report(), "run could not start");
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
