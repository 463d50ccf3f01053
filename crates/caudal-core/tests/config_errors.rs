//! What users read when a configuration file is wrong.
//!
//! Each case edits a valid seed-001 configuration in one way and snapshots
//! the numbered file followed by the full error output, in TOML and in
//! YAML, so a reviewer can check that every message is clear and points at
//! the right line and column. The environment is a fake closure, never the
//! process environment.

use caudal_core::config::{Config, Format, load_file, load_str};

const SEED_TOML: &str = r#"[state]
url = "${CAUDAL_STATE_URL:-sqlite://caudal.db}"

[sources.servicedesk]
type = "postgres"
url = "${SERVICEDESK_URL}"
mode = "incremental"
table = "public.service_requests"
cursor = ["last_modified_date", "request_id"]

[sinks.partner]
type = "http"
url = "https://partner.example/services-data/requests"
headers = { Authorization = "Bearer ${PARTNER_TOKEN}" }
batch = { max_records = 500, max_wait = "1s" }
body = '{"requests": {{ records | tojson }}}'

[pipelines.requests_to_partner]
source = "servicedesk"
sink = "partner"
schedule = { every = "1h" }
key = "request_id"
"#;

const SEED_YAML: &str = r#"state:
  url: ${CAUDAL_STATE_URL:-sqlite://caudal.db}

sources:
  servicedesk:
    type: postgres
    url: ${SERVICEDESK_URL}
    mode: incremental
    table: public.service_requests
    cursor: [last_modified_date, request_id]

sinks:
  partner:
    type: http
    url: https://partner.example/services-data/requests
    headers:
      Authorization: Bearer ${PARTNER_TOKEN}
    batch: { max_records: 500, max_wait: 1s }
    body: '{"requests": {{ records | tojson }}}'

pipelines:
  requests_to_partner:
    source: servicedesk
    sink: partner
    schedule: { every: 1h }
    key: request_id
"#;

/// The environment of a correctly set-up machine.
fn env(name: &str) -> Option<String> {
    match name {
        "SERVICEDESK_URL" => Some("postgres://app:s3cret@db.internal/servicedesk".into()),
        "PARTNER_TOKEN" => Some("t0k3n".into()),
        _ => None,
    }
}

fn empty_env(_: &str) -> Option<String> {
    None
}

/// `text` with `from` replaced by `to`; fails if `from` is not there, so a
/// case can never silently test the unedited file.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the file");
    text.replacen(from, to, 1)
}

/// The numbered file, a separator, and the errors as users see them.
fn report(file: &str, format: Format, text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    let errors = match load_str(text, format, file, env) {
        Ok(_) => panic!("{file} should be rejected:\n{text}"),
        Err(errors) => errors,
    };
    let numbered: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| format!("{:>2} | {line}", i + 1))
        .collect();
    format!("{}\n---\n{errors}", numbered.join("\n"))
}

/// Snapshots one broken file in both formats.
fn check(name: &str, toml: &str, yaml: &str) {
    check_with_env(name, toml, yaml, &env);
}

fn check_with_env(name: &str, toml: &str, yaml: &str, env: &dyn Fn(&str) -> Option<String>) {
    insta::assert_snapshot!(
        format!("{name}_toml"),
        report("caudal.toml", Format::Toml, toml, env)
    );
    insta::assert_snapshot!(
        format!("{name}_yaml"),
        report("caudal.yaml", Format::Yaml, yaml, env)
    );
}

#[test]
fn seed_001_loads_the_same_from_toml_and_yaml() {
    let from_toml = load_str(SEED_TOML, Format::Toml, "caudal.toml", &env).expect("valid TOML");
    let from_yaml = load_str(SEED_YAML, Format::Yaml, "caudal.yaml", &env).expect("valid YAML");
    assert_eq!(
        serde_json::to_value(&from_toml).expect("serializes"),
        serde_json::to_value(&from_yaml).expect("serializes"),
    );
    // Secrets serialize as "***", so compare them directly too.
    for config in [&from_toml, &from_yaml] {
        assert_eq!(config.state.url.expose(), "sqlite://caudal.db");
        let source = config.sources["servicedesk"].sql().expect("a SQL source");
        assert_eq!(
            source.url.expose(),
            "postgres://app:s3cret@db.internal/servicedesk"
        );
        assert_eq!(source.cursor, ["last_modified_date", "request_id"]);
        let caudal_core::config::SinkConfig::Http(sink) = &config.sinks["partner"] else {
            panic!("an http sink")
        };
        assert_eq!(sink.headers["Authorization"].expose(), "Bearer t0k3n");
        assert_eq!(sink.batch.max_records, 500);
        assert_eq!(
            sink.body.as_deref(),
            Some(r#"{"requests": {{ records | tojson }}}"#)
        );
        let pipeline = &config.pipelines["requests_to_partner"];
        assert_eq!(
            pipeline.schedule.every.map(|d| d.to_string()).as_deref(),
            Some("1h")
        );
    }
}

#[test]
fn an_environment_value_is_never_parsed_as_syntax() {
    let sneaky = |name: &str| match name {
        "PARTNER_TOKEN" => Some("x\"\n[state]\nurl = \"postgres://evil".to_string()),
        other => env(other),
    };
    let config = load_str(SEED_TOML, Format::Toml, "caudal.toml", &sneaky);
    // The value lands in the header as one string; the header check
    // refuses its line breaks, and the state URL is untouched.
    let errors = config.expect_err("line breaks in a header value");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].path, "sinks.partner.headers.Authorization");
    assert!(!errors.to_string().contains("evil"));
}

#[test]
fn load_file_picks_the_format_from_the_extension() {
    let dir = tempfile::tempdir().expect("temp dir");
    let no_env = |text: &str| {
        edit(
            &edit(text, "${SERVICEDESK_URL}", "postgres://db/servicedesk"),
            "${PARTNER_TOKEN}",
            "t0k3n",
        )
    };
    let toml_path = dir.path().join("caudal.toml");
    let yaml_path = dir.path().join("caudal.yml");
    std::fs::write(&toml_path, no_env(SEED_TOML)).expect("write");
    std::fs::write(&yaml_path, no_env(SEED_YAML)).expect("write");
    let a: Config = load_file(&toml_path).expect("TOML file loads");
    let b: Config = load_file(&yaml_path).expect("YAML file loads");
    assert_eq!(
        serde_json::to_value(&a).expect("serializes"),
        serde_json::to_value(&b).expect("serializes"),
    );

    let missing = load_file(&dir.path().join("nope.toml")).expect_err("no such file");
    assert!(missing.to_string().starts_with("cannot read "), "{missing}");
}

#[test]
fn syntax_error() {
    check(
        "syntax_error",
        &edit(SEED_TOML, r#"sink = "partner""#, "sink = partner"),
        &edit(SEED_YAML, "    sink: partner", "   sink: partner"),
    );
}

#[test]
fn yaml_unquoted_cron_gets_a_hint() {
    let yaml = edit(SEED_YAML, "{ every: 1h }", "\n      cron: */5 * * * *");
    insta::assert_snapshot!(report("caudal.yaml", Format::Yaml, &yaml, &env));
}

#[test]
fn missing_required_fields() {
    check(
        "missing_required_fields",
        &edit(
            SEED_TOML,
            "cursor = [\"last_modified_date\", \"request_id\"]\n",
            "",
        ),
        &edit(
            SEED_YAML,
            "    cursor: [last_modified_date, request_id]\n",
            "",
        ),
    );
}

#[test]
fn duplicate_key() {
    check(
        "duplicate_key",
        &edit(
            SEED_TOML,
            "key = \"request_id\"",
            "key = \"request_id\"\nsink = \"other\"",
        ),
        &edit(
            SEED_YAML,
            "    key: request_id",
            "    key: request_id\n    sink: other",
        ),
    );
}

#[test]
fn unknown_field_at_top_level() {
    check(
        "unknown_field_at_top_level",
        &edit(SEED_TOML, "[state]", "[stat]"),
        &edit(SEED_YAML, "state:", "stat:"),
    );
}

#[test]
fn unknown_field_in_a_source() {
    check(
        "unknown_field_in_a_source",
        &edit(SEED_TOML, "table = ", "tabel = "),
        &edit(SEED_YAML, "table: ", "tabel: "),
    );
}

#[test]
fn bad_duration() {
    check(
        "bad_duration",
        &edit(SEED_TOML, r#"every = "1h""#, r#"every = "1 hour""#),
        &edit(SEED_YAML, "every: 1h", "every: 1 hour"),
    );
}

#[test]
fn undefined_sink() {
    check(
        "undefined_sink",
        &edit(SEED_TOML, r#"sink = "partner""#, r#"sink = "partnr""#),
        &edit(SEED_YAML, "sink: partner", "sink: partnr"),
    );
}

#[test]
fn undefined_source() {
    check(
        "undefined_source",
        &edit(
            SEED_TOML,
            r#"source = "servicedesk""#,
            r#"source = "service_desk""#,
        ),
        &edit(SEED_YAML, "source: servicedesk", "source: service_desk"),
    );
}

#[test]
fn missing_env_vars_are_all_reported() {
    check_with_env("missing_env_vars", SEED_TOML, SEED_YAML, &empty_env);
}

#[test]
fn bad_cron() {
    check(
        "bad_cron",
        &edit(SEED_TOML, r#"every = "1h""#, r#"cron = "0 25 * * *""#),
        &edit(SEED_YAML, "every: 1h", "cron: '0 25 * * *'"),
    );
}

#[test]
fn bad_time_zone() {
    check(
        "bad_time_zone",
        &edit(
            SEED_TOML,
            r#"every = "1h""#,
            r#"cron = "0 * * * *", tz = "America/Mexico City""#,
        ),
        &edit(
            SEED_YAML,
            "every: 1h",
            "cron: '0 * * * *', tz: America/Mexico City",
        ),
    );
}

#[test]
fn two_schedules() {
    check(
        "two_schedules",
        &edit(
            SEED_TOML,
            r#"every = "1h""#,
            r#"every = "1h", cron = "0 * * * *""#,
        ),
        &edit(SEED_YAML, "every: 1h", "every: 1h, cron: '0 * * * *'"),
    );
}

#[test]
fn table_and_query_both_set() {
    check(
        "table_and_query",
        &edit(
            SEED_TOML,
            "table = \"public.service_requests\"",
            "table = \"public.service_requests\"\nquery = \"SELECT * FROM service_requests\"",
        ),
        &edit(
            SEED_YAML,
            "    table: public.service_requests",
            "    table: public.service_requests\n    query: SELECT * FROM service_requests",
        ),
    );
}

#[test]
fn wrong_url_scheme_does_not_print_the_password() {
    let mysql_env = |name: &str| match name {
        "SERVICEDESK_URL" => Some("mysql://app:s3cret@db.internal/servicedesk".to_string()),
        other => env(other),
    };
    check_with_env("wrong_url_scheme", SEED_TOML, SEED_YAML, &mysql_env);
    let errors =
        load_str(SEED_TOML, Format::Toml, "caudal.toml", &mysql_env).expect_err("wrong scheme");
    assert!(!errors.to_string().contains("s3cret"));
}

#[test]
fn bad_template() {
    check(
        "bad_template",
        &edit(SEED_TOML, "tojson }}}'", "tojson }'"),
        &edit(SEED_YAML, "tojson }}}'", "tojson }'"),
    );
}

#[test]
fn unknown_source_type() {
    check(
        "unknown_source_type",
        &edit(SEED_TOML, r#"type = "postgres""#, r#"type = "postgress""#),
        &edit(SEED_YAML, "type: postgres", "type: postgress"),
    );
}

#[test]
fn several_type_errors_are_reported_together() {
    let toml = edit(
        &edit(
            &edit(
                SEED_TOML,
                "max_records = 500",
                "max_records = \"500\", max_recs = 1",
            ),
            "cursor = [",
            "page_size = -1\ncursor = [",
        ),
        "key = ",
        "shedule = \"1h\"\nkey = ",
    );
    let yaml = edit(
        &edit(
            &edit(
                SEED_YAML,
                "max_records: 500",
                "max_records: '500', max_recs: 1",
            ),
            "    cursor: [",
            "    page_size: -1\n    cursor: [",
        ),
        "    key: ",
        "    shedule: 1h\n    key: ",
    );
    check("several_type_errors", &toml, &yaml);
}

#[test]
fn several_checks_fail_together() {
    let toml = edit(
        &edit(
            &edit(
                SEED_TOML,
                "cursor = [\"last_modified_date\", \"request_id\"]",
                "cursor = [\"request_id\", \"request_id\"]\ncolumns = [\"status_id\"]\npage_size = 0",
            ),
            "type = \"http\"",
            "type = \"http\"\nmethod = \"post\"\ntimeout = \"0s\"",
        ),
        r#"schedule = { every = "1h" }"#,
        r#"schedule = { every = "0s", tz = "UTC", poll = "5s" }"#,
    );
    let yaml = edit(
        &edit(
            &edit(
                SEED_YAML,
                "    cursor: [last_modified_date, request_id]",
                "    cursor: [request_id, request_id]\n    columns: [status_id]\n    page_size: 0",
            ),
            "    type: http",
            "    type: http\n    method: post\n    timeout: 0s",
        ),
        "schedule: { every: 1h }",
        "schedule: { every: 0s, tz: UTC, poll: 5s }",
    );
    check("several_checks", &toml, &yaml);
}

#[test]
fn bad_delivery_values() {
    let toml = edit(
        &edit(
            SEED_TOML,
            "body = '",
            "retry = { initial = \"2m\", multiplier = 0.5 }\n\
             status = { success = [409], reject = [409, 700] }\n\
             circuit_breaker = { failure_ratio = 1.5, half_open_probes = 0 }\n\
             rate_limit = { requests_per_second = 0 }\n\
             concurrency = { adaptive = { min = 4, max = 2 } }\n\
             idempotency_header = \"Idempotency Key\"\n\
             body = '",
        ),
        "key = \"request_id\"",
        "key = \"request_id\"\nschema = \"\"\nbuffer = { max_bytes = \"0\", fsync = \"0s\" }",
    );
    let yaml = edit(
        &edit(
            SEED_YAML,
            "    body: '",
            "    retry: { initial: 2m, multiplier: 0.5 }\n\
             \x20   status: { success: [409], reject: [409, 700] }\n\
             \x20   circuit_breaker: { failure_ratio: 1.5, half_open_probes: 0 }\n\
             \x20   rate_limit: { requests_per_second: 0 }\n\
             \x20   concurrency: { adaptive: { min: 4, max: 2 } }\n\
             \x20   idempotency_header: Idempotency Key\n\
             \x20   body: '",
        ),
        "    key: request_id",
        "    key: request_id\n    schema: ''\n    buffer: { max_bytes: '0', fsync: 0s }",
    );
    check("bad_delivery_values", &toml, &yaml);
}

#[test]
fn bad_delivery_types() {
    let toml = edit(
        &edit(
            SEED_TOML,
            "body = '",
            "retry = { max_delay = \"1 minute\", attempts = 3 }\n\
             status = { success = [\"409\"] }\n\
             concurrency = { adaptive = { min = 1, maximum = 8 } }\n\
             body = '",
        ),
        "key = \"request_id\"",
        "key = \"request_id\"\nack = \"written\"\nbuffer = { fsync = \"always\" }",
    );
    let yaml = edit(
        &edit(
            SEED_YAML,
            "    body: '",
            "    retry: { max_delay: 1 minute, attempts: 3 }\n\
             \x20   status: { success: ['409'] }\n\
             \x20   concurrency: { adaptive: { min: 1, maximum: 8 } }\n\
             \x20   body: '",
        ),
        "    key: request_id",
        "    key: request_id\n    ack: written\n    buffer: { fsync: always }",
    );
    check("bad_delivery_types", &toml, &yaml);
}

#[test]
fn concurrency_typo() {
    check(
        "concurrency_typo",
        &edit(SEED_TOML, "body = '", "concurrency = \"adaptve\"\nbody = '"),
        &edit(
            SEED_YAML,
            "    body: '",
            "    concurrency: adaptve\n    body: '",
        ),
    );
}

/// A pipeline's name becomes a directory under the buffer directory: a
/// name that could climb out of it is refused where it is written.
#[test]
fn pipeline_name_that_is_a_path() {
    check(
        "pipeline_name_that_is_a_path",
        &edit(
            SEED_TOML,
            "[pipelines.requests_to_partner]",
            "[pipelines.\"../requests\"]",
        ),
        &edit(SEED_YAML, "  requests_to_partner:", "  ../requests:"),
    );
}

/// `[retention]` values that would delete history as soon as it is written.
#[test]
fn retention_zeros() {
    check(
        "retention_zeros",
        &format!(
            "{SEED_TOML}\n[retention]\nruns_max_age = \"0s\"\nruns_max_count = 0\n\
             dead_letters_max_age = \"0\"\naudit_max_age = \"0ms\"\n"
        ),
        &format!(
            "{SEED_YAML}\nretention:\n  runs_max_age: 0s\n  runs_max_count: 0\n  \
             dead_letters_max_age: '0'\n  audit_max_age: 0ms\n"
        ),
    );
}

/// `[retention]` values of the wrong kind, and a misspelt field.
#[test]
fn retention_nonsense() {
    check(
        "retention_nonsense",
        &format!(
            "{SEED_TOML}\n[retention]\nruns_max_age = \"forever\"\nruns_max_count = -5\n\
             audit_max_age = 90\nkeep_runs = 10\n"
        ),
        &format!(
            "{SEED_YAML}\nretention:\n  runs_max_age: forever\n  runs_max_count: -5\n  \
             audit_max_age: 90\n  keep_runs: 10\n"
        ),
    );
}

/// `[backup]` with no directory, no interval and nothing kept: each named.
#[test]
fn backup_nothing() {
    check(
        "backup_nothing",
        &format!("{SEED_TOML}\n[backup]\ndir = \"\"\nevery = \"0s\"\nkeep = 0\n"),
        &format!("{SEED_YAML}\nbackup:\n  dir: ''\n  every: 0s\n  keep: 0\n"),
    );
}
