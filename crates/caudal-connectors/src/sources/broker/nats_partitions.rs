//! Reading JetStream partition subjects in key order, for NATS servers
//! without pinned consumers: partition `i` (the subject `FILTER.i`) has
//! its own durable consumer `CONSUMER-i`, read by one process at a time.
//!
//! Promises:
//! - A process reads a partition only while it holds the partition's
//!   lease: the entry `p.i` of the key-value bucket
//!   `caudal_owners_STREAM_CONSUMER`, created when free, renewed by
//!   revision every third of `lease`, and gone `lease` after its last
//!   renewal. A refused renewal drops the partition at once; a process
//!   that could not renew for a whole `lease` (paused, cut off) drops
//!   every partition before it passes on another message.
//! - A process taking a partition over re-creates its consumer at the
//!   first message not acknowledged (the consumer's ack floor:
//!   acknowledgements follow the reading order), so what a crashed owner
//!   held comes first, in stream order, and not after `ack_wait` behind
//!   newer messages. With `ack = "delivered"`, one key's messages are
//!   therefore delivered in order across crashes.
//! - Partitions are shared out: each process takes free partitions one at
//!   a time up to its share (partitions over the processes that announced
//!   themselves in the bucket `caudal_members_STREAM_CONSUMER` within the
//!   last `lease`); a clean stop gives its partitions back at once.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use caudal_core::config::NatsSourceConfig;
use futures::future::FutureExt as _;
use futures::stream::{SelectAll, Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;

use super::{Ended, PAGE_MAX, Session};
use crate::broker::Unacked;
use crate::sinks::nats::shown;

/// Messages read and not acknowledged yet: their partition, the tenure
/// they were read in, and their acknowledger.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    unacked: Unacked<(u32, u64, jetstream::message::Acker)>,
    tenures: u64,
}

/// A partition this process holds.
struct Held {
    /// The lease entry's revision, for the next renewal.
    revision: u64,
    /// Which tenure: acknowledgements of messages read in an earlier one
    /// are not sent (the consumer was re-created since).
    tenure: u64,
    /// Stops reading the partition.
    stop: CancellationToken,
}

type Messages = Pin<
    Box<
        dyn Stream<
                Item = (
                    u32,
                    Result<jetstream::Message, consumer::pull::MessagesError>,
                ),
            > + Send,
    >,
>;

/// How often a session looks for partitions to take (and renews when due).
const TICK: Duration = Duration::from_millis(500);

pub(super) async fn session(
    s: Session<'_>,
    config: &NatsSourceConfig,
    ledger: &mut Ledger,
) -> Ended {
    let url = config.url.expose();
    let lost = |what: String| Ended::Lost(format!("NATS {}: {what}", shown(url)));
    let client = match super::nats::connect(config).await {
        Ok(c) => c,
        Err(e) => return lost(e),
    };
    let js = jetstream::new(client.clone());
    let stream = match js.get_stream(&config.stream).await {
        Ok(s) => s,
        Err(e) => return lost(format!("stream {:?}: {e}", config.stream)),
    };
    let lease = config.lease.as_std();
    let (owners, members) = match (
        bucket(&js, &bucket_name("owners", config), lease).await,
        bucket(&js, &bucket_name("members", config), lease).await,
    ) {
        (Ok(o), Ok(m)) => (o, m),
        (Err(e), _) | (_, Err(e)) => return lost(e),
    };
    // The same in every session of this process's pipeline, so that a
    // new session takes its own leases back at once.
    let me = member_name(&s.source.pipeline);
    let prefix = config.filter_subject.as_deref().unwrap_or_default();
    s.connected();
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut reads: SelectAll<Messages> = SelectAll::new();
    let renew_every = lease / 3;
    let mut renewed: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK.min(renew_every));
    // Processes started together begin their search at different
    // partitions.
    let mut next_try = me
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % config.partitions;
    let mut share = config.partitions;
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => return close(&s, ledger, &client, &owners, &mut held).await,
            changed = s.durable.changed() => {
                if changed.is_err() {
                    return close(&s, ledger, &client, &owners, &mut held).await;
                }
                if let Err(e) = ack_durable(&s, ledger, &held).await {
                    return lost(format!("acknowledging failed: {e}"));
                }
            }
            _ = tick.tick() => {
                if renewed.is_none_or(|at| at.elapsed() >= renew_every) {
                    // A lease runs from its write, which comes after this:
                    // counting from here errs on the safe side, also when
                    // the server answers slowly.
                    let round = Instant::now();
                    if let Err(e) = members.put(me.as_str(), me.clone().into()).await {
                        return lost(format!("announcing this process: {e}"));
                    }
                    for (p, h) in &mut held {
                        match owners.update(lease_key(*p), me.clone().into(), h.revision).await {
                            Ok(revision) => h.revision = revision,
                            Err(e) => {
                                tracing::warn!(pipeline = %s.source.pipeline, partition = p, error = %e,
                                    "partition lease lost; another process reads it now");
                                h.stop.cancel();
                            }
                        }
                    }
                    held.retain(|_, h| !h.stop.is_cancelled());
                    renewed = Some(round);
                    share = match members.stream.get_info().await {
                        // One entry per process announced within `lease`.
                        Ok(info) => {
                            let processes = u32::try_from(info.state.messages).unwrap_or(u32::MAX).max(1);
                            config.partitions.div_ceil(processes)
                        }
                        Err(e) => return lost(format!("counting processes: {e}")),
                    };
                    let mut lag = 0;
                    for p in held.keys() {
                        if let Ok(info) = stream.consumer_info(consumer_name(config, *p)).await {
                            lag += info.num_pending;
                        }
                    }
                    s.source.update(|st| st.lag = Some(lag));
                }
                if (held.len() as u32) < share {
                    match take_one(&s, config, &stream, &owners, &me, prefix, &mut next_try, &held, ledger).await {
                        Ok(Some((p, holding, messages))) => {
                            let stop = holding.stop.clone();
                            held.insert(p, holding);
                            reads.push(Box::pin(
                                messages
                                    .map(move |m| (p, m))
                                    .take_until(stop.cancelled_owned()),
                            ));
                        }
                        Ok(None) => {}
                        Err(e) => return lost(e),
                    }
                }
            }
            next = reads.next(), if !reads.is_empty() => {
                let Some(first) = next else { continue };
                // Leases older than `lease` may be someone else's: nothing
                // more is passed on until they are renewed or given up.
                if renewed.is_none_or(|at| at.elapsed() >= lease) {
                    tracing::warn!(pipeline = %s.source.pipeline,
                        "partition leases not renewed in time; dropping the partitions");
                    for h in held.values() {
                        h.stop.cancel();
                    }
                    held.clear();
                    continue;
                }
                let mut page = Vec::new();
                let mut item = Some(first);
                while let Some((p, message)) = item.take() {
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            if !s.send(std::mem::take(&mut page)).await {
                                return close(&s, ledger, &client, &owners, &mut held).await;
                            }
                            return lost(format!("pulling partition {p} failed: {e}"));
                        }
                    };
                    let Some(tenure) = held.get(&p).map(|h| h.tenure) else {
                        // Read just before the partition was dropped.
                        item = reads.next().now_or_never().flatten();
                        continue;
                    };
                    let (record, acker) =
                        super::nats::record_of(&s, message, i32::try_from(p).ok());
                    ledger.unacked.push(record.position.clone(), (p, tenure, acker));
                    page.push(record);
                    if page.len() < PAGE_MAX {
                        item = reads.next().now_or_never().flatten();
                    }
                }
                let left = ledger.unacked.len() as u64;
                s.source.update(|st| st.unacked = left);
                if !s.send(page).await {
                    return close(&s, ledger, &client, &owners, &mut held).await;
                }
            }
        }
    }
}

/// Takes the next free partition (trying each once, from `next_try`):
/// its lease, then its consumer re-created at its ack floor. `None` when
/// every partition is held.
#[allow(clippy::too_many_arguments)]
async fn take_one(
    s: &Session<'_>,
    config: &NatsSourceConfig,
    stream: &jetstream::stream::Stream,
    owners: &kv::Store,
    me: &str,
    prefix: &str,
    next_try: &mut u32,
    held: &BTreeMap<u32, Held>,
    ledger: &mut Ledger,
) -> Result<Option<(u32, Held, consumer::pull::Stream)>, String> {
    for _ in 0..config.partitions {
        let p = *next_try;
        *next_try = (*next_try + 1) % config.partitions;
        if held.contains_key(&p) {
            continue;
        }
        let revision = match owners.create(lease_key(p), me.to_string().into()).await {
            Ok(r) => r,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Still ours from a session that lost its connection.
                match owners.entry(lease_key(p)).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value == me.as_bytes() =>
                    {
                        entry.revision
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(format!("reading the lease of partition {p}: {e}")),
                }
            }
            Err(e) => return Err(format!("taking partition {p}: {e}")),
        };
        let messages = open_partition(config, stream, prefix, p).await?;
        ledger.tenures += 1;
        tracing::info!(pipeline = %s.source.pipeline, partition = p, "partition taken");
        return Ok(Some((
            p,
            Held {
                revision,
                tenure: ledger.tenures,
                stop: CancellationToken::new(),
            },
            messages,
        )));
    }
    Ok(None)
}

/// Re-creates partition `p`'s consumer at its first unacknowledged
/// message (from the start when it has none yet) and pulls from it.
async fn open_partition(
    config: &NatsSourceConfig,
    stream: &jetstream::stream::Stream,
    prefix: &str,
    p: u32,
) -> Result<consumer::pull::Stream, String> {
    let name = consumer_name(config, p);
    let deliver_policy = match stream.consumer_info(&name).await {
        Ok(info) => {
            let next = info.ack_floor.stream_sequence + 1;
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| format!("re-creating consumer {name:?}: {e}"))?;
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: next,
            }
        }
        Err(e) if is_not_found(&e) => consumer::DeliverPolicy::All,
        Err(e) => return Err(format!("consumer {name:?}: {e}")),
    };
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait.as_std(),
            deliver_policy,
            filter_subject: format!("{prefix}.{p}"),
            max_ack_pending: i64::from(config.prefetch) * 16,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(|e| format!("creating consumer {name:?}: {e}"))?;
    consumer
        .stream()
        .max_messages_per_batch(usize::from(config.prefetch))
        .messages()
        .await
        .map_err(|e| format!("cannot pull from {name:?}: {e}"))
}

fn is_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
}

/// Acknowledges the messages up to the last durable position, except
/// those of partitions given up since they were read.
async fn ack_durable(
    s: &Session<'_>,
    ledger: &mut Ledger,
    held: &BTreeMap<u32, Held>,
) -> Result<(), async_nats::Error> {
    let durable = s.durable.borrow().clone();
    let Some(position) = durable else {
        return Ok(());
    };
    for (p, tenure, acker) in ledger.unacked.take_through(&position) {
        if held.get(&p).is_some_and(|h| h.tenure == tenure) {
            acker.ack().await?;
        }
    }
    let left = ledger.unacked.len() as u64;
    s.source.update(|st| st.unacked = left);
    Ok(())
}

/// Ends a stopped session: acknowledges what became durable last, flushes,
/// then gives the partitions back so that other processes take them at
/// once (what was read and not acknowledged is read again by them, first).
async fn close(
    s: &Session<'_>,
    ledger: &mut Ledger,
    client: &async_nats::Client,
    owners: &kv::Store,
    held: &mut BTreeMap<u32, Held>,
) -> Ended {
    let acked = ack_durable(s, ledger, held).await;
    let flushed = tokio::time::timeout(super::CLOSE_GRACE, client.flush()).await;
    if acked.is_ok() && matches!(flushed, Ok(Ok(()))) {
        for (p, h) in std::mem::take(held) {
            h.stop.cancel();
            let _ = tokio::time::timeout(super::CLOSE_GRACE, owners.delete(lease_key(p))).await;
        }
        let _ = tokio::time::timeout(super::CLOSE_GRACE, client.flush()).await;
    } else {
        // The leases run out by themselves.
        tracing::debug!(pipeline = %s.source.pipeline,
            "acknowledging at stop failed; those messages will be delivered again");
    }
    Ended::Stopped
}

/// A key-value bucket of the source (created when missing) whose entries
/// last `lease` after their last write.
async fn bucket(js: &jetstream::Context, name: &str, lease: Duration) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    // The bucket's stream as the key-value convention lays it out. Made
    // directly: the client's own bucket creation first reads the account's
    // limits, whose answer a NATS 2.9 server gives in a shape the client
    // cannot read. Two processes making it at once make the same stream.
    js.create_stream(jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age: lease,
        duplicate_window: lease.min(Duration::from_secs(120)),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..jetstream::stream::Config::default()
    })
    .await
    .map_err(|e| format!("key-value bucket {name:?}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("key-value bucket {name:?}: {e}"))
}

/// `caudal_<what>_<stream>_<consumer>`, with what a bucket name cannot
/// hold replaced by `_`.
fn bucket_name(what: &str, config: &NatsSourceConfig) -> String {
    name_safe(&format!(
        "caudal_{what}_{}_{}",
        config.stream, config.consumer
    ))
}

/// `text` with every character but ASCII letters, digits, `-` and `_`
/// replaced by `_`: a valid bucket name and key.
fn name_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn consumer_name(config: &NatsSourceConfig, p: u32) -> String {
    format!("{}-{p}", config.consumer)
}

fn lease_key(p: u32) -> String {
    format!("p.{p}")
}

/// This pipeline's name in the buckets: the process's lease-holder id
/// (host, pid, a nonce) and the pipeline, with what a key cannot hold
/// replaced by `_`.
fn member_name(pipeline: &str) -> String {
    name_safe(&format!("{}-{pipeline}", caudal_core::process::holder_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_hold_only_what_nats_allows() {
        let config: NatsSourceConfig = toml::from_str(
            "url = \"nats://127.0.0.1:4222\"\nstream = \"orders-v2\"\nconsumer = \"deliver@a\"\n",
        )
        .expect("a NATS source");
        assert_eq!(
            bucket_name("owners", &config),
            "caudal_owners_orders-v2_deliver_a"
        );
        assert_eq!(lease_key(3), "p.3");
        assert_eq!(consumer_name(&config, 3), "deliver@a-3");
        assert!(
            member_name("orders.v2")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        );
    }
}
