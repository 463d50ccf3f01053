//! The benchmark harness itself: every scenario, at a small size, against
//! the real servers (`CAUDAL_TEST_PG_URL`, `CAUDAL_TEST_MYSQL_URL`, or the
//! local ones), the seeds' Python senders and the caudal binary of this
//! build, which is also given as the baseline build; and one scenario run
//! twice. Figures are not checked (timings never are in tests); that every
//! scenario provisions, measures, verifies what arrived, reports a ratio
//! against each reference and the baseline, leaves nothing behind, and that
//! the table sums up several runs by their median and range, is.

use std::path::{Path, PathBuf};
use std::process::Command;

use caudal_testkit::database::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL, MYSQL_URL_ENV, PG_URL_ENV};
use serde_json::Value;
use sqlx::Row as _;

/// The workspace root (bench/seeds is found from there).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The caudal binary beside this test's own build.
fn caudal() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let caudal = dir.join("caudal");
    assert!(
        caudal.exists(),
        "{} is missing: build it first (cargo build -p caudal; scripts/test builds the whole workspace)",
        caudal.display()
    );
    caudal
}

/// The fixture site beside this test's own build (scripts/test builds the
/// whole workspace, caudal-testkit's `caudal-site` included).
fn site() -> PathBuf {
    let site = caudal().with_file_name("caudal-site");
    assert!(
        site.exists(),
        "{} is missing: build it first (cargo build -p caudal-testkit)",
        site.display()
    );
    site
}

/// The interpreter with the seeds' packages (bench/venv prints it).
fn python() -> PathBuf {
    let python = std::env::var_os("CAUDAL_BENCH_PYTHON").map_or_else(
        || root().join("target/bench-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: run bench/venv (scripts/test does), or set CAUDAL_BENCH_PYTHON",
        python.display()
    );
    python
}

/// What a run of caudal-bench printed.
struct Output {
    stdout: String,
    stderr: String,
    /// The JSON lines.
    results: Vec<Value>,
    /// The `--markdown` file.
    markdown: String,
    pid: u32,
}

/// Runs caudal-bench with `args` against the test's servers, the caudal
/// of this build and the seeds' interpreter; it must succeed.
fn bench(args: &[&str]) -> Output {
    let table = std::env::temp_dir().join(format!(
        "caudal-bench-table-{}-{}.md",
        std::process::id(),
        args.join("-").replace(['/', ' '], "_")
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_caudal-bench"))
        .current_dir(root())
        .args(["--pg-url", &pg_url(), "--mysql-url", &mysql_url()])
        .args(args)
        .arg("--caudal")
        .arg(caudal())
        .arg("--python")
        .arg(python())
        .arg("--site")
        .arg(site())
        .arg("--markdown")
        .arg(&table)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run caudal-bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("caudal-bench's output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "caudal-bench failed ({}); the services come from scripts/test --services-only\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let results: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    // The Markdown table: printed after the lines and written to the file.
    let markdown = std::fs::read_to_string(&table).expect("the --markdown file");
    let _ = std::fs::remove_file(&table);
    assert!(stdout.trim_end().ends_with(markdown.trim_end()), "{stdout}");
    Output {
        stdout,
        stderr,
        results,
        markdown,
        pid,
    }
}

fn pg_url() -> String {
    std::env::var(PG_URL_ENV).unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

fn mysql_url() -> String {
    std::env::var(MYSQL_URL_ENV).unwrap_or_else(|_| DEFAULT_MYSQL_URL.to_string())
}

/// The number `field` of `line`, which must be a positive real number.
fn positive(line: &Value, field: &str) -> f64 {
    let v = line[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number: {line}"));
    assert!(v.is_finite() && v > 0.0, "{field} = {v}: {line}");
    v
}

/// The advisory lock a caudal-bench run holds on the PostgreSQL server
/// while it runs (`PG_LOCK_KEY` in the harness).
const PG_LOCK_KEY: i64 = 0x6361_7564_616c_6265;

/// Nothing of the PostgreSQL scenarios is left on the server. Checked
/// under the harness's lock: another run (this file's other test) may be
/// running its scenarios meanwhile, and holds the lock while it does.
async fn assert_pg_clean(pg_url: &str) {
    use sqlx::Connection as _;
    let mut pg = sqlx::PgConnection::connect(pg_url)
        .await
        .expect("PostgreSQL");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(PG_LOCK_KEY)
        .execute(&mut pg)
        .await
        .expect("the harness's lock");
    let left: i64 = sqlx::query(
        "SELECT (SELECT count(*) FROM pg_database WHERE datname IN ('caudal_bench', 'caudal_bench_state'))
              + (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'caudal\\_bench%')",
    )
    .fetch_one(&mut pg)
    .await
    .expect("PostgreSQL's catalog")
    .get(0);
    pg.close().await.expect("closing the connection");
    assert_eq!(
        left, 0,
        "the PostgreSQL scenarios left their database or slots"
    );
}

/// Nothing of the broker scenarios of run `pid` is left: every RabbitMQ
/// queue it named on stderr is gone, and NATS holds no stream of it (their
/// names carry the run's process id in hex).
async fn assert_brokers_clean(stderr: &str, pid: u32) {
    let amqp = std::env::var("CAUDAL_BENCH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let nats =
        std::env::var("CAUDAL_BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let queues: Vec<&str> = stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("caudal_bench_sink_") || w.starts_with("caudal_bench_consume_"))
        .collect();
    assert!(
        !queues.is_empty(),
        "the broker scenarios name their queues on stderr:\n{stderr}"
    );
    let connection = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    for queue in queues {
        // A passive declaration of a queue that is gone closes the channel.
        let channel = connection.create_channel().await.expect("a channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        assert!(declared.is_err(), "the broker scenarios left queue {queue}");
    }
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.expect("NATS"));
    let mark = format!("_{pid:X}_");
    let mut names = std::pin::pin!(js.stream_names());
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        let name = name.expect("a stream name");
        assert!(
            !(name.starts_with("CAUDAL_BENCH_") && name.contains(&mark)),
            "the broker scenarios left stream {name}"
        );
    }
}

#[test]
fn every_scenario_runs_and_reports_its_references_and_the_baseline() {
    let baseline = caudal();
    let baseline = baseline.to_str().expect("a UTF-8 path");
    let Output {
        stdout,
        stderr,
        results,
        markdown,
        pid,
    } = bench(&[
        "all",
        "--rows",
        "3000",
        "--changed",
        "300",
        "--seed000-rows",
        "200",
        "--rate",
        "500",
        "--txn-rows",
        "50",
        "--duration",
        "2",
        "--idle-secs",
        "1",
        "--listings",
        "4",
        "--days",
        "5",
        "--queries",
        "20",
        "--trials",
        "2",
        "--baseline-caudal",
        baseline,
    ]);
    let scenarios: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().expect("a scenario name"))
        .collect();
    assert_eq!(
        scenarios,
        [
            "initial_sync",
            "steady_state",
            "cdc_throughput",
            "cdc_latency",
            "mysql_cdc_throughput",
            "mysql_cdc_latency",
            "buffer",
            "http_sink",
            "http_sink",
            "footprint",
            "workflow_dispatch",
            "workflow_dispatch",
            "workflow_chain",
            "workflow_chain",
            "crawl",
            "crawl_limit",
            "dataset_write",
            "dataset_query",
            "dataset_query",
            "live_throughput",
            "live_latency",
            "broker_sink",
            "broker_sink",
            "broker_sink",
            "broker_consumers",
            "broker_consumers",
            "cluster_failover",
            "cluster_dispatch",
            "cluster_dispatch",
            "cluster_dispatch"
        ],
        "{stdout}"
    );
    let get = |scenario: &str, field: &str| -> f64 {
        let r = results
            .iter()
            .find(|r| r["scenario"] == scenario)
            .expect("the scenario's result");
        positive(r, field)
    };
    // Each figure next to its reference, as ratios that are real numbers.
    for (scenario, figure) in [
        ("initial_sync", "caudal_over_copy"),
        ("initial_sync", "caudal_over_copy_ordered"),
        ("initial_sync", "copy_fastest_rows_per_s"),
        ("initial_sync", "copy_ordered_rows_per_s"),
        ("initial_sync", "copy_text_rows_per_s"),
        ("initial_sync", "copy_binary_rows_per_s"),
        ("initial_sync", "copy_parallel_text_rows_per_s"),
        ("initial_sync", "copy_parallel_binary_rows_per_s"),
        ("initial_sync", "caudal_over_seed001"),
        ("initial_sync", "caudal_over_seed000"),
        ("steady_state", "caudal_over_copy_index"),
        ("steady_state", "caudal_over_seed001"),
        ("cdc_throughput", "server_decode_changes_per_s"),
        ("cdc_throughput", "caudal_over_server_decode"),
        ("cdc_throughput", "caudal_over_recvlogical"),
        ("mysql_cdc_throughput", "caudal_over_binlog"),
        ("buffer", "buffer_over_plain"),
        ("http_sink", "caudal_over_ceiling"),
        ("footprint", "idle_rss_mib"),
        ("footprint", "seed001_rss_over_caudal"),
        ("footprint", "seed001_anon_rss_over_caudal"),
        ("footprint", "seed001_ready_over_caudal"),
        ("workflow_dispatch", "caudal_over_ceiling"),
        ("workflow_dispatch", "ceiling_tasks_per_s"),
        ("workflow_chain", "caudal_p50_ms"),
        ("workflow_chain", "graphile_p50_ms"),
        ("workflow_chain", "graphile_over_caudal_p50"),
        ("crawl", "caudal_pages_per_min"),
        ("crawl", "scrapy_pages_per_min"),
        ("crawl", "caudal_over_scrapy"),
        ("crawl", "caudal_peak_rss_mib"),
        ("crawl", "scrapy_rss_over_caudal"),
        ("crawl_limit", "achieved_over_configured"),
        ("crawl_limit", "min_gap_ms"),
        ("dataset_write", "caudal_rows_per_s"),
        ("dataset_write", "caudal_peak_rss_mib"),
        ("dataset_write", "caudal_over_pyarrow"),
        ("dataset_write", "caudal_over_pyarrow_parallel"),
        ("dataset_write", "caudal_over_copy"),
        ("dataset_write", "caudal_over_copy_binary"),
        ("dataset_query", "cold_p99_ms"),
        ("dataset_query", "cached_p99_ms"),
        ("dataset_query", "cached_requests_per_s"),
        ("dataset_query", "server_hit_mean_ms"),
        ("dataset_query", "server_miss_mean_ms"),
        ("dataset_query", "duckdb_p50_ms"),
        ("dataset_query", "duckdb_over_caudal_cold_p50"),
        ("dataset_query", "duckdb_over_caudal_cached_p50"),
        ("live_throughput", "plain_changes_per_s"),
        ("live_throughput", "aggregate_changes_per_s"),
        ("live_throughput", "aggregate_over_plain"),
        ("live_latency", "visible_p99_ms"),
        ("live_latency", "delivery_p99_ms"),
        ("broker_sink", "caudal_over_bare"),
        ("broker_consumers", "p2_over_p1"),
    ] {
        get(scenario, figure);
    }
    // The read ceiling is the fastest COPY, and says which one it is.
    let initial = &results[0];
    let fastest = initial["copy_fastest"].as_str().expect("copy_fastest");
    assert!(
        initial[format!("copy_{fastest}_rows_per_s")] == initial["copy_fastest_rows_per_s"],
        "{initial}"
    );
    for name in [
        "ordered",
        "text",
        "binary",
        "parallel_text",
        "parallel_binary",
    ] {
        assert!(
            get("initial_sync", &format!("copy_{name}_rows_per_s"))
                <= get("initial_sync", "copy_fastest_rows_per_s"),
            "{initial}"
        );
    }
    assert_eq!(initial["copy_workers"], 2, "{initial}");
    // The server decoded at least every change and BEGIN and COMMIT of each
    // transaction of 1,000.
    assert!(get("cdc_throughput", "server_decode_messages") >= 3000.0 + 2.0 * 3.0);
    // Both crawlers produced a record per detail page (the harness fails
    // otherwise) from the same requests: listings and details, each once.
    let crawl = results
        .iter()
        .find(|r| r["scenario"] == "crawl")
        .expect("crawl");
    for crawler in ["caudal", "scrapy"] {
        assert_eq!(crawl[format!("{crawler}_records")], 4 * 19, "{crawl}");
        assert_eq!(crawl[format!("{crawler}_requests")], 4 + 4 * 19, "{crawl}");
        assert_eq!(crawl[format!("{crawler}_duplicates")], 0, "{crawl}");
    }
    // The write counted every row of the table in the manifests (the
    // harness fails otherwise), one partition a day; the query answered
    // both datasets, cold and cached, with as many rows as PostgreSQL
    // counts (checked by the harness).
    let write = results
        .iter()
        .find(|r| r["scenario"] == "dataset_write")
        .expect("dataset_write");
    assert_eq!(write["rows"], 3000, "{write}");
    assert_eq!(write["caudal_days_written"], 5, "{write}");
    assert_eq!(write["caudal_partitions"], 5, "{write}");
    let queried: Vec<&Value> = results
        .iter()
        .filter(|r| r["scenario"] == "dataset_query")
        .collect();
    let datasets: Vec<&Value> = queried.iter().map(|r| &r["dataset"]).collect();
    assert_eq!(datasets, ["sales_raw", "sales_daily"], "{stdout}");
    for r in &queried {
        assert_eq!(r["cold_queries"], 60, "{r}");
        assert_eq!(r["cached_queries"], 20, "{r}");
        assert_eq!(r["written_by"], "dataset-write", "{r}");
        positive(r, "page_rows");
    }
    // Every broker was measured against its bare client, and consumed by
    // 1, 2 and 3 processes, each count delivering every message (the
    // harness fails otherwise).
    let brokers = |scenario: &str| -> Vec<&Value> {
        results
            .iter()
            .filter(|r| r["scenario"] == scenario)
            .collect()
    };
    let sinks = brokers("broker_sink");
    let names: Vec<&Value> = sinks.iter().map(|r| &r["broker"]).collect();
    assert_eq!(names, ["rabbitmq", "nats", "kafka"], "{stdout}");
    for r in &sinks {
        assert_eq!(r["messages"], 3000, "{r}");
        assert_eq!(r["bare_stored"], 3000, "{r}");
        assert!(r["caudal_stored"].as_u64() >= Some(3000), "{r}");
        for figure in [
            "message_bytes",
            "caudal_messages_per_s",
            "bare_messages_per_s",
            "caudal_over_bare",
            "caudal_peak_rss_mib",
        ] {
            positive(r, figure);
        }
    }
    // The bare clients published rows of about 1 KB, as caudal did.
    assert!(positive(sinks[0], "message_bytes") > 900.0, "{}", sinks[0]);
    assert!(
        positive(sinks[0], "caudal_body_bytes") > 900.0,
        "{}",
        sinks[0]
    );
    let consumers = brokers("broker_consumers");
    let names: Vec<&Value> = consumers.iter().map(|r| &r["broker"]).collect();
    assert_eq!(names, ["rabbitmq", "nats"], "{stdout}");
    for r in &consumers {
        for k in 1..=3_usize {
            positive(r, &format!("p{k}_messages_per_s"));
            let shares = r[format!("p{k}_shares")]
                .as_array()
                .unwrap_or_else(|| panic!("p{k}_shares: {r}"));
            assert_eq!(shares.len(), k, "{r}");
            // Reported here (0 since a clean stop acknowledges before it
            // closes the session; tests/broker_sources.rs asserts that).
            assert!(r[format!("p{k}_left")].is_u64(), "{r}");
        }
        positive(r, "p2_over_p1");
        positive(r, "p3_over_p1");
    }
    // Two kills of the CDC pipeline's owner, each timed to the lease's
    // takeover and to the new owner's first delivery, which comes after.
    let cluster = results
        .iter()
        .find(|r| r["scenario"] == "cluster_failover")
        .expect("cluster-failover's result");
    assert_eq!(cluster["trials"], 2, "{cluster}");
    for figure in ["lease_s", "failover_p50_over_lease", "goal_failover_p99_s"] {
        positive(cluster, figure);
    }
    assert!(
        positive(cluster, "failover_max_s") >= positive(cluster, "takeover_max_s"),
        "{cluster}"
    );
    assert!(
        stderr.contains("cluster-failover: measures clusters, which a baseline build may not have"),
        "{stderr}"
    );
    // Task dispatch with 1, 2 and 3 nodes, each run complete (the
    // scenario fails otherwise), beside graphile-worker's rate.
    let dispatch: Vec<&Value> = results
        .iter()
        .filter(|r| r["scenario"] == "cluster_dispatch")
        .collect();
    for (i, r) in dispatch.iter().enumerate() {
        assert_eq!(r["nodes"], i + 1, "{r}");
        assert_eq!(r["tasks"], 3000, "{r}");
        for figure in [
            "caudal_tasks_per_s",
            "graphile_jobs_per_s",
            "caudal_over_graphile",
        ] {
            positive(r, figure);
        }
        let used = r["nodes_that_ran_tasks"]
            .as_u64()
            .expect("nodes_that_ran_tasks");
        assert!((1..=i as u64 + 1).contains(&used), "{r}");
    }
    // The baseline in every scenario that runs the binary, none in the
    // others (they link caudal's library, or measure workflows, the
    // crawler, datasets or live aggregates, which a baseline build may
    // lack).
    for r in &results {
        let scenario = r["scenario"].as_str().unwrap_or_default();
        if matches!(
            scenario,
            "buffer"
                | "http_sink"
                | "workflow_dispatch"
                | "workflow_chain"
                | "crawl"
                | "crawl_limit"
                | "dataset_write"
                | "dataset_query"
                | "live_throughput"
                | "live_latency"
                | "broker_sink"
                | "broker_consumers"
                | "cluster_failover"
                | "cluster_dispatch"
        ) {
            assert!(r.get("caudal_over_baseline").is_none(), "{r}");
            assert!(r.get("baseline_binary").is_none(), "{r}");
        } else {
            positive(r, "caudal_over_baseline");
            positive(r, "baseline_peak_rss_mib");
            assert_eq!(r["baseline_binary"], baseline, "{r}");
        }
        assert_eq!(r["run"], 1, "{r}");
    }
    for (scenario, figure) in [
        ("initial_sync", "baseline_rows_per_s"),
        ("steady_state", "baseline_secs"),
        ("steady_state", "baseline_first_run_rows_per_s"),
        ("cdc_throughput", "baseline_changes_per_s"),
        ("cdc_latency", "baseline_p50_ms"),
        ("cdc_latency", "caudal_over_baseline_p99"),
        ("mysql_cdc_throughput", "baseline_changes_per_s"),
        ("mysql_cdc_latency", "baseline_p99_ms"),
        ("footprint", "baseline_idle_rss_mib"),
        ("footprint", "caudal_over_baseline_ready"),
    ] {
        get(scenario, figure);
    }
    assert!(
        stderr.contains("buffer: runs caudal's library in this process"),
        "{stderr}"
    );
    assert!(
        stderr.contains("crawl: measures the crawler, which a baseline build may not have"),
        "{stderr}"
    );
    assert!(
        stderr.contains("dataset-write: measures datasets, which a baseline build may not have"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "broker-sink: measures the broker connectors, which a baseline build may not have"
        ),
        "{stderr}"
    );
    // Every scenario checked its own deliveries (the harness fails when a
    // receiver counts more or fewer records than were sent); what it leaves
    // behind is checked here: nothing.
    let scratch: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("the temporary directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("caudal-bench-{pid}-")))
        .collect();
    assert!(scratch.is_empty(), "scratch directories left: {scratch:?}");
    let mariadb_databases: Vec<String> = stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("caudal_bench_") && w.len() == "caudal_bench_".len() + 8)
        .map(str::to_string)
        .collect();
    assert!(
        !mariadb_databases.is_empty(),
        "the MariaDB scenarios name their databases on stderr:\n{stderr}"
    );
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        assert_pg_clean(&pg_url()).await;
        assert_brokers_clean(&stderr, pid).await;
        let my = sqlx::MySqlPool::connect(&mysql_url())
            .await
            .expect("MariaDB");
        for db in &mariadb_databases {
            let left: i64 = sqlx::query(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
            )
            .bind(db)
            .fetch_one(&my)
            .await
            .expect("MariaDB's catalog")
            .get(0);
            assert_eq!(left, 0, "the MariaDB scenarios left database {db}");
        }
    });

    // The table: a row per scenario, the ceilings and the baseline named.
    for name in [
        "initial-sync",
        "steady-state",
        "cdc-throughput",
        "cdc-latency",
        "mysql-cdc-throughput",
        "mysql-cdc-latency",
        "buffer",
        "http-sink",
        "footprint",
        "crawl",
        "crawl-limit",
        "dataset-write",
        "dataset-query",
        "live-throughput",
        "live-latency",
        "broker-sink",
        "broker-consumers",
    ] {
        assert!(
            markdown
                .lines()
                .any(|l| l.starts_with(&format!("| {name} |"))),
            "no row for {name}:\n{markdown}"
        );
    }
    for text in [
        "| read ceiling, fastest COPY to /dev/null (",
        "| ceiling, the server's own decoding (pg_logical_slot_peek_binary_changes): ",
        "| footprint | idle daemon RSS, 1 s after a run of 1,000 rows |",
        "| baseline build: ",
        &format!("Baseline build (`--baseline-caudal`): `{baseline}`."),
    ] {
        assert!(markdown.contains(text), "no {text:?} in:\n{markdown}");
    }
    assert!(
        !markdown.contains("| ? |"),
        "a figure is missing:\n{markdown}"
    );
}

#[test]
fn repeats_print_every_run_and_tabulate_the_median_and_range() {
    let baseline = caudal();
    let Output {
        stdout,
        results,
        markdown,
        ..
    } = bench(&[
        "cdc-throughput",
        "--rows",
        "2000",
        "--repeat",
        "2",
        "--baseline-caudal",
        baseline.to_str().expect("a UTF-8 path"),
    ]);
    let runs: Vec<&Value> = results.iter().map(|r| &r["run"]).collect();
    assert_eq!(runs, [1, 2], "{stdout}");
    for r in &results {
        assert_eq!(r["scenario"], "cdc_throughput", "{r}");
        for figure in [
            "server_decode_changes_per_s",
            "caudal_over_server_decode",
            "caudal_over_recvlogical",
            "baseline_changes_per_s",
            "caudal_over_baseline",
        ] {
            positive(r, figure);
        }
    }
    assert!(
        markdown.starts_with("Each cell: the median of 2 runs"),
        "{markdown}"
    );
    // The ceiling's ratio: the median of the two runs' (their mean), with
    // their range when they differ.
    let (a, b) = (
        positive(&results[0], "caudal_over_server_decode"),
        positive(&results[1], "caudal_over_server_decode"),
    );
    let (lo, hi) = (format!("{:.2}", a.min(b)), format!("{:.2}", a.max(b)));
    let median = format!("{:.2}", (a + b) / 2.0);
    let cell = if lo == hi {
        format!("| {median} |")
    } else {
        format!("| {median} ({lo}–{hi}) |")
    };
    let ceiling = markdown
        .lines()
        .find(|l| l.contains("the server's own decoding"))
        .unwrap_or_else(|| panic!("no ceiling row:\n{markdown}"));
    assert!(ceiling.contains(&cell), "{cell} not in {ceiling}");
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(assert_pg_clean(&pg_url()));
}
