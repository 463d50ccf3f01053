//! `[retention]`: how much history the state store keeps. Runs are pruned
//! by age and by count per pipeline right after each run; resolved dead
//! letters and audit entries by age, by `caudal run` at start and every
//! hour. The defaults keep a store small however long caudal runs.
//!
//! What is never pruned, whatever the settings: a pending dead letter (only
//! replayed or discarded ones age out), a run still running, and the newest
//! run of each pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::Duration;

/// Default age after which a finished run is deleted: 30 days.
pub const DEFAULT_RUNS_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);
/// Default number of runs kept per pipeline, newest first.
pub const DEFAULT_RUNS_MAX_COUNT: u32 = 1000;
/// Default age, counted from when it was replayed or discarded, after
/// which a dead letter is deleted: 30 days.
pub const DEFAULT_DEAD_LETTERS_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);
/// Default age after which an audit entry is deleted: 90 days.
pub const DEFAULT_AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);

/// Default age after which a finished workflow run (its rows and its
/// directory) is deleted: 30 days.
pub const DEFAULT_WORKFLOW_RUNS_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);

/// How long the state store keeps history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Finished runs that ended longer ago than this are deleted (default
    /// `"30d"`). The newest run of each pipeline is always kept.
    #[serde(default = "default_runs_max_age")]
    #[schemars(extend("default" = DEFAULT_RUNS_MAX_AGE))]
    pub runs_max_age: Duration,
    /// Runs kept per pipeline, newest first; older ones are deleted
    /// (default 1000). Polls of a `continuous` schedule that read nothing
    /// leave no run at all, so this bounds the runs that did work.
    #[serde(default = "default_runs_max_count")]
    #[schemars(range(min = 1), extend("default" = DEFAULT_RUNS_MAX_COUNT))]
    pub runs_max_count: u32,
    /// Dead letters replayed or discarded longer ago than this are deleted
    /// (default `"30d"`). Pending dead letters are kept until they are
    /// replayed or discarded, however old.
    #[serde(default = "default_dead_letters_max_age")]
    #[schemars(extend("default" = DEFAULT_DEAD_LETTERS_MAX_AGE))]
    pub dead_letters_max_age: Duration,
    /// API audit entries older than this are deleted (default `"90d"`).
    #[serde(default = "default_audit_max_age")]
    #[schemars(extend("default" = DEFAULT_AUDIT_MAX_AGE))]
    pub audit_max_age: Duration,
    /// Finished workflow runs that ended longer ago than this are deleted,
    /// with their run directories and task logs (default `"30d"`). A run
    /// that has not ended is never deleted.
    #[serde(default = "default_workflow_runs_max_age")]
    #[schemars(extend("default" = DEFAULT_WORKFLOW_RUNS_MAX_AGE))]
    pub workflow_runs_max_age: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            runs_max_age: DEFAULT_RUNS_MAX_AGE,
            runs_max_count: DEFAULT_RUNS_MAX_COUNT,
            dead_letters_max_age: DEFAULT_DEAD_LETTERS_MAX_AGE,
            audit_max_age: DEFAULT_AUDIT_MAX_AGE,
            workflow_runs_max_age: DEFAULT_WORKFLOW_RUNS_MAX_AGE,
        }
    }
}

fn default_runs_max_age() -> Duration {
    DEFAULT_RUNS_MAX_AGE
}
fn default_runs_max_count() -> u32 {
    DEFAULT_RUNS_MAX_COUNT
}
fn default_dead_letters_max_age() -> Duration {
    DEFAULT_DEAD_LETTERS_MAX_AGE
}
fn default_audit_max_age() -> Duration {
    DEFAULT_AUDIT_MAX_AGE
}
fn default_workflow_runs_max_age() -> Duration {
    DEFAULT_WORKFLOW_RUNS_MAX_AGE
}

/// Checks `[retention]` at `path`. Zero is refused everywhere: a history
/// deleted as soon as it is written would leave `caudal status` and the API
/// nothing to show, and is more likely a slip than a wish.
pub(crate) fn check(path: &FieldPath, retention: &RetentionConfig, out: &mut Vec<Problem>) {
    let ages = [
        ("runs_max_age", retention.runs_max_age),
        ("dead_letters_max_age", retention.dead_letters_max_age),
        ("audit_max_age", retention.audit_max_age),
        ("workflow_runs_max_age", retention.workflow_runs_max_age),
    ];
    for (field, age) in ages {
        if age.as_std().is_zero() {
            out.push(Problem::at(
                path.key(field),
                "must be greater than 0s; to keep history for years write e.g. \"3650d\"",
            ));
        }
    }
    if retention.runs_max_count == 0 {
        out.push(Problem::at(
            path.key("runs_max_count"),
            "must be 1 or more (the newest run of each pipeline is always kept)",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(retention: &RetentionConfig) -> Vec<String> {
        let mut out = Vec::new();
        check(&FieldPath::root().key("retention"), retention, &mut out);
        out.iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_named() {
        let defaults = RetentionConfig::default();
        assert!(problems(&defaults).is_empty());
        assert_eq!(defaults.runs_max_age.to_string(), "30d");
        assert_eq!(defaults.audit_max_age.to_string(), "90d");
    }

    #[test]
    fn zero_is_refused_at_each_field() {
        let zero = RetentionConfig {
            runs_max_age: Duration::from_secs(0),
            runs_max_count: 0,
            dead_letters_max_age: Duration::from_secs(0),
            audit_max_age: Duration::from_millis(0),
            workflow_runs_max_age: Duration::from_secs(0),
        };
        let found = problems(&zero);
        assert_eq!(found.len(), 5, "{found:?}");
        for field in [
            "runs_max_age",
            "runs_max_count",
            "dead_letters_max_age",
            "audit_max_age",
            "workflow_runs_max_age",
        ] {
            assert!(
                found
                    .iter()
                    .any(|p| p.starts_with(&format!("retention.{field}: "))),
                "no problem at retention.{field}: {found:?}"
            );
        }
    }
}
