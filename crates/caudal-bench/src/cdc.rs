//! The PostgreSQL CDC scenarios.
//!
//! Both write the same kind of workload to a table `bench_changes (id
//! bigint primary key, account int, amount numeric, note text)` in a
//! database `caudal_bench` that they create and drop: transactions of
//! `txn_rows` changes each, in cycles of ten, eight multi-row INSERTs, one
//! UPDATE of the rows of the cycle's first insert and one DELETE of the rows
//! of its second (80% inserts, 10% updates, 10% deletes).
//!
//! - `cdc-throughput`: both slots (caudal's and the reference's, both
//!   `pgoutput` on the same publication) are created before the workload,
//!   the workload is written while nothing consumes, then each consumer
//!   drains the same backlog: `caudal once` until the receiver has counted
//!   every change, and `pg_recvlogical` (with caudal's pgoutput options,
//!   into /dev/null) until it has received the log up to a marker message
//!   written right after the workload (`--endpos`, so it exits there).
//! - `cdc-latency`: `caudal run` streams while a load generator commits at
//!   a steady rate; the receiver times every record from its commit time to
//!   its arrival.
//!
//! Each scenario drops its replication slots and its database at the end,
//! also when it fails: a forgotten slot keeps the server's WAL forever.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::{Executor as _, PgPool};

use crate::process::Measured;
use crate::receiver::{self, Receiver};
use crate::{Args, database_url, round};

/// The database the scenarios create and drop.
const DB: &str = "caudal_bench";
/// The publication both consumers read.
const PUBLICATION: &str = "caudal_bench_pub";
/// caudal's slot.
const CAUDAL_SLOT: &str = "caudal_bench_slot";
/// pg_recvlogical's slot (`cdc-throughput`).
const REFERENCE_SLOT: &str = "caudal_bench_ref";
/// Default changes written by `cdc-throughput`.
pub const DEFAULT_THROUGHPUT_CHANGES: u64 = 500_000;
/// Changes per transaction in `cdc-throughput`.
const THROUGHPUT_TXN_ROWS: u64 = 1000;
/// Default time a partial batch waits in `cdc-throughput`: the backlog
/// fills every batch, so it only matters for the last one.
pub const DEFAULT_THROUGHPUT_MAX_WAIT_MS: u64 = 50;
/// Default time a partial batch waits in `cdc-latency`.
pub const DEFAULT_LATENCY_MAX_WAIT_MS: u64 = 20;
/// Load generated in `cdc-latency` before latencies count: connections,
/// the relation message and the first batches are not the steady state.
const LATENCY_WARMUP: Duration = Duration::from_secs(2);
/// Longest wait for progress (a change delivered, a slot active) before a
/// scenario gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The caudal pgoutput options (see the CDC reader), given to
/// pg_recvlogical too so both decode the same stream.
fn pgoutput_options() -> [String; 4] {
    [
        "proto_version=1".into(),
        format!("publication_names={PUBLICATION}"),
        "binary=true".into(),
        "messages=true".into(),
    ]
}

const CREATE_TABLE: &str = "CREATE TABLE bench_changes (
    id BIGINT PRIMARY KEY,
    account INT NOT NULL,
    amount NUMERIC(12, 2) NOT NULL,
    note TEXT NOT NULL)";
const INSERT: &str = "INSERT INTO bench_changes (id, account, amount, note)
    SELECT g, (g % 1000)::int, (g % 100000) / 100.0, 'payment ' || md5(g::text)
    FROM generate_series($1::int8, $2::int8) g";
const UPDATE: &str = "UPDATE bench_changes SET amount = amount + 1, note = note || ' (corrected)'
    WHERE id BETWEEN $1 AND $2";
const DELETE: &str = "DELETE FROM bench_changes WHERE id BETWEEN $1 AND $2";

/// The write workload: transaction `k` of a sequence, each of `txn_rows`
/// changes (the last one may be shorter).
#[derive(Clone, Copy, Debug)]
struct Workload {
    txn_rows: u64,
}

/// Changes committed so far, by kind.
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    inserts: u64,
    updates: u64,
    deletes: u64,
}

impl Written {
    fn total(self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
}

impl Workload {
    /// Commits transaction `k` (one statement, autocommit) of `rows` changes.
    async fn commit(
        self,
        db: &PgPool,
        k: u64,
        rows: u64,
        written: &mut Written,
    ) -> anyhow::Result<()> {
        let (cycle, step) = (k / 10, k % 10);
        // Insert number `cycle * 8 + step` holds ids from `batch * txn_rows + 1`;
        // the update and the delete rewrite the cycle's first two inserts,
        // which are earlier and full.
        let (sql, batch) = match step {
            0..=7 => (INSERT, cycle * 8 + step),
            8 => (UPDATE, cycle * 8),
            _ => (DELETE, cycle * 8 + 1),
        };
        let lo = i64::try_from(batch * self.txn_rows + 1)?;
        let hi = lo + i64::try_from(rows)? - 1;
        let done = sqlx::query(sql).bind(lo).bind(hi).execute(db).await?;
        if done.rows_affected() != rows {
            bail!(
                "workload transaction {k} changed {} rows, expected {rows}",
                done.rows_affected()
            );
        }
        match step {
            0..=7 => written.inserts += rows,
            8 => written.updates += rows,
            _ => written.deletes += rows,
        }
        Ok(())
    }
}

/// Runs `cdc-throughput`, then drops what it created.
pub async fn throughput(args: &Args) -> anyhow::Result<()> {
    let admin = connect_admin(args).await?;
    let result = throughput_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and(cleaned)
}

async fn throughput_run(args: &Args, admin: &PgPool) -> anyhow::Result<()> {
    let changes = args.rows.unwrap_or(DEFAULT_THROUGHPUT_CHANGES);
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_THROUGHPUT_MAX_WAIT_MS);
    let (url, db) = provision(args, admin).await?;
    let start_lsn = create_slot(&db, CAUDAL_SLOT).await?;
    create_slot(&db, REFERENCE_SLOT).await?;

    eprintln!("cdc-throughput: writing {changes} changes while nothing consumes");
    let workload = Workload {
        txn_rows: THROUGHPUT_TXN_ROWS,
    };
    let mut written = Written::default();
    let started = Instant::now();
    let mut k = 0;
    while written.total() < changes {
        let rows = (changes - written.total()).min(THROUGHPUT_TXN_ROWS);
        workload.commit(&db, k, rows, &mut written).await?;
        k += 1;
    }
    let workload_secs = started.elapsed().as_secs_f64();
    // The end of the backlog both consumers drain: a message right after the
    // last commit (pgoutput sends it with `messages=true`).
    let (end_lsn,): (String,) =
        sqlx::query_as("SELECT pg_logical_emit_message(false, 'caudal_bench_end', '')::text")
            .fetch_one(&db)
            .await?;
    let (wal_bytes,): (f64,) =
        sqlx::query_as("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8")
            .bind(&end_lsn)
            .bind(&start_lsn)
            .fetch_one(&db)
            .await?;
    db.close().await;

    let receiver = receiver::start().await?;
    let dir = scratch_dir("cdc-throughput")?;
    let config = write_config(&dir, &url, receiver.addr, args, max_wait_ms)?;
    eprintln!(
        "cdc-throughput: caudal once (log: {})",
        dir.join("caudal.log").display()
    );
    let caudal = Measured::spawn(caudal_command(args, &config, &dir, &["once", "bench"])?)
        .with_context(|| {
            format!(
                "cannot run {} (build it: cargo build --release -p caudal)",
                args.caudal.display()
            )
        })?;
    let caudal_secs = wait_for_records(&receiver, changes, &caudal, &dir).await?;
    let ended = wait_exit(caudal, &dir, "caudal once").await?;
    let delivered = receiver.records();
    if delivered != changes {
        bail!(
            "the receiver got {delivered} changes, {changes} were written (log: {})",
            dir.join("caudal.log").display()
        );
    }

    eprintln!("cdc-throughput: pg_recvlogical reference");
    let mut recv = Command::new(&args.pg_recvlogical);
    recv.arg("-d")
        .arg(&url)
        .args([
            "--slot",
            REFERENCE_SLOT,
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .arg(format!("--endpos={end_lsn}"));
    for option in pgoutput_options() {
        recv.arg("-o").arg(option);
    }
    let recv = Measured::spawn(recv).context(
        "the reference needs pg_recvlogical (it ships with PostgreSQL; --pg-recvlogical names it)",
    )?;
    let reference = recv.wait().await?;
    if !reference.status.success() {
        bail!("pg_recvlogical failed: {}", reference.status);
    }
    // It confirms the flush of what it wrote before it exits at --endpos.
    let (drained,): (bool,) = sqlx::query_as(
        "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false)
         FROM pg_replication_slots WHERE slot_name = $2",
    )
    .bind(&end_lsn)
    .bind(REFERENCE_SLOT)
    .fetch_one(admin)
    .await?;
    if !drained {
        bail!("pg_recvlogical exited before its slot was confirmed up to {end_lsn}");
    }

    let n = changes as f64;
    println!(
        "{}",
        json!({
            "scenario": "cdc_throughput",
            "changes": changes,
            "inserts": written.inserts,
            "updates": written.updates,
            "deletes": written.deletes,
            "txn_rows": THROUGHPUT_TXN_ROWS,
            "wal_mib": round(wal_bytes / (1024.0 * 1024.0)),
            "workload_secs": round(workload_secs),
            "batch": args.batch,
            "max_wait_ms": max_wait_ms,
            "concurrency": args.concurrency,
            "page_size": args.page_size,
            "requests": receiver.requests(),
            "caudal_secs": round(caudal_secs),
            "caudal_changes_per_s": round(n / caudal_secs),
            "caudal_exit_secs": round(ended.secs),
            "recvlogical_secs": round(reference.secs),
            "recvlogical_changes_per_s": round(n / reference.secs),
            "caudal_over_recvlogical": round(reference.secs / caudal_secs),
            "caudal_peak_rss_mib": round(ended.peak_rss_mib),
            "recvlogical_peak_rss_mib": round(reference.peak_rss_mib),
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs `cdc-latency`, then drops what it created.
pub async fn latency(args: &Args) -> anyhow::Result<()> {
    let admin = connect_admin(args).await?;
    let result = latency_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and(cleaned)
}

async fn latency_run(args: &Args, admin: &PgPool) -> anyhow::Result<()> {
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_LATENCY_MAX_WAIT_MS);
    if args.rate == 0 || args.txn_rows == 0 {
        bail!("--rate and --txn-rows must be above 0");
    }
    let (url, db) = provision(args, admin).await?;
    // Created up front so caudal streams from before the first change.
    create_slot(&db, CAUDAL_SLOT).await?;

    let receiver = receiver::start_with_latency().await?;
    let dir = scratch_dir("cdc-latency")?;
    let config = write_config(&dir, &url, receiver.addr, args, max_wait_ms)?;
    eprintln!(
        "cdc-latency: caudal run (log: {})",
        dir.join("caudal.log").display()
    );
    let caudal =
        Measured::spawn(caudal_command(args, &config, &dir, &["run"])?).with_context(|| {
            format!(
                "cannot run {} (build it: cargo build --release -p caudal)",
                args.caudal.display()
            )
        })?;
    wait_streaming(admin, &caudal, &dir).await?;

    let period = Duration::from_secs_f64(args.txn_rows as f64 / args.rate as f64);
    let duration = Duration::from_secs(args.duration);
    eprintln!(
        "cdc-latency: {} changes/s ({} transactions/s of {}) for {} s after {} s of warm-up",
        args.rate,
        round(1.0 / period.as_secs_f64()),
        args.txn_rows,
        args.duration,
        LATENCY_WARMUP.as_secs()
    );
    let workload = Workload {
        txn_rows: args.txn_rows,
    };
    let mut written = Written::default();
    let mut tick = tokio::time::interval(period);
    let started = Instant::now();
    let measure_from_us = receiver::now_us() + i64::try_from(LATENCY_WARMUP.as_micros())?;
    let mut measured_from = None;
    let mut k = 0;
    while started.elapsed() < LATENCY_WARMUP + duration {
        tick.tick().await;
        if measured_from.is_none() && started.elapsed() >= LATENCY_WARMUP {
            measured_from = Some((Instant::now(), written.total()));
        }
        workload.commit(&db, k, args.txn_rows, &mut written).await?;
        k += 1;
        if caudal.has_exited() {
            let ended = caudal.wait().await?;
            bail!(
                "caudal run exited ({}) while the load ran (log: {})",
                ended.status,
                dir.join("caudal.log").display()
            );
        }
    }
    let (window_start, before_window) = measured_from.unwrap_or((started, 0));
    let window_secs = window_start.elapsed().as_secs_f64();
    let achieved = (written.total() - before_window) as f64 / window_secs;
    db.close().await;

    wait_for_records(&receiver, written.total(), &caudal, &dir).await?;
    caudal.terminate()?;
    let ended = wait_exit(caudal, &dir, "caudal run").await?;

    let arrivals = receiver.arrivals();
    let mut latencies_us: Vec<i64> = arrivals
        .iter()
        .filter(|a| a.commit_us >= measure_from_us)
        .map(|a| a.arrived_us - a.commit_us)
        .collect();
    latencies_us.sort_unstable();
    if latencies_us.is_empty() {
        bail!("no change committed after the warm-up arrived with a readable commit_time");
    }
    let ms = |p: f64| round(percentile(&latencies_us, p) as f64 / 1000.0);
    println!(
        "{}",
        json!({
            "scenario": "cdc_latency",
            "target_changes_per_s": args.rate,
            "txn_rows": args.txn_rows,
            "warmup_secs": LATENCY_WARMUP.as_secs(),
            "duration_secs": args.duration,
            "achieved_changes_per_s": round(achieved),
            "committed": written.total(),
            "delivered": receiver.records(),
            "timed": latencies_us.len(),
            "batch": args.batch,
            "max_wait_ms": max_wait_ms,
            "concurrency": args.concurrency,
            "page_size": args.page_size,
            "requests": receiver.requests(),
            "p50_ms": ms(0.50),
            "p95_ms": ms(0.95),
            "p99_ms": ms(0.99),
            "max_ms": ms(1.0),
            "caudal_peak_rss_mib": round(ended.peak_rss_mib),
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of sorted values.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn connect_admin(args: &Args) -> anyhow::Result<PgPool> {
    PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })
}

/// Recreates the database with the table and the publication; returns its
/// URL and a pool on it.
async fn provision(args: &Args, admin: &PgPool) -> anyhow::Result<(String, PgPool)> {
    let (wal_level,): (String,) = sqlx::query_as("SHOW wal_level").fetch_one(admin).await?;
    if wal_level != "logical" {
        bail!("wal_level is {wal_level}, CDC needs logical (run scripts/test --services-only)");
    }
    teardown(admin).await?;
    admin.execute("CREATE DATABASE caudal_bench").await?;
    let url = database_url(&args.pg_url, DB);
    let db = PgPool::connect(&url).await?;
    db.execute(CREATE_TABLE).await?;
    db.execute("CREATE PUBLICATION caudal_bench_pub FOR TABLE bench_changes")
        .await?;
    Ok((url, db))
}

/// Creates a pgoutput slot; returns its consistent point.
async fn create_slot(db: &PgPool, slot: &str) -> anyhow::Result<String> {
    let (lsn,): (String,) =
        sqlx::query_as("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .fetch_one(db)
            .await
            .with_context(|| format!("cannot create the replication slot {slot}"))?;
    Ok(lsn)
}

/// Drops the database's replication slots (stopping their walsenders
/// first), then the database: a slot blocks DROP DATABASE.
async fn teardown(admin: &PgPool) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE database = $1 AND active_pid IS NOT NULL",
        )
        .bind(DB)
        .execute(admin)
        .await?;
        // A terminated walsender may hold its slot a moment longer.
        match sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = $1",
        )
        .bind(DB)
        .execute(admin)
        .await
        {
            Ok(_) => break,
            Err(e) if tries < 50 && e.to_string().contains("is active") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("cannot drop the benchmark's replication slots"),
        }
    }
    admin
        .execute("DROP DATABASE IF EXISTS caudal_bench WITH (FORCE)")
        .await?;
    Ok(())
}

/// A fresh directory for the config, the state, the buffer and the log.
fn scratch_dir(scenario: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("caudal-bench-{}-{scenario}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_config(
    dir: &Path,
    url: &str,
    addr: SocketAddr,
    args: &Args,
    max_wait_ms: u64,
) -> anyhow::Result<PathBuf> {
    let config = dir.join("bench.toml");
    let page_size = args
        .page_size
        .map_or_else(String::new, |n| format!("page_size = {n}\n"));
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["public.bench_changes"]
slot = "{CAUDAL_SLOT}"
publication = "{PUBLICATION}"
snapshot = "never"
{page_size}
[sinks.recv]
type = "http"
url = "http://{addr}/ingest"
batch = {{ max_records = {batch}, max_wait = "{max_wait_ms}ms" }}
concurrency = {concurrency}

[pipelines.bench]
source = "pg"
sink = "recv"
"#,
            state = dir.join("state.db").display(),
            batch = args.batch,
            concurrency = args.concurrency,
        ),
    )?;
    Ok(config)
}

/// caudal with `subcommand`, its output going to `DIR/caudal.log`.
fn caudal_command(
    args: &Args,
    config: &Path,
    dir: &Path,
    subcommand: &[&str],
) -> anyhow::Result<Command> {
    let log = std::fs::File::create(dir.join("caudal.log"))?;
    let mut cmd = Command::new(&args.caudal);
    cmd.arg("-c")
        .arg(config)
        .args(subcommand)
        .env("CAUDAL_LOG", "info")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    Ok(cmd)
}

/// Waits until the receiver has counted `target` records; returns the
/// seconds since caudal started. Fails when caudal exits first or nothing
/// arrives for [`STALL_TIMEOUT`].
async fn wait_for_records(
    receiver: &Receiver,
    target: u64,
    caudal: &Measured,
    dir: &Path,
) -> anyhow::Result<f64> {
    let mut last = (receiver.records(), Instant::now());
    loop {
        let n = receiver.records();
        if n >= target {
            return Ok(caudal.elapsed_secs());
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        if caudal.has_exited() {
            // The last requests may still be counted a moment after exit.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let n = receiver.records();
            if n >= target {
                return Ok(caudal.elapsed_secs());
            }
            bail!(
                "caudal exited after the receiver got {n} of {target} changes (log: {})",
                dir.join("caudal.log").display()
            );
        }
        if last.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "the receiver got {n} of {target} changes and nothing more for {} s (log: {})",
                STALL_TIMEOUT.as_secs(),
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until caudal's walsender holds its slot.
async fn wait_streaming(admin: &PgPool, caudal: &Measured, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let active: Option<(bool,)> =
            sqlx::query_as("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(CAUDAL_SLOT)
                .fetch_optional(admin)
                .await?;
        if active.is_some_and(|(a,)| a) {
            return Ok(());
        }
        if caudal.has_exited() || started.elapsed() > STALL_TIMEOUT {
            bail!(
                "caudal did not start streaming from slot {CAUDAL_SLOT} (log: {})",
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to [`STALL_TIMEOUT`] for caudal to exit; it must succeed.
async fn wait_exit(
    caudal: Measured,
    dir: &Path,
    what: &str,
) -> anyhow::Result<crate::process::Ended> {
    let ended = tokio::time::timeout(STALL_TIMEOUT, caudal.wait())
        .await
        .with_context(|| {
            format!(
                "{what} did not exit within {} s (log: {})",
                STALL_TIMEOUT.as_secs(),
                dir.join("caudal.log").display()
            )
        })??;
    if !ended.status.success() {
        bail!(
            "{what} failed: {} (log: {})",
            ended.status,
            dir.join("caudal.log").display()
        );
    }
    Ok(ended)
}
