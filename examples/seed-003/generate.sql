-- seed-003: fills seed003.sales (schema.sql) with generated sales, replacing
-- any rows there. Deterministic: the same variables give the same rows, byte
-- for byte, on any server, so exports and reports can be compared between
-- runs.
--
--   psql -h HOST -U USER -d DB -f examples/seed-003/generate.sql
--   psql ... -v rows=1000000 -v from=2025-01-01 -v days=90 -f generate.sql
--
-- Variables (psql -v NAME=VALUE):
--   rows       how many sales (100000)
--   from       the first day, a date; days are UTC days (2025-05-01)
--   days       how many days the sales spread over (31)
--   providers  provider_id runs 1..providers (20)
--
-- sale_id runs 1..rows in time order, spread evenly over the days (every day
-- gets rows/days sales, give or take one). Each sale's other values come from
-- the md5 of its sale_id, not random(): provider, product (its unit price is
-- fixed per product), quantity 1..12, a channel (NULL for about 1 in 10) and a
-- discount of 1.25 % to 20 % (NULL for about 2 in 3). currency is the default,
-- MXN.

\set ON_ERROR_STOP on

\if :{?rows}
\else
\set rows 100000
\endif
\if :{?from}
\else
\set from 2025-05-01
\endif
\if :{?days}
\else
\set days 31
\endif
\if :{?providers}
\else
\set providers 20
\endif

BEGIN;

TRUNCATE seed003.sales;

INSERT INTO seed003.sales
    (sale_id, provider_id, product_id, quantity, unit_price, amount,
     channel, discount, sold_at)
SELECT
    sale_id,
    provider_id,
    product_id,
    quantity,
    unit_price,
    round(quantity * unit_price * (1 - coalesce(discount, 0)), 2),
    channel,
    discount,
    sold_at
FROM (
    SELECT
        s.sale_id,
        1 + h.a % :providers AS provider_id,
        1 + h.b % 2000 AS product_id,
        1 + h.c % 12 AS quantity,
        -- 10.00 to 999.99, the same for every sale of a product.
        ((1 + h.b % 2000) * 7919 % 99000 + 1000)::numeric(12,2) / 100
            AS unit_price,
        CASE WHEN h.d % 10 <> 0
            THEN (ARRAY['web', 'store', 'app', 'marketplace'])[1 + h.d / 10 % 4]
        END AS channel,
        CASE WHEN h.d / 40 % 3 = 0
            THEN ((1 + h.d / 120 % 16) * 0.0125)::numeric(5,4)
        END AS discount,
        (:'from'::date)::timestamp AT TIME ZONE 'UTC'
            + (s.sale_id - 1)::float8 * (:days * 86400) / :rows
                * interval '1 second' AS sold_at
    FROM generate_series(1, :rows::bigint) AS s(sale_id)
    CROSS JOIN LATERAL (
        SELECT
            ('x' || substr(m, 1, 8))::bit(32)::bigint AS a,
            ('x' || substr(m, 9, 8))::bit(32)::bigint AS b,
            ('x' || substr(m, 17, 8))::bit(32)::bigint AS c,
            ('x' || substr(m, 25, 8))::bit(32)::bigint AS d
        FROM md5(s.sale_id::text) AS m
    ) AS h
) AS sale;

COMMIT;

ANALYZE seed003.sales;
