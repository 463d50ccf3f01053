//! The delivery settings of sinks and pipelines: every written form loads
//! to the model, and leaving them out gives the documented defaults.

use std::path::Path;
use std::time::Duration;

use caudal_core::config::{
    self, AckMode, ConcurrencyConfig, Config, Format, FsyncPolicy, HttpSinkConfig, SinkConfig,
    load_str,
};

fn no_env(_: &str) -> Option<String> {
    None
}

/// A sink `s` with `extra` lines and a pipeline `p` with `pipeline` lines.
fn toml(extra: &str, pipeline: &str) -> String {
    format!(
        "[sources.db]\ntype = \"sqlite\"\nurl = \"sqlite://x.db\"\ntable = \"t\"\ncursor = [\"id\"]\n\n\
         [sinks.s]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/in\"\n{extra}\n\n\
         [pipelines.p]\nsource = \"db\"\nsink = \"s\"\nschedule = {{ every = \"1h\" }}\n{pipeline}\n"
    )
}

fn load(text: &str, format: Format) -> Config {
    load_str(text, format, "c", &no_env).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn sink(config: &Config) -> &HttpSinkConfig {
    let SinkConfig::Http(sink) = &config.sinks["s"] else {
        panic!("an http sink")
    };
    sink
}

fn concurrency(written: &str) -> ConcurrencyConfig {
    sink(&load(
        &toml(&format!("delivery.concurrency = {written}"), ""),
        Format::Toml,
    ))
    .delivery
    .concurrency
}

#[test]
fn defaults_when_left_out() {
    let config = load(&toml("", ""), Format::Toml);
    let s = &sink(&config).delivery;
    assert_eq!(s.retry.initial, config::DEFAULT_RETRY_INITIAL);
    assert_eq!(s.retry.multiplier, config::DEFAULT_RETRY_MULTIPLIER);
    assert_eq!(s.retry.max_delay, config::DEFAULT_RETRY_MAX_DELAY);
    assert_eq!(s.retry.max_attempts, 0);
    assert!(s.retry.give_up_after.as_std().is_zero());
    assert!(s.status.success.is_empty() && s.status.reject.is_empty());
    assert!(s.circuit_breaker.enabled);
    assert_eq!(s.circuit_breaker.min_requests, 10);
    assert_eq!(s.rate_limit.requests_per_second, None);
    assert_eq!(s.concurrency, ConcurrencyConfig::Fixed(1));
    assert_eq!(sink(&config).idempotency_header, "Idempotency-Key");
    let p = &config.pipelines["p"];
    assert_eq!(p.ack, AckMode::Buffered);
    assert_eq!(p.schema, None);
    assert_eq!(p.buffer.max_bytes.0, 256 << 20);
    assert_eq!(p.buffer.fsync, FsyncPolicy::Batch);
}

#[test]
fn concurrency_forms() {
    assert_eq!(concurrency("4"), ConcurrencyConfig::Fixed(4));
    assert_eq!(
        concurrency("\"adaptive\""),
        ConcurrencyConfig::Adaptive { min: 1, max: 32 }
    );
    assert_eq!(
        concurrency("{ adaptive = { min = 2, max = 8 } }"),
        ConcurrencyConfig::Adaptive { min: 2, max: 8 }
    );
    assert_eq!(
        concurrency("{ adaptive = { max = 8 } }"),
        ConcurrencyConfig::Adaptive { min: 1, max: 8 }
    );
    assert_eq!(
        concurrency("{ adaptive = {} }"),
        ConcurrencyConfig::Adaptive { min: 1, max: 32 }
    );
}

#[test]
fn concurrency_type_errors_keep_their_path() {
    for (written, path, needle) in [
        (
            "-1",
            "sinks.s.delivery.concurrency",
            "expected a number of requests",
        ),
        (
            "4.5",
            "sinks.s.delivery.concurrency",
            "expected a number of requests",
        ),
        (
            "true",
            "sinks.s.delivery.concurrency",
            "expected a number of requests",
        ),
        (
            "{ adaptiv = {} }",
            "sinks.s.delivery.concurrency.adaptiv",
            "unknown field",
        ),
        (
            "{}",
            "sinks.s.delivery.concurrency",
            "missing required field \"adaptive\"",
        ),
        (
            "{ adaptive = { min = \"1\" } }",
            "sinks.s.delivery.concurrency.adaptive.min",
            "invalid type",
        ),
        ("0", "sinks.s.delivery.concurrency", "must be 1 or more"),
    ] {
        let errors = load_str(
            &toml(&format!("delivery.concurrency = {written}"), ""),
            Format::Toml,
            "c",
            &no_env,
        )
        .expect_err(written);
        // A misspelt `adaptive` is also reported as missing; nothing else.
        assert!(errors.0.len() <= 2, "{written}: {errors}");
        let error = errors
            .0
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{written}: no error at {path}: {errors}"));
        assert!(error.message.contains(needle), "{written}: {errors}");
        assert!(error.location.is_some(), "{written}: {errors}");
    }
}

#[test]
fn every_setting_loads_the_same_from_toml_and_yaml() {
    let toml_text = toml(
        "idempotency_header = \"\"\n\
         delivery.retry = { initial = \"1s\", multiplier = 3, max = \"5m\", max_attempts = 10, give_up_after = \"24h\" }\n\
         delivery.status = { success = [409], retry = [425], reject = [503], split = [400] }\n\
         delivery.circuit_breaker = { enabled = false, failure_ratio = 0.25, min_requests = 5, window = \"1m\", open_for = \"10s\", half_open_probes = 2 }\n\
         delivery.rate_limit = { requests_per_second = 0.5, records_per_second = 1000 }\n\
         delivery.concurrency = { adaptive = { min = 2, max = 16 } }",
        "ack = \"delivered\"\nschema = \"schemas/request.json\"\nbuffer = { max_bytes = \"1GiB\", fsync = \"100ms\" }",
    );
    let yaml_text = "sources:\n  db: { type: sqlite, url: 'sqlite://x.db', table: t, cursor: [id] }\n\
        sinks:\n  s:\n    type: http\n    url: http://127.0.0.1:9/in\n\
        \x20   idempotency_header: ''\n\
        \x20   delivery:\n\
        \x20     retry: { initial: 1s, multiplier: 3, max: 5m, max_attempts: 10, give_up_after: 24h }\n\
        \x20     status: { success: [409], retry: [425], reject: [503], split: [400] }\n\
        \x20     circuit_breaker: { enabled: false, failure_ratio: 0.25, min_requests: 5, window: 1m, open_for: 10s, half_open_probes: 2 }\n\
        \x20     rate_limit: { requests_per_second: 0.5, records_per_second: 1000 }\n\
        \x20     concurrency: { adaptive: { min: 2, max: 16 } }\n\
        pipelines:\n  p:\n    source: db\n    sink: s\n    schedule: { every: 1h }\n\
        \x20   ack: delivered\n    schema: schemas/request.json\n    buffer: { max_bytes: 1GiB, fsync: 100ms }\n";
    let a = load(&toml_text, Format::Toml);
    let b = load(yaml_text, Format::Yaml);
    assert_eq!(
        serde_json::to_value(&a).expect("serializes"),
        serde_json::to_value(&b).expect("serializes"),
    );
    let s = &sink(&a).delivery;
    assert_eq!(
        s.retry.max_delay.as_std(),
        Duration::from_secs(300),
        "`max` is accepted"
    );
    assert_eq!(s.retry.multiplier, 3.0);
    assert_eq!(s.status.split, [400]);
    assert!(!s.circuit_breaker.enabled);
    assert_eq!(s.rate_limit.requests_per_second, Some(0.5));
    assert_eq!(
        s.concurrency,
        ConcurrencyConfig::Adaptive { min: 2, max: 16 }
    );
    assert_eq!(sink(&a).idempotency_header, "");
    let p = &a.pipelines["p"];
    assert_eq!(p.ack, AckMode::Delivered);
    assert_eq!(
        p.buffer.fsync,
        FsyncPolicy::Interval("100ms".parse().expect("duration"))
    );
    assert_eq!(
        p.schema_path(Path::new("/etc/caudal")),
        Some(Path::new("/etc/caudal/schemas/request.json").to_path_buf())
    );
    // The model serializes back to a form that loads again.
    let json = serde_json::to_value(s).expect("serializes");
    assert_eq!(
        json["concurrency"],
        serde_json::json!({"adaptive": {"min": 2, "max": 16}})
    );
    assert_eq!(
        serde_json::to_value(p).expect("serializes")["buffer"]["fsync"],
        "100ms"
    );
}

#[test]
fn absolute_schema_paths_are_kept() {
    let config = load(&toml("", "schema = \"/srv/schema.json\""), Format::Toml);
    assert_eq!(
        config.pipelines["p"].schema_path(Path::new("/etc/caudal")),
        Some(Path::new("/srv/schema.json").to_path_buf())
    );
}

#[test]
fn the_schema_documents_the_delivery_settings() {
    let schema = serde_json::to_string(&config::load::json_schema()).expect("serializes");
    for needle in [
        "circuit_breaker",
        "half_open_probes",
        "requests_per_second",
        "idempotency_header",
        "Idempotency-Key",
        "\"adaptive\"",
        "\"batch\"",
        "\"delivered\"",
        "max_attempts",
    ] {
        assert!(schema.contains(needle), "{needle} missing from the schema");
    }
}

#[test]
fn the_old_spelling_still_loads_with_a_warning_at_each_setting() {
    let old = load(
        &toml(
            "retry = { initial = \"1s\" }\nconcurrency = 4\nrate_limit = { requests_per_second = 2 }",
            "",
        ),
        Format::Toml,
    );
    let new = load(
        &toml(
            "[sinks.s.delivery]\nretry = { initial = \"1s\" }\nconcurrency = 4\nrate_limit = { requests_per_second = 2 }",
            "",
        ),
        Format::Toml,
    );
    assert_eq!(sink(&old).delivery, sink(&new).delivery);
    assert_eq!(sink(&old).delivery.concurrency, ConcurrencyConfig::Fixed(4));
    assert!(new.warnings.is_empty(), "{:?}", new.warnings);
    let warned: Vec<(&str, u32)> = old
        .warnings
        .iter()
        .map(|w| (w.path.as_str(), w.location.as_ref().map_or(0, |l| l.line)))
        .collect();
    assert_eq!(
        warned,
        [
            ("sinks.s.retry", 10),
            ("sinks.s.concurrency", 11),
            ("sinks.s.rate_limit", 12)
        ]
    );
    assert!(
        old.warnings[0].message.contains("`delivery.retry`"),
        "{}",
        old.warnings[0]
    );
}

#[test]
fn a_setting_written_both_ways_is_an_error() {
    let errors = load_str(
        &toml("concurrency = 4\ndelivery.concurrency = 2", ""),
        Format::Toml,
        "c",
        &no_env,
    )
    .expect_err("ambiguous");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].path, "sinks.s.concurrency");
    assert!(errors.0[0].message.contains("not both"), "{}", errors.0[0]);
}
