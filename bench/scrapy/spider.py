"""The crawl scenario's reference: the fixture site crawled by Scrapy.

Run by caudal-bench (`crates/caudal-bench/src/crawl.rs`) as

    python bench/scrapy/spider.py START_URL OUT_FILE

It follows the links caudal's crawl source follows (`a.next`, `a.detail`)
from START_URL and writes one JSON line per detail page (`/property/\\d+$`)
to OUT_FILE, with the same fields caudal extracts by the same selectors:
`title` (h1.title), `price` (span.price), `image` (img.main's src, made
absolute) and `features` (every `.features li`). Texts are whitespace-
collapsed as caudal does: the text nodes joined, split on whitespace,
joined with one space.

Settings: the User-Agent `caudal-bench` (caudal's in the scenario), 16
requests in flight (in all, and to the one site), no delay, no
AutoThrottle, no robots.txt, no HTTP cache, the default duplicate filter.
Links are resolved against the page and their fragment dropped before they
are requested (caudal normalises its links the same way); the duplicate
filter would drop the fragment anyway, but the detail pattern is matched on
the URL requested.

The same file also runs as `scrapy runspider bench/scrapy/spider.py -a
start=URL -o OUT.jsonl`.
"""

import re
import sys
from urllib.parse import urldefrag

import scrapy

DETAIL = re.compile(r"/property/\d+$")


def collapse(texts):
    """The text nodes joined, whitespace runs made one space, trimmed."""
    return " ".join(" ".join(texts).split())


class SiteSpider(scrapy.Spider):
    name = "caudal-bench-site"
    custom_settings = {
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 16,
        "DOWNLOAD_DELAY": 0,
        "AUTOTHROTTLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "HTTPCACHE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
        "USER_AGENT": "caudal-bench",
    }

    def __init__(self, start=None, **kwargs):
        super().__init__(**kwargs)
        if not start:
            raise ValueError("give the start URL: -a start=http://127.0.0.1:PORT/listings/1")
        self.start_urls = [start]

    def parse(self, response):
        if DETAIL.search(response.url):
            yield {
                "url": response.url,
                "title": collapse(response.css("h1.title::text").getall()),
                "price": collapse(response.css("span.price::text").getall()),
                "image": response.urljoin(response.css("img.main::attr(src)").get()),
                "features": [
                    collapse(li.css("::text").getall())
                    for li in response.css(".features li")
                ],
            }
        for href in response.css("a.next::attr(href), a.detail::attr(href)").getall():
            url, _fragment = urldefrag(response.urljoin(href))
            yield scrapy.Request(url, callback=self.parse)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: spider.py START_URL OUT_FILE")
    start, out = sys.argv[1:]
    from scrapy.crawler import CrawlerProcess

    process = CrawlerProcess({"FEEDS": {out: {"format": "jsonlines", "overwrite": True}}})
    process.crawl(SiteSpider, start=start)
    process.start()


if __name__ == "__main__":
    main()
