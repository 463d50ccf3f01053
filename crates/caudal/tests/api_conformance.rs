//! The REST API against its own OpenAPI document, checked by schemathesis
//! (PyPI; `crates/caudal/tests/conformance/install`, which scripts/test
//! runs and exports as `CAUDAL_SCHEMATHESIS`): requests generated from the
//! document, valid and not, sent to a running daemon with an admin token;
//! no answer may be a server error, and every answer must be one the
//! document lists, in the shape it gives.

mod support;

use nix::sys::signal::Signal;
use support::{Output, World, command, spawn_daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_openapi_document() {
    let schemathesis = std::env::var("CAUDAL_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "CAUDAL_SCHEMATHESIS is not set: run crates/caudal/tests/conformance/install \
             (scripts/test does) and export the path it prints"
        )
    });
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.insert(1..=5, 0).await;
    let port = free_port();
    let path = world.dir.path().join("conformance.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[workflows.nightly.tasks.hello]\ntype = \"command\"\nrun = [\"true\"]\n\n\
             [alerts.refused]\ncheck = \"dead_letters\"\npipeline = \"{}\"\nabove = 0\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\nrequests_per_second = 100000\n",
            world.config_toml(),
            support::PIPELINE
        ),
    )
    .expect("write the config");
    let out = Output::of(command(
        &path,
        world.dir.path(),
        &[
            "token",
            "create",
            "--name",
            "conformance",
            "--role",
            "admin",
        ],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let token = out.stdout.trim().to_string();
    let daemon = spawn_daemon(&path, world.dir.path(), 1);
    let report = world.dir.path().join("schemathesis");
    let mut cmd = tokio::process::Command::new(&schemathesis);
    cmd.args([
        "run",
        &format!("http://127.0.0.1:{port}/api/openapi.json"),
        "--wait-for-schema",
        "60",
        "--header",
        &format!("Authorization: Bearer {token}"),
        "--checks",
        "all",
        "--max-examples",
        "40",
        "--workers",
        "1",
        "--seed",
        "20261207",
        "--generation-deterministic",
        // Draining the only node stops the daemon under test; a backup
        // writes directories wherever its body says (tests/backup.rs
        // covers it).
        "--exclude-path-regex",
        "/drain$|/backups$",
        "--request-timeout",
        "30",
        "--report-dir",
    ])
    .arg(&report)
    .env("NO_COLOR", "1")
    // Its cache directory goes to the test's own directory.
    .current_dir(world.dir.path())
    .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(600), cmd.output())
        .await
        .expect("schemathesis finished within 10 minutes")
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(
        output.status.success(),
        "schemathesis found mismatches:\n{text}\n--- daemon log\n{log}"
    );
    println!("{text}");
    world.cleanup().await;
}
