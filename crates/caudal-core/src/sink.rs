//! The contract between the engine and a sink.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::record::{Json, Position, Record, event_id};

/// A record on its way to a sink, with the identities delivery needs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Event {
    /// The record's ordering key as text (`None` when the pipeline has no
    /// key and the source knows none, or the record lacks it).
    pub key: Option<String>,
    /// Where the record sits in its source.
    pub position: Position,
    /// The record itself, encoded.
    pub data: Json,
}

impl Event {
    /// The stable id of the record in `pipeline`: the same record sent
    /// again has the same id. Computed on demand (hashing every record of
    /// a large sync costs more than the rest of its handling).
    pub fn id(&self, pipeline: &str) -> String {
        event_id(pipeline, &self.position)
    }

    /// Wraps a record, keyed as its source keyed it.
    pub fn new(record: Record) -> Self {
        Self {
            key: record.key,
            position: record.position,
            data: record.data,
        }
    }

    /// Wraps a record, keyed by its field `key_field` (read from the
    /// record: for sources that do not key records by a field themselves).
    pub fn keyed_by(key_field: &str, record: Record) -> Self {
        let key = key_text(record.data.field(key_field));
        Self {
            key,
            position: record.position,
            data: record.data,
        }
    }
}

/// A key field's value as the text records are ordered by: a string as
/// itself, null or missing as no key, anything else as its JSON.
pub fn key_text(value: Option<Value>) -> Option<String> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    }
}

/// A batch handed to a sink: events in source order, with the batch's
/// idempotency key.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The pipeline the batch belongs to.
    pub pipeline: &'a str,
    /// Idempotency key: the same records sent again carry the same key.
    pub key: &'a str,
    /// The events, in source order.
    pub events: &'a [Event],
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
