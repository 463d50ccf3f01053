//! The benchmark harness itself: every scenario, at a small size, against
//! the real servers, the seeds' Python senders and the caudal binary of
//! this build. Figures are not checked (timings never are in tests); that
//! every scenario provisions, measures, verifies what arrived and cleans
//! up, and reports what docs/benchmarks.md shows, is.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

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
    let out = Command::new(env!("CARGO_BIN_EXE_caudal-bench"))
        .current_dir(root())
        .args(["all", "--rows", "3000", "--changed", "300"])
        .args(["--seed000-rows", "200", "--rate", "500", "--txn-rows", "50"])
        .args(["--duration", "2", "--idle-secs", "1"])
        .arg("--caudal")
        .arg(caudal())
        .arg("--python")
        .arg(python())
        .arg("--markdown")
        .arg(&table)
        .output()
        .expect("run caudal-bench");
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
    // What each scenario delivered is what it was asked for.
    assert_eq!(get("initial_sync", "rows"), 3000.0);
    assert_eq!(get("initial_sync", "seed000_rows"), 200.0);
    assert_eq!(get("steady_state", "changed"), 300.0);
    assert_eq!(get("cdc_throughput", "changes"), 3000.0);
    assert_eq!(get("mysql_cdc_throughput", "changes"), 3000.0);
    for scenario in ["cdc_latency", "mysql_cdc_latency"] {
        assert_eq!(get(scenario, "committed"), get(scenario, "delivered"));
        assert!(get(scenario, "p50_ms") <= get(scenario, "p99_ms"));
    }
    assert_eq!(get("buffer", "records"), 3000.0);
    assert!(get("footprint", "idle_anon_rss_mib") <= get("footprint", "idle_rss_mib"));
    assert!(get("footprint", "binary_mib") > 1.0);

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
