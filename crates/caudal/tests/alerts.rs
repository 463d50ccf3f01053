//! Alerts (`[alerts.NAME]`, `[notifiers.NAME]`, `/api/v1/alerts`) end to
//! end: the real `caudal run` evaluating rules on its own figures (dead
//! letters of a SQLite pipeline whose receiver refuses every record) and on
//! a live aggregate of a PostgreSQL 15 CDC pipeline, notifying a webhook on
//! loopback (a `caudal_testkit::Receiver`) that records every request and
//! can be told to fail.
//!
//! The dead letters make the condition deterministic: the receiver answers
//! 422, so the run's records become pending dead letters (value > 0, the
//! condition holds); discarding them makes the value 0 (it stops holding).
//!
//! Each test has its own source, state directory, receiver, webhook and
//! port, so they run in parallel.
//!
//! `a_resolution_is_not_delivered_before_its_firing` fails on purpose
//! until the outbox keeps an episode's notifications in order: a firing
//! waiting out its retry backoff is delivered after its resolution.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use caudal_testkit::{ReceivedRequest, Receiver};
#[cfg(feature = "postgres-cdc")]
use caudal_testkit::{TestDb, pg_database};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{Daemon, Output, PATIENCE, PIPELINE, World, command, spawn_daemon};

/// The dead-letters alert of most tests.
const DEAD: &str = "dead";
/// The `Authorization` the `ops` notifier sends.
const HOOK_AUTH: &str = "Bearer hook-secret-7d1e";
/// How long a test watches for something that must not happen (more
/// notifications), in evaluations of a rule with `every = "1s"`.
const QUIET: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `[alerts.dead]` rule: pending dead letters of the pipeline above 0,
/// held for `hold`, evaluated every second.
fn dead_rule(hold: &str, notify: &[&str]) -> String {
    let notify: Vec<String> = notify.iter().map(|n| format!("{n:?}")).collect();
    format!(
        r#"[alerts.{DEAD}]
check = "dead_letters"
pipeline = "{PIPELINE}"
above = 0
for = "{hold}"
every = "1s"
severity = "critical"
notify = [{}]
summary = "records are refused"
"#,
        notify.join(", ")
    )
}

/// The `[notifiers]` of every test: `ops` (JSON, with an `Authorization`)
/// at `/ops` and `chat` (Slack) at `/chat` of the webhook.
fn notifiers(webhook: &Receiver) -> String {
    format!(
        r#"[notifiers.ops]
url = "{ops}"
headers = {{ Authorization = "{HOOK_AUTH}" }}
timeout = "5s"

[notifiers.chat]
url = "{chat}"
format = "slack"
"#,
        ops = webhook.url("/ops"),
        chat = webhook.url("/chat"),
    )
}

/// One answer of the API.
#[derive(Debug)]
struct Answer {
    status: u16,
    json: Value,
    text: String,
}

/// A daemon serving the API on `port`, with a viewer's and an operator's
/// token, and the webhook its notifiers post to.
struct Alerting {
    dir: PathBuf,
    path: PathBuf,
    port: u16,
    webhook: Receiver,
    http: reqwest::Client,
    viewer: String,
    operator: String,
    daemon: Option<Daemon>,
}

impl Alerting {
    /// Writes `config` (with `[server]` and the notifiers added) into `dir`,
    /// creates the tokens and starts `caudal run`.
    async fn start(dir: PathBuf, config: &str, webhook: Receiver) -> Self {
        let port = free_port();
        let path = dir.join("alerts.toml");
        let text = format!(
            "{config}\n[server]\nlisten = \"127.0.0.1:{port}\"\nrequests_per_second = 10000\n\n{}",
            notifiers(&webhook)
        );
        std::fs::write(&path, text).expect("write the config");
        let mut a = Self {
            dir,
            path,
            port,
            webhook,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            viewer: String::new(),
            operator: String::new(),
            daemon: None,
        };
        a.viewer = a.token("dash", "viewer").await;
        a.operator = a.token("oncall", "operator").await;
        a.daemon = Some(spawn_daemon(&a.path, &a.dir, 1));
        a
    }

    /// Starts a daemon for a SQLite [`World`] and `rules`.
    async fn sqlite(world: &World, rules: &str) -> Self {
        Self::start(
            world.dir.path().to_path_buf(),
            &format!("{}\n{rules}", world.config_toml()),
            Receiver::start().await,
        )
        .await
    }

    async fn caudal(&self, args: &[&str]) -> Output {
        Output::of(command(&self.path, &self.dir, args)).await
    }

    async fn token(&self, name: &str, role: &str) -> String {
        let out = self
            .caudal(&["token", "create", "--name", name, "--role", role])
            .await;
        assert_eq!(out.code, Some(0), "token create: {out}");
        let token = out.stdout.trim().to_string();
        assert!(!token.is_empty(), "no token printed: {out}");
        token
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// `method path` with `token` and a JSON `body`, waiting (at most
    /// [`PATIENCE`]) for the server to listen.
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            if let Some(b) = body {
                request = request
                    .header("Content-Type", "application/json")
                    .body(b.to_string());
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Answer { status, json, text };
                }
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{url}: {e}\nlog:\n{}",
                        self.log()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// GET `path` as the viewer; it must answer 200.
    async fn get(&self, path: &str) -> Value {
        let a = self.call("GET", path, Some(&self.viewer), None).await;
        assert_eq!(a.status, 200, "GET {path}: {}", a.text);
        a.json
    }

    /// Polls `probe` until it gives `Ok`; on timeout the failure names
    /// `what`, the last `Err` and the daemon's log.
    async fn eventually<T>(
        &self,
        what: &str,
        mut probe: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match probe().await {
                Ok(t) => return t,
                Err(last) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what} not reached after {PATIENCE:?}: {last}\nlog:\n{}",
                    self.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The history of `alert`, newest first.
    async fn history(&self, alert: &str) -> Vec<Value> {
        let page = self
            .get(&format!("/api/v1/alerts/history?alert={alert}"))
            .await;
        page["events"]
            .as_array()
            .unwrap_or_else(|| panic!("no events: {page}"))
            .clone()
    }

    /// Waits until the history of `alert` is `want` (event names, newest
    /// first); returns the events.
    async fn wait_for_history(&self, alert: &str, want: &[&str]) -> Vec<Value> {
        self.eventually(&format!("history {want:?}"), async || {
            let events = self.history(alert).await;
            if names(&events) == want {
                Ok(events)
            } else {
                Err(Value::Array(events).to_string())
            }
        })
        .await
    }

    /// The notifications of `alert` in the outbox, newest first.
    async fn notifications(&self, alert: &str) -> Vec<Value> {
        let page = self
            .get(&format!("/api/v1/alerts/notifications?alert={alert}"))
            .await;
        page["notifications"]
            .as_array()
            .unwrap_or_else(|| panic!("no notifications: {page}"))
            .clone()
    }

    /// The entry of `alert` in `GET /api/v1/alerts`.
    async fn rule(&self, alert: &str) -> Value {
        let all = self.get("/api/v1/alerts").await;
        all["alerts"]
            .as_array()
            .unwrap_or_else(|| panic!("no alerts: {all}"))
            .iter()
            .find(|a| a["name"] == alert)
            .cloned()
            .unwrap_or_else(|| panic!("{alert} is not listed: {all}"))
    }

    /// The pending and firing instances of `alert`.
    async fn instances(&self, alert: &str) -> Vec<Value> {
        let rule = self.rule(alert).await;
        rule["instances"]
            .as_array()
            .unwrap_or_else(|| panic!("no instances: {rule}"))
            .clone()
    }

    /// The value of sample `name` with `labels` in `/metrics`, if any.
    async fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let a = self.call("GET", "/metrics", None, None).await;
        assert_eq!(a.status, 200, "/metrics: {}", a.text);
        let scrape = prometheus_parse::Scrape::parse(a.text.lines().map(|l| Ok(l.to_string())))
            .expect("valid Prometheus text");
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    /// Waits until sample `name` with `labels` is `want`.
    async fn wait_for_sample(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        self.eventually(&format!("{name}{labels:?} = {want}"), async || {
            match self.sample(name, labels).await {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// The ids of the pipeline's pending dead letters.
    async fn pending_letters(&self) -> Vec<i64> {
        let page = self.get("/api/v1/dead-letters?state=pending").await;
        page["dead_letters"]
            .as_array()
            .unwrap_or_else(|| panic!("no dead letters: {page}"))
            .iter()
            .map(|l| l["id"].as_i64().expect("a dead letter id"))
            .collect()
    }

    /// Discards every pending dead letter through the API, as the operator.
    async fn discard_all(&self) {
        for id in self.pending_letters().await {
            let a = self
                .call(
                    "POST",
                    &format!("/api/v1/dead-letters/{id}/discard"),
                    Some(&self.operator),
                    None,
                )
                .await;
            assert_eq!(a.status, 200, "discard {id}: {}", a.text);
        }
    }

    /// The webhook's requests at `path`, in arrival order.
    fn hooks(&self, path: &str) -> Vec<ReceivedRequest> {
        self.webhook
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until `done` holds for the webhook's requests.
    async fn wait_for_hooks(&self, what: &str, done: impl Fn(&[ReceivedRequest]) -> bool) {
        let reached = self.webhook.wait_for(|reqs| done(reqs), PATIENCE).await;
        assert!(
            reached,
            "{what} not reached after {PATIENCE:?}; the webhook got:\n{}\nlog:\n{}",
            describe(&self.webhook.requests()),
            self.log()
        );
    }

    /// Stops the daemon with SIGTERM; it must exit cleanly.
    async fn stop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            let (status, log) = daemon.stop(Signal::SIGTERM).await;
            assert!(
                status.success(),
                "caudal run exited with {status}; log:\n{log}"
            );
        }
    }
}

/// The event names of a history, in its order.
fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect()
}

/// The JSON body of a notification request.
fn payload(r: &ReceivedRequest) -> Value {
    r.json
        .clone()
        .unwrap_or_else(|| panic!("a notification that is not JSON: {}", r.text()))
}

/// Accepted (2xx) requests of `reqs` at `path` whose JSON `status` (JSON
/// notifier) or text (Slack) says `kind`.
fn accepted(reqs: &[ReceivedRequest], path: &str, kind: &str) -> usize {
    reqs.iter()
        .filter(|r| r.path == path && r.accepted())
        .filter(|r| {
            r.json.as_ref().is_some_and(|j| {
                j["status"] == kind
                    || j["text"]
                        .as_str()
                        .is_some_and(|t| t.contains(&format!(" {kind}: ")))
            })
        })
        .count()
}

fn describe(reqs: &[ReceivedRequest]) -> String {
    reqs.iter()
        .map(|r| {
            format!(
                "{} {} -> {:?} key {:?}: {}",
                r.method,
                r.path,
                r.status,
                r.header("idempotency-key"),
                r.text()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn time(v: &Value) -> jiff::Timestamp {
    let text = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
}

/// 1. Dead letters held for `for` fire the alert once: one firing
/// notification per notifier (JSON with every field, Slack text), the API,
/// `caudal status` and `/metrics` show it firing; discarding them resolves
/// it once: one resolved notification per notifier, the history reads
/// pending → firing → resolved, the gauge goes back to 0, and nothing is
/// sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_once_after_its_for_notifies_each_notifier_and_resolves_once() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.receiver.set_status(422);
    world.insert(1..=3, 0).await;
    let mut a = Alerting::sqlite(&world, &dead_rule("2s", &["ops", "chat"])).await;
    let labels = json!({ "pipeline": PIPELINE });
    let gauge = [("alert", DEAD), ("severity", "critical")];

    a.wait_for_hooks("a firing notification at each notifier", |r| {
        accepted(r, "/ops", "firing") >= 1 && accepted(r, "/chat", "firing") >= 1
    })
    .await;
    let events = a.wait_for_history(DEAD, &["firing", "pending"]).await;
    let (fired, pending) = (&events[0], &events[1]);
    for e in &events {
        assert_eq!(e["alert"], DEAD, "{e}");
        assert_eq!(e["labels"], labels, "{e}");
        assert_eq!(e["value"].as_f64(), Some(3.0), "3 dead letters: {e}");
    }
    let instances = a.instances(DEAD).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let i = &instances[0];
    // It fired only once the condition had held for `for`, by the store's
    // clock at the evaluations (`since`, `fired_at`): a promise of the
    // rules, not a timing of this machine. History events are stamped when
    // the evaluation is written, a little later.
    let (since, fired_at) = (time(&i["since"]), time(&i["fired_at"]));
    let held = fired_at.duration_since(since);
    assert!(
        held >= jiff::SignedDuration::from_secs(2),
        "fired {held:?} after it started to hold, before its for of 2s: {i}"
    );
    assert!(time(&pending["at"]) >= since, "{events:?} {i}");
    assert!(time(&fired["at"]) >= fired_at, "{events:?} {i}");

    // The JSON notification.
    let ops = a.hooks("/ops");
    assert_eq!(ops.len(), 1, "{}", describe(&ops));
    let body = payload(&ops[0]);
    assert_eq!(
        ops[0].header("idempotency-key"),
        body["id"].as_str(),
        "the key is the payload's id"
    );
    assert_eq!(ops[0].header("authorization"), Some(HOOK_AUTH));
    assert_eq!(ops[0].header("content-type"), Some("application/json"));
    assert_eq!(body["alert"], DEAD, "{body}");
    assert_eq!(body["status"], "firing", "{body}");
    assert_eq!(body["severity"], "critical", "{body}");
    assert_eq!(body["labels"], labels, "{body}");
    assert_eq!(body["value"].as_f64(), Some(3.0), "{body}");
    assert_eq!(body["threshold"]["above"].as_f64(), Some(0.0), "{body}");
    assert_eq!(
        body["threshold"].as_object().map(serde_json::Map::len),
        Some(1),
        "{body}"
    );
    assert_eq!(body["for"], "2s", "{body}");
    assert_eq!(body["watching"], "dead_letters", "{body}");
    assert_eq!(body["summary"], "records are refused", "{body}");
    assert_eq!(
        body["fired_at"], i["fired_at"],
        "the episode is the firing: {body}"
    );
    assert_eq!(body["at"], i["fired_at"], "sent for the firing: {body}");
    // The Slack one.
    let chat = a.hooks("/chat");
    assert_eq!(chat.len(), 1, "{}", describe(&chat));
    let slack = payload(&chat[0]);
    let text = slack["text"].as_str().unwrap_or_default();
    assert_eq!(
        slack.as_object().map(serde_json::Map::len),
        Some(1),
        "{slack}"
    );
    for part in [
        ":rotating_light:",
        "[critical] dead firing:",
        &format!("pipeline=\"{PIPELINE}\""),
        "dead_letters=3",
        "above 0",
        "records are refused",
    ] {
        assert!(text.contains(part), "{part:?} not in {text:?}");
    }
    assert_eq!(chat[0].header("authorization"), None, "ops' header only");
    let chat_key = chat[0]
        .header("idempotency-key")
        .expect("a key")
        .to_string();
    assert_ne!(
        Some(chat_key.as_str()),
        body["id"].as_str(),
        "a key per notifier"
    );

    // The API, `caudal status` and the gauge show it firing.
    let rule = a.rule(DEAD).await;
    assert_eq!(rule["watching"], "dead_letters", "{rule}");
    assert_eq!(rule["severity"], "critical", "{rule}");
    assert_eq!(rule["above"].as_f64(), Some(0.0), "{rule}");
    assert_eq!(rule["below"], Value::Null, "{rule}");
    assert_eq!(rule["for"], "2s", "{rule}");
    assert_eq!(rule["every"], "1s", "{rule}");
    assert_eq!(rule["notify"], json!(["ops", "chat"]), "{rule}");
    assert_eq!(rule["summary"], "records are refused", "{rule}");
    assert_eq!(rule["instances"], json!([i]), "{rule}");
    assert_eq!(i["labels"], labels, "{i}");
    assert_eq!(i["state"], "firing", "{i}");
    assert_eq!(i["value"].as_f64(), Some(3.0), "{i}");
    assert_eq!(i["notified"], true, "{i}");
    assert_eq!(i["silenced"], false, "{i}");
    let out = a.caudal(&["status"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let header = out
        .stdout
        .lines()
        .find(|l| l.starts_with("ALERT"))
        .unwrap_or_else(|| panic!("no alerts table: {out}"));
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        columns,
        ["ALERT", "STATE", "SEVERITY", "LABELS", "VALUE", "SINCE"],
        "{out}"
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(DEAD))
        .unwrap_or_else(|| panic!("the firing alert is not in: {out}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells[..5],
        [
            DEAD,
            "firing",
            "critical",
            &format!("{{\"pipeline\":\"{PIPELINE}\"}}"),
            "3"
        ],
        "{out}"
    );
    a.wait_for_sample("caudal_alerts_firing", &gauge, 1.0).await;

    // Still firing through more evaluations: nothing more is sent.
    tokio::time::sleep(QUIET).await;
    assert_eq!(a.hooks("/ops").len(), 1, "{}", describe(&a.hooks("/ops")));
    assert_eq!(a.hooks("/chat").len(), 1, "{}", describe(&a.hooks("/chat")));

    // The dead letters discarded (one transaction, from the CLI): resolved.
    let ids: Vec<String> = a
        .pending_letters()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut args = vec!["dlq", "discard"];
    args.extend(ids.iter().map(String::as_str));
    let out = a.caudal(&args).await;
    assert_eq!(out.code, Some(0), "{out}");
    a.wait_for_hooks("a resolved notification at each notifier", |r| {
        accepted(r, "/ops", "resolved") >= 1 && accepted(r, "/chat", "resolved") >= 1
    })
    .await;
    let events = a
        .wait_for_history(DEAD, &["resolved", "firing", "pending"])
        .await;
    assert_eq!(events[0]["value"].as_f64(), Some(0.0), "{events:?}");
    assert_eq!(events[0]["labels"], labels, "{events:?}");
    let ops = a.hooks("/ops");
    assert_eq!(ops.len(), 2, "{}", describe(&ops));
    let resolved = payload(&ops[1]);
    assert_eq!(resolved["status"], "resolved", "{resolved}");
    assert_eq!(resolved["labels"], labels, "{resolved}");
    assert_eq!(resolved["value"].as_f64(), Some(0.0), "{resolved}");
    assert_eq!(
        resolved["fired_at"], body["fired_at"],
        "the same episode: {resolved}"
    );
    assert!(
        time(&resolved["at"]) > time(&resolved["fired_at"])
            && time(&resolved["at"]) <= time(&events[0]["at"]),
        "resolved at its evaluation: {resolved} {events:?}"
    );
    assert_eq!(resolved["severity"], "critical", "{resolved}");
    assert_eq!(ops[1].header("idempotency-key"), resolved["id"].as_str());
    assert_ne!(resolved["id"], body["id"], "resolved has its own key");
    let chat = a.hooks("/chat");
    assert_eq!(chat.len(), 2, "{}", describe(&chat));
    let text = payload(&chat[1])["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains(":white_check_mark:") && text.contains("[critical] dead resolved:"),
        "{text}"
    );

    assert_eq!(a.instances(DEAD).await, Vec::<Value>::new());
    a.wait_for_sample("caudal_alerts_firing", &gauge, 0.0).await;
    let out = a.caudal(&["status"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("alerts: none pending or firing (1 rules)"),
        "{out}"
    );
    // The outbox: four notifications, each sent at its first attempt, with
    // the keys the webhook saw.
    let sent = a.notifications(DEAD).await;
    assert_eq!(sent.len(), 4, "{sent:?}");
    let mut keys_sent: Vec<&str> = sent.iter().filter_map(|n| n["key"].as_str()).collect();
    keys_sent.sort_unstable();
    let hooks = a.webhook.requests();
    let mut keys_seen: Vec<&str> = hooks
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    keys_seen.sort_unstable();
    assert_eq!(keys_sent, keys_seen, "{sent:?}");
    for n in &sent {
        assert_eq!(n["alert"], DEAD, "{n}");
        assert_eq!(n["attempts"], 1, "{n}");
        assert!(n["sent_at"].is_string(), "{n}");
        assert_eq!(n["last_error"], Value::Null, "{n}");
    }
    let kinds: Vec<(&str, &str)> = sent
        .iter()
        .map(|n| {
            (
                n["notifier"].as_str().unwrap_or("?"),
                n["kind"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    for want in [
        ("ops", "firing"),
        ("chat", "firing"),
        ("ops", "resolved"),
        ("chat", "resolved"),
    ] {
        assert_eq!(
            kinds.iter().filter(|k| **k == want).count(),
            1,
            "{want:?}: {kinds:?}"
        );
    }
    a.wait_for_sample(
        "caudal_alert_notifications_total",
        &[("alert", DEAD), ("outcome", "sent")],
        4.0,
    )
    .await;

    // Inactive through more evaluations: nothing more is sent or recorded.
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        a.webhook.request_count(),
        4,
        "{}",
        describe(&a.webhook.requests())
    );
    assert_eq!(
        names(&a.history(DEAD).await),
        ["resolved", "firing", "pending"]
    );
    a.stop().await;
}

/// 2. A condition that stops holding before its `for` never fires: the
/// history reads pending → cleared, nothing is queued or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_shorter_than_its_for_is_cleared_without_a_notification() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.receiver.set_status(422);
    world.insert(1..=3, 0).await;
    let mut a = Alerting::sqlite(&world, &dead_rule("1h", &["ops", "chat"])).await;
    let events = a.wait_for_history(DEAD, &["pending"]).await;
    assert_eq!(events[0]["value"].as_f64(), Some(3.0), "{events:?}");
    let instances = a.instances(DEAD).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0]["state"], "pending", "{instances:?}");
    assert_eq!(instances[0]["fired_at"], Value::Null, "{instances:?}");
    assert_eq!(instances[0]["notified"], false, "{instances:?}");
    let out = a.caudal(&["status"]).await;
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(DEAD))
        .unwrap_or_else(|| panic!("the pending alert is not in: {out}"));
    assert_eq!(line.split_whitespace().nth(1), Some("pending"), "{out}");

    // Discarded one by one through the API: the value goes 3, 2, 1 (still
    // holding), then 0.
    a.discard_all().await;
    let events = a.wait_for_history(DEAD, &["cleared", "pending"]).await;
    assert_eq!(events[0]["value"].as_f64(), Some(0.0), "{events:?}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        names(&a.history(DEAD).await),
        ["cleared", "pending"],
        "no firing, ever"
    );
    assert_eq!(a.instances(DEAD).await, Vec::<Value>::new());
    assert_eq!(a.notifications(DEAD).await, Vec::<Value>::new());
    assert_eq!(
        a.webhook.request_count(),
        0,
        "{}",
        describe(&a.webhook.requests())
    );
    assert_eq!(
        a.sample("caudal_alerts_firing", &[("alert", DEAD)]).await,
        Some(0.0)
    );
    a.stop().await;
}

/// 3. A silence made through the API keeps a firing quiet (the API shows
/// the instance firing, not notified, silenced); ending it while the alert
/// still fires sends the firing then, once, for the episode that fired
/// under the silence. An episode that fires and resolves entirely within
/// a silence sends nothing, not even when the silence ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_holds_the_firing_until_it_ends_and_swallows_a_whole_episode() {
    let mut world = World::sqlite().await;
    // Runs every second: rows inserted later become dead letters.
    world.every = "1s".into();
    world.receiver.set_status(422);
    let mut a = Alerting::sqlite(&world, &dead_rule("0s", &["ops"])).await;
    let silence = a
        .call(
            "POST",
            &format!("/api/v1/alerts/{DEAD}/silence"),
            Some(&a.operator),
            Some(&json!({
                "for": "1h",
                "labels": { "pipeline": PIPELINE },
                "reason": "the partner deploys",
            })),
        )
        .await;
    assert_eq!(silence.status, 201, "{}", silence.text);
    let s = &silence.json;
    let id = s["id"].as_i64().expect("a silence id");
    assert_eq!(s["alert"], DEAD, "{s}");
    assert_eq!(s["labels"], json!({ "pipeline": PIPELINE }), "{s}");
    assert_eq!(s["reason"], "the partner deploys", "{s}");
    assert_eq!(s["created_by"], "oncall", "the operator's token: {s}");
    assert_eq!(
        time(&s["until"]).duration_since(time(&s["created_at"])),
        jiff::SignedDuration::from_hours(1),
        "{s}"
    );
    let rule = a.rule(DEAD).await;
    assert_eq!(rule["silences"], json!([s]), "{rule}");

    world.insert(1..=2, 0).await;
    let firing = a
        .eventually("a silenced firing instance", async || {
            let instances = a.instances(DEAD).await;
            match instances.first() {
                Some(i) if i["state"] == "firing" => Ok(i.clone()),
                _ => Err(format!("{instances:?}")),
            }
        })
        .await;
    assert_eq!(firing["silenced"], true, "{firing}");
    assert_eq!(firing["notified"], false, "{firing}");
    assert_eq!(firing["value"].as_f64(), Some(2.0), "{firing}");
    let events = a.wait_for_history(DEAD, &["firing"]).await;
    assert!(
        time(&events[0]["at"]) >= time(&firing["fired_at"]),
        "{events:?} {firing}"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        a.webhook.request_count(),
        0,
        "silenced: {}",
        describe(&a.webhook.requests())
    );
    assert_eq!(a.notifications(DEAD).await, Vec::<Value>::new());

    // Ended while it still fires: the firing is sent now, once.
    let ended = a
        .call(
            "DELETE",
            &format!("/api/v1/alerts/silences/{id}"),
            Some(&a.operator),
            None,
        )
        .await;
    assert_eq!(ended.status, 200, "{}", ended.text);
    assert_eq!(ended.json, json!({ "silence": id, "ended": true }));
    a.wait_for_hooks("the firing once the silence ended", |r| {
        accepted(r, "/ops", "firing") >= 1
    })
    .await;
    let body = payload(&a.hooks("/ops")[0]);
    assert_eq!(body["status"], "firing", "{body}");
    assert_eq!(body["labels"], json!({ "pipeline": PIPELINE }), "{body}");
    assert_eq!(
        body["fired_at"], firing["fired_at"],
        "the episode that fired under the silence: {body}"
    );
    assert!(
        time(&body["at"]) > time(&body["fired_at"]),
        "sent after it fired: {body}"
    );
    let rule = a.rule(DEAD).await;
    assert_eq!(rule["silences"], json!([]), "{rule}");
    let i = &rule["instances"][0];
    assert_eq!(
        (&i["notified"], &i["silenced"]),
        (&json!(true), &json!(false)),
        "{rule}"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        a.webhook.request_count(),
        1,
        "{}",
        describe(&a.webhook.requests())
    );
    assert_eq!(names(&a.history(DEAD).await), ["firing"], "one episode");
    let again = a
        .call(
            "DELETE",
            &format!("/api/v1/alerts/silences/{id}"),
            Some(&a.operator),
            None,
        )
        .await;
    assert_eq!(again.status, 404, "no longer in force: {}", again.text);

    // A silence of every instance; the episode notified before resolves
    // under it: its resolution is notified all the same (docs/live.md: "a
    // resolution is notified whenever its firing was, silenced or not").
    let silence = a
        .call(
            "POST",
            &format!("/api/v1/alerts/{DEAD}/silence"),
            Some(&a.operator),
            Some(&json!({ "for": "1h" })),
        )
        .await;
    assert_eq!(silence.status, 201, "{}", silence.text);
    assert_eq!(silence.json["labels"], Value::Null, "{}", silence.text);
    assert_eq!(silence.json["reason"], "", "{}", silence.text);
    let second = silence.json["id"].as_i64().expect("a silence id");
    let i = &a.instances(DEAD).await[0];
    assert_eq!(
        (&i["silenced"], &i["notified"]),
        (&json!(true), &json!(true)),
        "{i}"
    );
    a.discard_all().await;
    a.wait_for_hooks("the resolution of the notified episode", |r| {
        accepted(r, "/ops", "resolved") >= 1
    })
    .await;
    let resolved = payload(&a.hooks("/ops")[1]);
    assert_eq!(resolved["fired_at"], body["fired_at"], "{resolved}");

    // Under the same silence, a second episode fires and resolves: nothing
    // is sent, then or when the silence ends.
    world.insert(3..=4, 1).await;
    a.wait_for_history(DEAD, &["firing", "resolved", "firing"])
        .await;
    let i = &a.instances(DEAD).await[0];
    assert_eq!(
        (&i["silenced"], &i["notified"]),
        (&json!(true), &json!(false)),
        "{i}"
    );
    a.discard_all().await;
    a.wait_for_history(DEAD, &["resolved", "firing", "resolved", "firing"])
        .await;
    let ended = a
        .call(
            "DELETE",
            &format!("/api/v1/alerts/silences/{second}"),
            Some(&a.operator),
            None,
        )
        .await;
    assert_eq!(ended.status, 200, "{}", ended.text);
    tokio::time::sleep(QUIET).await;
    let ops = a.hooks("/ops");
    assert_eq!(
        ops.iter()
            .map(|r| payload(r)["status"].clone())
            .collect::<Vec<_>>(),
        [json!("firing"), json!("resolved")],
        "only the first episode: {}",
        describe(&ops)
    );
    assert_eq!(a.notifications(DEAD).await.len(), 2);
    // Both silences and both ends are in the audit log, with their token.
    let admin = a.token("root", "admin").await;
    let audit = a.call("GET", "/api/v1/audit", Some(&admin), None).await;
    assert_eq!(audit.status, 200, "{}", audit.text);
    let calls: Vec<(String, String, i64)> = audit.json["audit"]
        .as_array()
        .expect("audit entries")
        .iter()
        .filter(|e| {
            e["token"] == "oncall" && e["path"].as_str().is_some_and(|p| p.contains("/alerts/"))
        })
        .map(|e| {
            (
                e["method"].as_str().unwrap_or("?").to_string(),
                // Recorded as routed under /api/v1 (without the prefix).
                e["path"]
                    .as_str()
                    .map(|p| p.trim_start_matches("/api/v1"))
                    .unwrap_or("?")
                    .to_string(),
                e["status"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let post = ("POST".to_string(), format!("/alerts/{DEAD}/silence"), 201);
    for want in [
        post.clone(),
        post,
        ("DELETE".into(), format!("/alerts/silences/{id}"), 200),
        ("DELETE".into(), format!("/alerts/silences/{id}"), 404),
        ("DELETE".into(), format!("/alerts/silences/{second}"), 200),
    ] {
        assert!(calls.contains(&want), "{want:?} not in {calls:?}");
    }
    assert_eq!(calls.len(), 5, "{calls:?}");
    a.stop().await;
}

/// 4. The webhook answers 503 three times, then 200: the firing arrives
/// accepted exactly once, every attempt carries the same Idempotency-Key
/// and body, the outbox shows 4 attempts, the time it was sent and the
/// last error, and the counters say 3 failed, 1 sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_outage_delays_the_notification_and_retries_keep_its_key() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.receiver.set_status(422);
    world.insert(1..=3, 0).await;
    let webhook = Receiver::start().await;
    webhook.fail_next(3, 503);
    let mut a = Alerting::start(
        world.dir.path().to_path_buf(),
        &format!("{}\n{}", world.config_toml(), dead_rule("0s", &["ops"])),
        webhook,
    )
    .await;
    a.wait_for_hooks("the notification accepted", |r| {
        accepted(r, "/ops", "firing") >= 1
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let ops = a.hooks("/ops");
    let statuses: Vec<Option<u16>> = ops.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Some(503), Some(503), Some(503), Some(200)],
        "{}",
        describe(&ops)
    );
    let key = ops[0].header("idempotency-key").expect("a key").to_string();
    for r in &ops {
        assert_eq!(
            r.header("idempotency-key"),
            Some(key.as_str()),
            "{}",
            describe(&ops)
        );
        assert_eq!(r.body, ops[0].body, "the same notification each time");
        assert_eq!(r.header("authorization"), Some(HOOK_AUTH));
    }
    assert_eq!(payload(&ops[0])["id"], key.as_str());
    let sent = a.notifications(DEAD).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let n = &sent[0];
    assert_eq!(n["key"], key.as_str(), "{n}");
    assert_eq!(n["notifier"], "ops", "{n}");
    assert_eq!(n["kind"], "firing", "{n}");
    assert_eq!(n["attempts"], 4, "{n}");
    assert!(n["sent_at"].is_string(), "{n}");
    assert!(
        n["last_error"].as_str().is_some_and(|e| e.contains("503")),
        "{n}"
    );
    assert!(time(&n["sent_at"]) > time(&n["created_at"]), "{n}");
    a.wait_for_sample(
        "caudal_alert_notifications_total",
        &[("alert", DEAD), ("outcome", "failed")],
        3.0,
    )
    .await;
    a.wait_for_sample(
        "caudal_alert_notifications_total",
        &[("alert", DEAD), ("outcome", "sent")],
        1.0,
    )
    .await;
    assert_eq!(
        names(&a.history(DEAD).await),
        ["firing"],
        "for 0s: fired at the first evaluation"
    );
    a.stop().await;
}

/// 4b. A notification queued while the webhook is down survives a SIGKILL
/// of the daemon: the next daemon sends it, with its key, and does not
/// queue the firing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_queued_during_an_outage_survives_a_kill_and_is_sent_once() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.receiver.set_status(422);
    world.insert(1..=3, 0).await;
    let webhook = Receiver::start().await;
    webhook.stop().await;
    let mut a = Alerting::start(
        world.dir.path().to_path_buf(),
        &format!("{}\n{}", world.config_toml(), dead_rule("0s", &["ops"])),
        webhook,
    )
    .await;
    let queued = a
        .eventually("a failed attempt", async || {
            let sent = a.notifications(DEAD).await;
            match sent.first() {
                Some(n) if n["attempts"].as_i64() >= Some(1) => Ok(n.clone()),
                _ => Err(format!("{sent:?}")),
            }
        })
        .await;
    assert_eq!(queued["sent_at"], Value::Null, "{queued}");
    assert!(queued["last_error"].is_string(), "{queued}");
    let daemon = a.daemon.take().expect("the daemon");
    daemon.stop(Signal::SIGKILL).await;
    a.webhook.restart().await;
    a.daemon = Some(spawn_daemon(&a.path, &a.dir, 2));
    a.wait_for_hooks("the notification after the restart", |r| {
        accepted(r, "/ops", "firing") >= 1
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let ops = a.hooks("/ops");
    assert_eq!(ops.len(), 1, "{}", describe(&ops));
    assert_eq!(ops[0].header("idempotency-key"), queued["key"].as_str());
    let sent = a.notifications(DEAD).await;
    assert_eq!(sent.len(), 1, "not queued again: {sent:?}");
    assert!(sent[0]["sent_at"].is_string(), "{sent:?}");
    assert_eq!(
        names(&a.history(DEAD).await),
        ["firing"],
        "for 0s: fired at the first evaluation"
    );
    a.stop().await;
}

/// 4c. An episode's notifications reach the webhook in order: its
/// resolution is not delivered before its firing. Here the firing meets an
/// outage and waits out its backoff (16 s after its 4th failure); the
/// webhook is back and the alert resolves meanwhile. Either the resolution
/// waits for the firing, or the firing is dropped as stale; a receiver must
/// never see `resolved` followed by `firing` of one episode (it would show
/// the alert firing forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_is_not_delivered_before_its_firing() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.receiver.set_status(422);
    world.insert(1..=3, 0).await;
    let webhook = Receiver::start().await;
    webhook.set_status(503);
    let mut a = Alerting::start(
        world.dir.path().to_path_buf(),
        &format!("{}\n{}", world.config_toml(), dead_rule("0s", &["ops"])),
        webhook,
    )
    .await;
    a.eventually("four failed attempts of the firing", async || {
        let sent = a.notifications(DEAD).await;
        match sent.first() {
            Some(n) if n["attempts"].as_i64() >= Some(4) => Ok(()),
            _ => Err(format!("{sent:?}")),
        }
    })
    .await;
    a.webhook.set_status(200);
    a.discard_all().await;
    a.wait_for_history(DEAD, &["resolved", "firing"]).await;
    a.wait_for_hooks("the resolution accepted", |r| {
        accepted(r, "/ops", "resolved") >= 1
    })
    .await;
    // Whatever comes of the firing within a while, it does not follow the
    // resolution.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let delivered: Vec<String> = a
        .hooks("/ops")
        .iter()
        .filter(|r| r.accepted())
        .map(|r| payload(r)["status"].as_str().unwrap_or("?").to_string())
        .collect();
    assert!(
        delivered == ["firing", "resolved"] || delivered == ["resolved"],
        "the webhook accepted {delivered:?} for one episode:\n{}",
        describe(&a.hooks("/ops"))
    );
    a.stop().await;
}

#[cfg(feature = "postgres-cdc")]
/// The PostgreSQL table of the aggregate alert.
const SALES: &str = "
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        provider_id int NOT NULL,
        amount numeric(12,2),
        sold_at timestamptz NOT NULL);
    ALTER TABLE sales REPLICA IDENTITY FULL;";

#[cfg(feature = "postgres-cdc")]
/// A PostgreSQL CDC pipeline `sales` with a per-provider, per-minute sum
/// of `amount` by `sold_at`, and an alert when a provider's sales in the
/// latest closed minute are below 100.
async fn sales_world() -> (TestDb, String, tempfile::TempDir, Receiver) {
    let db = pg_database().await;
    let slot = format!("caudal_a_{}", &db.name()[db.name().len() - 20..]);
    exec(&db, SALES).await;
    (
        db,
        slot,
        tempfile::tempdir().expect("a state directory"),
        Receiver::start().await,
    )
}

#[cfg(feature = "postgres-cdc")]
fn sales_config(db: &TestDb, slot: &str, dir: &std::path::Path, receiver: &Receiver) -> String {
    format!(
        r#"[state]
url = "sqlite://{state}"

[sources.pg]
type = "postgres"
url = "{url}"
mode = "cdc"
tables = ["sales"]
slot = "{slot}"
publication = "{slot}"
heartbeat = "1s"

[sinks.recv]
type = "http"
url = "{receiver}"
batch = {{ max_records = 200, max_wait = "50ms" }}
delivery.retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[pipelines.sales]
source = "pg"
sink = "recv"

[aggregates.per_minute]
pipeline = "sales"
group_by = ["provider_id"]
time = "sold_at"
window = "1m"
[aggregates.per_minute.metrics]
orders = "count"
sales = "sum(amount)"

[alerts.low_sales]
aggregate = "per_minute"
metric = "sales"
below = 100
every = "1s"
notify = ["ops"]
summary = "a provider sells too little"
"#,
        state = dir.join("state.db").display(),
        url = db.url(),
        receiver = receiver.url("/ingest"),
    )
}

#[cfg(feature = "postgres-cdc")]
async fn exec(db: &TestDb, sql: &str) {
    let pool = db.pg_pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
}

#[cfg(feature = "postgres-cdc")]
/// Drops the slot (which would block dropping the database), then the
/// database.
async fn drop_slot_and_database(db: TestDb, slot: &str) {
    let pool = db.pg_pool().await;
    for _ in 0..50 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(slot)
        .execute(&pool)
        .await;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(&pool)
        .await;
        if dropped.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
    db.cleanup().await;
}

/// 5. An aggregate alert over a PostgreSQL CDC pipeline: of three
/// providers, the one whose sales in the latest closed minute are below
/// 100 fires, alone, labelled with its group; when the next closed minute
/// has it above 100, it resolves.
// Its source captures changes: only in builds with PostgreSQL CDC.
#[cfg(feature = "postgres-cdc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_alert_fires_for_the_group_below_its_threshold_only() {
    let (db, slot, dir, receiver) = sales_world().await;
    let config = sales_config(&db, &slot, dir.path(), &receiver);
    let mut a = Alerting::start(dir.path().to_path_buf(), &config, Receiver::start().await).await;
    let p2 = json!({ "provider_id": 2 });
    a.eventually("the slot streams changes", async || {
        let log = a.log();
        if log.contains("streaming changes") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    // A silence matches labels by their JSON value: "2" is not 2.
    let silence = a
        .call(
            "POST",
            "/api/v1/alerts/low_sales/silence",
            Some(&a.operator),
            Some(&json!({ "for": "1h", "labels": { "provider_id": "2" } })),
        )
        .await;
    assert_eq!(silence.status, 201, "{}", silence.text);
    // Minute 12:00: provider 1 sells 500, provider 2 50, provider 3 300.
    exec(
        &db,
        "INSERT INTO sales (provider_id, amount, sold_at) VALUES \
         (1, 200.00, '2025-05-14T12:00:10Z'), (1, 300.00, '2025-05-14T12:00:20Z'), \
         (2, 20.00, '2025-05-14T12:00:30Z'), (2, 30.00, '2025-05-14T12:00:40Z'), \
         (3, 300.00, '2025-05-14T12:00:50Z')",
    )
    .await;
    // A sale of provider 1 at 12:02 moves the watermark past 12:01: the
    // 12:00 minute closes.
    exec(
        &db,
        "INSERT INTO sales (provider_id, amount, sold_at) VALUES (1, 120.00, '2025-05-14T12:02:05Z')",
    )
    .await;
    a.wait_for_hooks("the firing of provider 2", |r| {
        accepted(r, "/ops", "firing") >= 1
    })
    .await;
    let events = a.wait_for_history("low_sales", &["firing"]).await;
    for e in &events {
        assert_eq!(e["labels"], p2, "{events:?}");
        assert_eq!(e["value"].as_f64(), Some(50.0), "{events:?}");
    }
    let instances = a.instances("low_sales").await;
    assert_eq!(instances.len(), 1, "provider 2 only: {instances:?}");
    assert_eq!(instances[0]["labels"], p2, "{instances:?}");
    assert_eq!(instances[0]["state"], "firing", "{instances:?}");
    assert_eq!(instances[0]["value"].as_f64(), Some(50.0), "{instances:?}");
    assert_eq!(instances[0]["silenced"], false, "{instances:?}");
    assert_eq!(instances[0]["notified"], true, "{instances:?}");
    let body = payload(&a.hooks("/ops")[0]);
    assert_eq!(body["alert"], "low_sales", "{body}");
    assert_eq!(body["labels"], p2, "{body}");
    assert_eq!(body["value"].as_f64(), Some(50.0), "{body}");
    assert_eq!(body["threshold"]["below"].as_f64(), Some(100.0), "{body}");
    assert_eq!(body["watching"], "per_minute.sales", "{body}");
    assert_eq!(body["severity"], "warning", "the default: {body}");
    assert_eq!(body["for"], "0s", "{body}");
    assert_eq!(body["summary"], "a provider sells too little", "{body}");
    let rule = a.rule("low_sales").await;
    assert_eq!(rule["watching"], "per_minute.sales", "{rule}");
    assert_eq!(rule["below"].as_f64(), Some(100.0), "{rule}");

    // Minute 12:02: every provider sells at least 120; a sale at 12:04
    // closes it. Provider 2 resolves; nobody else ever fired.
    exec(
        &db,
        "INSERT INTO sales (provider_id, amount, sold_at) VALUES \
         (2, 150.00, '2025-05-14T12:02:10Z'), (3, 200.00, '2025-05-14T12:02:20Z')",
    )
    .await;
    exec(
        &db,
        "INSERT INTO sales (provider_id, amount, sold_at) VALUES (1, 500.00, '2025-05-14T12:04:00Z')",
    )
    .await;
    a.wait_for_hooks("the resolution of provider 2", |r| {
        accepted(r, "/ops", "resolved") >= 1
    })
    .await;
    let events = a
        .wait_for_history("low_sales", &["resolved", "firing"])
        .await;
    assert_eq!(events[0]["labels"], p2, "{events:?}");
    assert_eq!(events[0]["value"].as_f64(), Some(150.0), "{events:?}");
    tokio::time::sleep(QUIET).await;
    let ops = a.hooks("/ops");
    assert_eq!(ops.len(), 2, "{}", describe(&ops));
    let resolved = payload(&ops[1]);
    assert_eq!(resolved["status"], "resolved", "{resolved}");
    assert_eq!(resolved["labels"], p2, "{resolved}");
    assert_eq!(resolved["fired_at"], body["fired_at"], "{resolved}");
    assert_eq!(
        names(&a.history("low_sales").await),
        ["resolved", "firing"],
        "no other group was ever pending or firing"
    );
    assert_eq!(a.instances("low_sales").await, Vec::<Value>::new());
    a.stop().await;
    drop_slot_and_database(db, &slot).await;
}

/// 6. Bad input: `caudal validate` reports every alert mistake at once,
/// each at its file, line and column with its field path; the API refuses
/// a bad silence naming the field (400), an unknown alert or silence (404),
/// a viewer's silence (403) and a call without a token (401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_bad_requests_are_refused_and_located() {
    let world = World::sqlite().await;
    let config = format!(
        r#"{base}
[aggregates.per_minute]
pipeline = "{PIPELINE}"
group_by = ["service_id"]
time = "last_modified_date"
window = "1m"
[aggregates.per_minute.metrics]
opened = "count"

[notifiers.ops]
url = "http://127.0.0.1:9/hook"

[alerts.to_nobody]
check = "dead_letters"
above = 0
notify = ["ops", "pager"]

[alerts.band]
check = "failing_runs"
above = 1
below = 5

[alerts.no_threshold]
check = "delivery_lag"

[alerts.both]
aggregate = "per_minute"
metric = "opened"
check = "dead_letters"
above = 1

[alerts.no_such_aggregate]
aggregate = "per_hour"
metric = "opened"
below = 1

[alerts.no_such_metric]
aggregate = "per_minute"
metric = "sales"
below = 1

[alerts.no_such_pipeline]
check = "dead_letters"
pipeline = "nope"
above = 0
"#,
        base = world.config_toml()
    );
    let file = world.dir.path().join("broken.toml");
    std::fs::write(&file, &config).expect("write the config");
    let out = world.caudal_with(&file, &["validate"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    let name = file.display().to_string();
    let cases: [(&str, &str, &str); 7] = [
        (
            r#""pager""#,
            "alerts.to_nobody.notify[1]",
            r#"no notifier "pager" in [notifiers]"#,
        ),
        ("5\n", "alerts.band.below", "set above or below, not both"),
        (
            "[alerts.no_threshold]",
            "alerts.no_threshold",
            "set the threshold: above = N or below = N",
        ),
        (
            r#""dead_letters"
above = 1"#,
            "alerts.both.check",
            "either an aggregate or a check, not both",
        ),
        (
            r#""per_hour""#,
            "alerts.no_such_aggregate.aggregate",
            r#"no aggregate "per_hour""#,
        ),
        (
            r#""sales""#,
            "alerts.no_such_metric.metric",
            r#"aggregate "per_minute" has no metric "sales" (it has: rows, opened)"#,
        ),
        (
            r#""nope""#,
            "alerts.no_such_pipeline.pipeline",
            r#"no pipeline "nope""#,
        ),
    ];
    for (at, path, message) in cases {
        // Where the value (or the rule's table) is: `at`, searched from the
        // rule's table header.
        let table = path.split('.').take(2).collect::<Vec<_>>().join(".");
        let start = config
            .find(&format!("[{table}]"))
            .unwrap_or_else(|| panic!("[{table}] is not in the config"));
        let offset = start + config[start..].find(at).expect("the value in its table");
        let line = config[..offset].matches('\n').count() + 1;
        let col = offset - config[..offset].rfind('\n').map_or(0, |n| n + 1) + 1;
        let prefix = format!("error: {name}:{line}:{col}: {path}: ");
        let reported = out
            .stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", out.stderr));
        assert!(reported.contains(message), "{reported}");
    }
    assert!(
        out.stderr.contains(&format!("7 errors in {name}")),
        "{}",
        out.stderr
    );

    // The API of a daemon with one rule.
    let mut a = Alerting::sqlite(&world, &dead_rule("1h", &["ops"])).await;
    let silence = format!("/api/v1/alerts/{DEAD}/silence");
    let ok_body = json!({ "for": "1h" });
    let none = a.call("GET", "/api/v1/alerts", None, None).await;
    assert_eq!(none.status, 401, "{}", none.text);
    let viewer = a
        .call("POST", &silence, Some(&a.viewer), Some(&ok_body))
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text);
    let unknown = a
        .call(
            "POST",
            "/api/v1/alerts/nope/silence",
            Some(&a.operator),
            Some(&ok_body),
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    assert_eq!(
        unknown.json["error"]["code"], "not_found",
        "{}",
        unknown.text
    );
    for (body, field) in [
        (json!({ "for": "soon" }), "for"),
        (json!({ "for": 5 }), "for"),
        (json!({ "for": "0s" }), "for"),
        (json!({ "reason": "no duration" }), "for"),
        (json!({ "for": "1h", "labels": ["pipeline"] }), "labels"),
        (json!({ "for": "1h", "reason": 7 }), "reason"),
        (json!({ "for": "1h", "until": "tomorrow" }), "until"),
    ] {
        let bad = a
            .call("POST", &silence, Some(&a.operator), Some(&body))
            .await;
        assert_eq!(bad.status, 400, "{body}: {}", bad.text);
        assert_eq!(
            bad.json["error"]["code"], "bad_request",
            "{body}: {}",
            bad.text
        );
        let message = bad.json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{body}: {message:?} does not name {field}"
        );
    }
    let not_json = a.call("POST", &silence, Some(&a.operator), None).await;
    assert_eq!(not_json.status, 400, "an empty body: {}", not_json.text);
    for (path, want) in [
        ("/api/v1/alerts/silences/424242", 404),
        ("/api/v1/alerts/silences/abc", 400),
    ] {
        let answer = a.call("DELETE", path, Some(&a.operator), None).await;
        assert_eq!(answer.status, want, "{path}: {}", answer.text);
    }
    let viewer = a
        .call("DELETE", "/api/v1/alerts/silences/1", Some(&a.viewer), None)
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text);
    for (path, want) in [
        ("/api/v1/alerts/history?alert=nope", 404),
        ("/api/v1/alerts/notifications?alert=nope", 404),
        ("/api/v1/alerts/history?limit=0", 400),
        ("/api/v1/alerts/notifications?limit=5000", 400),
    ] {
        let answer = a.call("GET", path, Some(&a.viewer), None).await;
        assert_eq!(answer.status, want, "{path}: {}", answer.text);
    }
    // None of it made a silence.
    assert_eq!(a.rule(DEAD).await["silences"], json!([]));
    a.stop().await;
}
