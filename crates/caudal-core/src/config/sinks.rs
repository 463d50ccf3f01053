//! Sinks: where a pipeline's records go, how they are batched and
//! encoded, and the checks of those settings. How a batch is delivered
//! (retries, breaker, rate limit, concurrency) is [`super::delivery`],
//! shared by every kind of sink.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::brokers::{KafkaSinkConfig, NatsSinkConfig, RabbitmqSinkConfig};
use super::datasets::FilesSinkConfig;
use super::delivery::{
    CircuitBreakerConfig, ConcurrencyConfig, DeliveryConfig, Legacy, RateLimitConfig, RetryConfig,
    StatusConfig, check_delivery,
};
use super::load::path::{FieldPath, Problem};
use crate::units::{ByteSize, Duration, Secret, redact_url};

/// Default records per batch.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1000;

/// Default maximum request body size before a batch is cut (uncompressed).
pub const DEFAULT_BATCH_MAX_BYTES: ByteSize = ByteSize(4 << 20);

/// Default time a partial batch waits for more records.
pub const DEFAULT_BATCH_MAX_WAIT: Duration = Duration::from_secs(1);

/// Default HTTP request timeout.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Default header carrying a batch's idempotency key.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// A destination of records. The `type` field selects the kind.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
// Parsed once per configuration: the size of a sink does not matter.
#[allow(clippy::large_enum_variant)]
pub enum SinkConfig {
    /// An HTTP endpoint that receives batches.
    Http(HttpSinkConfig),
    /// Partitioned Parquet or JSON Lines files, on a local disk or S3: a
    /// dataset the query API serves (`[sinks.NAME]` is dataset `NAME`).
    Files(FilesSinkConfig),
    /// A RabbitMQ exchange: one persistent message per record, publisher
    /// confirms.
    Rabbitmq(RabbitmqSinkConfig),
    /// A NATS JetStream subject: one acknowledged message per record.
    Nats(NatsSinkConfig),
    /// A Kafka topic: one message per record from an idempotent producer.
    Kafka(KafkaSinkConfig),
}

impl SinkConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Files(_) => "files",
            Self::Rabbitmq(_) => "rabbitmq",
            Self::Nats(_) => "nats",
            Self::Kafka(_) => "kafka",
        }
    }

    /// How batches are cut for a sink that delivers batches (not `files`).
    pub fn batch(&self) -> Option<BatchConfig> {
        match self {
            Self::Http(c) => Some(c.batch),
            Self::Rabbitmq(c) => Some(c.batch),
            Self::Nats(c) => Some(c.batch),
            Self::Kafka(c) => Some(c.batch),
            Self::Files(_) => None,
        }
    }

    /// The settings of a `files` sink.
    pub fn files(&self) -> Option<&FilesSinkConfig> {
        match self {
            Self::Files(c) => Some(c),
            _ => None,
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
    /// How batches are delivered: retries, what each status means, the
    /// circuit breaker, rate limits and concurrency
    /// (`[sinks.NAME.delivery]`, the same for every kind of sink).
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Deprecated spelling of `delivery.retry` (read, with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub retry: Option<RetryConfig>,
    /// Deprecated spelling of `delivery.status` (read, with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub status: Option<StatusConfig>,
    /// Deprecated spelling of `delivery.circuit_breaker` (read, with a
    /// warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Deprecated spelling of `delivery.rate_limit` (read, with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Deprecated spelling of `delivery.concurrency` (read, with a
    /// warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// Request header carrying the batch's idempotency key, stable across
    /// retries and replays so the receiver can drop duplicates (default
    /// `"Idempotency-Key"`; `""` sends no such header).
    #[serde(default = "default_idempotency_header")]
    #[schemars(extend("default" = DEFAULT_IDEMPOTENCY_HEADER))]
    pub idempotency_header: String,
    /// How the sink authenticates to the partner: `{ basic = {…} }`,
    /// `{ oauth2 = {…} }` or `{ hmac = {…} }` (docs/delivery.md).
    #[serde(default)]
    pub auth: Option<super::partner::HttpAuth>,
    /// A custom CA and a client certificate: `{ ca, cert, key }`.
    #[serde(default)]
    pub tls: Option<super::partner::HttpTls>,
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

/// HTTP methods a sink may use.
pub const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

pub(super) fn check_http_sink(path: &FieldPath, sink: &HttpSinkConfig, out: &mut Vec<Problem>) {
    if !is_http_url(&sink.url) {
        out.push(Problem::at(
            path.key("url"),
            format!(
                "expected an http:// or https:// URL, found {:?}",
                redact_url(&sink.url)
            ),
        ));
    }
    if !HTTP_METHODS.contains(&sink.method.as_str()) {
        let hint = if HTTP_METHODS.contains(&sink.method.to_ascii_uppercase().as_str()) {
            " (methods are upper case)"
        } else {
            ""
        };
        out.push(Problem::at(
            path.key("method"),
            format!(
                "unknown method {:?}; expected one of: {}{hint}",
                sink.method,
                HTTP_METHODS.join(", ")
            ),
        ));
    }
    for (name, value) in &sink.headers {
        let header = path.key("headers").key(name.clone());
        if !is_header_name(name) {
            out.push(Problem::at_key(
                header.clone(),
                format!("invalid header name {name:?}; use letters, digits and !#$%&'*+-.^_`|~"),
            ));
        }
        if value.expose().chars().any(|c| c.is_control() && c != '\t') {
            // Never print the value: headers carry tokens.
            out.push(Problem::at(
                header,
                "header value contains a line break or another control character",
            ));
        }
    }
    if sink.batch.max_records == 0 {
        out.push(Problem::at(
            path.key("batch").key("max_records"),
            "must be greater than 0",
        ));
    }
    if sink.batch.max_bytes.0 == 0 {
        out.push(Problem::at(
            path.key("batch").key("max_bytes"),
            "must be greater than 0",
        ));
    }
    if let Some(body) = &sink.body
        && let Err(message) = check_body_template(body)
    {
        out.push(Problem::at(path.key("body"), message));
    }
    if sink.timeout.as_std().is_zero() {
        out.push(Problem::at(path.key("timeout"), "must be greater than 0s"));
    }
    let header_names: Vec<String> = sink
        .headers
        .keys()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    super::partner::check_partner(
        path,
        sink.auth.as_ref(),
        sink.tls.as_ref(),
        &header_names,
        out,
    );
    check_delivery(&path.key("delivery"), &sink.delivery, out);
    // The old spellings, where the file has them.
    let legacy = DeliveryConfig {
        retry: sink.retry.unwrap_or_default(),
        status: sink.status.clone().unwrap_or_default(),
        circuit_breaker: sink.circuit_breaker.unwrap_or_default(),
        rate_limit: sink.rate_limit.unwrap_or_default(),
        concurrency: sink.concurrency.unwrap_or_default(),
    };
    check_delivery(path, &legacy, out);
    let header = &sink.idempotency_header;
    if !header.is_empty() && !is_header_name(header) {
        out.push(Problem::at(
            path.key("idempotency_header"),
            format!(
                "invalid header name {header:?}; use letters, digits and !#$%&'*+-.^_`|~, \
                 or \"\" to send no idempotency key"
            ),
        ));
    }
}

pub(super) fn is_http_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["http://", "https://"].iter().any(|scheme| {
        lower
            .strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
    })
}

/// An RFC 9110 token.
pub(super) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

/// Variables an HTTP body template can use.
pub const BODY_TEMPLATE_VARIABLES: &[&str] = &["records", "events", "batch", "pipeline"];

/// Functions minijinja provides to every template.
const TEMPLATE_GLOBALS: &[&str] = &["range", "dict", "namespace", "debug", "cycler", "joiner"];

/// Checks that a body template compiles and uses only the variables the
/// sink provides: a misspelt variable would otherwise render as nothing (or
/// `null` through a filter) and a receiver would accept an empty batch.
pub fn check_body_template(body: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    let template = env.template_from_str(body).map_err(|error| {
        let detail = error
            .detail()
            .map_or_else(|| error.to_string(), str::to_string);
        let line = error
            .line()
            .map(|n| format!(" (line {n} of the template)"))
            .unwrap_or_default();
        format!("template does not compile: {detail}{line}")
    })?;
    let mut unknown: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| {
            !BODY_TEMPLATE_VARIABLES.contains(&v.as_str())
                && !TEMPLATE_GLOBALS.contains(&v.as_str())
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    Err(format!(
        "template uses unknown variable{} {}; a body template sees {}",
        if unknown.len() == 1 { "" } else { "s" },
        unknown
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", "),
        BODY_TEMPLATE_VARIABLES
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// Checks one sink.
pub(super) fn check_sink(path: &FieldPath, sink: &SinkConfig, out: &mut Vec<Problem>) {
    match sink {
        SinkConfig::Http(http) => check_http_sink(path, http, out),
        SinkConfig::Files(files) => super::datasets::check_files_sink(path, files, out),
        SinkConfig::Rabbitmq(c) => super::brokers::check_rabbitmq_sink(path, c, out),
        SinkConfig::Nats(c) => super::brokers::check_nats_sink(path, c, out),
        SinkConfig::Kafka(c) => super::brokers::check_kafka_sink(path, c, out),
    }
}

impl SinkConfig {
    /// The sink's delivery policy.
    pub fn delivery(&self) -> &DeliveryConfig {
        static RUN_RETRIES: std::sync::OnceLock<DeliveryConfig> = std::sync::OnceLock::new();
        match self {
            Self::Http(c) => &c.delivery,
            Self::Rabbitmq(c) => &c.delivery,
            Self::Nats(c) => &c.delivery,
            Self::Kafka(c) => &c.delivery,
            // A files sink writes within a run; the run is retried whole.
            Self::Files(_) => RUN_RETRIES.get_or_init(DeliveryConfig::default),
        }
    }

    /// Moves delivery settings written the old way (directly in the sink)
    /// into `delivery`; returns a warning for each (and an error when the
    /// same setting is written both ways).
    pub(super) fn upgrade(&mut self, path: &FieldPath) -> (Vec<Problem>, Vec<Problem>) {
        match self {
            Self::Http(c) => Legacy {
                retry: c.retry.take(),
                status: c.status.take(),
                circuit_breaker: c.circuit_breaker.take(),
                rate_limit: c.rate_limit.take(),
                concurrency: c.concurrency.take(),
            }
            .move_into(&mut c.delivery, path),
            Self::Files(_) | Self::Rabbitmq(_) | Self::Nats(_) | Self::Kafka(_) => {
                (Vec::new(), Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_and_header_names() {
        assert!(is_http_url("https://partner.example/x"));
        assert!(is_http_url("HTTP://127.0.0.1:8080"));
        assert!(!is_http_url("https://"));
        assert!(!is_http_url("ftp://x"));
        assert!(is_header_name("X-Request-Id"));
        assert!(!is_header_name("X Request"));
        assert!(!is_header_name(""));
    }
}
