//! Sinks: where batches of records are delivered.

pub mod http;
#[cfg(feature = "files")]
pub mod files;
