//! The `files` sink: a pipeline's rows as partitioned Parquet or JSON Lines
//! files on a local disk or S3-compatible object storage, with a manifest
//! per partition, and the reader the query API uses.
//!
//! Promises:
//! - **Exactly once per partition.** A run stages its files out of sight,
//!   then commits partition by partition ([`commit`]): a reader following
//!   the manifests sees a partition's old complete content or its new
//!   complete content, never a mix and never a partial file.
//! - **Replace, not append.** A re-run of a logical date replaces that
//!   date's files and nothing else.
//! - **Exact types** ([`columns`]): decimals with every digit, timestamps
//!   to the microsecond, NULL as NULL.
//! - Manifests record files, row counts, per-file min/max of key columns,
//!   and the source position (pipeline, logical date, run, query hash).

pub mod columns;
pub mod commit;
pub mod location;
pub mod reader;
pub mod writer;

pub use commit::{Committed, commit_partition, drop_partition, manifest_path, read_manifest};
pub use location::Location;
pub use reader::{Filter, Page, Resume, RowQuery, manifests, partition_may_match, read_rows};
pub use writer::{RunSpec, RunWriter, StagedPartition};
