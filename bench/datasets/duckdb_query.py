"""The datasets benchmark's query reference: DuckDB answering one provider's
sales for a range of days straight from the Parquet files.

    python duckdb_query.py (--files-glob GLOB | --files-list FILE) \
        --provider ID --from DATE --to DATE [--limit N] [--repeat 100] [--warmup 1]

GLOB is DuckDB's (`DIR/*/*.parquet`); FILE holds one path per line. The
files sit in hive-style directories (`date=YYYY-MM-DD/`), so `date` is a
column. Each run is

    SELECT * FROM read_parquet([...], hive_partitioning = true)
    WHERE provider_id = ? AND date BETWEEN ? AND ?
    [LIMIT N]

(`--limit`: the first N rows found, no order, as a page of caudal's query API
is), with every row fetched (into an Arrow table, so Python objects do not count),
on one connection. `--warmup` runs first, untimed (file metadata into cache),
then `--repeat` timed runs.

Prints one JSON line: p50_ms and p99_ms (nearest rank), qps (runs per second
of the timed runs, one at a time) and rows (what each run returned).
"""

import argparse
import datetime
import json
import math
import sys
import time

import duckdb


def sql_string(text):
    return "'" + text.replace("'", "''") + "'"


def percentile(sorted_values, p):
    """Nearest rank: the smallest value with at least p % at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    files = parser.add_mutually_exclusive_group(required=True)
    files.add_argument("--files-glob", metavar="GLOB")
    files.add_argument("--files-list", metavar="FILE")
    parser.add_argument("--provider", type=int, required=True)
    parser.add_argument(
        "--from", dest="from_", metavar="DATE", type=datetime.date.fromisoformat, required=True
    )
    parser.add_argument("--to", metavar="DATE", type=datetime.date.fromisoformat, required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--repeat and --limit must be at least 1 and --warmup at least 0")

    if args.files_glob is not None:
        paths = [args.files_glob]
    else:
        with open(args.files_list, encoding="utf-8") as listing:
            paths = [line.strip() for line in listing if line.strip()]
        if not paths:
            parser.error(f"{args.files_list} lists no files")
    sql = (
        "SELECT * FROM read_parquet(["
        + ", ".join(sql_string(path) for path in paths)
        + "], hive_partitioning = true)"
        " WHERE provider_id = ? AND date BETWEEN ? AND ?"
    )
    if args.limit is not None:
        sql += f" LIMIT {args.limit}"
    params = [args.provider, args.from_, args.to]

    con = duckdb.connect()
    for _ in range(args.warmup):
        con.sql(sql, params=params).to_arrow_table()
    latencies = []
    rows = 0
    started = time.perf_counter()
    for _ in range(args.repeat):
        start = time.perf_counter()
        rows = con.sql(sql, params=params).to_arrow_table().num_rows
        latencies.append(time.perf_counter() - start)
    total = time.perf_counter() - started
    latencies.sort()
    print(
        json.dumps(
            {
                "p50_ms": round(percentile(latencies, 50) * 1000, 3),
                "p99_ms": round(percentile(latencies, 99) * 1000, 3),
                "qps": round(args.repeat / total, 1),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
