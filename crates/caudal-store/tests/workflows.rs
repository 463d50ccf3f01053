//! Workflow runs, tasks and attempts in the store, checked against every
//! backend: creation with a batch id and a directory, fenced batches of
//! changes (the last write of a key in a batch wins, a writer without the
//! lease writes nothing), requeueing an ended run, cancel requests, and
//! pruning of ended runs only.

mod support;

use std::time::Duration;

use caudal_store::{AttemptRow, NewWorkflowRun, RunChange, RunFilter, Store, TaskRow};
use jiff::Timestamp;
use support::{Backend, Ctx};

backend_tests!(
    a_run_gets_a_batch_id_and_a_directory,
    changes_are_written_only_by_the_lease_holder,
    the_last_write_of_a_key_in_a_batch_wins,
    an_ended_run_is_requeued_with_the_tasks_given,
    cancel_is_asked_only_of_unfinished_runs,
    only_ended_runs_are_pruned,
);

const LEASE: &str = "workflows/executor";
const TTL: Duration = Duration::from_secs(30);

async fn new_run(store: &Store, workflow: &str, logical: Option<Timestamp>) -> i64 {
    store
        .create_workflow_run(
            &NewWorkflowRun {
                workflow: workflow.into(),
                triggered_by: "schedule".into(),
                logical_date: logical,
                params: r#"{"pages": 3}"#.into(),
                state: "queued".into(),
            },
            "/var/lib/caudal/runs",
        )
        .await
        .expect("create a run")
        .id
}

fn task(run_id: i64, name: &str, index: i64, state: &str) -> TaskRow {
    TaskRow {
        run_id,
        task: name.into(),
        map_index: index,
        state: state.into(),
        attempts: 0,
        failures: 0,
        item: (index >= 0).then(|| format!("\"u{index}\"")),
        outputs: None,
        items: None,
        not_before: None,
        queued_at: None,
        started_at: None,
        ended_at: None,
        error: None,
    }
}

fn attempt(run_id: i64, name: &str, n: u32, state: &str) -> AttemptRow {
    AttemptRow {
        run_id,
        task: name.into(),
        map_index: -1,
        attempt: n,
        holder: "me".into(),
        pid: None,
        state: state.into(),
        exit_code: None,
        error: None,
        stderr_tail: None,
        started_at: Timestamp::now(),
        ended_at: None,
    }
}

fn ended(id: i64, state: &str, at: Timestamp) -> RunChange {
    RunChange {
        id,
        state: state.into(),
        started_at: Some(at),
        ended_at: Some(at),
        error: None,
    }
}

async fn a_run_gets_a_batch_id_and_a_directory(ctx: Ctx) {
    let store = ctx.open().await;
    let backend = match ctx.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(
        store.backend(),
        backend,
        "the workflow tables live in {backend}"
    );
    let logical: Timestamp = "2026-01-02T12:00:00Z".parse().expect("a time");
    let id = new_run(&store, "seed004", Some(logical)).await;
    let run = store
        .workflow_run(id)
        .await
        .expect("read")
        .expect("the run");
    assert_eq!(run.batch_id, format!("seed004-20260102T120000-{id}"));
    assert_eq!(run.dir, format!("/var/lib/caudal/runs/seed004/{id}"));
    assert_eq!(run.state, "queued");
    assert_eq!(run.params, r#"{"pages": 3}"#);
    assert_eq!(
        store
            .last_scheduled_workflow_run("seed004")
            .await
            .expect("last"),
        Some(logical)
    );
    let second = new_run(&store, "seed004", None).await;
    assert!(second > id, "ids grow");
    let unfinished = store
        .workflow_runs(&RunFilter {
            workflow: Some("seed004"),
            unfinished: true,
            limit: 0,
        })
        .await
        .expect("list");
    assert_eq!(
        unfinished.iter().map(|r| r.id).collect::<Vec<_>>(),
        [second, id],
        "newest first"
    );
}

async fn changes_are_written_only_by_the_lease_holder(ctx: Ctx) {
    let store = ctx.open().await;
    let id = new_run(&store, "w", None).await;
    let rows = [task(id, "a", -1, "running")];
    let tries = [attempt(id, "a", 1, "running")];
    // Nobody holds the lease: nothing is written.
    let saved = store
        .save_workflow_changes(LEASE, "me", &rows, &tries, &[])
        .await
        .expect("save");
    assert!(!saved);
    assert!(store.workflow_tasks(id).await.expect("tasks").is_empty());
    store
        .try_acquire_lease(LEASE, "other", TTL)
        .await
        .expect("acquire");
    assert!(
        !store
            .save_workflow_changes(LEASE, "me", &rows, &tries, &[])
            .await
            .expect("save")
    );
    store.release_lease(LEASE, "other").await.expect("release");
    store
        .try_acquire_lease(LEASE, "me", TTL)
        .await
        .expect("acquire");
    assert!(
        store
            .save_workflow_changes(LEASE, "me", &rows, &tries, &[])
            .await
            .expect("save")
    );
    let tasks = store.workflow_tasks(id).await.expect("tasks");
    assert_eq!(tasks, rows);
    let attempts = store.workflow_attempts(id).await.expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].state, "running");
}

async fn the_last_write_of_a_key_in_a_batch_wins(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "me", TTL)
        .await
        .expect("acquire");
    let id = new_run(&store, "w", None).await;
    // Two batches merged by the writer: the same instance and attempt
    // appear twice; many instances need more than one statement.
    let mut rows: Vec<TaskRow> = (0..1200).map(|i| task(id, "each", i, "queued")).collect();
    rows.push(task(id, "each", 7, "running"));
    rows.push(task(id, "each", 7, "succeeded"));
    let mut done = attempt(id, "a", 1, "running");
    let mut tries = vec![done.clone()];
    done.state = "succeeded".into();
    done.pid = Some(4242);
    done.ended_at = Some(Timestamp::now());
    tries.push(done);
    let at = Timestamp::now();
    assert!(
        store
            .save_workflow_changes(LEASE, "me", &rows, &tries, &[ended(id, "succeeded", at)])
            .await
            .expect("save")
    );
    let tasks = store.workflow_tasks(id).await.expect("tasks");
    assert_eq!(tasks.len(), 1200);
    let counts = store
        .workflow_task_counts(&[id, id + 1000])
        .await
        .expect("counts");
    let of_run: Vec<(&str, u64)> = counts[&id].iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(of_run, [("queued", 1199), ("succeeded", 1)]);
    assert!(
        counts[&(id + 1000)].is_empty(),
        "a run without tasks counts none"
    );
    let seventh = tasks.iter().find(|t| t.map_index == 7).expect("instance 7");
    assert_eq!(seventh.state, "succeeded");
    assert_eq!(seventh.item.as_deref(), Some("\"u7\""));
    let attempts = store.workflow_attempts(id).await.expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].state.as_str(), attempts[0].pid),
        ("succeeded", Some(4242))
    );
    let run = store.workflow_run(id).await.expect("read").expect("run");
    assert_eq!(run.state, "succeeded");
}

async fn an_ended_run_is_requeued_with_the_tasks_given(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "me", TTL)
        .await
        .expect("acquire");
    let id = new_run(&store, "w", None).await;
    let rows = [
        task(id, "a", -1, "succeeded"),
        task(id, "b", -1, "failed"),
        task(id, "b", 0, "failed"),
    ];
    // A run that has not ended cannot be requeued.
    assert!(
        !store
            .requeue_workflow_run(id, &[], &[])
            .await
            .expect("requeue")
    );
    store
        .save_workflow_changes(
            LEASE,
            "me",
            &rows,
            &[],
            &[ended(id, "failed", Timestamp::now())],
        )
        .await
        .expect("save");
    let again = [task(id, "b", -1, "pending")];
    assert!(
        store
            .requeue_workflow_run(id, &again, &[("b".into(), 0)])
            .await
            .expect("requeue")
    );
    let run = store.workflow_run(id).await.expect("read").expect("run");
    assert_eq!((run.state.as_str(), run.ended_at), ("queued", None));
    let states: Vec<(String, i64, String)> = store
        .workflow_tasks(id)
        .await
        .expect("tasks")
        .into_iter()
        .map(|t| (t.task, t.map_index, t.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a".into(), -1, "succeeded".into()),
            ("b".into(), -1, "pending".into())
        ]
    );
}

async fn cancel_is_asked_only_of_unfinished_runs(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "me", TTL)
        .await
        .expect("acquire");
    let id = new_run(&store, "w", None).await;
    assert!(store.request_workflow_cancel(id).await.expect("cancel"));
    let run = store.workflow_run(id).await.expect("read").expect("run");
    assert!(run.cancel_requested);
    store
        .save_workflow_changes(
            LEASE,
            "me",
            &[],
            &[],
            &[ended(id, "cancelled", Timestamp::now())],
        )
        .await
        .expect("save");
    assert!(!store.request_workflow_cancel(id).await.expect("cancel"));
    assert!(
        !store
            .request_workflow_cancel(id + 100)
            .await
            .expect("cancel")
    );
}

async fn only_ended_runs_are_pruned(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "me", TTL)
        .await
        .expect("acquire");
    let old = new_run(&store, "w", None).await;
    let running = new_run(&store, "w", None).await;
    let recent = new_run(&store, "w", None).await;
    let long_ago: Timestamp = "2020-01-01T00:00:00Z".parse().expect("a time");
    let mut still = ended(running, "running", long_ago);
    still.ended_at = None;
    store
        .save_workflow_changes(
            LEASE,
            "me",
            &[task(old, "a", -1, "succeeded")],
            &[attempt(old, "a", 1, "succeeded")],
            &[
                ended(old, "succeeded", long_ago),
                still,
                ended(recent, "failed", Timestamp::now()),
            ],
        )
        .await
        .expect("save");
    let cutoff = Timestamp::now() - jiff::SignedDuration::from_hours(24);
    let dirs = store.prune_workflow_runs(cutoff).await.expect("prune");
    assert_eq!(dirs, [format!("/var/lib/caudal/runs/w/{old}")]);
    assert!(store.workflow_run(old).await.expect("read").is_none());
    assert!(store.workflow_tasks(old).await.expect("tasks").is_empty());
    assert!(
        store
            .workflow_attempts(old)
            .await
            .expect("attempts")
            .is_empty()
    );
    assert!(store.workflow_run(running).await.expect("read").is_some());
    assert!(store.workflow_run(recent).await.expect("read").is_some());
}
