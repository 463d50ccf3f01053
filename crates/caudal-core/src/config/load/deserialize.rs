//! From the JSON form of the tree to the model, keeping the field path of
//! every error and reporting as many errors as possible in one pass.
//!
//! - Each entry of `sources`, `sinks` and `pipelines` is deserialized on its
//!   own, so a mistake in one entry does not hide mistakes in the others.
//! - The `type`-tagged enums are dispatched here (read `type`, remove it,
//!   deserialize the variant's struct) because serde's internally tagged
//!   enums buffer their content and lose field paths.
//! - Within one entry, a field that fails is removed and deserialization is
//!   retried, so every unknown field and every bad value is reported, not
//!   only the first.
//! - serde's messages are reworded for people (`unknown field "x"; expected
//!   one of: a, b`).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::path::{FieldPath, Problem, Segment};
use crate::config::{Config, PipelineConfig, SinkConfig, SourceConfig};

/// Source `type` values, in the order they are suggested.
const SOURCE_TYPES: &[&str] = &[
    "postgres",
    "mysql",
    "sqlite",
    "crawl",
    "aggregate",
    "rabbitmq",
    "nats",
    "kafka",
];
/// Sink `type` values, in the order they are suggested.
const SINK_TYPES: &[&str] = &["http", "files", "rabbitmq", "nats", "kafka"];

/// How many failing fields of one entry are reported before giving up (a
/// guard only: each round removes a field, so rounds always end).
const MAX_ROUNDS: usize = 100;

/// Deserializes the whole configuration. Returns `None` when anything
/// failed; every failure is in `problems`.
pub(crate) fn config(root: Value, problems: &mut Vec<Problem>) -> Option<Config> {
    let before = problems.len();
    let Value::Object(mut top) = root else {
        problems.push(Problem::at(
            FieldPath::root(),
            format!(
                "expected a table at the top level, found {}",
                describe(&root)
            ),
        ));
        return None;
    };
    let sources_value = top.remove("sources");
    let sinks_value = top.remove("sinks");
    let pipelines_value = top.remove("pipelines");
    // Everything else (`state`, unknown top-level keys) goes through the
    // model itself, so new top-level fields need no change here.
    let base: Option<Config> = deserialize_all(&Value::Object(top), &FieldPath::root(), problems);

    let mut sources = BTreeMap::new();
    let sources_path = FieldPath::root().key("sources");
    for (name, entry) in named_entries(sources_value, &sources_path, "sources", problems) {
        let path = sources_path.key(name.clone());
        if let Some(source) = source(entry, &path, problems) {
            sources.insert(name, source);
        }
    }

    let mut sinks = BTreeMap::new();
    let sinks_path = FieldPath::root().key("sinks");
    for (name, entry) in named_entries(sinks_value, &sinks_path, "sinks", problems) {
        let path = sinks_path.key(name.clone());
        if let Some(sink) = sink(entry, &path, problems) {
            sinks.insert(name, sink);
        }
    }

    let mut pipelines = BTreeMap::new();
    let pipelines_path = FieldPath::root().key("pipelines");
    for (name, entry) in named_entries(pipelines_value, &pipelines_path, "pipelines", problems) {
        let path = pipelines_path.key(name.clone());
        if let Some(pipeline) = deserialize_all::<PipelineConfig>(&entry, &path, problems) {
            pipelines.insert(name, pipeline);
        }
    }

    if problems.len() > before {
        return None;
    }
    base.map(|base| Config {
        sources,
        sinks,
        pipelines,
        ..base
    })
}

/// The entries of a table of named things (`[sources.NAME]`). An empty
/// YAML key (`sources:`) is an empty table.
fn named_entries(
    value: Option<Value>,
    path: &FieldPath,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Vec<(String, Value)> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(entries)) => entries.into_iter().collect(),
        Some(other) => {
            problems.push(Problem::at(
                path.clone(),
                format!(
                    "expected a table of named {what}, found {}",
                    describe(&other)
                ),
            ));
            Vec::new()
        }
    }
}

fn source(entry: Value, path: &FieldPath, problems: &mut Vec<Problem>) -> Option<SourceConfig> {
    let (type_name, fields) = split_type(entry, path, SOURCE_TYPES, problems)?;
    match type_name.as_str() {
        "postgres" => deserialize_all(&fields, path, problems).map(SourceConfig::Postgres),
        "mysql" => deserialize_all(&fields, path, problems).map(SourceConfig::Mysql),
        "sqlite" => deserialize_all(&fields, path, problems).map(SourceConfig::Sqlite),
        "crawl" => deserialize_all(&fields, path, problems).map(SourceConfig::Crawl),
        "aggregate" => deserialize_all(&fields, path, problems).map(SourceConfig::Aggregate),
        "rabbitmq" => deserialize_all(&fields, path, problems).map(SourceConfig::Rabbitmq),
        "nats" => deserialize_all(&fields, path, problems).map(SourceConfig::Nats),
        "kafka" => deserialize_all(&fields, path, problems).map(SourceConfig::Kafka),
        other => {
            problems.push(unknown_type(path, "source", other, SOURCE_TYPES));
            None
        }
    }
}

fn sink(entry: Value, path: &FieldPath, problems: &mut Vec<Problem>) -> Option<SinkConfig> {
    let (type_name, fields) = split_type(entry, path, SINK_TYPES, problems)?;
    match type_name.as_str() {
        "http" => deserialize_all(&fields, path, problems).map(SinkConfig::Http),
        "files" => deserialize_all(&fields, path, problems).map(SinkConfig::Files),
        "rabbitmq" => deserialize_all(&fields, path, problems).map(SinkConfig::Rabbitmq),
        "nats" => deserialize_all(&fields, path, problems).map(SinkConfig::Nats),
        "kafka" => deserialize_all(&fields, path, problems).map(SinkConfig::Kafka),
        other => {
            problems.push(unknown_type(path, "sink", other, SINK_TYPES));
            None
        }
    }
}

fn unknown_type(path: &FieldPath, what: &str, found: &str, types: &[&str]) -> Problem {
    Problem::at(
        path.key("type"),
        format!(
            "unknown {what} type {found:?}; expected one of: {}",
            types.join(", ")
        ),
    )
}

/// Takes the `type` field out of an entry: returns the type name and the
/// remaining fields.
fn split_type(
    entry: Value,
    path: &FieldPath,
    types: &[&str],
    problems: &mut Vec<Problem>,
) -> Option<(String, Value)> {
    let Value::Object(mut fields) = entry else {
        problems.push(Problem::at(
            path.clone(),
            format!(
                "expected a table with a \"type\" field, found {}",
                describe(&entry)
            ),
        ));
        return None;
    };
    match fields.remove("type") {
        Some(Value::String(type_name)) => Some((type_name, Value::Object(fields))),
        Some(other) => {
            problems.push(Problem::at(
                path.key("type"),
                format!(
                    "expected a string, one of: {}; found {}",
                    types.join(", "),
                    describe(&other)
                ),
            ));
            None
        }
        None => {
            problems.push(Problem::at_key(
                path.clone(),
                format!(
                    "missing required field \"type\"; set it to one of: {}",
                    types.join(", ")
                ),
            ));
            None
        }
    }
}

/// Deserializes `value` (found at `base`) into `T`. On an error the failing
/// field is recorded, removed, and deserialization retried, so all bad
/// fields are reported. Returns `None` if anything failed.
fn deserialize_all<T: DeserializeOwned>(
    value: &Value,
    base: &FieldPath,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut value = value.clone();
    let mut removed: Vec<FieldPath> = Vec::new();
    let mut failed = false;
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(parsed) => return if failed { None } else { Some(parsed) },
            Err(error) => error,
        };
        let relative = FieldPath::from_serde(error.path());
        let message = error.inner().to_string();
        if let Some(field) = missing_field_name(&message)
            && removed.contains(&relative.key(field))
        {
            // We removed that field after reporting it: nothing new here.
            return None;
        }
        failed = true;
        problems.push(reworded(base.join(&relative), &message));
        // Cut at a key, not inside an array: removing an element would
        // shift the indices of the elements after it.
        let cut = up_to_last_key(&relative);
        if cut.is_root() || !remove(&mut value, &cut) {
            return None;
        }
        removed.push(cut);
    }
    None
}

fn up_to_last_key(path: &FieldPath) -> FieldPath {
    let mut cut = path.clone();
    while let Some(Segment::Index(_)) = cut.segments().last() {
        cut = cut.parent();
    }
    cut
}

/// Removes the field at `path`; false if there is no such field.
fn remove(value: &mut Value, path: &FieldPath) -> bool {
    let Some((Segment::Key(last), parents)) = path.segments().split_last() else {
        return false;
    };
    let mut current = value;
    for segment in parents {
        let next = match segment {
            Segment::Key(key) => current.as_object_mut().and_then(|o| o.get_mut(key)),
            Segment::Index(i) => current.as_array_mut().and_then(|a| a.get_mut(*i)),
        };
        match next {
            Some(next) => current = next,
            None => return false,
        }
    }
    current
        .as_object_mut()
        .and_then(|object: &mut Map<String, Value>| object.remove(last))
        .is_some()
}

/// `missing field `x`` → `x`.
fn missing_field_name(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
}

/// Rewords serde's messages and decides what they point at.
fn reworded(path: FieldPath, message: &str) -> Problem {
    if let Some(field) = missing_field_name(message) {
        // The table lacking the field: its key is where it is written.
        return Problem::at_key(path, format!("missing required field {field:?}"));
    }
    if let Some((name, expected)) = split_unknown(message, "unknown field `") {
        let message = match expected {
            Some(list) => format!("unknown field {name:?}; expected one of: {list}"),
            None => format!("unknown field {name:?}; this table takes no fields"),
        };
        return Problem::at_key(path, message);
    }
    if let Some((name, expected)) = split_unknown(message, "unknown variant `") {
        let message = match expected {
            Some(list) => format!("unknown value {name:?}; expected one of: {list}"),
            None => format!("unknown value {name:?}"),
        };
        return Problem::at(path, message);
    }
    Problem::at(path, plain_number_types(message))
}

/// "expected u32" → "expected a whole number, 0 or more".
fn plain_number_types(message: &str) -> String {
    for (rust, plain) in [
        ("u8", "a whole number, 0 or more"),
        ("u16", "a whole number, 0 or more"),
        ("u32", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("usize", "a whole number, 0 or more"),
        ("i32", "a whole number"),
        ("i64", "a whole number"),
        ("f64", "a number"),
    ] {
        if let Some(start) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{start}expected {plain}");
        }
    }
    message.to_string()
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into the
/// name and "a, b" (`None` for "there are no fields").
fn split_unknown<'m>(message: &'m str, prefix: &str) -> Option<(&'m str, Option<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest.strip_prefix(", expected ").map(|list| {
        // Names are the odd pieces between backticks: "one of `a`, `b`".
        list.split('`')
            .skip(1)
            .step_by(2)
            .collect::<Vec<_>>()
            .join(", ")
    });
    Some((name, expected.filter(|list| !list.is_empty())))
}

/// "a string", "a table", ... for messages about the wrong kind of value.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::load::path::Anchor;

    fn problems_of(value: Value) -> Vec<String> {
        let mut problems = Vec::new();
        let config = config(value, &mut problems);
        assert_eq!(config.is_none(), !problems.is_empty());
        problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn serde_messages_are_reworded() {
        let p = reworded(
            FieldPath::root().key("x"),
            "unknown field `x`, expected one of `a`, `b`",
        );
        assert_eq!(p.message, "unknown field \"x\"; expected one of: a, b");
        assert_eq!(p.anchor, Anchor::Key);
        let p = reworded(FieldPath::root(), "unknown field `x`, expected `a` or `b`");
        assert_eq!(p.message, "unknown field \"x\"; expected one of: a, b");
        let p = reworded(FieldPath::root(), "unknown field `x`, there are no fields");
        assert_eq!(p.message, "unknown field \"x\"; this table takes no fields");
        let p = reworded(
            FieldPath::root(),
            "unknown variant `cdc`, expected `incremental`",
        );
        assert_eq!(
            p.message,
            "unknown value \"cdc\"; expected one of: incremental"
        );
        let p = reworded(FieldPath::root(), "missing field `cursor`");
        assert_eq!(p.message, "missing required field \"cursor\"");
        let p = reworded(
            FieldPath::root(),
            "invalid value: integer `-1`, expected u32",
        );
        assert_eq!(
            p.message,
            "invalid value: integer `-1`, expected a whole number, 0 or more"
        );
    }

    #[test]
    fn every_bad_field_of_an_entry_is_reported() {
        let problems = problems_of(json!({
            "sinks": {"s": {
                "type": "http",
                "url": "http://x",
                "typo": 1,
                "timeout": "5x",
                "batch": {"max_records": "many", "other": true},
            }},
        }));
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("sinks.s.typo: unknown field \"typo\""))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("sinks.s.timeout: invalid duration"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("sinks.s.batch.max_records: invalid type"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("sinks.s.batch.other: unknown field"))
        );
    }

    #[test]
    fn a_removed_required_field_is_not_reported_twice() {
        let problems = problems_of(json!({
            "pipelines": {"p": {"source": "a", "sink": "b", "schedule": "hourly"}},
        }));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("pipelines.p.schedule: invalid type"));
    }

    #[test]
    fn entries_fail_independently_and_keep_paths() {
        let problems = problems_of(json!({
            "sources": {
                "a": {"type": "postgres", "url": "postgres://x", "cursor": ["id", 5]},
                "b": {"type": "oracle"},
                "c": {"url": "x"},
                "d": "postgres",
            },
            "pipelines": {"p": {"source": "a", "sink": "s", "schedule": {}, "extra": 1}},
            "stats": {},
        }));
        assert_eq!(
            problems,
            [
                "stats: unknown field \"stats\"; expected one of: state, sources, sinks, pipelines, server, retention, workflows, pools, crawl, cache, aggregates, alerts, notifiers, cluster, backup",
                "sources.a.cursor[1]: invalid type: integer `5`, expected a string",
                "sources.b.type: unknown source type \"oracle\"; expected one of: postgres, mysql, sqlite, crawl, aggregate, rabbitmq, nats, kafka",
                "sources.c: missing required field \"type\"; set it to one of: postgres, mysql, sqlite, crawl, aggregate, rabbitmq, nats, kafka",
                "sources.d: expected a table with a \"type\" field, found a string",
                "pipelines.p.extra: unknown field \"extra\"; expected one of: source, sink, schedule, key, ack, schema, buffer",
            ]
        );
    }

    #[test]
    fn a_valid_tree_becomes_the_model() {
        let mut problems = Vec::new();
        let config = config(
            json!({
                "sources": {"a": {"type": "sqlite", "url": "sqlite://x.db", "table": "t", "cursor": ["id"]}},
                "sinks": {"s": {"type": "http", "url": "http://x"}},
                "pipelines": {"p": {"source": "a", "sink": "s", "schedule": {"every": "1h"}}},
                "sources_extra": null,
            }),
            &mut problems,
        );
        // `sources_extra` is unknown; nothing else is wrong.
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(config.is_none());

        let config = super::config(
            json!({
                "sources": {"a": {"type": "sqlite", "url": "sqlite://x.db", "table": "t", "cursor": ["id"]}},
                "sinks": null,
            }),
            &mut problems,
        )
        .expect("valid");
        assert_eq!(config.sources["a"].type_name(), "sqlite");
        assert!(config.sinks.is_empty());
    }
}
