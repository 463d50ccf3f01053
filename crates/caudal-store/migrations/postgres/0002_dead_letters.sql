-- Dead letters: records a sink refused (or that failed validation, or whose
-- retries gave up), kept with their reason until replayed or discarded.
CREATE TABLE dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    pipeline         TEXT    NOT NULL,
    batch_key        TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    record_key       TEXT,
    position         TEXT    NOT NULL,
    record           TEXT    NOT NULL,
    reason           TEXT    NOT NULL,
    status           INTEGER,
    response_excerpt TEXT,
    attempts         INTEGER NOT NULL,
    first_attempt_at BIGINT,
    last_attempt_at  BIGINT,
    created_at       BIGINT  NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending',
    resolved_at      BIGINT
);

CREATE INDEX dead_letters_by_pipeline ON dead_letters (pipeline, state, id);
