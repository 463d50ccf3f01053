//! A crawl run: the frontier in the state store, pages fetched politely
//! (through the process's shared [`Sites`]), fields and links extracted,
//! records handed on — to a pipeline's buffer (a `type = "crawl"` source)
//! or to a JSON-lines file (a workflow's `crawl` task).
//!
//! Promises:
//! - **Resumable.** A page is marked `done` only after its record is
//!   durable (appended to the buffer, or written and synced to the file)
//!   and the links it led to are in the frontier; a crawl killed at any
//!   point resumes where it was: pages done are not fetched again in the
//!   same generation, pages in flight at the kill are fetched again (their
//!   records keep their idempotency key: the page's URL and generation).
//! - **Each URL once.** Links are normalised (absolute, no fragment) and
//!   de-duplicated against every URL the frontier knows before they are
//!   queued.
//! - **Re-crawls ask what changed.** A frontier whose last crawl finished
//!   starts a new generation; pages fetched before are asked for with their
//!   ETag / Last-Modified, and a 304 yields no record.
//! - **Every page ends with a reason.** `done`, `unchanged`, `skipped`
//!   (robots.txt, not HTML) or `failed` (with the status or error), after
//!   the shared retry policy's attempts for failures worth retrying.
//! - Politeness is the sites' business (see
//!   `caudal_connectors::crawl::sites`): nothing here sends a request any
//!   other way.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_connectors::crawl::extract::{self, host_of, normalize_url};
use caudal_connectors::crawl::sitemap::{self, Sitemap};
use caudal_connectors::crawl::{Extractor, FetchOutcome, Sites, Validators, fetch};
use caudal_connectors::sources::cdc::Durable;
use caudal_connectors::sources::change::spawn_reader;
use caudal_core::config::{Config, CrawlSourceConfig};
use caudal_core::delivery::RetryPolicy;
use caudal_core::record::{Json, Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{ClaimedPage, FinishedPage, NewPage, Store};
use jiff::Timestamp;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Pages being fetched (or waiting for their site) at once per crawl.
const MAX_IN_FLIGHT: usize = 128;
/// Pages claimed from the frontier at once.
const CLAIM: u32 = 256;
/// How often progress is saved to the frontier.
const SAVE_EVERY: Duration = Duration::from_millis(200);
/// Sitemaps read at most per crawl (an index of indexes stops there).
const MAX_SITEMAPS: usize = 1000;

/// The process's sites, with `[crawl]` of `config` applied.
pub fn sites(config: &Config) -> &'static Sites {
    let sites = caudal_connectors::crawl::shared();
    sites.configure(&config.crawl);
    sites
}

/// A crawl ready to run.
#[derive(Clone, Debug)]
pub struct Crawl {
    frontier: String,
    start: Vec<String>,
    config: CrawlSourceConfig,
    extractor: Arc<Extractor>,
    store: Store,
    sites: &'static Sites,
    retry: RetryPolicy,
}

/// Where a crawl's records go.
#[derive(Debug)]
pub enum Output {
    /// To a pipeline's intake; `durable` says how far the buffer has them.
    Records {
        tx: mpsc::Sender<Result<Vec<Record>>>,
        durable: watch::Receiver<Option<Position>>,
    },
    /// Appended to a JSON-lines file (one record per line).
    File(PathBuf),
}

/// What one run of a crawl did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CrawlSummary {
    pub frontier: String,
    pub generation: i64,
    pub resumed: bool,
    /// Pages fetched by this run (answered, failed or unchanged).
    pub fetched: u64,
    pub records: u64,
    pub unchanged: u64,
    pub skipped: u64,
    pub failed: u64,
    /// Whether the crawl reached its end (not stopped).
    pub finished: bool,
}

impl Crawl {
    /// The crawl of source `source` of `config` into frontier `frontier`,
    /// starting from `start` instead of the source's start URLs (and
    /// `start_urls_file`) when given. Sitemaps are read either way.
    pub fn new(
        frontier: &str,
        source: &str,
        config: &Config,
        start: Option<Vec<String>>,
        store: Store,
    ) -> Result<Self> {
        let cfg = config
            .sources
            .get(source)
            .and_then(|s| s.crawl())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("no crawl source named {source:?}"),
                )
            })?
            .clone();
        let start = match start {
            Some(start) => start,
            None => {
                let mut start = cfg.start_urls.clone();
                if let Some(file) = &cfg.start_urls_file {
                    start.extend(read_url_file(&config.config_dir().join(file))?);
                }
                start
            }
        };
        let extractor = Arc::new(Extractor::new(&cfg).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("source {source:?}: {}", e.report()),
            )
        })?);
        let sites = sites(config);
        Ok(Self {
            frontier: frontier.to_string(),
            start,
            config: cfg,
            extractor,
            store,
            sites,
            retry: config.crawl.retry.policy(),
        })
    }

    /// The frontier's name.
    pub fn frontier(&self) -> &str {
        &self.frontier
    }

    /// Crawls until the frontier is exhausted (or `max_pages`), or until
    /// `cancel`.
    pub async fn run(&self, output: Output, cancel: &CancellationToken) -> Result<CrawlSummary> {
        let opened = self.store.open_frontier(&self.frontier).await?;
        let mut run = Run {
            crawl: self,
            generation: opened.generation,
            known: Arc::new(std::sync::Mutex::new(
                self.store
                    .frontier_urls(&self.frontier)
                    .await?
                    .into_iter()
                    .collect(),
            )),
            sites: HashSet::new(),
            found: Vec::new(),
            finished: Vec::new(),
            awaiting: VecDeque::new(),
            outbox: Vec::new(),
            fetched_total: opened.fetched,
            exhausted: false,
            summary: CrawlSummary {
                frontier: self.frontier.clone(),
                generation: opened.generation,
                resumed: opened.resumed,
                ..CrawlSummary::default()
            },
        };
        tracing::info!(crawl = %self.frontier, generation = opened.generation, resumed = opened.resumed, "crawl starts");
        // Sitemaps are read by a new generation, and again by a resumed
        // one that fetched nothing yet (it may have died reading them).
        let read_sitemaps = !opened.resumed || opened.fetched == 0;
        tokio::select! {
            seeded = run.seed(read_sitemaps) => seeded?,
            () = cancel.cancelled() => return Ok(run.summary.clone()),
        }
        let (sink, durable) = match output {
            Output::Records { tx, durable } => (Sink::Records(tx), Some(durable)),
            Output::File(path) => (Sink::File(open_append(&path).await?, path), None),
        };
        run.crawl_loop(sink, durable, cancel).await
    }
}

/// Where records go, open.
enum Sink {
    Records(mpsc::Sender<Result<Vec<Record>>>),
    File(tokio::io::BufWriter<tokio::fs::File>, PathBuf),
}

async fn open_append(path: &Path) -> Result<tokio::io::BufWriter<tokio::fs::File>> {
    // A line cut short by a crash is dropped: its page is not `done`, so it
    // is fetched and written again.
    if let Ok(bytes) = tokio::fs::read(path).await {
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Internal,
                        format!("cannot open {}", path.display()),
                        e,
                    )
                })?;
            file.set_len(whole as u64).await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Internal,
                    format!("cannot repair {}", path.display()),
                    e,
                )
            })?;
        }
    }
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Internal,
                format!("cannot create {}", dir.display()),
                e,
            )
        })?;
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Internal,
                format!("cannot open {}", path.display()),
                e,
            )
        })?;
    Ok(tokio::io::BufWriter::new(file))
}

fn read_url_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot read start_urls_file {}", path.display()),
            e,
        )
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// The URLs a crawl knows.
type Known = Arc<std::sync::Mutex<HashSet<String>>>;

fn lock(known: &Known) -> std::sync::MutexGuard<'_, HashSet<String>> {
    known
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One page's fetch, done by a task.
struct PageDone {
    page: ClaimedPage,
    attempt: u32,
    outcome: FetchOutcome,
    /// What the HTML yielded, or why extraction failed.
    extracted: Option<std::result::Result<extract::Extracted, String>>,
    html: bool,
    fetched_at: Timestamp,
}

/// A page waiting for its turn again.
struct Retry {
    at: Instant,
    page: ClaimedPage,
    attempt: u32,
}

/// The state of one run of a crawl.
struct Run<'a> {
    crawl: &'a Crawl,
    generation: i64,
    /// Every URL of the frontier (and every redirect target followed),
    /// shared with the fetches.
    known: Known,
    /// The hosts of the start URLs (`same_site`).
    sites: HashSet<String>,
    /// Links found, not saved yet.
    found: Vec<NewPage>,
    /// Pages ended, not saved yet.
    finished: Vec<FinishedPage>,
    /// Pages whose record is not durable yet, in record order.
    awaiting: VecDeque<FinishedPage>,
    /// Records not handed on yet.
    outbox: Vec<Record>,
    /// Pages of the generation fetched (for `max_pages`).
    fetched_total: u64,
    /// The last claim found nothing queued, and no link was found since.
    exhausted: bool,
    summary: CrawlSummary,
}

impl Run<'_> {
    fn add(&mut self, url: String, depth: u32) {
        if lock(&self.known).insert(url.clone()) {
            self.found.push(NewPage { url, depth });
            // The frontier has something new to claim.
            self.exhausted = false;
        }
    }

    /// Queues the start URLs (and, for a new generation, the sitemaps'
    /// URLs), and saves them.
    async fn seed(&mut self, read_sitemaps: bool) -> Result<()> {
        let crawl = self.crawl;
        let mut starts = Vec::new();
        for raw in crawl.start.iter().chain(&crawl.config.sitemaps) {
            let url = url::Url::parse(raw.trim()).ok().and_then(normalize_url);
            let Some(url) = url else {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("crawl {:?}: {raw:?} is not an http(s) URL", crawl.frontier),
                ));
            };
            if let Some(host) = url::Url::parse(&url).ok().as_ref().and_then(host_of) {
                self.sites.insert(host);
            }
            starts.push(url);
        }
        for url in starts.into_iter().take(crawl.start.len()) {
            self.add(url, 0);
        }
        // The start URLs are saved before the sitemaps are read.
        self.save().await?;
        if read_sitemaps {
            self.read_sitemaps().await?;
        }
        self.save().await
    }

    async fn read_sitemaps(&mut self) -> Result<()> {
        let crawl = self.crawl;
        let mut queue: VecDeque<String> = crawl.config.sitemaps.iter().cloned().collect();
        let mut read = 0;
        while let Some(raw) = queue.pop_front() {
            read += 1;
            if read > MAX_SITEMAPS {
                tracing::warn!(crawl = %crawl.frontier, "more than {MAX_SITEMAPS} sitemaps; the rest are not read");
                break;
            }
            let Ok(url) = url::Url::parse(&raw) else {
                tracing::warn!(crawl = %crawl.frontier, sitemap = %raw, "not a URL; skipped");
                continue;
            };
            let body = match fetch(crawl.sites, &url, &Validators::default(), &|_| false).await {
                FetchOutcome::Page(page) => page.body,
                other => {
                    tracing::warn!(crawl = %crawl.frontier, sitemap = %url, outcome = ?describe(&other), "sitemap not read");
                    continue;
                }
            };
            match sitemap::parse(&body) {
                Ok(Sitemap::Index(more)) => queue.extend(more),
                Ok(Sitemap::Urls(urls)) => {
                    for u in urls {
                        if let Some(norm) = url::Url::parse(&u).ok().and_then(normalize_url)
                            && url::Url::parse(&norm)
                                .is_ok_and(|p| crawl.extractor.admits(&p, &self.sites))
                        {
                            self.add(norm, 0);
                        }
                    }
                    self.save().await?;
                }
                Err(why) => {
                    tracing::warn!(crawl = %crawl.frontier, sitemap = %url, error = %why, "sitemap not read");
                }
            }
        }
        Ok(())
    }

    /// Saves the links found and the pages ended so far.
    async fn save(&mut self) -> Result<()> {
        if self.found.is_empty() && self.finished.is_empty() {
            return Ok(());
        }
        self.crawl
            .store
            .save_crawl_progress(
                &self.crawl.frontier,
                self.generation,
                &self.found,
                &self.finished,
            )
            .await?;
        for f in &self.finished {
            metrics::counter!("caudal_crawl_pages_total", "crawl" => self.crawl.frontier.clone(), "state" => f.state)
                .increment(1);
        }
        self.found.clear();
        self.finished.clear();
        Ok(())
    }

    async fn crawl_loop(
        &mut self,
        mut sink: Sink,
        mut durable: Option<watch::Receiver<Option<Position>>>,
        cancel: &CancellationToken,
    ) -> Result<CrawlSummary> {
        let crawl = self.crawl;
        let mut tasks: JoinSet<PageDone> = JoinSet::new();
        let mut queue: VecDeque<ClaimedPage> = VecDeque::new();
        let mut retries: Vec<Retry> = Vec::new();
        let mut last_save = Instant::now();
        let limit = crawl.config.max_pages.unwrap_or(u64::MAX);
        loop {
            // Start what may start.
            while tasks.len() < MAX_IN_FLIGHT && self.fetched_total < limit {
                if queue.is_empty() && !self.exhausted {
                    // Links found must be in the frontier before it is asked.
                    self.save().await?;
                    // Never more than `max_pages` leaves to fetch.
                    let room = u32::try_from(limit - self.fetched_total).unwrap_or(CLAIM);
                    let claimed = crawl
                        .store
                        .claim_pages(&crawl.frontier, CLAIM.min(room))
                        .await?;
                    self.exhausted = claimed.is_empty();
                    queue.extend(claimed);
                }
                let Some(page) = queue.pop_front() else { break };
                self.fetched_total += 1;
                tasks.spawn(fetch_page(
                    crawl.sites,
                    crawl.extractor.clone(),
                    self.known.clone(),
                    page,
                    1,
                ));
            }
            if let Err(e) = self.flush_outbox(&mut sink).await {
                // The pipeline stopped reading: what ended is still saved.
                self.save().await?;
                return Err(e);
            }
            let idle = tasks.is_empty() && queue.is_empty() && retries.is_empty();
            if idle && (self.exhausted || self.fetched_total >= limit) {
                if self.awaiting.is_empty() {
                    break;
                }
                if matches!(sink, Sink::File(..)) {
                    self.sync_file(&mut sink).await?;
                    continue;
                }
            }
            let next_retry = retries.iter().map(|r| r.at).min();
            let durable_changed = async {
                match durable.as_mut() {
                    Some(d) => d.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {
                    tasks.abort_all();
                    self.sync_file(&mut sink).await?;
                    self.save().await?;
                    tracing::info!(crawl = %crawl.frontier, "crawl stopped; it resumes where it was");
                    return Ok(self.summary.clone());
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok(done) => self.handle(done, &mut retries),
                        Err(e) if e.is_cancelled() => {}
                        Err(e) => return Err(Error::new(ErrorKind::Internal, format!("a crawl fetch failed: {e}"))),
                    }
                }
                changed = durable_changed => {
                    if changed {
                        let at = durable.as_ref().and_then(|d| d.borrow().clone());
                        self.mark_durable(at.as_ref());
                    } else {
                        durable = None;
                    }
                }
                () = sleep_until(next_retry) => {
                    let now = Instant::now();
                    let (due, wait): (Vec<Retry>, Vec<Retry>) = retries.drain(..).partition(|r| r.at <= now);
                    retries = wait;
                    for r in due {
                        tasks.spawn(fetch_page(crawl.sites, crawl.extractor.clone(), self.known.clone(), r.page, r.attempt));
                    }
                }
                () = tokio::time::sleep(SAVE_EVERY) => {}
            }
            if last_save.elapsed() >= SAVE_EVERY {
                self.sync_file(&mut sink).await?;
                self.save().await?;
                last_save = Instant::now();
            }
        }
        self.sync_file(&mut sink).await?;
        self.save().await?;
        // Reaching `max_pages` ends the crawl too: the next one is a new
        // generation.
        crawl
            .store
            .finish_frontier(&crawl.frontier, self.generation)
            .await?;
        self.summary.finished = true;
        tracing::info!(crawl = %crawl.frontier, fetched = self.summary.fetched, records = self.summary.records, failed = self.summary.failed, "crawl finished");
        Ok(self.summary.clone())
    }

    /// Hands records on: to the pipeline (waiting while it is busy), or
    /// into the file's buffer.
    async fn flush_outbox(&mut self, sink: &mut Sink) -> Result<()> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.outbox);
        match sink {
            Sink::Records(tx) => {
                if tx.send(Ok(records)).await.is_err() {
                    return Err(Error::new(
                        ErrorKind::Cancelled,
                        "the pipeline stopped reading the crawl",
                    ));
                }
            }
            Sink::File(file, path) => {
                for r in records {
                    let written = async {
                        file.write_all(r.data.as_str().as_bytes()).await?;
                        file.write_all(b"\n").await
                    };
                    written.await.map_err(|e| {
                        Error::with_source(
                            ErrorKind::Internal,
                            format!("cannot write {}", path.display()),
                            e,
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Makes the file's records durable; their pages are then done.
    async fn sync_file(&mut self, sink: &mut Sink) -> Result<()> {
        self.flush_outbox(sink).await?;
        if let Sink::File(file, path) = sink {
            if self.awaiting.is_empty() {
                return Ok(());
            }
            let err = |e| {
                Error::with_source(
                    ErrorKind::Internal,
                    format!("cannot write {}", path.display()),
                    e,
                )
            };
            file.flush().await.map_err(err)?;
            file.get_ref().sync_data().await.map_err(err)?;
            self.finished.extend(self.awaiting.drain(..));
        }
        Ok(())
    }

    /// The pipeline has every record up to `position` durable.
    fn mark_durable(&mut self, position: Option<&Position>) {
        let Some(Position::Page { url, .. }) = position else {
            return;
        };
        if !self.awaiting.iter().any(|p| p.url == *url) {
            return;
        }
        while let Some(page) = self.awaiting.pop_front() {
            let last = page.url == *url;
            self.finished.push(page);
            if last {
                break;
            }
        }
    }

    fn handle(&mut self, done: PageDone, retries: &mut Vec<Retry>) {
        let crawl = self.crawl;
        let url = done.page.url.clone();
        let mut finished = FinishedPage {
            url: url.clone(),
            state: "done",
            attempts: done.attempt,
            status: None,
            kind: None,
            etag: None,
            last_modified: None,
            error: None,
            fetched_at: Some(done.fetched_at),
        };
        self.summary.fetched += 1;
        match done.outcome {
            FetchOutcome::Page(page) => {
                finished.status = Some(page.status);
                finished.etag = page.etag;
                finished.last_modified = page.last_modified;
                if !done.html {
                    finished.state = "skipped";
                    finished.error = Some(format!(
                        "not HTML ({})",
                        page.content_type.as_deref().unwrap_or("no content type")
                    ));
                    self.summary.skipped += 1;
                    self.finished.push(finished);
                    return;
                }
                let extracted = match done.extracted {
                    Some(Ok(e)) => e,
                    Some(Err(why)) => {
                        finished.state = "failed";
                        finished.error = Some(why);
                        self.summary.failed += 1;
                        self.finished.push(finished);
                        return;
                    }
                    None => extract::Extracted::default(),
                };
                finished.kind.clone_from(&extracted.kind);
                let depth = done.page.depth.saturating_add(1);
                if crawl.config.max_depth.is_none_or(|max| depth <= max) {
                    for link in extracted.links {
                        if let Ok(parsed) = url::Url::parse(&link)
                            && crawl.extractor.admits(&parsed, &self.sites)
                        {
                            self.add(link, depth);
                        }
                    }
                }
                let Some(fields) = extracted.fields else {
                    self.finished.push(finished);
                    return;
                };
                let mut map = Map::with_capacity(fields.len() + 4);
                map.insert("url".into(), Value::String(page.url.to_string()));
                map.insert(
                    "fetched_at".into(),
                    Value::String(done.fetched_at.to_string()),
                );
                map.insert("status".into(), Value::from(page.status));
                map.insert(
                    "kind".into(),
                    extracted.kind.map_or(Value::Null, Value::String),
                );
                map.extend(fields);
                self.outbox.push(Record {
                    data: Json::from_map(&map),
                    position: Position::Page {
                        url: url.clone(),
                        generation: u64::try_from(self.generation).unwrap_or(0),
                    },
                    key: Some(url),
                });
                self.summary.records += 1;
                self.awaiting.push_back(finished);
            }
            FetchOutcome::NotModified { status } => {
                finished.state = "unchanged";
                finished.status = Some(status);
                self.summary.unchanged += 1;
                self.finished.push(finished);
            }
            FetchOutcome::Duplicate(to) => {
                finished.state = "skipped";
                finished.error = Some(format!(
                    "redirects to {to}, which the crawl fetches on its own"
                ));
                self.summary.skipped += 1;
                self.finished.push(finished);
            }
            FetchOutcome::Disallowed(why) => {
                finished.state = "skipped";
                finished.error = Some(why);
                finished.fetched_at = None;
                self.summary.skipped += 1;
                self.finished.push(finished);
            }
            FetchOutcome::Failed {
                status,
                error,
                retryable,
                retry_after,
            } => {
                if retryable && !crawl.retry.should_give_up(done.attempt, Duration::ZERO) {
                    let wait = crawl
                        .retry
                        .delay(done.attempt - 1, retry_after, &mut rand::rng());
                    self.summary.fetched -= 1;
                    tracing::debug!(crawl = %crawl.frontier, url = %url, attempt = done.attempt, wait_ms = wait.as_millis(), error = %error, "page will be tried again");
                    retries.push(Retry {
                        at: Instant::now() + wait,
                        page: done.page,
                        attempt: done.attempt + 1,
                    });
                    return;
                }
                finished.state = "failed";
                finished.status = status;
                finished.error = Some(error);
                self.summary.failed += 1;
                self.finished.push(finished);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn describe(outcome: &FetchOutcome) -> String {
    match outcome {
        FetchOutcome::Page(p) => format!("{}", p.status),
        FetchOutcome::NotModified { .. } => "304".into(),
        FetchOutcome::Disallowed(why) => why.clone(),
        FetchOutcome::Duplicate(to) => format!("redirects to {to}"),
        FetchOutcome::Failed { error, .. } => error.clone(),
    }
}

/// Fetches one page and, for HTML, extracts from it (on a blocking
/// thread: parsing is CPU work).
async fn fetch_page(
    sites: &'static Sites,
    extractor: Arc<Extractor>,
    known: Known,
    page: ClaimedPage,
    attempt: u32,
) -> PageDone {
    let validators = Validators {
        etag: page.etag.clone(),
        last_modified: page.last_modified.clone(),
    };
    let outcome = match url::Url::parse(&page.url) {
        Ok(url) => {
            // A target unknown so far is claimed by this page (a link to it
            // found meanwhile is not queued); released again if the page is
            // to be retried, so its retry follows the redirect again.
            let claimed = std::sync::Mutex::new(Vec::new());
            let seen = |target: &str| {
                if lock(&known).insert(target.to_string()) {
                    claimed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(target.to_string());
                    false
                } else {
                    true
                }
            };
            let outcome = fetch(sites, &url, &validators, &seen).await;
            if matches!(
                outcome,
                FetchOutcome::Failed {
                    retryable: true,
                    ..
                }
            ) {
                let claimed = claimed
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut known = lock(&known);
                for target in claimed {
                    known.remove(&target);
                }
            }
            outcome
        }
        Err(e) => FetchOutcome::Failed {
            status: None,
            error: format!("not a URL: {e}"),
            retryable: false,
            retry_after: None,
        },
    };
    // When the answer came (not when the page began waiting for its site).
    let fetched_at = Timestamp::now();
    let mut html = false;
    let mut extracted = None;
    if let FetchOutcome::Page(p) = &outcome {
        html = extract::is_html(p.content_type.as_deref(), &p.body);
        if html {
            let (body, ct, url) = (p.body.clone(), p.content_type.clone(), p.url.clone());
            extracted = Some(
                tokio::task::spawn_blocking(move || {
                    let text = extract::decode(&body, ct.as_deref());
                    extractor.extract(&url, &text)
                })
                .await
                .map_err(|e| format!("extraction failed: {e}")),
            );
        }
    }
    PageDone {
        page,
        attempt,
        outcome,
        extracted,
        html,
        fetched_at,
    }
}

/// A pipeline's crawl source: the crawl runs in a task of its own and
/// hands records to the pipeline's intake page by page.
#[derive(Debug)]
pub struct CrawlReader {
    rx: mpsc::Receiver<Result<Vec<Record>>>,
    durable: Durable,
    stop: CancellationToken,
}

impl CrawlReader {
    /// Starts `crawl`.
    pub fn start(crawl: Crawl) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let (durable, durable_rx) = Durable::channel();
        let stop = CancellationToken::new();
        {
            let stop = stop.clone();
            let out = tx.clone();
            spawn_reader(
                async move {
                    let output = Output::Records {
                        tx: tx.clone(),
                        durable: durable_rx,
                    };
                    match crawl.run(output, &stop).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Cancelled => {}
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                },
                out,
            );
        };
        Self { rx, durable, stop }
    }

    /// The next records, `None` once the crawl has ended.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        match self.rx.recv().await {
            Some(Ok(records)) => Ok(Some(records)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The handle the pipeline reports durable records through.
    pub fn durable(&self) -> Durable {
        self.durable.clone()
    }
}

impl Drop for CrawlReader {
    fn drop(&mut self) {
        // The crawl saves its progress when stopped; it is not aborted.
        self.stop.cancel();
    }
}
