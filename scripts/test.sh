#!/usr/bin/env bash
# The whole test suite: pure Rust unit tests and #[pg_test]s (cargo pgrx
# test), then client tests that drive a private PostgreSQL 15 cluster through
# real connections. Installs whatever is missing first.
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

# The README's demo command, end to end, asserting its outcome.
bash scripts/demo.sh --check
