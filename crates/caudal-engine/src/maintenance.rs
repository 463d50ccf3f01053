//! What operators do to a pipeline besides running it: forget its
//! checkpoint, start a CDC pipeline over (resync), drop what it keeps on
//! its database server, ask its reader for a backfill, look at its buffer.
//! One implementation, used by the CLI (no daemon running the pipeline)
//! and by the API (a daemon that has the pipeline paused) alike.
//!
//! Promises:
//! - **The same rules everywhere.** Batches waiting in the buffer are read
//!   again from the source after a reset, so they are dropped, but only
//!   when nothing may be delivering them: this process opened the buffer
//!   itself, which fails ([`ErrorKind::Busy`]) while another process runs
//!   the pipeline. A daemon's paused pipeline still delivers its buffer,
//!   so there a reset is refused until the buffer is empty.
//! - **Crash-safe order.** The checkpoint is forgotten first and the
//!   buffer acknowledged last: a crash in between leaves the batches to be
//!   delivered and the next run resuming after them, as if no reset had
//!   been made.
//! - **Dialect-neutral.** CDC sources are used through
//!   [`ChangeCapture`](caudal_connectors::sources::cdc::ChangeCapture);
//!   what a pipeline keeps on its server is remembered as a
//!   [`Held`] description and released through it.

use std::sync::Arc;

use caudal_buffer::Buffer;
use caudal_connectors::sources::cdc::{
    BackfillProgress, BackfillRequest, BackfillRequests, CdcSource,
};
use caudal_core::config::Config;
use caudal_core::status::Replication;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;

use crate::buffered;
use crate::pipeline::{Pipeline, Source};

pub use caudal_buffer::{FsckReport, Inspection};
pub use caudal_connectors::sources::cdc::{Held, Released};

/// Where the store remembers what a CDC pipeline keeps on its server.
const HELD_PREFIX: &str = "slot/";

/// What a checkpoint reset did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reset {
    /// Whether there was a checkpoint to forget.
    pub had_checkpoint: bool,
    /// Batches that waited in the buffer and were dropped (they are read
    /// again from the source).
    pub dropped_batches: u64,
    /// Whether a crawl pipeline's frontier was forgotten (its next run
    /// crawls from its start URLs, as a first crawl).
    pub forgot_frontier: bool,
}

/// What a resync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resynced {
    /// What the source dropped on its server, and what comes next.
    pub released: Released,
    /// The checkpoint reset that followed.
    pub reset: Reset,
}

/// A backfill request, saved and announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillTicket {
    /// The request's id: its progress is reported under it.
    pub id: String,
    /// Rows matching the request when it was made.
    pub rows: u64,
}

/// The maintenance of one pipeline of a configuration.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance<'a> {
    config: &'a Config,
    store: &'a Store,
    name: &'a str,
}

impl<'a> Maintenance<'a> {
    /// The maintenance of pipeline `name`, which `config` must define
    /// (else a [`ErrorKind::Config`] error listing the pipelines).
    pub fn new(config: &'a Config, store: &'a Store, name: &'a str) -> Result<Self> {
        if !config.pipelines.contains_key(name) {
            let names: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "no pipeline named {name:?}; pipelines: {}",
                    names.join(", ")
                ),
            ));
        }
        Ok(Self {
            config,
            store,
            name,
        })
    }

    /// Forgets the checkpoint: the next run reads the source from the
    /// start. `running`: the daemon's (paused) pipeline, whose buffer it
    /// uses; `None` opens the buffer here (see the module's rules).
    pub async fn reset_checkpoint(&self, running: Option<&Pipeline>) -> Result<Reset> {
        let held = self.hold_buffer(running).await?;
        let had_checkpoint = self.store.reset_checkpoint(self.name).await?;
        // A crawl's position is its frontier: it is forgotten too.
        let crawl = self
            .config
            .pipelines
            .get(self.name)
            .and_then(|p| self.config.sources.get(&p.source))
            .is_some_and(|s| s.crawl().is_some());
        let mut forgot_frontier = false;
        if crawl {
            let frontier = crate::pipeline::crawl_frontier(self.name);
            forgot_frontier = self
                .store
                .frontiers(Some(&frontier))
                .await?
                .iter()
                .any(|f| f.name == frontier);
            self.store.reset_frontier(&frontier).await?;
        }
        let dropped_batches = self.drop_waiting(held).await?;
        Ok(Reset {
            had_checkpoint,
            dropped_batches,
            forgot_frontier,
        })
    }

    /// Starts a CDC pipeline over: the source drops the position its server
    /// keeps for the pipeline (a publication stays), what the reader
    /// reported is forgotten, and the checkpoint is reset; the next run
    /// reads the tables again.
    pub async fn resync(&self, running: Option<&Pipeline>) -> Result<Resynced> {
        let source = match running.map(Pipeline::source) {
            Some(Source::Cdc(s)) => s.clone(),
            Some(Source::Sql(_) | Source::Crawl(_) | Source::Windows(_) | Source::Broker(_)) => {
                return Err(self.not_cdc());
            }
            None => self.cdc_source().await?,
        };
        let held = self.hold_buffer(running).await?;
        let released = source.restart().await?;
        self.store.clear_source_state(self.name).await?;
        let had_checkpoint = self.store.reset_checkpoint(self.name).await?;
        let dropped_batches = self.drop_waiting(held).await?;
        Ok(Resynced {
            released,
            reset: Reset {
                had_checkpoint,
                dropped_batches,
                forgot_frontier: false,
            },
        })
    }

    /// Drops what a CDC pipeline keeps on its server (its slot, and its
    /// publication if caudal created it): `caudal cdc drop`. Refused while
    /// a process runs the pipeline.
    pub async fn drop_replication(&self) -> Result<Released> {
        let source = self.cdc_source().await?;
        let _buffer = self.hold_buffer(None).await?;
        let held = load_held(self.store, self.name).await?;
        let released = source.release(held.as_ref()).await?;
        self.store.clear_source_state(&held_key(self.name)).await?;
        Ok(released)
    }

    /// Asks the pipeline's running CDC reader to read `table` again (the
    /// rows matching `filter`): checks the table and the filter, saves the
    /// request and tells the source.
    pub async fn request_backfill(
        &self,
        table: &str,
        filter: Option<&str>,
    ) -> Result<BackfillTicket> {
        let cdc = self.cdc_source().await?;
        let rows = cdc.count_rows(table, filter).await?;
        let id = format!("{:016x}", rand::random::<u64>());
        let request = BackfillRequest {
            table: table.to_string(),
            filter: filter.map(str::to_string),
        };
        let saved = serde_json::to_value(&request).map_err(|e| {
            Error::with_source(ErrorKind::Internal, "cannot encode a backfill request", e)
        })?;
        self.store
            .set_source_state(&backfill_key(self.name, &id), &saved)
            .await?;
        cdc.request_backfill(&id).await?;
        Ok(BackfillTicket { id, rows })
    }

    /// The progress the pipeline's reader last reported for backfill `id`
    /// (`None` until it takes the request).
    pub async fn backfill_progress(&self, id: &str) -> Result<Option<BackfillProgress>> {
        Ok(reported(self.store, self.name)
            .await?
            .and_then(|r| r.backfill)
            .filter(|p| p.id == id))
    }

    /// Withdraws backfill request `id`: a later start does not run it.
    pub async fn withdraw_backfill(&self, id: &str) -> Result<()> {
        self.store
            .clear_source_state(&backfill_key(self.name, id))
            .await
    }

    /// What the pipeline's buffer holds (`None`: it has no buffer yet).
    pub fn inspect_buffer(&self) -> Result<Option<Inspection>> {
        let dir = self.config.buffer_dir(self.name);
        if !dir.exists() {
            return Ok(None);
        }
        caudal_buffer::inspect(&dir)
            .map(Some)
            .map_err(|e| buffered::buffer_error(self.name, e))
    }

    /// Checks every entry of the pipeline's buffer (`None`: it has no
    /// buffer yet).
    pub fn fsck_buffer(&self) -> Result<Option<FsckReport>> {
        let dir = self.config.buffer_dir(self.name);
        if !dir.exists() {
            return Ok(None);
        }
        caudal_buffer::fsck(&dir)
            .map(Some)
            .map_err(|e| buffered::buffer_error(self.name, e))
    }

    /// The directory of the pipeline's buffer.
    pub fn buffer_dir(&self) -> std::path::PathBuf {
        self.config.buffer_dir(self.name)
    }

    fn not_cdc(&self) -> Error {
        Error::new(
            ErrorKind::Config,
            format!(
                "pipeline {:?} does not capture changes (its source is not mode = \"cdc\")",
                self.name
            ),
        )
    }

    /// The pipeline's CDC source, connected (nothing is queried yet).
    async fn cdc_source(&self) -> Result<CdcSource> {
        let p = &self.config.pipelines[self.name];
        match self.config.sources.get(&p.source) {
            Some(s) if s.is_cdc() => CdcSource::connect(self.name, &p.source, s).await,
            _ => Err(self.not_cdc()),
        }
    }

    /// The buffer a maintenance operation works on: the running pipeline's,
    /// or opened here (which fails while another process runs it); `None`
    /// when the pipeline has no buffer yet.
    async fn hold_buffer(&self, running: Option<&Pipeline>) -> Result<Option<HeldBuffer>> {
        if let Some(p) = running {
            let buffer = p.buffer().await?;
            let waiting = buffer.next_offset() - buffer.acked();
            if waiting > 0 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "pipeline {:?} has {waiting} batches waiting in its buffer; let them be \
                         delivered (or stop caudal and use the command line)",
                        self.name
                    ),
                ));
            }
            return Ok(Some(HeldBuffer {
                buffer: buffer.clone(),
                exclusive: false,
            }));
        }
        let dir = self.config.buffer_dir(self.name);
        if !dir.exists() {
            return Ok(None);
        }
        let settings = buffered::buffer_config(&self.config.pipelines[self.name].buffer);
        let buffer = buffered::open(self.name, &dir, settings).await?;
        Ok(Some(HeldBuffer {
            buffer,
            exclusive: true,
        }))
    }

    /// Drops the batches waiting in a buffer this process holds
    /// exclusively; returns how many there were.
    async fn drop_waiting(&self, held: Option<HeldBuffer>) -> Result<u64> {
        let Some(HeldBuffer {
            buffer,
            exclusive: true,
        }) = held
        else {
            return Ok(0);
        };
        let waiting = buffer.next_offset() - buffer.acked();
        buffer
            .ack(buffer.next_offset())
            .await
            .map_err(|e| buffered::buffer_error(self.name, e))?;
        Ok(waiting)
    }
}

/// A pipeline's buffer as a maintenance operation holds it.
struct HeldBuffer {
    buffer: Buffer,
    /// Opened by this process (nothing else can deliver from it).
    exclusive: bool,
}

/// Where the store remembers what `pipeline` keeps on its server.
fn held_key(pipeline: &str) -> String {
    format!("{HELD_PREFIX}{pipeline}")
}

/// What `pipeline` keeps on its server, as last remembered.
pub(crate) async fn load_held(store: &Store, pipeline: &str) -> Result<Option<Held>> {
    Ok(store
        .source_state(&held_key(pipeline))
        .await?
        .and_then(|s| serde_json::from_value(s.state).ok()))
}

/// Remembers what `pipeline` keeps on its server (keeping an earlier
/// note that caudal created its publication).
pub(crate) async fn save_held(store: &Store, pipeline: &str, held: Held) -> Result<()> {
    let earlier = load_held(store, pipeline).await?;
    let value = serde_json::to_value(held.merged_with(earlier.as_ref()))
        .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot encode a slot record", e))?;
    store.set_source_state(&held_key(pipeline), &value).await
}

/// Releases what pipelines no longer in the configuration keep on their
/// servers (so a server stops keeping WAL for a slot nobody reads). What
/// sits on a server no longer configured cannot be reached: it is named in
/// a warning.
pub async fn release_removed(config: &Config, store: &Store) -> Result<()> {
    for (key, state) in store.source_states_with_prefix(HELD_PREFIX).await? {
        let pipeline = &key[HELD_PREFIX.len()..];
        if config.pipelines.contains_key(pipeline) {
            continue;
        }
        let Ok(held) = serde_json::from_value::<Held>(state.state) else {
            tracing::warn!(
                pipeline,
                "an unreadable slot record of a removed pipeline; kept"
            );
            continue;
        };
        let Some((cfg, sql)) = config
            .sources
            .get(&held.source)
            .filter(|c| c.is_cdc())
            .and_then(|c| Some((c, c.sql()?)))
        else {
            tracing::warn!(
                pipeline,
                slot = ?held.slot,
                source = %held.source,
                "a removed CDC pipeline's replication slot is on a server no longer configured; drop it there (SELECT pg_drop_replication_slot(...)) or it keeps WAL"
            );
            continue;
        };
        let mut sql = sql.clone();
        sql.slot.clone_from(&held.slot);
        sql.publication.clone_from(&held.publication);
        let source_cfg = cfg.with_sql(sql);
        let cdc = CdcSource::connect(pipeline, &held.source, &source_cfg).await?;
        let released = cdc.release(Some(&held)).await?;
        tracing::info!(pipeline, dropped = ?released.dropped, kept = ?released.kept, "released what a pipeline removed from the configuration kept on its server");
        store.clear_source_state(&key).await?;
    }
    Ok(())
}

/// Where a backfill request for `pipeline` is saved.
fn backfill_key(pipeline: &str, id: &str) -> String {
    // Pipeline names have no `/`: no pipeline's own state is named so.
    format!("backfill/{pipeline}/{id}")
}

/// What the reader of `pipeline` last reported (CDC figures), if any.
pub(crate) async fn reported(store: &Store, pipeline: &str) -> Result<Option<Replication>> {
    Ok(store.source_state(pipeline).await?.and_then(|s| {
        let mut r: Replication = serde_json::from_value(s.state).ok()?;
        r.reported_at = Some(s.updated_at.to_string());
        Some(r)
    }))
}

/// Saves what the reader of `pipeline` reports, and withdraws a finished
/// backfill's request so a restart does not run it again.
pub(crate) async fn report(store: &Store, pipeline: &str, now: &Replication) -> Result<()> {
    let value = serde_json::to_value(now)
        .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot encode figures", e))?;
    store.set_source_state(pipeline, &value).await?;
    if let Some(b) = now.backfill.as_ref().filter(|b| b.done) {
        store
            .clear_source_state(&backfill_key(pipeline, &b.id))
            .await?;
    }
    Ok(())
}

/// Backfill requests of one pipeline, as saved in the state store.
#[derive(Debug)]
pub(crate) struct StoredBackfills {
    store: Store,
    pipeline: String,
}

impl StoredBackfills {
    pub(crate) fn shared(store: &Store, pipeline: &str) -> Arc<dyn BackfillRequests> {
        Arc::new(Self {
            store: store.clone(),
            pipeline: pipeline.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl BackfillRequests for StoredBackfills {
    async fn get(&self, id: &str) -> Option<BackfillRequest> {
        let state = self
            .store
            .source_state(&backfill_key(&self.pipeline, id))
            .await
            .ok()
            .flatten()?;
        serde_json::from_value(state.state).ok()
    }

    async fn pending(&self) -> Vec<(String, BackfillRequest)> {
        let prefix = backfill_key(&self.pipeline, "");
        self.store
            .source_states_with_prefix(&prefix)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, state)| {
                let id = key.strip_prefix(&prefix)?.to_string();
                Some((id, serde_json::from_value(state.state).ok()?))
            })
            .collect()
    }
}
