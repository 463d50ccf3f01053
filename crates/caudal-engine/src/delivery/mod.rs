//! The runtime side of the delivery policy, per sink: a circuit breaker,
//! a rate limiter and a concurrency limit. The pure rules (status classes,
//! backoff, giving up, splitting) are in [`caudal_core::delivery`].
//!
//! Everything here reads time through `tokio::time::Instant` and waits with
//! `tokio::time::sleep_until`, so tests drive it with
//! `tokio::time::pause()` and never sleep for real.
//!
//! A delivery attempt goes through them in this order: breaker
//! ([`CircuitBreaker::acquire`]), concurrency ([`ConcurrencyLimit::acquire`]),
//! rate ([`RateLimiter::acquire`]); then the sink's answer, as an
//! [`Outcome`], is reported back to the breaker and concurrency permits.

mod breaker;
mod concurrency;
mod rate_limit;

pub use breaker::{BreakerOpen, BreakerPermit, BreakerState, CircuitBreaker};
pub use caudal_core::delivery::Outcome;
pub use concurrency::{ConcurrencyLimit, ConcurrencyPermit};
pub use rate_limit::RateLimiter;
