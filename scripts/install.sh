#!/usr/bin/env bash
# Builds the extension and installs it into the system PostgreSQL 15, with
# the archived install scripts of earlier versions so they can be created
# and upgraded from. Pass --release for an optimised build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGRX_HOME="$PWD/pgrx-config"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
cargo pgrx install "$@" --pg-config "$PG_CONFIG" ${SUDO:+--sudo} >/dev/null
$SUDO cp sql/archive/flowfabric--*.sql "$("$PG_CONFIG" --sharedir)/extension/"
