//! Findings of a probe: what a connector found when asked whether it can
//! work (`caudal doctor`), without moving any data.
//!
//! Promises:
//! - A finding that is not [`Status::Ok`] says what to change in `fix`,
//!   as a command or a setting where one is known.
//! - Findings never carry a secret: URLs are redacted, tokens and
//!   passwords are never printed.

use serde::Serialize;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It works.
    Ok,
    /// Not checked: this kind of connector has no probe, or an earlier
    /// check failed and this one depends on it.
    Skipped,
    /// It works, but something will hurt later (a setting to change, a
    /// limit close to be reached).
    Warn,
    /// It does not work: a run would fail.
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Skipped => "skipped",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked, in a word or two (`connect`, `read`, `wal_level`).
    pub check: String,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to change, when the status is not ok.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, found: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Ok,
            found: found.into(),
            fix: None,
        }
    }

    pub fn warn(
        check: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            status: Status::Warn,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(
        check: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            status: Status::Fail,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skipped(check: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Skipped,
            found: why.into(),
            fix: None,
        }
    }

    /// Whether a run would fail.
    pub fn failed(&self) -> bool {
        self.status == Status::Fail
    }

    /// The text of a failure as an error message: what was found, then
    /// what to change.
    pub fn message(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{}; {fix}", self.found),
            None => self.found.clone(),
        }
    }
}
