//! What the CDC source asks PostgreSQL's catalog: tables and their primary
//! keys, column types for decoding, the server's settings and the slot.

use std::collections::HashMap;
use std::sync::Arc;

use caudal_core::probe::Finding;
use caudal_core::{Error, ErrorKind, Result};
use sqlx::postgres::PgTypeInfo;
use sqlx::{AssertSqlSafe, Column, Executor, PgPool, SqlSafeStr, Statement};

use crate::sources::sql::{ColumnKind, postgres::kind_of, quote_ident};
use caudal_core::config::SqlDialect;

/// A captured table as the catalog knows it.
#[derive(Clone, Debug)]
pub struct Table {
    /// `schema.table`, unquoted.
    pub name: String,
    /// `"schema"."table"`, for SQL.
    pub quoted: String,
    /// The columns that identify a row, in key order, with their kinds:
    /// the primary key, or the replica identity index of a table without
    /// one; empty for a table without a key.
    pub key: Vec<(String, ColumnKind)>,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
}

pub use crate::sources::change::query_error;

/// Looks a configured table up (as written: `t`, `s.t`, `"Mixed"`),
/// with its primary key and replica identity.
pub async fn table(pool: &PgPool, source: &str, written: &str) -> Result<Table> {
    let row: Option<(i64, String, String, String, bool)> = sqlx::query_as(
        "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text, \
                has_table_privilege(c.oid, 'SELECT') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass($1)",
    )
    .bind(written)
    .fetch_optional(pool)
    .await
    .map_err(|e| query_error(source, &format!("cannot look up table {written:?}"), e))?;
    let Some((oid, schema, name, replident, can_select)) = row else {
        return Err(Error::new(
            ErrorKind::Config,
            format!("source {source:?}: table {written:?} does not exist"),
        ));
    };
    if !can_select {
        return Err(Error::new(
            ErrorKind::Query,
            format!(
                "source {source:?}: the user cannot read table {schema}.{name}; \
                 GRANT SELECT ON {} TO the user",
                quoted(&schema, &name)
            ),
        ));
    }
    let oid = u32::try_from(oid).unwrap_or_default();
    let replica_identity = replident.chars().next().unwrap_or('d');
    let mut key = primary_key(pool, source, oid).await?;
    if key.is_empty() && replica_identity == 'i' {
        key = index_columns(pool, source, oid, "indisreplident").await?;
    }
    if let Some((col, ColumnKind::Other(ty))) =
        key.iter().find(|(_, k)| matches!(k, ColumnKind::Other(_)))
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "source {source:?}: primary key column {col:?} of {schema}.{name} has type {ty}, \
                 which caudal cannot read in key order; supported key types are integers, \
                 numeric, floats, text types, dates, timestamps and uuid"
            ),
        ));
    }
    Ok(Table {
        quoted: quoted(&schema, &name),
        name: format!("{schema}.{name}"),
        key,
        replica_identity,
    })
}

impl Table {
    /// Whether the table has no key: its rows are read by ctid, its
    /// changes ordered against the whole table.
    pub fn keyless(&self) -> bool {
        self.key.is_empty()
    }

    /// Whether PostgreSQL can publish its updates and deletes: it has a
    /// key, or its replica identity is the whole row (FULL). Otherwise it
    /// goes in a publication of inserts only, so the application's updates
    /// are not refused (a published table without a replica identity
    /// refuses them).
    pub fn updates_expressible(&self) -> bool {
        !self.key.is_empty() || self.replica_identity == 'f'
    }
}

fn quoted(schema: &str, name: &str) -> String {
    format!(
        "{}.{}",
        quote_ident(SqlDialect::Postgres, schema),
        quote_ident(SqlDialect::Postgres, name)
    )
}

/// The primary key columns of a table (by OID), in key order, with kinds.
pub async fn primary_key(
    pool: &PgPool,
    source: &str,
    oid: u32,
) -> Result<Vec<(String, ColumnKind)>> {
    index_columns(pool, source, oid, "indisprimary").await
}

/// The columns of a table's index marked by `flag` (`indisprimary`,
/// `indisreplident`), in index order, with kinds.
async fn index_columns(
    pool: &PgPool,
    source: &str,
    oid: u32,
    flag: &'static str,
) -> Result<Vec<(String, ColumnKind)>> {
    let names: Vec<(String,)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT a.attname::text FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = $1::int8::oid AND i.{flag} ORDER BY k.ord"
    )))
    .bind(i64::from(oid))
    .fetch_all(pool)
    .await
    .map_err(|e| query_error(source, "cannot read a primary key", e))?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let (qualified,): (String,) = sqlx::query_as("SELECT $1::int8::oid::regclass::text")
        .bind(i64::from(oid))
        .fetch_one(pool)
        .await
        .map_err(|e| query_error(source, "cannot read a table name", e))?;
    let cols: Vec<String> = names
        .iter()
        .map(|(n,)| quote_ident(SqlDialect::Postgres, n))
        .collect();
    let sql = format!("SELECT {} FROM {qualified} LIMIT 0", cols.join(", "));
    let described = pool
        .prepare(AssertSqlSafe(sql).into_sql_str())
        .await
        .map_err(|e| query_error(source, "cannot describe a primary key", e))?;
    Ok(names
        .into_iter()
        .zip(described.columns())
        .map(|((name,), col)| (name, kind_of(col.type_info())))
        .collect())
}

/// Column types by OID, resolved once (enums, domains and arrays of them
/// included) so binary values decode by their real type.
#[derive(Debug, Default)]
pub struct Types {
    by_oid: HashMap<u32, Arc<PgTypeInfo>>,
}

impl Types {
    /// The types of `oids`, resolving those not seen yet.
    pub async fn resolve(
        &mut self,
        pool: &PgPool,
        source: &str,
        oids: &[u32],
    ) -> Result<Vec<Arc<PgTypeInfo>>> {
        let mut missing: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| !self.by_oid.contains_key(o))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let ids: Vec<i64> = missing.iter().map(|&o| i64::from(o)).collect();
            let names: Vec<(i64, String)> = sqlx::query_as(
                "SELECT oid::int8, format_type(oid, NULL) FROM pg_type WHERE oid = ANY($1::int8[]::oid[])",
            )
            .bind(&ids)
            .fetch_all(pool)
            .await
            .map_err(|e| query_error(source, "cannot look up column types", e))?;
            if names.len() != missing.len() {
                return Err(Error::new(
                    ErrorKind::Decode,
                    format!(
                        "source {source:?}: a column type of a captured table no longer exists \
                         (type OIDs {missing:?}); the change cannot be decoded"
                    ),
                ));
            }
            let select: Vec<String> = names.iter().map(|(_, ty)| format!("NULL::{ty}")).collect();
            let sql = format!("SELECT {}", select.join(", "));
            let described = pool
                .prepare(AssertSqlSafe(sql).into_sql_str())
                .await
                .map_err(|e| query_error(source, "cannot describe column types", e))?;
            for ((oid, _), col) in names.iter().zip(described.columns()) {
                let oid = u32::try_from(*oid).unwrap_or_default();
                self.by_oid.insert(oid, Arc::new(col.type_info().clone()));
            }
        }
        oids.iter()
            .map(|o| {
                self.by_oid.get(o).cloned().ok_or_else(|| {
                    Error::new(ErrorKind::Internal, format!("type {o} was not resolved"))
                })
            })
            .collect()
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug)]
pub struct Slot {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<u64>,
    /// Bytes of WAL the server holds for the slot beyond its confirmed
    /// position.
    pub lag_bytes: Option<i64>,
}

/// plugin, database, active, wal_status, confirmed_flush_lsn, lag bytes.
type SlotRow = (
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
    Option<String>,
    Option<i64>,
);

pub async fn slot(pool: &PgPool, source: &str, name: &str) -> Result<Option<Slot>> {
    let row: Option<SlotRow> = sqlx::query_as(
        "SELECT plugin::text, database::text, active, wal_status, confirmed_flush_lsn::text, \
                (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(|e| query_error(source, "cannot read pg_replication_slots", e))?;
    Ok(row.map(
        |(plugin, database, active, wal_status, confirmed, lag)| Slot {
            plugin,
            database,
            active,
            wal_status,
            confirmed_flush: confirmed
                .as_deref()
                .and_then(caudal_core::record::parse_lsn),
            lag_bytes: lag,
        },
    ))
}

/// Checks what logical replication needs from the server and the user, with
/// errors that say what to change: the first failing [`prerequisites`].
pub async fn preflight(pool: &PgPool, source: &str) -> Result<()> {
    match prerequisites(pool, source)
        .await?
        .into_iter()
        .find(Finding::failed)
    {
        None => Ok(()),
        Some(f) => Err(Error::new(
            if f.check == "replication" {
                ErrorKind::Query
            } else {
                ErrorKind::Config
            },
            format!("source {source:?}: {}", f.message()),
        )),
    }
}

/// What logical replication needs from the server and the user, one
/// finding each: PostgreSQL 14 or later, `wal_level = logical`, and the
/// REPLICATION privilege (or superuser).
pub async fn prerequisites(pool: &PgPool, source: &str) -> Result<Vec<Finding>> {
    let (wal_level, version, can_replicate, user): (String, i32, bool, String) = sqlx::query_as(
        "SELECT current_setting('wal_level'), current_setting('server_version_num')::int4, \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                current_user::text",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| query_error(source, "cannot read the server's settings", e))?;
    let major = version / 10_000;
    Ok(vec![
        if version < 140_000 {
            Finding::fail(
                "version",
                format!("CDC needs PostgreSQL 14 or later (the server is {major})"),
                "upgrade the server, or read the tables with mode = \"incremental\"",
            )
        } else {
            Finding::ok("version", format!("PostgreSQL {major}"))
        },
        if wal_level == "logical" {
            Finding::ok("wal_level", "wal_level = logical")
        } else {
            Finding::fail(
                "wal_level",
                format!("the server has wal_level = {wal_level}; CDC needs wal_level = logical"),
                "ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL",
            )
        },
        if can_replicate {
            Finding::ok("replication", format!("user {user:?} may use replication"))
        } else {
            Finding::fail(
                "replication",
                format!("user {user:?} may not use replication"),
                format!(
                    "ALTER ROLE {} WITH REPLICATION",
                    quote_ident(SqlDialect::Postgres, &user)
                ),
            )
        },
    ])
}

/// Replication slots the server holds, and how many it allows
/// (`max_replication_slots`).
pub async fn slot_capacity(pool: &PgPool, source: &str) -> Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_replication_slots)::int8, \
                current_setting('max_replication_slots')::int8",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| query_error(source, "cannot count the replication slots", e))
}

/// Whether publication `name` exists.
pub async fn publication_exists(pool: &PgPool, source: &str, name: &str) -> Result<bool> {
    let found: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_publication WHERE pubname = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(|e| query_error(source, "cannot read pg_publication", e))?;
    Ok(found.is_some())
}

/// Makes sure the publication exists and holds every table in `tables`;
/// true when it had to be created.
pub async fn ensure_publication(
    pool: &PgPool,
    source: &str,
    publication: &str,
    tables: &[Table],
    inserts_only: bool,
) -> Result<bool> {
    let exists: Option<(bool,)> =
        sqlx::query_as("SELECT puballtables FROM pg_publication WHERE pubname = $1")
            .bind(publication)
            .fetch_optional(pool)
            .await
            .map_err(|e| query_error(source, "cannot read pg_publication", e))?;
    let list = |ts: &[&Table]| {
        ts.iter()
            .map(|t| t.quoted.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let advice = "the user must own the tables (or create the publication beforehand: \
                  CREATE PUBLICATION ... FOR TABLE ...)";
    match exists {
        None => {
            let all: Vec<&Table> = tables.iter().collect();
            let for_tables = if all.is_empty() {
                String::new()
            } else {
                format!(" FOR TABLE {}", list(&all))
            };
            let sql = format!(
                "CREATE PUBLICATION {}{for_tables}{}",
                quote_ident(SqlDialect::Postgres, publication),
                if inserts_only {
                    " WITH (publish = 'insert, truncate')"
                } else {
                    ""
                }
            );
            pool.execute(AssertSqlSafe(sql)).await.map_err(|e| {
                query_error(
                    source,
                    &format!("cannot create publication {publication:?}; {advice}"),
                    e,
                )
            })?;
            tracing::info!(source, publication, "created the publication");
            return Ok(true);
        }
        Some((true,)) => {}
        Some((false,)) => {
            let (ins, upd, del): (bool, bool, bool) = sqlx::query_as(
                "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = $1",
            )
            .bind(publication)
            .fetch_one(pool)
            .await
            .map_err(|e| query_error(source, "cannot read pg_publication", e))?;
            if !(ins && upd && del) {
                tracing::warn!(
                    source,
                    publication,
                    insert = ins,
                    update = upd,
                    delete = del,
                    "the publication does not publish every kind of change; the ones it leaves out are not captured"
                );
            }
            // Tables listed one by one or through FOR TABLES IN SCHEMA.
            let present: Vec<(String,)> = sqlx::query_as(
                "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables \
                 WHERE pubname = $1",
            )
            .bind(publication)
            .fetch_all(pool)
            .await
            .map_err(|e| query_error(source, "cannot read pg_publication_tables", e))?;
            let missing: Vec<&Table> = tables
                .iter()
                .filter(|t| !present.iter().any(|(n,)| *n == t.name))
                .collect();
            if !missing.is_empty() {
                let sql = format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(SqlDialect::Postgres, publication),
                    list(&missing)
                );
                pool.execute(AssertSqlSafe(sql)).await.map_err(|e| {
                    query_error(
                        source,
                        &format!("cannot add tables to publication {publication:?}; {advice}"),
                        e,
                    )
                })?;
                tracing::info!(source, publication, tables = %list(&missing), "added tables to the publication");
            }
        }
    }
    Ok(false)
}
