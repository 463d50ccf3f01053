//! Source state: what a pipeline's source last reported about itself while
//! capturing (a CDC source's replication lag and positions), so `caudal
//! status` in another process can show it. The store keeps the latest
//! JSON object only.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// A source's state as last reported.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceState {
    /// The source's own fields (a JSON object).
    pub state: serde_json::Value,
    /// When it was reported (database clock).
    pub updated_at: Timestamp,
}

impl Store {
    /// Records the state of `pipeline`'s source.
    pub async fn set_source_state(&self, pipeline: &str, state: &serde_json::Value) -> Result<()> {
        const SQL: &str = "INSERT INTO source_states (pipeline, state, updated_at) \
             VALUES ($1, $2, (SELECT now_us FROM clock)) \
             ON CONFLICT (pipeline) DO UPDATE \
             SET state = excluded.state, updated_at = excluded.updated_at";
        let text = state.to_string();
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .bind(&text)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| {
            store_error(
                format!("saving the source state of pipeline `{pipeline}`"),
                e,
            )
        })
    }

    /// The state last reported by `pipeline`'s source.
    pub async fn source_state(&self, pipeline: &str) -> Result<Option<SourceState>> {
        const SQL: &str = "SELECT state, updated_at FROM source_states WHERE pipeline = $1";
        let row: Option<(String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(pipeline)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| {
            store_error(
                format!("reading the source state of pipeline `{pipeline}`"),
                e,
            )
        })?;
        row.map(|(text, at)| {
            Ok(SourceState {
                state: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                updated_at: clock::from_db(at, "source_states.updated_at")?,
            })
        })
        .transpose()
    }

    /// Every source state whose name starts with `prefix`, by name.
    pub async fn source_states_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, SourceState)>> {
        const SQL: &str = "SELECT pipeline, state, updated_at FROM source_states \
             WHERE substr(pipeline, 1, length($1)) = $1 ORDER BY pipeline";
        let rows: Vec<(String, String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(prefix).fetch_all(pool).await
        })
        .map_err(|e| store_error(format!("listing source states under `{prefix}`"), e))?;
        rows.into_iter()
            .map(|(name, text, at)| {
                Ok((
                    name,
                    SourceState {
                        state: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                        updated_at: clock::from_db(at, "source_states.updated_at")?,
                    },
                ))
            })
            .collect()
    }

    /// Forgets the state of `pipeline`'s source.
    pub async fn clear_source_state(&self, pipeline: &str) -> Result<()> {
        const SQL: &str = "DELETE FROM source_states WHERE pipeline = $1";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| {
            store_error(
                format!("clearing the source state of pipeline `{pipeline}`"),
                e,
            )
        })
    }
}
