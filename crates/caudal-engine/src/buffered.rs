//! What a pipeline keeps in its durable buffer, and how it opens it.
//!
//! One buffer entry is one batch, cut by the intake before it is appended:
//! the records, the batch's idempotency key, the run that read it and the
//! source position it ends at. Batches are fixed once they are durable, so
//! a batch sent again after a crash is the same batch with the same key.
//!
//! The invariant that makes restarts exact: every entry below the buffer's
//! acknowledged offset is covered by the saved checkpoint. Intake releases
//! an entry to delivery only once the checkpoint covers it (`ack =
//! "buffered"`), or delivery saves the checkpoint before it acknowledges
//! the buffer (`ack = "delivered"`). So the records past the checkpoint
//! are exactly the unacknowledged entries, and [`recover`] can tell where
//! reading must resume from the last of them.
//!
//! A full disk is backpressure, as `buffer.max_bytes` is: [`wait_for_room`]
//! and [`append`] wait (logging once why, with the gauge
//! `caudal_buffer_blocked{reason = "disk_full"}` at 1) until delivery or an
//! operator frees space, then resume by themselves; while they wait, the
//! reason is kept where the pipeline's status reads it. [`open`] warns when
//! `buffer.max_bytes` cannot fit on the buffer's filesystem.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use caudal_buffer::{Buffer, BufferConfig, DEFAULT_MAX_BYTES, FsyncPolicy};
use caudal_core::config::{self, AckMode};
use caudal_core::record::{Json, Position, put_str, put_u32, take_str, take_u32};
use caudal_core::sink::Event;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// One batch as it sits in the buffer.
#[derive(Debug, Deserialize)]
pub struct Entry {
    /// The run that read the records; delivered records are counted on it.
    pub run: i64,
    /// The batch's idempotency key.
    pub key: String,
    /// The source position of the batch's last record (the checkpoint once
    /// the batch is acknowledged). Kept even when every record failed the
    /// schema, so the checkpoint still moves past them.
    pub position: Position,
    /// The records to send, in source order (possibly none).
    pub events: Vec<Event>,
}

/// The first byte of an entry in the binary layout (an entry written as
/// JSON, by earlier versions, starts with `{`).
const BINARY_ENTRY: u8 = 2;

impl Entry {
    /// The entry's bytes: a version byte, the run, the key, the position,
    /// then each event's key, position and record text, length-prefixed.
    /// Records are copied as their sources encoded them, never re-encoded.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let data: usize = self.events.iter().map(|e| e.data.len() + 48).sum();
        let mut out = Vec::with_capacity(64 + self.key.len() + data);
        out.push(BINARY_ENTRY);
        out.extend_from_slice(&self.run.to_le_bytes());
        put_str(&mut out, &self.key);
        self.position.write_binary(&mut out);
        put_u32(
            &mut out,
            u32::try_from(self.events.len()).unwrap_or(u32::MAX),
        );
        for e in &self.events {
            match &e.key {
                None => out.push(0),
                Some(k) => {
                    out.push(1);
                    put_str(&mut out, k);
                }
            }
            e.position.write_binary(&mut out);
            put_str(&mut out, e.data.as_str());
        }
        Ok(out)
    }

    pub fn decode(offset: u64, bytes: &[u8]) -> Result<Self> {
        let unreadable = || {
            Error::new(
                ErrorKind::Buffer,
                format!("buffer entry {offset} is not a batch this version can read"),
            )
        };
        match bytes.first() {
            Some(&BINARY_ENTRY) => Self::decode_binary(&bytes[1..]).ok_or_else(unreadable),
            // Written as JSON by an earlier version.
            Some(b'{') => serde_json::from_slice(bytes).map_err(|e| {
                Error::with_source(
                    ErrorKind::Buffer,
                    format!("buffer entry {offset} is not a batch this version can read"),
                    e,
                )
            }),
            _ => Err(unreadable()),
        }
    }

    fn decode_binary(mut input: &[u8]) -> Option<Self> {
        let input = &mut input;
        let run = i64::from_le_bytes(input.get(..8)?.try_into().ok()?);
        *input = &input[8..];
        let key = take_str(input)?;
        let position = Position::read_binary(input)?;
        let n = take_u32(input)? as usize;
        // Every event takes at least 10 bytes.
        if n > input.len() / 10 + 1 {
            return None;
        }
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let (&has_key, rest) = input.split_first()?;
            *input = rest;
            let key = match has_key {
                0 => None,
                1 => Some(take_str(input)?),
                _ => return None,
            };
            let position = Position::read_binary(input)?;
            // The buffer checked the entry's checksum: the record is the
            // text this version wrote.
            let data = Json::from_encoded(take_str(input)?);
            events.push(Event {
                key,
                position,
                data,
            });
        }
        input.is_empty().then_some(Self {
            run,
            key,
            position,
            events,
        })
    }

    /// The distinct keys of the batch's records, for per-key ordering.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.events.iter().filter_map(|e| e.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// Batches just appended, kept in memory so that a delivery loop that keeps
/// up does not read back and decode what the intake has just written. Only
/// a hint: bounded, and a batch that is not here is read from disk.
#[derive(Debug, Default)]
pub struct Recent {
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl Recent {
    /// Batches kept at most; the oldest go first.
    const CAPACITY: usize = 16;

    /// Keeps the batch appended at `offset`.
    pub fn put(&self, offset: u64, entry: Entry) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.insert(offset, entry);
        while entries.len() > Self::CAPACITY {
            entries.pop_first();
        }
    }

    /// Takes the batch at `offset`, if it is kept.
    pub fn take(&self, offset: u64) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&offset)
    }
}

/// The buffer's settings for a pipeline's `[buffer]` table.
pub fn buffer_config(c: &config::BufferConfig) -> BufferConfig {
    BufferConfig {
        max_bytes: c.max_bytes.0,
        fsync: match c.fsync {
            config::FsyncPolicy::Batch => FsyncPolicy::Batch,
            config::FsyncPolicy::Interval(d) => FsyncPolicy::Interval(d.as_std()),
        },
        ..BufferConfig::default()
    }
}

/// A buffer error as a caudal error of the right kind: a directory in use
/// is [`ErrorKind::Busy`] (another process runs the pipeline), anything
/// else [`ErrorKind::Buffer`].
pub fn buffer_error(pipeline: &str, e: caudal_buffer::Error) -> Error {
    match e {
        caudal_buffer::Error::Locked { dir } => Error::new(
            ErrorKind::Busy,
            format!(
                "pipeline {pipeline:?} is running in another process (its buffer {} is in use)",
                dir.display()
            ),
        ),
        e if e.is_no_space() => Error::with_source(
            ErrorKind::Buffer,
            format!("the disk of pipeline {pipeline:?}'s buffer is full"),
            e,
        ),
        e => Error::with_source(
            ErrorKind::Buffer,
            format!("the buffer of pipeline {pipeline:?} failed"),
            e,
        ),
    }
}

/// Opens (and recovers) a pipeline's buffer directory, off the async
/// threads. A torn tail left by a crash is cut and logged by the buffer.
/// Warns when `buffer.max_bytes` is more than the buffer's filesystem can
/// hold (see [`check_space`]).
pub async fn open(pipeline: &str, dir: &Path, config: BufferConfig) -> Result<Buffer> {
    let dir = dir.to_path_buf();
    let name = pipeline.to_string();
    let max_bytes = config.max_bytes;
    let buffer = tokio::task::spawn_blocking(move || Buffer::open(&dir, config))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "the buffer open task failed", e))?
        .map(|(buffer, _recovery)| buffer)
        .map_err(|e| buffer_error(&name, e))?;
    blocked_gauge(pipeline).set(0.0);
    let dir = buffer.dir().to_path_buf();
    match tokio::task::spawn_blocking(move || caudal_buffer::space(&dir)).await {
        Ok(Ok(space)) => {
            if let Some(warning) = check_space(max_bytes, buffer.stats().disk_bytes, space) {
                tracing::warn!(pipeline, dir = %buffer.dir().display(), "{warning}");
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(pipeline, error = %e, "cannot check the free space of the buffer's filesystem");
        }
        Err(e) => tracing::debug!(pipeline, error = %e, "the free space check failed"),
    }
    Ok(buffer)
}

/// Whether `buffer.max_bytes` fits on the buffer's filesystem: the buffer
/// may use what is free plus what it already holds (`disk_bytes`). When it
/// does not fit, a long outage fills the disk before the cap: intake then
/// waits for delivery all the same, but the disk is full for everything
/// else on it. Returns the warning to log.
pub fn check_space(max_bytes: u64, disk_bytes: u64, space: caudal_buffer::Space) -> Option<String> {
    let room = space.free_bytes.saturating_add(disk_bytes);
    if max_bytes <= room {
        return None;
    }
    let which = if max_bytes == DEFAULT_MAX_BYTES {
        " (the default)"
    } else {
        ""
    };
    Some(format!(
        "buffer.max_bytes{which} is {max_bytes} bytes, but the buffer's filesystem has room \
         for {room} ({} bytes free of {}): a long delivery outage will fill the disk before \
         the buffer is full; intake then waits until delivery frees space. Set \
         buffer.max_bytes below {room} to keep the rest of the disk free",
        space.free_bytes, space.total_bytes
    ))
}

/// `caudal_buffer_blocked{pipeline, reason="disk_full"}`: 1 while the
/// pipeline's intake waits for disk space.
fn blocked_gauge(pipeline: &str) -> metrics::Gauge {
    metrics::gauge!("caudal_buffer_blocked", "pipeline" => pipeline.to_string(), "reason" => "disk_full")
}

/// Why intake waits, for the pipeline's status: set while a wait lasts,
/// cleared when it ends, also when the wait is given up (dropped).
struct Blocked<'a>(&'a Mutex<Option<String>>);

impl<'a> Blocked<'a> {
    fn new(slot: &'a Mutex<Option<String>>, why: String) -> Self {
        *slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        Self(slot)
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Why appending to `buffer` waits now: its disk is full, or it holds
/// `buffer.max_bytes` of undelivered batches.
fn why_blocked(buffer: &Buffer) -> String {
    let stats = buffer.stats();
    match stats.disk_full {
        Some(full) => full.to_string(),
        None => format!(
            "the buffer is full (buffer.max_bytes): {} bytes of {} batches wait for delivery",
            stats.unacked_bytes, stats.unacked_records
        ),
    }
}

/// Waits until appending `entries` to `buffer` is worth trying
/// ([`Buffer::wait_for_room`]: room under `buffer.max_bytes`, and disk
/// space after a full disk), keeping why in `blocked` while it waits.
/// Safe to drop (to give up on a shutdown): nothing is written.
pub async fn wait_for_room(
    pipeline: &str,
    buffer: &Buffer,
    entries: &[Vec<u8>],
    blocked: &Mutex<Option<String>>,
) -> Result<()> {
    let wait = buffer.wait_for_room(entries);
    tokio::pin!(wait);
    // Room at once (the usual case): nothing to say.
    tokio::select! {
        biased;
        room = &mut wait => return room.map_err(|e| buffer_error(pipeline, e)),
        () = std::future::ready(()) => {}
    }
    let _blocked = Blocked::new(blocked, why_blocked(buffer));
    wait.await.map_err(|e| buffer_error(pipeline, e))
}

/// Appends a batch's `entries` (the caller has waited for room with
/// [`wait_for_room`]), waiting out a full disk: an append that finds no
/// space is undone by the buffer, so this waits for room again (until
/// delivery frees space or space returns from outside) and retries. Logs
/// a warning when intake starts waiting and an info line when it resumes,
/// keeps the gauge `caudal_buffer_blocked` in step and why in `blocked`.
/// Returns `None` when `cancel` comes while waiting: nothing was appended
/// then.
pub async fn append(
    pipeline: &str,
    buffer: &Buffer,
    entries: &[Vec<u8>],
    cancel: &CancellationToken,
    blocked: &Mutex<Option<String>>,
) -> Result<Option<Range<u64>>> {
    loop {
        let waiting = buffer.stats().disk_full;
        match buffer.append(entries).await {
            Ok(appended) => {
                if let Some(full) = waiting {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    tracing::info!(
                        pipeline,
                        dir = %buffer.dir().display(),
                        waited_s = now_ms.saturating_sub(full.since_unix_ms) / 1000,
                        "buffer disk has space again; intake resumed"
                    );
                    blocked_gauge(pipeline).set(0.0);
                }
                return Ok(Some(appended));
            }
            Err(e) if e.is_no_space() => {
                if waiting.is_none() {
                    let full = buffer.stats().disk_full;
                    tracing::warn!(
                        pipeline,
                        dir = %buffer.dir().display(),
                        needed_bytes = full.map(|f| f.needed_bytes),
                        free_bytes = full.and_then(|f| f.free_bytes),
                        error = %e,
                        "buffer disk full; intake waits until delivery or an operator frees space, then resumes by itself"
                    );
                    blocked_gauge(pipeline).set(1.0);
                }
            }
            Err(e) => return Err(buffer_error(pipeline, e)),
        }
        let _blocked = Blocked::new(blocked, why_blocked(buffer));
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            room = buffer.wait_for_room(entries) => room.map_err(|e| buffer_error(pipeline, e))?,
        }
    }
}

/// Drops what a run with `ack = "delivered"` left undelivered in the
/// buffer, when its source gives it again: a broker (none of it was
/// acknowledged; the broker delivers it again, in order, to whichever
/// consumer reads it next), or the shared checkpoint of a pipeline a
/// cluster node takes over. Sending it from here too would only repeat it
/// out of order. `why` says which, for the log.
pub async fn forget_undelivered(pipeline: &str, buffer: &Buffer, why: &str) -> Result<()> {
    let next = buffer.next_offset();
    let acked = buffer.acked();
    if next <= acked {
        return Ok(());
    }
    buffer
        .ack(next)
        .await
        .map_err(|e| buffer_error(pipeline, e))?;
    tracing::info!(
        pipeline,
        entries = next - acked,
        "dropped the undelivered batches of the last run: {why}"
    );
    Ok(())
}

/// Where reading the source resumes, given the saved checkpoint and the
/// buffer: the position of the last unacknowledged entry when there is one
/// (it is past the checkpoint, or equal to it), else the checkpoint. With
/// `ack = "buffered"` a checkpoint that lags the buffer (a crash between an
/// append and its checkpoint commit) is brought up to it first. Returns the
/// position and the offset up to which entries may be delivered.
pub async fn recover(
    pipeline: &str,
    buffer: &Buffer,
    store: &Store,
    ack: AckMode,
    checkpoint: Option<Position>,
) -> Result<(Option<Position>, u64)> {
    let next = buffer.next_offset();
    if next <= buffer.acked() {
        return Ok((checkpoint, next));
    }
    let tail = buffer
        .read(next - 1, 1)
        .await
        .map_err(|e| buffer_error(pipeline, e))?;
    let Some((offset, bytes)) = tail.into_iter().next() else {
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "the buffer of pipeline {pipeline:?} has no entry {}",
                next - 1
            ),
        ));
    };
    let position = Entry::decode(offset, &bytes)?.position;
    if ack == AckMode::Buffered && checkpoint.as_ref() != Some(&position) {
        let value = serde_json::to_value(&position)
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot encode a position", e))?;
        store.save_checkpoint(pipeline, &value).await?;
        tracing::info!(pipeline, position = %position.display(), "checkpoint brought up to the records already durable in the buffer");
    }
    Ok((Some(position), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_bytes_is_checked_against_the_free_space_and_what_the_buffer_holds() {
        let space = caudal_buffer::Space {
            free_bytes: 3 << 20,
            total_bytes: 4 << 20,
        };
        assert_eq!(check_space(1 << 20, 0, space), None);
        assert_eq!(check_space(4 << 20, 1 << 20, space), None);
        let warning = check_space(DEFAULT_MAX_BYTES, 1 << 20, space).unwrap();
        assert!(
            warning.starts_with("buffer.max_bytes (the default) is 268435456 bytes"),
            "{warning}"
        );
        assert!(
            warning.contains("room for 4194304 (3145728 bytes free of 4194304)"),
            "{warning}"
        );
        let warning = check_space(5 << 20, 0, space).unwrap();
        assert!(
            warning.starts_with("buffer.max_bytes is 5242880 bytes"),
            "{warning}"
        );
    }

    #[tokio::test]
    async fn a_wait_for_room_says_why_while_it_lasts_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let config = BufferConfig {
            max_bytes: 1000,
            ..BufferConfig::default()
        };
        let (buffer, _) = Buffer::open(dir.path(), config).unwrap();
        buffer.append(&[vec![0u8; 992]]).await.unwrap();
        let blocked = std::sync::Arc::new(Mutex::new(None));
        let entries = vec![vec![1u8; 10]];

        let waiting = tokio::spawn({
            let (buffer, blocked, entries) = (buffer.clone(), blocked.clone(), entries.clone());
            async move { wait_for_room("p", &buffer, &entries, &blocked).await }
        });
        let why = loop {
            if let Some(why) = blocked.lock().unwrap().clone() {
                break why;
            }
            tokio::task::yield_now().await;
        };
        assert!(
            why.starts_with("the buffer is full (buffer.max_bytes)"),
            "{why}"
        );
        buffer.ack(1).await.unwrap();
        waiting.await.unwrap().unwrap();
        assert_eq!(*blocked.lock().unwrap(), None);

        // Given up (dropped) while waiting: the reason goes too.
        buffer.append(&[vec![0u8; 992]]).await.unwrap();
        let cancel = CancellationToken::new();
        let waiting = tokio::spawn({
            let (buffer, blocked, entries, cancel) = (
                buffer.clone(),
                blocked.clone(),
                entries.clone(),
                cancel.clone(),
            );
            async move {
                tokio::select! {
                    () = cancel.cancelled() => None,
                    room = wait_for_room("p", &buffer, &entries, &blocked) => Some(room),
                }
            }
        });
        while blocked.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        assert!(waiting.await.unwrap().is_none());
        assert_eq!(*blocked.lock().unwrap(), None);
    }
}
