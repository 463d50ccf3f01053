-- Dead letters: records a sink refused (or that failed validation, or whose
-- retries gave up), kept with their reason until replayed or discarded.
CREATE TABLE dead_letters (
    id               INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    pipeline         TEXT    NOT NULL,
    batch_key        TEXT    NOT NULL, -- idempotency key of the batch it travelled in
    event_id         TEXT    NOT NULL, -- stable id of the record
    record_key       TEXT,             -- the pipeline's key field, when set
    position         TEXT    NOT NULL, -- JSON source position
    record           TEXT    NOT NULL, -- JSON record data
    reason           TEXT    NOT NULL,
    status           INTEGER,          -- HTTP status, when there was one
    response_excerpt TEXT,
    attempts         INTEGER NOT NULL,
    first_attempt_at INTEGER,
    last_attempt_at  INTEGER,
    created_at       INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending', -- pending | replayed | discarded
    resolved_at      INTEGER
) STRICT;

CREATE INDEX dead_letters_by_pipeline ON dead_letters (pipeline, state, id);
