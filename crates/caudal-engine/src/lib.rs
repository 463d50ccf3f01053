//! caudal-engine: schedules, runs and the daemon.
//!
//! A [`Pipeline`] owns a source, a sink and a schedule; [`Pipeline::run_once`]
//! is one run. [`daemon::run`] keeps every pipeline on its schedule until
//! shutdown. Leases ([`lease`]) make sure a pipeline never runs twice at
//! once, even across processes. [`workflow`] runs workflows: dependent
//! tasks, durable in the state store, executed by one process at a time.

pub mod aggregate;
pub mod alert;
pub mod backup;
pub mod batch;
pub mod buffered;
pub mod cluster;
pub mod crawl;
pub mod daemon;
pub mod deliverer;
pub mod delivery;
pub mod doctor;
pub mod lease;
pub mod maintenance;
pub mod ordering;
pub mod pipeline;
pub mod report;
pub mod retention;
pub mod schedule;
pub mod send;
pub mod sinks;
pub mod status;
pub mod workflow;

pub use pipeline::{Pipeline, Progress, RunSummary, Source, Trigger, load_checkpoint};
pub use report::Report;
pub use schedule::Schedule;
