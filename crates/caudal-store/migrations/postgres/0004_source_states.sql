-- What each pipeline's source last reported about itself while capturing
-- (for a CDC source: replication lag, slot, positions), as a JSON object,
-- for `caudal status` in another process.
CREATE TABLE source_states (
    pipeline   TEXT   NOT NULL PRIMARY KEY,
    state      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);
