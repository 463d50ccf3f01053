//! One page fetched politely: robots.txt checked, a site permit held for
//! the request, redirects followed by hand (each target checked against
//! its own site's robots.txt and limits), the body read up to a limit.
//!
//! Promises:
//! - No request is sent to a URL its site's robots.txt disallows (when the
//!   site obeys robots), a redirect target included.
//! - Every request holds a permit of its site from before it is sent until
//!   its body is read (or it fails), and tells the site's throttle how it
//!   went.
//! - A body larger than `max_body` is not read past the limit; the page
//!   fails with that reason.
//! - A redirect loop, or more than `max_redirects` redirects, fails the
//!   page with the chain as its reason.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use url::Url;

use caudal_core::delivery::{StatusClass, StatusClasses};

use super::extract::{host_of, normalize_url};
use super::robots::Refusal;
use super::sites::{Outcome, Sites};

/// Conditional request validators from the page's last fetch.
#[derive(Clone, Debug, Default)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// A page's answer.
#[derive(Debug)]
pub struct Fetched {
    /// Where the body came from (after redirects).
    pub url: Url,
    pub status: u16,
    pub content_type: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub body: Bytes,
}

/// How fetching a page ended.
#[derive(Debug)]
pub enum FetchOutcome {
    /// A 2xx answer with its body.
    Page(Fetched),
    /// 304: unchanged since the validators.
    NotModified { status: u16 },
    /// robots.txt forbids the page (or a redirect target).
    Disallowed(String),
    /// The page redirects to a URL the crawl already knows (it is fetched
    /// as itself, once).
    Duplicate(String),
    /// A failure. `retryable` for timeouts, network errors, 5xx and 429.
    Failed {
        status: Option<u16>,
        error: String,
        retryable: bool,
        retry_after: Option<Duration>,
    },
}

/// Fetches `url`. `known` is asked about each redirect target: `true`
/// when the crawl already has that URL (the redirect is then not
/// followed); it should remember the targets it is asked about.
pub async fn fetch(
    sites: &Sites,
    url: &Url,
    validators: &Validators,
    known: &(dyn Fn(&str) -> bool + Send + Sync),
) -> FetchOutcome {
    let settings = sites.settings();
    let max_body = usize::try_from(settings.max_body.0).unwrap_or(usize::MAX);
    let mut current = url.clone();
    let mut chain: Vec<String> = vec![url.to_string()];
    for hop in 0..=settings.max_redirects {
        let Some(host) = host_of(&current) else {
            return failed(None, format!("{current} has no host"), false);
        };
        let site = sites.site(&host);
        if site.limits().robots {
            let origin = current.origin().ascii_serialization();
            let rules = site.robots.rules(sites, &site, &origin).await;
            match rules.check(current.as_str()) {
                Ok(()) => {}
                Err(Refusal::Disallowed) => {
                    let why = "disallowed by robots.txt";
                    return FetchOutcome::Disallowed(if hop == 0 {
                        why.to_string()
                    } else {
                        format!("redirected to {current}, which is {why}")
                    });
                }
                // Not the page's fault: it waits for robots.txt and is
                // tried again.
                Err(Refusal::Unreachable { why, wait }) => {
                    return FetchOutcome::Failed {
                        status: None,
                        error: why,
                        retryable: true,
                        retry_after: Some(wait),
                    };
                }
            }
        }
        let permit = site.acquire().await;
        let started = Instant::now();
        let mut request = sites.client().get(current.clone());
        if hop == 0 {
            if let Some(etag) = &validators.etag {
                request = request.header(reqwest::header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = &validators.last_modified {
                request = request.header(reqwest::header::IF_MODIFIED_SINCE, lm);
            }
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                permit.finish(Outcome::Failed);
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                return failed(
                    None,
                    format!("request {what}: {}", crate::sinks::http::error_chain(&e)),
                    true,
                );
            }
        };
        let latency = started.elapsed();
        let status = response.status();
        let header = |name: reqwest::header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if status.is_redirection() && status.as_u16() != 304 {
            permit.finish(Outcome::Answered { latency, bytes: 0 });
            let Some(location) = header(reqwest::header::LOCATION) else {
                return failed(
                    Some(status.as_u16()),
                    format!("{status} without a Location"),
                    false,
                );
            };
            let Some(next) = current
                .join(&location)
                .ok()
                .and_then(normalize_url)
                .and_then(|u| Url::parse(&u).ok())
            else {
                return failed(
                    Some(status.as_u16()),
                    format!("redirected to {location:?}, which is not an http(s) URL"),
                    false,
                );
            };
            if chain.iter().any(|c| c == next.as_str()) {
                chain.push(next.to_string());
                return failed(
                    Some(status.as_u16()),
                    format!("redirect loop: {}", chain.join(" → ")),
                    false,
                );
            }
            if known(next.as_str()) {
                return FetchOutcome::Duplicate(next.to_string());
            }
            chain.push(next.to_string());
            current = next;
            continue;
        }
        match status.as_u16() {
            304 => {
                permit.finish(Outcome::Answered { latency, bytes: 0 });
                return FetchOutcome::NotModified { status: 304 };
            }
            429 | 503 => {
                let retry_after = header(reqwest::header::RETRY_AFTER).and_then(|v| {
                    crate::sinks::http::parse_retry_after(&v, jiff::Timestamp::now())
                });
                permit.finish(Outcome::Throttled { retry_after });
                return FetchOutcome::Failed {
                    status: Some(status.as_u16()),
                    error: format!("the site answered {status}"),
                    retryable: true,
                    retry_after,
                };
            }
            s if !status.is_success() => {
                // The delivery contract's reading of a status: 408 and 5xx
                // (not 501) are worth another try, the rest is final.
                let retryable = StatusClasses::default().classify(s) == StatusClass::Retry;
                permit.finish(if s >= 500 {
                    Outcome::Failed
                } else {
                    Outcome::Answered { latency, bytes: 0 }
                });
                return failed(Some(s), format!("the site answered {status}"), retryable);
            }
            _ => {}
        }
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        if let Some(len) = response.content_length()
            && len > max_body as u64
        {
            permit.finish(Outcome::Answered { latency, bytes: 0 });
            return failed(
                Some(status.as_u16()),
                format!(
                    "body of {len} bytes is larger than max_body ({})",
                    settings.max_body
                ),
                false,
            );
        }
        let mut body = BytesMut::new();
        let mut response = response;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max_body {
                        permit.finish(Outcome::Answered {
                            latency,
                            bytes: body.len() as u64,
                        });
                        return failed(
                            Some(status.as_u16()),
                            format!("body is larger than max_body ({})", settings.max_body),
                            false,
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    permit.finish(Outcome::Failed);
                    return failed(
                        Some(status.as_u16()),
                        format!(
                            "reading the body failed: {}",
                            crate::sinks::http::error_chain(&e)
                        ),
                        true,
                    );
                }
            }
        }
        permit.finish(Outcome::Answered {
            latency,
            bytes: body.len() as u64,
        });
        return FetchOutcome::Page(Fetched {
            url: current,
            status: status.as_u16(),
            content_type,
            etag,
            last_modified,
            body: body.freeze(),
        });
    }
    failed(
        None,
        format!(
            "more than {} redirects: {}",
            settings.max_redirects,
            chain.join(" → ")
        ),
        false,
    )
}

fn failed(status: Option<u16>, error: String, retryable: bool) -> FetchOutcome {
    FetchOutcome::Failed {
        status,
        error,
        retryable,
        retry_after: None,
    }
}
