-- Live aggregates: each aggregate's head (the buffer offset of its
-- pipeline up to which records are counted, its watermark, the definition
-- the windows were computed with) and its windows, one row per window and
-- group. A window's figures are what the live API serves; `state` holds
-- what it takes to keep counting (sketches, multisets) while the window is
-- open, and is cleared when it closes. The head and the windows a batch
-- changed are written in one transaction: counted exactly once.
-- Times are microseconds since the Unix epoch.

CREATE TABLE aggregates (
    name         TEXT    NOT NULL PRIMARY KEY,
    pipeline     TEXT    NOT NULL,
    definition   TEXT    NOT NULL, -- what the windows were computed with
    snapshot     TEXT,             -- the CDC snapshot counted (a new one starts the windows afresh)
    buffer_offset BIGINT NOT NULL, -- entries below it are counted
    watermark    BIGINT,           -- the latest event time counted
    late         BIGINT NOT NULL,  -- changes not counted: their window had closed
    seq          BIGINT NOT NULL, -- commits so far: every window a commit writes carries it
    skipped      BIGINT NOT NULL,  -- rows not counted: no event time or group field
    updated_at   BIGINT NOT NULL
);

CREATE TABLE aggregate_windows (
    aggregate    TEXT    NOT NULL,
    window_start BIGINT NOT NULL,
    grp          TEXT    NOT NULL, -- the group's values, a JSON array
    window_end   BIGINT NOT NULL,
    rows         BIGINT NOT NULL,
    late         BIGINT NOT NULL,
    closed       BIGINT NOT NULL, -- 1 once the watermark passed end + lateness
    figures      TEXT    NOT NULL, -- JSON object: metric name -> value
    state        TEXT,             -- the accumulators, while open
    seq          BIGINT NOT NULL, -- the commit that last wrote it: closed windows are read in this order
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (aggregate, window_start, grp)
);

CREATE INDEX aggregate_windows_closed ON aggregate_windows (aggregate, closed, seq, window_start, grp);
