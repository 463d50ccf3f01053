//! Opening the store: which urls are accepted, what an SQLite file looks
//! like once opened, and how failures are reported. Backend-independent
//! behaviour lives in `store.rs`.

use caudal_core::ErrorKind;
use caudal_store::{LeaseOutcome, RunOutcome, Store};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn unsupported_urls_are_config_errors() {
    for url in [
        "",
        "caudal.db",
        "mysql://root@localhost/x",
        "http://x",
        "sqlite://",
        "sqlite:",
    ] {
        let err = Store::open(url).await.expect_err(url);
        assert_eq!(err.kind(), ErrorKind::Config, "{url}: {}", err.report());
    }
}

#[tokio::test]
async fn bad_url_errors_do_not_repeat_passwords() {
    let err = Store::open("redis://user:s3cret@host/0")
        .await
        .expect_err("unsupported scheme");
    assert!(!err.report().contains("s3cret"), "{}", err.report());
    let err = Store::open("postgres://user:s3cret@host:notaport/db")
        .await
        .expect_err("bad port");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.report().contains("s3cret"), "{}", err.report());
}

#[tokio::test]
async fn unreachable_postgres_is_a_store_error() {
    // Port 1 on loopback: nothing listens there, the refusal is immediate.
    let err = Store::open("postgres://caudal:s3cret@127.0.0.1:1/caudal")
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), ErrorKind::Store, "{}", err.report());
    assert!(!err.report().contains("s3cret"), "{}", err.report());
}

#[tokio::test]
async fn sqlite_file_is_created_with_its_directories_in_wal_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a/b/c/state.db");
    let store = Store::open(&format!("sqlite://{}", file.display()))
        .await
        .expect("open");
    assert_eq!(store.backend(), "sqlite");
    assert!(file.exists(), "{} was created", file.display());
    store.start_run("p", "manual").await.expect("start_run");
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    pool.close().await;
}

#[tokio::test]
async fn sqlite_accepts_both_url_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("state.db");
    let store = Store::open(&format!("sqlite://{}", file.display()))
        .await
        .expect("sqlite://PATH");
    let run = store.start_run("p", "manual").await.expect("start_run");
    store.close().await;
    let store = Store::open(&format!("sqlite:{}", file.display()))
        .await
        .expect("sqlite:PATH");
    assert!(store.run(run).await.expect("run").is_some(), "same file");
}

#[tokio::test]
async fn sqlite_memory_store_works_and_is_private() {
    let store = Store::open("sqlite::memory:").await.expect("open");
    assert_eq!(store.backend(), "sqlite");
    let run = store.start_run("p", "manual").await.expect("start_run");
    store
        .commit_progress(run, "p", &json!({"n": 1}), 1, 1)
        .await
        .expect("commit");
    // Concurrent callers share the one connection of a memory store.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .try_acquire_lease("l", &format!("h{i}"), Duration::from_secs(60))
                    .await
                    .expect("lease")
            })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        if task.await.expect("task") == LeaseOutcome::Acquired {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);
    store
        .finish_run(run, RunOutcome::Succeeded, 1, 1, None)
        .await
        .expect("finish");
    assert_eq!(
        store
            .checkpoint("p")
            .await
            .expect("checkpoint")
            .expect("saved")
            .position,
        json!({"n": 1})
    );

    let other = Store::open("sqlite::memory:").await.expect("open");
    assert_eq!(
        other.run(run).await.expect("run"),
        None,
        "each memory store is its own"
    );
}

#[tokio::test]
async fn a_closed_store_reports_errors() {
    let store = Store::open("sqlite::memory:").await.expect("open");
    store.close().await;
    let err = store.start_run("p", "manual").await.expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Store);
}

#[test]
fn run_outcomes_parse_from_their_names() {
    for outcome in RunOutcome::ALL {
        assert_eq!(
            outcome.as_str().parse::<RunOutcome>().expect("parse"),
            outcome
        );
        assert_eq!(outcome.to_string(), outcome.as_str());
    }
    assert_eq!(RunOutcome::Failed.as_str(), "failed");
    for bad in ["", "Failed", "done", " running"] {
        let err = bad.parse::<RunOutcome>().expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Decode);
    }
    assert!(!RunOutcome::Running.is_final());
    assert!(RunOutcome::Abandoned.is_final());
}
