//! Dead letters: records that will not be delivered as they are, kept with
//! why. A sink's rejection, a record failing the pipeline's JSON Schema, or
//! retries that gave up put records here; an operator lists and inspects
//! them, replays them through the normal delivery path (with the same
//! idempotency keys), or discards them. A pending letter is never deleted:
//! replayed and discarded letters keep their row with the state and the
//! time it changed, until they are older than the configured retention
//! ([`Store::prune_dead_letters`]).

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// A record to put aside.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDeadLetter {
    pub batch_key: String,
    pub event_id: String,
    pub record_key: Option<String>,
    pub position: serde_json::Value,
    pub record: serde_json::Value,
    pub reason: String,
    pub status: Option<u16>,
    pub response_excerpt: Option<String>,
    pub attempts: u32,
    pub first_attempt_at: Option<Timestamp>,
    pub last_attempt_at: Option<Timestamp>,
}

impl NewDeadLetter {
    /// A dead letter for `event` of `pipeline`, sent (or meant to be sent)
    /// in batch `batch_key`, with no attempt details yet.
    pub fn of_event(
        pipeline: &str,
        batch_key: &str,
        event: &caudal_core::sink::Event,
        reason: String,
    ) -> Self {
        Self {
            batch_key: batch_key.to_string(),
            event_id: event.id(pipeline),
            record_key: event.key.clone(),
            position: serde_json::to_value(&event.position).unwrap_or_default(),
            record: event.data.to_value(),
            reason,
            status: None,
            response_excerpt: None,
            attempts: 0,
            first_attempt_at: None,
            last_attempt_at: None,
        }
    }
}

/// Where a dead letter stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterState {
    Pending,
    Replayed,
    Discarded,
}

impl DeadLetterState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Replayed => "replayed",
            Self::Discarded => "discarded",
        }
    }

    fn parse(s: &str, id: i64) -> Result<Self> {
        match s {
            "pending" => Ok(Self::Pending),
            "replayed" => Ok(Self::Replayed),
            "discarded" => Ok(Self::Discarded),
            other => Err(Error::new(
                ErrorKind::Store,
                format!("state store: dead letter {id} has unknown state `{other}`"),
            )),
        }
    }
}

/// A stored dead letter.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub pipeline: String,
    pub batch_key: String,
    pub event_id: String,
    pub record_key: Option<String>,
    pub position: serde_json::Value,
    pub record: serde_json::Value,
    pub reason: String,
    pub status: Option<u16>,
    pub response_excerpt: Option<String>,
    pub attempts: u32,
    pub first_attempt_at: Option<Timestamp>,
    pub last_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub state: DeadLetterState,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    pipeline: String,
    batch_key: String,
    event_id: String,
    record_key: Option<String>,
    position: String,
    record: String,
    reason: String,
    status: Option<i32>,
    response_excerpt: Option<String>,
    attempts: i32,
    first_attempt_at: Option<i64>,
    last_attempt_at: Option<i64>,
    created_at: i64,
    state: String,
}

impl TryFrom<Row> for DeadLetter {
    type Error = Error;

    fn try_from(r: Row) -> Result<Self> {
        let json = |text: &str, column: &str| {
            serde_json::from_str(text).map_err(|e| {
                Error::with_source(
                    ErrorKind::Store,
                    format!(
                        "state store: dead letter {} has invalid JSON in `{column}`",
                        r.id
                    ),
                    e,
                )
            })
        };
        Ok(Self {
            id: r.id,
            position: json(&r.position, "position")?,
            record: json(&r.record, "record")?,
            state: DeadLetterState::parse(&r.state, r.id)?,
            pipeline: r.pipeline,
            batch_key: r.batch_key,
            event_id: r.event_id,
            record_key: r.record_key,
            reason: r.reason,
            status: r.status.and_then(|s| u16::try_from(s).ok()),
            response_excerpt: r.response_excerpt,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            first_attempt_at: r
                .first_attempt_at
                .map(|t| clock::from_db(t, "dead_letters.first_attempt_at"))
                .transpose()?,
            last_attempt_at: r
                .last_attempt_at
                .map(|t| clock::from_db(t, "dead_letters.last_attempt_at"))
                .transpose()?,
            created_at: clock::from_db(r.created_at, "dead_letters.created_at")?,
        })
    }
}

const SELECT: &str = "SELECT id, pipeline, batch_key, event_id, record_key, position, record, reason, \
     status, response_excerpt, attempts, first_attempt_at, last_attempt_at, created_at, state \
     FROM dead_letters ";

impl Store {
    /// Stores dead letters of `pipeline` in one transaction; returns their
    /// ids. Each is a new letter (a record refused again after a replay).
    pub async fn add_dead_letters(
        &self,
        pipeline: &str,
        letters: &[NewDeadLetter],
    ) -> Result<Vec<i64>> {
        self.store_dead_letters(pipeline, letters, false).await
    }

    /// As [`add_dead_letters`](Self::add_dead_letters), but a letter whose
    /// record is already pending from the same batch is kept once: its
    /// existing id is returned. A batch delivered again after a crash (sent,
    /// refused and put aside, then the process died before its outcome was
    /// recorded) is refused again for the same records. Letters replayed or
    /// discarded earlier do not count.
    pub async fn add_dead_letters_once(
        &self,
        pipeline: &str,
        letters: &[NewDeadLetter],
    ) -> Result<Vec<i64>> {
        self.store_dead_letters(pipeline, letters, true).await
    }

    async fn store_dead_letters(
        &self,
        pipeline: &str,
        letters: &[NewDeadLetter],
        once: bool,
    ) -> Result<Vec<i64>> {
        const SQL: &str = "INSERT INTO dead_letters (pipeline, batch_key, event_id, record_key, position, \
             record, reason, status, response_excerpt, attempts, first_attempt_at, last_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, (SELECT now_us FROM clock)) RETURNING id";
        const PENDING: &str = "SELECT id FROM dead_letters WHERE pipeline = $1 AND event_id = $2 \
             AND batch_key = $3 AND state = 'pending' ORDER BY id LIMIT 1";
        let mut ids = Vec::with_capacity(letters.len());
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for l in letters {
                    let pending: Option<i64> = if once {
                        sqlx::query_scalar(PENDING)
                            .bind(pipeline)
                            .bind(&l.event_id)
                            .bind(&l.batch_key)
                            .fetch_optional(&mut *tx)
                            .await?
                    } else {
                        None
                    };
                    if let Some(id) = pending {
                        ids.push(id);
                        continue;
                    }
                    let id: i64 = sqlx::query_scalar(SQL)
                        .bind(pipeline)
                        .bind(&l.batch_key)
                        .bind(&l.event_id)
                        .bind(&l.record_key)
                        .bind(l.position.to_string())
                        .bind(l.record.to_string())
                        .bind(&l.reason)
                        .bind(l.status.map(i32::from))
                        .bind(&l.response_excerpt)
                        .bind(i32::try_from(l.attempts).unwrap_or(i32::MAX))
                        .bind(l.first_attempt_at.map(clock::to_db))
                        .bind(l.last_attempt_at.map(clock::to_db))
                        .fetch_one(&mut *tx)
                        .await?;
                    ids.push(id);
                }
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("storing dead letters of pipeline `{pipeline}`"), e))?;
        Ok(ids)
    }

    /// Dead letters, oldest first, optionally of one pipeline and in one
    /// state, with ids above `after` (for paging).
    pub async fn dead_letters(
        &self,
        pipeline: Option<&str>,
        state: Option<DeadLetterState>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        const WHERE: &str = "WHERE ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR state = $2) \
             AND id > $3 ORDER BY id LIMIT $4";
        let sql = format!("{SELECT}{WHERE}");
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(pipeline)
                .bind(state.map(DeadLetterState::as_str))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("listing dead letters".into(), e))?;
        rows.into_iter().map(DeadLetter::try_from).collect()
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>> {
        let sql = format!("{SELECT}WHERE id = $1");
        let row: Option<Row> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading dead letter {id}"), e))?;
        row.map(DeadLetter::try_from).transpose()
    }

    /// Number of pending dead letters of a pipeline.
    pub async fn pending_dead_letters(&self, pipeline: &str) -> Result<u64> {
        const SQL: &str =
            "SELECT COUNT(*) FROM dead_letters WHERE pipeline = $1 AND state = 'pending'";
        let n: i64 = with_pool!(self, |pool| sqlx::query_scalar(SQL)
            .bind(pipeline)
            .fetch_one(pool)
            .await)
        .map_err(|e| store_error(format!("counting dead letters of `{pipeline}`"), e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Moves pending dead letters to `state` (replayed or discarded); returns
    /// how many changed. Letters not pending are left as they are.
    pub async fn resolve_dead_letters(&self, ids: &[i64], state: DeadLetterState) -> Result<u64> {
        if state == DeadLetterState::Pending {
            return Err(Error::new(
                ErrorKind::Internal,
                "dead letters cannot be resolved back to pending",
            ));
        }
        const SQL: &str = "UPDATE dead_letters SET state = $2, resolved_at = (SELECT now_us FROM clock) \
             WHERE id = $1 AND state = 'pending'";
        let mut changed = 0;
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for id in ids {
                    changed += sqlx::query(SQL)
                        .bind(id)
                        .bind(state.as_str())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("marking dead letters {}", state.as_str()), e))?;
        Ok(changed)
    }
}

impl DeadLetter {
    /// The letter as JSON: its fields, and with `whole` the record, its
    /// position and the response excerpt too.
    pub fn to_json(&self, whole: bool) -> serde_json::Value {
        let l = self;
        let mut v = serde_json::json!({
            "id": l.id,
            "pipeline": l.pipeline,
            "state": l.state.as_str(),
            "batch_key": l.batch_key,
            "event_id": l.event_id,
            "record_key": l.record_key,
            "status": l.status,
            "reason": l.reason,
            "attempts": l.attempts,
            "first_attempt_at": l.first_attempt_at.map(|t| t.to_string()),
            "last_attempt_at": l.last_attempt_at.map(|t| t.to_string()),
            "created_at": l.created_at.to_string(),
        });
        if whole {
            v["record"] = l.record.clone();
            v["position"] = l.position.clone();
            v["response_excerpt"] = l.response_excerpt.clone().into();
        }
        v
    }
}
