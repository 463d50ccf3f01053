#!/usr/bin/env python3
"""Fixture web site for the seed-004 scraping workflow.

    python3 site.py --port N [--dir DIR] [--delay-ms N]

--port 0 picks a free port. The first stdout line is always
"listening on http://127.0.0.1:PORT" (flushed).

Routes (for each site in inm24 cyt lam mit prop tro):
    GET /<site>/list?page=K   K = 1..3, five <a class="listing"> links
    GET /<site>/item/<id>     detail page with price and rooms spans
Anything else is a 404. All content is deterministic.
"""
import argparse
import hashlib
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SITES = ("inm24", "cyt", "lam", "mit", "prop", "tro")
PAGES = 3
PER_PAGE = 5


def list_page(site, page):
    links = "\n".join(
        f'<li><a class="listing" href="/{site}/item/{site}-{page}-{n}">'
        f"Title {site}-{page}-{n}</a></li>"
        for n in range(1, PER_PAGE + 1)
    )
    return f"<html><body><h1>{site} page {page}</h1>\n<ul>\n{links}\n</ul></body></html>\n"


def item_page(item_id):
    digest = int(hashlib.sha256(item_id.encode()).hexdigest(), 16)
    price = 50_000 + digest % 450_000
    rooms = 1 + (digest // 1000) % 5
    return (
        f"<html><body><h1>{item_id}</h1>\n"
        f'<p>Price: <span class="price">{price}</span></p>\n'
        f'<p>Rooms: <span class="rooms">{rooms}</span></p>\n'
        "</body></html>\n"
    )


def route(path, query):
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] in SITES and parts[1] == "list":
        try:
            page = int(parse_qs(query).get("page", ["1"])[0])
        except ValueError:
            return None
        return list_page(parts[0], page) if 1 <= page <= PAGES else None
    if len(parts) == 3 and parts[0] in SITES and parts[1] == "item":
        site, item_id = parts[0], parts[2]
        valid = {f"{site}-{p}-{n}" for p in range(1, PAGES + 1) for n in range(1, PER_PAGE + 1)}
        if item_id in valid:
            return item_page(item_id)
    return None


class Handler(BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):
        if self.delay:
            time.sleep(self.delay)
        url = urlsplit(self.path)
        body = route(url.path, url.query)
        status = 200 if body is not None else 404
        data = (body if body is not None else "not found\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # keep the fixture quiet
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--dir", default=".", help="working directory, created if missing")
    p.add_argument("--delay-ms", type=int, default=0, help="sleep before every response")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    os.chdir(args.dir)
    Handler.delay = args.delay_ms / 1000
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit cleanly on kill
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
