//! What binlog CDC needs to know of the server and its tables: the checks
//! made before a run, table keys, the binary logs on the server and the
//! distance between two positions.

use std::collections::HashSet;

use caudal_core::config::SqlDialect;
use caudal_core::probe::{Finding, Status};
use caudal_core::{Error, ErrorKind, Result};
use sqlx::{MySqlPool, Row};

use crate::sources::sql::{ColumnKind, mysql, quote_ident};

/// A captured table.
#[derive(Clone, Debug)]
pub struct Table {
    /// `schema.table`, as the binary log names it.
    pub name: String,
    /// The quoted name for SQL.
    pub quoted: String,
    /// The columns that identify a row, in key order, with the kind their
    /// values decode to: the primary key, else the first unique index of
    /// NOT NULL columns (by index name); empty for a table with neither.
    pub key: Vec<(String, ColumnKind)>,
    /// The unique index `key` comes from, when the table has no primary key.
    pub unique_index: Option<String>,
}

impl Table {
    /// Whether the table has nothing that identifies a row: its changes
    /// are keyed by the table alone (ordered across the whole table), the
    /// whole old row identifies an update or delete, and its snapshot is
    /// read in one pass.
    pub fn keyless(&self) -> bool {
        self.key.is_empty()
    }
}

/// What the current catalog says of a table's columns beyond what the
/// binary log carries: which text columns are JSON (MariaDB's `JSON` is
/// `LONGTEXT` with a check) and which are `TINYINT(1)` booleans.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub json: HashSet<String>,
    pub boolean: HashSet<String>,
    /// Character set of each text column (`utf8mb4`, `latin1`, …).
    pub charsets: std::collections::HashMap<String, String>,
    /// Columns of types the binary log holds in a form caudal does not
    /// decode (`INET4`, `INET6`, `UUID`), with the type.
    pub unsupported: std::collections::HashMap<String, String>,
}

/// MariaDB types logged as raw bytes whose text form the log does not
/// give.
const UNSUPPORTED_TYPES: [&str; 3] = ["inet4", "inet6", "uuid"];

/// The server's settings that binlog CDC depends on.
#[derive(Clone, Debug)]
pub struct Server {
    pub version: String,
    pub server_id: u32,
    /// `FULL`, `MINIMAL` or `NOBLOB`.
    pub row_image: String,
}

pub use crate::sources::change::query_error;

fn config_error(source: &str, message: String) -> Error {
    Error::new(ErrorKind::Config, format!("source {source:?}: {message}"))
}

/// Checks what reading the binary log as a replica needs, with errors that
/// say what to change: the first failing [`prerequisites`]; a warning
/// (`binlog_row_image` not FULL) is logged.
pub async fn preflight(pool: &MySqlPool, source: &str, server_id: u32) -> Result<Server> {
    let (server, findings) = prerequisites(pool, source, server_id).await?;
    for f in &findings {
        match f.status {
            Status::Fail => return Err(config_error(source, f.message())),
            Status::Warn => tracing::warn!(source, "{}", f.message()),
            _ => {}
        }
    }
    Ok(server)
}

/// What reading the binary log as a replica needs, one finding each: a
/// MariaDB server, the binary log on, ROW format, full row metadata, no
/// compressed events, a server id of its own, the replication privileges;
/// and, as a warning, full row images.
pub async fn prerequisites(
    pool: &MySqlPool,
    source: &str,
    server_id: u32,
) -> Result<(Server, Vec<Finding>)> {
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(pool)
        .await
        .map_err(|e| query_error(source, "cannot read the server version", e))?;
    let server = |own_id: u64, row_image: String| Server {
        version: version.clone(),
        server_id: u32::try_from(own_id).unwrap_or(0),
        row_image,
    };
    if !version.contains("MariaDB") {
        let finding = Finding::fail(
            "version",
            format!(
                "the server is MySQL {version}; binlog CDC supports MariaDB servers (10.5 and \
                 later), whose consistent snapshots report their binary log position \
                 (binlog_snapshot_position)"
            ),
            "read this MySQL server with mode = \"incremental\"",
        );
        return Ok((server(0, String::new()), vec![finding]));
    }
    let mut out = vec![Finding::ok("version", version.clone())];
    let row = sqlx::query(
        "SELECT CAST(@@log_bin AS SIGNED), @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image, \
         @@GLOBAL.binlog_row_metadata, CAST(@@server_id AS UNSIGNED), \
         CAST(@@GLOBAL.log_bin_compress AS SIGNED)",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| {
        query_error(
            source,
            "cannot read the binary log settings (binlog CDC needs MariaDB 10.5 or later)",
            e,
        )
    })?;
    let text = |i: usize| -> String {
        row.try_get::<String, _>(i)
            .or_else(|_| {
                row.try_get::<Vec<u8>, _>(i)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            })
            .unwrap_or_default()
    };
    let log_bin: i64 = row.try_get(0).unwrap_or(0);
    let (format, image, metadata) = (text(1), text(2), text(3));
    let own_id: u64 = row.try_get(4).unwrap_or(0);
    let compress: i64 = row.try_get(5).unwrap_or(0);
    out.push(if log_bin == 1 {
        Finding::ok("log_bin", "the binary log is on")
    } else {
        Finding::fail(
            "log_bin",
            "the server's binary log is off",
            "add `log_bin = mariadb-bin` and a `server_id` under [mysqld] in its configuration \
             and restart it",
        )
    });
    out.push(if format.eq_ignore_ascii_case("ROW") {
        Finding::ok("binlog_format", "binlog_format is ROW")
    } else {
        Finding::fail(
            "binlog_format",
            format!("binlog_format is {format}; CDC needs every change as a row"),
            "SET GLOBAL binlog_format = 'ROW' (and `binlog_format = ROW` in the server's \
             configuration, so it stays after a restart)",
        )
    });
    out.push(if metadata.eq_ignore_ascii_case("FULL") {
        Finding::ok("binlog_row_metadata", "binlog_row_metadata is FULL")
    } else {
        Finding::fail(
            "binlog_row_metadata",
            format!(
                "binlog_row_metadata is {metadata}; caudal decodes each change with the column \
                 names, signedness and ENUM/SET values the log held at that point"
            ),
            "SET GLOBAL binlog_row_metadata = 'FULL' (and in the server's configuration)",
        )
    });
    if compress != 0 {
        out.push(Finding::fail(
            "log_bin_compress",
            "log_bin_compress is ON, and compressed binary log events cannot be read",
            "SET GLOBAL log_bin_compress = OFF",
        ));
    }
    out.push(if image.eq_ignore_ascii_case("FULL") {
        Finding::ok("binlog_row_image", "binlog_row_image is FULL")
    } else {
        Finding::warn(
            "binlog_row_image",
            format!(
                "binlog_row_image is {image}: updates carry only the changed columns (the others \
                 are listed in `unchanged`) and deletes only the key"
            ),
            "SET GLOBAL binlog_row_image = 'FULL' for whole rows",
        )
    });
    // A failure to read the grants must not hide what was found above.
    out.push(match check_grants(pool, source).await {
        Ok(finding) => finding,
        Err(e) if out.iter().any(|f| f.status == Status::Fail) => Finding::fail(
            "privileges",
            e.to_string(),
            "grant the user REPLICATION SLAVE, REPLICATION CLIENT and SELECT",
        ),
        Err(e) => return Err(e),
    });
    out.push(if own_id == u64::from(server_id) {
        Finding::fail(
            "server_id",
            format!("server_id {server_id} is the server's own id"),
            "give the source a `server_id` no other replica of this server uses",
        )
    } else {
        match check_server_id(pool, source, server_id).await {
            Ok(finding) => finding,
            Err(e) if out.iter().any(|f| f.status == Status::Fail) => Finding::fail(
                "server_id",
                e.to_string(),
                "give the source a `server_id` no other replica of this server uses",
            ),
            Err(e) => return Err(e),
        }
    });
    Ok((server(own_id, image.to_ascii_uppercase()), out))
}

/// The privileges a binlog replica needs: REPLICATION SLAVE to read the
/// log, BINLOG MONITOR (REPLICATION CLIENT) to see its files.
async fn check_grants(pool: &MySqlPool, source: &str) -> Result<Finding> {
    let rows = sqlx::query("SHOW GRANTS FOR CURRENT_USER()")
        .fetch_all(pool)
        .await
        .map_err(|e| query_error(source, "cannot read the user's grants", e))?;
    let grants: Vec<String> = rows
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .map(|g| g.to_ascii_uppercase())
        .filter(|g| g.contains(" ON *.* "))
        .collect();
    let has = |p: &str| {
        grants
            .iter()
            .any(|g| g.contains("ALL PRIVILEGES") || g.contains(p))
    };
    let mut missing = Vec::new();
    if !has("REPLICATION SLAVE") {
        missing.push("REPLICATION SLAVE");
    }
    if !(has("BINLOG MONITOR") || has("REPLICATION CLIENT") || has("SUPER")) {
        missing.push("REPLICATION CLIENT");
    }
    if missing.is_empty() {
        return Ok(Finding::ok(
            "privileges",
            "the user may read the binary log (REPLICATION SLAVE, REPLICATION CLIENT)",
        ));
    }
    Ok(Finding::fail(
        "privileges",
        format!(
            "the user lacks {} to read the binary log",
            missing.join(" and ")
        ),
        format!("GRANT {}, SELECT ON *.* TO the user", missing.join(", ")),
    ))
}

/// Refuses a server id another replica of the server registered with
/// (caudal's own earlier connections register as host `caudal:…` and are
/// replaced when the same id connects again).
async fn check_server_id(pool: &MySqlPool, source: &str, server_id: u32) -> Result<Finding> {
    let unique = Finding::ok(
        "server_id",
        format!("no other replica uses server_id {server_id}"),
    );
    let rows = match sqlx::query("SHOW SLAVE HOSTS").fetch_all(pool).await {
        Ok(rows) => rows,
        // It needs REPLICATION MASTER ADMIN, which a replica does not:
        // without it the check is left to the server.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42000") => {
            tracing::debug!(
                source,
                "cannot list the server's replicas to check server_id: {e}"
            );
            return Ok(Finding::ok(
                "server_id",
                format!("server_id {server_id} (the user may not list the server's replicas)"),
            ));
        }
        Err(e) => return Err(query_error(source, "cannot list the server's replicas", e)),
    };
    for row in rows {
        let id: u64 = row
            .try_get::<u32, _>(0)
            .map(u64::from)
            .or_else(|_| row.try_get::<u64, _>(0))
            .unwrap_or(0);
        let host: String = row.try_get(1).unwrap_or_default();
        if id == u64::from(server_id) && !host.is_empty() && !host.starts_with("caudal:") {
            return Ok(Finding::fail(
                "server_id",
                format!(
                    "replica {host:?} of the server already uses server_id {server_id}; the \
                     server would drop one of the two connections"
                ),
                "give the source another `server_id`",
            ));
        }
    }
    Ok(unique)
}

/// Looks a table up: it must exist, be InnoDB (a consistent snapshot needs
/// a transactional engine) and have a primary key of orderable columns.
pub async fn table(pool: &MySqlPool, source: &str, table: &str) -> Result<Table> {
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s.to_string()), n.to_string()),
        None => (None, table.to_string()),
    };
    let found: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT TABLE_SCHEMA, ENGINE FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
    )
    .bind(&schema)
    .bind(&name)
    .fetch_optional(pool)
    .await
    .map_err(|e| query_error(source, &format!("cannot look table {table} up"), e))?;
    let Some((schema, engine)) = found else {
        return Err(config_error(
            source,
            format!("table {table} does not exist (or the user cannot see it)"),
        ));
    };
    let full = format!("{schema}.{name}");
    let quoted = format!(
        "{}.{}",
        quote_ident(SqlDialect::Mysql, &schema),
        quote_ident(SqlDialect::Mysql, &name)
    );
    if !engine
        .as_deref()
        .is_some_and(|e| e.eq_ignore_ascii_case("InnoDB"))
    {
        return Err(config_error(
            source,
            format!(
                "table {full} uses the {} engine; a consistent snapshot needs InnoDB: \
                 ALTER TABLE {quoted} ENGINE = InnoDB",
                engine.as_deref().unwrap_or("(none)")
            ),
        ));
    }
    let short_time: Option<String> = sqlx::query_scalar(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
         AND TABLE_NAME = ? AND DATA_TYPE = 'time' AND DATETIME_PRECISION IN (1, 2) LIMIT 1",
    )
    .bind(&schema)
    .bind(&name)
    .fetch_optional(pool)
    .await
    .map_err(|e| query_error(source, &format!("cannot read the columns of {full}"), e))?;
    let odd: Option<(String, String)> = sqlx::query_as(
        "SELECT COLUMN_NAME, CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND DATA_TYPE IN ('inet4', 'inet6', 'uuid') LIMIT 1",
    )
    .bind(&schema)
    .bind(&name)
    .fetch_optional(pool)
    .await
    .map_err(|e| query_error(source, &format!("cannot read the columns of {full}"), e))?;
    if let Some((column, ty)) = odd {
        return Err(config_error(
            source,
            format!(
                "column {column:?} of table {full} has type {}, which the binary log holds as raw \
                 bytes caudal does not decode yet; capture a table without it, or store it as text",
                ty.to_ascii_uppercase()
            ),
        ));
    }
    if let Some(column) = short_time {
        return Err(config_error(
            source,
            format!(
                "column {column:?} of table {full} is TIME(1) or TIME(2), whose negative values \
                 the binary log decoder reads wrong; ALTER TABLE {quoted} MODIFY {} TIME(3)",
                quote_ident(SqlDialect::Mysql, &column)
            ),
        ));
    }
    let (key, unique_index) = identity(pool, source, &schema, &name, &full).await?;
    if key.is_empty() {
        return Ok(Table {
            name: full,
            quoted,
            key: Vec::new(),
            unique_index: None,
        });
    }
    let list: Vec<String> = key
        .iter()
        .map(|k| quote_ident(SqlDialect::Mysql, k))
        .collect();
    // SELECT privilege is checked here too.
    let specs = mysql::describe(
        pool,
        format!("SELECT {} FROM {quoted} LIMIT 0", list.join(", ")),
    )
    .await
    .map_err(|e| query_error(source, &format!("cannot read table {full}"), e))?;
    let mut typed = Vec::new();
    for (k, spec) in key.iter().zip(specs) {
        if let ColumnKind::Other(t) = &spec.kind {
            return Err(config_error(
                source,
                format!(
                    "{} column {k:?} of table {full} has type {t}, which caudal cannot order a \
                     snapshot by (integers, decimals, text, dates and timestamps can)",
                    unique_index
                        .as_ref()
                        .map_or("primary key".to_string(), |i| format!("unique index {i:?}"))
                ),
            ));
        }
        typed.push((k.clone(), spec.kind));
    }
    Ok(Table {
        name: full,
        quoted,
        key: typed,
        unique_index,
    })
}

/// The columns that identify a row of `schema.name`: its primary key, else
/// the first unique index whose columns are all NOT NULL (with the index's
/// name), else none.
async fn identity(
    pool: &MySqlPool,
    source: &str,
    schema: &str,
    name: &str,
    full: &str,
) -> Result<(Vec<String>, Option<String>)> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT s.INDEX_NAME, s.COLUMN_NAME, c.IS_NULLABLE \
         FROM information_schema.STATISTICS s JOIN information_schema.COLUMNS c \
           ON c.TABLE_SCHEMA = s.TABLE_SCHEMA AND c.TABLE_NAME = s.TABLE_NAME \
          AND c.COLUMN_NAME = s.COLUMN_NAME \
         WHERE s.TABLE_SCHEMA = ? AND s.TABLE_NAME = ? AND s.NON_UNIQUE = 0 \
         ORDER BY s.INDEX_NAME = 'PRIMARY' DESC, s.INDEX_NAME, s.SEQ_IN_INDEX",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(|e| query_error(source, &format!("cannot read the keys of {full}"), e))?;
    let mut indexes: Vec<(String, Vec<String>, bool)> = Vec::new();
    for (index, column, nullable) in rows {
        let not_null = nullable.eq_ignore_ascii_case("NO");
        match indexes.last_mut() {
            Some((name, columns, all)) if *name == index => {
                columns.push(column);
                *all &= not_null;
            }
            _ => indexes.push((index, vec![column], not_null)),
        }
    }
    Ok(
        match indexes.into_iter().find(|(_, _, not_null)| *not_null) {
            Some((index, columns, _)) if index == "PRIMARY" => (columns, None),
            Some((index, columns, _)) => (columns, Some(index)),
            None => (Vec::new(), None),
        },
    )
}

/// The current catalog's JSON and boolean columns of `schema.table`.
pub async fn facts(pool: &MySqlPool, table: &str) -> Result<Facts, sqlx::Error> {
    let json = mysql::json_columns(pool, table).await?;
    let (schema, name) = table.split_once('.').unwrap_or(("", table));
    let columns: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT COLUMN_NAME, CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
         CAST(CHARACTER_SET_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(pool)
    .await?;
    let mut facts = Facts {
        json,
        ..Facts::default()
    };
    for (column, data_type, column_type, charset) in columns {
        if column_type.to_ascii_lowercase().starts_with("tinyint(1)") {
            facts.boolean.insert(column.clone());
        }
        if UNSUPPORTED_TYPES.contains(&data_type.to_ascii_lowercase().as_str()) {
            facts
                .unsupported
                .insert(column.clone(), data_type.to_ascii_uppercase());
        }
        if let Some(c) = charset {
            facts.charsets.insert(column, c.to_ascii_lowercase());
        }
    }
    Ok(facts)
}

/// A binary log file on the server and its size.
#[derive(Clone, Debug)]
pub struct LogFile {
    pub name: String,
    pub size: u64,
}

/// The server's binary log files, oldest first.
pub async fn binary_logs(pool: &MySqlPool, source: &str) -> Result<Vec<LogFile>> {
    let rows = sqlx::query("SHOW BINARY LOGS")
        .fetch_all(pool)
        .await
        .map_err(|e| query_error(source, "cannot list the binary logs (SHOW BINARY LOGS)", e))?;
    Ok(rows
        .iter()
        .map(|r| LogFile {
            name: r.try_get::<String, _>(0).unwrap_or_default(),
            size: r
                .try_get::<u64, _>(1)
                .or_else(|_| r.try_get::<i64, _>(1).map(|v| v.max(0).unsigned_abs()))
                .unwrap_or(0),
        })
        .collect())
}

/// The end of the server's binary log: the file being written and its
/// size.
pub async fn end_of_log(pool: &MySqlPool, source: &str) -> Result<(String, u64)> {
    let logs = binary_logs(pool, source).await?;
    logs.last()
        .map(|l| (l.name.clone(), l.size))
        .ok_or_else(|| config_error(source, "the server lists no binary logs".into()))
}

/// Bytes of log from `file`:`pos` to the end of the server's log, or
/// `None` when `file` is no longer on the server.
pub fn distance(logs: &[LogFile], file: &str, pos: u64) -> Option<u64> {
    let at = logs.iter().position(|l| l.name == file)?;
    let rest: u64 = logs[at + 1..].iter().map(|l| l.size).sum();
    Some(logs[at].size.saturating_sub(pos) + rest)
}

/// Orders two binary log positions: files by their numeric suffix (the
/// server numbers them in sequence), then offsets.
pub fn compare(a: (&str, u64), b: (&str, u64)) -> std::cmp::Ordering {
    let seq = |f: &str| {
        f.rsplit_once('.')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (seq(a.0), a.1).cmp(&(seq(b.0), b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_file_sequence_then_offset() {
        use std::cmp::Ordering::*;
        assert_eq!(compare(("b.000009", 900), ("b.000010", 4)), Less);
        assert_eq!(compare(("b.000010", 4), ("b.000010", 4)), Equal);
        assert_eq!(compare(("b.000010", 500), ("b.000010", 4)), Greater);
    }

    #[test]
    fn distance_spans_files() {
        let logs = vec![
            LogFile {
                name: "b.000001".into(),
                size: 1000,
            },
            LogFile {
                name: "b.000002".into(),
                size: 300,
            },
        ];
        assert_eq!(distance(&logs, "b.000001", 400), Some(900));
        assert_eq!(distance(&logs, "b.000002", 300), Some(0));
        assert_eq!(distance(&logs, "b.000000", 4), None);
    }
}
