//! The buffer on a disk that fills up: each test mounts its own small tmpfs
//! (so it must run as root; it fails saying so otherwise) and fills it with
//! real appends, so every "no space left on device" here comes from the
//! kernel. The tests mount with the system call rather than mount(8):
//! between its fork and its exec, a child process holds every file of this
//! process open, which would keep the space of a deleted segment in use,
//! and the buffer directory's lock held, for a moment.
//!
//! What must hold: an append that runs out of space leaves no torn bytes
//! (the segment ends at its last whole record, whether the batch stayed in
//! one segment or had rolled into new ones) and appends nothing; the buffer
//! stays usable; acknowledging works on a full disk; the acknowledged space
//! goes back to the disk, the active segment included; the wait for space
//! ends when delivery or an operator frees it; and reopening finds every
//! entry that was appended and nothing else.

// clippy.toml's allow-unwrap-in-tests covers #[test] bodies only; the
// helpers of this test crate fail loudly the same way.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caudal_buffer::{
    Buffer, BufferConfig, Error, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, fsck, inspect, space,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use proptest::prelude::*;

/// How long a test waits for something that should happen within a second
/// or two; generous because the machine may be busy.
const PATIENCE: Duration = Duration::from_secs(60);

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted
/// (lazily, so open files cannot block it) when dropped, also when the
/// test fails.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = format!("size={size}");
        if let Err(e) = mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some(options.as_str()),
        ) {
            panic!(
                "mounting a {size} tmpfs on {} failed: {e}; this test needs root (it fills a \
                 small filesystem to test a full disk)",
                dir.path().display()
            );
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The buffer directory inside the mount.
    fn buffer_dir(&self) -> PathBuf {
        self.path().join("buffer")
    }

    /// Bytes in use on the filesystem.
    fn used(&self) -> u64 {
        let s = space(self.path()).unwrap();
        s.total_bytes - s.free_bytes
    }

    /// Fills what is left of the filesystem with a file outside the buffer
    /// directory: as if another program had filled the disk.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = fs::File::create(&path).unwrap();
        let chunk = vec![0xAAu8; 4096];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Sub-page remainders: write byte by byte until truly full.
        while file.write_all(&[0]).is_ok() {}
        assert_eq!(space(self.path()).unwrap().free_bytes, 0);
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = umount2(self.dir.path(), MntFlags::MNT_DETACH) {
            eprintln!(
                "could not unmount the tmpfs at {}: {e}",
                self.dir.path().display()
            );
        }
    }
}

/// The entry stored at `offset`, of `len` bytes: content depends on the
/// offset, so any mix-up shows.
fn entry(offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (offset as usize * 131 + i * 7) as u8)
        .collect()
}

fn batch(from: u64, n: u64, len: usize) -> Vec<Vec<u8>> {
    (from..from + n).map(|o| entry(o, len)).collect()
}

fn frames(entries: &[Vec<u8>]) -> u64 {
    entries
        .iter()
        .map(|e| RECORD_HEADER_BYTES + e.len() as u64)
        .sum()
}

fn segment_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| {
            let len = fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect();
    files.sort();
    files
}

/// Appends batches of `n` entries of `len` bytes until the disk is full;
/// returns every entry appended (in offset order, from the buffer's next
/// offset on) and the batch that did not fit.
async fn fill_with_appends(buffer: &Buffer, n: u64, len: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let start = buffer.next_offset();
    let mut appended = Vec::new();
    loop {
        let next = batch(buffer.next_offset(), n, len);
        match buffer.append(&next).await {
            Ok(range) => {
                assert_eq!(range.start, start + appended.len() as u64);
                appended.extend(next);
            }
            Err(e) if e.is_no_space() => return (appended, next),
            Err(e) => panic!("append failed otherwise than for space: {e}"),
        }
    }
}

/// Reads every entry from `from` to the end and compares with `model`.
async fn assert_reads(buffer: &Buffer, model: &[Vec<u8>], from: u64) {
    let mut next = from;
    while next < model.len() as u64 {
        let got = buffer.read(next, 64).await.unwrap();
        assert!(!got.is_empty());
        for (offset, bytes) in got {
            assert_eq!(offset, next);
            assert_eq!(bytes, model[offset as usize], "entry {offset}");
            next += 1;
        }
    }
    assert_eq!(buffer.next_offset(), model.len() as u64);
}

async fn patiently<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {PATIENCE:?}"))
}

#[tokio::test]
async fn running_out_of_space_mid_append_leaves_no_torn_bytes_and_the_buffer_goes_on() {
    let disk = Tmpfs::mount("256k");
    let dir = disk.buffer_dir();
    let (buffer, _) = Buffer::open(&dir, BufferConfig::default()).unwrap();
    let (mut model, rejected) = fill_with_appends(&buffer, 10, 1000).await;
    assert!(model.len() > 50, "{} entries fit", model.len());

    // The segment ends exactly at the last whole record: nothing of the
    // failed batch is left.
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].1, SEGMENT_HEADER_BYTES + frames(&model));
    let inspection = inspect(&dir).unwrap();
    assert_eq!(inspection.torn_bytes, 0);
    assert_eq!(inspection.next_offset, model.len() as u64);
    assert!(
        inspection.disk_full_since_unix_ms.is_some(),
        "{inspection:?}"
    );
    assert!(inspection.to_string().contains("disk full"), "{inspection}");
    let full = buffer
        .stats()
        .disk_full
        .expect("the buffer says why it waits");
    assert_eq!(full.needed_bytes, frames(&rejected));
    assert!(full.free_bytes.is_some_and(|free| free < full.needed_bytes));
    assert!(fsck(&dir).unwrap().is_clean());

    // Not poisoned: a batch that fits still goes in.
    let small = batch(model.len() as u64, 1, 10);
    assert_eq!(
        buffer.append(&small).await.unwrap(),
        model.len() as u64..model.len() as u64 + 1
    );
    model.extend(small);
    assert!(buffer.stats().disk_full.is_none());
    assert!(inspect(&dir).unwrap().disk_full_since_unix_ms.is_none());

    // Full again: a later failed append is undone too.
    let (more, rejected) = fill_with_appends(&buffer, 10, 1000).await;
    model.extend(more);
    assert_eq!(
        segment_files(&dir)[0].1,
        SEGMENT_HEADER_BYTES + frames(&model)
    );

    // Delivery drains half: the active segment still holds entries, so no
    // space comes back yet.
    let half = model.len() as u64 / 2;
    buffer.ack(half).await.unwrap();
    assert_eq!(segment_files(&dir).len(), 1);
    assert!(matches!(
        buffer.append(&rejected).await,
        Err(Error::NoSpace { .. })
    ));

    // Delivery drains the rest: the active segment is reclaimed at once
    // (the disk was found full), and the wait for room ends.
    let used_full = disk.used();
    buffer.ack(model.len() as u64).await.unwrap();
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].1, SEGMENT_HEADER_BYTES, "an empty segment");
    assert!(
        disk.used() < used_full / 4,
        "space reclaimed: {} bytes used, {used_full} when full",
        disk.used()
    );
    patiently(
        "the end of the wait for room",
        buffer.wait_for_room(&rejected),
    )
    .await
    .unwrap();
    let next = model.len() as u64;
    let again = batch(next, 10, 1000);
    assert_eq!(buffer.append(&again).await.unwrap(), next..next + 10);
    model.extend(again);
    assert!(buffer.stats().disk_full.is_none());

    // Reopening finds exactly what was appended, from the acknowledged offset.
    drop(buffer);
    let (buffer, recovery) = Buffer::open(&dir, BufferConfig::default()).unwrap();
    assert_eq!(recovery.torn_bytes, 0);
    assert!(recovery.corrupt.is_empty(), "{recovery:?}");
    assert_eq!(recovery.acked, next);
    assert_eq!(recovery.next_offset, model.len() as u64);
    assert_reads(&buffer, &model, recovery.acked).await;
    drop(buffer);
    assert!(fsck(&dir).unwrap().is_clean());
}

#[tokio::test]
async fn a_batch_that_rolled_into_new_segments_is_undone_whole() {
    let disk = Tmpfs::mount("128k");
    let dir = disk.buffer_dir();
    let config = BufferConfig {
        segment_bytes: 16 * 1024,
        ..BufferConfig::default()
    };
    let (buffer, _) = Buffer::open(&dir, config.clone()).unwrap();
    let mut model = batch(0, 20, 500);
    buffer.append(&model).await.unwrap();
    let before = segment_files(&dir);

    // Far more than the disk holds, across many segments.
    let huge = batch(20, 400, 500);
    let err = buffer.append(&huge).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert_eq!(
        segment_files(&dir),
        before,
        "the segments the batch started are gone"
    );
    assert_eq!(buffer.next_offset(), 20);
    assert!(fsck(&dir).unwrap().is_clean());

    // Batches that fit go on, rolling segments as usual.
    for _ in 0..3 {
        let next = batch(buffer.next_offset(), 20, 500);
        buffer.append(&next).await.unwrap();
        model.extend(next);
    }
    assert!(segment_files(&dir).len() > before.len());
    drop(buffer);
    let (buffer, recovery) = Buffer::open(&dir, config).unwrap();
    assert_eq!(recovery.torn_bytes, 0);
    assert!(recovery.corrupt.is_empty(), "{recovery:?}");
    assert_eq!(recovery.next_offset, model.len() as u64);
    assert_reads(&buffer, &model, 0).await;
}

#[tokio::test]
async fn acknowledging_works_on_a_disk_with_no_byte_free() {
    let disk = Tmpfs::mount("256k");
    let dir = disk.buffer_dir();
    let (buffer, _) = Buffer::open(&dir, BufferConfig::default()).unwrap();
    let (model, rejected) = fill_with_appends(&buffer, 5, 2000).await;
    let filler = disk.fill();

    // Acknowledgements overwrite the acknowledged offset in place.
    buffer.ack(3).await.unwrap();
    buffer.ack(model.len() as u64 - 1).await.unwrap();
    assert_eq!(inspect(&dir).unwrap().acked, Some(model.len() as u64 - 1));
    // The last one drains the buffer: its segment goes, and the space it
    // frees is enough to start the next one.
    buffer.ack(model.len() as u64).await.unwrap();
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].1, SEGMENT_HEADER_BYTES);
    assert_eq!(inspect(&dir).unwrap().acked, Some(model.len() as u64));

    fs::remove_file(filler).unwrap();
    let next = model.len() as u64;
    assert_eq!(
        buffer.append(&rejected).await.unwrap(),
        next..next + rejected.len() as u64
    );
    drop(buffer);
    let (_, recovery) = Buffer::open(&dir, BufferConfig::default()).unwrap();
    assert_eq!(recovery.acked, next);
    assert_eq!(recovery.next_offset, next + rejected.len() as u64);
}

#[tokio::test]
async fn the_wait_for_room_ends_when_space_returns_from_outside() {
    let disk = Tmpfs::mount("256k");
    let dir = disk.buffer_dir();
    let (buffer, _) = Buffer::open(&dir, BufferConfig::default()).unwrap();
    buffer.append(&batch(0, 10, 1000)).await.unwrap();
    let filler = disk.fill();
    let next = batch(10, 10, 1000);
    assert!(buffer.append(&next).await.unwrap_err().is_no_space());
    assert!(buffer.stats().disk_full.is_some());

    // Nothing is acknowledged: only the filesystem's free space can end
    // the wait.
    let waiting = tokio::spawn({
        let buffer = buffer.clone();
        let next = next.clone();
        async move { buffer.wait_for_room(&next).await }
    });
    fs::remove_file(filler).unwrap();
    patiently("the end of the wait for room", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buffer.append(&next).await.unwrap(), 10..20);
    assert!(buffer.stats().disk_full.is_none());
    assert!(inspect(&dir).unwrap().disk_full_since_unix_ms.is_none());
}

#[tokio::test]
async fn a_drained_active_segment_is_reclaimed_at_once_when_large_and_else_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(dir.path(), BufferConfig::default()).unwrap();

    // 1 MiB or more, drained: reclaimed by the acknowledgement itself.
    let big = batch(0, 40, 32 * 1024);
    buffer.append(&big).await.unwrap();
    buffer.ack(20).await.unwrap();
    assert!(segment_files(dir.path())[0].1 > 1 << 20, "not drained yet");
    buffer.ack(40).await.unwrap();
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].1, SEGMENT_HEADER_BYTES);
    assert!(files[0].0.ends_with(format!("{:020}.seg", 40)), "{files:?}");
    let stats = buffer.stats();
    assert_eq!(
        (stats.first_offset, stats.next_offset, stats.acked),
        (40, 40, 40)
    );
    assert_eq!(stats.disk_bytes, SEGMENT_HEADER_BYTES);

    // Small and drained: reclaimed once the buffer stays drained a moment.
    buffer.append(&batch(40, 3, 100)).await.unwrap();
    buffer.ack(43).await.unwrap();
    patiently("the reclaim of an idle drained segment", async {
        while buffer.stats().disk_bytes > SEGMENT_HEADER_BYTES {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(buffer.stats().first_offset, 43);
    assert_eq!(buffer.append(&batch(43, 2, 10)).await.unwrap(), 43..45);
    assert_eq!(buffer.read(43, 10).await.unwrap().len(), 2);

    // A drained buffer reopened starts from an empty segment too; offsets
    // keep growing.
    buffer.ack(45).await.unwrap();
    drop(buffer);
    let (buffer, recovery) = Buffer::open(dir.path(), BufferConfig::default()).unwrap();
    assert_eq!(
        (recovery.first_offset, recovery.next_offset, recovery.acked),
        (45, 45, 45)
    );
    assert_eq!(buffer.stats().disk_bytes, SEGMENT_HEADER_BYTES);
    assert_eq!(buffer.append(&batch(45, 1, 10)).await.unwrap(), 45..46);
    drop(buffer);
    assert!(fsck(dir.path()).unwrap().is_clean());
}

#[derive(Clone, Debug)]
enum Op {
    /// Append `n` entries of `len` bytes.
    Append(u64, usize),
    /// Acknowledge this fraction (in 1/255) of the unacknowledged entries.
    Ack(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u64..30, 1usize..3000).prop_map(|(n, len)| Op::Append(n, len)),
        3 => any::<u8>().prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

/// Random appends (many of which run out of space), acknowledgements and
/// reopens on a 96 KiB disk, against a model of every entry appended.
fn run_on_a_small_disk(ops: Vec<Op>, segment_bytes: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let disk = Tmpfs::mount("96k");
        let dir = disk.buffer_dir();
        let config = BufferConfig {
            segment_bytes,
            ..BufferConfig::default()
        };
        let (mut buffer, _) = Buffer::open(&dir, config.clone()).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut acked = 0u64;
        let mut full = 0;
        for op in ops {
            match op {
                Op::Append(n, len) => {
                    let next = batch(model.len() as u64, n, len);
                    match buffer.append(&next).await {
                        Ok(range) => {
                            assert_eq!(range.start, model.len() as u64);
                            model.extend(next);
                        }
                        Err(e) if e.is_no_space() => full += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Ack(fraction) => {
                    let unacked = model.len() as u64 - acked;
                    acked += unacked * u64::from(fraction) / 255;
                    buffer.ack(acked).await.unwrap();
                }
                Op::Reopen => {
                    drop(buffer);
                    let (reopened, recovery) = Buffer::open(&dir, config.clone()).unwrap();
                    assert_eq!(recovery.torn_bytes, 0, "{recovery:?}");
                    assert!(recovery.corrupt.is_empty(), "{recovery:?}");
                    assert_eq!(recovery.next_offset, model.len() as u64);
                    assert_eq!(recovery.acked, acked);
                    buffer = reopened;
                }
            }
            // Never a torn byte on disk, whatever failed.
            assert_eq!(inspect(&dir).unwrap().torn_bytes, 0);
            let stats = buffer.stats();
            assert_eq!(
                (stats.acked, stats.next_offset),
                (acked, model.len() as u64)
            );
            assert_eq!(stats.unacked_bytes, frames(&model[acked as usize..]));
        }
        assert_reads(&buffer, &model, acked).await;
        drop(buffer);
        let report = fsck(&dir).unwrap();
        assert!(report.is_clean(), "{report}");
        // Draining everything gives the space back (at the latest when the
        // buffer is next opened).
        let (buffer, _) = Buffer::open(&dir, config.clone()).unwrap();
        buffer.ack(model.len() as u64).await.unwrap();
        drop(buffer);
        drop(Buffer::open(&dir, config).unwrap());
        let on_disk: u64 = segment_files(&dir).iter().map(|(_, len)| len).sum();
        assert_eq!(
            on_disk, SEGMENT_HEADER_BYTES,
            "{full} appends found the disk full"
        );
    });
}

proptest! {
    // Each case mounts a tmpfs; 48 cases keep the test to a few seconds.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_small_disk_never_holds_torn_bytes_and_loses_no_entry(
        ops in prop::collection::vec(op(), 1..40),
        small_segments in any::<bool>(),
    ) {
        run_on_a_small_disk(ops, if small_segments { 8 * 1024 } else { 64 << 20 });
    }
}
