-- The first schema of the caudal state store (PostgreSQL).
--
-- Every `*_at` column holds microseconds since the Unix epoch (UTC) as a
-- BIGINT: one exact, comparable representation shared with SQLite, so the
-- store's code reads both backends the same way (`to_timestamp(x / 1e6)`
-- shows one in psql). Values come from the `clock` view below, never from the
-- application, so machines with skewed clocks still agree on lease expiry.

-- The database clock. statement_timestamp() is fixed for the duration of one
-- statement, so every reference inside a statement sees the same instant.
CREATE VIEW clock AS
SELECT CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT) AS now_us;

CREATE TABLE checkpoints (
    pipeline   TEXT   NOT NULL PRIMARY KEY,
    position   JSONB  NOT NULL, -- opaque to the store
    updated_at BIGINT NOT NULL
);

CREATE TABLE runs (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline       TEXT   NOT NULL,
    triggered_by   TEXT   NOT NULL,
    started_at     BIGINT NOT NULL,
    ended_at       BIGINT,
    rows_read      BIGINT NOT NULL DEFAULT 0,
    rows_delivered BIGINT NOT NULL DEFAULT 0,
    outcome        TEXT   NOT NULL DEFAULT 'running',
    error          TEXT
);

CREATE INDEX runs_by_pipeline ON runs (pipeline, id DESC);

CREATE TABLE schedules (
    pipeline    TEXT   NOT NULL PRIMARY KEY,
    next_run_at BIGINT,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE leases (
    name        TEXT   NOT NULL PRIMARY KEY,
    holder      TEXT   NOT NULL,
    acquired_at BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
