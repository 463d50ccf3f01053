//! Splitting a batch the receiver found too large (413).

/// Splits a batch into two halves, in order: the first half holds the
/// earlier items (the larger half when the count is odd). Deliver the first
/// half completely before the second so records with the same key keep
/// their order.
///
/// Returns `None` for a single item (or none): it cannot get smaller, so it
/// goes to dead letters as too large.
pub fn split_batch<T>(mut items: Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    if items.len() < 2 {
        return None;
    }
    let back = items.split_off(items.len().div_ceil(2));
    Some((items, back))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn one_item_cannot_be_split() {
        assert_eq!(split_batch(vec![1]), None);
        assert_eq!(split_batch(Vec::<u8>::new()), None);
    }

    #[test]
    fn halves_keep_order() {
        assert_eq!(split_batch(vec![1, 2]), Some((vec![1], vec![2])));
        assert_eq!(split_batch(vec![1, 2, 3]), Some((vec![1, 2], vec![3])));
        assert_eq!(
            split_batch(vec![1, 2, 3, 4]),
            Some((vec![1, 2], vec![3, 4]))
        );
    }

    proptest! {
        #[test]
        fn halves_are_non_empty_and_concatenate_to_the_batch(items in prop::collection::vec(any::<u32>(), 2..200)) {
            let (front, back) = split_batch(items.clone()).expect("two or more items split");
            prop_assert!(!front.is_empty() && !back.is_empty());
            prop_assert!(front.len() >= back.len() && front.len() - back.len() <= 1);
            let joined: Vec<u32> = front.into_iter().chain(back).collect();
            prop_assert_eq!(joined, items);
        }
    }
}
