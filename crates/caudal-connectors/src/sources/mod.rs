//! Sources: where records come from.

pub mod postgres_cdc;
pub mod sql;
