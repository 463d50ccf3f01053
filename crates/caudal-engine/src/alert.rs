//! Alerting: evaluates `[alerts]` rules on their schedule and sends their
//! notifications to `[notifiers]`.
//!
//! Promises:
//! - The rules of an instance (pending, firing once, resolving once,
//!   silences) are [`caudal_core::alert::step`]'s; this module reads the
//!   values and keeps the results: each evaluation's state changes, history
//!   and notifications are written in one transaction, against the store's
//!   clock.
//! - A notification is sent until its webhook answers 2xx, with backoff
//!   (1 s doubling to 5 min) and the same `Idempotency-Key` every time, so
//!   a webhook outage delays notifications but loses none; a receiver that
//!   keys on it sees each one once.
//! - Values: an aggregate alert reads each group's figure in the latest
//!   closed window (or the open one), from this process's memory when it
//!   counts the aggregate, else from the store; a group with windows in
//!   the recent past but none in that window reads 0 for counts and sums.
//!   A check reads caudal's own figures per pipeline (see
//!   [`caudal_core::config::Check`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use caudal_connectors::sinks::partner::{PartnerClient, SendError};
use caudal_core::alert::{self, AlertState, Instance, Notify};
use caudal_core::config::{AlertConfig, AlertWindow, Check, Config, MetricKind, NotifyFormat};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{AlertChange, NewNotification, Notification, RunOutcome, Store};
use jiff::Timestamp;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::Pipeline;
use crate::aggregate::{Spec, WindowView};

/// How often due rules and notifications are looked for.
const TICK: Duration = Duration::from_secs(1);
/// Notifications sent per tick at most.
const SEND_BATCH: i64 = 50;
/// The longest wait between two tries of a notification.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Runs looked at to count failures in a row.
const RUNS_LOOKED_AT: u32 = 50;

/// Evaluates the rules and sends notifications until `shutdown`.
pub async fn serve(
    config: Arc<Config>,
    store: Store,
    pipelines: Vec<Pipeline>,
    shutdown: CancellationToken,
) {
    if config.alerts.is_empty() {
        return;
    }
    let pipelines: BTreeMap<String, Pipeline> = pipelines
        .into_iter()
        .map(|p| (p.name().to_string(), p))
        .collect();
    // Sending has its own loop: a slow webhook never delays evaluations.
    let sender = {
        let (config, store, stop) = (config.clone(), store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let notifiers = Notifiers::default();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = send_due(&config, &store, &notifiers).await {
                    tracing::warn!(error = %e.report(), "cannot send alert notifications; trying again in a second");
                }
            }
        })
    };
    let _sender = crate::pipeline::AbortOnDrop(sender);
    let mut last: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (name, rule) in &config.alerts {
            let due = last
                .get(name)
                .is_none_or(|t| t.elapsed() >= rule.every.as_std());
            if !due {
                continue;
            }
            last.insert(name.clone(), tokio::time::Instant::now());
            if let Err(e) = evaluate(&config, &store, &pipelines, name, rule).await {
                tracing::warn!(alert = %name, error = %e.report(), "cannot evaluate the alert; trying again at its next evaluation");
            }
        }
    }
}

/// One instance's labels and value.
type Values = BTreeMap<String, Option<f64>>;

/// Evaluates alert `name` once.
pub async fn evaluate(
    config: &Config,
    store: &Store,
    pipelines: &BTreeMap<String, Pipeline>,
    name: &str,
    rule: &AlertConfig,
) -> Result<()> {
    let values = match (&rule.aggregate, rule.check) {
        (Some(agg), _) => aggregate_values(config, store, pipelines, agg, rule).await?,
        (None, Some(check)) => check_values(config, store, pipelines, rule, check).await?,
        (None, None) => return Ok(()),
    };
    let now = store.now().await?;
    let known = store.alert_instances(Some(name)).await?;
    let mut instances: BTreeMap<String, Instance> = known
        .iter()
        .map(|row| {
            let instance = Instance {
                state: AlertState::parse(&row.state).unwrap_or(AlertState::Inactive),
                since: Some(row.since),
                fired_at: row.fired_at,
                notified: row.notified,
            };
            (row.labels.clone(), instance)
        })
        .collect();
    let silences: Vec<Option<Map<String, Value>>> = store
        .active_silences()
        .await?
        .into_iter()
        .filter(|s| s.alert == name)
        .map(|s| s.labels.and_then(|l| serde_json::from_str(&l).ok()))
        .collect();
    let labels: BTreeSet<String> = values.keys().chain(instances.keys()).cloned().collect();
    let mut changes = Vec::new();
    let mut notifications = Vec::new();
    let mut firing = 0u64;
    for label in labels {
        let value = values.get(&label).copied().flatten();
        let prev = instances.remove(&label).unwrap_or_default();
        let label_map: Map<String, Value> = serde_json::from_str(&label).unwrap_or_default();
        let silenced = silences.iter().any(|s| match s {
            None => true,
            Some(want) => want.iter().all(|(k, v)| label_map.get(k) == Some(v)),
        });
        let holds = alert::holds(value, rule.above, rule.below);
        let step = alert::step(&prev, holds, now, rule.hold.as_std(), silenced);
        if step.next.state == AlertState::Firing {
            firing += 1;
        }
        if let Some(kind) = step.notify {
            let episode = step.episode.unwrap_or(now);
            for notifier in &rule.notify {
                let key = format!(
                    "{name}|{label}|{}|{}|{notifier}",
                    episode.as_microsecond(),
                    kind.as_str()
                );
                let payload = json!({
                    "id": key,
                    "alert": name,
                    "status": kind.as_str(),
                    "severity": rule.severity.as_str(),
                    "labels": label_map,
                    "value": value,
                    "threshold": threshold(rule),
                    "for": rule.hold.to_string(),
                    "watching": watching(rule),
                    "fired_at": episode.to_string(),
                    "at": now.to_string(),
                    "summary": rule.summary,
                });
                notifications.push(NewNotification {
                    key,
                    alert: name.to_string(),
                    notifier: notifier.clone(),
                    instance: label.clone(),
                    kind: kind.as_str().to_string(),
                    payload: payload.to_string(),
                });
            }
            if kind == Notify::Firing {
                tracing::warn!(alert = %name, labels = %label, value, severity = rule.severity.as_str(), "alert firing");
            } else {
                tracing::info!(alert = %name, labels = %label, "alert resolved");
            }
        }
        let changed = step.next != prev || step.event.is_some();
        let value_moved = step.next.state != AlertState::Inactive;
        if changed || value_moved {
            let instance =
                (step.next.state != AlertState::Inactive).then(|| caudal_store::InstanceState {
                    state: step.next.state.as_str().to_string(),
                    since: step.next.since.unwrap_or(now),
                    fired_at: step.next.fired_at,
                    notified: step.next.notified,
                    value,
                });
            changes.push(AlertChange {
                labels: label,
                instance,
                event: step.event.map(|e| (e.as_str().to_string(), value)),
            });
        }
    }
    store
        .record_alert(name, now, &changes, &notifications)
        .await?;
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("caudal_alerts_firing", "alert" => name.to_string(), "severity" => rule.severity.as_str())
        .set(firing as f64);
    Ok(())
}

fn threshold(rule: &AlertConfig) -> Value {
    match (rule.above, rule.below) {
        (Some(a), _) => json!({ "above": a }),
        (None, Some(b)) => json!({ "below": b }),
        (None, None) => Value::Null,
    }
}

/// What the rule watches, in words.
fn watching(rule: &AlertConfig) -> String {
    match (&rule.aggregate, rule.check) {
        (Some(a), _) => format!("{a}.{}", rule.metric.as_deref().unwrap_or("rows")),
        (None, Some(c)) => c.as_str().to_string(),
        (None, None) => String::new(),
    }
}

/// Each group's value of an aggregate alert.
async fn aggregate_values(
    config: &Config,
    store: &Store,
    pipelines: &BTreeMap<String, Pipeline>,
    aggregate: &str,
    rule: &AlertConfig,
) -> Result<Values> {
    let spec = Spec::build(aggregate, config)?;
    let metric = rule.metric.as_deref().unwrap_or("rows");
    let head = store.aggregate_head(aggregate).await?;
    let live = pipelines.get(&spec.pipeline).and_then(|p| {
        p.aggregates()
            .iter()
            .find(|l| l.spec().name == aggregate)
            .cloned()
    });
    let Some(watermark) = live
        .as_ref()
        .and_then(|l| l.watermark())
        .or(head.and_then(|h| h.watermark))
    else {
        return Ok(Values::new());
    };
    // The latest windows: those the latest closed one and the open ones.
    let reach = spec.window_size() + spec.lateness + 3 * spec.hop();
    let from = watermark.saturating_sub(reach);
    let mut windows: BTreeMap<(i64, String), WindowView> = store
        .live_windows(aggregate, from, i64::MAX)
        .await?
        .iter()
        .map(|r| ((r.start, r.group.clone()), WindowView::of_row(&spec, r)))
        .collect();
    if let Some(live) = &live {
        for v in live.views(from, i64::MAX) {
            windows.insert((v.start_us, v.group_key.clone()), v);
        }
    }
    let wanted = match rule.window {
        AlertWindow::Closed => windows
            .values()
            .filter(|w| w.closed)
            .map(|w| w.start_us)
            .max(),
        AlertWindow::Open => windows
            .values()
            .filter(|w| !w.closed)
            .map(|w| w.start_us)
            .max(),
    };
    let Some(start) = wanted else {
        return Ok(Values::new());
    };
    let zero_when_absent = metric == "rows"
        || spec.metrics.iter().any(|(n, m)| {
            n == metric
                && matches!(
                    m.kind,
                    MetricKind::Count
                        | MetricKind::CountField
                        | MetricKind::Sum
                        | MetricKind::CountDistinct
                )
        });
    let mut out = Values::new();
    for ((s, _), w) in &windows {
        let label = Value::Object(w.group.clone()).to_string();
        if *s == start {
            let value = if metric == "rows" {
                #[allow(clippy::cast_precision_loss)]
                Some(w.rows as f64)
            } else {
                w.metrics.get(metric).and_then(Value::as_f64)
            };
            out.insert(label, value);
        } else if zero_when_absent {
            out.entry(label).or_insert(Some(0.0));
        } else {
            out.entry(label).or_insert(None);
        }
    }
    Ok(out)
}

/// Each pipeline's value of a check.
async fn check_values(
    config: &Config,
    store: &Store,
    pipelines: &BTreeMap<String, Pipeline>,
    rule: &AlertConfig,
    check: Check,
) -> Result<Values> {
    let names: Vec<&String> = match &rule.pipeline {
        Some(p) => vec![p],
        None => config.pipelines.keys().collect(),
    };
    let now = store.now().await?;
    let mut out = Values::new();
    for name in names {
        let label = json!({ "pipeline": name }).to_string();
        let value = check_value(config, store, pipelines.get(name), name, check, now).await?;
        out.insert(label, value);
    }
    Ok(out)
}

#[allow(clippy::cast_precision_loss)]
async fn check_value(
    config: &Config,
    store: &Store,
    running: Option<&Pipeline>,
    name: &str,
    check: Check,
    now: Timestamp,
) -> Result<Option<f64>> {
    Ok(match check {
        Check::DeadLetters => Some(store.pending_dead_letters(name).await? as f64),
        Check::FailingRuns => {
            let runs = store.runs(Some(name), RUNS_LOOKED_AT).await?;
            let failed = runs
                .iter()
                .filter(|r| r.outcome != RunOutcome::Running)
                .take_while(|r| r.outcome == RunOutcome::Failed)
                .count();
            Some(failed as f64)
        }
        Check::DeliveryLag => {
            let replication = running.and_then(Pipeline::live_replication);
            match replication.and_then(|r| r.lag_seconds) {
                Some(lag) => Some(lag),
                None => store
                    .checkpoint(name)
                    .await?
                    .map(|c| now.duration_since(c.updated_at).as_secs_f64().max(0.0)),
            }
        }
        Check::BufferFill => {
            let status = crate::status::pipeline_status(config, store, name, running).await?;
            let max = config
                .pipelines
                .get(name)
                .map(|p| p.buffer.max_bytes.0)
                .unwrap_or(caudal_buffer::DEFAULT_MAX_BYTES);
            status
                .buffer_disk_bytes
                .map(|b| b as f64 / (max.max(1)) as f64)
        }
        Check::CircuitOpen => {
            let status = crate::status::pipeline_status(config, store, name, running).await?;
            Some(if status.circuit.as_deref() == Some("open") {
                1.0
            } else {
                0.0
            })
        }
    })
}

/// The notifiers' HTTP clients, each with its `auth` and `tls` (one per
/// notifier, so an OAuth2 token is fetched once and reused), made on first
/// use. One whose credentials cannot be read is not kept: its
/// notifications fail with the reason and are tried again, reading them
/// again, until they can be.
#[derive(Debug, Default)]
pub struct Notifiers(std::sync::Mutex<BTreeMap<String, Arc<PartnerClient>>>);

impl Notifiers {
    /// The client of notifier `name` as `config` sets it up.
    fn client(&self, config: &Config, name: &str) -> Result<Arc<PartnerClient>> {
        let mut clients = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let n = config.notifiers.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("notifier {name:?} is no longer in the configuration"),
            )
        })?;
        let builder = reqwest::Client::builder()
            .timeout(n.timeout.as_std())
            .user_agent(concat!("caudal/", env!("CARGO_PKG_VERSION")));
        let client = PartnerClient::new(builder, n.auth.as_ref(), n.tls.as_ref())
            .map_err(|why| Error::new(ErrorKind::Config, format!("notifier {name:?}: {why}")))?;
        let client = Arc::new(client);
        clients.insert(name.to_string(), client.clone());
        Ok(client)
    }
}

/// Sends the notifications that are due.
pub async fn send_due(config: &Config, store: &Store, notifiers: &Notifiers) -> Result<()> {
    for n in store.due_notifications(SEND_BATCH).await? {
        match send(config, notifiers, &n).await {
            Ok(()) => {
                store.notification_sent(n.id).await?;
                metrics::counter!("caudal_alert_notifications_total", "alert" => n.alert.clone(), "outcome" => "sent")
                    .increment(1);
            }
            Err(e) => {
                let attempts = u32::try_from(n.attempts.max(0)).unwrap_or(u32::MAX);
                let backoff = Duration::from_secs(1u64 << attempts.min(9)).min(MAX_BACKOFF);
                tracing::warn!(alert = %n.alert, notifier = %n.notifier, attempt = n.attempts + 1, retry_in = ?backoff, error = %e.report(), "an alert notification failed; it is sent again");
                store
                    .notification_failed(n.id, &e.report(), backoff)
                    .await?;
                metrics::counter!("caudal_alert_notifications_total", "alert" => n.alert.clone(), "outcome" => "failed")
                    .increment(1);
            }
        }
    }
    Ok(())
}

async fn send(config: &Config, notifiers: &Notifiers, n: &Notification) -> Result<()> {
    let client = notifiers.client(config, &n.notifier)?;
    let notifier = config.notifiers.get(&n.notifier).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "notifier {:?} is no longer in the configuration",
                n.notifier
            ),
        )
    })?;
    let payload: Value = serde_json::from_str(&n.payload)
        .map_err(|e| Error::with_source(ErrorKind::Internal, "an unreadable notification", e))?;
    let body = match notifier.format {
        NotifyFormat::Json => payload,
        NotifyFormat::Slack => json!({ "text": slack_text(&payload) }),
    };
    let url = reqwest::Url::parse(notifier.url.expose()).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("notifier {:?}: the url is not a URL: {e}", n.notifier),
        )
    })?;
    let mut headers = reqwest::header::HeaderMap::new();
    let header = |k: &str, v: &str| {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes()).ok()?;
        let mut value = reqwest::header::HeaderValue::from_str(v).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    };
    for (k, v) in [
        ("Idempotency-Key", n.key.as_str()),
        ("Content-Type", "application/json"),
    ]
    .into_iter()
    .chain(
        notifier
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose())),
    ) {
        let (name, value) = header(k, v).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "notifier {:?}: header {k:?} is not a valid header",
                    n.notifier
                ),
            )
        })?;
        headers.insert(name, value);
    }
    let response = client
        .send(
            &reqwest::Method::POST,
            &url,
            headers,
            body.to_string().into(),
        )
        .await
        .map_err(|e| match e {
            SendError::Auth(why) => Error::new(
                ErrorKind::Unavailable,
                format!("notifier {:?}: no credentials: {why}", n.notifier),
            ),
            SendError::Request(e) => Error::with_source(
                ErrorKind::Connect,
                format!("notifier {:?}: the request failed", n.notifier),
                e.without_url(),
            ),
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unavailable,
            format!("notifier {:?} answered {status}", n.notifier),
        ))
    }
}

/// A one-line message for chat webhooks.
fn slack_text(p: &Value) -> String {
    let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let labels: Vec<String> = p
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    let icon = if s("status") == "firing" {
        ":rotating_light:"
    } else {
        ":white_check_mark:"
    };
    let threshold = p
        .get("threshold")
        .and_then(Value::as_object)
        .and_then(|m| m.iter().next().map(|(k, v)| format!(" ({k} {v})")))
        .unwrap_or_default();
    let value = p
        .get("value")
        .filter(|v| !v.is_null())
        .map(|v| format!(" {}={v}", s("watching")))
        .unwrap_or_default();
    let summary = p
        .get("summary")
        .and_then(Value::as_str)
        .map(|t| format!(" — {t}"))
        .unwrap_or_default();
    format!(
        "{icon} [{}] {} {}: {}{value}{threshold}{summary}",
        s("severity"),
        s("alert"),
        s("status"),
        labels.join(" "),
    )
}
