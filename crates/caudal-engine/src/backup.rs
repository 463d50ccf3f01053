//! Backups of a node's state, and restoring one: `caudal backup`, `caudal
//! restore` and `[backup]` in `caudal run`. The CLI and the API call the
//! same functions.
//!
//! Promises:
//! - **Online and consistent.** A backup is taken while pipelines read and
//!   deliver. It holds the SQLite state store as of one instant and every
//!   pipeline's buffer from the offset acknowledged *before* that instant
//!   to the end written *after* it. So in the restored state every
//!   buffered entry the checkpoint covers is there (nothing lost), and what
//!   was delivered after the backup began is delivered again from the
//!   buffer as the same batches, with the same idempotency keys and event
//!   ids (a restore repeats, it never invents).
//! - **Whole or absent.** A backup is written into `NAME.partial` and
//!   renamed to `caudal-backup-<UTC time>` only once every file is copied,
//!   synced and checked (`fsck` of each buffer copy). Retention only
//!   counts and deletes complete backups.
//! - **Restore loses nothing.** `restore` needs the daemon stopped (it
//!   takes each buffer's lock), and moves the state it replaces aside
//!   (`NAME.before-restore-<time>`) instead of deleting it.
//! - A PostgreSQL state store is not copied (use `pg_dump`): the backup
//!   then holds the buffers, and its manifest says so.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use caudal_buffer::{Buffer, BufferConfig, Copied};
use caudal_core::config::Config;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;
use serde::{Deserialize, Serialize};

/// The name of a complete backup's directory starts with this.
pub const PREFIX: &str = "caudal-backup-";
/// The manifest inside a backup.
pub const MANIFEST: &str = "manifest.json";
/// The state store copy inside a backup.
pub const STORE_FILE: &str = "state.db";
/// The directory of buffer copies inside a backup, one per pipeline.
pub const BUFFERS_DIR: &str = "buffers";
const PARTIAL: &str = ".partial";

/// What a backup holds; written as `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The caudal version that took it.
    pub version: String,
    /// When it was taken (RFC 3339, UTC).
    pub taken_at: String,
    /// `"sqlite"` (copied as `state.db`) or `"postgres"` (not copied).
    pub store: String,
    /// Each pipeline's buffer copy: from which offset it delivers, up to
    /// where it holds entries.
    pub buffers: BTreeMap<String, Copied>,
    /// Pipelines whose buffer the process that took the backup did not
    /// have open (in a cluster, another node owns them): not copied.
    #[serde(default)]
    pub not_copied: Vec<String>,
}

/// A backup written by [`take`].
#[derive(Clone, Debug, Serialize)]
pub struct Taken {
    /// Its directory.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
}

/// Takes a backup of `store` and `buffers` (pipeline name, open buffer)
/// into a new directory under `into`, and returns it.
pub async fn take(
    store: &Store,
    buffers: &[(String, Buffer)],
    not_copied: &[String],
    into: &Path,
) -> Result<Taken> {
    let now = jiff::Timestamp::now();
    let name = format!("{PREFIX}{}", now.strftime("%Y%m%dT%H%M%S%.3fZ"));
    let dir = into.join(&name);
    let partial = into.join(format!("{name}{PARTIAL}"));
    if dir.exists() || partial.exists() {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("{} is being written already", dir.display()),
        ));
    }
    create_dir(into)?;
    // Only its owner may read a backup: it holds records and token hashes.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .map_err(|e| io_error("create", &partial, e))?;
    create_dir(&partial.join(BUFFERS_DIR))?;
    let result = fill(store, buffers, not_copied, &partial, now).await;
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let (from, to) = (partial.clone(), dir.clone());
    blocking("publish the backup", move || {
        std::fs::rename(&from, &to).map_err(|e| io_error("rename", &from, e))?;
        sync_dir(to.parent().unwrap_or(&to))
    })
    .await?;
    metrics::counter!("caudal_backups_total", "outcome" => "taken").increment(1);
    metrics::gauge!("caudal_backup_last_success_timestamp_seconds").set(now.as_second() as f64);
    Ok(Taken { dir, manifest })
}

async fn fill(
    store: &Store,
    buffers: &[(String, Buffer)],
    not_copied: &[String],
    partial: &Path,
    now: jiff::Timestamp,
) -> Result<Manifest> {
    // The acknowledged offsets first, then the store, then the buffers'
    // contents: see the module's promises.
    let snapshots: Vec<(String, caudal_buffer::Snapshot)> = buffers
        .iter()
        .map(|(name, b)| (name.clone(), b.snapshot()))
        .collect();
    let backend = store.backend().to_string();
    if backend == "sqlite" {
        store.copy_to(&partial.join(STORE_FILE)).await?;
    }
    let mut copied = BTreeMap::new();
    for (name, snapshot) in snapshots {
        let to = partial.join(BUFFERS_DIR).join(&name);
        let pipeline = name.clone();
        let got = blocking("copy a buffer", move || {
            let got = snapshot.copy_to(&to).map_err(|e| {
                Error::with_source(
                    ErrorKind::Buffer,
                    format!("copying the buffer of pipeline {pipeline:?}"),
                    e,
                )
            })?;
            drop(snapshot);
            check_copy(&pipeline, &to)?;
            Ok(got)
        })
        .await?;
        copied.insert(name, got);
    }
    let manifest = Manifest {
        version: env!("CARGO_PKG_VERSION").to_string(),
        taken_at: now.to_string(),
        store: backend,
        buffers: copied,
        not_copied: not_copied.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::with_source(ErrorKind::Internal, "writing the manifest", e))?;
    let path = partial.join(MANIFEST);
    let dir = partial.to_path_buf();
    blocking("write the manifest", move || {
        write_synced(&path, &text)?;
        sync_dir(&dir)
    })
    .await?;
    Ok(manifest)
}

/// A buffer copy must pass `fsck`, or the backup is not kept.
fn check_copy(pipeline: &str, dir: &Path) -> Result<()> {
    let report = caudal_buffer::fsck(dir).map_err(|e| {
        Error::with_source(
            ErrorKind::Buffer,
            format!("checking the copy of pipeline {pipeline:?}'s buffer"),
            e,
        )
    })?;
    match report.problems.first() {
        None => Ok(()),
        Some(p) => Err(Error::new(
            ErrorKind::Buffer,
            format!("the copy of pipeline {pipeline:?}'s buffer is damaged: {p}"),
        )),
    }
}

/// Every pipeline buffer of `config` on disk, opened by this process (so
/// no `caudal run` may hold them): for a backup taken without a daemon.
pub async fn open_buffers(config: &Config) -> Result<Vec<(String, Buffer)>> {
    let mut out = Vec::new();
    for name in config.pipelines.keys() {
        let dir = config.buffer_dir(name);
        if !dir.is_dir() {
            continue;
        }
        let buffer = crate::buffered::open(name, &dir, BufferConfig::default()).await?;
        out.push((name.clone(), buffer));
    }
    Ok(out)
}

/// The complete backups in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list backups in", dir, e)),
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && !n.ends_with(PARTIAL))
                && p.join(MANIFEST).is_file()
        })
        .collect();
    // The names sort by time.
    found.sort();
    Ok(found)
}

/// Deletes the oldest complete backups in `dir` beyond the newest `keep`;
/// returns the ones deleted.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list(dir)?;
    let extra = all.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for old in all.into_iter().take(extra) {
        std::fs::remove_dir_all(&old).map_err(|e| io_error("delete old backup", &old, e))?;
        deleted.push(old);
    }
    Ok(deleted)
}

/// Reads a backup's manifest.
pub fn read_manifest(backup: &Path) -> Result<Manifest> {
    let path = backup.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!(
                "{} is not a caudal backup (no readable {MANIFEST})",
                backup.display()
            ),
            e,
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("{}: the manifest cannot be read", path.display()),
            e,
        )
    })
}

/// What [`restore`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Restored {
    /// The state store file written, if the backup holds one.
    pub store: Option<PathBuf>,
    /// The buffers written, per pipeline.
    pub buffers: BTreeMap<String, PathBuf>,
    /// What was there before, moved aside (never deleted).
    pub moved_aside: Vec<PathBuf>,
    /// Pipelines in the backup that `config` no longer has: not restored.
    pub skipped: Vec<String>,
}

/// Puts the state of `backup` in place for `config`: the SQLite store and
/// every pipeline's buffer.
///
/// Checks everything before it moves anything: the manifest, the store
/// copy, every buffer copy (`fsck`), that no `caudal run` is active on the
/// store (its node heartbeat) and that no process holds a buffer. Then it
/// moves what it replaces aside under names that never overwrite, and
/// copies the backup in. A backup whose store is PostgreSQL is restored
/// only with `store_restored` (the dump taken with it is back in place):
/// its buffers alone, against a newer store, would hide undelivered
/// entries.
pub async fn restore(config: &Config, backup: &Path, store_restored: bool) -> Result<Restored> {
    let manifest = read_manifest(backup)?;
    let state_file = config.sqlite_state_path();
    match (manifest.store.as_str(), &state_file) {
        ("sqlite", Some(_)) => {}
        ("sqlite", None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "the backup holds an SQLite store but state.url is not an SQLite file",
            ));
        }
        ("postgres", None) if store_restored => {}
        ("postgres", None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "the backup's store is PostgreSQL: restore the pg_dump taken with it first, then \
                 run `caudal restore --store-restored` for the buffers",
            ));
        }
        (other, _) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the backup's store is {other:?} but state.url is an SQLite file: restore a \
                     PostgreSQL store with pg_restore and point state.url at it"
                ),
            ));
        }
    }
    let checked = backup.to_path_buf();
    let names: Vec<String> = manifest.buffers.keys().cloned().collect();
    let sqlite = manifest.store == "sqlite";
    blocking("check the backup", move || {
        if sqlite && !checked.join(STORE_FILE).is_file() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{}: {STORE_FILE} is missing", checked.display()),
            ));
        }
        for name in &names {
            check_copy(name, &checked.join(BUFFERS_DIR).join(name))?;
        }
        Ok(())
    })
    .await?;
    refuse_active_nodes(config).await?;
    // Holding every current buffer's lock keeps a daemon from starting
    // while the files move, and tells a running one apart.
    let held = open_buffers(config).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Busy,
            "stop `caudal run` before restoring: a pipeline's buffer is in use",
            e,
        )
    })?;
    let stamp = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%S%.3fZ")
        .to_string();
    let config = config.clone();
    let backup = backup.to_path_buf();
    blocking("restore", move || {
        let mut done = Restored::default();
        let result = put_in_place(
            &config,
            &backup,
            &manifest,
            state_file.as_deref(),
            held,
            &stamp,
            &mut done,
        );
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                let aside: Vec<String> = done
                    .moved_aside
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                Err(Error::with_source(
                    ErrorKind::Store,
                    format!(
                        "the restore stopped half-way; what it replaced is kept in: {}",
                        if aside.is_empty() {
                            "(nothing was moved)".to_string()
                        } else {
                            aside.join(", ")
                        }
                    ),
                    e,
                ))
            }
        }
    })
    .await
}

/// Refuses while the state store names a `caudal run` that is active or
/// draining (its heartbeat is fresh).
async fn refuse_active_nodes(config: &Config) -> Result<()> {
    let Some(file) = config.sqlite_state_path() else {
        return Ok(());
    };
    if !file.is_file() {
        return Ok(());
    }
    let store = Store::open(config.state.url.expose()).await?;
    let nodes = crate::cluster::nodes(&store).await;
    store.close().await;
    if let Some(n) = nodes?
        .iter()
        .find(|n| n.state == "active" || n.state == "draining")
    {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "stop `caudal run` before restoring: node {} (pid {} on {}) is {} (heartbeat {:.0}s ago); \
                 a process that died is taken for gone 30s after its last heartbeat",
                n.id, n.pid, n.host, n.state, n.heartbeat_age_s
            ),
        ));
    }
    Ok(())
}

fn put_in_place(
    config: &Config,
    backup: &Path,
    manifest: &Manifest,
    state_file: Option<&Path>,
    held: Vec<(String, Buffer)>,
    stamp: &str,
    done: &mut Restored,
) -> Result<()> {
    let aside = |path: &Path, done: &mut Restored| -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let mut n = 0;
        let to = loop {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".before-restore-{stamp}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let to = path.with_file_name(name);
            if !to.exists() {
                break to;
            }
            n += 1;
        };
        std::fs::rename(path, &to).map_err(|e| io_error("move aside", path, e))?;
        done.moved_aside.push(to);
        Ok(())
    };
    if let (Some(file), "sqlite") = (state_file, manifest.store.as_str()) {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_dir(parent)?;
        }
        // Copied beside it first, so the swap is a rename.
        let incoming = with_suffix(file, ".restoring");
        copy_file(&backup.join(STORE_FILE), &incoming)?;
        for suffix in ["", "-wal", "-shm"] {
            aside(&with_suffix(file, suffix), done)?;
        }
        std::fs::rename(&incoming, file).map_err(|e| io_error("rename", &incoming, e))?;
        done.store = Some(file.to_path_buf());
    }
    // Every configured pipeline's buffer goes: one the backup lacks had
    // nothing buffered when it was taken.
    let mut locks = held;
    for name in config.pipelines.keys() {
        let dir = config.buffer_dir(name);
        let incoming = manifest
            .buffers
            .contains_key(name)
            .then(|| -> Result<PathBuf> {
                let incoming = with_suffix(&dir, ".restoring");
                if incoming.exists() {
                    std::fs::remove_dir_all(&incoming)
                        .map_err(|e| io_error("remove the leftover", &incoming, e))?;
                }
                copy_dir(&backup.join(BUFFERS_DIR).join(name), &incoming)?;
                Ok(incoming)
            })
            .transpose()?;
        if let Some(i) = locks.iter().position(|(n, _)| n == name) {
            // Let go of the lock file before the directory moves.
            drop(locks.swap_remove(i));
        }
        aside(&dir, done)?;
        if let Some(incoming) = incoming {
            std::fs::rename(&incoming, &dir).map_err(|e| io_error("rename", &incoming, e))?;
            done.buffers.insert(name.clone(), dir);
        }
    }
    for name in manifest.buffers.keys() {
        if !config.pipelines.contains_key(name) {
            done.skipped.push(name.clone());
        }
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::with_source(ErrorKind::Internal, format!("the task to {what} failed"), e)
    })?
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Store,
        format!("cannot {what} {}", path.display()),
        e,
    )
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync directory", dir, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    std::fs::File::create(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| io_error("write", path, e))
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| io_error("copy", from, e))?;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("sync", to, e))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    create_dir(to)?;
    let entries = std::fs::read_dir(from).map_err(|e| io_error("read", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("read", from, e))?;
        if entry.path().is_file() {
            copy_file(&entry.path(), &to.join(entry.file_name()))?;
        }
    }
    sync_dir(to)
}

/// The buffers of `pipelines` this process has open, for a backup taken
/// by the daemon that runs them; and the pipelines whose buffer it has not
/// opened (in a cluster, those another node owns), which it leaves alone:
/// opening a buffer recovers the pipeline, which only its owner may do.
pub fn pipeline_buffers(pipelines: &[crate::Pipeline]) -> (Vec<(String, Buffer)>, Vec<String>) {
    let mut open = Vec::with_capacity(pipelines.len());
    let mut not_open = Vec::new();
    for p in pipelines {
        match p.opened_buffer() {
            Some(b) => open.push((p.name().to_string(), b.clone())),
            None => not_open.push(p.name().to_string()),
        }
    }
    (open, not_open)
}

/// `[backup]` in `caudal run`: a backup of `pipelines`' buffers and the
/// store every `every`, then the oldest beyond `keep` deleted, until
/// `shutdown`. A failed backup is logged (and counted in
/// `caudal_backups_total{outcome="failed"}`) and tried again at the next
/// interval.
pub async fn serve(
    config: std::sync::Arc<Config>,
    store: Store,
    pipelines: Vec<crate::Pipeline>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (Some(settings), Some(dir)) = (config.backup.clone(), config.backup_dir()) else {
        return;
    };
    let every = settings.every.as_std();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let (buffers, not_open) = pipeline_buffers(&pipelines);
        let taken = take(&store, &buffers, &not_open, &dir).await;
        match taken {
            Ok(t) => {
                tracing::info!(backup = %t.dir.display(), buffers = t.manifest.buffers.len(), "backup taken");
                let keep = usize::try_from(settings.keep).unwrap_or(usize::MAX);
                let d = dir.clone();
                match blocking("prune backups", move || prune(&d, keep)).await {
                    Ok(deleted) => {
                        for old in deleted {
                            tracing::info!(backup = %old.display(), "old backup deleted");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e.report(), "cannot delete old backups"),
                }
            }
            Err(e) => {
                metrics::counter!("caudal_backups_total", "outcome" => "failed").increment(1);
                tracing::error!(dir = %dir.display(), error = %e.report(), "backup failed; trying again at the next interval");
            }
        }
    }
}
