#!/usr/bin/env bash
# One command from a fresh clone to a running demo: installs what is
# missing, builds and installs the extension (release), starts a private
# PostgreSQL 15 cluster and runs examples/demo.py against it.
#   scripts/demo.sh          run the demo, leave the cluster running
#   scripts/demo.sh stop     stop the demo cluster
#   scripts/demo.sh --check  run, assert the outcome, stop (used by the tests)
# FF_DEMO_INSTALLED=1 skips setup and the build and uses the extension already
# installed (e.g. from the .deb; tests/package-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "stop" ]; then
  exec /usr/bin/python3 examples/demo.py --stop
fi
if [ -z "${FF_DEMO_INSTALLED:-}" ]; then
  bash scripts/setup.sh
  bash scripts/install.sh --release
fi
(cd examples/node && npm install --no-audit --no-fund --silent >/dev/null)
exec /usr/bin/python3 examples/demo.py "$@"
