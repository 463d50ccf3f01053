//! The delivery policy in a real run, against a fault-injecting receiver on
//! loopback: retries with the same idempotency key (honouring Retry-After),
//! rejected records kept as dead letters and replayed, 413 splitting, and
//! stable event ids in the body template.

use std::collections::HashMap;
use std::time::Duration;

use caudal_core::config::{Format, load_str};
use caudal_engine::{Pipeline, Trigger};
use caudal_store::{DeadLetterState, RunOutcome, Store};
use caudal_testkit::{Behaviour, Receiver, Reply, TestDb, sqlite_database};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct World {
    db: TestDb,
    receiver: Receiver,
    state: tempfile::TempDir,
}

impl World {
    async fn new(rows: i64) -> Self {
        let db = sqlite_database();
        let pool = db.sqlite_pool().await;
        sqlx::raw_sql(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, status INTEGER NOT NULL, modified TIMESTAMP NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("create");
        for id in 1..=rows {
            sqlx::query("INSERT INTO requests VALUES (?, 1, '2025-05-14T12:00:00Z')")
                .bind(id)
                .execute(&pool)
                .await
                .expect("insert");
        }
        Self {
            db,
            receiver: Receiver::start().await,
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    async fn pipeline(&self, sink_extra: &str) -> Pipeline {
        self.pipeline_with(sink_extra, "").await
    }

    async fn pipeline_with(&self, sink_extra: &str, pipeline_extra: &str) -> Pipeline {
        // Fast retries unless the test sets its own.
        let retry = if sink_extra.contains("retry =") {
            ""
        } else {
            r#"retry = { initial = "10ms", max_delay = "50ms" }"#
        };
        let text = format!(
            r#"
[state]
url = "sqlite://{state}/state.db"
[sources.s]
type = "sqlite"
url = "{url}"
table = "requests"
cursor = ["modified", "id"]
[sinks.r]
type = "http"
url = "{recv}"
batch = {{ max_records = 5 }}
{retry}
{sink_extra}
[pipelines.p]
source = "s"
sink = "r"
key = "id"
schedule = {{ every = "1h" }}
{pipeline_extra}
"#,
            state = self.state.path().display(),
            url = self.db.url(),
            recv = self.receiver.url("/in"),
        );
        let config = load_str(&text, Format::Toml, "delivery.toml", &|_| None).expect("config");
        let store = Store::open(config.state.url.expose()).await.expect("store");
        Pipeline::build("p", &config, store)
            .await
            .expect("pipeline")
    }
}

fn ids(body: &Value) -> Vec<i64> {
    body.as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_i64()).collect())
        .unwrap_or_default()
}

fn idempotency_key(r: &caudal_testkit::ReceivedRequest) -> String {
    r.headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .expect("an Idempotency-Key header")
        .to_string()
}

#[tokio::test]
async fn temporary_failures_are_retried_with_the_same_idempotency_key() {
    let w = World::new(10).await;
    w.receiver.queue_replies([
        Reply::status(503),
        Reply::retry_after(429, 1),
        Reply::status(500),
        Reply::status(200),
    ]);
    let p = w.pipeline("").await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!(run.rows_delivered, 10);
    let requests = w.receiver.requests();
    assert_eq!(
        requests.len(),
        5,
        "4 attempts of the first batch, 1 of the second"
    );
    let first_key = idempotency_key(&requests[0]);
    for r in &requests[..4] {
        assert_eq!(
            idempotency_key(r),
            first_key,
            "a retry carries the same key"
        );
        assert_eq!(ids(r.json.as_ref().expect("json")), [1, 2, 3, 4, 5]);
    }
    assert_ne!(idempotency_key(&requests[4]), first_key);
    // Retry-After: 1 was honoured (a lower bound, which sleeping guarantees).
    let waited = requests[2].received_at - requests[1].received_at;
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?}"
    );
    // Accepted records: each exactly once.
    let accepted: Vec<i64> = w
        .receiver
        .accepted_records_at("")
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .collect();
    assert_eq!(accepted, (1..=10).collect::<Vec<_>>());

    // The same records read again (checkpoint reset) carry the same keys.
    p.store().reset_checkpoint("p").await.expect("reset");
    w.receiver.clear();
    p.run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("rerun");
    let again = w.receiver.requests();
    assert_eq!(idempotency_key(&again[0]), first_key);
}

#[tokio::test]
async fn rejected_batches_become_dead_letters_and_replay_with_their_keys() {
    let w = World::new(15).await;
    // The batch holding record 7 is refused while `poison` is on.
    let poison = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = poison.clone();
    w.receiver.set_behaviour(Behaviour::custom(move |req| {
        let has_7 = req.json.as_ref().is_some_and(|b| ids(b).contains(&7));
        if has_7 && flag.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::status(422).body(r#"{"error":"status_id 1 is closed"}"#)
        } else {
            Reply::status(200)
        }
    }));
    let p = w.pipeline("").await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!((run.rows_delivered, run.dead_letters), (10, 5));
    let cp = run.checkpoint.expect("checkpoint").display();
    assert!(
        cp.ends_with(", 15)"),
        "the checkpoint moves past kept records: {cp}"
    );

    let letters = p
        .store()
        .dead_letters(Some("p"), Some(DeadLetterState::Pending), 0, 100)
        .await
        .expect("letters");
    let keys: Vec<Option<String>> = letters.iter().map(|l| l.record_key.clone()).collect();
    assert_eq!(
        keys,
        ["6", "7", "8", "9", "10"].map(|k| Some(k.to_string()))
    );
    let seven = &letters[1];
    assert_eq!(seven.status, Some(422));
    assert_eq!(seven.record["id"], 7);
    assert_eq!(seven.attempts, 1);
    assert!(
        seven
            .response_excerpt
            .as_deref()
            .unwrap_or("")
            .contains("is closed")
    );
    let rejected_key = idempotency_key(&w.receiver.requests()[1]);
    assert_eq!(seven.batch_key, rejected_key);

    // Replay once the receiver accepts: same key, letters marked replayed.
    poison.store(false, std::sync::atomic::Ordering::SeqCst);
    w.receiver.clear();
    let replayed = p
        .replay_dead_letters(None, &CancellationToken::new())
        .await
        .expect("replay");
    assert_eq!((replayed.delivered, replayed.rejected_again), (5, 0));
    let sent = w.receiver.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(idempotency_key(&sent[0]), rejected_key);
    assert_eq!(ids(sent[0].json.as_ref().expect("json")), [6, 7, 8, 9, 10]);
    assert_eq!(p.store().pending_dead_letters("p").await.expect("count"), 0);
}

#[tokio::test]
async fn too_large_batches_are_split_and_a_lone_oversized_record_is_kept() {
    let w = World::new(10).await;
    // More than two records is too large; record 9 is too large alone.
    w.receiver.set_behaviour(Behaviour::custom(|req| {
        let got = req.json.as_ref().map(ids).unwrap_or_default();
        if got.len() > 2 || got.contains(&9) {
            Reply::status(413)
        } else {
            Reply::status(200)
        }
    }));
    let p = w.pipeline("").await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!((run.rows_delivered, run.dead_letters), (9, 1));
    let accepted: Vec<i64> = w
        .receiver
        .accepted_records_at("")
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .collect();
    assert_eq!(
        accepted,
        [1, 2, 3, 4, 5, 6, 7, 8, 10],
        "halves in order, each once"
    );
    let mut keys_by_parent: HashMap<String, usize> = HashMap::new();
    for r in w.receiver.requests() {
        let key = idempotency_key(&r);
        let parent = key.split('.').next().unwrap_or_default().to_string();
        *keys_by_parent.entry(parent).or_default() += 1;
    }
    assert_eq!(
        keys_by_parent.len(),
        2,
        "every half's key derives from its batch's"
    );
    let letters = p
        .store()
        .dead_letters(Some("p"), None, 0, 10)
        .await
        .expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].record["id"], 9);
    assert!(
        letters[0].reason.contains("too large"),
        "{}",
        letters[0].reason
    );
}

#[tokio::test]
async fn templates_see_stable_event_ids_and_the_batch_key() {
    let w = World::new(3).await;
    let p = w
        .pipeline(
            r#"body = '{"key": "{{ batch.key }}", "events": [{% for e in events %}{"id": "{{ e.id }}", "key": "{{ e.key }}", "status": {{ e.data.status }}}{% if not loop.last %},{% endif %}{% endfor %}]}'"#,
        )
        .await;
    p.run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    let first = w.receiver.requests()[0].json.clone().expect("json");
    assert_eq!(first["key"], idempotency_key(&w.receiver.requests()[0]));
    let event_ids: Vec<String> = first["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(event_ids.len(), 3);
    assert_eq!(first["events"][1]["key"], "2");
    p.store().reset_checkpoint("p").await.expect("reset");
    w.receiver.clear();
    p.run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("rerun");
    let again = w.receiver.requests()[0].json.clone().expect("json");
    let again_ids: Vec<String> = again["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(again_ids, event_ids, "event ids are stable across reads");
}

#[tokio::test]
async fn records_failing_the_schema_are_kept_and_never_sent() {
    let w = World::new(6).await;
    let pool = w.db.sqlite_pool().await;
    sqlx::query("UPDATE requests SET status = 9 WHERE id IN (2, 5)")
        .execute(&pool)
        .await
        .expect("update");
    let schema = w.state.path().join("request.schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["id", "status"], "properties": {"status": {"type": "integer", "maximum": 4}}}"#,
    )
    .expect("schema");
    let p = w
        .pipeline_with("", &format!("schema = {:?}", schema.display().to_string()))
        .await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    assert_eq!((run.rows_delivered, run.dead_letters), (4, 2));
    let sent: Vec<i64> = w
        .receiver
        .accepted_records_at("")
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .collect();
    assert_eq!(sent, [1, 3, 4, 6], "invalid records never reach the sink");
    let letters = p
        .store()
        .dead_letters(Some("p"), None, 0, 10)
        .await
        .expect("letters");
    let keys: Vec<&str> = letters
        .iter()
        .filter_map(|l| l.record_key.as_deref())
        .collect();
    assert_eq!(keys, ["2", "5"]);
    assert!(
        letters[0].reason.contains("with key 2"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[0].reason.contains("maximum") || letters[0].reason.contains("greater than"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[0].reason.contains("/status"),
        "{}",
        letters[0].reason
    );
}

/// The circuit breaker, seen from the receiver: after `min_requests`
/// failures it opens, and no request arrives until `open_for` has passed
/// (a lower bound on a gap, which waiting guarantees; no upper bound is
/// asserted).
#[tokio::test]
async fn an_open_circuit_holds_requests_back_for_its_open_time() {
    let w = World::new(5).await;
    w.receiver.set_status(503);
    let p = w
        .pipeline(
            r#"circuit_breaker = { min_requests = 3, failure_ratio = 0.5, window = "30s", open_for = "1500ms" }
retry = { initial = "10ms", max_delay = "50ms", max_attempts = 5 }"#,
        )
        .await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Failed);
    let at: Vec<_> = w
        .receiver
        .requests()
        .iter()
        .map(|r| r.received_at)
        .collect();
    assert_eq!(at.len(), 5, "five attempts");
    let gap = at[3] - at[2];
    assert!(
        gap >= Duration::from_millis(1400),
        "the fourth attempt came {gap:?} after the third"
    );
    let early = at[2] - at[0];
    assert!(
        early < Duration::from_millis(1400),
        "the first three came close together: {early:?}"
    );
}

/// The rate limit, seen from the receiver: at 4 requests per second (a
/// burst of 4), twelve batches cannot arrive faster than in two seconds.
#[tokio::test]
async fn the_rate_limit_spaces_requests_out() {
    let w = World::new(60).await;
    let p = w
        .pipeline(r#"rate_limit = { requests_per_second = 4 }"#)
        .await;
    let run = p
        .run_once(Trigger::Manual, &CancellationToken::new(), None)
        .await
        .expect("run");
    assert_eq!(run.outcome, RunOutcome::Succeeded, "{:?}", run.error);
    let at: Vec<_> = w
        .receiver
        .requests()
        .iter()
        .map(|r| r.received_at)
        .collect();
    assert_eq!(at.len(), 12);
    let span = at[11] - at[0];
    assert!(
        span >= Duration::from_millis(1900),
        "12 requests at 4/s took only {span:?}"
    );
}
