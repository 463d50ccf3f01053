//! The buffer's error type. Every variant names what the operator needs to
//! act on (the directory, the segment file, the byte position); I/O errors
//! keep their source.

use std::io;
use std::path::PathBuf;

/// A result with the buffer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the buffer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed (permissions, a vanished directory, a disk
    /// error). A full disk is [`Error::NoSpace`] instead.
    #[error("buffer I/O failed: {op} {}", path.display())]
    Io {
        /// What was being done, e.g. "fsync segment".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The buffer's filesystem has no space left (or a quota is reached).
    /// An append that fails so is undone, leaving no partial record, and
    /// may be retried once space returns: it is backpressure, not damage
    /// (see [`Buffer::wait_for_room`](crate::Buffer::wait_for_room)).
    #[error("no space left on the buffer's disk: {op} {}", path.display())]
    NoSpace {
        /// What was being done, e.g. "write segment".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A record's checksum or framing does not match: the bytes on disk
    /// changed after they were written. The record is never returned; run
    /// `caudal buffer fsck` to list every damaged place.
    #[error(
        "corrupt record in buffer segment {} at byte {position} (offset {offset}): {reason}",
        segment.display()
    )]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the record's frame in the segment file.
        position: u64,
        /// The entry's offset (sequence number).
        offset: u64,
        /// What does not match.
        reason: String,
    },
    /// A file in the buffer directory is not a segment this version can read
    /// (wrong magic, unsupported version, a header that contradicts its name,
    /// overlapping segments). Nothing is changed; an operator must look.
    #[error("not a usable buffer file {}: {reason}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process (or another `Buffer` in this one) has the directory open.
    #[error("buffer directory {} is in use by another process", dir.display())]
    Locked {
        /// The buffer directory.
        dir: PathBuf,
    },
    /// The requested offset was acknowledged and its segment deleted.
    #[error("offset {requested} is no longer in the buffer (first retained offset is {first})")]
    Gone {
        /// The offset asked for.
        requested: u64,
        /// The first offset still on disk.
        first: u64,
    },
    /// An acknowledgement past the end of the log.
    #[error("cannot acknowledge up to offset {requested}: the buffer ends at {next_offset}")]
    AckBeyondEnd {
        /// The offset acknowledged (exclusive).
        requested: u64,
        /// The next offset that would be assigned.
        next_offset: u64,
    },
    /// An entry larger than [`MAX_ENTRY_BYTES`](crate::MAX_ENTRY_BYTES).
    #[error("entry of {len} bytes exceeds the buffer's limit of {max} bytes per entry")]
    EntryTooLarge {
        /// The entry's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An invalid [`BufferConfig`](crate::BufferConfig) value.
    #[error("invalid buffer configuration: {field}: {reason}")]
    Config {
        /// The field, e.g. `segment_bytes`.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A write or fsync failed earlier; the file's state is unknown, so the
    /// buffer refuses further appends until it is reopened (reopening
    /// recovers every complete record).
    #[error("buffer writer stopped after an earlier failure ({0}); reopen the buffer")]
    Poisoned(String),
    /// [`Buffer::close`](crate::Buffer::close) was called.
    #[error("buffer is closed")]
    Closed,
}

impl Error {
    /// A failed file operation; [`Error::NoSpace`] when the disk is full.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if crate::space::is_no_space(&source) {
            return Self::NoSpace { op, path, source };
        }
        Self::Io { op, path, source }
    }

    /// True when the disk is full ([`Error::NoSpace`]): waiting for space
    /// and retrying is the remedy.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }

    /// True when the data on disk is damaged ([`Error::Corrupt`],
    /// [`Error::Format`]): retrying will not help, an operator must look.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::Format { .. })
    }
}

/// A task spawned for blocking I/O panicked or was cancelled at shutdown.
pub(crate) fn join_error(op: &'static str, path: PathBuf, err: tokio::task::JoinError) -> Error {
    Error::io(op, path, io::Error::other(err.to_string()))
}
