//! The CDC scenarios, for PostgreSQL ([`postgres`]: `cdc-throughput`,
//! `cdc-latency`) and MariaDB ([`mariadb`]: `mysql-cdc-throughput`,
//! `mysql-cdc-latency`), and what they share.
//!
//! All four write the same kind of workload to a table `bench_changes (id
//! bigint primary key, account int, amount numeric, note text)` (plus a
//! row stamp in `mysql-cdc-latency`) in a database they create and drop: transactions of `txn_rows` changes each,
//! in cycles of ten, eight multi-row INSERTs, one UPDATE of the rows of the
//! cycle's first insert and one DELETE of the rows of its second (80%
//! inserts, 10% updates, 10% deletes).
//!
//! - The throughput scenarios write a backlog of N changes in transactions
//!   of 1,000 while nothing consumes, then time `caudal once` draining it to
//!   the receiver, and a reference tool reading the same stretch of the log
//!   into /dev/null.
//! - The latency scenarios run `caudal run` while a load generator commits
//!   at a steady rate; the receiver times every record from its commit time
//!   to its arrival.
//!
//! What differs per database (the SQL, where the log starts and ends, the
//! reference, how a commit time reaches the receiver) is in the database's
//! module; the workload, the load generator, running and waiting for caudal,
//! its configuration and the percentiles are here.

pub mod mariadb;
pub mod postgres;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::process::{Ended, Measured};
use crate::receiver::{self, Receiver};
use crate::subject::{BASELINE, Subject};
use crate::{Args, round};

/// Default changes written by the throughput scenarios.
pub const DEFAULT_THROUGHPUT_CHANGES: u64 = 500_000;
/// Changes per transaction in the throughput scenarios.
const THROUGHPUT_TXN_ROWS: u64 = 1000;
/// Default time a partial batch waits in the throughput scenarios: the
/// backlog fills every batch, so it only matters for the last one.
pub const DEFAULT_THROUGHPUT_MAX_WAIT_MS: u64 = 50;
/// Default time a partial batch waits in the latency scenarios.
pub const DEFAULT_LATENCY_MAX_WAIT_MS: u64 = 20;
/// Load generated in the latency scenarios before latencies count:
/// connections, the first table metadata and the first batches are not
/// the steady state.
pub(crate) const LATENCY_WARMUP: Duration = Duration::from_secs(2);
/// Longest wait for progress (a change delivered, a replica streaming)
/// before a scenario gives up.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A kind of change of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// A database the workload writes to.
pub trait Target {
    /// Commits one statement (autocommit) that applies `op` to the ids
    /// `lo..=hi` of `bench_changes`; returns the rows it changed.
    fn apply(&self, op: Op, lo: i64, hi: i64) -> impl Future<Output = anyhow::Result<u64>>;
}

/// The write workload: transaction `k` of a sequence, each of `txn_rows`
/// changes (the last one may be shorter).
#[derive(Clone, Copy, Debug)]
struct Workload {
    txn_rows: u64,
}

/// Changes committed so far, by kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

impl Written {
    pub fn total(self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
}

impl Workload {
    /// Commits transaction `k` (one statement, autocommit) of `rows` changes.
    async fn commit(
        self,
        db: &impl Target,
        k: u64,
        rows: u64,
        written: &mut Written,
    ) -> anyhow::Result<()> {
        let (cycle, step) = (k / 10, k % 10);
        // Insert number `cycle * 8 + step` holds ids from `batch * txn_rows + 1`;
        // the update and the delete rewrite the cycle's first two inserts,
        // which are earlier and full.
        let (op, batch) = match step {
            0..=7 => (Op::Insert, cycle * 8 + step),
            8 => (Op::Update, cycle * 8),
            _ => (Op::Delete, cycle * 8 + 1),
        };
        let lo = i64::try_from(batch * self.txn_rows + 1)?;
        let hi = lo + i64::try_from(rows)? - 1;
        let changed = db.apply(op, lo, hi).await?;
        if changed != rows {
            bail!("workload transaction {k} changed {changed} rows, expected {rows}");
        }
        match op {
            Op::Insert => written.inserts += rows,
            Op::Update => written.updates += rows,
            Op::Delete => written.deletes += rows,
        }
        Ok(())
    }
}

/// Writes the throughput scenarios' backlog: `changes` changes in
/// transactions of [`THROUGHPUT_TXN_ROWS`]. Returns what was written and
/// the seconds it took.
pub(crate) async fn write_backlog(
    db: &impl Target,
    changes: u64,
) -> anyhow::Result<(Written, f64)> {
    let workload = Workload {
        txn_rows: THROUGHPUT_TXN_ROWS,
    };
    let mut written = Written::default();
    let started = Instant::now();
    let mut k = 0;
    while written.total() < changes {
        let rows = (changes - written.total()).min(THROUGHPUT_TXN_ROWS);
        workload.commit(db, k, rows, &mut written).await?;
        k += 1;
    }
    Ok((written, started.elapsed().as_secs_f64()))
}

/// How the throughput scenarios' `caudal once` went.
#[derive(Debug)]
pub(crate) struct Drained {
    /// From process start until the receiver had counted every change.
    pub(crate) caudal_secs: f64,
    pub(crate) ended: Ended,
}

/// Runs `caudal once bench` (with `subject`'s binary) and waits until the
/// receiver has counted all `changes`, then for caudal to exit; the
/// receiver must count exactly `changes`.
pub(crate) async fn drain_once(
    subject: Subject<'_>,
    config: &Path,
    dir: &Path,
    receiver: &Receiver,
    changes: u64,
) -> anyhow::Result<Drained> {
    let caudal = spawn_caudal(subject, config, dir, &["once", "bench"])?;
    let caudal_secs = wait_for_records(receiver, changes, &caudal, dir).await?;
    let ended = wait_exit(caudal, dir, "caudal once").await?;
    let delivered = receiver.records();
    if delivered != changes {
        bail!(
            "the receiver got {delivered} changes, {changes} were written (log: {})",
            dir.join("caudal.log").display()
        );
    }
    Ok(Drained { caudal_secs, ended })
}

/// What the latency scenarios' load generator committed.
#[derive(Debug)]
struct Load {
    written: Written,
    /// Changes per second committed after the warm-up.
    achieved: f64,
    /// Changes committed before this time (µs since the epoch, the
    /// receiver's clock) are not timed.
    measure_from_us: i64,
    /// Per transaction, from sending its statement until its commit
    /// returned, in microseconds, sorted.
    commit_rtt_us: Vec<i64>,
}

/// Commits one transaction of `args.txn_rows` changes every `txn_rows /
/// rate` seconds (a tokio interval, which catches up when a commit is
/// late) for [`LATENCY_WARMUP`] plus `args.duration` seconds; hands caudal
/// back. Fails when caudal exits meanwhile.
async fn steady_load(
    args: &Args,
    scenario: &str,
    db: &impl Target,
    caudal: Measured,
    dir: &Path,
) -> anyhow::Result<(Load, Measured)> {
    let period = Duration::from_secs_f64(args.txn_rows as f64 / args.rate as f64);
    let duration = Duration::from_secs(args.duration);
    eprintln!(
        "{scenario}: {} changes/s ({} transactions/s of {}) for {} s after {} s of warm-up",
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
    let mut commit_rtt_us = Vec::new();
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
        let sent = Instant::now();
        workload.commit(db, k, args.txn_rows, &mut written).await?;
        if measured_from.is_some() {
            commit_rtt_us.push(i64::try_from(sent.elapsed().as_micros())?);
        }
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
    commit_rtt_us.sort_unstable();
    let load = Load {
        written,
        achieved: (written.total() - before_window) as f64 / window_secs,
        measure_from_us,
        commit_rtt_us,
    };
    Ok((load, caudal))
}

/// Waits until the receiver has counted every change `load` committed,
/// stops `caudal run` (SIGTERM; it must exit 0) and reports the
/// commit-to-delivery percentiles of the changes committed after the
/// warm-up, as the JSON line's object.
async fn finish_latency(
    args: &Args,
    scenario: &str,
    max_wait_ms: u64,
    receiver: &Receiver,
    caudal: Measured,
    dir: &Path,
    load: &Load,
) -> anyhow::Result<serde_json::Value> {
    wait_for_records(receiver, load.written.total(), &caudal, dir).await?;
    caudal.terminate()?;
    let ended = wait_exit(caudal, dir, "caudal run").await?;

    let mut latencies_us: Vec<i64> = receiver
        .arrivals()
        .iter()
        .filter(|a| a.commit_us >= load.measure_from_us)
        .map(|a| a.arrived_us - a.commit_us)
        .collect();
    latencies_us.sort_unstable();
    if latencies_us.is_empty() {
        bail!("no change committed after the warm-up arrived with a readable commit time");
    }
    let ms = |p: f64| round(percentile(&latencies_us, p) as f64 / 1000.0);
    Ok(json!({
        "scenario": scenario,
        "target_changes_per_s": args.rate,
        "txn_rows": args.txn_rows,
        "warmup_secs": LATENCY_WARMUP.as_secs(),
        "duration_secs": args.duration,
        "achieved_changes_per_s": round(load.achieved),
        "committed": load.written.total(),
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
    }))
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of sorted values.
pub(crate) fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A fresh directory for the config, the state, the buffer and the log.
pub(crate) fn scratch_dir(scenario: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("caudal-bench-{}-{scenario}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes caudal's configuration: the CDC source `[sources.NAME]` with
/// `source_fields` (and `page_size` when `--page-size` is given), the
/// receiver as an HTTP sink (batches of `--batch`, `max_wait_ms`, default
/// delivery: `ack = "buffered"`, every batch fsynced into the buffer before
/// it is sent) and the pipeline `bench` between them.
pub(crate) fn write_config(
    dir: &Path,
    (source, source_fields): (&str, &str),
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

[sources.{source}]
{source_fields}{page_size}
[sinks.recv]
type = "http"
url = "http://{addr}/ingest"
batch = {{ max_records = {batch}, max_wait = "{max_wait_ms}ms" }}
concurrency = {concurrency}

[pipelines.bench]
source = "{source}"
sink = "recv"
"#,
            state = dir.join("state.db").display(),
            batch = args.batch,
            concurrency = args.concurrency,
        ),
    )?;
    Ok(config)
}

/// Starts `subject`'s caudal with `subcommand`, its output going to
/// `DIR/caudal.log`.
pub(crate) fn spawn_caudal(
    subject: Subject<'_>,
    config: &Path,
    dir: &Path,
    subcommand: &[&str],
) -> anyhow::Result<Measured> {
    let log = std::fs::File::create(dir.join("caudal.log"))?;
    let mut cmd = Command::new(subject.binary);
    cmd.arg("-c")
        .arg(config)
        .args(subcommand)
        .env("CAUDAL_LOG", "info")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    Measured::spawn(cmd).with_context(|| {
        if subject.name == BASELINE {
            format!("cannot run the baseline {}", subject.binary.display())
        } else {
            format!(
                "cannot run {} (build it: cargo build --release -p caudal)",
                subject.binary.display()
            )
        }
    })
}

/// A scratch subdirectory of `dir` for `subject`'s configuration, state,
/// buffer and log, when a baseline is measured too (each build starts from
/// a state of its own); `dir` itself otherwise.
pub(crate) fn subject_dir(
    args: &Args,
    dir: &Path,
    subject: Subject<'_>,
) -> anyhow::Result<PathBuf> {
    if args.baseline_caudal.is_none() {
        return Ok(dir.to_path_buf());
    }
    let sub = dir.join(subject.name);
    std::fs::create_dir_all(&sub)?;
    Ok(sub)
}

/// A latency scenario's report with the baseline's run beside caudal's:
/// its percentiles, rate and peak RSS as `baseline_…`, and
/// `caudal_over_baseline` (the baseline's p50 over caudal's, above 1 =
/// caudal is faster) and `caudal_over_baseline_p99`.
fn with_baseline_latency(
    mut report: serde_json::Value,
    baseline: Option<serde_json::Value>,
) -> serde_json::Value {
    let Some(b) = baseline else {
        return report;
    };
    let ratio = |k: &str| match (b[k].as_f64(), report[k].as_f64()) {
        (Some(b), Some(c)) if c > 0.0 => json!(round(b / c)),
        _ => serde_json::Value::Null,
    };
    let more = json!({
        "baseline_achieved_changes_per_s": b["achieved_changes_per_s"],
        "baseline_timed": b["timed"],
        "baseline_p50_ms": b["p50_ms"],
        "baseline_p95_ms": b["p95_ms"],
        "baseline_p99_ms": b["p99_ms"],
        "baseline_max_ms": b["max_ms"],
        "baseline_peak_rss_mib": b["caudal_peak_rss_mib"],
        "caudal_over_baseline": ratio("p50_ms"),
        "caudal_over_baseline_p99": ratio("p99_ms"),
    });
    crate::subject::extend(&mut report, more);
    report
}

/// Waits until the receiver has counted `target` records; returns the
/// seconds since caudal started. Fails when caudal exits first or nothing
/// arrives for [`STALL_TIMEOUT`].
pub(crate) async fn wait_for_records(
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

/// Waits up to [`STALL_TIMEOUT`] for caudal to exit; it must succeed.
pub(crate) async fn wait_exit(caudal: Measured, dir: &Path, what: &str) -> anyhow::Result<Ended> {
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
