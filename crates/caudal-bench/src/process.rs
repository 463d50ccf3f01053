//! A measured child process (caudal, or a reference tool) and its peak
//! resident memory.
//!
//! The peak is the process's own high-water mark (`VmHWM` in
//! `/proc/PID/status`), sampled every 10 ms until it exits:
//! `getrusage(RUSAGE_CHILDREN)` would also count every earlier child of this
//! process and of the shell that exec'd it (the cargo build).

use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often the high-water mark is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// A running child whose peak RSS is being sampled. Dropping it before the
/// child exited kills the child, so an aborted scenario leaves nothing
/// running.
#[derive(Debug)]
pub struct Measured {
    pid: Pid,
    started: Instant,
    peak_kib: Arc<AtomicU64>,
    /// Set once the child has been reaped.
    exited: Arc<AtomicBool>,
    /// Owns the child: samples it, reaps it, and returns its status and
    /// when it exited.
    waiter: Option<JoinHandle<std::io::Result<(ExitStatus, Instant)>>>,
}

/// How a measured child ended.
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub status: ExitStatus,
    /// Seconds from spawn to exit.
    pub secs: f64,
    pub peak_rss_mib: f64,
}

impl Measured {
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        let peak_kib = Arc::new(AtomicU64::new(0));
        let exited = Arc::new(AtomicBool::new(false));
        let (peak, done) = (peak_kib.clone(), exited.clone());
        let waiter = std::thread::spawn(move || {
            let ended = sample_until_exit(child, &peak);
            done.store(true, Ordering::Release);
            ended
        });
        Ok(Self {
            pid,
            started,
            peak_kib,
            exited,
            waiter: Some(waiter),
        })
    }

    /// Seconds since the child was spawned.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    /// The child's resident memory now (`VmRSS`), in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        self.status_mib("VmRSS:")
    }

    /// The private part of it (`RssAnon`: heap and stacks, not the pages of
    /// the binary and libraries it maps, which the system shares and can
    /// drop), in MiB.
    pub fn anon_rss_mib(&self) -> anyhow::Result<f64> {
        self.status_mib("RssAnon:")
    }

    fn status_mib(&self, field: &str) -> anyhow::Result<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("the child has exited")?;
        status_kib(&text, field)
            .map(|kib| kib as f64 / 1024.0)
            .with_context(|| format!("no {field} in the child's status"))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Kills the child at once (SIGKILL), as a crash would.
    pub fn kill(&self) -> anyhow::Result<()> {
        if !self.has_exited() {
            kill(self.pid, Signal::SIGKILL).context("cannot signal the child")?;
        }
        Ok(())
    }

    /// Asks the child to stop (SIGTERM).
    pub fn terminate(&self) -> anyhow::Result<()> {
        if !self.has_exited() {
            kill(self.pid, Signal::SIGTERM).context("cannot signal the child")?;
        }
        Ok(())
    }

    /// Waits for the child to exit.
    pub async fn wait(mut self) -> anyhow::Result<Ended> {
        let waiter = self
            .waiter
            .take()
            .context("the child was already waited for")?;
        let (status, exited) = tokio::task::spawn_blocking(move || waiter.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the sampling thread panicked"))??;
        Ok(Ended {
            status,
            secs: exited.duration_since(self.started).as_secs_f64(),
            peak_rss_mib: self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0,
        })
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

fn sample_until_exit(
    mut child: Child,
    peak_kib: &AtomicU64,
) -> std::io::Result<(ExitStatus, Instant)> {
    let status_file = format!("/proc/{}/status", child.id());
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = status_kib(&text, "VmHWM:")
        {
            peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        if let Some(status) = child.try_wait()? {
            return Ok((status, Instant::now()));
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
