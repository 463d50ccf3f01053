//! OTLP/HTTP traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a
//! receiver on loopback, `caudal once` sends a span per run and per batch
//! delivery, with the source position and the outcome.

mod support;

use caudal_testkit::Receiver;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;
use support::{Output, PIPELINE, World, command};

/// Every span the collector got: name and attributes as text.
fn spans(collector: &Receiver) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for r in collector.requests() {
        assert_eq!(r.path, "/v1/traces", "OTLP/HTTP traces go to /v1/traces");
        let request = ExportTraceServiceRequest::decode(r.raw_body.as_ref())
            .expect("an OTLP protobuf export request");
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Any::StringValue(s)) => s.clone(),
                                Some(Any::IntValue(i)) => i.to_string(),
                                Some(Any::BoolValue(b)) => b.to_string(),
                                Some(Any::DoubleValue(d)) => d.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    out.push((span.name, attributes));
                }
            }
        }
    }
    out
}

fn attribute<'a>(attributes: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_and_its_batches_are_exported_as_spans() {
    let mut world = World::sqlite().await;
    world.max_records = 10;
    world.insert(1..=25, 0).await;
    let collector = Receiver::start().await;
    let mut cmd = command(&world.write_config(), world.dir.path(), &["once", PIPELINE]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url(""));
    let out = Output::of(cmd).await;
    assert_eq!(out.code, Some(0), "{out}");
    let spans = spans(&collector);
    let runs: Vec<_> = spans.iter().filter(|(n, _)| n == "run").collect();
    assert_eq!(runs.len(), 1, "one run span: {spans:?}");
    let run = &runs[0].1;
    assert_eq!(attribute(run, "pipeline"), Some(PIPELINE), "{run:?}");
    assert_eq!(attribute(run, "outcome"), Some("succeeded"), "{run:?}");
    assert_eq!(attribute(run, "rows_read"), Some("25"), "{run:?}");
    assert!(
        attribute(run, "position").is_some_and(|p| p.contains("25")),
        "the checkpoint position: {run:?}"
    );
    let batches: Vec<_> = spans.iter().filter(|(n, _)| n == "deliver").collect();
    assert_eq!(batches.len(), 3, "25 records in batches of 10: {spans:?}");
    for (_, b) in &batches {
        assert_eq!(attribute(b, "outcome"), Some("delivered"), "{b:?}");
        assert!(
            attribute(b, "batch").is_some_and(|k| !k.is_empty()),
            "{b:?}"
        );
        assert!(attribute(b, "position").is_some(), "{b:?}");
    }
    // Without the variable, nothing is exported.
    collector.clear();
    world.insert(26..=27, 1).await;
    let out = Output::of(command(
        &world.write_config(),
        world.dir.path(),
        &["once", PIPELINE],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(collector.requests().is_empty());
}
