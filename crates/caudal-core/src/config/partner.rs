//! How an HTTP sink proves who it is to a partner (`auth`: basic,
//! OAuth2 client credentials, HMAC-signed requests) and which TLS it
//! speaks (`tls`: a custom CA, a client certificate), and the checks of
//! those settings.
//!
//! Secrets are [`SecretValue`]s: written `${ENV_VAR}` (the loader reads
//! the environment) or `{ file = "/run/secrets/…" }`, never printed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::{Duration, Secret};

/// A secret: its value (write `"${ENV_VAR}"` to keep it out of the file),
/// or `{ file = "PATH" }`, a file holding it (a trailing line break is
/// dropped). Never shown.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SecretValue {
    /// Read from this file when the sink starts.
    File {
        /// The file's path (absolute, or relative to the working directory).
        file: String,
    },
    Value(Secret),
}

impl SecretValue {
    /// The secret itself: the value, or the file's text without its
    /// trailing line break.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            Self::Value(s) => Ok(s.clone()),
            Self::File { file } => std::fs::read_to_string(file)
                .map(|text| Secret::new(text.trim_end_matches(['\r', '\n'])))
                .map_err(|e| format!("cannot read the secret file {file}: {e}")),
        }
    }
}

/// How an HTTP sink authenticates to its partner: one of `basic`,
/// `oauth2`, `hmac`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HttpAuth {
    /// `Authorization: Basic` with a user and a password.
    Basic(BasicAuth),
    /// OAuth2 client credentials: a token from `token_url`, cached until it
    /// expires, refreshed early, and refreshed once more on a 401.
    Oauth2(OAuth2Auth),
    /// Each request signed with a shared secret (docs/delivery.md).
    Hmac(HmacAuth),
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub user: String,
    pub password: SecretValue,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Auth {
    /// The authorization server's token endpoint.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretValue,
    /// Scopes asked for (sent space-separated as `scope`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The API the token is for, when the server asks for it (`audience`).
    #[serde(default)]
    pub audience: Option<String>,
    /// How the client proves itself to the token endpoint: `basic` (HTTP
    /// Basic, the default, RFC 6749 §2.3.1) or `body` (`client_id` and
    /// `client_secret` in the form).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Timeout of a token request (default `10s`).
    #[serde(default = "default_token_timeout")]
    pub timeout: Duration,
}

fn default_token_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Basic,
    Body,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacAuth {
    pub secret: SecretValue,
    /// The header carrying `t=<unix seconds>,v1=<hex signature>` (default
    /// `X-Signature`).
    #[serde(default = "default_hmac_header")]
    pub header: String,
    /// `sha256` (default) or `sha512`.
    #[serde(default)]
    pub algorithm: HmacAlgorithm,
}

/// The default header of an HMAC signature.
pub const DEFAULT_HMAC_HEADER: &str = "X-Signature";

fn default_hmac_header() -> String {
    DEFAULT_HMAC_HEADER.into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HmacAlgorithm {
    #[default]
    Sha256,
    Sha512,
}

/// TLS of an HTTP sink beyond the system's trusted roots.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    /// A PEM file of certificates to trust besides the system's (a
    /// partner's private CA).
    #[serde(default)]
    pub ca: Option<String>,
    /// A PEM file with the client certificate (and its chain) to present.
    #[serde(default)]
    pub cert: Option<String>,
    /// The PEM file of the client certificate's private key.
    #[serde(default)]
    pub key: Option<SecretValue>,
}

/// Checks `auth` and `tls` of the HTTP sink at `path`; `headers` are the
/// sink's fixed headers (lower-cased names).
pub(super) fn check_partner(
    path: &FieldPath,
    auth: Option<&HttpAuth>,
    tls: Option<&HttpTls>,
    headers: &[String],
    out: &mut Vec<Problem>,
) {
    if let Some(auth) = auth {
        let at = path.key("auth");
        let sets_authorization = matches!(auth, HttpAuth::Basic(_) | HttpAuth::Oauth2(_));
        if sets_authorization && headers.iter().any(|h| h == "authorization") {
            out.push(Problem::at(
                path.key("headers").key("Authorization"),
                "auth sets the Authorization header: remove this one",
            ));
        }
        match auth {
            HttpAuth::Basic(b) => {
                if b.user.contains(':') {
                    out.push(Problem::at(
                        at.key("basic").key("user"),
                        "a basic-auth user cannot contain ':'",
                    ));
                }
            }
            HttpAuth::Oauth2(o) => {
                let at = at.key("oauth2");
                if !super::sinks::is_http_url(&o.token_url) {
                    out.push(Problem::at(
                        at.key("token_url"),
                        format!(
                            "expected an http:// or https:// URL, found {:?}",
                            crate::units::redact_url(&o.token_url)
                        ),
                    ));
                }
                if o.client_id.is_empty() {
                    out.push(Problem::at(at.key("client_id"), "must not be empty"));
                }
                if o.timeout.as_std().is_zero() {
                    out.push(Problem::at(at.key("timeout"), "must be greater than 0s"));
                }
            }
            HttpAuth::Hmac(h) => {
                if !super::sinks::is_header_name(&h.header) {
                    out.push(Problem::at(
                        at.key("hmac").key("header"),
                        format!(
                            "invalid header name {:?}; use letters, digits and !#$%&'*+-.^_`|~",
                            h.header
                        ),
                    ));
                }
            }
        }
    }
    if let Some(tls) = tls
        && tls.cert.is_some() != tls.key.is_some()
    {
        out.push(Problem::at(
            path.key("tls"),
            "a client certificate needs both cert and key",
        ));
    }
}
