//! Reading a table in primary-key chunks: the snapshot and backfills.

use caudal_core::Result;
use caudal_core::config::{DecimalFormat, SqlDialect};
use caudal_core::record::CursorValue;
use serde_json::{Map, Value};
use sqlx::Postgres;

use super::catalog::{Table, query_error};
use super::reader::{entity_key, fetch_error};
use crate::sources::sql::postgres::{bind, decode_row};
use crate::sources::sql::quote_ident;

/// One row of a chunk.
pub struct Row {
    /// The primary key as typed values (where the next chunk starts).
    pub values: Vec<CursorValue>,
    /// The primary key columns.
    pub key: Map<String, Value>,
    /// The whole row.
    pub data: Map<String, Value>,
    /// `schema.table[key values]`.
    pub entity: String,
}

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
        let mut values = Vec::with_capacity(table.key.len());
        let mut key = Map::new();
        for (col, kind) in &table.key {
            let v = data.get(col).cloned().unwrap_or(Value::Null);
            values.push(kind.cursor_value(col, &v)?);
            key.insert(col.clone(), v);
        }
        out.push(Row {
            entity: entity_key(&table.name, &key),
            values,
            key,
            data,
        });
    }
    Ok((out, full))
}
