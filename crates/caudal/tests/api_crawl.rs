//! Watching the crawler of a real `caudal run` over loopback: the crawl
//! routes of the REST API (the process's sites, the frontiers in the store
//! and their pages; roles, 400 and 404, every JSON answer against the
//! OpenAPI document), the crawl metrics, `caudal top --api` showing the
//! sites, and the progress line of `caudal workflow run --wait` on a
//! terminal. The crawl is a workflow's crawl task against the fixture site.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use caudal_testkit::{Site, SiteOptions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Output, PATIENCE, command, spawn_daemon};

const WORKFLOW: &str = "w";
const TASK: &str = "c";
/// The fixture's pages: 2 listings linking to 3 details each.
const PAGES: u64 = 2 + 2 * 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// No pipelines; one workflow whose only task crawls the fixture site,
/// following the listings to the detail pages.
fn write_config(dir: &Path, port: u16, host: &str) -> PathBuf {
    let path = dir.join("crawl.toml");
    let state = dir.join("caudal.db");
    let config = format!(
        r#"[state]
url = "sqlite://{state}"

[crawl]
delay = "0s"
concurrency = 4

[sources.site]
type = "crawl"
start_urls = ["http://{host}/listings/1"]
follow = ["a.next", "a.detail"]

[[sources.site.pages]]
name = "detail"
match = "/property/\\d+$"
fields.title = "h1.title"

[workflows.{WORKFLOW}.tasks.{TASK}]
type = "crawl"
source = "site"

[server]
listen = "127.0.0.1:{port}"
requests_per_second = 1000
"#,
        state = state.display()
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
}

struct Client {
    port: u16,
    http: reqwest::Client,
}

impl Client {
    /// Sends a request, waiting for the server to listen.
    async fn call(&self, method: &str, path: &str, token: &str) -> Answer {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token)
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Answer { status, text, json };
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{url}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Polls run `id` until it is `state`.
    async fn wait_for(&self, id: i64, state: &str, token: &str, log: impl Fn() -> String) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let a = self
                .call("GET", &format!("/api/v1/workflow-runs/{id}"), token)
                .await;
            assert_eq!(a.status, 200, "{}", a.text);
            if a.json["state"] == state {
                return;
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
/// `GET route` and the answer's status.
fn conforms(openapi: &Value, route: &str, a: &Answer) {
    let op = &openapi["paths"][route]["get"];
    assert!(op.is_object(), "GET {route} is not documented");
    let schema = &op["responses"][a.status.to_string()]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "no {} answer documented for GET {route}",
        a.status
    );
    let root = json!({"allOf": [schema], "components": openapi["components"]});
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&a.json)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "GET {route}: {errors:?}\n{}", a.json);
}

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tmux {args:?}: {e} (install tmux: apt-get install tmux)"))
}

/// A detached tmux session running `line`, killed when the test ends,
/// however it ends. Each session has a tmux server of its own (`-L`): one
/// session's server exiting does not race the next session's start.
struct Session(String);

impl Session {
    fn start(name: &str, line: &str) -> Self {
        let session = Self(format!("caudal-{name}-{}", std::process::id()));
        let started = tmux(&[
            "-L",
            &session.0,
            "new-session",
            "-d",
            "-s",
            &session.0,
            "-x",
            "200",
            "-y",
            "24",
            line,
        ]);
        assert!(
            started.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        session
    }

    fn screen(&self) -> String {
        let shot = tmux(&["-L", &self.0, "capture-pane", "-p", "-t", &self.0]);
        String::from_utf8_lossy(&shot.stdout).to_string()
    }

    /// The screen once `shows` holds for it.
    async fn wait_for(&self, what: &str, shows: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if shows(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never showed {what}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = tmux(&["-L", &self.0, "kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crawler_is_watched_through_the_api_top_and_a_progress_line() {
    let site = Site::start(SiteOptions {
        listings: 2,
        per_listing: 3,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let config = write_config(dir.path(), port, site.host());
    let viewer = token(&config, dir.path(), "dash", "viewer").await;
    let operator = token(&config, dir.path(), "oncall", "operator").await;
    let daemon = spawn_daemon(&config, dir.path(), 1);
    let log = || daemon.log();
    let client = Client {
        port,
        http: reqwest::Client::new(),
    };
    let openapi = client.call("GET", "/api/openapi.json", "").await.json;

    // Before any crawl: no site, no frontier.
    let a = client.call("GET", "/api/v1/crawl/sites", &viewer).await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "/api/v1/crawl/sites", &a);
    assert_eq!(a.json, json!({"sites": []}));
    let a = client.call("GET", "/api/v1/crawl/sites", "").await;
    assert_eq!(a.status, 401, "{}", a.text);
    conforms(&openapi, "/api/v1/crawl/sites", &a);

    let a = client
        .call(
            "POST",
            &format!("/api/v1/workflows/{WORKFLOW}/runs"),
            &operator,
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let id = a.json["id"].as_i64().expect("a run id");
    client.wait_for(id, "succeeded", &viewer, log).await;
    let frontier = format!("workflow:{id}:{TASK}");

    // The site, as the process's politeness registry sees it.
    let a = client.call("GET", "/api/v1/crawl/sites", &viewer).await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "/api/v1/crawl/sites", &a);
    let sites = a.json["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 1, "{}", a.json);
    let s = &sites[0];
    assert_eq!(s["host"], site.host(), "{s}");
    assert_eq!(s["concurrency"], 4, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
    let succeeded = s["succeeded"].as_u64().expect("succeeded");
    assert!(succeeded >= PAGES, "every page answered: {s}");
    assert_eq!(
        (s["failed"].as_u64(), s["throttled"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s["success_rate"], 1.0, "{s}");
    assert_eq!(
        s["pages_per_minute"], succeeded,
        "all within the minute: {s}"
    );
    assert!(s["bytes"].as_u64() > Some(0), "{s}");
    assert!(s["latency_seconds"].as_f64() > Some(0.0), "{s}");
    assert!(s["delay_seconds"].as_f64() >= Some(0.0), "{s}");
    assert_eq!(s["blocked_seconds"], 0.0, "{s}");

    // The frontier, from the state store.
    let a = client.call("GET", "/api/v1/crawl/frontiers", &viewer).await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, "/api/v1/crawl/frontiers", &a);
    let f = &a.json["frontiers"][0];
    assert_eq!(
        a.json["frontiers"].as_array().map(Vec::len),
        Some(1),
        "{}",
        a.json
    );
    assert_eq!(f["name"], frontier, "{f}");
    assert_eq!(
        (&f["state"], &f["generation"]),
        (&json!("finished"), &json!(1)),
        "{f}"
    );
    assert_eq!(f["pages"], json!({"done": PAGES}), "{f}");
    assert!(
        f["started_at"].is_string() && f["ended_at"].is_string(),
        "{f}"
    );
    let a = client
        .call(
            "GET",
            &format!("/api/v1/crawl/frontiers?prefix=workflow:{id}:"),
            &viewer,
        )
        .await;
    assert_eq!(a.json["frontiers"][0]["name"], frontier, "{}", a.json);
    for other in ["pipeline:", "workflow:0", "WORKFLOW:", "workflow_"] {
        let a = client
            .call(
                "GET",
                &format!("/api/v1/crawl/frontiers?prefix={other}"),
                &viewer,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json, json!({"frontiers": []}), "prefix {other}");
    }

    // Its pages.
    let pages = "/api/v1/crawl/frontiers/{name}/pages";
    let a = client
        .call(
            "GET",
            &format!("/api/v1/crawl/frontiers/{frontier}/pages"),
            &viewer,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    conforms(&openapi, pages, &a);
    assert_eq!(a.json["frontier"], frontier, "{}", a.json);
    let all = a.json["pages"].as_array().expect("pages");
    assert_eq!(all.len() as u64, PAGES, "{}", a.json);
    assert_eq!(all[0]["url"], site.url("/listings/1"), "found first");
    assert_eq!(all[0]["depth"], 0, "{}", all[0]);
    let details: Vec<&Value> = all.iter().filter(|p| p["kind"] == "detail").collect();
    assert_eq!(details.len(), 6, "{}", a.json);
    for p in &details {
        assert_eq!(
            (&p["state"], &p["status"]),
            (&json!("done"), &json!(200)),
            "{p}"
        );
        assert!(p["fetched_at"].is_string() && p["error"].is_null(), "{p}");
    }
    let a = client
        .call(
            "GET",
            &format!("/api/v1/crawl/frontiers/{frontier}/pages?state=done&limit=2"),
            &viewer,
        )
        .await;
    assert_eq!(
        a.json["pages"].as_array().map(Vec::len),
        Some(2),
        "{}",
        a.json
    );
    let a = client
        .call(
            "GET",
            &format!("/api/v1/crawl/frontiers/{frontier}/pages?state=failed"),
            &viewer,
        )
        .await;
    assert_eq!(a.json["pages"], json!([]), "{}", a.json);
    let a = client
        .call(
            "GET",
            &format!("/api/v1/crawl/frontiers/{frontier}/pages?state=lost"),
            &viewer,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    conforms(&openapi, pages, &a);
    assert_eq!(a.json["error"]["code"], "bad_request");
    assert_eq!(
        a.json["error"]["message"],
        "state \"lost\" is not one of queued, fetching, done, unchanged, failed, skipped"
    );
    let a = client
        .call("GET", "/api/v1/crawl/frontiers/workflow:0:c/pages", &viewer)
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    conforms(&openapi, pages, &a);
    assert_eq!(a.json["error"]["code"], "not_found");

    // The metrics of the crawl.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap_or_default();
    let host = site.host();
    for line in [
        format!("caudal_crawl_requests_total{{site=\"{host}\",outcome=\"answered\"}}"),
        format!("caudal_crawl_bytes_total{{site=\"{host}\"}}"),
        format!("caudal_crawl_latency_seconds_count{{site=\"{host}\"}}"),
        format!("caudal_crawl_delay_seconds{{site=\"{host}\"}}"),
        format!("caudal_crawl_in_flight{{site=\"{host}\"}} 0"),
        format!("caudal_crawl_pages_total{{crawl=\"{frontier}\",state=\"done\"}} {PAGES}"),
    ] {
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("# HELP caudal_crawl_requests_total"),
        "{metrics}"
    );

    // `caudal top` on the daemon's API shows the site.
    let caudal = env!("CARGO_BIN_EXE_caudal");
    let top = Session::start(
        "top-crawl",
        &format!(
            "cd {} && NO_COLOR=1 {caudal} --config {} --api http://127.0.0.1:{port} --token {viewer} top",
            dir.path().display(),
            config.display()
        ),
    );
    let screen = top
        .wait_for("the site's figures", |s| {
            s.contains(host) && s.contains("100.0%")
        })
        .await;
    for column in [
        "SITE",
        "IN FLIGHT",
        "PAGES/MIN",
        "SUCCESS",
        "LATENCY",
        "DELAY",
    ] {
        assert!(screen.contains(column), "no {column} column:\n{screen}");
    }
    assert!(
        screen.contains("0 / 4"),
        "in flight of the concurrency:\n{screen}"
    );
    let _ = tmux(&["-L", &top.0, "send-keys", "-t", &top.0, "q"]);
    drop(top);

    // `caudal workflow run --wait` on a terminal: the crawl task's pages on
    // the progress line while it crawls (slowly, for the line to be seen).
    site.set_latency(Duration::from_millis(700));
    let wait = Session::start(
        "wait-crawl",
        &format!(
            "cd {} && NO_COLOR=1 CAUDAL_LOG=error {caudal} --config {} workflow run {WORKFLOW} --wait; sleep 60",
            dir.path().display(),
            config.display()
        ),
    );
    let screen = wait
        .wait_for("the crawl's pages", |s| {
            s.contains(&format!("{TASK}: ")) && s.contains(" pages done, ")
        })
        .await;
    assert!(screen.contains("running"), "{screen}");
    let screen = wait
        .wait_for("the run's end", |s| s.contains("succeeded (batch"))
        .await;
    assert!(
        !screen.contains("pages done"),
        "the line is cleared:\n{screen}"
    );
    drop(wait);

    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");
}
