//! The web dashboard in a real Chromium (Debian's, through ChromeDriver),
//! served by the real binary with real pipelines: sign-in and its cookie,
//! roles (a viewer cannot act, even by forging the request), CSRF, session
//! expiry; each page with live data (counters and charts move, a dead
//! letter is replayed to the receiver, a workflow run's grid turns green
//! task by task, pause stops the pipeline); hostile names and records
//! shown as text; screenshots (`target/dashboard/*.png`) and axe-core on
//! every page, at desktop and phone widths.
//!
//! The whole file needs the default features: its every-page test captures
//! PostgreSQL changes for a live aggregate. The lean build serves the same
//! dashboard.
#![cfg(feature = "postgres-cdc")]

mod support;

use std::time::Duration;

use caudal_testkit::{TestDb, pg_database};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::browser::{Browser, screenshots_dir};
use support::{Daemon, Output, PATIENCE, PIPELINE, World, command, spawn_daemon};

/// A token name that is markup: it must show as these characters.
const HOSTILE_NAME: &str = "<img src=x onerror=\"window.__pwned=1\">viewer";
/// A record value that is a script.
const HOSTILE_VALUE: &str =
    "<script>window.__pwned=2</script><b onmouseover=\"window.__pwned=3\">x</b>";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn token(path: &std::path::Path, dir: &std::path::Path, name: &str, role: &str) -> String {
    let out = Output::of(command(
        path,
        dir,
        &["token", "create", "--name", name, "--role", role],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    out.stdout.trim().to_string()
}

/// A daemon serving the dashboard over a world, and tokens of each role.
struct Served {
    world: World,
    daemon: Option<Daemon>,
    base: String,
    viewer: String,
    operator: String,
    admin: String,
    http: reqwest::Client,
}

impl Served {
    async fn start(world: World, extra: &str, session_ttl: &str) -> Self {
        let port = free_port();
        let path = world.dir.path().join("dashboard.toml");
        std::fs::write(
            &path,
            format!(
                "{}\n{extra}\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
                 session_ttl = \"{session_ttl}\"\n",
                world.config_toml()
            ),
        )
        .expect("write the config");
        let viewer = token(&path, world.dir.path(), HOSTILE_NAME, "viewer").await;
        let operator = token(&path, world.dir.path(), "oncall", "operator").await;
        let admin = token(&path, world.dir.path(), "root", "admin").await;
        let daemon = spawn_daemon(&path, world.dir.path(), 1);
        let served = Self {
            world,
            daemon: Some(daemon),
            base: format!("http://127.0.0.1:{port}"),
            viewer,
            operator,
            admin,
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
        };
        served.wait_ready().await;
        served
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "caudal did not get ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// A bearer-token API call: (status, JSON).
    async fn api(&self, method: &str, path: &str, token: &str) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let r = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("an API answer");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Signs in over plain HTTP: the session cookie and the page's CSRF
    /// token.
    async fn session(&self, token: &str) -> (String, String) {
        let r = self
            .http
            .post(format!("{}/sign-in", self.base))
            .form(&[("token", token), ("next", "/")])
            .send()
            .await
            .expect("sign in");
        assert_eq!(r.status(), 303, "sign-in redirects");
        let cookie = r
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_string();
        let page = self
            .http
            .get(format!("{}/", self.base))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("the overview")
            .text()
            .await
            .expect("its text");
        let csrf = page
            .split("name=\"csrf-token\" content=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the CSRF token in the page")
            .to_string();
        (cookie, csrf)
    }

    /// A cookie-carried POST, as a browser (or a forger) would send it.
    async fn cookie_post(
        &self,
        path: &str,
        cookie: &str,
        csrf: Option<&str>,
        origin: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie);
        if let Some(c) = csrf {
            request = request.header("x-csrf-token", c);
        }
        if let Some(o) = origin {
            request = request.header("origin", o);
        }
        let r = request.send().await.expect("an answer");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Signal::SIGTERM).await;
        }
        self.world.cleanup().await;
    }
}

/// Whether a script in the page ran (the hostile values set this).
async fn pwned(browser: &Browser) -> Value {
    browser
        .js(
            "return window.__pwned === undefined ? null : window.__pwned;",
            vec![],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_cookie_roles_and_csrf() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    world.insert(1..=3, 0).await;
    let s = Served::start(world, "", "12h").await;
    let pause = format!("/api/v1/pipelines/{PIPELINE}/pause");

    // Pages need a session; sign-in refuses a wrong token and another site.
    let r = s
        .http
        .get(format!("{}/pipelines/{PIPELINE}", s.base))
        .send()
        .await
        .expect("a page");
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("/sign-in?next=/pipelines/{PIPELINE}").as_str()
    );
    let r = s
        .http
        .post(format!("{}/sign-in", s.base))
        .form(&[("token", "cdl_wrong")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = s
        .http
        .post(format!("{}/sign-in", s.base))
        .header("origin", "http://evil.example")
        .form(&[("token", s.operator.as_str())])
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status(), 403, "a sign-in posted from another site");
    // The cookie: HttpOnly, SameSite=Strict, Secure behind TLS.
    for (proto, secure) in [(None, false), (Some("https"), true)] {
        let mut request = s
            .http
            .post(format!("{}/sign-in", s.base))
            .form(&[("token", s.operator.as_str()), ("next", "//evil.example/")]);
        if let Some(p) = proto {
            request = request.header("x-forwarded-proto", p);
        }
        let r = request.send().await.expect("sign in");
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], "/", "next stays on this server");
        let cookie = r.headers()["set-cookie"]
            .to_str()
            .expect("text")
            .to_string();
        assert!(cookie.starts_with("caudal_session="), "{cookie}");
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(cookie.contains(attribute), "{attribute} in {cookie}");
        }
        assert_eq!(cookie.contains("Secure"), secure, "{cookie}");
    }

    // CSRF: a cookie-carried action needs the page's token and this origin.
    let (cookie, csrf) = s.session(&s.operator).await;
    let (status, body) = s.cookie_post(&pause, &cookie, None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("csrf")),
        "{body}"
    );
    let (status, _) = s.cookie_post(&pause, &cookie, Some("0123"), None).await;
    assert_eq!(status, 403, "a wrong CSRF token");
    let (status, _) = s
        .cookie_post(&pause, &cookie, Some(&csrf), Some("http://evil.example"))
        .await;
    assert_eq!(status, 403, "another site's origin");
    let (_, detail) = s
        .api("GET", &format!("/pipelines/{PIPELINE}"), &s.admin)
        .await;
    assert_eq!(detail["paused"], false, "nothing refused changed anything");
    let (status, body) = s
        .cookie_post(&pause, &cookie, Some(&csrf), Some(&s.base))
        .await;
    assert_eq!(
        (status, body["paused"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    let resume = format!("/api/v1/pipelines/{PIPELINE}/resume");
    let (status, _) = s.cookie_post(&resume, &cookie, Some(&csrf), None).await;
    assert_eq!(status, 200);
    // A viewer's session is refused by role, CSRF token or not.
    let (vcookie, vcsrf) = s.session(&s.viewer).await;
    let (status, body) = s.cookie_post(&pause, &vcookie, Some(&vcsrf), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // The audit log names the operator's two calls, not the refused ones.
    let (_, audit) = s.api("GET", "/audit", &s.admin).await;
    let calls: Vec<(String, String, u64)> = audit["audit"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|a| {
            (
                a["token"].as_str().unwrap_or_default().to_string(),
                a["path"].as_str().unwrap_or_default().to_string(),
                a["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    // (The log names paths under /api/v1.)
    let audited = |p: &str| p.trim_start_matches("/api/v1").to_string();
    assert!(
        calls.contains(&("oncall".into(), audited(&pause), 200)),
        "{calls:?}"
    );
    assert!(
        calls.contains(&("oncall".into(), audited(&resume), 200)),
        "{calls:?}"
    );
    assert!(
        calls.iter().all(|(token, _, _)| token != HOSTILE_NAME),
        "the viewer's refused call changed nothing and is not in the log: {calls:?}"
    );

    // In the browser, in a time zone far from UTC.
    let b = Browser::start(&s.base, 1280, 900, Some("Pacific/Auckland")).await;
    b.goto("/").await;
    assert!(b.path().await.starts_with("/sign-in"), "{}", b.path().await);
    b.sign_in("cdl_not_a_token").await;
    let error = b.text("#sign-in-error").await;
    assert!(error.contains("unknown or revoked"), "{error}");
    b.sign_in(&s.viewer).await;
    b.wait_js(
        "the pipeline in the overview",
        &format!("return document.querySelector('a[href=\"/pipelines/{PIPELINE}\"]');"),
    )
    .await;
    // The hostile token name is text, and nothing ran.
    assert_eq!(b.text(".who .token").await, HOSTILE_NAME);
    assert_eq!(
        b.js(
            "return document.querySelectorAll('header img').length;",
            vec![]
        )
        .await,
        0
    );
    assert_eq!(pwned(&b).await, Value::Null);
    assert_eq!(b.text(".who .role").await, "viewer");
    // The cookie is out of the page's reach.
    let cookies = b.js("return document.cookie;", vec![]).await;
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains("caudal_session"),
        "{cookies}"
    );
    // A viewer sees no actions and no audit log.
    b.goto(&format!("/pipelines/{PIPELINE}")).await;
    b.wait_js(
        "the pipeline's facts",
        "return document.querySelector('dl.facts');",
    )
    .await;
    assert_eq!(
        b.js(
            "return document.querySelectorAll('[data-action]').length;",
            vec![]
        )
        .await,
        0
    );
    assert_eq!(
        b.js(
            "return document.querySelectorAll('a[href=\"/audit\"]').length;",
            vec![]
        )
        .await,
        0
    );
    // …and forging the request from the page is refused by the server.
    let forged = b
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const csrf = document.querySelector('meta[name=csrf-token]').content;
             fetch(arguments[0], { method: 'POST', headers: { 'X-CSRF-Token': csrf } })
               .then(r => r.json().then(j => done([r.status, j.error.code])));",
            vec![json!(pause)],
        )
        .await
        .expect("the forged request");
    assert_eq!(forged, json!([403, "forbidden"]));
    let (_, detail) = s
        .api("GET", &format!("/pipelines/{PIPELINE}"), &s.admin)
        .await;
    assert_eq!(detail["paused"], false);
    // Times show in the viewer's zone: each <time> reads as its instant in
    // Pacific/Auckland, not in UTC.
    let zones = b
        .wait_js(
            "a run's time",
            "const t = document.querySelector('main time[datetime]');
             if (!t) return null;
             const d = new Date(t.getAttribute('datetime'));
             const fmt = (tz) => new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium', timeZone: tz }).format(d);
             return [Intl.DateTimeFormat().resolvedOptions().timeZone, t.textContent, fmt('Pacific/Auckland'), fmt('UTC')];",
        )
        .await;
    assert_eq!(zones[0], "Pacific/Auckland");
    assert_eq!(zones[1], zones[2], "{zones}");
    assert_ne!(zones[1], zones[3], "{zones}");
    // Sign-out ends the session.
    b.click(".who button").await;
    b.wait_js(
        "the sign-in page",
        "return location.pathname === '/sign-in';",
    )
    .await;
    b.goto("/").await;
    assert!(b.path().await.starts_with("/sign-in"));
    // An admin sees the audit log, with the operator's calls.
    b.sign_in(&s.admin).await;
    b.wait_js(
        "the overview",
        "return document.querySelector('a[href=\"/audit\"]');",
    )
    .await;
    b.goto("/audit").await;
    let text = b
        .wait_js(
            "the audit entries",
            "const t = document.querySelector('main table'); return t && t.innerText.includes('oncall') ? t.innerText : null;",
        )
        .await;
    assert!(
        text.as_str()
            .unwrap_or_default()
            .contains(&format!("POST {}", audited(&pause))),
        "{text}"
    );
    b.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    let s = Served::start(world, "", "5s").await;
    let b = Browser::start(&s.base, 1280, 900, None).await;
    b.sign_in(&s.operator).await;
    b.wait_js(
        "the overview drawn",
        "return location.pathname === '/' && performance.getEntriesByName('caudal:drawn').length > 0;",
    )
    .await;
    // The open page's next poll is refused once the session is over: it
    // goes to the sign-in page by itself.
    b.wait_js(
        "the expired session's page to go to sign-in",
        "return location.pathname === '/sign-in';",
    )
    .await;
    let (cookie, csrf) = s.session(&s.operator).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, _) = s
        .cookie_post(
            &format!("/api/v1/pipelines/{PIPELINE}/pause"),
            &cookie,
            Some(&csrf),
            None,
        )
        .await;
    assert_eq!(status, 401, "an expired session acts on nothing");
    b.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_page_moves_replays_a_dead_letter_and_pauses() {
    let mut world = World::sqlite().await;
    world.every = "1s".into();
    world.max_records = 1;
    // Three records the receiver refuses: one carries a script, one a
    // very long value.
    let long = "L".repeat(20_000);
    world
        .exec(&format!(
            "INSERT INTO service_requests (request_id, service_id, opening_date, status_id, last_modified_date) VALUES \
             (1, '{HOSTILE_VALUE}', '2025-05-14 12:00:00', 1, '2025-05-14 12:00:00'), \
             (2, '{long}', '2025-05-14 12:00:00', 1, '2025-05-14 12:00:00'), \
             (3, 'plain', '2025-05-14 12:00:00', 1, '2025-05-14 12:00:00')"
        ))
        .await;
    // The partner's refusal is markup too: it shows in the letter's answer.
    world.receiver.set_reply(
        caudal_testkit::Reply::status(422)
            .header("content-type", "text/html")
            .body("<h1>Refused</h1><script>window.__pwned=4</script>"),
    );
    let s = Served::start(world, "", "12h").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let letters = loop {
        let (_, body) = s.api("GET", "/dead-letters?state=pending", &s.viewer).await;
        if body["dead_letters"].as_array().map_or(0, Vec::len) == 3 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three dead letters: {body}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id_of = |key: &str| {
        letters["dead_letters"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["record_key"] == key))
            .and_then(|l| l["id"].as_i64())
            .unwrap_or_else(|| panic!("no dead letter of record {key}: {letters}"))
    };
    let (hostile, plain) = (id_of("1"), id_of("3"));
    s.world.receiver.set_status(200);

    let b = Browser::start(&s.base, 1280, 900, None).await;
    b.sign_in(&s.operator).await;
    b.goto(&format!("/pipelines/{PIPELINE}")).await;
    b.wait_js(
        "three pending dead letters",
        "const rows = document.querySelectorAll('button[data-key^=\"inspect:\"]'); return rows.length === 3;",
    )
    .await;
    // The script in the record shows as text; nothing runs; the long value
    // wraps instead of widening the page.
    b.click(&format!("button[data-key=\"inspect:{hostile}\"]"))
        .await;
    let shown = b
        .wait_js(
            "the record",
            "const p = document.querySelector('.inspect pre.record'); return p && p.textContent;",
        )
        .await;
    assert!(
        shown
            .as_str()
            .unwrap_or_default()
            .contains("<script>window.__pwned=2</script>"),
        "{shown}"
    );
    let answer = b.text(".inspect dd pre").await;
    assert!(
        answer.contains("<script>window.__pwned=4</script>"),
        "the partner's answer: {answer}"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('.inspect script, .inspect b, .inspect h1, main script').length;", vec![]).await,
        0
    );
    assert_eq!(pwned(&b).await, Value::Null);
    let overflow = b
        .js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await;
    assert!(
        overflow.as_i64().unwrap_or(i64::MAX) <= 0,
        "the page is wider than the window by {overflow} px"
    );

    // Replay the hostile letter from the page: it reaches the receiver.
    b.click(&format!("button[data-key=\"replay:{hostile}\"]"))
        .await;
    let arrived = s
        .world
        .receiver
        .wait_for_accepted_records(support::RECORDS, 1, PATIENCE)
        .await;
    assert!(arrived, "the replayed record did not arrive:\n{}", s.log());
    let accepted = s.world.receiver.accepted_records_at(support::RECORDS);
    assert!(
        accepted.iter().any(|r| r["service_id"] == HOSTILE_VALUE),
        "{accepted:?}"
    );
    b.wait_js(
        "the replayed letter to leave the pending list",
        &format!("return !document.querySelector('button[data-key=\"inspect:{hostile}\"]');"),
    )
    .await;
    // Discard another, after confirming.
    b.click(&format!("button[data-key=\"discard:{plain}\"]"))
        .await;
    b.accept_dialog().await;
    b.wait_js(
        "the discarded letter to leave the pending list",
        &format!("return !document.querySelector('button[data-key=\"inspect:{plain}\"]');"),
    )
    .await;
    let (_, letter) = s
        .api("GET", &format!("/dead-letters/{plain}"), &s.viewer)
        .await;
    assert_eq!(letter["state"], "discarded");

    // Counters and the chart move while rows are written.
    let insert = |id: u32| {
        format!(
            "INSERT INTO service_requests VALUES ({id}, 'SRV', '2025-05-15T00:00:00Z', 1, \
             '2025-05-15T{:02}:{:02}:{:02}Z')",
            id / 3600,
            id / 60 % 60,
            id % 60
        )
    };
    let write = async {
        for id in 100..140 {
            s.world.exec(&insert(id)).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let watch = b.wait_js(
        "records out per second above 0 in the chart",
        "const f = document.querySelector('figure.chart');
         if (!f) return null;
         const m = f.querySelector('.now').textContent.match(/out ([0-9.,]+)/);
         const line = f.querySelectorAll('polyline')[1];
         const points = line ? line.getAttribute('points').split(' ').length : 0;
         return m && parseFloat(m[1].replace(/,/g, '')) > 0 && points >= 2 ? [m[1], points] : null;",
    );
    let ((), moved) = tokio::join!(write, watch);
    let runs = b
        .wait_js(
            "runs with delivered rows",
            "const t = [...document.querySelectorAll('main table')].find(t => t.querySelector('caption').textContent === 'Latest runs');
             return t && t.innerText.includes('succeeded') ? t.innerText : null;",
        )
        .await;
    assert!(
        runs.as_str().unwrap_or_default().contains("manual")
            || runs.as_str().unwrap_or_default().contains("schedule"),
        "{runs}"
    );
    b.screenshot("pipeline-live").await;

    // Pause from the page stops the pipeline; resume starts it again.
    b.click("button[data-action=\"Pause\"]").await;
    b.wait_js(
        "the paused badge",
        "return document.querySelector('dl.facts .badge.paused');",
    )
    .await;
    b.wait_js(
        "the pause's answer",
        "return document.querySelector('#status').textContent === 'Pause: done.';",
    )
    .await;
    let (_, detail) = s
        .api("GET", &format!("/pipelines/{PIPELINE}"), &s.viewer)
        .await;
    assert_eq!(detail["paused"], true, "{detail}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paused_count = s.world.receiver.accepted_records_at(support::RECORDS).len();
    for id in 200..210 {
        s.world.exec(&insert(id)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.world.receiver.accepted_records_at(support::RECORDS).len(),
        paused_count,
        "a paused pipeline delivered"
    );
    b.click("button[data-action=\"Resume\"]").await;
    // The replayed record, 40 written while watching, 10 while paused.
    let all = s
        .world
        .receiver
        .wait_for_accepted_records(support::RECORDS, 51, PATIENCE)
        .await;
    assert!(
        all,
        "after resume, every row arrives (moved: {moved})\n{}",
        s.log()
    );
    assert_eq!(pwned(&b).await, Value::Null);
    b.close().await;
    s.stop().await;
}

const WORKFLOW: &str = "nightly";

fn workflow_config() -> String {
    format!(
        "[workflows.{WORKFLOW}.tasks.extract]\ntype = \"command\"\n\
         run = [\"sh\", \"-c\", \"echo extracted; sleep 1\"]\n\n\
         [workflows.{WORKFLOW}.tasks.transform]\ntype = \"command\"\n\
         run = [\"sh\", \"-c\", \"sleep 3\"]\ndepends_on = [\"extract\"]\n\n\
         [workflows.{WORKFLOW}.tasks.load]\ntype = \"command\"\n\
         run = [\"sh\", \"-c\", \"sleep 1\"]\ndepends_on = [\"transform\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_grid_turns_green_task_by_task() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    let s = Served::start(world, &workflow_config(), "12h").await;
    let b = Browser::start(&s.base, 1280, 900, None).await;
    b.sign_in(&s.operator).await;
    b.goto(&format!("/workflows/{WORKFLOW}")).await;
    // The DAG: three tasks, two edges.
    let drawn = b
        .wait_js(
            "the task graph",
            "const g = document.querySelector('svg.dag'); return g && [g.querySelectorAll('g.node').length, g.querySelectorAll('path.edge').length];",
        )
        .await;
    assert_eq!(drawn, json!([3, 2]));
    b.click("button[data-action=\"Start a run\"]").await;
    // Watch the grid's column of the run, task by task.
    let mut seen: Vec<Vec<String>> = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let states = b
            .js(
                "const state = (task) => {
                   const row = [...document.querySelectorAll('table.grid tbody tr')]
                     .find(r => r.querySelector('th').textContent === task);
                   const c = row ? row.querySelectorAll('button.cell') : [];
                   return c.length ? c[c.length - 1].dataset.state : null;
                 };
                 const cells = ['extract', 'transform', 'load'].map(state);
                 return cells.every(Boolean) ? cells : null;",
                vec![],
            )
            .await;
        if let Some(states) = states.as_array() {
            let states: Vec<String> = states
                .iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect();
            if seen.last() != Some(&states) {
                seen.push(states.clone());
            }
            if states.iter().all(|s| s == "succeeded") {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            let (_, runs) = s
                .api(
                    "GET",
                    &format!("/workflow-runs?workflow={WORKFLOW}"),
                    &s.viewer,
                )
                .await;
            panic!(
                "the run did not succeed; states seen: {seen:?}\nthe page says: {}\nruns: {runs}\n{}",
                b.text("main").await,
                s.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Green task by task: a task is green only after the one it waits for,
    // and the page showed a moment with extract green and load not yet.
    for states in &seen {
        for (up, down) in [(0, 1), (1, 2)] {
            assert!(
                states[down] != "succeeded" || states[up] == "succeeded",
                "a task went green before its upstream: {seen:?}"
            );
        }
    }
    assert!(
        seen.iter()
            .any(|s| s[0] == "succeeded" && s[2] != "succeeded"),
        "the grid never showed the run part-way: {seen:?}"
    );
    b.screenshot("workflow").await;
    // A cell opens the task's attempts and their log.
    b.click("button[data-key$=\":extract\"]").await;
    b.wait_js(
        "the attempts",
        "return document.querySelector('.inspect table');",
    )
    .await;
    b.click(".inspect button.small").await;
    let log = b
        .wait_js(
            "the log",
            "const p = document.querySelector('.inspect pre.log'); return p && p.textContent;",
        )
        .await;
    assert!(
        log.as_str().unwrap_or_default().contains("extracted"),
        "{log}"
    );
    b.close().await;
    s.stop().await;
}

/// Every page at desktop and phone widths, with data in each: the sqlite
/// pipeline (refusing records, so a dead-letter alert fires), a workflow
/// run, a daily Parquet dataset, and a live aggregate over
/// PostgreSQL changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_renders_with_data_is_accessible_and_light() {
    let pg: TestDb = pg_database().await;
    support::cdc::check_logical(&pg).await;
    let slot = format!("caudal_d_{}", &pg.name()[pg.name().len() - 20..]);
    {
        let pool = pg.pg_pool().await;
        sqlx::raw_sql(
            "CREATE TABLE sales (id serial PRIMARY KEY, provider_id int NOT NULL, \
             amount numeric(12,2), sold_at timestamptz NOT NULL); \
             ALTER TABLE sales REPLICA IDENTITY FULL;",
        )
        .execute(&pool)
        .await
        .expect("the sales table");
        // Sales of the last three days, for the daily dataset's partitions.
        sqlx::raw_sql(
            "INSERT INTO sales (provider_id, amount, sold_at) \
             SELECT 1 + g % 3, g, now() - (g || ' hours')::interval FROM generate_series(1, 72) g",
        )
        .execute(&pool)
        .await
        .expect("past sales");
        pool.close().await;
    }
    let mut world = World::sqlite().await;
    world.every = "1s".into();
    world.insert(1..=20, 0).await;
    world.receiver.set_status(422);
    let data = world.dir.path().join("data");
    let extra = format!(
        "{workflow}\n\
         [sources.pg_daily]\ntype = \"postgres\"\nurl = \"{url}\"\nmode = \"query\"\n\
         query = \"select provider_id, count(*) as orders, sum(amount)::float8 as revenue from sales \
         where sold_at >= {{{{ date }}}} and sold_at < {{{{ next_date }}}} group by provider_id\"\n\n\
         [sinks.daily_sales]\ntype = \"files\"\nurl = \"{data}\"\nformat = \"parquet\"\n\
         partition_by = [\"date\"]\n\n\
         [pipelines.daily_report]\nsource = \"pg_daily\"\nsink = \"daily_sales\"\n\
         schedule = {{ cron = \"0 2 * * *\", start_date = \"{start}\" }}\n\n\
         [sources.pg]\ntype = \"postgres\"\nurl = \"{url}\"\nmode = \"cdc\"\ntables = [\"sales\"]\n\
         slot = \"{slot}\"\npublication = \"{slot}\"\nheartbeat = \"1s\"\n\n\
         [sinks.sales_recv]\ntype = \"http\"\nurl = \"{recv}\"\n\
         batch = {{ max_records = 200, max_wait = \"50ms\" }}\n\n\
         [pipelines.sales]\nsource = \"pg\"\nsink = \"sales_recv\"\n\n\
         [aggregates.per_minute]\npipeline = \"sales\"\ngroup_by = [\"provider_id\"]\n\
         time = \"sold_at\"\nwindow = \"1m\"\nlateness = \"1d\"\n\
         [aggregates.per_minute.metrics]\norders = \"count\"\nsales = \"sum(amount)\"\n\n\
         [alerts.refused]\ncheck = \"dead_letters\"\npipeline = \"{PIPELINE}\"\nabove = 0\n\
         for = \"0s\"\nevery = \"1s\"\nseverity = \"critical\"\nsummary = \"the partner refuses records\"\n",
        workflow = workflow_config(),
        data = data.display(),
        url = pg.url(),
        start = (jiff::Zoned::now().date() - jiff::Span::new().days(3)),
        recv = s_recv_url(&world),
    );
    let s = Served::start(world, &extra, "12h").await;
    // Data for every page.
    let (status, run) = s
        .api("POST", &format!("/workflows/{WORKFLOW}/runs"), &s.operator)
        .await;
    assert_eq!(status, 201, "{run}");
    {
        let pool = pg.pg_pool().await;
        sqlx::raw_sql(
            "INSERT INTO sales (provider_id, amount, sold_at) \
             SELECT 1 + g % 3, g, now() - (g || ' minutes')::interval FROM generate_series(1, 30) g",
        )
        .execute(&pool)
        .await
        .expect("sales");
        pool.close().await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, alerts) = s.api("GET", "/alerts", &s.viewer).await;
        let (_, live) = s.api("GET", "/live/per_minute", &s.viewer).await;
        let (_, datasets) = s.api("GET", "/datasets", &s.viewer).await;
        let (_, runs) = s
            .api(
                "GET",
                &format!("/workflow-runs?workflow={WORKFLOW}"),
                &s.viewer,
            )
            .await;
        let firing = alerts.to_string().contains("\"firing\"");
        let windows = live["windows"].as_array().map_or(0, Vec::len) > 0;
        let files = datasets["datasets"][0]["rows"].as_i64().unwrap_or(0) > 0;
        let ran = runs["runs"][0]["state"] == "succeeded";
        if firing && windows && files && ran {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "data for every page: alert firing {firing}, windows {windows}, dataset {files}, run {ran}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let pages: [(&str, String, &str); 9] = [
        ("overview", "/".into(), "a[href=\"/pipelines/sales\"]"),
        (
            "pipeline",
            format!("/pipelines/{PIPELINE}"),
            "button[data-key^=\"inspect:\"]",
        ),
        (
            "workflow",
            format!("/workflows/{WORKFLOW}"),
            "table.grid button.cell.succeeded",
        ),
        (
            "datasets",
            "/datasets".into(),
            "a[href=\"/datasets/daily_sales\"]",
        ),
        (
            "dataset",
            "/datasets/daily_sales".into(),
            "main section:nth-of-type(2) table",
        ),
        ("live", "/live".into(), "figure.chart svg polyline"),
        ("alerts", "/alerts".into(), "main .badge.failed"),
        ("nodes", "/nodes".into(), "main .empty, main table"),
        ("audit", "/audit".into(), "main table"),
    ];
    let mut report = Vec::new();
    for (width, height, suffix) in [(1280, 900, ""), (390, 844, "-phone")] {
        let b = Browser::start(&s.base, width, height, None).await;
        b.sign_in(&s.admin).await;
        b.wait_js(
            "the overview",
            "return document.querySelector('main table');",
        )
        .await;
        for (name, path, ready) in &pages {
            b.goto(path).await;
            b.wait_js(
                &format!("{name} to show its data ({ready})"),
                &format!(
                    "return document.querySelector('{}');",
                    ready.replace('\'', "\\'")
                ),
            )
            .await;
            if *name == "dataset" {
                // The query form answers with the dataset's rows.
                b.click("form.query button[type=submit]").await;
                b.wait_js(
                    "the query's rows",
                    "return document.querySelector('main section:first-of-type table tbody tr');",
                )
                .await;
            }
            // Checked once every part has drawn.
            let (paint, drawn, bytes) = b.paint_and_weight().await;
            let errors = b
                .js(
                    "return [...document.querySelectorAll('main .error')].map(e => e.textContent);",
                    vec![],
                )
                .await;
            assert_eq!(errors, json!([]), "{name}{suffix} shows an error");
            let overflow = b
                .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;", vec![])
                .await;
            if overflow.as_i64().unwrap_or(i64::MAX) > 0 {
                let wide = b
                    .js(
                        "const w = document.documentElement.clientWidth;
                         return [...document.querySelectorAll('body *')]
                           .filter(e => e.getBoundingClientRect().right > w + 0.5 && !e.closest('.scroll table'))
                           .slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));",
                        vec![],
                    )
                    .await;
                panic!("{name}{suffix} is wider than the screen by {overflow} px: {wide}");
            }
            let violations = b.axe().await;
            assert!(
                violations.is_empty(),
                "{name}{suffix}: accessibility: {violations:#?}"
            );
            let own = b
                .js(
                    "const nav = performance.getEntriesByType('navigation')[0];
                     return nav.encodedBodySize + performance.getEntriesByType('resource')
                       .filter(r => r.initiatorType === 'script' || r.initiatorType === 'link')
                       .reduce((s, r) => s + r.encodedBodySize, 0);",
                    vec![],
                )
                .await;
            assert!(
                own.as_u64().unwrap_or(u64::MAX) < 200 * 1024,
                "{name}: page, script and style weigh {own} bytes"
            );
            b.screenshot(&format!("{name}{suffix}")).await;
            report.push(format!(
                "{name}{suffix}: first contentful paint {paint:.0} ms, data drawn {drawn:.0} ms, \
                 {bytes} bytes with data ({own} page+assets)"
            ));
        }
        // A reference in the same browser and run: the embedded Swagger UI
        // of the same server (/api/docs/), its first contentful paint.
        b.goto("/api/docs/").await;
        let swagger = b
            .wait_js(
                "Swagger UI's first paint",
                "const p = performance.getEntriesByName('first-contentful-paint')[0];
                 const nav = performance.getEntriesByType('navigation')[0];
                 const bytes = nav.encodedBodySize + performance.getEntriesByType('resource')
                   .reduce((s, r) => s + r.encodedBodySize, 0);
                 return p ? [p.startTime, bytes] : null;",
            )
            .await;
        report.push(format!(
            "reference{suffix}: Swagger UI first contentful paint {:.0} ms, {} bytes",
            swagger[0].as_f64().unwrap_or(f64::NAN),
            swagger[1]
        ));
        // Keyboard: the first Tab reaches the skip link.
        b.goto("/").await;
        b.wait_js(
            "the overview",
            "return document.querySelector('main table');",
        )
        .await;
        use fantoccini::actions::InputSource as _;
        let tab = fantoccini::actions::KeyActions::new("keyboard".into())
            .then(fantoccini::actions::KeyAction::Down { value: '\u{e004}' })
            .then(fantoccini::actions::KeyAction::Up { value: '\u{e004}' });
        b.client.perform_actions(tab).await.expect("Tab");
        let first = b
            .js("return document.activeElement.className;", vec![])
            .await;
        assert_eq!(first, "skip", "the first Tab reaches 'Skip to content'");
        b.close().await;
    }
    // Silence the firing alert from its page.
    let b = Browser::start(&s.base, 1280, 900, None).await;
    b.sign_in(&s.operator).await;
    b.wait_js(
        "the overview",
        "return document.querySelector('main table');",
    )
    .await;
    b.goto("/alerts").await;
    b.wait_js(
        "the firing alert",
        "return document.querySelector('main .badge.failed');",
    )
    .await;
    b.click("input[data-key=\"silence-reason:refused\"]").await;
    b.client
        .find(fantoccini::Locator::Css(
            "input[data-key=\"silence-reason:refused\"]",
        ))
        .await
        .expect("the reason field")
        .send_keys("partner maintenance")
        .await
        .expect("type a reason");
    b.click("button[data-key=\"silence:refused\"]").await;
    let silenced = b
        .wait_js(
            "the silence in the rules table",
            "const t = document.querySelector('main table'); return t && t.innerText.includes('partner maintenance') && t.innerText.includes('silenced') ? t.innerText : null;",
        )
        .await;
    let (_, alerts) = s.api("GET", "/alerts", &s.viewer).await;
    let silences = &alerts["alerts"][0]["silences"];
    assert_eq!(
        silences[0]["reason"], "partner maintenance",
        "{alerts}\n{silenced}"
    );
    assert_eq!(silences[0]["created_by"], "oncall");
    b.close().await;
    std::fs::write(screenshots_dir().join("pages.txt"), report.join("\n")).expect("the report");
    println!("{}", report.join("\n"));
    s.stop().await;
    support::cdc::drop_slot(pg.url(), &slot).await;
    pg.cleanup().await;
}

fn s_recv_url(world: &World) -> String {
    world.receiver.url("/sales")
}
