#!/usr/bin/env bash
# Builds installable packages of the extension, one set per PostgreSQL major given
# (default: 15 14 16 17 18), into target/packages/:
#   postgresql-<major>-centrifugo-outbox_<version>_amd64.deb
#       Debian/Ubuntu layout (/usr/lib/postgresql/<major>/lib, /usr/share/postgresql/<major>/extension),
#       Depends: postgresql-<major> and the shared libraries the module links to.
#   centrifugo_outbox-<version>-pg<major>-linux-x86_64.tar.gz
#       the same files relative to an install tree: lib/centrifugo_outbox.so and
#       share/extension/*; unpack with `tar -xzf FILE -C <prefix> --no-same-owner` where pkglibdir is <prefix>/lib and
#       sharedir is <prefix>/share, or copy lib/* to `pg_config --pkglibdir` and share/extension/* to
#       `pg_config --sharedir`/extension.
# Both hold the control file, the install script of this version, the earlier versions' install
# and upgrade scripts (sql/upgrade/*.sql, for ALTER EXTENSION ... UPDATE) and the stripped library.
# Built by `cargo pgrx package` (release profile; PACKAGE_PROFILE=debug for a quick check) against
# the major's pg_config: Debian's for 15, the scripts/setup.sh trees in $CENTRIFUGO_OUTBOX_CACHE/pg
# for the others. Run scripts/setup.sh first.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
cache=${CENTRIFUGO_OUTBOX_CACHE:-/var/cache/centrifugo_outbox}
profile=${PACKAGE_PROFILE:-release}
maintainer=${PACKAGE_MAINTAINER:-centrifugo_outbox maintainers <centrifugo-outbox@localhost>}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
out=$target_dir/packages
majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(15 14 16 17 18)

version=$(sed -nE '/^\[workspace.package\]/,/^\[/ s/^version = "([^"]+)"/\1/p' Cargo.toml)
description=$(sed -nE 's/^description = "([^"]+)"/\1/p' Cargo.toml | head -1)
license=$(sed -nE '/^\[workspace.package\]/,/^\[/ s/^license = "([^"]+)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no version in Cargo.toml" >&2; exit 1; }
mkdir -p "$out"
# The packages' directories and files get their modes from here, not from the caller's umask.
umask 022

pg_config_of() {
  if [ "$1" = 15 ]; then echo /usr/lib/postgresql/15/bin/pg_config; else echo "$cache/pg/$1/bin/pg_config"; fi
}

# Debian packages providing the libraries the module links to, except libc's and PostgreSQL's own.
shlib_depends() {
  ldd "$1" | awk '/=> \// {print $3}' | while read -r lib; do
    dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || true
  done | cut -d: -f1 | sort -u | { grep -vxE 'libc6|libgcc-s1|postgresql-.*' || true; } | paste -sd, | sed 's/,/, /g'
}

for major in "${majors[@]}"; do
  pg_config=$(pg_config_of "$major")
  [ -x "$pg_config" ] || { echo "no pg_config for PostgreSQL $major at $pg_config (scripts/setup.sh)" >&2; exit 1; }
  echo "==> package for PostgreSQL $major ($("$pg_config" --version), $profile)"
  build=$out/build/pg$major
  rm -rf "$build"
  profile_args=()
  if [ "$profile" = debug ]; then profile_args=(--debug); elif [ "$profile" != release ]; then profile_args=(--profile "$profile"); fi
  # cargo-pgrx swaps the default pg15 feature for the major of --pg-config and keeps `kafka`.
  cargo pgrx package --pg-config "$pg_config" --out-dir "$build/pgrx" "${profile_args[@]}" >/dev/null

  pkglibdir=$("$pg_config" --pkglibdir)
  extdir=$("$pg_config" --sharedir)/extension
  # The plain tree: lib/ and share/extension/.
  tree=$build/tree
  install -d "$tree/lib" "$tree/share/extension"
  install -m 0755 "$build/pgrx$pkglibdir/centrifugo_outbox.so" "$tree/lib/"
  strip --strip-unneeded "$tree/lib/centrifugo_outbox.so"
  install -m 0644 "$build/pgrx$extdir"/centrifugo_outbox.control "$build/pgrx$extdir"/centrifugo_outbox--*.sql \
    "$repo"/sql/upgrade/*.sql "$tree/share/extension/"
  [ -f "$tree/share/extension/centrifugo_outbox--$version.sql" ] ||
    { echo "cargo pgrx package made no centrifugo_outbox--$version.sql" >&2; exit 1; }

  tarball=$out/centrifugo_outbox-$version-pg$major-linux-x86_64.tar.gz
  # Files only (no directory entries): unpacking into an existing prefix changes no directory.
  (cd "$tree" && find lib share -type f | sort) |
    tar --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX -czf "$tarball" -C "$tree" --no-recursion -T -

  # The .deb: the same files in Debian's paths for this major.
  pkg=postgresql-$major-centrifugo-outbox
  deb=$build/deb
  install -d "$deb/DEBIAN" "$deb/usr/lib/postgresql/$major/lib" "$deb/usr/share/postgresql/$major/extension" \
    "$deb/usr/share/doc/$pkg"
  cp -p "$tree/lib/centrifugo_outbox.so" "$deb/usr/lib/postgresql/$major/lib/"
  cp -p "$tree"/share/extension/* "$deb/usr/share/postgresql/$major/extension/"
  cat >"$deb/usr/share/doc/$pkg/copyright" <<EOF
centrifugo_outbox $version, PostgreSQL $major build
License: $license
The module statically links librdkafka (BSD-2-Clause) and Rust crates under their own licenses.
EOF
  depends="postgresql-$major"
  libs=$(shlib_depends "$tree/lib/centrifugo_outbox.so")
  [ -n "$libs" ] && depends="$depends, $libs"
  cat >"$deb/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$deb" | cut -f1)
Depends: $depends
Section: database
Priority: optional
Description: Centrifugo outbox extension for PostgreSQL $major
 $description.
EOF
  debfile=$out/${pkg}_${version}_amd64.deb
  dpkg-deb --root-owner-group -Zxz --build "$deb" "$debfile" >/dev/null
  echo "    $debfile ($(du -h "$debfile" | cut -f1); Depends: $depends)"
  echo "    $tarball ($(du -h "$tarball" | cut -f1))"
done
