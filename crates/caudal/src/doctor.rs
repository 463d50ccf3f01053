//! `caudal doctor`: loads the configuration, runs the engine's checks
//! ([`caudal_engine::doctor`]) and presents them: a table (each problem
//! followed by what to fix) or JSON, and an exit code scripts can rely on.
//!
//! Exit codes: 0 nothing failed (warnings allowed), 1 a check failed (or
//! warned, with `--strict`), 2 the configuration is invalid.

use std::path::Path;
use std::process::ExitCode;

use caudal_core::probe::Status;
use caudal_engine::doctor::{Options, Report};

use crate::commands::{EXIT_FAILED, load};

pub async fn doctor(
    path: &Path,
    json: bool,
    strict: bool,
    timeout: caudal_core::units::Duration,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let options = Options {
        timeout: timeout.as_std(),
    };
    let report = caudal_engine::doctor::run(&config, options).await;
    let failed = report.failed() || (strict && report.warned());
    if json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("ok".into(), serde_json::Value::Bool(!failed));
        }
        println!("{value}");
    } else {
        print_report(&report);
    }
    if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// The checks as a table; under each one that is not ok, what to fix.
fn print_report(report: &Report) {
    let width = |f: &dyn Fn(&caudal_engine::doctor::Check) -> usize, header: &str| {
        report
            .checks
            .iter()
            .map(f)
            .max()
            .unwrap_or(0)
            .max(header.len())
    };
    let subject_w = width(&|c| c.subject.chars().count(), "SUBJECT");
    let check_w = width(&|c| c.check.chars().count(), "CHECK");
    let status_w = "SKIPPED".len();
    println!(
        "{:status_w$}  {:subject_w$}  {:check_w$}  FOUND",
        "STATUS", "SUBJECT", "CHECK"
    );
    let indent = status_w + subject_w + check_w + 6;
    for c in &report.checks {
        println!(
            "{:status_w$}  {:subject_w$}  {:check_w$}  {}",
            c.status.as_str(),
            c.subject,
            c.check,
            c.found
        );
        if c.status != Status::Ok
            && let Some(fix) = &c.fix
        {
            println!("{:indent$}fix: {fix}", "");
        }
    }
    let s = report.summary;
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    println!(
        "\n{}, {}, {}, {} skipped",
        plural(s.ok, "ok", "ok"),
        plural(s.warn, "warning", "warnings"),
        plural(s.fail, "failure", "failures"),
        s.skipped
    );
}
