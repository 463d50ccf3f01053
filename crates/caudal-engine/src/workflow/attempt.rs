//! One attempt of a task: a command in its own process group, an HTTP
//! request, or one run of a pipeline; and what it left behind (outputs,
//! items).
//!
//! Promises:
//! - A command runs in a process group of its own, with its standard output
//!   and error in files of the run directory (each created with its first
//!   byte: a silent command leaves none). At its timeout, at cancel and
//!   at shutdown the whole group gets SIGTERM, then SIGKILL after
//!   [`KILL_GRACE`]; when the command exits, what is left of its group is
//!   killed. No process of an attempt outlives it.
//! - Every process of an attempt carries `CAUDAL_EXECUTOR` in its
//!   environment, so an executor that starts after a crash finds and kills
//!   the processes of the executor that died ([`kill_orphans`]) before
//!   running anything again.
//! - An attempt succeeds only when its work succeeded *and* its outputs and
//!   items were read: a malformed `$CAUDAL_OUTPUT` line or a missing
//!   `items_from` file fails the attempt with the file and line named.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_connectors::sinks::partner::{PartnerClient, SendError};
use caudal_core::config::Config;
use caudal_store::Store;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Time between SIGTERM and SIGKILL when a task is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// Bytes of standard error kept with a failed attempt.
const STDERR_TAIL: u64 = 2048;
/// The environment variable that marks an attempt's processes.
pub const EXECUTOR_ENV: &str = "CAUDAL_EXECUTOR";

/// Which attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct AttemptId {
    pub run_id: i64,
    pub task: String,
    pub map_index: i64,
    pub attempt: u32,
}

/// What an attempt does, rendered.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Work {
    Command {
        program: String,
        args: Vec<String>,
        cwd: PathBuf,
        env: Vec<(String, String)>,
        skip_exit_code: i32,
        /// The site whose limits the command's starts count against.
        site: Option<String>,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Option<String>,
    },
    /// An http task with `auth` or `tls`. A variant of its own, so a node
    /// that does not know it refuses the attempt instead of sending it
    /// without its credentials.
    PartnerHttp {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Option<String>,
        /// The workflow whose task (`id.task`) sets `auth` or `tls`: the
        /// node running the attempt reads them from its own
        /// configuration, so no secret travels through the store.
        workflow: String,
    },
    Pipeline {
        name: String,
    },
    Crawl {
        /// The `type = "crawl"` source.
        source: String,
        /// Start URLs instead of the source's, when the task gives any.
        start: Option<Vec<String>>,
        /// The run's directory (the records go to `<task>.jsonl` there).
        file: PathBuf,
    },
}

/// The files of one attempt.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Files {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub output: PathBuf,
    pub items: PathBuf,
}

impl Files {
    /// `<run dir>/logs/<task>[.<index>].<attempt>.*`
    pub(crate) fn new(run_dir: &Path, task: &str, map_index: i64, attempt: u32) -> Self {
        let stem = if map_index < 0 {
            format!("{task}.{attempt}")
        } else {
            format!("{task}.{map_index}.{attempt}")
        };
        let logs = run_dir.join("logs");
        Self {
            stdout: logs.join(format!("{stem}.stdout")),
            stderr: logs.join(format!("{stem}.stderr")),
            output: logs.join(format!("{stem}.output")),
            items: logs.join(format!("{stem}.items")),
        }
    }
}

/// One attempt, ready to run (handed to another node as JSON in a
/// cluster).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Spec {
    pub id: AttemptId,
    pub work: Work,
    pub timeout: Option<Duration>,
    /// Why the timeout is what it is (`timeout` or `deadline`).
    pub timeout_cause: String,
    pub files: Files,
    /// `items_from`, rendered, with its column.
    pub items_from: Option<(PathBuf, Option<String>)>,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Ending {
    Succeeded,
    /// The command exited with its skip exit code.
    Skipped,
    Failed,
    TimedOut,
    Cancelled,
    /// Stopped because caudal is stopping; it does not count.
    Interrupted,
    /// Its node went silent while it ran (a cluster's executor rescued
    /// it); counted as a failed attempt.
    Lost,
}

/// What the executor learns from an attempt when it ends.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Done {
    pub id: AttemptId,
    pub ending: Ending,
    pub exit_code: Option<i32>,
    /// The command's process (group leader).
    pub pid: Option<u32>,
    pub error: Option<String>,
    pub stderr_tail: Option<String>,
    pub outputs: Map<String, Value>,
    pub items: Vec<Value>,
    pub elapsed: Duration,
}

/// What every attempt may need.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub http: reqwest::Client,
    pub holder: String,
    /// The clients of `http` tasks with `auth` or `tls`, per (workflow,
    /// task), made on first use and kept (an OAuth2 token is reused).
    pub partners: Arc<Partners>,
}

/// See [`Shared::partners`].
#[derive(Debug, Default)]
pub(crate) struct Partners(
    std::sync::Mutex<std::collections::HashMap<(String, String), Arc<PartnerClient>>>,
);

impl Partners {
    /// The client of task `task` of workflow `workflow`, as `config` sets
    /// it up; why it cannot be made (a credential file unreadable, say: it
    /// is tried again at the next attempt).
    fn client(
        &self,
        config: &Config,
        workflow: &str,
        task: &str,
    ) -> std::result::Result<Arc<PartnerClient>, String> {
        let key = (workflow.to_string(), task.to_string());
        if let Some(c) = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(c.clone());
        }
        let t = config
            .workflows
            .get(workflow)
            .and_then(|w| w.tasks.get(task))
            .ok_or_else(|| {
                format!(
                    "task {task:?} of workflow {workflow:?} is not in this node's configuration"
                )
            })?;
        let client = Arc::new(PartnerClient::new(
            reqwest::Client::builder().user_agent(concat!("caudal/", env!("CARGO_PKG_VERSION"))),
            t.auth.as_ref(),
            t.tls.as_ref(),
        )?);
        Ok(self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_insert(client)
            .clone())
    }
}

/// Runs one attempt to its end and reports it on `events`. `stop`
/// cancels it; `shutdown` interrupts it.
pub(crate) async fn run(
    spec: Spec,
    shared: Shared,
    stop: CancellationToken,
    shutdown: CancellationToken,
    events: mpsc::UnboundedSender<Done>,
) {
    let started = Instant::now();
    let mut done = match &spec.work {
        Work::Command { .. } => run_command(&spec, &shared, &stop, &shutdown).await,
        Work::Http { .. } | Work::PartnerHttp { .. } => {
            run_http(&spec, &shared, &stop, &shutdown).await
        }
        Work::Pipeline { name } => run_pipeline(&spec, name, &shared, &stop, &shutdown).await,
        Work::Crawl { .. } => run_crawl(&spec, &shared, &stop, &shutdown).await,
    };
    if done.ending == Ending::Succeeded
        && let Err(why) = collect(&spec, &mut done).await
    {
        done.ending = Ending::Failed;
        done.error = Some(why);
    }
    done.elapsed = started.elapsed();
    let _ = events.send(done);
}

/// An attempt that caudal stopped before it started.
pub(crate) fn interrupted(spec: &Spec) -> Done {
    done(
        spec,
        Ending::Interrupted,
        Some(stopped_message(spec, Ending::Interrupted)),
    )
}

fn done(spec: &Spec, ending: Ending, error: Option<String>) -> Done {
    Done {
        id: spec.id.clone(),
        ending,
        exit_code: None,
        pid: None,
        error,
        stderr_tail: None,
        outputs: Map::new(),
        items: Vec::new(),
        elapsed: Duration::ZERO,
    }
}

/// Waits for the attempt's limit: `Some(ending)` when it is stopped.
async fn limit(
    timeout: Option<Duration>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Ending {
    let timer = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = timer => Ending::TimedOut,
        () = stop.cancelled() => Ending::Cancelled,
        () = shutdown.cancelled() => Ending::Interrupted,
    }
}

fn stopped_message(spec: &Spec, ending: Ending) -> String {
    match ending {
        Ending::TimedOut => format!(
            "killed at its {} ({})",
            spec.timeout_cause,
            caudal_core::units::Duration(spec.timeout.unwrap_or_default())
        ),
        Ending::Cancelled => "cancelled".into(),
        _ => "interrupted: caudal stopped; it will run again".into(),
    }
}

async fn run_command(
    spec: &Spec,
    shared: &Shared,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Done {
    let Work::Command {
        program,
        args,
        cwd,
        env,
        skip_exit_code,
        site,
    } = &spec.work
    else {
        return done(spec, Ending::Failed, Some("not a command".into()));
    };
    // A command that scrapes a site waits for the site's turn and holds one
    // of its slots while it runs, like the crawler's own requests.
    let _site_permit = match site {
        Some(host) => {
            let site = crate::crawl::sites(&shared.config).site(host);
            tokio::select! {
                permit = site.acquire() => Some(permit),
                ending = limit(spec.timeout, stop, shutdown) => {
                    return done(spec, ending, Some(stopped_message(spec, ending)));
                }
            }
        }
        None => None,
    };
    // A program given with a directory is found from the task's cwd.
    let program_path = if program.contains('/') && Path::new(program).is_relative() {
        cwd.join(program)
    } else {
        PathBuf::from(program)
    };
    let mut command = tokio::process::Command::new(&program_path);
    command
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(EXECUTOR_ENV, &shared.holder)
        .env("CAUDAL_OUTPUT", &spec.files.output)
        .env("CAUDAL_ITEMS", &spec.files.items)
        .env("CAUDAL_ATTEMPT", spec.id.attempt.to_string())
        .env("CAUDAL_TASK", &spec.id.task)
        .env("CAUDAL_MAP_INDEX", spec.id.map_index.to_string())
        .env("CAUDAL_RUN_ID", spec.id.run_id.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                if cwd.is_dir() {
                    format!(
                        "cannot start `{program}`: no such program (PATH, or relative to {})",
                        cwd.display()
                    )
                } else {
                    format!(
                        "cannot start `{program}`: its working directory {} does not exist",
                        cwd.display()
                    )
                }
            } else {
                format!("cannot start `{program}`: {e}")
            };
            return done(spec, Ending::Failed, Some(why));
        }
    };
    // Output goes to files created when the first byte comes: a silent
    // command (most no-op or marker tasks) costs no files.
    let capture = [
        child
            .stdout
            .take()
            .map(|out| tokio::spawn(capture(out, spec.files.stdout.clone()))),
        child
            .stderr
            .take()
            .map(|err| tokio::spawn(capture(err, spec.files.stderr.clone()))),
    ];
    let pid = child.id().unwrap_or(0);
    let group = Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    let status = tokio::select! {
        status = child.wait() => Ok(status),
        ending = limit(spec.timeout, stop, shutdown) => Err(ending),
    };
    let (ending, exit_code, error) = match status {
        Ok(Ok(status)) => {
            // What the command left running in its group goes with it.
            let _ = killpg(group, Signal::SIGKILL);
            match status.code() {
                Some(0) => (Ending::Succeeded, Some(0), None),
                Some(code) if code == *skip_exit_code => (
                    Ending::Skipped,
                    Some(code),
                    Some(format!(
                        "skipped: `{program}` exited with the skip exit code {code}"
                    )),
                ),
                Some(code) => (
                    Ending::Failed,
                    Some(code),
                    Some(format!("`{program}` exited with code {code}")),
                ),
                None => {
                    use std::os::unix::process::ExitStatusExt as _;
                    let signal = status.signal().unwrap_or(0);
                    (
                        Ending::Failed,
                        None,
                        Some(format!("`{program}` was killed by signal {signal}")),
                    )
                }
            }
        }
        Ok(Err(e)) => (
            Ending::Failed,
            None,
            Some(format!("waiting for `{program}` failed: {e}")),
        ),
        Err(ending) => {
            terminate(group, &mut child).await;
            let code = child.try_wait().ok().flatten().and_then(|s| s.code());
            (ending, code, Some(stopped_message(spec, ending)))
        }
    };
    // The group is gone, so the pipes close; a process that left the
    // group (setsid) and kept them open is not waited for.
    for task in capture.into_iter().flatten() {
        match tokio::time::timeout(KILL_GRACE, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(task = %spec.id.task, error = %e, "part of an attempt's output was not written")
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(task = %spec.id.task, "an attempt's output was still open after it ended; the rest is not kept")
            }
        }
    }
    Done {
        exit_code,
        pid: Some(pid),
        error,
        stderr_tail: (ending != Ending::Succeeded)
            .then(|| tail(&spec.files.stderr))
            .flatten(),
        ..done(spec, ending, None)
    }
}

/// Copies a command's output into `path`, created on the first byte.
async fn capture(
    mut from: impl tokio::io::AsyncRead + Unpin,
    path: PathBuf,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    let mut file: Option<tokio::fs::File> = None;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let out = match &mut file {
            Some(f) => f,
            None => {
                // The run's `logs` directory exists from its start; one
                // removed since is made again.
                if let Some(dir) = path.parent() {
                    tokio::fs::create_dir_all(dir).await?;
                }
                file.insert(tokio::fs::File::create(&path).await?)
            }
        };
        out.write_all(&buf[..n]).await?;
    }
    if let Some(mut f) = file {
        f.flush().await?;
    }
    Ok(())
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`].
async fn terminate(group: Pid, child: &mut tokio::process::Child) {
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // Stragglers that ignored SIGTERM after their leader exited.
    let _ = killpg(group, Signal::SIGKILL);
}

async fn run_http(
    spec: &Spec,
    shared: &Shared,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Done {
    let (method, url, headers, body, partner_of) = match &spec.work {
        Work::Http {
            method,
            url,
            headers,
            body,
        } => (method, url, headers, body, None),
        Work::PartnerHttp {
            method,
            url,
            headers,
            body,
            workflow,
        } => (method, url, headers, body, Some(workflow)),
        _ => return done(spec, Ending::Failed, Some("not an http task".into())),
    };
    let method = match reqwest::Method::from_bytes(method.as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            return done(
                spec,
                Ending::Failed,
                Some(format!("{method:?} is not an HTTP method")),
            );
        }
    };
    let target = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            return done(
                spec,
                Ending::Failed,
                Some(format!("{url:?} is not a URL: {e}")),
            );
        }
    };
    let mut header_map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes());
        let value = reqwest::header::HeaderValue::from_str(v);
        let (Ok(name), Ok(mut value)) = (name, value) else {
            return done(
                spec,
                Ending::Failed,
                Some(format!("headers.{k}: not a valid header name and value")),
            );
        };
        value.set_sensitive(true);
        header_map.append(name, value);
    }
    let body = body.clone();
    let send = async {
        let response = match partner_of {
            None => {
                let mut request = shared.http.request(method.clone(), target.clone());
                request = request.headers(header_map);
                if let Some(body) = body {
                    request = request.body(body);
                }
                request.send().await.map_err(|e| {
                    format!(
                        "request to {url} failed: {}",
                        caudal_connectors::sinks::http::error_chain(&e.without_url())
                    )
                })?
            }
            Some(workflow) => {
                let client = shared
                    .partners
                    .client(&shared.config, workflow, &spec.id.task)?;
                client
                    .send(
                        &method,
                        &target,
                        header_map,
                        body.unwrap_or_default().into(),
                    )
                    .await
                    .map_err(|e| match e {
                        SendError::Auth(why) => format!("no credentials for {url}: {why}"),
                        SendError::Request(e) => format!(
                            "request to {url} failed: {}",
                            caudal_connectors::sinks::http::error_chain(&e.without_url())
                        ),
                    })?
            }
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        Ok::<_, String>((status, text))
    };
    let result = tokio::select! {
        r = send => Ok(r),
        ending = limit(spec.timeout, stop, shutdown) => Err(ending),
    };
    match result {
        Err(ending) => done(spec, ending, Some(stopped_message(spec, ending))),
        Ok(Err(why)) => done(spec, Ending::Failed, Some(why)),
        Ok(Ok((status, text))) => {
            let mut d = if status.is_success() {
                done(spec, Ending::Succeeded, None)
            } else {
                let mut d = done(
                    spec,
                    Ending::Failed,
                    Some(format!("{url} answered {status}")),
                );
                d.stderr_tail = Some(text.chars().take(2048).collect());
                d
            };
            d.outputs
                .insert("status".into(), Value::from(status.as_u16()));
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            d.outputs.insert("body".into(), body);
            d
        }
    }
}

async fn run_pipeline(
    spec: &Spec,
    name: &str,
    shared: &Shared,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Done {
    if crate::report::is_report(&shared.config, name) {
        return run_report(spec, name, shared, stop, shutdown).await;
    }
    let pipeline = match crate::Pipeline::build(name, &shared.config, shared.store.clone()).await {
        Ok(p) => p,
        Err(e) => return done(spec, Ending::Failed, Some(e.report().to_string())),
    };
    let cancel = CancellationToken::new();
    let run = pipeline.run_once(crate::Trigger::Manual, &cancel, None);
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => Ok(r),
        ending = limit(spec.timeout, stop, shutdown) => Err(ending),
    };
    let result = match result {
        Ok(r) => r,
        Err(ending) => {
            cancel.cancel();
            let _ = run.await;
            return done(spec, ending, Some(stopped_message(spec, ending)));
        }
    };
    match result {
        Err(e) => done(spec, Ending::Failed, Some(e.report().to_string())),
        Ok(summary) => {
            let mut d = match (&summary.error, summary.outcome) {
                (None, caudal_store::RunOutcome::Succeeded) => done(spec, Ending::Succeeded, None),
                (Some(e), _) => done(spec, Ending::Failed, Some(e.report().to_string())),
                (None, outcome) => done(
                    spec,
                    Ending::Failed,
                    Some(format!("pipeline run {} ended {outcome}", summary.run_id)),
                ),
            };
            d.outputs
                .insert("run_id".into(), Value::from(summary.run_id));
            d.outputs
                .insert("rows_read".into(), Value::from(summary.rows_read));
            d.outputs
                .insert("rows_delivered".into(), Value::from(summary.rows_delivered));
            d
        }
    }
}

/// A report pipeline as a task: a dataset refresh, the days due (as
/// `caudal once`). Outputs: `dates` written, `rows`, `files`.
async fn run_report(
    spec: &Spec,
    name: &str,
    shared: &Shared,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Done {
    let report = match crate::Report::build(name, &shared.config, shared.store.clone()).await {
        Ok(r) => r,
        Err(e) => return done(spec, Ending::Failed, Some(e.report().to_string())),
    };
    let cancel = CancellationToken::new();
    let run = report.run_due("workflow", &cancel);
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => Ok(r),
        ending = limit(spec.timeout, stop, shutdown) => Err(ending),
    };
    match result {
        Err(ending) => {
            cancel.cancel();
            let _ = run.await;
            done(spec, ending, Some(stopped_message(spec, ending)))
        }
        Ok(Err(e)) => done(spec, Ending::Failed, Some(e.report().to_string())),
        Ok(Ok(dates)) => {
            let mut d = done(spec, Ending::Succeeded, None);
            d.outputs.insert(
                "dates".into(),
                Value::from(dates.iter().map(|s| s.date.to_string()).collect::<Vec<_>>()),
            );
            d.outputs.insert(
                "rows".into(),
                Value::from(dates.iter().map(|s| s.rows).sum::<u64>()),
            );
            d.outputs.insert(
                "files".into(),
                Value::from(dates.iter().map(|s| s.files as u64).sum::<u64>()),
            );
            d
        }
    }
}

async fn run_crawl(
    spec: &Spec,
    shared: &Shared,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Done {
    let Work::Crawl {
        source,
        start,
        file,
    } = &spec.work
    else {
        return done(spec, Ending::Failed, Some("not a crawl".into()));
    };
    let id = &spec.id;
    let frontier = if id.map_index < 0 {
        format!("workflow:{}:{}", id.run_id, id.task)
    } else {
        format!("workflow:{}:{}:{}", id.run_id, id.task, id.map_index)
    };
    let records = if id.map_index < 0 {
        file.join(format!("{}.jsonl", id.task))
    } else {
        file.join(format!("{}.{}.jsonl", id.task, id.map_index))
    };
    let crawl = match crate::crawl::Crawl::new(
        &frontier,
        source,
        &shared.config,
        start.clone(),
        shared.store.clone(),
    ) {
        Ok(c) => c,
        Err(e) => return done(spec, Ending::Failed, Some(e.report().to_string())),
    };
    let cancel = CancellationToken::new();
    let run = crawl.run(crate::crawl::Output::File(records.clone()), &cancel);
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => Ok(r),
        ending = limit(spec.timeout, stop, shutdown) => Err(ending),
    };
    let summary = match result {
        Ok(Ok(summary)) => summary,
        Ok(Err(e)) => return done(spec, Ending::Failed, Some(e.report().to_string())),
        Err(ending) => {
            cancel.cancel();
            let _ = run.await;
            return done(spec, ending, Some(stopped_message(spec, ending)));
        }
    };
    let mut d = done(spec, Ending::Succeeded, None);
    // The task's items are the URLs of the pages that made a record (the
    // records themselves stay in the file, `outputs.file`), read back: a
    // resumed crawl's earlier records are in the file too.
    #[derive(serde::Deserialize)]
    struct Line {
        url: String,
    }
    match std::fs::File::open(&records) {
        Ok(file) => {
            use std::io::BufRead as _;
            let mut seen = std::collections::HashSet::new();
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => {
                        return done(
                            spec,
                            Ending::Failed,
                            Some(format!("cannot read {}: {e}", records.display())),
                        );
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        if seen.insert(l.url.clone()) {
                            d.items.push(Value::String(l.url));
                        }
                    }
                    Err(e) => {
                        return done(
                            spec,
                            Ending::Failed,
                            Some(format!(
                                "{} line {}: not a record: {e}",
                                records.display(),
                                n + 1
                            )),
                        );
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return done(
                spec,
                Ending::Failed,
                Some(format!("cannot read {}: {e}", records.display())),
            );
        }
    }
    for (k, v) in [
        ("pages", summary.fetched),
        ("records", summary.records),
        ("unchanged", summary.unchanged),
        ("skipped", summary.skipped),
        ("failed", summary.failed),
    ] {
        d.outputs.insert(k.into(), Value::from(v));
    }
    d.outputs
        .insert("file".into(), Value::String(records.display().to_string()));
    d.outputs.insert("frontier".into(), Value::String(frontier));
    d
}

/// Reads what a successful attempt left: `$CAUDAL_OUTPUT` (JSON lines,
/// objects merged; an `items` array extends the items), `$CAUDAL_ITEMS`
/// (one item per line) and `items_from`.
async fn collect(spec: &Spec, done: &mut Done) -> Result<(), String> {
    if let Some(text) = read_optional(&spec.files.output).await? {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|e| {
                format!(
                    "$CAUDAL_OUTPUT ({}) line {}: not JSON: {e}",
                    spec.files.output.display(),
                    n + 1
                )
            })?;
            let Value::Object(object) = value else {
                return Err(format!(
                    "$CAUDAL_OUTPUT ({}) line {}: expected a JSON object such as {{\"count\": 3}}",
                    spec.files.output.display(),
                    n + 1
                ));
            };
            for (k, v) in object {
                if k == "items" {
                    match v {
                        Value::Array(items) => done.items.extend(items),
                        other => done.items.push(other),
                    }
                } else {
                    done.outputs.insert(k, v);
                }
            }
        }
    }
    if let Some(text) = read_optional(&spec.files.items).await? {
        done.items.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| Value::String(l.to_string())),
        );
    }
    if let Some((path, column)) = &spec.items_from {
        let items = read_items(path, column.as_deref()).await?;
        done.items.extend(items);
    }
    Ok(())
}

async fn read_optional(path: &Path) -> Result<Option<String>, String> {
    // Most attempts write no such file: one stat, without a trip to the
    // blocking pool.
    if std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(None);
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("{} is not UTF-8 text", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The items of an `items_from` file: JSON lines (`.jsonl`, `.ndjson`,
/// `.json`) or CSV with a header.
pub(crate) async fn read_items(path: &Path, column: Option<&str>) -> Result<Vec<Value>, String> {
    let text = read_optional(path).await?.ok_or_else(|| {
        format!(
            "items_from: {} does not exist (the task succeeded without writing it)",
            path.display()
        )
    })?;
    let json_lines = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "jsonl" | "ndjson" | "json"));
    let mut items = Vec::new();
    if json_lines {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|e| {
                format!(
                    "items_from: {} line {}: not JSON: {e}",
                    path.display(),
                    n + 1
                )
            })?;
            match column {
                None => items.push(value),
                Some(c) => items.push(value.get(c).cloned().ok_or_else(|| {
                    format!(
                        "items_from: {} line {} has no field `{c}`",
                        path.display(),
                        n + 1
                    )
                })?),
            }
        }
        return Ok(items);
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("items_from: {}: {e}", path.display()))?
        .clone();
    let index = match column {
        None => 0,
        Some(c) => headers.iter().position(|h| h.trim() == c).ok_or_else(|| {
            format!(
                "items_from: {} has no column `{c}`; its columns: {}",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?,
    };
    for (n, record) in reader.records().enumerate() {
        let record =
            record.map_err(|e| format!("items_from: {} row {}: {e}", path.display(), n + 2))?;
        if let Some(value) = record.get(index).filter(|v| !v.is_empty()) {
            items.push(Value::String(value.to_string()));
        }
    }
    Ok(items)
}

/// The last [`STDERR_TAIL`] bytes of a file, as text.
fn tail(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len == 0 {
        return None;
    }
    file.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL)))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Kills every process on this machine whose `CAUDAL_EXECUTOR` names an
/// executor other than `me` whose process is gone: what a crashed executor
/// left running. Returns how many were killed.
pub(crate) fn kill_orphans(me: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let marker = format!("{EXECUTOR_ENV}=");
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let holder = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(marker.as_bytes()))
            .map(|h| String::from_utf8_lossy(h).into_owned());
        let Some(holder) = holder else { continue };
        if holder != me
            && crate::lease::holder_is_dead_local(&holder)
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}
