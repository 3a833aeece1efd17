#!/usr/bin/env bash
# flowfabric benchmark: one command from a fresh clone to bench/RESULTS.md.
#   bench/run.sh                  full run (~30 min on a quiet 2-core machine, plus the release build)
#   BENCH_QUICK=1 bench/run.sh    short run, same code path, smaller sizes (~10-15 min)
#
# pgmq (for its comparison) is loaded at run time from the SQL-only install
# script that the PyPI package `pgmq` carries (`pip download`, cached in
# target/bench-pgmq); without it that section is skipped with a note.
#
# It uses its own copy of PostgreSQL 15 (target/bench-pg), so reinstalling a
# debug build into the system server while it runs changes nothing here, and
# its own cargo target dir (target/bench-build). The cluster lives in
# /tmp/flowfabric-bench-$BENCH_PORT (unix socket only) and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PG_MAJOR=15
export BENCH_PG_PREFIX="${BENCH_PG_PREFIX:-$ROOT/target/bench-pg}"
export BENCH_PORT="${BENCH_PORT:-54351}"
PGBIN="$BENCH_PG_PREFIX/lib/postgresql/$PG_MAJOR/bin"
PY=/usr/bin/python3

bash scripts/setup.sh
for p in linux-perf; do   # perf is optional (profile section); skip quietly if unavailable
  command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p" >/dev/null 2>&1 || true
done

stop_cluster() {
  local data="/tmp/flowfabric-bench-$BENCH_PORT/data"
  if [ -f "$data/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
trap stop_cluster EXIT

# A private, relocatable copy of the Debian server: refreshed when the system
# server's version changes.
sys_version="$(/usr/lib/postgresql/$PG_MAJOR/bin/postgres --version)"
if [ ! -x "$PGBIN/postgres" ] || [ "$("$PGBIN/postgres" --version)" != "$sys_version" ]; then
  echo "bench: copying PostgreSQL $PG_MAJOR to $BENCH_PG_PREFIX"
  stop_cluster
  rm -rf "$BENCH_PG_PREFIX"
  mkdir -p "$BENCH_PG_PREFIX/lib/postgresql" "$BENCH_PG_PREFIX/share/postgresql"
  cp -a "/usr/lib/postgresql/$PG_MAJOR" "$BENCH_PG_PREFIX/lib/postgresql/"
  cp -a "/usr/share/postgresql/$PG_MAJOR" "$BENCH_PG_PREFIX/share/postgresql/"
fi
# The server runs as postgres and must be able to read the prefix.
chmod o+rx "$ROOT" "$ROOT/target" 2>/dev/null || true

BENCH_BUILT_FROM="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src sql Cargo.toml 2>/dev/null)" ]; then BENCH_BUILT_FROM="$BENCH_BUILT_FROM+dirty"; fi
export BENCH_BUILT_FROM
echo "bench: building and installing the release extension ($BENCH_BUILT_FROM) into $BENCH_PG_PREFIX"
export PGRX_HOME="$ROOT/pgrx-config"
CARGO_TARGET_DIR="$ROOT/target/bench-build" \
  cargo pgrx install --release --pg-config "$PGBIN/pg_config" >"$ROOT/target/bench-build.log" 2>&1 \
  || { tail -30 "$ROOT/target/bench-build.log"; exit 1; }
export BENCH_BUILD_INFO="release build (cargo pgrx install --release, opt-level 3, thin LTO)"

# The worker-pool load driver (C, libpq): one thread and connection per worker.
echo "bench: building the load driver (bench/ffdrive.c)"
mkdir -p "$ROOT/target/bench-driver"
cc -O2 -Wall -o "$ROOT/target/bench-driver/ffdrive" bench/ffdrive.c \
  -I"$(/usr/lib/postgresql/$PG_MAJOR/bin/pg_config --includedir)" -lpq -lpthread

"$PY" bench/bench.py
"$PY" bench/report.py
echo "bench: done, see bench/RESULTS.md"
