//! The live aggregates' API: `/api/v1/live` lists them,
//! `/api/v1/live/{name}` serves their windows (current and recent,
//! filtered by group and time), `/api/v1/live/{name}/stream` streams window
//! updates as Server-Sent Events.
//!
//! Promises:
//! - **Fresh.** Windows of an aggregate counted in this process are served
//!   from its memory as soon as a batch is counted; the others come from
//!   the state store (committed within a fraction of a second), so a
//!   process serving the API alone sees the same figures, a moment later.
//! - Bad parameters are 400 with the parameter named (a group field the
//!   aggregate does not have, a time that is not one); an unknown
//!   aggregate is 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse as _;
use axum::response::sse::{Event, KeepAlive, Sse};
use caudal_engine::aggregate::{Live, Spec, WindowView};
use serde::Serialize;
use serde_json::Value;

use crate::api::{Api, ApiError, ApiResult, bad_request, ok};

/// Windows per answer by default, and at most.
const DEFAULT_LIMIT: usize = 10_000;
const MAX_LIMIT: usize = 100_000;

/// An aggregate, as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AggregateInfo {
    pub name: String,
    pub pipeline: String,
    pub group_by: Vec<String>,
    /// The event-time field, or `commit_time`.
    pub time: String,
    /// Window size and hop, e.g. `1m`.
    pub window: String,
    pub every: String,
    pub tz: String,
    /// Metric name → its definition, e.g. `sum(amount)`.
    pub metrics: BTreeMap<String, String>,
    /// The latest event time counted (RFC 3339), if any.
    pub watermark: Option<String>,
    /// Changes not counted because their window had closed.
    pub late: i64,
    /// Rows not counted: a field missing or no event time.
    pub skipped: i64,
    /// When the store last saved it.
    pub updated_at: Option<String>,
    /// Whether this process counts it (fresh figures, SSE available).
    pub counted_here: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AggregateList {
    pub aggregates: Vec<AggregateInfo>,
}

/// The windows of an aggregate.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LiveWindows {
    pub aggregate: String,
    pub group_by: Vec<String>,
    pub watermark: Option<String>,
    pub windows: Vec<WindowView>,
    /// More windows matched than `limit`: narrow `from`/`to`.
    pub truncated: bool,
}

fn spec(api: &Api, name: &str) -> Result<Spec, ApiError> {
    if !api.config().aggregates.contains_key(name) {
        return Err(ApiError::not_found(format!("no aggregate {name:?}")));
    }
    Spec::build(name, api.config()).map_err(|e| ApiError::internal(e.report()))
}

/// The aggregate counted in this process, if it is.
fn live(api: &Api, name: &str) -> Option<Arc<Live>> {
    let agg = api.config().aggregates.get(name)?;
    api.pipeline(&agg.pipeline)?
        .aggregates()
        .iter()
        .find(|l| l.spec().name == name)
        .cloned()
}

fn format_time(us: i64) -> String {
    caudal_engine::aggregate::window::format_time(us)
}

#[utoipa::path(get, path = "/api/v1/live", tag = "live", responses((status = 200, description = "the live aggregates", body = AggregateList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn aggregates(State(api): State<Api>) -> ApiResult {
    let mut out = Vec::new();
    for (name, agg) in &api.config().aggregates {
        let head = api
            .store()
            .aggregate_head(name)
            .await
            .map_err(|e| ApiError::internal(e.report()))?;
        out.push(AggregateInfo {
            name: name.clone(),
            pipeline: agg.pipeline.clone(),
            group_by: agg.group_by.clone(),
            time: agg.time.clone().unwrap_or_else(|| "commit_time".into()),
            window: agg.window.to_string(),
            every: agg.every.unwrap_or(agg.window).to_string(),
            tz: agg.tz.clone().unwrap_or_else(|| "UTC".into()),
            metrics: agg.metrics.clone(),
            watermark: head.as_ref().and_then(|h| h.watermark).map(format_time),
            late: head.as_ref().map_or(0, |h| h.late),
            skipped: head.as_ref().map_or(0, |h| h.skipped),
            updated_at: head.map(|h| h.updated_at.to_string()),
            counted_here: live(&api, name).is_some(),
        });
    }
    ok(&AggregateList { aggregates: out })
}

/// The parsed query of a live request.
struct LiveParams {
    from: i64,
    to: i64,
    closed: Option<bool>,
    limit: usize,
    /// Group field → wanted value (as text).
    groups: Vec<(String, String)>,
}

fn parse_time(name: &str, text: &str, tz: &jiff::tz::TimeZone) -> Result<i64, ApiError> {
    caudal_engine::aggregate::window::parse_time(&Value::String(text.to_string()), tz).ok_or_else(
        || {
            bad_request(format!(
                "parameter {name}: {text:?} is not a time (RFC 3339, e.g. 2025-05-14T12:00:00Z, or a date)"
            ))
        },
    )
}

fn parse_params(spec: &Spec, pairs: &[(String, String)]) -> Result<LiveParams, ApiError> {
    let mut p = LiveParams {
        from: i64::MIN,
        to: i64::MAX,
        closed: None,
        limit: DEFAULT_LIMIT,
        groups: Vec::new(),
    };
    let mut seen = std::collections::BTreeSet::new();
    let tz = spec.windows.tz();
    for (k, v) in pairs {
        if !seen.insert(k.as_str()) {
            return Err(bad_request(format!("parameter {k}: given twice")));
        }
        match k.as_str() {
            "from" => p.from = parse_time("from", v, tz)?,
            "to" => p.to = parse_time("to", v, tz)?,
            "closed" => {
                p.closed = Some(match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(bad_request(format!(
                            "parameter closed: {v:?} is not true or false"
                        )));
                    }
                });
            }
            "limit" => {
                p.limit = crate::api::parse_limit(v, MAX_LIMIT)?;
            }
            field if spec.group_by.iter().any(|g| g == field) => {
                p.groups.push((k.clone(), v.clone()));
            }
            other => {
                let fields = if spec.group_by.is_empty() {
                    "none".to_string()
                } else {
                    spec.group_by.join(", ")
                };
                return Err(bad_request(format!(
                    "parameter {other}: not a parameter of aggregate {:?} (from, to, closed, limit, or a group_by field: {fields})",
                    spec.name
                )));
            }
        }
    }
    if p.from >= p.to {
        return Err(bad_request("parameter from: must be before to".into()));
    }
    Ok(p)
}

fn matches(p: &LiveParams, w: &WindowView) -> bool {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    p.closed.is_none_or(|c| c == w.closed)
        && p.groups
            .iter()
            .all(|(f, want)| w.group.get(f).is_some_and(|v| text(v) == *want))
}

#[utoipa::path(get, path = "/api/v1/live/{name}", tag = "live", params(("name" = String, Path, description = "the aggregate"), ("from" = Option<String>, Query, description = "windows ending after this time (RFC 3339 or a date)"), ("to" = Option<String>, Query, description = "windows starting before this time"), ("closed" = Option<bool>, Query, description = "only closed (final) or only open windows"), ("limit" = Option<usize>, Query, description = "windows at most (default 10000, at most 100000)"), ("FIELD" = Option<String>, Query, description = "windows of groups whose group_by FIELD is this value, e.g. `provider_id=7`")), responses((status = 200, description = "the windows, oldest first", body = LiveWindows), (status = 400, description = "a bad parameter, named", body = crate::openapi::ErrorBody), (status = 404, description = "no such aggregate", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn windows(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult {
    let spec = spec(&api, &name)?;
    let params = parse_params(&spec, &pairs)?;
    let rows = api
        .store()
        .live_windows(&name, params.from, params.to)
        .await
        .map_err(|e| ApiError::internal(e.report()))?;
    let mut by_key: BTreeMap<(i64, String), WindowView> = rows
        .iter()
        .map(|r| ((r.start, r.group.clone()), WindowView::of_row(&spec, r)))
        .collect();
    let live = live(&api, &name);
    if let Some(live) = &live {
        for view in live.views(params.from, params.to) {
            by_key.insert((view.start_us, view.group_key.clone()), view);
        }
    }
    let mut windows: Vec<WindowView> = by_key
        .into_values()
        .filter(|w| matches(&params, w))
        .collect();
    let truncated = windows.len() > params.limit;
    if truncated {
        windows.drain(..windows.len() - params.limit);
    }
    let head = api
        .store()
        .aggregate_head(&name)
        .await
        .map_err(|e| ApiError::internal(e.report()))?;
    ok(&LiveWindows {
        aggregate: name,
        group_by: spec.group_by.clone(),
        watermark: head.and_then(|h| h.watermark).map(format_time),
        windows,
        truncated,
    })
}

#[utoipa::path(get, path = "/api/v1/live/{name}/stream", tag = "live", params(("name" = String, Path, description = "the aggregate"), ("FIELD" = Option<String>, Query, description = "updates of groups whose group_by FIELD is this value")), responses((status = 200, description = "Server-Sent Events: first the open windows, then `event: window` with a window (as in GET /live/{name}) each time a batch changes it; `event: lagged` when the client fell behind (fetch GET /live/{name} again)", content_type = "text/event-stream"), (status = 400, description = "a bad parameter, named", body = crate::openapi::ErrorBody), (status = 404, description = "no such aggregate", body = crate::openapi::ErrorBody), (status = 409, description = "the aggregate is counted by another process: poll GET /live/{name}", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn stream(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult {
    let spec = spec(&api, &name)?;
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, _)| matches!(k.as_str(), "from" | "to" | "limit"))
    {
        return Err(bad_request(format!(
            "parameter {k}: the stream sends every window as it changes; filter by group fields or closed only"
        )));
    }
    let params = parse_params(&spec, &pairs)?;
    let Some(live) = live(&api, &name) else {
        return Err(ApiError::conflict(format!(
            "aggregate {name:?} is counted by another process (its pipeline does not run here): poll GET /api/v1/live/{name}"
        )));
    };
    // Subscribed before the snapshot: nothing falls between.
    let updates = live.subscribe();
    let snapshot: Vec<WindowView> = live
        .views(i64::MIN, i64::MAX)
        .into_iter()
        .filter(|w| matches(&params, w))
        .collect();
    let event = |w: &WindowView| {
        Event::default()
            .event("window")
            .json_data(w)
            .unwrap_or_else(|_| Event::default().comment("unencodable window"))
    };
    let first: Vec<Result<Event, std::convert::Infallible>> =
        snapshot.iter().map(|w| Ok(event(w))).collect();
    let params = Arc::new(params);
    let rest = futures::stream::unfold(updates, move |mut rx| {
        let params = params.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        let events: Vec<Result<Event, std::convert::Infallible>> = batch
                            .iter()
                            .filter(|w| matches(&params, w))
                            .map(|w| {
                                Ok(Event::default()
                                    .event("window")
                                    .json_data(w)
                                    .unwrap_or_else(|_| Event::default().comment("unencodable")))
                            })
                            .collect();
                        if !events.is_empty() {
                            return Some((futures::stream::iter(events), rx));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let lagged = Event::default().event("lagged").data(n.to_string());
                        return Some((futures::stream::iter(vec![Ok(lagged)]), rx));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    use futures::StreamExt as _;
    // Ends at shutdown: the server's graceful stop waits for open answers.
    let stream = futures::stream::iter(first)
        .chain(rest.flatten())
        .take_until(api.shutdown().clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
