//! Delivery policy as pure decisions: which class a response status falls
//! in, how long to wait before the next attempt, when to give up, how to
//! split a batch that was too large, and what an attempt says about the
//! receiver's health.
//!
//! Nothing here sleeps, spawns or reads a clock: callers pass in attempts,
//! elapsed times and a random source, so every rule is tested exactly. The
//! engine's runtime pieces (circuit breaker, rate limiter, concurrency
//! limit) live in `caudal_engine::delivery` and take [`Outcome`]s from
//! here.

mod retry;
mod split;
mod status;

pub use retry::{Growth, RETRY_AFTER_CAP, RetryPolicy};
pub use split::split_batch;
pub use status::{StatusClass, StatusClasses};

use crate::sink::Delivery;

/// What one attempt says about the receiver's health, for the circuit
/// breaker and adaptive concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver accepted the batch.
    Success,
    /// The receiver answered but refused the batch (a reject or a split):
    /// it is up, so this is no sign of trouble.
    Rejected,
    /// A temporary failure: another 5xx, 408, a timeout, a connection
    /// error.
    Failure,
    /// The receiver asked us to slow down: 429 or 503.
    Overloaded,
}

impl Outcome {
    /// Classifies a sink's answer.
    pub fn of(delivery: &Delivery) -> Self {
        match delivery {
            Delivery::Delivered { .. } => Self::Success,
            Delivery::Rejected { .. } | Delivery::Split { .. } => Self::Rejected,
            Delivery::Retry {
                status: Some(429 | 503),
                ..
            } => Self::Overloaded,
            Delivery::Retry { .. } => Self::Failure,
        }
    }

    /// Whether this counts as a failure for the circuit breaker: only
    /// temporary failures do, never rejections.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failure | Self::Overloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(status: Option<u16>) -> Delivery {
        Delivery::Retry {
            reason: String::new(),
            status,
            after: None,
        }
    }

    #[test]
    fn outcomes_of_deliveries() {
        assert_eq!(
            Outcome::of(&Delivery::Delivered { status: Some(200) }),
            Outcome::Success
        );
        assert_eq!(Outcome::of(&retry(Some(429))), Outcome::Overloaded);
        assert_eq!(Outcome::of(&retry(Some(503))), Outcome::Overloaded);
        assert_eq!(Outcome::of(&retry(Some(500))), Outcome::Failure);
        assert_eq!(Outcome::of(&retry(None)), Outcome::Failure);
        let rejected = Delivery::Rejected {
            reason: String::new(),
            status: Some(400),
            body_excerpt: String::new(),
        };
        assert_eq!(Outcome::of(&rejected), Outcome::Rejected);
        let split = Delivery::Split {
            reason: String::new(),
            status: Some(413),
            body_excerpt: String::new(),
        };
        assert_eq!(Outcome::of(&split), Outcome::Rejected);
        assert!(!Outcome::Rejected.is_failure());
        assert!(Outcome::Overloaded.is_failure());
        assert!(Outcome::Failure.is_failure());
        assert!(!Outcome::Success.is_failure());
    }
}
