//! Row events decoded into changes.

use super::*;

impl Task {
    pub(super) fn rows(&self, st: &mut Stream, rows: &RowsEventData<'_>) -> Result<()> {
        let id = rows.table_id();
        let Some(Some(shape)) = st.shapes.get(&id).cloned() else {
            return Ok(());
        };
        let Some(table) = self.tables.iter().find(|t| t.name == shape.table) else {
            return Ok(());
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => "insert",
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => "update",
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => "delete",
        };
        if st.txn.as_ref().is_some_and(|t| t.xa) {
            return Err(self.unsupported(st, XA_UNSUPPORTED));
        }
        let Some(mut txn) = st.txn.clone() else {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: a row event at {}:{} outside a transaction",
                    self.source, st.file, st.next
                ),
            ));
        };
        let fail = |e: String| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "source {:?}: cannot decode a change at {}:{}: {e}",
                    self.source, txn.file, txn.pos
                ),
            )
        };
        let images = decode::images(&shape, rows, self.decimals, &table.key).map_err(fail)?;
        for (before, mut after) in images {
            // A minimal after image leaves out the key when it did not
            // change: it is the before image's.
            if let (Some(old), Some(new)) = (&before, &mut after) {
                for (k, _) in &table.key {
                    if !new.key.contains_key(k)
                        && let Some(v) = old.key.get(k)
                    {
                        new.row.key(k).value(v);
                        new.key.insert(k.clone(), v.clone());
                        new.missing.retain(|m| m != k);
                    }
                }
            }
            let key_of = |image: &decode::Image| -> Map<String, Value> {
                table
                    .key
                    .iter()
                    .map(|(k, _)| (k.clone(), image.key.get(k).cloned().unwrap_or(Value::Null)))
                    .collect()
            };
            let old_key = before.as_ref().map(key_of);
            let new_key = after.as_ref().map(key_of);
            let changes: Vec<(&str, Map<String, Value>, Option<_>, Option<_>)> =
                match (op, old_key, new_key) {
                    ("update", Some(old), Some(new)) if old != new => {
                        vec![("delete", old, before, None), ("insert", new, None, after)]
                    }
                    (_, old, new) => {
                        let key = new.or(old).unwrap_or_default();
                        vec![(op, key, before, after)]
                    }
                };
            for (op, key, before, after) in changes {
                let index = txn.index;
                txn.index += 1;
                let (after, unchanged) = match after {
                    Some(image) => (Some(Row::Encoded(image.row.finish())), image.missing),
                    None => (None, Vec::new()),
                };
                let change = Change {
                    op,
                    table: table.name.clone(),
                    key,
                    unchanged,
                    before: before.map(|image| Row::Encoded(image.row.finish())),
                    after,
                };
                st.push(&change, &txn, index);
            }
        }
        txn.captured = true;
        st.txn = Some(txn);
        Ok(())
    }
}
