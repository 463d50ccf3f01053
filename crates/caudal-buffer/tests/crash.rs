//! Crash test: a child process (this test binary, started again with an
//! environment variable selecting the writer role) appends and acknowledges
//! continuously and is killed with SIGKILL at random points. After each kill
//! the buffer must open, and every entry the child reported durable (it
//! prints the offsets after `append` returns) must be there and intact.
//!
//! Two workloads: small segments with acknowledgements now and then
//! (rollover and deletion of sealed segments under the kill), and large
//! segments with everything acknowledged after each append (the active
//! segment reclaimed, deleted and started again, under the kill).

// clippy.toml's allow-unwrap-in-tests covers #[test] bodies only; the
// helpers of this test crate fail loudly the same way.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use caudal_buffer::{Buffer, BufferConfig};

const CHILD_DIR_ENV: &str = "CAUDAL_BUFFER_CRASH_CHILD_DIR";
/// Set to `drain` for the second workload.
const CHILD_WORKLOAD_ENV: &str = "CAUDAL_BUFFER_CRASH_CHILD_WORKLOAD";
const KILLS: usize = 8;

fn payload(offset: u64) -> Vec<u8> {
    let len = 1 + (offset.wrapping_mul(2_654_435_761) % 600) as usize;
    (0..len)
        .map(|i| (offset as usize ^ (i * 13)) as u8)
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Small segments, acknowledgements now and then.
    Roll,
    /// Large segments, everything acknowledged after each append: the
    /// active segment is reclaimed whenever it holds 1 MiB or more.
    Drain,
}

impl Workload {
    fn from_env() -> Self {
        match std::env::var(CHILD_WORKLOAD_ENV).as_deref() {
            Ok("drain") => Self::Drain,
            _ => Self::Roll,
        }
    }

    fn config(self) -> BufferConfig {
        match self {
            Self::Roll => BufferConfig {
                // Small segments so rollover and deletion happen under the
                // kill too.
                segment_bytes: 256 * 1024,
                max_bytes: 4 << 20,
                ..BufferConfig::default()
            },
            Self::Drain => BufferConfig::default(),
        }
    }
}

/// xorshift64*: enough randomness for batch sizes and kill times.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos ^ u64::from(std::process::id()) << 32 | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// The writer role. Does nothing unless started by the crash test.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let workload = Workload::from_env();
    let config = workload.config();
    runtime.block_on(async move {
        let (buffer, recovery) = Buffer::open(Path::new(&dir), config.clone()).unwrap();
        let mut out = std::io::stdout();
        writeln!(out, "opened {}", recovery.next_offset).unwrap();
        let mut rng = Rng::seeded();
        loop {
            let start = buffer.next_offset();
            let n = 1 + rng.below(2000);
            let entries: Vec<Vec<u8>> = (start..start + n).map(payload).collect();
            let range = buffer.append(&entries).await.unwrap();
            assert_eq!(range, start..start + n);
            writeln!(out, "durable {} {}", range.start, range.end).unwrap();
            out.flush().unwrap();
            // Acknowledge part of the backlog now and then, so segments are
            // deleted while we may be killed. This process is its own only
            // consumer: keep the backlog well under the cap, or the next
            // append would wait for an acknowledgement forever.
            let acked = buffer.acked();
            let upto = if workload == Workload::Drain {
                range.end
            } else if buffer.stats().unacked_bytes > config.max_bytes / 2 {
                range.end - rng.below(n)
            } else if rng.below(4) == 0 {
                acked + rng.below(range.end - acked + 1)
            } else {
                acked
            };
            if upto > acked {
                buffer.ack(upto).await.unwrap();
                writeln!(out, "acked {upto}").unwrap();
                out.flush().unwrap();
            }
        }
    });
}

#[derive(Debug, Default)]
struct Reported {
    durable_end: u64,
    acked: u64,
    lines: usize,
}

fn run_child_and_kill(dir: &Path, workload: Workload, rng: &mut Rng) -> Reported {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(
            CHILD_WORKLOAD_ENV,
            if workload == Workload::Drain {
                "drain"
            } else {
                "roll"
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reported = Reported::default();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["durable", _, end] => {
                    reported.durable_end = end.parse().unwrap();
                    reported.lines += 1;
                    if reported.lines == 1 {
                        let _ = tx.send(());
                    }
                }
                ["acked", upto] => reported.acked = upto.parse().unwrap(),
                _ => {}
            }
        }
        reported
    });
    // Kill at a random point once the child is writing.
    rx.recv_timeout(Duration::from_secs(60))
        .expect("child reported no durable append within 60 s");
    std::thread::sleep(Duration::from_millis(5 + rng.below(250)));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_no_durable_entry() {
    kill_9_at_random_points(Workload::Roll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_active_segment_is_reclaimed_loses_no_entry() {
    kill_9_at_random_points(Workload::Drain).await;
}

async fn kill_9_at_random_points(workload: Workload) {
    let config = workload.config();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded();
    let started = Instant::now();
    let mut total_torn = 0;
    for round in 0..KILLS {
        let path = dir.path().to_path_buf();
        let seed = rng.below(u64::MAX);
        let reported = tokio::task::spawn_blocking(move || {
            run_child_and_kill(&path, workload, &mut Rng(seed | 1))
        })
        .await
        .unwrap();
        assert!(reported.lines > 0);

        let (buffer, recovery) = Buffer::open(dir.path(), config.clone()).unwrap();
        total_torn += recovery.torn_bytes;
        assert!(recovery.corrupt.is_empty(), "round {round}: {recovery:?}");
        assert!(
            recovery.next_offset >= reported.durable_end,
            "round {round}: entries up to {} were reported durable, the buffer ends at {}",
            reported.durable_end,
            recovery.next_offset
        );
        assert!(
            recovery.acked >= reported.acked,
            "round {round}: acknowledged {} went back to {}",
            reported.acked,
            recovery.acked
        );
        // Everything from the acknowledged offset on is there and intact
        // (entries below it may be deleted).
        let mut next = recovery.acked;
        while next < recovery.next_offset {
            for (offset, entry) in buffer.read(next, 500).await.unwrap() {
                assert_eq!(offset, next);
                assert_eq!(entry, payload(offset), "round {round}: entry {offset}");
                next += 1;
            }
        }
        let stats = buffer.stats();
        assert_eq!(stats.unacked_records, recovery.next_offset - recovery.acked);
        eprintln!(
            "round {round}: {} appends reported, next offset {}, acked {}, {} segments, {} torn bytes",
            reported.lines,
            recovery.next_offset,
            recovery.acked,
            stats.segments,
            recovery.torn_bytes
        );
        drop(buffer);
        assert!(caudal_buffer::fsck(dir.path()).unwrap().is_clean());
    }
    eprintln!(
        "{KILLS} kills in {:?}, {total_torn} torn bytes cut in all",
        started.elapsed()
    );
}
