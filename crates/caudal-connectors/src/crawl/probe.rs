//! `caudal doctor`'s look at a crawl source.
//!
//! Promises:
//! - It asks each start URL and sitemap (the first [`MAX_PROBED`]) what the
//!   crawl would ask first, and no more: the site's robots.txt when it is
//!   obeyed, then one `HEAD` request, under the site's limits and with the
//!   configured User-Agent. It reads no page body and follows no link.
//! - A URL robots.txt disallows, a robots.txt that cannot be read (the
//!   crawl would wait on it), a site that does not answer and a 4xx/5xx
//!   answer are failures, each with what to do.

use std::time::{Duration, Instant};

use caudal_core::config::{CrawlSettings, CrawlSourceConfig};
use caudal_core::probe::Finding;
use url::Url;

use super::extract::host_of;
use super::robots::Refusal;
use super::sites::{Outcome, Sites};

/// URLs asked at most per source.
pub const MAX_PROBED: usize = 5;

/// Probes `source` as a crawl under `settings` (`[crawl]`) would start it;
/// each URL's checks within `timeout` (a site's delay included).
pub async fn probe(
    settings: &CrawlSettings,
    source: &CrawlSourceConfig,
    timeout: Duration,
) -> Vec<Finding> {
    let sites = Sites::new(settings);
    let urls: Vec<&String> = source
        .start_urls
        .iter()
        .chain(&source.sitemaps)
        .take(MAX_PROBED)
        .collect();
    if urls.is_empty() {
        return vec![Finding::skipped(
            "start",
            "the start URLs come from `start_urls_file`, read when the crawl runs",
        )];
    }
    let mut out = Vec::new();
    for raw in urls {
        out.push(
            tokio::time::timeout(timeout, probe_url(&sites, raw))
                .await
                .unwrap_or_else(|_| {
                    Finding::fail(
                        "start",
                        format!("{raw}: no answer within {timeout:?} (robots.txt or the page)"),
                        "check that the site is reachable from here, and its robots.txt \
                         Crawl-delay",
                    )
                }),
        );
    }
    out
}

async fn probe_url(sites: &Sites, raw: &str) -> Finding {
    let check = "start";
    let Some((url, host)) = Url::parse(raw)
        .ok()
        .and_then(|u| host_of(&u).map(|h| (u, h)))
    else {
        return Finding::fail(
            check,
            format!("{raw} is not an absolute http(s) URL"),
            "correct the URL in `start_urls` or `sitemaps`",
        );
    };
    let site = sites.site(&host);
    let robots = site.limits().robots;
    if robots {
        let origin = url.origin().ascii_serialization();
        let rules = site.robots.rules(sites, &site, &origin).await;
        match rules.check(url.as_str()) {
            Ok(()) => {}
            Err(Refusal::Disallowed) => {
                return Finding::fail(
                    check,
                    format!("{url}: {host}'s robots.txt disallows it for our User-Agent"),
                    format!(
                        "start from URLs robots.txt allows; `robots = false` under \
                         [crawl.sites.\"{host}\"] only with the site's permission"
                    ),
                );
            }
            Err(Refusal::Unreachable { why, .. }) => {
                return Finding::fail(
                    check,
                    format!("{url}: {why}; the crawl fetches nothing from {host} until it can"),
                    format!("check that {host} is reachable from here and answers robots.txt"),
                );
            }
        }
    }
    let permit = site.acquire().await;
    let started = Instant::now();
    let answer = sites.client().head(url.clone()).send().await;
    let latency = started.elapsed();
    let obeyed = if robots {
        "robots.txt allows it"
    } else {
        "robots.txt not obeyed for this site"
    };
    match answer {
        Err(e) => {
            permit.finish(Outcome::Failed);
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            Finding::fail(
                check,
                format!(
                    "{url}: the request {what}: {}",
                    crate::sinks::http::error_chain(&e.without_url())
                ),
                format!("check that {host} is reachable from here (DNS, firewall, proxy)"),
            )
        }
        Ok(r) => {
            let status = r.status();
            let code = status.as_u16();
            if code == 429 || code == 503 || status.is_server_error() {
                permit.finish(Outcome::Failed);
                Finding::fail(
                    check,
                    format!("{url} answers {status}"),
                    format!("the site is failing or throttling: try later, or ask {host}"),
                )
            } else {
                permit.finish(Outcome::Answered { latency, bytes: 0 });
                // A site may refuse HEAD (405, 501): the crawl's GET is
                // still answered.
                if status.is_client_error() && code != 405 && code != 501 {
                    Finding::fail(
                        check,
                        format!("{url} answers {status}"),
                        "correct the URL in `start_urls` or `sitemaps`",
                    )
                } else {
                    Finding::ok(check, format!("{url} answers {status}; {obeyed}"))
                }
            }
        }
    }
}
