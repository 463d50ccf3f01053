//! `[backup]`: scheduled online backups of the state store and every
//! pipeline's buffer, taken by `caudal run` (the same copy `caudal backup`
//! takes), with a retention count.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::Duration;

/// Default backups kept.
pub const DEFAULT_KEEP: u32 = 7;

/// Where and how often `caudal run` backs up its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// The directory backups go to, one `caudal-backup-<UTC time>`
    /// subdirectory each. A relative path is relative to the configuration
    /// file's directory. Best on another disk than the state.
    pub dir: String,
    /// How often to take one (e.g. `"24h"`); the first one is taken one
    /// interval after `caudal run` starts.
    pub every: Duration,
    /// Backups kept in `dir`, newest first (default 7); older ones are
    /// deleted after each new one is complete.
    #[serde(default = "default_keep")]
    #[schemars(extend("default" = DEFAULT_KEEP))]
    pub keep: u32,
}

fn default_keep() -> u32 {
    DEFAULT_KEEP
}

/// `dir` must name a directory, `every` be positive and `keep` at least 1.
pub(super) fn check(backup: Option<&BackupConfig>, out: &mut Vec<Problem>) {
    let Some(backup) = backup else {
        return;
    };
    let at = FieldPath::root().key("backup");
    if backup.dir.trim().is_empty() {
        out.push(Problem::at(at.key("dir"), "must name a directory"));
    }
    if backup.every.as_std().is_zero() {
        out.push(Problem::at(
            at.key("every"),
            "backups must be at least 1s apart: write e.g. \"24h\"",
        ));
    }
    if backup.keep == 0 {
        out.push(Problem::at(
            at.key("keep"),
            "keep at least one backup (the newest)",
        ));
    }
}
