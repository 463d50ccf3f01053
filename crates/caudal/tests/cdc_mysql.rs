//! MariaDB binlog CDC end to end: the real `caudal` binary, a real MariaDB
//! 10.11 with a ROW binary log and full row metadata (`scripts/test`
//! provisions it), and an HTTP receiver on loopback.
//!
//! As for PostgreSQL, the strongest check is the replay: the changes the
//! receiver accepted, deduplicated by idempotency key and applied in order
//! to an empty copy, must reproduce the source tables exactly — after
//! concurrent writers, large transactions, SIGKILLs, a killed dump thread
//! and a server restart. Tests that restart the server or purge its log use
//! a private MariaDB (its own data directory and port) so the shared one
//! stays as the other tests need it.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use caudal_testkit::{Receiver, TestDb, mysql_database, mysql_database_at};
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
    /// The replica server id, unique per test (replicas are server-wide).
    server_id: u32,
    tables: Vec<String>,
    source_extra: String,
    pipeline_extra: String,
}

static NEXT_SERVER_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Cdc {
    async fn new(schema: &str, tables: &[&str]) -> Self {
        Self::on(mysql_database().await, schema, tables).await
    }

    async fn on(db: TestDb, schema: &str, tables: &[&str]) -> Self {
        let n = NEXT_SERVER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cdc = Self {
            db,
            receiver: Receiver::start().await,
            dir: tempfile::tempdir().expect("a state directory"),
            server_id: 2_000_000_000 + std::process::id() % 100_000 * 100 + n,
            tables: tables.iter().map(|t| (*t).to_string()).collect(),
            source_extra: String::new(),
            pipeline_extra: String::new(),
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

[sources.my]
type = "mysql"
url = "{url}"
mode = "cdc"
tables = [{tables}]
server_id = {server_id}
heartbeat = "1s"
page_size = 300
{source_extra}

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 200, max_wait = "100ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}
body = '{{"changes": {{{{ records | tojson }}}}}}'

[pipelines.{PIPELINE}]
source = "my"
sink = "recv"
{pipeline_extra}
"#,
            state = self.dir.path().join("state.db").display(),
            url = self.db.url(),
            tables = tables.join(", "),
            server_id = self.server_id,
            source_extra = self.source_extra,
            receiver = self.receiver.url("/ingest"),
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
        let pool = self.db.mysql_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    }

    fn changes(&self) -> Vec<Value> {
        accepted_changes(&self.receiver)
    }

    /// `schema.table` of a test table.
    fn table(&self, t: &str) -> String {
        format!("{}.{t}", self.db.name())
    }

    /// Waits until the changes applied in order reproduce the source
    /// tables; panics with the difference otherwise.
    async fn wait_for_copy(&self, daemon: Option<&Daemon>) {
        let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
        loop {
            let want = self.source_rows().await;
            let got = apply(&self.changes());
            if got == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let diff = difference(&want, &got);
                panic!(
                    "the replayed copy differs from the source after {:?}: {diff}\nlog:\n{}",
                    2 * PATIENCE,
                    daemon.map(Daemon::log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every row of the captured tables (simple types only), as JSON.
    async fn source_rows(&self) -> Tables {
        let pool = self.db.mysql_pool().await;
        let mut out = Tables::new();
        for t in &self.tables {
            let columns: Vec<String> = sqlx::query_scalar(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            )
            .bind(t)
            .fetch_all(&pool)
            .await
            .expect("read the columns");
            let pairs: Vec<String> = columns.iter().map(|c| format!("'{c}', `{c}`")).collect();
            let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(JSON_OBJECT({}) AS CHAR) FROM `{t}`",
                pairs.join(", ")
            )))
            .fetch_all(&pool)
            .await
            .expect("read the source table");
            let table = out.entry(self.table(t)).or_default();
            for (row,) in rows {
                let Ok(Value::Object(row)) = serde_json::from_str::<Value>(&row) else {
                    continue;
                };
                table.insert(json!([row["id"]]).to_string(), row);
            }
        }
        pool.close().await;
        out.retain(|_, rows| !rows.is_empty());
        normalise(out)
    }

    async fn cleanup(self) {
        self.db.cleanup().await;
    }
}

/// The (binlog, index) of every streamed change, with how often it arrived
/// after deduplication by idempotency key.
fn positions(changes: &[Value]) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    for c in changes.iter().filter(|c| c["op"] != "read") {
        let at = c["binlog"].as_str().expect("binlog").to_string();
        let index = c["index"].as_u64().expect("index");
        *out.entry((at, index)).or_default() += 1;
    }
    out
}

const WORKLOAD_SCHEMA: &str = "
    CREATE TABLE accounts (id BIGINT PRIMARY KEY, owner VARCHAR(200) NOT NULL, balance BIGINT NOT NULL) ENGINE=InnoDB;
    CREATE TABLE events (id BIGINT PRIMARY KEY, account BIGINT, note VARCHAR(100)) ENGINE=InnoDB;
    INSERT INTO accounts SELECT seq, CONCAT('owner ', seq), seq * 10 FROM seq_1_to_500;";

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
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("a writer connection");
                let mut n = 0u64;
                let mut next = NEXT_ID.fetch_add(100_000_000, std::sync::atomic::Ordering::Relaxed);
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let pick = rand::rng().random_range(0..100);
                    let id = rand::rng().random_range(1..=600i64);
                    let sql = match pick {
                        0..=29 => format!(
                            "UPDATE accounts SET balance = balance + 1, owner = CONCAT(LEFT(owner, 150), '.') WHERE id = {id}"
                        ),
                        30..=44 => format!("DELETE FROM events WHERE account = {id} LIMIT 3"),
                        45..=54 => format!(
                            "INSERT INTO accounts VALUES ({id}, 'new {id}', 0) ON DUPLICATE KEY UPDATE balance = 0"
                        ),
                        55..=56 => format!("DELETE FROM accounts WHERE id = {id}"),
                        57 => {
                            // A large transaction: thousands of rows in one
                            // commit, in several row events.
                            let from = next;
                            next += bulk;
                            format!(
                                "BEGIN; INSERT INTO events SELECT seq, seq % 600, REPEAT('x', 50) FROM seq_{from}_to_{}; \
                                 UPDATE events SET note = 'bulk' WHERE id BETWEEN {from} AND {}; COMMIT;",
                                from + bulk - 1,
                                from + bulk / 3
                            )
                        }
                        _ => {
                            let from = next;
                            next += 10;
                            format!(
                                "INSERT INTO events SELECT seq, {id}, CONCAT('e', seq) FROM seq_{from}_to_{}",
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
    let columns = "
        ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, su SMALLINT UNSIGNED,
        mi MEDIUMINT, mu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT, bu BIGINT UNSIGNED,
        flag TINYINT(1), dec_ DECIMAL(20,4), f FLOAT, d DOUBLE,
        c CHAR(5), vc VARCHAR(40), tx TEXT, bl BLOB, vb VARBINARY(8),
        dt DATE, dtm DATETIME(6), dt0 DATETIME, ts TIMESTAMP(3) NULL, tm TIME(6), tm0 TIME, yr YEAR,
        en ENUM('small','medium','large'), st SET('red','green','blue'), js JSON, bt BIT(12),
        l1 VARCHAR(10) CHARACTER SET latin1, hid INT INVISIBLE DEFAULT 7";
    let cdc = Cdc::new(
        &format!(
            "CREATE TABLE snap (id INT PRIMARY KEY, {columns}) ENGINE=InnoDB;
             CREATE TABLE live (id INT PRIMARY KEY, {columns}) ENGINE=InnoDB;"
        ),
        &["snap", "live"],
    )
    .await;
    let values = "-128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
         -9223372036854775808, 18446744073709551615, 1, -1234567890123456.7891, 1.5, -2.25e-300,
         'ab', 'héllo wörld ✓', 'a\\nlong\\ttext', x'00ff10', x'0102',
         '2024-02-29', '2024-02-29 23:59:58.123456', '1999-12-31 00:00:01', '2024-03-01 12:30:45.678',
         '-838:59:58.000001', '12:00:00', 2024,
         'medium', 'red,blue', '{\"a\": [1, 2.5, \"x\"], \"b\": null}', b'101010101010', 'café€'";
    let nulls = ["NULL"; 31].join(", ");
    for t in ["snap"] {
        cdc.exec(&format!(
            "SET time_zone = '+00:00'; INSERT INTO {t} VALUES (1, {values}), (2, {nulls}), (3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', '', '', '', '', \
             '1000-01-01', '1000-01-01 00:00:00', '1000-01-01 00:00:00', '1970-01-01 00:00:01', '00:00:00', '-00:00:01', 1901, \
             'small', '', '[]', b'0', '')"
        ))
        .await;
    }
    cdc.once().await;
    for t in ["live"] {
        cdc.exec(&format!(
            "SET time_zone = '+00:00'; INSERT INTO {t} VALUES (1, {values}), (2, {nulls}), (3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', '', '', '', '', \
             '1000-01-01', '1000-01-01 00:00:00', '1000-01-01 00:00:00', '1970-01-01 00:00:01', '00:00:00', '-00:00:01', 1901, \
             'small', '', '[]', b'0', '')"
        ))
        .await;
    }
    cdc.once().await;
    let changes = cdc.changes();
    let row = |table: &str, op: &str, id: i64| -> Value {
        changes
            .iter()
            .find(|c| c["table"] == cdc.table(table) && c["op"] == op && c["key"]["id"] == id)
            .unwrap_or_else(|| panic!("no {op} of {table} {id}: {changes:?}"))["after"]
            .clone()
    };
    let full = json!({
        "id": 1, "ti": -128, "tu": 255, "si": -32768, "su": 65535, "mi": -8_388_608, "mu": 16_777_215,
        "i": -2_147_483_648_i64, "iu": 4_294_967_295_u64, "bi": i64::MIN, "bu": u64::MAX,
        "flag": true, "dec_": "-1234567890123456.7891", "f": 1.5, "d": -2.25e-300,
        "c": "ab", "vc": "héllo wörld ✓", "tx": "a\nlong\ttext", "bl": "AP8Q", "vb": "AQI=",
        "dt": "2024-02-29", "dtm": "2024-02-29T23:59:58.123456", "dt0": "1999-12-31T00:00:01",
        "ts": "2024-03-01T12:30:45.678Z", "tm": "-838:59:58.000001", "tm0": "12:00:00", "yr": 2024,
        "en": "medium", "st": "red,blue", "js": {"a": [1, 2.5, "x"], "b": null}, "bt": 2730,
        "l1": "café€", "hid": 7
    });
    let mut empty = serde_json::Map::new();
    for (k, _) in full.as_object().expect("an object") {
        empty.insert(k.clone(), Value::Null);
    }
    empty.insert("id".into(), json!(2));
    empty.insert("hid".into(), json!(7));
    let zero = json!({
        "id": 3, "ti": 0, "tu": 0, "si": 0, "su": 0, "mi": 0, "mu": 0, "i": 0, "iu": 0, "bi": 0, "bu": 0,
        "flag": false, "dec_": "0.0000", "f": 0.0, "d": 0.0, "c": "", "vc": "", "tx": "", "bl": "", "vb": "",
        "dt": "1000-01-01", "dtm": "1000-01-01T00:00:00", "dt0": "1000-01-01T00:00:00",
        "ts": "1970-01-01T00:00:01Z", "tm": "00:00:00", "tm0": "-00:00:01", "yr": 1901,
        "en": "small", "st": "", "js": [], "bt": 0, "l1": "", "hid": 7
    });
    for (id, want) in [(1, full), (2, Value::Object(empty)), (3, zero)] {
        assert_eq!(row("snap", "read", id), want, "snapshot row {id}");
        assert_eq!(row("live", "insert", id), want, "streamed row {id}");
    }
    let insert = changes
        .iter()
        .find(|c| c["op"] == "insert")
        .expect("an insert");
    let gtid = insert["gtid"].as_str().expect("a GTID");
    assert_eq!(gtid.split('-').count(), 3, "domain-server-sequence: {gtid}");
    assert!(insert["commit_time"].is_string(), "{insert}");
    assert!(
        insert["binlog"]
            .as_str()
            .is_some_and(|b| b.contains(".0") && b.contains(':'))
    );
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_large_transactions_replay_to_an_exact_copy() {
    let cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let daemon = cdc.daemon(1);
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 4, 3000, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.cancel();
    let statements = writers.await.expect("the workload");
    assert!(statements > 100, "the workload ran {statements} statements");
    cdc.exec("TRUNCATE TABLE events").await;
    cdc.exec("INSERT INTO events VALUES (1, 1, 'after truncate'), (2, 2, 'x')")
        .await;
    cdc.wait_for_copy(Some(&daemon)).await;
    let changes = cdc.changes();
    let twice: Vec<_> = positions(&changes)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "changes sent twice: {twice:?}");
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
    let twice: Vec<_> = positions(&cdc.changes())
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
async fn schema_changes_mid_stream_decode_with_the_shape_of_their_time() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20), qty INT) ENGINE=InnoDB;",
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
    cdc.exec("ALTER TABLE items ADD COLUMN price DECIMAL(10,2)")
        .await;
    cdc.exec("INSERT INTO items VALUES (2, 'b', 2, 9.50)").await;
    cdc.exec("ALTER TABLE items DROP COLUMN qty").await;
    cdc.exec("INSERT INTO items VALUES (3, 'c', 1.25)").await;
    cdc.exec("ALTER TABLE items MODIFY price DECIMAL(12,3)")
        .await;
    cdc.exec("UPDATE items SET name = 'renamed', price = 2 WHERE id = 1")
        .await;
    // Dropped and made again: a new table id, a new shape.
    cdc.exec(
        "DROP TABLE items; CREATE TABLE items (id INT PRIMARY KEY, v JSON) ENGINE=InnoDB;
         INSERT INTO items VALUES (7, '{\"k\": 1}')",
    )
    .await;
    let arrived = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 5, PATIENCE)
        .await;
    assert!(arrived, "{:?}\n{}", cdc.changes(), daemon.log());
    let changes = cdc.changes();
    let after: Vec<Value> = changes.iter().map(|c| c["after"].clone()).collect();
    assert_eq!(
        after,
        vec![
            json!({"id": 1, "name": "a", "qty": 1}),
            json!({"id": 2, "name": "b", "qty": 2, "price": "9.50"}),
            json!({"id": 3, "name": "c", "price": "1.25"}),
            json!({"id": 1, "name": "renamed", "price": "2.000"}),
            json!({"id": 7, "v": {"k": 1}}),
        ],
        "{changes:?}"
    );
    assert_eq!(
        changes[3]["before"],
        json!({"id": 1, "name": "a", "price": null}),
        "{}",
        changes[3]
    );
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_is_a_delete_and_an_insert() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; INSERT INTO items VALUES (1, 'a');",
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
async fn minimal_row_images_list_what_they_leave_out() {
    let cdc = Cdc::new(
        "CREATE TABLE docs (id INT PRIMARY KEY, title TEXT, body TEXT) ENGINE=InnoDB;",
        &["docs"],
    )
    .await;
    cdc.once().await;
    // binlog_row_image is per session: this writer logs minimal images.
    cdc.exec(
        "INSERT INTO docs VALUES (1, 'first', 'body'); SET SESSION binlog_row_image = 'MINIMAL';
         UPDATE docs SET title = 'second' WHERE id = 1; DELETE FROM docs WHERE id = 1;",
    )
    .await;
    cdc.once().await;
    let changes = cdc.changes();
    let update = changes
        .iter()
        .find(|c| c["op"] == "update")
        .expect("an update");
    assert_eq!(
        update["after"],
        json!({"id": 1, "title": "second"}),
        "{update}"
    );
    assert_eq!(update["unchanged"], json!(["body"]), "{update}");
    let delete = changes
        .iter()
        .find(|c| c["op"] == "delete")
        .expect("a delete");
    assert_eq!(delete["before"], json!({"id": 1}), "{delete}");
    cdc.wait_for_copy(None).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_moves_on_while_only_other_tables_are_written() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id INT PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE other (id INT PRIMARY KEY) ENGINE=InnoDB;",
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
    let checkpoint = || async {
        let out = cdc.caudal(&["checkpoint", "show", PIPELINE]).await;
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        v["position"].clone()
    };
    // The captured change's transaction starts at `file:pos`.
    let change = cdc.changes()[0]["binlog"]
        .as_str()
        .expect("a binlog position")
        .to_string();
    let (file, pos) = change.rsplit_once(':').expect("file:pos");
    let pos: u64 = pos.parse().expect("an offset");
    for i in 0..20 {
        cdc.exec(&format!("INSERT INTO other VALUES ({i})")).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = checkpoint().await;
        if now["kind"] == "binlog_resume"
            && (now["file"] != file || now["pos"].as_u64().is_some_and(|p| p > pos))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the checkpoint stayed at {now}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Lag, in bytes and seconds, once the pipeline reported it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let replication = loop {
        let out = cdc.caudal(&["status", "--json"]).await;
        let status: Value = serde_json::from_str(&out.stdout).expect("status JSON");
        let r = status[0]["replication"].clone();
        if r["phase"] == "streaming" && r["lag_seconds"].is_f64() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Other tests write to the same server's log: caught up is "a figure".
    assert!(replication["lag_bytes"].is_u64(), "{replication}");
    assert!(replication["server_position"].is_string(), "{replication}");
    assert!(replication["server_position"].is_string(), "{replication}");
    assert_eq!(cdc.changes().len(), 1, "only the captured table is sent");
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_a_table_again_while_streaming_without_regressing_a_row() {
    let cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let daemon = cdc.daemon(1);
    cdc.wait_for_copy(Some(&daemon)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 2, 200, stop.clone()).await;
    let out = cdc
        .caudal(&["backfill", PIPELINE, "--table", "accounts"])
        .await;
    assert_eq!(out.code, Some(0), "{out}\n{}", daemon.log());
    assert!(out.stdout.contains("backfill of accounts done"), "{out}");
    stop.cancel();
    writers.await.expect("the workload");
    cdc.wait_for_copy(Some(&daemon)).await;
    let reads = cdc
        .changes()
        .iter()
        .filter(|c| c["op"] == "read" && c["table"] == cdc.table("accounts"))
        .count();
    let sent: usize = out
        .stdout
        .split("done: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no row count in {out}"));
    assert!(sent > 300, "{out}");
    assert_eq!(reads, 500 + sent, "the snapshot's rows and the backfill's");
    let filtered = cdc
        .caudal(&[
            "backfill", PIPELINE, "--table", "accounts", "--where", "id <= 10",
        ])
        .await;
    assert_eq!(filtered.code, Some(0), "{filtered}");
    // The workload stopped: every row matching when it started is sent.
    let counts: Vec<u64> = filtered
        .stdout
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    assert!(
        counts.len() == 2 && counts[0] == counts[1] && counts[0] > 0,
        "{filtered}"
    );
    let bad = cdc
        .caudal(&[
            "backfill", PIPELINE, "--table", "accounts", "--where", "nope =",
        ])
        .await;
    assert_ne!(bad.code, Some(0), "{bad}");
    cdc.wait_for_copy(Some(&daemon)).await;
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_never_streams_from_the_end_of_the_log() {
    let mut cdc = Cdc::new(
        "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; INSERT INTO items VALUES (1, 'old');",
        &["items"],
    )
    .await;
    cdc.source_extra = "snapshot = \"never\"".into();
    cdc.once().await;
    cdc.exec("INSERT INTO items VALUES (2, 'new')").await;
    cdc.once().await;
    let keys: Vec<Value> = cdc.changes().iter().map(|c| c["key"].clone()).collect();
    assert_eq!(keys, vec![json!({"id": 2})]);
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_errors_say_what_to_change() {
    let cdc = Cdc::new(
        "CREATE TABLE nokey (v INT) ENGINE=InnoDB; CREATE TABLE myisam (id INT PRIMARY KEY) ENGINE=MyISAM;
         CREATE TABLE ok (id INT PRIMARY KEY) ENGINE=InnoDB;",
        &["nokey"],
    )
    .await;
    // A table without a primary key is captured; the run says how.
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains("table has no primary key: every change is captured"),
        "{out}"
    );
    let mut cdc = cdc;
    cdc.tables = vec!["myisam".into()];
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert!(out.stderr.contains("ENGINE = InnoDB"), "{out}");
    cdc.tables = vec!["missing".into()];
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert!(out.stderr.contains("does not exist"), "{out}");
    // A user without REPLICATION SLAVE.
    let user = format!("u{}", &cdc.db.name()[cdc.db.name().len() - 10..]);
    cdc.exec(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'; GRANT SELECT ON *.* TO '{user}'@'%';"
    ))
    .await;
    cdc.tables = vec!["ok".into()];
    let url = cdc.db.url().replacen("root@", &format!("{user}:pw@"), 1);
    let config = cdc.config().replace(cdc.db.url(), &url);
    let path = cdc.dir.path().join("user.toml");
    std::fs::write(&path, config).expect("write the config");
    let out = Output::of(command(&path, cdc.dir.path(), &["once", PIPELINE])).await;
    assert!(out.stderr.contains("REPLICATION SLAVE"), "{out}");
    assert!(
        !out.stderr.contains(":pw@"),
        "the password is not shown: {out}"
    );
    // The documented grants are enough.
    cdc.exec(&format!(
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'%'"
    ))
    .await;
    let out = Output::of(command(&path, cdc.dir.path(), &["once", PIPELINE])).await;
    assert_eq!(out.code, Some(0), "{out}");
    cdc.exec(&format!("DROP USER '{user}'@'%'")).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_refuses_a_shared_server_id_and_an_unsynced_buffer() {
    let mut cdc = Cdc::new("CREATE TABLE items (id INT PRIMARY KEY);", &["items"]).await;
    cdc.pipeline_extra =
        "buffer = { fsync = \"100ms\" }\n\n[pipelines.second]\nsource = \"my\"\nsink = \"recv\""
            .into();
    let out = cdc.caudal(&["validate"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("same replica server_id"), "{out}");
    assert!(out.stderr.contains("fsync = \"batch\""), "{out}");
    cdc.source_extra = "slot = \"x\"".into();
    let out = cdc.caudal(&["validate"]).await;
    assert!(
        out.stderr.contains("\"slot\" is for postgres sources"),
        "{out}"
    );
    cdc.cleanup().await;
}

/// A MariaDB server of the test's own: a data directory in a temporary
/// directory, a free port, a ROW binary log with full metadata.
struct PrivateMaria {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateMaria {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("a data directory");
        let data = dir.path().join("data");
        // A server starting deletes every `#sql*` file of its tmpdir: with
        // the shared /tmp, one test's server removed another's bootstrap
        // tables mid-way. Each server has a tmpdir of its own.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("a temporary directory");
        let install = std::process::Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--skip-test-db"])
            .arg(format!("--tmpdir={}", tmp.display()))
            .output()
            .unwrap_or_else(|e| {
                panic!("mariadb-install-db: {e} (install mariadb-server, or run scripts/test)")
            });
        assert!(
            install.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            dir,
            port,
            child: None,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("server.log")).expect("the server log");
        let child = std::process::Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--log-bin={}", d.join("data/bin").display()))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--binlog-format=ROW",
                "--binlog-row-metadata=FULL",
                "--server-id=1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mariadbd (install mariadb-server, or run scripts/test)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private MariaDB did not start: {}",
                std::fs::read_to_string(d.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.run();
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }
}

impl Drop for PrivateMaria {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dump_thread_and_a_server_restart_lose_nothing() {
    let mut server = PrivateMaria::start();
    let db = mysql_database_at(&server.url()).await;
    let cdc = Cdc::on(db, WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let daemon = cdc.daemon(1);
    cdc.wait_for_copy(Some(&daemon)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(cdc.db.url().to_string(), 2, 500, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // KILL the replica's dump thread on the server.
    let pool = cdc.db.mysql_pool().await;
    let dumps: Vec<(i64,)> = sqlx::query_as(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
    )
    .fetch_all(&pool)
    .await
    .expect("list the dump threads");
    assert!(!dumps.is_empty(), "no dump thread: {}", daemon.log());
    for (id,) in dumps {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}")))
            .execute(&pool)
            .await
            .expect("kill the dump thread");
    }
    pool.close().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    writers.await.expect("the workload");
    cdc.wait_for_copy(Some(&daemon)).await;
    // A restart of the server while changes are being read.
    let stop = tokio_util::sync::CancellationToken::new();
    cdc.exec("INSERT INTO events SELECT seq, 1, 'before restart' FROM seq_900000000_to_900005000")
        .await;
    server.restart();
    let writers = workload(cdc.db.url().to_string(), 2, 300, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    writers.await.expect("the workload");
    cdc.wait_for_copy(Some(&daemon)).await;
    let twice: Vec<_> = positions(&cdc.changes())
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "changes sent twice: {twice:?}");
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("reconnecting"), "{log}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_binlog_stops_the_pipeline_until_resync() {
    let server = PrivateMaria::start();
    let db = mysql_database_at(&server.url()).await;
    let cdc = Cdc::on(
        db,
        "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; INSERT INTO items VALUES (1, 'one');",
        &["items"],
    )
    .await;
    cdc.once().await;
    // The log moves on to new files and the old ones go while caudal is
    // not reading.
    cdc.exec(
        "INSERT INTO items VALUES (2, 'two'); FLUSH BINARY LOGS; INSERT INTO items VALUES (3, 'three');
         FLUSH BINARY LOGS;",
    )
    .await;
    let pool = cdc.db.mysql_pool().await;
    let logs: Vec<(String, u64)> = sqlx::query_as("SHOW BINARY LOGS")
        .fetch_all(&pool)
        .await
        .expect("list the logs");
    let last = logs.last().expect("a binary log").0.clone();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PURGE BINARY LOGS TO '{last}'"
    )))
    .execute(&pool)
    .await
    .expect("purge");
    pool.close().await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("no longer has binary log"), "{out}");
    assert!(out.stderr.contains("caudal resync"), "{out}");
    let status = cdc.caudal(&["status"]).await;
    assert!(status.stdout.contains("log purged"), "{status}");
    // `run` stops this pipeline and says so.
    let daemon = cdc.daemon(1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !daemon.log().contains("pipeline stopped") {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop(Signal::SIGTERM).await;
    let out = cdc.caudal(&["resync", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    cdc.once().await;
    let reads: Vec<Value> = cdc
        .changes()
        .iter()
        .filter(|c| c["op"] == "read")
        .map(|c| c["key"]["id"].clone())
        .collect();
    assert_eq!(reads, vec![json!(1), json!(1), json!(2), json!(3)]);
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_full_row_metadata_is_refused_with_what_to_change() {
    let server = PrivateMaria::start();
    let db = mysql_database_at(&server.url()).await;
    let cdc = Cdc::on(
        db,
        "CREATE TABLE items (id INT PRIMARY KEY) ENGINE=InnoDB;",
        &["items"],
    )
    .await;
    cdc.exec("SET GLOBAL binlog_row_metadata = 'MINIMAL'").await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr
            .contains("SET GLOBAL binlog_row_metadata = 'FULL'"),
        "{out}"
    );
    cdc.exec("SET GLOBAL binlog_row_metadata = 'FULL'; SET GLOBAL binlog_format = 'STATEMENT'")
        .await;
    let out = cdc.caudal(&["once", PIPELINE]).await;
    assert!(out.stderr.contains("binlog_format is STATEMENT"), "{out}");
    cdc.exec("SET GLOBAL binlog_format = 'ROW'").await;
    let mut own = cdc;
    own.server_id = 1;
    let out = own.caudal(&["once", PIPELINE]).await;
    assert!(out.stderr.contains("the server's own id"), "{out}");
    own.cleanup().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_halfway_resumes_after_its_last_durable_row() {
    let cdc = Cdc::new(
        "CREATE TABLE big (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB;
         INSERT INTO big SELECT seq, CONCAT('row ', seq) FROM seq_1_to_20000;",
        &["big"],
    )
    .await;
    let daemon = cdc.daemon(1);
    let started = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 600, PATIENCE)
        .await;
    assert!(started, "{}", daemon.log());
    daemon.stop(Signal::SIGKILL).await;
    let first = cdc.changes().len();
    assert!(first < 20_000, "the snapshot ended before the kill");
    cdc.exec(
        "UPDATE big SET v = 'changed' WHERE id IN (1, 19999); DELETE FROM big WHERE id = 20000",
    )
    .await;
    let daemon = cdc.daemon(2);
    cdc.wait_for_copy(Some(&daemon)).await;
    let reads = cdc.changes().iter().filter(|c| c["op"] == "read").count();
    // Rows read again after the restart are at most a few batches.
    assert!(reads < 20_000 + 2_000, "{reads} reads for 20,000 rows");
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_log_cannot_say_stops_the_pipeline_instead_of_being_skipped() {
    let cdc = Cdc::new(
        "CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB;
         CREATE TABLE notes (id INT PRIMARY KEY) ENGINE=Aria;",
        &["items"],
    )
    .await;
    cdc.once().await;
    // A non-transactional write ends with a COMMIT statement: the
    // checkpoint still moves past it.
    cdc.exec("INSERT INTO notes VALUES (1)").await;
    cdc.once().await;
    let out = cdc.caudal(&["checkpoint", "show", PIPELINE]).await;
    assert!(out.stdout.contains("binlog_resume"), "{out}");
    let cases = [
        (
            "SET SESSION binlog_format = 'STATEMENT'; INSERT INTO items VALUES (1, 'statement')",
            "logged as a statement",
        ),
        (
            "XA START 'x1'; INSERT INTO items VALUES (2, 'xa'); XA END 'x1'; XA PREPARE 'x1'; XA ROLLBACK 'x1'",
            "XA transaction",
        ),
    ];
    for (sql, error) in cases {
        cdc.exec(sql).await;
        let out = cdc.caudal(&["once", PIPELINE]).await;
        assert_ne!(out.code, Some(0), "{sql}: {out}");
        assert!(out.stderr.contains(error), "{sql}: {out}");
        assert!(out.stderr.contains("mariadb-bin."), "says where: {out}");
        let resync = cdc.caudal(&["resync", PIPELINE]).await;
        assert_eq!(resync.code, Some(0), "{resync}");
        cdc.once().await;
    }
    // The XA insert was rolled back: it never arrived.
    assert!(
        !cdc.changes()
            .iter()
            .any(|c| c["key"]["id"] == 2 && c["op"] == "insert"),
        "{:?}",
        cdc.changes()
    );
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_through_the_api_is_taken_and_reported() {
    let mut cdc = Cdc::new(WORKLOAD_SCHEMA, &["accounts", "events"]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    cdc.pipeline_extra = format!("\n[server]\nlisten = \"127.0.0.1:{port}\"");
    let daemon = cdc.daemon(1);
    cdc.wait_for_copy(Some(&daemon)).await;
    let out = cdc
        .caudal(&["token", "create", "--name", "ops", "--role", "operator"])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let token = out.stdout.trim().to_string();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/api/v1/pipelines/{PIPELINE}");
    let post = |body: Value| {
        http.post(format!("{base}/backfill"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let answer = post(json!({"table": "accounts", "where": "id <= 20"}))
        .await
        .expect("the API answers");
    assert_eq!(answer.status().as_u16(), 202);
    let taken: Value =
        serde_json::from_str(&answer.text().await.unwrap_or_default()).expect("JSON");
    assert_eq!(taken["rows"], json!(20), "{taken}");
    let bad = post(json!({"table": "accounts", "where": "nope ="}))
        .await
        .expect("the API answers");
    assert_eq!(bad.status().as_u16(), 400);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = http
            .get(&base)
            .bearer_auth(&token)
            .send()
            .await
            .expect("the API answers")
            .text()
            .await
            .unwrap_or_default();
        let detail: Value = serde_json::from_str(&text).expect("JSON");
        let progress = &detail["replication"]["backfill"];
        if progress["id"] == taken["id"] && progress["done"] == true {
            assert_eq!(progress["rows"], json!(20), "{detail}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{detail}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Done means read; delivery follows.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reads = cdc
            .changes()
            .iter()
            .filter(|c| c["op"] == "read" && c["table"] == cdc.table("accounts"))
            .count();
        if reads == 500 + 20 {
            break;
        }
        assert!(
            reads < 520 && tokio::time::Instant::now() < deadline,
            "{reads} reads: the snapshot and the backfill are 520"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A resync through the API: refused while running, done while paused;
    // resumed, the pipeline reads the tables again.
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
    };
    let refused = call(reqwest::Method::POST, "/resync")
        .await
        .expect("answers");
    assert_eq!(refused.status().as_u16(), 409);
    let paused = call(reqwest::Method::POST, "/pause")
        .await
        .expect("answers");
    assert_eq!(paused.status().as_u16(), 200);
    // Batches still in the buffer are delivered first: until then the
    // resync is refused as buffer_not_empty.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let resynced = call(reqwest::Method::POST, "/resync")
            .await
            .expect("answers");
        let status = resynced.status().as_u16();
        let text = resynced.text().await.unwrap_or_default();
        if status == 200 {
            break;
        }
        assert!(
            status == 409 && text.contains("buffer_not_empty"),
            "{status}: {text}"
        );
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    call(reqwest::Method::POST, "/resume")
        .await
        .expect("answers");
    // Counted as sent, not deduplicated: a snapshot read again at the same
    // log position has the same idempotency keys.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reads = cdc
            .receiver
            .requests()
            .iter()
            .filter(|r| r.accepted())
            .flat_map(|r| r.records_at(CHANGES))
            .filter(|c| c["op"] == "read" && c["table"] == cdc.table("accounts"))
            .count();
        if reads >= 500 + 20 + 500 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{reads} reads\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cdc.wait_for_copy(Some(&daemon)).await;
    daemon.stop(Signal::SIGTERM).await;
    cdc.cleanup().await;
}

/// Rows of a table without a key as a multiset (row text → count).
type Bag = BTreeMap<String, usize>;

fn row_text(row: &Value) -> String {
    let mut pairs: Vec<(String, String)> = row
        .as_object()
        .expect("a row")
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    pairs.sort();
    format!("{pairs:?}")
}

/// Replays the changes of `table` onto an empty bag: an update or delete
/// takes out one row equal to its old image.
fn replay_keyless(changes: &[Value], table: &str) -> Bag {
    let mut bag = Bag::new();
    for c in changes.iter().filter(|c| c["table"] == table) {
        assert_eq!(
            c["key"],
            json!({}),
            "a keyless change has an empty key: {c}"
        );
        if c["op"] != "insert" && c["op"] != "read" {
            let old = row_text(&c["before"]);
            let n = bag
                .get_mut(&old)
                .unwrap_or_else(|| panic!("no row {old} to change: {c}"));
            *n -= 1;
            if *n == 0 {
                bag.remove(&old);
            }
        }
        if c["op"] != "delete" {
            *bag.entry(row_text(&c["after"])).or_default() += 1;
        }
    }
    bag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_primary_key_are_captured_through_kills() {
    // `events` has no key at all (with duplicate rows); `codes` has a
    // unique index of NOT NULL columns in place of a primary key.
    let cdc = Cdc::new(
        "CREATE TABLE events (at INT NOT NULL, msg VARCHAR(40)) ENGINE=InnoDB;
         INSERT INTO events SELECT seq % 500, CONCAT('old ', seq % 7) FROM seq_1_to_3000;
         CREATE TABLE codes (code VARCHAR(10) NOT NULL, v INT, UNIQUE KEY by_code (code)) ENGINE=InnoDB;
         INSERT INTO codes SELECT CONCAT('c', seq), seq FROM seq_1_to_1000;",
        &["events", "codes"],
    )
    .await;
    let mut daemon = cdc.daemon(1);
    // The kills below interrupt streaming; the snapshot is read first.
    let read = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 4000, PATIENCE)
        .await;
    assert!(read, "{}", daemon.log());
    for round in 0..3u32 {
        let writes = format!(
            "INSERT INTO events VALUES ({round}, 'new'), ({round}, 'new');
             UPDATE events SET msg = 'changed {round}' WHERE at = {at} LIMIT 3;
             DELETE FROM events WHERE at = {gone} LIMIT 2;
             UPDATE codes SET v = v + 1000 WHERE code IN ('c1', 'c{code}');
             UPDATE codes SET code = 'moved{round}' WHERE code = 'c{moved}';
             DELETE FROM codes WHERE code = 'c{deleted}';",
            at = 10 + round,
            gone = 20 + round,
            code = 100 + round,
            moved = 200 + round,
            deleted = 300 + round,
        );
        cdc.exec(&writes).await;
        tokio::time::sleep(Duration::from_millis(300 + 400 * u64::from(round))).await;
        daemon.stop(Signal::SIGKILL).await;
        daemon = cdc.daemon(2 + round);
    }
    let pool = cdc.db.mysql_pool().await;
    let want_events: Bag = {
        let rows: Vec<(i32, Option<String>)> = sqlx::query_as("SELECT at, msg FROM events")
            .fetch_all(&pool)
            .await
            .expect("read events");
        let mut bag = Bag::new();
        for (at, msg) in rows {
            *bag.entry(row_text(&json!({"at": at, "msg": msg})))
                .or_default() += 1;
        }
        bag
    };
    let want_codes: BTreeMap<String, Option<i32>> = sqlx::query_as("SELECT code, v FROM codes")
        .fetch_all(&pool)
        .await
        .expect("read codes")
        .into_iter()
        .collect();
    pool.close().await;
    let events = cdc.table("events");
    let codes = cdc.table("codes");
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    loop {
        let changes = cdc.changes();
        let got_codes: BTreeMap<String, Option<i32>> = {
            let mut rows = BTreeMap::new();
            for c in changes.iter().filter(|c| c["table"] == codes.as_str()) {
                assert_eq!(
                    c["key"]
                        .as_object()
                        .map(|k| k.keys().cloned().collect::<Vec<_>>()),
                    Some(vec!["code".to_string()]),
                    "the unique index keys the changes: {c}"
                );
                if c["op"] == "delete" || c["op"] == "update" {
                    rows.remove(c["before"]["code"].as_str().expect("a code"));
                }
                if c["op"] != "delete" {
                    let after = &c["after"];
                    rows.insert(
                        after["code"].as_str().expect("a code").to_string(),
                        after["v"]
                            .as_i64()
                            .map(|v| i32::try_from(v).expect("an int")),
                    );
                }
            }
            rows
        };
        let got_events = replay_keyless(&changes, &events);
        if got_events == want_events && got_codes == want_codes {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the replayed copy differs: events {} rows (want {}), codes {:?}\nlog:\n{}",
                got_events.values().sum::<usize>(),
                want_events.values().sum::<usize>(),
                got_codes.len(),
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = daemon.log();
    daemon.stop(Signal::SIGTERM).await;
    assert!(
        log.contains("its unique index of NOT NULL columns keys its changes"),
        "{log}"
    );
    // A table without a key cannot be backfilled; the refusal says why.
    let out = cdc
        .caudal(&["backfill", PIPELINE, "--table", "events"])
        .await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("has no primary key"), "{out}");
    cdc.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_snapshot_killed_halfway_is_read_again_whole() {
    let cdc = Cdc::new(
        "CREATE TABLE entries (n INT NOT NULL, v VARCHAR(40)) ENGINE=InnoDB;
         INSERT INTO entries SELECT seq, CONCAT('row ', seq) FROM seq_1_to_20000;",
        &["entries"],
    )
    .await;
    let daemon = cdc.daemon(1);
    let started = cdc
        .receiver
        .wait_for_accepted_records(CHANGES, 600, PATIENCE)
        .await;
    assert!(started, "{}", daemon.log());
    daemon.stop(Signal::SIGKILL).await;
    let first = cdc.changes().len();
    assert!(first < 20_000, "the snapshot ended before the kill");
    let daemon = cdc.daemon(2);
    // Nothing is skipped: the reads after the restart are the whole table,
    // each row once.
    let whole: Vec<i64> = (1..=20_000).collect();
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    loop {
        let reads: Vec<i64> = cdc
            .changes()
            .iter()
            .filter(|c| c["op"] == "read")
            .map(|c| c["after"]["n"].as_i64().expect("n"))
            .collect();
        let mut last = reads[reads.len().saturating_sub(20_000)..].to_vec();
        last.sort_unstable();
        if last == whole {
            assert!(reads.len() >= 20_000 + first, "{} reads", reads.len());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the table was not read again whole: {} reads\n{}",
            reads.len(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = daemon.log();
    daemon.stop(Signal::SIGTERM).await;
    assert!(
        log.contains("it is read again from its start"),
        "the restart says the rows come again: {log}"
    );
    cdc.cleanup().await;
}
