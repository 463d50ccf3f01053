-- Alerts: each instance's state (a rule and one group or pipeline), the
-- history of its changes, silences, and the notifications to send (an
-- outbox: a notification is written with the evaluation that decided it,
-- and sent, with retries, until its webhook accepts it). Times are
-- microseconds since the Unix epoch.

CREATE TABLE alert_instances (
    alert      TEXT    NOT NULL,
    labels     TEXT    NOT NULL, -- JSON object: the group or pipeline
    state      TEXT    NOT NULL, -- pending | firing (inactive rows are deleted)
    since      INTEGER NOT NULL,
    fired_at   INTEGER,
    notified   INTEGER NOT NULL,
    value      REAL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (alert, labels)
) STRICT;

CREATE TABLE alert_events (
    id     INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    alert  TEXT    NOT NULL,
    labels TEXT    NOT NULL,
    event  TEXT    NOT NULL, -- pending | firing | resolved | cleared
    value  REAL,
    at     INTEGER NOT NULL
) STRICT;

CREATE INDEX alert_events_by_alert ON alert_events (alert, id);

CREATE TABLE alert_silences (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    alert      TEXT    NOT NULL,
    labels     TEXT,             -- JSON object the instance's labels must include; NULL: all
    until      INTEGER NOT NULL,
    reason     TEXT    NOT NULL,
    created_by TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE alert_outbox (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE, -- the episode and kind: sent as Idempotency-Key
    alert      TEXT    NOT NULL,
    notifier   TEXT    NOT NULL,
    instance   TEXT    NOT NULL,        -- the labels: one instance's notifications go out in order
    kind       TEXT    NOT NULL,        -- firing | resolved
    payload    TEXT    NOT NULL,        -- JSON: what the notifier formats
    attempts   INTEGER NOT NULL,
    next_at    INTEGER NOT NULL,
    sent_at    INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX alert_outbox_due ON alert_outbox (sent_at, next_at);
