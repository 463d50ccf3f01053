//! The brokers' side of the broker tests: unique names, publishing, and
//! reading back everything a RabbitMQ queue, a JetStream stream or a Kafka
//! topic (librdkafka's mock cluster) holds, as [`Message`]s; and the checks
//! every broker test makes on what it read: message ids, duplicates and
//! per-key order.
//!
//! RabbitMQ (127.0.0.1:5672, guest/guest) and NATS with JetStream
//! (127.0.0.1:4222) are the machine's own servers: a test that cannot reach
//! one fails with how to start it. Kafka is a [`MockCluster`] inside the
//! test process; its bootstrap servers are loopback ports the spawned
//! `caudal` reaches too.
//!
//! Every name a test creates comes from [`unique`], so tests run in
//! parallel; [`Created`] deletes them at the end, also when a test fails.
//!
//! Readers here take no `futures::Stream` (the tests do not depend on
//! `futures`): RabbitMQ is drained with `basic.get`, a stream is read
//! message by message by sequence, and Kafka with a blocking consumer.
//! Slower than a push consumer, plenty for tests.

// Each broker test uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::Value;

/// The RabbitMQ server the tests use.
pub const RABBITMQ_ADDR: &str = "127.0.0.1:5672";
/// The NATS server (with JetStream) the tests use.
pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// Header carrying a record's event id (caudal's idempotency key per record).
pub const EVENT_ID: &str = "caudal-event-id";
/// Header carrying a record's ordering key.
pub const KEY: &str = "caudal-key";
/// Header carrying the idempotency key of the batch a record was sent in.
pub const BATCH: &str = "caudal-batch";
/// Header carrying the pipeline that published a record.
pub const PIPELINE: &str = "caudal-pipeline";
/// Header carrying the record's source position (JSON).
pub const POSITION: &str = "caudal-position";

/// `prefix` with a random suffix: a queue, exchange, stream, subject or
/// topic name no other test uses. Letters, digits and `_` only, so it is
/// valid everywhere (a JetStream stream name takes no `.`).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// What a test created on RabbitMQ and NATS, deleted when this is dropped:
/// at the end of the test, and also when it fails.
#[derive(Debug, Default)]
pub struct Created {
    queues: Vec<String>,
    exchanges: Vec<String>,
    streams: Vec<String>,
}

impl Created {
    /// Registers a queue (made by [`unique`] from `prefix`) and returns its
    /// name.
    pub fn queue(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.queues.push(name.clone());
        name
    }

    /// Registers an exchange and returns its name.
    pub fn exchange(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.exchanges.push(name.clone());
        name
    }

    /// Registers a JetStream stream and returns its name.
    pub fn stream(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.streams.push(name.clone());
        name
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let streams = std::mem::take(&mut self.streams);
        if queues.is_empty() && exchanges.is_empty() && streams.is_empty() {
            return;
        }
        // Drop cannot await, and may run inside the test's runtime: clean
        // up on a thread of its own, best effort, bounded in time.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let work = async {
                    if !queues.is_empty() || !exchanges.is_empty() {
                        let url = rabbitmq_url(RABBITMQ_ADDR);
                        if let Ok(c) =
                            Connection::connect(&url, ConnectionProperties::default()).await
                        {
                            for q in &queues {
                                delete_queue(&c, q).await;
                            }
                            for x in &exchanges {
                                delete_exchange(&c, x).await;
                            }
                        }
                    }
                    if !streams.is_empty()
                        && let Ok(client) = async_nats::connect(format!("nats://{NATS_ADDR}")).await
                    {
                        let js = async_nats::jetstream::new(client);
                        for s in &streams {
                            delete_stream(&js, s).await;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// One message read back from a broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The broker's message id: AMQP `message-id`, `Nats-Msg-Id`; `None`
    /// for Kafka, which has none.
    pub id: Option<String>,
    /// Headers, as text.
    pub headers: BTreeMap<String, String>,
    /// The Kafka message key.
    pub key: Option<String>,
    /// Routing key, subject or topic.
    pub route: String,
    /// Kafka partition.
    pub partition: Option<i32>,
    /// The body, parsed as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The `caudal-event-id` header; panics when the message has none.
    pub fn event_id(&self) -> &str {
        self.header(EVENT_ID)
            .unwrap_or_else(|| panic!("a message without a {EVENT_ID} header: {self:?}"))
    }
}

/// What [`check_messages`] found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Event id → the body it was first seen with.
    pub bodies: HashMap<String, Value>,
    /// Event ids in the order they were first seen.
    pub first_seen: Vec<String>,
    /// Messages that repeated an event id seen before.
    pub duplicates: usize,
}

/// Checks messages read back from one queue/stream/partition, in the order
/// the broker holds them:
/// - the broker's message id, where it has one, equals `caudal-event-id`;
/// - a repeated event id (a re-send) carries the same body;
/// - per key (`key_of`), the first occurrences of the event ids are in
///   increasing `seq_of` order.
///
/// Panics naming the first message that breaks one of them.
pub fn check_messages(
    messages: &[Message],
    key_of: impl Fn(&Message) -> String,
    seq_of: impl Fn(&Message) -> i64,
) -> Checked {
    let mut out = Checked::default();
    let mut last: HashMap<String, (i64, usize)> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        let event = m.event_id();
        if let Some(id) = &m.id {
            assert_eq!(
                id, event,
                "message {i}: message id is not the event id: {m:?}"
            );
        }
        if let Some(before) = out.bodies.get(event) {
            assert_eq!(
                before, &m.body,
                "message {i}: event id {event} was sent again with another body"
            );
            out.duplicates += 1;
            continue;
        }
        out.bodies.insert(event.to_string(), m.body.clone());
        out.first_seen.push(event.to_string());
        let (key, seq) = (key_of(m), seq_of(m));
        if let Some((previous, at)) = last.get(&key) {
            assert!(
                *previous < seq,
                "key {key}: sequence {seq} (message {i}) came after {previous} (message {at}): {m:?}"
            );
        }
        last.insert(key, (seq, i));
    }
    out
}

// ---------------------------------------------------------------- RabbitMQ

/// `amqp://guest:guest@{addr}/%2f`.
pub fn rabbitmq_url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// A connection to the test RabbitMQ; panics with how to start it.
pub async fn rabbitmq() -> Connection {
    let url = rabbitmq_url(RABBITMQ_ADDR);
    match tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ is needed at {RABBITMQ_ADDR} (guest/guest): {e}. \
             Start it (e.g. `service rabbitmq-server start`)"
        ),
        Err(_) => panic!("RabbitMQ at {RABBITMQ_ADDR} did not answer within 15s"),
    }
}

/// A fresh channel on `connection`.
pub async fn channel(connection: &Connection) -> Channel {
    connection
        .create_channel()
        .await
        .expect("open a RabbitMQ channel")
}

/// Declares a durable queue.
pub async fn declare_queue(connection: &Connection, queue: &str) {
    channel(connection)
        .await
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
}

/// Messages waiting in `queue`; `None` when there is no such queue.
pub async fn queue_length(connection: &Connection, queue: &str) -> Option<u32> {
    // A failed passive declare closes its channel: use a throwaway one.
    channel(connection)
        .await
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count())
}

/// Publishes one persistent message and waits for the broker's confirm.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
    headers: &[(&str, &str)],
) {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = message_id {
        properties = properties.with_message_id(ShortString::from(id));
    }
    channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("publish confirmed");
}

/// Takes the messages waiting in `queue` (auto-acknowledged), in queue
/// order, until it is empty or `limit` were taken (a busy publisher may
/// never let it be empty). Panics when the queue does not exist.
pub async fn drain_queue(channel: &Channel, queue: &str, limit: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < limit
        && let Some(m) = channel
            .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"))
    {
        out.push(amqp_message(&m.delivery));
    }
    out
}

fn amqp_message(d: &lapin::message::Delivery) -> Message {
    let headers = d
        .properties
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_text(v)))
                .collect()
        })
        .unwrap_or_default();
    Message {
        id: d.properties.message_id().as_ref().map(ToString::to_string),
        headers,
        key: None,
        route: d.routing_key.to_string(),
        partition: None,
        body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
    }
}

fn amqp_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// Deletes `queue` (if it exists).
pub async fn delete_queue(connection: &Connection, queue: &str) {
    let _ = channel(connection)
        .await
        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
        .await;
}

/// Deletes `exchange` (if it exists).
pub async fn delete_exchange(connection: &Connection, exchange: &str) {
    let _ = channel(connection)
        .await
        .exchange_delete(
            ShortString::from(exchange),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

// -------------------------------------------------------------- NATS

/// A client of the test NATS server; panics with how to start it.
pub async fn nats() -> async_nats::Client {
    let url = format!("nats://{NATS_ADDR}");
    match tokio::time::timeout(Duration::from_secs(15), async_nats::connect(&url)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "NATS with JetStream is needed at {NATS_ADDR}: {e}. \
             Start it (e.g. `nats-server -js &`)"
        ),
        Err(_) => panic!("NATS at {NATS_ADDR} did not answer within 15s"),
    }
}

/// `(messages, last sequence)` of `stream`; `None` when it does not exist.
pub async fn stream_state(js: &async_nats::jetstream::Context, stream: &str) -> Option<(u64, u64)> {
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    Some((info.state.messages, info.state.last_sequence))
}

/// Every message `stream` holds, in stream order, read by sequence number
/// (8 readers at once; a sequence with no message, e.g. deleted, is
/// skipped).
pub async fn read_stream(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Message> {
    const READERS: u64 = 8;
    let mut s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let state = s
        .info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state
        .clone();
    if state.messages == 0 {
        return Vec::new();
    }
    let (first, last) = (state.first_sequence, state.last_sequence);
    let chunk = (last - first + 1).div_ceil(READERS);
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..READERS {
        let (from, to) = (first + i * chunk, (first + (i + 1) * chunk - 1).min(last));
        let s = s.clone();
        readers.spawn(async move {
            let mut out = Vec::new();
            for seq in from..=to {
                if let Ok(m) = s.get_raw_message(seq).await {
                    out.push((seq, stream_message(&m)));
                }
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(part) = readers.join_next().await {
        all.extend(part.expect("a stream reader"));
    }
    all.sort_by_key(|(seq, _)| *seq);
    all.into_iter().map(|(_, m)| m).collect()
}

fn stream_message(m: &async_nats::jetstream::message::StreamMessage) -> Message {
    let headers = m
        .headers
        .iter()
        .map(|(k, v)| {
            let k: &str = k.as_ref();
            let v = v.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(",");
            (k.to_string(), v)
        })
        .collect::<BTreeMap<String, String>>();
    Message {
        id: headers.get("Nats-Msg-Id").cloned(),
        headers,
        key: None,
        route: m.subject.to_string(),
        partition: None,
        body: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
    }
}

/// Deletes `stream` (if it exists).
pub async fn delete_stream(js: &async_nats::jetstream::Context, stream: &str) {
    let _ = js.delete_stream(stream).await;
}

// -------------------------------------------------------------- Kafka

/// A Kafka mock cluster of `brokers` brokers in this process. Keep it alive
/// as long as anything talks to it.
pub fn kafka_cluster(brokers: i32) -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(brokers).expect("start librdkafka's mock cluster")
}

/// Messages `topic` holds in all (the sum of its partitions' end
/// offsets). Blocking.
pub fn topic_size(bootstrap: &str, topic: &str, partitions: i32) -> i64 {
    watermarks(bootstrap, topic, partitions)
        .iter()
        .map(|(_, high)| high)
        .sum()
}

/// The low and high watermarks of partitions `0..partitions` of `topic`
/// ((0, 0) for one the brokers do not answer for).
pub fn watermarks(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a Kafka client");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or((0, 0))
        })
        .collect()
}

/// Reads `topic` (partitions `0..partitions`) from the beginning until
/// `done` (told of each message as it is read) says so, or `patience`
/// passes without a new message; returns the messages per partition, in
/// partition order. Blocking: call it from `spawn_blocking`.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    patience: Duration,
    mut done: impl FnMut(&Message) -> bool,
) -> BTreeMap<i32, Vec<Message>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("caudal_test_reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a Kafka consumer");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("a partition to read");
    }
    consumer.assign(&assignment).expect("assign partitions");
    let mut out: BTreeMap<i32, Vec<Message>> = BTreeMap::new();
    let mut last_new = std::time::Instant::now();
    let mut finished = false;
    while !finished && last_new.elapsed() < patience {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                last_new = std::time::Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let message = Message {
                    id: None,
                    headers,
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    route: m.topic().to_string(),
                    partition: Some(m.partition()),
                    body: m
                        .payload()
                        .and_then(|p| serde_json::from_slice(p).ok())
                        .unwrap_or(Value::Null),
                };
                finished = done(&message);
                out.entry(m.partition()).or_default().push(message);
            }
        }
    }
    out
}
