-- Crawl frontiers: the URLs each crawl knows and what became of each.
--
-- A frontier is named by what crawls (`pipeline:NAME`, or
-- `workflow:WORKFLOW:TASK`). Each crawl of it is a generation: a finished
-- frontier starts the next generation by queueing every known page again
-- (with its ETag and Last-Modified kept for conditional requests); an
-- unfinished one is resumed. Times are microseconds since the Unix epoch.

CREATE TABLE crawl_frontiers (
    name       TEXT    NOT NULL PRIMARY KEY,
    generation INTEGER NOT NULL,
    state      TEXT    NOT NULL, -- crawling | finished
    started_at INTEGER NOT NULL,
    ended_at   INTEGER
) STRICT;

CREATE TABLE crawl_pages (
    id            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    frontier      TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    generation    INTEGER NOT NULL,
    state         TEXT    NOT NULL, -- queued | fetching | done | unchanged | failed | skipped
    depth         INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    status        INTEGER,
    kind          TEXT,
    etag          TEXT,
    last_modified TEXT,
    error         TEXT,
    fetched_at    INTEGER,
    UNIQUE (frontier, url)
) STRICT;

CREATE INDEX crawl_pages_queue ON crawl_pages (frontier, state, depth, id);
