//! Sources: where records come from.

pub mod sql;
