//! The progress line a command draws on standard error while it waits
//! (`caudal once`, `caudal workflow run --wait`): only on a terminal, and
//! lifted while a log line is written, so logs print above it instead of
//! garbling it.

use std::io::{self, IsTerminal as _, Write};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use caudal_store::FrontierSummary;
use indicatif::ProgressBar;

/// The line on screen, if any: log lines are written around it.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn shown() -> std::sync::MutexGuard<'static, Option<ProgressBar>> {
    SHOWN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A spinner line `{prefix}: {message} [elapsed]` on standard error, or
/// `None` when standard error is not a terminal. Take it off with
/// [`clear`].
pub fn spinner(prefix: String) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_prefix(prefix);
    bar.enable_steady_tick(Duration::from_millis(120));
    *shown() = Some(bar.clone());
    Some(bar)
}

/// Takes the line off the screen.
pub fn clear(bar: &ProgressBar) {
    bar.finish_and_clear();
    *shown() = None;
}

/// Crawl frontier `name` as the store has it now, if it does.
pub async fn frontier(store: &caudal_store::Store, name: &str) -> Option<FrontierSummary> {
    // The store matches a prefix with LIKE and drops the `%` and `_` it
    // holds: ask for the part before the first of them, keep the exact name.
    let plain = name.split(['%', '_']).next().unwrap_or_default();
    let all = store.frontiers(Some(plain)).await.ok()?;
    all.into_iter().find(|f| f.name == name)
}

/// What a crawl frontier's pages say on a progress line: `120 pages done,
/// 30 queued` (`, 2 failed` when some failed). Unchanged pages (304) are
/// done; pages being fetched are still queued.
pub fn pages_text(frontier: &FrontierSummary) -> String {
    let count = |states: &[&str]| -> u64 {
        frontier
            .pages
            .iter()
            .filter(|(s, _)| states.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum()
    };
    let failed = match count(&["failed"]) {
        0 => String::new(),
        n => format!(", {n} failed"),
    };
    format!(
        "{} pages done, {} queued{failed}",
        count(&["done", "unchanged"]),
        count(&["queued", "fetching"])
    )
}

/// Where log lines go: standard error, above the progress line when one is
/// shown (for `tracing_subscriber`'s `with_writer`).
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// See [`log_writer`].
#[derive(Debug)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = shown().clone();
        match bar {
            Some(bar) => bar.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    /// One log line is written whole, with the progress line lifted once.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let bar = shown().clone();
        match bar {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf)),
            None => io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_count_unchanged_as_done_and_fetching_as_queued() {
        let frontier = FrontierSummary {
            pages: vec![
                ("done".into(), 100),
                ("unchanged".into(), 20),
                ("fetching".into(), 4),
                ("queued".into(), 26),
                ("skipped".into(), 3),
            ],
            ..FrontierSummary::default()
        };
        assert_eq!(pages_text(&frontier), "120 pages done, 30 queued");
        let failing = FrontierSummary {
            pages: vec![("failed".into(), 2)],
            ..FrontierSummary::default()
        };
        assert_eq!(pages_text(&failing), "0 pages done, 0 queued, 2 failed");
    }
}
