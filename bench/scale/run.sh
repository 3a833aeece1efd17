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
# Toolchain, server and PL/Proxy (scripts/setup.sh skips what is there).
bash scripts/setup.sh
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
