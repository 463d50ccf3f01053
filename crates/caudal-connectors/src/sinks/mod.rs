//! Sinks: where batches of records are delivered.

#[cfg(feature = "files")]
pub mod files;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
pub mod partner;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
