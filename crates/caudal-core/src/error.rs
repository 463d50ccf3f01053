//! One error type for the library crates. Its [`ErrorKind`] is what callers
//! branch on (retry, reject, stop), so it must survive every trait boundary:
//! never flatten an [`Error`] into a string before it reaches the engine.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, at the level a retry decision or an operator needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is invalid; fix the file.
    Config,
    /// A server could not be reached or the connection broke; worth retrying.
    Connect,
    /// A request took longer than its timeout; worth retrying.
    Timeout,
    /// The remote side answered with a temporary refusal (5xx, 429, 408).
    Unavailable,
    /// The remote side rejected the data itself (4xx); retrying will not help.
    Rejected,
    /// A query failed: bad SQL, a missing table or column, missing privileges.
    Query,
    /// A value could not be converted (unknown column type, bad cursor value).
    Decode,
    /// The state store failed.
    Store,
    /// Another process holds the pipeline's lease.
    Busy,
    /// The pipeline's durable buffer failed: a disk error, or damaged data.
    Buffer,
    /// The source can no longer continue from the pipeline's position (a
    /// replication slot dropped or invalidated, a log purged): continuing
    /// would lose changes, so it stops until an operator resyncs.
    Resync,
    /// The operation was stopped by a shutdown request.
    Cancelled,
    /// What the request names does not exist (a workflow run, a task).
    NotFound,
    /// The request does not fit the current state (retrying a run that
    /// still runs, cancelling one that ended).
    Conflict,
    /// A bug or an impossible state.
    Internal,
}

/// What to do about an error, decided in one place
/// ([`ErrorKind::decision`]) for every part of the product: the daemon
/// (whether a failed run is tried again soon, at its next time, or the
/// pipeline stops), CDC readers (whether to reconnect), delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Temporary: try the same work again after a pause (with backoff);
    /// nothing is lost meanwhile.
    Retry,
    /// The data itself is refused: keep it aside (dead letters) with its
    /// reason.
    Reject,
    /// This attempt fails; the schedule tries again at its next time
    /// (an operator may have something to fix first).
    Fail,
    /// The pipeline stops until an operator acts: going on would lose
    /// data (`caudal resync`).
    Stop,
}

impl ErrorKind {
    /// The decision for this kind of error.
    pub fn decision(self) -> Decision {
        match self {
            Self::Connect | Self::Timeout | Self::Unavailable | Self::Busy | Self::Store => {
                Decision::Retry
            }
            Self::Rejected => Decision::Reject,
            Self::Resync => Decision::Stop,
            Self::Config
            | Self::Query
            | Self::Decode
            | Self::Buffer
            | Self::Cancelled
            | Self::NotFound
            | Self::Conflict
            | Self::Internal => Decision::Fail,
        }
    }

    /// A short hint for operators, shown next to the error.
    pub fn hint(self) -> Option<&'static str> {
        match self {
            Self::Connect => Some("check that the server is running and reachable"),
            Self::Timeout => Some("the server is slow; raise the timeout or check its load"),
            Self::Busy => Some("another caudal process is running this pipeline"),
            Self::Query => Some("check the table, columns and privileges of the source"),
            Self::Resync => {
                Some("`caudal resync PIPELINE` reads the tables again and streams from a new slot")
            }
            Self::Buffer => Some(
                "check the disk of the buffer directory; `caudal buffer fsck PIPELINE` lists damage",
            ),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Rejected => "rejected",
            Self::Query => "query",
            Self::Decode => "decode",
            Self::Store => "store",
            Self::Busy => "busy",
            Self::Buffer => "buffer",
            Self::Resync => "resync",
            Self::Cancelled => "cancelled",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Internal => "internal",
        }
    }
}

/// A library error: a kind, a message, and the underlying cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every cause in the chain, for logs and the
    /// run record.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
