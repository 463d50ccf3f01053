//! A buffer directory of arbitrary segment files and `acked` file, as a
//! crash, a full disk or a damaged disk could leave it: `fsck` and
//! `inspect` report, `Buffer::open` recovers, every entry it keeps reads
//! back (or fails as corrupt), an append after recovery reads back, and
//! the buffer opens again where it was left. Errors are fine; a panic, a
//! hang or an allocation a length field asks for are not.
//!
//! Segments are either raw bytes or well-formed (header and CRC frames,
//! written by the format the `segment` module documents) with damage on
//! top, so the fuzzer starts from files that get past the checksums.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use caudal_buffer::{Buffer, BufferConfig, MIN_SEGMENT_BYTES};
use caudal_core::record::Position;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    segments: Vec<Segment>,
    acked: Option<AckedFile>,
    /// An entry appended after recovery.
    append: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Segment {
    base: Base,
    body: Body,
}

/// The first offset in the segment's file name.
#[derive(Arbitrary, Debug)]
enum Base {
    Small(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Framed {
        /// The first offset the header states (`None`: the file name's).
        header_base: Option<u64>,
        entries: Vec<Vec<u8>>,
        /// Bytes XORed at positions (modulo the file's length).
        damage: Vec<(u16, u8)>,
        /// Cut the file to this many bytes (a torn write).
        cut: Option<u16>,
    },
}

#[derive(Arbitrary, Debug)]
enum AckedFile {
    Raw(Vec<u8>),
    /// The two slots: (generation, offset), or garbage.
    Slots(Option<(u64, u64)>, Option<(u64, u64)>),
    /// The earlier 20-byte layout.
    Legacy(u64),
}

const MAX_SEGMENTS: usize = 4;
const MAX_ENTRIES: usize = 16;
const MAX_READS: usize = 64;

impl Base {
    fn offset(&self) -> u64 {
        match self {
            Self::Small(n) => u64::from(*n),
            Self::Any(n) => *n,
        }
    }
}

/// A segment file as the format documents it: `CAUDALBF`, version 1, zero,
/// first offset; then `length | CRC-32(offset, length, payload) | payload`.
fn framed(base: u64, header_base: u64, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"CAUDALBF");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&header_base.to_le_bytes());
    for (i, payload) in entries.iter().enumerate() {
        let len = u32::try_from(payload.len()).expect("small entries");
        let mut crc = crc32fast::Hasher::new();
        crc.update(&base.wrapping_add(i as u64).to_le_bytes());
        crc.update(&len.to_le_bytes());
        crc.update(payload);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

fn slot(generation: u64, offset: u64) -> [u8; 28] {
    let mut bytes = [0u8; 28];
    bytes[..8].copy_from_slice(b"CAUDALA2");
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    bytes[16..24].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn acked_bytes(acked: &AckedFile) -> Vec<u8> {
    match acked {
        AckedFile::Raw(bytes) => bytes.clone(),
        AckedFile::Slots(first, second) => {
            let mut out = vec![0u8; 1024];
            for (at, s) in [(0, first), (512, second)] {
                match s {
                    Some((generation, offset)) => {
                        out[at..at + 28].copy_from_slice(&slot(*generation, *offset));
                    }
                    None => out[at..at + 28].fill(0xa5),
                }
            }
            out
        }
        AckedFile::Legacy(offset) => {
            let mut out = Vec::with_capacity(20);
            out.extend_from_slice(b"CAUDALAK");
            out.extend_from_slice(&offset.to_le_bytes());
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            out
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn config() -> BufferConfig {
    BufferConfig {
        segment_bytes: MIN_SEGMENT_BYTES,
        ..BufferConfig::default()
    }
}

/// Reads every entry the buffer holds; a damaged one is skipped.
fn read_all(rt: &tokio::runtime::Runtime, buffer: &Buffer) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = buffer.acked();
    let end = buffer.next_offset();
    for _ in 0..MAX_READS {
        if from >= end {
            break;
        }
        match rt.block_on(buffer.read(from, 16)) {
            Ok(entries) => {
                assert!(!entries.is_empty(), "a read below the end returned nothing");
                for (offset, entry) in entries {
                    assert_eq!(offset, from, "entries out of order");
                    // Entries start with their record's position.
                    let mut rest = entry.as_slice();
                    if let Some(position) = Position::read_binary(&mut rest) {
                        let mut again = Vec::new();
                        position.write_binary(&mut again);
                        assert_eq!(again, entry[..entry.len() - rest.len()]);
                    }
                    out.push((offset, entry));
                    from += 1;
                }
            }
            Err(_) => from += 1,
        }
    }
    out
}

fn write_dir(dir: &Path, input: &Input) -> BTreeMap<u64, Vec<u8>> {
    let mut files = BTreeMap::new();
    for segment in input.segments.iter().take(MAX_SEGMENTS) {
        let base = segment.base.offset();
        let bytes = match &segment.body {
            Body::Raw(bytes) => bytes.clone(),
            Body::Framed {
                header_base,
                entries,
                damage,
                cut,
            } => {
                let entries = &entries[..entries.len().min(MAX_ENTRIES)];
                let mut bytes = framed(base, header_base.unwrap_or(base), entries);
                for (at, xor) in damage {
                    let at = usize::from(*at) % bytes.len();
                    bytes[at] ^= xor;
                }
                if let Some(cut) = cut {
                    bytes.truncate(usize::from(*cut));
                }
                bytes
            }
        };
        files.insert(base, bytes);
    }
    for (base, bytes) in &files {
        std::fs::write(dir.join(format!("{base:020}.seg")), bytes).expect("write a segment");
    }
    if let Some(acked) = &input.acked {
        std::fs::write(dir.join("acked"), acked_bytes(acked)).expect("write acked");
    }
    files
}

fuzz_target!(|input: Input| {
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    write_dir(dir, &input);

    // A single intact segment and nothing acknowledged: every entry must
    // come back as written.
    let intact = match (input.segments.as_slice(), &input.acked) {
        ([s], None) => match &s.body {
            Body::Framed {
                header_base,
                entries,
                damage,
                cut: None,
            } if damage.is_empty()
                && header_base.is_none_or(|h| h == s.base.offset())
                && s.base.offset() < 1 << 32 =>
            {
                Some((s.base.offset(), &entries[..entries.len().min(MAX_ENTRIES)]))
            }
            _ => None,
        },
        _ => None,
    };

    let report = caudal_buffer::fsck(dir);
    let _ = caudal_buffer::inspect(dir);
    if intact.is_some() {
        let report = report.expect("fsck of an intact segment");
        assert!(
            report.is_clean(),
            "an intact segment has problems: {report}"
        );
    }

    let Ok((buffer, _recovery)) = Buffer::open(dir, config()) else {
        assert!(intact.is_none(), "an intact segment does not open");
        return;
    };
    let read = read_all(rt, &buffer);
    if let Some((base, entries)) = intact {
        let expected: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (base + i as u64, e.clone()))
            .collect();
        assert_eq!(read, expected, "an intact segment reads back otherwise");
    }

    let mut next = buffer.next_offset();
    if let Some(entry) = &input.append
        && let Ok(offsets) = rt.block_on(buffer.append(std::slice::from_ref(entry)))
    {
        assert_eq!(
            offsets.start, next,
            "an append after recovery skips offsets"
        );
        let back = rt
            .block_on(buffer.read(offsets.start, 1))
            .expect("the entry just appended reads back");
        assert_eq!(back, vec![(offsets.start, entry.clone())]);
        let _ = rt.block_on(buffer.ack(offsets.end));
        next = offsets.end;
    }
    buffer.close();
    drop(buffer);

    let (again, _) = Buffer::open(dir, config()).expect("a recovered buffer opens again");
    assert!(
        again.next_offset() >= next,
        "reopened at {} after {next}",
        again.next_offset()
    );
    again.close();
});
