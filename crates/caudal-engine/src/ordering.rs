//! Order per key under concurrency: which buffered batches may be sent now.
//!
//! Batches are offered in buffer order. A batch may go when none of its keys
//! belongs to a batch still in flight (sending or waiting to retry) or to an
//! earlier batch still waiting: so records with the same key reach the sink
//! in source order, across retries, while batches that share no key with a
//! stuck one go ahead. A stuck key holds back only the batches that contain
//! it.
//!
//! A key may name a scope: `table[1]` is the row with key 1 of `table`, and
//! the key `table` (a truncate of the table) orders against every row of
//! it, in both directions.
//!
//! Acknowledgement is separate: batches complete out of order, and the
//! buffer may only be acknowledged up to the first batch not yet complete
//! (the [`Watermark`]).

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Decides which waiting batches may be dispatched.
#[derive(Debug, Default)]
pub struct KeyGate {
    waiting: VecDeque<(u64, Vec<String>)>,
    busy: HashMap<String, usize>,
    /// Keys in flight per scope (`table` of `table[1]`).
    busy_scopes: HashMap<String, usize>,
}

/// The scope of a key: `table` of `table[1]`.
fn scope(key: &str) -> Option<&str> {
    key.find('[').filter(|&i| i > 0).map(|i| &key[..i])
}

impl KeyGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers a batch (in buffer order) with the distinct keys it carries.
    /// A batch with no keys is unordered and may go at any time.
    pub fn offer(&mut self, offset: u64, mut keys: Vec<String>) {
        keys.sort_unstable();
        keys.dedup();
        self.waiting.push_back((offset, keys));
    }

    /// Takes the first waiting batch that may go now, marking its keys busy.
    pub fn next_ready(&mut self) -> Option<u64> {
        let mut held: Vec<&str> = Vec::new();
        let mut held_scopes: Vec<&str> = Vec::new();
        let mut found = None;
        for (i, (_, keys)) in self.waiting.iter().enumerate() {
            let blocked = keys.iter().any(|k| {
                let k = k.as_str();
                if self.busy.contains_key(k) || held.contains(&k) {
                    return true;
                }
                match scope(k) {
                    // A row waits for a truncate of its table.
                    Some(s) => self.busy.contains_key(s) || held.contains(&s),
                    // A truncate waits for every row of its table.
                    None => self.busy_scopes.contains_key(k) || held_scopes.contains(&k),
                }
            });
            if !blocked {
                found = Some(i);
                break;
            }
            held.extend(keys.iter().map(String::as_str));
            held_scopes.extend(keys.iter().filter_map(|k| scope(k)));
        }
        let (offset, keys) = self.waiting.remove(found?)?;
        for k in keys {
            if let Some(s) = scope(&k) {
                *self.busy_scopes.entry(s.to_string()).or_default() += 1;
            }
            *self.busy.entry(k).or_default() += 1;
        }
        Some(offset)
    }

    /// Releases the keys of a dispatched batch once it is finished
    /// (delivered, or put aside as dead letters).
    pub fn finished(&mut self, keys: &[String]) {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        for k in keys {
            if let Some(n) = self.busy.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&k);
                }
                if let Some(s) = scope(&k)
                    && let Some(n) = self.busy_scopes.get_mut(s)
                {
                    *n -= 1;
                    if *n == 0 {
                        self.busy_scopes.remove(s);
                    }
                }
            }
        }
    }

    /// Batches offered but not yet dispatched.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The lowest offset not yet finished: everything below it may be
/// acknowledged.
#[derive(Debug)]
pub struct Watermark {
    next: u64,
    finished: BTreeSet<u64>,
}

impl Watermark {
    /// Starts at `next`, the first offset to be finished.
    pub fn new(next: u64) -> Self {
        Self {
            next,
            finished: BTreeSet::new(),
        }
    }

    /// Marks `offset` finished; returns the new watermark if it moved.
    pub fn finish(&mut self, offset: u64) -> Option<u64> {
        if offset < self.next {
            return None;
        }
        self.finished.insert(offset);
        let before = self.next;
        while self.finished.remove(&self.next) {
            self.next += 1;
        }
        (self.next != before).then_some(self.next)
    }

    pub fn get(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(ks: &[&str]) -> Vec<String> {
        ks.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stuck_key_holds_back_only_batches_that_contain_it() {
        let mut g = KeyGate::new();
        g.offer(0, keys(&["a"]));
        g.offer(1, keys(&["a", "b"]));
        g.offer(2, keys(&["b"]));
        g.offer(3, keys(&["c"]));
        assert_eq!(g.next_ready(), Some(0));
        // 1 waits for a; 2 waits behind 1 for b; 3 goes ahead.
        assert_eq!(g.next_ready(), Some(3));
        assert_eq!(g.next_ready(), None);
        g.finished(&keys(&["a"]));
        assert_eq!(g.next_ready(), Some(1));
        assert_eq!(g.next_ready(), None);
        g.finished(&keys(&["a", "b"]));
        assert_eq!(g.next_ready(), Some(2));
    }

    #[test]
    fn a_table_key_orders_against_every_row_of_the_table() {
        let mut gate = KeyGate::new();
        gate.offer(0, keys(&["t[1]"]));
        gate.offer(1, keys(&["t"]));
        gate.offer(2, keys(&["t[2]"]));
        gate.offer(3, keys(&["u[1]"]));
        assert_eq!(gate.next_ready(), Some(0));
        // The truncate waits for row 1; row 2 waits for the truncate; the
        // other table goes on.
        assert_eq!(gate.next_ready(), Some(3));
        assert_eq!(gate.next_ready(), None);
        gate.finished(&keys(&["t[1]"]));
        assert_eq!(gate.next_ready(), Some(1));
        assert_eq!(gate.next_ready(), None);
        gate.finished(&keys(&["t"]));
        assert_eq!(gate.next_ready(), Some(2));
    }

    #[test]
    fn watermark_moves_over_contiguous_finished_offsets() {
        let mut w = Watermark::new(10);
        assert_eq!(w.finish(12), None);
        assert_eq!(w.finish(10), Some(11));
        assert_eq!(w.finish(11), Some(13));
        assert_eq!(w.finish(5), None);
        assert_eq!(w.get(), 13);
    }

    proptest! {
        /// Whatever order in-flight batches finish in (a random failure and
        /// retry schedule), every key sees its batches dispatched in offer
        /// order, and every batch is dispatched exactly once.
        #[test]
        fn per_key_order_holds_under_any_completion_order(
            batches in proptest::collection::vec(proptest::collection::vec(0u8..6, 0..4), 1..60),
            choices in proptest::collection::vec(any::<u16>(), 200),
            concurrency in 1usize..6,
        ) {
            let mut g = KeyGate::new();
            let batch_keys: Vec<Vec<String>> = batches
                .iter()
                .map(|ks| ks.iter().map(|k| format!("k{k}")).collect())
                .collect();
            for (i, ks) in batch_keys.iter().enumerate() {
                g.offer(i as u64, ks.clone());
            }
            let mut in_flight: Vec<u64> = Vec::new();
            let mut delivered: Vec<u64> = Vec::new();
            let mut choice = choices.iter().cycle();
            while delivered.len() < batch_keys.len() {
                while in_flight.len() < concurrency {
                    match g.next_ready() {
                        Some(o) => in_flight.push(o),
                        None => break,
                    }
                }
                prop_assert!(!in_flight.is_empty(), "deadlock");
                // Finish a random in-flight batch (the others keep retrying).
                let pick = usize::from(*choice.next().unwrap_or(&0)) % in_flight.len();
                let done = in_flight.swap_remove(pick);
                g.finished(&batch_keys[done as usize]);
                delivered.push(done);
            }
            let mut sorted = delivered.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..batch_keys.len() as u64).collect::<Vec<_>>());
            // Per key: delivery order equals offer order.
            for k in 0u8..6 {
                let key = format!("k{k}");
                let order: Vec<u64> = delivered
                    .iter()
                    .copied()
                    .filter(|o| batch_keys[*o as usize].contains(&key))
                    .collect();
                let mut expected = order.clone();
                expected.sort_unstable();
                prop_assert_eq!(order, expected, "key {}", key);
            }
        }
    }
}
