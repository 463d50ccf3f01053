//! A node's workflow worker against a real PostgreSQL store, on the rows it
//! cannot run: a row the store says the node claimed but the node never
//! started (a claim that committed after the node stopped waiting for its
//! answer) is handed back as interrupted instead of being beaten for good,
//! and a row whose attempt the node cannot read fails with the reason.

use std::sync::Arc;
use std::time::Duration;

use caudal_core::config::{Format, load_str};
use caudal_store::{
    AttemptRow, DispatchChanges, DispatchKey, NewDispatch, NewWorkflowRun, Store, TaskRow,
};
use caudal_testkit::pg_database;
use jiff::Timestamp;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const LEASE: &str = "workflows/executor";
const NODE: &str = "test-host:1:worker";

fn key(run_id: i64, index: i64) -> DispatchKey {
    DispatchKey {
        run_id,
        task: "t".into(),
        map_index: index,
        attempt: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_node_cannot_run_are_handed_back_not_held() {
    let db = pg_database().await;
    let store = Store::open(db.url()).await.expect("open the store");
    store
        .try_acquire_lease(LEASE, "executor", Duration::from_secs(60))
        .await
        .expect("the executor lease");
    let run = store
        .create_workflow_run(
            &NewWorkflowRun {
                workflow: "w".into(),
                triggered_by: "manual".into(),
                logical_date: None,
                params: "{}".into(),
                state: "running".into(),
            },
            "/tmp/caudal-worker-test",
        )
        .await
        .expect("a run")
        .id;
    let attempts: Vec<AttemptRow> = (0..2)
        .map(|i| AttemptRow {
            run_id: run,
            task: "t".into(),
            map_index: i,
            attempt: 1,
            holder: "executor".into(),
            pid: None,
            state: "running".into(),
            exit_code: None,
            error: None,
            stderr_tail: None,
            started_at: Timestamp::now(),
            ended_at: None,
        })
        .collect();
    let tasks: Vec<TaskRow> = (0..2)
        .map(|i| TaskRow {
            run_id: run,
            task: "t".into(),
            map_index: i,
            state: "running".into(),
            attempts: 1,
            failures: 0,
            item: None,
            outputs: None,
            items: None,
            not_before: None,
            queued_at: None,
            started_at: None,
            ended_at: None,
            error: None,
        })
        .collect();
    // Row 0: claimed by the node "before" it starts (its answer lost).
    let orphan = DispatchChanges {
        new: vec![NewDispatch {
            key: key(run, 0),
            pool: String::new(),
            priority: 1,
            seq: 0,
            lane: String::new(),
            spec: "{}".into(),
        }],
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &tasks, &attempts, &[], &orphan)
            .await
            .expect("hand out")
    );
    assert_eq!(store.claim_dispatch(NODE, 1).await.expect("claim").len(), 1);
    // Row 1: ready, but what it runs is not an attempt this build reads.
    let unreadable = DispatchChanges {
        new: vec![NewDispatch {
            key: key(run, 1),
            pool: String::new(),
            priority: 1,
            seq: 1,
            lane: String::new(),
            spec: "{\"from\": \"a newer version\"}".into(),
        }],
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &[], &[], &[], &unreadable)
            .await
            .expect("hand out")
    );

    let config = load_str(
        &format!(
            "[state]\nurl = \"{}\"\n\n[cluster]\nlease = \"2s\"\n",
            db.url()
        ),
        Format::Toml,
        "test.toml",
        &|_| None,
    )
    .expect("the configuration");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(caudal_engine::workflow::worker::work(
        Arc::new(config),
        store.clone(),
        NODE.into(),
        stop.clone(),
    ));
    // Within a few beats (a third of the lease each) both rows are done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let finished = loop {
        let finished = store
            .finished_dispatch(10, Some(run))
            .await
            .expect("finished");
        if finished.len() == 2 {
            break finished;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker still holds rows it cannot run: {finished:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let outcome = |i: i64| -> Value {
        let f = finished
            .iter()
            .find(|f| f.key == key(run, i))
            .expect("the row");
        assert_eq!(f.node.as_deref(), Some(NODE));
        serde_json::from_str(f.outcome.as_deref().expect("an outcome")).expect("outcome JSON")
    };
    let handed_back = outcome(0);
    assert_eq!(handed_back["ending"], "Interrupted", "{handed_back}");
    let failed = outcome(1);
    assert_eq!(failed["ending"], "Failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read the attempt")),
        "{failed}"
    );
    // Nothing is beaten any more: the node holds no row.
    assert!(store.beat_dispatch(NODE).await.expect("beat").is_empty());
    stop.cancel();
    worker
        .await
        .expect("the worker task")
        .expect("the worker ends cleanly");
    store.close().await;
    db.cleanup().await;
}
