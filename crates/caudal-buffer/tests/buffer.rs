//! The buffer against real files: rollover, acknowledgements, reopen, torn
//! tails, corruption, backpressure and close.

// clippy.toml's allow-unwrap-in-tests covers #[test] bodies only; the
// helpers of this test crate fail loudly the same way.
#![allow(clippy::unwrap_used)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::pin;

use caudal_buffer::{
    Buffer, BufferConfig, Error, FsyncPolicy, ProblemKind, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES, fsck, inspect,
};

/// The entry stored at `offset`: its content and length depend on the
/// offset, so any mix-up shows.
fn payload(offset: u64) -> Vec<u8> {
    let len = 20 + (offset * 37 % 180) as usize;
    (0..len)
        .map(|i| (offset as usize * 31 + i * 7) as u8)
        .collect()
}

fn frame_bytes(offset: u64) -> u64 {
    RECORD_HEADER_BYTES + payload(offset).len() as u64
}

fn small_segments() -> BufferConfig {
    BufferConfig {
        segment_bytes: 4096,
        ..BufferConfig::default()
    }
}

async fn append_range(buffer: &Buffer, n: u64) -> std::ops::Range<u64> {
    let start = buffer.next_offset();
    let entries: Vec<Vec<u8>> = (start..start + n).map(payload).collect();
    let range = buffer.append(&entries).await.unwrap();
    assert_eq!(range, start..start + n);
    range
}

/// Reads everything from `from` to the end and checks every entry.
async fn read_all_checked(buffer: &Buffer, from: u64) -> u64 {
    let end = buffer.next_offset();
    let mut next = from;
    while next < end {
        let got = buffer.read(next, 97).await.unwrap();
        assert!(!got.is_empty());
        for (offset, entry) in got {
            assert_eq!(offset, next);
            assert_eq!(entry, payload(offset), "entry {offset}");
            next += 1;
        }
    }
    next - from
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn round_trip_across_segment_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(
        (recovery.next_offset, recovery.acked, recovery.segments),
        (0, 0, 1)
    );
    for batch in [1, 10, 100, 57, 3] {
        append_range(&buffer, batch).await;
    }
    assert_eq!(buffer.next_offset(), 171);
    assert!(
        segment_files(dir.path()).len() > 3,
        "small segments roll over"
    );
    assert_eq!(read_all_checked(&buffer, 0).await, 171);
    // A read spanning segments returns up to max_entries, in order.
    let got = buffer.read(10, 150).await.unwrap();
    assert_eq!(got.len(), 150);
    assert_eq!(got.first().unwrap().0, 10);
    assert_eq!(got.last().unwrap().0, 159);
    // Reading past the end is capped at what exists.
    assert_eq!(buffer.read(170, 1000).await.unwrap().len(), 1);

    let stats = buffer.stats();
    assert_eq!(stats.unacked_records, 171);
    assert_eq!(stats.unacked_bytes, (0..171).map(frame_bytes).sum::<u64>());
    assert_eq!(stats.segments, segment_files(dir.path()).len());

    let report = fsck(dir.path()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.records_ok, 171);
}

#[tokio::test]
async fn reopen_continues_offsets() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
        append_range(&buffer, 120).await;
    }
    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.next_offset, 120);
    assert_eq!(recovery.acked, 0);
    assert_eq!(recovery.unacked_records, 120);
    assert_eq!(recovery.torn_bytes, 0);
    assert!(recovery.corrupt.is_empty());
    assert_eq!(append_range(&buffer, 5).await, 120..125);
    assert_eq!(read_all_checked(&buffer, 0).await, 125);
}

#[tokio::test]
async fn ack_deletes_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
    append_range(&buffer, 300).await;
    let before = segment_files(dir.path()).len();
    buffer.ack(200).await.unwrap();
    let after = segment_files(dir.path()).len();
    assert!(after < before, "{after} segments left of {before}");
    assert_eq!(buffer.acked(), 200);
    let first = buffer.stats().first_offset;
    assert!(first <= 200 && first > 0, "first retained {first}");
    assert!(matches!(
        buffer.read(0, 1).await,
        Err(Error::Gone { requested: 0, .. })
    ));
    // Acknowledging less is a no-op; past the end is refused.
    buffer.ack(100).await.unwrap();
    assert_eq!(buffer.acked(), 200);
    assert!(matches!(
        buffer.ack(301).await,
        Err(Error::AckBeyondEnd {
            requested: 301,
            next_offset: 300
        })
    ));
    assert_eq!(
        buffer.stats().unacked_bytes,
        (200..300).map(frame_bytes).sum::<u64>()
    );
    drop(buffer);

    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.acked, 200);
    assert_eq!(recovery.first_offset, first);
    assert_eq!(recovery.next_offset, 300);
    assert_eq!(recovery.unacked_records, 100);
    assert_eq!(
        recovery.unacked_bytes,
        (200..300).map(frame_bytes).sum::<u64>()
    );
    assert_eq!(segment_files(dir.path()).len(), after);
    assert_eq!(read_all_checked(&buffer, 200).await, 100);

    // Everything acknowledged: only the active segment stays.
    buffer.ack(300).await.unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(buffer.stats().unacked_bytes, 0);
    let inspection = inspect(dir.path()).unwrap();
    assert_eq!(inspection.acked, Some(300));
    assert_eq!(inspection.next_offset, 300);
    assert_eq!(inspection.unacked_records(), 0);
}

#[tokio::test]
async fn torn_tail_cut_mid_record_keeps_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
        append_range(&buffer, 80).await;
    }
    let last = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&last).unwrap().len();
    // Cut the last record (offset 79) in the middle of its payload.
    let cut = 5;
    OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - cut)
        .unwrap();

    let report = fsck(dir.path()).unwrap();
    assert!(!report.has_corruption(), "{report}");
    assert_eq!(report.problems.len(), 1);
    let expected_torn = frame_bytes(79) - cut;
    assert_eq!(
        report.problems[0].kind,
        ProblemKind::TornTail {
            bytes: expected_torn
        }
    );
    assert_eq!(report.problems[0].position, len - frame_bytes(79));
    assert_eq!(inspect(dir.path()).unwrap().torn_bytes, expected_torn);

    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.next_offset, 79);
    assert_eq!(recovery.torn_bytes, expected_torn);
    assert_eq!(recovery.torn.len(), 1);
    assert!(recovery.corrupt.is_empty());
    assert_eq!(fs::metadata(&last).unwrap().len(), len - frame_bytes(79));

    // Appends continue cleanly after the cut.
    assert_eq!(append_range(&buffer, 30).await, 79..109);
    assert_eq!(read_all_checked(&buffer, 0).await, 109);
    drop(buffer);
    assert!(fsck(dir.path()).unwrap().is_clean());
}

#[tokio::test]
async fn torn_tail_of_garbage_or_zeroes_is_cut() {
    for garbage in [vec![0xAB_u8; 100], vec![0; 4096], vec![7, 0, 0, 0]] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
            append_range(&buffer, 50).await;
        }
        let last = segment_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(&garbage)
            .unwrap();

        let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
        assert_eq!(recovery.next_offset, 50, "garbage {:?}", &garbage[..4]);
        assert_eq!(recovery.torn_bytes, garbage.len() as u64);
        assert_eq!(fs::metadata(&last).unwrap().len(), len);
        append_range(&buffer, 10).await;
        assert_eq!(read_all_checked(&buffer, 0).await, 60);
    }
}

#[tokio::test]
async fn segment_with_a_torn_header_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
        append_range(&buffer, 40).await;
    }
    // A crash right after creating the next segment, mid-header.
    let torn = dir.path().join(format!("{:020}.seg", 40));
    fs::write(&torn, b"CAUDAL").unwrap();
    let report = fsck(dir.path()).unwrap();
    assert!(!report.has_corruption(), "{report}");
    assert_eq!(
        report.problems[0].kind,
        ProblemKind::TornSegment { bytes: 6 }
    );

    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.torn_bytes, 6);
    assert_eq!(recovery.next_offset, 40);
    assert!(!torn.exists() || fs::metadata(&torn).unwrap().len() > 6);
    append_range(&buffer, 200).await;
    assert_eq!(read_all_checked(&buffer, 0).await, 240);
}

/// Byte position of the frame of `offset` in a single-segment buffer.
fn position_of(offset: u64) -> u64 {
    SEGMENT_HEADER_BYTES + (0..offset).map(frame_bytes).sum::<u64>()
}

fn flip_byte(path: &Path, position: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[position as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn flipped_byte_mid_file_is_reported_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig::default();
    {
        let (buffer, _) = Buffer::open(dir.path(), config.clone()).unwrap();
        append_range(&buffer, 100).await;
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let position = position_of(50);
    flip_byte(&segment, position + RECORD_HEADER_BYTES + 3);

    let report = fsck(dir.path()).unwrap();
    assert!(report.has_corruption());
    assert_eq!(report.problems.len(), 1, "{report}");
    let problem = &report.problems[0];
    assert_eq!(problem.kind, ProblemKind::CorruptRecord { offset: 50 });
    assert_eq!(problem.position, position);
    assert_eq!(problem.file, "00000000000000000000.seg");
    assert!(
        report.to_string().contains("corrupt record at offset 50"),
        "{report}"
    );
    assert_eq!(report.records_ok, 99);

    // Open keeps the damaged record in place (the records after it are
    // durable and intact) and reports it.
    let (buffer, recovery) = Buffer::open(dir.path(), config).unwrap();
    assert_eq!(recovery.next_offset, 100);
    assert_eq!(recovery.torn_bytes, 0);
    assert_eq!(recovery.corrupt.len(), 1);

    // A read stops before the damage, then fails at it, naming the place.
    let got = buffer.read(40, 100).await.unwrap();
    assert_eq!(got.len(), 10);
    match buffer.read(50, 100).await {
        Err(Error::Corrupt {
            segment: path,
            position: at,
            offset,
            ..
        }) => {
            assert_eq!((path, at, offset), (segment.clone(), position, 50));
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    let err = buffer.read(50, 1).await.unwrap_err();
    assert!(err.is_corruption());
    assert!(
        err.to_string().contains("00000000000000000000.seg"),
        "{err}"
    );
    // The records after it read fine, and the damaged one can be acknowledged.
    assert_eq!(buffer.read(51, 100).await.unwrap().len(), 49);
    buffer.ack(51).await.unwrap();
    append_range(&buffer, 1).await;
}

#[tokio::test]
async fn damaged_length_in_a_sealed_segment_loses_only_the_rest_of_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
        append_range(&buffer, 200).await;
    }
    let files = segment_files(dir.path());
    let first = &files[0];
    let second_base: u64 = files[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Make record 3's length run past the end of the segment.
    let position = position_of(3);
    let mut bytes = fs::read(first).unwrap();
    bytes[position as usize + 3] = 0x7f;
    fs::write(first, bytes).unwrap();

    let report = fsck(dir.path()).unwrap();
    assert_eq!(report.problems.len(), 1, "{report}");
    assert_eq!(report.problems[0].position, position);
    assert!(matches!(
        &report.problems[0].kind,
        ProblemKind::LostRecords { first_offset: 3, end_offset, .. } if *end_offset == second_base
    ));

    let (buffer, recovery) = Buffer::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.next_offset, 200);
    assert_eq!(recovery.corrupt.len(), 1);
    assert_eq!(buffer.read(0, 100).await.unwrap().len(), 3);
    assert!(matches!(
        buffer.read(3, 1).await,
        Err(Error::Corrupt { offset: 3, .. })
    ));
    assert!(matches!(
        buffer.read(second_base - 1, 1).await,
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(
        read_all_checked(&buffer, second_base).await,
        200 - second_base
    );
}

#[tokio::test]
async fn append_waits_for_space_until_an_ack_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_bytes: 1000,
        ..small_segments()
    };
    let (buffer, _) = Buffer::open(dir.path(), config).unwrap();
    let entry = vec![1u8; 92]; // 100 bytes with framing
    buffer.append(&vec![entry.clone(); 10]).await.unwrap();
    assert_eq!(buffer.stats().unacked_bytes, 1000);

    let one = [entry.clone()];
    let mut blocked = pin!(buffer.append(&one));
    for _ in 0..5 {
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        tokio::task::yield_now().await;
    }
    assert_eq!(buffer.next_offset(), 10);
    buffer.ack(1).await.unwrap();
    assert_eq!(blocked.await.unwrap(), 10..11);
    assert_eq!(buffer.stats().unacked_bytes, 1000);

    // A batch larger than the whole cap waits for an empty buffer, then goes in.
    let big = [vec![2u8; 5000]];
    let mut huge = pin!(buffer.append(&big));
    assert!(futures::poll!(huge.as_mut()).is_pending());
    buffer.ack(10).await.unwrap();
    assert!(futures::poll!(huge.as_mut()).is_pending());
    buffer.ack(11).await.unwrap();
    assert_eq!(huge.await.unwrap(), 11..12);
    assert_eq!(buffer.read(11, 1).await.unwrap()[0].1.len(), 5000);
}

#[tokio::test]
async fn close_wakes_waiting_readers_and_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        max_bytes: 100,
        ..small_segments()
    };
    let (buffer, _) = Buffer::open(dir.path(), config).unwrap();
    buffer.append(&[vec![0u8; 92]]).await.unwrap();

    let reader = tokio::spawn({
        let buffer = buffer.clone();
        async move { buffer.read(1, 10).await }
    });
    let appender = tokio::spawn({
        let buffer = buffer.clone();
        async move { buffer.append(&[vec![0u8; 10]]).await }
    });
    tokio::task::yield_now().await;
    buffer.close();
    assert!(reader.await.unwrap().unwrap().is_empty());
    assert!(matches!(appender.await.unwrap(), Err(Error::Closed)));
    // Existing entries can still be drained and acknowledged.
    assert_eq!(buffer.read(0, 10).await.unwrap().len(), 1);
    buffer.ack(1).await.unwrap();
}

#[tokio::test]
async fn reader_waits_for_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
    let mut read = pin!(buffer.read(0, 10));
    assert!(futures::poll!(read.as_mut()).is_pending());
    append_range(&buffer, 3).await;
    let got = read.await.unwrap();
    assert_eq!(got.len(), 3);
}

#[tokio::test]
async fn interval_policy_syncs_on_demand_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        fsync: FsyncPolicy::Interval(std::time::Duration::from_millis(20)),
        ..small_segments()
    };
    {
        let (buffer, _) = Buffer::open(dir.path(), config.clone()).unwrap();
        append_range(&buffer, 150).await;
        buffer.sync().await.unwrap();
    }
    let (buffer, recovery) = Buffer::open(dir.path(), config).unwrap();
    assert_eq!(recovery.next_offset, 150);
    assert_eq!(read_all_checked(&buffer, 0).await, 150);
}

#[tokio::test]
async fn entries_of_every_size_including_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(dir.path(), small_segments()).unwrap();
    let entries: Vec<Vec<u8>> = vec![vec![], vec![1], vec![2; 10_000], vec![]];
    assert_eq!(buffer.append(&entries).await.unwrap(), 0..4);
    assert_eq!(buffer.append::<Vec<u8>>(&[]).await.unwrap(), 4..4);
    let got: Vec<Vec<u8>> = buffer
        .read(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert_eq!(got, entries);
}

#[test]
fn inspect_and_fsck_describe_an_unknown_directory_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert!(inspect(&missing).is_err());
    assert!(fsck(&missing).is_err());
}

#[test]
fn unknown_segment_format_is_refused_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{:020}.seg", 0));
    fs::write(&path, b"SOMETHING ELSE ENTIRELY, NOT OURS").unwrap();
    let err = Buffer::open(dir.path(), BufferConfig::default()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert_eq!(
        fs::read(&path).unwrap(),
        b"SOMETHING ELSE ENTIRELY, NOT OURS"
    );
}
