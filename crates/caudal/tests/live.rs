//! Live aggregates (`[aggregates.NAME]`, `/api/v1/live`) end to end: the
//! real `caudal` binary capturing a PostgreSQL 15 `sales` table (CDC,
//! `REPLICA IDENTITY FULL`), an HTTP receiver on loopback, and the live API
//! of `caudal run`.
//!
//! The strongest checks compare the API's figures for every (provider,
//! minute) with PostgreSQL's own `GROUP BY` over the table after
//! concurrent writers (inserts, updates moving rows between groups and
//! windows, deletes, rolled back transactions), with and without SIGKILLs
//! of the daemon in the middle. Others pin late events, windows aligned to
//! local midnight in a time zone, the SSE stream, and bad input.
//!
//! Each test has its own database, slot, state directory and port, so they
//! run in parallel.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use caudal_testkit::{Receiver, TestDb, pg_database};
use nix::sys::signal::Signal;
use rand::Rng as _;
use serde_json::{Value, json};
use support::{Daemon, Output, PATIENCE, command, spawn_daemon};

const PIPELINE: &str = "sales";

/// The table every test captures.
const SALES: &str = "
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        provider_id int NOT NULL,
        amount numeric(12,2),
        sold_at timestamptz NOT NULL,
        customer_id int,
        local_at timestamp);
    ALTER TABLE sales REPLICA IDENTITY FULL;";

/// The aggregate of the workload tests: every metric, per provider and
/// minute of `sold_at`; nothing is ever late.
const PER_MINUTE: &str = r#"[aggregates.per_minute]
pipeline = "sales"
group_by = ["provider_id"]
time = "sold_at"
window = "1m"
lateness = "1d"
[aggregates.per_minute.metrics]
orders = "count"
sales = "sum(amount)"
biggest = "max(amount)"
smallest = "min(amount)"
avg_amount = "avg(amount)"
p95 = "quantile(amount, 0.95)"
buyers = "count_distinct(customer_id)"
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One answer of the API.
#[derive(Debug)]
struct Answer {
    status: u16,
    text: String,
    json: Value,
}

/// One test's source database, receiver, state directory, port and config.
struct World {
    db: TestDb,
    receiver: Receiver,
    dir: tempfile::TempDir,
    /// Slot and publication name, unique per test (slots are server-wide).
    slot: String,
    port: u16,
    /// The `[aggregates.*]` tables of the config.
    aggregates: String,
    /// A viewer's token.
    token: String,
    http: reqwest::Client,
}

impl World {
    async fn new(aggregates: &str) -> Self {
        let db = pg_database().await;
        let slot = format!("caudal_l_{}", &db.name()[db.name().len() - 20..]);
        let mut world = Self {
            db,
            receiver: Receiver::start().await,
            dir: tempfile::tempdir().expect("a state directory"),
            slot,
            port: free_port(),
            aggregates: aggregates.to_string(),
            token: String::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
        };
        world.exec(SALES).await;
        let out = world
            .caudal(&["token", "create", "--name", "t", "--role", "viewer"])
            .await;
        assert_eq!(out.code, Some(0), "token create: {out}");
        world.token = out.stdout.trim().to_string();
        assert!(!world.token.is_empty(), "no token printed: {out}");
        world
    }

    fn config(&self) -> String {
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["sales"]
slot = "{slot}"
publication = "{slot}"
heartbeat = "1s"

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 200, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[pipelines.{PIPELINE}]
source = "pg"
sink = "recv"

[server]
listen = "127.0.0.1:{port}"
requests_per_second = 10000

{aggregates}
"#,
            state = self.dir.path().join("state.db").display(),
            url = self.db.url(),
            slot = self.slot,
            receiver = self.receiver.url("/ingest"),
            port = self.port,
            aggregates = self.aggregates,
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

    /// GET `path` with `token`, waiting (at most [`PATIENCE`]) for the
    /// server to listen.
    async fn get_with(&self, path: &str, token: Option<&str>, daemon: Option<&Daemon>) -> Answer {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut request = self.http.get(&url);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Answer { status, text, json };
                }
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{url}: {e}\nlog:\n{}",
                        daemon.map(Daemon::log).unwrap_or_default()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// GET `path` as the viewer; it must answer 200 with JSON.
    async fn get(&self, path: &str, daemon: Option<&Daemon>) -> Value {
        let a = self.get_with(path, Some(&self.token), daemon).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        a.json
    }

    /// The windows of aggregate `name` (`query` without the `?`).
    async fn windows(&self, name: &str, query: &str, daemon: Option<&Daemon>) -> Value {
        let mut answer = self
            .get(&format!("/api/v1/live/{name}?{query}"), daemon)
            .await;
        assert_eq!(answer["aggregate"], name, "{answer}");
        assert!(answer["windows"].is_array(), "{answer}");
        answer["windows"].take()
    }

    /// The entry of aggregate `name` in `GET /api/v1/live`.
    async fn listed(&self, name: &str, daemon: Option<&Daemon>) -> Value {
        let all = self.get("/api/v1/live", daemon).await;
        all["aggregates"]
            .as_array()
            .unwrap_or_else(|| panic!("no aggregates: {all}"))
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not listed: {all}"))
    }

    /// Polls the windows of `name` until `done` holds; returns them. On
    /// timeout the failure shows the last windows and the daemon's log.
    async fn wait_for_windows(
        &self,
        name: &str,
        query: &str,
        daemon: &Daemon,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let windows = self.windows(name, query, Some(daemon)).await;
            let windows = windows.as_array().cloned().unwrap_or_default();
            if done(&windows) {
                return windows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not reached after {PATIENCE:?}: {}\nlog:\n{}",
                Value::Array(windows),
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

/// Waits until `daemon` streams changes from its slot: changes committed
/// from now on arrive in commit order (earlier ones may come from the
/// snapshot, read in table order).
async fn wait_for_streaming(daemon: &Daemon) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !daemon.log().contains("streaming changes") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon does not stream changes after {PATIENCE:?}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seconds since the epoch of an RFC 3339 instant.
fn epoch(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>()
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
        .as_second()
}

/// A decimal figure (a JSON number) in cents; it must be a whole number of
/// cents (the sums of `numeric(12,2)` values are).
fn cents(v: &Value, what: &str) -> Option<i64> {
    if v.is_null() {
        return None;
    }
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    let c = x * 100.0;
    assert!(
        (c - c.round()).abs() < 1e-6,
        "{what} = {v} is not a whole number of cents"
    );
    Some(c.round() as i64)
}

/// The figures of one (provider, minute), as PostgreSQL computes them.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    rows: i64,
    sales: Option<i64>,
    biggest: Option<i64>,
    smallest: Option<i64>,
    buyers: i64,
    avg: Option<f64>,
    p95: Option<f64>,
}

/// (provider_id, window start in seconds since the epoch).
type Cell = (i64, i64);

/// PostgreSQL's figures of every (provider, minute) that has rows.
async fn truth(db: &TestDb) -> BTreeMap<Cell, Figures> {
    let pool = db.pg_pool().await;
    type Row = (
        i64,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        i64,
        Option<f64>,
        Option<f64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT provider_id::int8, \
                floor(extract(epoch FROM sold_at) / 60)::int8 * 60, \
                count(*)::int8, \
                (sum(amount) * 100)::int8, \
                (max(amount) * 100)::int8, \
                (min(amount) * 100)::int8, \
                count(DISTINCT customer_id)::int8, \
                avg(amount)::float8, \
                (percentile_disc(0.95) WITHIN GROUP (ORDER BY amount))::float8 \
         FROM sales GROUP BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .expect("PostgreSQL's figures");
    pool.close().await;
    rows.into_iter()
        .map(
            |(p, start, rows, sales, biggest, smallest, buyers, avg, p95)| {
                (
                    (p, start),
                    Figures {
                        rows,
                        sales,
                        biggest,
                        smallest,
                        buyers,
                        avg,
                        p95,
                    },
                )
            },
        )
        .collect()
}

/// The API's figures of every (provider, minute) with rows; windows with
/// no rows left are left out (PostgreSQL has no group for them).
fn served(windows: &[Value]) -> BTreeMap<Cell, Figures> {
    let mut out = BTreeMap::new();
    for w in windows {
        let start = epoch(w["start"].as_str().expect("a start"));
        let end = epoch(w["end"].as_str().expect("an end"));
        assert_eq!(end - start, 60, "a 1m window: {w}");
        assert_eq!(start % 60, 0, "windows start at whole minutes: {w}");
        let provider = w["group"]["provider_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("group.provider_id is a number: {w}"));
        let rows = w["rows"].as_i64().expect("rows");
        assert_eq!(w["late"], 0, "nothing is late with lateness 1d: {w}");
        if rows == 0 {
            continue;
        }
        let m = &w["metrics"];
        assert_eq!(m["orders"].as_i64(), Some(rows), "orders is rows: {w}");
        let float = |k: &str| m[k].as_f64();
        let figures = Figures {
            rows,
            sales: cents(&m["sales"], "sales"),
            biggest: cents(&m["biggest"], "biggest"),
            smallest: cents(&m["smallest"], "smallest"),
            buyers: m["buyers"]
                .as_i64()
                .unwrap_or_else(|| panic!("buyers: {w}")),
            avg: float("avg_amount"),
            p95: float("p95"),
        };
        assert!(
            out.insert((provider, start), figures).is_none(),
            "window {start} of provider {provider} served twice"
        );
    }
    out
}

/// What differs between PostgreSQL's figures and the API's: exact for
/// counts, sums and extremes, 1e-9 relative for averages, the relative
/// error (1 %) for the 95th percentile.
fn differences(want: &BTreeMap<Cell, Figures>, got: &BTreeMap<Cell, Figures>) -> Vec<String> {
    let mut out = Vec::new();
    let close = |a: Option<f64>, b: Option<f64>, rel: f64| match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= rel * b.abs() + 1e-9,
        _ => false,
    };
    for (cell, w) in want {
        match got.get(cell) {
            None => out.push(format!("{cell:?}: missing, PostgreSQL has {w:?}")),
            Some(g) => {
                let exact = (g.rows, g.sales, g.biggest, g.smallest, g.buyers)
                    == (w.rows, w.sales, w.biggest, w.smallest, w.buyers);
                if !exact || !close(g.avg, w.avg, 1e-9) || !close(g.p95, w.p95, 0.01) {
                    out.push(format!("{cell:?}: served {g:?}, PostgreSQL has {w:?}"));
                }
            }
        }
    }
    for (cell, g) in got {
        if !want.contains_key(cell) {
            out.push(format!(
                "{cell:?}: served {g:?}, PostgreSQL has no such row"
            ));
        }
    }
    out
}

impl World {
    /// Waits until the API's figures of `per_minute` equal PostgreSQL's;
    /// panics with the differences otherwise.
    async fn wait_for_truth(&self, daemon: &Daemon) {
        // Catching up on a large workload takes a debug build a while.
        let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
        loop {
            let want = truth(&self.db).await;
            let windows = self
                .windows("per_minute", "limit=100000", Some(daemon))
                .await;
            let got = served(windows.as_array().expect("windows"));
            let diff = differences(&want, &got);
            if diff.is_empty() {
                assert!(!want.is_empty(), "the workload left no rows");
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the live figures differ from PostgreSQL's after {:?} ({} cells):\n{}\nlog:\n{}",
                2 * PATIENCE,
                diff.len(),
                diff.join("\n"),
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the API counts `n` rows in all in `per_minute`.
    async fn wait_for_rows(&self, daemon: &Daemon, n: i64) {
        self.wait_for_windows("per_minute", "", daemon, &format!("{n} rows"), |ws| {
            ws.iter()
                .map(|w| w["rows"].as_i64().unwrap_or(0))
                .sum::<i64>()
                == n
        })
        .await;
    }
}

/// A `sold_at` in the ten minutes from 2025-05-14 12:00 UTC, to the
/// millisecond.
fn sold_at(rng: &mut impl rand::Rng) -> String {
    format!(
        "2025-05-14 12:{:02}:{:02}.{:03}+00",
        rng.random_range(0..10),
        rng.random_range(0..60),
        rng.random_range(0..1000)
    )
}

/// An amount from 1.00 to 999.99, or (rarely) none.
fn amount(rng: &mut impl rand::Rng) -> String {
    if rng.random_range(0..40) == 0 {
        "NULL".into()
    } else {
        let cents: i64 = rng.random_range(100..100_000);
        format!("{}.{:02}", cents / 100, cents % 100)
    }
}

fn customer(rng: &mut impl rand::Rng) -> String {
    if rng.random_range(0..20) == 0 {
        "NULL".into()
    } else {
        rng.random_range(1..=40).to_string()
    }
}

fn row_values(rng: &mut impl rand::Rng) -> String {
    format!(
        "({}, {}, '{}', {})",
        rng.random_range(1..=5),
        amount(rng),
        sold_at(rng),
        customer(rng)
    )
}

/// Inserts `n` random sales in one statement.
const INSERT: &str = "INSERT INTO sales (provider_id, amount, sold_at, customer_id) VALUES ";

/// One random statement of the workload over ids 1..=`max_id`, and
/// whether it is a single insert returning the new id.
fn statement(max_id: i64) -> (String, bool) {
    let mut rng = rand::rng();
    let id = rng.random_range(1..=max_id);
    let sql = match rng.random_range(0..100) {
        0..=39 => {
            let sql = format!("{INSERT}{} RETURNING id", row_values(&mut rng));
            return (sql, true);
        }
        40..=44 => {
            let values: Vec<String> = (0..5).map(|_| row_values(&mut rng)).collect();
            format!("{INSERT}{}", values.join(", "))
        }
        45..=61 => {
            format!(
                "UPDATE sales SET amount = {} WHERE id = {id}",
                amount(&mut rng)
            )
        }
        62..=68 => format!(
            "UPDATE sales SET provider_id = {} WHERE id = {id}",
            rng.random_range(1..=5)
        ),
        69..=75 => format!(
            "UPDATE sales SET sold_at = '{}' WHERE id = {id}",
            sold_at(&mut rng)
        ),
        76..=79 => format!(
            "UPDATE sales SET customer_id = {} WHERE id = {id}",
            customer(&mut rng)
        ),
        80..=89 => format!("DELETE FROM sales WHERE id = {id}"),
        90..=94 => format!(
            "BEGIN; {INSERT}{}; \
             UPDATE sales SET amount = amount + 1, provider_id = {} WHERE id = {id}; \
             DELETE FROM sales WHERE id = {}; COMMIT;",
            row_values(&mut rng),
            rng.random_range(1..=5),
            rng.random_range(1..=max_id),
        ),
        95..=97 => format!(
            "BEGIN; {INSERT}{}; DELETE FROM sales WHERE id = {id}; ROLLBACK;",
            row_values(&mut rng)
        ),
        _ => format!(
            "UPDATE sales SET amount = amount + 0.01, sold_at = sold_at + interval '7 seconds' \
             WHERE provider_id = {} AND id % 13 = {} AND sold_at < '2025-05-14 12:09:00+00'",
            rng.random_range(1..=5),
            rng.random_range(0..13)
        ),
    };
    (sql, false)
}

/// Writes from `writers` connections at once until `stop`: inserts (single
/// and multi-row), updates of the amount, the customer, the provider (a
/// row moving to another group) and the time (to another window), deletes,
/// multi-row updates, and transactions committed or rolled back, over the
/// rows it inserts and those up to id `ids`. Returns how many statements
/// ran.
fn workload(
    url: String,
    writers: usize,
    ids: i64,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let max_id = Arc::new(AtomicI64::new(ids.max(1)));
        let statements = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers {
            let (url, stop) = (url.clone(), stop.clone());
            let (max_id, statements) = (max_id.clone(), statements.clone());
            tasks.spawn(async move {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("a writer connection");
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let (sql, returning) = statement(max_id.load(Ordering::Relaxed).max(1));
                    if returning {
                        let (new,): (i32,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                            .fetch_one(&pool)
                            .await
                            .expect("an insert");
                        max_id.fetch_max(i64::from(new), Ordering::Relaxed);
                        statements.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&pool)
                        .await
                    {
                        Ok(_) => {}
                        // Writers updating the same rows in another order.
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {
                            let _ = sqlx::raw_sql("ROLLBACK").execute(&pool).await;
                        }
                        Err(e) => panic!("{sql}: {e}"),
                    }
                    statements.fetch_add(1, Ordering::Relaxed);
                }
                pool.close().await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a writer task");
        }
        statements.load(Ordering::Relaxed)
    })
}

/// Rows already in the table when the daemon first starts (read by the
/// snapshot).
async fn seed(w: &World, n: usize) {
    let mut rng = rand::rng();
    let values: Vec<String> = (0..n).map(|_| row_values(&mut rng)).collect();
    w.exec(&format!("{INSERT}{}", values.join(", "))).await;
}

/// Concurrent writers insert, update (moving rows between providers and
/// minutes) and delete, with a truncate in the middle; once they stop,
/// every (provider, minute) the API serves equals PostgreSQL's GROUP BY
/// over the table: count, sum, min, max and distinct customers exactly,
/// the average to 1e-9, the 95th percentile within 1 %; windows
/// PostgreSQL has no rows for have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_under_concurrent_writers_equal_postgresqls_group_by() {
    let w = World::new(PER_MINUTE).await;
    seed(&w, 300).await;
    let daemon = w.daemon(1);
    // The snapshot's rows are counted before the writers start.
    w.wait_for_rows(&daemon, 300).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(w.db.url().to_string(), 4, 300, stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A truncate empties every window; the writers go on.
    w.exec("TRUNCATE sales").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.cancel();
    let statements = writers.await.expect("the workload");
    assert!(
        statements > 300,
        "the workload ran only {statements} statements"
    );
    w.wait_for_truth(&daemon).await;
    let listed = w.listed("per_minute", Some(&daemon)).await;
    assert_eq!(listed["late"], 0, "{listed}");
    assert_eq!(listed["skipped"], 0, "{listed}");
    assert_eq!(listed["counted_here"], true, "{listed}");
    assert_eq!(listed["group_by"], json!(["provider_id"]), "{listed}");
    assert_eq!(listed["time"], "sold_at", "{listed}");
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    w.cleanup().await;
}

/// SIGKILL at random points while writers run, many times; after a last
/// daemon catches up, the figures still equal PostgreSQL's: nothing lost,
/// nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_workload_neither_loses_nor_double_counts() {
    let w = World::new(PER_MINUTE).await;
    seed(&w, 200).await;
    let first = w.daemon(0);
    w.wait_for_rows(&first, 200).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(w.db.url().to_string(), 3, 200, stop.clone());
    let mut daemon = first;
    let mut logs = String::new();
    for cycle in 1..=8 {
        let ms = rand::rng().random_range(300..2500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let (_, log) = daemon.stop(Signal::SIGKILL).await;
        logs = log;
        daemon = w.daemon(cycle);
    }
    let ms = rand::rng().random_range(300..2500);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    daemon.stop(Signal::SIGKILL).await;
    stop.cancel();
    let statements = writers.await.expect("the workload");
    assert!(
        statements > 300,
        "the workload ran only {statements} statements"
    );
    let daemon = w.daemon(99);
    w.wait_for_truth(&daemon).await;
    let listed = w.listed("per_minute", Some(&daemon)).await;
    assert_eq!(listed["late"], 0, "{listed}\nlast killed log:\n{logs}");
    assert_eq!(listed["skipped"], 0, "{listed}");
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    w.cleanup().await;
}

/// SIGKILL while the first daemon still reads the table's existing rows
/// (the initial snapshot) and writers change them, then more SIGKILLs: the
/// figures still end equal to PostgreSQL's, every row counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_initial_snapshot_neither_loses_nor_double_counts() {
    const SEEDED: usize = 20_000;
    let w = World::new(PER_MINUTE).await;
    for _ in 0..SEEDED / 1000 {
        seed(&w, 1000).await;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(w.db.url().to_string(), 2, SEEDED as i64, stop.clone());
    // Killed once the slot exists, before the snapshot is read.
    let first = w.daemon(1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !first.log().contains("created the replication slot") {
        assert!(tokio::time::Instant::now() < deadline, "{}", first.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = rand::rng().random_range(0..100);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let (_, first_log) = first.stop(Signal::SIGKILL).await;
    assert!(
        !first_log.contains("snapshot read"),
        "the first daemon read the whole snapshot before it was killed: this run proves little\n{first_log}"
    );
    for cycle in 2..=4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let daemon = w.daemon(cycle);
        let ms = rand::rng().random_range(300..2000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        daemon.stop(Signal::SIGKILL).await;
    }
    stop.cancel();
    writers.await.expect("the workload");
    let daemon = w.daemon(99);
    w.wait_for_truth(&daemon).await;
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    w.cleanup().await;
}

/// The window starting at `start` (RFC 3339) among `windows`.
fn window_at<'a>(windows: &'a [Value], start: &str) -> Option<&'a Value> {
    windows.iter().find(|w| w["start"] == start)
}

/// Inserts one sale of provider 1 at `at` (RFC 3339) for `amount`.
async fn sale(w: &World, at: &str, amount: &str) {
    w.exec(&format!(
        "INSERT INTO sales (provider_id, amount, sold_at, customer_id) VALUES (1, {amount}, '{at}', 1)"
    ))
    .await;
}

/// With 1m windows and 1m lateness: a change for a window whose end plus
/// lateness the watermark has not reached is counted; one for a window the
/// watermark closed (end + lateness <= watermark, the boundary included),
/// an insert or a delete, is not, and the window's `late` and the
/// aggregate's count it instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_past_the_allowed_lateness_are_counted_late_not_counted() {
    let w = World::new(
        r#"[aggregates.late_minutes]
pipeline = "sales"
group_by = ["provider_id"]
time = "sold_at"
window = "1m"
lateness = "1m"
[aggregates.late_minutes.metrics]
orders = "count"
sales = "sum(amount)"
"#,
    )
    .await;
    let daemon = w.daemon(1);
    // In commit order: the snapshot would read the rows in table order.
    wait_for_streaming(&daemon).await;
    // Watermark 12:00:30, then 12:01:30: the 12:00 window is open until
    // the watermark reaches 12:02.
    sale(&w, "2025-05-14T12:00:30Z", "1.00").await; // A
    sale(&w, "2025-05-14T12:01:30Z", "2.00").await; // B
    sale(&w, "2025-05-14T12:00:40Z", "4.00").await; // C: within lateness
    // Watermark 12:03:00: 12:00 (12:02 <= 12:03) and 12:01 (12:03 <= 12:03)
    // close; 12:02 (12:04) stays open.
    sale(&w, "2025-05-14T12:03:00Z", "8.00").await; // D
    sale(&w, "2025-05-14T12:00:50Z", "16.00").await; // E: late
    sale(&w, "2025-05-14T12:01:10Z", "32.00").await; // F: late, at the boundary
    sale(&w, "2025-05-14T12:02:00Z", "64.00").await; // G: counted
    // Taking B back from the closed 12:01 window is late too.
    w.exec("DELETE FROM sales WHERE amount = 2.00").await;
    let windows = w
        .wait_for_windows("late_minutes", "", &daemon, "every change", |ws| {
            window_at(ws, "2025-05-14T12:01:00Z").is_some_and(|x| x["late"] == 2)
                && window_at(ws, "2025-05-14T12:02:00Z").is_some_and(|x| x["rows"] == 1)
        })
        .await;
    let brief: Vec<Value> = windows
        .iter()
        .map(|x| {
            json!([
                x["start"],
                x["rows"],
                x["late"],
                x["closed"],
                x["metrics"]["sales"].as_f64(),
                x["group"]
            ])
        })
        .collect();
    let p1 = json!({"provider_id": 1});
    assert_eq!(
        brief,
        vec![
            json!(["2025-05-14T12:00:00Z", 2, 1, true, 5.0, p1]),
            json!(["2025-05-14T12:01:00Z", 1, 2, true, 2.0, p1]),
            json!(["2025-05-14T12:02:00Z", 1, 0, false, 64.0, p1]),
            json!(["2025-05-14T12:03:00Z", 1, 0, false, 8.0, p1]),
        ],
        "{}",
        Value::Array(windows.clone())
    );
    for x in &windows {
        assert_eq!(x["metrics"]["orders"], x["rows"], "{x}");
    }
    // The list shows the aggregate's late changes once they are saved.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let listed = loop {
        let listed = w.listed("late_minutes", Some(&daemon)).await;
        if listed["late"].as_i64().is_some_and(|n| n >= 3) || tokio::time::Instant::now() > deadline
        {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed["late"], 3, "E, F and B's delete: {listed}");
    assert_eq!(listed["watermark"], "2025-05-14T12:03:00Z", "{listed}");
    assert_eq!(listed["window"], "1m", "{listed}");

    // closed= and from/to select windows.
    let closed = w
        .windows("late_minutes", "closed=true", Some(&daemon))
        .await;
    let starts = |ws: &Value| -> Vec<Value> {
        ws.as_array()
            .expect("windows")
            .iter()
            .map(|x| x["start"].clone())
            .collect()
    };
    assert_eq!(
        starts(&closed),
        vec![json!("2025-05-14T12:00:00Z"), json!("2025-05-14T12:01:00Z")]
    );
    let open = w
        .windows("late_minutes", "closed=false", Some(&daemon))
        .await;
    assert_eq!(
        starts(&open),
        vec![json!("2025-05-14T12:02:00Z"), json!("2025-05-14T12:03:00Z")]
    );
    let range = w
        .windows(
            "late_minutes",
            "from=2025-05-14T12:01:30Z&to=2025-05-14T12:02:30Z&provider_id=1",
            Some(&daemon),
        )
        .await;
    assert_eq!(
        starts(&range),
        vec![json!("2025-05-14T12:01:00Z"), json!("2025-05-14T12:02:00Z")]
    );
    let other = w
        .windows("late_minutes", "provider_id=2", Some(&daemon))
        .await;
    assert_eq!(other, json!([]));
    daemon.stop(Signal::SIGTERM).await;
    w.cleanup().await;
}

/// Windows align to local midnight of their time zone: in Mexico City
/// (UTC-6) 23:59:59 and 00:00:01 local fall in two day windows starting at
/// local midnight (06:00Z) and in two hours; in Kolkata (UTC+5:30) the same
/// instants share the hour that starts at 05:30Z; hopping hours start every
/// 30 minutes; a `timestamp` column is read in the zone; Madrid's day of
/// the spring clock change is 23 hours long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_split_at_local_midnight_of_their_time_zone() {
    let agg = |name: &str, window: &str, tz: &str, extra: &str| {
        format!(
            "[aggregates.{name}]\npipeline = \"sales\"\ntime = \"sold_at\"\nwindow = \"{window}\"\n\
             tz = \"{tz}\"\nfilter = \"provider_id == 1\"\n{extra}\n\
             [aggregates.{name}.metrics]\norders = \"count\"\nsales = \"sum(amount)\"\n\n"
        )
    };
    let aggregates = [
        agg("mx_day", "1d", "America/Mexico_City", ""),
        agg("mx_hour", "1h", "America/Mexico_City", ""),
        agg("in_hour", "1h", "Asia/Kolkata", ""),
        agg("mx_hop", "1h", "America/Mexico_City", "every = \"30m\""),
        agg("mx_local_day", "1d", "America/Mexico_City", "")
            .replace("time = \"sold_at\"", "time = \"local_at\""),
        agg("madrid_day", "1d", "Europe/Madrid", "")
            .replace("provider_id == 1", "provider_id == 2"),
    ]
    .concat();
    let w = World::new(&aggregates).await;
    let daemon = w.daemon(1);
    wait_for_streaming(&daemon).await;
    w.exec(
        "INSERT INTO sales (provider_id, amount, sold_at) VALUES (2, 5.00, '2025-03-30T12:00:00Z');
         INSERT INTO sales (provider_id, amount, sold_at, local_at) VALUES
            (1, 10.00, '2025-05-15T05:59:59Z', '2025-05-14 23:59:59');
         INSERT INTO sales (provider_id, amount, sold_at, local_at) VALUES
            (1, 20.00, '2025-05-15T06:00:01Z', '2025-05-15 00:00:01');",
    )
    .await;
    // (start, end, rows, sales, closed) of every window of each aggregate;
    // `closed` null: either (Madrid's watermark may or may not count the
    // rows its filter leaves out).
    let win = |start: &str, end: &str, rows: i64, sales: f64, closed: Value| {
        json!([
            format!("2025-{start}:00Z"),
            format!("2025-{end}:00Z"),
            rows,
            sales,
            closed
        ])
    };
    let days = vec![
        win("05-14T06:00", "05-15T06:00", 1, 10.0, json!(true)),
        win("05-15T06:00", "05-16T06:00", 1, 20.0, json!(false)),
    ];
    let cases = [
        ("mx_day", days.clone()),
        ("mx_local_day", days),
        (
            "mx_hour",
            vec![
                win("05-15T05:00", "05-15T06:00", 1, 10.0, json!(true)),
                win("05-15T06:00", "05-15T07:00", 1, 20.0, json!(false)),
            ],
        ),
        (
            "in_hour",
            vec![win("05-15T05:30", "05-15T06:30", 2, 30.0, json!(false))],
        ),
        (
            "mx_hop",
            vec![
                win("05-15T05:00", "05-15T06:00", 1, 10.0, json!(true)),
                win("05-15T05:30", "05-15T06:30", 2, 30.0, json!(false)),
                win("05-15T06:00", "05-15T07:00", 1, 20.0, json!(false)),
            ],
        ),
        (
            "madrid_day",
            vec![win("03-29T23:00", "03-30T22:00", 1, 5.0, Value::Null)],
        ),
    ];
    for (name, want) in cases {
        let brief = |ws: &[Value]| -> Vec<Value> {
            ws.iter()
                .zip(want.iter().chain(std::iter::repeat(&Value::Null)))
                .map(|(x, w)| {
                    let closed = if w[4].is_null() {
                        Value::Null
                    } else {
                        x["closed"].clone()
                    };
                    json!([
                        x["start"],
                        x["end"],
                        x["rows"],
                        x["metrics"]["sales"].as_f64(),
                        closed
                    ])
                })
                .collect()
        };
        let windows = w
            .wait_for_windows(name, "", &daemon, name, |ws| brief(ws) == want)
            .await;
        for x in &windows {
            assert_eq!(x["group"], json!({}), "{name}: no group_by: {x}");
        }
    }
    let listed = w.listed("mx_day", Some(&daemon)).await;
    assert_eq!(listed["tz"], "America/Mexico_City", "{listed}");
    assert_eq!(listed["window"], "1d", "{listed}");
    daemon.stop(Signal::SIGTERM).await;
    w.cleanup().await;
}

/// One Server-Sent Event.
#[derive(Debug)]
struct Sse {
    event: String,
    data: String,
}

/// An open `/stream`, read event by event.
struct Stream {
    response: reqwest::Response,
    pending: String,
}

impl Stream {
    async fn open(w: &World, query: &str) -> Self {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/live/per_minute/stream{query}",
            w.port
        );
        let response = w
            .http
            .get(&url)
            .bearer_auth(&w.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "{url}");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Self {
            response,
            pending: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), waiting until
    /// `deadline`; `None` on timeout.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Option<Sse> {
        loop {
            while let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if !event.is_empty() || !data.is_empty() {
                    return Some(Sse {
                        event,
                        data: data.join("\n"),
                    });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .expect("the stream stays readable")
                .expect("the stream does not end");
            self.pending
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }

    /// The next `window` event satisfying `want`; panics after
    /// [`PATIENCE`], showing what came instead.
    async fn window(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            let Some(e) = self.next(deadline).await else {
                panic!("no window event with {what} in {PATIENCE:?}; got {seen:?}");
            };
            if e.event == "window" {
                let w: Value = serde_json::from_str(&e.data)
                    .unwrap_or_else(|err| panic!("window data is JSON: {err}: {}", e.data));
                if want(&w) {
                    return w;
                }
            }
            seen.push(e);
        }
    }
}

/// `/stream` sends a `window` event with the figures each time a change is
/// counted, and only the groups asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_sends_each_changed_window_as_it_is_counted() {
    let w = World::new(PER_MINUTE).await;
    let daemon = w.daemon(1);
    wait_for_streaming(&daemon).await;
    let listed = w.listed("per_minute", Some(&daemon)).await;
    assert_eq!(listed["counted_here"], true, "{listed}");
    let mut all = Stream::open(&w, "").await;
    let mut eights = Stream::open(&w, "?provider_id=8").await;
    w.exec(
        "INSERT INTO sales (provider_id, amount, sold_at, customer_id) \
         VALUES (7, 12.34, '2025-05-14T12:00:30Z', 3)",
    )
    .await;
    let first = all
        .window("provider 7's first sale", |x| {
            x["group"]["provider_id"] == 7 && x["rows"] == 1
        })
        .await;
    assert_eq!(first["start"], "2025-05-14T12:00:00Z", "{first}");
    assert_eq!(first["end"], "2025-05-14T12:01:00Z", "{first}");
    assert_eq!(first["closed"], false, "{first}");
    assert_eq!(first["metrics"]["sales"], 12.34, "{first}");
    assert_eq!(first["metrics"]["biggest"], 12.34, "{first}");
    assert_eq!(first["metrics"]["buyers"], 1, "{first}");
    w.exec(
        "UPDATE sales SET amount = 20.00 WHERE provider_id = 7;
         INSERT INTO sales (provider_id, amount, sold_at, customer_id) \
         VALUES (8, 1.50, '2025-05-14T12:00:45Z', 4)",
    )
    .await;
    let updated = all
        .window("provider 7's sale updated", |x| {
            x["group"]["provider_id"] == 7 && x["metrics"]["sales"] == 20.0
        })
        .await;
    assert_eq!(updated["rows"], 1, "the update replaced the row: {updated}");
    // The filtered stream skips provider 7's windows.
    let eight = eights.window("any window", |_| true).await;
    assert_eq!(eight["group"], json!({"provider_id": 8}), "{eight}");
    assert_eq!(eight["metrics"]["sales"], 1.5, "{eight}");
    // A stream opened now starts with the open windows.
    let mut late_comer = Stream::open(&w, "?provider_id=7").await;
    let open = late_comer.window("the open window", |_| true).await;
    assert_eq!(open["group"], json!({"provider_id": 7}), "{open}");
    assert_eq!(open["metrics"]["sales"], 20.0, "{open}");
    // Clients gone, the daemon stops (with a stream open, see
    // `sigterm_stops_the_daemon_while_a_stream_is_open`).
    drop((all, eights, late_comer));
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    w.cleanup().await;
}

/// SIGTERM stops `caudal run` (exit 0, within [`PATIENCE`]) while a
/// dashboard holds a `/stream` open: the stream ends, it does not keep the
/// server's graceful shutdown waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_while_a_stream_is_open() {
    let w = World::new(PER_MINUTE).await;
    let daemon = w.daemon(1);
    wait_for_streaming(&daemon).await;
    let mut stream = Stream::open(&w, "").await;
    w.exec(
        "INSERT INTO sales (provider_id, amount, sold_at, customer_id) \
         VALUES (7, 12.34, '2025-05-14T12:00:30Z', 3)",
    )
    .await;
    stream
        .window("the sale", |x| x["group"]["provider_id"] == 7)
        .await;
    daemon.signal(Signal::SIGTERM);
    // The stream ends (or breaks) once the daemon shuts down.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let ended = loop {
        match tokio::time::timeout_at(deadline, stream.response.chunk()).await {
            Err(_) => break false,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None) | Err(_)) => break true,
        }
    };
    let log = daemon.log();
    let status = if ended {
        Some(daemon.stop(Signal::SIGTERM).await.0)
    } else {
        daemon.stop(Signal::SIGKILL).await;
        None
    };
    w.cleanup().await;
    assert!(
        ended,
        "the stream was still open {PATIENCE:?} after SIGTERM (the daemon had to be killed); \
         log:\n{log}"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
}

/// The 1-based line and column where `needle` starts in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, line)| line.find(needle).map(|col| (i + 1, col + 1)))
        .unwrap_or_else(|| panic!("{needle:?} is not in the config"))
}

/// `caudal validate` reports every aggregate mistake of a config at once,
/// each as `file:line:col: aggregates.NAME.FIELD: message` pointing at the
/// offending value, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_every_aggregate_mistake_at_once() {
    let dir = tempfile::tempdir().expect("a directory");
    let config = r#"[state]
url = "sqlite://state.db"

[sources.pg]
type = "postgres"
url = "postgres://postgres@127.0.0.1:5432/none"
mode = "cdc"
tables = ["sales"]
slot = "never_created"
publication = "never_created"

[sinks.recv]
type = "http"
url = "http://127.0.0.1:9/ingest"

[pipelines.sales]
source = "pg"
sink = "recv"

[aggregates.broken]
pipeline = "sales"
group_by = ["a b", "provider_id", "provider_id"]
time = "sold_at"
window = "7m"
tz = "Mars/Olympus_Mons"
filter = "amount > "
[aggregates.broken.metrics]
orders = "count"
middle = "median(amount)"

[aggregates.orphan]
pipeline = "slaes"
window = "1h"
every = "7m"
metrics = {}
"#;
    let file = dir.path().join("caudal.toml");
    std::fs::write(&file, config).expect("write the config");
    let mut validate = tokio::process::Command::new(env!("CARGO_BIN_EXE_caudal"));
    validate
        .arg("validate")
        .arg("-c")
        .arg(&file)
        .current_dir(dir.path())
        .env_remove("CAUDAL_CONFIG")
        .env_remove("CAUDAL_LOG")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let out = Output::of(validate).await;
    assert_ne!(out.code, Some(0), "{out}");
    let file = file.display().to_string();
    // (where it points, the field path, part of the message)
    let problems = [
        (
            r#""a b""#,
            "aggregates.broken.group_by[0]",
            "not a field name",
        ),
        (
            r#""provider_id"]"#,
            "aggregates.broken.group_by[2]",
            "listed twice",
        ),
        (
            r#""7m""#,
            "aggregates.broken.window",
            "does not divide a day",
        ),
        (
            r#""Mars/Olympus_Mons""#,
            "aggregates.broken.tz",
            "unknown time zone",
        ),
        (
            r#""amount > ""#,
            "aggregates.broken.filter",
            "does not compile",
        ),
        (
            r#""median(amount)""#,
            "aggregates.broken.metrics.middle",
            "unknown metric function \"median\"",
        ),
        (
            r#""slaes""#,
            "aggregates.orphan.pipeline",
            "no pipeline \"slaes\"",
        ),
        (r#""7m""#, "aggregates.orphan.every", "must divide window"),
        ("{}", "aggregates.orphan.metrics", "at least one metric"),
    ];
    for (at, path, message) in problems {
        // The second "7m" is the orphan's `every`.
        let (line, col) = if path.ends_with("every") {
            position_of(config, r#"every = "7m""#)
        } else {
            position_of(config, at)
        };
        let col = if path.ends_with("every") {
            col + "every = ".len()
        } else {
            col
        };
        let prefix = format!("{file}:{line}:{col}: {path}: ");
        let reported = out
            .stderr
            .lines()
            .find(|l| l.contains(&prefix))
            .unwrap_or_else(|| panic!("no line with {prefix:?} in:\n{out}"));
        assert!(reported.contains(message), "{reported}");
    }
    assert!(
        out.stderr.contains(&format!("{} errors", problems.len())),
        "every mistake is counted: {out}"
    );
}

/// The live API names a bad parameter (400), knows no unknown aggregate
/// (404) and needs a token (401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_api_names_bad_parameters_and_needs_a_token() {
    let w = World::new(PER_MINUTE).await;
    let daemon = w.daemon(1);
    w.listed("per_minute", Some(&daemon)).await;
    let bad = [
        ("provider=7", "provider"),
        ("from=yesterday", "from"),
        ("to=2025-13-45T99:00:00Z", "to"),
        ("closed=maybe", "closed"),
        ("limit=0", "limit"),
        ("limit=lots", "limit"),
        ("from=2025-05-15T00:00:00Z&to=2025-05-14T00:00:00Z", "from"),
    ];
    for (query, parameter) in bad {
        for route in ["/api/v1/live/per_minute", "/api/v1/live/per_minute/stream"] {
            let path = format!("{route}?{query}");
            let a = w.get_with(&path, Some(&w.token), Some(&daemon)).await;
            assert_eq!(a.status, 400, "{path}: {}", a.text);
            let error = a.json["error"].to_string();
            assert!(
                a.json["error"] != Value::Null && error.contains(&format!("parameter {parameter}")),
                "{path}: the error names {parameter}: {}",
                a.text
            );
        }
    }
    for path in ["/api/v1/live/nope", "/api/v1/live/nope/stream"] {
        let a = w.get_with(path, Some(&w.token), Some(&daemon)).await;
        assert_eq!(a.status, 404, "{path}: {}", a.text);
        assert!(a.json["error"] != Value::Null, "{path}: {}", a.text);
    }
    for path in [
        "/api/v1/live",
        "/api/v1/live/per_minute",
        "/api/v1/live/per_minute/stream",
    ] {
        for token in [None, Some("cdl_not_a_token")] {
            let a = w.get_with(path, token, Some(&daemon)).await;
            assert_eq!(a.status, 401, "{path} with {token:?}: {}", a.text);
        }
    }
    daemon.stop(Signal::SIGTERM).await;
    w.cleanup().await;
}

/// The key of a delivered window: its start and group.
fn window_key(w: &Value) -> (String, String) {
    (
        w["start"].as_str().unwrap_or_default().to_string(),
        w["group"].to_string(),
    )
}

/// A pipeline whose source is `type = "aggregate"` delivers the closed
/// windows to its sink: each once when it closes, with the figures
/// PostgreSQL computes, and again, with its `late` count, when a late
/// change is counted on it; open windows are never sent; a SIGKILL and a
/// restart send no window with other figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_windows_flow_to_a_sink_once_each() {
    let out = Receiver::start().await;
    let w = World::new(&format!(
        r#"[aggregates.per_minute]
pipeline = "sales"
group_by = ["provider_id"]
time = "sold_at"
window = "1m"
lateness = "1m"
[aggregates.per_minute.metrics]
orders = "count"
sales = "sum(amount)"

[sources.closed]
type = "aggregate"
aggregate = "per_minute"

[sinks.windows_out]
type = "http"
url = "{}"
batch = {{ max_records = 50, max_wait = "50ms" }}

[pipelines.closed_windows]
source = "closed"
sink = "windows_out"
schedule = {{ continuous = true, poll = "200ms" }}
"#,
        out.url("/windows")
    ))
    .await;
    let daemon = w.daemon(1);
    wait_for_streaming(&daemon).await;
    for (provider, at, amount) in [
        (1, "2025-05-14T12:00:10Z", "5.00"),
        (2, "2025-05-14T12:00:20Z", "7.50"),
        (1, "2025-05-14T12:00:50Z", "2.25"),
        (1, "2025-05-14T12:01:30Z", "1.25"),
        // Closes 12:00 and 12:01 (end + 1m <= 12:03); 12:03 stays open.
        (3, "2025-05-14T12:03:00Z", "9.00"),
    ] {
        w.exec(&format!(
            "INSERT INTO sales (provider_id, amount, sold_at, customer_id) \
             VALUES ({provider}, {amount}, '{at}', 1)"
        ))
        .await;
    }
    let want: BTreeMap<(String, String), (i64, f64)> = [
        (("2025-05-14T12:00:00Z", r#"{"provider_id":1}"#), (2, 7.25)),
        (("2025-05-14T12:00:00Z", r#"{"provider_id":2}"#), (1, 7.5)),
        (("2025-05-14T12:01:00Z", r#"{"provider_id":1}"#), (1, 1.25)),
    ]
    .into_iter()
    .map(|((s, g), f)| ((s.to_string(), g.to_string()), f))
    .collect();
    let delivered = |r: &Receiver| -> BTreeMap<(String, String), Vec<Value>> {
        let mut by_key: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for rec in r.accepted_records_at("") {
            by_key.entry(window_key(&rec)).or_default().push(rec);
        }
        by_key
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while delivered(&out).len() < want.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "closed windows not delivered: {:?}\nlog:\n{}",
            out.accepted_records_at(""),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = delivered(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "only the closed windows are sent: {got:?}"
    );
    for (key, (orders, sales)) in &want {
        let first = &got[key][0];
        assert_eq!(first["aggregate"], "per_minute", "{first}");
        assert_eq!(first["rows"], *orders, "{key:?}: {first}");
        assert_eq!(first["metrics"]["orders"], *orders, "{key:?}: {first}");
        assert_eq!(
            cents(&first["metrics"]["sales"], "sales"),
            cents(&json!(sales), "want"),
            "{key:?}: {first}"
        );
        assert_eq!(first["late"], 0, "{first}");
    }
    // A SIGKILL, a restart and a late sale for the closed 12:00 window of
    // provider 2: that window is sent again with late 1 and the same
    // figures; nothing else is sent with other figures.
    drop(daemon.stop(Signal::SIGKILL).await);
    let daemon = w.daemon(2);
    wait_for_streaming(&daemon).await;
    w.exec(
        "INSERT INTO sales (provider_id, amount, sold_at, customer_id) \
         VALUES (2, 100.00, '2025-05-14T12:00:40Z', 1)",
    )
    .await;
    let late_key = (
        "2025-05-14T12:00:00Z".to_string(),
        r#"{"provider_id":2}"#.to_string(),
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = delivered(&out);
        if got[&late_key].iter().any(|r| r["late"] == 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the late window was not sent again: {:?}\nlog:\n{}",
            got[&late_key],
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (key, records) in delivered(&out) {
        let (orders, sales) = &want[&key];
        for r in &records {
            assert_eq!(
                r["rows"], *orders,
                "{key:?} sent with other figures: {records:?}"
            );
            assert_eq!(
                cents(&r["metrics"]["sales"], "sales"),
                cents(&json!(sales), "want"),
                "{key:?} sent with other figures: {records:?}"
            );
        }
    }
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    w.cleanup().await;
}
