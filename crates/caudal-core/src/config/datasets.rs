//! Datasets: the `files` sink that writes a pipeline's rows as partitioned
//! Parquet or JSON Lines files (on a local disk or S3-compatible object
//! storage), the result cache of the query API, and the checks of both.
//!
//! A dataset is named after its sink: `[sinks.sales_daily] type = "files"`
//! is the dataset `sales_daily` of `/api/v1/datasets/sales_daily`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::{ByteSize, Duration, Secret};

/// Default rows per Parquet row group.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 128 * 1024;

/// Default most rows per file before the next file of a partition starts.
pub const DEFAULT_FILE_MAX_ROWS: u64 = 8 * 1024 * 1024;

/// Default target size of a file (compressed, approximate).
pub const DEFAULT_FILE_MAX_BYTES: ByteSize = ByteSize(256 << 20);

/// Default name of the partition column that carries a run's logical date.
pub const DEFAULT_DATE_COLUMN: &str = "date";

/// Default bytes the query API's result cache may hold (in process).
pub const DEFAULT_CACHE_MAX_BYTES: ByteSize = ByteSize(64 << 20);

/// Default time a cached query result is kept.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);

/// How a `files` sink encodes rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// Apache Parquet, typed columns (the type mapping of
    /// docs/datasets.md), one row group per `row_group_rows`.
    #[default]
    Parquet,
    /// JSON Lines: one record per line, as the source decoded it.
    Jsonl,
}

impl FileFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Jsonl => "jsonl",
        }
    }
}

/// A compression codec of a `files` sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Zstandard (Parquet pages, or whole JSON Lines files: `.jsonl.zst`).
    Zstd,
    /// Snappy (Parquet only).
    Snappy,
    /// Gzip (JSON Lines only: `.jsonl.gz`).
    Gzip,
    /// No compression.
    None,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Snappy => "snappy",
            Self::Gzip => "gzip",
            Self::None => "none",
        }
    }
}

/// Writes a pipeline's rows as files, partitioned by column values, each
/// partition replaced whole and at once by the run that writes it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesSinkConfig {
    /// Where the dataset lives: a directory (`"data/sales_daily"`, relative
    /// to the configuration file, or `file:///abs/path`) or
    /// `s3://bucket/prefix` (see `s3`).
    pub url: String,
    /// `parquet` (default) or `jsonl`.
    #[serde(default)]
    pub format: FileFormat,
    /// `zstd` (default), `snappy` (Parquet), `gzip` (JSON Lines) or `none`.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// Columns whose values name a file's partition, in order:
    /// `["provider_id", "date"]` writes
    /// `provider_id=7/date=2025-05-14/part-000-….parquet`. The column named
    /// by `date_column`, when rows do not have it, takes the run's logical
    /// date. Partition columns are not repeated inside the files.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The partition column that carries a run's logical date (default
    /// `"date"`): retention reads it, and a run replaces the partitions of
    /// its own date.
    #[serde(default = "default_date_column")]
    #[schemars(extend("default" = DEFAULT_DATE_COLUMN))]
    pub date_column: String,
    /// Rows per Parquet row group (default 131072).
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// Most rows in one file; the partition's next rows go to the next file
    /// (default 8388608).
    #[serde(default = "default_file_max_rows")]
    pub file_max_rows: u64,
    /// Approximate largest file (compressed); the partition's next rows go
    /// to the next file (default `"256MiB"`).
    #[serde(default = "default_file_max_bytes")]
    pub file_max_bytes: ByteSize,
    /// Columns whose least and greatest values each file's manifest entry
    /// keeps, so queries skip files that cannot match (default: every
    /// column of a number, decimal, date, timestamp or text type).
    #[serde(default)]
    pub stats: Option<Vec<String>>,
    /// Column types that override what the source reports, e.g.
    /// `{ total = "decimal(18,2)", units = "int32" }` (see the type
    /// mapping in docs/datasets.md for the names).
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    /// Object storage settings for an `s3://` url. Credentials and region
    /// also come from the standard `AWS_*` variables.
    #[serde(default)]
    pub s3: S3Config,
    /// Partitions whose logical date is older than this are deleted by the
    /// daemon's retention job (hourly; logged and audited), e.g. `"400d"`.
    /// Default: kept forever.
    #[serde(default)]
    pub retention: Option<Duration>,
}

/// How to reach S3-compatible object storage. Unset fields fall back to
/// `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint of an S3-compatible service, e.g. `"http://127.0.0.1:9000"`
    /// (default: AWS).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (default `AWS_REGION`, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`) instead of by
    /// virtual host; most S3-compatible servers want this.
    #[serde(default)]
    pub path_style: bool,
    /// Access key id (default `AWS_ACCESS_KEY_ID`).
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    /// Secret access key (default `AWS_SECRET_ACCESS_KEY`).
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
}

fn default_date_column() -> String {
    DEFAULT_DATE_COLUMN.into()
}

fn default_row_group_rows() -> usize {
    DEFAULT_ROW_GROUP_ROWS
}

fn default_file_max_rows() -> u64 {
    DEFAULT_FILE_MAX_ROWS
}

fn default_file_max_bytes() -> ByteSize {
    DEFAULT_FILE_MAX_BYTES
}

impl FilesSinkConfig {
    /// The codec in effect: the one set, else `zstd`.
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or(Compression::Zstd)
    }

    /// Whether the dataset is on object storage.
    pub fn is_s3(&self) -> bool {
        self.url.starts_with("s3://")
    }

    /// Whether partitions are per logical date (the date column is a
    /// partition column).
    pub fn dated(&self) -> bool {
        self.partition_by.contains(&self.date_column)
    }
}

/// A column type a `types` override may name: what a value becomes in
/// Parquet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Boolean,
    Int16,
    Int32,
    Int64,
    UInt64,
    Float32,
    Float64,
    /// Exact decimal with a precision (at most 38) and a scale.
    Decimal {
        precision: u8,
        scale: i8,
    },
    Text,
    Binary,
    Date,
    /// Microseconds, no zone.
    Timestamp,
    /// Microseconds since the epoch, UTC.
    TimestampTz,
    /// Text holding JSON.
    Json,
}

impl ColumnType {
    /// Reads a type name as written in `types`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "bool" | "boolean" => Self::Boolean,
            "int16" | "smallint" => Self::Int16,
            "int32" | "int" | "integer" => Self::Int32,
            "int64" | "bigint" => Self::Int64,
            "uint64" => Self::UInt64,
            "float32" | "real" => Self::Float32,
            "float64" | "double" => Self::Float64,
            "text" | "string" => Self::Text,
            "binary" | "bytes" => Self::Binary,
            "date" => Self::Date,
            "timestamp" => Self::Timestamp,
            "timestamptz" => Self::TimestampTz,
            "json" => Self::Json,
            _ => {
                let inner = t
                    .strip_prefix("decimal(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| {
                        format!(
                            "unknown type {text:?}; expected one of: boolean, int16, int32, int64, \
                             uint64, float32, float64, decimal(P,S), text, binary, date, timestamp, \
                             timestamptz, json"
                        )
                    })?;
                let (p, s) = inner
                    .split_once(',')
                    .ok_or_else(|| format!("{text:?}: write decimal(PRECISION,SCALE)"))?;
                let precision: u8 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("{text:?}: the precision is not a number"))?;
                let scale: i8 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("{text:?}: the scale is not a number"))?;
                if !(1..=38).contains(&precision) || scale < 0 || scale as u8 > precision {
                    return Err(format!(
                        "{text:?}: the precision must be 1 to 38 and the scale 0 to the precision"
                    ));
                }
                Self::Decimal { precision, scale }
            }
        })
    }
}

/// The query API's result cache: in process by default, or in Redis.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:port/db` to share the cache between processes;
    /// default: in this process.
    #[serde(default)]
    pub url: Option<Secret>,
    /// Most bytes of results kept in process (default `"64MiB"`); the least
    /// recently used go first.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: ByteSize,
    /// How long a result is kept (default `"5m"`). A result is also dropped
    /// as soon as a partition it read is rewritten.
    #[serde(default = "default_cache_ttl")]
    pub ttl: Duration,
    /// Largest single result kept (default: a sixteenth of `max_bytes`).
    #[serde(default)]
    pub max_entry_bytes: Option<ByteSize>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            ttl: DEFAULT_CACHE_TTL,
            max_entry_bytes: None,
        }
    }
}

fn default_cache_max_bytes() -> ByteSize {
    DEFAULT_CACHE_MAX_BYTES
}

fn default_cache_ttl() -> Duration {
    DEFAULT_CACHE_TTL
}

/// Renders a report query for logical date `date`: `{{ date }}`,
/// `{{ next_date }}` and `{{ prev_date }}` are quoted SQL date literals
/// (`'2025-05-14'`), `{{ day(N) }}` is the date N days away, and
/// `{{ date_raw }}` is the bare `2025-05-14`. Unknown variables are errors.
pub fn render_report_query(template: &str, date: jiff::civil::Date) -> Result<String, String> {
    use minijinja::{Environment, UndefinedBehavior, Value};
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let quoted = |d: jiff::civil::Date| format!("'{d}'");
    let shift = move |days: i64| {
        date.checked_add(jiff::Span::new().days(days))
            .map(quoted)
            .map_err(|e| {
                minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("day({days}): {e}"),
                )
            })
    };
    env.add_function("day", shift);
    let day = |n: i64| {
        date.checked_add(jiff::Span::new().days(n))
            .map(quoted)
            .map_err(|e| e.to_string())
    };
    let ctx = minijinja::context! {
        date => Value::from(quoted(date)),
        date_raw => Value::from(date.to_string()),
        next_date => Value::from(day(1)?),
        prev_date => Value::from(day(-1)?),
    };
    env.render_str(template, ctx)
        .map_err(|e| format!("the query template does not render: {e}"))
}

/// Whether `name` can be a partition or column name in a path.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) fn check_files_sink(path: &FieldPath, sink: &FilesSinkConfig, out: &mut Vec<Problem>) {
    let url = sink.url.trim();
    if url.is_empty() {
        out.push(Problem::at(path.key("url"), "must not be empty"));
    } else if let Some(rest) = url.strip_prefix("s3://") {
        if rest.split('/').next().is_none_or(str::is_empty) {
            out.push(Problem::at(
                path.key("url"),
                "an s3:// url names a bucket: s3://bucket/prefix",
            ));
        }
    } else if url.contains("://") && !url.starts_with("file://") {
        out.push(Problem::at(
            path.key("url"),
            format!("expected a directory, file:///path or s3://bucket/prefix, found {url:?}"),
        ));
    }
    match (sink.format, sink.compression) {
        (FileFormat::Parquet, Some(Compression::Gzip)) => out.push(Problem::at(
            path.key("compression"),
            "Parquet files here use zstd, snappy or none",
        )),
        (FileFormat::Jsonl, Some(Compression::Snappy)) => out.push(Problem::at(
            path.key("compression"),
            "JSON Lines files use gzip, zstd or none",
        )),
        _ => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, column) in sink.partition_by.iter().enumerate() {
        if !plain_name(column) {
            out.push(Problem::at(
                path.key("partition_by").index(i),
                format!("{column:?}: partition columns are letters, digits, _ and -"),
            ));
        }
        if !seen.insert(column) {
            out.push(Problem::at(
                path.key("partition_by").index(i),
                format!("{column:?} is named twice"),
            ));
        }
    }
    if sink.row_group_rows == 0 {
        out.push(Problem::at(
            path.key("row_group_rows"),
            "must be greater than 0",
        ));
    }
    if sink.file_max_rows == 0 {
        out.push(Problem::at(
            path.key("file_max_rows"),
            "must be greater than 0",
        ));
    }
    if sink.file_max_bytes.0 < 1024 {
        out.push(Problem::at(
            path.key("file_max_bytes"),
            "must be at least 1KiB",
        ));
    }
    for (column, ty) in &sink.types {
        if let Err(message) = ColumnType::parse(ty) {
            out.push(Problem::at(path.key("types").key(column.clone()), message));
        }
    }
    if sink.retention.is_some() && !sink.dated() {
        out.push(Problem::at(
            path.key("retention"),
            format!(
                "retention deletes partitions by their date: add {:?} to partition_by",
                sink.date_column
            ),
        ));
    }
    if let Some(endpoint) = &sink.s3.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        out.push(Problem::at(
            path.key("s3").key("endpoint"),
            format!("expected an http:// or https:// URL, found {endpoint:?}"),
        ));
    }
}

pub(super) fn check_cache(path: &FieldPath, cache: &CacheConfig, out: &mut Vec<Problem>) {
    if let Some(url) = &cache.url {
        let url = url.expose();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            out.push(Problem::at(
                path.key("url"),
                "expected redis://host:port/db (or rediss://)",
            ));
        }
    }
    if cache.ttl.0.is_zero() {
        out.push(Problem::at(path.key("ttl"), "must be greater than 0s"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_types_parse_and_explain() {
        assert_eq!(
            ColumnType::parse("decimal(18, 2)"),
            Ok(ColumnType::Decimal {
                precision: 18,
                scale: 2
            })
        );
        assert_eq!(ColumnType::parse("BIGINT"), Ok(ColumnType::Int64));
        assert!(
            ColumnType::parse("decimal(40,2)")
                .unwrap_err()
                .contains("1 to 38")
        );
        assert!(
            ColumnType::parse("money")
                .unwrap_err()
                .contains("decimal(P,S)")
        );
    }

    #[test]
    fn report_queries_render_dates_as_literals() {
        let q = render_report_query(
            "where d >= {{ date }} and d < {{ next_date }} or d = {{ day(-7) }} -- {{ date_raw }}",
            jiff::civil::date(2025, 5, 14),
        )
        .unwrap();
        assert_eq!(
            q,
            "where d >= '2025-05-14' and d < '2025-05-15' or d = '2025-05-07' -- 2025-05-14"
        );
        assert!(
            render_report_query("{{ dat }}", jiff::civil::date(2025, 5, 14))
                .unwrap_err()
                .contains("does not render")
        );
    }
}
