//! Requests-per-second and records-per-second caps of a sink, on the
//! `governor` crate's GCRA limiter driven by tokio's clock.

use std::fmt;
use std::num::NonZeroU32;
use std::ops::Add;
use std::time::Duration;

use caudal_core::config::RateLimitConfig;
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};
use tokio::time::Instant;

/// A sink's rate limits; without any configured, [`RateLimiter::acquire`]
/// returns at once.
///
/// Each cap allows a burst of one second's worth (at least one), then
/// spaces the rest evenly.
#[derive(Debug)]
pub struct RateLimiter {
    requests: Option<Cap>,
    records: Option<Cap>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            requests: config.requests_per_second.and_then(Cap::new),
            records: config.records_per_second.and_then(Cap::new),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> Self {
        Self {
            requests: None,
            records: None,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.records.is_none()
    }

    /// Waits until one request carrying `records` records may be sent.
    /// More records than one second's burst are taken a burst at a time,
    /// so a large batch waits its share instead of never fitting.
    pub async fn acquire(&self, records: u32) {
        if let Some(requests) = &self.requests {
            requests.take(NonZeroU32::MIN).await;
        }
        if let Some(cap) = &self.records {
            let mut left = records;
            while let Some(n) = NonZeroU32::new(left.min(cap.burst.get())) {
                cap.take(n).await;
                left -= n.get();
            }
        }
    }
}

/// One cap: a GCRA limiter and its burst size.
struct Cap {
    limiter: Gcra<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>,
    burst: NonZeroU32,
}

impl fmt::Debug for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cap").field("burst", &self.burst).finish()
    }
}

impl Cap {
    /// A cap of `per_second` cells per second; `None` when that is no cap
    /// at all (not a positive number, or too fast to measure).
    fn new(per_second: f64) -> Option<Self> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        let period = Duration::try_from_secs_f64(1.0 / per_second).ok()?;
        // One second's worth, at least 1; the float-to-int cast saturates.
        let burst = NonZeroU32::new(per_second.floor() as u32).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Self {
            limiter: Gcra::direct_with_clock(quota, TokioClock),
            burst,
        })
    }

    /// Waits until `n` cells (at most the burst) conform, and takes them.
    async fn take(&self, n: NonZeroU32) {
        loop {
            match self.limiter.check_n(n) {
                Ok(Ok(())) => return,
                Ok(Err(not_until)) => {
                    tokio::time::sleep_until(not_until.earliest_possible().0).await;
                }
                // More than the burst can never conform; callers cap `n`,
                // so this is unreachable, and waiting forever is worse.
                Err(_) => return,
            }
        }
    }
}

/// governor's view of tokio's clock, so `tokio::time::pause()` drives the
/// limiter in tests.
#[derive(Clone, Copy, Debug, Default)]
struct TokioClock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TokioInstant(Instant);

impl Add<Nanos> for TokioInstant {
    type Output = Self;

    fn add(self, other: Nanos) -> Self {
        Self(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        self.0
            .checked_sub(duration.into())
            .map_or(*self, TokioInstant)
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: Option<f64>, records: Option<f64>) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            requests_per_second: requests,
            records_per_second: records,
        })
    }

    /// Calls `acquire(records)` `times` times; returns the time taken.
    async fn elapsed(limiter: &RateLimiter, times: u32, records: u32) -> Duration {
        let start = Instant::now();
        for _ in 0..times {
            limiter.acquire(records).await;
        }
        Instant::now() - start
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let l = limiter(None, None);
        assert!(l.is_unlimited());
        assert_eq!(elapsed(&l, 1000, 1_000_000).await, Duration::ZERO);
        assert!(RateLimiter::unlimited().is_unlimited());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_second_after_a_burst() {
        let l = limiter(Some(10.0), None);
        assert!(!l.is_unlimited());
        // The first second's 10 go at once, then one every 100ms.
        assert_eq!(elapsed(&l, 10, 1).await, Duration::ZERO);
        assert_eq!(elapsed(&l, 5, 1).await, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rates_space_requests_out() {
        let l = limiter(Some(0.5), None);
        assert_eq!(elapsed(&l, 1, 0).await, Duration::ZERO);
        assert_eq!(elapsed(&l, 2, 0).await, Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn records_per_second_counts_records() {
        let l = limiter(None, Some(100.0));
        assert_eq!(elapsed(&l, 1, 100).await, Duration::ZERO);
        // 50 more records take half a second.
        assert_eq!(elapsed(&l, 1, 50).await, Duration::from_millis(500));
        assert_eq!(elapsed(&l, 10, 0).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_burst_waits_its_share() {
        let l = limiter(None, Some(100.0));
        // 1000 records at 100/s: the first 100 at once, the rest over 9s.
        assert_eq!(elapsed(&l, 1, 1000).await, Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn both_caps_apply() {
        let l = limiter(Some(1.0), Some(1000.0));
        assert_eq!(elapsed(&l, 3, 10).await, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_cap() {
        let l = std::sync::Arc::new(limiter(Some(10.0), None));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = std::sync::Arc::clone(&l);
                tokio::spawn(async move {
                    for _ in 0..10 {
                        l.acquire(1).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        // 40 requests: 10 at once, 30 more at 100ms each.
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[test]
    fn caps_that_are_no_caps() {
        assert!(Cap::new(0.0).is_none());
        assert!(Cap::new(-1.0).is_none());
        assert!(Cap::new(f64::NAN).is_none());
        assert!(Cap::new(f64::INFINITY).is_none());
        assert_eq!(Cap::new(0.2).map(|c| c.burst.get()), Some(1));
        assert_eq!(Cap::new(1e6).map(|c| c.burst.get()), Some(1_000_000));
        assert!(Cap::new(1e12).is_none(), "too fast to measure");
    }
}
