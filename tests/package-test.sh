#!/usr/bin/env bash
# Installs the Debian package built by scripts/package.sh into this machine's
# PostgreSQL 15 with dpkg alone (no Rust: the install runs with a PATH that
# has no cargo), then proves it in fresh private clusters:
#   - every installed file is the package's (dpkg --verify);
#   - CREATE EXTENSION flowfabric gives the package's version, and a worker
#     round trip (budget, execution, claim, spend, complete) works;
#   - every released version (0.1.0, 0.2.0) has an update path to the current
#     one made of the package's scripts;
#   - the demo's check (scripts/demo.sh --check with FF_DEMO_INSTALLED=1,
#     so it builds nothing) passes against it;
#   - dpkg -r removes every file, and the package is installed again (so the
#     machine is left with the package's extension installed).
# Servers run as postgres on ports 54370 (checks) and 54371 (demo), sockets
# in /tmp/flowfabric-pkgtest-54370 and /tmp/flowfabric-demo-54371; both are
# stopped on exit.
#   tests/package-test.sh [path/to.deb]   (default: target/package/ of this version)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
PG_BIN=/usr/lib/postgresql/15/bin
NAME=postgresql-15-flowfabric
PORT=54370
DEMO_PORT=54371
dir="/tmp/flowfabric-pkgtest-$PORT"
demo_dir="/tmp/flowfabric-demo-$DEMO_PORT"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
deb="${1:-target/package/${NAME}_${version}_amd64.deb}"
[ -f "$deb" ] || { echo "package-test: $deb not found; run scripts/package.sh first" >&2; exit 1; }
deb="$(realpath "$deb")"
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
step() { echo "package-test: $*"; }

stop_cluster() {  # DATADIR
  if [ -f "$1/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
cleanup() {
  stop_cluster "$dir/data"
  stop_cluster "$demo_dir/data"
  rm -rf "$dir" "$demo_dir"
}
trap cleanup EXIT

# 1. Install with dpkg only; no Rust toolchain on the PATH.
step "dpkg -i $(basename "$deb")"
$SUDO env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
[ "$(dpkg-query -W -f='${Status} ${Version}' "$NAME")" = "install ok installed $version" ] \
  || { echo "package-test: $NAME $version is not installed" >&2; exit 1; }
$SUDO dpkg --verify "$NAME"   # silent when every file matches the package's md5sums
extdir="$("$PG_BIN/pg_config" --sharedir)/extension"
pkglibdir="$("$PG_BIN/pg_config" --pkglibdir)"
for f in "$pkglibdir/flowfabric.so" "$extdir/flowfabric.control" "$extdir/flowfabric--$version.sql"; do
  dpkg -S "$f" >/dev/null || { echo "package-test: $f does not belong to $NAME" >&2; exit 1; }
done

# 2. A fresh private cluster.
step "fresh cluster on port $PORT"
stop_cluster "$dir/data"
rm -rf "$dir"
mkdir -p "$dir"
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$dir"
as_pg "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
cat >> "$dir/data/postgresql.conf" <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$dir'
fsync = off
EOF
as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
psql_() {  # DB SQL...: prints unaligned, tuples only; stops on the first error
  local db="$1"; shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -h "$dir" -p "$PORT" -U postgres -d "$db" "$@"
}
expect() {  # WHAT EXPECTED ACTUAL
  if [ "$2" != "$3" ]; then
    echo "package-test: $1: expected '$2', got '$3'" >&2
    tail -n 20 "$dir/server.log" >&2 || true
    exit 1
  fi
}

step "CREATE EXTENSION flowfabric"
psql_ postgres -c "CREATE DATABASE app"
psql_ app -c "CREATE EXTENSION flowfabric"
expect "extension version" "$version" "$(psql_ app -c "SELECT extversion FROM pg_extension WHERE extname = 'flowfabric'")"
expect "available versions (only this one can be created)" "$version" \
  "$(psql_ app -c "SELECT string_agg(version, ' ' ORDER BY version) FROM pg_available_extension_versions WHERE name = 'flowfabric'")"

step "worker round trip"
answer="$(psql_ app <<'SQL'
SET search_path = flowfabric, public;
SELECT ff_create_budget('pkg', '{tokens}', '{1000}', '{800}') \gset
SELECT ff_create_execution('pkg-lane', payload => '{"n": 1}', budget_ids => '{pkg}') AS eid \gset
SELECT execution_id = :'eid' AS claimed, grant_key FROM ff_claim_for_worker('pkg-lane', 'w1', 'w1-1') \gset
BEGIN;
SELECT outcome FROM ff_record_spend('pkg', :'eid', '{"tokens": 120}', 'k1');
SELECT ff_complete_execution(:'eid', :'grant_key', '{"ok": true}');
COMMIT;
SELECT :'claimed', ff_get_execution(:'eid') ->> 'public_state',
       ff_get_budget_status('pkg') -> 'usage' ->> 'tokens';
SQL
)"
expect "round trip" "$(printf 'ok\n\nt|completed|120')" "$answer"

# 3. Every released version has an update path to this one made of the
# package's scripts. (Running those upgrades needs a database created by the
# old version's library; that is tests/test_upgrade_client.py. Install
# scripts of old versions are not shipped: this library cannot run them,
# their calls reach retired entry points, which answer 55000.)
step "update paths to $version"
expect "update paths" "0.1.0:0.1.0--0.2.0--$version 0.2.0:0.2.0--$version" \
  "$(psql_ app -c "SELECT string_agg(source || ':' || path, ' ' ORDER BY source)
                   FROM pg_extension_update_paths('flowfabric')
                   WHERE target = '$version' AND path IS NOT NULL")"
stop_cluster "$dir/data"

# 4. The demo, end to end, on what the package installed.
step "demo check on port $DEMO_PORT (FF_DEMO_INSTALLED=1)"
FF_DEMO_INSTALLED=1 FF_DEMO_PORT="$DEMO_PORT" bash scripts/demo.sh --check

# 5. Removal takes every file away; then install again.
step "dpkg -r, then dpkg -i again"
files="$(dpkg -L "$NAME" | while read -r f; do [ -f "$f" ] && echo "$f"; done)"
$SUDO dpkg -r "$NAME" >/dev/null
left="$(for f in $files; do [ -e "$f" ] && echo "$f"; done || true)"
$SUDO env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
[ -z "$left" ] || { echo "package-test: dpkg -r left: $left" >&2; exit 1; }
echo "package-test: passed"
