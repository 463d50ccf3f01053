//! Writing one run's rows into staged files, one set per partition. Nothing
//! written here is visible to readers: files are staged under hidden names
//! (local) or in a temporary directory (S3) until [`super::commit`].

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::Schema;
use caudal_core::config::{ColumnType, Compression, FileFormat, FilesSinkConfig};
use caudal_core::dataset::{ColumnInfo, FileEntry, FileSource, partition_path};
use caudal_core::{Error, ErrorKind, Result};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use super::columns::{Column, field, type_name};
use super::location::Location;

/// Decodes the value of the row's column `i` to a partition value's text.
pub type PartitionText<'a> = dyn Fn(usize, &[u8]) -> std::result::Result<String, String> + 'a;

/// What a run is writing.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The dataset (the sink's name).
    pub dataset: String,
    pub pipeline: String,
    /// The run's logical date.
    pub date: jiff::civil::Date,
    /// A name unique to this run; part of every file's name.
    pub run: String,
    /// SHA-256 of the query as run.
    pub query_sha256: String,
}

/// Where a partition column's value comes from.
#[derive(Clone, Debug)]
enum PartSource {
    /// The row's column at this index.
    Row(usize),
    /// The run's logical date.
    Date,
}

/// A file written and closed, not yet visible.
#[derive(Debug)]
pub struct StagedFile {
    pub staged: PathBuf,
    pub entry: FileEntry,
}

/// A partition's staged files.
#[derive(Debug)]
pub struct StagedPartition {
    pub path: String,
    pub values: Vec<(String, String)>,
    pub columns: Vec<ColumnInfo>,
    pub files: Vec<StagedFile>,
}

enum Sink {
    Parquet(Box<ArrowWriter<std::fs::File>>),
    Jsonl(Box<dyn Write + Send>),
}

struct OpenFile {
    name: String,
    staged: PathBuf,
    sink: Sink,
    rows: u64,
}

struct PartitionWriter {
    path: String,
    values: Vec<(String, String)>,
    columns: Vec<Column>,
    schema: Option<Arc<Schema>>,
    file: Option<OpenFile>,
    files: Vec<StagedFile>,
    /// JSON Lines: the rows of the row group being built, encoded.
    lines: Vec<u8>,
}

/// One run's writer: rows in, staged partitions out.
pub struct RunWriter {
    spec: RunSpec,
    config: Arc<FilesSinkConfig>,
    /// The columns rows arrive with.
    source: Vec<(String, ColumnType)>,
    parts: Vec<(String, PartSource)>,
    /// Indexes (in `source`) of the columns files hold.
    data: Vec<usize>,
    stats: Vec<bool>,
    /// The scale each decimal column was given (the run's first row group
    /// sets unknown ones, so every partition of a run agrees).
    scales: Vec<Option<u32>>,
    partitions: HashMap<String, PartitionWriter>,
    /// The last row's partition: its columns' raw values and its path.
    last: Option<(Vec<Option<Vec<u8>>>, String)>,
    /// The logical date as partition value text.
    date_text: String,
    staging: PathBuf,
    /// Removed when the writer is dropped (S3 staging).
    _tempdir: Option<tempfile::TempDir>,
    rows: u64,
}

impl std::fmt::Debug for RunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWriter")
            .field("dataset", &self.spec.dataset)
            .field("date", &self.spec.date)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

fn io_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Connect, format!("{what}: {e}"))
}

fn value_error(dataset: &str, message: String) -> Error {
    Error::new(ErrorKind::Decode, format!("dataset {dataset:?}: {message}"))
}

impl RunWriter {
    /// A writer for rows with `columns` (name and type as the source
    /// reports them; `types` overrides apply here).
    pub fn new(
        location: &Location,
        config: Arc<FilesSinkConfig>,
        spec: RunSpec,
        columns: &[(String, ColumnType)],
    ) -> Result<Self> {
        let source: Vec<(String, ColumnType)> = columns
            .iter()
            .map(|(name, ty)| {
                let ty = config
                    .types
                    .get(name)
                    .and_then(|t| ColumnType::parse(t).ok())
                    .unwrap_or(*ty);
                (name.clone(), ty)
            })
            .collect();
        let index = |name: &str| source.iter().position(|(n, _)| n == name);
        let mut parts = Vec::new();
        for column in &config.partition_by {
            match index(column) {
                Some(i) => parts.push((column.clone(), PartSource::Row(i))),
                None if *column == config.date_column => {
                    parts.push((column.clone(), PartSource::Date));
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "dataset {:?}: partition column {column:?} is not a column of the query \
                             (columns: {})",
                            spec.dataset,
                            source
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        let data: Vec<usize> = (0..source.len())
            .filter(|i| !config.partition_by.contains(&source[*i].0))
            .collect();
        if let Some(list) = &config.stats {
            for name in list {
                if !data.iter().any(|i| source[*i].0 == *name) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "dataset {:?}: stats column {name:?} is not a data column of the query",
                            spec.dataset
                        ),
                    ));
                }
            }
        }
        let stats = data
            .iter()
            .map(|i| {
                config
                    .stats
                    .as_ref()
                    .is_none_or(|list| list.contains(&source[*i].0))
            })
            .collect();
        let scales = data
            .iter()
            .map(|i| match source[*i].1 {
                ColumnType::Decimal { scale, .. } if scale >= 0 => u32::try_from(scale).ok(),
                _ => None,
            })
            .collect();
        let (staging, tempdir) = match &location.local {
            Some(dir) => (dir.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("caudal-dataset-")
                    .tempdir()
                    .map_err(|e| io_error("creating a staging directory", e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let date_text = spec.date.to_string();
        Ok(Self {
            spec,
            config,
            source,
            parts,
            data,
            stats,
            scales,
            partitions: HashMap::new(),
            last: None,
            date_text,
            staging,
            _tempdir: tempdir,
            rows: 0,
        })
    }

    /// The columns rows must come in, with their types.
    pub fn columns(&self) -> &[(String, ColumnType)] {
        &self.source
    }

    /// Whether rows must come as JSON ([`Self::push_json`]): JSON Lines
    /// files are written from the rows as the source decodes them.
    pub fn wants_json(&self) -> bool {
        self.config.format == FileFormat::Jsonl
    }

    /// Rows taken so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The path of the partition of `values`, created when new.
    fn partition_for(&mut self, values: Vec<(String, Option<String>)>) -> Result<String> {
        let path = partition_path(&values);
        if !self.partitions.contains_key(&path) {
            let columns = self
                .data
                .iter()
                .zip(&self.stats)
                .map(|(i, keep)| Column::new(&self.source[*i].0, self.source[*i].1, *keep))
                .collect();
            let values = values
                .into_iter()
                .map(|(c, v)| {
                    (
                        c,
                        v.unwrap_or_else(|| caudal_core::dataset::NULL_PARTITION.into()),
                    )
                })
                .collect();
            if self.config.format == FileFormat::Parquet || !path.is_empty() {
                let dir = self.staging.join(&path);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| io_error(&format!("creating {}", dir.display()), e))?;
            }
            self.partitions.insert(
                path.clone(),
                PartitionWriter {
                    path: path.clone(),
                    values,
                    columns,
                    schema: None,
                    file: None,
                    files: Vec::new(),
                    lines: Vec::new(),
                },
            );
        }
        Ok(path)
    }

    /// Takes a row decoded to JSON (the columns by name).
    pub fn push_json(&mut self, row: &Map<String, Value>) -> Result<()> {
        let date = &self.date_text;
        let values: Vec<(String, Option<String>)> = self
            .parts
            .iter()
            .map(|(name, src)| {
                let v = match src {
                    PartSource::Date => Some(date.clone()),
                    PartSource::Row(_) => match row.get(name) {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(other) => Some(other.to_string()),
                    },
                };
                (name.clone(), v)
            })
            .collect();
        let jsonl = self.config.format == FileFormat::Jsonl;
        let path = self.partition_for(values)?;
        let (dataset, source, data) = (&self.spec.dataset, &self.source, &self.data);
        let p = self
            .partitions
            .get_mut(&path)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "partition vanished"))?;
        for (column, i) in p.columns.iter_mut().zip(data) {
            let name = &source[*i].0;
            column
                .push_json(row.get(name).unwrap_or(&Value::Null))
                .map_err(|m| value_error(dataset, format!("column {name:?}: {m}")))?;
        }
        if jsonl {
            let mut line = Map::with_capacity(data.len());
            for i in data {
                let name = &source[*i].0;
                line.insert(name.clone(), row.get(name).cloned().unwrap_or(Value::Null));
            }
            serde_json::to_writer(&mut p.lines, &line)
                .map_err(|e| value_error(dataset, e.to_string()))?;
            p.lines.push(b'\n');
        }
        self.rows += 1;
        self.maybe_flush(&path)
    }

    /// Takes a row of PostgreSQL binary values (`None` for NULL), in the
    /// order of [`Self::columns`]; `pg_types` are the columns' PostgreSQL
    /// type names, and `partition_text` decodes a partition column's value
    /// to its text.
    pub fn push_pg(
        &mut self,
        values: &[Option<&[u8]>],
        pg_types: &[String],
        partition_text: &PartitionText<'_>,
    ) -> Result<()> {
        // Rows come in runs of the same partition: the partition columns'
        // raw values decide whether this row's is the last one's.
        let same = self.last.as_ref().is_some_and(|(raw, _)| {
            self.parts
                .iter()
                .filter_map(|(_, src)| match src {
                    PartSource::Row(i) => Some(*i),
                    PartSource::Date => None,
                })
                .zip(raw)
                .all(|(i, r)| values.get(i).copied().flatten() == r.as_deref())
        });
        if !same {
            let mut part_values = Vec::with_capacity(self.parts.len());
            let mut raw = Vec::new();
            for (name, src) in &self.parts {
                let v = match src {
                    PartSource::Date => Some(self.date_text.clone()),
                    PartSource::Row(i) => {
                        let value = values.get(*i).copied().flatten();
                        raw.push(value.map(<[u8]>::to_vec));
                        match value {
                            None => None,
                            Some(bytes) => Some(partition_text(*i, bytes).map_err(|m| {
                                value_error(&self.spec.dataset, format!("column {name:?}: {m}"))
                            })?),
                        }
                    }
                };
                part_values.push((name.clone(), v));
            }
            let path = self.partition_for(part_values)?;
            self.last = Some((raw, path));
        }
        let Some((_, path)) = &self.last else {
            return Err(Error::new(ErrorKind::Internal, "no partition"));
        };
        let (dataset, source, data) = (&self.spec.dataset, &self.source, &self.data);
        let p = self
            .partitions
            .get_mut(path)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "partition vanished"))?;
        for (column, i) in p.columns.iter_mut().zip(data) {
            column
                .push_pg(&pg_types[*i], values.get(*i).copied().flatten())
                .map_err(|m| value_error(dataset, format!("column {:?}: {m}", source[*i].0)))?;
        }
        self.rows += 1;
        if self.full(path) {
            let path = path.clone();
            self.flush(&path)?;
        }
        Ok(())
    }

    /// Whether partition `path`'s row group is due: a full row group, or as
    /// many rows as its file may still take (a row group never makes its
    /// file pass `file_max_rows`).
    fn full(&self, path: &str) -> bool {
        self.partitions.get(path).is_some_and(|p| {
            let in_file = p.file.as_ref().map_or(0, |f| f.rows);
            let limit = (self.config.row_group_rows as u64)
                .min(self.config.file_max_rows.saturating_sub(in_file))
                .max(1);
            p.columns.first().is_some_and(|c| c.len() as u64 >= limit) || p.lines.len() >= 64 << 20
        })
    }

    fn maybe_flush(&mut self, path: &str) -> Result<()> {
        if self.full(path) {
            self.flush(path)?;
        }
        Ok(())
    }

    /// Writes the row group being built of partition `path` to its open
    /// file (opening one), and closes the file when it reached its limits.
    fn flush(&mut self, path: &str) -> Result<()> {
        let dataset = self.spec.dataset.clone();
        // Fix unknown decimal scales, the same for the whole run.
        {
            let p = self
                .partitions
                .get_mut(path)
                .ok_or_else(|| Error::new(ErrorKind::Internal, "no partition"))?;
            for (k, column) in p.columns.iter_mut().enumerate() {
                if let ColumnType::Decimal { .. } = column.ty {
                    let scale =
                        *self.scales[k].get_or_insert_with(|| column.max_scale().unwrap_or(0));
                    column.set_scale(scale);
                }
            }
        }
        let config = self.config.clone();
        let spec = self.spec.clone();
        let staging = self.staging.clone();
        let p = self
            .partitions
            .get_mut(path)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no partition"))?;
        if p.columns.first().is_none_or(Column::is_empty) && p.lines.is_empty() {
            return Ok(());
        }
        let rows = p.columns.first().map_or(0, Column::len) as u64;
        let arrays = p
            .columns
            .iter_mut()
            .map(Column::finish)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|m| value_error(&dataset, m))?;
        let schema = p
            .schema
            .get_or_insert_with(|| {
                Arc::new(Schema::new(
                    p.columns
                        .iter()
                        .map(|c| field(&c.name, c.ty))
                        .collect::<Vec<_>>(),
                ))
            })
            .clone();
        if p.file.is_none() {
            p.file = Some(open_file(
                &config,
                &spec,
                &staging,
                &p.path,
                p.files.len(),
                &schema,
            )?);
        }
        let Some(file) = p.file.as_mut() else {
            return Ok(());
        };
        match &mut file.sink {
            Sink::Parquet(w) => {
                let batch = RecordBatch::try_new(schema, arrays)
                    .map_err(|e| value_error(&dataset, e.to_string()))?;
                w.write(&batch)
                    .map_err(|e| io_error(&format!("writing {}", file.staged.display()), e))?;
                w.flush()
                    .map_err(|e| io_error(&format!("writing {}", file.staged.display()), e))?;
            }
            Sink::Jsonl(w) => {
                w.write_all(&p.lines)
                    .map_err(|e| io_error(&format!("writing {}", file.staged.display()), e))?;
                p.lines.clear();
            }
        }
        file.rows += rows;
        let bytes = match &file.sink {
            Sink::Parquet(w) => w.bytes_written() as u64,
            Sink::Jsonl(_) => std::fs::metadata(&file.staged).map_or(0, |m| m.len()),
        };
        if file.rows >= config.file_max_rows || bytes >= config.file_max_bytes.0 {
            close_file(p, &spec)?;
        }
        Ok(())
    }

    /// Flushes and closes every file: the run's staged partitions.
    pub fn finish(mut self) -> Result<(Vec<StagedPartition>, Option<tempfile::TempDir>)> {
        let paths: Vec<String> = self.partitions.keys().cloned().collect();
        for path in &paths {
            self.flush(path)?;
        }
        let spec = self.spec.clone();
        let mut out = Vec::new();
        let mut partitions: Vec<PartitionWriter> =
            self.partitions.drain().map(|(_, p)| p).collect();
        partitions.sort_by(|a, b| a.path.cmp(&b.path));
        for mut p in partitions {
            close_file(&mut p, &spec)?;
            let columns = p
                .columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.name.clone(),
                    ty: type_name(c.ty),
                })
                .collect();
            out.push(StagedPartition {
                path: p.path,
                values: p.values,
                columns,
                files: p.files,
            });
        }
        Ok((out, self._tempdir.take()))
    }
}

fn extension(config: &FilesSinkConfig) -> &'static str {
    match (config.format, config.compression()) {
        (FileFormat::Parquet, _) => "parquet",
        (FileFormat::Jsonl, Compression::Gzip) => "jsonl.gz",
        (FileFormat::Jsonl, Compression::Zstd) => "jsonl.zst",
        (FileFormat::Jsonl, _) => "jsonl",
    }
}

fn open_file(
    config: &FilesSinkConfig,
    spec: &RunSpec,
    staging: &Path,
    partition: &str,
    seq: usize,
    schema: &Arc<Schema>,
) -> Result<OpenFile> {
    let name = format!("part-{seq:03}-{}.{}", spec.run, extension(config));
    let staged = staging.join(partition).join(format!(".{name}.tmp"));
    let file = std::fs::File::create(&staged)
        .map_err(|e| io_error(&format!("creating {}", staged.display()), e))?;
    let sink = match config.format {
        FileFormat::Parquet => {
            let compression = match config.compression() {
                Compression::Snappy => PqCompression::SNAPPY,
                Compression::None => PqCompression::UNCOMPRESSED,
                _ => PqCompression::ZSTD(ZstdLevel::default()),
            };
            let props = WriterProperties::builder()
                .set_compression(compression)
                .set_max_row_group_row_count(Some(config.row_group_rows))
                .set_created_by(format!("caudal {}", env!("CARGO_PKG_VERSION")))
                .build();
            Sink::Parquet(Box::new(
                ArrowWriter::try_new(file, schema.clone(), Some(props))
                    .map_err(|e| io_error(&format!("creating {}", staged.display()), e))?,
            ))
        }
        FileFormat::Jsonl => {
            let buffered = std::io::BufWriter::with_capacity(1 << 20, file);
            Sink::Jsonl(match config.compression() {
                Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
                    buffered,
                    flate2::Compression::default(),
                )),
                Compression::Zstd => Box::new(
                    zstd::Encoder::new(buffered, 3)
                        .map_err(|e| io_error("starting zstd", e))?
                        .auto_finish(),
                ),
                _ => Box::new(buffered),
            })
        }
    };
    Ok(OpenFile {
        name,
        staged,
        sink,
        rows: 0,
    })
}

fn close_file(p: &mut PartitionWriter, spec: &RunSpec) -> Result<()> {
    let Some(file) = p.file.take() else {
        return Ok(());
    };
    match file.sink {
        Sink::Parquet(w) => {
            w.close()
                .map_err(|e| io_error(&format!("closing {}", file.staged.display()), e))?;
        }
        Sink::Jsonl(mut w) => {
            w.flush()
                .map_err(|e| io_error(&format!("closing {}", file.staged.display()), e))?;
            drop(w);
        }
    }
    let bytes = std::fs::metadata(&file.staged)
        .map_err(|e| io_error(&format!("reading {}", file.staged.display()), e))?
        .len();
    // Durable before it can be named by a manifest.
    std::fs::File::open(&file.staged)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(&format!("syncing {}", file.staged.display()), e))?;
    let stats = p
        .columns
        .iter_mut()
        .filter_map(|c| c.take_stats().map(|s| (c.name.clone(), s)))
        .collect();
    p.files.push(StagedFile {
        staged: file.staged,
        entry: FileEntry {
            path: file.name,
            rows: file.rows,
            bytes,
            stats,
            source: FileSource {
                pipeline: spec.pipeline.clone(),
                logical_date: spec.date.to_string(),
                run: spec.run.clone(),
                query_sha256: spec.query_sha256.clone(),
            },
        },
    });
    Ok(())
}
