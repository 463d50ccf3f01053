-- seed-003, the batch half: the sales table that caudal exports every day as
-- a dataset partitioned by day (one Parquet file set per day, per-provider
-- reports queried from it). PostgreSQL.
--
--   psql -h HOST -U USER -d DB -f examples/seed-003/schema.sql
--   psql -h HOST -U USER -d DB -f examples/seed-003/generate.sql
--   psql -h HOST -U USER -d DB -v from=2025-05-01 -v to=2025-05-07 \
--       -f examples/seed-003/report.sql
--
-- Re-running it drops the table and its rows.

\set ON_ERROR_STOP on

CREATE SCHEMA IF NOT EXISTS seed003;

DROP TABLE IF EXISTS seed003.sales;

CREATE TABLE seed003.sales (
    sale_id     bigint        PRIMARY KEY,
    provider_id integer       NOT NULL,
    product_id  integer       NOT NULL,
    quantity    integer       NOT NULL,
    unit_price  numeric(12,2) NOT NULL,
    -- quantity × unit_price × (1 − discount), rounded to cents.
    amount      numeric(14,2) NOT NULL,
    currency    char(3)       NOT NULL DEFAULT 'MXN',
    -- NULL when the point of sale did not say.
    channel     text,
    -- A fraction (0.1250 is 12.5 %); NULL when there was none.
    discount    numeric(5,4),
    sold_at     timestamptz   NOT NULL
);

-- A day's export is one range scan of it:
-- WHERE sold_at >= $day AND sold_at < $day + 1 day.
CREATE INDEX sales_sold_at ON seed003.sales (sold_at);
