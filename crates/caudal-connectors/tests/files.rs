//! The files sink on a local directory: staging, the per-partition commit
//! (replace a date, keep the others), manifests, and the reader's pruning.

#![cfg(feature = "files")]

use std::sync::Arc;

use caudal_connectors::sinks::files::{
    self, Filter, Location, Resume, RowQuery, RunSpec, RunWriter, commit_partition,
};
use caudal_core::config::{ColumnType, FilesSinkConfig};
use serde_json::{Value, json};

fn sink(dir: &std::path::Path, partition_by: &[&str]) -> FilesSinkConfig {
    let text = format!(
        "url = {:?}\npartition_by = {:?}\nrow_group_rows = 2\nfile_max_rows = 3\n",
        dir.display().to_string(),
        partition_by
    );
    toml::from_str(&text).expect("a files sink")
}

fn columns() -> Vec<(String, ColumnType)> {
    vec![
        ("provider_id".into(), ColumnType::Int32),
        (
            "amount".into(),
            ColumnType::Decimal {
                precision: 38,
                scale: -1,
            },
        ),
        ("note".into(), ColumnType::Text),
    ]
}

/// Writes `rows` as date `date`'s run and commits every partition it
/// made (and those `previous` names, emptied of the date).
async fn write(
    location: &Location,
    config: &FilesSinkConfig,
    date: &str,
    rows: &[Value],
    previous: &[&str],
) -> Vec<String> {
    let spec = RunSpec {
        dataset: "sales".into(),
        pipeline: "daily".into(),
        date: date.parse().expect("a date"),
        run: format!("run{}", date.replace('-', "")),
        query_sha256: "0".repeat(64),
    };
    let mut writer =
        RunWriter::new(location, Arc::new(config.clone()), spec, &columns()).expect("a writer");
    for row in rows {
        writer
            .push_json(row.as_object().expect("an object"))
            .expect("row taken");
    }
    let (staged, _tmp) = writer.finish().expect("finished");
    let mut paths = Vec::new();
    for p in staged {
        let path = p.path.clone();
        commit_partition(location, "sales", "parquet", date, &path, Some(p))
            .await
            .expect("committed");
        paths.push(path);
    }
    for p in previous {
        if !paths.iter().any(|x| x == p) {
            commit_partition(location, "sales", "parquet", date, p, None)
                .await
                .expect("emptied");
        }
    }
    paths
}

fn visible(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        out.push(
            entry
                .strip_prefix(dir)
                .expect("inside")
                .display()
                .to_string(),
        );
    }
    out.sort();
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("a directory") {
        let p = e.expect("an entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_rerun_replaces_its_date_and_keeps_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = sink(tmp.path(), &["provider_id", "date"]);
    let location = Location::open(&config, tmp.path()).expect("location");
    let day1 = [
        json!({"provider_id": 7, "amount": "10.50", "note": "a"}),
        json!({"provider_id": 7, "amount": "-0.25", "note": null}),
        json!({"provider_id": 8, "amount": "3", "note": "c"}),
    ];
    let day2 = [json!({"provider_id": 7, "amount": "1.00", "note": "d"})];
    write(&location, &config, "2025-05-14", &day1, &[]).await;
    write(&location, &config, "2025-05-15", &day2, &[]).await;
    let before_15 = std::fs::read(
        tmp.path()
            .join("provider_id=7/date=2025-05-15/part-000-run20250515.parquet"),
    )
    .expect("day 2's file");
    // Day 1 again: provider 8 has no rows any more, provider 7 has one.
    let again = [json!({"provider_id": 7, "amount": "99.99", "note": "z"})];
    let spec_run = write(
        &location,
        &config,
        "2025-05-14",
        &again,
        &[
            "provider_id=7/date=2025-05-14",
            "provider_id=8/date=2025-05-14",
        ],
    )
    .await;
    assert_eq!(spec_run, ["provider_id=7/date=2025-05-14"]);
    let m = files::read_manifest(&location, "provider_id=7/date=2025-05-14")
        .await
        .expect("read")
        .expect("a manifest");
    assert_eq!((m.generation, m.rows, m.files.len()), (2, 1, 1));
    assert_eq!(m.files[0].stats["amount"].max, Some(json!("99.99")));
    assert!(
        files::read_manifest(&location, "provider_id=8/date=2025-05-14")
            .await
            .expect("read")
            .is_none(),
        "provider 8's day 1 is gone with its only date"
    );
    assert_eq!(
        std::fs::read(
            tmp.path()
                .join("provider_id=7/date=2025-05-15/part-000-run20250515.parquet")
        )
        .expect("day 2's file"),
        before_15,
        "day 2 untouched"
    );
    // Same run name (the test reuses it), so the file name is the same;
    // no staged leftovers, no orphan of provider 8.
    assert_eq!(
        visible(tmp.path()),
        [
            "provider_id=7/date=2025-05-14/_manifest.json",
            "provider_id=7/date=2025-05-14/part-000-run20250514.parquet",
            "provider_id=7/date=2025-05-15/_manifest.json",
            "provider_id=7/date=2025-05-15/part-000-run20250515.parquet",
        ]
    );
}

#[tokio::test]
async fn a_partition_without_the_date_holds_several_dates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = sink(tmp.path(), &["provider_id"]);
    let location = Location::open(&config, tmp.path()).expect("location");
    let rows = |n: usize, amount: &str| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"provider_id": 1, "amount": amount, "note": format!("n{i}")}))
            .collect()
    };
    write(&location, &config, "2025-05-14", &rows(4, "1.5"), &[]).await;
    write(&location, &config, "2025-05-15", &rows(2, "2.5"), &[]).await;
    let m = files::read_manifest(&location, "provider_id=1")
        .await
        .expect("read")
        .expect("a manifest");
    // 4 rows with at most 3 per file: two files for the 14th, one for the 15th.
    assert_eq!(m.rows, 6);
    assert_eq!(
        m.files
            .iter()
            .map(|f| (f.source.logical_date.as_str(), f.rows))
            .collect::<Vec<_>>(),
        [("2025-05-14", 3), ("2025-05-14", 1), ("2025-05-15", 2)]
    );
    write(&location, &config, "2025-05-14", &rows(1, "9"), &[]).await;
    let m = files::read_manifest(&location, "provider_id=1")
        .await
        .expect("read")
        .expect("a manifest");
    assert_eq!(m.rows, 3, "the 14th replaced, the 15th kept");
    assert_eq!(m.generation, 3);
}

#[tokio::test]
async fn the_reader_prunes_by_statistics_and_pages_by_cursor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = sink(tmp.path(), &["date"]);
    let location = Location::open(&config, tmp.path()).expect("location");
    for (date, base) in [("2025-05-14", 0), ("2025-05-15", 100)] {
        let rows: Vec<Value> = (0..5)
            .map(|i| json!({"provider_id": base + i, "amount": format!("{i}.0"), "note": null}))
            .collect();
        write(&location, &config, date, &rows, &[]).await;
    }
    let manifests = files::manifests(
        &location,
        &["date=2025-05-14".to_string(), "date=2025-05-15".to_string()],
    )
    .await
    .expect("manifests");
    // provider_id >= 100 is only in the 15th's files: the 14th's are pruned.
    let query = RowQuery {
        filters: vec![Filter::Range {
            column: "provider_id".into(),
            from: Some("100".into()),
            to: None,
        }],
        columns: None,
        limit: 3,
        start: Resume::default(),
    };
    let page = files::read_rows(&location, &manifests, &query)
        .await
        .expect("a page");
    assert_eq!(page.files_pruned, 2);
    assert_eq!(page.rows.len(), 3);
    assert_eq!(page.rows[0]["date"], json!("2025-05-15"));
    assert_eq!(page.rows[0]["amount"], json!("0.0"));
    assert_eq!(page.rows[0]["note"], Value::Null);
    let mut all: Vec<i64> = page
        .rows
        .iter()
        .map(|r| r["provider_id"].as_i64().expect("int"))
        .collect();
    let mut next = page.next;
    while let Some(start) = next {
        let page = files::read_rows(
            &location,
            &manifests,
            &RowQuery {
                start,
                ..query.clone()
            },
        )
        .await
        .expect("a page");
        all.extend(
            page.rows
                .iter()
                .map(|r| r["provider_id"].as_i64().expect("int")),
        );
        next = page.next;
    }
    assert_eq!(all, [100, 101, 102, 103, 104]);
    // A bad value for a typed column is the caller's error, named.
    let bad = RowQuery {
        filters: vec![Filter::Eq {
            column: "amount".into(),
            value: "lots".into(),
        }],
        ..query
    };
    let e = files::read_rows(&location, &manifests, &bad)
        .await
        .expect_err("a bad value");
    assert!(e.to_string().contains("amount"), "{e}");
}

/// The one data file of partition `path` (panics unless exactly one).
fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("a partition")
        .map(|e| e.expect("an entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn codecs_and_file_sizes_are_as_configured() {
    use parquet::file::reader::FileReader as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let rows: Vec<Value> = (0..2000)
        .map(|i| json!({"provider_id": i, "amount": format!("{i}.25"), "note": format!("note {i} {}", "x".repeat(40))}))
        .collect();
    // Parquet with snappy; small files: a new file past 1 KiB.
    let mut config = sink(&tmp.path().join("snappy"), &["date"]);
    config.compression = Some(caudal_core::config::Compression::Snappy);
    config.file_max_rows = 1_000_000;
    config.row_group_rows = 500;
    config.file_max_bytes = caudal_core::units::ByteSize(1024);
    let location = Location::open(&config, tmp.path()).expect("location");
    write(&location, &config, "2025-05-14", &rows, &[]).await;
    let parts = files_in(&tmp.path().join("snappy/date=2025-05-14"));
    assert_eq!(
        parts.len(),
        4,
        "one file per 500-row group past 1 KiB: {parts:?}"
    );
    let mut total = 0;
    for p in &parts {
        let reader = parquet::file::reader::SerializedFileReader::new(
            std::fs::File::open(p).expect("a file"),
        )
        .expect("a Parquet file");
        let meta = reader.metadata();
        total += meta.file_metadata().num_rows();
        assert_eq!(
            meta.row_group(0).column(0).compression(),
            parquet::basic::Compression::SNAPPY
        );
    }
    assert_eq!(total, 2000);
    // JSON Lines with zstd: one object per line, partition columns left out.
    let mut config = sink(&tmp.path().join("jsonl"), &["date"]);
    config.format = caudal_core::config::FileFormat::Jsonl;
    config.file_max_rows = 1_000_000;
    let location = Location::open(&config, tmp.path()).expect("location");
    write(&location, &config, "2025-05-14", &rows[..10], &[]).await;
    let parts = files_in(&tmp.path().join("jsonl/date=2025-05-14"));
    assert_eq!(parts.len(), 1);
    assert!(parts[0].to_string_lossy().ends_with(".jsonl.zst"));
    let text = zstd::decode_all(std::fs::File::open(&parts[0]).expect("a file")).expect("zstd");
    let lines: Vec<Value> = String::from_utf8(text)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(
        lines[3],
        json!({"provider_id": 3, "amount": "3.25", "note": rows[3]["note"]})
    );
}
