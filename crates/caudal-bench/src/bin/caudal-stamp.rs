//! `caudal-stamp FILE`: appends `START END` (nanoseconds since the Unix
//! epoch: when its `main` began, and when it was about to write) to FILE
//! and exits. The task of `workflow-chain`: the time from one link's END to
//! the next link's START is what an orchestrator adds between two tasks,
//! including starting the next process. Std only, so it starts fast.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn main() -> std::process::ExitCode {
    let start = now_ns();
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: caudal-stamp FILE");
        return std::process::ExitCode::from(2);
    };
    let end = now_ns();
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{start} {end}\n").as_bytes()));
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caudal-stamp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
