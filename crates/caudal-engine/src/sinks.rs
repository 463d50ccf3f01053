//! Builds the runtime sink of a configured sink: one place for every kind
//! that delivers batches, so pipelines, replays and the API agree. A kind
//! this build lacks (a cargo feature left out) is refused with the
//! feature's name.

use std::sync::Arc;

use caudal_connectors::sinks::http::HttpSink;
use caudal_core::config::{BatchConfig, SinkConfig};
use caudal_core::sink::Sink;
use caudal_core::{Error, ErrorKind, Result};

/// The sink `name` and how its batches are cut.
pub fn build(name: &str, config: &SinkConfig) -> Result<(Arc<dyn Sink>, BatchConfig)> {
    let batch = config.batch().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("sink {name:?} is a dataset (type = \"files\"): a report pipeline writes it"),
        )
    })?;
    let sink: Arc<dyn Sink> = match config {
        SinkConfig::Http(c) => Arc::new(HttpSink::new(name, c)?),
        #[cfg(feature = "rabbitmq")]
        SinkConfig::Rabbitmq(c) => Arc::new(caudal_connectors::sinks::rabbitmq::RabbitmqSink::new(
            name, c,
        )?),
        #[cfg(feature = "nats")]
        SinkConfig::Nats(c) => Arc::new(caudal_connectors::sinks::nats::NatsSink::new(name, c)?),
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(c) => Arc::new(caudal_connectors::sinks::kafka::KafkaSink::new(name, c)?),
        other => {
            let kind = other.type_name();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "sink {name:?}: this caudal was built without {kind} support \
                     (cargo feature `{kind}`)"
                ),
            ));
        }
    };
    Ok((sink, batch))
}
