//! `buffer`: the durable buffer as a pipeline uses it, against the disk's
//! own ceiling.
//!
//! N records (`--rows`, default 1,000,000) of the `initial-sync` shape, in
//! batches of `--batch`, each batch one buffer entry (what the engine
//! appends, [`Entry`]), with `fsync = "batch"`: one `fdatasync` per batch.
//! Three ways over the same bytes, each in a fresh directory on the disk of
//! the temporary directory, reads right after the writes (from the page
//! cache, alike for all three):
//!
//! - `pipeline`: encode each batch ([`Entry::encode`]) and append it; read
//!   every entry back and decode it. What a pipeline pays per record.
//! - `buffer`: append the already encoded entries; read them back as bytes.
//!   The buffer's storage alone (framing, CRC, segment files, fsync).
//! - `plain`: the same entries framed as the buffer frames them (length +
//!   CRC-32, prepared before the clock starts), one `write` + `fdatasync`
//!   per batch to one file, then read back in 1 MiB chunks: the disk's
//!   ceiling.
//!
//! The ratio is `plain` over `buffer`, write + read together.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use caudal_buffer::{Buffer, BufferConfig};
use caudal_core::record::{CursorValue, Position};
use caudal_core::sink::Event;
use caudal_engine::buffered::Entry;
use serde_json::{Value, json};

use crate::cdc::scratch_dir;
use crate::{Args, round};

/// Entries read back per call, as the delivery loop reads them.
const READ_ENTRIES: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Timing {
    write: Duration,
    read: Duration,
}

impl Timing {
    fn total(self) -> f64 {
        (self.write + self.read).as_secs_f64()
    }
}

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let records = args.rows.unwrap_or(1_000_000);
    let batch = usize::try_from(args.batch.max(1))?;
    let dir = scratch_dir("buffer")?;
    eprintln!("buffer: preparing {records} records in batches of {batch}");
    let batches = batches(records, batch);
    let encoded: Vec<Vec<u8>> = batches
        .iter()
        .map(Entry::encode)
        .collect::<Result<_, _>>()?;
    let bytes: usize = encoded.iter().map(Vec::len).sum();

    let timings = async {
        eprintln!("buffer: pipeline (encode + append, read + decode)");
        let pipeline = run_pipeline(&dir.join("pipeline"), &batches, records).await?;
        eprintln!("buffer: buffer alone");
        let buffer = run_buffer(&dir.join("buffer"), &encoded, bytes).await?;
        eprintln!("buffer: plain write + fdatasync");
        let plain = run_plain(&dir.join("plain"), &encoded)?;
        anyhow::Ok((pipeline, buffer, plain))
    }
    .await;
    // The directories hold about 1 GB: removed whatever happened.
    let _ = std::fs::remove_dir_all(&dir);
    let (pipeline, buffer, plain) = timings?;

    let n = records as f64;
    let mb = bytes as f64 / 1e6;
    let rate = |d: Duration| round(n / d.as_secs_f64());
    let mbps = |d: Duration| round(mb / d.as_secs_f64());
    Ok(json!({
        "scenario": "buffer",
        "records": records,
        "batch": batch,
        "bytes_per_record": round(bytes as f64 / n),
        "mb": round(mb),
        "pipeline_write_records_per_s": rate(pipeline.write),
        "pipeline_read_records_per_s": rate(pipeline.read),
        "buffer_write_records_per_s": rate(buffer.write),
        "buffer_write_mb_per_s": mbps(buffer.write),
        "buffer_read_records_per_s": rate(buffer.read),
        "buffer_read_mb_per_s": mbps(buffer.read),
        "buffer_records_per_s": round(n / buffer.total()),
        "buffer_mb_per_s": round(mb / buffer.total()),
        "plain_write_mb_per_s": mbps(plain.write),
        "plain_read_mb_per_s": mbps(plain.read),
        "plain_records_per_s": round(n / plain.total()),
        "plain_mb_per_s": round(mb / plain.total()),
        "buffer_over_plain": round(plain.total() / buffer.total()),
        "pipeline_over_plain": round(plain.total() / pipeline.total()),
    }))
}

/// The records, as the intake cuts them into batches.
pub(crate) fn batches(records: u64, batch: usize) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut events = Vec::with_capacity(batch);
    for i in 1..=records {
        let data = json!({
            "request_id": i,
            "service_id": format!("SRV-{}", i % 997),
            "opening_date": "2025-01-01T00:00:00+00:00",
            "status_id": i % 5 + 1,
            "last_modified_date": "2025-01-01T00:00:00+00:00",
        });
        let Value::Object(data) = data else {
            unreachable!("a JSON object literal")
        };
        events.push(Event {
            key: None,
            position: cursor(i),
            data: caudal_core::record::Json::from_map(&data),
        });
        if events.len() == batch || i == records {
            out.push(Entry {
                run: 1,
                key: format!("bench-{}", out.len()),
                position: cursor(i),
                events: std::mem::replace(&mut events, Vec::with_capacity(batch)),
            });
        }
    }
    out
}

fn cursor(i: u64) -> Position {
    Position::Cursor {
        values: vec![
            CursorValue::Text("2025-01-01T00:00:00+00:00".to_string()),
            CursorValue::Int(i64::try_from(i).unwrap_or(i64::MAX)),
        ],
    }
}

fn open(dir: &Path) -> anyhow::Result<Buffer> {
    let config = BufferConfig {
        max_bytes: u64::MAX,
        ..BufferConfig::default()
    };
    Ok(Buffer::open(dir, config)?.0)
}

async fn run_pipeline(dir: &Path, batches: &[Entry], records: u64) -> anyhow::Result<Timing> {
    let buffer = open(dir)?;
    let started = Instant::now();
    for entry in batches {
        buffer.append(&[entry.encode()?]).await?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    let (mut next, mut read) = (0u64, 0u64);
    while next < buffer.next_offset() {
        for (offset, bytes) in buffer.read(next, READ_ENTRIES).await? {
            read += Entry::decode(offset, &bytes)?.events.len() as u64;
            next = offset + 1;
        }
    }
    let elapsed = started.elapsed();
    if read != records {
        bail!("pipeline: read back {read} records, wrote {records}");
    }
    Ok(Timing {
        write,
        read: elapsed,
    })
}

async fn run_buffer(dir: &Path, encoded: &[Vec<u8>], bytes: usize) -> anyhow::Result<Timing> {
    let buffer = open(dir)?;
    let started = Instant::now();
    for entry in encoded {
        buffer.append(std::slice::from_ref(entry)).await?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    let (mut next, mut read) = (0u64, 0usize);
    while next < buffer.next_offset() {
        for (offset, entry) in buffer.read(next, READ_ENTRIES).await? {
            read += entry.len();
            next = offset + 1;
        }
    }
    let elapsed = started.elapsed();
    if read != bytes {
        bail!("buffer: read back {read} bytes, wrote {bytes}");
    }
    Ok(Timing {
        write,
        read: elapsed,
    })
}

fn run_plain(dir: &Path, encoded: &[Vec<u8>]) -> anyhow::Result<Timing> {
    std::fs::create_dir_all(dir)?;
    let framed: Vec<Vec<u8>> = encoded
        .iter()
        .map(|entry| {
            let mut bytes = Vec::with_capacity(entry.len() + 8);
            bytes.extend_from_slice(&u32::try_from(entry.len())?.to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(entry).to_le_bytes());
            bytes.extend_from_slice(entry);
            anyhow::Ok(bytes)
        })
        .collect::<Result<_, _>>()?;
    let path = dir.join("plain.log");
    let started = Instant::now();
    let mut file = File::create(&path)?;
    for bytes in &framed {
        file.write_all(bytes)?;
        file.sync_data()?;
    }
    let write = started.elapsed();
    drop(file);
    // Read back in 1 MiB chunks into one reused buffer: reading the whole
    // file into one fresh allocation would time the page faults of that
    // allocation, not the disk.
    let started = Instant::now();
    let mut file = File::open(&path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut read_back = 0usize;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        read_back += n;
    }
    let read = started.elapsed();
    let expected: usize = framed.iter().map(Vec::len).sum();
    if read_back != expected {
        bail!("plain: read {read_back} bytes, wrote {expected}");
    }
    Ok(Timing { write, read })
}
