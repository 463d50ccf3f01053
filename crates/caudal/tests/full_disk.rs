//! A full disk is backpressure, not a wedge, through the real binary: the
//! pipeline's buffer directory on a 3 MiB tmpfs, 50,000 rows to sync (about
//! four times what the disk holds) and the partner down until the disk
//! fills. Intake waits instead of failing (and says why); once the partner
//! is back, delivery drains the buffer, the acknowledged space goes back to
//! the disk, intake resumes by itself, and every row arrives, with no
//! manual step.
//!
//! The test mounts a tmpfs, so it must run as root; it fails saying so
//! otherwise. The daemon serves `/metrics` and the API, to show the
//! blocked intake.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use caudal_store::{RunOutcome, Store};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Daemon, PIPELINE, RECORDS, World, each, spawn_daemon};

const ROWS: i64 = 50_000;
/// Longer than [`support::PATIENCE`]: the whole sync goes through a full
/// disk several times.
const SYNC_PATIENCE: Duration = Duration::from_secs(300);

/// A tmpfs mounted on `dir`, unmounted (lazily, so that files still open
/// cannot block it) when dropped, also when the test fails.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}; this test needs root and mount(8)"));
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} failed: {}; this test needs root (it puts the \
             buffer on a small filesystem to fill it)",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Bytes in use on the filesystem.
    fn used(&self) -> u64 {
        let space = caudal_buffer::space(&self.dir).expect("free space of the tmpfs");
        space.total_bytes - space.free_bytes
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg("-l").arg(&self.dir).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("could not unmount the tmpfs at {}", self.dir.display());
        }
    }
}

/// Inserts rows 1..=`ROWS` in one transaction.
async fn insert_rows(w: &World) {
    let mut sql = String::from("BEGIN;");
    for chunk in (1..=ROWS).collect::<Vec<_>>().chunks(1000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|id| {
                format!("({id}, 'SRV-{id}', '2025-05-14T12:00:00Z', 1, '2025-05-14T12:00:00Z')")
            })
            .collect();
        sql.push_str(&format!(
            "INSERT INTO service_requests \
             (request_id, service_id, opening_date, status_id, last_modified_date) VALUES {};",
            values.join(", ")
        ));
    }
    sql.push_str("COMMIT;");
    w.exec(&sql).await;
}

/// `caudal run` with the world's config and a `[server]` on a free port;
/// returns the daemon and the port.
fn start_daemon_with_metrics(w: &World) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let path = w.dir.path().join("server.toml");
    let config = format!(
        "{}\n[server]\nlisten = \"127.0.0.1:{port}\"\n",
        w.config_toml()
    );
    std::fs::write(&path, config).expect("write the config");
    (spawn_daemon(&path, w.dir.path(), 1), port)
}

/// The gauge `caudal_buffer_blocked{pipeline, reason="disk_full"}` as the
/// daemon serves it now (`None` until it is set or while the server is
/// not up yet).
async fn blocked_gauge(port: u16) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "caudal_buffer_blocked"
                && s.labels.get("pipeline") == Some(PIPELINE)
                && s.labels.get("reason") == Some("disk_full")
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Polls the gauge until it reads `value`.
async fn wait_for_blocked_gauge(port: u16, daemon: &Daemon, value: f64) {
    let deadline = tokio::time::Instant::now() + SYNC_PATIENCE;
    loop {
        let now = blocked_gauge(port).await;
        if now == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caudal_buffer_blocked is {now:?}, not {value}, after {SYNC_PATIENCE:?}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The daemon's live status of [`PIPELINE`] (`caudal --api ... status
/// --json`), polled until `done` holds for it.
async fn wait_for_live_status(
    w: &World,
    daemon: &Daemon,
    port: u16,
    token: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let api = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + SYNC_PATIENCE;
    loop {
        let out = w
            .caudal(&["--api", &api, "--token", token, "status", "--json"])
            .await;
        let status = (out.code == Some(0))
            .then(|| serde_json::from_str::<Value>(&out.stdout).ok())
            .flatten()
            .and_then(|rows| {
                rows.as_array()?
                    .iter()
                    .find(|r| r["pipeline"] == PIPELINE)
                    .cloned()
            });
        if let Some(status) = status.filter(|s| done(s)) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not shown by the daemon's status after {SYNC_PATIENCE:?}: {out}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn inspect(w: &World) -> Value {
    let out = w.caudal(&["buffer", "inspect", PIPELINE, "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Polls `caudal buffer inspect --json` until `done` holds; returns it.
async fn wait_for_inspection(
    w: &World,
    daemon: &Daemon,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + SYNC_PATIENCE;
    loop {
        let inspection = inspect(w).await;
        if done(&inspection) {
            return inspection;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not reached after {SYNC_PATIENCE:?}: {inspection}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_full_disk_holds_intake_back_until_delivery_frees_it_and_every_row_arrives() {
    let mut w = World::sqlite().await;
    w.retry = r#"{ initial = "10ms", max_delay = "200ms" }"#.into();
    // The partner's outage opens the breaker; let it close soon after.
    w.sink_extra = r#"circuit_breaker = { open_for = "500ms" }"#.into();
    insert_rows(&w).await;
    let disk = Tmpfs::mount(&w.buffer_dir(), "3m");
    w.receiver.stop().await;
    let token = w
        .caudal(&["token", "create", "--name", "watch", "--role", "viewer"])
        .await;
    assert_eq!(token.code, Some(0), "{token}");
    let token = token.stdout.trim().to_string();
    let (daemon, port) = start_daemon_with_metrics(&w);

    // The disk fills: intake waits, and says why (the buffer's marker,
    // read by another process, and the log).
    let full = wait_for_inspection(&w, &daemon, "a full disk", |i| {
        i["disk_full_since_unix_ms"].is_u64()
    })
    .await;
    let total = full["space"]["total_bytes"].as_u64().expect("space");
    assert!(
        full["space"]["free_bytes"].as_u64().expect("free") < total / 10,
        "{full}"
    );
    let text = w.caudal(&["buffer", "inspect", PIPELINE]).await;
    assert!(text.stdout.contains("disk full"), "{text}");
    let used_full = disk.used();
    let status = w.status().await;
    assert_eq!(
        status["outcome"], "running",
        "intake waits, the run does not fail: {status}"
    );
    let log = daemon.log();
    assert!(
        log.contains("buffer.max_bytes (the default) is 268435456 bytes, but the buffer's filesystem has room for"),
        "the start-up check warns that the default cap cannot fit: {log}"
    );
    assert!(log.contains("buffer disk full; intake waits"), "{log}");
    assert!(!log.contains("run failed"), "{log}");
    wait_for_blocked_gauge(port, &daemon, 1.0).await;
    let live = wait_for_live_status(&w, &daemon, port, &token, "why intake waits", |s| {
        s["intake_blocked"].is_string()
    })
    .await;
    let why = live["intake_blocked"].as_str().unwrap_or_default();
    assert!(why.contains("the buffer's disk is full"), "{live}");

    // The partner comes back: everything is delivered, with no step by hand.
    w.receiver.restart().await;
    let arrived = w
        .receiver
        .wait_for_accepted_records(RECORDS, ROWS as usize, SYNC_PATIENCE)
        .await;
    assert!(
        arrived,
        "{} of {ROWS} rows delivered; log:\n{}",
        w.delivered().len(),
        daemon.log()
    );
    // Drained: the space held by acknowledged batches returns to the disk
    // (an empty segment and the acknowledged offset remain).
    let drained = wait_for_inspection(&w, &daemon, "a drained, reclaimed buffer", |i| {
        i["next_offset"] == i["acked"] && i["disk_bytes"] == caudal_buffer::SEGMENT_HEADER_BYTES
    })
    .await;
    assert!(drained["disk_full_since_unix_ms"].is_null(), "{drained}");
    assert!(
        disk.used() <= 16 * 1024,
        "{} bytes still used on the buffer's disk ({used_full} when it was full)",
        disk.used()
    );
    let status = w.status().await;
    assert_eq!(status["buffered_batches"], 0, "{status}");
    wait_for_blocked_gauge(port, &daemon, 0.0).await;
    wait_for_live_status(&w, &daemon, port, &token, "intake no longer waiting", |s| {
        s["intake_blocked"].is_null()
    })
    .await;

    let (exit, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("intake resumed"), "{log}");
    assert!(!log.contains("run failed"), "{log}");
    assert_eq!(w.delivery_counts(), each(1..=ROWS, 1));
    let fsck = w.caudal(&["buffer", "fsck", PIPELINE]).await;
    assert!(fsck.stdout.contains("no problems found"), "{fsck}");

    // The run history: no run failed; the rows were read once and
    // delivered once across the runs.
    let store = Store::open(&format!("sqlite://{}", w.state_db().display()))
        .await
        .expect("the state store");
    let runs = store.runs(Some(PIPELINE), 1000).await.expect("runs");
    assert!(!runs.is_empty());
    let failed: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome == RunOutcome::Failed)
        .collect();
    assert!(failed.is_empty(), "failed runs: {failed:?}");
    assert!(
        runs.iter().any(|r| r.outcome == RunOutcome::Succeeded),
        "{runs:?}"
    );
    assert_eq!(runs.iter().map(|r| r.rows_read).sum::<u64>(), ROWS as u64);
    assert_eq!(
        runs.iter().map(|r| r.rows_delivered).sum::<u64>(),
        ROWS as u64
    );
    drop(disk);
}
