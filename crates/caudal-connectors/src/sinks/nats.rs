//! The NATS JetStream sink: each record of a batch becomes one message on
//! a subject, published to JetStream and acknowledged by its stream.
//!
//! Promises:
//! - A batch is delivered only when the stream has acknowledged every one
//!   of its messages; a failure or a missing acknowledgement within
//!   `timeout` is temporary and the batch is published again.
//! - `Nats-Msg-Id` is the record's event id, so a batch published again
//!   within the stream's duplicate window is stored once.
//! - Messages are published in order on one connection, so one key's
//!   records reach a subject in order.
//! - A subject no stream captures refuses the batch with the reason (dead
//!   letters), unless the sink creates its stream (`stream`): then the
//!   stream is created again and the batch retried. A message larger than
//!   the server takes splits the batch (one record too large: a dead
//!   letter). The client reconnects by itself after a lost connection and
//!   unconfirmed batches are published again.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use caudal_core::Result;
use caudal_core::config::{NatsSinkConfig, NatsStream};
use caudal_core::sink::{Batch, Delivery, Sink};

use crate::broker::{Route, identity_headers};

/// A configured JetStream subject.
#[derive(Debug)]
pub struct NatsSink {
    name: String,
    url: String,
    route: Route,
    stream: Option<NatsStream>,
    timeout: Duration,
    context: tokio::sync::Mutex<Option<jetstream::Context>>,
}

impl NatsSink {
    /// Builds the sink (nothing is connected until the first batch).
    pub fn new(name: &str, config: &NatsSinkConfig) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            url: config.url.expose().to_string(),
            route: Route::new(name, "subject", &config.subject, config.partitions)?,
            stream: config.stream.clone(),
            timeout: config.timeout.as_std(),
            context: tokio::sync::Mutex::new(None),
        })
    }

    async fn context(&self) -> std::result::Result<jetstream::Context, String> {
        let mut context = self.context.lock().await;
        if let Some(c) = context.as_ref() {
            return Ok(c.clone());
        }
        let connect = async {
            let (options, servers) = connect_options(&self.url);
            let client = options
                .connection_timeout(self.timeout.min(Duration::from_secs(10)))
                .connect(servers.as_str())
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let js = jetstream::new(client);
            if let Some(stream) = &self.stream {
                let mut config = jetstream::stream::Config {
                    name: stream.name.clone(),
                    subjects: stream.subjects.clone(),
                    ..jetstream::stream::Config::default()
                };
                if let Some(window) = stream.duplicate_window {
                    config.duplicate_window = window.as_std();
                }
                js.get_or_create_stream(config)
                    .await
                    .map_err(|e| format!("cannot create stream {:?}: {e}", stream.name))?;
            }
            Ok::<_, String>(js)
        };
        let js = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| format!("connecting took longer than {:?}", self.timeout))??;
        *context = Some(js.clone());
        Ok(js)
    }

    /// Whether the server can be reached and a stream captures the
    /// subject, without publishing (`caudal doctor`). A subject rendered
    /// per record is not looked up.
    pub async fn probe(&self) -> Vec<caudal_core::probe::Finding> {
        use caudal_core::probe::Finding;
        let url = shown(&self.url);
        let (options, servers) = connect_options(&self.url);
        let connected = tokio::time::timeout(
            self.timeout,
            options
                .connection_timeout(self.timeout.min(Duration::from_secs(10)))
                .connect(servers.as_str()),
        )
        .await;
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return vec![Finding::fail(
                    "connect",
                    format!("cannot connect to {url}: {e}"),
                    "check the url's host, port and credentials, and that NATS runs",
                )];
            }
            Err(_) => {
                return vec![Finding::fail(
                    "connect",
                    format!("connecting to {url} took longer than {:?}", self.timeout),
                    "check the url's host and port, and firewalls between here and the server",
                )];
            }
        };
        let mut out = vec![Finding::ok("connect", format!("connected to {url}"))];
        let js = jetstream::new(client);
        out.push(match (&self.stream, self.route.literal()) {
            (Some(stream), _) => match js.get_stream(&stream.name).await {
                Ok(_) => Finding::ok("stream", format!("stream {:?} exists", stream.name)),
                Err(e) if is_stream_not_found(&e) => Finding::ok(
                    "stream",
                    format!(
                        "stream {:?} does not exist yet: the first delivery creates it",
                        stream.name
                    ),
                ),
                Err(e) => Finding::fail(
                    "stream",
                    format!("cannot look up stream {:?}: {e}", stream.name),
                    "check that JetStream is enabled on the server and that the credentials \
                     may read stream information",
                ),
            },
            (None, None) => Finding::skipped(
                "stream",
                "the subject is rendered per record; no stream is looked up",
            ),
            (None, Some(subject)) => match js.stream_by_subject(subject).await {
                Ok(name) => Finding::ok(
                    "stream",
                    format!("stream {name:?} captures subject {subject:?}"),
                ),
                Err(e) => Finding::fail(
                    "stream",
                    format!("no stream captures subject {subject:?}: {e}"),
                    format!(
                        "create a JetStream stream for {subject:?} (nats stream add), or set \
                         `stream` on the sink so caudal creates it"
                    ),
                ),
            },
        });
        out
    }

    fn retry(&self, why: String) -> Delivery {
        Delivery::Retry {
            reason: format!("NATS {} (sink {:?}): {why}", shown(&self.url), self.name),
            status: None,
            after: None,
        }
    }
}

/// Why a publish failed, as the engine acts on it.
enum Failure {
    /// No stream captures the subject.
    NoStream(String),
    Retry(String),
    Split(String),
}

fn classify(subject: &str, e: &jetstream::context::PublishError) -> Failure {
    match e.kind() {
        PublishErrorKind::StreamNotFound => Failure::NoStream(format!(
            "no stream captures subject {subject:?} (create one, or set `stream` on the sink)"
        )),
        PublishErrorKind::MaxPayloadExceeded => {
            Failure::Split(format!("a message is larger than the server takes: {e}"))
        }
        _ => Failure::Retry(format!("publish to {subject:?} failed: {e}")),
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    async fn deliver(&self, batch: Batch<'_>) -> Delivery {
        let subjects = match self.route.render_all(&self.name, &batch) {
            Ok(r) => r,
            Err(refused) => return refused,
        };
        let js = match self.context().await {
            Ok(js) => js,
            Err(why) => return self.retry(why),
        };
        let mut bytes = 0u64;
        let publish = async {
            let mut acks = Vec::with_capacity(batch.events.len());
            for (event, subject) in batch.events.iter().zip(&subjects) {
                let mut message = jetstream::message::PublishMessage::build();
                for (name, value) in identity_headers(batch.pipeline, batch.key, event) {
                    message = message.header(name, value.as_str());
                }
                let message = message.message_id(event.id(batch.pipeline)).payload(
                    bytes::Bytes::copy_from_slice(event.data.as_str().as_bytes()),
                );
                bytes += event.data.len() as u64;
                let ack = js
                    .send_publish(subject.clone(), message)
                    .await
                    .map_err(|e| classify(subject, &e))?;
                acks.push((ack, subject));
            }
            for (ack, subject) in acks {
                ack.await.map_err(|e| classify(subject, &e))?;
            }
            Ok::<_, Failure>(())
        };
        let outcome = tokio::time::timeout(self.timeout, publish).await;
        metrics::counter!("caudal_sink_sent_bytes_total", "pipeline" => batch.pipeline.to_string(), "sink" => self.name.clone())
            .increment(bytes);
        match outcome {
            Err(_) => self.retry(format!(
                "the stream did not acknowledge the batch within {:?}",
                self.timeout
            )),
            Ok(Err(Failure::Retry(why))) => self.retry(why),
            // The sink creates its stream: it is made again at the next
            // connection (it was deleted, or JetStream lost it).
            Ok(Err(Failure::NoStream(why))) if self.stream.is_some() => {
                *self.context.lock().await = None;
                self.retry(why)
            }
            Ok(Err(Failure::NoStream(why))) => Delivery::Rejected {
                reason: format!("sink {:?}: {why}", self.name),
                status: None,
                body_excerpt: String::new(),
            },
            Ok(Err(Failure::Split(why))) => Delivery::Split {
                reason: format!("sink {:?}: {why}", self.name),
                status: None,
                body_excerpt: String::new(),
            },
            Ok(Ok(())) => Delivery::Delivered { status: None },
        }
    }
}

/// A NATS url as messages show it: its servers, without the user part
/// (a user and password, or a token).
pub fn shown(url: &str) -> String {
    connect_options(url).1
}

/// Connect options and server list for a NATS URL: credentials written in
/// it (`nats://user:password@host`, `nats://token@host`, those of the first
/// server of a list) are taken out and set as the client's, since the
/// client does not read them from the URL.
pub fn connect_options(url: &str) -> (async_nats::ConnectOptions, String) {
    let mut options = async_nats::ConnectOptions::new();
    let mut servers = Vec::new();
    for (i, one) in url.split(',').map(str::trim).enumerate() {
        let (scheme, rest) = one.split_once("://").unwrap_or(("nats", one));
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if i == 0
            && let Some(userinfo) = userinfo
        {
            options = match userinfo.split_once(':') {
                Some((user, password)) => options.user_and_password(decode(user), decode(password)),
                None => options.token(decode(userinfo)),
            };
        }
        servers.push(format!("{scheme}://{host}"));
    }
    (options, servers.join(","))
}

/// `%XX` escapes of a URL's user part, decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A lookup that failed only because the stream is not there.
pub(crate) fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_server_list() {
        assert_eq!(
            connect_options("nats://127.0.0.1:4222").1,
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            connect_options("nats://app:p%40ss@h1:4222, nats://h2:4222").1,
            "nats://h1:4222,nats://h2:4222"
        );
        assert_eq!(connect_options("tls://s3cret@h:4222").1, "tls://h:4222");
        assert_eq!(decode("p%40ss"), "p@ss");
    }
}
