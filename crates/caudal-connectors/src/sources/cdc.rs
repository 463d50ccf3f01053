//! Change data capture sources: [`CdcSource`] is the one a configuration
//! names, behind the dialect-neutral [`ChangeCapture`] interface. The
//! model every CDC source shares (changes, reader handle, figures,
//! backfill requests) is in [`crate::sources::change`], below the sources.
//!
//! Each database's capture is a cargo feature (`postgres-cdc`, `mysql`);
//! a configuration naming one this build lacks is refused with the
//! feature's name.

use std::sync::Arc;

use caudal_core::config::{SourceConfig, SqlDialect};
use caudal_core::{Error, ErrorKind, Result};

pub use crate::sources::change::{
    BackfillProgress, BackfillRequest, BackfillRequests, CdcReader, ChangeCapture, Durable, Held,
    Released,
};

/// The CDC source of a pipeline. Cheap to clone; dereferences to its
/// [`ChangeCapture`].
#[derive(Clone, Debug)]
pub struct CdcSource(Arc<dyn ChangeCapture>);

impl std::ops::Deref for CdcSource {
    type Target = dyn ChangeCapture;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

impl CdcSource {
    /// Prepares the CDC source `name` of `pipeline` (nothing is queried
    /// until a run opens).
    pub async fn connect(pipeline: &str, name: &str, config: &SourceConfig) -> Result<Self> {
        Self::connect_with(pipeline, name, config, false).await
    }

    /// As [`connect`](Self::connect); with `exact_snapshot`, an interrupted
    /// PostgreSQL snapshot starts over from a new slot rather than reading
    /// on at the current state (for live aggregates, which count rows).
    pub async fn connect_with(
        pipeline: &str,
        name: &str,
        config: &SourceConfig,
        exact_snapshot: bool,
    ) -> Result<Self> {
        let _ = exact_snapshot;
        let Some(sql) = config.sql() else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("source {name:?} is not a database: it has no log to capture"),
            ));
        };
        let _ = (pipeline, sql);
        match config.dialect() {
            #[cfg(feature = "postgres-cdc")]
            Some(SqlDialect::Postgres) => Ok(Self(Arc::new({
                let source =
                    crate::sources::postgres_cdc::PgCdcSource::connect(pipeline, name, sql).await?;
                if exact_snapshot {
                    source.with_exact_snapshot()
                } else {
                    source
                }
            }))),
            #[cfg(feature = "mysql")]
            Some(SqlDialect::Mysql) => Ok(Self(Arc::new(
                crate::sources::mysql_cdc::MyCdcSource::connect(pipeline, name, sql).await?,
            ))),
            #[allow(unreachable_patterns)]
            other => Err(unsupported(name, other.unwrap_or(SqlDialect::Sqlite))),
        }
    }
}

/// Why this build cannot capture changes from `dialect`.
fn unsupported(source: &str, dialect: SqlDialect) -> Error {
    let why = match dialect {
        SqlDialect::Postgres => {
            "this caudal was built without PostgreSQL change data capture (cargo feature `postgres-cdc`)"
        }
        SqlDialect::Mysql => {
            "this caudal was built without MySQL/MariaDB support (cargo feature `mysql`)"
        }
        SqlDialect::Sqlite => "mode = \"cdc\" is not supported for sqlite sources",
    };
    Error::new(ErrorKind::Config, format!("source {source:?}: {why}"))
}
