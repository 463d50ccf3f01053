-- Workflows: runs, their task instances and every attempt of each.
--
-- States are plain text validated by caudal-core's workflow model (see
-- docs/workflows.md for the diagram). Task and attempt times are written by
-- the executor that owns the run (one process at a time, fenced by the
-- `workflows/executor` lease), in microseconds since the Unix epoch.

CREATE TABLE workflow_runs (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow         TEXT    NOT NULL,
    batch_id         TEXT    NOT NULL DEFAULT '',
    triggered_by     TEXT    NOT NULL,
    logical_date     BIGINT,
    params           TEXT    NOT NULL, -- JSON object
    state            TEXT    NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    ended_at         BIGINT,
    dir              TEXT    NOT NULL DEFAULT '',
    error            TEXT
);

CREATE INDEX workflow_runs_by_workflow ON workflow_runs (workflow, id DESC);
CREATE INDEX workflow_runs_unfinished ON workflow_runs (state)
    WHERE state IN ('queued', 'running');

CREATE TABLE workflow_tasks (
    run_id     BIGINT NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    task       TEXT    NOT NULL,
    map_index  BIGINT NOT NULL, -- -1: the task itself; 0..: a fan-out instance
    state      TEXT    NOT NULL,
    attempts   BIGINT NOT NULL DEFAULT 0, -- attempts started (numbers them)
    failures   BIGINT NOT NULL DEFAULT 0, -- attempts counted against max_attempts
    item       TEXT,             -- JSON: a fan-out instance's item(s)
    outputs    TEXT,             -- JSON object
    items      TEXT,             -- JSON array
    not_before BIGINT,          -- the next attempt's earliest start
    queued_at  BIGINT,
    started_at BIGINT,
    ended_at   BIGINT,
    error      TEXT,
    PRIMARY KEY (run_id, task, map_index)
);

CREATE TABLE workflow_attempts (
    run_id      BIGINT NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    task        TEXT    NOT NULL,
    map_index   BIGINT NOT NULL,
    attempt     BIGINT NOT NULL,
    holder      TEXT    NOT NULL, -- the executor that ran it
    pid         BIGINT,          -- its process (group leader), once it ended
    state       TEXT    NOT NULL,
    exit_code   BIGINT,
    error       TEXT,
    stderr_tail TEXT,
    started_at  BIGINT NOT NULL,
    ended_at    BIGINT,
    PRIMARY KEY (run_id, task, map_index, attempt)
);
