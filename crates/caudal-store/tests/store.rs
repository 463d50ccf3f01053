//! The state store's contract, checked against every backend: each test is
//! written once and runs on SQLite and on PostgreSQL, each in a database of
//! its own (see `support`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use caudal_core::ErrorKind;
use caudal_store::{DeadLetterState, LeaseOutcome, NewDeadLetter, RunOutcome, Store};
use jiff::Timestamp;
use serde_json::json;
use support::{Backend, Ctx};
use tokio::sync::Barrier;

backend_tests!(
    open_reports_its_backend,
    reopening_keeps_data_and_applies_nothing_twice,
    concurrent_opens_of_a_fresh_database_all_succeed,
    checkpoint_is_absent_until_progress_is_committed,
    commit_progress_saves_checkpoint_and_counters,
    commit_progress_overwrites_the_previous_checkpoint,
    commit_progress_is_seen_all_or_nothing_by_concurrent_readers,
    commit_progress_refuses_runs_that_are_not_running,
    reset_checkpoint_forgets_the_position,
    start_run_records_a_running_run,
    update_run_counts_moves_only_running_runs,
    finish_run_records_the_outcome_once,
    finish_run_refuses_running_as_an_outcome,
    run_of_an_unknown_id_is_none,
    runs_are_newest_first_filtered_and_limited,
    last_run_is_the_most_recently_started,
    abandon_running_marks_only_running_runs_of_the_pipeline,
    next_run_round_trips,
    lease_is_exclusive_and_reentrant,
    lease_can_be_acquired_once_expired,
    renew_lease_extends_and_reports_loss,
    release_lease_frees_it_only_for_its_holder,
    take_over_lease_is_a_compare_and_swap,
    concurrent_acquirers_of_a_free_lease_exactly_one_wins,
    concurrent_acquirers_of_an_expired_lease_exactly_one_wins,
    odd_names_and_positions_round_trip,
    counters_beyond_i64_are_refused_not_truncated,
    dead_letters_are_kept_listed_and_resolved_once,
    a_batch_refused_again_keeps_one_pending_letter_per_record,
    save_checkpoint_and_late_delivered_counts,
    counts_left_out_keep_what_delivery_added,
    circuit_state_round_trips,
    source_states_round_trip_and_list_by_prefix,
    tokens_are_kept_by_hash_revoked_and_audited,
    runs_page_by_pipeline_outcome_and_cursor,
);

const P: &str = "orders";

fn assert_recent(at: Timestamp) {
    let now = Timestamp::now();
    let slack = jiff::SignedDuration::from_secs(60);
    assert!(
        at >= now - slack && at <= now + slack,
        "{at} is not close to the current time {now}"
    );
}

async fn open_reports_its_backend(ctx: Ctx) {
    let store = ctx.open().await;
    let expected = match ctx.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(store.backend(), expected);
}

async fn reopening_keeps_data_and_applies_nothing_twice(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(run, P, &json!({"lsn": 7}), 1, 1)
        .await
        .expect("commit_progress");
    store.close().await;

    for _ in 0..2 {
        let store = ctx.open().await;
        let checkpoint = store
            .checkpoint(P)
            .await
            .expect("checkpoint")
            .expect("kept");
        assert_eq!(checkpoint.position, json!({"lsn": 7}));
        assert_eq!(
            store.run(run).await.expect("run").expect("kept").rows_read,
            1
        );
        let applied = count_migrations(&ctx.url).await;
        assert_eq!(
            applied,
            migration_files(),
            "each migration is recorded exactly once"
        );
        store.close().await;
    }
}

async fn count_migrations(url: &str) -> i64 {
    const SQL: &str = "SELECT COUNT(*) FROM _sqlx_migrations";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        let n = sqlx::query_scalar(SQL)
            .fetch_one(&pool)
            .await
            .expect("count");
        pool.close().await;
        n
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres");
        let n = sqlx::query_scalar(SQL)
            .fetch_one(&pool)
            .await
            .expect("count");
        pool.close().await;
        n
    }
}

async fn concurrent_opens_of_a_fresh_database_all_succeed(ctx: Ctx) {
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let url = ctx.url.clone();
            tokio::spawn(async move { Store::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        match open.await.expect("join") {
            Ok(store) => stores.push(store),
            Err(e) => panic!("concurrent open failed: {}", e.report()),
        }
    }
    let run = stores[0].start_run(P, "manual").await.expect("start_run");
    assert_eq!(
        stores[7].run(run).await.expect("run").map(|r| r.id),
        Some(run)
    );
    assert_eq!(count_migrations(&ctx.url).await, migration_files());
}

async fn checkpoint_is_absent_until_progress_is_committed(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.checkpoint(P).await.expect("checkpoint"), None);
    store.start_run(P, "manual").await.expect("start_run");
    assert_eq!(store.checkpoint(P).await.expect("checkpoint"), None);
}

async fn commit_progress_saves_checkpoint_and_counters(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "schedule").await.expect("start_run");
    let position = json!({"cursor": "2024-05-01T10:00:00Z", "key": 42});
    store
        .commit_progress(run, P, &position, 120, 100)
        .await
        .expect("commit_progress");

    let checkpoint = store
        .checkpoint(P)
        .await
        .expect("checkpoint")
        .expect("saved");
    assert_eq!(checkpoint.pipeline, P);
    assert_eq!(checkpoint.position, position);
    assert_recent(checkpoint.updated_at);

    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (120, 100));
    assert_eq!(record.outcome, RunOutcome::Running);
    // Other pipelines are untouched.
    assert_eq!(store.checkpoint("other").await.expect("checkpoint"), None);
}

async fn commit_progress_overwrites_the_previous_checkpoint(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(run, P, &json!({"n": 1}), 1, 1)
        .await
        .expect("first");
    let first = store
        .checkpoint(P)
        .await
        .expect("checkpoint")
        .expect("saved");
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .commit_progress(run, P, &json!([2, "two"]), 2, 2)
        .await
        .expect("second");
    let second = store
        .checkpoint(P)
        .await
        .expect("checkpoint")
        .expect("saved");
    assert_eq!(second.position, json!([2, "two"]));
    assert!(second.updated_at > first.updated_at);

    // A later run of the same pipeline moves the same checkpoint.
    store
        .finish_run(run, RunOutcome::Succeeded, 2, 2, None)
        .await
        .expect("finish");
    let next = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(next, P, &json!(3), 1, 1)
        .await
        .expect("third");
    let third = store
        .checkpoint(P)
        .await
        .expect("checkpoint")
        .expect("saved");
    assert_eq!(third.position, json!(3));
}

/// The checkpoint and the run's counters are written in one transaction, so
/// a reader never sees one without the other: reading the run first, the
/// checkpoint is at least as far; reading the checkpoint first, the run is.
async fn commit_progress_is_seen_all_or_nothing_by_concurrent_readers(ctx: Ctx) {
    const BATCHES: u64 = 150;
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(run, P, &json!({"n": 0}), 0, 0)
        .await
        .expect("commit");

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 1..=BATCHES {
                store
                    .commit_progress(run, P, &json!({"n": n}), n, n)
                    .await
                    .expect("commit_progress");
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let store = store.clone();
            tokio::spawn(async move {
                let position = |store: Store| async move {
                    let checkpoint = store
                        .checkpoint(P)
                        .await
                        .expect("checkpoint")
                        .expect("saved");
                    checkpoint.position["n"].as_u64().expect("n")
                };
                let counted = |store: Store| async move {
                    store
                        .run(run)
                        .await
                        .expect("run")
                        .expect("exists")
                        .rows_read
                };
                loop {
                    if reader % 2 == 0 {
                        let counted = counted(store.clone()).await;
                        let saved = position(store.clone()).await;
                        assert!(
                            saved >= counted,
                            "counters {counted} ahead of checkpoint {saved}"
                        );
                    } else {
                        let saved = position(store.clone()).await;
                        let counted = counted(store.clone()).await;
                        assert!(
                            counted >= saved,
                            "checkpoint {saved} ahead of counters {counted}"
                        );
                    }
                    if position(store.clone()).await == BATCHES {
                        break;
                    }
                }
            })
        })
        .collect();
    writer.await.expect("writer");
    for reader in readers {
        reader.await.expect("reader");
    }
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!(
        (record.rows_read, record.rows_delivered),
        (BATCHES, BATCHES)
    );
}

async fn commit_progress_refuses_runs_that_are_not_running(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(run, P, &json!(1), 10, 10)
        .await
        .expect("commit");

    // Another pipeline's run cannot move this pipeline's checkpoint.
    let other = store.start_run("other", "manual").await.expect("start_run");
    let err = store
        .commit_progress(other, P, &json!(99), 1, 1)
        .await
        .expect_err("wrong pipeline");
    assert_eq!(err.kind(), ErrorKind::Store);

    // An unknown run.
    let err = store
        .commit_progress(run + 1000, P, &json!(99), 1, 1)
        .await
        .expect_err("unknown run");
    assert_eq!(err.kind(), ErrorKind::Store);

    // A run taken away (abandoned) while it was still delivering.
    store.abandon_running(P).await.expect("abandon");
    let err = store
        .commit_progress(run, P, &json!(99), 20, 20)
        .await
        .expect_err("abandoned run");
    assert_eq!(err.kind(), ErrorKind::Store);
    assert!(err.to_string().contains("not running"), "{err}");

    // Nothing moved: neither the checkpoint nor either run's counters.
    let checkpoint = store
        .checkpoint(P)
        .await
        .expect("checkpoint")
        .expect("saved");
    assert_eq!(checkpoint.position, json!(1));
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (10, 10));
    let record = store.run(other).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (0, 0));
}

async fn reset_checkpoint_forgets_the_position(ctx: Ctx) {
    let store = ctx.open().await;
    assert!(!store.reset_checkpoint(P).await.expect("reset"));
    let run = store.start_run(P, "manual").await.expect("start_run");
    store
        .commit_progress(run, P, &json!({"id": 5}), 5, 5)
        .await
        .expect("commit");
    assert!(store.reset_checkpoint(P).await.expect("reset"));
    assert_eq!(store.checkpoint(P).await.expect("checkpoint"), None);
    assert!(!store.reset_checkpoint(P).await.expect("reset again"));
    // The run's history stays.
    assert_eq!(
        store.run(run).await.expect("run").expect("kept").rows_read,
        5
    );
}

async fn start_run_records_a_running_run(ctx: Ctx) {
    let store = ctx.open().await;
    let first = store.start_run(P, "schedule").await.expect("start_run");
    let second = store.start_run(P, "manual").await.expect("start_run");
    assert!(second > first, "ids grow: {first} then {second}");

    let record = store.run(first).await.expect("run").expect("exists");
    assert_eq!(record.id, first);
    assert_eq!(record.pipeline, P);
    assert_eq!(record.trigger, "schedule");
    assert_eq!(record.outcome, RunOutcome::Running);
    assert_eq!(record.ended_at, None);
    assert_eq!((record.rows_read, record.rows_delivered), (0, 0));
    assert_eq!(record.error, None);
    assert_recent(record.started_at);
    assert_eq!(
        store
            .run(second)
            .await
            .expect("run")
            .expect("exists")
            .trigger,
        "manual"
    );
}

async fn update_run_counts_moves_only_running_runs(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    store.update_run_counts(run, 30, 25).await.expect("update");
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (30, 25));
    // No checkpoint is saved by a counters-only update.
    assert_eq!(store.checkpoint(P).await.expect("checkpoint"), None);

    store
        .finish_run(run, RunOutcome::Succeeded, 40, 40, None)
        .await
        .expect("finish");
    let err = store
        .update_run_counts(run, 50, 50)
        .await
        .expect_err("finished run");
    assert_eq!(err.kind(), ErrorKind::Store);
    let err = store
        .update_run_counts(run + 1000, 1, 1)
        .await
        .expect_err("unknown run");
    assert_eq!(err.kind(), ErrorKind::Store);
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (40, 40));
}

async fn finish_run_records_the_outcome_once(ctx: Ctx) {
    let store = ctx.open().await;
    for outcome in [
        RunOutcome::Succeeded,
        RunOutcome::Failed,
        RunOutcome::Cancelled,
        RunOutcome::Abandoned,
    ] {
        let run = store.start_run(P, "manual").await.expect("start_run");
        let error = (outcome == RunOutcome::Failed).then_some("sink answered 400: bad payload");
        store
            .finish_run(run, outcome, 9, 8, error)
            .await
            .expect("finish_run");
        let record = store.run(run).await.expect("run").expect("exists");
        assert_eq!(record.outcome, outcome);
        assert_eq!((record.rows_read, record.rows_delivered), (9, 8));
        assert_eq!(record.error.as_deref(), error);
        let ended = record.ended_at.expect("ended_at is set");
        assert!(ended >= record.started_at);

        let err = store
            .finish_run(run, RunOutcome::Succeeded, 1, 1, None)
            .await
            .expect_err("a run finishes once");
        assert_eq!(err.kind(), ErrorKind::Store);
        assert_eq!(store.run(run).await.expect("run").expect("exists"), record);
    }
    let err = store
        .finish_run(12345, RunOutcome::Failed, 0, 0, Some("x"))
        .await
        .expect_err("unknown run");
    assert_eq!(err.kind(), ErrorKind::Store);
}

async fn finish_run_refuses_running_as_an_outcome(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    let err = store
        .finish_run(run, RunOutcome::Running, 1, 1, None)
        .await
        .expect_err("running is not final");
    assert_eq!(err.kind(), ErrorKind::Internal);
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!(record.ended_at, None);
}

async fn run_of_an_unknown_id_is_none(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.run(1).await.expect("run"), None);
    assert_eq!(store.run(-5).await.expect("run"), None);
    assert_eq!(store.run(i64::MAX).await.expect("run"), None);
}

async fn runs_are_newest_first_filtered_and_limited(ctx: Ctx) {
    let store = ctx.open().await;
    assert!(store.runs(None, 10).await.expect("runs").is_empty());
    let mut mine = Vec::new();
    let mut all = Vec::new();
    for i in 0..8 {
        let pipeline = if i % 3 == 0 { "other" } else { P };
        let id = store
            .start_run(pipeline, "schedule")
            .await
            .expect("start_run");
        if pipeline == P {
            mine.push(id);
        }
        all.push(id);
    }
    mine.reverse();
    all.reverse();
    let ids =
        |runs: Vec<caudal_store::RunRecord>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();

    assert_eq!(ids(store.runs(None, 100).await.expect("runs")), all);
    assert_eq!(ids(store.runs(None, 3).await.expect("runs")), all[..3]);
    assert_eq!(ids(store.runs(Some(P), 100).await.expect("runs")), mine);
    assert_eq!(ids(store.runs(Some(P), 2).await.expect("runs")), mine[..2]);
    assert!(store.runs(Some(P), 0).await.expect("runs").is_empty());
    assert!(
        store
            .runs(Some("nobody"), 10)
            .await
            .expect("runs")
            .is_empty()
    );
    assert_eq!(store.runs(None, u32::MAX).await.expect("runs").len(), 8);
    let records = store.runs(Some(P), 100).await.expect("runs");
    assert!(records.iter().all(|r| r.pipeline == P));
    assert!(
        records
            .windows(2)
            .all(|w| w[0].started_at >= w[1].started_at)
    );
}

async fn last_run_is_the_most_recently_started(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.last_run(P).await.expect("last_run"), None);
    let first = store.start_run(P, "schedule").await.expect("start_run");
    store
        .finish_run(first, RunOutcome::Failed, 0, 0, Some("boom"))
        .await
        .expect("finish");
    let second = store.start_run(P, "manual").await.expect("start_run");
    store.start_run("other", "manual").await.expect("start_run");
    let last = store.last_run(P).await.expect("last_run").expect("exists");
    assert_eq!(last.id, second);
    assert_eq!(last.outcome, RunOutcome::Running);
}

async fn abandon_running_marks_only_running_runs_of_the_pipeline(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.abandon_running(P).await.expect("abandon"), 0);
    let done = store.start_run(P, "manual").await.expect("start_run");
    store
        .finish_run(done, RunOutcome::Succeeded, 3, 3, None)
        .await
        .expect("finish");
    let crashed_a = store.start_run(P, "schedule").await.expect("start_run");
    let crashed_b = store.start_run(P, "schedule").await.expect("start_run");
    store
        .update_run_counts(crashed_b, 7, 5)
        .await
        .expect("update");
    let elsewhere = store
        .start_run("other", "schedule")
        .await
        .expect("start_run");

    assert_eq!(store.abandon_running(P).await.expect("abandon"), 2);
    for id in [crashed_a, crashed_b] {
        let record = store.run(id).await.expect("run").expect("exists");
        assert_eq!(record.outcome, RunOutcome::Abandoned);
        assert!(record.ended_at.is_some());
        assert!(record.error.is_some(), "an abandoned run says why");
    }
    let record = store.run(crashed_b).await.expect("run").expect("exists");
    assert_eq!(
        (record.rows_read, record.rows_delivered),
        (7, 5),
        "counters are kept"
    );
    let record = store.run(done).await.expect("run").expect("exists");
    assert_eq!(record.outcome, RunOutcome::Succeeded);
    assert_eq!(record.error, None);
    let record = store.run(elsewhere).await.expect("run").expect("exists");
    assert_eq!(record.outcome, RunOutcome::Running);

    assert_eq!(store.abandon_running(P).await.expect("abandon again"), 0);
}

async fn next_run_round_trips(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.next_run(P).await.expect("next_run"), None);
    let at: Timestamp = "2030-01-02T03:04:05.123456Z".parse().expect("timestamp");
    store.set_next_run(P, Some(at)).await.expect("set");
    assert_eq!(store.next_run(P).await.expect("next_run"), Some(at));
    assert_eq!(store.next_run("other").await.expect("next_run"), None);

    let later = at + jiff::SignedDuration::from_hours(1);
    store.set_next_run(P, Some(later)).await.expect("set");
    assert_eq!(store.next_run(P).await.expect("next_run"), Some(later));
    store.set_next_run(P, None).await.expect("clear");
    assert_eq!(store.next_run(P).await.expect("next_run"), None);

    // Instants far from now, and before the epoch, are kept as they are.
    for at in ["1960-06-01T00:00:00Z", "9999-12-30T21:59:59.999999Z"] {
        let at: Timestamp = at.parse().expect("timestamp");
        store.set_next_run(P, Some(at)).await.expect("set");
        assert_eq!(store.next_run(P).await.expect("next_run"), Some(at));
    }
}

const TTL: Duration = Duration::from_secs(60);
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Longer than [`SHORT_TTL`], with room for SQLite's millisecond clock.
const PAST_SHORT_TTL: Duration = Duration::from_millis(1300);

async fn lease_is_exclusive_and_reentrant(ctx: Ctx) {
    let store = ctx.open().await;
    let lease = "pipeline:orders";
    assert_eq!(
        store
            .try_acquire_lease(lease, "a", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    match store
        .try_acquire_lease(lease, "b", TTL)
        .await
        .expect("acquire")
    {
        LeaseOutcome::Held { holder, expires_at } => {
            assert_eq!(holder, "a");
            assert!(expires_at > Timestamp::now() + Duration::from_secs(30));
        }
        LeaseOutcome::Acquired => panic!("b acquired a lease that a holds"),
    }
    // Acquiring again as the holder renews.
    assert_eq!(
        store
            .try_acquire_lease(lease, "a", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    // Leases are independent of each other.
    assert_eq!(
        store
            .try_acquire_lease("pipeline:other", "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
}

async fn lease_can_be_acquired_once_expired(ctx: Ctx) {
    let store = ctx.open().await;
    let lease = "pipeline:orders";
    assert_eq!(
        store
            .try_acquire_lease(lease, "a", SHORT_TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    assert!(matches!(
        store
            .try_acquire_lease(lease, "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Held { .. }
    ));
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(
        store
            .try_acquire_lease(lease, "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    // The old holder finds out when it next renews.
    assert!(!store.renew_lease(lease, "a", TTL).await.expect("renew"));
    match store
        .try_acquire_lease(lease, "a", TTL)
        .await
        .expect("acquire")
    {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "b"),
        LeaseOutcome::Acquired => panic!("a took back b's live lease"),
    }
}

async fn renew_lease_extends_and_reports_loss(ctx: Ctx) {
    let store = ctx.open().await;
    let lease = "pipeline:orders";
    assert!(
        !store
            .renew_lease(lease, "a", TTL)
            .await
            .expect("renew unknown")
    );
    store
        .try_acquire_lease(lease, "a", SHORT_TTL)
        .await
        .expect("acquire");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store
            .renew_lease(lease, "a", SHORT_TTL)
            .await
            .expect("renew")
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // 1.3 s after acquiring with a 1 s TTL: only the renewal keeps it.
    match store
        .try_acquire_lease(lease, "b", TTL)
        .await
        .expect("acquire")
    {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "a"),
        LeaseOutcome::Acquired => panic!("the renewal did not extend the lease"),
    }
    assert!(
        !store
            .renew_lease(lease, "b", TTL)
            .await
            .expect("renew by another")
    );
    // Expired but not taken by anyone: the holder may still renew it.
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert!(
        store
            .renew_lease(lease, "a", TTL)
            .await
            .expect("renew late")
    );
    assert!(matches!(
        store
            .try_acquire_lease(lease, "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Held { .. }
    ));
}

async fn release_lease_frees_it_only_for_its_holder(ctx: Ctx) {
    let store = ctx.open().await;
    let lease = "pipeline:orders";
    store
        .release_lease(lease, "a")
        .await
        .expect("release unknown");
    store
        .try_acquire_lease(lease, "a", TTL)
        .await
        .expect("acquire");
    store
        .release_lease(lease, "b")
        .await
        .expect("release by another");
    assert!(matches!(
        store
            .try_acquire_lease(lease, "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Held { .. }
    ));
    store.release_lease(lease, "a").await.expect("release");
    assert_eq!(
        store
            .try_acquire_lease(lease, "b", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    assert!(!store.renew_lease(lease, "a", TTL).await.expect("renew"));
}

async fn take_over_lease_is_a_compare_and_swap(ctx: Ctx) {
    let store = ctx.open().await;
    let lease = "pipeline:orders";
    assert!(
        !store
            .take_over_lease(lease, "a", "c", TTL)
            .await
            .expect("take over a missing lease")
    );
    store
        .try_acquire_lease(lease, "a", TTL)
        .await
        .expect("acquire");
    assert!(
        !store
            .take_over_lease(lease, "b", "c", TTL)
            .await
            .expect("wrong expected holder")
    );
    assert!(
        store
            .take_over_lease(lease, "a", "c", TTL)
            .await
            .expect("take over a live lease from a dead holder")
    );
    // A second taker that also believed `a` was the holder loses.
    assert!(
        !store
            .take_over_lease(lease, "a", "d", TTL)
            .await
            .expect("stale expectation")
    );
    assert!(!store.renew_lease(lease, "a", TTL).await.expect("renew"));
    assert!(store.renew_lease(lease, "c", TTL).await.expect("renew"));
    match store
        .try_acquire_lease(lease, "b", TTL)
        .await
        .expect("acquire")
    {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "c"),
        LeaseOutcome::Acquired => panic!("b acquired c's lease"),
    }
}

/// Many processes (each with its own store and pool) race for one lease.
async fn race_for_lease(
    ctx: &Ctx,
    lease: &'static str,
    racers: usize,
) -> Vec<(String, LeaseOutcome)> {
    let mut stores = Vec::new();
    for _ in 0..racers {
        stores.push(ctx.open().await);
    }
    let barrier = Arc::new(Barrier::new(racers));
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let holder = format!("racer-{i}");
                barrier.wait().await;
                let outcome = store
                    .try_acquire_lease(lease, &holder, TTL)
                    .await
                    .unwrap_or_else(|e| panic!("{holder}: {}", e.report()));
                store.close().await;
                (holder, outcome)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("racer"));
    }
    outcomes
}

fn assert_exactly_one_winner(outcomes: &[(String, LeaseOutcome)]) {
    let winners: Vec<&str> = outcomes
        .iter()
        .filter(|(_, outcome)| *outcome == LeaseOutcome::Acquired)
        .map(|(holder, _)| holder.as_str())
        .collect();
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    for (holder, outcome) in outcomes {
        if let LeaseOutcome::Held {
            holder: current, ..
        } = outcome
        {
            assert_eq!(current, winners[0], "{holder} was told the wrong holder");
        }
    }
}

async fn concurrent_acquirers_of_a_free_lease_exactly_one_wins(ctx: Ctx) {
    let outcomes = race_for_lease(&ctx, "pipeline:orders", 16).await;
    assert_exactly_one_winner(&outcomes);
}

async fn concurrent_acquirers_of_an_expired_lease_exactly_one_wins(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease("pipeline:orders", "dead", SHORT_TTL)
        .await
        .expect("acquire");
    tokio::time::sleep(PAST_SHORT_TTL).await;
    let outcomes = race_for_lease(&ctx, "pipeline:orders", 16).await;
    assert_exactly_one_winner(&outcomes);
}

async fn odd_names_and_positions_round_trip(ctx: Ctx) {
    let store = ctx.open().await;
    let names = [
        "",
        "it's",
        "a\"b",
        "naïve ☃ 数据",
        "x; DROP TABLE runs; --",
        "$1 ?",
    ];
    let position = json!({
        "big": u64::MAX,
        "negative": i64::MIN,
        "float": 1.5,
        "nested": {"list": [null, true, "ü"], "empty": {}},
        "text": "line\nbreak \"quoted\" \\ backslash",
    });
    for name in names {
        let run = store.start_run(name, name).await.expect("start_run");
        store
            .commit_progress(run, name, &position, 1, 1)
            .await
            .expect("commit_progress");
        let checkpoint = store
            .checkpoint(name)
            .await
            .expect("checkpoint")
            .expect("saved");
        assert_eq!(checkpoint.pipeline, name);
        assert_eq!(checkpoint.position, position);
        let record = store
            .last_run(name)
            .await
            .expect("last_run")
            .expect("exists");
        assert_eq!(
            (record.pipeline.as_str(), record.trigger.as_str()),
            (name, name)
        );
        store
            .finish_run(run, RunOutcome::Failed, 1, 1, Some(name))
            .await
            .expect("finish");
        assert_eq!(
            store
                .try_acquire_lease(name, name, TTL)
                .await
                .expect("lease"),
            LeaseOutcome::Acquired
        );
    }
    assert_eq!(
        store.runs(None, 100).await.expect("runs").len(),
        names.len()
    );
    // Scalars are positions too.
    let run = store.start_run(P, "manual").await.expect("start_run");
    for position in [json!(null), json!("text"), json!(0), json!([])] {
        store
            .commit_progress(run, P, &position, 1, 1)
            .await
            .expect("commit_progress");
        assert_eq!(
            store
                .checkpoint(P)
                .await
                .expect("checkpoint")
                .expect("saved")
                .position,
            position
        );
    }
}

async fn counters_beyond_i64_are_refused_not_truncated(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "manual").await.expect("start_run");
    let max = i64::MAX as u64;
    store
        .update_run_counts(run, max, max)
        .await
        .expect("i64::MAX fits");
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (max, max));

    let err = store
        .update_run_counts(run, max + 1, 0)
        .await
        .expect_err("too big");
    assert_eq!(err.kind(), ErrorKind::Internal);
    let err = store
        .commit_progress(run, P, &json!(1), 0, u64::MAX)
        .await
        .expect_err("too big");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(store.checkpoint(P).await.expect("checkpoint"), None);
    let err = store
        .finish_run(run, RunOutcome::Succeeded, u64::MAX, 0, None)
        .await
        .expect_err("too big");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(
        store.run(run).await.expect("run").expect("exists").outcome,
        RunOutcome::Running
    );
}

fn letter(n: u32) -> NewDeadLetter {
    NewDeadLetter {
        batch_key: format!("orders-batch-{n}"),
        event_id: format!("ev-{n}"),
        record_key: n.is_multiple_of(2).then(|| format!("k{n}")),
        position: json!({"kind": "cursor", "values": [n]}),
        record: json!({"id": n, "note": "it's \"quoted\" ✓"}),
        reason: format!("POST answered 400 for record {n}"),
        status: Some(400),
        response_excerpt: Some("{\"error\":\"bad status_id\"}".into()),
        attempts: n,
        first_attempt_at: Some(Timestamp::from_second(1_700_000_000).expect("ts")),
        last_attempt_at: Some(Timestamp::from_second(1_700_000_060).expect("ts")),
    }
}

async fn dead_letters_are_kept_listed_and_resolved_once(ctx: Ctx) {
    let store = ctx.open().await;
    let ids = store
        .add_dead_letters(P, &[letter(1), letter(2), letter(3)])
        .await
        .expect("add");
    store
        .add_dead_letters("other", &[letter(9)])
        .await
        .expect("add other");
    assert_eq!(ids.len(), 3);
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 3);

    let listed = store
        .dead_letters(Some(P), None, 0, 100)
        .await
        .expect("list");
    assert_eq!(listed.iter().map(|l| l.id).collect::<Vec<_>>(), ids);
    let first = &listed[0];
    let expected = letter(1);
    assert_eq!(first.pipeline, P);
    assert_eq!(first.record, expected.record);
    assert_eq!(first.position, expected.position);
    assert_eq!(first.status, Some(400));
    assert_eq!(first.attempts, 1);
    assert_eq!(first.record_key, None);
    assert_eq!(listed[1].record_key.as_deref(), Some("k2"));
    assert_eq!(first.first_attempt_at, expected.first_attempt_at);
    assert_eq!(first.state, DeadLetterState::Pending);
    assert_recent(first.created_at);

    // Paging and filtering.
    let page = store
        .dead_letters(Some(P), None, ids[0], 1)
        .await
        .expect("page");
    assert_eq!(page.iter().map(|l| l.id).collect::<Vec<_>>(), [ids[1]]);
    assert_eq!(
        store
            .dead_letters(None, None, 0, 100)
            .await
            .expect("all")
            .len(),
        4
    );

    // Resolving changes pending letters once; the rows stay.
    assert_eq!(
        store
            .resolve_dead_letters(&ids[..2], DeadLetterState::Replayed)
            .await
            .expect("replay"),
        2
    );
    assert_eq!(
        store
            .resolve_dead_letters(&ids, DeadLetterState::Discarded)
            .await
            .expect("discard"),
        1
    );
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 0);
    let states: Vec<DeadLetterState> = store
        .dead_letters(Some(P), None, 0, 100)
        .await
        .expect("list")
        .iter()
        .map(|l| l.state)
        .collect();
    assert_eq!(
        states,
        [
            DeadLetterState::Replayed,
            DeadLetterState::Replayed,
            DeadLetterState::Discarded
        ]
    );
    let pending = store
        .dead_letters(Some(P), Some(DeadLetterState::Pending), 0, 100)
        .await
        .expect("pending");
    assert!(pending.is_empty());
    assert_eq!(
        store
            .dead_letter(ids[2])
            .await
            .expect("one")
            .expect("exists")
            .state,
        DeadLetterState::Discarded
    );
    assert_eq!(store.dead_letter(999_999).await.expect("none"), None);
    let err = store
        .resolve_dead_letters(&ids, DeadLetterState::Pending)
        .await
        .expect_err("pending is not a resolution");
    assert_eq!(err.kind(), ErrorKind::Internal);
}

/// A batch sent again after a crash and refused again leaves one pending
/// letter per record; once that letter is replayed, a new refusal is a new
/// letter.
async fn a_batch_refused_again_keeps_one_pending_letter_per_record(ctx: Ctx) {
    let store = ctx.open().await;
    let first = store
        .add_dead_letters_once(P, &[letter(1), letter(2)])
        .await
        .expect("add");
    let mut other_batch = letter(2);
    other_batch.batch_key = "orders-batch-7".into();
    let again = store
        .add_dead_letters_once(P, &[letter(2), letter(1), other_batch, letter(3)])
        .await
        .expect("add again");
    assert_eq!(again[..2], [first[1], first[0]]);
    assert!(!first.contains(&again[2]) && !first.contains(&again[3]));
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 4);
    // Another pipeline's letter for the same batch and record is its own.
    let elsewhere = store
        .add_dead_letters_once("other", &[letter(1)])
        .await
        .expect("add other");
    assert!(!first.contains(&elsewhere[0]));

    store
        .resolve_dead_letters(&first[..1], DeadLetterState::Replayed)
        .await
        .expect("replay");
    let refused = store
        .add_dead_letters_once(P, &[letter(1)])
        .await
        .expect("refused after replay");
    assert!(!first.contains(&refused[0]));
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 4);
    // Plain adds (a replay refused again) are always new letters.
    let plain = store
        .add_dead_letters(P, &[letter(1)])
        .await
        .expect("plain add");
    assert_ne!(plain, refused);
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 5);
}

async fn save_checkpoint_and_late_delivered_counts(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .save_checkpoint(P, &json!({"at": 1}))
        .await
        .expect("save");
    assert_eq!(
        store
            .checkpoint(P)
            .await
            .expect("read")
            .expect("some")
            .position,
        json!({"at": 1})
    );
    store
        .save_checkpoint(P, &json!({"at": 2}))
        .await
        .expect("save again");
    assert_eq!(
        store
            .checkpoint(P)
            .await
            .expect("read")
            .expect("some")
            .position,
        json!({"at": 2})
    );

    // Delivery reports rows after the run that buffered them has ended.
    let run = store.start_run(P, "schedule").await.expect("start");
    store
        .finish_run(run, RunOutcome::Succeeded, 10, 0, None)
        .await
        .expect("finish");
    store.add_run_delivered(run, 4).await.expect("add");
    store.add_run_delivered(run, 6).await.expect("add");
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!(
        (record.rows_read, record.rows_delivered, record.outcome),
        (10, 10, RunOutcome::Succeeded)
    );
}

/// How many migrations the crate ships (the same number per backend).
fn migration_files() -> i64 {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
    let n = std::fs::read_dir(dir).expect("migrations dir").count();
    i64::try_from(n).expect("a small number")
}

/// Intake passes `None` for the delivered counter: it keeps what delivery
/// added meanwhile, through progress commits and the run's end.
async fn counts_left_out_keep_what_delivery_added(ctx: Ctx) {
    let store = ctx.open().await;
    let run = store.start_run(P, "schedule").await.expect("start");
    store.add_run_delivered(run, 3).await.expect("add");
    store
        .commit_progress(run, P, &json!({"n": 1}), 5, None)
        .await
        .expect("commit");
    store.update_run_counts(run, 7, None).await.expect("update");
    store.add_run_delivered(run, 2).await.expect("add");
    store
        .finish_run(run, RunOutcome::Succeeded, 9, None, None)
        .await
        .expect("finish");
    let record = store.run(run).await.expect("run").expect("exists");
    assert_eq!((record.rows_read, record.rows_delivered), (9, 5));
}

async fn circuit_state_round_trips(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.circuit_state(P).await.expect("read"), None);
    store.set_circuit_state(P, "open").await.expect("save");
    let state = store.circuit_state(P).await.expect("read").expect("some");
    assert_eq!(state.circuit, "open");
    assert_recent(state.updated_at);
    store.set_circuit_state(P, "closed").await.expect("save");
    assert_eq!(
        store
            .circuit_state(P)
            .await
            .expect("read")
            .expect("some")
            .circuit,
        "closed"
    );
    assert_eq!(store.circuit_state("other").await.expect("read"), None);
}

async fn source_states_round_trip_and_list_by_prefix(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.source_state(P).await.expect("read"), None);
    store
        .set_source_state(P, &json!({"lag_bytes": 10}))
        .await
        .expect("save");
    store
        .set_source_state(P, &json!({"lag_bytes": 20}))
        .await
        .expect("overwrite");
    let state = store.source_state(P).await.expect("read").expect("some");
    assert_eq!(state.state, json!({"lag_bytes": 20}));
    assert_recent(state.updated_at);
    for name in ["slot/a", "slot/b", "slotx", "backfill/a/1"] {
        store
            .set_source_state(name, &json!({"name": name}))
            .await
            .expect("save");
    }
    let listed: Vec<String> = store
        .source_states_with_prefix("slot/")
        .await
        .expect("list")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(listed, ["slot/a", "slot/b"]);
    store.clear_source_state("slot/a").await.expect("clear");
    assert_eq!(store.source_state("slot/a").await.expect("read"), None);
    assert_eq!(
        store
            .source_states_with_prefix("slot/")
            .await
            .expect("list")
            .len(),
        1
    );
}

async fn tokens_are_kept_by_hash_revoked_and_audited(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .create_token("dash", "viewer", "hash-1")
        .await
        .expect("create");
    let again = store.create_token("dash", "admin", "hash-2").await;
    assert_eq!(again.expect_err("a name in use").kind(), ErrorKind::Config);
    let found = store
        .token_by_hash("hash-1")
        .await
        .expect("look up")
        .expect("found");
    assert_eq!(
        (found.name.as_str(), found.role.as_str()),
        ("dash", "viewer")
    );
    assert_recent(found.created_at);
    assert_eq!(found.revoked_at, None);
    assert_eq!(store.token_by_hash("nope").await.expect("look up"), None);
    assert!(store.revoke_token("dash").await.expect("revoke"));
    assert!(!store.revoke_token("dash").await.expect("revoke again"));
    let listed = store.tokens().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at.is_some());
    store
        .add_audit("dash", "POST", "/api/v1/pipelines/p/pause", 200)
        .await
        .expect("audit");
    store
        .add_audit("root", "POST", "/api/v1/dead-letters/3/discard", 409)
        .await
        .expect("audit");
    let audit = store.audit(10).await.expect("read the audit log");
    let seen: Vec<(&str, u16)> = audit.iter().map(|a| (a.token.as_str(), a.status)).collect();
    assert_eq!(seen, [("root", 409), ("dash", 200)], "newest first");
}

async fn runs_page_by_pipeline_outcome_and_cursor(ctx: Ctx) {
    let store = ctx.open().await;
    let mut ids = Vec::new();
    for (pipeline, outcome) in [
        (P, RunOutcome::Succeeded),
        (P, RunOutcome::Failed),
        ("other", RunOutcome::Succeeded),
        (P, RunOutcome::Succeeded),
    ] {
        let id = store.start_run(pipeline, "schedule").await.expect("start");
        store
            .finish_run(id, outcome, 0, None, None)
            .await
            .expect("finish");
        ids.push(id);
    }
    let page = |p: Option<&'static str>, o: Option<&'static str>, before: Option<i64>| {
        let store = store.clone();
        async move {
            store
                .runs_page(p, o, before, 2)
                .await
                .expect("a page")
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(Some(P), None, None).await, [ids[3], ids[1]]);
    assert_eq!(page(Some(P), None, Some(ids[1])).await, [ids[0]]);
    assert_eq!(page(None, Some("succeeded"), None).await, [ids[3], ids[2]]);
    assert_eq!(page(Some(P), Some("failed"), None).await, [ids[1]]);
}
