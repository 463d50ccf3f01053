//! The workflow state machine: the states of runs, task instances and
//! attempts, the one table of allowed task transitions, and trigger rules.
//! Pure: no store, no clock, no processes. The engine asks here before it
//! changes a state, the store keeps what the engine decided, and the CLI
//! and API show these types.
//!
//! Promises:
//! - Every task state change goes through [`TaskState::to`], which refuses a
//!   transition the diagram (docs/workflows.md) does not have. A finished
//!   task (succeeded, failed, cancelled, skipped, upstream_failed) changes
//!   only by an explicit retry of its run ([`TaskState::reset`]).
//! - A succeeded task is never run again by the scheduler: `Succeeded` has
//!   no way back to `Queued` except through `reset`, which `retry --failed`
//!   never applies to it.
//! - [`decide`] is the one reading of trigger rules.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::TriggerRule;
use crate::{Error, ErrorKind, Result};

/// The state of a workflow run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created; waits for the executor (and, unless overlap is `allow`, for
    /// the workflow's previous run to end).
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// The state of one task instance of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waits for upstream tasks.
    Pending,
    /// Upstream done; waits for its task's `max_parallel` (fan-out).
    Scheduled,
    /// Ready; waits for a pool slot (or the pool's rate).
    Queued,
    /// An attempt is running.
    Running,
    /// An attempt failed; the next starts after the retry wait.
    Retrying,
    Succeeded,
    /// Every attempt failed (or the deadline passed).
    Failed,
    Cancelled,
    /// Not run: an upstream task was skipped.
    Skipped,
    /// Not run: an upstream task failed and the trigger rule needs it.
    UpstreamFailed,
}

/// How one attempt ended (or that it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    Running,
    Succeeded,
    /// Exited with the task's skip exit code.
    Skipped,
    Failed,
    /// Killed at its timeout or the task's deadline.
    TimedOut,
    Cancelled,
    /// Its executor died while it ran (kill -9, power loss): counted as a
    /// failed attempt, never as a success.
    Lost,
}

macro_rules! text_enum {
    ($ty:ty { $($variant:ident = $text:literal),* $(,)? }) => {
        impl $ty {
            /// The name stored and shown.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
            /// Every value.
            pub const ALL: &'static [$ty] = &[$(Self::$variant),*];
            /// The value named `text`.
            pub fn parse(text: &str) -> Result<Self> {
                match text {
                    $($text => Ok(Self::$variant),)*
                    other => Err(Error::new(
                        ErrorKind::Internal,
                        format!(concat!("unknown ", stringify!($ty), " {:?}"), other),
                    )),
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(RunState {
    Queued = "queued",
    Running = "running",
    Succeeded = "succeeded",
    Failed = "failed",
    Cancelled = "cancelled",
});

text_enum!(TaskState {
    Pending = "pending",
    Scheduled = "scheduled",
    Queued = "queued",
    Running = "running",
    Retrying = "retrying",
    Succeeded = "succeeded",
    Failed = "failed",
    Cancelled = "cancelled",
    Skipped = "skipped",
    UpstreamFailed = "upstream_failed",
});

text_enum!(AttemptState {
    Running = "running",
    Succeeded = "succeeded",
    Skipped = "skipped",
    Failed = "failed",
    TimedOut = "timed_out",
    Cancelled = "cancelled",
    Lost = "lost",
});

impl RunState {
    /// Whether the run has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl TaskState {
    /// Whether the task has ended (no attempt runs or will run).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped | Self::UpstreamFailed
        )
    }

    /// Whether `self → next` is in the diagram.
    pub fn allows(self, next: TaskState) -> bool {
        use TaskState::*;
        match (self, next) {
            // Upstream done: ready (maybe held by max_parallel), or not run.
            (Pending, Scheduled | Queued | Skipped | UpstreamFailed | Succeeded) => true,
            (Scheduled, Queued) => true,
            // A fan-out parent runs (from pending) while its instances
            // run, and ends with them.
            (Pending | Queued, Running) => true,
            // A command may ask to be skipped (its skip exit code), and an
            // attempt interrupted by shutdown is queued again.
            (Running, Succeeded | Failed | Retrying | Skipped | Queued) => true,
            (Retrying, Queued | Failed) => true,
            // A task that cannot start: a template names what does not
            // exist, the deadline passed.
            (Pending | Queued, Failed) => true,
            // Cancel reaches every unfinished state.
            (from, Cancelled) => !from.is_finished(),
            _ => false,
        }
    }

    /// `self → next`, or an internal error naming both: the caller asked for
    /// a transition the diagram does not have.
    pub fn to(self, next: TaskState, task: &str) -> Result<TaskState> {
        if self.allows(next) {
            Ok(next)
        } else {
            Err(Error::new(
                ErrorKind::Internal,
                format!("task `{task}`: no transition from {self} to {next}"),
            ))
        }
    }

    /// The state a retry of the run gives a task: unfinished or failed
    /// tasks start over (pending); `only_failed` keeps succeeded and
    /// skipped tasks as they are.
    pub fn reset(self, only_failed: bool) -> TaskState {
        match self {
            Self::Succeeded | Self::Skipped if only_failed => self,
            _ => Self::Pending,
        }
    }
}

/// What a task does now, given its trigger rule and its upstream tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// An upstream task has not ended.
    Wait,
    Run,
    Skip,
    UpstreamFailed,
}

/// The one reading of trigger rules. `upstream` holds the states of the
/// task's direct upstream tasks.
pub fn decide(rule: TriggerRule, upstream: &[TaskState]) -> Readiness {
    if upstream.iter().any(|s| !s.is_finished()) {
        return Readiness::Wait;
    }
    let succeeded = upstream
        .iter()
        .filter(|s| **s == TaskState::Succeeded)
        .count();
    match rule {
        TriggerRule::AllDone => Readiness::Run,
        TriggerRule::AllSuccess => {
            if succeeded == upstream.len() {
                Readiness::Run
            } else if upstream
                .iter()
                .all(|s| matches!(s, TaskState::Succeeded | TaskState::Skipped))
            {
                Readiness::Skip
            } else {
                Readiness::UpstreamFailed
            }
        }
        TriggerRule::OneSuccess => {
            if succeeded > 0 || upstream.is_empty() {
                Readiness::Run
            } else if upstream.iter().all(|s| *s == TaskState::Skipped) {
                Readiness::Skip
            } else {
                Readiness::UpstreamFailed
            }
        }
    }
}

/// A workflow run as `caudal workflow status` and the API show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkflowRunInfo {
    pub id: i64,
    pub workflow: String,
    /// The batch id: `WORKFLOW-YYYYMMDDTHHMMSS-ID`.
    pub batch_id: String,
    /// `schedule`, `manual`, `backfill` or `api`.
    pub triggered_by: String,
    /// The time this run stands for (its schedule slot, or when it was
    /// asked for; RFC 3339).
    pub logical_date: Option<String>,
    pub state: RunState,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// The run's directory (`run.dir` in templates).
    pub dir: String,
    pub error: Option<String>,
    /// Task instances by state.
    pub tasks: std::collections::BTreeMap<String, u64>,
    pub cancel_requested: bool,
}

/// One task instance of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskInstanceInfo {
    pub task: String,
    /// The instance's index in a fan-out, or -1 (the task itself).
    pub map_index: i64,
    pub state: TaskState,
    pub attempts: u32,
    /// The item(s) of a fan-out instance.
    pub item: Option<serde_json::Value>,
    pub outputs: serde_json::Map<String, serde_json::Value>,
    /// How many items the task produced.
    pub items: u64,
    pub queued_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub error: Option<String>,
}

/// One attempt of a task instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptInfo {
    pub task: String,
    pub map_index: i64,
    pub attempt: u32,
    pub state: AttemptState,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The end of its standard error.
    pub stderr_tail: Option<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
    /// The process that ran it (`host:pid:nonce`): in a cluster, the node
    /// that claimed it.
    pub node: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn finished_tasks_do_not_move() {
        for from in TaskState::ALL.iter().filter(|s| s.is_finished()) {
            for to in TaskState::ALL {
                assert!(!from.allows(*to), "{from} → {to}");
            }
        }
        assert!(Succeeded.to(Queued, "t").is_err());
        assert_eq!(Running.to(Retrying, "t").ok(), Some(Retrying));
    }

    #[test]
    fn retry_of_failed_keeps_successes() {
        assert_eq!(Succeeded.reset(true), Succeeded);
        assert_eq!(Skipped.reset(true), Skipped);
        assert_eq!(Failed.reset(true), Pending);
        assert_eq!(UpstreamFailed.reset(true), Pending);
        assert_eq!(Cancelled.reset(true), Pending);
        assert_eq!(Succeeded.reset(false), Pending);
    }

    #[test]
    fn texts_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()).ok(), Some(*s));
        }
        for s in AttemptState::ALL {
            assert_eq!(AttemptState::parse(s.as_str()).ok(), Some(*s));
        }
        assert!(RunState::parse("exploded").is_err());
    }

    #[test]
    fn trigger_rules() {
        use Readiness as R;
        use TriggerRule as T;
        assert_eq!(decide(T::AllSuccess, &[]), R::Run);
        assert_eq!(decide(T::AllSuccess, &[Succeeded, Running]), R::Wait);
        assert_eq!(decide(T::AllSuccess, &[Succeeded, Succeeded]), R::Run);
        assert_eq!(decide(T::AllSuccess, &[Succeeded, Skipped]), R::Skip);
        assert_eq!(
            decide(T::AllSuccess, &[Succeeded, Failed]),
            R::UpstreamFailed
        );
        assert_eq!(decide(T::AllSuccess, &[UpstreamFailed]), R::UpstreamFailed);
        assert_eq!(decide(T::AllDone, &[Failed, Cancelled]), R::Run);
        assert_eq!(decide(T::OneSuccess, &[Failed, Succeeded]), R::Run);
        assert_eq!(
            decide(T::OneSuccess, &[Failed, UpstreamFailed]),
            R::UpstreamFailed
        );
        assert_eq!(decide(T::OneSuccess, &[Skipped, Skipped]), R::Skip);
        assert_eq!(decide(T::OneSuccess, &[Retrying, Succeeded]), R::Wait);
    }
}
