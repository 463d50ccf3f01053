//! Storage comparison for the buffer: write N entries of ~200 bytes in
//! batches of 1,000 with one durable commit per batch, then read them back,
//! with
//!
//! - `segments`: caudal-buffer's own segment files (`fdatasync` per batch),
//! - `redb`: one write transaction per batch, `Durability::Immediate`,
//! - `sqlite`: sqlx, WAL, `synchronous=FULL`, one transaction per batch
//!   (one multi-row INSERT), reads by `id >= ? ORDER BY id LIMIT 1000`,
//! - `plain`: the same framed bytes written to one file with `fdatasync`
//!   per batch and read back whole: the disk's ceiling.
//!
//! ```text
//! cargo run --release -p caudal-buffer --example compare -- [--records N] [--size BYTES] [--batch N] [--rounds N] [--dir PATH]
//! ```
//!
//! Each round runs every engine once in a fresh directory; the median round
//! is reported (machines here are noisy). Reads follow the writes at once,
//! so they come from the page cache for every engine alike.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use caudal_buffer::{Buffer, BufferConfig};
use redb::{Database, ReadableDatabase, TableDefinition};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

#[derive(Clone, Debug)]
struct Args {
    records: u64,
    size: usize,
    batch: usize,
    rounds: usize,
    dir: Option<PathBuf>,
}

fn parse_args() -> AnyResult<Args> {
    let mut args = Args {
        records: 200_000,
        size: 200,
        batch: 1000,
        rounds: 3,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--records" => args.records = parse(&value()?)?,
            "--size" => args.size = parse(&value()?)?,
            "--batch" => args.batch = parse(&value()?)?,
            "--rounds" => args.rounds = parse(&value()?)?,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn parse<T: FromStr>(text: &str) -> AnyResult<T> {
    text.parse()
        .map_err(|_| format!("not a number: {text}").into())
}

/// Entry `i`: JSON-like text, padded to `size` bytes.
fn entry(i: u64, size: usize) -> Vec<u8> {
    let mut text = format!(
        "{{\"service_id\":{},\"request_id\":{},\"status_id\":{},\"last_modified_date\":\"2026-11-25T04:{:02}:{:02}Z\",\"note\":\"",
        i % 97,
        i,
        i % 7,
        i % 60,
        (i / 60) % 60
    )
    .into_bytes();
    text.resize(size.saturating_sub(2), b'x');
    text.extend_from_slice(b"\"}");
    text.truncate(size);
    text
}

#[derive(Clone, Copy, Debug)]
struct Timing {
    write: Duration,
    read: Duration,
    disk_bytes: u64,
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn run_segments(dir: &Path, batches: &[Vec<Vec<u8>>]) -> AnyResult<Timing> {
    let config = BufferConfig {
        max_bytes: u64::MAX,
        ..BufferConfig::default()
    };
    let (buffer, _) = Buffer::open(dir, config)?;
    let started = Instant::now();
    for batch in batches {
        buffer.append(batch).await?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    let (mut next, mut bytes) = (0u64, 0usize);
    let end = buffer.next_offset();
    while next < end {
        let got = buffer.read(next, 1000).await?;
        next += got.len() as u64;
        bytes += got.iter().map(|(_, e)| e.len()).sum::<usize>();
    }
    let read = started.elapsed();
    check_total(next, bytes, batches)?;
    Ok(Timing {
        write,
        read,
        disk_bytes: dir_bytes(dir),
    })
}

fn run_redb(dir: &Path, batches: &[Vec<Vec<u8>>]) -> AnyResult<Timing> {
    let db = Database::create(dir.join("log.redb"))?;
    let started = Instant::now();
    let mut key = 0u64;
    for batch in batches {
        let tx = db.begin_write()?; // Durability::Immediate by default
        {
            let mut table = tx.open_table(TABLE)?;
            for entry in batch {
                table.insert(key, entry.as_slice())?;
                key += 1;
            }
        }
        tx.commit()?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    let tx = db.begin_read()?;
    let table = tx.open_table(TABLE)?;
    let (mut count, mut bytes) = (0u64, 0usize);
    for item in table.range(0u64..)? {
        let (_, value) = item?;
        // Owned, as the buffer's read returns it.
        let entry: Vec<u8> = value.value().to_vec();
        count += 1;
        bytes += entry.len();
    }
    let read = started.elapsed();
    check_total(count, bytes, batches)?;
    drop(table);
    drop(tx);
    drop(db);
    Ok(Timing {
        write,
        read,
        disk_bytes: dir_bytes(dir),
    })
}

async fn run_sqlite(dir: &Path, batches: &[Vec<Vec<u8>>]) -> AnyResult<Timing> {
    let options = SqliteConnectOptions::new()
        .filename(dir.join("log.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    sqlx::query("CREATE TABLE log (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .execute(&mut conn)
        .await?;
    let started = Instant::now();
    let mut key = 0i64;
    for batch in batches {
        let mut tx = conn.begin().await?;
        let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT INTO log (id, payload) ");
        insert.push_values(batch, |mut row, entry| {
            row.push_bind(key).push_bind(entry.clone());
            key += 1;
        });
        insert.build().execute(&mut *tx).await?;
        tx.commit().await?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    let (mut next, mut bytes) = (0i64, 0usize);
    loop {
        let rows = sqlx::query("SELECT id, payload FROM log WHERE id >= ? ORDER BY id LIMIT 1000")
            .bind(next)
            .fetch_all(&mut conn)
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let payload: Vec<u8> = row.try_get(1)?;
            bytes += payload.len();
        }
        next += rows.len() as i64;
    }
    let read = started.elapsed();
    check_total(next as u64, bytes, batches)?;
    conn.close().await?;
    Ok(Timing {
        write,
        read,
        disk_bytes: dir_bytes(dir),
    })
}

fn run_plain(dir: &Path, batches: &[Vec<Vec<u8>>]) -> AnyResult<Timing> {
    // Frame exactly as the segments do (length, CRC, payload), outside the timing.
    let framed: Vec<Vec<u8>> = batches
        .iter()
        .map(|batch| {
            let mut bytes = Vec::new();
            for entry in batch {
                bytes.extend_from_slice(&(entry.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32fast::hash(entry).to_le_bytes());
                bytes.extend_from_slice(entry);
            }
            bytes
        })
        .collect();
    let path = dir.join("plain.log");
    let started = Instant::now();
    let mut file = File::create(&path)?;
    for bytes in &framed {
        file.write_all(bytes)?;
        file.sync_data()?;
    }
    let write = started.elapsed();
    drop(file);
    let started = Instant::now();
    let read_back = fs::read(&path)?;
    let read = started.elapsed();
    let expected: usize = framed.iter().map(Vec::len).sum();
    if read_back.len() != expected {
        return Err(format!("plain: read {} bytes, wrote {expected}", read_back.len()).into());
    }
    Ok(Timing {
        write,
        read,
        disk_bytes: dir_bytes(dir),
    })
}

fn check_total(count: u64, bytes: usize, batches: &[Vec<Vec<u8>>]) -> AnyResult<()> {
    let expected: usize = batches.iter().flatten().map(Vec::len).sum();
    let records: usize = batches.iter().map(Vec::len).sum();
    if count != records as u64 || bytes != expected {
        return Err(
            format!("read {count} records / {bytes} bytes, wrote {records} / {expected}").into(),
        );
    }
    Ok(())
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> AnyResult<()> {
    let args = parse_args()?;
    let root = match &args.dir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    let batches: Vec<Vec<Vec<u8>>> = (0..args.records)
        .step_by(args.batch)
        .map(|start| {
            (start..(start + args.batch as u64).min(args.records))
                .map(|i| entry(i, args.size))
                .collect()
        })
        .collect();
    let payload_mb = (args.records as f64 * args.size as f64) / 1e6;
    eprintln!(
        "{} records of {} bytes in batches of {}, {} rounds, in {}",
        args.records,
        args.size,
        args.batch,
        args.rounds,
        root.path().display()
    );

    const ENGINES: [&str; 4] = ["segments", "redb", "sqlite", "plain"];
    let mut results: Vec<Vec<Timing>> = vec![Vec::new(); ENGINES.len()];
    for round in 0..args.rounds {
        for (i, engine) in ENGINES.iter().enumerate() {
            let dir = root.path().join(format!("{engine}-{round}"));
            fs::create_dir_all(&dir)?;
            let timing = match *engine {
                "segments" => run_segments(&dir, &batches).await?,
                "redb" => run_redb(&dir, &batches)?,
                "sqlite" => run_sqlite(&dir, &batches).await?,
                _ => run_plain(&dir, &batches)?,
            };
            eprintln!(
                "round {round} {engine:<8} write {:>8.3}s read {:>7.3}s",
                timing.write.as_secs_f64(),
                timing.read.as_secs_f64()
            );
            results[i].push(timing);
            fs::remove_dir_all(&dir)?;
        }
    }

    println!(
        "| storage | write records/s | write MB/s | read records/s | read MB/s | disk bytes per record |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (engine, timings) in ENGINES.iter().zip(&results) {
        let write = median(timings.iter().map(|t| t.write).collect()).as_secs_f64();
        let read = median(timings.iter().map(|t| t.read).collect()).as_secs_f64();
        let disk = timings[0].disk_bytes as f64 / args.records as f64;
        println!(
            "| {engine} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} |",
            args.records as f64 / write,
            payload_mb / write,
            args.records as f64 / read,
            payload_mb / read,
            disk
        );
    }
    for (engine, timings) in ENGINES.iter().zip(&results) {
        let write = median(timings.iter().map(|t| t.write).collect()).as_secs_f64();
        let read = median(timings.iter().map(|t| t.read).collect()).as_secs_f64();
        println!(
            "{{\"scenario\":\"buffer_storage\",\"storage\":\"{engine}\",\"records\":{},\"size\":{},\"batch\":{},\"write_secs\":{write:.3},\"write_records_per_s\":{:.0},\"read_secs\":{read:.3},\"read_records_per_s\":{:.0},\"disk_bytes\":{}}}",
            args.records,
            args.size,
            args.batch,
            args.records as f64 / write,
            args.records as f64 / read,
            timings[0].disk_bytes
        );
    }
    Ok(())
}
