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
PG_MAJOR=15
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config

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

apt_packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo ca-certificates
  build-essential pkg-config libssl-dev zlib1g-dev cmake libcurl4-openssl-dev openssl)
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
  step "cargo-pgrx $PGRX_VERSION (about 8 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

pgrx_home=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "pg$PG_MAJOR = \"$PG_CONFIG\"" "$pgrx_home/config.toml"; then
  step "pgrx init against the system PostgreSQL $PG_MAJOR"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
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

step "ready: $("$cache/bin/centrifugo" version | head -1); Kafka $KAFKA_VERSION; $(cargo pgrx --version); $($PG_CONFIG --version)"
