//! Consuming RabbitMQ queues: one channel with a prefetch window, one
//! consumer per queue (per partition queue with `partitions`), manual
//! acknowledgements.

use caudal_core::config::RabbitmqSourceConfig;
use futures::StreamExt as _;
use futures::future::FutureExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};

use super::{Ended, PAGE_MAX, Session, shown};
use crate::broker::{MessageMeta, Unacked, message_record};
use crate::sinks::rabbitmq::{declare_queue, queue_names};

/// Messages read and not acknowledged yet: the connection they came on
/// and their acknowledger.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    unacked: Unacked<(u64, lapin::Acker)>,
    generation: u64,
}

pub(super) async fn session(
    s: Session<'_>,
    config: &RabbitmqSourceConfig,
    ledger: &mut Ledger,
) -> Ended {
    ledger.generation += 1;
    let generation = ledger.generation;
    let url = config.url.expose();
    let connection = match Connection::connect(url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => return Ended::Lost(format!("RabbitMQ {}: cannot connect: {e}", shown(url))),
    };
    let opened = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await?;
        Ok::<_, lapin::Error>(channel)
    };
    let channel = match opened.await {
        Ok(c) => c,
        Err(e) => return Ended::Lost(format!("RabbitMQ {}: {e}", shown(url))),
    };
    let queues = queue_names(&config.queue, None, config.partitions);
    let mut consumers = Vec::with_capacity(queues.len());
    for (queue, _) in &queues {
        if config.declare
            && let Err(why) = declare_queue(&channel, queue, config.single_active_consumer).await
        {
            return Ended::Lost(format!("RabbitMQ {}: {why}", shown(url)));
        }
        match channel
            .basic_consume(
                ShortString::from(queue.as_str()),
                // A consumer tag is unique per channel: one per queue.
                ShortString::from(format!(
                    "caudal-{}-{}-{queue}",
                    s.source.pipeline,
                    std::process::id()
                )),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => consumers.push(c),
            Err(e) => {
                return Ended::Lost(format!(
                    "RabbitMQ {}: cannot consume queue {queue:?}: {e}",
                    shown(url)
                ));
            }
        }
    }
    s.connected();
    let mut deliveries = futures::stream::select_all(consumers);
    let mut lag_tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => return close(&s, ledger, generation, &connection).await,
            _ = lag_tick.tick() => {
                // Messages ready in the queues (not those delivered and
                // unacknowledged): what waits for a consumer.
                let mut ready = Some(0u64);
                for (queue, _) in &queues {
                    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                    match channel.queue_declare(ShortString::from(queue.as_str()), passive, FieldTable::default()).await {
                        Ok(q) => ready = ready.map(|n| n + u64::from(q.message_count())),
                        Err(_) => ready = None,
                    }
                }
                if ready.is_some() {
                    s.source.update(|st| st.lag = ready);
                }
            }
            changed = s.durable.changed() => {
                if changed.is_err() {
                    return close(&s, ledger, generation, &connection).await;
                }
                if let Err(e) = ack_durable(&s, ledger, generation).await {
                    return Ended::Lost(format!("RabbitMQ {}: acknowledging failed: {e}", shown(url)));
                }
            }
            next = deliveries.next() => {
                let Some(first) = next else {
                    return Ended::Lost(format!("RabbitMQ {}: the broker cancelled the consumer (queue deleted?)", shown(url)));
                };
                let mut page = Vec::new();
                let mut item = Some(first);
                while let Some(delivery) = item.take() {
                    let delivery = match delivery {
                        Ok(d) => d,
                        Err(e) => {
                            // What was read so far is still passed on.
                            if !s.send(std::mem::take(&mut page)).await {
                                return close(&s, ledger, generation, &connection).await;
                            }
                            return Ended::Lost(format!("RabbitMQ {}: {e}", shown(url)));
                        }
                    };
                    let meta = meta_of(&delivery);
                    let record = message_record(&s.source.name, &delivery.data, &meta, s.meta_field);
                    ledger.unacked.push(record.position.clone(), (generation, delivery.acker));
                    page.push(record);
                    if page.len() < PAGE_MAX {
                        item = deliveries.next().now_or_never().flatten();
                    }
                }
                let left = ledger.unacked.len() as u64;
                s.source.update(|st| st.unacked = left);
                if !s.send(page).await {
                    return close(&s, ledger, generation, &connection).await;
                }
            }
        }
    }
}

/// Acknowledges this connection's messages up to the last durable
/// position.
async fn ack_durable(s: &Session<'_>, ledger: &mut Ledger, generation: u64) -> lapin::Result<()> {
    let durable = s.durable.borrow().clone();
    let Some(position) = durable else {
        return Ok(());
    };
    let done = ledger.unacked.take_through(&position);
    // Each of this connection's messages is acknowledged by itself:
    // messages of several queues share the channel's delivery tags, and
    // the order they are read in is not the tags' order, so `multiple` up
    // to the last one read would also acknowledge messages not read or not
    // durable yet (and a tag acknowledged twice closes the channel). Older
    // connections' messages are the broker's again already.
    for (_, acker) in done.iter().filter(|(g, _)| *g == generation) {
        acker.ack(BasicAckOptions::default()).await?;
    }
    let left = ledger.unacked.len() as u64;
    s.source.update(|st| st.unacked = left);
    Ok(())
}

/// Ends a stopped session: acknowledges what became durable last, then
/// closes the connection cleanly, so the broker has taken those
/// acknowledgements before it requeues the rest (a dropped socket would
/// requeue them too, and they would be delivered again).
async fn close(
    s: &Session<'_>,
    ledger: &mut Ledger,
    generation: u64,
    connection: &Connection,
) -> Ended {
    let acked = ack_durable(s, ledger, generation).await;
    let closed = tokio::time::timeout(
        super::CLOSE_GRACE,
        connection.close(200, ShortString::from("caudal stopping")),
    )
    .await;
    if let Err(e) = acked {
        tracing::debug!(pipeline = %s.source.pipeline, error = %e, "acknowledging at stop failed; those messages will be delivered again");
    } else if !matches!(closed, Ok(Ok(()))) {
        tracing::debug!(pipeline = %s.source.pipeline, "the broker did not confirm the close in time");
    }
    Ended::Stopped
}

fn meta_of(delivery: &lapin::message::Delivery) -> MessageMeta {
    let props = &delivery.properties;
    let headers = props
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), value_text(v)))
                .collect()
        })
        .unwrap_or_default();
    MessageMeta {
        message_id: props.message_id().as_ref().map(ToString::to_string),
        coordinates: None,
        key: None,
        headers,
        route: delivery.routing_key.to_string(),
        partition: None,
        offset: None,
        redelivered: delivery.redelivered,
    }
}

fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// `caudal doctor`'s look at the source: connects, and looks each queue
/// up with a passive declare (which creates nothing and reads nothing).
pub(super) async fn probe(config: &RabbitmqSourceConfig) -> Vec<caudal_core::probe::Finding> {
    use caudal_core::probe::Finding;
    let url = shown(config.url.expose());
    let connection =
        match Connection::connect(config.url.expose(), ConnectionProperties::default()).await {
            Ok(c) => c,
            Err(e) => {
                return vec![Finding::fail(
                    "connect",
                    format!("cannot connect to {url}: {e}"),
                    "check the url's host, port, user and password (and vhost), and that \
                     RabbitMQ runs",
                )];
            }
        };
    let mut out = vec![Finding::ok("connect", format!("connected to {url}"))];
    for (queue, _) in queue_names(&config.queue, None, config.partitions) {
        // A refused passive declare closes its channel: one per queue.
        let looked = async {
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        }
        .await;
        out.push(match looked {
            Ok(q) => Finding::ok(
                "queue",
                format!(
                    "queue {queue:?} exists: {} message(s) ready, {} consumer(s)",
                    q.message_count(),
                    q.consumer_count()
                ),
            ),
            Err(e) if config.declare && is_not_found(&e) => Finding::ok(
                "queue",
                format!("queue {queue:?} does not exist yet: caudal declares it when it starts"),
            ),
            Err(e) => Finding::fail(
                "queue",
                format!("queue {queue:?} is not usable: {e}"),
                format!(
                    "declare queue {queue:?} on the broker, or set `declare = true` on the \
                     source so caudal declares it"
                ),
            ),
        });
    }
    let _ = connection.close(200, "doctor done".into()).await;
    out
}

/// Whether the broker answered 404 NOT_FOUND (the queue does not exist),
/// not some other refusal (access, a lock).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
