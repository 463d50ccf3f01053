//! caudal's benchmark harness. Each scenario provisions what it needs,
//! measures caudal (the release binary as a separate process, or the
//! component alone) and a reference in the same run, and prints one JSON
//! line per result: figures stand as ratios against the reference because
//! machines here are noisy. With `--repeat N` each scenario runs N times
//! (a JSON line for each run, with its `run` number); the Markdown table
//! that follows the last scenario gives the median of each figure and
//! ratio with its range across the runs (see [`report`]). With
//! `--baseline-caudal PATH` every scenario that runs caudal's binary also
//! runs a baseline build on the same workload (see [`subject`]).
//!
//! Scenarios, in the order `all` runs them (docs/benchmarks.md has the
//! method of each):
//! - `initial-sync`: N rows (default 1,000,000) from PostgreSQL to a local
//!   always-200 HTTP receiver in batches of 1,000, against COPY into
//!   /dev/null (of the same ordered query; of the table, unordered, on one
//!   connection and in ctid ranges on `--copy-workers`, text and binary:
//!   the fastest is the read ceiling) and the seeds' Python senders on the
//!   same rows and receiver. See [`sync`].
//! - `steady-state`: the hourly run after the first: 10,000 changed rows in
//!   a 10,000,000-row table, against COPY of the same rows by the same
//!   index, and by a sequential scan. See [`sync`].
//! - `cdc-throughput`, `cdc-latency`: PostgreSQL CDC, against the server's
//!   own decoding of the same backlog (the ceiling) and `pg_recvlogical`;
//!   commit-to-delivery percentiles. See [`cdc::postgres`].
//! - `mysql-cdc-throughput`, `mysql-cdc-latency`: the same on MariaDB,
//!   against `mariadb-binlog`. See [`cdc::mariadb`].
//! - `buffer`: the durable buffer's write + read with an fsync per batch,
//!   against a plain sequential write + fdatasync of the same bytes. See
//!   [`buffer`].
//! - `http-sink`: the HTTP sink with 1 and 8 requests in flight, against
//!   the receiver's own request rate. See [`sink`].
//! - `footprint`: idle RSS, startup-to-ready, binary size, against the
//!   seed's Python scheduler. See [`footprint`].
//! - `workflow-dispatch`: no-op tasks started per second, against spawning
//!   the same processes with no bookkeeping; `workflow-chain`: latency from
//!   one task's end to the next one's start, against graphile-worker. See
//!   [`workflows`].
//! - `crawl`: pages per minute and peak RSS crawling a local fixture site
//!   of 20,000 pages with no politeness, against Scrapy on the same site
//!   with the same selectors; `crawl-limit`: the request rate caudal keeps
//!   to a site it must be polite to, from the site's access log. See
//!   [`crawl`].
//! - `dataset-write`: a report pipeline writing N sales rows (default
//!   10,000,000, over `--days`, default 100) from PostgreSQL into daily
//!   Parquet partitions by `caudal backfill`, rows/s and peak RSS, against
//!   pyarrow writing the same shape of rows from memory (the encoding
//!   ceiling) and COPY of each day's query into /dev/null (the read
//!   ceiling); `dataset-query`: the query API on what was written, one
//!   provider over one month, cold and cached p50/p99 and requests/s,
//!   against DuckDB reading the same Parquet files. See [`datasets`].
//! - `live-throughput`: `cdc-throughput`'s backlog (with `REPLICA IDENTITY
//!   FULL`) drained by `caudal once` through a live aggregate (per account,
//!   per minute: count, sum, p95, max), against the same drain without it
//!   from its own slot; the aggregate's windows must add up to the table.
//!   `live-latency`: commit to visible on the aggregate's SSE stream at a
//!   steady 5,000 changes/s, against the same changes' delivery to the
//!   HTTP receiver by the same process. See [`live`].
//! - `broker-sink`: N records of about 1 KB (default 100,000) read from
//!   PostgreSQL and published by `caudal once` to RabbitMQ (persistent,
//!   publisher confirms), NATS JetStream (acknowledged publishes) and Kafka
//!   (librdkafka's mock cluster, idempotent, `acks=all`), messages/s
//!   against a bare client publishing the same messages, encoded
//!   beforehand, with the same durability, pipelined (the ceiling).
//!   `broker-consumers`: N small messages (default 200,000) in a RabbitMQ
//!   queue and a JetStream stream consumed by 1, 2 and 3 competing `caudal
//!   run` processes to the always-200 receiver; messages/s and the scaling
//!   of 2 and 3 processes over 1, with the CPU of caudal, the broker and
//!   the machine. See [`brokers`].
//! - `cluster-failover`: three `caudal run` nodes under `[cluster]` share a
//!   CDC pipeline; each of `--trials` (default 20) SIGKILLs its owner and
//!   times kill → another node holds the lease, and kill → first delivery
//!   by the new owner; p50/p99 against the lease. `cluster-dispatch`: a
//!   fan-out of N no-op command tasks (default 5,000) in a cluster-wide
//!   pool of 16, run by 1, 2 and 3 nodes claiming from one PostgreSQL
//!   store, tasks/s against graphile-worker on the same server running
//!   `true` per job with concurrency 16. See [`cluster`].

mod brokers;
mod buffer;
mod cdc;
mod cluster;
mod crawl;
mod datasets;
mod footprint;
mod live;
mod process;
mod receiver;
mod report;
mod sink;
mod subject;
mod sync;
mod workflows;

use std::io::Write as _;

/// The allocator caudal's binary uses: `buffer` and `http-sink` run caudal's
/// code in this process, and should run it as `caudal` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;

/// Every scenario, in the order `all` runs them.
const SCENARIOS: &[&str] = &[
    "initial-sync",
    "steady-state",
    "cdc-throughput",
    "cdc-latency",
    "mysql-cdc-throughput",
    "mysql-cdc-latency",
    "buffer",
    "http-sink",
    "footprint",
    "workflow-dispatch",
    "workflow-chain",
    "crawl",
    "crawl-limit",
    "dataset-write",
    "dataset-query",
    "live-throughput",
    "live-latency",
    "broker-sink",
    "broker-consumers",
    "cluster-failover",
    "cluster-dispatch",
];

/// The scenarios that run caudal's binary (and so can run a baseline
/// build too); `buffer` and `http-sink` link caudal's library instead.
const BINARY_SCENARIOS: &[&str] = &[
    "initial-sync",
    "steady-state",
    "cdc-throughput",
    "cdc-latency",
    "mysql-cdc-throughput",
    "mysql-cdc-latency",
    "footprint",
];

/// The scenarios that use the PostgreSQL server.
const PG_SCENARIOS: &[&str] = &[
    "initial-sync",
    "steady-state",
    "cdc-throughput",
    "cdc-latency",
    "workflow-dispatch",
    "workflow-chain",
    "dataset-write",
    "dataset-query",
    "live-throughput",
    "live-latency",
    "broker-sink",
    "cluster-failover",
    "cluster-dispatch",
];

/// The advisory lock a harness run holds on the PostgreSQL server.
const PG_LOCK_KEY: i64 = 0x6361_7564_616c_6265;

/// A connection holding [`PG_LOCK_KEY`] until it is dropped.
async fn pg_lock(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.with_context(|| {
        format!("cannot connect to PostgreSQL at {url} (run scripts/test --services-only)")
    })?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PG_LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !got {
        eprintln!("waiting for another caudal-bench run on this PostgreSQL server to finish");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut conn)
            .await?;
    }
    Ok(conn)
}

#[derive(Debug, Parser)]
#[command(about = "Runs caudal's benchmark scenarios and prints JSON lines and a Markdown table")]
struct Args {
    /// Scenarios to run, comma-separated: initial-sync, steady-state,
    /// cdc-throughput, cdc-latency, mysql-cdc-throughput, mysql-cdc-latency,
    /// buffer, http-sink, footprint, workflow-dispatch, workflow-chain,
    /// crawl, crawl-limit, dataset-write, dataset-query, live-throughput,
    /// live-latency, broker-sink, broker-consumers, cluster-failover,
    /// cluster-dispatch (or all).
    #[arg(default_value = "all")]
    scenario: String,
    /// Rows in the source table (initial-sync, default 1,000,000;
    /// steady-state, default 10,000,000), changes written (cdc-throughput,
    /// mysql-cdc-throughput, live-throughput, default 500,000), records (buffer, default
    /// 1,000,000; http-sink, default 2,000,000), tasks
    /// (workflow-dispatch, default 10,000; cluster-dispatch, default 5,000), sales (dataset-write,
    /// dataset-query, default 10,000,000), records published to each broker
    /// (broker-sink, default 100,000) or messages consumed from each
    /// (broker-consumers, default 200,000).
    #[arg(long)]
    rows: Option<u64>,
    /// dataset-write, dataset-query: days the sales spread over, one
    /// partition of the raw dataset each (default 100).
    #[arg(long)]
    days: Option<u32>,
    /// cluster-failover: kills of the pipeline's owner, each timed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    trials: u64,
    /// dataset-query: cached requests timed per dataset (DuckDB runs at
    /// most 100).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    queries: u32,
    /// crawl, crawl-limit: listing pages of the fixture site (crawl,
    /// default 1,000 of 19 details each; crawl-limit, default 30 of 9).
    #[arg(long)]
    listings: Option<u32>,
    /// steady-state: rows changed since the last run.
    #[arg(long, default_value_t = 10_000)]
    changed: u64,
    /// initial-sync: rows the seed 000 per-record sender posts (a sample of
    /// the table: one request per record is too slow for all of them).
    #[arg(long, default_value_t = 20_000)]
    seed000_rows: u64,
    /// Records per HTTP request (the most per batch).
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// How long a partial batch waits for more records, in milliseconds
    /// (throughput scenarios default 50, latency scenarios default 20).
    #[arg(long)]
    max_wait_ms: Option<u64>,
    /// The sink's `concurrency`: batches in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// CDC scenarios: the source's `page_size`, the most changes its reader
    /// holds before handing them on (default: caudal's own).
    #[arg(long)]
    page_size: Option<u32>,
    /// Latency scenarios: changes committed per second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Latency scenarios: changes per transaction.
    #[arg(long, default_value_t = 100)]
    txn_rows: u64,
    /// Latency scenarios: seconds of steady load measured (after 2 s of
    /// warm-up).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// footprint: seconds caudal idles before its RSS is read.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// PostgreSQL server to use (a database `caudal_bench` is recreated).
    #[arg(
        long,
        env = "CAUDAL_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// MariaDB server to use (each mysql-* run creates and drops a database
    /// `caudal_bench_<random>`).
    #[arg(
        long,
        env = "CAUDAL_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306"
    )]
    mysql_url: String,
    /// RabbitMQ server the broker scenarios use (each run declares and
    /// deletes queues `caudal_bench_…`).
    #[arg(
        long,
        env = "CAUDAL_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// NATS server with JetStream the broker scenarios use (each run
    /// creates and deletes streams `CAUDAL_BENCH_…`).
    #[arg(
        long,
        env = "CAUDAL_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The caudal binary to measure.
    #[arg(long, default_value = "target/release/caudal")]
    caudal: PathBuf,
    /// A baseline caudal binary (e.g. the previous build, copied aside):
    /// every scenario that runs caudal's binary also runs this one on the
    /// same workload and reports `caudal_over_baseline`. buffer and
    /// http-sink run caudal's library in this process and take none.
    #[arg(long, value_name = "PATH")]
    baseline_caudal: Option<PathBuf>,
    /// Runs of each scenario: a JSON line for each, and in the table the
    /// median of each figure with its range (min–max) across the runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// initial-sync: connections of the parallel COPY reference, each
    /// reading one range of the table's blocks (default 2, the cores of
    /// the machine these figures come from; give the server's cores).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    copy_workers: u32,
    /// The Python interpreter that runs the seed re-creations and crawl's
    /// Scrapy spider (bench/run gives its virtualenv's, with requests,
    /// urllib3, psycopg2, schedule, scrapy).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// The fixture site the crawl scenarios crawl (crates/caudal-testkit).
    #[arg(long, default_value = "target/release/caudal-site")]
    site: PathBuf,
    /// Where the seed re-creations are.
    #[arg(long, default_value = "bench/seeds")]
    seeds: PathBuf,
    /// The pg_recvlogical binary (cdc-throughput's reference).
    #[arg(long, default_value = "pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// The mariadb-binlog binary (mysql-cdc-throughput's reference).
    #[arg(long, default_value = "mariadb-binlog")]
    mariadb_binlog: PathBuf,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The repeat being run, from 1 (not an argument).
    #[arg(skip)]
    run: u32,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.scenario == "receiver" {
        // Not a scenario: the always-200 receiver alone, for profiling caudal
        // by hand. Prints its address, then its counts every second.
        return rt.block_on(async {
            let receiver = receiver::start().await?;
            println!("listening on http://{}", receiver.addr);
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                eprintln!(
                    "{} requests, {} records",
                    receiver.requests(),
                    receiver.records()
                );
            }
        });
    }
    let names: Vec<&str> = if args.scenario == "all" {
        SCENARIOS.to_vec()
    } else {
        args.scenario.split(',').map(str::trim).collect()
    };
    if let Some(unknown) = names.iter().find(|n| !SCENARIOS.contains(n)) {
        bail!(
            "unknown scenario {unknown:?}; scenarios: {}, all (or receiver)",
            SCENARIOS.join(", ")
        );
    }
    if let Some(baseline) = &args.baseline_caudal {
        if !baseline.is_file() {
            bail!("--baseline-caudal {}: no such file", baseline.display());
        }
        for name in names.iter().filter(|n| !BINARY_SCENARIOS.contains(n)) {
            let why = if name.starts_with("workflow-") {
                "measures workflows, which a baseline build may not have"
            } else if name.starts_with("crawl") {
                "measures the crawler, which a baseline build may not have"
            } else if name.starts_with("dataset-") {
                "measures datasets, which a baseline build may not have"
            } else if name.starts_with("live-") {
                "measures live aggregates, which a baseline build may not have"
            } else if name.starts_with("broker-") {
                "measures the broker connectors, which a baseline build may not have"
            } else if name.starts_with("cluster-") {
                "measures clusters, which a baseline build may not have"
            } else {
                "runs caudal's library in this process"
            };
            eprintln!("{name}: {why}, so it measures no baseline build");
        }
    }
    // The PostgreSQL scenarios use fixed names (database `caudal_bench`, its
    // slots and publication) and drop what a killed run left; a second run
    // on the same server waits for the first instead of breaking it.
    let _pg_lock = if names.iter().any(|n| PG_SCENARIOS.contains(n)) {
        Some(rt.block_on(pg_lock(&args.pg_url))?)
    } else {
        None
    };
    // What the dataset scenarios keep between runs (their database, the
    // datasets written) goes when this does, also after a failure.
    let _datasets = datasets::Cleanup::new(&args.pg_url);
    let mut results = Vec::new();
    for name in names {
        for k in 1..=args.repeat {
            args.run = k;
            let lines = rt
                .block_on(run(&args, name))
                .with_context(|| format!("scenario {name} failed (run {k} of {})", args.repeat))?;
            let baseline = args
                .baseline_caudal
                .as_deref()
                .filter(|_| BINARY_SCENARIOS.contains(&name));
            for line in lines {
                let line = annotate(line, k, baseline);
                println!("{line}");
                std::io::stdout().flush()?;
                results.push(line);
            }
        }
    }
    let table = report::table(&results);
    println!("\n{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `line` with the run's number `run` after its scenario's name, and the
/// baseline binary's path when one was measured.
fn annotate(line: Value, run: u32, baseline: Option<&std::path::Path>) -> Value {
    let Value::Object(fields) = line else {
        return line;
    };
    let mut out = serde_json::Map::new();
    if let Some(scenario) = fields.get("scenario") {
        out.insert("scenario".into(), scenario.clone());
    }
    out.insert("run".into(), run.into());
    if let Some(baseline) = baseline {
        out.insert(
            "baseline_binary".into(),
            baseline.display().to_string().into(),
        );
    }
    out.extend(fields.into_iter().filter(|(k, _)| k != "scenario"));
    Value::Object(out)
}

/// Runs one scenario; its results, one JSON object each.
async fn run(args: &Args, name: &str) -> anyhow::Result<Vec<Value>> {
    Ok(match name {
        "initial-sync" => sync::initial(args).await?,
        "steady-state" => vec![sync::steady(args).await?],
        "cdc-throughput" => vec![cdc::postgres::throughput(args).await?],
        "cdc-latency" => vec![cdc::postgres::latency(args).await?],
        "mysql-cdc-throughput" => vec![cdc::mariadb::throughput(args).await?],
        "mysql-cdc-latency" => vec![cdc::mariadb::latency(args).await?],
        "buffer" => vec![buffer::run(args).await?],
        "http-sink" => sink::run(args).await?,
        "footprint" => vec![footprint::run(args).await?],
        "workflow-dispatch" => workflows::dispatch(args).await?,
        "workflow-chain" => workflows::chain(args).await?,
        "crawl" => vec![crawl::throughput(args).await?],
        "crawl-limit" => vec![crawl::limit(args).await?],
        "dataset-write" => vec![datasets::write(args).await?],
        "dataset-query" => datasets::query(args).await?,
        "live-throughput" => vec![live::throughput(args).await?],
        "live-latency" => vec![live::latency(args).await?],
        "broker-sink" => brokers::sink(args).await?,
        "broker-consumers" => brokers::consumers(args).await?,
        "cluster-failover" => vec![cluster::failover(args).await?],
        "cluster-dispatch" => cluster::dispatch(args).await?,
        other => bail!("unknown scenario {other:?}"),
    })
}

/// `base` with its database name replaced by `db` (query parameters dropped).
fn database_url(base: &str, db: &str) -> String {
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    match base[after_scheme..].find('/') {
        Some(j) => format!("{}/{db}", &base[..after_scheme + j]),
        None => format!("{base}/{db}"),
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
