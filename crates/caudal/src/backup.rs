//! `caudal backup` and `caudal restore`: the arguments resolved and the
//! outcome printed; the work is `caudal_engine::backup`'s.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use caudal_server::openapi::BackupTaken;

use crate::commands::{EXIT_CONFIG, fail, load, load_with_store};
use crate::remote::Remote;

/// Takes a backup: through the daemon's API with `--api`, else in this
/// process (which then holds the buffers while it copies them).
pub async fn backup(
    config: &Path,
    remote: Option<Remote>,
    to: Option<&Path>,
    json: bool,
) -> ExitCode {
    let taken = match remote {
        Some(remote) => {
            // The daemon resolves paths on its machine: send an absolute one.
            let to = to.map(absolute);
            match remote.backup(to.as_deref()).await {
                Ok(t) => t,
                Err(code) => return code,
            }
        }
        None => match local(config, to).await {
            Ok(t) => t,
            Err(code) => return code,
        },
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&taken).unwrap_or_default()
        );
    } else {
        print_taken(&taken);
    }
    ExitCode::SUCCESS
}

async fn local(config: &Path, to: Option<&Path>) -> Result<BackupTaken, ExitCode> {
    let (config, store) = load_with_store(config).await?;
    let into = match to {
        Some(dir) => dir.to_path_buf(),
        None => config.backup_dir().ok_or_else(|| {
            eprintln!("error: say where with --to DIR (or set [backup] dir)");
            ExitCode::from(EXIT_CONFIG)
        })?,
    };
    let buffers = caudal_engine::backup::open_buffers(&config)
        .await
        .map_err(|e| {
            let code = fail(&e);
            eprintln!(
                "hint: while `caudal run` holds the buffers, ask it: caudal backup --api URL --token T --to DIR"
            );
            code
        })?;
    caudal_engine::backup::take(&store, &buffers, &[], &into)
        .await
        .map(BackupTaken::from)
        .map_err(|e| fail(&e))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn print_taken(t: &BackupTaken) {
    println!("backup written to {}", t.dir);
    match t.store.as_str() {
        "sqlite" => println!("  state store: copied"),
        other => println!("  state store: {other}, not copied (back it up with pg_dump)"),
    }
    for name in &t.not_copied {
        println!("  buffer {name}: not copied (another node of the cluster holds it)");
    }
    for (name, b) in &t.buffers {
        println!(
            "  buffer {name}: entries {}..{} ({} segment files, {} bytes)",
            b.acked, b.next_offset, b.segments, b.bytes
        );
    }
}

/// Puts a backup in place (the daemon stopped), and says what it means.
pub async fn restore(config_path: &Path, from: &Path, store_restored: bool) -> ExitCode {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let restored = match caudal_engine::backup::restore(&config, from, store_restored).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if let Some(store) = &restored.store {
        println!("state store restored to {}", store.display());
    }
    for (name, dir) in &restored.buffers {
        println!("buffer of {name} restored to {}", dir.display());
    }
    for old in &restored.moved_aside {
        println!("moved aside: {}", old.display());
    }
    for name in &restored.skipped {
        println!("not restored: pipeline {name:?} is not in the configuration");
    }
    println!(
        "caudal run resumes each pipeline from the backup's checkpoint: what was delivered after the backup is sent again, under the same idempotency keys for the buffered batches and the same event ids for every record. CDC pipelines: see docs/operations.md#backups about replication slots."
    );
    ExitCode::SUCCESS
}
