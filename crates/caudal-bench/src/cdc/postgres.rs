//! The PostgreSQL CDC scenarios (see [`super`] for the workload).
//!
//! - `cdc-throughput`: every consumer's slot (`pgoutput`, on the same
//!   publication) is created before the workload, the workload is written
//!   while nothing consumes, then each consumer drains the same backlog:
//!   `caudal once` until the receiver has counted every change (and the
//!   baseline build's, from its own slot, with `--baseline-caudal`);
//!   `pg_recvlogical` (with caudal's pgoutput options, into /dev/null)
//!   until it has received the log up to a marker message written right
//!   after the workload (`--endpos`, so it exits there); and the server's
//!   own decoding, `pg_logical_slot_peek_binary_changes` up to the marker
//!   counted in SQL: the ceiling, no client at all. pg_recvlogical is a
//!   client like caudal, one that only writes the stream to /dev/null.
//! - `cdc-latency`: `caudal run` streams while a load generator commits at
//!   a steady rate; the receiver times every record from its `commit_time`
//!   (the commit record's time) to its arrival. With a baseline, the whole
//!   scenario runs again from a fresh database for it.
//!
//! Each scenario drops its replication slots and its database
//! `caudal_bench` at the end, also when it fails: a forgotten slot keeps
//! the server's WAL forever.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Connection as _, Executor as _, PgPool};

use super::{
    DEFAULT_LATENCY_MAX_WAIT_MS, DEFAULT_THROUGHPUT_CHANGES, DEFAULT_THROUGHPUT_MAX_WAIT_MS, Op,
    STALL_TIMEOUT, THROUGHPUT_TXN_ROWS, Target,
};
use crate::process::Measured;
use crate::receiver::{self, Stamp};
use crate::subject::{self, BASELINE, Subject};
use crate::{Args, database_url, round};

/// The database the scenarios create and drop.
const DB: &str = "caudal_bench";
/// The publication both consumers read.
const PUBLICATION: &str = "caudal_bench_pub";
/// caudal's slot.
const CAUDAL_SLOT: &str = "caudal_bench_slot";
/// The baseline build's slot (`--baseline-caudal`).
const BASELINE_SLOT: &str = "caudal_bench_base";
/// pg_recvlogical's slot (`cdc-throughput`).
const REFERENCE_SLOT: &str = "caudal_bench_ref";
/// The slot the server decodes in SQL (`cdc-throughput`'s ceiling).
const SERVER_SLOT: &str = "caudal_bench_srv";

/// The caudal pgoutput options (see the CDC reader), given to
/// pg_recvlogical and to the server's own decoding too so that all decode
/// the same stream.
const PGOUTPUT_OPTIONS: [(&str, &str); 4] = [
    ("proto_version", "1"),
    ("publication_names", PUBLICATION),
    ("binary", "true"),
    ("messages", "true"),
];

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
pub(crate) fn source_fields(url: &str, slot: &str) -> String {
    format!(
        r#"type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["public.bench_changes"]
slot = "{slot}"
publication = "{PUBLICATION}"
snapshot = "never"
"#
    )
}

/// `subject`'s slot.
fn slot_of(subject: Subject<'_>) -> &'static str {
    if subject.name == BASELINE {
        BASELINE_SLOT
    } else {
        CAUDAL_SLOT
    }
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
    // Every slot at the same point, before the first change: each consumer
    // then has the same backlog to decode.
    let start_lsn = create_slot(&db, CAUDAL_SLOT).await?;
    if args.baseline_caudal.is_some() {
        create_slot(&db, BASELINE_SLOT).await?;
    }
    create_slot(&db, REFERENCE_SLOT).await?;
    create_slot(&db, SERVER_SLOT).await?;

    eprintln!("cdc-throughput: writing {changes} changes while nothing consumes");
    let (written, workload_secs) = super::write_backlog(&db, changes).await?;
    // The end of the backlog every consumer drains: a message right after
    // the last commit (pgoutput sends it with `messages=true`).
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

    let dir = super::scratch_dir("cdc-throughput")?;
    let mut drains = Vec::new();
    for subject in args.subjects() {
        // A receiver of its own: each drain must deliver exactly `changes`.
        let receiver = receiver::start().await?;
        let sub = super::subject_dir(args, &dir, subject)?;
        let config = super::write_config(
            &sub,
            ("pg", &source_fields(&url, slot_of(subject))),
            receiver.addr,
            args,
            max_wait_ms,
        )?;
        eprintln!(
            "cdc-throughput: {} once (log: {})",
            subject.name,
            sub.join("caudal.log").display()
        );
        let drained = super::drain_once(subject, &config, &sub, &receiver, changes).await?;
        drains.push((subject, (drained, receiver.requests())));
    }
    let ((drained, requests), baseline) = subject::split(drains)?;

    eprintln!("cdc-throughput: pg_recvlogical reference");
    let reference = recvlogical(args, admin, &url, &end_lsn).await?;

    eprintln!("cdc-throughput: the server's own decoding (ceiling)");
    let server = server_decode(&url, &end_lsn).await?;
    // Every change is one message; BEGIN and COMMIT of each transaction,
    // RELATION and the end marker come on top.
    let least = changes + 2 * changes.div_ceil(THROUGHPUT_TXN_ROWS);
    if server.messages < least {
        bail!(
            "the server decoded {} messages up to {end_lsn}, expected at least {least} \
             for {changes} changes",
            server.messages
        );
    }

    let n = changes as f64;
    let caudal_secs = drained.caudal_secs;
    let mut report = json!({
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
            "requests": requests,
            "caudal_secs": round(caudal_secs),
            "caudal_changes_per_s": round(n / caudal_secs),
            "caudal_exit_secs": round(drained.ended.secs),
            "server_decode_secs": round(server.secs),
            "server_decode_messages": server.messages,
            "server_decode_changes_per_s": round(n / server.secs),
            "caudal_over_server_decode": round(server.secs / caudal_secs),
            "recvlogical_secs": round(reference.secs),
            "recvlogical_changes_per_s": round(n / reference.secs),
            "caudal_over_recvlogical": round(reference.secs / caudal_secs),
            "caudal_peak_rss_mib": round(drained.ended.peak_rss_mib),
            "recvlogical_peak_rss_mib": round(reference.peak_rss_mib),
    });
    if let Some((b, _)) = baseline {
        subject::extend(
            &mut report,
            json!({
                "baseline_secs": round(b.caudal_secs),
                "baseline_changes_per_s": round(n / b.caudal_secs),
                "baseline_exit_secs": round(b.ended.secs),
                "baseline_peak_rss_mib": round(b.ended.peak_rss_mib),
                "caudal_over_baseline": round(b.caudal_secs / caudal_secs),
            }),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// `pg_recvlogical` draining [`REFERENCE_SLOT`] up to `end_lsn` into
/// /dev/null with caudal's pgoutput options; its slot must then be
/// confirmed up to there.
async fn recvlogical(
    args: &Args,
    admin: &PgPool,
    url: &str,
    end_lsn: &str,
) -> anyhow::Result<crate::process::Ended> {
    let mut recv = Command::new(&args.pg_recvlogical);
    recv.arg("-d")
        .arg(url)
        .args([
            "--slot",
            REFERENCE_SLOT,
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .arg(format!("--endpos={end_lsn}"));
    for (name, value) in PGOUTPUT_OPTIONS {
        recv.arg("-o").arg(format!("{name}={value}"));
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
    .bind(end_lsn)
    .bind(REFERENCE_SLOT)
    .fetch_one(admin)
    .await?;
    if !drained_ref {
        bail!("pg_recvlogical exited before its slot was confirmed up to {end_lsn}");
    }
    Ok(reference)
}

/// The server's own decoding of the backlog.
#[derive(Debug)]
struct ServerDecode {
    /// The query's time, on a connection opened beforehand.
    secs: f64,
    /// pgoutput messages decoded: every change, and BEGIN, COMMIT,
    /// RELATION and the end marker.
    messages: u64,
}

/// Decodes [`SERVER_SLOT`] up to `end_lsn` inside the server:
/// `SELECT count(*) FROM pg_logical_slot_peek_binary_changes(…)` with
/// caudal's pgoutput options. The walsender's work without a client: no
/// socket, no consumer. Peek, not get: the slot stays where it was, so the
/// same figure can be taken again (the slot is dropped at the end anyway),
/// and the decoding is the same. The function gathers its rows in a
/// tuplestore before `count(*)` reads them; `work_mem` is raised so that
/// this stays in memory for the default sizes.
async fn server_decode(url: &str, end_lsn: &str) -> anyhow::Result<ServerDecode> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute("SET work_mem = '1GB'").await?;
    let options: Vec<String> = PGOUTPUT_OPTIONS
        .iter()
        .flat_map(|(name, value)| [(*name).to_string(), (*value).to_string()])
        .collect();
    let started = Instant::now();
    let (messages,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(
            $1, $2::text::pg_lsn, NULL, VARIADIC $3::text[])",
    )
    .bind(SERVER_SLOT)
    .bind(end_lsn)
    .bind(&options)
    .fetch_one(&mut conn)
    .await
    .context("the server's decoding of the backlog")?;
    let secs = started.elapsed().as_secs_f64();
    conn.close().await?;
    Ok(ServerDecode {
        secs,
        messages: u64::try_from(messages)?,
    })
}

/// Runs `cdc-latency` (once per build, each from a fresh database), then
/// drops what it created.
pub async fn latency(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let mut reports = Vec::new();
    for subject in args.subjects() {
        let result = latency_run(args, &admin, subject).await;
        let cleaned = teardown(&admin).await;
        reports.push((subject, result.and_then(|r| cleaned.map(|()| r))?));
    }
    let (report, baseline) = subject::split(reports)?;
    Ok(super::with_baseline_latency(report, baseline))
}

async fn latency_run(args: &Args, admin: &PgPool, subject: Subject<'_>) -> anyhow::Result<Value> {
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_LATENCY_MAX_WAIT_MS);
    if args.rate == 0 || args.txn_rows == 0 {
        bail!("--rate and --txn-rows must be above 0");
    }
    let (url, db) = provision(args, admin).await?;
    // Created up front so caudal streams from before the first change.
    let slot = slot_of(subject);
    create_slot(&db, slot).await?;

    let receiver = receiver::start_with_latency(Stamp::CommitTime).await?;
    let dir = super::scratch_dir("cdc-latency")?;
    let config = super::write_config(
        &dir,
        ("pg", &source_fields(&url, slot)),
        receiver.addr,
        args,
        max_wait_ms,
    )?;
    eprintln!(
        "cdc-latency: {} run (log: {})",
        subject.name,
        dir.join("caudal.log").display()
    );
    let caudal = super::spawn_caudal(subject, &config, &dir, &["run"])?;
    wait_streaming(admin, slot, &caudal, &dir).await?;

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

pub(crate) async fn connect_admin(args: &Args) -> anyhow::Result<PgPool> {
    PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })
}

/// Recreates the database with the table and the publication; returns its
/// URL and a pool on it.
pub(crate) async fn provision(args: &Args, admin: &PgPool) -> anyhow::Result<(String, PgPool)> {
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
pub(crate) async fn create_slot(db: &PgPool, slot: &str) -> anyhow::Result<String> {
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
pub(crate) async fn teardown(admin: &PgPool) -> anyhow::Result<()> {
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
pub(crate) async fn wait_streaming(
    admin: &PgPool,
    slot: &str,
    caudal: &Measured,
    dir: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let active: Option<(bool,)> =
            sqlx::query_as("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(admin)
                .await?;
        if active.is_some_and(|(a,)| a) {
            return Ok(());
        }
        if caudal.has_exited() || started.elapsed() > STALL_TIMEOUT {
            bail!(
                "caudal did not start streaming from slot {slot} (log: {})",
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
