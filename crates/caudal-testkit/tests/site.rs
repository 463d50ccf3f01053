//! The fixture site against a real HTTP client, as the crawler will see it.

use std::io::Read;
use std::time::{Duration, Instant};

use caudal_testkit::site::{GARBAGE_BYTES, HUGE_BYTES, LATIN1_TITLE, UPDATED_SUFFIX};
use caudal_testkit::{Site, SiteOptions, detail};
use flate2::read::GzDecoder;

const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("caudal-test/1.0")
        .build()
        .expect("http client")
}

async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.expect("send")
}

async fn text(url: &str) -> (u16, String) {
    let response = get(url).await;
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The text between `start` and the next `end` after it.
fn between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html.find(start).map(|i| i + start.len()).expect(start);
    let to = html[from..].find(end).expect(end);
    &html[from..from + to]
}

#[tokio::test]
async fn listing_pages_link_details_in_every_form_and_the_next_page() {
    let site = Site::start(SiteOptions::default()).await;
    let (status, html) = text(&site.url("/listings/1")).await;
    assert_eq!(status, 200);
    assert!(html.contains("<title>Listados página 1</title>"));
    assert_eq!(html.matches("<li class=\"card\">").count(), 11);
    assert_eq!(
        html.matches("class=\"detail\"").count(),
        11,
        "10 + duplicate"
    );
    assert_eq!(html.matches("href=\"../property/1\"").count(), 2, "dup");
    let absolute = format!("href=\"http://{}/property/2#fotos\"", site.host());
    assert!(html.contains(&absolute), "absolute");
    assert!(html.contains("href=\"/property/3#mapa\""), "fragment");
    assert!(html.contains("href=\"/property/4\""), "plain");
    assert!(html.contains(&format!(
        "<span class=\"price\">{}</span>",
        detail(10).price
    )));
    assert!(html.contains("<a class=\"next\" href=\"/listings/2\">Siguiente</a>"));

    let (_, second) = text(&site.url("/listings/2")).await;
    assert!(second.contains(">Casa 11</a>") && second.contains(">Casa 20</a>"));
    assert!(!second.contains(">Casa 21</a>"));

    let (_, last) = text(&site.url("/listings/5")).await;
    assert!(!last.contains("class=\"next\""), "last page");
    for missing in ["/listings/0", "/listings/6", "/listings/01", "/listings/x"] {
        assert_eq!(text(&site.url(missing)).await.0, 404, "{missing}");
    }
}

#[tokio::test]
async fn detail_pages_show_what_detail_computes() {
    let site = Site::start(SiteOptions::default()).await;
    let expected = detail(17);
    let response = get(&site.url("/property/17")).await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        header(&response, "content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header(&response, "etag"), Some("\"17-v0\""));
    assert_eq!(
        header(&response, "last-modified"),
        Some("Wed, 01 Jan 2025 00:00:00 GMT")
    );
    let html = response.text().await.expect("body");

    assert_eq!(between(&html, "<h1 class=\"title\">", "<"), expected.title);
    assert_eq!(expected.title, format!("Casa 17 en {}", expected.city));
    let price = between(&html, "<span class=\"price\" data-currency=\"MXN\">", "<");
    assert_eq!(price, expected.price);
    assert!(price.starts_with("$ ") && price.contains(','), "{price}");
    let features: Vec<&str> = between(&html, "<ul class=\"features\">", "</ul>")
        .trim_start_matches("<li>")
        .trim_end_matches("</li>")
        .split("</li><li>")
        .collect();
    assert_eq!(features, expected.features);
    let image = between(&html, "<img class=\"main\" src=\"", "\"");
    assert_eq!(image, expected.image);
    assert_eq!(image, "/img/17.jpg");
    assert_eq!(
        between(&html, "<a class=\"back\" href=\"", "\""),
        "/listings/2"
    );
    assert_eq!(site.listing_of(17), 2);
    assert!(html.contains("<div class=\"description\"><p>"));
    assert!((29_000..=30_100).contains(&html.len()), "{}", html.len());

    assert_eq!(text(&site.url("/property/0")).await.0, 404);
    assert_eq!(text(&site.url("/property/50")).await.0, 200);
    assert_eq!(text(&site.url("/property/51")).await.0, 404);
    assert_eq!(site.total_details(), 50);
}

#[tokio::test]
async fn detail_pages_answer_304_until_touched() {
    let site = Site::start(SiteOptions::default()).await;
    let url = site.url("/property/3");
    let client = client();
    let first = client.get(&url).send().await.expect("send");
    let etag = header(&first, "etag").expect("etag").to_owned();
    let modified = header(&first, "last-modified").expect("lm").to_owned();

    let cached = client
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("send");
    assert_eq!(cached.status().as_u16(), 304);
    assert!(cached.bytes().await.expect("body").is_empty());
    let by_date = client
        .get(&url)
        .header("If-Modified-Since", &modified)
        .send()
        .await
        .expect("send");
    assert_eq!(by_date.status().as_u16(), 304);

    site.touch(3);
    let changed = client
        .get(&url)
        .header("If-None-Match", &etag)
        .header("If-Modified-Since", &modified)
        .send()
        .await
        .expect("send");
    assert_eq!(changed.status().as_u16(), 200);
    assert_eq!(header(&changed, "etag"), Some("\"3-v1\""));
    assert_ne!(header(&changed, "last-modified"), Some(modified.as_str()));
    let html = changed.text().await.expect("body");
    assert!(site.detail(3).title.ends_with(UPDATED_SUFFIX));
    assert!(html.contains(&format!(
        "<h1 class=\"title\">{}</h1>",
        site.detail(3).title
    )));
    assert_eq!(site.detail(4), detail(4), "others unchanged");

    let log = site.log();
    assert_eq!(log[1].if_none_match.as_deref(), Some(etag.as_str()));
    assert_eq!(log[2].if_modified_since.as_deref(), Some(modified.as_str()));
    assert_eq!(
        log.iter().map(|a| a.status).collect::<Vec<_>>(),
        [200, 304, 304, 200]
    );
}

#[tokio::test]
async fn robots_txt_is_the_given_body_or_404() {
    let none = Site::start(SiteOptions::default()).await;
    assert_eq!(text(&none.url("/robots.txt")).await.0, 404);

    let robots = "User-agent: *\nDisallow: /private/\nCrawl-delay: 1\n";
    let site = Site::start(SiteOptions {
        robots: Some(robots.to_owned()),
        ..SiteOptions::default()
    })
    .await;
    let response = get(&site.url("/robots.txt")).await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(header(&response, "content-type").is_some_and(|t| t.starts_with("text/plain")));
    assert_eq!(response.text().await.expect("body"), robots);
    assert_eq!(site.hits("/robots.txt"), 1);
}

#[tokio::test]
async fn latin1_pages_are_iso_8859_1_bytes() {
    let site = Site::start(SiteOptions::default()).await;
    let latin1 = |bytes: &[u8]| bytes.iter().map(|&b| char::from(b)).collect::<String>();

    let response = get(&site.url("/latin1")).await;
    assert_eq!(
        header(&response, "content-type"),
        Some("text/html; charset=iso-8859-1")
    );
    let bytes = response.bytes().await.expect("body");
    assert!(std::str::from_utf8(&bytes).is_err(), "not utf-8");
    let encoded: &[u8] = b"Almer\xEDa, Pe\xF1\xF3n";
    assert!(bytes.windows(encoded.len()).any(|w| w == encoded), "bytes");
    let title = format!("<h1 class=\"title\">{LATIN1_TITLE}</h1>");
    assert!(latin1(&bytes).contains(&title));
    assert!(!latin1(&bytes).contains("<meta"));

    let response = get(&site.url("/latin1-meta")).await;
    assert_eq!(header(&response, "content-type"), Some("text/html"));
    let decoded = latin1(&response.bytes().await.expect("body"));
    assert!(decoded.contains("<meta charset=\"iso-8859-1\">"));
    assert!(decoded.contains(&title));
}

#[tokio::test]
async fn sitemaps_list_every_page() {
    let site = Site::start(SiteOptions {
        listings: 7,
        per_listing: 3,
        ..SiteOptions::default()
    })
    .await;
    let (status, index) = text(&site.url("/sitemap.xml")).await;
    assert_eq!(status, 200);
    assert!(index.contains("<sitemapindex"));
    assert_eq!(index.matches("<sitemap>").count(), 2);
    assert!(index.contains(&format!("<loc>{}</loc>", site.url("/sitemap-listings.xml"))));
    assert!(index.contains(&format!(
        "<loc>{}</loc>",
        site.url("/sitemap-details.xml.gz")
    )));

    let (_, listings) = text(&site.url("/sitemap-listings.xml")).await;
    assert!(listings.contains("<urlset"));
    assert_eq!(listings.matches("<url>").count(), 7);
    assert!(listings.contains(&format!("<loc>{}</loc>", site.url("/listings/7"))));

    let response = get(&site.url("/sitemap-details.xml.gz")).await;
    assert_eq!(header(&response, "content-type"), Some("application/gzip"));
    assert_eq!(header(&response, "content-encoding"), None);
    let gz = response.bytes().await.expect("body");
    let mut xml = String::new();
    GzDecoder::new(&gz[..])
        .read_to_string(&mut xml)
        .expect("gunzip");
    assert_eq!(xml.matches("<url>").count(), 21);
    assert!(xml.contains(&format!("<loc>{}</loc>", site.url("/property/21"))));
}

#[tokio::test]
async fn fail_next_answers_the_status_then_recovers() {
    let site = Site::start(SiteOptions {
        robots: Some("User-agent: *\n".to_owned()),
        ..SiteOptions::default()
    })
    .await;
    site.fail_next(2, 429, Some(7));
    for _ in 0..2 {
        let response = get(&site.url("/listings/1")).await;
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(header(&response, "retry-after"), Some("7"));
        // robots.txt is never failed, and does not use up a failure.
        assert_eq!(text(&site.url("/robots.txt")).await.0, 200);
    }
    assert_eq!(text(&site.url("/listings/1")).await.0, 200);

    site.fail_next(1, 503, None);
    let response = get(&site.url("/property/1")).await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(header(&response, "retry-after"), None);
    assert_eq!(site.summary().by_status.get(&429), Some(&2));
}

#[tokio::test]
async fn access_log_records_every_request_in_order() {
    let site = Site::start(SiteOptions::default()).await;
    let before = Instant::now();
    for path in ["/listings/1", "/property/2?x=1", "/nope", "/listings/1"] {
        get(&site.url(path)).await;
    }
    let plain = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    plain
        .get(site.url("/robots.txt"))
        .header("User-Agent", "otro/2")
        .send()
        .await
        .expect("send");

    let log = site.log();
    let paths: Vec<&str> = log.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/listings/1",
            "/property/2?x=1",
            "/nope",
            "/listings/1",
            "/robots.txt"
        ]
    );
    assert_eq!(
        log.iter().map(|a| a.status).collect::<Vec<_>>(),
        [200, 200, 404, 200, 404]
    );
    assert_eq!(log[0].user_agent.as_deref(), Some("caudal-test/1.0"));
    assert_eq!(log[4].user_agent.as_deref(), Some("otro/2"));
    assert!(
        log.iter()
            .all(|a| a.started >= before && a.finished >= a.started)
    );
    assert!(log.windows(2).all(|w| w[0].started <= w[1].started));
    assert_eq!(site.requests(), 5);
    assert_eq!(site.hits("/listings/1"), 2);
    assert_eq!(site.hits("/property/2"), 0, "query is part of the target");
    assert_eq!(site.hits("/private/secret"), 0);

    let summary = site.summary();
    assert_eq!(summary.requests, 5);
    assert_eq!(summary.duplicates, 1);
    assert_eq!(summary.by_status.get(&404), Some(&2));

    site.reset_log();
    assert_eq!(site.requests(), 0);
    assert!(site.log().is_empty());
}

#[tokio::test]
async fn latency_holds_requests_in_flight_together() {
    let site = Site::start(SiteOptions::default()).await;
    site.set_latency(Duration::from_millis(200));
    let client = client();
    let started = Instant::now();
    let requests = (1..=5).map(|id| client.get(site.url(&format!("/property/{id}"))).send());
    for response in spawn_all(requests).await {
        assert_eq!(response.expect("send").status().as_u16(), 200);
    }
    assert!(started.elapsed() >= Duration::from_millis(200), "latency");
    assert!(site.max_in_flight() >= 2, "{}", site.max_in_flight());
    assert!(site.max_in_flight() <= 5, "{}", site.max_in_flight());
    assert!(
        site.log()
            .iter()
            .all(|a| a.finished - a.started >= Duration::from_millis(200))
    );

    site.set_latency(Duration::ZERO);
    site.reset_log();
    get(&site.url("/listings/1")).await;
    assert_eq!(site.max_in_flight(), 1);
}

/// Runs the futures concurrently, one task each; their outputs in order.
async fn spawn_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

#[tokio::test]
async fn redirects_point_where_documented() {
    let site = Site::start(SiteOptions::default()).await;
    for (path, status, location) in [
        ("/loop/a", 302, "/loop/b"),
        ("/loop/b", 302, "/loop/a"),
        ("/redirect/3", 301, "/property/3"),
        ("/redirect-private", 302, "/private/secret"),
    ] {
        let response = get(&site.url(path)).await;
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(header(&response, "location"), Some(location), "{path}");
    }
    assert_eq!(text(&site.url("/private/secret")).await.0, 200);
    assert_eq!(text(&site.url("/private/otra")).await.0, 200);
}

#[tokio::test]
async fn special_pages_have_their_odd_bodies() {
    let site = Site::start(SiteOptions::default()).await;

    let (status, malformed) = text(&site.url("/malformed")).await;
    assert_eq!(status, 200);
    assert!(malformed.contains("<h1 class=\"title\">Mal formado</h1>"));
    assert!(malformed.contains("<span class=\"price\">$ 1</span>"));
    assert!(malformed.contains("<a class=detail href=/property/1>"));

    let mut huge = get(&site.url("/huge")).await;
    assert_eq!(huge.content_length(), Some(HUGE_BYTES as u64));
    let mut received = 0;
    while let Some(chunk) = huge.chunk().await.expect("chunk") {
        received += chunk.len();
    }
    assert_eq!(received, HUGE_BYTES);

    let pdf = get(&site.url("/file.pdf")).await;
    assert_eq!(header(&pdf, "content-type"), Some("application/pdf"));
    let pdf = pdf.bytes().await.expect("body");
    assert!(pdf.starts_with(b"%PDF-") && pdf.contains(&0) && pdf.len() > 2_000);

    let garbage = get(&site.url("/garbage")).await;
    assert!(header(&garbage, "content-type").is_some_and(|t| t.starts_with("text/html")));
    let garbage = garbage.bytes().await.expect("body");
    assert_eq!(garbage.len(), GARBAGE_BYTES);
    assert!(std::str::from_utf8(&garbage).is_err());
    assert_eq!(
        get(&site.url("/garbage"))
            .await
            .bytes()
            .await
            .expect("body"),
        garbage
    );

    let image = get(&site.url("/img/4.jpg")).await;
    assert_eq!(image.status().as_u16(), 200);
    assert_eq!(header(&image, "content-type"), Some("image/jpeg"));

    assert_eq!(text(&site.url("/nowhere")).await.0, 404);
}

#[tokio::test]
async fn slow_page_outlasts_a_short_timeout() {
    let site = Site::start(SiteOptions::default()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let err = client
        .get(site.url("/slow"))
        .send()
        .await
        .expect_err("timeout");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(site.hits("/slow"), 1);
}

#[cfg(unix)]
#[test]
fn binary_prints_its_url_and_reports_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let robots = dir.path().join("robots.txt");
    std::fs::write(&robots, "User-agent: *\nDisallow: /private/\n").expect("robots");
    let log = dir.path().join("access.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_caudal-site"))
        .args([
            "--listings",
            "2",
            "--per-listing",
            "3",
            "--detail-bytes",
            "2000",
        ])
        .arg("--robots")
        .arg(&robots)
        .arg("--log")
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caudal-site");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read url");
    let origin = line.trim_end().to_owned();
    assert!(origin.starts_with("http://127.0.0.1:"), "{origin}");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        assert_eq!(text(&format!("{origin}/robots.txt")).await.0, 200);
        assert_eq!(text(&format!("{origin}/listings/1")).await.0, 200);
        assert_eq!(text(&format!("{origin}/listings/1")).await.0, 200);
        assert_eq!(text(&format!("{origin}/property/7")).await.0, 404);
    });

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "{:?}", output.status);
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    let summary: serde_json::Value = serde_json::from_str(stderr.trim()).expect("json");
    assert_eq!(
        summary,
        serde_json::json!({
            "requests": 4,
            "max_in_flight": 1,
            "by_status": {"200": 3, "404": 1},
            "duplicates": 1,
        })
    );

    let lines = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["path"], "/robots.txt");
    assert_eq!(lines[0]["ua"], "caudal-test/1.0");
    assert_eq!(lines[3]["status"], 404);
    assert!(lines[1]["started_ms"].as_f64() <= lines[1]["finished_ms"].as_f64());
}
