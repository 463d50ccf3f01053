//! A real Chromium driven through ChromeDriver (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/test`), for the dashboard
//! tests: sign in, wait for what a page shows, click, take screenshots,
//! run axe-core inside the page.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::PATIENCE;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser (its own ChromeDriver, its own profile and cookies).
pub struct Browser {
    pub client: Client,
    driver: std::process::Child,
    /// `http://127.0.0.1:PORT` of the caudal under test.
    pub base: String,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium `width` × `height`
    /// pixels wide, in time zone `tz` when given.
    pub async fn start(base: &str, width: u32, height: u32, tz: Option<&str>) -> Self {
        for path in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: the dashboard tests need Debian's chromium and \
                 chromium-driver (scripts/test installs them: apt-get install chromium chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = std::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(tz) = tz {
            cmd.env("TZ", tz);
        }
        let driver = cmd.spawn().expect("start chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--lang=en-US", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let client = loop {
            let mut builder = ClientBuilder::rustls().expect("a TLS connector");
            match builder.capabilities(caps.clone()).connect(&url).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver on {url}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self {
            client,
            driver,
            base: base.to_string(),
        }
    }

    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// The path of the page shown now (with its query).
    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("the current URL");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Signs in on the sign-in page with `token`.
    pub async fn sign_in(&self, token: &str) {
        self.goto("/sign-in").await;
        let field = self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Id("token"))
            .await
            .expect("the token field");
        field.send_keys(token).await.expect("type the token");
        self.client
            .find(Locator::Css("form.card button[type=submit]"))
            .await
            .expect("the sign-in button")
            .click()
            .await
            .expect("sign in");
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns something other than null, false or
    /// undefined, and returns it; fails with `what` and the page's text.
    pub async fn wait_js(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self
                .client
                .execute(script, vec![])
                .await
                .unwrap_or(Value::Null);
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.text("body").await;
                panic!("waited {PATIENCE:?} for {what}; the page shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// The visible text of the first element matching `css` ("" if none).
    pub async fn text(&self, css: &str) -> String {
        self.client
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                vec![json!(css)],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Clicks the element matching `css` with a real (WebDriver) click,
    /// finding it again when a live region redrew it in between.
    pub async fn click(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let clicked = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.click().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match clicked {
                Ok(()) => return,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "cannot click {css}: {e}\n{}",
                        self.text("body").await
                    );
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
        }
    }

    /// Accepts the confirmation dialog an action opened.
    pub async fn accept_dialog(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while let Err(e) = self.client.accept_alert().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dialog to accept: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a screenshot of the page as `target/dashboard/NAME.png` (the
    /// test's artefact; docs/dashboard.md shows copies) and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let _ = self.client.execute("window.scrollTo(0, 0);", vec![]).await;
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Runs axe-core in the page; returns its serious and critical
    /// violations, each as `id: help (targets)`.
    pub async fn axe(&self) -> Vec<String> {
        let source = std::fs::read_to_string(axe_path()).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the accessibility check needs axe-core \
                 (crates/caudal/tests/browser/install, which scripts/test runs)",
                axe_path().display()
            )
        });
        self.js(&source, vec![]).await;
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                   .then(r => done(r.violations
                     .filter(v => v.impact === 'serious' || v.impact === 'critical')
                     .map(v => v.id + ': ' + v.help + ' (' + v.nodes.map(n => n.target.join(' ')).join(', ') + ')')))
                   .catch(e => done(['axe failed: ' + e]));",
                vec![],
            )
            .await
            .expect("axe.run");
        result
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the browser measured for the page: first contentful paint
    /// and the moment every part first showed its data (ms from the
    /// navigation's start), and the bytes it transferred (the page, its
    /// script and style, and its API answers so far).
    pub async fn paint_and_weight(&self) -> (f64, f64, u64) {
        let v = self
            .wait_js(
                "the first paint",
                "const p = performance.getEntriesByName('first-contentful-paint')[0];
                 const d = performance.getEntriesByName('caudal:drawn')[0];
                 if (!p || !d) return null;
                 const nav = performance.getEntriesByType('navigation')[0];
                 const res = performance.getEntriesByType('resource');
                 const bytes = (nav ? nav.encodedBodySize : 0) + res.reduce((s, r) => s + r.encodedBodySize, 0);
                 return [p.startTime, d.startTime, bytes];",
            )
            .await;
        (
            v[0].as_f64().unwrap_or(f64::NAN),
            v[1].as_f64().unwrap_or(f64::NAN),
            v[2].as_u64().unwrap_or(u64::MAX),
        )
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where the screenshots go: `target/dashboard`.
pub fn screenshots_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|p| p.join("dashboard"))
        .unwrap_or_else(|| PathBuf::from("target/dashboard"))
}

fn axe_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules/axe-core/axe.min.js")
}
