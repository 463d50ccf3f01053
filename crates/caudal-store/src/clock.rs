//! How the store represents time: microseconds since the Unix epoch (UTC) in
//! an integer column, read from the database's `clock` view. These functions
//! convert at the edge; nothing else in the crate does arithmetic on time.

use std::time::Duration;

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

/// The longest lease or interval the store accepts; longer durations are
/// clamped to it so that `now + ttl` cannot overflow a 64-bit column.
const MAX_DURATION_US: i64 = 100 * 366 * 24 * 60 * 60 * 1_000_000;

/// Reads a stored instant.
pub(crate) fn from_db(microseconds: i64, column: &str) -> Result<Timestamp> {
    Timestamp::from_microsecond(microseconds).map_err(|e| {
        Error::with_source(
            ErrorKind::Store,
            format!("state store: column `{column}` holds an invalid instant ({microseconds} µs)"),
            e,
        )
    })
}

/// The stored form of an instant (sub-microsecond precision is dropped).
pub(crate) fn to_db(timestamp: Timestamp) -> i64 {
    timestamp.as_microsecond()
}

/// A duration in microseconds, clamped to [`MAX_DURATION_US`].
pub(crate) fn duration_to_db(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).map_or(MAX_DURATION_US, |us| us.min(MAX_DURATION_US))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped_instead_of_overflowing() {
        assert_eq!(duration_to_db(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(duration_to_db(Duration::MAX), MAX_DURATION_US);
        assert_eq!(
            duration_to_db(Duration::from_secs(200 * 366 * 24 * 3600)),
            MAX_DURATION_US
        );
    }

    #[test]
    fn instants_round_trip_and_bad_ones_are_errors() {
        let ts = Timestamp::from_microsecond(1_700_000_000_123_456).expect("valid instant");
        assert_eq!(from_db(to_db(ts), "at").expect("round trip"), ts);
        let err = from_db(i64::MAX, "at").expect_err("out of range");
        assert_eq!(err.kind(), ErrorKind::Store);
    }
}
