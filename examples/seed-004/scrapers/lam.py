#!/usr/bin/env python3
"""Main scraper: python3 lam.py --site URL --pages N --out OUT.csv [--urls URLS.csv]"""
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # keep __pycache__ out of the repo
import common  # noqa: E402

if __name__ == "__main__":
    sys.exit(common.run_main(Path(__file__).stem))
