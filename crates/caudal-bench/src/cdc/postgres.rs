//! The PostgreSQL CDC scenarios (see [`super`] for the workload).
//!
//! - `cdc-throughput`: both slots (caudal's and the reference's, both
//!   `pgoutput` on the same publication) are created before the workload,
//!   the workload is written while nothing consumes, then each consumer
//!   drains the same backlog: `caudal once` until the receiver has counted
//!   every change, and `pg_recvlogical` (with caudal's pgoutput options,
//!   into /dev/null) until it has received the log up to a marker message
//!   written right after the workload (`--endpos`, so it exits there).
//! - `cdc-latency`: `caudal run` streams while a load generator commits at
//!   a steady rate; the receiver times every record from its `commit_time`
//!   (the commit record's time) to its arrival.
//!
//! Each scenario drops its replication slots and its database
//! `caudal_bench` at the end, also when it fails: a forgotten slot keeps
//! the server's WAL forever.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Executor as _, PgPool};

use super::{
    DEFAULT_LATENCY_MAX_WAIT_MS, DEFAULT_THROUGHPUT_CHANGES, DEFAULT_THROUGHPUT_MAX_WAIT_MS, Op,
    STALL_TIMEOUT, THROUGHPUT_TXN_ROWS, Target,
};
use crate::process::Measured;
use crate::receiver::{self, Stamp};
use crate::{Args, database_url, round};

/// The database the scenarios create and drop.
const DB: &str = "caudal_bench";
/// The publication both consumers read.
const PUBLICATION: &str = "caudal_bench_pub";
/// caudal's slot.
const CAUDAL_SLOT: &str = "caudal_bench_slot";
/// pg_recvlogical's slot (`cdc-throughput`).
const REFERENCE_SLOT: &str = "caudal_bench_ref";

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

impl Target for PgPool {
    async fn apply(&self, op: Op, lo: i64, hi: i64) -> anyhow::Result<u64> {
        let sql = match op {
            Op::Insert => INSERT,
            Op::Update => UPDATE,
            Op::Delete => DELETE,
        };
        let done = sqlx::query(sql).bind(lo).bind(hi).execute(self).await?;
        Ok(done.rows_affected())
    }
}

/// caudal's source: the slot and publication made here, no snapshot.
fn source_fields(url: &str) -> String {
    format!(
        r#"type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["public.bench_changes"]
slot = "{CAUDAL_SLOT}"
publication = "{PUBLICATION}"
snapshot = "never"
"#
    )
}

/// Runs `cdc-throughput`, then drops what it created.
pub async fn throughput(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let result = throughput_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and_then(|report| cleaned.map(|()| report))
}

async fn throughput_run(args: &Args, admin: &PgPool) -> anyhow::Result<Value> {
    let changes = args.rows.unwrap_or(DEFAULT_THROUGHPUT_CHANGES);
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_THROUGHPUT_MAX_WAIT_MS);
    let (url, db) = provision(args, admin).await?;
    let start_lsn = create_slot(&db, CAUDAL_SLOT).await?;
    create_slot(&db, REFERENCE_SLOT).await?;

    eprintln!("cdc-throughput: writing {changes} changes while nothing consumes");
    let (written, workload_secs) = super::write_backlog(&db, changes).await?;
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
    let dir = super::scratch_dir("cdc-throughput")?;
    let config = super::write_config(
        &dir,
        ("pg", &source_fields(&url)),
        receiver.addr,
        args,
        max_wait_ms,
    )?;
    eprintln!(
        "cdc-throughput: caudal once (log: {})",
        dir.join("caudal.log").display()
    );
    let drained = super::drain_once(args, &config, &dir, &receiver, changes).await?;

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
    let (drained_ref,): (bool,) = sqlx::query_as(
        "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false)
         FROM pg_replication_slots WHERE slot_name = $2",
    )
    .bind(&end_lsn)
    .bind(REFERENCE_SLOT)
    .fetch_one(admin)
    .await?;
    if !drained_ref {
        bail!("pg_recvlogical exited before its slot was confirmed up to {end_lsn}");
    }

    let n = changes as f64;
    let caudal_secs = drained.caudal_secs;
    let report = json!({
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
            "caudal_exit_secs": round(drained.ended.secs),
            "recvlogical_secs": round(reference.secs),
            "recvlogical_changes_per_s": round(n / reference.secs),
            "caudal_over_recvlogical": round(reference.secs / caudal_secs),
            "caudal_peak_rss_mib": round(drained.ended.peak_rss_mib),
            "recvlogical_peak_rss_mib": round(reference.peak_rss_mib),
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Runs `cdc-latency`, then drops what it created.
pub async fn latency(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let result = latency_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and_then(|report| cleaned.map(|()| report))
}

async fn latency_run(args: &Args, admin: &PgPool) -> anyhow::Result<Value> {
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_LATENCY_MAX_WAIT_MS);
    if args.rate == 0 || args.txn_rows == 0 {
        bail!("--rate and --txn-rows must be above 0");
    }
    let (url, db) = provision(args, admin).await?;
    // Created up front so caudal streams from before the first change.
    create_slot(&db, CAUDAL_SLOT).await?;

    let receiver = receiver::start_with_latency(Stamp::CommitTime).await?;
    let dir = super::scratch_dir("cdc-latency")?;
    let config = super::write_config(
        &dir,
        ("pg", &source_fields(&url)),
        receiver.addr,
        args,
        max_wait_ms,
    )?;
    eprintln!(
        "cdc-latency: caudal run (log: {})",
        dir.join("caudal.log").display()
    );
    let caudal = super::spawn_caudal(args, &config, &dir, &["run"])?;
    wait_streaming(admin, &caudal, &dir).await?;

    let (load, caudal) = super::steady_load(args, "cdc-latency", &db, caudal, &dir).await?;
    db.close().await;
    let report = super::finish_latency(
        args,
        "cdc_latency",
        max_wait_ms,
        &receiver,
        caudal,
        &dir,
        &load,
    )
    .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
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
