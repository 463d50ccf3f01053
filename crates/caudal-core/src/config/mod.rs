//! The configuration model: what a user writes in `caudal.toml` or
//! `caudal.yaml`.
//!
//! The structs here are the user documentation: their doc comments become
//! the JSON Schema (`caudal schema`) and every default is a named constant.
//! Loading (parsing, `${VAR}` interpolation, locations for errors) lives in
//! [`load`]; cross-field checks live in [`validate`].

pub mod load;
pub mod retention;
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
/// Default wait before the first retry of a batch (before jitter).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Default growth of the wait from one retry to the next.
pub const DEFAULT_RETRY_MULTIPLIER: f64 = 2.0;
/// Default longest wait between two attempts (before jitter).
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(60);
/// Default attempts per batch before it goes to dead letters; 0 means no
/// limit.
pub const DEFAULT_RETRY_MAX_ATTEMPTS: u32 = 0;
/// Default time after a batch's first attempt when it goes to dead letters;
/// 0s means never.
pub const DEFAULT_RETRY_GIVE_UP_AFTER: Duration = Duration::from_secs(0);
/// Default share of failed requests in the window that opens the breaker.
pub const DEFAULT_BREAKER_FAILURE_RATIO: f64 = 0.5;
/// Default requests the window must hold before the breaker may open.
pub const DEFAULT_BREAKER_MIN_REQUESTS: u32 = 10;
/// Default length of the breaker's rolling window.
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(30);
/// Default time an open breaker stays open before probing.
pub const DEFAULT_BREAKER_OPEN_FOR: Duration = Duration::from_secs(30);
/// Default concurrent probe requests of a half-open breaker.
pub const DEFAULT_BREAKER_HALF_OPEN_PROBES: u32 = 1;
/// Default requests in flight per sink.
pub const DEFAULT_CONCURRENCY: u32 = 1;
/// Default lower bound of adaptive concurrency.
pub const DEFAULT_ADAPTIVE_MIN: u32 = 1;
/// Default upper bound of adaptive concurrency.
pub const DEFAULT_ADAPTIVE_MAX: u32 = 32;
/// Default header carrying a batch's idempotency key.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Default directory of the pipelines' buffers, relative to the
/// configuration file.
pub const DEFAULT_BUFFER_DIR: &str = "caudal-buffer";
/// Default size of a pipeline's buffer on disk.
pub const DEFAULT_BUFFER_MAX_BYTES: ByteSize = ByteSize(256 << 20);

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
    /// The directory of the file this was loaded from, for paths written
    /// relative to it (`schema`). Not part of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: Option<std::path::PathBuf>,
}

impl Config {
    /// The buffer directory of `pipeline`: `state.buffer_dir` (resolved
    /// against the configuration file's directory) joined with the
    /// pipeline's name.
    pub fn buffer_dir(&self, pipeline: &str) -> std::path::PathBuf {
        use std::path::{Path, PathBuf};
        let base = self.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let root = match &self.state.buffer_dir {
            Some(dir) => base.join(dir),
            None => sqlite_state_file(self.state.url.expose())
                .and_then(|file| Path::new(file).parent().map(Path::to_path_buf))
                .map_or_else(
                    || base.join(DEFAULT_BUFFER_DIR),
                    |d| d.join(DEFAULT_BUFFER_DIR),
                ),
        };
        root.join(pipeline)
    }
}

/// The file of a `sqlite://PATH` or `sqlite:PATH` state url (not for an
/// in-memory database).
fn sqlite_state_file(url: &str) -> Option<&str> {
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
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: default_state_url(),
            buffer_dir: None,
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

    /// The same kind of source with other settings.
    pub fn with_sql(&self, sql: SqlSourceConfig) -> Self {
        match self {
            Self::Postgres(_) => Self::Postgres(sql),
            Self::Mysql(_) => Self::Mysql(sql),
            Self::Sqlite(_) => Self::Sqlite(sql),
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
    /// Change data capture: snapshot the tables, then stream every change
    /// from the database's log (PostgreSQL logical replication).
    Cdc,
}

/// Whether a CDC source first reads the rows its tables already hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CdcSnapshot {
    /// Read every existing row (chunked by primary key), then stream from
    /// exactly the point the rows were read at.
    #[default]
    Initial,
    /// Only stream changes made after the replication slot was created.
    Never,
}

/// The default name of a CDC pipeline's replication slot and publication:
/// `caudal_` and the pipeline's name, lowercased, other characters as `_`,
/// at most 63 characters.
pub fn default_cdc_name(pipeline: &str) -> String {
    let mut name = String::from("caudal_");
    name.extend(pipeline.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        }
    }));
    name.truncate(63);
    name
}

/// The default replica server id of a MySQL CDC pipeline: stable for the
/// pipeline's name (FNV-1a), between 1,000,000,000 and 1,999,999,999 so it
/// stays clear of the small ids servers are usually given.
pub fn default_server_id(pipeline: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in pipeline.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    1_000_000_000 + hash % 1_000_000_000
}

/// Default interval of CDC heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

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

/// What `caudal run` serves over HTTP.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on, `host:port` (default `127.0.0.1:9464`:
    /// loopback only; `0.0.0.0:9464` for every interface).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API requests allowed per second per token (bursts of twice that);
    /// more get 429 with `Retry-After`.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
}

fn default_requests_per_second() -> u32 {
    20
}

/// Where `caudal run` listens when `[server]` names no address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

impl ServerConfig {
    /// The listen address; `validate` has checked it parses.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

/// A SQL table or query read incrementally by a cursor.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlSourceConfig {
    /// Connection URL: `postgres://…`, `mysql://…` or `sqlite://PATH`.
    pub url: Secret,
    /// Capture mode: `incremental` reads by cursor, `cdc` streams changes.
    #[serde(default)]
    pub mode: SqlMode,
    /// The table to read, optionally schema-qualified (`public.requests`).
    /// Set either `table` or `query`.
    #[serde(default)]
    pub table: Option<String>,
    /// CDC: the tables to capture, optionally schema-qualified (instead of
    /// `table`).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// CDC: the replication slot (default `caudal_<pipeline>`); created
    /// when missing.
    #[serde(default)]
    pub slot: Option<String>,
    /// CDC: the publication (default `caudal_<pipeline>`); created when
    /// missing, and given the configured tables.
    #[serde(default)]
    pub publication: Option<String>,
    /// CDC (mysql): the server id caudal registers with as a binlog replica;
    /// unique among the server's replicas (default: derived from the
    /// pipeline's name, see `caudal validate`).
    #[serde(default)]
    pub server_id: Option<u32>,
    /// CDC: how often a heartbeat is written to the log so the slot moves on
    /// while the captured tables are idle (default `"10s"`; `"0s"` turns it
    /// off). For mysql, how often the server sends a heartbeat to an idle
    /// replica, so a dead connection is noticed.
    #[serde(default)]
    pub heartbeat: Option<Duration>,
    /// CDC: whether existing rows are read first (default `initial`).
    #[serde(default)]
    pub snapshot: CdcSnapshot,
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
    /// neither skipped nor repeated. Required in `incremental` mode.
    #[serde(default)]
    pub cursor: Vec<String>,
    /// Safety lag: rows whose first cursor column is newer than
    /// `now - lag` wait for the next run, so transactions still in flight
    /// are not overtaken. Default `"5s"` when the first cursor column is a
    /// timestamp, none otherwise; `"0s"` turns it off. Setting it on a
    /// non-timestamp cursor is an error.
    #[serde(default)]
    pub lag: Option<Duration>,
    /// Rows fetched per query (default 5000); in `cdc` mode, rows per
    /// snapshot chunk.
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
    /// Backoff between attempts of a batch that failed temporarily.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Which response statuses mean success, retry later, reject or split.
    #[serde(default)]
    pub status: StatusConfig,
    /// Stops sending for a while when most recent requests failed, so a
    /// struggling receiver gets room to recover. On by default.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Caps on requests and records per second (default: no cap).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Batches in flight at once: a number (default 1), `"adaptive"`, or
    /// `{ adaptive = { min = 1, max = 32 } }`. Records with the same
    /// pipeline `key` keep their source order at any concurrency; batches
    /// sharing no key may overtake each other.
    #[serde(default)]
    pub concurrency: ConcurrencyConfig,
    /// Request header carrying the batch's idempotency key, stable across
    /// retries and replays so the receiver can drop duplicates (default
    /// `"Idempotency-Key"`; `""` sends no such header).
    #[serde(default = "default_idempotency_header")]
    #[schemars(extend("default" = DEFAULT_IDEMPOTENCY_HEADER))]
    pub idempotency_header: String,
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
fn default_idempotency_header() -> String {
    DEFAULT_IDEMPOTENCY_HEADER.into()
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
    /// When the pipeline runs. Required for incremental sources; a CDC
    /// source streams continuously and takes none.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Record field that identifies an entity (e.g. `request_id`); records
    /// with the same key keep their order.
    #[serde(default)]
    pub key: Option<String>,
    /// When a source position is acknowledged upstream (checkpoint saved,
    /// replication slot confirmed): once its records are durable in the
    /// buffer (`"buffered"`, default) or once they are delivered
    /// (`"delivered"`).
    #[serde(default)]
    pub ack: AckMode,
    /// A JSON Schema file every record must match; records that do not go
    /// to dead letters. A relative path is relative to the directory of the
    /// configuration file.
    #[serde(default)]
    pub schema: Option<String>,
    /// The durable buffer between the source and the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
}

impl PipelineConfig {
    /// The `schema` file resolved against `config_dir`, the directory of
    /// the configuration file (absolute paths are kept as written).
    pub fn schema_path(&self, config_dir: &std::path::Path) -> Option<std::path::PathBuf> {
        self.schema.as_deref().map(|schema| config_dir.join(schema))
    }
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

/// Backoff between attempts of a batch that failed temporarily: the wait
/// before retry `n` is random between 0 and
/// `min(max_delay, initial × multiplier^n)` ("full jitter", so many
/// senders do not retry in step), and never shorter than a `Retry-After`
/// the receiver sent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Longest wait before the first retry (default `"500ms"`).
    #[serde(default = "default_retry_initial")]
    #[schemars(extend("default" = DEFAULT_RETRY_INITIAL))]
    pub initial: Duration,
    /// Growth of the longest wait from one retry to the next, 1 or more
    /// (default 2).
    #[serde(default = "default_retry_multiplier")]
    #[schemars(extend("default" = DEFAULT_RETRY_MULTIPLIER))]
    pub multiplier: f64,
    /// Upper bound of the wait between two attempts (default `"60s"`; also
    /// accepted as `max`).
    #[serde(default = "default_retry_max_delay", alias = "max")]
    #[schemars(extend("default" = DEFAULT_RETRY_MAX_DELAY))]
    pub max_delay: Duration,
    /// Attempts of one batch, the first included, before delivery gives up
    /// on it for now (default 0: no limit). The batch stays in the buffer:
    /// `caudal once` fails, the daemon pauses and tries again.
    #[serde(default)]
    #[schemars(extend("default" = DEFAULT_RETRY_MAX_ATTEMPTS))]
    pub max_attempts: u32,
    /// Time after a batch's first attempt when delivery gives up on it for
    /// now, as with `max_attempts` (default `"0s"`: never).
    #[serde(default = "default_retry_give_up_after")]
    #[schemars(extend("default" = DEFAULT_RETRY_GIVE_UP_AFTER))]
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: DEFAULT_RETRY_INITIAL,
            multiplier: DEFAULT_RETRY_MULTIPLIER,
            max_delay: DEFAULT_RETRY_MAX_DELAY,
            max_attempts: DEFAULT_RETRY_MAX_ATTEMPTS,
            give_up_after: DEFAULT_RETRY_GIVE_UP_AFTER,
        }
    }
}

fn default_retry_initial() -> Duration {
    DEFAULT_RETRY_INITIAL
}
fn default_retry_multiplier() -> f64 {
    DEFAULT_RETRY_MULTIPLIER
}
fn default_retry_max_delay() -> Duration {
    DEFAULT_RETRY_MAX_DELAY
}
fn default_retry_give_up_after() -> Duration {
    DEFAULT_RETRY_GIVE_UP_AFTER
}

/// Response statuses that override the defaults. By default 2xx is
/// success; 408, 429 and 5xx except 501 are retried later; 413 splits the
/// batch in two (a single record that is still too large goes to dead
/// letters); every other status rejects the batch to dead letters. A code
/// may appear in one list only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Codes that also mean success, e.g. `[409]` for a receiver that
    /// answers 409 to a duplicate it already has.
    #[serde(default)]
    pub success: Vec<u16>,
    /// Codes to retry later, e.g. `[425]`.
    #[serde(default)]
    pub retry: Vec<u16>,
    /// Codes that reject the batch to dead letters, e.g. `[503]` for a
    /// receiver that uses it for permanent refusals.
    #[serde(default)]
    pub reject: Vec<u16>,
    /// Codes meaning "too large": the batch is split in two and each half
    /// sent again (413 always does this unless listed elsewhere).
    #[serde(default)]
    pub split: Vec<u16>,
}

/// A circuit breaker per sink: when, within the rolling `window`, at least
/// `min_requests` requests were made and the share of them that failed
/// temporarily (5xx, 429, timeouts, connection errors; not rejections) is
/// `failure_ratio` or more, the breaker opens and nothing is sent for
/// `open_for`. Then `half_open_probes` requests test the receiver: a
/// success closes the breaker, a failure opens it again.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// `false` turns the breaker off (default `true`).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Share of failed requests that opens the breaker, above 0 and at
    /// most 1 (default 0.5).
    #[serde(default = "default_breaker_failure_ratio")]
    #[schemars(extend("default" = DEFAULT_BREAKER_FAILURE_RATIO))]
    pub failure_ratio: f64,
    /// Requests the window must hold before the breaker may open
    /// (default 10).
    #[serde(default = "default_breaker_min_requests")]
    #[schemars(extend("default" = DEFAULT_BREAKER_MIN_REQUESTS))]
    pub min_requests: u32,
    /// Length of the rolling window of recent requests (default `"30s"`).
    #[serde(default = "default_breaker_window")]
    #[schemars(extend("default" = DEFAULT_BREAKER_WINDOW))]
    pub window: Duration,
    /// How long the breaker stays open before probing (default `"30s"`).
    #[serde(default = "default_breaker_open_for")]
    #[schemars(extend("default" = DEFAULT_BREAKER_OPEN_FOR))]
    pub open_for: Duration,
    /// Probe requests allowed at once while half-open (default 1).
    #[serde(default = "default_breaker_half_open_probes")]
    #[schemars(extend("default" = DEFAULT_BREAKER_HALF_OPEN_PROBES))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_ratio: DEFAULT_BREAKER_FAILURE_RATIO,
            min_requests: DEFAULT_BREAKER_MIN_REQUESTS,
            window: DEFAULT_BREAKER_WINDOW,
            open_for: DEFAULT_BREAKER_OPEN_FOR,
            half_open_probes: DEFAULT_BREAKER_HALF_OPEN_PROBES,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_breaker_failure_ratio() -> f64 {
    DEFAULT_BREAKER_FAILURE_RATIO
}
fn default_breaker_min_requests() -> u32 {
    DEFAULT_BREAKER_MIN_REQUESTS
}
fn default_breaker_window() -> Duration {
    DEFAULT_BREAKER_WINDOW
}
fn default_breaker_open_for() -> Duration {
    DEFAULT_BREAKER_OPEN_FOR
}
fn default_breaker_half_open_probes() -> u32 {
    DEFAULT_BREAKER_HALF_OPEN_PROBES
}

/// Caps on the pace of a sink; each is off when left out. Short bursts of
/// up to one second's worth are allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second, e.g. `10` or `0.5` (one every two seconds).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// Records per second, across all requests.
    #[serde(default)]
    pub records_per_second: Option<f64>,
}

/// How many requests a sink keeps in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConcurrencyConfig {
    /// Exactly this many (1 or more).
    Fixed(u32),
    /// Adjusted between `min` and `max` by how the receiver copes: one
    /// more after a round of quick successes, half as many on 429, 503 or
    /// a sharp rise in latency.
    Adaptive { min: u32, max: u32 },
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self::Fixed(DEFAULT_CONCURRENCY)
    }
}

/// The bounds of adaptive concurrency, as written in
/// `concurrency = { adaptive = { min = 1, max = 32 } }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrencyConfig {
    /// Fewest requests in flight, and where it starts (default 1).
    #[serde(default = "default_adaptive_min")]
    #[schemars(extend("default" = DEFAULT_ADAPTIVE_MIN))]
    pub min: u32,
    /// Most requests in flight (default 32).
    #[serde(default = "default_adaptive_max")]
    #[schemars(extend("default" = DEFAULT_ADAPTIVE_MAX))]
    pub max: u32,
}

impl Default for AdaptiveConcurrencyConfig {
    fn default() -> Self {
        Self {
            min: DEFAULT_ADAPTIVE_MIN,
            max: DEFAULT_ADAPTIVE_MAX,
        }
    }
}

fn default_adaptive_min() -> u32 {
    DEFAULT_ADAPTIVE_MIN
}
fn default_adaptive_max() -> u32 {
    DEFAULT_ADAPTIVE_MAX
}

/// The word that selects adaptive concurrency with default bounds.
const ADAPTIVE: &str = "adaptive";

/// Written as a number, `"adaptive"`, or `{ adaptive = { ... } }`. A
/// hand-written visitor (not `#[serde(untagged)]`) so errors inside the
/// table keep their field path and say what was expected.
impl<'de> Deserialize<'de> for ConcurrencyConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ConcurrencyConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a number of requests (1 or more), \"adaptive\", or a table whose \
                     \"adaptive\" entry holds min and max",
                )
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                u32::try_from(n).map(ConcurrencyConfig::Fixed).map_err(|_| {
                    E::invalid_value(serde::de::Unexpected::Unsigned(n), &"at most 4294967295")
                })
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                if s == ADAPTIVE {
                    let AdaptiveConcurrencyConfig { min, max } = Default::default();
                    return Ok(ConcurrencyConfig::Adaptive { min, max });
                }
                Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                // A field identifier, like derived structs use, so an
                // unknown key is reported at its own path.
                #[derive(Deserialize)]
                #[serde(field_identifier, rename_all = "snake_case")]
                enum Key {
                    Adaptive,
                }

                let mut bounds: Option<AdaptiveConcurrencyConfig> = None;
                while let Some(Key::Adaptive) = map.next_key::<Key>()? {
                    if bounds.is_some() {
                        return Err(serde::de::Error::duplicate_field(ADAPTIVE));
                    }
                    bounds = Some(map.next_value()?);
                }
                let AdaptiveConcurrencyConfig { min, max } =
                    bounds.ok_or_else(|| serde::de::Error::missing_field(ADAPTIVE))?;
                Ok(ConcurrencyConfig::Adaptive { min, max })
            }
        }

        d.deserialize_any(Visitor)
    }
}

impl Serialize for ConcurrencyConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Fixed(n) => s.serialize_u32(n),
            Self::Adaptive { min, max } => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(ADAPTIVE, &AdaptiveConcurrencyConfig { min, max })?;
                map.end()
            }
        }
    }
}

impl JsonSchema for ConcurrencyConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConcurrencyConfig".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let bounds = generator.subschema_for::<AdaptiveConcurrencyConfig>();
        schemars::json_schema!({
            "description": "Requests in flight: a number (default 1), \"adaptive\" (between 1 and 32), or { adaptive = { min, max } }.",
            "default": DEFAULT_CONCURRENCY,
            "oneOf": [
                { "type": "integer", "minimum": 1, "description": "Exactly this many requests in flight." },
                { "const": ADAPTIVE, "description": "Adaptive, between 1 and 32 requests in flight." },
                {
                    "type": "object",
                    "properties": { "adaptive": bounds },
                    "required": [ADAPTIVE],
                    "additionalProperties": false,
                    "description": "Adaptive, between min and max requests in flight.",
                },
            ],
        })
    }
}

/// When a pipeline acknowledges a source position upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Once the records are durable in the buffer: the source is released
    /// early and the buffer rides out receiver outages.
    #[default]
    Buffered,
    /// Once the records are delivered to the sink.
    Delivered,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buffered => "buffered",
            Self::Delivered => "delivered",
        }
    }
}

/// A pipeline's durable buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Most bytes kept on disk; when full, reading from the source waits
    /// (default `"256MiB"`).
    #[serde(default = "default_buffer_max_bytes")]
    #[schemars(extend("default" = DEFAULT_BUFFER_MAX_BYTES))]
    pub max_bytes: ByteSize,
    /// When appended records are forced to disk: `"batch"` (after every
    /// appended batch, before it is acknowledged; default) or a duration
    /// such as `"100ms"` (at most that often: faster, but a power loss may
    /// lose acknowledged records).
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// What happens when the buffer holds `max_bytes`: `"block"` (the only
    /// choice, and the default) pauses reading from the source until
    /// delivery frees space. Nothing is ever dropped.
    #[serde(default)]
    pub when_full: WhenFull,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_BUFFER_MAX_BYTES,
            fsync: FsyncPolicy::default(),
            when_full: WhenFull::default(),
        }
    }
}

/// What a full buffer does to the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Reading waits until delivery frees space (backpressure).
    #[default]
    Block,
}

fn default_buffer_max_bytes() -> ByteSize {
    DEFAULT_BUFFER_MAX_BYTES
}

/// When the buffer forces appended records to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every appended batch.
    #[default]
    Batch,
    /// At most once per this interval.
    Interval(Duration),
}

/// The word that selects [`FsyncPolicy::Batch`].
const FSYNC_BATCH: &str = "batch";

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == FSYNC_BATCH {
            return Ok(Self::Batch);
        }
        text.parse().map(Self::Interval).map_err(|e: String| {
            serde::de::Error::custom(format!("expected \"batch\" or a duration; {e}"))
        })
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Batch => s.serialize_str(FSYNC_BATCH),
            Self::Interval(d) => d.serialize(s),
        }
    }
}

impl JsonSchema for FsyncPolicy {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FsyncPolicy".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let duration = generator.subschema_for::<Duration>();
        schemars::json_schema!({
            "description": "\"batch\" (force every appended batch to disk) or a duration such as \"100ms\" (at most that often).",
            "default": FSYNC_BATCH,
            "oneOf": [{ "const": FSYNC_BATCH }, duration],
        })
    }
}
