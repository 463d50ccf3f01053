-- The first schema of the caudal state store (SQLite).
--
-- Every `*_at` column holds microseconds since the Unix epoch (UTC) as an
-- integer: one exact, comparable representation shared with PostgreSQL, so
-- the store's code reads both backends the same way. Values come from the
-- `clock` view below, never from the application.
--
-- Outcomes are plain text without a CHECK constraint: SQLite cannot alter a
-- constraint in place, and the store validates every value it reads.

-- The database clock. SQLite's 'now' is fixed for the duration of one
-- statement, so every reference inside a statement sees the same instant.
CREATE VIEW clock AS
SELECT CAST(ROUND(unixepoch('subsec') * 1000) AS INTEGER) * 1000 AS now_us;

CREATE TABLE checkpoints (
    pipeline   TEXT    NOT NULL PRIMARY KEY,
    position   TEXT    NOT NULL, -- JSON, opaque to the store
    updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE runs (
    -- AUTOINCREMENT: ids are never reused, so "newest first" is "highest id".
    id             INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    pipeline       TEXT    NOT NULL,
    triggered_by   TEXT    NOT NULL,
    started_at     INTEGER NOT NULL,
    ended_at       INTEGER,
    rows_read      INTEGER NOT NULL DEFAULT 0,
    rows_delivered INTEGER NOT NULL DEFAULT 0,
    outcome        TEXT    NOT NULL DEFAULT 'running',
    error          TEXT
) STRICT;

CREATE INDEX runs_by_pipeline ON runs (pipeline, id DESC);

CREATE TABLE schedules (
    pipeline    TEXT    NOT NULL PRIMARY KEY,
    next_run_at INTEGER,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE leases (
    name        TEXT    NOT NULL PRIMARY KEY,
    holder      TEXT    NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;
