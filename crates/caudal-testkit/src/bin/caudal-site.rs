//! `caudal-site`: the fixture website of [`caudal_testkit::Site`] as a
//! process, for the crawler benchmark.
//!
//! The binary only parses arguments, starts the site and reports at exit;
//! the site itself lives in the library.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use caudal_testkit::site::DEFAULT_DETAIL_BYTES;
use caudal_testkit::{Site, SiteOptions};
use clap::Parser;

/// Serves the generated real-estate fixture site on 127.0.0.1 until SIGTERM
/// or SIGINT.
///
/// Once listening, prints `http://127.0.0.1:PORT` as the only line on
/// stdout. On SIGTERM or SIGINT it writes a JSON summary to stderr
/// (`{"requests", "max_in_flight", "by_status", "duplicates"}`), writes the
/// access log when `--log` is given, and exits.
#[derive(Debug, Parser)]
#[command(name = "caudal-site", version)]
struct Args {
    /// Listing pages /listings/1 … /listings/N.
    #[arg(long, value_name = "N")]
    listings: u32,
    /// Detail links per listing page; the site has N × K detail pages.
    #[arg(long, value_name = "K")]
    per_listing: u32,
    /// About how large each detail page is, in bytes.
    #[arg(long, value_name = "B", default_value_t = DEFAULT_DETAIL_BYTES)]
    detail_bytes: usize,
    /// The port to listen on, on 127.0.0.1 (0: any free port).
    #[arg(long, value_name = "P", default_value_t = 0)]
    port: u16,
    /// Serve this file, as is, as /robots.txt (404 without it).
    #[arg(long, value_name = "FILE")]
    robots: Option<PathBuf>,
    /// At exit, write the access log to FILE as JSON lines: {"path", "ua",
    /// "started_ms", "finished_ms", "status"}, times in milliseconds since the
    /// server started.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("caudal-site: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let robots = match &args.robots {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?,
        ),
        None => None,
    };
    let options = SiteOptions {
        listings: args.listings,
        per_listing: args.per_listing,
        detail_bytes: args.detail_bytes,
        robots,
        ..SiteOptions::default()
    };
    // Listen for signals before announcing the URL: a benchmark may stop the
    // site as soon as it has read it.
    let mut stop = Stop::listen().map_err(|err| format!("cannot handle signals: {err}"))?;
    let site = Site::bind(args.port, options)
        .await
        .map_err(|err| format!("cannot listen on 127.0.0.1:{}: {err}", args.port))?;
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{}", site.origin())
            .and_then(|()| stdout.flush())
            .map_err(|err| format!("cannot write to stdout: {err}"))?;
    }

    stop.wait().await;

    eprintln!("{}", site.summary().to_json());
    if let Some(path) = &args.log {
        let write = || -> io::Result<()> {
            let mut out = BufWriter::new(File::create(path)?);
            site.write_log_json_lines(&mut out)?;
            out.flush()
        };
        write().map_err(|err| format!("cannot write the log to {}: {err}", path.display()))?;
    }
    Ok(())
}

/// SIGTERM or SIGINT.
struct Stop {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    #[cfg(unix)]
    fn listen() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn listen() -> io::Result<Self> {
        Ok(Self {})
    }

    #[cfg(unix)]
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn wait(&mut self) {
        // Without a handler, Ctrl-C would kill the process before the report.
        let _ = tokio::signal::ctrl_c().await;
    }
}
