//! Read-only looks at a buffer directory, for `caudal buffer inspect` and
//! `caudal buffer fsck`, and the examination that [`Buffer::open`](crate::Buffer::open)
//! shares with them so that all three judge damage the same way.
//!
//! Neither [`inspect`] nor [`fsck`] takes the directory's lock or changes a
//! byte, so both may run beside a live pipeline; an append in progress can
//! then show up as a torn tail.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::acked::{self, Acked};
use crate::error::{Error, Result};
use crate::segment::{Header, SEGMENT_HEADER_BYTES, list_segments, scan_segment};
use crate::space::{self, Space};

/// One damaged or suspicious place in a buffer directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// File name inside the buffer directory (a segment, or `acked`).
    pub file: String,
    /// Byte position in that file.
    pub position: u64,
    /// What is wrong there.
    #[serde(flatten)]
    pub kind: ProblemKind,
}

/// What is wrong at a [`Problem`]'s place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// Bytes after the last complete record of the last segment: an append
    /// cut short by a crash. Never reported durable, so nothing is lost;
    /// opening the buffer truncates them.
    TornTail {
        /// How many bytes.
        bytes: u64,
    },
    /// A last segment whose header was never completely written (a crash
    /// while starting it). It holds no record; opening the buffer deletes it.
    TornSegment {
        /// The file's size.
        bytes: u64,
    },
    /// A record whose checksum does not match: its bytes changed after they
    /// were written. Reading its offset fails; the records around it are fine.
    CorruptRecord {
        /// The record's offset.
        offset: u64,
    },
    /// Offsets that cannot be read: a damaged length or header breaks the
    /// framing, or no segment holds them.
    LostRecords {
        /// First unreadable offset.
        first_offset: u64,
        /// End (exclusive) of the unreadable offsets.
        end_offset: u64,
        /// Why.
        reason: String,
    },
    /// A segment header that is not this version's format.
    BadHeader {
        /// What is wrong with it.
        reason: String,
    },
    /// A segment holds more records than fit before the next segment's first
    /// offset; the extra ones are ignored.
    Overlap {
        /// Records the segment may hold.
        expected: u64,
        /// Records found.
        found: u64,
    },
    /// The `acked` file does not check out; the buffer falls back to its
    /// first retained offset (entries may be delivered again, none is lost).
    AckedFile {
        /// What is wrong with it.
        reason: String,
    },
    /// The acknowledged offset is past the last record on disk: records that
    /// were acknowledged are missing (an fsync interval and a power loss).
    /// Opening the buffer continues numbering at the acknowledged offset.
    AckedAhead {
        /// The acknowledged offset.
        acked: u64,
        /// One past the last record on disk.
        next_offset: u64,
    },
}

impl ProblemKind {
    /// True for damage that a crash alone can leave behind and that opening
    /// the buffer repairs without losing a durable record.
    pub fn is_torn(&self) -> bool {
        matches!(self, Self::TornTail { .. } | Self::TornSegment { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} byte {}: ", self.file, self.position)?;
        match &self.kind {
            ProblemKind::TornTail { bytes } => write!(
                f,
                "torn tail of {bytes} bytes after the last complete record (truncated at next open)"
            ),
            ProblemKind::TornSegment { bytes } => write!(
                f,
                "segment of {bytes} bytes with an incomplete header (deleted at next open)"
            ),
            ProblemKind::CorruptRecord { offset } => {
                write!(f, "corrupt record at offset {offset} (checksum mismatch)")
            }
            ProblemKind::LostRecords {
                first_offset,
                end_offset,
                reason,
            } => write!(
                f,
                "offsets {first_offset}..{end_offset} cannot be read: {reason}"
            ),
            ProblemKind::BadHeader { reason } => write!(f, "bad segment header: {reason}"),
            ProblemKind::Overlap { expected, found } => write!(
                f,
                "{found} records where {expected} fit before the next segment"
            ),
            ProblemKind::AckedFile { reason } => {
                write!(f, "acknowledged offset unreadable: {reason}")
            }
            ProblemKind::AckedAhead { acked, next_offset } => write!(
                f,
                "acknowledged offset {acked} is past the last record on disk ({next_offset})"
            ),
        }
    }
}

/// One segment file as [`inspect`] and [`fsck`] see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentInfo {
    /// File name inside the buffer directory.
    pub file: String,
    /// Offset of its first entry.
    pub first_offset: u64,
    /// End (exclusive) of its offsets.
    pub end_offset: u64,
    /// Records it holds (for [`inspect`], sealed segments are counted from
    /// the offsets their names claim, without reading them).
    pub records: u64,
    /// File size.
    pub bytes: u64,
}

/// What [`inspect`] reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// The buffer directory.
    pub dir: PathBuf,
    /// Acknowledged offset (entries below it are done), if recorded.
    pub acked: Option<u64>,
    /// First offset still on disk.
    pub first_offset: u64,
    /// Offset the next appended entry will get.
    pub next_offset: u64,
    /// Segment files, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Bytes of all segment files.
    pub disk_bytes: u64,
    /// Bytes after the last complete record (truncated at next open).
    pub torn_bytes: u64,
    /// Size and free space of the filesystem holding the directory (`None`
    /// when the filesystem cannot be asked).
    pub space: Option<Space>,
    /// Set while the pipeline's appends wait for disk space: when an append
    /// first found the disk full, in milliseconds since the Unix epoch. Read
    /// from the marker file `DISK_FULL`, which the writer creates when its
    /// disk fills and removes once an append goes through again (and which
    /// opening the buffer clears).
    pub disk_full_since_unix_ms: Option<u64>,
}

impl Inspection {
    /// Entries appended but not acknowledged.
    pub fn unacked_records(&self) -> u64 {
        self.next_offset
            .saturating_sub(self.acked.unwrap_or(self.first_offset))
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "buffer {}", self.dir.display())?;
        writeln!(
            f,
            "offsets {}..{}, acknowledged {}, unacknowledged {} entries, {} bytes on disk",
            self.first_offset,
            self.next_offset,
            self.acked
                .map_or_else(|| "nothing".to_string(), |a| a.to_string()),
            self.unacked_records(),
            self.disk_bytes
        )?;
        if self.torn_bytes > 0 {
            writeln!(
                f,
                "torn tail: {} bytes (truncated when the pipeline next opens the buffer)",
                self.torn_bytes
            )?;
        }
        if let Some(space) = self.space {
            writeln!(
                f,
                "filesystem: {} bytes free of {}",
                space.free_bytes, space.total_bytes
            )?;
        }
        if let Some(since) = self.disk_full_since_unix_ms {
            writeln!(
                f,
                "disk full: appends have been waiting for space for {} s (intake resumes by itself once delivery or an operator frees space)",
                space::ago(since).as_secs()
            )?;
        }
        writeln!(
            f,
            "{:<26} {:>20} {:>20} {:>10} {:>12}",
            "segment", "first", "end", "records", "bytes"
        )?;
        for s in &self.segments {
            writeln!(
                f,
                "{:<26} {:>20} {:>20} {:>10} {:>12}",
                s.file, s.first_offset, s.end_offset, s.records, s.bytes
            )?;
        }
        Ok(())
    }
}

/// What [`fsck`] reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FsckReport {
    /// The buffer directory.
    pub dir: PathBuf,
    /// Acknowledged offset, if recorded and readable.
    pub acked: Option<u64>,
    /// Segment files, oldest first, with the records actually found.
    pub segments: Vec<SegmentInfo>,
    /// Records whose checksum and framing check out.
    pub records_ok: u64,
    /// Everything wrong, in file order.
    pub problems: Vec<Problem>,
}

impl FsckReport {
    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Damage beyond a torn tail: some record cannot be read back.
    pub fn has_corruption(&self) -> bool {
        self.problems.iter().any(|p| !p.kind.is_torn())
    }
}

impl fmt::Display for FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "buffer {}: {} segments, {} records verified",
            self.dir.display(),
            self.segments.len(),
            self.records_ok
        )?;
        if self.problems.is_empty() {
            return writeln!(f, "no problems found");
        }
        for problem in &self.problems {
            writeln!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Lists the segments of the buffer in `dir` with their offset ranges, sizes
/// and record counts, the acknowledged offset, the free space of its
/// filesystem and whether appends wait for disk space. Reads only the last
/// segment (to count its records); changes nothing.
pub fn inspect(dir: &Path) -> Result<Inspection> {
    let acked = match acked::load(dir)? {
        Acked::Offset(offset) => Some(offset),
        Acked::Missing | Acked::Damaged(_) => None,
    };
    let listed = list_segments(dir)?;
    let mut segments = Vec::with_capacity(listed.len());
    let mut torn_bytes = 0;
    for (i, (base, path)) in listed.iter().enumerate() {
        let bytes = std::fs::metadata(path)
            .map_err(|e| Error::io("inspect segment", path, e))?
            .len();
        let records = match listed.get(i + 1) {
            Some((next, _)) => next - base,
            None => {
                let scan = scan_segment(path, *base)?;
                if scan.header == Header::Valid {
                    let scan = scan.into_tail();
                    torn_bytes = scan.unframed_bytes();
                    scan.framed
                } else {
                    torn_bytes = bytes;
                    0
                }
            }
        };
        segments.push(SegmentInfo {
            file: file_name(path),
            first_offset: *base,
            end_offset: base + records,
            records,
            bytes,
        });
    }
    let first_offset = segments
        .first()
        .map_or(acked.unwrap_or(0), |s| s.first_offset);
    let next_offset = segments.last().map_or(first_offset, |s| s.end_offset);
    Ok(Inspection {
        dir: dir.to_path_buf(),
        acked,
        first_offset,
        next_offset,
        disk_bytes: segments.iter().map(|s| s.bytes).sum(),
        segments,
        torn_bytes,
        space: space::space(dir).ok(),
        disk_full_since_unix_ms: space::disk_full_since(dir),
    })
}

/// Verifies every record's checksum and framing in the buffer in `dir` and
/// lists each problem with its file and byte position. Changes nothing.
pub fn fsck(dir: &Path) -> Result<FsckReport> {
    let mut problems = Vec::new();
    let acked = match acked::load(dir)? {
        Acked::Offset(offset) => Some(offset),
        Acked::Missing => None,
        Acked::Damaged(reason) => {
            problems.push(Problem {
                file: acked::ACKED_FILE.into(),
                position: 0,
                kind: ProblemKind::AckedFile { reason },
            });
            None
        }
    };
    let exam = examine(&list_segments(dir)?)?;
    problems.extend(exam.problems);
    let next_offset = exam.segments.last().map(|s| s.base + s.records);
    if let (Some(acked), Some(next_offset)) = (acked, next_offset)
        && acked > next_offset
    {
        problems.push(Problem {
            file: acked::ACKED_FILE.into(),
            position: 0,
            kind: ProblemKind::AckedAhead { acked, next_offset },
        });
    }
    Ok(FsckReport {
        dir: dir.to_path_buf(),
        acked,
        segments: exam
            .segments
            .iter()
            .map(|s| SegmentInfo {
                file: file_name(&s.path),
                first_offset: s.base,
                end_offset: s.base + s.records,
                records: s.records,
                bytes: s.file_len,
            })
            .collect(),
        records_ok: exam.records_ok,
        problems,
    })
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// One segment as the examination leaves it.
#[derive(Debug)]
pub(crate) struct SegmentView {
    pub base: u64,
    pub path: PathBuf,
    pub file_len: u64,
    /// Framed records: offsets `base..base + records` (some may be corrupt).
    pub records: u64,
    /// Byte after the last framed record.
    pub end: u64,
    /// Sparse `(offset, position)` index over the framed records.
    pub index: Vec<(u64, u64)>,
    /// Offsets `base + records..lost_until` exist (a later segment starts
    /// after them) but cannot be read, and why.
    pub lost: Option<(u64, String)>,
}

/// The judgement of a whole directory: which segments hold what, and every
/// problem found.
#[derive(Debug, Default)]
pub(crate) struct Examination {
    /// Segments kept, oldest first; the last one is the active segment.
    pub segments: Vec<SegmentView>,
    /// Trailing segments whose header was torn (to delete on open).
    pub torn_segments: Vec<PathBuf>,
    /// Set when the last segment's header is not this format: open refuses.
    pub unusable_last: Option<(PathBuf, String)>,
    pub records_ok: u64,
    pub problems: Vec<Problem>,
}

/// Scans `segments` (sorted by first offset): all but the last are sealed
/// and must hold exactly the offsets up to the next one's first; the last
/// may end in a torn tail.
pub(crate) fn examine(segments: &[(u64, PathBuf)]) -> Result<Examination> {
    let mut exam = Examination::default();
    let mut count = segments.len();
    // A crash while starting a segment leaves a file with a torn header at
    // the end; it holds no record, and the one before it becomes the last.
    let mut last_scan = None;
    while let Some((base, path)) = segments[..count].last() {
        let scan = scan_segment(path, *base)?;
        match &scan.header {
            Header::Torn => {
                exam.problems.push(Problem {
                    file: file_name(path),
                    position: 0,
                    kind: ProblemKind::TornSegment {
                        bytes: scan.file_len,
                    },
                });
                exam.torn_segments.push(path.clone());
                count -= 1;
            }
            Header::Invalid(reason) => {
                exam.unusable_last = Some((path.clone(), reason.clone()));
                exam.problems.push(Problem {
                    file: file_name(path),
                    position: 0,
                    kind: ProblemKind::BadHeader {
                        reason: reason.clone(),
                    },
                });
                return Ok(exam);
            }
            Header::Valid => {
                last_scan = Some(scan);
                break;
            }
        }
    }
    let Some(last_scan) = last_scan else {
        return Ok(exam);
    };
    // Problems are listed in file order: the torn segments found above come last.
    let torn_problems = std::mem::take(&mut exam.problems);

    // Sealed segments: synced before their successor was created, so any
    // damage in them is corruption, never a torn write.
    for (i, (base, path)) in segments[..count - 1].iter().enumerate() {
        let scan = scan_segment(path, *base)?;
        let file = file_name(path);
        let expected = segments[i + 1].0 - base;
        let header_problem = match &scan.header {
            Header::Valid => None,
            Header::Torn => Some("header missing or zeroed".to_string()),
            Header::Invalid(reason) => Some(reason.clone()),
        };
        if let Some(reason) = header_problem {
            exam.problems.push(Problem {
                file: file.clone(),
                position: 0,
                kind: ProblemKind::BadHeader {
                    reason: reason.clone(),
                },
            });
            exam.segments.push(SegmentView {
                base: *base,
                path: path.clone(),
                file_len: scan.file_len,
                records: 0,
                end: SEGMENT_HEADER_BYTES.min(scan.file_len),
                index: Vec::new(),
                lost: Some((
                    base + expected,
                    format!("segment header is damaged: {reason}"),
                )),
            });
            continue;
        }
        let mut records = scan.framed;
        let end = scan.framed_end;
        let mut index = scan.index;
        if records > expected {
            exam.problems.push(Problem {
                file: file.clone(),
                position: 0,
                kind: ProblemKind::Overlap {
                    expected,
                    found: records,
                },
            });
            // Keep the first `expected` records; the extra bytes stay
            // counted in `end` (finding their start would take another pass).
            records = expected;
            index.retain(|(offset, _)| *offset < base + expected);
        }
        for bad in scan.bad.iter().filter(|b| b.offset < base + records) {
            exam.problems.push(Problem {
                file: file.clone(),
                position: bad.position,
                kind: ProblemKind::CorruptRecord { offset: bad.offset },
            });
        }
        let bad = scan
            .bad
            .iter()
            .filter(|b| b.offset < base + records)
            .count() as u64;
        exam.records_ok += records - bad;
        let lost = (records < expected).then(|| {
            let reason = scan
                .break_reason
                .unwrap_or("the segment ends before the next segment's first offset")
                .to_string();
            exam.problems.push(Problem {
                file: file.clone(),
                position: end,
                kind: ProblemKind::LostRecords {
                    first_offset: base + records,
                    end_offset: base + expected,
                    reason: reason.clone(),
                },
            });
            (base + expected, reason)
        });
        exam.segments.push(SegmentView {
            base: *base,
            path: path.clone(),
            file_len: scan.file_len,
            records,
            end,
            index,
            lost,
        });
    }

    // The last (active) segment.
    let (base, path) = &segments[count - 1];
    let file = file_name(path);
    let file_len = last_scan.file_len;
    let scan = last_scan.into_tail();
    for bad in &scan.bad {
        exam.problems.push(Problem {
            file: file.clone(),
            position: bad.position,
            kind: ProblemKind::CorruptRecord { offset: bad.offset },
        });
    }
    exam.records_ok += scan.framed - scan.bad.len() as u64;
    if scan.unframed_bytes() > 0 {
        exam.problems.push(Problem {
            file: file.clone(),
            position: scan.framed_end,
            kind: ProblemKind::TornTail {
                bytes: scan.unframed_bytes(),
            },
        });
    }
    exam.segments.push(SegmentView {
        base: *base,
        path: path.clone(),
        file_len,
        records: scan.framed,
        end: scan.framed_end,
        index: scan.index,
        lost: None,
    });
    exam.problems.extend(torn_problems);
    Ok(exam)
}
