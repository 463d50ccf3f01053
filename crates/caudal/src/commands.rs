//! The commands: each resolves its arguments into library objects, calls
//! them, and turns the outcome into output and an exit code.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use caudal_core::config::{Config, load_file};
use caudal_core::status::PipelineStatus;
use caudal_core::{Error, ErrorKind};
use caudal_engine::maintenance::{Maintenance, Reset};
use caudal_engine::{Pipeline, Progress, RunSummary, Trigger};
use caudal_store::{RunOutcome, Store};
use tokio_util::sync::CancellationToken;

use caudal_server::openapi::{DeadLetter as Letter, DeadLetterDetail as LetterDetail};

use crate::cli::{BufferCommand, CdcCommand, CheckpointCommand, DlqCommand, TokenCommand};

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_BUSY: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Prints an error with its hint and returns the exit code for its kind.
pub fn fail(e: &Error) -> ExitCode {
    eprintln!("error: {}", e.report());
    if let Some(hint) = e.kind().hint() {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(match e.kind() {
        ErrorKind::Config => EXIT_CONFIG,
        ErrorKind::Busy => EXIT_BUSY,
        _ => EXIT_FAILED,
    })
}

/// Loads and validates the configuration, printing every problem.
pub fn load(path: &Path) -> Result<Config, ExitCode> {
    let loaded = load_file(path).map_err(|errors| print_config_errors(path, &errors));
    if let Ok(config) = &loaded {
        for w in &config.warnings {
            eprintln!("warning: {w}");
        }
    }
    loaded
}

/// Checks the fields aggregates read against their sources' tables
/// (PostgreSQL), printing each unknown one with where the file names it.
async fn check_aggregate_fields(path: &Path, config: &Config) -> Result<(), ExitCode> {
    if config.aggregates.is_empty() {
        return Ok(());
    }
    let problems = caudal_engine::aggregate::unknown_fields(config).await;
    if problems.is_empty() {
        return Ok(());
    }
    let errors = caudal_core::config::locate_in_file(path, problems);
    Err(print_config_errors(path, &errors))
}

/// Prints every configuration problem and their count; the exit code.
fn print_config_errors(path: &Path, errors: &caudal_core::config::ConfigErrors) -> ExitCode {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    let n = errors.0.len();
    eprintln!(
        "{n} error{} in {}",
        if n == 1 { "" } else { "s" },
        path.display()
    );
    ExitCode::from(EXIT_CONFIG)
}

/// Loads the configuration and opens its state store.
pub(crate) async fn load_with_store(path: &Path) -> Result<(Config, Store), ExitCode> {
    let config = load(path)?;
    let store = open_store(&config).await?;
    Ok((config, store))
}

async fn open_store(config: &Config) -> Result<Store, ExitCode> {
    Store::open(config.state.url.expose())
        .await
        .map_err(|e| fail(&e))
}

/// Refuses a pipeline name the configuration does not define, listing the
/// ones it does (exit code 2).
fn known_pipeline(config: &Config, name: &str) -> Result<(), ExitCode> {
    if config.pipelines.contains_key(name) {
        return Ok(());
    }
    let names: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
    eprintln!(
        "error: no pipeline named {name:?}; pipelines: {}",
        names.join(", ")
    );
    Err(ExitCode::from(EXIT_CONFIG))
}

/// A token cancelled by SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: stopping intake, finishing in-flight batches");
        t.cancel();
    });
    token
}

pub async fn run(path: &Path) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    if let Err(code) = check_aggregate_fields(path, &config).await {
        return code;
    }
    let mut pipelines = Vec::new();
    let mut reports = Vec::new();
    for name in config.pipelines.keys() {
        if caudal_engine::report::is_report(&config, name) {
            match caudal_engine::Report::build(name, &config, store.clone()).await {
                Ok(r) => reports.push(r),
                Err(e) => return fail(&e),
            }
            continue;
        }
        match Pipeline::build(name, &config, store.clone()).await {
            Ok(p) => pipelines.push(p),
            Err(e) => return fail(&e),
        }
    }
    if pipelines.is_empty() && reports.is_empty() && config.workflows.is_empty() {
        eprintln!(
            "error: {} defines no pipelines and no workflows",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Err(e) = caudal_engine::maintenance::release_removed(&config, &store).await {
        tracing::warn!(error = %e.report(), "cannot drop the slots of removed pipelines; trying again at the next start");
    }
    tracing::info!(
        pipelines = pipelines.len(),
        workflows = config.workflows.len(),
        state = store.backend(),
        "caudal running"
    );
    let shutdown = shutdown_on_signals();
    let control = caudal_engine::daemon::Control::default();
    let server = match &config.server {
        None => None,
        Some(server) => {
            match start_server(&config, server, &store, &pipelines, &control, &shutdown).await {
                Ok(s) => Some(s),
                Err(e) => return fail(&e),
            }
        }
    };
    if let Some((state, _)) = &server {
        state.set_started();
    }
    let workflows = async {
        if !config.workflows.is_empty() {
            caudal_engine::workflow::serve(
                std::sync::Arc::new(config.clone()),
                store.clone(),
                shutdown.clone(),
            )
            .await;
        }
    };
    let reports = caudal_engine::daemon::run_reports(
        reports,
        std::sync::Arc::new(config.clone()),
        store.clone(),
        shutdown.clone(),
    );
    let alerting = caudal_engine::alert::serve(
        std::sync::Arc::new(config.clone()),
        store.clone(),
        pipelines.clone(),
        shutdown.clone(),
    );
    let member = config
        .cluster
        .as_ref()
        .map(|c| caudal_engine::cluster::Member::for_pipelines(store.clone(), c, &pipelines));
    if let Some(m) = &member {
        tracing::info!(
            node = m.id(),
            lease_s = m.lease().as_secs_f64(),
            "joining the cluster"
        );
    }
    let backups = caudal_engine::backup::serve(
        std::sync::Arc::new(config.clone()),
        store.clone(),
        pipelines.clone(),
        shutdown.clone(),
    );
    tokio::join!(
        caudal_engine::daemon::run_node(pipelines, shutdown.clone(), control, member),
        workflows,
        reports,
        alerting,
        backups
    );
    if let Some((_, task)) = server {
        let _ = task.await;
    }
    tracing::info!("caudal stopped");
    ExitCode::SUCCESS
}

/// Serves `/healthz`, `/readyz`, `/metrics` and the API (pipelines and
/// workflows) until shutdown, and samples the pipelines' gauges for
/// `/metrics`.
async fn start_server(
    config: &Config,
    server: &caudal_core::config::ServerConfig,
    store: &Store,
    pipelines: &[Pipeline],
    control: &caudal_engine::daemon::Control,
    shutdown: &CancellationToken,
) -> Result<(caudal_server::AppState, tokio::task::JoinHandle<()>), Error> {
    let listen = server.address().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("server.listen: {:?} is not host:port", server.listen),
        )
    })?;
    let listener = caudal_server::bind(listen).await?;
    let handle = caudal_server::install_metrics()?;
    let config = std::sync::Arc::new(config.clone());
    let api = caudal_server::api::Api::new(
        config.clone(),
        store.clone(),
        control.clone(),
        pipelines.to_vec(),
        caudal_engine::workflow::Workflows::new(config, store.clone()),
        server.requests_per_second,
    );
    let mut state = caudal_server::AppState::new(handle, store.clone()).with_api(api);
    if let Some(tls) = &server.tls {
        state = state.with_tls(caudal_server::load_tls(tls).await?);
    }
    let sampled: Vec<Pipeline> = pipelines.to_vec();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for p in &sampled {
                p.sample_metrics().await;
            }
        }
    });
    tracing::info!(listen = %listen, "serving /healthz, /readyz, /metrics and /api/v1");
    let task = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = caudal_server::serve(listener, state, shutdown).await {
                tracing::error!(error = %e.report(), "the HTTP server stopped");
            }
        })
    };
    Ok((state, task))
}

pub async fn once(path: &Path, name: &str, date: Option<&str>) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    if crate::report::is_report(&config, name) {
        return crate::report::once(config, store, name, date).await;
    }
    if date.is_some() {
        eprintln!("error: --date applies to report pipelines (a source with mode = \"query\")");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Err(code) = check_aggregate_fields(path, &config).await {
        return code;
    }
    // A crawl source's pages are on the progress line too.
    let frontier = config
        .pipelines
        .get(name)
        .and_then(|p| config.sources.get(&p.source))
        .and_then(|s| s.crawl())
        .map(|_| (store.clone(), caudal_engine::pipeline::crawl_frontier(name)));
    let pipeline = match Pipeline::build(name, &config, store).await {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let shutdown = shutdown_on_signals();
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    let bar = crate::progress::spinner(name.to_string())
        .map(|bar| (bar.clone(), follow_progress(bar, rx, frontier)));
    let result = pipeline
        .run_once(Trigger::Manual, &shutdown, Some(tx))
        .await;
    if let Some((bar, task)) = bar {
        task.abort();
        crate::progress::clear(&bar);
    }
    match result {
        Err(e) => fail(&e),
        Ok(summary) => {
            println!("{}", summary_line(name, &summary));
            match summary.outcome {
                RunOutcome::Succeeded => ExitCode::SUCCESS,
                RunOutcome::Cancelled => ExitCode::from(EXIT_INTERRUPTED),
                _ => {
                    if let Some(e) = &summary.error {
                        eprintln!("error: {}", e.report());
                    }
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

/// Keeps the progress line of `caudal once` current: rows read and
/// delivered and, for a crawl source (its `frontier` in the store), the
/// pages done and queued.
fn follow_progress(
    bar: indicatif::ProgressBar,
    mut rx: tokio::sync::watch::Receiver<Progress>,
    frontier: Option<(caudal_store::Store, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut pages: Option<String> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick(), if frontier.is_some() => {
                    if let Some((store, name)) = &frontier {
                        pages = crate::progress::frontier(store, name)
                            .await
                            .map(|f| crate::progress::pages_text(&f));
                    }
                }
            }
            let p = *rx.borrow();
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let mut message = format!(
                "{} read, {} delivered, {:.0} rows/s",
                p.rows_read,
                p.rows_delivered,
                p.rows_delivered as f64 / secs
            );
            if let Some(pages) = &pages {
                message.push_str(&format!("; {pages}"));
            }
            bar.set_message(message);
        }
    })
}

fn summary_line(name: &str, s: &RunSummary) -> String {
    let secs = s.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        s.rows_delivered as f64 / secs
    } else {
        0.0
    };
    let checkpoint = s
        .checkpoint
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display());
    let dead = if s.dead_letters > 0 {
        format!(", {} dead letters (see `caudal dlq list`)", s.dead_letters)
    } else {
        String::new()
    };
    format!(
        "{name}: run {} {}: {} rows read, {} delivered{dead} in {} batches, {:.2}s ({:.0} rows/s); checkpoint {checkpoint}",
        s.run_id,
        s.outcome.as_str(),
        s.rows_read,
        s.rows_delivered,
        s.batches,
        secs,
        rate
    )
}

pub async fn status(path: &Path, json: bool) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let mut rows = Vec::new();
    for name in config.pipelines.keys() {
        match caudal_engine::status::pipeline_status(&config, &store, name, None).await {
            Ok(row) => rows.push(row),
            Err(e) => return fail(&e),
        }
    }
    print_status(&rows, json);
    if !json && config.cluster.is_some() {
        match caudal_engine::cluster::nodes(&store).await {
            Ok(nodes) => {
                println!();
                print_nodes(&nodes);
            }
            Err(e) => return fail(&e),
        }
    }
    if !json && !config.alerts.is_empty() {
        match store.alert_instances(None).await {
            Ok(instances) => print_alerts(&config, &instances),
            Err(e) => return fail(&e),
        }
    }
    ExitCode::SUCCESS
}

/// `caudal node list` and `caudal node drain`.
pub async fn node(path: &Path, command: &crate::cli::NodeCommand) -> ExitCode {
    use crate::cli::NodeCommand;
    let (_, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    match command {
        NodeCommand::List { json } => match caudal_engine::cluster::nodes(&store).await {
            Ok(nodes) if *json => {
                println!("{}", serde_json::to_string(&nodes).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(nodes) => {
                print_nodes(&nodes);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        NodeCommand::Drain { node } => match caudal_engine::cluster::drain(&store, node).await {
            Ok(n) => {
                println!(
                    "node {} is draining: it hands over {} pipeline(s), then exits",
                    n.id,
                    n.pipelines.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// Prints the nodes (none: a line saying so).
fn print_nodes(nodes: &[caudal_engine::cluster::NodeView]) {
    if nodes.is_empty() {
        println!("nodes: none registered");
        return;
    }
    let table: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            [
                n.id.clone(),
                if n.sites_node {
                    format!("{} (sites)", n.state)
                } else {
                    n.state.clone()
                },
                format!("{:.1}s ago", n.heartbeat_age_s),
                n.version.clone(),
                n.started_at.clone(),
                if n.pipelines.is_empty() {
                    "-".into()
                } else {
                    n.pipelines.join(", ")
                },
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "STATE",
            "HEARTBEAT",
            "VERSION",
            "STARTED",
            "PIPELINES",
        ],
        &table,
    );
}

/// Prints the pending and firing alerts (none: a line saying so).
fn print_alerts(config: &Config, instances: &[caudal_store::AlertInstanceRow]) {
    println!();
    if instances.is_empty() {
        println!(
            "alerts: none pending or firing ({} rules)",
            config.alerts.len()
        );
        return;
    }
    let table: Vec<[String; 6]> = instances
        .iter()
        .map(|i| {
            let severity = config
                .alerts
                .get(&i.alert)
                .map_or("-", |a| a.severity.as_str());
            [
                i.alert.clone(),
                i.state.clone(),
                severity.to_string(),
                i.labels.clone(),
                i.value.map_or_else(|| "-".into(), |v| v.to_string()),
                i.since.to_string(),
            ]
        })
        .collect();
    print_table(
        &["ALERT", "STATE", "SEVERITY", "LABELS", "VALUE", "SINCE"],
        &table,
    );
}

/// Prints pipeline status rows (from the store or the API).
pub(crate) fn print_status(rows: &[PipelineStatus], json: bool) {
    if json {
        println!("{}", serde_json::to_string(rows).unwrap_or_default());
        return;
    }
    let headers = [
        "PIPELINE",
        "SCHEDULE",
        "LAST RUN",
        "OUTCOME",
        "ROWS",
        "CHECKPOINT",
        "NEXT RUN",
        "BUFFERED",
        "CIRCUIT",
        "LAG",
    ];
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
    let table: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            let rows = match (r.rows_read, r.rows_delivered) {
                (Some(a), Some(b)) => format!("{a} read / {b} sent"),
                _ => "-".into(),
            };
            [
                r.pipeline.clone(),
                r.schedule.clone(),
                text(&r.last_run),
                text(&r.outcome),
                rows,
                text(&r.checkpoint),
                text(&r.next_run),
                r.buffered_batches
                    .map_or_else(|| "-".into(), |n| format!("{n} batches")),
                text(&r.circuit),
                r.lag_text(),
            ]
        })
        .collect();
    print_table(&headers, &table);
    for r in rows {
        if let Some(e) = &r.error {
            println!("{}: last error: {e}", r.pipeline);
        }
        if let Some(why) = &r.intake_blocked {
            println!("{}: reading waits: {why}", r.pipeline);
        }
        if let Some(b) = &r.broker
            && let Some(e) = &b.last_error
        {
            println!("{}: broker: {e}", r.pipeline);
        }
    }
}

/// Prints dead letters (from the store or the API).
pub(crate) fn print_letters(rows: &[Letter], json: bool) {
    if json {
        for l in rows {
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        }
        return;
    }
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|l| {
            [
                l.id.to_string(),
                l.pipeline.clone(),
                l.state.clone(),
                l.record_key.clone().unwrap_or_else(|| "-".into()),
                l.status.map_or_else(|| "-".into(), |s| s.to_string()),
                l.attempts.to_string(),
                l.reason.chars().take(80).collect(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "PIPELINE", "STATE", "KEY", "STATUS", "ATTEMPTS", "REASON",
        ],
        &table,
    );
}

pub(crate) fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub async fn checkpoint(path: &Path, command: &CheckpointCommand) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let name = match command {
        CheckpointCommand::Show { pipeline } | CheckpointCommand::Reset { pipeline } => pipeline,
    };
    if let Err(code) = known_pipeline(&config, name) {
        return code;
    }
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    if caudal_engine::report::is_report(&config, name) {
        return crate::report::checkpoint(&config, &store, name, command).await;
    }
    match command {
        CheckpointCommand::Show { .. } => match store.checkpoint(name).await {
            Err(e) => fail(&e),
            Ok(None) => {
                println!("{name}: no checkpoint (the next run reads from the start)");
                ExitCode::SUCCESS
            }
            Ok(Some(cp)) => {
                let out = caudal_server::openapi::Checkpoint {
                    pipeline: name.clone(),
                    position: cp.position,
                    updated_at: cp.updated_at.to_string(),
                };
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                ExitCode::SUCCESS
            }
        },
        CheckpointCommand::Reset { .. } => {
            match maintenance(&config, &store, name) {
                Ok(m) => match m.reset_checkpoint(None).await {
                    Ok(reset) => print_reset(name, reset),
                    Err(e) => return fail(&e),
                },
                Err(code) => return code,
            }
            ExitCode::SUCCESS
        }
    }
}

/// The maintenance of pipeline `name` (exit code 2 when there is none).
fn maintenance<'a>(
    config: &'a Config,
    store: &'a Store,
    name: &'a str,
) -> Result<Maintenance<'a>, ExitCode> {
    known_pipeline(config, name)?;
    Maintenance::new(config, store, name).map_err(|e| fail(&e))
}

fn print_reset(name: &str, reset: Reset) {
    if reset.had_checkpoint {
        println!("{name}: checkpoint reset; the next run reads the source from the start");
    } else {
        println!("{name}: had no checkpoint");
    }
    if reset.dropped_batches > 0 {
        println!(
            "{name}: dropped {} batches waiting in the buffer (they are read again from the source)",
            reset.dropped_batches
        );
    }
    if reset.forgot_frontier {
        println!("{name}: crawl frontier forgotten; the next run crawls from its start URLs");
    }
}

fn print_released(name: &str, released: &caudal_engine::maintenance::Released) {
    for d in &released.dropped {
        println!("{name}: dropped {d}");
    }
    for k in &released.kept {
        println!("{name}: kept {k}");
    }
    if let Some(note) = &released.note {
        println!("{name}: {note}");
    }
}

pub async fn cdc(path: &Path, command: &CdcCommand) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let CdcCommand::Drop { pipeline: name } = command;
    let m = match maintenance(&config, &store, name) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match m.drop_replication().await {
        Err(e) => fail(&e),
        Ok(released) => {
            print_released(name, &released);
            ExitCode::SUCCESS
        }
    }
}

pub async fn resync(path: &Path, name: &str) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let m = match maintenance(&config, &store, name) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match m.resync(None).await {
        Err(e) => fail(&e),
        Ok(done) => {
            print_reset(name, done.reset);
            print_released(name, &done.released);
            ExitCode::SUCCESS
        }
    }
}

/// How long `caudal backfill` waits for the running pipeline to take the
/// request before saying it is not running.
const BACKFILL_PICKUP: Duration = Duration::from_secs(30);

pub async fn backfill(path: &Path, name: &str, table: &str, filter: Option<&str>) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let m = match maintenance(&config, &store, name) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let ticket = match m.request_backfill(table, filter).await {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let bar = indicatif::ProgressBar::new(ticket.rows);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} rows ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{name}: backfill of {table}"));
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let shutdown = shutdown_on_signals();
    let outcome = loop {
        match m.backfill_progress(&ticket.id).await.ok().flatten() {
            Some(p) if p.done => break Ok(p),
            Some(p) => bar.set_position(p.rows),
            None if started.elapsed() > BACKFILL_PICKUP => {
                break Err(format!(
                    "the request was not taken within {}s: is `caudal run` streaming pipeline {name:?}? \
                     (the request is withdrawn; a later start does not run it)",
                    BACKFILL_PICKUP.as_secs()
                ));
            }
            None => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => break Err("interrupted; the backfill goes on in the pipeline".into()),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    };
    bar.finish_and_clear();
    let _ = m.withdraw_backfill(&ticket.id).await;
    match outcome {
        Ok(p) if p.error.is_none() => {
            println!(
                "{name}: backfill of {table} done: {} rows sent as read records ({} matched when it started), {:.1}s",
                p.rows,
                ticket.rows,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Ok(p) => {
            eprintln!(
                "error: backfill of {table} failed: {}",
                p.error.unwrap_or_default()
            );
            ExitCode::from(EXIT_FAILED)
        }
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

pub fn validate(path: &Path) -> ExitCode {
    match load(path) {
        Err(code) => code,
        Ok(c) => {
            println!(
                "{}: ok ({} sources, {} sinks, {} pipelines)",
                path.display(),
                c.sources.len(),
                c.sinks.len(),
                c.pipelines.len()
            );
            ExitCode::SUCCESS
        }
    }
}

pub fn schema() -> ExitCode {
    let schema = caudal_core::config::load::json_schema();
    println!(
        "{}",
        serde_json::to_string_pretty(&schema).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

pub async fn dlq(path: &Path, command: &DlqCommand) -> ExitCode {
    use caudal_store::DeadLetterState;
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    match command {
        DlqCommand::List {
            pipeline,
            all,
            json,
        } => {
            let state = (!all).then_some(DeadLetterState::Pending);
            let mut after = 0;
            let mut rows = Vec::new();
            loop {
                let page = match store
                    .dead_letters(pipeline.as_deref(), state, after, 1000)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => return fail(&e),
                };
                let Some(last) = page.last() else { break };
                after = last.id;
                rows.extend(page);
            }
            let rows: Vec<Letter> = rows.iter().map(Letter::from).collect();
            print_letters(&rows, *json);
            ExitCode::SUCCESS
        }
        DlqCommand::Show { id } => match store.dead_letter(*id).await {
            Err(e) => fail(&e),
            Ok(None) => {
                eprintln!("error: no dead letter {id}");
                ExitCode::from(EXIT_FAILED)
            }
            Ok(Some(l)) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&LetterDetail::from(&l)).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
        },
        DlqCommand::Replay { pipeline, ids } => {
            let p = match Pipeline::build(pipeline, &config, store).await {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            match p.replay_dead_letters(only, &shutdown_on_signals()).await {
                Err(e) => fail(&e),
                Ok(r) => {
                    println!(
                        "{pipeline}: replayed {} dead letters: {} delivered, {} refused again (new dead letters)",
                        r.delivered + r.rejected_again,
                        r.delivered,
                        r.rejected_again
                    );
                    ExitCode::SUCCESS
                }
            }
        }
        DlqCommand::Discard { ids } => match store
            .resolve_dead_letters(ids, DeadLetterState::Discarded)
            .await
        {
            Err(e) => fail(&e),
            Ok(n) => {
                println!("discarded {n} dead letters");
                ExitCode::SUCCESS
            }
        },
    }
}

pub async fn buffer(path: &Path, command: &BufferCommand) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (BufferCommand::Inspect { pipeline, json } | BufferCommand::Fsck { pipeline, json }) =
        command;
    // The buffer is read without the state store.
    let store = match Store::open("sqlite::memory:").await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let m = match maintenance(&config, &store, pipeline) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let none_yet = || {
        println!(
            "{pipeline}: no buffer yet at {} (the pipeline has not run)",
            m.buffer_dir().display()
        );
        ExitCode::SUCCESS
    };
    let show = |text: String, value: serde_json::Result<String>| {
        if *json {
            println!("{}", value.unwrap_or_default());
        } else {
            print!("{text}");
        }
    };
    match command {
        BufferCommand::Inspect { .. } => match m.inspect_buffer() {
            Err(e) => fail(&e),
            Ok(None) => none_yet(),
            Ok(Some(i)) => {
                show(i.to_string(), serde_json::to_string(&i));
                ExitCode::SUCCESS
            }
        },
        BufferCommand::Fsck { .. } => match m.fsck_buffer() {
            Err(e) => fail(&e),
            Ok(None) => none_yet(),
            Ok(Some(report)) => {
                show(report.to_string(), serde_json::to_string(&report));
                if report.has_corruption() {
                    ExitCode::from(EXIT_FAILED)
                } else {
                    ExitCode::SUCCESS
                }
            }
        },
    }
}

pub async fn token(path: &Path, command: &TokenCommand) -> ExitCode {
    let (_, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    match command {
        TokenCommand::Create { name, role } => {
            let (token, hash) = caudal_server::api::new_token();
            if let Err(e) = store.create_token(name, role, &hash).await {
                return fail(&e);
            }
            println!("{token}");
            eprintln!(
                "token {name:?} ({role}) created; it is shown only now: keep it in a secret store"
            );
            ExitCode::SUCCESS
        }
        TokenCommand::List => match store.tokens().await {
            Err(e) => fail(&e),
            Ok(list) => {
                println!("{:<24} {:<9} {:<27} REVOKED", "NAME", "ROLE", "CREATED");
                for t in list {
                    println!(
                        "{:<24} {:<9} {:<27} {}",
                        t.name,
                        t.role,
                        t.created_at.to_string(),
                        t.revoked_at
                            .map_or_else(|| "-".to_string(), |r| r.to_string())
                    );
                }
                ExitCode::SUCCESS
            }
        },
        TokenCommand::Revoke { name } => match store.revoke_token(name).await {
            Err(e) => fail(&e),
            Ok(true) => {
                println!("token {name:?} revoked");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("error: no live token named {name:?}");
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}
