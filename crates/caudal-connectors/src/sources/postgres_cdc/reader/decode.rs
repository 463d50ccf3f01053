//! Decoding the stream's tuples: relations as the stream describes them,
//! rows as JSON values by their real column types, the old row of updates
//! and deletes as the replica identity gives it, and the key columns that
//! order a table's changes (none for a table without a key).

use super::*;
use caudal_core::record::{Json, ObjectWriter};

/// A relation (table) as the stream described it last.
pub(super) struct Relation {
    pub(super) table: String,
    pub(super) columns: Vec<(String, u32)>,
    pub(super) types: Vec<Arc<PgTypeInfo>>,
    pub(super) key: Vec<String>,
    /// The replica identity columns (what an old key tuple carries).
    pub(super) identity: Vec<String>,
}

impl Task {
    pub(super) fn relation<'a>(&self, s: &'a Session, id: u32) -> Result<&'a Relation> {
        s.relations.get(&id).ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a change refers to relation {id}, which the stream never described",
                    self.source
                ),
            )
        })
    }

    /// The old row of an update or delete. With the default replica
    /// identity PostgreSQL sends only the key columns (the others as NULL,
    /// which they are not): `before` then holds the key columns only.
    pub(super) fn old(
        &self,
        rel: &Relation,
        tuple: &TupleData,
        key_only: bool,
    ) -> Result<Map<String, Value>> {
        let (mut row, _) = self.tuple(rel, tuple)?;
        if key_only {
            row.retain(|k, _| rel.identity.contains(k));
        }
        Ok(row)
    }

    /// A tuple as a row object, and the columns left out as unchanged
    /// TOAST values.
    pub(super) fn tuple(
        &self,
        rel: &Relation,
        tuple: &TupleData,
    ) -> Result<(Map<String, Value>, Vec<String>)> {
        let mut row = Map::with_capacity(rel.columns.len());
        let unchanged = self.columns(rel, tuple, |name, v| {
            row.insert(name.to_string(), v);
        })?;
        Ok((row, unchanged))
    }

    /// As [`Task::tuple`], writing the row's JSON as it decodes (no map of
    /// it is built): how inserts and most updates are read.
    pub(super) fn encode_tuple(&self, rel: &Relation, tuple: &TupleData) -> Result<Encoded> {
        let mut row = ObjectWriter::with_capacity(rel.columns.len() * 24);
        let mut key = Map::with_capacity(rel.key.len());
        let unchanged = self.columns(rel, tuple, |name, v| {
            row.key(name).value(&v);
            if rel.key.iter().any(|k| k == name) {
                key.insert(name.to_string(), v);
            }
        })?;
        // Key columns in key order, as `key_of` gives them.
        let key = rel
            .key
            .iter()
            .map(|k| (k.clone(), key.remove(k).unwrap_or(Value::Null)))
            .collect();
        Ok(Encoded {
            row: row.finish(),
            key,
            unchanged,
        })
    }

    /// Decodes a tuple's columns in order, handing each present one to
    /// `each`; returns the columns left out as unchanged TOAST values.
    fn columns(
        &self,
        rel: &Relation,
        tuple: &TupleData,
        mut each: impl FnMut(&str, Value),
    ) -> Result<Vec<String>> {
        let mut unchanged = Vec::new();
        for (i, ((name, _), ty)) in rel.columns.iter().zip(&rel.types).enumerate() {
            let Some(col) = tuple.get_column(i) else {
                break;
            };
            let value = column_value(col, ty, self.decimals).map_err(|e| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "source {:?}: table {}, column {name:?} of type {}: {e}",
                        self.source,
                        rel.table,
                        sqlx::TypeInfo::name(ty.as_ref())
                    ),
                )
            })?;
            match value {
                Some(v) => each(name, v),
                None => unchanged.push(name.clone()),
            }
        }
        Ok(unchanged)
    }
}

/// A tuple written straight into its JSON text, with its key columns'
/// values and the columns left out as unchanged TOAST values.
pub(super) struct Encoded {
    pub(super) row: Json,
    pub(super) key: Map<String, Value>,
    pub(super) unchanged: Vec<String>,
}

pub(super) fn key_of(rel: &Relation, row: &Map<String, Value>) -> Map<String, Value> {
    rel.key
        .iter()
        .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// One column of a tuple: `None` for an unchanged TOAST value.
pub(super) fn column_value(
    col: &ColumnData,
    ty: &PgTypeInfo,
    decimals: DecimalFormat,
) -> std::result::Result<Option<Value>, String> {
    if col.is_unchanged() {
        return Ok(None);
    }
    if col.is_null() {
        return Ok(Some(Value::Null));
    }
    if col.is_binary() {
        return binary_value(ty, col.as_bytes(), decimals).map(Some);
    }
    std::str::from_utf8(col.as_bytes())
        .map(|s| Some(Value::String(s.to_string())))
        .map_err(|e| format!("invalid UTF-8: {e}"))
}
