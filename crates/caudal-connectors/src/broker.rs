//! What every broker connector shares: how a record becomes a message (its
//! route, id and headers) and a message a record again, and the ledger of
//! consumed messages waiting to be acknowledged.
//!
//! Promises:
//! - A record published by a caudal sink carries its event id as the
//!   message id (`Nats-Msg-Id`, AMQP `message-id`, header `caudal-event-id`),
//!   so a broker source reading it gives it the same id every time it is
//!   delivered: duplicates keep their idempotency key end to end.
//! - A consumed message is acknowledged only once the pipeline reports a
//!   position at or past it as durable (or delivered), in the order the
//!   messages were read; a report of a position this reader never read
//!   acknowledges nothing.
//! - A routing template is rendered per record; a record it cannot render
//!   for is refused with the reason (the batch goes to dead letters), never
//!   sent somewhere else.

use std::collections::VecDeque;

use caudal_core::record::{Json, ObjectWriter, Position, Record};
use caudal_core::sink::{Batch, Delivery, Event};
use caudal_core::{Error, ErrorKind, Result};
use serde::Serialize;
use sha2::Digest as _;

/// Header carrying a record's stable event id.
pub const HEADER_EVENT_ID: &str = "caudal-event-id";
/// Header carrying a record's ordering key.
pub const HEADER_KEY: &str = "caudal-key";
/// Header carrying the idempotency key of the batch a record was sent in.
pub const HEADER_BATCH: &str = "caudal-batch";
/// Header carrying the pipeline that published a record.
pub const HEADER_PIPELINE: &str = "caudal-pipeline";
/// Header carrying the record's source position (JSON).
pub const HEADER_POSITION: &str = "caudal-position";

/// The name a message is routed by (routing key, subject, topic): a
/// template over the record, or literal text.
#[derive(Debug)]
pub struct Route {
    literal: Option<String>,
    env: Option<minijinja::Environment<'static>>,
    uses_record: bool,
    partitions: u32,
}

#[derive(Serialize)]
struct RouteContext<'a> {
    record: Option<serde_json::Value>,
    key: Option<&'a str>,
    pipeline: &'a str,
    partition: u32,
}

impl Route {
    /// Compiles `text` (checked at load by
    /// [`caudal_core::config::brokers::check_routing_template`]).
    pub fn new(sink: &str, field: &str, text: &str, partitions: u32) -> Result<Self> {
        let partitions = partitions.max(1);
        if !text.contains("{{") && !text.contains("{%") {
            return Ok(Self {
                literal: Some(text.to_string()),
                env: None,
                uses_record: false,
                partitions,
            });
        }
        caudal_core::config::brokers::check_routing_template(text)
            .map_err(|m| Error::new(ErrorKind::Config, format!("sink {sink:?}: {field}: {m}")))?;
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned("route", text.to_string())
            .map_err(|e| Error::new(ErrorKind::Config, format!("sink {sink:?}: {field}: {e}")))?;
        let uses_record = env
            .get_template("route")
            .is_ok_and(|t| t.undeclared_variables(false).contains("record"));
        Ok(Self {
            literal: None,
            env: Some(env),
            uses_record,
            partitions,
        })
    }

    /// The route when it is the same for every record (literal text).
    pub fn literal(&self) -> Option<&str> {
        self.literal.as_deref()
    }

    /// The route of `event` in `pipeline`; `Err` says why it has none.
    pub fn render(&self, pipeline: &str, event: &Event) -> std::result::Result<String, String> {
        if let Some(text) = &self.literal {
            return Ok(text.clone());
        }
        let Some(env) = &self.env else {
            return Ok(String::new());
        };
        let template = env.get_template("route").map_err(|e| e.to_string())?;
        let ctx = RouteContext {
            record: self.uses_record.then(|| event.data.to_value()),
            key: event.key.as_deref(),
            pipeline,
            partition: partition_of(event, pipeline, self.partitions),
        };
        let out = template
            .render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| {
                let detail = e.detail().map_or_else(|| e.to_string(), str::to_string);
                format!("the route template failed on this record: {detail}")
            })?;
        if out.is_empty() {
            return Err("the route template rendered an empty name for this record".into());
        }
        Ok(out)
    }
}

impl Route {
    /// The route of every event of `batch`, in order; or, when one has
    /// none, the refusal of the whole batch (before anything is sent),
    /// naming the record's key.
    pub fn render_all(
        &self,
        sink: &str,
        batch: &Batch<'_>,
    ) -> std::result::Result<Vec<String>, Delivery> {
        batch
            .events
            .iter()
            .map(|event| {
                self.render(batch.pipeline, event)
                    .map_err(|why| Delivery::Rejected {
                        reason: format!(
                            "sink {sink:?}: record{}: {why}",
                            event
                                .key
                                .as_deref()
                                .map(|k| format!(" with key {k}"))
                                .unwrap_or_default()
                        ),
                        status: None,
                        body_excerpt: String::new(),
                    })
            })
            .collect()
    }
}

/// The key-hash partition of `event` among `partitions`: a function of
/// the record key (of the event id when it has none), stable across
/// versions and processes.
pub fn partition_of(event: &Event, pipeline: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let digest = match &event.key {
        Some(k) => sha2::Sha256::digest(k.as_bytes()),
        None => sha2::Sha256::digest(event.id(pipeline).as_bytes()),
    };
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u32::try_from(u64::from_be_bytes(first) % u64::from(partitions)).unwrap_or(0)
}

/// The identity headers of a record sent in batch `batch_key`:
/// `(name, value)` pairs, the event id first.
pub fn identity_headers(
    pipeline: &str,
    batch_key: &str,
    event: &Event,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(5);
    out.push((HEADER_EVENT_ID, event.id(pipeline)));
    if let Some(k) = &event.key {
        out.push((HEADER_KEY, k.clone()));
    }
    out.push((HEADER_BATCH, batch_key.to_string()));
    out.push((HEADER_PIPELINE, pipeline.to_string()));
    out.push((
        HEADER_POSITION,
        serde_json::to_string(&event.position).unwrap_or_default(),
    ));
    out
}

/// What a source knows of one consumed message besides its body.
#[derive(Debug, Default)]
pub struct MessageMeta {
    /// The publisher's message id, if it set one.
    pub message_id: Option<String>,
    /// The broker's own coordinates of the message when they are stable
    /// (JetStream `stream:sequence`, Kafka `topic/partition/offset`).
    pub coordinates: Option<String>,
    /// The message key (Kafka) or the `caudal-key` header.
    pub key: Option<String>,
    /// Headers, as text.
    pub headers: Vec<(String, String)>,
    /// Where it was published: routing key, subject or topic.
    pub route: String,
    /// Kafka partition, when there is one.
    pub partition: Option<i32>,
    /// Kafka offset or JetStream stream sequence.
    pub offset: Option<u64>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

impl MessageMeta {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A consumed message as a record of `source`: a JSON object body is the
/// record as it is; any other JSON value is `{"value": …}`; a body that is
/// not JSON is `{"body": "text"}` (or `{"body_base64": …}` when it is not
/// UTF-8), so nothing is dropped. With `meta_field`, the message's
/// metadata (headers, route, partition, offset, redelivered) is added
/// under that name. The position is the message's stable id.
pub fn message_record(
    source: &str,
    body: &[u8],
    meta: &MessageMeta,
    meta_field: Option<&str>,
) -> Record {
    let id = meta
        .message_id
        .clone()
        .filter(|id| !id.is_empty())
        .or_else(|| meta.header(HEADER_EVENT_ID).map(str::to_string))
        .or_else(|| meta.coordinates.clone())
        .unwrap_or_else(|| {
            // No stable identity: the digest of what was published, so the
            // same message delivered again is the same record.
            let mut h = sha2::Sha256::new();
            h.update(source.as_bytes());
            h.update([0]);
            h.update(meta.route.as_bytes());
            h.update([0]);
            h.update(body);
            let d = h.finalize();
            let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        });
    let key = meta
        .key
        .clone()
        .or_else(|| meta.header(HEADER_KEY).map(str::to_string));
    let text = std::str::from_utf8(body).ok();
    let parsed: Option<serde_json::Value> = text.and_then(|t| serde_json::from_str(t).ok());
    let mut out = ObjectWriter::with_capacity(body.len() + 64);
    let mut map = match parsed {
        Some(serde_json::Value::Object(map)) if meta_field.is_none() => {
            // The common case: the body is the record, kept as encoded
            // when it is compact JSON.
            if let Some(t) = text
                && let Ok(json) = Json::parse(t)
            {
                return Record {
                    data: json,
                    position: Position::Message { id },
                    key,
                };
            }
            map
        }
        Some(serde_json::Value::Object(map)) => map,
        Some(other) => {
            let mut m = serde_json::Map::new();
            m.insert("value".into(), other);
            m
        }
        None => {
            let mut m = serde_json::Map::new();
            match text {
                Some(t) => m.insert("body".into(), serde_json::Value::String(t.to_string())),
                None => {
                    use base64::Engine as _;
                    m.insert(
                        "body_base64".into(),
                        serde_json::Value::String(
                            base64::engine::general_purpose::STANDARD.encode(body),
                        ),
                    )
                }
            };
            m
        }
    };
    if let Some(field) = meta_field {
        let headers: serde_json::Map<String, serde_json::Value> = meta
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("id".into(), serde_json::Value::String(id.clone()));
        m.insert(
            "route".into(),
            serde_json::Value::String(meta.route.clone()),
        );
        m.insert("headers".into(), serde_json::Value::Object(headers));
        if let Some(p) = meta.partition {
            m.insert("partition".into(), p.into());
        }
        if let Some(o) = meta.offset {
            m.insert("offset".into(), o.into());
        }
        m.insert("redelivered".into(), meta.redelivered.into());
        map.insert(field.to_string(), serde_json::Value::Object(m));
    }
    for (k, v) in &map {
        out.key(k).value(v);
    }
    Record {
        data: out.finish(),
        position: Position::Message { id },
        key,
    }
}

/// Messages read and not yet acknowledged, in the order they were read,
/// each with what acknowledges it.
pub struct Unacked<A> {
    pending: VecDeque<(Position, A)>,
}

impl<A> std::fmt::Debug for Unacked<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unacked")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<A> Default for Unacked<A> {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
        }
    }
}

impl<A> Unacked<A> {
    /// Remembers a message read, at `position`.
    pub fn push(&mut self, position: Position, acker: A) {
        self.pending.push_back((position, acker));
    }

    /// The messages up to and including the first one at `durable`, in
    /// the order read (nothing when this reader never read `durable`).
    pub fn take_through(&mut self, durable: &Position) -> Vec<A> {
        let Some(at) = self.pending.iter().position(|(p, _)| p == durable) else {
            return Vec::new();
        };
        self.pending.drain(..=at).map(|(_, a)| a).collect()
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&str>, data: &str) -> Event {
        Event {
            key: key.map(str::to_string),
            position: Position::Message { id: data.into() },
            data: Json::parse(data).expect("json"),
        }
    }

    #[test]
    fn routes_render_from_the_record_and_partitions_are_stable() {
        let route = Route::new(
            "s",
            "subject",
            "orders.{{ record.region }}.{{ partition }}",
            4,
        )
        .expect("route");
        let e = event(Some("42"), r#"{"region":"eu","id":42}"#);
        let first = route.render("p", &e).expect("rendered");
        assert!(first.starts_with("orders.eu."), "{first}");
        assert_eq!(route.render("p", &e).expect("again"), first);
        let missing = event(Some("1"), r#"{"id":1}"#);
        let err = route.render("p", &missing).expect_err("no region");
        assert!(err.contains("route template failed"), "{err}");
        // Keys spread over every partition.
        let seen: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| partition_of(&event(Some(&i.to_string()), "{}"), "p", 4))
            .collect();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn messages_become_records_with_stable_ids() {
        let meta = MessageMeta {
            headers: vec![
                (HEADER_EVENT_ID.into(), "abc".into()),
                (HEADER_KEY.into(), "7".into()),
            ],
            route: "q".into(),
            ..MessageMeta::default()
        };
        let r = message_record("src", br#"{"a":1}"#, &meta, None);
        assert_eq!(r.position, Position::Message { id: "abc".into() });
        assert_eq!(r.key.as_deref(), Some("7"));
        assert_eq!(r.data.as_str(), r#"{"a":1}"#);
        let plain = MessageMeta {
            route: "q".into(),
            ..MessageMeta::default()
        };
        let a = message_record("src", b"not json", &plain, None);
        let b = message_record("src", b"not json", &plain, None);
        assert_eq!(a.position, b.position);
        assert_eq!(a.data.to_value(), serde_json::json!({"body": "not json"}));
        let bin = message_record("src", &[0xff, 0xfe], &plain, None);
        assert!(bin.data.as_str().contains("body_base64"));
        let with_meta = message_record("src", br#"[1]"#, &meta, Some("_message"));
        let v = with_meta.data.to_value();
        assert_eq!(v["value"], serde_json::json!([1]));
        assert_eq!(v["_message"]["route"], "q");
        assert_eq!(v["_message"]["headers"][HEADER_KEY], "7");
    }

    #[test]
    fn acknowledgements_follow_the_reading_order() {
        let mut u = Unacked::default();
        for i in 0..5 {
            u.push(Position::Message { id: i.to_string() }, i);
        }
        assert!(
            u.take_through(&Position::Message { id: "x".into() })
                .is_empty()
        );
        assert_eq!(
            u.take_through(&Position::Message { id: "2".into() }),
            vec![0, 1, 2]
        );
        // A message read twice: the first copy is the one reported.
        u.push(Position::Message { id: "3".into() }, 9);
        assert_eq!(
            u.take_through(&Position::Message { id: "3".into() }),
            vec![3]
        );
        assert_eq!(u.len(), 2);
    }
}
