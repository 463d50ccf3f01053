#!/bin/sh
# Runs the seed-004 workflow once against the fixture site, end to end:
# starts the site on a free port, runs the workflow with --wait, stops the
# site. Needs python3 and a built caudal (CAUDAL, default target/release or
# target/debug). State and run directories go to ./caudal-seed-004.
#
#   run.sh          the legacy scrapers (caudal.toml)
#   run.sh crawl    the detail scrapers as crawl tasks (crawl.toml); state
#                   and runs in ./caudal-seed-004-crawl
set -eu
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
  "") config=$here/caudal.toml workflow=seed004 ;;
  crawl) config=$here/crawl.toml workflow=seed004_crawl ;;
  *) echo "usage: $0 [crawl]" >&2; exit 2 ;;
esac
root=$(cd "$here/../.." && pwd)
caudal=${CAUDAL:-}
if [ -z "$caudal" ]; then
  for c in "$root/target/release/caudal" "$root/target/debug/caudal"; do
    [ -x "$c" ] && caudal=$c && break
  done
fi
[ -n "$caudal" ] || { echo "build caudal first: cargo build --release" >&2; exit 2; }
log=$(mktemp)
python3 "$here/site.py" --port 0 >"$log" 2>&1 &
site=$!
trap 'kill $site 2>/dev/null' EXIT INT TERM
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$log" | head -n1)
[ -n "$url" ] || { cat "$log" >&2; exit 1; }
echo "fixture site at $url"
# crawl.toml names the site's host:port (its `site` and [crawl.sites]).
SEED004_HOST=${url#http://}
export SEED004_HOST
"$caudal" --config "$config" workflow run "$workflow" --param "site=$url" --wait
