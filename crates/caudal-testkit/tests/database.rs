//! Provisioning against the real PostgreSQL and MariaDB servers.

use caudal_testkit::{DbKind, mysql_database, pg_database, sqlite_database};
use sqlx::Connection;

async fn pg_exists(name: &str) -> bool {
    let mut admin = sqlx::PgConnection::connect(&admin_pg_url())
        .await
        .expect("admin");
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .expect("query")
}

async fn mysql_exists(name: &str) -> bool {
    let mut admin = sqlx::MySqlConnection::connect(&admin_mysql_url())
        .await
        .expect("admin");
    let found: Option<String> = sqlx::query_scalar(
        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(name)
    .fetch_optional(&mut admin)
    .await
    .expect("query");
    found.is_some()
}

fn admin_pg_url() -> String {
    std::env::var(caudal_testkit::database::PG_URL_ENV)
        .unwrap_or_else(|_| caudal_testkit::database::DEFAULT_PG_URL.into())
}

fn admin_mysql_url() -> String {
    std::env::var(caudal_testkit::database::MYSQL_URL_ENV)
        .unwrap_or_else(|_| caudal_testkit::database::DEFAULT_MYSQL_URL.into())
}

#[tokio::test]
async fn pg_database_is_created_usable_and_dropped() {
    let db = pg_database().await;
    assert_eq!(db.kind(), DbKind::Postgres);
    let name = db.name().to_owned();
    assert!(db.url().ends_with(&format!("/{name}")));
    assert!(pg_exists(&name).await);

    let pool = db.pg_pool().await;
    sqlx::raw_sql("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2)")
        .execute(&pool)
        .await
        .expect("seed");
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(current, name);

    // The pool is still open: cleanup must close its sessions itself.
    db.cleanup().await;
    assert!(!pg_exists(&name).await);
    drop(pool);
}

#[tokio::test]
async fn pg_database_is_dropped_on_drop() {
    let db = pg_database().await;
    let name = db.name().to_owned();
    let _session = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    drop(db);
    assert!(!pg_exists(&name).await);
}

/// A CDC stream still open on the database keeps its slot active, which makes
/// a plain `DROP DATABASE ... WITH (FORCE)` fail.
#[tokio::test]
async fn pg_database_with_an_active_replication_slot_is_dropped() {
    let db = pg_database().await;
    let name = db.name().to_owned();
    let mut admin = sqlx::PgConnection::connect(&admin_pg_url())
        .await
        .expect("admin");
    let mut session = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    // Needs wal_level=logical, which scripts/test sets up.
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&name)
        .execute(&mut session)
        .await
        .expect("create slot");
    // pg_recvlogical (PostgreSQL's client package) streams from the slot and
    // reconnects when terminated, as a CDC reader would.
    let mut stream = std::process::Command::new("pg_recvlogical")
        .args([
            "-d",
            db.url(),
            "--slot",
            &name,
            "--start",
            "-f",
            "/dev/null",
        ])
        .spawn()
        .expect("pg_recvlogical (from the postgresql-client package)");
    let mut active = false;
    for _ in 0..100 {
        active = sqlx::query_scalar::<_, bool>(
            "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .expect("query");
        if active {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(active, "pg_recvlogical did not start streaming");

    drop(db);
    let _ = stream.kill();
    let _ = stream.wait();
    assert!(!pg_exists(&name).await);
    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .expect("query");
    assert_eq!(slots, 0);
}

#[tokio::test]
async fn pg_databases_are_distinct() {
    let (a, b) = tokio::join!(pg_database(), pg_database());
    assert_ne!(a.name(), b.name());
}

#[tokio::test]
async fn mysql_database_is_created_usable_and_dropped() {
    let db = mysql_database().await;
    assert_eq!(db.kind(), DbKind::MySql);
    let name = db.name().to_owned();
    assert!(mysql_exists(&name).await);

    let pool = db.mysql_pool().await;
    sqlx::raw_sql("CREATE TABLE t (id int primary key)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::raw_sql("INSERT INTO t VALUES (1), (2)")
        .execute(&pool)
        .await
        .expect("insert");
    let current: String = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(current, name);

    db.cleanup().await;
    assert!(!mysql_exists(&name).await);
    drop(pool);
}

#[tokio::test]
async fn mysql_database_is_dropped_on_drop_even_with_an_open_transaction() {
    let db = mysql_database().await;
    let name = db.name().to_owned();
    let mut session = sqlx::MySqlConnection::connect(db.url())
        .await
        .expect("connect");
    sqlx::raw_sql("CREATE TABLE t (id int primary key)")
        .execute(&mut session)
        .await
        .expect("create");
    // An open transaction holds a metadata lock that would block DROP.
    let mut tx = session.begin().await.expect("begin");
    sqlx::raw_sql("INSERT INTO t VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    drop(db);
    assert!(!mysql_exists(&name).await);
    drop(tx);
}

#[tokio::test]
async fn sqlite_database_is_usable() {
    let db = sqlite_database();
    assert_eq!(db.kind(), DbKind::Sqlite);
    let pool = db.sqlite_pool().await;
    sqlx::raw_sql("CREATE TABLE t (id integer primary key); INSERT INTO t VALUES (1)")
        .execute(&pool)
        .await
        .expect("seed");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(count, 1);
    assert!(db.sqlite_path().expect("path").exists());
    pool.close().await;
}

/// A port nothing listens on: bound, noted and closed again.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
#[should_panic(
    expected = "run scripts/test (it installs and starts PostgreSQL/MariaDB) or set CAUDAL_TEST_PG_URL"
)]
async fn unreachable_postgres_fails_loudly() {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    caudal_testkit::database::pg_database_at(&url).await;
}

#[tokio::test]
#[should_panic(expected = "cannot reach MySQL/MariaDB at mysql://root:***@127.0.0.1:")]
async fn unreachable_mysql_fails_loudly_without_showing_the_password() {
    let url = format!("mysql://root:secret@127.0.0.1:{}/mysql", closed_port());
    caudal_testkit::database::mysql_database_at(&url).await;
}
