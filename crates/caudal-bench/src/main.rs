//! caudal's benchmark harness. Each scenario provisions what it needs,
//! measures caudal (the release binary, as a separate process) and a
//! reference in the same run, and prints one JSON line per result: figures
//! stand as ratios against the reference because machines here are noisy.
//!
//! Scenarios:
//! - `initial-sync`: N rows (default 1,000,000) from PostgreSQL to a local
//!   always-200 HTTP receiver in batches of 1,000, against `COPY (the same
//!   ordered query) TO STDOUT` into /dev/null (the read ceiling).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Runs caudal's benchmark scenarios and prints JSON lines")]
struct Args {
    /// Scenario to run: initial-sync (or all).
    #[arg(default_value = "all")]
    scenario: String,
    /// Rows in the source table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Records per HTTP request.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// The sink's `concurrency`: batches in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// PostgreSQL server to use (a database `caudal_bench` is recreated).
    #[arg(
        long,
        env = "CAUDAL_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// The caudal binary to measure.
    #[arg(long, default_value = "target/release/caudal")]
    caudal: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.scenario.as_str() {
        "initial-sync" | "all" => rt.block_on(initial_sync(&args)),
        // Not a scenario: the always-200 receiver alone, for profiling caudal
        // by hand. Prints its address, then its counts every second.
        "receiver" => rt.block_on(async {
            let receiver = start_receiver().await?;
            println!("listening on http://{}", receiver.addr);
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                eprintln!(
                    "{} requests, {} records",
                    receiver.requests.load(Ordering::Relaxed),
                    receiver.records.load(Ordering::Relaxed)
                );
            }
        }),
        other => bail!("unknown scenario {other:?}; scenarios: initial-sync, all (or receiver)"),
    }
}

/// Counts the records of every request body (a JSON array) and answers 200.
struct Receiver {
    addr: SocketAddr,
    records: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

async fn start_receiver() -> anyhow::Result<Receiver> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let records = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (r, q) = (records.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (r, q) = (r.clone(), q.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (r, q) = (r.clone(), q.clone());
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let n = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body)
                            .map_or(0, |v| v.len());
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        q.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::new(),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Receiver {
        addr,
        records,
        requests,
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

async fn initial_sync(args: &Args) -> anyhow::Result<()> {
    use sqlx::Executor as _;
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
    eprintln!("initial-sync: loading {} rows", args.rows);
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
    .bind(i64::try_from(args.rows)?)
    .execute(&db)
    .await?;
    db.execute(
        "CREATE INDEX service_requests_sync ON service_requests (last_modified_date, request_id)",
    )
    .await?;
    db.execute("VACUUM ANALYZE service_requests").await?;
    db.close().await;

    let receiver = start_receiver().await?;
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
    let (status, caudal_secs, peak_rss_mib) = run_measured(once).with_context(|| {
        format!(
            "cannot run {} (build it: cargo build --release -p caudal)",
            args.caudal.display()
        )
    })?;
    if !status.success() {
        bail!("caudal once failed: {status}");
    }
    let delivered = receiver.records.load(Ordering::Relaxed);
    if delivered != args.rows {
        bail!(
            "the receiver got {delivered} records, expected {}",
            args.rows
        );
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
    let rows = args.rows as f64;
    println!(
        "{}",
        json!({
            "scenario": "initial_sync",
            "rows": args.rows,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "requests": receiver.requests.load(Ordering::Relaxed),
            "caudal_secs": round(caudal_secs),
            "caudal_rows_per_s": round(rows / caudal_secs),
            "copy_secs": round(copy_secs),
            "copy_rows_per_s": round(rows / copy_secs),
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

/// Runs `cmd` to the end; returns its exit status, wall-clock seconds and
/// peak resident memory in MiB. The peak is the process's own high-water
/// mark (`VmHWM`), sampled until it exits: `getrusage(RUSAGE_CHILDREN)`
/// would also count every earlier child of this process and of the shell
/// that exec'd it (the cargo build).
fn run_measured(mut cmd: Command) -> anyhow::Result<(std::process::ExitStatus, f64, f64)> {
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    Ok((
        status,
        started.elapsed().as_secs_f64(),
        peak_kib as f64 / 1024.0,
    ))
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
