//! How the [`Receiver`](super::Receiver) answers: a [`Reply`] says what one
//! request gets, a [`Behaviour`] decides the reply for every request.
//!
//! Fault tests are built from these pieces: a status, a `Retry-After` header,
//! a delay before answering, or a connection reset instead of an answer. A
//! [`Behaviour::custom`] closure sees the whole decoded request, so size limits
//! (413) and per-record rejections (400 with a body naming the records) are
//! written in the test that needs them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::ReceivedRequest;

/// What the receiver does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
    pub(crate) delay: Duration,
    pub(crate) reset: bool,
}

impl Default for Reply {
    /// `200 OK` with an empty body, at once.
    fn default() -> Self {
        Self::status(200)
    }
}

impl Reply {
    /// Answer `status` with an empty body, at once.
    ///
    /// A status outside `100..=999` is answered as 500.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
            reset: false,
        }
    }

    /// Answer `status` (429 or 503, usually) with `Retry-After: <seconds>`.
    pub fn retry_after(status: u16, seconds: u64) -> Self {
        Self::status(status).header("Retry-After", seconds.to_string())
    }

    /// Close the connection without answering, as a crashing server or a
    /// middlebox would. The request is still recorded, with no status.
    pub fn reset() -> Self {
        Self {
            reset: true,
            ..Self::status(0)
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON response body and `Content-Type: application/json`.
    pub fn json(self, body: &serde_json::Value) -> Self {
        self.header("Content-Type", "application/json")
            .body(body.to_string())
    }

    /// Waits this long after the request arrived before answering (or
    /// resetting), to make clients time out or to slow them down.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The status this reply answers with, or `None` for a reset.
    pub fn answered_status(&self) -> Option<u16> {
        (!self.reset).then_some(self.status)
    }
}

/// The rule that gives each request its [`Reply`], unless a one-shot reply
/// queued with [`Receiver::fail_next`](super::Receiver::fail_next) or
/// [`Receiver::queue_replies`](super::Receiver::queue_replies) comes first.
#[derive(Clone)]
#[non_exhaustive]
pub enum Behaviour {
    /// Every request gets this reply.
    Always(Reply),
    /// The closure decides per request. It runs while the receiver holds its
    /// behaviour lock, so it must not call the [`Receiver`](super::Receiver).
    Custom(Arc<dyn Fn(&ReceivedRequest) -> Reply + Send + Sync>),
}

impl Behaviour {
    /// A behaviour that lets `decide` choose the reply for each request, e.g.
    /// 413 when the decoded body is larger than a limit.
    pub fn custom(decide: impl Fn(&ReceivedRequest) -> Reply + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(decide))
    }

    /// The reply for `request`.
    pub fn reply_for(&self, request: &ReceivedRequest) -> Reply {
        match self {
            Self::Always(reply) => reply.clone(),
            Self::Custom(decide) => decide(request),
        }
    }
}

impl Default for Behaviour {
    /// Answer `200 OK` to everything.
    fn default() -> Self {
        Self::Always(Reply::default())
    }
}

impl From<Reply> for Behaviour {
    fn from(reply: Reply) -> Self {
        Self::Always(reply)
    }
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always(reply) => f.debug_tuple("Always").field(reply).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}
