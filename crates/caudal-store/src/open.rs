//! Opening a store: choosing the backend from the url, connecting with the
//! settings each backend needs, and bringing the schema up to date.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use caudal_core::{Error, ErrorKind, Result};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgConnection};

use crate::{Pool, Store, store_error};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long an SQLite statement waits for another writer before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept for an SQLite file. SQLite has one writer at a time, so
/// more connections only help concurrent readers.
const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// Connections kept for a PostgreSQL store.
const POSTGRES_MAX_CONNECTIONS: u32 = 8;
/// How long a call waits for a free connection (or a new one) before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The url forms the store accepts, for error messages.
const ACCEPTED_URLS: &str =
    "sqlite://PATH, sqlite:PATH, sqlite::memory: or postgres://USER@HOST/DB";

impl Store {
    /// Connects to the store at `url` and applies any pending migrations.
    ///
    /// `url` is `sqlite://PATH` or `sqlite:PATH` (the file and its parent
    /// directories are created when missing), `sqlite::memory:` (a private
    /// database that lives as long as the store, for tests), or
    /// `postgres://…` / `postgresql://…`.
    pub async fn open(url: &str) -> Result<Store> {
        let url = url.trim();
        let store = if url.starts_with("sqlite:") {
            open_sqlite(url).await?
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            open_postgres(url).await?
        } else {
            // The url may hold a password: name only its scheme.
            let scheme = url.split_once(':').map_or("(none)", |(scheme, _)| scheme);
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "state store url has an unsupported scheme `{scheme}`; expected {ACCEPTED_URLS}"
                ),
            ));
        };
        tracing::debug!(backend = store.backend(), "state store opened");
        Ok(store)
    }
}

impl Store {
    /// Whether the store takes writes (`caudal doctor`), changing nothing:
    /// SQLite takes its write lock (`BEGIN IMMEDIATE`) and lets it go;
    /// PostgreSQL must not be a standby or read-only. Returns how many
    /// migrations the schema has applied (all of them, once opened).
    pub async fn probe_write(&self) -> Result<i64> {
        let applied = |e| store_error("counting the applied migrations".into(), e);
        match &self.pool {
            Pool::Sqlite(pool) => {
                let tx = pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(|e| store_error("taking the write lock".into(), e))?;
                tx.rollback()
                    .await
                    .map_err(|e| store_error("releasing the write lock".into(), e))?;
                sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                    .fetch_one(pool)
                    .await
                    .map_err(applied)
            }
            Pool::Postgres(pool) => {
                let (standby, read_only): (bool, String) = sqlx::query_as(
                    "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')",
                )
                .fetch_one(pool)
                .await
                .map_err(|e| store_error("reading the server's state".into(), e))?;
                if standby || read_only == "on" {
                    return Err(Error::new(
                        ErrorKind::Store,
                        "state store: the PostgreSQL server is read-only (a standby, or \
                         default_transaction_read_only = on)",
                    ));
                }
                sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                    .fetch_one(pool)
                    .await
                    .map_err(applied)
            }
        }
    }
}

async fn open_sqlite(url: &str) -> Result<Store> {
    let rest = url.strip_prefix("sqlite:").unwrap_or(url);
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path == ":memory:" || query.split('&').any(|pair| pair == "mode=memory");
    if path.is_empty() && !in_memory {
        return Err(Error::new(
            ErrorKind::Config,
            format!("state store url `{url}` names no file; expected {ACCEPTED_URLS}"),
        ));
    }
    let invalid_url = |e| {
        Error::with_source(
            ErrorKind::Config,
            format!("state store url `{url}` is invalid"),
            e,
        )
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(invalid_url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);

    if !in_memory {
        create_parent_dir(options.get_filename()).await?;
    }

    // An in-memory database vanishes with its last connection, and sharing it
    // between connections (SQLite's shared cache) locks whole tables; one
    // connection that is never recycled avoids both.
    let pool_options = if in_memory {
        SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        SqlitePoolOptions::new().max_connections(SQLITE_MAX_CONNECTIONS)
    };
    // Several processes creating the same file at once: switching a fresh
    // database to WAL can fail with SQLITE_BUSY without waiting for the
    // busy timeout, so opening is retried while that lasts.
    let started = std::time::Instant::now();
    let pool = loop {
        match pool_options
            .clone()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => break pool,
            Err(e) if is_busy(&e) && started.elapsed() < SQLITE_BUSY_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => {
                return Err(store_error(
                    format!("opening the SQLite database `{path}`"),
                    e,
                ));
            }
        }
    };

    // sqlx does not lock SQLite during migrations; one IMMEDIATE transaction
    // around them makes a second process wait for the first (busy_timeout)
    // and then find the schema already current. Each migration runs inside
    // it as a savepoint.
    let migrated = async {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        // `run_direct` is what `run` does once it holds a connection; `run`
        // itself makes this future not `Send` (its `Acquire` bound trips
        // rust-lang/rust#102211), and sqlx exposes `run_direct` for that.
        SQLITE_MIGRATIONS.run_direct(None, &mut *tx, false).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(())
    };
    migrated
        .await
        .map_err(|e| store_error(format!("migrating the SQLite database `{path}`"), e))?;

    Ok(Store {
        pool: Pool::Sqlite(pool),
    })
}

async fn open_postgres(url: &str) -> Result<Store> {
    // Messages here never repeat the url: it may hold a password.
    let options = PgConnectOptions::from_str(url).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            "state store url (postgres) is invalid",
            e,
        )
    })?;
    let database = options.get_database().unwrap_or("(default)").to_owned();
    let host = options.get_host().to_owned();
    let connecting = format!("connecting to PostgreSQL database `{database}` on `{host}`");

    // Migrations get a connection of their own, opened once: unlike the pool
    // (which retries until ACQUIRE_TIMEOUT), it reports an unreachable server
    // at once. The migrator holds an advisory lock while it runs, so
    // concurrent opens apply each migration once.
    let mut conn = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Store,
                format!("state store: {connecting} timed out after {ACQUIRE_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| store_error(connecting.clone(), e))?;
    // `run_direct` is what `run` does once it holds a connection; `run`
    // itself would make this future not `Send` (see `open_sqlite`).
    POSTGRES_MIGRATIONS
        .run_direct(None, &mut conn, false)
        .await
        .map_err(|e| {
            store_error(
                format!("migrating PostgreSQL database `{database}`"),
                e.into(),
            )
        })?;
    // Only a courtesy to the server: the connection is dropped either way.
    let _ = conn.close().await;

    let pool = PgPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| store_error(connecting, e))?;
    Ok(Store {
        pool: Pool::Postgres(pool),
    })
}

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock.
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| {
            let primary = code.parse::<i32>().map(|c| c & 0xff);
            matches!(primary, Ok(5 | 6))
        })
}

async fn create_parent_dir(file: &Path) -> Result<()> {
    let Some(dir) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    tokio::fs::create_dir_all(dir).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Store,
            format!("state store: creating directory `{}` failed", dir.display()),
            e,
        )
    })
}
