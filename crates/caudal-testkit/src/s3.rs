//! A real S3 API on loopback for the datasets tests: moto's standalone
//! server, run as a child process with the benchmarks' Python (see
//! [`python`](mod@crate::python)).
//!
//! [`S3::start`] picks a free port on `127.0.0.1`, runs `moto.server -H
//! 127.0.0.1 -p <port>` and waits until `GET /` answers like S3 (at most
//! [`START_TIMEOUT`]). Each [`S3`] is its own server with empty state, so
//! tests run in parallel without sharing buckets. A sink under test is
//! pointed at [`S3::endpoint`] with path-style addressing, [`REGION`] and any
//! credentials ([`ACCESS_KEY_ID`], [`SECRET_ACCESS_KEY`]): moto accepts SigV4
//! signatures without checking them.
//!
//! The helpers ([`S3::create_bucket`], [`S3::put`], [`S3::list`],
//! [`S3::get`]) speak plain HTTP to it, so what they see does not depend on
//! the S3 client the code under test uses.
//!
//! It promises:
//!
//! - Dropping the [`S3`] kills the server and reaps it. A test process that
//!   dies without dropping it (killed, aborted) closes the server's stdin,
//!   and the server exits on that, so no moto outlives its test run.
//! - A missing interpreter or a missing moto is a panic that says to run
//!   `scripts/test` or `export CAUDAL_BENCH_PYTHON=$(bench/venv)`; the test
//!   fails, it never skips.
//!
//! Moto behaves like S3 where a test may trip:
//!
//! - A private object is readable only with an `Authorization` header (any
//!   will do); anonymous GETs of it answer 403. The helpers send a dummy one.
//! - Multipart parts under 5 MiB, except the last, fail the
//!   `CompleteMultipartUpload` with `EntityTooSmall`.
//! - `If-None-Match: *` on `PutObject` is honoured (412 when the key exists).
//! - An unsigned PUT with `Content-Type: application/x-www-form-urlencoded`
//!   (curl's `--data` default) stores an empty object: the web framework
//!   under moto reads the body as a form. [`S3::put`] sends
//!   `application/octet-stream`.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};

use crate::python::{PYTHON_ADVICE, python};

/// How long [`S3::start`] waits for moto to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The region buckets are created in (moto's default, no
/// `LocationConstraint`).
pub const REGION: &str = "us-east-1";
/// An access key id to configure clients with; moto accepts any.
pub const ACCESS_KEY_ID: &str = "caudal-test";
/// A secret access key to configure clients with; moto checks no signature.
pub const SECRET_ACCESS_KEY: &str = "caudal-test-secret";

/// How often [`S3::start`] tries a new port when another process took the
/// one it picked between picking and moto binding it.
const START_ATTEMPTS: usize = 3;
/// How long one helper request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Runs moto's server, exiting as soon as stdin closes: the test process
/// holds the other end, so the server goes when the test process goes, even
/// when it is killed and never drops the [`S3`].
///
/// Reading the raw descriptor, not `sys.stdin`, lets the interpreter shut
/// down cleanly around the blocked thread when moto itself fails.
const LAUNCHER: &str = "\
import os, sys, threading
from moto.server import main

def _exit_with_parent():
    while os.read(0, 4096):
        pass
    os._exit(0)

threading.Thread(target=_exit_with_parent, daemon=True).start()
main(sys.argv[1:])
";

/// moto's S3 server on `127.0.0.1`. See the [module docs](self).
///
/// Dropping it kills the server.
pub struct S3 {
    port: u16,
    child: Child,
    /// The server exits when this closes (see [`LAUNCHER`]).
    _stdin: Option<ChildStdin>,
    /// Holds `moto.log`, the server's stdout and stderr.
    log_dir: tempfile::TempDir,
    client: reqwest::Client,
}

/// How one attempt to start the server ended.
enum Started {
    Ready(S3),
    /// The port was taken before moto could bind it: try another.
    PortTaken,
}

impl S3 {
    /// Starts moto's server on `127.0.0.1` on a free port and waits until it
    /// answers.
    ///
    /// # Panics
    ///
    /// When the interpreter or moto is missing (the message says how to get
    /// them), when moto exits or does not answer within [`START_TIMEOUT`]
    /// (the message holds its log), or when called outside a Tokio runtime.
    pub async fn start() -> Self {
        let python = python();
        for _ in 0..START_ATTEMPTS {
            if let Started::Ready(s3) = Self::try_start(&python).await {
                return s3;
            }
        }
        panic!(
            "caudal-testkit: moto found its port taken {START_ATTEMPTS} times in a row; \
             is something binding loopback ports in a loop?"
        )
    }

    async fn try_start(python: &Path) -> Started {
        let port = free_port();
        let log_dir = tempfile::Builder::new()
            .prefix("caudal-s3-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("caudal-testkit: cannot create a temporary directory: {err}")
            });
        let (stdout, stderr) = File::create(log_dir.path().join("moto.log"))
            .and_then(|log| Ok((log.try_clone()?, log)))
            .unwrap_or_else(|err| panic!("caudal-testkit: cannot create moto's log: {err}"));
        let mut child = Command::new(python)
            .arg("-c")
            .arg(LAUNCHER)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "caudal-testkit: cannot run {}: {err}\n{PYTHON_ADVICE}",
                    python.display()
                )
            });
        let stdin = child.stdin.take();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|err| panic!("caudal-testkit: cannot build an HTTP client: {err}"));
        // Built before waiting, so a panic below still kills the server.
        let mut s3 = Self {
            port,
            child,
            _stdin: stdin,
            log_dir,
            client,
        };
        match s3.wait_until_ready().await {
            Ok(()) => Started::Ready(s3),
            Err(log) if log.contains("Address already in use") => Started::PortTaken,
            Err(log) if log.contains("ModuleNotFoundError") => panic!(
                "caudal-testkit: moto's server is not installed for {}:\n{log}\n{PYTHON_ADVICE}",
                python.display()
            ),
            Err(log) => panic!(
                "caudal-testkit: moto's server on port {port} did not start:\n{log}\n\
                 {PYTHON_ADVICE}"
            ),
        }
    }

    /// Waits until `GET /` lists buckets; on failure, what went wrong and
    /// the server's log.
    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let root = self.endpoint();
        loop {
            match self.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(format!("it exited ({status}); its log:\n{}", self.log()));
                }
                Err(err) => return Err(format!("cannot watch it: {err}")),
            }
            let probe = self
                .client
                .get(&root)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(response) = probe
                && response.status() == StatusCode::OK
                // Another server that took the port would not say this.
                && response
                    .text()
                    .await
                    .is_ok_and(|body| body.contains("ListAllMyBucketsResult"))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no S3 answer from {root} within {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// `http://127.0.0.1:<port>`, the endpoint to give an S3 client (with
    /// path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the server printed so far (werkzeug logs every request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("moto.log"))
            .unwrap_or_else(|err| format!("(cannot read moto's log: {err})"))
    }

    /// Creates the bucket `name` in [`REGION`].
    ///
    /// # Panics
    ///
    /// When S3 does not answer 200 (also when the bucket exists already).
    pub async fn create_bucket(&self, name: &str) {
        let response = self.send(self.client.put(self.url(name, None))).await;
        self.expect_ok(response, &format!("PUT bucket {name}"))
            .await;
    }

    /// Stores `body` as `bucket/key`, replacing any object there.
    ///
    /// # Panics
    ///
    /// When S3 does not answer 200 (for example when the bucket is missing).
    pub async fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) {
        let request = self
            .client
            .put(self.url(bucket, Some(key)))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(body.into());
        let response = self.send(request).await;
        self.expect_ok(response, &format!("PUT {bucket}/{key}"))
            .await;
    }

    /// The keys in `bucket` that start with `prefix` (`""`: all), in S3's
    /// order (ascending UTF-8 bytes).
    ///
    /// # Panics
    ///
    /// When S3 does not answer 200 (for example when the bucket is missing).
    pub async fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut url = self.url(bucket, None);
            url.query_pairs_mut()
                .append_pair("list-type", "2")
                .append_pair("prefix", prefix);
            if let Some(token) = &continuation {
                url.query_pairs_mut()
                    .append_pair("continuation-token", token);
            }
            let response = self.send(self.client.get(url)).await;
            let xml = self
                .expect_ok(response, &format!("LIST {bucket}/{prefix}*"))
                .await;
            let xml = String::from_utf8_lossy(&xml);
            keys.extend(elements(&xml, "Key").map(unescape));
            continuation = elements(&xml, "NextContinuationToken")
                .next()
                .map(unescape)
                .filter(|_| elements(&xml, "IsTruncated").any(|t| t == "true"));
            if continuation.is_none() {
                return keys;
            }
        }
    }

    /// The bytes of `bucket/key`; `None` when there is no such object.
    ///
    /// # Panics
    ///
    /// When S3 answers neither 200 nor 404 (a missing bucket is a 404 too).
    pub async fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let response = self
            .send(self.client.get(self.url(bucket, Some(key))))
            .await;
        if response.status() == StatusCode::NOT_FOUND {
            return None;
        }
        Some(
            self.expect_ok(response, &format!("GET {bucket}/{key}"))
                .await,
        )
    }

    /// `endpoint/bucket[/key]`, each key segment percent-encoded.
    fn url(&self, bucket: &str, key: Option<&str>) -> Url {
        let mut url = Url::parse(&self.endpoint())
            .unwrap_or_else(|err| panic!("caudal-testkit: bad endpoint URL: {err}"));
        url.path_segments_mut()
            .unwrap_or_else(|()| panic!("caudal-testkit: the endpoint URL has no path"))
            .clear()
            .push(bucket)
            .extend(key.into_iter().flat_map(|key| key.split('/')));
        url
    }

    /// Sends with a dummy `Authorization`, without which moto refuses to
    /// read private objects (it checks no signature).
    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20250101/{REGION}/s3/aws4_request, \
             SignedHeaders=host, Signature=0"
        );
        request
            .header(AUTHORIZATION, authorization)
            .send()
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "caudal-testkit: no answer from moto at {}: {err}; its log:\n{}",
                    self.endpoint(),
                    self.log()
                )
            })
    }

    /// The body of a 200 answer; panics with the answer otherwise.
    async fn expect_ok(&self, response: reqwest::Response, what: &str) -> Vec<u8> {
        let status = response.status();
        let body = response.bytes().await.unwrap_or_else(|err| {
            panic!("caudal-testkit: {what}: cannot read moto's answer: {err}")
        });
        assert!(
            status == StatusCode::OK,
            "caudal-testkit: {what}: moto answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        body.to_vec()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        // SIGKILL: moto keeps nothing worth flushing. Reaped so no zombie
        // stays behind for the rest of the test binary's life.
        if let Err(err) = self.child.kill()
            && err.kind() != io::ErrorKind::InvalidInput
        {
            eprintln!("caudal-testkit: cannot kill moto's server: {err}");
        }
        let _ = self.child.wait();
    }
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("endpoint", &self.endpoint())
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// A port on `127.0.0.1` that was free a moment ago; [`S3::start`] retries
/// when it is taken again before moto binds it.
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("caudal-testkit: cannot bind 127.0.0.1:0: {err}"))
}

/// The texts of every `<tag>…</tag>` in `xml`, in order; enough for S3's
/// listings, whose elements hold no nested `tag`.
fn elements<'a>(xml: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let text = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(text)
    })
}

/// XML's five named entities and numeric character references, decoded.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').and_then(|semi| {
            let entity = &rest[1..semi];
            let ch = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .map(|hex| u32::from_str_radix(hex, 16))
                    .or_else(|| entity.strip_prefix('#').map(str::parse))
                    .and_then(Result::ok)
                    .and_then(char::from_u32),
            };
            ch.map(|ch| (ch, semi + 1))
        });
        match decoded {
            Some((ch, len)) => {
                out.push(ch);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_found_in_order() {
        let xml = "<A><Key>a</Key><Size>1</Size></A><A><Key>b/c=d</Key></A><Key>unclosed";
        assert_eq!(elements(xml, "Key").collect::<Vec<_>>(), ["a", "b/c=d"]);
        assert_eq!(elements(xml, "Missing").count(), 0);
    }

    #[test]
    fn entities_are_decoded() {
        assert_eq!(
            unescape("a&amp;b&lt;c&gt;&quot;&apos;&#13;&#x41;"),
            "a&b<c>\"'\rA"
        );
        assert_eq!(unescape("&bogus; & &#xZZ;"), "&bogus; & &#xZZ;");
    }
}
