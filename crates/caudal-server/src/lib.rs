//! What `caudal run` serves over HTTP when `[server]` is configured:
//! `/healthz` (the process answers), `/readyz` (the state store answers and
//! every pipeline has started), `/metrics` (Prometheus text format), the
//! REST API ([`api`]) and the web dashboard at `/` ([`dashboard`]).
//!
//! Metrics are recorded through the `metrics` facade by the engine and the
//! connectors; [`install_metrics`] installs the Prometheus recorder once per
//! process. Without it (every command but `run`), recording is a no-op.

pub mod alerts;
pub mod api;
pub mod dashboard;
pub mod datasets;
pub mod history;
pub mod live;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Buckets of the duration histograms, in seconds: 0.1 ms to 5 min.
const DURATION_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    60.0, 300.0,
];

/// Installs the process-wide Prometheus recorder and describes caudal's
/// metrics. Fails if a recorder is installed already.
pub fn install_metrics() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&DURATION_BUCKETS)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot install the metrics recorder: {e}"),
            )
        })?;
    describe();
    Ok(handle)
}

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric caudal exports: name, kind, help text. Labels: `pipeline`
/// on all pipeline metrics; `sink` on the sink's; `outcome`
/// (`caudal_batches_total`: delivered, rejected;
/// `caudal_sink_requests_total`: delivered, retry, rejected, split;
/// `caudal_runs_total`: succeeded, failed, cancelled); `reason` on
/// `caudal_records_rejected_total` (sink, schema) and
/// `caudal_buffer_blocked` (disk_full). Workflow metrics
/// (`caudal_workflow_*`, recorded by the workflow executor) have
/// `workflow`, and `task`, `state`, `outcome` or `pool` as their help says.
/// Crawler metrics (`caudal_crawl_*`) have `site` (the host, `name` or
/// `name:port`), and `outcome` or, for pages, `crawl` (the frontier) and
/// `state`.
pub const METRICS: [(&str, Kind, &str); 48] = [
    (
        "caudal_records_read_total",
        Kind::Counter,
        "Records read from the pipeline's source.",
    ),
    (
        "caudal_records_delivered_total",
        Kind::Counter,
        "Records the sink accepted.",
    ),
    (
        "caudal_records_rejected_total",
        Kind::Counter,
        "Records kept as dead letters (refused by the sink, or failing the schema).",
    ),
    (
        "caudal_batches_total",
        Kind::Counter,
        "Batches finished, by outcome.",
    ),
    (
        "caudal_sink_requests_total",
        Kind::Counter,
        "Requests sent to the sink, by outcome.",
    ),
    (
        "caudal_sink_retries_total",
        Kind::Counter,
        "Delivery attempts to be retried.",
    ),
    (
        "caudal_sink_sent_bytes_total",
        Kind::Counter,
        "Request body bytes sent to the sink.",
    ),
    (
        "caudal_sink_request_duration_seconds",
        Kind::Histogram,
        "Time from sending a request to the sink to its answer.",
    ),
    (
        "caudal_sink_circuit_state",
        Kind::Gauge,
        "The sink's circuit breaker: 0 closed, 1 half open, 2 open.",
    ),
    (
        "caudal_buffer_batches",
        Kind::Gauge,
        "Batches in the pipeline's buffer not yet delivered.",
    ),
    (
        "caudal_buffer_bytes",
        Kind::Gauge,
        "Bytes of the pipeline's buffer not yet delivered.",
    ),
    (
        "caudal_buffer_blocked",
        Kind::Gauge,
        "1 while the pipeline's intake waits because the buffer's disk is full, else 0.",
    ),
    (
        "caudal_checkpoint_age_seconds",
        Kind::Gauge,
        "Seconds since the pipeline's checkpoint last moved.",
    ),
    (
        "caudal_replication_lag_bytes",
        Kind::Gauge,
        "CDC: bytes of log between the server's end and what caudal confirmed or read.",
    ),
    (
        "caudal_replication_lag_seconds",
        Kind::Gauge,
        "CDC: seconds between the last transaction read and when it was read.",
    ),
    (
        "caudal_broker_connected",
        Kind::Gauge,
        "Broker source: 1 while its consumer is connected and subscribed, else 0.",
    ),
    (
        "caudal_broker_unacked_messages",
        Kind::Gauge,
        "Broker source: messages consumed and not yet acknowledged to the broker.",
    ),
    (
        "caudal_broker_lag_messages",
        Kind::Gauge,
        "Broker source: messages waiting in the broker for this consumer (JetStream pending, RabbitMQ ready).",
    ),
    (
        "caudal_broker_reconnects_total",
        Kind::Counter,
        "Broker source: times its consumer lost the connection and reconnects.",
    ),
    (
        "caudal_runs_total",
        Kind::Counter,
        "Runs ended, by outcome.",
    ),
    (
        "caudal_run_duration_seconds",
        Kind::Histogram,
        "How long runs took.",
    ),
    (
        "caudal_workflow_runs_total",
        Kind::Counter,
        "Workflow runs ended, by workflow and state (succeeded, failed, cancelled).",
    ),
    (
        "caudal_workflow_runs_skipped_total",
        Kind::Counter,
        "Scheduled workflow runs not started because the previous run had not ended, by workflow.",
    ),
    (
        "caudal_workflow_task_transitions_total",
        Kind::Counter,
        "Task instances entering a state, by workflow and state.",
    ),
    (
        "caudal_workflow_attempts_total",
        Kind::Counter,
        "Task attempts ended, by workflow, task and outcome (succeeded, skipped, failed, timed_out, cancelled, lost).",
    ),
    (
        "caudal_workflow_attempt_duration_seconds",
        Kind::Histogram,
        "How long task attempts took, by workflow and task.",
    ),
    (
        "caudal_workflow_task_queued_seconds",
        Kind::Histogram,
        "How long ready tasks waited for a pool slot, by workflow and pool.",
    ),
    (
        "caudal_workflow_tasks",
        Kind::Gauge,
        "Task instances of the runs the executor holds, by workflow and state.",
    ),
    (
        "caudal_workflow_pool_slots_used",
        Kind::Gauge,
        "Slots of the pool taken by running attempts (pool `default`: tasks without one).",
    ),
    (
        "caudal_crawl_requests_total",
        Kind::Counter,
        "Crawl requests ended, by site and outcome (answered, throttled: 429/503, failed: 5xx, network error or timeout; released: a command task's slot).",
    ),
    (
        "caudal_crawl_bytes_total",
        Kind::Counter,
        "Body bytes of answered crawl requests, by site.",
    ),
    (
        "caudal_crawl_latency_seconds",
        Kind::Histogram,
        "Time from sending a crawl request to the response head, by site.",
    ),
    (
        "caudal_crawl_delay_seconds",
        Kind::Gauge,
        "The delay in force between two request starts to the site (configured, robots.txt Crawl-delay, adaptive throttle), by site.",
    ),
    (
        "caudal_crawl_in_flight",
        Kind::Gauge,
        "Crawl requests (and command tasks naming the site) in flight, by site.",
    ),
    (
        "caudal_dataset_cache_hits_total",
        Kind::Counter,
        "Dataset row queries answered from the cache, by dataset.",
    ),
    (
        "caudal_dataset_cache_misses_total",
        Kind::Counter,
        "Dataset row queries read from the files, by dataset.",
    ),
    (
        "caudal_dataset_cache_invalidations_total",
        Kind::Counter,
        "Cached dataset results dropped because a partition they read was rewritten, by dataset.",
    ),
    (
        "caudal_dataset_cache_entries",
        Kind::Gauge,
        "Results in the in-process dataset cache.",
    ),
    (
        "caudal_dataset_cache_bytes",
        Kind::Gauge,
        "Bytes of results in the in-process dataset cache.",
    ),
    (
        "caudal_dataset_query_seconds",
        Kind::Histogram,
        "Time to answer a dataset row query, by dataset and cache (hit, miss).",
    ),
    (
        "caudal_dataset_files_read_total",
        Kind::Counter,
        "Data files opened by dataset row queries, by dataset.",
    ),
    (
        "caudal_dataset_files_pruned_total",
        Kind::Counter,
        "Data files dataset row queries skipped by their min/max, by dataset.",
    ),
    (
        "caudal_aggregate_records_total",
        Kind::Counter,
        "Records live aggregates counted, by aggregate.",
    ),
    (
        "caudal_aggregate_late_total",
        Kind::Counter,
        "Changes live aggregates did not count because their window had closed (past lateness), by aggregate.",
    ),
    (
        "caudal_aggregate_skipped_total",
        Kind::Counter,
        "Records live aggregates could not place (a group field missing, no event time), by aggregate.",
    ),
    (
        "caudal_alerts_firing",
        Kind::Gauge,
        "Firing instances of an alert rule, by alert and severity.",
    ),
    (
        "caudal_alert_notifications_total",
        Kind::Counter,
        "Alert notifications sent or failed (each failure is retried), by alert and outcome.",
    ),
    (
        "caudal_crawl_pages_total",
        Kind::Counter,
        "Crawl pages finished, by crawl (its frontier) and state (done, unchanged, failed, skipped).",
    ),
];

/// The help text of every metric (`# HELP` lines).
fn describe() {
    for (name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Shared by the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    metrics: PrometheusHandle,
    store: Store,
    started: Arc<AtomicBool>,
    api: Option<api::Api>,
    tls: Option<Tls>,
}

/// The certificate and key `caudal run` serves HTTPS with, loaded.
#[derive(Clone)]
pub struct Tls(axum_server::tls_rustls::RustlsConfig);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// Loads `[server] tls`: fails at start, naming the file, when the
/// certificate or the key cannot be used.
pub async fn load_tls(tls: &caudal_core::config::ServerTls) -> Result<Tls> {
    axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
        .await
        .map(Tls)
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!(
                    "server.tls: cannot serve HTTPS with cert {} and key {}",
                    tls.cert, tls.key
                ),
                e,
            )
        })
}

impl AppState {
    pub fn new(metrics: PrometheusHandle, store: Store) -> Self {
        Self {
            metrics,
            store,
            started: Arc::new(AtomicBool::new(false)),
            api: None,
            tls: None,
        }
    }

    /// Serves HTTPS with `tls`.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves the REST API under `/api/v1` too.
    pub fn with_api(mut self, api: api::Api) -> Self {
        self.api = Some(api);
        self
    }

    /// Marks every pipeline started: `/readyz` may answer 200.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }
}

/// The routes.
pub fn router(state: AppState) -> Router {
    let api = state.api.clone();
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    if let Some(api) = api {
        use utoipa::OpenApi as _;
        router = router
            .nest("/api/v1", api::routes(api.clone()))
            .merge(dashboard::routes(api))
            .merge(
                utoipa_swagger_ui::SwaggerUi::new("/api/docs")
                    .url("/api/openapi.json", openapi::ApiDoc::openapi()),
            );
    }
    router
}

async fn healthz() -> Response {
    json(StatusCode::OK, serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let started = state.started.load(Ordering::Acquire);
    let store = state.store.ping().await;
    let ready = started && store.is_ok();
    let mut checks = serde_json::Map::new();
    checks.insert(
        "pipelines".into(),
        (if started { "started" } else { "starting" }).into(),
    );
    checks.insert(
        "store".into(),
        match &store {
            Ok(()) => "ok".into(),
            Err(e) => e.report().into(),
        },
    );
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        serde_json::json!({"status": if ready { "ready" } else { "not ready" }, "checks": checks}),
    )
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Binds `listen` (so a taken port fails at start, with the address) and
/// serves until `shutdown`.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("server.listen: cannot listen on {listen}"),
            e,
        )
    })
}

/// Serves the routes on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut state = state;
    if let Some(api) = &mut state.api {
        api.set_shutdown(shutdown.clone());
    }
    if let Some(api) = &state.api {
        api.history()
            .sample(state.metrics.clone(), shutdown.clone());
    }
    let app = router(state.clone());
    // The exporter's histograms and counters are drained regularly.
    let upkeep = {
        let (handle, stop) = (state.metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    let served = match state.tls.clone() {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|e| Error::with_source(ErrorKind::Internal, "the HTTP server failed", e)),
        Some(Tls(tls)) => {
            let handle = axum_server::Handle::new();
            {
                let handle = handle.clone();
                tokio::spawn(async move {
                    shutdown.cancelled().await;
                    handle.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
                });
            }
            let listener = listener.into_std().map_err(|e| {
                Error::with_source(ErrorKind::Internal, "the HTTPS listener failed", e)
            })?;
            axum_server::from_tcp_rustls(listener, tls)
                .map_err(|e| Error::with_source(ErrorKind::Internal, "the HTTPS server failed", e))?
                .handle(handle)
                .serve(app.into_make_service())
                .await
                .map_err(|e| Error::with_source(ErrorKind::Internal, "the HTTPS server failed", e))
        }
    };
    upkeep.abort();
    served
}
