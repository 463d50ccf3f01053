//! `caudal demo`: the seed-001 hourly sync, end to end, on one machine and
//! with no services, compressed into seconds.
//!
//! A SQLite "service desk" database gets new and updated service requests
//! while the real engine syncs it to a local receiver of
//! `POST /services-data/requests`, using the same config a user would write
//! (it is printed). At the end every row's latest version is looked up in
//! what the receiver got: the demo exits non-zero if anything is missing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use caudal_engine::{Pipeline, Trigger};
use caudal_store::Store;
use rand::Rng as _;
use serde_json::Value;
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteConnectOptions;

use crate::cli::DemoArgs;
use crate::commands::{EXIT_FAILED, fail, load, shutdown_on_signals};

const PIPELINE: &str = "requests_to_partner";
const INITIAL_ROWS: i64 = 50;

/// What the partner received: every (request_id, last_modified_date) seen.
#[derive(Default)]
struct Received {
    versions: HashSet<(i64, String)>,
    records: u64,
    requests: u64,
}

type Shared = Arc<Mutex<Received>>;

pub async fn run(args: &DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let source_path = dir.join("servicedesk.db");
    let source = create_source(&source_path).await?;

    let received: Shared = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/services-data/requests", post(receive))
        .with_state((received.clone(), args.quiet));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let config_path = dir.join("caudal.toml");
    let config_text = config_text(dir, &source_path, addr);
    std::fs::write(&config_path, &config_text)?;
    println!("caudal demo: syncing a service-desk database to a partner API, as in seed 001.\n");
    println!("Config ({}):\n", config_path.display());
    for line in config_text.lines() {
        println!("    {line}");
    }
    println!(
        "\nFor {}, requests are opened and updated in {}; caudal runs the pipeline every 2s\n\
         and the partner at http://{addr}/services-data/requests prints what it receives. Ctrl-C stops early.\n",
        args.duration,
        source_path.display()
    );

    let config = load(&config_path).map_err(|_| anyhow::anyhow!("the demo config is invalid"))?;
    let store = Store::open(config.state.url.expose())
        .await
        .map_err(|e| anyhow::anyhow!(e.report()))?;
    let pipeline = match Pipeline::build(PIPELINE, &config, store.clone()).await {
        Ok(p) => p,
        Err(e) => return Ok(fail(&e)),
    };

    let interrupted = shutdown_on_signals();
    let daemon_stop = interrupted.child_token();
    let daemon = tokio::spawn(caudal_engine::daemon::run(
        vec![pipeline.clone()],
        daemon_stop.clone(),
    ));

    let mut changes = Changes::default();
    let deadline = tokio::time::Instant::now() + args.duration.as_std();
    let mut rng = rand::rng();
    while tokio::time::Instant::now() < deadline && !interrupted.is_cancelled() {
        if rng.random_bool(0.5) {
            insert_request(&source, &mut rng).await?;
            changes.inserts += 1;
        } else {
            let id = rng.random_range(1..=INITIAL_ROWS + changes.inserts as i64);
            if update_request(&source, id, &mut rng).await? {
                changes.updates += 1;
            }
        }
        tokio::select! {
            () = interrupted.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))) => {}
        }
    }

    // Stop the schedule, then one last run once the safety lag has passed,
    // so the final rows are in.
    daemon_stop.cancel();
    let _ = daemon.await;
    println!(
        "\nChanges stopped; a final run picks up the last ones once the 1s safety lag has passed."
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let final_run = pipeline
        .run_once(
            Trigger::Manual,
            &tokio_util::sync::CancellationToken::new(),
            None,
        )
        .await;
    if let Err(e) = &final_run {
        eprintln!("final run: {}", e.report());
    }
    server.abort();

    // Compare every row's latest version with what arrived.
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT request_id, last_modified_date FROM service_requests ORDER BY request_id",
    )
    .fetch_all(&source)
    .await?;
    let (missing, records, requests) = {
        let got = received
            .lock()
            .map_err(|_| anyhow::anyhow!("receiver state poisoned"))?;
        let missing: Vec<i64> = rows
            .iter()
            .filter(|r| !got.versions.contains(r))
            .map(|r| r.0)
            .collect();
        (missing, got.records, got.requests)
    };
    let runs = store
        .runs(Some(PIPELINE), 10_000)
        .await
        .map_err(|e| anyhow::anyhow!(e.report()))?;
    println!("\nSummary");
    println!(
        "  rows changed in the source:   {} ({} initial, {} opened, {} updated)",
        INITIAL_ROWS as u64 + changes.inserts + changes.updates,
        INITIAL_ROWS,
        changes.inserts,
        changes.updates
    );
    println!(
        "  delivered to the partner:     {} records in {} requests over {} runs",
        records,
        requests,
        runs.len()
    );
    println!(
        "  latest version of each row:   {} of {} delivered, {} missing",
        rows.len() - missing.len(),
        rows.len(),
        missing.len()
    );
    println!(
        "\n  A row changed several times between two runs is sent once, in its latest version:\n  \
         the cursor syncs current state. To send every intermediate change, use CDC\n  \
         (mode = \"cdc\" on a PostgreSQL or MariaDB source: docs/cdc-postgres.md,\n  \
         docs/cdc-mysql.md)."
    );
    println!(
        "\nInspect it: caudal status -c {}",
        Path::new(&config_path).display()
    );
    if missing.is_empty() {
        println!("Nothing missing.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("Missing request ids: {missing:?}");
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

#[derive(Default)]
struct Changes {
    inserts: u64,
    updates: u64,
}

fn config_text(dir: &Path, source: &Path, addr: std::net::SocketAddr) -> String {
    let state = dir.join("state.db");
    format!(
        r#"# The seed-001 job: every changed service request, sent to the partner API.
[state]
url = "sqlite://{state}"

[sources.servicedesk]
type = "sqlite"
url = "sqlite://{source}"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]   # keyset: timestamp, then the key
lag = "1s"                                      # rows younger than this wait for the next run

[sinks.partner]
type = "http"
url = "http://{addr}/services-data/requests"
batch = {{ max_records = 25, max_wait = "1s" }}
body = '{{"requests": {{{{ records | tojson }}}}}}'

[pipelines.{PIPELINE}]
source = "servicedesk"
sink = "partner"
schedule = {{ every = "2s" }}                   # "1h" in production, or cron = "0 * * * *"
key = "request_id"
"#,
        state = state.display(),
        source = source.display(),
    )
}

async fn create_source(path: &Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = SqlitePool::connect_with(options).await?;
    sqlx::query(
        "CREATE TABLE service_requests (
            request_id INTEGER PRIMARY KEY,
            service_id TEXT NOT NULL,
            opening_date TIMESTAMP NOT NULL,
            status_id INTEGER NOT NULL,
            last_modified_date TIMESTAMP NOT NULL
        )",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "CREATE INDEX service_requests_sync ON service_requests (last_modified_date, request_id)",
    )
    .execute(&pool)
    .await?;
    let mut rng = rand::rng();
    for _ in 0..INITIAL_ROWS {
        insert_request(&pool, &mut rng).await?;
    }
    Ok(pool)
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

async fn insert_request(pool: &SqlitePool, rng: &mut impl rand::Rng) -> anyhow::Result<()> {
    let service = format!("SRV-{:03}", rng.random_range(1..40));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO service_requests (service_id, opening_date, status_id, last_modified_date) \
         VALUES (?, {NOW}, 1, {NOW})"
    )))
    .bind(service)
    .execute(pool)
    .await?;
    Ok(())
}

async fn update_request(
    pool: &SqlitePool,
    id: i64,
    rng: &mut impl rand::Rng,
) -> anyhow::Result<bool> {
    let status: i64 = rng.random_range(2..6);
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE service_requests SET status_id = ?, last_modified_date = {NOW} WHERE request_id = ?"
    )))
    .bind(status)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

async fn receive(State((received, quiet)): State<(Shared, bool)>, body: String) -> StatusCode {
    let Ok(json) = serde_json::from_str::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let Some(requests) = json.get("requests").and_then(Value::as_array) else {
        return StatusCode::UNPROCESSABLE_ENTITY;
    };
    let mut summary: HashMap<i64, i64> = HashMap::new();
    if let Ok(mut got) = received.lock() {
        got.requests += 1;
        for r in requests {
            let id = r["request_id"].as_i64().unwrap_or(-1);
            let modified = r["last_modified_date"].as_str().unwrap_or("").to_string();
            got.versions.insert((id, modified));
            got.records += 1;
            summary.insert(id, r["status_id"].as_i64().unwrap_or(0));
        }
    }
    if !quiet {
        let mut ids: Vec<_> = summary.into_iter().collect();
        ids.sort_unstable();
        let shown: Vec<String> = ids
            .iter()
            .take(8)
            .map(|(id, st)| format!("#{id}→{st}"))
            .collect();
        let more = if ids.len() > 8 {
            format!(" …{} more", ids.len() - 8)
        } else {
            String::new()
        };
        println!(
            "  partner ← POST /services-data/requests  {:>3} requests  {}{more}",
            requests.len(),
            shown.join(" ")
        );
    }
    StatusCode::OK
}
