#!/usr/bin/env bash
# Client tests: install the extension (release build, the one users run and the
# demo uses) into the system PostgreSQL 15, then run
# the pytest suite, which starts its own private clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --release
(cd examples/node && npm install --no-audit --no-fund --silent >/dev/null)
/usr/bin/python3 -m pytest -q -p no:cacheprovider tests "$@"
