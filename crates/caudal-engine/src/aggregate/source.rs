//! A live aggregate's closed windows as a pipeline's source (`type =
//! "aggregate"`), so that final figures flow on to any sink with the same
//! delivery guarantees as any other records.
//!
//! Promises:
//! - Every closed window is read once, in the order its commits wrote
//!   them; a window that receives a late change after it closed is read
//!   again with its new `late` count (same key: `start|group`). The
//!   checkpoint is the last window read (`seq`, start, group), so a run
//!   picks up exactly where the last delivered one stopped.
//! - A record is the window as the live API shows it, with its aggregate:
//!   `{"aggregate", "start", "end", "group", "rows", "late", "metrics"}`.

use std::sync::Arc;

use caudal_core::config::{AggregateSourceConfig, Config};
use caudal_core::record::{CursorValue, Json, Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;
use serde_json::json;

use super::{Spec, WindowView};

/// The closed windows of one aggregate.
#[derive(Clone, Debug)]
pub struct WindowsSource {
    spec: Arc<Spec>,
    store: Store,
    page_size: i64,
}

impl WindowsSource {
    pub fn new(config: &Config, source: &AggregateSourceConfig, store: Store) -> Result<Self> {
        Ok(Self {
            spec: Arc::new(Spec::build(&source.aggregate, config)?),
            store,
            page_size: i64::from(source.page_size.max(1)),
        })
    }

    /// Reads from just past `from` (a checkpoint of this source) to the
    /// latest closed window.
    pub fn open_run(&self, from: Option<&Position>) -> Result<WindowsReader> {
        let after = match from {
            None => None,
            Some(Position::Cursor { values }) => match values.as_slice() {
                [
                    CursorValue::Int(seq),
                    CursorValue::Int(start),
                    CursorValue::Text(group),
                ] => Some((*seq, *start, group.clone())),
                _ => return Err(foreign(&self.spec.name)),
            },
            Some(_) => return Err(foreign(&self.spec.name)),
        };
        Ok(WindowsReader {
            source: self.clone(),
            after,
            done: false,
        })
    }
}

fn foreign(aggregate: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "the checkpoint is not a position of aggregate {aggregate:?}'s windows (the source changed?); reset it with `caudal checkpoint reset PIPELINE`"
        ),
    )
}

/// One run's reader.
#[derive(Debug)]
pub struct WindowsReader {
    source: WindowsSource,
    after: Option<(i64, i64, String)>,
    done: bool,
}

impl WindowsReader {
    /// The next page of closed windows; `None` once none is left.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        if self.done {
            return Ok(None);
        }
        let spec = &self.source.spec;
        let after = self.after.as_ref().map(|(s, w, g)| (*s, *w, g.as_str()));
        let rows = self
            .source
            .store
            .closed_windows_after(&spec.name, after, self.source.page_size)
            .await?;
        if rows.len() < usize::try_from(self.source.page_size).unwrap_or(usize::MAX) {
            self.done = true;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let view = WindowView::of_row(spec, &row);
            let data = json!({
                "aggregate": spec.name,
                "start": view.start,
                "end": view.end,
                "group": view.group,
                "rows": view.rows,
                "late": view.late,
                "metrics": view.metrics,
            });
            let serde_json::Value::Object(map) = data else {
                continue;
            };
            records.push(Record {
                data: Json::from_map(&map),
                position: Position::Cursor {
                    values: vec![
                        CursorValue::Int(row.seq),
                        CursorValue::Int(row.start),
                        CursorValue::Text(row.group.clone()),
                    ],
                },
                key: Some(format!("{}|{}", view.start, row.group)),
            });
            self.after = Some((row.seq, row.start, row.group));
        }
        Ok(Some(records))
    }
}
