//! A world for the datasets tests (seed 003, batch reports): a fresh
//! PostgreSQL database with the seed's `seed003.sales` table, a directory
//! for the state store, the config and a local dataset, the config of one
//! report pipeline writing a `files` sink, and readers that check what the
//! sink wrote from outside caudal: PostgreSQL's own report
//! (`examples/seed-003/report.sql`) and pyarrow following the manifests.
//!
//! Declared by the test files that use it with
//! `#[path = "support/datasets.rs"] mod datasets_support;` next to
//! `mod support;`, whose process helpers it uses.
//!
//! Every test builds its own world (its own database, directory and, when
//! it has one, S3 server and port), so tests run in parallel. A missing
//! `psql`, PostgreSQL or Python interpreter fails the test; nothing skips.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use caudal_core::dataset::Manifest;
use caudal_testkit::{TestDb, pg_database};
use serde_json::{Map, Value};

use crate::support::{Output, command};

/// The report pipeline every world's config defines.
pub const PIPELINE: &str = "daily_sales";
/// The dataset (the `files` sink) a world writes by default.
pub const DATASET: &str = "sales_daily";

/// The seed's daily report per provider, as the brief writes it: the query
/// runs once per logical date.
pub const REPORT_QUERY: &str = "select provider_id, count(*) as sales, \
    sum(quantity)::bigint as units, sum(amount) as revenue, \
    min(sold_at) as first_sale, max(sold_at) as last_sale \
    from seed003.sales where sold_at >= {{ date }} and sold_at < {{ next_date }} \
    group by provider_id";

/// Every sale of a day, one row each: partitions with many rows.
pub const DETAIL_QUERY: &str = "select sale_id, provider_id, product_id, quantity, amount, \
    channel, sold_at from seed003.sales \
    where sold_at >= {{ date }} and sold_at < {{ next_date }}";

/// The seed-003 scripts of the repository.
pub fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-003")
}

/// One test's world. See the module docs.
pub struct Reports {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    /// The sink's (and so the dataset's) name.
    pub dataset: String,
    /// The source's `query`.
    pub query: String,
    /// The body of the sink's table, after `type = "files"`.
    pub sink: String,
    /// The pipeline's `schedule.start_date`.
    pub start_date: String,
    /// Extra entries of the pipeline's `schedule` table, e.g.
    /// `, catch_up = false`.
    pub schedule_extra: String,
    /// Tables appended to the config (`[server]`, `[cache]`).
    pub extra: String,
}

impl Reports {
    /// A fresh database with an empty `seed003.sales` (the seed's
    /// schema.sql), writing the report into `data/sales_daily` as Parquet
    /// partitioned by provider and date. Call [`Reports::cleanup`] at the end.
    pub async fn new() -> Self {
        let world = Self {
            db: pg_database().await,
            dir: tempfile::tempdir().expect("a temporary directory"),
            dataset: DATASET.into(),
            query: REPORT_QUERY.into(),
            sink: format!(
                "url = \"data/{DATASET}\"\nformat = \"parquet\"\n\
                 partition_by = [\"provider_id\", \"date\"]\n"
            ),
            start_date: "2025-05-01".into(),
            schedule_extra: String::new(),
            extra: String::new(),
        };
        std::fs::create_dir_all(world.tmp()).expect("a temporary directory for caudal");
        world
            .psql(&["-f", &seed_dir().join("schema.sql").display().to_string()])
            .await;
        world
    }

    /// Drops the database.
    pub async fn cleanup(self) {
        self.db.cleanup().await;
    }

    /// Runs `psql` against the world's database with `args` (stops at the
    /// first error); returns what it printed.
    pub async fn psql(&self, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new("psql");
        cmd.arg(self.db.url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .env("PGTZ", "UTC")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = cmd.output().await.unwrap_or_else(|e| {
            panic!("cannot run psql (the datasets tests load the seed with it): {e}")
        });
        assert!(
            out.status.success(),
            "psql {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Fills `seed003.sales` with the seed's generator (replacing what is
    /// there): `rows` sales over `days` days from `from`, `providers`
    /// providers.
    pub async fn generate(&self, rows: u32, from: &str, days: u32, providers: u32) {
        self.psql(&[
            "-v",
            &format!("rows={rows}"),
            "-v",
            &format!("from={from}"),
            "-v",
            &format!("days={days}"),
            "-v",
            &format!("providers={providers}"),
            "-f",
            &seed_dir().join("generate.sql").display().to_string(),
        ])
        .await;
    }

    /// Runs SQL statements against the world's database.
    pub async fn exec(&self, sql: &str) {
        let pool = self.db.pg_pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
    }

    /// PostgreSQL's own report for `from..=to` (the seed's report.sql),
    /// ordered by provider and day.
    pub async fn report(&self, from: &str, to: &str) -> Vec<ReportRow> {
        let text = self
            .psql(&[
                "-A",
                "-t",
                "-F",
                "|",
                "-v",
                &format!("from={from}"),
                "-v",
                &format!("to={to}"),
                "-f",
                &seed_dir().join("report.sql").display().to_string(),
            ])
            .await;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split('|').collect();
                assert_eq!(f.len(), 7, "report.sql printed {line:?}");
                ReportRow {
                    provider_id: f[0].parse().expect("a provider id"),
                    date: f[1].to_string(),
                    sales: f[2].parse().expect("a count"),
                    units: f[3].parse().expect("a sum"),
                    revenue: f[4].to_string(),
                    first_sale: pg_micros(f[5]),
                    last_sale: pg_micros(f[6]),
                }
            })
            .collect()
    }

    /// `(provider_id, day) -> sales` counted by PostgreSQL over every sale.
    pub async fn counts(&self) -> BTreeMap<(i64, String), i64> {
        let text = self
            .psql(&[
                "-A",
                "-t",
                "-F",
                "|",
                "-c",
                "select provider_id, (sold_at at time zone 'UTC')::date, count(*) \
                 from seed003.sales group by 1, 2 order by 1, 2",
            ])
            .await;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split('|').collect();
                (
                    (f[0].parse().expect("an id"), f[1].to_string()),
                    f[2].parse().expect("a count"),
                )
            })
            .collect()
    }

    /// `(provider_id, day) -> sale ids` of every sale, by PostgreSQL.
    pub async fn sale_ids(&self) -> BTreeMap<(i64, String), BTreeSet<i64>> {
        let text = self
            .psql(&[
                "-A",
                "-t",
                "-F",
                "|",
                "-c",
                "select provider_id, (sold_at at time zone 'UTC')::date, sale_id \
                 from seed003.sales",
            ])
            .await;
        let mut out: BTreeMap<(i64, String), BTreeSet<i64>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            out.entry((f[0].parse().expect("an id"), f[1].to_string()))
                .or_default()
                .insert(f[2].parse().expect("a sale id"));
        }
        out
    }

    /// caudal's own scratch directory (`TMPDIR` of every caudal it runs):
    /// what a killed process leaves there goes with the test.
    pub fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    pub fn state_db(&self) -> PathBuf {
        self.dir.path().join("caudal.db")
    }

    /// The local dataset's directory (for the default `url`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data").join(&self.dataset)
    }

    pub fn config_toml(&self) -> String {
        let mut text = String::new();
        text.push_str(&format!(
            "[state]\nurl = \"sqlite://{}\"\n\n",
            self.state_db().display()
        ));
        text.push_str(&format!(
            "[sources.sales]\ntype = \"postgres\"\nurl = \"{}\"\nmode = \"query\"\n",
            self.db.url()
        ));
        text.push_str("query = \"\"\"");
        text.push_str(&self.query);
        text.push_str("\"\"\"\n\n");
        text.push_str(&format!(
            "[sinks.{}]\ntype = \"files\"\n{}\n",
            self.dataset, self.sink
        ));
        text.push_str(&format!(
            "[pipelines.{PIPELINE}]\nsource = \"sales\"\nsink = \"{}\"\n\
             schedule = {{ cron = \"0 2 * * *\", start_date = \"{}\"{} }}\n\n",
            self.dataset, self.start_date, self.schedule_extra
        ));
        text.push_str(&self.extra);
        text
    }

    /// Writes the config (with the world's current settings) and returns
    /// its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("caudal.toml");
        std::fs::write(&path, self.config_toml()).expect("write the config");
        path
    }

    /// `caudal --config <config> <args>`, ready to run; see [`clean`].
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = command(&self.write_config(), self.dir.path(), args);
        clean(&mut cmd, &self.tmp());
        cmd
    }

    /// Runs `caudal <args>` to the end.
    pub async fn caudal(&self, args: &[&str]) -> Output {
        Output::of(self.command(args)).await
    }

    /// `caudal backfill daily_sales --from F --to T --parallel 2`, which
    /// must succeed; returns its output.
    pub async fn backfill(&self, from: &str, to: &str) -> Output {
        let out = self
            .caudal(&[
                "backfill",
                PIPELINE,
                "--from",
                from,
                "--to",
                to,
                "--parallel",
                "2",
            ])
            .await;
        assert_eq!(out.code, Some(0), "backfill {from} to {to}: {out}");
        out
    }

    /// `caudal once daily_sales --date D`, which must succeed.
    pub async fn once(&self, date: &str) -> Output {
        let out = self.caudal(&["once", PIPELINE, "--date", date]).await;
        assert_eq!(out.code, Some(0), "once --date {date}: {out}");
        out
    }

    /// The state store the world's caudal writes.
    pub async fn store(&self) -> caudal_store::Store {
        caudal_store::Store::open(&format!("sqlite://{}", self.state_db().display()))
            .await
            .expect("the state store")
    }

    /// What pyarrow finds in the local dataset.
    pub async fn read_local(&self) -> Dataset {
        read_dataset(Where::Local(self.root())).await
    }
}

/// Takes the developer's AWS settings (`AWS_CA_BUNDLE`, profiles, an
/// endpoint) away from a caudal process, so the config alone decides where
/// S3 is, and points its scratch space at `tmp`.
pub fn clean(cmd: &mut tokio::process::Command, tmp: &Path) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("TMPDIR", tmp);
}

/// A PostgreSQL timestamptz as psql prints it in UTC
/// (`2025-05-01 00:03:00.5+00`), in microseconds since the epoch.
pub fn pg_micros(text: &str) -> i64 {
    let text = text.trim();
    let fixed = match text.rsplit_once(['+', '-']) {
        Some((_, zone)) if zone.len() == 2 => format!("{text}:00"),
        _ => text.to_string(),
    };
    let ts: jiff::Timestamp = fixed
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} is not a timestamp: {e}"));
    ts.as_microsecond()
}

/// An RFC 3339 timestamp in microseconds since the epoch.
pub fn rfc3339_micros(text: &str) -> i64 {
    let ts: jiff::Timestamp = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} is not an RFC 3339 timestamp: {e}"));
    ts.as_microsecond()
}

/// One row of the daily report, in a form every reader can be compared in:
/// exact decimal text, timestamps in microseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReportRow {
    pub provider_id: i64,
    pub date: String,
    pub sales: i64,
    pub units: i64,
    pub revenue: String,
    pub first_sale: i64,
    pub last_sale: i64,
}

impl ReportRow {
    /// A row pyarrow read (see [`Dataset::rows`]).
    pub fn from_pyarrow(row: &Map<String, Value>) -> Self {
        let int = |k: &str| {
            row.get(k)
                .and_then(|v| {
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                })
                .unwrap_or_else(|| panic!("{k} is not an integer in {row:?}"))
        };
        let text = |k: &str| {
            row.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{k} is not text in {row:?}"))
                .to_string()
        };
        Self {
            provider_id: int("provider_id"),
            date: text("date"),
            sales: int("sales"),
            units: int("units"),
            revenue: text("revenue"),
            first_sale: int("first_sale"),
            last_sale: int("last_sale"),
        }
    }
}

/// Where a dataset lives, for the Python reader.
#[derive(Clone, Debug)]
pub enum Where {
    Local(PathBuf),
    /// Moto's endpoint and `bucket/prefix`.
    S3 {
        endpoint: String,
        root: String,
    },
}

/// A file a manifest names, as pyarrow found it.
#[derive(Clone, Debug)]
pub struct FileRead {
    pub path: String,
    /// `None` when the file is missing.
    pub size: Option<u64>,
    /// Rows in it (Parquet: read; JSON Lines: lines).
    pub rows: Option<u64>,
    /// Parquet: `(column, Arrow type)` as pyarrow reads them.
    pub schema: Vec<(String, String)>,
    /// Parquet: row groups in the file.
    pub row_groups: Option<u64>,
    /// JSON Lines: whether the bytes start with gzip's magic.
    pub gzip: Option<bool>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// A partition as pyarrow found it through its manifest.
#[derive(Clone, Debug)]
pub struct PartitionRead {
    /// `None` (with `error`) when the manifest does not parse.
    pub manifest: Option<Manifest>,
    pub error: Option<String>,
    pub files: Vec<FileRead>,
}

/// A dataset as pyarrow found it, following only its manifests.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Every object below the dataset's root, with its size.
    pub objects: BTreeMap<String, u64>,
    /// Each partition path (the manifest's directory) and what it holds.
    pub partitions: BTreeMap<String, PartitionRead>,
    /// Every row of every file the manifests name: the partition values
    /// (text), then the file's columns with exact values: decimals as
    /// text, timestamps as microseconds since the epoch, dates as
    /// `YYYY-MM-DD`, binary as hex. `_partition` names the partition.
    pub rows: Vec<Map<String, Value>>,
}

impl Dataset {
    /// The rows as report rows, sorted by provider and date.
    pub fn report_rows(&self) -> Vec<ReportRow> {
        let mut rows: Vec<ReportRow> = self.rows.iter().map(ReportRow::from_pyarrow).collect();
        rows.sort();
        rows
    }

    /// The manifests, by partition path; fails on one that does not parse.
    pub fn manifests(&self) -> BTreeMap<String, Manifest> {
        self.partitions
            .iter()
            .map(|(path, p)| {
                let m = p.manifest.clone().unwrap_or_else(|| {
                    panic!("the manifest of {path} does not parse: {:?}", p.error)
                });
                (path.clone(), m)
            })
            .collect()
    }

    /// Fails unless every manifest parses, names this partition, and names
    /// only files that exist with the size and rows it states, readable;
    /// and its totals are its files' sums.
    pub fn assert_consistent(&self) {
        for (path, p) in &self.partitions {
            let Some(m) = &p.manifest else {
                panic!("the manifest of {path} does not parse: {:?}", p.error);
            };
            assert_eq!(
                m.partition, *path,
                "the manifest of {path} names another partition"
            );
            assert_eq!(m.files.len(), p.files.len(), "{path}");
            for (entry, found) in m.files.iter().zip(&p.files) {
                assert_eq!(entry.path, found.path);
                assert!(
                    found.error.is_none(),
                    "{path}/{}: the manifest names it but it cannot be read: {:?}",
                    entry.path,
                    found.error
                );
                assert_eq!(
                    found.size,
                    Some(entry.bytes),
                    "{path}/{}: the manifest says {} bytes",
                    entry.path,
                    entry.bytes
                );
                assert_eq!(
                    found.rows,
                    Some(entry.rows),
                    "{path}/{}: the manifest says {} rows",
                    entry.path,
                    entry.rows
                );
            }
            assert_eq!(
                m.rows,
                m.files.iter().map(|f| f.rows).sum::<u64>(),
                "{path}: the manifest's rows are not its files' sum"
            );
            assert_eq!(
                m.bytes,
                m.files.iter().map(|f| f.bytes).sum::<u64>(),
                "{path}: the manifest's bytes are not its files' sum"
            );
        }
    }

    /// The objects no manifest names (leftovers), manifests excluded.
    pub fn unnamed(&self) -> Vec<String> {
        let named: BTreeSet<String> = self
            .partitions
            .iter()
            .flat_map(|(path, p)| {
                p.files.iter().map(move |f| {
                    if path.is_empty() {
                        f.path.clone()
                    } else {
                        format!("{path}/{}", f.path)
                    }
                })
            })
            .collect();
        self.objects
            .keys()
            .filter(|o| !o.ends_with("/_manifest.json") && *o != "_manifest.json")
            .filter(|o| !named.contains(*o))
            .cloned()
            .collect()
    }
}

/// Lists a dataset's objects and reads every manifest and every file it
/// names with pyarrow (JSON Lines with Python's json and gzip).
const READER: &str = r#"
import gzip, json, sys
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

def canon(arr):
    t = arr.type
    if pa.types.is_timestamp(t):
        return arr.cast(pa.int64()).to_pylist()
    values = arr.to_pylist()
    if pa.types.is_decimal(t):
        return [None if v is None else format(v, 'f') for v in values]
    if pa.types.is_date(t):
        return [None if v is None else v.isoformat() for v in values]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [None if v is None else v.hex() for v in values]
    return values

mode, root = sys.argv[1], sys.argv[2].rstrip('/')
if mode == 's3':
    endpoint, key, secret, region = sys.argv[3:7]
    scheme, host = endpoint.split('://', 1)
    fs = pafs.S3FileSystem(access_key=key, secret_key=secret, region=region,
                           endpoint_override=host, scheme=scheme)
else:
    fs = pafs.LocalFileSystem()

objects = {}
for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
    if info.type == pafs.FileType.File:
        objects[info.path[len(root) + 1:]] = info.size

out = {'objects': objects, 'partitions': {}, 'rows': []}
for rel in sorted(objects):
    if rel.split('/')[-1] != '_manifest.json':
        continue
    part = rel[:-len('_manifest.json')].rstrip('/')
    entry = {'files': []}
    out['partitions'][part] = entry
    with fs.open_input_stream(root + '/' + rel) as f:
        text = f.read().decode('utf-8', 'replace')
    entry['manifest_text'] = text
    try:
        manifest = json.loads(text)
    except Exception as e:
        entry['error'] = repr(e)
        continue
    values = [(c, v) for c, v in manifest.get('values', [])]
    for fe in manifest.get('files', []):
        found = {'path': fe['path']}
        entry['files'].append(found)
        path = root + '/' + (part + '/' if part else '') + fe['path']
        try:
            with fs.open_input_file(path) as f:
                data = f.readall()
        except OSError as e:
            found['error'] = 'missing: ' + repr(e)
            continue
        found['size'] = len(data)
        try:
            if manifest.get('format') == 'parquet':
                pf = pq.ParquetFile(pa.BufferReader(data))
                table = pf.read()
                found['row_groups'] = pf.metadata.num_row_groups
                found['schema'] = [[fl.name, str(fl.type)] for fl in table.schema]
                cols = [(n, canon(table.column(n))) for n in table.column_names]
                rows = [{n: c[k] for n, c in cols} for k in range(table.num_rows)]
            else:
                found['gzip'] = data[:2] == b'\x1f\x8b'
                raw = gzip.decompress(data) if fe['path'].endswith('.gz') else data
                rows = [json.loads(l) for l in raw.decode('utf-8').splitlines() if l.strip()]
        except Exception as e:
            found['error'] = 'unreadable: ' + repr(e)
            continue
        found['rows'] = len(rows)
        for r in rows:
            row = dict(values)
            row.update(r)
            row['_partition'] = part
            out['rows'].append(row)
print(json.dumps(out))
"#;

/// Reads a dataset with pyarrow; see [`Dataset`].
pub async fn read_dataset(at: Where) -> Dataset {
    let args: Vec<String> = match &at {
        Where::Local(dir) => vec!["local".into(), dir.display().to_string()],
        Where::S3 { endpoint, root } => vec![
            "s3".into(),
            root.clone(),
            endpoint.clone(),
            caudal_testkit::s3::ACCESS_KEY_ID.into(),
            caudal_testkit::s3::SECRET_ACCESS_KEY.into(),
            caudal_testkit::s3::REGION.into(),
        ],
    };
    let text = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        caudal_testkit::run_python(READER, &args)
    })
    .await
    .expect("the reader ran");
    let json: Value = serde_json::from_str(&text).expect("the reader prints JSON");
    let objects = json["objects"]
        .as_object()
        .expect("objects")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a size")))
        .collect();
    let partitions = json["partitions"]
        .as_object()
        .expect("partitions")
        .iter()
        .map(|(path, p)| {
            let text = p["manifest_text"].as_str().unwrap_or_default();
            let (manifest, error) = match serde_json::from_str::<Manifest>(text) {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(format!("{e}: {text:?}"))),
            };
            let files = p["files"]
                .as_array()
                .expect("files")
                .iter()
                .map(|f| FileRead {
                    path: f["path"].as_str().expect("a path").to_string(),
                    size: f["size"].as_u64(),
                    rows: f["rows"].as_u64(),
                    schema: f["schema"]
                        .as_array()
                        .map(|s| {
                            s.iter()
                                .map(|c| {
                                    (
                                        c[0].as_str().unwrap_or_default().to_string(),
                                        c[1].as_str().unwrap_or_default().to_string(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    row_groups: f["row_groups"].as_u64(),
                    gzip: f["gzip"].as_bool(),
                    error: f["error"].as_str().map(str::to_string),
                })
                .collect();
            (
                path.clone(),
                PartitionRead {
                    manifest,
                    error,
                    files,
                },
            )
        })
        .collect();
    let rows = json["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_object().expect("a row").clone())
        .collect();
    Dataset {
        objects,
        partitions,
        rows,
    }
}

/// Every file below `dir` (hidden ones included), relative, with its size
/// and modification time.
pub fn walk(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, std::time::SystemTime)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                go(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("below the root")
                    .to_string_lossy()
                    .into_owned();
                let modified = meta.modified().expect("a modification time");
                out.insert(rel, (meta.len(), modified));
            }
        }
    }
    let mut out = BTreeMap::new();
    go(dir, dir, &mut out);
    out
}

/// The dates from `from` to `to`, both included.
pub fn days(from: &str, to: &str) -> Vec<String> {
    let mut d: jiff::civil::Date = from.parse().expect("a date");
    let to: jiff::civil::Date = to.parse().expect("a date");
    let mut out = Vec::new();
    while d <= to {
        out.push(d.to_string());
        d = d.tomorrow().expect("a next day");
    }
    out
}
