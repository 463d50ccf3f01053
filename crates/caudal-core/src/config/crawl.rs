//! The crawler: `[crawl]` (who caudal says it is and how it treats every
//! site, with `[crawl.sites."HOST"]` overrides) and `type = "crawl"`
//! sources (where a crawl starts, which links it follows, what it extracts
//! from which pages).
//!
//! Every CSS selector and URL pattern is compiled here, at load time, so a
//! bad one is a located configuration error rather than a failed run.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::workflows::{RetryStrategy, TaskRetryConfig};
use crate::units::{ByteSize, Duration};

/// Default `User-Agent` of the crawler's requests.
pub const DEFAULT_USER_AGENT: &str = concat!("caudal/", env!("CARGO_PKG_VERSION"), " (crawler)");
/// Default requests in flight to one site.
pub const DEFAULT_SITE_CONCURRENCY: u32 = 2;
/// Default least time between two request starts to one site.
pub const DEFAULT_SITE_DELAY: Duration = Duration::from_secs(1);
/// Default longest delay the adaptive throttle (or a `Retry-After`) sets.
pub const DEFAULT_SITE_MAX_DELAY: Duration = Duration::from_secs(60);
/// Default longest time of one request.
pub const DEFAULT_CRAWL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest body read from one response.
pub const DEFAULT_MAX_BODY: ByteSize = ByteSize(10 << 20);
/// Default redirects followed from one URL.
pub const DEFAULT_MAX_REDIRECTS: u32 = 5;
/// Default failures in a row after which a site is backed off.
pub const DEFAULT_SITE_FAILURES: u32 = 5;
/// Default attempts of one page (the first included).
pub const DEFAULT_PAGE_ATTEMPTS: u32 = 3;
/// Default wait before a page's first retry.
pub const DEFAULT_PAGE_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default longest wait between two attempts of a page.
pub const DEFAULT_PAGE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Fields every crawl record has besides the extracted ones.
pub const CRAWL_RECORD_FIELDS: &[&str] = &["url", "fetched_at", "status", "kind"];

/// `[crawl]`: the process's manners, shared by every crawl source and task
/// and by command tasks that name a `site`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrawlSettings {
    /// The `User-Agent` of every request, and the agent robots.txt rules
    /// are read for.
    #[serde(default = "default_user_agent")]
    #[schemars(extend("default" = DEFAULT_USER_AGENT))]
    pub user_agent: String,
    /// Longest time of one request, the body included (default `"30s"`).
    #[serde(default = "default_timeout")]
    #[schemars(extend("default" = DEFAULT_CRAWL_TIMEOUT))]
    pub timeout: Duration,
    /// Largest body read from a response; a larger page fails with that
    /// reason (default `"10MiB"`).
    #[serde(default = "default_max_body")]
    #[schemars(extend("default" = DEFAULT_MAX_BODY))]
    pub max_body: ByteSize,
    /// Redirects followed from one URL (default 5); each target is checked
    /// against robots.txt again.
    #[serde(default = "default_max_redirects")]
    #[schemars(extend("default" = DEFAULT_MAX_REDIRECTS))]
    pub max_redirects: u32,
    /// Retries of a page that failed (a network error, a timeout, a 5xx or
    /// 429 answer). Default: 3 attempts, from `"1s"` to `"1m"` apart.
    #[serde(default)]
    pub retry: PageRetryConfig,
    /// Requests in flight to one site at once (default 2).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Least time between two request starts to one site (default `"1s"`).
    #[serde(default)]
    pub delay: Option<Duration>,
    /// Whether robots.txt is obeyed (default true).
    #[serde(default)]
    pub robots: Option<bool>,
    /// Whether the adaptive throttle is on (default true).
    #[serde(default)]
    pub adaptive: Option<bool>,
    /// Longest delay the throttle sets (default `"1m"`).
    #[serde(default)]
    pub max_delay: Option<Duration>,
    /// Failed requests in a row before a site is backed off (default 5).
    #[serde(default)]
    pub failures: Option<u32>,
    /// Per-site manners, by host (`"lamudi.com.mx"`, or `"127.0.0.1:8080"`
    /// with a port); unset fields come from the defaults above.
    #[serde(default)]
    pub sites: BTreeMap<String, SitePolicy>,
}

impl Default for CrawlSettings {
    fn default() -> Self {
        Self {
            user_agent: default_user_agent(),
            timeout: default_timeout(),
            max_body: default_max_body(),
            max_redirects: default_max_redirects(),
            retry: PageRetryConfig::default(),
            concurrency: None,
            delay: None,
            robots: None,
            adaptive: None,
            max_delay: None,
            failures: None,
            sites: BTreeMap::new(),
        }
    }
}

/// How caudal treats one site. Every field is optional; unset ones come
/// from `[crawl]`, then from the defaults named here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SitePolicy {
    /// Requests in flight to the site at once, across every crawl and
    /// command task of the process (default 2).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Least time between two request starts to the site (default `"1s"`;
    /// `"0s"` for none). robots.txt's `Crawl-delay` raises it.
    #[serde(default)]
    pub delay: Option<Duration>,
    /// Whether robots.txt is fetched and obeyed (default true).
    #[serde(default)]
    pub robots: Option<bool>,
    /// Whether the delay grows with the site's latency and on 429/503
    /// answers, and shrinks back as it recovers (default true).
    #[serde(default)]
    pub adaptive: Option<bool>,
    /// Longest delay the adaptive throttle sets, and how long a site that
    /// keeps failing is backed off (default `"1m"`). A `Retry-After` is
    /// honoured up to an hour.
    #[serde(default)]
    pub max_delay: Option<Duration>,
    /// Failed requests in a row after which the site is backed off (no
    /// request for `max_delay`) (default 5).
    #[serde(default)]
    pub failures: Option<u32>,
}

/// A site's manners with every default filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteLimits {
    pub concurrency: u32,
    pub delay: std::time::Duration,
    pub robots: bool,
    pub adaptive: bool,
    pub max_delay: std::time::Duration,
    pub failures: u32,
}

impl CrawlSettings {
    /// The `[crawl]` table's own site manners.
    pub fn defaults(&self) -> SitePolicy {
        SitePolicy {
            concurrency: self.concurrency,
            delay: self.delay,
            robots: self.robots,
            adaptive: self.adaptive,
            max_delay: self.max_delay,
            failures: self.failures,
        }
    }

    /// The manners of `host` (`name` or `name:port`, lowercase): its own
    /// entry, then the `[crawl]` defaults, then the built-in ones. An entry
    /// without a port applies to every port of the host.
    pub fn site(&self, host: &str) -> SiteLimits {
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let own = self
            .sites
            .get(host)
            .or_else(|| self.sites.get(bare))
            .cloned()
            .unwrap_or_default();
        let d = &self.defaults();
        SiteLimits {
            concurrency: own
                .concurrency
                .or(d.concurrency)
                .unwrap_or(DEFAULT_SITE_CONCURRENCY)
                .max(1),
            delay: own.delay.or(d.delay).unwrap_or(DEFAULT_SITE_DELAY).as_std(),
            robots: own.robots.or(d.robots).unwrap_or(true),
            adaptive: own.adaptive.or(d.adaptive).unwrap_or(true),
            max_delay: own
                .max_delay
                .or(d.max_delay)
                .unwrap_or(DEFAULT_SITE_MAX_DELAY)
                .as_std(),
            failures: own
                .failures
                .or(d.failures)
                .unwrap_or(DEFAULT_SITE_FAILURES)
                .max(1),
        }
    }
}

fn default_user_agent() -> String {
    DEFAULT_USER_AGENT.to_string()
}
fn default_timeout() -> Duration {
    DEFAULT_CRAWL_TIMEOUT
}
fn default_max_body() -> ByteSize {
    DEFAULT_MAX_BODY
}
fn default_max_redirects() -> u32 {
    DEFAULT_MAX_REDIRECTS
}
/// Retries of a page: the shared retry policy with the crawler's
/// defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageRetryConfig {
    /// `"exponential"` (default; doubles), `"linear"` or `"fixed"`.
    #[serde(default)]
    pub strategy: RetryStrategy,
    /// Wait before the first retry (default `"1s"`).
    #[serde(default = "default_page_retry_initial")]
    #[schemars(extend("default" = DEFAULT_PAGE_RETRY_INITIAL))]
    pub initial: Duration,
    /// Longest wait between two attempts (default `"1m"`).
    #[serde(default = "default_page_retry_max")]
    #[schemars(extend("default" = DEFAULT_PAGE_RETRY_MAX))]
    pub max: Duration,
    /// Fraction of each wait left to chance, 0 to 1 (default 0.1).
    #[serde(default = "default_page_retry_jitter")]
    pub jitter: f64,
    /// Attempts in all, the first included (default 3).
    #[serde(default = "default_page_attempts")]
    #[schemars(extend("default" = DEFAULT_PAGE_ATTEMPTS))]
    pub max_attempts: u32,
}

impl Default for PageRetryConfig {
    fn default() -> Self {
        Self {
            strategy: RetryStrategy::default(),
            initial: DEFAULT_PAGE_RETRY_INITIAL,
            max: DEFAULT_PAGE_RETRY_MAX,
            jitter: default_page_retry_jitter(),
            max_attempts: DEFAULT_PAGE_ATTEMPTS,
        }
    }
}

impl PageRetryConfig {
    /// These retries as the shared retry policy (no time limit).
    pub fn policy(&self) -> crate::delivery::RetryPolicy {
        TaskRetryConfig {
            strategy: self.strategy,
            initial: self.initial,
            max: self.max,
            jitter: self.jitter,
            max_attempts: self.max_attempts,
        }
        .policy(std::time::Duration::ZERO)
    }
}

fn default_page_retry_initial() -> Duration {
    DEFAULT_PAGE_RETRY_INITIAL
}
fn default_page_retry_max() -> Duration {
    DEFAULT_PAGE_RETRY_MAX
}
fn default_page_retry_jitter() -> f64 {
    super::workflows::DEFAULT_TASK_RETRY_JITTER
}
fn default_page_attempts() -> u32 {
    DEFAULT_PAGE_ATTEMPTS
}

/// A crawl: pages fetched from start URLs (and sitemaps), links followed by
/// rules, fields extracted from the pages of each kind. Each extracting page
/// becomes a record `{url, fetched_at, status, kind, FIELD…}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrawlSourceConfig {
    /// Where the crawl starts, e.g. `["https://site.example/listings/1"]`.
    #[serde(default)]
    pub start_urls: Vec<String>,
    /// A file of start URLs, one per line (blank lines and `#` comments
    /// skipped); relative to the configuration file's directory.
    #[serde(default)]
    pub start_urls_file: Option<String>,
    /// Sitemaps (`sitemap.xml`, gzip-compressed ones, sitemap indexes)
    /// whose URLs are crawled too.
    #[serde(default)]
    pub sitemaps: Vec<String>,
    /// CSS selectors of the links to follow (their `href`), e.g.
    /// `["a.next", "a.detail"]`. Default: none (only the start URLs and
    /// sitemaps are fetched). A page kind may set its own.
    #[serde(default)]
    pub follow: Vec<String>,
    /// Regular expressions; when any is set, a link is followed only if
    /// its absolute URL matches one.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Regular expressions; a link whose absolute URL matches one is never
    /// followed.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Follow only links to the sites of the start URLs (default true).
    #[serde(default = "default_true")]
    pub same_site: bool,
    /// Links followed from a start URL at most this deep (start URLs are
    /// depth 0). Default: no limit.
    #[serde(default)]
    pub max_depth: Option<u32>,
    /// Pages fetched at most per crawl. Default: no limit.
    #[serde(default)]
    pub max_pages: Option<u64>,
    /// Page kinds, tried in order; the first whose `match` matches a URL
    /// decides what is extracted from the page.
    #[serde(default)]
    pub pages: Vec<PageKindConfig>,
}

fn default_true() -> bool {
    true
}

/// A kind of page: which URLs it covers, what is extracted from them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageKindConfig {
    /// The kind's name (the record's `kind` field), e.g. `"detail"`.
    pub name: String,
    /// A regular expression the page's absolute URL must match, e.g.
    /// `"/property/\\d+$"`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Fields of the record: a CSS selector (the text of its first match),
    /// or `{ css = "img.main", attr = "src", all = false }`. A page kind
    /// without fields produces no record (its links are still followed).
    #[serde(default)]
    pub fields: BTreeMap<String, FieldConfig>,
    /// The links to follow from pages of this kind, instead of the crawl's
    /// `follow`.
    #[serde(default)]
    pub follow: Option<Vec<String>>,
}

/// What one record field is extracted from.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FieldConfig {
    /// A CSS selector: the whitespace-collapsed text of its first match.
    Css(String),
    /// A CSS selector with options.
    Full(FieldSpec),
}

/// A record field's selector and options.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The CSS selector.
    pub css: String,
    /// An attribute to read instead of the text (e.g. `"src"`); URL
    /// attributes (`href`, `src`) are made absolute.
    #[serde(default)]
    pub attr: Option<String>,
    /// Every match as a list, instead of the first match.
    #[serde(default)]
    pub all: bool,
}

impl FieldConfig {
    /// The selector, attribute and whether every match is kept.
    pub fn spec(&self) -> FieldSpec {
        match self {
            Self::Css(css) => FieldSpec {
                css: css.clone(),
                attr: None,
                all: false,
            },
            Self::Full(spec) => spec.clone(),
        }
    }
}

/// Checks `[crawl]`.
pub(super) fn check_settings(path: &FieldPath, settings: &CrawlSettings, out: &mut Vec<Problem>) {
    if settings.user_agent.trim().is_empty() || settings.user_agent.contains(['\r', '\n']) {
        out.push(Problem::at(
            path.key("user_agent"),
            "must be one non-empty line",
        ));
    }
    if settings.timeout.as_std().is_zero() {
        out.push(Problem::at(path.key("timeout"), "must be greater than 0s"));
    }
    if settings.max_body.0 == 0 {
        out.push(Problem::at(path.key("max_body"), "must be greater than 0"));
    }
    if settings.retry.max_attempts == 0 {
        out.push(Problem::at(
            path.key("retry").key("max_attempts"),
            "must be at least 1 (the first attempt counts)",
        ));
    }
    if !(0.0..=1.0).contains(&settings.retry.jitter) {
        out.push(Problem::at(
            path.key("retry").key("jitter"),
            "must be between 0 and 1",
        ));
    }
    check_policy(path, &settings.defaults(), out);
    for (host, policy) in &settings.sites {
        let at = path.key("sites").key(host.clone());
        if host.is_empty() || host.contains(['/', ' ']) || host.to_lowercase() != *host {
            out.push(Problem::at_key(
                at.clone(),
                format!(
                    "{host:?} is not a host; write it lowercase, as \"site.example\" or \"127.0.0.1:8080\""
                ),
            ));
        }
        check_policy(&at, policy, out);
    }
}

fn check_policy(path: &FieldPath, policy: &SitePolicy, out: &mut Vec<Problem>) {
    if policy.concurrency == Some(0) {
        out.push(Problem::at(path.key("concurrency"), "must be at least 1"));
    }
    if policy.failures == Some(0) {
        out.push(Problem::at(path.key("failures"), "must be at least 1"));
    }
    if let (Some(delay), Some(max)) = (policy.delay, policy.max_delay)
        && max.as_std() < delay.as_std()
    {
        out.push(Problem::at(
            path.key("max_delay"),
            format!("must not be shorter than `delay` ({delay})"),
        ));
    }
}

/// Checks a crawl source.
pub(super) fn check_source(path: &FieldPath, crawl: &CrawlSourceConfig, out: &mut Vec<Problem>) {
    for (i, url) in crawl.start_urls.iter().enumerate() {
        if let Err(why) = check_http_url(url) {
            out.push(Problem::at(path.key("start_urls").index(i), why));
        }
    }
    for (i, url) in crawl.sitemaps.iter().enumerate() {
        if let Err(why) = check_http_url(url) {
            out.push(Problem::at(path.key("sitemaps").index(i), why));
        }
    }
    if crawl.start_urls.is_empty() && crawl.start_urls_file.is_none() && crawl.sitemaps.is_empty() {
        out.push(Problem::at_key(
            path.clone(),
            "a crawl needs somewhere to start: `start_urls`, `start_urls_file` or `sitemaps`",
        ));
    }
    check_selectors(&path.key("follow"), &crawl.follow, out);
    for (field, patterns) in [("allow", &crawl.allow), ("deny", &crawl.deny)] {
        for (i, p) in patterns.iter().enumerate() {
            if let Err(why) = check_pattern(p) {
                out.push(Problem::at(path.key(field).index(i), why));
            }
        }
    }
    if crawl.max_pages == Some(0) {
        out.push(Problem::at(path.key("max_pages"), "must be at least 1"));
    }
    let mut names = BTreeSet::new();
    for (i, page) in crawl.pages.iter().enumerate() {
        let at = path.key("pages").index(i);
        if page.name.trim().is_empty() {
            out.push(Problem::at(at.key("name"), "must not be empty"));
        } else if !names.insert(page.name.as_str()) {
            out.push(Problem::at(
                at.key("name"),
                format!("page kind {:?} is defined twice", page.name),
            ));
        }
        if let Err(why) = check_pattern(&page.pattern) {
            out.push(Problem::at(at.key("match"), why));
        }
        if let Some(follow) = &page.follow {
            check_selectors(&at.key("follow"), follow, out);
        }
        for (name, field) in &page.fields {
            let fat = at.key("fields").key(name.clone());
            if CRAWL_RECORD_FIELDS.contains(&name.as_str()) {
                out.push(Problem::at_key(
                    fat.clone(),
                    format!(
                        "{name:?} is a field every crawl record has ({}); name this one differently",
                        CRAWL_RECORD_FIELDS.join(", ")
                    ),
                ));
            }
            let spec = field.spec();
            let sel_at = match field {
                FieldConfig::Css(_) => fat.clone(),
                FieldConfig::Full(_) => fat.key("css"),
            };
            if let Err(why) = check_selector(&spec.css) {
                out.push(Problem::at(sel_at, why));
            }
            if let Some(attr) = &spec.attr
                && (attr.is_empty() || attr.contains(char::is_whitespace))
            {
                out.push(Problem::at(fat.key("attr"), "must be an attribute name"));
            }
        }
    }
}

fn check_selectors(path: &FieldPath, selectors: &[String], out: &mut Vec<Problem>) {
    for (i, s) in selectors.iter().enumerate() {
        if let Err(why) = check_selector(s) {
            out.push(Problem::at(path.index(i), why));
        }
    }
}

/// Whether `css` is a CSS selector the extractor can run.
pub fn check_selector(css: &str) -> Result<(), String> {
    if css.trim().is_empty() {
        return Err("the CSS selector is empty".into());
    }
    scraper::Selector::parse(css).map(|_| ()).map_err(|e| {
        // Some parse errors print as a plea to report them, then the kind.
        let text = e.to_string();
        let why = text
            .lines()
            .filter(|l| !l.contains("Please report"))
            .collect::<Vec<_>>()
            .join(": ");
        let why = if why.is_empty() {
            format!("{e:?}")
        } else {
            why
        };
        format!("{css:?} is not a valid CSS selector: {why}")
    })
}

/// Whether `pattern` is a regular expression URLs can be matched with.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern).map(|_| ()).map_err(|e| match e {
        regex::Error::Syntax(text) => format!(
            "{pattern:?} is not a valid regular expression: {}",
            text.lines().last().unwrap_or_default().trim()
        ),
        other => format!("{pattern:?} is not a usable regular expression: {other}"),
    })
}

/// Whether `url` is an absolute http(s) URL (a template left unrendered
/// passes: its text is checked when rendered).
pub fn check_http_url(url: &str) -> Result<(), String> {
    if url.contains("{{") {
        return Ok(());
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    if url.len() <= "https://".len() || url.contains(char::is_whitespace) {
        return Err(format!("{url:?} is not a valid URL"));
    }
    Ok(())
}
