//! caudal's durable local log between a pipeline's source and its sink.
//!
//! A [`Buffer`] is an append-only log of opaque entries (the engine stores
//! encoded records) numbered by consecutive offsets, kept in one directory
//! per pipeline as segment files of CRC-framed records. It is what lets the
//! engine acknowledge a source position once its records are durable
//! (`ack = "buffered"`): see [`Buffer`] for the contract.
//!
//! - [`Buffer::open`] recovers after any crash: every complete record is
//!   kept, a torn tail is reported and truncated.
//! - [`Buffer::append`] is durable when it returns ([`FsyncPolicy`]) and waits
//!   while the buffer is full ([`BufferConfig::max_bytes`]): backpressure.
//!   On a full disk it appends nothing, leaves no torn bytes and fails with
//!   [`Error::NoSpace`]; [`Buffer::wait_for_room`] waits until space returns
//!   ([`Stats::disk_full`] says why meanwhile).
//! - [`Buffer::read`] waits for entries and verifies each one's CRC.
//! - [`Buffer::ack`] persists the acknowledged offset (in place: it needs no
//!   new disk space) and deletes segments that are fully acknowledged, the
//!   active one too once the buffer is drained.
//! - [`Buffer::snapshot`] holds the files for an online copy
//!   ([`Snapshot::copy_to`]), consistent with a checkpoint saved meanwhile.
//! - [`inspect`] and [`fsck`] are read-only views for the CLI
//!   (`caudal buffer inspect|fsck PIPELINE`); [`space`] is the free space of
//!   a buffer's filesystem.
//!
//! The storage was chosen by measurement against redb and SQLite; the
//! figures are in `bench/buffer.md` (`cargo run --release -p caudal-buffer
//! --example compare`). The on-disk format is described in the `segment`
//! module's source.
//!
//! ```no_run
//! # async fn demo() -> caudal_buffer::Result<()> {
//! use caudal_buffer::{Buffer, BufferConfig};
//!
//! let (buffer, recovery) = Buffer::open("/var/lib/caudal/buffer/orders".as_ref(), BufferConfig::default())?;
//! let offsets = buffer.append(&[b"first".to_vec(), b"second".to_vec()]).await?;
//! // ... the source may now be acknowledged up to these records ...
//! let entries = buffer.read(recovery.acked, 1000).await?;
//! // ... deliver `entries` ...
//! buffer.ack(offsets.end).await?;
//! # Ok(()) }
//! ```

mod acked;
mod buffer;
mod check;
mod config;
mod error;
mod segment;
mod space;

pub use buffer::{Buffer, Copied, Recovery, Snapshot, Stats};
pub use check::{FsckReport, Inspection, Problem, ProblemKind, SegmentInfo, fsck, inspect};
pub use config::{
    BufferConfig, DEFAULT_MAX_BYTES, DEFAULT_SEGMENT_BYTES, FsyncPolicy, MIN_SEGMENT_BYTES,
};
pub use error::{Error, Result};
pub use segment::{MAX_ENTRY_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
pub use space::{DiskFull, Space, space};
