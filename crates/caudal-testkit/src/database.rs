//! One fresh database per test, so integration tests run in parallel against
//! the real servers.
//!
//! [`pg_database`] and [`mysql_database`] connect to a server as an admin,
//! create a database named `caudal_t_<random>` and hand back a [`TestDb`]
//! whose [`url`](TestDb::url) points at it. [`sqlite_database`] makes a file in
//! a fresh temporary directory. Dropping the [`TestDb`] drops the database
//! (best effort, never panicking); [`TestDb::cleanup`] does the same from async
//! code and reports failure.
//!
//! A server that cannot be reached is a failed test, not a skipped one: the
//! provisioning functions panic with the service, the URL and how to get a
//! server (`scripts/test` installs and starts PostgreSQL and MariaDB).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection};

/// Environment variable with the admin URL of the PostgreSQL server to create
/// test databases on.
pub const PG_URL_ENV: &str = "CAUDAL_TEST_PG_URL";
/// The PostgreSQL admin URL used when [`PG_URL_ENV`] is not set.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Environment variable with the admin URL of the MySQL/MariaDB server to
/// create test databases on.
pub const MYSQL_URL_ENV: &str = "CAUDAL_TEST_MYSQL_URL";
/// The MySQL/MariaDB admin URL used when [`MYSQL_URL_ENV`] is not set.
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/mysql";
/// Prefix of every database this module creates, so leftovers are easy to
/// recognise.
pub const DATABASE_PREFIX: &str = "caudal_t_";

/// How long to wait for an admin connection before calling the server
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long dropping a test database may take before it is left behind.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which database server a [`TestDb`] lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// An SQLite file.
    Sqlite,
}

impl DbKind {
    fn service(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::MySql => "MySQL/MariaDB",
            Self::Sqlite => "SQLite",
        }
    }

    /// The variable naming the admin URL (SQLite has no server and never
    /// asks).
    fn env_var(self) -> &'static str {
        match self {
            Self::Postgres => PG_URL_ENV,
            Self::MySql | Self::Sqlite => MYSQL_URL_ENV,
        }
    }
}

/// A database created for one test. Dropping it drops the database.
pub struct TestDb {
    kind: DbKind,
    name: String,
    url: String,
    /// Where the database was created from; empty for SQLite.
    admin_url: String,
    /// Holds the SQLite file; removed with it on drop.
    _sqlite_dir: Option<tempfile::TempDir>,
    sqlite_path: Option<PathBuf>,
    cleaned_up: bool,
}

/// Creates a fresh PostgreSQL database on the server at `$CAUDAL_TEST_PG_URL`
/// (default [`DEFAULT_PG_URL`]).
///
/// # Panics
///
/// When the server cannot be reached or the database cannot be created; the
/// message names the URL and how to get a server.
pub async fn pg_database() -> TestDb {
    let (url, source) = admin_url(DbKind::Postgres);
    create_on(DbKind::Postgres, &url, &source).await
}

/// Creates a fresh PostgreSQL database on the server at `admin_url`, for a
/// test that needs a server other than the configured one.
///
/// # Panics
///
/// As [`pg_database`].
pub async fn pg_database_at(admin_url: &str) -> TestDb {
    create_on(DbKind::Postgres, admin_url, "given by the test").await
}

/// Creates a fresh MySQL/MariaDB database on the server at
/// `$CAUDAL_TEST_MYSQL_URL` (default [`DEFAULT_MYSQL_URL`]).
///
/// # Panics
///
/// When the server cannot be reached or the database cannot be created; the
/// message names the URL and how to get a server.
pub async fn mysql_database() -> TestDb {
    let (url, source) = admin_url(DbKind::MySql);
    create_on(DbKind::MySql, &url, &source).await
}

/// Creates a fresh MySQL/MariaDB database on the server at `admin_url`, for a
/// test that needs a server other than the configured one.
///
/// # Panics
///
/// As [`mysql_database`].
pub async fn mysql_database_at(admin_url: &str) -> TestDb {
    create_on(DbKind::MySql, admin_url, "given by the test").await
}

/// Creates a database on a server; `source` says where `admin_url` came from,
/// for the panic message.
async fn create_on(kind: DbKind, admin_url: &str, source: &str) -> TestDb {
    let name = fresh_name();
    let created = match kind {
        DbKind::Postgres => {
            let mut conn: PgConnection = connect_admin(kind, admin_url, source).await;
            let created = sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await;
            // Closing politely is a nicety; the server cleans up either way.
            let _ = conn.close().await;
            created.map(drop)
        }
        DbKind::MySql => {
            let mut conn: MySqlConnection = connect_admin(kind, admin_url, source).await;
            let created = sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
            created.map(drop)
        }
        DbKind::Sqlite => return sqlite_database(),
    };
    if let Err(err) = created {
        panic!(
            "caudal-testkit: cannot create database {name} on {} at {}: {err}",
            kind.service(),
            redact(admin_url)
        );
    }
    TestDb::on_server(kind, admin_url.to_owned(), name)
}

/// Creates a fresh SQLite database file in a new temporary directory (the file
/// itself is created on first connect, as the URL carries `mode=rwc`).
///
/// # Panics
///
/// When no temporary directory can be created.
pub fn sqlite_database() -> TestDb {
    let name = fresh_name();
    let dir = tempfile::Builder::new()
        .prefix(DATABASE_PREFIX)
        .tempdir()
        .unwrap_or_else(|err| panic!("caudal-testkit: cannot create a temporary directory: {err}"));
    let path = dir.path().join(format!("{name}.db"));
    TestDb {
        kind: DbKind::Sqlite,
        url: format!("sqlite://{}?mode=rwc", path.display()),
        name,
        admin_url: String::new(),
        _sqlite_dir: Some(dir),
        sqlite_path: Some(path),
        cleaned_up: false,
    }
}

impl TestDb {
    fn on_server(kind: DbKind, admin_url: String, name: String) -> Self {
        Self {
            kind,
            url: with_database(&admin_url, &name),
            name,
            admin_url,
            _sqlite_dir: None,
            sqlite_path: None,
            cleaned_up: false,
        }
    }

    /// The URL to connect to this database, in the form sqlx and caudal's
    /// configuration accept (`postgres://…/caudal_t_…`, `mysql://…`,
    /// `sqlite:///tmp/…/caudal_t_….db?mode=rwc`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`caudal_t_<random>`; for SQLite the file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which server the database lives on.
    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// The SQLite file's path; `None` for server databases.
    pub fn sqlite_path(&self) -> Option<&Path> {
        self.sqlite_path.as_deref()
    }

    /// A connection pool to this PostgreSQL database.
    ///
    /// # Panics
    ///
    /// When this is not a PostgreSQL database or it cannot be connected to.
    pub async fn pg_pool(&self) -> sqlx::PgPool {
        self.expect_kind(DbKind::Postgres);
        sqlx::PgPool::connect(&self.url)
            .await
            .unwrap_or_else(|err| self.connect_panic(&err))
    }

    /// A connection pool to this MySQL/MariaDB database.
    ///
    /// # Panics
    ///
    /// When this is not a MySQL database or it cannot be connected to.
    pub async fn mysql_pool(&self) -> sqlx::MySqlPool {
        self.expect_kind(DbKind::MySql);
        sqlx::MySqlPool::connect(&self.url)
            .await
            .unwrap_or_else(|err| self.connect_panic(&err))
    }

    /// A connection pool to this SQLite database.
    ///
    /// # Panics
    ///
    /// When this is not an SQLite database or it cannot be opened.
    pub async fn sqlite_pool(&self) -> sqlx::SqlitePool {
        self.expect_kind(DbKind::Sqlite);
        sqlx::SqlitePool::connect(&self.url)
            .await
            .unwrap_or_else(|err| self.connect_panic(&err))
    }

    /// Drops the database now, closing any connections still open to it.
    ///
    /// # Panics
    ///
    /// When the database cannot be dropped.
    pub async fn cleanup(mut self) {
        self.cleaned_up = true;
        if let Err(err) = drop_database(self.kind, &self.admin_url, &self.name).await {
            panic!(
                "caudal-testkit: cannot drop test database {} on {}: {err}",
                self.name,
                self.kind.service()
            );
        }
        // SQLite: the temporary directory goes when `self` is dropped.
    }

    fn expect_kind(&self, kind: DbKind) {
        assert!(
            self.kind == kind,
            "caudal-testkit: {} is a {} database, not {}",
            self.name,
            self.kind.service(),
            kind.service()
        );
    }

    fn connect_panic(&self, err: &sqlx::Error) -> ! {
        panic!(
            "caudal-testkit: cannot connect to test database {}: {err}",
            redact(&self.url)
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned_up || self.kind == DbKind::Sqlite {
            return;
        }
        // Drop may run inside a runtime (which must not be blocked on) or
        // outside any: a short-lived thread with its own runtime works in both.
        let (kind, admin_url, name) = (self.kind, self.admin_url.clone(), self.name.clone());
        let cleanup = std::thread::Builder::new()
            .name(format!("drop {name}"))
            .spawn(move || -> Result<(), String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| err.to_string())?;
                runtime
                    .block_on(drop_database(kind, &admin_url, &name))
                    .map_err(|err| err.to_string())
            });
        let outcome = match cleanup {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the cleanup thread panicked".into())),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = outcome {
            eprintln!(
                "caudal-testkit: warning: test database {} on {} was left behind: {err}",
                self.name,
                self.kind.service()
            );
        }
    }
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

/// Why dropping a database failed.
#[derive(Debug)]
struct DropError(String);

impl fmt::Display for DropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<sqlx::Error> for DropError {
    fn from(err: sqlx::Error) -> Self {
        Self(err.to_string())
    }
}

/// Drops database `name`, first closing other sessions that use it.
async fn drop_database(kind: DbKind, admin_url: &str, name: &str) -> Result<(), DropError> {
    let work = async {
        match kind {
            DbKind::Postgres => {
                let mut conn = PgConnection::connect(admin_url).await?;
                drop_pg_replication_slots(&mut conn, name).await?;
                // FORCE (PostgreSQL 13+) terminates sessions still connected.
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                let _ = conn.close().await;
            }
            DbKind::MySql => {
                let mut conn = MySqlConnection::connect(admin_url).await?;
                // A session of the test holding a metadata lock would make
                // DROP wait; end such sessions, and never wait for long.
                sqlx::raw_sql("SET SESSION lock_wait_timeout = 10")
                    .execute(&mut conn)
                    .await?;
                let sessions: Vec<String> = sqlx::query_scalar(
                    "SELECT CAST(ID AS CHAR) FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> CONNECTION_ID()",
                )
                .bind(name)
                .fetch_all(&mut conn)
                .await?;
                for id in sessions.iter().filter_map(|id| id.parse::<u64>().ok()) {
                    // The session may have ended meanwhile.
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!("KILL {id}")))
                        .execute(&mut conn)
                        .await;
                }
                sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")))
                    .execute(&mut conn)
                    .await?;
                let _ = conn.close().await;
            }
            DbKind::Sqlite => {}
        }
        Ok::<(), DropError>(())
    };
    tokio::time::timeout(DROP_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(DropError(format!("timed out after {DROP_TIMEOUT:?}"))))
}

/// Drops the logical replication slots of database `name` (a CDC test's).
/// `DROP DATABASE` drops idle slots itself but fails while a slot is in use by
/// a stream, and a stream may reconnect after being terminated: so terminate
/// the sessions, drop the idle slots, and repeat until none is left.
async fn drop_pg_replication_slots(conn: &mut PgConnection, name: &str) -> Result<(), DropError> {
    const ATTEMPTS: u32 = 50;
    for _ in 0..ATTEMPTS {
        let slots: Vec<(String, bool)> = sqlx::query_as(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE database = $1",
        )
        .bind(name)
        .fetch_all(&mut *conn)
        .await?;
        if slots.is_empty() {
            return Ok(());
        }
        if slots.iter().any(|(_, active)| *active) {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .execute(&mut *conn)
            .await?;
        }
        for (slot, active) in &slots {
            if !active {
                // Another session may have dropped it meanwhile.
                let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(slot)
                    .execute(&mut *conn)
                    .await;
            }
        }
        // A terminated walsender releases its slot a moment later.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DropError(format!(
        "replication slots of {name} still in use after {ATTEMPTS} attempts"
    )))
}

/// The admin URL for `kind` and where it came from: the environment variable
/// when set and not empty, the default otherwise.
fn admin_url(kind: DbKind) -> (String, String) {
    let default = match kind {
        DbKind::Postgres => DEFAULT_PG_URL,
        DbKind::MySql | DbKind::Sqlite => DEFAULT_MYSQL_URL,
    };
    let env_var = kind.env_var();
    match std::env::var(env_var) {
        Ok(url) if !url.trim().is_empty() => (url, format!("from {env_var}")),
        _ => (
            default.to_owned(),
            format!("the default; {env_var} is not set"),
        ),
    }
}

/// Connects to the admin database, or panics with what to do about it.
async fn connect_admin<C: Connection>(kind: DbKind, url: &str, source: &str) -> C {
    let error = match tokio::time::timeout(CONNECT_TIMEOUT, C::connect(url)).await {
        Ok(Ok(conn)) => return conn,
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    panic!(
        "caudal-testkit: cannot reach {service} at {url} ({source}): {error}\n\
         Integration tests need a running {service}: run scripts/test (it installs and \
         starts PostgreSQL/MariaDB) or set {env_var} to a reachable server.",
        service = kind.service(),
        url = redact(url),
        env_var = kind.env_var(),
    )
}

/// A new database name: the prefix and 32 random hex digits, valid unquoted
/// on every server and well under the 63-character limit.
fn fresh_name() -> String {
    format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

/// `url` with its database (the path) replaced by `name`, query kept.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let authority = location.split('/').next().unwrap_or(location);
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    if scheme.is_empty() {
        format!("{authority}/{name}{query}")
    } else {
        format!("{scheme}://{authority}/{name}{query}")
    }
}

/// `url` with any password replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "caudal_t_x"),
            "postgres://postgres@127.0.0.1:5432/caudal_t_x"
        );
        assert_eq!(
            with_database("mysql://root:pw@db:3306/mysql?ssl-mode=disabled", "t"),
            "mysql://root:pw@db:3306/t?ssl-mode=disabled"
        );
        assert_eq!(
            with_database("postgres://localhost", "t"),
            "postgres://localhost/t"
        );
        assert_eq!(
            with_database("postgres://localhost?sslmode=disable", "t"),
            "postgres://localhost/t?sslmode=disable"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("mysql://root:secret@127.0.0.1:3306/mysql"),
            "mysql://root:***@127.0.0.1:3306/mysql"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/postgres"),
            "postgres://postgres@127.0.0.1/postgres"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn names_are_fresh_and_short() {
        let (a, b) = (fresh_name(), fresh_name());
        assert_ne!(a, b);
        assert!(a.starts_with(DATABASE_PREFIX));
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn sqlite_database_lives_in_its_own_directory() {
        let db = sqlite_database();
        let path = db.sqlite_path().expect("sqlite path").to_owned();
        let dir = path.parent().expect("parent").to_owned();
        assert!(dir.is_dir());
        assert!(db.url().starts_with("sqlite:///"));
        assert!(db.url().ends_with("?mode=rwc"));
        drop(db);
        assert!(!dir.exists());
    }
}
