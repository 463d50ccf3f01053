-- seed-001: the service-requests table that examples/seed-001.toml (or .yaml)
-- syncs to the partner API. PostgreSQL.
--
--   createdb servicedesk
--   psql servicedesk -f examples/seed-001.sql
--   export SERVICEDESK_URL=postgres://USER:PASSWORD@HOST/servicedesk
--   export PARTNER_TOKEN=...
--   caudal validate -c examples/seed-001.toml
--   caudal once -c examples/seed-001.toml requests_to_partner

CREATE TABLE public.service_requests (
    request_id         text        PRIMARY KEY,
    service_id         text        NOT NULL,
    opening_date       timestamptz NOT NULL,
    status_id          integer     NOT NULL,
    -- The cursor's first column: NOT NULL, and moved forward on every change.
    last_modified_date timestamptz NOT NULL DEFAULT now()
);

-- The keyset index: the cursor columns, in cursor order. Every page is one
-- range scan of it: WHERE (last_modified_date, request_id) > ($1, $2)
-- ORDER BY last_modified_date, request_id LIMIT n.
CREATE INDEX service_requests_cursor
    ON public.service_requests (last_modified_date, request_id);

-- Every update moves last_modified_date, so the next run sees the row again.
-- now() is the start time of the writing transaction: the source's safety
-- lag (`lag`, default 5s) must be longer than your longest writing
-- transaction, or a slow transaction's rows can commit behind the cursor.
CREATE FUNCTION public.service_requests_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_modified_date := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER service_requests_touch
    BEFORE UPDATE ON public.service_requests
    FOR EACH ROW EXECUTE FUNCTION public.service_requests_touch();

-- A few rows. Two share a last_modified_date: the cursor's second column
-- (request_id) orders them, so neither is skipped nor sent twice.
INSERT INTO public.service_requests
    (request_id, service_id, opening_date, status_id, last_modified_date)
VALUES
    ('REQ-0001', 'SRV-010', '2025-05-14T09:00:00Z', 1, '2025-05-14T09:00:00Z'),
    ('REQ-0002', 'SRV-010', '2025-05-14T09:05:00Z', 2, '2025-05-14T10:15:00Z'),
    ('REQ-0003', 'SRV-022', '2025-05-14T10:20:00Z', 1, '2025-05-14T12:34:56Z'),
    ('REQ-0004', 'SRV-031', '2025-05-14T11:02:00Z', 3, '2025-05-14T12:34:56Z'),
    ('REQ-0005', 'SRV-022', '2025-05-14T12:40:00Z', 1, '2025-05-14T12:40:00.250Z');
