//! The alerts' API: rules with their pending and firing instances and the
//! silences in force (`/api/v1/alerts`), the history of state changes,
//! the notifications and whether they were sent, and silencing (operators).
//!
//! Promises:
//! - Everything comes from the state store: any process serving the API
//!   shows the same alerts.
//! - A silence is recorded with the token that made it; a bad body is 400
//!   naming the field, an unknown alert or silence 404.

use std::collections::BTreeMap;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse as _;
use caudal_core::alert::AlertState;
use caudal_core::units::Duration;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::{Api, ApiError, ApiResult, Caller, bad_request, ok};

/// History entries and notifications per answer, by default and at most.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// A pending or firing instance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstanceInfo {
    /// The group (aggregate alerts) or `{"pipeline": …}` (checks).
    #[schema(value_type = Object)]
    pub labels: Map<String, Value>,
    pub state: AlertState,
    /// Since when the condition holds.
    pub since: String,
    pub fired_at: Option<String>,
    pub value: Option<f64>,
    /// Whether its firing was notified.
    pub notified: bool,
    /// Whether a silence covers it now.
    pub silenced: bool,
}

/// A silence in force.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SilenceInfo {
    pub id: i64,
    pub alert: String,
    /// Labels an instance must have to be covered; none: all.
    #[schema(value_type = Option<Object>)]
    pub labels: Option<Map<String, Value>>,
    pub until: String,
    pub reason: String,
    pub created_by: String,
    pub created_at: String,
}

/// A rule and its instances.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AlertInfo {
    pub name: String,
    /// `aggregate.metric`, or the check.
    pub watching: String,
    pub severity: String,
    pub above: Option<f64>,
    pub below: Option<f64>,
    /// How long the condition must hold.
    #[serde(rename = "for")]
    pub hold: String,
    pub every: String,
    pub notify: Vec<String>,
    pub summary: Option<String>,
    /// Pending and firing instances (inactive ones are not listed).
    pub instances: Vec<InstanceInfo>,
    pub silences: Vec<SilenceInfo>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AlertList {
    pub alerts: Vec<AlertInfo>,
}

/// A change of an instance's state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventInfo {
    pub id: i64,
    pub alert: String,
    #[schema(value_type = Object)]
    pub labels: Map<String, Value>,
    /// `pending`, `firing`, `resolved` or `cleared`.
    pub event: String,
    pub value: Option<f64>,
    pub at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryPage {
    /// Newest first.
    pub events: Vec<EventInfo>,
}

/// A notification and how its sending went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationInfo {
    pub id: i64,
    /// Sent as `Idempotency-Key`: one per episode, kind and notifier.
    pub key: String,
    pub alert: String,
    pub notifier: String,
    /// `firing` or `resolved`.
    pub kind: String,
    pub attempts: i64,
    pub sent_at: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationPage {
    /// Newest first.
    pub notifications: Vec<NotificationInfo>,
}

/// A silence ended.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SilenceEnded {
    pub silence: i64,
    pub ended: bool,
}

/// A silence to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceBody {
    /// How long, e.g. `"2h"`.
    #[serde(rename = "for")]
    #[schema(value_type = String, pattern = "^[1-9][0-9]{0,8}(ms|s|m|h|d)([0-9]{1,9}(ms|s|m|h|d))*$")]
    pub duration: Duration,
    /// Only the instances with these labels (e.g. `{"provider_id": 7}`);
    /// default all of the alert's.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub labels: Option<Map<String, Value>>,
    /// Why, for the record.
    #[serde(default)]
    pub reason: Option<String>,
}

fn labels(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

fn covers(silence: &SilenceInfo, labels: &Map<String, Value>) -> bool {
    silence
        .labels
        .as_ref()
        .is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn internal(e: &caudal_core::Error) -> ApiError {
    ApiError::internal(e.report())
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", responses((status = 200, description = "every rule with its pending and firing instances and silences", body = AlertList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn alerts(State(api): State<Api>) -> ApiResult {
    let store = api.store();
    let instances = store
        .alert_instances(None)
        .await
        .map_err(|e| internal(&e))?;
    let silences = store.active_silences().await.map_err(|e| internal(&e))?;
    let mut by_alert: BTreeMap<&str, Vec<&caudal_store::AlertInstanceRow>> = BTreeMap::new();
    for i in &instances {
        by_alert.entry(i.alert.as_str()).or_default().push(i);
    }
    let mut out = Vec::new();
    for (name, rule) in &api.config().alerts {
        let silences: Vec<SilenceInfo> = silences
            .iter()
            .filter(|s| s.alert == *name)
            .map(silence_info)
            .collect();
        let instances = by_alert
            .get(name.as_str())
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        let labels = labels(&r.labels);
                        InstanceInfo {
                            silenced: silences.iter().any(|s| covers(s, &labels)),
                            labels,
                            state: AlertState::parse(&r.state).unwrap_or(AlertState::Inactive),
                            since: r.since.to_string(),
                            fired_at: r.fired_at.map(|t| t.to_string()),
                            value: r.value,
                            notified: r.notified,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let watching = match (&rule.aggregate, rule.check) {
            (Some(a), _) => format!("{a}.{}", rule.metric.as_deref().unwrap_or("rows")),
            (None, Some(c)) => c.as_str().to_string(),
            (None, None) => String::new(),
        };
        out.push(AlertInfo {
            name: name.clone(),
            watching,
            severity: rule.severity.as_str().to_string(),
            above: rule.above,
            below: rule.below,
            hold: rule.hold.to_string(),
            every: rule.every.to_string(),
            notify: rule.notify.clone(),
            summary: rule.summary.clone(),
            instances,
            silences,
        });
    }
    ok(&AlertList { alerts: out })
}

fn silence_info(s: &caudal_store::Silence) -> SilenceInfo {
    SilenceInfo {
        id: s.id,
        alert: s.alert.clone(),
        labels: s.labels.as_deref().map(labels),
        until: s.until.to_string(),
        reason: s.reason.clone(),
        created_by: s.created_by.clone(),
        created_at: s.created_at.to_string(),
    }
}

/// `?alert=NAME&limit=N`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// Only this alert's.
    alert: Option<String>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

fn checked(api: &Api, q: &HistoryQuery) -> Result<i64, ApiError> {
    if let Some(a) = &q.alert
        && !api.config().alerts.contains_key(a)
    {
        return Err(ApiError::not_found(format!("no alert {a:?}")));
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad_request(format!(
            "parameter limit: {limit} is not from 1 to {MAX_LIMIT}"
        )));
    }
    Ok(limit)
}

#[utoipa::path(get, path = "/api/v1/alerts/history", tag = "alerts", params(HistoryQuery), responses((status = 200, description = "state changes, newest first", body = HistoryPage), (status = 400, description = "a bad parameter, named", body = crate::openapi::ErrorBody), (status = 404, description = "no such alert", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn history(State(api): State<Api>, Query(q): Query<HistoryQuery>) -> ApiResult {
    let limit = checked(&api, &q)?;
    let events = api
        .store()
        .alert_events(q.alert.as_deref(), limit)
        .await
        .map_err(|e| internal(&e))?;
    ok(&HistoryPage {
        events: events
            .into_iter()
            .map(|e| EventInfo {
                id: e.id,
                alert: e.alert,
                labels: labels(&e.labels),
                event: e.event,
                value: e.value,
                at: e.at.to_string(),
            })
            .collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/alerts/notifications", tag = "alerts", params(HistoryQuery), responses((status = 200, description = "notifications, newest first, with attempts and the last error", body = NotificationPage), (status = 400, description = "a bad parameter, named", body = crate::openapi::ErrorBody), (status = 404, description = "no such alert", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn notifications(
    State(api): State<Api>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    let limit = checked(&api, &q)?;
    let list = api
        .store()
        .notifications(q.alert.as_deref(), limit)
        .await
        .map_err(|e| internal(&e))?;
    ok(&NotificationPage {
        notifications: list
            .into_iter()
            .map(|n| NotificationInfo {
                id: n.id,
                key: n.key,
                alert: n.alert,
                notifier: n.notifier,
                kind: n.kind,
                attempts: n.attempts,
                sent_at: n.sent_at.map(|t| t.to_string()),
                last_error: n.last_error,
                created_at: n.created_at.to_string(),
            })
            .collect(),
    })
}

#[utoipa::path(post, path = "/api/v1/alerts/{name}/silence", tag = "alerts", params(("name" = String, Path, description = "the alert")), request_body = SilenceBody, responses((status = 201, description = "silenced: no notification for the instances it covers until it ends", body = SilenceInfo), (status = 400, description = "a bad body, the field named", body = crate::openapi::ErrorBody), (status = 404, description = "no such alert", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn silence(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    if !api.config().alerts.contains_key(&name) {
        return Err(ApiError::not_found(format!("no alert {name:?}")));
    }
    let body: SilenceBody = {
        let de = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            bad_request(format!(
                "body{}: {}",
                match e.path().to_string().as_str() {
                    "." => String::new(),
                    p => format!(" field {p}"),
                },
                e.inner()
            ))
        })?
    };
    if body.duration.0.is_zero() {
        return Err(bad_request(
            "body field for: must be greater than 0s".into(),
        ));
    }
    let labels = body
        .labels
        .as_ref()
        .map(|l| Value::Object(l.clone()).to_string());
    let s = api
        .store()
        .add_silence(
            &name,
            labels.as_deref(),
            body.duration.as_std(),
            body.reason.as_deref().unwrap_or(""),
            &caller,
        )
        .await
        .map_err(|e| internal(&e))?;
    let info = silence_info(&s);
    let text = serde_json::to_string(&info).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/alerts/silences/{id}", tag = "alerts", params(("id" = i64, Path, description = "the silence")), responses((status = 200, description = "ended", body = SilenceEnded), (status = 404, description = "no such silence in force", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn unsilence(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let id: i64 = id
        .parse()
        .map_err(|_| bad_request(format!("path id: {id:?} is not a silence id")))?;
    if api
        .store()
        .end_silence(id)
        .await
        .map_err(|e| internal(&e))?
    {
        ok(&SilenceEnded {
            silence: id,
            ended: true,
        })
    } else {
        Err(ApiError::not_found(format!("no silence {id} in force")))
    }
}
