//! `[cluster]` in configuration files: it loads with its default lease,
//! and what would lose records on failover is refused, each problem at its
//! file:line:col.

use caudal_core::config::{Format, load_str};

fn no_env(_: &str) -> Option<String> {
    None
}

const PIPELINES: &str = r#"
[sources.db]
type = "postgres"
url = "postgres://127.0.0.1/x"
table = "orders"
cursor = ["id"]

[sinks.partner]
type = "http"
url = "http://127.0.0.1:9/in"

[pipelines.safe]
source = "db"
sink = "partner"
schedule = { every = "1m" }
ack = "delivered"
"#;

#[test]
fn a_cluster_on_postgres_with_delivered_acks_loads_with_its_default_lease() {
    let text = format!("[state]\nurl = \"postgres://127.0.0.1/state\"\n\n[cluster]\n{PIPELINES}");
    let config = load_str(&text, Format::Toml, "c.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
    let cluster = config.cluster.expect("a cluster");
    assert_eq!(cluster.lease.as_std(), std::time::Duration::from_secs(6));
    let without = load_str(PIPELINES, Format::Toml, "c.toml", &no_env).expect("no cluster");
    assert!(without.cluster.is_none());
}

#[test]
fn what_would_lose_records_on_failover_is_refused_where_it_is() {
    let text = format!(
        r#"[cluster]
lease = "1s"
{PIPELINES}
[pipelines.risky]
source = "db"
sink = "partner"
schedule = {{ every = "1m" }}
"#
    );
    let err = load_str(&text, Format::Toml, "c.toml", &no_env)
        .expect_err("mistakes")
        .to_string();
    for expected in [
        "c.toml:2:9: cluster.lease: must be at least \"2s\"",
        "c.toml:1:2: cluster: a cluster shares a PostgreSQL state store",
        "c.toml:20:1: pipelines.risky.ack: in a cluster a pipeline needs ack = \"delivered\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("pipelines.safe"), "{err}");
}
