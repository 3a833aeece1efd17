#!/usr/bin/env bash
# Builds the released versions of flowfabric from this repository's history
# into package trees under target/old/<version>/ (library and SQL, laid out
# for the PostgreSQL given by PG_CONFIG), for the upgrade tests. Each is
# built once; a later run reuses it.
#   scripts/old-builds.sh            all released versions
#   scripts/old-builds.sh 0.2.0      one
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PGRX_HOME="$ROOT/pgrx-config"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"

# version -> the last commit that carried it
declare -A RELEASES=([0.1.0]=74474e3 [0.2.0]=93bb79e)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.1.0 0.2.0)

for v in "${versions[@]}"; do
  commit="${RELEASES[$v]:?unknown release $v}"
  out="$ROOT/target/old/$v"
  [ -f "$out/.built" ] && continue
  src="$ROOT/target/old/src-$v"
  rm -rf "$src" "$out"
  mkdir -p "$src"
  git archive "$commit" | tar -x -C "$src"
  echo "old-builds: building flowfabric $v from $commit (first time only)"
  (cd "$src" && CARGO_TARGET_DIR="$ROOT/target/old/build" \
     cargo pgrx package --debug --pg-config "$PG_CONFIG" --out-dir "$out" >"$ROOT/target/old/build-$v.log" 2>&1) \
    || { tail -30 "$ROOT/target/old/build-$v.log"; exit 1; }
  touch "$out/.built"
done
