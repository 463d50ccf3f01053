//! The access log of the fixture [`Site`](super::Site): one [`Access`] per
//! request, and the in-flight gauge behind
//! [`Site::max_in_flight`](super::Site::max_in_flight).
//!
//! A request is logged the moment it arrives (with status 0) and completed
//! when its response head is ready, so a request a client gave up on still
//! shows in the log: politeness tests see every request that reached the
//! server, answered or not.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::http::HeaderMap;
use axum::http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, USER_AGENT};
use serde_json::json;

/// One request the site received, as [`Site::log`](super::Site::log) reports
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The request target as sent: path and `?query` (`/listings/1?x=2`).
    pub path: String,
    /// The `User-Agent` header, when sent as valid text.
    pub user_agent: Option<String>,
    /// The `If-None-Match` header, when sent.
    pub if_none_match: Option<String>,
    /// The `If-Modified-Since` header, when sent.
    pub if_modified_since: Option<String>,
    /// When the request head arrived, before any latency.
    pub started: Instant,
    /// When the response head was ready to be written; equal to
    /// [`started`](Self::started) while the request is still being handled
    /// or when the client went away before the answer.
    pub finished: Instant,
    /// The status answered; 0 while the request is still being handled or
    /// when the client went away before the answer.
    pub status: u16,
}

/// Counts of what the site answered, for the benchmark's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSummary {
    /// Requests received (all paths).
    pub requests: usize,
    /// See [`Site::max_in_flight`](super::Site::max_in_flight).
    pub max_in_flight: usize,
    /// Requests per answered status (0: not answered).
    pub by_status: BTreeMap<u16, usize>,
    /// Requests for a target (path and query) already requested before,
    /// `/robots.txt` excepted: fetches a polite crawler should not make.
    pub duplicates: usize,
}

impl SiteSummary {
    /// `{"requests": n, "max_in_flight": m, "by_status": {"200": …}, "duplicates": d}`.
    pub fn to_json(&self) -> serde_json::Value {
        let by_status: serde_json::Map<String, serde_json::Value> = self
            .by_status
            .iter()
            .map(|(status, count)| (status.to_string(), json!(count)))
            .collect();
        json!({
            "requests": self.requests,
            "max_in_flight": self.max_in_flight,
            "by_status": by_status,
            "duplicates": self.duplicates,
        })
    }
}

/// The log and the in-flight gauge of one site.
pub(crate) struct AccessLog {
    state: Mutex<LogState>,
    gauge: Arc<Gauge>,
}

struct LogState {
    next_seq: u64,
    /// Sequence numbers identify entries across [`AccessLog::reset`].
    entries: Vec<(u64, Access)>,
}

#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// Marks one request as in flight until dropped.
pub(crate) struct InFlight(Arc<Gauge>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AccessLog {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(LogState {
                next_seq: 0,
                entries: Vec::new(),
            }),
            gauge: Arc::default(),
        }
    }

    /// Logs a request that just arrived; returns its sequence number for
    /// [`finish`](Self::finish) and its in-flight mark.
    pub(crate) fn arrive(&self, target: &str, headers: &HeaderMap) -> (u64, InFlight) {
        let now = self.gauge.now.fetch_add(1, Ordering::AcqRel) + 1;
        self.gauge.max.fetch_max(now, Ordering::AcqRel);
        let in_flight = InFlight(Arc::clone(&self.gauge));

        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (path, user_agent) = (target.to_owned(), header(USER_AGENT));
        let (if_none_match, if_modified_since) = (header(IF_NONE_MATCH), header(IF_MODIFIED_SINCE));
        let mut state = self.lock();
        // Taken under the lock, so that the log's order is the start order.
        let started = Instant::now();
        let access = Access {
            path,
            user_agent,
            if_none_match,
            if_modified_since,
            started,
            finished: started,
            status: 0,
        };
        let seq = state.next_seq;
        state.next_seq += 1;
        state.entries.push((seq, access));
        (seq, in_flight)
    }

    /// Records the status of request `seq`, whose response head is ready.
    pub(crate) fn finish(&self, seq: u64, status: u16) {
        let finished = Instant::now();
        let mut state = self.lock();
        // Requests in flight are near the end; a reset may have dropped it.
        if let Some((_, access)) = state.entries.iter_mut().rev().find(|(s, _)| *s == seq) {
            access.finished = finished;
            access.status = status;
        }
    }

    pub(crate) fn entries(&self) -> Vec<Access> {
        self.lock().entries.iter().map(|(_, a)| a.clone()).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub(crate) fn hits(&self, target: &str) -> usize {
        self.lock()
            .entries
            .iter()
            .filter(|(_, a)| a.path == target)
            .count()
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.gauge.max.load(Ordering::Acquire)
    }

    /// Forgets every entry and restarts the maximum from the requests in
    /// flight now.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.entries.clear();
        self.gauge
            .max
            .store(self.gauge.now.load(Ordering::Acquire), Ordering::Release);
    }

    pub(crate) fn summary(&self) -> SiteSummary {
        let state = self.lock();
        let mut by_status = BTreeMap::new();
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        for (_, access) in &state.entries {
            *by_status.entry(access.status).or_insert(0) += 1;
            if access.path != "/robots.txt" && !seen.insert(access.path.as_str()) {
                duplicates += 1;
            }
        }
        SiteSummary {
            requests: state.entries.len(),
            max_in_flight: self.max_in_flight(),
            by_status,
            duplicates,
        }
    }

    /// Writes one JSON object per entry: `{"path", "ua", "started_ms",
    /// "finished_ms", "status"}`, times in milliseconds since `origin`.
    pub(crate) fn write_json_lines(&self, origin: Instant, out: &mut dyn Write) -> io::Result<()> {
        let entries = self.entries();
        let ms = |at: Instant| {
            let ms = at.saturating_duration_since(origin).as_secs_f64() * 1000.0;
            (ms * 1000.0).round() / 1000.0
        };
        for access in &entries {
            let line = json!({
                "path": access.path,
                "ua": access.user_agent,
                "started_ms": ms(access.started),
                "finished_ms": ms(access.finished),
                "status": access.status,
            });
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
