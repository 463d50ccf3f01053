//! The hourly sync end to end, against real PostgreSQL, MariaDB and SQLite
//! databases and a real HTTP receiver on loopback: exactly the table's rows
//! arrive, later changes arrive on the next run, rows sharing a timestamp
//! across page boundaries arrive once each, rows inside the safety lag wait,
//! and a receiver that is down fails the run without moving the checkpoint.

use std::collections::HashMap;
use std::time::Duration;

use caudal_core::config::{Format, load_str};
use caudal_engine::{Pipeline, RunSummary, Trigger};
use caudal_store::{RunOutcome, Store};
use caudal_testkit::{
    DbKind, Receiver, Reply, TestDb, mysql_database, pg_database, sqlite_database,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const PIPELINE: &str = "requests_to_partner";

/// One test's world: a source database, a receiver, a state store.
struct World {
    db: TestDb,
    receiver: Receiver,
    state: tempfile::TempDir,
    extra_source: String,
    page_size: u32,
    max_records: usize,
    /// `retry.max_attempts` of the sink (1: a failure fails the run).
    max_attempts: u32,
    /// The pipeline's `ack` mode.
    ack: &'static str,
}

impl World {
    async fn new(kind: DbKind) -> Self {
        let db = match kind {
            DbKind::Postgres => pg_database().await,
            DbKind::MySql => mysql_database().await,
            DbKind::Sqlite => sqlite_database(),
        };
        let world = Self {
            db,
            receiver: Receiver::start().await,
            state: tempfile::tempdir().expect("tempdir"),
            extra_source: String::new(),
            page_size: 7,
            max_records: 10,
            max_attempts: 1,
            ack: "buffered",
        };
        world.exec(&create_table_sql(kind)).await;
        world
    }

    fn kind(&self) -> DbKind {
        self.db.kind()
    }

    async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self.kind() {
            DbKind::Postgres => {
                sqlx::raw_sql(sql)
                    .execute(&self.db.pg_pool().await)
                    .await
                    .expect("pg exec");
            }
            DbKind::MySql => {
                sqlx::raw_sql(sql)
                    .execute(&self.db.mysql_pool().await)
                    .await
                    .expect("mysql exec");
            }
            DbKind::Sqlite => {
                sqlx::raw_sql(sql)
                    .execute(&self.db.sqlite_pool().await)
                    .await
                    .expect("sqlite exec");
            }
        }
    }

    fn config(&self) -> String {
        let source_type = match self.kind() {
            DbKind::Postgres => "postgres",
            DbKind::MySql => "mysql",
            DbKind::Sqlite => "sqlite",
        };
        format!(
            r#"
[state]
url = "sqlite://{state}/state.db"

[sources.servicedesk]
type = "{source_type}"
url = "{url}"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]
page_size = {page_size}
{extra}

[sinks.partner]
type = "http"
url = "{receiver}"
batch = {{ max_records = {max_records}, max_wait = "200ms" }}
delivery.retry = {{ max_attempts = {max_attempts}, initial = "10ms" }}
body = '{{"requests": {{{{ records | tojson }}}}}}'

[pipelines.{PIPELINE}]
source = "servicedesk"
sink = "partner"
schedule = {{ every = "1h" }}
ack = "{ack}"
"#,
            ack = self.ack,
            state = self.state.path().display(),
            url = self.db.url(),
            page_size = self.page_size,
            extra = self.extra_source,
            receiver = self.receiver.url("/services-data/requests"),
            max_records = self.max_records,
            max_attempts = self.max_attempts,
        )
    }

    async fn pipeline(&self) -> Pipeline {
        let config = load_str(&self.config(), Format::Toml, "test.toml", &|_| None)
            .unwrap_or_else(|e| panic!("config: {e}"));
        let store = Store::open(config.state.url.expose()).await.expect("store");
        Pipeline::build(PIPELINE, &config, store)
            .await
            .expect("pipeline")
    }

    async fn run(&self) -> RunSummary {
        self.pipeline()
            .await
            .run_once(Trigger::Manual, &CancellationToken::new(), None)
            .await
            .expect("run starts")
    }

    /// Every record the receiver accepted, in arrival order.
    fn delivered(&self) -> Vec<Value> {
        self.receiver.accepted_records_at("/requests")
    }

    /// How many times each request id was delivered.
    fn counts(&self) -> HashMap<i64, usize> {
        let mut counts = HashMap::new();
        for r in self.delivered() {
            *counts
                .entry(r["request_id"].as_i64().expect("request_id"))
                .or_default() += 1;
        }
        counts
    }
}

fn create_table_sql(kind: DbKind) -> String {
    match kind {
        DbKind::Postgres => "CREATE TABLE service_requests (
                request_id BIGINT PRIMARY KEY,
                service_id TEXT NOT NULL,
                opening_date TIMESTAMPTZ NOT NULL,
                status_id INT NOT NULL,
                last_modified_date TIMESTAMPTZ NOT NULL);
            CREATE INDEX ON service_requests (last_modified_date, request_id);"
            .into(),
        DbKind::MySql => "CREATE TABLE service_requests (
                request_id BIGINT PRIMARY KEY,
                service_id VARCHAR(64) NOT NULL,
                opening_date DATETIME(6) NOT NULL,
                status_id INT NOT NULL,
                last_modified_date DATETIME(6) NOT NULL,
                KEY sync (last_modified_date, request_id))"
            .into(),
        DbKind::Sqlite => "CREATE TABLE service_requests (
                request_id INTEGER PRIMARY KEY,
                service_id TEXT NOT NULL,
                opening_date TIMESTAMP NOT NULL,
                status_id INTEGER NOT NULL,
                last_modified_date TIMESTAMP NOT NULL);
            CREATE INDEX sync ON service_requests (last_modified_date, request_id);"
            .into(),
    }
}

/// A timestamp literal `minute` minutes after 2025-05-14 12:00:00 UTC, in
/// each database's stored layout.
fn ts(kind: DbKind, minute: u32) -> String {
    let (h, m) = (12 + minute / 60, minute % 60);
    match kind {
        DbKind::Postgres => format!("'2025-05-14 {h:02}:{m:02}:00+00'"),
        DbKind::MySql => format!("'2025-05-14 {h:02}:{m:02}:00'"),
        DbKind::Sqlite => format!("'2025-05-14T{h:02}:{m:02}:00Z'"),
    }
}

/// Inserts rows `ids` with last_modified_date at `minute` (many per statement).
async fn insert(w: &World, ids: impl IntoIterator<Item = i64>, minute: u32) {
    let t = ts(w.kind(), minute);
    let values: Vec<String> = ids
        .into_iter()
        .map(|id| format!("({id}, 'SRV-{id}', {t}, 1, {t})"))
        .collect();
    for chunk in values.chunks(500) {
        w.exec(&format!(
            "INSERT INTO service_requests (request_id, service_id, opening_date, status_id, last_modified_date) VALUES {}",
            chunk.join(", ")
        ))
        .await;
    }
}

async fn update(w: &World, id: i64, status: i32, minute: u32) {
    let t = ts(w.kind(), minute);
    w.exec(&format!(
        "UPDATE service_requests SET status_id = {status}, last_modified_date = {t} WHERE request_id = {id}"
    ))
    .await;
}

macro_rules! for_each_database {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(caudal_testkit::DbKind::Postgres).await } )*
        }
        #[cfg(feature = "mysql")]
        mod mariadb {
            $( #[tokio::test] async fn $name() { super::$name(caudal_testkit::DbKind::MySql).await } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(caudal_testkit::DbKind::Sqlite).await } )*
        }
    };
}

for_each_database!(
    delivers_exactly_the_rows_then_later_changes,
    ten_thousand_rows_sharing_a_timestamp_arrive_once_each,
    row_inside_the_safety_lag_waits_for_the_next_run,
    receiver_down_with_ack_delivered_fails_the_run_and_keeps_the_checkpoint,
    failure_mid_run_with_ack_delivered_resumes_after_the_last_accepted_batch,
    receiver_down_with_ack_buffered_keeps_the_batches_in_the_buffer,
);

async fn delivers_exactly_the_rows_then_later_changes(kind: DbKind) {
    let w = World::new(kind).await;
    // 25 rows over 5 timestamps: ties inside and across pages of 7.
    for minute in 0..5 {
        insert(&w, (1..=5).map(|i| i64::from(minute) * 5 + i), minute).await;
    }
    let first = w.run().await;
    assert_eq!(first.outcome, RunOutcome::Succeeded, "{:?}", first.error);
    assert_eq!((first.rows_read, first.rows_delivered), (25, 25));
    let counts = w.counts();
    assert_eq!(counts.len(), 25);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
    // The seed-001 envelope and faithful values.
    let row7 = w
        .delivered()
        .into_iter()
        .find(|r| r["request_id"] == 7)
        .expect("row 7");
    let expected_ts = match kind {
        DbKind::Postgres => "2025-05-14T12:01:00Z",
        DbKind::MySql => "2025-05-14T12:01:00",
        DbKind::Sqlite => "2025-05-14T12:01:00Z",
    };
    assert_eq!(row7["last_modified_date"], expected_ts);
    assert_eq!(row7["opening_date"], expected_ts);
    assert_eq!(row7["service_id"], "SRV-7");
    assert_eq!(row7["status_id"], 1);
    // Batches of at most 10 records.
    let sizes: Vec<usize> = w
        .receiver
        .requests()
        .iter()
        .map(|r| {
            r.json.as_ref().expect("json")["requests"]
                .as_array()
                .expect("array")
                .len()
        })
        .collect();
    assert_eq!(sizes, [10, 10, 5]);

    // Later: three new rows and two updates; only those are sent.
    insert(&w, [26, 27, 28], 10).await;
    update(&w, 3, 4, 11).await;
    update(&w, 20, 5, 11).await;
    w.receiver.clear();
    let second = w.run().await;
    assert_eq!(second.outcome, RunOutcome::Succeeded, "{:?}", second.error);
    let mut ids: Vec<i64> = w
        .delivered()
        .iter()
        .map(|r| r["request_id"].as_i64().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [3, 20, 26, 27, 28]);
    let row3 = w
        .delivered()
        .into_iter()
        .find(|r| r["request_id"] == 3)
        .expect("row 3");
    assert_eq!(row3["status_id"], 4);

    // Nothing changed: nothing sent.
    w.receiver.clear();
    let third = w.run().await;
    assert_eq!((third.rows_read, w.receiver.request_count()), (0, 0));
    w.db.cleanup().await;
}

async fn ten_thousand_rows_sharing_a_timestamp_arrive_once_each(kind: DbKind) {
    let mut w = World::new(kind).await;
    w.page_size = 999;
    w.max_records = 1000;
    insert(&w, 1..=10_000, 0).await;
    let run = w.run().await;
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!(run.rows_delivered, 10_000);
    let counts = w.counts();
    assert_eq!(counts.len(), 10_000);
    assert!(counts.values().all(|&n| n == 1));
    // Two more rows at the same timestamp with higher ids, one at a later
    // one: exactly those three next time.
    insert(&w, [10_001, 10_002], 0).await;
    insert(&w, [10_003], 1).await;
    w.receiver.clear();
    let next = w.run().await;
    assert_eq!(next.rows_delivered, 3, "{:?}", next.error);
    let mut ids: Vec<i64> = w
        .delivered()
        .iter()
        .map(|r| r["request_id"].as_i64().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [10_001, 10_002, 10_003]);
    w.db.cleanup().await;
}

async fn row_inside_the_safety_lag_waits_for_the_next_run(kind: DbKind) {
    let mut w = World::new(kind).await;
    w.extra_source = "lag = \"2s\"".into();
    insert(&w, [1, 2], 0).await;
    let now = match kind {
        DbKind::Postgres => "now()",
        DbKind::MySql => "UTC_TIMESTAMP(6)",
        DbKind::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    };
    w.exec(&format!(
        "INSERT INTO service_requests (request_id, service_id, opening_date, status_id, last_modified_date) \
         VALUES (3, 'SRV-3', {now}, 1, {now})"
    ))
    .await;
    let first = w.run().await;
    assert_eq!(first.outcome, RunOutcome::Succeeded, "{:?}", first.error);
    let ids: Vec<i64> = w
        .delivered()
        .iter()
        .map(|r| r["request_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, [1, 2], "the fresh row must wait for the lag");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = w.run().await;
    assert_eq!(second.rows_delivered, 1, "{:?}", second.error);
    let ids: Vec<i64> = w
        .delivered()
        .iter()
        .map(|r| r["request_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    w.db.cleanup().await;
}

async fn receiver_down_with_ack_delivered_fails_the_run_and_keeps_the_checkpoint(kind: DbKind) {
    let mut w = World::new(kind).await;
    w.ack = "delivered";
    insert(&w, 1..=30, 0).await;
    w.receiver.stop().await;
    let failed = w.run().await;
    assert_eq!(failed.outcome, RunOutcome::Failed);
    let error = failed.error.expect("error").report();
    assert!(error.contains("could not connect"), "{error}");
    assert_eq!(failed.rows_delivered, 0);
    assert!(
        failed.checkpoint.is_none(),
        "checkpoint moved: {:?}",
        failed.checkpoint
    );
    let store = w.pipeline().await.store().clone();
    let recorded = store
        .last_run(PIPELINE)
        .await
        .expect("runs")
        .expect("a run");
    assert_eq!(recorded.outcome, RunOutcome::Failed);
    assert!(
        recorded
            .error
            .as_deref()
            .unwrap_or("")
            .contains("could not connect")
    );

    w.receiver.restart().await;
    let ok = w.run().await;
    assert_eq!(ok.outcome, RunOutcome::Succeeded, "{:?}", ok.error);
    assert_eq!(ok.rows_delivered, 30);
    assert_eq!(w.counts().len(), 30);
    assert!(w.counts().values().all(|&n| n == 1));
    w.db.cleanup().await;
}

async fn failure_mid_run_with_ack_delivered_resumes_after_the_last_accepted_batch(kind: DbKind) {
    let mut w = World::new(kind).await;
    w.ack = "delivered";
    insert(&w, 1..=30, 0).await;
    // First batch accepted, second answered 503: the run fails with the
    // checkpoint after record 10.
    w.receiver
        .queue_replies([Reply::status(200), Reply::status(503)]);
    let failed = w.run().await;
    assert_eq!(failed.outcome, RunOutcome::Failed);
    assert_eq!(failed.rows_delivered, 10);
    let cp = failed.checkpoint.expect("checkpoint after the first batch");
    // By cursor, or, in a PostgreSQL first load, by the row's ctid.
    assert!(
        cp.display().ends_with(", 10)") || cp.display().ends_with(" at (0,10)"),
        "{}",
        cp.display()
    );

    let ok = w.run().await;
    assert_eq!(ok.outcome, RunOutcome::Succeeded, "{:?}", ok.error);
    assert_eq!(ok.rows_delivered, 20);
    // Accepted records: each id exactly once (the 503'd batch is not
    // counted as accepted, and was resent).
    let counts = w.counts();
    assert_eq!(counts.len(), 30);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    w.db.cleanup().await;
}

/// With `ack = "buffered"` (the default) a receiver that is down still
/// fails `run_once` (the run stops reading once delivery gave up), but what
/// was read is acknowledged: the checkpoint covers exactly the batches that
/// wait in the buffer. The next run sends them, then reads the rest; every
/// row arrives exactly once.
async fn receiver_down_with_ack_buffered_keeps_the_batches_in_the_buffer(kind: DbKind) {
    let w = World::new(kind).await;
    insert(&w, 1..=30, 0).await;
    w.receiver.stop().await;
    let failed = w.run().await;
    assert_eq!(failed.outcome, RunOutcome::Failed);
    assert_eq!(failed.rows_delivered, 0);
    let waiting = {
        let p = w.pipeline().await;
        p.buffer().await.expect("buffer").stats().unacked_records
    };
    assert!(waiting >= 1, "the first batch at least is buffered");
    let cp = failed
        .checkpoint
        .expect("the checkpoint covers the buffered rows");
    assert!(
        cp.display().ends_with(&format!(", {})", waiting * 10))
            || cp.display().ends_with(&format!(" at (0,{})", waiting * 10)),
        "{} with {waiting} batches buffered",
        cp.display()
    );

    w.receiver.restart().await;
    let ok = w.run().await;
    assert_eq!(ok.outcome, RunOutcome::Succeeded, "{:?}", ok.error);
    assert_eq!(
        ok.rows_read,
        30 - waiting * 10,
        "only the rows not buffered"
    );
    assert_eq!(ok.rows_delivered, 30);
    let counts = w.counts();
    assert_eq!(counts.len(), 30);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let p = w.pipeline().await;
    assert_eq!(p.buffer().await.expect("buffer").stats().unacked_records, 0);
    w.db.cleanup().await;
}
