//! The record model: what sources produce and sinks deliver.
//!
//! A record is a JSON object (the row or event) plus where it came from: its
//! [`Position`] in the source. Positions are totally ordered within one
//! pipeline, which is what checkpoints and idempotency keys build on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One typed value of a cursor column, kept with its type so it can be bound
/// back into a query with the same SQL type it was read with (comparing a
/// timestamp column with a text parameter would be wrong or slow).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum CursorValue {
    /// A signed integer column.
    Int(i64),
    /// An unsigned integer column (MySQL `BIGINT UNSIGNED`).
    Uint(u64),
    /// A floating point column.
    Float(f64),
    /// An exact decimal, as its decimal string.
    Decimal(String),
    /// A text column.
    Text(String),
    /// A zone-less timestamp (`timestamp`, `DATETIME`), as stored.
    Timestamp(String),
    /// A timestamp with a zone (`timestamptz`, MySQL `TIMESTAMP`), in UTC.
    TimestampTz(String),
    /// A date.
    Date(String),
    /// A UUID.
    Uuid(String),
}

impl CursorValue {
    /// The value as it appears in a record, for display.
    pub fn display(&self) -> String {
        match self {
            Self::Int(v) => v.to_string(),
            Self::Uint(v) => v.to_string(),
            Self::Float(v) => v.to_string(),
            Self::Decimal(s)
            | Self::Text(s)
            | Self::Timestamp(s)
            | Self::TimestampTz(s)
            | Self::Date(s)
            | Self::Uuid(s) => s.clone(),
        }
    }
}

/// Where a record sits in its source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// An incremental SQL source: the values of the cursor columns.
    Cursor { values: Vec<CursorValue> },
    /// A change streamed from PostgreSQL's log: the LSN of its
    /// transaction's commit and its index within the transaction (many
    /// changes share one commit LSN).
    Lsn { lsn: u64, index: u64 },
    /// A row read by a CDC snapshot: the log position the snapshot is
    /// consistent with, the table, and the row's primary key.
    Snapshot {
        lsn: u64,
        table: String,
        key: Vec<CursorValue>,
    },
    /// A CDC snapshot was read to its end: streaming goes on from `lsn`.
    /// Carried by a marker record that is never sent.
    SnapshotDone { lsn: u64 },
    /// A change streamed from a MySQL/MariaDB binary log: the file and
    /// offset where its transaction starts, its index within the
    /// transaction, and the transaction's GTID when the server logs one
    /// (MariaDB `domain-server-sequence`).
    Binlog {
        file: String,
        pos: u64,
        index: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtid: Option<String>,
    },
    /// A row read by a binlog CDC snapshot consistent with `file`:`pos`.
    BinlogSnapshot {
        file: String,
        pos: u64,
        table: String,
        key: Vec<CursorValue>,
    },
    /// Binlog streaming goes on from `file`:`pos` (a transaction boundary):
    /// the end of a snapshot, or the log read past changes of tables not
    /// captured. Carried by a marker record that is never sent.
    BinlogResume { file: String, pos: u64 },
    /// A row read by an on-demand backfill, consistent with `file`:`pos`
    /// and placed in the stream there (before the transaction starting
    /// at it).
    BinlogBackfill {
        file: String,
        pos: u64,
        table: String,
        key: Vec<CursorValue>,
    },
    /// A row of an incremental source's first load: the table read in
    /// physical order (the row's `page` and `tuple`, its ctid) up to the
    /// cursor's high-water mark `hwm`, which the checkpoint takes once the
    /// load is done.
    FirstLoad {
        hwm: Vec<CursorValue>,
        page: u32,
        tuple: u16,
    },
    /// A first load was read to its end: reading goes on by cursor after
    /// `hwm`. Carried by a marker record that is never sent.
    FirstLoadDone { hwm: Vec<CursorValue> },
    /// A row read by a CDC snapshot in physical order (its ctid),
    /// consistent with `lsn`.
    SnapshotRow {
        lsn: u64,
        table: String,
        page: u32,
        tuple: u16,
    },
    /// A page of a crawl: its URL, in the crawl's `generation` (each
    /// re-crawl is one more), so the same page fetched again after a
    /// crash is the same record, and a changed page in a later re-crawl a
    /// new one.
    Page { url: String, generation: u64 },
    /// A message consumed from a broker: its stable id (the publisher's
    /// message id when it set one, as caudal's broker sinks do; else the
    /// broker's coordinates, or a digest of the message), so the same
    /// message delivered again is the same record.
    Message { id: String },
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

impl Position {
    /// A compact, stable text form, used in logs, status and keys.
    pub fn display(&self) -> String {
        match self {
            Self::Cursor { values } => {
                let parts: Vec<String> = values.iter().map(CursorValue::display).collect();
                format!("({})", parts.join(", "))
            }
            Self::Lsn { lsn, index } => format!("{}#{index}", format_lsn(*lsn)),
            Self::FirstLoad { hwm, page, tuple } => {
                let parts: Vec<String> = hwm.iter().map(CursorValue::display).collect();
                format!(
                    "first load up to ({}) at ({page},{tuple})",
                    parts.join(", ")
                )
            }
            Self::FirstLoadDone { hwm } => {
                let parts: Vec<String> = hwm.iter().map(CursorValue::display).collect();
                format!("({})", parts.join(", "))
            }
            Self::SnapshotRow {
                lsn,
                table,
                page,
                tuple,
            } => format!("snapshot@{} {table} at ({page},{tuple})", format_lsn(*lsn)),
            Self::SnapshotDone { lsn } => format!("snapshot done@{}", format_lsn(*lsn)),
            Self::Page { url, generation } => format!("{url} (crawl {generation})"),
            Self::Message { id } => format!("message {id}"),
            Self::Snapshot { lsn, table, key } => {
                let parts: Vec<String> = key.iter().map(CursorValue::display).collect();
                format!(
                    "snapshot@{} {table} ({})",
                    format_lsn(*lsn),
                    parts.join(", ")
                )
            }
            Self::Binlog {
                file, pos, index, ..
            } => format!("{file}:{pos}#{index}"),
            Self::BinlogResume { file, pos } => format!("resume@{file}:{pos}"),
            Self::BinlogSnapshot {
                file,
                pos,
                table,
                key,
            }
            | Self::BinlogBackfill {
                file,
                pos,
                table,
                key,
            } => {
                let parts: Vec<String> = key.iter().map(CursorValue::display).collect();
                let what = if matches!(self, Self::BinlogSnapshot { .. }) {
                    "snapshot"
                } else {
                    "backfill"
                };
                format!("{what}@{file}:{pos} {table} ({})", parts.join(", "))
            }
        }
    }

    /// Whether the position only marks progress (the end of a CDC
    /// snapshot): its record is never sent.
    pub fn is_marker(&self) -> bool {
        matches!(
            self,
            Self::SnapshotDone { .. } | Self::BinlogResume { .. } | Self::FirstLoadDone { .. }
        )
    }
}

/// One row or event on its way from a source to a sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The row or event as one JSON object, encoded once by the source.
    pub data: Json,
    /// Where the record sits in its source.
    pub position: Position,
    /// The entity the record is about, for per-key ordering: the value of
    /// the pipeline's `key` field (a SQL source reads it as it encodes the
    /// row), or what a CDC source knows (table and primary key).
    pub key: Option<String>,
}

/// A record's data: one JSON object, encoded once by the source that read
/// it and carried as this text through the buffer into the request body,
/// so no record is parsed or serialized again on its way. Templates,
/// schemas and dead letters that need its values parse it
/// ([`to_value`](Self::to_value)).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Json(Box<str>);

impl Json {
    /// The object `map`, encoded.
    pub fn from_map(map: &Map<String, Value>) -> Self {
        let mut out = ObjectWriter::with_capacity(map.len() * 16);
        for (k, v) in map {
            out.key(k).value(v);
        }
        out.finish()
    }

    /// `text`, if it is one JSON object.
    pub fn parse(text: &str) -> Result<Self, String> {
        match serde_json::from_str::<&serde_json::value::RawValue>(text) {
            Ok(raw) if raw.get().trim_start().starts_with('{') => Ok(Self(raw.get().into())),
            Ok(_) => Err("not a JSON object".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Text this product encoded earlier and kept (a buffer entry, checked
    /// by its checksum): taken as it is, not parsed again.
    pub fn from_encoded(text: String) -> Self {
        Self(text.into_boxed_str())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Bytes of the JSON text.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty (never, for a record).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object's fields, parsed.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }

    /// The object, parsed.
    pub fn to_value(&self) -> Value {
        Value::Object(self.to_map())
    }

    /// The top-level field `name`, parsed (the rest is only scanned).
    pub fn field(&self, name: &str) -> Option<Value> {
        type Fields<'a> =
            std::collections::HashMap<std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue>;
        let fields: Fields<'_> = serde_json::from_str(&self.0).ok()?;
        serde_json::from_str(fields.get(name)?.get()).ok()
    }
}

impl std::fmt::Debug for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Json {
    /// Any JSON object, kept as its text.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("a record is a JSON object"));
        }
        Ok(Self(raw.into()))
    }
}

/// Writes one JSON object straight into its text, field by field: how
/// sources encode a record once. Every [`key`](Self::key) must be followed
/// by exactly one value, through the [`ValueWriter`] it returns.
#[derive(Debug, Default)]
pub struct ObjectWriter {
    out: Vec<u8>,
}

impl ObjectWriter {
    /// An empty object with room for about `bytes` of text.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut out = Vec::with_capacity(bytes + 2);
        out.push(b'{');
        Self { out }
    }

    /// Starts field `name`.
    pub fn key(&mut self, name: &str) -> ValueWriter<'_> {
        if self.out.is_empty() {
            self.out.push(b'{');
        } else if self.out.len() > 1 {
            self.out.push(b',');
        }
        write_str(&mut self.out, name);
        self.out.push(b':');
        ValueWriter(&mut self.out)
    }

    /// The object.
    pub fn finish(mut self) -> Json {
        if self.out.is_empty() {
            self.out.push(b'{');
        }
        self.out.push(b'}');
        // Everything written is UTF-8 (names and strings come as &str, the
        // rest is ASCII), so the check never fails.
        Json(
            String::from_utf8(self.out)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                .into_boxed_str(),
        )
    }
}

/// Writes the value of one field of an [`ObjectWriter`].
#[derive(Debug)]
pub struct ValueWriter<'a>(&'a mut Vec<u8>);

impl ValueWriter<'_> {
    /// A JSON value.
    pub fn value(self, v: &Value) {
        // Writing to a Vec cannot fail, and a Value always serializes.
        let _ = serde_json::to_writer(&mut *self.0, v);
    }

    /// An object.
    pub fn map(self, m: &Map<String, Value>) {
        // Writing to a Vec cannot fail, and a map of values always
        // serializes.
        let _ = serde_json::to_writer(&mut *self.0, m);
    }

    /// A string.
    pub fn str(self, s: &str) {
        write_str(self.0, s);
    }

    /// `null`.
    pub fn null(self) {
        self.0.extend_from_slice(b"null");
    }

    /// A boolean.
    pub fn bool(self, b: bool) {
        self.0
            .extend_from_slice(if b { b"true" as &[u8] } else { b"false" });
    }

    /// An integer.
    pub fn i64(self, n: i64) {
        let _ = serde_json::to_writer(&mut *self.0, &n);
    }

    /// An unsigned integer.
    pub fn u64(self, n: u64) {
        let _ = serde_json::to_writer(&mut *self.0, &n);
    }

    /// An encoded object.
    pub fn json(self, j: &Json) {
        self.0.extend_from_slice(j.as_str().as_bytes());
    }

    /// An array of strings.
    pub fn strs<S: AsRef<str>>(self, items: &[S]) {
        self.0.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            write_str(self.0, s.as_ref());
        }
        self.0.push(b']');
    }
}

/// A JSON string, escaped.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // A &str always serializes.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Hex of the first 16 bytes of SHA-256 over the parts, each followed by a
/// zero byte so that ("ab", "c") and ("a", "bc") differ.
fn digest(parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for p in parts {
        hasher.update(p);
        hasher.update([0u8]);
    }
    let out = hasher.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(32);
    for b in &out[..16] {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

/// A compact binary form of positions and cursor values, for the durable
/// buffer's entries (where every record carries its position): a tag byte
/// per variant, integers little-endian, strings length-prefixed. Its
/// layout only changes by adding tags; [`Position::read_binary`] refuses
/// what it does not know rather than guess.
impl Position {
    /// Appends the binary form to `out`.
    pub fn write_binary(&self, out: &mut Vec<u8>) {
        match self {
            Self::Cursor { values } => {
                out.push(1);
                put_values(out, values);
            }
            Self::Lsn { lsn, index } => {
                out.push(2);
                put_u64(out, *lsn);
                put_u64(out, *index);
            }
            Self::Snapshot { lsn, table, key } => {
                out.push(3);
                put_u64(out, *lsn);
                put_str(out, table);
                put_values(out, key);
            }
            Self::SnapshotDone { lsn } => {
                out.push(4);
                put_u64(out, *lsn);
            }
            Self::Binlog {
                file,
                pos,
                index,
                gtid,
            } => {
                out.push(5);
                put_str(out, file);
                put_u64(out, *pos);
                put_u64(out, *index);
                match gtid {
                    None => out.push(0),
                    Some(g) => {
                        out.push(1);
                        put_str(out, g);
                    }
                }
            }
            Self::BinlogSnapshot {
                file,
                pos,
                table,
                key,
            } => {
                out.push(6);
                put_str(out, file);
                put_u64(out, *pos);
                put_str(out, table);
                put_values(out, key);
            }
            Self::BinlogResume { file, pos } => {
                out.push(7);
                put_str(out, file);
                put_u64(out, *pos);
            }
            Self::BinlogBackfill {
                file,
                pos,
                table,
                key,
            } => {
                out.push(8);
                put_str(out, file);
                put_u64(out, *pos);
                put_str(out, table);
                put_values(out, key);
            }
            Self::FirstLoad { hwm, page, tuple } => {
                out.push(9);
                put_values(out, hwm);
                put_u32(out, *page);
                out.extend_from_slice(&tuple.to_le_bytes());
            }
            Self::FirstLoadDone { hwm } => {
                out.push(10);
                put_values(out, hwm);
            }
            Self::SnapshotRow {
                lsn,
                table,
                page,
                tuple,
            } => {
                out.push(11);
                put_u64(out, *lsn);
                put_str(out, table);
                put_u32(out, *page);
                out.extend_from_slice(&tuple.to_le_bytes());
            }
            Self::Page { url, generation } => {
                out.push(12);
                put_str(out, url);
                put_u64(out, *generation);
            }
            Self::Message { id } => {
                out.push(13);
                put_str(out, id);
            }
        }
    }

    /// Reads a position written by [`write_binary`](Self::write_binary)
    /// from the front of `input`, advancing it; `None` when the bytes are
    /// not one.
    pub fn read_binary(input: &mut &[u8]) -> Option<Self> {
        Some(match take_u8(input)? {
            1 => Self::Cursor {
                values: take_values(input)?,
            },
            2 => Self::Lsn {
                lsn: take_u64(input)?,
                index: take_u64(input)?,
            },
            3 => Self::Snapshot {
                lsn: take_u64(input)?,
                table: take_str(input)?,
                key: take_values(input)?,
            },
            4 => Self::SnapshotDone {
                lsn: take_u64(input)?,
            },
            5 => Self::Binlog {
                file: take_str(input)?,
                pos: take_u64(input)?,
                index: take_u64(input)?,
                gtid: match take_u8(input)? {
                    0 => None,
                    1 => Some(take_str(input)?),
                    _ => return None,
                },
            },
            6 => Self::BinlogSnapshot {
                file: take_str(input)?,
                pos: take_u64(input)?,
                table: take_str(input)?,
                key: take_values(input)?,
            },
            7 => Self::BinlogResume {
                file: take_str(input)?,
                pos: take_u64(input)?,
            },
            8 => Self::BinlogBackfill {
                file: take_str(input)?,
                pos: take_u64(input)?,
                table: take_str(input)?,
                key: take_values(input)?,
            },
            9 => Self::FirstLoad {
                hwm: take_values(input)?,
                page: take_u32(input)?,
                tuple: u16::from_le_bytes(take_array(input)?),
            },
            10 => Self::FirstLoadDone {
                hwm: take_values(input)?,
            },
            11 => Self::SnapshotRow {
                lsn: take_u64(input)?,
                table: take_str(input)?,
                page: take_u32(input)?,
                tuple: u16::from_le_bytes(take_array(input)?),
            },
            12 => Self::Page {
                url: take_str(input)?,
                generation: take_u64(input)?,
            },
            13 => Self::Message {
                id: take_str(input)?,
            },
            _ => return None,
        })
    }
}

fn put_values(out: &mut Vec<u8>, values: &[CursorValue]) {
    put_u32(out, u32::try_from(values.len()).unwrap_or(u32::MAX));
    for v in values {
        match v {
            CursorValue::Int(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            CursorValue::Uint(u) => {
                out.push(2);
                put_u64(out, *u);
            }
            CursorValue::Float(f) => {
                out.push(3);
                out.extend_from_slice(&f.to_le_bytes());
            }
            CursorValue::Decimal(s) => tagged_str(out, 4, s),
            CursorValue::Text(s) => tagged_str(out, 5, s),
            CursorValue::Timestamp(s) => tagged_str(out, 6, s),
            CursorValue::TimestampTz(s) => tagged_str(out, 7, s),
            CursorValue::Date(s) => tagged_str(out, 8, s),
            CursorValue::Uuid(s) => tagged_str(out, 9, s),
        }
    }
}

fn take_values(input: &mut &[u8]) -> Option<Vec<CursorValue>> {
    let n = take_u32(input)? as usize;
    // Every value takes at least its tag byte.
    if n > input.len() {
        return None;
    }
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        values.push(match take_u8(input)? {
            1 => CursorValue::Int(i64::from_le_bytes(take_array(input)?)),
            2 => CursorValue::Uint(take_u64(input)?),
            3 => CursorValue::Float(f64::from_le_bytes(take_array(input)?)),
            4 => CursorValue::Decimal(take_str(input)?),
            5 => CursorValue::Text(take_str(input)?),
            6 => CursorValue::Timestamp(take_str(input)?),
            7 => CursorValue::TimestampTz(take_str(input)?),
            8 => CursorValue::Date(take_str(input)?),
            9 => CursorValue::Uuid(take_str(input)?),
            _ => return None,
        });
    }
    Some(values)
}

fn tagged_str(out: &mut Vec<u8>, tag: u8, s: &str) {
    out.push(tag);
    put_str(out, s);
}

/// Appends `n`, little-endian.
pub fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends `n`, little-endian.
pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends `s`, its length first.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn take_u8(input: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = input.split_first()?;
    *input = rest;
    Some(b)
}

fn take_array<const N: usize>(input: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = input.split_first_chunk::<N>()?;
    *input = rest;
    Some(*head)
}

/// Reads a little-endian `u32` from the front of `input`.
pub fn take_u32(input: &mut &[u8]) -> Option<u32> {
    take_array(input).map(u32::from_le_bytes)
}

/// Reads a little-endian `u64` from the front of `input`.
pub fn take_u64(input: &mut &[u8]) -> Option<u64> {
    take_array(input).map(u64::from_le_bytes)
}

/// Reads a length-prefixed string from the front of `input`.
pub fn take_str(input: &mut &[u8]) -> Option<String> {
    let n = take_u32(input)? as usize;
    if n > input.len() {
        return None;
    }
    let (s, rest) = input.split_at(n);
    *input = rest;
    String::from_utf8(s.to_vec()).ok()
}

fn position_bytes(position: &Position) -> Vec<u8> {
    // The serialisation of a position is fixed by its type: same position,
    // same bytes, in every version that can read it.
    serde_json::to_vec(position).unwrap_or_default()
}

/// The stable id of the record at `position` in `pipeline`: the same record
/// read again (after a crash, a retry or a replay) has the same id.
pub fn event_id(pipeline: &str, position: &Position) -> String {
    digest(&[b"event", pipeline.as_bytes(), &position_bytes(position)])
}

/// The idempotency key of a batch: derived from the pipeline and the source
/// positions it covers (first, last and count), so a batch sent again after
/// a crash carries the same key for the same records.
pub fn batch_key(pipeline: &str, first: &Position, last: &Position, count: usize) -> String {
    digest(&[
        b"batch",
        pipeline.as_bytes(),
        &position_bytes(first),
        &position_bytes(last),
        count.to_string().as_bytes(),
    ])
}

/// The idempotency key of a batch named by every position it holds: for
/// sources whose records may be read again in another interleaving (a
/// broker's queues or partitions), where the first and last positions and
/// the count do not say which records lie between.
pub fn batch_key_of<'a>(
    pipeline: &str,
    positions: impl IntoIterator<Item = &'a Position>,
) -> String {
    let mut bytes = Vec::new();
    for p in positions {
        let encoded = position_bytes(p);
        bytes.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&encoded);
    }
    digest(&[b"batch-of", pipeline.as_bytes(), &bytes])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(values: Vec<CursorValue>) -> Position {
        Position::Cursor { values }
    }

    #[test]
    fn a_batch_named_by_its_positions_differs_when_its_middle_does() {
        let m = |id: &str| Position::Message { id: id.into() };
        let a = batch_key_of("p", &[m("1"), m("2"), m("3")]);
        assert_eq!(a, batch_key_of("p", &[m("1"), m("2"), m("3")]));
        assert_ne!(a, batch_key_of("p", &[m("1"), m("4"), m("3")]));
        assert_ne!(a, batch_key_of("q", &[m("1"), m("2"), m("3")]));
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = pos(vec![
            CursorValue::TimestampTz("2025-05-14T12:00:00Z".into()),
            CursorValue::Int(7),
        ]);
        let b = pos(vec![
            CursorValue::TimestampTz("2025-05-14T12:00:00Z".into()),
            CursorValue::Int(8),
        ]);
        assert_eq!(event_id("p", &a), event_id("p", &a.clone()));
        assert_eq!(event_id("p", &a).len(), 32);
        assert_ne!(event_id("p", &a), event_id("p", &b));
        assert_ne!(event_id("p", &a), event_id("q", &a));
        assert_eq!(batch_key("p", &a, &b, 2), batch_key("p", &a, &b, 2));
        assert_ne!(batch_key("p", &a, &b, 2), batch_key("p", &a, &b, 3));
        assert_ne!(batch_key("p", &a, &b, 2), event_id("p", &a));
        // Pinned: a change here would break receivers' deduplication
        // across an upgrade (computed independently with Python's hashlib).
        assert_eq!(event_id("p", &a), "cbbb61e7fe1aa52c35405e77d648af73");
    }

    #[test]
    fn positions_round_trip_through_their_binary_form() {
        let key = vec![
            CursorValue::Int(-7),
            CursorValue::Uint(u64::MAX),
            CursorValue::Float(1.5),
            CursorValue::Decimal("12.50".into()),
            CursorValue::Text("a\u{e9}".into()),
            CursorValue::Timestamp("2025-05-14T12:00:00".into()),
            CursorValue::TimestampTz("2025-05-14T12:00:00Z".into()),
            CursorValue::Date("2025-05-14".into()),
            CursorValue::Uuid("1b4e28ba-2fa1-11d2-883f-0016541b7b3a".into()),
        ];
        let all = [
            pos(key.clone()),
            Position::Lsn {
                lsn: 1 << 40,
                index: 3,
            },
            Position::Snapshot {
                lsn: 9,
                table: "public.t".into(),
                key: key.clone(),
            },
            Position::SnapshotDone { lsn: 10 },
            Position::Binlog {
                file: "b.000001".into(),
                pos: 4,
                index: 2,
                gtid: Some("0-1-5".into()),
            },
            Position::Binlog {
                file: "b.000001".into(),
                pos: 4,
                index: 2,
                gtid: None,
            },
            Position::BinlogSnapshot {
                file: "f".into(),
                pos: 1,
                table: "t".into(),
                key: key.clone(),
            },
            Position::BinlogResume {
                file: "f".into(),
                pos: 2,
            },
            Position::BinlogBackfill {
                file: "f".into(),
                pos: 3,
                table: "t".into(),
                key: key.clone(),
            },
            Position::FirstLoad {
                hwm: key.clone(),
                page: 7,
                tuple: 65535,
            },
            Position::FirstLoadDone { hwm: key },
            Position::SnapshotRow {
                lsn: 11,
                table: "public.t".into(),
                page: u32::MAX,
                tuple: 1,
            },
        ];
        let mut bytes = Vec::new();
        for p in &all {
            p.write_binary(&mut bytes);
        }
        let mut input = bytes.as_slice();
        for p in &all {
            assert_eq!(Position::read_binary(&mut input).as_ref(), Some(p));
        }
        assert!(input.is_empty());
        // Truncated or unknown input is refused, never misread.
        for cut in 0..bytes.len().min(40) {
            let mut short = &bytes[..cut];
            let _ = Position::read_binary(&mut short);
        }
        assert_eq!(Position::read_binary(&mut &[99u8][..]), None);
        assert_eq!(Position::read_binary(&mut &[][..]), None);
    }

    #[test]
    fn records_encode_once_as_json_objects() {
        let mut w = ObjectWriter::with_capacity(16);
        w.key("id").i64(7);
        w.key("name \"q\"").str("line\nbreak");
        w.key("ok").bool(true);
        w.key("none").null();
        w.key("tags").strs(&["a", "b"]);
        w.key("nested").value(&serde_json::json!({"x": [1, 2.5]}));
        let json = w.finish();
        let value: Value = serde_json::from_str(json.as_str()).expect("valid JSON");
        assert_eq!(
            value,
            serde_json::json!({"id": 7, "name \"q\"": "line\nbreak", "ok": true, "none": null,
                               "tags": ["a", "b"], "nested": {"x": [1, 2.5]}})
        );
        assert_eq!(json.field("ok"), Some(Value::Bool(true)));
        assert_eq!(json.field("missing"), None);
        assert_eq!(ObjectWriter::default().finish().as_str(), "{}");
        assert_eq!(Json::from_map(&json.to_map()), json);
        assert!(Json::parse("[1]").is_err());
        assert!(Json::parse("{").is_err());
        assert_eq!(
            Json::parse(" {\"a\":1}").map(|j| j.field("a")),
            Ok(Some(Value::from(1)))
        );
    }

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0u64, 0x0016_B374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/1"), Some(1));
        for bad in ["", "1", "x/1", "1/", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
