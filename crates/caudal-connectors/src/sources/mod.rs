//! Sources: where records come from.

pub mod broker;
pub mod cdc;
pub mod change;
#[cfg(feature = "mysql")]
pub mod mysql_cdc;
#[cfg(feature = "postgres-cdc")]
pub mod postgres_cdc;
pub mod sql;
