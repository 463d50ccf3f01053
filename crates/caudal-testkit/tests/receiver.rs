//! The receiver against a real HTTP client, as the sinks will use it.

use std::io::Write;
use std::time::{Duration, Instant};

use caudal_testkit::{Behaviour, Receiver, Reply};
use flate2::{Compression, write::GzEncoder};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

async fn post(client: &reqwest::Client, url: &str, body: &'static str) -> reqwest::Result<u16> {
    let response = client.post(url).body(body).send().await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn records_a_gzip_json_body_decoded() {
    let receiver = Receiver::start().await;
    let body = json!({"requests": [{"id": 1}, {"id": 2}]}).to_string();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(body.as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");

    let response = client()
        .post(receiver.url("/ingest?batch=7"))
        .header("Content-Encoding", "gzip")
        .header("Content-Type", "application/json")
        .header("X-Caudal-Test", "yes")
        .body(gz.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/ingest");
    assert_eq!(request.query.as_deref(), Some("batch=7"));
    assert_eq!(request.header("x-caudal-test"), Some("yes"));
    assert_eq!(request.raw_body, gz);
    assert_eq!(request.text(), body);
    assert_eq!(
        request.json,
        Some(json!({"requests": [{"id": 1}, {"id": 2}]}))
    );
    assert_eq!(request.status, Some(200));
    assert_eq!(
        receiver.records_at("/requests"),
        vec![json!({"id": 1}), json!({"id": 2})]
    );
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_accepts_them_on_the_same_port() {
    let receiver = Receiver::start().await;
    let client = client();
    let url = receiver.url("/in");
    assert_eq!(post(&client, &url, "[1]").await.expect("up"), 200);

    receiver.stop().await;
    assert!(!receiver.is_running().await);
    let err = post(&client, &url, "[2]")
        .await
        .expect_err("receiver is down");
    assert!(err.is_connect(), "expected connection refused, got {err:?}");
    // A raw connect sees the port closed too, not just the pooled client.
    let refused = tokio::net::TcpStream::connect(receiver.addr()).await;
    assert_eq!(
        refused.expect_err("port closed").kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    receiver.restart().await;
    assert_eq!(receiver.url("/in"), url);
    assert_eq!(post(&client, &url, "[3]").await.expect("up again"), 200);
    assert_eq!(receiver.records_at(""), vec![json!(1), json!(3)]);
}

#[tokio::test]
async fn stop_drops_requests_in_flight() {
    let receiver = Receiver::start().await;
    receiver.set_reply(Reply::status(200).delay(Duration::from_secs(60)));
    let url = receiver.url("/slow");
    let in_flight = tokio::spawn(async move { post(&client(), &url, "[1]").await });
    assert!(receiver.wait_for_requests(1, WAIT).await);

    let started = Instant::now();
    receiver.stop().await;
    let outcome = in_flight.await.expect("join");
    assert!(
        outcome.is_err(),
        "a stopped receiver must not answer: {outcome:?}"
    );
    assert!(started.elapsed() < WAIT);
}

#[tokio::test]
async fn status_fail_next_and_queued_replies() {
    let receiver = Receiver::start().await;
    let client = client();
    let url = receiver.url("/in");

    receiver.fail_next(2, 503);
    receiver.queue_replies([Reply::status(400)]);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(&client, &url, "[]").await.expect("send"));
    }
    assert_eq!(statuses, [503, 503, 400, 200]);

    receiver.set_status(500);
    assert_eq!(post(&client, &url, "[]").await.expect("send"), 500);
    receiver.set_status(204);
    assert_eq!(post(&client, &url, "[]").await.expect("send"), 204);

    let recorded: Vec<_> = receiver.requests().iter().map(|r| r.status).collect();
    assert_eq!(recorded, [503, 503, 400, 200, 500, 204].map(Some).to_vec());
}

#[tokio::test]
async fn retry_after_header_and_delay() {
    let receiver = Receiver::start().await;
    receiver.queue_replies([
        Reply::retry_after(429, 7),
        Reply::status(200).delay(Duration::from_millis(300)),
    ]);
    let client = client();

    let limited = client
        .post(receiver.url("/in"))
        .body("[]")
        .send()
        .await
        .expect("send");
    assert_eq!(limited.status().as_u16(), 429);
    assert_eq!(
        limited
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii")),
        Some("7")
    );

    let started = Instant::now();
    assert_eq!(
        post(&client, &receiver.url("/in"), "[]")
            .await
            .expect("send"),
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Arrival is stamped before the delay.
    let requests = receiver.requests();
    assert!(requests[1].received_at < started + Duration::from_millis(250));
}

#[tokio::test]
async fn reset_closes_the_connection_without_an_answer() {
    let receiver = Receiver::start().await;
    receiver.queue_replies([Reply::reset()]);
    let client = client();
    let err = post(&client, &receiver.url("/in"), "[1]")
        .await
        .expect_err("reset");
    assert!(!err.is_timeout(), "{err:?}");
    assert_eq!(
        post(&client, &receiver.url("/in"), "[2]")
            .await
            .expect("send"),
        200
    );

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].status, None);
    assert_eq!(receiver.accepted_records_at(""), vec![json!(2)]);
}

#[tokio::test]
async fn custom_behaviour_sees_the_decoded_request() {
    let receiver = Receiver::start().await;
    receiver.set_behaviour(Behaviour::custom(|request| {
        if request.body.len() > 8 {
            Reply::status(413)
        } else {
            Reply::status(200).json(&json!({"accepted": request.records_at("").len()}))
        }
    }));
    let client = client();
    assert_eq!(
        post(&client, &receiver.url("/"), "[1,2,3,4,5]")
            .await
            .expect("send"),
        413
    );
    let small = client
        .post(receiver.url("/"))
        .body("[1,2]")
        .send()
        .await
        .expect("send");
    assert_eq!(small.status().as_u16(), 200);
    assert_eq!(
        small
            .headers()
            .get("content-type")
            .map(|v| v.to_str().expect("ascii")),
        Some("application/json")
    );
    assert_eq!(small.text().await.expect("body"), r#"{"accepted":2}"#);
    assert_eq!(
        receiver.records_at(""),
        [1, 2, 3, 4, 5, 1, 2].map(|n| json!(n)).to_vec()
    );
    assert_eq!(receiver.accepted_records_at(""), vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn wait_for_wakes_on_arrival_and_times_out_otherwise() {
    let receiver = Receiver::start().await;
    assert!(
        !receiver
            .wait_for(|reqs| !reqs.is_empty(), Duration::from_millis(100))
            .await
    );

    let url = receiver.url("/late");
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&client(), &url, r#"{"requests":[{"a":1},{"a":2}]}"#).await
    });
    let started = Instant::now();
    assert!(
        receiver
            .wait_for_accepted_records("/requests", 2, WAIT)
            .await
    );
    assert!(started.elapsed() < WAIT);
    assert_eq!(sender.await.expect("join").expect("send"), 200);
}
