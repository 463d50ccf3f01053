//! The HTTP endpoints `caudal run` serves (health, metrics, the API), and
//! the checks of their settings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::Duration;

/// What `caudal run` serves over HTTP.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on, `host:port` (default `127.0.0.1:9464`:
    /// loopback only; `0.0.0.0:9464` for every interface).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API requests allowed per second per token (bursts of twice that);
    /// more get 429 with `Retry-After`.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// How long a dashboard sign-in lasts (default `12h`); the browser
    /// signs in again after it.
    #[serde(default = "default_session_ttl")]
    pub session_ttl: Duration,
    /// Serve HTTPS instead of HTTP: `{ cert = "server.pem", key =
    /// "server.key" }` (PEM files: the certificate chain, and its key).
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

/// The certificate `caudal run` serves HTTPS with.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// A PEM file: the server's certificate, then its chain.
    pub cert: String,
    /// A PEM file: the certificate's private key.
    pub key: String,
}

fn default_session_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(12 * 3600))
}

fn default_requests_per_second() -> u32 {
    20
}

/// Where `caudal run` listens when `[server]` names no address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

impl ServerConfig {
    /// The listen address; `validate` has checked it parses.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

/// The listen address must parse.
pub(super) fn check_server(server: Option<&ServerConfig>, out: &mut Vec<Problem>) {
    if let Some(server) = server
        && server.address().is_none()
    {
        out.push(Problem::at(
            FieldPath::root().key("server").key("listen"),
            format!(
                "{:?} is not an address to listen on: write host:port, e.g. \"127.0.0.1:9464\"",
                server.listen
            ),
        ));
    }
    if let Some(tls) = server.and_then(|s| s.tls.as_ref()) {
        for (field, file) in [("cert", &tls.cert), ("key", &tls.key)] {
            if file.is_empty() {
                out.push(Problem::at(
                    FieldPath::root().key("server").key("tls").key(field),
                    "must name a PEM file",
                ));
            }
        }
    }
    if let Some(server) = server
        && server.session_ttl.as_std().is_zero()
    {
        out.push(Problem::at(
            FieldPath::root().key("server").key("session_ttl"),
            "a dashboard session must last longer than 0s: write e.g. \"12h\"",
        ));
    }
}
