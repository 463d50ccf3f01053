//! Alert rules (`[alerts.NAME]`) and where their notifications go
//! (`[notifiers.NAME]`): a threshold on a live aggregate's metric (one
//! alert per group) or on one of caudal's own figures about a pipeline
//! (one per pipeline), held for a `for` duration before it fires.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use super::pipelines::checked_name;
use crate::units::{Duration, Secret};

/// Default time between two evaluations of a rule.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(15);

/// Default timeout of a notification request.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// How bad it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// Which window of an aggregate a rule reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertWindow {
    /// The latest closed window (final figures), default. A group that had
    /// windows lately but none in it reads 0 for counts and sums.
    #[default]
    Closed,
    /// The newest window, still counting.
    Open,
}

/// One of caudal's own figures about a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Seconds behind: a CDC pipeline's replication lag (from the running
    /// process), otherwise the age of its checkpoint (seconds since it
    /// last moved).
    DeliveryLag,
    /// Dead letters waiting (not replayed or discarded).
    DeadLetters,
    /// Runs failed in a row (the latest runs).
    FailingRuns,
    /// The buffer's bytes on disk over its `max_bytes` (0 to 1).
    BufferFill,
    /// 1 while the sink's circuit breaker is open, else 0.
    CircuitOpen,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeliveryLag => "delivery_lag",
            Self::DeadLetters => "dead_letters",
            Self::FailingRuns => "failing_runs",
            Self::BufferFill => "buffer_fill",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

/// An alert rule.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// A live aggregate whose `metric` is watched, one alert per group.
    #[serde(default)]
    pub aggregate: Option<String>,
    /// The aggregate's metric (a name in its `metrics`, or `rows`).
    #[serde(default)]
    pub metric: Option<String>,
    /// The aggregate's window read: `closed` (default) or `open`.
    #[serde(default)]
    pub window: AlertWindow,
    /// One of caudal's own figures, watched per pipeline: `delivery_lag`,
    /// `dead_letters`, `failing_runs`, `buffer_fill`, `circuit_open`.
    #[serde(default)]
    pub check: Option<Check>,
    /// With `check`: the pipeline watched (default every pipeline).
    #[serde(default)]
    pub pipeline: Option<String>,
    /// The condition holds while the value is above this.
    #[serde(default)]
    pub above: Option<f64>,
    /// The condition holds while the value is below this.
    #[serde(default)]
    pub below: Option<f64>,
    /// How long the condition must hold before the alert fires (default
    /// `0s`: at the first evaluation that finds it).
    #[serde(default, rename = "for")]
    #[schemars(rename = "for")]
    pub hold: Duration,
    /// `info`, `warning` (default) or `critical`.
    #[serde(default)]
    pub severity: Severity,
    /// Time between evaluations (default `15s`).
    #[serde(default = "default_every")]
    #[schemars(extend("default" = "15s"))]
    pub every: Duration,
    /// Names of `[notifiers]` told when the alert fires and resolves.
    #[serde(default)]
    pub notify: Vec<String>,
    /// A line saying what it means, sent with notifications.
    #[serde(default)]
    pub summary: Option<String>,
}

fn default_every() -> Duration {
    DEFAULT_EVERY
}

/// The payload a notifier sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// caudal's JSON (docs/live.md), default.
    #[default]
    Json,
    /// A Slack incoming-webhook message (`{"text": …}`), also understood by
    /// Mattermost, Rocket.Chat and Teams' Slack-compatible hooks.
    Slack,
}

/// A webhook alerts notify.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// The URL notifications are POSTed to (`http://` or `https://`).
    pub url: Secret,
    /// `json` (default) or `slack`.
    #[serde(default)]
    pub format: NotifyFormat,
    /// Extra request headers (e.g. an `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Timeout of one request (default `10s`); a failed request is retried
    /// with backoff until it succeeds, with the same `Idempotency-Key`.
    #[serde(default = "default_timeout")]
    #[schemars(extend("default" = "10s"))]
    pub timeout: Duration,
    /// How the webhook knows caudal: basic, OAuth2 client credentials or
    /// an HMAC signature, as on the HTTP sink (docs/delivery.md).
    #[serde(default)]
    pub auth: Option<super::partner::HttpAuth>,
    /// A custom CA and a client certificate, as on the HTTP sink.
    #[serde(default)]
    pub tls: Option<super::partner::HttpTls>,
}

fn default_timeout() -> Duration {
    DEFAULT_NOTIFY_TIMEOUT
}

pub(super) fn check(config: &super::Config, out: &mut Vec<Problem>) {
    let root = FieldPath::root();
    for (name, n) in &config.notifiers {
        let path = root.key("notifiers").key(name.clone());
        let url = n.url.expose();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            out.push(Problem::at(
                path.key("url"),
                "expected an http:// or https:// URL",
            ));
        }
        if n.timeout.0.is_zero() {
            out.push(Problem::at(path.key("timeout"), "must be greater than 0s"));
        }
        let header_names: Vec<String> = n.headers.keys().map(|h| h.to_ascii_lowercase()).collect();
        super::partner::check_partner(&path, n.auth.as_ref(), n.tls.as_ref(), &header_names, out);
    }
    for (name, a) in &config.alerts {
        let path = root.key("alerts").key(name.clone());
        if let Err(why) = checked_name("alert", name) {
            out.push(Problem::at_key(path.clone(), why));
        }
        match (&a.aggregate, a.check) {
            (Some(_), Some(_)) => out.push(Problem::at(
                path.key("check"),
                "an alert watches either an aggregate or a check, not both",
            )),
            (None, None) => out.push(Problem::at(
                path.clone(),
                "name what to watch: aggregate (with metric) or check",
            )),
            (Some(agg), None) => match config.aggregates.get(agg) {
                None => out.push(Problem::at(
                    path.key("aggregate"),
                    format!("no aggregate {agg:?}"),
                )),
                Some(def) => match &a.metric {
                    None => out.push(Problem::at(
                        path.clone(),
                        "an aggregate alert names its metric",
                    )),
                    Some(m) if m != "rows" && !def.metrics.contains_key(m) => {
                        let known: Vec<&str> = def.metrics.keys().map(String::as_str).collect();
                        out.push(Problem::at(
                            path.key("metric"),
                            format!(
                                "aggregate {agg:?} has no metric {m:?} (it has: rows, {})",
                                known.join(", ")
                            ),
                        ));
                    }
                    Some(_) => {}
                },
            },
            (None, Some(_)) => {
                if a.metric.is_some() {
                    out.push(Problem::at(
                        path.key("metric"),
                        "metric is for aggregate alerts; a check names its figure",
                    ));
                }
                if let Some(p) = &a.pipeline
                    && !config.pipelines.contains_key(p)
                {
                    out.push(Problem::at(
                        path.key("pipeline"),
                        format!("no pipeline {p:?}"),
                    ));
                }
            }
        }
        if a.aggregate.is_some() && a.pipeline.is_some() {
            out.push(Problem::at(
                path.key("pipeline"),
                "pipeline goes with check; an aggregate alert watches the aggregate's groups",
            ));
        }
        match (a.above, a.below) {
            (None, None) => out.push(Problem::at(
                path.clone(),
                "set the threshold: above = N or below = N",
            )),
            (Some(_), Some(_)) => out.push(Problem::at(
                path.key("below"),
                "set above or below, not both (write two alerts for a band)",
            )),
            (Some(v), None) | (None, Some(v)) if !v.is_finite() => {
                out.push(Problem::at(path.clone(), "the threshold must be a number"));
            }
            _ => {}
        }
        if a.every.0.is_zero() {
            out.push(Problem::at(path.key("every"), "must be greater than 0s"));
        }
        for (i, n) in a.notify.iter().enumerate() {
            if !config.notifiers.contains_key(n) {
                out.push(Problem::at(
                    path.key("notify").index(i),
                    format!("no notifier {n:?} in [notifiers]"),
                ));
            }
        }
    }
}
