//! Sending one batch under a sink's delivery policy: rate limit, circuit
//! breaker, concurrency limit, retries with backoff, 413 splits, dead
//! letters. Every sink and every caller (runs, dead-letter replay) goes
//! through here, so there is one retry loop in the product.
//!
//! Outcomes, per record of the batch:
//! - delivered (a success status);
//! - a dead letter with its reason, status, response excerpt and attempts,
//!   when the receiver rejected it, or it alone is too large (413);
//! - neither, when retries gave up or shutdown came first: then the whole
//!   call fails, nothing is marked delivered, and the caller keeps the
//!   batch (the checkpoint does not move past it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caudal_core::config::DeliveryConfig;
use caudal_core::delivery::{Outcome, RetryPolicy, split_batch};
use caudal_core::sink::{Batch, Delivery, Event, Sink};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::{NewDeadLetter, Store};
use tokio_util::sync::CancellationToken;

use crate::delivery::{BreakerState, CircuitBreaker, ConcurrencyLimit, RateLimiter};

/// Pause before retrying a failed state-store write of dead letters.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Live delivery figures of a sink.
#[derive(Debug, Default)]
pub struct SendStats {
    pub retries: AtomicU64,
    pub dead_letters: AtomicU64,
}

/// A sink with its delivery policy. Cheap to clone; clones share the
/// breaker, limits and figures.
#[derive(Clone)]
pub struct Sender {
    pipeline: String,
    /// The sink's name, for metric labels.
    sink_name: String,
    sink: Arc<dyn Sink>,
    store: Store,
    retry: RetryPolicy,
    breaker: CircuitBreaker,
    limiter: Arc<RateLimiter>,
    concurrency: ConcurrencyLimit,
    stats: Arc<SendStats>,
    /// Sending dead letters again: a record refused again is a new letter
    /// (the one replayed is marked replayed), not the pending one.
    replaying: bool,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("pipeline", &self.pipeline)
            .field("breaker", &self.breaker.state().as_str())
            .finish_non_exhaustive()
    }
}

/// What happened to a batch that was finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub delivered: u64,
    pub dead_letters: u64,
}

impl Sender {
    pub fn new(
        pipeline: &str,
        sink_name: &str,
        sink: Arc<dyn Sink>,
        config: &DeliveryConfig,
        store: Store,
    ) -> Self {
        let breaker = if config.circuit_breaker.enabled {
            CircuitBreaker::new(&config.circuit_breaker)
        } else {
            CircuitBreaker::disabled()
        };
        Self {
            pipeline: pipeline.to_string(),
            sink_name: sink_name.to_string(),
            sink,
            store,
            retry: RetryPolicy::from_config(&config.retry),
            breaker,
            limiter: Arc::new(RateLimiter::new(&config.rate_limit)),
            concurrency: ConcurrencyLimit::new(&config.concurrency),
            stats: Arc::default(),
            replaying: false,
        }
    }

    /// This sender for replaying dead letters: what is refused again is
    /// kept as new letters. Outside a replay, a batch refused again (sent
    /// again after a crash) keeps its pending letters once.
    pub fn for_replay(&self) -> Self {
        Self {
            replaying: true,
            ..self.clone()
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Requests the sink may have in flight now (the adaptive limit as it
    /// stands, or the fixed number).
    pub fn concurrency_limit(&self) -> u32 {
        self.concurrency.current()
    }

    pub fn stats(&self) -> &SendStats {
        &self.stats
    }

    /// Sends `events` as one batch with idempotency key `key`, to the end
    /// (see the module docs). Fails with [`ErrorKind::Unavailable`] when
    /// retries gave up, [`ErrorKind::Cancelled`] on shutdown.
    pub async fn send(
        &self,
        key: &str,
        events: Vec<Event>,
        stop: &CancellationToken,
    ) -> Result<Sent> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "deliver",
            pipeline = %self.pipeline,
            sink = %self.sink_name,
            batch = key,
            records = events.len(),
            position = events.last().map(|e| e.position.display()).unwrap_or_default(),
            outcome = tracing::field::Empty,
        );
        let result = self
            .send_all(key, events, stop)
            .instrument(span.clone())
            .await;
        span.record(
            "outcome",
            match &result {
                Ok(s) if s.dead_letters > 0 && s.delivered == 0 => "rejected",
                Ok(s) if s.dead_letters > 0 => "partly rejected",
                Ok(_) => "delivered",
                Err(e) if e.kind() == ErrorKind::Cancelled => "cancelled",
                Err(_) => "failed",
            },
        );
        result
    }

    async fn send_all(
        &self,
        key: &str,
        events: Vec<Event>,
        stop: &CancellationToken,
    ) -> Result<Sent> {
        let mut sent = Sent::default();
        let mut work: VecDeque<(String, Vec<Event>)> = VecDeque::from([(key.to_string(), events)]);
        while let Some((key, events)) = work.pop_front() {
            let mut attempts: u32 = 0;
            let mut first: Option<(jiff::Timestamp, tokio::time::Instant)> = None;
            loop {
                let cancelled = || {
                    Error::new(
                        ErrorKind::Cancelled,
                        "shutdown before the batch was delivered",
                    )
                };
                if stop.is_cancelled() {
                    return Err(cancelled());
                }
                let breaker = tokio::select! {
                    () = stop.cancelled() => return Err(cancelled()),
                    permit = self.breaker.acquire() => permit,
                };
                // Shutdown while waiting for a turn sends nothing new.
                let permit = tokio::select! {
                    () = stop.cancelled() => return Err(cancelled()),
                    permit = self.concurrency.acquire() => permit,
                };
                tokio::select! {
                    () = stop.cancelled() => return Err(cancelled()),
                    () = self.limiter.acquire(u32::try_from(events.len()).unwrap_or(u32::MAX)) => {}
                }
                let started = tokio::time::Instant::now();
                let (first_at, first_instant) =
                    *first.get_or_insert((jiff::Timestamp::now(), started));
                attempts += 1;
                // A request in flight is allowed to finish (bounded by the
                // sink's timeout): shutdown stops retries, not answers.
                let answer = self
                    .sink
                    .deliver(Batch {
                        pipeline: &self.pipeline,
                        key: &key,
                        events: &events,
                    })
                    .await;
                let outcome = Outcome::of(&answer);
                breaker.record(outcome);
                permit.done(outcome, started.elapsed());
                let labels = [
                    ("pipeline", self.pipeline.clone()),
                    ("sink", self.sink_name.clone()),
                ];
                metrics::histogram!("caudal_sink_request_duration_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                let kind = match &answer {
                    Delivery::Delivered { .. } => "delivered",
                    Delivery::Retry { .. } => "retry",
                    Delivery::Rejected { .. } => "rejected",
                    Delivery::Split { .. } => "split",
                };
                metrics::counter!("caudal_sink_requests_total", "pipeline" => self.pipeline.clone(), "sink" => self.sink_name.clone(), "outcome" => kind)
                    .increment(1);
                metrics::gauge!("caudal_sink_circuit_state", &labels).set(
                    match self.breaker.state().as_str() {
                        "closed" => 0.0,
                        "half_open" => 1.0,
                        _ => 2.0,
                    },
                );
                match answer {
                    Delivery::Delivered { .. } => {
                        sent.delivered += events.len() as u64;
                        metrics::counter!("caudal_records_delivered_total", &labels)
                            .increment(events.len() as u64);
                        metrics::counter!("caudal_batches_total", "pipeline" => self.pipeline.clone(), "sink" => self.sink_name.clone(), "outcome" => "delivered")
                            .increment(1);
                        break;
                    }
                    Delivery::Retry { reason, after, .. } => {
                        if self.retry.should_give_up(attempts, first_instant.elapsed()) {
                            return Err(Error::new(
                                ErrorKind::Unavailable,
                                format!(
                                    "batch {key} of {} records not delivered, gave up after {attempts} attempts: {reason}",
                                    events.len()
                                ),
                            ));
                        }
                        let wait = self.retry.delay(attempts - 1, after, &mut rand::rng());
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("caudal_sink_retries_total", &labels).increment(1);
                        tracing::warn!(
                            pipeline = %self.pipeline, batch = %key, attempt = attempts,
                            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), %reason,
                            "delivery failed; retrying"
                        );
                        tokio::select! {
                            () = stop.cancelled() => return Err(cancelled()),
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                    Delivery::Rejected {
                        reason,
                        status,
                        body_excerpt,
                    } => {
                        tracing::error!(pipeline = %self.pipeline, batch = %key, %reason, "batch rejected; records kept as dead letters");
                        let letter = (reason, status, body_excerpt);
                        sent.dead_letters +=
                            self.dead(&key, &events, letter, attempts, first_at).await;
                        break;
                    }
                    Delivery::Split {
                        reason,
                        status,
                        body_excerpt,
                    } => {
                        if let Some((a, b)) = split_batch(events.clone()) {
                            tracing::info!(pipeline = %self.pipeline, batch = %key, records = events.len(), "receiver found the batch too large; sending it in halves");
                            // The halves go first, in order, before anything after them.
                            work.push_front((format!("{key}.1"), b));
                            work.push_front((format!("{key}.0"), a));
                        } else {
                            let reason =
                                format!("the record alone is too large for the receiver: {reason}");
                            let letter = (reason, status, body_excerpt);
                            sent.dead_letters +=
                                self.dead(&key, &events, letter, attempts, first_at).await;
                        }
                        break;
                    }
                }
            }
        }
        Ok(sent)
    }

    /// Stores the events as dead letters, retrying the store until it
    /// works: a rejected record is never dropped.
    /// `letter` is the reason, the status and the response excerpt.
    async fn dead(
        &self,
        key: &str,
        events: &[Event],
        letter: (String, Option<u16>, String),
        attempts: u32,
        first: jiff::Timestamp,
    ) -> u64 {
        let (reason, status, excerpt) = letter;
        let now = jiff::Timestamp::now();
        let letters: Vec<NewDeadLetter> = events
            .iter()
            .map(|e| NewDeadLetter {
                status,
                response_excerpt: (!excerpt.is_empty()).then(|| excerpt.clone()),
                attempts,
                first_attempt_at: Some(first),
                last_attempt_at: Some(now),
                ..NewDeadLetter::of_event(&self.pipeline, key, e, reason.clone())
            })
            .collect();
        loop {
            let stored = if self.replaying {
                self.store.add_dead_letters(&self.pipeline, &letters).await
            } else {
                self.store
                    .add_dead_letters_once(&self.pipeline, &letters)
                    .await
            };
            match stored {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(pipeline = %self.pipeline, error = %e.report(), "cannot store dead letters yet; retrying");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
        let n = letters.len() as u64;
        self.stats.dead_letters.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("caudal_records_rejected_total", "pipeline" => self.pipeline.clone(), "sink" => self.sink_name.clone(), "reason" => "sink")
            .increment(n);
        metrics::counter!("caudal_batches_total", "pipeline" => self.pipeline.clone(), "sink" => self.sink_name.clone(), "outcome" => "rejected")
            .increment(1);
        n
    }
}
