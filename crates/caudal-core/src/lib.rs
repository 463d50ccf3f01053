//! caudal-core: the vocabulary every other crate speaks.
//!
//! It holds the record model, the configuration model (with its loader and
//! validation), the error type whose kind drives retry decisions, and the
//! small traits that sources and sinks implement. It depends on no database,
//! network or runtime crate, so every other crate can depend on it cheaply.

pub mod alert;
pub mod config;
pub mod dataset;
pub mod delivery;
pub mod error;
pub mod probe;
pub mod process;
pub mod record;
pub mod sink;
pub mod status;
pub mod units;
pub mod workflow;

pub use error::{Error, ErrorKind, Result};
