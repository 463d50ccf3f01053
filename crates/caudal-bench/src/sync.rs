//! The hourly sync scenarios: an incremental PostgreSQL source (cursor
//! `last_modified_date, request_id`) to the always-200 receiver.
//!
//! - `initial-sync`: the first run over N rows (default 1,000,000), against
//!   COPY into /dev/null and the seeds' Python senders on the same rows and
//!   receiver. The COPYs, each by `psql`: of the same ordered query (text,
//!   as before); of the table, unordered, on one connection, text and
//!   binary; and of the table in ctid ranges on `--copy-workers`
//!   connections at once, text and binary, every connection in the same
//!   exported snapshot. The fastest is the read ceiling (`caudal_over_copy`
//!   names it); the ordered one stays for continuity. The seeds: seed 001's
//!   `send_interval_data` loop (`requests.post`, one request per batch of
//!   1,000) and seed 000's `ThreadPoolExecutor` sender (one request per
//!   record, 5 workers) on a sample of `--seed000-rows` rows.
//! - `steady-state`: a run after the first: `--changed` rows (default
//!   10,000) modified in a table of N rows (default 10,000,000). caudal's
//!   time from start to exit, against COPY of the same rows by the cursor
//!   index and by a sequential scan, and seed 001's loop over the last
//!   hour's rows; caudal's own scans of the table are counted
//!   (`pg_stat_user_tables`) to show it used the index.
//!
//! With `--baseline-caudal`, the baseline build makes the same runs from a
//! state of its own: in `steady-state` its own first run, then its own run
//! over the same changed rows.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Executor as _, PgPool, Row as _};

use crate::cdc::{scratch_dir, spawn_caudal, subject_dir, wait_exit};
use crate::process::{Ended, Measured};
use crate::receiver::{self, Receiver};
use crate::subject::{self, Subject};
use crate::{Args, database_url, round};

pub(crate) const DATABASE: &str = "caudal_bench";
/// The cursor query both caudal and the COPY reference read in order.
const ORDER: &str = "ORDER BY last_modified_date, request_id";
/// How long a sender may go without delivering anything, or a seed
/// re-creation may run in all, before the scenario fails.
const STALL: Duration = Duration::from_secs(60);
const SEED_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs `initial-sync`, then drops its database.
pub async fn initial(args: &Args) -> anyhow::Result<Vec<Value>> {
    let rows = args.rows.unwrap_or(1_000_000);
    let (admin, url) = provision(args, rows).await?;
    let result = initial_run(args, &url, rows).await;
    let cleaned = drop_database(&admin).await;
    result.and_then(|r| cleaned.map(|()| vec![r]))
}

async fn initial_run(args: &Args, url: &str, rows: u64) -> anyhow::Result<Value> {
    let dir = scratch_dir("initial-sync")?;
    let receiver = receiver::start().await?;

    let mut runs = Vec::new();
    for subject in args.subjects() {
        eprintln!("initial-sync: {} once over {rows} rows", subject.name);
        let sub = subject_dir(args, &dir, subject)?;
        let config = write_config(&sub, url, &receiver, args)?;
        let total = receiver.records() + rows;
        runs.push((
            subject,
            run_caudal(subject, &config, &sub, &receiver, total).await?,
        ));
    }
    let (caudal, baseline) = subject::split(runs)?;

    eprintln!("initial-sync: COPY references");
    let copies = copies(url, rows, args.copy_workers).await?;

    eprintln!("initial-sync: seed 001 send_interval_data loop over {rows} rows");
    let seed001 = run_seed(
        args,
        &dir,
        &receiver,
        "seed001_send_interval_data.py",
        &["--batch", &args.batch.to_string()],
        url,
        rows,
    )
    .await?;

    let sample = args.seed000_rows.min(rows);
    eprintln!("initial-sync: seed 000 thread pool, one request per record, {sample} rows");
    let seed000 = run_seed(
        args,
        &dir,
        &receiver,
        "seed000_thread_pool.py",
        &["--limit", &sample.to_string()],
        url,
        sample,
    )
    .await?;

    let n = rows as f64;
    let caudal_rate = n / caudal.secs;
    let seed001_rate = n / seed001.secs;
    let seed000_rate = sample as f64 / seed000.secs;
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = json!({
        "scenario": "initial_sync",
        "rows": rows,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "caudal_secs": round(caudal.secs),
        "caudal_rows_per_s": round(caudal_rate),
        "caudal_peak_rss_mib": round(caudal.peak_rss_mib),
        "copy_workers": args.copy_workers,
    });
    for (name, secs) in copies.each() {
        report[format!("copy_{name}_secs")] = json!(round(secs));
        report[format!("copy_{name}_rows_per_s")] = json!(round(n / secs));
    }
    let (fastest, fastest_secs) = copies.fastest();
    subject::extend(
        &mut report,
        json!({
            "copy_fastest": fastest,
            "copy_fastest_rows_per_s": round(n / fastest_secs),
            "caudal_over_copy": round(fastest_secs / caudal.secs),
            "caudal_over_copy_ordered": round(copies.ordered / caudal.secs),
            "seed001_secs": round(seed001.secs),
            "seed001_rows_per_s": round(seed001_rate),
            "seed001_peak_rss_mib": round(seed001.peak_rss_mib),
            "caudal_over_seed001": round(caudal_rate / seed001_rate),
            "seed000_rows": sample,
            "seed000_secs": round(seed000.secs),
            "seed000_rows_per_s": round(seed000_rate),
            "seed000_peak_rss_mib": round(seed000.peak_rss_mib),
            "caudal_over_seed000": round(caudal_rate / seed000_rate),
        }),
    );
    if let Some(b) = baseline {
        subject::extend(
            &mut report,
            json!({
                "baseline_secs": round(b.secs),
                "baseline_rows_per_s": round(n / b.secs),
                "baseline_peak_rss_mib": round(b.peak_rss_mib),
                "caudal_over_baseline": round(b.secs / caudal.secs),
            }),
        );
    }
    Ok(report)
}

/// Runs `steady-state`, then drops its database.
pub async fn steady(args: &Args) -> anyhow::Result<Value> {
    let rows = args.rows.unwrap_or(10_000_000);
    if args.changed == 0 || args.changed > rows {
        bail!("--changed must be between 1 and the table's {rows} rows");
    }
    let (admin, url) = provision(args, rows).await?;
    let result = steady_run(args, &url, rows).await;
    let cleaned = drop_database(&admin).await;
    result.and_then(|r| cleaned.map(|()| r))
}

async fn steady_run(args: &Args, url: &str, rows: u64) -> anyhow::Result<Value> {
    let changed = args.changed;
    let dir = scratch_dir("steady-state")?;
    let receiver = receiver::start().await?;

    // Each build's first run over the whole table, from a state of its own.
    let mut firsts = Vec::new();
    for subject in args.subjects() {
        eprintln!(
            "steady-state: {} first run, {rows} rows (not timed against a reference)",
            subject.name
        );
        let sub = subject_dir(args, &dir, subject)?;
        let config = write_config(&sub, url, &receiver, args)?;
        let total = receiver.records() + rows;
        let first = run_caudal(subject, &config, &sub, &receiver, total).await?;
        firsts.push((subject, (first, sub, config)));
    }

    // One connection, so that its own statistics can be flushed before
    // caudal's scans are counted.
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    // The cursor's end after the first run: the changed rows sort after it.
    let last: (String, i64) = {
        let row = sqlx::query(
            "SELECT last_modified_date::text, request_id FROM service_requests
             ORDER BY last_modified_date DESC, request_id DESC LIMIT 1",
        )
        .fetch_one(&db)
        .await?;
        (row.try_get(0)?, row.try_get(1)?)
    };
    // Stamped 10 s to 30 minutes ago: older than the source's safety lag
    // (5 s), which leaves younger rows for the next run.
    eprintln!("steady-state: changing {changed} rows spread over the table");
    let stride = i64::try_from(rows / changed)?;
    let updated = sqlx::query(
        "UPDATE service_requests SET status_id = status_id % 5 + 1,
                last_modified_date = now() - interval '10 seconds'
                                     - (request_id % 3600) * interval '1 second' / 2
         WHERE request_id IN (SELECT g * $1 FROM generate_series(1, $2) g)",
    )
    .bind(stride)
    .bind(i64::try_from(changed)?)
    .execute(&db)
    .await?
    .rows_affected();
    if updated != changed {
        bail!("changed {updated} rows, expected {changed}");
    }
    // The seed's interval: the last hour, as the scheduler would ask at the
    // next full hour (the changed rows were stamped up to 30 minutes ago).
    let (since, until): (String, String) = sqlx::query_as(
        "SELECT (now() - interval '1 hour')::text, (now() + interval '1 minute')::text",
    )
    .fetch_one(&db)
    .await?;
    // The UPDATE's own scans reach the statistics now, not during caudal's run.
    db.execute("SELECT pg_stat_force_next_flush()").await?;
    db.execute("SELECT 1").await?;

    let mut seconds = Vec::new();
    for (subject, (first, sub, config)) in firsts {
        let before = table_scans(&db).await?;
        eprintln!(
            "steady-state: {} once over the {changed} changed rows",
            subject.name
        );
        let total = receiver.records() + changed;
        let second = run_caudal(subject, &config, &sub, &receiver, total).await?;
        // Backends count their scans when they exit; caudal's have.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let after = table_scans(&db).await?;
        let scans = (after.0 - before.0, after.1 - before.1);
        seconds.push((subject, (first, second, scans)));
    }
    let ((first, caudal, scans), baseline) = subject::split(seconds)?;

    let query = format!(
        "SELECT * FROM service_requests \
         WHERE (last_modified_date, request_id) > ('{}'::timestamptz, {}) {ORDER}",
        last.0, last.1
    );
    eprintln!("steady-state: COPY references (index, sequential scan)");
    let copy_index_secs = psql_copy(url, &[], &format!("COPY ({query}) TO STDOUT"))?;
    let copy_seqscan_secs = psql_copy(
        url,
        &[
            "SET enable_indexscan = off",
            "SET enable_bitmapscan = off",
            "SET enable_indexonlyscan = off",
        ],
        &format!("COPY ({query}) TO STDOUT"),
    )?;

    eprintln!("steady-state: seed 001 send_interval_data over the last hour");
    let seed001 = run_seed(
        args,
        &dir,
        &receiver,
        "seed001_send_interval_data.py",
        &[
            "--since",
            &since,
            "--until",
            &until,
            "--batch",
            &args.batch.to_string(),
        ],
        url,
        changed,
    )
    .await?;
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = json!({
        "scenario": "steady_state",
        "rows": rows,
        "changed": changed,
        "batch": args.batch,
        "first_run_secs": round(first.secs),
        "first_run_rows_per_s": round(rows as f64 / first.secs),
        "caudal_secs": round(caudal.secs),
        "caudal_peak_rss_mib": round(caudal.peak_rss_mib),
        "caudal_seq_scans": scans.0,
        "caudal_index_scans": scans.1,
        "copy_index_secs": round(copy_index_secs),
        "copy_seqscan_secs": round(copy_seqscan_secs),
        "caudal_over_copy_index": round(copy_index_secs / caudal.secs),
        "seed001_secs": round(seed001.secs),
        "caudal_over_seed001": round(seed001.secs / caudal.secs),
    });
    if let Some((b_first, b, b_scans)) = baseline {
        subject::extend(
            &mut report,
            json!({
                "baseline_first_run_secs": round(b_first.secs),
                "baseline_first_run_rows_per_s": round(rows as f64 / b_first.secs),
                "baseline_secs": round(b.secs),
                "baseline_peak_rss_mib": round(b.peak_rss_mib),
                "baseline_seq_scans": b_scans.0,
                "baseline_index_scans": b_scans.1,
                "caudal_over_baseline": round(b.secs / caudal.secs),
                "caudal_over_baseline_first_run": round(b_first.secs / first.secs),
            }),
        );
    }
    Ok(report)
}

/// Recreates the database with `service_requests` holding `rows` rows, ten
/// per second of modification time (many rows share a cursor value), and
/// the cursor index.
async fn provision(args: &Args, rows: u64) -> anyhow::Result<(PgPool, String)> {
    let admin = PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })?;
    drop_database(&admin).await?;
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {DATABASE}"
        ))))
        .await?;
    let url = database_url(&args.pg_url, DATABASE);
    match load(&url, rows).await {
        Ok(()) => Ok((admin, url)),
        Err(e) => {
            let _ = drop_database(&admin).await;
            Err(e)
        }
    }
}

/// Fills the new database: the table, its rows, the cursor index.
async fn load(url: &str, rows: u64) -> anyhow::Result<()> {
    let db = PgPool::connect(url).await?;
    eprintln!("loading {rows} rows into service_requests");
    db.execute(
        "CREATE TABLE service_requests (
            request_id BIGINT PRIMARY KEY,
            service_id TEXT NOT NULL,
            opening_date TIMESTAMPTZ NOT NULL,
            status_id INT NOT NULL,
            last_modified_date TIMESTAMPTZ NOT NULL)",
    )
    .await?;
    sqlx::query(
        "INSERT INTO service_requests
         SELECT g, 'SRV-' || (g % 997), timestamptz '2025-01-01' + (g || ' seconds')::interval,
                (g % 5) + 1, timestamptz '2025-01-01' + ((g / 10) || ' seconds')::interval
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(rows)?)
    .execute(&db)
    .await?;
    db.execute(
        "CREATE INDEX service_requests_sync ON service_requests (last_modified_date, request_id)",
    )
    .await?;
    db.execute("VACUUM ANALYZE service_requests").await?;
    db.close().await;
    Ok(())
}

async fn drop_database(admin: &PgPool) -> anyhow::Result<()> {
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
        ))))
        .await?;
    Ok(())
}

/// The source, sink and pipeline `bench`, as the seed's sync would be
/// configured: pages of 10,000, batches of `--batch`.
fn write_config(
    dir: &Path,
    url: &str,
    receiver: &Receiver,
    args: &Args,
) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.servicedesk]
type = "postgres"
url = "{url}"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]
page_size = 10000

[sinks.partner]
type = "http"
url = "http://{addr}/services-data/requests"
batch = {{ max_records = {batch}, max_bytes = "64MiB" }}
concurrency = {concurrency}

[pipelines.bench]
source = "servicedesk"
sink = "partner"
schedule = {{ every = "1h" }}
"#,
            state = dir.join("state.db").display(),
            addr = receiver.addr,
            batch = args.batch,
            concurrency = args.concurrency,
        ),
    )?;
    Ok(config)
}

/// `caudal once bench` with `subject`'s binary, from start to exit; the
/// receiver must then hold exactly `total` records. Fails when nothing
/// arrives for [`STALL`].
async fn run_caudal(
    subject: Subject<'_>,
    config: &Path,
    dir: &Path,
    receiver: &Receiver,
    total: u64,
) -> anyhow::Result<Ended> {
    let caudal = spawn_caudal(subject, config, dir, &["once", "bench"])?;
    let mut last = (receiver.records(), Instant::now());
    while !caudal.has_exited() {
        let n = receiver.records();
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > STALL {
            bail!(
                "caudal once delivered nothing for {} s (log: {})",
                STALL.as_secs(),
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = wait_exit(caudal, dir, "caudal once").await?;
    let delivered = receiver.records();
    if delivered != total {
        bail!(
            "the receiver holds {delivered} records, expected {total} (log: {})",
            dir.join("caudal.log").display()
        );
    }
    Ok(ended)
}

/// `psql` running `commands` in turn on one connection, its output (the
/// COPY's rows) into /dev/null.
pub(crate) fn psql(url: &str, commands: &[&str]) -> Command {
    let mut cmd = Command::new("psql");
    cmd.arg(url).args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.stdout(Stdio::null());
    cmd
}

/// Runs the `psql` processes `each` all at once; the seconds from the
/// first start to the last exit. Every one must succeed.
pub(crate) fn timed(each: Vec<Command>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut children = Vec::with_capacity(each.len());
    for mut cmd in each {
        children.push(cmd.spawn().context("cannot run psql")?);
    }
    let mut failed = None;
    for mut child in children {
        let status = child.wait()?;
        if !status.success() {
            failed = Some(status);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    match failed {
        Some(status) => bail!("psql COPY failed: {status}"),
        None => Ok(secs),
    }
}

/// `psql` running `settings` then `copy` (a `COPY … TO STDOUT`) into
/// /dev/null; its seconds, process start to exit.
fn psql_copy(url: &str, settings: &[&str], copy: &str) -> anyhow::Result<f64> {
    let mut commands = settings.to_vec();
    commands.push(copy);
    timed(vec![psql(url, &commands)])
}

/// The seconds each COPY reference of `initial-sync` took.
#[derive(Clone, Copy, Debug)]
struct Copies {
    /// `COPY (SELECT * … ORDER BY the cursor) TO STDOUT`: what caudal
    /// reads, in its order.
    ordered: f64,
    /// `COPY service_requests TO STDOUT`: the table in its stored order.
    text: f64,
    /// The same, `(FORMAT binary)`.
    binary: f64,
    /// The table in ctid ranges on `--copy-workers` connections at once,
    /// text.
    parallel_text: f64,
    /// The same, binary.
    parallel_binary: f64,
}

impl Copies {
    /// Each, by the name its figures carry (`copy_NAME_…`).
    fn each(self) -> [(&'static str, f64); 5] {
        [
            ("ordered", self.ordered),
            ("text", self.text),
            ("binary", self.binary),
            ("parallel_text", self.parallel_text),
            ("parallel_binary", self.parallel_binary),
        ]
    }

    /// The fastest: the read ceiling.
    fn fastest(self) -> (&'static str, f64) {
        self.each()
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("ordered", self.ordered))
    }
}

/// Times every COPY reference of `initial-sync` over the table of `rows`
/// rows.
async fn copies(url: &str, rows: u64, workers: u32) -> anyhow::Result<Copies> {
    let ordered = psql_copy(
        url,
        &[],
        &format!("COPY (SELECT * FROM service_requests {ORDER}) TO STDOUT"),
    )?;
    let text = psql_copy(url, &[], "COPY service_requests TO STDOUT")?;
    let binary = psql_copy(url, &[], "COPY service_requests TO STDOUT (FORMAT binary)")?;
    let parallel_text = parallel_copy(url, rows, workers, "").await?;
    let parallel_binary = parallel_copy(url, rows, workers, " (FORMAT binary)").await?;
    Ok(Copies {
        ordered,
        text,
        binary,
        parallel_text,
        parallel_binary,
    })
}

/// The table read in `workers` ranges of its blocks at once, one `psql`
/// each, every one in the same snapshot: a transaction here exports it
/// (`pg_export_snapshot()`) and stays open while each worker imports it
/// (`SET TRANSACTION SNAPSHOT`) and runs `COPY (SELECT * FROM
/// service_requests WHERE ctid >= '(a,0)' AND ctid < '(b,0)') TO STDOUT
/// {format}` (a TID range scan of its blocks; the last range is open at
/// its end). The ranges split `pg_relation_size / block_size` evenly. The
/// seconds from the first worker's start to the last one's exit; then,
/// untimed, the ranges' row counts in the same snapshot must add up to
/// `rows`, so no row was read twice or missed.
async fn parallel_copy(url: &str, rows: u64, workers: u32, format: &str) -> anyhow::Result<f64> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await?;
    let (snapshot, blocks): (String, i64) = sqlx::query_as(
        "SELECT pg_export_snapshot(),
                pg_relation_size('service_requests') / current_setting('block_size')::bigint",
    )
    .fetch_one(&mut conn)
    .await?;
    let ranges: Vec<String> = (0..i64::from(workers))
        .map(|i| {
            let from = blocks * i / i64::from(workers);
            if i + 1 == i64::from(workers) {
                format!("ctid >= '({from},0)'::tid")
            } else {
                let to = blocks * (i + 1) / i64::from(workers);
                format!("ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
            }
        })
        .collect();
    let import = format!("SET TRANSACTION SNAPSHOT '{snapshot}'");
    let each = ranges
        .iter()
        .map(|range| {
            let copy =
                format!("COPY (SELECT * FROM service_requests WHERE {range}) TO STDOUT{format}");
            psql(
                url,
                &[
                    "BEGIN ISOLATION LEVEL REPEATABLE READ",
                    &import,
                    &copy,
                    "COMMIT",
                ],
            )
        })
        .collect();
    let secs = timed(each)?;
    let mut counted = 0;
    for range in &ranges {
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM service_requests WHERE {range}"
        )))
        .fetch_one(&mut conn)
        .await?;
        counted += n;
    }
    conn.execute("COMMIT").await?;
    conn.close().await?;
    if u64::try_from(counted)? != rows {
        bail!("the ctid ranges of the parallel COPY hold {counted} rows, the table {rows}");
    }
    Ok(secs)
}

/// Runs a seed re-creation against the receiver; it must print a summary
/// with `rows` rows and no failure, and the receiver must have counted
/// `rows` more records.
async fn run_seed(
    args: &Args,
    dir: &Path,
    receiver: &Receiver,
    script: &str,
    extra: &[&str],
    url: &str,
    rows: u64,
) -> anyhow::Result<Ended> {
    let out = dir.join(format!("{script}.out"));
    let err = dir.join(format!("{script}.err"));
    let mut cmd = Command::new(&args.python);
    cmd.arg(args.seeds.join(script))
        .args(["--dsn", url])
        .args([
            "--url",
            &format!("http://{}/services-data/requests", receiver.addr),
        ])
        .args(extra)
        .stdout(Stdio::from(std::fs::File::create(&out)?))
        .stderr(Stdio::from(std::fs::File::create(&err)?));
    let before = receiver.records();
    let seed = Measured::spawn(cmd).with_context(|| {
        format!(
            "cannot run {} (bench/run installs a virtualenv with the seeds' packages)",
            args.python.display()
        )
    })?;
    let ended = tokio::time::timeout(SEED_TIMEOUT, seed.wait())
        .await
        .with_context(|| format!("{script} did not finish in {} s", SEED_TIMEOUT.as_secs()))??;
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    if !ended.status.success() {
        bail!("{script} failed: {}: {stderr}", ended.status);
    }
    let summary: Value = serde_json::from_str(std::fs::read_to_string(&out)?.trim())
        .with_context(|| format!("{script} printed no summary: {stderr}"))?;
    let got = receiver.records() - before;
    if summary["rows"] != json!(rows) || got != rows {
        bail!(
            "{script} read {} rows and delivered {got}, expected {rows}",
            summary["rows"]
        );
    }
    Ok(ended)
}

/// Sequential and index scans of `service_requests` so far.
async fn table_scans(db: &PgPool) -> anyhow::Result<(i64, i64)> {
    db.execute("SELECT pg_stat_clear_snapshot()").await?;
    let row = sqlx::query(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'service_requests'",
    )
    .fetch_one(db)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
