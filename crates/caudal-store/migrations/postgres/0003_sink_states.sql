-- The delivery state of each pipeline's sink as its delivery loop last saw
-- it (circuit breaker closed, open or half-open), for `caudal status` in
-- another process.
CREATE TABLE sink_states (
    pipeline   TEXT   NOT NULL PRIMARY KEY,
    circuit    TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);
