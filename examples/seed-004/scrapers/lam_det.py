#!/usr/bin/env python3
"""Detail scraper: python3 lam_det.py --out OUT.csv URL [URL ...]"""
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the repo
import common  # noqa: E402

if __name__ == "__main__":
    sys.exit(common.run_detail())
