//! `caudal doctor` against real servers: the machine's PostgreSQL
//! (127.0.0.1:5432), MariaDB (127.0.0.1:3306), RabbitMQ (5672, guest/guest)
//! and NATS with JetStream (4222), and HTTP receivers on loopback (one of
//! them an OAuth2 token endpoint). Each test has its own database, roles,
//! exchange and stream names.
//!
//! What is asserted is what an operator reads: which subject and check
//! failed, the fix printed under it, the exit code (0 nothing failed, 1 a
//! failure or, with `--strict`, a warning, 2 an invalid configuration),
//! the `--json` shape, and that nothing was sent or published.
//!
//! The CDC tests need the cargo features `postgres-cdc` and `mysql`; the
//! broker tests (and the runnable config's, whose sinks include brokers)
//! need `rabbitmq` and `nats`, the Kafka ones `kafka` (all in the default
//! build).
//! They do not need the servers set up for CDC: what doctor reports of
//! wal_level and the binary log is compared with what the server says.

#[path = "support/brokers.rs"]
mod brokers;
mod support;

use std::time::{Duration, Instant};

use caudal_testkit::{Behaviour, Receiver, Reply};
use serde_json::Value;
use support::{Output, RECORDS, World};

/// `caudal doctor <args>` with `config` (TOML text) written beside the
/// world's state.
async fn doctor(world: &World, config: &str, args: &[&str]) -> Output {
    let path = world.dir.path().join("doctor.toml");
    std::fs::write(&path, config).expect("write the config");
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    world.caudal_with(&path, &all).await
}

/// `caudal doctor --json`, parsed.
async fn doctor_json(world: &World, config: &str) -> (Option<i32>, Value) {
    let out = doctor(world, config, &["--json"]).await;
    let report: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("doctor --json prints one JSON document ({e}): {out}"));
    (out.code, report)
}

/// The checks of `subject` in a JSON report.
fn checks<'a>(report: &'a Value, subject: &str) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .expect("checks is an array")
        .iter()
        .filter(|c| c["subject"] == subject)
        .collect()
}

/// The one check `check` of `subject`.
fn check<'a>(report: &'a Value, subject: &str, check: &str) -> &'a Value {
    checks(report, subject)
        .into_iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no check {check:?} of {subject:?} in {report:#}"))
}

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.local_addr().expect("its address").port()
}

// Its sinks include RabbitMQ and NATS, which a lean build skips.
#[cfg(all(feature = "rabbitmq", feature = "nats"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_can_run_passes_and_nothing_is_sent() {
    let mut created = brokers::Created::default();
    let world = World::postgres().await;
    // An exchange and a stream that exist.
    let exchange = created.exchange("doctor_x");
    let connection = brokers::rabbitmq().await;
    brokers::channel(&connection)
        .await
        .exchange_declare(
            lapin::types::ShortString::from(exchange.as_str()),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the exchange");
    let stream = created.stream("doctor_s");
    let js = async_nats::jetstream::new(brokers::nats().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await
    .expect("create the stream");
    world.insert(1..=5, 0).await;
    let config = format!(
        "{}
[sinks.rmq]
type = \"rabbitmq\"
url = \"{rabbit}\"
exchange = \"{exchange}\"
routing_key = \"doctor\"

[sinks.js]
type = \"nats\"
url = \"nats://{nats}\"
subject = \"{stream}.events\"

[pipelines.to_rmq]
source = \"servicedesk\"
sink = \"rmq\"
schedule = {{ every = \"1h\" }}

[pipelines.to_js]
source = \"servicedesk\"
sink = \"js\"
schedule = {{ every = \"1h\" }}
",
        world.config_toml(),
        rabbit = brokers::rabbitmq_url(brokers::RABBITMQ_ADDR),
        nats = brokers::NATS_ADDR,
    );

    // A store an earlier command made: doctor opens it and checks a write.
    let path = world.dir.path().join("doctor.toml");
    std::fs::write(&path, &config).expect("write the config");
    let status = world.caudal_with(&path, &["status"]).await;
    assert_eq!(status.code, Some(0), "{status}");
    assert!(world.state_db().exists(), "caudal status made the store");
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("0 failures"), "{out}");
    for subject in [
        "store",
        "buffer_dir",
        "source servicedesk",
        "sink partner",
        "sink rmq",
        "sink js",
    ] {
        assert!(out.stdout.contains(subject), "{subject} missing: {out}");
    }
    assert!(!out.stdout.contains("fix:"), "{out}");
    // The guest password of the broker url is not shown.
    assert!(!out.stdout.contains("guest:guest"), "{out}");

    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(0));
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["summary"]["fail"], 0, "{report:#}");
    for c in report["checks"].as_array().expect("checks") {
        for key in ["subject", "check", "status", "found", "fix"] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
        assert_ne!(c["status"], "fail", "{c}");
    }
    assert_eq!(
        check(&report, "source servicedesk", "read")["status"],
        "ok",
        "{report:#}"
    );
    assert_eq!(check(&report, "sink partner", "reach")["status"], "ok");
    assert_eq!(check(&report, "sink rmq", "exchange")["status"], "ok");
    let js_check = check(&report, "sink js", "stream");
    assert_eq!(js_check["status"], "ok", "{js_check}");
    assert!(
        js_check["found"]
            .as_str()
            .unwrap_or_default()
            .contains(&stream)
    );
    assert_eq!(check(&report, "store", "write")["status"], "ok");

    // Nothing was delivered: the receiver saw HEAD requests only, the
    // stream holds no message, and the checkpoint was not moved.
    assert!(world.receiver.records_at(RECORDS).is_empty());
    assert!(
        world.receiver.requests().iter().all(|r| r.method == "HEAD"),
        "{:?}",
        world.receiver.requests()
    );
    assert_eq!(
        brokers::stream_state(&js, &stream).await.map(|s| s.0),
        Some(0)
    );
    drop(connection);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_and_a_user_without_select_fail_with_the_fix() {
    let world = World::postgres().await;
    // The table does not exist.
    let config = world
        .config_toml()
        .replace("table = \"service_requests\"", "table = \"no_such_table\"");
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(1), "{out}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("source servicedesk") && l.contains("read"))
        .unwrap_or_else(|| panic!("no read check of the source: {out}"));
    assert!(line.starts_with("fail"), "{out}");
    assert!(line.contains("no_such_table"), "{out}");
    assert!(out.stdout.contains("fix: create the table"), "{out}");
    assert!(out.stdout.contains("1 failure"), "{out}");

    // A user who may log in but not read the table.
    let role = format!("{}_reader", world.db.name());
    world.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    let url = world.db.url().replacen("postgres@", &format!("{role}@"), 1);
    let config = world.config_toml().replace(world.db.url(), &url);
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let read = check(&report, "source servicedesk", "read");
    assert_eq!(read["status"], "fail", "{read}");
    assert!(
        read["found"]
            .as_str()
            .unwrap_or_default()
            .contains("permission denied"),
        "{read}"
    );
    assert_eq!(
        read["fix"],
        format!("GRANT SELECT ON \"service_requests\" TO {role}"),
        "{read}"
    );
    // It connected: the connection is not what failed.
    assert_eq!(
        check(&report, "source servicedesk", "connect")["status"],
        "ok"
    );
    world.exec(&format!("DROP ROLE {role}")).await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sink_fails_and_a_silent_one_fails_within_the_timeout() {
    let world = World::sqlite().await;
    let port = closed_port();
    let config = world.config_toml().replace(
        &world.receiver.url("/"),
        &format!("http://127.0.0.1:{port}/"),
    );
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(1), "{report:#}");
    let reach = check(&report, "sink partner", "reach");
    assert_eq!(reach["status"], "fail", "{reach}");
    assert!(
        reach["found"]
            .as_str()
            .unwrap_or_default()
            .contains(&port.to_string()),
        "{reach}"
    );
    assert!(
        reach["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("host and port"),
        "{reach}"
    );
    // The rest of the report is still there, and fine.
    assert_eq!(check(&report, "source servicedesk", "read")["status"], "ok");

    // A host that takes the connection and never answers: the sink's own
    // timeout is 120s; doctor gives up after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("address");
    let config = world
        .config_toml()
        .replace(&world.receiver.url("/"), &format!("http://{addr}/"));
    let started = Instant::now();
    let out = doctor(&world, &config, &["--timeout", "2s"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {out}");
    assert!(out.stdout.contains("no answer within 2s"), "{out}");
    drop(silent);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_oauth2_client_secret_fails_and_the_right_one_passes() {
    const SECRET: &str = "right-secret-5e1b";
    const WRONG: &str = "wrong-secret-a07c";
    let endpoint = Receiver::start().await;
    let client = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("caudal:{SECRET}")
        )
    );
    endpoint.set_behaviour(Behaviour::custom(move |r| {
        let auth = r.headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(client.as_str()) {
            return Reply::status(401).json(&serde_json::json!({
                "error": "invalid_client", "error_description": "bad client credentials"
            }));
        }
        Reply::status(200).json(&serde_json::json!({
            "access_token": "tok-1", "token_type": "Bearer", "expires_in": 60,
        }))
    }));
    let mut world = World::sqlite().await;
    let with_secret = |world: &mut World, secret: &str| {
        world.sink_extra = format!(
            "auth = {{ oauth2 = {{ token_url = \"{}\", client_id = \"caudal\", \
             client_secret = \"{secret}\" }} }}",
            endpoint.url("/oauth/token")
        );
        world.config_toml()
    };

    let config = with_secret(&mut world, WRONG);
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        !out.stdout.contains(WRONG) && !out.stderr.contains(WRONG),
        "{out}"
    );
    let (_, report) = doctor_json(&world, &config).await;
    let auth = check(&report, "sink partner", "auth");
    assert_eq!(auth["status"], "fail", "{auth}");
    let found = auth["found"].as_str().unwrap_or_default();
    assert!(
        found.contains("401") && found.contains("invalid_client"),
        "{auth}"
    );
    assert!(
        auth["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("client_secret"),
        "{auth}"
    );

    let config = with_secret(&mut world, SECRET);
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(0), "{report:#}");
    let auth = check(&report, "sink partner", "auth");
    assert_eq!(auth["status"], "ok", "{auth}");
    assert!(
        auth["found"]
            .as_str()
            .unwrap_or_default()
            .contains("issued an OAuth2 token"),
        "{auth}"
    );
    // The partner saw no record, and no token.
    assert!(world.receiver.records_at(RECORDS).is_empty());
    assert!(
        world
            .receiver
            .requests()
            .iter()
            .all(|r| r.method == "HEAD" && !r.headers.contains_key("authorization"))
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_invalid_config_and_warnings_under_strict() {
    let world = World::sqlite().await;
    // An invalid configuration: 2, with the field named.
    let config = world.config_toml().replace("cursor = [", "cursr = [");
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("cursr"), "{out}");

    // A buffer larger than any disk: a warning, 0; with --strict, 1.
    let config = world.config_toml().replace(
        "ack = \"buffered\"",
        "ack = \"buffered\"\nbuffer = { max_bytes = \"1000000000GiB\" }",
    );
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("buffer_dir") && l.contains("space"))
        .unwrap_or_else(|| panic!("no space check: {out}"));
    assert!(line.starts_with("warn"), "{out}");
    assert!(out.stdout.contains("fix: lower buffer.max_bytes"), "{out}");
    let out = doctor(&world, &config, &["--strict"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    world.cleanup().await;
}

#[cfg(feature = "postgres-cdc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cdc_prerequisites_are_reported_with_their_fix() {
    let world = World::postgres().await;
    let cdc = |url: &str| {
        world
            .config_toml()
            .replace(world.db.url(), url)
            .replace(
                "table = \"service_requests\"\ncursor = [\"last_modified_date\", \"request_id\"]",
                "mode = \"cdc\"\ntables = [\"public.service_requests\"]",
            )
            .replace("schedule = { every = \"1s\" }\n", "")
    };
    let pool = world.db.pg_pool().await;
    let (wal_level,): (String,) = sqlx::query_as("SELECT current_setting('wal_level')")
        .fetch_one(&pool)
        .await
        .expect("read wal_level");
    pool.close().await;

    // As the superuser of the test server: replication allowed, the table
    // keyed and readable, slot and publication made by the first run.
    let (_, report) = doctor_json(&world, &cdc(world.db.url())).await;
    let level = check(&report, "source servicedesk", "wal_level");
    if wal_level == "logical" {
        assert_eq!(level["status"], "ok", "{level}");
    } else {
        assert_eq!(level["status"], "fail", "{level}");
        assert_eq!(
            level["fix"], "ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL",
            "{level}"
        );
    }
    assert_eq!(
        check(&report, "source servicedesk", "replication")["status"],
        "ok"
    );
    assert_eq!(
        check(
            &report,
            "source servicedesk",
            "table public.service_requests"
        )["status"],
        "ok",
        "{report:#}"
    );
    let slot = check(&report, "source servicedesk", "slot");
    assert_eq!(slot["status"], "ok", "{slot}");
    assert!(
        slot["found"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist yet"),
        "{slot}"
    );

    // A role without REPLICATION and without SELECT on the table.
    let role = format!("{}_norepl", world.db.name());
    world.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    let url = world.db.url().replacen("postgres@", &format!("{role}@"), 1);
    let (code, report) = doctor_json(&world, &cdc(&url)).await;
    assert_eq!(code, Some(1), "{report:#}");
    let repl = check(&report, "source servicedesk", "replication");
    assert_eq!(repl["status"], "fail", "{repl}");
    assert!(
        repl["found"]
            .as_str()
            .unwrap_or_default()
            .contains("may not use replication"),
        "{repl}"
    );
    assert_eq!(
        repl["fix"],
        format!("ALTER ROLE \"{role}\" WITH REPLICATION")
    );
    let table = check(
        &report,
        "source servicedesk",
        "table public.service_requests",
    );
    assert_eq!(table["status"], "fail", "{table}");
    assert!(
        table["fix"]
            .as_str()
            .unwrap_or_default()
            .starts_with("GRANT SELECT ON"),
        "{table}"
    );
    // Doctor creates neither slot nor publication.
    let pool = world.db.pg_pool().await;
    let (slots, publications): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'caudal_requests_to_partner' AND database = current_database()), \
                (SELECT count(*) FROM pg_publication)",
    )
    .fetch_one(&pool)
    .await
    .expect("count slots and publications");
    pool.close().await;
    assert_eq!((slots, publications), (0, 0));
    world.exec(&format!("DROP ROLE {role}")).await;
    world.cleanup().await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_binlog_prerequisites_are_reported_with_their_fix() {
    let db = caudal_testkit::mysql_database().await;
    let pool = db.mysql_pool().await;
    sqlx::query("CREATE TABLE items (id INT PRIMARY KEY, v TEXT) ENGINE = InnoDB")
        .execute(&pool)
        .await
        .expect("create the table");
    let (log_bin, format): (i64, String) =
        sqlx::query_as("SELECT CAST(@@log_bin AS SIGNED), CAST(@@GLOBAL.binlog_format AS CHAR)")
            .fetch_one(&pool)
            .await
            .expect("read the binary log settings");
    let user = format!("{}_r", &db.name()[db.name().len().saturating_sub(20)..]);
    for sql in [
        format!("CREATE USER '{user}'@'%'"),
        format!("GRANT SELECT ON `{}`.* TO '{user}'@'%'", db.name()),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("create the user");
    }
    let world = World::sqlite().await;
    let config = |url: &str| {
        format!(
            "[state]\nurl = \"sqlite://{}\"\n\n\
             [sources.shop]\ntype = \"mysql\"\nurl = \"{url}\"\nmode = \"cdc\"\n\
             tables = [\"items\"]\n\n\
             [sinks.partner]\ntype = \"http\"\nurl = \"{}\"\n\n\
             [pipelines.items]\nsource = \"shop\"\nsink = \"partner\"\n",
            world.state_db().display(),
            world.receiver.url("/items"),
        )
    };
    let (_, report) = doctor_json(&world, &config(db.url())).await;
    let bin = check(&report, "source shop", "log_bin");
    assert_eq!(
        bin["status"],
        if log_bin == 1 { "ok" } else { "fail" },
        "{bin}"
    );
    let fmt = check(&report, "source shop", "binlog_format");
    if format.eq_ignore_ascii_case("ROW") {
        assert_eq!(fmt["status"], "ok", "{fmt}");
    } else {
        assert_eq!(fmt["status"], "fail", "{fmt}");
        assert!(
            fmt["fix"]
                .as_str()
                .unwrap_or_default()
                .starts_with("SET GLOBAL binlog_format = 'ROW'"),
            "{fmt}"
        );
    }
    assert_eq!(check(&report, "source shop", "privileges")["status"], "ok");
    assert_eq!(
        check(
            &report,
            "source shop",
            &format!("table {}.items", db.name())
        )["status"],
        "ok",
        "{report:#}"
    );

    // A user who may read the table but not the binary log.
    let url = db.url().replacen("root@", &format!("{user}@"), 1);
    let (code, report) = doctor_json(&world, &config(&url)).await;
    assert_eq!(code, Some(1), "{report:#}");
    let grants = check(&report, "source shop", "privileges");
    assert_eq!(grants["status"], "fail", "{grants}");
    assert!(
        grants["found"]
            .as_str()
            .unwrap_or_default()
            .contains("REPLICATION SLAVE"),
        "{grants}"
    );
    assert_eq!(
        grants["fix"],
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO the user"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP USER '{user}'@'%'")))
        .execute(&pool)
        .await
        .expect("drop the user");
    pool.close().await;
    db.cleanup().await;
    world.cleanup().await;
}

#[cfg(all(feature = "rabbitmq", feature = "nats"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_and_a_subject_without_stream_fail() {
    let world = World::sqlite().await;
    // Names no test creates.
    let exchange = brokers::unique("doctor_missing_x");
    let subject = brokers::unique("doctor_missing_s");
    let _nats = brokers::nats().await;
    let _rabbit = brokers::rabbitmq().await;
    let config = format!(
        "{}
[sinks.rmq]
type = \"rabbitmq\"
url = \"{rabbit}\"
exchange = \"{exchange}\"
routing_key = \"doctor\"

[sinks.js]
type = \"nats\"
url = \"nats://{nats}\"
subject = \"{subject}.events\"

[pipelines.to_rmq]
source = \"servicedesk\"
sink = \"rmq\"
schedule = {{ every = \"1h\" }}

[pipelines.to_js]
source = \"servicedesk\"
sink = \"js\"
schedule = {{ every = \"1h\" }}
",
        world.config_toml(),
        rabbit = brokers::rabbitmq_url(brokers::RABBITMQ_ADDR),
        nats = brokers::NATS_ADDR,
    );
    let out = doctor(&world, &config, &[]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("2 failures"), "{out}");
    let (_, report) = doctor_json(&world, &config).await;
    assert_eq!(check(&report, "sink rmq", "connect")["status"], "ok");
    let x = check(&report, "sink rmq", "exchange");
    assert_eq!(x["status"], "fail", "{x}");
    assert!(
        x["fix"].as_str().unwrap_or_default().contains(&exchange),
        "{x}"
    );
    assert_eq!(check(&report, "sink js", "connect")["status"], "ok");
    let s = check(&report, "sink js", "stream");
    assert_eq!(s["status"], "fail", "{s}");
    assert!(
        s["found"]
            .as_str()
            .unwrap_or_default()
            .contains("no stream captures"),
        "{s}"
    );
    world.cleanup().await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_topic_is_looked_up_without_being_created() {
    let world = World::sqlite().await;
    let cluster = brokers::kafka_cluster(1);
    let bootstrap = cluster.bootstrap_servers();
    let topic = brokers::unique("doctor_topic");
    cluster
        .create_topic(&topic, 3, 1)
        .expect("create the topic");
    let missing = brokers::unique("doctor_missing_topic");
    let config = |topic: &str, brokers: &str| {
        format!(
            "{}
[sinks.events]
type = \"kafka\"
brokers = \"{brokers}\"
topic = \"{topic}\"

[pipelines.to_kafka]
source = \"servicedesk\"
sink = \"events\"
schedule = {{ every = \"1h\" }}
",
            world.config_toml()
        )
    };

    let (code, report) = doctor_json(&world, &config(&topic, &bootstrap)).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(check(&report, "sink events", "connect")["status"], "ok");
    let t = check(&report, "sink events", "topic");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(
        t["found"]
            .as_str()
            .unwrap_or_default()
            .contains("3 partition"),
        "{t}"
    );

    let (code, report) = doctor_json(&world, &config(&missing, &bootstrap)).await;
    assert_eq!(code, Some(1), "{report:#}");
    let t = check(&report, "sink events", "topic");
    assert_eq!(t["status"], "fail", "{t}");
    assert!(
        t["fix"].as_str().unwrap_or_default().contains(&missing),
        "{t}"
    );
    // Looking it up did not create it.
    let b = bootstrap.clone();
    let m = missing.clone();
    let created = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &b)
            .create()
            .expect("a Kafka client");
        client
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata")
            .topics()
            .iter()
            .any(|t| t.name() == m)
    })
    .await
    .expect("the metadata task");
    assert!(!created, "doctor created topic {missing}");

    let closed = format!("127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let out = doctor(&world, &config(&topic, &closed), &["--timeout", "3s"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("did not answer"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30), "{out}");
    world.cleanup().await;
}

#[cfg(all(feature = "rabbitmq", feature = "nats"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sources_are_looked_up_without_consuming_or_creating() {
    let mut created = brokers::Created::default();
    let world = World::sqlite().await;
    let connection = brokers::rabbitmq().await;
    // A queue holding three messages; two names that exist nowhere.
    let queue = created.queue("doctor_src_q");
    brokers::declare_queue(&connection, &queue).await;
    let channel = brokers::channel(&connection).await;
    for i in 0..3 {
        let body = format!("{{\"n\": {i}}}");
        brokers::publish(&channel, "", &queue, body.as_bytes(), None, &[]).await;
    }
    let missing_queue = brokers::unique("doctor_src_missing_q");
    let declared_queue = brokers::unique("doctor_src_declared_q");
    let js = async_nats::jetstream::new(brokers::nats().await);
    let stream = created.stream("doctor_src_s");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await
    .expect("create the stream");
    js.publish(format!("{stream}.a"), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("the stream took it");
    let missing_stream = brokers::unique("doctor_src_missing_s");
    let config = format!(
        "{}
[sources.q]
type = \"rabbitmq\"
url = \"{rabbit}\"
queue = \"{queue}\"

[sources.q_missing]
type = \"rabbitmq\"
url = \"{rabbit}\"
queue = \"{missing_queue}\"

[sources.q_declared]
type = \"rabbitmq\"
url = \"{rabbit}\"
queue = \"{declared_queue}\"
declare = true

[sources.s]
type = \"nats\"
url = \"nats://{nats}\"
stream = \"{stream}\"
consumer = \"doctor_reader\"

[sources.s_missing]
type = \"nats\"
url = \"nats://{nats}\"
stream = \"{missing_stream}\"
consumer = \"doctor_reader\"
",
        world.config_toml(),
        rabbit = brokers::rabbitmq_url(brokers::RABBITMQ_ADDR),
        nats = brokers::NATS_ADDR,
    );
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(1), "{report:#}");
    let found = |subject: &str, name: &str| {
        let c = check(&report, subject, name);
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["found"].as_str().unwrap_or_default().to_string(),
            c["fix"].as_str().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(found("source q", "connect").0, "ok");
    let (status, text, _) = found("source q", "queue");
    assert_eq!(status, "ok", "{text}");
    assert!(text.contains("3 message(s) ready"), "{text}");
    let (status, _, fix) = found("source q_missing", "queue");
    assert_eq!(status, "fail", "{report:#}");
    assert!(
        fix.contains(&missing_queue) && fix.contains("declare = true"),
        "{fix}"
    );
    let (status, text, _) = found("source q_declared", "queue");
    assert_eq!(status, "ok", "{text}");
    assert!(text.contains("does not exist yet"), "{text}");
    let (status, text, _) = found("source s", "stream");
    assert_eq!(status, "ok", "{text}");
    assert!(text.contains("1 message(s)"), "{text}");
    let (status, text, _) = found("source s", "consumer");
    assert_eq!(status, "ok", "{text}");
    assert!(text.contains("does not exist yet"), "{text}");
    let (status, text, fix) = found("source s_missing", "stream");
    assert_eq!(status, "fail", "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(fix.contains(&missing_stream), "{fix}");

    // Nothing was consumed, declared or created.
    assert_eq!(brokers::queue_length(&connection, &queue).await, Some(3));
    assert_eq!(
        brokers::queue_length(&connection, &missing_queue).await,
        None
    );
    assert_eq!(
        brokers::queue_length(&connection, &declared_queue).await,
        None
    );
    let stream_handle = js.get_stream(&stream).await.expect("the stream");
    assert!(
        stream_handle.consumer_info("doctor_reader").await.is_err(),
        "doctor created the durable consumer"
    );
    world.cleanup().await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_topics_are_looked_up() {
    let world = World::sqlite().await;
    let cluster = brokers::kafka_cluster(1);
    let bootstrap = cluster.bootstrap_servers();
    let topic = brokers::unique("doctor_src_topic");
    cluster
        .create_topic(&topic, 2, 1)
        .expect("create the topic");
    let missing = brokers::unique("doctor_src_missing_topic");
    let config = format!(
        "{}
[sources.events]
type = \"kafka\"
brokers = \"{bootstrap}\"
topics = [\"{topic}\", \"{missing}\"]
group = \"doctor\"
",
        world.config_toml()
    );
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(check(&report, "source events", "connect")["status"], "ok");
    let topics = checks(&report, "source events")
        .into_iter()
        .filter(|c| c["check"] == "topic")
        .collect::<Vec<_>>();
    assert_eq!(topics.len(), 2, "{report:#}");
    let ok = topics
        .iter()
        .find(|c| c["found"].as_str().unwrap_or_default().contains(&topic))
        .expect("the existing topic's check");
    assert_eq!(ok["status"], "ok", "{ok}");
    assert!(
        ok["found"]
            .as_str()
            .unwrap_or_default()
            .contains("2 partition"),
        "{ok}"
    );
    let fail = topics
        .iter()
        .find(|c| c["found"].as_str().unwrap_or_default().contains(&missing))
        .expect("the missing topic's check");
    assert_eq!(fail["status"], "fail", "{fail}");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawl_start_urls_are_asked_politely_and_aggregate_sources_named() {
    use caudal_testkit::site::{Site, SiteOptions};
    let site = Site::start(SiteOptions {
        robots: Some("User-agent: *\nDisallow: /listings/2\n".into()),
        ..SiteOptions::default()
    })
    .await;
    let world = World::sqlite().await;
    let config = format!(
        "{}
[crawl]
user_agent = \"doctor-test/1.0\"

[sources.site]
type = \"crawl\"
start_urls = [\"{ok}\", \"{disallowed}\", \"{missing}\"]
follow = [\"a.detail\"]

[[sources.site.pages]]
name = \"detail\"
match = \"/property/\\\\d+$\"
fields.title = \"h1.title\"

[aggregates.per_hour]
pipeline = \"{pipeline}\"
time = \"last_modified_date\"
window = \"1h\"
[aggregates.per_hour.metrics]
requests = \"count\"

[sources.hourly]
type = \"aggregate\"
aggregate = \"per_hour\"

[pipelines.crawled]
source = \"site\"
sink = \"partner\"
schedule = {{ every = \"1h\" }}

[pipelines.hourly_out]
source = \"hourly\"
sink = \"partner\"
schedule = {{ every = \"1h\" }}
",
        world.config_toml(),
        ok = site.url("/listings/1"),
        disallowed = site.url("/listings/2"),
        missing = site.url("/no-such-page"),
        pipeline = support::PIPELINE,
    );
    let (code, report) = doctor_json(&world, &config).await;
    assert_eq!(code, Some(1), "{report:#}");
    let starts: Vec<&Value> = checks(&report, "source site")
        .into_iter()
        .filter(|c| c["check"] == "start")
        .collect();
    assert_eq!(starts.len(), 3, "{report:#}");
    let about = |path: &str| {
        starts
            .iter()
            .find(|c| c["found"].as_str().unwrap_or_default().contains(path))
            .unwrap_or_else(|| panic!("no check about {path}: {report:#}"))
    };
    assert_eq!(about("/listings/1")["status"], "ok", "{report:#}");
    let refused = about("/listings/2");
    assert_eq!(refused["status"], "fail", "{refused}");
    assert!(
        refused["found"]
            .as_str()
            .unwrap_or_default()
            .contains("robots.txt disallows"),
        "{refused}"
    );
    let missing = about("/no-such-page");
    assert_eq!(missing["status"], "fail", "{missing}");
    assert!(
        missing["found"]
            .as_str()
            .unwrap_or_default()
            .contains("404"),
        "{missing}"
    );
    let windows = check(&report, "source hourly", "windows");
    assert_eq!(windows["status"], "ok", "{windows}");
    // What the crawl would ask first and nothing more: robots.txt once,
    // one request per allowed start URL, the configured User-Agent.
    let log = site.log();
    let paths: Vec<&str> = log.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(site.hits("/robots.txt"), 1, "{paths:?}");
    assert_eq!(site.hits("/listings/1"), 1, "{paths:?}");
    assert_eq!(site.hits("/listings/2"), 0, "{paths:?}");
    assert_eq!(site.hits("/no-such-page"), 1, "{paths:?}");
    assert_eq!(log.len(), 3, "{paths:?}");
    assert!(
        log.iter()
            .all(|a| a.user_agent.as_deref() == Some("doctor-test/1.0")),
        "{log:?}"
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_not_made_yet_is_not_made_by_doctor() {
    let world = World::sqlite().await;
    let fresh = world.dir.path().join("fresh").join("state.db");
    let config = world.config_toml().replace(
        &format!("sqlite://{}", world.state_db().display()),
        &format!("sqlite://{}", fresh.display()),
    );
    assert!(config.contains(&fresh.display().to_string()), "{config}");
    let (code, report) = doctor_json(&world, &config).await;
    let open = check(&report, "store", "open");
    assert_eq!(open["status"], "ok", "{report:#}");
    assert!(
        open["found"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist yet"),
        "{open}"
    );
    assert!(!fresh.exists(), "doctor created the store");
    assert!(
        !fresh.parent().expect("a parent").exists(),
        "doctor created its directory"
    );
    assert_eq!(code, Some(0), "{report:#}");
    world.cleanup().await;
}
