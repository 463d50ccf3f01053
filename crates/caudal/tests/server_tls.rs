//! `[server] tls`: `caudal run` serves health, metrics, the API and the
//! dashboard over HTTPS with the configured certificate; the dashboard's
//! cookie is then `Secure`; plain HTTP and clients that do not trust the
//! certificate get nothing; a certificate it cannot use stops it at start,
//! naming the setting.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{Output, PATIENCE, World, command, spawn_daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speaks_https_with_its_certificate() {
    let mut world = World::sqlite().await;
    world.every = "1h".into();
    let certs = world.dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("a directory");
    support::tls::certificates(&certs);
    let port = free_port();
    let path = world.dir.path().join("tls.toml");
    let file = |f: &str| certs.join(f).display().to_string();
    std::fs::write(
        &path,
        format!(
            "{}\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            world.config_toml(),
            file("server.pem"),
            file("server.key")
        ),
    )
    .expect("write the config");
    let out = Output::of(command(
        &path,
        world.dir.path(),
        &["token", "create", "--name", "ops", "--role", "operator"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let token = out.stdout.trim().to_string();
    let daemon = spawn_daemon(&path, world.dir.path(), 1);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(file("ca.pem")).expect("the CA"))
        .expect("a PEM certificate");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("a client");
    let base = format!("https://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match trusting.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no HTTPS answer: {other:?}\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let pipelines = trusting
        .get(format!("{base}/api/v1/pipelines"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the API over HTTPS");
    assert_eq!(pipelines.status(), 200);
    // The dashboard's cookie is Secure when the server speaks TLS.
    let signed_in = trusting
        .post(format!("{base}/sign-in"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .expect("sign in");
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"].to_str().expect("text");
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Plain HTTP, and a client that does not trust the certificate, get
    // nothing.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client");
    let answer = plain
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        answer.as_ref().map_or(true, |r| r.status() != 200),
        "plain HTTP answered: {answer:?}"
    );
    let untrusting = plain.get(format!("{base}/healthz")).send().await;
    assert!(
        untrusting.is_err(),
        "a client without the CA: {untrusting:?}"
    );
    let (status, log) = daemon.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{log}");

    // A key that does not exist: refused at start, naming the setting.
    std::fs::write(
        &path,
        format!(
            "{}\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            world.config_toml(),
            file("server.pem"),
            file("missing.key")
        ),
    )
    .expect("write the config");
    let mut cmd = command(&path, world.dir.path(), &["run"]);
    cmd.kill_on_drop(true);
    let out = Output::of(cmd).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("server.tls"), "{out}");
    world.cleanup().await;
}
