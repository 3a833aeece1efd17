#!/usr/bin/env bash
# Builds the extension and installs it into the system PostgreSQL 15, with
# the upgrade scripts from earlier versions (install scripts of earlier
# versions are not installed: this library cannot run them, and databases
# on them upgrade in place). Pass --release for an optimised build. PG_CONFIG picks
# another PostgreSQL installation (the default is the system one).
#
# A running server keeps the old library mapped, so nothing is written over
# it: every file is copied under a temporary name in its target directory
# and then renamed into place (the old inode lives on until the server lets
# go of it; new backends load the new file).
set -euo pipefail
cd "$(dirname "$0")/.."
export PGRX_HOME="$PWD/pgrx-config"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

profile=(--debug)
out="$PWD/target/install-debug"
if [ "${1:-}" = "--release" ]; then
  profile=()
  out="$PWD/target/install-release"
fi
rm -rf "$out"
cargo pgrx package "${profile[@]}" --pg-config "$PG_CONFIG" --out-dir "$out" >/dev/null

# install_atomically SOURCE TARGET_DIR: copy under a temporary name, then rename.
install_atomically() {
  local src="$1" dir="$2" name tmp
  name="$(basename "$src")"
  tmp="$dir/.${name}.tmp.$$"
  $SUDO install -m 0644 "$src" "$tmp"
  $SUDO mv -f "$tmp" "$dir/$name"
}

# Upgrade scripts: each is its hand-written part (sql/upgrade/FROM--TO.sql)
# followed by the code of this build's install script.
extdir_pkg="$out$("$PG_CONFIG" --sharedir)/extension"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
for head in sql/upgrade/*--"$version".sql; do
  [ -e "$head" ] || continue
  python3 scripts/upgrade-sql.py "$extdir_pkg/flowfabric--$version.sql" "$head" \
    > "$extdir_pkg/flowfabric--$(basename "$head")"
done

pkglibdir="$("$PG_CONFIG" --pkglibdir)"
extdir="$("$PG_CONFIG" --sharedir)/extension"
for f in "$out$pkglibdir"/*; do install_atomically "$f" "$pkglibdir"; done
for f in "$out$extdir"/*; do install_atomically "$f" "$extdir"; done
# Install scripts of earlier versions left by an older install.sh.
for f in "$extdir"/flowfabric--*.sql; do
  case "$(basename "$f")" in
    flowfabric--"$version".sql|flowfabric--*--*.sql) ;;
    *) $SUDO rm -f "$f" ;;
  esac
done
