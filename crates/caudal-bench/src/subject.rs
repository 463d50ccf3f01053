//! The caudal builds a scenario measures.
//!
//! Every scenario that runs caudal's binary measures the build under test
//! (`--caudal`) and, with `--baseline-caudal`, a baseline build on the same
//! workload from the same kind of fresh set-up (its own state directory,
//! its own slot or checkpoint, its own receiver), so that a change reads as
//! "N× the previous build, same run". The baseline's figures are the
//! caudal ones renamed `baseline_…`, and `caudal_over_baseline` compares
//! the scenario's headline figure (above 1 = the build under test is
//! better). Their order alternates from one repeat to the next, so that
//! neither build always runs second, on caches the other one warmed.
//!
//! `buffer` and `http-sink` run caudal's library inside the harness and
//! cannot take a baseline: only one build of it is linked in.

use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::Args;

/// One caudal build being measured.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// `caudal` (the build under test) or `baseline`: the prefix of its
    /// figures in the JSON line, and its name in progress messages and
    /// scratch directories.
    pub name: &'static str,
    pub binary: &'a Path,
}

/// The name of the build under test.
pub const CAUDAL: &str = "caudal";
/// The name of the baseline build.
pub const BASELINE: &str = "baseline";

impl Args {
    /// The builds to measure in this repeat: caudal, and the baseline when
    /// one is given, caudal first in odd repeats and second in even ones.
    pub fn subjects(&self) -> Vec<Subject<'_>> {
        let mut subjects = vec![Subject {
            name: CAUDAL,
            binary: &self.caudal,
        }];
        if let Some(baseline) = &self.baseline_caudal {
            subjects.push(Subject {
                name: BASELINE,
                binary: baseline,
            });
            if self.run.is_multiple_of(2) {
                subjects.reverse();
            }
        }
        subjects
    }
}

/// Splits what each subject measured into caudal's and the baseline's.
pub fn split<T>(measured: Vec<(Subject<'_>, T)>) -> anyhow::Result<(T, Option<T>)> {
    let mut caudal = None;
    let mut baseline = None;
    for (subject, m) in measured {
        if subject.name == BASELINE {
            baseline = Some(m);
        } else {
            caudal = Some(m);
        }
    }
    Ok((caudal.context("caudal was not measured")?, baseline))
}

/// Adds the fields of `more` (a JSON object) to `report`.
pub fn extend(report: &mut Value, more: Value) {
    if let (Some(report), Value::Object(more)) = (report.as_object_mut(), more) {
        report.extend(more);
    }
}
