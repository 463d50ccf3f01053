//! Reading a table in key chunks: the snapshot and backfills.

use caudal_core::config::{DecimalFormat, SqlDialect};
use caudal_core::record::CursorValue;
use caudal_core::{Error, ErrorKind, Result};

use super::catalog::{Table, query_error};
use crate::sources::sql::mysql::{bind, decode_row};
use crate::sources::sql::{DecodeOptions, FetchError, keyset_predicate, quote_ident};

pub use crate::sources::change::ChunkRow as Row;

/// Reads up to `limit` rows of `table` after `after` (primary-key order),
/// matching `filter` if given; also says whether the chunk was full (more
/// may follow). JSON columns (MariaDB's checked LONGTEXT) come out as JSON.
pub async fn read(
    conn: &mut sqlx::MySqlConnection,
    source: &str,
    table: &Table,
    filter: Option<&str>,
    after: Option<&[CursorValue]>,
    limit: usize,
    decimals: DecimalFormat,
) -> Result<(Vec<Row>, bool)> {
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|(k, _)| quote_ident(SqlDialect::Mysql, k))
        .collect();
    let mut conditions = Vec::new();
    if let Some(f) = filter {
        conditions.push(format!("({f})"));
    }
    let mut binds = Vec::new();
    if after.is_some() {
        let mut n = 0;
        let (predicate, order) = keyset_predicate(SqlDialect::Mysql, &keys, &mut n);
        conditions.push(predicate);
        binds = order;
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let (list, opts) = columns(&mut *conn, source, table, decimals).await?;
    let sql = format!(
        "SELECT {list} FROM {}{filter} ORDER BY {} LIMIT {limit}",
        table.quoted,
        keys.join(", ")
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    if let Some(after) = after {
        for i in binds {
            let v = after.get(i).ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    "a chunk position has too few key values",
                )
            })?;
            q = bind(q, v).map_err(|e| fetch_error(source, e))?;
        }
    }
    let rows = q
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| query_error(source, &format!("reading {} failed", table.name), e))?;
    let full = rows.len() >= limit;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let data = decode_row(row, &opts).map_err(|e| fetch_error(source, e))?;
        out.push(Row::new(&table.name, &table.key, data)?);
    }
    Ok((out, full))
}

/// The select list of every column of `table` by name (`*` leaves
/// INVISIBLE ones out, the log has them), and how to decode its rows: JSON
/// columns (MariaDB's checked LONGTEXT) come out as JSON.
pub async fn columns(
    conn: &mut sqlx::MySqlConnection,
    source: &str,
    table: &Table,
    decimals: DecimalFormat,
) -> Result<(String, DecodeOptions)> {
    let failed = |e| {
        query_error(
            source,
            &format!("cannot read the columns of {}", table.name),
            e,
        )
    };
    let (schema, name) = table.name.split_once('.').unwrap_or(("", &table.name));
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed)?;
    let list = if columns.is_empty() {
        "*".to_string()
    } else {
        columns
            .iter()
            .map(|c| quote_ident(SqlDialect::Mysql, c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let json_columns = crate::sources::sql::mysql::json_columns_with(&mut *conn, &table.name)
        .await
        .map_err(failed)?;
    Ok((
        list,
        DecodeOptions {
            decimals,
            json_columns,
        },
    ))
}

pub(super) fn fetch_error(source: &str, e: FetchError) -> Error {
    match e {
        FetchError::Sql(e) => query_error(source, "snapshot query failed", e),
        FetchError::Decode(m) => Error::new(ErrorKind::Decode, format!("source {source:?}: {m}")),
    }
}
