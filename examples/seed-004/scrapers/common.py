"""Shared helpers for the seed-004 stand-in scrapers (stdlib only).

Main scrapers:   python3 <site>.py --site URL --pages N --out OUT.csv [--urls URLS.csv]
Detail scrapers: python3 <site>_det.py --out OUT.csv URL [URL ...]

Environment:
    SEED004_LEDGER   if set, append a JSON line per "start"/"end" event to this file
    SEED004_HOLD_MS  if set, sleep this many milliseconds right after "start"
    CAUDAL_OUTPUT    (detail scrapers) append {"details": <count>} to this file
"""
import argparse
import csv
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

NAME = Path(sys.argv[0]).stem
TIMEOUT = 10

LISTING_RE = re.compile(r'<a class="listing" href="([^"]+)">([^<]*)</a>')
FIELD_RE = r'<span class="{}">([^<]*)</span>'


def record_event(kind):
    """Append one ledger line (single O_APPEND write) if SEED004_LEDGER is set."""
    ledger = os.environ.get("SEED004_LEDGER")
    if not ledger:
        return
    line = json.dumps({
        "script": NAME,
        "event": kind,
        "time": time.time(),
        "pid": os.getpid(),
        "args": sys.argv[1:],
        "attempt": os.environ.get("CAUDAL_ATTEMPT"),
        "task": os.environ.get("CAUDAL_TASK"),
    }) + "\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def begin():
    """Record "start", then hold for SEED004_HOLD_MS milliseconds if set."""
    record_event("start")
    hold_ms = int(os.environ.get("SEED004_HOLD_MS") or 0)
    if hold_ms > 0:
        time.sleep(hold_ms / 1000)


def fetch(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        return resp.read().decode("utf-8")


def parse_listings(html, base_url):
    """Return [(id, title, absolute_url)] for each listing link on a list page."""
    rows = []
    for href, title in LISTING_RE.findall(html):
        rows.append((href.rsplit("/", 1)[-1], title, urljoin(base_url, href)))
    return rows


def parse_detail(html):
    """Return (price, rooms) from a detail page."""
    values = []
    for field in ("price", "rooms"):
        m = re.search(FIELD_RE.format(field), html)
        if not m:
            raise ValueError(f"no {field} on page")
        values.append(m.group(1))
    return tuple(values)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def fail(err):
    print(f"{NAME}: error: {err}", file=sys.stderr)
    return 1


def run_main(site):
    """Scrape /<site>/list?page=1..N into --out (id,title,url) and optionally --urls (url)."""
    p = argparse.ArgumentParser(prog=f"{site}.py", description=f"scrape {site} list pages")
    p.add_argument("--site", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--pages", type=int, default=3)
    p.add_argument("--out", required=True, help="CSV with header id,title,url")
    p.add_argument("--urls", help="also write detail URLs here (CSV with header url)")
    args = p.parse_args()
    begin()
    rows = []
    try:
        for page in range(1, args.pages + 1):
            url = f"{args.site.rstrip('/')}/{site}/list?page={page}"
            rows += parse_listings(fetch(url), url)
    except (OSError, ValueError) as err:  # URLError/HTTPError are OSErrors
        return fail(f"{url}: {err}")
    write_csv(args.out, ["id", "title", "url"], rows)
    if args.urls:
        write_csv(args.urls, ["url"], [[r[2]] for r in rows])
    record_event("end")
    return 0


def run_detail():
    """Fetch each detail URL into --out (url,price,rooms)."""
    p = argparse.ArgumentParser(prog=f"{NAME}.py", description="scrape detail pages")
    p.add_argument("--out", required=True, help="CSV with header url,price,rooms")
    p.add_argument("urls", nargs="+", metavar="URL")
    args = p.parse_args()
    begin()
    rows = []
    try:
        for url in (u.strip() for u in args.urls):
            rows.append((url, *parse_detail(fetch(url))))
    except (OSError, ValueError) as err:
        return fail(f"{url}: {err}")
    write_csv(args.out, ["url", "price", "rooms"], rows)
    output = os.environ.get("CAUDAL_OUTPUT")
    if output:
        with open(output, "a") as f:
            f.write(json.dumps({"details": len(rows)}) + "\n")
    record_event("end")
    return 0
