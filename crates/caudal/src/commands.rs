//! The commands: each resolves its arguments into library objects, calls
//! them, and turns the outcome into output and an exit code.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use caudal_connectors::sources::cdc::CdcSource;
use caudal_core::config::{Config, load_file};
use caudal_core::{Error, ErrorKind};
use caudal_engine::{Pipeline, Progress, RunSummary, Trigger};
use caudal_store::{RunOutcome, Store};
use tokio_util::sync::CancellationToken;

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
    load_file(path).map_err(|errors| {
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
    })
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
    let mut pipelines = Vec::new();
    for name in config.pipelines.keys() {
        match Pipeline::build(name, &config, store.clone()).await {
            Ok(p) => pipelines.push(p),
            Err(e) => return fail(&e),
        }
    }
    if pipelines.is_empty() {
        eprintln!("error: {} defines no pipelines", path.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Err(e) = caudal_engine::drop_removed_slots(&config, &store).await {
        tracing::warn!(error = %e.report(), "cannot drop the slots of removed pipelines; trying again at the next start");
    }
    tracing::info!(
        pipelines = pipelines.len(),
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
    caudal_engine::daemon::run_with(pipelines, shutdown, control).await;
    if let Some((_, task)) = server {
        let _ = task.await;
    }
    tracing::info!("caudal stopped");
    ExitCode::SUCCESS
}

/// Serves `/healthz`, `/readyz` and `/metrics` until shutdown, and samples
/// the pipelines' gauges for `/metrics`.
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
    let api = caudal_server::api::Api::new(
        std::sync::Arc::new(config.clone()),
        store.clone(),
        control.clone(),
        pipelines.to_vec(),
        server.requests_per_second,
    );
    let state = caudal_server::AppState::new(handle, store.clone()).with_api(api);
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

pub async fn once(path: &Path, name: &str) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let pipeline = match Pipeline::build(name, &config, store).await {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let shutdown = shutdown_on_signals();
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| progress_bar(name, rx));
    let result = pipeline
        .run_once(Trigger::Manual, &shutdown, Some(tx))
        .await;
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
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

fn progress_bar(
    name: &str,
    mut rx: tokio::sync::watch::Receiver<Progress>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_prefix(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let b = bar.clone();
    let task = tokio::spawn(async move {
        let start = std::time::Instant::now();
        while rx.changed().await.is_ok() {
            let p = *rx.borrow();
            let secs = start.elapsed().as_secs_f64().max(0.001);
            b.set_message(format!(
                "{} read, {} delivered, {:.0} rows/s",
                p.rows_read,
                p.rows_delivered,
                p.rows_delivered as f64 / secs
            ));
        }
    });
    (bar, task)
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
        match caudal_engine::status::pipeline_status(&config, &store, name).await {
            Ok(row) => rows.push(row),
            Err(e) => return fail(&e),
        }
    }
    print_status(rows, json);
    ExitCode::SUCCESS
}

/// Prints pipeline status rows (from the store or the API).
pub(crate) fn print_status(rows: Vec<serde_json::Value>, json: bool) {
    if json {
        println!("{}", serde_json::Value::Array(rows));
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
    let table: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| {
                r[k].as_str()
                    .map_or_else(|| "-".to_string(), str::to_string)
            };
            let rows = match (r["rows_read"].as_u64(), r["rows_delivered"].as_u64()) {
                (Some(a), Some(b)) => format!("{a} read / {b} sent"),
                _ => "-".into(),
            };
            [
                s("pipeline"),
                s("schedule"),
                s("last_run"),
                s("outcome"),
                rows,
                s("checkpoint"),
                s("next_run"),
                r["buffered_batches"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |n| format!("{n} batches")),
                s("circuit"),
                lag_text(&r["replication"]),
            ]
        })
        .collect();
    print_table(&headers, &table);
    for r in &rows {
        if let Some(e) = r["error"].as_str() {
            println!("{}: last error: {e}", r["pipeline"].as_str().unwrap_or("?"));
        }
    }
}

/// Prints dead letters (as JSON, from the store or the API).
pub(crate) fn print_letters(rows: &[serde_json::Value], json: bool) {
    if json {
        for l in rows {
            println!("{l}");
        }
        return;
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|l| {
            [
                text(&l["id"]),
                text(&l["pipeline"]),
                text(&l["state"]),
                text(&l["record_key"]),
                text(&l["status"]),
                text(&l["attempts"]),
                text(&l["reason"]).chars().take(80).collect(),
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

fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
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
    match command {
        CheckpointCommand::Show { .. } => match store.checkpoint(name).await {
            Err(e) => fail(&e),
            Ok(None) => {
                println!("{name}: no checkpoint (the next run reads from the start)");
                ExitCode::SUCCESS
            }
            Ok(Some(cp)) => {
                let out = serde_json::json!({
                    "pipeline": name,
                    "position": cp.position,
                    "updated_at": cp.updated_at.to_string(),
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                ExitCode::SUCCESS
            }
        },
        CheckpointCommand::Reset { .. } => reset(&config, &store, name).await,
    }
}

/// Forgets the checkpoint, then drops the batches waiting in the buffer
/// (they are read again from the source). The buffer is opened first, so a
/// running pipeline refuses the reset (`Busy`) before anything changes, and
/// acknowledged last, so a crash in between loses nothing (the batches are
/// then still delivered, and the next run resumes after them as if the
/// reset had not been made).
async fn reset(config: &Config, store: &Store, name: &str) -> ExitCode {
    use caudal_engine::buffered;
    let dir = config.buffer_dir(name);
    let buffer = if dir.exists() {
        let settings = buffered::buffer_config(&config.pipelines[name].buffer);
        match buffered::open(name, &dir, settings).await {
            Ok(b) => Some(b),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    match store.reset_checkpoint(name).await {
        Err(e) => return fail(&e),
        Ok(true) => {
            println!("{name}: checkpoint reset; the next run reads the source from the start")
        }
        Ok(false) => println!("{name}: had no checkpoint"),
    }
    if let Some(buffer) = buffer {
        let waiting = buffer.next_offset() - buffer.acked();
        if let Err(e) = buffer.ack(buffer.next_offset()).await {
            return fail(&buffered::buffer_error(name, e));
        }
        if waiting > 0 {
            println!(
                "{name}: dropped {waiting} batches waiting in the buffer (they are read again from the source)"
            );
        }
    }
    ExitCode::SUCCESS
}

/// The CDC source of a pipeline, or an error saying it has none.
async fn cdc_source(config: &Config, name: &str) -> Result<CdcSource, ExitCode> {
    known_pipeline(config, name)?;
    let p = &config.pipelines[name];
    let source = config.sources.get(&p.source);
    match source {
        Some(s) if s.sql().mode == caudal_core::config::SqlMode::Cdc => {
            CdcSource::connect(name, &p.source, s)
                .await
                .map_err(|e| fail(&e))
        }
        _ => {
            eprintln!(
                "error: pipeline {name:?} does not capture changes (its source is not mode = \"cdc\")"
            );
            Err(ExitCode::from(2))
        }
    }
}

/// Opens a pipeline's buffer, which fails (`Busy`) while a process runs it.
async fn hold_buffer(
    config: &Config,
    name: &str,
) -> Result<Option<caudal_buffer::Buffer>, ExitCode> {
    use caudal_engine::buffered;
    let dir = config.buffer_dir(name);
    if !dir.exists() {
        return Ok(None);
    }
    let settings = buffered::buffer_config(&config.pipelines[name].buffer);
    buffered::open(name, &dir, settings)
        .await
        .map(Some)
        .map_err(|e| fail(&e))
}

pub async fn cdc(path: &Path, command: &CdcCommand) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let CdcCommand::Drop { pipeline: name } = command;
    let source = match cdc_source(&config, name).await {
        Ok(CdcSource::Postgres(s)) => s,
        Ok(CdcSource::Mysql(s)) => {
            println!(
                "{name}: a binary log replica (server_id {}) keeps nothing on the server; nothing to drop",
                s.server_id()
            );
            return ExitCode::SUCCESS;
        }
        Err(code) => return code,
    };
    // Refused while the pipeline runs.
    let _buffer = match hold_buffer(&config, name).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let ours = match caudal_engine::created_publication(&store, name).await {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    match source.drop_replication(ours).await {
        Err(e) => fail(&e),
        Ok(d) => {
            if !ours {
                println!(
                    "{name}: publication {:?} was not created by caudal; kept",
                    source.publication()
                );
            }
            match (&d.slot, &d.publication) {
                (None, None) => println!(
                    "{name}: no slot {:?} nor publication {:?} to drop",
                    source.slot(),
                    source.publication()
                ),
                _ => {
                    if let Some(s) = &d.slot {
                        println!("{name}: dropped replication slot {s:?}");
                    }
                    if let Some(p) = &d.publication {
                        println!("{name}: dropped publication {p:?}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}

pub async fn resync(path: &Path, name: &str) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let source = match cdc_source(&config, name).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(code) = hold_buffer(&config, name).await {
        return code;
    }
    // The publication stays: the next run uses it again.
    if let CdcSource::Postgres(pg) = &source {
        match pg.drop_replication(false).await {
            Err(e) => return fail(&e),
            Ok(d) => {
                if let Some(s) = &d.slot {
                    println!("{name}: dropped replication slot {s:?}");
                }
            }
        }
    }
    if let Err(e) = store.clear_source_state(name).await {
        return fail(&e);
    }
    let code = reset(&config, &store, name).await;
    if code == ExitCode::SUCCESS {
        match &source {
            CdcSource::Postgres(pg) => println!(
                "{name}: the next run creates slot {:?}, reads the tables again and streams from there",
                pg.slot()
            ),
            CdcSource::Mysql(_) => println!(
                "{name}: the next run reads the tables again and streams the binary log from there"
            ),
        }
    }
    code
}

/// How long `caudal backfill` waits for the running pipeline to take the
/// request before saying it is not running.
const BACKFILL_PICKUP: Duration = Duration::from_secs(30);

pub async fn backfill(path: &Path, name: &str, table: &str, filter: Option<&str>) -> ExitCode {
    use caudal_connectors::sources::cdc::BackfillProgress;
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    if let Err(code) = known_pipeline(&config, name) {
        return code;
    }
    let (id, total) =
        match caudal_engine::request_backfill(&config, &store, name, table, filter).await {
            Ok(both) => both,
            Err(e) => return fail(&e),
        };
    let bar = indicatif::ProgressBar::new(total);
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
        let progress: Option<BackfillProgress> = store
            .source_state(name)
            .await
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_value(s.state["backfill"].clone()).ok())
            .filter(|p: &BackfillProgress| p.id == id);
        match progress {
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
    let _ = store
        .clear_source_state(&caudal_engine::backfill_key(name, &id))
        .await;
    match outcome {
        Ok(p) if p.error.is_none() => {
            println!(
                "{name}: backfill of {table} done: {} rows sent as read records ({} matched when it started), {:.1}s",
                p.rows,
                total,
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

/// `12.3 KiB / 0.4s` of a CDC pipeline's replication status.
pub(crate) fn lag_text(r: &serde_json::Value) -> String {
    if r.is_null() {
        return "-".into();
    }
    if r["slot_exists"] == serde_json::Value::Bool(false) {
        return "slot missing".into();
    }
    if r["log_purged"] == serde_json::Value::Bool(true) {
        return "log purged".into();
    }
    let bytes = r["lag_bytes"].as_u64().map_or_else(
        || "?".into(),
        |b| caudal_core::units::ByteSize(b).to_string(),
    );
    let secs = r["lag_seconds"]
        .as_f64()
        .map_or_else(|| "?".into(), |s| format!("{s:.1}s"));
    format!("{bytes} / {secs}")
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
            let rows: Vec<serde_json::Value> = rows.iter().map(|l| letter_json(l, false)).collect();
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
                    serde_json::to_string_pretty(&letter_json(&l, true)).unwrap_or_default()
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

fn letter_json(l: &caudal_store::DeadLetter, whole: bool) -> serde_json::Value {
    l.to_json(whole)
}

pub async fn buffer(path: &Path, command: &BufferCommand) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (BufferCommand::Inspect { pipeline, json } | BufferCommand::Fsck { pipeline, json }) =
        command;
    if let Err(code) = known_pipeline(&config, pipeline) {
        return code;
    }
    let dir = config.buffer_dir(pipeline);
    if !dir.exists() {
        println!(
            "{pipeline}: no buffer yet at {} (the pipeline has not run)",
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let show = |text: String, value: serde_json::Result<String>| {
        if *json {
            println!("{}", value.unwrap_or_default());
        } else {
            print!("{text}");
        }
    };
    match command {
        BufferCommand::Inspect { .. } => match caudal_buffer::inspect(&dir) {
            Err(e) => fail(&caudal_engine::buffered::buffer_error(pipeline, e)),
            Ok(i) => {
                show(i.to_string(), serde_json::to_string(&i));
                ExitCode::SUCCESS
            }
        },
        BufferCommand::Fsck { .. } => match caudal_buffer::fsck(&dir) {
            Err(e) => fail(&caudal_engine::buffered::buffer_error(pipeline, e)),
            Ok(report) => {
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
