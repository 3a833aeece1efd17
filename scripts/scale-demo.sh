#!/usr/bin/env bash
# flowfabric on two shards behind a PL/Proxy router, on this machine.
#   scripts/scale-demo.sh          run the demo workload, print where work ran
#   scripts/scale-demo.sh --check  the same, asserting the outcome (exit 1 when wrong)
#
# Servers: router on port 54360, shards on 54361 and 54362, each run as the
# postgres user with a unix socket in /tmp/flowfabric-scale-<name>-<port>
# (never the default cluster); all three are stopped when the script ends,
# whatever happens. Design: docs/scaling.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# scripts/setup.sh installs the toolchain and server; it also re-runs `cargo
# pgrx init`, which rewrites pgrx-config/config.toml and makes cargo rebuild
# pgrx and the extension (minutes), so run it only when something is missing.
if ! [ -x /usr/lib/postgresql/15/bin/pg_config ] || ! [ -f pgrx-config/config.toml ] \
   || ! /usr/bin/python3 -c 'import psycopg' 2>/dev/null || ! cargo pgrx --version 2>/dev/null | grep -q 0.18.0; then
  bash scripts/setup.sh
fi
# PL/Proxy for the router (from Debian, like the server itself).
if ! dpkg-query -W -f='${Status}' postgresql-15-plproxy 2>/dev/null | grep -q "install ok installed"; then
  echo "scale-demo: installing postgresql-15-plproxy"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql-15-plproxy >/dev/null
fi
# The shards run the extension built from this tree (a no-op rebuild when current).
bash scripts/install.sh --release

stop_all() {
  # The driver stops its servers itself; this catches a driver that was killed.
  for d in /tmp/flowfabric-scale-router-54360 /tmp/flowfabric-scale-s1-54361 /tmp/flowfabric-scale-s2-54362; do
    [ -f "$d/data/postmaster.pid" ] || continue
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$d/data" -m immediate -w stop >/dev/null 2>&1 || true
  done
}
trap stop_all EXIT
/usr/bin/python3 router/scale_demo.py "$@"
