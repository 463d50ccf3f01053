//! Broker sinks end to end: the real `caudal` binary reads a PostgreSQL
//! table of events (a per-account sequence number in each) and publishes
//! them to RabbitMQ, NATS JetStream and Kafka (librdkafka's mock cluster in
//! this process); the test reads back what the broker holds.
//!
//! What every test checks on what the broker holds: every record arrived;
//! each message's id is the record's event id, the one
//! `event_id(pipeline, position)` gives, so a duplicate (a re-send after a
//! fault) carries the same id and body; and per key, first occurrences are
//! in the source's order. Faults: the broker connection cut mid-batch
//! through a TCP proxy, `caudal run` killed with SIGKILL mid-delivery and
//! restarted, a queue deleted while caudal publishes, a subject no stream
//! captures, a message larger than the producer takes. A record the broker
//! cannot take becomes a dead letter with a reason naming where it went:
//! nothing is dropped.

#[path = "support/brokers.rs"]
mod brokers;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use brokers::{Message, NATS_ADDR, RABBITMQ_ADDR};
use caudal_core::record::{CursorValue, Position, event_id};
use caudal_testkit::{Proxy, TestDb, pg_database};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Daemon, Output, command, spawn_daemon};

/// The pipeline of every test.
const PIPELINE: &str = "events";
/// How long a whole delivery under faults may take: far more than it needs
/// on an idle machine (a few seconds), as the machine may be building.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(300);

/// One test's source table, state directory and config.
struct Events {
    db: TestDb,
    dir: tempfile::TempDir,
    /// Rows `1..=rows`.
    rows: i64,
}

impl Events {
    /// A fresh database whose `events` table holds rows `1..=rows`: row `g`
    /// belongs to account `(g-1) % keys` and is that account's event
    /// number `(g-1) / keys`, so per account the sequence grows with the
    /// cursor.
    async fn new(rows: i64, keys: i64) -> Self {
        let events = Self {
            db: pg_database().await,
            dir: tempfile::tempdir().expect("a state directory"),
            rows,
        };
        events
            .exec(&format!(
                "CREATE TABLE events (
                    id BIGINT PRIMARY KEY,
                    account_id INT NOT NULL,
                    seq INT NOT NULL,
                    note TEXT NOT NULL);
                 INSERT INTO events (id, account_id, seq, note)
                 SELECT g, (g - 1) % {keys}, (g - 1) / {keys}, 'event ' || g
                 FROM generate_series(1, {rows}) AS g;"
            ))
            .await;
        events
    }

    async fn exec(&self, sql: &str) {
        let pool = self.db.pg_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .expect("PostgreSQL statement");
        pool.close().await;
    }

    /// Writes the config with `sink` as the body of `[sinks.broker]`.
    fn write_config(&self, sink: &str) -> PathBuf {
        let config = format!(
            r#"[state]
url = "sqlite://{state}"

[sources.events]
type = "postgres"
url = "{url}"
table = "events"
cursor = ["id"]
first_load = "cursor"
page_size = 2000

[sinks.broker]
{sink}

[pipelines.{PIPELINE}]
source = "events"
sink = "broker"
schedule = {{ every = "200ms" }}
key = "account_id"
"#,
            state = self.dir.path().join("state.db").display(),
            url = self.db.url(),
        );
        let path = self.dir.path().join("caudal.toml");
        std::fs::write(&path, config).expect("write the config");
        path
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("caudal.toml")
    }

    fn daemon(&self, n: u32) -> Daemon {
        spawn_daemon(&self.config(), self.dir.path(), n)
    }

    async fn caudal(&self, args: &[&str]) -> Output {
        Output::of(command(&self.config(), self.dir.path(), args)).await
    }

    /// The pending dead letters (`caudal dlq list --json`).
    async fn dead_letters(&self) -> Vec<Value> {
        let out = self.caudal(&["dlq", "list", PIPELINE, "--json"]).await;
        assert_eq!(out.code, Some(0), "dlq list failed: {out}");
        out.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Event id → source row id, for every row.
    fn expected_ids(&self) -> HashMap<String, i64> {
        (1..=self.rows).map(|id| (row_event_id(id), id)).collect()
    }

    async fn cleanup(self) {
        self.db.cleanup().await;
    }
}

/// The event id of row `id`: its position is the cursor value.
fn row_event_id(id: i64) -> String {
    event_id(
        PIPELINE,
        &Position::Cursor {
            values: vec![CursorValue::Int(id)],
        },
    )
}

fn body_i64(m: &Message, field: &str) -> i64 {
    m.body[field]
        .as_i64()
        .unwrap_or_else(|| panic!("a message without a numeric {field}: {m:?}"))
}

/// The identity every message must carry: the event id of its row (also
/// derivable from its `caudal-position` header), the record key of its
/// account, the pipeline and a batch key.
fn check_identity(m: &Message) {
    let id = body_i64(m, "id");
    assert_eq!(
        m.event_id(),
        row_event_id(id),
        "event id of row {id}: {m:?}"
    );
    let position: Position = serde_json::from_str(
        m.header(brokers::POSITION)
            .unwrap_or_else(|| panic!("no {} header: {m:?}", brokers::POSITION)),
    )
    .unwrap_or_else(|e| panic!("{} is not a position ({e}): {m:?}", brokers::POSITION));
    assert_eq!(event_id(PIPELINE, &position), m.event_id(), "{m:?}");
    assert_eq!(
        m.header(brokers::KEY),
        Some(body_i64(m, "account_id").to_string().as_str()),
        "record key header: {m:?}"
    );
    assert_eq!(m.header(brokers::PIPELINE), Some(PIPELINE), "{m:?}");
    assert!(
        m.header(brokers::BATCH).is_some_and(|b| !b.is_empty()),
        "no batch key: {m:?}"
    );
}

/// Checks the messages of one queue/stream/partition (see
/// [`brokers::check_messages`]) keyed by account and ordered by `seq`, and
/// each one's identity; returns the row ids seen and the duplicates.
fn check_rows(messages: &[Message]) -> (BTreeSet<i64>, usize) {
    for m in messages {
        check_identity(m);
    }
    let checked = brokers::check_messages(
        messages,
        |m| m.header(brokers::KEY).unwrap_or_default().to_string(),
        |m| body_i64(m, "seq"),
    );
    let ids = checked
        .bodies
        .values()
        .map(|b| b["id"].as_i64().expect("an id"))
        .collect();
    (ids, checked.duplicates)
}

/// A record sent again (after a cut or a kill) went in the same batch, under
/// the same batch key: a buffered batch is never cut differently.
fn check_same_batch(messages: &[Message]) {
    let mut batch_of: HashMap<&str, &str> = HashMap::new();
    for m in messages {
        let batch = m.header(brokers::BATCH).unwrap_or_default();
        let first = *batch_of.entry(m.event_id()).or_insert(batch);
        assert_eq!(
            first,
            batch,
            "row {} sent in two batches",
            body_i64(m, "id")
        );
    }
}

/// What a test does to the delivery once this many records have reached
/// the broker.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Close every broker connection through the proxy.
    Cut,
    /// SIGKILL `caudal run` and start it again.
    Kill,
}

/// The faults of a delivery under test: the running daemon, the proxy
/// between it and the broker, and what to do at which progress.
struct Faults<'a> {
    events: &'a Events,
    /// Where cuts happen (none: the plan has no cuts).
    proxy: Option<&'a Proxy>,
    daemon: Option<Daemon>,
    /// The number of the running daemon (its log is `daemon-<n>.log`).
    started: u32,
    /// Connections through the proxy when the running daemon started.
    connections_at_start: usize,
    plan: Vec<(usize, Fault)>,
}

impl<'a> Faults<'a> {
    /// Starts the first daemon, to be cut and killed as `plan` says.
    fn start(events: &'a Events, proxy: Option<&'a Proxy>, plan: Vec<(usize, Fault)>) -> Self {
        Self {
            events,
            proxy,
            daemon: Some(events.daemon(0)),
            started: 0,
            connections_at_start: proxy.map_or(0, Proxy::accepted),
            plan,
        }
    }

    /// Five cuts and four kills spread over a delivery of `rows` records.
    fn cuts_and_kills(rows: usize) -> Vec<(usize, Fault)> {
        [
            (0.06, Fault::Cut),
            (0.14, Fault::Kill),
            (0.25, Fault::Cut),
            (0.33, Fault::Kill),
            (0.45, Fault::Cut),
            (0.52, Fault::Cut),
            (0.60, Fault::Kill),
            (0.72, Fault::Cut),
            (0.80, Fault::Kill),
            (0.90, Fault::Cut),
        ]
        .into_iter()
        .map(|(at, f)| ((rows as f64 * at) as usize, f))
        .collect()
    }

    fn done(&self) -> bool {
        self.plan.is_empty()
    }

    fn kills(&self) -> u32 {
        self.started
    }

    /// Runs the faults whose threshold `progress` has reached. A cut waits
    /// until the running daemon has connected, so it always cuts a
    /// connection caudal is using.
    async fn at(&mut self, progress: usize) {
        while self.plan.first().is_some_and(|(at, _)| *at <= progress) {
            let (_, fault) = self.plan.remove(0);
            match fault {
                Fault::Cut => {
                    let proxy = self.proxy.expect("a proxy to cut");
                    let deadline = tokio::time::Instant::now() + DELIVERY_PATIENCE;
                    while proxy.accepted() <= self.connections_at_start {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "daemon {} never connected:\n{}",
                            self.started,
                            self.logs()
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    proxy.cut();
                }
                Fault::Kill => {
                    let daemon = self.daemon.take().expect("a running daemon");
                    let (status, log) = daemon.stop(Signal::SIGKILL).await;
                    assert_eq!(status.code(), None, "killed by a signal; log:\n{log}");
                    self.started += 1;
                    self.connections_at_start = self.proxy.map_or(0, Proxy::accepted);
                    self.daemon = Some(self.events.daemon(self.started));
                }
            }
        }
    }

    /// Stops the last daemon cleanly.
    async fn finish(&mut self) {
        stop(self.daemon.take().expect("the last daemon")).await;
    }

    /// Retries the daemons logged (each a batch published again).
    fn retries_logged(&self) -> usize {
        (0..=self.started)
            .map(|n| self.log(n).matches("delivery failed; retrying").count())
            .sum()
    }

    fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.events.dir.path().join(format!("daemon-{n}.log")))
            .unwrap_or_default()
    }

    /// The last lines of every daemon's log.
    fn logs(&self) -> String {
        (0..=self.started)
            .map(|n| {
                let log = self.log(n);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- daemon {n} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Stops the last daemon cleanly; returns its log.
async fn stop(daemon: Daemon) -> String {
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(
        status.code(),
        Some(0),
        "caudal run after SIGTERM; log:\n{log}"
    );
    log
}

// ------------------------------------------------------------- RabbitMQ

/// 20,000 events of 200 accounts published to a declared queue through a
/// proxy that is cut mid-batch five times, while `caudal run` is killed
/// with SIGKILL four times mid-delivery: every event arrives, every
/// duplicate is a re-send with the same message id and body, and per
/// account first arrivals keep the source order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sink_delivers_every_record_in_key_order_through_cuts_and_kills() {
    const ROWS: i64 = 20_000;
    let amqp = brokers::rabbitmq().await;
    let proxy = Proxy::start(RABBITMQ_ADDR).await;
    let mut created = brokers::Created::default();
    let queue = created.queue("caudal_t_sink");
    let events = Events::new(ROWS, 200).await;
    events.write_config(&format!(
        r#"type = "rabbitmq"
url = "{url}"
declare = {{ queue = "{queue}" }}
batch = {{ max_records = 100, max_wait = "100ms" }}
timeout = "10s"
delivery = {{ retry = {{ initial = "50ms", max_delay = "1s" }} }}"#,
        url = brokers::rabbitmq_url(&proxy.addr().to_string()),
    ));

    let mut faults = Faults::start(&events, Some(&proxy), Faults::cuts_and_kills(ROWS as usize));
    let deadline = tokio::time::Instant::now() + DELIVERY_PATIENCE;
    // The sink declares the queue when it first connects.
    while brokers::queue_length(&amqp, &queue).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {queue} never declared:\n{}",
            faults.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reader = brokers::channel(&amqp).await;
    let mut got: Vec<Message> = Vec::new();
    let mut rows: HashSet<i64> = HashSet::new();
    loop {
        let new = brokers::drain_queue(&reader, &queue, 500).await;
        rows.extend(new.iter().map(|m| body_i64(m, "id")));
        got.extend(new);
        if rows.len() == ROWS as usize && faults.done() {
            break;
        }
        // Published so far, about: read, and waiting to be read.
        let waiting = brokers::queue_length(&amqp, &queue).await.unwrap_or(0);
        faults.at(rows.len() + waiting as usize).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {ROWS} rows arrived within {DELIVERY_PATIENCE:?}:\n{}",
            rows.len(),
            faults.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    faults.finish().await;
    got.extend(brokers::drain_queue(&reader, &queue, usize::MAX).await);

    let (ids, duplicates) = check_rows(&got);
    assert_eq!(ids, (1..=ROWS).collect::<BTreeSet<_>>());
    check_same_batch(&got);
    let kills = faults.kills() as usize;
    assert!(
        proxy.accepted() > kills + 1,
        "no cut made the sink reconnect: {} connections, {kills} kills",
        proxy.accepted()
    );
    eprintln!(
        "rabbitmq: {} messages for {ROWS} rows ({duplicates} re-sent), {} connections, \
         {} retries logged, {kills} kills",
        got.len(),
        proxy.accepted(),
        faults.retries_logged()
    );

    events.cleanup().await;
}

/// The queue is deleted while caudal publishes to it through the default
/// exchange: later batches are unroutable and become dead letters whose
/// reason names the exchange and the routing key; every record is either
/// in the queue or a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_deleted_mid_delivery_turns_batches_into_dead_letters() {
    unroutable_after_queue_deleted(false).await;
}

/// The same through a named exchange whose only bound queue is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_exchange_losing_its_only_queue_turns_batches_into_dead_letters() {
    unroutable_after_queue_deleted(true).await;
}

/// `through_exchange`: publish through an exchange of the test's own
/// rather than the default exchange.
async fn unroutable_after_queue_deleted(through_exchange: bool) {
    const ROWS: i64 = 2000;
    let amqp = brokers::rabbitmq().await;
    let mut created = brokers::Created::default();
    let queue = created.queue("caudal_t_gone");
    let exchange = through_exchange.then(|| created.exchange("caudal_t_x"));
    let exchange = exchange.as_deref();
    brokers::declare_queue(&amqp, &queue).await;
    // Through an exchange, the routing key is not the queue's name.
    let routing_key = match exchange {
        Some(x) => {
            let ch = brokers::channel(&amqp).await;
            ch.exchange_declare(
                ShortString::from(x),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the exchange");
            ch.queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(x),
                ShortString::from("events.all"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the queue");
            "events.all".to_string()
        }
        None => queue.clone(),
    };
    let events = Events::new(ROWS, 50).await;
    // Paced (20 batches of 25 a second, after a burst of 20) so the queue
    // is empty between batches and can be deleted with `if-empty`: nothing
    // that reached it is lost with it.
    events.write_config(&format!(
        r#"type = "rabbitmq"
url = "{url}"
exchange = "{exchange}"
routing_key = "{routing_key}"
batch = {{ max_records = 25, max_wait = "100ms" }}
delivery = {{ rate_limit = {{ requests_per_second = 20 }} }}"#,
        url = brokers::rabbitmq_url(RABBITMQ_ADDR),
        exchange = exchange.unwrap_or_default(),
    ));
    let daemon = events.daemon(0);

    let reader = brokers::channel(&amqp).await;
    let mut delivered: Vec<Message> = Vec::new();
    let deadline = tokio::time::Instant::now() + DELIVERY_PATIENCE;
    // Once a third of the rows are in the queue, with caudal frozen
    // mid-delivery (SIGSTOP: its connection stays open), empty the queue
    // and delete it (`if-empty`, so nothing that reached it is lost with
    // it), and let caudal go on.
    while brokers::queue_length(&amqp, &queue)
        .await
        .is_none_or(|n| i64::from(n) < ROWS / 3)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a third of the rows never reached the queue:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.signal(Signal::SIGSTOP);
    loop {
        delivered.extend(brokers::drain_queue(&reader, &queue, usize::MAX).await);
        // A failed delete closes its channel: a new one each time.
        let deleted = brokers::channel(&amqp)
            .await
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions {
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        if deleted.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not delete the queue: {deleted:?}"
        );
    }
    daemon.signal(Signal::SIGCONT);
    assert!(
        (delivered.len() as i64) < ROWS,
        "everything was delivered before the queue was deleted; slow the sink down:\n{}",
        daemon.log()
    );

    // Every other record becomes a dead letter.
    let expected = events.expected_ids();
    let delivered_ids: HashSet<String> =
        delivered.iter().map(|m| m.event_id().to_string()).collect();
    let letters = loop {
        let letters = events.dead_letters().await;
        let covered = letters
            .iter()
            .filter_map(|l| l["event_id"].as_str())
            .chain(delivered_ids.iter().map(String::as_str))
            .collect::<HashSet<_>>()
            .len();
        if covered >= expected.len() {
            break letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{covered} of {ROWS} rows delivered or dead letters:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let log = stop(daemon).await;

    let (ids, _) = check_rows(&delivered);
    assert!(!ids.is_empty());
    let exchange_name = format!("{:?}", exchange.unwrap_or_default());
    let mut dead: HashSet<&str> = HashSet::new();
    for l in &letters {
        let reason = l["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("could not route")
                && reason.contains(&format!("exchange {exchange_name}"))
                && reason.contains(&routing_key),
            "the reason should name the exchange {exchange_name} and the routing key \
             {routing_key}: {l}"
        );
        let id = l["event_id"].as_str().expect("an event id");
        assert!(expected.contains_key(id), "a dead letter of no row: {l}");
        dead.insert(id);
    }
    let missing: Vec<i64> = expected
        .iter()
        .filter(|(e, _)| !dead.contains(e.as_str()) && !delivered_ids.contains(*e))
        .map(|(_, id)| *id)
        .collect();
    assert!(
        missing.is_empty(),
        "rows neither delivered nor dead letters: {missing:?}"
    );
    // The log says why, too.
    assert!(log.contains("could not route"), "{log}");
    eprintln!(
        "rabbitmq unroutable ({exchange_name}): {} delivered, {} dead letters",
        delivered_ids.len(),
        dead.len()
    );

    events.cleanup().await;
}

// ----------------------------------------------------------------- NATS

/// 20,000 events published to a stream the sink creates, over 4 subjects by
/// key hash, through a proxy cut mid-batch while `caudal run` is killed
/// with SIGKILL: the stream holds every event exactly once (the duplicate
/// window drops every re-send: `Nats-Msg-Id` is the event id), in per-key
/// order. Then every batch is sent again (checkpoint reset): the stream
/// still holds each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sink_stores_every_record_once_in_key_order_through_cuts_and_kills() {
    const ROWS: i64 = 20_000;
    let js = async_nats::jetstream::new(brokers::nats().await);
    let proxy = Proxy::start(NATS_ADDR).await;
    let mut created = brokers::Created::default();
    let stream = created.stream("CAUDAL_T_SINK");
    let prefix = brokers::unique("caudal_t_sink");
    let events = Events::new(ROWS, 200).await;
    events.write_config(&format!(
        r#"type = "nats"
url = "nats://{addr}"
subject = "{prefix}.{{{{ partition }}}}"
partitions = 4
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], duplicate_window = "10m" }}
batch = {{ max_records = 100, max_wait = "100ms" }}
timeout = "4s"
delivery = {{ retry = {{ initial = "50ms", max_delay = "1s" }} }}"#,
        addr = proxy.addr(),
    ));

    let mut faults = Faults::start(&events, Some(&proxy), Faults::cuts_and_kills(ROWS as usize));
    let deadline = tokio::time::Instant::now() + DELIVERY_PATIENCE;
    let got = loop {
        let (messages, _) = brokers::stream_state(&js, &stream)
            .await
            .unwrap_or_default();
        let progress = usize::try_from(messages).expect("a count");
        faults.at(progress).await;
        if progress >= ROWS as usize && faults.done() {
            // Everything is there once a read finds every row.
            let got = brokers::read_stream(&js, &stream).await;
            let rows: HashSet<i64> = got.iter().map(|m| body_i64(m, "id")).collect();
            if rows.len() == ROWS as usize {
                break got;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{progress} messages for {ROWS} rows within {DELIVERY_PATIENCE:?}:\n{}",
            faults.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    faults.finish().await;
    let (retries, kills) = (faults.retries_logged(), faults.kills() as usize);

    let (ids, duplicates) = check_rows(&got);
    assert_eq!(ids, (1..=ROWS).collect::<BTreeSet<_>>());
    assert_eq!(
        duplicates, 0,
        "the stream stored re-sent events again ({retries} retries logged, {kills} kills)"
    );
    // Nats-Msg-Id is the event id (check_messages compared them); one
    // key, one subject.
    let mut subjects: HashMap<String, String> = HashMap::new();
    for m in &got {
        assert!(m.id.is_some(), "no Nats-Msg-Id: {m:?}");
        let key = m.header(brokers::KEY).unwrap_or_default().to_string();
        let subject = subjects.entry(key.clone()).or_insert(m.route.clone());
        assert_eq!(subject, &m.route, "key {key} on two subjects");
    }
    let state = brokers::stream_state(&js, &stream)
        .await
        .expect("the stream");
    assert_eq!(
        state,
        (ROWS as u64, ROWS as u64),
        "(messages, last sequence)"
    );
    assert!(
        proxy.accepted() > kills + 1,
        "no cut made the sink reconnect: {} connections, {kills} kills",
        proxy.accepted()
    );

    // Every batch sent again within the duplicate window: stored once.
    let out = events.caudal(&["checkpoint", "reset", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = events.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains(&format!("{ROWS} delivered")),
        "every row sent again: {out}"
    );
    assert_eq!(
        brokers::stream_state(&js, &stream)
            .await
            .expect("the stream"),
        (ROWS as u64, ROWS as u64),
        "re-sent events were stored again"
    );
    eprintln!(
        "nats: {ROWS} rows stored once, {} connections, {retries} retries logged, \
         {kills} kills, then {ROWS} re-sent and dropped as duplicates",
        proxy.accepted()
    );

    events.cleanup().await;
}

/// A subject no stream captures: the batches become dead letters whose
/// reason says so and names the subject; nothing is retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subject_without_stream_turns_batches_into_dead_letters() {
    const ROWS: i64 = 60;
    // Fail loudly when the server is not there.
    drop(brokers::nats().await);
    let subject = format!("{}.events", brokers::unique("caudal_t_nostream"));
    let events = Events::new(ROWS, 10).await;
    events.write_config(&format!(
        r#"type = "nats"
url = "nats://{NATS_ADDR}"
subject = "{subject}"
batch = {{ max_records = 20 }}
timeout = "10s""#
    ));
    let out = events.caudal(&["once", PIPELINE]).await;
    assert!(
        out.stdout.contains(&format!("{ROWS} dead letters")),
        "every row a dead letter: {out}"
    );

    let letters = events.dead_letters().await;
    let expected = events.expected_ids();
    assert_eq!(letters.len(), ROWS as usize, "{letters:?}");
    let mut seen = HashSet::new();
    for l in &letters {
        let reason = l["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("no stream captures subject") && reason.contains(&subject),
            "the reason should name the subject {subject}: {l}"
        );
        let id = l["event_id"].as_str().expect("an event id");
        assert!(expected.contains_key(id), "a dead letter of no row: {l}");
        seen.insert(id.to_string());
    }
    assert_eq!(seen.len(), ROWS as usize);
    events.cleanup().await;
}

// ---------------------------------------------------------------- Kafka

/// 6,000 events of 50 accounts, one of them larger than the producer's
/// `message.max.bytes`, produced to a 4-partition topic of a mock cluster
/// whose first produce requests fail (a dropped connection, a leader
/// change), while `caudal run` is killed with SIGKILL twice mid-delivery:
/// every small record arrives with the record key as message key and its
/// identity headers, each key in one partition in source order; the large
/// one splits its batch and becomes a dead letter that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_delivers_in_key_order_through_kills_and_dead_letters_a_record_too_large() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const ROWS: i64 = 6000;
    const PARTITIONS: i32 = 4;
    // In the middle of a batch, so that batch is split around it.
    const LARGE: i64 = 3050;
    let cluster = brokers::kafka_cluster(3);
    let bootstrap = cluster.bootstrap_servers();
    let topic = brokers::unique("caudal_t_sink");
    cluster
        .create_topic(&topic, PARTITIONS, 1)
        .expect("create the topic");
    let events = Events::new(ROWS, 50).await;
    events
        .exec(&format!(
            "UPDATE events SET note = repeat('x', 5000) WHERE id = {LARGE}"
        ))
        .await;
    events.write_config(&format!(
        r#"type = "kafka"
brokers = "{bootstrap}"
topic = "{topic}"
options = {{ "message.max.bytes" = "1000", "max.in.flight.requests.per.connection" = "1" }}
batch = {{ max_records = 100 }}
timeout = "10s"
delivery = {{ retry = {{ initial = "50ms", max_delay = "1s" }} }}"#
    ));
    // The first Produce requests fail, two of them with an uncertain outcome
    // (the connection drops). librdkafka's idempotent producer then counts
    // such a request's messages as stored once a later request of the same
    // partition succeeds, since a broker only appends a producer's batches
    // in sequence. The mock cluster checks sequences for transactional
    // producers only, so with several requests in flight it would append
    // the later batch over the gap and the earlier messages would be lost
    // in the mock alone. One request in flight per connection keeps the
    // test to what a real broker does. caudal itself keeps librdkafka's
    // default (up to 5 in flight), which a real broker's sequence check
    // makes safe; this test no longer covers several requests in flight.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );

    let rows = ROWS as usize;
    let plan = vec![(rows / 4, Fault::Kill), (rows * 3 / 5, Fault::Kill)];
    let mut faults = Faults::start(&events, None, plan);
    let deadline = tokio::time::Instant::now() + DELIVERY_PATIENCE;
    loop {
        let size =
            tokio::task::block_in_place(|| brokers::topic_size(&bootstrap, &topic, PARTITIONS));
        let size = usize::try_from(size).expect("a size");
        faults.at(size).await;
        // Every small record, and the large one's dead letter.
        if size >= rows - 1 && faults.done() && !events.dead_letters().await.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{size} messages for {ROWS} rows within {DELIVERY_PATIENCE:?}:\n{}",
            faults.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected: BTreeSet<i64> = (1..=ROWS).filter(|id| *id != LARGE).collect();
    let wanted = expected.len();
    let reader_topic = topic.clone();
    let reader_bootstrap = bootstrap.clone();
    let mut seen = HashSet::new();
    let partitions = tokio::task::spawn_blocking(move || {
        brokers::read_topic(
            &reader_bootstrap,
            &reader_topic,
            PARTITIONS,
            Duration::from_secs(30),
            |m| {
                seen.insert(m.body["id"].as_i64());
                seen.len() >= wanted
            },
        )
    })
    .await
    .expect("the reader");
    faults.finish().await;

    let mut ids = BTreeSet::new();
    let mut duplicates = 0;
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for (p, messages) in &partitions {
        for m in messages {
            let key = m.key.clone().expect("a message key");
            assert_eq!(m.header(brokers::KEY), Some(key.as_str()), "{m:?}");
            let first = *partition_of.entry(key.clone()).or_insert(*p);
            assert_eq!(first, *p, "key {key} in partitions {first} and {p}");
        }
        let (seen, dups) = check_rows(messages);
        ids.extend(seen);
        duplicates += dups;
    }
    if ids != expected {
        // Tell a message the brokers never kept from one the reader missed.
        let marks = brokers::watermarks(&bootstrap, &topic, PARTITIONS);
        let read: Vec<usize> = (0..PARTITIONS)
            .map(|p| partitions.get(&p).map_or(0, Vec::len))
            .collect();
        let missing: Vec<&i64> = expected.difference(&ids).collect();
        panic!(
            "rows {missing:?} missing; read per partition {read:?}, watermarks {marks:?}\n{}",
            faults.logs()
        );
    }

    let letters = events.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["event_id"], row_event_id(LARGE), "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("too large"), "{reason}");
    eprintln!(
        "kafka: {wanted} rows in {} partitions ({duplicates} re-sent), {} retries logged, \
         {} kills, 1 dead letter: {reason}",
        partitions.len(),
        faults.retries_logged(),
        faults.kills()
    );
    events.cleanup().await;
}
