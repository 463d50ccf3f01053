-- Datasets: what each logical date of a report pipeline wrote, and each
-- partition's committed generation. The manifests in the dataset's storage
-- are the truth about files; these rows let the query API list partitions
-- without listing storage, let a cached result notice that a partition it
-- read was rewritten, and let a re-run find the partitions its date wrote.
-- Times are microseconds since the Unix epoch.

CREATE TABLE dataset_dates (
    dataset      TEXT    NOT NULL,
    logical_date TEXT    NOT NULL, -- YYYY-MM-DD
    pipeline     TEXT    NOT NULL,
    run          TEXT    NOT NULL,
    rows         BIGINT NOT NULL,
    parts        BIGINT NOT NULL,
    committed_at BIGINT NOT NULL,
    PRIMARY KEY (dataset, logical_date)
);

CREATE TABLE dataset_parts (
    dataset      TEXT    NOT NULL,
    part         TEXT    NOT NULL, -- the partition's path, e.g. provider_id=7/date=2025-05-14
    logical_date TEXT    NOT NULL,
    generation   BIGINT NOT NULL, -- the partition's manifest generation
    rows         BIGINT NOT NULL, -- rows of this date in the partition
    bytes        BIGINT NOT NULL,
    files        BIGINT NOT NULL,
    committed_at BIGINT NOT NULL,
    PRIMARY KEY (dataset, part, logical_date)
);

CREATE INDEX dataset_parts_date ON dataset_parts (dataset, logical_date);

-- Bumped by every commit of a dataset: a cheap "did anything change".
CREATE TABLE dataset_versions (
    dataset TEXT    NOT NULL PRIMARY KEY,
    version BIGINT NOT NULL
);

-- Partitions a date's run is about to commit, written before the first
-- commit and cleared when the date is recorded: a run killed between the two
-- leaves them here, so the date's next run empties those it no longer
-- writes.
CREATE TABLE dataset_pending (
    dataset      TEXT NOT NULL,
    logical_date TEXT NOT NULL,
    part         TEXT NOT NULL,
    PRIMARY KEY (dataset, logical_date, part)
);
