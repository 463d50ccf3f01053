//! Report pipelines: a SQL source in `mode = "query"` writing a `files`
//! sink, one logical date (a day) at a time.
//!
//! Promises:
//! - **A date is one transaction.** Its query runs, its rows are staged,
//!   its partitions are committed in storage, and only then is the date
//!   recorded in the state store (the report's checkpoint). A run that
//!   fails or is killed leaves the previous content of every partition
//!   readable and the date due again.
//! - **Re-running a date replaces that date.** Partitions it wrote before
//!   and no longer writes lose its files; other dates are never touched.
//! - **Catch-up.** A scheduled run writes every complete day since the last
//!   one written (or since `start_date`), oldest first; with
//!   `catch_up = false` only the last complete day. A day is complete once
//!   it has ended in the schedule's time zone.
//! - One process writes a date at a time (a lease per date).

use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal_connectors::sinks::files::{self, Location, RunSpec, RunWriter};
use caudal_connectors::sources::sql::SqlSource;
use caudal_core::config::{Config, FilesSinkConfig, SqlMode};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{DatasetPart, Store};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::lease::Lease;
use crate::schedule::Schedule;

/// Partitions of a day committed at once.
const COMMITS_AT_ONCE: usize = 8;

/// What writing one date did.
#[derive(Clone, Debug)]
pub struct DateSummary {
    pub date: Date,
    pub rows: u64,
    pub partitions: usize,
    pub files: usize,
    pub bytes: u64,
    /// Partitions that lost this date's files (it no longer writes them).
    pub removed: usize,
    pub elapsed: Duration,
}

/// A report pipeline, ready to write dates.
#[derive(Clone, Debug)]
pub struct Report {
    name: String,
    dataset: String,
    template: String,
    source: Arc<SqlSource>,
    files: Arc<FilesSinkConfig>,
    location: Location,
    store: Store,
    schedule: Schedule,
    tz: TimeZone,
    catch_up: bool,
    start_date: Option<Date>,
}

/// Whether pipeline `name` of `config` is a report (a `mode = "query"`
/// source writing a `files` sink).
pub fn is_report(config: &Config, name: &str) -> bool {
    config.pipelines.get(name).is_some_and(|p| {
        config
            .sources
            .get(&p.source)
            .and_then(|s| s.sql())
            .is_some_and(|s| s.mode == SqlMode::Query)
    })
}

/// The location of dataset (sink) `name`, if it is a `files` sink.
pub fn dataset_location(
    config: &Config,
    name: &str,
) -> Option<Result<(Location, Arc<FilesSinkConfig>)>> {
    let files = config.sinks.get(name)?.files()?;
    Some(Location::open(files, &config.config_dir()).map(|l| (l, Arc::new(files.clone()))))
}

fn sha256(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name unique to one run: the time and a random part.
fn run_name() -> String {
    let now = jiff::Timestamp::now();
    format!(
        "{}-{:06x}",
        now.strftime("%Y%m%dT%H%M%S"),
        rand::random::<u32>() & 0x00ff_ffff
    )
}

impl Report {
    /// Builds report pipeline `name` of a validated configuration.
    pub async fn build(name: &str, config: &Config, store: Store) -> Result<Self> {
        let p = config.pipelines.get(name).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no pipeline named {name:?}"))
        })?;
        let source_cfg = config.sources.get(&p.source).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("pipeline {name:?}: unknown source {:?}", p.source),
            )
        })?;
        let template = source_cfg
            .sql()
            .and_then(|s| s.query.clone())
            .filter(|_| is_report(config, name))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "pipeline {name:?} is not a report (its source needs mode = \"query\")"
                    ),
                )
            })?;
        let (location, files) = dataset_location(config, &p.sink).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("pipeline {name:?}: sink {:?} is not a files sink", p.sink),
            )
        })??;
        let source = SqlSource::connect(&p.source, source_cfg).await?;
        let schedule = Schedule::from_config(&p.schedule)?;
        let tz = match &p.schedule.tz {
            Some(tz) => TimeZone::get(tz)
                .map_err(|e| Error::new(ErrorKind::Config, format!("pipeline {name:?}: {e}")))?,
            None => TimeZone::UTC,
        };
        let start_date = p
            .schedule
            .start_date
            .as_deref()
            .map(|d| {
                d.parse::<Date>().map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!("pipeline {name:?}: start_date: {e}"),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            name: name.to_string(),
            dataset: p.sink.clone(),
            template,
            source: Arc::new(source),
            files,
            location,
            store,
            schedule,
            tz,
            catch_up: p.schedule.catch_up.unwrap_or(true),
            start_date,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dataset (sink) this report writes.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The query as run for `date`.
    pub fn query_for(&self, date: Date) -> Result<String> {
        caudal_core::config::datasets::render_report_query(&self.template, date)
            .map_err(|m| Error::new(ErrorKind::Config, format!("pipeline {:?}: {m}", self.name)))
    }

    /// The last complete day at `now`, in the schedule's zone.
    pub fn last_complete_day(&self, now: jiff::Timestamp) -> Date {
        let today = now.to_zoned(self.tz.clone()).date();
        today.yesterday().unwrap_or(today)
    }

    /// The dates a scheduled run at `now` writes, oldest first.
    pub async fn due_dates(&self, now: jiff::Timestamp) -> Result<Vec<Date>> {
        let last = self.last_complete_day(now);
        let done = self.store.dataset_dates(&self.dataset).await?;
        let after = done
            .iter()
            .filter_map(|d| d.logical_date.parse::<Date>().ok())
            .max();
        if !self.catch_up {
            let written = done.iter().any(|d| d.logical_date == last.to_string());
            return Ok(if written { Vec::new() } else { vec![last] });
        }
        let first = match (after, self.start_date) {
            (Some(d), _) => d.tomorrow().unwrap_or(d),
            (None, Some(start)) => start,
            (None, None) => last,
        };
        let mut dates = Vec::new();
        let mut d = first;
        while d <= last && dates.len() < 10_000 {
            dates.push(d);
            d = match d.tomorrow() {
                Ok(next) => next,
                Err(_) => break,
            };
        }
        Ok(dates)
    }

    /// Writes `date`: runs the query, stages and commits its partitions,
    /// records the date. Fails with [`ErrorKind::Busy`] when another
    /// process is writing the same date.
    pub async fn run_date(&self, date: Date) -> Result<DateSummary> {
        let started = Instant::now();
        let lease = Lease::acquire(&self.store, &format!("report/{}/{date}", self.name)).await?;
        let result = self.write_date(date).await;
        lease.release().await;
        let mut summary = result?;
        summary.elapsed = started.elapsed();
        tracing::info!(
            pipeline = %self.name, dataset = %self.dataset, %date,
            rows = summary.rows, partitions = summary.partitions, files = summary.files,
            bytes = summary.bytes, removed = summary.removed,
            elapsed_ms = summary.elapsed.as_millis() as u64,
            "date written"
        );
        Ok(summary)
    }

    async fn write_date(&self, date: Date) -> Result<DateSummary> {
        let sql = self.query_for(date)?;
        let spec = RunSpec {
            dataset: self.dataset.clone(),
            pipeline: self.name.clone(),
            date,
            run: run_name(),
            query_sha256: sha256(&sql),
        };
        let described = self.source.report_columns(&sql).await?;
        let writer = RunWriter::new(
            &self.location,
            self.files.clone(),
            spec.clone(),
            &described.columns,
        )?;
        let output = self.source.run_report(&sql, &described, writer).await?;
        let date_text = date.to_string();
        let previous = self
            .store
            .dataset_date_parts(&self.dataset, &date_text)
            .await?;
        let format = self.files.format.as_str();
        let mut parts = Vec::new();
        let mut summary = DateSummary {
            date,
            rows: output.rows,
            partitions: output.partitions.len(),
            files: 0,
            bytes: 0,
            removed: 0,
            elapsed: Duration::ZERO,
        };
        let written: std::collections::BTreeSet<String> =
            output.partitions.iter().map(|p| p.path.clone()).collect();
        // Noted before the first commit: if this run dies midway, the
        // date's next run finds every partition it may have committed.
        let pending: Vec<String> = written.iter().cloned().collect();
        self.store
            .add_dataset_pending(&self.dataset, &date_text, &pending)
            .await?;
        // Partitions commit independently (each all or nothing): several
        // at once, so object storage's round trips overlap.
        let commits = futures::stream::iter(output.partitions.into_iter().map(|staged| {
            let (location, dataset, date_text) = (&self.location, &self.dataset, &date_text);
            async move {
                let path = staged.path.clone();
                let rows: u64 = staged.files.iter().map(|f| f.entry.rows).sum();
                let bytes: u64 = staged.files.iter().map(|f| f.entry.bytes).sum();
                let n = staged.files.len();
                let committed = files::commit_partition(
                    location,
                    dataset,
                    format,
                    date_text,
                    &path,
                    Some(staged),
                )
                .await?;
                Ok::<_, Error>(DatasetPart {
                    part: path,
                    generation: committed
                        .manifest
                        .as_ref()
                        .map_or(0, |m| m.generation as i64),
                    rows: rows as i64,
                    bytes: bytes as i64,
                    files: n as i64,
                })
            }
        }));
        let committed: Vec<Result<DatasetPart>> = {
            use futures::StreamExt as _;
            commits.buffer_unordered(COMMITS_AT_ONCE).collect().await
        };
        for part in committed {
            let part = part?;
            summary.files += part.files as usize;
            summary.bytes += part.bytes as u64;
            parts.push(part);
        }
        parts.sort_by(|a, b| a.part.cmp(&b.part));
        let mut touched = Vec::new();
        for path in previous.into_iter().filter(|p| !written.contains(p)) {
            let committed = files::commit_partition(
                &self.location,
                &self.dataset,
                format,
                &date_text,
                &path,
                None,
            )
            .await?;
            summary.removed += 1;
            touched.push((path, committed.manifest.map(|m| m.generation as i64)));
        }
        self.store
            .record_dataset_date(
                &self.dataset,
                &date_text,
                &self.name,
                &spec.run,
                &parts,
                &touched,
            )
            .await?;
        drop(output.staging);
        Ok(summary)
    }

    /// A scheduled (or `caudal once`) run: every due date, oldest first,
    /// recorded as one run of the pipeline. Stops at the first failure
    /// (the dates after it stay due).
    pub async fn run_due(
        &self,
        trigger: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<DateSummary>> {
        let dates = self.due_dates(jiff::Timestamp::now()).await?;
        let run_id = self.store.start_run(&self.name, trigger).await?;
        let mut done = Vec::new();
        let mut rows = 0u64;
        let mut failure = None;
        for date in dates {
            if cancel.is_cancelled() {
                failure = Some(Error::new(ErrorKind::Cancelled, "stopped"));
                break;
            }
            match self.run_date(date).await {
                Ok(s) => {
                    rows += s.rows;
                    let _ = self.store.update_run_counts(run_id, rows, rows).await;
                    done.push(s);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let (outcome, error) = match &failure {
            None => (caudal_store::RunOutcome::Succeeded, None),
            Some(e) if e.kind() == ErrorKind::Cancelled => {
                (caudal_store::RunOutcome::Cancelled, None)
            }
            Some(e) => (caudal_store::RunOutcome::Failed, Some(e.report())),
        };
        self.store
            .finish_run(run_id, outcome, rows, rows, error.as_deref())
            .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Writes every date from `from` to `to` (inclusive), up to `parallel`
    /// at once; `each` hears of every date as it ends. Returns the dates
    /// written and the failures (a failed date does not stop the others).
    pub async fn backfill(
        &self,
        from: Date,
        to: Date,
        parallel: usize,
        cancel: &CancellationToken,
        each: &(dyn Fn(Date, &Result<DateSummary>) + Sync),
    ) -> Result<(Vec<DateSummary>, Vec<(Date, Error)>)> {
        use futures::StreamExt as _;
        if to < from {
            return Err(Error::new(ErrorKind::Config, "--to is before --from"));
        }
        let mut dates = Vec::new();
        let mut d = from;
        while d <= to {
            dates.push(d);
            d = d
                .tomorrow()
                .map_err(|e| Error::new(ErrorKind::Config, e.to_string()))?;
        }
        let run_id = self.store.start_run(&self.name, "backfill").await?;
        let results: Vec<(Date, Result<DateSummary>)> = futures::stream::iter(dates)
            .map(|date| async move {
                let r = if cancel.is_cancelled() {
                    Err(Error::new(
                        ErrorKind::Cancelled,
                        "stopped before it started",
                    ))
                } else {
                    self.run_date(date).await
                };
                each(date, &r);
                (date, r)
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (date, r) in results {
            match r {
                Ok(s) => ok.push(s),
                Err(e) => failed.push((date, e)),
            }
        }
        ok.sort_by_key(|s| s.date);
        failed.sort_by_key(|(d, _)| *d);
        let rows: u64 = ok.iter().map(|s| s.rows).sum();
        let error = (!failed.is_empty()).then(|| {
            format!(
                "{} of {} dates failed; first: {} {}",
                failed.len(),
                failed.len() + ok.len(),
                failed[0].0,
                failed[0].1.report()
            )
        });
        let outcome = if failed.is_empty() {
            caudal_store::RunOutcome::Succeeded
        } else {
            caudal_store::RunOutcome::Failed
        };
        self.store
            .finish_run(run_id, outcome, rows, rows, error.as_deref())
            .await?;
        Ok((ok, failed))
    }
}

/// Deletes the partitions of `dataset` whose logical date is older than its
/// sink's `retention` at `now`: manifest first, then files; each deletion
/// is logged and written to the audit log. Returns the dates deleted.
pub async fn apply_retention(
    config: &Config,
    store: &Store,
    dataset: &str,
    now: jiff::Timestamp,
) -> Result<Vec<String>> {
    let Some(found) = dataset_location(config, dataset) else {
        return Ok(Vec::new());
    };
    let (location, files) = found?;
    let Some(keep) = files.retention else {
        return Ok(Vec::new());
    };
    let keep_days = i64::try_from(keep.0.as_secs() / 86_400).unwrap_or(i64::MAX);
    let today = now.to_zoned(TimeZone::UTC).date();
    let cutoff = today
        .checked_sub(jiff::Span::new().days(keep_days))
        .unwrap_or(today);
    let mut deleted = Vec::new();
    for d in store.dataset_dates(dataset).await? {
        let Ok(date) = d.logical_date.parse::<Date>() else {
            continue;
        };
        if date >= cutoff {
            continue;
        }
        for part in store.dataset_date_parts(dataset, &d.logical_date).await? {
            let n = files::drop_partition(&location, &part).await?;
            tracing::info!(dataset, partition = %part, date = %d.logical_date, files = n, "retention: partition deleted");
            store
                .add_audit(
                    "retention",
                    "DELETE",
                    &format!("/datasets/{dataset}/partitions/{part}"),
                    200,
                )
                .await?;
        }
        store.forget_dataset_date(dataset, &d.logical_date).await?;
        deleted.push(d.logical_date);
    }
    Ok(deleted)
}
