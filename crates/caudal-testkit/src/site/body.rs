//! The response body of the fixture [`Site`](super::Site): one buffer, or a
//! sequence of shared buffers streamed frame by frame (`/huge`).
//!
//! The body carries the request's [`InFlight`] mark and drops it once its
//! last byte was handed to hyper (or when hyper drops the body unfinished),
//! so [`Site::max_in_flight`](super::Site::max_in_flight) counts a request
//! until its response is complete, not just until its head is ready.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::access::InFlight;

/// A response body; see the [module docs](self).
pub(crate) struct SiteBody {
    parts: Parts,
    in_flight: Option<InFlight>,
}

enum Parts {
    /// One buffer, taken on the first poll.
    One(Option<Bytes>),
    /// Several buffers sent in order; `remaining` counts their bytes not yet
    /// sent.
    Many {
        parts: Arc<[Bytes]>,
        next: usize,
        remaining: u64,
    },
}

impl SiteBody {
    /// A body of `bytes` (no frame at all when empty).
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            parts: Parts::One((!bytes.is_empty()).then_some(bytes)),
            in_flight: None,
        }
    }

    /// A body of no bytes.
    pub(crate) fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// A body streamed from `parts`, one frame each.
    pub(crate) fn streamed(parts: Arc<[Bytes]>) -> Self {
        let remaining = parts.iter().map(|p| p.len() as u64).sum();
        Self {
            parts: Parts::Many {
                parts,
                next: 0,
                remaining,
            },
            in_flight: None,
        }
    }

    /// Keeps `in_flight` until the body is sent or dropped.
    pub(crate) fn with_in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = Some(in_flight);
        self
    }
}

impl Body for SiteBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let data = match &mut this.parts {
            Parts::One(bytes) => bytes.take(),
            Parts::Many {
                parts,
                next,
                remaining,
            } => {
                let data = parts.get(*next).cloned();
                if let Some(data) = &data {
                    *next += 1;
                    *remaining -= data.len() as u64;
                }
                data
            }
        };
        match data {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => {
                this.in_flight = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.parts {
            Parts::One(bytes) => bytes.is_none(),
            Parts::Many { parts, next, .. } => *next >= parts.len(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.parts {
            Parts::One(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Parts::Many { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
