//! Loading never panics, whatever the file holds: arbitrary text, and a
//! valid file with a piece cut out (the usual shape of a half-edited file).

use caudal_core::config::{Format, load_str};
use proptest::prelude::*;

const VALID_TOML: &str = r#"[sources.db]
type = "sqlite"
url = "sqlite://${DB:-x.db}"
table = "t"
cursor = ["updated_at", "id"]

[sinks.api]
type = "http"
url = "http://127.0.0.1:8080/in"
headers = { "X-Token" = "${TOKEN:-none}" }
body = '{"items": {{ records | tojson }}}'

[pipelines.sync]
source = "db"
sink = "api"
schedule = { cron = "*/5 * * * *", tz = "UTC" }
"#;

const VALID_YAML: &str = r#"sources:
  db:
    type: sqlite
    url: sqlite://${DB:-x.db}
    table: t
    cursor: [updated_at, id]
sinks:
  api:
    type: http
    url: http://127.0.0.1:8080/in
    headers: { X-Token: "${TOKEN:-none}" }
    body: '{"items": {{ records | tojson }}}'
pipelines:
  sync:
    source: db
    sink: api
    schedule: { cron: '*/5 * * * *', tz: UTC }
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

/// `text` without the characters from `start` to `start + len` (clamped).
fn cut(text: &str, start: usize, len: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    let start = start % (chars.len() + 1);
    let end = (start + len).min(chars.len());
    chars[..start].iter().chain(&chars[end..]).collect()
}

#[test]
fn the_uncut_files_are_valid() {
    load_str(VALID_TOML, Format::Toml, "c.toml", &no_env).expect("valid TOML");
    load_str(VALID_YAML, Format::Yaml, "c.yaml", &no_env).expect("valid YAML");
}

proptest! {
    #[test]
    fn arbitrary_text_does_not_panic(text in "\\PC*") {
        let _ = load_str(&text, Format::Toml, "c.toml", &no_env);
        let _ = load_str(&text, Format::Yaml, "c.yaml", &no_env);
    }

    #[test]
    fn a_cut_file_does_not_panic_and_errors_have_locations(start in 0usize..600, len in 1usize..40) {
        for (text, format) in [(VALID_TOML, Format::Toml), (VALID_YAML, Format::Yaml)] {
            if let Err(errors) = load_str(&cut(text, start, len), format, "c", &no_env) {
                prop_assert!(!errors.0.is_empty());
                for error in &errors.0 {
                    prop_assert!(error.location.is_some(), "no location: {}", error);
                }
            }
        }
    }
}
