-- Workflow attempts handed to the nodes of a cluster.
--
-- The executor (one node at a time, fenced by the `workflows/executor`
-- lease) writes a row when it starts an attempt, in the same transaction
-- as the attempt; any node with a free slot claims ready rows with
-- `FOR UPDATE SKIP LOCKED`, runs them, beats `heartbeat_at` while they run
-- and writes the outcome. Every claim and every rescue adds one to `token`,
-- and a node's heartbeat and outcome only count while the token is the one
-- its claim got: an attempt rescued from a silent node stays rescued.
CREATE TABLE workflow_dispatch (
    run_id       INTEGER NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    task         TEXT   NOT NULL,
    map_index    INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    pool         TEXT   NOT NULL,
    priority     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    lane         TEXT   NOT NULL DEFAULT '', -- '': any node; else only that node claims it
    spec         TEXT   NOT NULL,            -- JSON: what the attempt runs
    state        TEXT   NOT NULL DEFAULT 'ready', -- ready | claimed | done
    node         TEXT,
    token        INTEGER NOT NULL DEFAULT 0,
    heartbeat_at INTEGER,
    cancel       INTEGER NOT NULL DEFAULT 0,
    outcome      TEXT,                       -- JSON; NULL when done: lost by its node
    PRIMARY KEY (run_id, task, map_index, attempt)
) STRICT;

CREATE INDEX workflow_dispatch_ready ON workflow_dispatch (priority, run_id, seq)
    WHERE state = 'ready';
CREATE INDEX workflow_dispatch_claimed ON workflow_dispatch (node)
    WHERE state = 'claimed';
CREATE INDEX workflow_dispatch_done ON workflow_dispatch (run_id)
    WHERE state = 'done';
