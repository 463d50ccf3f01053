//! Sources: where a pipeline's records come from (SQL tables and queries
//! read by cursor, or the changes of a database's log), and the checks of
//! their settings.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::brokers::{KafkaSourceConfig, NatsSourceConfig, RabbitmqSourceConfig};
use super::crawl::CrawlSourceConfig;
use super::load::path::{FieldPath, Problem};
use crate::units::{Duration, Secret};

/// Default number of rows fetched per query page.
pub const DEFAULT_PAGE_SIZE: u32 = 5000;

/// Default safety lag: rows modified less than this long ago wait for the
/// next run, so transactions still in flight are not overtaken.
pub const DEFAULT_LAG: Duration = Duration::from_secs(5);

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
    /// Web pages, crawled politely (see `[crawl]`).
    Crawl(CrawlSourceConfig),
    /// The closed windows of a live aggregate (`[aggregates.NAME]`), as
    /// records, in the order they closed.
    Aggregate(AggregateSourceConfig),
    /// Messages of a RabbitMQ queue.
    Rabbitmq(RabbitmqSourceConfig),
    /// Messages of a NATS JetStream stream, through a durable consumer.
    Nats(NatsSourceConfig),
    /// Messages of Kafka topics, in a consumer group.
    Kafka(KafkaSourceConfig),
}

/// Default closed windows read per page.
pub const DEFAULT_WINDOWS_PAGE_SIZE: u32 = 1000;

/// A live aggregate's closed windows, read by cursor: every window once
/// when it closes, and again when a late change is counted against it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateSourceConfig {
    /// The aggregate (a name in `[aggregates]`).
    pub aggregate: String,
    /// Windows read per page (default 1000).
    #[serde(default = "default_windows_page_size")]
    pub page_size: u32,
}

fn default_windows_page_size() -> u32 {
    DEFAULT_WINDOWS_PAGE_SIZE
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
        match (self.dialect(), self) {
            (Some(d), _) => d.as_str(),
            (None, Self::Aggregate(_)) => "aggregate",
            (None, Self::Rabbitmq(_)) => "rabbitmq",
            (None, Self::Nats(_)) => "nats",
            (None, Self::Kafka(_)) => "kafka",
            (None, _) => "crawl",
        }
    }

    /// The database of a SQL source (`None` for a crawl).
    pub fn dialect(&self) -> Option<SqlDialect> {
        match self {
            Self::Postgres(_) => Some(SqlDialect::Postgres),
            Self::Mysql(_) => Some(SqlDialect::Mysql),
            Self::Sqlite(_) => Some(SqlDialect::Sqlite),
            _ => None,
        }
    }

    /// A broker source's `metadata_field`, if set.
    pub fn metadata_field(&self) -> Option<&str> {
        match self {
            Self::Rabbitmq(c) => c.metadata_field.as_deref(),
            Self::Nats(c) => c.metadata_field.as_deref(),
            Self::Kafka(c) => c.metadata_field.as_deref(),
            _ => None,
        }
    }

    /// Whether the source consumes a message broker (its position is the
    /// broker's: messages are acknowledged there, not checkpointed).
    pub fn is_broker(&self) -> bool {
        matches!(self, Self::Rabbitmq(_) | Self::Nats(_) | Self::Kafka(_))
    }

    /// The settings of a SQL source (`None` for a crawl).
    pub fn sql(&self) -> Option<&SqlSourceConfig> {
        match self {
            Self::Postgres(c) | Self::Mysql(c) | Self::Sqlite(c) => Some(c),
            _ => None,
        }
    }

    /// The settings of an aggregate source.
    pub fn aggregate(&self) -> Option<&AggregateSourceConfig> {
        match self {
            Self::Aggregate(c) => Some(c),
            _ => None,
        }
    }

    /// The settings of a crawl source.
    pub fn crawl(&self) -> Option<&CrawlSourceConfig> {
        match self {
            Self::Crawl(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the source streams changes from a database's log.
    pub fn is_cdc(&self) -> bool {
        self.sql().is_some_and(|s| s.mode == SqlMode::Cdc)
    }

    /// The same kind of source with other settings (a crawl stays as it is).
    pub fn with_sql(&self, sql: SqlSourceConfig) -> Self {
        match self {
            Self::Postgres(_) => Self::Postgres(sql),
            Self::Mysql(_) => Self::Mysql(sql),
            Self::Sqlite(_) => Self::Sqlite(sql),
            other => other.clone(),
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
    /// A report: run `query` once per logical date (a day), rendered with
    /// that date (`{{ date }}`, `{{ next_date }}`, `{{ day(-7) }}`), and
    /// write its rows to a `files` sink as that date's partitions.
    Query,
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

/// How an incremental source's first run reads its table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FirstLoadMode {
    /// Binary COPY in ctid ranges, in parallel, in physical order, up to
    /// the cursor's high-water mark (PostgreSQL tables).
    #[default]
    Copy,
    /// Page by cursor, in cursor order.
    Cursor,
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
    /// How a PostgreSQL `table` source's first run (no checkpoint yet)
    /// reads the table: `copy` (the default there) with parallel binary
    /// COPY in physical order up to the cursor's high-water mark, then by
    /// cursor; `cursor` in cursor order, like every later run. Other sources
    /// read by cursor.
    #[serde(default)]
    pub first_load: Option<FirstLoadMode>,
    /// TLS of a mysql source's connections, the cursor reads and the binary
    /// log reader alike: `{ mode, ca, cert, key }`. Unset: plain
    /// connections. Set: `mode` defaults to `verify_identity`, which checks
    /// the server's certificate against `ca` and its name against the url's
    /// host. PostgreSQL sources take libpq's `sslmode`, `sslrootcert`,
    /// `sslcert` and `sslkey` in their url instead.
    #[serde(default)]
    pub tls: Option<MysqlTls>,
}

/// TLS of a MySQL/MariaDB source, in the terms of the `mysql` client's
/// `--ssl-mode` (Debezium's `database.ssl.mode`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MysqlTls {
    /// How much of the server's certificate is checked (default
    /// `verify_identity`: its chain and its name).
    #[serde(default)]
    pub mode: MysqlTlsMode,
    /// A PEM file of the CA certificates that sign the server's certificate.
    /// Without it, only the public web roots built into caudal (Mozilla's
    /// list) are trusted; with it, those roots and these certificates.
    #[serde(default)]
    pub ca: Option<String>,
    /// A PEM file with the client certificate (and its chain) to present,
    /// for users created `REQUIRE X509` or `REQUIRE SUBJECT …`.
    #[serde(default)]
    pub cert: Option<String>,
    /// The client certificate's private key (PEM): `{ file = "PATH" }`, or
    /// `"${ENV_VAR}"` holding the key itself.
    #[serde(default)]
    pub key: Option<super::partner::SecretValue>,
}

/// How a MySQL/MariaDB connection uses TLS. The upper-case names of the
/// `mysql` client (`VERIFY_IDENTITY`, …) are accepted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MysqlTlsMode {
    /// Plain connections (the same as leaving `tls` unset).
    #[serde(alias = "DISABLED")]
    Disabled,
    /// Encrypted, without checking the certificate: safe against
    /// eavesdroppers, not against someone impersonating the server.
    #[serde(alias = "REQUIRED")]
    Required,
    /// Encrypted; the certificate must be signed by a trusted CA, whatever
    /// name it carries. Cursor reads only: the binary log reader checks
    /// names.
    #[serde(alias = "VERIFY_CA")]
    VerifyCa,
    /// Encrypted; the certificate must be signed by a trusted CA and name
    /// the url's host (a DNS name or IP address in its subjectAltName).
    #[default]
    #[serde(alias = "VERIFY_IDENTITY")]
    VerifyIdentity,
}

fn default_page_size() -> u32 {
    DEFAULT_PAGE_SIZE
}

pub(super) fn check_source(path: &FieldPath, source: &SourceConfig, out: &mut Vec<Problem>) {
    let (Some(sql), Some(dialect)) = (source.sql(), source.dialect()) else {
        if let Some(crawl) = source.crawl() {
            super::crawl::check_source(path, crawl, out);
        }
        if source.aggregate().is_some_and(|a| a.page_size == 0) {
            out.push(Problem::at(path.key("page_size"), "must be greater than 0"));
        }
        match source {
            SourceConfig::Rabbitmq(c) => super::brokers::check_rabbitmq_source(path, c, out),
            SourceConfig::Nats(c) => super::brokers::check_nats_source(path, c, out),
            SourceConfig::Kafka(c) => super::brokers::check_kafka_source(path, c, out),
            _ => {}
        }
        return;
    };
    if let Some(message) = missing_feature(dialect, sql) {
        out.push(Problem::at(path.key(message.0), message.1));
    }
    if let Some(message) = sql_url_problem(dialect, sql.url.expose()) {
        out.push(Problem::at(path.key("url"), message));
    }
    if sql.page_size == 0 {
        out.push(Problem::at(path.key("page_size"), "must be greater than 0"));
    }
    check_tls(path, dialect, sql, out);
    match sql.mode {
        SqlMode::Incremental => {
            check_incremental(path, sql, out);
            check_first_load(path, dialect, sql, out);
        }
        SqlMode::Cdc => check_cdc(path, dialect, sql, out),
        SqlMode::Query => check_query(path, sql, out),
    }
}

fn check_query(path: &FieldPath, sql: &SqlSourceConfig, out: &mut Vec<Problem>) {
    match &sql.query {
        None => out.push(Problem::at_key(
            path.clone(),
            "mode = \"query\" runs \"query\" for each date: set it, e.g. \
             \"select … where sold_at >= {{ date }} and sold_at < {{ next_date }}\"",
        )),
        Some(query) if query.trim().is_empty() => {
            out.push(Problem::at(path.key("query"), "must not be empty"));
        }
        Some(query) => {
            if let Err(why) =
                super::datasets::render_report_query(query, jiff::civil::date(2000, 1, 1))
            {
                out.push(Problem::at(path.key("query"), why));
            }
        }
    }
    for (field, set) in [
        ("table", sql.table.is_some()),
        ("tables", sql.tables.is_some()),
        ("slot", sql.slot.is_some()),
        ("publication", sql.publication.is_some()),
        ("heartbeat", sql.heartbeat.is_some()),
        ("server_id", sql.server_id.is_some()),
        ("cursor", !sql.cursor.is_empty()),
        ("lag", sql.lag.is_some()),
        ("columns", sql.columns.is_some()),
        ("first_load", sql.first_load.is_some()),
    ] {
        if set {
            out.push(Problem::at(
                path.key(field),
                format!("{field:?} does not apply to mode = \"query\", which reads the rows of `query` for one date"),
            ));
        }
    }
}

/// The field and the reason, when this build lacks the connector a
/// source needs (cargo features `mysql`, `postgres-cdc`).
fn missing_feature(dialect: SqlDialect, sql: &SqlSourceConfig) -> Option<(&'static str, String)> {
    match (dialect, sql.mode) {
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

/// The connection options of a SQL url that set TLS: a mysql source sets
/// TLS in `tls` (the binary log reader does not read them from the url).
const MYSQL_URL_TLS_OPTIONS: &[&str] = &[
    "sslmode", "ssl-mode", "sslca", "ssl-ca", "sslcert", "ssl-cert", "sslkey", "ssl-key",
];

/// The values libpq (CDC) and the SQL driver (cursor reads, the store)
/// both take for `sslmode`.
pub const POSTGRES_SSLMODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The `key=value` options of a url's query, in order.
fn url_options(url: &str) -> impl Iterator<Item = (&str, &str)> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query
        .split('&')
        .filter(|o| !o.is_empty())
        .map(|o| o.split_once('=').unwrap_or((o, "")))
}

/// `tls` of a mysql source, and TLS options in a url where caudal would
/// not honour them alike on every connection.
fn check_tls(path: &FieldPath, dialect: SqlDialect, sql: &SqlSourceConfig, out: &mut Vec<Problem>) {
    let url = sql.url.expose();
    match dialect {
        SqlDialect::Mysql => {
            for (name, _) in url_options(url) {
                if MYSQL_URL_TLS_OPTIONS.contains(&name.to_ascii_lowercase().as_str()) {
                    out.push(Problem::at(
                        path.key("url"),
                        format!(
                            "{name:?} in the url: a mysql source sets TLS with `tls = {{ mode = \
                             \"verify_identity\", ca = \"/path/ca.pem\" }}`, which the cursor \
                             reads and the binary log reader both use; remove it from the url"
                        ),
                    ));
                }
            }
        }
        SqlDialect::Postgres => {
            let options: Vec<_> = url_options(url).collect();
            let root_cert = options.iter().any(|(name, _)| *name == "sslrootcert");
            for (name, value) in &options {
                if *name == "sslmode" && !POSTGRES_SSLMODES.contains(value) {
                    out.push(Problem::at(
                        path.key("url"),
                        format!(
                            "sslmode={value:?} in the url: expected one of {}",
                            POSTGRES_SSLMODES.join(", ")
                        ),
                    ));
                }
                // libpq (CDC) then checks the certificate, the SQL driver
                // does not: the two would disagree.
                if *name == "sslmode" && *value == "require" && root_cert {
                    out.push(Problem::at(
                        path.key("url"),
                        "sslmode=require with sslrootcert: write sslmode=verify-full (or \
                         verify-ca) so that every connection of the source checks the \
                         certificate",
                    ));
                }
            }
            if sql.tls.is_some() {
                out.push(Problem::at(
                    path.key("tls"),
                    "`tls` is for mysql sources; a postgres source sets TLS in its url, e.g. \
                     ?sslmode=verify-full&sslrootcert=/etc/caudal/db-ca.pem",
                ));
            }
            return;
        }
        SqlDialect::Sqlite => {
            if sql.tls.is_some() {
                out.push(Problem::at(
                    path.key("tls"),
                    "`tls` is for mysql sources; a sqlite source reads a local file",
                ));
            }
            return;
        }
    }
    let Some(tls) = &sql.tls else { return };
    let at = path.key("tls");
    if tls.mode == MysqlTlsMode::Disabled {
        for (field, set) in [
            ("ca", tls.ca.is_some()),
            ("cert", tls.cert.is_some()),
            ("key", tls.key.is_some()),
        ] {
            if set {
                out.push(Problem::at(
                    at.key(field),
                    format!("{field:?} has no effect with mode = \"disabled\" (plain connections)"),
                ));
            }
        }
        return;
    }
    if tls.mode == MysqlTlsMode::Required && tls.ca.is_some() {
        out.push(Problem::at(
            at.key("ca"),
            "mode = \"required\" encrypts without checking the certificate; to check it \
             against ca, set mode = \"verify_identity\" (or \"verify_ca\")",
        ));
    }
    if tls.cert.is_some() != tls.key.is_some() {
        out.push(Problem::at(
            at.clone(),
            "a client certificate needs both cert and key",
        ));
    }
    if tls.mode == MysqlTlsMode::VerifyCa && sql.mode == SqlMode::Cdc {
        out.push(Problem::at(
            at.key("mode"),
            "the binary log reader cannot check a certificate without its name: use \
             \"verify_identity\" (connect to a host name or address the server's \
             certificate carries) or \"required\"",
        ));
    }
}

/// `first_load = "copy"` reads a PostgreSQL table by ctid.
fn check_first_load(
    path: &FieldPath,
    dialect: SqlDialect,
    sql: &SqlSourceConfig,
    out: &mut Vec<Problem>,
) {
    if sql.first_load == Some(FirstLoadMode::Copy)
        && (dialect != SqlDialect::Postgres || sql.table.is_none())
    {
        out.push(Problem::at(
            path.key("first_load"),
            "\"copy\" reads a PostgreSQL table by its physical pages; this source is not one \
             (remove `first_load`, or set it to \"cursor\")",
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
