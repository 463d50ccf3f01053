//! Broker sinks and sources in configuration files: every kind loads with
//! its documented defaults, and mistakes are reported together, each at
//! its file:line:col.

use caudal_core::config::{Format, SinkConfig, SourceConfig, load_str};

fn no_env(_: &str) -> Option<String> {
    None
}

const GOOD: &str = r#"
[sources.db]
type = "postgres"
url = "postgres://127.0.0.1/x"
mode = "cdc"
tables = ["public.orders"]

[sources.queue]
type = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "orders"
partitions = 4
declare = true
single_active_consumer = true

[sources.stream]
type = "nats"
url = "nats://127.0.0.1:4222"
stream = "ORDERS"
consumer = "deliver"

[sources.topic]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["orders"]
group = "deliver"

[sinks.rabbit]
type = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange = "orders_x"
routing_key = "orders.{{ partition }}"
partitions = 4
declare = { exchange_type = "direct", queue = "orders", single_active_consumer = true }

[sinks.js]
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "orders.{{ record.region }}"
stream = { name = "ORDERS", subjects = ["orders.>"] }

[sinks.kafka]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "orders"

[sinks.partner]
type = "http"
url = "http://127.0.0.1:9/in"

[pipelines.capture]
source = "db"
sink = "rabbit"

[pipelines.deliver]
source = "queue"
sink = "partner"
ack = "delivered"
"#;

#[test]
fn every_broker_kind_loads_with_its_defaults() {
    let config = load_str(GOOD, Format::Toml, "c.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
    let SourceConfig::Rabbitmq(q) = &config.sources["queue"] else {
        panic!("a rabbitmq source")
    };
    assert_eq!((q.partitions, q.prefetch), (4, 2000));
    assert!(config.sources["stream"].is_broker() && config.sources["topic"].is_broker());
    let SourceConfig::Kafka(k) = &config.sources["topic"] else {
        panic!("a kafka source")
    };
    assert_eq!(k.start, "earliest");
    let SinkConfig::Nats(js) = &config.sinks["js"] else {
        panic!("a nats sink")
    };
    assert_eq!(js.timeout.as_std(), std::time::Duration::from_secs(30));
    let SourceConfig::Nats(n) = &config.sources["stream"] else {
        panic!("a nats source")
    };
    assert_eq!(
        (n.partitions, n.lease.as_std()),
        (1, std::time::Duration::from_secs(10))
    );
    assert_eq!(
        config.sinks["kafka"].batch().map(|b| b.max_records),
        Some(1000)
    );
}

#[test]
fn mistakes_are_reported_together_where_they_are() {
    let bad = r#"
[sources.queue]
type = "rabbitmq"
url = "http://127.0.0.1:5672"
queue = "orders"
single_active_consumer = true

[sources.partitioned]
type = "nats"
url = "nats://127.0.0.1:4222"
stream = "ORDERS"
consumer = "deliver"
partitions = 4
lease = "0s"

[sources.wildcard]
type = "nats"
url = "nats://127.0.0.1:4222"
stream = "ORDERS"
consumer = "deliver"
filter_subject = "orders.>"
partitions = 2

[sources.topic]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = []
group = "g"
start = "newest"
options = { "enable.auto.commit" = "true" }

[sinks.js]
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "orders.{{ recrd.region }}"

[sinks.kafka]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "t"
options = { acks = "1" }

[pipelines.deliver]
source = "queue"
sink = "js"
schedule = { every = "1h" }
"#;
    let err = load_str(bad, Format::Toml, "c.toml", &no_env)
        .expect_err("mistakes")
        .to_string();
    for expected in [
        "c.toml:4:7: sources.queue.url: expected a URL starting with amqp:// or amqps://",
        "sources.queue.single_active_consumer: is a property of a queue caudal declares",
        "sources.topic.topics: name at least one topic",
        "sources.topic.start: expected \"earliest\" or \"latest\", found \"newest\"",
        "c.toml:13:14: sources.partitioned.partitions: needs filter_subject, the partition subjects' prefix",
        "c.toml:14:9: sources.partitioned.lease: must be at least 1s",
        "c.toml:21:18: sources.wildcard.filter_subject: with partitions, is the partition subjects' prefix",
        "c.toml:30:13: sources.topic.options.\"enable.auto.commit\": caudal sets this itself",
        "sinks.js.subject: template uses unknown variable `recrd`",
        "c.toml:41:13: sinks.kafka.options.acks: caudal sets this itself",
        "pipelines.deliver.schedule: source \"queue\" consumes its broker continuously; remove the schedule",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
