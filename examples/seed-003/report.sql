-- seed-003: the reference daily per-provider sales report, computed by
-- PostgreSQL straight from seed003.sales, to compare with what caudal's
-- dataset answers for the same range.
--
--   psql -h HOST -U USER -d DB -v from=2025-05-01 -v to=2025-05-07 \
--       -f examples/seed-003/report.sql
--
-- Variables: from and to, dates, both days included (2025-05-01 and
-- 2025-05-31). Days are UTC days, and timestamps are printed in UTC.
-- One row per provider and day that had sales, ordered by provider, day.

\set ON_ERROR_STOP on

\if :{?from}
\else
\set from 2025-05-01
\endif
\if :{?to}
\else
\set to 2025-05-31
\endif

SET TIME ZONE 'UTC';

SELECT
    provider_id,
    (sold_at AT TIME ZONE 'UTC')::date AS day,
    count(*) AS sales,
    sum(quantity)::bigint AS units,
    sum(amount) AS revenue,
    min(sold_at) AS first_sale,
    max(sold_at) AS last_sale
FROM seed003.sales
WHERE sold_at >= (:'from'::date)::timestamp AT TIME ZONE 'UTC'
  AND sold_at < (:'to'::date + 1)::timestamp AT TIME ZONE 'UTC'
GROUP BY provider_id, day
ORDER BY provider_id, day;
