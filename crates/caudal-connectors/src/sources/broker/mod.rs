//! Broker sources: messages of a RabbitMQ queue, a JetStream durable
//! consumer or a Kafka consumer group, as records.
//!
//! Promises:
//! - A message is acknowledged to its broker only once the pipeline
//!   reports its record (or one read after it) durable in the buffer, or
//!   delivered with `ack = "delivered"`; a crash before that leaves it
//!   with the broker, which delivers it again (to this process or to
//!   another consumer), with the same record id.
//! - Several processes naming the same queue / durable consumer / group
//!   share the messages (competing consumers); which of them keep one
//!   key's order is documented per broker in docs/brokers.md.
//! - A stopped session acknowledges what was reported durable last and
//!   closes its connection cleanly before the reader reports itself
//!   closed, so a clean stop leaves no durable message to be delivered
//!   again.
//! - A lost connection is reopened with backoff (1 s doubling to 30 s);
//!   messages read before it and not yet acknowledged are delivered again
//!   by the broker. The connection state is kept for status and metrics.
//!
//! Each broker is a cargo feature (`rabbitmq`, `nats`, `kafka`); a
//! configuration naming one this build lacks is refused with the
//! feature's name.

// A build without any broker refuses broker sources when they are built;
// the machinery below is then unused.
#![cfg_attr(
    not(any(feature = "rabbitmq", feature = "nats", feature = "kafka")),
    allow(dead_code, unused_imports)
)]

#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "nats")]
mod nats_partitions;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use caudal_core::config::SourceConfig;
use caudal_core::record::{Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::sources::change::CdcReader;
#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
use crate::sources::change::spawn_reader;

/// Records per page a broker reader hands to the pipeline at most.
pub const PAGE_MAX: usize = 1000;
/// First pause before reconnecting.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest pause before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest wait for the broker to take the last acknowledgements when a
/// session stops.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// The connection state of a broker source, for status and metrics.
pub use caudal_core::status::BrokerStatus as BrokerState;

/// The broker source of a pipeline. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BrokerSource(Arc<Inner>);

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) pipeline: String,
    pub(crate) name: String,
    pub(crate) config: SourceConfig,
    pub(crate) state: Mutex<BrokerState>,
}

impl Inner {
    pub(crate) fn update(&self, f: impl FnOnce(&mut BrokerState)) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state);
    }
}

impl BrokerSource {
    /// The broker source `name` of `pipeline` (nothing is connected until
    /// a run opens).
    pub fn new(pipeline: &str, name: &str, config: &SourceConfig) -> Result<Self> {
        let broker = config.type_name();
        let built = match config {
            SourceConfig::Rabbitmq(_) => cfg!(feature = "rabbitmq"),
            SourceConfig::Nats(_) => cfg!(feature = "nats"),
            SourceConfig::Kafka(_) => cfg!(feature = "kafka"),
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("source {name:?} is not a message broker"),
                ));
            }
        };
        if !built {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {name:?}: this caudal was built without {broker} support \
                     (cargo feature `{broker}`)"
                ),
            ));
        }
        Ok(Self(Arc::new(Inner {
            pipeline: pipeline.to_string(),
            name: name.to_string(),
            config: config.clone(),
            state: Mutex::new(BrokerState {
                broker: broker.to_string(),
                ..BrokerState::default()
            }),
        })))
    }

    /// The connection state now.
    pub fn state(&self) -> BrokerState {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `caudal doctor`'s look at the broker: connects and looks the queue,
    /// stream and consumer, or topics up, each step within `timeout`.
    /// Consumes, acknowledges and creates nothing.
    pub async fn probe(&self, timeout: Duration) -> Vec<caudal_core::probe::Finding> {
        use caudal_core::probe::Finding;
        let looked = tokio::time::timeout(timeout, async {
            match &self.0.config {
                #[cfg(feature = "rabbitmq")]
                SourceConfig::Rabbitmq(c) => rabbitmq::probe(c).await,
                #[cfg(feature = "nats")]
                SourceConfig::Nats(c) => nats::probe(c).await,
                #[cfg(feature = "kafka")]
                SourceConfig::Kafka(c) => kafka::probe(c, timeout).await,
                // `new` refuses every broker this build lacks.
                _ => Vec::new(),
            }
        })
        .await;
        looked.unwrap_or_else(|_| {
            vec![Finding::fail(
                "connect",
                format!(
                    "the {} broker did not answer within {timeout:?}",
                    self.0.config.type_name()
                ),
                "check the source's address, that the broker runs, and firewalls between here \
                 and it",
            )]
        })
    }

    /// Starts consuming: pages of records until stopped. The pipeline
    /// reports durable positions through the reader's
    /// [`durable`](CdcReader::durable) handle; messages up to each are
    /// acknowledged to the broker. With `meta_field`, each record carries
    /// its message's metadata under that name.
    pub fn open_run(&self, meta_field: Option<String>) -> CdcReader {
        let (tx, rx) = mpsc::channel(2);
        let (durable_tx, durable) = watch::channel(None);
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        #[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
        {
            let session = consume(
                self.0.clone(),
                tx.clone(),
                durable,
                stop.clone(),
                meta_field,
            );
            let ended = closed.clone().drop_guard();
            spawn_reader(
                async move {
                    let _ended = ended;
                    session.await;
                },
                tx,
            );
        }
        // `new` refuses every broker this build lacks: nothing to read.
        #[cfg(not(any(feature = "rabbitmq", feature = "nats", feature = "kafka")))]
        drop((tx, durable, meta_field, closed.clone().drop_guard()));
        CdcReader::new(rx, durable_tx, stop, false).with_closed(closed)
    }
}

#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
/// What a broker session needs: where pages go, what is durable, when to
/// stop, and the field metadata goes in.
pub(crate) struct Session<'a> {
    pub(crate) source: &'a Inner,
    pub(crate) out: &'a mpsc::Sender<Result<Vec<Record>>>,
    pub(crate) durable: &'a mut watch::Receiver<Option<Position>>,
    pub(crate) stop: &'a CancellationToken,
    pub(crate) meta_field: Option<&'a str>,
}

#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
/// How a session ended.
pub(crate) enum Ended {
    /// Stopped, or the pipeline stopped reading.
    Stopped,
    /// The connection failed; reconnect.
    Lost(String),
}

#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
async fn consume(
    source: Arc<Inner>,
    out: mpsc::Sender<Result<Vec<Record>>>,
    mut durable: watch::Receiver<Option<Position>>,
    stop: CancellationToken,
    meta_field: Option<String>,
) {
    let mut backoff = BACKOFF_START;
    #[cfg(feature = "rabbitmq")]
    let mut rabbit = rabbitmq::Ledger::default();
    #[cfg(feature = "nats")]
    let mut nats = nats::Ledger::default();
    #[cfg(feature = "kafka")]
    let mut kafka = kafka::Ledger::default();
    loop {
        let session = Session {
            source: &source,
            out: &out,
            durable: &mut durable,
            stop: &stop,
            meta_field: meta_field.as_deref(),
        };
        let started = std::time::Instant::now();
        #[allow(unreachable_code)]
        let ended = match &source.config {
            #[cfg(feature = "rabbitmq")]
            SourceConfig::Rabbitmq(c) => rabbitmq::session(session, c, &mut rabbit).await,
            #[cfg(feature = "nats")]
            SourceConfig::Nats(c) => nats::session(session, c, &mut nats).await,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => kafka::session(session, c, &mut kafka).await,
            _ => {
                let _ = session;
                let _ = out
                    .send(Err(Error::new(
                        ErrorKind::Config,
                        format!("source {:?}: not a broker this build reads", source.name),
                    )))
                    .await;
                return;
            }
        };
        source.update(|s| s.connected = false);
        match ended {
            Ended::Stopped => return,
            Ended::Lost(why) => {
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_START;
                }
                tracing::warn!(
                    pipeline = %source.pipeline, source = %source.name, error = %why,
                    retry_in_s = backoff.as_secs(),
                    "broker connection lost; unacknowledged messages will be delivered again"
                );
                source.update(|s| s.last_error = Some(why));
                metrics::counter!("caudal_broker_reconnects_total", "pipeline" => source.pipeline.clone())
                    .increment(1);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
impl Session<'_> {
    /// Sends a page; false when the pipeline stopped reading.
    pub(crate) async fn send(&self, page: Vec<Record>) -> bool {
        if page.is_empty() {
            return true;
        }
        let n = page.len() as u64;
        self.source.update(|s| {
            s.consumed += n;
        });
        tokio::select! {
            () = self.stop.cancelled() => false,
            sent = self.out.send(Ok(page)) => sent.is_ok(),
        }
    }

    /// Marks the session connected.
    pub(crate) fn connected(&self) {
        self.source.update(|s| {
            s.connected = true;
            s.connects += 1;
            s.last_error = None;
        });
        tracing::info!(pipeline = %self.source.pipeline, source = %self.source.name, "broker consumer connected");
    }
}

#[cfg(any(feature = "rabbitmq", feature = "nats", feature = "kafka"))]
/// A broker URL without its password, for messages.
pub(crate) fn shown(url: &str) -> String {
    caudal_core::units::redact_url(url)
}
