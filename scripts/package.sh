#!/usr/bin/env bash
# Builds the Debian package of the extension for the system PostgreSQL 15:
#   target/package/postgresql-15-flowfabric_<version>_amd64.deb
# from a release `cargo pgrx package` and `dpkg-deb --build`. It holds what
# scripts/install.sh installs -- the library, the control file, the install
# script and every upgrade script, the 0.2.0 -> 0.3.0 one composed the same way
# (scripts/upgrade-sql.py over sql/upgrade/) -- plus the README, the
# copyright and the changelog (from debian/changelog, whose top entry must
# carry the version of Cargo.toml).
#
# Installing the package needs no Rust: `dpkg -i` (or `apt install ./<deb>`);
# tests/package-test.sh does that and runs the demo against it.
# CARGO_TARGET_DIR is honoured (the build is shared with install.sh --release
# when both use the same one). Runs lintian when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
export PGRX_HOME="$PWD/pgrx-config"
PG_MAJOR=15
PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config"
NAME="postgresql-$PG_MAJOR-flowfabric"
ARCH=amd64

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# dpkg-deb comes with dpkg; the changelog and shared-library tools with dpkg-dev.
if ! command -v dpkg-parsechangelog >/dev/null || ! command -v dpkg-shlibdeps >/dev/null; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dpkg-dev
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
changelog_version="$(dpkg-parsechangelog -l debian/changelog -S Version)"
if [ "$changelog_version" != "$version" ]; then
  echo "package: debian/changelog's top entry is $changelog_version, Cargo.toml says $version;" \
       "add a changelog entry for $version" >&2
  exit 1
fi

pkgdir="$PWD/target/package"
build="$pkgdir/build"      # cargo pgrx package output (a DESTDIR-style tree)
root="$pkgdir/root"        # the package's file system tree
deb="$pkgdir/${NAME}_${version}_${ARCH}.deb"
rm -rf "$build" "$root" "$deb"
mkdir -p "$pkgdir"

echo "package: cargo pgrx package (release) ..."
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$build" >/dev/null

pkglibdir="$("$PG_CONFIG" --pkglibdir)"             # /usr/lib/postgresql/15/lib
extdir="$("$PG_CONFIG" --sharedir)/extension"       # /usr/share/postgresql/15/extension

# Upgrade scripts, exactly as scripts/install.sh composes them: each
# hand-written head (sql/upgrade/FROM--VERSION.sql) followed by the code of
# this build's install script.
for head in sql/upgrade/*--"$version".sql; do
  [ -e "$head" ] || continue
  python3 scripts/upgrade-sql.py "$build$extdir/flowfabric--$version.sql" "$head" \
    > "$build$extdir/flowfabric--$(basename "$head")"
done

# The tree: the same file set install.sh copies (everything cargo pgrx
# package staged and the composed upgrades). Install scripts of earlier
# versions are not shipped: this library cannot run them (their functions
# name symbols it answers with 55000); databases on them upgrade in place.
install -d -m 0755 "$root$pkglibdir" "$root$extdir"
for f in "$build$pkglibdir"/*; do install -m 0644 "$f" "$root$pkglibdir/"; done
for f in "$build$extdir"/*; do install -m 0644 "$f" "$root$extdir/"; done
# The symbols the server looks up stay in the dynamic symbol table.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root$pkglibdir/flowfabric.so"

doc="$root/usr/share/doc/$NAME"
install -d -m 0755 "$doc"
gzip -9n < README.md > "$doc/README.md.gz"
gzip -9n < debian/changelog > "$doc/changelog.Debian.gz"
install -m 0644 debian/copyright "$doc/copyright"
chmod 0644 "$doc"/*

# Shared-library dependencies of the .so (libc6, libgcc-s1), as dpkg-shlibdeps
# finds them; it wants a debian/control, so it runs in a scratch directory.
shlibs=""
if command -v dpkg-shlibdeps >/dev/null; then
  scratch="$(mktemp -d)"
  mkdir -p "$scratch/debian"
  printf 'Source: flowfabric\n\nPackage: %s\nArchitecture: %s\n' "$NAME" "$ARCH" > "$scratch/debian/control"
  shlibs="$(cd "$scratch" && dpkg-shlibdeps -O "$root$pkglibdir/flowfabric.so" 2>/dev/null \
            | sed -n 's/^shlibs:Depends=//p')" || shlibs=""
  rm -rf "$scratch"
fi

install -d -m 0755 "$root/DEBIAN"
installed_size="$(du -sk --apparent-size "$root/usr" | cut -f1)"
cat > "$root/DEBIAN/control" <<EOF
Package: $NAME
Version: $version
Architecture: $ARCH
Maintainer: $(dpkg-parsechangelog -l debian/changelog -S Maintainer)
Installed-Size: $installed_size
Depends: postgresql-$PG_MAJOR${shlibs:+, $shlibs}
Section: database
Priority: optional
Description: durable execution engine inside PostgreSQL $PG_MAJOR
 flowfabric is a PostgreSQL extension that turns the database into a
 durable execution engine: budgets and quotas, a worker claim pipeline with
 HMAC-signed grants and leases, dependency DAGs with a completion cascade,
 and reconcilers run by a background worker or pg_cron. Every operation is
 an SQL function running in the caller's transaction.
 .
 This package holds the extension for PostgreSQL $PG_MAJOR: the library, the
 install script of version $version, the install scripts of earlier versions
 and the scripts upgrading each of them. Enable it in a database with
 CREATE EXTENSION flowfabric; (as a superuser).
EOF
(cd "$root" && find usr -type f -printf '%P\n' | LC_ALL=C sort | sed 's|^|usr/|' | xargs md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

# File dates in the archive: the changelog's, so rebuilding the same sources
# gives the same members. (Set only now: build scripts rerun when it changes.)
SOURCE_DATE_EPOCH="$(dpkg-parsechangelog -l debian/changelog -S Timestamp)" \
  dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null

# Self-check of the archive: its control fields and the SQL set install.sh
# installs (the staged install and upgrade scripts).
listing="$(dpkg-deb --fsys-tarfile "$deb" | tar -t)"
want="$(ls "$build$extdir" | LC_ALL=C sort -u)"
have="$(sed -n "s|^\./${extdir#/}/\(..*\)|\1|p" <<<"$listing" | LC_ALL=C sort)"
if [ "$want" != "$have" ]; then
  echo "package: extension files differ from what install.sh installs:" >&2
  diff <(echo "$want") <(echo "$have") >&2 || true
  exit 1
fi
for field in Package Version Architecture Maintainer Depends Section Description; do
  [ -n "$(dpkg-deb --field "$deb" "$field")" ] || { echo "package: control field $field is empty" >&2; exit 1; }
done
grep -qx "\./${pkglibdir#/}/flowfabric.so" <<<"$listing" \
  || { echo "package: flowfabric.so is missing" >&2; exit 1; }

dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
if command -v lintian >/dev/null; then
  echo "package: lintian"
  lintian --tag-display-limit 0 "$deb" || true
fi
echo "package: built $deb"
