"""Seed 000's parallel sender, re-created faithfully for the benchmarks.

The seed (`Evaluación de la Arquitectura Actual`, "Ejemplo para enviar
registros en paralelo") sends every record on its own request from a
`ThreadPoolExecutor(max_workers=5)` through one urllib3 `PoolManager`, and
logs each outcome (here at INFO on stderr, which the harness keeps in a
file, as the seed's `registrar_evento` writes its log file), with the
`PoolManager`'s defaults (one kept connection per host: the other workers
open and discard theirs, as the seed's would). The seed requests a URL per
record (`GET`); here each record is the seed 001 record shape, posted as
JSON to the receiver; the rows come from PostgreSQL with psycopg2
(`fetchall`, as the seed's pyodbc does).

    python seed000_thread_pool.py --dsn DSN --url URL [--limit N] [--workers 5]

Prints one JSON line: rows read, records sent, failures.
"""

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import urllib3

logging.basicConfig(level=logging.INFO)
logger = logging.getLogger(__name__)
http = urllib3.PoolManager()


def registrar_evento(mensaje, nivel="info"):
    getattr(logger, nivel)(mensaje)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=5)
    args = parser.parse_args()

    conn = psycopg2.connect(args.dsn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT service_id, request_id, opening_date, status_id, last_modified_date"
            " FROM service_requests ORDER BY last_modified_date, request_id LIMIT %s",
            (args.limit,),
        )
        rows = cur.fetchall()
    conn.close()
    records = [
        {
            "service_id": service_id,
            "request_id": str(request_id),
            "opening_date": opening_date.isoformat(),
            "status_id": status_id,
            "last_modified_date": last_modified_date.isoformat(),
        }
        for (service_id, request_id, opening_date, status_id, last_modified_date) in rows
    ]
    outcomes = {"sent": 0, "failed": 0}

    def enviar_registro(record):
        try:
            response = http.request(
                "POST",
                args.url,
                body=json.dumps(record),
                headers={"Content-Type": "application/json"},
            )
            if response.status == 200:
                registrar_evento(f"Registro enviado: {record['request_id']}")
                return True
            registrar_evento(
                f"Error al enviar registro: {record['request_id']} - Estado: {response.status}",
                nivel="error",
            )
        except Exception as e:
            registrar_evento(f"Error en el envío del registro {record['request_id']}: {e}", nivel="error")
        return False

    with ThreadPoolExecutor(max_workers=args.workers) as executor:
        for ok in executor.map(enviar_registro, records):
            outcomes["sent" if ok else "failed"] += 1
    print(json.dumps({"rows": len(records), **outcomes}))
    return 1 if outcomes["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
