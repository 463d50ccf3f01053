//! Per-site manners, shared by everything in the process that talks to a
//! site: every crawl (pipeline source or workflow task) and every command
//! task that names its `site`.
//!
//! Promises:
//! - **Concurrency.** At most the site's `concurrency` permits are out at
//!   once ([`Site::acquire`]), whoever holds them.
//! - **Spacing.** Two permits of one site start at least the site's current
//!   delay apart: each permit reserves its start time under the site's
//!   lock, so waiters never race for the same moment. The delay is the
//!   configured one, raised by robots.txt's `Crawl-delay`, raised further
//!   by the adaptive throttle; it is never below the configured delay.
//! - **Throttle.** With `adaptive`, the delay follows the site's latency
//!   (latency ÷ concurrency, smoothed, as Scrapy's AutoThrottle) and
//!   doubles on 429/503; a `Retry-After` blocks the whole site until it has
//!   passed; `failures` failed requests in a row back the site off for
//!   `max_delay`. A permit already reserved re-checks the block before it
//!   starts.
//! - One registry per process ([`shared`]); `[crawl]` is applied to it by
//!   [`Sites::configure`] when a configuration is loaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use caudal_core::config::{CrawlSettings, SiteLimits};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::robots::RobotsCache;

/// Longest `Retry-After` honoured.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);
/// Seconds of history kept for the per-minute rate.
const RATE_WINDOW: usize = 60;

/// The process's sites.
#[derive(Debug)]
pub struct Sites {
    settings: RwLock<Arc<CrawlSettings>>,
    sites: Mutex<HashMap<String, Arc<Site>>>,
    client: RwLock<reqwest::Client>,
}

/// The registry every crawl and command task of this process shares.
pub fn shared() -> &'static Sites {
    static SHARED: OnceLock<Sites> = OnceLock::new();
    SHARED.get_or_init(|| Sites::new(&CrawlSettings::default()))
}

impl Sites {
    /// A registry with `settings` (tests make their own; the process uses
    /// [`shared`]).
    pub fn new(settings: &CrawlSettings) -> Self {
        Self {
            settings: RwLock::new(Arc::new(settings.clone())),
            sites: Mutex::new(HashMap::new()),
            client: RwLock::new(build_client(settings)),
        }
    }

    /// Applies `[crawl]`: the User-Agent, timeouts and each site's limits
    /// (sites already known take their new limits at once).
    pub fn configure(&self, settings: &CrawlSettings) {
        let changed = **read(&self.settings) != *settings;
        if !changed {
            return;
        }
        *write(&self.settings) = Arc::new(settings.clone());
        *write(&self.client) = build_client(settings);
        for (host, site) in lock(&self.sites).iter() {
            site.set_limits(settings.site(host));
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<CrawlSettings> {
        read(&self.settings).clone()
    }

    /// The HTTP client every crawl request goes through (connections are
    /// pooled per site).
    pub fn client(&self) -> reqwest::Client {
        read(&self.client).clone()
    }

    /// The site of `host` (`name` or `name:port`), created on first use.
    pub fn site(&self, host: &str) -> Arc<Site> {
        let host = host.to_ascii_lowercase();
        let mut sites = lock(&self.sites);
        if let Some(site) = sites.get(&host) {
            return site.clone();
        }
        let limits = read(&self.settings).site(&host);
        let site = Arc::new(Site::new(&host, limits));
        sites.insert(host, site.clone());
        site
    }

    /// Every site used so far, with its figures, by host.
    pub fn snapshot(&self) -> Vec<SiteStats> {
        let sites: Vec<Arc<Site>> = lock(&self.sites).values().cloned().collect();
        let mut out: Vec<SiteStats> = sites.iter().map(|s| s.stats()).collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }
}

fn build_client(settings: &CrawlSettings) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(settings.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.timeout.as_std())
        .connect_timeout(settings.timeout.as_std().min(Duration::from_secs(10)))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot build the crawler's HTTP client with its settings; using defaults");
            reqwest::Client::new()
        })
}

/// One site: its limits, its throttle state and its robots.txt.
#[derive(Debug)]
pub struct Site {
    host: String,
    permits: Arc<Semaphore>,
    state: Mutex<SiteState>,
    pub(crate) robots: RobotsCache,
}

#[derive(Debug)]
struct SiteState {
    limits: SiteLimits,
    /// Permits the semaphore was given (to follow a changed concurrency).
    granted: u32,
    /// Permits to forget when they come back (a lowered concurrency).
    owed: u32,
    /// robots.txt's `Crawl-delay`, once read.
    crawl_delay: Option<Duration>,
    /// The adaptive delay (never below the floor).
    delay: Duration,
    /// When the next permit may start at the earliest.
    next_start: Instant,
    /// When the last permit started.
    last_start: Option<Instant>,
    /// No permit starts before this (a `Retry-After`, a back-off).
    blocked_until: Option<Instant>,
    failures_in_row: u32,
    in_flight: u32,
    requests: u64,
    succeeded: u64,
    failed: u64,
    throttled: u64,
    bytes: u64,
    /// Smoothed latency to the response head, in seconds.
    latency: f64,
    /// Requests ended per second over the last minute.
    ring: [u32; RATE_WINDOW],
    ring_at: u64,
    born: Instant,
}

/// How a request to a site went, for its throttle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// An answer (any status but 429/503 and 5xx) after `latency`.
    Answered { latency: Duration, bytes: u64 },
    /// 429 or 503, maybe with a `Retry-After`.
    Throttled { retry_after: Option<Duration> },
    /// A 5xx, a network error or a timeout.
    Failed,
    /// The permit was held by something else than a request (a command
    /// task that ran) and ended.
    Released,
}

/// A site's figures.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SiteStats {
    pub host: String,
    pub concurrency: u32,
    pub in_flight: u32,
    /// The delay now in force between request starts, in seconds.
    pub delay_seconds: f64,
    /// Seconds until the site may be asked again (a `Retry-After`, a
    /// back-off), 0 when it may.
    pub blocked_seconds: f64,
    pub requests: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub throttled: u64,
    pub bytes: u64,
    /// Smoothed latency to the response head, in seconds.
    pub latency_seconds: f64,
    /// Requests ended in the last 60 seconds.
    pub per_minute: u64,
}

impl Site {
    fn new(host: &str, limits: SiteLimits) -> Self {
        let now = Instant::now();
        Self {
            host: host.to_string(),
            permits: Arc::new(Semaphore::new(limits.concurrency as usize)),
            state: Mutex::new(SiteState {
                limits,
                granted: limits.concurrency,
                owed: 0,
                crawl_delay: None,
                delay: limits.delay,
                next_start: now,
                last_start: None,
                blocked_until: None,
                failures_in_row: 0,
                in_flight: 0,
                requests: 0,
                succeeded: 0,
                failed: 0,
                throttled: 0,
                bytes: 0,
                latency: 0.0,
                ring: [0; RATE_WINDOW],
                ring_at: 0,
                born: now,
            }),
            robots: RobotsCache::default(),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The site's limits now.
    pub fn limits(&self) -> SiteLimits {
        lock(&self.state).limits
    }

    fn set_limits(&self, limits: SiteLimits) {
        let mut st = lock(&self.state);
        if limits.concurrency > st.granted {
            self.permits
                .add_permits((limits.concurrency - st.granted) as usize);
        } else if limits.concurrency < st.granted {
            // Permits in use are forgotten as they come back.
            let fewer = st.granted - limits.concurrency;
            let forgotten =
                u32::try_from(self.permits.forget_permits(fewer as usize)).unwrap_or(fewer);
            st.owed += fewer.saturating_sub(forgotten);
        }
        st.granted = limits.concurrency;
        st.limits = limits;
        st.delay = st.delay.max(st.floor()).min(st.ceiling());
    }

    /// Reserves the next start time (after any block) and returns it.
    fn reserve(&self) -> Instant {
        let mut st = lock(&self.state);
        let mut start = st.next_start.max(Instant::now());
        if let Some(b) = st.blocked_until {
            start = start.max(b);
        }
        st.next_start = start + st.delay;
        start
    }

    /// Records robots.txt's `Crawl-delay` (it raises the delay's floor).
    pub fn set_crawl_delay(&self, delay: Option<Duration>) {
        let mut st = lock(&self.state);
        st.crawl_delay = delay;
        st.delay = st.delay.max(st.floor());
    }

    /// Waits for a concurrency slot and for the site's next start time,
    /// then returns the permit (held until dropped or finished).
    pub async fn acquire(self: &Arc<Self>) -> SitePermit {
        // The semaphore is never closed.
        let permit = self.permits.clone().acquire_owned().await.ok();
        let mut wake = self.reserve();
        loop {
            tokio::time::sleep_until(wake.into()).await;
            let mut st = lock(&self.state);
            let now = Instant::now();
            // A Retry-After or back-off that came while this permit waited
            // for its reserved time sends it to wait again.
            if st.blocked_until.is_some_and(|b| b > now) {
                drop(st);
                wake = self.reserve();
                continue;
            }
            // The permit before may have started a little late (a busy
            // machine): this one waits out the rest of the delay after it,
            // keeping its turn, rather than start closer.
            if let Some(last) = st.last_start
                && now < last + st.delay
            {
                wake = last + st.delay;
                continue;
            }
            st.last_start = Some(now);
            st.next_start = st.next_start.max(now + st.delay);
            st.in_flight += 1;
            st.requests += 1;
            break;
        }
        metrics::gauge!("caudal_crawl_in_flight", "site" => self.host.clone()).increment(1.0);
        SitePermit {
            site: self.clone(),
            _permit: permit,
            done: false,
        }
    }

    fn finish(&self, outcome: Outcome) {
        let mut st = lock(&self.state);
        st.in_flight = st.in_flight.saturating_sub(1);
        st.tick();
        let now = Instant::now();
        let label = match outcome {
            Outcome::Answered { latency, bytes } => {
                st.succeeded += 1;
                st.bytes += bytes;
                st.failures_in_row = 0;
                let secs = latency.as_secs_f64();
                st.latency = if st.latency == 0.0 {
                    secs
                } else {
                    0.8 * st.latency + 0.2 * secs
                };
                if st.limits.adaptive {
                    // AutoThrottle: aim at `concurrency` requests in flight
                    // at the site's own pace; never below the floor.
                    let target = Duration::from_secs_f64(secs / f64::from(st.limits.concurrency));
                    let next = (st.delay + target) / 2;
                    st.delay = next.max(st.floor()).min(st.ceiling());
                }
                metrics::counter!("caudal_crawl_bytes_total", "site" => self.host.clone())
                    .increment(bytes);
                metrics::histogram!("caudal_crawl_latency_seconds", "site" => self.host.clone())
                    .record(secs);
                "answered"
            }
            Outcome::Throttled { retry_after } => {
                st.throttled += 1;
                if st.limits.adaptive {
                    let doubled = (st.delay * 2).max(Duration::from_millis(100));
                    st.delay = doubled.max(st.floor()).min(st.ceiling());
                }
                if let Some(after) = retry_after {
                    let until = now + after.min(RETRY_AFTER_CAP);
                    st.blocked_until = Some(st.blocked_until.map_or(until, |b| b.max(until)));
                }
                "throttled"
            }
            Outcome::Failed => {
                st.failed += 1;
                st.failures_in_row += 1;
                if st.failures_in_row >= st.limits.failures {
                    let until = now + st.limits.max_delay;
                    st.blocked_until = Some(st.blocked_until.map_or(until, |b| b.max(until)));
                    st.failures_in_row = 0;
                    tracing::warn!(site = %self.host, pause_s = st.limits.max_delay.as_secs(), "site keeps failing; backing off");
                }
                "failed"
            }
            Outcome::Released => "released",
        };
        metrics::counter!("caudal_crawl_requests_total", "site" => self.host.clone(), "outcome" => label)
            .increment(1);
        metrics::gauge!("caudal_crawl_delay_seconds", "site" => self.host.clone())
            .set(st.delay.as_secs_f64());
        metrics::gauge!("caudal_crawl_in_flight", "site" => self.host.clone()).decrement(1.0);
    }

    /// The site's figures now.
    pub fn stats(&self) -> SiteStats {
        let mut st = lock(&self.state);
        st.tick();
        let now = Instant::now();
        SiteStats {
            host: self.host.clone(),
            concurrency: st.limits.concurrency,
            in_flight: st.in_flight,
            delay_seconds: st.delay.as_secs_f64(),
            blocked_seconds: st
                .blocked_until
                .map_or(0.0, |b| b.saturating_duration_since(now).as_secs_f64()),
            requests: st.requests,
            succeeded: st.succeeded,
            failed: st.failed,
            throttled: st.throttled,
            bytes: st.bytes,
            latency_seconds: st.latency,
            per_minute: st.ring.iter().map(|n| u64::from(*n)).sum(),
        }
    }
}

impl SiteState {
    /// The least delay: the configured one or robots.txt's, the larger.
    fn floor(&self) -> Duration {
        self.limits
            .delay
            .max(self.crawl_delay.unwrap_or(Duration::ZERO))
    }

    /// The most the throttle raises the delay to (never below the floor).
    fn ceiling(&self) -> Duration {
        self.limits.max_delay.max(self.floor())
    }

    /// Moves the per-second ring to now, clearing the seconds passed.
    fn tick(&mut self) {
        let second = self.born.elapsed().as_secs();
        let gap = second.saturating_sub(self.ring_at);
        for i in 1..=gap.min(RATE_WINDOW as u64) {
            let slot = usize::try_from((self.ring_at + i) % RATE_WINDOW as u64).unwrap_or(0);
            self.ring[slot] = 0;
        }
        self.ring_at = second;
    }

    fn count_one(&mut self) {
        let slot = usize::try_from(self.ring_at % RATE_WINDOW as u64).unwrap_or(0);
        self.ring[slot] += 1;
    }
}

/// A site's slot, held while a request (or a command task) runs.
#[derive(Debug)]
pub struct SitePermit {
    site: Arc<Site>,
    _permit: Option<OwnedSemaphorePermit>,
    done: bool,
}

impl SitePermit {
    /// Ends the permit and tells the site's throttle how it went.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.give_back();
        self.site.finish(outcome);
        if !matches!(outcome, Outcome::Released) {
            lock(&self.site.state).count_one();
        }
    }

    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }
}

impl SitePermit {
    /// Returns the slot, or forgets it when the site owes one.
    fn give_back(&mut self) {
        let Some(permit) = self._permit.take() else {
            return;
        };
        let mut st = lock(&self.site.state);
        if st.owed > 0 {
            st.owed -= 1;
            permit.forget();
        }
    }
}

impl Drop for SitePermit {
    fn drop(&mut self) {
        if !self.done {
            self.give_back();
            self.site.finish(Outcome::Released);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(concurrency: u32, delay_ms: u64) -> SiteLimits {
        SiteLimits {
            concurrency,
            delay: Duration::from_millis(delay_ms),
            robots: false,
            adaptive: false,
            max_delay: Duration::from_secs(60),
            failures: 3,
        }
    }

    #[tokio::test]
    async fn permits_start_a_delay_apart_and_never_exceed_the_concurrency() {
        let site = Arc::new(Site::new("a.example", limits(2, 50)));
        let started = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (site, started) = (site.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                let p = site.acquire().await;
                let in_flight = site.stats().in_flight;
                lock(&started).push((Instant::now(), in_flight));
                tokio::time::sleep(Duration::from_millis(120)).await;
                p.finish(Outcome::Answered {
                    latency: Duration::from_millis(1),
                    bytes: 1,
                });
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let mut starts = lock(&started).clone();
        starts.sort_by_key(|s| s.0);
        for pair in starts.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= Duration::from_millis(49), "gap {gap:?}");
        }
        assert!(starts.iter().all(|s| s.1 <= 2), "{starts:?}");
        assert_eq!(site.stats().requests, 6);
    }

    #[tokio::test]
    async fn retry_after_blocks_the_site_and_failures_back_it_off() {
        let site = Arc::new(Site::new("b.example", limits(4, 0)));
        site.acquire().await.finish(Outcome::Throttled {
            retry_after: Some(Duration::from_millis(300)),
        });
        let t0 = Instant::now();
        site.acquire().await.finish(Outcome::Released);
        assert!(
            t0.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t0.elapsed()
        );
        let mut l = limits(4, 0);
        l.max_delay = Duration::from_millis(200);
        site.set_limits(l);
        for _ in 0..3 {
            site.acquire().await.finish(Outcome::Failed);
        }
        assert!(site.stats().blocked_seconds > 0.1);
    }

    #[tokio::test]
    async fn a_lowered_concurrency_holds_for_permits_already_out() {
        let site = Arc::new(Site::new("d.example", limits(3, 0)));
        let held: Vec<SitePermit> = vec![
            site.acquire().await,
            site.acquire().await,
            site.acquire().await,
        ];
        site.set_limits(limits(1, 0));
        drop(held);
        let one = site.acquire().await;
        let second = tokio::time::timeout(Duration::from_millis(100), site.acquire()).await;
        assert!(second.is_err(), "a second permit with concurrency 1");
        drop(one);
    }

    #[test]
    fn adaptive_delay_follows_latency_and_never_drops_below_the_floor() {
        let site = Site::new(
            "c.example",
            SiteLimits {
                adaptive: true,
                ..limits(2, 100)
            },
        );
        for _ in 0..20 {
            lock(&site.state).in_flight += 1;
            site.finish(Outcome::Answered {
                latency: Duration::from_secs(2),
                bytes: 0,
            });
        }
        let slow = site.stats().delay_seconds;
        assert!(slow > 0.9 && slow <= 1.0, "{slow}");
        for _ in 0..40 {
            lock(&site.state).in_flight += 1;
            site.finish(Outcome::Answered {
                latency: Duration::from_millis(1),
                bytes: 0,
            });
        }
        let fast = site.stats().delay_seconds;
        assert!((fast - 0.1).abs() < 0.01, "{fast}");
    }
}
