//! The acknowledged offset, persisted in the file `acked` of the buffer
//! directory.
//!
//! Format: a 1024-byte file with two slots of 28 bytes, at byte 0 and at
//! byte 512:
//!
//! ```text
//! magic "CAUDALA2" (8) | generation u64 LE (8) | offset u64 LE (8) | CRC-32 of the previous 24 bytes, u32 LE (4)
//! ```
//!
//! The valid slot with the higher generation holds the offset. An update
//! overwrites the other slot in place and syncs it, so
//!
//! - it needs no new disk space (the file never grows): acknowledging is
//!   what frees space, so it must work on a full disk;
//! - after a crash, even one that tears the slot being written, the file
//!   holds either the old or the new offset (the other slot is untouched).
//!
//! The file is made whole (written to `acked.tmp`, fsynced, renamed over
//! `acked`, the directory fsynced) when the buffer is opened and the file is
//! missing, unreadable or in the earlier layout, which was a single 20-byte
//! record `"CAUDALAK" | offset u64 LE | CRC-32` (still read, as generation
//! 0). Segments are deleted only after the new offset is durable.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) const ACKED_FILE: &str = "acked";
pub(crate) const ACKED_TMP_FILE: &str = "acked.tmp";
const MAGIC: [u8; 8] = *b"CAUDALA2";
const SLOT_LEN: usize = 28;
/// Slots sit in different 512-byte sectors, so a torn write of one sector
/// never touches both.
const SLOT_STRIDE: u64 = 512;
const FILE_LEN: usize = 2 * SLOT_STRIDE as usize;
const LEGACY_MAGIC: [u8; 8] = *b"CAUDALAK";
/// Generations from here on are rewritten from 1 when the buffer opens, so
/// updates in place (one generation each) never run out of them.
const GENERATION_LIMIT: u64 = 1 << 63;
const LEGACY_LEN: usize = 20;

/// What the `acked` file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Acked {
    /// No file: nothing was ever acknowledged.
    Missing,
    Offset(u64),
    /// The file exists but does not check out.
    Damaged(String),
}

/// One valid slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    index: usize,
    generation: u64,
    offset: u64,
}

/// Everything a read of the file learns.
#[derive(Debug)]
struct Loaded {
    acked: Acked,
    /// The slot holding the offset, when the file is in the current layout
    /// (updates in place are possible).
    newest: Option<Slot>,
    /// The highest generation seen (0 for the earlier layout).
    generation: u64,
}

fn encode_slot(generation: u64, offset: u64) -> [u8; SLOT_LEN] {
    let mut bytes = [0u8; SLOT_LEN];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    bytes[16..24].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn decode_slot(bytes: &[u8], index: usize) -> Option<Slot> {
    let start = index * SLOT_STRIDE as usize;
    let bytes = bytes.get(start..start + SLOT_LEN)?;
    if bytes[..8] != MAGIC || crc32fast::hash(&bytes[..24]) != u32_at(bytes, 24) {
        return None;
    }
    Some(Slot {
        index,
        generation: u64_at(bytes, 8),
        offset: u64_at(bytes, 16),
    })
}

fn decode_legacy(bytes: &[u8]) -> std::result::Result<u64, String> {
    if bytes.len() != LEGACY_LEN {
        return Err(format!(
            "{} bytes, expected {FILE_LEN} (or {LEGACY_LEN})",
            bytes.len()
        ));
    }
    if bytes[..8] != LEGACY_MAGIC {
        return Err("no magic".into());
    }
    if crc32fast::hash(&bytes[..16]) != u32_at(bytes, 16) {
        return Err("checksum mismatch".into());
    }
    Ok(u64_at(bytes, 8))
}

fn read(dir: &Path) -> Result<Loaded> {
    let path = dir.join(ACKED_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                acked: Acked::Missing,
                newest: None,
                generation: 0,
            });
        }
        Err(e) => return Err(Error::io("read acknowledged offset", path, e)),
    };
    if bytes.len() == FILE_LEN {
        let newest = [decode_slot(&bytes, 0), decode_slot(&bytes, 1)]
            .into_iter()
            .flatten()
            .max_by_key(|slot| slot.generation);
        return Ok(match newest {
            Some(slot) => Loaded {
                acked: Acked::Offset(slot.offset),
                newest: Some(slot),
                generation: slot.generation,
            },
            None => Loaded {
                acked: Acked::Damaged("neither slot checks out".into()),
                newest: None,
                generation: 0,
            },
        });
    }
    Ok(Loaded {
        acked: decode_legacy(&bytes).map_or_else(Acked::Damaged, Acked::Offset),
        newest: None,
        generation: 0,
    })
}

/// Reads the acknowledged offset of the buffer in `dir`.
pub(crate) fn load(dir: &Path) -> Result<Acked> {
    Ok(read(dir)?.acked)
}

/// Durably replaces the whole file with one holding `offset` at
/// `generation` (tmp file, fsync, rename, fsync directory).
fn write_whole(dir: &Path, generation: u64, offset: u64) -> Result<()> {
    let tmp = dir.join(ACKED_TMP_FILE);
    let path = dir.join(ACKED_FILE);
    let mut bytes = [0u8; FILE_LEN];
    bytes[..SLOT_LEN].copy_from_slice(&encode_slot(generation, offset));
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(&bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        // A partial temporary file would only hold space on a full disk.
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("write acknowledged offset", &tmp, e));
    }
    fs::rename(&tmp, &path).map_err(|e| Error::io("rename acknowledged offset", &path, e))?;
    sync_dir(dir)
}

/// Durably replaces the acknowledged offset with a freshly written file.
/// For copies and tests; a running buffer updates its [`AckedFile`] in place.
pub(crate) fn store(dir: &Path, offset: u64) -> Result<()> {
    let generation = read(dir).map_or(0, |l| l.generation);
    write_whole(dir, generation + 1, offset)
}

/// The open `acked` file of a running buffer, updated in place.
#[derive(Debug)]
pub(crate) struct AckedFile {
    file: File,
    path: PathBuf,
    generation: u64,
    /// The slot the next update overwrites (the one not holding the offset).
    next_slot: usize,
}

impl AckedFile {
    /// Opens the file for updates in place when it is in the current layout
    /// and holds `offset`; otherwise (missing, damaged, earlier layout, or
    /// another offset) writes it whole, holding `offset`, first.
    pub(crate) fn open(dir: &Path, offset: u64) -> Result<Self> {
        let loaded = read(dir)?;
        let (generation, next_slot) = match loaded.newest {
            Some(slot) if slot.offset == offset && slot.generation < GENERATION_LIMIT => {
                (slot.generation, 1 - slot.index)
            }
            _ => {
                // A generation near the end of its range (only a damaged
                // file holds one) starts over: the file is written whole.
                let generation = match loaded.generation {
                    g if g < GENERATION_LIMIT => g + 1,
                    _ => 1,
                };
                write_whole(dir, generation, offset)?;
                (generation, 1)
            }
        };
        let path = dir.join(ACKED_FILE);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open acknowledged offset", &path, e))?;
        Ok(Self {
            file,
            path,
            generation,
            next_slot,
        })
    }

    /// Durably records `offset`: overwrites the older slot and syncs it.
    pub(crate) fn store(&mut self, offset: u64) -> Result<()> {
        let generation = self.generation + 1;
        let at = self.next_slot as u64 * SLOT_STRIDE;
        self.file
            .write_all_at(&encode_slot(generation, offset), at)
            .map_err(|e| Error::io("write acknowledged offset", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync acknowledged offset", &self.path, e))?;
        self.generation = generation;
        self.next_slot = 1 - self.next_slot;
        Ok(())
    }
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

    fn legacy(offset: u64) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(LEGACY_LEN);
        bytes.extend_from_slice(&LEGACY_MAGIC);
        bytes.extend_from_slice(&offset.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

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

    /// Found by the `buffer_segments` fuzz target: a file whose newest
    /// slot holds the last generation made the next update overflow it.
    #[test]
    fn fuzz_a_generation_at_its_end_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        write_whole(dir.path(), u64::MAX, 5).unwrap();
        let mut file = AckedFile::open(dir.path(), 5).unwrap();
        file.store(6).unwrap();
        file.store(7).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(7));
        assert_eq!(read(dir.path()).unwrap().generation, 3);
    }

    #[test]
    fn updates_alternate_slots_in_place_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACKED_FILE);
        let mut file = AckedFile::open(dir.path(), 7).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(7));
        for offset in [8, 100, 101, 5000] {
            file.store(offset).unwrap();
            assert_eq!(load(dir.path()).unwrap(), Acked::Offset(offset));
            assert_eq!(fs::metadata(&path).unwrap().len(), FILE_LEN as u64);
        }
        // Reopening continues in place, from the newest slot.
        drop(file);
        let mut file = AckedFile::open(dir.path(), 5000).unwrap();
        file.store(5001).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(5001));

        // A torn update damages one slot only: the other one still holds
        // the offset before it.
        let mut bytes = fs::read(&path).unwrap();
        let newest = decode_slot(&bytes, 0)
            .into_iter()
            .chain(decode_slot(&bytes, 1))
            .max_by_key(|s| s.generation)
            .unwrap();
        assert_eq!(newest.offset, 5001);
        bytes[newest.index * SLOT_STRIDE as usize + 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(5000));
    }

    #[test]
    fn the_earlier_layout_is_read_and_rewritten_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACKED_FILE);
        fs::write(&path, legacy(42)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(42));
        let mut file = AckedFile::open(dir.path(), 42).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), FILE_LEN as u64);
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(42));
        file.store(43).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Acked::Offset(43));

        let mut bytes = legacy(42);
        bytes[3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(load(dir.path()).unwrap(), Acked::Damaged(_)));
        fs::write(&path, b"short").unwrap();
        assert!(matches!(load(dir.path()).unwrap(), Acked::Damaged(r) if r.contains("5 bytes")));
    }
}
