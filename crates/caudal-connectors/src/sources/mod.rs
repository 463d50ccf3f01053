//! Sources: where records come from.

pub mod cdc;
pub mod mysql_cdc;
pub mod postgres_cdc;
pub mod sql;
