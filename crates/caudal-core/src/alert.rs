//! The rules of one alert instance (an alert rule and one group or
//! pipeline), apart from how values are read and notifications sent.
//!
//! Promises:
//! - An instance fires once per episode: `inactive → pending → firing`
//!   when its condition held for the rule's `for` (at once with `for =
//!   0s`), and resolves once, when the condition stops holding.
//! - A firing is notified once, with a key that names the episode, so a
//!   notification sent again (a retry, a restart) is recognisable; while a
//!   silence covers the instance nothing is notified, and an episode still
//!   firing when the silence ends is notified then.
//! - A resolution is notified only for an episode whose firing was.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Where an instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Inactive,
    /// The condition holds, not yet for `for`.
    Pending,
    Firing,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::Pending => "pending",
            Self::Firing => "firing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inactive" => Some(Self::Inactive),
            "pending" => Some(Self::Pending),
            "firing" => Some(Self::Firing),
            _ => None,
        }
    }
}

/// An instance's remembered state.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub state: AlertState,
    /// Since when the condition holds (pending or firing).
    pub since: Option<Timestamp>,
    /// When the current episode fired.
    pub fired_at: Option<Timestamp>,
    /// Whether the current episode's firing was notified.
    pub notified: bool,
}

impl Default for Instance {
    fn default() -> Self {
        Self {
            state: AlertState::Inactive,
            since: None,
            fired_at: None,
            notified: false,
        }
    }
}

/// What an evaluation changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The condition started to hold.
    Pending,
    Fired,
    /// A firing episode ended.
    Resolved,
    /// The condition stopped holding before it fired.
    Cleared,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Fired => "firing",
            Self::Resolved => "resolved",
            Self::Cleared => "cleared",
        }
    }
}

/// A notification to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    Firing,
    Resolved,
}

impl Notify {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One evaluation's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub next: Instance,
    pub event: Option<Event>,
    pub notify: Option<Notify>,
    /// The episode the notification is about (its firing time).
    pub episode: Option<Timestamp>,
}

/// Evaluates an instance at `now`: whether its condition `holds`, how long
/// it must hold (`hold`), and whether a silence covers it.
pub fn step(
    prev: &Instance,
    holds: bool,
    now: Timestamp,
    hold: std::time::Duration,
    silenced: bool,
) -> Step {
    let mut next = prev.clone();
    let mut event = None;
    let mut notify = None;
    let mut episode = prev.fired_at;
    if holds {
        let since = prev.since.unwrap_or(now);
        next.since = Some(since);
        let held = now.duration_since(since).unsigned_abs();
        if prev.state == AlertState::Inactive {
            next.state = AlertState::Pending;
            event = Some(Event::Pending);
        }
        if prev.state != AlertState::Firing && held >= hold {
            next.state = AlertState::Firing;
            next.fired_at = Some(now);
            next.notified = false;
            episode = Some(now);
            event = Some(Event::Fired);
        }
        if next.state == AlertState::Firing && !next.notified && !silenced {
            next.notified = true;
            notify = Some(Notify::Firing);
        }
    } else {
        match prev.state {
            AlertState::Inactive => {}
            AlertState::Pending => event = Some(Event::Cleared),
            AlertState::Firing => {
                event = Some(Event::Resolved);
                if prev.notified {
                    notify = Some(Notify::Resolved);
                }
            }
        }
        next = Instance::default();
    }
    Step {
        next,
        event,
        notify,
        episode,
    }
}

/// Whether `value` meets a threshold: `above` (strictly) or `below`
/// (strictly). No value (a group without figures) never holds.
pub fn holds(value: Option<f64>, above: Option<f64>, below: Option<f64>) -> bool {
    match value {
        None => false,
        Some(v) => above.is_some_and(|a| v > a) || below.is_some_and(|b| v < b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn fires_once_after_holding_for_its_duration_and_resolves_once() {
        let hold = Duration::from_secs(10);
        let a = step(&Instance::default(), true, at(0), hold, false);
        assert_eq!(
            (a.next.state, a.event, a.notify),
            (AlertState::Pending, Some(Event::Pending), None)
        );
        let b = step(&a.next, true, at(5), hold, false);
        assert_eq!(
            (b.next.state, b.event, b.notify),
            (AlertState::Pending, None, None)
        );
        let c = step(&b.next, true, at(10), hold, false);
        assert_eq!(
            (c.next.state, c.event, c.notify),
            (AlertState::Firing, Some(Event::Fired), Some(Notify::Firing))
        );
        assert_eq!(c.episode, Some(at(10)));
        let d = step(&c.next, true, at(20), hold, false);
        assert_eq!((d.event, d.notify), (None, None));
        let e = step(&d.next, false, at(30), hold, false);
        assert_eq!(
            (e.next.state, e.event, e.notify),
            (
                AlertState::Inactive,
                Some(Event::Resolved),
                Some(Notify::Resolved)
            )
        );
        assert_eq!(e.episode, Some(at(10)));
        let f = step(&e.next, false, at(40), hold, false);
        assert_eq!((f.event, f.notify), (None, None));
    }

    #[test]
    fn a_blip_shorter_than_for_never_fires() {
        let hold = Duration::from_secs(60);
        let a = step(&Instance::default(), true, at(0), hold, false);
        let b = step(&a.next, false, at(30), hold, false);
        assert_eq!(
            (b.next.state, b.event, b.notify),
            (AlertState::Inactive, Some(Event::Cleared), None)
        );
    }

    #[test]
    fn silence_holds_the_notification_until_it_ends_and_swallows_the_resolution() {
        let hold = Duration::ZERO;
        let a = step(&Instance::default(), true, at(0), hold, true);
        assert_eq!((a.next.state, a.notify), (AlertState::Firing, None));
        let b = step(&a.next, true, at(10), hold, true);
        assert_eq!(b.notify, None);
        // The silence ended while it still fires: notified now, once.
        let c = step(&b.next, true, at(20), hold, false);
        assert_eq!((c.notify, c.episode), (Some(Notify::Firing), Some(at(0))));
        let d = step(&c.next, true, at(30), hold, false);
        assert_eq!(d.notify, None);
        // Fired and resolved within a silence: nothing at all.
        let e = step(&Instance::default(), true, at(0), hold, true);
        let f = step(&e.next, false, at(5), hold, true);
        assert_eq!((f.event, f.notify), (Some(Event::Resolved), None));
    }

    #[test]
    fn thresholds_are_strict_and_need_a_value() {
        assert!(holds(Some(5.0), Some(4.0), None));
        assert!(!holds(Some(4.0), Some(4.0), None));
        assert!(holds(Some(3.0), None, Some(4.0)));
        assert!(!holds(None, None, Some(4.0)));
    }
}
