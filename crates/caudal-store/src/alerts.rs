//! Alerts: instance states, their history, silences, and the outbox of
//! notifications.
//!
//! Promises:
//! - **Decided once, sent until accepted.** [`Store::record_alert`] writes
//!   an evaluation's state changes, history events and notifications in
//!   one transaction, so a notification exists exactly when the state
//!   change that called for it does. A notification's key is unique: the
//!   same episode's firing is never queued twice.
//! - The outbox keeps a notification until it is sent ([`Store::notification_sent`]);
//!   failures are counted with the last error and the time of the next try.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// An instance that is pending or firing.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertInstanceRow {
    pub alert: String,
    /// The group or pipeline, a JSON object.
    pub labels: String,
    /// `pending` or `firing`.
    pub state: String,
    pub since: Timestamp,
    pub fired_at: Option<Timestamp>,
    pub notified: bool,
    pub value: Option<f64>,
    pub updated_at: Timestamp,
}

/// What an evaluation changes for one instance.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertChange {
    pub labels: String,
    /// The new state; `None` when the instance became inactive.
    pub instance: Option<InstanceState>,
    /// A history event and the value that caused it.
    pub event: Option<(String, Option<f64>)>,
}

/// An instance's state to keep.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceState {
    /// `pending` or `firing`.
    pub state: String,
    pub since: Timestamp,
    pub fired_at: Option<Timestamp>,
    pub notified: bool,
    pub value: Option<f64>,
}

/// A notification to queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNotification {
    /// Unique per episode, kind and notifier.
    pub key: String,
    pub alert: String,
    pub notifier: String,
    /// The instance's labels: its notifications are sent in order.
    pub instance: String,
    pub kind: String,
    pub payload: String,
}

/// A queued notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub id: i64,
    pub key: String,
    pub alert: String,
    pub notifier: String,
    pub kind: String,
    pub payload: String,
    pub attempts: i64,
    pub sent_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
}

/// A history event.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    pub id: i64,
    pub alert: String,
    pub labels: String,
    pub event: String,
    pub value: Option<f64>,
    pub at: Timestamp,
}

/// A silence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Silence {
    pub id: i64,
    pub alert: String,
    /// Labels an instance must include, a JSON object; `None`: every
    /// instance of the alert.
    pub labels: Option<String>,
    pub until: Timestamp,
    pub reason: String,
    pub created_by: String,
    pub created_at: Timestamp,
}

type InstanceTuple = (
    String,
    String,
    String,
    i64,
    Option<i64>,
    i64,
    Option<f64>,
    i64,
);
type NotificationTuple = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<String>,
    i64,
);
type SilenceTuple = (i64, String, Option<String>, i64, String, String, i64);

fn notification(t: NotificationTuple) -> Result<Notification> {
    let (id, key, alert, notifier, kind, payload, attempts, sent, last_error, created) = t;
    Ok(Notification {
        id,
        key,
        alert,
        notifier,
        kind,
        payload,
        attempts,
        sent_at: sent
            .map(|s| clock::from_db(s, "alert_outbox.sent_at"))
            .transpose()?,
        last_error,
        created_at: clock::from_db(created, "alert_outbox.created_at")?,
    })
}

fn silence(t: SilenceTuple) -> Result<Silence> {
    let (id, alert, labels, until, reason, created_by, created) = t;
    Ok(Silence {
        id,
        alert,
        labels,
        until: clock::from_db(until, "alert_silences.until")?,
        reason,
        created_by,
        created_at: clock::from_db(created, "alert_silences.created_at")?,
    })
}

const NOTIFICATION_COLUMNS: &str =
    "id, key, alert, notifier, kind, payload, attempts, sent_at, last_error, created_at";

impl Store {
    /// The store's clock, now.
    pub async fn now(&self) -> Result<Timestamp> {
        let us: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar("SELECT now_us FROM clock")
                .fetch_one(pool)
                .await
        })
        .map_err(|e| store_error("reading the clock".into(), e))?;
        clock::from_db(us, "clock.now_us")
    }

    /// The pending and firing instances (of `alert`, or of every alert).
    pub async fn alert_instances(&self, alert: Option<&str>) -> Result<Vec<AlertInstanceRow>> {
        let rows: Vec<InstanceTuple> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT alert, labels, state, since, fired_at, notified, value, updated_at \
                 FROM alert_instances WHERE ($1 IS NULL OR alert = $1) ORDER BY alert, labels",
            )
            .bind(alert)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("reading alert instances".into(), e))?;
        rows.into_iter()
            .map(
                |(alert, labels, state, since, fired, notified, value, updated)| {
                    Ok(AlertInstanceRow {
                        alert,
                        labels,
                        state,
                        since: clock::from_db(since, "alert_instances.since")?,
                        fired_at: fired
                            .map(|f| clock::from_db(f, "alert_instances.fired_at"))
                            .transpose()?,
                        notified: notified != 0,
                        value,
                        updated_at: clock::from_db(updated, "alert_instances.updated_at")?,
                    })
                },
            )
            .collect()
    }

    /// Writes one evaluation of `alert` made at `at`: state changes,
    /// history events and notifications, in one transaction. A
    /// notification whose key is queued already is not queued again.
    pub async fn record_alert(
        &self,
        alert: &str,
        at: Timestamp,
        changes: &[AlertChange],
        notifications: &[NewNotification],
    ) -> Result<()> {
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for c in changes {
                    match &c.instance {
                        None => {
                            sqlx::query("DELETE FROM alert_instances WHERE alert = $1 AND labels = $2")
                                .bind(alert)
                                .bind(&c.labels)
                                .execute(&mut *tx)
                                .await?;
                        }
                        Some(InstanceState {
                            state,
                            since,
                            fired_at,
                            notified,
                            value,
                        }) => {
                            sqlx::query(
                                "INSERT INTO alert_instances \
                                 (alert, labels, state, since, fired_at, notified, value, updated_at) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT now_us FROM clock)) \
                                 ON CONFLICT (alert, labels) DO UPDATE SET state = excluded.state, \
                                 since = excluded.since, fired_at = excluded.fired_at, \
                                 notified = excluded.notified, value = excluded.value, \
                                 updated_at = excluded.updated_at",
                            )
                            .bind(alert)
                            .bind(&c.labels)
                            .bind(state)
                            .bind(clock::to_db(*since))
                            .bind(fired_at.map(clock::to_db))
                            .bind(i64::from(*notified))
                            .bind(*value)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                    if let Some((event, value)) = &c.event {
                        sqlx::query(
                            "INSERT INTO alert_events (alert, labels, event, value, at) \
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(alert)
                        .bind(&c.labels)
                        .bind(event)
                        .bind(*value)
                        .bind(clock::to_db(at))
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                for n in notifications {
                    sqlx::query(
                        "INSERT INTO alert_outbox \
                         (key, alert, notifier, instance, kind, payload, attempts, next_at, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 0, (SELECT now_us FROM clock), (SELECT now_us FROM clock)) \
                         ON CONFLICT (key) DO NOTHING",
                    )
                    .bind(&n.key)
                    .bind(&n.alert)
                    .bind(&n.notifier)
                    .bind(&n.instance)
                    .bind(&n.kind)
                    .bind(&n.payload)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("recording alert {alert}"), e))
    }

    /// History events, newest first (of `alert`, or all), at most `limit`.
    pub async fn alert_events(&self, alert: Option<&str>, limit: i64) -> Result<Vec<AlertEvent>> {
        let rows: Vec<(i64, String, String, String, Option<f64>, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, alert, labels, event, value, at FROM alert_events \
                 WHERE ($1 IS NULL OR alert = $1) ORDER BY id DESC LIMIT $2",
            )
            .bind(alert)
            .bind(limit)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("reading alert history".into(), e))?;
        rows.into_iter()
            .map(|(id, alert, labels, event, value, at)| {
                Ok(AlertEvent {
                    id,
                    alert,
                    labels,
                    event,
                    value,
                    at: clock::from_db(at, "alert_events.at")?,
                })
            })
            .collect()
    }

    /// Silences `alert` (the instances whose labels include `labels`, or
    /// all) for `duration`; returns the silence.
    pub async fn add_silence(
        &self,
        alert: &str,
        labels: Option<&str>,
        duration: std::time::Duration,
        reason: &str,
        created_by: &str,
    ) -> Result<Silence> {
        let row: SilenceTuple = with_pool!(self, |pool| {
            sqlx::query_as(
                "INSERT INTO alert_silences (alert, labels, until, reason, created_by, created_at) \
                 VALUES ($1, $2, (SELECT now_us FROM clock) + $3, $4, $5, (SELECT now_us FROM clock)) \
                 RETURNING id, alert, labels, until, reason, created_by, created_at",
            )
            .bind(alert)
            .bind(labels)
            .bind(clock::duration_to_db(duration))
            .bind(reason)
            .bind(created_by)
            .fetch_one(pool)
            .await
        })
        .map_err(|e| store_error(format!("silencing alert {alert}"), e))?;
        silence(row)
    }

    /// Ends silence `id` now; false when there is no such silence.
    pub async fn end_silence(&self, id: i64) -> Result<bool> {
        let n = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE alert_silences SET until = (SELECT now_us FROM clock) \
                 WHERE id = $1 AND until > (SELECT now_us FROM clock)",
            )
            .bind(id)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })
        .map_err(|e| store_error(format!("ending silence {id}"), e))?;
        Ok(n > 0)
    }

    /// Silences in force now.
    pub async fn active_silences(&self) -> Result<Vec<Silence>> {
        let rows: Vec<SilenceTuple> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, alert, labels, until, reason, created_by, created_at FROM alert_silences \
                 WHERE until > (SELECT now_us FROM clock) ORDER BY id",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("reading silences".into(), e))?;
        rows.into_iter().map(silence).collect()
    }

    /// Notifications due to be sent now, oldest first: one waits while
    /// an older one of its instance and notifier is unsent (a resolution
    /// never overtakes its firing).
    pub async fn due_notifications(&self, limit: i64) -> Result<Vec<Notification>> {
        let rows: Vec<NotificationTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {NOTIFICATION_COLUMNS} FROM alert_outbox n \
                 WHERE n.sent_at IS NULL AND n.next_at <= (SELECT now_us FROM clock) \
                 AND NOT EXISTS (SELECT 1 FROM alert_outbox o WHERE o.sent_at IS NULL \
                 AND o.id < n.id AND o.alert = n.alert AND o.notifier = n.notifier \
                 AND o.instance = n.instance) \
                 ORDER BY n.id LIMIT $1"
            )))
            .bind(limit)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("reading due notifications".into(), e))?;
        rows.into_iter().map(notification).collect()
    }

    /// The latest notifications (of `alert`, or all), newest first.
    pub async fn notifications(
        &self,
        alert: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Notification>> {
        let rows: Vec<NotificationTuple> = with_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {NOTIFICATION_COLUMNS} FROM alert_outbox \
                 WHERE ($1 IS NULL OR alert = $1) ORDER BY id DESC LIMIT $2"
            )))
            .bind(alert)
            .bind(limit)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("reading notifications".into(), e))?;
        rows.into_iter().map(notification).collect()
    }

    /// Notification `id` was accepted by its webhook.
    pub async fn notification_sent(&self, id: i64) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE alert_outbox SET sent_at = (SELECT now_us FROM clock), \
                 attempts = attempts + 1 WHERE id = $1",
            )
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| store_error(format!("marking notification {id} sent"), e))
    }

    /// Notification `id` failed with `error`; tried again after `retry_in`.
    pub async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: std::time::Duration,
    ) -> Result<()> {
        with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2, \
                 next_at = (SELECT now_us FROM clock) + $3 WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(clock::duration_to_db(retry_in))
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| store_error(format!("recording a failed notification {id}"), e))
    }
}
