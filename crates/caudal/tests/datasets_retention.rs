//! Dataset retention under a real `caudal run`: days older than the sink's
//! `retention` lose their partitions (manifest and files) and their record
//! in the state store, each deletion in the audit log; younger days stay
//! byte for byte.

#[path = "support/datasets.rs"]
mod datasets_support;
mod support;

use std::time::Duration;

use datasets_support::Reports;
use nix::sys::signal::Signal;
use support::{PATIENCE, spawn_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn days_older_than_the_retention_are_deleted_and_audited() {
    let mut w = Reports::new().await;
    w.generate(2_000, "2025-05-01", 5, 4).await;
    w.schedule_extra = ", catch_up = false".into();
    // Keep 2025-05-03 and later, whatever today is.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let keep = (today - jiff::civil::date(2025, 5, 3)).get_days();
    w.sink.push_str(&format!("retention = \"{keep}d\"\n"));
    w.backfill("2025-05-01", "2025-05-05").await;
    let kept_before = datasets_support::walk(&w.root().join("provider_id=1/date=2025-05-04"));
    assert!(!kept_before.is_empty(), "the 4th was written");
    let store = w.store().await;
    let daemon = spawn_daemon(&w.write_config(), w.dir.path(), 1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let dates = loop {
        let dates: Vec<String> = store
            .dataset_dates(&w.dataset)
            .await
            .expect("dates")
            .into_iter()
            .map(|d| d.logical_date)
            .filter(|d| d.starts_with("2025-05"))
            .collect();
        if !dates.contains(&"2025-05-01".to_string()) && !dates.contains(&"2025-05-02".to_string())
        {
            break dates;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never ran: {dates:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(dates, ["2025-05-03", "2025-05-04", "2025-05-05"], "{log}");
    for provider in 1..=4 {
        for day in ["2025-05-01", "2025-05-02"] {
            let dir = w.root().join(format!("provider_id={provider}/date={day}"));
            assert!(!dir.exists(), "{} still there", dir.display());
        }
        assert!(
            w.root()
                .join(format!(
                    "provider_id={provider}/date=2025-05-03/_manifest.json"
                ))
                .exists()
        );
    }
    assert_eq!(
        datasets_support::walk(&w.root().join("provider_id=1/date=2025-05-04")),
        kept_before,
        "a kept day is untouched"
    );
    let parts = store
        .dataset_partitions(&w.dataset)
        .await
        .expect("partitions");
    assert!(
        parts
            .iter()
            .all(|p| !p.part.contains("2025-05-01") && !p.part.contains("2025-05-02")),
        "{parts:?}"
    );
    let audit = store.audit(100).await.expect("audit");
    let mut deleted: Vec<&str> = audit
        .iter()
        .filter(|a| a.token == "retention" && a.method == "DELETE")
        .map(|a| a.path.as_str())
        .collect();
    deleted.sort_unstable();
    let mut expected = Vec::new();
    for provider in 1..=4 {
        for day in ["2025-05-01", "2025-05-02"] {
            expected.push(format!(
                "/datasets/{}/partitions/provider_id={provider}/date={day}",
                w.dataset
            ));
        }
    }
    expected.sort();
    assert_eq!(deleted, expected, "{log}");
    assert!(log.contains("retention: partition deleted"), "{log}");
    w.cleanup().await;
}

/// `caudal run` writes the days missed while it was down as soon as it
/// starts, not at the schedule's next time (02:00).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_writes_the_days_it_missed_at_start() {
    let mut w = Reports::new().await;
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let day = |n: i64| {
        today
            .checked_sub(jiff::Span::new().days(n))
            .expect("a date")
            .to_string()
    };
    w.start_date = day(3);
    // Sales on the first missed day, so it has partitions.
    w.generate(400, &day(3), 1, 4).await;
    let store = w.store().await;
    let daemon = spawn_daemon(&w.write_config(), w.dir.path(), 1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let dates = loop {
        let dates: Vec<String> = store
            .dataset_dates(&w.dataset)
            .await
            .expect("dates")
            .into_iter()
            .map(|d| d.logical_date)
            .collect();
        if dates.len() >= 3 {
            break dates;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the missed days were not written: {dates:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(dates, [day(3), day(2), day(1)], "{log}");
    let parts = store
        .dataset_date_parts(&w.dataset, &day(3))
        .await
        .expect("partitions");
    assert_eq!(parts.len(), 4, "{parts:?}");
    for part in &parts {
        assert!(
            w.root().join(part).join("_manifest.json").exists(),
            "{part}"
        );
    }
    w.cleanup().await;
}
