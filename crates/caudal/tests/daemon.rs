//! `caudal run`, the daemon, as a real process: it delivers on its schedule,
//! exits 0 on SIGTERM and SIGINT, lets a batch in flight finish, resumes
//! from its checkpoint after a restart, does not run early after a restart,
//! never runs a pipeline twice at once, and reports a receiver that is down.
//!
//! Each test has its own source database, receiver and state directory.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use caudal_testkit::Reply;
use nix::sys::signal::Signal;
use support::{PIPELINE, World, each, request_id};

/// Sends `signal` to a daemon that has delivered every row, and checks it
/// exits 0 saying why.
async fn daemon_exits_cleanly_on(signal: Signal) {
    let w = World::sqlite().await;
    w.insert(1..=5, 0).await;
    let daemon = w.start_daemon(1);
    w.wait_for_delivered(5).await;

    let (status, log) = daemon.stop(signal).await;
    assert_eq!(
        status.code(),
        Some(0),
        "caudal run after {signal}: {status}; log:\n{log}"
    );
    assert!(
        log.contains("shutdown requested"),
        "no word of the shutdown in the log:\n{log}"
    );
    assert!(log.contains("caudal stopped"), "log:\n{log}");
    assert_eq!(w.delivery_counts(), each(1..=5, 1));
}

#[tokio::test]
async fn sigterm_stops_the_daemon_with_exit_code_0() {
    daemon_exits_cleanly_on(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_stops_the_daemon_with_exit_code_0() {
    daemon_exits_cleanly_on(Signal::SIGINT).await;
}

/// The shutdown promise of `caudal run --help`: a batch in flight when the
/// signal comes is allowed to finish, its checkpoint is saved, and no
/// further batch is started.
#[tokio::test]
async fn sigterm_mid_batch_lets_the_batch_finish_and_saves_its_checkpoint() {
    let mut w = World::sqlite().await;
    // The checkpoint follows delivery, so it names the batch that finished.
    w.ack = "delivered";
    w.max_records = 10;
    w.insert(1..=25, 0).await;
    // The first batch is answered after 10s; the signal arrives meanwhile.
    w.receiver
        .queue_replies([Reply::status(200).delay(Duration::from_secs(10))]);
    let daemon = w.start_daemon(1);
    assert!(
        w.receiver.wait_for_requests(1, support::PATIENCE).await,
        "the first batch never arrived"
    );

    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert_eq!(
        w.receiver.request_count(),
        1,
        "a batch was started after the signal"
    );
    let ids: Vec<i64> = w.delivered().iter().map(request_id).collect();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    let checkpoint = w.caudal(&["checkpoint", "show", PIPELINE]).await;
    let position: serde_json::Value =
        serde_json::from_str(&checkpoint.stdout).expect("checkpoint show prints JSON");
    assert_eq!(
        position["position"]["values"][1]["value"], 10,
        "{checkpoint}"
    );

    // The rest goes out on the next run, nothing twice.
    let once = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(once.code, Some(0), "{once}");
    assert_eq!(w.delivery_counts(), each(1..=25, 1));
}

/// Phase 1: a daemon delivers rows 1..=20 and is stopped. Meanwhile rows
/// 21..=23 are inserted and rows 4 and 17 updated. Phase 2: a new daemon
/// sends exactly those five rows, and `checkpoint show` names the last.
async fn restart_resumes_from_the_checkpoint(w: &World) {
    w.insert(1..=10, 0).await;
    w.insert(11..=20, 1).await;
    let first = w.start_daemon(1);
    w.wait_for_delivered(20).await;
    let (status, log) = first.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert_eq!(w.delivery_counts(), each(1..=20, 1));

    w.insert(21..=23, 5).await;
    w.update(4, 7, 6).await;
    w.update(17, 8, 6).await;
    w.receiver.clear();
    let second = w.start_daemon(2);
    w.wait_for_delivered(5).await;
    let (status, log) = second.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");

    let counts = w.delivery_counts();
    assert_eq!(
        counts,
        each([4, 17, 21, 22, 23], 1),
        "only the new and changed rows, once each"
    );
    let statuses: BTreeMap<i64, i64> = w
        .delivered()
        .iter()
        .map(|r| (request_id(r), r["status_id"].as_i64().expect("status_id")))
        .collect();
    assert_eq!((statuses[&4], statuses[&17]), (7, 8), "the updated values");

    // The latest cursor: the updates at 12:06, the later of the two by id.
    let out = w.caudal(&["checkpoint", "show", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out.stdout).expect("checkpoint JSON");
    let values = &shown["position"]["values"];
    let cursor_time = values[0]["value"].as_str().expect("a timestamp value");
    assert!(cursor_time.starts_with("2025-05-14T12:06:00"), "{out}");
    assert_eq!(values[1]["value"], 17, "{out}");
}

#[tokio::test]
async fn restart_resumes_from_the_checkpoint_sqlite() {
    restart_resumes_from_the_checkpoint(&World::sqlite().await).await;
}

#[tokio::test]
async fn restart_resumes_from_the_checkpoint_postgres() {
    let w = World::postgres().await;
    restart_resumes_from_the_checkpoint(&w).await;
    w.cleanup().await;
}

/// Catch-up after downtime, for `every = "1h"`:
/// - a pipeline that never ran runs as soon as the daemon starts;
/// - after a restart less than an hour later, it does not run at once: the
///   daemon schedules the next run exactly one hour after the last run
///   started (`status` shows it), the last run stays the first one, and rows
///   inserted during the downtime wait for that run.
#[tokio::test]
async fn restart_within_the_interval_waits_for_the_next_tick() {
    let mut w = World::sqlite().await;
    w.every = "1h".into();
    w.insert(1..=5, 0).await;
    let first = w.start_daemon(1);
    w.wait_for_delivered(5).await;
    // Stop only once the run is over, so it is recorded as succeeded.
    let before = w.wait_for_outcome("succeeded").await;
    let (status, log) = first.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert_eq!(w.status().await["last_run"], before["last_run"]);

    w.insert(6..=8, 1).await;
    let second = w.start_daemon(2);
    // The daemon records the next run time before it starts waiting for it.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    let after = loop {
        let s = w.status().await;
        if !s["next_run"].is_null() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no next run recorded; log:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ts = |v: &serde_json::Value| -> jiff::Timestamp {
        v.as_str()
            .unwrap_or_else(|| panic!("a timestamp: {v}"))
            .parse()
            .expect("an RFC 3339 timestamp")
    };
    assert_eq!(
        after["last_run"], before["last_run"],
        "a run started at once: {after}"
    );
    let gap = ts(&after["next_run"]).duration_since(ts(&after["last_run"]));
    assert!(
        (gap - jiff::SignedDuration::from_hours(1)).abs() < jiff::SignedDuration::from_secs(1),
        "next run {gap:?} after the last one, not 1h: {after}"
    );
    assert!(ts(&after["next_run"]) > jiff::Timestamp::now(), "{after}");
    // The table also shows it.
    let table = w.caudal(&["status"]).await;
    let next = after["next_run"].as_str().expect("next_run");
    assert!(table.stdout.contains(next), "{table}");

    let (status, log) = second.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    let ids: Vec<i64> = w.delivered().iter().map(request_id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "rows of the downtime were sent early");
}

/// While a daemon is delivering to a slow receiver, `caudal once` of the
/// same pipeline is refused with exit code 3 and records no run of its own.
#[tokio::test]
async fn once_while_the_daemon_is_mid_run_exits_3() {
    let w = World::sqlite().await;
    w.insert(1..=5, 0).await;
    w.receiver
        .queue_replies([Reply::status(200).delay(Duration::from_secs(120))]);
    let daemon = w.start_daemon(1);
    assert!(
        w.receiver.wait_for_requests(1, support::PATIENCE).await,
        "the daemon's batch never arrived; log:\n{}",
        daemon.log()
    );

    let once = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(once.code, Some(3), "{once}");
    assert!(
        once.stderr.contains("is running in another process"),
        "{once}"
    );
    let store = caudal_store::Store::open(&format!("sqlite://{}", w.state_db().display()))
        .await
        .expect("state store");
    let runs = store.runs(Some(PIPELINE), 1000).await.expect("runs");
    assert!(!runs.is_empty(), "the daemon recorded its runs");
    assert!(
        runs.iter().all(|r| r.trigger == "schedule"),
        "the refused once recorded a run: {runs:?}"
    );
    assert_eq!(w.receiver.request_count(), 1);

    // Cut the slow request short so the daemon can stop.
    w.receiver.stop().await;
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
}

/// A receiver that is down fails the run (exit 1, the error on stderr and in
/// `status`); once it is back, the next run delivers every row exactly once.
#[tokio::test]
async fn receiver_down_fails_the_run_then_the_next_run_delivers_everything_once() {
    let mut w = World::sqlite().await;
    // The checkpoint follows delivery (with the default, it would cover the
    // rows buffered).
    w.ack = "delivered";
    w.insert(1..=12, 0).await;
    w.receiver.stop().await;

    let failed = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(failed.code, Some(1), "{failed}");
    assert!(failed.stderr.contains("error: "), "{failed}");
    assert!(failed.stderr.contains("could not connect"), "{failed}");
    assert!(failed.stdout.contains("failed"), "{failed}");

    let status = w.status().await;
    assert_eq!(status["outcome"], "failed", "{status}");
    let error = status["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {status}"));
    assert!(error.contains("could not connect"), "{status}");
    assert!(
        status["checkpoint"].is_null(),
        "the checkpoint moved: {status}"
    );
    let table = w.caudal(&["status"]).await;
    assert!(table.stdout.contains("failed"), "{table}");
    assert!(
        table.stdout.contains(&format!("{PIPELINE}: last error: ")),
        "{table}"
    );

    w.receiver.restart().await;
    let ok = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert_eq!(w.delivery_counts(), each(1..=12, 1));
    assert_eq!(w.status().await["outcome"], "succeeded");
}
