//! Nodes: the `caudal run` processes sharing this store. Each registers
//! itself when it starts, beats its heartbeat while it runs, and marks
//! itself stopped when it ends; an operator asks one to drain (hand its
//! pipelines over, then exit) through the store, so any node or the CLI can
//! ask. The heartbeat's age is judged by the database's clock, like lease
//! expiry. Nodes gone quiet for a day are forgotten when another registers.

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// How long a node that stopped beating is listed.
const FORGET_AFTER_US: i64 = 24 * 3600 * 1_000_000;

/// What a node says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    /// Its lease-holder id (`host:pid:nonce`).
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// Whether it shares pipelines with other nodes (`[cluster]`).
    pub cluster: bool,
}

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Active,
    /// Asked to hand its work over and exit.
    Draining,
    /// Ended cleanly.
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }

    fn parse(s: &str, id: &str) -> Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "draining" => Ok(Self::Draining),
            "stopped" => Ok(Self::Stopped),
            other => Err(Error::new(
                ErrorKind::Store,
                format!("state store: node `{id}` has unknown state `{other}`"),
            )),
        }
    }
}

/// A registered node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: Timestamp,
    pub heartbeat_at: Timestamp,
    /// Time since its last heartbeat, by the database's clock.
    pub heartbeat_age: std::time::Duration,
    pub state: NodeState,
    pub cluster: bool,
    /// Pipelines it owned at its last heartbeat.
    pub owned: u64,
}

type NodeRow = (
    String,
    String,
    i64,
    String,
    i64,
    i64,
    i64,
    String,
    bool,
    i64,
);

const SELECT: &str = "SELECT id, host, pid, version, started_at, heartbeat_at, \
     (SELECT now_us FROM clock) - heartbeat_at, state, cluster, owned FROM nodes ";

fn node(r: NodeRow) -> Result<Node> {
    let (id, host, pid, version, started, beat, age, state, cluster, owned) = r;
    Ok(Node {
        pid: u32::try_from(pid).unwrap_or(0),
        started_at: clock::from_db(started, "nodes.started_at")?,
        heartbeat_at: clock::from_db(beat, "nodes.heartbeat_at")?,
        heartbeat_age: std::time::Duration::from_micros(u64::try_from(age).unwrap_or(0)),
        state: NodeState::parse(&state, &id)?,
        owned: u64::try_from(owned).unwrap_or(0),
        id,
        host,
        version,
        cluster,
    })
}

impl Store {
    /// Registers (or registers again) node `n` as active, and forgets
    /// nodes silent for a day.
    pub async fn register_node(&self, n: &NewNode) -> Result<()> {
        const FORGET: &str =
            "DELETE FROM nodes WHERE heartbeat_at < (SELECT now_us FROM clock) - $1";
        const SQL: &str = "INSERT INTO nodes (id, host, pid, version, started_at, heartbeat_at, state, cluster, owned) \
             SELECT $1, $2, $3, $4, now_us, now_us, 'active', $5, 0 FROM clock WHERE true \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
             state = CASE WHEN nodes.state = 'stopped' THEN 'active' ELSE nodes.state END, \
             cluster = excluded.cluster";
        with_pool!(self, |pool| {
            async {
                sqlx::query(FORGET)
                    .bind(FORGET_AFTER_US)
                    .execute(pool)
                    .await?;
                sqlx::query(SQL)
                    .bind(&n.id)
                    .bind(&n.host)
                    .bind(i64::from(n.pid))
                    .bind(&n.version)
                    .bind(n.cluster)
                    .execute(pool)
                    .await
                    .map(drop)
            }
            .await
        })
        .map_err(|e| store_error(format!("registering node `{}`", n.id), e))
    }

    /// Beats node `id`'s heartbeat, with the number of pipelines it owns;
    /// returns its state (so it sees a drain request), or `None` when it
    /// is not registered (forgotten: register again).
    pub async fn node_heartbeat(&self, id: &str, owned: u64) -> Result<Option<NodeState>> {
        const SQL: &str = "UPDATE nodes SET heartbeat_at = (SELECT now_us FROM clock), owned = $2 \
             WHERE id = $1 RETURNING state";
        let state: Option<String> = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(id)
                .bind(i64::try_from(owned).unwrap_or(i64::MAX))
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("beating the heartbeat of node `{id}`"), e))?;
        state.map(|s| NodeState::parse(&s, id)).transpose()
    }

    /// Every registered node, oldest first.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let sql = format!("{SELECT}ORDER BY started_at, id");
        let rows: Vec<NodeRow> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("listing nodes".into(), e))?;
        rows.into_iter().map(node).collect()
    }

    /// Sets the state of node `id`. Asking to drain a node that is not
    /// active changes nothing; returns whether the node's state changed.
    pub async fn set_node_state(&self, id: &str, state: NodeState) -> Result<bool> {
        const SQL: &str = "UPDATE nodes SET state = $2 \
             WHERE id = $1 AND ($2 <> 'draining' OR state = 'active')";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(state.as_str())
                .execute(pool)
                .await
                .map(|done| done.rows_affected() > 0)
        })
        .map_err(|e| store_error(format!("marking node `{id}` {}", state.as_str()), e))
    }
}
