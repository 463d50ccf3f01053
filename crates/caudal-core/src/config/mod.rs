//! The configuration model: what a user writes in `caudal.toml` or
//! `caudal.yaml`.
//!
//! The structs here are the user documentation: their doc comments become
//! the JSON Schema (`caudal schema`) and every default is a named constant.
//! Loading (parsing, `${VAR}` interpolation, locations for errors) lives in
//! [`load`]; cross-field checks live in [`validate`].

pub mod load;
pub mod validate;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Duration, Secret};

pub use load::{ConfigError, ConfigErrors, Format, Located, load_file, load_str};

/// Default state store: a SQLite file next to where caudal runs.
pub const DEFAULT_STATE_URL: &str = "sqlite://caudal.db";
/// Default number of rows fetched per query page.
pub const DEFAULT_PAGE_SIZE: u32 = 5000;
/// Default safety lag: rows modified less than this long ago wait for the
/// next run, so transactions still in flight are not overtaken.
pub const DEFAULT_LAG: Duration = Duration::from_secs(5);
/// Default records per batch.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1000;
/// Default maximum request body size before a batch is cut (uncompressed).
pub const DEFAULT_BATCH_MAX_BYTES: ByteSize = ByteSize(4 << 20);
/// Default time a partial batch waits for more records.
pub const DEFAULT_BATCH_MAX_WAIT: Duration = Duration::from_secs(1);
/// Default HTTP request timeout.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default poll interval of a continuous schedule.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

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
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: default_state_url(),
        }
    }
}

fn default_state_url() -> Secret {
    Secret::new(DEFAULT_STATE_URL)
}

/// A source of records. The `type` field selects the kind.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// A PostgreSQL database.
    Postgres(SqlSourceConfig),
    /// A MySQL or MariaDB database.
    Mysql(SqlSourceConfig),
    /// A SQLite database file.
    Sqlite(SqlSourceConfig),
}

/// Which database a SQL source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlDialect {
    Postgres,
    Mysql,
    Sqlite,
}

impl SqlDialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Sqlite => "sqlite",
        }
    }
}

impl SourceConfig {
    /// The source type as written in the file.
    pub fn type_name(&self) -> &'static str {
        self.dialect().as_str()
    }

    pub fn dialect(&self) -> SqlDialect {
        match self {
            Self::Postgres(_) => SqlDialect::Postgres,
            Self::Mysql(_) => SqlDialect::Mysql,
            Self::Sqlite(_) => SqlDialect::Sqlite,
        }
    }

    pub fn sql(&self) -> &SqlSourceConfig {
        match self {
            Self::Postgres(c) | Self::Mysql(c) | Self::Sqlite(c) => c,
        }
    }
}

/// How a SQL source captures rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SqlMode {
    /// Read rows whose cursor is past the checkpoint, on a schedule.
    #[default]
    Incremental,
}

/// How exact decimals (`numeric`, `DECIMAL`) appear in records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecimalFormat {
    /// A JSON string with every digit, e.g. `"12.50"` (exact everywhere).
    #[default]
    String,
    /// A JSON number of the same value, e.g. `12.5` for `12.50`, when a
    /// double holds it exactly (15 significant digits or fewer); longer
    /// values stay strings so no digit is lost.
    Number,
}

/// A SQL table or query read incrementally by a cursor.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlSourceConfig {
    /// Connection URL: `postgres://…`, `mysql://…` or `sqlite://PATH`.
    pub url: Secret,
    /// Capture mode; `incremental` reads by cursor.
    #[serde(default)]
    pub mode: SqlMode,
    /// The table to read, optionally schema-qualified (`public.requests`).
    /// Set either `table` or `query`.
    #[serde(default)]
    pub table: Option<String>,
    /// A query whose rows are read instead of a table. It must return the
    /// cursor columns; caudal wraps it as a subquery and adds the cursor
    /// filter and order.
    #[serde(default)]
    pub query: Option<String>,
    /// Columns to read from `table` or `query` (default: all).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Cursor columns, most significant first, e.g.
    /// `["last_modified_date", "request_id"]`. The tuple must be unique per
    /// row: end it with a key column so rows sharing a timestamp are
    /// neither skipped nor repeated.
    pub cursor: Vec<String>,
    /// Safety lag: rows whose first cursor column is newer than
    /// `now - lag` wait for the next run, so transactions still in flight
    /// are not overtaken. Default `"5s"` when the first cursor column is a
    /// timestamp, none otherwise; `"0s"` turns it off. Setting it on a
    /// non-timestamp cursor is an error.
    #[serde(default)]
    pub lag: Option<Duration>,
    /// Rows fetched per query (default 5000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// How exact decimals appear in records (default `string`).
    #[serde(default)]
    pub decimals: DecimalFormat,
}

fn default_page_size() -> u32 {
    DEFAULT_PAGE_SIZE
}

/// A destination of records. The `type` field selects the kind.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// An HTTP endpoint that receives batches.
    Http(HttpSinkConfig),
}

impl SinkConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
        }
    }
}

/// An HTTP endpoint receiving batches of records as request bodies.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// The endpoint URL (`http://` or `https://`).
    pub url: String,
    /// HTTP method (default `POST`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers; values may use `${ENV_VAR}` and are never
    /// logged.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// When a batch is cut and sent.
    #[serde(default)]
    pub batch: BatchConfig,
    /// A minijinja template for the request body. It sees `records` (the
    /// batch's records) and `pipeline`. Without it the body is the JSON
    /// array of records. Seed-001 envelope:
    /// `'{"requests": {{ records | tojson }}}'`.
    #[serde(default)]
    pub body: Option<String>,
    /// Content-Type of the body (default `application/json`).
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Compress request bodies with gzip (`Content-Encoding: gzip`).
    #[serde(default)]
    pub gzip: bool,
    /// Whole-request timeout (default `"30s"`).
    #[serde(default = "default_http_timeout")]
    pub timeout: Duration,
}

fn default_method() -> String {
    "POST".into()
}
fn default_content_type() -> String {
    "application/json".into()
}
fn default_http_timeout() -> Duration {
    DEFAULT_HTTP_TIMEOUT
}

/// Limits that cut a batch: whichever is reached first.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Records per batch (default 1000).
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Approximate uncompressed body size (default `"4MiB"`).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// How long a partial batch waits for more records (default `"1s"`).
    #[serde(default = "default_max_wait")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: DEFAULT_BATCH_MAX_RECORDS,
            max_bytes: DEFAULT_BATCH_MAX_BYTES,
            max_wait: DEFAULT_BATCH_MAX_WAIT,
        }
    }
}

fn default_max_records() -> usize {
    DEFAULT_BATCH_MAX_RECORDS
}
fn default_max_bytes() -> ByteSize {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_max_wait() -> Duration {
    DEFAULT_BATCH_MAX_WAIT
}

/// A pipeline: records from a source, delivered to a sink, on a schedule.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name of a source in `[sources]`.
    pub source: String,
    /// Name of a sink in `[sinks]`.
    pub sink: String,
    /// When the pipeline runs.
    pub schedule: ScheduleConfig,
    /// Record field that identifies an entity (e.g. `request_id`); records
    /// with the same key keep their order.
    #[serde(default)]
    pub key: Option<String>,
}

/// When a pipeline runs. Set exactly one of `every`, `cron` or
/// `continuous`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Run at a fixed interval, e.g. `"1h"`.
    #[serde(default)]
    pub every: Option<Duration>,
    /// Run on a cron expression (5 fields, or 6 with seconds), e.g.
    /// `"0 * * * *"`.
    #[serde(default)]
    pub cron: Option<String>,
    /// IANA time zone for `cron` (default `UTC`), e.g.
    /// `"America/Mexico_City"`.
    #[serde(default)]
    pub tz: Option<String>,
    /// Run continuously: poll the source again `poll` after each run.
    #[serde(default)]
    pub continuous: bool,
    /// Pause between runs of a continuous schedule (default `"1s"`).
    #[serde(default)]
    pub poll: Option<Duration>,
}
