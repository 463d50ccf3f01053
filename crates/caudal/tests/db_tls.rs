//! TLS to databases, end to end: the real `caudal` binary against a
//! MariaDB and a PostgreSQL of the test's own that accept TCP connections
//! over TLS only, each presenting a certificate for 127.0.0.1 signed by a
//! test CA (see `support::tls_servers`).
//!
//! What is pinned: rows flow from the TLS-only MariaDB with `tls = { ca }`
//! (certificate and name checked by default) by cursor and from its binary
//! log, with a client certificate for a user created `REQUIRE X509`; rows
//! flow from the TLS-only PostgreSQL with `sslmode=verify-full` by cursor
//! and by logical replication (libpq), with the state store on that server
//! under the same `sslmode`. A plain connection, a certificate from another
//! CA and a name the certificate does not carry are each refused, with an
//! error naming the source (or the store) and the reason; `verify_ca` /
//! `verify-ca` accept the same wrong name, as documented.

// The MariaDB tests need the `mysql` feature, the PostgreSQL replication
// test `postgres-cdc` (both in the default build); a lean build runs the
// rest, and their helpers are then unused.
#![cfg_attr(
    not(all(feature = "mysql", feature = "postgres-cdc")),
    allow(dead_code, unused_imports)
)]

mod support;

use std::path::{Path, PathBuf};

use caudal_testkit::Receiver;
use serde_json::Value;
use support::tls_servers::{TlsMariadb, TlsPostgres};
use support::{Output, command, tls};

/// Where the receiver finds the records of a batch.
const RECORDS: &str = "/records";

/// One test's certificates (a CA, a server certificate for 127.0.0.1, a
/// client certificate) and a second CA that signed none of them.
struct Certs {
    ours: tempfile::TempDir,
    other: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let ours = tempfile::tempdir().expect("a directory for certificates");
        let other = tempfile::tempdir().expect("a directory for certificates");
        tls::certificates(ours.path());
        tls::certificates(other.path());
        Self { ours, other }
    }

    fn dir(&self) -> &Path {
        self.ours.path()
    }

    fn ca(&self) -> String {
        self.file("ca.pem")
    }

    fn wrong_ca(&self) -> String {
        self.other.path().join("ca.pem").display().to_string()
    }

    fn file(&self, name: &str) -> String {
        self.ours.path().join(name).display().to_string()
    }
}

/// A state directory, a receiver and the config files of one test.
struct Run {
    dir: tempfile::TempDir,
    receiver: Receiver,
}

impl Run {
    async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a state directory"),
            receiver: Receiver::start().await,
        }
    }

    fn sqlite_state(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("state.db").display())
    }

    /// Writes a config with `state`, one source `db` (the lines of
    /// `source`) and a pipeline `pipeline` delivering to the receiver at
    /// `/<pipeline>`; returns its path.
    fn config(&self, file: &str, state: &str, source: &str, pipeline: &str) -> PathBuf {
        let text = format!(
            r#"[state]
url = "{state}"

[sources.db]
{source}

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 100, max_wait = "100ms" }}
delivery.retry = {{ max_attempts = 1 }}
body = '{{"records": {{{{ records | tojson }}}}}}'

[pipelines.{pipeline}]
source = "db"
sink = "recv"
{schedule}
"#,
            receiver = self.receiver.url(&format!("/{pipeline}")),
            // A CDC source captures continuously: no schedule.
            schedule = if source.contains("mode = \"cdc\"") {
                ""
            } else {
                "schedule = { every = \"1h\" }"
            },
        );
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).expect("write the config");
        path
    }

    async fn once(&self, config: &Path, pipeline: &str) -> Output {
        Output::of(command(config, self.dir.path(), &["once", pipeline])).await
    }

    /// `caudal once <pipeline>`, which must succeed.
    async fn once_ok(&self, config: &Path, pipeline: &str) {
        let out = self.once(config, pipeline).await;
        assert_eq!(out.code, Some(0), "caudal once {pipeline} failed: {out}");
    }

    /// `caudal once <pipeline>`, which must fail with every one of
    /// `expected` in its error output.
    async fn once_refused(&self, config: &Path, pipeline: &str, expected: &[&str]) {
        let out = self.once(config, pipeline).await;
        assert_ne!(out.code, Some(0), "caudal once {pipeline} succeeded: {out}");
        eprintln!("{}: {}", config.display(), out.stderr);
        for e in expected {
            assert!(out.stderr.contains(e), "{e:?} is not in the error: {out}");
        }
    }

    /// The records the receiver accepted at `/<pipeline>`, in order.
    fn records(&self, pipeline: &str) -> Vec<Value> {
        let prefix = format!("/{pipeline}");
        self.receiver
            .requests()
            .into_iter()
            .filter(|r| r.accepted() && r.path == prefix)
            .flat_map(|r| {
                r.json
                    .as_ref()
                    .and_then(|body| body.pointer(RECORDS).cloned())
                    .and_then(|records| records.as_array().cloned())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The `id` of each record (a row, or a change's row after the change).
fn ids(records: &[Value]) -> Vec<i64> {
    records
        .iter()
        .map(|r| {
            r.get("after")
                .unwrap_or(r)
                .get("id")
                .and_then(Value::as_i64)
                .unwrap_or_else(|| panic!("a record without an id: {r}"))
        })
        .collect()
}

/// The `op` of each change.
fn ops(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["op"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn mysql_incremental(url: &str, tls: &str) -> String {
    format!("type = \"mysql\"\nurl = \"{url}\"\ntable = \"orders\"\ncursor = [\"id\"]\n{tls}")
}

fn postgres_incremental(url: &str) -> String {
    format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"orders\"\ncursor = [\"id\"]")
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_requiring_tls_serves_cursor_reads_and_the_binary_log_over_checked_tls() {
    let certs = Certs::new();
    let db = TlsMariadb::start(certs.dir());
    db.sql(
        "CREATE DATABASE shop; \
         CREATE TABLE shop.orders (id BIGINT PRIMARY KEY, note VARCHAR(40)) ENGINE=InnoDB; \
         INSERT INTO shop.orders VALUES (1, 'one'), (2, 'two'), (3, 'three'); \
         CREATE USER certified@'%' IDENTIFIED BY 'tls-secret' REQUIRE X509; \
         GRANT ALL PRIVILEGES ON *.* TO certified@'%'",
    );
    let run = Run::new().await;
    // Cursor reads, with the default mode (verify_identity).
    let config = run.config(
        "incremental.toml",
        &run.sqlite_state(),
        &mysql_incremental(
            &db.url("127.0.0.1", "shop"),
            &format!("tls = {{ ca = \"{}\" }}", certs.ca()),
        ),
        "sync",
    );
    run.once_ok(&config, "sync").await;
    assert_eq!(ids(&run.records("sync")), [1, 2, 3]);

    // The binary log, as a user that must present a client certificate:
    // the snapshot and catalog queries and the replica connection alike.
    let url = db
        .url("127.0.0.1", "shop")
        .replace("mysql://caudal:", "mysql://certified:");
    let source = format!(
        r#"type = "mysql"
url = "{url}"
mode = "cdc"
tables = ["shop.orders"]
server_id = 4242
tls = {{ mode = "verify_identity", ca = "{ca}", cert = "{cert}", key = {{ file = "{key}" }} }}"#,
        ca = certs.ca(),
        cert = certs.file("client.pem"),
        key = certs.file("client.key"),
    );
    let config = run.config("cdc.toml", &run.sqlite_state(), &source, "cdc");
    run.once_ok(&config, "cdc").await;
    let snapshot = run.records("cdc");
    assert_eq!(ids(&snapshot), [1, 2, 3], "{snapshot:?}");
    db.sql(
        "INSERT INTO shop.orders VALUES (4, 'four'), (5, 'five'); \
         UPDATE shop.orders SET note = 'uno' WHERE id = 1",
    );
    run.once_ok(&config, "cdc").await;
    let changes = run.records("cdc")[snapshot.len()..].to_vec();
    assert_eq!(ops(&changes), ["insert", "insert", "update"], "{changes:?}");
    assert_eq!(ids(&changes), [4, 5, 1]);
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_connections_tls_would_not_trust_are_refused_naming_the_source() {
    let certs = Certs::new();
    let db = TlsMariadb::start(certs.dir());
    db.sql(
        "CREATE DATABASE shop; \
         CREATE TABLE shop.orders (id BIGINT PRIMARY KEY, note VARCHAR(40)) ENGINE=InnoDB; \
         INSERT INTO shop.orders VALUES (1, 'one'), (2, 'two')",
    );
    let run = Run::new().await;
    let state = run.sqlite_state();
    let attempt = |file: &str, host: &str, tls: String| {
        run.config(
            file,
            &state,
            &mysql_incremental(&db.url(host, "shop"), &tls),
            "sync",
        )
    };
    // Without `tls` the connection is plain, which the server refuses to
    // a user created REQUIRE SSL.
    let plain = attempt("plain.toml", "127.0.0.1", String::new());
    run.once_refused(
        &plain,
        "sync",
        &["source \"db\"", "Access denied for user 'caudal'"],
    )
    .await;
    // A certificate signed by a CA other than `ca`.
    let other_ca = attempt(
        "other-ca.toml",
        "127.0.0.1",
        format!("tls = {{ ca = \"{}\" }}", certs.wrong_ca()),
    );
    run.once_refused(
        &other_ca,
        "sync",
        &["source \"db\"", "invalid peer certificate"],
    )
    .await;
    // The certificate names 127.0.0.1, not localhost.
    let wrong_name = attempt(
        "wrong-name.toml",
        "localhost",
        format!("tls = {{ ca = \"{}\" }}", certs.ca()),
    );
    run.once_refused(
        &wrong_name,
        "sync",
        &["source \"db\"", "not valid for name \"localhost\""],
    )
    .await;
    assert!(run.records("sync").is_empty());
    // verify_ca checks the chain only; required checks nothing.
    let chain_only = attempt(
        "chain-only.toml",
        "localhost",
        format!("tls = {{ mode = \"verify_ca\", ca = \"{}\" }}", certs.ca()),
    );
    run.once_ok(&chain_only, "sync").await;
    assert_eq!(ids(&run.records("sync")), [1, 2]);
    db.sql("INSERT INTO shop.orders VALUES (3, 'three')");
    let unchecked = attempt(
        "unchecked.toml",
        "localhost",
        "tls = { mode = \"required\" }".into(),
    );
    run.once_ok(&unchecked, "sync").await;
    assert_eq!(ids(&run.records("sync")), [1, 2, 3]);
}

#[cfg(feature = "postgres-cdc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_verify_full_serves_cursor_reads_replication_and_the_store() {
    let certs = Certs::new();
    let pg = TlsPostgres::start(certs.dir());
    pg.psql("CREATE DATABASE shop");
    pg.psql("CREATE DATABASE caudal_state");
    pg.psql_in(
        "shop",
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text); \
         INSERT INTO orders VALUES (1, 'one'), (2, 'two'), (3, 'three')",
    );
    let verify = format!("sslmode=verify-full&sslrootcert={}", certs.ca());
    let state = pg.url("127.0.0.1", "caudal_state", &verify);
    let run = Run::new().await;
    let config = run.config(
        "incremental.toml",
        &state,
        &postgres_incremental(&pg.url("127.0.0.1", "shop", &verify)),
        "sync",
    );
    run.once_ok(&config, "sync").await;
    assert_eq!(ids(&run.records("sync")), [1, 2, 3]);
    // The store's tables and the run's checkpoint are on the TLS server.
    let checkpoints = pg.psql_in(
        "caudal_state",
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    );
    assert_ne!(checkpoints.trim(), "0", "no store tables: {}", pg.log());

    // Logical replication: the catalog and snapshot through the SQL
    // driver, the change stream through libpq, both under verify-full.
    let source = format!(
        "type = \"postgres\"\nurl = \"{}\"\nmode = \"cdc\"\ntables = [\"public.orders\"]",
        pg.url("127.0.0.1", "shop", &verify)
    );
    let config = run.config("cdc.toml", &state, &source, "cdc");
    run.once_ok(&config, "cdc").await;
    let snapshot = run.records("cdc");
    assert_eq!(ids(&snapshot), [1, 2, 3], "{snapshot:?}");
    pg.psql_in(
        "shop",
        "INSERT INTO orders VALUES (4, 'four'), (5, 'five'); \
         UPDATE orders SET note = 'uno' WHERE id = 1",
    );
    run.once_ok(&config, "cdc").await;
    let changes = run.records("cdc")[snapshot.len()..].to_vec();
    assert_eq!(ops(&changes), ["insert", "insert", "update"], "{changes:?}");
    assert_eq!(ids(&changes), [4, 5, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_verify_full_would_not_trust_are_refused_naming_the_source() {
    let certs = Certs::new();
    let pg = TlsPostgres::start(certs.dir());
    pg.psql("CREATE DATABASE shop");
    pg.psql_in(
        "shop",
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text); \
         INSERT INTO orders VALUES (1, 'one'), (2, 'two')",
    );
    let run = Run::new().await;
    let state = run.sqlite_state();
    let attempt = |file: &str, host: &str, options: String| {
        run.config(
            file,
            &state,
            &postgres_incremental(&pg.url(host, "shop", &options)),
            "sync",
        )
    };
    // The server takes TCP connections over TLS only.
    let plain = attempt("plain.toml", "127.0.0.1", "sslmode=disable".into());
    run.once_refused(&plain, "sync", &["source \"db\"", "no encryption"])
        .await;
    let other_ca = attempt(
        "other-ca.toml",
        "127.0.0.1",
        format!("sslmode=verify-full&sslrootcert={}", certs.wrong_ca()),
    );
    run.once_refused(
        &other_ca,
        "sync",
        &["source \"db\"", "invalid peer certificate"],
    )
    .await;
    let wrong_name = attempt(
        "wrong-name.toml",
        "localhost",
        format!("sslmode=verify-full&sslrootcert={}", certs.ca()),
    );
    run.once_refused(
        &wrong_name,
        "sync",
        &["source \"db\"", "not valid for name \"localhost\""],
    )
    .await;
    assert!(run.records("sync").is_empty());
    let chain_only = attempt(
        "chain-only.toml",
        "localhost",
        format!("sslmode=verify-ca&sslrootcert={}", certs.ca()),
    );
    run.once_ok(&chain_only, "sync").await;
    assert_eq!(ids(&run.records("sync")), [1, 2]);

    // The state store is checked the same way.
    pg.psql("CREATE DATABASE caudal_state");
    let store = pg.url(
        "127.0.0.1",
        "caudal_state",
        &format!("sslmode=verify-full&sslrootcert={}", certs.wrong_ca()),
    );
    let config = run.config(
        "store.toml",
        &store,
        &postgres_incremental(&pg.url(
            "127.0.0.1",
            "shop",
            &format!("sslmode=verify-full&sslrootcert={}", certs.ca()),
        )),
        "sync",
    );
    run.once_refused(
        &config,
        "sync",
        &[
            "connecting to PostgreSQL database `caudal_state`",
            "invalid peer certificate",
        ],
    )
    .await;
}
