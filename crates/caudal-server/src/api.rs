//! The REST API under `/api/v1`: bearer tokens with roles on every route,
//! a rate limit per token, an audit record of every mutating call, and one
//! error shape: `{"error": {"code": "...", "message": "..."}}`.
//!
//! Roles: `viewer` reads (also the crawler's sites and frontiers);
//! `operator` also pauses, resumes and triggers
//! pipelines, discards dead letters, and starts, cancels and retries
//! workflow runs; `admin` also lists tokens and reads the audit log. A
//! missing, unknown or revoked token is 401; a token whose role is too low
//! is 403; too many requests is 429 with `Retry-After`.
//!
//! An error of the engine becomes an answer in one place
//! ([`ApiError::from_error`]): its kind decides the status.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use caudal_core::config::Config;
use caudal_core::status::PipelineStatus;
use caudal_engine::daemon::{Control, Refused};
use caudal_engine::maintenance::{BackfillTicket, Maintenance};
use caudal_engine::workflow::Workflows;

use crate::openapi::{
    AttemptList, AuditEntry, AuditLog, BackfillStarted, Checkpoint, CheckpointReset, CrawlPage,
    CrawlPageList, CrawlSite, CrawlSiteList, DeadLetter, DeadLetterDetail, DeadLetterPage,
    Discarded, ErrorBody, ErrorDetail, Frontier, FrontierList, PipelineDetail, PipelineList,
    Replayed, Run, RunPage, Steered, TaskList, Token, TokenList, WorkflowList, WorkflowRunList,
};
use caudal_store::{DeadLetterState, Store};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use sha2::Digest as _;

/// The prefix of every caudal API token.
pub const TOKEN_PREFIX: &str = "cdl_";

/// What a token may do, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// A new random token (shown once) and the hash the store keeps.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let mut token = String::from(TOKEN_PREFIX);
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    let hash = token_hash(&token);
    (token, hash)
}

/// The SHA-256 of a token, in hex: what the store keeps and looks up.
pub fn token_hash(token: &str) -> String {
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

type Limiter = RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
>;

/// What the API handlers share.
#[derive(Clone)]
pub struct Api {
    config: Arc<Config>,
    store: Store,
    control: Control,
    limiter: Arc<Limiter>,
    pipelines: Arc<std::collections::BTreeMap<String, caudal_engine::Pipeline>>,
    workflows: Workflows,
    cache: Arc<crate::datasets::Cache>,
    /// The dashboard's signed-in browsers.
    sessions: Arc<crate::dashboard::Sessions>,
    /// The last hour of each pipeline's figures.
    history: crate::history::History,
    /// Cancelled when the server shuts down: long-lived answers (event
    /// streams) end then, so shutdown never waits on a client.
    shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

impl Api {
    /// `requests_per_second` per token, with bursts of twice that.
    pub fn new(
        config: Arc<Config>,
        store: Store,
        control: Control,
        pipelines: Vec<caudal_engine::Pipeline>,
        workflows: Workflows,
        requests_per_second: u32,
    ) -> Self {
        let config_cache = config.cache.clone();
        let session_ttl = config
            .server
            .as_ref()
            .map_or(std::time::Duration::from_secs(12 * 3600), |s| {
                s.session_ttl.as_std()
            });
        let rate = NonZeroU32::new(requests_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(requests_per_second.max(1).saturating_mul(2)).unwrap_or(rate);
        Self {
            config,
            store,
            control,
            limiter: Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )),
            pipelines: Arc::new(
                pipelines
                    .into_iter()
                    .map(|p| (p.name().to_string(), p))
                    .collect(),
            ),
            workflows,
            cache: Arc::new(
                crate::datasets::Cache::new(&config_cache).unwrap_or_else(|e| {
                    tracing::warn!(error = %e.report(), "cache.url unusable; caching in process");
                    crate::datasets::Cache::new(&caudal_core::config::CacheConfig::default())
                        .expect("the default cache needs no connection")
                }),
            ),
            sessions: Arc::new(crate::dashboard::Sessions::new(session_ttl)),
            history: crate::history::History::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    pub(crate) fn sessions(&self) -> &crate::dashboard::Sessions {
        &self.sessions
    }

    pub(crate) fn history(&self) -> &crate::history::History {
        &self.history
    }

    /// Ends event streams when `shutdown` is cancelled.
    pub(crate) fn set_shutdown(&mut self, shutdown: tokio_util::sync::CancellationToken) {
        self.shutdown = shutdown;
    }

    /// Cancelled when the server shuts down.
    pub(crate) fn shutdown(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Pipeline `name` as this process runs it, if it does.
    pub(crate) fn pipeline(&self, name: &str) -> Option<&caudal_engine::Pipeline> {
        self.pipelines.get(name)
    }

    pub(crate) fn cache(&self) -> &crate::datasets::Cache {
        &self.cache
    }
}

/// An API error in the one shape every route uses.
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub(crate) fn conflict(what: String) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", what)
    }

    pub(crate) fn internal(what: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", what)
    }

    /// The one mapping of an engine or store error to an answer: what the
    /// request names does not exist (404), the request does not fit the
    /// current state (409), anything else is ours (500).
    pub(crate) fn from_error(e: &caudal_core::Error) -> Self {
        use caudal_core::ErrorKind;
        match e.kind() {
            ErrorKind::NotFound => Self::not_found(e.report()),
            ErrorKind::Conflict => Self::new(StatusCode::CONFLICT, "conflict", e.report()),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.report()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&body).unwrap_or_default(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// A typed answer with `status`, as JSON.
fn answer(status: StatusCode, body: &impl serde::Serialize) -> ApiResult {
    let text = serde_json::to_string(body).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode the answer: {e}"),
        )
    })?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], text).into_response())
}

/// A typed answer as JSON (200).
pub(crate) fn ok(body: &impl serde::Serialize) -> ApiResult {
    answer(StatusCode::OK, body)
}

/// The routes under `/api/v1`, each behind its role.
pub fn routes(api: Api) -> Router {
    let viewer = Router::new()
        .route("/pipelines", get(pipelines))
        .route("/pipelines/{name}", get(pipeline))
        .route("/pipelines/{name}/checkpoint", get(checkpoint))
        .route("/pipelines/{name}/history", get(history))
        .route("/runs", get(runs))
        .route("/runs/{id}", get(run))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{id}", get(dead_letter))
        .route("/workflows", get(workflows))
        .route("/workflow-runs", get(workflow_runs))
        .route("/workflow-runs/{id}", get(workflow_run))
        .route("/workflow-runs/{id}/tasks", get(workflow_tasks))
        .route("/workflow-runs/{id}/attempts", get(workflow_attempts))
        .route("/workflow-runs/{id}/tasks/{task}/log", get(workflow_log))
        .route("/crawl/sites", get(crawl_sites))
        .route("/crawl/frontiers", get(crawl_frontiers))
        .route("/crawl/frontiers/{name}/pages", get(crawl_pages))
        .route("/datasets", get(crate::datasets::datasets))
        .route(
            "/datasets/{name}/partitions",
            get(crate::datasets::partitions),
        )
        .route("/datasets/{name}/rows", get(crate::datasets::rows))
        .route("/live", get(crate::live::aggregates))
        .route("/live/{name}", get(crate::live::windows))
        .route("/live/{name}/stream", get(crate::live::stream))
        .route("/alerts", get(crate::alerts::alerts))
        .route("/alerts/history", get(crate::alerts::history))
        .route("/alerts/notifications", get(crate::alerts::notifications))
        .route("/nodes", get(nodes))
        .route_layer(middleware::from_fn_with_state(
            (api.clone(), Role::Viewer),
            authorize,
        ));
    let operator = Router::new()
        .route("/pipelines/{name}/pause", post(pause))
        .route("/pipelines/{name}/resume", post(resume))
        .route("/pipelines/{name}/trigger", post(trigger))
        .route("/dead-letters/{id}/discard", post(discard))
        .route("/pipelines/{name}/backfill", post(backfill))
        .route("/pipelines/{name}/dead-letters/replay", post(replay))
        .route(
            "/pipelines/{name}/checkpoint",
            axum::routing::delete(reset_checkpoint),
        )
        .route("/pipelines/{name}/resync", post(resync))
        .route("/nodes/{id}/drain", post(drain_node))
        .route("/workflows/{name}/runs", post(start_workflow))
        .route("/workflow-runs/{id}/cancel", post(cancel_workflow_run))
        .route("/workflow-runs/{id}/retry", post(retry_workflow_run))
        .route("/alerts/{name}/silence", post(crate::alerts::silence))
        .route(
            "/alerts/silences/{id}",
            axum::routing::delete(crate::alerts::unsilence),
        )
        .route_layer(middleware::from_fn_with_state(
            (api.clone(), Role::Operator),
            authorize,
        ));
    let admin = Router::new()
        .route("/tokens", get(tokens))
        .route("/audit", get(audit))
        .route("/backups", post(backup))
        .route_layer(middleware::from_fn_with_state(
            (api.clone(), Role::Admin),
            authorize,
        ));
    Router::new()
        .merge(viewer)
        .merge(operator)
        .merge(admin)
        .fallback(|| async { ApiError::not_found("no such API route") })
        .layer(middleware::map_response(one_error_shape))
        .with_state(api)
}

/// Every error answer in the one shape: a rejection by an extractor (a
/// path id that is not a number, a query or body that does not parse, a
/// wrong content type) comes as plain text; it becomes
/// `{"error": {"code": "bad_request", "message": "..."}}` with its status.
async fn one_error_shape(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut shaped = ApiError::new(status, code, text).into_response();
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            shaped.headers_mut().insert(name, v.clone());
        }
    }
    shaped
}

/// Checks the bearer token and its role, applies the rate limit, and
/// audits mutating calls.
/// The name of the token a request came with.
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub(crate) String);

async fn authorize(
    State((api, needed)): State<(Api, Role)>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let bearer = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    // A bearer token, else the dashboard's session cookie (which needs its
    // CSRF token to change anything).
    // The rate limit counts per token, and per browser session: a
    // dashboard's polling does not starve the token's other clients.
    let (hash, limit_key) = match bearer {
        Some(token) => (token_hash(token), None),
        None => match api.sessions.of(request.headers()) {
            Some(session) => {
                if mutating && let Some(why) = crate::dashboard::forged(&session, request.headers())
                {
                    return ApiError::new(StatusCode::FORBIDDEN, "csrf", why).into_response();
                }
                (session.token_hash, Some(format!("session:{}", session.key)))
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send a token: Authorization: Bearer <token> (caudal token create)",
                )
                .into_response();
            }
        },
    };
    let record = match api.store.token_by_hash(&hash).await {
        Ok(r) => r,
        Err(e) => return ApiError::from_error(&e).into_response(),
    };
    let Some(record) = record.filter(|r| r.revoked_at.is_none()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token is unknown or revoked",
        )
        .into_response();
    };
    let role = Role::parse(&record.role).unwrap_or(Role::Viewer);
    if role < needed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has role {}; this needs {}",
                record.name,
                role.as_str(),
                needed.as_str()
            ),
        )
        .into_response();
    }
    if let Err(not_until) = api
        .limiter
        .check_key(limit_key.as_ref().unwrap_or(&record.name))
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests for token {:?}", record.name),
        );
        e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return e.into_response();
    }
    request.extensions_mut().insert(Caller(record.name.clone()));
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if method != Method::GET && method != Method::HEAD {
        let status = response.status().as_u16();
        if let Err(e) = api
            .store
            .add_audit(&record.name, method.as_str(), &path, status)
            .await
        {
            tracing::warn!(error = %e.report(), "cannot record an API call in the audit log");
        }
    }
    response
}

fn known(api: &Api, name: &str) -> Result<(), ApiError> {
    if api.config.pipelines.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no pipeline {name:?}")))
    }
}

async fn status_of(api: &Api, name: &str) -> Result<PipelineStatus, ApiError> {
    let mut status = caudal_engine::status::pipeline_status(
        &api.config,
        &api.store,
        name,
        api.pipelines.get(name),
    )
    .await
    .map_err(|e| ApiError::from_error(&e))?;
    status.paused = api.control.is_paused(name).unwrap_or(false);
    Ok(status)
}

#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines", responses((status = 200, description = "ok", body = crate::openapi::PipelineList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn pipelines(State(api): State<Api>) -> ApiResult {
    let mut pipelines = Vec::new();
    for name in api.config.pipelines.keys() {
        pipelines.push(status_of(&api, name).await?);
    }
    ok(&PipelineList { pipelines })
}

#[utoipa::path(get, path = "/api/v1/pipelines/{name}", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "ok", body = crate::openapi::PipelineDetail), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn pipeline(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    known(&api, &name)?;
    let status = status_of(&api, &name).await?;
    let recent = api
        .store
        .runs(Some(&name), 10)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&PipelineDetail {
        status,
        runs: recent.iter().map(Run::from).collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/pipelines/{name}/checkpoint", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "ok", body = crate::openapi::Checkpoint), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn checkpoint(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    known(&api, &name)?;
    match api
        .store
        .checkpoint(&name)
        .await
        .map_err(|e| ApiError::from_error(&e))?
    {
        None => Err(ApiError::not_found(format!(
            "pipeline {name:?} has no checkpoint"
        ))),
        Some(cp) => ok(&Checkpoint {
            pipeline: name,
            position: cp.position,
            updated_at: cp.updated_at.to_string(),
        }),
    }
}

/// The pipeline's last hour as this process sampled it: the dashboard's
/// charts (see [`crate::history`]).
#[utoipa::path(get, path = "/api/v1/pipelines/{name}/history", tag = "pipelines", params(("name" = String, Path, description = "the pipeline"), HistoryQuery), responses((status = 200, description = "ok", body = crate::history::PipelineHistory), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn history(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    known(&api, &name)?;
    ok(&api.history.of(&name, q.last.map(|n| n as usize)))
}

/// How much of the hour to answer.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// Only the newest this many points (default: the whole hour).
    last: Option<u32>,
}

fn steer(api: &Api, name: &str, result: Result<(), Refused>) -> ApiResult {
    match result {
        Err(Refused::Unknown) => Err(ApiError::not_found(format!("no pipeline {name:?}"))),
        Err(Refused::Paused) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "paused",
            format!("pipeline {name:?} is paused; resume it first"),
        )),
        Ok(()) => ok(&Steered {
            pipeline: name.to_string(),
            paused: api.control.is_paused(name).unwrap_or(false),
        }),
    }
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/pause", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "ok", body = crate::openapi::Steered), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn pause(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    steer(&api, &name, api.control.pause(&name))
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/resume", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "ok", body = crate::openapi::Steered), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn resume(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    steer(&api, &name, api.control.resume(&name))
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/trigger", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "ok", body = crate::openapi::Steered), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "paused", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn trigger(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    steer(&api, &name, api.control.trigger(&name))
}

/// Paging and filters of `/runs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RunsQuery {
    pipeline: Option<String>,
    #[param(inline)]
    outcome: Option<RunOutcome>,
    /// Runs with ids below this (the previous page's `next_cursor`).
    cursor: Option<i64>,
    /// At most this many (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// Paging and filters of `/dead-letters`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LettersQuery {
    pipeline: Option<String>,
    #[param(inline)]
    state: Option<LetterState>,
    /// Letters with ids above this (the previous page's `next_cursor`).
    cursor: Option<i64>,
    /// At most this many (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// A run outcome to filter by.
#[derive(Clone, Copy, Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunOutcome {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Abandoned,
}

impl RunOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Abandoned => "abandoned",
        }
    }
}

/// A dead-letter state to filter by.
#[derive(Clone, Copy, Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LetterState {
    Pending,
    Replayed,
    Discarded,
}

const MAX_PAGE: u32 = 500;

/// A `limit` of a paged route: `default` when absent, 400 outside 1 to
/// [`MAX_PAGE`].
fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(bad_request(format!(
            "parameter limit: {n} is not from 1 to {MAX_PAGE}"
        ))),
    }
}

pub(crate) fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// A `limit` parameter: a number from 1 to `max`, else 400.
pub(crate) fn parse_limit(v: &str, max: usize) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            bad_request(format!(
                "parameter limit: {v:?} is not a number from 1 to {max}"
            ))
        })
}

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunsQuery), responses((status = 200, description = "ok", body = crate::openapi::RunPage), (status = 400, description = "bad filter", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn runs(State(api): State<Api>, Query(q): Query<RunsQuery>) -> ApiResult {
    let limit = page_limit(q.limit, 50)?;
    let outcome = q.outcome.map(RunOutcome::as_str);
    let page = api
        .store
        .runs_page(q.pipeline.as_deref(), outcome, q.cursor, limit)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(|r| r.id))
        .flatten();
    ok(&RunPage {
        runs: page.iter().map(Run::from).collect(),
        next_cursor: next,
    })
}

#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs", params(("id" = i64, Path, description = "the id")), responses((status = 200, description = "ok", body = crate::openapi::Run), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn run(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    match api
        .store
        .run(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?
    {
        Some(r) => ok(&Run::from(&r)),
        None => Err(ApiError::not_found(format!("no run {id}"))),
    }
}

fn letter_state(state: LetterState) -> DeadLetterState {
    match state {
        LetterState::Pending => DeadLetterState::Pending,
        LetterState::Replayed => DeadLetterState::Replayed,
        LetterState::Discarded => DeadLetterState::Discarded,
    }
}

#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "dead letters", params(LettersQuery), responses((status = 200, description = "ok", body = crate::openapi::DeadLetterPage), (status = 400, description = "bad filter", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn dead_letters(
    State(api): State<Api>,
    Query(q): Query<LettersQuery>,
) -> ApiResult {
    let limit = page_limit(q.limit, 50)?;
    let state = q.state.map(letter_state);
    let page = api
        .store
        .dead_letters(q.pipeline.as_deref(), state, q.cursor.unwrap_or(0), limit)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(|l| l.id))
        .flatten();
    ok(&DeadLetterPage {
        dead_letters: page.iter().map(DeadLetter::from).collect(),
        next_cursor: next,
    })
}

#[utoipa::path(get, path = "/api/v1/dead-letters/{id}", tag = "dead letters", params(("id" = i64, Path, description = "the id")), responses((status = 200, description = "ok", body = crate::openapi::DeadLetterDetail), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn dead_letter(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    match api
        .store
        .dead_letter(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?
    {
        Some(l) => ok(&DeadLetterDetail::from(&l)),
        None => Err(ApiError::not_found(format!("no dead letter {id}"))),
    }
}

#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/discard", tag = "dead letters", params(("id" = i64, Path, description = "the id")), responses((status = 200, description = "ok", body = crate::openapi::Discarded), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "not pending", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn discard(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    let letter = api
        .store
        .dead_letter(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no dead letter {id}")))?;
    if letter.state != DeadLetterState::Pending {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pending",
            format!("dead letter {id} is {}, not pending", letter.state.as_str()),
        ));
    }
    api.store
        .resolve_dead_letters(&[id], DeadLetterState::Discarded)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&Discarded {
        id,
        state: DeadLetterState::Discarded.as_str().to_string(),
    })
}

/// What to backfill.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct BackfillBody {
    /// The table, as configured (`public.orders`, or `orders`).
    table: String,
    /// Only the rows matching this SQL condition.
    #[serde(default, rename = "where")]
    filter: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/backfill", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), request_body = BackfillBody, responses((status = 202, description = "taken; progress in the pipeline's replication.backfill", body = crate::openapi::BackfillStarted), (status = 400, description = "bad table or condition", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "not a CDC pipeline", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn backfill(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Option<axum::Json<BackfillBody>>,
) -> ApiResult {
    known(&api, &name)?;
    let cdc = api
        .config
        .pipelines
        .get(&name)
        .and_then(|p| api.config.sources.get(&p.source))
        .is_some_and(caudal_core::config::SourceConfig::is_cdc);
    if !cdc {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cdc",
            format!("pipeline {name:?} does not capture changes: only CDC pipelines backfill"),
        ));
    }
    let Some(axum::Json(body)) = body else {
        return Err(bad_request(
            "send {\"table\": \"...\", \"where\": \"...\"} as JSON".into(),
        ));
    };
    let maintenance = Maintenance::new(&api.config, &api.store, &name)
        .map_err(|e| ApiError::not_found(e.report()))?;
    match maintenance
        .request_backfill(&body.table, body.filter.as_deref())
        .await
    {
        Ok(BackfillTicket { id, rows }) => answer(
            StatusCode::ACCEPTED,
            &BackfillStarted {
                pipeline: name,
                id,
                table: body.table,
                rows,
            },
        ),
        Err(e) if e.kind() == caudal_core::ErrorKind::Connect => Err(ApiError::from_error(&e)),
        Err(e) => Err(bad_request(e.report())),
    }
}

/// Which dead letters to replay (default: every pending one).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct ReplayBody {
    #[serde(default, deserialize_with = "whole_numbers")]
    ids: Option<Vec<i64>>,
}

/// Ids as JSON Schema counts integers: `7` and `7.0` alike (a number with
/// no fraction), nothing else.
fn whole_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<i64>>, D::Error> {
    let numbers: Option<Vec<serde_json::Number>> = Option::deserialize(d)?;
    numbers
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    n.as_i64()
                        .or_else(|| {
                            n.as_f64()
                                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                                .map(|f| f as i64)
                        })
                        .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an id")))
                })
                .collect()
        })
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/dead-letters/replay", tag = "dead letters", params(("name" = String, Path, description = "the pipeline")), request_body(content = ReplayBody, description = "optional: only these ids"), responses((status = 200, description = "replayed", body = crate::openapi::Replayed), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn replay(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Option<axum::Json<ReplayBody>>,
) -> ApiResult {
    let pipeline = api
        .pipelines
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("no pipeline {name:?}")))?;
    let ids = body.and_then(|b| b.0.ids);
    let stop = tokio_util::sync::CancellationToken::new();
    let done = pipeline
        .replay_dead_letters(ids.as_deref(), &stop)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&Replayed {
        pipeline: name,
        delivered: done.delivered,
        rejected_again: done.rejected_again,
    })
}

/// Refuses unless pipeline `name` is paused.
fn paused_first<'a>(api: &'a Api, name: &str) -> Result<&'a caudal_engine::Pipeline, ApiError> {
    let pipeline = api
        .pipelines
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no pipeline {name:?}")))?;
    if api.control.is_paused(name) != Some(true) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_paused",
            format!("pipeline {name:?} is running: pause it first"),
        ));
    }
    Ok(pipeline)
}

fn busy_or_internal(e: &caudal_core::Error) -> ApiError {
    match e.kind() {
        caudal_core::ErrorKind::Busy => {
            ApiError::new(StatusCode::CONFLICT, "buffer_not_empty", e.report())
        }
        caudal_core::ErrorKind::Config => {
            ApiError::new(StatusCode::CONFLICT, "not_cdc", e.report())
        }
        _ => ApiError::from_error(e),
    }
}

#[utoipa::path(delete, path = "/api/v1/pipelines/{name}/checkpoint", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "forgotten; the next run reads from the start", body = crate::openapi::CheckpointReset), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "not paused, or batches wait in the buffer", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn reset_checkpoint(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult {
    let pipeline = paused_first(&api, &name)?;
    let reset = Maintenance::new(&api.config, &api.store, &name)
        .map_err(|e| ApiError::not_found(e.report()))?
        .reset_checkpoint(Some(pipeline))
        .await
        .map_err(|e| busy_or_internal(&e))?;
    ok(&CheckpointReset {
        pipeline: name,
        had_checkpoint: reset.had_checkpoint,
    })
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/resync", tag = "pipelines", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "the next run snapshots again", body = crate::openapi::Steered), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "not paused, not CDC, or batches wait in the buffer", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn resync(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    let pipeline = paused_first(&api, &name)?;
    Maintenance::new(&api.config, &api.store, &name)
        .map_err(|e| ApiError::not_found(e.report()))?
        .resync(Some(pipeline))
        .await
        .map_err(|e| busy_or_internal(&e))?;
    ok(&Steered {
        pipeline: name,
        paused: true,
    })
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "admin", responses((status = 200, description = "ok", body = crate::openapi::TokenList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn tokens(State(api): State<Api>) -> ApiResult {
    let list = api
        .store
        .tokens()
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&TokenList {
        tokens: list.iter().map(Token::from).collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "admin", responses((status = 200, description = "ok", body = crate::openapi::AuditLog), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn audit(State(api): State<Api>) -> ApiResult {
    let list = api
        .store
        .audit(200)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&AuditLog {
        audit: list.iter().map(AuditEntry::from).collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/workflows", tag = "workflows", responses((status = 200, description = "ok", body = crate::openapi::WorkflowList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflows(State(api): State<Api>) -> ApiResult {
    let workflows = api
        .workflows
        .list()
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&WorkflowList { workflows })
}

/// What a workflow run starts with.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    /// Values of the workflow's declared parameters, e.g. `{"pages": 5}`;
    /// the others keep their defaults.
    #[serde(default)]
    #[schema(value_type = Object)]
    params: serde_json::Map<String, serde_json::Value>,
}

#[utoipa::path(post, path = "/api/v1/workflows/{name}/runs", tag = "workflows", params(("name" = String, Path, description = "the workflow")), request_body(content = Option<StartBody>, description = "optional: parameter values"), responses((status = 201, description = "queued", body = crate::openapi::WorkflowRunInfo), (status = 400, description = "a parameter the workflow does not declare, or a body that is not JSON", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn start_workflow(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body: StartBody = if body.trim_ascii().is_empty() {
        StartBody::default()
    } else {
        serde_json::from_slice::<Option<StartBody>>(&body)
            .map_err(|e| {
                bad_request(format!(
                    "send {{\"params\": {{\"NAME\": value}}}} as JSON (or nothing): {e}"
                ))
            })?
            .unwrap_or_default()
    };
    let params: serde_json::Map<String, serde_json::Value> = body.params.into_iter().collect();
    match api.workflows.trigger(&name, params, "api").await {
        Ok(run) => answer(StatusCode::CREATED, &run),
        // An undeclared parameter: the request is wrong, not the server.
        Err(e) if e.kind() == caudal_core::ErrorKind::Config => Err(bad_request(e.report())),
        Err(e) => Err(ApiError::from_error(&e)),
    }
}

/// Which workflow runs to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WorkflowRunsQuery {
    /// Only this workflow's runs.
    workflow: Option<String>,
    /// At most this many (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/workflow-runs", tag = "workflows", params(WorkflowRunsQuery), responses((status = 200, description = "newest first", body = crate::openapi::WorkflowRunList), (status = 404, description = "no such workflow", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflow_runs(
    State(api): State<Api>,
    Query(q): Query<WorkflowRunsQuery>,
) -> ApiResult {
    let limit = page_limit(q.limit, 50)?;
    let runs = api
        .workflows
        .runs(q.workflow.as_deref(), limit)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&WorkflowRunList { runs })
}

#[utoipa::path(get, path = "/api/v1/workflow-runs/{id}", tag = "workflows", params(("id" = i64, Path, description = "the workflow run")), responses((status = 200, description = "ok", body = crate::openapi::WorkflowRunInfo), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflow_run(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    let run = api
        .workflows
        .run(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&run)
}

#[utoipa::path(get, path = "/api/v1/workflow-runs/{id}/tasks", tag = "workflows", params(("id" = i64, Path, description = "the workflow run")), responses((status = 200, description = "ok", body = crate::openapi::TaskList), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflow_tasks(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    let tasks = api
        .workflows
        .tasks(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&TaskList { tasks })
}

#[utoipa::path(get, path = "/api/v1/workflow-runs/{id}/attempts", tag = "workflows", params(("id" = i64, Path, description = "the workflow run")), responses((status = 200, description = "ok", body = crate::openapi::AttemptList), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflow_attempts(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    let attempts = api
        .workflows
        .attempts(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&AttemptList { attempts })
}

/// Which log of a task.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
    /// The fan-out instance; without it, the task itself.
    index: Option<i64>,
    /// The attempt's number; without it, the latest.
    attempt: Option<u32>,
    /// `stdout` (default) or `stderr`.
    #[param(pattern = "^(stdout|stderr)$")]
    stream: Option<String>,
}

/// The answer header that says whether the attempt still runs (its log
/// may still grow).
pub const RUNNING_HEADER: &str = "caudal-running";

#[utoipa::path(get, path = "/api/v1/workflow-runs/{id}/tasks/{task}/log", tag = "workflows", params(("id" = i64, Path, description = "the workflow run"), ("task" = String, Path, description = "the task"), LogQuery), responses((status = 200, description = "the log file as it is now", body = String, content_type = "text/plain", headers(("caudal-running" = bool, description = "whether the attempt still runs"))), (status = 400, description = "bad stream", body = crate::openapi::ErrorBody), (status = 404, description = "no such run or attempt, or its directory was pruned", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn workflow_log(
    State(api): State<Api>,
    Path((id, task)): Path<(i64, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult {
    let stderr = match q.stream.as_deref() {
        None | Some("stdout") => false,
        Some("stderr") => true,
        Some(other) => {
            return Err(bad_request(format!(
                "stream {other:?} is not one of stdout, stderr"
            )));
        }
    };
    let log = api
        .workflows
        .log(id, &task, q.index.unwrap_or(-1), q.attempt, stderr)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let (path, running) = (log.path, log.running);
    let body = match tokio::fs::File::open(&path).await {
        // Streamed: a log may be larger than what is worth holding.
        Ok(file) => axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
        // The file comes with the first byte: an attempt that wrote
        // nothing (yet) has none.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !log.pruned => {
            axum::body::Body::empty()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!(
                "the log of task `{task}` of run {id} is gone (the run's directory may have been pruned)"
            )));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read the log of task `{task}` of run {id}: {e}"),
            ));
        }
    };
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response();
    response.headers_mut().insert(
        RUNNING_HEADER,
        HeaderValue::from_static(if running { "true" } else { "false" }),
    );
    Ok(response)
}

#[utoipa::path(post, path = "/api/v1/workflow-runs/{id}/cancel", tag = "workflows", params(("id" = i64, Path, description = "the workflow run")), responses((status = 202, description = "asked: the executor stops its running tasks; the run ends cancelled", body = crate::openapi::WorkflowRunInfo), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "the run has ended", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn cancel_workflow_run(State(api): State<Api>, Path(id): Path<i64>) -> ApiResult {
    api.workflows
        .cancel(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let run = api
        .workflows
        .run(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    answer(StatusCode::ACCEPTED, &run)
}

/// Which tasks of a run start over.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RetryQuery {
    /// `true`: only failed, upstream_failed and cancelled tasks start over
    /// (succeeded ones keep their results); default: every task.
    failed: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/workflow-runs/{id}/retry", tag = "workflows", params(("id" = i64, Path, description = "the workflow run"), RetryQuery), responses((status = 202, description = "queued again", body = crate::openapi::WorkflowRunInfo), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "the run has not ended", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn retry_workflow_run(
    State(api): State<Api>,
    Path(id): Path<i64>,
    Query(q): Query<RetryQuery>,
) -> ApiResult {
    api.workflows
        .retry(id, q.failed.unwrap_or(false))
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let run = api
        .workflows
        .run(id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    answer(StatusCode::ACCEPTED, &run)
}

#[utoipa::path(get, path = "/api/v1/crawl/sites", tag = "crawl", responses((status = 200, description = "the sites this process has crawled (or that command tasks named) since it started, by host", body = crate::openapi::CrawlSiteList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn crawl_sites(State(api): State<Api>) -> ApiResult {
    // The figures live in this process's memory, not in the store: every
    // crawl and command task of the process shares one registry.
    let sites = caudal_engine::crawl::sites(&api.config).snapshot();
    ok(&CrawlSiteList {
        sites: sites.iter().map(CrawlSite::from).collect(),
    })
}

/// Which frontiers to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FrontiersQuery {
    /// Only frontiers whose name starts with this, e.g. `workflow:42:`
    /// (the crawl tasks of run 42) or `pipeline:`.
    prefix: Option<String>,
}

/// Frontiers whose name starts with `prefix` (exactly: case and `_`
/// included).
async fn frontiers_named(api: &Api, prefix: &str) -> Result<Vec<Frontier>, ApiError> {
    // The store matches the prefix with LIKE, where `%` and `_` are
    // wildcards it drops: ask for the part before the first of them, keep
    // the exact matches.
    let plain = prefix.split(['%', '_']).next().unwrap_or_default();
    let all = api
        .store
        .frontiers(Some(plain))
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    Ok(all
        .iter()
        .filter(|f| f.name.starts_with(prefix))
        .map(Frontier::from)
        .collect())
}

#[utoipa::path(get, path = "/api/v1/crawl/frontiers", tag = "crawl", params(FrontiersQuery), responses((status = 200, description = "every frontier (or those with the prefix) with its pages by state, by name", body = crate::openapi::FrontierList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn crawl_frontiers(
    State(api): State<Api>,
    Query(q): Query<FrontiersQuery>,
) -> ApiResult {
    let frontiers = frontiers_named(&api, q.prefix.as_deref().unwrap_or_default()).await?;
    ok(&FrontierList { frontiers })
}

/// The states a crawl page can be in.
const PAGE_STATES: [&str; 6] = [
    "queued",
    "fetching",
    "done",
    "unchanged",
    "failed",
    "skipped",
];

/// Which pages of a frontier.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PagesQuery {
    /// Only pages in this state: `queued`, `fetching`, `done`,
    /// `unchanged`, `failed` or `skipped`.
    #[param(pattern = "^(queued|fetching|done|unchanged|failed|skipped)$")]
    state: Option<String>,
    /// At most this many (default 100, at most 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/crawl/frontiers/{name}/pages", tag = "crawl", params(("name" = String, Path, description = "the frontier, e.g. `pipeline:listings` or `workflow:42:scrape`"), PagesQuery), responses((status = 200, description = "pages in the order they were found", body = crate::openapi::CrawlPageList), (status = 400, description = "unknown state", body = crate::openapi::ErrorBody), (status = 404, description = "no such frontier", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn crawl_pages(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<PagesQuery>,
) -> ApiResult {
    if let Some(state) = q.state.as_deref()
        && !PAGE_STATES.contains(&state)
    {
        return Err(bad_request(format!(
            "state {state:?} is not one of {}",
            PAGE_STATES.join(", ")
        )));
    }
    let known = frontiers_named(&api, &name)
        .await?
        .iter()
        .any(|f| f.name == name);
    if !known {
        return Err(ApiError::not_found(format!("no crawl frontier {name:?}")));
    }
    let limit = page_limit(q.limit, 100)?;
    let pages = api
        .store
        .frontier_pages(&name, q.state.as_deref(), limit)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&CrawlPageList {
        frontier: name,
        pages: pages.iter().map(CrawlPage::from).collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "cluster", responses((status = 200, description = "every `caudal run` registered in the state store, with the pipelines it owns", body = crate::openapi::NodeList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn nodes(State(api): State<Api>) -> ApiResult {
    let nodes = caudal_engine::cluster::nodes(&api.store)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&crate::openapi::NodeList { nodes })
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", tag = "cluster", params(("id" = String, Path, description = "the node's id, or a prefix naming one node")), responses((status = 202, description = "asked: the node hands its pipelines to the others, then exits", body = crate::openapi::NodeView), (status = 404, description = "no such node", body = crate::openapi::ErrorBody), (status = 409, description = "the node is not active, or the prefix names several", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn drain_node(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let node = caudal_engine::cluster::drain(&api.store, &id)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    answer(StatusCode::ACCEPTED, &node)
}

/// Where to write a backup.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupBody {
    /// An absolute directory on the daemon's machine; the backup is a new
    /// `caudal-backup-<time>` directory in it. Default: `[backup] dir`.
    #[serde(default)]
    to: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/backups", tag = "operations", request_body = BackupBody, responses((status = 201, description = "taken: a consistent copy of the SQLite state store and every pipeline's buffer", body = crate::openapi::BackupTaken), (status = 400, description = "`to` is not an absolute path", body = crate::openapi::ErrorBody), (status = 409, description = "no `to` and no `[backup] dir`, or a backup of that name is being written", body = crate::openapi::ErrorBody), (status = 500, description = "the copy failed (nothing is kept of it)", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 403, description = "role too low", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn backup(
    State(api): State<Api>,
    body: Option<axum::Json<BackupBody>>,
) -> ApiResult {
    let body = body.map(|b| b.0).unwrap_or_default();
    let to = match body.to {
        Some(to) => {
            let path = std::path::PathBuf::from(&to);
            let upward = path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
            if !path.is_absolute() || upward || to.contains('\0') {
                return Err(bad_request(format!(
                    "body field to: {to:?} is not an absolute path on the daemon's machine (without ..)"
                )));
            }
            path
        }
        None => api.config.backup_dir().ok_or_else(|| {
            ApiError::conflict(
                "no [backup] dir is configured: send {\"to\": \"/absolute/dir\"}".into(),
            )
        })?,
    };
    let pipelines: Vec<caudal_engine::Pipeline> = api.pipelines.values().cloned().collect();
    let (buffers, not_open) = caudal_engine::backup::pipeline_buffers(&pipelines);
    let taken = caudal_engine::backup::take(&api.store, &buffers, &not_open, &to)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    tracing::info!(backup = %taken.dir.display(), "backup taken through the API");
    answer(
        StatusCode::CREATED,
        &crate::openapi::BackupTaken::from(taken),
    )
}

/// Every route and the role it needs, for documentation and tests.
pub const ROUTES: [(&str, &str, Role); 44] = [
    ("GET", "/api/v1/pipelines", Role::Viewer),
    ("GET", "/api/v1/datasets", Role::Viewer),
    ("GET", "/api/v1/datasets/{name}/partitions", Role::Viewer),
    ("GET", "/api/v1/datasets/{name}/rows", Role::Viewer),
    ("GET", "/api/v1/live", Role::Viewer),
    ("GET", "/api/v1/live/{name}", Role::Viewer),
    ("GET", "/api/v1/live/{name}/stream", Role::Viewer),
    ("GET", "/api/v1/alerts", Role::Viewer),
    ("GET", "/api/v1/alerts/history", Role::Viewer),
    ("GET", "/api/v1/alerts/notifications", Role::Viewer),
    ("POST", "/api/v1/alerts/{name}/silence", Role::Operator),
    ("DELETE", "/api/v1/alerts/silences/{id}", Role::Operator),
    ("GET", "/api/v1/pipelines/{name}", Role::Viewer),
    ("GET", "/api/v1/pipelines/{name}/checkpoint", Role::Viewer),
    ("GET", "/api/v1/pipelines/{name}/history", Role::Viewer),
    ("GET", "/api/v1/runs", Role::Viewer),
    ("GET", "/api/v1/runs/{id}", Role::Viewer),
    ("GET", "/api/v1/dead-letters", Role::Viewer),
    ("GET", "/api/v1/dead-letters/{id}", Role::Viewer),
    ("POST", "/api/v1/pipelines/{name}/pause", Role::Operator),
    ("POST", "/api/v1/pipelines/{name}/resume", Role::Operator),
    ("POST", "/api/v1/pipelines/{name}/trigger", Role::Operator),
    ("POST", "/api/v1/dead-letters/{id}/discard", Role::Operator),
    ("POST", "/api/v1/pipelines/{name}/backfill", Role::Operator),
    (
        "POST",
        "/api/v1/pipelines/{name}/dead-letters/replay",
        Role::Operator,
    ),
    (
        "DELETE",
        "/api/v1/pipelines/{name}/checkpoint",
        Role::Operator,
    ),
    ("POST", "/api/v1/pipelines/{name}/resync", Role::Operator),
    ("GET", "/api/v1/tokens", Role::Admin),
    ("GET", "/api/v1/audit", Role::Admin),
    ("POST", "/api/v1/backups", Role::Admin),
    ("GET", "/api/v1/workflows", Role::Viewer),
    ("GET", "/api/v1/workflow-runs", Role::Viewer),
    ("GET", "/api/v1/workflow-runs/{id}", Role::Viewer),
    ("GET", "/api/v1/workflow-runs/{id}/tasks", Role::Viewer),
    ("GET", "/api/v1/workflow-runs/{id}/attempts", Role::Viewer),
    (
        "GET",
        "/api/v1/workflow-runs/{id}/tasks/{task}/log",
        Role::Viewer,
    ),
    ("POST", "/api/v1/workflows/{name}/runs", Role::Operator),
    ("POST", "/api/v1/workflow-runs/{id}/cancel", Role::Operator),
    ("POST", "/api/v1/workflow-runs/{id}/retry", Role::Operator),
    ("GET", "/api/v1/crawl/sites", Role::Viewer),
    ("GET", "/api/v1/crawl/frontiers", Role::Viewer),
    ("GET", "/api/v1/crawl/frontiers/{name}/pages", Role::Viewer),
    ("GET", "/api/v1/nodes", Role::Viewer),
    ("POST", "/api/v1/nodes/{id}/drain", Role::Operator),
];
