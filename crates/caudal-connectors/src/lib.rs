//! caudal-connectors: the sources records come from and the sinks they go to.
//!
//! Every connector has the same shape: its configuration lives in
//! `caudal_core::config`, its runtime type here, its tests beside it or in
//! `tests/`. Connectors never retry on their own: they report what happened
//! and the engine decides (see `caudal_core::error::Decision`).

pub mod broker;
#[cfg(feature = "crawl")]
pub mod crawl;
#[doc(hidden)]
pub mod fuzzing;
pub mod sinks;
pub mod sources;
