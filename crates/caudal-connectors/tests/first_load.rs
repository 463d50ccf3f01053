//! A PostgreSQL table source's first load against the real server: the
//! table read with parallel binary COPY up to the cursor's high-water mark,
//! resumable by ctid, then by cursor after the mark.

use caudal_connectors::sources::sql::SqlSource;
use caudal_core::config::{Format, SourceConfig, load_str};
use caudal_core::record::{CursorValue, Position, Record};
use caudal_testkit::{TestDb, pg_database};
use serde_json::Value;

async fn exec(db: &TestDb, sql: &str) {
    let pool = db.pg_pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
}

fn source(db: &TestDb, body: &str) -> SourceConfig {
    let text = format!(
        "[sources.s]\ntype = \"postgres\"\nurl = \"{}\"\n{body}\n",
        db.url()
    );
    let mut config = load_str(&text, Format::Toml, "test.toml", &|_| None)
        .unwrap_or_else(|e| panic!("config:\n{text}\n{e}"));
    config.sources.remove("s").expect("source s")
}

/// Every record of one run from `from`, keyed by `key`.
async fn read(config: &SourceConfig, from: Option<&Position>, key: Option<&str>) -> Vec<Record> {
    let source = SqlSource::connect("s", config).await.expect("connect");
    let mut reader = source.open_run(from, key).await.expect("open");
    let mut out = Vec::new();
    while let Some(page) = reader.next_page().await.expect("page") {
        assert!(!page.is_empty(), "pages are never empty");
        out.extend(page);
    }
    out
}

fn id(r: &Record) -> i64 {
    r.data
        .field("Id")
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| panic!("no id in {}", r.data))
}

#[tokio::test]
async fn a_first_load_copies_up_to_the_mark_resumes_by_ctid_and_goes_on_by_cursor() {
    let db = pg_database().await;
    // Enough rows for several chunks of pages; an awkward name; rows newer
    // than the safety lag, which wait for a later run.
    exec(
        &db,
        r#"CREATE TABLE "Load Me" ("Id" int PRIMARY KEY, modified timestamptz NOT NULL, pad text);
           INSERT INTO "Load Me"
             SELECT i, now() - interval '1 hour' + i * interval '1 ms', repeat('x', 200)
             FROM generate_series(1, 20000) i;
           INSERT INTO "Load Me" VALUES (20001, now() + interval '1 hour', 'future');"#,
    )
    .await;
    let config = source(
        &db,
        "table = \"Load Me\"\ncursor = [\"modified\", \"Id\"]\nlag = \"5s\"\ncolumns = [\"Id\", \"modified\"]",
    );
    let first = read(&config, None, Some("Id")).await;
    let (marker, rows) = first.split_last().expect("records");
    // Every row up to the mark, once, the future one left for later.
    let mut ids: Vec<i64> = rows.iter().map(id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=20000).collect::<Vec<_>>());
    // Only the selected columns, keyed by the key field.
    assert_eq!(rows[0].data.to_map().len(), 2);
    assert_eq!(
        rows[0].key.as_deref(),
        Some(id(&rows[0]).to_string().as_str())
    );
    // Physical order: strictly increasing ctids, all under one mark.
    let ctids: Vec<(u32, u16)> = rows
        .iter()
        .map(|r| match &r.position {
            Position::FirstLoad { page, tuple, .. } => (*page, *tuple),
            other => panic!("not a first load position: {}", other.display()),
        })
        .collect();
    assert!(ctids.windows(2).all(|w| w[0] < w[1]), "ctid order");
    assert!(
        ctids.last().expect("rows").0 > 300,
        "several chunks of pages"
    );
    let Position::FirstLoadDone { hwm } = &marker.position else {
        panic!(
            "the last record is not the end of the load: {:?}",
            marker.position
        );
    };
    assert!(marker.position.is_marker());
    assert_eq!(hwm.last(), Some(&CursorValue::Int(20000)));

    // Resumed from the middle (after a crash): exactly the rest.
    let middle = rows[12345].position.clone();
    let rest = read(&config, Some(&middle), Some("Id")).await;
    let rest_ids: Vec<i64> = rest
        .iter()
        .filter(|r| !r.position.is_marker())
        .map(id)
        .collect();
    let want: Vec<i64> = rows[12346..].iter().map(id).collect();
    assert_eq!(rest_ids, want);
    assert_eq!(rest.last().map(|r| &r.position), Some(&marker.position));

    // After the load, by cursor after the mark: a row changed meanwhile
    // (its cursor moves past the mark) and the one that was too new.
    exec(
        &db,
        r#"UPDATE "Load Me" SET modified = now() - interval '1 minute' WHERE "Id" = 7;
           UPDATE "Load Me" SET modified = now() - interval '30 seconds' WHERE "Id" = 20001;"#,
    )
    .await;
    let next = read(&config, Some(&marker.position), Some("Id")).await;
    let next_ids: Vec<i64> = next.iter().map(id).collect();
    assert_eq!(next_ids, vec![7, 20001]);
    assert!(
        next.iter()
            .all(|r| matches!(r.position, Position::Cursor { .. })),
        "by cursor after the load"
    );
    let values: Vec<Value> = next.iter().map(|r| r.data.to_value()).collect();
    assert_eq!(values[0]["Id"], 7);
    db.cleanup().await;
}

#[tokio::test]
async fn first_load_cursor_pages_in_cursor_order_and_an_empty_table_loads_nothing() {
    let db = pg_database().await;
    exec(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO t VALUES (3, 1), (1, 2), (2, 3);",
    )
    .await;
    let by_cursor = source(
        &db,
        "table = \"t\"\ncursor = [\"id\"]\nfirst_load = \"cursor\"",
    );
    let ids: Vec<i64> = read(&by_cursor, None, None)
        .await
        .iter()
        .map(|r| r.data.field("id").and_then(|v| v.as_i64()).expect("id"))
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    exec(&db, "CREATE TABLE empty (id int PRIMARY KEY)").await;
    let empty = source(&db, "table = \"empty\"\ncursor = [\"id\"]");
    assert!(read(&empty, None, None).await.is_empty());
    db.cleanup().await;
}
