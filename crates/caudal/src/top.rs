//! `caudal top`: a live terminal view of every pipeline (state, rows in and
//! out per second, lag, buffer, dead letters, circuit), of the sites the
//! crawler asks (in flight, pages per minute, success, latency, delay) and
//! of the latest workflow runs (state, tasks by state), refreshed every
//! second, from the state store or (with `--api`) a running daemon. `q`,
//! Esc or Ctrl-C quits.
//!
//! The sites' figures live in the memory of the process that crawls, not in
//! the store: only a daemon's API has them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_core::workflow::WorkflowRunInfo;
use caudal_engine::workflow::Workflows;
use caudal_server::openapi::{CrawlSite, PipelineList};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use crate::commands::{EXIT_FAILED, load_with_store};
use crate::remote::Remote;

const REFRESH: Duration = Duration::from_secs(1);
/// How many of the latest workflow runs are shown.
const WORKFLOW_RUNS: u32 = 10;

/// One pipeline's figures at one refresh.
#[derive(Clone, Debug, Default)]
struct Figures {
    state: String,
    run: Option<i64>,
    read: u64,
    delivered: u64,
    lag: String,
    buffer: String,
    dead: Option<u64>,
    circuit: String,
    at: Option<Instant>,
}

/// What one refresh read: every pipeline's figures, the crawler's sites
/// by host, and the latest workflow runs, newest first.
#[derive(Clone, Debug, Default)]
struct Sample {
    pipelines: BTreeMap<String, Figures>,
    sites: Vec<CrawlSite>,
    runs: Vec<WorkflowRunInfo>,
    /// Cluster nodes live now (`None` outside a cluster).
    live_nodes: Option<usize>,
}

/// Where the figures come from.
enum Feed {
    Store(
        Arc<caudal_core::config::Config>,
        caudal_store::Store,
        Workflows,
    ),
    Api(Remote),
}

impl Feed {
    async fn sample(&self) -> Result<Sample, String> {
        let runs = match self {
            Feed::Store(_, _, workflows) => workflows
                .runs(None, WORKFLOW_RUNS)
                .await
                .map_err(|e| e.report())?,
            Feed::Api(remote) => remote
                .workflow_runs(WORKFLOW_RUNS)
                .await
                .map_err(|e| format!("the API: {e}"))?,
        };
        let sites = match self {
            // This process crawls nothing: the daemon's sites are in its
            // memory, which only its API shows.
            Feed::Store(..) => Vec::new(),
            Feed::Api(remote) => remote
                .crawl_sites()
                .await
                .map_err(|e| format!("the API: {e}"))?,
        };
        let (rows, dead) = match self {
            Feed::Store(config, store, _) => {
                let mut rows = Vec::new();
                let mut dead = BTreeMap::new();
                for name in config.pipelines.keys() {
                    let row = caudal_engine::status::pipeline_status(config, store, name, None)
                        .await
                        .map_err(|e| e.report())?;
                    rows.push(row);
                    if let Ok(n) = store.pending_dead_letters(name).await {
                        dead.insert(name.clone(), n);
                    }
                }
                (rows, dead)
            }
            Feed::Api(remote) => {
                let list: PipelineList = remote
                    .get("/api/v1/pipelines")
                    .await
                    .map_err(|e| format!("the API: {e}"))?;
                (list.pipelines, BTreeMap::new())
            }
        };
        let nodes = match self {
            Feed::Store(_, store, _) => caudal_engine::cluster::nodes(store)
                .await
                .map_err(|e| e.report())?,
            Feed::Api(remote) => {
                let list: caudal_server::openapi::NodeList = remote
                    .get("/api/v1/nodes")
                    .await
                    .map_err(|e| format!("the API: {e}"))?;
                list.nodes
            }
        };
        let live_nodes = nodes.iter().any(|n| n.cluster).then(|| {
            nodes
                .iter()
                .filter(|n| n.cluster && n.state == "active")
                .count()
        });
        let mut out = BTreeMap::new();
        for r in rows {
            let mut state = if r.paused {
                "paused".to_string()
            } else {
                r.outcome.clone().unwrap_or_else(|| "idle".to_string())
            };
            // In a cluster: on which node (host:pid).
            if let Some(owner) = &r.owner {
                let node: Vec<&str> = owner.split(':').take(2).collect();
                state = format!("{state} @{}", node.join(":"));
            }
            out.insert(
                r.pipeline.clone(),
                Figures {
                    state,
                    run: None,
                    read: r.rows_read.unwrap_or(0),
                    delivered: r.rows_delivered.unwrap_or(0),
                    lag: r.lag_text(),
                    buffer: r
                        .buffered_batches
                        .map_or_else(|| "-".into(), |n| format!("{n} batches")),
                    dead: dead.get(&r.pipeline).copied(),
                    circuit: r.circuit.clone().unwrap_or_else(|| "-".to_string()),
                    at: Some(Instant::now()),
                }
                .with_run(r.last_run.as_deref()),
            );
        }
        Ok(Sample {
            pipelines: out,
            sites,
            runs,
            live_nodes,
        })
    }
}

impl Figures {
    /// The run the counters belong to (rates compare the same run only).
    fn with_run(mut self, started: Option<&str>) -> Self {
        self.run = started.map(|s| {
            s.bytes()
                .fold(0i64, |h, b| h.wrapping_mul(31).wrapping_add(i64::from(b)))
        });
        self
    }
}

/// Rows per second between two samples of one run.
fn rate(now: &Figures, before: Option<&Figures>, pick: fn(&Figures) -> u64) -> String {
    let Some(b) = before.filter(|b| b.run == now.run) else {
        return "-".into();
    };
    let (Some(t0), Some(t1)) = (b.at, now.at) else {
        return "-".into();
    };
    let secs = t1.duration_since(t0).as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    let n = pick(now).saturating_sub(pick(b));
    #[allow(clippy::cast_precision_loss)]
    let per = n as f64 / secs;
    format!("{per:.0}/s")
}

/// A duration in seconds as people read it: `0`, `350 ms`, `2.5 s`.
fn seconds_text(secs: f64) -> String {
    if secs <= 0.0 {
        "0".into()
    } else if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else {
        format!("{secs:.1} s")
    }
}

/// The crawler's sites: in flight of the allowed concurrency, pages per
/// minute, share of requests answered, latency, delay between starts, and
/// how long the site is blocked for (a `Retry-After`, a back-off).
fn sites_table(sites: &[CrawlSite]) -> Table<'static> {
    let rows: Vec<Row> = sites
        .iter()
        .map(|s| {
            Row::new(vec![
                s.host.clone(),
                format!("{} / {}", s.in_flight, s.concurrency),
                s.pages_per_minute.to_string(),
                s.success_rate
                    .map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0)),
                if s.succeeded == 0 {
                    "-".into()
                } else {
                    format!("{:.0} ms", s.latency_seconds * 1000.0)
                },
                seconds_text(s.delay_seconds),
                if s.blocked_seconds > 0.0 {
                    seconds_text(s.blocked_seconds)
                } else {
                    "-".into()
                },
                s.requests.to_string(),
            ])
        })
        .collect();
    let widths = [
        Constraint::Min(24),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Min(9),
    ];
    Table::new(rows, widths)
        .header(
            Row::new(vec![
                "SITE",
                "IN FLIGHT",
                "PAGES/MIN",
                "SUCCESS",
                "LATENCY",
                "DELAY",
                "BLOCKED",
                "REQUESTS",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().title("crawl sites"))
}

/// The latest workflow runs: id, workflow, state, and their tasks by state.
fn runs_table(runs: &[WorkflowRunInfo]) -> Table<'static> {
    let rows: Vec<Row> = runs
        .iter()
        .map(|r| {
            let tasks: Vec<String> = r
                .tasks
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect();
            let state = if r.cancel_requested && !r.state.is_finished() {
                format!("{} (cancelling)", r.state)
            } else {
                r.state.to_string()
            };
            Row::new(vec![
                r.id.to_string(),
                r.workflow.clone(),
                state,
                tasks.join(", "),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(8),
        Constraint::Min(20),
        Constraint::Length(22),
        Constraint::Min(30),
    ];
    Table::new(rows, widths)
        .header(
            Row::new(vec!["RUN", "WORKFLOW", "STATE", "TASKS"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().title("workflow runs"))
}

pub async fn top(path: &Path, remote: Option<Remote>) -> ExitCode {
    let feed = match remote {
        Some(r) => Feed::Api(r),
        None => match load_with_store(path).await {
            Ok((config, store)) => {
                let config = Arc::new(config);
                let workflows = Workflows::new(config.clone(), store.clone());
                Feed::Store(config, store, workflows)
            }
            Err(code) => return code,
        },
    };
    // The first sample fails before the screen is taken over.
    let mut last = match feed.sample().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: caudal top needs a terminal: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut current = last.clone();
    let mut problem: Option<String> = None;
    let mut next = Instant::now() + REFRESH;
    let outcome = loop {
        let draw = terminal.draw(|frame| {
            // The crawler's sites, then the workflow runs, below the
            // pipelines (each after a blank line), when there are any.
            let height = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).saturating_add(1);
            let section = |n: usize| {
                if n == 0 {
                    (0, 0)
                } else {
                    (1, height(n).saturating_add(1))
                }
            };
            let (sites_gap, sites_height) = section(current.sites.len());
            let (runs_gap, runs_height) = section(current.runs.len());
            let [head, body, _, sites_area, _, runs_area, _] = Layout::vertical([
                Constraint::Length(1),
                Constraint::Length(height(current.pipelines.len())),
                Constraint::Length(sites_gap),
                Constraint::Length(sites_height),
                Constraint::Length(runs_gap),
                Constraint::Length(runs_height),
                Constraint::Min(0),
            ])
            .areas(frame.area());
            let nodes = current
                .live_nodes
                .map_or_else(String::new, |n| format!(" — {n} nodes live"));
            let title = match &problem {
                None => format!("caudal top{nodes} — q quits"),
                Some(p) => format!("caudal top{nodes} — q quits — {p}"),
            };
            frame.render_widget(Paragraph::new(Line::from(title)), head);
            let rows: Vec<Row> = current
                .pipelines
                .iter()
                .map(|(name, f)| {
                    let before = last.pipelines.get(name);
                    Row::new(vec![
                        name.clone(),
                        f.state.clone(),
                        rate(f, before, |x| x.read),
                        rate(f, before, |x| x.delivered),
                        f.lag.clone(),
                        f.buffer.clone(),
                        f.dead.map_or_else(|| "-".into(), |n| n.to_string()),
                        f.circuit.clone(),
                        format!("{} / {}", f.read, f.delivered),
                    ])
                })
                .collect();
            let widths = [
                Constraint::Min(20),
                Constraint::Length(if current.live_nodes.is_some() { 28 } else { 10 }),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(18),
                Constraint::Length(12),
                Constraint::Length(6),
                Constraint::Length(9),
                Constraint::Min(14),
            ];
            let table = Table::new(rows, widths)
                .header(
                    Row::new(vec![
                        "PIPELINE",
                        "STATE",
                        "IN",
                        "OUT",
                        "LAG",
                        "BUFFER",
                        "DEAD",
                        "CIRCUIT",
                        "RUN READ / SENT",
                    ])
                    .style(Style::default().add_modifier(Modifier::BOLD)),
                )
                .block(Block::default());
            frame.render_widget(table, body);
            if !current.sites.is_empty() {
                frame.render_widget(sites_table(&current.sites), sites_area);
            }
            if !current.runs.is_empty() {
                frame.render_widget(runs_table(&current.runs), runs_area);
            }
        });
        if let Err(e) = draw {
            break Err(format!("cannot draw: {e}"));
        }
        let wait = next.saturating_duration_since(Instant::now());
        match event::poll(wait.min(Duration::from_millis(200))) {
            Ok(true) => {
                if let Ok(Event::Key(k)) = event::read()
                    && k.kind == KeyEventKind::Press
                {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        break Ok(());
                    }
                }
            }
            Ok(false) => {}
            Err(e) => break Err(format!("cannot read the keyboard: {e}")),
        }
        if Instant::now() >= next {
            next = Instant::now() + REFRESH;
            match feed.sample().await {
                Ok(s) => {
                    last = std::mem::replace(&mut current, s);
                    problem = None;
                }
                Err(e) => problem = Some(e),
            }
        }
    };
    ratatui::restore();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
