//! A fixture website for the crawler's tests and benchmark: a small
//! real-estate site on loopback, generated deterministically, with an access
//! log that proves (or disproves) a crawler's politeness.
//!
//! [`Site::start`] listens on `127.0.0.1` on a port the kernel picks and
//! serves HTTP/1.1 (keep-alive). Every page is a pure function of the
//! [`SiteOptions`], the site's own host and the pages' versions, so tests
//! compute what a crawler should have found ([`detail`], [`Site::detail`])
//! instead of parsing pages themselves.
//!
//! | Path | Answer |
//! |---|---|
//! | `/listings/{n}`, `1 ≤ n ≤ listings` | `ul.results > li.card` with `a.detail` (text `Casa {id}`) and `span.price`, `per_listing` cards and the first card once more; `a.next` to `/listings/{n+1}` except on the last page |
//! | `/property/{id}`, `1 ≤ id ≤ listings × per_listing` | `h1.title`, `span.price`, `ul.features li`, `img.main`, `a.back`, `div.description`; `ETag` and `Last-Modified`, 304 when they match |
//! | `/robots.txt` | [`SiteOptions::robots`] as `text/plain`, 404 when `None` |
//! | `/sitemap.xml` | a `<sitemapindex>` of the two below |
//! | `/sitemap-listings.xml` | a `<urlset>` of every listing page |
//! | `/sitemap-details.xml.gz` | a gzip file (`application/gzip`, no `Content-Encoding`) of a `<urlset>` of every detail page |
//! | `/malformed` | broken HTML with `h1.title` "Mal formado", `span.price` "$ 1", `a.detail` to `/property/1` |
//! | `/latin1`, `/latin1-meta` | ISO-8859-1 bytes whose `h1.title` is [`LATIN1_TITLE`]; the charset in the `Content-Type` or only in a `<meta>` |
//! | `/huge` | [`HUGE_BYTES`] of HTML, streamed |
//! | `/file.pdf` | `application/pdf`, binary with NUL bytes |
//! | `/garbage` | `text/html` of [`GARBAGE_BYTES`] bytes that are not UTF-8 |
//! | `/loop/a`, `/loop/b` | 302 to each other |
//! | `/redirect/{id}` | 301 to `/property/{id}` |
//! | `/redirect-private` | 302 to `/private/secret` |
//! | `/private/…` | 200, a page robots.txt is meant to disallow |
//! | `/slow` | 200 after [`SLOW_DELAY`] |
//! | `/img/{id}.jpg` | a few bytes of `image/jpeg` |
//! | anything else | 404 |
//!
//! Listing pages link to detail `id` as `/property/{id}` (`id % 4 == 0`),
//! `../property/{id}` (1), `http://{host}/property/{id}#fotos` (2) or
//! `/property/{id}#mapa` (3), so a crawler must resolve and normalise links
//! to fetch each detail once.
//!
//! Every request is logged on arrival ([`Access`]), `/robots.txt` and 404s
//! included, and the site tracks how many requests it was handling at once
//! ([`Site::max_in_flight`]). Faults are switched on at runtime:
//! [`Site::fail_next`], [`Site::set_latency`], and [`Site::touch`] changes a
//! page so a re-crawl must fetch it again.
//!
//! The server is a plain hyper accept loop, like the
//! [`Receiver`](crate::Receiver)'s; dropping the [`Site`] closes the port and
//! every connection.

mod access;
mod body;
mod pages;

pub use access::{Access, SiteSummary};
pub use pages::{
    Detail, GARBAGE_BYTES, HUGE_BYTES, LATIN1_TITLE, UPDATED_SUFFIX, detail, detail_at,
};

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::header::{
    CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, LOCATION, RETRY_AFTER,
};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use body::SiteBody;
use pages::Pages;

/// How long `/slow` waits before answering.
pub const SLOW_DELAY: Duration = Duration::from_secs(5);

/// [`SiteOptions::listings`] by default.
pub const DEFAULT_LISTINGS: u32 = 5;
/// [`SiteOptions::per_listing`] by default.
pub const DEFAULT_PER_LISTING: u32 = 10;
/// [`SiteOptions::detail_bytes`] by default.
pub const DEFAULT_DETAIL_BYTES: usize = 30_000;

/// The `Last-Modified` of an untouched detail page, in days since 1970:
/// Wed, 01 Jan 2025. Each [`Site::touch`] moves it one day later.
const LAST_MODIFIED_DAY: i64 = 20_089;

const HTML: &str = "text/html; charset=utf-8";

/// What the [`Site`] generates. `SiteOptions::default()` is a site of 5
/// listing pages of 10 details each, 30 KB per detail page, no robots.txt
/// and no latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteOptions {
    /// Listing pages `/listings/1` … `/listings/{listings}`
    /// ([`DEFAULT_LISTINGS`]).
    pub listings: u32,
    /// Detail links per listing page: page `n` links to details
    /// `(n-1) × per_listing + 1 ..= n × per_listing`
    /// ([`DEFAULT_PER_LISTING`]).
    pub per_listing: u32,
    /// About how long each detail page is, in bytes; padded with a
    /// description ([`DEFAULT_DETAIL_BYTES`]).
    pub detail_bytes: usize,
    /// The exact body of `/robots.txt`; 404 when `None` (the default).
    pub robots: Option<String>,
    /// Waited before answering every request (zero by default); see
    /// [`Site::set_latency`].
    pub latency: Duration,
}

impl Default for SiteOptions {
    fn default() -> Self {
        Self {
            listings: DEFAULT_LISTINGS,
            per_listing: DEFAULT_PER_LISTING,
            detail_bytes: DEFAULT_DETAIL_BYTES,
            robots: None,
            latency: Duration::ZERO,
        }
    }
}

/// The fixture website on `127.0.0.1`. See the [module docs](self).
///
/// Dropping the site stops the server.
pub struct Site {
    addr: SocketAddr,
    host: String,
    options: SiteOptions,
    started: Instant,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// State shared between the handle and the connection tasks.
struct Shared {
    pages: Pages,
    log: access::AccessLog,
    latency_nanos: AtomicU64,
    fault: Mutex<Fault>,
    /// The queued failures of [`Site::fail_robots_next`].
    robots_fault: Mutex<Fault>,
    /// Versions of touched detail pages; absent means 0.
    versions: Mutex<HashMap<u64, u32>>,
}

/// The queued failures of [`Site::fail_next`].
#[derive(Default)]
struct Fault {
    remaining: usize,
    status: u16,
    retry_after: Option<u64>,
}

impl Site {
    /// Starts the site on `127.0.0.1` on a free port.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound, or when called outside a Tokio
    /// runtime.
    pub async fn start(options: SiteOptions) -> Self {
        Self::bind(0, options)
            .await
            .unwrap_or_else(|err| panic!("caudal-testkit: cannot bind 127.0.0.1:0: {err}"))
    }

    /// Starts the site on `127.0.0.1:{port}` (0: a free port).
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime.
    pub async fn bind(port: u16, options: SiteOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let host = addr.to_string();
        let shared = Arc::new(Shared {
            pages: Pages::new(
                options.listings,
                options.per_listing,
                options.detail_bytes,
                options.robots.as_deref(),
                host.clone(),
            ),
            log: access::AccessLog::new(),
            latency_nanos: AtomicU64::new(nanos(options.latency)),
            fault: Mutex::default(),
            robots_fault: Mutex::default(),
            versions: Mutex::default(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown.clone()));
        Ok(Self {
            addr,
            host,
            options,
            started: Instant::now(),
            shared,
            shutdown,
        })
    }

    /// The address the site listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, as in the site's absolute links and sitemaps.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn origin(&self) -> String {
        format!("http://{}", self.host)
    }

    /// `http://127.0.0.1:<port><path>`; a `/` is put in front of `path` when
    /// it has none.
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.host)
    }

    /// The options the site was started with ([`latency`](SiteOptions::latency)
    /// as at start; see [`set_latency`](Self::set_latency)).
    pub fn options(&self) -> &SiteOptions {
        &self.options
    }

    /// When the site started listening; the origin of the times in
    /// [`write_log_json_lines`](Self::write_log_json_lines).
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// How many detail pages there are: `listings × per_listing`, ids
    /// `1..=total_details()`.
    pub fn total_details(&self) -> u64 {
        self.shared.pages.total_details()
    }

    /// The listing page that links to detail `id` (its `a.back` target).
    pub fn listing_of(&self, id: u64) -> u32 {
        self.shared.pages.listing_of(id)
    }

    /// What detail page `id` shows now, [`touch`](Self::touch)es included.
    pub fn detail(&self, id: u64) -> Detail {
        detail_at(id, self.version(id))
    }

    /// How many times detail page `id` was [touched](Self::touch).
    pub fn version(&self, id: u64) -> u32 {
        self.shared.version(id)
    }

    /// Changes detail page `id`: its title gets [`UPDATED_SUFFIX`] and its
    /// `ETag` and `Last-Modified` change, so conditional requests made with
    /// the old validators get a 200 with the new page.
    ///
    /// # Panics
    ///
    /// When the site has no detail `id`.
    pub fn touch(&self, id: u64) {
        let total = self.total_details();
        assert!(
            (1..=total).contains(&id),
            "caudal-testkit: touch({id}): the site has details 1..={total}"
        );
        *lock(&self.shared.versions).entry(id).or_insert(0) += 1;
    }

    /// From now on, wait `latency` before answering every request.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_nanos
            .store(nanos(latency), Ordering::Relaxed);
    }

    /// Answer the next `count` requests (any path but `/robots.txt`) with
    /// `status` and an empty body, with `Retry-After: {seconds}` when
    /// `retry_after` is given. Replaces failures still queued from an earlier
    /// call.
    pub fn fail_next(&self, count: usize, status: u16, retry_after: Option<u64>) {
        *lock(&self.shared.fault) = Fault {
            remaining: count,
            status,
            retry_after,
        };
    }

    /// Answer the next `count` requests for `/robots.txt` with `status`
    /// and an empty body (with `Retry-After` when given); other paths are
    /// not affected.
    pub fn fail_robots_next(&self, count: usize, status: u16, retry_after: Option<u64>) {
        *lock(&self.shared.robots_fault) = Fault {
            remaining: count,
            status,
            retry_after,
        };
    }

    /// A copy of the access log, in the order requests arrived.
    pub fn log(&self) -> Vec<Access> {
        self.shared.log.entries()
    }

    /// How many logged requests had exactly this target (path and query).
    pub fn hits(&self, target: &str) -> usize {
        self.shared.log.hits(target)
    }

    /// How many requests were logged (since the last
    /// [`reset_log`](Self::reset_log)).
    pub fn requests(&self) -> usize {
        self.shared.log.len()
    }

    /// The most requests the site was handling at the same moment: counted
    /// from arrival until the last byte of the response was handed to the
    /// connection (or the client went away).
    pub fn max_in_flight(&self) -> usize {
        self.shared.log.max_in_flight()
    }

    /// Forgets the access log, and restarts
    /// [`max_in_flight`](Self::max_in_flight) from the requests in flight now.
    pub fn reset_log(&self) {
        self.shared.log.reset();
    }

    /// Counts over the access log, for the benchmark's report.
    pub fn summary(&self) -> SiteSummary {
        self.shared.log.summary()
    }

    /// Writes the access log as JSON lines `{"path", "ua", "started_ms",
    /// "finished_ms", "status"}`, times in milliseconds (fractional) since
    /// [`started_at`](Self::started_at).
    ///
    /// # Errors
    ///
    /// When writing to `out` fails.
    pub fn write_log_json_lines(&self, out: &mut dyn io::Write) -> io::Result<()> {
        self.shared.log.write_json_lines(self.started, out)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl fmt::Debug for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Site")
            .field("addr", &self.addr)
            .field("options", &self.options)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn version(&self, id: u64) -> u32 {
        lock(&self.versions).get(&id).copied().unwrap_or(0)
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Uses up one queued failure, if any: its status and `Retry-After`.
    fn take_fault(&self) -> Option<(u16, Option<u64>)> {
        Self::take(&self.fault)
    }

    fn take(fault: &Mutex<Fault>) -> Option<(u16, Option<u64>)> {
        let mut fault = lock(fault);
        if fault.remaining == 0 {
            return None;
        }
        fault.remaining -= 1;
        Some((fault.status, fault.retry_after))
    }

    /// The answer for `path` (the fault and latency already dealt with).
    fn route(&self, path: &str, headers: &HeaderMap) -> Response<SiteBody> {
        let pages = &self.pages;
        match path {
            "/robots.txt" => match pages.robots() {
                Some(robots) => ok("text/plain; charset=utf-8", robots),
                None => not_found(),
            },
            "/sitemap.xml" => ok("application/xml", pages.sitemap_index()),
            "/sitemap-listings.xml" => ok("application/xml", pages.sitemap_listings()),
            "/sitemap-details.xml.gz" => ok("application/gzip", pages.sitemap_details_gz()),
            "/malformed" => ok(HTML, pages::MALFORMED),
            "/latin1" => ok("text/html; charset=iso-8859-1", pages::latin1(false)),
            "/latin1-meta" => ok("text/html", pages::latin1(true)),
            "/huge" => with_body(StatusCode::OK, HTML, SiteBody::streamed(pages.huge())),
            "/file.pdf" => ok("application/pdf", pages.pdf()),
            "/garbage" => ok("text/html", pages.garbage()),
            "/loop/a" => redirect(StatusCode::FOUND, "/loop/b"),
            "/loop/b" => redirect(StatusCode::FOUND, "/loop/a"),
            "/redirect-private" => redirect(StatusCode::FOUND, "/private/secret"),
            "/slow" => ok(HTML, pages::SLOW),
            _ => self.route_pattern(path, headers),
        }
    }

    /// The answer for the paths with a parameter in them.
    fn route_pattern(&self, path: &str, headers: &HeaderMap) -> Response<SiteBody> {
        if let Some(n) = path.strip_prefix("/listings/") {
            return number(n)
                .and_then(|n| self.pages.listing_page(n))
                .map_or_else(not_found, |html| ok(HTML, html));
        }
        if let Some(id) = path.strip_prefix("/property/") {
            return number(id).map_or_else(not_found, |id| self.property(id, headers));
        }
        if let Some(id) = path.strip_prefix("/redirect/") {
            return number::<u64>(id).map_or_else(not_found, |id| {
                redirect(StatusCode::MOVED_PERMANENTLY, &format!("/property/{id}"))
            });
        }
        if path.starts_with("/private/") {
            return ok(HTML, pages::PRIVATE);
        }
        if let Some(id) = path
            .strip_prefix("/img/")
            .and_then(|rest| rest.strip_suffix(".jpg"))
        {
            return number::<u64>(id).map_or_else(not_found, |_| {
                ok("image/jpeg", Bytes::from_static(pages::JPEG))
            });
        }
        not_found()
    }

    /// `/property/{id}`, or 304 when the request's validators match.
    fn property(&self, id: u64, headers: &HeaderMap) -> Response<SiteBody> {
        if id == 0 || id > self.pages.total_details() {
            return not_found();
        }
        let version = self.version(id);
        let etag = format!("\"{id}-v{version}\"");
        let last_modified = http_date(LAST_MODIFIED_DAY + i64::from(version));
        // As RFC 9110 says: If-Modified-Since only counts without If-None-Match.
        let unchanged = match headers.get(IF_NONE_MATCH) {
            Some(value) => etag_matches(value, &etag),
            None => headers
                .get(IF_MODIFIED_SINCE)
                .is_some_and(|value| value.as_bytes() == last_modified.as_bytes()),
        };
        let mut response = if unchanged {
            empty(StatusCode::NOT_MODIFIED)
        } else {
            ok(HTML, self.pages.detail_page(id, version))
        };
        let headers = response.headers_mut();
        headers.insert(ETAG, header_value(etag));
        headers.insert(LAST_MODIFIED, header_value(last_modified));
        response
    }
}

/// Accepts connections until `shutdown`, then closes the listener and kills
/// every connection.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                // Out of file descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Small responses must not wait for the client's delayed ACK.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    // No header timeout: it would also close idle keep-alive connections,
    // racing a crawler's next request on its pooled connection.
    let _ = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<SiteBody>, Infallible> {
    let uri = request.uri();
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), PathAndQuery::as_str);
    let (seq, in_flight) = shared.log.arrive(target, request.headers());
    let path = uri.path();
    // Decided on arrival, so that "the next n requests" are the next n to
    // arrive, whatever the latency.
    let fault = if path == "/robots.txt" {
        Shared::take(&shared.robots_fault)
    } else {
        shared.take_fault()
    };
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = match fault {
        Some((status, retry_after)) => failure(status, retry_after),
        None => {
            if path == "/slow" {
                tokio::time::sleep(SLOW_DELAY).await;
            }
            shared.route(path, request.headers())
        }
    };
    shared.log.finish(seq, response.status().as_u16());
    Ok(response.map(|body| body.with_in_flight(in_flight)))
}

fn with_body(status: StatusCode, content_type: &'static str, body: SiteBody) -> Response<SiteBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn ok(content_type: &'static str, body: impl Into<Bytes>) -> Response<SiteBody> {
    with_body(StatusCode::OK, content_type, SiteBody::full(body))
}

fn empty(status: StatusCode) -> Response<SiteBody> {
    let mut response = Response::new(SiteBody::empty());
    *response.status_mut() = status;
    response
}

fn not_found() -> Response<SiteBody> {
    with_body(
        StatusCode::NOT_FOUND,
        HTML,
        SiteBody::full(pages::NOT_FOUND),
    )
}

fn redirect(status: StatusCode, location: &str) -> Response<SiteBody> {
    let mut response = empty(status);
    response
        .headers_mut()
        .insert(LOCATION, header_value(location.to_owned()));
    response
}

/// The answer of a [`Site::fail_next`] failure.
fn failure(status: u16, retry_after: Option<u64>) -> Response<SiteBody> {
    let mut response =
        empty(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A header value the site made up itself (ASCII by construction).
fn header_value(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("caudal-testkit: the site's header values are ASCII")
}

/// Whether an `If-None-Match` value names `etag` (weakly) or is `*`.
fn etag_matches(value: &HeaderValue, etag: &str) -> bool {
    value.to_str().is_ok_and(|value| {
        value.split(',').map(str::trim).any(|candidate| {
            candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
        })
    })
}

/// A path segment as a number, only in its canonical form (no sign, no
/// leading zeros), so that each page has exactly one URL.
fn number<T: FromStr>(segment: &str) -> Option<T> {
    let canonical = !segment.is_empty()
        && segment.bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.starts_with('0'));
    canonical.then(|| segment.parse().ok()).flatten()
}

/// `Wed, 01 Jan 2025 00:00:00 GMT` for `days` since 1970-01-01.
fn http_date(days: i64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} 00:00:00 GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
    )
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Locks `mutex`, ignoring poisoning: a test that panicked while holding it
/// must not turn every later assertion into a poison error.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_name_the_right_day() {
        assert_eq!(
            http_date(LAST_MODIFIED_DAY),
            "Wed, 01 Jan 2025 00:00:00 GMT"
        );
        assert_eq!(
            http_date(LAST_MODIFIED_DAY + 31),
            "Sat, 01 Feb 2025 00:00:00 GMT"
        );
        assert_eq!(
            http_date(LAST_MODIFIED_DAY + 59),
            "Sat, 01 Mar 2025 00:00:00 GMT"
        );
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn numbers_have_one_spelling() {
        assert_eq!(number::<u32>("12"), Some(12));
        assert_eq!(number::<u32>("012"), None);
        assert_eq!(number::<u32>("+1"), None);
        assert_eq!(number::<u32>(""), None);
        assert_eq!(number::<u32>("1a"), None);
    }

    #[test]
    fn etags_match_lists_and_weak_forms() {
        let etag = "\"3-v0\"";
        assert!(etag_matches(&HeaderValue::from_static("\"3-v0\""), etag));
        assert!(etag_matches(
            &HeaderValue::from_static("\"1-v0\", W/\"3-v0\""),
            etag
        ));
        assert!(etag_matches(&HeaderValue::from_static("*"), etag));
        assert!(!etag_matches(&HeaderValue::from_static("\"3-v1\""), etag));
    }
}
