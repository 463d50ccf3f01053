//! The Markdown table printed after the JSON lines: one row per figure
//! with its reference from the same run.
//!
//! `ratio` always reads "caudal as a share of the reference, 1.00 = as good
//! as the reference, above 1 = better": a rate is caudal's over the
//! reference's, a time or a size is the reference's over caudal's.
//!
//! With several runs of a scenario (`--repeat`), each cell is the median
//! of that figure or ratio over the runs (of the ratios each run measured,
//! not a ratio of medians), followed by its range, `(min–max)`, where the
//! runs differ: figures are reported as the median of several runs with
//! their range, never the best run.

use std::collections::HashMap;

use serde_json::Value;

/// One row of the table, its cells formatted.
struct Row {
    scenario: String,
    measure: String,
    caudal: String,
    reference: String,
    ratio: String,
    rss: String,
}

/// One result line across the runs of its scenario: the k-th line the
/// scenario printed in each run (`http-sink` prints two per run).
struct Runs<'a> {
    scenario: String,
    lines: Vec<&'a Value>,
}

impl Runs<'_> {
    /// The runs' values of the number `key`, sorted.
    fn numbers(&self, key: &str) -> Vec<f64> {
        let mut v: Vec<f64> = self.lines.iter().filter_map(|l| l[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn has(&self, key: &str) -> bool {
        !self.numbers(key).is_empty()
    }

    /// The median of `key` formatted by `format` and followed by `unit`,
    /// then `(min–max)` when the runs' values format differently; `?` when
    /// no run has it.
    fn show(&self, key: &str, format: impl Fn(f64) -> String, unit: &str) -> String {
        let v = self.numbers(key);
        let (Some(&lo), Some(&hi)) = (v.first(), v.last()) else {
            return "?".to_string();
        };
        let (mid, lo, hi) = (format(median(&v)), format(lo), format(hi));
        if lo == hi {
            format!("{mid}{unit}")
        } else {
            format!("{mid}{unit} ({lo}–{hi})")
        }
    }

    /// The runs' distinct values of the string `key`, joined by ` / `.
    fn text(&self, key: &str) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for line in &self.lines {
            if let Some(s) = line[key].as_str()
                && !seen.contains(&s)
            {
                seen.push(s);
            }
        }
        if seen.is_empty() {
            "?".to_string()
        } else {
            seen.join(" / ")
        }
    }
}

/// The median of sorted values (the mean of the middle two of an even
/// number).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// `results` grouped across runs, in the order first printed: the lines
/// of a run carry its number (`run`, 1 when absent).
fn group(results: &[Value]) -> Vec<Runs<'_>> {
    let mut groups: Vec<(usize, Runs<'_>)> = Vec::new();
    let mut printed: HashMap<(String, u64), usize> = HashMap::new();
    for line in results {
        let scenario = line["scenario"].as_str().unwrap_or_default().to_string();
        let run = line["run"].as_u64().unwrap_or(1);
        let count = printed.entry((scenario.clone(), run)).or_insert(0);
        let k = *count;
        *count += 1;
        match groups
            .iter_mut()
            .find(|(i, g)| *i == k && g.scenario == scenario)
        {
            Some((_, g)) => g.lines.push(line),
            None => groups.push((
                k,
                Runs {
                    scenario,
                    lines: vec![line],
                },
            )),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// The table of `results` (the JSON objects the scenarios returned, one
/// per run each), with a line saying how many runs each cell sums up and
/// which baseline build was measured, if any.
pub fn table(results: &[Value]) -> String {
    let groups = group(results);
    let runs = groups.iter().map(|g| g.lines.len()).max().unwrap_or(1);
    let mut out = String::new();
    if runs > 1 {
        out.push_str(&format!(
            "Each cell: the median of {runs} runs, then (min–max) across them where they differ.\n\n"
        ));
    }
    let mut baselines: Vec<&str> = results
        .iter()
        .filter_map(|r| r["baseline_binary"].as_str())
        .collect();
    baselines.dedup();
    if !baselines.is_empty() {
        out.push_str(&format!(
            "Baseline build (`--baseline-caudal`): `{}`.\n\n",
            baselines.join("`, `")
        ));
    }
    out.push_str(
        "| scenario | measure | caudal | reference (same run) | ratio | caudal peak RSS |\n\
         |---|---|---:|---|---:|---:|\n",
    );
    for row in groups.iter().flat_map(rows) {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.scenario, row.measure, row.caudal, row.reference, row.ratio, row.rss,
        ));
    }
    out
}

fn rows(r: &Runs<'_>) -> Vec<Row> {
    let n = |k: &str| r.show(k, thousands, "");
    let ms = |k: &str| r.show(k, |v| format!("{v:.1}"), " ms");
    let secs = |k: &str| r.show(k, |v| format!("{v:.2}"), " s");
    let mib = |k: &str| r.show(k, |v| format!("{v:.1}"), " MiB");
    let ratio = |k: &str| r.show(k, |v| format!("{v:.2}"), "");
    let rss = |k: &str| r.show(k, |v| format!("{v:.0}"), " MiB");
    let none = || "–".to_string();
    let row =
        |scenario: &str, measure: String, caudal: String, reference: String, ratio, rss| Row {
            scenario: scenario.to_string(),
            measure,
            caudal,
            reference,
            ratio,
            rss,
        };
    let baseline = r.has("caudal_over_baseline");
    let mut out = Vec::new();
    match r.scenario.as_str() {
        "initial_sync" => {
            let what = format!("rows/s, {} rows PostgreSQL → HTTP", n("rows"));
            let workers = n("copy_workers");
            let copy_name = |name: &str| match name {
                "ordered" => "the ordered query, text".to_string(),
                "text" => "the table, text".to_string(),
                "binary" => "the table, binary".to_string(),
                "parallel_text" => format!("ctid ranges on {workers} connections, text"),
                "parallel_binary" => format!("ctid ranges on {workers} connections, binary"),
                other => other.to_string(),
            };
            let fastest = r
                .text("copy_fastest")
                .split(" / ")
                .map(copy_name)
                .collect::<Vec<_>>()
                .join(" / ");
            let c = || n("caudal_rows_per_s");
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "initial-sync",
                what.clone(),
                c(),
                format!(
                    "read ceiling, fastest COPY to /dev/null ({fastest}): {}",
                    n("copy_fastest_rows_per_s")
                ),
                ratio("caudal_over_copy"),
                c_rss(),
            ));
            out.push(row(
                "initial-sync",
                what.clone(),
                c(),
                format!(
                    "COPY (the same ordered query) to /dev/null: {}",
                    n("copy_ordered_rows_per_s")
                ),
                ratio("caudal_over_copy_ordered"),
                c_rss(),
            ));
            out.push(row(
                "initial-sync",
                what.clone(),
                c(),
                format!(
                    "COPY of the table to /dev/null: text {}, binary {}; in ctid ranges on {workers} connections: text {}, binary {}",
                    n("copy_text_rows_per_s"),
                    n("copy_binary_rows_per_s"),
                    n("copy_parallel_text_rows_per_s"),
                    n("copy_parallel_binary_rows_per_s"),
                ),
                none(),
                c_rss(),
            ));
            out.push(row(
                "initial-sync",
                what.clone(),
                c(),
                format!(
                    "seed 001 loop (Python): {} ({} MiB)",
                    n("seed001_rows_per_s"),
                    n("seed001_peak_rss_mib")
                ),
                ratio("caudal_over_seed001"),
                c_rss(),
            ));
            out.push(row(
                "initial-sync",
                what.clone(),
                c(),
                format!(
                    "seed 000 thread pool (Python, {} rows): {}",
                    n("seed000_rows"),
                    n("seed000_rows_per_s")
                ),
                ratio("caudal_over_seed000"),
                c_rss(),
            ));
            if baseline {
                out.push(row(
                    "initial-sync",
                    what,
                    c(),
                    format!(
                        "baseline build: {} ({})",
                        n("baseline_rows_per_s"),
                        rss("baseline_peak_rss_mib")
                    ),
                    ratio("caudal_over_baseline"),
                    c_rss(),
                ));
            }
        }
        "steady_state" => {
            let what = format!(
                "time to deliver {} changed of {} rows ({} seq scans)",
                n("changed"),
                n("rows"),
                n("caudal_seq_scans")
            );
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "steady-state",
                what.clone(),
                secs("caudal_secs"),
                format!(
                    "COPY by the index: {} (seq scan: {})",
                    secs("copy_index_secs"),
                    secs("copy_seqscan_secs")
                ),
                ratio("caudal_over_copy_index"),
                c_rss(),
            ));
            out.push(row(
                "steady-state",
                what.clone(),
                secs("caudal_secs"),
                format!("seed 001 loop (Python): {}", secs("seed001_secs")),
                ratio("caudal_over_seed001"),
                c_rss(),
            ));
            if baseline {
                out.push(row(
                    "steady-state",
                    what,
                    secs("caudal_secs"),
                    format!(
                        "baseline build: {} ({} seq scans; first run {} rows/s against caudal's {})",
                        secs("baseline_secs"),
                        n("baseline_seq_scans"),
                        n("baseline_first_run_rows_per_s"),
                        n("first_run_rows_per_s"),
                    ),
                    ratio("caudal_over_baseline"),
                    c_rss(),
                ));
            }
        }
        "cdc_throughput" => {
            let what = format!("changes/s, {} changes PostgreSQL → HTTP", n("changes"));
            let c = || n("caudal_changes_per_s");
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "cdc-throughput",
                what.clone(),
                c(),
                format!(
                    "ceiling, the server's own decoding (pg_logical_slot_peek_binary_changes): {}",
                    n("server_decode_changes_per_s")
                ),
                ratio("caudal_over_server_decode"),
                c_rss(),
            ));
            out.push(row(
                "cdc-throughput",
                what.clone(),
                c(),
                format!(
                    "pg_recvlogical to /dev/null: {}",
                    n("recvlogical_changes_per_s")
                ),
                ratio("caudal_over_recvlogical"),
                c_rss(),
            ));
            if baseline {
                out.push(row(
                    "cdc-throughput",
                    what,
                    c(),
                    format!(
                        "baseline build: {} ({})",
                        n("baseline_changes_per_s"),
                        rss("baseline_peak_rss_mib")
                    ),
                    ratio("caudal_over_baseline"),
                    c_rss(),
                ));
            }
        }
        "mysql_cdc_throughput" => {
            let what = format!("changes/s, {} changes MariaDB → HTTP", n("changes"));
            let c = || n("caudal_changes_per_s");
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "mysql-cdc-throughput",
                what.clone(),
                c(),
                format!(
                    "mariadb-binlog --verbose to /dev/null: {}",
                    n("binlog_changes_per_s")
                ),
                ratio("caudal_over_binlog"),
                c_rss(),
            ));
            if baseline {
                out.push(row(
                    "mysql-cdc-throughput",
                    what,
                    c(),
                    format!(
                        "baseline build: {} ({})",
                        n("baseline_changes_per_s"),
                        rss("baseline_peak_rss_mib")
                    ),
                    ratio("caudal_over_baseline"),
                    c_rss(),
                ));
            }
        }
        s @ ("cdc_latency" | "mysql_cdc_latency") => {
            let name = s.replace('_', "-");
            let what = format!(
                "commit → delivery p50 / p95 / p99 at {} changes/s",
                n("achieved_changes_per_s")
            );
            let c = || format!("{} / {} / {}", ms("p50_ms"), ms("p95_ms"), ms("p99_ms"));
            out.push(row(
                &name,
                what.clone(),
                c(),
                format!("batch max_wait: {} ms", n("max_wait_ms")),
                none(),
                rss("caudal_peak_rss_mib"),
            ));
            if baseline {
                out.push(row(
                    &name,
                    what,
                    c(),
                    format!(
                        "baseline build: {} / {} / {} at {} changes/s ({}); ratio of the p50s",
                        ms("baseline_p50_ms"),
                        ms("baseline_p95_ms"),
                        ms("baseline_p99_ms"),
                        n("baseline_achieved_changes_per_s"),
                        rss("baseline_peak_rss_mib"),
                    ),
                    ratio("caudal_over_baseline"),
                    rss("caudal_peak_rss_mib"),
                ));
            }
        }
        "buffer" => out.push(row(
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
            ratio("buffer_over_plain"),
            none(),
        )),
        "http_sink" => out.push(row(
            "http-sink",
            format!("records/s, {} in flight", n("concurrency")),
            n("caudal_records_per_s"),
            format!(
                "receiver alone, {} connections: {}",
                n("ceiling_connections"),
                n("ceiling_records_per_s")
            ),
            ratio("caudal_over_ceiling"),
            none(),
        )),
        "workflow_dispatch" => {
            let store = r.text("store");
            out.push(row(
                "workflow-dispatch",
                format!(
                    "no-op tasks/s, {} tasks in a pool of {}, {store} store",
                    n("tasks"),
                    n("slots")
                ),
                r.show("caudal_tasks_per_s", thousands, ""),
                format!(
                    "ceiling, spawn and wait `true` with no bookkeeping: {}",
                    r.show("ceiling_tasks_per_s", thousands, "")
                ),
                ratio("caudal_over_ceiling"),
                rss("caudal_peak_rss_mib"),
            ));
        }
        "workflow_chain" => {
            let store = r.text("store");
            out.push(row(
                "workflow-chain",
                format!("p50 end → next start, chain of 200, {store} store"),
                ms("caudal_p50_ms"),
                format!(
                    "graphile-worker on the same PostgreSQL: {}",
                    ms("graphile_p50_ms")
                ),
                ratio("graphile_over_caudal_p50"),
                rss("caudal_peak_rss_mib"),
            ));
            out.push(row(
                "workflow-chain",
                format!("p99, {store} store"),
                ms("caudal_p99_ms"),
                format!("graphile-worker: {}", ms("graphile_p99_ms")),
                ratio("graphile_over_caudal_p99"),
                none(),
            ));
        }
        "crawl" => {
            let what = format!(
                "pages/min, {} pages ({} records), {} in flight, no politeness",
                n("pages"),
                n("details"),
                n("concurrency")
            );
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "crawl",
                what,
                n("caudal_pages_per_min"),
                format!(
                    "Scrapy, same site, settings and selectors: {}",
                    n("scrapy_pages_per_min")
                ),
                ratio("caudal_over_scrapy"),
                c_rss(),
            ));
            out.push(row(
                "crawl",
                "peak RSS".to_string(),
                mib("caudal_peak_rss_mib"),
                format!("Scrapy: {}", mib("scrapy_peak_rss_mib")),
                ratio("scrapy_rss_over_caudal"),
                none(),
            ));
            out.push(row(
                "crawl",
                "pages/min between the site's first request and last answer".to_string(),
                n("caudal_crawl_pages_per_min"),
                format!("Scrapy: {}", n("scrapy_crawl_pages_per_min")),
                none(),
                none(),
            ));
            out.push(row(
                "crawl",
                "requests the site answered (duplicates)".to_string(),
                format!("{} ({})", n("caudal_requests"), n("caudal_duplicates")),
                format!(
                    "Scrapy: {} ({})",
                    n("scrapy_requests"),
                    n("scrapy_duplicates")
                ),
                none(),
                none(),
            ));
        }
        "crawl_limit" => {
            out.push(row(
                "crawl-limit",
                format!(
                    "requests/s to a site limited to {} in flight and {} ms apart, {} pages",
                    n("configured_concurrency"),
                    n("configured_delay_ms"),
                    n("pages")
                ),
                n("achieved_requests_per_s"),
                format!("configured: {}", n("configured_requests_per_s")),
                r.show("achieved_over_configured", |v| format!("{v:.3}"), ""),
                rss("caudal_peak_rss_mib"),
            ));
            out.push(row(
                "crawl-limit",
                format!(
                    "smallest gap between request starts (most in flight: {})",
                    n("max_in_flight")
                ),
                ms("min_gap_ms"),
                format!("delay: {}", ms("configured_delay_ms")),
                ratio("min_gap_over_delay"),
                none(),
            ));
        }
        "dataset_write" => {
            let what = format!(
                "rows/s, {} rows over {} days PostgreSQL → daily Parquet ({}), `caudal backfill --parallel {}`",
                n("rows"),
                n("days"),
                r.text("compression"),
                n("parallel")
            );
            let c = || n("caudal_rows_per_s");
            let c_rss = || rss("caudal_peak_rss_mib");
            out.push(row(
                "dataset-write",
                what.clone(),
                c(),
                format!(
                    "encoding ceiling, pyarrow writing the same shape from memory, a file at a time (goal: {} of it): {}",
                    ratio("goal_over_pyarrow"),
                    n("pyarrow_rows_per_s")
                ),
                ratio("caudal_over_pyarrow"),
                c_rss(),
            ));
            out.push(row(
                "dataset-write",
                what.clone(),
                c(),
                format!(
                    "pyarrow, {} files at once: {}",
                    n("parallel"),
                    n("pyarrow_parallel_rows_per_s")
                ),
                ratio("caudal_over_pyarrow_parallel"),
                c_rss(),
            ));
            out.push(row(
                "dataset-write",
                what,
                c(),
                format!(
                    "read ceiling, COPY of each day's query to /dev/null on {} connections: csv {} (binary {})",
                    n("parallel"),
                    n("copy_csv_rows_per_s"),
                    n("copy_binary_rows_per_s")
                ),
                ratio("caudal_over_copy"),
                c_rss(),
            ));
            out.push(row(
                "dataset-write",
                format!(
                    "Parquet written ({} files; a date took {} median, {} at most)",
                    n("caudal_files"),
                    ms("caudal_date_ms_p50"),
                    ms("caudal_date_ms_max")
                ),
                r.show("caudal_bytes", |v| format!("{:.1}", v / 1048576.0), " MiB"),
                format!(
                    "pyarrow: {}",
                    r.show("pyarrow_bytes", |v| format!("{:.1}", v / 1048576.0), " MiB")
                ),
                ratio("pyarrow_bytes_over_caudal"),
                none(),
            ));
        }
        "dataset_query" => {
            let dataset = r.text("dataset");
            let question = format!(
                "`{dataset}`, provider {}, {} days ({} rows, {} KiB)",
                n("provider_id"),
                n("window_days"),
                n("page_rows"),
                r.show("page_bytes", |v| thousands(v / 1024.0), "")
            );
            let duck = format!(
                "DuckDB on the manifests' {} files: {} / {}",
                n("files"),
                ms("duckdb_p50_ms"),
                ms("duckdb_p99_ms")
            );
            out.push(row(
                "dataset-query",
                format!(
                    "{question}, cold ({} distinct queries): p50 / p99, requests/s; ratio of the p50s",
                    n("cold_queries")
                ),
                format!(
                    "{} / {}, {}/s (handler {})",
                    ms("cold_p50_ms"),
                    ms("cold_p99_ms"),
                    n("cold_requests_per_s"),
                    ms("server_miss_mean_ms")
                ),
                duck.clone(),
                ratio("duckdb_over_caudal_cold_p50"),
                rss("caudal_peak_rss_mib"),
            ));
            out.push(row(
                "dataset-query",
                format!(
                    "{question}, cached ({} requests on one connection; goal p99 ≤ {}): p50 / p99, requests/s; ratio of the p50s",
                    n("cached_queries"),
                    ms("goal_cached_p99_ms")
                ),
                format!(
                    "{} / {}, {}/s (handler {})",
                    ms("cached_p50_ms"),
                    ms("cached_p99_ms"),
                    n("cached_requests_per_s"),
                    ms("server_hit_mean_ms")
                ),
                duck,
                ratio("duckdb_over_caudal_cached_p50"),
                none(),
            ));
        }
        "live_throughput" => {
            out.push(row(
                "live-throughput",
                format!(
                    "changes/s, {} changes PostgreSQL → HTTP through the aggregate (per account, per minute: count, sum, p95, max), start to exit",
                    n("changes")
                ),
                n("aggregate_changes_per_s"),
                format!(
                    "plain CDC → HTTP, the same backlog from its own slot (goal: 0.80 of it): {} ({})",
                    n("plain_changes_per_s"),
                    rss("plain_peak_rss_mib")
                ),
                ratio("aggregate_over_plain"),
                rss("aggregate_peak_rss_mib"),
            ));
            out.push(row(
                "live-throughput",
                "the same, start until the receiver had every change".to_string(),
                n("aggregate_delivered_changes_per_s"),
                format!("plain: {}", n("plain_delivered_changes_per_s")),
                ratio("aggregate_over_plain_delivered"),
                none(),
            ));
            out.push(row(
                "live-throughput",
                "caudal's CPU for the drain (user + system)".to_string(),
                secs("aggregate_cpu_secs"),
                format!("plain: {}", secs("plain_cpu_secs")),
                ratio("aggregate_over_plain_cpu"),
                none(),
            ));
        }
        "live_latency" => {
            let three = |a: &str, b: &str, c: &str| format!("{} / {} / {}", ms(a), ms(b), ms(c));
            out.push(row(
                "live-latency",
                format!(
                    "commit → visible on the SSE stream p50 / p95 / p99 at {} changes/s (goal: p99 ≤ 50 ms)",
                    n("achieved_changes_per_s")
                ),
                three("visible_p50_ms", "visible_p95_ms", "visible_p99_ms"),
                format!(
                    "HTTP delivery of the same transactions by the same process, from the same instant: {}; ratio of the p50s",
                    three(
                        "delivered_txn_p50_ms",
                        "delivered_txn_p95_ms",
                        "delivered_txn_p99_ms"
                    )
                ),
                ratio("visible_over_delivered"),
                rss("caudal_peak_rss_mib"),
            ));
            out.push(row(
                "live-latency",
                "the same at p99".to_string(),
                ms("visible_p99_ms"),
                format!("HTTP delivery: {}", ms("delivered_txn_p99_ms")),
                ratio("visible_over_delivered_p99"),
                none(),
            ));
            out.push(row(
                "live-latency",
                "per record, `commit_time` → HTTP delivery (`cdc-latency`'s figure), p50 / p95 / p99"
                    .to_string(),
                three("delivery_p50_ms", "delivery_p95_ms", "delivery_p99_ms"),
                format!(
                    "batch `max_wait`: {} ms; commit round trip p50 {}, p99 {}",
                    n("max_wait_ms"),
                    ms("commit_rtt_p50_ms"),
                    ms("commit_rtt_p99_ms")
                ),
                none(),
                none(),
            ));
        }
        "broker_sink" => {
            let broker = r.text("broker");
            let (into, client) = match broker.as_str() {
                "rabbitmq" => (
                    "RabbitMQ (durable queue, persistent, publisher confirms)",
                    "lapin",
                ),
                "nats" => (
                    "NATS JetStream (file storage, acknowledged publishes)",
                    "async-nats",
                ),
                "kafka" => (
                    "Kafka, librdkafka's mock cluster (idempotent producer, acks=all)",
                    "rdkafka FutureProducer",
                ),
                _ => ("?", "?"),
            };
            let window = if r.has("bare_window") {
                format!("{} unconfirmed at once", n("bare_window"))
            } else {
                "all queued, then every report awaited".to_string()
            };
            out.push(row(
                "broker-sink",
                format!(
                    "messages/s, {} records of {} B PostgreSQL → {into}, batches of {}, {} in flight",
                    n("messages"),
                    r.show("message_bytes", |v| thousands(v.round()), ""),
                    n("batch"),
                    n("concurrency")
                ),
                n("caudal_messages_per_s"),
                format!(
                    "ceiling, a bare {client} client publishing the same messages encoded beforehand, same durability, {window} (goal: {} of it): {}",
                    ratio("goal_over_bare"),
                    n("bare_messages_per_s")
                ),
                ratio("caudal_over_bare"),
                rss("caudal_peak_rss_mib"),
            ));
            let broker_cores = |side: &str| {
                if r.has(&format!("{side}_broker_cores")) {
                    format!(", broker {}", n(&format!("{side}_broker_cores")))
                } else {
                    String::new()
                }
            };
            out.push(row(
                "broker-sink",
                format!("{broker}: cores busy over the run (of the machine's), by whom"),
                format!(
                    "{} (caudal {}{}, harness {})",
                    n("caudal_busy_cores"),
                    n("caudal_caudal_cores"),
                    broker_cores("caudal"),
                    n("caudal_harness_cores")
                ),
                format!(
                    "bare client: {} (client process {}{})",
                    n("bare_busy_cores"),
                    n("bare_harness_cores"),
                    broker_cores("bare")
                ),
                none(),
                none(),
            ));
        }
        "broker_consumers" => {
            let broker = r.text("broker");
            let from = match broker.as_str() {
                "rabbitmq" => "a RabbitMQ queue (competing consumers)",
                "nats" => "a JetStream stream (one shared durable consumer)",
                _ => "?",
            };
            let what = |k: usize| {
                format!(
                    "messages/s, {} messages of {} B from {from} → HTTP, ack buffered, {k} `caudal run` process{}",
                    n("messages"),
                    r.show("message_bytes", |v| thousands(v.round()), ""),
                    if k == 1 { "" } else { "es" }
                )
            };
            let busy = |k: usize| {
                let p = format!("p{k}");
                let broker_cores = if r.has(&format!("{p}_broker_cores")) {
                    format!(", broker {}", n(&format!("{p}_broker_cores")))
                } else {
                    String::new()
                };
                format!(
                    "cores busy {} (caudal {}{broker_cores}, receivers {})",
                    n(&format!("{p}_busy_cores")),
                    n(&format!("{p}_caudal_cores")),
                    n(&format!("{p}_receiver_cores"))
                )
            };
            out.push(row(
                "broker-consumers",
                what(1),
                n("p1_messages_per_s"),
                busy(1),
                none(),
                rss("p1_peak_rss_mib"),
            ));
            for k in [2, 3] {
                let goal = if k == 2 {
                    format!(" (goal: {}×)", ratio("goal_p2_over_p1"))
                } else {
                    String::new()
                };
                out.push(row(
                    "broker-consumers",
                    what(k),
                    n(&format!("p{k}_messages_per_s")),
                    format!("1 process{goal}: {}; {}", n("p1_messages_per_s"), busy(k)),
                    ratio(&format!("p{k}_over_p1")),
                    rss(&format!("p{k}_peak_rss_mib")),
                ));
            }
        }
        "footprint" => {
            let idle = format!(
                "idle daemon RSS, {} s after a run of 1,000 rows",
                n("idle_secs")
            );
            out.push(row(
                "footprint",
                idle.clone(),
                mib("idle_rss_mib"),
                format!(
                    "seed 001 scheduler (Python): {}",
                    mib("seed001_idle_rss_mib")
                ),
                ratio("seed001_rss_over_caudal"),
                rss("peak_rss_mib"),
            ));
            out.push(row(
                "footprint",
                "of which private (heap, stacks)".to_string(),
                mib("idle_anon_rss_mib"),
                format!(
                    "seed 001 scheduler (Python): {}",
                    mib("seed001_idle_anon_rss_mib")
                ),
                ratio("seed001_anon_rss_over_caudal"),
                none(),
            ));
            if baseline {
                out.push(row(
                    "footprint",
                    idle,
                    format!(
                        "{} ({} private)",
                        mib("idle_rss_mib"),
                        mib("idle_anon_rss_mib")
                    ),
                    format!(
                        "baseline build: {} ({} private)",
                        mib("baseline_idle_rss_mib"),
                        mib("baseline_idle_anon_rss_mib")
                    ),
                    ratio("caudal_over_baseline"),
                    rss("peak_rss_mib"),
                ));
            }
            out.push(row(
                "footprint",
                format!(
                    "RSS of a restart waiting for its hour, after {} s",
                    n("idle_secs")
                ),
                format!(
                    "{} ({} private)",
                    mib("restart_rss_mib"),
                    mib("restart_anon_rss_mib")
                ),
                none(),
                none(),
                none(),
            ));
            out.push(row(
                "footprint",
                "startup to ready".to_string(),
                ms("ready_ms"),
                format!("seed 001 scheduler (Python): {}", ms("seed001_ready_ms")),
                ratio("seed001_ready_over_caudal"),
                none(),
            ));
            if baseline {
                out.push(row(
                    "footprint",
                    "startup to ready".to_string(),
                    ms("ready_ms"),
                    format!("baseline build: {}", ms("baseline_ready_ms")),
                    ratio("caudal_over_baseline_ready"),
                    none(),
                ));
            }
            out.push(row(
                "footprint",
                "binary size".to_string(),
                mib("binary_mib"),
                if r.has("baseline_binary_mib") {
                    format!("baseline build: {}", mib("baseline_binary_mib"))
                } else {
                    none()
                },
                none(),
                none(),
            ));
        }
        "cluster_failover" => {
            let what = |m: &str| {
                format!(
                    "{m}, {} nodes, a CDC pipeline's owner killed with SIGKILL, {} trials",
                    n("nodes"),
                    n("trials")
                )
            };
            let lease = secs("lease_s");
            out.push(row(
                "cluster-failover",
                what("kill → first delivery by the new owner, p50 / p99 / max"),
                format!(
                    "{} / {} / {}",
                    secs("failover_p50_s"),
                    secs("failover_p99_s"),
                    secs("failover_max_s")
                ),
                format!(
                    "the lease, {lease}: the floor of a lease-based failover (goal: p99 ≤ {})",
                    secs("goal_failover_p99_s")
                ),
                format!(
                    "{} / {}",
                    ratio("failover_p50_over_lease"),
                    ratio("failover_p99_over_lease")
                ),
                none(),
            ));
            out.push(row(
                "cluster-failover",
                what("kill → another node holds the lease, p50 / p99 / max"),
                format!(
                    "{} / {} / {}",
                    secs("takeover_p50_s"),
                    secs("takeover_p99_s"),
                    secs("takeover_max_s")
                ),
                format!("the lease, {lease}"),
                none(),
                none(),
            ));
        }
        "cluster_dispatch" => {
            out.push(row(
                "cluster-dispatch",
                format!(
                    "no-op command tasks/s, {} tasks in a cluster-wide pool of {}, {} node(s) on one PostgreSQL",
                    n("tasks"),
                    n("slots"),
                    n("nodes")
                ),
                n("caudal_tasks_per_s"),
                format!(
                    "graphile-worker on the same PostgreSQL, `true` per job, concurrency {}: {}",
                    n("slots"),
                    n("graphile_jobs_per_s")
                ),
                ratio("caudal_over_graphile"),
                none(),
            ));
        }
        other => out.push(row(
            other,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        )),
    }
    out
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
    fn a_result_becomes_rows_with_its_references() {
        let t = table(&[json!({
            "scenario": "cdc_throughput", "changes": 500000,
            "caudal_changes_per_s": 100000.0, "recvlogical_changes_per_s": 160000.0,
            "caudal_over_recvlogical": 0.63, "caudal_peak_rss_mib": 75.2,
            "server_decode_changes_per_s": 400000.0, "caudal_over_server_decode": 0.25,
        })]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(
            lines[2],
            "| cdc-throughput | changes/s, 500,000 changes PostgreSQL → HTTP | 100,000 | ceiling, the server's own decoding (pg_logical_slot_peek_binary_changes): 400,000 | 0.25 | 75 MiB |"
        );
        assert_eq!(
            lines[3],
            "| cdc-throughput | changes/s, 500,000 changes PostgreSQL → HTTP | 100,000 | pg_recvlogical to /dev/null: 160,000 | 0.63 | 75 MiB |"
        );
    }

    #[test]
    fn several_runs_show_the_median_and_the_range() {
        let run = |run: u64, rate: f64, ratio: f64, rss: f64| {
            json!({
                "scenario": "mysql_cdc_throughput", "run": run, "changes": 500000,
                "caudal_changes_per_s": rate, "binlog_changes_per_s": 2000000.0,
                "caudal_over_binlog": ratio, "caudal_peak_rss_mib": rss,
            })
        };
        let t = table(&[
            run(1, 300000.0, 0.15, 120.0),
            run(2, 100000.0, 0.05, 125.0),
            run(3, 200000.0, 0.10, 130.0),
        ]);
        assert!(t.starts_with("Each cell: the median of 3 runs"), "{t}");
        let row = t.lines().last().unwrap_or_default();
        assert_eq!(
            row,
            "| mysql-cdc-throughput | changes/s, 500,000 changes MariaDB → HTTP | 200,000 (100,000–300,000) | mariadb-binlog --verbose to /dev/null: 2,000,000 | 0.10 (0.05–0.15) | 125 MiB (120–130) |"
        );
        // An even number of runs: the mean of the middle two.
        let t = table(&[run(1, 300000.0, 0.2, 120.0), run(2, 100000.0, 0.1, 120.0)]);
        assert!(
            t.contains("| 200,000 (100,000–300,000) |")
                && t.contains("| 0.15 (0.10–0.20) | 120 MiB |"),
            "{t}"
        );
    }

    #[test]
    fn lines_of_one_run_group_with_the_same_lines_of_the_others() {
        // http-sink prints one line per concurrency in every run.
        let line = |run: u64, concurrency: u64, rate: f64| {
            json!({
                "scenario": "http_sink", "run": run, "concurrency": concurrency,
                "caudal_records_per_s": rate, "ceiling_connections": 8,
                "ceiling_records_per_s": 1000000.0, "caudal_over_ceiling": rate / 1e6,
            })
        };
        let t = table(&[
            line(1, 1, 200000.0),
            line(1, 8, 500000.0),
            line(2, 1, 400000.0),
            line(2, 8, 700000.0),
        ]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| http-sink")).collect();
        assert_eq!(
            rows,
            [
                "| http-sink | records/s, 1 in flight | 300,000 (200,000–400,000) | receiver alone, 8 connections: 1,000,000 | 0.30 (0.20–0.40) | – |",
                "| http-sink | records/s, 8 in flight | 600,000 (500,000–700,000) | receiver alone, 8 connections: 1,000,000 | 0.60 (0.50–0.70) | – |",
            ],
            "{t}"
        );
    }

    #[test]
    fn the_crawl_compares_rate_and_memory_with_scrapy() {
        let t = table(&[json!({
            "scenario": "crawl", "pages": 20000, "details": 19000, "concurrency": 16,
            "caudal_pages_per_min": 60000.0, "scrapy_pages_per_min": 20000.0,
            "caudal_over_scrapy": 3.0, "caudal_peak_rss_mib": 30.0,
            "scrapy_peak_rss_mib": 90.0, "scrapy_rss_over_caudal": 3.0,
            "caudal_crawl_pages_per_min": 61000.0, "scrapy_crawl_pages_per_min": 21000.0,
            "caudal_requests": 20000, "caudal_duplicates": 0,
            "scrapy_requests": 20000, "scrapy_duplicates": 0,
        })]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| crawl |")).collect();
        assert_eq!(
            rows[..2],
            [
                "| crawl | pages/min, 20,000 pages (19,000 records), 16 in flight, no politeness | 60,000 | Scrapy, same site, settings and selectors: 20,000 | 3.00 | 30 MiB |",
                "| crawl | peak RSS | 30.0 MiB | Scrapy: 90.0 MiB | 3.00 | – |",
            ],
            "{t}"
        );
        assert!(!t.contains("| ? |"), "{t}");
    }

    #[test]
    fn datasets_compare_with_pyarrow_copy_and_duckdb() {
        let t = table(&[
            json!({
                "scenario": "dataset_write", "rows": 10000000, "days": 100, "parallel": 2,
                "compression": "zstd", "caudal_rows_per_s": 1000000.0,
                "caudal_peak_rss_mib": 120.0, "pyarrow_rows_per_s": 4000000.0,
                "caudal_over_pyarrow": 0.25, "goal_over_pyarrow": 0.5,
                "pyarrow_parallel_rows_per_s": 6000000.0, "caudal_over_pyarrow_parallel": 0.17,
                "copy_csv_rows_per_s": 2000000.0, "copy_binary_rows_per_s": 3000000.0,
                "caudal_over_copy": 0.5, "caudal_files": 100, "caudal_date_ms_p50": 180.0,
                "caudal_date_ms_max": 300.0, "caudal_bytes": 262144000.0,
                "pyarrow_bytes": 251658240.0, "pyarrow_bytes_over_caudal": 0.96,
            }),
            json!({
                "scenario": "dataset_query", "dataset": "sales_raw", "provider_id": 7,
                "window_days": 31, "page_rows": 50000, "page_bytes": 12288000.0, "files": 100,
                "cold_queries": 60, "cold_p50_ms": 80.0, "cold_p99_ms": 95.0,
                "cold_requests_per_s": 12.0, "cached_queries": 1000, "cached_p50_ms": 4.0,
                "cached_p99_ms": 6.0, "cached_requests_per_s": 240.0, "goal_cached_p99_ms": 5.0,
                "server_hit_mean_ms": 1.5, "server_miss_mean_ms": 75.0,
                "duckdb_p50_ms": 40.0, "duckdb_p99_ms": 50.0,
                "duckdb_over_caudal_cold_p50": 0.5, "duckdb_over_caudal_cached_p50": 10.0,
                "caudal_peak_rss_mib": 90.0,
            }),
        ]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| dataset-")).collect();
        assert_eq!(rows.len(), 6, "{t}");
        assert_eq!(
            rows[0],
            "| dataset-write | rows/s, 10,000,000 rows over 100 days PostgreSQL → daily Parquet (zstd), `caudal backfill --parallel 2` | 1,000,000 | encoding ceiling, pyarrow writing the same shape from memory, a file at a time (goal: 0.50 of it): 4,000,000 | 0.25 | 120 MiB |"
        );
        assert_eq!(
            rows[5],
            "| dataset-query | `sales_raw`, provider 7, 31 days (50,000 rows, 12,000 KiB), cached (1,000 requests on one connection; goal p99 ≤ 5.0 ms): p50 / p99, requests/s; ratio of the p50s | 4.0 ms / 6.0 ms, 240/s (handler 1.5 ms) | DuckDB on the manifests' 100 files: 40.0 ms / 50.0 ms | 10.00 | – |"
        );
        assert!(!t.contains("| ? |") && !t.contains("?"), "{t}");
    }

    #[test]
    fn cluster_failover_shows_percentiles_against_the_lease() {
        let t = table(&[json!({
            "scenario": "cluster_failover", "nodes": 3, "trials": 20, "lease_s": 6.0,
            "takeover_p50_s": 5.51, "takeover_p99_s": 5.71, "takeover_max_s": 5.71,
            "failover_p50_s": 5.58, "failover_p99_s": 5.77, "failover_max_s": 5.77,
            "failover_p50_over_lease": 0.93, "failover_p99_over_lease": 0.96,
            "goal_failover_p99_s": 10.0,
        })]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| cluster-")).collect();
        assert_eq!(
            rows,
            [
                "| cluster-failover | kill → first delivery by the new owner, p50 / p99 / max, 3 nodes, a CDC pipeline's owner killed with SIGKILL, 20 trials | 5.58 s / 5.77 s / 5.77 s | the lease, 6.00 s: the floor of a lease-based failover (goal: p99 ≤ 10.00 s) | 0.93 / 0.96 | – |",
                "| cluster-failover | kill → another node holds the lease, p50 / p99 / max, 3 nodes, a CDC pipeline's owner killed with SIGKILL, 20 trials | 5.51 s / 5.71 s / 5.71 s | the lease, 6.00 s | – | – |",
            ],
            "{t}"
        );
    }

    #[test]
    fn brokers_show_the_bare_client_and_the_scaling_of_consumers() {
        let t = table(&[
            json!({
                "scenario": "broker_sink", "broker": "rabbitmq", "messages": 100000,
                "message_bytes": 1010.0, "batch": 1000, "concurrency": 1, "bare_window": 5000,
                "caudal_messages_per_s": 14000.0, "bare_messages_per_s": 20000.0,
                "caudal_over_bare": 0.7, "goal_over_bare": 0.7, "caudal_peak_rss_mib": 40.0,
                "caudal_busy_cores": 1.9, "caudal_caudal_cores": 0.6, "caudal_broker_cores": 1.1,
                "caudal_harness_cores": 0.0, "bare_busy_cores": 1.8, "bare_harness_cores": 0.4,
                "bare_broker_cores": 1.3,
            }),
            json!({
                "scenario": "broker_consumers", "broker": "nats", "messages": 200000,
                "message_bytes": 62.0, "goal_p2_over_p1": 1.6,
                "p1_messages_per_s": 50000.0, "p2_messages_per_s": 80000.0,
                "p3_messages_per_s": 85000.0, "p2_over_p1": 1.6, "p3_over_p1": 1.7,
                "p1_busy_cores": 1.5, "p1_caudal_cores": 0.9, "p1_broker_cores": 0.4,
                "p1_receiver_cores": 0.2, "p2_busy_cores": 2.0, "p2_caudal_cores": 1.2,
                "p2_broker_cores": 0.5, "p2_receiver_cores": 0.3, "p3_busy_cores": 2.0,
                "p3_caudal_cores": 1.3, "p3_broker_cores": 0.5, "p3_receiver_cores": 0.2,
                "p1_peak_rss_mib": 30.0, "p2_peak_rss_mib": 29.0, "p3_peak_rss_mib": 28.0,
            }),
        ]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| broker-")).collect();
        assert_eq!(rows.len(), 5, "{t}");
        assert_eq!(
            rows[0],
            "| broker-sink | messages/s, 100,000 records of 1,010 B PostgreSQL → RabbitMQ (durable queue, persistent, publisher confirms), batches of 1,000, 1 in flight | 14,000 | ceiling, a bare lapin client publishing the same messages encoded beforehand, same durability, 5,000 unconfirmed at once (goal: 0.70 of it): 20,000 | 0.70 | 40 MiB |"
        );
        assert_eq!(
            rows[1],
            "| broker-sink | rabbitmq: cores busy over the run (of the machine's), by whom | 1.9 (caudal 0.6, broker 1.1, harness 0) | bare client: 1.8 (client process 0.4, broker 1.3) | – | – |"
        );
        assert_eq!(
            rows[3],
            "| broker-consumers | messages/s, 200,000 messages of 62 B from a JetStream stream (one shared durable consumer) → HTTP, ack buffered, 2 `caudal run` processes | 80,000 | 1 process (goal: 1.60×): 50,000; cores busy 2 (caudal 1.2, broker 0.5, receivers 0.3) | 1.60 | 29 MiB |"
        );
        assert!(!t.contains('?'), "{t}");
    }

    #[test]
    fn a_baseline_gets_its_own_row_and_ratio() {
        let t = table(&[json!({
            "scenario": "cdc_throughput", "run": 1, "baseline_binary": "/tmp/caudal-old",
            "changes": 1000, "caudal_changes_per_s": 2000.0, "caudal_peak_rss_mib": 50.0,
            "baseline_changes_per_s": 1000.0, "baseline_peak_rss_mib": 60.0,
            "caudal_over_baseline": 2.0,
        })]);
        assert!(
            t.starts_with("Baseline build (`--baseline-caudal`): `/tmp/caudal-old`."),
            "{t}"
        );
        assert!(
            t.lines().any(|l| l
                == "| cdc-throughput | changes/s, 1,000 changes PostgreSQL → HTTP | 2,000 | baseline build: 1,000 (60 MiB) | 2.00 | 50 MiB |"),
            "{t}"
        );
    }
}
