#!/usr/bin/env bash
# Scale-out benchmark: FlowFabric's scenario 1 through the PL/Proxy router vs
# one server directly, and two shards pinned to a core each vs one shard on
# one core. Writes bench/scale/RESULTS-scale.md (raw: bench/scale/out/).
#   bench/scale/run.sh                 3 runs per setup (~5-10 minutes)
#   SCALE_REPS=1 bench/scale/run.sh    one run per setup
# Servers on ports 54363-54365 (sockets in /tmp/flowfabric-scale-bench-*),
# run as postgres, always stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# scripts/setup.sh installs the toolchain and server; it also re-runs `cargo
# pgrx init`, which rewrites pgrx-config/config.toml and makes cargo rebuild
# pgrx and the extension (minutes), so run it only when something is missing.
if ! [ -x /usr/lib/postgresql/15/bin/pg_config ] || ! [ -f pgrx-config/config.toml ] \
   || ! /usr/bin/python3 -c 'import psycopg' 2>/dev/null || ! cargo pgrx --version 2>/dev/null | grep -q 0.18.0; then
  bash scripts/setup.sh
fi
if ! dpkg-query -W -f='${Status}' postgresql-15-plproxy 2>/dev/null | grep -q "install ok installed"; then
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql-15-plproxy >/dev/null
fi
bash scripts/install.sh --release

stop_all() {
  for d in /tmp/flowfabric-scale-bench-*; do
    [ -f "$d/data/postmaster.pid" ] || continue
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$d/data" -m immediate -w stop >/dev/null 2>&1 || true
  done
}
trap stop_all EXIT
/usr/bin/python3 bench/scale/scale_bench.py
/usr/bin/python3 bench/scale/report.py
echo "scale bench: done, see bench/scale/RESULTS-scale.md"
