//! `footprint`: what caudal costs a machine when it is only waiting.
//!
//! `caudal run` with the embedded defaults (SQLite state, local buffer), one
//! hourly pipeline from a SQLite table of 1,000 rows to the receiver, and
//! `[server]` on a free loopback port, started five times on the same state:
//! - startup-to-ready: from spawning the process until `/readyz` answers
//!   200 (the store answers and every pipeline started), polled every
//!   millisecond; the median of the five starts;
//! - RSS (`VmRSS`) `--idle-secs` seconds after the first start's run of
//!   the 1,000 rows (a pipeline that never ran runs at once), with that
//!   process's high-water mark and the private part of its RSS (`RssAnon`:
//!   heap and stacks; the rest is pages of the binary, shared and
//!   reclaimable); and `--idle-secs` after the last start, a restart
//!   within the hour that waits for the next one and runs nothing;
//! - the binary's size.
//!
//! The reference is seed 001's own process between two hourly runs
//! (`schedule.every(1).hour`, a 60 s sleep loop, with requests, psycopg2
//! and schedule imported): time until it prints `ready`, and its RSS after
//! the same idle time. With `--baseline-caudal`, the baseline build makes
//! the same five starts from a directory, source and receiver of its own.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::Executor as _;

use crate::cdc::{scratch_dir, spawn_caudal, subject_dir, wait_exit};
use crate::process::Measured;
use crate::receiver;
use crate::subject::{self, Subject};
use crate::{Args, round};

/// Starts measured for startup-to-ready.
const STARTS: usize = 5;
/// The longest a start may take before the scenario fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let dir = scratch_dir("footprint")?;
    let mut measured = Vec::new();
    for subject in args.subjects() {
        let sub = subject_dir(args, &dir, subject)?;
        measured.push((subject, starts(subject, &sub, args.idle_secs).await?));
    }
    let (caudal, baseline) = subject::split(measured)?;

    eprintln!("footprint: seed 001's scheduler process");
    let (seed_ready_ms, seed_rss, seed_anon) = seed_idle(args, &dir).await?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = json!({
        "scenario": "footprint",
        "binary_mib": round(caudal.binary_mib),
        "ready_ms": round(caudal.ready_ms),
        "ready_ms_each": caudal.ready_ms_each.iter().map(|&ms| round(ms)).collect::<Vec<_>>(),
        "idle_secs": args.idle_secs,
        "idle_rss_mib": round(caudal.idle_rss),
        "idle_anon_rss_mib": round(caudal.idle_anon),
        "peak_rss_mib": round(caudal.peak_rss),
        "restart_rss_mib": round(caudal.restart_rss),
        "restart_anon_rss_mib": round(caudal.restart_anon),
        "seed001_ready_ms": round(seed_ready_ms),
        "seed001_idle_rss_mib": round(seed_rss),
        "seed001_idle_anon_rss_mib": round(seed_anon),
        "seed001_rss_over_caudal": round(seed_rss / caudal.idle_rss),
        "seed001_anon_rss_over_caudal": round(seed_anon / caudal.idle_anon),
        "seed001_ready_over_caudal": round(seed_ready_ms / caudal.ready_ms),
    });
    if let Some(b) = baseline {
        subject::extend(
            &mut report,
            json!({
                "baseline_binary_mib": round(b.binary_mib),
                "baseline_ready_ms": round(b.ready_ms),
                "baseline_idle_rss_mib": round(b.idle_rss),
                "baseline_idle_anon_rss_mib": round(b.idle_anon),
                "baseline_peak_rss_mib": round(b.peak_rss),
                "baseline_restart_rss_mib": round(b.restart_rss),
                "caudal_over_baseline": round(b.idle_rss / caudal.idle_rss),
                "caudal_over_baseline_anon_rss": round(b.idle_anon / caudal.idle_anon),
                "caudal_over_baseline_ready": round(b.ready_ms / caudal.ready_ms),
            }),
        );
    }
    Ok(report)
}

/// What one build's five starts measured.
#[derive(Debug)]
struct Starts {
    binary_mib: f64,
    /// The median start.
    ready_ms: f64,
    /// Every start, sorted.
    ready_ms_each: Vec<f64>,
    /// `--idle-secs` after the first start's run.
    idle_rss: f64,
    idle_anon: f64,
    /// The first start's high-water mark.
    peak_rss: f64,
    /// `--idle-secs` after the last start, which runs nothing.
    restart_rss: f64,
    restart_anon: f64,
}

/// `subject`'s [`STARTS`] starts of `caudal run` in `dir`, with a source
/// and a receiver of their own.
async fn starts(subject: Subject<'_>, dir: &Path, idle_secs: u64) -> anyhow::Result<Starts> {
    eprintln!("footprint: {} run, {STARTS} starts", subject.name);
    let receiver = receiver::start().await?;
    let source = dir.join("source.db");
    seed_source(&source).await?;

    let mut ready_ms = Vec::new();
    let mut after_run = None;
    let mut restart = None;
    for start in 0..STARTS {
        let addr = free_port()?;
        let config = write_config(dir, &source, receiver.addr, addr)?;
        let caudal = spawn_caudal(subject, &config, dir, &["run"])?;
        ready_ms.push(wait_ready(&caudal, addr, dir).await? * 1000.0);
        if start == 0 {
            // A first start runs the pipeline at once (it never ran).
            let started = Instant::now();
            while receiver.records() < SOURCE_ROWS {
                if started.elapsed() > READY_TIMEOUT || caudal.has_exited() {
                    bail!(
                        "caudal delivered {} of {SOURCE_ROWS} rows (log: {})",
                        receiver.records(),
                        dir.join("caudal.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            after_run = Some((caudal.rss_mib()?, caudal.anon_rss_mib()?, 0.0));
        } else if start + 1 == STARTS {
            // A restart within the hour waits for the next one: no run.
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            if receiver.records() != SOURCE_ROWS {
                bail!(
                    "a restart ran the pipeline again ({} records delivered; log: {})",
                    receiver.records(),
                    dir.join("caudal.log").display()
                );
            }
            restart = Some((caudal.rss_mib()?, caudal.anon_rss_mib()?));
        }
        caudal.terminate()?;
        let ended = wait_exit(caudal, dir, "caudal run").await?;
        if start == 0 {
            after_run = after_run.map(|(rss, anon, _)| (rss, anon, ended.peak_rss_mib));
        }
    }
    let ((idle_rss, idle_anon, peak_rss), (restart_rss, restart_anon)) =
        after_run.zip(restart).context("no idle reading")?;
    ready_ms.sort_by(f64::total_cmp);
    Ok(Starts {
        binary_mib: std::fs::metadata(subject.binary)?.len() as f64 / (1024.0 * 1024.0),
        ready_ms: ready_ms[STARTS / 2],
        ready_ms_each: ready_ms,
        idle_rss,
        idle_anon,
        peak_rss,
        restart_rss,
        restart_anon,
    })
}

/// Rows in the pipeline's source table.
const SOURCE_ROWS: u64 = 1000;

/// A SQLite database with [`SOURCE_ROWS`] rows for the pipeline's run.
async fn seed_source(path: &Path) -> anyhow::Result<()> {
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = sqlx::SqlitePool::connect(&url).await?;
    db.execute(
        "CREATE TABLE requests (id INTEGER PRIMARY KEY, status TEXT NOT NULL, modified TEXT NOT NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
         INSERT INTO requests SELECT i, 'open', printf('2026-01-01T00:%02d:%02dZ', i / 60 % 60, i % 60) FROM n;",
    )
    .await?;
    db.close().await;
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn write_config(
    dir: &Path,
    source: &Path,
    receiver: SocketAddr,
    listen: SocketAddr,
) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("caudal.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[server]
listen = "{listen}"

[sources.desk]
type = "sqlite"
url = "sqlite://{source}"
table = "requests"
cursor = ["modified", "id"]

[sinks.partner]
type = "http"
url = "http://{receiver}/services-data/requests"

[pipelines.hourly]
source = "desk"
sink = "partner"
schedule = {{ every = "1h" }}
"#,
            state = dir.join("state.db").display(),
            source = source.display(),
        ),
    )?;
    Ok(config)
}

/// Polls `GET /readyz` until it answers 200; seconds since the spawn.
async fn wait_ready(caudal: &Measured, addr: SocketAddr, dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        if ready(addr) {
            return Ok(caudal.elapsed_secs());
        }
        if caudal.has_exited() || started.elapsed() > READY_TIMEOUT {
            bail!(
                "caudal run was not ready within {} s (log: {})",
                READY_TIMEOUT.as_secs(),
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether caudal's `/readyz` answers 200 now.
fn ready(addr: SocketAddr) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let head = "GET /readyz HTTP/1.1\r\nHost: caudal\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

/// Seed 001's scheduler: milliseconds until it printed `ready`, and its RSS
/// and private RSS after `--idle-secs`.
async fn seed_idle(args: &Args, dir: &Path) -> anyhow::Result<(f64, f64, f64)> {
    let out = dir.join("seed-idle.out");
    let mut cmd = Command::new(&args.python);
    cmd.arg(args.seeds.join("seed001_send_interval_data.py"))
        .arg("--idle")
        .stdout(Stdio::from(std::fs::File::create(&out)?))
        .stderr(Stdio::inherit());
    let seed = Measured::spawn(cmd).with_context(|| {
        format!(
            "cannot run {} (bench/run installs a virtualenv with the seeds' packages)",
            args.python.display()
        )
    })?;
    let started = Instant::now();
    let ready_ms = loop {
        if std::fs::read_to_string(&out).is_ok_and(|s| s.contains("ready")) {
            break seed.elapsed_secs() * 1000.0;
        }
        if seed.has_exited() || started.elapsed() > READY_TIMEOUT {
            bail!("the seed's scheduler did not print ready");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (rss, anon) = (seed.rss_mib()?, seed.anon_rss_mib()?);
    seed.terminate()?;
    seed.wait().await?;
    Ok((ready_ms, rss, anon))
}
