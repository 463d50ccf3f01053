//! Backoff between attempts: exponential with full jitter, bounded, and
//! respectful of `Retry-After`.

use std::num::NonZeroU32;
use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// The longest `Retry-After` honoured when the sink's `max_delay` is
/// shorter: a receiver asking for a day's pause gets an hour, then is asked
/// again.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// A sink's retry rules, resolved from its `retry` configuration.
///
/// Attempts are counted from 1 (the first send). The wait before retry
/// `n` (`n` = 0 before the second attempt) is uniform in
/// `[0, min(max_delay, initial × multiplier^n)]`: "full jitter", which
/// spreads retries of many batches and many senders so they do not hit a
/// recovering receiver in step.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    multiplier: f64,
    max_delay: Duration,
    max_attempts: Option<NonZeroU32>,
    give_up_after: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::from_config(&RetryConfig::default())
    }
}

impl RetryPolicy {
    /// Resolves the configuration. Values that validation refuses are made
    /// safe rather than trusted: a multiplier below 1 (or not a number)
    /// becomes 1, and `max_delay` is never below `initial`.
    pub fn from_config(config: &RetryConfig) -> Self {
        let initial = config.initial.as_std();
        let multiplier = if config.multiplier.is_finite() && config.multiplier >= 1.0 {
            config.multiplier
        } else {
            1.0
        };
        let give_up_after = config.give_up_after.as_std();
        Self {
            initial,
            multiplier,
            max_delay: config.max_delay.as_std().max(initial),
            max_attempts: NonZeroU32::new(config.max_attempts),
            give_up_after: (!give_up_after.is_zero()).then_some(give_up_after),
        }
    }

    /// The longest wait before retry `retry` (0 before the second
    /// attempt): `min(max_delay, initial × multiplier^retry)`. Never
    /// decreases as `retry` grows.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let max = self.max_delay.as_secs_f64();
        // exp(n·ln m) rather than powi: it stays monotone in n even for a
        // multiplier a hair above 1.
        let grown = self.initial.as_secs_f64() * (f64::from(retry) * self.multiplier.ln()).exp();
        if grown.is_finite() && grown < max {
            Duration::try_from_secs_f64(grown).unwrap_or(self.max_delay)
        } else {
            self.max_delay
        }
    }

    /// The longest `Retry-After` honoured: `max(max_delay, 1h)`.
    pub fn retry_after_cap(&self) -> Duration {
        self.max_delay.max(RETRY_AFTER_CAP)
    }

    /// How long to wait before retry `retry` (0 before the second
    /// attempt): a uniform draw from `[0, ceiling(retry)]`, but at least
    /// `retry_after` (what the receiver asked for, capped by
    /// [`Self::retry_after_cap`]).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(rng.random_range(0..=ceiling));
        match retry_after {
            Some(after) => jittered.max(after.min(self.retry_after_cap())),
            None => jittered,
        }
    }

    /// Whether a batch that has failed `attempts` times (counting the first
    /// send), the first of them `since_first_attempt` ago, should stop
    /// being retried and go to dead letters.
    pub fn should_give_up(&self, attempts: u32, since_first_attempt: Duration) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max.get())
            || self
                .give_up_after
                .is_some_and(|limit| since_first_attempt >= limit)
    }

    /// The most attempts of one batch, or `None` for no limit.
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts.map(NonZeroU32::get)
    }

    /// How long after its first attempt a batch is given up, or `None`
    /// for never.
    pub fn give_up_after(&self) -> Option<Duration> {
        self.give_up_after
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::units::Duration as ConfigDuration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(initial_ms: u64, multiplier: f64, max_ms: u64) -> RetryPolicy {
        RetryPolicy::from_config(&RetryConfig {
            initial: ConfigDuration::from_millis(initial_ms),
            multiplier,
            max_delay: ConfigDuration::from_millis(max_ms),
            ..RetryConfig::default()
        })
    }

    #[test]
    fn ceilings_grow_then_stop_at_max_delay() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(0), ms(500));
        assert_eq!(p.ceiling(1), ms(1000));
        assert_eq!(p.ceiling(2), ms(2000));
        assert_eq!(p.ceiling(6), ms(32_000));
        assert_eq!(p.ceiling(7), ms(60_000));
        assert_eq!(p.ceiling(u32::MAX), ms(60_000));
    }

    #[test]
    fn a_multiplier_of_one_keeps_the_ceiling() {
        let p = policy(250, 1.0, 10_000);
        assert_eq!(p.ceiling(0), ms(250));
        assert_eq!(p.ceiling(1000), ms(250));
    }

    #[test]
    fn unsafe_values_are_made_safe() {
        let p = policy(5000, 0.5, 1000);
        assert_eq!(p.ceiling(3), ms(5000), "max_delay raised to initial");
        let p = policy(100, f64::NAN, 1000);
        assert_eq!(p.ceiling(3), ms(100), "a NaN multiplier acts as 1");
    }

    #[test]
    fn delays_use_the_whole_range() {
        let p = policy(1000, 2.0, 60_000);
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..2000).map(|_| p.delay(0, None, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= ms(1000)));
        assert!(
            draws.iter().any(|d| *d < ms(100)),
            "full jitter reaches low"
        );
        assert!(draws.iter().any(|d| *d > ms(900)), "and high");
    }

    #[test]
    fn retry_after_is_a_floor_with_a_cap() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!(p.delay(0, Some(Duration::from_secs(10)), &mut rng) >= Duration::from_secs(10));
        }
        let day = Duration::from_secs(86_400);
        assert_eq!(p.delay(0, Some(day), &mut rng), RETRY_AFTER_CAP);
        // A sink whose max_delay is longer than an hour honours up to it.
        let long = policy(1000, 2.0, 2 * 3600 * 1000);
        assert_eq!(long.retry_after_cap(), Duration::from_secs(7200));
    }

    #[test]
    fn giving_up() {
        let p = RetryPolicy::default();
        assert!(!p.should_give_up(1_000_000, Duration::from_secs(86_400 * 365)));
        let p = RetryPolicy::from_config(&RetryConfig {
            max_attempts: 3,
            give_up_after: ConfigDuration::from_secs(3600),
            ..RetryConfig::default()
        });
        assert!(!p.should_give_up(1, Duration::ZERO));
        assert!(!p.should_give_up(2, Duration::from_secs(3599)));
        assert!(p.should_give_up(3, Duration::ZERO));
        assert!(p.should_give_up(1, Duration::from_secs(3600)));
        assert_eq!(p.max_attempts(), Some(3));
        assert_eq!(p.give_up_after(), Some(Duration::from_secs(3600)));
    }

    fn any_policy() -> impl Strategy<Value = RetryPolicy> {
        (1u64..10_000, 1.0f64..10.0, 1u64..600_000)
            .prop_map(|(initial, multiplier, max)| policy(initial, multiplier, max))
    }

    proptest! {
        #[test]
        fn delays_stay_within_the_ceiling(p in any_policy(), retry in 0u32..200, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let delay = p.delay(retry, None, &mut rng);
            prop_assert!(delay <= p.ceiling(retry));
            prop_assert!(p.ceiling(retry) <= p.max_delay);
        }

        #[test]
        fn ceilings_never_decrease(p in any_policy(), retry in 0u32..10_000) {
            prop_assert!(p.ceiling(retry) <= p.ceiling(retry + 1));
            prop_assert!(p.ceiling(0) >= p.initial.min(p.max_delay));
        }

        #[test]
        fn retry_after_is_honoured(p in any_policy(), retry in 0u32..100, after_ms in 0u64..10_000_000, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let after = ms(after_ms);
            let delay = p.delay(retry, Some(after), &mut rng);
            prop_assert!(delay >= after.min(p.retry_after_cap()));
            prop_assert!(delay <= p.ceiling(retry).max(p.retry_after_cap()));
        }
    }
}
