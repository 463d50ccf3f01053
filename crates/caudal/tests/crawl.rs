//! The crawler end to end: the real `caudal` binary crawls the testkit's
//! fixture site (a real HTTP server on loopback that logs every request),
//! delivers records to a real HTTP receiver or a workflow's items, with
//! its frontier in SQLite or PostgreSQL. Politeness is proved by the
//! site's access log; extraction by comparing records with the pages the
//! site generated; resumability by killing caudal with SIGKILL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use caudal_store::Store;
use caudal_testkit::site::{LATIN1_TITLE, UPDATED_SUFFIX};
use caudal_testkit::{Access, Receiver, Site, SiteOptions, TestDb, detail, pg_database};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_caudal");
/// Generous: the machine may be busy building or testing.
const PATIENCE: Duration = Duration::from_secs(300);
/// The User-Agent the tests configure.
const AGENT: &str = "caudal-test/1.0 (+https://example.invalid/bot)";
/// Where records sit in the receiver's bodies.
const EVENTS: &str = "";

/// One test's directory, state store, site and receiver.
struct Crawl {
    dir: tempfile::TempDir,
    state_url: String,
    pg: Option<TestDb>,
    site: Site,
    receiver: Receiver,
    /// Extra lines for the crawl source's table.
    source_extra: String,
}

impl Crawl {
    async fn sqlite(options: SiteOptions) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state_url = format!("sqlite://{}/caudal.db", dir.path().display());
        Self {
            dir,
            state_url,
            pg: None,
            site: Site::start(options).await,
            receiver: Receiver::start().await,
            source_extra: String::new(),
        }
    }

    async fn postgres(options: SiteOptions) -> Self {
        let db = pg_database().await;
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            state_url: db.url().to_string(),
            pg: Some(db),
            site: Site::start(options).await,
            receiver: Receiver::start().await,
            source_extra: String::new(),
        }
    }

    async fn cleanup(self) {
        if let Some(db) = self.pg {
            db.cleanup().await;
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("caudal.toml")
    }

    /// Writes the configuration: state, the site's manners, a crawl source
    /// `site` starting at `start`, a sink to the receiver and a pipeline
    /// `crawl`, then `extra`.
    fn write(&self, manners: &str, start: &[&str], extra: &str) {
        let host = self.site.host();
        let starts: Vec<String> = start
            .iter()
            .map(|p| format!("{:?}", self.site.url(p)))
            .collect();
        let text = format!(
            r#"[state]
url = "{state}"
runs_dir = "runs"

[crawl]
user_agent = "{AGENT}"
max_body = "1MiB"
timeout = "3s"
retry = {{ max_attempts = 3, initial = "100ms", max = "1s" }}

[crawl.sites."{host}"]
{manners}

[sources.site]
type = "crawl"
start_urls = [{starts}]
follow = ["a.next", "a.detail"]
{source_extra}

[[sources.site.pages]]
name = "detail"
match = "/property/\\d+$"
fields.title = "h1.title"
fields.price = "span.price"
fields.image = {{ css = "img.main", attr = "src" }}
fields.features = {{ css = ".features li", all = true }}

[[sources.site.pages]]
name = "special"
match = "/(malformed|latin1|latin1-meta|garbage)$"
fields.title = "h1.title"

[sinks.out]
type = "http"
url = "{receiver}"
body = '{{{{ events | tojson }}}}'
batch = {{ max_records = 50, max_wait = "100ms" }}

[pipelines.crawl]
source = "site"
sink = "out"
schedule = {{ every = "1h" }}

{extra}"#,
            state = self.state_url,
            starts = starts.join(", "),
            receiver = self.receiver.url("/pages"),
            source_extra = self.source_extra,
        );
        std::fs::write(self.config(), text).expect("write the configuration");
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(BIN);
        c.arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("CAUDAL_API")
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        c
    }

    /// Runs `caudal ARGS` to its end: (exit code, stdout, stderr).
    async fn caudal(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(PATIENCE, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("caudal {args:?} did not end"))
            .expect("caudal runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn once(&self) {
        let (code, out, err) = self.caudal(&["once", "crawl"]).await;
        assert_eq!(code, 0, "caudal once: {out}{err}");
    }

    /// Every record the receiver accepted, by page URL (the last seen),
    /// and every idempotency key with the URL it named.
    fn delivered(&self) -> (BTreeMap<String, Value>, HashMap<String, String>) {
        let mut records = BTreeMap::new();
        let mut keys = HashMap::new();
        for event in self.receiver.accepted_records_at(EVENTS) {
            let id = event["id"].as_str().expect("an event id").to_string();
            let data = event["data"].clone();
            let url = data["url"].as_str().expect("a url").to_string();
            if let Some(before) = keys.insert(id.clone(), url.clone()) {
                assert_eq!(before, url, "key {id} named two pages");
            }
            records.insert(url, data);
        }
        (records, keys)
    }

    async fn store(&self) -> Store {
        Store::open(&self.state_url).await.expect("the state store")
    }

    /// The frontier's pages by URL: (state, error).
    async fn pages(&self, frontier: &str) -> BTreeMap<String, (String, Option<String>)> {
        let store = self.store().await;
        let rows = store
            .frontier_pages(frontier, None, 100_000)
            .await
            .expect("frontier pages");
        rows.into_iter()
            .map(|p| (p.url, (p.state, p.error)))
            .collect()
    }
}

/// Asserts that no request but robots.txt's reached the site less than
/// `wait` after `since` (server-side jitter of 10 ms allowed).
fn none_sooner_than(log: &[Access], since: std::time::Instant, wait: Duration) {
    for a in log
        .iter()
        .filter(|a| a.path != "/robots.txt" && a.started > since)
    {
        let waited = a.started - since;
        assert!(
            waited + Duration::from_millis(10) >= wait,
            "{} after {waited:?}",
            a.path
        );
    }
}

/// The smallest gap between two request starts, robots.txt excluded.
fn min_gap(log: &[Access]) -> Option<Duration> {
    let mut starts: Vec<_> = log
        .iter()
        .filter(|a| a.path != "/robots.txt")
        .map(|a| a.started)
        .collect();
    starts.sort();
    starts.windows(2).map(|w| w[1] - w[0]).min()
}

const ROBOTS: &str = "User-agent: *\nDisallow: /private/\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crawl_extracts_exact_records_and_obeys_every_limit() {
    let c = Crawl::sqlite(SiteOptions {
        listings: 3,
        per_listing: 5,
        robots: Some(ROBOTS.into()),
        ..SiteOptions::default()
    })
    .await;
    c.write(
        "concurrency = 2\ndelay = \"200ms\"\nadaptive = false",
        &[
            "/listings/1",
            "/malformed",
            "/latin1",
            "/latin1-meta",
            "/garbage",
            "/huge",
            "/file.pdf",
            "/loop/a",
            "/redirect/4",
            "/redirect-private",
            "/private/secret-page",
            "/no-such-page",
        ],
        "",
    );
    c.once().await;
    let (records, _) = c.delivered();
    let host = c.site.origin();
    // Every detail page, exactly as the site generated it.
    for id in 1..=15 {
        let want = detail(id);
        let url = format!("{host}/property/{id}");
        let got = records
            .get(&url)
            .unwrap_or_else(|| panic!("no record for {url}; have {:?}", records.keys()));
        assert_eq!(got["title"], want.title, "{url}");
        assert_eq!(got["price"], want.price, "{url}");
        assert_eq!(got["image"], format!("{host}{}", want.image), "{url}");
        assert_eq!(got["features"], serde_json::json!(want.features), "{url}");
        assert_eq!(got["kind"], "detail");
        assert_eq!(got["status"], 200);
        assert!(got["fetched_at"].as_str().is_some_and(|t| t.contains('T')));
    }
    assert_eq!(
        records[&format!("{host}/malformed")]["title"],
        "Mal formado"
    );
    assert_eq!(records[&format!("{host}/latin1")]["title"], LATIN1_TITLE);
    assert_eq!(
        records[&format!("{host}/latin1-meta")]["title"],
        LATIN1_TITLE
    );
    assert_eq!(records[&format!("{host}/garbage")]["title"], Value::Null);
    // Details plus the four special pages; nothing else made a record.
    assert_eq!(records.len(), 15 + 4, "{:?}", records.keys());

    let pages = c.pages("pipeline:crawl").await;
    let state = |path: &str| {
        pages
            .get(&format!("{host}{path}"))
            .cloned()
            .unwrap_or_else(|| panic!("{path} is not in the frontier"))
    };
    let failed = |path: &str, why: &str| {
        let (s, e) = state(path);
        assert_eq!(s, "failed", "{path}: {e:?}");
        assert!(
            e.as_deref().is_some_and(|e| e.contains(why)),
            "{path}: {e:?}"
        );
    };
    failed("/huge", "max_body");
    failed("/loop/a", "redirect loop");
    failed("/no-such-page", "404");
    let skipped = |path: &str, why: &str| {
        let (s, e) = state(path);
        assert_eq!(s, "skipped", "{path}: {e:?}");
        assert!(
            e.as_deref().is_some_and(|e| e.contains(why)),
            "{path}: {e:?}"
        );
    };
    skipped("/file.pdf", "not HTML (application/pdf)");
    skipped("/private/secret-page", "robots.txt");
    skipped("/redirect-private", "robots.txt");
    // The redirect's target is fetched once, as itself or through it.
    let (s4, e4) = state("/redirect/4");
    assert!(
        s4 == "done"
            || (s4 == "skipped" && e4.as_deref().is_some_and(|e| e.contains("redirects to"))),
        "{s4} {e4:?}"
    );
    assert!(
        pages
            .values()
            .all(|(s, _)| s != "queued" && s != "fetching"),
        "{pages:?}"
    );

    // The access log: our agent on every request, robots.txt asked once,
    // no disallowed path, at most 2 in flight, starts 200ms apart.
    let log = c.site.log();
    assert!(log.iter().all(|a| a.user_agent.as_deref() == Some(AGENT)));
    assert_eq!(c.site.hits("/robots.txt"), 1);
    assert!(
        log.iter().all(|a| !a.path.starts_with("/private/")),
        "a disallowed page was requested"
    );
    assert!(c.site.max_in_flight() <= 2, "{}", c.site.max_in_flight());
    // The site logs a request when its handler starts, which on a busy
    // machine can lag the send by some milliseconds: a gap may look that
    // much shorter, but the spacing never adds up to less than the delay.
    let gap = min_gap(&log).expect("requests");
    assert!(
        gap >= Duration::from_millis(180),
        "two requests {gap:?} apart"
    );
    let mut starts: Vec<_> = log
        .iter()
        .filter(|a| a.path != "/robots.txt")
        .map(|a| a.started)
        .collect();
    starts.sort();
    let span = starts[starts.len() - 1] - starts[0];
    let intervals = u32::try_from(starts.len() - 1).expect("a count");
    assert!(
        span + Duration::from_millis(20) >= Duration::from_millis(200) * intervals,
        "{} requests in {span:?}",
        starts.len()
    );
    // Duplicate and fragment links were fetched once.
    for id in 1..=15 {
        assert_eq!(c.site.hits(&format!("/property/{id}")), 1, "/property/{id}");
    }
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_and_crawl_delay_are_honoured() {
    let c = Crawl::sqlite(SiteOptions {
        listings: 1,
        per_listing: 4,
        robots: Some("User-agent: *\nCrawl-delay: 0.3\n".into()),
        ..SiteOptions::default()
    })
    .await;
    c.write(
        "concurrency = 4\ndelay = \"0s\"\nadaptive = true",
        &["/listings/1"],
        "",
    );
    // The first page request is told to come back in 2 seconds.
    c.site.fail_next(1, 429, Some(2));
    c.once().await;
    let log = c.site.log();
    let throttled = log
        .iter()
        .find(|a| a.status == 429)
        .expect("a 429 was answered");
    assert!(
        log.iter()
            .any(|a| a.started > throttled.started && a.path != "/robots.txt")
    );
    none_sooner_than(&log, throttled.started, Duration::from_secs(2));
    // Crawl-delay 0.3s raised the configured 0s.
    let gap = min_gap(&log).expect("requests");
    assert!(
        gap >= Duration::from_millis(295),
        "two requests {gap:?} apart"
    );
    let (records, _) = c.delivered();
    assert_eq!(records.len(), 4);
    c.cleanup().await;
}

/// SIGKILL during a 5,000-page crawl, again and again; then a last run to
/// the end. Every detail page's record arrives, keys never change meaning,
/// the crawl finishes, and pages fetched more than once are only those
/// in flight (or not yet saved) at a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_5000_page_crawl_resumes_where_it_was() {
    const KILLS: usize = 8;
    let c = Crawl::sqlite(SiteOptions {
        listings: 100,
        per_listing: 49,
        detail_bytes: 2_000,
        ..SiteOptions::default()
    })
    .await;
    // At most 8 in flight and 500 requests a second: what a kill can catch
    // unsaved is bounded.
    c.write(
        "concurrency = 8\ndelay = \"2ms\"\nadaptive = false\nrobots = false",
        &["/listings/1"],
        "",
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.subsec_nanos());
    let mut rng = u64::from(seed) | 1;
    let mut next = |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    };
    for kill_no in 0..KILLS {
        let before = c.site.requests();
        let mut child = c
            .command(&["once", "crawl"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("caudal once starts");
        // Wait until it is crawling, then a random moment more.
        let started = tokio::time::Instant::now();
        while c.site.requests() < before + 20 && started.elapsed() < PATIENCE {
            if child.try_wait().expect("status").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(next(700))).await;
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = child.wait().await;
        assert!(
            c.site.requests() > before,
            "kill {kill_no}: caudal made no request (seed {seed})"
        );
    }
    c.once().await;
    let (records, keys) = c.delivered();
    let host = c.site.origin();
    for id in 1..=4900 {
        let url = format!("{host}/property/{id}");
        let r = records
            .get(&url)
            .unwrap_or_else(|| panic!("{url} was never delivered (seed {seed})"));
        assert_eq!(r["title"], detail(id).title);
    }
    assert_eq!(records.len(), 4900);
    // One key per page (the page's URL in its generation).
    let urls: BTreeSet<&String> = keys.values().collect();
    assert_eq!(keys.len(), urls.len(), "a page travelled under two keys");
    let pages = c.pages("pipeline:crawl").await;
    assert_eq!(pages.len(), 5000);
    assert!(pages.values().all(|(s, _)| s == "done"), "seed {seed}");
    let store = c.store().await;
    let frontier = store
        .frontiers(Some("pipeline:crawl"))
        .await
        .expect("frontiers");
    assert_eq!(frontier[0].state, "finished");
    assert_eq!(frontier[0].generation, 1);
    // Fetched again: only what a kill caught in flight or unsaved.
    let mut hits: HashMap<String, usize> = HashMap::new();
    for a in c.site.log() {
        if a.path != "/robots.txt" {
            *hits.entry(a.path.clone()).or_default() += 1;
        }
    }
    assert_eq!(hits.len(), 5000, "pages fetched (seed {seed})");
    let again: usize = hits.values().map(|n| n - 1).sum();
    let most = hits.values().max().copied().unwrap_or(0);
    assert!(
        most <= KILLS + 1,
        "a page was fetched {most} times (seed {seed})"
    );
    assert!(
        again <= KILLS * 200,
        "{again} pages fetched again after {KILLS} kills (seed {seed})"
    );
    eprintln!("{again} pages fetched again after {KILLS} kills");
    c.cleanup().await;
}

async fn recrawl_asks_only_for_what_changed(c: Crawl) {
    c.write(
        "concurrency = 4\ndelay = \"0s\"\nadaptive = false",
        &["/listings/1"],
        "",
    );
    c.once().await;
    let (first, _) = c.delivered();
    assert_eq!(first.len(), 10);
    c.site.touch(3);
    c.site.touch(7);
    c.receiver.clear();
    c.site.reset_log();
    c.once().await;
    let (second, _) = c.delivered();
    let host = c.site.origin();
    let changed: BTreeSet<&String> = second.keys().collect();
    assert_eq!(
        changed,
        BTreeSet::from([&format!("{host}/property/3"), &format!("{host}/property/7")]),
    );
    assert!(
        second[&format!("{host}/property/3")]["title"]
            .as_str()
            .is_some_and(|t| t.ends_with(UPDATED_SUFFIX))
    );
    // Every detail page was asked with its ETag.
    for a in c.site.log() {
        if a.path.starts_with("/property/") {
            assert!(
                a.if_none_match.is_some(),
                "{} asked unconditionally",
                a.path
            );
        }
    }
    let pages = c.pages("pipeline:crawl").await;
    let unchanged = pages.values().filter(|(s, _)| s == "unchanged").count();
    assert_eq!(unchanged, 8);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recrawl_asks_only_for_what_changed_sqlite() {
    let options = SiteOptions {
        listings: 2,
        per_listing: 5,
        ..SiteOptions::default()
    };
    recrawl_asks_only_for_what_changed(Crawl::sqlite(options).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recrawl_asks_only_for_what_changed_postgres() {
    let options = SiteOptions {
        listings: 2,
        per_listing: 5,
        ..SiteOptions::default()
    };
    recrawl_asks_only_for_what_changed(Crawl::postgres(options).await).await;
}

/// A workflow: a legacy command lists URLs, a crawl task fetches them and
/// yields its records as items, and legacy scrapers naming the site share
/// its limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflow_crawl_tasks_and_legacy_commands_share_the_site() {
    let c = Crawl::sqlite(SiteOptions {
        listings: 1,
        per_listing: 6,
        ..SiteOptions::default()
    })
    .await;
    let host = c.site.host().to_string();
    let origin = c.site.origin();
    let ledger = c.dir.path().join("ledger");
    c.write(
        "concurrency = 1\ndelay = \"300ms\"\nadaptive = false\nrobots = false",
        &["/listings/1"],
        &format!(
            r#"[workflows.w.tasks.list]
type = "command"
run = ["sh", "-c", "for i in 2 4 6; do echo {origin}/property/$i >> \"$CAUDAL_ITEMS\"; done"]

[workflows.w.tasks.details]
type = "crawl"
source = "site"
urls_from = "{{{{ tasks.list.items }}}}"
depends_on = ["list"]

[workflows.w.tasks.legacy]
type = "command"
site = "{host}"
for_each = "{{{{ tasks.list.items }}}}"
run = ["sh", "-c", "echo start $(date +%s%N) >> {ledger}; sleep 0.2; echo end $(date +%s%N) >> {ledger}"]
depends_on = ["list"]
"#,
            ledger = ledger.display(),
        ),
    );
    let (code, out, err) = c.caudal(&["workflow", "run", "w", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = c.caudal(&["workflow", "tasks", "1", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let details = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .find(|t| t["task"] == "details")
        .expect("the details task");
    assert_eq!(details["state"], "succeeded", "{details}");
    assert_eq!(details["items"], 3, "{details}");
    let file = details["outputs"]["file"]
        .as_str()
        .expect("the records file");
    let text = std::fs::read_to_string(file).expect("the records file");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let mut titles: Vec<&str> = records.iter().filter_map(|i| i["title"].as_str()).collect();
    titles.sort_unstable();
    let mut want: Vec<String> = [2, 4, 6].iter().map(|id| detail(*id).title).collect();
    want.sort();
    assert_eq!(titles, want);
    assert_eq!(details["outputs"]["records"], 3);
    // The listing was not crawled: only the three URLs given.
    assert_eq!(c.site.hits("/listings/1"), 0);
    // Legacy commands and the crawl never overlapped at the site
    // (concurrency 1), and started 300ms apart.
    let text = std::fs::read_to_string(&ledger).expect("the ledger");
    let mut spans: Vec<(u128, u128)> = Vec::new();
    let mut open = None;
    for line in text.lines() {
        let (what, t) = line.split_once(' ').expect("a ledger line");
        let t: u128 = t.trim().parse().expect("nanoseconds");
        if what == "start" {
            assert!(open.is_none(), "two legacy commands overlapped: {text}");
            open = Some(t);
        } else if let Some(s) = open.take() {
            spans.push((s, t));
        }
    }
    assert_eq!(spans.len(), 3, "{text}");
    // Each command stamps its own start after the shell is up, a few
    // milliseconds after caudal let it start: allow that jitter.
    for w in spans.windows(2) {
        assert!(w[1].0 - w[0].0 >= 270_000_000, "{text}");
    }
    assert!(c.site.max_in_flight() <= 1);
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_selectors_and_patterns_are_located_config_errors() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("caudal.toml");
    std::fs::write(
        &path,
        r#"[sources.site]
type = "crawl"
start_urls = ["http://127.0.0.1:9/"]
follow = ["a[[href]"]
deny = ["(unclosed"]

[[sources.site.pages]]
name = "detail"
match = "*bad"
fields.title = "h1 >"
"#,
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&path)
        .output()
        .expect("caudal validate runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in [
        "caudal.toml:4:11: sources.site.follow[0]: \"a[[href]\" is not a valid CSS selector",
        "caudal.toml:5:9: sources.site.deny[0]: \"(unclosed\" is not a valid regular expression",
        "caudal.toml:9:9: sources.site.pages[0].match: \"*bad\" is not a valid regular expression",
        "caudal.toml:10:16: sources.site.pages[0].fields.title: \"h1 >\" is not a valid CSS selector",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("4 errors"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sitemaps_and_indexes_feed_the_crawl_and_max_pages_ends_it() {
    let mut c = Crawl::sqlite(SiteOptions {
        listings: 3,
        per_listing: 4,
        ..SiteOptions::default()
    })
    .await;
    // The index lists a plain sitemap of listings and a gzip one of
    // details; no link is followed.
    c.source_extra = format!(
        "sitemaps = [{:?}]\nmax_depth = 0",
        c.site.url("/sitemap.xml")
    );
    c.write("concurrency = 4\ndelay = \"0s\"\nadaptive = false", &[], "");
    c.once().await;
    let (records, _) = c.delivered();
    assert_eq!(records.len(), 12, "{:?}", records.keys());
    for id in 1..=12 {
        assert_eq!(c.site.hits(&format!("/property/{id}")), 1);
    }
    assert_eq!(c.site.hits("/listings/3"), 1);
    assert_eq!(c.site.hits("/sitemap-details.xml.gz"), 1);

    // A crawl limited to 5 pages fetches 5 and ends.
    let mut c = Crawl::sqlite(SiteOptions {
        listings: 3,
        per_listing: 4,
        ..SiteOptions::default()
    })
    .await;
    c.source_extra = "max_pages = 5".into();
    c.write(
        "concurrency = 4\ndelay = \"0s\"\nadaptive = false\nrobots = false",
        &["/listings/1"],
        "",
    );
    c.once().await;
    assert_eq!(c.site.requests(), 5);
    let store = c.store().await;
    let f = store
        .frontiers(Some("pipeline:crawl"))
        .await
        .expect("frontiers");
    assert_eq!(f[0].state, "finished");
    let pages = c.pages("pipeline:crawl").await;
    assert!(pages.values().all(|(s, _)| s != "fetching"), "{pages:?}");
    // Resetting the checkpoint forgets the frontier: the next run crawls
    // from the start URLs again.
    let (code, out, err) = c.caudal(&["checkpoint", "reset", "crawl"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("crawl frontier forgotten"), "{out}");
    assert!(c.pages("pipeline:crawl").await.is_empty());
    c.site.reset_log();
    c.once().await;
    assert_eq!(c.site.requests(), 5);
    assert_eq!(c.site.hits("/listings/1"), 1);
}

/// A robots.txt that answers 503 stops the site's pages until it answers
/// again (a minute later, or its `Retry-After`): they wait and are fetched
/// then, none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_robots_txt_makes_pages_wait_not_skip() {
    let c = Crawl::sqlite(SiteOptions {
        listings: 1,
        per_listing: 3,
        robots: Some(ROBOTS.into()),
        ..SiteOptions::default()
    })
    .await;
    c.write(
        "concurrency = 2\ndelay = \"0s\"\nadaptive = false",
        &["/listings/1"],
        "",
    );
    c.site.fail_robots_next(1, 503, Some(2));
    c.once().await;
    let log = c.site.log();
    let failed = log
        .iter()
        .find(|a| a.path == "/robots.txt" && a.status == 503)
        .expect("robots.txt answered 503");
    assert_eq!(c.site.hits("/robots.txt"), 2, "asked again once");
    // No page went before robots.txt was read.
    assert!(
        log.iter()
            .filter(|a| a.path != "/robots.txt")
            .all(|a| a.started > failed.started)
    );
    none_sooner_than(&log, failed.started, Duration::from_secs(2));
    let (records, _) = c.delivered();
    assert_eq!(records.len(), 3);
    let pages = c.pages("pipeline:crawl").await;
    assert!(pages.values().all(|(s, _)| s == "done"), "{pages:?}");
    c.cleanup().await;
}
