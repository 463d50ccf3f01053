//! The running buffer: appends, reads, acknowledgements, backpressure and
//! recovery at open.
//!
//! Concurrency: one writer at a time (an async mutex around the active
//! segment, held by a blocking task while it writes and syncs); readers and
//! acknowledgements work from a snapshot of the shared state taken under a
//! short std mutex and do their file I/O on tokio's blocking pool. Waiters
//! (readers waiting for data, appenders waiting for space) subscribe to a
//! `watch` counter bumped on every append, acknowledgement, reclaim and
//! close, so a wake-up is never lost between their check and their wait.
//!
//! A full disk is backpressure: an append that runs out of space is undone
//! (the log ends at its last whole record again) and fails with
//! [`Error::NoSpace`]; [`Buffer::wait_for_room`] then waits until retrying
//! is worth it. Acknowledged space goes back to the disk as delivery
//! drains, the active segment included (see [`Buffer::ack`]).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::acked::{self, Acked, AckedFile};
use crate::check::{Problem, ProblemKind, examine};
use crate::config::{BufferConfig, FsyncPolicy};
use crate::error::{Error, Result, join_error};
use crate::segment::{
    INDEX_INTERVAL, MAX_ENTRY_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, SegmentReader,
    encode_header, encode_record, list_segments, segment_file_name,
};
use crate::space::{self, DiskFull};

/// Name of the lock file that keeps a second process out of the directory.
const LOCK_FILE: &str = "LOCK";
/// A drained active segment holding at least this much is reclaimed at
/// once by the acknowledgement that drains it; a smaller one once the
/// buffer has stayed drained for [`IDLE_RECLAIM_AFTER`]. Reclaiming costs
/// a file creation and two fsyncs, so doing it for every tiny drain of a
/// busy pipeline would slow it down.
pub(crate) const RECLAIM_ACTIVE_BYTES: u64 = 1 << 20;
/// How long the buffer stays drained before its active segment is
/// reclaimed whatever its size.
const IDLE_RECLAIM_AFTER: Duration = Duration::from_secs(1);
/// How often a wait for disk space asks the filesystem for its free space.
const DISK_PROBE_EVERY: Duration = Duration::from_secs(1);
/// After this long without space freed, an append is retried even when the
/// filesystem reports too little free space (its figure ignores quotas and
/// the space reserved for root).
const DISK_RETRY_ANYWAY: Duration = Duration::from_secs(30);

/// A durable, append-only log of opaque entries, numbered by consecutive
/// offsets, kept in one directory (one per pipeline).
///
/// The contract:
///
/// - **Durability.** When [`append`](Self::append) returns, its entries are
///   on disk (under [`FsyncPolicy::Batch`]; see [`FsyncPolicy::Interval`] for
///   the trade-off). A crash at any point (`kill -9`, power loss) loses no
///   entry whose append returned; an append cut short leaves a torn tail that
///   the next [`open`](Self::open) reports and truncates.
/// - **Order.** Offsets are assigned in append order, without gaps, and keep
///   growing across reopen and segment deletion.
/// - **Integrity.** Every entry is checked against its CRC when read; a
///   damaged entry is an [`Error::Corrupt`] naming the segment file, byte
///   position and offset, never returned as data.
/// - **At-least-once.** Entries stay until [`ack`](Self::ack)ed; after a
///   restart, reading from [`acked`](Self::acked) returns every entry not
///   acknowledged, possibly some already delivered before the crash.
/// - **Backpressure.** Unacknowledged bytes stay under
///   [`BufferConfig::max_bytes`]: an append that would pass it waits until
///   acknowledgements free space (a batch larger than the cap goes in once
///   the buffer is empty).
/// - **Full disks.** An append that runs out of disk space is undone (no
///   partial record stays for later appends to build on) and fails with
///   [`Error::NoSpace`]; the buffer stays usable, and
///   [`wait_for_room`](Self::wait_for_room) waits until space returns.
///   Acknowledged space returns as delivery drains, the active segment
///   included, and acknowledging needs no new space.
///
/// Cheap to clone: clones share one buffer. One process may open a directory
/// at a time (a lock file enforces it).
#[derive(Clone, Debug)]
pub struct Buffer {
    inner: Arc<Inner>,
}

/// What [`Buffer::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// Segment files kept.
    pub segments: usize,
    /// First offset still on disk.
    pub first_offset: u64,
    /// Offset the next appended entry gets.
    pub next_offset: u64,
    /// Acknowledged offset: reading resumes here.
    pub acked: u64,
    /// Entries appended but not acknowledged.
    pub unacked_records: u64,
    /// Bytes of those entries, framing included.
    pub unacked_bytes: u64,
    /// Bytes cut off as torn (incomplete records, incomplete segment files):
    /// appends cut short by a crash, never reported durable.
    pub torn_bytes: u64,
    /// Where torn bytes were cut off.
    pub torn: Vec<Problem>,
    /// Damage kept in place: reading these offsets fails with
    /// [`Error::Corrupt`] (run `caudal buffer fsck`). Also lists an
    /// unreadable `acked` file or an acknowledged offset past the data.
    pub corrupt: Vec<Problem>,
}

/// A snapshot of the buffer's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Entries appended but not acknowledged.
    pub unacked_records: u64,
    /// Bytes of those entries, framing included (what `max_bytes` caps).
    pub unacked_bytes: u64,
    /// Segment files on disk.
    pub segments: usize,
    /// Bytes of all segment files (acknowledged entries stay until their
    /// whole segment is acknowledged).
    pub disk_bytes: u64,
    /// First offset still on disk.
    pub first_offset: u64,
    /// Acknowledged offset.
    pub acked: u64,
    /// Offset the next appended entry gets.
    pub next_offset: u64,
    /// Set while appends wait because the last one found the disk full
    /// (cleared by the next append that goes through): why intake waits.
    pub disk_full: Option<DiskFull>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: BufferConfig,
    state: Mutex<State>,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// Serialises acknowledgements so the `acked` file never goes backwards.
    ack_lock: tokio::sync::Mutex<()>,
    /// The `acked` file, updated in place. `None` only when it could not be
    /// written at open for lack of space; the next acknowledgement writes it.
    acked_file: Mutex<Option<AckedFile>>,
    /// Bumped on every append, acknowledgement, reclaim and close.
    progress: watch::Sender<u64>,
    /// Holds the directory lock for the buffer's lifetime.
    _lock: File,
}

/// What readers and acknowledgements see: only published (written, and
/// under the batch policy synced) records.
#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    next_offset: u64,
    acked: u64,
    /// Logical byte position (data bytes since the first retained segment)
    /// of the first unacknowledged record, and of the end of the log: their
    /// difference is the unacknowledged bytes.
    acked_logical: u64,
    end_logical: u64,
    closed: bool,
    /// Where the last read stopped, so sequential reads need no scan.
    read_hint: Option<Position>,
    /// Bytes of segment files deleted so far: a waiting append retries when
    /// this moves.
    freed: u64,
    /// Set by an append that found the disk full, cleared by one that goes
    /// through.
    disk_full: Option<DiskFullState>,
    /// Set when the disk was found full, cleared by the next reclaim: the
    /// active segment is then reclaimed as soon as it drains, whatever its
    /// size.
    short_of_space: bool,
    /// An idle reclaim is scheduled.
    idle_reclaim_pending: bool,
    /// Live [`Snapshot`]s: while any is, no segment file is deleted (nor
    /// the active one reclaimed), so a copy in progress finds every file
    /// it listed.
    pins: usize,
}

/// What the last failed append found, and when.
#[derive(Clone, Copy, Debug)]
struct DiskFullState {
    report: DiskFull,
    /// [`State::freed`] after that append.
    freed_at: u64,
    attempted_at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    base: u64,
    offset: u64,
    pos: u64,
}

#[derive(Clone, Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    /// Framed records: offsets `base..base + records`.
    records: u64,
    /// Byte after the last framed record.
    end: u64,
    /// Logical position of this segment's first record.
    logical_start: u64,
    /// Sparse `(offset, position)` index.
    index: Vec<(u64, u64)>,
    /// For a sealed segment with broken framing: why offsets from
    /// `base + records` to the next segment cannot be read.
    lost: Option<String>,
}

impl Segment {
    fn data_bytes(&self) -> u64 {
        self.end.saturating_sub(SEGMENT_HEADER_BYTES)
    }

    /// The closest known frame position at or before `offset`.
    fn start_for(&self, offset: u64, hint: Option<Position>) -> (u64, u64) {
        let mut best = (self.base, SEGMENT_HEADER_BYTES);
        let i = self.index.partition_point(|(o, _)| *o <= offset);
        if i > 0 {
            best = self.index[i - 1];
        }
        if let Some(h) = hint
            && h.base == self.base
            && h.offset <= offset
            && h.offset >= best.0
        {
            best = (h.offset, h.pos);
        }
        best
    }
}

impl State {
    fn unacked_bytes(&self) -> u64 {
        self.end_logical.saturating_sub(self.acked_logical)
    }

    fn has_space(&self, bytes: u64, max_bytes: u64) -> bool {
        let unacked = self.unacked_bytes();
        unacked == 0 || unacked.saturating_add(bytes) <= max_bytes
    }

    fn first_offset(&self) -> u64 {
        self.segments.front().map_or(self.next_offset, |s| s.base)
    }

    /// Index of the segment holding `offset` (`offset` >= the first base).
    fn segment_of(&self, offset: u64) -> usize {
        self.segments
            .partition_point(|s| s.base <= offset)
            .saturating_sub(1)
    }

    /// End (exclusive) of the offsets segment `i` is responsible for.
    fn segment_end_offset(&self, i: usize) -> u64 {
        self.segments
            .get(i + 1)
            .map_or(self.next_offset, |next| next.base)
    }

    /// Removes segments whose offsets are all acknowledged (never the last).
    fn take_deletable(&mut self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if self.pins > 0 {
            return paths;
        }
        while self.segments.len() > 1 && self.segments[1].base <= self.acked {
            if let Some(segment) = self.segments.pop_front() {
                self.freed += segment.end;
                paths.push(segment.path);
            }
        }
        if let Some(hint) = self.read_hint
            && self.segments.front().is_some_and(|s| hint.base < s.base)
        {
            self.read_hint = None;
        }
        paths
    }
}

/// The active segment, owned by whoever holds the writer lock.
#[derive(Debug)]
struct Writer {
    /// `None` after a reclaim deleted the active segment and could not start
    /// the next one (the disk filled up again in between); the next append
    /// starts it at `next_offset`. Never a file that was deleted: bytes
    /// written there would vanish.
    file: Option<File>,
    path: PathBuf,
    base: u64,
    /// Byte after the last written record.
    pos: u64,
    records: u64,
    next_offset: u64,
    last_indexed: u64,
    /// Written but not yet synced (interval policy).
    unsynced: bool,
    /// Set after a failure that leaves the file in an unknown state.
    poisoned: Option<String>,
}

/// A segment the current batch wrote to, with its state after the batch.
#[derive(Debug)]
struct Touched {
    base: u64,
    path: PathBuf,
    records: u64,
    end: u64,
    new_index: Vec<(u64, u64)>,
}

/// Where the writer stood before a batch, so a failed batch can be undone.
#[derive(Debug)]
struct Mark {
    base: u64,
    path: PathBuf,
    pos: u64,
    records: u64,
    next_offset: u64,
    last_indexed: u64,
}

/// True for a failed fsync of a segment for another reason than a full
/// disk: after it the page cache's state is unknown, so nothing is undone.
fn is_failed_fsync(err: &Error) -> bool {
    matches!(err, Error::Io { op, .. } if op.starts_with("fsync"))
}

impl Writer {
    fn touched(&self) -> Touched {
        Touched {
            base: self.base,
            path: self.path.clone(),
            records: self.records,
            end: self.pos,
            new_index: Vec::new(),
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            base: self.base,
            path: self.path.clone(),
            pos: self.pos,
            records: self.records,
            next_offset: self.next_offset,
            last_indexed: self.last_indexed,
        }
    }

    fn poison(&mut self, err: Error) -> Error {
        self.poisoned = Some(err.to_string());
        err
    }

    fn file(&mut self, op: &'static str) -> Result<&mut File> {
        match &mut self.file {
            Some(file) => Ok(file),
            None => Err(Error::io(
                op,
                &self.path,
                io::Error::other("the active segment was not started"),
            )),
        }
    }

    /// Writes one encoded batch (records back to back, `sizes` their payload
    /// lengths), rolling segments as needed, syncs per policy and publishes.
    /// A batch that fails (a full disk, most often) is undone, see
    /// [`Writer::undo`].
    fn write_batch(&mut self, inner: &Inner, encoded: &[u8], sizes: &[u32]) -> Result<Range<u64>> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        if self.file.is_none() {
            self.start_segment(&inner.dir)?;
        }
        let first = self.next_offset;
        let mark = self.mark();
        let mut created = Vec::new();
        let mut touched = vec![self.touched()];
        let mut run_start = 0usize;
        let mut at = 0usize;
        let mut result = (|| -> Result<()> {
            for &size in sizes {
                let frame = RECORD_HEADER_BYTES + u64::from(size);
                if self.records > 0 && self.pos + frame > inner.config.segment_bytes {
                    self.write_run(&encoded[run_start..at])?;
                    if let Some(t) = touched.last_mut() {
                        t.records = self.records;
                        t.end = self.pos;
                    }
                    self.roll(&inner.dir)?;
                    created.push(self.path.clone());
                    touched.push(self.touched());
                    run_start = at;
                }
                if self.pos - self.last_indexed >= INDEX_INTERVAL {
                    if let Some(t) = touched.last_mut() {
                        t.new_index.push((self.next_offset, self.pos));
                    }
                    self.last_indexed = self.pos;
                }
                self.pos += frame;
                self.records += 1;
                self.next_offset += 1;
                at += frame as usize;
            }
            self.write_run(&encoded[run_start..])
        })();
        if result.is_ok() && inner.config.fsync == FsyncPolicy::Batch {
            result = self.sync_file();
        }
        if let Err(err) = result {
            if is_failed_fsync(&err) {
                return Err(self.poison(err));
            }
            if let Err(undo) = self.undo(&inner.dir, mark, &created) {
                tracing::error!(dir = %inner.dir.display(), error = %err, undo_error = %undo, "buffer: could not undo a failed append; appends stop until the buffer is reopened");
                return Err(self.poison(err));
            }
            return Err(err);
        }
        if matches!(inner.config.fsync, FsyncPolicy::Interval(_)) {
            self.unsynced = true;
        }
        if let Some(t) = touched.last_mut() {
            t.records = self.records;
            t.end = self.pos;
        }
        inner.publish(touched, self.next_offset, encoded.len() as u64);
        Ok(first..self.next_offset)
    }

    /// Takes a failed batch back: deletes the segments it started, cuts the
    /// segment it began in back to where it began, and syncs. The log then
    /// ends at its last whole record again, so no torn bytes stay for a
    /// later append to build on, and the space the batch took is free.
    fn undo(&mut self, dir: &Path, mark: Mark, created: &[PathBuf]) -> Result<()> {
        for path in created.iter().rev() {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete segment of a failed append", path, e)),
            }
        }
        if !created.is_empty() {
            // Gone for good before the segment before them is cut: a sealed
            // segment that ends early while its successor exists would read
            // as lost records after a crash.
            acked::sync_dir(dir)?;
        }
        if self.base != mark.base {
            let file = OpenOptions::new()
                .write(true)
                .open(&mark.path)
                .map_err(|e| Error::io("open segment", &mark.path, e))?;
            self.file = Some(file);
            self.base = mark.base;
            self.path = mark.path;
        }
        let path = self.path.clone();
        let file = self.file("truncate segment")?;
        file.set_len(mark.pos)
            .and_then(|()| file.sync_data())
            .and_then(|()| file.seek(SeekFrom::Start(mark.pos)))
            .map_err(|e| Error::io("truncate segment after a failed append", path, e))?;
        self.pos = mark.pos;
        self.records = mark.records;
        self.next_offset = mark.next_offset;
        self.last_indexed = mark.last_indexed;
        self.unsynced = false;
        Ok(())
    }

    fn write_run(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.path.clone();
        self.file("write segment")?
            .write_all(bytes)
            .map_err(|e| Error::io("write segment", path, e))
    }

    fn sync_file(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.file("fsync segment")?
            .sync_data()
            .map_err(|e| Error::io("fsync segment", path, e))
    }

    /// Seals the active segment (synced before its successor exists, so a
    /// sealed segment is never torn) and starts a new one at `next_offset`.
    fn roll(&mut self, dir: &Path) -> Result<()> {
        self.sync_file()?;
        self.unsynced = false;
        self.start_segment(dir)
    }

    /// Starts the segment at `next_offset` and makes it the active one.
    fn start_segment(&mut self, dir: &Path) -> Result<()> {
        let (file, path) = create_segment(dir, self.next_offset)?;
        self.file = Some(file);
        self.path = path;
        self.base = self.next_offset;
        self.pos = SEGMENT_HEADER_BYTES;
        self.records = 0;
        self.last_indexed = 0;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        if self.unsynced
            && let Some(file) = &self.file
        {
            if let Err(e) = file.sync_data() {
                let err = Error::io("fsync segment", &self.path, e);
                return Err(self.poison(err));
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// Gives the active segment's space back once every entry in it is
    /// acknowledged: deletes it and starts an empty one at the next offset
    /// (sealed segments go as acknowledgements pass them; the active one
    /// would otherwise stay until it fills). Only when it is worth it:
    /// `force`, the disk was found full, or it holds at least
    /// [`RECLAIM_ACTIVE_BYTES`]. Returns whether it did.
    ///
    /// Deleted first, then started again, so that it works on a full disk.
    /// A crash in between leaves no segment; open then starts one at the
    /// acknowledged offset, which is durable and equal to `next_offset`, so
    /// offsets keep growing.
    fn reclaim(&mut self, inner: &Inner, force: bool) -> bool {
        if self.poisoned.is_some() || self.file.is_none() || self.records == 0 {
            return false;
        }
        // Checked and taken off the list under one lock, so a snapshot
        // either holds the segment back or never lists it.
        let listed = {
            let mut st = inner.state();
            let worth_it = force
                || st.short_of_space
                || self.pos - SEGMENT_HEADER_BYTES >= RECLAIM_ACTIVE_BYTES;
            // Holding the writer, nothing is appended meanwhile.
            if st.acked < self.next_offset || !worth_it || st.pins > 0 {
                return false;
            }
            if st.segments.back().is_some_and(|s| s.base == self.base) {
                st.segments.pop_back()
            } else {
                None
            }
        };
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(segment = %self.path.display(), error = %e, "buffer: could not delete the acknowledged active segment");
            if let Some(segment) = listed {
                inner.state().segments.push_back(segment);
            }
            return false;
        }
        self.file = None;
        self.unsynced = false;
        {
            let mut st = inner.state();
            st.read_hint = None;
            st.freed += self.pos;
            st.short_of_space = false;
        }
        tracing::debug!(segment = %self.path.display(), bytes = self.pos, "buffer: reclaimed the acknowledged active segment");
        match self.start_segment(&inner.dir) {
            Ok(()) => {
                let mut st = inner.state();
                let logical_start = st.end_logical;
                st.segments.push_back(Segment {
                    base: self.base,
                    path: self.path.clone(),
                    records: 0,
                    end: SEGMENT_HEADER_BYTES,
                    logical_start,
                    index: Vec::new(),
                    lost: None,
                });
            }
            Err(e) => {
                tracing::warn!(dir = %inner.dir.display(), error = %e, "buffer: could not start a segment after reclaiming one; the next append starts it");
                self.base = self.next_offset;
                self.path = inner.dir.join(segment_file_name(self.next_offset));
                self.pos = SEGMENT_HEADER_BYTES;
                self.records = 0;
                self.last_indexed = 0;
            }
        }
        true
    }
}

/// Creates the segment starting at `base`: header written and synced, then
/// the directory synced so the file survives a crash. A file of that name
/// can only be left over from an append that failed (its offsets were never
/// published), so it is replaced. A segment that cannot be completed is
/// removed again, so that it neither holds space nor blocks the next try.
fn create_segment(dir: &Path, base: u64) -> Result<(File, PathBuf)> {
    let path = dir.join(segment_file_name(base));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::io("create segment", &path, e))?;
    let written = file
        .write_all(&encode_header(base))
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write segment header", &path, e))
        .and_then(|()| acked::sync_dir(dir));
    if let Err(err) = written {
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(err);
    }
    Ok((file, path))
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half
        // updated (every update is a few assignments), so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes a written batch visible to readers and wakes them.
    fn publish(&self, touched: Vec<Touched>, next_offset: u64, bytes: u64) {
        let deletable = {
            let mut st = self.state();
            for t in touched {
                if let Some(seg) = st.segments.iter_mut().rev().find(|s| s.base == t.base) {
                    seg.records = t.records;
                    seg.end = t.end;
                    seg.index.extend(t.new_index);
                } else {
                    let logical_start = st
                        .segments
                        .back()
                        .map_or(st.end_logical, |s| s.logical_start + s.data_bytes());
                    st.segments.push_back(Segment {
                        base: t.base,
                        path: t.path,
                        records: t.records,
                        end: t.end,
                        logical_start,
                        index: t.new_index,
                        lost: None,
                    });
                }
            }
            st.next_offset = next_offset;
            st.end_logical += bytes;
            st.take_deletable()
        };
        delete_segments(deletable);
        self.wake();
    }

    /// Reclaims the active segment if it is drained (see
    /// [`Writer::reclaim`]) and wakes waiters if it did. Skipped while an
    /// append holds the writer: the segment is not drained then.
    fn reclaim_if_drained(&self, force: bool) -> bool {
        let reclaimed = match self.writer.try_lock() {
            Ok(mut writer) => writer.reclaim(self, force),
            Err(_) => false,
        };
        if reclaimed {
            self.wake();
        }
        reclaimed
    }

    /// Notes an append of `needed` bytes that found the disk full (for
    /// [`Stats::disk_full`], the marker file and the wait for space), and
    /// frees the active segment if only acknowledged entries fill it.
    /// `freed_before` is [`State::freed`] before the append was tried, so
    /// space freed while it was tried counts as new.
    fn ran_out_of_space(&self, needed: u64, freed_before: u64) {
        let free = space::space(&self.dir).ok().map(|s| s.free_bytes);
        let first_time = {
            let mut st = self.state();
            st.short_of_space = true;
            let since = st.disk_full.map(|d| d.report.since_unix_ms);
            st.disk_full = Some(DiskFullState {
                report: DiskFull {
                    needed_bytes: needed,
                    free_bytes: free,
                    since_unix_ms: since.unwrap_or_else(|| space::unix_ms(SystemTime::now())),
                },
                freed_at: freed_before,
                attempted_at: Instant::now(),
            });
            since.is_none()
        };
        if first_time {
            space::mark_disk_full(&self.dir);
        }
        self.reclaim_if_drained(false);
    }

    /// An append went through: appends no longer wait for disk space.
    fn space_returned(&self) {
        let was_full = self.state().disk_full.take().is_some();
        if was_full {
            space::clear_disk_full(&self.dir);
        }
    }
}

/// Reclaims the active segment once the buffer has stayed drained, with
/// nothing appended, for [`IDLE_RECLAIM_AFTER`], whatever its size. Holds
/// only a weak reference while it sleeps.
fn spawn_idle_reclaim(inner: &Arc<Inner>) {
    let mut seen = inner.state().next_offset;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE_RECLAIM_AFTER).await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let idle = {
                let mut st = inner.state();
                let drained = st.acked == st.next_offset;
                if drained && st.next_offset != seen {
                    // Appended and drained again meanwhile: not idle yet.
                    seen = st.next_offset;
                    false
                } else {
                    // Not drained any more: the acknowledgement that drains
                    // it again schedules the next try.
                    st.idle_reclaim_pending = false;
                    if !drained {
                        return;
                    }
                    true
                }
            };
            if idle {
                let _ = tokio::task::spawn_blocking(move || {
                    let Ok(mut writer) = inner.writer.clone().try_lock_owned() else {
                        return;
                    };
                    if writer.reclaim(&inner, true) {
                        inner.wake();
                    }
                    // Let go of the buffer before the writer: whoever gets
                    // the writer next may drop the buffer and open its
                    // directory again, which needs this reference gone.
                    drop(inner);
                    drop(writer);
                })
                .await;
                return;
            }
        }
    });
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort for the interval policy; the batch policy has nothing
        // pending.
        if let Ok(mut writer) = self.writer.try_lock()
            && let Err(err) = writer.sync()
            && !matches!(err, Error::Poisoned(_))
        {
            tracing::warn!(error = %err, "buffer: final fsync failed");
        }
    }
}

fn delete_segments(paths: Vec<PathBuf>) {
    for path in paths {
        // A segment that could not be deleted is fully acknowledged; the
        // next open deletes it.
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(segment = %path.display(), error = %e, "buffer: could not delete an acknowledged segment");
        }
    }
}

/// Where a read of one segment starts and stops.
#[derive(Debug)]
struct ReadPart {
    path: PathBuf,
    base: u64,
    start: (u64, u64),
    from: u64,
    until: u64,
    /// Offsets from here on are lost (broken framing).
    framed_until: u64,
    end_pos: u64,
    lost: Option<String>,
}

impl ReadPart {
    fn plan(st: &State, i: usize, from: u64, until: u64) -> Self {
        let seg = &st.segments[i];
        Self {
            path: seg.path.clone(),
            base: seg.base,
            start: seg.start_for(from, st.read_hint),
            from,
            until: until.min(st.segment_end_offset(i)),
            framed_until: seg.base + seg.records,
            end_pos: seg.end,
            lost: seg.lost.clone(),
        }
    }

    fn lost_error(&self, offset: u64) -> Error {
        Error::Corrupt {
            segment: self.path.clone(),
            position: self.end_pos,
            offset,
            reason: self
                .lost
                .clone()
                .unwrap_or_else(|| "record framing is lost".into()),
        }
    }

    fn open(&self) -> Result<SegmentReader> {
        SegmentReader::open(&self.path, self.start.1, self.start.0, self.end_pos)
            .map_err(|e| Error::io("read segment", &self.path, e))
    }
}

impl Buffer {
    /// Opens (creating if needed) the buffer in `dir` and recovers it: keeps
    /// every complete record, truncates a torn tail left by a crash (logged
    /// at warn level and counted in the returned [`Recovery`]), deletes
    /// segments that were fully acknowledged, and leaves damaged records in
    /// place (logged at error level; reading them fails). Fails when another
    /// process has the directory open ([`Error::Locked`]) or the last segment
    /// is not this format ([`Error::Format`]).
    ///
    /// Does blocking file I/O (it reads every unacknowledged segment once);
    /// call it from a blocking context in async code.
    pub fn open(dir: &Path, config: BufferConfig) -> Result<(Buffer, Recovery)> {
        config.validate()?;
        fs::create_dir_all(dir).map_err(|e| Error::io("create buffer directory", dir, e))?;
        let lock = lock_dir(dir)?;
        let tmp = dir.join(acked::ACKED_TMP_FILE);
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(|e| Error::io("remove leftover file", &tmp, e))?;
        }

        let mut recovery = Recovery::default();
        let stored_acked = match acked::load(dir)? {
            Acked::Offset(offset) => Some(offset),
            Acked::Missing => None,
            Acked::Damaged(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "buffer: acknowledged offset unreadable; entries from the first retained one will be delivered again");
                recovery.corrupt.push(Problem {
                    file: acked::ACKED_FILE.into(),
                    position: 0,
                    kind: ProblemKind::AckedFile { reason },
                });
                None
            }
        };

        // Fully acknowledged segments (a crash between persisting the
        // acknowledgement and deleting them) go without being read.
        let mut listed = list_segments(dir)?;
        if let Some(acked) = stored_acked {
            let done = listed
                .windows(2)
                .take_while(|pair| pair[1].0 <= acked)
                .count();
            delete_segments(listed.drain(..done).map(|(_, path)| path).collect());
        }

        let exam = examine(&listed)?;
        if let Some((path, reason)) = exam.unusable_last {
            return Err(Error::Format { path, reason });
        }
        for problem in exam.problems {
            if problem.kind.is_torn() {
                recovery.torn_bytes += match problem.kind {
                    ProblemKind::TornTail { bytes } | ProblemKind::TornSegment { bytes } => bytes,
                    _ => 0,
                };
                recovery.torn.push(problem);
            } else {
                recovery.corrupt.push(problem);
            }
        }
        for path in &exam.torn_segments {
            fs::remove_file(path).map_err(|e| Error::io("delete torn segment", path, e))?;
        }
        let mut segments: VecDeque<Segment> = VecDeque::with_capacity(exam.segments.len());
        let mut logical = 0;
        for view in exam.segments {
            let segment = Segment {
                base: view.base,
                path: view.path,
                records: view.records,
                end: view.end,
                logical_start: logical,
                index: view.index,
                lost: view.lost.map(|(_, reason)| reason),
            };
            logical += segment.data_bytes();
            segments.push_back(segment);
        }
        // Cut the torn tail so appends continue after the last good record.
        if let Some(last) = segments.back()
            && recovery
                .torn
                .iter()
                .any(|p| matches!(p.kind, ProblemKind::TornTail { .. }))
        {
            let file = OpenOptions::new()
                .write(true)
                .open(&last.path)
                .map_err(|e| Error::io("open segment", &last.path, e))?;
            file.set_len(last.end)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("truncate torn tail", &last.path, e))?;
        }
        if !exam.torn_segments.is_empty() {
            acked::sync_dir(dir)?;
        }

        let next_on_disk = segments.back().map(|s| s.base + s.records);
        let first_on_disk = segments.front().map(|s| s.base);
        let mut acked = match (stored_acked, first_on_disk) {
            (Some(acked), Some(first)) if acked < first => {
                tracing::warn!(dir = %dir.display(), acked, first, "buffer: segments before the first retained offset are missing although not acknowledged");
                first
            }
            (Some(acked), _) => acked,
            (None, Some(first)) => first,
            (None, None) => 0,
        };
        if let Some(next) = next_on_disk
            && acked > next
        {
            tracing::warn!(dir = %dir.display(), acked, next_offset = next, "buffer: acknowledged entries are missing from disk (fsync interval and power loss?); numbering continues at the acknowledged offset");
            recovery.corrupt.push(Problem {
                file: acked::ACKED_FILE.into(),
                position: 0,
                kind: ProblemKind::AckedAhead {
                    acked,
                    next_offset: next,
                },
            });
        }
        // Start a segment when there is none, or when numbering must jump
        // ahead to the acknowledged offset. On a full disk the first append
        // starts it instead, so that delivery can go on meanwhile.
        if next_on_disk.is_none_or(|next| acked > next) {
            match create_segment(dir, acked) {
                Ok((_, path)) => segments.push_back(Segment {
                    base: acked,
                    path,
                    records: 0,
                    end: SEGMENT_HEADER_BYTES,
                    logical_start: logical,
                    index: Vec::new(),
                    lost: None,
                }),
                Err(err) if err.is_no_space() => {
                    tracing::warn!(dir = %dir.display(), error = %err, "buffer: no space to start a segment; the first append starts it");
                }
                Err(err) => return Err(err),
            }
        }
        acked = acked.max(segments.front().map_or(acked, |s| s.base));
        let acked_file = match AckedFile::open(dir, acked) {
            Ok(file) => Some(file),
            Err(err) if err.is_no_space() => {
                tracing::warn!(dir = %dir.display(), error = %err, "buffer: no space to rewrite the acknowledged offset; the first acknowledgement writes it");
                None
            }
            Err(err) => return Err(err),
        };
        // Nobody waits for space in a buffer that was just opened.
        space::clear_disk_full(dir);

        let mut state = State {
            next_offset: segments
                .back()
                .map_or(acked, |s| s.base + s.records)
                .max(acked),
            segments,
            acked,
            acked_logical: 0,
            end_logical: logical,
            closed: false,
            read_hint: None,
            freed: 0,
            disk_full: None,
            short_of_space: false,
            idle_reclaim_pending: false,
            pins: 0,
        };
        state.acked_logical = logical_position(&state, acked);
        let deletable = state.take_deletable();
        delete_segments(deletable);

        let writer = match state.segments.back() {
            Some(last) if last.base + last.records == state.next_offset => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(|e| Error::io("open segment", &last.path, e))?;
                file.seek(SeekFrom::Start(last.end))
                    .map_err(|e| Error::io("open segment", &last.path, e))?;
                Writer {
                    file: Some(file),
                    path: last.path.clone(),
                    base: last.base,
                    pos: last.end,
                    records: last.records,
                    next_offset: state.next_offset,
                    last_indexed: last.index.last().map_or(0, |(_, pos)| *pos),
                    unsynced: false,
                    poisoned: None,
                }
            }
            // No segment ends at the next offset: the first append starts it.
            _ => Writer {
                file: None,
                path: dir.join(segment_file_name(state.next_offset)),
                base: state.next_offset,
                pos: SEGMENT_HEADER_BYTES,
                records: 0,
                next_offset: state.next_offset,
                last_indexed: 0,
                unsynced: false,
                poisoned: None,
            },
        };

        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            config,
            state: Mutex::new(state),
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            ack_lock: tokio::sync::Mutex::new(()),
            acked_file: Mutex::new(acked_file),
            progress: watch::Sender::new(0),
            _lock: lock,
        });
        // Everything acknowledged: nothing in the active segment is needed.
        inner.reclaim_if_drained(true);

        let state = inner.state();
        recovery.segments = state.segments.len();
        recovery.first_offset = state.first_offset();
        recovery.next_offset = state.next_offset;
        recovery.acked = state.acked;
        recovery.unacked_records = state.next_offset - state.acked;
        recovery.unacked_bytes = state.unacked_bytes();
        drop(state);
        if recovery.torn_bytes > 0 {
            tracing::warn!(
                dir = %dir.display(),
                torn_bytes = recovery.torn_bytes,
                places = %recovery.torn.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                "buffer: cut off a torn tail left by a crash (records never reported durable)"
            );
        }
        for problem in &recovery.corrupt {
            tracing::error!(dir = %dir.display(), %problem, "buffer: damaged data kept in place; reading it will fail (run `caudal buffer fsck`)");
        }
        tracing::info!(
            dir = %dir.display(),
            segments = recovery.segments,
            acked = recovery.acked,
            next_offset = recovery.next_offset,
            unacked_records = recovery.unacked_records,
            "buffer: opened"
        );

        if let FsyncPolicy::Interval(every) = inner.config.fsync {
            spawn_flusher(Arc::downgrade(&inner), every)?;
        }
        Ok((Buffer { inner }, recovery))
    }

    /// Appends `entries` in order and returns their offsets. When it returns,
    /// the entries are durable per the [`FsyncPolicy`] and visible to
    /// readers. Waits (without holding anything) while the unacknowledged
    /// bytes plus this batch would exceed `max_bytes`; a batch larger than
    /// the cap goes in once the buffer is empty. An empty batch returns an
    /// empty range at once.
    ///
    /// Cancel-safe in the at-least-once sense: if the future is dropped while
    /// writing, the batch may still be appended (and will be delivered),
    /// so the caller must not acknowledge its source for it.
    ///
    /// Fails with [`Error::Closed`] after [`close`](Self::close),
    /// [`Error::EntryTooLarge`], or an I/O error; after a failed fsync every
    /// later append fails with [`Error::Poisoned`] until the buffer is
    /// reopened. On a full disk it fails with [`Error::NoSpace`] and appends
    /// nothing: what it had written is taken back, so the log ends at its
    /// last whole record and the buffer stays usable. It does not wait for
    /// disk space itself (so that it never hangs where a caller cannot give
    /// up); [`wait_for_room`](Self::wait_for_room) does, then append again.
    pub async fn append<E: AsRef<[u8]>>(&self, entries: &[E]) -> Result<Range<u64>> {
        let mut sizes = Vec::with_capacity(entries.len());
        let mut bytes = 0u64;
        for entry in entries {
            let len = entry.as_ref().len();
            if len > MAX_ENTRY_BYTES {
                return Err(Error::EntryTooLarge {
                    len,
                    max: MAX_ENTRY_BYTES,
                });
            }
            sizes.push(len as u32);
            bytes += RECORD_HEADER_BYTES + len as u64;
        }
        let writer = loop {
            // Wait for space without holding the writer, so the interval
            // flusher keeps syncing meanwhile; only appends use up space, so
            // the check holds once the writer is ours.
            self.wait_for_space(bytes, false).await?;
            let writer = self.inner.writer.clone().lock_owned().await;
            if self
                .inner
                .state()
                .has_space(bytes, self.inner.config.max_bytes)
            {
                break writer;
            }
        };
        if entries.is_empty() {
            return Ok(writer.next_offset..writer.next_offset);
        }
        let first = writer.next_offset;
        // Offsets never wrap: numbering taken from a damaged `acked` file
        // or segment name may leave no room for these entries.
        if first.checked_add(entries.len() as u64).is_none() {
            return Err(Error::Format {
                path: writer.path.clone(),
                reason: format!(
                    "offsets end at {}: no room for {} more entries",
                    u64::MAX,
                    entries.len()
                ),
            });
        }
        let mut encoded = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0));
        for (i, entry) in entries.iter().enumerate() {
            encode_record(&mut encoded, first + i as u64, entry.as_ref());
        }
        let inner = self.inner.clone();
        let path = writer.path.clone();
        let freed_before = self.inner.state().freed;
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let result = writer.write_batch(&inner, &encoded, &sizes);
            // Released first: a full disk may be reclaimed right away.
            drop(writer);
            match &result {
                Ok(_) => inner.space_returned(),
                Err(err) if err.is_no_space() => inner.ran_out_of_space(bytes, freed_before),
                Err(_) => {}
            }
            result
        })
        .await
        .map_err(|e| join_error("append", path, e))?
    }

    /// Waits until appending `entries` is worth trying (or fails with
    /// [`Error::Closed`]): while the buffer is full (`max_bytes`), until
    /// acknowledgements free room; and after an append found the disk full
    /// ([`Error::NoSpace`], [`Stats::disk_full`]), until the buffer frees
    /// disk space (segments deleted as delivery drains) or the filesystem
    /// reports enough free space (it is asked every second; space may come
    /// back from outside), or in any case every 30 seconds (the
    /// filesystem's figure ignores quotas). Writes nothing, so it is safe to
    /// drop at any point: a caller that must be able to give up while the
    /// buffer is full waits here, then appends. With a single appender the
    /// room found here is still there for its append; disk space is not
    /// promised, so an append may still fail with [`Error::NoSpace`]: wait
    /// here again.
    pub async fn wait_for_room<E: AsRef<[u8]>>(&self, entries: &[E]) -> Result<()> {
        let bytes = entries
            .iter()
            .map(|e| RECORD_HEADER_BYTES + e.as_ref().len() as u64)
            .sum();
        self.wait_for_space(bytes, true).await
    }

    /// Waits until `bytes` fit under `max_bytes` and, with `disk`, until
    /// retrying after a full disk is worth it.
    async fn wait_for_space(&self, bytes: u64, disk: bool) -> Result<()> {
        let mut next_probe = None;
        loop {
            let mut changed = self.inner.progress.subscribe();
            let disk_full = {
                let st = self.inner.state();
                if st.closed {
                    return Err(Error::Closed);
                }
                if !st.has_space(bytes, self.inner.config.max_bytes) {
                    None
                } else {
                    match st.disk_full {
                        Some(full) if disk && st.freed == full.freed_at => Some(full),
                        _ => return Ok(()),
                    }
                }
            };
            let Some(full) = disk_full else {
                // The sender lives as long as `self`, so this never errors.
                let _ = changed.changed().await;
                continue;
            };
            // A deadline kept across wake-ups, so that frequent
            // acknowledgements do not keep postponing the probe.
            let at =
                *next_probe.get_or_insert_with(|| tokio::time::Instant::now() + DISK_PROBE_EVERY);
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(at) => {
                    next_probe = None;
                    if self.disk_retry_worth_it(&full, bytes).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// After a full disk and no space freed by the buffer: whether the
    /// filesystem now has room for `bytes` (more free space than when the
    /// append failed, or a smaller append), or it is time to try anyway.
    async fn disk_retry_worth_it(&self, full: &DiskFullState, bytes: u64) -> bool {
        if full.attempted_at.elapsed() >= DISK_RETRY_ANYWAY {
            return true;
        }
        let dir = self.inner.dir.clone();
        let free = tokio::task::spawn_blocking(move || space::space(&dir))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|s| s.free_bytes);
        free.is_some_and(|free| {
            free >= bytes
                && (free > full.report.free_bytes.unwrap_or(0) || bytes < full.report.needed_bytes)
        })
    }

    /// Returns up to `max_entries` entries from offset `from` on, in order,
    /// each checked against its CRC. Waits until an entry at `from` exists;
    /// returns an empty list if the buffer is closed first (entries already
    /// appended are still returned after close, so a reader can drain).
    ///
    /// Reading stops before a damaged entry: the entries before it are
    /// returned, and a read starting at it fails with [`Error::Corrupt`]
    /// naming the segment file, byte position and offset. Offsets below the
    /// first retained segment fail with [`Error::Gone`].
    pub async fn read(&self, from: u64, max_entries: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        if max_entries == 0 {
            return Ok(Vec::new());
        }
        let parts = loop {
            let mut changed = self.inner.progress.subscribe();
            {
                let st = self.inner.state();
                let first = st.first_offset();
                if from < first {
                    return Err(Error::Gone {
                        requested: from,
                        first,
                    });
                }
                if from < st.next_offset {
                    let until = from.saturating_add(max_entries as u64).min(st.next_offset);
                    let mut parts = Vec::new();
                    let mut offset = from;
                    let mut i = st.segment_of(from);
                    while offset < until && i < st.segments.len() {
                        let part = ReadPart::plan(&st, i, offset, until);
                        offset = part.until;
                        parts.push(part);
                        i += 1;
                    }
                    break parts;
                }
                if st.closed {
                    return Ok(Vec::new());
                }
            }
            let _ = changed.changed().await;
        };
        let inner = self.inner.clone();
        let path = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || read_parts(&inner, &parts))
            .await
            .map_err(|e| join_error("read", path, e))?
    }

    /// Acknowledges every entry below `upto_exclusive`: persists the offset
    /// durably (overwriting a slot of the `acked` file in place and syncing
    /// it, which needs no new disk space), then deletes segments whose
    /// entries are all acknowledged and wakes appenders waiting for space.
    ///
    /// When every entry is acknowledged, the active segment is reclaimed
    /// too (deleted, and an empty one started): at once if it holds 1 MiB
    /// or more or the disk was found full, otherwise once the buffer has
    /// stayed drained for a second. So a drained buffer gives its space
    /// back to the disk. Acknowledging at or below the current
    /// acknowledged offset does nothing; past [`next_offset`](Self::next_offset)
    /// fails with [`Error::AckBeyondEnd`]. Still allowed after close, so
    /// in-flight deliveries can finish.
    pub async fn ack(&self, upto_exclusive: u64) -> Result<()> {
        let _serial = self.inner.ack_lock.lock().await;
        let target = {
            let st = self.inner.state();
            if upto_exclusive > st.next_offset {
                return Err(Error::AckBeyondEnd {
                    requested: upto_exclusive,
                    next_offset: st.next_offset,
                });
            }
            if upto_exclusive <= st.acked {
                return Ok(());
            }
            LocatePlan::new(&st, upto_exclusive)
        };
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let logical = target.resolve();
            {
                let mut file = inner
                    .acked_file
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match file.as_mut() {
                    Some(file) => file.store(upto_exclusive)?,
                    None => *file = Some(AckedFile::open(&inner.dir, upto_exclusive)?),
                }
            }
            let deletable = {
                let mut st = inner.state();
                st.acked = upto_exclusive;
                st.acked_logical = logical;
                st.take_deletable()
            };
            delete_segments(deletable);
            inner.reclaim_if_drained(false);
            // Woken from here so that a dropped `ack` future still wakes
            // appenders once the acknowledgement is done.
            inner.wake();
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| join_error("acknowledge", self.inner.dir.clone(), e))??;
        let idle = {
            let mut st = self.inner.state();
            let drained =
                st.acked == st.next_offset && st.segments.back().is_some_and(|s| s.records > 0);
            let schedule = drained && !st.idle_reclaim_pending;
            if schedule {
                st.idle_reclaim_pending = true;
            }
            schedule
        };
        if idle {
            spawn_idle_reclaim(&self.inner);
        }
        Ok(())
    }

    /// Forces appended entries to disk now. Needed only under
    /// [`FsyncPolicy::Interval`] (e.g. before acknowledging a source, or at
    /// shutdown); under the batch policy there is never anything pending.
    pub async fn sync(&self) -> Result<()> {
        let mut writer = self.inner.writer.clone().lock_owned().await;
        let path = writer.path.clone();
        tokio::task::spawn_blocking(move || writer.sync())
            .await
            .map_err(|e| join_error("fsync", path, e))?
    }

    /// The acknowledged offset: entries below it are done. A reader resumes
    /// here after a restart.
    pub fn acked(&self) -> u64 {
        self.inner.state().acked
    }

    /// The offset the next appended entry gets (one past the last one).
    pub fn next_offset(&self) -> u64 {
        self.inner.state().next_offset
    }

    /// The buffer's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Sizes right now.
    pub fn stats(&self) -> Stats {
        let st = self.inner.state();
        Stats {
            unacked_records: st.next_offset - st.acked,
            unacked_bytes: st.unacked_bytes(),
            segments: st.segments.len(),
            disk_bytes: st.segments.iter().map(|s| s.end).sum(),
            first_offset: st.first_offset(),
            acked: st.acked,
            next_offset: st.next_offset,
            disk_full: st.disk_full.map(|d| d.report),
        }
    }

    /// Stops intake: waiting and later appends fail with [`Error::Closed`],
    /// waiting reads return what exists (or nothing). Acknowledgements still
    /// work. Files are closed when the last clone is dropped.
    pub fn close(&self) {
        self.inner.state().closed = true;
        self.inner.wake();
    }
}

/// A hold on a running buffer for an online copy (see
/// [`Buffer::snapshot`]): while it lives, no segment file is deleted, so
/// every entry from [`acked`](Self::acked) on stays on disk however far
/// delivery moves meanwhile. Appends, reads and acknowledgements go on.
#[derive(Debug)]
pub struct Snapshot {
    inner: Arc<Inner>,
    acked: u64,
}

/// What [`Snapshot::copy_to`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Copied {
    /// The acknowledged offset the copy holds: a buffer opened from it
    /// delivers from here.
    pub acked: u64,
    /// One past the last entry copied.
    pub next_offset: u64,
    /// Segment files copied.
    pub segments: usize,
    /// Bytes of those files.
    pub bytes: u64,
}

impl Buffer {
    /// Starts an online copy: notes the acknowledged offset now and keeps
    /// every segment file from being deleted until the snapshot is
    /// dropped. [`Snapshot::copy_to`] then writes a buffer directory that
    /// opens at that offset and holds every entry appended up to the copy.
    ///
    /// Taking the offset first is what makes a copy consistent with a state
    /// store copied in between: entries below it were covered by the
    /// checkpoint before the store was copied, and entries appended before
    /// the store was copied are in the buffer copy.
    pub fn snapshot(&self) -> Snapshot {
        let mut st = self.inner.state();
        st.pins += 1;
        Snapshot {
            inner: self.inner.clone(),
            acked: st.acked,
        }
    }
}

impl Snapshot {
    /// The acknowledged offset the copy will hold.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Writes the copy into `dest` (created; it must not exist yet): every
    /// segment file as far as its published records go, then an `acked`
    /// file holding [`acked`](Self::acked), each synced. Blocking: run it
    /// off the async threads. A copy cut short leaves a directory without
    /// an `acked` file, which [`Copied`] was never returned for.
    pub fn copy_to(&self, dest: &Path) -> Result<Copied> {
        let (listed, next_offset): (Vec<(PathBuf, u64)>, u64) = {
            let st = self.inner.state();
            let listed = st
                .segments
                .iter()
                .map(|s| (s.path.clone(), s.end))
                .collect();
            (listed, st.next_offset)
        };
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io("create backup directory", parent, e))?;
        }
        fs::create_dir(dest).map_err(|e| Error::io("create buffer copy", dest, e))?;
        let mut copied = Copied {
            acked: self.acked,
            next_offset,
            segments: 0,
            bytes: 0,
        };
        for (path, end) in listed {
            let Some(name) = path.file_name() else {
                continue;
            };
            let to = dest.join(name);
            let mut from = File::open(&path).map_err(|e| Error::io("open segment", &path, e))?;
            let mut out =
                File::create(&to).map_err(|e| Error::io("create segment copy", &to, e))?;
            // Only published records: bytes past `end` may be an append in
            // progress.
            let n = io::copy(&mut io::Read::take(&mut from, end), &mut out)
                .map_err(|e| Error::io("copy segment", &path, e))?;
            if n != end {
                return Err(Error::io(
                    "copy segment",
                    &path,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{n} bytes read of the {end} published"),
                    ),
                ));
            }
            out.sync_all()
                .map_err(|e| Error::io("fsync segment copy", &to, e))?;
            copied.segments += 1;
            copied.bytes += n;
        }
        acked::store(dest, self.acked)?;
        acked::sync_dir(dest)?;
        Ok(copied)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let deletable = {
            let mut st = self.inner.state();
            st.pins = st.pins.saturating_sub(1);
            st.take_deletable()
        };
        // What acknowledgements freed meanwhile goes now, and a drained
        // active segment as its idle reclaim would have done.
        delete_segments(deletable);
        self.inner.reclaim_if_drained(true);
        self.inner.wake();
    }
}

fn read_parts(inner: &Inner, parts: &[ReadPart]) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut hint = None;
    let result = (|| -> Result<()> {
        for part in parts {
            if part.from >= part.framed_until {
                return Err(part.lost_error(part.from));
            }
            let mut reader = match part.open() {
                Ok(reader) => reader,
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    // Deleted by an acknowledgement since the plan was made.
                    let first = inner.state().first_offset();
                    return Err(Error::Gone {
                        requested: part.from,
                        first,
                    });
                }
                Err(err) => return Err(err),
            };
            reader.skip_to(part.from)?;
            while reader.offset < part.until {
                if reader.offset >= part.framed_until {
                    return Err(part.lost_error(reader.offset));
                }
                let offset = reader.offset;
                let entry = reader.next_entry()?;
                out.push((offset, entry));
                hint = Some(Position {
                    base: part.base,
                    offset: reader.offset,
                    pos: reader.pos,
                });
            }
        }
        Ok(())
    })();
    if hint.is_some() {
        inner.state().read_hint = hint;
    }
    match result {
        // Hand over what was read; the next read starts at the damage and
        // reports it.
        Err(_) if !out.is_empty() => Ok(out),
        Err(err) => Err(err),
        Ok(()) => Ok(out),
    }
}

/// How to find the logical position of an offset, planned under the state
/// lock and resolved (with file I/O) outside it.
#[derive(Debug)]
enum LocatePlan {
    Known(u64),
    Scan {
        part: ReadPart,
        target: u64,
        logical_start: u64,
        fallback: u64,
    },
}

impl LocatePlan {
    fn new(st: &State, offset: u64) -> Self {
        if offset >= st.next_offset {
            return Self::Known(st.end_logical);
        }
        if offset < st.first_offset() {
            return Self::Known(0);
        }
        let i = st.segment_of(offset);
        let seg = &st.segments[i];
        if offset >= seg.base + seg.records {
            // In a lost range: everything of this segment counts as done.
            return Self::Known(seg.logical_start + seg.data_bytes());
        }
        let part = ReadPart::plan(st, i, offset, offset);
        let fallback = seg.logical_start + (part.start.1 - SEGMENT_HEADER_BYTES);
        if part.start.0 == offset {
            return Self::Known(fallback);
        }
        Self::Scan {
            part,
            target: offset,
            logical_start: seg.logical_start,
            fallback,
        }
    }

    fn resolve(self) -> u64 {
        match self {
            Self::Known(logical) => logical,
            Self::Scan {
                part,
                target,
                logical_start,
                fallback,
            } => {
                let found = part.open().and_then(|mut reader| {
                    reader.skip_to(target)?;
                    Ok(reader.pos)
                });
                match found {
                    Ok(pos) => logical_start + (pos - SEGMENT_HEADER_BYTES),
                    Err(err) => {
                        // Only the space accounting is approximate then (it
                        // counts a few more bytes as unacknowledged).
                        tracing::warn!(error = %err, "buffer: could not locate the acknowledged offset exactly");
                        fallback
                    }
                }
            }
        }
    }
}

/// Logical position of `offset` at open (blocking I/O is fine there).
fn logical_position(st: &State, offset: u64) -> u64 {
    LocatePlan::new(st, offset).resolve()
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(Error::io("lock buffer directory", path, e)),
    }
}

/// Syncs the active segment every `every` under the interval policy. Holds
/// only a weak reference: it ends once the buffer is dropped.
fn spawn_flusher(inner: Weak<Inner>, every: Duration) -> Result<()> {
    let dir = inner.upgrade().map(|i| i.dir.clone()).unwrap_or_default();
    std::thread::Builder::new()
        .name("caudal-buffer-fsync".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                // Only the writer is held while it syncs: a buffer dropped
                // meanwhile lets go of its directory at once, so it can be
                // opened again right away.
                let (writer, dir) = (inner.writer.clone(), inner.dir.clone());
                drop(inner);
                let result = writer.blocking_lock().sync();
                if let Err(err) = result {
                    tracing::error!(dir = %dir.display(), error = %err, "buffer: interval fsync failed; appends stop until the buffer is reopened");
                    return;
                }
            }
        })
        .map_err(|e| Error::io("start fsync thread", dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BufferConfig {
        BufferConfig {
            segment_bytes: 4096,
            ..BufferConfig::default()
        }
    }

    /// A snapshot keeps every segment from its acknowledged offset on disk
    /// while delivery acknowledges everything (here across several
    /// segments, the active one drained too), and the copy opens at that
    /// offset with every entry appended before the copy, intact.
    #[tokio::test]
    async fn a_snapshot_copies_from_its_offset_while_delivery_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let backups = tempfile::tempdir().unwrap();
        let (buffer, _) = Buffer::open(dir.path(), small()).unwrap();
        let entries: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(20)).collect();
        buffer.append(&entries[..100]).await.unwrap();
        buffer.ack(40).await.unwrap();
        let snapshot = buffer.snapshot();
        assert_eq!(snapshot.acked(), 40);
        buffer.append(&entries[100..]).await.unwrap();
        buffer.ack(300).await.unwrap();
        let segments = buffer.stats().segments;
        assert!(segments > 2, "several segments, none deleted: {segments}");
        let copy = backups.path().join("orders");
        let copied = snapshot.copy_to(&copy).unwrap();
        assert_eq!((copied.acked, copied.next_offset), (40, 300));
        assert_eq!(copied.segments, segments);
        assert!(snapshot.copy_to(&copy).is_err(), "an existing copy is kept");
        drop(snapshot);
        assert_eq!(buffer.stats().segments, 1, "freed once the snapshot ends");

        let (restored, recovery) = Buffer::open(&copy, small()).unwrap();
        assert_eq!((recovery.acked, recovery.next_offset), (40, 300));
        assert!(recovery.torn.is_empty() && recovery.corrupt.is_empty());
        let got = restored.read(40, 1000).await.unwrap();
        let want: Vec<(u64, Vec<u8>)> = (40..300u64)
            .map(|i| (i, entries[i as usize].clone()))
            .collect();
        assert_eq!(got, want);
        // The copy is a buffer like any other: it appends after its end.
        assert_eq!(restored.append(&[b"next"]).await.unwrap(), 300..301);
    }

    #[tokio::test]
    async fn second_open_of_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_buffer, _) = Buffer::open(dir.path(), small()).unwrap();
        let err = Buffer::open(dir.path(), small()).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
    }

    /// Found by the `buffer_segments` fuzz target: an `acked` file (intact,
    /// or damaged with a matching checksum) at the last offset made the
    /// next append overflow the offset instead of failing.
    #[tokio::test]
    async fn fuzz_append_at_the_last_offset_fails_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        acked::store(dir.path(), u64::MAX).unwrap();
        let (buffer, _) = Buffer::open(dir.path(), small()).unwrap();
        assert_eq!(buffer.next_offset(), u64::MAX);
        let err = buffer.append(&[b"x"]).await.unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert_eq!(
            buffer.append::<&[u8]>(&[]).await.unwrap(),
            u64::MAX..u64::MAX
        );
    }

    #[tokio::test]
    async fn sequential_reads_use_the_hint_and_random_reads_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let config = BufferConfig {
            segment_bytes: 1 << 20,
            ..BufferConfig::default()
        };
        let (buffer, _) = Buffer::open(dir.path(), config).unwrap();
        let entries: Vec<Vec<u8>> = (0..5000u32).map(|i| i.to_le_bytes().repeat(25)).collect();
        buffer.append(&entries).await.unwrap();
        {
            let st = buffer.inner.state();
            assert!(st.segments[0].index.len() > 5, "index entries every 64 KiB");
        }
        for from in [4999, 0, 1234, 3000, 3001] {
            let got = buffer.read(from, 1).await.unwrap();
            assert_eq!(got, vec![(from, entries[from as usize].clone())]);
        }
        let hint = buffer.inner.state().read_hint.unwrap();
        assert_eq!(hint.offset, 3002);
    }

    /// Under the interval policy a power loss can drop entries that were
    /// already delivered and acknowledged: numbering must continue after
    /// the acknowledged offset, never hand out an acknowledged offset again.
    #[tokio::test]
    async fn acknowledged_offset_past_the_data_continues_numbering_there() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (buffer, _) = Buffer::open(dir.path(), small()).unwrap();
            buffer.append(&vec![vec![5u8; 100]; 10]).await.unwrap();
        }
        acked::store(dir.path(), 25).unwrap();
        let report = crate::fsck(dir.path()).unwrap();
        assert!(report.problems.iter().any(|p| matches!(
            p.kind,
            ProblemKind::AckedAhead {
                acked: 25,
                next_offset: 10
            }
        )));

        let (buffer, recovery) = Buffer::open(dir.path(), small()).unwrap();
        assert_eq!((recovery.acked, recovery.next_offset), (25, 25));
        assert_eq!(recovery.corrupt.len(), 1);
        assert_eq!(recovery.segments, 1);
        assert_eq!(buffer.append(&[b"x"]).await.unwrap(), 25..26);
        assert_eq!(
            buffer.read(25, 10).await.unwrap(),
            vec![(25, b"x".to_vec())]
        );
        drop(buffer);
        let (_, recovery) = Buffer::open(dir.path(), small()).unwrap();
        assert_eq!((recovery.acked, recovery.next_offset), (25, 26));
        assert!(recovery.corrupt.is_empty());
    }

    #[tokio::test]
    async fn unacked_bytes_are_exact_after_acks_in_the_middle_of_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = Buffer::open(dir.path(), small()).unwrap();
        let entries: Vec<Vec<u8>> = (0..300u32).map(|i| vec![1; (i % 50) as usize]).collect();
        buffer.append(&entries).await.unwrap();
        let frame = |i: usize| RECORD_HEADER_BYTES + entries[i].len() as u64;
        let total: u64 = (0..300).map(frame).sum();
        assert_eq!(buffer.stats().unacked_bytes, total);
        for upto in [1u64, 77, 150, 299, 300] {
            buffer.ack(upto).await.unwrap();
            let expected: u64 = (upto as usize..300).map(frame).sum();
            assert_eq!(buffer.stats().unacked_bytes, expected, "after ack({upto})");
        }
        drop(buffer);
        let (_, recovery) = Buffer::open(dir.path(), small()).unwrap();
        assert_eq!(recovery.unacked_bytes, 0);
    }
}
