//! Sinks: where batches of records are delivered.

#[cfg(feature = "files")]
pub mod files;
pub mod http;
