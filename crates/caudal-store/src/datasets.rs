//! Datasets: which partitions each logical date of a report wrote, each
//! partition's generation, and a version per dataset that every commit
//! bumps.
//!
//! Promises:
//! - A date's record is replaced whole, in one transaction, after its
//!   partitions are committed in storage: the checkpoint of a report is
//!   the set of dates recorded here.
//! - Every change bumps the dataset's version, so a cache can tell in one
//!   read whether anything it holds may be stale.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// A partition written by a date's run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetPart {
    /// The partition's path.
    pub part: String,
    /// Its manifest's generation after the commit.
    pub generation: i64,
    /// Rows of the date in it.
    pub rows: i64,
    pub bytes: i64,
    pub files: i64,
}

/// A date a report wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetDate {
    pub logical_date: String,
    pub pipeline: String,
    pub run: String,
    pub rows: i64,
    pub parts: i64,
    pub committed_at: Timestamp,
}

/// A partition of a dataset, over all dates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSummary {
    pub part: String,
    pub generation: i64,
    pub rows: i64,
    pub bytes: i64,
    pub files: i64,
    pub first_date: String,
    pub last_date: String,
    pub committed_at: Timestamp,
}

/// A dataset's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetSummary {
    pub dataset: String,
    pub version: i64,
    pub partitions: i64,
    pub dates: i64,
    pub rows: i64,
    pub bytes: i64,
    pub first_date: Option<String>,
    pub last_date: Option<String>,
    pub committed_at: Option<Timestamp>,
}

type DateRow = (String, String, String, i64, i64, i64);
type PartRow = (String, i64, i64, i64, i64, String, String, i64);

impl Store {
    /// Records what `logical_date` of `dataset` wrote now (replacing what
    /// it wrote before): `parts` with their generations, and `touched`
    /// (partitions the date no longer writes, with their generation after
    /// the date's files left them, or `None` when the partition is gone).
    pub async fn record_dataset_date(
        &self,
        dataset: &str,
        logical_date: &str,
        pipeline: &str,
        run: &str,
        parts: &[DatasetPart],
        touched: &[(String, Option<i64>)],
    ) -> Result<()> {
        let rows: i64 = parts.iter().map(|p| p.rows).sum();
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO dataset_versions (dataset, version) VALUES ($1, 1) \
                     ON CONFLICT (dataset) DO UPDATE SET version = dataset_versions.version + 1",
                )
                .bind(dataset)
                .execute(&mut *tx)
                .await?;
                for table in ["dataset_parts", "dataset_pending"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {table} WHERE dataset = $1 AND logical_date = $2"
                    )))
                    .bind(dataset)
                    .bind(logical_date)
                    .execute(&mut *tx)
                    .await?;
                }
                for p in parts {
                    sqlx::query(
                        "INSERT INTO dataset_parts \
                         (dataset, part, logical_date, generation, rows, bytes, files, committed_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT now_us FROM clock))",
                    )
                    .bind(dataset)
                    .bind(&p.part)
                    .bind(logical_date)
                    .bind(p.generation)
                    .bind(p.rows)
                    .bind(p.bytes)
                    .bind(p.files)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE dataset_parts SET generation = $3 WHERE dataset = $1 AND part = $2",
                    )
                    .bind(dataset)
                    .bind(&p.part)
                    .bind(p.generation)
                    .execute(&mut *tx)
                    .await?;
                }
                for (part, generation) in touched {
                    match generation {
                        Some(g) => {
                            sqlx::query(
                                "UPDATE dataset_parts SET generation = $3 \
                                 WHERE dataset = $1 AND part = $2",
                            )
                            .bind(dataset)
                            .bind(part)
                            .bind(g)
                            .execute(&mut *tx)
                            .await?;
                        }
                        None => {
                            sqlx::query("DELETE FROM dataset_parts WHERE dataset = $1 AND part = $2")
                                .bind(dataset)
                                .bind(part)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                sqlx::query(
                    "INSERT INTO dataset_dates \
                     (dataset, logical_date, pipeline, run, rows, parts, committed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, (SELECT now_us FROM clock)) \
                     ON CONFLICT (dataset, logical_date) DO UPDATE SET pipeline = excluded.pipeline, \
                     run = excluded.run, rows = excluded.rows, parts = excluded.parts, \
                     committed_at = excluded.committed_at",
                )
                .bind(dataset)
                .bind(logical_date)
                .bind(pipeline)
                .bind(run)
                .bind(rows)
                .bind(i64::try_from(parts.len()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("recording {dataset} {logical_date}"), e))
    }

    /// Forgets `logical_date` of `dataset` (its partitions were deleted).
    pub async fn forget_dataset_date(&self, dataset: &str, logical_date: &str) -> Result<()> {
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO dataset_versions (dataset, version) VALUES ($1, 1) \
                     ON CONFLICT (dataset) DO UPDATE SET version = dataset_versions.version + 1",
                )
                .bind(dataset)
                .execute(&mut *tx)
                .await?;
                for table in ["dataset_parts", "dataset_dates", "dataset_pending"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {table} WHERE dataset = $1 AND logical_date = $2"
                    )))
                    .bind(dataset)
                    .bind(logical_date)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            }
            .await
        })
        .map_err(|e| store_error(format!("forgetting {dataset} {logical_date}"), e))
    }

    /// Notes that a run of `logical_date` is about to commit `parts`
    /// (kept until the date is recorded).
    pub async fn add_dataset_pending(
        &self,
        dataset: &str,
        logical_date: &str,
        parts: &[String],
    ) -> Result<()> {
        const SQL: &str = "INSERT INTO dataset_pending (dataset, logical_date, part) \
                           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for part in parts {
                    sqlx::query(SQL)
                        .bind(dataset)
                        .bind(logical_date)
                        .bind(part)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            }
            .await
        })
        .map_err(|e| {
            store_error(
                format!("noting the partitions of {dataset} {logical_date}"),
                e,
            )
        })
    }

    /// The partitions `logical_date` of `dataset` wrote, and those a run
    /// of it that did not finish may have committed.
    pub async fn dataset_date_parts(
        &self,
        dataset: &str,
        logical_date: &str,
    ) -> Result<Vec<String>> {
        const SQL: &str = "SELECT part FROM dataset_parts WHERE dataset = $1 AND logical_date = $2 \
                           UNION SELECT part FROM dataset_pending \
                           WHERE dataset = $1 AND logical_date = $2 ORDER BY part";
        with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(dataset)
                .bind(logical_date)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| {
            store_error(
                format!("reading the partitions of {dataset} {logical_date}"),
                e,
            )
        })
    }

    /// The dates `dataset` holds, oldest first.
    pub async fn dataset_dates(&self, dataset: &str) -> Result<Vec<DatasetDate>> {
        const SQL: &str = "SELECT logical_date, pipeline, run, rows, parts, committed_at \
                           FROM dataset_dates WHERE dataset = $1 ORDER BY logical_date";
        let rows: Vec<DateRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(dataset).fetch_all(pool).await
        })
        .map_err(|e| store_error(format!("reading the dates of {dataset}"), e))?;
        rows.into_iter()
            .map(|(logical_date, pipeline, run, rows, parts, at)| {
                Ok(DatasetDate {
                    logical_date,
                    pipeline,
                    run,
                    rows,
                    parts,
                    committed_at: clock::from_db(at, "dataset_dates.committed_at")?,
                })
            })
            .collect()
    }

    /// The partitions of `dataset`, by path.
    pub async fn dataset_partitions(&self, dataset: &str) -> Result<Vec<PartitionSummary>> {
        const SQL: &str = "SELECT part, MAX(generation), SUM(rows), SUM(bytes), SUM(files), \
                           MIN(logical_date), MAX(logical_date), MAX(committed_at) \
                           FROM dataset_parts WHERE dataset = $1 GROUP BY part ORDER BY part";
        let rows: Vec<PartRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(dataset).fetch_all(pool).await
        })
        .map_err(|e| store_error(format!("reading the partitions of {dataset}"), e))?;
        rows.into_iter()
            .map(|(part, generation, rows, bytes, files, first, last, at)| {
                Ok(PartitionSummary {
                    part,
                    generation,
                    rows,
                    bytes,
                    files,
                    first_date: first,
                    last_date: last,
                    committed_at: clock::from_db(at, "dataset_parts.committed_at")?,
                })
            })
            .collect()
    }

    /// The version of `dataset` (0 before its first commit).
    pub async fn dataset_version(&self, dataset: &str) -> Result<i64> {
        const SQL: &str = "SELECT version FROM dataset_versions WHERE dataset = $1";
        let v: Option<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(dataset)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading the version of {dataset}"), e))?;
        Ok(v.unwrap_or(0))
    }

    /// Every dataset the store knows of, with its figures.
    pub async fn dataset_summaries(&self) -> Result<Vec<DatasetSummary>> {
        const SQL: &str = "SELECT v.dataset, v.version, \
             (SELECT COUNT(DISTINCT part) FROM dataset_parts p WHERE p.dataset = v.dataset), \
             (SELECT COUNT(*) FROM dataset_dates d WHERE d.dataset = v.dataset), \
             (SELECT COALESCE(SUM(rows), 0) FROM dataset_parts p WHERE p.dataset = v.dataset), \
             (SELECT COALESCE(SUM(bytes), 0) FROM dataset_parts p WHERE p.dataset = v.dataset), \
             (SELECT MIN(logical_date) FROM dataset_dates d WHERE d.dataset = v.dataset), \
             (SELECT MAX(logical_date) FROM dataset_dates d WHERE d.dataset = v.dataset), \
             (SELECT MAX(committed_at) FROM dataset_dates d WHERE d.dataset = v.dataset) \
             FROM dataset_versions v ORDER BY v.dataset";
        type Row = (
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = with_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await)
            .map_err(|e| store_error("reading the datasets".into(), e))?;
        rows.into_iter()
            .map(
                |(dataset, version, partitions, dates, rows, bytes, first, last, at)| {
                    Ok(DatasetSummary {
                        dataset,
                        version,
                        partitions,
                        dates,
                        rows,
                        bytes,
                        first_date: first,
                        last_date: last,
                        committed_at: at
                            .map(|at| clock::from_db(at, "dataset_dates.committed_at"))
                            .transpose()?,
                    })
                },
            )
            .collect()
    }
}
