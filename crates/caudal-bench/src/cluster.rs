//! `cluster-failover`: three `caudal run` nodes under `[cluster]` (default
//! lease) on one PostgreSQL state store share a CDC pipeline, `ack =
//! "delivered"`, from a table a load generator writes 250 rows/s into, to
//! the always-200 receiver. Each trial SIGKILLs the node that owns the
//! pipeline and times, from the kill:
//! - `takeover`: until another node holds the pipeline's owner lease (the
//!   dead node's lease running out, plus the live nodes' claim poll);
//! - `failover`: until the receiver gets the first records after the kill,
//!   which only the new owner can send (kill -9 → first delivery).
//!
//! The killed node is started again (and waited for) before the next
//! trial. Reported: p50, p99 and max of both over the trials (`--trials`,
//! default 20), against the lease: the floor of a lease-based failover,
//! which waits for the dead node's lease to run out.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Executor as _, PgPool};

use crate::cdc::postgres::{connect_admin, create_slot, provision, source_fields, teardown};
use crate::cdc::{percentile, scratch_dir, spawn_caudal};
use crate::process::Measured;
use crate::subject::{CAUDAL, Subject};
use crate::{Args, database_url, receiver, round};

/// Nodes of the cluster.
const NODES: usize = 3;
/// The state store's database.
const STATE_DB: &str = "caudal_bench_state";
/// The pipeline's slot.
const SLOT: &str = "caudal_bench_cluster";
/// The goal for the p99 of `failover`.
const GOAL_P99_SECS: f64 = 10.0;
/// Longest wait for any one step.
const PATIENCE: Duration = Duration::from_secs(90);

/// One node: its directory and, while it runs, its process.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    process: Option<Measured>,
}

/// Runs `cluster-failover`, then drops what it created.
pub async fn failover(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let result = failover_run(args, &admin).await;
    let state_dropped = admin
        .execute("DROP DATABASE IF EXISTS caudal_bench_state WITH (FORCE)")
        .await
        .map(drop)
        .context("cannot drop the state store's database");
    let cleaned = teardown(&admin).await;
    result.and_then(|r| state_dropped.and(cleaned).map(|()| r))
}

async fn failover_run(args: &Args, admin: &PgPool) -> anyhow::Result<Value> {
    let trials = args.trials;
    let (url, db) = provision(args, admin).await?;
    create_slot(&db, SLOT).await?;
    admin
        .execute("DROP DATABASE IF EXISTS caudal_bench_state WITH (FORCE)")
        .await?;
    admin.execute("CREATE DATABASE caudal_bench_state").await?;
    let state_url = database_url(&args.pg_url, STATE_DB);
    let state = PgPool::connect(&state_url).await?;
    let recv = receiver::start().await?;
    let dir = scratch_dir("cluster-failover")?;
    let lease = caudal_core::config::cluster::DEFAULT_CLUSTER_LEASE.as_std();
    let config = format!(
        r#"[state]
url = "{state_url}"
buffer_dir = "buffer"

[cluster]

[sources.pg]
{source}
[sinks.recv]
type = "http"
url = "http://{addr}/ingest"
batch = {{ max_records = {batch}, max_wait = "20ms" }}

[pipelines.bench]
source = "pg"
sink = "recv"
ack = "delivered"
"#,
        source = source_fields(&url, SLOT),
        addr = recv.addr,
        batch = args.batch,
    );
    let subject = Subject {
        name: CAUDAL,
        binary: &args.caudal,
    };
    let mut nodes = start_nodes(subject, &dir, NODES, &config)?;
    let load = tokio::spawn(write_steadily(db.clone()));
    let result = async {
        let mut takeovers = Vec::new();
        let mut failovers = Vec::new();
        for trial in 1..=trials {
            let holder = wait_owner(&state, None).await?;
            wait_records(&recv, recv.records() + 100).await?;
            let victim = node_of(&nodes, &holder)?;
            let at_kill = recv.records();
            let killed = Instant::now();
            if let Some(p) = nodes[victim].process.take() {
                p.kill()?;
                p.wait().await?;
            }
            let new_holder = wait_owner(&state, Some(&holder)).await?;
            let took = killed.elapsed().as_secs_f64();
            wait_records(&recv, at_kill + 1).await?;
            let failed_over = killed.elapsed().as_secs_f64();
            eprintln!(
                "cluster-failover: trial {trial}/{trials}: killed n{}; n{} took the pipeline after \
                 {took:.2} s, first delivery after {failed_over:.2} s",
                victim + 1,
                node_of(&nodes, &new_holder).map_or(0, |i| i + 1)
            );
            takeovers.push(took);
            failovers.push(failed_over);
            let n = &mut nodes[victim];
            n.process = Some(spawn_caudal(subject, &n.config, &n.dir, &["run"])?);
            wait_nodes(&state, NODES).await?;
        }
        Ok::<_, anyhow::Error>((takeovers, failovers))
    }
    .await;
    load.abort();
    for n in &mut nodes {
        if let Some(p) = n.process.take() {
            let _ = p.terminate();
            let _ = p.wait().await;
        }
    }
    state.close().await;
    db.close().await;
    let (takeovers, failovers) = result?;
    let stats = |xs: &[f64]| {
        let mut us: Vec<i64> = xs.iter().map(|s| (s * 1e6) as i64).collect();
        us.sort_unstable();
        (
            percentile(&us, 0.5) as f64 / 1e6,
            percentile(&us, 0.99) as f64 / 1e6,
            us.last().copied().unwrap_or(0) as f64 / 1e6,
        )
    };
    let (t50, t99, tmax) = stats(&takeovers);
    let (f50, f99, fmax) = stats(&failovers);
    let lease_s = lease.as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "scenario": "cluster_failover",
        "nodes": NODES,
        "trials": trials,
        "lease_s": lease_s,
        "takeover_p50_s": round(t50),
        "takeover_p99_s": round(t99),
        "takeover_max_s": round(tmax),
        "failover_p50_s": round(f50),
        "failover_p99_s": round(f99),
        "failover_max_s": round(fmax),
        "failover_p50_over_lease": round(f50 / lease_s),
        "failover_p99_over_lease": round(f99 / lease_s),
        "goal_failover_p99_s": GOAL_P99_SECS,
    }))
}

/// Starts `count` `caudal run` nodes with `config`, each in its own
/// directory `dir/n<i>`.
fn start_nodes(
    subject: Subject<'_>,
    dir: &std::path::Path,
    count: usize,
    config: &str,
) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for i in 1..=count {
        let node_dir = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let path = node_dir.join("caudal.toml");
        std::fs::write(&path, config)?;
        let process = Some(spawn_caudal(subject, &path, &node_dir, &["run"])?);
        nodes.push(Node {
            dir: node_dir,
            config: path,
            process,
        });
    }
    Ok(nodes)
}

/// Inserts 5 rows every 20 ms until aborted.
async fn write_steadily(db: PgPool) -> anyhow::Result<()> {
    let mut next = 1i64;
    loop {
        sqlx::query(
            "INSERT INTO bench_changes (id, account, amount, note)
             SELECT g, (g % 1000)::int, (g % 100000) / 100.0, 'payment ' || g
             FROM generate_series($1::int8, $2::int8) g",
        )
        .bind(next)
        .bind(next + 4)
        .execute(&db)
        .await?;
        next += 5;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a node other than `not` holds the pipeline's owner lease;
/// returns the holder.
async fn wait_owner(state: &PgPool, not: Option<&str>) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let holder: Option<(String,)> = sqlx::query_as(
            "SELECT holder FROM leases WHERE name = 'owner/bench' \
             AND expires_at > (SELECT now_us FROM clock)",
        )
        .fetch_optional(state)
        .await
        .unwrap_or(None);
        if let Some((h,)) = holder
            && Some(h.as_str()) != not
        {
            return Ok(h);
        }
        if started.elapsed() > PATIENCE {
            bail!("no node took the pipeline within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `n` nodes beat their heartbeat as active cluster members.
async fn wait_nodes(state: &PgPool, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        // No table yet: the nodes are still creating the store.
        let (live,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM nodes WHERE state = 'active' AND cluster \
             AND heartbeat_at > (SELECT now_us FROM clock) - 3000000",
        )
        .fetch_one(state)
        .await
        .unwrap_or((0,));
        if usize::try_from(live).unwrap_or(0) >= n {
            return Ok(());
        }
        if started.elapsed() > PATIENCE {
            bail!("{live} of {n} nodes live after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the receiver has counted `n` records.
async fn wait_records(recv: &receiver::Receiver, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    while recv.records() < n {
        if started.elapsed() > PATIENCE {
            bail!(
                "{} of {n} records arrived within {PATIENCE:?}",
                recv.records()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// The node whose process holds `holder` (`host:pid:nonce`).
fn node_of(nodes: &[Node], holder: &str) -> anyhow::Result<usize> {
    let pid: u32 = holder
        .split(':')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in the lease holder {holder:?}"))?;
    nodes
        .iter()
        .position(|n| n.process.as_ref().is_some_and(|p| p.pid() == pid))
        .with_context(|| format!("the holder {holder:?} is none of the nodes"))
}

/// Cluster-wide slots of `cluster-dispatch`'s pool, and graphile-worker's
/// concurrency.
const DISPATCH_SLOTS: usize = 16;

/// `cluster-dispatch`: a workflow whose one task fans out into N no-op
/// command instances (`true`, `--rows`, default 5,000) in a cluster-wide
/// pool of 16, run by 1, 2 and 3 `caudal run` nodes under `[cluster]` on
/// one PostgreSQL state store: every node claims attempts from the store.
/// Rate: N over the span from the first instance's start to the last one's
/// end, as the store recorded them. The reference, in the same run and on
/// the same server: graphile-worker (bench/graphile/dispatch.js), N jobs
/// each running `true` as a child process, one worker of concurrency 16.
pub async fn dispatch(args: &Args) -> anyhow::Result<Vec<Value>> {
    let tasks = args.rows.unwrap_or(5_000) as usize;
    let admin = connect_admin(args).await?;
    let result = dispatch_run(args, &admin, tasks).await;
    for db in [STATE_DB, "caudal_bench_graphile"] {
        let _ = admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await;
    }
    result
}

async fn dispatch_run(args: &Args, admin: &PgPool, tasks: usize) -> anyhow::Result<Vec<Value>> {
    eprintln!(
        "cluster-dispatch: graphile-worker, {tasks} jobs running `true`, concurrency {DISPATCH_SLOTS} (the reference)"
    );
    admin
        .execute("DROP DATABASE IF EXISTS caudal_bench_graphile WITH (FORCE)")
        .await?;
    admin
        .execute("CREATE DATABASE caudal_bench_graphile")
        .await?;
    let graphile = graphile_dispatch(&database_url(&args.pg_url, "caudal_bench_graphile"), tasks)?;
    eprintln!("cluster-dispatch: graphile-worker ran {graphile:.0} jobs/s");
    let subject = Subject {
        name: CAUDAL,
        binary: &args.caudal,
    };
    let mut out = Vec::new();
    for count in 1..=NODES {
        admin
            .execute("DROP DATABASE IF EXISTS caudal_bench_state WITH (FORCE)")
            .await?;
        admin.execute("CREATE DATABASE caudal_bench_state").await?;
        let state_url = database_url(&args.pg_url, STATE_DB);
        let dir = scratch_dir(&format!("cluster-dispatch-{count}"))?;
        let config = format!(
            "[state]\nurl = \"{state_url}\"\nruns_dir = \"{runs}\"\n\n[cluster]\n\n{body}",
            runs = dir.join("runs").display(),
            body = crate::workflows::noop_fan_out(tasks, DISPATCH_SLOTS),
        );
        let mut nodes = start_nodes(subject, &dir, count, &config)?;
        let state = PgPool::connect(&state_url).await?;
        let measured = async {
            wait_nodes(&state, count).await?;
            eprintln!("cluster-dispatch: caudal, {tasks} tasks, {count} node(s)");
            let queued = std::process::Command::new(&args.caudal)
                .arg("--config")
                .arg(&nodes[0].config)
                .args(["workflow", "run", "dispatch"])
                .env("CAUDAL_LOG", "warn")
                .output()?;
            if !queued.status.success() {
                bail!("caudal workflow run dispatch failed ({})", queued.status);
            }
            wait_run_ended(&state).await?;
            let (n, first, last, nodes_used): (i64, Option<i64>, Option<i64>, i64) =
                sqlx::query_as(
                    "SELECT count(*), min(started_at), max(ended_at), count(DISTINCT holder) \
                     FROM workflow_attempts WHERE task = 'noop' AND state = 'succeeded'",
                )
                .fetch_one(&state)
                .await?;
            if usize::try_from(n).unwrap_or(0) != tasks {
                bail!("{n} noop attempts succeeded, not {tasks}");
            }
            let span = (last.unwrap_or(0) - first.unwrap_or(0)) as f64 / 1e6;
            Ok::<_, anyhow::Error>((span, nodes_used))
        }
        .await;
        for n in &mut nodes {
            if let Some(p) = n.process.take() {
                let _ = p.terminate();
                let _ = p.wait().await;
            }
        }
        state.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        let (span, nodes_used) = measured?;
        let rate = tasks as f64 / span;
        eprintln!("cluster-dispatch: {count} node(s) ran {rate:.0} tasks/s");
        out.push(json!({
            "scenario": "cluster_dispatch",
            "nodes": count,
            "tasks": tasks,
            "slots": DISPATCH_SLOTS,
            "nodes_that_ran_tasks": nodes_used,
            "caudal_tasks_per_s": round(rate),
            "caudal_span_s": round(span),
            "graphile_jobs_per_s": round(graphile),
            "caudal_over_graphile": round(rate / graphile),
        }));
    }
    Ok(out)
}

/// Waits until workflow run 1 has ended; fails unless it succeeded.
async fn wait_run_ended(state: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let row: Option<(String,)> = sqlx::query_as("SELECT state FROM workflow_runs WHERE id = 1")
            .fetch_optional(state)
            .await?;
        match row.as_ref().map(|(s,)| s.as_str()) {
            Some("succeeded") => return Ok(()),
            Some("failed" | "cancelled") => bail!("the workflow run ended {row:?}"),
            _ => {}
        }
        if started.elapsed() > PATIENCE * 4 {
            bail!("the workflow run did not end within {:?}", PATIENCE * 4);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// bench/graphile/dispatch.js on `url`: jobs/s.
fn graphile_dispatch(url: &str, tasks: usize) -> anyhow::Result<f64> {
    let out = std::process::Command::new("node")
        .arg("bench/graphile/dispatch.js")
        .arg(url)
        .arg(tasks.to_string())
        .arg(DISPATCH_SLOTS.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run node (bench/run installs bench/graphile's packages)")?;
    if !out.status.success() {
        bail!("bench/graphile/dispatch.js failed ({})", out.status);
    }
    let line: Value = serde_json::from_slice(&out.stdout).context("dispatch.js's JSON line")?;
    if line["jobs"].as_u64() != Some(tasks as u64) {
        bail!("graphile-worker's dispatch: {line}");
    }
    line["jobs_per_s"].as_f64().context("jobs_per_s")
}
