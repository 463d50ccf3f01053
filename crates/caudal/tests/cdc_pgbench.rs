//! PostgreSQL's own benchmark schema captured while the benchmark runs:
//! `pgbench -i` makes four tables, `pgbench_history` without a primary
//! key; `pgbench` then updates an account, a teller and a branch and
//! inserts a history row per transaction. caudal captures all four with the
//! real binary, killed with SIGKILL twice along the way (the snapshot of
//! 100,000 accounts included), and every history insert and every account,
//! teller and branch update must arrive exactly once (batches deduplicated
//! by idempotency key), the replayed tables equal to the source.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use caudal_testkit::{Receiver, TestDb, pg_database};
use nix::sys::signal::Signal;
use rand::Rng as _;
use serde_json::Value;
use support::cdc::{accepted_changes, apply, difference, normalise};
use support::{PATIENCE, spawn_daemon};

const PIPELINE: &str = "bench";
const TABLES: [&str; 4] = [
    "public.pgbench_accounts",
    "public.pgbench_tellers",
    "public.pgbench_branches",
    "public.pgbench_history",
];
/// How long pgbench runs, and its rate (transactions per second, so the
/// volume, not the machine, sets how long the test takes).
const PGBENCH_SECONDS: u32 = 20;
const PGBENCH_RATE: u32 = 250;

struct Bench {
    db: TestDb,
    receiver: Receiver,
    dir: tempfile::TempDir,
    slot: String,
}

impl Bench {
    async fn new() -> Self {
        let db = pg_database().await;
        let slot = format!("caudal_b_{}", &db.name()[db.name().len() - 20..]);
        let bench = Self {
            db,
            receiver: Receiver::start().await,
            dir: tempfile::tempdir().expect("a state directory"),
            slot,
        };
        bench.pgbench(&["-i", "-s", "1", "-q"]).await;
        bench
    }

    /// Runs pgbench with `args` against the test database; its output.
    async fn pgbench(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("pgbench")
            .args(args)
            .arg(self.db.url())
            .output()
            .await
            .expect("pgbench (from PostgreSQL's packages: scripts/test installs them)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
        text
    }

    fn config(&self) -> PathBuf {
        let tables: Vec<String> = TABLES.iter().map(|t| format!("{t:?}")).collect();
        let text = format!(
            r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}"
mode = "cdc"
tables = [{tables}]
slot = "{slot}"
publication = "{slot}"
heartbeat = "1s"

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 500, max_wait = "100ms" }}
body = '{{"changes": {{{{ records | tojson }}}}}}'

[sinks.recv.delivery]
retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[pipelines.{PIPELINE}]
source = "pg"
sink = "recv"
"#,
            state = self.dir.path().join("state.db").display(),
            url = self.db.url(),
            tables = tables.join(", "),
            slot = self.slot,
            receiver = self.receiver.url("/ingest"),
        );
        let path = self.dir.path().join("caudal.toml");
        std::fs::write(&path, text).expect("write the config");
        path
    }

    async fn rows(&self, sql: &str) -> Vec<Value> {
        let pool = self.db.pg_pool().await;
        let rows: Vec<(Value,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT to_jsonb(t) FROM ({sql}) t"
        )))
        .fetch_all(&pool)
        .await
        .expect("query the source");
        rows.into_iter().map(|(v,)| v).collect()
    }

    /// Runs one statement; the rows it changed.
    async fn affected(&self, sql: &str) -> u64 {
        let pool = self.db.pg_pool().await;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .rows_affected()
    }

    async fn exec(&self, sql: &str) {
        let pool = self.db.pg_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The source's keyed tables, as a replay of the changes would hold
    /// them (rows keyed by their primary key, as JSON).
    async fn keyed_tables(&self) -> support::cdc::Tables {
        let mut out = support::cdc::Tables::new();
        for (table, key) in [
            ("pgbench_accounts", "aid"),
            ("pgbench_tellers", "tid"),
            ("pgbench_branches", "bid"),
        ] {
            let rows = out.entry(format!("public.{table}")).or_default();
            for row in self.rows(&format!("SELECT * FROM {table}")).await {
                let k = serde_json::json!([row[key]]).to_string();
                rows.insert(k, row.as_object().cloned().unwrap_or_default());
            }
        }
        normalise(out)
    }

    async fn cleanup(self) {
        let pool = self.db.pg_pool().await;
        for _ in 0..50 {
            let gone = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&pool)
                .await;
            if gone.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for publication in [self.slot.clone(), format!("{}_inserts", self.slot)] {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP PUBLICATION IF EXISTS \"{publication}\""
            )))
            .execute(&pool)
            .await;
        }
        drop(pool);
        self.db.cleanup().await;
    }
}

/// The history rows a list of changes inserted, as comparable text.
fn history_inserts(changes: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = changes
        .iter()
        .filter(|c| c["table"] == "public.pgbench_history" && c["op"] == "insert")
        .map(|c| history_row(&c["after"]))
        .collect();
    rows.sort();
    rows
}

fn history_row(row: &Value) -> String {
    // PostgreSQL's JSON and caudal write fractions of seconds differently
    // (trailing zeros): compared as times.
    let mtime = row["mtime"]
        .as_str()
        .and_then(|t| t.parse::<jiff::civil::DateTime>().ok())
        .map_or_else(|| row["mtime"].to_string(), |t| t.to_string());
    format!(
        "{} {} {} {} {mtime}",
        row["tid"], row["bid"], row["aid"], row["delta"]
    )
}

/// Updates per table.
fn updates(changes: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in changes.iter().filter(|c| c["op"] == "update") {
        *out.entry(c["table"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    out
}

/// The transactions pgbench reports it processed.
fn transactions(output: &str) -> usize {
    output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench's output:\n{output}"))
}

/// Runs pgbench while the daemon captures, killing it twice; returns the
/// transactions pgbench processed and the last daemon.
async fn run_with_kills(bench: &Bench, config: &std::path::Path) -> (usize, support::Daemon) {
    let mut daemon = spawn_daemon(config, bench.dir.path(), 1);
    // pgbench starts once the slot exists: every change it makes is then
    // in the stream (what came before is in the snapshot).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bench
        .rows(&format!(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name = '{}'",
            bench.slot
        ))
        .await
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replication slot:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = PGBENCH_RATE.to_string();
    let seconds = PGBENCH_SECONDS.to_string();
    let args = ["-n", "-c", "2", "-j", "1", "-R", &rate, "-T", &seconds];
    let run = bench.pgbench(&args);
    tokio::pin!(run);
    let mut kills = Vec::new();
    {
        let mut rng = rand::rng();
        kills.push(rng.random_range(1_000..6_000));
        kills.push(rng.random_range(9_000..15_000));
    }
    let started = tokio::time::Instant::now();
    let mut n = 1;
    let output = loop {
        let next_kill = kills.first().map(|ms| started + Duration::from_millis(*ms));
        tokio::select! {
            output = &mut run => break output,
            () = async {
                match next_kill {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                kills.remove(0);
                let _ = daemon.stop(Signal::SIGKILL).await;
                n += 1;
                daemon = spawn_daemon(config, bench.dir.path(), n);
            }
        }
    };
    (transactions(&output), daemon)
}

/// Waits until what arrived replays to the source's keyed tables and holds
/// every history row; returns the changes.
async fn caught_up(bench: &Bench, daemon: &support::Daemon) -> Vec<Value> {
    let want_tables = bench.keyed_tables().await;
    let mut want_history: Vec<String> = bench
        .rows("SELECT * FROM pgbench_history")
        .await
        .iter()
        .map(history_row)
        .collect();
    want_history.sort();
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    loop {
        let changes: Vec<Value> = accepted_changes(&bench.receiver);
        let keyed: Vec<Value> = changes
            .iter()
            .filter(|c| c["table"] != "public.pgbench_history")
            .cloned()
            .collect();
        let got = apply(&keyed);
        let history = history_inserts(&changes);
        if got == want_tables && history.len() >= want_history.len() {
            assert_eq!(
                history, want_history,
                "history inserts arrived more or less than once"
            );
            return changes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not caught up: {} of {} history rows; tables differ:\n{}\n{}",
            history.len(),
            want_history.len(),
            difference(&want_tables, &got),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_is_captured_exactly_once_through_kills_history_as_is() {
    let bench = Bench::new().await;
    let config = bench.config();
    let (processed, daemon) = run_with_kills(&bench, &config).await;
    let changes = caught_up(&bench, &daemon).await;
    // Every transaction updated one account, one teller and one branch.
    let per_table = updates(&changes);
    for table in &TABLES[..3] {
        assert_eq!(
            per_table.get(*table).copied().unwrap_or(0),
            processed,
            "{table}: updates arrived more or less than once ({per_table:?})"
        );
    }
    // The keyless table went into a publication of inserts only, so the
    // application's updates are not refused; and its changes carry no key.
    let history = changes
        .iter()
        .find(|c| c["table"] == "public.pgbench_history")
        .expect("history inserts");
    assert_eq!(history["key"], serde_json::json!({}), "{history}");
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(
        log.contains("table has no primary key: its inserts and truncates are captured"),
        "the preflight says what works for the keyless table:\n{log}"
    );
    // The application may still update the keyless table: a table without
    // a replica identity in a publication of updates would refuse it.
    bench
        .exec("UPDATE pgbench_history SET delta = delta + 1 WHERE aid = 1")
        .await;
    bench.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_is_captured_exactly_once_through_kills_history_with_full_identity() {
    let bench = Bench::new().await;
    bench
        .exec("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        .await;
    let config = bench.config();
    let (processed, daemon) = run_with_kills(&bench, &config).await;
    let changes = caught_up(&bench, &daemon).await;
    let per_table = updates(&changes);
    for table in &TABLES[..3] {
        assert_eq!(
            per_table.get(*table).copied().unwrap_or(0),
            processed,
            "{table}: updates arrived more or less than once ({per_table:?})"
        );
    }
    // With the whole row as identity, updates and deletes of the keyless
    // table arrive too, the old row whole in `before`.
    let victim = bench
        .rows("SELECT * FROM pgbench_history WHERE ctid = '(0,1)'")
        .await
        .remove(0);
    assert_eq!(
        bench
            .affected("UPDATE pgbench_history SET delta = delta + 1000000 WHERE ctid = '(0,1)'")
            .await,
        1
    );
    assert_eq!(
        bench
            .affected(&format!(
                "DELETE FROM pgbench_history WHERE aid = {} AND delta > 500000",
                victim["aid"]
            ))
            .await,
        1
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (update, delete) = loop {
        let changes = accepted_changes(&bench.receiver);
        let history: Vec<&Value> = changes
            .iter()
            .filter(|c| c["table"] == "public.pgbench_history")
            .collect();
        let update = history.iter().find(|c| c["op"] == "update").cloned();
        let delete = history.iter().find(|c| c["op"] == "delete").cloned();
        if let (Some(u), Some(d)) = (update, delete) {
            break (u.clone(), d.clone());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the keyless table's update and delete did not arrive\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(history_row(&update["before"]), history_row(&victim));
    assert_eq!(update["key"], serde_json::json!({}));
    assert_eq!(
        update["after"]["delta"].as_i64(),
        victim["delta"].as_i64().map(|d| d + 1_000_000)
    );
    assert_eq!(
        history_row(&delete["before"]),
        history_row(&update["after"])
    );
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(
        log.contains("table has no primary key: every change is captured"),
        "{log}"
    );
    bench.cleanup().await;
}
