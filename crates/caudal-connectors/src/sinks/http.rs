//! The HTTP sink: each batch becomes one request whose body is the JSON
//! array of records, or whatever a minijinja template renders from them.
//!
//! The sink sends once and classifies the answer with the sink's
//! [`StatusClasses`] (its `status` lists over the defaults); it never
//! retries by itself. By default success is any 2xx; 408, 429 and 5xx
//! except 501 (and connection errors and timeouts) are temporary; 413 asks
//! the engine to split the batch; other statuses reject it. `Retry-After`
//! (seconds or an HTTP date) is passed on to the engine.

use std::io::Write as _;
use std::time::Duration;

use caudal_core::config::HttpSinkConfig;
use caudal_core::delivery::{StatusClass, StatusClasses};
use caudal_core::sink::{Batch, Delivery, Event, Sink};
use caudal_core::{Error, ErrorKind, Result};
use reqwest::header::{
    CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use serde::Serialize;

/// How much of a response body is kept for the operator.
const BODY_EXCERPT_BYTES: usize = 2048;
/// The template name; not ending in `.html`/`.json`, so nothing is escaped
/// beyond what the template asks for.
const TEMPLATE_NAME: &str = "body";

/// A configured HTTP endpoint.
#[derive(Debug)]
pub struct HttpSink {
    name: String,
    /// Whether the body template reads `events` (ids are then computed).
    template_uses_events: bool,
    /// The text around the array of records when the body template is
    /// only `{{ records | tojson }}` in literal text (the common envelope):
    /// then the records are copied into the body as encoded, not rendered.
    envelope: Option<(String, String)>,
    /// Header carrying each batch's idempotency key, unless disabled.
    idempotency_header: Option<HeaderName>,
    url: reqwest::Url,
    method: reqwest::Method,
    headers: HeaderMap,
    gzip: bool,
    client: reqwest::Client,
    template: Option<minijinja::Environment<'static>>,
    classes: StatusClasses,
    /// How the partner knows the sink (`auth`).
    auth: Option<super::partner::Auth>,
    /// The longest a delivery's sending may take, token included.
    send_deadline: Duration,
}

/// What a body template sees.
#[derive(Serialize)]
struct TemplateContext<'a> {
    /// The pipeline name.
    pipeline: &'a str,
    /// The batch's records (their data), in source order.
    records: &'a [serde_json::Value],
    /// The same records with their identities: `id` (stable event id),
    /// `key`, `data`.
    events: Vec<TemplateEvent<'a>>,
    /// The batch: `key` (its idempotency key) and `size`.
    batch: TemplateBatch<'a>,
}

#[derive(Serialize)]
struct TemplateEvent<'a> {
    id: String,
    key: Option<&'a str>,
    data: &'a serde_json::Value,
}

#[derive(Serialize)]
struct TemplateBatch<'a> {
    key: &'a str,
    size: usize,
}

impl HttpSink {
    /// Builds the sink; fails on an invalid URL, header or template.
    pub fn new(name: &str, config: &HttpSinkConfig) -> Result<Self> {
        let cfg_err = |msg: String| Error::new(ErrorKind::Config, format!("sink {name:?}: {msg}"));
        let url = reqwest::Url::parse(&config.url).map_err(|e| cfg_err(format!("url: {e}")))?;
        let method = reqwest::Method::from_bytes(config.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| cfg_err(format!("method {:?} is not an HTTP method", config.method)))?;
        let mut headers = HeaderMap::new();
        let content_type = HeaderValue::from_str(&config.content_type).map_err(|_| {
            cfg_err(format!(
                "content_type {:?} is not a valid header value",
                config.content_type
            ))
        })?;
        headers.insert(CONTENT_TYPE, content_type);
        for (key, value) in &config.headers {
            let name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| cfg_err(format!("headers.{key}: not a valid header name")))?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                cfg_err(format!(
                    "headers.{key}: the value is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if config.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let template = match &config.body {
            None => None,
            Some(body) => {
                caudal_core::config::sinks::check_body_template(body)
                    .map_err(|m| cfg_err(format!("body: {m}")))?;
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
                env.add_template_owned(TEMPLATE_NAME, body.clone())
                    .map_err(|e| cfg_err(format!("body template: {e}")))?;
                Some(env)
            }
        };
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout.as_std())
            .connect_timeout(config.timeout.as_std().min(Duration::from_secs(10)))
            .user_agent(concat!("caudal/", env!("CARGO_PKG_VERSION")))
            // A redirect would turn a POST into a body-less GET whose 2xx
            // looks like a delivery; a 3xx is an answer to act on instead.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = &config.tls {
            builder = super::partner::with_tls(builder, tls).map_err(cfg_err)?;
        }
        let client = builder.build().map_err(|e| {
            Error::with_source(ErrorKind::Internal, "cannot build the HTTP client", e)
        })?;
        let auth = config
            .auth
            .as_ref()
            .map(|a| super::partner::Auth::new(a, config.tls.as_ref()))
            .transpose()
            .map_err(cfg_err)?;
        let mut classes = StatusClasses::from_config(&config.delivery.status);
        if auth.is_some() {
            // With credentials configured, a refusal of them is a problem
            // of ours (a rotated secret, a clock, a scope) to fix and
            // retry, not a verdict on the records.
            classes = classes
                .unless_listed(401, StatusClass::Retry)
                .unless_listed(403, StatusClass::Retry);
        }
        // A token request and a second send after a 401 fit in this; a
        // delivery never takes longer.
        let send_deadline = config.timeout.as_std() * 2
            + config.auth.as_ref().map_or(Duration::ZERO, |a| match a {
                caudal_core::config::HttpAuth::Oauth2(o) => o.timeout.as_std() * 2,
                _ => Duration::ZERO,
            });
        let idempotency_header = if config.idempotency_header.is_empty() {
            None
        } else {
            Some(
                HeaderName::from_bytes(config.idempotency_header.as_bytes()).map_err(|_| {
                    cfg_err(format!(
                        "idempotency_header {:?} is not a valid header name",
                        config.idempotency_header
                    ))
                })?,
            )
        };
        let envelope = config.body.as_deref().and_then(records_envelope);
        let template_uses_events = template.as_ref().is_some_and(|env| {
            env.get_template(TEMPLATE_NAME)
                .is_ok_and(|t| t.undeclared_variables(false).contains("events"))
        });
        Ok(Self {
            name: name.to_string(),
            template_uses_events,
            envelope,
            idempotency_header,
            url,
            method,
            headers,
            gzip: config.gzip,
            client,
            template,
            classes,
            auth,
            send_deadline,
        })
    }

    /// Sends `body` with `headers` and the sink's authentication; a 401
    /// answered to an OAuth2 token is sent once more with a new token.
    async fn send(
        &self,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> std::result::Result<reqwest::Response, String> {
        use super::partner::SendError;
        super::partner::send(
            &self.client,
            self.auth.as_ref(),
            &self.method,
            &self.url,
            headers,
            body,
        )
        .await
        .map_err(|e| match e {
            SendError::Auth(why) => why,
            SendError::Request(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                format!(
                    "{} {}: request {what}: {}",
                    self.method,
                    self.url,
                    error_chain(&e)
                )
            }
        })
    }

    /// Whether the receiver can be reached and the sink's credentials
    /// work, without sending a record (`caudal doctor`).
    ///
    /// `reach`: a `HEAD` request to the URL (no body, no credentials, no
    /// idempotency key) proves the connection and the TLS handshake (with
    /// the sink's `tls`); any HTTP answer counts, since the endpoint may
    /// only take the sink's method. `auth`: an OAuth2 token fetched from
    /// the token endpoint proves the client credentials; basic and HMAC
    /// credentials are checked only by the receiver on a real delivery, so
    /// they are reported as not checked.
    pub async fn probe(&self) -> Vec<caudal_core::probe::Finding> {
        use caudal_core::probe::Finding;
        let url = caudal_core::units::redact_url(self.url.as_str());
        let reach = match self.client.head(self.url.clone()).send().await {
            Ok(response) => Finding::ok(
                "reach",
                format!("{url} answered HEAD with {}", response.status()),
            ),
            Err(e) => {
                // The url may carry credentials: never in the text.
                let e = e.without_url();
                let chain = error_chain(&e);
                let lower = chain.to_ascii_lowercase();
                let fix = if lower.contains("certificate") || lower.contains("tls") {
                    "the receiver's TLS certificate is not trusted or does not match the host: \
                     set `tls.ca` to its CA's PEM file, or correct the URL's host"
                } else if e.is_timeout() {
                    "the host does not answer: check the URL's host and port, and firewalls \
                     between here and the receiver"
                } else {
                    "check the URL's host and port, that the receiver runs, and DNS or \
                     firewalls between here and it"
                };
                Finding::fail("reach", format!("HEAD {url} failed: {chain}"), fix)
            }
        };
        let auth = match &self.auth {
            None => None,
            Some(super::partner::Auth::Basic(_)) => Some(Finding::skipped(
                "auth",
                "basic credentials are checked by the receiver on a delivery; none is sent",
            )),
            Some(super::partner::Auth::Hmac(_)) => Some(Finding::skipped(
                "auth",
                "HMAC signatures are checked by the receiver on a delivery; none is sent",
            )),
            Some(super::partner::Auth::OAuth2(tokens)) => Some(match tokens.probe().await {
                Ok((endpoint, life)) => Finding::ok(
                    "auth",
                    format!(
                        "{endpoint} issued an OAuth2 token{}",
                        life.map_or_else(String::new, |l| format!(" valid for {}s", l.as_secs()))
                    ),
                ),
                Err(why) => {
                    let fix = if why.contains("answered") {
                        "check auth.oauth2.client_id and client_secret (and scopes, audience) \
                         with the partner"
                    } else {
                        "check that auth.oauth2.token_url is right and reachable from here"
                    };
                    Finding::fail("auth", why, fix)
                }
            }),
        };
        std::iter::once(reach).chain(auth).collect()
    }

    /// The request body for a batch (before compression).
    pub fn encode(&self, pipeline: &str, key: &str, records: &[Event]) -> Result<Vec<u8>> {
        match (&self.template, &self.envelope) {
            (None, _) => Ok(json_array(records, "", "")),
            (Some(_), Some((before, after))) => Ok(json_array(records, before, after)),
            (Some(env), None) => {
                let template = env.get_template(TEMPLATE_NAME).map_err(|e| {
                    Error::with_source(ErrorKind::Internal, "body template missing", e)
                })?;
                // The template needs values: the records are parsed here.
                let values: Vec<serde_json::Value> =
                    records.iter().map(|r| r.data.to_value()).collect();
                let ctx = TemplateContext {
                    pipeline,
                    records: &values,
                    events: records
                        .iter()
                        .zip(&values)
                        .filter(|_| self.template_uses_events)
                        .map(|(e, data)| TemplateEvent {
                            id: e.id(pipeline),
                            key: e.key.as_deref(),
                            data,
                        })
                        .collect(),
                    batch: TemplateBatch {
                        key,
                        size: records.len(),
                    },
                };
                template
                    .render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
                    .map(String::into_bytes)
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::Rejected,
                            format!(
                                "sink {:?}: the body template failed on this batch",
                                self.name
                            ),
                            e,
                        )
                    })
            }
        }
    }

    fn compress(body: &[u8]) -> Result<Vec<u8>> {
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::fast(),
        );
        enc.write_all(body)
            .and_then(|()| enc.finish())
            .map_err(|e| Error::with_source(ErrorKind::Internal, "gzip failed", e))
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn deliver(&self, batch: Batch<'_>) -> Delivery {
        let body = match self.encode(batch.pipeline, batch.key, batch.events) {
            Ok(b) => b,
            Err(e) => {
                return Delivery::Rejected {
                    reason: e.report(),
                    status: None,
                    body_excerpt: String::new(),
                };
            }
        };
        let body = if self.gzip {
            match Self::compress(&body) {
                Ok(b) => b,
                Err(e) => {
                    return Delivery::Retry {
                        reason: e.report(),
                        status: None,
                        after: None,
                    };
                }
            }
        } else {
            body
        };
        let mut headers = self.headers.clone();
        if let Some(name) = &self.idempotency_header
            && let Ok(value) = HeaderValue::from_str(batch.key)
        {
            headers.insert(name.clone(), value);
        }
        metrics::counter!("caudal_sink_sent_bytes_total", "pipeline" => batch.pipeline.to_string(), "sink" => self.name.clone())
            .increment(body.len() as u64);
        let sent = tokio::time::timeout(
            self.send_deadline,
            self.send(headers, bytes::Bytes::from(body)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{} {}: no answer within {:?}",
                self.method, self.url, self.send_deadline
            ))
        });
        match sent {
            // Not sent, or no token to send it with: temporary.
            Err(reason) => Delivery::Retry {
                reason,
                status: None,
                after: None,
            },
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, jiff::Timestamp::now()));
                let reason = || format!("{} {} answered {status}", self.method, self.url);
                match self.classes.classify(status) {
                    StatusClass::Success => {
                        // Drain the body so the connection can be reused.
                        let _ = response.bytes().await;
                        Delivery::Delivered {
                            status: Some(status),
                        }
                    }
                    StatusClass::Retry => {
                        let _ = response.bytes().await;
                        Delivery::Retry {
                            reason: reason(),
                            status: Some(status),
                            after: retry_after,
                        }
                    }
                    StatusClass::Split => Delivery::Split {
                        reason: reason(),
                        status: Some(status),
                        body_excerpt: excerpt(response).await,
                    },
                    StatusClass::Reject => Delivery::Rejected {
                        reason: reason(),
                        status: Some(status),
                        body_excerpt: excerpt(response).await,
                    },
                }
            }
        }
    }
}

/// The records as a JSON array, their encoded text copied, between
/// `before` and `after`.
fn json_array(records: &[Event], before: &str, after: &str) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.data.len() + 1).sum();
    let mut out = Vec::with_capacity(before.len() + size + after.len() + 2);
    out.extend_from_slice(before.as_bytes());
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r.data.as_str().as_bytes());
    }
    out.push(b']');
    out.extend_from_slice(after.as_bytes());
    out
}

/// When a body template is nothing but `{{ records | tojson }}` in
/// literal text, that text before and after it: such a body is the array
/// of encoded records in an envelope, e.g. `{"requests": [...]}`. Like the
/// rendered template it is valid JSON with the same values; the records
/// keep their encoding (compact, no `\u003c` escapes) instead of
/// `tojson`'s.
pub fn records_envelope(template: &str) -> Option<(String, String)> {
    let open = template.find("{{")?;
    let close = open + template[open..].find("}}")?;
    let expression: String = template[open + 2..close]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let (before, mut after) = (&template[..open], &template[close + 2..]);
    let literal = |t: &str| {
        !["{{", "{%", "{#", "}}", "%}", "#}"]
            .iter()
            .any(|m| t.contains(m))
    };
    if expression != "records|tojson" || !literal(before) || !literal(after) {
        return None;
    }
    // Templates drop one trailing newline (minijinja's default).
    if let Some(stripped) = after.strip_suffix('\n') {
        after = stripped.strip_suffix('\r').unwrap_or(stripped);
    }
    Some((before.to_string(), after.to_string()))
}

/// `Retry-After` as seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let wait = when.duration_since(now);
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

async fn excerpt(response: reqwest::Response) -> String {
    match response.bytes().await {
        Ok(bytes) => {
            let cut = &bytes[..bytes.len().min(BODY_EXCERPT_BYTES)];
            String::from_utf8_lossy(cut).into_owned()
        }
        Err(e) => format!("(body unreadable: {e})"),
    }
}

/// An error with its causes, `: `-separated (reqwest's own message names
/// no cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let classes = StatusClasses::default();
        let classify = |status| classes.classify(status);
        assert_eq!(classify(200), StatusClass::Success);
        assert_eq!(classify(204), StatusClass::Success);
        assert_eq!(classify(429), StatusClass::Retry);
        assert_eq!(classify(408), StatusClass::Retry);
        assert_eq!(classify(503), StatusClass::Retry);
        assert_eq!(classify(501), StatusClass::Reject);
        assert_eq!(classify(400), StatusClass::Reject);
        assert_eq!(classify(301), StatusClass::Reject);
        assert_eq!(classify(413), StatusClass::Split);
    }

    #[test]
    fn an_envelope_template_is_recognised_and_nothing_else() {
        assert_eq!(
            records_envelope(r#"{"requests": {{ records | tojson }}}"#),
            Some((r#"{"requests": "#.into(), "}".into()))
        );
        assert_eq!(
            records_envelope("{{records|tojson}}\n"),
            Some((String::new(), String::new()))
        );
        for other in [
            "{{ records | tojson(indent=2) }}",
            "{{ records | length }}",
            r#"{"p": {{ pipeline | tojson }}, "r": {{ records | tojson }}}"#,
            "{% for r in records %}{{ r | tojson }}{% endfor %}",
            "{# note #}{{ records | tojson }}",
            "no expression",
        ] {
            assert_eq!(records_envelope(other), None, "{other}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now: jiff::Timestamp = "2025-05-14T12:00:00Z".parse().expect("ts");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 14 May 2025 12:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 14 May 2025 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
