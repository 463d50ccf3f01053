//! `caudal run` with `[server]`: `/healthz`, `/readyz` and `/metrics` of the
//! real binary over loopback, after runs whose figures are known.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{Daemon, Output, PATIENCE, PIPELINE, World, command, spawn_daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The world's config with a `[server]` table listening on `port`.
fn write_server_config(world: &World, port: u16) -> PathBuf {
    let path = world.dir.path().join("server.toml");
    let config = format!(
        "{}\n[server]\nlisten = \"127.0.0.1:{port}\"\n",
        world.config_toml()
    );
    std::fs::write(&path, config).expect("write the config");
    path
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match reqwest::get(&url).await {
            Ok(r) => {
                let status = r.status().as_u16();
                return (status, r.text().await.unwrap_or_default());
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "GET {url} failed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The value of the sample `name` whose labels include every one of
/// `labels`, summed over the others; `None` when there is none.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Scrapes `/metrics` (which must parse as Prometheus text) until
/// `done` holds for it.
async fn scrape_until(
    port: u16,
    daemon: &Daemon,
    done: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, text) = get(port, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        if done(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics never showed it:\n{text}\nlog:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_equal_what_the_runs_read_and_delivered() {
    let mut world = World::sqlite().await;
    world.max_records = 100;
    world.every = "1h".into();
    world.insert(1..=250, 0).await;
    let port = free_port();
    let daemon = spawn_daemon(&write_server_config(&world, port), world.dir.path(), 1);
    world.wait_for_delivered(250).await;
    let p = [("pipeline", PIPELINE)];
    let scrape = scrape_until(port, &daemon, |s| {
        sample(s, "caudal_records_delivered_total", &p) == Some(250.0)
            && sample(s, "caudal_runs_total", &p).is_some()
    })
    .await;
    assert_eq!(
        sample(&scrape, "caudal_records_read_total", &p),
        Some(250.0)
    );
    // Every metric shown is one of those documented.
    let exported: Vec<&str> = caudal_server::METRICS.iter().map(|m| m.0).collect();
    for s in &scrape.samples {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|x| s.metric.strip_suffix(x))
            .unwrap_or(&s.metric);
        assert!(exported.contains(&base), "{} is not in METRICS", s.metric);
    }
    assert_eq!(sample(&scrape, "caudal_records_rejected_total", &p), None);
    assert_eq!(
        sample(
            &scrape,
            "caudal_batches_total",
            &[("pipeline", PIPELINE), ("outcome", "delivered")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "caudal_sink_requests_total",
            &[("pipeline", PIPELINE), ("outcome", "delivered")]
        ),
        Some(3.0)
    );
    let bytes: usize = world
        .receiver
        .requests()
        .iter()
        .filter(|r| r.accepted())
        .map(|r| r.body.len())
        .sum();
    assert_eq!(
        sample(&scrape, "caudal_sink_sent_bytes_total", &p),
        Some(bytes as f64)
    );
    assert_eq!(
        sample(
            &scrape,
            "caudal_runs_total",
            &[("pipeline", PIPELINE), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "caudal_sink_request_duration_seconds")
        .expect("the request latency histogram");
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 3.0, "{buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert_eq!(
        sample(&scrape, "caudal_sink_circuit_state", &p),
        Some(0.0),
        "closed"
    );
    // Gauges sampled every 2 s: the buffer is empty, the checkpoint fresh.
    let gauges = scrape_until(port, &daemon, |s| {
        sample(s, "caudal_buffer_batches", &p) == Some(0.0)
            && sample(s, "caudal_checkpoint_age_seconds", &p).is_some()
    })
    .await;
    assert!(sample(&gauges, "caudal_buffer_bytes", &p).is_some());
    let (status, body) = get(port, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = get(port, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""store":"ok""#), "{body}");
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_are_counted_as_rejected() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.insert(1..=40, 0).await;
    world.receiver.set_status(422);
    let port = free_port();
    let daemon = spawn_daemon(&write_server_config(&world, port), world.dir.path(), 1);
    let p = [("pipeline", PIPELINE)];
    let scrape = scrape_until(port, &daemon, |s| {
        sample(s, "caudal_records_rejected_total", &p) == Some(40.0)
    })
    .await;
    assert_eq!(sample(&scrape, "caudal_records_delivered_total", &p), None);
    assert_eq!(
        sample(
            &scrape,
            "caudal_records_rejected_total",
            &[("pipeline", PIPELINE), ("reason", "sink")]
        ),
        Some(40.0)
    );
    daemon.stop(Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_listen_address_is_refused_with_where() {
    let world = World::sqlite().await;
    let path = world.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[server]\nlisten = \"localhost\"\n",
            world.config_toml()
        ),
    )
    .expect("write the config");
    let out = Output::of(command(&path, world.dir.path(), &["validate"])).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("server.listen"), "{out}");
    // A port already taken: `run` fails at start and names the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("an address").port();
    let path = write_server_config(&world, port);
    let out = Output::of(command(&path, world.dir.path(), &["run"])).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{out}"
    );
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_caudal_exports() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/grafana/caudal.json"
    ))
    .expect("docs/grafana/caudal.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exported: Vec<&str> = caudal_server::METRICS.iter().map(|m| m.0).collect();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("caudal_") {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    exported.contains(&base),
                    "{base} in {expr:?} is not exported"
                );
                used += 1;
            }
        }
    }
    assert!(used >= exported.len(), "the dashboard shows every metric");
}
