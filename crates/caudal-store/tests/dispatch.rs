//! Workflow attempts handed out to nodes, checked against every backend:
//! each ready row goes to exactly one of several racing claimers, lanes
//! keep rows for one node, an outcome counts only under its claim's
//! token, rescue ends only the rows of silent nodes and only for the
//! executor of record, and the executor's batch writes rows fenced.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use caudal_store::{
    AttemptRow, DispatchChanges, DispatchKey, NewDispatch, NewWorkflowRun, Store, TaskRow,
};
use jiff::Timestamp;
use support::{Backend, Ctx};

backend_tests!(
    each_ready_attempt_goes_to_one_claimer,
    a_lane_keeps_an_attempt_for_its_node,
    a_rescued_attempt_cannot_be_finished_by_its_silent_node,
    only_the_executor_of_record_hands_out_and_rescues,
    a_cancelled_attempt_not_yet_claimed_ends_at_once,
);

const LEASE: &str = "workflows/executor";
const TTL: Duration = Duration::from_secs(30);

async fn new_run(store: &Store) -> i64 {
    store
        .create_workflow_run(
            &NewWorkflowRun {
                workflow: "w".into(),
                triggered_by: "manual".into(),
                logical_date: None,
                params: "{}".into(),
                state: "running".into(),
            },
            "/tmp/runs",
        )
        .await
        .expect("create a run")
        .id
}

fn key(run_id: i64, index: i64) -> DispatchKey {
    DispatchKey {
        run_id,
        task: "t".into(),
        map_index: index,
        attempt: 1,
    }
}

fn new(run_id: i64, index: i64, lane: &str) -> NewDispatch {
    NewDispatch {
        key: key(run_id, index),
        pool: "p".into(),
        priority: 1,
        seq: index,
        lane: lane.into(),
        spec: format!("{{\"index\":{index}}}"),
    }
}

fn attempt(run_id: i64, index: i64) -> AttemptRow {
    AttemptRow {
        run_id,
        task: "t".into(),
        map_index: index,
        attempt: 1,
        holder: "executor".into(),
        pid: None,
        state: "running".into(),
        exit_code: None,
        error: None,
        stderr_tail: None,
        started_at: Timestamp::now(),
        ended_at: None,
    }
}

fn task(run_id: i64, index: i64) -> TaskRow {
    TaskRow {
        run_id,
        task: "t".into(),
        map_index: index,
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
    }
}

/// Writes `n` attempts of run `run_id` and their dispatch rows as the
/// executor `executor`; returns whether the batch was written.
async fn hand_out(
    store: &Store,
    executor: &str,
    run_id: i64,
    range: std::ops::Range<i64>,
    lane: &str,
) -> bool {
    let tasks: Vec<TaskRow> = range.clone().map(|i| task(run_id, i)).collect();
    let attempts: Vec<AttemptRow> = range.clone().map(|i| attempt(run_id, i)).collect();
    let dispatch = DispatchChanges {
        new: range.map(|i| new(run_id, i, lane)).collect(),
        ..DispatchChanges::default()
    };
    store
        .save_workflow_changes_dispatching(LEASE, executor, &tasks, &attempts, &[], &dispatch)
        .await
        .expect("save")
}

async fn each_ready_attempt_goes_to_one_claimer(ctx: Ctx) {
    const N: i64 = 300;
    let store = ctx.open().await;
    let backend = match ctx.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(store.backend(), backend);
    store
        .try_acquire_lease(LEASE, "executor", TTL)
        .await
        .expect("acquire");
    let run = new_run(&store).await;
    assert!(hand_out(&store, "executor", run, 0..N, "").await);
    // Four nodes claim at once, a few rows at a time, until none is left.
    let mut claimers = Vec::new();
    for n in 0..4 {
        let store = ctx.open().await;
        claimers.push(tokio::spawn(async move {
            let node = format!("node-{n}");
            let mut got = Vec::new();
            loop {
                let claimed = store.claim_dispatch(&node, 7).await.expect("claim");
                if claimed.is_empty() {
                    break;
                }
                for c in claimed {
                    assert_eq!(c.token, 1, "a first claim has token 1");
                    assert_eq!(c.spec, format!("{{\"index\":{}}}", c.key.map_index));
                    got.push(c.key);
                }
            }
            (node, got)
        }));
    }
    let mut seen = BTreeSet::new();
    let mut by_node = Vec::new();
    for c in claimers {
        let (node, got) = c.await.expect("a claimer");
        for k in &got {
            assert!(seen.insert(k.clone()), "{k:?} was claimed twice");
        }
        by_node.push((node, got));
    }
    assert_eq!(seen.len(), N as usize, "every row is claimed");
    // Each attempt names the node that claimed it.
    let attempts = store.workflow_attempts(run).await.expect("attempts");
    for (node, got) in &by_node {
        for k in got {
            let a = attempts
                .iter()
                .find(|a| a.map_index == k.map_index)
                .expect("the attempt");
            assert_eq!(&a.holder, node);
        }
    }
    // Higher priority first, then by run and sequence.
    assert!(hand_out(&store, "executor", run, N..N + 3, "").await);
    let urgent = NewDispatch {
        priority: 0,
        seq: 99,
        ..new(run, N + 3, "")
    };
    let dispatch = DispatchChanges {
        new: vec![urgent],
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &[], &[], &[], &dispatch)
            .await
            .expect("save")
    );
    let mut order = Vec::new();
    loop {
        let claimed = store.claim_dispatch("node-0", 1).await.expect("claim");
        let Some(c) = claimed.first() else { break };
        order.push(c.key.map_index);
    }
    assert_eq!(
        order,
        [N + 3, N, N + 1, N + 2],
        "priority 0 first, then by seq"
    );
}

async fn a_lane_keeps_an_attempt_for_its_node(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "node-a", TTL)
        .await
        .expect("acquire");
    let run = new_run(&store).await;
    assert!(hand_out(&store, "node-a", run, 0..2, "node-a").await);
    assert!(
        store
            .claim_dispatch("node-b", 10)
            .await
            .expect("claim")
            .is_empty(),
        "another node does not claim a row of node-a's lane"
    );
    let got = store.claim_dispatch("node-a", 1).await.expect("claim");
    assert_eq!(got.len(), 1);
    // The executor moves to node-c: the ready row of the lane follows it,
    // the claimed one stays where it runs.
    store.release_lease(LEASE, "node-a").await.expect("release");
    store
        .try_acquire_lease(LEASE, "node-c", TTL)
        .await
        .expect("acquire");
    assert_eq!(
        store
            .relane_dispatch(LEASE, "node-a", "node-a")
            .await
            .expect("relane"),
        0,
        "only the executor of record moves lanes"
    );
    assert_eq!(
        store
            .relane_dispatch(LEASE, "node-c", "node-c")
            .await
            .expect("relane"),
        1
    );
    assert!(
        store
            .claim_dispatch("node-a", 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // node-a still runs a row of a lane: node-c starts nothing of its lane
    // until that ends (a per-site limit holds across the hand-over).
    assert!(
        store
            .claim_dispatch("node-c", 10)
            .await
            .expect("claim")
            .is_empty(),
        "the new lane waits for the old lane's running attempt"
    );
    assert!(
        store
            .finish_dispatch(&got[0].key, got[0].token, "{}")
            .await
            .expect("finish")
    );
    assert_eq!(
        store
            .claim_dispatch("node-c", 10)
            .await
            .expect("claim")
            .len(),
        1
    );
}

async fn a_rescued_attempt_cannot_be_finished_by_its_silent_node(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "executor", TTL)
        .await
        .expect("acquire");
    let run = new_run(&store).await;
    assert!(hand_out(&store, "executor", run, 0..3, "").await);
    let claimed = store.claim_dispatch("node-a", 3).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    // Beating: every claimed row, with its token, none cancelled.
    let beats = store.beat_dispatch("node-a").await.expect("beat");
    assert_eq!(beats.len(), 3);
    assert!(beats.iter().all(|b| b.token == 1 && !b.cancel));
    // A node that beats is not silent for 30 s: nothing to rescue.
    assert!(
        store
            .rescue_dispatch(LEASE, "executor", TTL)
            .await
            .expect("rescue")
            .is_empty()
    );
    // Row 0 finishes normally.
    assert!(
        store
            .finish_dispatch(&key(run, 0), 1, "{\"ok\":true}")
            .await
            .expect("finish")
    );
    // Row 1's run is cancelled: the next beat says so.
    let cancel = DispatchChanges {
        cancel: vec![(key(run, 1), "{\"cancelled\":true}".into())],
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &[], &[], &[], &cancel)
            .await
            .expect("save")
    );
    let beats = store.beat_dispatch("node-a").await.expect("beat");
    assert_eq!(
        beats
            .iter()
            .map(|b| (b.key.map_index, b.cancel))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([(1, true), (2, false)])
    );
    // The node then goes silent: after the silence, rows 1 and 2 are
    // rescued (row 0 had ended).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let rescued = store
        .rescue_dispatch(LEASE, "executor", Duration::from_millis(10))
        .await
        .expect("rescue");
    assert_eq!(
        rescued
            .iter()
            .map(|(k, n)| (k.map_index, n.clone()))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([(1, Some("node-a".into())), (2, Some("node-a".into()))])
    );
    // The node comes back: its outcome does not count, its beat no longer
    // lists the rows.
    assert!(
        !store
            .finish_dispatch(&key(run, 2), 1, "{\"ok\":true}")
            .await
            .expect("finish"),
        "a rescued attempt's late outcome is refused"
    );
    assert!(
        store
            .beat_dispatch("node-a")
            .await
            .expect("beat")
            .is_empty()
    );
    // The executor reads every ended row: one outcome, two rescued.
    let finished = store.finished_dispatch(100, None).await.expect("finished");
    let outcomes: BTreeSet<(i64, Option<String>)> = finished
        .iter()
        .map(|f| (f.key.map_index, f.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        BTreeSet::from([(0, Some("{\"ok\":true}".into())), (1, None), (2, None)])
    );
    assert_eq!(store.open_dispatch(run).await.expect("open").len(), 3);
    // Once taken, they are forgotten.
    let forget = DispatchChanges {
        forget: finished.iter().map(|f| f.key.clone()).collect(),
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &[], &[], &[], &forget)
            .await
            .expect("save")
    );
    assert!(
        store
            .finished_dispatch(100, None)
            .await
            .expect("finished")
            .is_empty()
    );
    assert!(store.open_dispatch(run).await.expect("open").is_empty());
}

async fn only_the_executor_of_record_hands_out_and_rescues(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "executor", TTL)
        .await
        .expect("acquire");
    let run = new_run(&store).await;
    assert!(
        !hand_out(&store, "old-executor", run, 0..2, "").await,
        "a process without the lease hands nothing out"
    );
    assert!(store.open_dispatch(run).await.expect("open").is_empty());
    assert!(
        store
            .workflow_attempts(run)
            .await
            .expect("attempts")
            .is_empty()
    );
    assert!(hand_out(&store, "executor", run, 0..2, "").await);
    assert_eq!(
        store.claim_dispatch("node", 5).await.expect("claim").len(),
        2
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        store
            .rescue_dispatch(LEASE, "old-executor", Duration::from_millis(10))
            .await
            .expect("rescue")
            .is_empty(),
        "only the executor of record rescues"
    );
    assert_eq!(store.beat_dispatch("node").await.expect("beat").len(), 2);
}

async fn a_cancelled_attempt_not_yet_claimed_ends_at_once(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "executor", TTL)
        .await
        .expect("acquire");
    let run = new_run(&store).await;
    assert!(hand_out(&store, "executor", run, 0..2, "").await);
    let cancel = DispatchChanges {
        cancel: vec![(key(run, 0), "{\"cancelled\":true}".into())],
        ..DispatchChanges::default()
    };
    assert!(
        store
            .save_workflow_changes_dispatching(LEASE, "executor", &[], &[], &[], &cancel)
            .await
            .expect("save")
    );
    // No node gets it: it ended with the outcome the executor gave.
    let claimed = store.claim_dispatch("node", 10).await.expect("claim");
    assert_eq!(
        claimed.iter().map(|c| c.key.map_index).collect::<Vec<_>>(),
        [1]
    );
    let finished = store
        .finished_dispatch(10, Some(run))
        .await
        .expect("finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].key, key(run, 0));
    assert_eq!(finished[0].node, None);
    assert_eq!(finished[0].outcome.as_deref(), Some("{\"cancelled\":true}"));
    // Another run's outcomes are left out when asked for one run only.
    assert!(
        store
            .finished_dispatch(10, Some(run + 1))
            .await
            .expect("finished")
            .is_empty()
    );
}
