//! caudal's benchmark harness. Each scenario provisions what it needs,
//! measures caudal (the release binary, as a separate process) and a
//! reference in the same run, and prints one JSON line per result: figures
//! stand as ratios against the reference because machines here are noisy.
//!
//! Scenarios:
//! - `initial-sync`: N rows (default 1,000,000) from PostgreSQL to a local
//!   always-200 HTTP receiver in batches of 1,000, against `COPY (the same
//!   ordered query) TO STDOUT` into /dev/null (the read ceiling).
//! - `cdc-throughput`: a backlog of N changes (default 500,000) drained by
//!   `caudal once` from a PostgreSQL slot to the receiver, against
//!   `pg_recvlogical` draining the same backlog from its own pgoutput slot
//!   into /dev/null (the decoding ceiling). See [`cdc::postgres`].
//! - `cdc-latency`: `caudal run` streaming while changes are committed at a
//!   steady rate (default 5,000/s for 20 s); commit-to-delivery latency
//!   percentiles. See [`cdc::postgres`].
//! - `mysql-cdc-throughput`: `cdc-throughput` on MariaDB: a backlog of N
//!   changes (default 500,000) drained by `caudal once` from the binary
//!   log to the receiver, against `mariadb-binlog --read-from-remote-server`
//!   reading the same stretch of the log, decoded to text, into /dev/null.
//!   See [`cdc::mariadb`].
//! - `mysql-cdc-latency`: `cdc-latency` on MariaDB, each row stamped with
//!   its statement's time (binlog times are whole seconds). See
//!   [`cdc::mariadb`].

mod cdc;
mod process;
mod receiver;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;

use crate::process::Measured;

/// The scenarios `all` runs, in order.
const SCENARIOS: &str =
    "initial-sync, cdc-throughput, cdc-latency, mysql-cdc-throughput, mysql-cdc-latency";

#[derive(Debug, Parser)]
#[command(about = "Runs caudal's benchmark scenarios and prints JSON lines")]
struct Args {
    /// Scenario to run: initial-sync, cdc-throughput, cdc-latency,
    /// mysql-cdc-throughput, mysql-cdc-latency (or all).
    #[arg(default_value = "all")]
    scenario: String,
    /// Rows in the source table (initial-sync, default 1,000,000), or
    /// changes written (cdc-throughput, mysql-cdc-throughput, default
    /// 500,000).
    #[arg(long)]
    rows: Option<u64>,
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
    /// The caudal binary to measure.
    #[arg(long, default_value = "target/release/caudal")]
    caudal: PathBuf,
    /// The pg_recvlogical binary (cdc-throughput's reference).
    #[arg(long, default_value = "pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// The mariadb-binlog binary (mysql-cdc-throughput's reference).
    #[arg(long, default_value = "mariadb-binlog")]
    mariadb_binlog: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.scenario.as_str() {
        "initial-sync" => rt.block_on(initial_sync(&args)),
        "cdc-throughput" => rt.block_on(cdc::postgres::throughput(&args)),
        "cdc-latency" => rt.block_on(cdc::postgres::latency(&args)),
        "mysql-cdc-throughput" => rt.block_on(cdc::mariadb::throughput(&args)),
        "mysql-cdc-latency" => rt.block_on(cdc::mariadb::latency(&args)),
        "all" => rt.block_on(async {
            initial_sync(&args).await?;
            cdc::postgres::throughput(&args).await?;
            cdc::postgres::latency(&args).await?;
            cdc::mariadb::throughput(&args).await?;
            cdc::mariadb::latency(&args).await
        }),
        // Not a scenario: the always-200 receiver alone, for profiling caudal
        // by hand. Prints its address, then its counts every second.
        "receiver" => rt.block_on(async {
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
        }),
        other => bail!("unknown scenario {other:?}; scenarios: {SCENARIOS}, all (or receiver)"),
    }
}

/// `base` with its database name replaced by `db` (query parameters dropped).
fn database_url(base: &str, db: &str) -> String {
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    match base[after_scheme..].find('/') {
        Some(j) => format!("{}/{db}", &base[..after_scheme + j]),
        None => format!("{base}/{db}"),
    }
}

async fn initial_sync(args: &Args) -> anyhow::Result<()> {
    use sqlx::Executor as _;
    let rows = args.rows.unwrap_or(1_000_000);
    let admin = sqlx::PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })?;
    admin
        .execute("DROP DATABASE IF EXISTS caudal_bench WITH (FORCE)")
        .await?;
    admin.execute("CREATE DATABASE caudal_bench").await?;
    let url = database_url(&args.pg_url, "caudal_bench");
    let db = sqlx::PgPool::connect(&url).await?;
    eprintln!("initial-sync: loading {rows} rows");
    db.execute(
        "CREATE TABLE service_requests (
            request_id BIGINT PRIMARY KEY,
            service_id TEXT NOT NULL,
            opening_date TIMESTAMPTZ NOT NULL,
            status_id INT NOT NULL,
            last_modified_date TIMESTAMPTZ NOT NULL)",
    )
    .await?;
    // Ten rows per second of modification time: many rows share a cursor value.
    sqlx::query(
        "INSERT INTO service_requests
         SELECT g, 'SRV-' || (g % 997), timestamptz '2025-01-01' + (g || ' seconds')::interval,
                (g % 5) + 1, timestamptz '2025-01-01' + ((g / 10) || ' seconds')::interval
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(rows)?)
    .execute(&db)
    .await?;
    db.execute(
        "CREATE INDEX service_requests_sync ON service_requests (last_modified_date, request_id)",
    )
    .await?;
    db.execute("VACUUM ANALYZE service_requests").await?;
    db.close().await;

    let receiver = receiver::start().await?;
    let dir = std::env::temp_dir().join(format!("caudal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.servicedesk]
type = "postgres"
url = "{url}"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]
page_size = 10000

[sinks.partner]
type = "http"
url = "http://{addr}/services-data/requests"
batch = {{ max_records = {batch}, max_bytes = "64MiB" }}
concurrency = {concurrency}

[pipelines.sync]
source = "servicedesk"
sink = "partner"
schedule = {{ every = "1h" }}
"#,
            state = dir.join("state.db").display(),
            addr = receiver.addr,
            batch = args.batch,
            concurrency = args.concurrency,
        ),
    )?;

    eprintln!("initial-sync: caudal once");
    let mut once = Command::new(&args.caudal);
    once.args(["once", "sync", "-c"])
        .arg(&config)
        .env("CAUDAL_LOG", "warn");
    let ended = Measured::spawn(once)
        .with_context(|| {
            format!(
                "cannot run {} (build it: cargo build --release -p caudal)",
                args.caudal.display()
            )
        })?
        .wait()
        .await?;
    let (caudal_secs, peak_rss_mib) = (ended.secs, ended.peak_rss_mib);
    if !ended.status.success() {
        bail!("caudal once failed: {}", ended.status);
    }
    let delivered = receiver.records();
    if delivered != rows {
        bail!("the receiver got {delivered} records, expected {rows}");
    }

    eprintln!("initial-sync: COPY reference");
    let started = Instant::now();
    let copy = Command::new("psql")
        .arg(&url)
        .args([
            "-q",
            "-c",
            "COPY (SELECT * FROM service_requests ORDER BY last_modified_date, request_id) TO STDOUT",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run psql")?;
    let copy_secs = started.elapsed().as_secs_f64();
    if !copy.success() {
        bail!("psql COPY failed: {copy}");
    }
    let n = rows as f64;
    println!(
        "{}",
        json!({
            "scenario": "initial_sync",
            "rows": rows,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "requests": receiver.requests(),
            "caudal_secs": round(caudal_secs),
            "caudal_rows_per_s": round(n / caudal_secs),
            "copy_secs": round(copy_secs),
            "copy_rows_per_s": round(n / copy_secs),
            "caudal_over_copy": round(copy_secs / caudal_secs),
            "caudal_peak_rss_mib": round(peak_rss_mib),
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
    admin
        .execute("DROP DATABASE IF EXISTS caudal_bench WITH (FORCE)")
        .await?;
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
