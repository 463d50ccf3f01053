//! `footprint`: what caudal costs a machine when it is only waiting.
//!
//! `caudal run` with the embedded defaults (SQLite state, local buffer), one
//! hourly pipeline from a SQLite table of 1,000 rows to the receiver, and
//! `[server]` on a free loopback port, started five times on the same state:
//! - startup-to-ready: from spawning the process until `/readyz` answers
//!   200 (the store answers and every pipeline started), polled every
//!   millisecond; the median of the five starts;
//! - RSS (`VmRSS`) `--idle-secs` seconds after the first start, before any
//!   run (the pipeline waits for its hour), and `--idle-secs` after a run of
//!   the 1,000 rows that the last start is asked for through the API
//!   (`POST /api/v1/pipelines/hourly/trigger`), with that process's
//!   high-water mark, and the private part of that idle RSS (`RssAnon`:
//!   heap and stacks; the rest is pages of the binary, shared and
//!   reclaimable);
//! - the binary's size.
//!
//! The reference is seed 001's own process between two hourly runs
//! (`schedule.every(1).hour`, a 60 s sleep loop, with requests, psycopg2
//! and schedule imported): time until it prints `ready`, and its RSS after
//! the same idle time.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::Executor as _;

use crate::cdc::{scratch_dir, spawn_caudal, wait_exit};
use crate::process::Measured;
use crate::receiver;
use crate::{Args, round};

/// Starts measured for startup-to-ready.
const STARTS: usize = 5;
/// The longest a start may take before the scenario fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let dir = scratch_dir("footprint")?;
    let receiver = receiver::start().await?;
    let source = dir.join("source.db");
    seed_source(&source).await?;

    let token = create_token(
        args,
        &write_config(&dir, &source, receiver.addr, free_port()?)?,
    )?;

    let mut ready_ms = Vec::new();
    let (mut fresh_rss, mut idle_rss, mut peak_rss) = (None, None, None);
    let mut idle_anon = None;
    for start in 0..STARTS {
        let addr = free_port()?;
        let config = write_config(&dir, &source, receiver.addr, addr)?;
        let caudal = spawn_caudal(args, &config, &dir, &["run"])?;
        ready_ms.push(wait_ready(&caudal, addr, &dir).await? * 1000.0);
        if start == 0 {
            // Before any run: the hourly pipeline waits for its hour.
            tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
            fresh_rss = Some(caudal.rss_mib()?);
        }
        if start + 1 == STARTS {
            // After a run of 1,000 rows, asked for through the API.
            request(
                addr,
                "POST",
                "/api/v1/pipelines/hourly/trigger",
                Some(&token),
            )
            .filter(|status| *status == 200)
            .context("the trigger was not accepted")?;
            let asked = Instant::now();
            while receiver.records() < SOURCE_ROWS {
                if asked.elapsed() > READY_TIMEOUT {
                    bail!(
                        "caudal delivered {} of {SOURCE_ROWS} rows (log: {})",
                        receiver.records(),
                        dir.join("caudal.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
            idle_rss = Some(caudal.rss_mib()?);
            idle_anon = Some(caudal.anon_rss_mib()?);
        }
        caudal.terminate()?;
        let ended = wait_exit(caudal, &dir, "caudal run").await?;
        if start + 1 == STARTS {
            peak_rss = Some(ended.peak_rss_mib);
        }
    }
    let (fresh_rss, idle_rss, idle_anon, peak_rss) =
        match (fresh_rss, idle_rss, idle_anon, peak_rss) {
            (Some(f), Some(i), Some(a), Some(p)) => (f, i, a, p),
            _ => bail!("no idle reading"),
        };
    ready_ms.sort_by(f64::total_cmp);
    let ready_median = ready_ms[STARTS / 2];
    let binary_mib = std::fs::metadata(&args.caudal)?.len() as f64 / (1024.0 * 1024.0);

    eprintln!("footprint: seed 001's scheduler process");
    let (seed_ready_ms, seed_rss, seed_anon) = seed_idle(args, &dir).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "scenario": "footprint",
        "binary_mib": round(binary_mib),
        "ready_ms": round(ready_median),
        "ready_ms_each": ready_ms.iter().map(|&ms| round(ms)).collect::<Vec<_>>(),
        "idle_secs": args.idle_secs,
        "fresh_rss_mib": round(fresh_rss),
        "idle_rss_mib": round(idle_rss),
        "idle_anon_rss_mib": round(idle_anon),
        "peak_rss_mib": round(peak_rss),
        "seed001_ready_ms": round(seed_ready_ms),
        "seed001_idle_rss_mib": round(seed_rss),
        "seed001_idle_anon_rss_mib": round(seed_anon),
        "seed001_rss_over_caudal": round(seed_rss / idle_rss),
        "seed001_anon_rss_over_caudal": round(seed_anon / idle_anon),
        "seed001_ready_over_caudal": round(seed_ready_ms / ready_median),
    }))
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
        if request(addr, "GET", "/readyz", None) == Some(200) {
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

/// An HTTP/1.1 request to caudal's server; the answer's status, `None`
/// when there was no answer.
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: caudal\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let status = answer.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    std::str::from_utf8(status).ok()?.parse().ok()
}

/// `caudal token create`: an operator token for the trigger.
fn create_token(args: &Args, config: &Path) -> anyhow::Result<String> {
    let out = Command::new(&args.caudal)
        .arg("-c")
        .arg(config)
        .args(["token", "create", "--name", "bench", "--role", "operator"])
        .output()
        .with_context(|| format!("cannot run {}", args.caudal.display()))?;
    if !out.status.success() {
        bail!(
            "caudal token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    if token.is_empty() {
        bail!("caudal token create printed no token");
    }
    Ok(token)
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
