//! PostgreSQL CDC end to end: the real `caudal` binary, a real PostgreSQL 15
//! with `wal_level = logical` (`scripts/test` provisions it), and an HTTP
//! receiver on loopback.
//!
//! The strongest check is the replay: the changes the receiver accepted,
//! deduplicated by idempotency key and applied in order to an empty copy,
//! must reproduce the source tables exactly — after concurrent writers,
//! large transactions, SIGKILLs, a terminated walsender and a server
//! restart. Tests that restart PostgreSQL use a private server (initdb in a
//! temporary directory) so the shared one stays up for the others.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use caudal_testkit::{Receiver, TestDb, pg_database, pg_database_at};
use nix::sys::signal::Signal;
use rand::Rng as _;
use serde_json::{Value, json};
use support::cdc::{CHANGES, Tables, accepted_changes, apply, difference, normalise};
use support::{Daemon, Output, PATIENCE, command, spawn_daemon};

const PIPELINE: &str = "cdc";

/// One test's source database, receiver, state directory and config.
struct Cdc {
    db: TestDb,
    receiver: Receiver,
    dir: tempfile::TempDir,
    /// Slot and publication name, unique per test (slots are server-wide).
    slot: String,
    tables: Vec<String>,
    source_extra: String,
    sink_extra: String,
    /// Extra lines for the pipeline's table.
    pipeline_extra: String,
    /// Appended to the source URL's query (`&`-separated).
    url_options: String,
}

impl Cdc {
    async fn new(schema: &str, tables: &[&str]) -> Self {
        Self::on(pg_database().await, schema, tables).await
    }

    async fn on(db: TestDb, schema: &str, tables: &[&str]) -> Self {
        let slot = format!("caudal_t_{}", &db.name()[db.name().len() - 20..]);
        let cdc = Self {
            db,
            receiver: Receiver::start().await,
            dir: tempfile::tempdir().expect("a state directory"),
            slot,
            tables: tables.iter().map(|t| (*t).to_string()).collect(),
            source_extra: String::new(),
            sink_extra: String::new(),
            pipeline_extra: String::new(),
            url_options: String::new(),
        };
        if !schema.is_empty() {
            cdc.exec(schema).await;
        }
        cdc
    }

    fn config(&self) -> String {
        let tables: Vec<String> = self.tables.iter().map(|t| format!("{t:?}")).collect();
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}{options}"
mode = "cdc"
tables = [{tables}]
slot = "{slot}"
publication = "{slot}"
heartbeat = "1s"
page_size = 300
{source_extra}

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 200, max_wait = "100ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}
body = '{{"changes": {{{{ records | tojson }}}}}}'
{sink_extra}

[pipelines.{PIPELINE}]
source = "pg"
sink = "recv"
{pipeline_extra}
"#,
            state = self.dir.path().join("state.db").display(),
            url = self.db.url(),
            // A small decoding memory makes the server spill large
            // transactions to disk, as it does with big ones in production.
            options = if self.db.url().contains('?') {
                "&"
            } else {
                "?"
            }
            .to_string()
                + "options=-c%20logical_decoding_work_mem%3D64kB",
            tables = tables.join(", "),
            slot = self.slot,
            source_extra = self.source_extra,
            receiver = self.receiver.url("/ingest"),
            sink_extra = self.sink_extra,
            pipeline_extra = self.pipeline_extra,
        )
    }

    fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("caudal.toml");
        std::fs::write(&path, self.config()).expect("write the config");
        path
    }

    async fn caudal(&self, args: &[&str]) -> Output {
        Output::of(command(&self.write_config(), self.dir.path(), args)).await
    }

    /// `caudal once`, which must succeed.
    async fn once(&self) -> Output {
        let out = self.caudal(&["once", PIPELINE]).await;
        assert_eq!(out.code, Some(0), "caudal once failed: {out}");
        out
    }

    fn daemon(&self, n: u32) -> Daemon {
        spawn_daemon(&self.write_config(), self.dir.path(), n)
    }

    async fn exec(&self, sql: &str) {
        let pool = self.db.pg_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    }

    /// The accepted changes, each batch once.
    fn changes(&self) -> Vec<Value> {
        accepted_changes(&self.receiver)
    }

    /// Waits until the changes applied in order reproduce the source tables;
    /// panics with the difference otherwise.
    async fn wait_for_copy(&self, daemon: Option<&Daemon>) {
        // Catching up on a large workload takes a debug build a while.
        let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
        loop {
            let want = self.source_rows().await;
            let got = apply(&self.changes());
            if got == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let diff = difference(&want, &got);
                let dump = std::env::temp_dir().join(format!("{}-changes.json", self.slot));
                let _ = std::fs::write(&dump, Value::Array(self.changes()).to_string());
                eprintln!("changes written to {}", dump.display());
                panic!(
                    "the replayed copy differs from the source after {:?}: {diff}\nlog:\n{}",
                    2 * PATIENCE,
                    daemon.map(Daemon::log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every row of the captured tables, as caudal renders simple types.
    async fn source_rows(&self) -> Tables {
        let pool = self.db.pg_pool().await;
        let mut out = Tables::new();
        for t in &self.tables {
            let rows: Vec<(Value,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT to_jsonb(x) FROM {t} x"
            )))
            .fetch_all(&pool)
            .await
            .expect("read the source table");
            let table = out.entry(format!("public.{t}")).or_default();
            for (row,) in rows {
                let Value::Object(row) = row else { continue };
                table.insert(json!([row["id"]]).to_string(), row);
            }
        }
        pool.close().await;
        // Tables never written to are absent from a replay too.
        out.retain(|_, rows| !rows.is_empty());
        normalise(out)
    }

    /// How many replication slots and publications of this test's name
    /// the server has.
    async fn slot_and_publication(&self) -> (i64, i64) {
        let pool = self.db.pg_pool().await;
        let counts = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1), \
                    (SELECT count(*) FROM pg_publication WHERE pubname = $1)",
        )
        .bind(&self.slot)
        .fetch_one(&pool)
        .await
        .expect("count the slot and the publication");
        pool.close().await;
        counts
    }

    /// Drops the slot (which would block dropping the database), then the
    /// database.
    async fn cleanup(self) {
        let pool = self.db.pg_pool().await;
        for _ in 0..50 {
            let _ = sqlx::query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
            )
            .bind(&self.slot)
            .execute(&pool)
            .await;
            let dropped = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .execute(&pool)
            .await;
            if dropped.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pool.close().await;
        self.db.cleanup().await;
    }
}

/// The (lsn, index) of every streamed change, with how often it arrived
/// after deduplication by idempotency key.
fn positions(changes: &[Value]) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    for c in changes.iter().filter(|c| c["op"] != "read") {
        let lsn = c["lsn"].as_str().expect("lsn").to_string();
        let index = c["index"].as_u64().expect("index");
        *out.entry((lsn, index)).or_default() += 1;
    }
    out
}

const WORKLOAD_SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL);
    CREATE TABLE events (id bigint PRIMARY KEY, account bigint, note text);
    INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 500) g;";

static NEXT_ID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1_000_000);

/// Writes from `writers` connections at once until `stop`: single and
/// multi-row inserts, updates, deletes, and every so often a large
/// transaction; returns how many statements ran.
async fn workload(
    url: String,
    writers: usize,
    bulk: i64,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers {
            let url = url.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("a writer connection");
                let mut n = 0u64;
                // Fresh ids for every writer of every workload in this process.
                let mut next = NEXT_ID.fetch_add(100_000_000, std::sync::atomic::Ordering::Relaxed);
                while !stop.is_cancelled() {
                    // About 100 statements a second per writer: a workload a
                    // debug build keeps up with on a busy machine.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let pick = rand::rng().random_range(0..100);
                    let id = rand::rng().random_range(1..=600i64);
                    let sql = match pick {
                        0..=29 => format!(
                            "UPDATE accounts SET balance = balance + 1, owner = owner || '.' WHERE id = {id}"
                        ),
                        30..=44 => format!("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE account = {id} LIMIT 3)"),
                        45..=54 => format!(
                            "INSERT INTO accounts VALUES ({id}, 'new {id}', 0) ON CONFLICT (id) DO UPDATE SET balance = 0"
                        ),
                        55..=56 => format!("DELETE FROM accounts WHERE id = {id}"),
                        57 => {
                            // A large transaction: thousands of rows in one
                            // commit, far over the decoding memory.
                            let from = next;
                            next += bulk;
                            format!(
                                "BEGIN; INSERT INTO events SELECT g, g % 600, repeat('x', 50) FROM generate_series({from}, {}) g; \
                                 UPDATE events SET note = 'bulk' WHERE id BETWEEN {from} AND {}; COMMIT;",
                                from + bulk - 1,
                                from + bulk / 3
                            )
                        }
                        _ => {
                            let from = next;
                            next += 10;
                            format!(
                                "INSERT INTO events SELECT g, {id}, 'e' || g FROM generate_series({from}, {}) g",
                                from + 9
                            )
                        }
                    };
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&pool)
                        .await
                        .expect("a workload statement");
                    n += 1;
                }
                pool.close().await;
                n
            });
        }
        let mut total = 0;
        while let Some(n) = tasks.join_next().await {
            total += n.expect("a writer task");
        }
        total
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_exactly_through_snapshot_and_stream() {
    let schema = "
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE typed (
            id int PRIMARY KEY,
            i2 smallint, i4 integer, i8 bigint, num numeric(20,6), f4 real, f8 double precision,
            t text, vc varchar(20), ch char(3), b boolean,
            ts timestamp, tstz timestamptz, d date, tm time, iv interval,
            u uuid, j json, jb jsonb, arr int[], tarr text[], by bytea, m mood, n text
        );";
    let values = "(-32768, 2147483647, -9223372036854775808, 12345678901234.500001, 1.5, -2.25e-300,
        'héllo \"quoted\" \\ back', 'varchar', 'ab', true,
        '2025-05-14 12:34:56.5', '2025-05-14 12:34:56.123456+02', '2025-05-14', '23:59:59.999999', '1 year 2 mons 3 days 04:05:06',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.5, null]}', '{\"b\": {\"c\": true}}',
        '{1,NULL,3}', '{\"x y\",\"\"}', '\\xdeadbeef', 'happy', NULL)";
    let cdc = Cdc::new(schema, &["typed"]).await;
    cdc.exec(&format!("INSERT INTO typed VALUES (1, {}", &values[1..]))
        .await;
    cdc.once().await;
    cdc.exec(&format!("INSERT INTO typed VALUES (2, {}", &values[1..]))
        .await;
    cdc.once().await;
    let changes = cdc.changes();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["op"], "read");
    assert_eq!(changes[1]["op"], "insert");
    let expected = json!({
        "i2": -32768, "i4": 2147483647, "i8": -9223372036854775808i64,
        "num": "12345678901234.500001", "f4": 1.5, "f8": -2.25e-300,
        "t": "héllo \"quoted\" \\ back", "vc": "varchar", "ch": "ab ", "b": true,
        "ts": "2025-05-14T12:34:56.500", "tstz": "2025-05-14T10:34:56.123456Z",
        "d": "2025-05-14", "tm": "23:59:59.999999", "iv": "P1Y2M3DT4H5M6S",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": {"a": [1, 2.5, null]},
        "jb": {"b": {"c": true}}, "arr": [1, null, 3], "tarr": ["x y", ""],
        "by": "3q2+7w==", "m": "happy", "n": null
    });
    for c in &changes {
        let mut after = c["after"].as_object().expect("after").clone();
        let id = after.remove("id").expect("id");
        assert_eq!(Value::Object(after), expected, "row {id}: {c}");
        assert_eq!(c["table"], "public.typed");
        assert_eq!(c["key"], json!({"id": id}));
    }
    // Stream metadata: commit LSN, transaction id, commit time, index.
    let s = &changes[1];
    assert!(s["xid"].as_u64().is_some(), "{s}");
    assert_eq!(s["index"], 0);
    assert!(
        s["commit_time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    assert!(s["lsn"].as_str().is_some_and(|l| l.contains('/')), "{s}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_large_transactions_replay_to_an_exact_copy() {
    let mut cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    cdc.sink_extra = "delivery.concurrency = 4".into();
    let daemon = cdc.daemon(1);
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 4, 3000, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    cdc.exec("TRUNCATE events").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let statements = writers.await.expect("the workload");
    assert!(
        statements > 100,
        "the workload ran only {statements} statements"
    );
    cdc.wait_for_copy(Some(&daemon)).await;
    let changes = cdc.changes();
    assert!(
        positions(&changes).values().all(|&n| n == 1),
        "a change arrived twice under different idempotency keys"
    );
    assert!(changes.iter().any(|c| c["op"] == "truncate"));
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_change() {
    let cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 3, 500, stop.clone()).await;
    let mut logs = String::new();
    for cycle in 0..15 {
        let daemon = cdc.daemon(cycle);
        let ms = rand::rng().random_range(300..2500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let (_, log) = daemon.stop(Signal::SIGKILL).await;
        logs = log;
    }
    stop.cancel();
    writers.await.expect("the workload");
    let daemon = cdc.daemon(99);
    cdc.wait_for_copy(Some(&daemon)).await;
    let changes = cdc.changes();
    let twice: Vec<_> = positions(&changes)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "changes sent again under a new idempotency key: {twice:?}\nlast killed log:\n{logs}"
    );
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_values_left_unchanged_are_marked_never_null() {
    let cdc = Cdc::new(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         CREATE TABLE full_docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE full_docs REPLICA IDENTITY FULL;",
        &["docs", "full_docs"],
    )
    .await;
    cdc.once().await;
    // Random text does not compress: it is stored out of line (TOAST).
    let big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1000))";
    for t in ["docs", "full_docs"] {
        cdc.exec(&format!("INSERT INTO {t} VALUES (1, 'first', {big})"))
            .await;
        cdc.exec(&format!("UPDATE {t} SET title = 'second' WHERE id = 1"))
            .await;
    }
    cdc.once().await;
    let changes = cdc.changes();
    let update = |t: &str| {
        changes
            .iter()
            .find(|c| c["op"] == "update" && c["table"] == format!("public.{t}"))
            .cloned()
            .unwrap_or_else(|| panic!("no update of {t}: {changes:?}"))
    };
    let plain = update("docs");
    assert_eq!(plain["unchanged"], json!(["body"]), "{plain}");
    assert!(plain["after"].get("body").is_none(), "{plain}");
    assert_eq!(plain["after"]["title"], "second");
    assert_eq!(
        plain["before"],
        Value::Null,
        "default identity sends no old row"
    );
    let full = update("full_docs");
    let body = full["before"]["body"]
        .as_str()
        .expect("the old row has the body");
    assert_eq!(body.len(), 32_000);
    assert_eq!(full["before"]["title"], "first");
    // With REPLICA IDENTITY FULL the old row completes the new one.
    assert_eq!(full["after"]["body"].as_str(), Some(body), "{full}");
    assert_eq!(full["unchanged"], json!([]), "{full}");
    // Applied in order, the copy still has the body.
    cdc.wait_for_copy(None).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_and_new_tables_are_picked_up_without_a_restart() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE later (id int PRIMARY KEY, v text);",
        &["items"],
    )
    .await;
    let daemon = cdc.daemon(1);
    cdc.exec("INSERT INTO items VALUES (1, 'a', 1)").await;
    let streaming = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 1, PATIENCE)
        .await;
    assert!(streaming, "{}", daemon.log());
    cdc.exec("ALTER TABLE items ADD COLUMN price numeric(10,2)")
        .await;
    cdc.exec("INSERT INTO items VALUES (2, 'b', 2, 9.50)").await;
    cdc.exec("ALTER TABLE items DROP COLUMN qty").await;
    cdc.exec("INSERT INTO items VALUES (3, 'c', 1.25)").await;
    cdc.exec("ALTER TABLE items ALTER COLUMN name TYPE varchar(10)")
        .await;
    cdc.exec("UPDATE items SET name = 'renamed' WHERE id = 1")
        .await;
    let publication = &cdc.slot;
    cdc.exec(&format!("ALTER PUBLICATION {publication} ADD TABLE later"))
        .await;
    cdc.exec("INSERT INTO later VALUES (7, 'seen')").await;
    let arrived = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 5, PATIENCE)
        .await;
    assert!(arrived, "{:?}\n{}", cdc.changes(), daemon.log());
    let changes = cdc.changes();
    let after = |i: usize| changes[i]["after"].clone();
    assert_eq!(after(0), json!({"id": 1, "name": "a", "qty": 1}));
    assert_eq!(
        after(1),
        json!({"id": 2, "name": "b", "qty": 2, "price": "9.50"})
    );
    assert_eq!(after(2), json!({"id": 3, "name": "c", "price": "1.25"}));
    assert_eq!(after(3), json!({"id": 1, "name": "renamed", "price": null}));
    assert_eq!(changes[4]["table"], "public.later");
    assert_eq!(after(4), json!({"id": 7, "v": "seen"}));
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_behind_caudals_back_stops_the_pipeline_until_resync() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items VALUES (1, 'one');",
        &["items"],
    )
    .await;
    cdc.once().await;
    cdc.exec("INSERT INTO items VALUES (2, 'two')").await;
    cdc.once().await;
    cdc.exec(&format!("SELECT pg_drop_replication_slot('{}')", cdc.slot))
        .await;
    cdc.exec("INSERT INTO items VALUES (3, 'lost to the slot')")
        .await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("does not exist") && out.stderr.contains("caudal resync"),
        "the error says what happened and what to do: {out}"
    );
    // The daemon stops the pipeline too, instead of recreating the slot.
    let daemon = cdc.daemon(1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !daemon.log().contains("pipeline stopped") {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop(Signal::SIGTERM).await;
    let status = cdc.caudal(&["status", "--json"]).await;
    assert!(status.stdout.contains("\"slot_exists\":false"), "{status}");

    let resync = cdc.caudal(&["resync", PIPELINE]).await;
    assert_eq!(resync.code, Some(0), "{resync}");
    cdc.receiver.clear();
    cdc.once().await;
    let changes = cdc.changes();
    let ids: BTreeSet<i64> = changes
        .iter()
        .map(|c| c["after"]["id"].as_i64().expect("id"))
        .collect();
    assert!(changes.iter().all(|c| c["op"] == "read"), "{changes:?}");
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));

    // `caudal cdc drop` removes slot and publication.
    let dropped = cdc.caudal(&["cdc", "drop", PIPELINE]).await;
    assert_eq!(dropped.code, Some(0), "{dropped}");
    assert_eq!(cdc.slot_and_publication().await, (0, 0), "{dropped}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_slot_and_its_lag() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        &["items"],
    )
    .await;
    cdc.once().await;
    cdc.exec("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 2000) g")
        .await;
    let out = cdc.caudal(&["status", "--json"]).await;
    let all: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let r = &all[0]["replication"];
    assert_eq!(r["slot"], cdc.slot.as_str(), "{all}");
    assert_eq!(r["slot_exists"], true);
    assert!(r["lag_bytes"].as_u64().is_some_and(|b| b > 10_000), "{all}");
    let text = cdc.caudal(&["status"]).await;
    assert!(text.stdout.contains("LAG"), "{text}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_moves_on_while_the_captured_tables_are_idle_and_the_server_is_not() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE busy (id bigint, pad text);",
        &["items"],
    )
    .await;
    let daemon = cdc.daemon(1);
    cdc.exec("INSERT INTO items VALUES (1)").await;
    assert!(
        cdc.receiver
            .wait_for_accepted_records(CHANGES, 1, PATIENCE)
            .await,
        "{}",
        daemon.log()
    );
    // Megabytes of WAL the pipeline does not capture.
    for i in 0..20 {
        cdc.exec(&format!(
            "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
            i * 5000,
            i * 5000 + 4999
        ))
        .await;
    }
    let pool = cdc.db.pg_pool().await;
    let (written,): (i64,) = sqlx::query_as("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(&pool)
        .await
        .expect("wal position");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (confirmed,): (i64,) = sqlx::query_as(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&cdc.slot)
        .fetch_one(&pool)
        .await
        .expect("slot position");
        if confirmed >= written {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot stayed {} bytes behind; log:\n{}",
            written - confirmed,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.close().await;
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_never_lets_the_server_time_the_connection_out() {
    let mut cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY, pad text);",
        &["items"],
    )
    .await;
    // The server drops a replica silent for 2s; the buffer fills at once.
    cdc.url_options = "%20-c%20wal_sender_timeout%3D2s".into();
    cdc.pipeline_extra = "buffer = { max_bytes = \"64KiB\" }".into();
    cdc.receiver.set_status(503);
    let daemon = cdc.daemon(1);
    cdc.exec("INSERT INTO items SELECT g, repeat('p', 100) FROM generate_series(1, 5000) g")
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(cdc.changes().is_empty());
    cdc.receiver.set_status(200);
    cdc.wait_for_copy(Some(&daemon)).await;
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(
        !log.contains("reconnecting"),
        "the connection was dropped:\n{log}"
    );
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_001_payload_comes_from_cdc_with_the_example_template() {
    let mut cdc = Cdc::new(
        "CREATE TABLE service_requests (
            request_id BIGINT PRIMARY KEY, service_id TEXT NOT NULL,
            opening_date TIMESTAMPTZ NOT NULL, status_id INTEGER NOT NULL,
            last_modified_date TIMESTAMPTZ NOT NULL);
         INSERT INTO service_requests VALUES (1, 'SRV-1', '2025-05-14 12:00Z', 1, '2025-05-14 12:00Z');",
        &["service_requests"],
    )
    .await;
    // The body of examples/seed-001-cdc.toml, as written there.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/seed-001-cdc.toml"
    ))
    .expect("the example");
    let body = example
        .lines()
        .find(|l| l.starts_with("body = "))
        .expect("a body line");
    cdc.sink_extra = body.to_string();
    let config = cdc
        .config()
        .replace("body = '{\"changes\": {{ records | tojson }}}'\n", "");
    let path = cdc.dir.path().join("seed.toml");
    std::fs::write(&path, config).expect("write the config");
    let run = || Output::of(command(&path, cdc.dir.path(), &["once", PIPELINE]));
    let out = run().await;
    assert_eq!(out.code, Some(0), "{out}");
    cdc.exec(
        "UPDATE service_requests SET status_id = 2, last_modified_date = '2025-05-14 13:00Z' WHERE request_id = 1;
         INSERT INTO service_requests VALUES (2, 'SRV-2', '2025-05-14 12:30Z', 1, '2025-05-14 12:30Z');
         DELETE FROM service_requests WHERE request_id = 2;",
    )
    .await;
    let out = run().await;
    assert_eq!(out.code, Some(0), "{out}");
    let requests = cdc.receiver.accepted_records_at("/requests");
    let row = |id: i64, status: i64, opened: &str, modified: &str| {
        json!({"request_id": id, "service_id": format!("SRV-{id}"), "opening_date": opened,
               "status_id": status, "last_modified_date": modified})
    };
    assert_eq!(
        requests,
        vec![
            row(1, 1, "2025-05-14T12:00:00Z", "2025-05-14T12:00:00Z"),
            row(1, 2, "2025-05-14T12:00:00Z", "2025-05-14T13:00:00Z"),
            row(2, 1, "2025-05-14T12:30:00Z", "2025-05-14T12:30:00Z"),
        ]
    );
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_a_table_again_while_streaming_without_regressing_a_row() {
    let cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let daemon = cdc.daemon(1);
    cdc.wait_for_copy(Some(&daemon)).await;
    let before = cdc.changes().len();

    let out = cdc
        .caudal(&[
            "backfill",
            PIPELINE,
            "--table",
            "accounts",
            "--where",
            "id <= 300",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}\n{}", daemon.log());
    assert!(out.stdout.contains("300 rows sent"), "{out}");
    let reads: Vec<Value> = cdc.changes()[before..]
        .iter()
        .filter(|c| c["op"] == "read")
        .cloned()
        .collect();
    let ids: BTreeSet<i64> = reads
        .iter()
        .map(|c| c["key"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, (1..=300).collect::<BTreeSet<i64>>());
    assert!(
        reads.iter().all(|c| c["after"]["balance"].is_i64()),
        "{reads:?}"
    );

    // While writers change the same rows, a backfilled row never goes back
    // to an older state: replayed in order, the copy still matches.
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 2, 300, stop.clone()).await;
    let out = cdc
        .caudal(&["backfill", PIPELINE, "--table", "accounts"])
        .await;
    assert_eq!(out.code, Some(0), "{out}\n{}", daemon.log());
    stop.cancel();
    writers.await.expect("the workload");
    cdc.wait_for_copy(Some(&daemon)).await;

    // A bad filter is reported, and streaming goes on.
    let out = cdc
        .caudal(&[
            "backfill",
            PIPELINE,
            "--table",
            "accounts",
            "--where",
            "no_such_column = 1",
        ])
        .await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("no_such_column"), "{out}");
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_pipeline_drops_its_slot_and_publication() {
    let cdc = Cdc::new("CREATE TABLE items (id int PRIMARY KEY);", &["items"]).await;
    cdc.once().await;
    assert_eq!(cdc.slot_and_publication().await, (1, 1));
    // The CDC pipeline is gone; its source stays, another pipeline runs.
    let config = cdc.config();
    let cut = config
        .find(&format!("[pipelines.{PIPELINE}]"))
        .expect("the pipeline table");
    let config = format!(
        "{}[sources.rows]\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"items\"\ncursor = [\"id\"]\n\n\
         [pipelines.other]\nsource = \"rows\"\nsink = \"recv\"\nschedule = {{ every = \"1h\" }}\n",
        &config[..cut],
        cdc.db.url()
    );
    let path = cdc.dir.path().join("removed.toml");
    std::fs::write(&path, config).expect("write the config");
    let daemon = spawn_daemon(&path, cdc.dir.path(), 1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cdc.slot_and_publication().await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(log.contains("removed from the configuration"), "{log}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_is_a_delete_and_an_insert() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'a');",
        &["items"],
    )
    .await;
    cdc.once().await;
    cdc.exec("UPDATE items SET id = 2, v = 'b' WHERE id = 1")
        .await;
    cdc.once().await;
    let changes = cdc.changes();
    let ops: Vec<(&str, &Value)> = changes
        .iter()
        .map(|c| (c["op"].as_str().expect("op"), &c["key"]))
        .collect();
    assert_eq!(
        ops,
        [
            ("read", &json!({"id": 1})),
            ("delete", &json!({"id": 1})),
            ("insert", &json!({"id": 2}))
        ],
        "{changes:?}"
    );
    assert_eq!(changes[2]["after"], json!({"id": 2, "v": "b"}));
    assert_eq!(
        (changes[1]["index"].clone(), changes[2]["index"].clone()),
        (json!(0), json!(1))
    );
    cdc.wait_for_copy(None).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_on_one_slot_and_an_unsynced_buffer_are_refused() {
    let mut cdc = Cdc::new("CREATE TABLE items (id int PRIMARY KEY);", &["items"]).await;
    cdc.pipeline_extra =
        "buffer = { fsync = \"100ms\" }\n\n[pipelines.second]\nsource = \"pg\"\nsink = \"recv\""
            .into();
    let out = cdc.caudal(&["validate"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("would share replication slot"), "{out}");
    assert!(out.stderr.contains("fsync = \"batch\""), "{out}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_errors_say_what_to_change() {
    let cdc = Cdc::new(
        "CREATE TABLE nokey (v text); CREATE TABLE items (id int PRIMARY KEY);",
        &["nokey"],
    )
    .await;
    let role = format!("{}_user", cdc.slot);
    cdc.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    // A table without a primary key is captured; the run says what of it
    // is captured and what to change to capture more.
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains("table has no primary key: its inserts and truncates are captured"),
        "{out}"
    );
    assert!(out.stderr.contains("REPLICA IDENTITY FULL"), "{out}");

    // A user without the REPLICATION attribute.
    let mut norepl = Cdc::on(
        pg_database().await,
        "CREATE TABLE items (id int PRIMARY KEY);",
        &["items"],
    )
    .await;
    let url = norepl
        .db
        .url()
        .replacen("postgres@", &format!("{role}@"), 1);
    norepl.source_extra = String::new();
    let config = norepl.config().replace(norepl.db.url(), &url);
    let path = norepl.dir.path().join("norepl.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Output::of(command(&path, norepl.dir.path(), &["once", PIPELINE])).await;
    assert!(
        out.stderr.contains("may not use replication") && out.stderr.contains("WITH REPLICATION"),
        "{out}"
    );
    cdc.exec(&format!("DROP ROLE {role}")).await;
    norepl.cleanup().await;
    cdc.cleanup().await;
}

/// Whether the tests run as root (the real user id in /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A PostgreSQL server of the test's own, so it can be restarted.
struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePg {
    fn bin(tool: &str) -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin").join(tool))
                    .collect()
            })
            .unwrap_or_default();
        found.retain(|p| p.exists());
        found.sort();
        found.pop().unwrap_or_else(|| {
            panic!(
                "{tool} not found under /usr/lib/postgresql: install postgresql (scripts/test does)"
            )
        })
    }

    /// Runs a PostgreSQL tool as the `postgres` user when we are root
    /// (initdb refuses root).
    fn run(args: &[&str]) {
        let root = is_root();
        let mut cmd = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c
        } else {
            std::process::Command::new(args[0])
        };
        if root {
            cmd.args(args);
        } else {
            cmd.args(&args[1..]);
        }
        let out = cmd.output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `wal_level`: its value, optionally followed by more `-c` settings.
    fn start(wal_level: &str) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the server");
        if is_root() {
            let out = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .output()
                .expect("chown");
            assert!(out.status.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let data = dir.path().join("data");
        let initdb = Self::bin("initdb");
        Self::run(&[
            initdb.to_str().expect("path"),
            "-D",
            data.to_str().expect("path"),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        let pg = Self { dir, port };
        pg.ctl("start", wal_level);
        pg
    }

    fn ctl(&self, action: &str, wal_level: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level={wal_level}",
            self.port,
            self.dir.path().display()
        );
        Self::run(&[
            Self::bin("pg_ctl").to_str().expect("path"),
            "-D",
            data.to_str().expect("path"),
            "-l",
            log.to_str().expect("path"),
            "-o",
            &opts,
            "-m",
            "fast",
            "-w",
            action,
        ]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let pg_ctl = Self::bin("pg_ctl");
        let _ = std::panic::catch_unwind(|| {
            Self::run(&[
                pg_ctl.to_str().unwrap_or_default(),
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ]);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_walsender_and_a_server_restart_lose_nothing() {
    let pg = PrivatePg::start("logical");
    let cdc = Cdc::on(
        pg_database_at(&pg.url()).await,
        WORKLOAD_SCHEMA,
        &["accounts", "events"],
    )
    .await;
    let daemon = cdc.daemon(1);
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 2, 1000, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cdc.exec(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}'",
        cdc.slot
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    writers.await.expect("the workload");
    // Restart mid-stream: everything written so far is in WAL, caudal is
    // streaming it when the server goes away.
    pg.ctl("restart", "logical");
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 2, 1000, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    writers.await.expect("the workload");
    cdc.wait_for_copy(Some(&daemon)).await;
    assert!(
        positions(&cdc.changes()).values().all(|&n| n == 1),
        "a change arrived twice under different idempotency keys"
    );
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("reconnecting"), "{log}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_the_server_stops_the_pipeline_until_resync() {
    // The server may keep at most 1MB of WAL for a slot.
    let pg = PrivatePg::start("logical -c max_slot_wal_keep_size=1MB");
    let cdc = Cdc::on(
        pg_database_at(&pg.url()).await,
        "CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE busy (pad text);
         INSERT INTO items VALUES (1);",
        &["items"],
    )
    .await;
    cdc.once().await;
    // With caudal stopped, far more WAL than that goes by.
    let pool = cdc.db.pg_pool().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        sqlx::raw_sql(
            "INSERT INTO busy SELECT repeat('x', 1000) FROM generate_series(1, 20000); \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .execute(&pool)
        .await
        .expect("write WAL");
        let (status,): (Option<String>,) =
            sqlx::query_as("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&cdc.slot)
                .fetch_one(&pool)
                .await
                .expect("the slot");
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot is still {status:?}"
        );
    }
    pool.close().await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("invalidated") && out.stderr.contains("caudal resync"),
        "{out}"
    );
    let resync = cdc.caudal(&["resync", PIPELINE]).await;
    assert_eq!(resync.code, Some(0), "{resync}");
    cdc.receiver.clear();
    cdc.once().await;
    let reads: Vec<Value> = cdc.changes();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["op"], "read");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_logical_wal_is_refused_with_what_to_change() {
    let pg = PrivatePg::start("replica");
    let cdc = Cdc::on(
        pg_database_at(&pg.url()).await,
        "CREATE TABLE items (id int PRIMARY KEY);",
        &["items"],
    )
    .await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("wal_level = replica") && out.stderr.contains("wal_level = logical"),
        "{out}"
    );
    cdc.cleanup().await;
}
