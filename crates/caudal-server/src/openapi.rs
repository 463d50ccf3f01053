//! The answers of `/api/v1` and its OpenAPI document, generated from the
//! handlers' annotations and these types, served at `/api/openapi.json`
//! (and as Swagger UI at `/api/docs`). The handlers build these types and
//! the remote client reads them back, so the document cannot drift from
//! what is answered; the API tests validate real answers against it too.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error: a stable code and a message for people.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// `unauthorized`, `forbidden`, `rate_limited`, `not_found`,
    /// `bad_request`, `conflict`, `paused`, `not_paused`, `not_pending`,
    /// `not_cdc`, `buffer_not_empty` or `internal`.
    pub code: String,
    pub message: String,
}

use caudal_connectors::crawl::SiteStats;
pub use caudal_core::status::PipelineStatus;
pub use caudal_core::workflow::{
    AttemptInfo, AttemptState, RunState, TaskInstanceInfo, TaskState, WorkflowRunInfo,
};
pub use caudal_engine::cluster::NodeView;
pub use caudal_engine::workflow::WorkflowSummary;
use caudal_store::{
    AuditRecord, DeadLetter as StoredLetter, FrontierSummary, PageRow, RunRecord, TokenRecord,
};

/// A pipeline and its latest runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PipelineDetail {
    #[serde(flatten)]
    pub status: PipelineStatus,
    pub runs: Vec<Run>,
}

/// Every pipeline's status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineStatus>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub pipeline: String,
    /// The source position, by kind (`cursor`, `lsn`, `binlog`, …).
    #[schema(value_type = Object)]
    pub position: Value,
    pub updated_at: String,
}

/// The answer of pause, resume and trigger.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Steered {
    pub pipeline: String,
    pub paused: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: i64,
    pub pipeline: String,
    /// `schedule` or `manual`.
    pub trigger: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub rows_read: u64,
    pub rows_delivered: u64,
    /// `running`, `succeeded`, `failed`, `cancelled`, `abandoned`.
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; null at the end.
    pub next_cursor: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub pipeline: String,
    /// `pending`, `replayed` or `discarded`.
    pub state: String,
    pub batch_key: String,
    pub event_id: String,
    pub record_key: Option<String>,
    pub status: Option<u16>,
    pub reason: String,
    pub attempts: u32,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub created_at: String,
}

/// A dead letter with its record, position and the receiver's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub letter: DeadLetter,
    #[schema(value_type = Object)]
    pub record: Value,
    #[schema(value_type = Object)]
    pub position: Value,
    pub response_excerpt: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; null at the end.
    pub next_cursor: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Discarded {
    pub id: i64,
    pub state: String,
}

/// The answer of a checkpoint reset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointReset {
    pub pipeline: String,
    pub had_checkpoint: bool,
}

/// A backfill request taken.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillStarted {
    pub pipeline: String,
    pub id: String,
    pub table: String,
    /// Rows matching now.
    pub rows: u64,
}

/// What a replay of dead letters did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replayed {
    pub pipeline: String,
    /// Letters sent again and delivered.
    pub delivered: u64,
    /// Letters refused again (kept as new dead letters).
    pub rejected_again: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<Token>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    /// The name of the token that made the call.
    pub token: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditLog {
    pub audit: Vec<AuditEntry>,
}

/// Every node registered in the state store, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// A backup `caudal run` took (`POST /api/v1/backups`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackupTaken {
    /// Its directory, on the daemon's machine.
    pub dir: String,
    /// When it was taken (RFC 3339, UTC).
    pub taken_at: String,
    /// `sqlite` (the store is copied) or `postgres` (it is not: pg_dump).
    pub store: String,
    /// Each pipeline's buffer copy.
    pub buffers: std::collections::BTreeMap<String, BackupBuffer>,
    /// Pipelines whose buffer this node does not hold (another node of
    /// the cluster owns them): not copied.
    pub not_copied: Vec<String>,
}

/// One pipeline's buffer in a backup.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackupBuffer {
    /// The acknowledged offset: a restore delivers from here.
    pub acked: u64,
    /// One past the last entry copied.
    pub next_offset: u64,
    /// Segment files copied.
    pub segments: u64,
    /// Bytes copied.
    pub bytes: u64,
}

impl From<caudal_engine::backup::Taken> for BackupTaken {
    fn from(t: caudal_engine::backup::Taken) -> Self {
        Self {
            dir: t.dir.display().to_string(),
            taken_at: t.manifest.taken_at,
            store: t.manifest.store,
            not_copied: t.manifest.not_copied,
            buffers: t
                .manifest
                .buffers
                .into_iter()
                .map(|(name, c)| {
                    (
                        name,
                        BackupBuffer {
                            acked: c.acked,
                            next_offset: c.next_offset,
                            segments: c.segments as u64,
                            bytes: c.bytes,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Every workflow with its last run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkflowList {
    pub workflows: Vec<WorkflowSummary>,
}

/// Workflow runs, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkflowRunList {
    pub runs: Vec<WorkflowRunInfo>,
}

/// The task instances of a workflow run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskInstanceInfo>,
}

/// Every attempt of a workflow run's tasks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptList {
    pub attempts: Vec<AttemptInfo>,
}

/// One site the crawler of this process has asked since it started: its
/// limits in force and its figures (every crawl and every command task
/// that names the site counts against the same site).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CrawlSite {
    /// `name` or `name:port`.
    pub host: String,
    /// Requests (or command tasks) that may be in flight at once.
    pub concurrency: u32,
    pub in_flight: u32,
    /// Requests ended (answered, throttled or failed) in the last 60
    /// seconds: the site's pages per minute (robots.txt and each redirect
    /// are requests too).
    pub pages_per_minute: u64,
    /// Requests started since the process started (command tasks' slots
    /// included).
    pub requests: u64,
    /// Answered (any status but 429, 503 and other 5xx).
    pub succeeded: u64,
    /// 5xx, network errors and timeouts.
    pub failed: u64,
    /// 429 or 503.
    pub throttled: u64,
    /// `succeeded / (succeeded + failed + throttled)`, from 0 to 1; null
    /// before a request has ended.
    pub success_rate: Option<f64>,
    /// Body bytes received.
    pub bytes: u64,
    /// Time to the response head, smoothed (the last answers weigh most).
    pub latency_seconds: f64,
    /// The delay now in force between two request starts: the configured
    /// one, raised by robots.txt's `Crawl-delay` and by the adaptive
    /// throttle.
    pub delay_seconds: f64,
    /// Seconds until the site may be asked again (a `Retry-After`, a
    /// back-off after failures); 0 when it may.
    pub blocked_seconds: f64,
}

/// Every site the crawler of this process has asked, by host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CrawlSiteList {
    pub sites: Vec<CrawlSite>,
}

/// A crawl frontier: the URLs one crawl knows and what became of them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Frontier {
    /// `pipeline:<pipeline>` for a crawl source, `workflow:<run>:<task>`
    /// (or `workflow:<run>:<task>:<map index>`) for a workflow's crawl task.
    pub name: String,
    /// The crawl's generation: 1 for the first, one more for each re-crawl.
    pub generation: i64,
    /// `crawling` (also a crawl stopped before its end: the next run
    /// resumes it) or `finished`.
    pub state: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Pages by state: `queued`, `fetching`, `done`, `unchanged`, `failed`,
    /// `skipped` (states without pages are left out).
    pub pages: std::collections::BTreeMap<String, u64>,
}

/// Crawl frontiers, by name.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FrontierList {
    pub frontiers: Vec<Frontier>,
}

/// One page of a frontier.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CrawlPage {
    pub url: String,
    pub generation: i64,
    /// `queued`, `fetching`, `done`, `unchanged` (a 304), `failed` or
    /// `skipped` (robots.txt, not HTML).
    pub state: String,
    /// Links followed from a start URL to reach it (0: a start URL).
    pub depth: u32,
    pub attempts: u32,
    /// The HTTP status of the last answer.
    pub status: Option<u16>,
    /// The page kind its URL matched.
    pub kind: Option<String>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    pub fetched_at: Option<String>,
}

/// Pages of one frontier, in the order they were found.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CrawlPageList {
    pub frontier: String,
    pub pages: Vec<CrawlPage>,
}

/// A page of a dataset's rows (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RowPage {
    pub dataset: String,
    /// Rows: partition columns first, then the files' columns; decimals as
    /// strings with their scale, timestamps in RFC 3339, NULL as null.
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

impl From<&SiteStats> for CrawlSite {
    fn from(s: &SiteStats) -> Self {
        let ended = s.succeeded + s.failed + s.throttled;
        let success_rate = (ended > 0).then(|| s.succeeded as f64 / ended as f64);
        Self {
            host: s.host.clone(),
            concurrency: s.concurrency,
            in_flight: s.in_flight,
            pages_per_minute: s.per_minute,
            requests: s.requests,
            succeeded: s.succeeded,
            failed: s.failed,
            throttled: s.throttled,
            success_rate,
            bytes: s.bytes,
            latency_seconds: s.latency_seconds,
            delay_seconds: s.delay_seconds,
            blocked_seconds: s.blocked_seconds,
        }
    }
}

impl From<&FrontierSummary> for Frontier {
    fn from(f: &FrontierSummary) -> Self {
        Self {
            name: f.name.clone(),
            generation: f.generation,
            state: f.state.clone(),
            started_at: f.started_at.map(|t| t.to_string()),
            ended_at: f.ended_at.map(|t| t.to_string()),
            pages: f.pages.iter().cloned().collect(),
        }
    }
}

impl From<&PageRow> for CrawlPage {
    fn from(p: &PageRow) -> Self {
        Self {
            url: p.url.clone(),
            generation: p.generation,
            state: p.state.clone(),
            depth: p.depth,
            attempts: p.attempts,
            status: p.status,
            kind: p.kind.clone(),
            error: p.error.clone(),
            fetched_at: p.fetched_at.map(|t| t.to_string()),
        }
    }
}

impl From<&RunRecord> for Run {
    fn from(r: &RunRecord) -> Self {
        Self {
            id: r.id,
            pipeline: r.pipeline.clone(),
            trigger: r.trigger.clone(),
            started_at: r.started_at.to_string(),
            ended_at: r.ended_at.map(|t| t.to_string()),
            rows_read: r.rows_read,
            rows_delivered: r.rows_delivered,
            outcome: r.outcome.as_str().to_string(),
            error: r.error.clone(),
        }
    }
}

impl From<&StoredLetter> for DeadLetter {
    fn from(l: &StoredLetter) -> Self {
        Self {
            id: l.id,
            pipeline: l.pipeline.clone(),
            state: l.state.as_str().to_string(),
            batch_key: l.batch_key.clone(),
            event_id: l.event_id.clone(),
            record_key: l.record_key.clone(),
            status: l.status,
            reason: l.reason.clone(),
            attempts: l.attempts,
            first_attempt_at: l.first_attempt_at.map(|t| t.to_string()),
            last_attempt_at: l.last_attempt_at.map(|t| t.to_string()),
            created_at: l.created_at.to_string(),
        }
    }
}

impl From<&StoredLetter> for DeadLetterDetail {
    fn from(l: &StoredLetter) -> Self {
        Self {
            letter: DeadLetter::from(l),
            record: l.record.clone(),
            position: l.position.clone(),
            response_excerpt: l.response_excerpt.clone(),
        }
    }
}

impl From<&TokenRecord> for Token {
    fn from(t: &TokenRecord) -> Self {
        Self {
            name: t.name.clone(),
            role: t.role.clone(),
            created_at: t.created_at.to_string(),
            revoked_at: t.revoked_at.map(|r| r.to_string()),
        }
    }
}

impl From<&AuditRecord> for AuditEntry {
    fn from(a: &AuditRecord) -> Self {
        Self {
            id: a.id,
            at: a.at.to_string(),
            token: a.token.clone(),
            method: a.method.clone(),
            path: a.path.clone(),
            status: a.status,
        }
    }
}

#[derive(Debug)]
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every operation lists the rejections any request may meet before its
/// handler runs, in the one error shape: 400 (a path, query or body that
/// does not parse), and for those with a body 415 (not JSON) and 422 (JSON
/// of the wrong shape).
#[derive(Debug)]
struct Rejections;

impl Modify for Rejections {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build()
        };
        let answer = |text: &str| {
            ResponseBuilder::new()
                .description(text)
                .content("application/json", error())
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let has_body = op.request_body.is_some();
                let responses = &mut op.responses.responses;
                responses
                    .entry("400".into())
                    .or_insert_with(|| answer("a path, query or body that does not parse").into());
                if has_body {
                    responses
                        .entry("415".into())
                        .or_insert_with(|| answer("a body that is not application/json").into());
                    responses
                        .entry("422".into())
                        .or_insert_with(|| answer("JSON of the wrong shape").into());
                }
            }
        }
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "caudal", description = "The REST API of `caudal run`: see docs/api.md."),
    paths(
        crate::api::pipelines,
        crate::api::pipeline,
        crate::api::checkpoint,
        crate::api::history,
        crate::api::pause,
        crate::api::resume,
        crate::api::trigger,
        crate::api::runs,
        crate::api::run,
        crate::api::dead_letters,
        crate::api::dead_letter,
        crate::api::discard,
        crate::api::backfill,
        crate::api::replay,
        crate::api::reset_checkpoint,
        crate::api::resync,
        crate::api::tokens,
        crate::api::audit,
        crate::api::nodes,
        crate::api::drain_node,
        crate::api::backup,
        crate::api::workflows,
        crate::api::start_workflow,
        crate::api::workflow_runs,
        crate::api::workflow_run,
        crate::api::workflow_tasks,
        crate::api::workflow_attempts,
        crate::api::workflow_log,
        crate::api::cancel_workflow_run,
        crate::api::retry_workflow_run,
        crate::api::crawl_sites,
        crate::api::crawl_frontiers,
        crate::api::crawl_pages,
        crate::datasets::datasets,
        crate::datasets::partitions,
        crate::datasets::rows,
        crate::live::aggregates,
        crate::live::windows,
        crate::live::stream,
        crate::alerts::alerts,
        crate::alerts::history,
        crate::alerts::notifications,
        crate::alerts::silence,
        crate::alerts::unsilence,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, PipelineStatus, PipelineDetail, PipelineList, Checkpoint,
        Steered, Run, RunPage, DeadLetter, DeadLetterDetail, DeadLetterPage, Discarded, Token,
        TokenList, AuditEntry, AuditLog, BackfillStarted, Replayed, CheckpointReset, crate::api::BackfillBody,
        crate::api::ReplayBody, WorkflowSummary, WorkflowRunInfo, TaskInstanceInfo, AttemptInfo,
        NodeList, NodeView, RunState, TaskState, AttemptState, WorkflowList, WorkflowRunList, TaskList, AttemptList,
        crate::api::StartBody, caudal_engine::workflow::TaskNode, crate::api::RunOutcome, crate::api::LetterState, crate::history::PipelineHistory, crate::history::HistoryPoint, CrawlSite, CrawlSiteList, Frontier, FrontierList, CrawlPage,
        CrawlPageList, RowPage, crate::datasets::DatasetInfo, crate::datasets::DatasetList,
        crate::datasets::PartitionInfo, crate::datasets::PartitionList,
        crate::live::AggregateInfo, crate::live::AggregateList, crate::live::LiveWindows,
        caudal_engine::aggregate::WindowView, crate::alerts::AlertList, crate::alerts::AlertInfo,
        crate::alerts::InstanceInfo, crate::alerts::SilenceInfo, crate::alerts::HistoryPage,
        crate::alerts::EventInfo, crate::alerts::NotificationPage, crate::alerts::NotificationInfo,
        crate::alerts::SilenceBody, crate::alerts::SilenceEnded, caudal_core::alert::AlertState,
        crate::api::BackupBody, BackupTaken, BackupBuffer
    )),
    modifiers(&Bearer, &Rejections)
)]
pub struct ApiDoc;
