//! The workflow routes of the REST API over loopback, against the real
//! `caudal run`: roles, starting a run with parameters, reading its tasks,
//! attempts and logs, cancel and retry, the error mapping (404, 409), the
//! audit log, the workflow metrics, and every JSON answer against the
//! OpenAPI document.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Output, PATIENCE, command, spawn_daemon};

const WORKFLOW: &str = "hello";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// No pipelines; one workflow of two command tasks, the second after the
/// first and printing a parameter.
fn write_config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("workflows.toml");
    let state = dir.join("caudal.db");
    let config = format!(
        "[state]\nurl = \"sqlite://{}\"\n\n\
         [workflows.{WORKFLOW}]\nparams = {{ who = \"nobody\" }}\n\n\
         [workflows.{WORKFLOW}.tasks.greet]\ntype = \"command\"\n\
         run = [\"sh\", \"-c\", \"echo hi\"]\n\n\
         [workflows.{WORKFLOW}.tasks.after]\ntype = \"command\"\n\
         run = [\"sh\", \"-c\", \"echo {{{{ params.who }}}}\"]\n\
         depends_on = [\"greet\"]\n\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\nrequests_per_second = 1000\n",
        state.display()
    );
    std::fs::write(&path, config).expect("write the config");
    path
}

async fn token(config: &Path, dir: &Path, name: &str, role: &str) -> String {
    let out = Output::of(command(
        config,
        dir,
        &["token", "create", "--name", name, "--role", role],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    out.stdout.trim().to_string()
}

/// One answer.
struct Answer {
    status: u16,
    text: String,
    json: Value,
    headers: reqwest::header::HeaderMap,
}

struct Client {
    port: u16,
    http: reqwest::Client,
}

impl Client {
    /// Sends a request, waiting for the server to listen.
    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Answer {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut request = self.http.request(method.clone(), &url).bearer_auth(token);
            if let Some(b) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.to_string());
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r.headers().clone();
                    let text = r.text().await.unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Answer {
                        status,
                        text,
                        json,
                        headers,
                    };
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{url}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Polls run `id` until it is `state`.
    async fn wait_for(&self, id: i64, state: &str, token: &str, log: impl Fn() -> String) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let a = self
                .call("GET", &format!("/api/v1/workflow-runs/{id}"), token, None)
                .await;
            assert_eq!(a.status, 200, "{}", a.text);
            if a.json["state"] == state {
                return a.json;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} not {state}: {}\n{}",
                a.json,
                log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Checks a JSON answer against the schema the OpenAPI document gives for
/// `method route` and `status`.
fn conforms(openapi: &Value, method: &str, route: &str, a: &Answer) {
    let op = &openapi["paths"][route][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {route} is not documented");
    let schema = &op["responses"][a.status.to_string()]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "no {} answer documented for {method} {route}",
        a.status
    );
    let root = json!({"allOf": [schema], "components": openapi["components"]});
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&a.json)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {route}: {errors:?}\n{}",
        a.json
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_runs_through_the_api() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let config = write_config(dir.path(), port);
    let viewer = token(&config, dir.path(), "dash", "viewer").await;
    let operator = token(&config, dir.path(), "oncall", "operator").await;
    let admin = token(&config, dir.path(), "root", "admin").await;
    let daemon = spawn_daemon(&config, dir.path(), 1);
    let log = || daemon.log();
    let client = Client {
        port,
        http: reqwest::Client::new(),
    };
    let openapi = client.call("GET", "/api/openapi.json", "", None).await.json;

    let start = format!("/api/v1/workflows/{WORKFLOW}/runs");
    let body = json!({"params": {"who": "api"}});
    let a = client
        .call("POST", &start, &viewer, Some(body.clone()))
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = client
        .call(
            "POST",
            &start,
            &operator,
            Some(json!({"params": {"nope": 1}})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = client.call("POST", &start, &operator, Some(body)).await;
    assert_eq!(a.status, 201, "{}", a.text);
    conforms(&openapi, "POST", "/api/v1/workflows/{name}/runs", &a);
    assert_eq!(a.json["triggered_by"], "api", "{}", a.json);
    assert_eq!(a.json["params"]["who"], "api", "{}", a.json);
    let id = a.json["id"].as_i64().expect("a run id");
    let run = format!("/api/v1/workflow-runs/{id}");

    let done = client.wait_for(id, "succeeded", &viewer, log).await;
    assert_eq!(done["tasks"]["succeeded"], 2, "{done}");
    let a = client.call("GET", &run, &viewer, None).await;
    conforms(&openapi, "GET", "/api/v1/workflow-runs/{id}", &a);

    let a = client
        .call("GET", &format!("{run}/tasks"), &viewer, None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "GET", "/api/v1/workflow-runs/{id}/tasks", &a);
    let tasks = a.json["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2, "{}", a.json);
    assert!(
        tasks.iter().all(|t| t["state"] == "succeeded"),
        "{}",
        a.json
    );

    let a = client
        .call("GET", &format!("{run}/tasks/greet/log"), &viewer, None)
        .await;
    assert_eq!((a.status, a.text.as_str()), (200, "hi\n"));
    assert_eq!(a.headers["caudal-running"], "false");
    assert!(
        a.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain")),
        "{:?}",
        a.headers
    );
    let a = client
        .call(
            "GET",
            &format!("{run}/tasks/after/log?attempt=1&stream=stdout"),
            &viewer,
            None,
        )
        .await;
    assert_eq!((a.status, a.text.as_str()), (200, "api\n"));
    let a = client
        .call(
            "GET",
            &format!("{run}/tasks/greet/log?stream=stderr"),
            &viewer,
            None,
        )
        .await;
    assert_eq!((a.status, a.text.as_str()), (200, ""));
    let a = client
        .call(
            "GET",
            &format!("{run}/tasks/greet/log?stream=both"),
            &viewer,
            None,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = client
        .call("GET", &format!("{run}/tasks/nope/log"), &viewer, None)
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // Errors of the engine: an ended run cannot be cancelled; an unknown
    // run is not found.
    let a = client
        .call("POST", &format!("{run}/cancel"), &operator, None)
        .await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json["error"]["code"], "conflict");
    conforms(&openapi, "POST", "/api/v1/workflow-runs/{id}/cancel", &a);
    let a = client
        .call("GET", "/api/v1/workflow-runs/999999", &viewer, None)
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(a.json["error"]["code"], "not_found");
    conforms(&openapi, "GET", "/api/v1/workflow-runs/{id}", &a);
    let a = client
        .call(
            "POST",
            "/api/v1/workflow-runs/999999/retry",
            &operator,
            None,
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // A retry runs every task again: two attempts each.
    let a = client
        .call("POST", &format!("{run}/retry"), &viewer, None)
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = client
        .call("POST", &format!("{run}/retry"), &operator, None)
        .await;
    assert!([200, 202].contains(&a.status), "{}", a.text);
    conforms(&openapi, "POST", "/api/v1/workflow-runs/{id}/retry", &a);
    client.wait_for(id, "succeeded", &viewer, log).await;
    let a = client
        .call("GET", &format!("{run}/attempts"), &viewer, None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "GET", "/api/v1/workflow-runs/{id}/attempts", &a);
    let attempts = a.json["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 4, "{}", a.json);
    let a = client
        .call(
            "GET",
            &format!("{run}/tasks/greet/log?attempt=2"),
            &viewer,
            None,
        )
        .await;
    assert_eq!((a.status, a.text.as_str()), (200, "hi\n"));

    // Lists.
    let a = client.call("GET", "/api/v1/workflows", &viewer, None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "GET", "/api/v1/workflows", &a);
    assert_eq!(a.json["workflows"][0]["workflow"], WORKFLOW, "{}", a.json);
    assert_eq!(a.json["workflows"][0]["last_run"]["id"], id, "{}", a.json);
    let a = client
        .call(
            "GET",
            &format!("/api/v1/workflow-runs?workflow={WORKFLOW}&limit=5"),
            &viewer,
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "GET", "/api/v1/workflow-runs", &a);
    assert_eq!(a.json["runs"][0]["id"], id, "{}", a.json);
    let a = client
        .call("GET", "/api/v1/workflow-runs?workflow=nope", &viewer, None)
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // Every action a token may take is audited, with its answer (paths
    // as routed under /api/v1).
    let a = client.call("GET", "/api/v1/audit", &admin, None).await;
    let entries = a.json["audit"].as_array().expect("audit entries");
    let seen = |path: &str, status: u64| {
        let path = path.trim_start_matches("/api/v1");
        entries
            .iter()
            .any(|e| e["path"] == path && e["status"] == status && e["token"] == "oncall")
    };
    assert!(seen(&start, 201) && seen(&start, 400), "{}", a.json);
    assert!(seen(&format!("{run}/cancel"), 409), "{}", a.json);
    assert!(seen(&format!("{run}/retry"), 202), "{}", a.json);
    assert_eq!(entries.len(), 5, "{}", a.json);

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(metrics.contains("caudal_workflow_tasks{"), "no tasks gauge");
    assert!(metrics.contains("caudal_workflow_runs_total{"), "{metrics}");
    assert!(
        metrics.contains("# HELP caudal_workflow_runs_total"),
        "{metrics}"
    );

    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
    assert!(!log.contains(&operator), "a token in the log");
}
