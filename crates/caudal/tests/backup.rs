//! `caudal backup` and `caudal restore` against the real binary: a backup
//! taken through a running daemon's API while rows flow and the receiver
//! refuses some of them, then restored after the daemon went further.
//! `caudal run` resumes from it with nothing lost, every batch that was
//! buffered at the backup sent again under its same idempotency key, and
//! every record under its same event id. A backup taken without a daemon,
//! scheduled backups with retention, and the refusals (a daemon holding the
//! buffers, a directory that is no backup) are checked too.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Output, PATIENCE, PIPELINE, World, command, request_id};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The world's sink sends each record's event id beside it, and retries a
/// refused batch quickly and without end.
fn world_config(world: &World, extra: &str) -> PathBuf {
    let config = world
        .config_toml()
        .replace(
            r#"body = '{"requests": {{ records | tojson }}}'"#,
            r#"body = '{"requests": {{ records | tojson }}, "ids": {{ events | map(attribute="id") | list | tojson }}}'"#,
        )
        .replace(
            "delivery.retry = { max_attempts = 1 }",
            r#"delivery.retry = { initial = "50ms", max_delay = "200ms" }"#,
        );
    assert!(config.contains("\"ids\""), "the body template: {config}");
    let path = world.dir.path().join("backup.toml");
    std::fs::write(&path, format!("{config}\n{extra}")).expect("write the config");
    path
}

/// Per accepted request: its idempotency key and the (request id, event
/// id) pairs it carried.
fn accepted(world: &World) -> Vec<(String, Vec<(i64, String)>)> {
    world
        .receiver
        .requests()
        .into_iter()
        .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
        .map(|r| {
            let key = r
                .header("idempotency-key")
                .expect("an Idempotency-Key")
                .to_string();
            let body = r.json.clone().expect("a JSON body");
            let records = body["requests"].as_array().expect("requests").clone();
            let ids = body["ids"].as_array().expect("ids").clone();
            assert_eq!(records.len(), ids.len(), "{body}");
            let pairs = records
                .iter()
                .zip(&ids)
                .map(|(r, id)| (request_id(r), id.as_str().expect("an event id").to_string()))
                .collect();
            (key, pairs)
        })
        .collect()
}

async fn wait_for_rows(world: &World, rows: usize, daemon: &support::Daemon) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen: BTreeSet<i64> = world.delivered().iter().map(request_id).collect();
        if seen.len() >= rows {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {rows} rows delivered within {PATIENCE:?}\n{}",
            seen.len(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_token(config: &Path, dir: &Path) -> String {
    let out = Output::of(command(
        config,
        dir,
        &["token", "create", "--name", "backups", "--role", "admin"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    out.stdout.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_a_workload_restores_with_nothing_lost_and_the_same_keys() {
    let mut world = World::sqlite().await;
    world.max_records = 20;
    let port = free_port();
    let config = world_config(
        &world,
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let dir = world.dir.path().to_path_buf();
    let token = admin_token(&config, &dir).await;
    let backups = dir.join("backups");

    // Delivered before the backup.
    world.insert(1..=100, 0).await;
    let daemon = support::spawn_daemon(&config, &dir, 1);
    wait_for_rows(&world, 100, &daemon).await;

    // Buffered, refused by the receiver, at the backup.
    world.receiver.set_status(503);
    let refused_before = world.receiver.request_count();
    world.insert(101..=200, 1).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while world.receiver.request_count() < refused_before + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refused attempt\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = Output::of(command(
        &config,
        &dir,
        &[
            "--api",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            &token,
            "backup",
            "--to",
            "backups",
            "--json",
        ],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}\n{}", daemon.log());
    let taken: Value = serde_json::from_str(&out.stdout).expect("backup --json");
    assert_eq!(taken["store"], "sqlite", "{taken}");
    let copy = &taken["buffers"][PIPELINE];
    let (acked, end) = (copy["acked"].as_u64(), copy["next_offset"].as_u64());
    assert!(acked < end, "the copy holds undelivered batches: {taken}");
    let backup = PathBuf::from(taken["dir"].as_str().expect("dir"));
    assert!(backup.starts_with(&backups), "{backup:?} under {backups:?}");
    assert!(backup.join("state.db").is_file() && backup.join("manifest.json").is_file());

    // Delivered after the backup: the refused rows, and newer ones.
    world.receiver.set_status(200);
    world.insert(201..=300, 2).await;
    wait_for_rows(&world, 300, &daemon).await;
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    let before = accepted(&world);
    // Only the backup's buffer can bring these back now.
    world
        .exec("DELETE FROM service_requests WHERE request_id BETWEEN 101 AND 200")
        .await;

    let out = Output::of(command(
        &config,
        &dir,
        &["restore", backup.to_str().expect("utf-8")],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("moved aside"), "{out}");
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .expect("the state dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".before-restore-"))
        .collect();
    assert!(!aside.is_empty(), "the replaced state is kept: {out}");

    world.insert(301..=350, 3).await;
    let daemon = support::spawn_daemon(&config, &dir, 2);
    wait_for_rows(&world, 350, &daemon).await;
    // Whatever the restored state holds is delivered: wait for quiet.
    let mut count = world.receiver.request_count();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = world.receiver.request_count();
        if now == count {
            break;
        }
        count = now;
    }
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    let all = accepted(&world);
    let after = &all[before.len()..];

    // Nothing lost.
    let delivered: BTreeSet<i64> = all
        .iter()
        .flat_map(|(_, pairs)| pairs.iter().map(|(id, _)| *id))
        .collect();
    assert_eq!(delivered, (1..=350).collect::<BTreeSet<i64>>());
    // Every record keeps its event id, whenever it is sent.
    let mut event_of: BTreeMap<i64, String> = BTreeMap::new();
    for (_, pairs) in &all {
        for (id, event) in pairs {
            let first = event_of.entry(*id).or_insert_with(|| event.clone());
            assert_eq!(first, event, "row {id} under two event ids");
        }
    }
    // The batches buffered at the backup are sent again, under their keys,
    // holding the same records.
    let keys_before: BTreeMap<&str, &Vec<(i64, String)>> =
        before.iter().map(|(k, p)| (k.as_str(), p)).collect();
    let mut resent = 0;
    for (key, pairs) in after {
        if let Some(first) = keys_before.get(key.as_str()) {
            assert_eq!(*first, pairs, "batch {key} sent again with other records");
            resent += 1;
        }
        for (id, _) in pairs {
            if (101..=200).contains(id) {
                assert!(
                    keys_before.contains_key(key.as_str()),
                    "row {id}, buffered at the backup, came back under a new key {key}"
                );
            }
        }
    }
    assert!(resent > 0, "no buffered batch was sent again: {after:?}");
    let from_buffer: BTreeSet<i64> = after
        .iter()
        .flat_map(|(_, pairs)| pairs.iter().map(|(id, _)| *id))
        .filter(|id| (101..=200).contains(id))
        .collect();
    assert_eq!(
        from_buffer,
        (101..=200).collect::<BTreeSet<i64>>(),
        "the rows buffered at the backup (gone from the source) are delivered again"
    );
    eprintln!(
        "backup: {} requests before the restore, {} after ({resent} buffered batches re-sent)",
        before.len(),
        after.len()
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_offline_scheduled_with_retention_and_refused_while_in_use() {
    let mut world = World::sqlite().await;
    world.max_records = 10;
    let scheduled = "[backup]\ndir = \"scheduled\"\nevery = \"1s\"\nkeep = 2\n";
    let config = world_config(&world, scheduled);
    let dir = world.dir.path().to_path_buf();
    world.insert(1..=30, 0).await;

    // Without a daemon, in this process; a second backup is a second
    // directory.
    let out = Output::of(command(&config, &dir, &["backup", "--to", "offline"])).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("backup written to"), "{out}");

    // While the daemon runs, only through it.
    let daemon = support::spawn_daemon(&config, &dir, 1);
    wait_for_rows(&world, 30, &daemon).await;
    let out = Output::of(command(&config, &dir, &["backup", "--to", "offline"])).await;
    assert_eq!(out.code, Some(3), "busy: {out}");
    assert!(out.stderr.contains("--api"), "{out}");
    let offline = std::fs::read_dir(dir.join("offline"))
        .expect("the offline backup")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").is_file())
        .expect("a complete offline backup");
    let out = Output::of(command(
        &config,
        &dir,
        &["restore", offline.to_str().expect("utf-8")],
    ))
    .await;
    assert_eq!(
        out.code,
        Some(3),
        "refused while caudal run is active: {out}"
    );
    assert!(out.stderr.contains("stop `caudal run`"), "{out}");
    assert!(
        !std::fs::read_dir(&dir)
            .expect("the state dir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("before-restore")),
        "nothing moved while refused"
    );

    // Scheduled every second, two kept.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let taken = loop {
        let n = daemon.log().matches("backup taken").count();
        if n >= 4 {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "4 scheduled backups within {PATIENCE:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("old backup deleted"), "{log}");
    let kept: Vec<String> = std::fs::read_dir(dir.join("scheduled"))
        .expect("the scheduled backups")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 2, "{taken} taken, 2 kept: {kept:?}");
    assert!(
        kept.iter().all(|n| n.starts_with("caudal-backup-")),
        "{kept:?}"
    );

    // A directory that is no backup is refused, and nothing moves.
    let out = Output::of(command(&config, &dir, &["restore", "scheduled"])).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("manifest.json"), "{out}");
    assert!(world.state_db().is_file());

    // A scheduled backup restores as well: the newest one.
    let mut newest = kept.clone();
    newest.sort();
    let from = dir.join("scheduled").join(newest.last().expect("a backup"));
    let out = Output::of(command(
        &config,
        &dir,
        &["restore", from.to_str().expect("utf-8")],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = Output::of(command(&config, &dir, &["status", "--json"])).await;
    assert_eq!(out.code, Some(0), "{out}");
    world.cleanup().await;
}
