//! The `caudal` command line as scripts and users meet it, run as a real
//! process: `validate` (and its `file:line:col: path: message` errors),
//! `schema`, `once`, `status`, `checkpoint`, `--help`, exit codes, and YAML
//! configs behaving like TOML ones.
//!
//! Tests that run a pipeline have their own SQLite source, receiver and
//! state directory; the others only need a config file.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use caudal_testkit::Reply;
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{PATIENCE, PIPELINE, World, each, request_id};

/// A valid seed-001 config that needs no service to validate.
const GOOD: &str = r#"[state]
url = "sqlite://caudal-state.db"

[sources.servicedesk]
type = "sqlite"
url = "sqlite://servicedesk.db"
table = "service_requests"
cursor = ["last_modified_date", "request_id"]

[sinks.partner]
type = "http"
url = "http://127.0.0.1:9/services-data/requests"
headers = { Authorization = "Bearer ${CAUDAL_CLI_TEST_TOKEN:-dev-token}" }
batch = { max_records = 500, max_wait = "1s" }
body = '{"requests": {{ records | tojson }}}'

[pipelines.requests_to_partner]
source = "servicedesk"
sink = "partner"
schedule = { every = "1h" }
key = "request_id"
"#;

/// `caudal <args>` for tests that need no runtime, with a clean environment.
fn caudal(args: &[&str]) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_caudal"));
    cmd.args(args)
        .env_remove("CAUDAL_CONFIG")
        .env_remove("CAUDAL_LOG")
        .env_remove("RUST_LOG")
        .env_remove("CAUDAL_CLI_TEST_TOKEN")
        .env("NO_COLOR", "1")
        .timeout(PATIENCE);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `text` with `from` replaced by `to`; fails if `from` is not there.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the config");
    text.replacen(from, to, 1)
}

/// The 1-based line and column where `needle` starts in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, line)| line.find(needle).map(|col| (i + 1, col + 1)))
        .unwrap_or_else(|| panic!("{needle:?} is not in the config"))
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write the config");
    path.display().to_string()
}

#[test]
fn validate_accepts_a_good_config_and_says_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "caudal.toml", GOOD);
    let assert = caudal(&["validate", "-c", &file]).assert().code(0);
    let stdout = text(&assert.get_output().stdout);
    assert_eq!(
        stdout.trim(),
        format!("{file}: ok (1 sources, 1 sinks, 1 pipelines)"),
        "{stdout}"
    );
}

/// Each broken config exits 2 and prints the problem as
/// `file:line:col: field.path: message`, pointing at the offending value.
#[test]
fn validate_reports_each_problem_as_file_line_col_path_message() {
    struct Case {
        what: &'static str,
        from: &'static str,
        to: &'static str,
        /// Where the error must point: the first occurrence of this text.
        at: &'static str,
        path: &'static str,
        message: &'static str,
    }
    let cases = [
        Case {
            what: "undefined sink",
            from: r#"sink = "partner""#,
            to: r#"sink = "partnr""#,
            at: r#""partnr""#,
            path: "pipelines.requests_to_partner.sink",
            message: r#"unknown sink "partnr"; defined sinks: partner"#,
        },
        Case {
            what: "bad duration",
            from: r#"every = "1h""#,
            to: r#"every = "1 hour""#,
            at: r#""1 hour""#,
            path: "pipelines.requests_to_partner.schedule.every",
            message: r#"invalid duration "1 hour""#,
        },
        Case {
            what: "missing environment variable",
            from: "${CAUDAL_CLI_TEST_TOKEN:-dev-token}",
            to: "${CAUDAL_CLI_TEST_TOKEN}",
            at: r#""Bearer ${CAUDAL_CLI_TEST_TOKEN}""#,
            path: "sinks.partner.headers.Authorization",
            message: "environment variable CAUDAL_CLI_TEST_TOKEN is not set",
        },
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, case) in cases.iter().enumerate() {
        let config = edit(GOOD, case.from, case.to);
        let file = write(dir.path(), &format!("broken-{i}.toml"), &config);
        let assert = caudal(&["validate", "-c", &file]).assert().code(2);
        let stderr = text(&assert.get_output().stderr);
        let (line, col) = position_of(&config, case.at);
        let prefix = format!("error: {file}:{line}:{col}: {}: ", case.path);
        let reported = stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{}: no line starting {prefix:?} in:\n{stderr}", case.what));
        assert!(reported.contains(case.message), "{}: {reported}", case.what);
        assert!(
            stderr.contains(&format!("1 error in {file}")),
            "{}: {stderr}",
            case.what
        );
    }
}

#[test]
fn schema_prints_the_json_schema_of_the_config() {
    let assert = caudal(&["schema"]).assert().code(0);
    let schema: Value =
        serde_json::from_slice(&assert.get_output().stdout).expect("schema prints valid JSON");
    for key in ["state", "sources", "sinks", "pipelines"] {
        assert!(
            schema["properties"][key].is_object(),
            "no properties.{key} in the schema"
        );
    }
}

#[test]
fn completions_and_the_manual_page_come_from_the_cli() {
    let dir = tempfile::tempdir().expect("a directory");
    for shell in ["bash", "zsh", "fish"] {
        let assert = caudal(&["completions", shell]).assert().code(0);
        let script = text(&assert.get_output().stdout);
        for sub in ["once", "validate", "workflow", "completions"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        if shell == "bash" {
            // The script is valid bash.
            let file = write(dir.path(), "caudal.bash", &script);
            let checked = std::process::Command::new("bash")
                .args(["-n", &file])
                .output()
                .expect("bash");
            assert!(checked.status.success(), "{}", text(&checked.stderr));
        }
    }
    let assert = caudal(&["man"]).assert().code(0);
    let page = text(&assert.get_output().stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH caudal"),
        "{page}"
    );
    for part in [".SH NAME", ".SH SUBCOMMANDS", "caudal\\-once", "Exit codes"] {
        assert!(page.contains(part), "the manual page lacks {part}:\n{page}");
    }
}

#[test]
fn help_teaches_the_exit_codes() {
    let assert = caudal(&["--help"]).assert().code(0);
    let stdout = text(&assert.get_output().stdout);
    assert!(stdout.contains("Exit codes:"), "{stdout}");
    for line in [
        "0  success",
        "2  invalid arguments or configuration",
        "3  the pipeline is running in another process",
        "130  interrupted",
    ] {
        assert!(stdout.contains(line), "--help lacks {line:?}:\n{stdout}");
    }
}

/// Without a terminal, `once` prints one summary line, exits 0, and the
/// receiver holds every row.
#[tokio::test]
async fn once_prints_a_summary_line_and_exits_0() {
    let w = World::sqlite().await;
    w.insert(1..=5, 0).await;
    let out = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let summary = out.stdout.trim();
    assert_eq!(summary.lines().count(), 1, "{out}");
    assert!(summary.starts_with(&format!("{PIPELINE}: run ")), "{out}");
    assert!(summary.contains("succeeded"), "{out}");
    assert!(summary.contains("5 rows read, 5 delivered"), "{out}");
    assert_eq!(w.delivery_counts(), each(1..=5, 1));
}

#[tokio::test]
async fn once_of_an_unknown_pipeline_exits_2() {
    let w = World::sqlite().await;
    let out = w.caudal(&["once", "no_such_pipeline"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains(r#"no pipeline named "no_such_pipeline""#),
        "{out}"
    );
    assert!(
        out.stderr.contains(PIPELINE),
        "the message lists the pipelines: {out}"
    );
    assert_eq!(w.receiver.request_count(), 0);
}

/// SIGINT during `once` lets the batch in flight finish and exits 130 as
/// `--help` promises. The batches buffered before the signal are durable
/// (`ack = "buffered"`): the checkpoint covers them, and the next `once`
/// delivers them without reading them again, then reads the rest.
#[tokio::test]
async fn once_interrupted_mid_batch_exits_130_and_keeps_the_batch() {
    let mut w = World::sqlite().await;
    w.max_records = 10;
    w.insert(1..=25, 0).await;
    w.receiver
        .queue_replies([Reply::status(200).delay(Duration::from_secs(10))]);
    let mut cmd = w.command(&["once", PIPELINE]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("start caudal once");
    assert!(
        w.receiver.wait_for_requests(1, PATIENCE).await,
        "the first batch never arrived"
    );
    support::send_signal(&child, Signal::SIGINT);
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("caudal once exits after SIGINT")
        .expect("wait for caudal once");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(130), "{stdout}{stderr}");
    assert!(stdout.contains("cancelled"), "{stdout}");
    assert!(stdout.contains("25 rows read, 10 delivered"), "{stdout}");
    assert_eq!(w.receiver.request_count(), 1);

    let status = w.status().await;
    assert_eq!(status["outcome"], "cancelled", "{status}");
    assert_eq!(status["rows_delivered"], 10, "{status}");
    // The signal may come before or after the last partial batch (21..=25)
    // was buffered; either way the checkpoint covers exactly the buffer.
    let covered = match status["buffered_batches"].as_u64() {
        Some(1) => 20,
        Some(2) => 25,
        _ => panic!("one or two batches wait in the buffer: {status}"),
    };
    assert_eq!(
        status["checkpoint"],
        format!("(2025-05-14T12:00:00Z, {covered})"),
        "{status}"
    );
    let rest = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(rest.code, Some(0), "{rest}");
    assert!(
        rest.stdout
            .contains(&format!("{} rows read, 15 delivered", 25 - covered)),
        "{rest}"
    );
    let ids: Vec<i64> = w.delivered().iter().map(support::request_id).collect();
    assert_eq!(ids, (1..=25).collect::<Vec<_>>(), "each row once, in order");
}

/// The status table and `status --json` show the same last run.
#[tokio::test]
async fn status_shows_the_last_run_as_a_table_and_as_json() {
    let w = World::sqlite().await;
    w.insert(1..=7, 0).await;
    let once = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(once.code, Some(0), "{once}");

    let json = w.status().await;
    assert_eq!(json["outcome"], "succeeded", "{json}");
    assert_eq!(json["rows_read"], 7, "{json}");
    assert_eq!(json["rows_delivered"], 7, "{json}");
    assert_eq!(json["schedule"], "every 1s", "{json}");
    assert!(json["error"].is_null(), "{json}");
    let checkpoint = json["checkpoint"].as_str().expect("a checkpoint");
    assert!(checkpoint.ends_with(", 7)"), "{json}");
    let last_run = json["last_run"].as_str().expect("a last run");

    let table = w.caudal(&["status"]).await;
    assert_eq!(table.code, Some(0), "{table}");
    let mut lines = table.stdout.lines();
    let header = lines.next().expect("a header line");
    for column in [
        "PIPELINE",
        "SCHEDULE",
        "LAST RUN",
        "OUTCOME",
        "ROWS",
        "CHECKPOINT",
        "NEXT RUN",
    ] {
        assert!(header.contains(column), "{table}");
    }
    let row = lines
        .find(|l| l.starts_with(PIPELINE))
        .unwrap_or_else(|| panic!("no row for {PIPELINE}: {table}"));
    for cell in [
        "every 1s",
        last_run,
        "succeeded",
        "7 read / 7 sent",
        checkpoint,
    ] {
        assert!(row.contains(cell), "{cell:?} missing from {row:?}");
    }
}

/// `checkpoint show` prints the saved cursor; after `checkpoint reset` the
/// next `once` reads the source from the start and sends everything again.
#[tokio::test]
async fn checkpoint_reset_makes_the_next_run_resend_everything() {
    let w = World::sqlite().await;
    w.insert(1..=5, 0).await;
    let none = w.caudal(&["checkpoint", "show", PIPELINE]).await;
    assert_eq!(none.code, Some(0), "{none}");
    assert!(none.stdout.contains("no checkpoint"), "{none}");
    let first = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(first.code, Some(0), "{first}");

    let shown = w.caudal(&["checkpoint", "show", PIPELINE]).await;
    assert_eq!(shown.code, Some(0), "{shown}");
    let checkpoint: Value = serde_json::from_str(&shown.stdout).expect("checkpoint JSON");
    assert_eq!(checkpoint["pipeline"], PIPELINE, "{shown}");
    assert_eq!(checkpoint["position"]["values"][1]["value"], 5, "{shown}");

    let reset = w.caudal(&["checkpoint", "reset", PIPELINE]).await;
    assert_eq!(reset.code, Some(0), "{reset}");
    assert!(reset.stdout.contains("checkpoint reset"), "{reset}");
    let gone = w.caudal(&["checkpoint", "show", PIPELINE]).await;
    assert!(gone.stdout.contains("no checkpoint"), "{gone}");

    let again = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(again.code, Some(0), "{again}");
    assert!(again.stdout.contains("5 rows read, 5 delivered"), "{again}");
    assert_eq!(w.delivery_counts(), each(1..=5, 2));

    let unknown = w.caudal(&["checkpoint", "show", "no_such_pipeline"]).await;
    assert_eq!(unknown.code, Some(2), "{unknown}");
}

/// The same world described in YAML and in TOML: `once` sends the same
/// records and prints the same counts.
#[tokio::test]
async fn once_with_a_yaml_config_works_like_toml() {
    let toml_world = World::sqlite().await;
    let yaml_world = World::sqlite().await;
    for w in [&toml_world, &yaml_world] {
        w.insert(1..=4, 0).await;
        w.insert(5..=6, 2).await;
        w.update(2, 9, 3).await;
    }
    let yaml = yaml_world.write_yaml_config();
    let validated = yaml_world.caudal_with(&yaml, &["validate"]).await;
    assert_eq!(validated.code, Some(0), "{validated}");

    let by_toml = toml_world.caudal(&["once", PIPELINE]).await;
    let by_yaml = yaml_world.caudal_with(&yaml, &["once", PIPELINE]).await;
    assert_eq!(by_toml.code, Some(0), "{by_toml}");
    assert_eq!(by_yaml.code, Some(0), "{by_yaml}");
    for out in [&by_toml, &by_yaml] {
        assert!(
            out.stdout.contains("6 rows read, 6 delivered in 1 batches"),
            "{out}"
        );
    }
    assert_eq!(toml_world.delivered(), yaml_world.delivered());
    let ids: Vec<i64> = yaml_world.delivered().iter().map(request_id).collect();
    assert_eq!(ids, [1, 3, 4, 5, 6, 2], "cursor order");
}

/// A receiver refusing one batch: `once` still succeeds and says how many
/// records became dead letters; `dlq list/show` show them with their
/// reason; `dlq replay` delivers them once the receiver accepts; `dlq
/// discard` marks the rest.
#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_discarded() {
    let mut w = World::sqlite().await;
    w.max_records = 3;
    w.insert(1..=6, 0).await;
    w.receiver
        .queue_replies([Reply::status(200), Reply::status(400).body("bad status_id")]);
    let out = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("3 delivered, 3 dead letters"), "{out}");

    let list = w.caudal(&["dlq", "list", PIPELINE, "--json"]).await;
    assert_eq!(list.code, Some(0), "{list}");
    let letters: Vec<Value> = list
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(letters.len(), 3, "{list}");
    assert_eq!(letters[0]["record_key"], "4");
    assert_eq!(letters[0]["status"], 400);
    let table = w.caudal(&["dlq", "list"]).await;
    assert!(table.stdout.contains("answered 400"), "{table}");

    let id = letters[0]["id"].as_i64().expect("id").to_string();
    let show = w.caudal(&["dlq", "show", &id]).await;
    assert_eq!(show.code, Some(0), "{show}");
    let whole: Value = serde_json::from_str(&show.stdout).expect("JSON");
    assert_eq!(whole["record"]["request_id"], 4);
    assert_eq!(whole["response_excerpt"], "bad status_id");

    // Replay two of them; the receiver now accepts.
    let second = letters[1]["id"].as_i64().expect("id").to_string();
    let replay = w
        .caudal(&["dlq", "replay", PIPELINE, "--id", &id, "--id", &second])
        .await;
    assert_eq!(replay.code, Some(0), "{replay}");
    assert!(replay.stdout.contains("2 delivered"), "{replay}");
    assert_eq!(w.delivery_counts(), each(1..=5, 1));

    let third = letters[2]["id"].as_i64().expect("id").to_string();
    let discard = w.caudal(&["dlq", "discard", &third]).await;
    assert!(discard.stdout.contains("discarded 1"), "{discard}");
    let pending = w.caudal(&["dlq", "list", PIPELINE, "--json"]).await;
    assert_eq!(pending.stdout.trim(), "", "{pending}");
    let all = w
        .caudal(&["dlq", "list", PIPELINE, "--all", "--json"])
        .await;
    assert_eq!(all.stdout.lines().count(), 3, "{all}");
}

/// A build without the `mysql` feature refuses a MySQL source when the
/// configuration is validated, at the source's `type`, naming the feature.
#[cfg(not(feature = "mysql"))]
#[test]
fn a_lean_build_refuses_a_mysql_source_naming_the_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("caudal.toml");
    std::fs::write(
        &config,
        "[sources.shop]\ntype = \"mysql\"\nurl = \"mysql://root@127.0.0.1/shop\"\ntable = \"orders\"\ncursor = [\"id\"]\n\n[sinks.out]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/in\"\n\n[pipelines.p]\nsource = \"shop\"\nsink = \"out\"\nschedule = { every = \"1h\" }\n",
    )
    .expect("write config");
    let out = assert_cmd::Command::new(env!("CARGO_BIN_EXE_caudal"))
        .args(["--config"])
        .arg(&config)
        .arg("validate")
        .output()
        .expect("run caudal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("caudal.toml:2:"), "{stderr}");
    assert!(stderr.contains("cargo feature `mysql`"), "{stderr}");
}
