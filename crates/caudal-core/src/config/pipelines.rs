//! Pipelines: a source, a sink, a schedule and a buffer, and the checks
//! that span them (a pipeline names sources and sinks that exist, a CDC
//! pipeline has a slot of its own, a schedule has one trigger). Cron
//! expressions are parsed here, once, for validation and for the engine.

use std::collections::BTreeMap;

use croner::parser::{CronParser, Seconds, Year};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::{SinkConfig, SourceConfig, SqlDialect};
use crate::units::{ByteSize, Duration};

/// Default poll interval of a continuous schedule.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// Default size of a pipeline's buffer on disk.
pub const DEFAULT_BUFFER_MAX_BYTES: ByteSize = ByteSize(256 << 20);

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
    /// Report pipelines (`mode = "query"`): whether a run also writes every
    /// day missed since the last one written (default `true`); otherwise
    /// only the last complete day.
    #[serde(default)]
    pub catch_up: Option<bool>,
    /// Report pipelines: the first logical date a run writes when none has
    /// been written yet, e.g. `"2025-01-01"` (default: the last complete
    /// day only).
    #[serde(default)]
    pub start_date: Option<String>,
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

/// Parses a cron expression the way schedules use it: 5 fields (minute
/// hour day-of-month month day-of-week), 6 with seconds first, or a
/// nickname such as `@hourly`.
pub fn parse_cron(expression: &str) -> Result<croner::Cron, String> {
    let parser = cron_parser();
    let fields: Vec<&str> = expression.split_whitespace().collect();
    let nickname = expression.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields.len()) {
        return Err(format!(
            "invalid cron expression {expression:?}: expected 5 fields (minute hour \
             day-of-month month day-of-week) or 6 with seconds first, found {}",
            fields.len()
        ));
    }
    parser.parse(expression).map_err(|error| {
        let reason = cron_reason(&error.to_string());
        match culprit_field(&parser, &fields) {
            Some((name, text)) => {
                format!("invalid cron expression {expression:?}: {reason} in the {name} field ({text:?})")
            }
            None => format!("invalid cron expression {expression:?}: {reason}"),
        }
    })
}

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// croner's message without its prefix and final period, e.g. "number out
/// of bounds".
fn cron_reason(message: &str) -> String {
    let mut reason = message;
    for prefix in [
        "Component error: ",
        "Invalid pattern: ",
        "Pattern contains illegal characters: ",
    ] {
        reason = reason.strip_prefix(prefix).unwrap_or(reason);
    }
    let reason = reason.trim_end_matches('.');
    let mut chars = reason.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Finds the one field whose replacement by `*` makes the expression valid.
fn culprit_field<'f>(parser: &CronParser, fields: &[&'f str]) -> Option<(&'static str, &'f str)> {
    const FIVE: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
    const SIX: [&str; 6] = [
        "second",
        "minute",
        "hour",
        "day-of-month",
        "month",
        "day-of-week",
    ];
    let names: &[&str] = match fields.len() {
        5 => &FIVE,
        6 => &SIX,
        _ => return None,
    };
    (0..fields.len()).find_map(|i| {
        let mut trial = fields.to_vec();
        trial[i] = "*";
        parser
            .parse(&trial.join(" "))
            .is_ok()
            .then(|| (names[i], fields[i]))
    })
}

/// Every CDC pipeline needs a replication slot of its own: two consumers
/// of one slot confirm each other's progress and skip each other's
/// changes. And its buffer must fsync each batch: a slot, once confirmed,
/// cannot be rewound.
fn check_slots(config: &Defined<'_>, out: &mut Vec<Problem>) {
    let mut slots: BTreeMap<String, &str> = BTreeMap::new();
    let mut server_ids: BTreeMap<(String, u32), &str> = BTreeMap::new();
    for (name, pipeline) in config.pipelines {
        let Some((source, sql)) = config
            .sources
            .get(&pipeline.source)
            .filter(|s| s.is_cdc())
            .and_then(|s| Some((s, s.sql()?)))
        else {
            continue;
        };
        let path = FieldPath::root().key("pipelines").key(name.clone());
        if source.dialect() == Some(SqlDialect::Mysql) {
            let id = sql
                .server_id
                .unwrap_or_else(|| super::default_server_id(name));
            let server = crate::units::redact_url(sql.url.expose());
            if let Some(other) = server_ids.insert((server, id), name) {
                out.push(Problem::at(
                    path.key("source"),
                    format!(
                        "pipelines {other:?} and {name:?} would read the binary log with the same \
                         replica server_id {id}, and the server drops one when the other connects; \
                         give each its own source with its own `server_id`"
                    ),
                ));
            }
        } else {
            let slot = sql
                .slot
                .clone()
                .unwrap_or_else(|| super::default_cdc_name(name));
            if let Some(other) = slots.insert(slot.clone(), name) {
                out.push(Problem::at(
                    path.key("source"),
                    format!(
                        "pipelines {other:?} and {name:?} would share replication slot {slot:?}; each CDC \
                         pipeline needs its own source (with its own `slot`)"
                    ),
                ));
            }
        }
        if matches!(pipeline.buffer.fsync, FsyncPolicy::Interval(_)) {
            out.push(Problem::at(
                path.key("buffer").key("fsync"),
                "a CDC pipeline needs fsync = \"batch\": the source's position (the replication \
                 slot, the binlog position) moves on once a batch is in the buffer, and cannot be \
                 rewound after a power loss",
            ));
        }
    }
}

/// Most characters in a pipeline name.
const MAX_PIPELINE_NAME: usize = 128;

/// A pipeline's name names its buffer directory, its lease and its rows in
/// the state store, so it is kept to letters, digits, `_`, `-` and `.`,
/// not starting with `.` (no path can be smuggled into the buffer
/// directory).
fn pipeline_name(name: &str) -> Result<(), String> {
    checked_name("pipeline", name)
}

/// A name that may become a directory or a lease name (pipelines,
/// workflows, tasks): letters, digits, `_`, `-` and `.`, not first.
pub(super) fn checked_name(what: &str, name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_PIPELINE_NAME {
        return Err(format!(
            "a {what} name has 1 to {MAX_PIPELINE_NAME} characters"
        ));
    }
    if name.starts_with('.') || !name.chars().all(allowed) {
        return Err(format!(
            "{what} name {name:?} may hold only letters, digits, `_`, `-` and `.` (not first)"
        ));
    }
    Ok(())
}

fn check_pipeline(
    path: &FieldPath,
    pipeline: &PipelineConfig,
    config: &Defined<'_>,
    out: &mut Vec<Problem>,
) {
    if !config.sources.contains_key(&pipeline.source) {
        out.push(Problem::at(
            path.key("source"),
            unknown_reference("source", &pipeline.source, config.sources),
        ));
    }
    if !config.sinks.contains_key(&pipeline.sink) {
        out.push(Problem::at(
            path.key("sink"),
            unknown_reference("sink", &pipeline.sink, config.sinks),
        ));
    }
    if pipeline.key.as_deref() == Some("") {
        out.push(Problem::at(
            path.key("key"),
            "must not be empty; name a record field or leave it out",
        ));
    }
    let source = config.sources.get(&pipeline.source);
    let cdc = source.is_some_and(SourceConfig::is_cdc);
    let broker = source.is_some_and(SourceConfig::is_broker);
    let s = &pipeline.schedule;
    check_report(path, pipeline, config, out);
    let scheduled = s.every.is_some() || s.cron.is_some() || s.continuous || s.poll.is_some();
    if !cdc && !broker {
        check_schedule(&path.key("schedule"), s, out);
    } else if scheduled {
        let how = if cdc {
            "captures changes continuously (mode = \"cdc\")"
        } else {
            "consumes its broker continuously"
        };
        out.push(Problem::at_key(
            path.key("schedule"),
            format!("source {:?} {how}; remove the schedule", pipeline.source),
        ));
    }
    if pipeline
        .schema
        .as_deref()
        .is_some_and(|schema| schema.trim().is_empty())
    {
        out.push(Problem::at(
            path.key("schema"),
            "must not be empty; name a JSON Schema file or leave it out",
        ));
    }
    check_buffer(&path.key("buffer"), &pipeline.buffer, out);
}

/// A report pipeline (`mode = "query"` source) writes a `files` sink on a
/// cron or interval schedule, and a `files` sink is written by one.
fn check_report(
    path: &FieldPath,
    pipeline: &PipelineConfig,
    config: &Defined<'_>,
    out: &mut Vec<Problem>,
) {
    let query = config
        .sources
        .get(&pipeline.source)
        .and_then(SourceConfig::sql)
        .is_some_and(|s| s.mode == super::SqlMode::Query);
    let files = config
        .sinks
        .get(&pipeline.sink)
        .is_some_and(|s| s.files().is_some());
    let s = &pipeline.schedule;
    if query && !files && config.sinks.contains_key(&pipeline.sink) {
        out.push(Problem::at(
            path.key("sink"),
            format!(
                "source {:?} runs a report query per date (mode = \"query\"); its rows go to a \
                 `type = \"files\"` sink, a dataset",
                pipeline.source
            ),
        ));
    }
    if files && !query && config.sources.contains_key(&pipeline.source) {
        out.push(Problem::at(
            path.key("source"),
            format!(
                "sink {:?} writes partitions per logical date: its source must be a SQL source \
                 with mode = \"query\"",
                pipeline.sink
            ),
        ));
    }
    if query && s.continuous {
        out.push(Problem::at(
            path.key("schedule").key("continuous"),
            "a report runs per day: use `cron` (e.g. \"0 2 * * *\") or `every`",
        ));
    }
    if !query {
        for (field, set) in [
            ("catch_up", s.catch_up.is_some()),
            ("start_date", s.start_date.is_some()),
        ] {
            if set {
                out.push(Problem::at(
                    path.key("schedule").key(field),
                    format!("{field:?} applies only to report pipelines (a source with mode = \"query\")"),
                ));
            }
        }
    }
    if let Some(start) = &s.start_date
        && start.parse::<jiff::civil::Date>().is_err()
    {
        out.push(Problem::at(
            path.key("schedule").key("start_date"),
            format!("expected a date like \"2025-01-01\", found {start:?}"),
        ));
    }
}

pub(super) fn unknown_reference<V>(
    what: &str,
    name: &str,
    defined: &BTreeMap<String, V>,
) -> String {
    if defined.is_empty() {
        return format!("unknown {what} {name:?}; no {what}s are defined");
    }
    let names: Vec<&str> = defined.keys().map(String::as_str).collect();
    format!(
        "unknown {what} {name:?}; defined {what}s: {}",
        names.join(", ")
    )
}

/// A schedule, checked: what the engine runs a pipeline by.
#[derive(Clone, Debug)]
pub enum ScheduleSpec {
    /// Every fixed interval.
    Every(std::time::Duration),
    /// On a cron expression, in a time zone.
    Cron {
        cron: Box<croner::Cron>,
        tz: jiff::tz::TimeZone,
        text: String,
    },
    /// Again `poll` after each run ends.
    Continuous { poll: std::time::Duration },
}

impl ScheduleConfig {
    /// The schedule this describes, or what is wrong with it (the first
    /// problem; validation reports them all, each at its field).
    pub fn spec(&self) -> Result<ScheduleSpec, String> {
        let mut problems = Vec::new();
        let spec = check_schedule(&FieldPath::root().key("schedule"), self, &mut problems);
        match (spec, problems.into_iter().next()) {
            (Some(spec), None) => Ok(spec),
            (_, Some(p)) => Err(format!("{}: {}", p.path, p.message)),
            (None, None) => Err("schedule: no trigger".into()),
        }
    }
}

/// Checks a schedule; returns it when it is valid. One set of rules, for
/// validation and for the engine.
pub(super) fn check_schedule(
    path: &FieldPath,
    schedule: &ScheduleConfig,
    out: &mut Vec<Problem>,
) -> Option<ScheduleSpec> {
    let found = out.len();
    let set: Vec<&str> = [
        ("\"every\"", schedule.every.is_some()),
        ("\"cron\"", schedule.cron.is_some()),
        ("\"continuous\"", schedule.continuous),
    ]
    .into_iter()
    .filter_map(|(name, is_set)| is_set.then_some(name))
    .collect();
    match set.as_slice() {
        [] => out.push(Problem::at_key(
            path.clone(),
            "no trigger: set one of \"every\" (e.g. \"1h\"), \"cron\" (e.g. \"0 * * * *\") or \"continuous\" (true)",
        )),
        [_] => {}
        several => out.push(Problem::at_key(
            path.clone(),
            format!(
                "set only one of \"every\", \"cron\" or \"continuous\"; found {}",
                several.join(" and ")
            ),
        )),
    }
    if let Some(every) = schedule.every
        && every.as_std().is_zero()
    {
        out.push(Problem::at(path.key("every"), "must be greater than 0s"));
    }
    let cron = match schedule.cron.as_deref().map(parse_cron) {
        Some(Err(message)) => {
            out.push(Problem::at(path.key("cron"), message));
            None
        }
        Some(Ok(cron)) => Some(cron),
        None => None,
    };
    let mut tz = jiff::tz::TimeZone::UTC;
    if let Some(name) = &schedule.tz {
        if schedule.cron.is_none() {
            out.push(Problem::at(
                path.key("tz"),
                "\"tz\" applies only to \"cron\" schedules",
            ));
        } else {
            match jiff::tz::TimeZone::get(name) {
                Ok(zone) => tz = zone,
                Err(_) => out.push(Problem::at(
                    path.key("tz"),
                    format!("unknown time zone {name:?}; use an IANA name such as \"UTC\" or \"America/Mexico_City\""),
                )),
            }
        }
    }
    if schedule.poll.is_some() && !schedule.continuous {
        out.push(Problem::at(
            path.key("poll"),
            "\"poll\" applies only to continuous schedules (\"continuous\" is not true)",
        ));
    }
    if out.len() > found {
        return None;
    }
    match (schedule.every, cron, schedule.continuous) {
        (Some(every), None, false) => Some(ScheduleSpec::Every(every.as_std())),
        (None, Some(cron), false) => Some(ScheduleSpec::Cron {
            cron: Box::new(cron),
            tz,
            text: schedule.cron.clone().unwrap_or_default(),
        }),
        (None, None, true) => Some(ScheduleSpec::Continuous {
            poll: schedule.poll.unwrap_or(DEFAULT_POLL).as_std(),
        }),
        _ => None,
    }
}

fn check_buffer(path: &FieldPath, buffer: &BufferConfig, out: &mut Vec<Problem>) {
    if buffer.max_bytes.0 == 0 {
        out.push(Problem::at(path.key("max_bytes"), "must be greater than 0"));
    }
    if let FsyncPolicy::Interval(every) = buffer.fsync
        && every.as_std().is_zero()
    {
        out.push(Problem::at(
            path.key("fsync"),
            "must be greater than 0s; use \"batch\" to force every batch to disk",
        ));
    }
}

/// What the other sections define, as the pipelines' checks see it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Defined<'a> {
    pub pipelines: &'a BTreeMap<String, PipelineConfig>,
    pub sources: &'a BTreeMap<String, SourceConfig>,
    pub sinks: &'a BTreeMap<String, SinkConfig>,
}

/// Checks every pipeline, and what pipelines must not share.
pub(super) fn check_pipelines(config: &Defined<'_>, out: &mut Vec<Problem>) {
    let root = FieldPath::root();
    for (name, pipeline) in config.pipelines {
        let path = root.key("pipelines").key(name.clone());
        if let Err(why) = pipeline_name(name) {
            out.push(Problem::at(path.clone(), why));
        }
        check_pipeline(&path, pipeline, config, out);
    }
    check_slots(config, out);
    // A dataset has one writer: its dates and partitions are its own.
    let mut writers: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, pipeline) in config.pipelines {
        let files = config
            .sinks
            .get(&pipeline.sink)
            .is_some_and(|s| s.files().is_some());
        if !files {
            continue;
        }
        if let Some(first) = writers.insert(pipeline.sink.as_str(), name.as_str()) {
            out.push(Problem::at(
                root.key("pipelines").key(name.clone()).key("sink"),
                format!(
                    "dataset {:?} is written by pipeline {first:?} already; a files sink has one pipeline",
                    pipeline.sink
                ),
            ));
        }
    }
}
