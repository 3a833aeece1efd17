#!/usr/bin/env bash
# Installs everything flowfabric needs on a fresh Debian machine; each step is
# skipped when already done, so running it again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=15
PGRX_VERSION=0.18.0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_pkgs=()
for p in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo \
         postgresql-$PG_MAJOR-cron postgresql-contrib python3-psycopg python3-pytest \
         postgresql-$PG_MAJOR-plproxy dpkg-dev binutils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
# plproxy: the router of scripts/scale-demo.sh; dpkg-dev and binutils:
# scripts/package.sh (dpkg-parsechangelog, strip).
# The Node example worker needs node and npm; a machine may have them already.
command -v node >/dev/null && command -v npm >/dev/null || need_pkgs+=(nodejs npm)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_pkgs[@]}"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (takes a few minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# pgrx reads its config from PGRX_HOME; keep it in the repo and point it at the
# system server so `cargo pgrx init` downloads nothing.
export PGRX_HOME="$PWD/pgrx-config"
# Only when the config is missing or different: rewriting it (even with the
# same content) makes cargo rebuild pgrx and the extension.
want="pg$PG_MAJOR = \"/usr/lib/postgresql/$PG_MAJOR/bin/pg_config\""
if ! grep -qxF "$want" "$PGRX_HOME/config.toml" 2>/dev/null; then
  cargo pgrx init --pg$PG_MAJOR "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" >/dev/null
fi

# The server runs as postgres (initdb refuses root); let it read the build tree.
chmod o+rx "$PWD" 2>/dev/null || true
echo "setup: ok"
