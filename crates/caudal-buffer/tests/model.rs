//! Property test: random batches, acknowledgements, reads and reopens
//! against a model (a plain vector of everything appended). Reads must
//! return exactly what was appended, in order, whatever the segment layout.

// clippy.toml's allow-unwrap-in-tests covers #[test] bodies only; the
// helpers of this test crate fail loudly the same way.
#![allow(clippy::unwrap_used)]

use caudal_buffer::{Buffer, BufferConfig, RECORD_HEADER_BYTES};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<Vec<u8>>),
    /// Acknowledge this fraction (in 1/256) of the unacknowledged entries.
    Ack(u8),
    /// Read from this fraction of the unacknowledged range, at most `max`.
    Read(u8, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..700), 1..40).prop_map(Op::Append),
        2 => any::<u8>().prop_map(Op::Ack),
        3 => (any::<u8>(), 1usize..80).prop_map(|(at, max)| Op::Read(at, max)),
        1 => Just(Op::Reopen),
    ]
}

fn config() -> BufferConfig {
    BufferConfig {
        // The minimum: many rollovers and deletions per case.
        segment_bytes: 4096,
        ..BufferConfig::default()
    }
}

async fn check_read(buffer: &Buffer, model: &[Vec<u8>], from: u64, max: usize) {
    let got = buffer.read(from, max).await.unwrap();
    let expected_len = max.min(model.len() - from as usize);
    assert_eq!(got.len(), expected_len, "read({from}, {max})");
    for (i, (offset, entry)) in got.into_iter().enumerate() {
        assert_eq!(offset, from + i as u64);
        assert_eq!(entry, model[offset as usize], "entry {offset}");
    }
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (mut buffer, _) = Buffer::open(dir.path(), config()).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut acked = 0u64;
        for op in ops {
            match op {
                Op::Append(entries) => {
                    let range = buffer.append(&entries).await.unwrap();
                    assert_eq!(range.start, model.len() as u64);
                    model.extend(entries);
                    assert_eq!(range.end, model.len() as u64);
                }
                Op::Ack(fraction) => {
                    let unacked = model.len() as u64 - acked;
                    acked += unacked * u64::from(fraction) / 255;
                    buffer.ack(acked).await.unwrap();
                }
                Op::Read(at, max) => {
                    let unacked = model.len() as u64 - acked;
                    if unacked > 0 {
                        let from = acked + (unacked - 1) * u64::from(at) / 255;
                        check_read(&buffer, &model, from, max).await;
                    }
                }
                Op::Reopen => {
                    drop(buffer);
                    let (reopened, recovery) = Buffer::open(dir.path(), config()).unwrap();
                    assert_eq!(recovery.next_offset, model.len() as u64);
                    assert_eq!(recovery.acked, acked);
                    assert_eq!(recovery.torn_bytes, 0);
                    buffer = reopened;
                }
            }
            let stats = buffer.stats();
            assert_eq!(stats.acked, acked);
            assert_eq!(stats.next_offset, model.len() as u64);
            let unacked_bytes: u64 = model[acked as usize..]
                .iter()
                .map(|e| RECORD_HEADER_BYTES + e.len() as u64)
                .sum();
            assert_eq!(stats.unacked_bytes, unacked_bytes);
        }
        // Everything not acknowledged reads back, in one pass.
        let mut from = acked;
        while from < model.len() as u64 {
            check_read(&buffer, &model, from, 64).await;
            from = (from + 64).min(model.len() as u64);
        }
        drop(buffer);
        let report = caudal_buffer::fsck(dir.path()).unwrap();
        assert!(report.is_clean(), "{report}");
    });
}

proptest! {
    // Each case does real fsyncs; 64 cases of up to 30 operations keep the
    // test to a few seconds.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn reads_return_exactly_what_was_appended(ops in prop::collection::vec(op(), 1..30)) {
        run(ops);
    }
}
