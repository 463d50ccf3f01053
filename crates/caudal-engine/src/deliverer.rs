//! The delivery side of a pipeline: reads batches from the durable buffer
//! and sends them through the sink's policy, several at once when the sink
//! allows it, keeping order per key.
//!
//! Promises:
//! - **Order per key.** A batch is dispatched only when none of its keys is
//!   in a batch still in flight (sending or retrying) or in an earlier batch
//!   still waiting ([`KeyGate`]); batches sharing no key go ahead of a stuck
//!   one. Batches without keys are not ordered against each other.
//! - **Acknowledged up to the first unfinished batch.** Batches finish out of
//!   order; the buffer (and with `ack = "delivered"` the checkpoint, saved
//!   first) moves only up to the first batch not yet delivered or kept as
//!   dead letters ([`Watermark`]). A crash resends from there with the same
//!   batches and keys.
//! - **Only released entries.** Entries are read only below the offset the
//!   intake released (see [`crate::buffered`]), so the buffer is never
//!   acknowledged past what the checkpoint covers.
//! - **Shutdown.** On stop nothing new is dispatched; requests in flight
//!   finish (the sender stops their retries), then it returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caudal_buffer::Buffer;
use caudal_core::config::AckMode;
use caudal_core::record::Position;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::buffered::{Entry, Recent, buffer_error};
use crate::ordering::{KeyGate, Watermark};
use crate::send::{Sender, Sent};

/// How often finished batches are acknowledged (buffer, checkpoint with
/// `ack = "delivered"`, run counters) and the breaker state is saved for
/// `caudal status`. Acknowledging in rounds instead of per batch saves two
/// fsyncs and a store commit per batch; a crash resends at most one round,
/// with the same keys.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Batches read from the buffer beyond those in flight.
const READ_AHEAD: usize = 4;

/// Totals of a pipeline's delivery since the process started.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub delivered: AtomicU64,
    pub dead_letters: AtomicU64,
    pub batches: AtomicU64,
}

impl DeliveryStats {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

/// Everything one pipeline's delivery needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Deliverer {
    pub(crate) pipeline: String,
    pub(crate) buffer: Buffer,
    pub(crate) sender: Sender,
    pub(crate) store: Store,
    pub(crate) ack: AckMode,
    /// Entries below this offset may be delivered.
    pub(crate) released: watch::Receiver<u64>,
    /// With live aggregates: the buffer is acknowledged only below what
    /// they counted too.
    pub(crate) gate: Option<Arc<crate::aggregate::AckGate>>,
    /// A broker source read with `ack = "delivered"`: told each position
    /// delivered, so the broker may forget the messages up to it.
    pub(crate) delivered_to:
        Option<Arc<std::sync::Mutex<Option<caudal_connectors::sources::cdc::Durable>>>>,
    /// Batches dispatched at once (the sink's concurrency, or its adaptive
    /// maximum; the sender's limit decides how many are really sent).
    pub(crate) max_in_flight: usize,
    pub(crate) stats: Arc<DeliveryStats>,
    /// Batches the intake just appended, to skip reading them back.
    pub(crate) recent: Arc<Recent>,
    /// In a cluster: the fence checkpoint writes carry while this node
    /// owns the pipeline.
    pub(crate) ownership: crate::pipeline::Ownership,
}

/// A batch dispatched and not yet finished.
struct InFlight {
    keys: Vec<String>,
    run: i64,
}

/// Finished work not yet acknowledged.
#[derive(Default)]
struct Unflushed {
    /// The watermark to acknowledge the buffer up to.
    upto: Option<u64>,
    /// Source positions of entries read and not yet acknowledged.
    positions: BTreeMap<u64, Position>,
    /// Batches finished and not yet acknowledged: the run that read each,
    /// and what became of its records. Counted once acknowledged, so a
    /// batch finished past a stuck one and sent again later counts once.
    finished: BTreeMap<u64, (i64, Sent)>,
    /// The circuit state last saved.
    circuit: String,
}

/// Takes a batch read from the buffer (or handed over in memory) into the
/// key gate.
fn accept(
    offset: u64,
    entry: Entry,
    gate: &mut KeyGate,
    waiting: &mut HashMap<u64, Entry>,
    unflushed: &mut Unflushed,
) {
    unflushed.positions.insert(offset, entry.position.clone());
    gate.offer(offset, entry.keys());
    waiting.insert(offset, entry);
}

impl Deliverer {
    /// Delivers until `stop`, or, once `drain_to` holds an offset, until
    /// every entry below it is finished. Fails when a batch's retries gave
    /// up (the batch stays in the buffer) or the buffer or the store fails.
    pub async fn run(
        &self,
        stop: &CancellationToken,
        mut drain_to: watch::Receiver<Option<u64>>,
    ) -> Result<()> {
        let mut released = self.released.clone();
        let start = match &self.gate {
            Some(gate) => gate.resume_at(self.buffer.acked()),
            None => self.buffer.acked(),
        };
        let mut next_read = start;
        let mut watermark = Watermark::new(start);
        let mut gate = KeyGate::new();
        let mut waiting: HashMap<u64, Entry> = HashMap::new();
        let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
        let mut unflushed = Unflushed::default();
        let mut tasks: JoinSet<(u64, Result<Sent>)> = JoinSet::new();
        // Decoded batches kept ahead of dispatch, so the key gate can find
        // one that is free while others wait on a busy key.
        let read_ahead = self.max_in_flight + READ_AHEAD;
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut released_open = true;
        let mut failure: Option<Error> = None;
        let mut stopping = false;
        loop {
            if failure.is_none() && !stopping {
                let limit = *released.borrow();
                while next_read < limit && waiting.len() + in_flight.len() < read_ahead {
                    let Some(entry) = self.recent.take(next_read) else {
                        break;
                    };
                    accept(next_read, entry, &mut gate, &mut waiting, &mut unflushed);
                    next_read += 1;
                }
                while in_flight.len() < self.max_in_flight {
                    let Some(offset) = gate.next_ready() else {
                        break;
                    };
                    let Some(entry) = waiting.remove(&offset) else {
                        continue;
                    };
                    let sender = self.sender.clone();
                    let stop = stop.clone();
                    in_flight.insert(
                        offset,
                        InFlight {
                            keys: entry.keys(),
                            run: entry.run,
                        },
                    );
                    tasks.spawn(async move {
                        if entry.events.is_empty() {
                            return (offset, Ok(Sent::default()));
                        }
                        (offset, sender.send(&entry.key, entry.events, &stop).await)
                    });
                }
            }
            if tasks.is_empty() {
                let drained = drain_to.borrow().is_some_and(|end| watermark.get() >= end);
                if failure.is_some() || stopping || drained {
                    let flushed = self.flush(&mut unflushed).await;
                    if let Some(e) = failure.take() {
                        return Err(e);
                    }
                    flushed?;
                    if stopping {
                        return Err(Error::new(
                            ErrorKind::Cancelled,
                            "shutdown before the buffer was delivered",
                        ));
                    }
                    return Ok(());
                }
            }
            let limit = *released.borrow();
            let room = read_ahead.saturating_sub(waiting.len() + in_flight.len());
            let can_read = failure.is_none() && !stopping && next_read < limit && room > 0;
            let want =
                room.min(usize::try_from(limit.saturating_sub(next_read)).unwrap_or(usize::MAX));
            tokio::select! {
                biased;
                () = stop.cancelled(), if !stopping => stopping = true,
                Some(done) = tasks.join_next() => {
                    let (offset, sent) = done.map_err(|e| {
                        Error::with_source(ErrorKind::Internal, "a delivery task failed", e)
                    })?;
                    let Some(flight) = in_flight.remove(&offset) else { continue };
                    match sent {
                        Ok(sent) => {
                            gate.finished(&flight.keys);
                            unflushed.finished.insert(offset, (flight.run, sent));
                            if let Some(upto) = watermark.finish(offset) {
                                unflushed.upto = Some(upto);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Cancelled => stopping = true,
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                read = self.buffer.read(next_read, want), if can_read => {
                    let read = read.map_err(|e| buffer_error(&self.pipeline, e))?;
                    for (offset, bytes) in read {
                        let entry = Entry::decode(offset, &bytes)?;
                        accept(offset, entry, &mut gate, &mut waiting, &mut unflushed);
                        next_read = offset + 1;
                    }
                }
                changed = released.changed(), if !can_read && released_open => {
                    released_open = changed.is_ok();
                }
                _ = drain_to.changed(), if drain_to.borrow().is_none() => {}
                _ = tick.tick() => {
                    if let Err(e) = self.flush(&mut unflushed).await {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
    }

    /// Acknowledges what finished since the last flush: with `ack =
    /// "delivered"` first the checkpoint, then the buffer, up to the
    /// watermark; adds delivered records to their runs; saves the breaker
    /// state when it changed.
    async fn flush(&self, done: &mut Unflushed) -> Result<()> {
        self.report_circuit(&mut done.circuit).await;
        let Some(upto) = done.upto else {
            return Ok(());
        };
        if self.ack == AckMode::Delivered
            && let Some((_, position)) = done.positions.range(..upto).next_back()
        {
            let value = serde_json::to_value(position).map_err(|e| {
                Error::with_source(ErrorKind::Internal, "cannot encode a position", e)
            })?;
            let fence = self
                .ownership
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(|(fence, _)| fence.clone());
            self.store
                .save_checkpoint_fenced(&self.pipeline, &value, fence.as_ref())
                .await?;
        }
        if self.ack == AckMode::Delivered
            && let Some(to) = &self.delivered_to
            && let Some((_, position)) = done.positions.range(..upto).next_back()
            && let Some(durable) = to
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
        {
            durable.mark(position);
        }
        let ackable = self.gate.as_ref().map_or(upto, |g| g.delivered(upto));
        self.buffer
            .ack(ackable)
            .await
            .map_err(|e| buffer_error(&self.pipeline, e))?;
        done.positions = done.positions.split_off(&upto);
        done.upto = None;
        let pending = done.finished.split_off(&upto);
        let acknowledged = std::mem::replace(&mut done.finished, pending);
        let mut per_run: BTreeMap<i64, u64> = BTreeMap::new();
        for (run, sent) in acknowledged.into_values() {
            self.stats
                .delivered
                .fetch_add(sent.delivered, Ordering::Relaxed);
            self.stats
                .dead_letters
                .fetch_add(sent.dead_letters, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            *per_run.entry(run).or_default() += sent.delivered;
        }
        for (run, n) in per_run {
            if n > 0
                && let Err(e) = self.store.add_run_delivered(run, n).await
            {
                tracing::warn!(pipeline = %self.pipeline, run, error = %e.report(), "cannot count delivered rows on their run");
            }
        }
        Ok(())
    }

    /// Saves the breaker state for `caudal status` when it changed.
    async fn report_circuit(&self, last: &mut String) {
        let state = self.sender.breaker_state().as_str();
        if state == last {
            return;
        }
        match self.store.set_circuit_state(&self.pipeline, state).await {
            Ok(()) => {
                if !last.is_empty() {
                    tracing::info!(pipeline = %self.pipeline, circuit = state, "circuit breaker changed state");
                }
                *last = state.to_string();
            }
            Err(e) => {
                tracing::warn!(pipeline = %self.pipeline, error = %e.report(), "cannot save the circuit state")
            }
        }
    }
}
