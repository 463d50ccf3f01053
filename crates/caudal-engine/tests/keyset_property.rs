//! Property test of keyset paging on real databases: random tables with many
//! duplicate cursor values, random page and batch sizes, two runs with new
//! rows in between → every row arrives exactly once, in cursor order.

use std::collections::BTreeSet;

use caudal_core::config::{Format, load_str};
use caudal_engine::{Pipeline, Trigger};
use caudal_store::{RunOutcome, Store};
use caudal_testkit::{DbKind, Receiver, TestDb, pg_database, sqlite_database};
use proptest::prelude::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Case {
    /// Rows of the first run: (minute, id); minutes repeat a lot.
    first: Vec<(u32, i64)>,
    /// Rows added before the second run, all at later minutes.
    second: Vec<(u32, i64)>,
    page_size: u32,
    max_records: usize,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        proptest::collection::btree_set(1i64..100_000, 0..120),
        proptest::collection::btree_set(100_000i64..200_000, 0..60),
        1u32..16,
        1usize..25,
        any::<u64>(),
    )
        .prop_map(|(ids1, ids2, page_size, max_records, seed)| {
            // Few distinct minutes → many rows share a cursor value; ids
            // are not in minute order.
            let first = ids1
                .into_iter()
                .enumerate()
                .map(|(i, id)| (((seed >> (i % 60)) % 3) as u32, id))
                .collect();
            let second = ids2
                .into_iter()
                .enumerate()
                .map(|(i, id)| (3 + ((seed >> (i % 60)) % 2) as u32, id))
                .collect();
            Case {
                first,
                second,
                page_size,
                max_records,
            }
        })
}

async fn exec(db: &TestDb, sql: String) {
    let sql = sqlx::AssertSqlSafe(sql);
    match db.kind() {
        DbKind::Postgres => {
            sqlx::raw_sql(sql)
                .execute(&db.pg_pool().await)
                .await
                .expect("exec");
        }
        DbKind::Sqlite => {
            sqlx::raw_sql(sql)
                .execute(&db.sqlite_pool().await)
                .await
                .expect("exec");
        }
        DbKind::MySql => {
            sqlx::raw_sql(sql)
                .execute(&db.mysql_pool().await)
                .await
                .expect("exec");
        }
    }
}

async fn insert(db: &TestDb, table: &str, rows: &[(u32, i64)]) {
    if rows.is_empty() {
        return;
    }
    let values: Vec<String> = rows
        .iter()
        .map(|(minute, id)| format!("({id}, '2025-05-14T12:{minute:02}:00Z')"))
        .collect();
    exec(
        db,
        format!(
            "INSERT INTO {table} (id, modified) VALUES {}",
            values.join(", ")
        ),
    )
    .await;
}

async fn check(db: &TestDb, table: &str, case: Case) -> Result<(), TestCaseError> {
    let modified_type = if db.kind() == DbKind::Postgres {
        "TIMESTAMPTZ"
    } else {
        "TIMESTAMP"
    };
    exec(
        db,
        format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, modified {modified_type} NOT NULL)"),
    )
    .await;
    let receiver = Receiver::start().await;
    let state = tempfile::tempdir().expect("tempdir");
    let source_type = if db.kind() == DbKind::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    let config = format!(
        r#"
[state]
url = "sqlite://{state}/state.db"
[sources.s]
type = "{source_type}"
url = "{url}"
table = "{table}"
cursor = ["modified", "id"]
page_size = {page}
[sinks.r]
type = "http"
url = "{recv}"
batch = {{ max_records = {batch} }}
[pipelines.p]
source = "s"
sink = "r"
schedule = {{ every = "1h" }}
"#,
        state = state.path().display(),
        url = db.url(),
        page = case.page_size,
        recv = receiver.url("/"),
        batch = case.max_records,
    );
    let config = load_str(&config, Format::Toml, "prop.toml", &|_| None).expect("config");
    let store = Store::open(config.state.url.expose()).await.expect("store");
    let pipeline = Pipeline::build("p", &config, store)
        .await
        .expect("pipeline");

    let mut expected_order: Vec<(u32, i64)> = Vec::new();
    for phase in [&case.first, &case.second] {
        insert(db, table, phase).await;
        let run = pipeline
            .run_once(Trigger::Manual, &CancellationToken::new(), None)
            .await
            .expect("run");
        prop_assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
        // A PostgreSQL table's run from an empty checkpoint (no row
        // delivered yet) is a first load: rows in physical (here
        // insertion) order; every later run pages by cursor.
        if expected_order.is_empty() && db.kind() == DbKind::Postgres {
            expected_order.extend(phase.iter().copied());
        } else {
            let mut sorted = phase.clone();
            sorted.sort_unstable();
            expected_order.extend(sorted);
        }
    }
    let delivered: Vec<i64> = receiver
        .accepted_records_at("")
        .iter()
        .map(|r: &Value| r["id"].as_i64().expect("id"))
        .collect();
    let expected: Vec<i64> = expected_order.iter().map(|(_, id)| *id).collect();
    // Exactly once each, and in cursor (minute, id) order.
    prop_assert_eq!(&delivered, &expected);
    let unique: BTreeSet<i64> = delivered.iter().copied().collect();
    prop_assert_eq!(unique.len(), delivered.len());
    Ok(())
}

fn run_property(db: TestDb, cases_count: u32) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases_count,
        ..ProptestConfig::default()
    });
    let counter = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&cases(), |case| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let table = format!("prop_{n}");
        rt.block_on(check(&db, &table, case))
    });
    rt.block_on(db.cleanup());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn keyset_paging_delivers_every_row_once_sqlite() {
    run_property(sqlite_database(), 40);
}

#[test]
fn keyset_paging_delivers_every_row_once_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(pg_database());
    drop(rt);
    run_property(db, 16);
}
