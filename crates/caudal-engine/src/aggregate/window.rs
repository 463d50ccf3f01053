//! Which windows an event time falls in, aligned to midnight in the
//! aggregate's time zone, and how event times are read from rows.
//!
//! - A window shorter than a day starts at a multiple of its hop of local
//!   (civil) time after midnight: `06:00–12:00` is that on the clock on a
//!   day the clocks change too (a window the clocks skip is empty, one they
//!   repeat is longer); a tumbling one ends at the next midnight at the
//!   latest.
//! - A window of whole days starts at a local midnight (days counted from
//!   1970-01-01 in multiples of the hop) and ends at the local midnight
//!   that many days later, whatever the day's length.
//! - Times are microseconds since the Unix epoch throughout.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};
use serde_json::Value;

const DAY_SECS: u64 = 86_400;
const MICROS: i64 = 1_000_000;

/// The windows of an aggregate.
#[derive(Clone, Debug)]
pub struct Windows {
    size: i64,
    hop: i64,
    tz: TimeZone,
}

impl Windows {
    /// Windows of `size` seconds starting every `hop` seconds (checked by
    /// the configuration: below a day they divide it, else whole days).
    pub fn new(size: u64, hop: u64, tz: TimeZone) -> Self {
        Self {
            size: i64::try_from(size).unwrap_or(i64::MAX / MICROS),
            hop: i64::try_from(hop).unwrap_or(i64::MAX / MICROS),
            tz,
        }
    }

    pub fn size_us(&self) -> i64 {
        self.size.saturating_mul(MICROS)
    }

    pub fn hop_us(&self) -> i64 {
        self.hop.saturating_mul(MICROS)
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    fn days(&self) -> bool {
        self.size as u64 >= DAY_SECS && (self.size as u64).is_multiple_of(DAY_SECS)
    }

    /// The windows `(start, end)` holding instant `t`, oldest first; empty
    /// for an instant jiff cannot place.
    pub fn of(&self, t: i64) -> Vec<(i64, i64)> {
        self.windows(t).unwrap_or_default()
    }

    fn windows(&self, t: i64) -> Option<Vec<(i64, i64)>> {
        let at = Timestamp::from_microsecond(t).ok()?;
        let local = at.to_zoned(self.tz.clone());
        let date = local.date();
        let count = (self.size / self.hop).max(1);
        let mut out = Vec::with_capacity(count as usize);
        if self.days() {
            let (size_days, hop_days) = (self.size / DAY_SECS as i64, self.hop / DAY_SECS as i64);
            let day = i64::from(date.since(Date::constant(1970, 1, 1)).ok()?.get_days());
            let first = day - day.rem_euclid(hop_days.max(1));
            for j in (0..count).rev() {
                let start_day = first - j * hop_days;
                let start = self.midnight(start_day)?;
                let end = self.midnight(start_day + size_days)?;
                if start <= t && t < end {
                    out.push((start, end));
                }
            }
            return Some(out);
        }
        // Civil time: a window of 06:00–12:00 is that in local time on a
        // day the clocks change too.
        let midnight = date.to_datetime(jiff::civil::Time::midnight());
        let next_midnight = self.instant(
            date.tomorrow()
                .ok()?
                .to_datetime(jiff::civil::Time::midnight()),
        )?;
        let seconds = i64::from(local.time().hour()) * 3600
            + i64::from(local.time().minute()) * 60
            + i64::from(local.time().second());
        let first = seconds / self.hop * self.hop;
        for j in (0..count).rev() {
            let start_civil = midnight
                .checked_add(jiff::SignedDuration::from_secs(first - j * self.hop))
                .ok()?;
            let end_civil = start_civil
                .checked_add(jiff::SignedDuration::from_secs(self.size))
                .ok()?;
            let start = self.instant(start_civil)?;
            let mut end = self.instant(end_civil)?;
            if self.size == self.hop {
                end = end.min(next_midnight);
            }
            if start <= t && t < end {
                out.push((start, end));
            }
        }
        Some(out)
    }

    fn instant(&self, civil: DateTime) -> Option<i64> {
        Some(
            civil
                .to_zoned(self.tz.clone())
                .ok()?
                .timestamp()
                .as_microsecond(),
        )
    }

    /// The local midnight `day` days after 1970-01-01, in microseconds.
    fn midnight(&self, day: i64) -> Option<i64> {
        let date = Date::constant(1970, 1, 1).checked_add(day.days()).ok()?;
        Some(
            date.to_zoned(self.tz.clone())
                .ok()?
                .timestamp()
                .as_microsecond(),
        )
    }
}

/// Reads an event time: RFC 3339 text (with an offset or `Z`), a date-time
/// without one (`2025-05-14 12:00:00`, `2025-05-14T12:00:00.5`) read in
/// `tz`, a date (its local midnight), or a number of seconds since the
/// epoch.
pub fn parse_time(value: &Value, tz: &TimeZone) -> Option<i64> {
    match value {
        Value::String(s) => {
            if let Ok(ts) = s.parse::<Timestamp>() {
                return Some(ts.as_microsecond());
            }
            if let Ok(dt) = s.parse::<DateTime>() {
                return Some(dt.to_zoned(tz.clone()).ok()?.timestamp().as_microsecond());
            }
            let date = s.parse::<Date>().ok()?;
            Some(date.to_zoned(tz.clone()).ok()?.timestamp().as_microsecond())
        }
        Value::Number(n) => {
            let secs = n.as_f64()?;
            let micros = (secs * 1e6).round();
            (micros.is_finite() && micros.abs() < 9.0e18).then_some(micros as i64)
        }
        _ => None,
    }
}

/// An instant as RFC 3339 in UTC.
pub fn format_time(t: i64) -> String {
    Timestamp::from_microsecond(t).map_or_else(|_| t.to_string(), |ts| ts.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_microsecond()
    }

    #[test]
    fn minutes_tumble_and_hours_hop() {
        let w = Windows::new(60, 60, TimeZone::UTC);
        assert_eq!(
            w.of(at("2025-05-14T12:00:59.9Z")),
            vec![(at("2025-05-14T12:00:00Z"), at("2025-05-14T12:01:00Z"))]
        );
        let h = Windows::new(3600, 900, TimeZone::UTC);
        let got = h.of(at("2025-05-14T00:10:00Z"));
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0],
            (at("2025-05-13T23:15:00Z"), at("2025-05-14T00:15:00Z"))
        );
        assert_eq!(
            got[3],
            (at("2025-05-14T00:00:00Z"), at("2025-05-14T01:00:00Z"))
        );
    }

    #[test]
    fn days_start_at_local_midnight() {
        let tz = TimeZone::get("America/Mexico_City").unwrap();
        let d = Windows::new(86_400, 86_400, tz.clone());
        // 05:30 UTC is 23:30 of the day before in Mexico City (UTC-6).
        assert_eq!(
            d.of(at("2025-05-15T05:30:00Z")),
            vec![(at("2025-05-14T06:00:00Z"), at("2025-05-15T06:00:00Z"))]
        );
        let h = Windows::new(3600, 3600, tz);
        assert_eq!(
            h.of(at("2025-05-15T06:00:00Z")),
            vec![(at("2025-05-15T06:00:00Z"), at("2025-05-15T07:00:00Z"))]
        );
    }

    #[test]
    fn a_short_day_ends_its_last_window_at_midnight() {
        // Madrid moves to summer time on 2025-03-30: a 23-hour day.
        let tz = TimeZone::get("Europe/Madrid").unwrap();
        let w = Windows::new(6 * 3600, 6 * 3600, tz.clone());
        let last = w.of(at("2025-03-30T21:30:00Z"));
        assert_eq!(
            last,
            vec![(at("2025-03-30T16:00:00Z"), at("2025-03-30T22:00:00Z"))]
        );
        let days = Windows::new(86_400, 86_400, tz);
        let (start, end) = days.of(at("2025-03-30T12:00:00Z"))[0];
        assert_eq!(end - start, 23 * 3600 * MICROS);
    }

    #[test]
    fn event_times_read_every_usual_spelling() {
        let tz = TimeZone::get("America/Mexico_City").unwrap();
        assert_eq!(
            parse_time(&json!("2025-05-14T12:00:00Z"), &tz),
            Some(at("2025-05-14T12:00:00Z"))
        );
        assert_eq!(
            parse_time(&json!("2025-05-14 12:00:00"), &tz),
            Some(at("2025-05-14T18:00:00Z"))
        );
        assert_eq!(
            parse_time(&json!("2025-05-14"), &tz),
            Some(at("2025-05-14T06:00:00Z"))
        );
        assert_eq!(
            parse_time(&json!(1_747_224_000), &tz),
            Some(at("2025-05-14T12:00:00Z"))
        );
        assert_eq!(parse_time(&json!("soon"), &tz), None);
        assert_eq!(parse_time(&json!(null), &tz), None);
    }
}
