//! A world for tests that drive the real `caudal` binary: a fresh source
//! database with a seed-001 `service_requests` table, an HTTP receiver on
//! loopback, a state directory, and the config file that ties them together.
//!
//! Every test builds its own world, so tests run in parallel. Processes are
//! started with `kill_on_drop`, so a failing test leaves no daemon behind.
//! Rows carry fixed 2025 timestamps, far older than the default 5s safety
//! lag, so every row is readable at once.

// Each test file uses a different part of this module.
#![allow(dead_code)]

pub mod browser;
pub mod cdc;
pub mod netns;
pub mod tls;
pub mod tls_servers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use caudal_testkit::{DbKind, Receiver, TestDb, pg_database, sqlite_database};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The pipeline every world's config defines.
pub const PIPELINE: &str = "requests_to_partner";
/// Where the receiver finds records in the seed-001 envelope.
pub const RECORDS: &str = "/requests";
/// How long a test waits for something that should happen in about a second.
/// Generous on purpose: the machine may be busy building or testing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// One test's world. See the module docs.
pub struct World {
    pub db: TestDb,
    pub receiver: Receiver,
    pub dir: tempfile::TempDir,
    /// `schedule = { every = ... }` of the pipeline.
    pub every: String,
    /// `batch.max_records` of the sink.
    pub max_records: usize,
    /// The pipeline's `ack` mode.
    pub ack: &'static str,
    /// Extra lines for the sink's table (TOML only).
    pub sink_extra: String,
    /// The sink's `retry` table (TOML only); by default one attempt, so a
    /// receiver that is down fails a run at once.
    pub retry: String,
}

impl World {
    /// A world with an empty `service_requests` table in a SQLite file.
    pub async fn sqlite() -> Self {
        Self::new(sqlite_database()).await
    }

    /// A world with an empty `service_requests` table in a fresh PostgreSQL
    /// database. Call [`World::cleanup`] at the end.
    pub async fn postgres() -> Self {
        Self::new(pg_database().await).await
    }

    async fn new(db: TestDb) -> Self {
        let world = Self {
            db,
            receiver: Receiver::start().await,
            dir: tempfile::tempdir().expect("a temporary state directory"),
            every: "1s".into(),
            max_records: 1000,
            ack: "buffered",
            sink_extra: String::new(),
            retry: "{ max_attempts = 1 }".into(),
        };
        world.exec(create_table_sql(world.db.kind())).await;
        world
    }

    /// Drops the source database (needed for PostgreSQL).
    pub async fn cleanup(self) {
        self.db.cleanup().await;
    }

    pub async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self.db.kind() {
            DbKind::Postgres => {
                let pool = self.db.pg_pool().await;
                sqlx::raw_sql(sql)
                    .execute(&pool)
                    .await
                    .expect("PostgreSQL statement");
                pool.close().await;
            }
            DbKind::Sqlite => {
                let pool = self.db.sqlite_pool().await;
                sqlx::raw_sql(sql)
                    .execute(&pool)
                    .await
                    .expect("SQLite statement");
                pool.close().await;
            }
            DbKind::MySql => unreachable!("these tests use SQLite and PostgreSQL sources"),
        }
    }

    /// Inserts rows `ids`, opened and last modified `minute` minutes after
    /// 2025-05-14 12:00 UTC, with status 1.
    pub async fn insert(&self, ids: impl IntoIterator<Item = i64>, minute: u32) {
        let t = ts(self.db.kind(), minute);
        let values: Vec<String> = ids
            .into_iter()
            .map(|id| format!("({id}, 'SRV-{id}', {t}, 1, {t})"))
            .collect();
        self.exec(&format!(
            "INSERT INTO service_requests \
             (request_id, service_id, opening_date, status_id, last_modified_date) VALUES {}",
            values.join(", ")
        ))
        .await;
    }

    /// Sets row `id`'s status, last modified at `minute`.
    pub async fn update(&self, id: i64, status: i32, minute: u32) {
        let t = ts(self.db.kind(), minute);
        self.exec(&format!(
            "UPDATE service_requests SET status_id = {status}, last_modified_date = {t} \
             WHERE request_id = {id}"
        ))
        .await;
    }

    /// The TOML configuration of this world (seed 001).
    pub fn config_toml(&self) -> String {
        format!(
            r#"[state]
url = "sqlite://{state}"

[sources.servicedesk]
type = "{source_type}"
url = "{source_url}"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]

[sinks.partner]
type = "http"
url = "{receiver}"
batch = {{ max_records = {max_records}, max_wait = "200ms" }}
delivery.retry = {retry}
timeout = "120s"
body = '{{"requests": {{{{ records | tojson }}}}}}'
{sink_extra}

[pipelines.{PIPELINE}]
source = "servicedesk"
sink = "partner"
schedule = {{ every = "{every}" }}
key = "request_id"
ack = "{ack}"
"#,
            ack = self.ack,
            sink_extra = self.sink_extra,
            retry = self.retry,
            state = self.state_db().display(),
            source_type = self.source_type(),
            source_url = self.db.url(),
            receiver = self.receiver.url("/services-data/requests"),
            max_records = self.max_records,
            every = self.every,
        )
    }

    /// The same configuration as [`World::config_toml`], in YAML.
    pub fn config_yaml(&self) -> String {
        format!(
            r#"state:
  url: sqlite://{state}

sources:
  servicedesk:
    type: {source_type}
    url: "{source_url}"
    table: service_requests
    cursor: [last_modified_date, request_id]

sinks:
  partner:
    type: http
    url: {receiver}
    batch: {{ max_records: {max_records}, max_wait: 200ms }}
    retry: {{ max_attempts: 1 }}
    timeout: 120s
    body: '{{"requests": {{{{ records | tojson }}}}}}'

pipelines:
  {PIPELINE}:
    source: servicedesk
    sink: partner
    schedule: {{ every: {every} }}
    key: request_id
    ack: {ack}
"#,
            ack = self.ack,
            state = self.state_db().display(),
            source_type = self.source_type(),
            source_url = self.db.url(),
            receiver = self.receiver.url("/services-data/requests"),
            max_records = self.max_records,
            every = self.every,
        )
    }

    fn source_type(&self) -> &'static str {
        match self.db.kind() {
            DbKind::Postgres => "postgres",
            DbKind::MySql => "mysql",
            DbKind::Sqlite => "sqlite",
        }
    }

    /// The buffer directory of [`PIPELINE`] (the default, next to the state).
    pub fn buffer_dir(&self) -> PathBuf {
        self.dir.path().join("caudal-buffer").join(PIPELINE)
    }

    pub fn state_db(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    /// Writes the TOML config (with the world's current settings) and
    /// returns its path.
    pub fn write_config(&self) -> PathBuf {
        self.write_file("caudal.toml", &self.config_toml())
    }

    /// Writes the YAML config and returns its path.
    pub fn write_yaml_config(&self) -> PathBuf {
        self.write_file("caudal.yaml", &self.config_yaml())
    }

    /// Replaces `name` in the state directory atomically (a running daemon
    /// may be reading it), and only when its content changes.
    fn write_file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == content) {
            return path;
        }
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {name}: {e}"));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("replace {name}: {e}"));
        path
    }

    /// `caudal --config <TOML config> <args>`, ready to run.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        command(&self.write_config(), self.dir.path(), args)
    }

    /// Runs `caudal <args>` with the TOML config to the end.
    pub async fn caudal(&self, args: &[&str]) -> Output {
        Output::of(self.command(args)).await
    }

    /// Runs `caudal <args>` with the given config file to the end.
    pub async fn caudal_with(&self, config: &Path, args: &[&str]) -> Output {
        Output::of(command(config, self.dir.path(), args)).await
    }

    /// `caudal status --json`, parsed; the entry of [`PIPELINE`].
    pub async fn status(&self) -> Value {
        let out = self.caudal(&["status", "--json"]).await;
        assert_eq!(out.code, Some(0), "status failed: {out}");
        let all: Value = serde_json::from_str(&out.stdout).expect("status --json prints JSON");
        all.as_array()
            .expect("status --json prints an array")
            .iter()
            .find(|p| p["pipeline"] == PIPELINE)
            .cloned()
            .unwrap_or_else(|| panic!("{PIPELINE} missing from status: {all}"))
    }

    /// Polls `caudal status --json` until `done` holds for the entry of
    /// [`PIPELINE`]; returns that entry. On timeout the failure names
    /// `what` and shows the daemon's log, if there is one.
    pub async fn wait_for_status(
        &self,
        daemon: Option<&Daemon>,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not reached after {PATIENCE:?}: {status}; log:\n{}",
                daemon.map(Daemon::log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `caudal status --json` until the last run's outcome is
    /// `outcome`; returns that status entry.
    pub async fn wait_for_outcome(&self, outcome: &str) -> Value {
        self.wait_for_status(None, &format!("outcome {outcome}"), |s| {
            s["outcome"] == outcome
        })
        .await
    }

    /// Starts `caudal run`, its stdout and stderr going to a log file in the
    /// state directory. `n` tells daemons of one test apart.
    pub fn start_daemon(&self, n: u32) -> Daemon {
        spawn_daemon(&self.write_config(), self.dir.path(), n)
    }

    /// Every record the receiver accepted (answered 2xx), in arrival order.
    pub fn delivered(&self) -> Vec<Value> {
        self.receiver.accepted_records_at(RECORDS)
    }

    /// How many times each request id was accepted.
    pub fn delivery_counts(&self) -> BTreeMap<i64, usize> {
        let mut counts = BTreeMap::new();
        for record in self.delivered() {
            *counts.entry(request_id(&record)).or_default() += 1;
        }
        counts
    }

    /// Waits until the receiver has accepted at least `n` records in all.
    pub async fn wait_for_delivered(&self, n: usize) {
        let arrived = self
            .receiver
            .wait_for_accepted_records(RECORDS, n, PATIENCE)
            .await;
        assert!(
            arrived,
            "expected {n} records within {PATIENCE:?}, the receiver accepted {}",
            self.delivered().len()
        );
    }
}

/// Starts `caudal --config <config> run` in `dir`, logging to
/// `dir/daemon-<n>.log`.
pub fn spawn_daemon(config: &Path, dir: &Path, n: u32) -> Daemon {
    spawn_daemon_in(config, dir, n, None)
}

/// [`spawn_daemon`], inside network namespace `netns` when given (`ip
/// netns exec` executes caudal in place: the child is caudal itself).
pub fn spawn_daemon_in(config: &Path, dir: &Path, n: u32, netns: Option<&str>) -> Daemon {
    let log = dir.join(format!("daemon-{n}.log"));
    let file = std::fs::File::create(&log).expect("create the daemon log");
    let mut cmd = match netns {
        None => command(config, dir, &["run"]),
        Some(ns) => {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_caudal")]);
            caudal_args(cmd, config, dir, &["run"])
        }
    };
    // For debugging a test: CAUDAL_TEST_DAEMON_LOG=caudal_connectors=debug.
    if let Ok(filter) = std::env::var("CAUDAL_TEST_DAEMON_LOG") {
        cmd.env("CAUDAL_LOG", format!("info,{filter}"));
    }
    cmd.stdout(Stdio::from(file.try_clone().expect("clone the log handle")))
        .stderr(Stdio::from(file));
    let child = cmd.spawn().expect("start caudal run");
    Daemon { child, log }
}

/// `caudal --config <config> <args>` with a clean environment: no config or
/// log settings inherited from the developer's shell, no colours in logs.
pub fn command(config: &Path, dir: &Path, args: &[&str]) -> tokio::process::Command {
    caudal_args(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_caudal")),
        config,
        dir,
        args,
    )
}

/// `cmd` (caudal, or a wrapper that executes it) given `--config <config>
/// <args>` and the clean environment of [`command`].
fn caudal_args(
    mut cmd: tokio::process::Command,
    config: &Path,
    dir: &Path,
    args: &[&str],
) -> tokio::process::Command {
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir)
        .env_remove("CAUDAL_CONFIG")
        .env_remove("CAUDAL_LOG")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The expected [`World::delivery_counts`] when each of `ids` arrived
/// `times` times.
pub fn each(ids: impl IntoIterator<Item = i64>, times: usize) -> BTreeMap<i64, usize> {
    ids.into_iter().map(|id| (id, times)).collect()
}

pub fn request_id(record: &Value) -> i64 {
    record["request_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("record without a numeric request_id: {record}"))
}

/// What a finished `caudal` command left behind.
#[derive(Debug)]
pub struct Output {
    /// The exit code; `None` if a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Runs `cmd` to the end (at most [`PATIENCE`]).
    pub async fn of(mut cmd: tokio::process::Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let output = tokio::time::timeout(PATIENCE, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("caudal did not finish within {PATIENCE:?}: {cmd:?}"))
            .expect("run caudal");
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout\n{}--- stderr\n{}---",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A running `caudal run`. Killed (SIGKILL) if dropped while still running.
pub struct Daemon {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        send_signal(&self.child, signal);
    }

    /// Sends `signal` and waits (at most [`PATIENCE`]) for the process to
    /// exit; returns how it exited and everything it logged.
    pub async fn stop(mut self, signal: Signal) -> (ExitStatus, String) {
        self.signal(signal);
        let status = match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status.expect("wait for caudal run"),
            Err(_) => panic!(
                "caudal run did not exit within {PATIENCE:?} of {signal}; log:\n{}",
                self.log()
            ),
        };
        (status, self.log())
    }

    /// Waits (at most [`PATIENCE`]) for the process to exit by itself;
    /// returns how it exited and everything it logged.
    pub async fn wait(mut self) -> (ExitStatus, String) {
        let status = match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status.expect("wait for caudal run"),
            Err(_) => panic!(
                "caudal run did not exit within {PATIENCE:?}; log:\n{}",
                self.log()
            ),
        };
        (status, self.log())
    }

    /// The process id (while it has not been waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends `signal` to a child process that has not been waited for yet.
pub fn send_signal(child: &tokio::process::Child, signal: Signal) {
    let pid = child.id().expect("the process has not been reaped yet");
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"));
    kill(pid, signal).unwrap_or_else(|e| panic!("cannot send {signal} to caudal: {e}"));
}

fn create_table_sql(kind: DbKind) -> &'static str {
    match kind {
        DbKind::Postgres => {
            "CREATE TABLE service_requests (
                request_id BIGINT PRIMARY KEY,
                service_id TEXT NOT NULL,
                opening_date TIMESTAMPTZ NOT NULL,
                status_id INT NOT NULL,
                last_modified_date TIMESTAMPTZ NOT NULL);
            CREATE INDEX ON service_requests (last_modified_date, request_id);"
        }
        DbKind::Sqlite => {
            "CREATE TABLE service_requests (
                request_id INTEGER PRIMARY KEY,
                service_id TEXT NOT NULL,
                opening_date TIMESTAMP NOT NULL,
                status_id INTEGER NOT NULL,
                last_modified_date TIMESTAMP NOT NULL);
            CREATE INDEX sync ON service_requests (last_modified_date, request_id);"
        }
        DbKind::MySql => unreachable!("these tests use SQLite and PostgreSQL sources"),
    }
}

/// A timestamp literal `minute` minutes after 2025-05-14 12:00:00 UTC, in
/// each database's stored layout.
fn ts(kind: DbKind, minute: u32) -> String {
    let (h, m) = (12 + minute / 60, minute % 60);
    match kind {
        DbKind::Postgres => format!("'2025-05-14 {h:02}:{m:02}:00+00'"),
        DbKind::Sqlite | DbKind::MySql => format!("'2025-05-14T{h:02}:{m:02}:00Z'"),
    }
}
