//! robots.txt, fetched once per site and kept.
//!
//! Promises (RFC 9309):
//! - fetched through the site's permits like any page (it counts against
//!   the site's concurrency and delay), with the configured User-Agent;
//! - a 2xx file is obeyed for the configured agent (`Allow`/`Disallow`
//!   with wildcards, `Crawl-delay`); a 4xx answer means no rules; up to
//!   five redirects are followed; a 5xx or 429 answer or an unreachable
//!   site means nothing is fetched from it until robots.txt is asked again,
//!   a minute later (or after its `Retry-After`): pages wait and are tried
//!   again, they are not skipped;
//! - at most 512 KiB of it is read;
//! - a parsed file is kept for a day; one fetch at a time per site (the
//!   others wait for its answer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::sites::{Outcome, Site, Sites};

/// How long a fetched robots.txt is kept.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// How soon a robots.txt that could not be fetched is asked again.
const RETRY: Duration = Duration::from_secs(60);
/// The largest robots.txt read (Google reads 500 KiB).
const MAX_ROBOTS_BYTES: usize = 512 << 10;

/// What a site's robots.txt allows.
#[derive(Debug)]
pub enum Rules {
    /// No file (4xx), or robots.txt is not obeyed for this site.
    AllowAll,
    /// The site could not be asked (5xx, 429, network): nothing is fetched
    /// until `until`, when robots.txt is asked again.
    Unreachable { why: String, until: Instant },
    /// The file's rules for our agent.
    Parsed(Box<texting_robots::Robot>),
}

/// Why a URL may not be fetched now.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// robots.txt disallows it.
    Disallowed,
    /// robots.txt could not be read; ask again after the wait.
    Unreachable { why: String, wait: Duration },
}

impl Rules {
    /// Whether `url` may be fetched.
    pub fn check(&self, url: &str) -> Result<(), Refusal> {
        match self {
            Self::AllowAll => Ok(()),
            Self::Unreachable { why, until } => Err(Refusal::Unreachable {
                why: why.clone(),
                wait: until.saturating_duration_since(Instant::now()),
            }),
            Self::Parsed(robot) => {
                if robot.allowed(url) {
                    Ok(())
                } else {
                    Err(Refusal::Disallowed)
                }
            }
        }
    }
}

/// A site's robots.txt, once fetched.
#[derive(Debug, Default)]
pub struct RobotsCache(Mutex<Option<(Arc<Rules>, Instant)>>);

impl RobotsCache {
    /// The rules of `site` for `scheme://host`, fetched when missing or
    /// stale.
    pub async fn rules(&self, sites: &Sites, site: &Arc<Site>, origin: &str) -> Arc<Rules> {
        let mut slot = self.0.lock().await;
        if let Some((rules, until)) = slot.as_ref()
            && *until > Instant::now()
        {
            return rules.clone();
        }
        let (rules, keep) = fetch(sites, site, origin).await;
        if let Rules::Parsed(robot) = &rules {
            site.set_crawl_delay(
                robot
                    .delay
                    .filter(|d| d.is_finite() && *d > 0.0)
                    .map(|d| Duration::from_secs_f64(f64::from(d).min(3600.0))),
            );
        }
        let rules = Arc::new(rules);
        *slot = Some((rules.clone(), Instant::now() + keep));
        rules
    }
}

/// Redirects of robots.txt followed (RFC 9309 asks for at least five).
const MAX_ROBOTS_REDIRECTS: usize = 5;

fn unreachable(why: String, wait: Duration) -> (Rules, Duration) {
    (
        Rules::Unreachable {
            why,
            until: Instant::now() + wait,
        },
        wait,
    )
}

async fn fetch(sites: &Sites, site: &Arc<Site>, origin: &str) -> (Rules, Duration) {
    let mut url = format!("{origin}/robots.txt");
    for _ in 0..=MAX_ROBOTS_REDIRECTS {
        let permit = site.acquire().await;
        let started = Instant::now();
        let response = match sites.client().get(&url).send().await {
            Ok(r) => r,
            Err(e) => {
                permit.finish(Outcome::Failed);
                return unreachable(format!("robots.txt could not be fetched: {e}"), RETRY);
            }
        };
        let status = response.status();
        let latency = started.elapsed();
        if status.is_redirection() {
            permit.finish(Outcome::Answered { latency, bytes: 0 });
            let next = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url::Url::parse(&url).ok()?.join(l).ok());
            match next {
                Some(next) => {
                    url = next.to_string();
                    continue;
                }
                // A redirect to nowhere: no file to obey.
                None => return (Rules::AllowAll, KEEP),
            }
        }
        if status.as_u16() == 429 || status.is_server_error() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::sinks::http::parse_retry_after(v, jiff::Timestamp::now()));
            if status.as_u16() == 429 || status.as_u16() == 503 {
                permit.finish(Outcome::Throttled { retry_after });
            } else {
                permit.finish(Outcome::Failed);
            }
            return unreachable(
                format!("robots.txt answered {status}; the site is not crawled until it answers"),
                retry_after.unwrap_or(RETRY),
            );
        }
        if !status.is_success() {
            permit.finish(Outcome::Answered { latency, bytes: 0 });
            return (Rules::AllowAll, KEEP);
        }
        // Read no more than the limit, whatever the site sends.
        let mut body = Vec::new();
        let mut response = response;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ROBOTS_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= MAX_ROBOTS_BYTES {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    permit.finish(Outcome::Failed);
                    return unreachable(format!("robots.txt unreadable: {e}"), RETRY);
                }
            }
        }
        permit.finish(Outcome::Answered {
            latency,
            bytes: body.len() as u64,
        });
        let agent = sites.settings().user_agent.clone();
        // The product token is what robots.txt groups name.
        let token = agent.split(['/', ' ']).next().unwrap_or(&agent).to_string();
        return match texting_robots::Robot::new(&token, &body) {
            Ok(robot) => (Rules::Parsed(Box::new(robot)), KEEP),
            // An unparsable file states no rule we can read.
            Err(_) => (Rules::AllowAll, KEEP),
        };
    }
    // Too many redirects: RFC 9309 treats it as no file.
    (Rules::AllowAll, KEEP)
}
