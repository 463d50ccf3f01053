//! Cutting a stream of records into batches by count and approximate size.

use caudal_core::config::BatchConfig;
use caudal_core::record::Record;

/// Accumulates records until a batch is full.
#[derive(Debug)]
pub struct Batcher {
    max_records: usize,
    max_bytes: u64,
    records: Vec<Record>,
    bytes: u64,
}

impl Batcher {
    pub fn new(config: BatchConfig) -> Self {
        Self {
            max_records: config.max_records.max(1),
            max_bytes: config.max_bytes.0.max(1),
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a record; returns a full batch when this record completes one.
    /// A single record larger than `max_bytes` still travels, alone.
    pub fn push(&mut self, record: Record) -> Option<Vec<Record>> {
        let size = record.data.len() as u64 + 1;
        let mut out = None;
        if !self.records.is_empty() && self.bytes + size > self.max_bytes {
            out = Some(self.take());
        }
        self.bytes += size;
        self.records.push(record);
        if self.records.len() >= self.max_records || self.bytes >= self.max_bytes {
            // Two full batches cannot both be pending: the first was taken above.
            if out.is_none() {
                out = Some(self.take());
            }
        }
        out
    }

    /// Takes whatever is pending (possibly nothing).
    pub fn take(&mut self) -> Vec<Record> {
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caudal_core::record::{CursorValue, Json, Position};
    use proptest::prelude::*;
    use serde_json::Value;

    fn record(i: i64, payload: usize) -> Record {
        let mut data = serde_json::Map::new();
        data.insert("id".into(), Value::from(i));
        data.insert("p".into(), Value::String("x".repeat(payload)));
        Record {
            data: Json::from_map(&data),
            position: Position::Cursor {
                values: vec![CursorValue::Int(i)],
            },
            key: None,
        }
    }

    proptest! {
        /// Batching never loses, duplicates or reorders a record, and
        /// respects the count limit.
        #[test]
        fn batches_keep_every_record_in_order(
            sizes in proptest::collection::vec(0usize..300, 0..400),
            max_records in 1usize..50,
            max_bytes in 16u64..4000,
        ) {
            let mut b = Batcher::new(BatchConfig {
                max_records,
                max_bytes: caudal_core::units::ByteSize(max_bytes),
                max_wait: caudal_core::units::Duration::from_secs(1),
            });
            let mut out: Vec<Vec<Record>> = Vec::new();
            for (i, s) in sizes.iter().enumerate() {
                if let Some(full) = b.push(record(i as i64, *s)) {
                    out.push(full);
                }
            }
            out.push(b.take());
            let ids: Vec<i64> = out.iter().flatten().map(|r| r.data.field("id").and_then(|v| v.as_i64()).unwrap_or(-1)).collect();
            prop_assert_eq!(ids, (0..sizes.len() as i64).collect::<Vec<_>>());
            for batch in &out {
                prop_assert!(batch.len() <= max_records);
                if batch.len() > 1 {
                    let bytes: u64 = batch.iter().map(|r| 1 + r.data.len() as u64).sum();
                    let without_last = bytes - (1 + batch[batch.len() - 1].data.len() as u64);
                    prop_assert!(without_last < max_bytes);
                }
            }
        }
    }
}
