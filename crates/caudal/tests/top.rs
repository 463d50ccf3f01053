//! `caudal top` in a real terminal: tmux runs it in a detached session of
//! its own; the test reads the screen with capture-pane and quits with q.

mod support;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{PATIENCE, PIPELINE, World};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tmux {args:?}: {e} (install tmux: apt-get install tmux)"))
}

/// Kills the session when the test ends, however it ends.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_live_figures_and_quits_with_q() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.insert(1..=50, 0).await;
    let daemon = world.start_daemon(1);
    world.wait_for_delivered(50).await;
    let config = world.write_config();
    let session = Session(format!("caudal-top-{}", std::process::id()));
    let line = format!(
        "cd {} && {} --config {} top",
        world.dir.path().display(),
        env!("CARGO_BIN_EXE_caudal"),
        config.display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "160",
        "-y",
        "20",
        &line,
    ]);
    assert!(
        started.status.success(),
        "tmux new-session: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let screen = loop {
        let shot = tmux(&["capture-pane", "-p", "-t", &session.0]);
        let text = String::from_utf8_lossy(&shot.stdout).to_string();
        if text.contains(PIPELINE) && text.contains("succeeded") && text.contains("50 / 50") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caudal top never showed the pipeline's figures:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for column in [
        "PIPELINE", "STATE", "IN", "OUT", "LAG", "BUFFER", "DEAD", "CIRCUIT",
    ] {
        assert!(screen.contains(column), "no {column} column:\n{screen}");
    }
    // It refreshes: the next screens still show the figures (and rates).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let shot = tmux(&["capture-pane", "-p", "-t", &session.0]);
    let again = String::from_utf8_lossy(&shot.stdout).to_string();
    assert!(again.contains("0/s"), "a rate after two samples:\n{again}");
    assert!(tmux(&["send-keys", "-t", &session.0, "q"]).status.success());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tmux(&["has-session", "-t", &session.0]).status.success() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "caudal top did not quit on q"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop(Signal::SIGTERM).await;
}
