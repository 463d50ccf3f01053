//! The SQL source's type mapping, against real PostgreSQL, MariaDB and
//! SQLite databases: every common column type, edge values (minimums,
//! maximums, NaN and infinities, many-digit decimals, non-UTC offsets,
//! microseconds, NULL array elements) and a row of NULLs are read through the
//! public API (`SqlSource::connect`, `open_run`, `next_page`) and compared
//! with the exact JSON expected.
//!
//! Also: quoted identifiers (spaces, quotes, mixed case) as table and cursor
//! columns, `query` sources, and the errors for a missing cursor column, a
//! NULL cursor value, a `lag` on a non-timestamp cursor and a type without a
//! JSON mapping.

use caudal_connectors::sources::sql::SqlSource;
use caudal_core::config::{Format, SourceConfig, load_str};
use caudal_core::{Error, ErrorKind};
use caudal_testkit::{DbKind, TestDb, mysql_database, pg_database, sqlite_database};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs SQL (several statements allowed) on the test database, on one
/// connection so `SET` statements apply to the statements after them.
async fn exec(db: &TestDb, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    let result = match db.kind() {
        DbKind::Postgres => {
            let pool = db.pg_pool().await;
            let r = sqlx::raw_sql(sql).execute(&pool).await.map(drop);
            pool.close().await;
            r
        }
        DbKind::MySql => {
            let pool = db.mysql_pool().await;
            let mut conn = pool.acquire().await.expect("mysql connection");
            let r = sqlx::raw_sql(sql).execute(&mut *conn).await.map(drop);
            drop(conn);
            pool.close().await;
            r
        }
        DbKind::Sqlite => {
            let pool = db.sqlite_pool().await;
            let r = sqlx::raw_sql(sql).execute(&pool).await.map(drop);
            pool.close().await;
            r
        }
    };
    result.unwrap_or_else(|e| panic!("setup SQL failed: {e}"));
}

/// A TOML basic string holding `s` (JSON string escapes are TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A source configuration for the test database; `body` holds the source's
/// other fields as TOML (`table`, `cursor`, ...).
fn source(db: &TestDb, body: &str) -> SourceConfig {
    let source_type = match db.kind() {
        DbKind::Postgres => "postgres",
        DbKind::MySql => "mysql",
        DbKind::Sqlite => "sqlite",
    };
    let text = format!(
        "[sources.s]\ntype = \"{source_type}\"\nurl = {}\n{body}\n",
        toml_str(db.url())
    );
    let mut config = load_str(&text, Format::Toml, "test.toml", &|_| None)
        .unwrap_or_else(|e| panic!("config:\n{text}\n{e}"));
    config.sources.remove("s").expect("source s")
}

/// More pages than any test table needs: a reader that goes on is a bug.
const MAX_PAGES: usize = 100;

/// Reads every row of one run, in cursor order.
async fn read_all(config: &SourceConfig) -> Result<Vec<Value>, Error> {
    let source = SqlSource::connect("s", config).await?;
    let mut reader = source.open_run(None, None).await?;
    let mut rows = Vec::new();
    let mut pages = 0;
    while let Some(page) = reader.next_page().await? {
        assert!(!page.is_empty(), "pages are never empty");
        pages += 1;
        assert!(
            pages <= MAX_PAGES,
            "the reader never ends; rows so far: {rows:#?}"
        );
        // A marker (the end of a PostgreSQL first load) moves the
        // position only.
        rows.extend(
            page.into_iter()
                .filter(|r| !r.position.is_marker())
                .map(|r| r.data.to_value()),
        );
    }
    Ok(rows)
}

async fn read_ok(config: &SourceConfig) -> Vec<Value> {
    read_all(config)
        .await
        .unwrap_or_else(|e| panic!("read failed: {}", e.report()))
}

async fn read_err(config: &SourceConfig) -> Error {
    match read_all(config).await {
        Ok(rows) => panic!("expected an error, read {rows:#?}"),
        Err(e) => e,
    }
}

/// Compares rows column by column, so a failure names the column.
#[track_caller]
fn assert_rows(actual: &[Value], expected: &[Value]) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "row count; actual rows:\n{}",
        serde_json::to_string_pretty(actual).unwrap_or_default()
    );
    let mut diffs = Vec::new();
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let (a, e) = (
            a.as_object().expect("object"),
            e.as_object().expect("object"),
        );
        let a_keys: Vec<&String> = a.keys().collect();
        let e_keys: Vec<&String> = e.keys().collect();
        if a_keys != e_keys {
            diffs.push(format!("row {i}: columns {a_keys:?}, expected {e_keys:?}"));
        }
        for (k, ev) in e {
            let av = a.get(k).unwrap_or(&Value::Null);
            if av != ev || (a.get(k).is_none()) {
                diffs.push(format!("row {i} column {k}: got {av}, expected {ev}"));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "type mapping differs:\n  {}",
        diffs.join("\n  ")
    );
}

#[track_caller]
fn assert_error(err: &Error, kind: ErrorKind, needles: &[&str]) {
    let report = err.report();
    assert_eq!(err.kind(), kind, "error kind of: {report}");
    for needle in needles {
        assert!(
            report.contains(needle),
            "{needle:?} missing from the error: {report}"
        );
    }
}

/// An object whose every listed column is null, with `id`.
fn null_row(id: i64, columns: &[&str]) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("id".into(), json!(id));
    for c in columns {
        map.insert((*c).to_string(), Value::Null);
    }
    Value::Object(map)
}

/// The column names of an expected row, except `id`.
fn columns_of(row: &Value) -> Vec<&str> {
    row.as_object()
        .expect("object")
        .keys()
        .filter(|k| *k != "id")
        .map(String::as_str)
        .collect()
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

#[tokio::test]
async fn postgres_types_map_to_exact_json() {
    let db = pg_database().await;
    exec(
        &db,
        r#"
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE types (
            id int PRIMARY KEY,
            c_int2 smallint, c_int4 integer, c_int8 bigint,
            c_real real, c_double double precision,
            c_numeric numeric, c_numeric_scaled numeric(10, 2),
            c_text text, c_varchar varchar(40), c_char char(5),
            c_bool boolean,
            c_timestamp timestamp, c_timestamptz timestamptz,
            c_date date, c_time time, c_interval interval,
            c_uuid uuid, c_json json, c_jsonb jsonb, c_bytea bytea,
            c_int_array int[], c_text_array text[], c_mood mood
        );
        SET TIME ZONE 'America/Sao_Paulo';
        INSERT INTO types VALUES
        (1, -32768, -2147483648, -9223372036854775808,
            0.1, 1.7976931348623157e308,
            '-12345678901234567890.123456789012345678901234567890', 12.50,
            'héllo "quoted" ✓
second line', 'varchar', 'ab',
            true,
            '2025-05-14 12:34:56.123456', '2025-05-14 09:34:56.123456-03',
            '2025-05-14', '23:59:59.999999', '1 year 2 months 3 days 04:05:06.5',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{"b": 1, "a": [true, null, "x"], "n": 1.5, "u": 18446744073709551615, "i": -9223372036854775808}', '{"b": 1, "a": {"c": [1, 2]}}',
            '\x00ff10',
            '{1,NULL,3}', '{"a",NULL,"b c","NULL"}', 'happy'),
        (2, 32767, 2147483647, 9223372036854775807,
            'NaN', 'Infinity',
            '0.000000000000000000001', -0.50,
            '', 'x', 'abcde',
            false,
            '1999-12-31 23:59:59', '2000-01-01 00:00:00+05:30',
            '0044-03-15 BC', '00:00:00', '-1 days -02:00:00.000001',
            '00000000-0000-0000-0000-000000000000',
            '[1, 2.5, "x", {}]', '"just a string"',
            '',
            '{}', '{{"a","b"},{"c",NULL}}', 'sad'),
        (3, 0, 0, 0, '-Infinity', '-0', '0', 0, NULL, NULL, NULL, NULL,
            '2025-05-14 12:34:56.5', '2025-05-14 12:34:56.5+00',
            NULL, '24:00:00', '0', NULL, 'null', '{}', NULL, NULL, NULL, NULL),
        (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        "#,
    )
    .await;

    let full = json!({
        "id": 1,
        "c_int2": -32768, "c_int4": -2147483648i64, "c_int8": i64::MIN,
        "c_real": 0.1, "c_double": 1.797_693_134_862_315_7e308,
        "c_numeric": "-12345678901234567890.123456789012345678901234567890",
        "c_numeric_scaled": "12.50",
        "c_text": "héllo \"quoted\" ✓\nsecond line", "c_varchar": "varchar", "c_char": "ab   ",
        "c_bool": true,
        "c_timestamp": "2025-05-14T12:34:56.123456",
        "c_timestamptz": "2025-05-14T12:34:56.123456Z",
        "c_date": "2025-05-14", "c_time": "23:59:59.999999",
        "c_interval": "P1Y2M3DT4H5M6.5S",
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "c_json": {"b": 1, "a": [true, null, "x"], "n": 1.5, "u": u64::MAX, "i": i64::MIN},
        "c_jsonb": {"a": {"c": [1, 2]}, "b": 1},
        "c_bytea": "AP8Q",
        "c_int_array": [1, null, 3], "c_text_array": ["a", null, "b c", "NULL"],
        "c_mood": "happy"
    });
    let expected = vec![
        full.clone(),
        json!({
            "id": 2,
            "c_int2": 32767, "c_int4": 2147483647, "c_int8": i64::MAX,
            "c_real": "NaN", "c_double": "Infinity",
            "c_numeric": "0.000000000000000000001", "c_numeric_scaled": "-0.50",
            "c_text": "", "c_varchar": "x", "c_char": "abcde",
            "c_bool": false,
            "c_timestamp": "1999-12-31T23:59:59",
            "c_timestamptz": "1999-12-31T18:30:00Z",
            "c_date": "-0043-03-15", "c_time": "00:00:00",
            "c_interval": "P-1DT-2H-0.000001S",
            "c_uuid": "00000000-0000-0000-0000-000000000000",
            "c_json": [1, 2.5, "x", {}], "c_jsonb": "just a string",
            "c_bytea": "",
            "c_int_array": [], "c_text_array": [["a", "b"], ["c", null]],
            "c_mood": "sad"
        }),
        json!({
            "id": 3,
            "c_int2": 0, "c_int4": 0, "c_int8": 0,
            "c_real": "-Infinity", "c_double": -0.0,
            "c_numeric": "0", "c_numeric_scaled": "0.00",
            "c_text": null, "c_varchar": null, "c_char": null, "c_bool": null,
            "c_timestamp": "2025-05-14T12:34:56.500",
            "c_timestamptz": "2025-05-14T12:34:56.500Z",
            "c_date": null, "c_time": "24:00:00", "c_interval": "PT0S",
            "c_uuid": null, "c_json": null, "c_jsonb": {},
            "c_bytea": null, "c_int_array": null, "c_text_array": null, "c_mood": null
        }),
        null_row(4, &columns_of(&full)),
    ];
    let rows = read_ok(&source(
        &db,
        "table = \"types\"\ncursor = [\"id\"]\npage_size = 3",
    ))
    .await;
    assert_rows(&rows, &expected);

    // `decimals = "number"`: numbers when a double holds every digit.
    let rows = read_ok(&source(
        &db,
        "table = \"public.types\"\ncolumns = [\"id\", \"c_numeric\", \"c_numeric_scaled\"]\n\
         cursor = [\"id\"]\ndecimals = \"number\"",
    ))
    .await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "c_numeric": "-12345678901234567890.123456789012345678901234567890",
                   "c_numeric_scaled": 12.5}),
            json!({"id": 2, "c_numeric": 1e-21, "c_numeric_scaled": -0.5}),
            json!({"id": 3, "c_numeric": 0.0, "c_numeric_scaled": 0.0}),
            json!({"id": 4, "c_numeric": null, "c_numeric_scaled": null}),
        ],
    );
    db.cleanup().await;
}

/// Values chrono cannot hold and types beyond the common ones: infinite
/// timestamps and dates, numeric NaN and infinities, `timetz`, network
/// types, bit strings, domains, arrays of enums and of other types.
#[tokio::test]
async fn postgres_special_values_and_less_common_types() {
    let db = pg_database().await;
    exec(
        &db,
        r#"
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
        CREATE TABLE special (
            id int PRIMARY KEY,
            c_timestamp timestamp, c_timestamptz timestamptz, c_date date,
            c_numeric numeric, c_timetz timetz,
            c_inet inet, c_cidr cidr, c_macaddr macaddr, c_bit bit(4), c_varbit varbit,
            c_oid oid, c_xml xml, c_domain positive,
            c_mood_array mood[], c_bool_array boolean[], c_numeric_array numeric[],
            c_timestamp_array timestamp[], c_uuid_array uuid[], c_interval_array interval[],
            c_jsonb_array jsonb[], c_float_array float8[], c_date_array date[]
        );
        INSERT INTO special VALUES
        (1, 'infinity', '-infinity', 'infinity', 'NaN', '12:34:56.789+05:30',
            '192.168.0.1', '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', B'110',
            4294967295, '<a>x</a>', 7,
            '{happy,NULL,sad}', '{true,NULL,false}', '{1.50,NaN,NULL}',
            '{infinity,"2025-05-14 12:00:00",NULL}',
            '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{"1 day","-1 mons"}',
            ARRAY['{"a": 1}'::jsonb, NULL], '{1.5,NaN,-Infinity}', '{-infinity,2025-01-02}'),
        (2, '-infinity', 'infinity', '-infinity', 'Infinity', '00:00:00-08',
            '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', B'0000', B'',
            0, '', 1,
            '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
        (3, NULL, NULL, NULL, '-Infinity', NULL, '192.168.0.1/24', NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        "#,
    )
    .await;
    let rows = read_ok(&source(&db, "table = \"special\"\ncursor = [\"id\"]")).await;
    assert_rows(
        &rows,
        &[
            json!({
                "id": 1, "c_timestamp": "infinity", "c_timestamptz": "-infinity",
                "c_date": "infinity", "c_numeric": "NaN", "c_timetz": "12:34:56.789+05:30",
                "c_inet": "192.168.0.1", "c_cidr": "10.0.0.0/8", "c_macaddr": "08:00:2b:01:02:03",
                "c_bit": "1010", "c_varbit": "110", "c_oid": 4_294_967_295u32,
                "c_xml": "<a>x</a>", "c_domain": 7,
                "c_mood_array": ["happy", null, "sad"], "c_bool_array": [true, null, false],
                "c_numeric_array": ["1.50", "NaN", null],
                "c_timestamp_array": ["infinity", "2025-05-14T12:00:00", null],
                "c_uuid_array": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
                "c_interval_array": ["P1D", "P-1M"],
                "c_jsonb_array": [{"a": 1}, null],
                "c_float_array": [1.5, "NaN", "-Infinity"],
                "c_date_array": ["-infinity", "2025-01-02"]
            }),
            json!({
                "id": 2, "c_timestamp": "-infinity", "c_timestamptz": "infinity",
                "c_date": "-infinity", "c_numeric": "Infinity", "c_timetz": "00:00:00-08:00",
                "c_inet": "::1", "c_cidr": "2001:db8::/32", "c_macaddr": "ff:ff:ff:ff:ff:ff",
                "c_bit": "0000", "c_varbit": "", "c_oid": 0, "c_xml": "", "c_domain": 1,
                "c_mood_array": [], "c_bool_array": [], "c_numeric_array": [],
                "c_timestamp_array": [], "c_uuid_array": [], "c_interval_array": [],
                "c_jsonb_array": [], "c_float_array": [], "c_date_array": []
            }),
            json!({
                "id": 3, "c_timestamp": null, "c_timestamptz": null, "c_date": null,
                "c_numeric": "-Infinity", "c_timetz": null, "c_inet": "192.168.0.1/24",
                "c_cidr": null, "c_macaddr": null, "c_bit": null, "c_varbit": null,
                "c_oid": null, "c_xml": null, "c_domain": null,
                "c_mood_array": null, "c_bool_array": null, "c_numeric_array": null,
                "c_timestamp_array": null, "c_uuid_array": null, "c_interval_array": null,
                "c_jsonb_array": null, "c_float_array": null, "c_date_array": null
            }),
        ],
    );

    // NaN and infinities stay strings with `decimals = "number"` too.
    let rows = read_ok(&source(
        &db,
        "table = \"special\"\ncolumns = [\"id\", \"c_numeric\"]\ncursor = [\"id\"]\n\
         decimals = \"number\"",
    ))
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| r["c_numeric"].clone())
            .collect::<Vec<_>>(),
        vec![json!("NaN"), json!("Infinity"), json!("-Infinity")]
    );
    db.cleanup().await;
}

/// `infinity`, `-infinity`, years BC and beyond 9999 in timestamp and date
/// cursor columns: read in order, and a checkpoint at any of them can be
/// resumed from.
#[tokio::test]
async fn postgres_infinite_cursor_values_page_and_resume() {
    let db = pg_database().await;
    exec(
        &db,
        "CREATE TABLE ev (at timestamptz NOT NULL, local timestamp NOT NULL, d date NOT NULL,
                          id int PRIMARY KEY);
         INSERT INTO ev VALUES
            ('infinity', 'infinity', 'infinity', 5),
            ('-infinity', '-infinity', '-infinity', 1),
            ('2025-01-01Z', '2025-01-01', '2025-01-01', 3),
            ('2025-01-01Z', '2025-01-01', '2025-01-01', 2),
            ('infinity', 'infinity', 'infinity', 4),
            ('0044-03-15 12:00:00.5Z BC', '0044-03-15 12:00:00.5 BC', '0044-03-15 BC', 6),
            ('12025-01-01 00:00:00.000001Z', '12025-01-01 00:00:00.000001', '12025-01-01', 7);",
    )
    .await;
    for first in ["at", "local", "d"] {
        let config = source(
            &db,
            &format!(
                "table = \"ev\"\ncursor = [\"{first}\", \"id\"]\nlag = \"0s\"\npage_size = 1\n{}",
                FIRST_LOAD_BY_CURSOR
            ),
        );
        let source = SqlSource::connect("s", &config).await.expect("connect");
        let mut reader = source.open_run(None, None).await.expect("open");
        let mut read = Vec::new();
        while let Some(page) = reader.next_page().await.expect("page") {
            assert!(read.len() < MAX_PAGES, "{first}: the reader never ends");
            for record in page {
                read.push((
                    record
                        .data
                        .field("id")
                        .and_then(|v| v.as_i64())
                        .expect("id"),
                    record.position,
                ));
            }
        }
        let ids: Vec<i64> = read.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 6, 2, 3, 7, 4, 5], "{first}");
        // Resume after each row: the rows after it follow.
        for after in 0..read.len() {
            let rest = &ids[after + 1..];
            let mut reader = source
                .open_run(Some(&read[after].1), None)
                .await
                .expect("open");
            let mut ids = Vec::new();
            while let Some(page) = reader.next_page().await.expect("page") {
                assert!(ids.len() < MAX_PAGES, "{first}: the reader never ends");
                ids.extend(
                    page.iter()
                        .map(|r| r.data.field("id").and_then(|v| v.as_i64()).expect("id")),
                );
            }
            assert_eq!(ids, rest, "{first}: resumed after {:?}", read[after].1);
        }
    }
    db.cleanup().await;
}

/// Numeric values decode to exactly PostgreSQL's own text form.
#[tokio::test]
async fn postgres_numerics_match_the_server_text() {
    let db = pg_database().await;
    exec(
        &db,
        r#"
        CREATE TABLE nums (id serial PRIMARY KEY, n numeric, t text);
        INSERT INTO nums (n) VALUES
            (0), (-0.0), (1), (-1), (10000), (9999), (99990000), (100000000), (0.0001),
            (0.00001), (0.1), (0.12345), (1.00), (123456789.987654321), (-0.000000001),
            (1e30), (1e-30), (12345678901234567890123456789012345678901234567890),
            (0.00000000000000000000000000000000000000000000000001), (1.10), (100.0001),
            (-99999999.99999999), (3.14159265358979323846264338327950288),
            (1e131071), (-1e-16383);
        INSERT INTO nums (n)
            SELECT (random() * 10 ^ (random() * 40 - 20))::numeric(60, 30) FROM generate_series(1, 200);
        INSERT INTO nums (n)
            SELECT round((random() - 0.5)::numeric * (10::numeric ^ (random() * 30)::int), (random() * 12)::int)
            FROM generate_series(1, 200);
        UPDATE nums SET t = n::text;
        "#,
    )
    .await;
    let rows = read_ok(&source(
        &db,
        "table = \"nums\"\ncursor = [\"id\"]\npage_size = 1000",
    ))
    .await;
    assert_eq!(rows.len(), 425);
    for row in &rows {
        assert_eq!(row["n"], row["t"], "numeric row {}", row["id"]);
    }
    db.cleanup().await;
}

// ---------------------------------------------------------------------------
// MariaDB / MySQL
// ---------------------------------------------------------------------------

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_types_map_to_exact_json() {
    let db = mysql_database().await;
    exec(
        &db,
        r#"
        CREATE TABLE types (
            id INT PRIMARY KEY,
            c_tiny TINYINT, c_tiny_u TINYINT UNSIGNED,
            c_small SMALLINT, c_small_u SMALLINT UNSIGNED,
            c_medium MEDIUMINT, c_medium_u MEDIUMINT UNSIGNED,
            c_int INT, c_int_u INT UNSIGNED,
            c_big BIGINT, c_big_u BIGINT UNSIGNED,
            c_bool BOOLEAN, c_tiny1 TINYINT(1),
            c_decimal DECIMAL(30, 10), c_float FLOAT, c_double DOUBLE,
            c_char CHAR(5), c_varchar VARCHAR(50), c_text TEXT,
            c_varchar_bin VARCHAR(20) COLLATE utf8mb4_bin,
            c_blob BLOB, c_varbinary VARBINARY(16), c_binary BINARY(4),
            c_date DATE, c_datetime DATETIME(6), c_timestamp TIMESTAMP(6) NULL DEFAULT NULL,
            c_time TIME(6), c_year YEAR,
            c_enum ENUM('small', 'large'), c_set SET('a', 'b', 'c'),
            c_json JSON, c_bit BIT(8)
        ) DEFAULT CHARSET = utf8mb4;
        SET time_zone = '+02:00';
        INSERT INTO types VALUES
        (1, -128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -9223372036854775808, 0,
            FALSE, 0,
            -12345678901234567890.1234567890, 0.1, -1.7976931348623157e308,
            'ab', 'héllo ✓ "q"', 'line one\nline two', 'CaseSensitive',
            x'00FF10', x'DEADBEEF', x'01',
            '1000-01-01', '2025-05-14 12:34:56.123456', '2025-05-14 14:34:56.123456',
            '-838:59:59', 1901,
            'small', 'a,c', '{"b": 1, "a": [true, null, "x"]}', b'10100101'),
        (2, 127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295,
            9223372036854775807, 18446744073709551615,
            TRUE, 2,
            0.0000000001, 1.5, 2.5e-300,
            'abcde', '', '', '',
            x'', x'', x'FFFFFFFF',
            '9999-12-31', '9999-12-31 23:59:59.999999', '2038-01-19 05:14:07.999999',
            '25:00:00.5', 2155,
            'large', '', '[1, "x"]', b'11111111'),
        (3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, FALSE, 1, 0, 0, 0, '', '', '', '', NULL, NULL, NULL,
            '2025-05-14', '2025-05-14 12:34:56.5', '1970-01-01 02:00:01', '838:59:59', 0,
            'small', 'a,b,c', 'null', b'0'),
        (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL);
        "#,
    )
    .await;
    let full = json!({
        "id": 1,
        "c_tiny": -128, "c_tiny_u": 0, "c_small": -32768, "c_small_u": 0,
        "c_medium": -8388608, "c_medium_u": 0, "c_int": -2147483648i64, "c_int_u": 0,
        "c_big": i64::MIN, "c_big_u": 0,
        "c_bool": false, "c_tiny1": false,
        "c_decimal": "-12345678901234567890.1234567890", "c_float": 0.1,
        "c_double": -1.797_693_134_862_315_7e308,
        "c_char": "ab", "c_varchar": "héllo ✓ \"q\"", "c_text": "line one\nline two",
        "c_varchar_bin": "CaseSensitive",
        "c_blob": "AP8Q", "c_varbinary": "3q2+7w==", "c_binary": "AQAAAA==",
        "c_date": "1000-01-01", "c_datetime": "2025-05-14T12:34:56.123456",
        "c_timestamp": "2025-05-14T12:34:56.123456Z",
        "c_time": "-838:59:59", "c_year": 1901,
        "c_enum": "small", "c_set": "a,c",
        "c_json": {"b": 1, "a": [true, null, "x"]}, "c_bit": 165
    });
    let expected = vec![
        full.clone(),
        json!({
            "id": 2,
            "c_tiny": 127, "c_tiny_u": 255, "c_small": 32767, "c_small_u": 65535,
            "c_medium": 8388607, "c_medium_u": 16777215, "c_int": 2147483647,
            "c_int_u": 4294967295u32, "c_big": i64::MAX, "c_big_u": u64::MAX,
            "c_bool": true, "c_tiny1": true,
            "c_decimal": "0.0000000001", "c_float": 1.5, "c_double": 2.5e-300,
            "c_char": "abcde", "c_varchar": "", "c_text": "", "c_varchar_bin": "",
            "c_blob": "", "c_varbinary": "", "c_binary": "/////w==",
            "c_date": "9999-12-31", "c_datetime": "9999-12-31T23:59:59.999999",
            "c_timestamp": "2038-01-19T03:14:07.999999Z",
            "c_time": "25:00:00.500", "c_year": 2155,
            "c_enum": "large", "c_set": "", "c_json": [1, "x"], "c_bit": 255
        }),
        json!({
            "id": 3,
            "c_tiny": 0, "c_tiny_u": 0, "c_small": 0, "c_small_u": 0,
            "c_medium": 0, "c_medium_u": 0, "c_int": 0, "c_int_u": 0, "c_big": 0, "c_big_u": 0,
            "c_bool": false, "c_tiny1": true,
            "c_decimal": "0.0000000000", "c_float": 0.0, "c_double": 0.0,
            "c_char": "", "c_varchar": "", "c_text": "", "c_varchar_bin": "",
            "c_blob": null, "c_varbinary": null, "c_binary": null,
            "c_date": "2025-05-14", "c_datetime": "2025-05-14T12:34:56.500",
            "c_timestamp": "1970-01-01T00:00:01Z",
            "c_time": "838:59:59", "c_year": 0,
            "c_enum": "small", "c_set": "a,b,c", "c_json": null, "c_bit": 0
        }),
        null_row(4, &columns_of(&full)),
    ];
    let rows = read_ok(&source(
        &db,
        "table = \"types\"\ncursor = [\"id\"]\npage_size = 3",
    ))
    .await;
    assert_rows(&rows, &expected);

    let rows = read_ok(&source(
        &db,
        "table = \"types\"\ncolumns = [\"id\", \"c_decimal\"]\ncursor = [\"id\"]\n\
         decimals = \"number\"",
    ))
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| r["c_decimal"].clone())
            .collect::<Vec<_>>(),
        vec![
            json!("-12345678901234567890.1234567890"),
            json!(1e-10),
            json!(0.0),
            json!(null)
        ]
    );
    db.cleanup().await;
}

/// MariaDB accepts zero dates (`0000-00-00`) and dates with zero parts
/// unless `NO_ZERO_DATE`/`NO_ZERO_IN_DATE` are set; they are not dates, so
/// they are read as null instead of failing the whole source.
#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_zero_dates_read_as_null() {
    let db = mysql_database().await;
    exec(
        &db,
        r"
        SET SESSION sql_mode = '';
        CREATE TABLE zero (
            id INT PRIMARY KEY, d DATE, dt DATETIME, ts TIMESTAMP NULL DEFAULT NULL,
            partial DATE
        );
        INSERT INTO zero VALUES
            (1, '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00', '2024-00-15'),
            (2, '2024-02-29', '2024-02-29 01:02:03', '2024-02-29 01:02:03', '2024-02-00');
        ",
    )
    .await;
    let rows = read_ok(&source(&db, "table = \"zero\"\ncursor = [\"id\"]")).await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "d": null, "dt": null, "ts": null, "partial": null}),
            json!({"id": 2, "d": "2024-02-29", "dt": "2024-02-29T01:02:03",
                   "ts": "2024-02-29T01:02:03Z", "partial": null}),
        ],
    );
    db.cleanup().await;
}

/// A `query` source over MariaDB: computed columns keep their types. A
/// MariaDB `JSON` column read through a query arrives as its JSON text:
/// MariaDB reports it as `LONGTEXT` and names the derived table, not the
/// base table, as the column's origin, so nothing says it holds JSON
/// (table sources read the `json_valid` check from the catalog instead).
#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_query_source_keeps_types() {
    let db = mysql_database().await;
    exec(
        &db,
        r#"
        CREATE TABLE docs (id INT PRIMARY KEY, doc JSON, price DECIMAL(10, 2), raw VARBINARY(4));
        INSERT INTO docs VALUES (1, '{"k": [1, 2]}', 9.90, x'CAFE'), (2, NULL, NULL, NULL);
        "#,
    )
    .await;
    let rows = read_ok(&source(
        &db,
        "query = 'SELECT d.id, d.doc, d.price, d.price * 2 AS doubled, d.raw FROM docs d'\n\
         cursor = [\"id\"]",
    ))
    .await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "doc": "{\"k\": [1, 2]}", "price": "9.90", "doubled": "19.80", "raw": "yv4="}),
            json!({"id": 2, "doc": null, "price": null, "doubled": null, "raw": null}),
        ],
    );
    db.cleanup().await;
}

// ---------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sqlite_types_map_to_exact_json() {
    let db = sqlite_database();
    exec(
        &db,
        r#"
        CREATE TABLE types (
            id INTEGER PRIMARY KEY,
            c_integer INTEGER, c_real REAL, c_text TEXT, c_blob BLOB,
            c_bool BOOLEAN, c_json JSON, c_decimal DECIMAL(10, 2), c_numeric NUMERIC,
            c_timestamp TIMESTAMP, c_datetime DATETIME, c_date DATE,
            c_varchar VARCHAR(20), c_untyped
        );
        INSERT INTO types VALUES
        (1, -9223372036854775808, 1.5, 'héllo "q" ✓', x'00FF10',
            1, '{"b": 1, "a": [true, null, "x"]}', '12.50', 7,
            '2025-05-14 12:34:56.123', '2025-05-14T12:34:56Z', '2025-05-14',
            'v', 'free'),
        (2, 9223372036854775807, 9e999, '', x'',
            0, '[1, 2.5, "x"]', '-0.5', '123456789012.25',
            '2025-05-14T12:34:56.123456+02:00', '2025-05-14', '2025-05-14',
            '', 42),
        (3, 0, -9e999, 'NULL', x'00',
            2, '"text"', 3, 'not a number',
            1747226096, 2460810.0, '2025-05-14',
            'x', 1.25),
        (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        "#,
    )
    .await;
    let full = json!({
        "id": 1,
        "c_integer": i64::MIN, "c_real": 1.5, "c_text": "héllo \"q\" ✓", "c_blob": "AP8Q",
        "c_bool": true, "c_json": {"b": 1, "a": [true, null, "x"]},
        "c_decimal": "12.5", "c_numeric": "7",
        "c_timestamp": "2025-05-14 12:34:56.123", "c_datetime": "2025-05-14T12:34:56Z",
        "c_date": "2025-05-14", "c_varchar": "v", "c_untyped": "free"
    });
    let expected = vec![
        full.clone(),
        json!({
            "id": 2,
            "c_integer": i64::MAX, "c_real": "Infinity", "c_text": "", "c_blob": "",
            "c_bool": false, "c_json": [1, 2.5, "x"],
            "c_decimal": "-0.5", "c_numeric": "123456789012.25",
            "c_timestamp": "2025-05-14T12:34:56.123456+02:00", "c_datetime": "2025-05-14",
            "c_date": "2025-05-14", "c_varchar": "", "c_untyped": 42
        }),
        json!({
            "id": 3,
            "c_integer": 0, "c_real": "-Infinity", "c_text": "NULL", "c_blob": "AA==",
            "c_bool": true, "c_json": "text",
            "c_decimal": "3", "c_numeric": "not a number",
            "c_timestamp": 1_747_226_096, "c_datetime": 2_460_810,
            "c_date": "2025-05-14", "c_varchar": "x", "c_untyped": 1.25
        }),
        null_row(4, &columns_of(&full)),
    ];
    let rows = read_ok(&source(
        &db,
        "table = \"types\"\ncursor = [\"id\"]\npage_size = 3",
    ))
    .await;
    assert_rows(&rows, &expected);

    let rows = read_ok(&source(
        &db,
        "table = \"types\"\ncolumns = [\"id\", \"c_decimal\", \"c_numeric\"]\ncursor = [\"id\"]\n\
         decimals = \"number\"",
    ))
    .await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "c_decimal": 12.5, "c_numeric": 7.0}),
            json!({"id": 2, "c_decimal": -0.5, "c_numeric": 123_456_789_012.25}),
            json!({"id": 3, "c_decimal": 3.0, "c_numeric": "not a number"}),
            json!({"id": 4, "c_decimal": null, "c_numeric": null}),
        ],
    );

    // Through a `query`, columns of the table keep their declared types.
    let rows = read_ok(&source(
        &db,
        "query = 'SELECT t.id, t.c_json AS doc, t.c_bool AS flag, t.c_decimal AS amount FROM types t'\n\
         cursor = [\"id\"]",
    ))
    .await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "doc": {"b": 1, "a": [true, null, "x"]}, "flag": true, "amount": "12.5"}),
            json!({"id": 2, "doc": [1, 2.5, "x"], "flag": false, "amount": "-0.5"}),
            json!({"id": 3, "doc": "text", "flag": true, "amount": "3"}),
            json!({"id": 4, "doc": null, "flag": null, "amount": null}),
        ],
    );
    db.cleanup().await;
}

/// Invalid JSON in a `JSON` column is a clear decode error, not a panic and
/// not a silently stringified value.
#[tokio::test]
async fn sqlite_invalid_json_is_a_decode_error() {
    let db = sqlite_database();
    exec(
        &db,
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, doc JSON);
         INSERT INTO docs VALUES (1, '{\"ok\": true}'), (2, '{broken');",
    )
    .await;
    let err = read_err(&source(&db, "table = \"docs\"\ncursor = [\"id\"]")).await;
    assert_error(&err, ErrorKind::Decode, &["\"doc\"", "JSON"]);
    db.cleanup().await;
}

// ---------------------------------------------------------------------------
// Quoted identifiers, query sources and errors, on every database
// ---------------------------------------------------------------------------

async fn database(kind: DbKind) -> TestDb {
    match kind {
        DbKind::Postgres => pg_database().await,
        DbKind::MySql => mysql_database().await,
        DbKind::Sqlite => sqlite_database(),
    }
}

/// `"name"` in the dialect's quoting.
fn q(kind: DbKind, ident: &str) -> String {
    match kind {
        DbKind::MySql => format!("`{}`", ident.replace('`', "``")),
        _ => format!("\"{}\"", ident.replace('"', "\"\"")),
    }
}

const TABLE: &str = "Service Requests";
const MODIFIED: &str = "Last Modified";
const ID: &str = "Request \"Id\"";
const STATUS: &str = "StatusID";
/// A JSON column whose name ends in a MySQL quote character.
const DETAILS: &str = "Details `x`";

/// A table whose name and columns need quoting, with rows sharing
/// timestamps so keyset paging on the tuple is exercised.
async fn awkward_table(kind: DbKind) -> TestDb {
    let db = database(kind).await;
    let (ts_type, json_type) = match kind {
        DbKind::Postgres => ("timestamptz", "jsonb"),
        DbKind::MySql => ("DATETIME(6)", "JSON"),
        DbKind::Sqlite => ("TIMESTAMP", "JSON"),
    };
    let mut sql = format!(
        "CREATE TABLE {t} ({m} {ts_type} NOT NULL, {i} INTEGER NOT NULL PRIMARY KEY, {s} INTEGER, \
         {d} {json_type});\n",
        t = q(kind, TABLE),
        m = q(kind, MODIFIED),
        i = q(kind, ID),
        s = q(kind, STATUS),
        d = q(kind, DETAILS),
    );
    for (id, ts) in [
        (5, "2025-01-01 10:00:00"),
        (3, "2025-01-01 10:00:00"),
        (1, "2025-01-01 10:00:00"),
        (4, "2025-01-01 09:00:00"),
        (2, "2025-01-02 00:00:00"),
        (6, "2025-01-01 10:00:00"),
    ] {
        sql.push_str(&format!(
            "INSERT INTO {} VALUES ('{ts}', {id}, {}, '{{\"n\": {id}}}');\n",
            q(kind, TABLE),
            id * 10
        ));
    }
    exec(&db, &sql).await;
    db
}

fn cursor_toml() -> String {
    format!("cursor = [{}, {}]", toml_str(MODIFIED), toml_str(ID))
}

fn ids(rows: &[Value], column: &str) -> Vec<i64> {
    rows.iter()
        .map(|r| r[column].as_i64().expect("integer id"))
        .collect()
}

/// Tests of paging by cursor read a PostgreSQL table's first run by
/// cursor too (its default first load is a parallel COPY).
const FIRST_LOAD_BY_CURSOR: &str = "first_load = \"cursor\"";

fn first_load(kind: DbKind) -> &'static str {
    if kind == DbKind::Postgres {
        FIRST_LOAD_BY_CURSOR
    } else {
        ""
    }
}

async fn quoted_identifiers_work(kind: DbKind) {
    let db = awkward_table(kind).await;
    // Table source, page size 2: pages split rows sharing a timestamp.
    let rows = read_ok(&source(
        &db,
        &format!(
            "table = {}\n{}\npage_size = 2\n{}",
            toml_str(TABLE),
            cursor_toml(),
            first_load(kind)
        ),
    ))
    .await;
    assert_eq!(
        ids(&rows, ID),
        vec![4, 1, 3, 5, 6, 2],
        "{kind:?}: {rows:#?}"
    );
    assert_eq!(rows[0][STATUS], json!(40));
    assert_eq!(rows[0][DETAILS], json!({"n": 4}), "{kind:?}: JSON column");
    assert_eq!(
        rows[0]
            .as_object()
            .expect("object")
            .keys()
            .collect::<Vec<_>>(),
        vec![MODIFIED, ID, STATUS, DETAILS]
    );

    // Selected columns with awkward names.
    let rows = read_ok(&source(
        &db,
        &format!(
            "table = {}\ncolumns = [{}, {}]\n{}\npage_size = 4\n{}",
            toml_str(TABLE),
            toml_str(ID),
            toml_str(MODIFIED),
            cursor_toml(),
            first_load(kind)
        ),
    ))
    .await;
    assert_eq!(ids(&rows, ID), vec![4, 1, 3, 5, 6, 2]);
    assert_eq!(rows[0].as_object().expect("object").len(), 2);

    // A query source: the user's SQL, wrapped as a subquery.
    let query = format!(
        "SELECT r.{i} AS {ri}, r.{m} AS {rm}, r.{s} * 2 AS double_status FROM {t} r WHERE r.{s} <> 30",
        i = q(kind, ID),
        m = q(kind, MODIFIED),
        s = q(kind, STATUS),
        t = q(kind, TABLE),
        ri = q(kind, "Key"),
        rm = q(kind, "Changed At"),
    );
    let rows = read_ok(&source(
        &db,
        &format!(
            "query = {}\ncursor = [\"Changed At\", \"Key\"]\npage_size = 2",
            toml_str(&format!("{query};\n"))
        ),
    ))
    .await;
    assert_eq!(
        ids(&rows, "Key"),
        vec![4, 1, 5, 6, 2],
        "{kind:?}: {rows:#?}"
    );
    assert_eq!(rows[0]["double_status"], json!(80));
    db.cleanup().await;
}

#[tokio::test]
async fn postgres_quoted_identifiers_and_queries() {
    quoted_identifiers_work(DbKind::Postgres).await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_quoted_identifiers_and_queries() {
    quoted_identifiers_work(DbKind::MySql).await;
}

#[tokio::test]
async fn sqlite_quoted_identifiers_and_queries() {
    quoted_identifiers_work(DbKind::Sqlite).await;
}

async fn errors_are_clear(kind: DbKind) {
    let db = awkward_table(kind).await;

    // A cursor column that is not in the table: a config error naming it and
    // listing the columns there are.
    let err = read_err(&source(
        &db,
        &format!(
            "table = {}\ncursor = [\"last_modified\", {}]",
            toml_str(TABLE),
            toml_str(ID)
        ),
    ))
    .await;
    assert_error(
        &err,
        ErrorKind::Config,
        &[
            "\"last_modified\"",
            "Service Requests",
            MODIFIED,
            STATUS,
            "Request",
        ],
    );

    // Also through a query.
    let err = read_err(&source(
        &db,
        &format!(
            "query = {}\ncursor = [\"missing\"]",
            toml_str(&format!("SELECT {} FROM {}", q(kind, ID), q(kind, TABLE)))
        ),
    ))
    .await;
    assert_error(
        &err,
        ErrorKind::Config,
        &["\"missing\"", "query", "Request"],
    );

    // `lag` needs a timestamp first cursor column.
    let err = read_err(&source(
        &db,
        &format!(
            "table = {}\ncursor = [{}]\nlag = \"10s\"",
            toml_str(TABLE),
            toml_str(ID)
        ),
    ))
    .await;
    assert_error(&err, ErrorKind::Config, &["lag", "timestamp", "Request"]);

    // A NULL in a cursor column: a decode error naming the column.
    exec(
        &db,
        "CREATE TABLE nullable (k INTEGER, v TEXT); INSERT INTO nullable VALUES (1, 'a'), (NULL, 'b');",
    )
    .await;
    let err = read_err(&source(&db, "table = \"nullable\"\ncursor = [\"k\"]")).await;
    assert_error(&err, ErrorKind::Decode, &["\"k\"", "null", "NOT NULL"]);
    db.cleanup().await;
}

#[tokio::test]
async fn postgres_errors_are_clear() {
    errors_are_clear(DbKind::Postgres).await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_errors_are_clear() {
    errors_are_clear(DbKind::MySql).await;
}

#[tokio::test]
async fn sqlite_errors_are_clear() {
    errors_are_clear(DbKind::Sqlite).await;
}

/// A PostgreSQL type with no faithful JSON form fails with a decode error
/// that names the column and the type and says how to cast it, instead of
/// producing text from binary data.
#[tokio::test]
async fn postgres_unmapped_type_is_a_clear_error() {
    let db = pg_database().await;
    exec(
        &db,
        "CREATE TABLE odd (id int PRIMARY KEY, price money, span int4range);
         INSERT INTO odd VALUES (1, NULL, NULL), (2, 12.5, NULL);",
    )
    .await;
    let err = read_err(&source(
        &db,
        "table = \"odd\"\ncursor = [\"id\"]\ncolumns = [\"id\", \"price\"]",
    ))
    .await;
    assert_error(&err, ErrorKind::Decode, &["\"price\"", "MONEY", "query"]);
    let err = read_err(&source(
        &db,
        "query = 'SELECT id, int4range(id, 10) AS span FROM odd'\ncursor = [\"id\"]",
    ))
    .await;
    assert_error(&err, ErrorKind::Decode, &["\"span\"", "INT4RANGE", "query"]);
    // JSON numbers beyond a double's range have no JSON value in caudal.
    let err = read_err(&source(
        &db,
        &format!(
            "query = {}\ncursor = [\"id\"]",
            toml_str(r#"SELECT 1 AS id, '{"x": 1e400}'::json AS doc"#)
        ),
    ))
    .await;
    assert_error(&err, ErrorKind::Decode, &["\"doc\"", "JSON"]);
    // Cast in a query, it reads.
    let rows = read_ok(&source(
        &db,
        "query = 'SELECT id, price::numeric AS price, int4range(id, 10)::text AS span FROM odd'\ncursor = [\"id\"]",
    ))
    .await;
    assert_rows(
        &rows,
        &[
            json!({"id": 1, "price": null, "span": "[1,10)"}),
            json!({"id": 2, "price": "12.50", "span": "[2,10)"}),
        ],
    );
    db.cleanup().await;
}
