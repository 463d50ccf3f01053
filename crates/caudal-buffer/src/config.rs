//! Runtime settings of one buffer, with their defaults as named constants.
//! The engine maps the pipeline's `[buffer]` configuration onto
//! [`BufferConfig`]; [`BufferConfig::validate`] names the offending field.

use std::time::Duration;

use crate::error::{Error, Result};

/// Default cap on unacknowledged bytes: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default size at which a segment file is sealed and a new one started: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest accepted `segment_bytes`: 4 KiB (tests use small segments to
/// exercise rollover; production segments should stay in the MiB range).
pub const MIN_SEGMENT_BYTES: u64 = 4 * 1024;

/// When appended bytes are forced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// `fdatasync` before every [`Buffer::append`](crate::Buffer::append)
    /// returns: an appended batch survives power loss. The default, and the
    /// only policy under which `ack = "buffered"` keeps the delivery contract.
    #[default]
    Batch,
    /// Appends return once the bytes are in the operating system's cache; a
    /// background thread syncs every interval (and [`Buffer::sync`](crate::Buffer::sync)
    /// syncs on demand). Survives a crash of the process (`kill -9`), but a
    /// power loss may lose up to one interval of appends: acknowledge the
    /// source only after `sync` if that matters.
    Interval(Duration),
}

/// Settings of one buffer directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferConfig {
    /// Cap on unacknowledged bytes (entries plus 8 bytes of framing each).
    /// When an append would pass it, the append waits until acknowledgements
    /// free space (`when_full = "block"`): backpressure to the source. A batch
    /// larger than the cap is accepted once the buffer is empty, so the
    /// buffer never deadlocks. Default [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
    /// Size at which the current segment file is sealed and a new one
    /// started. Only whole segments are deleted, so this is the granularity at
    /// which acknowledged space returns to the disk. Default
    /// [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// When appends reach the disk. Default [`FsyncPolicy::Batch`].
    pub fsync: FsyncPolicy,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: FsyncPolicy::Batch,
        }
    }
}

impl BufferConfig {
    /// Checks every field; the error names the first field that is refused.
    pub fn validate(&self) -> Result<()> {
        if self.max_bytes == 0 {
            return Err(Error::Config {
                field: "max_bytes",
                reason: "must be greater than zero".into(),
            });
        }
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(Error::Config {
                field: "segment_bytes",
                reason: format!(
                    "{} is below the minimum of {MIN_SEGMENT_BYTES} bytes",
                    self.segment_bytes
                ),
            });
        }
        if let FsyncPolicy::Interval(every) = self.fsync
            && every.is_zero()
        {
            return Err(Error::Config {
                field: "fsync",
                reason: "the interval must be greater than zero (use FsyncPolicy::Batch to sync every append)".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let config = BufferConfig::default();
        config.validate().unwrap();
        assert_eq!(config.max_bytes, 256 << 20);
        assert_eq!(config.segment_bytes, 64 << 20);
        assert_eq!(config.fsync, FsyncPolicy::Batch);
    }

    #[test]
    fn validate_names_the_field() {
        let err = BufferConfig {
            segment_bytes: 10,
            ..BufferConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("segment_bytes"), "{err}");
        let err = BufferConfig {
            fsync: FsyncPolicy::Interval(Duration::ZERO),
            ..BufferConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("fsync"), "{err}");
    }
}
