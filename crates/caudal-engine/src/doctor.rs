//! `caudal doctor`: whether a configuration can run here, checked piece by
//! piece (the state store, the buffers' disk, every source and sink), with
//! what to change for each problem.
//!
//! Promises:
//! - **No data moves.** Sources run their query with `LIMIT 0` and read
//!   the catalog; CDC sources create no slot and no publication; sinks
//!   send no record: an HTTP sink gets a `HEAD` request without
//!   credentials, an OAuth2 token endpoint is asked for a token (kept
//!   nowhere), brokers are connected to and their exchange or stream
//!   looked up, a `files` dataset gets a probe object written and deleted.
//!   Opening the state store applies its pending migrations, as every
//!   command does.
//! - **It never hangs.** Every step that talks to a server is bounded by
//!   [`Options::timeout`]; a server that does not answer is a failure
//!   that says so.
//! - **Every problem says what to change.** A check that is not ok carries
//!   a `fix`, and no check prints a secret (URLs are redacted).
//! - The checks are the connectors' own ([`caudal_core::probe`]): the same
//!   prerequisites a run enforces, so doctor and a run agree.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caudal_core::config::{Config, SinkConfig, SourceConfig, SqlMode};
use caudal_core::probe::{Finding, Status};
use caudal_core::{Error, ErrorKind};
use serde::Serialize;

/// Default time a check may take before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How doctor runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The longest one step (a connection, a query, a request) may take.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One check of one subject.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked: `store`, `buffer_dir`, `source NAME`, `sink NAME`.
    pub subject: String,
    /// Which aspect of it (`connect`, `read`, `wal_level`, `auth`, …).
    pub check: String,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to change (set whenever the status is warn or fail).
    pub fix: Option<String>,
}

/// How many checks ended in each status.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
    pub skipped: usize,
}

/// Every check, in a stable order: store, buffers, sources, sinks (each by
/// name).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub summary: Summary,
}

impl Report {
    fn new(checks: Vec<Check>) -> Self {
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Ok => summary.ok += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skipped => summary.skipped += 1,
            }
        }
        Self { checks, summary }
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.summary.fail > 0
    }

    /// Whether any check warned.
    pub fn warned(&self) -> bool {
        self.summary.warn > 0
    }
}

/// Checks everything `config` needs, concurrently, each step within
/// `options.timeout`.
pub async fn run(config: &Config, options: Options) -> Report {
    let mut subjects: Vec<std::pin::Pin<Box<dyn Future<Output = Vec<Check>> + Send + '_>>> = vec![
        Box::pin(subject("store", store(config, options))),
        Box::pin(subject("buffer_dir", buffer_dir(config))),
    ];
    for (name, source) in &config.sources {
        subjects.push(Box::pin(subject(
            format!("source {name}"),
            probe_source(config, name, source, options),
        )));
    }
    for (name, sink) in &config.sinks {
        subjects.push(Box::pin(subject(
            format!("sink {name}"),
            probe_sink(config, name, sink, options),
        )));
    }
    let checks = futures::future::join_all(subjects)
        .await
        .into_iter()
        .flatten()
        .collect();
    Report::new(checks)
}

/// The findings of one subject as checks.
async fn subject(
    name: impl Into<String>,
    findings: impl Future<Output = Vec<Finding>>,
) -> Vec<Check> {
    let name = name.into();
    let bare = name.split_once(' ').map_or(name.as_str(), |(_, n)| n);
    let prefixes = [format!("source {bare:?}: "), format!("sink {bare:?}: ")];
    findings
        .await
        .into_iter()
        .map(|f| {
            // The subject already names the source or sink.
            let mut found = f.found;
            for p in &prefixes {
                found = found.replace(p.as_str(), "");
            }
            Check {
                subject: name.clone(),
                check: f.check,
                status: f.status,
                found,
                fix: f.fix,
            }
        })
        .collect()
}

/// `step` within `timeout`; a step that takes longer is a failed `check`.
async fn within<T>(
    timeout: Duration,
    check: &str,
    step: impl Future<Output = T>,
) -> Result<T, Finding> {
    tokio::time::timeout(timeout, step).await.map_err(|_| {
        Finding::fail(
            check,
            format!("no answer within {}s", timeout.as_secs_f64()),
            "check that the host is reachable from here (address, port, firewall) and not \
             overloaded; `--timeout` waits longer",
        )
    })
}

/// A failed connection as a finding, with what to check for its kind.
fn connect_failure(e: &Error) -> Finding {
    let fix = match e.kind() {
        ErrorKind::Connect | ErrorKind::Timeout => {
            "check the url's host and port, that the server runs, and firewalls between here \
             and it"
        }
        ErrorKind::Config => "correct the url",
        _ => "check the url's user, password and database, and that the user may log in",
    };
    Finding::fail("connect", e.report(), fix)
}

async fn store(config: &Config, options: Options) -> Vec<Finding> {
    // A SQLite store not made yet is not made by a check: say whether the
    // first run can make it.
    if let Some(file) = caudal_core::config::sqlite_state_file(config.state.url.expose()) {
        let file = Path::new(file);
        if !file.exists() {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let (finding, _) = writable(dir);
            return vec![if finding.failed() {
                Finding::fail(
                    "open",
                    format!(
                        "{} does not exist yet, and {} cannot be written: the first run \
                         cannot create it",
                        file.display(),
                        dir.display()
                    ),
                    "make the store's directory writable by caudal's user, or correct \
                     state.url",
                )
            } else {
                Finding::ok(
                    "open",
                    format!(
                        "{} does not exist yet; the first run creates it in {}",
                        file.display(),
                        dir.display()
                    ),
                )
            }];
        }
    }
    let opened = match within(
        options.timeout,
        "open",
        caudal_store::Store::open(config.state.url.expose()),
    )
    .await
    {
        Err(f) => return vec![f],
        Ok(Err(e)) => {
            return vec![Finding::fail(
                "open",
                e.report(),
                "correct state.url, or make the store reachable (and its file's directory \
                 writable)",
            )];
        }
        Ok(Ok(store)) => store,
    };
    let backend = opened.backend();
    let mut out = vec![Finding::ok(
        "open",
        format!("{backend} store opened, schema up to date"),
    )];
    out.push(
        match within(options.timeout, "write", opened.probe_write()).await {
            Err(f) => f,
            Ok(Ok(n)) => Finding::ok("write", format!("writable ({n} migrations applied)")),
            Ok(Err(e)) => Finding::fail(
                "write",
                e.report(),
                "give caudal's user write access to the store (the SQLite file and its \
                 directory, or a PostgreSQL primary)",
            ),
        },
    );
    opened.close().await;
    out
}

/// The buffers' directory: writable (or creatable), and room on its
/// filesystem for every pipeline's `buffer.max_bytes`.
async fn buffer_dir(config: &Config) -> Vec<Finding> {
    // Report pipelines write datasets, not buffers.
    let buffered: Vec<(&String, u64)> = config
        .pipelines
        .iter()
        .filter(|(name, _)| !crate::report::is_report(config, name))
        .map(|(name, p)| (name, p.buffer.max_bytes.0))
        .collect();
    if buffered.is_empty() {
        return vec![Finding::skipped("space", "no pipeline keeps a buffer")];
    }
    let root = config
        .buffer_dir(buffered[0].0)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let max_total: u64 = buffered.iter().map(|(_, b)| *b).sum();
    let root_for_task = root.clone();
    let inspected = tokio::task::spawn_blocking(move || inspect_dir(&root_for_task)).await;
    let (writable, space, held) = match inspected {
        Ok(r) => r,
        Err(e) => {
            return vec![Finding::fail(
                "write",
                format!("the check of {} failed: {e}", root.display()),
                "run doctor again",
            )];
        }
    };
    let mut out = vec![writable];
    out.push(match space {
        Err(e) => Finding::fail(
            "space",
            format!("cannot read the free space of {}: {e}", root.display()),
            "check that the directory (or its parent) exists and is readable",
        ),
        Ok(space) => match crate::buffered::check_space(max_total, held, space) {
            Some(warning) => Finding::warn(
                "space",
                format!(
                    "{} pipeline buffer(s) may hold {max_total} bytes in {}: {warning}",
                    buffered.len(),
                    root.display()
                ),
                "lower buffer.max_bytes of the pipelines, free space on that filesystem, or \
                 move state.buffer_dir to a larger one",
            ),
            None => Finding::ok(
                "space",
                format!(
                    "{} free of {} bytes in {}; {} pipeline buffer(s) may hold {max_total} bytes",
                    space.free_bytes,
                    space.total_bytes,
                    root.display(),
                    buffered.len()
                ),
            ),
        },
    });
    out
}

/// Whether `dir` (or, while it does not exist, the nearest existing
/// parent, where it would be created) takes a file; the free space there;
/// the bytes buffers already hold in `dir`.
fn inspect_dir(dir: &Path) -> (Finding, std::io::Result<caudal_buffer::Space>, u64) {
    let (writable, existing) = writable(dir);
    let space = caudal_buffer::space(&existing).map_err(|e| std::io::Error::other(e.to_string()));
    (writable, space, dir_bytes(dir))
}

/// Whether `dir` (or, while it does not exist, the nearest existing
/// parent) takes a file; and that existing directory.
fn writable(dir: &Path) -> (Finding, PathBuf) {
    let existing = dir
        .ancestors()
        .find(|d| d.as_os_str().is_empty() || d.exists())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let existing = if existing.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        existing
    };
    let probe = existing.join(format!(".caudal-doctor-{}", std::process::id()));
    let writable = match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            if existing == dir {
                Finding::ok("write", format!("{} is writable", dir.display()))
            } else {
                Finding::ok(
                    "write",
                    format!(
                        "{} does not exist yet; {} is writable, so the first run creates it",
                        dir.display(),
                        existing.display()
                    ),
                )
            }
        }
        Err(e) => Finding::fail(
            "write",
            format!("cannot create a file in {}: {e}", existing.display()),
            format!(
                "make {} writable by the user caudal runs as, or set state.buffer_dir elsewhere",
                existing.display()
            ),
        ),
    };
    (writable, existing)
}

/// The bytes of the files under `dir` (0 when it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The pipelines reading each source, by source name.
fn readers(config: &Config) -> BTreeMap<&str, Vec<&str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, p) in &config.pipelines {
        out.entry(p.source.as_str()).or_default().push(name);
    }
    out
}

async fn probe_source(
    config: &Config,
    name: &str,
    source: &SourceConfig,
    options: Options,
) -> Vec<Finding> {
    let sql = match source {
        SourceConfig::Postgres(sql) | SourceConfig::Mysql(sql) | SourceConfig::Sqlite(sql) => sql,
        SourceConfig::Crawl(crawl) => {
            return caudal_connectors::crawl::probe::probe(&config.crawl, crawl, options.timeout)
                .await;
        }
        SourceConfig::Aggregate(a) => return probe_aggregate(config, &a.aggregate),
        SourceConfig::Rabbitmq(_) | SourceConfig::Nats(_) | SourceConfig::Kafka(_) => {
            let pipeline = readers(config)
                .get(name)
                .and_then(|p| p.first().copied())
                .unwrap_or(name)
                .to_string();
            return match caudal_connectors::sources::broker::BrokerSource::new(
                &pipeline, name, source,
            ) {
                Err(e) => vec![Finding::fail(
                    "config",
                    e.report(),
                    "build caudal with the broker's feature, or correct the source",
                )],
                Ok(b) => b.probe(options.timeout).await,
            };
        }
    };
    match sql.mode {
        SqlMode::Incremental | SqlMode::Query => {
            let connected = within(
                options.timeout,
                "connect",
                caudal_connectors::sources::sql::SqlSource::connect(name, source),
            )
            .await;
            let sql_source = match connected {
                Err(f) => return vec![f],
                Ok(Err(e)) => return vec![connect_failure(&e)],
                Ok(Ok(s)) => s,
            };
            let connect = Finding::ok(
                "connect",
                format!(
                    "connected to {}",
                    caudal_core::units::redact_url(sql.url.expose())
                ),
            );
            let read = if sql.mode == SqlMode::Query {
                Finding::skipped(
                    "read",
                    "a report's query is rendered per date; `caudal once PIPELINE --date D` \
                     runs one",
                )
            } else {
                within(options.timeout, "read", sql_source.probe())
                    .await
                    .unwrap_or_else(|f| f)
            };
            vec![connect, read]
        }
        SqlMode::Cdc => {
            let readers = readers(config);
            let Some(pipeline) = readers.get(name).and_then(|p| p.first()) else {
                return vec![Finding::skipped(
                    "probe",
                    "no pipeline reads this CDC source (its slot is named after the pipeline)",
                )];
            };
            probe_cdc(pipeline, name, source, options).await
        }
    }
}

/// An aggregate source reads closed windows from the state store (checked
/// under `store`); what is left to say is what feeds the aggregate.
fn probe_aggregate(config: &Config, aggregate: &str) -> Vec<Finding> {
    let fed_by = config
        .aggregates
        .get(aggregate)
        .map(|a| a.pipeline.as_str());
    vec![match fed_by {
        Some(pipeline) => Finding::ok(
            "windows",
            format!(
                "reads aggregate {aggregate:?}'s closed windows from the state store; \
                 pipeline {pipeline:?} feeds it"
            ),
        ),
        None => Finding::fail(
            "windows",
            format!("aggregate {aggregate:?} is not in `[aggregates]`"),
            "name an aggregate of `[aggregates]` (`caudal validate` lists every problem)",
        ),
    }]
}

/// A CDC source's probe, as the pipeline `pipeline` would read it.
async fn probe_cdc(
    pipeline: &str,
    name: &str,
    source: &SourceConfig,
    options: Options,
) -> Vec<Finding> {
    let Some(sql) = source.sql() else {
        return Vec::new();
    };
    let redacted = caudal_core::units::redact_url(sql.url.expose());
    let connected = |r: Result<(), Error>| match r {
        Ok(()) => Finding::ok("connect", format!("connected to {redacted}")),
        Err(e) => connect_failure(&e),
    };
    match source {
        #[cfg(feature = "postgres-cdc")]
        SourceConfig::Postgres(sql) => {
            use caudal_connectors::sources::postgres_cdc::PgCdcSource;
            match within(
                options.timeout,
                "connect",
                PgCdcSource::connect(pipeline, name, sql),
            )
            .await
            {
                Err(f) => vec![f],
                Ok(Err(e)) => vec![connected(Err(e))],
                Ok(Ok(s)) => {
                    let mut out = vec![connected(Ok(()))];
                    out.extend(
                        within(options.timeout, "prerequisites", s.probe())
                            .await
                            .unwrap_or_else(|f| vec![f]),
                    );
                    out
                }
            }
        }
        #[cfg(feature = "mysql")]
        SourceConfig::Mysql(sql) => {
            use caudal_connectors::sources::mysql_cdc::MyCdcSource;
            match within(
                options.timeout,
                "connect",
                MyCdcSource::connect(pipeline, name, sql),
            )
            .await
            {
                Err(f) => vec![f],
                Ok(Err(e)) => vec![connected(Err(e))],
                Ok(Ok(s)) => {
                    let mut out = vec![connected(Ok(()))];
                    out.extend(
                        within(options.timeout, "prerequisites", s.probe())
                            .await
                            .unwrap_or_else(|f| vec![f]),
                    );
                    out
                }
            }
        }
        other => {
            let _ = (pipeline, name, options, connected);
            vec![Finding::skipped(
                "probe",
                format!(
                    "this caudal was built without {} change data capture",
                    other.type_name()
                ),
            )]
        }
    }
}

async fn probe_sink(
    config: &Config,
    name: &str,
    sink: &SinkConfig,
    options: Options,
) -> Vec<Finding> {
    let invalid = |e: Error| {
        vec![Finding::fail(
            "config",
            e.report(),
            "correct the sink's settings (`caudal validate` lists every problem)",
        )]
    };
    let bounded = |check: &'static str, found: Result<Vec<Finding>, Finding>| {
        let _ = check;
        found.unwrap_or_else(|f| vec![f])
    };
    match sink {
        SinkConfig::Http(c) => match caudal_connectors::sinks::http::HttpSink::new(name, c) {
            Err(e) => invalid(e),
            Ok(s) => bounded("reach", within(options.timeout, "reach", s.probe()).await),
        },
        #[cfg(feature = "rabbitmq")]
        SinkConfig::Rabbitmq(c) => {
            match caudal_connectors::sinks::rabbitmq::RabbitmqSink::new(name, c) {
                Err(e) => invalid(e),
                Ok(s) => bounded(
                    "connect",
                    within(options.timeout, "connect", s.probe()).await,
                ),
            }
        }
        #[cfg(feature = "nats")]
        SinkConfig::Nats(c) => match caudal_connectors::sinks::nats::NatsSink::new(name, c) {
            Err(e) => invalid(e),
            Ok(s) => bounded(
                "connect",
                within(options.timeout, "connect", s.probe()).await,
            ),
        },
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(c) => match caudal_connectors::sinks::kafka::KafkaSink::new(name, c) {
            Err(e) => invalid(e),
            Ok(s) => s.probe(options.timeout).await,
        },
        SinkConfig::Files(c) => {
            match caudal_connectors::sinks::files::Location::open(c, &config.config_dir()) {
                Err(e) => vec![Finding::fail(
                    "write",
                    e.report(),
                    "correct the sink's url, or make its directory creatable",
                )],
                Ok(location) => vec![
                    within(options.timeout, "write", location.probe())
                        .await
                        .unwrap_or_else(|f| f),
                ],
            }
        }
        // Reached only in a build without a broker feature, whose sinks
        // cannot be built either.
        #[allow(unreachable_patterns)]
        other => vec![Finding::skipped(
            "probe",
            format!(
                "{} sinks are not in this build of caudal",
                other.type_name()
            ),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_counts_every_status() {
        let check = |status| Check {
            subject: "store".into(),
            check: "open".into(),
            status,
            found: String::new(),
            fix: None,
        };
        let report = Report::new(vec![
            check(Status::Ok),
            check(Status::Warn),
            check(Status::Fail),
            check(Status::Skipped),
            check(Status::Ok),
        ]);
        assert_eq!(report.summary.ok, 2);
        assert!(report.failed() && report.warned());
        let ok = Report::new(vec![check(Status::Ok)]);
        assert!(!ok.failed() && !ok.warned());
    }

    #[tokio::test]
    async fn a_step_that_does_not_answer_fails_within_the_timeout() {
        let started = std::time::Instant::now();
        let found = within(
            Duration::from_millis(50),
            "connect",
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(found.status, Status::Fail);
        assert!(found.found.contains("no answer"), "{}", found.found);
        assert!(found.fix.is_some());
    }

    #[tokio::test]
    async fn buffers_are_checked_for_room_and_writability() {
        let dir = tempfile::tempdir().unwrap();
        let config = caudal_core::config::load_str(
            &format!(
                "[state]\nurl = \"sqlite::memory:\"\nbuffer_dir = {:?}\n\
                 [sources.s]\ntype = \"sqlite\"\nurl = \"sqlite:x.db\"\ntable = \"t\"\ncursor = [\"id\"]\n\
                 [sinks.k]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/\"\n\
                 [pipelines.p]\nsource = \"s\"\nsink = \"k\"\nschedule = {{ every = \"1h\" }}\n\
                 buffer = {{ max_bytes = \"1000000000GiB\" }}\n",
                dir.path().join("buffers").display().to_string()
            ),
            caudal_core::config::Format::Toml,
            "caudal.toml",
            &|_| None,
        )
        .unwrap();
        let found = buffer_dir(&config).await;
        assert_eq!(found[0].status, Status::Ok, "{found:?}");
        assert!(found[0].found.contains("does not exist yet"), "{found:?}");
        assert_eq!(found[1].status, Status::Warn, "{found:?}");
        assert!(found[1].fix.is_some());
    }
}
