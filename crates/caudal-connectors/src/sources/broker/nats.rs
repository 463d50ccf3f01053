//! Consuming a JetStream stream through a durable pull consumer (created
//! when missing), with explicit acknowledgements.

use async_nats::jetstream::{self, consumer};
use caudal_core::config::NatsSourceConfig;
use futures::StreamExt as _;
use futures::future::FutureExt as _;

use super::{Ended, PAGE_MAX, Session};
use crate::broker::{MessageMeta, Unacked, message_record};
use crate::sinks::nats::shown;

/// Messages read and not acknowledged yet.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    unacked: Unacked<jetstream::message::Acker>,
    partitions: super::nats_partitions::Ledger,
}

/// A client of the source's server (credentials in the URL are passed on).
pub(super) async fn connect(config: &NatsSourceConfig) -> Result<async_nats::Client, String> {
    let (options, servers) = crate::sinks::nats::connect_options(config.url.expose());
    options
        .retry_on_initial_connect()
        .connect(servers.as_str())
        .await
        .map_err(|e| format!("cannot connect: {e}"))
}

pub(super) async fn session(
    s: Session<'_>,
    config: &NatsSourceConfig,
    ledger: &mut Ledger,
) -> Ended {
    if config.partitions > 1 {
        return super::nats_partitions::session(s, config, &mut ledger.partitions).await;
    }
    let url = config.url.expose();
    let lost = |what: String| Ended::Lost(format!("NATS {}: {what}", shown(url)));
    let client = match connect(config).await {
        Ok(c) => c,
        Err(e) => return lost(e),
    };
    let js = jetstream::new(client.clone());
    let stream = match js.get_stream(&config.stream).await {
        Ok(s) => s,
        Err(e) => return lost(format!("stream {:?}: {e}", config.stream)),
    };
    let consumer_config = consumer::pull::Config {
        durable_name: Some(config.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait.as_std(),
        filter_subject: config.filter_subject.clone().unwrap_or_default(),
        max_ack_pending: i64::from(config.prefetch) * 16,
        ..consumer::pull::Config::default()
    };
    let consumer: consumer::PullConsumer = match stream
        .get_or_create_consumer(&config.consumer, consumer_config)
        .await
    {
        Ok(c) => c,
        Err(e) => return lost(format!("consumer {:?}: {e}", config.consumer)),
    };
    let mut messages = match consumer
        .stream()
        .max_messages_per_batch(usize::from(config.prefetch))
        .messages()
        .await
    {
        Ok(m) => m,
        Err(e) => return lost(format!("cannot pull from {:?}: {e}", config.consumer)),
    };
    s.connected();
    let mut lag_tick = tokio::time::interval(std::time::Duration::from_secs(2));
    let mut consumer = consumer;
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => return close(&s, ledger, &client).await,
            changed = s.durable.changed() => {
                if changed.is_err() {
                    return close(&s, ledger, &client).await;
                }
                if let Err(e) = ack_durable(&s, ledger).await {
                    return lost(format!("acknowledging failed: {e}"));
                }
            }
            _ = lag_tick.tick() => {
                if let Ok(info) = consumer.info().await {
                    let pending = info.num_pending;
                    s.source.update(|st| st.lag = Some(pending));
                }
            }
            next = messages.next() => {
                let Some(first) = next else {
                    return lost("the consumer's message stream ended".into());
                };
                let mut page = Vec::new();
                let mut item = Some(first);
                while let Some(message) = item.take() {
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            if !s.send(std::mem::take(&mut page)).await {
                                return close(&s, ledger, &client).await;
                            }
                            return lost(format!("pulling failed: {e}"));
                        }
                    };
                    let (record, acker) = record_of(&s, message, None);
                    ledger.unacked.push(record.position.clone(), acker);
                    page.push(record);
                    if page.len() < PAGE_MAX {
                        item = messages.next().now_or_never().flatten();
                    }
                }
                let left = ledger.unacked.len() as u64;
                s.source.update(|st| st.unacked = left);
                if !s.send(page).await {
                    return close(&s, ledger, &client).await;
                }
            }
        }
    }
}

/// Acknowledges the messages up to the last durable position.
async fn ack_durable(s: &Session<'_>, ledger: &mut Ledger) -> Result<(), async_nats::Error> {
    let durable = s.durable.borrow().clone();
    let Some(position) = durable else {
        return Ok(());
    };
    for acker in ledger.unacked.take_through(&position) {
        acker.ack().await?;
    }
    let left = ledger.unacked.len() as u64;
    s.source.update(|st| st.unacked = left);
    Ok(())
}

/// Ends a stopped session: acknowledges what became durable last and
/// flushes, so the server has those acknowledgements before the
/// connection goes (else they would be delivered again after `ack_wait`).
async fn close(s: &Session<'_>, ledger: &mut Ledger, client: &async_nats::Client) -> Ended {
    let acked = ack_durable(s, ledger).await;
    let flushed = tokio::time::timeout(super::CLOSE_GRACE, client.flush()).await;
    if let Err(e) = acked {
        tracing::debug!(pipeline = %s.source.pipeline, error = %e, "acknowledging at stop failed; those messages will be delivered again");
    } else if !matches!(flushed, Ok(Ok(()))) {
        tracing::debug!(pipeline = %s.source.pipeline, "the acknowledgements were not flushed in time");
    }
    Ended::Stopped
}

/// The record of a JetStream message, and its acknowledger.
pub(super) fn record_of(
    s: &Session<'_>,
    message: jetstream::Message,
    partition: Option<i32>,
) -> (caudal_core::record::Record, jetstream::message::Acker) {
    let (coordinates, offset, redelivered) = match message.info() {
        Ok(info) => (
            Some(format!("{}:{}", info.stream, info.stream_sequence)),
            Some(info.stream_sequence),
            info.delivered > 1,
        ),
        Err(_) => (None, None, false),
    };
    let (message, acker) = message.split();
    let headers: Vec<(String, String)> = message
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, values)| values.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let message_id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Nats-Msg-Id"))
        .map(|(_, v)| v.clone());
    let meta = MessageMeta {
        message_id,
        coordinates,
        key: None,
        headers,
        route: message.subject.to_string(),
        partition,
        offset,
        redelivered,
    };
    let record = message_record(&s.source.name, &message.payload, &meta, s.meta_field);
    (record, acker)
}

/// `caudal doctor`'s look at the source: connects, looks the stream up and
/// the durable consumer (which the first run creates when missing). Reads
/// and acknowledges nothing.
pub(super) async fn probe(config: &NatsSourceConfig) -> Vec<caudal_core::probe::Finding> {
    use caudal_core::probe::Finding;
    let url = shown(config.url.expose());
    let (options, servers) = crate::sinks::nats::connect_options(config.url.expose());
    let client = match options.connect(servers.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                "connect",
                format!("cannot connect to {url}: {e}"),
                "check the url's host, port and credentials, and that NATS runs",
            )];
        }
    };
    let mut out = vec![Finding::ok("connect", format!("connected to {url}"))];
    let js = jetstream::new(client);
    let mut stream = match js.get_stream(&config.stream).await {
        Ok(s) => s,
        Err(e) => {
            let missing = crate::sinks::nats::is_stream_not_found(&e);
            out.push(Finding::fail(
                "stream",
                if missing {
                    format!("stream {:?} does not exist", config.stream)
                } else {
                    format!("cannot look up stream {:?}: {e}", config.stream)
                },
                if missing {
                    format!(
                        "create the JetStream stream {:?} (nats stream add), or correct the \
                         source's `stream`",
                        config.stream
                    )
                } else {
                    "check that JetStream is enabled on the server and that the credentials \
                     may read stream information"
                        .to_string()
                },
            ));
            return out;
        }
    };
    let messages = stream.info().await.map_or(0, |i| i.state.messages);
    out.push(Finding::ok(
        "stream",
        format!("stream {:?} exists: {messages} message(s)", config.stream),
    ));
    if config.partitions > 1 {
        out.push(Finding::ok(
            "consumer",
            format!(
                "{} partition consumers named after {:?}: created when the source starts",
                config.partitions, config.consumer
            ),
        ));
        return out;
    }
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    out.push(match stream.consumer_info(&config.consumer).await {
        Ok(info) => Finding::ok(
            "consumer",
            format!(
                "durable consumer {:?} exists: {} message(s) pending, {} awaiting \
                 acknowledgement",
                config.consumer, info.num_pending, info.num_ack_pending
            ),
        ),
        Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => Finding::ok(
            "consumer",
            format!(
                "durable consumer {:?} does not exist yet: caudal creates it when it starts \
                 (from the stream's first message)",
                config.consumer
            ),
        ),
        Err(e) => Finding::fail(
            "consumer",
            format!("cannot look up durable consumer {:?}: {e}", config.consumer),
            "check that the credentials may read consumer information",
        ),
    });
    out
}
