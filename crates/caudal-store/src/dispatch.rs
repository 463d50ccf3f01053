//! Workflow attempts handed out to the nodes of a cluster.
//!
//! The executor writes a dispatch row with each attempt it starts (in the
//! same fenced transaction as the attempt, see
//! [`Store::save_workflow_changes_dispatching`]); nodes claim ready rows,
//! run them and write their outcome; the executor reads the outcomes,
//! decides what follows and forgets the rows.
//!
//! Promises:
//! - **One claimer.** [`Store::claim_dispatch`] claims under an advisory
//!   transaction lock on PostgreSQL (SQLite has one writer), with
//!   `FOR UPDATE SKIP LOCKED` besides, so of any number of nodes claiming
//!   at once each row goes to exactly one, and each claim sees the claims
//!   committed before it.
//! - **Fenced by token.** Every claim and every rescue adds one to the row's
//!   token; a node's heartbeat ([`Store::beat_dispatch`]) and outcome
//!   ([`Store::finish_dispatch`]) count only with the token of its claim,
//!   so an attempt rescued from a node that went silent cannot be finished
//!   by that node when it comes back.
//! - **Rescued by silence, not by age.** [`Store::rescue_dispatch`] ends
//!   only claimed rows whose heartbeat is older than the given silence, as
//!   judged by the database's clock; a long attempt on a live node is never
//!   rescued.
//! - A lane (`lane <> ''`) keeps a row for one node: only that node claims
//!   it, and only once no other node holds a lane row. When the lane moves
//!   (a new sites node), the new node starts nothing site-bound until the
//!   old node's site-bound attempts have ended or been rescued, so a
//!   per-site limit holds across the hand-over too.
//! - **Wake-ups, not only polls.** On PostgreSQL a batch that hands
//!   attempts out notifies `caudal_dispatch`, and an outcome notifies
//!   `caudal_dispatch_done`, at commit; [`Store::dispatch_wakeups`] wakes
//!   a waiter on either. A notification can be missed (a dropped
//!   connection), so waiters still poll, less often.

use std::sync::Arc;
use std::time::Duration;

use caudal_core::Result;
use tokio::sync::Notify;

use crate::{Pool, Store, store_error};

/// Which notifications wake a waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Attempts were handed out (nodes waiting to claim).
    HandedOut,
    /// An attempt's outcome was written (the executor).
    Ended,
}

impl Wake {
    fn channel(self) -> &'static str {
        match self {
            Wake::HandedOut => "caudal_dispatch",
            Wake::Ended => "caudal_dispatch_done",
        }
    }
}

/// Wake-ups from the store's notifications (see [`Store::dispatch_wakeups`]).
/// Stops listening when dropped.
#[derive(Debug)]
pub struct Wakeups {
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Wakeups {
    /// Waits for the next notification (one that came since the last wait
    /// counts). Cancel-safe.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which attempt a dispatch row is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DispatchKey {
    pub run_id: i64,
    pub task: String,
    pub map_index: i64,
    pub attempt: u32,
}

/// An attempt to hand out.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDispatch {
    pub key: DispatchKey,
    /// The pool whose slot it holds (informational: the executor counts).
    pub pool: String,
    /// Lower first.
    pub priority: i64,
    /// Order within a priority and run.
    pub seq: i64,
    /// `""`: any node; otherwise only the node with that id claims it.
    pub lane: String,
    /// What the attempt runs (JSON; the engine's business).
    pub spec: String,
}

/// What the executor changes in the dispatch table with a batch.
#[derive(Clone, Debug, Default)]
pub struct DispatchChanges {
    pub new: Vec<NewDispatch>,
    /// Rows whose outcome the executor has taken.
    pub forget: Vec<DispatchKey>,
    /// Rows whose attempt is to stop (the run was cancelled): a claimed
    /// row is flagged for its node to stop it; a row not yet claimed ends
    /// at once with the outcome given.
    pub cancel: Vec<(DispatchKey, String)>,
}

impl DispatchChanges {
    pub fn is_empty(&self) -> bool {
        self.new.is_empty() && self.forget.is_empty() && self.cancel.is_empty()
    }
}

/// A row a node claimed.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedDispatch {
    pub key: DispatchKey,
    pub token: i64,
    pub spec: String,
}

/// A claimed row's state at a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchBeat {
    pub key: DispatchKey,
    pub token: i64,
    /// The executor asks for the attempt to stop.
    pub cancel: bool,
}

/// A row that ended on its node, or was rescued from a silent one.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedDispatch {
    pub key: DispatchKey,
    /// The node that claimed it.
    pub node: Option<String>,
    /// The outcome the node wrote (JSON); `None`: rescued, the node went
    /// silent.
    pub outcome: Option<String>,
}

/// A row of a run's attempts handed out (ready, claimed or done), as the
/// executor adopts it after a takeover.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenDispatch {
    pub key: DispatchKey,
    pub pool: String,
    pub node: Option<String>,
}

type KeyTuple = (i64, String, i64, i64);

fn key(t: KeyTuple) -> DispatchKey {
    DispatchKey {
        run_id: t.0,
        task: t.1,
        map_index: t.2,
        attempt: u32::try_from(t.3).unwrap_or(u32::MAX),
    }
}

/// Claims ready rows, skipping those another node is claiming.
/// The advisory lock claims take on PostgreSQL ("caudal" and 1).
const CLAIM_LOCK: i64 = 0x6361_7564_616c_0001;
const CLAIM_POSTGRES: &str = "UPDATE workflow_dispatch AS d SET state = 'claimed', node = $1, token = d.token + 1, \
             heartbeat_at = (SELECT now_us FROM clock) \
             FROM (SELECT run_id, task, map_index, attempt FROM workflow_dispatch \
                   WHERE state = 'ready' AND (lane = '' OR (lane = $1 AND NOT EXISTS \
                     (SELECT 1 FROM workflow_dispatch p WHERE p.state = 'claimed' \
                      AND p.lane <> '' AND p.node <> $1))) \
                   ORDER BY priority, run_id, seq LIMIT $2 FOR UPDATE SKIP LOCKED) AS c \
             WHERE d.run_id = c.run_id AND d.task = c.task AND d.map_index = c.map_index \
             AND d.attempt = c.attempt \
             RETURNING d.run_id, d.task, d.map_index, d.attempt, d.token, d.spec";
/// SQLite's `RETURNING` cannot name the updated table's alias; it has one
/// writer, so the plain subquery claims as safely.
const CLAIM_SQLITE: &str = "UPDATE workflow_dispatch SET state = 'claimed', node = $1, \
     token = token + 1, heartbeat_at = (SELECT now_us FROM clock) \
     WHERE (run_id, task, map_index, attempt) IN \
       (SELECT run_id, task, map_index, attempt FROM workflow_dispatch \
        WHERE state = 'ready' AND (lane = '' OR (lane = $1 AND NOT EXISTS \
          (SELECT 1 FROM workflow_dispatch p WHERE p.state = 'claimed' \
           AND p.lane <> '' AND p.node <> $1))) \
        ORDER BY priority, run_id, seq LIMIT $2) \
     RETURNING run_id, task, map_index, attempt, token, spec";
const CLAIM_HOLDER: &str = "UPDATE workflow_attempts SET holder = $5 \
     WHERE run_id = $1 AND task = $2 AND map_index = $3 AND attempt = $4";
const FINISH: &str = "UPDATE workflow_dispatch SET state = 'done', outcome = $6 \
     WHERE run_id = $1 AND task = $2 AND map_index = $3 AND attempt = $4 AND token = $5 \
     AND state = 'claimed'";
/// [`FINISH`], notifying the executor when it wrote the outcome.
const FINISH_NOTIFY: &str = "WITH done AS (UPDATE workflow_dispatch SET state = 'done', \
     outcome = $6 WHERE run_id = $1 AND task = $2 AND map_index = $3 AND attempt = $4 \
     AND token = $5 AND state = 'claimed' RETURNING 1) \
     SELECT pg_notify('caudal_dispatch_done', '') FROM done";
/// Sent in a transaction that hands attempts out.
pub(crate) const NOTIFY_HANDED_OUT: &str = "SELECT pg_notify('caudal_dispatch', '')";

/// Writes `changes` inside the executor's transaction `tx`.
macro_rules! apply_dispatch {
    ($tx:expr, $changes:expr) => {
        for d in &$changes.new {
            sqlx::query($crate::dispatch::INSERT_SQL)
                .bind(d.key.run_id)
                .bind(&d.key.task)
                .bind(d.key.map_index)
                .bind(i64::from(d.key.attempt))
                .bind(&d.pool)
                .bind(d.priority)
                .bind(d.seq)
                .bind(&d.lane)
                .bind(&d.spec)
                .execute(&mut *$tx)
                .await?;
        }
        for k in &$changes.forget {
            sqlx::query($crate::dispatch::FORGET_SQL)
                .bind(k.run_id)
                .bind(&k.task)
                .bind(k.map_index)
                .bind(i64::from(k.attempt))
                .execute(&mut *$tx)
                .await?;
        }
        for (k, outcome) in &$changes.cancel {
            sqlx::query($crate::dispatch::CANCEL_SQL)
                .bind(k.run_id)
                .bind(&k.task)
                .bind(k.map_index)
                .bind(i64::from(k.attempt))
                .execute(&mut *$tx)
                .await?;
            sqlx::query($crate::dispatch::CANCEL_READY_SQL)
                .bind(k.run_id)
                .bind(&k.task)
                .bind(k.map_index)
                .bind(i64::from(k.attempt))
                .bind(outcome)
                .execute(&mut *$tx)
                .await?;
        }
    };
}
pub(crate) use apply_dispatch;

pub(crate) const INSERT_SQL: &str = "INSERT INTO workflow_dispatch \
     (run_id, task, map_index, attempt, pool, priority, seq, lane, spec) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING";
pub(crate) const FORGET_SQL: &str = "DELETE FROM workflow_dispatch WHERE run_id = $1 AND task = $2 \
     AND map_index = $3 AND attempt = $4 AND state = 'done'";
pub(crate) const CANCEL_SQL: &str = "UPDATE workflow_dispatch SET cancel = 1 WHERE run_id = $1 \
     AND task = $2 AND map_index = $3 AND attempt = $4 AND state = 'claimed'";
pub(crate) const CANCEL_READY_SQL: &str = "UPDATE workflow_dispatch SET state = 'done', \
     outcome = $5 WHERE run_id = $1 AND task = $2 AND map_index = $3 AND attempt = $4 \
     AND state = 'ready'";

const FENCE: &str = "UPDATE leases SET holder = holder WHERE name = $1 AND holder = $2";

/// Whether `holder` holds `lease`, checked in transaction `tx`, whose
/// write locks the lease row until the commit (a takeover waits).
macro_rules! fence_held {
    ($tx:expr, $lease:expr, $holder:expr) => {
        sqlx::query(FENCE)
            .bind($lease)
            .bind($holder)
            .execute(&mut *$tx)
            .await?
            .rows_affected()
            > 0
    };
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Store {
    /// Claims up to `limit` ready rows for node `node` (rows of its lane
    /// or of none), highest priority first. Each claimed attempt's row in
    /// `workflow_attempts` names `node` as its holder.
    pub async fn claim_dispatch(&self, node: &str, limit: u32) -> Result<Vec<ClaimedDispatch>> {
        let claim = if self.backend() == "postgres" {
            CLAIM_POSTGRES
        } else {
            CLAIM_SQLITE
        };
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                if claim == CLAIM_POSTGRES {
                    // One claimer at a time: each claim's snapshot then
                    // sees the lane rows the previous one claimed (the
                    // lane guard's NOT EXISTS would miss a concurrent
                    // claim under READ COMMITTED). Claims are short.
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(CLAIM_LOCK)
                        .execute(&mut *tx)
                        .await?;
                }
                let rows: Vec<(i64, String, i64, i64, i64, String)> = sqlx::query_as(claim)
                    .bind(node)
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?;
                for r in &rows {
                    sqlx::query(CLAIM_HOLDER)
                        .bind(r.0)
                        .bind(&r.1)
                        .bind(r.2)
                        .bind(r.3)
                        .bind(node)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            }
            .await
        })
        .map(|rows| {
            rows.into_iter()
                .map(|r| ClaimedDispatch {
                    key: key((r.0, r.1, r.2, r.3)),
                    token: r.4,
                    spec: r.5,
                })
                .collect()
        })
        .map_err(|e| store_error(format!("claiming workflow attempts for node {node}"), e))
    }

    /// Beats the heartbeat of every row node `node` holds, and says which
    /// those are (with their tokens and cancel requests): an attempt the
    /// node runs that is not among them was rescued from it.
    pub async fn beat_dispatch(&self, node: &str) -> Result<Vec<DispatchBeat>> {
        let sql = "UPDATE workflow_dispatch SET heartbeat_at = (SELECT now_us FROM clock) \
             WHERE node = $1 AND state = 'claimed' \
             RETURNING run_id, task, map_index, attempt, token, cancel";
        with_pool!(self, |pool| {
            sqlx::query_as::<_, (i64, String, i64, i64, i64, i64)>(sql)
                .bind(node)
                .fetch_all(pool)
                .await
        })
        .map(|rows| {
            rows.into_iter()
                .map(|r| DispatchBeat {
                    key: key((r.0, r.1, r.2, r.3)),
                    token: r.4,
                    cancel: r.5 != 0,
                })
                .collect()
        })
        .map_err(|e| store_error(format!("beating node {node}'s workflow attempts"), e))
    }

    /// Writes an attempt's outcome. Returns `false`, writing nothing, when
    /// the claim with `token` no longer holds (the row was rescued).
    pub async fn finish_dispatch(
        &self,
        key: &DispatchKey,
        token: i64,
        outcome: &str,
    ) -> Result<bool> {
        let written = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query(FINISH)
                .bind(key.run_id)
                .bind(&key.task)
                .bind(key.map_index)
                .bind(i64::from(key.attempt))
                .bind(token)
                .bind(outcome)
                .execute(pool)
                .await
                .map(|d| d.rows_affected() == 1),
            Pool::Postgres(pool) => sqlx::query(FINISH_NOTIFY)
                .bind(key.run_id)
                .bind(&key.task)
                .bind(key.map_index)
                .bind(i64::from(key.attempt))
                .bind(token)
                .bind(outcome)
                .fetch_all(pool)
                .await
                .map(|rows| rows.len() == 1),
        };
        written.map_err(|e| {
            store_error(
                format!(
                    "writing the outcome of {}[{}] attempt {} of run {}",
                    key.task, key.map_index, key.attempt, key.run_id
                ),
                e,
            )
        })
    }

    /// Wake-ups on `which` notifications: `None` on SQLite (one process:
    /// nothing to hear from).
    pub async fn dispatch_wakeups(&self, which: Wake) -> Result<Option<Wakeups>> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        let channel = which.channel();
        let failed = |e| store_error(format!("listening on {channel}"), e);
        // A pool of its own: a listener keeps its connection for good, and
        // must not take one of the store's.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = sqlx::postgres::PgListener::connect_with(&own)
            .await
            .map_err(failed)?;
        listener.listen(channel).await.map_err(failed)?;
        let notify = Arc::new(Notify::new());
        let task = {
            let notify = notify.clone();
            tokio::spawn(async move {
                loop {
                    match listener.recv().await {
                        Ok(_) => {
                            while listener.next_buffered().is_some() {}
                            notify.notify_one();
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, channel, "lost the notification connection; reconnecting");
                            // What was missed is found by the next poll.
                            notify.notify_one();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            })
        };
        Ok(Some(Wakeups { notify, task }))
    }

    /// Up to `limit` rows that ended (or were rescued), oldest run first;
    /// only run `only_run`'s when given.
    pub async fn finished_dispatch(
        &self,
        limit: u32,
        only_run: Option<i64>,
    ) -> Result<Vec<FinishedDispatch>> {
        let sql = "SELECT run_id, task, map_index, attempt, node, outcome FROM workflow_dispatch \
             WHERE state = 'done' AND ($2 IS NULL OR run_id = $2) ORDER BY run_id LIMIT $1";
        with_pool!(self, |pool| {
            sqlx::query_as::<_, (i64, String, i64, i64, Option<String>, Option<String>)>(sql)
                .bind(i64::from(limit))
                .bind(only_run)
                .fetch_all(pool)
                .await
        })
        .map(|rows| {
            rows.into_iter()
                .map(|r| FinishedDispatch {
                    key: key((r.0, r.1, r.2, r.3)),
                    node: r.4,
                    outcome: r.5,
                })
                .collect()
        })
        .map_err(|e| store_error("reading finished workflow attempts".into(), e))
    }

    /// Ends, as lost, every claimed row whose node has not beaten its
    /// heartbeat for `silent`, while `holder` holds lease `lease` (the
    /// executor's). Returns the rows rescued, with their nodes.
    pub async fn rescue_dispatch(
        &self,
        lease: &str,
        holder: &str,
        silent: Duration,
    ) -> Result<Vec<(DispatchKey, Option<String>)>> {
        let sql = "UPDATE workflow_dispatch SET state = 'done', token = token + 1, outcome = NULL \
             WHERE state = 'claimed' AND heartbeat_at < (SELECT now_us FROM clock) - $1 \
             RETURNING run_id, task, map_index, attempt, node";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                if !fence_held!(tx, lease, holder) {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                }
                let rows: Vec<(i64, String, i64, i64, Option<String>)> = sqlx::query_as(sql)
                    .bind(micros(silent))
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            }
            .await
        })
        .map(|rows| {
            rows.into_iter()
                .map(|r| (key((r.0, r.1, r.2, r.3)), r.4))
                .collect()
        })
        .map_err(|e| store_error("rescuing workflow attempts of silent nodes".into(), e))
    }

    /// The rows of run `run_id` (ready, claimed, or done and not yet taken
    /// by the executor).
    pub async fn open_dispatch(&self, run_id: i64) -> Result<Vec<OpenDispatch>> {
        let sql = "SELECT run_id, task, map_index, attempt, pool, node FROM workflow_dispatch \
             WHERE run_id = $1";
        with_pool!(self, |pool| {
            sqlx::query_as::<_, (i64, String, i64, i64, String, Option<String>)>(sql)
                .bind(run_id)
                .fetch_all(pool)
                .await
        })
        .map(|rows| {
            rows.into_iter()
                .map(|r| OpenDispatch {
                    key: key((r.0, r.1, r.2, r.3)),
                    pool: r.4,
                    node: r.5,
                })
                .collect()
        })
        .map_err(|e| {
            store_error(
                format!("reading the handed-out attempts of run {run_id}"),
                e,
            )
        })
    }

    /// The nodes other than `node` running a lane row now (the previous
    /// sites node's site-bound attempts, which `node`'s wait for).
    pub async fn lane_claims_elsewhere(&self, node: &str) -> Result<Vec<(String, i64)>> {
        let sql = "SELECT node, count(*) FROM workflow_dispatch WHERE state = 'claimed' \
             AND lane <> '' AND node <> $1 GROUP BY node ORDER BY node";
        with_pool!(self, |pool| {
            sqlx::query_as::<_, (String, i64)>(sql)
                .bind(node)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("reading the site-bound attempts of other nodes".into(), e))
    }

    /// Gives every ready row kept for a lane to node `lane` instead (the
    /// executor moved there), while `holder` holds lease `lease`.
    pub async fn relane_dispatch(&self, lease: &str, holder: &str, lane: &str) -> Result<u64> {
        let sql = "UPDATE workflow_dispatch SET lane = $1 WHERE state = 'ready' AND lane <> '' \
             AND lane <> $1";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                if !fence_held!(tx, lease, holder) {
                    tx.rollback().await?;
                    return Ok(0);
                }
                let moved = sqlx::query(sql)
                    .bind(lane)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok::<_, sqlx::Error>(moved)
            }
            .await
        })
        .map_err(|e| store_error("moving lane-bound workflow attempts".into(), e))
    }
}
