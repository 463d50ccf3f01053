//! Sink state: the circuit breaker state each pipeline's delivery loop last
//! reported, so `caudal status` in another process can show it. Written on
//! every change; the store only keeps the value.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// A sink's circuit breaker state as last reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkState {
    /// `closed`, `open` or `half_open`.
    pub circuit: String,
    /// When it was reported (database clock).
    pub updated_at: Timestamp,
}

impl Store {
    /// Records the circuit breaker state of `pipeline`'s sink.
    pub async fn set_circuit_state(&self, pipeline: &str, circuit: &str) -> Result<()> {
        const SQL: &str = "INSERT INTO sink_states (pipeline, circuit, updated_at) \
             VALUES ($1, $2, (SELECT now_us FROM clock)) \
             ON CONFLICT (pipeline) DO UPDATE \
             SET circuit = excluded.circuit, updated_at = excluded.updated_at";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(pipeline)
                .bind(circuit)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| {
            store_error(
                format!("saving the circuit state of pipeline `{pipeline}`"),
                e,
            )
        })
    }

    /// The circuit breaker state last reported for `pipeline`'s sink.
    pub async fn circuit_state(&self, pipeline: &str) -> Result<Option<SinkState>> {
        const SQL: &str = "SELECT circuit, updated_at FROM sink_states WHERE pipeline = $1";
        let row: Option<(String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(pipeline)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| {
            store_error(
                format!("reading the circuit state of pipeline `{pipeline}`"),
                e,
            )
        })?;
        row.map(|(circuit, at)| {
            Ok(SinkState {
                circuit,
                updated_at: clock::from_db(at, "sink_states.updated_at")?,
            })
        })
        .transpose()
    }
}
