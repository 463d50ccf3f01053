//! Making a run's partitions visible, one partition at a time.
//!
//! Promises, per partition:
//! - **All or nothing.** The new files are complete objects (renamed into
//!   place, or multipart uploads completed) before the manifest names
//!   them; the manifest is replaced in one write; only then are the files
//!   it no longer names deleted. A reader that follows the manifest sees
//!   the old complete partition or the new complete one, never a mix.
//! - **A re-run replaces its own date only.** A partition's files of other
//!   logical dates stay (partitions not split by date hold several).
//! - A crash leaves at worst unnamed files; the partition's next commit
//!   deletes those older than an hour (younger ones may be another run's
//!   upload in progress).
//! - Commits of one partition in this process are serialised.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use caudal_core::dataset::{MANIFEST, MANIFEST_VERSION, Manifest};
use caudal_core::{Error, ErrorKind, Result};

use super::location::Location;
use super::writer::StagedPartition;

/// Unnamed files younger than this are left alone by the sweep.
const ORPHAN_AGE: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

/// A partition after its commit.
#[derive(Clone, Debug)]
pub struct Committed {
    pub path: String,
    /// `None` when the partition no longer exists (its last date removed).
    pub manifest: Option<Manifest>,
}

fn lock_for(key: String) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key)
        .or_default()
        .clone()
}

/// The manifest path of a partition.
pub fn manifest_path(partition: &str) -> String {
    if partition.is_empty() {
        MANIFEST.to_string()
    } else {
        format!("{partition}/{MANIFEST}")
    }
}

fn file_path(partition: &str, name: &str) -> String {
    if partition.is_empty() {
        name.to_string()
    } else {
        format!("{partition}/{name}")
    }
}

/// Reads a partition's manifest (`None` when it has none).
pub async fn read_manifest(location: &Location, partition: &str) -> Result<Option<Manifest>> {
    let Some(bytes) = location.get(&manifest_path(partition)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!(
                "{}/{}: not a caudal manifest: {e}",
                location.display,
                manifest_path(partition)
            ),
        )
    })
}

/// Publishes `staged` as the partition's files of `date` and commits the
/// manifest; `dataset` names it in the manifest. With no staged partition
/// (`staged` empty files) the date's files are removed from `path`.
pub async fn commit_partition(
    location: &Location,
    dataset: &str,
    format: &str,
    date: &str,
    path: &str,
    staged: Option<StagedPartition>,
) -> Result<Committed> {
    let lock = lock_for(format!("{}\u{0}{path}", location.display));
    let _guard = lock.lock().await;
    // 1. The new files, complete, under names no manifest uses yet.
    let mut new_files = Vec::new();
    let (values, columns) = match staged {
        Some(p) => {
            for f in p.files {
                location
                    .publish(&f.staged, &file_path(path, &f.entry.path))
                    .await?;
                new_files.push(f.entry);
            }
            (Some(p.values), Some(p.columns))
        }
        None => (None, None),
    };
    // 2. The manifest: other dates' files, and these.
    let old = read_manifest(location, path).await?;
    let mut files: Vec<_> = old
        .as_ref()
        .map(|m| {
            m.files
                .iter()
                .filter(|f| f.source.logical_date != date)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    files.extend(new_files);
    files.sort_by(|a, b| (&a.source.logical_date, &a.path).cmp(&(&b.source.logical_date, &b.path)));
    let named: BTreeSet<String> = files.iter().map(|f| f.path.clone()).collect();
    let manifest = if files.is_empty() {
        location.delete(&manifest_path(path)).await?;
        None
    } else {
        let values = values
            .or_else(|| old.as_ref().map(|m| m.values.clone()))
            .unwrap_or_default();
        let columns = columns
            .or_else(|| old.as_ref().map(|m| m.columns.clone()))
            .unwrap_or_default();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            dataset: dataset.to_string(),
            partition: path.to_string(),
            values,
            generation: old.as_ref().map_or(1, |m| m.generation + 1),
            committed_at: jiff::Timestamp::now().to_string(),
            format: format.to_string(),
            columns,
            rows: files.iter().map(|f| f.rows).sum(),
            bytes: files.iter().map(|f| f.bytes).sum(),
            files,
        };
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        location.put(&manifest_path(path), bytes).await?;
        Some(manifest)
    };
    // 3. The files no manifest names any more, and old leftovers.
    if let Some(old) = &old {
        for f in &old.files {
            if !named.contains(&f.path) {
                location.delete(&file_path(path, &f.path)).await?;
            }
        }
    }
    sweep(location, path, &named).await;
    Ok(Committed {
        path: path.to_string(),
        manifest,
    })
}

/// Deletes the partition's files (and staged leftovers) that its manifest
/// does not name and that are older than [`ORPHAN_AGE`].
async fn sweep(location: &Location, path: &str, named: &BTreeSet<String>) {
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    let Ok(objects) = location.list(path).await else {
        return;
    };
    let cutoff = jiff::Timestamp::now() - ORPHAN_AGE;
    for (object, _, modified) in objects {
        let Some(name) = object.strip_prefix(&prefix) else {
            continue;
        };
        if name.contains('/') || name == MANIFEST || named.contains(name) || modified > cutoff {
            continue;
        }
        if name.starts_with("part-") || name.starts_with(".part-") {
            tracing::info!(dataset = %location.display, file = %object, "deleting a file no manifest names (left by an interrupted run)");
            let _ = location.delete(&object).await;
        }
    }
}

/// Deletes a whole partition: its manifest first (readers stop seeing it),
/// then its files. Returns the files deleted.
pub async fn drop_partition(location: &Location, path: &str) -> Result<usize> {
    let lock = lock_for(format!("{}\u{0}{path}", location.display));
    let _guard = lock.lock().await;
    let old = read_manifest(location, path).await?;
    location.delete(&manifest_path(path)).await?;
    let mut n = 0;
    for (object, _, _) in location.list(path).await? {
        location.delete(&object).await?;
        n += 1;
    }
    if let Some(dir) = &location.local {
        // Remove the emptied directories, innermost first.
        let mut d = dir.join(path);
        while d.starts_with(dir) && d != *dir {
            if std::fs::remove_dir(&d).is_err() {
                break;
            }
            let Some(parent) = d.parent() else { break };
            d = parent.to_path_buf();
        }
    }
    Ok(n.max(old.map_or(0, |m| m.files.len())))
}
