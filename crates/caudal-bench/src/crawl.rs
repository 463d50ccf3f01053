//! `crawl` and `crawl-limit`: caudal's crawler on the fixture site of
//! `caudal-site` (crates/caudal-testkit), a fresh site process for every
//! crawl so that its request count and access log are that crawl's alone.
//!
//! - `crawl`: 1,000 listing pages of 19 details each (20,000 pages, detail
//!   pages of about 30 KB; `--listings` changes the first number), crawled
//!   with no politeness (16 requests in flight, no delay, no adaptive
//!   throttle, no robots.txt) by `caudal workflow run crawl --wait` (one
//!   `crawl` task, SQLite state) and by Scrapy (`bench/scrapy/spider.py`,
//!   same settings, selectors and links), in alternating order from one
//!   repeat to the next. Both must produce one record per detail page, and
//!   the same fields for each. Rate: the site's requests over the crawler's
//!   wall time, process start to exit, per minute; peak RSS of the process.
//! - `crawl-limit`: 30 listing pages of 9 details (300 pages) with
//!   politeness on for the site (`concurrency = 4`, `delay = "50ms"`, no
//!   adaptive throttle: at most 20 request starts a second). From the site's
//!   access log: the achieved rate, `(requests − 1) / (last start − first
//!   start)` (n starts span n − 1 gaps), over the configured 20/s, which
//!   must not exceed 1 (by 0.5% or more: the starts are the site's arrival
//!   times, a little jitter off caudal's own); the smallest gap between two consecutive starts,
//!   and the most requests the site had in flight at once (at most 4).
//!
//! Both fail when a crawler produces the wrong number of records, and
//! `crawl` also when the two crawlers' records differ.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::cdc::scratch_dir;
use crate::process::{Ended, Measured};
use crate::{Args, round};

/// The `User-Agent` of both crawlers (bench/scrapy/spider.py sets the same).
const USER_AGENT: &str = "caudal-bench";
/// Requests in flight in `crawl`, for both crawlers.
const CONCURRENCY: u32 = 16;
/// `crawl`'s listing pages by default, and detail links on each.
const DEFAULT_LISTINGS: u32 = 1000;
const PER_LISTING: u32 = 19;
/// About how large each detail page is, in bytes.
const DETAIL_BYTES: u32 = 30_000;
/// `crawl-limit`'s listing pages by default, and detail links on each.
const LIMIT_DEFAULT_LISTINGS: u32 = 30;
const LIMIT_PER_LISTING: u32 = 9;
/// `crawl-limit`'s politeness for the site.
const LIMIT_CONCURRENCY: u32 = 4;
const LIMIT_DELAY_MS: f64 = 50.0;
/// The spider, relative to the workspace (bench/run's working directory).
const SPIDER: &str = "bench/scrapy/spider.py";

/// A `caudal-site` process. Dropping it before [`stop`](Self::stop) kills
/// it, so an aborted scenario leaves nothing running.
struct Site {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    origin: String,
}

/// What the site reports when it stops.
struct SiteReport {
    /// `{"requests", "max_in_flight", "by_status", "duplicates"}`.
    summary: Value,
    /// The access log, in start order.
    log: Vec<Access>,
}

/// One line of the site's access log.
struct Access {
    ua: Option<String>,
    started_ms: f64,
    finished_ms: f64,
}

impl Site {
    /// Starts `caudal-site --listings LISTINGS --per-listing PER_LISTING
    /// --detail-bytes …` writing its access log to `log` at exit.
    fn start(args: &Args, listings: u32, per_listing: u32, log: &Path) -> anyhow::Result<Self> {
        if !args.site.is_file() {
            bail!(
                "{} is missing: cargo build --release -p caudal-testkit",
                args.site.display()
            );
        }
        let mut child = Command::new(&args.site)
            .args(["--listings", &listings.to_string()])
            .args(["--per-listing", &per_listing.to_string()])
            .args(["--detail-bytes", &DETAIL_BYTES.to_string()])
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", args.site.display()))?;
        let stdout = child.stdout.take().context("the site's stdout")?;
        let mut site = Self {
            child: Some(child),
            origin: String::new(),
        };
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first)?;
        let origin = first.trim();
        if !origin.starts_with("http://127.0.0.1:") {
            bail!("caudal-site printed {first:?}, not its address");
        }
        site.origin = origin.to_string();
        Ok(site)
    }

    /// `127.0.0.1:PORT`, the site's key in `[crawl.sites]`.
    fn host(&self) -> &str {
        self.origin.trim_start_matches("http://")
    }

    /// Stops the site (SIGTERM) and reads its summary and access log.
    fn stop(mut self, log: &Path) -> anyhow::Result<SiteReport> {
        let child = self.child.take().context("the site was already stopped")?;
        kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM)
            .context("cannot signal caudal-site")?;
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("caudal-site failed ({}): {stderr}", out.status);
        }
        let summary: Value = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("caudal-site wrote no summary")
            .and_then(|l| serde_json::from_str(l).context("caudal-site's summary"))?;
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("cannot read the site's log {}", log.display()))?;
        let mut log = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).context("a line of the site's log")?;
                Ok(Access {
                    ua: v["ua"].as_str().map(str::to_owned),
                    started_ms: v["started_ms"].as_f64().context("started_ms")?,
                    finished_ms: v["finished_ms"].as_f64().context("finished_ms")?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        log.sort_by(|a, b| a.started_ms.total_cmp(&b.started_ms));
        Ok(SiteReport { summary, log })
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl SiteReport {
    fn requests(&self) -> u64 {
        self.summary["requests"].as_u64().unwrap_or(0)
    }

    /// Seconds from the first request's start to the last one's answer.
    fn span_secs(&self) -> f64 {
        let first = self.log.first().map_or(0.0, |a| a.started_ms);
        let last = self.log.iter().map(|a| a.finished_ms).fold(first, f64::max);
        (last - first) / 1000.0
    }

    /// Fails when a request did not carry the harness's `User-Agent`.
    fn check_user_agent(&self, who: &str) -> anyhow::Result<()> {
        if let Some(a) = self
            .log
            .iter()
            .find(|a| a.ua.as_deref() != Some(USER_AGENT))
        {
            bail!(
                "{who} sent the User-Agent {:?}, not {USER_AGENT:?}",
                a.ua.as_deref().unwrap_or("(none)")
            );
        }
        Ok(())
    }
}

/// One crawl's figures.
struct Crawled {
    ended: Ended,
    site: SiteReport,
    /// The extracted fields by URL.
    records: BTreeMap<String, Value>,
    /// Lines written, duplicates of a URL included.
    lines: usize,
}

impl Crawled {
    fn pages_per_min(&self) -> f64 {
        self.site.requests() as f64 / self.ended.secs * 60.0
    }

    /// `{PREFIX_secs, PREFIX_pages_per_min, …}`.
    fn figures(&self, prefix: &str) -> Value {
        let s = &self.site.summary;
        let span = self.site.span_secs();
        json!({
            format!("{prefix}_secs"): round(self.ended.secs),
            format!("{prefix}_pages_per_min"): round(self.pages_per_min()),
            format!("{prefix}_peak_rss_mib"): round(self.ended.peak_rss_mib),
            format!("{prefix}_records"): self.lines,
            format!("{prefix}_requests"): s["requests"],
            format!("{prefix}_duplicates"): s["duplicates"],
            format!("{prefix}_by_status"): s["by_status"],
            format!("{prefix}_max_in_flight"): s["max_in_flight"],
            format!("{prefix}_crawl_secs"): round(span),
            format!("{prefix}_crawl_pages_per_min"): round(self.site.requests() as f64 / span * 60.0),
        })
    }
}

/// The fields both crawlers extract, from one record, by its URL's path;
/// `origin` (each crawl has a site of its own, on its own port) is taken
/// off the URL and the image's, so that two crawls compare.
fn fields(record: &Value, origin: &str) -> anyhow::Result<(String, Value)> {
    let url = record["url"].as_str().context("a record without url")?;
    let url = url.split_once('#').map_or(url, |(u, _)| u);
    let image = match record["image"].as_str() {
        Some(image) => match image.strip_prefix(origin) {
            Some(path) => json!(format!("(origin){path}")),
            None => json!(image),
        },
        None => record["image"].clone(),
    };
    Ok((
        url.strip_prefix(origin).unwrap_or(url).to_string(),
        json!({
            "title": record["title"],
            "price": record["price"],
            "image": image,
            "features": record["features"],
        }),
    ))
}

/// JSON lines of records from the site at `origin`: their fields by URL
/// path, and how many lines.
fn read_records(path: &Path, origin: &str) -> anyhow::Result<(BTreeMap<String, Value>, usize)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the records {}", path.display()))?;
    let mut records = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line)
            .with_context(|| format!("a record of {}: {line}", path.display()))?;
        let (url, fields) = fields(&record, origin)?;
        records.insert(url, fields);
        lines += 1;
    }
    Ok((records, lines))
}

/// caudal's configuration for a crawl of `site` starting at its first
/// listing page; `politeness` is the `[crawl]` table's body.
fn caudal_config(dir: &Path, site: &Site, politeness: &str) -> anyhow::Result<PathBuf> {
    let config = dir.join("caudal.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{dir}/state.db"
runs_dir = "{dir}/runs"

[crawl]
user_agent = "{USER_AGENT}"
{politeness}
[sources.site]
type = "crawl"
start_urls = ["{origin}/listings/1"]
follow = ["a.next", "a.detail"]

[[sources.site.pages]]
name = "detail"
match = "/property/\\d+$"
fields.title = "h1.title"
fields.price = "span.price"
fields.image = {{ css = "img.main", attr = "src" }}
fields.features = {{ css = ".features li", all = true }}

[workflows.crawl.tasks.pages]
type = "crawl"
source = "site"
"#,
            dir = dir.display(),
            origin = site.origin,
        ),
    )?;
    Ok(config)
}

/// The records file of the crawl task: `<runs_dir>/crawl/<run id>/pages.jsonl`
/// of the one run.
fn caudal_records_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let runs = dir.join("runs").join("crawl");
    let mut files = Vec::new();
    for run in std::fs::read_dir(&runs).with_context(|| format!("no {}", runs.display()))? {
        let file = run?.path().join("pages.jsonl");
        if file.is_file() {
            files.push(file);
        }
    }
    match files.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("caudal wrote no records under {}", runs.display()),
        _ => bail!(
            "caudal wrote records of several runs under {}",
            runs.display()
        ),
    }
}

/// `caudal workflow run crawl --wait` on a fresh site: its figures. `dir`
/// is a fresh directory; `politeness` goes into `[crawl]`, with `{host}`
/// replaced by the site's host.
async fn crawl_caudal(
    args: &Args,
    dir: &Path,
    (listings, per_listing): (u32, u32),
    politeness: &str,
) -> anyhow::Result<Crawled> {
    let log = dir.join("site.jsonl");
    let site = Site::start(args, listings, per_listing, &log)?;
    let config = caudal_config(dir, &site, &politeness.replace("{host}", site.host()))?;
    let origin = site.origin.clone();
    let mut cmd = Command::new(&args.caudal);
    cmd.arg("--config")
        .arg(&config)
        .args(["workflow", "run", "crawl", "--wait"])
        .env("CAUDAL_LOG", "warn")
        .stdout(Stdio::null());
    let ended = Measured::spawn(cmd)?.wait().await?;
    let report = site.stop(&log)?;
    if !ended.status.success() {
        bail!(
            "caudal --config {} workflow run crawl --wait failed ({}); the site answered {}",
            config.display(),
            ended.status,
            report.summary
        );
    }
    report.check_user_agent("caudal")?;
    let (records, lines) = read_records(&caudal_records_file(dir)?, &origin)?;
    Ok(Crawled {
        ended,
        site: report,
        records,
        lines,
    })
}

/// Scrapy (bench/scrapy/spider.py) on a fresh site: its figures.
async fn crawl_scrapy(args: &Args, dir: &Path, listings: u32) -> anyhow::Result<Crawled> {
    let log = dir.join("site.jsonl");
    let out = dir.join("items.jsonl");
    let stderr = dir.join("scrapy.log");
    let site = Site::start(args, listings, PER_LISTING, &log)?;
    let origin = site.origin.clone();
    let mut cmd = Command::new(&args.python);
    cmd.arg(SPIDER)
        .arg(format!("{}/listings/1", site.origin))
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
    let ended = Measured::spawn(cmd)?.wait().await?;
    let report = site.stop(&log)?;
    if !ended.status.success() {
        bail!(
            "{} {SPIDER} failed ({}); its log: {} (bench/run installs Scrapy into target/bench-venv)",
            args.python.display(),
            ended.status,
            stderr.display()
        );
    }
    report.check_user_agent("Scrapy")?;
    let (records, lines) = read_records(&out, &origin)?;
    Ok(Crawled {
        ended,
        site: report,
        records,
        lines,
    })
}

/// Fails unless `crawled` produced one record per detail page.
fn check_records(who: &str, crawled: &Crawled, details: usize) -> anyhow::Result<()> {
    if crawled.lines != details || crawled.records.len() != details {
        bail!(
            "{who} produced {} records ({} distinct URLs), not {details}; the site answered {}",
            crawled.lines,
            crawled.records.len(),
            crawled.site.summary
        );
    }
    Ok(())
}

pub async fn throughput(args: &Args) -> anyhow::Result<Value> {
    let listings = args.listings.unwrap_or(DEFAULT_LISTINGS);
    let details = (listings * PER_LISTING) as usize;
    let pages = listings as usize + details;
    let no_politeness =
        format!("delay = \"0s\"\nconcurrency = {CONCURRENCY}\nadaptive = false\nrobots = false\n");
    // caudal first in odd repeats, Scrapy first in even ones.
    let caudal_first = !args.run.is_multiple_of(2);
    let mut caudal = None;
    let mut scrapy = None;
    for turn in 0..2 {
        if (turn == 0) == caudal_first {
            let dir = scratch_dir("crawl-caudal")?;
            eprintln!("crawl: caudal, {pages} pages, {CONCURRENCY} in flight");
            caudal = Some(crawl_caudal(args, &dir, (listings, PER_LISTING), &no_politeness).await?);
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            let dir = scratch_dir("crawl-scrapy")?;
            eprintln!("crawl: Scrapy, {pages} pages, {CONCURRENCY} in flight (the reference)");
            scrapy = Some(crawl_scrapy(args, &dir, listings).await?);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let caudal = caudal.context("caudal did not crawl")?;
    let scrapy = scrapy.context("Scrapy did not crawl")?;
    check_records("caudal", &caudal, details)?;
    check_records("Scrapy", &scrapy, details)?;
    let differing: Vec<&String> = caudal
        .records
        .iter()
        .filter(|(url, fields)| scrapy.records.get(*url) != Some(*fields))
        .map(|(url, _)| url)
        .collect();
    if let Some(url) = differing.first() {
        bail!(
            "{} of {details} records differ between caudal and Scrapy; the first, {url}: caudal {}, Scrapy {}",
            differing.len(),
            caudal.records[*url],
            scrapy.records.get(*url).unwrap_or(&Value::Null)
        );
    }
    let mut line = json!({
        "scenario": "crawl",
        "listings": listings,
        "details": details,
        "pages": pages,
        "detail_bytes": DETAIL_BYTES,
        "concurrency": CONCURRENCY,
    });
    crate::subject::extend(&mut line, caudal.figures("caudal"));
    crate::subject::extend(&mut line, scrapy.figures("scrapy"));
    crate::subject::extend(
        &mut line,
        json!({
            "caudal_over_scrapy": round(caudal.pages_per_min() / scrapy.pages_per_min()),
            "scrapy_rss_over_caudal": round(scrapy.ended.peak_rss_mib / caudal.ended.peak_rss_mib),
        }),
    );
    Ok(line)
}

pub async fn limit(args: &Args) -> anyhow::Result<Value> {
    let listings = args.listings.unwrap_or(LIMIT_DEFAULT_LISTINGS);
    let details = (listings * LIMIT_PER_LISTING) as usize;
    let pages = listings as usize + details;
    let politeness = format!(
        "robots = false\n\n[crawl.sites.\"{{host}}\"]\nconcurrency = {LIMIT_CONCURRENCY}\ndelay = \"{LIMIT_DELAY_MS}ms\"\nadaptive = false\n"
    );
    let configured = 1000.0 / LIMIT_DELAY_MS;
    let dir = scratch_dir("crawl-limit")?;
    eprintln!(
        "crawl-limit: caudal, {pages} pages, at most {LIMIT_CONCURRENCY} in flight and a request every {LIMIT_DELAY_MS} ms"
    );
    let caudal = crawl_caudal(args, &dir, (listings, LIMIT_PER_LISTING), &politeness).await?;
    let _ = std::fs::remove_dir_all(&dir);
    check_records("caudal", &caudal, details)?;
    let starts: Vec<f64> = caudal.site.log.iter().map(|a| a.started_ms).collect();
    let (Some(first), Some(last)) = (starts.first(), starts.last()) else {
        bail!("the site logged no request");
    };
    let achieved = (starts.len() - 1) as f64 / ((last - first) / 1000.0);
    let min_gap = starts
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    let max_in_flight = caudal.site.summary["max_in_flight"].as_u64().unwrap_or(0);
    let ratio = achieved / configured;
    let line = json!({
        "scenario": "crawl_limit",
        "listings": listings,
        "details": details,
        "pages": pages,
        "requests": caudal.site.requests(),
        "duplicates": caudal.site.summary["duplicates"],
        "configured_concurrency": LIMIT_CONCURRENCY,
        "configured_delay_ms": LIMIT_DELAY_MS,
        "configured_requests_per_s": configured,
        "achieved_requests_per_s": round(achieved),
        "achieved_over_configured": (ratio * 1000.0).round() / 1000.0,
        "min_gap_ms": round(min_gap),
        "min_gap_over_delay": round(min_gap / LIMIT_DELAY_MS),
        "max_in_flight": max_in_flight,
        "caudal_secs": round(caudal.ended.secs),
        "caudal_peak_rss_mib": round(caudal.ended.peak_rss_mib),
    });
    // The starts are the site's arrival times, a little jitter off caudal's
    // own: the rate must not exceed the configured one by 0.5% or more.
    if ratio >= 1.005 || max_in_flight > u64::from(LIMIT_CONCURRENCY) {
        bail!("caudal broke the site's limits: {line}");
    }
    Ok(line)
}
