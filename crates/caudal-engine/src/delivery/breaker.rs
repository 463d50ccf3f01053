//! A circuit breaker per sink.
//!
//! Closed: requests flow and their outcomes fill a rolling window. When the
//! window holds at least `min_requests` and the share of temporary failures
//! reaches `failure_ratio`, the breaker opens. Open: nothing is sent until
//! `open_for` has passed. Half-open: up to `half_open_probes` requests at
//! once test the receiver; the first answer decides: a success closes the
//! breaker with an empty window, a failure opens it again.
//!
//! Only temporary failures (5xx, 429, timeouts, connection errors) count
//! against the receiver; a rejection proves it is up and counts as a
//! success here.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use caudal_core::config::CircuitBreakerConfig;
use caudal_core::delivery::Outcome;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The rolling window is kept as this many buckets of `window / BUCKETS`
/// each, so its memory does not grow with the request rate.
const BUCKETS: u32 = 10;

/// A breaker's state, for status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Nothing is sent until `until`.
    Open { until: Instant },
    /// Probe requests test the receiver.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Why a request may not be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerOpen {
    /// When the breaker starts probing; `None` while half-open with every
    /// probe slot taken (wait for a probe's answer).
    pub until: Option<Instant>,
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.until {
            Some(until) => write!(
                f,
                "circuit breaker open for another {:?}",
                until.saturating_duration_since(Instant::now())
            ),
            None => f.write_str("circuit breaker half-open: waiting for a probe's answer"),
        }
    }
}

impl std::error::Error for BreakerOpen {}

/// A circuit breaker; clones share one state. A breaker built from a
/// configuration with `enabled = false` lets everything through.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    failure_ratio: f64,
    min_requests: u32,
    window: Duration,
    bucket: Duration,
    open_for: Duration,
    probes: u32,
    state: Mutex<Inner>,
    /// Woken when a half-open probe ends.
    probe_ended: Notify,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every change of phase that makes outstanding permits
    /// meaningless, so a late answer from an earlier phase is ignored.
    generation: u64,
    buckets: VecDeque<Bucket>,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

#[derive(Debug)]
struct Bucket {
    start: Instant,
    total: u32,
    failures: u32,
}

/// Leave to send one request. Report its outcome with
/// [`BreakerPermit::record`]; dropping it unreported (a cancelled send)
/// counts as nothing and frees a half-open probe slot.
#[derive(Debug)]
#[must_use = "report the request's outcome with `record`"]
pub struct BreakerPermit {
    shared: Option<Arc<Shared>>,
    generation: u64,
    probe: bool,
}

impl CircuitBreaker {
    pub fn new(config: &CircuitBreakerConfig) -> Self {
        if !config.enabled {
            return Self { shared: None };
        }
        let window = config.window.as_std().max(Duration::from_millis(1));
        let ratio = config.failure_ratio;
        Self {
            shared: Some(Arc::new(Shared {
                failure_ratio: if ratio > 0.0 && ratio <= 1.0 {
                    ratio
                } else {
                    1.0
                },
                min_requests: config.min_requests.max(1),
                window,
                bucket: (window / BUCKETS).max(Duration::from_millis(1)),
                open_for: config.open_for.as_std(),
                probes: config.half_open_probes.max(1),
                state: Mutex::new(Inner {
                    phase: Phase::Closed,
                    generation: 0,
                    buckets: VecDeque::new(),
                }),
                probe_ended: Notify::new(),
            })),
        }
    }

    /// A breaker that never opens.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Leave to send now, or why not.
    pub fn try_acquire(&self) -> Result<BreakerPermit, BreakerOpen> {
        let Some(shared) = &self.shared else {
            return Ok(BreakerPermit {
                shared: None,
                generation: 0,
                probe: false,
            });
        };
        let mut inner = shared.lock();
        let now = Instant::now();
        let probe = match inner.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => {
                return Err(BreakerOpen { until: Some(until) });
            }
            Phase::Open { .. } => {
                inner.phase = Phase::HalfOpen {
                    probes_in_flight: 1,
                };
                true
            }
            Phase::HalfOpen { probes_in_flight } if probes_in_flight < shared.probes => {
                inner.phase = Phase::HalfOpen {
                    probes_in_flight: probes_in_flight + 1,
                };
                true
            }
            Phase::HalfOpen { .. } => return Err(BreakerOpen { until: None }),
        };
        Ok(BreakerPermit {
            shared: Some(Arc::clone(shared)),
            generation: inner.generation,
            probe,
        })
    }

    /// Waits until a request may be sent: while open, until `open_for` has
    /// passed; while half-open with every probe out, until one answers.
    pub async fn acquire(&self) -> BreakerPermit {
        loop {
            let ended = self.shared.as_ref().map(|s| s.probe_ended.notified());
            let mut ended = std::pin::pin!(ended);
            if let Some(ended) = ended.as_mut().as_pin_mut() {
                // Registered before checking, so a probe ending in between
                // is not missed.
                ended.enable();
            }
            match self.try_acquire() {
                Ok(permit) => return permit,
                Err(BreakerOpen { until: Some(until) }) => tokio::time::sleep_until(until).await,
                Err(BreakerOpen { until: None }) => {
                    if let Some(ended) = ended.as_pin_mut() {
                        ended.await;
                    }
                }
            }
        }
    }

    /// The current state. An open breaker whose `open_for` has passed shows
    /// as half-open: the next request is a probe.
    pub fn state(&self) -> BreakerState {
        let Some(shared) = &self.shared else {
            return BreakerState::Closed;
        };
        match shared.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() < until => BreakerState::Open { until },
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Requests and failures in the current window (zero unless closed).
    pub fn window_counts(&self) -> (u32, u32) {
        let Some(shared) = &self.shared else {
            return (0, 0);
        };
        let mut inner = shared.lock();
        inner.prune(Instant::now(), shared.window);
        inner.counts()
    }
}

impl BreakerPermit {
    /// Reports the request's outcome.
    pub fn record(mut self, outcome: Outcome) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut inner = shared.lock();
        if inner.generation != self.generation {
            // The breaker changed phase since this request was let through.
            return;
        }
        let now = Instant::now();
        match inner.phase {
            Phase::Closed => {
                inner.prune(now, shared.window);
                inner.add(now, shared.bucket, outcome.is_failure());
                let (total, failures) = inner.counts();
                if outcome.is_failure()
                    && total >= shared.min_requests
                    && f64::from(failures) >= shared.failure_ratio * f64::from(total)
                {
                    inner.open(now + shared.open_for);
                }
            }
            Phase::HalfOpen { .. } if self.probe => {
                if outcome.is_failure() {
                    inner.open(now + shared.open_for);
                } else {
                    inner.phase = Phase::Closed;
                    inner.generation += 1;
                    inner.buckets.clear();
                }
                drop(inner);
                shared.probe_ended.notify_waiters();
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if !self.probe {
            return;
        }
        let mut inner = shared.lock();
        if inner.generation != self.generation {
            return;
        }
        if let Phase::HalfOpen { probes_in_flight } = inner.phase {
            inner.phase = Phase::HalfOpen {
                probes_in_flight: probes_in_flight.saturating_sub(1),
            };
            drop(inner);
            shared.probe_ended.notify_waiters();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent at every unlock; a panic elsewhere
        // while holding it must not stop deliveries.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn open(&mut self, until: Instant) {
        self.phase = Phase::Open { until };
        self.generation += 1;
        self.buckets.clear();
    }

    /// Drops buckets that started a whole window ago.
    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .buckets
            .front()
            .is_some_and(|b| now.duration_since(b.start) >= window)
        {
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, now: Instant, width: Duration, failure: bool) {
        let fits = self
            .buckets
            .back()
            .is_some_and(|b| now.duration_since(b.start) < width);
        if !fits {
            self.buckets.push_back(Bucket {
                start: now,
                total: 0,
                failures: 0,
            });
        }
        if let Some(current) = self.buckets.back_mut() {
            current.total = current.total.saturating_add(1);
            if failure {
                current.failures = current.failures.saturating_add(1);
            }
        }
    }

    fn counts(&self) -> (u32, u32) {
        self.buckets.iter().fold((0u32, 0u32), |(t, f), b| {
            (t.saturating_add(b.total), f.saturating_add(b.failures))
        })
    }
}

#[cfg(test)]
mod tests {
    use caudal_core::units::Duration as ConfigDuration;

    use super::*;

    fn breaker(min_requests: u32, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(&CircuitBreakerConfig {
            enabled: true,
            failure_ratio: 0.5,
            min_requests,
            window: ConfigDuration::from_secs(10),
            open_for: ConfigDuration::from_secs(30),
            half_open_probes: probes,
        })
    }

    fn send(b: &CircuitBreaker, outcome: Outcome) {
        b.try_acquire().expect("closed").record(outcome);
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_failure_ratio_once_enough_requests_were_seen() {
        let b = breaker(4, 1);
        send(&b, Outcome::Failure);
        send(&b, Outcome::Overloaded);
        send(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed, "only 3 requests seen");
        assert_eq!(b.window_counts(), (3, 3));
        send(&b, Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed, "a success never opens it");
        send(&b, Outcome::Failure);
        let opened = Instant::now();
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: opened + secs(30)
            }
        );
        assert_eq!(b.state().as_str(), "open");
        let refused = b.try_acquire().expect_err("open");
        assert_eq!(refused.until, Some(opened + secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_are_not_failures() {
        let b = breaker(2, 1);
        for _ in 0..20 {
            send(&b, Outcome::Rejected);
        }
        send(&b, Outcome::Failure);
        send(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let b = breaker(4, 1);
        for _ in 0..3 {
            send(&b, Outcome::Failure);
        }
        tokio::time::advance(secs(11)).await;
        send(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.window_counts(), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_success_closes() {
        let b = breaker(1, 1);
        send(&b, Outcome::Failure);
        assert_eq!(b.state().as_str(), "open");
        tokio::time::advance(secs(29)).await;
        assert!(b.try_acquire().is_err());
        tokio::time::advance(secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.try_acquire().expect("a probe");
        assert_eq!(b.try_acquire().expect_err("one probe").until, None);
        probe.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.window_counts(), (0, 0), "the window starts empty");
        send(&b, Outcome::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_failure_opens_again() {
        let b = breaker(1, 2);
        send(&b, Outcome::Failure);
        tokio::time::advance(secs(30)).await;
        let first = b.try_acquire().expect("probe 1");
        let second = b.try_acquire().expect("probe 2");
        assert!(b.try_acquire().is_err(), "two probes at most");
        first.record(Outcome::Failure);
        let reopened = Instant::now();
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: reopened + secs(30)
            }
        );
        // The other probe's late answer changes nothing.
        second.record(Outcome::Success);
        assert_eq!(b.state().as_str(), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_from_before_opening_are_ignored() {
        let b = breaker(1, 1);
        let late = b.try_acquire().expect("closed");
        send(&b, Outcome::Failure);
        tokio::time::advance(secs(30)).await;
        let probe = b.try_acquire().expect("probe");
        late.record(Outcome::Success);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "the late answer is no probe"
        );
        probe.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_slot() {
        let b = breaker(1, 1);
        send(&b, Outcome::Failure);
        tokio::time::advance(secs(30)).await;
        drop(b.try_acquire().expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire()
            .expect("another probe")
            .record(Outcome::Rejected);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_out_the_open_time_and_for_probes() {
        let b = breaker(1, 1);
        send(&b, Outcome::Failure);
        let start = Instant::now();
        let probe = b.acquire().await;
        assert_eq!(Instant::now() - start, secs(30));

        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let permit = b.acquire().await;
                permit.record(Outcome::Success);
                Instant::now()
            }
        });
        tokio::time::advance(secs(5)).await;
        assert!(!waiter.is_finished(), "the probe slot is taken");
        probe.record(Outcome::Success);
        let resumed = waiter.await.expect("waiter");
        assert_eq!(resumed - start, secs(35));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_opens() {
        let b = CircuitBreaker::new(&CircuitBreakerConfig {
            enabled: false,
            ..CircuitBreakerConfig::default()
        });
        for _ in 0..100 {
            send(&b, Outcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.state().as_str(), "closed");
        let _ = b.acquire().await;
    }
}
