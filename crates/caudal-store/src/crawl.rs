//! Crawl frontiers: every URL a crawl knows, and what became of it.
//!
//! Promises:
//! - **Resumable.** A frontier whose crawl did not finish is resumed by the
//!   next [`Store::open_frontier`]: pages left `fetching` by a process that
//!   died are queued again, pages `done` are never fetched again in the
//!   same generation.
//! - **Generations.** A finished frontier opened again starts the next
//!   generation: every known page is queued again with its ETag and
//!   Last-Modified kept, so the crawler asks only for what changed.
//! - **One transaction per save.** [`Store::save_crawl_progress`] adds the
//!   links found and records the pages finished together: a page is never
//!   `done` without the links it led to.
//! - A URL is known once per frontier (`UNIQUE (frontier, url)`): a link
//!   found twice is queued once.

use caudal_core::Result;
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// Every state a page can be in.
pub const PAGE_STATES: &[&str] = &[
    "queued",
    "fetching",
    "done",
    "unchanged",
    "failed",
    "skipped",
];

/// Rows per multi-row statement (well below both databases' bind limits).
const ROWS_PER_STATEMENT: usize = 500;

/// A frontier opened for a crawl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenedFrontier {
    pub generation: i64,
    /// Whether an unfinished crawl of this generation is resumed.
    pub resumed: bool,
    /// Pages of the generation already fetched (not queued).
    pub fetched: u64,
}

/// A URL to add to a frontier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPage {
    pub url: String,
    pub depth: u32,
}

/// A page claimed for fetching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedPage {
    pub url: String,
    pub depth: u32,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// How a page ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedPage {
    pub url: String,
    /// `done`, `unchanged` (a 304), `failed` or `skipped`.
    pub state: &'static str,
    pub attempts: u32,
    pub status: Option<u16>,
    pub kind: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub error: Option<String>,
    pub fetched_at: Option<Timestamp>,
}

/// A page as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRow {
    pub url: String,
    pub generation: i64,
    pub state: String,
    pub depth: u32,
    pub attempts: u32,
    pub status: Option<u16>,
    pub kind: Option<String>,
    pub error: Option<String>,
    pub fetched_at: Option<Timestamp>,
}

/// A frontier's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontierSummary {
    pub name: String,
    pub generation: i64,
    /// `crawling` or `finished`.
    pub state: String,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    /// Pages by state, e.g. `[("done", 120), ("queued", 30)]`.
    pub pages: Vec<(String, u64)>,
}

impl Store {
    /// Opens frontier `name`: resumes its crawl if one is unfinished
    /// (pages left `fetching` are queued again), or starts the next
    /// generation (every known page queued again).
    pub async fn open_frontier(&self, name: &str) -> Result<OpenedFrontier> {
        let now = clock::to_db(Timestamp::now());
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                // Written first, so SQLite takes its write lock at once
                // rather than failing to upgrade a read lock later.
                sqlx::query("UPDATE crawl_frontiers SET name = name WHERE name = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                let current: Option<(i64, String)> =
                    sqlx::query_as("SELECT generation, state FROM crawl_frontiers WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&mut *tx)
                        .await?;
                let (generation, resumed) = match current {
                    Some((g, state)) if state == "crawling" => {
                        sqlx::query(
                            "UPDATE crawl_pages SET state = 'queued' \
                             WHERE frontier = $1 AND state = 'fetching'",
                        )
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                        (g, true)
                    }
                    Some((g, _)) => {
                        sqlx::query(
                            "UPDATE crawl_frontiers SET generation = $2, state = 'crawling', \
                             started_at = $3, ended_at = NULL WHERE name = $1",
                        )
                        .bind(name)
                        .bind(g + 1)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        sqlx::query(
                            "UPDATE crawl_pages SET state = 'queued', generation = $2, \
                             attempts = 0, error = NULL WHERE frontier = $1",
                        )
                        .bind(name)
                        .bind(g + 1)
                        .execute(&mut *tx)
                        .await?;
                        (g + 1, false)
                    }
                    None => {
                        sqlx::query(
                            "INSERT INTO crawl_frontiers (name, generation, state, started_at) \
                             VALUES ($1, 1, 'crawling', $2)",
                        )
                        .bind(name)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        (1, false)
                    }
                };
                let (fetched,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM crawl_pages WHERE frontier = $1 AND state <> 'queued'",
                )
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(OpenedFrontier {
                    generation,
                    resumed,
                    fetched: u64::try_from(fetched).unwrap_or(0),
                })
            }
            .await
        })
        .map_err(|e| store_error(format!("opening crawl frontier {name:?}"), e))
    }

    /// Every URL frontier `name` knows (for de-duplication in memory).
    pub async fn frontier_urls(&self, name: &str) -> Result<Vec<String>> {
        with_pool!(self, |pool| {
            sqlx::query_scalar("SELECT url FROM crawl_pages WHERE frontier = $1")
                .bind(name)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading crawl frontier {name:?}"), e))
    }

    /// Marks up to `limit` queued pages `fetching` and returns them,
    /// shallowest first, then in the order they were found.
    pub async fn claim_pages(&self, name: &str, limit: u32) -> Result<Vec<ClaimedPage>> {
        let sql = "UPDATE crawl_pages SET state = 'fetching' WHERE id IN (\
                   SELECT id FROM crawl_pages WHERE frontier = $1 AND state = 'queued' \
                   ORDER BY depth, id LIMIT $2) \
                   RETURNING id, url, depth, etag, last_modified";
        type Row = (i64, String, i64, Option<String>, Option<String>);
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(name)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error(format!("claiming pages of crawl frontier {name:?}"), e))?;
        let mut rows = rows;
        // RETURNING does not keep the subquery's order.
        rows.sort_by_key(|r| (r.2, r.0));
        Ok(rows
            .into_iter()
            .map(|(_, url, depth, etag, last_modified)| ClaimedPage {
                url,
                depth: u32::try_from(depth).unwrap_or(u32::MAX),
                etag,
                last_modified,
            })
            .collect())
    }

    /// In one transaction: adds `found` (links not known yet; known ones
    /// are left as they are) to the generation's queue and records
    /// `finished` pages.
    pub async fn save_crawl_progress(
        &self,
        name: &str,
        generation: i64,
        found: &[NewPage],
        finished: &[FinishedPage],
    ) -> Result<()> {
        if found.is_empty() && finished.is_empty() {
            return Ok(());
        }
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for chunk in found.chunks(ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::new(
                        "INSERT INTO crawl_pages (frontier, url, generation, state, depth) ",
                    );
                    q.push_values(chunk, |mut b, p| {
                        b.push_bind(name)
                            .push_bind(&p.url)
                            .push_bind(generation)
                            .push_bind("queued")
                            .push_bind(i64::from(p.depth));
                    });
                    q.push(" ON CONFLICT (frontier, url) DO NOTHING");
                    q.build().execute(&mut *tx).await?;
                }
                for chunk in finished.chunks(ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::new(
                        "INSERT INTO crawl_pages (frontier, url, generation, state, depth, \
                         attempts, status, kind, etag, last_modified, error, fetched_at) ",
                    );
                    q.push_values(chunk, |mut b, p| {
                        b.push_bind(name)
                            .push_bind(&p.url)
                            .push_bind(generation)
                            .push_bind(p.state)
                            .push_bind(0_i64)
                            .push_bind(i64::from(p.attempts))
                            .push_bind(p.status.map(i64::from))
                            .push_bind(&p.kind)
                            .push_bind(&p.etag)
                            .push_bind(&p.last_modified)
                            .push_bind(&p.error)
                            .push_bind(p.fetched_at.map(clock::to_db));
                    });
                    // A 304 keeps the validators it was asked with.
                    q.push(
                        " ON CONFLICT (frontier, url) DO UPDATE SET state = excluded.state, \
                         attempts = excluded.attempts, status = excluded.status, \
                         kind = COALESCE(excluded.kind, crawl_pages.kind), \
                         etag = CASE WHEN excluded.state = 'unchanged' THEN crawl_pages.etag \
                                ELSE excluded.etag END, \
                         last_modified = CASE WHEN excluded.state = 'unchanged' \
                                THEN crawl_pages.last_modified ELSE excluded.last_modified END, \
                         error = excluded.error, fetched_at = excluded.fetched_at",
                    );
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(())
            }
            .await
        })
        .map_err(|e| store_error(format!("saving crawl frontier {name:?}"), e))
    }

    /// Marks frontier `name`'s generation finished (the next open starts a
    /// new one).
    pub async fn finish_frontier(&self, name: &str, generation: i64) -> Result<()> {
        let now = clock::to_db(Timestamp::now());
        with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE crawl_frontiers SET state = 'finished', ended_at = $3 \
                 WHERE name = $1 AND generation = $2",
            )
            .bind(name)
            .bind(generation)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| store_error(format!("finishing crawl frontier {name:?}"), e))?;
        Ok(())
    }

    /// Every frontier (or those whose name starts with `prefix`, exactly:
    /// no pattern characters) with its pages counted by state.
    pub async fn frontiers(&self, prefix: Option<&str>) -> Result<Vec<FrontierSummary>> {
        let prefix = prefix.unwrap_or("");
        let heads: Vec<(String, i64, String, i64, Option<i64>)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT name, generation, state, started_at, ended_at FROM crawl_frontiers \
                 WHERE substr(name, 1, length($1)) = $1 ORDER BY name",
            )
            .bind(prefix)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("listing crawl frontiers".into(), e))?;
        // Counted per frontier, each through the (frontier, state) index.
        let counts: Vec<(String, String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT p.frontier, p.state, COUNT(*) FROM crawl_frontiers f \
                 JOIN crawl_pages p ON p.frontier = f.name \
                 WHERE substr(f.name, 1, length($1)) = $1 \
                 GROUP BY p.frontier, p.state ORDER BY p.frontier, p.state",
            )
            .bind(prefix)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error("counting crawl pages".into(), e))?;
        let mut out = Vec::with_capacity(heads.len());
        for (name, generation, state, started, ended) in heads {
            let pages = counts
                .iter()
                .filter(|c| c.0 == name)
                .map(|c| (c.1.clone(), u64::try_from(c.2).unwrap_or(0)))
                .collect();
            out.push(FrontierSummary {
                name,
                generation,
                state,
                started_at: clock::from_db(started, "started_at").ok(),
                ended_at: ended.and_then(|e| clock::from_db(e, "ended_at").ok()),
                pages,
            });
        }
        Ok(out)
    }

    /// Pages of frontier `name` (optionally in `state`), in the order they
    /// were found, at most `limit`.
    pub async fn frontier_pages(
        &self,
        name: &str,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PageRow>> {
        type Row = (
            String,
            i64,
            String,
            i64,
            i64,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT url, generation, state, depth, attempts, status, kind, error, fetched_at \
                 FROM crawl_pages WHERE frontier = $1 AND ($2 IS NULL OR state = $2) \
                 ORDER BY id LIMIT $3",
            )
            .bind(name)
            .bind(state)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })
        .map_err(|e| store_error(format!("reading crawl frontier {name:?}"), e))?;
        Ok(rows
            .into_iter()
            .map(
                |(url, generation, state, depth, attempts, status, kind, error, fetched)| PageRow {
                    url,
                    generation,
                    state,
                    depth: u32::try_from(depth).unwrap_or(u32::MAX),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    status: status.and_then(|s| u16::try_from(s).ok()),
                    kind,
                    error,
                    fetched_at: fetched.and_then(|f| clock::from_db(f, "fetched_at").ok()),
                },
            )
            .collect())
    }

    /// Forgets frontier `name` and its pages (the next crawl starts from
    /// nothing).
    pub async fn reset_frontier(&self, name: &str) -> Result<()> {
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM crawl_pages WHERE frontier = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM crawl_frontiers WHERE name = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(())
            }
            .await
        })
        .map_err(|e| store_error(format!("resetting crawl frontier {name:?}"), e))
    }
}
