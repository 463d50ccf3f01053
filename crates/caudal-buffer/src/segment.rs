//! The on-disk format: segment files of CRC-framed records, and the scanner
//! that open, `inspect` and `fsck` share.
//!
//! A buffer directory holds segment files named by the offset of their first
//! entry (`00000000000000000042.seg`, 20 digits so names sort by offset).
//! Each segment starts with a 24-byte header:
//!
//! ```text
//! magic "CAUDALBF" (8) | version u32 LE (4) | reserved u32 = 0 (4) | first offset u64 LE (8)
//! ```
//!
//! followed by records, back to back:
//!
//! ```text
//! payload length u32 LE (4) | CRC-32 u32 LE (4) | payload (length bytes)
//! ```
//!
//! The CRC (IEEE, `crc32fast`) covers the entry's offset (u64 LE, not
//! stored), the length field and the payload. Covering the length means a
//! run of zeroes never checks out as an empty record; covering the offset
//! means a record that lands at the wrong offset (a damaged length that
//! happens to hit another record's boundary) never checks out either.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes of the header at the start of every segment file.
pub const SEGMENT_HEADER_BYTES: u64 = 24;
/// Bytes of framing before every entry's payload (length and CRC).
pub const RECORD_HEADER_BYTES: u64 = 8;
/// Largest accepted entry: 1 GiB.
pub const MAX_ENTRY_BYTES: usize = 1 << 30;

const MAGIC: [u8; 8] = *b"CAUDALBF";
const VERSION: u32 = 1;
const SEGMENT_SUFFIX: &str = ".seg";
/// A sparse index entry is kept every this many bytes of a segment, so a
/// read at an arbitrary offset scans at most this much before its entry.
pub(crate) const INDEX_INTERVAL: u64 = 64 * 1024;
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// The file name of the segment whose first entry has offset `base`.
pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}{SEGMENT_SUFFIX}")
}

/// The first offset encoded in a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by first offset.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list buffer directory", dir, e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list buffer directory", dir, e))?;
        let name = entry.file_name();
        if let Some(base) = name.to_str().and_then(parse_segment_name) {
            segments.push((base, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(base, _)| *base);
    Ok(segments)
}

pub(crate) fn encode_header(base: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&base.to_le_bytes());
    header
}

/// What a segment's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Valid,
    /// Shorter than a header, or all zeroes: a segment whose creation was cut
    /// short by a crash.
    Torn,
    /// Not a segment this version can read.
    Invalid(String),
}

fn check_header(bytes: &[u8], base: u64) -> Header {
    if bytes.len() < SEGMENT_HEADER_BYTES as usize || bytes.iter().all(|b| *b == 0) {
        return Header::Torn;
    }
    if bytes[..8] != MAGIC {
        return Header::Invalid("no caudal buffer magic at the start".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Header::Invalid(format!(
            "segment format version {version}, this build reads version {VERSION}"
        ));
    }
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&bytes[16..24]);
    let stored = u64::from_le_bytes(stored);
    if stored != base {
        return Header::Invalid(format!(
            "header says first offset {stored}, the file name says {base}"
        ));
    }
    Header::Valid
}

/// The CRC stored with the entry at `offset`.
pub(crate) fn record_crc(offset: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&offset.to_le_bytes());
    hasher.update(&frame_len(payload).to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The length field of a payload already checked against [`MAX_ENTRY_BYTES`].
fn frame_len(payload: &[u8]) -> u32 {
    u32::try_from(payload.len()).unwrap_or(u32::MAX)
}

/// Appends the frame of the entry at `offset` to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, offset: u64, payload: &[u8]) {
    out.extend_from_slice(&frame_len(payload).to_le_bytes());
    out.extend_from_slice(&record_crc(offset, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A framed record whose checksum does not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BadRecord {
    pub offset: u64,
    pub position: u64,
}

/// Everything one pass over a segment file learns.
#[derive(Debug)]
pub(crate) struct Scan {
    /// The segment's first offset (from its name).
    pub base: u64,
    pub file_len: u64,
    pub header: Header,
    /// Records whose frames chain from the header (checksum good or not).
    pub framed: u64,
    /// Byte after the last framed record.
    pub framed_end: u64,
    /// Framed records up to and including the last one whose checksum matches.
    pub good_through: u64,
    /// Byte after the last record whose checksum matches.
    pub good_end: u64,
    /// Framed records whose checksum does not match, in order.
    pub bad: Vec<BadRecord>,
    /// Why framing stopped before the end of the file, if it did.
    pub break_reason: Option<&'static str>,
    /// Sparse `(offset, byte position)` entries over the framed records.
    pub index: Vec<(u64, u64)>,
}

impl Scan {
    /// The same scan seen as the last (active) segment after a crash. The
    /// torn tail is everything after the last record whose checksum matches:
    /// a crash leaves a cut-off record (or, after a power loss, zeroes or
    /// stale bytes) at the end, never a good record after a bad one. Records
    /// with a bad checksum therefore count as corrupt only when a good record
    /// follows them.
    pub(crate) fn into_tail(mut self) -> Self {
        let end_offset = self.base + self.good_through;
        self.bad.retain(|b| b.offset < end_offset);
        self.index.retain(|(offset, _)| *offset < end_offset);
        self.framed = self.good_through;
        self.framed_end = self.good_end;
        self
    }

    /// Bytes after the last framed record (the torn tail of a last segment,
    /// the unreadable rest of a sealed one).
    pub(crate) fn unframed_bytes(&self) -> u64 {
        self.file_len.saturating_sub(self.framed_end)
    }
}

/// Reads a segment file once from start to end, verifying every checksum.
/// Never fails on damaged content (that is reported in the [`Scan`]); only on
/// I/O errors.
pub(crate) fn scan_segment(path: &Path, base: u64) -> Result<Scan> {
    let io_err = |e| Error::io("scan segment", path, e);
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, file);
    let mut scan = Scan {
        base,
        file_len,
        header: Header::Torn,
        framed: 0,
        framed_end: SEGMENT_HEADER_BYTES,
        good_through: 0,
        good_end: SEGMENT_HEADER_BYTES,
        bad: Vec::new(),
        break_reason: None,
        index: Vec::new(),
    };
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    (&mut reader)
        .take(SEGMENT_HEADER_BYTES)
        .read_to_end(&mut header)
        .map_err(io_err)?;
    scan.header = check_header(&header, base);
    if scan.header != Header::Valid {
        scan.framed_end = 0;
        scan.good_end = 0;
        return Ok(scan);
    }

    let mut pos = SEGMENT_HEADER_BYTES;
    let mut last_indexed = 0;
    let mut payload = Vec::new();
    loop {
        if pos == file_len {
            break;
        }
        // No entry has the last offset (an append that would reach it is
        // refused), so every `base + records` below is an offset.
        if base.checked_add(scan.framed + 1).is_none() {
            scan.break_reason = Some("a record's offset runs past the largest offset");
            break;
        }
        if file_len - pos < RECORD_HEADER_BYTES {
            scan.break_reason = Some("a record header is cut off by the end of the file");
            break;
        }
        let mut frame = [0u8; RECORD_HEADER_BYTES as usize];
        reader.read_exact(&mut frame).map_err(io_err)?;
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let end = pos + RECORD_HEADER_BYTES + u64::from(len);
        if end > file_len {
            scan.break_reason = Some("a record's length runs past the end of the file");
            break;
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload).map_err(io_err)?;
        let offset = base + scan.framed;
        if pos - last_indexed >= INDEX_INTERVAL {
            scan.index.push((offset, pos));
            last_indexed = pos;
        }
        scan.framed += 1;
        scan.framed_end = end;
        if record_crc(offset, &payload) == crc {
            scan.good_through = scan.framed;
            scan.good_end = end;
        } else {
            scan.bad.push(BadRecord {
                offset,
                position: pos,
            });
        }
        pos = end;
    }
    Ok(scan)
}

/// Sequential reader of records in one segment, from a known frame position.
#[derive(Debug)]
pub(crate) struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    /// Byte position of the next frame.
    pub pos: u64,
    /// Offset of the entry at `pos`.
    pub offset: u64,
    /// End of the readable data: no frame may extend past it.
    end_pos: u64,
}

impl SegmentReader {
    /// Opens `path` positioned at the frame of entry `offset`, which starts
    /// at byte `pos`. `end_pos` bounds the data that may be read.
    pub(crate) fn open(path: &Path, pos: u64, offset: u64, end_pos: u64) -> io::Result<Self> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(pos))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(256 * 1024, file),
            pos,
            offset,
            end_pos,
        })
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            segment: self.path.clone(),
            position: self.pos,
            offset: self.offset,
            reason,
        }
    }

    fn read_frame(&mut self) -> Result<(u32, u32)> {
        if self.end_pos - self.pos < RECORD_HEADER_BYTES {
            return Err(self.corrupt(format!(
                "record frame runs past the end of the segment's data at byte {}",
                self.end_pos
            )));
        }
        let mut frame = [0u8; RECORD_HEADER_BYTES as usize];
        self.reader
            .read_exact(&mut frame)
            .map_err(|e| Error::io("read segment", &self.path, e))?;
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if self.pos + RECORD_HEADER_BYTES + u64::from(len) > self.end_pos {
            return Err(self.corrupt(format!(
                "record length {len} runs past the end of the segment's data at byte {}",
                self.end_pos
            )));
        }
        Ok((len, crc))
    }

    /// Moves forward to the frame of entry `target` (>= the current offset),
    /// reading only frame headers.
    pub(crate) fn skip_to(&mut self, target: u64) -> Result<()> {
        while self.offset < target {
            let (len, _) = self.read_frame()?;
            self.reader
                .seek_relative(i64::from(len))
                .map_err(|e| Error::io("read segment", &self.path, e))?;
            self.pos += RECORD_HEADER_BYTES + u64::from(len);
            self.offset += 1;
        }
        Ok(())
    }

    /// Reads and verifies the entry at the current offset, then moves on.
    pub(crate) fn next_entry(&mut self) -> Result<Vec<u8>> {
        let (len, crc) = self.read_frame()?;
        let mut payload = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut payload)
            .map_err(|e| Error::io("read segment", &self.path, e))?;
        if record_crc(self.offset, &payload) != crc {
            return Err(self.corrupt("checksum mismatch".into()));
        }
        self.pos += RECORD_HEADER_BYTES + u64::from(len);
        self.offset += 1;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_by_offset_and_round_trip() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(
            parse_segment_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
    }

    #[test]
    fn zeroes_never_check_out_as_a_record() {
        assert_ne!(record_crc(0, &[]), 0);
        let mut frame = Vec::new();
        encode_record(&mut frame, 7, b"hello");
        assert_eq!(frame.len(), 8 + 5);
        assert_ne!(record_crc(8, b"hello"), record_crc(7, b"hello"));
    }

    /// Found by the `buffer_segments` fuzz target: a segment named after
    /// the last offset holding a record made `fsck` overflow the offset.
    #[test]
    fn fuzz_records_past_the_largest_offset_are_not_framed() {
        let dir = tempfile::tempdir().unwrap();
        let base = u64::MAX;
        let path = dir.path().join(segment_file_name(base));
        let mut bytes = encode_header(base).to_vec();
        encode_record(&mut bytes, base, b"last");
        std::fs::write(&path, &bytes).unwrap();
        let scan = scan_segment(&path, base).unwrap().into_tail();
        assert_eq!((scan.framed, scan.good_through), (0, 0));
        assert_eq!(scan.unframed_bytes(), RECORD_HEADER_BYTES + 4);
        let report = crate::fsck(dir.path()).unwrap();
        assert!(!report.is_clean(), "{report}");
    }

    #[test]
    fn header_checks() {
        let header = encode_header(9);
        assert_eq!(check_header(&header, 9), Header::Valid);
        assert!(matches!(check_header(&header, 10), Header::Invalid(_)));
        assert_eq!(check_header(&header[..10], 9), Header::Torn);
        assert_eq!(check_header(&[0; 24], 9), Header::Torn);
        assert!(matches!(check_header(&[1; 24], 9), Header::Invalid(_)));
    }
}
