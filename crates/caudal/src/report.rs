//! `caudal once` and `caudal backfill` for report pipelines: parsing and
//! presenting; the rules are in `caudal_engine::report`.

use std::path::Path;
use std::process::ExitCode;

use caudal_engine::Report;
use caudal_engine::report::DateSummary;
use jiff::civil::Date;

use crate::commands::{EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, fail, load_with_store};

fn parse_date(flag: &str, text: &str) -> Result<Date, ExitCode> {
    text.parse().map_err(|_| {
        eprintln!("error: {flag} {text:?} is not a date like 2025-01-31");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn line(name: &str, s: &DateSummary) -> String {
    format!(
        "{name} {}: {} rows, {} partitions, {} files, {} bytes{}, {:.2}s",
        s.date,
        s.rows,
        s.partitions,
        s.files,
        s.bytes,
        if s.removed > 0 {
            format!(", {} partitions emptied", s.removed)
        } else {
            String::new()
        },
        s.elapsed.as_secs_f64()
    )
}

/// Whether `name` is a report pipeline of the configuration at `path`.
pub fn is_report(config: &caudal_core::config::Config, name: &str) -> bool {
    caudal_engine::report::is_report(config, name)
}

/// `caudal once NAME [--date D]` for a report pipeline.
pub async fn once(
    config: caudal_core::config::Config,
    store: caudal_store::Store,
    name: &str,
    date: Option<&str>,
) -> ExitCode {
    let report = match Report::build(name, &config, store).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let result = match date {
        Some(d) => {
            let d = match parse_date("--date", d) {
                Ok(d) => d,
                Err(code) => return code,
            };
            report.run_date(d).await.map(|s| vec![s])
        }
        None => {
            let shutdown = crate::commands::shutdown_on_signals();
            report.run_due("manual", &shutdown).await
        }
    };
    match result {
        Ok(done) => {
            if done.is_empty() {
                println!("{name}: nothing due (every complete day is written)");
            }
            for s in &done {
                println!("{}", line(name, s));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `caudal backfill NAME --from D --to D [--parallel N]`.
pub async fn backfill(path: &Path, name: &str, from: &str, to: &str, parallel: usize) -> ExitCode {
    let (from, to) = match (parse_date("--from", from), parse_date("--to", to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    if !is_report(&config, name) {
        eprintln!(
            "error: pipeline {name:?} is not a report (a source with mode = \"query\"); \
             for a CDC pipeline give --table"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let report = match Report::build(name, &config, store).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let days = (to - from).get_days().max(0) as u64 + 1;
    let bar = indicatif::ProgressBar::new(days);
    if crate::progress::spinner(String::new()).is_none() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} days  {msg}  {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    let shutdown = crate::commands::shutdown_on_signals();
    let rows = std::sync::atomic::AtomicU64::new(0);
    let each = |date: Date, r: &caudal_core::Result<DateSummary>| {
        match r {
            Ok(s) => {
                let total = rows.fetch_add(s.rows, std::sync::atomic::Ordering::Relaxed) + s.rows;
                bar.set_message(format!("{total} rows"));
            }
            Err(e) => bar.println(format!("error: {date}: {}", e.report())),
        }
        bar.inc(1);
    };
    let result = report.backfill(from, to, parallel, &shutdown, &each).await;
    bar.finish_and_clear();
    match result {
        Err(e) => fail(&e),
        Ok((done, failed)) => {
            let rows: u64 = done.iter().map(|s| s.rows).sum();
            let bytes: u64 = done.iter().map(|s| s.bytes).sum();
            println!(
                "{name}: backfill {from} to {to}: {} days written, {} failed, {rows} rows, {bytes} bytes",
                done.len(),
                failed.len()
            );
            for (date, e) in &failed {
                eprintln!("error: {date}: {}", e.report());
            }
            if shutdown.is_cancelled() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
    }
}

/// `caudal checkpoint show|reset` for a report: its checkpoint is the set
/// of dates written.
pub async fn checkpoint(
    config: &caudal_core::config::Config,
    store: &caudal_store::Store,
    name: &str,
    command: &crate::cli::CheckpointCommand,
) -> ExitCode {
    let dataset = &config.pipelines[name].sink;
    match command {
        crate::cli::CheckpointCommand::Show { .. } => match store.dataset_dates(dataset).await {
            Err(e) => fail(&e),
            Ok(dates) => {
                match (dates.first(), dates.last()) {
                    (Some(first), Some(last)) => println!(
                        "{name}: {} dates written to dataset {dataset}, {} to {} (last committed {})",
                        dates.len(),
                        first.logical_date,
                        last.logical_date,
                        last.committed_at
                    ),
                    _ => println!("{name}: no date written yet"),
                }
                ExitCode::SUCCESS
            }
        },
        crate::cli::CheckpointCommand::Reset { .. } => {
            eprintln!(
                "error: {name} is a report: its checkpoint is the dates it wrote; write a date \
                 again with `caudal once {name} --date D` or `caudal backfill {name} --from D --to D`"
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
