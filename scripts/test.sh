#!/usr/bin/env bash
# Runs every test layer (README command 2). Installs what is missing first (scripts/setup.sh).
#   scripts/test.sh            all layers: unit, lint, pgrx, e2e, matrix, packages
#   scripts/test.sh unit       pure logic, plain `cargo test`, no PostgreSQL
#   scripts/test.sh lint       cargo fmt --check and cargo clippy -D warnings (both crates, with
#                              and without the kafka feature)
#   scripts/test.sh pgrx [NN]  in-database tests (`cargo pgrx test pgNN`, a throwaway cluster; NN=15)
#   scripts/test.sh e2e [ARGS] end to end: real clusters, Centrifugo and Kafka (pytest ARGS), on
#                              PostgreSQL 15, or on E2E_MAJOR (the whole suite on another major)
#   scripts/test.sh matrix [ARGS]  for each of $MAJORS: build, in-database tests, and the e2e
#                              subset listed in tests/matrix.txt
#   scripts/test.sh packages [ARGS]  scripts/package.sh for 15 and $MAJORS (debug builds unless
#                              PACKAGE_PROFILE=release), then tests/test_packages.py (dpkg -i/-r
#                              of the 15 .deb, the others' tarballs unpacked into their trees)
# MAJORS="14 16 17 18" by default (the majors besides 15); MAJORS="16" is the quick local path.
# Ends with one line per layer and major: test count and seconds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cd "$repo"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
cache=${CENTRIFUGO_OUTBOX_CACHE:-/var/cache/centrifugo_outbox}
MAJORS=${MAJORS:-14 16 17 18}
# One run at a time per machine: runs share PostgreSQL 15's library directory, the majors'
# trees, dpkg and the cache. The script runs again under flock(1), which holds the lock itself
# (-o: servers a test leaves behind do not inherit it); a nested run holds it already.
if [ -z "${CENTRIFUGO_OUTBOX_LOCKED:-}" ] && command -v flock >/dev/null && [ -w /var/lock ]; then
  export CENTRIFUGO_OUTBOX_LOCKED=1
  exec flock -o -w 7200 /var/lock/centrifugo_outbox.lock bash "$here/test.sh" "$@"
fi

layer=${1:-all}
[ $# -gt 0 ] && shift


[ "${SKIP_SETUP:-0}" = 1 ] || bash "$here/setup.sh"

# One shared target dir ($CARGO_TARGET_DIR, default target/) for every major: only pgrx-pg-sys and
# what depends on it is built per major; librdkafka (cmake) and the other dependencies once.
results=$(mktemp -d /tmp/centrifugo_outbox_test.XXXXXX)
trap 'rm -rf "$results"' EXIT

pg_config_of() {
  if [ "$1" = 15 ]; then echo /usr/lib/postgresql/15/bin/pg_config; else echo "$cache/pg/$1/bin/pg_config"; fi
}

# record LAYER MAJOR COUNT SECONDS STATUS
record() { echo "$*" >>"$results/summary"; }

# Sums "test result: ok. N passed; M failed; ..." lines of cargo test output.
cargo_count() {
  grep -aE '^test result: ' "$1" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' |
    awk '{n += $1 + $2} END {print n + 0}'
}

# Tests run in a pytest junit xml (skipped ones not counted).
junit_count() {
  python3 - "$1" <<'EOF' 2>/dev/null || echo 0
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
print(sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites))
EOF
}

# Runs one step (a function) with errexit in a subshell, timing it and recording a summary line;
# a failing step does not stop the other layers of `all`.
failed=0
step() {
  local layer=$1 major=$2; shift 2
  local start rc
  start=$(date +%s)
  : >"$results/count"
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  local count
  count=$(cat "$results/count" 2>/dev/null)
  # A layer that ran no test (all skipped, or output not understood) proves nothing.
  if [ $rc = 0 ] && [ "${count:-0}" = 0 ]; then
    echo "==> $layer ($major): no test ran" >&2
    rc=1
  fi
  record "$layer" "$major" "${count:-0}" "$(($(date +%s) - start))" "$([ $rc = 0 ] && echo ok || echo FAILED)"
  [ $rc = 0 ] || failed=1
  return 0
}

run_unit() {
  echo "==> unit tests (no PostgreSQL)"
  local rc=0
  cargo test -p outbox_core 2>&1 | tee "$results/unit.log" || rc=$?
  cargo_count "$results/unit.log" >"$results/count"
  return $rc
}

# fmt and clippy: every check runs, the layer fails if any did.
run_lint() {
  local checks=(
    "cargo fmt --all -- --check"
    "cargo clippy -p outbox_core --all-targets -- -D warnings"
    "cargo clippy -p centrifugo_outbox --all-targets -- -D warnings"
    "cargo clippy -p centrifugo_outbox --all-targets --no-default-features --features pg15 -- -D warnings"
  )
  local check bad=0 n=0
  for check in "${checks[@]}"; do
    echo "==> lint: $check"
    n=$((n + 1))
    $check || { echo "==> lint FAILED: $check"; bad=1; }
  done
  echo "$n" >"$results/count"
  return $bad
}

run_pgrx() {
  local major=${1:-15}
  echo "==> in-database tests on PostgreSQL $major (cargo pgrx test pg$major)"
  local pgdata=/var/tmp/centrifugo_outbox_pgrx$major
  install -d -o postgres -g postgres -m 0755 "$pgdata"
  # cargo-pgrx swaps the default pg15 feature for pg$major and keeps `kafka`.
  local rc=0
  cargo pgrx test "pg$major" --runas postgres --pgdata "$pgdata" 2>&1 | tee "$results/pgrx$major.log" || rc=$?
  cargo_count "$results/pgrx$major.log" >"$results/count"
  return $rc
}

# Installs the extension (debug build) and the earlier versions' scripts into a major's tree.
install_into() {
  local major=$1 pg_config libdir sharedir
  pg_config=$(pg_config_of "$major")
  # Each on its own line: a failing pg_config stops here (set -e), never leaves a path of "/...".
  libdir=$("$pg_config" --pkglibdir)
  sharedir=$("$pg_config" --sharedir)
  [ -n "$libdir" ] && [ -n "$sharedir" ]
  echo "==> installing the extension into PostgreSQL $major"
  # A running cluster maps the old library: unlink it rather than overwrite it in place.
  rm -f "$libdir/centrifugo_outbox.so"
  cargo pgrx install --pg-config "$pg_config" >/dev/null
  # Earlier versions' install script and the upgrade scripts, for ALTER EXTENSION ... UPDATE.
  cp "$repo"/sql/upgrade/*.sql "$sharedir/extension/"
}

pytest_run() {
  local name=$1; shift
  local rc=0
  python3 -m pytest -p no:cacheprovider --junitxml="$results/$name.xml" "$@" || rc=$?
  junit_count "$results/$name.xml" >"$results/count"
  return $rc
}

run_e2e() {
  local major=${E2E_MAJOR:-15}
  install_into "$major"
  echo "==> end-to-end tests on PostgreSQL $major (real PostgreSQL, Centrifugo, Kafka)"
  # The slowest tests are listed at the end: where to look when the layer grows.
  EXPECTED_PG_MAJOR=$major PG_BIN=$(dirname "$(pg_config_of "$major")") pytest_run "e2e$major" "$repo/tests" \
    --ignore="$repo/tests/test_packages.py" --durations=15 "$@"
}

matrix_ids() {
  grep -vE '^\s*(#|$)' "$repo/tests/matrix.txt" | sed "s|^|$repo/tests/|"
}

run_matrix_e2e() {
  local major=$1; shift
  install_into "$major"
  echo "==> end-to-end subset on PostgreSQL $major (tests/matrix.txt)"
  local ids
  mapfile -t ids < <(matrix_ids)
  EXPECTED_PG_MAJOR=$major PG_BIN="$cache/pg/$major/bin" pytest_run "e2e$major" "${ids[@]}" "$@"
}

run_packages() {
  local majors=(15 $MAJORS)
  # Debug builds by default: the same cargo build as `cargo pgrx install` in the e2e and matrix
  # layers, so packaging costs seconds per major instead of a release build each (about 5 min
  # cold for the first major, 1.5 min for each other). PACKAGE_PROFILE=release tests what a
  # release ships (scripts/package.sh's own default).
  local profile=${PACKAGE_PROFILE:-debug}
  echo "==> packages for PostgreSQL ${majors[*]} ($profile)"
  PACKAGE_PROFILE=$profile bash "$here/package.sh" "${majors[@]}"
  echo "==> package tests"
  local rc=0
  PACKAGE_MAJORS="${majors[*]}" pytest_run packages "$repo/tests/test_packages.py" "$@" || rc=$?
  # dpkg -r took the library out of PostgreSQL 15 (also when a test failed midway): put the
  # source build back for the e2e layer and for whoever uses this machine next.
  install_into 15
  return $rc
}

run_matrix() {
  local major
  for major in $MAJORS; do
    [ "$major" = 15 ] && continue
    step pgrx "$major" run_pgrx "$major"
    step e2e-subset "$major" run_matrix_e2e "$major" "$@"
  done
}

summary() {
  echo
  echo "==> summary (layer, PostgreSQL major, tests, seconds)"
  [ -f "$results/summary" ] &&
    awk '{printf "%-11s %-7s %5s tests %6ss  %s\n", $1, ($2 == "-" ? "-" : "pg" $2), $3, $4, $5}' "$results/summary"
  return $failed
}

case "$layer" in
  unit) step unit - run_unit ;;
  lint) step lint - run_lint ;;
  pgrx) step pgrx "${1:-15}" run_pgrx "${1:-15}" ;;
  e2e) step e2e "${E2E_MAJOR:-15}" run_e2e "$@" ;;
  matrix) run_matrix "$@" ;;
  packages) step packages "$(echo 15 $MAJORS | tr ' ' ,)" run_packages "$@" ;;
  all)
    step unit - run_unit
    step lint - run_lint
    step pgrx 15 run_pgrx 15
    E2E_MAJOR=15 step e2e 15 run_e2e "$@"
    run_matrix "$@"
    # Last: it replaces PostgreSQL 15's library with the package's and then reinstalls it.
    step packages "$(echo 15 $MAJORS | tr ' ' ,)" run_packages "$@"
    ;;
  *) echo "unknown layer $layer (unit, lint, pgrx, e2e, matrix, packages, all)" >&2; exit 2 ;;
esac
summary
