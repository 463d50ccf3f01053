//! What `caudal run` serves over HTTP when `[server]` is configured:
//! `/healthz` (the process answers), `/readyz` (the state store answers and
//! every pipeline has started) and `/metrics` (Prometheus text format).
//!
//! Metrics are recorded through the `metrics` facade by the engine and the
//! connectors; [`install_metrics`] installs the Prometheus recorder once per
//! process. Without it (every command but `run`), recording is a no-op.

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

/// Buckets of the duration histograms, in seconds: 1 ms to 5 min.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
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

/// The help text of every metric (`# HELP` lines).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "caudal_records_read_total",
        "Records read from the pipeline's source."
    );
    describe_counter!(
        "caudal_records_delivered_total",
        "Records the sink accepted."
    );
    describe_counter!(
        "caudal_records_rejected_total",
        "Records kept as dead letters (refused by the sink or failing the schema)."
    );
    describe_counter!(
        "caudal_batches_total",
        "Batches delivered or rejected by the sink, by outcome."
    );
    describe_counter!(
        "caudal_sink_requests_total",
        "Requests sent to the sink, by outcome (delivered, retry, rejected, split)."
    );
    describe_counter!(
        "caudal_sink_retries_total",
        "Delivery attempts that will be retried."
    );
    describe_counter!(
        "caudal_sink_sent_bytes_total",
        Unit::Bytes,
        "Request body bytes sent to the sink."
    );
    describe_histogram!(
        "caudal_sink_request_duration_seconds",
        Unit::Seconds,
        "Time from sending a request to the sink to its answer."
    );
    describe_gauge!(
        "caudal_sink_circuit_state",
        "The sink's circuit breaker: 0 closed, 1 half open, 2 open."
    );
    describe_gauge!(
        "caudal_buffer_records",
        "Records in the pipeline's buffer not yet delivered."
    );
    describe_gauge!(
        "caudal_buffer_bytes",
        Unit::Bytes,
        "Bytes of the pipeline's buffer not yet delivered."
    );
    describe_gauge!(
        "caudal_checkpoint_age_seconds",
        Unit::Seconds,
        "Seconds since the pipeline's checkpoint last moved."
    );
    describe_gauge!(
        "caudal_replication_lag_bytes",
        Unit::Bytes,
        "CDC: bytes of log between the server's end and what caudal confirmed or read."
    );
    describe_gauge!(
        "caudal_replication_lag_seconds",
        Unit::Seconds,
        "CDC: seconds between the last transaction read and when it was read."
    );
    describe_counter!("caudal_runs_total", "Runs ended, by outcome.");
    describe_histogram!(
        "caudal_run_duration_seconds",
        Unit::Seconds,
        "How long runs took."
    );
}

/// Shared by the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    metrics: PrometheusHandle,
    store: Store,
    started: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(metrics: PrometheusHandle, store: Store) -> Self {
        Self {
            metrics,
            store,
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks every pipeline started: `/readyz` may answer 200.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
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
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "the HTTP server failed", e));
    upkeep.abort();
    served
}
