//! Template rendering on arbitrary template text and records: the HTTP
//! sink's body template, a broker sink's routing template and a report's
//! query template. Each is first checked as configuration loading checks
//! it, then rendered as the sink or the report renders it; a failure is an
//! error, never a panic.
//!
//! Input: two bytes of settings (the broker's partition count, the
//! report's day offset from 2025-01-01 as a signed byte), then NUL-separated
//! parts: the template, the pipeline name, then pairs of a record's key
//! (empty: none) and its JSON text (an object is taken as it is, anything
//! else becomes `{"value": text}`).
//!
//! Templates come from the operator's configuration, and minijinja lets
//! them loop and repeat strings at will: texts that could ask for unbounded
//! work (`range`, `*`) or are longer than a real template are skipped, so
//! a slow input means a slow caudal, not a greedy template.
#![no_main]

use caudal_connectors::broker::Route;
use caudal_connectors::sinks::http::HttpSink;
use caudal_core::config::HttpSinkConfig;
use caudal_core::record::{Json, ObjectWriter, Position};
use caudal_core::sink::Event;
use libfuzzer_sys::fuzz_target;

const MAX_TEMPLATE_BYTES: usize = 512;
const MAX_RECORDS: usize = 8;

fn event(index: usize, key: &str, text: &str) -> Event {
    let data = Json::parse(text).unwrap_or_else(|_| {
        let mut w = ObjectWriter::with_capacity(text.len() + 16);
        w.key("value").str(text);
        w.finish()
    });
    Event {
        key: (!key.is_empty()).then(|| key.to_string()),
        position: Position::Lsn {
            lsn: 1,
            index: index as u64,
        },
        data,
    }
}

fuzz_target!(|data: &[u8]| {
    let [partitions, days, rest @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let pipeline = parts.next().unwrap_or("sync");
    if template.len() > MAX_TEMPLATE_BYTES || template.contains("range") || template.contains('*') {
        return;
    }
    let rest: Vec<&str> = parts.collect();
    let events: Vec<Event> = rest
        .chunks(2)
        .take(MAX_RECORDS)
        .enumerate()
        .map(|(i, pair)| event(i, pair[0], pair.get(1).copied().unwrap_or("{}")))
        .collect();

    // The HTTP sink's body.
    if caudal_core::config::sinks::check_body_template(template).is_ok() {
        let config: HttpSinkConfig = serde_json::from_value(serde_json::json!({
            "url": "http://127.0.0.1:9/requests",
            "body": template,
        }))
        .expect("a minimal HTTP sink configuration");
        if let Ok(sink) = HttpSink::new("fuzz", &config) {
            let _ = sink.encode(pipeline, "batch-key", &events);
        }
    }

    // A broker sink's route.
    if caudal_core::config::brokers::check_routing_template(template).is_ok()
        && let Ok(route) = Route::new("fuzz", "subject", template, u32::from(*partitions))
    {
        // Literal text is the route as written (RabbitMQ's default
        // exchange takes an empty one); a template must render a name.
        let literal = !template.contains("{{") && !template.contains("{%");
        for event in &events {
            if let Ok(name) = route.render(pipeline, event) {
                assert!(
                    literal || !name.is_empty(),
                    "a route template rendered empty"
                );
            }
        }
    }

    // A report's query.
    let date = jiff::civil::date(2025, 1, 1)
        .checked_add(jiff::Span::new().days(i64::from(*days as i8)))
        .expect("within jiff's range");
    let _ = caudal_core::config::datasets::render_report_query(template, date);
});
