//! `workflow-dispatch` and `workflow-chain`: what caudal's workflow
//! executor adds to the work it starts.
//!
//! - `workflow-dispatch`: a workflow whose one task fans out into N no-op
//!   instances (`true`, default 10,000) in a pool of 2 × cores slots, run
//!   by `caudal workflow run --wait` on a SQLite store and on a PostgreSQL
//!   store. Rate: N over the time from the first instance's start to the
//!   last one's end, as the store recorded them. The ceiling, measured in
//!   the same run: this harness spawning `true` N times and waiting for
//!   each, on the same number of threads, with no bookkeeping at all.
//! - `workflow-chain`: 200 tasks, each depending on the one before, each
//!   running `caudal-stamp` (a std-only program of this crate that appends
//!   when its `main` began and when it ended). Latency of a link: from one
//!   task's end to the next task's `main`, as the tasks themselves saw it:
//!   the exit, the executor noticing it, committing both state changes,
//!   and starting the next process are all inside. p50 and p99 over the
//!   199 links, on SQLite and on PostgreSQL. The reference: graphile-worker
//!   (npm) on the same PostgreSQL, a chain of 200 jobs each adding the next
//!   as its last act, from the end of one job's function to the start of
//!   the next's (bench/graphile/chain.js) — in one process, with no
//!   process to start, so the comparison favours it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cdc::scratch_dir;
use crate::process::Measured;
use crate::{Args, round};

/// Links of the chain.
const CHAIN: usize = 200;

fn slots() -> usize {
    2 * std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A fresh PostgreSQL database `name` on the harness's server; its url.
async fn fresh_pg(args: &Args, name: &str) -> anyhow::Result<String> {
    use sqlx::Connection as _;
    use sqlx::Executor as _;
    let mut admin = sqlx::PgConnection::connect(&args.pg_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {} (scripts/test --services-only)",
                args.pg_url
            )
        })?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    Ok(crate::database_url(&args.pg_url, name))
}

/// `caudal --config CONFIG ARGS`, to its end; its stdout.
fn caudal(args: &Args, config: &Path, rest: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&args.caudal)
        .arg("--config")
        .arg(config)
        .args(rest)
        .env("CAUDAL_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", args.caudal.display()))?;
    if !out.status.success() {
        bail!("caudal {rest:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the workflow `name` of `config` with `--wait` under a peak-RSS
/// sampler; (wall seconds, peak RSS MiB).
async fn run_wait(args: &Args, config: &Path, name: &str) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(&args.caudal);
    cmd.arg("--config")
        .arg(config)
        .args(["workflow", "run", name, "--wait"])
        .env("CAUDAL_LOG", "warn")
        .stdout(Stdio::null());
    let ended = Measured::spawn(cmd)?.wait().await?;
    if !ended.status.success() {
        bail!(
            "caudal workflow run {name} --wait failed ({})",
            ended.status
        );
    }
    Ok((ended.secs, ended.peak_rss_mib))
}

/// Every attempt of run 1, as `caudal workflow tasks 1 --attempts --json`
/// prints them.
fn attempts(args: &Args, config: &Path) -> anyhow::Result<Vec<Value>> {
    caudal(
        args,
        config,
        &["workflow", "tasks", "1", "--attempts", "--json"],
    )?
    .lines()
    .map(|l| serde_json::from_str(l).context("an attempt line"))
    .collect()
}

fn micros(v: &Value) -> anyhow::Result<i64> {
    let t: jiff::Timestamp = v
        .as_str()
        .context("a time")?
        .parse()
        .context("an RFC 3339 time")?;
    Ok(t.as_microsecond())
}

fn write_config(dir: &Path, state_url: &str, body: &str) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("caudal.toml");
    std::fs::write(
        &config,
        format!("[state]\nurl = \"{state_url}\"\nruns_dir = \"runs\"\n\n{body}"),
    )?;
    Ok(config)
}

/// The ceiling: spawn and wait `true` `tasks` times on `threads` threads.
fn spawn_ceiling(tasks: usize, threads: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < tasks {
                        let status = Command::new("true").status()?;
                        if !status.success() {
                            bail!("`true` failed");
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a spawner panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(tasks as f64 / started.elapsed().as_secs_f64())
}

pub async fn dispatch(args: &Args) -> anyhow::Result<Vec<Value>> {
    let tasks = args.rows.unwrap_or(10_000) as usize;
    let slots = slots();
    let body = noop_fan_out(tasks, slots);
    eprintln!("workflow-dispatch: spawning `true` {tasks} times on {slots} threads (the ceiling)");
    let ceiling = tokio::task::spawn_blocking(move || spawn_ceiling(tasks, slots)).await??;
    let mut out = Vec::new();
    for store in ["sqlite", "postgres"] {
        let dir = scratch_dir(&format!("workflow-dispatch-{store}"))?;
        let url = match store {
            "sqlite" => format!("sqlite://{}/state.db", dir.display()),
            _ => fresh_pg(args, "caudal_bench_workflows").await?,
        };
        let config = write_config(&dir, &url, &body)?;
        eprintln!("workflow-dispatch: caudal, {tasks} tasks, {store} store");
        let (wall, peak) = run_wait(args, &config, "dispatch").await?;
        let all = attempts(args, &config)?;
        let noop: Vec<&Value> = all.iter().filter(|a| a["task"] == "noop").collect();
        if noop.len() != tasks {
            bail!("{} noop attempts recorded, not {tasks}", noop.len());
        }
        let first = noop
            .iter()
            .map(|a| micros(&a["started_at"]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let last = noop
            .iter()
            .map(|a| micros(&a["ended_at"]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let span = (last.iter().max().copied().unwrap_or(0)
            - first.iter().min().copied().unwrap_or(0)) as f64
            / 1e6;
        let rate = tasks as f64 / span;
        let _ = std::fs::remove_dir_all(&dir);
        out.push(json!({
            "scenario": "workflow_dispatch",
            "store": store,
            "tasks": tasks,
            "slots": slots,
            "caudal_tasks_per_s": round(rate),
            "caudal_span_s": round(span),
            "caudal_wall_s": round(wall),
            "caudal_peak_rss_mib": round(peak),
            "ceiling_tasks_per_s": round(ceiling),
            "caudal_over_ceiling": round(rate / ceiling),
        }));
    }
    Ok(out)
}

/// Workflow `dispatch`: one task listing `tasks` items, fanned out into
/// as many no-op command instances (`true`) in pool `noop` of `slots`.
pub(crate) fn noop_fan_out(tasks: usize, slots: usize) -> String {
    format!(
        r#"[pools.noop]
slots = {slots}

[workflows.dispatch.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 {tasks} > \"$CAUDAL_ITEMS\""]

[workflows.dispatch.tasks.noop]
type = "command"
depends_on = ["list"]
for_each = "{{{{ tasks.list.items }}}}"
pool = "noop"
run = ["true"]
"#
    )
}

/// p50 and p99 of sorted values.
fn percentiles(sorted: &[f64]) -> (f64, f64) {
    let pick = |q: f64| {
        let i = ((sorted.len() as f64) * q).floor() as usize;
        sorted
            .get(i.min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pick(0.5), pick(0.99))
}

pub async fn chain(args: &Args) -> anyhow::Result<Vec<Value>> {
    let stamp = std::env::current_exe()?.with_file_name("caudal-stamp");
    if !stamp.is_file() {
        bail!(
            "{} is missing: cargo build --release -p caudal-bench",
            stamp.display()
        );
    }
    eprintln!("workflow-chain: graphile-worker, {CHAIN} jobs (the reference)");
    let gw_url = fresh_pg(args, "caudal_bench_graphile").await?;
    // The first chain installs graphile-worker's schema; the second is
    // measured.
    graphile_chain(&gw_url)?;
    let (gw_p50, gw_p99) = graphile_chain(&gw_url)?;
    let mut results = Vec::new();
    for store in ["sqlite", "postgres"] {
        let dir = scratch_dir(&format!("workflow-chain-{store}"))?;
        let url = match store {
            "sqlite" => format!("sqlite://{}/state.db", dir.display()),
            _ => fresh_pg(args, "caudal_bench_workflows").await?,
        };
        let stamps = dir.join("stamps.txt");
        let mut body = String::new();
        for i in 0..CHAIN {
            body.push_str(&format!(
                "[workflows.chain.tasks.t{i:03}]\ntype = \"command\"\nrun = [\"{}\", \"{}\"]\n",
                stamp.display(),
                stamps.display()
            ));
            if i > 0 {
                body.push_str(&format!("depends_on = [\"t{:03}\"]\n", i - 1));
            }
            body.push('\n');
        }
        let config = write_config(&dir, &url, &body)?;
        eprintln!("workflow-chain: caudal, {CHAIN} tasks, {store} store");
        let (wall, peak) = run_wait(args, &config, "chain").await?;
        let lines: Vec<(u128, u128)> = std::fs::read_to_string(&stamps)?
            .lines()
            .map(|l| {
                let (a, b) = l.split_once(' ').context("START END")?;
                Ok((a.parse()?, b.parse()?))
            })
            .collect::<anyhow::Result<_>>()?;
        if lines.len() != CHAIN {
            bail!("{} tasks ran, not {CHAIN}", lines.len());
        }
        let mut links: Vec<f64> = lines
            .windows(2)
            .map(|w| (w[1].0.saturating_sub(w[0].1)) as f64 / 1e6)
            .collect();
        links.sort_by(f64::total_cmp);
        let (p50, p99) = percentiles(&links);
        let _ = std::fs::remove_dir_all(&dir);
        results.push(json!({
            "scenario": "workflow_chain",
            "store": store,
            "links": links.len(),
            "caudal_p50_ms": round(p50),
            "caudal_p99_ms": round(p99),
            "caudal_wall_s": round(wall),
            "caudal_peak_rss_mib": round(peak),
            "graphile_p50_ms": round(gw_p50),
            "graphile_p99_ms": round(gw_p99),
            "graphile_over_caudal_p50": round(gw_p50 / p50),
            "graphile_over_caudal_p99": round(gw_p99 / p99),
        }));
    }
    Ok(results)
}

/// bench/graphile/chain.js on `url`: its p50 and p99 link latency, ms.
fn graphile_chain(url: &str) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("node")
        .arg("bench/graphile/chain.js")
        .arg(url)
        .arg(CHAIN.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run node (bench/run installs bench/graphile's packages)")?;
    if !out.status.success() {
        bail!("bench/graphile/chain.js failed ({})", out.status);
    }
    let line: Value = serde_json::from_slice(&out.stdout).context("chain.js's JSON line")?;
    if line["links"].as_u64() != Some((CHAIN - 1) as u64) {
        bail!("graphile-worker's chain: {line}");
    }
    Ok((
        line["p50_ms"].as_f64().context("p50_ms")?,
        line["p99_ms"].as_f64().context("p99_ms")?,
    ))
}
