//! Checkpoints: where each pipeline resumes. One per pipeline; the position
//! is opaque JSON that only the pipeline's source understands. Checkpoints
//! are written by [`Store::commit_progress`](crate::Store::commit_progress),
//! together with the run that produced them.

use caudal_core::Result;
use jiff::Timestamp;
use sqlx::types::Json;

use crate::leases::{FENCE_SQL, fenced_out};
use crate::{Fence, Store, clock, store_error};

/// A pipeline's saved position.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub pipeline: String,
    /// Opaque to the store; returned equal (as a JSON value) to what was saved.
    pub position: serde_json::Value,
    /// When the position was last saved (database clock).
    pub updated_at: Timestamp,
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    pipeline: String,
    position: Json<serde_json::Value>,
    updated_at: i64,
}

impl Store {
    /// The checkpoint of `pipeline`, or `None` if it has never committed
    /// progress (or its checkpoint was reset).
    pub async fn checkpoint(&self, pipeline: &str) -> Result<Option<Checkpoint>> {
        const SQL: &str =
            "SELECT pipeline, position, updated_at FROM checkpoints WHERE pipeline = $1";
        let row: Option<CheckpointRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(pipeline)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| {
            store_error(
                format!("reading the checkpoint of pipeline `{pipeline}`"),
                e,
            )
        })?;
        row.map(|row| {
            Ok(Checkpoint {
                pipeline: row.pipeline,
                position: row.position.0,
                updated_at: clock::from_db(row.updated_at, "checkpoints.updated_at")?,
            })
        })
        .transpose()
    }

    /// Forgets the checkpoint of `pipeline`, so its next run starts from the
    /// source's initial position. Returns whether there was one.
    pub async fn reset_checkpoint(&self, pipeline: &str) -> Result<bool> {
        const SQL: &str = "DELETE FROM checkpoints WHERE pipeline = $1";
        let result = with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| {
            store_error(
                format!("resetting the checkpoint of pipeline `{pipeline}`"),
                e,
            )
        })?;
        Ok(result > 0)
    }

    /// Saves `position` as the checkpoint of `pipeline`, outside any run:
    /// used when delivery (not intake) moves the checkpoint (`ack =
    /// "delivered"`), and when a restart finds records durable in the buffer
    /// past the saved checkpoint.
    pub async fn save_checkpoint(
        &self,
        pipeline: &str,
        position: &serde_json::Value,
    ) -> Result<()> {
        self.save_checkpoint_fenced(pipeline, position, None).await
    }

    /// As [`save_checkpoint`](Self::save_checkpoint), and with a `fence`
    /// only while the fence holds: a node that lost the pipeline (paused,
    /// cut off from the store) fails with [`ErrorKind::Busy`], saving
    /// nothing, instead of moving back the new owner's checkpoint.
    pub async fn save_checkpoint_fenced(
        &self,
        pipeline: &str,
        position: &serde_json::Value,
        fence: Option<&Fence>,
    ) -> Result<()> {
        const SQL: &str = "INSERT INTO checkpoints (pipeline, position, updated_at) \
             VALUES ($1, $2, (SELECT now_us FROM clock)) \
             ON CONFLICT (pipeline) DO UPDATE \
             SET position = excluded.position, updated_at = excluded.updated_at";
        let saved = with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                if let Some(f) = fence {
                    let held = sqlx::query(FENCE_SQL)
                        .bind(&f.lease)
                        .bind(&f.holder)
                        .bind(f.token)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if held == 0 {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                }
                sqlx::query(SQL)
                    .bind(pipeline)
                    .bind(sqlx::types::Json(position))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            }
            .await
        })
        .map_err(|e| store_error(format!("saving the checkpoint of pipeline `{pipeline}`"), e))?;
        match (saved, fence) {
            (false, Some(f)) => Err(fenced_out(
                f,
                &format!("saving the checkpoint of pipeline `{pipeline}`"),
            )),
            _ => Ok(()),
        }
    }
}
