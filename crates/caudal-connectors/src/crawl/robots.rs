//! robots.txt, fetched once per site and kept.
//!
//! Promises (RFC 9309):
//! - fetched through the site's permits like any page (it counts against
//!   the site's concurrency and delay), with the configured User-Agent;
//! - a 2xx file is obeyed for the configured agent (`Allow`/`Disallow`
//!   with wildcards, `Crawl-delay`); a 4xx answer means no rules; a 5xx
//!   answer or an unreachable site means "disallow everything" until it is
//!   asked again, a minute later;
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
    /// The site could not be asked (5xx, network): nothing is fetched.
    DisallowAll(String),
    /// The file's rules for our agent.
    Parsed(Box<texting_robots::Robot>),
}

impl Rules {
    /// Whether `url` may be fetched; the reason when not.
    pub fn check(&self, url: &str) -> Result<(), String> {
        match self {
            Self::AllowAll => Ok(()),
            Self::DisallowAll(why) => Err(why.clone()),
            Self::Parsed(robot) => {
                if robot.allowed(url) {
                    Ok(())
                } else {
                    Err("disallowed by robots.txt".into())
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

async fn fetch(sites: &Sites, site: &Arc<Site>, origin: &str) -> (Rules, Duration) {
    let url = format!("{origin}/robots.txt");
    let permit = site.acquire().await;
    let started = Instant::now();
    let response = sites.client().get(&url).send().await;
    match response {
        Ok(r) if r.status().is_success() => {
            let latency = started.elapsed();
            let body = match r.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    permit.finish(Outcome::Failed);
                    return (
                        Rules::DisallowAll(format!("robots.txt unreadable: {e}")),
                        RETRY,
                    );
                }
            };
            permit.finish(Outcome::Answered {
                latency,
                bytes: body.len() as u64,
            });
            let body = &body[..body.len().min(MAX_ROBOTS_BYTES)];
            let agent = sites.settings().user_agent.clone();
            // The product token is what robots.txt groups name.
            let token = agent.split(['/', ' ']).next().unwrap_or(&agent).to_string();
            match texting_robots::Robot::new(&token, body) {
                Ok(robot) => (Rules::Parsed(Box::new(robot)), KEEP),
                // An unparsable file states no rule we can read.
                Err(_) => (Rules::AllowAll, KEEP),
            }
        }
        Ok(r) if r.status().is_client_error() => {
            permit.finish(Outcome::Answered {
                latency: started.elapsed(),
                bytes: 0,
            });
            (Rules::AllowAll, KEEP)
        }
        Ok(r) => {
            let status = r.status().as_u16();
            permit.finish(Outcome::Failed);
            (
                Rules::DisallowAll(format!(
                    "robots.txt answered {status}; the site is not crawled until it answers"
                )),
                RETRY,
            )
        }
        Err(e) => {
            permit.finish(Outcome::Failed);
            (
                Rules::DisallowAll(format!("robots.txt could not be fetched: {e}")),
                RETRY,
            )
        }
    }
}
