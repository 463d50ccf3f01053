//! Bounded history, with the real `caudal run`: a continuous pipeline
//! polling every 100 ms keeps its run history within `[retention]`
//! (counted in the store's `runs` table), its idle polls leave no run while
//! the polls that read rows do, and the daemon prunes old runs, resolved
//! dead letters and audit entries at start, keeping pending dead letters
//! and the newest run of each pipeline.
//!
//! Each test has its own source database, receiver and state directory.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use caudal_store::{DeadLetterState, NewDeadLetter, Store};
use nix::sys::signal::Signal;
use sqlx::SqlitePool;
use support::{PATIENCE, PIPELINE, World, each, spawn_daemon};

/// `runs_max_count` of the continuous test.
const MAX_RUNS: usize = 5;
/// Inserts of the continuous test; insert `n` adds `n` rows, so each run
/// that did work is recognised by how many rows it read.
const INSERTS: i64 = 8;
/// Idle polls awaited before each insert and at the end.
const IDLE_POLLS: i64 = 3;
const DAY_US: i64 = 86_400_000_000;

/// One row of the `runs` table.
#[derive(Clone, Debug, PartialEq)]
struct Run {
    id: i64,
    outcome: String,
    rows_read: i64,
}

/// The state store's database, read directly behind the daemon's back.
struct StateDb {
    pool: SqlitePool,
}

impl StateDb {
    /// Creates (and migrates) the state store at `path`, so the daemon and
    /// the test share it from the start.
    async fn create(path: &Path) -> Self {
        let url = state_url(path);
        Store::open(&url)
            .await
            .unwrap_or_else(|e| panic!("create the state store: {}", e.report()))
            .close()
            .await;
        let pool = SqlitePool::connect(&url)
            .await
            .expect("open the state store");
        Self { pool }
    }

    /// Every row of `runs`, oldest first.
    async fn runs(&self) -> Vec<Run> {
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT id, outcome, rows_read FROM runs ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("read the runs table");
        rows.into_iter()
            .map(|(id, outcome, rows_read)| Run {
                id,
                outcome,
                rows_read,
            })
            .collect()
    }

    /// How many runs were ever recorded: the highest run id handed out
    /// (AUTOINCREMENT ids are never reused), idle polls included.
    async fn polls(&self) -> i64 {
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'runs'")
            .fetch_one(&self.pool)
            .await
            .expect("read sqlite_sequence")
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    async fn exec(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn state_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Checks one look at the history of a running daemon: within the bound
/// (one more while a poll runs), and no idle poll left behind (an idle run
/// may only be the newest, the poll in progress or just ending).
fn check_while_running(runs: &[Run], log: &dyn Fn() -> String) {
    assert!(
        runs.len() <= MAX_RUNS + 1,
        "{} runs in the store, more than the bound {MAX_RUNS} (+1 running): {runs:?}; log:\n{}",
        runs.len(),
        log()
    );
    let idle: Vec<&Run> = runs.iter().filter(|r| r.rows_read == 0).collect();
    assert!(
        idle.is_empty() || (idle.len() == 1 && runs.last() == Some(idle[0])),
        "an idle poll was left in the history: {runs:?}"
    );
}

/// The configuration of `w` with a continuous schedule polling every
/// 100 ms and at most [`MAX_RUNS`] runs kept.
fn write_continuous_config(w: &World) -> PathBuf {
    let every = format!("schedule = {{ every = \"{}\" }}", w.every);
    let config = w.config_toml();
    assert!(config.contains(&every), "{every} is not in:\n{config}");
    let config = config.replacen(
        &every,
        "schedule = { continuous = true, poll = \"100ms\" }",
        1,
    ) + &format!("\n[retention]\nruns_max_count = {MAX_RUNS}\n");
    let path = w.dir.path().join("continuous.toml");
    std::fs::write(&path, config).expect("write the configuration");
    path
}

#[tokio::test]
async fn a_continuous_pipeline_polling_every_100ms_keeps_its_run_history_bounded() {
    let w = World::sqlite().await;
    let config = write_continuous_config(&w);
    let state = StateDb::create(&w.state_db()).await;
    let daemon = spawn_daemon(&config, w.dir.path(), 1);
    let log = || daemon.log();

    let mut inserted = 0;
    for n in 1..=INSERTS {
        // Some polls find nothing first.
        let before = state.polls().await;
        wait_for(&state, &log, "idle polls", |runs, polls| {
            check_while_running(runs, &log);
            polls >= before + IDLE_POLLS
        })
        .await;
        let minute = u32::try_from(n).expect("a small number");
        w.insert((inserted + 1)..=(inserted + n), minute).await;
        inserted += n;
        // The poll that read them is recorded with its rows.
        wait_for(
            &state,
            &log,
            &format!("a run that read {n} rows"),
            |runs, _| {
                check_while_running(runs, &log);
                runs.iter()
                    .any(|r| r.rows_read == n && r.outcome == "succeeded")
            },
        )
        .await;
    }
    w.wait_for_delivered(usize::try_from(inserted).expect("a small number"))
        .await;
    let before = state.polls().await;
    wait_for(
        &state,
        &log,
        "idle polls after the last insert",
        |runs, polls| {
            check_while_running(runs, &log);
            polls >= before + IDLE_POLLS
        },
    )
    .await;

    // Only the newest runs that did work are left, each with its rows.
    let runs = state.runs().await;
    check_while_running(&runs, &log);
    let worked: Vec<(i64, &str)> = runs
        .iter()
        .filter(|r| r.rows_read > 0)
        .map(|r| (r.rows_read, r.outcome.as_str()))
        .collect();
    let kept = i64::try_from(MAX_RUNS).expect("a small number");
    let newest: Vec<(i64, &str)> = (INSERTS - kept + 1..=INSERTS)
        .map(|n| (n, "succeeded"))
        .collect();
    assert_eq!(worked, newest, "the newest {MAX_RUNS} runs that read rows");
    let polls = state.polls().await;
    assert!(
        polls >= INSERTS * (1 + IDLE_POLLS),
        "{polls} polls cannot include {IDLE_POLLS} idle ones before each insert"
    );

    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert_eq!(
        w.delivery_counts(),
        each(1..=inserted, 1),
        "every row delivered once"
    );
    // Stopped: within the bound exactly. A poll interrupted by the
    // shutdown is kept (as cancelled), a finished idle one is not.
    let runs = state.runs().await;
    assert_eq!(
        state.count("runs").await,
        i64::try_from(runs.len()).expect("a small number")
    );
    assert!(runs.len() <= MAX_RUNS, "{runs:?}");
    assert!(
        runs.iter()
            .all(|r| r.rows_read > 0 || r.outcome == "cancelled"),
        "an idle poll was left in the history: {runs:?}"
    );
    // The idle polls are not forgotten altogether: the last one's time is
    // kept, and it came after the last run that did work.
    let store = Store::open(&state_url(&w.state_db()))
        .await
        .expect("open the store");
    let last_idle = store
        .last_idle_poll(PIPELINE)
        .await
        .expect("last idle poll")
        .expect("idle polls were recorded");
    let last_work = store
        .runs(Some(PIPELINE), 100)
        .await
        .expect("runs")
        .into_iter()
        .find(|r| r.rows_read > 0)
        .and_then(|r| r.ended_at)
        .expect("a finished run that did work");
    assert!(
        last_idle > last_work,
        "last idle poll {last_idle} is not after the last run with rows ({last_work})"
    );
    store.close().await;
    state.pool.close().await;
}

/// Polls the store until `done(runs, polls)` holds, at most [`PATIENCE`].
async fn wait_for(
    state: &StateDb,
    log: &dyn Fn() -> String,
    what: &str,
    mut done: impl FnMut(&[Run], i64) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (runs, polls) = (state.runs().await, state.polls().await);
        if done(&runs, polls) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not seen within {PATIENCE:?}: {polls} polls, runs {runs:?}; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn letter(n: u32) -> NewDeadLetter {
    NewDeadLetter {
        batch_key: format!("batch-{n}"),
        event_id: format!("ev-{n}"),
        record_key: None,
        position: serde_json::json!({"n": n}),
        record: serde_json::json!({"request_id": n}),
        reason: "answered 400".into(),
        status: Some(400),
        response_excerpt: None,
        attempts: 1,
        first_attempt_at: None,
        last_attempt_at: None,
    }
}

/// With the default retention, `caudal run` prunes at start: runs that
/// ended more than 30 days ago (but not a pipeline's newest), dead letters
/// resolved more than 30 days ago (never a pending one, however old) and
/// audit entries older than 90 days.
#[tokio::test]
async fn the_daemon_prunes_old_history_at_start_with_the_default_retention() {
    let w = World::sqlite().await;
    let state = StateDb::create(&w.state_db()).await;
    let store = Store::open(&state_url(&w.state_db()))
        .await
        .expect("open the store");
    // A pipeline no longer configured, last run 40 days ago.
    let mut retired = Vec::new();
    for _ in 0..3 {
        let id = store.start_run("retired", "schedule").await.expect("start");
        store
            .finish_run(id, caudal_store::RunOutcome::Succeeded, 1, None, None)
            .await
            .expect("finish");
        retired.push(id);
    }
    let letters = store
        .add_dead_letters(PIPELINE, &[letter(1), letter(2), letter(3)])
        .await
        .expect("dead letters");
    store
        .resolve_dead_letters(&letters[1..2], DeadLetterState::Discarded)
        .await
        .expect("discard");
    store
        .resolve_dead_letters(&letters[2..3], DeadLetterState::Replayed)
        .await
        .expect("replay");
    store
        .add_audit("root", "POST", "/api/v1/old", 200)
        .await
        .expect("audit");
    store
        .add_audit("root", "POST", "/api/v1/recent", 200)
        .await
        .expect("audit");
    store.close().await;
    let days = |n: i64| n * DAY_US;
    state
        .exec(&format!(
            "UPDATE runs SET started_at = started_at - {0}, ended_at = ended_at - {0}",
            days(40)
        ))
        .await;
    // Pending for a year; discarded 40 days ago; replayed 10 days ago.
    state
        .exec(&format!(
            "UPDATE dead_letters SET created_at = created_at - {} WHERE id = {}",
            days(365),
            letters[0]
        ))
        .await;
    state
        .exec(&format!(
            "UPDATE dead_letters SET resolved_at = resolved_at - {} WHERE id = {}",
            days(40),
            letters[1]
        ))
        .await;
    state
        .exec(&format!(
            "UPDATE dead_letters SET resolved_at = resolved_at - {} WHERE id = {}",
            days(10),
            letters[2]
        ))
        .await;
    state
        .exec(&format!(
            "UPDATE audit_log SET at = at - {} WHERE path = '/api/v1/old'",
            days(100)
        ))
        .await;

    let daemon = spawn_daemon(&w.write_config(), w.dir.path(), 1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while state.count("audit_log").await > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old audit entry is still there after {PATIENCE:?}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert!(
        log.contains("pruned the history past its retention"),
        "log:\n{log}"
    );

    let retired_left: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM runs WHERE pipeline = 'retired' ORDER BY id")
            .fetch_all(&state.pool)
            .await
            .expect("runs");
    assert_eq!(retired_left, [retired[2]], "the newest run is kept");
    let letters_left: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, state FROM dead_letters ORDER BY id")
            .fetch_all(&state.pool)
            .await
            .expect("dead letters");
    assert_eq!(
        letters_left,
        [
            (letters[0], "pending".to_owned()),
            (letters[2], "replayed".to_owned())
        ]
    );
    let audit_left: Vec<String> = sqlx::query_scalar("SELECT path FROM audit_log")
        .fetch_all(&state.pool)
        .await
        .expect("audit");
    assert_eq!(audit_left, ["/api/v1/recent"]);
    state.pool.close().await;
}
