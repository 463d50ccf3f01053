//! The Markdown table printed after the JSON lines: one row per figure
//! with its reference from the same run.
//!
//! `ratio` always reads "caudal as a share of the reference, 1.00 = as good
//! as the reference, above 1 = better": a rate is caudal's over the
//! reference's, a time or a size is the reference's over caudal's.

use serde_json::Value;

/// One row of the table.
struct Row {
    scenario: String,
    measure: String,
    caudal: String,
    reference: String,
    ratio: Option<f64>,
    rss: Option<f64>,
}

/// The table of `results` (the JSON objects the scenarios returned).
pub fn table(results: &[Value]) -> String {
    let mut out = String::from(
        "| scenario | measure | caudal | reference (same run) | ratio | caudal peak RSS |\n\
         |---|---|---:|---|---:|---:|\n",
    );
    for row in results.iter().flat_map(rows) {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.scenario,
            row.measure,
            row.caudal,
            row.reference,
            row.ratio
                .map_or_else(|| "–".to_string(), |r| format!("{r:.2}")),
            row.rss
                .map_or_else(|| "–".to_string(), |r| format!("{r:.0} MiB")),
        ));
    }
    out
}

fn rows(r: &Value) -> Vec<Row> {
    let f = |k: &str| r[k].as_f64();
    let n = |k: &str| f(k).map_or_else(|| "?".to_string(), thousands);
    let ms = |k: &str| f(k).map_or_else(|| "?".to_string(), |v| format!("{v:.1} ms"));
    let secs = |k: &str| f(k).map_or_else(|| "?".to_string(), |v| format!("{v:.2} s"));
    let row =
        |scenario: &str, measure: String, caudal: String, reference: String, ratio, rss| Row {
            scenario: scenario.to_string(),
            measure,
            caudal,
            reference,
            ratio,
            rss,
        };
    match r["scenario"].as_str().unwrap_or_default() {
        "initial_sync" => {
            let what = format!("rows/s, {} rows PostgreSQL → HTTP", n("rows"));
            let rss = f("caudal_peak_rss_mib");
            vec![
                row(
                    "initial-sync",
                    what.clone(),
                    n("caudal_rows_per_s"),
                    format!("COPY to /dev/null: {}", n("copy_rows_per_s")),
                    f("caudal_over_copy"),
                    rss,
                ),
                row(
                    "initial-sync",
                    what.clone(),
                    n("caudal_rows_per_s"),
                    format!(
                        "seed 001 loop (Python): {} ({} MiB)",
                        n("seed001_rows_per_s"),
                        n("seed001_peak_rss_mib")
                    ),
                    f("caudal_over_seed001"),
                    rss,
                ),
                row(
                    "initial-sync",
                    what,
                    n("caudal_rows_per_s"),
                    format!(
                        "seed 000 thread pool (Python, {} rows): {}",
                        n("seed000_rows"),
                        n("seed000_rows_per_s")
                    ),
                    f("caudal_over_seed000"),
                    rss,
                ),
            ]
        }
        "steady_state" => {
            let what = format!(
                "time to deliver {} changed of {} rows ({} seq scans)",
                n("changed"),
                n("rows"),
                n("caudal_seq_scans")
            );
            let rss = f("caudal_peak_rss_mib");
            vec![
                row(
                    "steady-state",
                    what.clone(),
                    secs("caudal_secs"),
                    format!(
                        "COPY by the index: {} (seq scan: {})",
                        secs("copy_index_secs"),
                        secs("copy_seqscan_secs")
                    ),
                    f("caudal_over_copy_index"),
                    rss,
                ),
                row(
                    "steady-state",
                    what,
                    secs("caudal_secs"),
                    format!("seed 001 loop (Python): {}", secs("seed001_secs")),
                    f("caudal_over_seed001"),
                    rss,
                ),
            ]
        }
        "cdc_throughput" => vec![row(
            "cdc-throughput",
            format!("changes/s, {} changes PostgreSQL → HTTP", n("changes")),
            n("caudal_changes_per_s"),
            format!(
                "pg_recvlogical to /dev/null: {}",
                n("recvlogical_changes_per_s")
            ),
            f("caudal_over_recvlogical"),
            f("caudal_peak_rss_mib"),
        )],
        "mysql_cdc_throughput" => vec![row(
            "mysql-cdc-throughput",
            format!("changes/s, {} changes MariaDB → HTTP", n("changes")),
            n("caudal_changes_per_s"),
            format!(
                "mariadb-binlog --verbose to /dev/null: {}",
                n("binlog_changes_per_s")
            ),
            f("caudal_over_binlog"),
            f("caudal_peak_rss_mib"),
        )],
        s @ ("cdc_latency" | "mysql_cdc_latency") => vec![row(
            &s.replace('_', "-"),
            format!(
                "commit → delivery p50 / p95 / p99 at {} changes/s",
                n("achieved_changes_per_s")
            ),
            format!("{} / {} / {}", ms("p50_ms"), ms("p95_ms"), ms("p99_ms")),
            format!("batch max_wait: {} ms", n("max_wait_ms")),
            None,
            f("caudal_peak_rss_mib"),
        )],
        "buffer" => vec![row(
            "buffer",
            format!("records/s write + read, fsync per batch of {}", n("batch")),
            format!(
                "{} ({} MB/s)",
                n("buffer_records_per_s"),
                n("buffer_mb_per_s")
            ),
            format!(
                "write + fdatasync, read: {} ({} MB/s)",
                n("plain_records_per_s"),
                n("plain_mb_per_s")
            ),
            f("buffer_over_plain"),
            None,
        )],
        "http_sink" => vec![row(
            "http-sink",
            format!("records/s, {} in flight", n("concurrency")),
            n("caudal_records_per_s"),
            format!(
                "receiver alone, {} connections: {}",
                n("ceiling_connections"),
                n("ceiling_records_per_s")
            ),
            f("caudal_over_ceiling"),
            None,
        )],
        "footprint" => vec![
            row(
                "footprint",
                format!("idle RSS {} s after a run of 1,000 rows", n("idle_secs")),
                format!("{:.1} MiB", f("idle_rss_mib").unwrap_or(f64::NAN)),
                format!(
                    "seed 001 scheduler (Python): {:.1} MiB",
                    f("seed001_idle_rss_mib").unwrap_or(f64::NAN)
                ),
                f("seed001_rss_over_caudal"),
                f("peak_rss_mib"),
            ),
            row(
                "footprint",
                "of which private (heap, stacks)".to_string(),
                format!("{:.1} MiB", f("idle_anon_rss_mib").unwrap_or(f64::NAN)),
                format!(
                    "seed 001 scheduler (Python): {:.1} MiB",
                    f("seed001_idle_anon_rss_mib").unwrap_or(f64::NAN)
                ),
                f("seed001_anon_rss_over_caudal"),
                None,
            ),
            row(
                "footprint",
                format!(
                    "RSS of a restart waiting for its hour, after {} s",
                    n("idle_secs")
                ),
                format!(
                    "{:.1} MiB ({:.1} private)",
                    f("restart_rss_mib").unwrap_or(f64::NAN),
                    f("restart_anon_rss_mib").unwrap_or(f64::NAN)
                ),
                "–".to_string(),
                None,
                None,
            ),
            row(
                "footprint",
                "startup to ready".to_string(),
                ms("ready_ms"),
                format!("seed 001 scheduler (Python): {}", ms("seed001_ready_ms")),
                f("seed001_ready_over_caudal"),
                None,
            ),
            row(
                "footprint",
                "binary size".to_string(),
                format!("{:.1} MiB", f("binary_mib").unwrap_or(f64::NAN)),
                "–".to_string(),
                None,
                None,
            ),
        ],
        other => vec![row(
            other,
            String::new(),
            String::new(),
            String::new(),
            None,
            None,
        )],
    }
}

/// `1234567.8` → `1,234,568`; values under 100 keep two decimals.
fn thousands(v: f64) -> String {
    if v.abs() < 100.0 {
        return format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{table, thousands};

    #[test]
    fn numbers_read_with_separators() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(24.5), "24.5");
        assert_eq!(thousands(0.0), "0");
    }

    #[test]
    fn a_result_becomes_rows_with_its_reference() {
        let t = table(&[json!({
            "scenario": "cdc_throughput", "changes": 500000,
            "caudal_changes_per_s": 100000.0, "recvlogical_changes_per_s": 160000.0,
            "caudal_over_recvlogical": 0.63, "caudal_peak_rss_mib": 75.2,
        })]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[2],
            "| cdc-throughput | changes/s, 500,000 changes PostgreSQL → HTTP | 100,000 | pg_recvlogical to /dev/null: 160,000 | 0.63 | 75 MiB |"
        );
    }
}
