//! One pipeline and its runs. A run is the intake: read pages from the
//! source, cut them into batches, and append each batch to the pipeline's
//! durable buffer. Delivery (the [`Deliverer`]) sends the buffer to the sink;
//! [`Pipeline::run_once`] does both and waits for the buffer to drain, the
//! daemon runs them side by side ([`Pipeline::run_capture`] on schedule,
//! [`Pipeline::deliver_until_stopped`] all the time).
//!
//! Promises:
//! - The checkpoint only ever moves to the position of the last record of a
//!   batch that is durable in the buffer (`ack = "buffered"`, committed with
//!   the run's counters) or delivered (`ack = "delivered"`, saved by
//!   delivery before it acknowledges the buffer). See [`crate::buffered`]
//!   for why a restart then neither skips nor re-cuts a batch.
//! - Reading overlaps buffering and delivery, bounded to a couple of pages in
//!   memory; a full buffer pauses reading (backpressure).
//! - On shutdown, intake stops at once (an append already started is
//!   finished, with its checkpoint); requests in flight are allowed to
//!   finish (bounded by the sink's timeout) so their answers are not wasted;
//!   everything else stays in the buffer.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caudal_buffer::Buffer;

use caudal_connectors::sources::broker::{BrokerSource, BrokerState};
use caudal_connectors::sources::cdc::{CdcReader, CdcSource, Durable};
use caudal_connectors::sources::sql::{self, SqlSource};
use caudal_core::config::retention::RetentionConfig;
use caudal_core::config::{AckMode, BatchConfig, Config, PipelineConfig, SinkConfig};
use caudal_core::record::batch_key;
use caudal_core::record::{Json, Position, Record};
use caudal_core::sink::{Event, Sink};
use caudal_core::status::Replication;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{RunOutcome, Store};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::batch::Batcher;
use crate::buffered::{self, Entry, Recent};
use crate::crawl::{Crawl, CrawlReader};
use crate::deliverer::{Deliverer, DeliveryStats};
use crate::lease::{Lease, pipeline_lease};
use crate::maintenance;
use crate::schedule::Schedule;
use crate::send::Sender;

/// Live counters of a run, for progress bars and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub rows_read: u64,
    pub rows_delivered: u64,
    /// Records kept as dead letters (rejected by the receiver).
    pub dead_letters: u64,
    pub batches: u64,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub run_id: i64,
    pub outcome: RunOutcome,
    pub rows_read: u64,
    pub rows_delivered: u64,
    /// Records kept as dead letters during the run.
    pub dead_letters: u64,
    pub batches: u64,
    pub elapsed: Duration,
    /// Position of the checkpoint after the run, if any.
    pub checkpoint: Option<Position>,
    /// Why the run failed, if it did.
    pub error: Option<Error>,
}

/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Manual => "manual",
        }
    }
}

/// Where a pipeline's records come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Rows read by cursor, on a schedule.
    Sql(Box<SqlSource>),
    /// Changes streamed from a database's log (PostgreSQL, MariaDB).
    Cdc(CdcSource),
    /// Web pages crawled from a frontier in the state store.
    Crawl(Box<Crawl>),
    /// A live aggregate's closed windows.
    Windows(Box<crate::aggregate::source::WindowsSource>),
    /// Messages of a broker (RabbitMQ, NATS JetStream, Kafka).
    Broker(BrokerSource),
}

/// The reader of one run.
enum Reader {
    Sql(Box<sql::RunReader>),
    Cdc(CdcReader),
    Crawl(CrawlReader),
    Windows(crate::aggregate::source::WindowsReader),
}

impl Reader {
    async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        match self {
            Self::Sql(r) => r.next_page().await,
            Self::Cdc(r) => r.next_page().await,
            Self::Crawl(r) => r.next_page().await,
            Self::Windows(r) => r.next_page().await,
        }
    }
}

/// A pipeline ready to run: its source, sink, batching and schedule.
#[derive(Clone)]
pub struct Pipeline {
    name: String,
    source: Source,
    sender: Sender,
    /// The record field that orders and identifies entities, if any.
    key: Option<String>,
    /// Records failing this JSON Schema become dead letters, never sent.
    schema: Option<Arc<jsonschema::Validator>>,
    batch: BatchConfig,
    schedule: Schedule,
    store: Store,
    ack: AckMode,
    buffer_dir: PathBuf,
    buffer_config: caudal_buffer::BufferConfig,
    /// Batches the deliverer dispatches at once.
    max_in_flight: usize,
    /// How much run history to keep ([`crate::retention`]).
    retention: RetentionConfig,
    /// The live aggregates counting this pipeline's records, if any.
    aggregates: Option<Arc<crate::aggregate::Aggregates>>,
    /// A broker source's `metadata_field`.
    metadata_field: Option<String>,
    shared: Arc<Shared>,
}

/// What clones of a pipeline share: its open buffer, how far delivery may
/// read it, and the delivery totals.
#[derive(Debug, Default)]
struct Shared {
    buffer: tokio::sync::OnceCell<Buffer>,
    released: watch::Sender<u64>,
    stats: Arc<DeliveryStats>,
    recent: Arc<Recent>,
    /// Why intake waits now, if it does (for status).
    blocked: std::sync::Mutex<Option<String>>,
    /// A broker source read with `ack = "delivered"`: where delivery
    /// reports what the broker may forget.
    delivered_to: Arc<std::sync::Mutex<Option<Durable>>>,
    /// In a cluster, while this node owns the pipeline: the fence its
    /// checkpoint writes carry, and the cluster's lease.
    ownership: Ownership,
}

/// The fence of a pipeline owned in a cluster, with the cluster's lease.
pub(crate) type Ownership = Arc<std::sync::Mutex<Option<(caudal_store::Fence, Duration)>>>;

/// Counters of one run's intake.
#[derive(Debug, Default)]
struct RunCounters {
    read: AtomicU64,
    /// Records kept as dead letters by the schema.
    dead: AtomicU64,
}

/// Pause of the daemon's delivery loop after a failure.
const DELIVERY_PAUSE: Duration = Duration::from_secs(5);
/// How often a CDC run saves its replication lag for `caudal status`.
const LAG_REPORT_EVERY: Duration = Duration::from_secs(2);
/// How often a run reports progress (for progress bars).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Longest wait, at the end of intake, for a broker reader to acknowledge
/// its last durable messages and close its connection.
const READER_CLOSE_GRACE: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name)
            .field("schedule", &self.schedule.describe())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Builds a pipeline from a validated configuration: connects the
    /// source's pool (lazily usable) and builds the sink.
    pub async fn build(name: &str, config: &Config, store: Store) -> Result<Self> {
        let p: &PipelineConfig = config.pipelines.get(name).ok_or_else(|| {
            let names: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
            Error::new(
                ErrorKind::Config,
                format!(
                    "no pipeline named {name:?}; pipelines: {}",
                    names.join(", ")
                ),
            )
        })?;
        let source_cfg = config.sources.get(&p.source).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("pipeline {name:?}: unknown source {:?}", p.source),
            )
        })?;
        let sink_cfg = config.sinks.get(&p.sink).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("pipeline {name:?}: unknown sink {:?}", p.sink),
            )
        })?;
        let cdc = source_cfg.is_cdc();
        let continuous = cdc || source_cfg.is_broker();
        let source = if source_cfg.is_broker() {
            Source::Broker(BrokerSource::new(name, &p.source, source_cfg)?)
        } else if let Some(windows) = source_cfg.aggregate() {
            Source::Windows(Box::new(crate::aggregate::source::WindowsSource::new(
                config,
                windows,
                store.clone(),
            )?))
        } else if source_cfg.crawl().is_some() {
            Source::Crawl(Box::new(Crawl::new(
                &crawl_frontier(name),
                &p.source,
                config,
                None,
                store.clone(),
            )?))
        } else if cdc {
            // Live aggregates count rows: an interrupted snapshot must start
            // over at one consistent point, not read on at the current state.
            let aggregated = config.aggregates.values().any(|a| a.pipeline == name);
            Source::Cdc(CdcSource::connect_with(name, &p.source, source_cfg, aggregated).await?)
        } else {
            Source::Sql(Box::new(SqlSource::connect(&p.source, source_cfg).await?))
        };
        // A CDC run streams until it fails or is stopped; the schedule
        // only says how soon it starts again.
        let schedule = if continuous {
            Schedule::Continuous {
                poll: DELIVERY_PAUSE,
            }
        } else {
            Schedule::from_config(&p.schedule)?
        };
        if matches!(sink_cfg, SinkConfig::Files(_)) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("pipeline {name:?} writes a dataset: it runs as a report (crate::report)"),
            ));
        }
        let (sink, batch): (Arc<dyn Sink>, BatchConfig) = crate::sinks::build(&p.sink, sink_cfg)?;
        let delivery = sink_cfg.delivery();
        let sender = Sender::new(name, &p.sink, sink, delivery, store.clone());
        let max_in_flight = delivery.max_in_flight();
        let store_for_aggregates = store.clone();
        Ok(Self {
            name: name.to_string(),
            source,
            sender,
            key: p.key.clone(),
            schema: load_schema(name, p, config)?,
            batch,
            schedule,
            store,
            ack: p.ack,
            buffer_dir: config.buffer_dir(name),
            buffer_config: buffered::buffer_config(&p.buffer),
            max_in_flight: usize::try_from(max_in_flight.max(1)).unwrap_or(1),
            retention: config.retention,
            aggregates: crate::aggregate::Aggregates::build(name, config, &store_for_aggregates)?,
            metadata_field: source_cfg.metadata_field().map(str::to_string),
            shared: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The pipeline's source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configured `[retention]`.
    pub fn retention(&self) -> &RetentionConfig {
        &self.retention
    }

    /// The saved checkpoint, decoded.
    pub async fn checkpoint(&self) -> Result<Option<Position>> {
        load_checkpoint(&self.store, &self.name).await
    }

    /// Runs the pipeline once and waits for its records to be delivered:
    /// takes its lease, records the run, reads from where the buffer and
    /// the checkpoint say to the source's current end into the buffer, and
    /// delivers the buffer (records left by earlier runs too) until it is
    /// empty. This is `caudal once`. Fails with [`ErrorKind::Busy`] (and
    /// records nothing) when another process is running it.
    pub async fn run_once(
        &self,
        trigger: Trigger,
        cancel: &CancellationToken,
        progress: Option<watch::Sender<Progress>>,
    ) -> Result<RunSummary> {
        self.run(trigger, cancel, progress, true).await
    }

    /// Runs the pipeline's intake once: like [`run_once`](Self::run_once),
    /// but the run ends once its records are durable in the buffer; the
    /// daemon's [`deliver_until_stopped`](Self::deliver_until_stopped)
    /// sends them and counts them on the run as they are delivered.
    pub async fn run_capture(
        &self,
        trigger: Trigger,
        cancel: &CancellationToken,
    ) -> Result<RunSummary> {
        self.run(trigger, cancel, None, false).await
    }

    /// The daemon's delivery loop: sends whatever the buffer holds, as it
    /// arrives, until `stop`. When a batch's retries give up, or the buffer
    /// or store fails, it logs the error, pauses, and starts again from the
    /// first undelivered batch: records stay in the buffer meanwhile.
    pub async fn deliver_until_stopped(&self, stop: &CancellationToken) {
        loop {
            let result = match self.buffer().await {
                Ok(buffer) => {
                    let (_never, drain) = watch::channel(None);
                    self.deliverer(buffer).run(stop, drain).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::Cancelled => return,
                Err(e) => {
                    tracing::error!(pipeline = %self.name, error = %e.report(), pause_s = DELIVERY_PAUSE.as_secs(), "delivery stopped; records stay in the buffer and are tried again");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(DELIVERY_PAUSE) => {}
            }
        }
    }

    /// Requests the sink may have in flight now: the adaptive limit as it
    /// stands, or the fixed `concurrency`.
    pub fn concurrency_limit(&self) -> u32 {
        self.sender.concurrency_limit()
    }

    /// Delivery totals of this pipeline in this process.
    pub fn delivery_stats(&self) -> &DeliveryStats {
        &self.shared.stats
    }

    /// The pipeline's buffer if this process has opened it already (it
    /// runs the pipeline), without opening it.
    pub fn opened_buffer(&self) -> Option<&Buffer> {
        self.shared.buffer.get()
    }

    /// The pipeline's buffer, opened (and recovered) on first use.
    pub async fn buffer(&self) -> Result<&Buffer> {
        self.shared
            .buffer
            .get_or_try_init(|| async {
                let buffer =
                    buffered::open(&self.name, &self.buffer_dir, self.buffer_config.clone())
                        .await?;
                if matches!(self.source, Source::Broker(_)) && self.ack == AckMode::Delivered {
                    buffered::forget_undelivered(
                        &self.name,
                        &buffer,
                        "the broker delivers their messages again",
                    )
                    .await?;
                }
                let checkpoint = self.checkpoint().await?;
                let (_, releasable) =
                    buffered::recover(&self.name, &buffer, &self.store, self.ack, checkpoint)
                        .await?;
                if let Some(aggregates) = &self.aggregates {
                    aggregates.start(&buffer).await?;
                }
                self.release(releasable);
                Ok(buffer)
            })
            .await
    }

    /// Why intake waits now (a full buffer, a full disk), if it does.
    pub fn intake_blocked(&self) -> Option<String> {
        self.shared
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The live replication figures of a CDC pipeline's reader.
    pub fn live_replication(&self) -> Option<Replication> {
        match &self.source {
            Source::Cdc(s) => {
                let mut r = s.live();
                r.live = true;
                Some(r)
            }
            Source::Sql(_) | Source::Crawl(_) | Source::Windows(_) | Source::Broker(_) => None,
        }
    }

    /// The fence and cluster lease while this node owns the pipeline in a
    /// cluster.
    fn ownership(&self) -> Option<(caudal_store::Fence, Duration)> {
        self.shared
            .ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts (`Some`) or ends (`None`) this node's ownership of the
    /// pipeline in a cluster ([`crate::cluster`]). From now on delivery's
    /// checkpoint writes carry the fence. Taking a pipeline drops what this
    /// node's buffer still holds undelivered from an earlier ownership:
    /// with `ack = "delivered"` the shared checkpoint has not passed it, so
    /// the run reads it again, and another node may have delivered past it
    /// since.
    pub async fn own(&self, ownership: Option<(caudal_store::Fence, Duration)>) -> Result<()> {
        let taking = ownership.is_some();
        *self
            .shared
            .ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ownership;
        if taking && self.ack == AckMode::Delivered {
            let buffer = self.buffer().await?;
            buffered::forget_undelivered(
                &self.name,
                buffer,
                "the shared checkpoint has not passed them: the run reads them again",
            )
            .await?;
        }
        Ok(())
    }

    /// The connection state of a broker source's consumer.
    pub fn broker_state(&self) -> Option<BrokerState> {
        match &self.source {
            Source::Broker(b) => Some(b.state()),
            _ => None,
        }
    }

    /// The directory of the pipeline's buffer.
    pub fn buffer_dir(&self) -> &std::path::Path {
        &self.buffer_dir
    }

    fn deliverer(&self, buffer: &Buffer) -> Deliverer {
        Deliverer {
            pipeline: self.name.clone(),
            buffer: buffer.clone(),
            sender: self.sender.clone(),
            store: self.store.clone(),
            ack: self.ack,
            released: self.shared.released.subscribe(),
            max_in_flight: self.max_in_flight,
            stats: self.shared.stats.clone(),
            recent: self.shared.recent.clone(),
            gate: self.aggregates.as_ref().map(|a| a.gate()),
            ownership: self.shared.ownership.clone(),
            delivered_to: matches!(self.source, Source::Broker(_))
                .then(|| self.shared.delivered_to.clone()),
        }
    }

    /// The live aggregates of this pipeline.
    pub fn aggregates(&self) -> &[Arc<crate::aggregate::Live>] {
        self.aggregates.as_ref().map_or(&[], |a| a.list())
    }

    /// Lets delivery read entries below `upto`.
    fn release(&self, upto: u64) {
        self.shared.released.send_if_modified(|r| {
            let moved = upto > *r;
            *r = (*r).max(upto);
            moved
        });
    }

    async fn run(
        &self,
        trigger: Trigger,
        cancel: &CancellationToken,
        progress: Option<watch::Sender<Progress>>,
        deliver: bool,
    ) -> Result<RunSummary> {
        let nodes_lease = self.ownership().map(|(_, lease)| lease);
        let lease =
            Lease::acquire_in_cluster(&self.store, &pipeline_lease(&self.name), nodes_lease)
                .await?;
        let buffer = match self.buffer().await {
            Ok(b) => b,
            Err(e) => {
                lease.release().await;
                return Err(e);
            }
        };
        // We hold the lease: any run still marked running is a dead one.
        let abandoned = self.store.abandon_running(&self.name).await?;
        if abandoned > 0 {
            tracing::warn!(pipeline = %self.name, abandoned, "marked runs of a process that died as abandoned");
        }
        let started = std::time::Instant::now();
        let run_id = self.store.start_run(&self.name, trigger.as_str()).await?;
        let run_started = std::time::Instant::now();
        let run_cancel = cancel.child_token();
        let lost = lease.lost();
        let watcher = {
            let run_cancel = run_cancel.clone();
            tokio::spawn(async move {
                lost.cancelled().await;
                run_cancel.cancel();
            })
        };
        let counters = RunCounters::default();
        let base = (
            self.shared.stats.delivered(),
            self.shared.stats.dead_letters(),
            self.shared.stats.batches(),
        );
        let snapshot = || Progress {
            rows_read: counters.read.load(Ordering::Relaxed),
            rows_delivered: self.shared.stats.delivered() - base.0,
            dead_letters: counters.dead.load(Ordering::Relaxed) + self.shared.stats.dead_letters()
                - base.1,
            batches: self.shared.stats.batches() - base.2,
        };
        let work = async {
            if !deliver {
                return self
                    .intake(run_id, buffer, &run_cancel, &counters, true)
                    .await;
            }
            let intake_cancel = run_cancel.child_token();
            let (drain_tx, drain_rx) = watch::channel(None);
            let intake = async {
                let r = self
                    .intake(run_id, buffer, &intake_cancel, &counters, false)
                    .await;
                // Deliver what was released, also after a source or store
                // error (a batch appended but not released is picked up by
                // the next run's recovery).
                if !matches!(r, Ok(Ended::Stopped)) {
                    drain_tx.send_replace(Some(*self.shared.released.borrow()));
                }
                r
            };
            let delivery = async {
                let r = self.deliverer(buffer).run(&run_cancel, drain_rx).await;
                if r.is_err() {
                    intake_cancel.cancel();
                }
                r
            };
            let both = async { tokio::join!(intake, delivery) };
            tokio::pin!(both);
            let (read, delivered) = loop {
                tokio::select! {
                    both = &mut both => break both,
                    () = tokio::time::sleep(PROGRESS_EVERY), if progress.is_some() => {
                        if let Some(p) = &progress {
                            p.send_replace(snapshot());
                        }
                    }
                }
            };
            match (read, delivered) {
                (Err(e), _) if e.kind() != ErrorKind::Cancelled => Err(e),
                (_, Err(e)) if e.kind() != ErrorKind::Cancelled => Err(e),
                (Ok(Ended::Completed), Ok(())) => Ok(Ended::Completed),
                _ => Ok(Ended::Stopped),
            }
        };
        let span = tracing::info_span!(
            "run",
            pipeline = %self.name,
            run_id,
            trigger = trigger.as_str(),
            outcome = tracing::field::Empty,
            rows_read = tracing::field::Empty,
            position = tracing::field::Empty,
        );
        let result = work.instrument(span.clone()).await;
        watcher.abort();
        if let Some(aggregates) = &self.aggregates {
            aggregates.flush().await;
        }
        let (outcome, error) = match result {
            Ok(Ended::Completed) => (RunOutcome::Succeeded, None),
            Ok(Ended::Stopped) => (RunOutcome::Cancelled, None),
            Err(e) if e.kind() == ErrorKind::Cancelled => (RunOutcome::Cancelled, None),
            Err(e) => (RunOutcome::Failed, Some(e)),
        };
        let totals = snapshot();
        if let Some(p) = &progress {
            p.send_replace(totals);
        }
        metrics::counter!("caudal_runs_total", "pipeline" => self.name.clone(), "outcome" => outcome.as_str())
            .increment(1);
        span.record("outcome", outcome.as_str());
        span.record("rows_read", totals.rows_read);
        if let Ok(Some(p)) = load_checkpoint(&self.store, &self.name).await {
            span.record("position", p.display());
        }
        drop(span);
        metrics::histogram!("caudal_run_duration_seconds", "pipeline" => self.name.clone())
            .record(run_started.elapsed().as_secs_f64());
        let error_text = error.as_ref().map(Error::report);
        let finished = self
            .store
            .finish_run(
                run_id,
                outcome,
                totals.rows_read,
                None,
                error_text.as_deref(),
            )
            .await;
        lease.release().await;
        finished?;
        let idle = crate::retention::after_run(self, run_id, trigger, outcome, &totals).await;
        match &error {
            // A poll that found nothing is not news.
            None if idle => tracing::debug!(pipeline = %self.name, "idle poll"),
            None => tracing::info!(
                pipeline = %self.name, run_id, outcome = outcome.as_str(),
                rows_read = totals.rows_read, rows_delivered = totals.rows_delivered,
                "run finished"
            ),
            Some(e) => tracing::error!(
                pipeline = %self.name, run_id, error = %e.report(),
                rows_read = totals.rows_read, rows_delivered = totals.rows_delivered,
                "run failed"
            ),
        }
        Ok(RunSummary {
            run_id,
            outcome,
            rows_read: totals.rows_read,
            rows_delivered: totals.rows_delivered,
            dead_letters: totals.dead_letters,
            batches: totals.batches,
            elapsed: started.elapsed(),
            checkpoint: self.checkpoint().await.ok().flatten(),
            error,
        })
    }

    /// Reads the source from where the buffer and checkpoint say to its
    /// current end (`follow`: a CDC source keeps streaming until stopped),
    /// cutting batches and appending each to the buffer.
    async fn intake(
        &self,
        run_id: i64,
        buffer: &Buffer,
        cancel: &CancellationToken,
        counters: &RunCounters,
        follow: bool,
    ) -> Result<Ended> {
        let mut closing = None;
        let ended = self
            .read_into_buffer(run_id, buffer, cancel, counters, follow, &mut closing)
            .await;
        // The reader has been dropped: a broker reader acknowledges what
        // was made durable last and closes its connection; waiting for it
        // keeps a clean stop from leaving those messages to be delivered
        // again.
        if let Some(closed) = closing {
            let _ = tokio::time::timeout(READER_CLOSE_GRACE, closed.cancelled()).await;
        }
        ended
    }

    async fn read_into_buffer(
        &self,
        run_id: i64,
        buffer: &Buffer,
        cancel: &CancellationToken,
        counters: &RunCounters,
        follow: bool,
        closing: &mut Option<CancellationToken>,
    ) -> Result<Ended> {
        let checkpoint = self.checkpoint().await?;
        let (from, releasable) =
            buffered::recover(&self.name, buffer, &self.store, self.ack, checkpoint).await?;
        self.release(releasable);
        let (mut reader, durable) = match &self.source {
            Source::Sql(s) => (
                Reader::Sql(Box::new(
                    s.open_run(from.as_ref(), self.key.as_deref()).await?,
                )),
                None,
            ),
            Source::Cdc(s) => {
                let backfills =
                    follow.then(|| maintenance::StoredBackfills::shared(&self.store, &self.name));
                let r = s.open_run(from.as_ref(), follow, backfills).await?;
                // Remembered so that removing the pipeline releases what it
                // keeps on the server (its slot; its publication if caudal
                // made it).
                if let Some(held) = s.held(r.created_publication()) {
                    maintenance::save_held(&self.store, &self.name, held).await?;
                }
                let durable = r.durable();
                (Reader::Cdc(r), Some(durable))
            }
            Source::Crawl(c) => {
                let r = CrawlReader::start((**c).clone());
                let durable = r.durable();
                (Reader::Crawl(r), Some(durable))
            }
            Source::Windows(w) => (Reader::Windows(w.open_run(from.as_ref())?), None),
            Source::Broker(b) => {
                let r = b.open_run(self.metadata_field.clone());
                let durable = r.durable();
                *closing = r.closed();
                match self.ack {
                    // Acknowledged once buffered: by intake.
                    AckMode::Buffered => (Reader::Cdc(r), Some(durable)),
                    // Acknowledged once delivered: by delivery.
                    AckMode::Delivered => {
                        *self
                            .shared
                            .delivered_to
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(durable);
                        (Reader::Cdc(r), None)
                    }
                }
            }
        };
        let durable = durable.as_ref();
        // A CDC source's lag is saved every few seconds for `caudal status`.
        let _report = match &self.source {
            Source::Cdc(s) => {
                let (source, store, name) = (s.clone(), self.store.clone(), self.name.clone());
                Some(AbortOnDrop(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(LAG_REPORT_EVERY);
                    loop {
                        tick.tick().await;
                        if let Err(e) = maintenance::report(&store, &name, &source.live()).await {
                            tracing::debug!(pipeline = %name, error = %e.report(), "cannot save the replication lag");
                        }
                    }
                })))
            }
            Source::Sql(_) | Source::Crawl(_) | Source::Windows(_) | Source::Broker(_) => None,
        };
        // The reader runs ahead of buffering by at most two pages.
        let (pages_tx, mut pages) = mpsc::channel::<Result<Vec<Record>>>(2);
        let read_cancel = cancel.clone();
        let read_task = tokio::spawn(async move {
            loop {
                let page = tokio::select! {
                    () = read_cancel.cancelled() => return,
                    page = reader.next_page() => page,
                };
                let last = match page {
                    Ok(Some(records)) => pages_tx.send(Ok(records)).await,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = pages_tx.send(Err(e)).await;
                        return;
                    }
                };
                if last.is_err() {
                    return;
                }
            }
        });
        let _abort_reader = AbortOnDrop(read_task);

        let mut batcher = Batcher::new(self.batch);
        let max_wait = self.batch.max_wait.as_std();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(Ended::Stopped),
                () = wait => {
                    let batch = batcher.take();
                    deadline = None;
                    if !self.buffer_batch(run_id, batch, buffer, cancel, counters, durable).await? {
                        return Ok(Ended::Stopped);
                    }
                }
                page = pages.recv() => match page {
                    None => {
                        let rest = batcher.take();
                        if !self.buffer_batch(run_id, rest, buffer, cancel, counters, durable).await? {
                            return Ok(Ended::Stopped);
                        }
                        return Ok(Ended::Completed);
                    }
                    Some(Err(e)) => return Err(e),
                    Some(Ok(records)) => {
                        let markers = records
                            .iter()
                            .filter(|r| r.position.is_marker())
                            .count();
                        counters
                            .read
                            .fetch_add((records.len() - markers) as u64, Ordering::Relaxed);
                        metrics::counter!("caudal_records_read_total", "pipeline" => self.name.clone())
                            .increment((records.len() - markers) as u64);
                        for record in records {
                            if let Some(full) = batcher.push(record)
                                && !self.buffer_batch(run_id, full, buffer, cancel, counters, durable).await?
                            {
                                return Ok(Ended::Stopped);
                            }
                        }
                        deadline = if batcher.is_empty() {
                            None
                        } else {
                            deadline.or_else(|| Some(tokio::time::Instant::now() + max_wait))
                        };
                    }
                },
            }
        }
    }

    /// Makes one batch durable: keeps the records failing the schema as
    /// dead letters, appends the batch to the buffer (waiting while it is
    /// full), then with `ack = "buffered"` commits the checkpoint past it,
    /// and releases it to delivery; a CDC source may then confirm its slot
    /// up to it. Returns false when `cancel` came while waiting for room
    /// (nothing was appended).
    async fn buffer_batch(
        &self,
        run_id: i64,
        records: Vec<Record>,
        buffer: &Buffer,
        cancel: &CancellationToken,
        counters: &RunCounters,
        durable: Option<&Durable>,
    ) -> Result<bool> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(true);
        };
        // A broker's records may come back in another interleaving of its
        // queues or partitions: the key then names every record.
        let key = match &self.source {
            Source::Broker(_) => {
                caudal_core::record::batch_key_of(&self.name, records.iter().map(|r| &r.position))
            }
            _ => batch_key(&self.name, &first.position, &last.position, records.len()),
        };
        let position = last.position.clone();
        let position_json = serde_json::to_value(&position)
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot encode a position", e))?;
        // Markers (a CDC snapshot's end) move the position, nothing else.
        // A SQL source keys its records by the pipeline's key field as it
        // encodes them; a CDC record is keyed by its entity unless a key
        // field is named, which is then read from it.
        let key_field = match &self.source {
            Source::Cdc(_) | Source::Broker(_) => self.key.as_deref(),
            Source::Sql(_) | Source::Crawl(_) | Source::Windows(_) => None,
        };
        let mut events: Vec<Event> = records
            .into_iter()
            .filter(|r| !r.position.is_marker())
            .map(|r| match key_field {
                Some(f) => Event::keyed_by(f, r),
                None => Event::new(r),
            })
            .collect();
        let invalid = match &self.schema {
            Some(schema) => self.invalid(&key, schema, &mut events),
            None => Vec::new(),
        };
        let entry = Entry {
            run: run_id,
            key,
            position,
            events,
        };
        let entries = [entry.encode()?];
        // Give up only while waiting for room: an append once started is
        // finished, so its checkpoint commit is not skipped.
        let blocked = &self.shared.blocked;
        tokio::select! {
            () = cancel.cancelled() => return Ok(false),
            room = buffered::wait_for_room(&self.name, buffer, &entries, blocked) => room?,
        }
        // Kept before the checkpoint can move past them.
        if !invalid.is_empty() {
            tracing::warn!(pipeline = %self.name, records = invalid.len(), "records failed the schema; kept as dead letters");
            self.store
                .add_dead_letters_once(&self.name, &invalid)
                .await?;
            metrics::counter!("caudal_records_rejected_total", "pipeline" => self.name.clone(), "reason" => "schema")
                .increment(invalid.len() as u64);
            counters
                .dead
                .fetch_add(invalid.len() as u64, Ordering::Relaxed);
        }
        let Some(appended) =
            buffered::append(&self.name, buffer, &entries, cancel, blocked).await?
        else {
            return Ok(false);
        };
        let rows_read = counters.read.load(Ordering::Relaxed);
        match self.ack {
            AckMode::Buffered => {
                self.store
                    .commit_progress(run_id, &self.name, &position_json, rows_read, None)
                    .await?;
            }
            AckMode::Delivered => {
                self.store
                    .update_run_counts(run_id, rows_read, None)
                    .await?;
            }
        }
        if let Some(aggregates) = &self.aggregates {
            let [bytes] = entries;
            aggregates.feed(appended.start, bytes).await?;
        }
        if let Some(d) = durable {
            d.mark(&entry.position);
        }
        self.shared.recent.put(appended.start, entry);
        self.release(appended.end);
        Ok(true)
    }
}

impl Pipeline {
    /// Moves the events that fail the pipeline's schema out of `events`
    /// into dead letters (returned, to be stored), with every validation
    /// error and the record key.
    fn invalid(
        &self,
        batch_key: &str,
        schema: &jsonschema::Validator,
        events: &mut Vec<Event>,
    ) -> Vec<caudal_store::NewDeadLetter> {
        let mut letters = Vec::new();
        events.retain(|e| {
            let record = e.data.to_value();
            let errors: Vec<String> = schema
                .iter_errors(&record)
                .map(|err| format!("{} at {}", err, err.instance_path()))
                .collect();
            if errors.is_empty() {
                return true;
            }
            let reason = format!(
                "record{} does not match the pipeline's schema: {}",
                e.key
                    .as_deref()
                    .map(|k| format!(" with key {k}"))
                    .unwrap_or_default(),
                errors.join("; ")
            );
            letters.push(caudal_store::NewDeadLetter {
                record,
                ..caudal_store::NewDeadLetter::of_event(&self.name, batch_key, e, reason)
            });
            false
        });
        letters
    }
}

impl Pipeline {
    /// Sets the pipeline's gauges (buffer size, checkpoint age, replication
    /// lag) for `/metrics`.
    pub async fn sample_metrics(&self) {
        let name = self.name.clone();
        if let Some(buffer) = self.shared.buffer.get() {
            let st = buffer.stats();
            metrics::gauge!("caudal_buffer_batches", "pipeline" => name.clone())
                .set(st.unacked_records as f64);
            metrics::gauge!("caudal_buffer_bytes", "pipeline" => name.clone())
                .set(st.unacked_bytes as f64);
        }
        if let Ok(Some(cp)) = self.store.checkpoint(&name).await {
            let age = jiff::Timestamp::now().duration_since(cp.updated_at);
            metrics::gauge!("caudal_checkpoint_age_seconds", "pipeline" => name.clone())
                .set(age.as_secs_f64().max(0.0));
        }
        if let Source::Broker(b) = &self.source {
            let st = b.state();
            metrics::gauge!("caudal_broker_connected", "pipeline" => name.clone())
                .set(if st.connected { 1.0 } else { 0.0 });
            metrics::gauge!("caudal_broker_unacked_messages", "pipeline" => name.clone())
                .set(st.unacked as f64);
            if let Some(lag) = st.lag {
                metrics::gauge!("caudal_broker_lag_messages", "pipeline" => name.clone())
                    .set(lag as f64);
            }
        }
        if let Source::Cdc(s) = &self.source {
            let lag = s.live();
            if let Some(b) = lag.lag_bytes {
                metrics::gauge!("caudal_replication_lag_bytes", "pipeline" => name.clone())
                    .set(b as f64);
            }
            if let Some(secs) = lag.lag_seconds {
                metrics::gauge!("caudal_replication_lag_seconds", "pipeline" => name.clone())
                    .set(secs);
            }
        }
    }
}

/// Reads and compiles a pipeline's JSON Schema, if it has one.
fn load_schema(
    name: &str,
    p: &PipelineConfig,
    config: &Config,
) -> Result<Option<Arc<jsonschema::Validator>>> {
    let base = config
        .base_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let Some(path) = p.schema_path(&base) else {
        return Ok(None);
    };
    let err = |m: String| {
        Error::new(
            ErrorKind::Config,
            format!("pipeline {name:?}: schema {}: {m}", path.display()),
        )
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    let validator = jsonschema::validator_for(&value)
        .map_err(|e| err(format!("not a valid JSON Schema: {e}")))?;
    Ok(Some(Arc::new(validator)))
}

/// The crawl frontier of pipeline `name`.
pub fn crawl_frontier(name: &str) -> String {
    format!("pipeline:{name}")
}

/// Reads and decodes a pipeline's checkpoint.
pub async fn load_checkpoint(store: &Store, pipeline: &str) -> Result<Option<Position>> {
    match store.checkpoint(pipeline).await? {
        None => Ok(None),
        Some(cp) => serde_json::from_value(cp.position).map(Some).map_err(|e| {
            Error::with_source(
                ErrorKind::Decode,
                format!(
                    "the checkpoint of pipeline {pipeline:?} is not readable; \
                     reset it with `caudal checkpoint reset {pipeline}`"
                ),
                e,
            )
        }),
    }
}

/// How a run's reading ended.
enum Ended {
    /// Everything up to the source's end was delivered.
    Completed,
    /// Shutdown stopped it first; the checkpoint is at the last delivered
    /// batch.
    Stopped,
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a replay of dead letters did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Letters sent again and delivered.
    pub delivered: u64,
    /// Letters the receiver refused again (kept as new dead letters).
    pub rejected_again: u64,
}

impl Pipeline {
    /// Sends pending dead letters of this pipeline again through the normal
    /// delivery path, grouped by the batch they travelled in and with that
    /// batch's idempotency key. Each replayed letter is marked `replayed`;
    /// one the receiver refuses again becomes a new pending dead letter. A
    /// batch whose retries give up stays pending, and the replay stops.
    pub async fn replay_dead_letters(
        &self,
        ids: Option<&[i64]>,
        stop: &CancellationToken,
    ) -> Result<Replayed> {
        let mut letters = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .store
                .dead_letters(
                    Some(&self.name),
                    Some(caudal_store::DeadLetterState::Pending),
                    after,
                    1000,
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            letters.extend(
                page.into_iter()
                    .filter(|l| ids.is_none_or(|ids| ids.contains(&l.id))),
            );
        }
        let mut groups: Vec<(String, Vec<caudal_store::DeadLetter>)> = Vec::new();
        for letter in letters {
            match groups.iter_mut().find(|(k, _)| *k == letter.batch_key) {
                Some((_, group)) => group.push(letter),
                None => groups.push((letter.batch_key.clone(), vec![letter])),
            }
        }
        let mut done = Replayed::default();
        for (key, group) in groups {
            let mut events = Vec::with_capacity(group.len());
            for l in &group {
                let position = serde_json::from_value(l.position.clone()).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Decode,
                        format!("dead letter {} has an unreadable position", l.id),
                        e,
                    )
                })?;
                let serde_json::Value::Object(data) = &l.record else {
                    return Err(Error::new(
                        ErrorKind::Decode,
                        format!("dead letter {} is not a record object", l.id),
                    ));
                };
                events.push(Event {
                    key: l.record_key.clone(),
                    position,
                    data: Json::from_map(data),
                });
            }
            let sent = self.sender.for_replay().send(&key, events, stop).await?;
            let ids: Vec<i64> = group.iter().map(|l| l.id).collect();
            self.store
                .resolve_dead_letters(&ids, caudal_store::DeadLetterState::Replayed)
                .await?;
            done.delivered += sent.delivered;
            done.rejected_again += sent.dead_letters;
        }
        Ok(done)
    }
}
