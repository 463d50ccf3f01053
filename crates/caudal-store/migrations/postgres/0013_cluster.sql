-- A cluster of caudal processes on one state store.
--
-- Every lease carries a fencing token: it grows by one each time the lease
-- changes hands (or is taken again after it expired or was released), so a
-- write conditional on (holder, token) fails once anyone else has held the
-- lease since. Owner leases given up keep their row (expired) so the token
-- never goes back.
ALTER TABLE leases ADD COLUMN token BIGINT NOT NULL DEFAULT 1;

-- Nodes: each `caudal run` registers itself and beats its heartbeat; a
-- node asked to drain hands its pipelines over and exits.
CREATE TABLE nodes (
    id           TEXT    NOT NULL PRIMARY KEY, -- the lease-holder id, host:pid:nonce
    host         TEXT    NOT NULL,
    pid          BIGINT  NOT NULL,
    version      TEXT    NOT NULL,
    started_at   BIGINT  NOT NULL,
    heartbeat_at BIGINT  NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'active', -- active | draining | stopped
    cluster      BOOLEAN NOT NULL DEFAULT FALSE,     -- shares pipelines with other nodes
    owned        BIGINT  NOT NULL DEFAULT 0          -- pipelines it owns now
);
