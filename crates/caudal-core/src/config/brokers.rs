//! Brokers: RabbitMQ, NATS JetStream and Kafka as sinks (a batch is
//! delivered when the broker has confirmed every message of it) and as
//! sources (a message is acknowledged to the broker once its record is
//! durable in caudal's buffer, or delivered with `ack = "delivered"`).
//!
//! Promises of these settings:
//! - Every broker sink shares `batch` and `delivery` with the HTTP sink:
//!   the same retries, breaker, rate limit, concurrency and dead letters.
//! - Names that route a message (RabbitMQ routing key, NATS subject, Kafka
//!   topic) may be minijinja templates over the record; they are checked
//!   when the file is loaded, like an HTTP body template.
//! - Broker URLs may carry passwords: they are redacted in every message.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::delivery::{DeliveryConfig, check_delivery};
use super::load::path::{FieldPath, Problem};
use super::sinks::BatchConfig;
use crate::units::{Duration, Secret, redact_url};

/// Default time the broker has to confirm a whole batch.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Default messages a source consumer may hold unacknowledged.
pub const DEFAULT_PREFETCH: u16 = 2000;

/// Variables a routing template (routing key, subject, topic) sees.
pub const ROUTING_TEMPLATE_VARIABLES: &[&str] = &["record", "key", "pipeline", "partition"];

/// A RabbitMQ exchange receiving every record as one persistent message,
/// with publisher confirms.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqSinkConfig {
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`).
    pub url: Secret,
    /// The exchange messages are published to (default `""`, the default
    /// exchange, which routes to the queue named by the routing key).
    #[serde(default)]
    pub exchange: String,
    /// The routing key: a template over `record`, `key`, `pipeline` and
    /// `partition` (default: the name of `declare.queue`, else `""`).
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Declares the exchange and/or a queue bound to it when the sink
    /// connects (all durable). Without it they must exist.
    #[serde(default)]
    pub declare: Option<RabbitmqDeclare>,
    /// Key-hash partitions `partition` counts to (default 1): with
    /// `routing_key = "orders.{{ partition }}"` each key always goes to
    /// the same queue.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// When a batch is cut and published.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Time the broker has to confirm a whole batch (default `"30s"`).
    #[serde(default = "default_confirm_timeout")]
    pub timeout: Duration,
    /// Retries, breaker, rate limit and concurrency, as for every sink.
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// What a RabbitMQ sink or source declares (durable, idempotently).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqDeclare {
    /// Exchange type when the sink declares its exchange: `direct`
    /// (default), `topic`, `fanout` or `headers`.
    #[serde(default)]
    pub exchange_type: Option<String>,
    /// A queue to declare and bind to the exchange. With `partitions`, the
    /// queues `NAME.0` … `NAME.{partitions-1}` are declared, each bound by
    /// its partition number.
    #[serde(default)]
    pub queue: Option<String>,
    /// The binding key of the queue (default: the queue's name).
    #[serde(default)]
    pub binding_key: Option<String>,
    /// Declare the queues with `x-single-active-consumer`: one consumer
    /// reads a queue at a time, the others wait to take over (order kept
    /// through failover).
    #[serde(default)]
    pub single_active_consumer: bool,
}

/// A NATS JetStream subject receiving every record as one message,
/// acknowledged by the stream; `Nats-Msg-Id` is the record's event id, so
/// the stream's duplicate window drops re-sends.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// `nats://host:4222` (several separated by commas).
    pub url: Secret,
    /// The subject: a template over `record`, `key`, `pipeline` and
    /// `partition`.
    pub subject: String,
    /// Creates the stream when the sink connects, if it does not exist.
    #[serde(default)]
    pub stream: Option<NatsStream>,
    /// Key-hash partitions `partition` counts to (default 1).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// When a batch is cut and published.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Time the stream has to acknowledge a whole batch (default `"30s"`).
    #[serde(default = "default_confirm_timeout")]
    pub timeout: Duration,
    /// Retries, breaker, rate limit and concurrency, as for every sink.
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// A JetStream stream to create when missing.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsStream {
    /// The stream's name.
    pub name: String,
    /// The subjects it captures (e.g. `["orders.>"]`).
    pub subjects: Vec<String>,
    /// How long the stream remembers message ids to drop duplicates
    /// (default `"2m"`, the server's).
    #[serde(default)]
    pub duplicate_window: Option<Duration>,
}

/// A Kafka topic receiving every record as one message from an idempotent
/// producer (`acks=all`); the message key is the record key, so one key's
/// records stay in one partition, in order.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topic: a template over `record`, `key`, `pipeline` and
    /// `partition`.
    pub topic: String,
    /// More librdkafka producer properties (e.g. `"compression.type" =
    /// "lz4"`); caudal's own (`enable.idempotence`, `acks`) cannot be
    /// overridden.
    #[serde(default)]
    pub options: BTreeMap<String, Secret>,
    /// When a batch is cut and produced.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Time the brokers have to acknowledge a whole batch (default
    /// `"30s"`).
    #[serde(default = "default_confirm_timeout")]
    pub timeout: Duration,
    /// Retries, breaker, rate limit and concurrency, as for every sink.
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// Messages of a RabbitMQ queue as records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqSourceConfig {
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`).
    pub url: Secret,
    /// The queue to consume. With `partitions`, the queues `NAME.0` …
    /// `NAME.{partitions-1}`.
    pub queue: String,
    /// Partition queues to consume (default 1: the queue itself).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Declare the queue(s) (durable) when missing.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`: declare them single-active-consumer (one consumer
    /// at a time per queue; order kept through failover).
    #[serde(default)]
    pub single_active_consumer: bool,
    /// Messages held unacknowledged at once (default 2000).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Add each message's metadata (id, route, headers, partition,
    /// offset, redelivered) to its record under this field name, e.g.
    /// `"_message"` (default: the record is the message body alone).
    #[serde(default)]
    pub metadata_field: Option<String>,
}

/// Messages of a JetStream stream, read by a durable pull consumer shared
/// by every caudal process naming it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// `nats://host:4222`.
    pub url: Secret,
    /// The stream to read.
    pub stream: String,
    /// The durable consumer's name (created when missing).
    pub consumer: String,
    /// Only subjects matching this filter (default: every subject of the
    /// stream). With `partitions` above 1, the partition subjects' prefix:
    /// partition `i` reads the subject `FILTER.i`.
    #[serde(default)]
    pub filter_subject: Option<String>,
    /// Key-hash partitions to read in order (default 1: one durable
    /// consumer shared by every process, no per-key order). Above 1, each
    /// partition subject `FILTER.i` has its own durable consumer
    /// (`CONSUMER-i`), read by one process at a time: the one holding its
    /// lease in the key-value bucket `caudal_owners_STREAM_CONSUMER`.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// How long a partition stays with a process that stopped renewing its
    /// lease (crashed, cut off) before another process takes it over
    /// (default `"10s"`; renewed every third of it).
    #[serde(default = "default_lease")]
    pub lease: Duration,
    /// How long a message delivered and not acknowledged waits before the
    /// stream delivers it again (default `"30s"`).
    #[serde(default = "default_ack_wait")]
    pub ack_wait: Duration,
    /// Messages fetched and held unacknowledged at once (default 2000).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Add each message's metadata (id, route, headers, partition,
    /// offset, redelivered) to its record under this field name, e.g.
    /// `"_message"` (default: the record is the message body alone).
    #[serde(default)]
    pub metadata_field: Option<String>,
}

/// Messages of Kafka topics, read in a consumer group.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// The consumer group; processes in one group share the partitions.
    pub group: String,
    /// Where a group with no committed offset starts: `earliest`
    /// (default) or `latest`.
    #[serde(default = "default_offset_reset")]
    pub start: String,
    /// More librdkafka consumer properties; caudal's own
    /// (`enable.auto.commit`, `group.id`) cannot be overridden.
    #[serde(default)]
    pub options: BTreeMap<String, Secret>,
    /// Add each message's metadata (id, route, headers, partition,
    /// offset, redelivered) to its record under this field name, e.g.
    /// `"_message"` (default: the record is the message body alone).
    #[serde(default)]
    pub metadata_field: Option<String>,
}

fn default_partitions() -> u32 {
    1
}

fn default_confirm_timeout() -> Duration {
    DEFAULT_CONFIRM_TIMEOUT
}

fn default_prefetch() -> u16 {
    DEFAULT_PREFETCH
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_offset_reset() -> String {
    "earliest".into()
}

/// librdkafka properties caudal sets itself.
pub const KAFKA_RESERVED_PRODUCER: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "bootstrap.servers",
];
/// librdkafka consumer properties caudal sets itself.
pub const KAFKA_RESERVED_CONSUMER: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

/// Checks a routing template compiles and reads only what it is given.
pub fn check_routing_template(text: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    let template = env
        .template_from_str(text)
        .map_err(|e| format!("template does not compile: {e}"))?;
    let mut unknown: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !ROUTING_TEMPLATE_VARIABLES.contains(&v.as_str()))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    Err(format!(
        "template uses unknown variable{} {}; it sees {}",
        if unknown.len() == 1 { "" } else { "s" },
        unknown
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", "),
        ROUTING_TEMPLATE_VARIABLES
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn check_url(path: &FieldPath, url: &str, schemes: &[&str], out: &mut Vec<Problem>) {
    let lower = url.to_ascii_lowercase();
    let ok = url.split(',').all(|one| {
        let one = one.trim().to_ascii_lowercase();
        schemes.iter().any(|s| {
            one.strip_prefix(s)
                .and_then(|r| r.strip_prefix("://"))
                .is_some_and(|rest| !rest.is_empty())
        })
    });
    if !ok || lower.is_empty() {
        out.push(Problem::at(
            path.key("url"),
            format!(
                "expected a URL starting with {}, found {:?}",
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                redact_url(url)
            ),
        ));
    }
}

fn check_batch_and_delivery(
    path: &FieldPath,
    batch: &BatchConfig,
    timeout: Duration,
    delivery: &DeliveryConfig,
    out: &mut Vec<Problem>,
) {
    if batch.max_records == 0 {
        out.push(Problem::at(
            path.key("batch").key("max_records"),
            "must be greater than 0",
        ));
    }
    if batch.max_bytes.0 == 0 {
        out.push(Problem::at(
            path.key("batch").key("max_bytes"),
            "must be greater than 0",
        ));
    }
    if timeout.as_std().is_zero() {
        out.push(Problem::at(path.key("timeout"), "must be greater than 0s"));
    }
    check_delivery(&path.key("delivery"), delivery, out);
}

fn check_template(path: FieldPath, text: &str, out: &mut Vec<Problem>) {
    if text.trim().is_empty() {
        out.push(Problem::at(path, "must not be empty"));
    } else if let Err(message) = check_routing_template(text) {
        out.push(Problem::at(path, message));
    }
}

fn check_partitions(path: &FieldPath, partitions: u32, out: &mut Vec<Problem>) {
    if partitions == 0 {
        out.push(Problem::at(
            path.key("partitions"),
            "must be at least 1 (1: no partitions)",
        ));
    }
}

pub(super) fn check_rabbitmq_sink(
    path: &FieldPath,
    sink: &RabbitmqSinkConfig,
    out: &mut Vec<Problem>,
) {
    check_url(path, sink.url.expose(), &["amqp", "amqps"], out);
    if let Some(key) = &sink.routing_key
        && let Err(message) = check_routing_template(key)
    {
        out.push(Problem::at(path.key("routing_key"), message));
    }
    if let Some(declare) = &sink.declare
        && let Some(kind) = &declare.exchange_type
        && !["direct", "topic", "fanout", "headers"].contains(&kind.as_str())
    {
        out.push(Problem::at(
            path.key("declare").key("exchange_type"),
            format!("unknown exchange type {kind:?}; expected direct, topic, fanout or headers"),
        ));
    }
    if let Some(declare) = &sink.declare
        && declare.exchange_type.is_some()
        && sink.exchange.is_empty()
    {
        out.push(Problem::at(
            path.key("declare").key("exchange_type"),
            "the default exchange (exchange = \"\") cannot be declared: name an exchange",
        ));
    }
    check_partitions(path, sink.partitions, out);
    check_batch_and_delivery(path, &sink.batch, sink.timeout, &sink.delivery, out);
}

pub(super) fn check_nats_sink(path: &FieldPath, sink: &NatsSinkConfig, out: &mut Vec<Problem>) {
    check_url(path, sink.url.expose(), &["nats", "tls"], out);
    check_template(path.key("subject"), &sink.subject, out);
    if let Some(stream) = &sink.stream {
        if stream.name.is_empty() || stream.name.contains(['.', '*', '>', ' ']) {
            out.push(Problem::at(
                path.key("stream").key("name"),
                "a stream name is not empty and has no '.', '*', '>' or space",
            ));
        }
        if stream.subjects.is_empty() {
            out.push(Problem::at(
                path.key("stream").key("subjects"),
                "list the subjects the stream captures, e.g. [\"orders.>\"]",
            ));
        }
    }
    check_partitions(path, sink.partitions, out);
    check_batch_and_delivery(path, &sink.batch, sink.timeout, &sink.delivery, out);
}

pub(super) fn check_kafka_sink(path: &FieldPath, sink: &KafkaSinkConfig, out: &mut Vec<Problem>) {
    if sink.brokers.trim().is_empty() {
        out.push(Problem::at(
            path.key("brokers"),
            "name the bootstrap servers, e.g. \"127.0.0.1:9092\"",
        ));
    }
    check_template(path.key("topic"), &sink.topic, out);
    for name in sink.options.keys() {
        if KAFKA_RESERVED_PRODUCER.contains(&name.as_str()) {
            out.push(Problem::at_key(
                path.key("options").key(name.clone()),
                "caudal sets this itself (an idempotent producer with acks=all)",
            ));
        }
    }
    check_batch_and_delivery(path, &sink.batch, sink.timeout, &sink.delivery, out);
}

pub(super) fn check_rabbitmq_source(
    path: &FieldPath,
    source: &RabbitmqSourceConfig,
    out: &mut Vec<Problem>,
) {
    check_url(path, source.url.expose(), &["amqp", "amqps"], out);
    if source.queue.is_empty() {
        out.push(Problem::at(path.key("queue"), "must not be empty"));
    }
    if source.prefetch == 0 {
        out.push(Problem::at(path.key("prefetch"), "must be greater than 0"));
    }
    if source.single_active_consumer && !source.declare {
        out.push(Problem::at(
            path.key("single_active_consumer"),
            "is a property of a queue caudal declares: set declare = true too, \
             or declare the queue with x-single-active-consumer yourself",
        ));
    }
    check_partitions(path, source.partitions, out);
}

pub(super) fn check_nats_source(
    path: &FieldPath,
    source: &NatsSourceConfig,
    out: &mut Vec<Problem>,
) {
    check_url(path, source.url.expose(), &["nats", "tls"], out);
    for (field, value) in [("stream", &source.stream), ("consumer", &source.consumer)] {
        if value.is_empty() || value.contains(['.', '*', '>', ' ']) {
            out.push(Problem::at(
                path.key(field),
                "is not empty and has no '.', '*', '>' or space",
            ));
        }
    }
    if source.prefetch == 0 {
        out.push(Problem::at(path.key("prefetch"), "must be greater than 0"));
    }
    if source.ack_wait.as_std().is_zero() {
        out.push(Problem::at(path.key("ack_wait"), "must be greater than 0s"));
    }
    check_partitions(path, source.partitions, out);
    if source.partitions > 1 {
        match &source.filter_subject {
            None => out.push(Problem::at(
                path.key("partitions"),
                "needs filter_subject, the partition subjects' prefix: partition i reads \
                 FILTER.i (a sink with partitions publishes to e.g. \"FILTER.{{ partition }}\")",
            )),
            Some(filter) if filter.is_empty() || filter.contains(['*', '>', ' ']) => {
                out.push(Problem::at(
                    path.key("filter_subject"),
                    "with partitions, is the partition subjects' prefix (partition i reads \
                     FILTER.i): not empty, no '*', '>' or space",
                ));
            }
            Some(_) => {}
        }
        if source.lease.as_std() < std::time::Duration::from_secs(1) {
            out.push(Problem::at(path.key("lease"), "must be at least 1s"));
        }
    }
}

pub(super) fn check_kafka_source(
    path: &FieldPath,
    source: &KafkaSourceConfig,
    out: &mut Vec<Problem>,
) {
    if source.brokers.trim().is_empty() {
        out.push(Problem::at(
            path.key("brokers"),
            "name the bootstrap servers, e.g. \"127.0.0.1:9092\"",
        ));
    }
    if source.topics.is_empty() {
        out.push(Problem::at(path.key("topics"), "name at least one topic"));
    }
    if source.group.is_empty() {
        out.push(Problem::at(path.key("group"), "must not be empty"));
    }
    if !["earliest", "latest"].contains(&source.start.as_str()) {
        out.push(Problem::at(
            path.key("start"),
            format!(
                "expected \"earliest\" or \"latest\", found {:?}",
                source.start
            ),
        ));
    }
    for name in source.options.keys() {
        if KAFKA_RESERVED_CONSUMER.contains(&name.as_str()) {
            out.push(Problem::at_key(
                path.key("options").key(name.clone()),
                "caudal sets this itself (offsets are stored once records are durable)",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_templates_see_only_their_variables() {
        assert!(check_routing_template("orders.{{ partition }}").is_ok());
        assert!(check_routing_template("{{ record.region }}.{{ key }}").is_ok());
        let err = check_routing_template("{{ recrd.x }}").expect_err("unknown variable");
        assert!(err.contains("`recrd`"), "{err}");
        assert!(check_routing_template("{{ oops").is_err());
    }
}
