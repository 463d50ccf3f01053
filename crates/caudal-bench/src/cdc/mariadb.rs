//! The MariaDB binlog CDC scenarios (see [`super`] for the workload), the
//! counterparts of [`super::postgres`]'s.
//!
//! - `mysql-cdc-throughput`: a first, untimed `caudal once` on the empty
//!   table saves caudal's checkpoint at the end of the binary log (there is
//!   no slot to create: a replica names its position when it connects),
//!   then the workload is written while nothing consumes, then each
//!   consumer reads the same stretch of the log: `caudal once` until the
//!   receiver has counted every change, and `mariadb-binlog
//!   --read-from-remote-server --verbose` from the start position to the
//!   end of the workload, decoding every event, row images included, to
//!   text into /dev/null (then once more without `--verbose`, rows left as
//!   base64, for scale).
//! - `mysql-cdc-latency`: `caudal run` streams while a load generator
//!   commits at a steady rate. A binlog event carries its time in whole
//!   seconds (so does a MariaDB change's `commit_time`), so every inserted
//!   or updated row carries its own stamp, `stamp_us`, the statement's
//!   `NOW(6)` in microseconds; the receiver times each record from it
//!   ([`Stamp::Row`]). Deletes carry no new row and are not timed.
//!
//! Each run creates a database of its own, `caudal_bench_<random>`, and
//! drops it at the end, also when it fails; caudal replicates with a
//! random `server_id` of its own. With `--baseline-caudal`, the baseline
//! build drains the same backlog from a first run and a checkpoint of its
//! own in `mysql-cdc-throughput`, and `mysql-cdc-latency` runs again for
//! it from a database of its own.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{MySqlPool, Row as _};

use super::{
    DEFAULT_LATENCY_MAX_WAIT_MS, DEFAULT_THROUGHPUT_CHANGES, DEFAULT_THROUGHPUT_MAX_WAIT_MS, Op,
    STALL_TIMEOUT, THROUGHPUT_TXN_ROWS, Target,
};
use crate::process::Measured;
use crate::receiver::{self, ROW_STAMP_COLUMN, Receiver, Stamp};
use crate::subject::{self, CAUDAL, Subject};
use crate::{Args, database_url, round};

/// The table of both scenarios: PostgreSQL's `bench_changes`, and in
/// `mysql-cdc-latency` the row stamp.
fn create_table(stamped: bool) -> String {
    let stamp = if stamped {
        format!(",\n    {ROW_STAMP_COLUMN} BIGINT NOT NULL")
    } else {
        String::new()
    };
    format!(
        "CREATE TABLE bench_changes (
    id BIGINT PRIMARY KEY,
    account INT NOT NULL,
    amount DECIMAL(12, 2) NOT NULL,
    note TEXT NOT NULL{stamp}) ENGINE = InnoDB"
    )
}

// The SEQUENCE engine's `seq_1_to_N` is MariaDB's generate_series; the
// range condition is an index range on it.
const INSERT: &str = "INSERT INTO bench_changes (id, account, amount, note)
    SELECT seq, seq % 1000, (seq % 100000) / 100.0, CONCAT('payment ', MD5(seq))
    FROM seq_1_to_1000000000000 WHERE seq BETWEEN ? AND ?";
const UPDATE: &str =
    "UPDATE bench_changes SET amount = amount + 1, note = CONCAT(note, ' (corrected)')
    WHERE id BETWEEN ? AND ?";
const DELETE: &str = "DELETE FROM bench_changes WHERE id BETWEEN ? AND ?";
// With the stamp (`mysql-cdc-latency`): the statement's start, µs since
// the epoch. It is a little before the commit: by the statement's run and
// the commit's own time (`commit_rtt_*` bounds both).
const INSERT_STAMPED: &str = "INSERT INTO bench_changes (id, account, amount, note, stamp_us)
    SELECT seq, seq % 1000, (seq % 100000) / 100.0, CONCAT('payment ', MD5(seq)),
           CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)
    FROM seq_1_to_1000000000000 WHERE seq BETWEEN ? AND ?";
const UPDATE_STAMPED: &str =
    "UPDATE bench_changes SET amount = amount + 1, note = CONCAT(note, ' (corrected)'),
        stamp_us = CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)
    WHERE id BETWEEN ? AND ?";

/// The benchmark's database, written through `pool`.
#[derive(Debug)]
struct Bench {
    pool: MySqlPool,
    /// Rows carry [`ROW_STAMP_COLUMN`].
    stamped: bool,
}

impl Target for Bench {
    async fn apply(&self, op: Op, lo: i64, hi: i64) -> anyhow::Result<u64> {
        let sql = match (op, self.stamped) {
            (Op::Insert, false) => INSERT,
            (Op::Insert, true) => INSERT_STAMPED,
            (Op::Update, false) => UPDATE,
            (Op::Update, true) => UPDATE_STAMPED,
            (Op::Delete, _) => DELETE,
        };
        let done = sqlx::query(sql)
            .bind(lo)
            .bind(hi)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// One run's names: its database and caudal's replica server id.
#[derive(Debug)]
struct Run {
    db: String,
    server_id: u32,
}

impl Run {
    fn new() -> Self {
        // A random number without a dependency: std's hasher keys are.
        let r = RandomState::new().hash_one((std::process::id(), Instant::now()));
        Self {
            db: format!("caudal_bench_{:08x}", r as u32),
            // Away from the small ids servers and tests pick.
            server_id: 1_000_000_000 + ((r >> 32) as u32) % 1_000_000_000,
        }
    }
}

/// caudal's source: the run's table, no snapshot, a heartbeat every second.
fn source_fields(url: &str, run: &Run) -> String {
    format!(
        r#"type = "mysql"
url = "{url}"
mode = "cdc"
tables = ["bench_changes"]
server_id = {server_id}
heartbeat = "1s"
snapshot = "never"
"#,
        server_id = run.server_id,
    )
}

/// A position in the binary log.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LogPos {
    file: String,
    pos: u64,
}

impl std::fmt::Display for LogPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

/// Runs `mysql-cdc-throughput`, then drops what it created.
pub async fn throughput(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let run = Run::new();
    let result = throughput_run(args, &admin, &run).await;
    let cleaned = teardown(&admin, &run).await;
    result.and_then(|report| cleaned.map(|()| report))
}

async fn throughput_run(args: &Args, admin: &MySqlPool, run: &Run) -> anyhow::Result<Value> {
    let changes = args.rows.unwrap_or(DEFAULT_THROUGHPUT_CHANGES);
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_THROUGHPUT_MAX_WAIT_MS);
    let (url, db) = provision(args, admin, run, false).await?;

    let dir = super::scratch_dir("mysql-cdc-throughput")?;
    // Each build's receiver (each drain must deliver exactly `changes`),
    // directory and configuration.
    let mut setups: Vec<(
        Subject<'_>,
        Receiver,
        std::path::PathBuf,
        std::path::PathBuf,
    )> = Vec::new();
    let mut start = None;
    for subject in args.subjects() {
        let receiver = receiver::start().await?;
        let sub = super::subject_dir(args, &dir, subject)?;
        let config = super::write_config(
            &sub,
            ("my", &source_fields(&url, run)),
            receiver.addr,
            args,
            max_wait_ms,
        )?;
        // The counterpart of creating the slot first: the build's
        // checkpoint at the end of the log, before the first change.
        let first = super::spawn_caudal(subject, &config, &sub, &["once", "bench"])?;
        super::wait_exit(
            first,
            &sub,
            &format!("the first {} once (on the empty table)", subject.name),
        )
        .await?;
        if receiver.records() != 0 {
            bail!(
                "the first {} once delivered {} records from an empty table",
                subject.name,
                receiver.records()
            );
        }
        // Where caudal's timed run starts, and so the reference.
        if subject.name == CAUDAL {
            start = Some(checkpoint(subject, &config)?);
        }
        setups.push((subject, receiver, sub, config));
    }
    let start = start.context("caudal's first run saved no checkpoint")?;

    eprintln!(
        "mysql-cdc-throughput: writing {changes} changes while nothing consumes (database {}, from {start})",
        run.db
    );
    let (written, workload_secs) = super::write_backlog(&db, changes).await?;
    // The end of the backlog: the log's end right after the last commit.
    let end = master_status(admin).await?;
    let files = log_files(admin, &start, &end).await?;
    let binlog_bytes = files
        .iter()
        .map(|(name, size)| {
            let from = if *name == start.file { start.pos } else { 0 };
            let to = if *name == end.file { end.pos } else { *size };
            to.saturating_sub(from)
        })
        .sum::<u64>();
    db.pool.close().await;

    let mut drains = Vec::new();
    for (subject, receiver, sub, config) in &setups {
        eprintln!(
            "mysql-cdc-throughput: {} once (log: {})",
            subject.name,
            sub.join("caudal.log").display()
        );
        let drained = super::drain_once(*subject, config, sub, receiver, changes).await?;
        drains.push((*subject, (drained, receiver.requests())));
    }
    let ((drained, requests), baseline) = subject::split(drains)?;

    eprintln!("mysql-cdc-throughput: mariadb-binlog reference, {start} to {end}");
    let range = Range {
        start: &start,
        end: &end,
        files: &files,
    };
    let reference = mariadb_binlog(args, &range, true, &dir).await?;
    let base64 = mariadb_binlog(args, &range, false, &dir).await?;

    let n = changes as f64;
    let caudal_secs = drained.caudal_secs;
    let mut report = json!({
            "scenario": "mysql_cdc_throughput",
            "changes": changes,
            "inserts": written.inserts,
            "updates": written.updates,
            "deletes": written.deletes,
            "txn_rows": THROUGHPUT_TXN_ROWS,
            "binlog_mib": round(binlog_bytes as f64 / (1024.0 * 1024.0)),
            "workload_secs": round(workload_secs),
            "batch": args.batch,
            "max_wait_ms": max_wait_ms,
            "concurrency": args.concurrency,
            "page_size": args.page_size,
            "requests": requests,
            "caudal_secs": round(caudal_secs),
            "caudal_changes_per_s": round(n / caudal_secs),
            "caudal_exit_secs": round(drained.ended.secs),
            "binlog_secs": round(reference.secs),
            "binlog_changes_per_s": round(n / reference.secs),
            "caudal_over_binlog": round(reference.secs / caudal_secs),
            "binlog_base64_secs": round(base64.secs),
            "caudal_peak_rss_mib": round(drained.ended.peak_rss_mib),
            "binlog_peak_rss_mib": round(reference.peak_rss_mib),
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

/// The stretch of the binary log both consumers read.
#[derive(Debug)]
struct Range<'a> {
    start: &'a LogPos,
    end: &'a LogPos,
    /// The files from `start`'s to `end`'s, in order (with their sizes).
    files: &'a [(String, u64)],
}

/// Reads `range` with `mariadb-binlog --read-from-remote-server` into
/// /dev/null, `--verbose` (every row image decoded into `### INSERT …`
/// pseudo-SQL) or not (row events written as base64 `BINLOG` statements).
/// `--start-position` applies to the first file named, `--stop-position`
/// to the last. It must exit 0 and print nothing on stderr (it warns there
/// when it did not reach the stop position).
async fn mariadb_binlog(
    args: &Args,
    range: &Range<'_>,
    verbose: bool,
    dir: &Path,
) -> anyhow::Result<crate::process::Ended> {
    let server = Server::from_url(&args.mysql_url)?;
    let stderr_path = dir.join("mariadb-binlog.err");
    let mut cmd = Command::new(&args.mariadb_binlog);
    cmd.arg("--read-from-remote-server")
        .arg(format!("--host={}", server.host))
        .arg(format!("--port={}", server.port))
        .arg(format!("--user={}", server.user));
    if let Some(password) = &server.password {
        cmd.arg(format!("--password={password}"));
    }
    if verbose {
        cmd.arg("--verbose");
    }
    cmd.arg(format!("--start-position={}", range.start.pos))
        .arg(format!("--stop-position={}", range.end.pos))
        .args(range.files.iter().map(|(name, _)| name))
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&stderr_path)?));
    let ended = Measured::spawn(cmd)
        .context(
            "the reference needs mariadb-binlog (it ships with the MariaDB client; \
             --mariadb-binlog names it)",
        )?
        .wait()
        .await?;
    let complaints = std::fs::read_to_string(&stderr_path)?;
    if !ended.status.success() || !complaints.trim().is_empty() {
        bail!(
            "mariadb-binlog failed ({}): {}",
            ended.status,
            complaints.trim()
        );
    }
    Ok(ended)
}

/// Runs `mysql-cdc-latency` (once per build, each in a database of its
/// own), then drops what it created.
pub async fn latency(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let mut reports = Vec::new();
    for subject in args.subjects() {
        let run = Run::new();
        let result = latency_run(args, &admin, &run, subject).await;
        let cleaned = teardown(&admin, &run).await;
        reports.push((subject, result.and_then(|r| cleaned.map(|()| r))?));
    }
    let (report, baseline) = subject::split(reports)?;
    Ok(super::with_baseline_latency(report, baseline))
}

async fn latency_run(
    args: &Args,
    admin: &MySqlPool,
    run: &Run,
    subject: Subject<'_>,
) -> anyhow::Result<Value> {
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_LATENCY_MAX_WAIT_MS);
    if args.rate == 0 || args.txn_rows == 0 {
        bail!("--rate and --txn-rows must be above 0");
    }
    let (url, db) = provision(args, admin, run, true).await?;

    let receiver = receiver::start_with_latency(Stamp::Row).await?;
    let dir = super::scratch_dir("mysql-cdc-latency")?;
    let config = super::write_config(
        &dir,
        ("my", &source_fields(&url, run)),
        receiver.addr,
        args,
        max_wait_ms,
    )?;
    eprintln!(
        "mysql-cdc-latency: {} run (database {}, log: {})",
        subject.name,
        run.db,
        dir.join("caudal.log").display()
    );
    let caudal = super::spawn_caudal(subject, &config, &dir, &["run"])?;
    wait_streaming(admin, run, &caudal, &dir).await?;

    let (load, caudal) = super::steady_load(args, "mysql-cdc-latency", &db, caudal, &dir).await?;
    db.pool.close().await;
    let mut report = super::finish_latency(
        args,
        "mysql_cdc_latency",
        max_wait_ms,
        &receiver,
        caudal,
        &dir,
        &load,
    )
    .await?;
    if !load.commit_rtt_us.is_empty() {
        let ms = |p: f64| round(super::percentile(&load.commit_rtt_us, p) as f64 / 1000.0);
        report["commit_rtt_p50_ms"] = json!(ms(0.50));
        report["commit_rtt_p99_ms"] = json!(ms(0.99));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

async fn connect_admin(args: &Args) -> anyhow::Result<MySqlPool> {
    let admin = MySqlPool::connect(&args.mysql_url).await.with_context(|| {
        format!(
            "cannot connect to MariaDB at {} (run scripts/test --services-only)",
            args.mysql_url
        )
    })?;
    let (log_bin, format): (i64, String) =
        sqlx::query_as("SELECT CAST(@@log_bin AS SIGNED), CAST(@@binlog_format AS CHAR)")
            .fetch_one(&admin)
            .await?;
    if log_bin != 1 || format != "ROW" {
        bail!(
            "the server's binary log is {} with binlog_format={format}; binlog CDC needs it on, \
             ROW (run scripts/test --services-only)",
            if log_bin == 1 { "on" } else { "off" }
        );
    }
    Ok(admin)
}

/// Creates the run's database with the table; returns its URL and the
/// workload's pool on it.
async fn provision(
    args: &Args,
    admin: &MySqlPool,
    run: &Run,
    stamped: bool,
) -> anyhow::Result<(String, Bench)> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{}`", run.db)))
        .execute(admin)
        .await
        .with_context(|| format!("cannot create the database {}", run.db))?;
    let url = database_url(&args.mysql_url, &run.db);
    let pool = MySqlPool::connect(&url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(create_table(stamped)))
        .execute(&pool)
        .await?;
    Ok((url, Bench { pool, stamped }))
}

/// Drops the run's database. caudal's replica connection ends with its
/// process, which has exited (or been killed) by now.
async fn teardown(admin: &MySqlPool, run: &Run) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{}`",
        run.db
    )))
    .execute(admin)
    .await
    .with_context(|| format!("cannot drop the database {}", run.db))?;
    Ok(())
}

/// The binary log position of pipeline `bench`'s checkpoint (`caudal
/// checkpoint show`).
fn checkpoint(subject: Subject<'_>, config: &Path) -> anyhow::Result<LogPos> {
    let out = Command::new(subject.binary)
        .arg("-c")
        .arg(config)
        .args(["checkpoint", "show", "bench"])
        .env("CAUDAL_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", subject.binary.display()))?;
    if !out.status.success() {
        bail!("caudal checkpoint show failed: {}", out.status);
    }
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "caudal checkpoint show printed no checkpoint: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })?;
    let position = &shown["position"];
    match (position["file"].as_str(), position["pos"].as_u64()) {
        (Some(file), Some(pos)) => Ok(LogPos {
            file: file.to_string(),
            pos,
        }),
        _ => bail!("caudal's checkpoint is not a binary log position: {position}"),
    }
}

/// The end of the binary log now.
async fn master_status(admin: &MySqlPool) -> anyhow::Result<LogPos> {
    let row = sqlx::raw_sql("SHOW MASTER STATUS")
        .fetch_optional(admin)
        .await?
        .context("SHOW MASTER STATUS returned nothing: the binary log is off")?;
    Ok(LogPos {
        file: row.try_get(0)?,
        pos: unsigned(&row, 1)?,
    })
}

/// The binary log files from `start`'s to `end`'s, in order, with their
/// sizes.
async fn log_files(
    admin: &MySqlPool,
    start: &LogPos,
    end: &LogPos,
) -> anyhow::Result<Vec<(String, u64)>> {
    let rows = sqlx::raw_sql("SHOW BINARY LOGS").fetch_all(admin).await?;
    let mut all = Vec::with_capacity(rows.len());
    for row in &rows {
        all.push((row.try_get::<String, _>(0)?, unsigned(row, 1)?));
    }
    let from = all.iter().position(|(f, _)| *f == start.file);
    let to = all.iter().position(|(f, _)| *f == end.file);
    match (from, to) {
        (Some(from), Some(to)) if from <= to => Ok(all[from..=to].to_vec()),
        _ => bail!("the binary log files from {start} to {end} are not all on the server"),
    }
}

/// An integer column of a `SHOW` result, whichever integer type it has.
fn unsigned(row: &sqlx::mysql::MySqlRow, index: usize) -> anyhow::Result<u64> {
    match row.try_get::<u64, _>(index) {
        Ok(n) => Ok(n),
        Err(_) => Ok(u64::try_from(row.try_get::<i64, _>(index)?)?),
    }
}

/// Waits until caudal's replica is registered with the server.
async fn wait_streaming(
    admin: &MySqlPool,
    run: &Run,
    caudal: &Measured,
    dir: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let replicas = sqlx::raw_sql("SHOW SLAVE HOSTS").fetch_all(admin).await?;
        for row in &replicas {
            if unsigned(row, 0)? == u64::from(run.server_id) {
                return Ok(());
            }
        }
        if caudal.has_exited() || started.elapsed() > STALL_TIMEOUT {
            bail!(
                "caudal did not start reading the binary log as replica {} (log: {})",
                run.server_id,
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What mariadb-binlog needs to connect: the parts of a `mysql://` URL.
#[derive(Debug)]
struct Server {
    user: String,
    password: Option<String>,
    host: String,
    port: u16,
}

impl Server {
    /// `mysql://USER[:PASSWORD]@HOST[:PORT][/DB][?…]` (no percent-decoding).
    fn from_url(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .split_once("://")
            .map_or(url, |(_, r)| r)
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        let (userinfo, hostport) = rest.rsplit_once('@').unwrap_or(("root", rest));
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p.to_string())),
            None => (userinfo, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .with_context(|| format!("the port of {url} is not a number"))?,
            ),
            None => (hostport, 3306),
        };
        if host.is_empty() {
            bail!("{url} names no host");
        }
        Ok(Self {
            user: user.to_string(),
            password,
            host: host.to_string(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{INSERT_STAMPED, ROW_STAMP_COLUMN, Server, UPDATE_STAMPED, create_table};

    #[test]
    fn stamped_statements_write_the_column_the_receiver_reads() {
        for sql in [&create_table(true), INSERT_STAMPED, UPDATE_STAMPED] {
            assert!(sql.contains(ROW_STAMP_COLUMN), "{sql}");
        }
        assert!(!create_table(false).contains(ROW_STAMP_COLUMN));
    }

    #[test]
    fn urls_give_mariadb_binlog_its_connection() -> anyhow::Result<()> {
        let s = Server::from_url("mysql://root@127.0.0.1:3306/caudal_bench_1")?;
        assert_eq!(
            (s.user.as_str(), s.password, s.host.as_str(), s.port),
            ("root", None, "127.0.0.1", 3306)
        );
        let s = Server::from_url("mariadb://bench:secret@db.internal?ssl-mode=disabled")?;
        assert_eq!(
            (
                s.user.as_str(),
                s.password.as_deref(),
                s.host.as_str(),
                s.port
            ),
            ("bench", Some("secret"), "db.internal", 3306)
        );
        Ok(())
    }
}
