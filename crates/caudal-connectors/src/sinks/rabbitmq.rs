//! The RabbitMQ sink: each record of a batch becomes one persistent
//! message on an exchange, published with `mandatory` on a channel in
//! confirm mode.
//!
//! Promises:
//! - A batch is delivered only when the broker has confirmed every one of
//!   its messages (publisher confirms); a nack, a lost connection or a
//!   confirm that does not come within `timeout` is a temporary failure,
//!   and the whole batch is published again with the same message ids.
//! - Messages of a batch are published in order on one channel, so one
//!   key's records reach a queue in order.
//! - A message the exchange cannot route (no queue bound, a queue deleted)
//!   is returned by the broker: the batch is refused with the exchange and
//!   routing key in the reason and goes to dead letters, never dropped.
//! - The connection is opened on first use and again after any failure.

use std::time::Duration;

use caudal_core::Result;
use caudal_core::config::{RabbitmqDeclare, RabbitmqSinkConfig};
use caudal_core::sink::{Batch, Delivery, Sink};
use caudal_core::units::redact_url;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::broker::{Route, identity_headers};

/// A configured RabbitMQ exchange.
#[derive(Debug)]
pub struct RabbitmqSink {
    name: String,
    url: String,
    exchange: String,
    route: Route,
    declare: Option<RabbitmqDeclare>,
    partitions: u32,
    timeout: Duration,
    link: tokio::sync::Mutex<Option<Link>>,
}

/// An open connection and its confirm-mode channel.
#[derive(Debug)]
struct Link {
    _connection: Connection,
    channel: Channel,
    /// Which connection this is (a failure resets only the one it hit).
    generation: u64,
}

impl RabbitmqSink {
    /// Builds the sink (nothing is connected until the first batch).
    pub fn new(name: &str, config: &RabbitmqSinkConfig) -> Result<Self> {
        // Without a routing key, messages go where the declared queue is
        // bound: its binding key (or its name), per partition.
        let declared = config.declare.as_ref().and_then(|d| {
            d.queue.as_deref().map(|q| {
                d.binding_key
                    .as_deref()
                    .filter(|_| !config.exchange.is_empty())
                    .unwrap_or(q)
            })
        });
        let default_key = match declared {
            Some(queue) if config.partitions > 1 => format!("{queue}.{{{{ partition }}}}"),
            Some(queue) => queue.to_string(),
            None => String::new(),
        };
        let routing_key = config.routing_key.clone().unwrap_or(default_key);
        Ok(Self {
            name: name.to_string(),
            url: config.url.expose().to_string(),
            exchange: config.exchange.clone(),
            route: Route::new(name, "routing_key", &routing_key, config.partitions)?,
            declare: config.declare.clone(),
            partitions: config.partitions.max(1),
            timeout: config.timeout.as_std(),
            link: tokio::sync::Mutex::new(None),
        })
    }

    /// The channel to publish on, connecting (and declaring) first when
    /// there is none.
    async fn channel(&self) -> std::result::Result<(Channel, u64), String> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.channel.status().connected()
        {
            return Ok((l.channel.clone(), l.generation));
        }
        let generation = link.as_ref().map_or(1, |l| l.generation + 1);
        let connect = async {
            let connection = Connection::connect(&self.url, ConnectionProperties::default())
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
            if let Some(declare) = &self.declare {
                declare_topology(&channel, &self.exchange, declare, self.partitions).await?;
            }
            Ok::<_, String>((connection, channel))
        };
        let (connection, channel) = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| format!("connecting took longer than {:?}", self.timeout))??;
        *link = Some(Link {
            _connection: connection,
            channel: channel.clone(),
            generation,
        });
        Ok((channel, generation))
    }

    /// Whether the broker can be reached and the exchange exists, without
    /// publishing (`caudal doctor`): connects, opens a channel, and
    /// declares the exchange passively (which fails when it is missing).
    pub async fn probe(&self) -> Vec<caudal_core::probe::Finding> {
        use caudal_core::probe::Finding;
        let url = redact_url(&self.url);
        let connected = tokio::time::timeout(self.timeout, async {
            let connection = Connection::connect(&self.url, ConnectionProperties::default())
                .await
                .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel on {url}: {e}"))?;
            Ok::<_, String>((connection, channel))
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "connecting to {url} took longer than {:?}",
                self.timeout
            ))
        });
        let (connection, channel) = match connected {
            Ok(both) => both,
            Err(why) => {
                return vec![Finding::fail(
                    "connect",
                    why,
                    "check the url's host, port, user and password (and vhost), and that \
                     RabbitMQ runs",
                )];
            }
        };
        let mut out = vec![Finding::ok("connect", format!("connected to {url}"))];
        let declares = self
            .declare
            .as_ref()
            .is_some_and(|d| d.exchange_type.is_some());
        if self.exchange.is_empty() {
            out.push(Finding::ok(
                "exchange",
                "the default exchange (messages go to the queue named by the routing key)",
            ));
        } else {
            let passive = channel
                .exchange_declare(
                    ShortString::from(self.exchange.as_str()),
                    lapin::ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            out.push(match passive {
                Ok(()) => Finding::ok("exchange", format!("exchange {:?} exists", self.exchange)),
                Err(_) if declares => Finding::ok(
                    "exchange",
                    format!(
                        "exchange {:?} does not exist yet: the first delivery declares it",
                        self.exchange
                    ),
                ),
                Err(e) => Finding::fail(
                    "exchange",
                    format!("exchange {:?} is not usable: {e}", self.exchange),
                    format!(
                        "declare exchange {:?} on the broker, or set `declare` on the sink so \
                         caudal declares it",
                        self.exchange
                    ),
                ),
            });
        }
        let _ = connection.close(200, "doctor done".into()).await;
        out
    }

    /// Forgets connection `generation` after a failure on it.
    async fn reset(&self, generation: u64) {
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| l.generation == generation) {
            *link = None;
        }
    }

    fn retry(&self, why: String) -> Delivery {
        Delivery::Retry {
            reason: format!(
                "RabbitMQ {} (sink {:?}): {why}",
                redact_url(&self.url),
                self.name
            ),
            status: None,
            after: None,
        }
    }
}

/// Declares the exchange, the queue(s) and their bindings (durable;
/// declaring what exists with the same settings is a no-op).
async fn declare_topology(
    channel: &Channel,
    exchange: &str,
    declare: &RabbitmqDeclare,
    partitions: u32,
) -> std::result::Result<(), String> {
    if let Some(kind) = &declare.exchange_type
        && !exchange.is_empty()
    {
        let kind = match kind.as_str() {
            "topic" => lapin::ExchangeKind::Topic,
            "fanout" => lapin::ExchangeKind::Fanout,
            "headers" => lapin::ExchangeKind::Headers,
            _ => lapin::ExchangeKind::Direct,
        };
        channel
            .exchange_declare(
                ShortString::from(exchange),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot declare exchange {exchange:?}: {e}"))?;
    }
    let Some(queue) = &declare.queue else {
        return Ok(());
    };
    for (name, binding) in queue_names(queue, declare.binding_key.as_deref(), partitions) {
        declare_queue(channel, &name, declare.single_active_consumer).await?;
        if !exchange.is_empty() {
            channel
                .queue_bind(
                    ShortString::from(name.as_str()),
                    ShortString::from(exchange),
                    ShortString::from(binding.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot bind queue {name:?} to {exchange:?}: {e}"))?;
        }
    }
    Ok(())
}

/// The queues of `queue` with `partitions` and their binding keys:
/// `queue` itself, or `queue.0` … bound by `binding.0` ….
pub fn queue_names(queue: &str, binding: Option<&str>, partitions: u32) -> Vec<(String, String)> {
    let binding = binding.unwrap_or(queue);
    if partitions <= 1 {
        return vec![(queue.to_string(), binding.to_string())];
    }
    (0..partitions)
        .map(|i| (format!("{queue}.{i}"), format!("{binding}.{i}")))
        .collect()
}

/// Declares one durable queue (single-active-consumer when asked).
pub async fn declare_queue(
    channel: &Channel,
    name: &str,
    single_active_consumer: bool,
) -> std::result::Result<(), String> {
    let mut arguments = FieldTable::default();
    if single_active_consumer {
        arguments.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot declare queue {name:?}: {e}"))
}

#[async_trait::async_trait]
impl Sink for RabbitmqSink {
    async fn deliver(&self, batch: Batch<'_>) -> Delivery {
        // Every route first: a record without one refuses the batch before
        // anything of it is published.
        let routes = match self.route.render_all(&self.name, &batch) {
            Ok(r) => r,
            Err(refused) => return refused,
        };
        let (channel, generation) = match self.channel().await {
            Ok(c) => c,
            Err(why) => return self.retry(why),
        };
        let mut bytes = 0u64;
        let publish = async {
            let mut confirms = Vec::with_capacity(batch.events.len());
            for (event, route) in batch.events.iter().zip(&routes) {
                let mut headers = FieldTable::default();
                let identity = identity_headers(batch.pipeline, batch.key, event);
                let message_id = identity[0].1.clone();
                for (name, value) in identity {
                    headers.insert(
                        ShortString::from(name),
                        AMQPValue::LongString(LongString::from(value)),
                    );
                }
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json"))
                    .with_message_id(ShortString::from(message_id))
                    .with_headers(headers);
                let body = event.data.as_str().as_bytes();
                bytes += body.len() as u64;
                let confirm = channel
                    .basic_publish(
                        ShortString::from(self.exchange.as_str()),
                        ShortString::from(route.as_str()),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        properties,
                    )
                    .await
                    .map_err(|e| format!("publish failed: {e}"))?;
                confirms.push((confirm, route));
            }
            let mut unroutable: Vec<String> = Vec::new();
            let mut nacked = 0usize;
            for (confirm, route) in confirms {
                match confirm.await.map_err(|e| format!("confirm failed: {e}"))? {
                    Confirmation::Ack(None) | Confirmation::NotRequested => {}
                    Confirmation::Ack(Some(returned)) => {
                        unroutable.push(format!(
                            "{} ({} {})",
                            route, returned.reply_code, returned.reply_text
                        ));
                    }
                    Confirmation::Nack(_) => nacked += 1,
                }
            }
            Ok::<_, String>((unroutable, nacked))
        };
        let outcome = tokio::time::timeout(self.timeout, publish).await;
        metrics::counter!("caudal_sink_sent_bytes_total", "pipeline" => batch.pipeline.to_string(), "sink" => self.name.clone())
            .increment(bytes);
        match outcome {
            Err(_) => {
                self.reset(generation).await;
                self.retry(format!(
                    "the broker did not confirm the batch within {:?}",
                    self.timeout
                ))
            }
            Ok(Err(why)) => {
                self.reset(generation).await;
                if why.contains("PRECONDITION_FAILED") && why.contains("message size") {
                    return Delivery::Split {
                        reason: format!("sink {:?}: {why}", self.name),
                        status: None,
                        body_excerpt: String::new(),
                    };
                }
                self.retry(why)
            }
            Ok(Ok((unroutable, _))) if !unroutable.is_empty() => {
                let mut routes = unroutable.clone();
                routes.dedup();
                Delivery::Rejected {
                    reason: format!(
                        "sink {:?}: exchange {:?} could not route {} message(s) of the batch \
                         (no queue bound for the routing key, or the queue was deleted): {}",
                        self.name,
                        self.exchange,
                        unroutable.len(),
                        routes
                            .iter()
                            .take(5)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    status: None,
                    body_excerpt: String::new(),
                }
            }
            Ok(Ok((_, nacked))) if nacked > 0 => self.retry(format!(
                "the broker refused to take {nacked} message(s) of the batch (nack)"
            )),
            Ok(Ok(_)) => Delivery::Delivered { status: None },
        }
    }
}
