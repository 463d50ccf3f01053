#!/usr/bin/env python3
"""The batch's report: python3 report.py RUN_DIR BATCH_ID

Counts the rows of every CSV the scrapers wrote in the run directory (and
the records of every JSON-lines file crawl tasks wrote there), prints them,
and returns the totals to caudal as outputs ($CAUDAL_OUTPUT).
"""
import csv
import json
import os
import sys
from pathlib import Path

sys.dont_write_bytecode = True


def rows(path: Path) -> int:
    if path.suffix == ".jsonl":  # a crawl task's records, one per line
        with path.open() as f:
            return sum(1 for line in f if line.strip())
    with path.open(newline="") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def main() -> int:
    run_dir, batch = Path(sys.argv[1]), sys.argv[2]
    files = sorted([*run_dir.glob("*.csv"), *run_dir.glob("*.jsonl")])
    counts = {p.name: rows(p) for p in files if not p.name.endswith("_urls.csv")}
    listings = sum(n for name, n in counts.items() if "_det" not in name)
    details = sum(n for name, n in counts.items() if "_det" in name)
    for name, n in counts.items():
        print(f"{batch}: {name}: {n} rows")
    out = os.environ.get("CAUDAL_OUTPUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"listings": listings, "details": details, "files": len(counts)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
