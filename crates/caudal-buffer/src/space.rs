//! Disk space: how much the buffer's filesystem has free, what a full disk
//! looks like to the writer, and the marker file that tells other processes
//! (`caudal status`, `caudal buffer inspect`) that appends are waiting for
//! space.
//!
//! A full disk is backpressure, not a failure: an append that runs out of
//! space is undone (see the `buffer` module), the buffer remembers it in a
//! [`DiskFull`], and [`Buffer::wait_for_room`](crate::Buffer::wait_for_room)
//! waits until retrying is worth it. The marker `DISK_FULL` is an empty
//! file, so creating it needs no data block on a full disk; its modification
//! time says since when appends wait.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};

/// Name of the marker file that exists while appends wait for disk space.
pub(crate) const DISK_FULL_FILE: &str = "DISK_FULL";

/// The size and free space of the filesystem that holds a buffer directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Space {
    /// Bytes an unprivileged process may still write.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
}

/// Why appends are waiting: an append found the buffer's disk full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DiskFull {
    /// Bytes (framing included) of the append that did not fit.
    pub needed_bytes: u64,
    /// Free bytes on the filesystem right after that append was undone,
    /// when the filesystem could be asked.
    pub free_bytes: Option<u64>,
    /// When an append first found the disk full, in milliseconds since the
    /// Unix epoch (later failed attempts keep it).
    pub since_unix_ms: u64,
}

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the buffer's disk is full: an append of {} bytes does not fit",
            self.needed_bytes
        )?;
        if let Some(free) = self.free_bytes {
            write!(f, " ({free} bytes free)")?;
        }
        write!(
            f,
            "; intake waits until delivery or an operator frees space"
        )
    }
}

/// The size and free space of the filesystem holding `dir`.
// The conversions are needed where `c_ulong` and `fsblkcnt_t` are 32 bits.
#[allow(clippy::useless_conversion)]
pub fn space(dir: &Path) -> Result<Space> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Error::io("check free space", dir, io::Error::from(e)))?;
    let unit = u64::from(stat.fragment_size());
    Ok(Space {
        free_bytes: u64::from(stat.blocks_available()).saturating_mul(unit),
        total_bytes: u64::from(stat.blocks()).saturating_mul(unit),
    })
}

/// True for the operating system's "no space left" and "quota exceeded".
pub(crate) fn is_no_space(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Creates the marker. Best effort: the marker only informs other
/// processes, so failing to create it must not stop the writer.
pub(crate) fn mark_disk_full(dir: &Path) {
    let path = dir.join(DISK_FULL_FILE);
    if let Err(e) = OpenOptions::new().create(true).append(true).open(&path) {
        tracing::debug!(file = %path.display(), error = %e, "buffer: cannot create the disk-full marker");
    }
}

/// Removes the marker, if there is one.
pub(crate) fn clear_disk_full(dir: &Path) {
    let path = dir.join(DISK_FULL_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "buffer: cannot remove the disk-full marker");
        }
    }
}

/// Since when the marker says appends wait (milliseconds since the Unix
/// epoch), if it exists.
pub(crate) fn disk_full_since(dir: &Path) -> Option<u64> {
    let modified = fs::metadata(dir.join(DISK_FULL_FILE))
        .and_then(|m| m.modified())
        .ok()?;
    Some(unix_ms(modified))
}

/// How long ago `since_unix_ms` was, for messages.
pub(crate) fn ago(since_unix_ms: u64) -> Duration {
    Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(since_unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_of_a_real_directory_and_an_error_naming_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let space = space(dir.path()).unwrap();
        assert!(space.total_bytes > 0);
        assert!(space.free_bytes <= space.total_bytes);
        let missing = dir.path().join("missing");
        let err = super::space(&missing).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_marker_comes_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(disk_full_since(dir.path()), None);
        mark_disk_full(dir.path());
        let since = disk_full_since(dir.path()).unwrap();
        assert!(ago(since) < Duration::from_secs(3600));
        clear_disk_full(dir.path());
        clear_disk_full(dir.path());
        assert_eq!(disk_full_since(dir.path()), None);
    }

    #[test]
    fn no_space_and_quota_are_recognised() {
        assert!(is_no_space(&io::Error::from(io::ErrorKind::StorageFull)));
        assert!(is_no_space(&io::Error::from_raw_os_error(28)));
        assert!(!is_no_space(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
    }
}
