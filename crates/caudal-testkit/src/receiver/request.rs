//! One request as the [`Receiver`](super::Receiver) saw it.
//!
//! The receiver keeps the bytes exactly as they arrived and, next to them, the
//! body decoded from gzip and parsed as JSON, so tests assert on records
//! without repeating the decoding in every test.

use std::io::Read;
use std::time::Instant;

use axum::http::{HeaderMap, Method};
use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use serde_json::Value;

/// A request recorded by the [`Receiver`](super::Receiver), in arrival order.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The HTTP method (`POST`, `PUT`, ...).
    pub method: Method,
    /// The path of the request target, without the query string (`/ingest`).
    pub path: String,
    /// The query string without the leading `?`, if the target had one.
    pub query: Option<String>,
    /// Every header as sent by the client.
    pub headers: HeaderMap,
    /// The body exactly as it arrived on the wire (still gzip-compressed when
    /// `Content-Encoding: gzip` was sent).
    pub raw_body: Bytes,
    /// The body after removing a gzip `Content-Encoding`; the same bytes as
    /// [`raw_body`](Self::raw_body) when the body was not compressed, empty when
    /// decoding failed (see [`decode_error`](Self::decode_error)).
    pub body: Bytes,
    /// Why the gzip body could not be decoded, when it could not.
    pub decode_error: Option<String>,
    /// [`body`](Self::body) parsed as one JSON document, when it is one.
    pub json: Option<Value>,
    /// When the request head arrived (before its body was read and before any
    /// configured delay), for asserting on pacing and back-off.
    pub received_at: Instant,
    /// The status the receiver answered with, or `None` when it reset the
    /// connection instead of answering.
    pub status: Option<u16>,
}

impl ReceivedRequest {
    /// Builds a record from what arrived, decoding the body. `status` is filled
    /// in later, once the receiver has decided its reply.
    pub(crate) fn new(
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        raw_body: Bytes,
        received_at: Instant,
    ) -> Self {
        let (body, decode_error) = if is_gzip(&headers) {
            match gunzip(&raw_body) {
                Ok(decoded) => (Bytes::from(decoded), None),
                Err(err) => (Bytes::new(), Some(err.to_string())),
            }
        } else {
            (raw_body.clone(), None)
        };
        let json = serde_json::from_slice(&body).ok();
        Self {
            method,
            path,
            query,
            headers,
            raw_body,
            body,
            decode_error,
            json,
            received_at,
            status: None,
        }
    }

    /// The value of header `name` (case-insensitive), when present and valid
    /// UTF-8. For a repeated header this is the first value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The decoded body as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the receiver answered with a 2xx status, i.e. the client was told
    /// its data was accepted.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// The body's JSON documents: the whole body when it is one JSON document,
    /// otherwise one document per non-empty line when every line parses
    /// (newline-delimited JSON), otherwise none.
    pub fn json_documents(&self) -> Vec<Value> {
        if let Some(json) = &self.json {
            return vec![json.clone()];
        }
        let text = match std::str::from_utf8(&self.body) {
            Ok(text) => text,
            Err(_) => return Vec::new(),
        };
        let lines: Result<Vec<Value>, _> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(serde_json::from_str)
            .collect();
        lines.unwrap_or_default()
    }

    /// The records this request carried under `pointer` (an RFC 6901 JSON
    /// pointer, `""` for the whole document), taken from each of its
    /// [`json_documents`](Self::json_documents): an array there contributes
    /// each of its elements, any other value contributes itself, a missing
    /// value contributes nothing.
    pub fn records_at(&self, pointer: &str) -> Vec<Value> {
        let mut records = Vec::new();
        for document in self.json_documents() {
            match document.pointer(pointer) {
                Some(Value::Array(items)) => records.extend(items.iter().cloned()),
                Some(value) => records.push(value.clone()),
                None => {}
            }
        }
        records
    }
}

/// Whether the request declared a gzip content encoding.
fn is_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let coding = coding.trim();
            coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip")
        })
}

fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    MultiGzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use serde_json::json;
    use std::io::Write;

    fn request(
        headers: &[(&'static str, &'static str)],
        body: impl Into<Bytes>,
    ) -> ReceivedRequest {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, value.parse().expect("valid header value"));
        }
        ReceivedRequest::new(
            Method::POST,
            "/in".into(),
            None,
            map,
            body.into(),
            Instant::now(),
        )
    }

    #[test]
    fn gzip_body_is_decoded_and_parsed() {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(br#"{"a":1}"#).expect("write");
        let gz = enc.finish().expect("finish");
        let req = request(&[("content-encoding", "GZIP")], gz.clone());
        assert_eq!(req.raw_body, gz);
        assert_eq!(&req.body[..], br#"{"a":1}"#);
        assert_eq!(req.json, Some(json!({"a": 1})));
        assert_eq!(req.decode_error, None);
    }

    #[test]
    fn broken_gzip_is_reported_not_hidden() {
        let req = request(&[("content-encoding", "gzip")], &b"not gzip"[..]);
        assert!(req.decode_error.is_some());
        assert!(req.body.is_empty());
        assert_eq!(req.json, None);
    }

    #[test]
    fn records_flatten_arrays_objects_and_ndjson() {
        let req = request(
            &[],
            &br#"{"requests":[{"id":1},{"id":2}],"one":{"id":3}}"#[..],
        );
        assert_eq!(
            req.records_at("/requests"),
            vec![json!({"id":1}), json!({"id":2})]
        );
        assert_eq!(req.records_at("/one"), vec![json!({"id":3})]);
        assert!(req.records_at("/missing").is_empty());

        let array = request(&[], &b"[1,2,3]"[..]);
        assert_eq!(array.records_at(""), vec![json!(1), json!(2), json!(3)]);

        let ndjson = request(&[], &b"{\"id\":1}\n\n{\"id\":2}\n"[..]);
        assert_eq!(ndjson.json, None);
        assert_eq!(
            ndjson.records_at(""),
            vec![json!({"id":1}), json!({"id":2})]
        );
        assert_eq!(ndjson.records_at("/id"), vec![json!(1), json!(2)]);
    }

    #[test]
    fn status_decides_acceptance() {
        let mut req = request(&[], Bytes::new());
        assert!(!req.accepted());
        req.status = Some(204);
        assert!(req.accepted());
        req.status = Some(429);
        assert!(!req.accepted());
    }
}
