//! When pipelines run: fixed intervals, cron expressions in a time zone, or
//! continuously.
//!
//! Promises:
//! - Catch-up, not backfill: after downtime a pipeline runs once, right
//!   away, and that one run reads everything since its checkpoint. Missed
//!   ticks are not replayed one by one (the checkpoint makes them pointless).
//! - Cron times are computed in the configured zone, so `0 9 * * *` is 09:00
//!   local time on both sides of a DST change. For a fixed time of day
//!   (single second, minute and hour values), a wall time skipped by a
//!   spring-forward fires right after the gap and a repeated wall time fires
//!   once. Expressions with `*` or steps in those fields follow the clock:
//!   they skip the missing hour and fire in both passes of a repeated one.
//! - Pure functions of the times given: tests pass times in, nothing sleeps.

use std::time::Duration;

use caudal_core::config::{ScheduleConfig, ScheduleSpec};
use caudal_core::{Error, ErrorKind, Result};
use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Every fixed interval, counted from the start of the previous run.
    Every(Duration),
    /// On a cron expression, in a time zone.
    Cron {
        cron: Box<Cron>,
        tz: TimeZone,
        text: String,
    },
    /// Again `poll` after each run ends.
    Continuous { poll: Duration },
}

impl Schedule {
    /// Builds a schedule from its configuration, by the rules validation
    /// checks ([`ScheduleConfig::spec`]: one cron parser, one set of
    /// rules).
    pub fn from_config(config: &ScheduleConfig) -> Result<Self> {
        Ok(
            match config
                .spec()
                .map_err(|m| Error::new(ErrorKind::Config, m))?
            {
                ScheduleSpec::Every(every) => Self::Every(every),
                ScheduleSpec::Cron { cron, tz, text } => Self::Cron { cron, tz, text },
                ScheduleSpec::Continuous { poll } => Self::Continuous { poll },
            },
        )
    }

    /// When the next run should start, given when the last run started and
    /// ended (if ever) and the current time. A time not after `now` means
    /// "run now".
    pub fn next_run(
        &self,
        last_start: Option<Timestamp>,
        last_end: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Timestamp> {
        match self {
            Self::Every(every) => Ok(match last_start {
                None => now,
                Some(start) => add(start, *every).max(now),
            }),
            Self::Continuous { poll } => Ok(match last_end.or(last_start) {
                None => now,
                Some(end) => add(end, *poll).max(now),
            }),
            Self::Cron { .. } => match last_start {
                // A tick passed since the last run (downtime): catch up now.
                Some(start) => Ok(self.next_fire_after(start)?.max(now)),
                None => self.next_fire_after(now),
            },
        }
    }

    /// The first cron fire time strictly after `t` (for `every` and
    /// `continuous`, `t` plus the interval).
    pub fn next_fire_after(&self, t: Timestamp) -> Result<Timestamp> {
        match self {
            Self::Every(d) => Ok(add(t, *d)),
            Self::Continuous { poll } => Ok(add(t, *poll)),
            Self::Cron { cron, tz, text } => {
                let zoned = t.to_zoned(tz.clone());
                cron.find_next_occurrence(&zoned, false)
                    .map(|z| z.timestamp())
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Config,
                            format!("cron {text:?} has no next time after {t}: {e}"),
                        )
                    })
            }
        }
    }

    /// A short description for `caudal status`.
    pub fn describe(&self) -> String {
        match self {
            Self::Every(d) => format!("every {}", caudal_core::units::Duration(*d)),
            Self::Cron { text, tz, .. } => {
                format!("cron {text} ({})", tz.iana_name().unwrap_or("UTC"))
            }
            Self::Continuous { poll } => {
                format!("continuous (poll {})", caudal_core::units::Duration(*poll))
            }
        }
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    let span = jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
    t.checked_add(span).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str, tz: &str) -> Schedule {
        Schedule::from_config(&ScheduleConfig {
            cron: Some(expr.into()),
            tz: Some(tz.into()),
            ..Default::default()
        })
        .expect("valid cron")
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    /// Local wall-clock time of a timestamp in a zone, for readable asserts.
    fn local(t: Timestamp, tz: &str) -> String {
        t.to_zoned(TimeZone::get(tz).expect("tz"))
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    #[test]
    fn hourly_cron_across_spring_forward_in_new_york() {
        // 2025-03-09 02:00 local does not exist in America/New_York.
        let s = cron("0 * * * *", "America/New_York");
        let mut t = ts("2025-03-09T05:30:00Z"); // 00:30 EST
        let mut fires = Vec::new();
        for _ in 0..4 {
            t = s.next_fire_after(t).expect("next");
            fires.push(local(t, "America/New_York"));
        }
        assert_eq!(
            fires,
            [
                "2025-03-09 01:00 EST",
                "2025-03-09 03:00 EDT",
                "2025-03-09 04:00 EDT",
                "2025-03-09 05:00 EDT"
            ]
        );
    }

    #[test]
    fn daily_cron_keeps_local_time_across_fall_back() {
        let s = cron("0 9 * * *", "America/New_York");
        let saturday = s.next_fire_after(ts("2025-11-01T12:00:00Z")).expect("next");
        let sunday = s.next_fire_after(saturday).expect("next");
        let monday = s.next_fire_after(sunday).expect("next");
        assert_eq!(local(saturday, "America/New_York"), "2025-11-01 09:00 EDT");
        assert_eq!(local(sunday, "America/New_York"), "2025-11-02 09:00 EST");
        assert_eq!(local(monday, "America/New_York"), "2025-11-03 09:00 EST");
        // 09:00 local both days: 25 hours apart in absolute time.
        assert_eq!(saturday, ts("2025-11-01T13:00:00Z"));
        assert_eq!(sunday, ts("2025-11-02T14:00:00Z"));
    }

    #[test]
    fn repeated_wall_hour_fires_once_at_fall_back() {
        // 01:30 happens twice on 2025-11-02 in New York; fire once.
        let s = cron("30 1 * * *", "America/New_York");
        let first = s.next_fire_after(ts("2025-11-02T04:00:00Z")).expect("next");
        let second = s.next_fire_after(first).expect("next");
        assert_eq!(local(first, "America/New_York"), "2025-11-02 01:30 EDT");
        assert_eq!(local(second, "America/New_York"), "2025-11-03 01:30 EST");
    }

    #[test]
    fn mexico_city_last_dst_change_and_after_abolition() {
        // Mexico City left DST on 2022-10-30 (02:00 CDT -> 01:00 CST) and
        // has had none since.
        let s = cron("0 * * * *", "America/Mexico_City");
        let mut t = ts("2022-10-30T05:30:00Z"); // 00:30 CDT
        let mut utc = Vec::new();
        for _ in 0..3 {
            t = s.next_fire_after(t).expect("next");
            utc.push(t.to_string());
        }
        assert_eq!(
            utc,
            [
                "2022-10-30T06:00:00Z",
                "2022-10-30T07:00:00Z",
                "2022-10-30T08:00:00Z"
            ]
        );
        let daily = cron("0 6 * * *", "America/Mexico_City");
        let spring_2023 = daily
            .next_fire_after(ts("2023-04-02T00:00:00Z"))
            .expect("next");
        assert_eq!(
            spring_2023,
            ts("2023-04-02T12:00:00Z"),
            "06:00 CST = 12:00 UTC, no DST"
        );
    }

    #[test]
    fn catch_up_runs_once_after_downtime() {
        let hourly = Schedule::from_config(&ScheduleConfig {
            every: Some("1h".parse().expect("d")),
            ..Default::default()
        })
        .expect("every");
        let now = ts("2025-05-14T12:00:00Z");
        // Last run five hours ago: run now, once.
        let last = ts("2025-05-14T07:00:00Z");
        assert_eq!(
            hourly.next_run(Some(last), Some(last), now).expect("n"),
            now
        );
        // Last run 20 minutes ago: wait 40 minutes.
        let recent = ts("2025-05-14T11:40:00Z");
        assert_eq!(
            hourly.next_run(Some(recent), Some(recent), now).expect("n"),
            ts("2025-05-14T12:40:00Z")
        );
        // Never ran: run now.
        assert_eq!(hourly.next_run(None, None, now).expect("n"), now);

        let c = cron("0 * * * *", "UTC");
        assert_eq!(c.next_run(Some(last), Some(last), now).expect("n"), now);
        assert_eq!(
            c.next_run(None, None, now).expect("n"),
            ts("2025-05-14T13:00:00Z"),
            "a new cron pipeline waits for its first tick"
        );
        assert_eq!(
            c.next_run(
                Some(ts("2025-05-14T12:00:00Z")),
                None,
                ts("2025-05-14T12:10:00Z")
            )
            .expect("n"),
            ts("2025-05-14T13:00:00Z")
        );
    }

    #[test]
    fn continuous_polls_after_each_run_ends() {
        let s = Schedule::from_config(&ScheduleConfig {
            continuous: true,
            poll: Some("2s".parse().expect("d")),
            ..Default::default()
        })
        .expect("continuous");
        let end = ts("2025-05-14T12:00:00Z");
        assert_eq!(
            s.next_run(Some(end), Some(end), end).expect("n"),
            ts("2025-05-14T12:00:02Z")
        );
    }
}
