//! TLS of database sources in configuration files: a mysql source's `tls`
//! table loads with certificate checks on by default, and settings that
//! would check less than they seem to, or that one connection of a source
//! would not honour, are refused at their file:line:col.

use caudal_core::config::{Format, MysqlTlsMode, load_str};

fn no_env(_: &str) -> Option<String> {
    None
}

/// A config with one source of `source` (its table's lines) and an HTTP
/// pipeline reading it.
fn config(source: &str) -> String {
    format!(
        r#"[sources.db]
{source}

[sinks.partner]
type = "http"
url = "http://127.0.0.1:9/in"

[pipelines.sync]
source = "db"
sink = "partner"
schedule = {{ every = "1m" }}
"#
    )
}

fn errors(source: &str) -> String {
    let text = config(source);
    load_str(&text, Format::Toml, "c.toml", &no_env)
        .expect_err("a mistake")
        .to_string()
}

fn assert_all(err: &str, expected: &[&str]) {
    for e in expected {
        assert!(err.contains(e), "missing {e:?} in:\n{err}");
    }
}

#[test]
fn a_tls_table_verifies_the_identity_unless_told_otherwise() {
    let text = config(
        r#"type = "mysql"
url = "mysql://caudal@db.internal/shop"
table = "orders"
cursor = ["id"]
tls = { ca = "/etc/caudal/db-ca.pem" }"#,
    );
    let config = load_str(&text, Format::Toml, "c.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
    let sql = config.sources["db"].sql().expect("a SQL source");
    let tls = sql.tls.as_ref().expect("tls");
    assert_eq!(tls.mode, MysqlTlsMode::VerifyIdentity);
    assert_eq!(tls.ca.as_deref(), Some("/etc/caudal/db-ca.pem"));
    // The mysql client's upper-case names are understood too.
    let text = text.replace("tls = { ca", "tls = { mode = \"VERIFY_CA\", ca");
    let config = load_str(&text, Format::Toml, "c.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
    let sql = config.sources["db"].sql().expect("a SQL source");
    assert_eq!(
        sql.tls.as_ref().map(|t| t.mode),
        Some(MysqlTlsMode::VerifyCa)
    );
}

#[test]
fn mysql_tls_settings_that_check_less_than_they_seem_are_refused() {
    let err = errors(
        r#"type = "mysql"
url = "mysql://caudal@db.internal/shop?ssl-mode=REQUIRED"
table = "orders"
cursor = ["id"]
tls = { mode = "required", ca = "/ca.pem", cert = "/client.pem" }"#,
    );
    assert_all(
        &err,
        &[
            "c.toml:3:7: sources.db.url: \"ssl-mode\" in the url: a mysql source sets TLS with `tls",
            "c.toml:6:33: sources.db.tls.ca: mode = \"required\" encrypts without checking",
            "c.toml:6:7: sources.db.tls: a client certificate needs both cert and key",
        ],
    );
    let err = errors(
        r#"type = "mysql"
url = "mysql://caudal@db.internal/shop"
table = "orders"
cursor = ["id"]
tls = { mode = "disabled", ca = "/ca.pem" }"#,
    );
    assert_all(
        &err,
        &["sources.db.tls.ca: \"ca\" has no effect with mode = \"disabled\""],
    );
    let err = errors(
        r#"type = "mysql"
url = "mysql://caudal@db.internal/shop"
table = "orders"
cursor = ["id"]
tls = { mode = "verify_everything" }"#,
    );
    assert_all(&err, &["sources.db.tls.mode", "verify_identity"]);
}

#[test]
fn the_binary_log_reader_is_never_given_a_check_it_cannot_make() {
    let err = errors(
        r#"type = "mysql"
url = "mysql://caudal@db.internal/shop"
mode = "cdc"
tables = ["orders"]
tls = { mode = "verify_ca", ca = "/ca.pem" }"#,
    );
    assert_all(
        &err,
        &[
            "c.toml:6:16: sources.db.tls.mode: the binary log reader cannot check a certificate without its name",
        ],
    );
}

#[test]
fn postgres_sources_take_tls_in_their_url() {
    let err = errors(
        r#"type = "postgres"
url = "postgres://caudal@db.internal/shop?sslmode=verify_full"
table = "orders"
cursor = ["id"]
tls = { ca = "/ca.pem" }"#,
    );
    assert_all(
        &err,
        &[
            "c.toml:3:7: sources.db.url: sslmode=\"verify_full\" in the url: expected one of disable, allow, prefer, require, verify-ca, verify-full",
            "c.toml:6:7: sources.db.tls: `tls` is for mysql sources; a postgres source sets TLS in its url",
        ],
    );
    let text = config(
        r#"type = "postgres"
url = "postgres://caudal@db.internal/shop?sslmode=verify-full&sslrootcert=/etc/caudal/db-ca.pem"
table = "orders"
cursor = ["id"]"#,
    );
    load_str(&text, Format::Toml, "c.toml", &no_env).unwrap_or_else(|e| panic!("{e}"));
    // `require` checks nothing on the SQL driver's connections, while
    // libpq checks the certificate once a root is named.
    let err = errors(
        r#"type = "postgres"
url = "postgres://caudal@db.internal/shop?sslmode=require&sslrootcert=/ca.pem"
table = "orders"
cursor = ["id"]"#,
    );
    assert_all(
        &err,
        &[
            "c.toml:3:7: sources.db.url: sslmode=require with sslrootcert: write sslmode=verify-full",
        ],
    );
}
