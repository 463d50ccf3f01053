//! Backoff between attempts: exponential, linear or fixed, with jitter,
//! bounded, and respectful of `Retry-After`. One policy for a sink's
//! batches and a workflow's tasks.

use std::num::NonZeroU32;
use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// The longest `Retry-After` honoured when the sink's `max_delay` is
/// shorter: a receiver asking for a day's pause gets an hour, then is asked
/// again.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// How the longest wait grows from one retry to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Growth {
    /// `initial × multiplier^n`.
    Exponential { multiplier: f64 },
    /// `initial × (n + 1)`.
    Linear,
    /// `initial` every time.
    Fixed,
}

/// Retry rules: a sink's, resolved from its `retry` configuration, or a
/// workflow task's.
///
/// Attempts are counted from 1 (the first send). The longest wait before
/// retry `n` (`n` = 0 before the second attempt) is the growth's value,
/// capped at `max_delay`; the wait itself is uniform in
/// `[ceiling × (1 − jitter), ceiling]`. A sink uses jitter 1 ("full
/// jitter"), which spreads retries of many batches and many senders so they
/// do not hit a recovering receiver in step.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    growth: Growth,
    jitter: f64,
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
        Self::new(
            config.initial.as_std(),
            Growth::Exponential {
                multiplier: config.multiplier,
            },
            1.0,
            config.max_delay.as_std(),
            config.max_attempts,
            config.give_up_after.as_std(),
        )
    }

    /// A policy from its parts: `jitter` is the fraction of each wait
    /// left to chance (0 to 1), `max_attempts` 0 means no limit and
    /// `give_up_after` zero means never. Values that validation refuses are
    /// made safe rather than trusted: a multiplier below 1 (or not a
    /// number) becomes 1, jitter is clamped to `[0, 1]`, and `max_delay` is
    /// never below `initial`.
    pub fn new(
        initial: Duration,
        growth: Growth,
        jitter: f64,
        max_delay: Duration,
        max_attempts: u32,
        give_up_after: Duration,
    ) -> Self {
        let growth = match growth {
            Growth::Exponential { multiplier }
                if !(multiplier.is_finite() && multiplier >= 1.0) =>
            {
                Growth::Exponential { multiplier: 1.0 }
            }
            other => other,
        };
        Self {
            initial,
            growth,
            jitter: if jitter.is_finite() {
                jitter.clamp(0.0, 1.0)
            } else {
                1.0
            },
            max_delay: max_delay.max(initial),
            max_attempts: NonZeroU32::new(max_attempts),
            give_up_after: (!give_up_after.is_zero()).then_some(give_up_after),
        }
    }

    /// The longest wait before retry `retry` (0 before the second
    /// attempt): the growth's value at `retry`, at most `max_delay`. Never
    /// decreases as `retry` grows.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let max = self.max_delay.as_secs_f64();
        let initial = self.initial.as_secs_f64();
        let grown = match self.growth {
            // exp(n·ln m) rather than powi: it stays monotone in n even for
            // a multiplier a hair above 1.
            Growth::Exponential { multiplier } => {
                initial * (f64::from(retry) * multiplier.ln()).exp()
            }
            Growth::Linear => initial * (f64::from(retry) + 1.0),
            Growth::Fixed => initial,
        };
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
    /// attempt): a uniform draw from `[ceiling × (1 − jitter), ceiling]`,
    /// but at least `retry_after` (what the receiver asked for, capped by
    /// [`Self::retry_after_cap`]).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        // The floor is computed in f64 and may round; it never exceeds the
        // ceiling.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let floor = ((ceiling as f64) * (1.0 - self.jitter)).min(ceiling as f64) as u64;
        let jittered = Duration::from_nanos(rng.random_range(floor.min(ceiling)..=ceiling));
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

    /// The shortest wait before retry `retry`: `ceiling × (1 − jitter)`.
    pub fn floor(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(1.0 - self.jitter)
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

    #[test]
    fn linear_and_fixed_growth_with_partial_jitter() {
        let linear = RetryPolicy::new(ms(100), Growth::Linear, 0.0, ms(350), 0, Duration::ZERO);
        let ceilings: Vec<Duration> = (0..5).map(|n| linear.ceiling(n)).collect();
        assert_eq!(ceilings, [ms(100), ms(200), ms(300), ms(350), ms(350)]);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(linear.delay(1, None, &mut rng), ms(200), "no jitter: exact");
        let fixed = RetryPolicy::new(ms(1000), Growth::Fixed, 0.25, ms(1), 2, Duration::ZERO);
        assert_eq!(fixed.ceiling(9), ms(1000), "max_delay raised to initial");
        assert_eq!(fixed.floor(9), ms(750));
        for _ in 0..200 {
            let d = fixed.delay(4, None, &mut rng);
            assert!(d >= ms(750) && d <= ms(1000), "{d:?}");
        }
        assert!(fixed.should_give_up(2, Duration::ZERO));
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
            prop_assert!(delay >= p.floor(retry));
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
