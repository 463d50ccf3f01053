//! Consuming Kafka topics in a consumer group: offsets are stored only
//! for messages the pipeline reported durable, and committed by
//! librdkafka in the background (and when the consumer closes).

use caudal_core::config::KafkaSourceConfig;
use futures::StreamExt as _;
use futures::future::FutureExt as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};

use super::{Ended, PAGE_MAX, Session};
use crate::broker::{MessageMeta, Unacked, message_record};

/// Messages read and not acknowledged yet: topic, partition, offset.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    unacked: Unacked<(String, i32, i64)>,
}

pub(super) async fn session(
    s: Session<'_>,
    config: &KafkaSourceConfig,
    ledger: &mut Ledger,
) -> Ended {
    let lost = |what: String| Ended::Lost(format!("Kafka {}: {what}", config.brokers));
    let mut client = ClientConfig::new();
    for (k, v) in &config.options {
        client.set(k, v.expose());
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.start);
    let consumer: StreamConsumer = match client.create() {
        Ok(c) => c,
        Err(e) => return lost(format!("cannot create the consumer: {e}")),
    };
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    if let Err(e) = consumer.subscribe(&topics) {
        return lost(format!("cannot subscribe to {topics:?}: {e}"));
    }
    s.connected();
    let mut stream = consumer.stream();
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => return close(&s, ledger, &consumer),
            changed = s.durable.changed() => {
                if changed.is_err() {
                    return close(&s, ledger, &consumer);
                }
                store_durable(&s, ledger, &consumer);
            }
            next = stream.next() => {
                let Some(first) = next else {
                    return lost("the consumer's stream ended".into());
                };
                let mut page = Vec::new();
                let mut item = Some(first);
                while let Some(message) = item.take() {
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            // librdkafka reconnects by itself: a message
                            // error is reported, not a reason to restart.
                            tracing::warn!(pipeline = %s.source.pipeline, error = %e, "Kafka consumer error");
                            break;
                        }
                    };
                    let headers: Vec<(String, String)> = message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|header| {
                                    (
                                        header.key.to_string(),
                                        header
                                            .value
                                            .map(|v| String::from_utf8_lossy(v).into_owned())
                                            .unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let topic = message.topic().to_string();
                    let meta = MessageMeta {
                        message_id: None,
                        coordinates: Some(format!(
                            "{topic}/{}/{}",
                            message.partition(),
                            message.offset()
                        )),
                        key: message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        headers,
                        route: topic.clone(),
                        partition: Some(message.partition()),
                        offset: u64::try_from(message.offset()).ok(),
                        redelivered: false,
                    };
                    let record = message_record(
                        &s.source.name,
                        message.payload().unwrap_or_default(),
                        &meta,
                        s.meta_field,
                    );
                    ledger
                        .unacked
                        .push(record.position.clone(), (topic, message.partition(), message.offset()));
                    page.push(record);
                    if page.len() < PAGE_MAX {
                        item = stream.next().now_or_never().flatten();
                    }
                }
                let left = ledger.unacked.len() as u64;
                s.source.update(|st| st.unacked = left);
                if !s.send(page).await {
                    return close(&s, ledger, &consumer);
                }
            }
        }
    }
}

/// Stores the offsets of the messages up to the last durable position
/// (librdkafka commits stored offsets in the background).
fn store_durable(s: &Session<'_>, ledger: &mut Ledger, consumer: &StreamConsumer) {
    let durable = s.durable.borrow().clone();
    let Some(position) = durable else {
        return;
    };
    for (topic, partition, offset) in ledger.unacked.take_through(&position) {
        // A partition handed to another member meanwhile refuses the
        // store: that member reads it again. `store_offset` takes the
        // message's own offset (librdkafka's rd_kafka_offset_store stores
        // the one after it): passing `offset + 1` skipped a message at
        // every hand-over.
        let _ = consumer.store_offset(&topic, partition, offset);
    }
    let left = ledger.unacked.len() as u64;
    s.source.update(|st| st.unacked = left);
}

/// Ends a stopped session: stores the offsets of what became durable
/// last; librdkafka commits them when the consumer closes as it is
/// dropped, before it leaves its group (else the next member would read
/// them again).
fn close(s: &Session<'_>, ledger: &mut Ledger, consumer: &StreamConsumer) -> Ended {
    store_durable(s, ledger, consumer);
    Ended::Stopped
}

/// `caudal doctor`'s look at the source: the brokers answer and every
/// topic exists with partitions. Asks for every topic's metadata, never
/// one topic's (which may make a broker create it); joins no group.
pub(super) async fn probe(
    config: &KafkaSourceConfig,
    timeout: std::time::Duration,
) -> Vec<caudal_core::probe::Finding> {
    use caudal_core::probe::Finding;
    let mut client = ClientConfig::new();
    for (k, v) in &config.options {
        client.set(k, v.expose());
    }
    client.set("bootstrap.servers", &config.brokers);
    let consumer: rdkafka::consumer::BaseConsumer = match client.create() {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                "config",
                format!("cannot create a Kafka client: {e}"),
                "correct the source's `options` (librdkafka settings)",
            )];
        }
    };
    let (connected, topics) =
        match crate::sinks::kafka::probe_topics(&config.brokers, timeout, move |t| {
            consumer.fetch_metadata(None, t)
        })
        .await
        {
            Ok(found) => found,
            Err(failed) => return vec![failed],
        };
    let mut out = vec![connected];
    for topic in &config.topics {
        out.push(crate::sinks::kafka::topic_finding(
            &topics,
            topic,
            format!(
                "create the topic {topic:?}, or correct the source's `topics` (the group {:?} \
                 would wait on it)",
                config.group
            ),
        ));
    }
    out
}
