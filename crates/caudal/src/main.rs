//! The `caudal` binary: parses arguments, sets up logging, and hands off to
//! a command. Everything else lives in the library crates.

mod cli;
mod commands;
mod demo;
mod remote;
mod top;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs stay at warnings unless asked.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Demo(_), "info") => "warn",
        (_, level) => level,
    };
    init_logging(level, cli.log_format);
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
            Command::Once { pipeline } => commands::once(&cli.config, pipeline).await,
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
            Command::Schema => commands::schema(),
            Command::Cdc(c) => commands::cdc(&cli.config, c).await,
            Command::Token(c) => commands::token(&cli.config, c).await,
            Command::Top => top::top(&cli.config, remote::Remote::from_args(&cli)).await,
            Command::Resync { pipeline } => commands::resync(&cli.config, pipeline).await,
            Command::Backfill {
                pipeline,
                table,
                filter,
            } => commands::backfill(&cli.config, pipeline, table, filter.as_deref()).await,
        }
    });
    // Do not wait for stray blocking tasks (e.g. a stdin reader) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The replication client logs every status update at info; its
    // warnings still show, and RUST_LOG can ask for more.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},pg_walstream=warn")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
