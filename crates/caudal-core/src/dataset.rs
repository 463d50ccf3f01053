//! The dataset model shared by the writer (the `files` sink), the state
//! store and the query API: a partition's manifest, the typed values its
//! statistics hold, and partition paths.
//!
//! Promises:
//! - **The manifest is the partition.** A reader opens only the files a
//!   partition's `_manifest.json` lists; data files appear before their
//!   manifest names them and go after it stops naming them, so a reader
//!   never sees a partition half written.
//! - Partition paths are Hive-style (`provider_id=7/date=2025-05-14`), with
//!   values escaped so that any value makes one path segment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file name of a partition's manifest.
pub const MANIFEST: &str = "_manifest.json";

/// The manifest format written now.
pub const MANIFEST_VERSION: u32 = 1;

/// A partition's manifest: what it holds, and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The dataset (the sink's name).
    pub dataset: String,
    /// The partition's path below the dataset, e.g.
    /// `provider_id=7/date=2025-05-14` (empty when not partitioned).
    pub partition: String,
    /// The partition's column values, in `partition_by` order.
    pub values: Vec<(String, String)>,
    /// Bumped by every commit of this partition.
    pub generation: u64,
    /// When this manifest was written (RFC 3339).
    pub committed_at: String,
    /// `parquet` or `jsonl`.
    pub format: String,
    /// The files' columns (partition columns excluded), with their types
    /// as written in `types` (`int64`, `decimal(14,2)`, `timestamptz`…).
    pub columns: Vec<ColumnInfo>,
    /// Rows in all files.
    pub rows: u64,
    /// Bytes of all files.
    pub bytes: u64,
    pub files: Vec<FileEntry>,
}

/// A column of a dataset's files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

/// One data file of a partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name in the partition's directory.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// The least and greatest value and the NULL count of the key columns.
    #[serde(default)]
    pub stats: BTreeMap<String, ColumnStats>,
    /// Where the rows came from.
    pub source: FileSource,
}

/// The source position of a file: which pipeline run, for which date, ran
/// which query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSource {
    pub pipeline: String,
    /// The run's logical date (`YYYY-MM-DD`).
    pub logical_date: String,
    /// The run that wrote the file (unique; part of the file's name).
    pub run: String,
    /// SHA-256 of the query as run (with the date filled in).
    pub query_sha256: String,
}

/// A column's least and greatest non-NULL values in a file, as JSON
/// (numbers for integers and floats, strings for decimals, dates,
/// timestamps and text), and its NULL count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnStats {
    pub min: Option<serde_json::Value>,
    pub max: Option<serde_json::Value>,
    pub nulls: u64,
}

impl Manifest {
    /// The logical dates of the partition's files.
    pub fn dates(&self) -> std::collections::BTreeSet<&str> {
        self.files
            .iter()
            .map(|f| f.source.logical_date.as_str())
            .collect()
    }
}

/// Escapes a partition value so it is one path segment: `/`, `=`, `%`,
/// control characters and a leading `.` are percent-encoded (as Hive does
/// for the characters it escapes); NULL is `__NULL__`.
pub fn escape_value(value: Option<&str>) -> String {
    let Some(value) = value else {
        return NULL_PARTITION.to_string();
    };
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.char_indices() {
        let escape = matches!(c, '/' | '\\' | '=' | '%' | '#' | '?' | '*' | ':' | '"')
            || c.is_control()
            || (i == 0 && c == '.');
        if escape {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str(EMPTY_PARTITION);
    }
    out
}

/// The partition value of NULL.
pub const NULL_PARTITION: &str = "__NULL__";
/// The partition value of the empty string.
pub const EMPTY_PARTITION: &str = "__EMPTY__";

/// The value a path segment's escaped text stands for (`None` for NULL).
pub fn unescape_value(text: &str) -> Option<String> {
    if text == NULL_PARTITION {
        return None;
    }
    if text == EMPTY_PARTITION {
        return Some(String::new());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The path of a partition from its column values, in order.
pub fn partition_path(values: &[(String, Option<String>)]) -> String {
    values
        .iter()
        .map(|(column, value)| format!("{column}={}", escape_value(value.as_deref())))
        .collect::<Vec<_>>()
        .join("/")
}

/// A partition path's column values (`None` for NULL), or `None` when a
/// segment is not `column=value`.
pub fn parse_partition(path: &str) -> Option<Vec<(String, Option<String>)>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    path.split('/')
        .map(|segment| {
            let (column, value) = segment.split_once('=')?;
            Some((column.to_string(), unescape_value(value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths_round_trip_any_value() {
        let values = vec![
            ("provider_id".to_string(), Some("7".to_string())),
            ("name".to_string(), Some("a/b=c%d".to_string())),
            ("region".to_string(), None),
            ("empty".to_string(), Some(String::new())),
            ("dot".to_string(), Some("..".to_string())),
        ];
        let path = partition_path(&values);
        assert_eq!(
            path,
            "provider_id=7/name=a%2Fb%3Dc%25d/region=__NULL__/empty=__EMPTY__/dot=%2E."
        );
        assert_eq!(parse_partition(&path), Some(values));
        assert_eq!(parse_partition("nope"), None);
    }
}
