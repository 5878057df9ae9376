#!/usr/bin/env bash
# Runs every test layer (README command 2). Installs what is missing first (scripts/setup.sh).
#   scripts/test.sh            all layers
#   scripts/test.sh unit       pure logic, plain `cargo test`, no PostgreSQL
#   scripts/test.sh pgrx       in-database tests (`cargo pgrx test`, a throwaway cluster)
#   scripts/test.sh e2e [ARGS] end to end: real PostgreSQL clusters, Centrifugo and Kafka (pytest ARGS)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cd "$repo"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
layer=${1:-all}
[ $# -gt 0 ] && shift

[ "${SKIP_SETUP:-0}" = 1 ] || bash "$here/setup.sh"

run_unit() {
  echo "==> unit tests (no PostgreSQL)"
  cargo test -p outbox_core
}

run_pgrx() {
  echo "==> in-database tests (cargo pgrx test)"
  local pgdata=/var/tmp/centrifugo_outbox_pgrx
  install -d -o postgres -g postgres -m 0755 "$pgdata"
  cargo pgrx test pg15 --runas postgres --pgdata "$pgdata"
}

run_e2e() {
  echo "==> installing the extension into PostgreSQL 15"
  cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
  # Earlier versions' install script and the upgrade scripts, for ALTER EXTENSION ... UPDATE.
  cp "$repo"/sql/upgrade/*.sql "$("$PG_CONFIG" --sharedir)/extension/"
  echo "==> end-to-end tests (real PostgreSQL, Centrifugo, Kafka)"
  python3 -m pytest "$repo/tests" -p no:cacheprovider "$@"
}

case "$layer" in
  unit) run_unit ;;
  pgrx) run_pgrx ;;
  e2e) run_e2e "$@" ;;
  all) run_unit; run_pgrx; run_e2e "$@" ;;
  *) echo "unknown layer $layer (unit, pgrx, e2e, all)" >&2; exit 2 ;;
esac
