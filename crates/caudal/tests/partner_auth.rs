//! Partner authentication of the HTTP sink (`auth`, `tls`) against
//! receivers that verify it: Basic credentials from a secret file; OAuth2
//! client credentials from a local token endpoint issuing short-lived
//! tokens, with a partner answering 401 to stale and revoked tokens; HMAC
//! signatures recomputed by the receiver; and a TLS front that asks for a
//! client certificate signed by a test CA (made with openssl).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use caudal_testkit::{Behaviour, Receiver, Reply};
use hmac::{KeyInit as _, Mac as _};
use nix::sys::signal::Signal;
use support::{Output, PATIENCE, PIPELINE, RECORDS, World, command, spawn_daemon};

const PASSWORD: &str = "pa55-w0rd-7f2c";
const CLIENT_SECRET: &str = "client-secret-91ad";
const HMAC_SECRET: &str = "hmac-secret-c3d0";

fn write_secret(dir: &Path, name: &str, value: &str) -> String {
    let path = dir.join(name);
    // A trailing line break, as editors leave one: it is not part of it.
    std::fs::write(&path, format!("{value}\n")).expect("write the secret");
    path.display().to_string()
}

/// `caudal once` with `env`, asserting it succeeded and no secret shows.
async fn once(world: &World, env: &[(&str, &str)]) -> Output {
    let path = world.write_config();
    let mut cmd = command(&path, world.dir.path(), &["once", PIPELINE]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = Output::of(cmd).await;
    for secret in [PASSWORD, CLIENT_SECRET, HMAC_SECRET] {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "{out}"
        );
    }
    out
}

fn ids(world: &World) -> BTreeMap<i64, usize> {
    let mut seen = BTreeMap::new();
    for r in world.receiver.accepted_records_at(RECORDS) {
        *seen
            .entry(r["request_id"].as_i64().expect("an id"))
            .or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_from_a_secret_file() {
    let mut world = World::sqlite().await;
    world.max_records = 5;
    world.insert(1..=20, 0).await;
    let file = write_secret(world.dir.path(), "partner-password", PASSWORD);
    world.sink_extra =
        format!("auth = {{ basic = {{ user = \"caudal\", password = {{ file = \"{file}\" }} }} }}");
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("caudal:{PASSWORD}"))
    );
    let want = expected.clone();
    world.receiver.set_behaviour(Behaviour::custom(move |r| {
        let sent = r.headers.get("authorization").and_then(|v| v.to_str().ok());
        Reply::status(if sent == Some(want.as_str()) {
            200
        } else {
            401
        })
    }));
    let out = once(&world, &[]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(ids(&world), support::each(1..=20, 1));
    assert!(
        world
            .receiver
            .requests()
            .iter()
            .all(|r| r.headers["authorization"] == expected.as_str())
    );
    // validate names the field, never the value.
    let shown = Output::of(command(
        &world.write_config(),
        world.dir.path(),
        &["validate"],
    ))
    .await;
    assert!(!shown.stdout.contains(PASSWORD), "{shown}");
    world.cleanup().await;
}

/// The partner's view of the tokens the endpoint issued.
#[derive(Default)]
struct Tokens {
    /// Token → when it was issued.
    issued: BTreeMap<String, Instant>,
    revoked: BTreeSet<String>,
    /// 401s the partner answered because a token was past its life.
    stale: usize,
    /// 401s because it was revoked.
    refused_revoked: usize,
    /// Partner requests answered 200 per token.
    served: BTreeMap<String, usize>,
    /// When the test began.
    began: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_tokens_are_cached_refreshed_early_and_replaced_after_a_401() {
    const LIFE: Duration = Duration::from_secs(3);
    let tokens: Arc<Mutex<Tokens>> = Arc::default();
    // The authorization server: client credentials by HTTP Basic.
    let endpoint = Receiver::start().await;
    let issued = Arc::clone(&tokens);
    let client = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("caudal:{CLIENT_SECRET}"))
    );
    endpoint.set_behaviour(Behaviour::custom(move |r| {
        let form = String::from_utf8_lossy(&r.body).into_owned();
        let auth = r.headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(client.as_str()) || !form.contains("grant_type=client_credentials") {
            return Reply::status(401).json(&serde_json::json!({"error": "invalid_client"}));
        }
        assert!(
            form.contains("scope=ingest%3Awrite+ingest%3Aread"),
            "{form}"
        );
        assert!(form.contains("audience=partner"), "{form}");
        let mut t = issued.lock().expect("the shared state");
        let token = format!("tok-{}", t.issued.len() + 1);
        t.issued.insert(token.clone(), Instant::now());
        Reply::status(200).json(&serde_json::json!({
            "access_token": token, "token_type": "Bearer", "expires_in": LIFE.as_secs(),
        }))
    }));
    let mut world = World::sqlite().await;
    world.every = "1s".into();
    world.max_records = 5;
    world.retry = "{ max_attempts = 100, initial = \"50ms\", max = \"200ms\" }".into();
    let secret = write_secret(world.dir.path(), "client-secret", CLIENT_SECRET);
    world.sink_extra = format!(
        "auth = {{ oauth2 = {{ token_url = \"{}\", client_id = \"caudal\", \
         client_secret = {{ file = \"{secret}\" }}, scopes = [\"ingest:write\", \"ingest:read\"], \
         audience = \"partner\" }} }}",
        endpoint.url("/oauth/token")
    );
    // The partner: a known token within its life, not revoked.
    let seen = Arc::clone(&tokens);
    world.receiver.set_behaviour(Behaviour::custom(move |r| {
        let token = r
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        let mut t = seen.lock().expect("the shared state");
        let Some(at) = t.issued.get(&token).copied() else {
            return Reply::status(401);
        };
        if t.revoked.contains(&token) {
            t.refused_revoked += 1;
            return Reply::status(401);
        }
        if at.elapsed() > LIFE {
            t.stale += 1;
            return Reply::status(401);
        }
        // Once, 3 s in: the partner revokes a token right after its first
        // use, so its next use (before caudal renews it) is refused.
        if t.revoked.is_empty()
            && !t.served.contains_key(&token)
            && t.began
                .is_some_and(|b| b.elapsed() > Duration::from_secs(3))
        {
            t.revoked.insert(token.clone());
        }
        *t.served.entry(token).or_default() += 1;
        Reply::status(200)
    }));
    let path = world.write_config();
    tokens.lock().expect("the shared state").began = Some(Instant::now());
    let daemon = spawn_daemon(&path, world.dir.path(), 1);
    // Rows keep coming for about 7 s: several token lifetimes.
    let mut next = 1;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        world.insert(next..next + 5, 0).await;
        next += 5;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all = world
        .receiver
        .wait_for_accepted_records(RECORDS, (next - 1) as usize, PATIENCE)
        .await;
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(all, "{:?}\n{log}", ids(&world));
    assert_eq!(ids(&world), support::each(1..next, 1), "each record once");
    {
        let t = tokens.lock().expect("the shared state");
        let requests = t.served.values().sum::<usize>();
        assert!(
            t.issued.len() >= 3,
            "refreshed as tokens expired: {:?}",
            t.issued.keys()
        );
        assert!(
            t.issued.len() * 2 < requests,
            "cached: {} tokens for {requests} requests",
            t.issued.len()
        );
        assert_eq!(t.stale, 0, "refreshed before expiry, never sent stale");
        assert_eq!(
            t.refused_revoked, 1,
            "a revoked token is replaced after one 401"
        );
        // The 401's batch was sent again at once with a new token, same key.
        let requests = world.receiver.requests();
        let refused = requests
            .iter()
            .position(|r| {
                let token = r.headers["authorization"].to_str().unwrap_or_default();
                r.status == Some(401) && t.revoked.iter().any(|x| token.ends_with(x.as_str()))
            })
            .expect("the revoked token's refused request");
        let again = &requests[refused + 1..]
            .iter()
            .find(|r| r.headers["idempotency-key"] == requests[refused].headers["idempotency-key"])
            .expect("the refused batch sent again");
        assert_ne!(
            again.headers["authorization"],
            requests[refused].headers["authorization"]
        );
        assert!(
            !log.contains(CLIENT_SECRET) && !log.contains("tok-"),
            "{log}"
        );
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_signatures_are_recomputed_by_the_receiver() {
    let mut world = World::sqlite().await;
    world.max_records = 4;
    world.insert(1..=20, 0).await;
    world.sink_extra = "gzip = true\nauth = { hmac = { secret = \"${CAUDAL_TEST_HMAC}\", \
                        header = \"X-Partner-Signature\" } }"
        .into();
    // The body is verified as sent: still gzip-compressed.
    world.receiver.set_behaviour(Behaviour::custom(|r| {
        Reply::status(if signed(r) { 200 } else { 401 })
    }));
    let out = once(&world, &[("CAUDAL_TEST_HMAC", HMAC_SECRET)]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(ids(&world), support::each(1..=20, 1));
    assert_eq!(
        world.receiver.request_count(),
        5,
        "every request signed and accepted"
    );
    // A wrong secret is refused by the partner: with auth configured a 401
    // is ours to fix, so the batch stays buffered (no dead letter), and
    // the right secret delivers it.
    world.insert(21..=24, 1).await;
    let out = once(&world, &[("CAUDAL_TEST_HMAC", "not-the-secret")]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("401"), "{out}");
    let mut list = command(
        &world.write_config(),
        world.dir.path(),
        &["dlq", "list", "--json"],
    );
    list.env("CAUDAL_TEST_HMAC", "any");
    let letters = Output::of(list).await;
    assert!(!letters.stdout.contains("401"), "no dead letter: {letters}");
    let out = once(&world, &[("CAUDAL_TEST_HMAC", HMAC_SECRET)]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        ids(&world),
        support::each(1..=24, 1),
        "nothing lost, nothing twice"
    );
    world.cleanup().await;
}

/// A TLS front for `backend` on loopback that requires a client
/// certificate signed by the test CA; returns its port and what each
/// handshake came to.
async fn tls_front(dir: &Path, backend: std::net::SocketAddr) -> (u16, Arc<Mutex<Vec<String>>>) {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).expect("the CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("trust the CA");
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .expect("a client verifier");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("the server certificate")
        .collect::<Result<_, _>>()
        .expect("PEM");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("the server key");
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("a TLS server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handshakes: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Err(e) => log
                        .lock()
                        .expect("the shared state")
                        .push(format!("refused: {e}")),
                    Ok(mut tls) => {
                        log.lock()
                            .expect("the shared state")
                            .push("client certificate verified".into());
                        if let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    }
                }
            });
        }
    });
    (port, handshakes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_and_a_private_ca() {
    let world = World::sqlite().await;
    world.insert(1..=10, 0).await;
    let certs = world.dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("a directory");
    support::tls::certificates(&certs);
    let (port, handshakes) = tls_front(&certs, world.receiver.addr()).await;
    let url = format!("https://127.0.0.1:{port}/services-data/requests");
    let path = world.write_config();
    let base = std::fs::read_to_string(&path).expect("the config");
    let receiver_url = world.receiver.url("/services-data/requests");
    let c = |f: &str| certs.join(f).display().to_string();
    // Without a client certificate the partner refuses the connection:
    // the run fails and nothing is lost.
    let plain_tls = base.replace(
        &format!("url = \"{receiver_url}\""),
        &format!("url = \"{url}\"\ntls = {{ ca = \"{}\" }}", c("ca.pem")),
    );
    std::fs::write(&path, &plain_tls).expect("config");
    let refused = Output::of(command(&path, world.dir.path(), &["once", PIPELINE])).await;
    assert_ne!(refused.code, Some(0), "{refused}");
    assert_eq!(world.receiver.request_count(), 0);
    assert!(
        {
            let h = handshakes.lock().expect("the shared state");
            !h.is_empty() && h.iter().all(|h| h.starts_with("refused"))
        },
        "{:?}",
        handshakes.lock().expect("the shared state")
    );
    // With it, every record arrives (the buffered batch first).
    let mutual = base.replace(
        &format!("url = \"{receiver_url}\""),
        &format!(
            "url = \"{url}\"\ntls = {{ ca = \"{}\", cert = \"{}\", key = {{ file = \"{}\" }} }}",
            c("ca.pem"),
            c("client.pem"),
            c("client.key")
        ),
    );
    std::fs::write(&path, &mutual).expect("config");
    let out = Output::of(command(&path, world.dir.path(), &["once", PIPELINE])).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(ids(&world), support::each(1..=10, 1));
    assert!(
        handshakes
            .lock()
            .expect("the shared state")
            .iter()
            .any(|h| h == "client certificate verified")
    );
    // A CA the server's certificate is not from: refused by caudal.
    let other = world.dir.path().join("other");
    std::fs::create_dir_all(&other).expect("a directory");
    support::tls::certificates(&other);
    std::fs::write(
        &path,
        mutual.replace(&c("ca.pem"), &other.join("ca.pem").display().to_string()),
    )
    .expect("config");
    world.insert(11..=12, 1).await;
    let untrusted = Output::of(command(&path, world.dir.path(), &["once", PIPELINE])).await;
    assert_ne!(untrusted.code, Some(0), "{untrusted}");
    assert_eq!(
        ids(&world).len(),
        10,
        "nothing sent to a server caudal cannot trust"
    );
    world.cleanup().await;
}

/// Whether `r` carries a valid, fresh `X-Partner-Signature` of
/// `HMAC_SECRET`, recomputed as docs/delivery.md tells a receiver to.
fn signed(r: &caudal_testkit::ReceivedRequest) -> bool {
    let header = r
        .headers
        .get("x-partner-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let fields: BTreeMap<&str, &str> = header
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let (Some(t), Some(v1)) = (fields.get("t"), fields.get("v1")) else {
        return false;
    };
    let mut target = r.path.clone();
    if let Some(q) = &r.query {
        target = format!("{target}?{q}");
    }
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).expect("any key");
    mac.update(format!("{t}\n{}\n{target}\n", r.method).as_bytes());
    mac.update(&r.raw_body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let age = jiff::Timestamp::now().as_second() - t.parse::<i64>().unwrap_or(0);
    expected == *v1 && age.abs() < 300
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_notifier_signs_its_notifications() {
    let mut world = World::sqlite().await;
    world.every = "1s".into();
    world.retry = "{ max_attempts = 1 }".into();
    // The partner refuses every record: dead letters, so the alert fires.
    world.receiver.set_behaviour(Reply::status(422));
    world.insert(1..=3, 0).await;
    let webhook = Receiver::start().await;
    webhook.set_behaviour(Behaviour::custom(|r| {
        Reply::status(if signed(r) { 200 } else { 401 })
    }));
    let secret = write_secret(world.dir.path(), "hook-secret", HMAC_SECRET);
    let path = world.write_config();
    let base = std::fs::read_to_string(&path).expect("the config");
    std::fs::write(
        &path,
        format!(
            "{base}
[notifiers.ops]
url = \"{hook}\"
auth = {{ hmac = {{ secret = {{ file = \"{secret}\" }}, header = \"X-Partner-Signature\" }} }}

[alerts.refused]
check = \"dead_letters\"
pipeline = \"{PIPELINE}\"
above = 0
every = \"1s\"
notify = [\"ops\"]
",
            hook = webhook.url("/ops"),
        ),
    )
    .expect("write the config");
    let daemon = spawn_daemon(&path, world.dir.path(), 1);
    let deadline = Instant::now() + PATIENCE;
    while !webhook.requests().iter().any(|r| r.status == Some(200)) {
        assert!(
            Instant::now() < deadline,
            "no signed notification was taken: {:?}\n{}",
            webhook
                .requests()
                .iter()
                .map(|r| r.status)
                .collect::<Vec<_>>(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, log) = daemon.stop(Signal::SIGTERM).await;
    let requests = webhook.requests();
    assert!(requests.iter().all(signed), "every notification is signed");
    let first = &requests[0];
    assert!(first.headers.contains_key("idempotency-key"), "{first:?}");
    let body = first.json.clone().unwrap_or_default();
    assert_eq!(body["alert"], "refused", "{body}");
    assert_eq!(body["status"], "firing", "{body}");
    assert!(!log.contains(HMAC_SECRET), "{log}");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_http_tasks_use_oauth2_and_a_client_certificate() {
    let world = World::sqlite().await;
    // The authorization server: client credentials in the form.
    let endpoint = Receiver::start().await;
    let issued = Arc::new(Mutex::new(0usize));
    let count = Arc::clone(&issued);
    endpoint.set_behaviour(Behaviour::custom(move |r| {
        let form = String::from_utf8_lossy(&r.body).into_owned();
        if !form.contains(&format!("client_secret={CLIENT_SECRET}")) {
            return Reply::status(401).json(&serde_json::json!({"error": "invalid_client"}));
        }
        let mut n = count.lock().expect("the count");
        *n += 1;
        Reply::status(200).json(&serde_json::json!({
            "access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": 300,
        }))
    }));
    // The partner's API: a token the endpoint issued.
    world.receiver.set_behaviour(Behaviour::custom(|r| {
        let token = r
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if r.path.starts_with("/items/") && token != "Bearer tok-1" {
            return Reply::status(401);
        }
        Reply::status(200).json(&serde_json::json!({"ok": true}))
    }));
    let certs = world.dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("a directory");
    support::tls::certificates(&certs);
    let (port, handshakes) = tls_front(&certs, world.receiver.addr()).await;
    let c = |f: &str| certs.join(f).display().to_string();
    let secret = write_secret(world.dir.path(), "client-secret", CLIENT_SECRET);
    let path = world.write_config();
    let base = std::fs::read_to_string(&path).expect("the config");
    let flow = |mtls: &str| {
        format!(
            "{base}
[workflows.calls.tasks.list]
type = \"command\"
run = [\"sh\", \"-c\", \"printf '1\\\\n2\\\\n3\\\\n' > \\\"$CAUDAL_ITEMS\\\"\"]

[workflows.calls.tasks.fetch]
type = \"http\"
depends_on = [\"list\"]
for_each = \"{{{{ tasks.list.items }}}}\"
url = \"{items}/{{{{ item }}}}\"
auth = {{ oauth2 = {{ token_url = \"{token_url}\", client_id = \"caudal\", client_secret = {{ file = \"{secret}\" }}, client_auth = \"body\" }} }}

[workflows.calls.tasks.hello]
type = \"http\"
depends_on = [\"fetch\"]
url = \"https://127.0.0.1:{port}/hello\"
{mtls}
",
            items = world.receiver.url("/items"),
            token_url = endpoint.url("/oauth/token"),
        )
    };
    // Without the client certificate the TLS front refuses the last task.
    std::fs::write(
        &path,
        flow(&format!("tls = {{ ca = \"{}\" }}", c("ca.pem"))),
    )
    .expect("config");
    let refused = Output::of(command(
        &path,
        world.dir.path(),
        &["workflow", "run", "calls", "--wait"],
    ))
    .await;
    assert_ne!(refused.code, Some(0), "{refused}");
    assert!(
        handshakes
            .lock()
            .expect("the handshakes")
            .iter()
            .any(|h| h.starts_with("refused")),
        "{refused}"
    );
    assert_eq!(
        world
            .receiver
            .requests()
            .iter()
            .filter(|r| r.path == "/hello")
            .count(),
        0
    );
    // With it, every task succeeds; one token served the three items.
    std::fs::write(
        &path,
        flow(&format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = {{ file = \"{}\" }} }}",
            c("ca.pem"),
            c("client.pem"),
            c("client.key")
        )),
    )
    .expect("config");
    *issued.lock().expect("the count") = 0;
    world.receiver.clear();
    let out = Output::of(command(
        &path,
        world.dir.path(),
        &["workflow", "run", "calls", "--wait"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let requests = world.receiver.requests();
    let items: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.path.starts_with("/items/") && r.status == Some(200))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        items,
        ["/items/1", "/items/2", "/items/3"]
            .into_iter()
            .map(String::from)
            .collect(),
        "{out}"
    );
    assert_eq!(
        *issued.lock().expect("the count"),
        1,
        "one token for every item"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/hello" && r.status == Some(200))
    );
    assert!(
        handshakes
            .lock()
            .expect("the handshakes")
            .iter()
            .any(|h| h == "client certificate verified")
    );
    for secret in [CLIENT_SECRET, "tok-1"] {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "{out}"
        );
    }
    world.cleanup().await;
}
