"""Seed 001's hourly sender, re-created faithfully for the benchmarks.

The seed (`3. Envío de Información por Intervalos`) reads the rows modified
in an interval (`get_data_in_interval`) and posts them with
`send_interval_data`: `requests.post(url, json={"requests": [...]})`, a
30 s timeout and up to three tries with exponential backoff. Here the rows
come from PostgreSQL with psycopg2 (the seed's pyodbc against SQL Server
does the same: one query, `fetchall`), each row becomes the seed's record
shape, and the records are posted one batch per request, as `requests.post`
does it: a new connection for every call.

    python seed001_send_interval_data.py --dsn DSN --url URL \
        [--since ISO] [--until ISO] [--batch 1000]
    python seed001_send_interval_data.py --idle

Prints one JSON line: rows read, requests sent, failures. With `--idle` it
runs the seed's scheduler loop instead (`schedule.every(1).hour`, checked
every 60 s) after printing `ready`: the footprint of the seed's process
between two hourly runs.
"""

import argparse
import json
import logging
import sys
import time

import psycopg2
import requests
import schedule

logging.basicConfig(level=logging.INFO)
logger = logging.getLogger(__name__)


def get_data_in_interval(conn, start, end):
    with conn.cursor() as cur:
        cur.execute(
            "SELECT service_id, request_id, opening_date, status_id, last_modified_date"
            " FROM service_requests"
            " WHERE last_modified_date >= %s AND last_modified_date < %s"
            " ORDER BY last_modified_date, request_id",
            (start, end),
        )
        rows = cur.fetchall()
    return [
        {
            "service_id": service_id,
            "request_id": str(request_id),
            "opening_date": opening_date.isoformat(),
            "status_id": status_id,
            "last_modified_date": last_modified_date.isoformat(),
        }
        for (service_id, request_id, opening_date, status_id, last_modified_date) in rows
    ]


def send_interval_data(url, data, max_retries=3):
    retry_count = 0
    while retry_count < max_retries:
        try:
            response = requests.post(
                url,
                headers={"Content-Type": "application/json"},
                json={"requests": data},
                timeout=30,
            )
            if response.ok:
                logger.info("sent %d records", len(data))
                return True
            raise Exception(f"server error: {response.status_code}")
        except Exception as e:
            retry_count += 1
            logger.error("attempt %d/%d failed: %s", retry_count, max_retries, e)
            if retry_count < max_retries:
                time.sleep(2**retry_count)
    logger.error("gave up after %d attempts", max_retries)
    return False


def run_scheduler():
    schedule.every(1).hour.do(lambda: None)
    print("ready", flush=True)
    while True:
        schedule.run_pending()
        time.sleep(60)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--dsn")
    parser.add_argument("--url")
    parser.add_argument("--since", default="-infinity")
    parser.add_argument("--until", default="infinity")
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    if args.idle:
        run_scheduler()
    if not args.dsn or not args.url:
        parser.error("--dsn and --url are required")
    conn = psycopg2.connect(args.dsn)
    data = get_data_in_interval(conn, args.since, args.until)
    conn.close()
    sent, failed = 0, 0
    for i in range(0, len(data), args.batch):
        if send_interval_data(args.url, data[i : i + args.batch]):
            sent += 1
        else:
            failed += 1
    print(json.dumps({"rows": len(data), "requests": sent, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
