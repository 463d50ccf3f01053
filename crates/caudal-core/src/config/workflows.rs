//! Workflows: named graphs of tasks (commands, pipeline runs, HTTP
//! requests) with dependencies, trigger rules, priorities, shared pools,
//! retries, outputs and fan-out; and the pools they share.
//!
//! The checks here report every problem of a workflow at its field: an
//! unknown task in `depends_on`, a cycle (named task by task), an unknown
//! pool or pipeline, a template that does not compile or names a variable
//! the task cannot see (a parameter that is not declared, a task that is not
//! upstream), settings that belong to another task type.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::pipelines::{ScheduleSpec, check_schedule, checked_name, unknown_reference};
use super::{PipelineConfig, ScheduleConfig, SourceConfig};
use crate::delivery::{Growth, RetryPolicy};
use crate::units::Duration;

/// Default longest wait before a task's first retry.
pub const DEFAULT_TASK_RETRY_INITIAL: Duration = Duration::from_secs(10);
/// Default cap on the wait between two attempts of a task.
pub const DEFAULT_TASK_RETRY_MAX: Duration = Duration::from_secs(600);
/// Default fraction of a task's retry wait left to chance.
pub const DEFAULT_TASK_RETRY_JITTER: f64 = 0.1;
/// Default exit code of a command that asks to be skipped.
pub const DEFAULT_SKIP_EXIT_CODE: i32 = 99;
/// Default attempts of a task (the first included): no retry.
pub const DEFAULT_TASK_MAX_ATTEMPTS: u32 = 1;

/// A workflow: tasks and the order they run in, on a schedule or on demand.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    /// When runs start by themselves: `{ every = "1h" }` or
    /// `{ cron = "0 6 * * *", tz = "America/Mexico_City" }`. Without it the
    /// workflow runs only when asked (`caudal workflow run`, the API).
    #[serde(default)]
    pub schedule: Option<WorkflowScheduleConfig>,
    /// Parameters with their defaults, e.g. `{ pages = 3 }`; a run may
    /// override them (`--param pages=5`). Templates read them as
    /// `{{ params.pages }}`.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// What a scheduled run does when the previous run has not ended:
    /// `"skip"` (default), `"queue_one"` or `"allow"`.
    #[serde(default)]
    pub overlap: Overlap,
    /// Which missed runs start after caudal was down: `"last"` (default:
    /// only the latest missed one), `"all"` or `"none"`.
    #[serde(default)]
    pub catchup: Catchup,
    /// A webhook told about every finished run with its summary.
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
    /// The tasks, by name.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskConfig>,
}

/// When a workflow's runs start by themselves. Set one of `every` or `cron`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowScheduleConfig {
    /// A run at a fixed interval, e.g. `"6h"`.
    #[serde(default)]
    pub every: Option<Duration>,
    /// A run on a cron expression (5 fields, or 6 with seconds).
    #[serde(default)]
    pub cron: Option<String>,
    /// IANA time zone for `cron` (default `UTC`).
    #[serde(default)]
    pub tz: Option<String>,
}

impl WorkflowScheduleConfig {
    /// The same schedule in a pipeline's terms (never continuous).
    pub fn as_pipeline_schedule(&self) -> ScheduleConfig {
        ScheduleConfig {
            every: self.every,
            cron: self.cron.clone(),
            tz: self.tz.clone(),
            continuous: false,
            poll: None,
            catch_up: None,
            start_date: None,
        }
    }

    /// The schedule this describes, or what is wrong with it.
    pub fn spec(&self) -> Result<ScheduleSpec, String> {
        self.as_pipeline_schedule().spec()
    }
}

/// What a scheduled run does when the previous run has not ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The new run is not started (logged and counted).
    #[default]
    Skip,
    /// One run waits for the running one; more are skipped.
    QueueOne,
    /// Runs overlap.
    Allow,
}

/// Which missed scheduled runs start after downtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Catchup {
    /// Only the latest missed run.
    #[default]
    Last,
    /// Every missed run, oldest first.
    All,
    /// None: wait for the next scheduled time.
    None,
}

/// A webhook called when a run ends.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where the summary is POSTed as JSON.
    pub url: String,
    /// Which runs: `"always"` (default), `"failure"` or `"success"`.
    #[serde(default)]
    pub on: NotifyOn,
    /// Extra request headers (e.g. an authorization).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Which finished runs are notified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    #[default]
    Always,
    Failure,
    Success,
}

/// What a task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// Runs a program (`run`), in its own process group.
    Command,
    /// Runs one of caudal's pipelines once and waits for it.
    Pipeline,
    /// Sends an HTTP request; a 2xx answer ends the task.
    Http,
    /// Crawls web pages as a `type = "crawl"` source describes; the
    /// records go to a file of the run and their URLs are the task's items.
    Crawl,
}

impl TaskType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Command => "command",
            Self::Pipeline => "pipeline",
            Self::Http => "http",
            Self::Crawl => "crawl",
        }
    }
}

/// When a task runs, given how its upstream tasks ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerRule {
    /// Every upstream task succeeded (default). Otherwise the task is
    /// `upstream_failed` (or `skipped` when an upstream was skipped).
    #[default]
    AllSuccess,
    /// Every upstream task ended, however.
    AllDone,
    /// At least one upstream task succeeded, once all have ended.
    OneSuccess,
}

/// One task of a workflow.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// `"command"`, `"pipeline"`, `"http"` or `"crawl"`.
    #[serde(rename = "type")]
    pub kind: TaskType,
    /// command: the program and its arguments, each a template, e.g.
    /// `["python3", "inm24.py", "--out", "{{ run.dir }}/inm24.csv"]`. No
    /// shell is involved (write `["sh", "-c", "…"]` for one).
    #[serde(default)]
    pub run: Vec<String>,
    /// command: working directory (a template); relative to the
    /// configuration file's directory. Default: that directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// command: extra environment variables (values are templates).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// command: the exit code that means "nothing to do": the task ends
    /// `skipped` and so do the tasks that need it (default 99, as in
    /// Airflow).
    #[serde(default = "default_skip_exit_code")]
    #[schemars(extend("default" = DEFAULT_SKIP_EXIT_CODE))]
    pub skip_exit_code: i32,
    /// command: the site the program scrapes (`"lamudi.com.mx"`): each
    /// attempt waits for the site's delay and holds one of its
    /// `[crawl]` concurrency slots while it runs, shared with every crawl
    /// of the process.
    #[serde(default)]
    pub site: Option<String>,
    /// crawl: the `type = "crawl"` source in `[sources]` that says what to
    /// fetch, follow and extract.
    #[serde(default)]
    pub source: Option<String>,
    /// crawl: start URLs (templates) instead of the source's.
    #[serde(default)]
    pub start_urls: Vec<String>,
    /// crawl: a list of start URLs (or of objects with a `url` field), e.g.
    /// `"{{ tasks.listings.items }}"`; with `start_urls`, they replace the
    /// source's start URLs.
    #[serde(default)]
    pub urls_from: Option<String>,
    /// pipeline: the pipeline to run once.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// http: the url (a template).
    #[serde(default)]
    pub url: Option<String>,
    /// http: the method (default `GET`, or `POST` with a `body`).
    #[serde(default)]
    pub method: Option<String>,
    /// http: request headers (values are templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// http: the request body (a template).
    #[serde(default)]
    pub body: Option<String>,
    /// http: how the endpoint knows caudal (basic, OAuth2 client
    /// credentials or an HMAC signature), as on the HTTP sink.
    #[serde(default)]
    pub auth: Option<super::partner::HttpAuth>,
    /// http: a custom CA and a client certificate, as on the HTTP sink.
    #[serde(default)]
    pub tls: Option<super::partner::HttpTls>,
    /// Tasks that must end before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// When the task runs given how its upstream tasks ended:
    /// `"all_success"` (default), `"all_done"` or `"one_success"`.
    #[serde(default)]
    pub trigger_rule: TriggerRule,
    /// Order among tasks waiting for the same pool: 1 starts before 2.
    /// Tasks without a priority start after those with one.
    #[serde(default)]
    pub priority: Option<i32>,
    /// The `[pools.NAME]` whose slots this task takes (one per running
    /// attempt). Without it only the workflow's own limits apply.
    #[serde(default)]
    pub pool: Option<String>,
    /// Longest time of one attempt; its process group is killed after it.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Longest time of all attempts together, from the first start; no
    /// attempt starts after it and a running one is killed at it.
    #[serde(default)]
    pub deadline: Option<Duration>,
    /// Retries of a failed attempt.
    #[serde(default)]
    pub retry: TaskRetryConfig,
    /// A CSV (with a header) or JSON-lines file the task writes, whose rows
    /// become the task's items (a template, e.g.
    /// `"{{ run.dir }}/inm24_urls.csv"`).
    #[serde(default)]
    pub items_from: Option<String>,
    /// The column (CSV) or field (JSON lines) of `items_from` that holds
    /// each item. Default: the first column; a JSON line's whole value.
    #[serde(default)]
    pub items_column: Option<String>,
    /// Fan-out: one instance of this task per item of a list, e.g.
    /// `"{{ tasks.inm24.items }}"`. Each instance sees `item` (and `index`).
    #[serde(default)]
    pub for_each: Option<String>,
    /// With `for_each`: items per instance; each instance then sees the
    /// list `items` (and `item` is its first).
    #[serde(default)]
    pub chunk: Option<u32>,
    /// With `for_each`: most instances running at once (default: no limit
    /// besides the pool).
    #[serde(default)]
    pub max_parallel: Option<u32>,
}

/// A task's retries. The same policy as a sink's retries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRetryConfig {
    /// `"exponential"` (default; doubles), `"linear"` or `"fixed"`.
    #[serde(default)]
    pub strategy: RetryStrategy,
    /// Wait before the first retry (default `"10s"`).
    #[serde(default = "default_task_retry_initial")]
    #[schemars(extend("default" = DEFAULT_TASK_RETRY_INITIAL))]
    pub initial: Duration,
    /// Longest wait between two attempts (default `"10m"`).
    #[serde(default = "default_task_retry_max")]
    #[schemars(extend("default" = DEFAULT_TASK_RETRY_MAX))]
    pub max: Duration,
    /// Fraction of each wait left to chance, 0 to 1 (default 0.1: a wait
    /// is between 90% and 100% of its value).
    #[serde(default = "default_task_retry_jitter")]
    #[schemars(extend("default" = DEFAULT_TASK_RETRY_JITTER))]
    pub jitter: f64,
    /// Attempts in all, the first included (default 1: no retry).
    #[serde(default = "default_task_max_attempts")]
    #[schemars(extend("default" = DEFAULT_TASK_MAX_ATTEMPTS))]
    pub max_attempts: u32,
}

impl Default for TaskRetryConfig {
    fn default() -> Self {
        Self {
            strategy: RetryStrategy::default(),
            initial: DEFAULT_TASK_RETRY_INITIAL,
            max: DEFAULT_TASK_RETRY_MAX,
            jitter: DEFAULT_TASK_RETRY_JITTER,
            max_attempts: DEFAULT_TASK_MAX_ATTEMPTS,
        }
    }
}

impl TaskRetryConfig {
    /// These retries as the shared retry policy, giving up
    /// `give_up_after` after the first attempt (zero: never).
    pub fn policy(&self, give_up_after: std::time::Duration) -> RetryPolicy {
        let growth = match self.strategy {
            RetryStrategy::Exponential => Growth::Exponential { multiplier: 2.0 },
            RetryStrategy::Linear => Growth::Linear,
            RetryStrategy::Fixed => Growth::Fixed,
        };
        RetryPolicy::new(
            self.initial.as_std(),
            growth,
            self.jitter,
            self.max.as_std(),
            self.max_attempts.max(1),
            give_up_after,
        )
    }
}

fn default_skip_exit_code() -> i32 {
    DEFAULT_SKIP_EXIT_CODE
}
fn default_task_retry_initial() -> Duration {
    DEFAULT_TASK_RETRY_INITIAL
}
fn default_task_retry_max() -> Duration {
    DEFAULT_TASK_RETRY_MAX
}
fn default_task_retry_jitter() -> f64 {
    DEFAULT_TASK_RETRY_JITTER
}
fn default_task_max_attempts() -> u32 {
    DEFAULT_TASK_MAX_ATTEMPTS
}

/// How a task's retry wait grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryStrategy {
    #[default]
    Exponential,
    Linear,
    Fixed,
}

impl TaskConfig {
    /// The task's retry policy (the same type a sink's retries use), with
    /// its `deadline` as the time after which it gives up.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry.policy(
            self.deadline
                .map_or(std::time::Duration::ZERO, Duration::as_std),
        )
    }

    /// Every template of the task with the field it sits in.
    pub fn templates(&self) -> Vec<(FieldPathText, &str)> {
        let mut out: Vec<(FieldPathText, &str)> = Vec::new();
        for (i, arg) in self.run.iter().enumerate() {
            out.push((FieldPathText::Index("run", i), arg));
        }
        if let Some(cwd) = &self.cwd {
            out.push((FieldPathText::Field("cwd"), cwd));
        }
        for (k, v) in &self.env {
            out.push((FieldPathText::Key("env", k.clone()), v));
        }
        if let Some(url) = &self.url {
            out.push((FieldPathText::Field("url"), url));
        }
        for (k, v) in &self.headers {
            out.push((FieldPathText::Key("headers", k.clone()), v));
        }
        if let Some(body) = &self.body {
            out.push((FieldPathText::Field("body"), body));
        }
        if let Some(items) = &self.items_from {
            out.push((FieldPathText::Field("items_from"), items));
        }
        if let Some(each) = &self.for_each {
            out.push((FieldPathText::Field("for_each"), each));
        }
        for (i, url) in self.start_urls.iter().enumerate() {
            out.push((FieldPathText::Index("start_urls", i), url));
        }
        if let Some(from) = &self.urls_from {
            out.push((FieldPathText::Field("urls_from"), from));
        }
        out
    }
}

/// Where a template sits inside a task, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldPathText {
    Field(&'static str),
    Index(&'static str, usize),
    Key(&'static str, String),
}

impl FieldPathText {
    fn under(&self, task: &FieldPath) -> FieldPath {
        match self {
            Self::Field(f) => task.key(*f),
            Self::Index(f, i) => task.key(*f).index(*i),
            Self::Key(f, k) => task.key(*f).key(k.clone()),
        }
    }
}

/// A pool of slots shared by every workflow's tasks that name it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Task attempts running at once.
    pub slots: u32,
    /// At most this many starts per period, e.g. `"30/min"` (a per-site
    /// limit); `sec`, `min` and `hour` are the periods.
    #[serde(default)]
    pub rate: Option<String>,
}

/// A pool's rate, checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolRate {
    pub starts: u32,
    pub per: std::time::Duration,
}

impl PoolConfig {
    /// The `rate`, parsed (`None` when not set).
    pub fn parsed_rate(&self) -> Result<Option<PoolRate>, String> {
        let Some(rate) = &self.rate else {
            return Ok(None);
        };
        let bad =
            || format!("invalid rate {rate:?}; write e.g. \"30/min\", \"2/sec\" or \"100/hour\"");
        let (n, per) = rate.split_once('/').ok_or_else(bad)?;
        let starts: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match per.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        if starts == 0 {
            return Err(format!(
                "rate {rate:?} allows no start; the count must be at least 1"
            ));
        }
        Ok(Some(PoolRate {
            starts,
            per: std::time::Duration::from_secs(per),
        }))
    }
}

/// Variables every task's templates see.
pub const TASK_TEMPLATE_VARIABLES: &[&str] = &["params", "run", "tasks", "workflow"];
/// Variables only a fanned-out (`for_each`) task's templates see.
pub const FAN_OUT_TEMPLATE_VARIABLES: &[&str] = &["item", "items", "index"];
/// Functions minijinja provides to every template.
const TEMPLATE_GLOBALS: &[&str] = &["range", "dict", "namespace", "debug", "cycler", "joiner"];
/// What `tasks.NAME` holds.
pub const TASK_RESULT_FIELDS: &[&str] = &["outputs", "items", "state", "results"];

/// What the tasks of workflows may name.
pub(super) struct Names<'a> {
    pub pools: &'a BTreeMap<String, PoolConfig>,
    pub pipelines: &'a BTreeMap<String, PipelineConfig>,
    pub sources: &'a BTreeMap<String, SourceConfig>,
}

/// Checks every workflow and pool.
pub(super) fn check(
    workflows: &BTreeMap<String, WorkflowConfig>,
    names: &Names<'_>,
    out: &mut Vec<Problem>,
) {
    let pools = names.pools;
    let root = FieldPath::root();
    for (name, pool) in pools {
        let path = root.key("pools").key(name.clone());
        if pool.slots == 0 {
            out.push(Problem::at(path.key("slots"), "must be at least 1"));
        }
        if let Err(why) = pool.parsed_rate() {
            out.push(Problem::at(path.key("rate"), why));
        }
    }
    for (name, workflow) in workflows {
        let path = root.key("workflows").key(name.clone());
        if let Err(why) = checked_name("workflow", name) {
            out.push(Problem::at_key(path.clone(), why));
        }
        check_workflow(&path, workflow, names, out);
    }
}

fn check_workflow(
    path: &FieldPath,
    workflow: &WorkflowConfig,
    names: &Names<'_>,
    out: &mut Vec<Problem>,
) {
    if let Some(schedule) = &workflow.schedule {
        let s = schedule.as_pipeline_schedule();
        check_schedule(&path.key("schedule"), &s, out);
    }
    if let Some(notify) = &workflow.notify
        && !(notify.url.starts_with("http://") || notify.url.starts_with("https://"))
    {
        out.push(Problem::at(
            path.key("notify").key("url"),
            "must be an http:// or https:// url",
        ));
    }
    if workflow.tasks.is_empty() {
        out.push(Problem::at_key(
            path.clone(),
            "a workflow needs at least one task ([workflows.NAME.tasks.TASK])",
        ));
    }
    let tasks_path = path.key("tasks");
    for (name, task) in &workflow.tasks {
        let path = tasks_path.key(name.clone());
        if let Err(why) = checked_name("task", name) {
            out.push(Problem::at_key(path.clone(), why));
        }
        check_task(&path, name, task, workflow, names, out);
    }
    if let Some(cycle) = find_cycle(&workflow.tasks) {
        let first = cycle.first().cloned().unwrap_or_default();
        out.push(Problem::at(
            tasks_path.key(first).key("depends_on"),
            format!(
                "tasks depend on each other in a cycle: {}",
                cycle.join(" → ")
            ),
        ));
    }
}

fn check_task(
    path: &FieldPath,
    name: &str,
    task: &TaskConfig,
    workflow: &WorkflowConfig,
    names: &Names<'_>,
    out: &mut Vec<Problem>,
) {
    let (pools, pipelines) = (names.pools, names.pipelines);
    let kind = task.kind.as_str();
    let only = |field: &str, set: bool, owner: TaskType, out: &mut Vec<Problem>| {
        if set && task.kind != owner {
            out.push(Problem::at_key(
                path.key(field.to_string()),
                format!(
                    "`{field}` applies only to {} tasks; this task is a {kind} task",
                    owner.as_str()
                ),
            ));
        }
    };
    only("run", !task.run.is_empty(), TaskType::Command, out);
    only("cwd", task.cwd.is_some(), TaskType::Command, out);
    only("env", !task.env.is_empty(), TaskType::Command, out);
    only("pipeline", task.pipeline.is_some(), TaskType::Pipeline, out);
    only("url", task.url.is_some(), TaskType::Http, out);
    only("method", task.method.is_some(), TaskType::Http, out);
    only("headers", !task.headers.is_empty(), TaskType::Http, out);
    only("body", task.body.is_some(), TaskType::Http, out);
    only("auth", task.auth.is_some(), TaskType::Http, out);
    only("tls", task.tls.is_some(), TaskType::Http, out);
    only("site", task.site.is_some(), TaskType::Command, out);
    only("source", task.source.is_some(), TaskType::Crawl, out);
    only(
        "start_urls",
        !task.start_urls.is_empty(),
        TaskType::Crawl,
        out,
    );
    only("urls_from", task.urls_from.is_some(), TaskType::Crawl, out);
    if let Some(site) = &task.site
        && (site.is_empty() || site.contains(['/', ' ']) || site.to_lowercase() != *site)
    {
        out.push(Problem::at(
            path.key("site"),
            format!("{site:?} is not a host; write it lowercase, as \"lamudi.com.mx\""),
        ));
    }
    match task.kind {
        TaskType::Command => {
            if task.run.is_empty() || task.run[0].trim().is_empty() {
                out.push(Problem::at_key(
                    path.key("run"),
                    "a command task needs `run`: the program and its arguments, e.g. [\"python3\", \"scraper.py\"]",
                ));
            }
        }
        TaskType::Pipeline => match &task.pipeline {
            None => out.push(Problem::at_key(
                path.clone(),
                "a pipeline task needs `pipeline`: the name of a [pipelines.NAME]",
            )),
            Some(p) if !pipelines.contains_key(p) => out.push(Problem::at(
                path.key("pipeline"),
                unknown_reference("pipeline", p, pipelines),
            )),
            Some(_) => {}
        },
        TaskType::Crawl => match &task.source {
            None => out.push(Problem::at_key(
                path.clone(),
                "a crawl task needs `source`: the name of a [sources.NAME] with type = \"crawl\"",
            )),
            Some(s) => match names.sources.get(s) {
                None => out.push(Problem::at(
                    path.key("source"),
                    unknown_reference("source", s, names.sources),
                )),
                Some(c) if c.crawl().is_none() => out.push(Problem::at(
                    path.key("source"),
                    format!(
                        "source {s:?} is a {} source; a crawl task needs a type = \"crawl\" one",
                        c.type_name()
                    ),
                )),
                Some(_) => {}
            },
        },
        TaskType::Http => {
            if task.url.is_none() {
                out.push(Problem::at_key(path.clone(), "an http task needs `url`"));
            }
            if let Some(method) = &task.method
                && !is_method_token(method)
            {
                out.push(Problem::at(
                    path.key("method"),
                    format!("{method:?} is not an HTTP method"),
                ));
            }
            let header_names: Vec<String> = task
                .headers
                .keys()
                .map(|h| h.to_ascii_lowercase())
                .collect();
            super::partner::check_partner(
                path,
                task.auth.as_ref(),
                task.tls.as_ref(),
                &header_names,
                out,
            );
        }
    }
    for (i, dep) in task.depends_on.iter().enumerate() {
        let at = path.key("depends_on").index(i);
        if dep == name {
            out.push(Problem::at(at, "a task cannot depend on itself"));
        } else if !workflow.tasks.contains_key(dep) {
            out.push(Problem::at(
                at,
                unknown_reference("task", dep, &workflow.tasks),
            ));
        }
    }
    if let Some(pool) = &task.pool
        && !pools.contains_key(pool)
    {
        out.push(Problem::at(
            path.key("pool"),
            unknown_reference("pool", pool, pools),
        ));
    }
    for (field, value) in [("timeout", task.timeout), ("deadline", task.deadline)] {
        if value.is_some_and(|d| d.as_std().is_zero()) {
            out.push(Problem::at(path.key(field), "must be greater than 0s"));
        }
    }
    let retry = path.key("retry");
    if task.retry.max_attempts == 0 {
        out.push(Problem::at(
            retry.key("max_attempts"),
            "must be at least 1 (the first attempt counts)",
        ));
    }
    if !(0.0..=1.0).contains(&task.retry.jitter) {
        out.push(Problem::at(retry.key("jitter"), "must be between 0 and 1"));
    }
    if task.items_column.is_some() && task.items_from.is_none() {
        out.push(Problem::at_key(
            path.key("items_column"),
            "`items_column` needs `items_from` (the file whose column it names)",
        ));
    }
    let fan_out = task.for_each.is_some();
    for (field, value) in [("chunk", task.chunk), ("max_parallel", task.max_parallel)] {
        match value {
            Some(_) if !fan_out => out.push(Problem::at_key(
                path.key(field),
                format!("`{field}` applies only to a task with `for_each`"),
            )),
            Some(0) => out.push(Problem::at(path.key(field), "must be at least 1")),
            _ => {}
        }
    }
    let upstream = upstream_of(name, &workflow.tasks);
    for (at, template) in task.templates() {
        let at = at.under(path);
        if let Err(why) = check_template(template, workflow, &upstream, fan_out) {
            out.push(Problem::at(at, why));
        }
    }
    if let Some(each) = &task.for_each
        && !each.contains("tasks.")
        && !each.contains("params.")
    {
        out.push(Problem::at(
            path.key("for_each"),
            "must name a list, e.g. \"{{ tasks.inm24.items }}\" or \"{{ params.urls }}\"",
        ));
    }
}

/// An HTTP method as written in a config: an upper-case token.
fn is_method_token(method: &str) -> bool {
    !method.is_empty() && method.chars().all(|c| c.is_ascii_uppercase() || c == '-')
}

/// Every task `name` depends on, directly or not.
fn upstream_of(name: &str, tasks: &BTreeMap<String, TaskConfig>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = vec![name];
    while let Some(t) = stack.pop() {
        for dep in tasks.get(t).map(|t| t.depends_on.as_slice()).unwrap_or(&[]) {
            if seen.insert(dep.clone()) {
                stack.push(dep);
            }
        }
    }
    seen.remove(name);
    seen
}

/// A cycle among `depends_on`, as the tasks along it (the first repeated at
/// the end), or `None`.
fn find_cycle(tasks: &BTreeMap<String, TaskConfig>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        name: &'a str,
        tasks: &'a BTreeMap<String, TaskConfig>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(name) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|n| *n == name).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(name, Mark::Visiting);
        path.push(name);
        if let Some(task) = tasks.get(name) {
            for dep in &task.depends_on {
                if tasks.contains_key(dep)
                    && let Some(cycle) = visit(dep, tasks, marks, path)
                {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        marks.insert(name, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for name in tasks.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(name, tasks, &mut marks, &mut path) {
            return Some(cycle);
        }
    }
    None
}

/// Checks that a task template compiles and names only what the task can
/// see: declared params, upstream tasks' results, `item` in a fan-out.
fn check_template(
    template: &str,
    workflow: &WorkflowConfig,
    upstream: &BTreeSet<String>,
    fan_out: bool,
) -> Result<(), String> {
    let env = minijinja::Environment::new();
    let compiled = env.template_from_str(template).map_err(|error| {
        let detail = error
            .detail()
            .map_or_else(|| error.to_string(), str::to_string);
        format!("template does not compile: {detail}")
    })?;
    let mut problems = Vec::new();
    for var in compiled.undeclared_variables(true) {
        let mut parts = var.split('.');
        let top = parts.next().unwrap_or_default();
        match top {
            "params" => {
                if let Some(p) = parts.next()
                    && !workflow.params.contains_key(p)
                {
                    problems.push(format!(
                        "`params.{p}` is not declared in the workflow's `params`"
                    ));
                }
            }
            "tasks" => match parts.next() {
                Some(t) if !upstream.contains(t) => {
                    let why = if workflow.tasks.contains_key(t) {
                        "is not upstream of this task (add it to `depends_on`)"
                    } else {
                        "is not a task of this workflow"
                    };
                    problems.push(format!("`tasks.{t}` {why}"));
                }
                Some(t) => {
                    if let Some(field) = parts.next()
                        && !TASK_RESULT_FIELDS.contains(&field)
                    {
                        problems.push(format!(
                            "`tasks.{t}.{field}`: a task's results are {}",
                            TASK_RESULT_FIELDS.join(", ")
                        ));
                    }
                }
                None => {}
            },
            v if TASK_TEMPLATE_VARIABLES.contains(&v) || TEMPLATE_GLOBALS.contains(&v) => {}
            v if FAN_OUT_TEMPLATE_VARIABLES.contains(&v) => {
                if !fan_out {
                    problems.push(format!("`{v}` exists only in a task with `for_each`"));
                }
            }
            v => problems.push(format!(
                "unknown variable `{v}`; templates see {}{}",
                TASK_TEMPLATE_VARIABLES.join(", "),
                if fan_out { ", item, items, index" } else { "" }
            )),
        }
    }
    problems.sort();
    problems.dedup();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
