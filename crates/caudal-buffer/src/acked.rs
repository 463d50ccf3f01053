//! The acknowledged offset, persisted in the file `acked` of the buffer
//! directory.
//!
//! Format (20 bytes): magic `"CAUDALAK"` | offset u64 LE | CRC-32 of the
//! previous 16 bytes, u32 LE. It is replaced atomically: written to
//! `acked.tmp`, fsynced, renamed over `acked`, and the directory fsynced, so
//! after a crash the file holds either the old or the new offset. Segments
//! are deleted only after the new offset is durable.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

pub(crate) const ACKED_FILE: &str = "acked";
pub(crate) const ACKED_TMP_FILE: &str = "acked.tmp";
const MAGIC: [u8; 8] = *b"CAUDALAK";
const LEN: usize = 20;

/// What the `acked` file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Acked {
    /// No file: nothing was ever acknowledged.
    Missing,
    Offset(u64),
    /// The file exists but does not check out.
    Damaged(String),
}

fn encode(offset: u64) -> [u8; LEN] {
    let mut bytes = [0u8; LEN];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[8..16].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..16]);
    bytes[16..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Reads the acknowledged offset of the buffer in `dir`.
pub(crate) fn load(dir: &Path) -> Result<Acked> {
    let path = dir.join(ACKED_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Acked::Missing),
        Err(e) => return Err(Error::io("read acknowledged offset", path, e)),
    };
    if bytes.len() != LEN {
        return Ok(Acked::Damaged(format!(
            "{} bytes, expected {LEN}",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Ok(Acked::Damaged("no magic".into()));
    }
    let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if crc32fast::hash(&bytes[..16]) != crc {
        return Ok(Acked::Damaged("checksum mismatch".into()));
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&bytes[8..16]);
    Ok(Acked::Offset(u64::from_le_bytes(offset)))
}

/// Durably replaces the acknowledged offset (tmp file, fsync, rename, fsync
/// directory).
pub(crate) fn store(dir: &Path, offset: u64) -> Result<()> {
    let tmp = dir.join(ACKED_TMP_FILE);
    let path = dir.join(ACKED_FILE);
    let mut file =
        File::create(&tmp).map_err(|e| Error::io("write acknowledged offset", &tmp, e))?;
    file.write_all(&encode(offset))
        .map_err(|e| Error::io("write acknowledged offset", &tmp, e))?;
    file.sync_all()
        .map_err(|e| Error::io("fsync acknowledged offset", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| Error::io("rename acknowledged offset", &path, e))?;
    sync_dir(dir)
}

/// Makes the directory's entries (created, renamed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync buffer directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Missing);
        store(dir.path(), 12345).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(12345));
        store(dir.path(), 99).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(99));
        assert!(!dir.path().join(ACKED_TMP_FILE).exists());

        let mut bytes = fs::read(dir.path().join(ACKED_FILE)).unwrap();
        bytes[9] ^= 1;
        fs::write(dir.path().join(ACKED_FILE), &bytes).unwrap();
        assert!(matches!(load(dir.path()).unwrap(), Acked::Damaged(_)));
    }
}
