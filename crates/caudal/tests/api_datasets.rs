//! The datasets' query API of a real `caudal run` over loopback, after a
//! CLI backfill of the seed-003 report into a local Parquet dataset: the
//! list and partition routes, rows filtered, projected and paged (JSON and
//! CSV) against PostgreSQL's own report, roles, bad parameters, and the
//! result cache (in process and in Redis): hits, and results dropped when a
//! partition they read is rewritten, kept when another date is.
//!
//! Each test has its own database, directory, port and dataset, so they run
//! in parallel.

#[path = "support/datasets.rs"]
mod datasets_support;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use datasets_support::{DATASET, PIPELINE, ReportRow, Reports, rfc3339_micros};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Daemon, PATIENCE, spawn_daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One answer of the API.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    json: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn cache(&self) -> &str {
        self.header("x-cache").unwrap_or("(no X-Cache)")
    }
}

/// A report world served by `caudal run`: 4000 sales over 2025-05-01..06,
/// 5 providers, backfilled with the CLI before the daemon starts.
struct Served {
    w: Reports,
    port: u16,
    daemon: Option<Daemon>,
    viewer: String,
    http: reqwest::Client,
}

impl Served {
    /// `cache` is appended to the config (a `[cache]` table, or nothing).
    async fn start(dataset: &str, cache: &str) -> Self {
        let mut w = Reports::new().await;
        w.generate(4000, "2025-05-01", 6, 5).await;
        w.dataset = dataset.to_string();
        w.sink = format!(
            "url = \"data/{dataset}\"\nformat = \"parquet\"\n\
             partition_by = [\"provider_id\", \"date\"]\n"
        );
        // The daemon writes the last complete day when it starts (no sales
        // then); not every day since May 2025.
        w.schedule_extra = ", catch_up = false".into();
        let port = free_port();
        w.extra = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nrequests_per_second = 10000\n\n{cache}"
        );
        w.backfill("2025-05-01", "2025-05-06").await;
        let viewer = token(&w, "dash", "viewer").await;
        let mut served = Self {
            w,
            port,
            daemon: None,
            viewer,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
        };
        served.start_daemon(1).await;
        served
    }

    /// Starts `caudal run` and waits until it serves the API and its first
    /// report run (of an empty day) is recorded.
    async fn start_daemon(&mut self, n: u32) {
        let daemon = spawn_daemon(&self.w.write_config(), self.w.dir.path(), n);
        let store = self.w.store().await;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let dates = store
                .dataset_dates(&self.w.dataset)
                .await
                .expect("dataset dates");
            if dates.iter().any(|d| d.logical_date.as_str() > "2025-05-06") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon's first report run never ended: {dates:?}\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.daemon = Some(daemon);
        let a = self.get("/api/v1/datasets", None, None).await;
        assert_eq!(a.status, 401, "{a:?}");
    }

    async fn stop_daemon(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            let (status, log) = daemon.stop(Signal::SIGTERM).await;
            assert!(status.success(), "{log}");
        }
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// GET `path` with `token` and an optional `Accept`, waiting for the
    /// server to listen.
    async fn get(&self, path: &str, token: Option<&str>, accept: Option<&str>) -> Answer {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut request = self.http.get(&url);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            if let Some(a) = accept {
                request = request.header("accept", a);
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r.headers().clone();
                    let text = r.text().await.unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Answer {
                        status,
                        headers,
                        text,
                        json,
                    };
                }
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{url}: {e}\n{}",
                        self.log()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// GET a rows query of the dataset as the viewer; it must answer 200.
    async fn rows(&self, query: &str) -> Answer {
        let path = format!("/api/v1/datasets/{}/rows?{query}", self.w.dataset);
        let a = self.get(&path, Some(&self.viewer), None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        assert!(
            matches!(a.header("x-cache"), Some("hit" | "miss")),
            "{path}: X-Cache {:?}",
            a.header("x-cache")
        );
        a
    }

    /// The Prometheus text of `/metrics`, parsed.
    async fn metrics(&self) -> prometheus_parse::Scrape {
        let a = self.get("/metrics", None, None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        prometheus_parse::Scrape::parse(a.text.lines().map(|l| Ok(l.to_string())))
            .expect("valid Prometheus text")
    }

    /// The cache counters of this dataset: (hits, misses, invalidations).
    async fn cache_counters(&self) -> (f64, f64, f64) {
        let m = self.metrics().await;
        let d = [("dataset", self.w.dataset.as_str())];
        (
            sample(&m, "caudal_dataset_cache_hits_total", &d),
            sample(&m, "caudal_dataset_cache_misses_total", &d),
            sample(&m, "caudal_dataset_cache_invalidations_total", &d),
        )
    }

    async fn finish(mut self) {
        self.stop_daemon().await;
        self.w.cleanup().await;
    }
}

/// The value of the sample `name` whose labels include `labels`, summed
/// over the others; 0 when there is none (a counter not yet counted).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .sum()
}

async fn token(w: &Reports, name: &str, role: &str) -> String {
    let out = w
        .caudal(&["token", "create", "--name", name, "--role", role])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    out.stdout.trim().to_string()
}

/// The columns of a report row, in the order the API gives them: partition
/// columns first, then the file's.
const COLUMNS: [&str; 7] = [
    "provider_id",
    "date",
    "sales",
    "units",
    "revenue",
    "first_sale",
    "last_sale",
];

/// A row of the API's JSON as a report row (checking its shape).
fn api_row(row: &Value) -> ReportRow {
    let obj = row.as_object().expect("a row object");
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, COLUMNS, "{row}");
    let time = |k: &str| {
        let t = row[k].as_str().unwrap_or_else(|| panic!("{k}: {row}"));
        assert!(t.ends_with('Z'), "{k} is not RFC 3339 in UTC: {t}");
        rfc3339_micros(t)
    };
    ReportRow {
        provider_id: row["provider_id"]
            .as_i64()
            .expect("provider_id is a number"),
        date: row["date"].as_str().expect("a date").to_string(),
        sales: row["sales"].as_i64().expect("sales"),
        units: row["units"].as_i64().expect("units"),
        revenue: row["revenue"]
            .as_str()
            .expect("revenue is a decimal string")
            .to_string(),
        first_sale: time("first_sale"),
        last_sale: time("last_sale"),
    }
}

fn api_rows(a: &Answer) -> Vec<ReportRow> {
    a.json["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {}", a.text))
        .iter()
        .map(api_row)
        .collect()
}

/// A CSV field list (no quoting in these rows: numbers, dates, decimals,
/// timestamps).
fn csv_row(header: &[&str], line: &str) -> ReportRow {
    let fields: Vec<&str> = line.split(',').collect();
    assert_eq!(fields.len(), header.len(), "{line}");
    let get = |k: &str| fields[header.iter().position(|h| *h == k).expect("a column")];
    ReportRow {
        provider_id: get("provider_id").parse().expect("an id"),
        date: get("date").to_string(),
        sales: get("sales").parse().expect("sales"),
        units: get("units").parse().expect("units"),
        revenue: get("revenue").to_string(),
        first_sale: rfc3339_micros(get("first_sale")),
        last_sale: rfc3339_micros(get("last_sale")),
    }
}

/// The list and partition routes describe what the backfill wrote, as the
/// store and the manifests say; unknown datasets are 404; every route
/// needs a live token, and a viewer's is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_and_partitions_describe_what_was_written() {
    let s = Served::start(DATASET, "").await;
    let admin = token(&s.w, "root", "admin").await;
    let operator = token(&s.w, "oncall", "operator").await;
    let routes = [
        "/api/v1/datasets".to_string(),
        format!("/api/v1/datasets/{DATASET}/partitions"),
        format!("/api/v1/datasets/{DATASET}/rows?limit=1"),
    ];
    for route in &routes {
        let a = s.get(route, None, None).await;
        assert_eq!(a.status, 401, "{route} without a token: {}", a.text);
        let a = s.get(route, Some("cdl_not_a_token"), None).await;
        assert_eq!(a.status, 401, "{route} with a bad token: {}", a.text);
        for t in [&s.viewer, &operator, &admin] {
            let a = s.get(route, Some(t), None).await;
            assert_eq!(a.status, 200, "{route}: {}", a.text);
        }
    }
    for route in ["partitions", "rows"] {
        let a = s
            .get(
                &format!("/api/v1/datasets/nope/{route}"),
                Some(&s.viewer),
                None,
            )
            .await;
        assert_eq!(a.status, 404, "{route}: {}", a.text);
    }

    let ds = s.w.read_local().await;
    let manifests = ds.manifests();
    let bytes: u64 = manifests.values().map(|m| m.bytes).sum();
    let store = s.w.store().await;
    let dates = store.dataset_dates(DATASET).await.expect("dates");

    let a = s.get("/api/v1/datasets", Some(&s.viewer), None).await;
    let list = a.json["datasets"].as_array().expect("datasets");
    assert_eq!(list.len(), 1, "{}", a.text);
    let d = &list[0];
    assert_eq!(d["name"], DATASET);
    assert_eq!(d["format"], "parquet");
    assert_eq!(d["location"], format!("data/{DATASET}"));
    assert_eq!(
        d["partition_by"],
        serde_json::json!(["provider_id", "date"])
    );
    assert_eq!(d["pipeline"], PIPELINE);
    assert_eq!(d["partitions"], 30, "{d}");
    assert_eq!(d["rows"], 30, "{d}");
    assert_eq!(d["bytes"], bytes, "{d}");
    assert_eq!(d["dates"], dates.len(), "{d}");
    assert_eq!(d["first_date"], "2025-05-01", "{d}");
    assert_eq!(
        d["last_date"].as_str(),
        dates.last().map(|x| x.logical_date.as_str())
    );
    let committed = d["committed_at"].as_str().expect("committed_at");
    assert!(committed.parse::<jiff::Timestamp>().is_ok(), "{committed}");

    let a = s
        .get(
            &format!("/api/v1/datasets/{DATASET}/partitions"),
            Some(&s.viewer),
            None,
        )
        .await;
    assert_eq!(a.json["dataset"], DATASET);
    let parts = a.json["partitions"].as_array().expect("partitions");
    assert_eq!(
        parts
            .iter()
            .map(|p| p["path"].as_str().expect("a path").to_string())
            .collect::<BTreeSet<_>>(),
        manifests.keys().cloned().collect::<BTreeSet<_>>()
    );
    for p in parts {
        let path = p["path"].as_str().expect("a path");
        let m = &manifests[path];
        let date = &m.values[1].1;
        assert_eq!(p["values"]["provider_id"], m.values[0].1, "{p}");
        assert_eq!(p["values"]["date"], *date, "{p}");
        assert_eq!(p["generation"], 1, "{p}");
        assert_eq!(p["rows"], m.rows, "{p}");
        assert_eq!(p["bytes"], m.bytes, "{p}");
        assert_eq!(p["files"], m.files.len(), "{p}");
        assert_eq!(p["first_date"], *date, "{p}");
        assert_eq!(p["last_date"], *date, "{p}");
        let at = p["committed_at"].as_str().expect("committed_at");
        assert!(at.parse::<jiff::Timestamp>().is_ok(), "{at}");
    }
    s.finish().await;
}

/// Rows answer what PostgreSQL reports: by provider and date range, the
/// whole dataset page by page (each row once), projected, filtered on a
/// data column (files pruned by their statistics), and as CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_answer_what_postgres_reports() {
    let s = Served::start(DATASET, "").await;
    let all = s.w.report("2025-05-01", "2025-05-06").await;
    assert_eq!(all.len(), 30);

    // One provider, three days.
    let a = s
        .rows("provider_id=3&date_from=2025-05-02&date_to=2025-05-04")
        .await;
    assert_eq!(a.json["dataset"], DATASET);
    assert_eq!(a.json["next_cursor"], Value::Null, "{}", a.text);
    let want: Vec<ReportRow> = all
        .iter()
        .filter(|r| r.provider_id == 3 && ("2025-05-02".."2025-05-05").contains(&r.date.as_str()))
        .cloned()
        .collect();
    assert_eq!(want.len(), 3);
    assert_eq!(api_rows(&a), want);

    // Every row, 7 at a time: each exactly once.
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=7&cursor={c}"),
            None => "limit=7".into(),
        };
        let a = s.rows(&q).await;
        let rows = api_rows(&a);
        assert!(rows.len() <= 7, "{}", a.text);
        got.extend(rows);
        pages += 1;
        assert!(pages <= 10, "paging does not end: {}", a.text);
        match a.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "a row came twice: {got:?}");
    assert_eq!(sorted, all);

    // Projection.
    let a = s
        .rows("date=2025-05-03&columns=provider_id,date,revenue")
        .await;
    let rows = a.json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 5);
    for row in rows {
        let keys: Vec<&str> = row
            .as_object()
            .expect("a row")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["provider_id", "date", "revenue"], "{row}");
        let want = all
            .iter()
            .find(|r| r.date == "2025-05-03" && Some(r.provider_id) == row["provider_id"].as_i64())
            .expect("a report row");
        assert_eq!(row["revenue"], want.revenue, "{row}");
    }
    let a = s.rows("columns=revenue&provider_id=1").await;
    for row in a.json["rows"].as_array().expect("rows") {
        assert_eq!(
            row.as_object().expect("a row").keys().collect::<Vec<_>>(),
            ["revenue"],
            "{row}"
        );
    }

    // Filters on data columns: a range on a decimal, equality on a count.
    let value = |r: &ReportRow| r.revenue.parse::<f64>().expect("a decimal");
    let mut by_revenue = all.clone();
    by_revenue.sort_by(|a, b| value(a).total_cmp(&value(b)));
    let median = &by_revenue[15];
    let a = s.rows(&format!("revenue_from={}", median.revenue)).await;
    let want: Vec<ReportRow> = all
        .iter()
        .filter(|r| value(r) >= value(median))
        .cloned()
        .collect();
    assert_eq!(api_rows(&a), want, "revenue_from={}", median.revenue);
    let some = &all[7];
    let a = s
        .rows(&format!(
            "sales={}&provider_id={}",
            some.sales, some.provider_id
        ))
        .await;
    let want: Vec<ReportRow> = all
        .iter()
        .filter(|r| r.sales == some.sales && r.provider_id == some.provider_id)
        .cloned()
        .collect();
    assert_eq!(api_rows(&a), want);

    // A filter no file's statistics can meet opens no file.
    let most = all.iter().map(|r| r.sales).max().expect("rows");
    let d = [("dataset", DATASET)];
    let before = s.metrics().await;
    let a = s.rows(&format!("sales_from={}", most + 1)).await;
    assert_eq!(api_rows(&a), []);
    let after = s.metrics().await;
    let read = |m: &prometheus_parse::Scrape| sample(m, "caudal_dataset_files_read_total", &d);
    let pruned = |m: &prometheus_parse::Scrape| sample(m, "caudal_dataset_files_pruned_total", &d);
    assert_eq!(read(&after), read(&before), "a file was opened");
    assert_eq!(pruned(&after) - pruned(&before), 30.0, "every file pruned");

    // CSV, 12 rows a page, the cursor in X-Next-Cursor.
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=12&cursor={c}"),
            None => "limit=12".into(),
        };
        let path = format!("/api/v1/datasets/{DATASET}/rows?{q}");
        let a = s.get(&path, Some(&s.viewer), Some("text/csv")).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(
            a.header("content-type")
                .is_some_and(|t| t.starts_with("text/csv")),
            "{:?}",
            a.headers
        );
        assert!(matches!(a.header("x-cache"), Some("hit" | "miss")));
        let mut lines = a.text.lines();
        let header: Vec<&str> = lines.next().expect("a header row").split(',').collect();
        assert_eq!(header, COLUMNS, "{}", a.text);
        let rows: Vec<ReportRow> = lines.map(|l| csv_row(&header, l)).collect();
        assert!(rows.len() <= 12);
        got.extend(rows);
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        match a.header("x-next-cursor") {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    got.sort();
    assert_eq!(got, all, "CSV pages");
    s.finish().await;
}

/// Bad parameters are 400 with the parameter named; an unknown dataset is
/// 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_naming_the_parameter() {
    let s = Served::start(DATASET, "").await;
    let cases = [
        ("nope=1", "nope"),
        ("columns=provider_id,nope", "columns"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=50001", "limit"),
        ("date_from=2025-13-01", "date_from"),
        ("date=yesterday", "date"),
        ("cursor=not-a-cursor", "cursor"),
        ("sales=abc", "sales"),
        ("revenue_from=12.3.4", "revenue_from"),
        ("first_sale_to=soon", "first_sale_to"),
        ("provider_id=1&provider_id=2", "provider_id"),
    ];
    let mut wrong = Vec::new();
    for (query, param) in cases {
        let path = format!("/api/v1/datasets/{DATASET}/rows?{query}");
        let a = s.get(&path, Some(&s.viewer), None).await;
        let message = a.json["error"]["message"].as_str().unwrap_or_default();
        if a.status != 400 || !message.contains(param) {
            wrong.push(format!("{query}: {} {}", a.status, a.text));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected 400 naming the parameter:\n{}",
        wrong.join("\n")
    );
    let a = s
        .get("/api/v1/datasets/nope/rows", Some(&s.viewer), None)
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    s.finish().await;
}

/// The in-process cache: a repeat is a hit; a rewrite of a partition the
/// query read (`caudal once --date`) makes the next identical query a miss
/// that counts an invalidation and serves the new values; a rewrite of a
/// date the query did not cover keeps its hit; a cursor from before the
/// rewrite is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_serves_repeats_and_forgets_rewritten_partitions() {
    let s = Served::start(DATASET, "").await;
    let touched = "provider_id=2&date_from=2025-05-02&date_to=2025-05-03";
    let untouched = "date_from=2025-05-05&date_to=2025-05-05";
    let report = |all: &[ReportRow], provider: Option<i64>, from: &str, to: &str| {
        all.iter()
            .filter(|r| provider.is_none_or(|p| r.provider_id == p))
            .filter(|r| r.date.as_str() >= from && r.date.as_str() <= to)
            .cloned()
            .collect::<Vec<_>>()
    };
    let all = s.w.report("2025-05-01", "2025-05-06").await;
    let (h0, m0, i0) = s.cache_counters().await;

    let a = s.rows(touched).await;
    assert_eq!(a.cache(), "miss");
    assert_eq!(
        api_rows(&a),
        report(&all, Some(2), "2025-05-02", "2025-05-03")
    );
    let again = s.rows(touched).await;
    assert_eq!(again.cache(), "hit");
    assert_eq!(again.text, a.text);
    let b = s.rows(untouched).await;
    assert_eq!(b.cache(), "miss");
    assert_eq!(api_rows(&b), report(&all, None, "2025-05-05", "2025-05-05"));
    assert_eq!(s.rows(untouched).await.cache(), "hit");
    assert_eq!(s.cache_counters().await, (h0 + 2.0, m0 + 2.0, i0));
    let m = s.metrics().await;
    assert!(sample(&m, "caudal_dataset_cache_entries", &[]) >= 2.0);
    assert!(sample(&m, "caudal_dataset_cache_bytes", &[]) > 0.0);
    for cache in ["hit", "miss"] {
        assert!(
            m.samples
                .iter()
                .any(|x| x.metric.starts_with("caudal_dataset_query_seconds")
                    && x.labels.get("dataset") == Some(DATASET)
                    && x.labels.get("cache") == Some(cache)),
            "no caudal_dataset_query_seconds for cache={cache}"
        );
    }
    // A page of the touched query, to resume after the rewrite.
    let first = s.rows(&format!("{touched}&limit=1")).await;
    let cursor = first.json["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_string();
    let (h1, m1, i1) = s.cache_counters().await;

    // Provider 2's sales of 2025-05-02 change; the day is written again.
    s.w.exec(
        "update seed003.sales set amount = amount + 10 where provider_id = 2 \
         and sold_at >= '2025-05-02' and sold_at < '2025-05-03'",
    )
    .await;
    s.w.once("2025-05-02").await;
    let all = s.w.report("2025-05-01", "2025-05-06").await;
    let changed = report(&all, Some(2), "2025-05-02", "2025-05-03");
    assert_ne!(api_rows(&a), changed, "the update changed the report");

    let a = s.rows(touched).await;
    assert_eq!(
        a.cache(),
        "miss",
        "a rewritten partition was read from the cache"
    );
    assert_eq!(api_rows(&a), changed, "the new values are served");
    assert_eq!(s.cache_counters().await, (h1, m1 + 1.0, i1 + 1.0));
    assert_eq!(s.rows(touched).await.cache(), "hit");
    assert_eq!(
        s.rows(untouched).await.cache(),
        "hit",
        "a rewrite of another date dropped the result"
    );
    assert_eq!(s.cache_counters().await, (h1 + 2.0, m1 + 1.0, i1 + 1.0));

    let path = format!("/api/v1/datasets/{DATASET}/rows?{touched}&limit=1&cursor={cursor}");
    let a = s.get(&path, Some(&s.viewer), None).await;
    assert_eq!(
        a.status, 409,
        "a cursor from before the rewrite: {}",
        a.text
    );
    assert!(
        a.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cursor")),
        "{}",
        a.text
    );
    s.finish().await;
}

/// `redis-cli -n DB args…`, which must succeed.
fn redis_cli(db: u32, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "-n", &db.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli (the Redis cache test needs it): {e}"));
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Redis database the Redis cache test uses.
const REDIS_DB: u32 = 11;

/// With `[cache] url = "redis://…"` results live in Redis: a second daemon
/// (an empty process) hits what the first cached, and a rewrite of a read
/// partition still makes the next query a miss with the new values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cache_is_shared_by_daemons_and_dropped_on_rewrite() {
    assert_eq!(
        redis_cli(REDIS_DB, &["ping"]).trim(),
        "PONG",
        "Redis must run on 127.0.0.1:6379"
    );
    // A dataset name of its own: cache keys of other runs of this test
    // (within their TTL) must not answer this one.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let dataset = format!("sales_{:x}_{nanos:x}", std::process::id());
    let cache = format!("[cache]\nurl = \"redis://127.0.0.1:6379/{REDIS_DB}\"\nttl = \"2m\"\n");
    let mut s = Served::start(&dataset, &cache).await;
    let keys = || {
        redis_cli(REDIS_DB, &["--scan", "--pattern", "caudal:dataset-cache:*"])
            .lines()
            .map(str::to_string)
            .collect::<BTreeSet<String>>()
    };
    let before = keys();
    let q = "provider_id=4&date_from=2025-05-01&date_to=2025-05-03";
    let all = s.w.report("2025-05-01", "2025-05-06").await;
    let want = |all: &[ReportRow]| {
        all.iter()
            .filter(|r| r.provider_id == 4 && r.date.as_str() <= "2025-05-03")
            .cloned()
            .collect::<Vec<_>>()
    };
    let a = s.rows(q).await;
    assert_eq!(a.cache(), "miss");
    assert_eq!(api_rows(&a), want(&all));
    assert_eq!(s.rows(q).await.cache(), "hit");
    let new_keys: Vec<String> = keys().difference(&before).cloned().collect();
    assert!(!new_keys.is_empty(), "nothing was cached in Redis");
    for k in &new_keys {
        let ttl: i64 = redis_cli(REDIS_DB, &["pttl", k])
            .trim()
            .parse()
            .expect("a TTL");
        assert!(ttl > 0 && ttl <= 120_000, "{k}: TTL {ttl} ms");
    }

    // Another process, empty: the result comes from Redis.
    s.stop_daemon().await;
    s.start_daemon(2).await;
    let b = s.rows(q).await;
    assert_eq!(
        b.cache(),
        "hit",
        "the second daemon did not find it in Redis"
    );
    assert_eq!(b.text, a.text);

    s.w.exec(
        "update seed003.sales set quantity = quantity + 1 where provider_id = 4 \
         and sold_at >= '2025-05-03' and sold_at < '2025-05-04'",
    )
    .await;
    s.w.once("2025-05-03").await;
    let all = s.w.report("2025-05-01", "2025-05-06").await;
    let (_, _, invalidations) = s.cache_counters().await;
    let c = s.rows(q).await;
    assert_eq!(
        c.cache(),
        "miss",
        "a rewritten partition was read from Redis"
    );
    assert_eq!(api_rows(&c), want(&all));
    assert_ne!(c.text, a.text);
    assert_eq!(s.cache_counters().await.2, invalidations + 1.0);
    assert_eq!(s.rows(q).await.cache(), "hit");
    // The keys expire with their TTL; deleting them here could delete
    // those of another run of this test.
    s.finish().await;
}
