"""The datasets benchmark's write reference: pyarrow writing seed 003's sales
as Parquet partitioned by day.

Builds the rows in memory first, untimed: the shape of seed003.sales
(examples/seed-003/schema.sql) with the distributions of
examples/seed-003/generate.sql (sale_id 1..rows in time order, spread evenly
over the days; channel NULL for about 1 in 10; discount NULL for about 2 in 3,
else 1.25 % to 20 %; amount = quantity × unit_price × (1 − discount) rounded
half up to cents). The values come from a seeded numpy generator, not from
PostgreSQL's md5s: the same arguments give the same rows, but not the rows
generate.sql makes.

Then times writing them, one file per UTC day from `--from` (default
2025-05-01), with `pyarrow.parquet.write_table` (row groups of 131072 rows),
`--threads` files at once (default 1; pyarrow releases the GIL while it
encodes, so threads run in parallel):

    OUT/date=YYYY-MM-DD/part-000.parquet

    python pyarrow_write.py --rows 1000000 --days 31 --providers 20 \
        --out DIR [--from 2025-05-01] [--compression zstd|snappy] [--threads 1]

Prints one JSON line: rows, threads, seconds (the writing only),
rows_per_s and the bytes of the files written.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_GROUP_SIZE = 131072
DEFAULT_FIRST_DAY = datetime.date(2025, 5, 1)
PRODUCTS = 2000
CHANNELS = ["web", "store", "app", "marketplace"]
US_PER_DAY = 86_400_000_000
SEED = 3

SCHEMA = pa.schema(
    [
        pa.field("sale_id", pa.int64(), nullable=False),
        pa.field("provider_id", pa.int32(), nullable=False),
        pa.field("product_id", pa.int32(), nullable=False),
        pa.field("quantity", pa.int32(), nullable=False),
        pa.field("unit_price", pa.decimal128(12, 2), nullable=False),
        pa.field("amount", pa.decimal128(14, 2), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("channel", pa.string()),
        pa.field("discount", pa.decimal128(5, 4)),
        pa.field("sold_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def decimals(units, type_, valid=None):
    """A decimal128 array from non-negative int64 counts of its smallest
    unit (cents for scale 2), without going through Python objects."""
    n = len(units)
    words = np.zeros((n, 2), dtype=np.int64)  # little-endian: low, high
    words[:, 0] = units
    validity = None
    if valid is not None:
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(type_, n, [validity, pa.py_buffer(words)])


def build(rows, days, providers, first_day):
    rng = np.random.default_rng(SEED)
    sale_id = np.arange(1, rows + 1, dtype=np.int64)
    first_us = int(
        datetime.datetime.combine(first_day, datetime.time(), datetime.timezone.utc).timestamp()
    ) * 1_000_000
    # Evenly spaced in time, as generate.sql spreads them (float: rows ×
    # days × µs per day overflows int64 for big runs).
    sold_at = first_us + (np.arange(rows, dtype=np.float64) * (days * US_PER_DAY / rows)).astype(
        np.int64
    )
    provider_id = rng.integers(1, providers + 1, rows, dtype=np.int32)
    product_id = rng.integers(1, PRODUCTS + 1, rows, dtype=np.int32)
    quantity = rng.integers(1, 13, rows, dtype=np.int32)
    # 10.00 to 999.99, the same for every sale of a product.
    price_cents = product_id.astype(np.int64) * 7919 % 99000 + 1000
    has_discount = rng.random(rows) < 1 / 3
    discount_units = np.where(has_discount, rng.integers(1, 17, rows) * 125, 0)
    product = quantity.astype(np.int64) * price_cents * (10_000 - discount_units)
    amount_cents = (product + 5_000) // 10_000
    channel_index = rng.integers(0, len(CHANNELS), rows, dtype=np.int32)
    has_channel = rng.random(rows) >= 0.1
    channel = pc.take(
        pa.array(CHANNELS, pa.string()), pa.array(channel_index, mask=~has_channel)
    )
    table = pa.Table.from_arrays(
        [
            pa.array(sale_id),
            pa.array(provider_id),
            pa.array(product_id),
            pa.array(quantity),
            decimals(price_cents, pa.decimal128(12, 2)),
            decimals(amount_cents, pa.decimal128(14, 2)),
            pa.repeat("MXN", rows).cast(pa.string()),
            channel,
            decimals(discount_units, pa.decimal128(5, 4), has_discount),
            pa.array(sold_at, pa.timestamp("us", tz="UTC")),
        ],
        schema=SCHEMA,
    )
    table.validate(full=True)
    # Rows are in time order, so each day is one slice.
    day_of = (sold_at - first_us) // US_PER_DAY
    bounds = np.searchsorted(day_of, np.arange(days + 1), side="left")
    slices = [
        (first_day + datetime.timedelta(days=d), int(bounds[d]), int(bounds[d + 1] - bounds[d]))
        for d in range(days)
        if bounds[d + 1] > bounds[d]
    ]
    return table, slices


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--days", type=int, required=True)
    parser.add_argument("--providers", type=int, default=20)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--from",
        dest="from_",
        metavar="DATE",
        type=datetime.date.fromisoformat,
        default=DEFAULT_FIRST_DAY,
    )
    parser.add_argument("--compression", choices=["zstd", "snappy"], default="zstd")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.rows < 1 or args.days < 1 or args.providers < 1 or args.threads < 1:
        parser.error("--rows, --days, --providers and --threads must be at least 1")

    table, slices = build(args.rows, args.days, args.providers, args.from_)

    def write(day_slice):
        day, offset, length = day_slice
        directory = os.path.join(args.out, f"date={day.isoformat()}")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "part-000.parquet")
        pq.write_table(
            table.slice(offset, length),
            path,
            row_group_size=ROW_GROUP_SIZE,
            compression=args.compression,
        )
        return path

    start = time.perf_counter()
    if args.threads == 1:
        paths = [write(s) for s in slices]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as pool:
            paths = list(pool.map(write, slices))
    seconds = time.perf_counter() - start

    written = sum(os.path.getsize(path) for path in paths)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "threads": args.threads,
                "seconds": round(seconds, 6),
                "rows_per_s": round(args.rows / seconds, 1),
                "bytes": written,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
