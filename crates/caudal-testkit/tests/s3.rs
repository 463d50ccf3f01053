//! The S3 fixture against moto itself, and the Python readers the datasets
//! tests lean on.

use std::process::Command;
use std::time::{Duration, Instant};

use caudal_testkit::{S3, run_python};

#[tokio::test]
async fn objects_round_trip_through_moto() {
    let s3 = S3::start().await;
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    s3.create_bucket("lake").await;
    assert!(s3.list("lake", "").await.is_empty());

    let body = b"{\"sale_id\":1}\n\x00\xff".to_vec();
    s3.put(
        "lake",
        "sales/date=2025-05-01/part 000&1.jsonl",
        body.clone(),
    )
    .await;
    s3.put("lake", "sales/date=2025-05-02/part-000.jsonl", "x")
        .await;
    s3.put("lake", "other/_manifest.json", "{}").await;

    assert_eq!(
        s3.list("lake", "sales/").await,
        [
            "sales/date=2025-05-01/part 000&1.jsonl",
            "sales/date=2025-05-02/part-000.jsonl"
        ]
    );
    assert_eq!(s3.list("lake", "").await.len(), 3);
    assert_eq!(
        s3.get("lake", "sales/date=2025-05-01/part 000&1.jsonl")
            .await
            .as_deref(),
        Some(&body[..])
    );
    assert_eq!(s3.get("lake", "sales/missing").await, None);
    assert_eq!(s3.get("no-such-bucket", "key").await, None);
}

#[tokio::test]
async fn listing_pages_past_a_thousand_keys() {
    let s3 = S3::start().await;
    s3.create_bucket("many").await;
    for n in 0..1005 {
        s3.put("many", &format!("k/{n:04}"), "").await;
    }
    let keys = s3.list("many", "k/").await;
    assert_eq!(keys.len(), 1005);
    assert_eq!(keys.first().map(String::as_str), Some("k/0000"));
    assert_eq!(keys.last().map(String::as_str), Some("k/1004"));
}

#[tokio::test]
async fn dropping_the_fixture_stops_the_server() {
    let s3 = S3::start().await;
    let endpoint = s3.endpoint();
    drop(s3);
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    assert!(client.get(&endpoint).send().await.is_err());
}

#[tokio::test]
async fn two_servers_do_not_share_buckets() {
    let (a, b) = tokio::join!(S3::start(), S3::start());
    assert_ne!(a.endpoint(), b.endpoint());
    a.create_bucket("mine").await;
    a.put("mine", "k", "a").await;
    b.create_bucket("mine").await;
    assert!(b.list("mine", "").await.is_empty());
}

#[test]
fn python_has_the_independent_readers() {
    let versions = run_python(
        "import sys, pyarrow, duckdb\n\
         print(pyarrow.__version__, duckdb.__version__, sys.argv[1])",
        &["an arg"],
    );
    let versions: Vec<&str> = versions.split_whitespace().collect();
    assert_eq!(versions.len(), 4, "{versions:?}");
    assert_eq!(versions[2..], ["an", "arg"]);
}

#[test]
fn python_failures_carry_stderr() {
    let panic = std::panic::catch_unwind(|| run_python("import sys; sys.exit('boom')", &[]))
        .expect_err("the script fails");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(message.contains("boom"), "{message}");
}

/// Set in the copy of this test binary that
/// `a_server_exits_with_a_test_process_that_never_dropped_it` runs.
const ORPHAN_ENV: &str = "CAUDAL_TESTKIT_S3_ORPHAN";

/// A test process that is killed never drops its fixtures: moto must notice
/// and exit by itself rather than linger.
#[tokio::test]
async fn a_server_exits_with_a_test_process_that_never_dropped_it() {
    if std::env::var_os(ORPHAN_ENV).is_some() {
        let s3 = S3::start().await;
        println!("endpoint {}", s3.endpoint());
        std::mem::forget(s3);
        std::process::exit(0);
    }
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_server_exits_with_a_test_process_that_never_dropped_it",
            "--nocapture",
        ])
        .env(ORPHAN_ENV, "1")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let endpoint = stdout
        .lines()
        .find_map(|line| line.strip_prefix("endpoint "))
        .unwrap_or_else(|| {
            panic!(
                "no endpoint printed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(endpoint).send().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "moto at {endpoint} still answers after its test process exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
