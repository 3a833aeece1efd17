#!/usr/bin/env bash
# The whole test suite: pure Rust unit tests and #[pg_test]s (cargo pgrx
# test), client tests that drive private PostgreSQL 15 clusters through real
# connections, the golden-file tests, the scale-out demo, the README's demo
# and the Debian package. Installs whatever is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PGRX_HOME="$PWD/pgrx-config"

# cargo pgrx test runs its server as the postgres user (initdb refuses root).
PGDATA_DIR="$PWD/target/pgrx-test-data"
mkdir -p "$PGDATA_DIR"
chown postgres "$PGDATA_DIR"
cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_DIR"

bash tests/run_client_tests.sh

# Golden files: the README's SQL, run in order, and the error table.
bash scripts/regress.sh

# Two shards behind a PL/Proxy router (docs/scaling.md).
bash scripts/scale-demo.sh --check

# The README's demo command, end to end, asserting its outcome.
bash scripts/demo.sh --check

# The Debian package, installed with dpkg alone and proven on fresh clusters.
bash scripts/package.sh
bash tests/package-test.sh
