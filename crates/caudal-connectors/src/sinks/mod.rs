//! Sinks: where batches of records are delivered.

pub mod http;
