//! How many requests a sink keeps in flight: a fixed number, or an
//! adaptive limit (AIMD) that finds what the receiver copes with.
//!
//! Adaptive: the limit starts at `min`. After a round of successes (as
//! many as the current limit) it grows by one, up to `max`. On 429 or 503,
//! or when a response takes more than twice the smoothed latency, it halves
//! (not below `min`). Responses to requests sent before a cut do not cut
//! again, so a burst of 429s from one round halves the limit once.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use caudal_core::config::ConcurrencyConfig;
use caudal_core::delivery::Outcome;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Smoothing of the latency baseline: each response moves it this share of
/// the way.
const EWMA_WEIGHT: f64 = 0.2;
/// A response slower than this many times the baseline counts as a sign of
/// overload.
const LATENCY_RISE_FACTOR: f64 = 2.0;
/// ... but only when it is also this much slower: on a fast network,
/// doubling a millisecond is noise.
const LATENCY_NOISE_FLOOR: Duration = Duration::from_millis(10);

/// A concurrency limit; clones share it.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    semaphore: Arc<Semaphore>,
    /// `None` for a fixed limit.
    adaptive: Option<Mutex<Aimd>>,
    fixed: u32,
}

#[derive(Debug)]
struct Aimd {
    min: u32,
    max: u32,
    limit: u32,
    /// Permits to retire as they come back, after a cut found them in
    /// flight.
    debt: u32,
    /// Successes since the last change of the limit.
    successes: u32,
    /// Smoothed latency in seconds; `None` until the first response.
    baseline: Option<f64>,
    /// Bumped at every cut.
    generation: u64,
}

/// Leave to have one request in flight. Report how it went with
/// [`ConcurrencyPermit::done`]; dropping it just frees the slot.
#[derive(Debug)]
#[must_use = "report the request's outcome with `done`"]
pub struct ConcurrencyPermit {
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
    generation: u64,
}

impl ConcurrencyLimit {
    pub fn new(config: &ConcurrencyConfig) -> Self {
        let (initial, adaptive, fixed) = match *config {
            ConcurrencyConfig::Fixed(n) => (n.max(1), None, n.max(1)),
            ConcurrencyConfig::Adaptive { min, max } => {
                let min = min.max(1);
                let aimd = Aimd {
                    min,
                    max: max.max(min),
                    limit: min,
                    debt: 0,
                    successes: 0,
                    baseline: None,
                    generation: 0,
                };
                (min, Some(Mutex::new(aimd)), 0)
            }
        };
        Self {
            shared: Arc::new(Shared {
                semaphore: Arc::new(Semaphore::new(initial as usize)),
                adaptive,
                fixed,
            }),
        }
    }

    /// Waits for a free slot (first come, first served).
    pub async fn acquire(&self) -> ConcurrencyPermit {
        let permit = Arc::clone(&self.shared.semaphore)
            .acquire_owned()
            .await
            .ok();
        // The semaphore is never closed, so `permit` is always `Some`.
        let generation = self.shared.aimd().map_or(0, |aimd| aimd.generation);
        ConcurrencyPermit {
            shared: Arc::clone(&self.shared),
            permit,
            generation,
        }
    }

    /// The current limit.
    pub fn current(&self) -> u32 {
        self.shared
            .aimd()
            .map_or(self.shared.fixed, |aimd| aimd.limit)
    }

    /// Requests in flight now (may briefly exceed [`Self::current`] right
    /// after a cut).
    pub fn in_flight(&self) -> u32 {
        let available = u32::try_from(self.shared.semaphore.available_permits()).unwrap_or(0);
        let capacity = self
            .shared
            .aimd()
            .map_or(self.shared.fixed, |aimd| aimd.limit + aimd.debt);
        capacity.saturating_sub(available)
    }

    pub fn is_adaptive(&self) -> bool {
        self.shared.adaptive.is_some()
    }
}

impl ConcurrencyPermit {
    /// Reports how the request went and frees its slot. `latency` is the
    /// time from sending to the answer.
    pub fn done(self, outcome: Outcome, latency: Duration) {
        if let Some(mut aimd) = self.shared.aimd() {
            aimd.observe(outcome, latency, self.generation, &self.shared.semaphore);
        }
        // Dropping `self` frees the slot.
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        if let Some(mut aimd) = self.shared.aimd()
            && aimd.debt > 0
        {
            aimd.debt -= 1;
            permit.forget();
        }
        // Otherwise `permit` drops here and returns to the semaphore.
    }
}

impl Shared {
    fn aimd(&self) -> Option<MutexGuard<'_, Aimd>> {
        self.adaptive
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Aimd {
    fn observe(&mut self, outcome: Outcome, latency: Duration, generation: u64, sem: &Semaphore) {
        let current_round = generation == self.generation;
        match outcome {
            Outcome::Overloaded => {
                if current_round {
                    self.cut(sem);
                }
            }
            Outcome::Failure => self.successes = 0,
            Outcome::Success | Outcome::Rejected => {
                let secs = latency.as_secs_f64();
                let slow = self.baseline.is_some_and(|base| {
                    secs > LATENCY_RISE_FACTOR * base
                        && secs - base > LATENCY_NOISE_FLOOR.as_secs_f64()
                });
                self.baseline = Some(match self.baseline {
                    None => secs,
                    Some(base) => base + EWMA_WEIGHT * (secs - base),
                });
                if slow {
                    if current_round {
                        self.cut(sem);
                    }
                } else {
                    self.successes += 1;
                    if self.successes >= self.limit {
                        self.successes = 0;
                        self.grow(sem);
                    }
                }
            }
        }
    }

    /// Multiplicative decrease: halve, not below `min`.
    fn cut(&mut self, sem: &Semaphore) {
        self.generation += 1;
        self.successes = 0;
        let target = (self.limit / 2).max(self.min);
        let excess = self.limit - target;
        self.limit = target;
        self.debt += excess;
        // Retire free slots now; the rest as requests in flight end.
        while self.debt > 0 {
            match sem.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    self.debt -= 1;
                }
                Err(_) => break,
            }
        }
    }

    /// Additive increase: one more, up to `max`.
    fn grow(&mut self, sem: &Semaphore) {
        if self.limit >= self.max {
            return;
        }
        self.limit += 1;
        if self.debt > 0 {
            self.debt -= 1;
        } else {
            sem.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    fn adaptive(min: u32, max: u32) -> ConcurrencyLimit {
        ConcurrencyLimit::new(&ConcurrencyConfig::Adaptive { min, max })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends `n` requests one after another, each answered with `outcome`
    /// after `latency`.
    async fn round(limit: &ConcurrencyLimit, n: u32, outcome: Outcome, latency: Duration) {
        for _ in 0..n {
            limit.acquire().await.done(outcome, latency);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_allows_exactly_n_in_flight() {
        let limit = ConcurrencyLimit::new(&ConcurrencyConfig::Fixed(2));
        assert!(!limit.is_adaptive());
        let a = limit.acquire().await;
        let b = limit.acquire().await;
        assert_eq!(limit.in_flight(), 2);
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move {
                let permit = limit.acquire().await;
                let at = Instant::now();
                drop(permit);
                at
            }
        });
        tokio::time::sleep(ms(100)).await;
        assert!(!waiter.is_finished());
        a.done(Outcome::Overloaded, ms(5000));
        let at = waiter.await.expect("waiter");
        assert_eq!(at.elapsed(), Duration::ZERO);
        assert_eq!(limit.current(), 2, "a fixed limit never changes");
        drop(b);
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_starts_at_min_and_grows_by_one_per_round() {
        let limit = adaptive(1, 4);
        assert!(limit.is_adaptive());
        assert_eq!(limit.current(), 1);
        round(&limit, 1, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 2);
        round(&limit, 2, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 3);
        round(&limit, 3, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 4);
        round(&limit, 40, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 4, "never above max");
        // The slots really exist: four requests in flight at once.
        let permits = [
            limit.acquire().await,
            limit.acquire().await,
            limit.acquire().await,
            limit.acquire().await,
        ];
        assert_eq!(limit.in_flight(), 4);
        drop(permits);
    }

    #[tokio::test(start_paused = true)]
    async fn overload_halves_once_per_round_and_not_below_min() {
        let limit = adaptive(2, 32);
        for n in 2..=15 {
            round(&limit, n, Outcome::Success, ms(50)).await;
        }
        assert_eq!(limit.current(), 16);
        // Sixteen requests in flight all come back 429: one halving.
        let mut permits = Vec::new();
        for _ in 0..16 {
            permits.push(limit.acquire().await);
        }
        for permit in permits {
            permit.done(Outcome::Overloaded, ms(50));
        }
        assert_eq!(limit.current(), 8);
        assert_eq!(limit.in_flight(), 0, "retired slots are not in flight");
        // Each new round of 503s halves again, down to min.
        for expected in [4, 2, 2] {
            round(&limit, 1, Outcome::Overloaded, ms(50)).await;
            assert_eq!(limit.current(), expected);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_with_requests_in_flight_retires_slots_as_they_return() {
        let limit = adaptive(1, 8);
        for n in 1..=3 {
            round(&limit, n, Outcome::Success, ms(50)).await;
        }
        assert_eq!(limit.current(), 4);
        let held: Vec<_> = [
            limit.acquire().await,
            limit.acquire().await,
            limit.acquire().await,
        ]
        .into();
        // A fourth request is answered 429 while three are still out.
        limit.acquire().await.done(Outcome::Overloaded, ms(50));
        assert_eq!(limit.current(), 2);
        assert_eq!(limit.in_flight(), 3, "above the limit until they return");
        let blocked = tokio::spawn({
            let limit = limit.clone();
            async move { drop(limit.acquire().await) }
        });
        drop(held);
        tokio::time::sleep(ms(1)).await;
        assert!(blocked.is_finished());
        assert_eq!(limit.in_flight(), 0);
        // Exactly two slots remain.
        let a = limit.acquire().await;
        let _b = limit.acquire().await;
        let third = tokio::time::timeout(ms(100), limit.acquire()).await;
        assert!(third.is_err(), "only two slots");
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_spike_cuts_and_steady_latency_grows() {
        let limit = adaptive(1, 16);
        for n in 1..=7 {
            round(&limit, n, Outcome::Success, ms(100)).await;
        }
        assert_eq!(limit.current(), 8);
        // 150ms is within twice the baseline: still growing.
        round(&limit, 8, Outcome::Success, ms(150)).await;
        assert_eq!(limit.current(), 9);
        // 500ms is far above it: halve.
        round(&limit, 1, Outcome::Success, ms(500)).await;
        assert_eq!(limit.current(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn tiny_latencies_are_noise() {
        let limit = adaptive(1, 16);
        round(&limit, 1, Outcome::Success, ms(1)).await;
        assert_eq!(limit.current(), 2);
        round(&limit, 2, Outcome::Success, ms(5)).await;
        assert_eq!(limit.current(), 3, "5ms after 1ms is no overload");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_reset_the_round_without_cutting() {
        let limit = adaptive(1, 16);
        round(&limit, 1, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 2);
        round(&limit, 1, Outcome::Success, ms(50)).await;
        round(&limit, 1, Outcome::Failure, ms(50)).await;
        round(&limit, 1, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 2, "the failure restarted the round");
        round(&limit, 1, Outcome::Success, ms(50)).await;
        assert_eq!(limit.current(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_permit_frees_its_slot() {
        let limit = adaptive(1, 1);
        drop(limit.acquire().await);
        let _permit = limit.acquire().await;
        assert_eq!(limit.in_flight(), 1);
    }
}
