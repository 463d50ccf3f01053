//! The buffer in the delivery path, against a real receiver on loopback:
//! per-key order with several requests in flight under injected faults; a
//! receiver outage during which the source keeps being read into the
//! buffer and nothing is lost; a full buffer pausing the source until
//! delivery frees room.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caudal_core::config::{Format, load_str};
use caudal_engine::{Pipeline, Trigger};
use caudal_store::{RunOutcome, Store};
use caudal_testkit::{Behaviour, Receiver, Reply, TestDb, sqlite_database};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should take about a second.
const PATIENCE: Duration = Duration::from_secs(60);

/// A table of events: `request_id` repeats (the pipeline's key), `seq` is
/// the source order.
struct World {
    db: TestDb,
    receiver: Receiver,
    state: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let db = sqlite_database();
        let pool = db.sqlite_pool().await;
        sqlx::raw_sql(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, request_id INTEGER NOT NULL, note TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("create");
        Self {
            db,
            receiver: Receiver::start().await,
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Inserts events `seqs`, with request ids cycling over `keys`.
    async fn insert(&self, seqs: std::ops::RangeInclusive<i64>, keys: i64) {
        let pool = self.db.sqlite_pool().await;
        for seq in seqs {
            sqlx::query(
                "INSERT INTO events VALUES (?, ?, 'some text to make a record of a fair size')",
            )
            .bind(seq)
            .bind(seq % keys)
            .execute(&pool)
            .await
            .expect("insert");
        }
    }

    async fn pipeline(&self, sink_extra: &str, pipeline_extra: &str) -> Pipeline {
        let text = format!(
            r#"
[state]
url = "sqlite://{state}/state.db"
[sources.s]
type = "sqlite"
url = "{url}"
table = "events"
cursor = ["seq"]
page_size = 50
[sinks.r]
type = "http"
url = "{recv}"
{sink_extra}
[pipelines.p]
source = "s"
sink = "r"
key = "request_id"
schedule = {{ every = "1h" }}
{pipeline_extra}
"#,
            state = self.state.path().display(),
            url = self.db.url(),
            recv = self.receiver.url("/in"),
        );
        let config = load_str(&text, Format::Toml, "buffered.toml", &|_| None).expect("config");
        let store = Store::open(config.state.url.expose()).await.expect("store");
        Pipeline::build("p", &config, store)
            .await
            .expect("pipeline")
    }

    /// `(seq, request_id)` of every accepted record, in arrival order.
    fn accepted(&self) -> Vec<(i64, i64)> {
        self.receiver
            .accepted_records_at("")
            .iter()
            .map(|r| {
                (
                    r["seq"].as_i64().unwrap_or(-1),
                    r["request_id"].as_i64().unwrap_or(-1),
                )
            })
            .collect()
    }

    async fn wait_until_accepted(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while distinct(&self.accepted()) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} records arrived",
                distinct(&self.accepted())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts the daemon's delivery loop for `p`; cancel the token to stop it.
fn spawn_delivery(p: &Pipeline) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let p = p.clone();
    let token = stop.clone();
    let task = tokio::spawn(async move { p.deliver_until_stopped(&token).await });
    (stop, task)
}

/// Requests that arrived less than 25 ms after the one before. Every
/// answer here takes at least 30 ms, so with one request in flight there
/// are none: each counts an overlap.
fn quick_successions(receiver: &Receiver) -> usize {
    let times: Vec<_> = receiver.requests().iter().map(|r| r.received_at).collect();
    times
        .windows(2)
        .filter(|pair| pair[1] - pair[0] < Duration::from_millis(25))
        .count()
}

fn distinct(accepted: &[(i64, i64)]) -> usize {
    accepted
        .iter()
        .map(|(seq, _)| seq)
        .collect::<HashSet<_>>()
        .len()
}

/// Per key, the first arrival of each record is in source order.
fn assert_order_per_key(accepted: &[(i64, i64)]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<i64, i64> = HashMap::new();
    for &(seq, key) in accepted {
        if !seen.insert(seq) {
            continue; // a resend of a batch whose answer was lost
        }
        if let Some(before) = last.insert(key, seq) {
            assert!(
                before < seq,
                "key {key}: event {seq} arrived after {before}"
            );
        }
    }
}

/// Deterministic faults: per request, by arrival number.
fn faulty_receiver(receiver: &Receiver) {
    let n = Arc::new(AtomicU64::new(0));
    receiver.set_behaviour(Behaviour::custom(move |_| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        // A small mixing step so the faults do not line up with batches.
        let roll = (i.wrapping_mul(2_654_435_761) >> 7) % 20;
        match roll {
            0..=2 => Reply::status(503),
            3 => Reply::status(500),
            4 => Reply::retry_after(429, 0),
            5 => Reply::reset(),
            // Past the sink's timeout: the answer is lost, the batch resent.
            6 => Reply::status(200).delay(Duration::from_millis(800)),
            _ => Reply::status(200).delay(Duration::from_millis(30)),
        }
    }));
}

/// Four requests in flight, random 5xx, 429, resets and answers lost to
/// the timeout: every event arrives, per key in source order, while
/// batches of different keys overtake each other.
#[tokio::test]
async fn order_per_key_holds_with_four_requests_in_flight_under_faults() {
    let w = World::new().await;
    w.insert(1..=300, 7).await;
    faulty_receiver(&w.receiver);
    let p = w
        .pipeline(
            r#"batch = { max_records = 3 }
concurrency = 4
timeout = "400ms"
retry = { initial = "5ms", max_delay = "40ms" }
circuit_breaker = { enabled = false }"#,
            "",
        )
        .await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!(run.rows_read, 300);
    assert_eq!(run.rows_delivered, 300);

    let accepted = w.accepted();
    assert_eq!(distinct(&accepted), 300, "every event arrived");
    assert_order_per_key(&accepted);

    // Requests really overlapped: with one in flight, the next arrives only
    // after the previous answer (at least 30ms later).
    let overlapping = quick_successions(&w.receiver);
    assert!(
        overlapping > 10,
        "requests never overlapped ({overlapping})"
    );
    assert_eq!(p.buffer().await.expect("buffer").stats().unacked_records, 0);
}

/// The batch holding event 1 is refused (503) until the receiver has
/// accepted event 4, which travels in the next batch and shares no key with
/// it. So the run can only finish if a stuck key holds back nothing but
/// its own batches; events 7..=9, which share keys with the stuck batch,
/// wait behind it.
#[tokio::test]
async fn a_stuck_key_holds_back_only_its_own_batches() {
    let w = World::new().await;
    w.insert(1..=12, 6).await;
    let got_4 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let got_4 = got_4.clone();
        w.receiver.set_behaviour(Behaviour::custom(move |r| {
            let seqs: Vec<i64> = r
                .json
                .as_ref()
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|e| e["seq"].as_i64()).collect())
                .unwrap_or_default();
            if seqs.contains(&4) {
                got_4.store(true, Ordering::SeqCst);
            }
            if seqs.contains(&1) && !got_4.load(Ordering::SeqCst) {
                return Reply::status(503);
            }
            Reply::status(200)
        }));
    }
    let p = w
        .pipeline(
            r#"batch = { max_records = 3 }
concurrency = 2
retry = { initial = "5ms", max_delay = "20ms" }
circuit_breaker = { enabled = false }"#,
            "",
        )
        .await;
    let run = tokio::time::timeout(
        PATIENCE,
        p.run_once(Trigger::Manual, &CancellationToken::new(), None),
    )
    .await
    .expect("the run finishes: the stuck batch did not hold back the next one")
    .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    let accepted = w.accepted();
    assert_eq!(distinct(&accepted), 12);
    assert_order_per_key(&accepted);
    let position = |seq: i64| accepted.iter().position(|(s, _)| *s == seq);
    assert!(
        position(4) < position(1),
        "event 4 overtook the stuck batch"
    );
    // Events 7..=9 share keys 1..=3 with the stuck batch: they waited.
    assert!(position(1) < position(7), "{accepted:?}");
}

/// The receiver is down: runs keep reading the source into the buffer (each
/// run succeeds once its rows are durable), the circuit breaker opens, and
/// nothing reaches the receiver. Once it is back, everything buffered is
/// delivered exactly once, in order, and counted on the run that read it.
#[tokio::test]
async fn outage_buffers_every_run_then_catches_up_exactly_once() {
    let w = World::new().await;
    w.receiver.stop().await;
    let p = w
        .pipeline(
            r#"batch = { max_records = 10 }
retry = { initial = "10ms", max_delay = "50ms" }
circuit_breaker = { min_requests = 3, window = "10s", open_for = "300ms" }"#,
            "",
        )
        .await;
    let (stop, delivery) = spawn_delivery(&p);

    let mut runs = Vec::new();
    for round in 0..3 {
        w.insert(round * 20 + 1..=round * 20 + 20, 5).await;
        let run = p
            .run_capture(Trigger::Schedule, &CancellationToken::new())
            .await
            .expect("run");
        assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
        assert_eq!(run.rows_read, 20, "the source is read during the outage");
        let waiting = p.buffer().await.expect("buffer").stats().unacked_records;
        assert!(
            waiting >= 2 * (round as u64 + 1) - 1,
            "the buffer grows: {waiting} batches after round {round}"
        );
        runs.push(run.run_id);
    }
    let cp = p.checkpoint().await.expect("checkpoint").expect("some");
    assert_eq!(
        cp.display(),
        "(60)",
        "the checkpoint covers what is buffered"
    );

    // The breaker opened, and the delivery loop said so for `caudal status`.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = p.store().circuit_state("p").await.expect("state");
        if state.is_some_and(|s| s.circuit != "closed") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.receiver.request_count(), 0);

    w.receiver.restart().await;
    w.wait_until_accepted(60).await;
    let accepted = w.accepted();
    let seqs: Vec<i64> = accepted.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "each once, in order");

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let empty = p.buffer().await.expect("buffer").stats().unacked_records == 0;
        let closed = p
            .store()
            .circuit_state("p")
            .await
            .expect("state")
            .is_some_and(|s| s.circuit == "closed");
        let mut counted = Vec::new();
        for id in &runs {
            let run = p.store().run(*id).await.expect("run").expect("exists");
            counted.push(run.rows_delivered);
        }
        if empty && closed && counted == [20, 20, 20] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after catching up: buffer empty {empty}, breaker closed {closed}, delivered per run {counted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    delivery.await.expect("delivery loop");
}

/// A buffer of 4 KiB while the receiver is down: the run reads until the
/// buffer is full, then waits (the source is not read further), and never
/// holds more than the cap. When the receiver is back the run resumes and
/// ends, and every event arrives once, in order.
#[tokio::test]
async fn a_full_buffer_pauses_the_source_until_delivery_frees_room() {
    let w = World::new().await;
    w.insert(1..=200, 3).await;
    w.receiver.stop().await;
    let p = w
        .pipeline(
            r#"batch = { max_records = 5 }
retry = { initial = "10ms", max_delay = "50ms" }
circuit_breaker = { enabled = false }"#,
            r#"buffer = { max_bytes = "4KiB" }"#,
        )
        .await;
    let (stop, delivery) = spawn_delivery(&p);
    let run = {
        let p = p.clone();
        tokio::spawn(async move {
            p.run_capture(Trigger::Schedule, &CancellationToken::new())
                .await
        })
    };

    // Wait until the buffer stops growing: full.
    let buffer = p.buffer().await.expect("buffer").clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut samples = BTreeMap::new();
    loop {
        let stats = buffer.stats();
        assert!(
            stats.unacked_bytes <= 4096,
            "the buffer passed its cap: {stats:?}"
        );
        *samples.entry(stats.unacked_records).or_insert(0) += 1;
        if samples.get(&stats.unacked_records).copied().unwrap_or(0) >= 20
            && stats.unacked_records > 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "buffer never filled"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let full = buffer.stats();
    assert!(
        !run.is_finished(),
        "the run read all 200 rows past a full buffer: {full:?}"
    );
    assert!(full.unacked_records < 40, "{full:?}");
    let last = p.store().last_run("p").await.expect("runs").expect("a run");
    assert_eq!(last.outcome, RunOutcome::Running);
    assert!(last.rows_read < 200, "{last:?}");

    w.receiver.restart().await;
    let summary = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the run resumes and ends")
        .expect("join")
        .expect("run");
    assert_eq!(
        summary.outcome,
        RunOutcome::Succeeded,
        "{:?}",
        summary.error
    );
    assert_eq!(summary.rows_read, 200);
    w.wait_until_accepted(200).await;
    let seqs: Vec<i64> = w.accepted().iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "each once, in order");
    stop.cancel();
    delivery.await.expect("delivery loop");
}

/// A buffered batch names the run that read it and keeps its idempotency
/// key: a new process on the same buffer sends it first, with that key.
#[tokio::test]
async fn an_entry_carries_its_run_and_its_batch_key_across_a_restart() {
    let w = World::new().await;
    w.insert(1..=12, 4).await;
    w.receiver.stop().await;
    let first_key;
    {
        let p = w
            .pipeline(
                r#"batch = { max_records = 4 }
retry = { max_attempts = 1 }"#,
                "",
            )
            .await;
        let failed = p
            .run_once(Trigger::Manual, &CancellationToken::new(), None)
            .await
            .expect("run");
        assert_eq!(failed.outcome, RunOutcome::Failed);
        let buffer = p.buffer().await.expect("buffer");
        let entries = buffer.read(buffer.acked(), 10).await.expect("read");
        assert!(!entries.is_empty());
        let entry = caudal_engine::buffered::Entry::decode(entries[0].0, &entries[0].1)
            .expect("a readable entry");
        assert_eq!(entry.run, failed.run_id);
        first_key = entry.key;
    }
    w.receiver.restart().await;
    // A new pipeline (as after a restart of the process) on the same buffer.
    let p = w.pipeline("batch = { max_records = 4 }", "").await;
    let ok = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(ok.outcome, RunOutcome::Succeeded, "{:?}", ok.error);
    let requests = w.receiver.requests();
    assert_eq!(
        requests[0].header("idempotency-key"),
        Some(first_key.as_str()),
        "the buffered batch keeps its key"
    );
    let seqs: Vec<i64> = w.accepted().iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
}

/// Batch 1 (events 1..=3) is answered 503 after a pause and gives up;
/// meanwhile batch 2 (4..=6, other keys) is delivered. Batch 2 is past the
/// first unfinished batch, so it is not acknowledged: the next run sends it
/// again with the same key, and its rows are counted once, on the run that
/// read them.
#[tokio::test]
async fn a_batch_delivered_past_a_failed_one_is_resent_and_counted_once() {
    let w = World::new().await;
    w.insert(1..=6, 6).await;
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let first = first.clone();
        w.receiver.set_behaviour(Behaviour::custom(move |r| {
            let holds_1 = r
                .json
                .as_ref()
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|e| e["seq"] == 1));
            if holds_1 && first.swap(false, Ordering::SeqCst) {
                return Reply::status(503).delay(Duration::from_millis(500));
            }
            Reply::status(200)
        }));
    }
    let sink = r#"batch = { max_records = 3 }
concurrency = 2
retry = { max_attempts = 1 }"#;
    let p = w.pipeline(sink, "").await;
    let failed = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(failed.outcome, RunOutcome::Failed);
    assert_eq!(failed.rows_delivered, 0, "nothing acknowledged");
    let seqs: Vec<i64> = w.accepted().iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [4, 5, 6], "batch 2 went past the stuck batch 1");
    let keys_before: Vec<String> = w
        .receiver
        .requests()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_string))
        .collect();

    let ok = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(ok.outcome, RunOutcome::Succeeded, "{:?}", ok.error);
    assert_eq!(ok.rows_delivered, 6, "each row counted once");
    let read_by_first = p
        .store()
        .run(failed.run_id)
        .await
        .expect("run")
        .expect("exists");
    assert_eq!(read_by_first.rows_delivered, 6, "{read_by_first:?}");
    let requests = w.receiver.requests();
    let resent_2 = requests
        .iter()
        .skip(2)
        .find(|r| {
            r.json
                .as_ref()
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|e| e["seq"] == 4))
        })
        .expect("batch 2 sent again");
    assert!(
        keys_before
            .iter()
            .any(|k| Some(k.as_str()) == resent_2.header("idempotency-key")),
        "batch 2 kept its key"
    );
}

/// `concurrency = "adaptive"` in the real path: it starts at its minimum of
/// 1, and against a receiver that answers every request in the same 30 ms
/// it grows, so the receiver sees requests overlap (with one in flight,
/// the next one arrives only after the previous answer).
#[tokio::test]
async fn adaptive_concurrency_grows_while_the_receiver_keeps_up() {
    let w = World::new().await;
    // One key per event, so ordering never holds a batch back.
    w.insert(1..=120, 1_000).await;
    w.receiver
        .set_reply(Reply::status(200).delay(Duration::from_millis(30)));
    let p = w
        .pipeline(
            r#"batch = { max_records = 1 }
concurrency = { adaptive = { min = 1, max = 6 } }"#,
            "",
        )
        .await;
    assert_eq!(p.concurrency_limit(), 1, "adaptive starts at min");
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!(distinct(&w.accepted()), 120);
    let overlapping = quick_successions(&w.receiver);
    assert!(
        overlapping > 0,
        "requests never overlapped: the limit never grew past 1"
    );
}
