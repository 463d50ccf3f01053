//! The split deployment of seed 000 end to end: process A captures a
//! PostgreSQL table by CDC into a broker (RabbitMQ partition queues, or a
//! JetStream stream), and several processes B consume it and deliver to
//! the partner API (an HTTP receiver on loopback). Every process is the
//! real `caudal run` with its own state directory, and every one of them
//! is killed with SIGKILL at least once while the table is being written.
//!
//! What must hold afterwards:
//! - **Nothing lost.** Every change arrived: as many distinct changes as
//!   the snapshot read rows and the writers' statements touched rows, and
//!   the changes, applied in their source order, reproduce the table.
//! - **Duplicates are recognisable.** A change may arrive more than once,
//!   but always under the same event id (the body template sends the ids),
//!   and an id always carries the same change.
//! - **Per-key order.** With single-active-consumer partition queues
//!   (RabbitMQ) or partition subjects read under caudal's leases
//!   (JetStream), and `ack = "delivered"`, the first arrivals of one row's
//!   changes are in commit order, so applying them as they arrived
//!   reproduces the table too.
//!
//! Each test names its own slot, queues, exchange and stream, and removes
//! them at the end (also when it fails).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use caudal_testkit::{Receiver, Reply, TestDb, pg_database};
use nix::sys::signal::Signal;
use rand::Rng as _;
use serde_json::{Value, json};
use support::cdc::{Tables, apply, check_logical, difference, drop_slot, normalise};
use support::{Daemon, PATIENCE, spawn_daemon};

const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";
/// Key-hash partitions of the broker sink (RabbitMQ queues, NATS subjects).
const PARTITIONS: u32 = 4;
/// Rows the table holds before A starts: its snapshot.
const INITIAL_ROWS: i64 = 200;
/// Ids the writers touch (some beyond the initial rows: inserts).
const ID_RANGE: i64 = 260;
/// Where the receiver finds the events in a request body.
const EVENTS: &str = "/changes";
/// Distinct changes that must arrive after a kill before the next one, so
/// every restarted or newly active process has done real work.
const PROGRESS: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broker {
    Rabbitmq,
    Nats,
}

/// One `caudal run` of the deployment, restarted at will.
struct Process {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    starts: u32,
    daemon: Option<Daemon>,
}

impl Process {
    fn new(root: &Path, name: &str, config: String) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("a state directory");
        let path = dir.join("caudal.toml");
        std::fs::write(&path, config).expect("write the config");
        Self {
            name: name.to_string(),
            dir,
            config: path,
            starts: 0,
            daemon: None,
        }
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} is running already", self.name);
        self.starts += 1;
        self.daemon = Some(spawn_daemon(&self.config, &self.dir, self.starts));
    }

    /// SIGKILL, waiting for the process to be gone.
    async fn kill(&mut self) {
        let daemon = self.daemon.take().expect("a running process");
        daemon.stop(Signal::SIGKILL).await;
    }

    /// The log of the current (or last) start.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("daemon-{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// The last lines of every start's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let log = std::fs::read_to_string(self.dir.join(format!("daemon-{n}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out += &format!("--- {} start {n}\n{}\n", self.name, tail.join("\n"));
        }
        out
    }

    /// Waits until the current start logs `line`.
    async fn wait_for_log(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !self.log().contains(line) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not log {line:?} within {PATIENCE:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One test's deployment: the source database, the broker names, the
/// partner's receiver, process A (`capture`) and the processes B
/// (`deliver`).
struct Split {
    broker: Broker,
    db: TestDb,
    receiver: Receiver,
    /// Slot, publication, queue, exchange, stream: all named after it.
    name: String,
    _root: tempfile::TempDir,
    a: Process,
    b: Vec<Process>,
}

impl Split {
    async fn new(broker: Broker, consumers: usize) -> Self {
        check_broker(broker).await;
        let db = pg_database().await;
        check_logical(&db).await;
        let name = format!("caudal_split_{}", &db.name()[db.name().len() - 16..]);
        let receiver = Receiver::start().await;
        let root = tempfile::tempdir().expect("a temporary directory");
        let a = Process::new(
            root.path(),
            "a",
            capture_config(broker, &name, &db, root.path()),
        );
        let b = (1..=consumers)
            .map(|i| {
                let dir = format!("b{i}");
                let config = deliver_config(broker, &name, &receiver, &root.path().join(&dir));
                Process::new(root.path(), &dir, config)
            })
            .collect();
        let split = Self {
            broker,
            db,
            receiver,
            name,
            _root: root,
            a,
            b,
        };
        split
            .exec(&format!(
                "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, \
                 balance bigint NOT NULL, note text);
                 INSERT INTO accounts SELECT g, 'owner ' || g, g * 10, 'n' \
                 FROM generate_series(1, {INITIAL_ROWS}) g;"
            ))
            .await;
        split
    }

    async fn exec(&self, sql: &str) {
        let pool = self.db.pg_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    }

    /// Every process's recent log lines.
    fn logs(&self) -> String {
        std::iter::once(&self.a)
            .chain(&self.b)
            .map(Process::logs)
            .collect()
    }

    /// Starts A, then the Bs one after another, each once its consumer is
    /// connected (with single-active-consumer queues, the first B is the
    /// active one and the others queue up behind it in this order).
    async fn start(&mut self) {
        self.a.start();
        if self.broker == Broker::Nats {
            // A creates the stream when it first publishes: the snapshot.
            wait_for_stream(&self.name).await;
        }
        for b in &mut self.b {
            b.start();
            b.wait_for_log("broker consumer connected").await;
        }
    }

    fn delivered(&self) -> Delivered {
        Delivered::of(&self.receiver)
    }

    /// Waits until `n` distinct changes have arrived.
    async fn wait_for_distinct(&self, n: usize) {
        let arrived = self
            .receiver
            .wait_for(
                |requests| {
                    let ids: BTreeSet<&str> = requests
                        .iter()
                        .filter(|r| r.accepted())
                        .filter_map(|r| r.json.as_ref()?.pointer(EVENTS)?.as_array())
                        .flatten()
                        .filter_map(|e| e["id"].as_str())
                        .collect();
                    ids.len() >= n
                },
                PATIENCE,
            )
            .await;
        assert!(
            arrived,
            "{n} distinct changes did not arrive within {PATIENCE:?} ({} did); logs:\n{}",
            self.delivered().first.len(),
            self.logs()
        );
    }

    /// Waits for [`PROGRESS`] more distinct changes, then a random moment.
    async fn progress(&self) {
        let now = self.delivered().first.len();
        self.wait_for_distinct(now + PROGRESS).await;
        let ms = rand::rng().random_range(0..800);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Every row of the table, as caudal renders its columns.
    async fn source_rows(&self) -> Tables {
        let pool = self.db.pg_pool().await;
        let rows: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(x) FROM accounts x")
            .fetch_all(&pool)
            .await
            .expect("read the source table");
        pool.close().await;
        let mut out = Tables::new();
        let table = out.entry("public.accounts".to_string()).or_default();
        for (row,) in rows {
            let Value::Object(row) = row else { continue };
            table.insert(json!([row["id"]]).to_string(), row);
        }
        out.retain(|_, rows| !rows.is_empty());
        normalise(out)
    }

    /// Waits until `expected` distinct changes have arrived and, applied
    /// in their source order, they reproduce the table; returns what
    /// arrived. Panics with the difference otherwise.
    async fn wait_for_copy(&self, expected: usize) -> Delivered {
        let want = self.source_rows().await;
        let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
        loop {
            let got = self.delivered();
            let replay = apply(&got.in_source_order());
            if got.first.len() >= expected && replay == want {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "after {:?}, {} of {expected} changes arrived and the replayed copy \
                     differs from the table: {}\nlogs:\n{}",
                    2 * PATIENCE,
                    got.first.len(),
                    difference(&want, &replay),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops every process with SIGTERM; each must exit cleanly.
    async fn stop(&mut self) {
        for p in std::iter::once(&mut self.a).chain(&mut self.b) {
            let name = p.name.clone();
            let daemon = p.daemon.take().expect("a running process");
            let (status, log) = daemon.stop(Signal::SIGTERM).await;
            assert!(status.success(), "{name} exited with {status}:\n{log}");
        }
    }
}

impl Drop for Split {
    /// Kills what still runs, then removes the slot and the broker's
    /// queues, exchange or stream (the database goes with [`TestDb`]).
    fn drop(&mut self) {
        for p in std::iter::once(&mut self.a).chain(&mut self.b) {
            drop(p.daemon.take());
        }
        let (broker, name, url) = (self.broker, self.name.clone(), self.db.url().to_string());
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                drop_slot(&url, &name).await;
                match broker {
                    Broker::Rabbitmq => delete_rabbitmq(&name).await,
                    Broker::Nats => delete_stream(&name).await,
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Process A: the table by CDC into the broker, partitioned by the
/// record key (the table's primary key).
fn capture_config(broker: Broker, name: &str, db: &TestDb, root: &Path) -> String {
    let sink = match broker {
        Broker::Rabbitmq => format!(
            r#"type = "rabbitmq"
url = "{RABBITMQ_URL}"
exchange = "{name}"
routing_key = "{name}.{{{{ partition }}}}"
partitions = {PARTITIONS}
declare = {{ exchange_type = "direct", queue = "{name}", single_active_consumer = true }}"#
        ),
        Broker::Nats => format!(
            r#"type = "nats"
url = "{NATS_URL}"
subject = "{name}.{{{{ partition }}}}"
partitions = {PARTITIONS}
stream = {{ name = "{name}", subjects = ["{name}.>"], duplicate_window = "5m" }}"#
        ),
    };
    format!(
        r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["accounts"]
slot = "{name}"
publication = "{name}"
heartbeat = "1s"

[sinks.broker]
{sink}
timeout = "10s"
batch = {{ max_records = 200, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[pipelines.capture]
source = "pg"
sink = "broker"
"#,
        state = root.join("a").join("state.db").display(),
        url = db.url(),
    )
}

/// A process B: the broker to the partner API, the body carrying each
/// record's event id and key, acknowledged once delivered. RabbitMQ: the
/// partition queues, declared single-active-consumer. JetStream: the
/// partition subjects, each read by one B at a time under a lease.
fn deliver_config(broker: Broker, name: &str, receiver: &Receiver, dir: &Path) -> String {
    let (source, ack) = match broker {
        Broker::Rabbitmq => (
            format!(
                r#"type = "rabbitmq"
url = "{RABBITMQ_URL}"
queue = "{name}"
partitions = {PARTITIONS}
declare = true
single_active_consumer = true
prefetch = 500"#
            ),
            "delivered",
        ),
        Broker::Nats => (
            format!(
                r#"type = "nats"
url = "{NATS_URL}"
stream = "{name}"
consumer = "deliver"
filter_subject = "{name}"
partitions = {PARTITIONS}
lease = "3s"
ack_wait = "10s"
prefetch = 500"#
            ),
            "delivered",
        ),
    };
    format!(
        r#"[state]
url = "sqlite://{state}"

[sources.broker]
{source}

[sinks.partner]
type = "http"
url = "{receiver}"
batch = {{ max_records = 100, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}
body = '{{"changes": {{{{ events | tojson }}}}}}'

[pipelines.deliver]
source = "broker"
sink = "partner"
ack = "{ack}"
"#,
        state = dir.join("state.db").display(),
        receiver = receiver.url("/partner/changes"),
    )
}

/// Fails loudly, saying how to get the broker, when it does not answer.
async fn check_broker(broker: Broker) {
    let how = "scripts/test starts it (or: rabbitmq-server -detached; nats-server -js)";
    match broker {
        Broker::Rabbitmq => {
            if let Err(e) =
                lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
                    .await
            {
                panic!("RabbitMQ does not answer at {RABBITMQ_URL}: {e}; {how}");
            }
        }
        Broker::Nats => {
            let client = async_nats::connect(NATS_URL)
                .await
                .unwrap_or_else(|e| panic!("NATS does not answer at {NATS_URL}: {e}; {how}"));
            assert!(
                client.server_info().jetstream,
                "NATS at {NATS_URL} runs without JetStream; {how}"
            );
        }
    }
}

/// Messages waiting in the broker for the Bs: ready in the partition
/// queues, or pending for the partition consumers.
async fn backlog(broker: Broker, name: &str) -> u64 {
    match broker {
        Broker::Rabbitmq => {
            let conn =
                lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
                    .await
                    .expect("connect to RabbitMQ");
            let channel = conn.create_channel().await.expect("a channel");
            let mut ready = 0;
            for i in 0..PARTITIONS {
                let queue = channel
                    .queue_declare(
                        format!("{name}.{i}").as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        Default::default(),
                    )
                    .await
                    .expect("the partition queue exists");
                ready += u64::from(queue.message_count());
            }
            let _ = conn.close(200, "done".into()).await;
            ready
        }
        Broker::Nats => {
            let client = async_nats::connect(NATS_URL)
                .await
                .expect("connect to NATS");
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(name).await.expect("the stream exists");
            let mut pending = 0;
            for i in 0..PARTITIONS {
                // A partition not taken yet has no consumer: its
                // messages are not counted (the count is a lower bound).
                if let Ok(info) = stream.consumer_info(format!("deliver-{i}")).await {
                    pending += info.num_pending;
                }
            }
            pending
        }
    }
}

async fn wait_for_stream(name: &str) {
    let client = async_nats::connect(NATS_URL)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while js.get_stream(name).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process A did not create stream {name} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete_rabbitmq(name: &str) {
    let Ok(conn) =
        lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default()).await
    else {
        eprintln!("cannot connect to RabbitMQ to delete the queues of {name}");
        return;
    };
    let Ok(channel) = conn.create_channel().await else {
        return;
    };
    for i in 0..PARTITIONS {
        let queue = format!("{name}.{i}");
        if let Err(e) = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
        {
            eprintln!("cannot delete queue {queue}: {e}");
        }
    }
    if let Err(e) = channel
        .exchange_delete(name.into(), Default::default())
        .await
    {
        eprintln!("cannot delete exchange {name}: {e}");
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Deletes the stream and the lease buckets the Bs made next to it.
async fn delete_stream(name: &str) {
    let Ok(client) = async_nats::connect(NATS_URL).await else {
        eprintln!("cannot connect to NATS to delete stream {name}");
        return;
    };
    let js = async_nats::jetstream::new(client);
    for stream in [
        name.to_string(),
        format!("KV_caudal_owners_{name}_deliver"),
        format!("KV_caudal_members_{name}_deliver"),
    ] {
        if let Err(e) = js.delete_stream(&stream).await {
            eprintln!("cannot delete stream {stream}: {e}");
        }
    }
}

/// Where a change sits in its source: a snapshot read comes before every
/// streamed change; streamed changes are in commit order (commit LSN, then
/// index in the transaction).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    Read { entity: String },
    Stream { lsn: u64, index: u64 },
}

impl Origin {
    fn of(change: &Value) -> Self {
        if change["op"] == "read" {
            return Self::Read {
                entity: entity(change),
            };
        }
        let text = change["lsn"]
            .as_str()
            .expect("a streamed change has an lsn");
        let (hi, lo) = text.split_once('/').expect("an LSN is HI/LO");
        let lsn = (u64::from_str_radix(hi, 16).expect("hex") << 32)
            | u64::from_str_radix(lo, 16).expect("hex");
        Self::Stream {
            lsn,
            index: change["index"]
                .as_u64()
                .expect("a streamed change has an index"),
        }
    }

    /// Sorting key: reads first, then commit order.
    fn order(&self) -> (u8, u64, u64) {
        match self {
            Self::Read { .. } => (0, 0, 0),
            Self::Stream { lsn, index } => (1, *lsn, *index),
        }
    }
}

/// `table[key values]`, the record key caudal gives a CDC change.
fn entity(change: &Value) -> String {
    let key = change["key"].as_object().expect("a key object");
    let values: Vec<&Value> = key.values().collect();
    format!(
        "{}{}",
        change["table"].as_str().expect("a table"),
        json!(values)
    )
}

/// What the partner accepted.
struct Delivered {
    /// The first arrival of every event id, in arrival order: (id, record
    /// key, change).
    first: Vec<(String, String, Value)>,
    /// Arrivals in all, duplicates included.
    total: usize,
}

impl Delivered {
    /// Reads the accepted requests; an event id seen again must carry the
    /// same change and key.
    fn of(receiver: &Receiver) -> Self {
        let mut seen: HashMap<String, (String, Value)> = HashMap::new();
        let mut first = Vec::new();
        let mut total = 0;
        for event in receiver.accepted_records_at(EVENTS) {
            total += 1;
            let id = event["id"].as_str().expect("an event id").to_string();
            let key = event["key"]
                .as_str()
                .unwrap_or_else(|| panic!("an event without a key: {event}"))
                .to_string();
            let change = event["data"].clone();
            match seen.get(&id) {
                Some((k, c)) => assert!(
                    k == &key && c == &change,
                    "event id {id} arrived with two different changes: {c} (key {k}) and \
                     {change} (key {key})"
                ),
                None => {
                    seen.insert(id.clone(), (key.clone(), change.clone()));
                    first.push((id, key, change));
                }
            }
        }
        Self { first, total }
    }

    /// The first arrivals' changes sorted by their place in the source.
    fn in_source_order(&self) -> Vec<Value> {
        let mut changes: Vec<&Value> = self.first.iter().map(|(_, _, c)| c).collect();
        changes.sort_by_cached_key(|c| Origin::of(c).order());
        changes.into_iter().cloned().collect()
    }

    /// The first arrivals' changes in arrival order.
    fn in_arrival_order(&self) -> Vec<Value> {
        self.first.iter().map(|(_, _, c)| c.clone()).collect()
    }

    /// No change arrived under two event ids, and every record key is its
    /// change's row.
    fn assert_one_id_per_change(&self) {
        let mut ids: BTreeMap<Origin, &str> = BTreeMap::new();
        for (id, key, change) in &self.first {
            assert_eq!(
                key,
                &entity(change),
                "the record key is the row's: {change}"
            );
            if let Some(other) = ids.insert(Origin::of(change), id) {
                panic!("a change arrived under two event ids, {other} and {id}: {change}");
            }
        }
    }

    /// The first arrivals of each row's changes are in commit order.
    fn assert_per_key_order(&self) {
        let mut last: HashMap<&str, (&Value, (u8, u64, u64))> = HashMap::new();
        for (_, key, change) in &self.first {
            let at = Origin::of(change).order();
            if let Some((before, was)) = last.get(key.as_str()) {
                assert!(
                    *was < at,
                    "row {key}: {change} arrived after the later change {before}"
                );
            }
            last.insert(key, (change, at));
        }
    }
}

/// Writes from `writers` connections until `stop`: single-row updates,
/// upserts and deletes, and multi-row updates (several changes in one
/// transaction). Returns how many rows the statements changed in all:
/// one change each.
fn workload(
    url: String,
    writers: usize,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers {
            let url = url.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("a writer connection");
                let mut changed = 0u64;
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let pick = rand::rng().random_range(0..100);
                    let id = rand::rng().random_range(1..=ID_RANGE);
                    let sql = match pick {
                        0..=39 => format!(
                            "UPDATE accounts SET balance = balance + 1, note = md5(random()::text) \
                             WHERE id = {id}"
                        ),
                        40..=59 => format!(
                            "INSERT INTO accounts VALUES ({id}, 'new {id}', 0, NULL) \
                             ON CONFLICT (id) DO UPDATE SET balance = 0, owner = 'again {id}'"
                        ),
                        60..=69 => format!("DELETE FROM accounts WHERE id = {id}"),
                        _ => format!(
                            "UPDATE accounts SET balance = balance * 2 + 1 \
                             WHERE id BETWEEN {id} AND {}",
                            id + 4
                        ),
                    };
                    match sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&pool)
                        .await
                    {
                        Ok(done) => changed += done.rows_affected(),
                        // Two multi-row updates may deadlock; the one
                        // rolled back changed nothing.
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {}
                        Err(e) => panic!("{sql}: {e}"),
                    }
                }
                pool.close().await;
                changed
            });
        }
        let mut total = 0;
        while let Some(n) = tasks.join_next().await {
            total += n.expect("a writer task");
        }
        total
    })
}

/// The scenario both tests share: start everything, wait for the
/// snapshot, then write while killing A, each B in turn, and A together
/// with a B, restarting each. Then every B goes down while the table is
/// written, so the broker holds a backlog in every partition; one B comes
/// back to a partner that takes one request and then fails, and is killed
/// with hundreds of messages read and not delivered. Waits for the copy.
///
/// With single-active-consumer queues, the active B is the one registered
/// longest: starting B1, B2, B3 and restarting each killed one at once
/// makes the B after the last one killed the active one, so the kills
/// below always hit the active consumer.
async fn kill_everyone_while_writing(split: &mut Split) -> (Delivered, u64) {
    split.start().await;
    let snapshot = usize::try_from(INITIAL_ROWS).expect("small");
    split.wait_for_distinct(snapshot).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let writers = workload(split.db.url().to_string(), 2, stop.clone());

    split.progress().await;
    split.a.kill().await;
    split.a.start();
    for i in 0..split.b.len() {
        split.progress().await;
        split.b[i].kill().await;
        split.b[i].start();
    }
    split.progress().await;
    split.a.kill().await;
    split.b[0].kill().await;
    split.a.start();
    split.b[0].start();
    split.progress().await;

    // Every B down: a backlog builds up in every partition.
    for b in &mut split.b {
        b.kill().await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let waiting = backlog(split.broker, &split.name).await;
        if waiting >= 400 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backlog built up within {PATIENCE:?} ({waiting} messages wait); logs:\n{}",
            split.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // B1 comes back to a partner that takes one batch, then fails; once
    // B1 has retried a few times, it is killed.
    split.receiver.set_status(503);
    split.receiver.queue_replies([Reply::status(200)]);
    let before = split.receiver.request_count();
    split.b[0].start();
    let retried = split.receiver.wait_for_requests(before + 6, PATIENCE).await;
    assert!(retried, "B1 did not deliver; logs:\n{}", split.logs());
    split.b[0].kill().await;
    split.receiver.set_status(200);
    for b in &mut split.b {
        b.start();
        b.wait_for_log("broker consumer connected").await;
    }
    split.progress().await;

    stop.cancel();
    let changed = writers.await.expect("the workload");
    let expected = snapshot + usize::try_from(changed).expect("small");
    let delivered = split.wait_for_copy(expected).await;
    (delivered, changed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_through_rabbitmq_partition_queues_to_http_survives_sigkill_of_every_process() {
    let started = std::time::Instant::now();
    let mut split = Split::new(Broker::Rabbitmq, 3).await;
    let (delivered, changed) = kill_everyone_while_writing(&mut split).await;

    delivered.assert_one_id_per_change();
    let expected =
        usize::try_from(INITIAL_ROWS).expect("small") + usize::try_from(changed).expect("small");
    assert_eq!(
        delivered.first.len(),
        expected,
        "distinct changes: the snapshot's {INITIAL_ROWS} rows and {changed} rows changed"
    );
    delivered.assert_per_key_order();
    // In their first arrival order, the changes reproduce the table.
    let want = split.source_rows().await;
    let replay = apply(&delivered.in_arrival_order());
    assert!(
        replay == want,
        "applied as they arrived, the changes differ from the table: {}",
        difference(&want, &replay)
    );
    eprintln!(
        "rabbitmq split: {} changes, {} arrivals ({} duplicates) in {:?}",
        delivered.first.len(),
        delivered.total,
        delivered.total - delivered.first.len(),
        started.elapsed()
    );
    split.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_through_jetstream_to_http_survives_sigkill_of_every_process() {
    let started = std::time::Instant::now();
    let mut split = Split::new(Broker::Nats, 3).await;
    let (delivered, changed) = kill_everyone_while_writing(&mut split).await;

    delivered.assert_one_id_per_change();
    let expected =
        usize::try_from(INITIAL_ROWS).expect("small") + usize::try_from(changed).expect("small");
    assert_eq!(
        delivered.first.len(),
        expected,
        "distinct changes: the snapshot's {INITIAL_ROWS} rows and {changed} rows changed"
    );
    delivered.assert_per_key_order();
    let want = split.source_rows().await;
    let replay = apply(&delivered.in_arrival_order());
    assert!(
        replay == want,
        "applied as they arrived, the changes differ from the table: {}",
        difference(&want, &replay)
    );
    eprintln!(
        "jetstream split: {} changes, {} arrivals ({} duplicates) in {:?}",
        delivered.first.len(),
        delivered.total,
        delivered.total - delivered.first.len(),
        started.elapsed()
    );
    split.stop().await;
}
