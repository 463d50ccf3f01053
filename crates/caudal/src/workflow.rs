//! `caudal workflow …`: parses, calls the engine's [`Workflows`], prints.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use caudal_core::workflow::{RunState, TaskState, WorkflowRunInfo};
use caudal_core::{Error, ErrorKind};
use caudal_engine::workflow::{ExecOptions, Workflows};

use crate::cli::WorkflowCommand;
use crate::commands::{
    EXIT_FAILED, EXIT_INTERRUPTED, fail, load_with_store, print_table, shutdown_on_signals,
};

pub async fn command(path: &Path, command: &WorkflowCommand) -> ExitCode {
    let (config, store) = match load_with_store(path).await {
        Ok(both) => both,
        Err(code) => return code,
    };
    let config = Arc::new(config);
    let workflows = Workflows::new(config.clone(), store.clone());
    let result = match command {
        WorkflowCommand::List { json } => list(&workflows, *json).await,
        WorkflowCommand::Run {
            workflow,
            params,
            wait,
            json,
        } => {
            let params = caudal_engine::workflow::params_from_pairs(params);
            let run = match workflows.trigger(workflow, params, "manual").await {
                Ok(run) => run,
                Err(e) => return fail(&e),
            };
            if !*wait {
                if *json {
                    println!("{}", serde_json::to_string(&run).unwrap_or_default());
                } else {
                    println!(
                        "run {} of {} queued (batch {}); `caudal run` executes it, `caudal workflow status {}` follows it",
                        run.id, run.workflow, run.batch_id, run.id
                    );
                }
                return ExitCode::SUCCESS;
            }
            return wait_for(&workflows, config, store, run.id).await;
        }
        WorkflowCommand::Status {
            run,
            workflow,
            limit,
            json,
        } => status(&workflows, *run, workflow.as_deref(), *limit, *json).await,
        WorkflowCommand::Tasks {
            run,
            attempts,
            json,
        } => tasks(&workflows, *run, *attempts, *json).await,
        WorkflowCommand::Logs {
            run,
            task,
            index,
            attempt,
            stderr,
            follow,
        } => logs(&workflows, *run, task, *index, *attempt, *stderr, *follow).await,
        WorkflowCommand::Cancel { run } => workflows.cancel(*run).await.map(|()| {
            println!("run {run}: cancel requested; running tasks are being stopped");
        }),
        WorkflowCommand::Retry { run, failed, wait } => {
            if let Err(e) = workflows.retry(*run, *failed).await {
                return fail(&e);
            }
            if *wait {
                return wait_for(&workflows, config, store, *run).await;
            }
            println!(
                "run {run} queued again ({}); `caudal run` executes it",
                if *failed {
                    "its failed tasks only"
                } else {
                    "every task"
                }
            );
            Ok(())
        }
        WorkflowCommand::Backfill { workflow, from, to } => {
            let (from, to) = match (parse_time(from, "--from"), parse_time(to, "--to")) {
                (Ok(f), Ok(t)) => (f, t),
                (Err(e), _) | (_, Err(e)) => return fail(&e),
            };
            workflows.backfill(workflow, from, to).await.map(|ids| {
                match (ids.first(), ids.last()) {
                    (Some(first), Some(last)) => println!(
                        "{} runs of {workflow} queued (ids {first} to {last}); `caudal run` executes them oldest first",
                        ids.len()
                    ),
                    _ => println!("no schedule time of {workflow} falls between {from} and {to}"),
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn parse_time(text: &str, flag: &str) -> Result<jiff::Timestamp, Error> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("{flag} {text:?} is not a date (YYYY-MM-DD) or an RFC 3339 time"),
            )
        })
}

/// Runs the run here, or follows it while another process (the daemon)
/// is the executor; exits 0 only when it succeeded.
async fn wait_for(
    workflows: &Workflows,
    config: Arc<caudal_core::config::Config>,
    store: caudal_store::Store,
    id: i64,
) -> ExitCode {
    let shutdown = shutdown_on_signals();
    let options = ExecOptions {
        schedules: false,
        only_run: Some(id),
    };
    let progress = crate::progress::spinner(format!("run {id}")).map(|bar| {
        (
            bar.clone(),
            follow_progress(bar, workflows.clone(), store.clone(), id),
        )
    });
    let executed = caudal_engine::workflow::execute(config, store, options, shutdown.clone()).await;
    let bar = progress.as_ref().map(|(bar, _)| bar);
    let followed = follow(workflows, id, executed, bar, &shutdown).await;
    if let Some((bar, task)) = progress {
        task.abort();
        crate::progress::clear(&bar);
    }
    if let Some(code) = followed {
        return code;
    }
    let run = match workflows.run(id).await {
        Ok(run) => run,
        Err(e) => return fail(&e),
    };
    print_run(&run);
    if run.state == RunState::Succeeded {
        return ExitCode::SUCCESS;
    }
    if !run.state.is_finished() {
        eprintln!(
            "run {id} is still {}: it goes on at the next `caudal run`",
            run.state
        );
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if let Ok(tasks) = workflows.tasks(id).await {
        for t in tasks.iter().filter(|t| t.error.is_some()) {
            eprintln!(
                "  {}{}: {}: {}",
                t.task,
                index_suffix(t.map_index),
                t.state,
                t.error.as_deref().unwrap_or_default()
            );
        }
    }
    ExitCode::from(EXIT_FAILED)
}

/// After the executor here returned: when another process (the daemon)
/// executes the run, waits for it to end. `Some` exit code when waiting
/// ended otherwise.
async fn follow(
    workflows: &Workflows,
    id: i64,
    executed: Result<(), Error>,
    bar: Option<&indicatif::ProgressBar>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<ExitCode> {
    match executed {
        Ok(()) => None,
        Err(e) if e.kind() == ErrorKind::Busy => {
            let note = || eprintln!("run {id}: `caudal run` executes it; following it");
            match bar {
                Some(bar) => bar.suspend(note),
                None => note(),
            }
            loop {
                match workflows.run(id).await {
                    Ok(run) if run.state.is_finished() => return None,
                    Ok(_) => {}
                    Err(e) => return Some(fail(&e)),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Some(ExitCode::from(EXIT_INTERRUPTED)),
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        }
        Err(e) => Some(fail(&e)),
    }
}

/// How often the progress line reads the store.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Crawl tasks named on the progress line; more are summed up.
const PROGRESS_CRAWLS: usize = 3;

/// Keeps the progress line of run `id` current: its state, its tasks by
/// state and, for each running crawl task, the pages of its frontier
/// (`workflow:<run>:<task>`) done and queued.
fn follow_progress(
    bar: indicatif::ProgressBar,
    workflows: Workflows,
    store: caudal_store::Store,
    id: i64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(run) = workflows.run(id).await {
                let mut message = run.state.to_string();
                if !run.tasks.is_empty() {
                    message.push_str(&format!(" ({})", counts(&run)));
                }
                if let Some(crawls) = crawl_progress(&workflows, &store, id).await {
                    message.push_str(" — ");
                    message.push_str(&crawls);
                }
                bar.set_message(message);
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
    })
}

/// The pages of run `id`'s running crawl tasks, e.g. `scrape: 120 pages
/// done, 30 queued`; `None` when none runs.
async fn crawl_progress(
    workflows: &Workflows,
    store: &caudal_store::Store,
    id: i64,
) -> Option<String> {
    let prefix = format!("workflow:{id}:");
    let frontiers = store.frontiers(Some(&prefix)).await.ok()?;
    let crawling: Vec<_> = frontiers
        .iter()
        .filter(|f| f.state == "crawling" && f.name.starts_with(&prefix))
        .collect();
    if crawling.is_empty() {
        return None;
    }
    // A frontier stays `crawling` when its task failed: only those of
    // running tasks are progress.
    let tasks = workflows.tasks(id).await.ok()?;
    let running: Vec<String> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .map(|t| {
            if t.map_index >= 0 {
                format!("{}:{}", t.task, t.map_index)
            } else {
                t.task.clone()
            }
        })
        .collect();
    let mut parts = Vec::new();
    // Beyond the first few, the other crawls are summed up.
    let mut rest = caudal_store::FrontierSummary::default();
    let mut more = 0;
    for f in crawling {
        let instance = &f.name[prefix.len()..];
        if !running.iter().any(|r| r == instance) {
            continue;
        }
        if parts.len() < PROGRESS_CRAWLS {
            let label = match instance.rsplit_once(':') {
                Some((task, index)) => format!("{task}[{index}]"),
                None => instance.to_string(),
            };
            parts.push(format!("{label}: {}", crate::progress::pages_text(f)));
        } else {
            more += 1;
            rest.pages.extend(f.pages.iter().cloned());
        }
    }
    if more > 0 {
        parts.push(format!(
            "{more} more crawls: {}",
            crate::progress::pages_text(&rest)
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn index_suffix(map_index: i64) -> String {
    if map_index >= 0 {
        format!("[{map_index}]")
    } else {
        String::new()
    }
}

fn counts(run: &WorkflowRunInfo) -> String {
    run.tasks
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_run(run: &WorkflowRunInfo) {
    println!(
        "run {} of {}: {} (batch {}; tasks: {}){}",
        run.id,
        run.workflow,
        run.state,
        run.batch_id,
        counts(run),
        run.error
            .as_deref()
            .map(|e| format!("; {e}"))
            .unwrap_or_default()
    );
}

async fn list(workflows: &Workflows, json: bool) -> Result<(), Error> {
    let all = workflows.list().await?;
    if json {
        for w in &all {
            println!("{}", serde_json::to_string(w).unwrap_or_default());
        }
        return Ok(());
    }
    let rows: Vec<[String; 5]> = all
        .iter()
        .map(|w| {
            let last = w.last_run.as_ref();
            [
                w.workflow.clone(),
                w.schedule.clone(),
                w.tasks.to_string(),
                last.map_or("-".into(), |r| format!("{} ({})", r.id, r.state)),
                last.and_then(|r| r.started_at.clone())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        &["WORKFLOW", "SCHEDULE", "TASKS", "LAST RUN", "STARTED"],
        &rows,
    );
    Ok(())
}

async fn status(
    workflows: &Workflows,
    run: Option<i64>,
    workflow: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<(), Error> {
    let runs = match run {
        Some(id) => vec![workflows.run(id).await?],
        None => workflows.runs(workflow, limit).await?,
    };
    if json {
        for r in &runs {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return Ok(());
    }
    if run.is_some() {
        for r in &runs {
            print_run(r);
            println!("  dir: {}", r.dir);
        }
        return Ok(());
    }
    let rows: Vec<[String; 7]> = runs
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.workflow.clone(),
                r.state.to_string(),
                r.triggered_by.clone(),
                r.started_at.clone().unwrap_or_else(|| "-".into()),
                r.ended_at.clone().unwrap_or_else(|| "-".into()),
                counts(r),
            ]
        })
        .collect();
    print_table(
        &[
            "RUN", "WORKFLOW", "STATE", "BY", "STARTED", "ENDED", "TASKS",
        ],
        &rows,
    );
    Ok(())
}

async fn tasks(workflows: &Workflows, run: i64, attempts: bool, json: bool) -> Result<(), Error> {
    if attempts {
        let all = workflows.attempts(run).await?;
        if json {
            for a in &all {
                println!("{}", serde_json::to_string(a).unwrap_or_default());
            }
            return Ok(());
        }
        let rows: Vec<[String; 7]> = all
            .iter()
            .map(|a| {
                [
                    format!("{}{}", a.task, index_suffix(a.map_index)),
                    a.attempt.to_string(),
                    a.state.to_string(),
                    a.exit_code.map_or("-".into(), |c| c.to_string()),
                    a.started_at.clone(),
                    a.node.clone(),
                    a.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        print_table(
            &[
                "TASK", "ATTEMPT", "STATE", "EXIT", "STARTED", "NODE", "ERROR",
            ],
            &rows,
        );
        return Ok(());
    }
    let all = workflows.tasks(run).await?;
    if json {
        for t in &all {
            println!("{}", serde_json::to_string(t).unwrap_or_default());
        }
        return Ok(());
    }
    let rows: Vec<[String; 6]> = all
        .iter()
        .map(|t| {
            [
                format!("{}{}", t.task, index_suffix(t.map_index)),
                t.state.to_string(),
                t.attempts.to_string(),
                t.items.to_string(),
                t.ended_at
                    .clone()
                    .or_else(|| t.started_at.clone())
                    .unwrap_or_else(|| "-".into()),
                t.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["TASK", "STATE", "ATTEMPTS", "ITEMS", "TIME", "ERROR"],
        &rows,
    );
    Ok(())
}

async fn logs(
    workflows: &Workflows,
    run: i64,
    task: &str,
    index: Option<i64>,
    attempt: Option<u32>,
    stderr: bool,
    follow: bool,
) -> Result<(), Error> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
    let index = index.unwrap_or(-1);
    let log = workflows.log(run, task, index, attempt, stderr).await?;
    let path = log.path;
    let mut offset = 0u64;
    let mut out = tokio::io::stdout();
    loop {
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            let _ = file.seek(std::io::SeekFrom::Start(offset)).await;
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes).await;
            offset += bytes.len() as u64;
            let _ = out.write_all(&bytes).await;
            let _ = out.flush().await;
        } else if log.pruned {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "the output of run {run} is gone: its directory was pruned ([retention] workflow_runs_max_age)"
                ),
            ));
        }
        if !follow {
            return Ok(());
        }
        if !workflows
            .log(run, task, index, attempt, stderr)
            .await?
            .running
        {
            // One last read after the attempt ended.
            if let Ok(mut file) = tokio::fs::File::open(&path).await {
                let _ = file.seek(std::io::SeekFrom::Start(offset)).await;
                let mut bytes = Vec::new();
                let _ = file.read_to_end(&mut bytes).await;
                let _ = out.write_all(&bytes).await;
                let _ = out.flush().await;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
