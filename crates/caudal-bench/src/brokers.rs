//! `broker-sink` and `broker-consumers`: caudal's RabbitMQ, NATS JetStream
//! and Kafka connectors, each next to what the broker does for a bare
//! client in the same run.
//!
//! - `broker-sink`: a table of N records of about 1 KB each (default
//!   100,000, `--rows`; `id`, `account`, `amount`, and a `note` of 960
//!   characters) in PostgreSQL, read by an incremental source (cursor `id`,
//!   pages of 10,000) and published by `caudal once` to each broker sink in
//!   turn, one message per record: RabbitMQ (default exchange to a durable
//!   queue, persistent messages, publisher confirms, `mandatory`), NATS
//!   JetStream (a file-storage stream, every publish acknowledged) and Kafka
//!   (an rdkafka mock cluster inside this process: one broker, a topic of
//!   one partition; idempotent producer, `acks=all`). Batches of `--batch`
//!   (default 1,000), `max_wait` 50 ms, `--concurrency` batches in flight,
//!   the default `ack = "buffered"`. Timed from process start to exit: `once`
//!   exits when the broker has confirmed every batch. The reference is a
//!   bare client in this process publishing the same number of messages,
//!   encoded beforehand (each row's JSON as PostgreSQL writes it, and the
//!   same four identity headers caudal sets, with the values caudal computes
//!   for that row), with the same durability and pipelined: lapin with
//!   confirms, persistent, [`BARE_WINDOW`] unconfirmed at once; async-nats
//!   JetStream publishes with `Nats-Msg-Id`, [`BARE_WINDOW`] unacknowledged
//!   at once; an rdkafka `FutureProducer` (idempotent, `acks=all`) sending
//!   everything and then awaiting every delivery report. Each side publishes
//!   to its own queue, stream or topic, whose message count must then be N.
//!   Which side goes first alternates from one `--repeat` to the next.
//! - `broker-consumers`: N small JSON messages (default 200,000, `--rows`;
//!   about 70 bytes, each with a message id, as a caudal sink would set it)
//!   in a durable RabbitMQ queue, and in a JetStream stream; then 1, 2 and 3
//!   `caudal run` processes, each with its own state, buffer and receiver,
//!   consume them (RabbitMQ: competing consumers on the one queue;
//!   JetStream: one shared durable pull consumer, created by caudal) with
//!   the default `ack = "buffered"` and prefetch, and deliver them to the
//!   always-200 receiver in batches of `--batch`. Timed from the first
//!   spawn until the receivers together have counted N; then every process
//!   gets SIGTERM and must exit 0. RabbitMQ gets a fresh queue, filled
//!   before each count of processes (the fill is timed and reported, not
//!   compared); JetStream's stream is filled once and each count of
//!   processes reads all of it through a durable consumer of its own. The
//!   counts run 1, 2, 3 in odd repeats and 3, 2, 1 in even ones.
//!
//! Where the time goes is part of every figure: the CPU seconds of caudal's
//! processes (reaped children), of the broker's process (`beam.smp` or
//! `nats-server`, found in /proc; the Kafka mock cluster runs in this
//! process), of this process (the bare client, the receivers), and the
//! cores the whole machine kept busy meanwhile (/proc/stat), out of two
//! here: on this machine the broker, caudal and the receiver share them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use caudal_connectors::broker::{HEADER_BATCH, HEADER_EVENT_ID, HEADER_PIPELINE, HEADER_POSITION};
use caudal_core::record::{CursorValue, Position, batch_key, event_id};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rdkafka::consumer::Consumer as _;
use serde_json::{Value, json};
use sqlx::{Executor as _, PgPool};

use crate::cdc::{DEFAULT_THROUGHPUT_MAX_WAIT_MS, scratch_dir, spawn_caudal};
use crate::process::{Ended, Measured};
use crate::receiver::{self, Receiver};
use crate::subject::{CAUDAL, Subject};
use crate::sync::DATABASE;
use crate::{Args, database_url, round};

/// Default records `broker-sink` publishes to each broker.
pub const DEFAULT_SINK_MESSAGES: u64 = 100_000;
/// Default messages `broker-consumers` consumes from each broker.
pub const DEFAULT_CONSUMER_MESSAGES: u64 = 200_000;
/// The pipeline's name in caudal's configuration.
const PIPELINE: &str = "bench";
/// The table `broker-sink` reads.
const TABLE: &str = "bench_messages";
/// Times the 32-character md5 is repeated in each row's `note`: rows of
/// about 1 KB as JSON.
const NOTE_REPEAT: i32 = 30;
/// Messages the bare RabbitMQ and NATS clients keep unconfirmed at once
/// (async-nats's own default limit of acknowledgements in flight).
pub const BARE_WINDOW: usize = 5000;
/// The goal of `broker-sink`: caudal's rate over the bare client's.
const GOAL_OVER_BARE: f64 = 0.7;
/// The goal of `broker-consumers`: two processes' rate over one's.
const GOAL_TWO_OVER_ONE: f64 = 1.6;
/// The counts of competing processes `broker-consumers` measures.
const PROCESSES: [usize; 3] = [1, 2, 3];
/// Longest a `caudal once` may take in `broker-sink`.
const ONCE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest `broker-consumers` waits for a message to arrive, or for a
/// process to exit, before it fails.
const STALL: Duration = Duration::from_secs(60);
/// Longest a broker may take to confirm a bare client's messages.
const BARE_TIMEOUT: Duration = Duration::from_secs(600);
/// Clock ticks per second in /proc (`USER_HZ`).
const TICKS: f64 = 100.0;

/// A broker under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broker {
    Rabbitmq,
    Nats,
    Kafka,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Self::Rabbitmq => "rabbitmq",
            Self::Nats => "nats",
            Self::Kafka => "kafka",
        }
    }

    /// The broker's server process on this machine, by its command name
    /// (none for Kafka: the mock cluster runs in this process).
    fn process(self) -> Option<u32> {
        let comm = match self {
            Self::Rabbitmq => "beam.smp",
            Self::Nats => "nats-server",
            Self::Kafka => return None,
        };
        std::fs::read_dir("/proc").ok()?.find_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (name.trim() == comm).then_some(pid)
        })
    }
}

/// A name unique to this run of the harness, for queues, streams, topics.
fn unique_suffix(args: &Args) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}_{}_{:x}", std::process::id(), args.run, nanos)
}

// ---------------------------------------------------------------------------
// Where the CPU went.

/// CPU seconds (user + system) of this process, and of its children that
/// have been waited for (`/proc/self/stat`).
fn own_cpu() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields = stat_fields(&stat).context("unreadable /proc/self/stat")?;
    Ok((fields[0] + fields[1], fields[2] + fields[3]))
}

/// utime, stime, cutime, cstime of a `/proc/PID/stat`, in seconds.
fn stat_fields(stat: &str) -> Option<[f64; 4]> {
    // The fields after the command name, which is in parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    let v: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse::<f64>().unwrap_or(0.0) / TICKS)
        .collect();
    v.try_into().ok()
}

/// CPU seconds (user + system) of process `pid` so far.
fn pid_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).map(|f| f[0] + f[1])
}

/// Ticks every core of the machine spent busy so far (`/proc/stat`: user,
/// nice, system, irq, softirq, steal).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The CPU counters at one instant.
#[derive(Clone, Copy, Debug)]
struct CpuMark {
    at: Instant,
    own: f64,
    children: f64,
    broker_pid: Option<u32>,
    broker: Option<f64>,
    busy_ticks: Option<u64>,
}

/// CPU used between two marks.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    secs: f64,
    /// caudal's processes (children reaped meanwhile).
    caudal: f64,
    /// This process: the bare client, the receivers, the Kafka mock cluster.
    harness: f64,
    broker: Option<f64>,
    /// Cores the whole machine kept busy on average.
    busy_cores: Option<f64>,
}

impl CpuMark {
    fn now(broker: Broker) -> anyhow::Result<Self> {
        let broker_pid = broker.process();
        let (own, children) = own_cpu()?;
        Ok(Self {
            at: Instant::now(),
            own,
            children,
            broker_pid,
            broker: broker_pid.and_then(pid_cpu),
            busy_ticks: machine_busy_ticks(),
        })
    }

    /// What was used from `self` until now.
    fn since(&self) -> anyhow::Result<CpuUse> {
        let secs = self.at.elapsed().as_secs_f64();
        let (own, children) = own_cpu()?;
        let broker = match (self.broker_pid.and_then(pid_cpu), self.broker) {
            (Some(after), Some(before)) => Some(after - before),
            _ => None,
        };
        let busy_cores = match (machine_busy_ticks(), self.busy_ticks) {
            (Some(after), Some(before)) if secs > 0.0 => {
                Some(after.saturating_sub(before) as f64 / TICKS / secs)
            }
            _ => None,
        };
        Ok(CpuUse {
            secs,
            caudal: children - self.children,
            harness: own - self.own,
            broker,
            busy_cores,
        })
    }
}

/// `cpu`'s figures as JSON fields prefixed `prefix`: CPU seconds and the
/// cores they amount to over `secs`.
fn cpu_fields(prefix: &str, cpu: &CpuUse, secs: f64) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let cores = |v: f64| json!(round(v / secs));
    out.insert(
        format!("{prefix}_caudal_cpu_secs"),
        json!(round(cpu.caudal)),
    );
    out.insert(format!("{prefix}_caudal_cores"), cores(cpu.caudal));
    out.insert(
        format!("{prefix}_harness_cpu_secs"),
        json!(round(cpu.harness)),
    );
    out.insert(format!("{prefix}_harness_cores"), cores(cpu.harness));
    out.insert(
        format!("{prefix}_broker_cpu_secs"),
        cpu.broker.map_or(Value::Null, |v| json!(round(v))),
    );
    out.insert(
        format!("{prefix}_broker_cores"),
        cpu.broker.map_or(Value::Null, cores),
    );
    out.insert(
        format!("{prefix}_busy_cores"),
        cpu.busy_cores.map_or(Value::Null, |v| json!(round(v))),
    );
    out
}

// ---------------------------------------------------------------------------
// RabbitMQ.

/// A channel on a new connection to RabbitMQ.
async fn amqp_channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {} (start it, or give --amqp-url)",
                caudal_core::units::redact_url(url)
            )
        })?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

async fn declare_queue(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    Ok(())
}

/// The messages ready in `queue`.
async fn queue_count(url: &str, queue: &str) -> anyhow::Result<u64> {
    let (connection, channel) = amqp_channel(url).await?;
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("queue {queue} is gone"))?;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(u64::from(declared.message_count()))
}

/// The length of the body of a message in `queue` (taken off the queue).
async fn queue_sample_bytes(url: &str, queue: &str) -> anyhow::Result<Option<usize>> {
    let (connection, channel) = amqp_channel(url).await?;
    let got = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
        .await?;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(got.map(|m| m.delivery.data.len()))
}

/// Deletes `queues` (those that exist), on one connection.
async fn delete_queues(url: &str, queues: &[String]) -> anyhow::Result<()> {
    if queues.is_empty() {
        return Ok(());
    }
    let (connection, channel) = amqp_channel(url).await?;
    for queue in queues {
        channel
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await
            .with_context(|| format!("cannot delete queue {queue}"))?;
    }
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Publishes `messages` to `queue` through the default exchange as a bare
/// client: persistent, `mandatory`, on a channel in confirm mode, at most
/// [`BARE_WINDOW`] unconfirmed at once; every confirm must be a plain ack.
/// The seconds from the first publish to the last confirm.
async fn bare_rabbitmq(url: &str, queue: &str, messages: &[Message]) -> anyhow::Result<f64> {
    let (connection, channel) = amqp_channel(url).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Everything but the publish itself is done beforehand.
    let properties: Vec<BasicProperties> = messages
        .iter()
        .map(|m| {
            let mut headers = FieldTable::default();
            for (name, value) in &m.headers {
                headers.insert(
                    ShortString::from(*name),
                    AMQPValue::LongString(LongString::from(value.as_str())),
                );
            }
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(m.id.as_str()))
                .with_headers(headers)
        })
        .collect();
    let check = |c: Confirmation| match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(anyhow::anyhow!("a message was returned unroutable")),
        Confirmation::Nack(_) => Err(anyhow::anyhow!("the broker nacked a message")),
        Confirmation::NotRequested => Err(anyhow::anyhow!("confirms are off")),
    };
    let started = Instant::now();
    let publish = async {
        let mut pending = VecDeque::with_capacity(BARE_WINDOW);
        for (m, properties) in messages.iter().zip(properties) {
            if pending.len() >= BARE_WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                check(oldest.await?)?;
            }
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &m.body,
                    properties,
                )
                .await?;
            pending.push_back(confirm);
        }
        for confirm in pending {
            check(confirm.await?)?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(BARE_TIMEOUT, publish)
        .await
        .context("RabbitMQ did not confirm the bare client's messages in time")??;
    let secs = started.elapsed().as_secs_f64();
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(secs)
}

// ---------------------------------------------------------------------------
// NATS JetStream.

async fn jetstream(url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(url).await.with_context(|| {
        format!("cannot connect to NATS at {url} (start nats-server -js, or give --nats-url)")
    })?;
    Ok(async_nats::jetstream::new(client))
}

/// Creates the file-storage stream `name` capturing `subject`.
async fn create_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subject: &str,
) -> anyhow::Result<()> {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..async_nats::jetstream::stream::Config::default()
    })
    .await
    .with_context(|| format!("cannot create stream {name} (is JetStream on?)"))?;
    Ok(())
}

/// The messages stream `name` holds, and their stored bytes.
async fn stream_count(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name} is gone"))?;
    let info = stream.info().await?;
    Ok((info.state.messages, info.state.bytes))
}

async fn delete_streams(url: &str, names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let js = jetstream(url).await?;
    for name in names {
        js.delete_stream(name)
            .await
            .with_context(|| format!("cannot delete stream {name}"))?;
    }
    Ok(())
}

/// Publishes `messages` to `subject` as a bare JetStream client: each with
/// its `Nats-Msg-Id` and headers, at most [`BARE_WINDOW`] unacknowledged
/// at once; every acknowledgement must come. The seconds from the first
/// publish to the last acknowledgement.
async fn bare_nats(url: &str, subject: &str, messages: &[Message]) -> anyhow::Result<f64> {
    use async_nats::jetstream::message::PublishMessage;
    let js = jetstream(url).await?;
    let built: Vec<PublishMessage> = messages
        .iter()
        .map(|m| {
            let mut p = PublishMessage::build();
            for (name, value) in &m.headers {
                p = p.header(*name, value.as_str());
            }
            p.message_id(&m.id).payload(m.body.clone())
        })
        .collect();
    let subject = async_nats::Subject::from(subject);
    let started = Instant::now();
    let publish = async {
        let mut pending = VecDeque::with_capacity(BARE_WINDOW);
        for message in built {
            if pending.len() >= BARE_WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                oldest.await?;
            }
            pending.push_back(js.send_publish(subject.clone(), message).await?);
        }
        for ack in pending {
            ack.await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(BARE_TIMEOUT, publish)
        .await
        .context("JetStream did not acknowledge the bare client's messages in time")??;
    Ok(started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Kafka (librdkafka's mock cluster).

/// The messages appended to partition 0 of `topic`: its end offset (the
/// mock cluster keeps only the last 5 MB of a partition, so the low
/// watermark moves; offsets start at 0 and, with no transactions, every
/// message takes one).
fn topic_count(bootstrap: &str, topic: &str) -> anyhow::Result<u64> {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "caudal-bench-count")
        .create()?;
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    Ok(u64::try_from(high)?)
}

/// Produces `messages` to `topic` as a bare client: an idempotent
/// `FutureProducer` with `acks=all`, everything handed to librdkafka (when
/// its queue is full, the oldest delivery is awaited first), then every
/// delivery report awaited. The seconds from the first send to the last
/// report.
async fn bare_kafka(bootstrap: &str, topic: &str, messages: &[Message]) -> anyhow::Result<f64> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let headers: Vec<OwnedHeaders> = messages
        .iter()
        .map(|m| {
            m.headers.iter().fold(
                OwnedHeaders::new_with_capacity(m.headers.len()),
                |h, (name, value)| {
                    h.insert(Header {
                        key: name,
                        value: Some(value.as_bytes()),
                    })
                },
            )
        })
        .collect();
    let started = Instant::now();
    let produce = async {
        let mut pending = VecDeque::with_capacity(messages.len());
        for (m, headers) in messages.iter().zip(headers) {
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .payload(&m.body[..])
                .headers(headers);
            loop {
                match producer.send_result(record) {
                    Ok(future) => {
                        pending.push_back(future);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        match pending.pop_front() {
                            Some(oldest) => settle(oldest).await?,
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    Err((e, _)) => return Err(anyhow::Error::from(e)),
                }
            }
        }
        for future in pending {
            settle(future).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(BARE_TIMEOUT, produce)
        .await
        .context("Kafka did not acknowledge the bare client's messages in time")??;
    Ok(started.elapsed().as_secs_f64())
}

async fn settle(future: rdkafka::producer::DeliveryFuture) -> anyhow::Result<()> {
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.into()),
        Err(_) => bail!("the producer dropped a message before its delivery report"),
    }
}

// ---------------------------------------------------------------------------
// broker-sink.

/// One pre-encoded message of a bare client.
#[derive(Debug)]
struct Message {
    /// The message id (caudal's event id of the row's record).
    id: String,
    body: Bytes,
    /// The identity headers caudal's sinks set.
    headers: Vec<(&'static str, String)>,
}

/// Runs `broker-sink`: one result per broker. Drops its database and what
/// it created on the brokers, also when it fails.
pub async fn sink(args: &Args) -> anyhow::Result<Vec<Value>> {
    let rows = args.rows.unwrap_or(DEFAULT_SINK_MESSAGES);
    let admin = PgPool::connect(&args.pg_url).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {} (run scripts/test --services-only)",
            args.pg_url
        )
    })?;
    drop_database(&admin).await?;
    let result = async {
        admin
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {DATABASE}"
            ))))
            .await?;
        let url = database_url(&args.pg_url, DATABASE);
        load(&url, rows).await?;
        let messages = encode(&url, args.batch).await?;
        let mut cleanup = Cleanup::default();
        let result = sink_run(args, &url, &messages, &mut cleanup).await;
        let cleaned = cleanup.run(args).await;
        result.and_then(|r| cleaned.map(|()| r))
    }
    .await;
    let dropped = drop_database(&admin).await;
    result.and_then(|r| dropped.map(|()| r))
}

async fn drop_database(admin: &PgPool) -> anyhow::Result<()> {
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
        ))))
        .await?;
    Ok(())
}

/// Fills `TABLE` with `rows` rows of about 1 KB as JSON.
async fn load(url: &str, rows: u64) -> anyhow::Result<()> {
    eprintln!("broker-sink: loading {rows} rows of about 1 KB into {TABLE}");
    let db = PgPool::connect(url).await?;
    db.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {TABLE} (
            id BIGINT PRIMARY KEY,
            account INT NOT NULL,
            amount NUMERIC(12,2) NOT NULL,
            note TEXT NOT NULL)"
    ))))
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {TABLE}
         SELECT g, g % 1000, (g % 100000) / 100.0, repeat(md5(g::text), {NOTE_REPEAT})
         FROM generate_series(1, $1) g"
    )))
    .bind(i64::try_from(rows)?)
    .execute(&db)
    .await?;
    db.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "VACUUM ANALYZE {TABLE}"
    ))))
    .await?;
    db.close().await;
    Ok(())
}

/// The bare clients' messages: each row's JSON (`row_to_json`) with the
/// id and headers caudal gives its record (position = the cursor value,
/// batches of `batch` rows in cursor order).
async fn encode(url: &str, batch: u64) -> anyhow::Result<Vec<Message>> {
    let db = PgPool::connect(url).await?;
    let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, row_to_json(t)::text FROM {TABLE} t ORDER BY id"
    )))
    .fetch_all(&db)
    .await?;
    db.close().await;
    let position = |id: i64| Position::Cursor {
        values: vec![CursorValue::Int(id)],
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(usize::try_from(batch.max(1))?) {
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            continue;
        };
        let key = batch_key(PIPELINE, &position(first.0), &position(last.0), chunk.len());
        for (id, body) in chunk {
            let p = position(*id);
            let event = event_id(PIPELINE, &p);
            out.push(Message {
                id: event.clone(),
                body: Bytes::from(body.clone()),
                headers: vec![
                    (HEADER_EVENT_ID, event),
                    (HEADER_BATCH, key.clone()),
                    (HEADER_PIPELINE, PIPELINE.to_string()),
                    (HEADER_POSITION, serde_json::to_string(&p)?),
                ],
            });
        }
    }
    Ok(out)
}

/// What a scenario created on the brokers, deleted at its end.
#[derive(Debug, Default)]
struct Cleanup {
    queues: Vec<String>,
    streams: Vec<String>,
}

impl Cleanup {
    async fn run(&self, args: &Args) -> anyhow::Result<()> {
        let queues = delete_queues(&args.amqp_url, &self.queues).await;
        let streams = delete_streams(&args.nats_url, &self.streams).await;
        queues.and(streams)
    }
}

/// Where one side of `broker-sink` publishes.
#[derive(Debug, Clone)]
struct Target {
    /// RabbitMQ queue, NATS subject or Kafka topic.
    route: String,
    /// The NATS stream capturing the subject.
    stream: String,
}

/// One side's run.
#[derive(Debug)]
struct Published {
    secs: f64,
    cpu: CpuUse,
    stored: u64,
    peak_rss_mib: Option<f64>,
}

async fn sink_run(
    args: &Args,
    pg_url: &str,
    messages: &[Message],
    cleanup: &mut Cleanup,
) -> anyhow::Result<Vec<Value>> {
    let dir = scratch_dir("broker-sink")?;
    let suffix = unique_suffix(args);
    // The Kafka brokers: librdkafka's mock cluster, in this process, for
    // the whole scenario.
    let cluster =
        rdkafka::mocking::MockCluster::new(1).context("cannot start librdkafka's mock cluster")?;
    let bootstrap = cluster.bootstrap_servers();
    let mut out = Vec::new();
    for broker in [Broker::Rabbitmq, Broker::Nats, Broker::Kafka] {
        let target = |who: &str| Target {
            route: match broker {
                Broker::Nats => format!("caudal_bench.sink.{suffix}.{who}"),
                _ => format!("caudal_bench_sink_{suffix}_{who}"),
            },
            stream: format!("CAUDAL_BENCH_SINK_{suffix}_{who}").to_uppercase(),
        };
        let (ours, bare) = (target("caudal"), target("bare"));
        for t in [&ours, &bare] {
            match broker {
                Broker::Rabbitmq => {
                    let (connection, channel) = amqp_channel(&args.amqp_url).await?;
                    cleanup.queues.push(t.route.clone());
                    eprintln!("broker-sink: declaring queue {}", t.route);
                    declare_queue(&channel, &t.route).await?;
                    let _ = connection.close(200, ShortString::from("done")).await;
                }
                Broker::Nats => {
                    let js = jetstream(&args.nats_url).await?;
                    cleanup.streams.push(t.stream.clone());
                    create_stream(&js, &t.stream, &t.route).await?;
                }
                Broker::Kafka => cluster
                    .create_topic(&t.route, 1, 1)
                    .with_context(|| format!("cannot create topic {}", t.route))?,
            }
        }
        let sub = dir.join(broker.name());
        std::fs::create_dir_all(&sub)?;
        let caudal_first = !args.run.is_multiple_of(2);
        let mut caudal_run = None;
        let mut bare_run = None;
        for caudal_turn in [caudal_first, !caudal_first] {
            if caudal_turn {
                eprintln!(
                    "broker-sink: caudal once → {} (log: {})",
                    broker.name(),
                    sub.join("caudal.log").display()
                );
                let config = sink_config(&sub, pg_url, broker, &ours, &bootstrap, args)?;
                let mark = CpuMark::now(broker)?;
                let caudal = spawn_caudal(caudal(args), &config, &sub, &["once", PIPELINE])?;
                let ended = wait_exit(caudal, &sub, "caudal once", ONCE_TIMEOUT).await?;
                let cpu = mark.since()?;
                let stored = stored(args, broker, &ours, &bootstrap).await?;
                caudal_run = Some(Published {
                    secs: ended.secs,
                    cpu,
                    stored,
                    peak_rss_mib: Some(ended.peak_rss_mib),
                });
            } else {
                eprintln!(
                    "broker-sink: bare client → {}, {} pre-encoded messages",
                    broker.name(),
                    messages.len()
                );
                let mark = CpuMark::now(broker)?;
                let secs = match broker {
                    Broker::Rabbitmq => {
                        bare_rabbitmq(&args.amqp_url, &bare.route, messages).await?
                    }
                    Broker::Nats => bare_nats(&args.nats_url, &bare.route, messages).await?,
                    Broker::Kafka => bare_kafka(&bootstrap, &bare.route, messages).await?,
                };
                let cpu = mark.since()?;
                let stored = stored(args, broker, &bare, &bootstrap).await?;
                bare_run = Some(Published {
                    secs,
                    cpu,
                    stored,
                    peak_rss_mib: None,
                });
            }
        }
        let (c, b) = (
            caudal_run.context("caudal was not measured")?,
            bare_run.context("the bare client was not measured")?,
        );
        let n = messages.len() as u64;
        for (who, p) in [("caudal", &c), ("the bare client", &b)] {
            if p.stored < n {
                bail!(
                    "{}: {who} published {n} messages but {} holds {} (log: {})",
                    broker.name(),
                    route_of(broker, who, &ours, &bare),
                    p.stored,
                    sub.join("caudal.log").display()
                );
            }
        }
        let mut extra = serde_json::Map::new();
        match broker {
            Broker::Rabbitmq => {
                extra.insert(
                    "caudal_body_bytes".into(),
                    json!(queue_sample_bytes(&args.amqp_url, &ours.route).await?),
                );
            }
            Broker::Nats => {
                let js = jetstream(&args.nats_url).await?;
                for (who, t) in [("caudal", &ours), ("bare", &bare)] {
                    let (count, bytes) = stream_count(&js, &t.stream).await?;
                    extra.insert(
                        format!("{who}_stored_bytes_per_message"),
                        json!(round(bytes as f64 / count.max(1) as f64)),
                    );
                }
            }
            Broker::Kafka => {}
        }
        let body_bytes =
            messages.iter().map(|m| m.body.len()).sum::<usize>() as f64 / n.max(1) as f64;
        let rate = |secs: f64| round(n as f64 / secs);
        let mut report = json!({
            "scenario": "broker_sink",
            "broker": broker.name(),
            "messages": n,
            "message_bytes": round(body_bytes),
            "batch": args.batch,
            "max_wait_ms": sink_max_wait_ms(args),
            "concurrency": args.concurrency,
            "bare_window": match broker {
                Broker::Kafka => Value::Null,
                _ => json!(BARE_WINDOW),
            },
            "first": if caudal_first { "caudal" } else { "bare" },
            "caudal_secs": round(c.secs),
            "caudal_messages_per_s": rate(c.secs),
            "caudal_stored": c.stored,
            "caudal_peak_rss_mib": c.peak_rss_mib.map(round),
            "bare_secs": round(b.secs),
            "bare_messages_per_s": rate(b.secs),
            "bare_stored": b.stored,
            "caudal_over_bare": round(b.secs / c.secs),
            "goal_over_bare": GOAL_OVER_BARE,
        });
        if let Some(fields) = report.as_object_mut() {
            fields.extend(cpu_fields("caudal", &c.cpu, c.secs));
            fields.extend(cpu_fields("bare", &b.cpu, b.secs));
            fields.extend(extra);
        }
        out.push(report);
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// Which queue, stream or topic `who` published to, for messages.
fn route_of(broker: Broker, who: &str, ours: &Target, bare: &Target) -> String {
    let t = if who == "caudal" { ours } else { bare };
    match broker {
        Broker::Rabbitmq => format!("queue {}", t.route),
        Broker::Nats => format!("stream {}", t.stream),
        Broker::Kafka => format!("topic {}", t.route),
    }
}

fn sink_max_wait_ms(args: &Args) -> u64 {
    args.max_wait_ms.unwrap_or(DEFAULT_THROUGHPUT_MAX_WAIT_MS)
}

/// The messages `target` holds now.
async fn stored(
    args: &Args,
    broker: Broker,
    target: &Target,
    bootstrap: &str,
) -> anyhow::Result<u64> {
    match broker {
        Broker::Rabbitmq => queue_count(&args.amqp_url, &target.route).await,
        Broker::Nats => {
            let js = jetstream(&args.nats_url).await?;
            Ok(stream_count(&js, &target.stream).await?.0)
        }
        Broker::Kafka => topic_count(bootstrap, &target.route),
    }
}

fn caudal(args: &Args) -> Subject<'_> {
    Subject {
        name: CAUDAL,
        binary: &args.caudal,
    }
}

/// caudal's configuration for `broker-sink`: `TABLE` by an incremental
/// cursor on `id` (pages of 10,000) into the broker sink to `target`.
fn sink_config(
    dir: &Path,
    pg_url: &str,
    broker: Broker,
    target: &Target,
    bootstrap: &str,
    args: &Args,
) -> anyhow::Result<PathBuf> {
    let destination = match broker {
        Broker::Rabbitmq => format!(
            "type = \"rabbitmq\"\nurl = \"{}\"\nexchange = \"\"\nrouting_key = \"{}\"\n",
            args.amqp_url, target.route
        ),
        Broker::Nats => format!(
            "type = \"nats\"\nurl = \"{}\"\nsubject = \"{}\"\n",
            args.nats_url, target.route
        ),
        Broker::Kafka => format!(
            "type = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopic = \"{}\"\n",
            target.route
        ),
    };
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.table]
type = "postgres"
url = "{pg_url}"
table = "{TABLE}"
cursor = ["id"]
page_size = 10000

[sinks.out]
{destination}batch = {{ max_records = {batch}, max_wait = "{max_wait}ms" }}
delivery = {{ concurrency = {concurrency} }}

[pipelines.{PIPELINE}]
source = "table"
sink = "out"
schedule = {{ every = "1h" }}
"#,
            state = dir.join("state.db").display(),
            batch = args.batch,
            max_wait = sink_max_wait_ms(args),
            concurrency = args.concurrency,
        ),
    )?;
    Ok(config)
}

/// Waits up to `timeout` for `caudal` to exit; it must succeed.
async fn wait_exit(
    caudal: Measured,
    dir: &Path,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<Ended> {
    let ended = tokio::time::timeout(timeout, caudal.wait())
        .await
        .with_context(|| {
            format!(
                "{what} did not exit within {} s (log: {})",
                timeout.as_secs(),
                dir.join("caudal.log").display()
            )
        })??;
    if !ended.status.success() {
        bail!(
            "{what} failed: {} (log: {})",
            ended.status,
            dir.join("caudal.log").display()
        );
    }
    Ok(ended)
}

// ---------------------------------------------------------------------------
// broker-consumers.

/// Runs `broker-consumers`: one result per broker (RabbitMQ, JetStream).
/// Deletes what it created on the brokers, also when it fails.
pub async fn consumers(args: &Args) -> anyhow::Result<Vec<Value>> {
    let n = args.rows.unwrap_or(DEFAULT_CONSUMER_MESSAGES);
    let dir = scratch_dir("broker-consumers")?;
    let suffix = unique_suffix(args);
    let order: Vec<usize> = if args.run.is_multiple_of(2) {
        PROCESSES.iter().rev().copied().collect()
    } else {
        PROCESSES.to_vec()
    };
    let messages = small_messages(n, &suffix);
    let mut cleanup = Cleanup::default();
    let result = async {
        let mut out = Vec::new();
        for broker in [Broker::Rabbitmq, Broker::Nats] {
            out.push(
                consumers_of(args, broker, &messages, &order, &dir, &suffix, &mut cleanup).await?,
            );
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let cleaned = cleanup.run(args).await;
    let result = result.and_then(|r| cleaned.map(|()| r))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

/// `n` small JSON messages, each with a message id unique to this run.
fn small_messages(n: u64, suffix: &str) -> Vec<Message> {
    (1..=n)
        .map(|i| Message {
            id: format!("{suffix}-{i}"),
            body: Bytes::from(format!(
                r#"{{"id":{i},"account":{},"amount":{}.{:02},"status":"paid"}}"#,
                i % 1000,
                i % 1000,
                i % 100
            )),
            headers: Vec::new(),
        })
        .collect()
}

/// One count of processes' run.
#[derive(Debug)]
struct Consumed {
    secs: f64,
    /// Over the timed span (caudal's CPU includes its start and shutdown).
    cpu: CpuUse,
    /// Records each process delivered.
    shares: Vec<u64>,
    /// Records delivered in all, after every process exited.
    delivered: u64,
    peak_rss_mib: f64,
    /// Messages the broker still held for the consumers after they exited.
    left: u64,
}

async fn consumers_of(
    args: &Args,
    broker: Broker,
    messages: &[Message],
    order: &[usize],
    dir: &Path,
    suffix: &str,
    cleanup: &mut Cleanup,
) -> anyhow::Result<Value> {
    let n = messages.len() as u64;
    let mut runs: Vec<(usize, Consumed)> = Vec::new();
    let mut fills = Vec::new();
    let stream = format!("CAUDAL_BENCH_CONSUME_{suffix}").to_uppercase();
    let subject = format!("caudal_bench.consume.{suffix}");
    if broker == Broker::Nats {
        let js = jetstream(&args.nats_url).await?;
        cleanup.streams.push(stream.clone());
        create_stream(&js, &stream, &subject).await?;
        eprintln!("broker-consumers: filling stream {stream} with {n} messages");
        fills.push(bare_nats(&args.nats_url, &subject, messages).await?);
        let (held, _) = stream_count(&js, &stream).await?;
        if held != n {
            bail!("stream {stream} holds {held} messages, {n} were published");
        }
    }
    for &k in order {
        let source = match broker {
            Broker::Rabbitmq => {
                let queue = format!("caudal_bench_consume_{suffix}_{k}");
                let (connection, channel) = amqp_channel(&args.amqp_url).await?;
                cleanup.queues.push(queue.clone());
                declare_queue(&channel, &queue).await?;
                let _ = connection.close(200, ShortString::from("done")).await;
                eprintln!("broker-consumers: filling queue {queue} with {n} messages");
                fills.push(bare_rabbitmq(&args.amqp_url, &queue, messages).await?);
                let held = queue_count(&args.amqp_url, &queue).await?;
                if held != n {
                    bail!("queue {queue} holds {held} messages, {n} were published");
                }
                Source::Queue(queue)
            }
            _ => Source::Consumer {
                stream: stream.clone(),
                consumer: format!("caudal_bench_p{k}"),
            },
        };
        eprintln!(
            "broker-consumers: {k} caudal run process(es) consuming {n} messages from {}",
            broker.name()
        );
        let consumed = run_consumers(args, broker, &source, k, n, dir).await?;
        if let Source::Queue(queue) = &source {
            delete_queues(&args.amqp_url, std::slice::from_ref(queue)).await?;
            cleanup.queues.retain(|q| q != queue);
        }
        runs.push((k, consumed));
    }
    runs.sort_by_key(|(k, _)| *k);
    let fill_secs: f64 = fills.iter().sum::<f64>() / fills.len().max(1) as f64;
    let body_bytes = messages.iter().map(|m| m.body.len()).sum::<usize>() as f64 / n.max(1) as f64;
    let mut report = json!({
        "scenario": "broker_consumers",
        "broker": broker.name(),
        "messages": n,
        "message_bytes": round(body_bytes),
        "batch": args.batch,
        "max_wait_ms": sink_max_wait_ms(args),
        "concurrency": args.concurrency,
        "prefetch": caudal_core::config::brokers::DEFAULT_PREFETCH,
        "order": order.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "fill_secs": round(fill_secs),
        "fill_messages_per_s": round(n as f64 / fill_secs),
        "goal_p2_over_p1": GOAL_TWO_OVER_ONE,
    });
    let rate_of = |k: usize| {
        runs.iter()
            .find(|(j, _)| *j == k)
            .map(|(_, c)| n as f64 / c.secs)
    };
    if let Some(fields) = report.as_object_mut() {
        for (k, c) in &runs {
            let p = format!("p{k}");
            fields.insert(format!("{p}_secs"), json!(round(c.secs)));
            fields.insert(
                format!("{p}_messages_per_s"),
                json!(round(n as f64 / c.secs)),
            );
            fields.insert(
                format!("{p}_shares"),
                json!(
                    c.shares
                        .iter()
                        .map(|s| round(*s as f64 / n as f64))
                        .collect::<Vec<_>>()
                ),
            );
            fields.insert(
                format!("{p}_duplicates"),
                json!(c.delivered.saturating_sub(n)),
            );
            fields.insert(format!("{p}_left"), json!(c.left));
            fields.insert(format!("{p}_peak_rss_mib"), json!(round(c.peak_rss_mib)));
            let mut cpu = cpu_fields(&p, &c.cpu, c.secs);
            // The harness's CPU here is mostly the receivers.
            if let Some(v) = cpu.remove(&format!("{p}_harness_cores")) {
                cpu.insert(format!("{p}_receiver_cores"), v);
            }
            if let Some(v) = cpu.remove(&format!("{p}_harness_cpu_secs")) {
                cpu.insert(format!("{p}_receiver_cpu_secs"), v);
            }
            fields.extend(cpu);
        }
        if let Some(one) = rate_of(1) {
            for k in [2, 3] {
                if let Some(r) = rate_of(k) {
                    fields.insert(format!("p{k}_over_p1"), json!(round(r / one)));
                }
            }
        }
    }
    Ok(report)
}

/// Where `broker-consumers`' processes read.
#[derive(Debug)]
enum Source {
    /// A RabbitMQ queue.
    Queue(String),
    /// A JetStream stream through a durable consumer (caudal creates it).
    Consumer { stream: String, consumer: String },
}

/// The `[sources.in]` section of `source`.
fn source_toml(args: &Args, source: &Source) -> String {
    match source {
        Source::Queue(queue) => format!(
            "type = \"rabbitmq\"\nurl = \"{}\"\nqueue = \"{queue}\"\n",
            args.amqp_url
        ),
        Source::Consumer { stream, consumer } => format!(
            "type = \"nats\"\nurl = \"{}\"\nstream = \"{stream}\"\nconsumer = \"{consumer}\"\n",
            args.nats_url
        ),
    }
}

/// caudal's configuration for one process of `broker-consumers`: the
/// broker source to the receiver at `receiver`, `ack = "buffered"`.
fn consumer_config(
    dir: &Path,
    source: &str,
    receiver: &Receiver,
    args: &Args,
) -> anyhow::Result<PathBuf> {
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.in]
{source}
[sinks.recv]
type = "http"
url = "http://{addr}/ingest"
batch = {{ max_records = {batch}, max_wait = "{max_wait}ms" }}
concurrency = {concurrency}

[pipelines.{PIPELINE}]
source = "in"
sink = "recv"
"#,
            state = dir.join("state.db").display(),
            addr = receiver.addr,
            batch = args.batch,
            max_wait = sink_max_wait_ms(args),
            concurrency = args.concurrency,
        ),
    )?;
    Ok(config)
}

/// Runs `k` `caudal run` processes on `source` until their receivers
/// together hold `n` records, then stops them (SIGTERM; each must exit 0).
async fn run_consumers(
    args: &Args,
    broker: Broker,
    source: &Source,
    k: usize,
    n: u64,
    dir: &Path,
) -> anyhow::Result<Consumed> {
    let toml = source_toml(args, source);
    let mut receivers = Vec::with_capacity(k);
    let mut configs = Vec::with_capacity(k);
    for i in 0..k {
        let sub = dir.join(format!("{}-p{k}-{i}", broker.name()));
        std::fs::create_dir_all(&sub)?;
        let receiver = receiver::start().await?;
        configs.push((consumer_config(&sub, &toml, &receiver, args)?, sub));
        receivers.push(receiver);
    }
    let total = |receivers: &[Receiver]| receivers.iter().map(Receiver::records).sum::<u64>();
    let mark = CpuMark::now(broker)?;
    let (_, children_before) = own_cpu()?;
    let mut processes = Vec::with_capacity(k);
    for (config, sub) in &configs {
        processes.push((spawn_caudal(caudal(args), config, sub, &["run"])?, sub));
    }
    let mut last = (0, Instant::now());
    loop {
        let got = total(&receivers);
        if got >= n {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        }
        if let Some((_, sub)) = processes.iter().find(|(p, _)| p.has_exited()) {
            bail!(
                "a caudal run exited after the receivers got {got} of {n} messages (log: {})",
                sub.join("caudal.log").display()
            );
        }
        if last.1.elapsed() > STALL {
            bail!(
                "the receivers got {got} of {n} messages and nothing more for {} s (logs: {})",
                STALL.as_secs(),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = mark.since()?;
    let secs = cpu.secs;
    for (p, _) in &processes {
        p.terminate()?;
    }
    let mut peak_rss_mib: f64 = 0.0;
    for (p, sub) in processes {
        let ended = wait_exit(p, sub, "caudal run", STALL).await?;
        peak_rss_mib = peak_rss_mib.max(ended.peak_rss_mib);
    }
    let (_, children_after) = own_cpu()?;
    // Requests sent just before the stop are counted a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let delivered = total(&receivers);
    let left = match source {
        Source::Queue(queue) => queue_count(&args.amqp_url, queue).await?,
        Source::Consumer { stream, consumer } => {
            let js = jetstream(&args.nats_url).await?;
            let stream = js.get_stream(stream).await?;
            let info = stream.consumer_info(consumer).await?;
            info.num_pending + u64::try_from(info.num_ack_pending)?
        }
    };
    Ok(Consumed {
        secs,
        cpu: CpuUse {
            caudal: children_after - children_before,
            ..cpu
        },
        shares: receivers.iter().map(Receiver::records).collect(),
        delivered,
        peak_rss_mib,
        left,
    })
}

#[cfg(test)]
mod tests {
    use super::{small_messages, stat_fields};

    #[test]
    fn cpu_times_are_read_after_the_command_name() {
        // A command name with spaces and parentheses, then state, ppid …
        // utime (14th field) = 250 ticks, stime = 50, cutime = 100, cstime = 0.
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 100 0 20 0 1";
        assert_eq!(stat_fields(stat), Some([2.5, 0.5, 1.0, 0.0]));
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn small_messages_are_json_with_unique_ids() {
        let m = small_messages(3, "x");
        let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["x-1", "x-2", "x-3"]);
        let body: serde_json::Value = serde_json::from_slice(&m[1].body).expect("JSON");
        assert_eq!(body["id"], 2);
        assert_eq!(body["amount"], 2.02);
    }
}
