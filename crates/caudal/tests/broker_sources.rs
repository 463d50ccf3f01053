//! Broker sources under fire. Each main test puts 100,000 JSON messages
//! (about 500 keys, a sequence number per key) into a broker and has three
//! `caudal run` processes, each with its own state directory, consume them
//! into the fault-injecting HTTP receiver (a few 503s), while two of the
//! processes are killed with SIGKILL and started again, over and over.
//! Then, from what the receiver accepted:
//!
//! - every message arrived;
//! - a message always arrived under one event id, and one event id always
//!   named one message (for RabbitMQ and NATS: the id derived from the
//!   publisher's message id); every batch idempotency key always named the
//!   same events: duplicates only ever repeat an idempotency key;
//! - per key, the first arrivals of its messages are in publishing order
//!   (RabbitMQ single-active-consumer partition queues, Kafka partitions,
//!   JetStream partition subjects read under caudal's leases, all with
//!   `ack = "delivered"`; not one JetStream consumer shared by every
//!   process).
//!
//! Smaller tests: `ack = "buffered"` loses nothing across kill -9 (messages
//! are acknowledged only once durable in caudal's buffer, which delivers
//! them after a restart); a clean stop right after delivery leaves the
//! broker nothing to deliver again; one JetStream consumer process killed over and
//! over loses nothing (its per-key order is counted: it does not hold);
//! bodies that are not JSON objects become records instead of being
//! dropped.
//!
//! Servers: RabbitMQ at 127.0.0.1:5672 (guest/guest), NATS with JetStream
//! at 127.0.0.1:4222, Kafka as librdkafka's mock cluster in this process.
//! Every test names its own queues, streams and topics and deletes them.
//! `CAUDAL_TEST_BROKER_MESSAGES=10000` runs the main tests smaller (for
//! working on them; the default is the issue's 100,000). Each test prints
//! its seed; `CAUDAL_TEST_SEED=<seed>` replays its messages and kill
//! choices (not the timing).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caudal_core::record::{Position, event_id};
use caudal_testkit::{Behaviour, Proxy, ReceivedRequest, Receiver, Reply};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::PATIENCE;

/// The pipeline every process runs (event ids depend on its name, so it
/// is the same everywhere).
const PIPELINE: &str = "consume";
/// Where the receiver finds the events in a request body.
const EVENTS: &str = "/events";
/// Keys the messages are spread over.
const KEYS: u64 = 500;
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long delivery may make no progress before a test gives up (a
/// killed NATS consumer's messages come back only after `ack_wait`, a
/// killed Kafka member's partitions after its session timeout).
const STALL: Duration = Duration::from_secs(120);
/// How long a main test may take in all before it gives up.
const LIMIT: Duration = Duration::from_secs(900);

/// Messages of each main test: the issue's 100,000 unless
/// `CAUDAL_TEST_BROKER_MESSAGES` says otherwise.
fn message_count() -> usize {
    std::env::var("CAUDAL_TEST_BROKER_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

// ---------------------------------------------------------------------------
// RabbitMQ

/// Four partition queues declared single-active-consumer, three processes
/// with `ack = "delivered"`: one process reads a queue at a time, a killed
/// one's unacknowledged messages go back to the queue in order and to the
/// next consumer. The record key comes from the `caudal-key` header.
///
/// Single-active-consumer hands a queue to the process that waited
/// longest, so queues drift to the process that is never killed; when it
/// alone delivers, its connection is cut (through a proxy) so that the
/// queues move back to the others and the kills keep hitting active
/// consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_three_consumers_with_kills_lose_nothing_and_keep_key_order() {
    let count = message_count();
    let (seed, mut rng) = Rng::seeded();
    let base = unique("caudal-src-rmq");
    let queues: Vec<String> = (0..4).map(|p| format!("{base}.{p}")).collect();
    let mut cleanup = RabbitQueues::new(queues.clone());
    let (_conn, channel) = amqp().await;
    for q in &queues {
        declare_queue(&channel, q, true).await;
    }

    let messages = Arc::new(Message::generate(count, &mut rng));
    let receiver = faulty_receiver().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let via_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let url = if i == SURVIVOR {
                via_proxy.as_str()
            } else {
                AMQP_URL
            };
            let source = format!(
                "type = \"rabbitmq\"\nurl = \"{url}\"\nqueue = \"{base}\"\npartitions = 4\n\
                 declare = true\nsingle_active_consumer = true\n"
            );
            Node::new(i, &receiver, &source, "delivered", None, None)
        })
        .collect();
    // The processes that get killed register first, so they start as the
    // active consumers.
    for node in &mut nodes {
        node.start();
        node.wait_for_log("broker consumer connected").await;
    }

    let started = Instant::now();
    let publisher = {
        let messages = messages.clone();
        let base = base.clone();
        tokio::spawn(async move {
            publish_amqp(&messages, |m| format!("{base}.{}", m.key % 4)).await;
        })
    };
    let fire = Fire {
        step_ms: (400, 1600),
        max_kills: 40,
        cut: Some(&proxy),
    };
    let report = match under_fire(&mut nodes, &receiver, count, &fire, &mut rng, publisher).await {
        Ok(r) => r,
        Err(why) => {
            let mut ready = Vec::new();
            for q in &queues {
                ready.push(ready_count(&channel, q).await);
            }
            panic!("rabbitmq, seed {seed}: {why}\nready in the queues: {ready:?}");
        }
    };
    stop_all(&mut nodes).await;
    let elapsed = started.elapsed();

    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), true);
    eprintln!(
        "rabbitmq: {count} messages in {elapsed:.1?} (seed {seed}); {report}; {}",
        verdict.summary()
    );
    verdict.assert_clean(&format!("rabbitmq, seed {seed}"), &nodes);

    // Whatever the queues still hold was delivered already (every message
    // arrived): the processes stopped before acknowledging it. Counted, not
    // asserted: a clean stop finishes the batches in flight but closes the
    // consumer first, so their messages are not acknowledged and the next
    // consumer delivers them again (duplicates, never losses).
    let mut left = 0;
    for q in &queues {
        left += wait_for_no_consumers(&channel, q).await;
    }
    eprintln!("rabbitmq: {left} delivered messages left unacknowledged by the clean stops");
    cleanup.delete().await;
}

/// `ack = "buffered"` (the default): a message is acknowledged to RabbitMQ
/// once durable in caudal's buffer. The receiver answers only 503 until
/// the end, so everything read stays in the buffer. The process is killed
/// mid-intake (what it had not acknowledged goes back to the queue), then
/// again once it has read the rest and acknowledged everything: this time
/// the queue gets nothing back, so every message lives only in caudal's
/// buffer, and the restarted process delivers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_ack_buffered_loses_nothing_across_kill() {
    const COUNT: usize = 20_000;
    let (seed, mut rng) = Rng::seeded();
    let queue = unique("caudal-src-buf");
    let mut cleanup = RabbitQueues::new(vec![queue.clone()]);
    let (_conn, channel) = amqp().await;
    declare_queue(&channel, &queue, false).await;
    let messages = Message::generate(COUNT, &mut rng);
    publish_amqp(&messages, |_| queue.clone()).await;

    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let port = free_port();
    // A small prefetch spreads the intake over seconds: the first kill
    // lands in the middle of it.
    let source =
        format!("type = \"rabbitmq\"\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\nprefetch = 200\n");
    let mut node = Node::new(0, &receiver, &source, "buffered", None, Some(port));
    let metrics = Metrics(port);
    node.start();
    metrics
        .wait_for(&node, "a quarter of the messages read", |m| {
            m.get("caudal_records_read_total") >= (COUNT / 4) as f64
        })
        .await;
    node.kill().await;
    let rest = wait_for_no_consumers(&channel, &queue).await;
    assert!(
        (1..COUNT as u32).contains(&rest),
        "killed mid-intake, {rest} of {COUNT} messages are back in the queue"
    );

    // The second run reads the rest (counters start again at 0), then
    // acknowledges all of it: a sample of the gauges taken after the last
    // read (the checkpoint age moves with every sample) shows none unacked.
    node.start();
    let read = metrics
        .wait_for(&node, "the rest read", |m| {
            m.get("caudal_records_read_total") >= f64::from(rest)
        })
        .await;
    metrics
        .wait_for(&node, "everything read acknowledged", |m| {
            let age = m.get("caudal_checkpoint_age_seconds");
            age.is_finite()
                && age != read.get("caudal_checkpoint_age_seconds")
                && m.get("caudal_broker_unacked_messages") == 0.0
                && m.get("caudal_broker_connected") == 1.0
        })
        .await;
    assert!(
        receiver.requests().iter().all(|r| !r.accepted()),
        "the receiver accepted nothing yet"
    );
    node.kill().await;
    let left = wait_for_no_consumers(&channel, &queue).await;
    assert_eq!(
        left, 0,
        "RabbitMQ gave {left} messages back after the second kill: acknowledged late \
         or never although caudal had read and buffered them"
    );

    receiver.set_status(200);
    node.start();
    let mut progress = Progress::new(COUNT, 1);
    let done = receiver
        .wait_for(|reqs| progress.scan(reqs) == 0, STALL)
        .await;
    assert!(
        done,
        "{} of {COUNT} messages missing after the restart (seed {seed}); log:\n{}",
        progress.missing,
        node.log()
    );
    node.stop().await;
    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), true);
    eprintln!(
        "rabbitmq buffered: {rest} back after the first kill; {}",
        verdict.summary()
    );
    verdict.assert_clean(
        &format!("rabbitmq ack=buffered, seed {seed}"),
        std::slice::from_ref(&node),
    );
    cleanup.delete().await;
}

/// A clean stop (SIGTERM) right after everything read was delivered, with
/// `ack = "buffered"`: the process acknowledges what it made durable last
/// and closes its connection cleanly before it exits, so the queue gives
/// nothing back (acknowledgements still queued in the client when the
/// process exited were lost, and those messages were delivered again).
/// Three rounds of publishing, delivering and stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_clean_stops_leave_nothing_to_deliver_again() {
    let (seed, mut rng) = Rng::seeded();
    let queue = unique("caudal-src-stop");
    let mut cleanup = RabbitQueues::new(vec![queue.clone()]);
    let (_conn, channel) = amqp().await;
    declare_queue(&channel, &queue, false).await;
    let messages = Message::generate(30_000, &mut rng);
    let source = format!("type = \"rabbitmq\"\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\n");
    let (node, receiver) = clean_stops_after_delivery(
        &source,
        None,
        &messages,
        async |chunk| publish_amqp(chunk, |_| queue.clone()).await,
        async || wait_for_no_consumers(&channel, &queue).await,
    )
    .await;
    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), true);
    eprintln!("rabbitmq clean stops (seed {seed}): {}", verdict.summary());
    verdict.assert_clean(
        &format!("rabbitmq clean stops, seed {seed}"),
        std::slice::from_ref(&node),
    );
    assert_eq!(verdict.duplicates, 0, "seed {seed}");
    cleanup.delete().await;
}

/// The same from a JetStream durable consumer: after each stop the
/// consumer holds no message delivered and unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_clean_stops_leave_nothing_to_deliver_again() {
    let (seed, mut rng) = Rng::seeded();
    let stream = unique("caudal_src_stop").replace('-', "_");
    let mut cleanup = NatsStream::create(&stream).await;
    let messages = Message::generate(30_000, &mut rng);
    let source = format!(
        "type = \"nats\"\nurl = \"{NATS_URL}\"\nstream = \"{stream}\"\nconsumer = \"deliver\"\n"
    );
    let js = jetstream().await;
    let (node, receiver) = clean_stops_after_delivery(
        &source,
        Some("account"),
        &messages,
        async |chunk| publish_nats(&stream, chunk).await,
        async || {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream("deliver", &stream)
                .await
                .expect("the durable consumer");
            let info = consumer.info().await.expect("consumer info");
            u32::try_from(info.num_ack_pending + info.num_pending as usize).unwrap_or(u32::MAX)
        },
    )
    .await;
    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), true);
    eprintln!("nats clean stops (seed {seed}): {}", verdict.summary());
    verdict.assert_clean(
        &format!("nats clean stops, seed {seed}"),
        std::slice::from_ref(&node),
    );
    assert_eq!(verdict.duplicates, 0, "seed {seed}");
    cleanup.delete().await;
}

/// Three rounds: `publish` a third of `messages`, run one `ack =
/// "buffered"` process on `source` (records keyed by `key`, else by the
/// `caudal-key` header) until the receiver has them all, stop it with
/// SIGTERM at once, and ask the broker (`left`) how many messages it would
/// deliver again: none. Returns the process and the receiver.
async fn clean_stops_after_delivery(
    source: &str,
    key: Option<&str>,
    messages: &[Message],
    publish: impl AsyncFn(&[Message]),
    left: impl AsyncFn() -> u32,
) -> (Node, Receiver) {
    let receiver = Receiver::start().await;
    let mut node = Node::new(0, &receiver, source, "buffered", key, None);
    let mut progress = Progress::new(messages.len(), 1);
    let chunk = messages.len().div_ceil(3);
    for (round, part) in messages.chunks(chunk).enumerate() {
        publish(part).await;
        node.start();
        let want = messages.len() - (round * chunk + part.len());
        let done = receiver
            .wait_for(|reqs| progress.scan(reqs) == want, STALL)
            .await;
        assert!(
            done,
            "round {round}: {} messages missing; log:\n{}",
            progress.missing - want,
            node.log()
        );
        node.stop().await;
        let back = left().await;
        assert_eq!(
            back,
            0,
            "round {round}: the broker holds {back} messages to deliver again after a clean \
             stop that followed their delivery; log:\n{}",
            node.log()
        );
    }
    (node, receiver)
}

/// Bodies that are not JSON objects are records too: other JSON under
/// `value`, text under `body`, bytes under `body_base64`; two messages
/// with the same body (no message id) both arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_bodies_that_are_not_json_objects_become_records() {
    let queue = unique("caudal-src-odd");
    let mut cleanup = RabbitQueues::new(vec![queue.clone()]);
    let (_conn, channel) = amqp().await;
    declare_queue(&channel, &queue, false).await;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for (body, _) in odd_bodies() {
        publish_one(&channel, &queue, body, lapin::BasicProperties::default()).await;
    }
    let source = format!("type = \"rabbitmq\"\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\n");
    let ids = odd_bodies_arrive(&source).await;
    // The two identical bodies without a message id share their id (a
    // digest of the message): noted, not asserted.
    eprintln!(
        "rabbitmq odd bodies: {} events, {} distinct ids",
        ids.len(),
        ids.iter().collect::<std::collections::BTreeSet<_>>().len()
    );
    cleanup.delete().await;
}

// ---------------------------------------------------------------------------
// Kafka (librdkafka's mock cluster)

/// A topic with 6 partitions, messages keyed by account, three processes
/// in one consumer group with `ack = "delivered"` and a 6 s session
/// timeout; a killed member's partitions move to the others, which start
/// from the last committed offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_group_of_three_with_kills_loses_nothing_and_keeps_key_order() {
    use rdkafka::mocking::MockCluster;

    let count = message_count();
    let (seed, mut rng) = Rng::seeded();
    let topic = unique("caudal-src-kafka");
    let cluster = MockCluster::new(3).expect("librdkafka's mock cluster starts");
    cluster
        .create_topic(&topic, 6, 1)
        .expect("create the topic on the mock cluster");
    let brokers = cluster.bootstrap_servers();

    let messages = Arc::new(Message::generate(count, &mut rng));
    let receiver = faulty_receiver().await;
    let source = format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup = \"deliver\"\n\
         start = \"earliest\"\nmetadata_field = \"_message\"\n\
         options = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\", \
         \"auto.commit.interval.ms\" = \"500\" }}\n"
    );
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(i, &receiver, &source, "delivered", None, None))
        .collect();
    for node in &mut nodes {
        node.start();
    }

    let started = Instant::now();
    let publisher = {
        let messages = messages.clone();
        let (brokers, topic) = (brokers.clone(), topic.clone());
        tokio::spawn(async move { publish_kafka(&brokers, &topic, &messages).await })
    };
    let fire = Fire {
        step_ms: (1500, 4000),
        max_kills: 12,
        cut: None,
    };
    let report = under_fire(&mut nodes, &receiver, count, &fire, &mut rng, publisher)
        .await
        .unwrap_or_else(|why| panic!("seed {seed}: {why}"));
    stop_all(&mut nodes).await;
    let elapsed = started.elapsed();

    // Kafka messages carry no id: the record id is topic/partition/offset.
    let requests = receiver.requests();
    let verdict = analyse(&requests, &messages, None, true);
    let mut ends: BTreeMap<i64, i64> = BTreeMap::new();
    for e in requests
        .iter()
        .filter(|r| r.accepted())
        .flat_map(|r| r.records_at(EVENTS))
    {
        let meta = &e["data"]["_message"];
        if let (Some(p), Some(o)) = (meta["partition"].as_i64(), meta["offset"].as_i64()) {
            let end = ends.entry(p).or_default();
            *end = (*end).max(o + 1);
        }
    }
    eprintln!(
        "kafka: {count} messages in {elapsed:.1?} (seed {seed}); {report}; {}; \
         partition ends {ends:?}",
        verdict.summary()
    );
    verdict.assert_clean(&format!("kafka, seed {seed}"), &nodes);
    drop(cluster);
}

/// Kafka bodies that are not JSON objects (and a tombstone) are records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_bodies_that_are_not_json_objects_become_records() {
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let topic = unique("caudal-src-kodd");
    let cluster = MockCluster::new(1).expect("librdkafka's mock cluster starts");
    cluster
        .create_topic(&topic, 1, 1)
        .expect("create the topic");
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("a Kafka producer");
    for (body, _) in odd_bodies() {
        producer
            .send(
                FutureRecord::<(), [u8]>::to(&topic).payload(body),
                Duration::from_secs(30),
            )
            .await
            .expect("produced");
    }
    // A tombstone: a key and no payload.
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&topic).key("gone"),
            Duration::from_secs(30),
        )
        .await
        .expect("produced");
    let source = format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup = \"odd\"\n"
    );
    let ids = odd_bodies_arrive_with(&source, &[json!({"body": ""})]).await;
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        ids.len(),
        "Kafka messages are told apart by their offsets"
    );
    drop(cluster);
}

// ---------------------------------------------------------------------------
// NATS JetStream

/// One durable pull consumer shared by three processes with `ack =
/// "delivered"`: completeness and stable ids hold through kills; per-key
/// order does not on this server (no pinned consumers), so the out-of-order
/// first arrivals are counted and printed, not asserted. The record key is
/// the `account` field (`key = "account"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_three_consumers_with_kills_lose_nothing() {
    let count = message_count();
    let (seed, mut rng) = Rng::seeded();
    let stream = unique("caudal_src_nats").replace('-', "_");
    let mut cleanup = NatsStream::create(&stream).await;
    let messages = Arc::new(Message::generate(count, &mut rng));
    let receiver = faulty_receiver().await;
    let source = format!(
        "type = \"nats\"\nurl = \"{NATS_URL}\"\nstream = \"{stream}\"\nconsumer = \"deliver\"\n\
         filter_subject = \"{stream}.>\"\nack_wait = \"10s\"\nprefetch = 500\n"
    );
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(i, &receiver, &source, "delivered", Some("account"), None))
        .collect();
    // The durable consumer is created by the first process; the others
    // then find it.
    nodes[0].start();
    nodes[0].wait_for_log("broker consumer connected").await;
    nodes[1].start();
    nodes[2].start();

    let started = Instant::now();
    let publisher = {
        let messages = messages.clone();
        let stream = stream.clone();
        tokio::spawn(async move { publish_nats(&stream, &messages).await })
    };
    let fire = Fire {
        step_ms: (400, 1600),
        max_kills: 30,
        cut: None,
    };
    let report = under_fire(&mut nodes, &receiver, count, &fire, &mut rng, publisher)
        .await
        .unwrap_or_else(|why| panic!("seed {seed}: {why}"));
    stop_all(&mut nodes).await;
    let elapsed = started.elapsed();

    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), false);
    eprintln!(
        "nats: {count} messages in {elapsed:.1?} (seed {seed}); {report}; {}",
        verdict.summary()
    );
    verdict.assert_clean(&format!("nats, seed {seed}"), &nodes);
    cleanup.delete().await;
}

/// JetStream partitions read in order: four partition subjects, each with
/// its own durable consumer held by one process at a time through a lease
/// in a key-value bucket, three processes with `ack = "delivered"`, two
/// killed over and over. A process taking a partition over re-creates its
/// consumer at the ack floor, so per key the first arrivals are in
/// publishing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_partitions_with_kills_lose_nothing_and_keep_key_order() {
    let count = message_count() / 2;
    let (seed, mut rng) = Rng::seeded();
    let stream = unique("caudal_src_natp").replace('-', "_");
    let mut cleanup = NatsStream::create(&stream).await;
    let messages = Arc::new(Message::generate(count, &mut rng));
    let receiver = faulty_receiver().await;
    let consumer = unique("deliver").replace('-', "_");
    let source = format!(
        "type = \"nats\"\nurl = \"{NATS_URL}\"\nstream = \"{stream}\"\nconsumer = \"{consumer}\"\n\
         filter_subject = \"{stream}\"\npartitions = 4\nlease = \"3s\"\nack_wait = \"30s\"\nprefetch = 500\n"
    );
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(i, &receiver, &source, "delivered", Some("account"), None))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    let started = Instant::now();
    let publisher = {
        let messages = messages.clone();
        let stream = stream.clone();
        tokio::spawn(async move { publish_nats(&stream, &messages).await })
    };
    let fire = Fire {
        step_ms: (400, 1600),
        max_kills: 20,
        cut: None,
    };
    let report = under_fire(&mut nodes, &receiver, count, &fire, &mut rng, publisher)
        .await
        .unwrap_or_else(|why| panic!("seed {seed}: {why}"));
    stop_all(&mut nodes).await;
    let elapsed = started.elapsed();
    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), true);
    eprintln!(
        "nats partitions: {count} messages in {elapsed:.1?} (seed {seed}); {report}; {}",
        verdict.summary()
    );
    verdict.assert_clean(&format!("nats partitions, seed {seed}"), &nodes);
    cleanup.delete().await;
    delete_buckets(&[
        format!("caudal_owners_{stream}_{consumer}"),
        format!("caudal_members_{stream}_{consumer}"),
    ])
    .await;
}

/// One process alone on the durable consumer, killed and restarted over
/// and over, with `ack = "delivered"`: nothing is lost and ids are stable.
/// Per-key order does not hold even here, so it is counted, not asserted:
/// the restarted process pulls the messages after the ones the killed
/// process held unacknowledged at once, and JetStream delivers those again
/// only when their `ack_wait` runs out (observed: about a third of the
/// first arrivals out of key order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_one_consumer_with_kills_loses_nothing() {
    let count = message_count() / 5;
    let (seed, mut rng) = Rng::seeded();
    let stream = unique("caudal_src_nats1").replace('-', "_");
    let mut cleanup = NatsStream::create(&stream).await;
    let messages = Arc::new(Message::generate(count, &mut rng));
    let receiver = faulty_receiver().await;
    let source = format!(
        "type = \"nats\"\nurl = \"{NATS_URL}\"\nstream = \"{stream}\"\nconsumer = \"deliver\"\n\
         ack_wait = \"10s\"\nprefetch = 500\n"
    );
    let mut nodes = vec![Node::new(
        0,
        &receiver,
        &source,
        "delivered",
        Some("account"),
        None,
    )];
    nodes[0].start();
    let started = Instant::now();
    let publisher = {
        let messages = messages.clone();
        let stream = stream.clone();
        tokio::spawn(async move { publish_nats(&stream, &messages).await })
    };
    let fire = Fire {
        step_ms: (400, 1600),
        max_kills: 10,
        cut: None,
    };
    let report = under_fire(&mut nodes, &receiver, count, &fire, &mut rng, publisher)
        .await
        .unwrap_or_else(|why| panic!("seed {seed}: {why}"));
    stop_all(&mut nodes).await;
    let elapsed = started.elapsed();
    let verdict = analyse(&receiver.requests(), &messages, Some(&|m| m.id()), false);
    eprintln!(
        "nats, one consumer: {count} messages in {elapsed:.1?} (seed {seed}); {report}; {}",
        verdict.summary()
    );
    verdict.assert_clean(&format!("nats one consumer, seed {seed}"), &nodes);
    cleanup.delete().await;
}

/// NATS bodies that are not JSON objects are records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bodies_that_are_not_json_objects_become_records() {
    let stream = unique("caudal_src_nodd").replace('-', "_");
    let mut cleanup = NatsStream::create(&stream).await;
    let js = jetstream().await;
    for (body, _) in odd_bodies() {
        js.publish(format!("{stream}.odd"), body.to_vec().into())
            .await
            .expect("published")
            .await
            .expect("stored by the stream");
    }
    let source = format!(
        "type = \"nats\"\nurl = \"{NATS_URL}\"\nstream = \"{stream}\"\nconsumer = \"odd\"\n"
    );
    let ids = odd_bodies_arrive(&source).await;
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        ids.len(),
        "JetStream messages are told apart by their stream sequence"
    );
    cleanup.delete().await;
}

// ---------------------------------------------------------------------------
// Messages

/// One published message: the `n`th, of key `key`, the `seq`th of its key.
#[derive(Clone, Debug)]
struct Message {
    n: usize,
    key: u64,
    seq: u64,
}

impl Message {
    /// `count` messages over [`KEYS`] keys picked at random.
    fn generate(count: usize, rng: &mut Rng) -> Vec<Self> {
        let mut next = vec![0u64; KEYS as usize];
        (0..count)
            .map(|n| {
                let key = rng.below(KEYS);
                let slot = &mut next[key as usize];
                *slot += 1;
                Self { n, key, seq: *slot }
            })
            .collect()
    }

    fn account(&self) -> String {
        format!("acct-{:03}", self.key)
    }

    /// The publisher's message id.
    fn id(&self) -> String {
        format!("m-{}", self.n)
    }

    fn body(&self) -> Vec<u8> {
        json!({"account": self.account(), "seq": self.seq, "n": self.n})
            .to_string()
            .into_bytes()
    }
}

/// Bodies that are not JSON objects and the record each must become.
fn odd_bodies() -> Vec<(&'static [u8], Value)> {
    vec![
        (b"not json at all", json!({"body": "not json at all"})),
        (b"not json at all", json!({"body": "not json at all"})),
        (b"[1, 2, 3]", json!({"value": [1, 2, 3]})),
        (b"42", json!({"value": 42})),
        (b"\"text\"", json!({"value": "text"})),
        (b"{\"broken\": ", json!({"body": "{\"broken\": "})),
        (b"\xff\xfe\x00", json!({"body_base64": "//4A"})),
        (b"", json!({"body": ""})),
        (b"{\"ok\": true}", json!({"ok": true})),
    ]
}

/// Runs one process with `source` until the receiver has the records of
/// [`odd_bodies`]; asserts they are exactly those. Returns their ids.
async fn odd_bodies_arrive(source: &str) -> Vec<String> {
    odd_bodies_arrive_with(source, &[]).await
}

/// [`odd_bodies_arrive`] with `more` records expected too.
async fn odd_bodies_arrive_with(source: &str, more: &[Value]) -> Vec<String> {
    let receiver = Receiver::start().await;
    let mut node = Node::new(0, &receiver, source, "buffered", None, None);
    node.start();
    let mut want: Vec<Value> = odd_bodies().into_iter().map(|(_, v)| v).collect();
    want.extend(more.iter().cloned());
    let arrived = receiver
        .wait_for_accepted_records(EVENTS, want.len(), PATIENCE)
        .await;
    assert!(
        arrived,
        "expected {} records, got {:?}; log:\n{}",
        want.len(),
        receiver.accepted_records_at(EVENTS),
        node.log()
    );
    node.stop().await;
    let events = receiver.accepted_records_at(EVENTS);
    let mut got: Vec<String> = events.iter().map(|e| e["data"].to_string()).collect();
    let mut want: Vec<String> = want.iter().map(Value::to_string).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the records of bodies that are not JSON objects");
    events
        .iter()
        .map(|e| e["id"].as_str().expect("an event id").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// The processes

/// Which node is never killed.
const SURVIVOR: usize = 2;

/// One `caudal run` process with its own state directory and config, and
/// its own path at the receiver (`/n<i>`), so the test sees who delivered.
struct Node {
    index: usize,
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<tokio::process::Child>,
    starts: u32,
}

impl Node {
    /// A node whose pipeline reads `[sources.input]` (`source`: the table's
    /// lines) into the receiver; `listen`: serve `/metrics` on that port.
    fn new(
        index: usize,
        receiver: &Receiver,
        source: &str,
        ack: &str,
        key: Option<&str>,
        listen: Option<u16>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("a state directory");
        let key = key.map(|k| format!("key = \"{k}\"\n")).unwrap_or_default();
        let server = listen
            .map(|port| format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\n"))
            .unwrap_or_default();
        let text = format!(
            r#"[state]
url = "sqlite://{state}"

[sources.input]
{source}
[sinks.partner]
type = "http"
url = "{url}"
batch = {{ max_records = 500, max_wait = "100ms" }}
delivery.retry = {{ initial = "50ms", max_delay = "1s" }}
timeout = "30s"
body = '{{"events": {{{{ events | tojson }}}}}}'

[pipelines.{PIPELINE}]
source = "input"
sink = "partner"
ack = "{ack}"
{key}{server}"#,
            state = dir.path().join("state.db").display(),
            url = receiver.url(&format!("/n{index}")),
        );
        let config = dir.path().join("caudal.toml");
        std::fs::write(&config, text).expect("write the config");
        Self {
            index,
            dir,
            config,
            child: None,
            starts: 0,
        }
    }

    /// Starts `caudal run`, logging to `run-<n>.log` in its directory.
    fn start(&mut self) {
        assert!(self.child.is_none(), "node {} runs already", self.index);
        let log = self.log_path(self.starts);
        let file = std::fs::File::create(&log).expect("create the log");
        let mut cmd = support::command(&self.config, self.dir.path(), &["run"]);
        if let Ok(filter) = std::env::var("CAUDAL_TEST_DAEMON_LOG") {
            cmd.env("CAUDAL_LOG", format!("info,{filter}"));
        }
        cmd.stdout(Stdio::from(file.try_clone().expect("clone the log")))
            .stderr(Stdio::from(file));
        self.child = Some(cmd.spawn().expect("start caudal run"));
        self.starts += 1;
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("run-{start}.log"))
    }

    /// The log of the latest start.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts.saturating_sub(1))).unwrap_or_default()
    }

    fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Panics if the process ended by itself.
    fn check_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "node {} exited by itself ({status}); log:\n{}",
                self.index,
                self.log()
            );
        }
    }

    fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("a running process");
        Pid::from_raw(i32::try_from(child.id().expect("not reaped")).expect("pid fits"))
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill(&mut self) {
        self.check_running();
        kill(self.pid(), Signal::SIGKILL).expect("send SIGKILL");
        let mut child = self.child.take().expect("a running process");
        let status = tokio::time::timeout(PATIENCE, child.wait())
            .await
            .expect("a killed process ends")
            .expect("wait for caudal run");
        assert_eq!(status.code(), None, "killed by the signal");
    }

    /// SIGTERM; the process must exit cleanly.
    async fn stop(&mut self) {
        self.check_running();
        kill(self.pid(), Signal::SIGTERM).expect("send SIGTERM");
        let mut child = self.child.take().expect("a running process");
        let status = tokio::time::timeout(PATIENCE, child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "node {} did not stop within {PATIENCE:?}; log:\n{}",
                    self.index,
                    self.log()
                )
            })
            .expect("wait for caudal run");
        assert_eq!(
            status.code(),
            Some(0),
            "node {} stopped uncleanly; log:\n{}",
            self.index,
            self.log()
        );
    }

    /// Waits until the latest log contains `line`.
    async fn wait_for_log(&mut self, line: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(line) {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "node {} never logged {line:?}; log:\n{}",
                self.index,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Stops every node still running (SIGTERM, clean exit).
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut().filter(|n| n.is_up()) {
        node.stop().await;
    }
}

/// A receiver that answers 503 to every 23rd request.
async fn faulty_receiver() -> Receiver {
    let receiver = Receiver::start().await;
    let seen = AtomicUsize::new(0);
    receiver.set_behaviour(Behaviour::custom(move |_| {
        if seen.fetch_add(1, Ordering::Relaxed) % 23 == 22 {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    }));
    receiver
}

/// How the fire is laid: a step every `step_ms` (random in the range); at
/// each step the nodes killed at the previous one start again, and a
/// victim (node 0 or 1) that delivered during the step is killed, at most
/// `max_kills` times. With `cut`, when only the survivor delivered, its
/// connection through that proxy is cut instead.
struct Fire<'a> {
    step_ms: (u64, u64),
    max_kills: u32,
    cut: Option<&'a Proxy>,
}

/// What the fire did.
struct FireReport {
    kills: u32,
    cuts: u32,
    steps: u32,
}

impl std::fmt::Display for FireReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kills, {} connection cuts in {} steps",
            self.kills, self.cuts, self.steps
        )
    }
}

/// Runs the fire until every one of `count` messages has been accepted by
/// the receiver (and `publisher` has finished).
async fn under_fire(
    nodes: &mut [Node],
    receiver: &Receiver,
    count: usize,
    fire: &Fire<'_>,
    rng: &mut Rng,
    publisher: tokio::task::JoinHandle<()>,
) -> Result<FireReport, String> {
    let started = Instant::now();
    let mut progress = Progress::new(count, nodes.len());
    let mut report = FireReport {
        kills: 0,
        cuts: 0,
        steps: 0,
    };
    let mut down: Vec<usize> = Vec::new();
    let mut before = progress.per_node.clone();
    let mut last_missing = count;
    let mut last_change = Instant::now();
    loop {
        let step =
            Duration::from_millis(fire.step_ms.0 + rng.below(fire.step_ms.1 - fire.step_ms.0));
        let done = receiver
            .wait_for(|reqs| progress.scan(reqs) == 0, step)
            .await;
        if done {
            break;
        }
        report.steps += 1;
        for node in nodes.iter_mut() {
            node.check_running();
        }
        if progress.missing < last_missing {
            last_missing = progress.missing;
            last_change = Instant::now();
        }
        if last_change.elapsed() > STALL || started.elapsed() > LIMIT {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| {
                    format!(
                        "--- node {} ({} starts)\n{}",
                        n.index,
                        n.starts,
                        tail(&n.log(), 60)
                    )
                })
                .collect();
            let missing: Vec<usize> = (0..count).filter(|&n| !progress.seen[n]).take(10).collect();
            return Err(format!(
                "{} of {count} messages still missing after {:.0?} ({report}), e.g. {missing:?}; \
                 logs:\n{}",
                progress.missing,
                started.elapsed(),
                logs.join("\n")
            ));
        }
        for i in down.drain(..) {
            nodes[i].start();
        }
        if report.kills < fire.max_kills {
            let active: Vec<usize> = (0..nodes.len())
                .filter(|&i| i != SURVIVOR && nodes[i].is_up() && progress.per_node[i] > before[i])
                .collect();
            if !active.is_empty() {
                let victim = active[rng.below(active.len() as u64) as usize];
                nodes[victim].kill().await;
                down.push(victim);
                report.kills += 1;
            } else if let Some(proxy) = fire.cut
                && progress.per_node[SURVIVOR] > before[SURVIVOR]
            {
                proxy.cut();
                report.cuts += 1;
            }
        }
        before = progress.per_node.clone();
    }
    publisher.await.expect("the publisher finished");
    Ok(report)
}

/// Which messages the receiver has accepted so far, read incrementally.
struct Progress {
    scanned: usize,
    seen: Vec<bool>,
    missing: usize,
    /// Events accepted from each node.
    per_node: Vec<usize>,
}

impl Progress {
    fn new(count: usize, nodes: usize) -> Self {
        Self {
            scanned: 0,
            seen: vec![false; count],
            missing: count,
            per_node: vec![0; nodes],
        }
    }

    /// Reads the requests not read yet; returns how many messages are
    /// still missing.
    fn scan(&mut self, reqs: &[ReceivedRequest]) -> usize {
        for r in &reqs[self.scanned.min(reqs.len())..] {
            if !r.accepted() {
                continue;
            }
            let node = node_of(r);
            for event in r.records_at(EVENTS) {
                if let Some(n) = event["data"]["n"].as_u64().map(|n| n as usize)
                    && n < self.seen.len()
                    && !self.seen[n]
                {
                    self.seen[n] = true;
                    self.missing -= 1;
                }
                if let Some(slot) = node.and_then(|i| self.per_node.get_mut(i)) {
                    *slot += 1;
                }
            }
        }
        self.scanned = reqs.len();
        self.missing
    }
}

/// The node a request came from (its path `/n<i>`).
fn node_of(r: &ReceivedRequest) -> Option<usize> {
    r.path.strip_prefix("/n").and_then(|i| i.parse().ok())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// The verdict

/// What the receiver's accepted requests say about the guarantees.
struct Verdict {
    requests: usize,
    events: usize,
    duplicates: usize,
    out_of_order: usize,
    per_node: BTreeMap<String, usize>,
    problems: Vec<String>,
    problem_count: usize,
}

impl Verdict {
    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < 12 {
            self.problems.push(text);
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} accepted requests, {} events ({} duplicates), per node {:?}, \
             {} first arrivals out of key order",
            self.requests, self.events, self.duplicates, self.per_node, self.out_of_order
        )
    }

    fn assert_clean(&self, what: &str, nodes: &[Node]) {
        if self.problem_count == 0 {
            return;
        }
        let logs: Vec<String> = nodes
            .iter()
            .map(|n| {
                format!(
                    "--- node {} ({} starts)\n{}",
                    n.index,
                    n.starts,
                    tail(&n.log(), 30)
                )
            })
            .collect();
        panic!(
            "{what}: {} problems, the first:\n{}\n{}\nlogs:\n{}",
            self.problem_count,
            self.problems.join("\n"),
            self.summary(),
            logs.join("\n")
        );
    }
}

/// Checks every accepted event against `messages`: the content and key
/// are the message's; one id per message and one message per id (the id
/// derived from `expect_id`'s message id when given); one list of events
/// per batch idempotency key; every message arrived; with `order`, per key
/// the first arrivals in publishing order (otherwise only counted).
fn analyse(
    requests: &[ReceivedRequest],
    messages: &[Message],
    expect_id: Option<&dyn Fn(&Message) -> String>,
    order: bool,
) -> Verdict {
    let mut v = Verdict {
        requests: 0,
        events: 0,
        duplicates: 0,
        out_of_order: 0,
        per_node: BTreeMap::new(),
        problems: Vec::new(),
        problem_count: 0,
    };
    let mut id_of: Vec<Option<String>> = vec![None; messages.len()];
    let mut message_of: HashMap<String, usize> = HashMap::new();
    // Batch idempotency key → (request, its events' ids, their labels).
    type Batch = (String, Vec<String>, Vec<String>);
    let mut batches: HashMap<String, Batch> = HashMap::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    // Per key, every arrival (`path#request:seq[@partition/offset]`), to
    // show what happened to a key that arrived out of order.
    let mut arrivals: HashMap<u64, Vec<String>> = HashMap::new();
    let mut disordered: Vec<u64> = Vec::new();
    for (index, r) in requests.iter().enumerate().filter(|(_, r)| r.accepted()) {
        v.requests += 1;
        let events = r.records_at(EVENTS);
        *v.per_node.entry(r.path.clone()).or_default() += events.len();
        let mut ids = Vec::with_capacity(events.len());
        let mut labels = Vec::with_capacity(events.len());
        for event in &events {
            v.events += 1;
            let id = event["id"].as_str().unwrap_or_default().to_string();
            ids.push(id.clone());
            let meta = &event["data"]["_message"];
            labels.push(format!(
                "m{}{}",
                event["data"]["n"],
                meta.get("offset")
                    .map(|o| format!("@{}/{o}", meta["partition"]))
                    .unwrap_or_default()
            ));
            let Some(n) = event["data"]["n"]
                .as_u64()
                .map(|n| n as usize)
                .filter(|n| *n < messages.len())
            else {
                v.problem(format!("an event that is no message of the test: {event}"));
                continue;
            };
            let m = &messages[n];
            if event["data"]["account"] != m.account().as_str() || event["data"]["seq"] != m.seq {
                v.problem(format!("message {n} arrived changed: {event}"));
            }
            if event["key"] != m.account().as_str() {
                v.problem(format!(
                    "message {n} arrived with key {} instead of {}",
                    event["key"],
                    m.account()
                ));
            }
            if let Some(expect) = expect_id {
                let want = event_id(PIPELINE, &Position::Message { id: expect(m) });
                if id != want {
                    v.problem(format!(
                        "message {n} arrived with id {id}, not the one of its message id {}",
                        expect(m)
                    ));
                }
            }
            if let Some(other) = message_of.insert(id.clone(), n)
                && other != n
            {
                v.problem(format!("id {id} named messages {other} and {n}"));
            }
            match &id_of[n] {
                Some(first) if *first != id => {
                    v.problem(format!("message {n} arrived under ids {first} and {id}"));
                }
                Some(_) => v.duplicates += 1,
                None => {
                    id_of[n] = Some(id.clone());
                    let last = last_seq.entry(m.key).or_insert(0);
                    if m.seq <= *last {
                        v.out_of_order += 1;
                        if order {
                            v.problem(format!(
                                "key {}: message {n} (seq {}) first arrived after seq {} \
                                 (request {index} to {})",
                                m.account(),
                                m.seq,
                                *last,
                                r.path
                            ));
                            if disordered.len() < 3 && !disordered.contains(&m.key) {
                                disordered.push(m.key);
                            }
                        }
                    }
                    *last = (*last).max(m.seq);
                }
            }
            let meta = &event["data"]["_message"];
            arrivals.entry(m.key).or_default().push(format!(
                "{}#{index}:{}{}",
                r.path,
                m.seq,
                meta.get("offset")
                    .map(|o| format!("@{}/{o}", meta["partition"]))
                    .unwrap_or_default()
            ));
        }
        let key = r.header("idempotency-key").unwrap_or_default().to_string();
        if key.is_empty() {
            v.problem(format!(
                "a request to {} without an Idempotency-Key",
                r.path
            ));
        } else if let Some((first, before, before_labels)) = batches.get(&key) {
            if *before != ids {
                let at = before.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                let show = |l: &[String]| {
                    format!(
                        "[{} .. {} .. {}]",
                        l.first().map_or("", String::as_str),
                        l.get(at).map_or("-", String::as_str),
                        l.last().map_or("", String::as_str)
                    )
                };
                v.problem(format!(
                    "idempotency key {key} named different events: {} events {} in {first}, \
                     then {} events {} in request {index} to {}; they differ from event {at} on",
                    before.len(),
                    show(before_labels),
                    ids.len(),
                    show(&labels),
                    r.path
                ));
            }
        } else {
            batches.insert(key, (format!("request {index} to {}", r.path), ids, labels));
        }
    }
    for key in disordered {
        let all = arrivals.remove(&key).unwrap_or_default();
        v.problems.push(format!(
            "arrivals of key acct-{key:03} (path#request:seq[@partition/offset]): {}",
            all.join(" ")
        ));
    }
    let missing: Vec<usize> = (0..messages.len())
        .filter(|&n| id_of[n].is_none())
        .collect();
    if !missing.is_empty() {
        v.problem(format!(
            "{} messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    v
}

// ---------------------------------------------------------------------------
// RabbitMQ peers

async fn amqp() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ is not reachable at {AMQP_URL} ({e}): these tests need it running \
                 with the guest user (e.g. `service rabbitmq-server start`)"
            )
        });
    let channel = conn.create_channel().await.expect("a RabbitMQ channel");
    (conn, channel)
}

/// Declares a durable queue as caudal's `declare = true` does.
async fn declare_queue(channel: &lapin::Channel, name: &str, single_active_consumer: bool) {
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    let mut arguments = FieldTable::default();
    if single_active_consumer {
        arguments.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    channel
        .queue_declare(
            ShortString::from(name),
            lapin::options::QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

/// Messages ready in `queue` (not counting those held unacknowledged).
async fn ready_count(channel: &lapin::Channel, queue: &str) -> u32 {
    use lapin::types::{FieldTable, ShortString};
    channel
        .queue_declare(
            ShortString::from(queue),
            lapin::options::QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map_or(u32::MAX, |q| q.message_count())
}

/// Waits until `queue` has no consumers (the broker has taken back what
/// they held unacknowledged); returns its message count then.
async fn wait_for_no_consumers(channel: &lapin::Channel, queue: &str) -> u32 {
    use lapin::types::{FieldTable, ShortString};
    let deadline = Instant::now() + PATIENCE;
    loop {
        let q = channel
            .queue_declare(
                ShortString::from(queue),
                lapin::options::QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} is gone: {e}"));
        if q.consumer_count() == 0 {
            return q.message_count();
        }
        assert!(
            Instant::now() < deadline,
            "queue {queue} still has {} consumers",
            q.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `messages` (persistent, with their message id and a
/// `caudal-key` header) to the default exchange, routed to `queue_of`,
/// with publisher confirms.
async fn publish_amqp(messages: &[Message], queue_of: impl Fn(&Message) -> String) {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let (_conn, channel) = amqp().await;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for chunk in messages.chunks(2000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from("caudal-key"),
                AMQPValue::LongString(LongString::from(m.account())),
            );
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(m.id()))
                .with_headers(headers);
            confirms.push(
                channel
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(queue_of(m)),
                        lapin::options::BasicPublishOptions::default(),
                        &m.body(),
                        properties,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            let c = confirm.await.expect("a publisher confirm");
            assert!(c.is_ack(), "RabbitMQ refused a message: {c:?}");
        }
    }
}

async fn publish_one(
    channel: &lapin::Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    use lapin::types::ShortString;
    let c = channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("a publisher confirm");
    assert!(c.is_ack(), "RabbitMQ refused a message: {c:?}");
}

/// A test's queues, deleted by [`RabbitQueues::delete`] at its end, or
/// when it fails (best effort).
struct RabbitQueues(Vec<String>);

impl RabbitQueues {
    fn new(names: Vec<String>) -> Self {
        Self(names)
    }

    async fn delete(&mut self) {
        delete_queues(std::mem::take(&mut self.0)).await;
    }
}

impl Drop for RabbitQueues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        if names.is_empty() {
            return;
        }
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_queues(names));
            }
        })
        .join();
    }
}

async fn delete_queues(names: Vec<String>) {
    use lapin::types::ShortString;
    let (_conn, channel) = amqp().await;
    for name in names {
        channel
            .queue_delete(
                ShortString::from(name.as_str()),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("delete queue {name}: {e}"));
    }
}

// ---------------------------------------------------------------------------
// Kafka peer

/// Produces `messages` keyed by account (so one key stays in one
/// partition), with an idempotent producer.
async fn publish_kafka(brokers: &str, topic: &str, messages: &[Message]) {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "5")
        .create()
        .expect("a Kafka producer");
    for chunk in messages.chunks(5000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for m in chunk {
            let (key, body) = (m.account(), m.body());
            let sent = producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&body))
                .map_err(|(e, _)| e)
                .expect("queued for producing");
            pending.push(sent);
        }
        for p in pending {
            p.await
                .expect("a delivery report")
                .map_err(|(e, _)| e)
                .expect("produced");
        }
    }
}

// ---------------------------------------------------------------------------
// NATS peers

async fn jetstream() -> async_nats::jetstream::Context {
    let client = async_nats::connect(NATS_URL).await.unwrap_or_else(|e| {
        panic!(
            "NATS is not reachable at {NATS_URL} ({e}): these tests need nats-server \
             running with JetStream (`nats-server -js`)"
        )
    });
    async_nats::jetstream::new(client)
}

/// Publishes `messages` to `STREAM.<key % 4>` with their message id as
/// `Nats-Msg-Id`, waiting for the stream's acknowledgements.
async fn publish_nats(stream: &str, messages: &[Message]) {
    let js = jetstream().await;
    for chunk in messages.chunks(2000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id().as_str());
            acks.push(
                js.publish_with_headers(
                    format!("{stream}.{}", m.key % 4),
                    headers,
                    m.body().into(),
                )
                .await
                .expect("published"),
            );
        }
        for ack in acks {
            let ack = ack.await.expect("stored by the stream");
            assert!(!ack.duplicate, "every message id is new");
        }
    }
}

/// Deletes the key-value buckets a partitioned source made.
async fn delete_buckets(names: &[String]) {
    let js = jetstream().await;
    for name in names {
        js.delete_key_value(name)
            .await
            .unwrap_or_else(|e| panic!("delete bucket {name}: {e}"));
    }
}

/// A test's stream, deleted by [`NatsStream::delete`] at its end, or when
/// it fails (best effort).
struct NatsStream(Option<String>);

impl NatsStream {
    /// Creates stream `name` capturing `name.>`.
    async fn create(name: &str) -> Self {
        let js = jetstream().await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
        Self(Some(name.to_string()))
    }

    async fn delete(&mut self) {
        if let Some(name) = self.0.take() {
            jetstream()
                .await
                .delete_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("delete stream {name}: {e}"));
        }
    }
}

impl Drop for NatsStream {
    fn drop(&mut self) {
        let Some(name) = self.0.take() else {
            return;
        };
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = jetstream().await.delete_stream(&name).await;
                });
            }
        })
        .join();
    }
}

// ---------------------------------------------------------------------------
// Small things

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `/metrics` of a node's server.
struct Metrics(u16);

/// One scrape: metric name → value (of the test pipeline).
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(f64::NAN)
    }
}

impl Metrics {
    async fn scrape(&self) -> Option<Scrape> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.0))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let label = format!("pipeline=\"{PIPELINE}\"");
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let name = name.split('{').next()?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect();
        Some(Scrape(values))
    }

    /// Polls `/metrics` until `done` holds; returns that scrape.
    async fn wait_for(&self, node: &Node, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.scrape().await
                && done(&s)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}; metrics {:?}; log:\n{}",
                self.scrape().await.map(|s| s.0),
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A small deterministic generator, so a failure can be replayed from its
/// seed (printed).
struct Rng(u64);

impl Rng {
    fn seeded() -> (u64, Self) {
        let seed = std::env::var("CAUDAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(7, |d| d.as_nanos() as u64 | 1)
            });
        (seed, Self(seed))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
