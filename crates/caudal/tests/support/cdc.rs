//! What the CDC tests share: the changes a receiver accepted (each batch
//! once), their replay onto an empty copy of the source tables, the check
//! that the server can do CDC, and dropping a test's slot.

use std::collections::BTreeMap;
use std::time::Duration;

use caudal_testkit::{Receiver, TestDb};
use serde_json::{Map, Value, json};

/// Fails loudly, saying how to fix it, when the server cannot do CDC.
pub async fn check_logical(db: &TestDb) {
    let pool = db.pg_pool().await;
    let (level,): (String,) = sqlx::query_as("SELECT current_setting('wal_level')")
        .fetch_one(&pool)
        .await
        .expect("read wal_level");
    pool.close().await;
    assert_eq!(
        level, "logical",
        "the PostgreSQL server of CAUDAL_TEST_PG_URL has wal_level = {level}; CDC needs \
         logical: scripts/test sets it (ALTER SYSTEM SET wal_level = logical, then restart)"
    );
}

/// Drops the replication slot `slot` of the database at `url`, stopping
/// its walsender first (a terminated walsender may hold it a moment).
pub async fn drop_slot(url: &str, slot: &str) {
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        eprintln!("cannot connect to drop slot {slot}");
        return;
    };
    for _ in 0..50 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(slot)
        .execute(&pool)
        .await;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(&pool)
        .await;
        if dropped.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
}

/// Where the test configs put the records in a request body.
pub const CHANGES: &str = "/changes";

/// The accepted changes, each batch once: a request whose idempotency key
/// was seen before must carry the same records, and is skipped.
pub fn accepted_changes(receiver: &Receiver) -> Vec<Value> {
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in receiver.requests() {
        if !r.accepted() {
            continue;
        }
        let key = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .expect("an Idempotency-Key header")
            .to_string();
        let records = r.records_at(CHANGES);
        match seen.get(&key) {
            Some(before) => assert_eq!(
                before, &records,
                "idempotency key {key} was sent with different records"
            ),
            None => {
                out.extend(records.iter().cloned());
                seen.insert(key, records);
            }
        }
    }
    out
}

/// table → key → row.
pub type Tables = BTreeMap<String, BTreeMap<String, Map<String, Value>>>;

/// Applies changes in order to an empty copy: `read`/`insert` store the
/// row, `update` merges `after` (keeping the `unchanged` columns) and moves
/// the row when its key changed, `delete` removes it, `truncate` empties
/// the table.
pub fn apply(changes: &[Value]) -> Tables {
    let mut out = Tables::new();
    for c in changes {
        let table = c["table"].as_str().expect("a table").to_string();
        let rows = out.entry(table).or_default();
        let key = |v: &Value| -> String {
            let obj = c["key"].as_object().expect("a key object");
            let values: Vec<&Value> = obj.keys().map(|k| &v[k.as_str()]).collect();
            json!(values).to_string()
        };
        match c["op"].as_str().expect("an op") {
            "read" | "insert" => {
                let after = c["after"].as_object().expect("after").clone();
                rows.insert(key(&c["after"]), after);
            }
            "update" => {
                let after = c["after"].as_object().expect("after").clone();
                let mut row = Map::new();
                let old_key = if c["before"].is_object() {
                    key(&c["before"])
                } else {
                    key(&c["after"])
                };
                let old = rows
                    .remove(&old_key)
                    .or_else(|| rows.remove(&key(&c["after"])));
                for col in c["unchanged"].as_array().expect("unchanged") {
                    let col = col.as_str().expect("a column name");
                    let value = old.as_ref().and_then(|o| o.get(col)).unwrap_or_else(|| {
                        panic!("unchanged column {col} of a row never seen: {c}")
                    });
                    row.insert(col.to_string(), value.clone());
                }
                row.extend(after);
                rows.insert(key(&c["after"]), row);
            }
            "delete" => {
                rows.remove(&key(&c["before"]));
            }
            "truncate" => rows.clear(),
            other => panic!("unknown op {other}: {c}"),
        }
    }
    out.retain(|_, rows| !rows.is_empty());
    normalise(out)
}

/// Sorts every row's columns: with serde_json's `preserve_order`, maps
/// compare in order, and the column order is not what is under test.
pub fn normalise(mut t: Tables) -> Tables {
    for rows in t.values_mut() {
        for row in rows.values_mut() {
            let sorted: BTreeMap<String, Value> = std::mem::take(row).into_iter().collect();
            row.extend(sorted);
        }
    }
    t
}

pub fn difference(want: &Tables, got: &Tables) -> String {
    let mut out = Vec::new();
    for (table, rows) in want {
        let other = got.get(table);
        for (k, row) in rows {
            match other.and_then(|o| o.get(k)) {
                None => out.push(format!("{table} {k}: missing (want {row:?})")),
                Some(g) if g != row => out.push(format!("{table} {k}: got {g:?}, want {row:?}")),
                _ => {}
            }
        }
    }
    for (table, rows) in got {
        for k in rows.keys() {
            if want.get(table).is_none_or(|w| !w.contains_key(k)) {
                out.push(format!("{table} {k}: present but deleted at the source"));
            }
        }
    }
    out.truncate(10);
    out.join("\n")
}
