//! The `caudal` binary: parses arguments, sets up logging, and hands off to
//! a command. Everything else lives in the library crates.

mod backup;
mod cli;
mod commands;
mod demo;
mod doctor;
mod progress;
mod remote;
mod report;
mod top;
mod workflow;

use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: a pipeline allocates and frees
/// millions of small values (one JSON map per record) across the runtime's
/// threads, where glibc keeps freed memory in per-thread arenas (a MariaDB
/// CDC drain peaked at 200 MiB of RSS over a 15 MiB heap) and spends more
/// time per allocation. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs stay at warnings unless asked.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Demo(_), "info") => "warn",
        // Doctor's report is its output; a broker client's log of a
        // refused lookup (RabbitMQ closes the channel) is not news.
        (Command::Doctor { .. }, "info") => "warn,lapin=off",
        (_, level) => level,
    };
    let traces = init_logging(level, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        match &cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Run => commands::run(&cli.config).await,
            Command::Once { pipeline, date } => {
                commands::once(&cli.config, pipeline, date.as_deref()).await
            }
            Command::Status { json } => match remote::Remote::from_args(&cli) {
                Some(r) => r.status(*json).await,
                None => commands::status(&cli.config, *json).await,
            },
            Command::Checkpoint(c) => commands::checkpoint(&cli.config, c).await,
            Command::Dlq(c) => match remote::Remote::from_args(&cli) {
                Some(r) => r.dlq(c).await,
                None => commands::dlq(&cli.config, c).await,
            },
            Command::Buffer(c) => commands::buffer(&cli.config, c).await,
            Command::Validate => commands::validate(&cli.config),
            Command::Doctor {
                json,
                strict,
                timeout,
            } => doctor::doctor(&cli.config, *json, *strict, *timeout).await,
            Command::Schema => commands::schema(),
            Command::Completions { shell } => {
                let mut cli = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(*shell, &mut cli, "caudal", &mut std::io::stdout());
                ExitCode::SUCCESS
            }
            Command::Man => {
                let cli = <Cli as clap::CommandFactory>::command();
                match clap_mangen::Man::new(cli).render(&mut std::io::stdout()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: cannot write the manual page: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Cdc(c) => commands::cdc(&cli.config, c).await,
            Command::Token(c) => commands::token(&cli.config, c).await,
            Command::Workflow(c) => workflow::command(&cli.config, c).await,
            Command::Node(c) => commands::node(&cli.config, c).await,
            Command::Top => top::top(&cli.config, remote::Remote::from_args(&cli)).await,
            Command::Resync { pipeline } => commands::resync(&cli.config, pipeline).await,
            Command::Backup { to, json } => {
                backup::backup(
                    &cli.config,
                    remote::Remote::from_args(&cli),
                    to.as_deref(),
                    *json,
                )
                .await
            }
            Command::Restore {
                from,
                store_restored,
            } => backup::restore(&cli.config, from, *store_restored).await,
            Command::Backfill {
                pipeline,
                from,
                to,
                parallel,
                table,
                filter,
            } => match (table, from, to) {
                (Some(table), None, None) => {
                    commands::backfill(&cli.config, pipeline, table, filter.as_deref()).await
                }
                (None, Some(from), Some(to)) if filter.is_none() => {
                    crate::report::backfill(&cli.config, pipeline, from, to, *parallel).await
                }
                _ => {
                    eprintln!(
                        "error: give either --from and --to (a report pipeline) or --table \
                         [--where] (a CDC pipeline)"
                    );
                    std::process::ExitCode::from(commands::EXIT_CONFIG)
                }
            },
        }
    });
    // Do not wait for stray blocking tasks (e.g. a stdin reader) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(provider) = traces
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: not every trace was sent: {e}");
    }
    code
}

/// Logs to standard error (above a progress line, if one is drawn),
/// readable or JSON; with an OTLP endpoint in the
/// environment (`OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), spans (runs, batch deliveries) go
/// there too over OTLP/HTTP. Returns the tracer provider to flush at exit.
fn init_logging(
    level: &str,
    format: LogFormat,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // The replication client logs every status update at info; its
    // warnings still show, and RUST_LOG can ask for more.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},pg_walstream=warn")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(progress::log_writer)
                    .with_ansi(ansi)
                    .with_target(false),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(progress::log_writer)
                    .with_target(false)
                    .json()
                    .flatten_event(true),
            ),
        ),
    };
    let provider = otlp_provider();
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("caudal"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .init();
    provider
}

/// The OTLP/HTTP span exporter the environment asks for, if any.
fn otlp_provider() -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build();
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: no traces: cannot set up the OTLP exporter: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("caudal")
        .build();
    Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}
