#!/bin/sh
# Seed 003's batch pipeline end to end on this machine: creates the
# database seed003 (PostgreSQL on 127.0.0.1:5432, user postgres), generates
# a month of sales, backfills May 2025 into a local Parquet dataset, serves
# it with `caudal run`, and asks the API for provider 7's month as JSON and
# CSV next to PostgreSQL's own aggregate (report.sql).
#
#   run.sh              100,000 sales
#   ROWS=1000000 run.sh
#
# Needs psql, curl and a built caudal (CAUDAL, default target/release or
# target/debug). State and data go to ./caudal-seed-003.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
caudal=${CAUDAL:-}
if [ -z "$caudal" ]; then
  for c in "$root/target/release/caudal" "$root/target/debug/caudal"; do
    [ -x "$c" ] && caudal=$c && break
  done
fi
[ -n "$caudal" ] || { echo "build caudal first: cargo build --release" >&2; exit 2; }
psql="psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q"
$psql -d postgres -c "drop database if exists seed003" -c "create database seed003"
$psql -d seed003 -f "$here/schema.sql"
$psql -d seed003 -v rows="${ROWS:-100000}" -f "$here/generate.sql"
work=$PWD/caudal-seed-003
rm -rf "$work" && mkdir -p "$work"
export SEED003_DB=postgres://postgres@127.0.0.1:5432/seed003
export SEED003_DATA=$work/sales_daily
cd "$work"
cfg=$here/caudal.toml
"$caudal" -c "$cfg" validate
"$caudal" -c "$cfg" backfill daily_sales --from 2025-05-01 --to 2025-05-31 --parallel 2
token=$("$caudal" -c "$cfg" token create --name seed003 --role viewer | tail -n1)
"$caudal" -c "$cfg" run >caudal.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 50); do curl -sf http://127.0.0.1:9464/readyz >/dev/null && break; sleep 0.2; done
api=http://127.0.0.1:9464/api/v1/datasets
q="provider_id=7&date_from=2025-05-01&date_to=2025-05-31&columns=provider_id,date,sales,units,revenue"
echo "== GET $api"
curl -sf -H "Authorization: Bearer $token" "$api"; echo
echo "== provider 7, May 2025 (JSON, first 3 rows)"
curl -sf -H "Authorization: Bearer $token" "$api/sales_daily/rows?$q&limit=3"; echo
echo "== the same as CSV, twice (X-Cache: miss, then hit)"
curl -sf -D - -o "$work/p7.csv" -H "Accept: text/csv" -H "Authorization: Bearer $token" "$api/sales_daily/rows?$q" | grep -i x-cache
curl -sf -D - -o /dev/null -H "Accept: text/csv" -H "Authorization: Bearer $token" "$api/sales_daily/rows?$q" | grep -i x-cache
echo "== PostgreSQL's own aggregate for provider 7"
$psql -d seed003 -A -F, -P footer=off -v from=2025-05-01 -v to=2025-05-31 -f "$here/report.sql" \
  | awk -F, 'NR==1 {print "provider_id,date,sales,units,revenue"} NR>1 && $1==7 {print $1","$2","$3","$4","$5}' \
  > "$work/p7-postgres.csv"
if diff "$work/p7.csv" "$work/p7-postgres.csv" >/dev/null; then
  echo "the API's rows equal PostgreSQL's aggregate ($(($(wc -l < "$work/p7.csv") - 1)) days)"
else
  diff "$work/p7.csv" "$work/p7-postgres.csv" | head; exit 1
fi
curl -sf http://127.0.0.1:9464/metrics | grep '^caudal_dataset_cache_\(hits\|misses\)_total'
