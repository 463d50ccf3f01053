//! Crash test: the real `caudal run` is killed with SIGKILL at random
//! moments, 50 times, while rows are inserted and updated; then one last
//! daemon runs to the end. The receiver must hold the latest version of
//! every row, every idempotency key must always name the same records,
//! deduplicated by key every version must have arrived exactly once, and
//! per row the versions must arrive in source order once duplicates (the
//! at-least-once resends after a kill) are set aside. Run once with each
//! `ack` mode.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{PATIENCE, World, request_id};

const CYCLES: u32 = 50;

/// A small deterministic generator, so a failure can be replayed from its
/// seed (printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing_and_keeps_keys_stable() {
    sigkill_cycles("buffered").await;
}

/// The same with the checkpoint following delivery: the checkpoint lags
/// the buffer, and a restart must still neither skip nor re-cut a batch.
#[tokio::test]
async fn sigkill_at_random_moments_with_ack_delivered() {
    sigkill_cycles("delivered").await;
}

async fn sigkill_cycles(ack: &'static str) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64 | 1);
    let mut rng = Rng(seed);
    let mut w = World::sqlite().await;
    w.ack = ack;
    w.every = "100ms".into();
    w.max_records = 3;

    let mut minute = 0u32;
    let mut rows = 0i64;
    // The version (last_modified minute) each row should end at.
    let mut latest: BTreeMap<i64, u32> = BTreeMap::new();
    for cycle in 0..CYCLES {
        for _ in 0..=rng.next(4) {
            minute += 1;
            if rows == 0 || rng.next(3) == 0 {
                rows += 1;
                w.insert([rows], minute).await;
                latest.insert(rows, minute);
            } else {
                let id = 1 + rng.next(rows as u64) as i64;
                w.update(id, 1 + rng.next(5) as i32, minute).await;
                latest.insert(id, minute);
            }
        }
        let daemon = w.start_daemon(cycle);
        tokio::time::sleep(Duration::from_millis(30 + rng.next(300))).await;
        let (status, log) = daemon.stop(Signal::SIGKILL).await;
        assert_eq!(
            status.code(),
            None,
            "killed by a signal (ack {ack}, seed {seed}); log:\n{log}"
        );
    }

    // One last daemon delivers whatever is left.
    let last = w.start_daemon(CYCLES);
    let expected: Vec<(i64, String)> = latest
        .iter()
        .map(|(id, m)| {
            (
                *id,
                format!("2025-05-14T{:02}:{:02}:00Z", 12 + m / 60, m % 60),
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let versions = delivered_versions(&w);
        if expected.iter().all(|v| versions.contains_key(v)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "latest versions missing (ack {ack}, seed {seed}): {:?}; log:\n{}",
            expected
                .iter()
                .filter(|v| !versions.contains_key(v))
                .collect::<Vec<_>>(),
            last.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stop it cleanly once it is up (it may have had nothing left to do).
    while !last.log().contains("scheduled") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last daemon never started:\n{}",
            last.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, log) = last.stop(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{log}");

    // Every idempotency key always names the same records.
    let mut bodies: HashMap<String, Value> = HashMap::new();
    for r in w.receiver.requests().iter().filter(|r| r.accepted()) {
        let key = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .expect("an Idempotency-Key header")
            .to_string();
        let body = r.json.clone().expect("a JSON body");
        if let Some(previous) = bodies.insert(key.clone(), body.clone()) {
            assert_eq!(
                previous, body,
                "key {key} named different records (ack {ack}, seed {seed})"
            );
        }
    }

    // Deduplicated by idempotency key, every version the receiver got
    // arrived exactly once: a buffered batch is never re-cut, so a resend
    // after a kill always carries the key it was first sent with.
    let mut once: HashMap<(i64, String), usize> = HashMap::new();
    for body in bodies.values() {
        for record in body["requests"].as_array().expect("requests") {
            let version = record["last_modified_date"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            *once.entry((request_id(record), version)).or_default() += 1;
        }
    }
    let repeated: Vec<_> = once.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "versions delivered under two keys (ack {ack}, seed {seed}): {repeated:?}"
    );
    for v in &expected {
        assert_eq!(once.get(v), Some(&1), "{v:?} (ack {ack}, seed {seed})");
    }

    // Per row, first arrivals of each version are in source order.
    let mut last_seen: HashMap<i64, String> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for record in w.delivered() {
        let id = request_id(&record);
        let version = record["last_modified_date"]
            .as_str()
            .expect("timestamp")
            .to_string();
        if !seen.insert((id, version.clone())) {
            continue; // a resend after a kill
        }
        if let Some(before) = last_seen.get(&id) {
            assert!(
                *before < version,
                "row {id}: version {version} arrived after {before} (ack {ack}, seed {seed})"
            );
        }
        last_seen.insert(id, version);
    }
}

/// Every (request_id, last_modified_date) the receiver accepted, counted.
fn delivered_versions(w: &World) -> HashMap<(i64, String), usize> {
    let mut out = HashMap::new();
    for record in w.delivered() {
        let version = record["last_modified_date"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *out.entry((request_id(&record), version)).or_default() += 1;
    }
    out
}
