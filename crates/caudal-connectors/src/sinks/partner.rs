//! What the HTTP sink adds to each request so the partner knows it:
//! basic credentials, an OAuth2 client-credentials token, or an HMAC
//! signature; and the TLS client it sends with (custom CA, client
//! certificate).
//!
//! Promises:
//! - **Secrets stay secret.** Credentials, tokens and signatures are
//!   marked sensitive on the request, and no error or log line carries
//!   them.
//! - **A token is fetched once for everyone.** Concurrent deliveries wait
//!   for one token request; the token is reused until a fifth of its life
//!   (at most a minute) is left, then fetched again. If that early fetch
//!   fails, the token is used on until it expires; a failed fetch is not
//!   tried again for a second, and deliveries meanwhile get its error.
//! - **A token refused is replaced once.** A 401 answered to a token drops
//!   it; the delivery fetches a new one and sends again once.
//! - **Failing to get a token loses nothing.** It is a temporary failure
//!   of the batch, retried by the delivery policy, never a rejection.
//! - **The signed string is exact** (docs/delivery.md): `t`, method, path
//!   with its query, and the body bytes as sent, joined by `\n`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use caudal_core::config::{ClientAuth, HmacAlgorithm, HttpAuth, HttpTls, OAuth2Auth};
use caudal_core::units::Secret;
use hmac::{KeyInit as _, Mac as _};
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize as _;

/// How the sink authenticates, ready to apply.
#[derive(Debug)]
pub(crate) enum Auth {
    /// The whole `Authorization` header.
    Basic(HeaderValue),
    OAuth2(Box<TokenSource>),
    Hmac(Signer),
}

impl Auth {
    /// `tls` is the sink's: the token endpoint is reached with the same
    /// CA and client certificate.
    pub(crate) fn new(auth: &HttpAuth, tls: Option<&HttpTls>) -> Result<Self, String> {
        Ok(match auth {
            HttpAuth::Basic(b) => {
                let password = b
                    .password
                    .read()
                    .map_err(|e| format!("auth.basic.password: {e}"))?;
                let raw = format!("{}:{}", b.user, password.expose());
                let mut value = HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
                .map_err(|_| "auth.basic: the credentials are not valid in a header".to_string())?;
                value.set_sensitive(true);
                Self::Basic(value)
            }
            HttpAuth::Oauth2(o) => Self::OAuth2(Box::new(TokenSource::new(o, tls)?)),
            HttpAuth::Hmac(h) => Self::Hmac(Signer {
                secret: h
                    .secret
                    .read()
                    .map_err(|e| format!("auth.hmac.secret: {e}"))?,
                header: HeaderName::from_bytes(h.header.as_bytes())
                    .map_err(|_| format!("auth.hmac.header {:?} is not a header name", h.header))?,
                algorithm: h.algorithm,
            }),
        })
    }
}

/// Why an authenticated request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// The request failed (connect, TLS, timeout).
    Request(reqwest::Error),
    /// No credentials to send: the OAuth2 token endpoint failed.
    Auth(String),
}

/// Sends `method url` with `headers` and `body` through `client`, with
/// `auth` applied: a basic `Authorization`, an HMAC signature of this
/// very request, or the cached OAuth2 token (a 401 answered to a token
/// drops it, and the request is sent once more with a new one).
pub(crate) async fn send(
    client: &reqwest::Client,
    auth: Option<&Auth>,
    method: &reqwest::Method,
    url: &reqwest::Url,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
) -> Result<reqwest::Response, SendError> {
    use reqwest::header::AUTHORIZATION;
    let request = |headers: reqwest::header::HeaderMap| {
        let request = client.request(method.clone(), url.clone()).headers(headers);
        // No body at all (no `Content-Length: 0` on a GET) when empty.
        if body.is_empty() {
            request
        } else {
            request.body(body.clone())
        }
    };
    let mut headers = headers;
    match auth {
        None => request(headers).send().await.map_err(SendError::Request),
        Some(Auth::Basic(value)) => {
            headers.insert(AUTHORIZATION, value.clone());
            request(headers).send().await.map_err(SendError::Request)
        }
        Some(Auth::Hmac(signer)) => {
            let (name, value) = signer.sign(jiff::Timestamp::now().as_second(), method, url, &body);
            headers.insert(name, value);
            request(headers).send().await.map_err(SendError::Request)
        }
        Some(Auth::OAuth2(tokens)) => {
            let token = tokens.authorization().await.map_err(SendError::Auth)?;
            let mut first = headers.clone();
            first.insert(AUTHORIZATION, token.clone());
            let response = request(first).send().await.map_err(SendError::Request)?;
            if response.status() != reqwest::StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            // The token was refused (revoked, or expired early): once
            // more with a new one.
            let _ = response.bytes().await;
            tokens.refused(&token).await;
            let token = tokens.authorization().await.map_err(SendError::Auth)?;
            headers.insert(AUTHORIZATION, token);
            request(headers).send().await.map_err(SendError::Request)
        }
    }
}

/// An HTTP client that authenticates the way a partner's endpoint asks
/// (`auth`, `tls`), for the callers besides the HTTP sink: alert
/// notifiers and workflow `http` tasks. Keep one per endpoint: it caches
/// its OAuth2 token.
#[derive(Debug)]
pub struct PartnerClient {
    client: reqwest::Client,
    auth: Option<Auth>,
}

impl PartnerClient {
    /// A client from `builder` (its timeouts and agent), with `tls`'s CA
    /// and client certificate and `auth`'s credentials, read now from the
    /// environment or files. With `auth`, redirects are not followed: the
    /// credentials (an HMAC header, say) would go to wherever a redirect
    /// points, and a redirected POST loses its body.
    pub fn new(
        builder: reqwest::ClientBuilder,
        auth: Option<&HttpAuth>,
        tls: Option<&HttpTls>,
    ) -> Result<Self, String> {
        let builder = if auth.is_some() {
            builder.redirect(reqwest::redirect::Policy::none())
        } else {
            builder
        };
        let builder = match tls {
            Some(tls) => with_tls(builder, tls)?,
            None => builder,
        };
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let auth = auth.map(|a| Auth::new(a, tls)).transpose()?;
        Ok(Self { client, auth })
    }

    /// Sends one request with the credentials applied (see [`send`]).
    pub async fn send(
        &self,
        method: &reqwest::Method,
        url: &reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, SendError> {
        send(&self.client, self.auth.as_ref(), method, url, headers, body).await
    }
}

/// Adds the custom CA and the client certificate of `tls` to `builder`.
pub(crate) fn with_tls(
    builder: reqwest::ClientBuilder,
    tls: &HttpTls,
) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = builder;
    if let Some(ca) = &tls.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("tls.ca: cannot read {ca}: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("tls.ca: {ca} holds no PEM certificate: {e}"))?;
        if certs.is_empty() {
            return Err(format!("tls.ca: {ca} holds no PEM certificate"));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let mut pem =
            std::fs::read(cert).map_err(|e| format!("tls.cert: cannot read {cert}: {e}"))?;
        let key = key.read().map_err(|e| format!("tls.key: {e}"))?;
        pem.push(b'\n');
        pem.extend_from_slice(key.expose().as_bytes());
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            format!("tls: the client certificate {cert} or its key is not usable: {e}")
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

/// OAuth2 client credentials: one cached token, fetched when missing or
/// about to expire.
#[derive(Debug)]
pub(crate) struct TokenSource {
    token_url: reqwest::Url,
    client_id: String,
    client_secret: Secret,
    scopes: String,
    audience: Option<String>,
    client_auth: ClientAuth,
    client: reqwest::Client,
    state: tokio::sync::Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    token: Option<Token>,
    /// The last fetch that failed: when, and why.
    failed: Option<(Instant, String)>,
}

/// How long a failed token fetch is not tried again.
const FETCH_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Token {
    value: HeaderValue,
    /// When to fetch a new one (a while before it expires); none: only
    /// when refused.
    refresh_at: Option<Instant>,
    /// When it expires; none: not said.
    expires_at: Option<Instant>,
}

/// What a token endpoint answers (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    /// Seconds; some servers send it as a string (`"3599"`).
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<f64>,
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// The parts of a token endpoint's refusal that may be shown (RFC 6749
/// §5.2); nothing else of its body is, as it may echo the request.
#[derive(serde::Deserialize)]
struct TokenRefusal {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl TokenSource {
    fn new(o: &OAuth2Auth, tls: Option<&HttpTls>) -> Result<Self, String> {
        let token_url =
            reqwest::Url::parse(&o.token_url).map_err(|e| format!("auth.oauth2.token_url: {e}"))?;
        let client_secret = o
            .client_secret
            .read()
            .map_err(|e| format!("auth.oauth2.client_secret: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .timeout(o.timeout.as_std())
            .user_agent(concat!("caudal/", env!("CARGO_PKG_VERSION")))
            // A redirected POST would lose its form.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = tls {
            builder = with_tls(builder, tls)?;
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the token client: {e}"))?;
        Ok(Self {
            token_url,
            client_id: o.client_id.clone(),
            client_secret,
            scopes: o.scopes.join(" "),
            audience: o.audience.clone(),
            client_auth: o.client_auth,
            client,
            state: tokio::sync::Mutex::default(),
        })
    }

    /// The token endpoint, for messages (without credentials).
    fn endpoint(&self) -> String {
        caudal_core::units::redact_url(self.token_url.as_str())
    }

    /// The `Authorization` value to send now: the cached token while it
    /// is fresh, else a new one.
    pub(crate) async fn authorization(&self) -> Result<HeaderValue, String> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(t) = state.token.as_ref()
            && t.refresh_at.is_none_or(|at| now < at)
        {
            return Ok(t.value.clone());
        }
        // Still valid, though due for renewal.
        let usable = state
            .token
            .as_ref()
            .filter(|t| t.expires_at.is_none_or(|at| now < at))
            .map(|t| t.value.clone());
        if let Some((at, why)) = &state.failed
            && now.duration_since(*at) < FETCH_BACKOFF
        {
            return usable.ok_or_else(|| why.clone());
        }
        match self.fetch().await {
            Ok(token) => {
                let value = token.value.clone();
                state.token = Some(token);
                state.failed = None;
                Ok(value)
            }
            Err(why) => {
                state.failed = Some((Instant::now(), why.clone()));
                match usable {
                    Some(v) => {
                        tracing::warn!(reason = %why, "cannot renew the OAuth2 token; using it until it expires");
                        Ok(v)
                    }
                    None => Err(why),
                }
            }
        }
    }

    /// Asks the token endpoint for a token now, bypassing the cache, and
    /// keeps nothing (`caudal doctor`): how long the token would live, or
    /// why none was given.
    pub(crate) async fn probe(&self) -> Result<(String, Option<Duration>), String> {
        let token = self.fetch().await?;
        let life = token
            .expires_at
            .map(|at| at.saturating_duration_since(Instant::now()));
        Ok((self.endpoint(), life))
    }

    /// Drops `refused` if it is still the cached token: the next call
    /// fetches a new one.
    pub(crate) async fn refused(&self, refused: &HeaderValue) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| t.value == *refused) {
            state.token = None;
        }
    }

    async fn fetch(&self) -> Result<Token, String> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if !self.scopes.is_empty() {
            form.push(("scope", &self.scopes));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a));
        }
        let mut request = self.client.post(self.token_url.clone());
        match self.client_auth {
            ClientAuth::Basic => {
                request = request.basic_auth(&self.client_id, Some(self.client_secret.expose()));
            }
            ClientAuth::Body => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
            }
        }
        let fetched = Instant::now();
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| format!("token request to {} failed: {e}", self.endpoint()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("token answer from {} unreadable: {e}", self.endpoint()))?;
        if !status.is_success() {
            // Only the error document's code and description (RFC 6749
            // §5.2): a proxy's page might echo the form, secret included.
            let said = serde_json::from_slice::<TokenRefusal>(&body)
                .map(|r| {
                    let mut text: String = r.error.chars().take(100).collect();
                    if let Some(d) = r.error_description {
                        text.push_str(": ");
                        text.extend(d.chars().take(200));
                    }
                    text
                })
                .unwrap_or_else(|_| "no OAuth2 error document".into());
            return Err(format!(
                "the token endpoint {} answered {status} ({said})",
                self.endpoint()
            ));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "the token endpoint {} answered without an access_token: {e}",
                self.endpoint()
            )
        })?;
        if let Some(kind) = &answer.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(format!(
                "the token endpoint {} gave a {kind:?} token; only bearer tokens are supported",
                self.endpoint()
            ));
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {}", answer.access_token))
            .map_err(|_| "the access token is not valid in a header".to_string())?;
        value.set_sensitive(true);
        let life = answer
            .expires_in
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(1e9)));
        let refresh_at = life.map(|life| fetched + life - (life / 5).min(Duration::from_secs(60)));
        let expires_at = life.map(|life| fetched + life);
        tracing::debug!(token_url = %self.endpoint(), "fetched an OAuth2 token");
        Ok(Token {
            value,
            refresh_at,
            expires_at,
        })
    }
}

/// Signs requests with a shared secret.
#[derive(Debug)]
pub(crate) struct Signer {
    secret: Secret,
    header: HeaderName,
    algorithm: HmacAlgorithm,
}

impl Signer {
    /// The header and its value for a request sent at `unix` seconds:
    /// `t=<unix>,v1=<hex HMAC of "t\nMETHOD\npath?query\n" + body>`.
    pub(crate) fn sign(
        &self,
        unix: i64,
        method: &reqwest::Method,
        url: &reqwest::Url,
        body: &[u8],
    ) -> (HeaderName, HeaderValue) {
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let head = format!("{unix}\n{}\n{target}\n", method.as_str());
        let key = self.secret.expose().as_bytes();
        let digest: Vec<u8> = match self.algorithm {
            HmacAlgorithm::Sha256 => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
                    .expect("HMAC takes a key of any length");
                mac.update(head.as_bytes());
                mac.update(body);
                mac.finalize().into_bytes().to_vec()
            }
            HmacAlgorithm::Sha512 => {
                let mut mac = hmac::Hmac::<sha2::Sha512>::new_from_slice(key)
                    .expect("HMAC takes a key of any length");
                mac.update(head.as_bytes());
                mac.update(body);
                mac.finalize().into_bytes().to_vec()
            }
        };
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let value = HeaderValue::from_str(&format!("t={unix},v1={hex}"))
            .expect("digits, letters, '=' and ',' are a valid header value");
        (self.header.clone(), value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_time_method_target_and_body() {
        let signer = Signer {
            secret: Secret::new("s3cret"),
            header: HeaderName::from_static("x-signature"),
            algorithm: HmacAlgorithm::Sha256,
        };
        let url = reqwest::Url::parse("https://partner.example/in?x=1").unwrap();
        let (_, v) = signer.sign(1_700_000_000, &reqwest::Method::POST, &url, b"[1]");
        // echo -n $'1700000000\nPOST\n/in?x=1\n[1]' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            v.to_str().unwrap(),
            "t=1700000000,v1=19049154d973d0de3a6f3f6abe3375fc0a7be5ca1e5f9ea2d4f6f25afc79acda"
        );
    }
}
