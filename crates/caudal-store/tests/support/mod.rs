//! Provisioning for the store tests: every test gets its own database, so
//! the suite runs in parallel and a failed test leaves nothing behind for the
//! next one. `backend_tests!` writes each test once and runs it against
//! SQLite and PostgreSQL.

use std::future::Future;

use caudal_store::Store;
use sqlx::{Connection, PgConnection};

/// The PostgreSQL server used when `CAUDAL_TEST_PG_URL` is not set.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What a test receives: the url of an empty database of its own.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub url: String,
    pub backend: Backend,
}

impl Ctx {
    /// Opens (and migrates) the test's database.
    pub async fn open(&self) -> Store {
        match Store::open(&self.url).await {
            Ok(store) => store,
            Err(e) => panic!("opening {}: {}", self.url, e.report()),
        }
    }
}

/// Generates, for each named `async fn(Ctx)`, one `#[tokio::test]` per
/// backend: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::support::run($crate::support::Backend::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::support::run($crate::support::Backend::Postgres, super::$name).await;
                }
            )*
        }
    };
}

/// Runs `test` against a fresh database of `backend`, then drops the
/// database, also when the test panics (the panic is re-raised afterwards).
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = TestDb::create(backend).await;
    let outcome = tokio::spawn(test(db.ctx.clone())).await;
    db.drop_database().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

struct TestDb {
    ctx: Ctx,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(tempfile::TempDir),
    Postgres { admin_url: String, database: String },
}

impl TestDb {
    async fn create(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("creating a temporary directory");
                let url = format!("sqlite://{}", dir.path().join("state.db").display());
                TestDb {
                    ctx: Ctx { url, backend },
                    cleanup: Cleanup::Sqlite(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = pg_base_url();
                let database = format!("caudal_store_{}", uuid::Uuid::now_v7().simple());
                let mut admin = pg_admin(&admin_url).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
                    .execute(&mut admin)
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE {database}: {e}"));
                let _ = admin.close().await;
                TestDb {
                    ctx: Ctx {
                        url: with_database(&admin_url, &database),
                        backend,
                    },
                    cleanup: Cleanup::Postgres {
                        admin_url,
                        database,
                    },
                }
            }
        }
    }

    async fn drop_database(self) {
        match self.cleanup {
            Cleanup::Sqlite(dir) => drop(dir),
            Cleanup::Postgres {
                admin_url,
                database,
            } => {
                let mut admin = pg_admin(&admin_url).await;
                // FORCE: the test may still hold pooled connections.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("DROP DATABASE {database}: {e}"));
                let _ = admin.close().await;
            }
        }
    }
}

fn pg_base_url() -> String {
    std::env::var("CAUDAL_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// A connection to the server's maintenance database. Fails the test (never
/// skips it) when PostgreSQL is not reachable.
async fn pg_admin(url: &str) -> PgConnection {
    match PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "cannot reach PostgreSQL for the caudal-store tests ({e}).\n\
             Run `scripts/test`, which installs and starts PostgreSQL, or set \
             CAUDAL_TEST_PG_URL to a server where this user may CREATE DATABASE \
             (default: {DEFAULT_PG_URL})."
        ),
    }
}

/// `url` with its database name replaced by `database`, keeping any query.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

#[test]
fn with_database_replaces_only_the_database() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    assert_eq!(
        with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
        "postgresql://u:p@h/x?sslmode=disable"
    );
}
