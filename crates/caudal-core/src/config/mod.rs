//! The configuration model: what a user writes in `caudal.toml` or
//! `caudal.yaml`.
//!
//! The structs here are the user documentation: their doc comments become
//! the JSON Schema (`caudal schema`) and every default is a named constant.
//! Loading (parsing, `${VAR}` interpolation, locations for errors) lives in
//! [`load`]; cross-field checks live in [`validate`].

pub mod aggregates;
pub mod alerts;
pub mod backup;
pub mod brokers;
pub mod cluster;
pub mod crawl;
pub mod datasets;
pub mod delivery;
pub mod load;
pub mod partner;
pub mod pipelines;
pub mod retention;
pub mod server;
pub mod sinks;
pub mod sources;
pub mod validate;
pub mod workflows;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::Secret;

pub use aggregates::{AggregateConfig, Metric, MetricKind};
pub use alerts::{AlertConfig, AlertWindow, Check, NotifierConfig, NotifyFormat, Severity};
pub use brokers::{
    KafkaSinkConfig, KafkaSourceConfig, NatsSinkConfig, NatsSourceConfig, NatsStream,
    RabbitmqDeclare, RabbitmqSinkConfig, RabbitmqSourceConfig,
};
pub use cluster::ClusterConfig;
pub use crawl::{
    CrawlSettings, CrawlSourceConfig, FieldConfig, FieldSpec, PageKindConfig, SiteLimits,
    SitePolicy,
};
pub use datasets::{CacheConfig, ColumnType, Compression, FileFormat, FilesSinkConfig, S3Config};
pub use delivery::*;
pub use load::{
    ConfigError, ConfigErrors, Format, Located, PathPart, load_file, load_str, locate_in_file,
};
pub use partner::{
    BasicAuth, ClientAuth, HmacAlgorithm, HmacAuth, HttpAuth, HttpTls, OAuth2Auth, SecretValue,
};
pub use pipelines::*;
pub use server::*;
pub use sinks::*;
pub use sources::*;
pub use workflows::*;

/// Default state store: a SQLite file next to where caudal runs.
pub const DEFAULT_STATE_URL: &str = "sqlite://caudal.db";

/// Default directory of the pipelines' buffers, relative to the
/// configuration file.
pub const DEFAULT_BUFFER_DIR: &str = "caudal-buffer";

/// Default directory of workflow runs (their files and task logs).
pub const DEFAULT_RUNS_DIR: &str = "caudal-runs";

/// A whole caudal configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where caudal keeps checkpoints, runs and leases.
    #[serde(default)]
    #[schemars(extend("default" = { "url": DEFAULT_STATE_URL }))]
    pub state: StateConfig,
    /// Named sources of records.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Named destinations of records.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Named pipelines: a source, a sink and a schedule.
    #[serde(default)]
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// The HTTP endpoints `caudal run` serves (health, metrics); off unless
    /// this table is present.
    #[serde(default)]
    pub server: Option<ServerConfig>,
    /// How long the state store keeps history: runs, resolved dead letters
    /// and API audit entries.
    #[serde(default)]
    pub retention: retention::RetentionConfig,
    /// Named workflows: tasks (commands, pipeline runs, HTTP requests) with
    /// dependencies, run on a schedule or on demand.
    #[serde(default)]
    pub workflows: BTreeMap<String, WorkflowConfig>,
    /// Named pools of slots that workflow tasks share (e.g. one per site).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// The crawler's manners: its User-Agent, robots.txt, and per-site
    /// concurrency and delays, shared by every crawl and command task that
    /// names a site.
    #[serde(default)]
    pub crawl: CrawlSettings,
    /// The query API's result cache (datasets): in process, or in Redis
    /// with `url`.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Named live aggregates: windowed figures per group over a
    /// pipeline's records, served by `/api/v1/live/NAME`.
    #[serde(default)]
    pub aggregates: BTreeMap<String, AggregateConfig>,
    /// Named alert rules: a threshold on an aggregate's metric or on
    /// caudal's own figures, held for a while, notified once.
    #[serde(default)]
    pub alerts: BTreeMap<String, AlertConfig>,
    /// Named webhooks alerts notify.
    #[serde(default)]
    pub notifiers: BTreeMap<String, NotifierConfig>,
    /// Several `caudal run` processes sharing the pipelines over one
    /// PostgreSQL state store; off unless this table is present.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Scheduled backups of the state store and the buffers, taken by
    /// `caudal run`; off unless this table is present.
    #[serde(default)]
    pub backup: Option<backup::BackupConfig>,
    /// The directory of the file this was loaded from, for paths written
    /// relative to it (`schema`). Not part of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: Option<std::path::PathBuf>,
    /// What the file still says the old way (deprecated spellings), with
    /// where; it works, and `caudal` prints these. Not part of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// The buffer directory of `pipeline`: `state.buffer_dir` (resolved
    /// against the configuration file's directory) joined with the
    /// pipeline's name.
    pub fn buffer_dir(&self, pipeline: &str) -> std::path::PathBuf {
        self.state_dir(self.state.buffer_dir.as_deref(), DEFAULT_BUFFER_DIR)
            .join(pipeline)
    }

    /// The directory of workflow runs: `state.runs_dir`, or `caudal-runs`
    /// beside the SQLite state file (or the configuration file).
    pub fn runs_dir(&self) -> std::path::PathBuf {
        self.state_dir(self.state.runs_dir.as_deref(), DEFAULT_RUNS_DIR)
    }

    /// The SQLite state file (as written in `state.url`, relative to the
    /// working directory like the store itself); `None` for a PostgreSQL
    /// or in-memory store.
    pub fn sqlite_state_path(&self) -> Option<std::path::PathBuf> {
        sqlite_state_file(self.state.url.expose()).map(std::path::PathBuf::from)
    }

    /// The directory scheduled backups go to (`backup.dir`, resolved
    /// against the configuration file's directory).
    pub fn backup_dir(&self) -> Option<std::path::PathBuf> {
        self.backup.as_ref().map(|b| self.config_dir().join(&b.dir))
    }

    /// The configuration file's directory (`.` when unknown).
    pub fn config_dir(&self) -> std::path::PathBuf {
        self.base_dir
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("."))
    }

    fn state_dir(&self, set: Option<&str>, default: &str) -> std::path::PathBuf {
        use std::path::Path;
        let base = self.config_dir();
        match set {
            Some(dir) => base.join(dir),
            None => sqlite_state_file(self.state.url.expose())
                .and_then(|file| Path::new(file).parent().map(Path::to_path_buf))
                .map_or_else(|| base.join(default), |d| d.join(default)),
        }
    }
}

/// The file of a `sqlite://PATH` or `sqlite:PATH` state url (not for an
/// in-memory database).
pub fn sqlite_state_file(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let memory =
        path.is_empty() || path == ":memory:" || query.split('&').any(|pair| pair == "mode=memory");
    (!memory).then_some(path)
}

/// The state store.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `sqlite://PATH` (default `sqlite://caudal.db`, created when missing)
    /// or `postgres://user:password@host/db` for several machines.
    #[serde(default = "default_state_url")]
    #[schemars(extend("default" = DEFAULT_STATE_URL))]
    pub url: Secret,
    /// Directory of the pipelines' durable buffers, one subdirectory per
    /// pipeline. A relative path is relative to the directory of the
    /// configuration file. Default: `caudal-buffer` next to the SQLite state
    /// file, or next to the configuration file when the state is elsewhere.
    /// Keep it on a local disk.
    #[serde(default)]
    pub buffer_dir: Option<String>,
    /// Directory of workflow runs: one subdirectory per run (its `run.dir`,
    /// with every attempt's stdout and stderr). Default: `caudal-runs`
    /// beside the buffers' default place.
    #[serde(default)]
    pub runs_dir: Option<String>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: default_state_url(),
            buffer_dir: None,
            runs_dir: None,
        }
    }
}

fn default_state_url() -> Secret {
    Secret::new(DEFAULT_STATE_URL)
}
