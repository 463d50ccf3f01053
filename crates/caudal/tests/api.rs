//! The REST API of `caudal run` over loopback: the auth matrix over every
//! route, revocation, the rate limit, the audit log, steering a pipeline,
//! and no secret in any answer or log.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use caudal_server::api::{ROUTES, Role};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Daemon, Output, PATIENCE, PIPELINE, World, command, spawn_daemon};

const SECRET: &str = "topsecret-header-value-81f3";
/// A database password in a source URL (PostgreSQL here trusts loopback,
/// so any password connects).
const PASSWORD: &str = "db-password-5c2e9";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn write_config(world: &World, port: u16, per_second: u32) -> PathBuf {
    let path = world.dir.path().join("api.toml");
    // A second pipeline whose source has a password and a table that does
    // not exist: its failed runs carry an error that must not show it.
    let config = format!(
        "{}\n[sources.secret_db]\ntype = \"postgres\"\n\
         url = \"postgres://postgres:{PASSWORD}@127.0.0.1:5432/postgres\"\n\
         table = \"no_such_table\"\ncursor = [\"id\"]\n\n\
         [pipelines.zz_secret]\nsource = \"secret_db\"\nsink = \"partner\"\n\
         schedule = {{ every = \"1h\" }}\n\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\nrequests_per_second = {per_second}\n",
        world.config_toml()
    );
    std::fs::write(&path, config).expect("write the config");
    path
}

async fn token(path: &std::path::Path, world: &World, name: &str, role: &str) -> String {
    let out = Output::of(command(
        path,
        world.dir.path(),
        &["token", "create", "--name", name, "--role", role],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let token = out.stdout.trim().to_string();
    assert!(token.starts_with("cdl_") && token.len() > 60, "{out}");
    token
}

struct Client {
    port: u16,
    http: reqwest::Client,
}

impl Client {
    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let body = r.text().await.unwrap_or_default();
                    assert!(!body.contains(SECRET), "a secret in {path}: {body}");
                    assert!(!body.contains(PASSWORD), "a password in {path}: {body}");
                    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
                    return (status, json, retry_after);
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{url}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Checks `body`, answered with `status` to `method route`, against the
/// response schema the OpenAPI document gives for it.
fn conforms(openapi: &Value, method: &str, route: &str, status: u16, body: &Value) {
    let op = &openapi["paths"][route][method.to_ascii_lowercase()];
    assert!(
        op.is_object(),
        "{method} {route} is not in the OpenAPI document"
    );
    let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "the OpenAPI document has no {status} answer for {method} {route}"
    );
    // The response schema, resolving its references in the document.
    let root = serde_json::json!({
        "allOf": [schema],
        "components": openapi["components"],
    });
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {route} {status} does not match the document: {errors:?}\n{body}"
    );
}

/// A world whose first 10 records the receiver refuses (dead letters), then
/// accepts the rest; a daemon serving the API.
async fn started(per_second: u32) -> (World, PathBuf, Daemon, Client) {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.max_records = 5;
    world.sink_extra = format!("headers = {{ Authorization = \"Bearer {SECRET}\" }}");
    world.insert(1..=10, 0).await;
    world.receiver.set_status(422);
    let port = free_port();
    let path = write_config(&world, port, per_second);
    let daemon = spawn_daemon(&path, world.dir.path(), 1);
    let client = Client {
        port,
        http: reqwest::Client::new(),
    };
    (world, path, daemon, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_its_role_and_mutations_are_audited() {
    let (world, path, daemon, client) = started(10_000).await;
    let viewer = token(&path, &world, "dash", "viewer").await;
    let operator = token(&path, &world, "oncall", "operator").await;
    let admin = token(&path, &world, "root", "admin").await;
    // Wait for the run: two refused batches, two dead letters each 5.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let letters = loop {
        let (_, body, _) = client
            .call("GET", "/api/v1/dead-letters?state=pending", Some(&viewer))
            .await;
        let ids: Vec<i64> = body["dead_letters"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["id"].as_i64()).collect())
            .unwrap_or_default();
        if ids.len() == 10 {
            break ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{body}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, runs, _) = client.call("GET", "/api/v1/runs", Some(&viewer)).await;
    let run_id = runs["runs"][0]["id"].as_i64().expect("a run id");
    let tokens = [
        (None, None),
        (Some(viewer.as_str()), Some(Role::Viewer)),
        (Some(operator.as_str()), Some(Role::Operator)),
        (Some(admin.as_str()), Some(Role::Admin)),
    ];
    let (status, openapi, _) = client.call("GET", "/api/openapi.json", None).await;
    assert_eq!(status, 200, "the OpenAPI document is public");
    let operations: usize = openapi["paths"]
        .as_object()
        .map(|paths| {
            paths
                .values()
                .map(|p| p.as_object().map_or(0, serde_json::Map::len))
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(
        operations,
        ROUTES.len(),
        "every route is documented: {openapi}"
    );
    // The document changes only on purpose.
    insta::assert_json_snapshot!("openapi", openapi);
    // The check itself catches a wrong shape.
    let wrong = std::panic::catch_unwind(|| {
        conforms(
            &openapi,
            "GET",
            "/api/v1/runs",
            200,
            &serde_json::json!({"runs": [{"id": "seven"}], "next_cursor": null}),
        );
    });
    assert!(wrong.is_err(), "a run without its fields conformed");
    let mut discards = letters.iter();
    let mut mutations = 0;
    for (method, route, needed) in ROUTES {
        for (token, role) in &tokens {
            let path = route.replace("{name}", PIPELINE).replace(
                "{id}",
                &if route.starts_with("/api/v1/runs") {
                    run_id.to_string()
                } else {
                    let allowed = role.is_some_and(|r| r >= needed);
                    if route.ends_with("/discard") && allowed {
                        discards.next().expect("a letter to discard").to_string()
                    } else {
                        letters[9].to_string()
                    }
                },
            );
            let (status, body, _) = client.call(method, &path, *token).await;
            let want = match role {
                None => 401,
                Some(r) if *r < needed => 403,
                // This pipeline reads by cursor: nothing to backfill.
                Some(_) if route.ends_with("/backfill") => 409,
                // No aggregate and no alert in this config (tests/live.rs
                // and tests/alerts.rs have them): what these routes name is
                // not found.
                Some(_)
                    if route.starts_with("/api/v1/live/")
                        || route.starts_with("/api/v1/alerts/silences/")
                        || route.ends_with("/silence") =>
                {
                    404
                }
                // Resumed by now: a reset or resync needs it paused.
                Some(_) if method == "DELETE" || route.ends_with("/resync") => 409,
                // No workflow in this config: what a workflow route names
                // is not found (tests/api_workflows.rs runs one).
                Some(_)
                    if route.starts_with("/api/v1/workflows/")
                        || route.starts_with("/api/v1/workflow-runs/") =>
                {
                    404
                }
                // No crawl in this config: no frontier by that name
                // (tests/api_crawl.rs crawls).
                Some(_) if route.starts_with("/api/v1/crawl/frontiers/") => 404,
                // No dataset in this config (tests/api_datasets.rs serves
                // one).
                Some(_) if route.starts_with("/api/v1/datasets/") => 404,
                // No node has a dead letter's id (tests/cluster.rs drains
                // one).
                Some(_) if route.starts_with("/api/v1/nodes/") => 404,
                // No `[backup] dir` here and no `to` in the call
                // (tests/backup.rs takes backups).
                Some(_) if route == "/api/v1/backups" => 409,
                Some(_) => 200,
            };
            assert_eq!(status, want, "{method} {path} as {role:?}: {body}");
            conforms(&openapi, method, route, status, &body);
            if want != 200 {
                assert!(body["error"]["code"].is_string(), "{body}");
                if want == 409 {
                    let code = if route.ends_with("/backfill") {
                        "not_cdc"
                    } else if route.ends_with("/backups") {
                        "conflict"
                    } else {
                        "not_paused"
                    };
                    assert_eq!(body["error"]["code"], code, "{body}");
                }
                assert!(body["error"]["message"].is_string(), "{body}");
            }
            if method != "GET" && want != 401 && want != 403 {
                mutations += 1;
            }
        }
    }
    // Pausing shows, and a trigger while paused is refused.
    let (status, body, _) = client
        .call(
            "POST",
            &format!("/api/v1/pipelines/{PIPELINE}/pause"),
            Some(&operator),
        )
        .await;
    assert_eq!(
        (status, &body["paused"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    let (_, detail, _) = client
        .call(
            "GET",
            &format!("/api/v1/pipelines/{PIPELINE}"),
            Some(&viewer),
        )
        .await;
    assert_eq!(detail["paused"], true, "{detail}");
    // Paused, with an empty buffer: the checkpoint can be forgotten.
    let (status, body, _) = client
        .call(
            "DELETE",
            &format!("/api/v1/pipelines/{PIPELINE}/checkpoint"),
            Some(&operator),
        )
        .await;
    assert_eq!(
        (status, &body["had_checkpoint"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    conforms(
        &openapi,
        "DELETE",
        "/api/v1/pipelines/{name}/checkpoint",
        200,
        &body,
    );
    let (status, _, _) = client
        .call(
            "GET",
            &format!("/api/v1/pipelines/{PIPELINE}/checkpoint"),
            Some(&viewer),
        )
        .await;
    assert_eq!(status, 404, "no checkpoint after the reset");
    let (status, body, _) = client
        .call(
            "POST",
            &format!("/api/v1/pipelines/{PIPELINE}/trigger"),
            Some(&operator),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("paused"))
    );
    let (status, body, _) = client
        .call("GET", "/api/v1/pipelines/nope", Some(&viewer))
        .await;
    assert_eq!(status, 404);
    conforms(&openapi, "GET", "/api/v1/pipelines/{name}", 404, &body);
    // Swagger UI is served from the binary.
    let page = reqwest::get(format!("http://127.0.0.1:{}/api/docs/", client.port))
        .await
        .expect("the Swagger UI page");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap_or_default().contains("swagger"));
    // A trigger after resume starts a run that delivers the new rows.
    world.receiver.set_status(200);
    world.insert(11..=13, 1).await;
    client
        .call(
            "POST",
            &format!("/api/v1/pipelines/{PIPELINE}/resume"),
            Some(&operator),
        )
        .await;
    let (status, _, _) = client
        .call(
            "POST",
            &format!("/api/v1/pipelines/{PIPELINE}/trigger"),
            Some(&operator),
        )
        .await;
    assert_eq!(status, 200);
    // The reset checkpoint: the run reads every row again (10 refused
    // before, 3 new).
    world.wait_for_delivered(13).await;
    // The audit log has every mutating call, with who made it.
    let (_, audit, _) = client.call("GET", "/api/v1/audit", Some(&admin)).await;
    let entries = audit["audit"].as_array().expect("audit entries");
    assert_eq!(entries.len(), mutations + 5, "{audit}");
    assert!(
        entries
            .iter()
            .any(|e| e["token"] == "oncall" && e["status"] == 409),
        "{audit}"
    );
    // The CLI on the API: status and dead letters from the running daemon.
    let api = format!("http://127.0.0.1:{}", client.port);
    let cli = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Output::of(command(&path, world.dir.path(), &args))
    };
    let flags = |t: &str, rest: &[&str]| {
        let mut v = vec![
            "--api".to_string(),
            api.clone(),
            "--token".into(),
            t.to_string(),
        ];
        v.extend(rest.iter().map(|s| (*s).to_string()));
        v
    };
    let out = cli(flags(&viewer, &["status", "--json"])).await;
    assert_eq!(out.code, Some(0), "{out}");
    let rows: Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(rows[0]["pipeline"], PIPELINE, "{rows}");
    assert_eq!(rows[0]["paused"], false, "{rows}");
    let out = cli(flags(&viewer, &["dlq", "list", "--json"])).await;
    assert_eq!(out.code, Some(0), "{out}");
    // 10 letters: 2 discarded; the other 8 replayed twice while the
    // receiver still refused them, each time kept as new pending letters.
    let pending: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(pending.len(), 8, "{out}");
    let (_, all, _) = client
        .call("GET", "/api/v1/dead-letters?limit=500", Some(&viewer))
        .await;
    let replayed = all["dead_letters"]
        .as_array()
        .expect("letters")
        .iter()
        .filter(|l| l["state"] == "replayed")
        .count();
    assert_eq!(replayed, 16, "{all}");
    let target = pending[0]["id"].as_i64().expect("an id").to_string();
    let out = cli(flags(&viewer, &["dlq", "discard", &target])).await;
    assert_eq!(out.code, Some(1), "a viewer cannot discard: {out}");
    assert!(out.stderr.contains("403"), "{out}");
    let out = cli(flags(&operator, &["dlq", "discard", &target])).await;
    assert_eq!(out.code, Some(0), "{out}");
    // The receiver takes them now: a replay through the API delivers the
    // 7 still pending.
    let out = cli(flags(&operator, &["dlq", "replay", PIPELINE])).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("7 dead letters delivered, 0 refused again"),
        "{out}"
    );
    // A revoked token is refused.
    let out = Output::of(command(
        &path,
        world.dir.path(),
        &["token", "revoke", "dash"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let (status, _, _) = client.call("GET", "/api/v1/pipelines", Some(&viewer)).await;
    assert_eq!(status, 401);
    let (status, list, _) = client.call("GET", "/api/v1/tokens", Some(&admin)).await;
    assert_eq!(status, 200);
    assert!(!list.to_string().contains("cdl_"), "no token in {list}");
    // The other pipeline's run failed, and says why without the password.
    let (_, secret, _) = client
        .call("GET", "/api/v1/pipelines/zz_secret", Some(&admin))
        .await;
    assert_eq!(secret["outcome"], "failed", "{secret}");
    assert!(
        secret["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_table")),
        "{secret}"
    );
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(
        log.contains("no_such_table"),
        "the failure is logged:\n{log}"
    );
    assert!(!log.contains(PASSWORD), "a password in the log");
    assert!(!log.contains(SECRET), "a secret in the log");
    assert!(!log.contains(&operator), "a token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_get_429_with_retry_after() {
    let (world, path, daemon, client) = started(1).await;
    let viewer = token(&path, &world, "busy", "viewer").await;
    let mut limited = None;
    for _ in 0..10 {
        let (status, body, retry_after) = client.call("GET", "/api/v1/runs", Some(&viewer)).await;
        if status == 429 {
            limited = Some((body, retry_after));
            break;
        }
    }
    let (body, retry_after) = limited.expect("a 429 within 10 quick requests");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let secs: u64 = retry_after.parse().expect("Retry-After in seconds");
    assert!(secs >= 1, "{retry_after}");
    // Another token has its own allowance.
    let other = token(&path, &world, "calm", "viewer").await;
    let (status, _, _) = client.call("GET", "/api/v1/runs", Some(&other)).await;
    assert_eq!(status, 200);
    daemon.stop(Signal::SIGTERM).await;
}
