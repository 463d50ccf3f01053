//! Datasets (seed 003, batch reports) written by the real binary: a report
//! pipeline (a PostgreSQL source in `mode = "query"`) writing a `files`
//! sink, checked from outside caudal. pyarrow and DuckDB read the Parquet
//! files the manifests name; PostgreSQL computes the same report itself
//! (`examples/seed-003/report.sql`); moto plays S3.
//!
//! What is pinned: the partitions a backfill writes and their manifests,
//! the report's exact values, the type mapping (and the decimal scale of an
//! undeclared `numeric`), a re-run replacing one date and nothing else,
//! `caudal once` catching up to yesterday, the same on S3, SIGKILL at any
//! point of a write leaving every partition readable (old or new, whole)
//! and a re-run repairing it, JSON Lines with gzip, and the config errors
//! of a `files` sink.
//!
//! Every test has its own database, directory and S3 server, so they run
//! in parallel.

#[path = "support/datasets.rs"]
mod datasets_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use caudal_core::dataset::Manifest;
use caudal_testkit::S3;
use datasets_support::{
    DATASET, DETAIL_QUERY, Dataset, PIPELINE, ReportRow, Reports, Where, days, read_dataset,
    rfc3339_micros, walk,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Output, PATIENCE, send_signal};

/// The partition path of a provider's day.
fn part(provider: i64, date: &str) -> String {
    format!("provider_id={provider}/date={date}")
}

/// The manifests below a local dataset root, read directly (no Python):
/// by partition path. A manifest that does not parse is left out.
fn local_manifests(root: &Path) -> BTreeMap<String, Manifest> {
    walk(root)
        .keys()
        .filter_map(|rel| rel.strip_suffix("/_manifest.json"))
        .filter_map(|p| {
            let text = std::fs::read(root.join(p).join("_manifest.json")).ok()?;
            Some((p.to_string(), serde_json::from_slice(&text).ok()?))
        })
        .collect()
}

/// Sale ids by partition path, from pyarrow's rows.
fn ids_by_partition(ds: &Dataset) -> BTreeMap<String, BTreeSet<i64>> {
    let mut out: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for row in &ds.rows {
        let p = row["_partition"].as_str().expect("a partition").to_string();
        let id = row["sale_id"].as_i64().expect("a sale id");
        assert!(
            out.entry(p.clone()).or_default().insert(id),
            "sale {id} twice in {p}"
        );
    }
    out
}

/// PostgreSQL's sale ids by partition path.
async fn pg_ids_by_partition(w: &Reports) -> BTreeMap<String, BTreeSet<i64>> {
    w.sale_ids()
        .await
        .into_iter()
        .map(|((p, d), ids)| (part(p, &d), ids))
        .collect()
}

/// 1. A backfill of a day range writes one partition per provider and day
///    that had sales, each with a manifest whose files exist and add up;
///    nothing staged is left behind; the state store lists it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_writes_one_partition_per_provider_and_day_with_sales() {
    let mut w = Reports::new().await;
    w.generate(6000, "2025-05-01", 4, 6).await;
    // Provider 3 sold nothing on 2025-05-02: no partition for it that day.
    w.exec(
        "delete from seed003.sales where provider_id = 3 \
         and sold_at >= '2025-05-02' and sold_at < '2025-05-03'",
    )
    .await;
    w.query = DETAIL_QUERY.into();
    w.sink = format!(
        "url = \"data/{DATASET}\"\npartition_by = [\"provider_id\", \"date\"]\n\
         row_group_rows = 50\nfile_max_rows = 100\n"
    );
    // The range has a day before and a day after the sales.
    let out = w.backfill("2025-04-30", "2025-05-05").await;

    let counts = w.counts().await;
    let expected: BTreeSet<String> = counts.keys().map(|(p, d)| part(*p, d)).collect();
    assert_eq!(expected.len(), 6 * 4 - 1, "{counts:?}");
    let ds = w.read_local().await;
    ds.assert_consistent();
    let manifests = ds.manifests();
    assert_eq!(
        manifests.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "one partition per provider and day with sales"
    );
    let mut total_bytes = 0;
    for ((provider, date), n) in &counts {
        let path = part(*provider, date);
        let m = &manifests[&path];
        assert_eq!(m.version, 1, "{path}");
        assert_eq!(m.dataset, DATASET, "{path}");
        assert_eq!(
            m.values,
            vec![
                ("provider_id".to_string(), provider.to_string()),
                ("date".to_string(), date.clone())
            ],
            "{path}"
        );
        assert_eq!(m.generation, 1, "{path}: written once");
        assert_eq!(m.format, "parquet", "{path}");
        assert_eq!(m.rows, u64::try_from(*n).expect("a count"), "{path}");
        // Rows beyond file_max_rows go to a next file, so every file but
        // the last is full.
        assert_eq!(
            m.files.len() as u64,
            m.rows.div_ceil(100),
            "{path}: files of at most 100 rows: {:?}",
            m.files.iter().map(|f| f.rows).collect::<Vec<_>>()
        );
        let run = &m.files[0].source.run;
        for (i, f) in m.files.iter().enumerate() {
            assert!(f.rows <= 100, "{path}/{}: {} rows", f.path, f.rows);
            assert_eq!(
                f.path,
                format!("part-{i:03}-{run}.parquet"),
                "{path}: file names"
            );
            assert_eq!(f.source.pipeline, PIPELINE);
            assert_eq!(f.source.logical_date, *date);
            assert_eq!(&f.source.run, run, "{path}: one run wrote the partition");
            assert!(
                f.source.query_sha256.len() == 64
                    && f.source.query_sha256.chars().all(|c| c.is_ascii_hexdigit()),
                "{path}: {:?}",
                f.source.query_sha256
            );
            let sale_ids = &f.stats["sale_id"];
            assert_eq!(sale_ids.nulls, 0, "{path}/{}", f.path);
            assert!(sale_ids.min.is_some() && sale_ids.max.is_some());
        }
        // Row groups of at most row_group_rows.
        for found in &ds.partitions[&path].files {
            let rows = found.rows.expect("rows");
            assert_eq!(
                found.row_groups,
                Some(rows.div_ceil(50)),
                "{path}/{}",
                found.path
            );
            let names: Vec<&str> = found.schema.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "sale_id",
                    "product_id",
                    "quantity",
                    "amount",
                    "channel",
                    "sold_at"
                ],
                "partition columns are not repeated in the files"
            );
        }
        total_bytes += m.bytes;
    }
    // Every sale is in the partition of its provider and day, once.
    assert_eq!(ids_by_partition(&ds), pg_ids_by_partition(&w).await);

    let rows: i64 = counts.values().sum();
    assert_eq!(
        out.stdout.trim(),
        format!(
            "{PIPELINE}: backfill 2025-04-30 to 2025-05-05: 6 days written, 0 failed, \
             {rows} rows, {total_bytes} bytes"
        ),
        "{out}"
    );

    // Nothing but manifests and the files they name: no staged leftovers.
    let on_disk = walk(&w.root());
    let leftovers: Vec<&String> = on_disk
        .keys()
        .filter(|f| !f.ends_with("/_manifest.json"))
        .filter(|f| {
            let (p, name) = f.rsplit_once('/').expect("in a partition");
            !manifests
                .get(p)
                .is_some_and(|m| m.files.iter().any(|e| e.path == name))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "files no manifest names: {leftovers:?}"
    );
    assert!(ds.unnamed().is_empty(), "{:?}", ds.unnamed());

    // The state store lists the same.
    let store = w.store().await;
    let dates = store.dataset_dates(DATASET).await.expect("dataset dates");
    assert_eq!(
        dates
            .iter()
            .map(|d| d.logical_date.clone())
            .collect::<Vec<_>>(),
        days("2025-04-30", "2025-05-05"),
        "every date of the range is written, the empty ones too"
    );
    for d in &dates {
        let day_rows: i64 = counts
            .iter()
            .filter(|((_, day), _)| *day == d.logical_date)
            .map(|(_, n)| n)
            .sum();
        let day_parts: Vec<String> = counts
            .keys()
            .filter(|(_, day)| *day == d.logical_date)
            .map(|(p, day)| part(*p, day))
            .collect();
        assert_eq!(d.pipeline, PIPELINE);
        assert_eq!(d.rows, day_rows, "{}", d.logical_date);
        assert_eq!(d.parts as usize, day_parts.len(), "{}", d.logical_date);
        assert_eq!(
            store
                .dataset_date_parts(DATASET, &d.logical_date)
                .await
                .expect("date parts"),
            day_parts,
            "{}",
            d.logical_date
        );
    }
    let parts = store
        .dataset_partitions(DATASET)
        .await
        .expect("dataset partitions");
    assert_eq!(
        parts
            .iter()
            .map(|p| p.part.clone())
            .collect::<BTreeSet<_>>(),
        expected
    );
    for p in &parts {
        let m = &manifests[&p.part];
        assert_eq!(p.generation, 1, "{}", p.part);
        assert_eq!(p.rows as u64, m.rows, "{}", p.part);
        assert_eq!(p.bytes as u64, m.bytes, "{}", p.part);
        assert_eq!(p.files as usize, m.files.len(), "{}", p.part);
        assert_eq!(p.first_date, m.values[1].1);
        assert_eq!(p.last_date, m.values[1].1);
    }
    assert!(store.dataset_version(DATASET).await.expect("version") > 0);
    let summary = store
        .dataset_summaries()
        .await
        .expect("summaries")
        .into_iter()
        .find(|s| s.dataset == DATASET)
        .expect("the dataset is summarised");
    assert_eq!(summary.partitions as usize, expected.len());
    assert_eq!(summary.dates, 6);
    assert_eq!(summary.rows, rows);
    assert_eq!(summary.bytes as u64, total_bytes);
    assert_eq!(summary.first_date.as_deref(), Some("2025-04-30"));
    assert_eq!(summary.last_date.as_deref(), Some("2025-05-05"));
    w.cleanup().await;
}

/// 2. For every day of the range, the rows pyarrow reads through the
///    manifests are PostgreSQL's own report (report.sql, UTC days): exact
///    decimal text, timestamps to the microsecond, the documented Arrow
///    types, and statistics that agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dataset_holds_what_postgres_reports_for_every_day() {
    let w = Reports::new().await;
    w.generate(8000, "2025-05-01", 10, 7).await;
    // Days are UTC days whatever zone the database's sessions default to:
    // the query's date literals compare in the connection's zone, UTC.
    w.exec(&format!(
        "alter database {} set timezone = 'America/Mexico_City'",
        w.db.name()
    ))
    .await;
    w.backfill("2025-05-01", "2025-05-10").await;

    let expected = w.report("2025-05-01", "2025-05-10").await;
    assert_eq!(expected.len(), 70, "{expected:?}");
    let ds = w.read_local().await;
    ds.assert_consistent();
    assert_eq!(ds.report_rows(), expected);
    for (path, p) in &ds.partitions {
        for f in &p.files {
            assert_eq!(
                f.schema,
                [
                    ("sales", "int64"),
                    ("units", "int64"),
                    ("revenue", "decimal128(38, 2)"),
                    ("first_sale", "timestamp[us, tz=UTC]"),
                    ("last_sale", "timestamp[us, tz=UTC]"),
                ]
                .map(|(n, t)| (n.to_string(), t.to_string())),
                "{path}/{}",
                f.path
            );
        }
        let m = p.manifest.as_ref().expect("a manifest");
        let columns: Vec<(&str, &str)> = m
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("sales", "int64"),
                ("units", "int64"),
                ("revenue", "decimal(38,2)"),
                ("first_sale", "timestamptz"),
                ("last_sale", "timestamptz"),
            ],
            "{path}"
        );
        // The statistics say what the file holds.
        let row = expected
            .iter()
            .find(|r| part(r.provider_id, &r.date) == *path)
            .expect("the partition's report row");
        let revenue = &m.files[0].stats["revenue"];
        assert_eq!(revenue.min, Some(json!(row.revenue)), "{path}");
        assert_eq!(revenue.max, Some(json!(row.revenue)), "{path}");
        let first = &m.files[0].stats["first_sale"];
        let min = first.min.as_ref().and_then(Value::as_str).expect("a time");
        assert_eq!(rfc3339_micros(min), row.first_sale, "{path}: {min}");
    }
    w.cleanup().await;
}

/// Reads Parquet files with DuckDB: each column's DuckDB type, and the rows
/// ordered by the first column, with exact values (decimals and dates as
/// text, timestamps in microseconds since the epoch, blobs in hex).
const DUCKDB_READER: &str = r#"
import json, sys
import duckdb
files = '[' + ', '.join("'" + f.replace("'", "''") + "'" for f in sys.argv[1:]) + ']'
source = f'read_parquet({files}, hive_partitioning = false)'
con = duckdb.connect()
types = [(r[0], r[1]) for r in con.execute(f'DESCRIBE SELECT * FROM {source}').fetchall()]
exprs = []
for name, t in types:
    q = '"' + name + '"'
    if t.startswith('DECIMAL') or t == 'DATE':
        exprs.append(f'CAST({q} AS VARCHAR)')
    elif t.startswith('TIMESTAMP'):
        exprs.append(f'epoch_us({q})')
    elif t == 'BLOB':
        exprs.append(f'lower(hex({q}))')
    else:
        exprs.append(q)
rows = con.execute(f'SELECT {", ".join(exprs)} FROM {source} ORDER BY 1').fetchall()
print(json.dumps({'types': types, 'rows': [dict(zip([n for n, _ in types], r)) for r in rows]}))
"#;

/// Microseconds since the epoch of a civil time read as UTC.
fn civil_micros(text: &str) -> i64 {
    let dt: jiff::civil::DateTime = text.parse().expect("a civil time");
    let ts = dt
        .to_zoned(jiff::tz::TimeZone::UTC)
        .expect("in range")
        .timestamp();
    ts.as_microsecond()
}

/// 3. Every mapped PostgreSQL type arrives with its Arrow type and its
///    exact value, NULLs as NULL, as both pyarrow and DuckDB read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_postgres_type_keeps_its_type_and_value_in_parquet() {
    let mut w = Reports::new().await;
    w.exec(
        r#"create table seed003.types (
            id int4 primary key, c_int2 int2, c_int8 int8, c_float4 float4,
            c_float8 float8, c_numeric numeric(12,3), c_declared numeric,
            c_free numeric, c_text text, c_varchar varchar(20), c_char char(5),
            c_bool bool, c_date date, c_ts timestamp, c_tstz timestamptz,
            c_uuid uuid, c_jsonb jsonb, c_json json, c_bytea bytea);
        set timezone = 'America/Mexico_City';
        insert into seed003.types values
          (1, -32768, -9223372036854775808, 1.5, 0.1, -1234.5, 1.5, 1.25,
           E'h\u00e9llo, "w\u00f6rld"\n\u2603', 'abc', 'ab', true, '2025-05-14',
           '2025-05-14 23:59:59.999999', '2025-05-14 08:30:00.123456+05:30',
           'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"b": [1, 2.5, null], "a": "x"}',
           '{"b": 1,  "a": [true]}', '\x00ff10'),
          (2, 32767, 9223372036854775807, -1024.125, -12345.6789, 999999999.999,
           -0.0001, -3.5, '', 'x', 'abcde', false, '1969-12-31',
           '1969-12-31 23:59:59.5', '1969-12-31 18:59:59.999999-05:00',
           '00000000-0000-0000-0000-000000000000', '[]', 'null', '\x'),
          (3, null, null, null, null, null, null, null, null, null, null,
           null, null, null, null, null, null, null, null);"#,
    )
    .await;
    w.query = "select * from seed003.types order by id".into();
    w.sink = "url = \"data/types\"\npartition_by = [\"date\"]\n\
              types = { c_declared = \"decimal(18,4)\" }\n"
        .into();
    w.dataset = "types".into();
    w.once("2025-05-14").await;

    let columns = [
        ("id", "int32", "int32", "INTEGER"),
        ("c_int2", "int16", "int16", "SMALLINT"),
        ("c_int8", "int64", "int64", "BIGINT"),
        ("c_float4", "float32", "float", "FLOAT"),
        ("c_float8", "float64", "double", "DOUBLE"),
        (
            "c_numeric",
            "decimal(38,3)",
            "decimal128(38, 3)",
            "DECIMAL(38,3)",
        ),
        (
            "c_declared",
            "decimal(18,4)",
            "decimal128(18, 4)",
            "DECIMAL(18,4)",
        ),
        (
            "c_free",
            "decimal(38,2)",
            "decimal128(38, 2)",
            "DECIMAL(38,2)",
        ),
        ("c_text", "text", "string", "VARCHAR"),
        ("c_varchar", "text", "string", "VARCHAR"),
        ("c_char", "text", "string", "VARCHAR"),
        ("c_bool", "boolean", "bool", "BOOLEAN"),
        ("c_date", "date", "date32[day]", "DATE"),
        ("c_ts", "timestamp", "timestamp[us]", "TIMESTAMP"),
        (
            "c_tstz",
            "timestamptz",
            "timestamp[us, tz=UTC]",
            "TIMESTAMP WITH TIME ZONE",
        ),
        ("c_uuid", "text", "string", "VARCHAR"),
        ("c_jsonb", "json", "string", "VARCHAR"),
        ("c_json", "json", "string", "VARCHAR"),
        ("c_bytea", "binary", "binary", "BLOB"),
    ];
    let expected = [
        json!({
            "id": 1, "c_int2": -32768, "c_int8": i64::MIN, "c_float4": 1.5, "c_float8": 0.1,
            "c_numeric": "-1234.500", "c_declared": "1.5000", "c_free": "1.25",
            "c_text": "h\u{e9}llo, \"w\u{f6}rld\"\n\u{2603}", "c_varchar": "abc",
            "c_char": "ab   ", "c_bool": true, "c_date": "2025-05-14",
            "c_ts": civil_micros("2025-05-14T23:59:59.999999"),
            "c_tstz": rfc3339_micros("2025-05-14T03:00:00.123456Z"),
            "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "c_jsonb": {"a": "x", "b": [1, 2.5, null]},
            "c_json": {"a": [true], "b": 1},
            "c_bytea": "00ff10",
        }),
        json!({
            "id": 2, "c_int2": 32767, "c_int8": i64::MAX, "c_float4": -1024.125,
            "c_float8": -12345.6789, "c_numeric": "999999999.999", "c_declared": "-0.0001",
            "c_free": "-3.50", "c_text": "", "c_varchar": "x", "c_char": "abcde",
            "c_bool": false, "c_date": "1969-12-31",
            "c_ts": civil_micros("1969-12-31T23:59:59.5"),
            "c_tstz": -1, "c_uuid": "00000000-0000-0000-0000-000000000000",
            "c_jsonb": [], "c_json": null, "c_bytea": "",
        }),
        {
            let mut nulls = serde_json::Map::new();
            for (name, ..) in &columns {
                nulls.insert((*name).to_string(), Value::Null);
            }
            nulls.insert("id".into(), json!(3));
            Value::Object(nulls)
        },
    ];
    // JSON columns hold JSON text: compare what it says, not its spacing.
    let same = |reader: &str, row: &serde_json::Map<String, Value>, want: &Value| {
        let id = &want["id"];
        for (name, ..) in &columns {
            let (got, want) = (&row[*name], &want[*name]);
            if (name.starts_with("c_json") && !want.is_null()) || (*name == "c_json" && id == 2) {
                let text = got.as_str().unwrap_or_else(|| {
                    panic!("{reader}: row {id} {name}: JSON text expected, got {got}")
                });
                let parsed: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{reader}: row {id} {name}: {text:?}: {e}"));
                assert_eq!(&parsed, want, "{reader}: row {id} {name}: {text:?}");
            } else {
                assert_eq!(got, want, "{reader}: row {id} {name}");
            }
        }
    };

    let ds = read_dataset(Where::Local(w.root())).await;
    ds.assert_consistent();
    let manifests = ds.manifests();
    assert_eq!(
        manifests.keys().collect::<Vec<_>>(),
        ["date=2025-05-14"],
        "one partition, named after the run's date"
    );
    let m = &manifests["date=2025-05-14"];
    assert_eq!(
        m.columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty.as_str()))
            .collect::<Vec<_>>(),
        columns.map(|(n, t, ..)| (n, t)),
        "the manifest's column types"
    );
    let file = &ds.partitions["date=2025-05-14"].files[0];
    assert_eq!(
        file.schema,
        columns.map(|(n, _, t, _)| (n.to_string(), t.to_string())),
        "pyarrow's types"
    );
    let mut rows = ds.rows.clone();
    rows.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(rows.len(), 3);
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(row["date"], "2025-05-14");
        same("pyarrow", row, want);
    }
    // The statistics of the manifest, as typed values.
    let stats = &m.files[0].stats;
    assert_eq!(
        (
            &stats["c_numeric"].min,
            &stats["c_numeric"].max,
            stats["c_numeric"].nulls
        ),
        (&Some(json!("-1234.500")), &Some(json!("999999999.999")), 1)
    );
    assert_eq!(
        (
            &stats["c_int8"].min,
            &stats["c_int8"].max,
            stats["c_int8"].nulls
        ),
        (&Some(json!(i64::MIN)), &Some(json!(i64::MAX)), 1)
    );
    assert_eq!(
        (&stats["c_date"].min, &stats["c_date"].max),
        (&Some(json!("1969-12-31")), &Some(json!("2025-05-14")))
    );
    let tstz = &stats["c_tstz"];
    let micros =
        |v: &Option<Value>| rfc3339_micros(v.as_ref().and_then(Value::as_str).expect("a time"));
    assert_eq!(
        (micros(&tstz.min), micros(&tstz.max)),
        (-1, rfc3339_micros("2025-05-14T03:00:00.123456Z"))
    );

    // DuckDB reads the same file the same way.
    let path = w
        .root()
        .join("date=2025-05-14")
        .join(&m.files[0].path)
        .display()
        .to_string();
    let text = tokio::task::spawn_blocking(move || {
        caudal_testkit::run_python(DUCKDB_READER, &[path.as_str()])
    })
    .await
    .expect("DuckDB ran");
    let duck: Value = serde_json::from_str(&text).expect("JSON from DuckDB");
    let types: Vec<(String, String)> = duck["types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| {
            (
                t[0].as_str().expect("a name").to_string(),
                t[1].as_str().expect("a type").to_string(),
            )
        })
        .collect();
    assert_eq!(
        types,
        columns.map(|(n, .., t)| (n.to_string(), t.to_string())),
        "DuckDB's types"
    );
    let duck_rows = duck["rows"].as_array().expect("rows");
    assert_eq!(duck_rows.len(), 3);
    for (row, want) in duck_rows.iter().zip(&expected) {
        same("DuckDB", row.as_object().expect("a row"), want);
    }
    w.cleanup().await;
}

/// 3b. An undeclared `numeric` takes the largest scale of the run's first
///     row group; a later value that needs more decimal places fails the
///     run, naming the column, and writes nothing. Trailing zeros are not
///     places it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_value_with_more_decimal_places_fails_the_run_naming_its_column() {
    let mut w = Reports::new().await;
    w.exec(
        "create table seed003.prices (id int4 primary key, price numeric);
         insert into seed003.prices values (1, 1.5), (2, 2.5), (3, 3.125);",
    )
    .await;
    w.query = "select id, price from seed003.prices order by id".into();
    w.dataset = "prices".into();
    w.sink = "url = \"data/prices\"\npartition_by = [\"date\"]\nrow_group_rows = 2\n".into();
    let out = w.caudal(&["once", PIPELINE, "--date", "2025-05-14"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("\"price\""),
        "the column is named: {out}"
    );
    let found = walk(&w.root());
    assert!(
        found.keys().all(|f| !f.ends_with("_manifest.json")),
        "a failed run commits nothing: {found:?}"
    );
    let store = w.store().await;
    assert!(
        store
            .dataset_dates("prices")
            .await
            .expect("dates")
            .is_empty(),
        "a failed date stays due"
    );

    // 3.10 needs one place, like the first row group's values.
    w.exec("update seed003.prices set price = 3.10 where id = 3")
        .await;
    w.once("2025-05-14").await;
    let ds = w.read_local().await;
    ds.assert_consistent();
    let mut prices: Vec<(i64, String)> = ds
        .rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().expect("an id"),
                r["price"].as_str().expect("a decimal").to_string(),
            )
        })
        .collect();
    prices.sort();
    assert_eq!(
        prices,
        [(1, "1.5"), (2, "2.5"), (3, "3.1")].map(|(i, p)| (i, p.to_string()))
    );
    w.cleanup().await;
}

/// 4. `once --date D` after the source changed: D's partitions are replaced
///    (generation bumped, new files, old files gone; a partition D no longer
///    writes is emptied), every other day's files are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_replaces_its_day_and_leaves_the_others_byte_for_byte() {
    let w = Reports::new().await;
    w.generate(3000, "2025-05-01", 3, 4).await;
    w.backfill("2025-05-01", "2025-05-03").await;
    let before = walk(&w.root());
    let before_bytes: BTreeMap<String, Vec<u8>> = before
        .keys()
        .map(|f| (f.clone(), std::fs::read(w.root().join(f)).expect("read")))
        .collect();
    let old = local_manifests(&w.root());
    assert_eq!(old.len(), 12);

    w.exec(
        "update seed003.sales set amount = amount + 1.01 where provider_id = 1 \
           and sold_at >= '2025-05-02' and sold_at < '2025-05-03';
         delete from seed003.sales where provider_id = 2 \
           and sold_at >= '2025-05-02' and sold_at < '2025-05-03';",
    )
    .await;
    let out = w.once("2025-05-02").await;
    let line = out.stdout.trim();
    assert!(
        line.starts_with("daily_sales 2025-05-02: 3 rows, 3 partitions, 3 files, "),
        "{out}"
    );

    let after = walk(&w.root());
    // Other days: the same files, the same bytes, not even touched.
    for (f, meta) in &before {
        if f.contains("/date=2025-05-02/") {
            continue;
        }
        assert_eq!(after.get(f), Some(meta), "{f} changed");
        let bytes = std::fs::read(w.root().join(f)).expect("read");
        assert!(bytes == before_bytes[f], "{f} changed");
    }
    assert_eq!(
        after
            .keys()
            .filter(|f| !f.contains("/date=2025-05-02/"))
            .count(),
        before
            .keys()
            .filter(|f| !f.contains("/date=2025-05-02/"))
            .count(),
        "no file appeared on another day"
    );
    // The day itself: new generation, new files, the old ones gone.
    let new = local_manifests(&w.root());
    for provider in [1, 3, 4] {
        let p = part(provider, "2025-05-02");
        let (o, n) = (&old[&p], &new[&p]);
        assert_eq!(n.generation, o.generation + 1, "{p}");
        for f in &o.files {
            assert!(
                n.files.iter().all(|g| g.path != f.path),
                "{p}: {} is still named",
                f.path
            );
            assert!(
                !after.contains_key(&format!("{p}/{}", f.path)),
                "{p}: {} is still there",
                f.path
            );
        }
        assert_ne!(n.files[0].source.run, o.files[0].source.run);
    }
    let gone = part(2, "2025-05-02");
    assert!(!new.contains_key(&gone), "{gone} has a manifest");
    assert!(
        after.keys().all(|f| !f.starts_with(&format!("{gone}/"))),
        "{gone} still has files: {after:?}"
    );

    let ds = w.read_local().await;
    ds.assert_consistent();
    assert_eq!(ds.report_rows(), w.report("2025-05-01", "2025-05-03").await);

    let store = w.store().await;
    assert_eq!(
        store
            .dataset_date_parts(DATASET, "2025-05-02")
            .await
            .expect("parts"),
        [1, 3, 4].map(|p| part(p, "2025-05-02"))
    );
    for p in store.dataset_partitions(DATASET).await.expect("partitions") {
        let want = if p.part.contains("date=2025-05-02") {
            2
        } else {
            1
        };
        assert_eq!(p.generation, want, "{}", p.part);
        assert_ne!(p.part, gone);
    }
    w.cleanup().await;
}

/// 4b. Partitions not split by date hold a file per date; dates written at
///     once commit into the same partitions without losing one another, and
///     a re-run of one date replaces that date's file only. (`stats` keeps
///     the statistics of the columns it names only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_in_partitions_holding_several_dates_replaces_only_its_date() {
    let mut w = Reports::new().await;
    w.generate(3000, "2025-05-01", 4, 3).await;
    w.query = datasets_support::REPORT_QUERY.replace(
        "select provider_id,",
        "select provider_id, {{ date }}::date as day,",
    );
    w.query = w
        .query
        .replace("group by provider_id", "group by provider_id, day");
    w.sink = format!(
        "url = \"data/{DATASET}\"\npartition_by = [\"provider_id\"]\nstats = [\"revenue\"]\n"
    );
    w.backfill("2025-05-01", "2025-05-04").await;
    let old = local_manifests(&w.root());
    for (p, m) in &old {
        for f in &m.files {
            assert_eq!(
                f.stats.keys().collect::<Vec<_>>(),
                ["revenue"],
                "{p}/{}: only the columns of `stats`",
                f.path
            );
        }
    }
    assert_eq!(
        old.keys().cloned().collect::<Vec<_>>(),
        ["provider_id=1", "provider_id=2", "provider_id=3"]
    );
    for (p, m) in &old {
        assert_eq!(
            m.files
                .iter()
                .map(|f| f.source.logical_date.as_str())
                .collect::<Vec<_>>(),
            days("2025-05-01", "2025-05-04"),
            "{p}: a file per date, none lost to a date committed at the same time"
        );
        assert_eq!(m.generation, 4, "{p}: a commit per date");
        assert_eq!(m.rows, 4, "{p}");
    }
    let before = walk(&w.root());

    w.exec(
        "update seed003.sales set quantity = quantity + 1 \
         where sold_at >= '2025-05-03' and sold_at < '2025-05-04'",
    )
    .await;
    w.once("2025-05-03").await;
    let new = local_manifests(&w.root());
    let after = walk(&w.root());
    for (p, m) in &new {
        let o = &old[p];
        assert_eq!(m.generation, o.generation + 1, "{p}");
        for (of, nf) in o.files.iter().zip(&m.files) {
            assert_eq!(of.source.logical_date, nf.source.logical_date, "{p}");
            let of_path = format!("{p}/{}", of.path);
            if of.source.logical_date == "2025-05-03" {
                assert_ne!(of.path, nf.path, "{p}");
                assert!(!after.contains_key(&of_path), "{of_path} is still there");
            } else {
                assert_eq!(of, nf, "{p}: another date's entry changed");
                assert_eq!(after.get(&of_path), before.get(&of_path), "{of_path}");
            }
        }
    }
    let ds = w.read_local().await;
    ds.assert_consistent();
    let mut got: Vec<ReportRow> = ds
        .rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.insert("date".into(), r["day"].clone());
            ReportRow::from_pyarrow(&r)
        })
        .collect();
    got.sort();
    assert_eq!(got, w.report("2025-05-01", "2025-05-04").await);
    w.cleanup().await;
}

/// 4c. `caudal once` without `--date` writes every complete day from
///     `start_date` (oldest first, a line each) and not today, which has not
///     ended; run again, it has nothing to write and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_catches_up_every_complete_day_then_has_nothing_to_do() {
    let mut w = Reports::new().await;
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let first = today
        .checked_sub(jiff::Span::new().days(3))
        .expect("a date")
        .to_string();
    let yesterday = today.yesterday().expect("a date").to_string();
    // Sales from three days ago until the end of today.
    w.generate(2000, &first, 4, 3).await;
    w.start_date = first.clone();
    let out = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let written: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{PIPELINE} ")))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(
        written,
        days(&first, &yesterday),
        "one line per complete day, oldest first: {out}"
    );
    for line in out.stdout.lines() {
        assert!(
            line.contains(" rows, 3 partitions, 3 files, "),
            "{line}: 3 providers a day"
        );
    }
    let manifests = local_manifests(&w.root());
    let dates: BTreeSet<&str> = manifests.values().map(|m| m.values[1].1.as_str()).collect();
    assert_eq!(
        dates.into_iter().collect::<Vec<_>>(),
        days(&first, &yesterday),
        "today has not ended: it is not written"
    );
    let ds = w.read_local().await;
    ds.assert_consistent();
    assert_eq!(ds.report_rows(), w.report(&first, &yesterday).await);

    let before = walk(&w.root());
    let again = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(again.code, Some(0), "{again}");
    assert!(
        !again
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("{PIPELINE} 2"))),
        "nothing is due: {again}"
    );
    assert_eq!(
        walk(&w.root()),
        before,
        "a run with nothing due changed files"
    );
    w.cleanup().await;
}

/// The `s3` table of a sink writing to moto.
fn s3_settings(s3: &S3) -> String {
    use caudal_testkit::s3::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
    format!(
        "s3 = {{ endpoint = \"{}\", region = \"{REGION}\", path_style = true, \
         access_key_id = \"{ACCESS_KEY_ID}\", secret_access_key = \"{SECRET_ACCESS_KEY}\" }}\n",
        s3.endpoint()
    )
}

/// Every manifest below `prefix` in `bucket`, parsed (fails on one that
/// does not parse), by partition path.
async fn s3_manifests(s3: &S3, bucket: &str, prefix: &str) -> BTreeMap<String, Manifest> {
    let mut out = BTreeMap::new();
    for key in s3.list(bucket, prefix).await {
        let Some(p) = key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("/_manifest.json"))
        else {
            continue;
        };
        let bytes = s3.get(bucket, &key).await.expect("a listed object");
        let m: Manifest = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{key} is not a manifest: {e}"));
        out.insert(p.to_string(), m);
    }
    out
}

/// 5. The same backfill into `s3://bucket/prefix` (moto): exactly the
///    manifests and the files they name, nothing staged, nothing outside
///    the prefix; pyarrow reads the report through S3; a re-run of a day
///    replaces its objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_to_s3_writes_manifests_and_files_pyarrow_reads() {
    let s3 = S3::start().await;
    s3.create_bucket("reports").await;
    let mut w = Reports::new().await;
    w.generate(3000, "2025-05-01", 3, 4).await;
    w.sink = format!(
        "url = \"s3://reports/sales/daily\"\npartition_by = [\"provider_id\", \"date\"]\n{}",
        s3_settings(&s3)
    );
    w.backfill("2025-05-01", "2025-05-03").await;

    let prefix = "sales/daily/";
    let manifests = s3_manifests(&s3, "reports", prefix).await;
    let counts = w.counts().await;
    assert_eq!(
        manifests.keys().cloned().collect::<BTreeSet<_>>(),
        counts
            .keys()
            .map(|(p, d)| part(*p, d))
            .collect::<BTreeSet<_>>()
    );
    let mut expected_keys = BTreeSet::new();
    for (p, m) in &manifests {
        assert_eq!(m.generation, 1, "{p}");
        assert_eq!(m.partition, *p);
        expected_keys.insert(format!("{prefix}{p}/_manifest.json"));
        for f in &m.files {
            let key = format!("{prefix}{p}/{}", f.path);
            let bytes = s3
                .get("reports", &key)
                .await
                .unwrap_or_else(|| panic!("{key} is missing"));
            assert_eq!(bytes.len() as u64, f.bytes, "{key}");
            assert_eq!(&bytes[..4], b"PAR1", "{key}");
            expected_keys.insert(key);
        }
    }
    let all: BTreeSet<String> = s3.list("reports", "").await.into_iter().collect();
    assert_eq!(all, expected_keys, "exactly the manifests and their files");

    let at = Where::S3 {
        endpoint: s3.endpoint(),
        root: "reports/sales/daily".into(),
    };
    let ds = read_dataset(at.clone()).await;
    ds.assert_consistent();
    assert_eq!(ds.report_rows(), w.report("2025-05-01", "2025-05-03").await);

    // A re-run of a day replaces its objects, and only them.
    w.exec(
        "update seed003.sales set amount = amount + 0.05 \
         where sold_at >= '2025-05-02' and sold_at < '2025-05-03'",
    )
    .await;
    w.once("2025-05-02").await;
    let after: BTreeSet<String> = s3.list("reports", "").await.into_iter().collect();
    let new = s3_manifests(&s3, "reports", prefix).await;
    for (p, m) in &new {
        let o = &manifests[p];
        if p.ends_with("2025-05-02") {
            assert_eq!(m.generation, 2, "{p}");
            for f in &o.files {
                assert!(
                    !after.contains(&format!("{prefix}{p}/{}", f.path)),
                    "{p}/{} is still there",
                    f.path
                );
            }
        } else {
            assert_eq!(m, o, "{p} changed");
        }
    }
    let ds = read_dataset(at).await;
    ds.assert_consistent();
    assert!(ds.unnamed().is_empty(), "{:?}", ds.unnamed());
    assert_eq!(ds.report_rows(), w.report("2025-05-01", "2025-05-03").await);
    w.cleanup().await;
}

/// When a crash test kills the write.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// As soon as a staged (hidden) file exists: while rows are encoded.
    Staged,
    /// As soon as `n` files no manifest named before are visible.
    NewFiles(usize),
    /// As soon as `n` manifests changed.
    Manifests(usize),
    /// After this share of an uninterrupted write's time.
    Share(f64),
}

/// What a killed write may have left: every manifest names files that are
/// there, whole, with the rows it says; each partition holds either its old
/// rows or its new rows. Returns how many partitions hold the new ones.
fn assert_old_or_new(
    ds: &Dataset,
    old: &BTreeMap<(i64, String), i64>,
    new: &BTreeMap<(i64, String), i64>,
    when: &str,
) -> usize {
    ds.assert_consistent();
    let manifests = ds.manifests();
    let mut newer = 0;
    for (key, n) in old {
        let p = part(key.0, &key.1);
        let m = manifests
            .get(&p)
            .unwrap_or_else(|| panic!("{when}: {p} lost its manifest"));
        let rows = i64::try_from(m.rows).expect("rows");
        assert!(
            rows == *n || rows == new[key],
            "{when}: {p} holds {rows} rows, neither the old {n} nor the new {}",
            new[key]
        );
        if rows == new[key] && rows != *n {
            newer += 1;
        }
    }
    newer
}

/// Runs `caudal backfill` for the world's two days and kills it with
/// SIGKILL when `at` says (unless it ends first); returns whether it was
/// killed. `progress` tells how far the write got: (staged files, new
/// files, changed manifests).
async fn kill_backfill_at(
    w: &Reports,
    at: KillAt,
    full_run: Duration,
    progress: &(dyn Fn() -> Progress + Sync),
) -> bool {
    let log = std::fs::File::create(w.dir.path().join("killed.log")).expect("a log");
    let mut cmd = w.command(&[
        "backfill",
        PIPELINE,
        "--from",
        "2025-05-01",
        "--to",
        "2025-05-02",
        "--parallel",
        "2",
    ]);
    cmd.stdout(Stdio::from(log.try_clone().expect("a log")))
        .stderr(Stdio::from(log));
    let mut child = cmd.spawn().expect("start caudal backfill");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("watch caudal") {
            assert!(status.success(), "the backfill failed on its own: {status}");
            return false;
        }
        let p = progress();
        let now = match at {
            KillAt::Staged => p.staged > 0,
            KillAt::NewFiles(n) => p.new_files >= n,
            KillAt::Manifests(n) => p.manifests >= n,
            KillAt::Share(s) => started.elapsed() >= full_run.mul_f64(s),
        };
        if now {
            send_signal(&child, Signal::SIGKILL);
            let status = child.wait().await.expect("reap caudal");
            return !status.success();
        }
        assert!(started.elapsed() < PATIENCE, "the backfill took too long");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How far a write got, as a crash test sees it from outside.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Staged (hidden) files.
    staged: usize,
    /// Data files no manifest named before the write.
    new_files: usize,
    /// Manifests changed since before the write.
    manifests: usize,
}

/// Every day's sales change (a different subset each round), so each
/// partition's old and new row counts differ.
async fn change_every_partition(w: &Reports, round: usize) {
    w.exec(&format!(
        "delete from seed003.sales where sale_id % 13 = {round}"
    ))
    .await;
}

/// After a finished write: every partition of the dates of `counts` has a
/// manifest that holds the rows PostgreSQL counts for it, and names files
/// that are there with the size it states; no other partition of those
/// dates has one (no Python: quick enough to run after every round).
fn assert_local_holds(root: &Path, counts: &BTreeMap<(i64, String), i64>, when: &str) {
    let dates: BTreeSet<&String> = counts.keys().map(|(_, d)| d).collect();
    let manifests: BTreeMap<String, Manifest> = local_manifests(root)
        .into_iter()
        .filter(|(_, m)| {
            m.values
                .iter()
                .any(|(c, v)| c == "date" && dates.contains(v))
        })
        .collect();
    let on_disk = walk(root);
    assert_eq!(
        manifests.keys().cloned().collect::<BTreeSet<_>>(),
        counts
            .keys()
            .map(|(p, d)| part(*p, d))
            .collect::<BTreeSet<_>>(),
        "{when}"
    );
    for ((provider, date), n) in counts {
        let p = part(*provider, date);
        let m = &manifests[&p];
        assert_eq!(i64::try_from(m.rows).expect("rows"), *n, "{when}: {p}");
        for f in &m.files {
            let file = format!("{p}/{}", f.path);
            assert_eq!(
                on_disk.get(&file).map(|(size, _)| *size),
                Some(f.bytes),
                "{when}: {file}"
            );
        }
    }
}

/// 6. SIGKILL at any point of a local write (encoding, publishing files,
///    between manifests, at a random time) leaves every partition's
///    manifest old and whole or new and whole, naming only files that are
///    there; the next backfill finishes and writes the right rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_local_write_leaves_every_partition_old_or_new() {
    let mut w = Reports::new().await;
    w.generate(16000, "2025-05-01", 2, 8).await;
    w.query = DETAIL_QUERY.into();
    w.sink = format!(
        "url = \"data/{DATASET}\"\npartition_by = [\"provider_id\", \"date\"]\n\
         row_group_rows = 100\nfile_max_rows = 300\n"
    );
    let started = Instant::now();
    w.backfill("2025-05-01", "2025-05-02").await;
    let full_run = started.elapsed();
    let root = w.root();
    let mut old = w.counts().await;
    let rounds = [
        KillAt::Staged,
        KillAt::NewFiles(1),
        KillAt::Manifests(1),
        KillAt::Manifests(8),
        KillAt::Share(0.2),
        KillAt::Share(0.5),
    ];
    let mut killed = 0;
    let mut mixed = 0;
    for (round, at) in rounds.into_iter().enumerate() {
        change_every_partition(&w, round).await;
        let new = w.counts().await;
        let before = local_manifests(&root);
        let named: BTreeSet<String> = before
            .iter()
            .flat_map(|(p, m)| m.files.iter().map(move |f| format!("{p}/{}", f.path)))
            .collect();
        let progress = || {
            let files = walk(&root);
            let name = |f: &String| f.rsplit('/').next().unwrap_or_default().to_string();
            let staged = files
                .keys()
                .filter(|f| name(f).starts_with(".part-"))
                .count();
            let new_files = files
                .keys()
                .filter(|f| name(f).starts_with("part-") && !named.contains(*f))
                .count();
            let manifests = local_manifests(&root)
                .iter()
                .filter(|(p, m)| before.get(*p).is_none_or(|b| b.generation != m.generation))
                .count();
            Progress {
                staged,
                new_files,
                manifests,
            }
        };
        let was_killed = kill_backfill_at(&w, at, full_run, &progress).await;
        killed += usize::from(was_killed);
        let when = format!("round {round}, killed at {at:?} (killed: {was_killed})");
        // pyarrow reads every file a manifest names.
        let ds = w.read_local().await;
        let newer = assert_old_or_new(&ds, &old, &new, &when);
        if newer > 0 && newer < old.len() {
            mixed += 1;
        }
        eprintln!("{when}: {newer} of {} partitions new", old.len());

        // The next backfill finishes and writes exactly the new rows.
        w.backfill("2025-05-01", "2025-05-02").await;
        assert_local_holds(&root, &new, &format!("{when}, after the next backfill"));
        old = new;
    }
    let ds = w.read_local().await;
    ds.assert_consistent();
    assert_eq!(
        ids_by_partition(&ds),
        pg_ids_by_partition(&w).await,
        "every sale, once, in its partition"
    );
    assert!(killed >= 4, "only {killed} of the writes were killed");
    assert!(
        mixed >= 1,
        "no kill landed between two partitions' commits; the test did not test that"
    );
    w.cleanup().await;
}

/// 6c. A partition that a killed first write of a date committed, and that
///     the date's re-run no longer writes (its rows went from the source
///     meanwhile), loses that date's files like any partition a date
///     stops writing: the dataset on disk matches the source again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_committed_by_a_killed_write_goes_when_the_rerun_no_longer_writes_it() {
    let mut w = Reports::new().await;
    w.generate(16000, "2025-05-01", 2, 8).await;
    w.query = DETAIL_QUERY.into();
    w.sink = format!(
        "url = \"data/{DATASET}\"\npartition_by = [\"provider_id\", \"date\"]\n\
         row_group_rows = 100\nfile_max_rows = 300\n"
    );
    let root = w.root();
    let mut exercised = None;
    for date in ["2025-05-01", "2025-05-02"] {
        let log =
            std::fs::File::create(w.dir.path().join(format!("killed-{date}.log"))).expect("a log");
        let mut cmd = w.command(&["once", PIPELINE, "--date", date]);
        cmd.stdout(Stdio::from(log.try_clone().expect("a log")))
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("start caudal once");
        let deadline = Instant::now() + PATIENCE;
        let killed = loop {
            if child.try_wait().expect("watch caudal").is_some() {
                break false;
            }
            let committed = local_manifests(&root)
                .keys()
                .any(|p| p.ends_with(&format!("date={date}")));
            if committed {
                send_signal(&child, Signal::SIGKILL);
                child.wait().await.expect("reap caudal");
                break true;
            }
            assert!(Instant::now() < deadline, "caudal once took too long");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let committed: Vec<String> = local_manifests(&root)
            .into_keys()
            .filter(|p| p.ends_with(&format!("date={date}")))
            .collect();
        if killed && !committed.is_empty() {
            exercised = Some((date, committed[0].clone()));
            break;
        }
    }
    let (date, gone) = exercised.expect("no kill landed after a partition's commit");
    let provider: i64 = gone
        .strip_prefix("provider_id=")
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("a provider id");
    // The provider's sales of that day go; the day is written again.
    w.exec(&format!(
        "delete from seed003.sales where provider_id = {provider} \
         and sold_at >= '{date}' and sold_at < '{date}'::date + 1"
    ))
    .await;
    w.once(date).await;
    let day_counts: BTreeMap<(i64, String), i64> = w
        .counts()
        .await
        .into_iter()
        .filter(|((_, d), _)| d == date)
        .collect();
    let on_disk: BTreeSet<String> = local_manifests(&root)
        .into_keys()
        .filter(|p| p.ends_with(&format!("date={date}")))
        .collect();
    assert!(
        !on_disk.contains(&gone),
        "{gone}: the killed write's partition still holds its rows, which the source no \
         longer has (the re-run did not write it, and nothing removed it)"
    );
    assert_local_holds(&root, &day_counts, &format!("{date} after the re-run"));
    w.cleanup().await;
}

/// What a crash test's S3 watcher saw last: data objects no manifest named
/// before the write, and manifests whose generation changed.
#[derive(Debug, Default)]
struct S3Seen {
    new_files: std::sync::atomic::AtomicUsize,
    manifests: std::sync::atomic::AtomicUsize,
}

/// Polls moto (plain HTTP, no fixture borrow) until `stop`: what changed
/// below `prefix` of `bucket` since `before` (keys, and manifests'
/// generations by key).
async fn watch_s3(
    endpoint: String,
    bucket: &'static str,
    prefix: &'static str,
    before: BTreeSet<String>,
    generations: BTreeMap<String, u64>,
    seen: std::sync::Arc<S3Seen>,
    stop: tokio_util::sync::CancellationToken,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("an HTTP client");
    // Moto reads private objects only with some Authorization header.
    let auth = "AWS4-HMAC-SHA256 Credential=x/20250101/us-east-1/s3/aws4_request, \
                SignedHeaders=host, Signature=0";
    while !stop.is_cancelled() {
        let url = format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}");
        if let Ok(r) = http.get(&url).header("authorization", auth).send().await
            && let Ok(xml) = r.text().await
        {
            let keys: Vec<&str> = xml
                .split("<Key>")
                .skip(1)
                .filter_map(|s| s.split("</Key>").next())
                .collect();
            let fresh = keys
                .iter()
                .filter(|k| k.contains("/part-") && !before.contains(**k))
                .count();
            seen.new_files.store(fresh, SeqCst);
            let mut changed = 0;
            for k in keys.iter().filter(|k| k.ends_with("/_manifest.json")) {
                let url = format!("{endpoint}/{bucket}/{k}");
                if let Ok(r) = http.get(&url).header("authorization", auth).send().await
                    && let Ok(bytes) = r.bytes().await
                    && let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
                    && generations.get(*k) != Some(&m.generation)
                {
                    changed += 1;
                }
            }
            seen.manifests.store(changed, SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 6b. The same on S3 (moto): a write killed while it uploads or commits
///     leaves every manifest naming whole objects; the next backfill
///     repairs the days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_s3_write_leaves_every_partition_old_or_new() {
    use std::sync::atomic::Ordering::SeqCst;
    let s3 = S3::start().await;
    s3.create_bucket("crash").await;
    let mut w = Reports::new().await;
    w.generate(12000, "2025-05-01", 2, 4).await;
    w.query = DETAIL_QUERY.into();
    w.sink = format!(
        "url = \"s3://crash/detail\"\npartition_by = [\"provider_id\", \"date\"]\n\
         row_group_rows = 100\nfile_max_rows = 300\n{}",
        s3_settings(&s3)
    );
    let started = Instant::now();
    w.backfill("2025-05-01", "2025-05-02").await;
    let full_run = started.elapsed();
    let at_s3 = Where::S3 {
        endpoint: s3.endpoint(),
        root: "crash/detail".into(),
    };
    let mut old = w.counts().await;
    let rounds = [
        KillAt::NewFiles(1),
        KillAt::Manifests(1),
        KillAt::Share(0.6),
    ];
    let mut killed = 0;
    for (round, at) in rounds.into_iter().enumerate() {
        change_every_partition(&w, round).await;
        let new = w.counts().await;
        let before: BTreeSet<String> = s3.list("crash", "detail/").await.into_iter().collect();
        let generations = s3_manifests(&s3, "crash", "detail/")
            .await
            .into_iter()
            .map(|(p, m)| (format!("detail/{p}/_manifest.json"), m.generation))
            .collect();
        let seen = std::sync::Arc::new(S3Seen::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(watch_s3(
            s3.endpoint(),
            "crash",
            "detail/",
            before,
            generations,
            seen.clone(),
            stop.clone(),
        ));
        let progress = || Progress {
            staged: 0,
            new_files: seen.new_files.load(SeqCst),
            manifests: seen.manifests.load(SeqCst),
        };
        let was_killed = kill_backfill_at(&w, at, full_run, &progress).await;
        stop.cancel();
        watcher.await.expect("the watcher");
        killed += usize::from(was_killed);
        let when = format!("S3 round {round}, killed at {at:?} (killed: {was_killed})");
        let ds = read_dataset(at_s3.clone()).await;
        let newer = assert_old_or_new(&ds, &old, &new, &when);
        eprintln!("{when}: {newer} of {} partitions new", old.len());

        w.backfill("2025-05-01", "2025-05-02").await;
        let manifests = s3_manifests(&s3, "crash", "detail/").await;
        for ((provider, date), n) in &new {
            let p = part(*provider, date);
            assert_eq!(
                manifests
                    .get(&p)
                    .map(|m| i64::try_from(m.rows).expect("rows")),
                Some(*n),
                "{when}, after the next backfill: {p}"
            );
        }
        old = new;
    }
    let ds = read_dataset(at_s3).await;
    ds.assert_consistent();
    assert_eq!(
        ids_by_partition(&ds),
        pg_ids_by_partition(&w).await,
        "every sale, once, in its partition"
    );
    assert!(killed >= 2, "only {killed} of the writes were killed");
    w.cleanup().await;
}

/// 7. JSON Lines with gzip: `.jsonl.gz` files (gzip bytes) whose lines are
///    the report's rows, partition columns left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_with_gzip_writes_the_report_as_gzipped_lines() {
    let mut w = Reports::new().await;
    w.generate(2000, "2025-05-01", 2, 3).await;
    w.sink = format!(
        "url = \"data/{DATASET}\"\nformat = \"jsonl\"\ncompression = \"gzip\"\n\
         partition_by = [\"provider_id\", \"date\"]\n"
    );
    w.backfill("2025-05-01", "2025-05-02").await;
    let ds = w.read_local().await;
    ds.assert_consistent();
    let expected = w.report("2025-05-01", "2025-05-02").await;
    assert_eq!(ds.partitions.len(), expected.len());
    for (p, read) in &ds.partitions {
        let m = read.manifest.as_ref().expect("a manifest");
        assert_eq!(m.format, "jsonl", "{p}");
        for f in &read.files {
            assert!(f.path.ends_with(".jsonl.gz"), "{p}/{}", f.path);
            assert_eq!(f.gzip, Some(true), "{p}/{}: gzip bytes", f.path);
        }
    }
    let mut got: Vec<ReportRow> = ds
        .rows
        .iter()
        .map(|r| {
            let keys: Vec<&str> = r.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "provider_id",
                    "date",
                    "sales",
                    "units",
                    "revenue",
                    "first_sale",
                    "last_sale",
                    "_partition"
                ],
                "a line has the report's columns, partition columns left out: {r:?}"
            );
            let revenue = match &r["revenue"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let time =
                |k: &str| rfc3339_micros(r[k].as_str().unwrap_or_else(|| panic!("{k}: {r:?}")));
            ReportRow {
                provider_id: r["provider_id"]
                    .as_str()
                    .expect("a value")
                    .parse()
                    .expect("an id"),
                date: r["date"].as_str().expect("a date").to_string(),
                sales: r["sales"].as_i64().expect("sales"),
                units: r["units"].as_i64().expect("units"),
                revenue,
                first_sale: time("first_sale"),
                last_sale: time("last_sale"),
            }
        })
        .collect();
    got.sort();
    assert_eq!(got, expected);
    w.cleanup().await;
}

/// A valid report config that needs no service to validate.
const GOOD: &str = r#"[state]
url = "sqlite://caudal-state.db"

[sources.sales]
type = "postgres"
url = "postgres://postgres@127.0.0.1:9/nowhere"
mode = "query"
query = """select provider_id, count(*) as sales, sum(amount) as revenue
from seed003.sales where sold_at >= {{ date }} and sold_at < {{ next_date }} group by provider_id"""

[sinks.sales_daily]
type = "files"
url = "data/sales_daily"
format = "parquet"
partition_by = ["provider_id", "date"]
types = { revenue = "decimal(18,2)" }
retention = "400d"

[sinks.partner]
type = "http"
url = "http://127.0.0.1:9/reports"

[pipelines.daily_sales]
source = "sales"
sink = "sales_daily"
schedule = { cron = "0 2 * * *", start_date = "2025-05-01" }
"#;

/// 8. `caudal validate` refuses a `files` sink fed by a non-query source (and
///    a query source feeding another sink), a bad `types` entry, retention
///    without the date column and a codec of the other format: exit 2,
///    each problem as `file:line:col: path: message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_files_sink_mistakes_with_their_position() {
    struct Case {
        what: &'static str,
        edits: &'static [(&'static str, &'static str)],
        /// Where the error must point: the first occurrence of this text.
        at: &'static str,
        path: &'static str,
        message: &'static str,
    }
    let cases = [
        Case {
            what: "a files sink fed by an incremental source",
            edits: &[
                (
                    "mode = \"query\"\nquery = \"\"\"select provider_id, count(*) as sales, \
                     sum(amount) as revenue\nfrom seed003.sales where sold_at >= {{ date }} \
                     and sold_at < {{ next_date }} group by provider_id\"\"\"",
                    "table = \"seed003.sales\"\ncursor = [\"sale_id\"]",
                ),
                (
                    "schedule = { cron = \"0 2 * * *\", start_date = \"2025-05-01\" }",
                    "schedule = { cron = \"0 2 * * *\" }",
                ),
            ],
            at: "\"sales\"",
            path: "pipelines.daily_sales.source",
            message: "its source must be a SQL source with mode = \"query\"",
        },
        Case {
            what: "a report query feeding an http sink",
            edits: &[("sink = \"sales_daily\"", "sink = \"partner\"")],
            at: "\"partner\"\n",
            path: "pipelines.daily_sales.sink",
            message: "`type = \"files\"` sink",
        },
        Case {
            what: "a decimal too wide",
            edits: &[("\"decimal(18,2)\"", "\"decimal(40,2)\"")],
            at: "\"decimal(40,2)\"",
            path: "sinks.sales_daily.types.revenue",
            message: "the precision must be 1 to 38",
        },
        Case {
            what: "an unknown type",
            edits: &[("\"decimal(18,2)\"", "\"money\"")],
            at: "\"money\"",
            path: "sinks.sales_daily.types.revenue",
            message: "unknown type \"money\"",
        },
        Case {
            what: "retention without the date column",
            edits: &[(
                "partition_by = [\"provider_id\", \"date\"]",
                "partition_by = [\"provider_id\"]",
            )],
            at: "\"400d\"",
            path: "sinks.sales_daily.retention",
            message: "add \"date\" to partition_by",
        },
        Case {
            what: "gzip for Parquet",
            edits: &[(
                "format = \"parquet\"",
                "format = \"parquet\"\ncompression = \"gzip\"",
            )],
            at: "\"gzip\"",
            path: "sinks.sales_daily.compression",
            message: "Parquet files here use zstd, snappy or none",
        },
    ];
    let dir = tempfile::tempdir().expect("a directory");
    let validate = |file: &Path| {
        let mut cmd = support::command(file, dir.path(), &["validate"]);
        datasets_support::clean(&mut cmd, dir.path());
        Output::of(cmd)
    };
    let good = dir.path().join("good.toml");
    std::fs::write(&good, GOOD).expect("write");
    let out = validate(&good).await;
    assert_eq!(out.code, Some(0), "the good config validates: {out}");

    for (i, case) in cases.iter().enumerate() {
        let mut config = GOOD.to_string();
        for (from, to) in case.edits {
            assert!(
                config.contains(from),
                "{}: {from:?} is not in the config",
                case.what
            );
            config = config.replacen(from, to, 1);
        }
        let file = dir.path().join(format!("broken-{i}.toml"));
        std::fs::write(&file, &config).expect("write");
        let out = validate(&file).await;
        assert_eq!(out.code, Some(2), "{}: {out}", case.what);
        let (line, col) = config
            .lines()
            .enumerate()
            .find_map(|(n, l)| {
                let needle = case.at.trim_end_matches('\n');
                let found = if case.at.ends_with('\n') {
                    l.ends_with(needle).then(|| l.len() - needle.len())
                } else {
                    l.find(needle)
                };
                found.map(|c| (n + 1, c + 1))
            })
            .unwrap_or_else(|| panic!("{}: {:?} is not in the config", case.what, case.at));
        let file = file.display();
        let prefix = format!("error: {file}:{line}:{col}: {}: ", case.path);
        let reported = out
            .stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "{}: no line starting {prefix:?} in:\n{}",
                    case.what, out.stderr
                )
            });
        assert!(reported.contains(case.message), "{}: {reported}", case.what);
        assert!(
            out.stderr.contains(&format!("1 error in {file}")),
            "{}: {}",
            case.what,
            out.stderr
        );
    }
}
