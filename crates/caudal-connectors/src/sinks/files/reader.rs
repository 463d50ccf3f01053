//! Reading a dataset's rows for the query API: only the files the
//! manifests name, pruned by partition values and by each file's min/max
//! before it is opened, then filtered row by row.
//!
//! Promises:
//! - A file is opened only if its partition's values and its statistics
//!   can match every filter.
//! - Rows come in a stable order: partitions by path, files by their order
//!   in the manifest, rows in file order; a page's resume point names the
//!   file and the rows of it already returned.
//! - Values come out exactly as written: decimals as strings with their
//!   scale, timestamps in RFC 3339 (zoned ones in UTC), NULL as null.

use std::cmp::Ordering;

use arrow_array::cast::AsArray as _;
use arrow_array::types::{
    Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    TimestampMicrosecondType, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use caudal_core::config::ColumnType;
use caudal_core::dataset::Manifest;
use caudal_core::{Error, ErrorKind, Result};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use super::columns::{Scalar, decimal_text};
use super::commit::read_manifest;
use super::location::Location;

/// A condition on a column: equal to a value, or within a range (both ends
/// included).
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Eq {
        column: String,
        value: String,
    },
    Range {
        column: String,
        from: Option<String>,
        to: Option<String>,
    },
}

impl Filter {
    pub fn column(&self) -> &str {
        match self {
            Self::Eq { column, .. } | Self::Range { column, .. } => column,
        }
    }
}

/// Where a page starts: the ordinal of a file among those the query
/// matches, and the matching rows of it already returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    pub file: usize,
    pub row: u64,
}

/// A query of rows.
#[derive(Clone, Debug, Default)]
pub struct RowQuery {
    pub filters: Vec<Filter>,
    /// Columns to return (default: all, partition columns first).
    pub columns: Option<Vec<String>>,
    pub limit: usize,
    pub start: Resume,
}

/// A page of rows.
#[derive(Debug, Default)]
pub struct Page {
    pub rows: Vec<Map<String, Value>>,
    /// Where the next page starts, when there may be more rows.
    pub next: Option<Resume>,
    /// Files opened to make the page.
    pub files_read: usize,
    /// Files skipped by their partition values or statistics.
    pub files_pruned: usize,
}

/// Compares two partition values: as integers when both are, else as
/// text (dates in `YYYY-MM-DD` order correctly).
fn compare_text(a: &str, b: &str) -> Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// Whether a partition value meets `filter`.
fn partition_matches(value: &str, filter: &Filter) -> bool {
    match filter {
        Filter::Eq { value: v, .. } => compare_text(value, v) == Ordering::Equal,
        Filter::Range { from, to, .. } => {
            from.as_deref()
                .is_none_or(|f| compare_text(value, f) != Ordering::Less)
                && to
                    .as_deref()
                    .is_none_or(|t| compare_text(value, t) != Ordering::Greater)
        }
    }
}

/// A typed filter on a data column.
#[derive(Clone, Debug)]
struct TypedFilter {
    column: String,
    ty: ColumnType,
    from: Option<Scalar>,
    to: Option<Scalar>,
}

impl TypedFilter {
    fn accepts(&self, v: &Scalar) -> bool {
        self.from
            .as_ref()
            .is_none_or(|f| matches!(v.compare(f), Some(Ordering::Greater | Ordering::Equal)))
            && self
                .to
                .as_ref()
                .is_none_or(|t| matches!(v.compare(t), Some(Ordering::Less | Ordering::Equal)))
    }

    /// Whether a file whose column lies in [min, max] may hold a match.
    fn may_match(&self, min: Option<&Scalar>, max: Option<&Scalar>) -> bool {
        let below = match (&self.from, max) {
            (Some(f), Some(max)) => max.compare(f) == Some(Ordering::Less),
            _ => false,
        };
        let above = match (&self.to, min) {
            (Some(t), Some(min)) => min.compare(t) == Some(Ordering::Greater),
            _ => false,
        };
        !(below || above)
    }
}

/// Reads the manifests of `partitions` (paths), skipping those gone.
pub async fn manifests(location: &Location, partitions: &[String]) -> Result<Vec<Manifest>> {
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        if let Some(m) = read_manifest(location, p).await? {
            out.push(m);
        }
    }
    Ok(out)
}

/// Whether a partition's values can meet every filter on its columns.
pub fn partition_may_match(manifest: &Manifest, filters: &[Filter]) -> bool {
    filters.iter().all(|f| {
        manifest
            .values
            .iter()
            .find(|(c, _)| c == f.column())
            .is_none_or(|(_, v)| partition_matches(v, f))
    })
}

fn bad_request(message: String) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// The page of rows of `manifests` (already narrowed to the partitions
/// that may match, in path order) that `query` asks for.
pub async fn read_rows<M: std::borrow::Borrow<Manifest>>(
    location: &Location,
    manifests: &[M],
    query: &RowQuery,
) -> Result<Page> {
    let mut page = Page::default();
    let mut ordinal = 0usize;
    for m in manifests {
        let m: &Manifest = m.borrow();
        if m.format != "parquet" {
            return Err(bad_request(format!(
                "partition {} is {}: the query API reads Parquet datasets",
                m.partition, m.format
            )));
        }
        if !partition_may_match(m, &query.filters) {
            continue;
        }
        // Filters on data columns, typed by the manifest.
        let mut typed = Vec::new();
        for f in &query.filters {
            if m.values.iter().any(|(c, _)| c == f.column()) {
                continue;
            }
            let Some(info) = m.columns.iter().find(|c| c.name == f.column()) else {
                return Err(bad_request(format!("{}: no such column", f.column())));
            };
            let ty = ColumnType::parse(&info.ty).map_err(bad_request)?;
            let parse = |v: &str, param: String| {
                Scalar::parse(ty, v).map_err(|m| bad_request(format!("{param}: {m}")))
            };
            let column = f.column();
            let (from, to) = match f {
                Filter::Eq { value, .. } => (
                    Some(parse(value, column.to_string())?),
                    Some(parse(value, column.to_string())?),
                ),
                Filter::Range { from, to, .. } => (
                    from.as_deref()
                        .map(|v| parse(v, format!("{column}_from")))
                        .transpose()?,
                    to.as_deref()
                        .map(|v| parse(v, format!("{column}_to")))
                        .transpose()?,
                ),
            };
            typed.push(TypedFilter {
                column: f.column().to_string(),
                ty,
                from,
                to,
            });
        }
        for file in &m.files {
            let this = ordinal;
            ordinal += 1;
            if this < query.start.file {
                continue;
            }
            let pruned = typed.iter().any(|t| {
                file.stats.get(&t.column).is_some_and(|s| {
                    let min = s.min.as_ref().and_then(|v| Scalar::from_json(t.ty, v));
                    let max = s.max.as_ref().and_then(|v| Scalar::from_json(t.ty, v));
                    // A column all NULL matches no range.
                    (min.is_none() && max.is_none() && s.nulls == file.rows)
                        || !t.may_match(min.as_ref(), max.as_ref())
                })
            });
            if pruned {
                page.files_pruned += 1;
                continue;
            }
            let skip = if this == query.start.file {
                query.start.row
            } else {
                0
            };
            let want = query.limit - page.rows.len();
            page.files_read += 1;
            let (rows, more) = read_file(
                location,
                m,
                &file.path,
                file.bytes,
                &typed,
                query.columns.as_deref(),
                skip,
                want,
            )
            .await?;
            let taken = rows.len() as u64;
            page.rows.extend(rows);
            if more {
                page.next = Some(Resume {
                    file: this,
                    row: skip + taken,
                });
                return Ok(page);
            }
            if page.rows.len() >= query.limit {
                page.next = Some(Resume {
                    file: this + 1,
                    row: 0,
                });
                return Ok(page);
            }
        }
    }
    Ok(page)
}

/// Reads up to `want` matching rows of one file after skipping `skip`
/// matching rows; also says whether the file has more.
#[allow(clippy::too_many_arguments)]
async fn read_file(
    location: &Location,
    manifest: &Manifest,
    name: &str,
    size: u64,
    filters: &[TypedFilter],
    columns: Option<&[String]>,
    mut skip: u64,
    want: usize,
) -> Result<(Vec<Map<String, Value>>, bool)> {
    let path = if manifest.partition.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", manifest.partition)
    };
    let err = |e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Connect,
            format!("reading {}/{path}: {e}", location.display),
        )
    };
    let bytes = location.get(&path).await?.ok_or_else(|| {
        err(&format!(
            "the manifest names it ({size} bytes) but it is gone"
        ))
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| err(&e))?;
    let schema = builder.schema().clone();
    let wanted = |name: &str| columns.is_none_or(|c| c.iter().any(|x| x == name));
    let indices: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted(f.name()) || filters.iter().any(|t| t.column == *f.name()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|e| err(&e))?;
    let partition: Vec<(String, Value)> = manifest
        .values
        .iter()
        .filter(|(c, _)| wanted(c))
        .map(|(c, v)| (c.clone(), partition_json(v)))
        .collect();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let cols: Vec<(usize, usize)> = filters
            .iter()
            .enumerate()
            .filter_map(|(k, t)| batch.schema().index_of(&t.column).ok().map(|i| (k, i)))
            .collect();
        for row in 0..batch.num_rows() {
            let ok = cols.iter().all(|(k, i)| {
                let t = &filters[*k];
                scalar_at(batch.column(*i).as_ref(), row, t.ty).is_some_and(|v| t.accepts(&v))
            });
            if !ok {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if out.len() >= want {
                return Ok((out, true));
            }
            out.push(row_json(&batch, row, &partition, &wanted));
        }
    }
    Ok((out, false))
}

/// A partition value as JSON: a number when it is an integer.
fn partition_json(text: &str) -> Value {
    if text == caudal_core::dataset::NULL_PARTITION {
        return Value::Null;
    }
    text.parse::<i64>()
        .map_or_else(|_| Value::String(text.to_string()), Value::from)
}

fn row_json(
    batch: &RecordBatch,
    row: usize,
    partition: &[(String, Value)],
    wanted: &dyn Fn(&str) -> bool,
) -> Map<String, Value> {
    let mut out = Map::with_capacity(partition.len() + batch.num_columns());
    for (c, v) in partition {
        out.insert(c.clone(), v.clone());
    }
    for (i, field) in batch.schema().fields().iter().enumerate() {
        if wanted(field.name()) {
            out.insert(field.name().clone(), cell(batch.column(i).as_ref(), row));
        }
    }
    out
}

/// One value of an array as JSON.
pub fn cell(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int16 => Value::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt64 => Value::from(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => Value::from(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => Value::from(a.as_primitive::<Float64Type>().value(i)),
        DataType::Decimal128(_, s) => Value::String(decimal_text(
            a.as_primitive::<arrow_array::types::Decimal128Type>()
                .value(i),
            u32::try_from(*s).unwrap_or(0),
        )),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::Binary => {
            use base64::Engine as _;
            Value::String(
                base64::engine::general_purpose::STANDARD.encode(a.as_binary::<i32>().value(i)),
            )
        }
        DataType::Date32 => Scalar::Int(i128::from(a.as_primitive::<Date32Type>().value(i)))
            .to_json(ColumnType::Date),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let us = i128::from(a.as_primitive::<TimestampMicrosecondType>().value(i));
            Scalar::Int(us).to_json(if tz.is_some() {
                ColumnType::TimestampTz
            } else {
                ColumnType::Timestamp
            })
        }
        _ => Value::Null,
    }
}

/// One value of an array as a typed scalar, for filters.
fn scalar_at(a: &dyn Array, i: usize, ty: ColumnType) -> Option<Scalar> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int16 => Scalar::Int(i128::from(a.as_primitive::<Int16Type>().value(i))),
        DataType::Int32 => Scalar::Int(i128::from(a.as_primitive::<Int32Type>().value(i))),
        DataType::Int64 => Scalar::Int(i128::from(a.as_primitive::<Int64Type>().value(i))),
        DataType::UInt64 => Scalar::Int(i128::from(a.as_primitive::<UInt64Type>().value(i))),
        DataType::Float32 => Scalar::Float(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => Scalar::Float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Decimal128(_, s) => Scalar::Decimal(
            a.as_primitive::<arrow_array::types::Decimal128Type>()
                .value(i),
            u32::try_from(*s).unwrap_or(0),
        ),
        DataType::Date32 => Scalar::Int(i128::from(a.as_primitive::<Date32Type>().value(i))),
        DataType::Timestamp(_, _) => Scalar::Int(i128::from(
            a.as_primitive::<TimestampMicrosecondType>().value(i),
        )),
        DataType::Utf8 => Scalar::Text(a.as_string::<i32>().value(i).to_string()),
        DataType::Boolean => Scalar::Bool(a.as_boolean().value(i)),
        _ => {
            let _ = ty;
            return None;
        }
    })
}
