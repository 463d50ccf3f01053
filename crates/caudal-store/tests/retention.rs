//! Bounded history, checked against every backend: runs pruned by count and
//! age per pipeline, idle polls forgotten, resolved dead letters and audit
//! entries pruned by age; and what is never pruned (running runs, the
//! newest run of a pipeline, pending dead letters).
//!
//! The store writes only the current time, so tests age rows by moving
//! their timestamps back directly in the database.

mod support;

use std::time::Duration;

use caudal_store::{DeadLetterState, NewDeadLetter, PRUNE_BATCH, RunOutcome, Store};
use serde_json::json;
use support::{Backend, Ctx};

backend_tests!(
    prune_runs_keeps_the_newest_count_per_pipeline,
    prune_runs_by_age_spares_the_newest_and_running_runs,
    prune_runs_works_through_a_backlog_in_batches,
    forget_idle_run_deletes_only_idle_runs_and_records_the_poll,
    run_pipelines_lists_each_pipeline_once,
    prune_dead_letters_spares_pending_and_recently_resolved_ones,
    prune_audit_deletes_old_entries_through_a_backlog,
);

const P: &str = "orders";
const DAY_US: i64 = 86_400_000_000;
const DAY: Duration = Duration::from_secs(86_400);
/// An age nothing in these tests reaches.
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// Runs `sql` on the test's database behind the store's back; returns the
/// rows it changed.
async fn raw(ctx: &Ctx, sql: &str) -> u64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match ctx.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&ctx.url).await.expect("sqlite");
            let done = sqlx::query(sql).execute(&pool).await.expect("raw SQL");
            pool.close().await;
            done.rows_affected()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&ctx.url).await.expect("postgres");
            let done = sqlx::query(sql).execute(&pool).await.expect("raw SQL");
            pool.close().await;
            done.rows_affected()
        }
    }
}

/// Counts the rows of `table` directly.
async fn count(ctx: &Ctx, table: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"));
    match ctx.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&ctx.url).await.expect("sqlite");
            let n = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count");
            pool.close().await;
            n
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&ctx.url).await.expect("postgres");
            let n = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count");
            pool.close().await;
            n
        }
    }
}

/// Moves the times of runs `ids` `days` days back.
async fn age_runs(ctx: &Ctx, ids: &[i64], days: i64) {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let moved = raw(
        ctx,
        &format!(
            "UPDATE runs SET started_at = started_at - {us}, ended_at = ended_at - {us} \
             WHERE id IN ({})",
            list.join(", "),
            us = days * DAY_US
        ),
    )
    .await;
    assert_eq!(moved, ids.len() as u64, "every run to age exists");
}

/// Starts a run of `pipeline` and finishes it with `outcome` and `read`.
async fn finished_run(store: &Store, pipeline: &str, outcome: RunOutcome, read: u64) -> i64 {
    let id = store.start_run(pipeline, "schedule").await.expect("start");
    store
        .finish_run(id, outcome, read, None, None)
        .await
        .expect("finish");
    id
}

/// The ids of `pipeline`'s runs, oldest first.
async fn run_ids(store: &Store, pipeline: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = store
        .runs(Some(pipeline), u32::MAX)
        .await
        .expect("runs")
        .iter()
        .map(|r| r.id)
        .collect();
    ids.reverse();
    ids
}

async fn prune_runs_keeps_the_newest_count_per_pipeline(ctx: Ctx) {
    let store = ctx.open().await;
    let mut ids = Vec::new();
    for n in 0..7 {
        ids.push(finished_run(&store, P, RunOutcome::Succeeded, n).await);
    }
    // A run still running (its process may be alive): never pruned.
    let running = store.start_run(P, "schedule").await.expect("start");
    let failed = finished_run(&store, P, RunOutcome::Failed, 0).await;
    let others: Vec<i64> = [
        finished_run(&store, "other", RunOutcome::Succeeded, 1).await,
        finished_run(&store, "other", RunOutcome::Succeeded, 1).await,
    ]
    .to_vec();
    // Keep 3: the running run counts among them.
    let deleted = store.prune_runs(P, YEAR, 3).await.expect("prune");
    assert_eq!(deleted, 6);
    assert_eq!(run_ids(&store, P).await, [ids[6], running, failed]);
    assert_eq!(
        run_ids(&store, "other").await,
        others,
        "other pipelines untouched"
    );
    assert_eq!(
        store.prune_runs(P, YEAR, 3).await.expect("prune again"),
        0,
        "pruning again deletes nothing"
    );
    // A count of 0 still keeps the newest run.
    store
        .finish_run(running, RunOutcome::Cancelled, 0, None, None)
        .await
        .expect("finish");
    assert_eq!(store.prune_runs(P, YEAR, 0).await.expect("prune"), 2);
    assert_eq!(run_ids(&store, P).await, [failed]);
    assert_eq!(
        store.last_run(P).await.expect("last run").map(|r| r.id),
        Some(failed)
    );
}

async fn prune_runs_by_age_spares_the_newest_and_running_runs(ctx: Ctx) {
    let store = ctx.open().await;
    let old = finished_run(&store, P, RunOutcome::Succeeded, 5).await;
    let abandoned = store.start_run(P, "schedule").await.expect("start");
    store.abandon_running(P).await.expect("abandon");
    let running = store.start_run(P, "manual").await.expect("start");
    let recent = finished_run(&store, P, RunOutcome::Failed, 0).await;
    let newest_but_old = finished_run(&store, P, RunOutcome::Succeeded, 2).await;
    age_runs(&ctx, &[old, abandoned, running, newest_but_old], 3).await;
    // Another pipeline whose only run is old: its newest run stays.
    let lone = finished_run(&store, "other", RunOutcome::Succeeded, 1).await;
    age_runs(&ctx, &[lone], 10).await;

    let deleted = store.prune_runs(P, 2 * DAY, 1000).await.expect("prune");
    assert_eq!(deleted, 2, "the old finished and abandoned runs");
    assert_eq!(run_ids(&store, P).await, [running, recent, newest_but_old]);
    assert_eq!(
        store.prune_runs("other", DAY, 1000).await.expect("prune"),
        0
    );
    assert_eq!(run_ids(&store, "other").await, [lone]);
    // A longer age keeps everything.
    let again = finished_run(&store, P, RunOutcome::Succeeded, 1).await;
    assert_eq!(store.prune_runs(P, 4 * DAY, 1000).await.expect("prune"), 0);
    assert_eq!(
        run_ids(&store, P).await,
        [running, recent, newest_but_old, again]
    );
}

async fn prune_runs_works_through_a_backlog_in_batches(ctx: Ctx) {
    let store = ctx.open().await;
    let backlog = 2 * i64::from(PRUNE_BATCH) + 17;
    // A recent history written before pruning existed, in one statement:
    // one run a microsecond until now.
    let at = format!("(SELECT now_us FROM clock) - {backlog} + i");
    let insert = match ctx.backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {backlog}) \
             INSERT INTO runs (pipeline, triggered_by, started_at, ended_at, outcome) \
             SELECT '{P}', 'schedule', {at}, {at}, 'succeeded' FROM n"
        ),
        Backend::Postgres => format!(
            "INSERT INTO runs (pipeline, triggered_by, started_at, ended_at, outcome) \
             SELECT '{P}', 'schedule', {at}, {at}, 'succeeded' \
             FROM generate_series(1, {backlog}) AS i"
        ),
    };
    assert_eq!(raw(&ctx, &insert).await, backlog as u64);
    let newest = finished_run(&store, P, RunOutcome::Succeeded, 1).await;

    let deleted = store.prune_runs(P, YEAR, 10).await.expect("prune");
    assert_eq!(deleted, backlog as u64 + 1 - 10);
    let left = run_ids(&store, P).await;
    assert_eq!(left.len(), 10);
    assert_eq!(left.last(), Some(&newest));
    assert_eq!(count(&ctx, "runs").await, 10);

    // Once they are all old, only the newest run survives an age limit.
    assert_eq!(store.prune_runs(P, DAY, 10).await.expect("prune"), 0);
    age_runs(&ctx, &left, 2).await;
    assert_eq!(store.prune_runs(P, DAY, 10).await.expect("prune"), 9);
    assert_eq!(run_ids(&store, P).await, [newest]);
}

async fn forget_idle_run_deletes_only_idle_runs_and_records_the_poll(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.last_idle_poll(P).await.expect("read"), None);
    let with_rows = finished_run(&store, P, RunOutcome::Succeeded, 3).await;
    let failed = finished_run(&store, P, RunOutcome::Failed, 0).await;
    let cancelled = finished_run(&store, P, RunOutcome::Cancelled, 0).await;
    let running = store.start_run(P, "schedule").await.expect("start");
    // Read nothing but delivered what an earlier run left in the buffer.
    let delivering = store.start_run("other", "schedule").await.expect("start");
    store
        .add_run_delivered(delivering, 4)
        .await
        .expect("delivered");
    store
        .finish_run(delivering, RunOutcome::Succeeded, 0, None, None)
        .await
        .expect("finish");
    for id in [with_rows, failed, cancelled, running, delivering, i64::MAX] {
        assert!(
            !store.forget_idle_run(id).await.expect("forget"),
            "run {id} is not idle"
        );
    }
    assert_eq!(store.last_idle_poll(P).await.expect("read"), None);
    store
        .finish_run(running, RunOutcome::Succeeded, 0, None, None)
        .await
        .expect("finish");

    let next = jiff::Timestamp::from_second(1_800_000_000).expect("ts");
    store.set_next_run(P, Some(next)).await.expect("next run");
    let idle = store.run(running).await.expect("run").expect("exists");
    assert!(store.forget_idle_run(running).await.expect("forget"));
    assert_eq!(store.run(running).await.expect("run"), None);
    assert_eq!(
        store.last_idle_poll(P).await.expect("read"),
        idle.ended_at,
        "the poll's end is remembered"
    );
    assert_eq!(
        store.next_run(P).await.expect("next run"),
        Some(next),
        "the schedule is untouched"
    );
    assert!(
        !store.forget_idle_run(running).await.expect("forget again"),
        "a run is forgotten once"
    );
    assert_eq!(run_ids(&store, P).await, [with_rows, failed, cancelled]);

    // The first idle poll of a pipeline without a schedule row, and a
    // schedule saved afterwards keeps the poll.
    let first = finished_run(&store, "third", RunOutcome::Succeeded, 0).await;
    let ended = store
        .run(first)
        .await
        .expect("run")
        .expect("exists")
        .ended_at;
    assert!(store.forget_idle_run(first).await.expect("forget"));
    assert_eq!(store.last_idle_poll("third").await.expect("read"), ended);
    store.set_next_run("third", None).await.expect("next run");
    assert_eq!(store.last_idle_poll("third").await.expect("read"), ended);
}

async fn run_pipelines_lists_each_pipeline_once(ctx: Ctx) {
    let store = ctx.open().await;
    assert!(store.run_pipelines().await.expect("list").is_empty());
    for pipeline in ["b", "a", "b", "c.d"] {
        finished_run(&store, pipeline, RunOutcome::Succeeded, 1).await;
    }
    assert_eq!(
        store.run_pipelines().await.expect("list"),
        ["a", "b", "c.d"]
    );
}

fn letter(n: u32) -> NewDeadLetter {
    NewDeadLetter {
        batch_key: format!("orders-batch-{n}"),
        event_id: format!("ev-{n}"),
        record_key: None,
        position: json!({"kind": "cursor", "values": [n]}),
        record: json!({"id": n}),
        reason: format!("POST answered 400 for record {n}"),
        status: Some(400),
        response_excerpt: None,
        attempts: 1,
        first_attempt_at: None,
        last_attempt_at: None,
    }
}

async fn prune_dead_letters_spares_pending_and_recently_resolved_ones(ctx: Ctx) {
    let store = ctx.open().await;
    let ids = store
        .add_dead_letters(P, &[letter(1), letter(2), letter(3), letter(4)])
        .await
        .expect("add");
    let other = store
        .add_dead_letters("other", &[letter(5)])
        .await
        .expect("add");
    store
        .resolve_dead_letters(&[ids[0], other[0]], DeadLetterState::Replayed)
        .await
        .expect("replay");
    store
        .resolve_dead_letters(&[ids[1], ids[2]], DeadLetterState::Discarded)
        .await
        .expect("discard");
    // Letters 1, 2 and 5 were resolved 3 days ago; 3 just now; 4, still
    // pending, was created a year ago.
    let aged = raw(
        &ctx,
        &format!(
            "UPDATE dead_letters SET created_at = created_at - {us}, resolved_at = resolved_at - {us} \
             WHERE id IN ({}, {}, {})",
            ids[0],
            ids[1],
            other[0],
            us = 3 * DAY_US
        ),
    )
    .await;
    assert_eq!(aged, 3);
    raw(
        &ctx,
        &format!(
            "UPDATE dead_letters SET created_at = created_at - {} WHERE id = {}",
            365 * DAY_US,
            ids[3]
        ),
    )
    .await;

    assert_eq!(store.prune_dead_letters(4 * DAY).await.expect("prune"), 0);
    assert_eq!(store.prune_dead_letters(2 * DAY).await.expect("prune"), 3);
    let left: Vec<(i64, DeadLetterState)> = store
        .dead_letters(None, None, 0, 100)
        .await
        .expect("list")
        .iter()
        .map(|l| (l.id, l.state))
        .collect();
    assert_eq!(
        left,
        [
            (ids[2], DeadLetterState::Discarded),
            (ids[3], DeadLetterState::Pending)
        ]
    );
    // However old, a pending letter stays until it is resolved.
    raw(
        &ctx,
        &format!(
            "UPDATE dead_letters SET resolved_at = resolved_at - {} WHERE id = {}",
            DAY_US, ids[2]
        ),
    )
    .await;
    assert_eq!(
        store
            .prune_dead_letters(Duration::from_secs(60))
            .await
            .expect("prune"),
        1
    );
    assert_eq!(store.pending_dead_letters(P).await.expect("count"), 1);
    assert_eq!(count(&ctx, "dead_letters").await, 1);
}

async fn prune_audit_deletes_old_entries_through_a_backlog(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .add_audit("dash", "POST", "/api/v1/pipelines/p/pause", 200)
        .await
        .expect("audit");
    store
        .add_audit("dash", "POST", "/api/v1/pipelines/p/resume", 200)
        .await
        .expect("audit");
    raw(
        &ctx,
        &format!(
            "UPDATE audit_log SET at = at - {} WHERE path LIKE '%pause'",
            2 * DAY_US
        ),
    )
    .await;
    // Years of calls recorded before pruning existed.
    let backlog = 2 * i64::from(PRUNE_BATCH) + 3;
    let insert = match ctx.backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {backlog}) \
             INSERT INTO audit_log (at, token, method, path, status) \
             SELECT i, 'root', 'POST', '/api/v1/old', 200 FROM n"
        ),
        Backend::Postgres => format!(
            "INSERT INTO audit_log (at, token, method, path, status) \
             SELECT i, 'root', 'POST', '/api/v1/old', 200 FROM generate_series(1, {backlog}) AS i"
        ),
    };
    assert_eq!(raw(&ctx, &insert).await, backlog as u64);

    assert_eq!(
        store.prune_audit(DAY).await.expect("prune"),
        backlog as u64 + 1
    );
    let left: Vec<String> = store
        .audit(100)
        .await
        .expect("read")
        .into_iter()
        .map(|a| a.path)
        .collect();
    assert_eq!(left, ["/api/v1/pipelines/p/resume"]);
    assert_eq!(store.prune_audit(DAY).await.expect("prune again"), 0);
}
