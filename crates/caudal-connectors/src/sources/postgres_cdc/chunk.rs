//! Reading a table in primary-key chunks: the snapshot and backfills.

use caudal_core::Result;
use caudal_core::config::{DecimalFormat, SqlDialect};
use caudal_core::record::CursorValue;
use sqlx::Postgres;

use super::catalog::{Table, query_error};
use super::reader::fetch_error;
use crate::sources::sql::postgres::{bind, decode_row};
use crate::sources::sql::quote_ident;

pub use crate::sources::change::ChunkRow as Row;

/// Reads up to `limit` rows of `table` after `after` (primary-key order),
/// matching `filter` if given; also says whether the chunk was full (more
/// may follow).
pub async fn read<'c, E>(
    executor: E,
    source: &str,
    table: &Table,
    filter: Option<&str>,
    after: Option<&[CursorValue]>,
    limit: usize,
    decimals: DecimalFormat,
) -> Result<(Vec<Row>, bool)>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|(k, _)| quote_ident(SqlDialect::Postgres, k))
        .collect();
    let order = keys.join(", ");
    let mut conditions = Vec::new();
    if let Some(f) = filter {
        conditions.push(format!("({f})"));
    }
    if after.is_some() {
        let params: Vec<String> = (1..=keys.len()).map(|i| format!("${i}")).collect();
        conditions.push(format!("({order}) > ({})", params.join(", ")));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT * FROM {}{filter} ORDER BY {order} LIMIT {limit}",
        table.quoted
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for v in after.into_iter().flatten() {
        q = bind(q, v).map_err(|e| fetch_error(source, e))?;
    }
    let rows = q
        .fetch_all(executor)
        .await
        .map_err(|e| query_error(source, &format!("reading {} failed", table.name), e))?;
    let full = rows.len() >= limit;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let data = decode_row(row, decimals).map_err(|e| fetch_error(source, e))?;
        out.push(Row::new(&table.name, &table.key, data)?);
    }
    Ok((out, full))
}
