//! The Kafka sink: each record of a batch becomes one message produced by
//! an idempotent producer (`enable.idempotence=true`, `acks=all`).
//!
//! Promises:
//! - A batch is delivered only when every one of its messages is
//!   acknowledged by all in-sync replicas; any failure of one of them (or
//!   no answer within `timeout`) makes the batch temporary-failed and it is
//!   produced again, with the same headers.
//! - The message key is the record key, so one key's records land in one
//!   partition; with the idempotent producer they stay in order there,
//!   also across librdkafka's own retries.
//! - A message larger than the brokers take splits the batch (one record
//!   too large goes to dead letters); an unknown topic refuses it with the
//!   reason.

use std::time::Duration;

use caudal_core::config::KafkaSinkConfig;
use caudal_core::sink::{Batch, Delivery, Sink};
use caudal_core::{Error, ErrorKind, Result};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::broker::{Route, identity_headers};

/// A configured Kafka topic.
pub struct KafkaSink {
    name: String,
    brokers: String,
    route: Route,
    timeout: Duration,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("name", &self.name)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Builds the sink and its producer (librdkafka connects in the
    /// background).
    pub fn new(name: &str, config: &KafkaSinkConfig) -> Result<Self> {
        let mut client = ClientConfig::new();
        for (k, v) in &config.options {
            client.set(k, v.expose());
        }
        let timeout_ms = config.timeout.as_std().as_millis().max(1).to_string();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", &timeout_ms);
        let producer: FutureProducer = client.create().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("sink {name:?}: cannot create the Kafka producer: {e}"),
            )
        })?;
        Ok(Self {
            name: name.to_string(),
            brokers: config.brokers.clone(),
            route: Route::new(name, "topic", &config.topic, 1)?,
            timeout: config.timeout.as_std(),
            producer,
        })
    }

    fn retry(&self, why: String) -> Delivery {
        Delivery::Retry {
            reason: format!("Kafka {} (sink {:?}): {why}", self.brokers, self.name),
            status: None,
            after: None,
        }
    }
}

impl KafkaSink {
    /// For `caudal doctor`: the brokers answer a metadata request within
    /// `timeout`, and the topic (unless it is rendered per record) exists
    /// with partitions. Asks for every topic's metadata, never the one
    /// topic's: a producer's request naming a missing topic may make the
    /// broker create it. Sends no message.
    pub async fn probe(&self, timeout: Duration) -> Vec<caudal_core::probe::Finding> {
        use rdkafka::producer::Producer;
        let producer = self.producer.clone();
        let (connected, topics) = match probe_topics(&self.brokers, timeout, move |t| {
            producer.client().fetch_metadata(None, t)
        })
        .await
        {
            Ok(found) => found,
            Err(failed) => return vec![failed],
        };
        let topic = match self.route.literal() {
            None => caudal_core::probe::Finding::skipped(
                "topic",
                "the topic is rendered per record; no topic is looked up",
            ),
            Some(topic) => topic_finding(
                &topics,
                topic,
                format!(
                    "create the topic {topic:?} (caudal does not create Kafka topics), or correct \
                     the sink's `topic`"
                ),
            ),
        };
        vec![connected, topic]
    }
}

/// A topic as a metadata answer lists it: name, partitions, whether it
/// came without an error.
pub(crate) type TopicMeta = (String, usize, bool);

/// `caudal doctor`'s metadata request: `fetch` (a client's
/// `fetch_metadata(None, …)`: every topic, so none is auto-created) within
/// `timeout`. The "connect" finding and the topics, or the failure.
pub(crate) async fn probe_topics(
    brokers: &str,
    timeout: Duration,
    fetch: impl FnOnce(Duration) -> rdkafka::error::KafkaResult<rdkafka::metadata::Metadata>
    + Send
    + 'static,
) -> std::result::Result<(caudal_core::probe::Finding, Vec<TopicMeta>), caudal_core::probe::Finding>
{
    use caudal_core::probe::Finding;
    // Shorter than the caller's own limit, so librdkafka's reason shows.
    let asked = tokio::task::spawn_blocking(move || {
        fetch(timeout.mul_f64(0.8)).map(|m| {
            let topics: Vec<TopicMeta> = m
                .topics()
                .iter()
                .map(|t| {
                    (
                        t.name().to_string(),
                        t.partitions().len(),
                        t.error().is_none(),
                    )
                })
                .collect();
            (m.brokers().len(), topics)
        })
    })
    .await;
    match asked {
        Ok(Ok((count, topics))) => Ok((
            Finding::ok(
                "connect",
                format!("{count} broker(s) answered at {brokers}"),
            ),
            topics,
        )),
        Ok(Err(e)) => Err(Finding::fail(
            "connect",
            format!("the brokers {brokers} did not answer within {timeout:?}: {e}"),
            "check `brokers` (host:port, comma-separated), that Kafka runs, and firewalls \
             between here and it",
        )),
        Err(e) => Err(Finding::fail(
            "connect",
            format!("the metadata request failed: {e}"),
            "run caudal doctor again",
        )),
    }
}

/// Whether `topic` is among `topics` with partitions; `fix` when not.
pub(crate) fn topic_finding(
    topics: &[TopicMeta],
    topic: &str,
    fix: String,
) -> caudal_core::probe::Finding {
    use caudal_core::probe::Finding;
    match topics.iter().find(|(name, _, _)| name == topic) {
        Some((_, partitions, true)) if *partitions > 0 => Finding::ok(
            "topic",
            format!("topic {topic:?} exists with {partitions} partition(s)"),
        ),
        _ => Finding::fail(
            "topic",
            format!(
                "topic {topic:?} does not exist on the brokers, or these credentials cannot \
                 describe it"
            ),
            fix,
        ),
    }
}

/// What a failed message means for its batch.
fn classify(topic: &str, e: &KafkaError) -> Failure {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            Failure::Split(format!("a message is larger than the brokers take: {e}"))
        }
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic,
        ) => Failure::Reject(format!("topic {topic:?}: {e}")),
        _ => Failure::Retry(format!("producing to {topic:?} failed: {e}")),
    }
}

enum Failure {
    Retry(String),
    Reject(String),
    Split(String),
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn deliver(&self, batch: Batch<'_>) -> Delivery {
        let topics = match self.route.render_all(&self.name, &batch) {
            Ok(r) => r,
            Err(refused) => return refused,
        };
        let mut bytes = 0u64;
        let produce = async {
            let mut pending: std::collections::VecDeque<(DeliveryFuture, &str)> =
                std::collections::VecDeque::with_capacity(batch.events.len());
            for (event, topic) in batch.events.iter().zip(&topics) {
                let identity = identity_headers(batch.pipeline, batch.key, event);
                let mut headers = OwnedHeaders::new_with_capacity(identity.len());
                for (name, value) in &identity {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value.as_bytes()),
                    });
                }
                let payload = event.data.as_str().as_bytes();
                bytes += payload.len() as u64;
                let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
                if let Some(key) = &event.key {
                    record = record.key(key.as_bytes());
                }
                loop {
                    match self.producer.send_result(record) {
                        Ok(future) => {
                            pending.push_back((future, topic));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // The local queue is full: wait for the oldest
                            // message in flight, then try again.
                            record = back;
                            match pending.pop_front() {
                                Some((future, t)) => settle(future, t).await?,
                                None => tokio::time::sleep(Duration::from_millis(5)).await,
                            }
                        }
                        Err((e, _)) => return Err(classify(topic, &e)),
                    }
                }
            }
            for (future, topic) in pending {
                settle(future, topic).await?;
            }
            Ok::<_, Failure>(())
        };
        let outcome = tokio::time::timeout(self.timeout + Duration::from_secs(1), produce).await;
        metrics::counter!("caudal_sink_sent_bytes_total", "pipeline" => batch.pipeline.to_string(), "sink" => self.name.clone())
            .increment(bytes);
        match outcome {
            Err(_) => self.retry(format!(
                "the brokers did not acknowledge the batch within {:?}",
                self.timeout
            )),
            Ok(Err(Failure::Retry(why))) => self.retry(why),
            Ok(Err(Failure::Reject(why))) => Delivery::Rejected {
                reason: format!("sink {:?}: {why}", self.name),
                status: None,
                body_excerpt: String::new(),
            },
            Ok(Err(Failure::Split(why))) => Delivery::Split {
                reason: format!("sink {:?}: {why}", self.name),
                status: None,
                body_excerpt: String::new(),
            },
            Ok(Ok(())) => Delivery::Delivered { status: None },
        }
    }
}

async fn settle(future: DeliveryFuture, topic: &str) -> std::result::Result<(), Failure> {
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(classify(topic, &e)),
        Err(_) => Err(Failure::Retry(
            "the producer dropped a message before its delivery report".into(),
        )),
    }
}
