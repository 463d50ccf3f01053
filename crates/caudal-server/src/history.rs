//! The last hour of each pipeline's figures, for the dashboard's charts:
//! records read, delivered and rejected per second, lag, delivery latency
//! and buffered batches, sampled every [`SAMPLE_EVERY`] from this
//! process's own metrics, served at `/api/v1/pipelines/{name}/history`.
//!
//! Promises:
//! - **Bounded.** At most an hour of points per pipeline
//!   ([`KEEP`] samples); older points are dropped.
//! - **What this process saw.** Counters are those of the process serving
//!   the page: in a cluster, a pipeline's figures move on the node that
//!   owns it. A restart starts the hour again; a counter that goes back
//!   (a restart of the recorder) counts as a fresh start, never as a
//!   negative rate.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How often the figures are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept per pipeline: one hour.
pub const KEEP: usize = 1800;

/// One sample of a pipeline's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryPoint {
    /// When it was sampled (RFC 3339).
    pub at: String,
    /// Records read from the source per second since the sample before.
    pub read_per_s: f64,
    /// Records the sink accepted per second.
    pub delivered_per_s: f64,
    /// Records kept as dead letters per second.
    pub rejected_per_s: f64,
    /// How far behind the source the pipeline is, in seconds: replication
    /// lag for change data capture, else the checkpoint's age.
    pub lag_seconds: Option<f64>,
    /// Mean time of a sink request answered since the sample before, in
    /// milliseconds (none when no request was answered).
    pub latency_ms: Option<f64>,
    /// Batches in the buffer not yet delivered.
    pub buffered_batches: Option<f64>,
}

/// A pipeline's last hour.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PipelineHistory {
    pub pipeline: String,
    /// Seconds between two samples.
    pub interval_seconds: u64,
    /// Oldest first.
    pub points: Vec<HistoryPoint>,
}

/// Totals of one scrape, per pipeline.
#[derive(Clone, Debug, Default)]
struct Totals {
    read: f64,
    delivered: f64,
    rejected: f64,
    latency_sum: f64,
    latency_count: f64,
    replication_lag: Option<f64>,
    checkpoint_age: Option<f64>,
    buffered: Option<f64>,
}

#[derive(Debug, Default)]
struct Series {
    last: Option<(jiff::Timestamp, Totals)>,
    points: VecDeque<HistoryPoint>,
}

/// Every pipeline's last hour, shared by the sampler and the API.
#[derive(Clone, Debug, Default)]
pub struct History {
    series: Arc<Mutex<BTreeMap<String, Series>>>,
}

impl History {
    /// The points of `pipeline`, oldest first (none before the first two
    /// samples); only the newest `last` when given.
    pub fn of(&self, pipeline: &str, last: Option<usize>) -> PipelineHistory {
        let points = self
            .series
            .lock()
            .map(|s| {
                s.get(pipeline)
                    .map(|s| {
                        let skip = last.map_or(0, |n| s.points.len().saturating_sub(n));
                        s.points.iter().skip(skip).cloned().collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        PipelineHistory {
            pipeline: pipeline.to_string(),
            interval_seconds: SAMPLE_EVERY.as_secs(),
            points,
        }
    }

    /// Records one scrape of the metrics text taken at `at`.
    pub fn record(&self, at: jiff::Timestamp, text: &str) {
        let totals = totals(text);
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        for (pipeline, now) in totals {
            let s = series.entry(pipeline).or_default();
            if let Some((then, before)) = &s.last {
                let secs = (at.as_millisecond() - then.as_millisecond()) as f64 / 1000.0;
                if secs > 0.0 {
                    let rate = |a: f64, b: f64| ((a - b).max(0.0) / secs * 1000.0).round() / 1000.0;
                    let answered = now.latency_count - before.latency_count;
                    let latency_ms = (answered > 0.0).then(|| {
                        ((now.latency_sum - before.latency_sum).max(0.0) / answered * 1e6).round()
                            / 1000.0
                    });
                    s.points.push_back(HistoryPoint {
                        at: at.to_string(),
                        read_per_s: rate(now.read, before.read),
                        delivered_per_s: rate(now.delivered, before.delivered),
                        rejected_per_s: rate(now.rejected, before.rejected),
                        lag_seconds: now.replication_lag.or(now.checkpoint_age),
                        latency_ms,
                        buffered_batches: now.buffered,
                    });
                    while s.points.len() > KEEP {
                        s.points.pop_front();
                    }
                }
            }
            s.last = Some((at, now));
        }
    }

    /// Samples `metrics` every [`SAMPLE_EVERY`] until `stop`.
    pub fn sample(&self, metrics: PrometheusHandle, stop: CancellationToken) {
        let history = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => history.record(jiff::Timestamp::now(), &metrics.render()),
                }
            }
        });
    }
}

/// The per-pipeline totals in a Prometheus text exposition.
fn totals(text: &str) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    let Ok(scrape) = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
    else {
        return out;
    };
    for sample in scrape.samples {
        let Some(pipeline) = sample.labels.get("pipeline") else {
            continue;
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let t = out.entry(pipeline.to_string()).or_default();
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + value);
        match sample.metric.as_str() {
            "caudal_records_read_total" => t.read += value,
            "caudal_records_delivered_total" => t.delivered += value,
            "caudal_records_rejected_total" => t.rejected += value,
            "caudal_sink_request_duration_seconds_sum" => t.latency_sum += value,
            "caudal_sink_request_duration_seconds_count" => t.latency_count += value,
            "caudal_replication_lag_seconds" => add(&mut t.replication_lag),
            "caudal_checkpoint_age_seconds" => add(&mut t.checkpoint_age),
            "caudal_buffer_batches" => add(&mut t.buffered),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(read: u64, delivered: u64, sum: f64, count: u64) -> String {
        format!(
            "# TYPE caudal_records_read_total counter\n\
             caudal_records_read_total{{pipeline=\"p\"}} {read}\n\
             # TYPE caudal_records_delivered_total counter\n\
             caudal_records_delivered_total{{pipeline=\"p\",sink=\"a\"}} {delivered}\n\
             # TYPE caudal_sink_request_duration_seconds histogram\n\
             caudal_sink_request_duration_seconds_bucket{{pipeline=\"p\",sink=\"a\",le=\"+Inf\"}} {count}\n\
             caudal_sink_request_duration_seconds_sum{{pipeline=\"p\",sink=\"a\"}} {sum}\n\
             caudal_sink_request_duration_seconds_count{{pipeline=\"p\",sink=\"a\"}} {count}\n\
             # TYPE caudal_checkpoint_age_seconds gauge\n\
             caudal_checkpoint_age_seconds{{pipeline=\"p\"}} 7\n"
        )
    }

    #[test]
    fn rates_between_samples() {
        let h = History::default();
        let t0: jiff::Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
        h.record(t0, &text(100, 90, 1.0, 10));
        assert!(h.of("p", None).points.is_empty(), "one sample has no rate");
        h.record(
            t0 + jiff::SignedDuration::from_secs(2),
            &text(300, 290, 1.5, 20),
        );
        let points = h.of("p", None).points;
        assert_eq!(points.len(), 1);
        let p = &points[0];
        assert_eq!(p.read_per_s, 100.0);
        assert_eq!(p.delivered_per_s, 100.0);
        assert_eq!(p.latency_ms, Some(50.0));
        assert_eq!(p.lag_seconds, Some(7.0));
        // A counter that went back is a fresh start, not a negative rate.
        h.record(
            t0 + jiff::SignedDuration::from_secs(4),
            &text(5, 5, 1.5, 20),
        );
        let last = h.of("p", None).points.pop().unwrap();
        assert_eq!((last.read_per_s, last.latency_ms), (0.0, None));
    }

    #[test]
    fn keeps_one_hour() {
        let h = History::default();
        let t0: jiff::Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
        for i in 0..(KEEP as i64 + 50) {
            h.record(
                t0 + jiff::SignedDuration::from_secs(2 * i),
                &text(i as u64, 0, 0.0, 0),
            );
        }
        assert_eq!(h.of("p", None).points.len(), KEEP);
        assert_eq!(h.of("p", Some(3)).points.len(), 3);
        assert!(h.of("unknown", None).points.is_empty());
    }
}
