//! The benchmark harness itself: every scenario, at a small size, against
//! the real servers (`CAUDAL_TEST_PG_URL`, `CAUDAL_TEST_MYSQL_URL`, or the
//! local ones), the seeds' Python senders and the caudal binary of this
//! build. Figures are not checked (timings never are in tests); that every
//! scenario provisions, measures, verifies what arrived, reports a ratio
//! against its reference and leaves nothing behind, is.

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

#[test]
fn every_scenario_runs_and_reports_its_reference() {
    let table = std::env::temp_dir().join(format!("caudal-bench-table-{}.md", std::process::id()));
    let pg_url = std::env::var(PG_URL_ENV).unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let mysql_url = std::env::var(MYSQL_URL_ENV).unwrap_or_else(|_| DEFAULT_MYSQL_URL.to_string());
    let child = Command::new(env!("CARGO_BIN_EXE_caudal-bench"))
        .current_dir(root())
        .args(["--pg-url", &pg_url, "--mysql-url", &mysql_url])
        .args(["all", "--rows", "3000", "--changed", "300"])
        .args(["--seed000-rows", "200", "--rate", "500", "--txn-rows", "50"])
        .args(["--duration", "2", "--idle-secs", "1"])
        .arg("--caudal")
        .arg(caudal())
        .arg("--python")
        .arg(python())
        .arg("--markdown")
        .arg(&table)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run caudal-bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("caudal-bench's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
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
            "footprint"
        ],
        "{stdout}"
    );
    let get = |scenario: &str, field: &str| -> f64 {
        let r = results
            .iter()
            .find(|r| r["scenario"] == scenario)
            .expect("the scenario's result");
        r[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{scenario}.{field} is not a number: {r}"))
    };
    // Each figure next to its reference, as ratios that are real numbers.
    for (scenario, ratio) in [
        ("initial_sync", "caudal_over_copy"),
        ("initial_sync", "caudal_over_seed001"),
        ("initial_sync", "caudal_over_seed000"),
        ("steady_state", "caudal_over_copy_index"),
        ("steady_state", "caudal_over_seed001"),
        ("cdc_throughput", "caudal_over_recvlogical"),
        ("mysql_cdc_throughput", "caudal_over_binlog"),
        ("buffer", "buffer_over_plain"),
        ("http_sink", "caudal_over_ceiling"),
        ("footprint", "seed001_rss_over_caudal"),
        ("footprint", "seed001_anon_rss_over_caudal"),
        ("footprint", "seed001_ready_over_caudal"),
    ] {
        let v = get(scenario, ratio);
        assert!(v.is_finite() && v > 0.0, "{scenario}.{ratio} = {v}");
    }
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
        let pg = sqlx::PgPool::connect(&pg_url).await.expect("PostgreSQL");
        let left: i64 = sqlx::query(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = 'caudal_bench')
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'caudal\\_bench%')",
        )
        .fetch_one(&pg)
        .await
        .expect("PostgreSQL's catalog")
        .get(0);
        assert_eq!(left, 0, "the PostgreSQL scenarios left their database or slots");
        let my = sqlx::MySqlPool::connect(&mysql_url).await.expect("MariaDB");
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

    // The Markdown table: printed after the lines and written to the file.
    let markdown = std::fs::read_to_string(&table).expect("the --markdown file");
    let _ = std::fs::remove_file(&table);
    assert!(stdout.trim_end().ends_with(markdown.trim_end()), "{stdout}");
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
    ] {
        assert!(
            markdown
                .lines()
                .any(|l| l.starts_with(&format!("| {name} |"))),
            "no row for {name}:\n{markdown}"
        );
    }
}
