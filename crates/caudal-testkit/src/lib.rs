//! Test utilities shared by the integration tests of every caudal crate.
//!
//! - [`Receiver`]: a real HTTP server on loopback that records what a sink
//!   sends and answers as the test says (statuses, `Retry-After`, delays,
//!   connection resets, stop and restart on the same port).
//! - [`pg_database`], [`mysql_database`], [`sqlite_database`]: a fresh
//!   database per test, dropped again with its [`TestDb`], so tests run in
//!   parallel against real servers.
//! - [`Site`]: a generated real-estate website on loopback, with an access
//!   log, for the crawler's tests and benchmark (also the `caudal-site`
//!   binary).
//! - [`S3`]: moto's S3 server on loopback, one per test, for the datasets
//!   sinks (a real S3 API; helpers to create buckets and list and read
//!   objects).
//! - [`Proxy`]: a TCP proxy in front of a real server that a test can cut
//!   (every connection closed at once) or pause, for broker faults.
//! - [`python()`], [`run_python`]: the benchmarks' Python (`bench/venv`), whose
//!   pyarrow and DuckDB read caudal's Parquet back as independent readers.
//!
//! Everything here panics on setup failure with a message saying what to do:
//! a test whose server is missing fails, it never skips.
//!
//! ```no_run
//! use std::time::Duration;
//! use caudal_testkit::{Receiver, pg_database};
//!
//! # async fn example() {
//! let receiver = Receiver::start().await;
//! receiver.fail_next(2, 503);
//! let db = pg_database().await;
//! // ... run a sync from db.url() to receiver.url("/ingest") ...
//! assert!(receiver.wait_for_accepted_records("/requests", 10, Duration::from_secs(10)).await);
//! # }
//! ```

#![warn(missing_docs)]

pub mod database;
pub mod proxy;
pub mod python;
pub mod receiver;
pub mod s3;
pub mod site;

pub use database::{
    DbKind, TestDb, mysql_database, mysql_database_at, pg_database, pg_database_at, sqlite_database,
};
pub use proxy::Proxy;
pub use python::{python, run_python};
pub use receiver::{Behaviour, ReceivedRequest, Receiver, Reply};
pub use s3::S3;
pub use site::{Access, Detail, Site, SiteOptions, SiteSummary, detail};
