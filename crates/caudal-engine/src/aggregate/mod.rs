//! Live aggregates: windowed figures per group over a pipeline's records,
//! counted as the records become durable in the pipeline's buffer.
//!
//! Promises:
//! - **Counted exactly once.** An aggregate counts buffer entries in
//!   offset order and commits its windows with the offset it counted up to
//!   in one store transaction ([`caudal_store::Store::commit_aggregate`]).
//!   The buffer keeps every entry not yet counted: the pipeline
//!   acknowledges its buffer only below the lowest counted offset
//!   ([`AckGate`]), so after a crash the entries past the saved offset are
//!   still there and are counted again, from the saved windows. Delivery
//!   is not held back; at worst a crash sends again what was delivered in
//!   the last commit interval, with the same idempotency keys.
//! - **A sum tracks the table.** A CDC insert adds its row, a delete takes
//!   its old row back (`before`), an update does both; a truncate empties
//!   every window. Records of other sources are added.
//! - **Late is counted, never silently dropped.** A change whose window
//!   closed (the watermark, the latest event time seen, passed its end
//!   plus `lateness`) does not change the window's figures; it is counted
//!   as late on the window and the aggregate (API, metric
//!   `caudal_aggregate_late_total`).
//! - A change of definition (group, window, metrics, filter) starts the
//!   aggregate afresh from the buffer's current position, with a warning:
//!   windows computed one way are never mixed with another.
//! - Readers in the same process see figures as soon as a batch is
//!   counted ([`Live::views`], [`Live::subscribe`]); the store has them
//!   within a commit interval.

pub mod accumulate;
pub mod source;
pub mod window;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use caudal_buffer::Buffer;
use caudal_core::config::{AggregateConfig, Config, Metric};
use caudal_core::record::Json;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{AggregateCommit, Store, WindowRow};
use jiff::tz::TimeZone;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use self::accumulate::Acc;
use self::window::{Windows, parse_time};
use crate::buffered::Entry;

/// How long counted batches wait at most before they are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How often closed windows past `keep` are deleted.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// How far past the wall clock the watermark may go.
const WATERMARK_SKEW: i64 = 60_000_000;
/// Buffer entries read at once when catching up.
const CATCH_UP_CHUNK: usize = 64;

/// The checked settings of one aggregate.
#[derive(Debug)]
pub struct Spec {
    pub name: String,
    pub pipeline: String,
    pub group_by: Vec<String>,
    pub time: Option<String>,
    pub windows: Windows,
    pub lateness: i64,
    pub keep: i64,
    filter: Option<minijinja::Expression<'static, 'static>>,
    pub metrics: Vec<(String, Metric)>,
    ln_gamma: f64,
    /// Whether records are CDC changes (`op`, `before`, `after`).
    cdc: bool,
    /// A digest of what the windows are computed with.
    definition: String,
}

impl Spec {
    /// The window size, in microseconds.
    pub fn window_size(&self) -> i64 {
        self.windows.size_us()
    }

    /// The hop between window starts, in microseconds.
    pub fn hop(&self) -> i64 {
        self.windows.hop_us()
    }

    pub fn build(name: &str, config: &Config) -> Result<Self> {
        let agg: &AggregateConfig = config
            .aggregates
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::Config, format!("no aggregate named {name:?}")))?;
        let invalid =
            |why: String| Error::new(ErrorKind::Config, format!("aggregates.{name}: {why}"));
        let (size, hop) =
            caudal_core::config::aggregates::window_spec(agg.window, agg.every).map_err(invalid)?;
        let tz = match &agg.tz {
            Some(tz) => TimeZone::get(tz).map_err(|e| invalid(e.to_string()))?,
            None => TimeZone::UTC,
        };
        let metrics = agg
            .metrics
            .iter()
            .map(|(n, spec)| Ok((n.clone(), Metric::parse(spec).map_err(invalid)?)))
            .collect::<Result<Vec<_>>>()?;
        let filter = match &agg.filter {
            Some(text) => Some(compile_filter(text).map_err(invalid)?),
            None => None,
        };
        let cdc = config
            .pipelines
            .get(&agg.pipeline)
            .and_then(|p| config.sources.get(&p.source))
            .is_some_and(caudal_core::config::SourceConfig::is_cdc);
        let definition = {
            use sha2::Digest as _;
            let text = serde_json::json!({
                "pipeline": agg.pipeline, "group_by": agg.group_by, "time": agg.time,
                "window": size, "every": hop, "tz": agg.tz, "lateness": agg.lateness.to_string(),
                "filter": agg.filter, "metrics": agg.metrics, "relative_error": agg.relative_error,
            });
            let digest = sha2::Sha256::digest(text.to_string().as_bytes());
            digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
        };
        let micros = |d: caudal_core::units::Duration| {
            i64::try_from(d.as_std().as_micros()).unwrap_or(i64::MAX / 2)
        };
        let alpha = agg.relative_error;
        Ok(Self {
            name: name.to_string(),
            pipeline: agg.pipeline.clone(),
            group_by: agg.group_by.clone(),
            time: agg.time.clone(),
            windows: Windows::new(size, hop, tz),
            lateness: micros(agg.lateness),
            keep: micros(agg.keep),
            filter,
            metrics,
            ln_gamma: ((1.0 + alpha) / (1.0 - alpha)).ln(),
            cdc,
            definition,
        })
    }
}

fn compile_filter(
    text: &str,
) -> std::result::Result<minijinja::Expression<'static, 'static>, String> {
    // Expressions borrow their environment and text: one environment for
    // the process, and each distinct filter text kept once, so building a
    // spec again (per API request, per alert evaluation) costs no memory.
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    static TEXTS: std::sync::Mutex<BTreeSet<&'static str>> = std::sync::Mutex::new(BTreeSet::new());
    let env = ENV.get_or_init(minijinja::Environment::new);
    let source: &'static str = {
        let mut texts = TEXTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match texts.get(text) {
            Some(kept) => kept,
            None => {
                let kept: &'static str = Box::leak(text.to_string().into_boxed_str());
                texts.insert(kept);
                kept
            }
        }
    };
    env.compile_expression(source)
        .map_err(|e| format!("filter does not compile: {e}"))
}

/// One window of one group, as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WindowView {
    /// Window start and end (RFC 3339, UTC).
    pub start: String,
    pub end: String,
    /// The group's values by `group_by` field.
    #[schema(value_type = Object)]
    pub group: Map<String, Value>,
    /// Rows counted in the window (net: inserts minus deletes).
    pub rows: i64,
    /// Changes that arrived after the window closed, not counted.
    pub late: i64,
    /// Whether the window is closed (its figures are final).
    pub closed: bool,
    /// The figures, by metric name.
    #[schema(value_type = Object)]
    pub metrics: Map<String, Value>,
    #[serde(skip)]
    pub start_us: i64,
    #[serde(skip)]
    pub group_key: String,
}

impl WindowView {
    /// The view of a stored window row of `spec`.
    pub fn of_row(spec: &Spec, row: &WindowRow) -> Self {
        let figures = serde_json::from_str::<Map<String, Value>>(&row.figures).unwrap_or_default();
        Self {
            start: window::format_time(row.start),
            end: window::format_time(row.end),
            group: group_map(spec, &row.group),
            rows: row.rows,
            late: row.late,
            closed: row.closed,
            metrics: figures,
            start_us: row.start,
            group_key: row.group.clone(),
        }
    }
}

fn group_map(spec: &Spec, key: &str) -> Map<String, Value> {
    let values: Vec<Value> = serde_json::from_str(key).unwrap_or_default();
    spec.group_by.iter().cloned().zip(values).collect()
}

/// An open window of one group.
#[derive(Debug)]
struct Cell {
    end: i64,
    rows: i64,
    late: i64,
    accs: Vec<Acc>,
    /// Changed since the last commit.
    dirty: bool,
}

/// The counting state of one aggregate.
#[derive(Debug)]
struct State {
    /// Open windows by start and group.
    cells: BTreeMap<(i64, String), Cell>,
    /// Buffer entries below this offset are counted.
    offset: u64,
    watermark: Option<i64>,
    /// Since the last commit: changes not counted (late), rows skipped,
    /// late changes of closed windows, windows closed.
    late: i64,
    skipped: i64,
    late_closed: HashMap<(i64, String), i64>,
    closed: Vec<WindowRow>,
    /// A truncate emptied every window: the stored ones go at the next
    /// commit.
    truncated: bool,
    /// The CDC snapshot counted (its consistent position): rows of another
    /// one (a resync) start the windows afresh.
    snapshot: Option<String>,
    /// The snapshot changed since the last commit.
    snapshot_moved: bool,
    /// Changed in the current batch (for subscribers).
    touched: HashSet<(i64, String)>,
    /// Warned once: changes without their old row.
    warned_before: bool,
    warned_fields: bool,
}

/// One aggregate, shared by its counting task and its readers.
#[derive(Debug)]
pub struct Live {
    spec: Spec,
    state: Mutex<State>,
    updates: broadcast::Sender<Arc<Vec<WindowView>>>,
    committed_offset: AtomicU64,
}

/// Counted and delivered offsets of a pipeline's buffer: the buffer is
/// acknowledged below both.
#[derive(Debug)]
pub struct AckGate {
    delivered: AtomicU64,
    counted: AtomicU64,
}

impl Default for AckGate {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            counted: AtomicU64::new(u64::MAX),
        }
    }
}

impl AckGate {
    /// Delivery finished everything below `upto`: the offset the buffer
    /// may be acknowledged to now.
    pub fn delivered(&self, upto: u64) -> u64 {
        self.delivered.fetch_max(upto, Ordering::AcqRel);
        upto.min(self.counted.load(Ordering::Acquire))
    }

    /// Where delivery resumes: past what it delivered in this process.
    pub fn resume_at(&self, acked: u64) -> u64 {
        acked.max(self.delivered.load(Ordering::Acquire))
    }

    fn counted(&self, upto: u64) -> u64 {
        self.counted.store(upto, Ordering::Release);
        upto.min(self.delivered.load(Ordering::Acquire))
    }
}

/// A message to the counting task.
enum Fed {
    /// The entry appended at `offset`, encoded.
    Entry { offset: u64, bytes: Vec<u8> },
    /// Commit now and say when done.
    Flush(oneshot::Sender<()>),
}

/// The aggregates of one pipeline.
#[derive(Debug)]
pub struct Aggregates {
    pipeline: String,
    list: Vec<Arc<Live>>,
    gate: Arc<AckGate>,
    feed: Mutex<Option<mpsc::Sender<Fed>>>,
    store: Store,
}

impl Aggregates {
    /// The aggregates of `pipeline` in `config`, or `None` when it has
    /// none.
    pub fn build(pipeline: &str, config: &Config, store: &Store) -> Result<Option<Arc<Self>>> {
        let list = config
            .aggregates
            .iter()
            .filter(|(_, a)| a.pipeline == pipeline)
            .map(|(name, _)| {
                let spec = Spec::build(name, config)?;
                Ok(Arc::new(Live {
                    spec,
                    state: Mutex::new(State {
                        cells: BTreeMap::new(),
                        offset: 0,
                        watermark: None,
                        late: 0,
                        skipped: 0,
                        late_closed: HashMap::new(),
                        closed: Vec::new(),
                        truncated: false,
                        snapshot: None,
                        snapshot_moved: false,
                        touched: HashSet::new(),
                        warned_before: false,
                        warned_fields: false,
                    }),
                    updates: broadcast::channel(256).0,
                    committed_offset: AtomicU64::new(0),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        if list.is_empty() {
            return Ok(None);
        }
        let gate = AckGate::default();
        // Nothing may be acknowledged before the aggregates say where
        // they stand.
        gate.counted.store(0, Ordering::Release);
        Ok(Some(Arc::new(Self {
            pipeline: pipeline.to_string(),
            list,
            gate: Arc::new(gate),
            feed: Mutex::new(None),
            store: store.clone(),
        })))
    }

    pub fn gate(&self) -> Arc<AckGate> {
        self.gate.clone()
    }

    pub fn list(&self) -> &[Arc<Live>] {
        &self.list
    }

    /// Loads each aggregate's windows, counts the buffer entries past its
    /// saved offset, and starts the counting task. Called once the buffer
    /// is open, before anything is appended.
    pub async fn start(self: &Arc<Self>, buffer: &Buffer) -> Result<()> {
        let (acked, next) = (buffer.acked(), buffer.next_offset());
        for live in &self.list {
            live.load(&self.store, acked, next).await?;
        }
        let from = self.list.iter().map(|l| l.offset()).min().unwrap_or(next);
        let mut at = from;
        while at < next {
            let entries = buffer
                .read(at, CATCH_UP_CHUNK)
                .await
                .map_err(|e| crate::buffered::buffer_error(&self.pipeline, e))?;
            if entries.is_empty() {
                break;
            }
            for (offset, bytes) in entries {
                if offset >= next {
                    break;
                }
                let entry = Entry::decode(offset, &bytes)?;
                for live in &self.list {
                    live.count(offset, &entry);
                }
                at = offset + 1;
            }
        }
        if from < next {
            tracing::info!(pipeline = %self.pipeline, entries = next - from, "aggregates counted the batches buffered past their saved position");
        }
        self.commit(buffer).await?;
        let (tx, rx) = mpsc::channel(16);
        *self.feed.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        let (me, buffer) = (self.clone(), buffer.clone());
        tokio::spawn(async move { me.run(rx, buffer).await });
        Ok(())
    }

    /// Hands the entry appended at `offset` to the counting task (waits
    /// while it is busy: backpressure).
    pub async fn feed(&self, offset: u64, bytes: Vec<u8>) -> Result<()> {
        let tx = self
            .feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match tx {
            Some(tx) => tx.send(Fed::Entry { offset, bytes }).await.map_err(|_| {
                Error::new(
                    ErrorKind::Internal,
                    format!("the aggregates of pipeline {:?} stopped", self.pipeline),
                )
            }),
            None => Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the aggregates of pipeline {:?} are not started",
                    self.pipeline
                ),
            )),
        }
    }

    /// Commits what is counted (e.g. at the end of a run).
    pub async fn flush(&self) {
        let tx = self
            .feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(tx) = tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Fed::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Fed>, buffer: Buffer) {
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut last_expiry = tokio::time::Instant::now();
        loop {
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                m = rx.recv() => m,
                () = wait => {
                    deadline = None;
                    self.commit_logged(&buffer).await;
                    if last_expiry.elapsed() >= EXPIRE_EVERY {
                        last_expiry = tokio::time::Instant::now();
                        self.expire().await;
                    }
                    continue;
                }
            };
            match message {
                None => {
                    self.commit_logged(&buffer).await;
                    return;
                }
                Some(Fed::Flush(done)) => {
                    self.commit_logged(&buffer).await;
                    deadline = None;
                    let _ = done.send(());
                }
                Some(Fed::Entry { offset, bytes }) => {
                    match Entry::decode(offset, &bytes) {
                        Ok(entry) => {
                            for live in &self.list {
                                live.count(offset, &entry);
                            }
                        }
                        Err(e) => {
                            tracing::error!(pipeline = %self.pipeline, error = %e.report(), "aggregates cannot read a batch");
                        }
                    }
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + COMMIT_EVERY);
                }
            }
        }
    }

    async fn commit_logged(&self, buffer: &Buffer) {
        if let Err(e) = self.commit(buffer).await {
            tracing::warn!(pipeline = %self.pipeline, error = %e.report(), "cannot save the aggregates; retrying at the next batch");
        }
    }

    /// Commits every aggregate's changes, then lets the buffer be
    /// acknowledged below the lowest counted offset.
    async fn commit(&self, buffer: &Buffer) -> Result<()> {
        for live in &self.list {
            live.commit(&self.store).await?;
        }
        let counted = self
            .list
            .iter()
            .map(|l| l.committed_offset.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        let upto = self.gate.counted(counted);
        if upto > buffer.acked() && upto <= buffer.next_offset() {
            buffer
                .ack(upto)
                .await
                .map_err(|e| crate::buffered::buffer_error(&self.pipeline, e))?;
        }
        Ok(())
    }

    async fn expire(&self) {
        for live in &self.list {
            let watermark = live.state().watermark;
            if let Some(w) = watermark {
                match self
                    .store
                    .expire_windows(&live.spec.name, w - live.spec.keep)
                    .await
                {
                    Ok(n) if n > 0 => {
                        tracing::debug!(aggregate = %live.spec.name, windows = n, "expired windows past keep")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(aggregate = %live.spec.name, error = %e.report(), "cannot expire windows")
                    }
                }
            }
        }
    }
}

/// What one change does to an aggregate: a row added or taken back.
struct Change<'a> {
    row: &'a Map<String, Value>,
    sign: i64,
    time: Option<i64>,
}

impl Live {
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn offset(&self) -> u64 {
        self.state().offset
    }

    /// The latest event time counted in this process.
    pub fn watermark(&self) -> Option<i64> {
        self.state().watermark
    }

    /// Window updates as batches are counted.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<WindowView>>> {
        self.updates.subscribe()
    }

    /// The windows counted in this process but not yet committed, or open
    /// (fresher than the store's rows), that overlap `[from, to)`.
    pub fn views(&self, from: i64, to: i64) -> Vec<WindowView> {
        let st = self.state();
        st.cells
            .iter()
            .filter(|((start, _), cell)| cell.end > from && *start < to)
            .map(|((start, group), cell)| self.view(*start, group, cell))
            .collect()
    }

    fn view(&self, start: i64, group: &str, cell: &Cell) -> WindowView {
        WindowView {
            start: window::format_time(start),
            end: window::format_time(cell.end),
            group: group_map(&self.spec, group),
            rows: cell.rows,
            late: cell.late,
            closed: false,
            metrics: self.figures(cell),
            start_us: start,
            group_key: group.to_string(),
        }
    }

    fn figures(&self, cell: &Cell) -> Map<String, Value> {
        self.spec
            .metrics
            .iter()
            .zip(&cell.accs)
            .map(|((name, metric), acc)| (name.clone(), acc.figure(metric, self.spec.ln_gamma)))
            .collect()
    }

    /// Reads the saved head and open windows; starts afresh when there is
    /// none or the definition changed.
    async fn load(&self, store: &Store, acked: u64, next: u64) -> Result<()> {
        let spec = &self.spec;
        let head = store.aggregate_head(&spec.name).await?;
        let fresh = match &head {
            None => true,
            Some(h) if h.definition != spec.definition || h.pipeline != spec.pipeline => {
                tracing::warn!(aggregate = %spec.name, "the aggregate's definition changed: its windows start afresh from the buffer's current position");
                true
            }
            Some(_) => false,
        };
        if fresh {
            store
                .reset_aggregate(&spec.name, &spec.pipeline, &spec.definition, acked)
                .await?;
        }
        let mut offset = head
            .as_ref()
            .filter(|_| !fresh)
            .map_or(acked, |h| h.buffer_offset);
        if offset > next {
            tracing::warn!(aggregate = %spec.name, saved = offset, buffer_end = next, "the pipeline's buffer is behind the aggregate's position (the buffer was removed?): counting from its end");
            offset = next;
        }
        if offset < acked {
            tracing::error!(aggregate = %spec.name, saved = offset, acked, "buffered batches were acknowledged before the aggregate counted them (the buffer was replaced?): they are not counted");
            offset = acked;
        }
        let rows = store.open_windows(&spec.name).await?;
        let mut st = self.state();
        st.offset = offset;
        let head = head.filter(|_| !fresh);
        st.watermark = head.as_ref().and_then(|h| h.watermark);
        st.snapshot = head.and_then(|h| h.snapshot);
        st.cells.clear();
        for row in rows {
            let accs = row
                .state
                .as_deref()
                .and_then(|s| serde_json::from_str::<Vec<Acc>>(s).ok())
                .filter(|a| a.len() == spec.metrics.len());
            let Some(accs) = accs else {
                tracing::warn!(aggregate = %spec.name, start = %window::format_time(row.start), group = %row.group, "an open window's state is unreadable: it starts empty");
                continue;
            };
            st.cells.insert(
                (row.start, row.group),
                Cell {
                    end: row.end,
                    rows: row.rows,
                    late: row.late,
                    accs,
                    dirty: false,
                },
            );
        }
        drop(st);
        self.committed_offset.store(offset, Ordering::Release);
        Ok(())
    }

    /// Counts the entry at `offset` if it is past what is counted.
    fn count(&self, offset: u64, entry: &Entry) {
        let mut st = self.state();
        if offset < st.offset {
            return;
        }
        let now = jiff::Timestamp::now().as_microsecond();
        for event in &entry.events {
            if let Some(id) = snapshot_id(&event.position)
                && st.snapshot.as_deref() != Some(id.as_str())
            {
                // A new snapshot (a resync): what was counted before is in
                // it already; the windows start again from it.
                if !st.cells.is_empty() || st.offset > 0 {
                    tracing::info!(aggregate = %self.spec.name, snapshot = %id, "a new snapshot of the source: the windows are counted again from it");
                }
                st.cells.clear();
                st.closed.clear();
                st.late_closed.clear();
                st.truncated = true;
                st.watermark = None;
                st.snapshot = Some(id);
                st.snapshot_moved = true;
            }
            self.count_record(&mut st, &event.data, now, event.key.as_deref());
        }
        st.offset = offset + 1;
        self.close_windows(&mut st);
        let touched = std::mem::take(&mut st.touched);
        if self.updates.receiver_count() > 0 && !touched.is_empty() {
            let views: Vec<WindowView> = touched
                .iter()
                .filter_map(|key| st.cells.get(key).map(|cell| self.view(key.0, &key.1, cell)))
                .chain(
                    st.closed
                        .iter()
                        .filter(|row| touched.contains(&(row.start, row.group.clone())))
                        .map(|row| WindowView::of_row(&self.spec, row)),
                )
                .collect();
            let _ = self.updates.send(Arc::new(views));
        }
    }

    fn count_record(&self, st: &mut State, data: &Json, now: i64, key: Option<&str>) {
        let Ok(Value::Object(record)) = serde_json::from_str::<Value>(data.as_str()) else {
            self.skip(st, "a record that is not a JSON object", key);
            return;
        };
        metrics::counter!("caudal_aggregate_records_total", "aggregate" => self.spec.name.clone())
            .increment(1);
        if !self.spec.cdc {
            // A cursor record has no commit time: its time field places it
            // (the configuration requires one).
            let change = Change {
                row: &record,
                sign: 1,
                time: None,
            };
            self.apply(st, &change, None, key, now);
            return;
        }
        let op = record.get("op").and_then(Value::as_str).unwrap_or("");
        let table = record.get("table").and_then(Value::as_str);
        // Snapshot rows (`read`) have no commit time: with event times by
        // commit they are not placed (counted as skipped), so a count
        // after a crash places every change where it placed it before.
        let commit = record
            .get("commit_time")
            .and_then(|t| parse_time(t, self.spec.windows.tz()));
        let row = |side: &str| match record.get(side) {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        };
        let meta = Some((op, table));
        match op {
            "truncate" => {
                st.cells.clear();
                st.closed.clear();
                st.late_closed.clear();
                st.truncated = true;
            }
            "insert" | "read" | "update" | "delete" => {
                if matches!(op, "update" | "delete") {
                    match row("before").filter(|b| self.has_fields(b)) {
                        Some(before) => {
                            let change = Change {
                                row: before,
                                sign: -1,
                                time: commit,
                            };
                            self.apply(st, &change, meta, key, now);
                        }
                        None => {
                            st.skipped += 1;
                            metrics::counter!("caudal_aggregate_skipped_total", "aggregate" => self.spec.name.clone())
                                .increment(1);
                            if !st.warned_before {
                                st.warned_before = true;
                                tracing::warn!(aggregate = %self.spec.name, table = table.unwrap_or(""), key = key.unwrap_or(""), "a change lacks its old row (`before`): its old values cannot be taken back; set REPLICA IDENTITY FULL on the table");
                            }
                        }
                    }
                }
                if let Some(after) = row("after") {
                    let change = Change {
                        row: after,
                        sign: 1,
                        time: commit,
                    };
                    self.apply(st, &change, meta, key, now);
                }
            }
            other => self.skip(st, &format!("a change of unknown op {other:?}"), key),
        }
    }

    /// Whether `row` has every field the aggregate reads to place a row
    /// (its group and time): a `before` of `REPLICA IDENTITY DEFAULT`
    /// holds the key only.
    fn has_fields(&self, row: &Map<String, Value>) -> bool {
        self.spec
            .group_by
            .iter()
            .chain(self.spec.time.iter())
            .chain(
                self.spec
                    .metrics
                    .iter()
                    .filter_map(|(_, m)| m.field.as_ref()),
            )
            .all(|f| field(row, f).is_some())
    }

    fn apply(
        &self,
        st: &mut State,
        change: &Change<'_>,
        meta: Option<(&str, Option<&str>)>,
        key: Option<&str>,
        now: i64,
    ) {
        let spec = &self.spec;
        if let Some(filter) = &spec.filter {
            let mut ctx = change.row.clone();
            if let Some((op, table)) = meta {
                ctx.insert("_op".into(), Value::from(op));
                ctx.insert("_table".into(), table.map_or(Value::Null, Value::from));
            }
            match filter.eval(minijinja::Value::from(minijinja::value::Serde(&ctx))) {
                Ok(v) if v.is_true() => {}
                Ok(_) => return,
                Err(e) => {
                    self.skip(st, &format!("the filter failed: {e}"), key);
                    return;
                }
            }
        }
        let mut group = Vec::with_capacity(spec.group_by.len());
        for f in &spec.group_by {
            match field(change.row, f) {
                Some(v) => group.push(v.clone()),
                None => {
                    self.skip_missing(st, f, key);
                    return;
                }
            }
        }
        let time = match &spec.time {
            Some(f) => field(change.row, f).and_then(|v| parse_time(v, spec.windows.tz())),
            None => change.time,
        };
        let Some(time) = time else {
            self.skip_missing(st, spec.time.as_deref().unwrap_or("commit_time"), key);
            return;
        };
        let group = serde_json::to_string(&group).unwrap_or_default();
        let watermark = st.watermark.unwrap_or(i64::MIN);
        for (start, end) in spec.windows.of(time) {
            if end.saturating_add(spec.lateness) <= watermark {
                st.late += 1;
                *st.late_closed.entry((start, group.clone())).or_default() += 1;
                metrics::counter!("caudal_aggregate_late_total", "aggregate" => spec.name.clone())
                    .increment(1);
                continue;
            }
            let cell = st
                .cells
                .entry((start, group.clone()))
                .or_insert_with(|| Cell {
                    end,
                    rows: 0,
                    late: 0,
                    accs: spec.metrics.iter().map(|(_, m)| Acc::new(m)).collect(),
                    dirty: true,
                });
            cell.rows += change.sign;
            cell.dirty = true;
            let mut refused = None;
            for ((name, metric), acc) in spec.metrics.iter().zip(cell.accs.iter_mut()) {
                let value = metric.field.as_ref().and_then(|f| field(change.row, f));
                if !acc.apply(metric, spec.ln_gamma, value, change.sign) {
                    refused = Some(name);
                }
            }
            st.touched.insert((start, group.clone()));
            if let Some(metric) = refused {
                self.skip(
                    st,
                    &format!("metric {metric:?} cannot count the row's value (not a number, or past 28 decimals)"),
                    key,
                );
            }
        }
        // A clock far ahead in one row must not close every window: the
        // watermark never passes the wall clock (plus a minute of skew).
        st.watermark = Some(watermark.max(time.min(now.saturating_add(WATERMARK_SKEW))));
    }

    fn skip_missing(&self, st: &mut State, field: &str, key: Option<&str>) {
        self.skip(
            st,
            &format!("it lacks field {field:?}, or its time is not a timestamp"),
            key,
        );
    }

    /// Counts a record (or a value) not counted, warning once per
    /// aggregate with the first reason and record key.
    fn skip(&self, st: &mut State, why: &str, key: Option<&str>) {
        st.skipped += 1;
        metrics::counter!("caudal_aggregate_skipped_total", "aggregate" => self.spec.name.clone())
            .increment(1);
        if !st.warned_fields {
            st.warned_fields = true;
            tracing::warn!(aggregate = %self.spec.name, key = key.unwrap_or(""), "a record is not counted (counted as skipped): {why}");
        }
    }

    /// Moves the windows the watermark passed (plus lateness) out of
    /// memory, to be written as closed.
    fn close_windows(&self, st: &mut State) {
        let Some(watermark) = st.watermark else {
            return;
        };
        let lateness = self.spec.lateness;
        let done: Vec<(i64, String)> = st
            .cells
            .iter()
            .filter(|(_, c)| c.end.saturating_add(lateness) <= watermark)
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            if let Some(cell) = st.cells.remove(&key) {
                let row = self.row(key.0, key.1.clone(), &cell, true);
                st.touched.insert(key);
                st.closed.push(row);
            }
        }
    }

    fn row(&self, start: i64, group: String, cell: &Cell, closed: bool) -> WindowRow {
        let figures = Value::Object(self.figures(cell)).to_string();
        WindowRow {
            start,
            end: cell.end,
            group,
            rows: cell.rows,
            late: cell.late,
            closed,
            figures,
            state: (!closed).then(|| serde_json::to_string(&cell.accs).unwrap_or_default()),
            seq: 0,
            updated_at: jiff::Timestamp::now(),
        }
    }

    /// Writes what changed since the last commit, with the offset counted.
    async fn commit(&self, store: &Store) -> Result<()> {
        let (windows, late_windows, offset, watermark, late, skipped, truncated, snapshot) = {
            let mut st = self.state();
            let offset = st.offset;
            if offset == self.committed_offset.load(Ordering::Acquire)
                && st.closed.is_empty()
                && st.late_closed.is_empty()
                && !st.truncated
            {
                return Ok(());
            }
            let mut windows = std::mem::take(&mut st.closed);
            for ((start, group), cell) in &st.cells {
                if cell.dirty {
                    windows.push(self.row(*start, group.clone(), cell, false));
                }
            }
            let late_windows: Vec<(i64, String, i64)> = st
                .late_closed
                .drain()
                .map(|((s, g), n)| (s, g, n))
                .collect();
            (
                windows,
                late_windows,
                offset,
                st.watermark,
                std::mem::take(&mut st.late),
                std::mem::take(&mut st.skipped),
                std::mem::take(&mut st.truncated),
                std::mem::take(&mut st.snapshot_moved)
                    .then(|| st.snapshot.clone())
                    .flatten(),
            )
        };
        if truncated {
            store
                .reset_aggregate(
                    &self.spec.name,
                    &self.spec.pipeline,
                    &self.spec.definition,
                    self.committed_offset.load(Ordering::Acquire),
                )
                .await?;
        }
        let commit = AggregateCommit {
            name: &self.spec.name,
            buffer_offset: offset,
            watermark,
            late,
            skipped,
            snapshot: snapshot.as_deref(),
            windows: &windows,
            late_windows: &late_windows,
        };
        match store.commit_aggregate(&commit).await {
            Ok(()) => {
                let mut st = self.state();
                for w in windows.iter().filter(|w| !w.closed) {
                    if let Some(cell) = st.cells.get_mut(&(w.start, w.group.clone())) {
                        cell.dirty = false;
                    }
                }
                drop(st);
                self.committed_offset.store(offset, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Put back what was taken so the next commit writes it.
                let mut st = self.state();
                st.late += late;
                st.skipped += skipped;
                st.truncated |= truncated;
                st.snapshot_moved |= snapshot.is_some();
                for w in windows.into_iter().filter(|w| w.closed) {
                    st.closed.push(w);
                }
                for (s, g, n) in late_windows {
                    *st.late_closed.entry((s, g)).or_default() += n;
                }
                Err(e)
            }
        }
    }
}

/// The snapshot a record belongs to (its consistent position), if it is
/// a CDC snapshot row.
fn snapshot_id(position: &caudal_core::record::Position) -> Option<String> {
    use caudal_core::record::Position;
    match position {
        Position::Snapshot { lsn, .. } | Position::SnapshotRow { lsn, .. } => {
            Some(format!("lsn:{lsn}"))
        }
        Position::BinlogSnapshot { file, pos, .. } => Some(format!("binlog:{file}:{pos}")),
        _ => None,
    }
}

/// A row's field: a name, or a dotted path into nested objects.
fn field<'a>(row: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = row.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut current = row.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// Fields aggregates read that are not columns of the tables their
/// pipeline's PostgreSQL source reads (CDC `tables`, or `table`), each
/// with its field path: found before anything runs, with where the
/// configuration says it. Other sources' fields are checked as records
/// arrive (a record without them is skipped, with a warning). A source
/// that cannot be reached now is not checked here (its pipeline says
/// why when it runs).
pub async fn unknown_fields(config: &Config) -> Vec<(Vec<caudal_core::config::PathPart>, String)> {
    use caudal_core::config::{PathPart, SqlDialect};
    let mut problems = Vec::new();
    for (name, agg) in &config.aggregates {
        let Some(source) = config
            .pipelines
            .get(&agg.pipeline)
            .and_then(|p| config.sources.get(&p.source))
        else {
            continue;
        };
        let (Some(sql), Some(SqlDialect::Postgres)) = (source.sql(), source.dialect()) else {
            continue;
        };
        let tables: Vec<String> = match (&sql.tables, &sql.table) {
            (Some(t), _) if source.is_cdc() => t.clone(),
            (_, Some(t)) if sql.query.is_none() => vec![t.clone()],
            _ => continue,
        };
        let columns = match caudal_connectors::sources::sql::table_columns(
            sql.url.expose(),
            &tables,
        )
        .await
        {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(aggregate = %name, error = %e, "cannot read the source's columns to check the aggregate's fields");
                continue;
            }
        };
        let known = |field: &str| {
            let root = field.split('.').next().unwrap_or(field);
            columns.values().any(|cols| cols.iter().any(|c| c == root))
        };
        let listing = || {
            columns
                .iter()
                .map(|(t, cols)| format!("{t} has {}", cols.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let at = |rest: Vec<PathPart>| {
            let mut path = vec![
                PathPart::Key("aggregates".into()),
                PathPart::Key(name.clone()),
            ];
            path.extend(rest);
            path
        };
        for (i, field) in agg.group_by.iter().enumerate() {
            if !known(field) {
                problems.push((
                    at(vec![PathPart::Key("group_by".into()), PathPart::Index(i)]),
                    format!(
                        "{field:?} is not a column of the source's tables ({})",
                        listing()
                    ),
                ));
            }
        }
        if let Some(time) = &agg.time
            && !known(time)
        {
            problems.push((
                at(vec![PathPart::Key("time".into())]),
                format!(
                    "{time:?} is not a column of the source's tables ({})",
                    listing()
                ),
            ));
        }
        for (metric, spec) in &agg.metrics {
            if let Ok(Metric {
                field: Some(field), ..
            }) = Metric::parse(spec)
                && !known(&field)
            {
                problems.push((
                    at(vec![
                        PathPart::Key("metrics".into()),
                        PathPart::Key(metric.clone()),
                    ]),
                    format!(
                        "{field:?} is not a column of the source's tables ({})",
                        listing()
                    ),
                ));
            }
        }
    }
    problems
}
