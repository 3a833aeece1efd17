#!/usr/bin/env bash
# Version-regression benchmark: release 0.2.0 against the current version
# (0.3.0), same machine, same server build, same settings, same workload
# shapes, runs interleaved. Writes bench/out/versions.json and
# bench/RESULTS-versions.md.
#
#   bench/versions.sh                    full run (~20 minutes once built; the first builds take ~10 more)
#   VERSIONS_QUICK=1 bench/versions.sh   smoke run (3-6 minutes once built, depending on other load)
#   VERSIONS_BUILD_ONLY=1 bench/versions.sh   only build and install both versions
#
# Why its own builds: scripts/old-builds.sh makes *debug* packages (enough
# for the upgrade tests, useless for speed), so 0.2.0 is rebuilt here from
# git history as a release package (same profile it shipped with: opt-level 3,
# thin LTO, one codegen unit) into target/old-release/0.2.0; built once, then
# reused. The current version is packaged with `cargo pgrx package` (release).
#
# Each version gets its own private copy of the Debian PostgreSQL 15
# (target/bench-versions/pg-<version>): Debian's pg_config computes its
# directories relative to its own location, so a copy laid out as
# <prefix>/lib/postgresql/15 + <prefix>/share/postgresql/15 finds its
# libraries and extension files inside the prefix, and the two versions'
# identically named flowfabric.so / flowfabric.control never meet. Clusters:
# port 54352 (0.2.0) and 54353 (0.3.0), sockets in /tmp/flowfabric-vbench-<port>,
# run as postgres; both are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PG_MAJOR=15
SYS_PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config"
export PGRX_HOME="$ROOT/pgrx-config"
PY=/usr/bin/python3
OUTROOT="$ROOT/target/bench-versions"
mkdir -p "$OUTROOT"
t_start=$(date +%s)

bash scripts/setup.sh >/dev/null

# ---------------------------------------------------------------------------
# 1. Release 0.2.0, release build from its last commit (once).
# ---------------------------------------------------------------------------
OLD_COMMIT=93bb79e            # the last commit that carried 0.2.0 (as in scripts/old-builds.sh)
OLD_OUT="$ROOT/target/old-release/0.2.0"
if [ ! -f "$OLD_OUT/.built" ]; then
  src="$ROOT/target/old-release/src-0.2.0"
  rm -rf "$src" "$OLD_OUT"
  mkdir -p "$src"
  git archive "$OLD_COMMIT" | tar -x -C "$src"
  echo "versions: building flowfabric 0.2.0 ($OLD_COMMIT) as a release package (first time only, several minutes)"
  (cd "$src" && CARGO_TARGET_DIR="$ROOT/target/old-release/build" \
     cargo pgrx package --pg-config "$SYS_PG_CONFIG" --out-dir "$OLD_OUT" \
       >"$ROOT/target/old-release/build-0.2.0.log" 2>&1) \
    || { tail -30 "$ROOT/target/old-release/build-0.2.0.log"; exit 1; }
  touch "$OLD_OUT/.built"
fi

# ---------------------------------------------------------------------------
# 2. The current version, release package of the working tree.
#    (cargo does nothing when the build is up to date.)
# ---------------------------------------------------------------------------
CUR_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
CUR_OUT="$OUTROOT/cur"
echo "versions: packaging the current version ($CUR_VERSION, release)"
rm -rf "$CUR_OUT"
# Its own cargo target dir: the default one is shared with test builds that
# use other features (pg_test), and each side would keep rebuilding pgrx
# for the other.
CARGO_TARGET_DIR="$OUTROOT/build" \
  cargo pgrx package --pg-config "$SYS_PG_CONFIG" --out-dir "$CUR_OUT" >"$OUTROOT/build-cur.log" 2>&1 \
  || { tail -30 "$OUTROOT/build-cur.log"; exit 1; }
VERSIONS_CUR_BUILT_FROM="$(git rev-parse --short HEAD)"
if [ -n "$(git status --porcelain -- src sql Cargo.toml 2>/dev/null)" ]; then
  VERSIONS_CUR_BUILT_FROM="$VERSIONS_CUR_BUILT_FROM+dirty"
fi
export VERSIONS_CUR_BUILT_FROM VERSIONS_OLD_COMMIT="$OLD_COMMIT" VERSIONS_CUR_VERSION="$CUR_VERSION"

# ---------------------------------------------------------------------------
# 3. Two private servers, each with one version installed.
# ---------------------------------------------------------------------------
# The servers run as postgres and must be able to read the prefixes.
chmod o+rx "$ROOT" "$ROOT/target" "$OUTROOT" 2>/dev/null || true

sys_version="$(/usr/lib/postgresql/$PG_MAJOR/bin/postgres --version)"

# make_prefix VERSION: a fresh-enough copy of the system server.
make_prefix() {
  local p="$OUTROOT/pg-$1"
  local bin="$p/lib/postgresql/$PG_MAJOR/bin"
  if [ ! -x "$bin/postgres" ] || [ "$("$bin/postgres" --version)" != "$sys_version" ]; then
    echo "versions: copying PostgreSQL $PG_MAJOR to $p"
    rm -rf "$p"
    mkdir -p "$p/lib/postgresql" "$p/share/postgresql"
    cp -a "/usr/lib/postgresql/$PG_MAJOR" "$p/lib/postgresql/"
    cp -a "/usr/share/postgresql/$PG_MAJOR" "$p/share/postgresql/"
  fi
  # Only this version's flowfabric files in the prefix.
  rm -f "$p/lib/postgresql/$PG_MAJOR/lib/flowfabric.so" "$p/share/postgresql/$PG_MAJOR/extension/"flowfabric*
}

# install_into PREFIX PKGTREE FILE...: copies the named files of a package
# tree (laid out for the system server) into the private prefix. The
# destination comes from the copy's own pg_config, so a wrong relocation
# fails here rather than silently loading the system's library.
install_into() {
  local p="$1" tree="$2"; shift 2
  local pgc="$p/lib/postgresql/$PG_MAJOR/bin/pg_config"
  local libdir extdir
  libdir="$("$pgc" --pkglibdir)"; extdir="$("$pgc" --sharedir)/extension"
  case "$libdir" in "$p"/*) ;; *) echo "versions: $pgc points outside its prefix ($libdir)"; exit 1;; esac
  install -m 0644 "$tree$("$SYS_PG_CONFIG" --pkglibdir)/flowfabric.so" "$libdir/flowfabric.so"
  for f in "$@"; do
    install -m 0644 "$tree$("$SYS_PG_CONFIG" --sharedir)/extension/$f" "$extdir/$f"
  done
}

make_prefix 0.2.0
install_into "$OUTROOT/pg-0.2.0" "$OLD_OUT" flowfabric.control flowfabric--0.2.0.sql
make_prefix "$CUR_VERSION"
# As scripts/install.sh composes it, minus the upgrade scripts (a fresh
# CREATE EXTENSION needs only the control file and this version's script).
install_into "$OUTROOT/pg-$CUR_VERSION" "$CUR_OUT" flowfabric.control "flowfabric--$CUR_VERSION.sql"
export VERSIONS_PREFIX_OLD="$OUTROOT/pg-0.2.0" VERSIONS_PREFIX_CUR="$OUTROOT/pg-$CUR_VERSION"
export VERSIONS_BUILD_S=$(( $(date +%s) - t_start ))

if [ -n "${VERSIONS_BUILD_ONLY:-}" ]; then
  echo "versions: both versions built and installed (${VERSIONS_BUILD_S}s)"
  exit 0
fi

"$PY" bench/versions.py
echo "versions: done in $(( $(date +%s) - t_start ))s, see bench/RESULTS-versions.md"
