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
# Toolchain, server and PL/Proxy (scripts/setup.sh skips what is there).
bash scripts/setup.sh
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
