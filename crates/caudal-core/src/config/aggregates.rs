//! Live aggregates: `[aggregates.NAME]` computes windowed figures (count,
//! sum, min, max, avg, distinct count, quantiles) per group over the
//! records of a pipeline, as they are buffered, and keeps them in the state
//! store for the live API (`/api/v1/live/NAME`).
//!
//! This module holds the settings, the metric expressions
//! (`"sum(amount)"`) and their checks; the windows and their state live in
//! the engine (`caudal_engine::aggregate`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::pipelines::checked_name;
use crate::units::Duration;

/// Default time closed windows are kept in the store (and served).
pub const DEFAULT_KEEP: Duration = Duration::from_secs(7 * 86_400);

/// Default relative error of quantile sketches (1 %).
pub const DEFAULT_RELATIVE_ERROR: f64 = 0.01;

/// Seconds in a day: window sizes below a day divide it, larger ones are
/// whole days.
const DAY_SECS: u64 = 86_400;

/// Variables a filter sees besides the row's fields.
pub const FILTER_VARIABLES: &[&str] = &["_op", "_table"];

/// Windowed figures per group over one pipeline's records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The pipeline whose records are aggregated (CDC or cursor). A CDC
    /// change counts its new row (`after`) and takes back its old one
    /// (`before`, which needs `REPLICA IDENTITY FULL` on PostgreSQL).
    pub pipeline: String,
    /// Row fields the figures are grouped by (e.g. `["provider_id"]`); none
    /// gives one group.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// The row field holding the event time (a timestamp: RFC 3339, or
    /// `YYYY-MM-DD HH:MM:SS` read in `tz`). Without it the event time is
    /// the change's commit time (CDC only; snapshot rows, which have none,
    /// are then not counted). Required for cursor pipelines.
    #[serde(default)]
    pub time: Option<String>,
    /// The window size, e.g. `"1m"`, `"1h"`, `"1d"`: a size below a day
    /// divides the day; a larger one is a whole number of days.
    pub window: Duration,
    /// Hopping windows: a new window starts every `every` (dividing
    /// `window`); without it windows tumble (do not overlap).
    #[serde(default)]
    pub every: Option<Duration>,
    /// IANA time zone the windows are aligned to (their day starts at its
    /// midnight), e.g. `"America/Mexico_City"`. Default `UTC`.
    #[serde(default)]
    pub tz: Option<String>,
    /// How long after a window's end its changes are still counted
    /// (default `0s`): a window closes once the watermark (the latest event
    /// time seen) passes its end plus this. Later changes are not counted;
    /// they are counted as late (metric and API).
    #[serde(default)]
    pub lateness: Duration,
    /// How long closed windows are kept and served (default `7d`).
    #[serde(default = "default_keep")]
    #[schemars(extend("default" = "7d"))]
    pub keep: Duration,
    /// A minijinja expression over the row's fields (and `_op`, `_table`):
    /// only rows for which it is true are counted, e.g.
    /// `"status == 'paid' and _table == 'public.sales'"`.
    #[serde(default)]
    pub filter: Option<String>,
    /// The figures of each window and group, by name:
    /// `count`, `count(FIELD)` (non-null values), `sum(FIELD)`,
    /// `min(FIELD)`, `max(FIELD)`, `avg(FIELD)`, `count_distinct(FIELD)`,
    /// `quantile(FIELD, Q)` (0 ≤ Q ≤ 1).
    pub metrics: BTreeMap<String, String>,
    /// Relative error of quantile sketches (default 0.01): a quantile is
    /// within this fraction of a value of the true rank.
    #[serde(default = "default_relative_error")]
    pub relative_error: f64,
}

fn default_keep() -> Duration {
    DEFAULT_KEEP
}

fn default_relative_error() -> f64 {
    DEFAULT_RELATIVE_ERROR
}

/// What a metric computes.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricKind {
    /// Rows in the window (`count`).
    Count,
    /// Rows with a non-null `field` (`count(field)`).
    CountField,
    Sum,
    Min,
    Max,
    Avg,
    /// Distinct non-null values of the field.
    CountDistinct,
    /// The `q` quantile of the field's values.
    Quantile(f64),
}

/// One parsed metric: its kind and the row field it reads (none for
/// `count`).
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub kind: MetricKind,
    pub field: Option<String>,
}

impl Metric {
    /// Parses `count`, `sum(amount)`, `quantile(amount, 0.95)`…
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "count" || text == "count()" || text == "count(*)" {
            return Ok(Self {
                kind: MetricKind::Count,
                field: None,
            });
        }
        let expected = "expected count, count(FIELD), sum(FIELD), min(FIELD), max(FIELD), \
                        avg(FIELD), count_distinct(FIELD) or quantile(FIELD, Q)";
        let Some((name, rest)) = text.split_once('(') else {
            return Err(format!("unknown metric {text:?}: {expected}"));
        };
        let Some(args) = rest.trim_end().strip_suffix(')') else {
            return Err(format!("metric {text:?} lacks its closing `)`"));
        };
        let args: Vec<&str> = args.split(',').map(str::trim).collect();
        let field = args[0];
        check_field(field).map_err(|why| format!("metric {text:?}: {why}"))?;
        let kind = match (name.trim(), args.len()) {
            ("count", 1) => MetricKind::CountField,
            ("sum", 1) => MetricKind::Sum,
            ("min", 1) => MetricKind::Min,
            ("max", 1) => MetricKind::Max,
            ("avg", 1) => MetricKind::Avg,
            ("count_distinct", 1) => MetricKind::CountDistinct,
            ("quantile", 2) => {
                let q: f64 = args[1].parse().map_err(|_| {
                    format!(
                        "metric {text:?}: the quantile {:?} is not a number",
                        args[1]
                    )
                })?;
                if !(0.0..=1.0).contains(&q) {
                    return Err(format!(
                        "metric {text:?}: the quantile must be between 0 and 1"
                    ));
                }
                MetricKind::Quantile(q)
            }
            ("quantile", _) => {
                return Err(format!(
                    "metric {text:?}: quantile takes a field and Q, e.g. quantile(amount, 0.95)"
                ));
            }
            ("count" | "sum" | "min" | "max" | "avg" | "count_distinct", _) => {
                return Err(format!("metric {text:?} takes one field"));
            }
            (other, _) => return Err(format!("unknown metric function {other:?}: {expected}")),
        };
        Ok(Self {
            kind,
            field: Some(field.to_string()),
        })
    }
}

/// A row field: a name, or a dotted path into nested objects.
fn check_field(field: &str) -> Result<(), String> {
    let ok = !field.is_empty()
        && field.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '$'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field:?} is not a field name (letters, digits, `_`, `-`, dots between nested names)"
        ))
    }
}

/// The window's length and hop, checked: `(size, hop)` in seconds.
pub fn window_spec(size: Duration, every: Option<Duration>) -> Result<(u64, u64), String> {
    let size_ms = size.as_std().as_millis();
    if size_ms == 0 || !size_ms.is_multiple_of(1000) {
        return Err("window must be a whole number of seconds, at least 1s".into());
    }
    let size = size.as_std().as_secs();
    if size < DAY_SECS && !DAY_SECS.is_multiple_of(size) {
        return Err(format!(
            "window {size}s does not divide a day: windows are aligned to midnight \
             (e.g. 1m, 5m, 15m, 1h, 6h, 1d)"
        ));
    }
    if size > DAY_SECS && !size.is_multiple_of(DAY_SECS) {
        return Err("a window longer than a day is a whole number of days".into());
    }
    let hop = match every {
        None => size,
        Some(every) => {
            let ms = every.as_std().as_millis();
            let hop = every.as_std().as_secs();
            if ms == 0 || !ms.is_multiple_of(1000) {
                return Err("every must be a whole number of seconds, at least 1s".into());
            }
            if hop > size || !size.is_multiple_of(hop) {
                return Err(format!(
                    "every ({hop}s) must divide window ({size}s): a row is in window/every windows"
                ));
            }
            if hop < DAY_SECS && !DAY_SECS.is_multiple_of(hop) {
                return Err(format!("every ({hop}s) does not divide a day"));
            }
            if size / hop > 1440 {
                return Err("window/every is at most 1440 (windows a row belongs to)".into());
            }
            hop
        }
    };
    Ok((size, hop))
}

/// Compiles a filter expression, checking it is valid minijinja.
pub fn check_filter(expression: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    env.compile_expression(expression).map(|_| ()).map_err(|e| {
        format!(
            "filter does not compile: {}",
            e.detail().map_or_else(|| e.to_string(), str::to_string)
        )
    })
}

pub(super) fn check(
    aggregates: &BTreeMap<String, AggregateConfig>,
    pipelines: &BTreeMap<String, super::PipelineConfig>,
    sources: &BTreeMap<String, super::SourceConfig>,
    out: &mut Vec<Problem>,
) {
    for (name, source) in sources {
        if let Some(a) = source.aggregate()
            && !aggregates.contains_key(&a.aggregate)
        {
            out.push(Problem::at(
                FieldPath::root()
                    .key("sources")
                    .key(name.clone())
                    .key("aggregate"),
                format!(
                    "no aggregate {:?}; defined: {}",
                    a.aggregate,
                    names(aggregates.keys())
                ),
            ));
        }
    }
    let root = FieldPath::root().key("aggregates");
    for (name, agg) in aggregates {
        let path = root.key(name.clone());
        if let Err(why) = checked_name("aggregate", name) {
            out.push(Problem::at_key(path.clone(), why));
        }
        match pipelines.get(&agg.pipeline) {
            None => out.push(Problem::at(
                path.key("pipeline"),
                format!(
                    "no pipeline {:?}; defined: {}",
                    agg.pipeline,
                    names(pipelines.keys())
                ),
            )),
            Some(p) => {
                let report = sources
                    .get(&p.source)
                    .and_then(|s| s.sql())
                    .is_some_and(|s| s.mode == super::SqlMode::Query);
                let cdc = sources
                    .get(&p.source)
                    .is_some_and(super::SourceConfig::is_cdc);
                if !cdc && !report && agg.time.is_none() {
                    out.push(Problem::at(
                        path.clone(),
                        format!(
                            "pipeline {:?} reads by cursor: its records have no commit time; name the \
                             field holding each record's time, e.g. time = \"updated_at\"",
                            agg.pipeline
                        ),
                    ));
                }
                if report {
                    out.push(Problem::at(
                        path.key("pipeline"),
                        format!(
                            "pipeline {:?} runs a report query (a dataset); aggregates read \
                             the records of CDC or cursor pipelines",
                            agg.pipeline
                        ),
                    ));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, field) in agg.group_by.iter().enumerate() {
            if let Err(why) = check_field(field) {
                out.push(Problem::at(path.key("group_by").index(i), why));
            } else if !seen.insert(field) {
                out.push(Problem::at(
                    path.key("group_by").index(i),
                    format!("{field:?} is listed twice"),
                ));
            }
        }
        if let Some(time) = &agg.time
            && let Err(why) = check_field(time)
        {
            out.push(Problem::at(path.key("time"), why));
        }
        if let Err(why) = window_spec(agg.window, agg.every) {
            let at = if why.starts_with("every") {
                "every"
            } else {
                "window"
            };
            out.push(Problem::at(path.key(at), why));
        }
        if let Some(tz) = &agg.tz
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            out.push(Problem::at(
                path.key("tz"),
                format!("unknown time zone {tz:?} (an IANA name such as \"Europe/Madrid\")"),
            ));
        }
        if agg.keep.as_std() < agg.window.as_std() {
            out.push(Problem::at(
                path.key("keep"),
                "keep must be at least the window size",
            ));
        }
        if let Some(filter) = &agg.filter
            && let Err(why) = check_filter(filter)
        {
            out.push(Problem::at(path.key("filter"), why));
        }
        if agg.metrics.is_empty() {
            out.push(Problem::at(
                path.key("metrics"),
                "name at least one metric, e.g. sales = \"sum(amount)\"",
            ));
        }
        for (metric, spec) in &agg.metrics {
            let at = path.key("metrics").key(metric.clone());
            let valid_name = !metric.is_empty()
                && metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                out.push(Problem::at_key(
                    at.clone(),
                    format!("metric name {metric:?} may hold only letters, digits and `_`"),
                ));
            }
            if group_by_clash(agg, metric) {
                out.push(Problem::at_key(
                    at.clone(),
                    format!("metric {metric:?} has the name of a group_by field"),
                ));
            }
            if let Err(why) = Metric::parse(spec) {
                out.push(Problem::at(at, why));
            }
        }
        if !(agg.relative_error > 0.0 && agg.relative_error < 0.5) {
            out.push(Problem::at(
                path.key("relative_error"),
                "must be between 0 and 0.5 (e.g. 0.01 for 1 %)",
            ));
        }
    }
}

fn group_by_clash(agg: &AggregateConfig, metric: &str) -> bool {
    agg.group_by.iter().any(|g| g == metric)
}

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let all: Vec<&str> = keys.map(String::as_str).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_explain() {
        assert_eq!(Metric::parse("count").unwrap().kind, MetricKind::Count);
        let m = Metric::parse("sum( amount )").unwrap();
        assert_eq!(
            (m.kind, m.field.as_deref()),
            (MetricKind::Sum, Some("amount"))
        );
        assert_eq!(
            Metric::parse("quantile(amount, 0.95)").unwrap().kind,
            MetricKind::Quantile(0.95)
        );
        assert!(
            Metric::parse("median(amount)")
                .unwrap_err()
                .contains("unknown metric function \"median\"")
        );
        assert!(
            Metric::parse("quantile(amount, 2)")
                .unwrap_err()
                .contains("between 0 and 1")
        );
        assert!(
            Metric::parse("sum(a b)")
                .unwrap_err()
                .contains("field name")
        );
        assert!(Metric::parse("sum(amount").unwrap_err().contains("closing"));
    }

    #[test]
    fn windows_divide_the_day_and_hops_divide_windows() {
        assert_eq!(window_spec(Duration::from_secs(60), None), Ok((60, 60)));
        assert_eq!(
            window_spec(Duration::from_secs(3600), Some(Duration::from_secs(900))),
            Ok((3600, 900))
        );
        assert!(
            window_spec(Duration::from_secs(7 * 60), None)
                .unwrap_err()
                .contains("does not divide a day")
        );
        assert!(
            window_spec(Duration::from_secs(3600), Some(Duration::from_secs(7 * 60)))
                .unwrap_err()
                .starts_with("every")
        );
        assert!(window_spec(Duration::from_millis(500), None).is_err());
        assert_eq!(
            window_spec(Duration::from_secs(2 * 86_400), None),
            Ok((172_800, 172_800))
        );
        assert!(window_spec(Duration::from_secs(90_000), None).is_err());
    }
}
