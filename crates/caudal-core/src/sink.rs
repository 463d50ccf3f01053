//! The contract between the engine and a sink.

use std::time::Duration;

use crate::record::Record;

/// A batch handed to a sink: records in source order.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The pipeline the batch belongs to.
    pub pipeline: &'a str,
    /// The records, in source order.
    pub records: &'a [Record],
}

/// The outcome of delivering one batch. The engine moves a checkpoint past a
/// batch only on [`Delivery::Delivered`].
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The receiver accepted the whole batch (a success status).
    Delivered { status: Option<u16> },
    /// A temporary failure: the same batch may succeed later.
    Retry {
        reason: String,
        status: Option<u16>,
        /// How long the receiver asked us to wait (`Retry-After`).
        after: Option<Duration>,
    },
    /// The receiver refused the batch; retrying it unchanged will not help.
    Rejected {
        reason: String,
        status: Option<u16>,
        /// The start of the response body, for the operator.
        body_excerpt: String,
    },
    /// The receiver found the batch too large (413 by default): split it
    /// and send each half; a single record goes to dead letters as too
    /// large.
    Split {
        reason: String,
        status: Option<u16>,
        /// The start of the response body, for the operator.
        body_excerpt: String,
    },
}

/// A destination for batches of records.
///
/// Contract: `deliver` sends the batch once and reports the outcome; it never
/// retries on its own (retries, backoff and dead letters belong to the
/// engine, so every sink shares them). Delivery is at-least-once: a batch may
/// be sent again after a crash or a failure, so receivers must tolerate
/// duplicates. Sinks may be called concurrently for different batches.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Sends one batch and reports what the receiver said.
    async fn deliver(&self, batch: Batch<'_>) -> Delivery;
}
