//! Cross-field checks of a parsed configuration: what the types alone
//! cannot say (a pipeline names a sink that exists, a schedule has exactly
//! one trigger, a URL fits its source type, a template compiles).
//!
//! Every problem is reported, each with the field path it is about; the
//! loader turns paths into file locations. Messages never print secret
//! values (source URLs, header values): at most a URL's scheme.

use std::collections::{BTreeMap, BTreeSet};

use croner::parser::{CronParser, Seconds, Year};

use super::load::ConfigError;
use super::load::path::{FieldPath, Problem};
use super::{
    BufferConfig, CircuitBreakerConfig, ConcurrencyConfig, Config, FsyncPolicy, HttpSinkConfig,
    PipelineConfig, RateLimitConfig, RetryConfig, ScheduleConfig, SinkConfig, SourceConfig,
    SqlDialect, SqlMode, SqlSourceConfig, StatusConfig,
};
use crate::units::redact_url;

/// HTTP methods a sink may use.
pub const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Checks a configuration and returns every problem (empty when valid).
/// Errors carry field paths but no locations; [`super::load_str`] runs these
/// checks too and adds locations.
pub fn validate(config: &Config) -> Vec<ConfigError> {
    check(config)
        .into_iter()
        .map(|problem| ConfigError {
            location: None,
            path: problem.path.to_string(),
            message: problem.message,
        })
        .collect()
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

/// Every cross-field problem of `config`, with paths.
pub(crate) fn check(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let root = FieldPath::root();
    for (name, source) in &config.sources {
        check_source(
            &root.key("sources").key(name.clone()),
            source,
            &mut problems,
        );
    }
    for (name, sink) in &config.sinks {
        let path = root.key("sinks").key(name.clone());
        match sink {
            SinkConfig::Http(http) => check_http_sink(&path, http, &mut problems),
        }
    }
    for (name, pipeline) in &config.pipelines {
        let path = root.key("pipelines").key(name.clone());
        if let Err(why) = pipeline_name(name) {
            problems.push(Problem::at(path.clone(), why));
        }
        check_pipeline(&path, pipeline, config, &mut problems);
    }
    check_slots(config, &mut problems);
    check_server(config, &mut problems);
    super::retention::check(&root.key("retention"), &config.retention, &mut problems);
    problems
}

/// Every CDC pipeline needs a replication slot of its own: two consumers
/// of one slot confirm each other's progress and skip each other's
/// changes. And its buffer must fsync each batch: a slot, once confirmed,
/// cannot be rewound.
fn check_server(config: &Config, out: &mut Vec<Problem>) {
    if let Some(server) = &config.server
        && server.address().is_none()
    {
        out.push(Problem::at(
            FieldPath::root().key("server").key("listen"),
            format!(
                "{:?} is not an address to listen on: write host:port, e.g. \"127.0.0.1:9464\"",
                server.listen
            ),
        ));
    }
}

fn check_slots(config: &Config, out: &mut Vec<Problem>) {
    let mut slots: BTreeMap<String, &str> = BTreeMap::new();
    let mut server_ids: BTreeMap<(String, u32), &str> = BTreeMap::new();
    for (name, pipeline) in &config.pipelines {
        let Some(source) = config
            .sources
            .get(&pipeline.source)
            .filter(|s| s.sql().mode == SqlMode::Cdc)
        else {
            continue;
        };
        let path = FieldPath::root().key("pipelines").key(name.clone());
        let sql = source.sql();
        if source.dialect() == SqlDialect::Mysql {
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
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_PIPELINE_NAME {
        return Err(format!(
            "a pipeline name has 1 to {MAX_PIPELINE_NAME} characters"
        ));
    }
    if name.starts_with('.') || !name.chars().all(allowed) {
        return Err(format!(
            "pipeline name {name:?} may hold only letters, digits, `_`, `-` and `.` (not first)"
        ));
    }
    Ok(())
}

fn check_pipeline(
    path: &FieldPath,
    pipeline: &PipelineConfig,
    config: &Config,
    out: &mut Vec<Problem>,
) {
    if !config.sources.contains_key(&pipeline.source) {
        out.push(Problem::at(
            path.key("source"),
            unknown_reference("source", &pipeline.source, &config.sources),
        ));
    }
    if !config.sinks.contains_key(&pipeline.sink) {
        out.push(Problem::at(
            path.key("sink"),
            unknown_reference("sink", &pipeline.sink, &config.sinks),
        ));
    }
    if pipeline.key.as_deref() == Some("") {
        out.push(Problem::at(
            path.key("key"),
            "must not be empty; name a record field or leave it out",
        ));
    }
    let cdc = config
        .sources
        .get(&pipeline.source)
        .is_some_and(|s| s.sql().mode == SqlMode::Cdc);
    let s = &pipeline.schedule;
    if !cdc {
        check_schedule(&path.key("schedule"), s, out);
    } else if s.every.is_some() || s.cron.is_some() || s.continuous || s.poll.is_some() {
        out.push(Problem::at_key(
            path.key("schedule"),
            format!(
                "source {:?} captures changes continuously (mode = \"cdc\"); remove the schedule",
                pipeline.source
            ),
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

fn unknown_reference<V>(what: &str, name: &str, defined: &BTreeMap<String, V>) -> String {
    if defined.is_empty() {
        return format!("unknown {what} {name:?}; no {what}s are defined");
    }
    let names: Vec<&str> = defined.keys().map(String::as_str).collect();
    format!(
        "unknown {what} {name:?}; defined {what}s: {}",
        names.join(", ")
    )
}

fn check_schedule(path: &FieldPath, schedule: &ScheduleConfig, out: &mut Vec<Problem>) {
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
    if let Some(cron) = &schedule.cron
        && let Err(message) = parse_cron(cron)
    {
        out.push(Problem::at(path.key("cron"), message));
    }
    if let Some(tz) = &schedule.tz {
        if schedule.cron.is_none() {
            out.push(Problem::at(
                path.key("tz"),
                "\"tz\" applies only to \"cron\" schedules",
            ));
        } else if jiff::tz::TimeZone::get(tz).is_err() {
            out.push(Problem::at(
                path.key("tz"),
                format!("unknown time zone {tz:?}; use an IANA name such as \"UTC\" or \"America/Mexico_City\""),
            ));
        }
    }
    if schedule.poll.is_some() && !schedule.continuous {
        out.push(Problem::at(
            path.key("poll"),
            "\"poll\" applies only to continuous schedules (\"continuous\" is not true)",
        ));
    }
}

fn check_source(path: &FieldPath, source: &SourceConfig, out: &mut Vec<Problem>) {
    let sql = source.sql();
    if let Some(message) = missing_feature(source) {
        out.push(Problem::at(path.key(message.0), message.1));
    }
    if let Some(message) = sql_url_problem(source.dialect(), sql.url.expose()) {
        out.push(Problem::at(path.key("url"), message));
    }
    if sql.page_size == 0 {
        out.push(Problem::at(path.key("page_size"), "must be greater than 0"));
    }
    match sql.mode {
        SqlMode::Incremental => check_incremental(path, sql, out),
        SqlMode::Cdc => check_cdc(path, source.dialect(), sql, out),
    }
}

/// The field and the reason, when this build lacks the connector a
/// source needs (cargo features `mysql`, `postgres-cdc`).
fn missing_feature(source: &SourceConfig) -> Option<(&'static str, String)> {
    match (source.dialect(), source.sql().mode) {
        (SqlDialect::Mysql, _) if !cfg!(feature = "mysql") => Some((
            "type",
            "this caudal was built without MySQL/MariaDB support (cargo feature `mysql`); \
             use a build with default features"
                .into(),
        )),
        (SqlDialect::Postgres, SqlMode::Cdc) if !cfg!(feature = "postgres-cdc") => Some((
            "mode",
            "this caudal was built without PostgreSQL change data capture (cargo feature \
             `postgres-cdc`); use a build with default features"
                .into(),
        )),
        _ => None,
    }
}

fn check_incremental(path: &FieldPath, sql: &SqlSourceConfig, out: &mut Vec<Problem>) {
    match (&sql.table, &sql.query) {
        (Some(_), Some(_)) => out.push(Problem::at(
            path.key("query"),
            "set either \"table\" or \"query\", not both",
        )),
        (None, None) => out.push(Problem::at_key(
            path.clone(),
            "set \"table\" (a table to read) or \"query\" (a query whose rows are read)",
        )),
        (Some(table), None) if table.trim().is_empty() => {
            out.push(Problem::at(path.key("table"), "must not be empty"));
        }
        (None, Some(query)) if query.trim().is_empty() => {
            out.push(Problem::at(path.key("query"), "must not be empty"));
        }
        _ => {}
    }
    check_cursor(&path.key("cursor"), &sql.cursor, out);
    if let Some(columns) = &sql.columns {
        check_columns(&path.key("columns"), columns, &sql.cursor, out);
    }
    for (field, set) in [
        ("tables", sql.tables.is_some()),
        ("slot", sql.slot.is_some()),
        ("publication", sql.publication.is_some()),
        ("heartbeat", sql.heartbeat.is_some()),
    ] {
        if set {
            out.push(Problem::at(
                path.key(field),
                format!("{field:?} applies only to mode = \"cdc\""),
            ));
        }
    }
}

fn check_cdc(path: &FieldPath, dialect: SqlDialect, sql: &SqlSourceConfig, out: &mut Vec<Problem>) {
    match dialect {
        SqlDialect::Postgres => {
            if sql.server_id.is_some() {
                out.push(Problem::at(
                    path.key("server_id"),
                    "\"server_id\" is for mysql sources (a binlog replica's id); postgres uses a \"slot\"",
                ));
            }
        }
        SqlDialect::Mysql => {
            for (field, set) in [
                ("slot", sql.slot.is_some()),
                ("publication", sql.publication.is_some()),
            ] {
                if set {
                    out.push(Problem::at(
                        path.key(field),
                        format!(
                            "{field:?} is for postgres sources; a mysql source reads the binary log \
                             as a replica with its own \"server_id\""
                        ),
                    ));
                }
            }
            if sql.server_id == Some(0) {
                out.push(Problem::at(
                    path.key("server_id"),
                    "0 is not a replica id: use 1 to 4294967295, unique among the server's replicas",
                ));
            }
        }
        SqlDialect::Sqlite => {
            out.push(Problem::at(
                path.key("mode"),
                "mode = \"cdc\" is supported for postgres and mysql sources; sqlite sources read incrementally",
            ));
            return;
        }
    }
    for (field, set, why) in [
        (
            "query",
            sql.query.is_some(),
            "changes are captured per table",
        ),
        (
            "cursor",
            !sql.cursor.is_empty(),
            "changes are ordered by the log",
        ),
        (
            "lag",
            sql.lag.is_some(),
            "the log only holds committed changes",
        ),
        (
            "columns",
            sql.columns.is_some(),
            "every column of a captured table is sent",
        ),
    ] {
        if set {
            out.push(Problem::at(
                path.key(field),
                format!("{field:?} does not apply to mode = \"cdc\": {why}"),
            ));
        }
    }
    match (&sql.table, &sql.tables) {
        (Some(_), Some(_)) => out.push(Problem::at(
            path.key("tables"),
            "set either \"table\" or \"tables\", not both",
        )),
        (None, None) => out.push(Problem::at_key(
            path.clone(),
            "set \"tables\", the tables to capture, e.g. [\"public.service_requests\"]",
        )),
        (Some(table), None) if table.trim().is_empty() => {
            out.push(Problem::at(path.key("table"), "must not be empty"));
        }
        (None, Some(tables)) => {
            if tables.is_empty() {
                out.push(Problem::at(path.key("tables"), "list at least one table"));
            }
            let mut seen = BTreeSet::new();
            for (i, t) in tables.iter().enumerate() {
                if t.trim().is_empty() {
                    out.push(Problem::at(
                        path.key("tables").index(i),
                        "table name is empty",
                    ));
                } else if !seen.insert(t.as_str()) {
                    out.push(Problem::at(
                        path.key("tables").index(i),
                        format!("table {t:?} is listed twice"),
                    ));
                }
            }
        }
        _ => {}
    }
    for (field, name) in [("slot", &sql.slot), ("publication", &sql.publication)] {
        if let Some(name) = name
            && !valid_pg_name(name)
        {
            out.push(Problem::at(
                path.key(field),
                format!(
                    "{name:?} is not a valid {field} name: use 1 to 63 lowercase letters, digits and _"
                ),
            ));
        }
    }
}

/// A replication slot name as PostgreSQL accepts it (and so a publication
/// name caudal never needs to quote).
pub fn valid_pg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_cursor(path: &FieldPath, cursor: &[String], out: &mut Vec<Problem>) {
    if cursor.is_empty() {
        out.push(Problem::at(
            path.clone(),
            "list at least one cursor column, e.g. [\"last_modified_date\", \"id\"]",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, column) in cursor.iter().enumerate() {
        if column.trim().is_empty() {
            out.push(Problem::at(path.index(i), "column name is empty"));
        } else if !seen.insert(column.as_str()) {
            out.push(Problem::at(
                path.index(i),
                format!("column {column:?} is listed twice"),
            ));
        }
    }
}

fn check_columns(path: &FieldPath, columns: &[String], cursor: &[String], out: &mut Vec<Problem>) {
    if columns.is_empty() {
        out.push(Problem::at(
            path.clone(),
            "list at least one column, or leave \"columns\" out to read all columns",
        ));
        return;
    }
    let mut missing: Vec<String> = Vec::new();
    for column in cursor.iter().filter(|c| !columns.contains(c)) {
        let quoted = format!("{column:?}");
        if !missing.contains(&quoted) {
            missing.push(quoted);
        }
    }
    if !missing.is_empty() {
        out.push(Problem::at(
            path.clone(),
            format!(
                "must include every cursor column; missing {}",
                missing.join(", ")
            ),
        ));
    }
}

/// Checks a source URL against its type. Only the scheme is ever printed:
/// the rest may hold a password.
fn sql_url_problem(dialect: SqlDialect, url: &str) -> Option<String> {
    let prefixes: &[&str] = match dialect {
        SqlDialect::Postgres => &["postgres://", "postgresql://"],
        SqlDialect::Mysql => &["mysql://", "mariadb://"],
        SqlDialect::Sqlite => &["sqlite:"],
    };
    if prefixes.iter().any(|p| url.starts_with(p)) {
        return None;
    }
    let wanted = format!(
        "a {} source needs a URL starting with {}",
        dialect.as_str(),
        prefixes.join(" or ")
    );
    Some(match url_scheme(url) {
        Some(scheme) => format!("{wanted}; this one starts with {scheme}"),
        None if url.trim().is_empty() => format!("{wanted}; this one is empty"),
        None => format!("{wanted}; this one has no scheme"),
    })
}

/// `mysql://` of `mysql://user:pw@host/db`, `sqlite:` of `sqlite:x.db`.
fn url_scheme(url: &str) -> Option<&str> {
    let colon = url.find(':')?;
    let name = &url[..colon];
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid {
        return None;
    }
    let end = if url[colon..].starts_with("://") {
        colon + 3
    } else {
        colon + 1
    };
    url.get(..end)
}

fn check_http_sink(path: &FieldPath, sink: &HttpSinkConfig, out: &mut Vec<Problem>) {
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
    check_retry(&path.key("retry"), &sink.retry, out);
    check_status(&path.key("status"), &sink.status, out);
    check_circuit_breaker(&path.key("circuit_breaker"), &sink.circuit_breaker, out);
    check_rate_limit(&path.key("rate_limit"), &sink.rate_limit, out);
    check_concurrency(&path.key("concurrency"), sink.concurrency, out);
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

fn check_retry(path: &FieldPath, retry: &RetryConfig, out: &mut Vec<Problem>) {
    if retry.initial.as_std().is_zero() {
        out.push(Problem::at(path.key("initial"), "must be greater than 0s"));
    } else if retry.initial > retry.max_delay && !retry.max_delay.as_std().is_zero() {
        out.push(Problem::at(
            path.key("initial"),
            format!("must not exceed max_delay ({})", retry.max_delay),
        ));
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        out.push(Problem::at(
            path.key("multiplier"),
            "must be 1 or more (1 keeps the longest wait the same for every retry)",
        ));
    }
    if retry.max_delay.as_std().is_zero() {
        out.push(Problem::at(
            path.key("max_delay"),
            "must be greater than 0s",
        ));
    }
}

/// The names of the status lists, in the order they are checked.
const STATUS_LISTS: [&str; 4] = ["success", "retry", "reject", "split"];

fn check_status(path: &FieldPath, status: &StatusConfig, out: &mut Vec<Problem>) {
    let lists: [&[u16]; 4] = [
        &status.success,
        &status.retry,
        &status.reject,
        &status.split,
    ];
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, codes) in STATUS_LISTS.into_iter().zip(lists) {
        for (i, &code) in codes.iter().enumerate() {
            let at = path.key(name).index(i);
            if !(100..=599).contains(&code) {
                out.push(Problem::at(
                    at,
                    format!("{code} is not an HTTP status; use a code from 100 to 599"),
                ));
            } else if let Some(first) = seen.insert(code, name) {
                let message = if first == name {
                    format!("{code} is listed twice")
                } else {
                    format!("{code} is already listed in \"{first}\"; a code belongs to one list")
                };
                out.push(Problem::at(at, message));
            }
        }
    }
}

fn check_circuit_breaker(path: &FieldPath, breaker: &CircuitBreakerConfig, out: &mut Vec<Problem>) {
    let ratio = breaker.failure_ratio;
    if !(ratio > 0.0 && ratio <= 1.0) {
        out.push(Problem::at(
            path.key("failure_ratio"),
            "must be above 0 and at most 1, e.g. 0.5 for half of the requests",
        ));
    }
    for (name, value) in [
        ("min_requests", breaker.min_requests),
        ("half_open_probes", breaker.half_open_probes),
    ] {
        if value == 0 {
            out.push(Problem::at(path.key(name), "must be 1 or more"));
        }
    }
    for (name, value) in [("window", breaker.window), ("open_for", breaker.open_for)] {
        if value.as_std().is_zero() {
            out.push(Problem::at(path.key(name), "must be greater than 0s"));
        }
    }
}

fn check_rate_limit(path: &FieldPath, limit: &RateLimitConfig, out: &mut Vec<Problem>) {
    for (name, value) in [
        ("requests_per_second", limit.requests_per_second),
        ("records_per_second", limit.records_per_second),
    ] {
        if let Some(rate) = value
            && !(rate.is_finite() && rate > 0.0)
        {
            out.push(Problem::at(
                path.key(name),
                "must be greater than 0; leave it out for no limit",
            ));
        }
    }
}

fn check_concurrency(path: &FieldPath, concurrency: ConcurrencyConfig, out: &mut Vec<Problem>) {
    match concurrency {
        ConcurrencyConfig::Fixed(0) => out.push(Problem::at(path.clone(), "must be 1 or more")),
        ConcurrencyConfig::Fixed(_) => {}
        ConcurrencyConfig::Adaptive { min, max } => {
            let path = path.key("adaptive");
            if min == 0 {
                out.push(Problem::at(path.key("min"), "must be 1 or more"));
            }
            if max < min {
                out.push(Problem::at(
                    path.key("max"),
                    format!("must be at least min ({min})"),
                ));
            }
        }
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

fn is_http_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["http://", "https://"].iter().any(|scheme| {
        lower
            .strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
    })
}

/// An RFC 9110 token.
fn is_header_name(name: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_accepts_five_or_six_fields_and_nicknames() {
        assert!(parse_cron("0 * * * *").is_ok());
        assert!(parse_cron("*/10 * * * * *").is_ok());
        assert!(parse_cron("0 9 * * MON-FRI").is_ok());
        assert!(parse_cron("@hourly").is_ok());
    }

    #[test]
    fn cron_errors_name_the_problem() {
        let e = parse_cron("* * * *").expect_err("four fields");
        assert!(e.contains("expected 5 fields"), "{e}");
        assert!(e.contains("found 4"), "{e}");
        let e = parse_cron("0 0 * * * * 2030").expect_err("seven fields");
        assert!(e.contains("found 7"), "{e}");
        let e = parse_cron("61 * * * *").expect_err("bad minute");
        assert_eq!(
            e,
            "invalid cron expression \"61 * * * *\": number out of bounds in the minute field (\"61\")"
        );
        let e = parse_cron("0 0 * * * 9").expect_err("bad weekday");
        assert!(e.contains("day-of-week"), "{e}");
    }

    #[test]
    fn url_schemes_are_printed_without_the_rest() {
        let m = sql_url_problem(SqlDialect::Postgres, "mysql://root:secret@db/x").expect("wrong");
        assert!(m.ends_with("this one starts with mysql://"), "{m}");
        assert!(!m.contains("secret"));
        assert!(sql_url_problem(SqlDialect::Postgres, "postgresql://x/y").is_none());
        assert!(sql_url_problem(SqlDialect::Mysql, "mariadb://x/y").is_none());
        assert!(sql_url_problem(SqlDialect::Sqlite, "sqlite::memory:").is_none());
        let m = sql_url_problem(SqlDialect::Sqlite, "caudal.db").expect("no scheme");
        assert!(m.ends_with("has no scheme"), "{m}");
        let m = sql_url_problem(SqlDialect::Sqlite, "").expect("empty");
        assert!(m.ends_with("is empty"), "{m}");
    }

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
