//! Several `caudal run` processes (nodes) sharing one PostgreSQL state
//! store under `[cluster]`: every node is the real binary with its own
//! directory (its own buffers), all reading one configuration.
//!
//! What must hold:
//! - **Shared out.** Twelve pipelines over three nodes: four each; two
//!   nodes take a dead one's share, and hand it back when it returns.
//! - **Failover.** SIGKILL the node running the CDC pipeline while rows
//!   are written: another node takes it and every change arrives; a change
//!   that arrives twice carries the same event id and the same data; the
//!   dead node's cursor pipelines move too and deliver what comes later.
//! - **One reader per slot.** Sampled on the server all along: the source
//!   database never has two walsenders (two nodes reading the slot).
//! - **Fencing.** A node paused (SIGSTOP) while its pipeline delivers loses
//!   the pipeline; when it comes back its late checkpoint write is refused,
//!   and the checkpoint the new owner saved never moves back.
//! - **Partition.** A node cut off from the state store (its connections
//!   through a proxy closed, new ones refused) stops its pipeline before
//!   its lease runs out; the other node takes it; when the network is back
//!   the cut-off node does not take it back nor move its checkpoint back.
//! - **Drain.** `caudal node drain` moves a node's pipelines to the others
//!   and the node exits 0, with no run failed.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use caudal_testkit::{Proxy, Receiver, Reply, TestDb, pg_database};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::cdc::{check_logical, drop_slot};
use support::{Daemon, Output, PATIENCE, command, spawn_daemon};

/// Rows of `items` before the nodes start.
const ITEMS: i64 = 300;

/// One `caudal run`, restarted at will.
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    starts: u32,
    daemon: Option<Daemon>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} is running already", self.name);
        self.starts += 1;
        self.daemon = Some(spawn_daemon(&self.config, &self.dir, self.starts));
    }

    fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let log = std::fs::read_to_string(self.dir.join(format!("daemon-{n}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out += &format!("--- {} start {n}\n{}\n", self.name, tail.join("\n"));
        }
        out
    }
}

/// One test's cluster: the state store's database, the source database,
/// the receiver, and the nodes.
struct Cluster {
    state: Option<TestDb>,
    src: Option<TestDb>,
    receiver: Receiver,
    slot: String,
    _root: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    /// `nodes` nodes of a configuration with `sql` cursor pipelines over
    /// `items` and, with `cdc`, one CDC pipeline over `accounts`.
    async fn new(nodes: usize, sql: usize, cdc: bool, lease: &str) -> Self {
        let state = pg_database().await;
        let src = pg_database().await;
        let slot = format!("caudal_cl_{}", &src.name()[src.name().len() - 16..]);
        let receiver = Receiver::start().await;
        let root = tempfile::tempdir().expect("a temporary directory");
        exec(
            &src,
            &format!(
                "CREATE TABLE items (id bigint PRIMARY KEY, note text NOT NULL);
                 INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, {ITEMS}) g;
                 CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);"
            ),
        )
        .await;
        if cdc {
            check_logical(&src).await;
        }
        let config = config(&state, &src, &receiver, &slot, sql, cdc, lease);
        let nodes = (1..=nodes)
            .map(|i| {
                let dir = root.path().join(format!("n{i}"));
                std::fs::create_dir_all(&dir).expect("a node directory");
                let path = dir.join("caudal.toml");
                std::fs::write(&path, &config).expect("write the config");
                Node {
                    name: format!("n{i}"),
                    dir,
                    config: path,
                    starts: 0,
                    daemon: None,
                }
            })
            .collect();
        Self {
            state: Some(state),
            src: Some(src),
            receiver,
            slot,
            _root: root,
            nodes,
        }
    }

    fn src(&self) -> &TestDb {
        self.src.as_ref().expect("the source database")
    }

    fn state(&self) -> &TestDb {
        self.state.as_ref().expect("the state database")
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(Node::logs).collect()
    }

    /// `caudal node list --json`, through the last node's configuration
    /// (the one that reaches the store directly).
    async fn node_list(&self) -> Vec<Value> {
        let n = self.nodes.last().expect("a node");
        let out = Output::of(command(&n.config, &n.dir, &["node", "list", "--json"])).await;
        assert_eq!(out.code, Some(0), "node list: {out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    /// Pipelines owned by each node id (nodes owning none left out).
    async fn owners(&self) -> BTreeMap<String, Vec<String>> {
        self.node_list()
            .await
            .into_iter()
            .filter_map(|n| {
                let pipelines: Vec<String> = n["pipelines"]
                    .as_array()?
                    .iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect();
                let id = n["id"].as_str()?.to_string();
                (!pipelines.is_empty()).then_some((id, pipelines))
            })
            .collect()
    }

    /// Waits until `live` nodes own `total` pipelines between them, each
    /// its fair share.
    async fn wait_until_shared(&self, live: usize, total: usize) -> BTreeMap<String, Vec<String>> {
        let share = total.div_ceil(live);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let owners = self.owners().await;
            let owned: usize = owners.values().map(Vec::len).sum();
            if owners.len() == live.min(total)
                && owned == total
                && owners.values().all(|p| p.len() <= share)
            {
                return owners;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{total} pipelines not shared by {live} nodes within {PATIENCE:?}: {owners:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The index of the node owning `pipeline`.
    async fn owner_of(&self, pipeline: &str) -> Option<usize> {
        let list = self.node_list().await;
        let node = list.iter().find(|n| {
            n["pipelines"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == pipeline))
        })?;
        let pid = node["pid"].as_u64()?;
        self.nodes
            .iter()
            .position(|n| n.pid().map(u64::from) == Some(pid))
    }

    /// Distinct `items` ids accepted at `/p{i}`.
    fn items_at(&self, i: usize) -> BTreeSet<i64> {
        let path = format!("/p{i}");
        self.receiver
            .requests()
            .iter()
            .filter(|r| r.accepted() && r.path == path)
            .flat_map(|r| r.records_at("/records"))
            .filter_map(|r| r["id"].as_i64())
            .collect()
    }

    /// Waits until every cursor pipeline delivered items 1..=`upto`.
    async fn wait_for_items(&self, sql: usize, upto: i64) {
        let want: BTreeSet<i64> = (1..=upto).collect();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        for i in 1..=sql {
            while self.items_at(i) != want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pipeline p{i} delivered {} of {upto} items within {PATIENCE:?}\n{}",
                    self.items_at(i).len(),
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The CDC changes accepted, by event id; an id seen twice must carry
    /// the same change. Returns (id → account id, arrivals in all).
    fn changes(&self) -> (HashMap<String, i64>, usize) {
        let mut seen: HashMap<String, (i64, Value)> = HashMap::new();
        let mut total = 0;
        for r in self.receiver.requests() {
            if !r.accepted() || r.path != "/cdc" {
                continue;
            }
            for e in r.records_at("/changes") {
                total += 1;
                let id = e["id"].as_str().expect("an event id").to_string();
                let account = e["data"]["after"]["id"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("a change with an account id: {e}"));
                if let Some((a, data)) = seen.get(&id) {
                    assert!(
                        *a == account && data == &e["data"],
                        "event id {id} arrived with two changes: {data} and {}",
                        e["data"]
                    );
                } else {
                    seen.insert(id, (account, e["data"].clone()));
                }
            }
        }
        (seen.into_iter().map(|(k, (a, _))| (k, a)).collect(), total)
    }

    fn accounts_arrived(&self) -> BTreeSet<i64> {
        self.changes().0.into_values().collect()
    }

    async fn stop_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(d) = n.daemon.take() {
                let (status, log) = d.stop(Signal::SIGTERM).await;
                assert!(status.success(), "{} exited with {status}:\n{log}", n.name);
            }
        }
    }

    async fn cleanup(mut self) {
        for n in &mut self.nodes {
            drop(n.daemon.take());
        }
        if let Some(src) = self.src.take() {
            drop_slot(src.url(), &self.slot).await;
            src.cleanup().await;
        }
        if let Some(state) = self.state.take() {
            state.cleanup().await;
        }
    }
}

fn config(
    state: &TestDb,
    src: &TestDb,
    receiver: &Receiver,
    slot: &str,
    sql: usize,
    cdc: bool,
    lease: &str,
) -> String {
    let mut out = format!(
        r#"[state]
url = "{state}"
buffer_dir = "buffer"

[cluster]
lease = "{lease}"

[sources.items]
type = "postgres"
url = "{src}"
table = "items"
cursor = ["id"]
"#,
        state = state.url(),
        src = src.url(),
    );
    if cdc {
        out += &format!(
            r#"
[sources.pg]
type = "postgres"
url = "{src}"
mode = "cdc"
tables = ["accounts"]
slot = "{slot}"
publication = "{slot}"
heartbeat = "1s"

[sinks.cdc]
type = "http"
url = "{url}"
batch = {{ max_records = 50, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}
body = '{{"changes": {{{{ events | tojson }}}}}}'

[pipelines.cdc]
source = "pg"
sink = "cdc"
ack = "delivered"
"#,
            src = src.url(),
            url = receiver.url("/cdc"),
        );
    }
    for i in 1..=sql {
        out += &format!(
            r#"
[sinks.s{i}]
type = "http"
url = "{url}"
batch = {{ max_records = 40, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}
body = '{{"records": {{{{ records | tojson }}}}}}'

[pipelines.p{i}]
source = "items"
sink = "s{i}"
schedule = {{ every = "1s" }}
key = "id"
ack = "delivered"
"#,
            url = receiver.url(&format!("/p{i}")),
        );
    }
    out
}

async fn exec(db: &TestDb, sql: &str) {
    let pool = db.pg_pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
}

/// Inserts accounts 1, 2, ... in small transactions until `stop`; the last
/// id written is in `last`.
fn writer(
    pool: sqlx::PgPool,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = 1i64;
        while !stop.load(Ordering::Acquire) {
            let ids: Vec<i64> = (next..next + 5).collect();
            sqlx::query("INSERT INTO accounts SELECT g, g * 10 FROM unnest($1::bigint[]) g")
                .bind(&ids)
                .execute(&pool)
                .await
                .expect("insert accounts");
            next += 5;
            last.store(next - 1, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        pool.close().await;
    })
}

/// Samples, until `stop`, how many walsenders serve the source database
/// (each one a node reading the slot); returns the most seen at once.
fn sample_walsenders(
    pool: sqlx::PgPool,
    db: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(i64, usize)> {
    tokio::spawn(async move {
        let (mut most, mut samples) = (0, 0);
        while !stop.load(Ordering::Acquire) {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'walsender' AND datname = $1",
            )
            .bind(&db)
            .fetch_one(&pool)
            .await
            .expect("count walsenders");
            most = most.max(n);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        pool.close().await;
        (most, samples)
    })
}

/// Three nodes share twelve pipelines; the node running the CDC pipeline
/// is killed under load; another takes it and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_hands_its_cdc_and_cursor_pipelines_to_the_others() {
    const SQL: usize = 11;
    let mut c = Cluster::new(3, SQL, true, "6s").await;
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_until_shared(3, SQL + 1).await;
    c.wait_for_items(SQL, ITEMS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let walsenders = sample_walsenders(
        c.src().pg_pool().await,
        c.src().name().to_string(),
        stop.clone(),
    );
    let writing = writer(c.src().pg_pool().await, stop.clone(), last.clone());
    // Changes flow through the first owner.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while c.accounts_arrived().len() < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "CDC changes did not arrive within {PATIENCE:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let victim = c
        .owner_of("cdc")
        .await
        .expect("a node owns the CDC pipeline");
    let victim_pid = c.nodes[victim].pid().expect("a pid");
    let arrived_before = c.receiver.request_count();
    let killed_at = tokio::time::Instant::now();
    c.nodes[victim]
        .daemon
        .take()
        .expect("running")
        .stop(Signal::SIGKILL)
        .await;

    // Another node owns it, and changes written after the kill arrive.
    let written_at_kill = last.load(Ordering::Acquire);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new_owner = loop {
        let arrived = c.accounts_arrived();
        if arrived.range(written_at_kill + 1..).next().is_some()
            && let Some(owner) = c.owner_of("cdc").await
        {
            break owner;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no change written after the kill arrived within {PATIENCE:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failover = killed_at.elapsed();
    assert_ne!(new_owner, victim);
    assert!(c.receiver.request_count() > arrived_before);
    // More items: the dead node's cursor pipelines deliver them too.
    exec(
        c.src(),
        &format!(
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series({}, {}) g",
            ITEMS + 1,
            ITEMS + 100
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    writing.await.expect("the writer");
    let written = last.load(Ordering::Acquire);

    let want: BTreeSet<i64> = (1..=written).collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while c.accounts_arrived() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {written} changes arrived within {PATIENCE:?}; missing {:?}\n{}",
            c.accounts_arrived().len(),
            want.difference(&c.accounts_arrived())
                .take(20)
                .collect::<Vec<_>>(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.wait_for_items(SQL, ITEMS + 100).await;
    let owners = c.wait_until_shared(2, SQL + 1).await;
    assert!(
        !owners
            .keys()
            .any(|id| id.contains(&format!(":{victim_pid}:"))),
        "the dead node still owns pipelines: {owners:?}"
    );
    let (most, samples) = {
        // The sampler stops with the writer.
        walsenders.await.expect("the sampler")
    };
    assert_eq!(
        most, 1,
        "the slot's database had {most} walsenders at once ({samples} samples)"
    );
    // The killed node comes back: the others hand it its share.
    c.nodes[victim].start();
    c.wait_until_shared(3, SQL + 1).await;
    let (ids, total) = c.changes();
    eprintln!(
        "cluster: CDC moved from n{} to n{} {:.1}s after SIGKILL; {} changes, {} arrivals \
         ({} repeated under the same event id); {samples} walsender samples, never 2",
        victim + 1,
        new_owner + 1,
        failover.as_secs_f64(),
        ids.len(),
        total,
        total - ids.len()
    );
    c.stop_all().await;
    c.cleanup().await;
}

/// Inserts items from `from` on, five every 50 ms, until `stop`.
fn item_writer(
    pool: sqlx::PgPool,
    from: i64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut next = from;
        while !stop.load(Ordering::Acquire) {
            sqlx::query("INSERT INTO items SELECT g, 'item ' || g FROM generate_series($1, $2) g")
                .bind(next)
                .bind(next + 4)
                .execute(&pool)
                .await
                .expect("insert items");
            next += 5;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await;
        next - 1
    })
}

/// The cursor value of pipeline `p`'s checkpoint, if it has one.
async fn cursor_checkpoint(pool: &sqlx::PgPool, p: &str) -> Option<i64> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT position::text FROM checkpoints WHERE pipeline = $1")
            .bind(p)
            .fetch_optional(pool)
            .await
            .expect("read the checkpoint");
    let position: Value = serde_json::from_str(&row?.0).expect("a JSON position");
    let position = match position {
        // Stored as a JSON string on some paths.
        Value::String(s) => serde_json::from_str(&s).expect("a JSON position"),
        v => v,
    };
    // A cursor value is tagged by its type: {"type": "int", "value": 42}.
    position["values"][0]["value"].as_i64()
}

/// Samples pipeline `p`'s cursor checkpoint every 20 ms until `stop`;
/// returns every time it was seen lower than before: (highest, seen).
fn sample_checkpoints(
    state: sqlx::PgPool,
    p: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(i64, i64)>> {
    tokio::spawn(async move {
        let (mut high, mut backwards) = (0i64, Vec::new());
        while !stop.load(Ordering::Acquire) {
            if let Some(at) = cursor_checkpoint(&state, p).await {
                if at < high {
                    backwards.push((high, at));
                }
                high = high.max(at);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backwards
    })
}

/// A node paused while it delivers loses its pipeline to the other; back,
/// it cannot move the checkpoint the new owner saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_node_loses_its_pipeline_and_cannot_move_the_checkpoint_back() {
    let mut c = Cluster::new(2, 1, false, "3s").await;
    // Slow answers: a batch is nearly always in flight.
    c.receiver
        .set_reply(Reply::status(200).delay(Duration::from_millis(300)));
    for n in &mut c.nodes {
        n.start();
    }
    c.wait_until_shared(2, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = item_writer(c.src().pg_pool().await, ITEMS + 1, stop.clone());
    let state = c.state().pg_pool().await;
    // The checkpoint, sampled all along: it must never move back.
    let sampler = sample_checkpoints(state.clone(), "p1", stop.clone());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cursor_checkpoint(&state, "p1").await.unwrap_or(0) < ITEMS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "p1's checkpoint did not reach {ITEMS} within {PATIENCE:?}: {:?}\n{}",
            sqlx::query_as::<_, (String,)>("SELECT position::text FROM checkpoints")
                .fetch_all(&state)
                .await,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = c.owner_of("p1").await.expect("an owner");
    let b = 1 - a;
    c.nodes[a]
        .daemon
        .as_ref()
        .expect("running")
        .signal(Signal::SIGSTOP);
    let paused_at = cursor_checkpoint(&state, "p1").await.expect("a checkpoint");
    // The other node takes it and moves on.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let at = cursor_checkpoint(&state, "p1").await.unwrap_or(0);
        if c.owner_of("p1").await == Some(b) && at > paused_at + 50 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n{} did not take p1 and move on within {PATIENCE:?}\n{}",
            b + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[a]
        .daemon
        .as_ref()
        .expect("running")
        .signal(Signal::SIGCONT);
    // Back: it finds it lost the pipeline (by its lease, or by the fence
    // refusing its late checkpoint write) and stops it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let log = loop {
        let log = c.nodes[a].logs();
        if log.contains("lost the pipeline") || log.contains("no longer owns") {
            break log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n{} did not notice it lost p1:\n{}",
            a + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Release);
    let written = writing.await.expect("the writer");
    let backwards = sampler.await.expect("the sampler");
    assert!(
        backwards.is_empty(),
        "the checkpoint moved back: {backwards:?}\n{}",
        c.logs()
    );
    assert_eq!(c.owner_of("p1").await, Some(b));
    c.receiver.set_reply(Reply::status(200));
    c.wait_for_items(1, written).await;
    eprintln!(
        "fencing: n{} paused at checkpoint {paused_at}, n{} took over; late write refused: {}",
        a + 1,
        b + 1,
        log.contains("no longer owns")
    );
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}

/// `caudal node drain` moves a node's pipelines to the other, the node
/// exits 0, and no run fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_hands_its_pipelines_over_and_exits() {
    let mut c = Cluster::new(2, 4, false, "3s").await;
    for n in &mut c.nodes {
        n.start();
    }
    let owners = c.wait_until_shared(2, 4).await;
    c.wait_for_items(4, ITEMS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = item_writer(c.src().pg_pool().await, ITEMS + 1, stop.clone());
    let pid = c.nodes[0].pid().expect("a pid");
    let id = owners
        .keys()
        .find(|id| id.contains(&format!(":{pid}:")))
        .expect("n1 owns pipelines")
        .clone();
    let (config, dir) = (c.nodes[1].config.clone(), c.nodes[1].dir.clone());
    let out = Output::of(command(&config, &dir, &["node", "drain", &id])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("draining"), "{out:?}");
    let (status, log) = c.nodes[0].daemon.take().expect("running").wait().await;
    assert!(
        status.success(),
        "the drained node exited with {status}:\n{log}"
    );
    assert!(log.contains("drained"), "{log}");
    let owners = c.wait_until_shared(1, 4).await;
    assert!(!owners.contains_key(&id), "{owners:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let written = writing.await.expect("the writer");
    c.wait_for_items(4, written).await;
    let state = c.state().pg_pool().await;
    let failed: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT pipeline, error FROM runs WHERE outcome = 'failed'")
            .fetch_all(&state)
            .await
            .expect("read the runs");
    state.close().await;
    assert!(failed.is_empty(), "failed runs: {failed:?}\n{}", c.logs());
    let list = c.node_list().await;
    let drained = list
        .iter()
        .find(|n| n["id"] == id.as_str())
        .expect("listed");
    assert_eq!(drained["state"], "stopped", "{list:?}");
    // Asking again is refused: it is not active.
    let again = Output::of(command(&config, &dir, &["node", "drain", &id])).await;
    assert_ne!(again.code, Some(0), "{again:?}");
    c.stop_all().await;
    c.cleanup().await;
}

/// A node cut off from the state store stops its pipeline before its lease
/// runs out; the other node takes it over; once the network is back, the
/// checkpoint never moved back and the pipeline stays with the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_store_stops_and_its_pipeline_moves() {
    let mut c = Cluster::new(2, 1, false, "3s").await;
    let state_url = c.state().url().to_string();
    let upstream = state_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the state URL")
        .to_string();
    let proxy = Proxy::start(&upstream).await;
    // n1 reaches the store through the proxy, n2 directly.
    let config = std::fs::read_to_string(&c.nodes[0].config).expect("n1's config");
    let proxied = state_url.replace(&upstream, &proxy.addr().to_string());
    std::fs::write(&c.nodes[0].config, config.replace(&state_url, &proxied))
        .expect("write n1's config");
    c.receiver
        .set_reply(Reply::status(200).delay(Duration::from_millis(100)));
    // n1 first, so that it owns the pipeline.
    c.nodes[0].start();
    c.wait_until_shared(1, 1).await;
    c.nodes[1].start();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while c
        .node_list()
        .await
        .iter()
        .filter(|n| n["state"] == "active")
        .count()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.owner_of("p1").await, Some(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = item_writer(c.src().pg_pool().await, ITEMS + 1, stop.clone());
    let state = c.state().pg_pool().await;
    let sampler = sample_checkpoints(state.clone(), "p1", stop.clone());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cursor_checkpoint(&state, "p1").await.unwrap_or(0) < ITEMS {
        assert!(tokio::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The partition: n1's connections to the store close, new ones fail.
    proxy.pause();
    proxy.cut();
    let cut_at = cursor_checkpoint(&state, "p1").await.expect("a checkpoint");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let at = cursor_checkpoint(&state, "p1").await.unwrap_or(0);
        if c.owner_of("p1").await == Some(1) && at > cut_at + 50 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 did not take p1 and move on within {PATIENCE:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = c.nodes[0].logs();
    assert!(
        log.contains("could not renew the pipeline's lease in time"),
        "n1 did not stop p1 on its own:\n{log}"
    );
    // The network is back.
    proxy.resume();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Release);
    let written = writing.await.expect("the writer");
    let backwards = sampler.await.expect("the sampler");
    assert!(
        backwards.is_empty(),
        "the checkpoint moved back: {backwards:?}\n{}",
        c.logs()
    );
    assert_eq!(c.owner_of("p1").await, Some(1), "{}", c.logs());
    c.receiver.set_reply(Reply::status(200));
    c.wait_for_items(1, written).await;
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}

/// `caudal ARGS --json` through `config`, one JSON value per line.
async fn json_lines(config: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let out = Output::of(command(config, dir, args)).await;
    assert_eq!(out.code, Some(0), "caudal {args:?}: {out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A fan-out of 1,000 tasks while three nodes run, the node executing the
/// workflows killed again and again: another node takes the executor over,
/// every task instance succeeds exactly once (the store and the tasks'
/// ledger agree), and the pool of 4 never has more than 4 attempts
/// running at once, as the tasks observe it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflow_tasks_go_on_with_another_node_and_succeed_once_within_the_pool() {
    const ITEMS: usize = 1000;
    const SLOTS: usize = 4;
    let mut c = Cluster::new(3, 0, false, "3s").await;
    let root = c.nodes[0].dir.parent().expect("the root").to_path_buf();
    let ledger = root.join("ledger.txt");
    let spans = root.join("spans.txt");
    let workflow = format!(
        r#"
[pools.workers]
slots = {SLOTS}

[workflows.fan.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 {ITEMS} > \"$CAUDAL_ITEMS\""]
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 1000 }}

[workflows.fan.tasks.work]
type = "command"
depends_on = ["list"]
for_each = "{{{{ tasks.list.items }}}}"
pool = "workers"
run = ["sh", "-c", "echo \"start $1 $CAUDAL_ATTEMPT $(date +%s%N)\" >> \"$3\"; sleep 0.02; echo \"end $1 $CAUDAL_ATTEMPT $(date +%s%N)\" >> \"$3\"; echo \"$1 $CAUDAL_ATTEMPT\" >> \"$2\"", "sh", "{{{{ item }}}}", "{ledger}", "{spans}"]
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 1000 }}
"#,
        ledger = ledger.display(),
        spans = spans.display(),
    );
    for n in &c.nodes {
        let config = std::fs::read_to_string(&n.config).expect("the config");
        std::fs::write(&n.config, format!("{config}{workflow}")).expect("write the config");
    }
    let (config, dir) = (c.nodes[2].config.clone(), c.nodes[2].dir.clone());
    let out = Output::of(command(&config, &dir, &["workflow", "run", "fan"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for n in &mut c.nodes {
        n.start();
    }
    let state = c.state().pg_pool().await;
    let executor = || async {
        let holder: Option<(String,)> = sqlx::query_as(
            "SELECT holder FROM leases WHERE name = 'workflows/executor' \
             AND expires_at > (SELECT now_us FROM clock)",
        )
        .fetch_optional(&state)
        .await
        .expect("read the executor lease");
        holder.map(|(h,)| h)
    };
    let run_state = || async {
        let info = json_lines(&config, &dir, &["workflow", "status", "1", "--json"]).await;
        info.first()
            .and_then(|i| i["state"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let done = std::fs::read_to_string(&ledger)
            .map(|l| l.lines().count())
            .unwrap_or(0);
        let ended = matches!(
            run_state().await.as_str(),
            "succeeded" | "failed" | "cancelled"
        );
        if ended {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not end ({done} of {ITEMS} done, {kills} kills)\n{}",
            c.logs()
        );
        // Kill the executor's node every 150 tasks, up to 4 times.
        if kills < 4
            && done >= 150 * (kills + 1)
            && let Some(holder) = executor().await
        {
            let pid: u32 = holder
                .split(':')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("a pid");
            if let Some(i) = c.nodes.iter().position(|n| n.pid() == Some(pid)) {
                c.nodes[i]
                    .daemon
                    .take()
                    .expect("running")
                    .stop(Signal::SIGKILL)
                    .await;
                kills += 1;
                c.nodes[i].start();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run_state().await, "succeeded", "{}", c.logs());
    assert_eq!(kills, 4, "the executor was not killed 4 times");

    // Every instance succeeded exactly once, with its ledger line.
    let attempts = json_lines(
        &config,
        &dir,
        &["workflow", "tasks", "1", "--attempts", "--json"],
    )
    .await;
    let mut succeeded: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut lost_ended: HashMap<(String, u64), i128> = HashMap::new();
    for a in attempts.iter().filter(|a| a["task"] == "work") {
        let index = a["map_index"].as_i64().expect("a map index");
        let attempt = a["attempt"].as_u64().expect("an attempt number");
        if a["state"] == "succeeded" {
            succeeded.entry(index).or_default().push(attempt);
        }
        if let Some(ended) = a["ended_at"].as_str() {
            let t: jiff::Timestamp = ended.parse().expect("a timestamp");
            lost_ended.insert(((index + 1).to_string(), attempt), t.as_nanosecond());
        }
    }
    assert_eq!(succeeded.len(), ITEMS);
    let lines: BTreeSet<(String, u64)> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (item, attempt) = l.split_once(' ')?;
            Some((item.to_string(), attempt.parse().ok()?))
        })
        .collect();
    for (index, ok) in &succeeded {
        assert_eq!(ok.len(), 1, "work[{index}] succeeded {} times", ok.len());
        let item = (index + 1).to_string();
        assert!(
            lines.contains(&(item.clone(), ok[0])),
            "no ledger line for item {item} attempt {}",
            ok[0]
        );
    }

    // The pool, as the tasks saw it: spans from each attempt's start to its
    // end (or, for one killed on the way, to when the store ended it).
    let mut starts: HashMap<(String, u64), i128> = HashMap::new();
    let mut ends: HashMap<(String, u64), i128> = HashMap::new();
    for line in std::fs::read_to_string(&spans).unwrap_or_default().lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [what, item, attempt, at] = parts[..] else {
            continue;
        };
        let (Ok(attempt), Ok(at)) = (attempt.parse::<u64>(), at.parse::<i128>()) else {
            continue;
        };
        let map = if what == "start" {
            &mut starts
        } else {
            &mut ends
        };
        map.insert((item.to_string(), attempt), at);
    }
    let mut edges: Vec<(i128, i32)> = Vec::new();
    for (key, start) in &starts {
        let end = ends
            .get(key)
            .or_else(|| lost_ended.get(key))
            .copied()
            .unwrap_or_else(|| panic!("attempt {key:?} has no end"));
        edges.push((*start, 1));
        edges.push((end, -1));
    }
    edges.sort();
    let (mut running, mut most) = (0, 0);
    for (_, d) in edges {
        running += d;
        most = most.max(running);
    }
    assert!(
        most <= SLOTS as i32,
        "{most} attempts of the pool of {SLOTS} ran at once"
    );
    eprintln!(
        "cluster workflow: {ITEMS} tasks, {kills} executor kills, {} attempts, at most {most} at once",
        starts.len()
    );
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}
