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
//!   through a proxy closed, new ones refused; or, in a network namespace,
//!   its veth pair taken down so packets are dropped) stops its pipeline
//!   before its lease runs out; the other node takes it with a greater
//!   fencing token; when the network is back the cut-off node does not
//!   take it back nor move its checkpoint back.
//! - **Drain.** `caudal node drain` moves a node's pipelines to the others
//!   and the node exits 0, with no run failed.
//! - **Workflow tasks on any node.** A fan-out of 1,000 runs on every node
//!   within a cluster-wide pool, each instance succeeding once through
//!   repeated kills; a paused node's attempt is rescued, retried elsewhere,
//!   and its late end refused.

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
use support::netns::Netns;
use support::{Daemon, Output, PATIENCE, command, spawn_daemon_in};

/// Rows of `items` before the nodes start.
const ITEMS: i64 = 300;

/// One `caudal run`, restarted at will.
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    starts: u32,
    daemon: Option<Daemon>,
    /// The network namespace it runs in, if not the host's.
    netns: Option<String>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} is running already", self.name);
        self.starts += 1;
        self.daemon = Some(spawn_daemon_in(
            &self.config,
            &self.dir,
            self.starts,
            self.netns.as_deref(),
        ));
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
                    netns: None,
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
    let upstream = host_port(&state_url);
    let proxy = Proxy::start(&upstream).await;
    // n1 reaches the store through the proxy, n2 directly.
    let config = std::fs::read_to_string(&c.nodes[0].config).expect("n1's config");
    let proxied = state_url.replace(&upstream, &proxy.addr().to_string());
    std::fs::write(&c.nodes[0].config, config.replace(&state_url, &proxied))
        .expect("write n1's config");
    partition_and_heal(
        &mut c,
        || {
            // n1's connections to the store close, new ones fail.
            proxy.pause();
            proxy.cut();
        },
        || proxy.resume(),
        Duration::from_secs(4),
    )
    .await;
    c.stop_all().await;
    c.cleanup().await;
}

/// The `host:port` of a `postgres://user@host:port/db` URL.
fn host_port(url: &str) -> String {
    url.split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the URL")
        .to_string()
}

/// The state of workflow run 1, as `caudal workflow status 1 --json` says.
async fn run_state(config: &std::path::Path, dir: &std::path::Path) -> String {
    let info = json_lines(config, dir, &["workflow", "status", "1", "--json"]).await;
    info.first()
        .and_then(|i| i["state"].as_str())
        .unwrap_or("")
        .to_string()
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

/// A fan-out of 1,000 tasks over three nodes, the attempts claimed by
/// every node, with a node killed again and again (the executor's, then
/// another one running attempts): another node takes the executor over,
/// the attempts of a killed node are rescued once it is silent for a lease
/// and run again elsewhere, every task instance succeeds exactly once (the
/// store and the tasks' ledger agree), and the cluster-wide pool of 4
/// never has more than 4 attempts running at once, as the tasks observe
/// it.
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
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let done = std::fs::read_to_string(&ledger)
            .map(|l| l.lines().count())
            .unwrap_or(0);
        let ended = matches!(
            run_state(&config, &dir).await.as_str(),
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
        // Every 150 tasks, up to 4 times, kill a node: the executor's, then
        // one of the others (it runs attempts too), and so on.
        if kills < 4
            && done >= 150 * (kills + 1)
            && let Some(holder) = executor().await
        {
            let pid: u32 = holder
                .split(':')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("a pid");
            let executor_node = c.nodes.iter().position(|n| n.pid() == Some(pid));
            let victim = if kills % 2 == 0 {
                executor_node
            } else {
                executor_node.map(|e| (e + 1) % c.nodes.len())
            };
            if let Some(i) = victim {
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
    assert_eq!(run_state(&config, &dir).await, "succeeded", "{}", c.logs());
    assert_eq!(kills, 4, "the nodes were not killed 4 times");

    // Every instance succeeded exactly once, with its ledger line.
    let attempts = json_lines(
        &config,
        &dir,
        &["workflow", "tasks", "1", "--attempts", "--json"],
    )
    .await;
    let mut succeeded: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut lost_ended: HashMap<(String, u64), i128> = HashMap::new();
    let mut ran_on: BTreeMap<String, usize> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a["task"] == "work") {
        *ran_on
            .entry(a["node"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
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
    // Attempts ran on the nodes, not only on the executor's: seven node
    // processes lived during the run (three, then one new per kill).
    assert!(
        ran_on.len() >= 4,
        "attempts ran on {} node processes only: {ran_on:?}",
        ran_on.len()
    );
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
        "cluster workflow: {ITEMS} tasks, {kills} node kills, {} attempts, at most {most} at once, on {ran_on:?}",
        starts.len()
    );
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}

/// A node paused (SIGSTOP) while it runs a workflow attempt: once it has
/// been silent for a lease the executor rescues the attempt (counted as
/// failed: `lost`, its node named) and another node runs the retry, which
/// succeeds. When the paused node comes back it finds the attempt rescued
/// and kills its process; its late outcome is refused (the attempt stays
/// `lost`), so the task succeeded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_nodes_attempt_is_rescued_retried_elsewhere_and_its_late_end_refused() {
    let mut c = Cluster::new(3, 0, false, "3s").await;
    let root = c.nodes[0].dir.parent().expect("the root").to_path_buf();
    let pids = root.join("pids.txt");
    let workflow = format!(
        r#"
[workflows.slow.tasks.once]
type = "command"
run = ["sh", "-c", "echo \"$CAUDAL_ATTEMPT $$\" >> \"$1\"; if [ \"$CAUDAL_ATTEMPT\" = 1 ]; then exec sleep 120; fi", "sh", "{pids}"]
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 3 }}
"#,
        pids = pids.display(),
    );
    for n in &c.nodes {
        let config = std::fs::read_to_string(&n.config).expect("the config");
        std::fs::write(&n.config, format!("{config}{workflow}")).expect("write the config");
    }
    for n in &mut c.nodes {
        n.start();
    }
    let (config, dir) = (c.nodes[0].config.clone(), c.nodes[0].dir.clone());
    let out = Output::of(command(&config, &dir, &["workflow", "run", "slow"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let state = c.state().pg_pool().await;
    // Attempt 1 runs on some node: pause that node.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (holder, first_pid) = loop {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT holder FROM workflow_attempts WHERE task = 'once' AND attempt = 1 \
             AND state = 'running'",
        )
        .fetch_optional(&state)
        .await
        .expect("read the attempt");
        let started = std::fs::read_to_string(&pids).unwrap_or_default();
        if let (Some((holder,)), Some(line)) = (row, started.lines().next())
            && c.nodes
                .iter()
                .any(|n| holder.contains(&format!(":{}:", n.pid().unwrap_or(0))))
        {
            let pid: i32 = line
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("a pid");
            break (holder, pid);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "attempt 1 did not start on a node\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let paused = c
        .nodes
        .iter()
        .position(|n| holder.contains(&format!(":{}:", n.pid().unwrap_or(0))))
        .expect("the node running attempt 1");
    c.nodes[paused]
        .daemon
        .as_ref()
        .expect("running")
        .signal(Signal::SIGSTOP);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while run_state(&config, &dir).await != "succeeded" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not succeed while n{} was paused\n{}",
            paused + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = json_lines(
        &config,
        &dir,
        &["workflow", "tasks", "1", "--attempts", "--json"],
    )
    .await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["state"], "lost", "{attempts:?}");
    assert_eq!(attempts[0]["node"], holder.as_str(), "{attempts:?}");
    let why = attempts[0]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&holder) && why.contains("went silent"),
        "{why}"
    );
    assert_eq!(attempts[1]["state"], "succeeded", "{attempts:?}");
    assert_ne!(
        attempts[1]["node"],
        holder.as_str(),
        "the retry ran elsewhere"
    );
    // The paused node's process still runs (a paused caudal stops no
    // process) until the node is back and finds its attempt rescued.
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(first_pid), None).is_ok(),
        "attempt 1's process ended while its node was paused"
    );
    c.nodes[paused]
        .daemon
        .as_ref()
        .expect("running")
        .signal(Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(first_pid), None).is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n{} did not stop the rescued attempt's process\n{}",
            paused + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its late outcome (cancelled) was refused: attempt 1 stays lost.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !c.nodes[paused]
        .logs()
        .contains("after it was rescued from this node")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n{} did not report its refused outcome\n{}",
            paused + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = json_lines(
        &config,
        &dir,
        &["workflow", "tasks", "1", "--attempts", "--json"],
    )
    .await;
    assert_eq!(again[0]["state"], "lost", "{again:?}");
    assert_eq!(again.len(), 2, "{again:?}");
    let remaining: (i64,) = sqlx::query_as("SELECT count(*) FROM workflow_dispatch")
        .fetch_one(&state)
        .await
        .expect("count dispatch rows");
    assert_eq!(
        remaining.0, 0,
        "every handed-out attempt was taken and forgotten"
    );
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}

/// Everything that talks to a site keeps to one node, the sites node:
/// two crawl pipelines over one site (concurrency 1) and a fan-out of
/// site-bound commands, over three nodes. The site never serves two
/// requests at once, the commands never overlap, and all of it runs on the
/// holder of the sites lease; when that node is killed, the crawls and the
/// remaining commands move to the next sites node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn site_limits_hold_across_the_cluster_on_the_sites_node() {
    const COMMANDS: usize = 30;
    let site = caudal_testkit::site::Site::start(caudal_testkit::site::SiteOptions {
        listings: 3,
        per_listing: 5,
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut c = Cluster::new(3, 0, false, "3s").await;
    let root = c.nodes[0].dir.parent().expect("the root").to_path_buf();
    let ledger = root.join("ledger.txt");
    let extra = format!(
        r#"
[crawl]
timeout = "3s"

[crawl.sites."{host}"]
concurrency = 1
delay = "10ms"
adaptive = false
robots = false

[sources.crawl_a]
type = "crawl"
start_urls = ["{a}"]
follow = ["a.detail"]

[[sources.crawl_a.pages]]
name = "detail"
match = "/property/\\d+$"
fields.title = "h1.title"

[sources.crawl_b]
type = "crawl"
start_urls = ["{b}"]
follow = ["a.detail"]

[[sources.crawl_b.pages]]
name = "detail"
match = "/property/\\d+$"
fields.title = "h1.title"

[sinks.pages]
type = "http"
url = "{pages}"
batch = {{ max_records = 20, max_wait = "50ms" }}

[pipelines.ca]
source = "crawl_a"
sink = "pages"
schedule = {{ every = "1s" }}
ack = "delivered"

[pipelines.cb]
source = "crawl_b"
sink = "pages"
schedule = {{ every = "1s" }}
ack = "delivered"

[workflows.polite.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 {COMMANDS} > \"$CAUDAL_ITEMS\""]

[workflows.polite.tasks.visit]
type = "command"
depends_on = ["list"]
for_each = "{{{{ tasks.list.items }}}}"
site = "{host}"
run = ["sh", "-c", "trap 'echo \"end $1 $CAUDAL_EXECUTOR $(date +%s%N) stopped\" >> \"$2\"; exit 1' TERM; echo \"start $1 $CAUDAL_EXECUTOR $(date +%s%N)\" >> \"$2\"; sleep 0.1 & wait; echo \"end $1 $CAUDAL_EXECUTOR $(date +%s%N)\" >> \"$2\"", "sh", "{{{{ item }}}}", "{ledger}"]
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 5 }}
"#,
        host = site.host(),
        a = site.url("/listings/1"),
        b = site.url("/listings/2"),
        pages = c.receiver.url("/pages"),
        ledger = ledger.display(),
    );
    for n in &c.nodes {
        let config = std::fs::read_to_string(&n.config).expect("the config");
        std::fs::write(&n.config, format!("{config}{extra}")).expect("write the config");
    }
    for n in &mut c.nodes {
        n.start();
    }
    let state = c.state().pg_pool().await;
    let first = crawls_on_the_sites_node(&c, &state, None).await;
    let (config, dir) = (c.nodes[0].config.clone(), c.nodes[0].dir.clone());
    let out = Output::of(command(&config, &dir, &["workflow", "run", "polite"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // A third of the commands done: kill the sites node.
    let ended = || {
        std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("end "))
            .count()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ended() < COMMANDS / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the commands did not run\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = c
        .nodes
        .iter()
        .position(|n| first.contains(&format!(":{}:", n.pid().unwrap_or(0))))
        .expect("the sites node");
    c.nodes[victim]
        .daemon
        .take()
        .expect("running")
        .stop(Signal::SIGKILL)
        .await;
    let second = crawls_on_the_sites_node(&c, &state, Some(&first)).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while run_state(&config, &dir).await != "succeeded" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not succeed\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the crawls go on a little on the new sites node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(site.requests() > 0, "the site was never crawled");
    assert_eq!(
        site.max_in_flight(),
        1,
        "the site served two requests at once: its concurrency of 1 did not hold across the nodes"
    );
    // The commands: each on the sites node of its time, never two at once.
    let mut spans: BTreeMap<String, (i128, i128, String)> = BTreeMap::new();
    for line in std::fs::read_to_string(&ledger).unwrap_or_default().lines() {
        // A command its node stopped (SIGTERM) says so at the end.
        let parts: Vec<&str> = line.split(' ').collect();
        let [what, item, node, at, ..] = parts[..] else {
            panic!("a ledger line: {line}");
        };
        let at: i128 = at.parse().expect("a time");
        let e = spans
            .entry(format!("{item}/{node}"))
            .or_insert((0, i128::MAX, node.to_string()));
        if what == "start" {
            e.0 = at;
        } else {
            e.1 = at;
        }
    }
    // A command of the killed node may have left no end: a caudal process
    // starting on this machine (another test's, say) kills what a dead
    // executor left running, with SIGKILL, which no trap sees. Such a
    // command was killed before its 0.1 s sleep ended, so it ended within
    // a second of its start.
    for span in spans.values_mut() {
        if span.1 == i128::MAX && span.2 == first {
            span.1 = span.0 + 1_000_000_000;
        }
    }
    let nodes: BTreeSet<&str> = spans.values().map(|s| s.2.as_str()).collect();
    assert!(
        nodes.iter().all(|n| *n == first || *n == second),
        "a site-bound command ran off the sites node: {nodes:?} (sites nodes {first}, {second})"
    );
    assert!(nodes.contains(second.as_str()), "{nodes:?}");
    let mut sorted: Vec<&(i128, i128, String)> = spans.values().collect();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "two site-bound commands overlapped: {:?} and {:?} (an end of {} means none was \
             written: the command was killed)\nledger:\n{}\n{}",
            w[0],
            w[1],
            i128::MAX,
            std::fs::read_to_string(&ledger).unwrap_or_default(),
            c.logs()
        );
    }
    let items: BTreeSet<&str> = spans.keys().filter_map(|k| k.split('/').next()).collect();
    assert_eq!(items.len(), COMMANDS, "{spans:?}");
    eprintln!(
        "sites: {} requests, at most {} at once; {} commands on {nodes:?}",
        site.requests(),
        site.max_in_flight(),
        spans.len()
    );
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}

/// The node holding the sites lease now, if any.
async fn sites_holder(state: &sqlx::PgPool) -> Option<String> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT holder FROM leases WHERE name = 'cluster/sites' \
         AND expires_at > (SELECT now_us FROM clock)",
    )
    .fetch_optional(state)
    .await
    .ok()
    .flatten();
    // (No such table yet: the nodes are still creating the store.)
    row.map(|(h,)| h)
}

/// Waits until the sites node (other than `not`) owns both crawls `ca`
/// and `cb`; returns it.
async fn crawls_on_the_sites_node(c: &Cluster, state: &sqlx::PgPool, not: Option<&str>) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let holder = sites_holder(state).await;
        let owners = c.owners().await;
        if let Some(h) = holder.filter(|h| Some(h.as_str()) != not)
            && owners
                .get(&h)
                .is_some_and(|p| p.iter().any(|p| p == "ca") && p.iter().any(|p| p == "cb"))
        {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the crawls did not both go to the sites node: {owners:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node in a network namespace, partitioned from PostgreSQL (and from
/// everything else) by taking its veth pair down while its pipeline
/// delivers: packets are dropped, connections hang. It stops its pipeline
/// on its own before its lease runs out; the other node takes the pipeline
/// with a greater fencing token and moves on; when the partition heals,
/// whatever the old node had in flight arrives late and is refused, and
/// the checkpoint never moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_partitioned_in_a_network_namespace_stops_and_is_fenced() {
    let mut c = Cluster::new(2, 1, false, "3s").await;
    let netns = Netns::create(1);
    let state_url = c.state().url().to_string();
    let upstream = host_port(&state_url);
    let receiver_at = c.receiver.addr().to_string();
    // n1 runs in the namespace: PostgreSQL (store and source) and the
    // receiver are reachable only through the veth pair.
    let pg = Proxy::start_on(&netns.host_ip, &upstream).await;
    let recv = Proxy::start_on(&netns.host_ip, &receiver_at).await;
    let config = std::fs::read_to_string(&c.nodes[0].config).expect("n1's config");
    std::fs::write(
        &c.nodes[0].config,
        config
            .replace(&upstream, &pg.addr().to_string())
            .replace(&receiver_at, &recv.addr().to_string()),
    )
    .expect("write n1's config");
    c.nodes[0].netns = Some(netns.name.clone());
    let late_refused = partition_and_heal(
        &mut c,
        || netns.cut(),
        || netns.heal(),
        // Long enough for what n1 had in flight to arrive after the heal.
        Duration::from_secs(8),
    )
    .await;
    eprintln!("netns partition: n1's late write refused: {late_refused}");
    c.stop_all().await;
    c.cleanup().await;
    drop((pg, recv));
}

/// Runs p1 on n1 (whose way to the store `cut` breaks and `heal` mends)
/// with n2 standing by, while rows are written: cuts n1 off, checks that
/// n1 stops p1 on its own, that n2 takes it with a greater fencing token
/// and moves on; heals, waits `settle`, and checks that the checkpoint
/// never moved back, that p1 stayed with n2, and that every row arrived.
/// Returns whether n1's log shows a late write refused by the fence.
async fn partition_and_heal(
    c: &mut Cluster,
    cut: impl FnOnce(),
    heal: impl FnOnce(),
    settle: Duration,
) -> bool {
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
    assert_eq!(c.owner_of("p1").await, Some(0), "{}", c.logs());
    let stop = Arc::new(AtomicBool::new(false));
    let writing = item_writer(c.src().pg_pool().await, ITEMS + 1, stop.clone());
    let state = c.state().pg_pool().await;
    let sampler = sample_checkpoints(state.clone(), "p1", stop.clone());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cursor_checkpoint(&state, "p1").await.unwrap_or(0) < ITEMS {
        assert!(tokio::time::Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = || async {
        let (t,): (i64,) = sqlx::query_as("SELECT token FROM leases WHERE name = 'owner/p1'")
            .fetch_one(&state)
            .await
            .expect("the owner lease");
        t
    };
    let n1_token = token().await;

    cut();
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
    let n2_token = token().await;
    assert!(
        n2_token > n1_token,
        "the new owner's fencing token {n2_token} is not above the old one's {n1_token}"
    );
    let log = c.nodes[0].logs();
    assert!(
        log.contains("could not renew the pipeline's lease in time"),
        "n1 did not stop p1 on its own:\n{log}"
    );

    heal();
    tokio::time::sleep(settle).await;
    stop.store(true, Ordering::Release);
    let written = writing.await.expect("the writer");
    let backwards = sampler.await.expect("the sampler");
    assert!(
        backwards.is_empty(),
        "the checkpoint moved back: {backwards:?}\n{}",
        c.logs()
    );
    assert_eq!(c.owner_of("p1").await, Some(1), "{}", c.logs());
    assert_eq!(token().await, n2_token, "p1 changed hands again");
    c.receiver.set_reply(Reply::status(200));
    c.wait_for_items(1, written).await;
    state.close().await;
    c.nodes[0].logs().contains("no longer owns")
}

/// What a cluster shows: each node's `/metrics` (live nodes, pipelines
/// owned, which pipeline, the sites node), and `caudal status` with the
/// nodes table (the sites node marked) and each pipeline's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_shows_its_nodes_in_status_and_metrics() {
    let mut c = Cluster::new(2, 2, false, "3s").await;
    let mut ports = Vec::new();
    for n in &c.nodes {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = std::fs::read_to_string(&n.config).expect("the config");
        std::fs::write(
            &n.config,
            format!("{config}\n[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .expect("write the config");
        ports.push(port);
    }
    for n in &mut c.nodes {
        n.start();
    }
    let owners = c.wait_until_shared(2, 2).await;
    let http = reqwest::Client::new();
    // A gauge's value on each node, by its line in /metrics.
    let gauge = |line: &'static str| {
        let (http, ports) = (&http, &ports);
        async move {
            let mut values = Vec::new();
            for port in ports {
                let text = match http
                    .get(format!("http://127.0.0.1:{port}/metrics"))
                    .send()
                    .await
                {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let value = text
                    .lines()
                    .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok());
                values.push(value);
            }
            values
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let nodes = gauge("caudal_cluster_nodes").await;
        let owned = gauge("caudal_cluster_pipelines_owned").await;
        let sites = gauge("caudal_cluster_sites_node").await;
        if nodes == [Some(2.0), Some(2.0)]
            && owned == [Some(1.0), Some(1.0)]
            && sites.iter().flatten().sum::<f64>() == 1.0
            && sites.iter().all(Option::is_some)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster gauges did not settle: nodes {nodes:?}, owned {owned:?}, sites {sites:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let p1 = c.owner_of("p1").await.expect("p1's owner");
    let owned_p1 = gauge("caudal_pipeline_owned{pipeline=\"p1\"}").await;
    assert_eq!(owned_p1[p1], Some(1.0), "{owned_p1:?}");
    assert_ne!(owned_p1[1 - p1], Some(1.0), "{owned_p1:?}");
    // `caudal status`: the nodes, the sites node marked, the pipelines
    // each owns; `--json` names each pipeline's owner.
    let n = &c.nodes[1];
    let out = Output::of(command(&n.config, &n.dir, &["status"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for header in ["NODE", "STATE", "HEARTBEAT", "PIPELINES"] {
        assert!(out.stdout.contains(header), "{}", out.stdout);
    }
    for (id, pipelines) in &owners {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no line for node {id}:\n{}", out.stdout));
        for p in pipelines {
            assert!(line.contains(p.as_str()), "{line}");
        }
    }
    assert_eq!(
        out.stdout.matches("active (sites)").count(),
        1,
        "{}",
        out.stdout
    );
    let out = Output::of(command(&n.config, &n.dir, &["status", "--json"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let status: Value = serde_json::from_str(&out.stdout).expect("status JSON");
    let owner_of = |p: &str| {
        status
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["pipeline"] == p))
            .and_then(|x| x["owner"].as_str())
            .map(str::to_string)
    };
    for (id, pipelines) in &owners {
        for p in pipelines {
            assert_eq!(owner_of(p).as_deref(), Some(id.as_str()), "{status}");
        }
    }
    c.stop_all().await;
    c.cleanup().await;
}

/// Cancelling a run whose attempts are out on the nodes: the attempts
/// claimed are stopped by their nodes at their next beat (their processes
/// killed), those not yet claimed end at once, and the run ends
/// `cancelled` with nothing left handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_run_stops_its_attempts_on_every_node() {
    const ITEMS: usize = 12;
    let mut c = Cluster::new(2, 0, false, "3s").await;
    let root = c.nodes[0].dir.parent().expect("the root").to_path_buf();
    let pids = root.join("pids.txt");
    let workflow = format!(
        r#"
[pools.two]
slots = 4

[workflows.long.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 {ITEMS} > \"$CAUDAL_ITEMS\""]

[workflows.long.tasks.wait]
type = "command"
depends_on = ["list"]
for_each = "{{{{ tasks.list.items }}}}"
pool = "two"
run = ["sh", "-c", "echo \"$$\" >> \"$1\"; exec sleep 120", "sh", "{pids}"]
"#,
        pids = pids.display(),
    );
    for n in &c.nodes {
        let config = std::fs::read_to_string(&n.config).expect("the config");
        std::fs::write(&n.config, format!("{config}{workflow}")).expect("write the config");
    }
    for n in &mut c.nodes {
        n.start();
    }
    let (config, dir) = (c.nodes[0].config.clone(), c.nodes[0].dir.clone());
    let out = Output::of(command(&config, &dir, &["workflow", "run", "long"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // The pool's 4 attempts run (on either node); 8 wait.
    let started = || {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while started().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the attempts did not start\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Output::of(command(&config, &dir, &["workflow", "cancel", "1"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while run_state(&config, &dir).await != "cancelled" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not end cancelled\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alive = |pid: &i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None).is_ok();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while started().iter().any(alive) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an attempt's process outlived the cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(started().len(), 4, "an attempt started after the cancel");
    let state = c.state().pg_pool().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM workflow_dispatch")
            .fetch_one(&state)
            .await
            .expect("count dispatch rows");
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} attempts still handed out after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tasks = json_lines(&config, &dir, &["workflow", "tasks", "1", "--json"]).await;
    let waits: Vec<&Value> = tasks.iter().filter(|t| t["task"] == "wait").collect();
    assert_eq!(waits.len(), ITEMS + 1, "{tasks:?}");
    assert!(waits.iter().all(|t| t["state"] == "cancelled"), "{waits:?}");
    state.close().await;
    c.stop_all().await;
    c.cleanup().await;
}
