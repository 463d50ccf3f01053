//! `dataset-write` and `dataset-query`: report pipelines (a PostgreSQL
//! query run once per logical date into daily Parquet partitions) and the
//! query API over what they wrote.
//!
//! Both read seed 003's sales (`examples/seed-003`: `schema.sql`, then
//! `generate.sql` with `rows` = `--rows`, default 10,000,000, over `days` =
//! `--days`, default 100, from 2025-01-01, 20 providers) in the database
//! `caudal_bench`, vacuumed after it is filled so that the first reader
//! does not pay for hint bits. Generating 10,000,000 rows takes minutes on
//! two cores, so the table is made once per harness process and kept while
//! these scenarios run at the same size (a marker table holds the size;
//! another scenario recreating the database makes the next run generate
//! again); [`Cleanup`] drops it, and this module's scratch directory, when
//! the harness exits, also after a failure.
//!
//! - `dataset-write`: `caudal backfill raw --from 2025-01-01 --to … --parallel
//!   2` of the pipeline `raw` (`select * from seed003.sales where sold_at >=
//!   {{ date }} and sold_at < {{ next_date }}`) into the `files` sink
//!   `sales_raw` (`partition_by = ["date"]`, zstd, row groups of 131,072)
//!   from a fresh directory and state: rows/s over the command's wall time
//!   (spawn to exit) and its peak RSS. Its summary line must say every day
//!   was written with every row, and the partitions' manifests must count
//!   every row. Against (a) the encoding ceiling, pyarrow writing the same
//!   shape of rows, already in memory, to one Parquet file per day with the
//!   same codec and row groups (`bench/datasets/pyarrow_write.py`, only the
//!   writing timed), one file at a time and two at once; (b) the read
//!   ceiling, `COPY (the same query for a day) TO STDOUT` of every day into
//!   /dev/null, days shared round robin by two `psql` connections (as the
//!   backfill's two at once), as CSV and binary (caudal reads binary).
//! - `dataset-query`: `caudal run` (with `[server]`) on the datasets written
//!   (the last `dataset-write` of the same size, else a backfill made here,
//!   untimed), and the daily per-provider aggregate `daily` → `sales_daily`
//!   (`partition_by = ["provider_id", "date"]`), also written here, untimed.
//!   Per dataset, one JSON line: `GET /api/v1/datasets/NAME/rows?
//!   provider_id=P&date_from=D&date_to=D+30&limit=50000` over one kept-alive
//!   connection with a viewer token: cold, 60 distinct queries (providers
//!   1–20 × three windows), each of which must be a cache miss; cached, the
//!   query of provider 7 over the first 31 days `--queries` times in a row
//!   (default 1,000), each of which must be a hit; p50 and p99 (nearest
//!   rank) of the time from sending a request to its whole body, and
//!   requests/s; and the mean time caudal's handler took for them
//!   (`caudal_dataset_query_seconds` of `/metrics`, which ends before the
//!   body is sent: the rest is moving the body). Against DuckDB answering
//!   the same question from the files the manifests list
//!   (`bench/datasets/duckdb_query.py`, `LIMIT 50000`, into an Arrow table,
//!   after one warm-up run). The page must hold as many rows as
//!   PostgreSQL counts for the question (at most 50,000), and DuckDB's the
//!   same number; the aggregate's `sales` must add up to PostgreSQL's count.
//!
//! The result cache is configured to hold the whole page of 50,000 raw rows
//! (`max_entry_bytes = "256MiB"`; the default, a sixteenth of 64 MiB, is
//! below such a page, which would then never be cached), and the API's rate
//! limit is lifted. Both pipelines have `catch_up = false`: with the
//! default, `caudal run` would write every day from the last one written
//! (in 2025) to yesterday as soon as it starts. It would still write
//! yesterday; the harness writes it first with `caudal once
//! --date` (no rows), so that nothing but the queries runs while they are
//! timed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use jiff::civil::Date;
use serde_json::{Value, json};
use sqlx::{Executor as _, PgPool};

use crate::cdc::{scratch_dir, spawn_caudal, wait_exit};
use crate::process::{Ended, Measured};
use crate::subject::{CAUDAL, Subject};
use crate::sync::{DATABASE, psql, timed};
use crate::{Args, database_url, round};

/// Default rows of the sales table, and days they spread over.
pub const DEFAULT_ROWS: u64 = 10_000_000;
pub const DEFAULT_DAYS: u32 = 100;
/// `provider_id` runs 1..=PROVIDERS.
const PROVIDERS: u32 = 20;
/// The first logical date.
const FIRST_DAY: Date = jiff::civil::date(2025, 1, 1);
/// The sink's row groups and codec, and pyarrow's.
const ROW_GROUP_ROWS: u32 = 131_072;
const COMPRESSION: &str = "zstd";
/// Dates the backfill writes at once (its default), and connections of
/// the COPY reference.
const PARALLEL: usize = 2;
/// The page size asked of the API (its largest), and of DuckDB.
const PAGE_LIMIT: u32 = 50_000;
/// The provider of the cached query, and the days of a query's window.
const PROVIDER: u32 = 7;
const WINDOW_DAYS: i64 = 31;
/// Windows of the cold queries (each for every provider).
const COLD_WINDOWS: i64 = 3;
/// Most DuckDB runs timed per dataset.
const DUCKDB_REPEAT: u32 = 100;
/// The issue's goals: rate over pyarrow's, cached p99.
const GOAL_OVER_PYARROW: f64 = 0.5;
const GOAL_CACHED_P99_MS: f64 = 5.0;
/// How long `caudal run` may take to answer `/readyz`, and a command of
/// the set-up to finish.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);
/// The seed's scripts and the references, relative to the workspace
/// (bench/run's working directory).
const SCHEMA_SQL: &str = "examples/seed-003/schema.sql";
const GENERATE_SQL: &str = "examples/seed-003/generate.sql";
const PYARROW_WRITE: &str = "bench/datasets/pyarrow_write.py";
const DUCKDB_QUERY: &str = "bench/datasets/duckdb_query.py";

/// The raw pipeline's query, and the daily aggregate's.
const RAW_QUERY: &str =
    "select * from seed003.sales where sold_at >= {{ date }} and sold_at < {{ next_date }}";
const DAILY_QUERY: &str = "select provider_id, count(*) as sales, sum(quantity)::bigint as units, \
    sum(amount) as revenue, min(sold_at) as first_sale, max(sold_at) as last_sale \
    from seed003.sales where sold_at >= {{ date }} and sold_at < {{ next_date }} group by provider_id";

/// What this module keeps between its runs in one harness process.
struct Kept {
    rows: u64,
    days: u32,
    /// The scratch directory everything below lives in.
    dir: PathBuf,
    /// Seconds generate.sql took.
    generate_secs: f64,
    /// A directory (configuration, state, data) where `sales_raw` is
    /// completely written, and by which scenario.
    written: Option<(PathBuf, &'static str)>,
    /// Seconds the backfill of `sales_daily` took in `written`, once done.
    daily_secs: Option<f64>,
}

static KEPT: Mutex<Option<Kept>> = Mutex::new(None);

fn kept() -> std::sync::MutexGuard<'static, Option<Kept>> {
    KEPT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops the database and the scratch directory the dataset scenarios kept
/// when dropped (at the harness's exit, also after a failure).
pub struct Cleanup {
    pg_url: String,
}

impl Cleanup {
    pub fn new(pg_url: &str) -> Self {
        Self {
            pg_url: pg_url.to_string(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(kept) = kept().take() {
            let _ = psql(
                &self.pg_url,
                &[&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")],
            )
            .stderr(Stdio::null())
            .status();
            let _ = std::fs::remove_dir_all(&kept.dir);
        }
    }
}

/// `--rows` and `--days`.
fn size(args: &Args) -> anyhow::Result<(u64, u32)> {
    let rows = args.rows.unwrap_or(DEFAULT_ROWS);
    let days = args.days.unwrap_or(DEFAULT_DAYS);
    if rows < u64::from(days) || days == 0 {
        bail!("--rows {rows} over --days {days}: give at least a row a day");
    }
    Ok((rows, days))
}

/// The logical date `n` days after the first.
fn day(n: i64) -> anyhow::Result<Date> {
    Ok(FIRST_DAY.checked_add(jiff::Span::new().days(n))?)
}

/// The sales table at this size, generated now unless it is there: the
/// database's URL and the seconds generating it took.
async fn source(args: &Args, rows: u64, days: u32) -> anyhow::Result<(String, f64)> {
    let url = database_url(&args.pg_url, DATABASE);
    let same = kept()
        .as_ref()
        .filter(|k| k.rows == rows && k.days == days)
        .map(|k| k.generate_secs);
    if let Some(secs) = same
        && generated(&url).await == Some((rows, days))
    {
        eprintln!("datasets: reusing seed003.sales ({rows} rows over {days} days)");
        return Ok((url, secs));
    }
    // A new table: what was written from the old one goes.
    let previous = kept().take();
    let dir = match previous {
        Some(k) => {
            let _ = std::fs::remove_dir_all(&k.dir);
            k.dir
        }
        None => scratch_dir("datasets")?,
    };
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "datasets: generating seed003.sales, {rows} rows over {days} days (examples/seed-003)"
    );
    let started = Instant::now();
    generate(args, &url, rows, days).await?;
    let generate_secs = started.elapsed().as_secs_f64();
    *kept() = Some(Kept {
        rows,
        days,
        dir,
        generate_secs,
        written: None,
        daily_secs: None,
    });
    Ok((url, generate_secs))
}

/// The size the table in `url` was generated at, if it is there.
async fn generated(url: &str) -> Option<(u64, u32)> {
    let db = PgPool::connect(url).await.ok()?;
    let size: Option<(i64, i32)> = sqlx::query_as("SELECT rows, days FROM seed003.bench_generated")
        .fetch_optional(&db)
        .await
        .ok()
        .flatten();
    db.close().await;
    let (rows, days) = size?;
    Some((u64::try_from(rows).ok()?, u32::try_from(days).ok()?))
}

/// Recreates the database and fills it with seed 003's scripts.
async fn generate(args: &Args, url: &str, rows: u64, days: u32) -> anyhow::Result<()> {
    let admin = PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })?;
    for statement in [
        format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {DATABASE}"),
    ] {
        admin
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
            .await?;
    }
    admin.close().await;
    let mut schema = psql(url, &[]);
    schema.args(["-f", SCHEMA_SQL]);
    let mut fill = psql(url, &[]);
    fill.args(["-v", &format!("rows={rows}")])
        .args(["-v", &format!("from={FIRST_DAY}")])
        .args(["-v", &format!("days={days}")])
        .args(["-v", &format!("providers={PROVIDERS}")])
        .args(["-f", GENERATE_SQL]);
    timed(vec![schema]).context(SCHEMA_SQL)?;
    timed(vec![fill]).context(GENERATE_SQL)?;
    let db = PgPool::connect(url).await?;
    db.execute("VACUUM ANALYZE seed003.sales").await?;
    db.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE seed003.bench_generated AS SELECT {rows}::bigint AS rows, {days}::int AS days"
    ))))
    .await?;
    db.close().await;
    Ok(())
}

/// caudal's configuration in `dir`: the source, both datasets and both
/// report pipelines, the cache, and `[server]` on `listen` when given.
fn write_config(dir: &Path, url: &str, listen: Option<SocketAddr>) -> anyhow::Result<PathBuf> {
    let config = dir.join("caudal.toml");
    let server = listen.map_or_else(String::new, |addr| {
        format!("[server]\nlisten = \"{addr}\"\nrequests_per_second = 1000000\n\n")
    });
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

{server}[cache]
ttl = "1h"
max_bytes = "1GiB"
max_entry_bytes = "256MiB"

[sources.sales]
type = "postgres"
url = "{url}"
mode = "query"
query = "{RAW_QUERY}"

[sources.sales_by_provider]
type = "postgres"
url = "{url}"
mode = "query"
query = "{DAILY_QUERY}"

[sinks.sales_raw]
type = "files"
url = "{data}/sales_raw"
partition_by = ["date"]
compression = "{COMPRESSION}"
row_group_rows = {ROW_GROUP_ROWS}

[sinks.sales_daily]
type = "files"
url = "{data}/sales_daily"
partition_by = ["provider_id", "date"]
compression = "{COMPRESSION}"
row_group_rows = {ROW_GROUP_ROWS}

[pipelines.raw]
source = "sales"
sink = "sales_raw"
schedule = {{ cron = "0 2 * * *", catch_up = false }}

[pipelines.daily]
source = "sales_by_provider"
sink = "sales_daily"
schedule = {{ cron = "0 2 * * *", catch_up = false }}
"#,
            state = dir.join("caudal.db").display(),
            data = dir.join("data").display(),
        ),
    )?;
    Ok(config)
}

fn caudal(args: &Args) -> Subject<'_> {
    Subject {
        name: CAUDAL,
        binary: &args.caudal,
    }
}

/// What `caudal backfill` printed and logged.
struct Backfill {
    ended: Ended,
    /// Days written and rows, from its summary line.
    days: u64,
    rows: u64,
    /// Each date's `elapsed_ms`, from its log, sorted.
    date_ms: Vec<f64>,
}

/// `caudal backfill PIPELINE` of every day, measured; it must write every
/// day and fail none.
async fn backfill(args: &Args, dir: &Path, pipeline: &str, days: u32) -> anyhow::Result<Backfill> {
    let config = dir.join("caudal.toml");
    let (from, to) = (FIRST_DAY, day(i64::from(days) - 1)?);
    let caudal = spawn_caudal(
        caudal(args),
        &config,
        dir,
        &[
            "--log-format",
            "json",
            "backfill",
            pipeline,
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
            "--parallel",
            &PARALLEL.to_string(),
        ],
    )?;
    let what = format!("caudal backfill {pipeline}");
    let ended = tokio::time::timeout(COMMAND_TIMEOUT, caudal.wait())
        .await
        .with_context(|| format!("{what} did not finish within {COMMAND_TIMEOUT:?}"))??;
    let log_path = dir.join("caudal.log");
    let log = std::fs::read_to_string(&log_path)?;
    if !ended.status.success() {
        bail!(
            "{what} failed: {} (log: {})",
            ended.status,
            log_path.display()
        );
    }
    // "raw: backfill 2025-01-01 to 2025-04-10: 100 days written, 0 failed, N rows, B bytes"
    let prefix = format!("{pipeline}: backfill ");
    let summary = log
        .lines()
        .rev()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("{what} printed no summary (log: {})", log_path.display()))?;
    let number_before = |word: &str| -> Option<u64> {
        let words: Vec<&str> = summary
            .split([' ', ','])
            .filter(|w| !w.is_empty())
            .collect();
        let i = words.iter().position(|w| *w == word)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let (Some(written), Some(failed), Some(rows)) = (
        number_before("days"),
        number_before("failed"),
        number_before("rows"),
    ) else {
        bail!("{what}: cannot read its summary {summary:?}");
    };
    if written != u64::from(days) || failed != 0 {
        bail!("{what}: {summary} (log: {})", log_path.display());
    }
    let mut date_ms: Vec<f64> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "date written" && v["pipeline"] == pipeline)
        .filter_map(|v| v["elapsed_ms"].as_f64())
        .collect();
    date_ms.sort_by(f64::total_cmp);
    Ok(Backfill {
        ended,
        days: written,
        rows,
        date_ms,
    })
}

/// A dataset's partitions as their manifests describe them.
struct Manifests {
    partitions: usize,
    rows: u64,
    bytes: u64,
    /// Every data file the manifests name.
    files: Vec<PathBuf>,
}

/// Reads every `_manifest.json` under `root`.
fn manifests(root: &Path) -> anyhow::Result<Manifests> {
    let mut found = Manifests {
        partitions: 0,
        rows: 0,
        bytes: 0,
        files: Vec::new(),
    };
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("no {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.file_name().is_none_or(|n| n != "_manifest.json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let m: Value = serde_json::from_str(&text)
                .with_context(|| format!("the manifest {}", path.display()))?;
            let field = |v: &Value, k: &str| {
                v[k].as_u64()
                    .with_context(|| format!("no {k} in {}", path.display()))
            };
            found.partitions += 1;
            found.rows += field(&m, "rows")?;
            found.bytes += field(&m, "bytes")?;
            for file in m["files"].as_array().into_iter().flatten() {
                let name = file["path"]
                    .as_str()
                    .with_context(|| format!("a file without path in {}", path.display()))?;
                found.files.push(dir.join(name));
            }
        }
    }
    found.files.sort();
    Ok(found)
}

/// The COPY reference: every day's query into /dev/null, days shared
/// round robin by [`PARALLEL`] `psql` connections; seconds.
fn copy_days(url: &str, days: u32, format: &str) -> anyhow::Result<f64> {
    let mut each = vec![Vec::new(); PARALLEL];
    for d in 0..days {
        let date = day(i64::from(d))?;
        each[d as usize % PARALLEL].push(format!(
            "COPY (select * from seed003.sales where sold_at >= '{date}' and sold_at < '{}') \
             TO STDOUT (FORMAT {format})",
            date.tomorrow()?
        ));
    }
    timed(
        each.iter()
            .filter(|c| !c.is_empty())
            .map(|c| psql(url, &c.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect(),
    )
}

/// pyarrow writing the same shape of rows with `threads` files at once:
/// its JSON line and peak RSS.
async fn pyarrow(
    args: &Args,
    dir: &Path,
    (rows, days): (u64, u32),
    threads: usize,
) -> anyhow::Result<(Value, f64)> {
    let out = dir.join(format!("pyarrow-{threads}"));
    let stdout = dir.join(format!("pyarrow-{threads}.json"));
    let mut cmd = Command::new(&args.python);
    cmd.arg(PYARROW_WRITE)
        .args(["--rows", &rows.to_string()])
        .args(["--days", &days.to_string()])
        .args(["--providers", &PROVIDERS.to_string()])
        .args(["--from", &FIRST_DAY.to_string()])
        .args(["--compression", COMPRESSION])
        .args(["--threads", &threads.to_string()])
        .arg("--out")
        .arg(&out)
        .stdout(std::fs::File::create(&stdout)?);
    let ended = Measured::spawn(cmd)?.wait().await?;
    let _ = std::fs::remove_dir_all(&out);
    if !ended.status.success() {
        bail!(
            "{} {PYARROW_WRITE} failed ({}; bench/run installs pyarrow into target/bench-venv)",
            args.python.display(),
            ended.status
        );
    }
    let line: Value = serde_json::from_str(std::fs::read_to_string(&stdout)?.trim())
        .with_context(|| format!("{PYARROW_WRITE} printed no JSON line"))?;
    if line["rows"].as_u64() != Some(rows) || line["seconds"].as_f64().is_none_or(|s| s <= 0.0) {
        bail!("{PYARROW_WRITE}: {line}");
    }
    Ok((line, ended.peak_rss_mib))
}

pub async fn write(args: &Args) -> anyhow::Result<Value> {
    let (rows, days) = size(args)?;
    let (url, generate_secs) = source(args, rows, days).await?;
    let root = kept()
        .as_ref()
        .map(|k| k.dir.clone())
        .context("no scratch directory")?;
    let dir = root.join(format!("write-{}", args.run));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    eprintln!(
        "dataset-write: COPY of each day to /dev/null on {PARALLEL} connections (csv, binary)"
    );
    let copy_csv = copy_days(&url, days, "csv")?;
    let copy_binary = copy_days(&url, days, "binary")?;

    eprintln!("dataset-write: caudal backfill raw, {days} days, {PARALLEL} at once");
    write_config(&dir, &url, None)?;
    let caudal = backfill(args, &dir, "raw", days).await?;
    let found = manifests(&dir.join("data/sales_raw"))?;
    if caudal.rows != rows || found.rows != rows {
        bail!(
            "caudal backfill wrote {} rows by its summary and {} by the manifests; the table has {rows}",
            caudal.rows,
            found.rows
        );
    }

    eprintln!("dataset-write: pyarrow writing the same shape, 1 and {PARALLEL} files at once");
    let (py, py_rss) = pyarrow(args, &dir, (rows, days), 1).await?;
    let (py_parallel, _) = pyarrow(args, &dir, (rows, days), PARALLEL).await?;

    // What dataset-query reads: the newest complete write.
    {
        let mut state = kept();
        let k = state.as_mut().context("no kept state")?;
        if let Some((old, _)) = k.written.replace((dir.clone(), "dataset-write")) {
            let _ = std::fs::remove_dir_all(old);
        }
        k.daily_secs = None;
    }

    let rate = rows as f64 / caudal.ended.secs;
    let py_rate = rows as f64 / py["seconds"].as_f64().unwrap_or(f64::NAN);
    let py_parallel_rate = rows as f64 / py_parallel["seconds"].as_f64().unwrap_or(f64::NAN);
    let ms = |p: f64| percentile(&caudal.date_ms, p).map(round);
    Ok(json!({
        "scenario": "dataset_write",
        "rows": rows,
        "days": days,
        "providers": PROVIDERS,
        "parallel": PARALLEL,
        "compression": COMPRESSION,
        "row_group_rows": ROW_GROUP_ROWS,
        "generate_secs": round(generate_secs),
        "caudal_secs": round(caudal.ended.secs),
        "caudal_rows_per_s": round(rate),
        "caudal_peak_rss_mib": round(caudal.ended.peak_rss_mib),
        "caudal_days_written": caudal.days,
        "caudal_partitions": found.partitions,
        "caudal_files": found.files.len(),
        "caudal_bytes": found.bytes,
        "caudal_date_ms_p50": ms(0.5),
        "caudal_date_ms_max": ms(1.0),
        "caudal_date_ms_sum": round(caudal.date_ms.iter().sum()),
        "pyarrow_secs": py["seconds"],
        "pyarrow_rows_per_s": round(py_rate),
        "pyarrow_bytes": py["bytes"],
        "pyarrow_peak_rss_mib": round(py_rss),
        "pyarrow_parallel_secs": py_parallel["seconds"],
        "pyarrow_parallel_rows_per_s": round(py_parallel_rate),
        "copy_csv_secs": round(copy_csv),
        "copy_csv_rows_per_s": round(rows as f64 / copy_csv),
        "copy_binary_secs": round(copy_binary),
        "copy_binary_rows_per_s": round(rows as f64 / copy_binary),
        "caudal_over_pyarrow": round(rate / py_rate),
        "caudal_over_pyarrow_parallel": round(rate / py_parallel_rate),
        "caudal_over_copy": round(copy_csv / caudal.ended.secs),
        "caudal_over_copy_binary": round(copy_binary / caudal.ended.secs),
        "pyarrow_bytes_over_caudal": round(py["bytes"].as_f64().unwrap_or(f64::NAN) / found.bytes as f64),
        "goal_over_pyarrow": GOAL_OVER_PYARROW,
    }))
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// One HTTP/1.1 connection to caudal's API, kept alive, with a token.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
    token: String,
}

/// An answer, read whole.
struct Answer {
    status: hyper::StatusCode,
    /// `X-Cache`.
    cache: Option<String>,
    body: Bytes,
    /// From sending the request to the body's end.
    ms: f64,
}

impl Client {
    async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            host: addr.to_string(),
            token: token.to_string(),
        })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Empty::new())?;
        self.sender.ready().await?;
        let started = Instant::now();
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            cache,
            body,
            ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

/// Waits until `caudal run` answers `/readyz` with 200.
async fn wait_ready(caudal: &Measured, addr: SocketAddr, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(mut client) = Client::connect(addr, "").await
            && let Ok(answer) = client.get("/readyz").await
            && answer.status.is_success()
        {
            return Ok(());
        }
        if caudal.has_exited() || started.elapsed() > READY_TIMEOUT {
            bail!(
                "caudal run was not ready within {} s (log: {})",
                READY_TIMEOUT.as_secs(),
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `caudal SUBCOMMAND…` to its end; it must succeed. Its stdout.
fn caudal_command(args: &Args, config: &Path, subcommand: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&args.caudal)
        .arg("-c")
        .arg(config)
        .args(subcommand)
        .env("CAUDAL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args.caudal.display()))?;
    if !out.status.success() {
        bail!(
            "caudal {} failed ({}): {}",
            subcommand.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The path of a row query of `dataset`.
fn rows_path(dataset: &str, provider: u32, from: Date) -> anyhow::Result<String> {
    let to = from.checked_add(jiff::Span::new().days(WINDOW_DAYS - 1))?;
    Ok(format!(
        "/api/v1/datasets/{dataset}/rows?provider_id={provider}&date_from={from}&date_to={to}&limit={PAGE_LIMIT}"
    ))
}

/// p50, p99 and requests/s of answers timed one after the other.
fn latencies(ms: &mut [f64], secs: f64) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    (
        percentile(ms, 0.5).unwrap_or(f64::NAN),
        percentile(ms, 0.99).unwrap_or(f64::NAN),
        ms.len() as f64 / secs,
    )
}

/// Fails unless `answer` is a 200 with `X-Cache: cache`.
fn check(answer: &Answer, path: &str, cache: &str) -> anyhow::Result<()> {
    if !answer.status.is_success() {
        bail!(
            "GET {path}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    if answer.cache.as_deref() != Some(cache) {
        bail!(
            "GET {path}: X-Cache {:?}, expected {cache:?}",
            answer.cache.as_deref().unwrap_or("(none)")
        );
    }
    Ok(())
}

/// What PostgreSQL says the cached question's answer is: its rows (for
/// `sales_raw`, at most a page) and sales (for `sales_daily`, a row per
/// day with sales, whose `sales` add up to the raw count).
async fn expected(url: &str, dataset: &str, from: Date) -> anyhow::Result<(u64, u64)> {
    let to = from.checked_add(jiff::Span::new().days(WINDOW_DAYS))?;
    let db = PgPool::connect(url).await?;
    let (sales, days): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (sold_at AT TIME ZONE 'UTC')::date) FROM seed003.sales
         WHERE provider_id = $1 AND sold_at >= $2::date AT TIME ZONE 'UTC'
           AND sold_at < $3::date AT TIME ZONE 'UTC'",
    )
    .bind(i32::try_from(PROVIDER)?)
    .bind(from.to_string())
    .bind(to.to_string())
    .fetch_one(&db)
    .await?;
    db.close().await;
    let (sales, days) = (u64::try_from(sales)?, u64::try_from(days)?);
    Ok(match dataset {
        "sales_raw" => (sales.min(u64::from(PAGE_LIMIT)), sales),
        _ => (days, sales),
    })
}

/// Rows of a page, and the sum of their `sales` (numbers or strings).
fn page_rows(body: &[u8]) -> anyhow::Result<(u64, u64)> {
    let page: Value = serde_json::from_slice(body).context("a page of rows")?;
    let rows = page["rows"].as_array().context("a page without rows")?;
    let sales = rows
        .iter()
        .filter_map(|r| match &r["sales"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .sum();
    Ok((rows.len() as u64, sales))
}

/// The mean time caudal's handler took for `dataset`'s row queries so
/// far, cache hits and misses (`caudal_dataset_query_seconds` of
/// `/metrics`: from the handler's start to the response handed to the
/// server, before its body is sent), in ms.
async fn handler_ms(
    client: &mut Client,
    dataset: &str,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let answer = client.get("/metrics").await?;
    if !answer.status.is_success() {
        bail!("GET /metrics: {}", answer.status);
    }
    let text = String::from_utf8_lossy(&answer.body);
    let value = |series: &str, cache: &str| -> Option<f64> {
        let labels = format!("{{dataset=\"{dataset}\",cache=\"{cache}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(labels.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    let mean = |cache: &str| {
        let sum = value("caudal_dataset_query_seconds_sum", cache)?;
        let count = value("caudal_dataset_query_seconds_count", cache)?;
        (count > 0.0).then(|| sum / count * 1000.0)
    };
    Ok((mean("hit"), mean("miss")))
}

/// DuckDB (bench/datasets/duckdb_query.py) on `files`: its JSON line.
fn duckdb(
    args: &Args,
    dir: &Path,
    dataset: &str,
    files: &[PathBuf],
    from: Date,
) -> anyhow::Result<Value> {
    let list = dir.join(format!("{dataset}.files"));
    let mut text = String::new();
    for f in files {
        text.push_str(&f.display().to_string());
        text.push('\n');
    }
    std::fs::write(&list, text)?;
    let to = from.checked_add(jiff::Span::new().days(WINDOW_DAYS - 1))?;
    let repeat = args.queries.clamp(1, DUCKDB_REPEAT);
    let out = Command::new(&args.python)
        .arg(DUCKDB_QUERY)
        .arg("--files-list")
        .arg(&list)
        .args(["--provider", &PROVIDER.to_string()])
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .args(["--limit", &PAGE_LIMIT.to_string()])
        .args(["--repeat", &repeat.to_string(), "--warmup", "1"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args.python.display()))?;
    if !out.status.success() {
        bail!(
            "{DUCKDB_QUERY} failed ({}; bench/run installs DuckDB into target/bench-venv): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{DUCKDB_QUERY} printed no JSON line"))?;
    Ok(line)
}

/// The datasets written for `dataset-query`: the directory, which scenario
/// wrote `sales_raw`, and the seconds `sales_daily`'s backfill took.
async fn written(
    args: &Args,
    url: &str,
    days: u32,
) -> anyhow::Result<(PathBuf, &'static str, f64)> {
    let (root, written, daily) = {
        let kept = kept();
        let k = kept.as_ref().context("no kept state")?;
        (k.dir.clone(), k.written.clone(), k.daily_secs)
    };
    let (dir, by) = match written {
        Some(w) => w,
        None => {
            let dir = root.join("query");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            write_config(&dir, url, None)?;
            eprintln!("dataset-query: writing sales_raw first (caudal backfill raw, untimed)");
            backfill(args, &dir, "raw", days).await?;
            let w = (dir, "dataset-query");
            if let Some(k) = kept().as_mut() {
                k.written = Some(w.clone());
                k.daily_secs = None;
            }
            w
        }
    };
    let daily = match daily {
        Some(secs) => secs,
        None => {
            eprintln!("dataset-query: writing sales_daily (caudal backfill daily, untimed)");
            write_config(&dir, url, None)?;
            let secs = backfill(args, &dir, "daily", days).await?.ended.secs;
            if let Some(k) = kept().as_mut() {
                k.daily_secs = Some(secs);
            }
            secs
        }
    };
    Ok((dir, by, daily))
}

pub async fn query(args: &Args) -> anyhow::Result<Vec<Value>> {
    let (rows, days) = size(args)?;
    let (url, _) = source(args, rows, days).await?;
    let (dir, written_by, daily_secs) = written(args, &url, days).await?;

    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let config = write_config(&dir, &url, Some(addr))?;
    // caudal run writes the last complete day at start when it is not
    // written (a report catches up): write it now, so nothing else runs
    // while the queries are timed.
    let yesterday = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .yesterday()?
        .to_string();
    for pipeline in ["raw", "daily"] {
        caudal_command(args, &config, &["once", pipeline, "--date", &yesterday])?;
    }
    let token_out = caudal_command(
        args,
        &config,
        &[
            "token",
            "create",
            "--name",
            &format!("bench-{}", args.run),
            "--role",
            "viewer",
        ],
    )?;
    let token = token_out
        .lines()
        .last()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .context("caudal token create printed no token")?
        .to_string();

    eprintln!("dataset-query: caudal run, the API on {addr}");
    let caudal = spawn_caudal(caudal(args), &config, &dir, &["run"])?;
    wait_ready(&caudal, addr, &dir).await?;
    let mut lines = Vec::new();
    for dataset in ["sales_raw", "sales_daily"] {
        let figures = measure(args, &url, &dir, addr, &token, dataset).await;
        match figures {
            Ok(line) => lines.push(line),
            Err(e) => {
                caudal.terminate()?;
                let _ = wait_exit(caudal, &dir, "caudal run").await;
                return Err(e);
            }
        }
    }
    caudal.terminate()?;
    let ended = wait_exit(caudal, &dir, "caudal run").await?;
    for line in &mut lines {
        crate::subject::extend(
            line,
            json!({
                "rows": rows,
                "days": days,
                "written_by": written_by,
                "caudal_peak_rss_mib": round(ended.peak_rss_mib),
            }),
        );
    }
    if let Some(daily) = lines.get_mut(1) {
        crate::subject::extend(daily, json!({ "backfill_secs": round(daily_secs) }));
    }
    Ok(lines)
}

/// The cold and cached queries of `dataset`, and DuckDB's.
async fn measure(
    args: &Args,
    url: &str,
    dir: &Path,
    addr: SocketAddr,
    token: &str,
    dataset: &str,
) -> anyhow::Result<Value> {
    let (_, days) = size(args)?;
    let found = manifests(&dir.join("data").join(dataset))?;
    let step = ((i64::from(days) - WINDOW_DAYS) / COLD_WINDOWS).max(1);
    let mut client = Client::connect(addr, token).await?;

    // Cold: every query asked for the first time.
    let mut cold = Vec::new();
    let mut cold_bytes = 0;
    let started = Instant::now();
    for w in 0..COLD_WINDOWS {
        for provider in 1..=PROVIDERS {
            let path = rows_path(dataset, provider, day(w * step)?)?;
            let answer = client.get(&path).await?;
            check(&answer, &path, "miss")?;
            cold_bytes += answer.body.len();
            cold.push(answer.ms);
        }
    }
    let cold_secs = started.elapsed().as_secs_f64();
    let cold_queries = cold.len();
    let (cold_p50, cold_p99, cold_qps) = latencies(&mut cold, cold_secs);

    // Cached: the same query again and again; it was asked above.
    let path = rows_path(dataset, PROVIDER, FIRST_DAY)?;
    let first = client.get(&path).await?;
    check(&first, &path, "hit")?;
    let (page_rows, page_sales) = page_rows(&first.body)?;
    let (want_rows, want_sales) = expected(url, dataset, FIRST_DAY).await?;
    if page_rows != want_rows || (dataset == "sales_daily" && page_sales != want_sales) {
        bail!(
            "GET {path}: {page_rows} rows (sales {page_sales}); PostgreSQL: {want_rows} rows (sales {want_sales})"
        );
    }
    let mut cached = Vec::with_capacity(args.queries as usize);
    let started = Instant::now();
    for _ in 0..args.queries.max(1) {
        let answer = client.get(&path).await?;
        check(&answer, &path, "hit")?;
        if answer.body.len() != first.body.len() {
            bail!(
                "GET {path}: a cached answer of {} bytes, then {}",
                first.body.len(),
                answer.body.len()
            );
        }
        cached.push(answer.ms);
    }
    let cached_secs = started.elapsed().as_secs_f64();
    let cached_queries = cached.len();
    let (cached_p50, cached_p99, cached_qps) = latencies(&mut cached, cached_secs);

    let (server_hit_ms, server_miss_ms) = handler_ms(&mut client, dataset).await?;

    eprintln!(
        "dataset-query: DuckDB on {dataset}'s {} files",
        found.files.len()
    );
    let duck = duckdb(args, dir, dataset, &found.files, FIRST_DAY)?;
    if duck["rows"].as_u64() != Some(want_rows) {
        bail!(
            "DuckDB answered {} rows, PostgreSQL {want_rows}: {duck}",
            duck["rows"]
        );
    }
    let duck_ms = |k: &str| duck[k].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "scenario": "dataset_query",
        "dataset": dataset,
        "partitions": found.partitions,
        "files": found.files.len(),
        "provider_id": PROVIDER,
        "window_days": WINDOW_DAYS,
        "limit": PAGE_LIMIT,
        "page_rows": page_rows,
        "page_bytes": first.body.len(),
        "cold_queries": cold_queries,
        "cold_mean_bytes": cold_bytes / cold_queries.max(1),
        "cold_p50_ms": round(cold_p50),
        "cold_p99_ms": round(cold_p99),
        "cold_requests_per_s": round(cold_qps),
        "cached_queries": cached_queries,
        "cached_p50_ms": round(cached_p50),
        "cached_p99_ms": round(cached_p99),
        "cached_requests_per_s": round(cached_qps),
        "server_hit_mean_ms": server_hit_ms.map(round),
        "server_miss_mean_ms": server_miss_ms.map(round),
        "duckdb_runs": args.queries.clamp(1, DUCKDB_REPEAT),
        "duckdb_p50_ms": round(duck_ms("p50_ms")),
        "duckdb_p99_ms": round(duck_ms("p99_ms")),
        "duckdb_queries_per_s": round(duck_ms("qps")),
        "duckdb_over_caudal_cold_p50": round(duck_ms("p50_ms") / cold_p50),
        "duckdb_over_caudal_cached_p50": round(duck_ms("p50_ms") / cached_p50),
        "duckdb_over_caudal_cached_p99": round(duck_ms("p99_ms") / cached_p99),
        "goal_cached_p99_ms": GOAL_CACHED_P99_MS,
    }))
}
