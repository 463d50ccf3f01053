//! Bounded history while caudal runs: the state store keeps what
//! `[retention]` allows and no more.
//!
//! - **After every run** its pipeline's runs are pruned by count and age,
//!   so the bound holds at all times (one run more while one is running).
//! - **Idle polls leave no run.** A scheduled poll of a `continuous` cursor
//!   pipeline that succeeded having read and rejected nothing is deleted as
//!   it ends; only its end time is kept, as the pipeline's last idle poll.
//!   The run is recorded when it starts (a run must exist to commit
//!   progress) and forgotten at the end, because only then is it known to
//!   be idle. Manual runs, failed or cancelled polls and CDC runs are
//!   always kept. `caudal status` then shows the last run that did work.
//! - **The daemon prunes the rest** at start and every [`PRUNE_EVERY`]:
//!   resolved dead letters and audit entries by age, and the runs of every
//!   pipeline in the store (also pipelines no longer configured, whose
//!   runs would otherwise never age out).
//!
//! Pruning is housekeeping: a failure is logged and tried again at the next
//! run or period; it never fails a run. What is never pruned (pending dead
//! letters, running runs, the newest run of a pipeline) is the store's
//! promise, see [`caudal_store::Store::prune_runs`].

use std::time::Duration;

use caudal_core::Result;
use caudal_core::config::retention::RetentionConfig;
use caudal_store::{RunOutcome, Store};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Pipeline, Progress, Source, Trigger};
use crate::schedule::Schedule;

/// How often the daemon prunes dead letters, audit entries and every
/// pipeline's runs (and once at start).
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What one pass of [`prune_history`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub runs: u64,
    pub dead_letters: u64,
    pub audit: u64,
}

/// Whether a run that ended so was an idle poll, which leaves no run
/// behind: a scheduled run of a `continuous` cursor pipeline that succeeded
/// and read and rejected nothing.
fn is_idle_poll(
    schedule: &Schedule,
    source: &Source,
    trigger: Trigger,
    outcome: RunOutcome,
    totals: &Progress,
) -> bool {
    matches!(schedule, Schedule::Continuous { .. })
        && matches!(source, Source::Sql(_) | Source::Windows(_))
        && trigger == Trigger::Schedule
        && outcome == RunOutcome::Succeeded
        && totals.rows_read == 0
        && totals.dead_letters == 0
}

/// Called once run `run_id` of `pipeline` is finished: forgets it if it was
/// an idle poll (then returns true), else prunes the pipeline's runs.
pub(crate) async fn after_run(
    pipeline: &Pipeline,
    run_id: i64,
    trigger: Trigger,
    outcome: RunOutcome,
    totals: &Progress,
) -> bool {
    let store = pipeline.store();
    let name = pipeline.name();
    if is_idle_poll(
        pipeline.schedule(),
        pipeline.source(),
        trigger,
        outcome,
        totals,
    ) {
        match store.forget_idle_run(run_id).await {
            // Nothing was added to the history: nothing to prune.
            Ok(true) => return true,
            // Delivery counted rows on it meanwhile: it stays, as history.
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(pipeline = %name, run_id, error = %e.report(), "cannot forget an idle poll; it stays in the run history");
            }
        }
    }
    let retention = pipeline.retention();
    match store
        .prune_runs(
            name,
            retention.runs_max_age.as_std(),
            retention.runs_max_count,
        )
        .await
    {
        Ok(0) => {}
        Ok(runs) => tracing::debug!(pipeline = %name, runs, "pruned the run history"),
        Err(e) => {
            tracing::warn!(pipeline = %name, error = %e.report(), "cannot prune the run history; trying again after the next run");
        }
    }
    false
}

/// Prunes everything `retention` bounds: the runs of every pipeline in the
/// store, resolved dead letters and audit entries.
pub async fn prune_history(store: &Store, retention: &RetentionConfig) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    for pipeline in store.run_pipelines().await? {
        pruned.runs += store
            .prune_runs(
                &pipeline,
                retention.runs_max_age.as_std(),
                retention.runs_max_count,
            )
            .await?;
    }
    pruned.dead_letters = store
        .prune_dead_letters(retention.dead_letters_max_age.as_std())
        .await?;
    pruned.audit = store.prune_audit(retention.audit_max_age.as_std()).await?;
    Ok(pruned)
}

/// The daemon's pruning task: [`prune_history`] at once and every
/// [`PRUNE_EVERY`] until `shutdown`, which also stops a pass in progress
/// (each batch is a statement of its own, so nothing is left half done).
pub async fn prune_periodically(
    store: Store,
    retention: RetentionConfig,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = prune_history(&store, &retention) => match result {
                Ok(pruned) if pruned == Pruned::default() => {
                    tracing::debug!("history within its retention; nothing pruned");
                }
                Ok(pruned) => tracing::info!(
                    runs = pruned.runs,
                    dead_letters = pruned.dead_letters,
                    audit = pruned.audit,
                    "pruned the history past its retention"
                ),
                Err(e) => tracing::warn!(error = %e.report(), "cannot prune the history; trying again in an hour"),
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caudal_store::{DeadLetterState, NewDeadLetter};

    const DAY: Duration = Duration::from_secs(86_400);
    const DAY_US: i64 = 86_400_000_000;

    fn letter(n: u32) -> NewDeadLetter {
        NewDeadLetter {
            batch_key: format!("batch-{n}"),
            event_id: format!("ev-{n}"),
            record_key: None,
            position: serde_json::json!({"n": n}),
            record: serde_json::json!({"id": n}),
            reason: "answered 400".into(),
            status: Some(400),
            response_excerpt: None,
            attempts: 1,
            first_attempt_at: None,
            last_attempt_at: None,
        }
    }

    async fn finished_run(store: &Store, pipeline: &str) {
        let id = store.start_run(pipeline, "schedule").await.expect("start");
        store
            .finish_run(id, RunOutcome::Succeeded, 1, None, None)
            .await
            .expect("finish");
    }

    #[tokio::test]
    async fn prune_history_bounds_every_pipeline_and_keeps_pending_letters() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let store = Store::open(&url).await.expect("store");
        for _ in 0..5 {
            finished_run(&store, "a").await;
        }
        // A pipeline no longer configured: its runs still age out.
        for _ in 0..3 {
            finished_run(&store, "gone").await;
        }
        let letters = store
            .add_dead_letters("a", &[letter(1), letter(2)])
            .await
            .expect("dead letters");
        store
            .resolve_dead_letters(&letters[..1], DeadLetterState::Discarded)
            .await
            .expect("discard");
        store
            .add_audit("root", "POST", "/api/v1/x", 200)
            .await
            .expect("audit");
        // Two days pass for every dead letter and audit entry.
        let raw = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
        for sql in [
            "UPDATE dead_letters SET created_at = created_at - $1, \
             resolved_at = resolved_at - $1",
            "UPDATE audit_log SET at = at - $1",
        ] {
            sqlx::query(sql)
                .bind(2 * DAY_US)
                .execute(&raw)
                .await
                .expect("age rows");
        }
        raw.close().await;

        let retention = RetentionConfig {
            runs_max_count: 2,
            dead_letters_max_age: caudal_core::units::Duration(DAY),
            audit_max_age: caudal_core::units::Duration(DAY),
            ..RetentionConfig::default()
        };
        let pruned = prune_history(&store, &retention).await.expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                runs: 3 + 1,
                dead_letters: 1,
                audit: 1
            }
        );
        for pipeline in ["a", "gone"] {
            assert_eq!(store.runs(Some(pipeline), 10).await.expect("runs").len(), 2);
        }
        assert_eq!(store.pending_dead_letters("a").await.expect("count"), 1);
        assert_eq!(
            store
                .dead_letters(None, None, 0, 10)
                .await
                .expect("list")
                .len(),
            1,
            "only the pending letter is left"
        );
        assert!(store.audit(10).await.expect("audit").is_empty());
        assert_eq!(
            prune_history(&store, &retention)
                .await
                .expect("prune again"),
            Pruned::default()
        );
    }
}
